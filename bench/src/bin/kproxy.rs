//! goheap-kproxy: the kernel bench's workloads (`kernel-demo/src/kbench.rs`) on the host, as a real-hardware
//! proxy for the kernel (issue 16): the same allocators configured as in the kernel, measured natively, so
//! atomics, spin locks and contention cost what they cost on silicon. Run by `cargo xtask bench --kproxy`.
//!
//! # The allocators (all in this one process, repetitions interleaved)
//! - `goheap`: `goheap::Malloc<MmapSource, KernelShaped>`, not `goheap::Hosted`: [`KernelShaped`] is
//!   goheap's kernel provider (`goheap::x86_64::IrqCpus`) with the privileged instructions replaced by
//!   what they do, in the same shape: the CPU index is an inlined read of a thread-local index (the
//!   kernel's `CpuIndex`, `percpu::GsIndex`: a `gs:` load compiled into goheap's fast path), and
//!   "interrupts off" is a thread-local flag: saving it (the kernel's `pushf`) is a load, clearing it
//!   (`cli`) a store, restoring it (`sti`, when it was set) a store, plus the per-index busy flags of
//!   `IrqCpus` for full sections. On silicon `pushf`, `cli` and `sti` cost more than a load or store, so
//!   the proxy undercharges goheap's guard a little; it charges everything else natively.
//! - `llalloc`: `linked_list_allocator::LockedHeap` (a spin lock), `talc`: `talc::Talck<spinning_top::
//!   RawSpinlock, ErrOnOom>`: the kernel's peer heaps, each fresh for every run over the same 64 MiB area
//!   (mapped and touched once at start-up, as the kernel's area is committed memory).
//! - `empty`: a per-thread bump pointer that wraps around, whose free does nothing: the harness's own cost.
//!
//! Every allocation goes through one dispatch function that picks the allocator by a global mode (the
//! kernel's `GlobalAlloc` does the same), so the harness is the same for all four.
//!
//! # Output
//! One JSON line per run on stdout: `{"kproxy":true,"threads":T,"workload":W,"alloc":A,"rep":R,"ns":N,
//! "cpu_ns":C,"ops":O}`; `ns` is the slowest thread's wall time, `cpu_ns` the CPU time of all threads
//! (`CLOCK_THREAD_CPUTIME_ID`, so time the thread spent descheduled on a loaded host is not counted, while
//! spinning on a lock is), `ops` all threads' operations. The xtask reports only ratios of medians from
//! the same process, by CPU time.
//!
//! Usage: `goheap-kproxy [--threads 1,2] [--reps N] [--quick] [--alloc NAME] [--workload NAME]` (the last
//! two restrict the run to one allocator or workload, e.g. under callgrind).

use std::alloc::Layout;
use std::hint::black_box;
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::sync::Barrier;
use std::time::Instant;
use testkit::Rng;

/// Size of each peer heap's area (as the kernel bench's `PEER_HEAP_BYTES`).
const AREA_BYTES: usize = 64 << 20;
const BATCH: usize = 1000;
const WSET_SLOTS: usize = 1024;
const RING_SLOTS: usize = 4096;
const MAX_THREADS: usize = 16;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Alloc {
    Goheap,
    Linked,
    Talc,
    Empty,
}

const ALLOCS: [Alloc; 4] = [Alloc::Goheap, Alloc::Linked, Alloc::Talc, Alloc::Empty];

impl Alloc {
    fn name(self) -> &'static str {
        match self {
            Alloc::Goheap => "goheap",
            Alloc::Linked => "llalloc",
            Alloc::Talc => "talc",
            Alloc::Empty => "empty",
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Workload {
    Pair64,
    BatchFifo64,
    BatchLifo64,
    Wset,
    ProdCons64,
}

const WORKLOADS: [Workload; 5] =
    [Workload::Pair64, Workload::BatchFifo64, Workload::BatchLifo64, Workload::Wset, Workload::ProdCons64];

impl Workload {
    fn name(self) -> &'static str {
        match self {
            Workload::Pair64 => "pair-64",
            Workload::BatchFifo64 => "batch-fifo-64",
            Workload::BatchLifo64 => "batch-lifo-64",
            Workload::Wset => "wset",
            Workload::ProdCons64 => "prodcons-64",
        }
    }
    fn ops_per_thread(self) -> u64 {
        match self {
            Workload::Pair64 => 200_000,
            Workload::BatchFifo64 | Workload::BatchLifo64 => 100 * BATCH as u64,
            Workload::Wset => 100_000,
            Workload::ProdCons64 => 20_000,
        }
    }
    fn runs_on(self, n: usize) -> bool {
        self != Workload::ProdCons64 || n >= 2
    }
}

// ---- the kernel-shaped CPU provider ----

mod kernel_shaped {
    use goheap::cpu::{CpuProvider, MAX_CPUS};
    use std::cell::Cell;
    use std::sync::atomic::{AtomicBool, Ordering};

    std::thread_local! {
        /// This thread's "CPU" index (set once by the bench for each of its threads).
        static INDEX: Cell<Option<usize>> = const { Cell::new(None) };
        /// This thread's "interrupts enabled" flag (the kernel's IF).
        static IF: Cell<bool> = const { Cell::new(true) };
    }

    /// Gives the calling thread index `i` (each live bench thread its own).
    pub fn set_index(i: usize) {
        INDEX.with(|c| c.set(Some(i)));
    }

    /// The kernel's `CpuIndex` read (`percpu::GsIndex`: a `gs:` load there, inlined; a TLS load here).
    #[inline(always)]
    fn current_index() -> Option<usize> {
        INDEX.with(Cell::get)
    }

    /// `IrqCpus<GsIndex>` with interrupts replaced by a thread-local flag (see the binary's docs).
    pub struct KernelShaped {
        busy: [AtomicBool; MAX_CPUS],
    }

    impl KernelShaped {
        pub const fn new() -> Self {
            KernelShaped { busy: [const { AtomicBool::new(false) }; MAX_CPUS] }
        }
    }

    /// The kernel's `IrqGuard`: clears the busy flag, restores "interrupts".
    pub struct Guard<'a> {
        busy: Option<&'a AtomicBool>,
        were_enabled: bool,
    }

    impl Drop for Guard<'_> {
        #[inline]
        fn drop(&mut self) {
            if let Some(b) = self.busy {
                b.store(false, Ordering::Release);
            }
            if self.were_enabled {
                IF.with(|f| f.set(true));
            }
        }
    }

    /// `pushf` + `cli`: returns whether "interrupts" were on.
    #[inline]
    fn irqs_off() -> bool {
        IF.with(|f| {
            let was = f.get();
            f.set(false);
            was
        })
    }

    // SAFETY: as `IrqCpus`: an index is returned only to the thread the bench gave it (each live thread its
    // own, set before the thread allocates), and only while its busy flag is clear; `enter` sets the flag
    // until the guard drops, so a re-entrant call on the same thread gets `None`; a leaf section calls
    // nothing. Release on the flag's clear and Acquire on its check order sections that share an index
    // across the bench's runs (a run's threads end before the next run's start, joined by the scope).
    unsafe impl CpuProvider for KernelShaped {
        type Guard<'a> = Guard<'a>;

        #[inline]
        fn enter(&self) -> (Guard<'_>, Option<usize>) {
            let were_enabled = irqs_off();
            let this = self;
            match current_index() {
                Some(i) if i < MAX_CPUS && !this.busy[i].load(Ordering::Acquire) => {
                    this.busy[i].store(true, Ordering::Relaxed);
                    (Guard { busy: Some(&this.busy[i]), were_enabled }, Some(i))
                }
                _ => (Guard { busy: None, were_enabled }, None),
            }
        }

        type LeafGuard<'a> = Guard<'a>;

        #[inline]
        fn enter_leaf(&self) -> (Guard<'_>, Option<usize>) {
            let were_enabled = irqs_off();
            let this = self;
            let idx = current_index().filter(|&i| i < MAX_CPUS && !this.busy[i].load(Ordering::Acquire));
            (Guard { busy: None, were_enabled }, idx)
        }
    }
}

use kernel_shaped::KernelShaped;

static CPUS: KernelShaped = KernelShaped::new();
static GOHEAP: goheap::Malloc<goheap::source::mmap::MmapSource, &'static KernelShaped> =
    goheap::Malloc::new(goheap::source::mmap::MmapSource::new(), &CPUS);

// ---- the peer heaps and the dispatch ----

#[cfg(goheap_bench)]
mod peers {
    use std::alloc::{GlobalAlloc, Layout};

    pub static LL: linked_list_allocator::LockedHeap = linked_list_allocator::LockedHeap::empty();
    pub static TALC: talc::Talck<spinning_top::RawSpinlock, talc::ErrOnOom> =
        talc::Talck::new(talc::Talc::new(talc::ErrOnOom));

    #[inline]
    pub fn alloc(talc: bool, l: Layout) -> *mut u8 {
        // SAFETY: the workloads' layouts have non-zero sizes.
        unsafe {
            if talc {
                TALC.alloc(l)
            } else {
                LL.alloc(l)
            }
        }
    }

    /// # Safety
    /// `p` came from `alloc(talc, l)` on the heap's current set-up.
    #[inline]
    pub unsafe fn free(talc: bool, p: *mut u8, l: Layout) {
        // SAFETY: the caller's contract.
        unsafe {
            if talc {
                TALC.dealloc(p, l)
            } else {
                LL.dealloc(p, l)
            }
        }
    }
}

/// The peer heaps' area (mapped once).
static AREA: AtomicUsize = AtomicUsize::new(0);
/// Which allocator the dispatch uses now (an `Alloc` as u8).
static MODE: AtomicU8 = AtomicU8::new(0);
/// Per-thread bump offsets of the empty allocator (each thread writes only its own).
static EMPTY_OFF: [AtomicUsize; MAX_THREADS] = [const { AtomicUsize::new(0) }; MAX_THREADS];

std::thread_local! {
    static RANK: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

fn map_area() -> usize {
    // SAFETY: an anonymous private mapping with a null hint touches no existing memory.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            AREA_BYTES,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    assert!(p != libc::MAP_FAILED, "kproxy: mmap of the peer area failed");
    // Touch it all once: the kernel's area is committed memory.
    // SAFETY: the mapping is AREA_BYTES bytes, read-write, ours alone.
    unsafe { std::ptr::write_bytes(p as *mut u8, 1, AREA_BYTES) };
    p as usize
}

/// Sets the allocator `a` up fresh (peer heaps over the area) and routes the dispatch to it.
fn begin(a: Alloc) {
    let area = AREA.load(Ordering::Relaxed);
    match a {
        Alloc::Goheap => {}
        #[cfg(goheap_bench)]
        Alloc::Linked => {
            let mut h = peers::LL.lock();
            *h = linked_list_allocator::Heap::empty();
            // SAFETY: the area is ours, and the previous heap over it is empty (every run frees all it took).
            unsafe { h.init(area as *mut u8, AREA_BYTES) };
        }
        #[cfg(goheap_bench)]
        Alloc::Talc => {
            let mut t = peers::TALC.lock();
            *t = talc::Talc::new(talc::ErrOnOom);
            // SAFETY: as above.
            unsafe { t.claim(talc::Span::from_base_size(area as *mut u8, AREA_BYTES)) }.expect("talc claims the area");
        }
        Alloc::Empty => {
            for o in &EMPTY_OFF {
                o.store(0, Ordering::Relaxed);
            }
        }
        #[cfg(not(goheap_bench))]
        _ => {}
    }
    let _ = area;
    MODE.store(a as u8, Ordering::Release);
}

/// The empty allocator: bump in this thread's sixteenth of the area, wrapping around (see the docs).
#[inline]
fn empty_alloc(l: Layout) -> *mut u8 {
    let t = RANK.with(|r| r.get()).min(MAX_THREADS - 1);
    let part = AREA_BYTES / MAX_THREADS;
    let off = EMPTY_OFF[t].load(Ordering::Relaxed);
    let mut start = (off + l.align() - 1) & !(l.align() - 1);
    if start + l.size() > part {
        start = 0;
    }
    EMPTY_OFF[t].store(start + l.size(), Ordering::Relaxed);
    (AREA.load(Ordering::Relaxed) + t * part + start) as *mut u8
}

#[inline]
fn alloc_block(l: Layout) -> *mut u8 {
    let p = match MODE.load(Ordering::Acquire) {
        0 => GOHEAP.alloc(l),
        #[cfg(goheap_bench)]
        1 => peers::alloc(false, l),
        #[cfg(goheap_bench)]
        2 => peers::alloc(true, l),
        _ => empty_alloc(l),
    };
    assert!(!p.is_null(), "kproxy: allocation of {} B failed", l.size());
    black_box(p)
}

/// # Safety
/// `p` came from `alloc_block(l)` in the current run and is not used afterwards.
#[inline]
unsafe fn free_block(p: *mut u8, l: Layout) {
    let p = black_box(p);
    // SAFETY: the caller's contract: `p` belongs to the allocator the mode names (set for the whole run).
    unsafe {
        match MODE.load(Ordering::Acquire) {
            0 => GOHEAP.dealloc(p, l),
            #[cfg(goheap_bench)]
            1 => peers::free(false, p, l),
            #[cfg(goheap_bench)]
            2 => peers::free(true, p, l),
            _ => {}
        }
    }
}

/// # Safety
/// `p` is a live block of at least `size` (>= 1) bytes.
#[inline]
unsafe fn touch(p: *mut u8, size: usize, v: u8) {
    // SAFETY: the caller's contract.
    unsafe {
        p.write_volatile(v);
        p.add(size - 1).write_volatile(v);
    }
}

fn layout(size: usize) -> Layout {
    Layout::from_size_align(size.max(1), 8).expect("valid layout")
}

/// As the kernel bench's `wset_size`.
fn wset_size(rng: &mut Rng) -> usize {
    if rng.below(64) == 0 {
        return 4096 + rng.below(28 << 10) as usize;
    }
    let octave = 3 + rng.below(9);
    ((1u64 << octave) + rng.below(1 << octave)) as usize
}

// ---- workloads (as in kbench.rs, without the time caps) ----

fn pair64(target: u64) -> u64 {
    let l = layout(64);
    for i in 0..target {
        let p = alloc_block(l);
        // SAFETY: a fresh 64 B block, freed once after the write.
        unsafe {
            touch(p, 64, i as u8);
            free_block(p, l);
        }
    }
    target
}

fn batch64(target: u64, lifo: bool, batch: &mut Vec<*mut u8>) -> u64 {
    let l = layout(64);
    let mut done = 0;
    while done < target {
        for i in 0..BATCH {
            let p = alloc_block(l);
            // SAFETY: a fresh 64 B block.
            unsafe { touch(p, 64, i as u8) };
            batch.push(p);
        }
        if lifo {
            while let Some(p) = batch.pop() {
                // SAFETY: allocated above with `l`, freed once.
                unsafe { free_block(p, l) };
            }
        } else {
            for &p in batch.iter() {
                // SAFETY: as above; the list is cleared right after.
                unsafe { free_block(p, l) };
            }
            batch.clear();
        }
        done += BATCH as u64;
    }
    done
}

fn wset(me: usize, target: u64, slots: &mut [(*mut u8, usize)]) -> u64 {
    let mut rng = Rng::new(0x5EED_0000 + me as u64);
    for _ in 0..target {
        let i = rng.below(WSET_SLOTS as u64) as usize;
        let (p, size) = slots[i];
        if p.is_null() {
            let size = wset_size(&mut rng);
            let q = alloc_block(layout(size));
            // SAFETY: a fresh block of `size` bytes.
            unsafe { touch(q, size, i as u8) };
            slots[i] = (q, size);
        } else {
            // SAFETY: the slot's block, allocated with `layout(size)`, dropped from the slot.
            unsafe { free_block(p, layout(size)) };
            slots[i] = (std::ptr::null_mut(), 0);
            if rng.below(2) == 0 {
                let size = wset_size(&mut rng);
                let q = alloc_block(layout(size));
                // SAFETY: a fresh block of `size` bytes.
                unsafe { touch(q, size, i as u8) };
                slots[i] = (q, size);
            }
        }
    }
    target
}

fn wset_clear(slots: &mut [(*mut u8, usize)]) {
    for s in slots.iter_mut() {
        if !s.0.is_null() {
            // SAFETY: allocated by `wset` with `layout(s.1)`; the slot is emptied.
            unsafe { free_block(s.0, layout(s.1)) };
            *s = (std::ptr::null_mut(), 0);
        }
    }
}

#[repr(align(64))]
struct Padded(AtomicUsize);

struct Ring {
    head: Padded,
    tail: Padded,
    total: Padded,
    slots: Vec<AtomicUsize>,
}

impl Ring {
    fn new() -> Self {
        Ring {
            head: Padded(AtomicUsize::new(0)),
            tail: Padded(AtomicUsize::new(0)),
            total: Padded(AtomicUsize::new(usize::MAX)),
            slots: (0..RING_SLOTS).map(|_| AtomicUsize::new(0)).collect(),
        }
    }
    fn has_room(&self) -> bool {
        self.tail.0.load(Ordering::Relaxed) - self.head.0.load(Ordering::Acquire) < RING_SLOTS
    }
    fn push(&self, v: usize) {
        let t = self.tail.0.load(Ordering::Relaxed);
        self.slots[t % RING_SLOTS].store(v, Ordering::Relaxed);
        self.tail.0.store(t + 1, Ordering::Release);
    }
    fn pop(&self) -> Option<usize> {
        let h = self.head.0.load(Ordering::Relaxed);
        if h == self.tail.0.load(Ordering::Acquire) {
            return None;
        }
        let v = self.slots[h % RING_SLOTS].load(Ordering::Relaxed);
        self.head.0.store(h + 1, Ordering::Release);
        Some(v)
    }
}

fn prodcons64(me: usize, n: usize, target: u64, rings: &[Ring]) -> u64 {
    let l = layout(64);
    let out = &rings[me];
    let pred = (me + n - 1) % n;
    let inp = &rings[pred];
    let mut made = 0u64;
    let mut taken = 0usize;
    let mut producing = true;
    loop {
        let before = (made, taken);
        if producing {
            for _ in 0..16 {
                if made == target || !out.has_room() {
                    break;
                }
                let p = alloc_block(l);
                // SAFETY: a fresh 64 B block, 8-aligned.
                unsafe { (p as *mut u64).write(((me as u64) << 48) | made) };
                out.push(p as usize);
                made += 1;
            }
            if made == target {
                producing = false;
                out.total.0.store(made as usize, Ordering::Release);
            }
        }
        for _ in 0..32 {
            let Some(v) = inp.pop() else { break };
            let p = v as *mut u8;
            // SAFETY: the predecessor published this block after writing its token; only we take it.
            let token = unsafe { (p as *const u64).read() };
            assert_eq!((token >> 48) as usize, pred, "kproxy: prodcons block {p:p} carries token {token:#x}");
            // SAFETY: allocated by the predecessor with `l`, handed to us alone.
            unsafe { free_block(p, l) };
            taken += 1;
        }
        if !producing {
            let total = inp.total.0.load(Ordering::Acquire);
            if total != usize::MAX && taken == total {
                break;
            }
        }
        if (made, taken) == before {
            // Nothing to do until the other thread moves: on a loaded host it may be descheduled, so give
            // the core away rather than spin out the time slice (the kernel's CPUs are never descheduled).
            std::thread::yield_now();
        }
    }
    made
}

/// CPU time of the calling thread, nanoseconds.
fn thread_cpu_ns() -> u128 {
    // SAFETY: clock_gettime writes the timespec we pass.
    unsafe {
        let mut ts: libc::timespec = std::mem::zeroed();
        libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts);
        ts.tv_sec as u128 * 1_000_000_000 + ts.tv_nsec as u128
    }
}

/// One run of `w` on `a` with `n` threads: ((slowest thread's wall nanoseconds, all threads' CPU
/// nanoseconds), all threads' operations).
fn run(w: Workload, a: Alloc, n: usize, quick: bool) -> ((u128, u128), u64) {
    let target = if quick { w.ops_per_thread() / 10 } else { w.ops_per_thread() };
    begin(a);
    let rings: Vec<Ring> = (0..n).map(|_| Ring::new()).collect();
    let barrier = Barrier::new(n);
    // (slowest thread's wall time, all threads' CPU time), nanoseconds.
    let ns = std::sync::Mutex::new((0u128, 0u128));
    let ops = AtomicUsize::new(0);
    std::thread::scope(|s| {
        for me in 0..n {
            let (rings, barrier, ns, ops) = (&rings, &barrier, &ns, &ops);
            s.spawn(move || {
                kernel_shaped::set_index(me);
                RANK.with(|r| r.set(me));
                // Per-thread bookkeeping from the system allocator, before the start (never during a run).
                let mut batch = Vec::with_capacity(BATCH);
                let mut slots = vec![(std::ptr::null_mut::<u8>(), 0usize); WSET_SLOTS];
                barrier.wait();
                let t0 = Instant::now();
                let c0 = thread_cpu_ns();
                let done = match w {
                    Workload::Pair64 => pair64(target),
                    Workload::BatchFifo64 => batch64(target, false, &mut batch),
                    Workload::BatchLifo64 => batch64(target, true, &mut batch),
                    Workload::Wset => wset(me, target, &mut slots),
                    Workload::ProdCons64 => prodcons64(me, n, target, rings),
                };
                let dt = t0.elapsed().as_nanos();
                let dc = thread_cpu_ns() - c0;
                wset_clear(&mut slots);
                let mut m = ns.lock().unwrap();
                m.0 = m.0.max(dt);
                m.1 += dc;
                ops.fetch_add(done as usize, Ordering::Relaxed);
            });
        }
    });
    MODE.store(Alloc::Goheap as u8, Ordering::Release);
    (ns.into_inner().unwrap(), ops.load(Ordering::Relaxed) as u64)
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut threads = vec![1usize, 2];
    let mut reps = 11usize;
    let mut quick = false;
    let mut only_alloc: Option<String> = None;
    let mut only_workload: Option<String> = None;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--threads" => {
                let v = it.next().expect("--threads N,...");
                threads = v.split(',').map(|x| x.trim().parse().expect("a thread count")).collect();
                assert!(threads.iter().all(|&t| (1..=MAX_THREADS).contains(&t)), "threads 1..={MAX_THREADS}");
            }
            "--reps" => reps = it.next().and_then(|v| v.parse().ok()).expect("--reps N"),
            "--quick" => quick = true,
            "--alloc" => only_alloc = it.next().cloned(),
            "--workload" => only_workload = it.next().cloned(),
            other => {
                eprintln!(
                    "usage: goheap-kproxy [--threads 1,2] [--reps N] [--quick] [--alloc NAME] [--workload NAME] \
                     (unknown {other:?})"
                );
                std::process::exit(2);
            }
        }
    }
    if !cfg!(goheap_bench) {
        eprintln!("goheap-kproxy: built without --cfg goheap_bench, so without the peer heaps; use `cargo xtask bench --kproxy`");
        std::process::exit(2);
    }
    AREA.store(map_area(), Ordering::Relaxed);
    println!(
        "{{\"kproxy_meta\":true,\"reps\":{reps},\"quick\":{quick},\"threads\":\"{}\",\"area_mib\":{}}}",
        threads.iter().map(|t| t.to_string()).collect::<Vec<_>>().join(","),
        AREA_BYTES >> 20
    );
    let allocs: Vec<Alloc> =
        ALLOCS.iter().copied().filter(|a| only_alloc.as_deref().is_none_or(|o| o == a.name())).collect();
    let workloads: Vec<Workload> =
        WORKLOADS.iter().copied().filter(|w| only_workload.as_deref().is_none_or(|o| o == w.name())).collect();
    for &n in &threads {
        // Warm-up: every workload once on every allocator (page faults, goheap's first spans), not reported.
        for w in workloads.iter().copied().filter(|w| w.runs_on(n)) {
            for &a in &allocs {
                run(w, a, n, true);
            }
        }
        for rep in 0..reps {
            for w in workloads.iter().copied().filter(|w| w.runs_on(n)) {
                for k in 0..allocs.len() {
                    let a = allocs[(k + rep) % allocs.len()];
                    let ((ns, cpu_ns), ops) = run(w, a, n, quick);
                    println!(
                        "{{\"kproxy\":true,\"threads\":{n},\"workload\":\"{}\",\"alloc\":\"{}\",\"rep\":{rep},\"ns\":{ns},\"cpu_ns\":{cpu_ns},\"ops\":{ops}}}",
                        w.name(),
                        a.name()
                    );
                }
            }
        }
    }
}
