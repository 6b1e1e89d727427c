//! Cost of one background scavenger step as the heap grows (issue 14): 64 MiB, 1 GiB and 16 GiB of grown
//! address space with sparse free committed memory. Run by `cargo xtask bench --scavenger`, or directly:
//! `cargo run --release --features std --example scav_step`.
//!
//! Method, per heap size `S` (a [`Heap`] over [`MmapSource`], whose reservation is `MAP_NORESERVE` and
//! whose commit is an `mprotect`: the memory is never touched, so 16 GiB needs no RAM):
//! 1. grow the heap to `S` (one span over the whole arena, freed), then release everything: every page is
//!    free and scavenged;
//! 2. keep 16 MiB in use at the bottom of the heap;
//! 3. per round: allocate and free 16 MiB just above it (16 MiB of free committed pages, low in the heap),
//!    let the peak leave the scavenger's window with budget-0 steps (not timed), then time background
//!    steps ([`Heap::scavenge`]) of 64 KiB (Go's `scavengeQuantum`) until a step releases nothing. The
//!    lazy goal is the 16 MiB in use plus 10%, so each round releases about 14.4 MiB in ~230 steps.
//!
//! Printed per size: the median and mean time of a step that released memory (each includes one 64 KiB
//! `madvise`), the steps per round, and the chunks the scavenger visited per step (when the heap reports
//! them). Chunks above the free memory are all scavenged, so a scavenger that scans chunks pays for
//! every one of them on every step; one with an index pays for the chunks it releases from.

use std::time::Instant;

use goheap::cpu::Guarded;
use goheap::page::heap::scavenger::{CALLS_PER_EPOCH, PEAK_WINDOW_EPOCHS};
use goheap::page::heap::Heap;
use goheap::source::mmap::MmapSource;
use goheap::PAGE_SIZE;

const MIB: usize = 1 << 20;
const STEP_BYTES: usize = 64 << 10;
const ROUNDS: usize = 7;

fn g() -> Guarded<'static> {
    // SAFETY: a benchmark thread; no signal or interrupt handler calls goheap.
    unsafe { Guarded::new_unchecked() }
}

fn measure(size: usize) -> (f64, f64, usize, f64) {
    let h: &'static Heap<MmapSource> = Box::leak(Box::new(Heap::with_max_bytes(MmapSource::new(), size)));
    let all = h.alloc_span(g(), None, size / PAGE_SIZE, 0).expect("grow the heap to its bound");
    // SAFETY: live span, untouched.
    unsafe { h.free_span(g(), None, all) };
    h.release_all(g());
    let _hold = h.alloc_span(g(), None, 16 * MIB / PAGE_SIZE, 0).expect("hold 16 MiB");
    let mut samples = Vec::new();
    let mut steps_total = 0;
    let visited_before = chunks_visited(h);
    for _ in 0..ROUNDS {
        let tmp = h.alloc_span(g(), None, 16 * MIB / PAGE_SIZE, 0).expect("16 MiB");
        // SAFETY: live span, untouched.
        unsafe { h.free_span(g(), None, tmp) };
        for _ in 0..CALLS_PER_EPOCH * (PEAK_WINDOW_EPOCHS + 2) {
            h.scavenge(g(), 0);
        }
        loop {
            let t = Instant::now();
            let r = h.scavenge(g(), STEP_BYTES);
            let ns = t.elapsed().as_nanos() as f64;
            if r == 0 {
                break;
            }
            samples.push(ns);
            steps_total += 1;
        }
    }
    let visited = chunks_visited(h).map(|v| (v - visited_before.unwrap_or(0)) as f64 / steps_total.max(1) as f64);
    samples.sort_by(f64::total_cmp);
    let median = samples.get(samples.len() / 2).copied().unwrap_or(0.0);
    let mean = samples.iter().sum::<f64>() / samples.len().max(1) as f64;
    (median, mean, steps_total / ROUNDS, visited.unwrap_or(f64::NAN))
}

/// Chunks the scavenger visited so far (`None` when the heap does not count them).
fn chunks_visited(h: &Heap<MmapSource>) -> Option<usize> {
    Some(h.scav_chunks_visited())
}

fn main() {
    println!("scavenger background step, {} KiB per step, sparse free memory ({ROUNDS} rounds)", STEP_BYTES >> 10);
    println!("{:>10} {:>14} {:>14} {:>12} {:>16}", "heap", "median ns", "mean ns", "steps/round", "chunks/step");
    // An argument picks one size (`64M`, `1G`, `16G`), e.g. for a profiler run.
    let only = std::env::args().nth(1);
    for (name, size) in [("64 MiB", 64 * MIB), ("1 GiB", 1 << 30), ("16 GiB", 16usize << 30)] {
        if only.as_deref().is_some_and(|o| o != name.replace(" MiB", "M").replace(" GiB", "G")) {
            continue;
        }
        let (median, mean, steps, visited) = measure(size);
        println!("{name:>10} {median:>14.0} {mean:>14.0} {steps:>12} {visited:>16.2}");
    }
}
