//! What the tiny path saves: many 1–15 B objects with and without it (`DebugFlags::NO_TINY`).
//!
//! `cargo run --release --example tiny_benefit --features std`
use goheap::cpu::ThreadSlots;
use goheap::malloc::DebugFlags;
use goheap::source::mmap::MmapSource;
use goheap::Malloc;
use std::alloc::Layout;

fn measure(flags: DebugFlags, sizes: &[(usize, usize)]) -> (u64, u64) {
    let m = Box::new(Malloc::with_max_bytes(MmapSource::new(), ThreadSlots::new(), 1 << 32).with_debug(flags));
    let ptrs: Vec<*mut u8> = sizes.iter().map(|&(s, a)| m.alloc(Layout::from_size_align(s, a).unwrap())).collect();
    assert!(ptrs.iter().all(|p| !p.is_null()));
    let st = m.mem_stats();
    (st.heap_alloc, st.heap_inuse)
}

fn main() {
    const N: usize = 1_000_000;
    let mut x = 0x2545_F491_4F6C_DD1Du64;
    let mut rand = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    // Mixes: uniform 1–15 B with the natural alignment of the size; string-like 1–15 B at align 1;
    // and 1–8 B at align 1.
    let uniform: Vec<(usize, usize)> = (0..N)
        .map(|_| {
            let s = 1 + (rand() % 15) as usize;
            (s, 1 << s.trailing_zeros().min(3))
        })
        .collect();
    let strings: Vec<(usize, usize)> = (0..N).map(|_| (1 + (rand() % 15) as usize, 1)).collect();
    let small: Vec<(usize, usize)> = (0..N).map(|_| (1 + (rand() % 8) as usize, 1)).collect();
    println!("{:<34} {:>14} {:>14} {:>8}", "workload (1M live objects)", "tiny B/object", "classes B/obj", "saving");
    for (name, v) in
        [("1-15 B, natural alignment", &uniform), ("1-15 B, align 1 (strings)", &strings), ("1-8 B, align 1", &small)]
    {
        let (tiny_alloc, tiny_inuse) = measure(DebugFlags::empty(), v);
        let (cls_alloc, cls_inuse) = measure(DebugFlags::NO_TINY, v);
        println!(
            "{:<34} {:>14.2} {:>14.2} {:>7.1}%   (heap in use: {:.1} vs {:.1} MiB)",
            name,
            tiny_alloc as f64 / N as f64,
            cls_alloc as f64 / N as f64,
            100.0 * (1.0 - tiny_alloc as f64 / cls_alloc as f64),
            tiny_inuse as f64 / (1 << 20) as f64,
            cls_inuse as f64 / (1 << 20) as f64,
        );
    }
}
