//! Page sources for the fuzzed heaps.
//!
//! Each input gets a fresh heap, so its source must give everything back when the heap is dropped: goheap
//! never returns a reservation, and `MmapSource` never unmaps (it serves a process-long heap), so a fuzzer
//! running millions of inputs over it would run out of address space and mappings. [`Unmapping`] wraps
//! `MmapSource` (normal or strict) and unmaps its reservations on drop. `BoundedSource` (in its own mmap
//! mode) already unmaps on drop, and adds a commit budget and injected commit failures for out-of-memory
//! paths; its decommit makes memory `PROT_NONE`, so it also serves guard mode.

use core::ptr::NonNull;
use core::sync::atomic::{AtomicUsize, Ordering};
use goheap::source::bounded::BoundedSource;
use goheap::source::mmap::MmapSource;
use goheap::source::PageSource;

/// What the harness needs of a source beyond [`PageSource`].
pub trait FuzzSource: PageSource {
    /// The bounded source, for budget and failure operations.
    fn bounded(&self) -> Option<&BoundedSource>;
    /// Whether decommitted memory is inaccessible (guard mode needs it).
    fn strict(&self) -> bool;
}

impl FuzzSource for BoundedSource {
    fn bounded(&self) -> Option<&BoundedSource> {
        Some(self)
    }
    fn strict(&self) -> bool {
        true
    }
}

/// Most reservations one heap makes: its arena, its metadata and the span-descriptor blocks (64 KiB each).
/// A reservation past this fails, which the heap must survive like any other.
const MAX_RESERVATIONS: usize = 256;

/// `MmapSource` that unmaps its reservations when dropped.
pub struct Unmapping {
    inner: MmapSource,
    strict: bool,
    /// Number of slots of `ranges` claimed.
    n: AtomicUsize,
    /// (address, length) of each reservation; 0 for a slot whose reservation failed.
    ranges: [(AtomicUsize, AtomicUsize); MAX_RESERVATIONS],
}

impl Unmapping {
    /// `MmapSource::strict()` (uncommitted memory inaccessible) or `MmapSource::new()`.
    pub fn new(strict: bool) -> Self {
        Unmapping {
            inner: if strict { MmapSource::strict() } else { MmapSource::new() },
            strict,
            n: AtomicUsize::new(0),
            ranges: [const { (AtomicUsize::new(0), AtomicUsize::new(0)) }; MAX_RESERVATIONS],
        }
    }
}

impl FuzzSource for Unmapping {
    fn bounded(&self) -> Option<&BoundedSource> {
        None
    }
    fn strict(&self) -> bool {
        self.strict
    }
}

impl Drop for Unmapping {
    fn drop(&mut self) {
        let n = self.n.load(Ordering::Acquire).min(MAX_RESERVATIONS);
        for (addr, len) in &self.ranges[..n] {
            let (addr, len) = (addr.load(Ordering::Acquire), len.load(Ordering::Acquire));
            if addr != 0 {
                // SAFETY: a mapping `MmapSource::reserve` made for the heap, which is gone (the heap owns its
                // source and drops it last).
                unsafe { libc::munmap(addr as *mut libc::c_void, len) };
            }
        }
    }
}

// SAFETY: every call is forwarded to `MmapSource`, which upholds the contract; the only addition is the
// record of reservations (atomics, no allocation), used to unmap them once the heap and the source are gone.
unsafe impl PageSource for Unmapping {
    fn reserve(&self, nbytes: usize, align: usize) -> Option<NonNull<u8>> {
        let i = self.n.fetch_add(1, Ordering::AcqRel);
        if i >= MAX_RESERVATIONS {
            return None;
        }
        let p = self.inner.reserve(nbytes, align)?;
        self.ranges[i].1.store(nbytes, Ordering::Release);
        self.ranges[i].0.store(p.as_ptr() as usize, Ordering::Release);
        Some(p)
    }

    unsafe fn commit(&self, addr: NonNull<u8>, nbytes: usize) -> bool {
        // SAFETY: forwarded contract.
        unsafe { self.inner.commit(addr, nbytes) }
    }

    unsafe fn decommit(&self, addr: NonNull<u8>, nbytes: usize) {
        // SAFETY: forwarded contract.
        unsafe { self.inner.decommit(addr, nbytes) }
    }

    fn commit_zeroes(&self) -> bool {
        self.inner.commit_zeroes()
    }
}
