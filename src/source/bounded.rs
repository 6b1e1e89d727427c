//! A bounded page source for tests: a fixed budget of committed bytes over one region, failure on demand.
//!
//! See `lib.rs` for an overview of the allocator.
//!
//! # Role
//! Tests (host and kernel) need a source whose memory runs out at a chosen point and which counts what the
//! heap did with it. [`BoundedSource`] hands out reservations from one region by bumping a pointer, and
//! accounts commits against a budget:
//! - **over a caller-given region** ([`BoundedSource::over_region`], no_std): the region is always
//!   accessible; commit zeroes the range (so `commit_zeroes() == true`), decommit fills it with
//!   [`POISON_BYTE`] so a use of decommitted memory reads garbage;
//! - **over its own mmap** (`BoundedSource::with_mmap`, feature `std`): the region is reserved `PROT_NONE`;
//!   commit is `mprotect(RW)`, decommit `madvise(DONTNEED)` + `mprotect(PROT_NONE)`, so stray uses fault.
//!
//! Failure injection: [`BoundedSource::fail_nth_commit`] (one chosen commit call fails),
//! [`BoundedSource::set_budget`] (fail once `committed + nbytes > budget`), [`BoundedSource::fail_all`].
//!
//! It also checks goheap's side of the contract for the first [`TRACKED_PAGES`] pages of the region: a page
//! committed twice or decommitted while not committed panics (a goheap bug, not an out-of-memory).
//!
//! # Invariants (all counters atomic, no locks)
//! - `committed_bytes = sum(successful commits) - sum(decommits) <= budget_bytes` (at the time of each commit);
//! - `next_off <= region_len`; reservations are `[region_base + off, ...)` for disjoint offsets below it;
//! - tracked page `p` has its bit set ⇔ it is committed.

use crate::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use core::ptr::NonNull;

use super::{PageSource, SOURCE_GRANULE};

/// Byte written over decommitted memory (region mode).
pub const POISON_BYTE: u8 = 0xDB;
/// log2 of the pages whose commit state is tracked: `TRACKED_PAGES = 1 << 18` = 2 GiB of region.
pub const LOG_TRACKED_PAGES: usize = 18;
/// Pages whose commit state is checked (the region's first 2 GiB).
pub const TRACKED_PAGES: usize = 1 << LOG_TRACKED_PAGES;
const TRACK_WORDS: usize = TRACKED_PAGES / 64; // 4096 words = 32 KiB

/// A bounded, failure-injecting page source (see the module docs). Usable in a `static` (region mode).
#[derive(Debug)]
pub struct BoundedSource {
    /// Start of the region (a pointer, so `over_region` can be `const`).
    region_ptr: *mut u8,
    region_len: usize,
    /// Bump offset of the next reservation.
    next_off: AtomicUsize,
    budget_bytes: AtomicUsize,
    committed_bytes: AtomicUsize,
    peak_committed_bytes: AtomicUsize,
    commit_calls: AtomicUsize,
    failed_commits: AtomicUsize,
    decommit_calls: AtomicUsize,
    decommitted_bytes: AtomicUsize,
    /// 1-based number of the commit call that fails (0 = none); one-shot.
    fail_commit_at: AtomicUsize,
    fail_all: AtomicBool,
    /// Region mmapped by us (std): use mprotect/madvise and unmap on drop.
    #[cfg_attr(not(feature = "std"), allow(dead_code))]
    mmapped: bool,
    tracked: [AtomicU64; TRACK_WORDS],
}

// SAFETY: the region pointer is only used as an address; all mutable state is atomic.
unsafe impl Send for BoundedSource {}
// SAFETY: as above: every method works through atomics.
unsafe impl Sync for BoundedSource {}

impl BoundedSource {
    #[inline]
    fn region_base(&self) -> usize {
        self.region_ptr as usize
    }

    /// A source over `[base, base + len)`, with `budget_bytes` of commit budget.
    ///
    /// # Safety
    /// The region is readable and writable, exclusively the source's for its lifetime, and `base` is
    /// [`SOURCE_GRANULE`]-aligned.
    pub const unsafe fn over_region(base: *mut u8, len: usize, budget_bytes: usize) -> Self {
        Self {
            region_ptr: base,
            region_len: len & !(SOURCE_GRANULE - 1),
            next_off: AtomicUsize::new(0),
            budget_bytes: AtomicUsize::new(budget_bytes),
            committed_bytes: AtomicUsize::new(0),
            peak_committed_bytes: AtomicUsize::new(0),
            commit_calls: AtomicUsize::new(0),
            failed_commits: AtomicUsize::new(0),
            decommit_calls: AtomicUsize::new(0),
            decommitted_bytes: AtomicUsize::new(0),
            fail_commit_at: AtomicUsize::new(0),
            fail_all: AtomicBool::new(false),
            mmapped: false,
            tracked: [const { AtomicU64::new(0) }; TRACK_WORDS],
        }
    }

    /// A source over a fresh `PROT_NONE` mapping of `region_bytes` (rounded up to the granule).
    /// Panics if the mapping fails (test helper).
    #[cfg(feature = "std")]
    pub fn with_mmap(region_bytes: usize, budget_bytes: usize) -> Self {
        let len = (region_bytes + SOURCE_GRANULE - 1) & !(SOURCE_GRANULE - 1);
        let inner = super::mmap::MmapSource::new();
        let base = inner.reserve(len, SOURCE_GRANULE).expect("BoundedSource::with_mmap: mmap failed");
        // SAFETY: a fresh reservation is exclusively ours; `mmapped` makes commit mprotect it before use.
        let mut s = unsafe { Self::over_region(base.as_ptr(), len, budget_bytes) };
        s.mmapped = true;
        s
    }

    /// Fails the `n`-th commit call from now (1 = the next one); 0 cancels.
    pub fn fail_nth_commit(&self, n: usize) {
        let at = if n == 0 { 0 } else { self.commit_calls.load(Ordering::SeqCst) + n };
        self.fail_commit_at.store(at, Ordering::SeqCst);
    }

    /// Makes every commit fail (`true`) or behave normally again.
    pub fn fail_all(&self, fail: bool) {
        self.fail_all.store(fail, Ordering::SeqCst);
    }

    /// Sets the commit budget: a commit fails when `committed + nbytes > budget_bytes`.
    pub fn set_budget(&self, budget_bytes: usize) {
        self.budget_bytes.store(budget_bytes, Ordering::SeqCst);
    }

    /// Current commit budget.
    pub fn budget_bytes(&self) -> usize {
        self.budget_bytes.load(Ordering::SeqCst)
    }

    /// Bytes committed now.
    pub fn committed_bytes(&self) -> usize {
        self.committed_bytes.load(Ordering::SeqCst)
    }

    /// Highest `committed_bytes` seen.
    pub fn peak_committed_bytes(&self) -> usize {
        self.peak_committed_bytes.load(Ordering::SeqCst)
    }

    /// Commit calls so far (successful or not).
    pub fn commit_calls(&self) -> usize {
        self.commit_calls.load(Ordering::SeqCst)
    }

    /// Commit calls that failed.
    pub fn failed_commits(&self) -> usize {
        self.failed_commits.load(Ordering::SeqCst)
    }

    /// Decommit calls so far.
    pub fn decommit_calls(&self) -> usize {
        self.decommit_calls.load(Ordering::SeqCst)
    }

    /// Bytes decommitted so far (cumulative).
    pub fn decommitted_bytes(&self) -> usize {
        self.decommitted_bytes.load(Ordering::SeqCst)
    }

    /// Bytes of the region reserved so far.
    pub fn reserved_bytes(&self) -> usize {
        self.next_off.load(Ordering::SeqCst)
    }

    /// Whether `addr` lies in a committed, tracked page (tests use it to check that no page is left
    /// committed). `None` when the page is outside the tracked part of the region.
    pub fn is_committed(&self, addr: usize) -> Option<bool> {
        let page = addr.wrapping_sub(self.region_base()) / SOURCE_GRANULE;
        if addr < self.region_base() || page >= TRACKED_PAGES {
            return None;
        }
        Some(self.tracked[page / 64].load(Ordering::SeqCst) & (1 << (page % 64)) != 0)
    }

    /// Marks pages `[addr, addr + nbytes)` committed (`set`) or not, panicking on a contract violation.
    fn track(&self, addr: usize, nbytes: usize, set: bool) {
        let first = (addr - self.region_base()) / SOURCE_GRANULE;
        let end = (first + nbytes / SOURCE_GRANULE).min(TRACKED_PAGES);
        for page in first..end {
            let bit = 1u64 << (page % 64);
            let old = if set {
                self.tracked[page / 64].fetch_or(bit, Ordering::SeqCst)
            } else {
                self.tracked[page / 64].fetch_and(!bit, Ordering::SeqCst)
            };
            if set && old & bit != 0 {
                panic!("BoundedSource: page {:#x} committed twice", self.region_base() + page * SOURCE_GRANULE);
            }
            if !set && old & bit == 0 {
                panic!(
                    "BoundedSource: page {:#x} decommitted while not committed",
                    self.region_base() + page * SOURCE_GRANULE
                );
            }
        }
    }

    fn in_region(&self, addr: usize, nbytes: usize) -> bool {
        addr >= self.region_base()
            && addr % SOURCE_GRANULE == 0
            && nbytes % SOURCE_GRANULE == 0
            && addr - self.region_base() + nbytes <= self.next_off.load(Ordering::SeqCst)
    }
}

#[cfg(feature = "std")]
impl Drop for BoundedSource {
    fn drop(&mut self) {
        if self.mmapped {
            // SAFETY: the region is our own mapping; the source (and so every heap over it) is gone.
            unsafe {
                libc::munmap(self.region_base() as *mut libc::c_void, self.region_len);
            }
        }
    }
}

// SAFETY: reservations are disjoint pieces of a region that is exclusively ours; commit makes the range
// usable (region mode: it always is; mmap mode: mprotect RW) and zeroes it; decommit only touches the given
// range; nothing here allocates; all state is atomic.
unsafe impl PageSource for BoundedSource {
    fn reserve(&self, nbytes: usize, align: usize) -> Option<NonNull<u8>> {
        if nbytes == 0 || nbytes % SOURCE_GRANULE != 0 || !align.is_power_of_two() {
            return None;
        }
        let mut off = self.next_off.load(Ordering::SeqCst);
        loop {
            let start = (self.region_base() + off).checked_add(align - 1)? & !(align - 1);
            let new_off = (start - self.region_base()).checked_add(nbytes)?;
            if new_off > self.region_len {
                return None;
            }
            match self.next_off.compare_exchange(off, new_off, Ordering::SeqCst, Ordering::SeqCst) {
                Ok(_) => return NonNull::new(start as *mut u8),
                Err(cur) => off = cur,
            }
        }
    }

    unsafe fn commit(&self, addr: NonNull<u8>, nbytes: usize) -> bool {
        let a = addr.as_ptr() as usize;
        assert!(self.in_region(a, nbytes), "BoundedSource: commit outside reservations: {a:#x}+{nbytes:#x}");
        let call = self.commit_calls.fetch_add(1, Ordering::SeqCst) + 1;
        let fail_at = self.fail_commit_at.load(Ordering::SeqCst);
        let injected = (fail_at != 0 && call == fail_at) || self.fail_all.load(Ordering::SeqCst);
        if injected {
            self.fail_commit_at.store(0, Ordering::SeqCst);
            self.failed_commits.fetch_add(1, Ordering::SeqCst);
            return false;
        }
        // Budget check and charge in one step.
        let mut cur = self.committed_bytes.load(Ordering::SeqCst);
        loop {
            let new = match cur.checked_add(nbytes) {
                Some(n) if n <= self.budget_bytes.load(Ordering::SeqCst) => n,
                _ => {
                    self.failed_commits.fetch_add(1, Ordering::SeqCst);
                    return false;
                }
            };
            match self.committed_bytes.compare_exchange(cur, new, Ordering::SeqCst, Ordering::SeqCst) {
                Ok(_) => {
                    self.peak_committed_bytes.fetch_max(new, Ordering::SeqCst);
                    break;
                }
                Err(c) => cur = c,
            }
        }
        self.track(a, nbytes, true);
        #[cfg(feature = "std")]
        if self.mmapped {
            // SAFETY: the range is in our own mapping (checked above) and not in use (contract).
            let rc = unsafe { libc::mprotect(a as *mut libc::c_void, nbytes, libc::PROT_READ | libc::PROT_WRITE) };
            if rc != 0 {
                self.track(a, nbytes, false);
                self.committed_bytes.fetch_sub(nbytes, Ordering::SeqCst);
                self.failed_commits.fetch_add(1, Ordering::SeqCst);
                return false;
            }
            // Fresh or MADV_DONTNEEDed private anonymous pages read as zero.
            return true;
        }
        // SAFETY: region mode: the region is always accessible and the range is ours and unused.
        unsafe { core::ptr::write_bytes(a as *mut u8, 0, nbytes) };
        true
    }

    unsafe fn decommit(&self, addr: NonNull<u8>, nbytes: usize) {
        let a = addr.as_ptr() as usize;
        assert!(self.in_region(a, nbytes), "BoundedSource: decommit outside reservations: {a:#x}+{nbytes:#x}");
        self.track(a, nbytes, false);
        self.decommit_calls.fetch_add(1, Ordering::SeqCst);
        self.decommitted_bytes.fetch_add(nbytes, Ordering::SeqCst);
        self.committed_bytes.fetch_sub(nbytes, Ordering::SeqCst);
        #[cfg(feature = "std")]
        if self.mmapped {
            // SAFETY: the range is in our own mapping, committed and unused (contract).
            unsafe {
                libc::madvise(a as *mut libc::c_void, nbytes, libc::MADV_DONTNEED);
                libc::mprotect(a as *mut libc::c_void, nbytes, libc::PROT_NONE);
            }
            return;
        }
        // SAFETY: region mode: the range is ours and nothing uses it any more.
        unsafe { core::ptr::write_bytes(a as *mut u8, POISON_BYTE, nbytes) };
    }

    fn commit_zeroes(&self) -> bool {
        true
    }
}
