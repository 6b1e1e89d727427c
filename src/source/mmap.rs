//! The hosted page source: anonymous `mmap` on Linux (Go's `mem_linux.go`). Feature `std`.
//!
//! See `lib.rs` for an overview of the allocator.
//!
//! # Role
//! - `reserve` = `mmap(MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE)`, over-reserved by `align` and trimmed
//!   with `munmap` so the result is aligned (Go's `sysReserveAligned`). No memory is charged.
//! - Where the kernel overcommits (`vm.overcommit_memory` 0 or 1, the Linux default), the reservation is
//!   mapped `PROT_READ | PROT_WRITE` at once and `commit` only counts: an untouched page costs nothing, so
//!   making it accessible early is free, and it saves one `mprotect` per span (the fragmentation
//!   benchmark made 36 000 of them, three quarters of its system time; mimalloc and jemalloc map read-write
//!   too). Under strict accounting (`vm.overcommit_memory = 2`), where a read-write private mapping is
//!   charged in full, and for [`MmapSource::strict`], the reservation is `PROT_NONE` and
//!   `commit` = `mprotect(PROT_READ | PROT_WRITE)` (Go's `sysMap`). Either way fresh or `MADV_DONTNEED`ed
//!   private anonymous pages read as zero, so [`PageSource::commit_zeroes`] is `true` (unless `madvdontneed=0`,
//!   below).
//! - `decommit` = `madvise(MADV_DONTNEED)` (Go's `sysUnused`): the physical pages go back at once, the range
//!   stays mapped and reads as zero if touched again. With [`MmapSource::strict`] it is also
//!   `mprotect(PROT_NONE)`, so a use of decommitted memory faults (for tests). The default does not do that
//!   because alternating protections split the mapping into many VMAs and a fragmented heap could hit
//!   `vm.max_map_count`, after which `mprotect` fails and allocations would fail spuriously; `commit`'s
//!   `mprotect(RW)` of an already-RW range is a no-op that merges VMAs.
//! - Go's `GODEBUG` decommit knobs, set at run time before the memory is used (the hosted allocator reads
//!   them from the environment): [`MmapSource::set_hard_decommit`] (`harddecommit=1`: decommit also
//!   `mprotect(PROT_NONE)`s, and commit `mprotect(PROT_READ | PROT_WRITE)`s back, as [`MmapSource::strict`]
//!   does for decommitted memory) and [`MmapSource::set_lazy_free`] (`madvdontneed=0`: `MADV_FREE` instead
//!   of `MADV_DONTNEED`; the kernel takes the pages back only under memory pressure, so RSS drops late, and
//!   a page may keep its old contents: from then on `commit_zeroes` is `false`, for good, since pages
//!   decommitted so may be recommitted later; where the kernel lacks `MADV_FREE`, `MADV_DONTNEED` is used).
//!
//! - The guard operations (`guard`, `decommit_guard`, `commit_unguard`: guard pages and freed objects of
//!   the debug modes and of sampled guarded allocations) always `mprotect`, strict or not, so those pages
//!   fault in every mode; there are few of them (a bounded pool, or debug modes).
//!
//! # Invariants
//! `committed_bytes = sum(committed ranges)`, `reserved_bytes = sum(reserved ranges)` (atomic counters,
//! for statistics and tests). No locks: every call is one or two system calls plus an atomic add.

use core::ptr::NonNull;
use core::sync::atomic::{AtomicU8, AtomicUsize, Ordering};

use super::{PageSource, SOURCE_GRANULE};

/// How reservations are mapped (see the module docs): decided once per process from the overcommit mode.
const MODE_UNKNOWN: u8 = 0;
const MODE_RW: u8 = 1;
const MODE_PROT_NONE: u8 = 2;
static MODE: AtomicU8 = AtomicU8::new(MODE_UNKNOWN);

/// Whether reservations may be mapped read-write up front: `/proc/sys/vm/overcommit_memory` is not `2`.
/// Reads the file with plain system calls into a stack buffer (the allocator must not allocate).
fn reserve_rw() -> bool {
    let mode = MODE.load(Ordering::Relaxed);
    if mode != MODE_UNKNOWN {
        return mode == MODE_RW;
    }
    let path = b"/proc/sys/vm/overcommit_memory\0";
    let mut buf = [0u8; 4];
    // SAFETY: `path` is NUL-terminated; `read` writes at most `buf.len()` bytes into `buf`; the descriptor
    // is closed before returning.
    let n = unsafe {
        let fd = libc::open(path.as_ptr().cast(), libc::O_RDONLY | libc::O_CLOEXEC);
        if fd < 0 {
            -1
        } else {
            let n = libc::read(fd, buf.as_mut_ptr().cast(), buf.len());
            libc::close(fd);
            n
        }
    };
    // Unknown (no /proc): the cautious choice.
    let rw = n > 0 && buf[0] != b'2';
    MODE.store(if rw { MODE_RW } else { MODE_PROT_NONE }, Ordering::Relaxed);
    rw
}

/// Anonymous-mmap page source. Usable in a `static`.
#[derive(Debug)]
pub struct MmapSource {
    /// Reservations are `PROT_NONE`, and decommit also `mprotect(PROT_NONE)`s (see the module docs).
    strict: bool,
    /// Bytes currently committed through this source.
    committed_bytes: AtomicUsize,
    /// Bytes currently reserved through this source (never decreases: goheap keeps its reservations).
    reserved_bytes: AtomicUsize,
    /// `DECOMMIT_*` bits: the `GODEBUG` decommit knobs (see the module docs).
    decommit: AtomicU8,
}

/// Decommit also `mprotect(PROT_NONE)`s (Go's `harddecommit=1`).
const DECOMMIT_HARD: u8 = 1 << 0;
/// Decommit is `MADV_FREE` (Go's `madvdontneed=0`).
const DECOMMIT_LAZY: u8 = 1 << 1;
/// `MADV_FREE` was used (or enabled) once: committed memory no longer reads as zero for sure.
const DECOMMIT_LAZY_EVER: u8 = 1 << 2;

impl Default for MmapSource {
    fn default() -> Self {
        Self::new()
    }
}

impl MmapSource {
    /// The production source: read-write reservations where the kernel overcommits, decommit =
    /// `madvise(MADV_DONTNEED)` only.
    pub const fn new() -> Self {
        Self {
            strict: false,
            committed_bytes: AtomicUsize::new(0),
            reserved_bytes: AtomicUsize::new(0),
            decommit: AtomicU8::new(0),
        }
    }

    /// A checking source: uncommitted and decommitted memory is `PROT_NONE`, so stray uses fault.
    pub const fn strict() -> Self {
        Self {
            strict: true,
            committed_bytes: AtomicUsize::new(0),
            reserved_bytes: AtomicUsize::new(0),
            decommit: AtomicU8::new(0),
        }
    }

    /// Go's `GODEBUG=harddecommit=1`: decommitted memory is also made inaccessible (`PROT_NONE`), so a use of
    /// released memory faults; commit makes it read-write again. Costs two system calls per decommit and
    /// commit, and splits the mapping into more VMAs (see the module docs).
    pub fn set_hard_decommit(&self, on: bool) {
        if on {
            self.decommit.fetch_or(DECOMMIT_HARD, Ordering::Relaxed);
        } else {
            self.decommit.fetch_and(!DECOMMIT_HARD, Ordering::Relaxed);
        }
    }

    /// Go's `GODEBUG=madvdontneed=0` (`on`): decommit with `MADV_FREE` instead of `MADV_DONTNEED`. Once turned
    /// on, committed memory is no longer known to read as zero ([`PageSource::commit_zeroes`] is `false`
    /// from then on, even if turned off again).
    pub fn set_lazy_free(&self, on: bool) {
        if on {
            self.decommit.fetch_or(DECOMMIT_LAZY | DECOMMIT_LAZY_EVER, Ordering::Relaxed);
        } else {
            self.decommit.fetch_and(!DECOMMIT_LAZY, Ordering::Relaxed);
        }
    }

    /// Whether decommit also makes memory inaccessible (`strict`, or `harddecommit`).
    pub fn hard_decommit(&self) -> bool {
        self.strict || self.decommit.load(Ordering::Relaxed) & DECOMMIT_HARD != 0
    }

    /// Whether decommit uses `MADV_FREE`.
    pub fn lazy_free(&self) -> bool {
        self.decommit.load(Ordering::Relaxed) & DECOMMIT_LAZY != 0
    }

    /// Bytes currently committed.
    pub fn committed_bytes(&self) -> usize {
        self.committed_bytes.load(Ordering::Relaxed)
    }

    /// Bytes reserved so far.
    pub fn reserved_bytes(&self) -> usize {
        self.reserved_bytes.load(Ordering::Relaxed)
    }

    /// Whether reservations are mapped read-write up front (so `commit` makes no system call).
    pub fn maps_read_write(&self) -> bool {
        !self.strict && reserve_rw()
    }
}

// SAFETY: reservations are fresh private anonymous mappings nobody else knows of; after commit the whole
// range is RW (mapped so from the start, or made so by `mprotect`; zero-filled on first touch); decommit
// only touches the given range; no heap allocation happens
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
                if self.maps_read_write() { libc::PROT_READ | libc::PROT_WRITE } else { libc::PROT_NONE },
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
        if !self.maps_read_write() || self.hard_decommit() {
            // SAFETY: the caller guarantees the range lies in one of our reservations.
            let rc = unsafe { libc::mprotect(addr.as_ptr().cast(), nbytes, libc::PROT_READ | libc::PROT_WRITE) };
            if rc != 0 {
                return false;
            }
        }
        self.committed_bytes.fetch_add(nbytes, Ordering::Relaxed);
        true
    }

    unsafe fn decommit(&self, addr: NonNull<u8>, nbytes: usize) {
        // SAFETY: the caller guarantees the range is ours, committed and unused; dropping its contents and
        // (strict) its access rights affects nothing else.
        unsafe {
            if !self.lazy_free() || libc::madvise(addr.as_ptr().cast(), nbytes, libc::MADV_FREE) != 0 {
                libc::madvise(addr.as_ptr().cast(), nbytes, libc::MADV_DONTNEED);
            }
            if self.hard_decommit() {
                libc::mprotect(addr.as_ptr().cast(), nbytes, libc::PROT_NONE);
            }
        }
        self.committed_bytes.fetch_sub(nbytes, Ordering::Relaxed);
    }

    unsafe fn guard(&self, addr: NonNull<u8>, nbytes: usize) {
        if self.maps_read_write() {
            // SAFETY: the caller guarantees the range is ours and not committed (unused).
            unsafe { libc::mprotect(addr.as_ptr().cast(), nbytes, libc::PROT_NONE) };
        }
    }

    unsafe fn decommit_guard(&self, addr: NonNull<u8>, nbytes: usize) {
        // SAFETY: forwarded contract; the range is ours and unused, so removing its access rights affects
        // nothing else.
        unsafe {
            self.decommit(addr, nbytes);
            libc::mprotect(addr.as_ptr().cast(), nbytes, libc::PROT_NONE);
        }
    }

    unsafe fn commit_unguard(&self, addr: NonNull<u8>, nbytes: usize) -> bool {
        // SAFETY: the caller guarantees the range lies in one of our reservations and is not committed.
        let rc = unsafe { libc::mprotect(addr.as_ptr().cast(), nbytes, libc::PROT_READ | libc::PROT_WRITE) };
        if rc != 0 {
            return false;
        }
        self.committed_bytes.fetch_add(nbytes, Ordering::Relaxed);
        true
    }

    fn commit_zeroes(&self) -> bool {
        self.decommit.load(Ordering::Relaxed) & DECOMMIT_LAZY_EVER == 0
    }
}
