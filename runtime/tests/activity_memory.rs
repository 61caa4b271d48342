//! What a full activity-log ring costs in memory. Its own test binary, because it counts the
//! heap through a global allocator.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicIsize, Ordering};

use flowbus_runtime::activity::{ActivityLog, NewEntry, Severity};

struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE.fetch_add(
            new_size as isize - layout.size() as isize,
            Ordering::Relaxed,
        );
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// An entry like the publish node's sampled "published" entry.
fn published(i: usize) -> NewEntry {
    NewEntry::new(
        Severity::Info,
        12097,
        "MQTT",
        "bridge",
        "out",
        format!("Published to 'bench/out/{i}' (QoS 1, 215 bytes)"),
    )
    .tag("client_id", "fb-74185f27-bridge-out")
    .tag("qos", 1)
    .tag("topic", format!("bench/out/{i}"))
    .tag("url", "tcp://127.0.0.1:55437")
}

#[test]
fn a_full_ring_of_per_message_entries_costs_a_few_hundred_bytes_an_entry() {
    const RING: usize = 1000;
    let log = ActivityLog::new(RING, Severity::Info);
    // Fill the ring once, so its own storage has grown to size.
    for i in 0..RING {
        log.record(published(i));
    }
    let before = LIVE.load(Ordering::Relaxed);
    // Replace every entry once more, then fill a second flow's ring from empty.
    for i in 0..RING {
        log.record(published(i));
    }
    let replaced = LIVE.load(Ordering::Relaxed) - before;
    for i in 0..RING {
        let mut e = published(i);
        e.flow = "other".into();
        log.record(e);
    }
    let per_entry = (LIVE.load(Ordering::Relaxed) - before - replaced) / RING as isize;
    // Each entry's JSON line is about 290 bytes; the entry as structs with strings and a tag
    // map held about 1.3 KB.
    assert!(
        per_entry < 450,
        "a ring entry holds {per_entry} bytes of heap"
    );
    // Replacing entries in a full ring holds no more memory.
    assert!(
        replaced.abs() < 4096,
        "replacing grew the heap by {replaced}"
    );
    assert_eq!(log.query(&Default::default()).len(), 2 * RING);
}
