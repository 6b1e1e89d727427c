//! `alloc_zeroed` of a large block over freed, dirty pages (issue 11, "Costs"): time and resident memory.
//!
//! `cargo run --release --features std --example zeroed_large [MiB]` (default 2048). Allocates the block,
//! writes every page, frees it, then times `alloc_zeroed` of the same size, checks that it reads as zero,
//! and times writing every page of it; prints the process's resident memory after each step.

use std::alloc::{GlobalAlloc, Layout};
use std::time::Instant;

#[global_allocator]
static GLOBAL: goheap::Hosted = goheap::Hosted::new();

/// Resident memory of this process in MiB (`/proc/self/statm`, second field, in pages).
fn rss_mib() -> usize {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: usize = statm.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    (pages * 4096) >> 20
}

fn main() {
    let mib: usize = std::env::args().nth(1).and_then(|s| s.parse().ok()).unwrap_or(2048);
    let layout = Layout::from_size_align(mib << 20, 4096).unwrap();
    // SAFETY: non-zero size; every block is freed with its layout.
    unsafe {
        let p = GLOBAL.alloc(layout);
        assert!(!p.is_null());
        for off in (0..layout.size()).step_by(4096) {
            p.add(off).write(0xA5);
        }
        GLOBAL.dealloc(p, layout);
        println!("{mib} MiB written and freed: RSS {} MiB", rss_mib());

        let t = Instant::now();
        let z = GLOBAL.alloc_zeroed(layout);
        let dt = t.elapsed();
        assert!(!z.is_null());
        println!("alloc_zeroed: {:.3} s, RSS {} MiB", dt.as_secs_f64(), rss_mib());
        let mut nonzero = 0usize;
        for off in (0..layout.size()).step_by(4096) {
            nonzero += (z.add(off).read() != 0) as usize;
        }
        assert_eq!(nonzero, 0, "alloc_zeroed returned memory that is not zero");
        let t = Instant::now();
        for off in (0..layout.size()).step_by(4096) {
            z.add(off).write(1);
        }
        println!("then writing every page: {:.3} s, RSS {} MiB", t.elapsed().as_secs_f64(), rss_mib());
        GLOBAL.dealloc(z, layout);
    }
}
