//! Cross-CPU frees through a producer/consumer pipeline, checked object by object and then by exact
//! accounting: a producer thread allocates objects of classes with many objects per span (64 B, 128 per
//! span) and with few (2048 B, 4 per span; 4096 B, 2 per span), fills each with a pattern and hands it to a
//! consumer thread, which checks the pattern and frees it. The hand-off is a small bounded channel, so the
//! consumer frees both into spans the producer still caches — its current span and the used-up spans it
//! holds (deferred frees, folded by the producer's sweep when it takes a held span back, or when a span is
//! given back and another taken under one hold of the class lock, `Central::swap_span`) — and into spans it
//! gave back (folded under the class lock at once).
//!
//! What it would catch: an object handed out twice while live (the shared set of live addresses refuses
//! the second insert, and the first object's pattern breaks); an object lost on the way back to its span
//! (after every cache is flushed and `release_all` ran, a span that still counts it keeps heap pages in
//! use, and `validate` finds its `nalloc` out of step with its bitmap); a free counted twice or not at all
//! (`mallocs - frees == heap_objects == 0`, and the per-CPU figures add up to the test's own counts).
#![cfg(all(feature = "std", feature = "validate"))]

mod common;

use common::{check, fill, layout};
use goheap::cpu::ThreadSlots;
use goheap::source::mmap::MmapSource;
use goheap::Malloc;
use std::collections::HashSet;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use testkit::Rng;

type M = Malloc<MmapSource, ThreadSlots>;

/// Objects the producer makes.
const OBJECTS: u64 = 60_000;
/// Objects per hand-off batch, and batches the channel holds: a short pipeline, so frees reach spans the
/// producer still caches as well as spans it has given back.
const BATCH: usize = 16;
const IN_FLIGHT: usize = 4;

#[derive(Clone, Copy)]
struct Obj {
    addr: usize,
    size: usize,
    seed: u64,
}

#[test]
fn pipeline_loses_and_duplicates_nothing() {
    let m: &'static M = Box::leak(Box::new(Malloc::with_max_bytes(MmapSource::new(), ThreadSlots::new(), 1 << 30)));
    // Sampled objects live outside the spans (and their pages count in heap_inuse): keep every object in
    // the span path this test is about.
    m.set_profile_rate(0);
    let live: Arc<Mutex<HashSet<usize>>> = Arc::new(Mutex::new(HashSet::new()));
    let (tx, rx) = mpsc::sync_channel::<Vec<Obj>>(IN_FLIGHT);
    let live_p = live.clone();
    let producer = std::thread::spawn(move || {
        let mut rng = Rng::new(16);
        let mut batch = Vec::with_capacity(BATCH);
        for i in 0..OBJECTS {
            let size = match rng.next() % 8 {
                0..=4 => 64,
                5 | 6 => 2048,
                _ => 4096,
            };
            let p = m.alloc(layout(size, 8));
            assert!(!p.is_null(), "alloc({size}) failed");
            assert!(live_p.lock().unwrap().insert(p as usize), "object {p:p} handed out while still live");
            // SAFETY (test): a fresh block of `size` bytes.
            unsafe { fill(p, size, i) };
            batch.push(Obj { addr: p as usize, size, seed: i });
            if batch.len() == BATCH {
                tx.send(std::mem::replace(&mut batch, Vec::with_capacity(BATCH))).unwrap();
            }
        }
        if !batch.is_empty() {
            tx.send(batch).unwrap();
        }
        drop(tx);
        // The producer's cached spans and page cache go back before it ends.
        m.flush_cpu_cache();
    });
    let live_c = live.clone();
    let consumer = std::thread::spawn(move || {
        let mut n = 0u64;
        for v in rx {
            for o in v {
                // SAFETY (test): `o` is live and `o.size` bytes long; only this thread frees it, once.
                let contents = unsafe { check(o.addr as *const u8, o.size, o.seed) };
                assert_eq!(contents, Ok(()), "object {:#x} ({} B) was overwritten while live", o.addr, o.size);
                assert!(live_c.lock().unwrap().remove(&o.addr), "object {:#x} freed but not live", o.addr);
                // SAFETY (test): allocated by `m` with this layout, freed once.
                unsafe { m.dealloc(o.addr as *mut u8, layout(o.size, 8)) };
                n += 1;
            }
            if n % (8 * BATCH as u64) == 0 {
                // Now and then the whole stock at once: its latest objects are in spans the producer caches.
                m.flush_cpu_cache();
            }
        }
        m.flush_cpu_cache();
        n
    });
    producer.join().unwrap();
    let freed = consumer.join().unwrap();
    // The two threads' cache slots (each thread had one of its own: ThreadSlots).
    let slots: Vec<_> =
        (0..=goheap::cpu::MAX_CPUS).map(|i| m.cpu_stats(i)).filter(|s| s.mallocs + s.frees > 0).collect();
    assert_eq!(slots.len(), 2, "two threads, two cache slots: {slots:?}");
    let (pstats, cstats) = if slots[0].mallocs > 0 { (slots[0], slots[1]) } else { (slots[1], slots[0]) };
    assert_eq!(freed, OBJECTS);
    assert!(live.lock().unwrap().is_empty());

    // Per-CPU figures: the producer allocated everything and freed nothing; the consumer the reverse, and
    // most of its frees went into spans the producer cached at the time (deferred, not folded at once).
    assert_eq!((pstats.mallocs, pstats.frees), (OBJECTS, 0), "producer {pstats:?}");
    assert_eq!((cstats.mallocs, cstats.frees), (0, OBJECTS), "consumer {cstats:?}");
    assert!(cstats.remote_frees > 0, "no free reached a span the producer cached: {cstats:?}");
    // A span the producer used up is held (still cached by it) and taken back once the consumer freed into
    // it, or given back to the central list when the producer holds too many: either way the producer's
    // spans were renewed as they ran out.
    assert!(
        pstats.refills + pstats.held_reuses > OBJECTS / 128,
        "the producer's spans were not renewed as they ran out: {pstats:?}"
    );
    assert!(pstats.held_reuses > 0, "the producer never took back a span the consumer freed into: {pstats:?}");

    m.validate();
    let st = m.mem_stats();
    assert_eq!(st.mallocs, OBJECTS);
    assert_eq!(st.frees, OBJECTS);
    assert_eq!(st.heap_objects, 0);
    assert_eq!(st.heap_alloc, 0);
    // Every span is empty: all of them go back to the page heap, and no page stays in use.
    m.release_all();
    m.validate();
    let st = m.mem_stats();
    assert_eq!(st.heap_inuse, 0, "heap pages still in use after every object was freed: {st:?}");
}
