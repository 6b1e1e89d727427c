//! Bad-input reports: double frees, foreign, interior and misaligned pointers, layout mismatches.
//!
//! See `lib.rs` for an overview of the allocator.
//!
//! goheap never lets bad input corrupt the heap silently. Where it detects a bad free it stops before touching
//! any state and calls the report hook with a [`BadFree`] naming the address, the reason, and the span and
//! class involved. The default hook panics with that message (in a kernel the panic handler prints it; a
//! `#[global_allocator]` must not unwind, so `Hosted` installs a hook that prints to stderr and aborts).
//!
//! What is caught when:
//! - always (no feature): frees of large objects are checked (the span lookup is needed anyway): foreign
//!   pointers, pointers inside a large object, a large object freed twice. Small objects are checked when a
//!   CPU's stock is flushed to the central list: a pointer outside the heap, in a span of another class, or
//!   inside an object, and an object freed twice *if both frees reach the span*;
//! - with feature `checks`: every free is checked at the moment of the free, before the object enters a
//!   stock: misaligned pointer, foreign pointer, interior pointer, layout whose class differs from the
//!   span's, and double free (a per-object live bit). Without the feature none of this is on the fast path.

use core::fmt;
use core::sync::atomic::{AtomicPtr, Ordering};

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
    Misaligned { align: usize },
    /// The layout given to `dealloc` maps to another class than the object's span.
    LayoutMismatch { size: usize, align: usize },
}

/// A refused free, with what goheap knows about the address.
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
        write!(f, "goheap: invalid free of {:#x}: ", self.addr)?;
        match self.reason {
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
    WrongClass { addr: usize, span_class: u8 },
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
