//! CPU-index providers: which per-CPU cache the current code may use, and the guard that makes it exclusive.
//!
//! See `lib.rs` for an overview of the allocator.
//!
//! Go attaches its `mcache` to the P that runs the goroutine, and a P is held by one M at a time, so the
//! cache needs no lock. goheap has no scheduler to lean on; a [`CpuProvider`] supplies the same guarantee:
//! [`CpuProvider::enter`] names a dense cache index and returns a guard, and while that guard lives nothing
//! else on any CPU or thread may use the same index. The fast path then touches its cache with plain loads
//! and stores: no lock, no atomic read-modify-write.
//!
//! - In a kernel, the index comes from the APIC ID (through a table the kernel fills when it starts each
//!   CPU) and the guard keeps interrupts off, so an interrupt handler that allocates cannot re-enter the
//!   cache it interrupted (the Asterinas pattern: per-CPU operations take a token proving interrupts are off).
//! - On a host (`ThreadSlots`, feature `std`), user code cannot disable preemption and a thread may migrate
//!   between CPUs at any instruction, so a per-CPU index would not be exclusive. goheap instead gives each
//!   thread a *slot* of its own (claimed once with a compare-and-swap, released when the thread exits): a
//!   thread that migrates keeps its slot, so migration mid-operation is harmless. Threads beyond
//!   [`MAX_CPUS`] slots, and re-entrant calls, get `None` and use the shared, locked cache.
//!
//! Exclusivity invariant: for every index `i`, at most one live guard returned by `enter` or `enter_leaf`
//! has index `i`, and none while an adoption of `i` ([`CpuProvider::adopt`]) is in progress.
//!
//! Departed holders (host): a thread's slot is released by a pthread TSD destructor when the thread exits,
//! whatever the order of its TLS and TSD destructors; what the thread cached stays in the slot's caches,
//! counted by [`CpuProvider::departures`]. The next thread to claim the slot reuses those caches; until
//! then `Malloc::release_all` and `Malloc::background` *adopt* the free slot (claim it exclusively, as a
//! thread would) and flush their cache of it to the central lists. A thread that found every slot taken
//! tries again at its next general-path call after some slot was released.
//!
//! `fork()`: in the child only the forking thread runs; slots other threads held stay owned for good
//! (quarantined): such a thread may have been inside a lock-free fast path with its cache half-updated
//! when the parent forked, so no one may use or flush that cache in the child.
//!
//! Two kinds of section: [`CpuProvider::enter`] opens one that may call anything (the slow paths take locks,
//! call hooks and the page source, and a logger there may allocate), so the provider must turn a re-entrant
//! `enter` on the same CPU or thread into `None`. [`CpuProvider::enter_leaf`] opens a *leaf* section that
//! calls nothing (the fast paths: a few loads and stores on the cache), so nothing can re-enter it
//! synchronously and the provider may skip marking the index busy: it only has to refuse an index that an
//! open `enter` section holds. On a host that removes the thread-local store and restore around every fast
//! operation.
//!
//! # Interrupts and signals: the contract
//!
//! goheap takes a lock (the heap lock, a central list's lock, the shared cache's lock) or calls the page
//! source only inside the provider's guard, by construction: each lock is a [`GuardedMutex`], whose `lock`
//! asks for a [`Guarded`] token, the heap calls its source only with one, and only a live guard yields a
//! token ([`Malloc`](crate::Malloc) makes one from the guard of each entry point; every function that
//! locks or reaches the source takes it as a parameter, so a new path without the guard does not compile).
//! The fast paths take no lock and call nothing: they need no token. So, with a provider whose guard masks
//! interrupts on its CPU (`goheap::x86_64::IrqCpus`, `goheap::x86_64::IrqSingle`):
//!
//! - **Safe from an interrupt handler**: every public entry point of `Malloc` — `alloc`, `alloc_zeroed`,
//!   `dealloc`, `realloc` (every tier), the `GlobalAlloc` and `Allocator` methods, `background`,
//!   `release_all`, `flush_cpu_cache`, `set_memory_limit`, `validate`, the statistics, in every debug mode.
//!   A handler only runs on a CPU that holds no goheap lock, and a lock another CPU holds is released
//!   without waiting for anything on this one. The cost: interrupts stay off for a section of work; long
//!   operations (a large allocation's commits, the scavenger's decommits, `release_all`, a `background`
//!   step, limit reclaim, the reclaim before failing) run as many sections with interrupt windows between
//!   them, each kept under `page::heap::slice::IRQ_OFF_BOUND_INSNS` instructions where measured (see
//!   `slice.rs` and the README's interrupt-latency paragraph for the list). The scavenger's
//!   log line (through the `log` facade) is emitted after the guard ends, in the caller's context: a
//!   handler that calls `background` or `release_all` needs a logger that may run there.
//! - **Not safe**: NMI and machine-check handlers (they interrupt a guard, so they could spin on a lock
//!   their CPU holds), and any fault inside goheap (an allocator bug). The TLB shoot-down of
//!   `goheap::x86_64::FrameSource` may use an NMI because its handler does not allocate.
//! - [`NoCpuCache`] masks nothing: **not interrupt-safe**, only for tests and single-threaded tools.
//! - On a host, `ThreadSlots`' guard does not block signals: a signal handler that allocates is outside
//!   the contract, as for every `malloc` that is not async-signal-safe. A provider whose guard blocks the
//!   signals that allocate gives a host the kernel's contract (`tests/irq_model.rs` models interrupts so).

use core::marker::PhantomData;

/// Proof that the caller is inside a [`CpuProvider`] guard on this CPU or thread (see "Interrupts and
/// signals" in the module docs): the only key to goheap's locks ([`GuardedMutex::lock`]) and the page
/// source (the heap's `src`). Zero-sized and `Copy`; its lifetime `'g` ends no later than the guard it stands
/// for, and it is neither `Send` nor `Sync` (it speaks of one CPU or thread).
///
/// [`Malloc`](crate::Malloc) makes one from each guard it enters; code that uses the heap or the central
/// lists directly gets one from [`Malloc::with_guard`](crate::Malloc::with_guard) or, when it knows no
/// handler can call goheap on its CPU or thread, from [`Guarded::new_unchecked`].
#[derive(Clone, Copy)]
pub struct Guarded<'g> {
    _life: PhantomData<&'g ()>,
    _this_cpu: PhantomData<*const ()>,
}

impl<'g> Guarded<'g> {
    /// A token without a guard.
    ///
    /// # Safety
    /// Until `'g` ends, no interrupt or signal handler (or anything else asynchronous) that calls goheap may
    /// run on this CPU or thread: the caller holds a [`CpuProvider`] guard (interrupts off in a kernel, the
    /// signals whose handlers allocate blocked on a host), or it knows no such handler exists (a host thread
    /// with no allocating signal handler, a test, a single-threaded tool). Breaking this does not corrupt
    /// memory by itself; it lets a handler spin forever on a lock its own CPU holds, which in a kernel is
    /// as fatal. The compiler cannot check it, hence `unsafe`.
    #[inline(always)]
    pub const unsafe fn new_unchecked() -> Self {
        Guarded { _life: PhantomData, _this_cpu: PhantomData }
    }
}

impl core::fmt::Debug for Guarded<'_> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str("Guarded")
    }
}

/// A spin lock that can only be taken with a [`Guarded`] token: every goheap lock is one (the heap lock,
/// the central lists' locks, the shared cache's lock), so a path that forgot the CPU provider's guard does
/// not compile:
///
/// ```compile_fail
/// use goheap::cpu::GuardedMutex;
/// static M: GuardedMutex<u32> = GuardedMutex::new(0);
/// *M.lock() += 1; // no token: does not compile
/// ```
///
/// ```
/// use goheap::cpu::{Guarded, GuardedMutex};
/// static M: GuardedMutex<u32> = GuardedMutex::new(0);
/// // SAFETY: a doc test; no interrupt or signal handler calls goheap here.
/// let g = unsafe { Guarded::new_unchecked() };
/// *M.lock(g) += 1;
/// assert_eq!(*M.lock(g), 1);
/// ```
pub struct GuardedMutex<T> {
    inner: crate::sync::SpinMutex<T>,
}

impl<T> GuardedMutex<T> {
    /// An unlocked mutex holding `value`.
    pub const fn new(value: T) -> Self {
        GuardedMutex { inner: crate::sync::SpinMutex::new(value) }
    }

    /// Takes the lock, spinning while another CPU or thread holds it (a hosted waiter yields its time slice
    /// after a short spin: see `sync`'s "Waiting"). The lock guard cannot outlive the
    /// token, so it is released inside the CPU provider's guard.
    #[inline]
    pub fn lock<'a>(&'a self, _guarded: Guarded<'a>) -> crate::sync::SpinMutexGuard<'a, T> {
        self.inner.lock()
    }

    /// Takes the lock and keeps it (the lock guard is forgotten) until [`GuardedMutex::force_unlock`]: for
    /// `fork()`'s prepare step, which must hold every lock across the fork (see `hosted.rs`).
    #[cfg(feature = "std")]
    pub(crate) fn lock_and_keep(&self, _guarded: Guarded<'_>) {
        core::mem::forget(self.inner.lock());
    }

    /// Releases a lock kept by [`GuardedMutex::lock_and_keep`].
    ///
    /// # Safety
    /// `lock_and_keep` was called on this mutex and this is its one matching release (in a `fork()` child,
    /// by the thread that forked).
    #[cfg(feature = "std")]
    pub(crate) unsafe fn force_unlock(&self) {
        // SAFETY: the caller's contract: the lock is held by a forgotten guard of ours.
        unsafe { self.inner.force_unlock() }
    }

    /// Takes the lock if it is free, else `None` at once (for work that may be skipped, such as flushing
    /// the shared cache during a reclaim).
    #[inline]
    pub fn try_lock<'a>(&'a self, _guarded: Guarded<'a>) -> Option<crate::sync::SpinMutexGuard<'a, T>> {
        self.inner.try_lock()
    }
}

/// Prints only the type: the data is the lock holder's.
impl<T> core::fmt::Debug for GuardedMutex<T> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("GuardedMutex").finish_non_exhaustive()
    }
}

/// Number of per-CPU cache slots in every allocator (`MAX_CPUS = 1 << 6`).
pub const MAX_CPUS: usize = 1 << 6;

/// Supplies the current CPU's cache index and keeps it exclusive.
///
/// # Safety
///
/// Implementations must uphold the exclusivity invariant: while a guard returned by `enter` with index
/// `Some(i)` is alive, no other call to `enter` (on any CPU or thread, including a re-entrant call from an
/// interrupt or signal handler on the same CPU) returns `Some(i)`. The index must be `< MAX_CPUS`. Dropping
/// the guard ends the exclusive section and must make the section's writes visible to the next holder of the
/// index (an interrupt-off section on one CPU, or a Release/Acquire hand-over between threads, does this).
///
/// Interrupt safety (see "Interrupts and signals" in the module docs) is a further property of a provider,
/// not part of this contract: it holds when the guard of `enter` keeps every asynchronous caller of goheap
/// (interrupt handlers in a kernel) off the CPU or thread, with or without an index.
///
/// A provider works by value or by reference: `&P` is a provider whenever `P` is.
///
/// `adopt(i)` returns `true` only while no guard with index `i` is alive, and then no `enter`, `enter_leaf`
/// or `adopt` returns or takes `i` until `release_adopted(i)`; adoptions hand over writes as guards do.
///
/// # Example: one cache for whoever comes first
///
/// A provider with a single per-CPU cache, taken with a compare-and-swap: whoever holds it (a thread, or the
/// code an interrupt handler interrupted) keeps it until the guard drops, and every other caller, including a
/// re-entrant one, gets `None` and uses the shared, locked cache. It masks no interrupts, so like
/// [`NoCpuCache`] it is **not interrupt-safe**; a kernel's provider also turns interrupts off in `enter` and
/// `enter_leaf` and back on when the guard drops (as `goheap::x86_64::IrqSingle` does), and one with several
/// CPUs returns each CPU's own index.
///
/// ```
/// use core::sync::atomic::{AtomicBool, Ordering};
/// use goheap::cpu::CpuProvider;
///
/// struct OneSlot {
///     busy: AtomicBool,
/// }
///
/// /// Gives the slot back when dropped, handing the section's writes to the next holder.
/// struct Release<'a>(&'a AtomicBool);
///
/// impl Drop for Release<'_> {
///     fn drop(&mut self) {
///         self.0.store(false, Ordering::Release);
///     }
/// }
///
/// impl OneSlot {
///     fn take(&self) -> (Option<Release<'_>>, Option<usize>) {
///         match self.busy.compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed) {
///             Ok(_) => (Some(Release(&self.busy)), Some(0)),
///             Err(_) => (None, None),
///         }
///     }
/// }
///
/// // SAFETY: index 0 (< MAX_CPUS) is returned only by the exchange that set `busy`, which stays set until
/// // that guard drops, so no two live guards have it; the guard's Release store and the next holder's
/// // Acquire exchange hand the section's writes over.
/// unsafe impl CpuProvider for OneSlot {
///     type Guard<'a> = Option<Release<'a>>;
///     fn enter(&self) -> (Self::Guard<'_>, Option<usize>) {
///         self.take()
///     }
///     type LeafGuard<'a> = Option<Release<'a>>;
///     fn enter_leaf(&self) -> (Self::LeafGuard<'_>, Option<usize>) {
///         self.take()
///     }
/// }
///
/// let cpus = OneSlot { busy: AtomicBool::new(false) };
/// let (guard, index) = cpus.enter();
/// assert_eq!(index, Some(0));
/// assert_eq!(cpus.enter().1, None, "a nested call takes the shared cache");
/// drop(guard);
/// assert_eq!(cpus.enter_leaf().1, Some(0));
/// # #[cfg(feature = "std")] {
/// # use core::alloc::{GlobalAlloc, Layout};
/// // With any page source, e.g. the hosted one:
/// let heap = goheap::Malloc::new(goheap::source::mmap::MmapSource::new(), cpus);
/// let layout = Layout::new::<u64>();
/// // SAFETY: the layout's size is not zero.
/// let p = unsafe { heap.alloc(layout) };
/// assert!(!p.is_null());
/// // SAFETY: `p` is a live allocation of `layout` from `heap`.
/// unsafe { heap.dealloc(p, layout) };
/// # }
/// ```
pub unsafe trait CpuProvider: Sync {
    /// Held for the whole allocator operation; with an index, proof of its exclusive use. A kernel's guard
    /// keeps interrupts off, also when there is no index (so the shared cache's lock is never taken by an
    /// interrupt handler on a CPU that already holds it). It may borrow the provider.
    type Guard<'a>
    where
        Self: 'a;

    /// The guard and the current CPU's cache index, or `None` when no exclusive cache can be had now (not
    /// yet set up, re-entered, out of slots); the caller then uses the shared locked cache.
    fn enter(&self) -> (Self::Guard<'_>, Option<usize>);

    /// Held for a leaf section (see the module docs); with an index, proof of its exclusive use.
    type LeafGuard<'a>
    where
        Self: 'a;

    /// As [`CpuProvider::enter`], for a leaf section: the caller promises that until the guard drops it
    /// calls no code that could call back into the allocator on this CPU or thread. The provider still
    /// excludes other CPUs and threads, asynchronous re-entry it can prevent (a kernel keeps interrupts off
    /// here too), and an index held by an open `enter` section on this CPU or thread (returns `None` then).
    /// Asynchronous re-entry it cannot prevent (a host signal handler that allocates) is outside the
    /// contract, as it is for every `malloc` that is not async-signal-safe.
    fn enter_leaf(&self) -> (Self::LeafGuard<'_>, Option<usize>);

    /// How many times a holder of index `i` went away for good (a host thread that exited), leaving what
    /// the allocators cached under index `i` with nobody to flush it. The allocator compares it with the
    /// count it saw when it last flushed its cache `i` (see [`CpuProvider::adopt`]). A kernel's CPUs never go
    /// away: the default is always 0.
    #[inline]
    fn departures(&self, i: usize) -> u32 {
        let _ = i;
        0
    }

    /// Takes index `i` for a caller that is not its holder, if nobody holds it now: `true` then, and until
    /// [`CpuProvider::release_adopted`] the caller uses index `i`'s caches exclusively (to flush what a
    /// departed holder left there). The default never adopts.
    #[inline]
    fn adopt(&self, i: usize) -> bool {
        let _ = i;
        false
    }

    /// Ends an adoption: index `i` may be handed out again.
    ///
    /// # Safety
    ///
    /// The caller adopted `i` (`adopt(i)` returned `true`), has not released it since, and no longer uses
    /// index `i`'s caches.
    #[inline]
    unsafe fn release_adopted(&self, i: usize) {
        let _ = i;
    }
}

// SAFETY: forwards to `P`, which upholds the contract; the guards are `P`'s.
unsafe impl<'p, P: CpuProvider + ?Sized> CpuProvider for &'p P {
    type Guard<'a>
        = P::Guard<'p>
    where
        Self: 'a;
    #[inline(always)]
    fn enter(&self) -> (P::Guard<'p>, Option<usize>) {
        let p: &'p P = self;
        p.enter()
    }
    type LeafGuard<'a>
        = P::LeafGuard<'p>
    where
        Self: 'a;
    #[inline(always)]
    fn enter_leaf(&self) -> (P::LeafGuard<'p>, Option<usize>) {
        let p: &'p P = self;
        p.enter_leaf()
    }
    #[inline]
    fn departures(&self, i: usize) -> u32 {
        (**self).departures(i)
    }
    #[inline]
    fn adopt(&self, i: usize) -> bool {
        (**self).adopt(i)
    }
    #[inline]
    unsafe fn release_adopted(&self, i: usize) {
        // SAFETY: forwarded contract.
        unsafe { (**self).release_adopted(i) }
    }
}

/// A provider with no per-CPU caches: every operation goes through the shared, locked cache.
///
/// **Not interrupt-safe: only for tests and single-threaded tools.** Its guard masks nothing, so an
/// interrupt or signal handler that allocates while the interrupted code holds the shared cache's lock (or
/// any other goheap lock) spins forever. A kernel with one CPU uses
/// `goheap::x86_64::IrqSingle`, with several `goheap::x86_64::IrqCpus`.
#[derive(Clone, Copy, Debug, Default)]
pub struct NoCpuCache;

// SAFETY: `enter` never returns an index, so the exclusivity invariant holds trivially.
unsafe impl CpuProvider for NoCpuCache {
    type Guard<'a> = ();
    #[inline]
    fn enter(&self) -> ((), Option<usize>) {
        ((), None)
    }
    type LeafGuard<'a> = ();
    #[inline]
    fn enter_leaf(&self) -> ((), Option<usize>) {
        ((), None)
    }
}

#[cfg(all(feature = "std", loom))]
#[doc(hidden)]
pub use thread_slots::loom_thread_exit;
#[cfg(feature = "std")]
pub use thread_slots::ThreadSlots;

#[cfg(feature = "std")]
mod thread_slots {
    use super::{CpuProvider, MAX_CPUS};
    use crate::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
    use core::cell::Cell;

    /// Slot ownership, shared by every `ThreadSlots` in the process: `OWNED[i]` is true while a live thread
    /// holds slot `i`, or an allocator has adopted it (see [`CpuProvider::adopt`]). Set with compare-and-swap
    /// (Acquire) on claim and adoption, cleared (Release) on thread exit and at the end of an adoption.
    static OWNED: [AtomicBool; MAX_CPUS] = [const { AtomicBool::new(false) }; MAX_CPUS];

    /// `DEPARTURES[i]`: how many threads released slot `i` when they exited (bumped before the Release
    /// store that frees the slot). An allocator whose cache `i` was last flushed at another count holds an
    /// orphaned cache there.
    static DEPARTURES: [AtomicU32; MAX_CPUS] = [const { AtomicU32::new(0) }; MAX_CPUS];

    /// Slots freed so far (thread exits and ended adoptions): a thread that found no free slot retries when
    /// this changed.
    static RELEASES: AtomicUsize = AtomicUsize::new(0);

    /// The pthread key whose destructor releases a thread's slot, plus one (0: not created yet).
    #[cfg_attr(loom, allow(dead_code))]
    static KEY: AtomicUsize = AtomicUsize::new(0);

    /// Per-thread state, encoded in one word so the fast path is one TLS load and one store:
    /// `UNCLAIMED` (never tried), `NONE_LEFT_TAG | r` (all slots were taken when `RELEASES` was `r`, low
    /// bits: use the shared cache until a slot frees), `DEAD` (the slot was released at thread exit: use the
    /// shared cache), `CLAIMING` (a claim is in progress), else `slot | BUSY?`.
    const UNCLAIMED: usize = usize::MAX;
    const DEAD: usize = usize::MAX - 2;
    const CLAIMING: usize = usize::MAX - 3;
    /// Set while the thread is inside an exclusive section, so a re-entrant call (a logger that allocates)
    /// gets `None` instead of a second guard for the same slot.
    const BUSY: usize = 1 << 16;
    const NONE_LEFT_TAG: usize = 1 << 20;
    const NONE_LEFT_MASK: usize = NONE_LEFT_TAG - 1;

    #[cfg(not(loom))]
    std::thread_local! {
        // Const-initialised and without `Drop`: reading it never allocates or registers a destructor, and it
        // stays readable while the thread's TLS and pthread TSD destructors run.
        static STATE: Cell<usize> = const { Cell::new(UNCLAIMED) };
    }
    // Under loom (model checking, `tests/loom_thread_slots.rs`) each model thread has its own state.
    #[cfg(loom)]
    loom::thread_local! {
        static STATE: Cell<usize> = Cell::new(UNCLAIMED);
    }

    /// Under loom: what the pthread key's destructor does when the calling model thread exits (loom's
    /// threads are not OS threads, so no destructor runs for them).
    #[cfg(loom)]
    #[doc(hidden)]
    pub fn loom_thread_exit() {
        release_at_exit(core::ptr::null_mut());
    }

    /// Releases the slot of the calling thread, which is exiting (the pthread key's destructor).
    ///
    /// The slot is released by a pthread TSD destructor rather than a Rust TLS destructor because that works
    /// in whatever order the thread's destructors run: TLS destructors run first (and may allocate: they keep
    /// the slot), and a claim made by another TSD destructor sets the key again, which makes the C library
    /// run one more round of TSD destructors (up to `PTHREAD_DESTRUCTOR_ITERATIONS` = 4 rounds; only a first
    /// claim in the very last round would go unreleased).
    extern "C" fn release_at_exit(_: *mut libc::c_void) {
        let _ = STATE.try_with(|s| {
            let v = s.get();
            s.set(DEAD);
            if v < BUSY {
                // The slot's caches stay as they are: orphaned, for the next thread that claims the slot or for
                // an allocator's `release_all`/`background`, which adopt the slot to flush them.
                DEPARTURES[v].fetch_add(1, Ordering::Relaxed);
                OWNED[v].store(false, Ordering::Release);
                RELEASES.fetch_add(1, Ordering::Relaxed);
            }
        });
    }

    /// The pthread key that releases slots at thread exit, created on first use; `None` if the system has
    /// no key left.
    #[cfg_attr(loom, allow(dead_code))]
    fn key() -> Option<libc::pthread_key_t> {
        let k = KEY.load(Ordering::Acquire);
        if k != 0 {
            return Some((k - 1) as libc::pthread_key_t);
        }
        let mut key: libc::pthread_key_t = 0;
        // SAFETY: `key` is a valid out-pointer; the destructor is an `extern "C"` function that never unwinds.
        if unsafe { libc::pthread_key_create(&mut key, Some(release_at_exit)) } != 0 {
            return None;
        }
        match KEY.compare_exchange(0, key as usize + 1, Ordering::AcqRel, Ordering::Acquire) {
            Ok(_) => Some(key),
            Err(winner) => {
                // Another thread created the key first; ours was never used.
                // SAFETY: `key` is ours and holds no value on any thread.
                unsafe { libc::pthread_key_delete(key) };
                Some((winner - 1) as libc::pthread_key_t)
            }
        }
    }

    /// Host provider: one cache slot per thread (see the module docs for why not per CPU).
    #[derive(Clone, Copy, Debug, Default)]
    pub struct ThreadSlots;

    impl ThreadSlots {
        /// A provider; all instances share the process-wide slot table.
        pub const fn new() -> Self {
            ThreadSlots
        }

        /// Whether slot `i` is held now (by a live thread or an adoption). For tests and diagnostics.
        #[doc(hidden)]
        pub fn is_owned(i: usize) -> bool {
            i < MAX_CPUS && OWNED[i].load(Ordering::Acquire)
        }

        /// Slots held now. For tests and diagnostics.
        #[doc(hidden)]
        pub fn owned_count() -> usize {
            OWNED.iter().filter(|o| o.load(Ordering::Acquire)).count()
        }

        /// Claims a free slot for the calling thread; on success the thread's key is set so that its exit
        /// releases the slot. Leaves the state at the slot, `NONE_LEFT_TAG | releases` or `DEAD`.
        #[cold]
        fn claim(state: &Cell<usize>) -> Option<usize> {
            // Mark busy while claiming: `pthread_setspecific` may allocate (not through Rust's allocator in
            // glibc, but a re-entrant call must not claim twice anyway).
            state.set(CLAIMING);
            let releases = RELEASES.load(Ordering::Relaxed);
            // Under loom no pthread key: the model calls `loom_thread_exit` itself.
            #[cfg(not(loom))]
            let Some(key) = key() else {
                state.set(DEAD);
                return None;
            };
            for (i, owned) in OWNED.iter().enumerate() {
                if !owned.load(Ordering::Relaxed)
                    && owned.compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed).is_ok()
                {
                    // Any non-null value makes the key's destructor run at thread exit.
                    #[cfg(not(loom))]
                    // SAFETY: `key` is a live key; the value is never dereferenced.
                    if unsafe { libc::pthread_setspecific(key, core::ptr::dangling::<libc::c_void>()) } != 0 {
                        // Without the destructor the slot would leak at exit: give it back.
                        owned.store(false, Ordering::Release);
                        RELEASES.fetch_add(1, Ordering::Relaxed);
                        state.set(DEAD);
                        return None;
                    }
                    state.set(i);
                    return Some(i);
                }
            }
            state.set(NONE_LEFT_TAG | (releases & NONE_LEFT_MASK));
            None
        }
    }

    /// Clears the thread's busy mark when the exclusive section ends (if it had a slot).
    #[derive(Debug)]
    pub struct SlotGuard {
        slot: Option<usize>,
    }

    impl Drop for SlotGuard {
        #[inline]
        fn drop(&mut self) {
            if let Some(slot) = self.slot {
                let _ = STATE.try_with(|s| s.set(slot));
            }
        }
    }

    // SAFETY: a slot index is returned only to the thread that owns it (claimed by CAS on `OWNED`, released
    // only by the owning thread's exit after its state became `DEAD`), and only while that thread's BUSY
    // mark is clear; `enter`'s guard sets the mark, so a re-entrant call on the same thread gets `None`. A
    // leaf section leaves the mark alone: by its contract nothing runs on the thread until it ends, and it
    // gets `None` while an `enter` section holds the mark. `adopt` takes only a slot no thread owns, by the
    // same CAS, so no thread's state names it until the adoption ends. A slot passes between holders through
    // the Release stores that free it and the Acquire CAS that takes it.
    unsafe impl CpuProvider for ThreadSlots {
        type Guard<'a> = SlotGuard;

        #[inline]
        fn enter(&self) -> (SlotGuard, Option<usize>) {
            let slot = STATE
                .try_with(|s| {
                    let mut v = s.get();
                    if v >= BUSY {
                        let retry = v == UNCLAIMED
                            || (v & !NONE_LEFT_MASK == NONE_LEFT_TAG
                                && v & NONE_LEFT_MASK != RELEASES.load(Ordering::Relaxed) & NONE_LEFT_MASK);
                        if !retry {
                            return None;
                        }
                        v = Self::claim(s)?;
                    }
                    s.set(v | BUSY);
                    Some(v)
                })
                .ok()
                .flatten();
            (SlotGuard { slot }, slot)
        }

        type LeafGuard<'a> = ();

        /// One thread-local load: the slot if this thread has one and no `enter` section holds it; else
        /// `None` (also before the first claim: the general path claims).
        #[inline(always)]
        fn enter_leaf(&self) -> ((), Option<usize>) {
            let v = STATE.try_with(Cell::get).unwrap_or(DEAD);
            ((), if v < BUSY { Some(v) } else { None })
        }

        #[inline]
        fn departures(&self, i: usize) -> u32 {
            DEPARTURES.get(i).map_or(0, |d| d.load(Ordering::Relaxed))
        }

        fn adopt(&self, i: usize) -> bool {
            i < MAX_CPUS
                && !OWNED[i].load(Ordering::Relaxed)
                && OWNED[i].compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed).is_ok()
        }

        unsafe fn release_adopted(&self, i: usize) {
            OWNED[i].store(false, Ordering::Release);
            // A thread that found every slot taken (perhaps this one, adopted) tries again.
            RELEASES.fetch_add(1, Ordering::Relaxed);
        }
    }
}
