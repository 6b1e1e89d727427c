//! Bad-input reports: double frees, foreign, interior and misaligned pointers, layout mismatches.
//!
//! See `lib.rs` for an overview of the allocator.
//!
//! goheap never lets bad input corrupt the heap silently. Where it detects a bad free it stops before touching
//! any state and calls the report hook with a [`BadFree`] naming the address, the reason, and the span and
//! class involved. The default hook panics with that message (in a kernel the panic handler prints it; a
//! `#[global_allocator]` must not unwind, so `Hosted` installs a hook that prints to stderr and aborts).
//!
//! # What is caught when
//!
//! In every build (no feature), at a cost of a few instructions on the fast path:
//! - a small free whose pointer is outside the heap's arena, or not 8-byte aligned, is refused before it
//!   enters a stock (two loads and a compare: `Malloc::dealloc`'s arena check);
//! - a small free of an object that is on this CPU's stock already is refused (glibc tcache's key: every
//!   stocked object carries a key in its second word; only a free that finds the key scans the stock);
//! - a tiny free looks its span up in the page map first: a pointer in no span, in a span of another
//!   class, or past the blocks (in their metadata) is refused before anything changes; then its block's
//!   masks (see `object/cpucache.rs`, "The tiny protocol"): a pointer at no object's start (an interior
//!   pointer) is refused, and a free of an object whose bit is already in the block's done mask (a double
//!   free) is refused by the free's own `fetch_or`, which changes nothing then;
//! - large frees and every `realloc` are validated against the page map (span, class, object start);
//! - when a stock is flushed to the central list each object is validated (a live span of the stock's
//!   class, an object's start, allocated), and when a span's deferred frees are folded (its sweep) a free of
//!   an object that is not allocated is dropped, never counted, and reported.
//!
//! With feature `checks`, every free is checked at the moment of the free, before it touches any state:
//! alignment, the span, the class, the object's start, and that the object is live (a per-object live bit
//! for small objects; tiny ones have their block's masks in every build), so every cell below is reported
//! at the free with the address, the reason and the span and class. Without the feature none of this is on
//! the fast path.
//!
//! With `checks`, freed small objects are also poisoned (Go's `clobberfree`): the free fills the object,
//! past the two words a stock uses for its link and key, with `POISON`, and the allocation that hands the
//! object out again verifies the pattern; a difference is reported as [`Reason::WriteAfterFree`] with the
//! address of the first changed byte (`alloc_zeroed` clears the object instead of verifying it; tiny objects
//! and large ones are not poisoned: a tiny block's siblings stay live, and large objects' pages go back to
//! the page heap).
//!
//! # Use-after-free and overflow detection
//!
//! Bad frees are one half of bad input; the other is using memory the program does not own. Three modes,
//! each caught in a test on the host (`tests/detection.rs`, `tests/bad_input_regress.rs`'s `poisoning`) and
//! in QEMU (`kernel-demo/tests/clobberfree.rs`, `guarded_sampled.rs`, `efence.rs`):
//!
//! | mode | turned on by | catches | reported as |
//! |---|---|---|---|
//! | poisoning (Go's `clobberfree`) | feature `checks` | a write to a freed small object | [`Reason::WriteAfterFree`] when the object is handed out again |
//! | guard mode | `DebugFlags::GUARD` | an overrun past any object | a page fault at the access (addresses are recycled: a use after free is not caught) |
//! | efence (Go's `GODEBUG=efence=1`) | `DebugFlags::EFENCE` | an overrun past any object, any read or write after free | a page fault at the access; a second free as [`Reason::NotInHeap`] |
//! | sampled guarded allocations (KFENCE, GWP-ASan) | `Malloc::set_guarded_sample_rate` (with profiling on), in production builds | an overrun past a sampled object, a use after its free (until its slot leaves quarantine), a write before it | a page fault; [`Reason::GuardedCanary`], bad frees of it as any bad free |
//!
//! The faults come from the page source's guard operations (`PageSource::decommit_guard` and friends: a
//! kernel source that unmaps, any `MmapSource`); see `malloc/guarded.rs` and `page/heap/retire.rs` for
//! how the modes were adapted from Go's efence and Linux's KFENCE.
//!
//! # The catalogue (tested cell by cell in `tests/bad_free_catalogue.rs`)
//!
//! Where the object is when it is badly freed: **stock** (freed once and still on this CPU's stock; tiny:
//! its block freed into this CPU's stock), **this** (in a span this CPU caches; tiny: this CPU's current
//! block; for a double free, the first free already folded into it), **other** (the same for another CPU),
//! **uncached** (a span no CPU caches; tiny: a retired block; large objects always). Foreign pointers are
//! in no object. "free": reported by the bad free itself. "flush": reported when the stock holding the bad
//! pointer is flushed or the span it went to is swept (a CPU's own `flush_cpu_cache`, its stock overflowing,
//! or `background`) — if the stock hands the pointer out first, the report comes when that allocation is
//! freed and flushed, and until then the stock's link (and key) words were written into the memory at the
//! pointer. "harmless": no report, and no live object changes or is handed out twice. No cell is
//! undetected corruption (the tiny cells were until the block masks replaced the per-block count).
//!
//! | kind | tier | where | `checks` | without `checks` |
//! |---|---|---|---|---|
//! | double free | tiny | stock, this, other, uncached | free | free (the block's done mask) |
//! | double free | small | stock | free | free (stock key) |
//! | double free | small | this, other, uncached | free | flush (the sweep or the flush finds the object not allocated) |
//! | double free | large | uncached | free | free (no live span) |
//! | foreign pointer (stack, static, another allocator's block) | tiny, small, large | — | free | free (arena check; tiny and large: page map) |
//! | interior pointer | tiny | this, other, uncached | free | free (the block's starts mask) |
//! | interior pointer | small | this, other, uncached | free | flush |
//! | interior pointer | large | uncached | free | free |
//! | misaligned | tiny, small | this, other, uncached | free | free |
//! | misaligned | large | uncached | free (interior) | free (interior) |
//! | wrong size, smaller class | tiny (another tiny size) | this, other, uncached | harmless (a tiny free goes by the object's start, not its size) | harmless |
//! | wrong size, smaller class | small (a smaller class) | this, other, uncached | free | flush |
//! | wrong size, smaller class | small (the tiny path) | this, other, uncached | free | free (page map) |
//! | wrong size, larger class | tiny (a size class), small | this, other, uncached | free | flush |
//! | wrong size, larger class | large (more pages) | uncached | harmless (the span knows its pages) | harmless |
//! | wrong size, large vs small | tiny, small freed as large | this, other, uncached | free | free |
//! | wrong size, large vs small | large freed as small | uncached | free | flush |
//! | wrong alignment (same size, larger alignment) | tiny, small (another class) | this, other, uncached | free | flush |
//! | wrong alignment | large | uncached | harmless (alignment matters only when allocating) | harmless |
//!
//! Not in the table, and not detectable by any allocator: a double free after the object was handed out
//! again (it frees the new allocation; tiny: after its block was taken again). Also known: without
//! `checks`, a double free whose first free sits on *another* CPU's stock is caught only when both reach the
//! span (the key scan covers this CPU's stock).

use crate::sync::atomic::{AtomicPtr, Ordering};
use core::fmt;

/// Why a free was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    /// The address is not in any live span of this heap (never allocated here, or its pages were freed).
    NotInHeap,
    /// The object is not allocated: freed twice, or never handed out.
    DoubleFree,
    /// The address points inside an object, not at its first byte.
    Interior,
    /// The address is not a multiple of the layout's alignment.
    Misaligned {
        /// The alignment the layout asked for.
        align: usize,
    },
    /// The layout given to `dealloc` maps to another class than the object's span.
    LayoutMismatch {
        /// The layout's size.
        size: usize,
        /// The layout's alignment.
        align: usize,
    },
    /// With `checks`: byte `offset` of the object changed while it was free (a write after free), found when
    /// the object was handed out again. `addr` is the object's address.
    WriteAfterFree {
        /// The byte offset of the first changed byte within the object.
        offset: usize,
    },
    /// A sampled guarded allocation's canary (the bytes of its page before the object) changed: a write
    /// `offset` bytes before the object's start at `addr` (an underflow, or a stray write), found at its free.
    GuardedCanary {
        /// How many bytes before the object's start the first changed canary byte lies.
        offset: usize,
    },
}

/// A refused free (or, with `checks`, a write after free found when the object was handed out again), with
/// what goheap knows about the address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BadFree {
    /// The pointer passed to `dealloc`/`realloc`.
    pub addr: usize,
    /// What is wrong with it.
    pub reason: Reason,
    /// Base address of the span the address falls in, if any.
    pub span_base: Option<usize>,
    /// That span's size class (0: large object; `NUM_SIZE_CLASSES`: tiny blocks).
    pub span_class: u8,
    /// That span's object size in bytes (a large object's whole size).
    pub span_elemsize: usize,
}

impl fmt::Display for BadFree {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Reason::WriteAfterFree { offset } = self.reason {
            write!(
                f,
                "goheap: write after free at {:#x} (byte {offset} of the object at {:#x} changed while it was free)",
                self.addr + offset,
                self.addr
            )?;
        } else if let Reason::GuardedCanary { offset } = self.reason {
            write!(
                f,
                "goheap: write out of bounds at {:#x} ({offset} bytes before the guarded object at {:#x}: its canary changed)",
                self.addr - offset,
                self.addr
            )?;
        } else {
            write!(f, "goheap: invalid free of {:#x}: ", self.addr)?;
        }
        match self.reason {
            Reason::WriteAfterFree { .. } | Reason::GuardedCanary { .. } => {}
            Reason::NotInHeap => write!(f, "not a live allocation of this heap (foreign pointer, or freed twice)")?,
            Reason::DoubleFree => write!(f, "double free (object is not allocated)")?,
            Reason::Interior => write!(f, "interior pointer (not the start of an object)")?,
            Reason::Misaligned { align } => write!(f, "misaligned pointer (layout alignment {align})")?,
            Reason::LayoutMismatch { size, align } => {
                write!(f, "layout (size {size}, align {align}) does not match the object's size class")?
            }
        }
        if let Some(base) = self.span_base {
            write!(f, "; span {:#x}, class {}, {} B objects", base, self.span_class, self.span_elemsize)?;
        }
        Ok(())
    }
}

/// A report hook: receives the bad free and must not return.
pub type ReportHook = fn(&BadFree) -> !;

fn panic_hook(b: &BadFree) -> ! {
    panic!("{}", b)
}

static HOOK: AtomicPtr<()> = AtomicPtr::new(panic_hook as *mut ());

/// Replaces the report hook (process- or kernel-wide). The default panics with the report's message.
///
/// An allocator built with [`Malloc::with_report_hook`](crate::Malloc::with_report_hook) uses its own hook
/// instead (`goheap::Hosted` aborts: a global allocator must not unwind).
///
/// ```
/// use goheap::check::{set_report_hook, BadFree};
///
/// /// A kernel's hook: log the report (its `Display` names the address, the reason, the span and the
/// /// class) and stop this CPU.
/// fn halt(bad: &BadFree) -> ! {
///     log::error!("goheap: {bad}");
///     loop {
///         core::hint::spin_loop();
///     }
/// }
///
/// set_report_hook(halt);
/// ```
pub fn set_report_hook(hook: ReportHook) {
    HOOK.store(hook as *mut (), Ordering::Release);
}

/// Reports a bad free through the hook. Never returns.
#[cold]
#[inline(never)]
pub fn report(b: &BadFree) -> ! {
    let p = HOOK.load(Ordering::Acquire);
    // SAFETY: HOOK only ever holds a `ReportHook` function pointer (the default or one given to
    // `set_report_hook`), and function pointers round-trip through `*mut ()`.
    let hook: ReportHook = unsafe { core::mem::transmute::<*mut (), ReportHook>(p) };
    hook(b)
}

/// What went wrong with an object handed to `Central::flush` (the object level's batch free) (only possible for invalid frees).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FlushError {
    /// The address is in no live span of this heap.
    NotInHeap(usize),
    /// The span holds another class.
    WrongClass {
        /// The object's address.
        addr: usize,
        /// The class of the span the address lies in.
        span_class: u8,
    },
    /// The address is inside an object, not at its start.
    Interior(usize),
    /// The object was not allocated.
    NotAllocated(usize),
}

/// A [`BadFree`] for `addr`, filled with what `heap` knows of it.
pub(crate) fn describe<S: crate::source::PageSource>(
    heap: &crate::page::heap::Heap<S>,
    addr: usize,
    reason: Reason,
) -> BadFree {
    let mut b = BadFree { addr, reason, span_base: None, span_class: 0, span_elemsize: 0 };
    if let Some(s) = heap.span_of(addr) {
        let s = s.as_ptr();
        // SAFETY: `span_of` returns live spans; their shape fields are immutable while in use.
        unsafe {
            b.span_base = Some((*s).base);
            b.span_class = (*s).class;
            b.span_elemsize = if (*s).class == 0 { (*s).npages * crate::PAGE_SIZE } else { (*s).elemsize as usize };
        }
    }
    b
}

/// Reports `addr` through `hook`, or the process-wide hook when `None`.
#[cold]
pub(crate) fn report_with<S: crate::source::PageSource>(
    heap: &crate::page::heap::Heap<S>,
    hook: Option<ReportHook>,
    addr: usize,
    reason: Reason,
) -> ! {
    let b = describe(heap, addr, reason);
    match hook {
        Some(hook) => hook(&b),
        None => report(&b),
    }
}

/// Reports an invalid object found while flushing a stock to its central list.
#[cold]
pub(crate) fn report_flush_error<S: crate::source::PageSource>(
    heap: &crate::page::heap::Heap<S>,
    hook: Option<ReportHook>,
    e: FlushError,
) -> ! {
    let (addr, reason) = match e {
        FlushError::NotInHeap(a) => (a, Reason::NotInHeap),
        FlushError::WrongClass { addr, .. } => (addr, Reason::LayoutMismatch { size: 0, align: 0 }),
        FlushError::Interior(a) => (a, Reason::Interior),
        FlushError::NotAllocated(a) => (a, Reason::DoubleFree),
    };
    report_with(heap, hook, addr, reason)
}

/// With `checks`: the pattern freed small objects are filled with (Go's `clobberfree` uses the same word),
/// repeated little-endian.
#[cfg(feature = "checks")]
pub const POISON: u32 = 0xdead_beef;

/// Bytes at the start of a freed object that the allocator itself writes while the object is free (a stock's
/// link and key): the poison check skips them.
#[cfg(feature = "checks")]
pub(crate) const POISON_SKIP: usize = 2 * core::mem::size_of::<usize>();

/// The poison pattern as a word.
#[cfg(feature = "checks")]
const POISON_WORD: u64 = (POISON as u64) << 32 | POISON as u64;

/// Fills words `[POISON_SKIP, len)` of the freed object at `p` with the poison pattern, a word at a time.
///
/// # Safety
/// `p` is 8-byte aligned and valid for writes of `len` bytes (a multiple of 8, as every class size is), and
/// nobody else uses them.
#[cfg(feature = "checks")]
pub(crate) unsafe fn poison(p: *mut u8, len: usize) {
    for i in (POISON_SKIP..len).step_by(8) {
        // SAFETY: `i + 8 <= len`, aligned (the caller's contract).
        unsafe { (p.add(i) as *mut u64).write(POISON_WORD) };
    }
}

/// The offset of the first byte in `[POISON_SKIP, len)` of the object at `p` that no longer holds the poison
/// pattern, if any.
///
/// # Safety
/// As for [`poison`], for reads.
#[cfg(feature = "checks")]
pub(crate) unsafe fn poison_damage(p: *const u8, len: usize) -> Option<usize> {
    (POISON_SKIP..len).step_by(8).find_map(|i| {
        // SAFETY: `i + 8 <= len`, aligned (the caller's contract).
        let diff = unsafe { (p.add(i) as *const u64).read() } ^ POISON_WORD;
        (diff != 0).then(|| i + (diff.trailing_zeros() / 8) as usize)
    })
}
