//! Loom model (d): a CPU's page cache against the scavenger. CPU 0 allocates a 64 KiB object (a large
//! span carved from its page cache with no lock), fills it, frees it (its pages go back to the cache),
//! flushes its cache (the page cache's block goes back to the heap) and allocates and fills again, while
//! another thread runs the page heap's `release_all`, which decommits free pages outside the heap lock (a run is taken
//! under the lock, decommitted without it, then freed as scavenged). The source is a region whose
//! decommit writes `POISON_BYTE` over the pages, so a page decommitted while CPU 0 uses it shows as
//! changed contents; the source also panics on a commit of a committed page or a decommit of a free one.
//! After both: every byte of the live object intact, the heap's committed bytes equal the source's.
//!
//! Explored: 294 iterations (2.7 s) with the preemption bound of 3 it sets (at bound 4: about 1300 in 20 s;
//! unbounded: over five minutes, past `cargo xtask test`'s two-minute budget).
//! Weakening caught: the scavenger step reordered so that a run is freed (as scavenged) before its
//! decommit instead of after (src/page/heap/scavenger.rs): CPU 0 gets the run, commits and fills it, and
//! the late decommit poisons it: loom's run fails at once (0.5 s) with "byte 0 of the live object at ...
//! changed to 0xdb (decommitted under its user?)".
#![cfg(loom)]

mod loom_common;

use loom_common::*;
use std::alloc::Layout;

const SIZE: usize = 64 << 10;

fn fill(p: usize, v: u8) {
    // SAFETY: `p` is a live object of `SIZE` bytes, ours.
    unsafe { std::ptr::write_bytes(p as *mut u8, v, SIZE) };
}

fn verify(p: usize, v: u8) {
    // SAFETY: as in `fill`.
    let s = unsafe { std::slice::from_raw_parts(p as *const u8, SIZE) };
    if let Some(i) = s.iter().position(|&b| b != v) {
        panic!("byte {i} of the live object at {p:#x} changed to {:#x} (decommitted under its user?)", s[i]);
    }
}

#[test]
fn page_cache_against_scavenger() {
    run("page_cache_against_scavenger", builder(Some(3)), || {
        let rm = RegionMalloc::new();
        let m = (*rm.m).clone();
        let l = Layout::from_size_align(SIZE, 8).unwrap();
        warm_up(&m, &[Some(1), Some(0)], &[l]);
        let first = m.alloc(l) as usize;
        assert!(first != 0);
        let m1 = m.clone();
        let t = spawn(move || {
            set_cpu(Some(1));
            // The page heap's release (Go's FreeOSMemory without the cache flushes): every free committed
            // page not held by a page cache.
            m1.with_guard(|g| m1.heap().release_all(g));
        });
        fill(first, 0x11);
        verify(first, 0x11);
        // SAFETY: `first` is live and ours.
        unsafe { m.dealloc(first as *mut u8, l) };
        m.flush_cpu_cache();
        let p = m.alloc(l) as usize;
        assert!(p != 0);
        fill(p, 0x22);
        t.join().unwrap();
        verify(p, 0x22);
        // SAFETY: `p` is live and ours.
        unsafe { m.dealloc(p as *mut u8, l) };
        m.flush_cpu_cache();
        m.release_all();
        let hs = m.heap().stats();
        assert_eq!(hs.total_bytes, m.heap().source().committed_bytes(), "heap and source agree");
        #[cfg(feature = "validate")]
        m.validate();
        drop(m);
        drop(rm);
    });
}
