//! The synchronisation primitives goheap is built on: the atomics and the spin lock, swappable for loom's.
//!
//! See `lib.rs` for an overview of the allocator.
//!
//! Every module takes its atomics from here (`crate::sync::atomic`) and every lock is a `SpinMutex` (the
//! [`crate::cpu::GuardedMutex`]es), so one cfg switches the whole crate to a model checker's view:
//!
//! - normal builds: `atomic` is `core::sync::atomic`, and `SpinMutex` spins on a `core` atomic;
//! - `--cfg loom` (`cargo xtask test`'s model-checking step, `tests/loom_*.rs`): `atomic` holds wrappers of
//!   loom's atomics, and the lock spins on one of them and yields to loom's scheduler while it waits, so
//!   loom explores every interleaving of the real code (and every value a weak load may see).
//!
//! # Waiting (the lock's fairness)
//! A hosted thread (feature `std`) that finds the lock taken spins `SPINS_BEFORE_YIELD` times, then calls
//! `std::thread::yield_now` between attempts: on an overloaded host (more runnable threads than cores) the
//! holder may be preempted, and a waiter that only spins burns the time slices the holder needs, so a call
//! could wait for minutes (a 2-core soak with 80 threads saw one call take 109 s). In a kernel (no `std`) a
//! waiter only spins: it runs with interrupts off (the CPU provider's guard), where there is no one to yield
//! to, and the holder, with interrupts off too, is never preempted.
//!
//! # Under loom
//! loom's atomics have no `const fn new` and belong to one execution of the model, while goheap builds its
//! structures in `const fn`s and keeps some atomics in statics or in raw memory (a tiny span's block masks). So
//! under `cfg(loom)` each atomic type here is a small wrapper holding its initial value and a pointer to the
//! loom atomic, which is created on first use in each execution (a new `loom_model` iteration bumps a
//! generation; all-zero bytes are a valid wrapper of 0, as for the real atomics). Atomics the code forms
//! from raw addresses go through `raw_atomic`, which keeps them in a side table by address. Models must
//! run through `sync::loom_model` (or `sync::loom_builder_check`), which exist only under loom. loom counts
//! an atomic's creation as a plain write that every access must happen after, so a model first runs its
//! paths once on one thread before it spawns the others (`tests/loom_common`'s `warm_up`): the real atomics
//! are all initialised before the structure is shared.

#[cfg(not(loom))]
pub use core::sync::atomic;

/// Spins before a hosted waiter starts yielding its time slice (see "Waiting" in the module docs).
pub const SPINS_BEFORE_YIELD: u32 = 64;

use atomic::{AtomicBool, Ordering};
use core::cell::UnsafeCell;
use core::ops::{Deref, DerefMut};

/// A test-and-test-and-set spin lock; every goheap lock is one (through [`crate::cpu::GuardedMutex`]).
pub struct SpinMutex<T> {
    locked: AtomicBool,
    data: UnsafeCell<T>,
    /// Under loom: a cell every holder writes on taking the lock, so loom checks that successive holders
    /// are ordered by happens-before (what the lock's Acquire/Release must give the data).
    #[cfg(loom)]
    token: loom_impl::HolderCell,
}

// SAFETY: the lock hands out access to `T` to one holder at a time (Acquire on taking, Release on release),
// so sharing the lock shares `T` only across threads that may own it: `T: Send` suffices.
unsafe impl<T: Send> Sync for SpinMutex<T> {}
// SAFETY: moving the lock moves the `T`.
unsafe impl<T: Send> Send for SpinMutex<T> {}

/// The holder's access to a `SpinMutex`'s data; dropping it releases the lock.
pub struct SpinMutexGuard<'a, T> {
    lock: &'a SpinMutex<T>,
}

impl<T> SpinMutex<T> {
    /// An unlocked lock holding `value`.
    pub const fn new(value: T) -> Self {
        SpinMutex {
            locked: AtomicBool::new(false),
            data: UnsafeCell::new(value),
            #[cfg(loom)]
            token: loom_impl::HolderCell::new(),
        }
    }

    /// Takes the lock, waiting while someone else holds it (see "Waiting" in the module docs).
    #[inline]
    pub fn lock(&self) -> SpinMutexGuard<'_, T> {
        if let Some(g) = self.try_lock() {
            return g;
        }
        self.lock_slow()
    }

    #[cold]
    fn lock_slow(&self) -> SpinMutexGuard<'_, T> {
        let mut spins = 0u32;
        loop {
            // Test before test-and-set: waiters read the line shared instead of bouncing it.
            while self.locked.load(Ordering::Relaxed) {
                relax(&mut spins);
            }
            if let Some(g) = self.try_lock() {
                return g;
            }
        }
    }

    /// Takes the lock if it is free, else `None` at once.
    #[inline]
    pub fn try_lock(&self) -> Option<SpinMutexGuard<'_, T>> {
        match self.locked.compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed) {
            Ok(_) => {
                #[cfg(loom)]
                self.token.touch();
                Some(SpinMutexGuard { lock: self })
            }
            Err(_) => None,
        }
    }

    /// Whether the lock is held now (a racy hint, for diagnostics).
    pub fn is_locked(&self) -> bool {
        self.locked.load(Ordering::Relaxed)
    }

    /// Releases the lock without a guard.
    ///
    /// # Safety
    /// The lock is held by a guard that was forgotten (`core::mem::forget`), and nobody uses that guard's
    /// access any more.
    pub unsafe fn force_unlock(&self) {
        self.locked.store(false, Ordering::Release);
    }
}

/// One wait step of [`SpinMutex::lock`]: spin, and on a host yield after `SPINS_BEFORE_YIELD` spins.
#[inline]
fn relax(spins: &mut u32) {
    #[cfg(loom)]
    {
        let _ = spins;
        loom::thread::yield_now();
    }
    #[cfg(all(not(loom), feature = "std"))]
    {
        if *spins < SPINS_BEFORE_YIELD {
            *spins += 1;
            core::hint::spin_loop();
        } else {
            std::thread::yield_now();
        }
    }
    #[cfg(all(not(loom), not(feature = "std")))]
    {
        let _ = spins;
        core::hint::spin_loop();
    }
}

impl<T> Deref for SpinMutexGuard<'_, T> {
    type Target = T;
    fn deref(&self) -> &T {
        // SAFETY: the guard proves we hold the lock, so nobody else accesses the data.
        unsafe { &*self.lock.data.get() }
    }
}

impl<T> DerefMut for SpinMutexGuard<'_, T> {
    fn deref_mut(&mut self) -> &mut T {
        // SAFETY: as in `deref`, and `&mut self` makes this access unique among the holder's.
        unsafe { &mut *self.lock.data.get() }
    }
}

impl<T> Drop for SpinMutexGuard<'_, T> {
    fn drop(&mut self) {
        self.lock.locked.store(false, Ordering::Release);
    }
}

/// Prints only the type: the data is the holder's.
impl<T> core::fmt::Debug for SpinMutex<T> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("SpinMutex").finish_non_exhaustive()
    }
}

/// Prints only the type.
impl<T> core::fmt::Debug for SpinMutexGuard<'_, T> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("SpinMutexGuard").finish_non_exhaustive()
    }
}

/// The atomic at a raw address, which the code accesses only atomically (a tiny span's counts): a cast
/// in normal builds; under loom an entry of a side table, created with the bytes' current value.
///
/// # Safety
/// `addr` is aligned for `A` and the `size_of::<A>()` bytes there (of the real atomic's size, `N` bytes)
/// are live for `'static` as far as the caller uses the reference, and only accessed atomically.
#[cfg(not(loom))]
#[inline(always)]
pub unsafe fn raw_atomic<A>(addr: usize) -> &'static A {
    // SAFETY: the caller's contract.
    unsafe { &*(addr as *const A) }
}

#[cfg(loom)]
pub use self::loom_impl::{atomic, loom_builder_check, loom_forget_raw, loom_model, raw_atomic};

#[cfg(loom)]
mod loom_impl {
    extern crate std;
    use std::boxed::Box;
    use std::collections::HashMap;
    use std::sync::Mutex;

    /// The current model iteration (0: none yet, so an all-zero wrapper is never current).
    static GENERATION: core::sync::atomic::AtomicU64 = core::sync::atomic::AtomicU64::new(0);

    fn generation() -> u64 {
        GENERATION.load(core::sync::atomic::Ordering::Relaxed)
    }

    /// Runs `f` as a loom model (every interleaving), with a fresh generation of goheap's atomics for each
    /// iteration. Returns the number of iterations (executions) loom explored; a failing interleaving
    /// panics with loom's report.
    pub fn loom_model<F: Fn() + Sync + Send + 'static>(f: F) -> u64 {
        loom_builder_check(loom::model::Builder::new(), f)
    }

    /// As `loom_model` with a configured builder (a preemption bound, a branch limit).
    pub fn loom_builder_check<F: Fn() + Sync + Send + 'static>(b: loom::model::Builder, f: F) -> u64 {
        let first = generation();
        b.check(move || {
            GENERATION.fetch_add(1, core::sync::atomic::Ordering::Relaxed);
            f()
        });
        generation() - first
    }

    macro_rules! loom_atomic {
        ($name:ident, $t:ty) => {
            /// A loom atomic created lazily in each model iteration (see "Under loom" in `sync`'s docs).
            pub struct $name {
                init: $t,
                generation: core::sync::atomic::AtomicU64,
                real: core::sync::atomic::AtomicPtr<loom::sync::atomic::$name>,
            }

            impl $name {
                /// A new atomic holding `v`.
                pub const fn new(v: $t) -> Self {
                    $name {
                        init: v,
                        generation: core::sync::atomic::AtomicU64::new(0),
                        real: core::sync::atomic::AtomicPtr::new(core::ptr::null_mut()),
                    }
                }

                /// The loom atomic of this iteration. (loom runs all of a model's threads on one OS thread,
                /// so the wrapper's own bookkeeping is never raced.)
                #[track_caller]
                fn real(&self) -> &loom::sync::atomic::$name {
                    use core::sync::atomic::Ordering::Relaxed;
                    let g = generation();
                    if self.generation.load(Relaxed) != g || self.real.load(Relaxed).is_null() {
                        let a = Box::leak(Box::new(loom::sync::atomic::$name::new(self.init)));
                        self.real.store(a, Relaxed);
                        self.generation.store(g, Relaxed);
                    }
                    // SAFETY: leaked above, never freed.
                    unsafe { &*self.real.load(Relaxed) }
                }

                /// As the real atomic's.
                #[track_caller]
                pub fn load(&self, o: Ordering) -> $t {
                    self.real().load(o)
                }
                /// As the real atomic's.
                #[track_caller]
                pub fn store(&self, v: $t, o: Ordering) {
                    self.real().store(v, o)
                }
                /// As the real atomic's.
                #[track_caller]
                pub fn swap(&self, v: $t, o: Ordering) -> $t {
                    self.real().swap(v, o)
                }
                /// As the real atomic's.
                #[track_caller]
                pub fn compare_exchange(&self, c: $t, n: $t, s: Ordering, f: Ordering) -> Result<$t, $t> {
                    self.real().compare_exchange(c, n, s, f)
                }
                /// As the real atomic's (loom never fails it spuriously).
                #[track_caller]
                pub fn compare_exchange_weak(&self, c: $t, n: $t, s: Ordering, f: Ordering) -> Result<$t, $t> {
                    self.real().compare_exchange_weak(c, n, s, f)
                }
                /// As the real atomic's.
                #[track_caller]
                pub fn fetch_update<F: FnMut($t) -> Option<$t>>(
                    &self,
                    s: Ordering,
                    f: Ordering,
                    u: F,
                ) -> Result<$t, $t> {
                    self.real().fetch_update(s, f, u)
                }
            }

            impl Default for $name {
                fn default() -> Self {
                    Self::new(Default::default())
                }
            }

            impl core::fmt::Debug for $name {
                fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
                    f.debug_struct(stringify!($name)).finish_non_exhaustive()
                }
            }
        };
    }

    macro_rules! loom_atomic_int {
        ($name:ident, $t:ty) => {
            loom_atomic!($name, $t);
            impl $name {
                /// As the real atomic's.
                #[track_caller]
                pub fn fetch_add(&self, v: $t, o: Ordering) -> $t {
                    self.real().fetch_add(v, o)
                }
                /// As the real atomic's.
                #[track_caller]
                pub fn fetch_sub(&self, v: $t, o: Ordering) -> $t {
                    self.real().fetch_sub(v, o)
                }
                /// As the real atomic's.
                #[track_caller]
                pub fn fetch_or(&self, v: $t, o: Ordering) -> $t {
                    self.real().fetch_or(v, o)
                }
                /// As the real atomic's.
                #[track_caller]
                pub fn fetch_and(&self, v: $t, o: Ordering) -> $t {
                    self.real().fetch_and(v, o)
                }
                /// As the real atomic's.
                #[track_caller]
                pub fn fetch_max(&self, v: $t, o: Ordering) -> $t {
                    self.real().fetch_max(v, o)
                }
                /// As the real atomic's.
                #[track_caller]
                pub fn fetch_min(&self, v: $t, o: Ordering) -> $t {
                    self.real().fetch_min(v, o)
                }
            }
        };
    }

    /// The atomics, as `core::sync::atomic` names them (loom-backed wrappers).
    pub mod atomic {
        use super::generation;
        pub use core::sync::atomic::Ordering;
        use std::boxed::Box;

        loom_atomic!(AtomicBool, bool);
        impl AtomicBool {
            /// As the real atomic's.
            #[track_caller]
            pub fn fetch_or(&self, v: bool, o: Ordering) -> bool {
                self.real().fetch_or(v, o)
            }
            /// As the real atomic's.
            #[track_caller]
            pub fn fetch_and(&self, v: bool, o: Ordering) -> bool {
                self.real().fetch_and(v, o)
            }
        }
        loom_atomic_int!(AtomicU8, u8);
        loom_atomic_int!(AtomicI8, i8);
        loom_atomic_int!(AtomicU16, u16);
        loom_atomic_int!(AtomicU32, u32);
        loom_atomic_int!(AtomicU64, u64);
        loom_atomic_int!(AtomicUsize, usize);

        /// A loom `AtomicPtr` created lazily in each model iteration (see "Under loom" in `sync`'s docs).
        pub struct AtomicPtr<T> {
            init: *mut T,
            generation: core::sync::atomic::AtomicU64,
            real: core::sync::atomic::AtomicPtr<loom::sync::atomic::AtomicPtr<T>>,
        }

        // SAFETY: as `core::sync::atomic::AtomicPtr`: only the pointer value is shared, atomically.
        unsafe impl<T> Sync for AtomicPtr<T> {}
        // SAFETY: as above.
        unsafe impl<T> Send for AtomicPtr<T> {}

        impl<T> AtomicPtr<T> {
            /// A new atomic holding `v`.
            pub const fn new(v: *mut T) -> Self {
                AtomicPtr {
                    init: v,
                    generation: core::sync::atomic::AtomicU64::new(0),
                    real: core::sync::atomic::AtomicPtr::new(core::ptr::null_mut()),
                }
            }

            #[track_caller]
            fn real(&self) -> &loom::sync::atomic::AtomicPtr<T> {
                use core::sync::atomic::Ordering::Relaxed;
                let g = generation();
                if self.generation.load(Relaxed) != g || self.real.load(Relaxed).is_null() {
                    let a = Box::leak(Box::new(loom::sync::atomic::AtomicPtr::new(self.init)));
                    self.real.store(a, Relaxed);
                    self.generation.store(g, Relaxed);
                }
                // SAFETY: leaked above, never freed.
                unsafe { &*self.real.load(Relaxed) }
            }

            /// As the real atomic's.
            #[track_caller]
            pub fn load(&self, o: Ordering) -> *mut T {
                self.real().load(o)
            }
            /// As the real atomic's.
            #[track_caller]
            pub fn store(&self, v: *mut T, o: Ordering) {
                self.real().store(v, o)
            }
            /// As the real atomic's.
            #[track_caller]
            pub fn swap(&self, v: *mut T, o: Ordering) -> *mut T {
                self.real().swap(v, o)
            }
            /// As the real atomic's.
            #[track_caller]
            pub fn compare_exchange(&self, c: *mut T, n: *mut T, s: Ordering, f: Ordering) -> Result<*mut T, *mut T> {
                self.real().compare_exchange(c, n, s, f)
            }
        }

        impl<T> core::fmt::Debug for AtomicPtr<T> {
            fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
                f.debug_struct("AtomicPtr").finish_non_exhaustive()
            }
        }

        /// As `core::sync::atomic::fence`, in loom's model.
        pub fn fence(o: Ordering) {
            loom::sync::atomic::fence(o)
        }
    }

    /// A loom cell created lazily in each model iteration, written by each holder of a [`super::SpinMutex`].
    pub struct HolderCell {
        generation: core::sync::atomic::AtomicU64,
        real: core::sync::atomic::AtomicPtr<loom::cell::UnsafeCell<()>>,
    }

    impl HolderCell {
        /// A cell not created yet.
        pub const fn new() -> Self {
            HolderCell {
                generation: core::sync::atomic::AtomicU64::new(0),
                real: core::sync::atomic::AtomicPtr::new(core::ptr::null_mut()),
            }
        }

        /// A write by the new holder: loom reports a causality violation unless the previous holder's
        /// write happens before it.
        #[track_caller]
        pub fn touch(&self) {
            use core::sync::atomic::Ordering::Relaxed;
            let g = generation();
            if self.generation.load(Relaxed) != g || self.real.load(Relaxed).is_null() {
                let a = Box::leak(Box::new(loom::cell::UnsafeCell::new(())));
                self.real.store(a, Relaxed);
                self.generation.store(g, Relaxed);
            }
            // SAFETY: leaked above, never freed.
            unsafe { &*self.real.load(Relaxed) }.with_mut(|_| ());
        }
    }

    /// Side table of the atomics formed from raw addresses: `(generation, address) -> atomic`.
    static RAW: Mutex<Option<HashMap<usize, (u64, usize)>>> = Mutex::new(None);

    /// Under loom: the atomic of type `A` (one of [`atomic`]'s) standing for the bytes at `addr`, created
    /// on first use in this iteration with the value the bytes hold then (read as `N` bytes, `N` the real
    /// atomic's size, little-endian, zero-extended).
    ///
    /// # Safety
    /// As in normal builds: the bytes at `addr` are live and only accessed atomically (and through this).
    #[track_caller]
    pub unsafe fn raw_atomic<A: RawInit>(addr: usize) -> &'static A {
        let g = generation();
        let mut t = RAW.lock().unwrap_or_else(|e| e.into_inner());
        let map = t.get_or_insert_with(HashMap::new);
        match map.get(&addr) {
            Some(&(eg, p)) if eg == g => {
                // SAFETY: leaked when inserted.
                unsafe { &*(p as *const A) }
            }
            _ => {
                // SAFETY: the caller's contract: the bytes are live.
                let a: &'static A = Box::leak(Box::new(unsafe { A::from_bytes(addr) }));
                map.insert(addr, (g, a as *const A as usize));
                a
            }
        }
    }

    /// Under loom: forgets the side-table atomics of `[addr, addr + len)` (their bytes were rewritten
    /// non-atomically, as a fresh tiny span's counts are).
    pub fn loom_forget_raw(addr: usize, len: usize) {
        let mut t = RAW.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(map) = t.as_mut() {
            map.retain(|&a, _| !(addr..addr + len).contains(&a));
        }
    }

    /// Atomic types `raw_atomic` can stand for raw bytes.
    pub trait RawInit: Sized {
        /// The atomic holding the value of the bytes at `addr`.
        ///
        /// # Safety
        /// The bytes at `addr` are live.
        unsafe fn from_bytes(addr: usize) -> Self;
    }
    impl RawInit for atomic::AtomicU16 {
        unsafe fn from_bytes(addr: usize) -> Self {
            // SAFETY: the caller's contract.
            atomic::AtomicU16::new(unsafe { core::ptr::read_volatile(addr as *const u16) })
        }
    }
    impl RawInit for atomic::AtomicU32 {
        unsafe fn from_bytes(addr: usize) -> Self {
            // SAFETY: the caller's contract.
            atomic::AtomicU32::new(unsafe { core::ptr::read_volatile(addr as *const u32) })
        }
    }
}
