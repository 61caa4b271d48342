//! Memory accounting per thread, for the scripts' memory budget.
//!
//! [`Counting`] wraps the system allocator and keeps, per thread, the bytes allocated minus
//! the bytes freed. A script runs synchronously on one thread, so what that count grows by
//! between two moments of a run is what the run holds (give or take memory another thread
//! frees for it, which a script cannot arrange). The binary installs it as the global
//! allocator (and the script nodes' unit tests do); where it is not installed the count never
//! moves, so no budget is ever exceeded.
//!
//! The hook is two thread-local additions per allocation: a `const` thread-local [`Cell`]
//! needs no lazy initialisation and registers no destructor, so it is safe (and cheap) inside
//! the allocator, on every thread, until the thread's very end.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

thread_local! {
    /// Bytes allocated minus bytes freed by this thread (wraps; only differences matter).
    static NET: Cell<usize> = const { Cell::new(0) };
}

/// The system allocator, counting bytes per thread. Install it in a binary with
/// `#[global_allocator] static A: Counting = Counting;`.
pub struct Counting;

#[inline]
fn add(n: usize) {
    NET.with(|c| c.set(c.get().wrapping_add(n)));
}

#[inline]
fn sub(n: usize) {
    NET.with(|c| c.set(c.get().wrapping_sub(n)));
}

// SAFETY: every call is forwarded to `System` unchanged; the counting touches only a
// thread-local `Cell` (no allocation, no lock, no destructor).
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        add(layout.size());
        System.alloc(layout)
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        add(layout.size());
        System.alloc_zeroed(layout)
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        sub(layout.size());
        System.dealloc(ptr, layout)
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        add(new_size);
        sub(layout.size());
        System.realloc(ptr, layout, new_size)
    }
}

/// A mark of this thread's allocation count; [`Mark::grown`] says how much more the thread
/// holds since.
#[derive(Debug, Clone, Copy)]
pub struct Mark(usize);

impl Mark {
    /// This thread's count now.
    #[inline]
    pub fn now() -> Mark {
        Mark(NET.with(Cell::get))
    }

    /// Bytes this thread holds beyond what it held at the mark (0 if it holds less).
    #[inline]
    pub fn grown(self) -> usize {
        let d = NET.with(Cell::get).wrapping_sub(self.0);
        // A negative difference (freed more than allocated) wraps to a huge number.
        if d > isize::MAX as usize {
            0
        } else {
            d
        }
    }
}

/// Hands memory the allocator keeps free back to the system (glibc keeps freed memory for
/// reuse; after a large flow is removed that can be tens of megabytes). Called when a flow is
/// removed: it walks the heap, so not on any per-message path.
pub fn give_back() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases free memory; any thread may call it at any time.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_what_this_thread_allocates_and_frees() {
        let m = Mark::now();
        // Not the global allocator in this test binary: count by hand through the hooks.
        let layout = Layout::from_size_align(1 << 20, 8).unwrap();
        // SAFETY: a plain allocate / reallocate / free of one block.
        unsafe {
            let p = Counting.alloc(layout);
            assert!(!p.is_null());
            assert_eq!(m.grown(), 1 << 20);
            let p = Counting.realloc(p, layout, 3 << 20);
            assert_eq!(m.grown(), 3 << 20);
            Counting.dealloc(p, Layout::from_size_align(3 << 20, 8).unwrap());
        }
        assert_eq!(m.grown(), 0);
        // Another thread's allocations do not count here.
        std::thread::spawn(move || {
            // SAFETY: as above.
            unsafe {
                let p = Counting.alloc(layout);
                Counting.dealloc(p, layout);
            }
        })
        .join()
        .unwrap();
        assert_eq!(m.grown(), 0);
    }
}
