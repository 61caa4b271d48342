//! Where a flow input's task runs, and work its nodes defer until it yields.
//!
//! **A thread of its own.** Each input node's task (its receive loop and every propagation it
//! dispatches) runs on a thread of its own, `flowbus-input`, with a single-threaded tokio
//! scheduler ([`spawn`]), as IIB gives each input node a thread. A message then goes from
//! the MQTT client's thread to that one thread and back, instead of through a shared pool of
//! workers that wake each other to steal it (measured: a fifth less CPU on the flow's side,
//! see `benches/bridge/results/2026-12-01/README.md`, eighth round); and a slow script holds up only its own input,
//! never other flows or the admin API. Everything such a task spawns (connection supervisors,
//! `instances > 1` propagations) and every timer it sets goes to the daemon's shared runtime,
//! which outlives it: the thread only polls the input's own future.
//!
//! **Deferred work.** An input node's task runs each message through the flow up to the
//! message's first real wait (an acknowledgement, back-pressure) and then takes the next. Some
//! effects are cheaper in a batch than one at a time: handing publications to the MQTT client
//! wakes the client's send thread once per hand-over. A node can [`defer`] such an effect to
//! the moment the task is about to suspend, i.e. once every message that was ready has been
//! processed: at a high rate, one hand-over then carries many messages; at a low rate, each
//! goes as soon as its own processing ends, on the same thread, without waking another task.
//!
//! Deferred work runs whenever the task's poll returns (pending or ready), and when the task is
//! dropped after a poll that unwound, so a deferred effect never waits on the task that
//! deferred it: nothing the flow waits for stays behind.

use std::cell::RefCell;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

/// An effect to run when the task that deferred it yields.
pub trait OnYield: Send + Sync {
    /// Runs the effect (once per [`defer`]).
    fn on_yield(&self);
}

type Pending = Arc<Mutex<Vec<Arc<dyn OnYield>>>>;

thread_local! {
    /// The deferred-work list of the task being polled on this thread, if it is a flow
    /// input's (set only for the duration of its poll).
    static CURRENT: RefCell<Option<Pending>> = const { RefCell::new(None) };
}

/// Defers `work` to the moment the current flow-input task yields; deferring the same `work`
/// again before then changes nothing (it runs once). Returns `false`, and defers nothing,
/// outside such a task (another task, another thread): the caller does the work its own way
/// then.
pub fn defer<W: OnYield + 'static>(work: &Arc<W>) -> bool {
    CURRENT.with(|c| match &*c.borrow() {
        Some(list) => {
            let mut list = list.lock().unwrap_or_else(|p| p.into_inner());
            if !list
                .iter()
                .any(|w| std::ptr::addr_eq(Arc::as_ptr(w), Arc::as_ptr(work)))
            {
                list.push(work.clone());
            }
            true
        }
        None => false,
    })
}

/// Whether [`defer`] would defer here.
#[cfg(test)]
fn can_defer() -> bool {
    CURRENT.with(|c| c.borrow().is_some())
}

/// A future that runs what was deferred during its poll when the poll returns, and what is
/// left when it is dropped.
pub struct RunOnYield<F> {
    inner: Pin<Box<F>>,
    pending: Pending,
    /// The list being run: swapped with `pending`'s, so neither is reallocated per poll.
    running: Vec<Arc<dyn OnYield>>,
}

impl<F> RunOnYield<F> {
    /// Wraps a flow input's future.
    pub fn new(inner: F) -> RunOnYield<F> {
        RunOnYield {
            inner: Box::pin(inner),
            pending: Pending::default(),
            running: Vec::new(),
        }
    }

    /// Runs and forgets what was deferred.
    fn run(&mut self) {
        // Taken out first, so the lock is not held while the effects run.
        std::mem::swap(
            &mut *self.pending.lock().unwrap_or_else(|p| p.into_inner()),
            &mut self.running,
        );
        for w in self.running.drain(..) {
            w.on_yield();
        }
    }
}

/// Restores the outer task's list (if one is being polled further up this thread's stack)
/// however the inner poll ends, unwinding included.
struct Restore(Option<Pending>);

impl Drop for Restore {
    fn drop(&mut self) {
        let outer = self.0.take();
        CURRENT.with(|c| *c.borrow_mut() = outer);
    }
}

impl<F: Future> Future for RunOnYield<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        // No field is structurally pinned (the inner future is boxed): plain access is fine.
        let this = self.get_mut();
        let out = {
            let _restore = Restore(CURRENT.with(|c| c.replace(Some(this.pending.clone()))));
            this.inner.as_mut().poll(cx)
        };
        this.run();
        out
    }
}

/// Polls a future with the shared runtime as the current one: what it spawns, and the timers
/// it sets, belong to that runtime, whichever thread polls it.
struct OnShared<F> {
    shared: tokio::runtime::Handle,
    inner: F,
}

impl<F: Future + Unpin> Future for OnShared<F> {
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let _shared = self.shared.enter();
        Pin::new(&mut self.inner).poll(cx)
    }
}

/// The name of every input thread (Linux keeps 15 bytes of a thread's name).
pub const THREAD_NAME: &str = "flowbus-input";

/// The stack of every thread that may run a script (input threads, and the daemon's tokio
/// workers): 1 GiB of address space, of which only the pages a deep recursion touches cost
/// memory. Scripts bound how deep a value they leave may nest (`max_depth`), but Rhai itself
/// builds, copies, compares and drops nested values recursively, a few hundred bytes of stack
/// a level (on the 2 MiB default, 5,000 levels survived and 12,000 did not). How deep a script
/// can nest is bounded by its time: Rhai's size checks walk the whole value at every level, so
/// building `n` levels takes time in `n²`: within the longest timeout (60 s) a release build
/// did not reach 200,000 levels (measured), well inside 1 GiB.
pub const STACK_SIZE: usize = 1 << 30;

/// Runs a flow input's future on a thread of its own (see the module documentation), wrapped
/// in [`RunOnYield`]; the current runtime (the caller's) is the one everything it spawns goes
/// to. The returned handle is the task's, as from `tokio::spawn`: awaiting it waits for the
/// future, aborting it drops the future at its next yield; the thread ends with the task. If
/// the thread cannot be started, the task runs on the current runtime instead.
///
/// Must be called inside a tokio runtime.
pub fn spawn<F>(fut: F) -> tokio::task::JoinHandle<F::Output>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    let shared = tokio::runtime::Handle::current();
    let task = RunOnYield::new(fut);
    // Left here if the thread does not take it: then it runs on the shared runtime.
    let slot = Arc::new(Mutex::new(Some(task)));
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    let started = {
        let (slot, shared) = (slot.clone(), shared.clone());
        std::thread::Builder::new()
            .name(THREAD_NAME.into())
            .stack_size(STACK_SIZE)
            .spawn(move || {
                // Without a scheduler the thread ends here, sending nothing: the caller then
                // runs the task on the shared runtime.
                let Ok(rt) = tokio::runtime::Builder::new_current_thread().build() else {
                    return;
                };
                let Some(task) = slot.lock().unwrap_or_else(|p| p.into_inner()).take() else {
                    return;
                };
                // Dropped with the task's future, whether it finished or was aborted.
                let (done, finished) = tokio::sync::oneshot::channel::<()>();
                let handle = rt.spawn(OnShared {
                    shared,
                    inner: Box::pin(async move {
                        let _done = done;
                        task.await
                    }),
                });
                let _ = tx.send(handle);
                rt.block_on(async {
                    let _ = finished.await;
                });
            })
            .is_ok()
    };
    if started {
        if let Ok(handle) = rx.recv() {
            return handle;
        }
    }
    let task = slot.lock().unwrap_or_else(|p| p.into_inner()).take();
    match task {
        Some(task) => shared.spawn(task),
        // The thread sends the handle as soon as it has spawned the task it took.
        None => unreachable!("an input thread took its task without handing back its handle"),
    }
}

/// Only a poll that unwound leaves work behind (every other poll runs it on return).
impl<F> Drop for RunOnYield<F> {
    fn drop(&mut self) {
        self.run();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    struct Count(AtomicUsize);
    impl OnYield for Count {
        fn on_yield(&self) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[tokio::test]
    async fn deferred_work_runs_when_the_task_yields_not_before() {
        let c = Arc::new(Count(AtomicUsize::new(0)));
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let seen = {
            let c = c.clone();
            tokio::spawn(RunOnYield::new(async move {
                assert!(can_defer());
                assert!(defer(&c));
                assert!(defer(&c));
                // Still in the same poll: nothing has run yet.
                let before = c.0.load(Ordering::SeqCst);
                rx.await.unwrap();
                // The wait above yielded: the work ran then, once for the two defers.
                let after_yield = c.0.load(Ordering::SeqCst);
                // Deferred again, it runs again at the next yield (here: the task's end).
                assert!(defer(&c));
                (before, after_yield)
            }))
        };
        tokio::task::yield_now().await;
        tx.send(()).unwrap();
        assert_eq!(seen.await.unwrap(), (0, 1));
        assert_eq!(c.0.load(Ordering::SeqCst), 2);
    }

    /// The input runs on a thread of its own; what it spawns runs on the caller's runtime.
    #[tokio::test]
    async fn an_input_runs_on_its_own_thread_and_spawns_on_the_shared_runtime() {
        let shared = tokio::runtime::Handle::current().id();
        let here = std::thread::current().id();
        let out = spawn(async move {
            let me = std::thread::current();
            let spawned = tokio::spawn(async { tokio::runtime::Handle::current().id() });
            // A timer set here is the shared runtime's (this thread has no timer of its own).
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            (
                me.name().map(str::to_string),
                me.id(),
                can_defer(),
                spawned.await.unwrap(),
            )
        })
        .await
        .unwrap();
        assert_eq!(out.0.as_deref(), Some(THREAD_NAME));
        assert_ne!(out.1, here);
        assert!(out.2, "deferring works on the input's thread");
        assert_eq!(out.3, shared);
    }

    /// An input that holds its thread (a long script) holds up nobody else: with this test's
    /// single-threaded runtime, the old way (a task on the shared runtime) would stall it.
    #[tokio::test]
    async fn a_busy_input_does_not_hold_up_the_shared_runtime() {
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let busy = spawn(async move {
            // Blocks its thread until the shared runtime has done its part.
            rx.recv_timeout(std::time::Duration::from_secs(10)).is_ok()
        });
        let other = tokio::spawn(async move {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            tx.send(()).unwrap();
        });
        other.await.unwrap();
        assert!(
            busy.await.unwrap(),
            "the input was released by the shared runtime"
        );
    }

    /// Aborting the handle drops the input's future (at its next yield) and reports it
    /// cancelled, like a task's.
    #[tokio::test]
    async fn aborting_an_input_drops_its_future() {
        struct Dropped(Option<tokio::sync::oneshot::Sender<()>>);
        impl Drop for Dropped {
            fn drop(&mut self) {
                let _ = self.0.take().map(|t| t.send(()));
            }
        }
        let (tx, dropped) = tokio::sync::oneshot::channel();
        let guard = Dropped(Some(tx));
        let h = spawn(async move {
            let _guard = guard;
            // A timer of the shared runtime, dropped on the input's thread.
            tokio::time::sleep(std::time::Duration::from_secs(3600)).await;
        });
        h.abort();
        assert!(h.await.unwrap_err().is_cancelled());
        dropped.await.unwrap();
    }

    #[tokio::test]
    async fn outside_an_input_task_nothing_is_deferred() {
        let c = Arc::new(Count(AtomicUsize::new(0)));
        assert!(!can_defer());
        assert!(!defer(&c));
        // Another task spawned from inside one does not inherit its list.
        let inner = tokio::spawn(RunOnYield::new(async {
            tokio::spawn(async { can_defer() }).await.unwrap()
        }));
        assert!(!inner.await.unwrap());
        assert_eq!(c.0.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn work_deferred_before_a_panic_runs_when_the_task_is_dropped() {
        let c = Arc::new(Count(AtomicUsize::new(0)));
        let mut fut = {
            let c = c.clone();
            Box::pin(RunOnYield::new(async move {
                defer(&c);
                panic!("a node panicked");
            }))
        };
        let waker = futures::task::noop_waker();
        let polled = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let _ = fut.as_mut().poll(&mut Context::from_waker(&waker));
        }));
        assert!(polled.is_err());
        // The unwinding poll neither ran the work nor left this thread pointing at its list.
        assert_eq!(c.0.load(Ordering::SeqCst), 0);
        assert!(!can_defer());
        drop(fut);
        assert_eq!(c.0.load(Ordering::SeqCst), 1);
    }
}
