//! `Hosted`: goheap as a Linux program's `#[global_allocator]` (feature `std`).
//!
//! See `lib.rs` for an overview of the allocator.
//!
//! ```
//! #[global_allocator]
//! static GLOBAL: goheap::Hosted = goheap::Hosted::new();
//!
//! fn main() {
//!     // Everything the program allocates now goes through goheap.
//!     let v: Vec<u64> = (0..1000).collect();
//!     assert_eq!(v.iter().sum::<u64>(), 499_500);
//!
//!     // `Hosted` derefs to `Malloc`: Go's MemStats, the soft memory limit (GOMEMLIMIT), background work.
//!     let stats = GLOBAL.mem_stats();
//!     assert!(stats.heap_alloc >= 8 * 1000, "the vector's 8000 bytes are live");
//!     GLOBAL.set_memory_limit(512 << 20);
//!     GLOBAL.start_background(std::time::Duration::from_millis(10));
//! }
//! ```
//!
//! It is [`Malloc`] over the mmap page source with one cache slot per thread ([`ThreadSlots`]); bad frees
//! are printed to stderr without allocating and abort the process (a global allocator must not unwind).
//! The crate starts no thread by itself: call [`Hosted::start_background`] for a thread that runs the sweep
//! and the scavenger periodically, or call [`Malloc::background`] from a thread of your own.
//!
//! # `fork()`
//! A `Hosted` in static storage (a `#[global_allocator]`, any `static`) registers `pthread_atfork` handlers
//! at its first allocation: before a fork the forking thread takes every lock of every registered `Hosted`
//! (in each one's lock order: shared cache, central lists, heap), and releases them in the parent and in the
//! child after it. So the child, whose only thread is the forking one, never inherits a lock another thread
//! held, and can allocate. Slots of the parent's other threads stay taken in the child (see `cpu.rs`), and
//! pages the background scavenger was decommitting without the heap lock stay allocated there: both leak
//! in the child, bounded by what those threads cached. Up to [`MAX_FORK_SAFE`] allocators register; one on
//! the stack or the heap (it could move or be dropped) does not, and a fork in its presence is not
//! protected. An `atfork` prepare handler registered *before* goheap's runs after it and must not allocate
//! through goheap (the locks are held by then).
//!
//! # Knobs from the environment
//! At its first allocation through `GlobalAlloc` (for a `#[global_allocator]`: before `main`, when the
//! standard library sets itself up), a `Hosted` reads `GOMEMLIMIT` and `GODEBUG` with `getenv`, without
//! allocating, parses them ([`env`](mod@env)) and applies them before it serves that allocation; other threads that
//! allocate meanwhile wait for it. Malformed values are reported on stderr (one line each, written without
//! allocating) and ignored; unknown `GODEBUG` keys are ignored, as Go ignores them. Later changes to the
//! environment are not seen (use the methods instead).
//!
//! | variable | goheap | effect here |
//! |---|---|---|
//! | `GOMEMLIMIT=512MiB`, `off` | [`Malloc::set_memory_limit`] | the soft memory limit the scavenger steers by (Go's grammar: digits with an optional `B`, `KiB`, `MiB`, `GiB`, `TiB`) |
//! | `GODEBUG=memprofilerate=N` | [`Malloc::set_profile_rate`] | heap-profile sampling: one sample per N bytes on average, 0 off (`-1`: left alone) |
//! | `GODEBUG=efence=1` | `DebugFlags::EFENCE` and `harddecommit` | every allocation on pages of its own, ending at an inaccessible guard page, freed pages decommitted and never reused: an overrun or a use after free faults at once. Only before anything was allocated |
//! | `GODEBUG=harddecommit=1` | [`MmapSource::set_hard_decommit`] | released memory is also `mprotect(PROT_NONE)`: a use of it faults |
//! | `GODEBUG=madvdontneed=0` | [`MmapSource::set_lazy_free`] | release with `MADV_FREE` (RSS drops only under memory pressure); `1` (the default) `MADV_DONTNEED` |
//! | `GODEBUG=scavtrace=1` | `Malloc::set_scavtrace` with a standard-error sink | the scavenger's trace line on standard error, in Go's format: one per scavenger generation with work and one per `release_all` (ending in `(forced)`) |
//! | `GODEBUG=clobberfree=1` | feature `checks` | freed small objects are poisoned and verified when handed out again; always on with `checks`, unavailable without (reported) |

pub mod env;

#[cfg(feature = "pprof")]
pub mod pprof;

use crate::check::BadFree;
use crate::cpu::ThreadSlots;
use crate::malloc::Malloc;
use crate::source::mmap::MmapSource;
use crate::sync::atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering};
use core::alloc::{GlobalAlloc, Layout};
use core::fmt::Write;
use core::ops::Deref;
use std::time::Duration;

/// The hosted allocator: `Malloc<MmapSource, ThreadSlots>`, usable as `#[global_allocator]`.
pub struct Hosted(Malloc<MmapSource, ThreadSlots>, AtomicU8, EnvInit);

/// Whether the environment's knobs were applied (see the module docs): `ENV_*` and the reading thread.
struct EnvInit {
    state: AtomicU8,
    /// `pthread_self()` of the thread that claimed the reading (0: none yet); a signal handler that
    /// allocates on that thread must not wait for it.
    owner: AtomicUsize,
}

const ENV_UNREAD: u8 = 0;
const ENV_READING: u8 = 1;
const ENV_DONE: u8 = 2;

/// Writes `parts` to stderr without allocating (one `write` each; a report line is short).
fn eprint_parts(parts: &[&[u8]]) {
    for p in parts {
        // SAFETY: writes `p.len()` initialised bytes of `p` to fd 2.
        unsafe { libc::write(2, p.as_ptr().cast(), p.len()) };
    }
}

/// Applies `GODEBUG=scavtrace`: the scavenger's trace switch, its lines written to standard error as Go
/// writes them.
fn apply_scavtrace(m: &Malloc<MmapSource, ThreadSlots>, on: bool) {
    m.set_scavtrace(on);
    m.set_scavtrace_sink(on.then_some(stderr_scavtrace as crate::page::heap::scavenger::ScavTraceSink));
}

/// `CLOCK_MONOTONIC` in nanoseconds (the vDSO: no system call, no allocation, no lock of ours).
fn monotonic_nanos() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a valid, writable timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64).wrapping_mul(1_000_000_000).wrapping_add(ts.tv_nsec as u64)
}

/// A `scavtrace` line to standard error, formatted on the stack (no allocation).
fn stderr_scavtrace(line: &crate::page::heap::scavenger::ScavTrace) {
    struct Buf {
        bytes: [u8; 192],
        len: usize,
    }
    impl core::fmt::Write for Buf {
        fn write_str(&mut self, s: &str) -> core::fmt::Result {
            let end = self.len + s.len();
            if end > self.bytes.len() {
                return Err(core::fmt::Error);
            }
            self.bytes[self.len..end].copy_from_slice(s.as_bytes());
            self.len = end;
            Ok(())
        }
    }
    let mut b = Buf { bytes: [0; 192], len: 0 };
    if core::fmt::write(&mut b, format_args!("{line}\n")).is_ok() {
        eprint_parts(&[&b.bytes[..b.len]]);
    }
}

/// `Hosted` allocators that `fork()` protects at most (see the module docs).
pub const MAX_FORK_SAFE: usize = 8;

/// Fork registration state of a `Hosted` (its second field).
const FORK_UNKNOWN: u8 = 0;
const FORK_REGISTERING: u8 = 1;
const FORK_DONE: u8 = 2;

/// The allocators the atfork handlers lock: the first `len` entries.
struct ForkList {
    list: [*const Hosted; MAX_FORK_SAFE],
    len: usize,
}

// SAFETY: the pointers name `Hosted`s in static storage (checked before registering), which are `Sync` and
// live as long as the process.
unsafe impl Send for ForkList {}

/// The registered allocators. Its lock is taken first by the prepare handler and held across the fork.
static FORK_LIST: spin::mutex::SpinMutex<ForkList> =
    spin::mutex::SpinMutex::new(ForkList { list: [core::ptr::null(); MAX_FORK_SAFE], len: 0 });
static ATFORK_REGISTERED: AtomicBool = AtomicBool::new(false);

/// `pthread_atfork` prepare: takes the list's lock, then every lock of every registered allocator.
extern "C" fn fork_prepare() {
    let list = FORK_LIST.lock();
    for &h in &list.list[..list.len] {
        // SAFETY: registered pointers name `Hosted`s in static storage.
        unsafe { (*h).0.lock_all_for_fork() };
    }
    // Held until `fork_parent`/`fork_child`.
    core::mem::forget(list);
}

/// Releases what `fork_prepare` took (in the parent, or in the child where the forking thread is the only
/// one).
///
/// # Safety
/// `fork_prepare` ran on this thread (or, in the child, on the thread that forked) and nothing released
/// its locks since.
unsafe fn fork_release() {
    // SAFETY: the caller's contract: the list's lock is held by the forgotten guard of `fork_prepare`, so
    // nothing changes the list, and reading it through the lock's data pointer is ours to do.
    let list = unsafe { &*FORK_LIST.as_mut_ptr() };
    for &h in &list.list[..list.len] {
        // SAFETY: registered pointers name `Hosted`s in static storage, all locked by `fork_prepare`.
        unsafe { (*h).0.unlock_all_after_fork() };
    }
    // SAFETY: held by the forgotten guard of `fork_prepare`; released once.
    unsafe { FORK_LIST.force_unlock() };
}

extern "C" fn fork_parent() {
    // SAFETY: the C library calls it after `fork_prepare` on the forking thread.
    unsafe { fork_release() }
}

extern "C" fn fork_child() {
    // SAFETY: the C library calls it in the child after `fork_prepare` ran on the (same) forking thread.
    unsafe { fork_release() }
}

/// Whether `p` lies in the static storage of a loaded object (the executable or a shared library), where a
/// `Hosted` can neither move nor be dropped.
fn in_static_storage(p: *const Hosted) -> bool {
    // SAFETY: `Dl_info` is plain data; all-zero is a valid value for it.
    let mut info: libc::Dl_info = unsafe { core::mem::zeroed() };
    // SAFETY: `dladdr` only reads the loader's tables and writes `info`; it does not allocate.
    unsafe { libc::dladdr(p.cast(), &mut info) != 0 && !info.dli_fbase.is_null() }
}

/// A fixed buffer for formatting a report without allocating.
struct StackBuf {
    buf: [u8; 512],
    len: usize,
}

impl Write for StackBuf {
    fn write_str(&mut self, s: &str) -> core::fmt::Result {
        let n = s.len().min(self.buf.len() - self.len);
        self.buf[self.len..self.len + n].copy_from_slice(&s.as_bytes()[..n]);
        self.len += n;
        Ok(())
    }
}

fn abort_hook(b: &BadFree) -> ! {
    let mut out = StackBuf { buf: [0; 512], len: 0 };
    let _ = writeln!(out, "{b}");
    // SAFETY: writes `len` initialised bytes from our buffer to fd 2.
    unsafe { libc::write(2, out.buf.as_ptr().cast(), out.len) };
    std::process::abort()
}

impl Hosted {
    /// The allocator; nothing is reserved until the first allocation.
    pub const fn new() -> Self {
        Hosted(
            Malloc::new(MmapSource::new(), ThreadSlots::new()).with_report_hook(abort_hook),
            AtomicU8::new(FORK_UNKNOWN),
            EnvInit { state: AtomicU8::new(ENV_UNREAD), owner: AtomicUsize::new(0) },
        )
    }

    /// The general path of an allocation (`Malloc::alloc_or`): [`Hosted::first_use`], then `Malloc`'s. One
    /// function out of line, so the inlined fast path keeps no registers for it.
    #[inline(never)]
    fn alloc_slow<const ZERO: bool>(&self, layout: Layout) -> *mut u8 {
        self.first_use();
        self.0.alloc_general::<ZERO>(layout)
    }

    /// Everything a first allocation sets up: the environment's knobs, then the fork handlers. Called on
    /// the general path only ([`Hosted::alloc_slow`]): the first allocation always takes it, and the fast
    /// path pays nothing.
    #[inline(always)]
    fn first_use(&self) {
        if self.2.state.load(Ordering::Acquire) != ENV_DONE {
            self.read_env();
        }
        self.fork_safe();
    }

    /// Reads and applies `GOMEMLIMIT` and `GODEBUG` once (see the module docs); a thread that comes while
    /// another applies them waits, so no allocation is served before they apply.
    #[cold]
    fn read_env(&self) {
        // SAFETY: `pthread_self` has no preconditions.
        let me = unsafe { libc::pthread_self() } as usize;
        let e = &self.2;
        // Claiming is setting the owner, so a signal handler that allocates on the claiming thread sees it.
        if e.owner.compare_exchange(0, me, Ordering::Acquire, Ordering::Acquire).is_ok() {
            e.state.store(ENV_READING, Ordering::Relaxed);
            self.apply_env();
            e.state.store(ENV_DONE, Ordering::Release);
            return;
        }
        // Another thread applies them (getenv and the setters take no lock of ours: it cannot wait for us).
        // The same thread re-entering (a signal handler that allocates) goes on with what is applied so far.
        while e.state.load(Ordering::Acquire) != ENV_DONE && e.owner.load(Ordering::Relaxed) != me {
            // SAFETY: `sched_yield` has no preconditions.
            unsafe { libc::sched_yield() };
        }
    }

    /// Applies the environment's knobs now (see the module docs); called once, by `read_env`.
    fn apply_env(&self) {
        // The scavenger's clock: with it, background steps are paced to about 1% of one CPU (Go's
        // `scavengePercent`) and its CPU time is counted (`/cpu/classes/scavenge/total:cpu-seconds`).
        self.0.set_clock(Some(monotonic_nanos));
        if let Some(v) = env::getenv(c"GOMEMLIMIT") {
            match env::parse_memory_limit(v) {
                Some(n) => self.0.set_memory_limit(n),
                None => eprint_parts(&[
                    b"goheap: GOMEMLIMIT=",
                    &v[..v.len().min(64)],
                    b" is malformed (want digits with an optional B, KiB, MiB, GiB or TiB suffix, at most 2^63-1 \
                      bytes, or off); ignored\n",
                ]),
            }
        }
        let Some(v) = env::getenv(c"GODEBUG") else { return };
        let g = env::parse_godebug(v, |b| {
            eprint_parts(&[
                b"goheap: GODEBUG ",
                &b.key[..b.key.len().min(32)],
                b"=",
                &b.value[..b.value.len().min(32)],
                b": not an integer; ignored\n",
            ])
        });
        self.apply_godebug(&g);
    }

    /// Applies parsed `GODEBUG` settings (before the allocator has served anything, for `efence`).
    fn apply_godebug(&self, g: &env::Godebug) {
        let src = self.0.heap().source();
        if let Some(rate) = g.memprofilerate {
            self.0.set_profile_rate(rate);
        }
        if let Some(dontneed) = g.madvdontneed {
            src.set_lazy_free(!dontneed);
        }
        if let Some(hard) = g.harddecommit {
            src.set_hard_decommit(hard);
        }
        if g.efence == Some(true) {
            // The guard page must fault: released memory is made inaccessible.
            src.set_hard_decommit(true);
            let flags = self.0.debug_flags() | efence_flags();
            // SAFETY: called from `read_env` before this allocator serves its first allocation: every other
            // allocation through `GlobalAlloc` waits for it.
            if !unsafe { self.0.set_debug_before_use(flags) } {
                eprint_parts(&[b"goheap: GODEBUG efence=1: the allocator was already in use; ignored\n"]);
            }
        }
        if let Some(on) = g.scavtrace {
            apply_scavtrace(&self.0, on);
        }
        match g.clobberfree {
            Some(true) if !cfg!(feature = "checks") => {
                eprint_parts(&[b"goheap: GODEBUG clobberfree=1 needs goheap's feature checks; ignored\n"])
            }
            Some(false) if cfg!(feature = "checks") => {
                eprint_parts(&[b"goheap: GODEBUG clobberfree=0: always on with feature checks; ignored\n"])
            }
            _ => {}
        }
    }

    /// Registers the fork handlers for this allocator at its first allocation (see the module docs).
    #[inline(always)]
    fn fork_safe(&self) {
        if self.1.load(Ordering::Acquire) != FORK_DONE {
            self.register_fork();
        }
    }

    #[cold]
    fn register_fork(&self) {
        // One thread registers; others allocate meanwhile (the registration takes no goheap lock, and
        // waiting for it could deadlock with a thread that holds the loader's lock and allocates).
        if self.1.compare_exchange(FORK_UNKNOWN, FORK_REGISTERING, Ordering::Acquire, Ordering::Relaxed).is_err() {
            return;
        }
        if in_static_storage(self) {
            if !ATFORK_REGISTERED.swap(true, Ordering::AcqRel) {
                // Outside `FORK_LIST`'s lock: the C library runs the prepare handlers under a lock of its own
                // that `pthread_atfork` takes too.
                // SAFETY: the handlers are `extern "C"` functions that never unwind.
                let r = unsafe { libc::pthread_atfork(Some(fork_prepare), Some(fork_parent), Some(fork_child)) };
                if r != 0 {
                    ATFORK_REGISTERED.store(false, Ordering::Release);
                }
            }
            let mut list = FORK_LIST.lock();
            if list.len < MAX_FORK_SAFE {
                let n = list.len;
                list.list[n] = self;
                list.len = n + 1;
            }
        }
        #[cfg(feature = "pprof")]
        self.0.default_stack_hook(pprof::capture_stack);
        self.1.store(FORK_DONE, Ordering::Release);
    }

    /// Spawns a thread that calls [`Malloc::background`] every `period`, returning empty spans to the page
    /// heap and letting the scavenger give memory back to the OS.
    pub fn start_background(&'static self, period: Duration) -> std::thread::JoinHandle<()> {
        std::thread::Builder::new()
            .name("goheap-background".into())
            .spawn(move || loop {
                self.0.background(64, 1 << 20);
                std::thread::sleep(period);
            })
            .expect("spawn goheap background thread")
    }
}

/// The debug knobs `GODEBUG=efence=1` turns on: Go's efence (every object on pages of its own, freed pages
/// decommitted and their addresses never reused).
fn efence_flags() -> crate::DebugFlags {
    crate::DebugFlags::EFENCE
}

impl Default for Hosted {
    fn default() -> Self {
        Self::new()
    }
}

impl Deref for Hosted {
    type Target = Malloc<MmapSource, ThreadSlots>;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

// SAFETY: forwards to `Malloc`'s `GlobalAlloc` implementation, whose bad-free reports abort here.
unsafe impl GlobalAlloc for Hosted {
    #[inline]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        self.0.alloc_or::<false>(layout, |l| self.alloc_slow::<false>(l))
    }
    #[inline]
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        self.0.alloc_or::<true>(layout, |l| self.alloc_slow::<true>(l))
    }
    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded contract.
        unsafe { self.0.dealloc(ptr, layout) }
    }
    #[inline]
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: forwarded contract.
        unsafe { self.0.realloc(ptr, layout, new_size) }
    }
}

/// Prints the allocator (its statistics); the fork registration state is left out.
impl core::fmt::Debug for Hosted {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_tuple("Hosted").field(&self.0).finish()
    }
}
