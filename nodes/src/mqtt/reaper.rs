//! Closed paho clients wait here until no connect of theirs is pending, then are destroyed
//! on the reaper thread, never on one of Paho's.

use super::conn::Conn;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use paho_mqtt as paho;

/// paho-mqtt clients that have been closed and wait to be destroyed. Paho's token for a
/// connect holds a reference to its client; if that reference turned out to be the last,
/// paho-mqtt would destroy the client inside the Paho C library's own thread, which deadlocks
/// the library (seen in a test that let a frozen broker answer a connect after the client was
/// let go). So a closed client stays here, holding a reference, until no connect of its is
/// waiting for Paho's answer, at two looks of the reaper thread in a row (30 s apart: Paho
/// lets go of the token just after it answers), and not before twice its connect timeout and
/// [`REAP_GRACE`] have passed; then the reaper drops it and the client (its buffers,
/// callbacks and the flow objects they hold) is destroyed there, never on a Paho thread.
static CLOSED_CLIENTS: Mutex<Vec<Closed>> = Mutex::new(Vec::new());

struct Closed {
    /// Held only to be dropped by the reaper.
    _client: paho::AsyncClient,
    /// Not destroyed before.
    due: Instant,
    /// Its connects not yet answered.
    connecting: Arc<AtomicUsize>,
    /// A look of the reaper found it due with no connect waiting.
    idle_seen: bool,
}

/// How long a closed client waits beyond twice its connect timeout.
pub const REAP_GRACE: Duration = Duration::from_secs(60);

/// How often the reaper thread looks.
const REAP_EVERY: Duration = Duration::from_secs(30);

fn retire(client: paho::AsyncClient, connect_timeout: Duration, connecting: Arc<AtomicUsize>) {
    static REAPER: std::sync::Once = std::sync::Once::new();
    let due = Instant::now() + connect_timeout.saturating_mul(2) + REAP_GRACE;
    CLOSED_CLIENTS
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .push(Closed {
            _client: client,
            due,
            connecting,
            idle_seen: false,
        });
    REAPER.call_once(|| {
        let spawned = std::thread::Builder::new()
            .name("mqtt-reaper".into())
            .spawn(|| loop {
                std::thread::sleep(REAP_EVERY);
                reap_closed_clients(Instant::now());
            });
        // Without the thread closed clients are only kept, as they always were.
        if let Err(e) = spawned {
            tracing::warn!("cannot start the MQTT client reaper thread: {e}");
        }
    });
}

/// One look of the reaper at `now`: destroys, on the calling thread (never call it on one of
/// Paho's), the closed clients that the previous look already found due with no connect
/// waiting and that still have none; returns how many. The reaper thread calls it every 30 s.
pub fn reap_closed_clients(now: Instant) -> usize {
    let due: Vec<Closed> = {
        let mut closed = CLOSED_CLIENTS.lock().unwrap_or_else(|p| p.into_inner());
        let mut due = Vec::new();
        let mut keep = Vec::new();
        for mut c in std::mem::take(&mut *closed) {
            let idle = c.due <= now && c.connecting.load(Ordering::SeqCst) == 0;
            if idle && c.idle_seen {
                due.push(c);
            } else {
                c.idle_seen = idle;
                keep.push(c);
            }
        }
        *closed = keep;
        due
    };
    // Outside the lock: destroying a client waits for Paho.
    let n = due.len();
    drop(due);
    n
}

/// How many closed clients wait to be destroyed.
pub fn closed_clients() -> usize {
    CLOSED_CLIENTS
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .len()
}

impl Drop for Conn {
    fn drop(&mut self) {
        // SAFETY: `client` is never used again: this is the drop of its owner.
        let client = unsafe { std::mem::ManuallyDrop::take(&mut self.client) };
        self.outbox.hand_over(&client, &self.log);
        if client.is_connected() {
            // Nobody is left to wait for the token.
            drop(client.disconnect(None::<paho::DisconnectOptions>));
        }
        self.outbox.closed.store(true, Ordering::SeqCst);
        self.outbox.wake.notify_one();
        retire(client, self.connect_timeout, self.connecting.clone());
        if let Some(store) = &self.store {
            store.release();
        }
    }
}

/// Abandons a connection when dropped (see [`Conn::abandon`]); after a normal shutdown it does
/// nothing.
pub struct AbandonOnDrop(pub Arc<Conn>);

impl Drop for AbandonOnDrop {
    fn drop(&mut self) {
        self.0.abandon();
    }
}
