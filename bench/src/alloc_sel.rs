//! The allocator under test, chosen at build time by one `alloc-*` feature (see Cargo.toml).
//!
//! Each choice is a module `sel` with the same items:
//! - `GLOBAL`: the `#[global_allocator]`;
//! - `NAME`: the allocator's name in the results;
//! - `trim()`: the allocator's own "give memory back" call, if it has one (what a user would call), and
//!   its name;
//! - `background()`: goheap's scavenger step (other allocators: `None`);
//! - `stats()`: goheap's own MemStats figures (other allocators: empty).

/// The parts of a `sel` module that only goheap fills in: background work, scavenger steps, its own stats.
#[allow(unused_macros)] // unused when the goheap variant is built
macro_rules! peer_has_no_background {
    () => {
        pub fn background() -> Option<&'static str> {
            None
        }
        pub fn scavenger_steps() -> usize {
            0
        }
        pub fn stats() -> Vec<(&'static str, u64)> {
            Vec::new()
        }
    };
}

// Under `--cfg goheap_bench` exactly one `alloc-*` feature must be on.
#[cfg(goheap_bench)]
const _: () = {
    let n = cfg!(feature = "alloc-goheap") as usize
        + cfg!(feature = "alloc-system") as usize
        + cfg!(feature = "alloc-mimalloc") as usize
        + cfg!(feature = "alloc-jemalloc") as usize
        + cfg!(feature = "alloc-snmalloc") as usize
        + cfg!(feature = "alloc-rpmalloc") as usize
        + cfg!(feature = "alloc-talc") as usize
        + cfg!(feature = "alloc-llalloc") as usize
        + cfg!(feature = "alloc-buddy") as usize;
    assert!(n == 1, "goheap-bench: build with exactly one alloc-* feature (and --no-default-features)");
};

#[cfg(feature = "alloc-goheap")]
mod sel {
    #[global_allocator]
    pub static GLOBAL: goheap::Hosted = goheap::Hosted::new();
    pub const NAME: &str = "goheap";

    pub fn trim() -> Option<&'static str> {
        GLOBAL.release_all();
        Some("release_all()")
    }

    /// One unbounded step of goheap's background work (sweep every class, scavenge with no byte budget):
    /// what the scavenger thread of `Hosted::start_background` would reach after enough periods.
    pub fn background() -> Option<&'static str> {
        GLOBAL.background(usize::MAX, usize::MAX);
        Some("background(MAX, MAX)")
    }

    /// Steps of [`background`] after which the scavenger's retained goal no longer remembers the peak
    /// before the free (its window of recent in-use peaks has moved on), plus one epoch.
    pub fn scavenger_steps() -> usize {
        (goheap::page::heap::scavenger::PEAK_WINDOW_EPOCHS + 1) * goheap::page::heap::scavenger::CALLS_PER_EPOCH
    }

    pub fn stats() -> Vec<(&'static str, u64)> {
        let m = GLOBAL.mem_stats();
        vec![
            ("gh_heap_sys", m.heap_sys),
            ("gh_heap_inuse", m.heap_inuse),
            ("gh_heap_released", m.heap_released),
            ("gh_heap_alloc", m.heap_alloc),
            ("gh_sys", m.sys),
        ]
    }
}

#[cfg(all(not(feature = "alloc-goheap"), any(not(goheap_bench), feature = "alloc-system")))]
mod sel {
    #[global_allocator]
    pub static GLOBAL: std::alloc::System = std::alloc::System;
    pub const NAME: &str = "system";

    pub fn trim() -> Option<&'static str> {
        // SAFETY: glibc's malloc_trim has no preconditions.
        unsafe { libc::malloc_trim(0) };
        Some("malloc_trim(0)")
    }
    peer_has_no_background!();
}

#[cfg(all(goheap_bench, feature = "alloc-mimalloc"))]
mod sel {
    #[global_allocator]
    pub static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
    pub const NAME: &str = "mimalloc";

    extern "C" {
        fn mi_collect(force: bool);
    }
    pub fn trim() -> Option<&'static str> {
        // SAFETY: mimalloc's public API, linked in by libmimalloc-sys.
        unsafe { mi_collect(true) };
        Some("mi_collect(true)")
    }
    peer_has_no_background!();
}

#[cfg(all(goheap_bench, feature = "alloc-jemalloc"))]
mod sel {
    #[global_allocator]
    pub static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;
    pub const NAME: &str = "jemalloc";

    pub fn trim() -> Option<&'static str> {
        // 4096 is MALLCTL_ARENAS_ALL: purge every arena's dirty and muzzy pages.
        let name = b"arena.4096.purge\0";
        // SAFETY: a documented mallctl with no input or output.
        unsafe {
            tikv_jemalloc_sys::mallctl(
                name.as_ptr().cast(),
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                0,
            )
        };
        Some("mallctl(arena.<all>.purge)")
    }
    peer_has_no_background!();
}

#[cfg(all(goheap_bench, feature = "alloc-snmalloc"))]
mod sel {
    #[global_allocator]
    pub static GLOBAL: snmalloc_rs::SnMalloc = snmalloc_rs::SnMalloc;
    pub const NAME: &str = "snmalloc";
    pub fn trim() -> Option<&'static str> {
        None
    }
    peer_has_no_background!();
}

#[cfg(all(goheap_bench, feature = "alloc-rpmalloc"))]
mod sel {
    #[global_allocator]
    pub static GLOBAL: rpmalloc::RpMalloc = rpmalloc::RpMalloc;
    pub const NAME: &str = "rpmalloc";
    pub fn trim() -> Option<&'static str> {
        None
    }
    peer_has_no_background!();
}

/// The arena allocators (talc, linked_list_allocator, buddy_system_allocator) manage one region they are
/// given. They get a lazily mapped `ARENA_BYTES` region (MAP_NORESERVE: only touched pages cost memory),
/// claimed on the first allocation (std allocates before `main`).
#[cfg(all(goheap_bench, any(feature = "alloc-talc", feature = "alloc-llalloc", feature = "alloc-buddy")))]
mod arena {
    use std::alloc::{GlobalAlloc, Layout};
    use std::sync::atomic::{AtomicU8, Ordering};

    pub const ARENA_BYTES: usize = 16 << 30;

    pub trait Inner: Sync {
        type A: GlobalAlloc;
        /// # Safety
        /// Called once, with a fresh region of `size` bytes at `base`.
        unsafe fn init(&self, base: *mut u8, size: usize);
        fn get(&self) -> &Self::A;
    }

    pub struct Lazy<A> {
        pub inner: A,
        pub state: AtomicU8,
    }

    impl<A: Inner> Lazy<A> {
        #[inline]
        fn ensure(&self) {
            if self.state.load(Ordering::Acquire) == 2 {
                return;
            }
            self.slow_init();
        }
        #[cold]
        fn slow_init(&self) {
            if self.state.compare_exchange(0, 1, Ordering::AcqRel, Ordering::Acquire).is_ok() {
                // SAFETY: a fresh anonymous mapping; MAP_NORESERVE so untouched pages cost nothing.
                let p = unsafe {
                    libc::mmap(
                        std::ptr::null_mut(),
                        ARENA_BYTES,
                        libc::PROT_READ | libc::PROT_WRITE,
                        libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                        -1,
                        0,
                    )
                };
                if p == libc::MAP_FAILED {
                    std::process::abort();
                }
                // SAFETY: called once, with the fresh region.
                unsafe { self.inner.init(p.cast(), ARENA_BYTES) };
                self.state.store(2, Ordering::Release);
            } else {
                while self.state.load(Ordering::Acquire) != 2 {
                    std::hint::spin_loop();
                }
            }
        }
    }

    unsafe impl<A: Inner> GlobalAlloc for Lazy<A> {
        #[inline]
        unsafe fn alloc(&self, l: Layout) -> *mut u8 {
            self.ensure();
            unsafe { self.inner.get().alloc(l) }
        }
        #[inline]
        unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
            unsafe { self.inner.get().dealloc(p, l) }
        }
        #[inline]
        unsafe fn realloc(&self, p: *mut u8, l: Layout, n: usize) -> *mut u8 {
            unsafe { self.inner.get().realloc(p, l, n) }
        }
    }
}

#[cfg(all(goheap_bench, feature = "alloc-talc"))]
mod sel {
    use super::arena::{Inner, Lazy};
    use std::sync::atomic::AtomicU8;

    pub struct T(talc::Talck<spinning_top::RawSpinlock, talc::ErrOnOom>);
    impl Inner for T {
        type A = talc::Talck<spinning_top::RawSpinlock, talc::ErrOnOom>;
        unsafe fn init(&self, base: *mut u8, size: usize) {
            // SAFETY: the region is fresh and ours.
            let _ = unsafe { self.0.lock().claim(talc::Span::from_base_size(base, size)) };
        }
        fn get(&self) -> &Self::A {
            &self.0
        }
    }
    #[global_allocator]
    pub static GLOBAL: Lazy<T> = Lazy { inner: T(talc::Talc::new(talc::ErrOnOom).lock()), state: AtomicU8::new(0) };
    pub const NAME: &str = "talc";
    pub fn trim() -> Option<&'static str> {
        None
    }
    peer_has_no_background!();
}

#[cfg(all(goheap_bench, feature = "alloc-llalloc"))]
mod sel {
    use super::arena::{Inner, Lazy};
    use std::sync::atomic::AtomicU8;

    pub struct T(linked_list_allocator::LockedHeap);
    impl Inner for T {
        type A = linked_list_allocator::LockedHeap;
        unsafe fn init(&self, base: *mut u8, size: usize) {
            // SAFETY: the region is fresh and ours.
            unsafe { self.0.lock().init(base, size) };
        }
        fn get(&self) -> &Self::A {
            &self.0
        }
    }
    #[global_allocator]
    pub static GLOBAL: Lazy<T> = Lazy { inner: T(linked_list_allocator::LockedHeap::empty()), state: AtomicU8::new(0) };
    pub const NAME: &str = "llalloc";
    pub fn trim() -> Option<&'static str> {
        None
    }
    peer_has_no_background!();
}

#[cfg(all(goheap_bench, feature = "alloc-buddy"))]
mod sel {
    use super::arena::{Inner, Lazy};
    use std::sync::atomic::AtomicU8;

    /// Order 36: blocks up to 2^35 bytes, enough for the 16 GiB arena.
    pub struct T(buddy_system_allocator::LockedHeap<36>);
    impl Inner for T {
        type A = buddy_system_allocator::LockedHeap<36>;
        unsafe fn init(&self, base: *mut u8, size: usize) {
            // SAFETY: the region is fresh and ours.
            unsafe { self.0.lock().init(base as usize, size) };
        }
        fn get(&self) -> &Self::A {
            &self.0
        }
    }
    #[global_allocator]
    pub static GLOBAL: Lazy<T> =
        Lazy { inner: T(buddy_system_allocator::LockedHeap::<36>::empty()), state: AtomicU8::new(0) };
    pub const NAME: &str = "buddy";
    pub fn trim() -> Option<&'static str> {
        None
    }
    peer_has_no_background!();
}

/// goheap's global allocator itself, for its knobs (`callgrind-pair64`'s sampling settings).
#[cfg(feature = "alloc-goheap")]
pub use sel::GLOBAL;
pub use sel::{background, scavenger_steps, stats, trim, NAME};
