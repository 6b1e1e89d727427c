//! The interpreter: decodes an input into a configuration and operations, runs them on a fresh heap and
//! checks every result against the shadow model (see `lib.rs` for the input format).

use super::input::Input;
use super::model::{Block, Shadow};
use super::report::{self, catch_report};
use super::sources::{FuzzSource, Unmapping};
use goheap::check::{BadFree, Reason};
use goheap::cpu::{CpuProvider, NoCpuCache, ThreadSlots};
use goheap::malloc::DebugFlags;
use goheap::object::class::TINY_REQUEST_LIMIT;
use goheap::source::bounded::BoundedSource;
use goheap::{Malloc, PAGE_SIZE};
use std::alloc::Layout;

/// Whether to print each operation (`GOHEAP_FUZZ_TRACE=1`), to read what a crash input does.
fn tracing() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var_os("GOHEAP_FUZZ_TRACE").is_some_and(|v| v == "1"))
}

macro_rules! trace {
    ($($arg:tt)*) => {
        if tracing() {
            eprintln!("[goheap-fuzz] {}", format_args!($($arg)*));
        }
    };
}

/// What a run injects.
#[derive(Clone, Copy, Debug)]
pub struct Options {
    /// Inject bad frees (target `bad_free`); without it every operation is valid (target `ops`).
    pub inject: bool,
}

/// Arena of every fuzzed heap (`Malloc::with_max_bytes`).
pub const ARENA_BYTES: usize = 256 << 20;
/// Largest small request (goheap's `MAX_SMALL_SIZE`).
const MAX_SMALL: usize = 32 << 10;
/// Most operations of one input (a batch on another thread counts its operations).
const MAX_OPS: usize = 4096;
/// Most live blocks at once; an allocation beyond is skipped.
const MAX_LIVE: usize = 512;
/// Most live bytes at once; an allocation beyond is skipped.
const MAX_LIVE_BYTES: usize = 48 << 20;
/// Operations between two `validate()` calls.
const VALIDATE_EVERY: usize = 64;

/// The page source an input runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum SourceKind {
    /// `MmapSource::new()` (behind [`Unmapping`]).
    Mmap,
    /// `MmapSource::strict()` (behind [`Unmapping`]).
    MmapStrict,
    /// `BoundedSource::with_mmap` with a commit budget: allocations may fail.
    Bounded,
}

/// The configuration an input's header selects.
#[derive(Clone, Copy, Debug)]
struct Config {
    source: SourceKind,
    threads: bool,
    debug: DebugFlags,
    budget: usize,
}

impl Config {
    fn decode(inp: &mut Input) -> Config {
        let b = inp.u8();
        let source = match b & 3 {
            0 | 1 => SourceKind::Mmap,
            2 => SourceKind::MmapStrict,
            _ => SourceKind::Bounded,
        };
        let mut debug = DebugFlags::empty();
        if b & 8 != 0 {
            debug |= DebugFlags::NO_TINY;
        }
        // Guard mode needs a source whose decommit makes memory inaccessible.
        if b & 16 != 0 && source != SourceKind::Mmap {
            debug |= DebugFlags::GUARD;
        }
        let budget = (usize::from(inp.u8()) + 1) * (512 << 10);
        Config { source, threads: b & 4 != 0, debug, budget }
    }
}

/// Runs one input (see `lib.rs`). Panics on any violation of the model.
pub fn run(data: &[u8], opts: Options) {
    report::install_panic_filter();
    let mut inp = Input::new(data);
    let cfg = Config::decode(&mut inp);
    trace!("config {cfg:?}, {opts:?}");
    match cfg.source {
        SourceKind::Mmap | SourceKind::MmapStrict => {
            with_provider(Unmapping::new(cfg.source == SourceKind::MmapStrict), cfg, opts, &mut inp)
        }
        SourceKind::Bounded => {
            let src = BoundedSource::with_mmap(2 * ARENA_BYTES, cfg.budget);
            with_provider(src, cfg, opts, &mut inp)
        }
    }
}

fn with_provider<S: FuzzSource>(src: S, cfg: Config, opts: Options, inp: &mut Input) {
    if cfg.threads {
        with_heap(src, ThreadSlots::new(), cfg, opts, inp)
    } else {
        with_heap(src, NoCpuCache, cfg, opts, inp)
    }
}

fn with_heap<S: FuzzSource, P: CpuProvider>(src: S, provider: P, cfg: Config, opts: Options, inp: &mut Input) {
    let m = Box::new(
        Malloc::with_max_bytes(src, provider, ARENA_BYTES).with_debug(cfg.debug).with_report_hook(report::hook),
    );
    let mut it = Interp {
        m: &m,
        cfg,
        opts,
        shadow: Shadow::default(),
        nops: 0,
        other_thread_ran: false,
        recently_freed: Vec::new(),
        on_other_thread: false,
    };
    it.run(inp, usize::MAX);
    it.finish();
}

/// Where a request goes, as goheap routes it (tiny, a size class named by its object size, or whole pages).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Route {
    Tiny,
    Class(usize),
    Large,
    Guarded,
}

/// A pointer that was freed and not handed out since (no allocation happened after the free).
#[derive(Clone, Copy, Debug)]
struct Freed {
    addr: usize,
    layout: Layout,
    route: Route,
}

struct Interp<'m, S: FuzzSource, P: CpuProvider> {
    m: &'m Malloc<S, P>,
    cfg: Config,
    opts: Options,
    shadow: Shadow,
    nops: usize,
    other_thread_ran: bool,
    /// Pointers freed since the last allocation: a second free of one is a double free, not a free of a
    /// block handed out again.
    recently_freed: Vec<Freed>,
    on_other_thread: bool,
}

/// Storage for foreign-pointer frees: a static the heap must never write.
static FOREIGN_STATIC: [std::sync::atomic::AtomicU64; 512] = [const { std::sync::atomic::AtomicU64::new(0) }; 512];

/// Another goheap heap, a source of foreign pointers (each is freed there after the bad free here).
static OTHER_HEAP: Malloc<goheap::source::mmap::MmapSource, NoCpuCache> =
    Malloc::with_max_bytes(goheap::source::mmap::MmapSource::new(), NoCpuCache, 64 << 20);

/// The pattern id of foreign memory (the model's ids start at 1).
const FOREIGN_ID: u64 = 0;

impl<S: FuzzSource, P: CpuProvider> Interp<'_, S, P> {
    fn route(&self, l: Layout) -> Route {
        if self.cfg.debug.contains(DebugFlags::GUARD) {
            return Route::Guarded;
        }
        // goheap's tiny bound (requests of at most 8 bytes; Go's is 16).
        if l.size() < TINY_REQUEST_LIMIT && l.align() <= 8 && !self.cfg.debug.contains(DebugFlags::NO_TINY) {
            return Route::Tiny;
        }
        if l.size() > MAX_SMALL || l.align() > PAGE_SIZE {
            return Route::Large;
        }
        // Every size up to `MAX_SMALL` has a class at every alignment up to a page (the table's largest
        // class is 32 KiB, a multiple of each), and a class is named by its object size.
        Route::Class(self.m.usable_size(l))
    }

    /// A layout from the input: every tier, class boundaries, alignments 1 B to 2 MiB.
    fn layout(&self, inp: &mut Input) -> Layout {
        let t = inp.u8();
        let r = inp.u32() as usize;
        let size = match t % 16 {
            0..=4 => r % 16,
            5..=7 => 16 + r % 2048,
            8..=9 => 16 + r % (MAX_SMALL - 15),
            10..=11 => {
                // A class boundary: a class's object size, one less or one more.
                let c = self.m.usable_size(Layout::from_size_align(1 + r % MAX_SMALL, 8).unwrap());
                match (r >> 16) % 3 {
                    0 => c - 1,
                    1 => c,
                    _ => c + 1,
                }
            }
            12..=13 => MAX_SMALL + 1 + r % (256 << 10),
            14 => MAX_SMALL + 1 + r % (2 << 20),
            _ => (2 << 20) + r % (4 << 20),
        };
        let a = inp.u8();
        let align_log = match a {
            0..=179 => u32::from(a % 4),
            180..=235 => 4 + u32::from(a % 9),
            _ => 13 + u32::from(a % 9),
        };
        Layout::from_size_align(size, 1 << align_log).unwrap()
    }

    /// Bytes a block may take, roughly (for judging whether a null return is legitimate).
    fn footprint(&self, l: Layout) -> usize {
        match self.route(l) {
            Route::Tiny | Route::Class(_) => l.size().max(16) * 2,
            Route::Large => l.size().next_multiple_of(PAGE_SIZE) + l.align() + PAGE_SIZE,
            Route::Guarded => l.size() + l.align() + 2 * PAGE_SIZE,
        }
    }

    /// Whether an allocation of `l` may fail now: with a bounded source always; otherwise only when the
    /// live blocks and this one could fill a large part of the arena.
    fn may_fail(&self, l: Layout) -> bool {
        if self.cfg.source == SourceKind::Bounded {
            return true;
        }
        let live: usize = self.shadow.blocks.iter().map(|b| self.footprint(b.layout)).sum();
        live + self.footprint(l) > ARENA_BYTES / 4
    }

    fn run(&mut self, inp: &mut Input, mut budget: usize) {
        while !inp.is_empty() && budget > 0 && self.nops < MAX_OPS {
            budget -= 1;
            self.nops += 1;
            self.step(inp);
            if self.nops % VALIDATE_EVERY == 0 {
                self.m.validate();
            }
        }
    }

    fn step(&mut self, inp: &mut Input) {
        let op = inp.u8();
        trace!("op {} ({op}), {} live", op % 26, self.shadow.blocks.len());
        match op % 26 {
            0..=5 => self.alloc(inp, op & 0x80 != 0),
            6..=10 => self.free(inp),
            11..=13 => self.realloc(inp),
            14 => {
                let v = inp.u16() as usize;
                let limit = match v % 6 {
                    0 => usize::MAX,
                    1 => 0,
                    2 => 1 << 20,
                    3 => 8 << 20,
                    4 => self.shadow.live_bytes,
                    _ => (v >> 3) << 12,
                };
                self.m.set_memory_limit(limit);
            }
            15 => {
                self.m.release_all();
            }
            16 => {
                let b = inp.u8();
                let max_spans = if b & 7 == 7 { usize::MAX } else { usize::from(b & 7) };
                let budget = [0, 64 << 10, 1 << 20, usize::MAX][usize::from(b >> 3) % 4];
                self.m.background(max_spans, budget);
            }
            17 => self.m.flush_cpu_cache(),
            18 => self.m.validate(),
            19 => self.other_thread(inp),
            20 => self.source_ctl(inp),
            21 => {
                let rate = [0, 1, 4096, 512 << 10][usize::from(inp.u8()) % 4];
                self.m.set_profile_rate(rate);
            }
            _ if self.opts.inject => self.inject(inp),
            _ => self.free(inp),
        }
    }

    fn alloc(&mut self, inp: &mut Input, zeroed: bool) {
        let l = self.layout(inp);
        if self.shadow.blocks.len() >= MAX_LIVE || self.shadow.live_bytes + l.size() > MAX_LIVE_BYTES {
            return;
        }
        self.recently_freed.clear();
        let p = if zeroed { self.m.alloc_zeroed(l) } else { self.m.alloc(l) };
        trace!("alloc{} {l:?} -> {p:p}", if zeroed { "_zeroed" } else { "" });
        if p.is_null() {
            assert!(self.may_fail(l), "alloc({l:?}) returned null with the heap far from full");
            return;
        }
        let addr = p as usize;
        let what = if zeroed { "alloc_zeroed" } else { "alloc" };
        assert!(addr % l.align() == 0, "{what}({l:?}) returned {addr:#x}, not aligned");
        if zeroed {
            Shadow::verify_zero(addr, l.size(), what);
        }
        let id = self.shadow.new_id();
        // SAFETY: goheap just handed out `p` for `l`.
        unsafe { self.shadow.insert(Block { id, addr, layout: l, usable: self.m.usable_size(l) }, what) };
    }

    /// Picks a live block from the input, if any; `ok` filters (a few tries, then none).
    fn pick(&self, inp: &mut Input, ok: impl Fn(&Block) -> bool) -> Option<usize> {
        let n = self.shadow.blocks.len();
        if n == 0 {
            return None;
        }
        let start = inp.u16() as usize % n;
        (0..n.min(8)).map(|k| (start + k) % n).find(|&i| ok(&self.shadow.blocks[i]))
    }

    fn free(&mut self, inp: &mut Input) {
        let Some(i) = self.pick(inp, |_| true) else { return };
        let b = self.shadow.remove(i);
        trace!("free {:#x} {:?}", b.addr, b.layout);
        Shadow::verify(&b, "free");
        // SAFETY: a live block of this heap, freed with its layout.
        unsafe { self.m.dealloc(b.addr as *mut u8, b.layout) };
        self.recently_freed.push(Freed { addr: b.addr, layout: b.layout, route: self.route(b.layout) });
    }

    fn realloc(&mut self, inp: &mut Input) {
        let Some(i) = self.pick(inp, |_| true) else { return };
        let nl = self.layout(inp);
        let old = self.shadow.blocks[i];
        let new_size = nl.size().max(1);
        let new_layout = Layout::from_size_align(new_size, old.layout.align()).unwrap();
        if self.shadow.live_bytes + new_size > MAX_LIVE_BYTES + old.layout.size() {
            return;
        }
        Shadow::verify(&old, "realloc (before)");
        self.recently_freed.clear();
        // SAFETY: a live block of this heap with its layout; the sizes are far from overflowing.
        let p = unsafe { self.m.realloc(old.addr as *mut u8, old.layout, new_size) };
        trace!("realloc {:#x} {:?} to {new_size} -> {p:p}", old.addr, old.layout);
        if p.is_null() {
            assert!(self.may_fail(new_layout), "realloc({old:?} to {new_size} B) returned null, heap far from full");
            Shadow::verify(&old, "realloc returning null (old block must stay intact)");
            return;
        }
        let addr = p as usize;
        assert!(addr % new_layout.align() == 0, "realloc({old:?}, {new_size}) returned {addr:#x}, not aligned");
        let old = self.shadow.remove(i);
        let new = Block { id: old.id, addr, layout: new_layout, usable: self.m.usable_size(new_layout) };
        // SAFETY: goheap handed out `p` for `new_layout`, with the old contents moved.
        unsafe { self.shadow.moved(old, new, "realloc") };
    }

    /// The next few operations, on a thread of their own (another cache slot with `ThreadSlots`, so frees of
    /// this thread's blocks there are remote frees, and the other way round).
    fn other_thread(&mut self, inp: &mut Input) {
        let n = usize::from(inp.u8() % 16) + 1;
        if self.on_other_thread {
            return;
        }
        self.other_thread_ran = true;
        // An explicit join waits for the thread's exit, thread-local destructors included, so its cache slot
        // is free again and the next thread of the input takes the same one (a scope's implicit join does
        // not wait for those).
        std::thread::scope(|s| {
            let t = s.spawn(|| {
                self.on_other_thread = true;
                self.run(inp, n);
                self.on_other_thread = false;
            });
            if let Err(e) = t.join() {
                std::panic::resume_unwind(e);
            }
        });
    }

    /// Commit budget and failures of the bounded source.
    fn source_ctl(&mut self, inp: &mut Input) {
        let b = inp.u8();
        let v = usize::from(inp.u16());
        let Some(src) = self.m.heap().source().bounded() else { return };
        match b % 5 {
            0 => src.set_budget(src.committed_bytes() + v * PAGE_SIZE),
            1 => src.fail_nth_commit(1 + v % 8),
            2 => src.fail_all(true),
            3 => src.fail_all(false),
            _ => {
                src.fail_all(false);
                src.set_budget(usize::MAX);
            }
        }
    }

    // ---- Injected bad frees (target `bad_free`) -------------------------------------------------------------

    /// Frees `addr` with `layout`, catching a report.
    fn try_free(&self, addr: usize, layout: Layout) -> Result<(), BadFree> {
        trace!("bad free {addr:#x} {layout:?}");
        // SAFETY: deliberately bad input (an injected bad free): goheap must refuse it before touching any
        // state (the kinds injected here are those `checks` promises to catch), or find it harmless.
        catch_report(|| unsafe { self.m.dealloc(addr as *mut u8, layout) })
    }

    /// Checks a report for a bad free of `addr`: the address it names and an expected reason.
    fn check_report(&self, what: &str, addr: usize, b: &BadFree, ok: impl Fn(Reason) -> bool) {
        trace!("reported: {b}");
        assert_eq!(b.addr, addr, "{what}: the report names {:#x}, not the address freed ({addr:#x}): {b}", b.addr);
        assert!(ok(b.reason), "{what} of {addr:#x}: unexpected reason {:?}: {b}", b.reason);
        // The report came before any state changed: the heap is whole.
        self.m.validate();
    }

    fn inject(&mut self, inp: &mut Input) {
        let kind = inp.u8();
        match kind % 8 {
            0 | 1 => self.inject_double_free(inp, kind & 0x80 != 0),
            2 => self.inject_interior(inp),
            3 | 4 => self.inject_wrong_layout(inp),
            5 => self.inject_foreign(inp),
            6 => self.inject_bad_realloc(inp),
            _ => self.inject_interior(inp),
        }
    }

    fn inject_double_free(&mut self, inp: &mut Input, delayed: bool) {
        let f = if delayed && !self.recently_freed.is_empty() {
            self.recently_freed[inp.u16() as usize % self.recently_freed.len()]
        } else {
            let Some(i) = self.pick(inp, |_| true) else { return };
            let b = self.shadow.remove(i);
            Shadow::verify(&b, "free (before a double free)");
            trace!("free {:#x} {:?} (first of a double free)", b.addr, b.layout);
            // SAFETY: a live block of this heap, freed with its layout.
            unsafe { self.m.dealloc(b.addr as *mut u8, b.layout) };
            let f = Freed { addr: b.addr, layout: b.layout, route: self.route(b.layout) };
            self.recently_freed.push(f);
            f
        };
        // In guard mode a free whose guard page cannot be committed again keeps the span (see `finish`); a
        // second free then frees it, unreported but harmless. Only after a failed commit.
        let guard_kept = self.cfg.debug.contains(DebugFlags::GUARD)
            && self.m.heap().source().bounded().is_some_and(|s| s.failed_commits() > 0);
        match self.try_free(f.addr, f.layout) {
            Ok(()) if guard_kept => trace!("accepted: the first free kept its span (guard page not recommitted)"),
            Ok(()) => panic!("double free of {:#x} ({:?}, {:?}) was not reported", f.addr, f.layout, f.route),
            Err(b) => {
                self.check_report("double free", f.addr, &b, |r| matches!(r, Reason::DoubleFree | Reason::NotInHeap))
            }
        }
    }

    /// An interior pointer (or, for a tiny block, a misaligned one: aligned tiny interior pointers are not
    /// detected yet).
    fn inject_interior(&mut self, inp: &mut Input) {
        let Some(i) = self.pick(inp, |b| b.layout.size() >= 2) else {
            return;
        };
        let b = self.shadow.blocks[i];
        let size = b.layout.size();
        let off = 1 + inp.u32() as usize % (size - 1);
        let addr = b.addr + off;
        match self.try_free(addr, b.layout) {
            Ok(()) => {
                panic!("interior pointer {addr:#x} (block {:#x} + {off}, {:?}) was not reported", b.addr, b.layout)
            }
            Err(r) => self.check_report("interior pointer", addr, &r, |r| {
                matches!(r, Reason::Interior | Reason::Misaligned { .. })
            }),
        }
        Shadow::verify(&b, "after a refused interior free");
    }

    /// The right pointer with another layout: another size, another alignment, or any layout. A layout that
    /// routes elsewhere must be reported; one of the same route may be accepted as the block's free.
    fn inject_wrong_layout(&mut self, inp: &mut Input) {
        let Some(i) = self.pick(inp, |_| true) else { return };
        let b = self.shadow.blocks[i];
        let sel = inp.u8();
        let wl = match sel % 3 {
            0 => self.layout(inp),
            1 => {
                let d = usize::from(inp.u16());
                let size = if sel & 0x80 != 0 { b.layout.size().saturating_sub(d) } else { b.layout.size() + d };
                Layout::from_size_align(size, b.layout.align()).unwrap()
            }
            _ => {
                let align = (b.layout.align() << (1 + inp.u8() % 4)).min(2 << 20);
                Layout::from_size_align(b.layout.size(), align).unwrap()
            }
        };
        if wl == b.layout {
            return;
        }
        let (ro, rw) = (self.route(b.layout), self.route(wl));
        let misaligned = b.addr % wl.align() != 0;
        Shadow::verify(&b, "before a wrong-layout free");
        match self.try_free(b.addr, wl) {
            Ok(()) => {
                assert!(
                    ro == rw,
                    "free of {:#x} ({:?}, {ro:?}) with layout {wl:?} ({rw:?}) was not reported",
                    b.addr,
                    b.layout
                );
                assert!(
                    !misaligned || matches!(ro, Route::Large | Route::Guarded),
                    "free of {:#x} with layout {wl:?}: misaligned for it, not reported",
                    b.addr
                );
                // Accepted as the block's own free.
                trace!("accepted: {wl:?} ({rw:?}) frees {:#x} ({:?}, {ro:?})", b.addr, b.layout);
                let idx = self.shadow.blocks.iter().position(|x| x.addr == b.addr).unwrap();
                self.shadow.remove(idx);
                self.recently_freed.push(Freed { addr: b.addr, layout: b.layout, route: ro });
            }
            Err(r) => {
                self.check_report("wrong-layout free", b.addr, &r, |r| {
                    matches!(r, Reason::LayoutMismatch { .. } | Reason::Misaligned { .. } | Reason::Interior)
                });
                Shadow::verify(&b, "after a refused wrong-layout free");
            }
        }
    }

    /// A pointer this heap never handed out: on the stack, in a static, or another heap's block.
    fn inject_foreign(&mut self, inp: &mut Input) {
        let which = inp.u8();
        let off = usize::from(inp.u16()) % 256 * 8 + usize::from(which >> 6) % 2;
        let layout = self.layout(inp);
        let mut stack = [0u64; 512];
        let (addr, check): (usize, Box<dyn Fn()>) = match which % 3 {
            0 => {
                for (k, w) in stack.iter_mut().enumerate() {
                    *w = k as u64 ^ 0x5555;
                }
                let base = stack.as_ptr() as usize;
                let st = &stack;
                (
                    base + off,
                    Box::new(move || {
                        for (k, w) in st.iter().enumerate() {
                            // SAFETY: reads the live stack array through a volatile load, so the compiler
                            // cannot assume it unchanged across the bad free.
                            let v = unsafe { std::ptr::read_volatile(w) };
                            assert_eq!(v, k as u64 ^ 0x5555, "the heap wrote to a foreign stack word at {k}");
                        }
                    }),
                )
            }
            1 => {
                use std::sync::atomic::Ordering::Relaxed;
                for (k, w) in FOREIGN_STATIC.iter().enumerate() {
                    w.store(k as u64 ^ 0xAAAA, Relaxed);
                }
                (
                    FOREIGN_STATIC.as_ptr() as usize + off,
                    Box::new(|| {
                        for (k, w) in FOREIGN_STATIC.iter().enumerate() {
                            assert_eq!(w.load(Relaxed), k as u64 ^ 0xAAAA, "the heap wrote to a foreign static");
                        }
                    }),
                )
            }
            _ => {
                // A block of another heap, the same layout, patterned and leaked there.
                let p = OTHER_HEAP.alloc(layout);
                if p.is_null() {
                    return;
                }
                let b = Block { id: FOREIGN_ID, addr: p as usize, layout, usable: layout.size() };
                let mut other = Shadow::default();
                // SAFETY: a fresh block of the other heap, ours until freed below.
                unsafe { other.insert(b, "other heap") };
                (
                    b.addr,
                    Box::new(move || {
                        Shadow::verify(&b, "another heap's block after a bad free");
                        // SAFETY: the other heap's own block, freed there with its layout.
                        unsafe { OTHER_HEAP.dealloc(b.addr as *mut u8, b.layout) };
                    }),
                )
            }
        };
        match self.try_free(addr, layout) {
            Ok(()) => panic!("foreign pointer {addr:#x} ({layout:?}) was not reported"),
            Err(r) => self.check_report("foreign pointer", addr, &r, |r| {
                matches!(r, Reason::NotInHeap | Reason::Misaligned { .. })
            }),
        }
        check();
    }

    /// `realloc` of a bad pointer (known defect: not validated on the large path).
    fn inject_bad_realloc(&mut self, inp: &mut Input) {
        let Some(i) = self.pick(inp, |b| b.layout.size() >= 2) else { return };
        let b = self.shadow.blocks[i];
        let addr = b.addr + 1 + inp.u32() as usize % (b.layout.size() - 1);
        let new_size = self.layout(inp).size().max(1);
        // realloc may allocate before it validates (the defect): freed pointers may be handed out again.
        self.recently_freed.clear();
        // SAFETY: deliberately bad input: an interior pointer to realloc.
        let r = catch_report(|| unsafe { self.m.realloc(addr as *mut u8, b.layout, new_size) });
        match r {
            Ok(_) => panic!("realloc of interior pointer {addr:#x} ({:?} -> {new_size}) was not reported", b.layout),
            Err(r) => self.check_report("realloc of an interior pointer", addr, &r, |r| {
                matches!(r, Reason::Interior | Reason::Misaligned { .. } | Reason::LayoutMismatch { .. })
            }),
        }
        Shadow::verify(&b, "after a refused realloc");
    }

    // ---- End of input -------------------------------------------------------------------------------------

    /// Frees every live block (checking each), gives everything back, and checks that nothing is left.
    fn finish(mut self) {
        while !self.shadow.blocks.is_empty() {
            let b = self.shadow.remove(self.shadow.blocks.len() - 1);
            Shadow::verify(&b, "free at the end");
            // SAFETY: a live block of this heap, freed with its layout.
            unsafe { self.m.dealloc(b.addr as *mut u8, b.layout) };
        }
        // In guard mode a free whose guard page cannot be committed again keeps its span (documented in
        // `free_large`: leaked rather than handed out with an inaccessible page), so it stays counted.
        let mut guard_leaks = false;
        if let Some(src) = self.m.heap().source().bounded() {
            guard_leaks = self.cfg.debug.contains(DebugFlags::GUARD) && src.failed_commits() > 0;
            src.fail_all(false);
            src.set_budget(usize::MAX);
        }
        if self.other_thread_ran {
            // Flushes the cache the other thread used: the slot it released is the one this thread claims
            // (the lowest free; in a process with other threads claiming slots it may be another, and then
            // the check below could fail spuriously, so the host test runs its inputs on one thread).
            std::thread::scope(|s| {
                if let Err(e) = s.spawn(|| self.m.flush_cpu_cache()).join() {
                    std::panic::resume_unwind(e);
                }
            });
        }
        self.m.release_all();
        self.m.validate();
        if guard_leaks {
            return;
        }
        let st = self.m.mem_stats();
        assert_eq!(st.heap_objects, 0, "every object freed, yet the statistics count live ones: {st:?}");
        assert_eq!(st.heap_alloc, 0, "every object freed, yet the statistics count live bytes: {st:?}");
    }
}
