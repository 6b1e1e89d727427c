//! Loom model (c): thread-slot claim and release (`cpu::ThreadSlots`, the host's CPU provider). Two
//! threads each enter (claiming a slot by compare-and-swap on its `OWNED` flag, Acquire), use the slot's
//! caches (a shadow cell per slot), leave and exit (the pthread key's destructor: `OWNED` cleared with
//! Release; here `loom_thread_exit`), while a third thread enters and uses whichever slot it claims. Loom
//! checks that no two threads hold one slot at once and that a slot's next holder happens after the last
//! one (the slot's caches pass between them with no other synchronisation).
//!
//! Explored: 23181 iterations (3.6–6.5 s) with the preemption bound of 3 it sets (4830 in 1.8 s at 2; with no
//! bound the model ran over four minutes: three threads scanning a 64-slot table).
//! Weakening caught: `release_at_exit`'s `OWNED[v].store(false, Release)` → `Relaxed` (src/cpu.rs):
//! loom reports "Causality violation: Concurrent write accesses to `UnsafeCell`" on the slot's shadow
//! cell, at once.
#![cfg(loom)]

mod loom_common;

use goheap::cpu::{loom_thread_exit, CpuProvider, ThreadSlots, MAX_CPUS};
use loom_common::*;
use std::sync::Arc;

fn use_slot(shadow: &Shadow, v: u64, exit: bool) {
    let (g, slot) = ThreadSlots::new().enter();
    let i = slot.expect("a free slot");
    assert!(i < MAX_CPUS);
    shadow.write(i, v);
    drop(g);
    if exit {
        loom_thread_exit();
    }
}

#[test]
fn thread_slot_claim_and_release() {
    run("thread_slot_claim_and_release", builder(Some(3)), || {
        let shadow = Arc::new(Shadow::new(&[0, 1, 2]));
        // Warm-up (see `loom_common::warm_up`): the slot table's atomics are created before the spawns, as
        // the real statics are initialised before any thread runs.
        assert_eq!(ThreadSlots::owned_count(), 0);
        for i in 0..3 {
            assert_eq!(ThreadSlots::new().departures(i), 0);
        }
        let s0 = shadow.clone();
        spawn(move || use_slot(&s0, 0, true)).join().unwrap();
        let (s1, s2) = (shadow.clone(), shadow.clone());
        let a = spawn(move || use_slot(&s1, 1, true));
        let b = spawn(move || use_slot(&s2, 2, true));
        use_slot(&shadow, 3, true);
        a.join().unwrap();
        b.join().unwrap();
        assert_eq!(ThreadSlots::owned_count(), 0, "every slot released");
        let departed: u32 = (0..3).map(|i| ThreadSlots::new().departures(i)).sum();
        assert_eq!(departed, 4, "four exits counted");
    });
}
