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
//! - On a host ([`ThreadSlots`], feature `std`), user code cannot disable preemption and a thread may migrate
//!   between CPUs at any instruction, so a per-CPU index would not be exclusive. goheap instead gives each
//!   thread a *slot* of its own (claimed once with a compare-and-swap, released when the thread exits): a
//!   thread that migrates keeps its slot, so migration mid-operation is harmless. Threads beyond
//!   [`MAX_CPUS`] slots, and re-entrant calls, get `None` and use the shared, locked cache.
//!
//! Exclusivity invariant: for every index `i`, at most one live guard returned by `enter` or `enter_leaf`
//! has index `i`.
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
//!   without waiting for anything on this one. The cost: interrupts stay off for a whole operation, so a
//!   `background` step is bounded by its budget, and `release_all` (everything at once) belongs where
//!   latency does not matter. The scavenger's log line (through the `log` facade) is emitted after the
//!   guard ends, in the caller's context: a handler that calls `background` or `release_all` needs a
//!   logger that may run there.
//! - **Not safe**: NMI and machine-check handlers (they interrupt a guard, so they could spin on a lock
//!   their CPU holds), and any fault inside goheap (an allocator bug). The TLB shoot-down of
//!   `goheap::x86_64::FrameSource` may use an NMI because its handler does not allocate.
//! - [`NoCpuCache`] masks nothing: **not interrupt-safe**, only for tests and single-threaded tools.
//! - On a host, [`ThreadSlots`]' guard does not block signals: a signal handler that allocates is outside
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
    inner: spin::Mutex<T>,
}

impl<T> GuardedMutex<T> {
    /// An unlocked mutex holding `value`.
    pub const fn new(value: T) -> Self {
        GuardedMutex { inner: spin::Mutex::new(value) }
    }

    /// Takes the lock, spinning while another CPU or thread holds it. The lock guard cannot outlive the
    /// token, so it is released inside the CPU provider's guard.
    #[inline]
    pub fn lock<'a>(&'a self, _guarded: Guarded<'a>) -> spin::MutexGuard<'a, T> {
        self.inner.lock()
    }

    /// Takes the lock if it is free, else `None` at once (for work that may be skipped, such as flushing
    /// the shared cache during a reclaim).
    #[inline]
    pub fn try_lock<'a>(&'a self, _guarded: Guarded<'a>) -> Option<spin::MutexGuard<'a, T>> {
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

#[cfg(feature = "std")]
pub use thread_slots::ThreadSlots;

#[cfg(feature = "std")]
mod thread_slots {
    use super::{CpuProvider, MAX_CPUS};
    use core::cell::Cell;
    use core::sync::atomic::{AtomicBool, Ordering};

    /// Slot ownership, shared by every `ThreadSlots` in the process: `OWNED[i]` is true while a live thread
    /// holds slot `i`. Set with compare-and-swap (Acquire) on claim, cleared (Release) on thread exit.
    static OWNED: [AtomicBool; MAX_CPUS] = [const { AtomicBool::new(false) }; MAX_CPUS];

    /// Per-thread state, encoded in one word so the fast path is one TLS load and one store:
    /// `UNCLAIMED` (never tried), `NONE_LEFT` (all slots were taken: use the shared cache),
    /// `DEAD` (thread is exiting: use the shared cache), else `slot | BUSY?`.
    const UNCLAIMED: usize = usize::MAX;
    const NONE_LEFT: usize = usize::MAX - 1;
    const DEAD: usize = usize::MAX - 2;
    /// Set while the thread is inside an exclusive section, so a re-entrant call (a logger that allocates,
    /// a TLS destructor registration) gets `None` instead of a second guard for the same slot.
    const BUSY: usize = 1 << 16;

    std::thread_local! {
        // Const-initialised and without `Drop`: reading it never allocates or registers a destructor.
        static STATE: Cell<usize> = const { Cell::new(UNCLAIMED) };
        // Touched once, when a slot is claimed, only to get a destructor that releases the slot.
        static RELEASER: Releaser = const { Releaser };
    }

    struct Releaser;
    impl Drop for Releaser {
        fn drop(&mut self) {
            let _ = STATE.try_with(|s| {
                let v = s.get();
                s.set(DEAD);
                if v < BUSY {
                    // Objects and spans cached in the slot stay there for the next thread that claims it.
                    OWNED[v].store(false, Ordering::Release);
                }
            });
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

        #[cold]
        fn claim(state: &Cell<usize>) -> Option<usize> {
            // Mark busy while claiming: registering the releaser's destructor may allocate.
            state.set(NONE_LEFT);
            for (i, owned) in OWNED.iter().enumerate() {
                if !owned.load(Ordering::Relaxed)
                    && owned.compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed).is_ok()
                {
                    if RELEASER.try_with(|_| ()).is_err() {
                        // TLS is being torn down: give the slot back at once.
                        owned.store(false, Ordering::Release);
                        state.set(DEAD);
                        return None;
                    }
                    state.set(i);
                    return Some(i);
                }
            }
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
    // gets `None` while an `enter` section holds the mark. A slot passes between threads through the
    // Release store in `Releaser::drop` and the Acquire CAS in `claim`.
    unsafe impl CpuProvider for ThreadSlots {
        type Guard<'a> = SlotGuard;

        #[inline]
        fn enter(&self) -> (SlotGuard, Option<usize>) {
            let slot = STATE
                .try_with(|s| {
                    let mut v = s.get();
                    if v >= BUSY {
                        if v != UNCLAIMED {
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
    }
}
