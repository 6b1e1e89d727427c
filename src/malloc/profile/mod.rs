//! Heap profiling (Go's `MemProfileRate`, `runtime.MemProfile` and the heap profile): the per-CPU sampling
//! countdown and its exponential draw, the record of each sample by call stack, and the in-use tracking of
//! sampled objects (Go's profile "specials").
//!
//! See `lib.rs` for an overview of the allocator and `malloc/mod.rs` for the guards and locks.
//!
//! # Sampling (Go's `mcache.nextSample`, `fastexprand`)
//! Each CPU cache counts down `next_sample` bytes; the fast path only subtracts and compares (an allocation
//! that would take the countdown below zero goes to the general path). When it runs out, [`Malloc::resample`]
//! (the one slow-path function) draws the next distance from an exponential distribution of mean `rate`, as
//! Go does: `-ln(U) * rate`, with `U` uniform in (0, 1]. Go computes it with a float log2 table; goheap has
//! no floating point in a kernel, so the log is fixed-point (16 fractional bits by repeated squaring, see
//! [`exp_draw`]). Each cache slot seeds its own generator ([`sample_seed`]), so CPUs draw different streams.
//!
//! Rate semantics are Go's: default [`DEFAULT_PROFILE_RATE`] (512 KiB), 1 samples every allocation, 0 turns
//! sampling off. A change bumps a generation that every general-path entry compares with its cache's, and a
//! long draw is counted down in chunks of at most [`SAMPLE_CHUNK_BYTES`], each ending in the slow path, so a
//! CPU sees a new rate at its next refill, tiny block or large allocation, and at the latest after 256 KiB of
//! its allocation.
//!
//! # Records and in-use tracking
//! A sampled allocation's stack is captured by the stack hook ([`Malloc::set_stack_hook`]) outside every
//! allocator lock, then counted in its bucket (stack × size, see `table.rs`). Sampled small and tiny objects
//! are placed in the profile's own region (see `table.rs` for why), so their free reaches the slow path and
//! updates the bucket's in-use counts; sampled large objects stay in the heap and their record is looked up by
//! `free_large`. [`Malloc::heap_profile`] reads the buckets as Go's `MemProfileRecord`s; `hosted::pprof`
//! writes them as a pprof heap profile.

use super::*;

mod table;

use crate::page::heap::slice::COMMIT_SLICE_NPAGES;
use table::{Special, TableState, Tables, REGION_BYTES, SLOT_BYTES};
pub use table::{
    MAX_STACK_DEPTH, PROFILE_BUCKETS, PROFILE_MAX_BUCKETS, PROFILE_RESERVATION_BYTES, PROFILE_SPECIALS, REGION_SLOTS,
    WARM_MIN_BYTES,
};

/// A stack-capture hook: fills `frames` with return addresses, innermost first, and returns how many it
/// wrote. Called for each sample outside every allocator lock and guard (it may allocate; an allocation it
/// makes that is itself sampled is recorded without a stack).
pub type StackHook = fn(frames: &mut [usize]) -> usize;

/// One bucket of the heap profile (Go's `runtime.MemProfileRecord`): the sampled allocations and frees of
/// objects of one size from one call stack. The counts are of samples; `ProfileRecord::scaled` (feature `std`) estimates
/// the true counts as pprof does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProfileRecord {
    /// Requested size of the bucket's objects in bytes.
    pub size: usize,
    /// Sampled allocations (Go's `AllocObjects`).
    pub allocs: u64,
    /// Bytes of the sampled allocations (Go's `AllocBytes`).
    pub alloc_bytes: u64,
    /// Frees of sampled objects (Go's `FreeObjects`).
    pub frees: u64,
    /// Bytes of those frees (Go's `FreeBytes`).
    pub free_bytes: u64,
    /// Frames used in `stack`.
    pub depth: usize,
    /// Return addresses, innermost first (Go's `Stack0`).
    pub stack: [usize; MAX_STACK_DEPTH],
}

/// A record's estimated true counts (pprof's un-sampling): `[alloc_objects, alloc_space, inuse_objects,
/// inuse_space]`.
pub type ScaledCounts = [i64; 4];

impl ProfileRecord {
    /// The captured frames.
    pub fn stack(&self) -> &[usize] {
        &self.stack[..self.depth.min(MAX_STACK_DEPTH)]
    }

    /// Sampled objects still live.
    pub fn inuse_objects(&self) -> u64 {
        self.allocs.saturating_sub(self.frees)
    }

    /// Bytes of sampled objects still live.
    pub fn inuse_bytes(&self) -> u64 {
        self.alloc_bytes.saturating_sub(self.free_bytes)
    }

    /// The counts scaled as pprof scales a heap sample (Go's `scaleHeapSample`): each sampled object of
    /// average size `s` stands for `1 / (1 - exp(-s / rate))` objects. `rate` 1 (every allocation) and 0 leave
    /// the counts as they are. Floating point: hosted tools only.
    #[cfg(feature = "std")]
    pub fn scaled(&self, rate: usize) -> ScaledCounts {
        let scale = |count: u64, bytes: u64| -> (i64, i64) {
            if count == 0 || bytes == 0 {
                return (0, 0);
            }
            if rate <= 1 {
                return (count as i64, bytes as i64);
            }
            let avg = bytes as f64 / count as f64;
            let s = 1.0 / (1.0 - (-avg / rate as f64).exp());
            ((count as f64 * s) as i64, (bytes as f64 * s) as i64)
        };
        let (ao, ab) = scale(self.allocs, self.alloc_bytes);
        let (io, ib) = scale(self.inuse_objects(), self.inuse_bytes());
        [ao, ab, io, ib]
    }
}

/// What the profile could not keep.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProfileDropped {
    /// Samples not recorded at all (the bucket table was full, or the page source refused the tables).
    pub records: u64,
    /// Sampled small objects whose frees cannot be tracked (the region or the record table was full): counted
    /// in their bucket's allocations, never in its in-use figures.
    pub untracked: u64,
    /// Samples recorded without a stack (taken while the stack hook of the same CPU slot was running).
    pub no_stack: u64,
}

/// A heap-profile sample (as the profile hook sees it; the stack goes to the bucket table).
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

/// Largest profile rate: a draw (at most about 22 × the rate, see [`exp_draw`]) must fit the countdown's
/// carry, and the old uniform draw needed `2 * rate` to fit an `isize`; [`Malloc::set_profile_rate`] clamps
/// to it (2^62 on 64-bit targets).
pub(super) const MAX_PROFILE_RATE: usize = (isize::MAX as usize >> 1) + 1;

/// Longest stretch of the countdown between two slow-path calls: a long draw is counted down in chunks, and
/// each chunk's end checks for a rate change. One cold call per 256 KiB allocated costs nothing measurable.
pub const SAMPLE_CHUNK_BYTES: usize = 256 << 10;

/// Seed of cache slot `index`'s sampling generator (splitmix64 of the index): every slot draws its own stream.
pub const fn sample_seed(index: u16) -> u64 {
    let mut z = (index as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    let z = z ^ (z >> 31);
    if z == 0 {
        1
    } else {
        z
    }
}

/// One step of the sampling generator (xorshift64*): the next state and 32 random bits.
#[inline]
pub fn sample_rng_next(state: u64) -> (u64, u32) {
    let mut x = state;
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    (x, (x.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 32) as u32)
}

/// `log2(q)` for `q` in `[1, 2^32]`, in fixed point with 16 fractional bits (truncated; error below 2^-16):
/// the integer part from the leading zeros, the fraction bit by bit by repeated squaring of the mantissa.
fn log2_q16(q: u64) -> u64 {
    debug_assert!((1..=1 << 32).contains(&q));
    let k = 63 - q.leading_zeros() as u64;
    // The mantissa q / 2^k in [1, 2), with 32 fractional bits.
    let mut m: u128 = ((q as u128) << 32) >> k;
    let mut frac = 0u64;
    for i in (0..16).rev() {
        m = (m * m) >> 32;
        if m >= 2 << 32 {
            m >>= 1;
            frac |= 1 << i;
        }
    }
    (k << 16) | frac
}

/// An exponentially distributed sampling distance of mean `rate` from 32 random bits (Go's `fastexprand`):
/// `-ln(U) * rate` with `U = (r + 1) / 2^32` in (0, 1], as `-log2(U) * ln 2 * rate` in integers. At most
/// `32 ln 2 * rate`, about `22.2 * rate`.
pub fn exp_draw(r: u32, rate: usize) -> usize {
    /// ln 2 with 32 fractional bits.
    const LN2_Q32: u128 = 2_977_044_472;
    let neg_log2 = (32u64 << 16) - log2_q16(r as u64 + 1);
    ((neg_log2 as u128 * rate as u128 * LN2_Q32) >> 48).min(usize::MAX as u128 / 2) as usize
}

pub(super) struct Profiler {
    /// Mean bytes between samples; 0 = off.
    pub(super) rate: AtomicUsize,
    /// Bumped by every rate change; caches compare it with theirs.
    pub(super) gen: crate::sync::atomic::AtomicU32,
    /// `ProfileHook` or null.
    pub(super) hook: AtomicPtr<()>,
    /// `StackHook` or null.
    pub(super) stack_hook: AtomicPtr<()>,
    /// Per route bucket: classes, tiny (`TINY_CLASS`), large (`NUM_ALLOC_CLASSES`).
    pub(super) samples: [AtomicU64; NUM_ALLOC_CLASSES + 1],
    pub(super) sampled_bytes: [AtomicU64; NUM_ALLOC_CLASSES + 1],
    /// Base of the sampled-object region, 0 before the tables exist (read without the lock by frees).
    region: AtomicUsize,
    /// Live sampled large objects (frees of large objects look records up only when nonzero).
    live_large: AtomicUsize,
    /// Per cache slot: its stack hook is running (a sample taken meanwhile gets no stack).
    in_hook: [crate::sync::atomic::AtomicBool; MAX_CPUS + 1],
    /// Bytes the profile holds committed: its tables, the pages of live region objects and the warm slots.
    committed: AtomicUsize,
    /// Of `committed`, the warm slots' pages (see [`WARM_MIN_BYTES`]).
    warm_bytes: AtomicUsize,
    dropped_records: AtomicU64,
    dropped_untracked: AtomicU64,
    dropped_no_stack: AtomicU64,
    /// The tables; a leaf lock (nothing else is locked while it is held; `fork()` takes it last).
    pub(super) tables: GuardedMutex<Tables>,
}

impl Profiler {
    pub(super) const fn new() -> Self {
        Profiler {
            rate: AtomicUsize::new(DEFAULT_PROFILE_RATE),
            gen: crate::sync::atomic::AtomicU32::new(0),
            hook: AtomicPtr::new(ptr::null_mut()),
            stack_hook: AtomicPtr::new(ptr::null_mut()),
            samples: [const { AtomicU64::new(0) }; NUM_ALLOC_CLASSES + 1],
            sampled_bytes: [const { AtomicU64::new(0) }; NUM_ALLOC_CLASSES + 1],
            region: AtomicUsize::new(0),
            live_large: AtomicUsize::new(0),
            in_hook: [const { crate::sync::atomic::AtomicBool::new(false) }; MAX_CPUS + 1],
            committed: AtomicUsize::new(0),
            warm_bytes: AtomicUsize::new(0),
            dropped_records: AtomicU64::new(0),
            dropped_untracked: AtomicU64::new(0),
            dropped_no_stack: AtomicU64::new(0),
            tables: GuardedMutex::new(Tables::new()),
        }
    }

    /// Whether `addr` lies in the sampled-object region.
    #[inline]
    pub(super) fn in_region(&self, addr: usize) -> bool {
        let base = self.region.load(Ordering::Acquire);
        base != 0 && addr.wrapping_sub(base) < REGION_BYTES
    }
}

impl<S: PageSource, P: CpuProvider> Malloc<S, P> {
    /// Sets the heap-profile sampling rate (Go's `MemProfileRate`): on average one sample per `rate` bytes
    /// allocated; 1 samples every allocation; 0 turns sampling off. The default is [`DEFAULT_PROFILE_RATE`]
    /// (512 KiB), as Go's. A change applies at each CPU's next general-path allocation and at the latest
    /// after [`SAMPLE_CHUNK_BYTES`] of its allocation. Rates above 2^62 (2^30 on 32-bit targets) are clamped.
    pub fn set_profile_rate(&self, rate: usize) {
        self.profiler.rate.store(rate.min(MAX_PROFILE_RATE), Ordering::Relaxed);
        self.profiler.gen.fetch_add(1, Ordering::Release);
    }

    /// The heap-profile sampling rate (see [`Malloc::set_profile_rate`]).
    pub fn profile_rate(&self) -> usize {
        self.profiler.rate.load(Ordering::Relaxed)
    }

    /// Calls `hook` for every sample (outside every allocator lock and guard; the hook may allocate).
    pub fn set_profile_hook(&self, hook: Option<ProfileHook>) {
        let p = hook.map_or(ptr::null_mut(), |h| h as *mut ());
        self.profiler.hook.store(p, Ordering::Release);
    }

    /// Sets the hook that captures a sample's call stack (none: samples are bucketed by size only). The hosted
    /// allocator installs one (`hosted::capture_stack`); a kernel installs a frame-pointer walk.
    pub fn set_stack_hook(&self, hook: Option<StackHook>) {
        let p = hook.map_or(ptr::null_mut(), |h| h as *mut ());
        self.profiler.stack_hook.store(p, Ordering::Release);
    }

    /// Installs `hook` as the stack hook unless one is set already (an adapter's default).
    #[cfg(feature = "pprof")]
    pub(crate) fn default_stack_hook(&self, hook: StackHook) {
        let _ = self.profiler.stack_hook.compare_exchange(
            ptr::null_mut(),
            hook as *mut (),
            Ordering::AcqRel,
            Ordering::Relaxed,
        );
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

    /// Calls `f` with every bucket of the heap profile (Go's `runtime.MemProfile` with `inuseZero`), in table
    /// order. Each record is copied out under the profile's lock and `f` runs outside it, so `f` may allocate.
    pub fn heap_profile(&self, mut f: impl FnMut(&ProfileRecord)) {
        for i in 0..PROFILE_BUCKETS {
            let rec = self.with_guard(|g| {
                let mut t = self.profiler.tables.lock(g);
                if t.state != TableState::Ready {
                    return None;
                }
                let b = t.bucket_at(i as u32);
                (b.used != 0).then_some(ProfileRecord {
                    size: b.size,
                    allocs: b.allocs,
                    alloc_bytes: b.alloc_bytes,
                    frees: b.frees,
                    free_bytes: b.free_bytes,
                    depth: b.depth as usize,
                    stack: b.stack,
                })
            });
            if let Some(r) = rec {
                f(&r);
            }
        }
    }

    /// Bytes of memory the heap profile holds committed from the page source, outside the heap: its tables
    /// (once the first sample made them), the pages of live sampled small objects and of the freed slots kept
    /// for the next samples (at most [`WARM_MIN_BYTES`] or as many as the live ones; Go counts its profile
    /// buckets in `BuckHashSys`).
    pub fn profile_sys_bytes(&self) -> usize {
        self.profiler.committed.load(Ordering::Relaxed)
    }

    /// Of [`Malloc::profile_sys_bytes`], the pages of live sampled objects in the profile's region (heap
    /// memory in Go's accounting: `MemStats` counts them in `heap_inuse`; the tables and the warm slots, the
    /// profile's own overhead, in `buck_hash_sys`).
    pub(crate) fn profile_region_bytes(&self) -> usize {
        let tables = if self.profiler.region.load(Ordering::Acquire) != 0 { table::TABLE_BYTES } else { 0 };
        let warm = self.profiler.warm_bytes.load(Ordering::Relaxed);
        self.profiler.committed.load(Ordering::Relaxed).saturating_sub(tables + warm)
    }

    /// What the heap profile could not keep (see [`ProfileDropped`]).
    pub fn profile_dropped(&self) -> ProfileDropped {
        ProfileDropped {
            records: self.profiler.dropped_records.load(Ordering::Relaxed),
            untracked: self.profiler.dropped_untracked.load(Ordering::Relaxed),
            no_stack: self.profiler.dropped_no_stack.load(Ordering::Relaxed),
        }
    }

    /// Counts `size` bytes against the cache's sampling countdown; true when this allocation is sampled.
    /// Called by the general paths only (the fast path subtracts and compares itself). A cache whose countdown
    /// was drawn under an older rate draws afresh first, without sampling.
    #[inline(always)]
    pub(super) fn count_sample(&self, c: &mut CpuCache, size: usize) -> bool {
        if c.sample_gen != self.profiler.gen.load(Ordering::Acquire) {
            self.redraw(c);
        }
        c.next_sample -= size as isize;
        c.next_sample < 0 && self.resample(c)
    }

    /// Draws a fresh countdown under the current rate (a rate change, or a cache's first allocation).
    #[cold]
    fn redraw(&self, c: &mut CpuCache) {
        c.sample_gen = self.profiler.gen.load(Ordering::Acquire);
        c.sample_carry = self.draw(c);
        c.next_sample = 0;
        self.load_chunk(c);
    }

    /// A fresh sampling distance under the current rate (`usize::MAX`-ish when off, 0 when every allocation
    /// is sampled).
    fn draw(&self, c: &mut CpuCache) -> usize {
        let rate = self.profiler.rate.load(Ordering::Relaxed).min(MAX_PROFILE_RATE);
        match rate {
            0 => usize::MAX / 2,
            1 => 0,
            _ => {
                let (state, r) = sample_rng_next(c.sample_rng);
                c.sample_rng = state;
                exp_draw(r, rate)
            }
        }
    }

    /// Moves up to a chunk of the carry into the countdown.
    #[inline]
    fn load_chunk(&self, c: &mut CpuCache) {
        let n = c.sample_carry.min(SAMPLE_CHUNK_BYTES);
        c.sample_carry -= n;
        c.next_sample += n as isize;
    }

    /// The sampling slow path, called when the countdown goes negative: continues a long draw chunk by
    /// chunk; when the draw is used up, the allocation that used it up is sampled and the next distance is
    /// drawn. Returns whether the allocation is sampled. A rate change seen here starts a fresh draw under
    /// the new rate, without sampling.
    #[cold]
    pub(super) fn resample(&self, c: &mut CpuCache) -> bool {
        if c.sample_gen != self.profiler.gen.load(Ordering::Acquire) {
            self.redraw(c);
            return false;
        }
        while c.next_sample < 0 && c.sample_carry > 0 {
            self.load_chunk(c);
        }
        if c.next_sample >= 0 {
            return false;
        }
        if self.profiler.rate.load(Ordering::Relaxed) == 0 {
            c.sample_carry = usize::MAX / 2;
            c.next_sample = 0;
            self.load_chunk(c);
            return false;
        }
        // Sampled. Go's next distance starts after this allocation: the overshoot is not carried over.
        c.sample_carry = self.draw(c);
        c.next_sample = 0;
        self.load_chunk(c);
        true
    }

    /// Makes the tables at the first sample, with no guard held by the caller (interrupt latency, see
    /// `page/heap/slice.rs`): claims them in one guarded section (another caller that finds them claimed
    /// or failed returns at once, and its record is dropped, counted), reserves the profile's address space
    /// in it, commits the tables a commit slice per section, clears them with interrupts on (unless the
    /// source hands out zeroed pages) and publishes them in a last section. A refused reservation or commit
    /// gives the committed part back and marks the tables failed for good. A load when they exist.
    #[cold]
    pub(super) fn prepare_tables(&self) {
        if self.tables_made() {
            return;
        }
        let Some(base) = self.with_guard(|g| {
            let mut t = self.profiler.tables.lock(g);
            if !t.claim() {
                return None;
            }
            let base = self.t.heap.src(g).reserve(table::PROFILE_RESERVATION_BYTES, PAGE_SIZE);
            if base.is_none() {
                t.fail();
            }
            base
        }) else {
            return;
        };
        let tables = base.as_ptr() as usize + table::REGION_BYTES;
        let slice = COMMIT_SLICE_NPAGES * PAGE_SIZE;
        let mut ncommitted = 0;
        while ncommitted < table::TABLE_BYTES {
            let n = slice.min(table::TABLE_BYTES - ncommitted);
            // SAFETY: the range lies in the tables' part of our fresh reservation, page-aligned (TABLE_BYTES is
            // whole pages) and not committed yet.
            let ok = self.with_guard(|g| unsafe {
                self.t.heap.src(g).commit(NonNull::new_unchecked((tables + ncommitted) as *mut u8), n)
            });
            if !ok {
                let mut at = 0;
                while at < ncommitted {
                    let n = slice.min(ncommitted - at);
                    // SAFETY: committed above, ours, unused.
                    self.with_guard(|g| unsafe {
                        self.t.heap.src(g).decommit(NonNull::new_unchecked((tables + at) as *mut u8), n)
                    });
                    at += n;
                }
                self.with_guard(|g| self.profiler.tables.lock(g).fail());
                return;
            }
            ncommitted += n;
        }
        if !self.t.heap.source().commit_zeroes() {
            // SAFETY: just committed, ours, not published yet. Outside the guard: interrupts stay on.
            unsafe { ptr::write_bytes(tables as *mut u8, 0, table::TABLE_BYTES) };
        }
        self.with_guard(|g| {
            let mut t = self.profiler.tables.lock(g);
            // SAFETY: we claimed the tables; the reservation's tables are committed and zero.
            unsafe { t.publish(base.as_ptr() as usize) };
            self.profiler.committed.fetch_add(table::TABLE_BYTES, Ordering::Relaxed);
            self.profiler.region.store(t.region, Ordering::Release);
        });
    }

    /// Whether the tables are made (a load, no lock; see [`Malloc::prepare_tables`]).
    #[inline]
    pub(super) fn tables_made(&self) -> bool {
        self.profiler.region.load(Ordering::Acquire) != 0
    }

    /// Whether the tables are made (see [`Malloc::prepare_tables`], which also publishes `region`); the caller
    /// holds their lock.
    fn tables_ready(t: &Tables) -> bool {
        t.state == TableState::Ready
    }

    /// Places a sampled small or tiny object of route `r` in the profile's region (zeroed if `zero`), or
    /// null when the region or the tables are unavailable (the caller then allocates as usual).
    pub(super) fn alloc_sampled_small(
        &self,
        size: usize,
        r: Route,
        zero: bool,
        sh: &CpuShared,
        g: Guarded<'_>,
    ) -> *mut u8 {
        let elem = if r == TINY_CLASS { TINY_SIZE } else { sizeclass::CLASSES[r].size as usize };
        let bytes = elem.next_multiple_of(PAGE_SIZE);
        let src = self.t.heap.src(g);
        let mut t = self.profiler.tables.lock(g);
        if !Self::tables_ready(&t) {
            return ptr::null_mut();
        }
        // A warm slot (freed, its pages still committed and counted) if one waits: it commits the pages it
        // lacks for this size and keeps any it has beyond them. Else a free slot, committed.
        let warm = t.take_warm();
        let slot = match warm {
            Some(slot) => {
                let have = t.slot_npages[slot] as usize * PAGE_SIZE;
                self.profiler.warm_bytes.fetch_sub(have, Ordering::Relaxed);
                if have < bytes {
                    let p = t.region + slot * SLOT_BYTES + have;
                    // SAFETY: the slot's pages past its first `have` bytes are not committed.
                    if !unsafe { src.commit(NonNull::new_unchecked(p as *mut u8), bytes - have) } {
                        t.put_warm(slot);
                        self.profiler.warm_bytes.fetch_add(have, Ordering::Relaxed);
                        return ptr::null_mut();
                    }
                    t.slot_npages[slot] = (bytes / PAGE_SIZE) as u8;
                    self.profiler.committed.fetch_add(bytes - have, Ordering::Relaxed);
                }
                slot
            }
            None => {
                let Some(slot) = t.take_slot() else { return ptr::null_mut() };
                let p = t.region + slot * SLOT_BYTES;
                // SAFETY: slot `slot` of our region is free and not warm, so none of its pages is committed.
                if !unsafe { src.commit(NonNull::new_unchecked(p as *mut u8), bytes) } {
                    t.put_slot(slot);
                    return ptr::null_mut();
                }
                t.slot_npages[slot] = (bytes / PAGE_SIZE) as u8;
                self.profiler.committed.fetch_add(bytes, Ordering::Relaxed);
                slot
            }
        };
        let p = t.region + slot * SLOT_BYTES;
        // The record is filled in by `record_sample` (the bucket needs the stack, captured outside the lock);
        // until then an entry without a bucket marks the slot's object live.
        if !t.insert_special(Special { addr: p, size, bucket: u32::MAX, route: r as u32 }) {
            // Committed and counted: the slot joins the warm set (over its budget for a moment at most; the
            // next sampled free that finds it over gives pages back).
            t.put_warm(slot);
            self.profiler.warm_bytes.fetch_add(t.slot_npages[slot] as usize * PAGE_SIZE, Ordering::Relaxed);
            return ptr::null_mut();
        }
        drop(t);
        count_sampled(sh, r, true);
        if zero && (warm.is_some() || !src.commit_zeroes()) {
            // SAFETY: freshly committed, ours.
            unsafe { ptr::write_bytes(p as *mut u8, 0, size) };
        }
        p as *mut u8
    }

    /// Records a sample (outside every guard and lock): its per-route counts, the profile hook, and the
    /// sample's bucket. `tracked`: the object has a record already (a region object) or gets one (a large
    /// object), so its free will update the bucket's in-use counts.
    #[cold]
    pub(super) fn record_sample(&self, addr: usize, size: usize, r: Route, cpu: u16, tracked: bool) {
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
        let mut frames = [0usize; MAX_STACK_DEPTH];
        let depth = self.capture_stack(&mut frames, cpu);
        let is_large = r == LARGE || r == GUARDED;
        self.prepare_tables();
        let untracked = self.with_guard(|g| {
            let mut t = self.profiler.tables.lock(g);
            if !Self::tables_ready(&t) {
                return None;
            }
            // A full bucket table drops the sample (a region object keeps its record, without a bucket).
            let b = t.bucket(&frames[..depth], size)?;
            let bk = t.bucket_at(b);
            bk.allocs += 1;
            bk.alloc_bytes += size as u64;
            if !tracked {
                return Some(true);
            }
            if is_large {
                if !t.insert_special(Special { addr, size, bucket: b, route: LARGE as u32 }) {
                    return Some(true);
                }
                self.profiler.live_large.fetch_add(1, Ordering::Relaxed);
            } else if let Some(i) = t.find_special(addr) {
                let s = t.special(i);
                t.remove_special(addr);
                let _ = t.insert_special(Special { bucket: b, ..s });
            } else if !self.profiler.in_region(addr) {
                // A sampled guarded object (see `guarded.rs`): tracked by address as a large one is, and
                // dropped by `untrack_large` when `free_guarded` frees it.
                if !t.insert_special(Special { addr, size, bucket: b, route: r as u32 }) {
                    return Some(true);
                }
                self.profiler.live_large.fetch_add(1, Ordering::Relaxed);
            }
            Some(false)
        });
        match untracked {
            None => {
                self.profiler.dropped_records.fetch_add(1, Ordering::Relaxed);
            }
            Some(true) => {
                self.profiler.dropped_untracked.fetch_add(1, Ordering::Relaxed);
            }
            Some(false) => {}
        }
    }

    /// Runs the stack hook for a sample taken on cache slot `cpu` (none while that slot's hook is already
    /// running: an allocation the hook makes must not recurse).
    fn capture_stack(&self, frames: &mut [usize; MAX_STACK_DEPTH], cpu: u16) -> usize {
        let h = self.profiler.stack_hook.load(Ordering::Acquire);
        if h.is_null() {
            return 0;
        }
        let flag = &self.profiler.in_hook[(cpu as usize).min(MAX_CPUS)];
        if flag.swap(true, Ordering::Acquire) {
            self.profiler.dropped_no_stack.fetch_add(1, Ordering::Relaxed);
            return 0;
        }
        // SAFETY: `stack_hook` only holds null or a `StackHook` stored by `set_stack_hook`.
        let hook: StackHook = unsafe { core::mem::transmute::<*mut (), StackHook>(h) };
        let n = hook(frames).min(MAX_STACK_DEPTH);
        flag.store(false, Ordering::Release);
        n
    }

    /// Frees a sampled object of the region (a small or tiny free whose pointer lies in it): its bucket's
    /// in-use counts drop and its slot's pages go back to the page source. A pointer with no record, or a
    /// layout of another route, is reported.
    pub(super) fn free_sampled(&self, ptr: *mut u8, layout: Layout) {
        let addr = ptr as usize;
        let r = self.route(layout.size(), layout.align());
        let e = self.enter();
        let g = e.held.guarded();
        let bad = (|| {
            let mut t = self.profiler.tables.lock(g);
            if let Some(reason) = sampled_bad(&mut t, addr, r, layout) {
                return Some(reason);
            }
            let s = t.remove_special(addr)?;
            if s.bucket < PROFILE_BUCKETS as u32 {
                let b = t.bucket_at(s.bucket);
                b.frees += 1;
                b.free_bytes += s.size as u64;
            }
            let slot = (addr - t.region) / SLOT_BYTES;
            // Kept committed for the next sample (see `WARM_MIN_BYTES`); the warm set then gives back what
            // exceeds its budget, the live samples' pages (this one's no longer among them): at most this
            // slot and the few its own pages made room for, as the budget falls by one object's pages at a
            // time.
            let bytes = t.slot_npages[slot] as usize * PAGE_SIZE;
            t.put_warm(slot);
            self.profiler.warm_bytes.fetch_add(bytes, Ordering::Relaxed);
            let budget = self.profile_region_bytes().max(WARM_MIN_BYTES);
            while self.profiler.warm_bytes.load(Ordering::Relaxed) > budget {
                let Some(cold) = t.take_warm() else { break };
                let n = t.slot_npages[cold] as usize * PAGE_SIZE;
                let at = t.region + cold * SLOT_BYTES;
                // SAFETY: a warm slot: its first `n` bytes are committed, and nothing uses them.
                unsafe { self.t.heap.src(g).decommit(NonNull::new_unchecked(at as *mut u8), n) };
                t.slot_npages[cold] = 0;
                t.put_slot(cold);
                self.profiler.warm_bytes.fetch_sub(n, Ordering::Relaxed);
                self.profiler.committed.fetch_sub(n, Ordering::Relaxed);
            }
            count_sampled(e.sh, r, false);
            None
        })();
        drop(e);
        if let Some(reason) = bad {
            self.report(addr, reason);
        }
    }

    /// Checks that a region pointer is a live sampled object of `layout`'s route (for `realloc`).
    pub(super) fn check_sampled(&self, ptr: *mut u8, layout: Layout) {
        let addr = ptr as usize;
        let r = self.route(layout.size(), layout.align());
        let bad = self.with_guard(|g| {
            let mut t = self.profiler.tables.lock(g);
            sampled_bad(&mut t, addr, r, layout)
        });
        if let Some(reason) = bad {
            self.report(addr, reason);
        }
    }

    /// A large free: drops the object's record if it was sampled.
    #[inline]
    pub(super) fn untrack_large(&self, ptr: *mut u8) {
        if self.profiler.live_large.load(Ordering::Relaxed) == 0 {
            return;
        }
        self.with_guard(|g| {
            let mut t = self.profiler.tables.lock(g);
            if let Some(s) = t.remove_special(ptr as usize) {
                self.profiler.live_large.fetch_sub(1, Ordering::Relaxed);
                if s.bucket < PROFILE_BUCKETS as u32 {
                    let b = t.bucket_at(s.bucket);
                    b.frees += 1;
                    b.free_bytes += s.size as u64;
                }
            }
        });
    }
}

/// Counts a sampled region object's allocation (or free) in the CPU's statistics as the object's class
/// counts it (a tiny object as one tiny object in a block of its own), so `MemStats` does not tell sampled
/// objects apart.
fn count_sampled(sh: &CpuShared, r: Route, alloc: bool) {
    let st = &sh.stats;
    match (r == TINY_CLASS, alloc) {
        (true, true) => {
            st.tiny_nmalloc.bump();
            st.nmalloc(r).bump();
        }
        (true, false) => {
            st.tiny_nfree.bump();
            st.nfree(r).bump();
        }
        (false, true) => st.nmalloc(r).bump(),
        (false, false) => st.nfree(r).bump(),
    }
}

/// What is wrong with freeing (or reallocating) the region pointer `addr` with `layout` (route `r`), if
/// anything: misaligned, inside a live sampled object, not a live sampled object, or another route's layout.
fn sampled_bad(t: &mut Tables, addr: usize, r: Route, layout: Layout) -> Option<Reason> {
    if addr % layout.align().max(8) != 0 {
        return Some(Reason::Misaligned { align: layout.align().max(8) });
    }
    let Some(i) = t.find_special(addr) else {
        let base = t.region + (addr - t.region) / SLOT_BYTES * SLOT_BYTES;
        return Some(if base != addr && t.find_special(base).is_some() {
            Reason::Interior
        } else {
            Reason::DoubleFree
        });
    };
    if t.special(i).route as usize != r {
        return Some(Reason::LayoutMismatch { size: layout.size(), align: layout.align() });
    }
    None
}

/// The wire format of a heap profile sent by a kernel (over serial) to a host tool that writes the pprof file
/// (`cargo xtask profile`): [`WIRE_MAGIC`], the rate, then each record as [`ProfileRecord::to_wire`] writes
/// it. Little-endian 64-bit words throughout.
pub const WIRE_MAGIC: [u8; 8] = *b"GHPROF01";

/// Largest wire form of one record.
pub const WIRE_RECORD_MAX: usize = 8 * (6 + MAX_STACK_DEPTH);

/// The wire header for a profile sampled at `rate`.
pub fn wire_header(rate: usize) -> [u8; 16] {
    let mut h = [0u8; 16];
    h[..8].copy_from_slice(&WIRE_MAGIC);
    h[8..].copy_from_slice(&(rate as u64).to_le_bytes());
    h
}

/// Parses a wire header: the rate, or `None` if `bytes` does not start with one.
pub fn wire_rate(bytes: &[u8]) -> Option<usize> {
    if bytes.len() < 16 || bytes[..8] != WIRE_MAGIC {
        return None;
    }
    Some(u64::from_le_bytes(bytes[8..16].try_into().ok()?) as usize)
}

impl ProfileRecord {
    /// Writes the record's wire form into `out`; returns its length (at most [`WIRE_RECORD_MAX`]).
    pub fn to_wire(&self, out: &mut [u8; WIRE_RECORD_MAX]) -> usize {
        let st = self.stack();
        let head = [self.size as u64, self.allocs, self.alloc_bytes, self.frees, self.free_bytes, st.len() as u64];
        for (i, w) in head.iter().copied().chain(st.iter().map(|&f| f as u64)).enumerate() {
            out[i * 8..i * 8 + 8].copy_from_slice(&w.to_le_bytes());
        }
        8 * (6 + st.len())
    }

    /// Reads one record's wire form from the start of `bytes`: the record and the bytes it took.
    pub fn from_wire(bytes: &[u8]) -> Option<(ProfileRecord, usize)> {
        let word =
            |i: usize| -> Option<u64> { Some(u64::from_le_bytes(bytes.get(i * 8..i * 8 + 8)?.try_into().ok()?)) };
        let depth = word(5)? as usize;
        if depth > MAX_STACK_DEPTH {
            return None;
        }
        let mut r = ProfileRecord {
            size: word(0)? as usize,
            allocs: word(1)?,
            alloc_bytes: word(2)?,
            frees: word(3)?,
            free_bytes: word(4)?,
            depth,
            stack: [0; MAX_STACK_DEPTH],
        };
        for i in 0..depth {
            r.stack[i] = word(6 + i)? as usize;
        }
        Some((r, 8 * (6 + depth)))
    }
}
