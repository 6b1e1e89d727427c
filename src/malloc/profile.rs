//! Heap-profile sampling (Go's `MemProfileRate`): the per-CPU countdown, the draw of the next sampling
//! distance and the record of a sample.
//!
//! See `lib.rs` for an overview of the allocator and `malloc/mod.rs` for the guards and locks.

use super::*;

/// A heap-profile sample (Go's `MemProfile` records, without stacks: a kernel's hook can walk its own).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProfileSample {
    /// Address of the sampled allocation.
    pub addr: usize,
    /// Requested size in bytes.
    pub size: usize,
    /// Size class (0: large, `NUM_SIZE_CLASSES`: tiny).
    pub class: usize,
    /// Cache index of the allocating CPU.
    pub cpu: u16,
}

/// A heap-profile hook, called outside every allocator lock and guard.
pub type ProfileHook = fn(&ProfileSample);

/// Allocation profile of one bucket (a size class, the tiny class, or large objects): sampled counts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProfileBucket {
    /// Sampled allocations.
    pub samples: u64,
    /// Bytes of the sampled allocations.
    pub sampled_bytes: u64,
}

/// Go's default `MemProfileRate`: one sample per 512 KiB allocated on average.
pub const DEFAULT_PROFILE_RATE: usize = 512 << 10;

/// Largest profile rate: `2 * rate` (the draw's range) still fits the countdown, a non-negative `isize`
/// (2^62 on 64-bit targets). [`Malloc::set_profile_rate`] clamps to it.
pub(super) const MAX_PROFILE_RATE: usize = (isize::MAX as usize >> 1) + 1;

/// With profiling off, a CPU rechecks the rate after this many bytes.
pub(super) const PROFILE_RECHECK_BYTES: isize = 64 << 20;

pub(super) struct Profiler {
    /// Mean bytes between samples; 0 = off.
    pub(super) rate: AtomicUsize,
    /// `ProfileHook` or null.
    pub(super) hook: AtomicPtr<()>,
    /// Per route bucket: classes, tiny (`TINY_CLASS`), large (`NUM_ALLOC_CLASSES`).
    pub(super) samples: [AtomicU64; NUM_ALLOC_CLASSES + 1],
    pub(super) sampled_bytes: [AtomicU64; NUM_ALLOC_CLASSES + 1],
}

impl<S: PageSource, P: CpuProvider> Malloc<S, P> {
    /// Sets the heap-profile sampling rate (Go's `MemProfileRate`): on average one sample per `rate` bytes
    /// allocated; 0 turns sampling off. Each CPU picks a change up at its next sample (or within 64 MiB of
    /// allocation when sampling was off), so set it early for an exact rate.
    /// Rates above 2^62 (2^30 on 32-bit targets) are clamped to it: the draw needs `2 * rate` to fit the
    /// countdown, a non-negative `isize`.
    pub fn set_profile_rate(&self, rate: usize) {
        self.profiler.rate.store(rate.min(MAX_PROFILE_RATE), Ordering::Relaxed);
    }

    /// Calls `hook` for every sample (outside every allocator lock and guard; the hook may allocate).
    pub fn set_profile_hook(&self, hook: Option<ProfileHook>) {
        let p = hook.map_or(ptr::null_mut(), |h| h as *mut ());
        self.profiler.hook.store(p, Ordering::Release);
    }

    /// The allocation profile by bucket: index = size class, `NUM_SIZE_CLASSES` = tiny objects,
    /// `NUM_SIZE_CLASSES + 1` = large objects.
    pub fn profile(&self) -> [ProfileBucket; NUM_ALLOC_CLASSES + 1] {
        let mut out = [ProfileBucket::default(); NUM_ALLOC_CLASSES + 1];
        for (i, b) in out.iter_mut().enumerate() {
            b.samples = self.profiler.samples[i].load(Ordering::Relaxed);
            b.sampled_bytes = self.profiler.sampled_bytes[i].load(Ordering::Relaxed);
        }
        out
    }

    /// Counts `size` bytes against the cache's sampling countdown; true when this allocation is sampled.
    #[inline(always)]
    pub(super) fn count_sample(&self, c: &mut CpuCache, size: usize) -> bool {
        c.next_sample -= size as isize;
        c.next_sample < 0 && self.resample(c)
    }

    /// Draws the next sampling distance; returns whether the allocation that ran out is sampled.
    #[cold]
    pub(super) fn resample(&self, c: &mut CpuCache) -> bool {
        let rate = self.profiler.rate.load(Ordering::Relaxed).min(MAX_PROFILE_RATE);
        if rate == 0 {
            c.next_sample = PROFILE_RECHECK_BYTES;
            return false;
        }
        // Uniform in [0, 2*rate): mean `rate` (Go draws from an exponential distribution; without floating
        // point in a kernel a uniform draw keeps the mean and avoids bias towards any size).
        let mut x = c.sample_rng;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        c.sample_rng = x;
        // `2 * rate <= 2^63` (as u64) and the remainder is below it, so it fits a non-negative isize.
        c.next_sample = (x % (2 * rate as u64)) as isize;
        true
    }

    /// Records a sample (outside every guard and lock).
    #[cold]
    pub(super) fn record_sample(&self, addr: usize, size: usize, r: Route, cpu: u16) {
        let bucket = if r == LARGE || r == GUARDED { NUM_ALLOC_CLASSES } else { r };
        self.profiler.samples[bucket].fetch_add(1, Ordering::Relaxed);
        self.profiler.sampled_bytes[bucket].fetch_add(size as u64, Ordering::Relaxed);
        let h = self.profiler.hook.load(Ordering::Acquire);
        if !h.is_null() {
            // SAFETY: `hook` only holds null or a `ProfileHook` stored by `set_profile_hook`.
            let hook: ProfileHook = unsafe { core::mem::transmute::<*mut (), ProfileHook>(h) };
            let class = if bucket == NUM_ALLOC_CLASSES { 0 } else { bucket };
            hook(&ProfileSample { addr, size, class, cpu });
        }
    }
}
