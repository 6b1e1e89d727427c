//! The hosted page source: anonymous `mmap` on Linux (Go's `mem_linux.go`). Feature `std`.
//!
//! See `lib.rs` for an overview of the allocator.
//!
//! # Role
//! - `reserve` = `mmap(PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE)`, over-reserved by `align`
//!   and trimmed with `munmap` so the result is aligned (Go's `sysReserveAligned`). No memory is charged.
//! - `commit` = `mprotect(PROT_READ | PROT_WRITE)` (Go's `sysMap`). Fresh or `MADV_DONTNEED`ed private
//!   anonymous pages read as zero, so [`PageSource::commit_zeroes`] is `true`.
//! - `decommit` = `madvise(MADV_DONTNEED)` (Go's `sysUnused`): the physical pages go back at once, the range
//!   stays mapped and reads as zero if touched again. With [`MmapSource::strict`] it is also
//!   `mprotect(PROT_NONE)`, so a use of decommitted memory faults (for tests). The default does not do that
//!   because alternating protections split the mapping into many VMAs and a fragmented heap could hit
//!   `vm.max_map_count`, after which `mprotect` fails and allocations would fail spuriously; `commit`'s
//!   `mprotect(RW)` of an already-RW range is a no-op that merges VMAs.
//!
//! # Invariants
//! `committed_bytes = sum(committed ranges)`, `reserved_bytes = sum(reserved ranges)` (atomic counters,
//! for statistics and tests). No locks: every call is one or two system calls plus an atomic add.

use core::ptr::NonNull;
use core::sync::atomic::{AtomicUsize, Ordering};

use super::{PageSource, SOURCE_GRANULE};

/// Anonymous-mmap page source. Usable in a `static`.
pub struct MmapSource {
    /// Also `mprotect(PROT_NONE)` on decommit (see the module docs).
    strict: bool,
    /// Bytes currently committed through this source.
    committed_bytes: AtomicUsize,
    /// Bytes currently reserved through this source (never decreases: goheap keeps its reservations).
    reserved_bytes: AtomicUsize,
}

impl Default for MmapSource {
    fn default() -> Self {
        Self::new()
    }
}

impl MmapSource {
    /// The production source: decommit = `madvise(MADV_DONTNEED)` only.
    pub const fn new() -> Self {
        Self { strict: false, committed_bytes: AtomicUsize::new(0), reserved_bytes: AtomicUsize::new(0) }
    }

    /// A checking source: decommitted memory also becomes `PROT_NONE`, so stray uses fault.
    pub const fn strict() -> Self {
        Self { strict: true, committed_bytes: AtomicUsize::new(0), reserved_bytes: AtomicUsize::new(0) }
    }

    /// Bytes currently committed.
    pub fn committed_bytes(&self) -> usize {
        self.committed_bytes.load(Ordering::Relaxed)
    }

    /// Bytes reserved so far.
    pub fn reserved_bytes(&self) -> usize {
        self.reserved_bytes.load(Ordering::Relaxed)
    }
}

// SAFETY: reservations are fresh private anonymous mappings nobody else knows of; commit makes the whole
// range RW (zero-filled on first touch); decommit only touches the given range; no heap allocation happens
// here (only system calls and atomics), and all state is atomic, so it is Sync.
unsafe impl PageSource for MmapSource {
    fn reserve(&self, nbytes: usize, align: usize) -> Option<NonNull<u8>> {
        if nbytes == 0 || nbytes % SOURCE_GRANULE != 0 || !align.is_power_of_two() {
            return None;
        }
        let align = align.max(SOURCE_GRANULE);
        let len = nbytes.checked_add(align)?;
        // SAFETY: an anonymous mapping with a null hint touches no existing memory.
        let p = unsafe {
            libc::mmap(
                core::ptr::null_mut(),
                len,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return None;
        }
        let start = p as usize;
        let aligned = (start + align - 1) & !(align - 1);
        let head = aligned - start;
        let tail = len - head - nbytes;
        // SAFETY: both trimmed pieces are parts of the mapping made just above and unused.
        unsafe {
            if head != 0 {
                libc::munmap(p, head);
            }
            if tail != 0 {
                libc::munmap((aligned + nbytes) as *mut libc::c_void, tail);
            }
        }
        self.reserved_bytes.fetch_add(nbytes, Ordering::Relaxed);
        NonNull::new(aligned as *mut u8)
    }

    unsafe fn commit(&self, addr: NonNull<u8>, nbytes: usize) -> bool {
        // SAFETY: the caller guarantees the range lies in one of our reservations.
        let rc = unsafe {
            libc::mprotect(addr.as_ptr().cast(), nbytes, libc::PROT_READ | libc::PROT_WRITE)
        };
        if rc != 0 {
            return false;
        }
        self.committed_bytes.fetch_add(nbytes, Ordering::Relaxed);
        true
    }

    unsafe fn decommit(&self, addr: NonNull<u8>, nbytes: usize) {
        // SAFETY: the caller guarantees the range is ours, committed and unused; dropping its contents and
        // (strict) its access rights affects nothing else.
        unsafe {
            libc::madvise(addr.as_ptr().cast(), nbytes, libc::MADV_DONTNEED);
            if self.strict {
                libc::mprotect(addr.as_ptr().cast(), nbytes, libc::PROT_NONE);
            }
        }
        self.committed_bytes.fetch_sub(nbytes, Ordering::Relaxed);
    }

    fn commit_zeroes(&self) -> bool {
        true
    }
}
