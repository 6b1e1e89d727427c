//! The bad-free catalogue of `check.rs`, cell by cell: every kind of bad free, on every tier, with the object
//! wherever it can be (this CPU's stock, a span this CPU caches, a span another CPU caches, an uncached span),
//! checked against the guarantee the table in `check.rs` states for this build (`checks` on or off: each
//! build tests its own column; `cargo xtask test` runs both).
#![cfg(feature = "std")]

use goheap::check::BadFree;
use goheap::cpu::ThreadSlots;
use goheap::source::mmap::MmapSource;
use goheap::Malloc;
use std::alloc::{GlobalAlloc, Layout, System};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::mpsc;

type M = Malloc<MmapSource, ThreadSlots>;

fn hook(b: &BadFree) -> ! {
    panic!("{b}")
}

fn l(size: usize, align: usize) -> Layout {
    Layout::from_size_align(size, align).unwrap()
}

/// Runs `f`; the report's message if it panicked (the hook panics with the report).
fn report_of(f: impl FnOnce()) -> Option<String> {
    catch_unwind(AssertUnwindSafe(f)).err().map(|e| {
        e.downcast_ref::<String>().cloned().or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string())).unwrap()
    })
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    DoubleFree,
    ForeignStack,
    ForeignStatic,
    ForeignOtherAllocator,
    Interior,
    Misaligned,
    /// Freed with a layout of a smaller class (small: a smaller size class, or the tiny path; tiny: another
    /// tiny size; large: a size class).
    SmallerClass,
    /// Freed with a layout of a larger class (tiny: a size class; small: a larger class; large: more pages).
    LargerClass,
    /// Freed with a layout of the other tier (tiny or small as large, large as small).
    LargeVsSmall,
    /// Freed with the right size and a larger alignment.
    WrongAlign,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Tier {
    Tiny,
    Small,
    Large,
}

/// Where the object is when it is badly freed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Where {
    /// Freed once already and still on this CPU's stock (tiny: its block freed into this CPU's stock).
    ThisStock,
    /// In a span this CPU caches (tiny: this CPU's current block); for a double free, folded into it.
    ThisSpan,
    /// In a span another CPU caches (tiny: another CPU's current block); for a double free, folded into it.
    OtherSpan,
    /// In a span no CPU caches (tiny: a retired block; large objects are always here).
    Uncached,
    /// No object: a foreign pointer.
    Nowhere,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Outcome {
    /// Reported by the bad free itself, with this text in the message.
    AtFree(&'static str),
    /// Reported at the latest when the stock is flushed or the span swept (any CPU's), with this text.
    AtFlush(&'static str),
    /// Not reported and harmless: no live object changes or is handed out again.
    Harmless,
}

use Kind::*;
use Outcome::*;
use Tier::*;
use Where::*;

struct Cell {
    kind: Kind,
    tier: Tier,
    at: Where,
    checks_on: Outcome,
    checks_off: Outcome,
}

const NOT_LIVE: &str = "not a live allocation";
const DOUBLE: &str = "double free";
const INTERIOR: &str = "interior pointer";
const MISALIGNED: &str = "misaligned pointer";
const MISMATCH: &str = "does not match the object's size class";

/// The catalogue (the same table as in `check.rs`'s docs).
fn catalogue() -> Vec<Cell> {
    let mut v = Vec::new();
    let mut cell = |kind, tier, at, checks_on, checks_off| v.push(Cell { kind, tier, at, checks_on, checks_off });
    let live = [ThisSpan, OtherSpan, Uncached];
    // Double free.
    for at in [ThisStock, ThisSpan, OtherSpan, Uncached] {
        cell(DoubleFree, Tiny, at, AtFree(DOUBLE), AtFree(DOUBLE));
    }
    cell(DoubleFree, Small, ThisStock, AtFree(DOUBLE), AtFree(DOUBLE));
    for at in [ThisSpan, OtherSpan, Uncached] {
        cell(DoubleFree, Small, at, AtFree(DOUBLE), AtFlush(DOUBLE));
    }
    cell(DoubleFree, Large, Uncached, AtFree(NOT_LIVE), AtFree(NOT_LIVE));
    // Foreign pointers.
    for kind in [ForeignStack, ForeignStatic, ForeignOtherAllocator] {
        for tier in [Tiny, Small, Large] {
            cell(kind, tier, Nowhere, AtFree(NOT_LIVE), AtFree(NOT_LIVE));
        }
    }
    for at in live {
        // Interior pointers.
        cell(Interior, Tiny, at, AtFree(INTERIOR), AtFree(INTERIOR));
        cell(Interior, Small, at, AtFree(INTERIOR), AtFlush(INTERIOR));
        // Misaligned pointers.
        cell(Misaligned, Tiny, at, AtFree(MISALIGNED), AtFree(MISALIGNED));
        cell(Misaligned, Small, at, AtFree(MISALIGNED), AtFree(MISALIGNED));
        // Wrong sizes and alignments.
        cell(SmallerClass, Tiny, at, Harmless, Harmless);
        cell(SmallerClass, Small, at, AtFree(MISMATCH), AtFlush(MISMATCH));
        cell(LargerClass, Tiny, at, AtFree(MISMATCH), AtFlush(MISMATCH));
        cell(LargerClass, Small, at, AtFree(MISMATCH), AtFlush(MISMATCH));
        cell(LargeVsSmall, Tiny, at, AtFree(MISMATCH), AtFree(MISMATCH));
        cell(LargeVsSmall, Small, at, AtFree(MISMATCH), AtFree(MISMATCH));
        cell(WrongAlign, Tiny, at, AtFree(MISMATCH), AtFlush(MISMATCH));
        cell(WrongAlign, Small, at, AtFree(MISMATCH), AtFlush(MISMATCH));
    }
    cell(Interior, Large, Uncached, AtFree(INTERIOR), AtFree(INTERIOR));
    cell(Misaligned, Large, Uncached, AtFree(INTERIOR), AtFree(INTERIOR));
    cell(SmallerClass, Large, Uncached, AtFree(MISMATCH), AtFlush(MISMATCH));
    cell(LargerClass, Large, Uncached, Harmless, Harmless);
    cell(LargeVsSmall, Large, Uncached, AtFree(MISMATCH), AtFlush(MISMATCH));
    cell(WrongAlign, Large, Uncached, Harmless, Harmless);
    v
}

/// Another CPU: a thread with its own cache slot that runs closures on request.
struct Other<'s> {
    tx: mpsc::Sender<Box<dyn FnOnce() + Send + 's>>,
}

impl<'s> Other<'s> {
    fn spawn<'e>(s: &'s std::thread::Scope<'s, 'e>) -> Self {
        let (tx, rx) = mpsc::channel::<Box<dyn FnOnce() + Send + 's>>();
        s.spawn(move || {
            for f in rx {
                f();
            }
        });
        Other { tx }
    }

    fn run<R: Send + 's>(&self, f: impl FnOnce() -> R + Send + 's) -> R {
        let (rtx, rrx) = mpsc::sync_channel(1);
        self.tx.send(Box::new(move || rtx.send(f()).unwrap())).unwrap();
        rrx.recv().unwrap()
    }
}

fn layout_of(tier: Tier) -> Layout {
    match tier {
        Tiny => l(8, 4),
        Small => l(64, 8),
        Large => l(100_000, 8),
    }
}

/// The bad free a cell makes: the pointer, the layout it is freed with, and the objects that must stay
/// intact (address, layout, fill byte).
struct Bad {
    ptr: usize,
    layout: Layout,
    live: Vec<(usize, Layout)>,
}

fn fill(p: usize, lay: Layout) {
    // SAFETY (test): a live object of `lay`.
    unsafe { std::ptr::write_bytes(p as *mut u8, 0xA5, lay.size()) };
}

fn intact(p: usize, lay: Layout) -> bool {
    // SAFETY (test): a live object of `lay`.
    unsafe { std::slice::from_raw_parts(p as *const u8, lay.size()) }.iter().all(|&b| b == 0xA5)
}

static STATIC_OBJ: [u64; 16] = [0; 16];

fn setup<'s>(m: &'s M, other: &Other<'s>, c: &Cell, stack: usize) -> Bad {
    let lay = layout_of(c.tier);
    // SAFETY (test, all `dealloc`s here): good frees of live objects.
    let free = |p: usize| unsafe { m.dealloc(p as *mut u8, lay) };
    let alloc_here = || {
        let p = m.alloc(lay) as usize;
        fill(p, lay);
        p
    };
    // An object and a sibling (same span or block), both live, where the cell wants them.
    let live_pair = || -> (usize, usize) {
        match c.at {
            OtherSpan => other.run(move || {
                let (p, q) = (m.alloc(lay) as usize, m.alloc(lay) as usize);
                fill(p, lay);
                fill(q, lay);
                (p, q)
            }),
            Uncached => {
                let (p, q) = (alloc_here(), alloc_here());
                m.flush_cpu_cache();
                (p, q)
            }
            _ => (alloc_here(), alloc_here()),
        }
    };
    let foreign = |ptr| Bad { ptr, layout: lay, live: vec![] };
    match c.kind {
        ForeignStack => return foreign(stack),
        ForeignStatic => return foreign(STATIC_OBJ.as_ptr() as usize),
        // SAFETY (test): a block of the system allocator, leaked.
        ForeignOtherAllocator => return foreign(unsafe { System.alloc(lay) } as usize),
        _ => {}
    }
    if c.kind == DoubleFree {
        let p = match (c.tier, c.at) {
            (Large, _) => {
                let p = alloc_here();
                free(p);
                p
            }
            (Small, ThisStock) => {
                let p = alloc_here();
                free(p);
                p
            }
            (Small, ThisSpan) => {
                let p = alloc_here();
                other.run(move || {
                    // SAFETY (test): good free.
                    unsafe { m.dealloc(p as *mut u8, lay) };
                    m.flush_cpu_cache();
                });
                assert_eq!(m.background(0, 0).nfolded, 1);
                p
            }
            (Small, OtherSpan) => {
                let p = other.run(move || m.alloc(lay) as usize);
                free(p);
                m.flush_cpu_cache();
                assert_eq!(other.run(move || m.background(0, 0).nfolded), 1);
                p
            }
            (Small, _) => {
                let p = alloc_here();
                m.flush_cpu_cache();
                free(p);
                m.flush_cpu_cache();
                p
            }
            (Tiny, ThisStock) => {
                // The block's only object: retired, then freed, the block goes to this CPU's stock.
                let p = alloc_here();
                m.flush_cpu_cache();
                free(p);
                p
            }
            (Tiny, _) => {
                let (p, _sibling) = live_pair();
                free(p);
                p
            }
        };
        return Bad { ptr: p, layout: lay, live: vec![] };
    }
    let (p, sibling) = live_pair();
    let mut live = vec![(sibling, lay)];
    let (ptr, layout) = match (c.kind, c.tier) {
        (Interior, Tiny) => (p + 4, lay),
        (Interior, Small) => (p + 16, lay),
        (Interior, Large) => (p + 8192, lay),
        (Misaligned, _) => (p + 3, lay),
        (SmallerClass, Tiny) => (p, l(4, 4)),
        (SmallerClass, Small) => (p, l(48, 8)),
        (SmallerClass, Large) => (p, l(64, 8)),
        (LargerClass, Tiny) => (p, l(16, 8)),
        (LargerClass, Small) => (p, l(128, 8)),
        (LargerClass, Large) => (p, l(200_000, 8)),
        (LargeVsSmall, Tiny | Small) => (p, l(100_000, 8)),
        (LargeVsSmall, Large) => (p, l(4096, 8)),
        (WrongAlign, Tiny) => (p, l(8, 16)),
        (WrongAlign, Small) => (p, l(64, 128)),
        (WrongAlign, Large) => (p, l(100_000, 4096)),
        _ => unreachable!(),
    };
    if matches!(c.kind, Interior | Misaligned) {
        // The object itself stays live.
        live.push((p, lay));
    }
    Bad { ptr, layout, live }
}

/// Runs one cell in a fresh heap; `Err` describes how it broke its guarantee.
fn run_cell(c: &Cell) -> Result<(), String> {
    let want = if cfg!(feature = "checks") { c.checks_on } else { c.checks_off };
    let m: &'static M = Box::leak(Box::new(
        Malloc::with_max_bytes(MmapSource::new(), ThreadSlots::new(), 1 << 30).with_report_hook(hook),
    ));
    let mut stack_obj = [0u64; 16];
    let stack = stack_obj.as_mut_ptr() as usize;
    let r = std::thread::scope(|s| {
        let other = Other::spawn(s);
        let bad = setup(m, &other, c, stack);
        // SAFETY (test): deliberately bad (the cell's kind).
        let at_free = report_of(|| unsafe { m.dealloc(bad.ptr as *mut u8, bad.layout) });
        if at_free.is_some() || matches!(want, AtFree(_)) {
            return (at_free, None, bad);
        }
        let later = report_of(|| m.flush_cpu_cache())
            .or_else(|| {
                other.run(move || {
                    report_of(|| {
                        m.flush_cpu_cache();
                        m.background(0, 0);
                    })
                })
            })
            .or_else(|| {
                report_of(|| {
                    m.background(0, 0);
                })
            });
        (None, later, bad)
    });
    std::hint::black_box(&mut stack_obj);
    let (at_free, later, bad) = r;
    let named = |msg: &str, text: &str| -> Result<(), String> {
        let addr = format!("{:#x}", bad.ptr);
        if msg.starts_with("goheap: invalid free") && msg.contains(&addr) && msg.contains(text) {
            Ok(())
        } else {
            Err(format!("report {msg:?} should name {addr} and say {text:?}"))
        }
    };
    match (want, at_free, later) {
        (AtFree(text), Some(msg), _) => {
            named(&msg, text)?;
            // A pointer that lies in a live span: the report names the span and its class.
            let in_span = c.at != Nowhere && !(c.kind == DoubleFree && c.tier == Large);
            if in_span && !(msg.contains("; span 0x") && msg.contains(", class ")) {
                return Err(format!("report {msg:?} does not name the span and class"));
            }
        }
        (AtFlush(text), None, Some(msg)) => named(&msg, text)?,
        (Harmless, None, None) => {
            for &(p, lay) in &bad.live {
                if !intact(p, lay) {
                    return Err(format!("live object {p:#x} changed"));
                }
            }
            let again: Vec<usize> = (0..200).map(|_| m.alloc(layout_of(c.tier)) as usize).collect();
            if let Some(&(p, _)) = bad.live.iter().find(|(p, _)| again.contains(p)) {
                return Err(format!("live object {p:#x} handed out again"));
            }
        }
        (want, at_free, later) => return Err(format!("want {want:?}, got at free {at_free:?}, later {later:?}")),
    }
    if matches!(want, AtFree(_)) && c.at != Nowhere && c.kind != DoubleFree {
        // Reported before any state changed: the objects that are still live are intact.
        for &(p, lay) in &bad.live {
            if !intact(p, lay) {
                return Err(format!("live object {p:#x} changed by a refused free"));
            }
        }
    }
    Ok(())
}

#[test]
fn every_cell_keeps_its_guarantee() {
    let cells = catalogue();
    assert!(cells.len() >= 60, "catalogue lost cells: {}", cells.len());
    let mut failures = Vec::new();
    for c in &cells {
        if std::env::var_os("CATALOGUE_TRACE").is_some() {
            eprintln!("cell {:?} / {:?} / {:?}", c.kind, c.tier, c.at);
        }
        if let Err(e) = run_cell(c) {
            failures.push(format!("{:?} / {:?} / {:?}: {e}", c.kind, c.tier, c.at));
        }
    }
    assert!(failures.is_empty(), "{} of {} cells failed:\n{}", failures.len(), cells.len(), failures.join("\n"));
}

/// With `checks`, reports at the free name the span and class of a pointer that lies in one.
#[cfg(feature = "checks")]
#[test]
fn checks_reports_name_span_and_class() {
    let m = Box::new(Malloc::with_max_bytes(MmapSource::new(), ThreadSlots::new(), 1 << 30).with_report_hook(hook));
    for lay in [l(8, 8), l(64, 8)] {
        let p = m.alloc(lay);
        let _sibling = m.alloc(lay);
        // SAFETY (test): the first free is good, the second deliberately bad.
        unsafe { m.dealloc(p, lay) };
        let msg = report_of(|| unsafe { m.dealloc(p, lay) }).expect("reported");
        assert!(msg.contains("; span 0x") && msg.contains("class "), "{msg}");
    }
}
