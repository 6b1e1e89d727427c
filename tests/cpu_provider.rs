//! `ThreadSlots`, the host's CPU provider: a slot per thread, `enter` sections exclusive against re-entry,
//! and leaf sections (`enter_leaf`) that never get a slot an open `enter` section holds.
#![cfg(feature = "std")]

use goheap::cpu::{CpuProvider, ThreadSlots};
use std::sync::{Arc, Barrier};

#[test]
fn leaf_sections_respect_enter_sections() {
    std::thread::spawn(|| {
        let p = ThreadSlots::new();
        // A fresh thread has no slot yet: the leaf section sends it to the general path, which claims one.
        assert_eq!(p.enter_leaf().1, None, "leaf section before the thread claimed a slot");
        let (guard, slot) = p.enter();
        let slot = slot.expect("a slot for the thread");
        // While the `enter` section is open, neither a re-entrant `enter` nor a leaf section gets the slot.
        assert_eq!(p.enter().1, None, "re-entrant enter got a slot");
        assert_eq!(p.enter_leaf().1, None, "leaf section inside an enter section got the slot");
        drop(guard);
        assert_eq!(p.enter_leaf().1, Some(slot), "leaf section after the enter section ended");
        assert_eq!(p.enter_leaf().1, Some(slot), "leaf sections leave no mark");
        assert_eq!(p.enter().1, Some(slot));
    })
    .join()
    .unwrap();
}

#[test]
fn threads_hold_distinct_slots() {
    const N: usize = 8;
    let barrier = Arc::new(Barrier::new(N));
    let slots: Vec<usize> = (0..N)
        .map(|_| {
            let b = barrier.clone();
            std::thread::spawn(move || {
                let p = ThreadSlots::new();
                let (g, s) = p.enter();
                drop(g);
                // All threads hold their slots at once here.
                b.wait();
                let leaf = p.enter_leaf().1;
                assert_eq!(leaf, s);
                b.wait();
                s.expect("a slot")
            })
        })
        .collect::<Vec<_>>()
        .into_iter()
        .map(|h| h.join().unwrap())
        .collect();
    let mut sorted = slots.clone();
    sorted.sort_unstable();
    sorted.dedup();
    assert_eq!(sorted.len(), N, "threads shared a slot: {slots:?}");
}
