//! The heap profile's fixed tables: buckets by call stack and object size (Go's `mprof.go` buckets), the
//! records of live sampled objects keyed by address (Go's profile "specials"), and the region sampled small
//! objects live in.
//!
//! See `lib.rs` for an overview of the allocator and `malloc/profile/mod.rs` for the sampler.
//!
//! # Memory
//! Everything here lives in one reservation from the page source, made at the first sample (Go keeps its
//! buckets in persistentalloc'd memory, outside the heap): the sampled-object region ([`REGION_BYTES`],
//! committed a slot at a time) followed by the tables ([`TABLE_BYTES`], committed at the first sample, a
//! commit slice per guarded section, and cleared with interrupts on: `Profiler::prepare_tables`). Nothing is ever
//! allocated through the allocator's own paths, and every table has a fixed capacity: a record that does not
//! fit is dropped and counted, never a panic.
//!
//! # Why sampled small objects get a region of their own
//! goheap's frees are explicit and the fast free path pushes a small object on a per-CPU stock without
//! looking at its span, so it cannot notice that an object is sampled. TCMalloc has the same problem and
//! the same answer: sampled objects live in memory of their own (its `MemoryTag::kSampled`), which the free
//! path's existing address test already sends to the slow path. Here that test is `in_arena`: a pointer in
//! the region fails it, so its free reaches `dealloc_general`, which looks the record up. The fast paths pay
//! nothing. Each sampled small object takes a slot of [`SLOT_BYTES`] of address space with the pages its
//! class needs committed (at most 32 KiB per sample, about one sample per 512 KiB allocated by default, so
//! the region's memory stays a small fraction of the heap's, as TCMalloc's sampled spans do).
//!
//! # Locks
//! One spin lock ([`Profiler`](super::Profiler)`::tables`), taken inside the CPU provider's guard and never
//! while an allocator lock is held; nothing under it allocates or calls out.

use super::super::*;

/// Frames kept per stack (Go's `maxStack` is 32 too).
pub const MAX_STACK_DEPTH: usize = 32;
/// Slots of the bucket table (distinct stack × size pairs); it takes at most three quarters of them.
pub const PROFILE_BUCKETS: usize = 1024;
/// Buckets the profile holds at most: the table's load stays at three quarters, so a lookup probes a few
/// slots on average even when no more buckets can be made (a full table probed every slot per sample:
/// with sizes that all differ, as in the bench's `wset`, each sample after the first thousand scanned all
/// 1 024 buckets, 6% of `wset-2t`'s time).
pub const PROFILE_MAX_BUCKETS: usize = PROFILE_BUCKETS / 4 * 3;
/// Live sampled objects the profile can track at once.
pub const PROFILE_SPECIALS: usize = 4096;
/// Address space of one sampled small object's slot (the largest size class).
pub const SLOT_BYTES: usize = MAX_SMALL_SIZE;
/// Slots in the sampled-object region.
pub const REGION_SLOTS: usize = 2048;
/// Freed slots stay committed (*warm*) for the next samples while the warm slots' pages stay within
/// `max(WARM_MIN_BYTES, the pages of the live sampled objects)`: a sampled object's free then costs no
/// page-source call, and the next sample (of any size: a warm slot with fewer pages commits the rest, one
/// with more keeps them) no page fault. Without warm slots every sampled free decommitted its pages (on a
/// host an `madvise`, whose TLB shootdown interrupts every CPU the process runs on) and the next sample
/// faulted fresh pages in: about 2 900 times in the 4 million allocations of the bench's
/// `prodcons-8-2048`, a quarter of goheap's time there. With a fixed 8 warm slots matched by page count,
/// the bench's `wset-2t` (sizes of 4 B to 32 KiB, about 50 live samples) still made 3 200 `madvise` calls
/// in 2 million operations and ran at about 1.7× its time with sampling off; bounded by the live samples'
/// pages instead, the warm set follows the profile's own size (about 2% of the heap at the default rate,
/// so the warm pages add at most as much again) and goes back as the live samples do. Warm pages count as
/// the profile's own memory (`buck_hash_sys`, with the tables, not heap in use); `release_all` leaves them.
pub const WARM_MIN_BYTES: usize = 8 * PAGE_SIZE;
// Slot indices fit the warm list's `u16`, a slot's pages the `u8` of `slot_npages`.
const _: () = assert!(REGION_SLOTS <= 1 << 16 && SLOT_BYTES / PAGE_SIZE <= u8::MAX as usize);
/// Address space of the sampled-object region: 64 MiB.
pub const REGION_BYTES: usize = SLOT_BYTES * REGION_SLOTS;
/// Bytes of the tables (buckets and specials), page-rounded.
pub const TABLE_BYTES: usize = (PROFILE_BUCKETS * core::mem::size_of::<Bucket>()
    + PROFILE_SPECIALS * core::mem::size_of::<Special>())
.next_multiple_of(PAGE_SIZE);
/// The one reservation the profile asks of the page source (a kernel adds it to its heap window).
pub const PROFILE_RESERVATION_BYTES: usize = REGION_BYTES + TABLE_BYTES;

/// One bucket: a stack and an object size, with Go's four counters.
#[repr(C)]
#[derive(Clone, Copy)]
pub(in crate::malloc) struct Bucket {
    pub hash: u64,
    /// Requested size of the bucket's objects (Go keys buckets by size too).
    pub size: usize,
    pub depth: u32,
    pub used: u32,
    pub stack: [usize; MAX_STACK_DEPTH],
    pub allocs: u64,
    pub alloc_bytes: u64,
    pub frees: u64,
    pub free_bytes: u64,
}

/// One live sampled object.
#[repr(C)]
#[derive(Clone, Copy)]
pub(in crate::malloc) struct Special {
    /// Its address; 0: empty entry.
    pub addr: usize,
    pub size: usize,
    pub bucket: u32,
    /// Its route (a size class, the tiny class, or `LARGE`), to check a free's layout.
    pub route: u32,
}

/// Whether the tables exist yet.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(in crate::malloc) enum TableState {
    Untried,
    /// One caller is reserving, committing and clearing them, in sections of its own (records meanwhile
    /// are dropped, counted, as when the tables are full).
    Preparing,
    Ready,
    /// The page source refused the reservation or the commit: records are dropped (counted).
    Failed,
}

/// The tables, behind the profiler's lock.
pub(in crate::malloc) struct Tables {
    pub state: TableState,
    pub buckets: *mut Bucket,
    pub specials: *mut Special,
    pub region: usize,
    /// Slot `i` of the region is in use iff bit `i` is set (warm slots included).
    pub slots: [u64; REGION_SLOTS / 64],
    pub live_specials: usize,
    /// Buckets made (at most [`PROFILE_MAX_BUCKETS`]).
    pub nbuckets: usize,
    /// Freed slots kept committed (`warm[..nwarm]`, most recently freed last).
    pub warm: [u16; REGION_SLOTS],
    pub nwarm: usize,
    /// Pages committed at the start of each slot (0: none; a live or warm slot has at least one).
    pub slot_npages: [u8; REGION_SLOTS],
}

// SAFETY: the pointers name memory of the profile's own reservation, used only under the profiler's lock.
unsafe impl Send for Tables {}

impl Tables {
    pub const fn new() -> Self {
        Tables {
            state: TableState::Untried,
            buckets: ptr::null_mut(),
            specials: ptr::null_mut(),
            region: 0,
            slots: [0; REGION_SLOTS / 64],
            live_specials: 0,
            nbuckets: 0,
            warm: [0; REGION_SLOTS],
            nwarm: 0,
            slot_npages: [0; REGION_SLOTS],
        }
    }

    /// Claims the making of the tables (`Untried` → `Preparing`): true for the one caller that then makes
    /// them (`Profiler::prepare_tables`) and ends with [`Tables::publish`] or [`Tables::fail`].
    pub fn claim(&mut self) -> bool {
        let claimed = self.state == TableState::Untried;
        if claimed {
            self.state = TableState::Preparing;
        }
        claimed
    }

    /// Publishes the tables made in reservation `base` (the region, then the committed, zeroed tables at
    /// `base + REGION_BYTES`).
    ///
    /// # Safety
    /// The caller claimed them, and `base` is a reservation of [`PROFILE_RESERVATION_BYTES`] whose last
    /// [`TABLE_BYTES`] are committed and zero.
    pub unsafe fn publish(&mut self, base: usize) {
        debug_assert!(self.state == TableState::Preparing);
        self.buckets = (base + REGION_BYTES) as *mut Bucket;
        // SAFETY: within the committed tables (TABLE_BYTES covers both arrays).
        self.specials = unsafe { self.buckets.add(PROFILE_BUCKETS) } as *mut Special;
        self.region = base;
        self.state = TableState::Ready;
    }

    /// The claimed making failed (the page source refused): records are dropped from now on.
    pub fn fail(&mut self) {
        debug_assert!(self.state == TableState::Preparing);
        self.state = TableState::Failed;
    }

    /// The bucket of `stack` and `size`, created if new; `None` when it is new and the table holds
    /// [`PROFILE_MAX_BUCKETS`] already.
    pub fn bucket(&mut self, stack: &[usize], size: usize) -> Option<u32> {
        let hash = stack_hash(stack, size);
        let mask = PROFILE_BUCKETS - 1;
        let mut i = hash as usize & mask;
        // An empty slot ends every probe sequence: at most three quarters of the slots are used.
        loop {
            // SAFETY: `i < PROFILE_BUCKETS`; the tables are ready (the caller's `ensure`) and ours under the lock.
            let b = unsafe { &mut *self.buckets.add(i) };
            if b.used == 0 {
                if self.nbuckets == PROFILE_MAX_BUCKETS {
                    return None;
                }
                self.nbuckets += 1;
                b.used = 1;
                b.hash = hash;
                b.size = size;
                b.depth = stack.len() as u32;
                b.stack[..stack.len()].copy_from_slice(stack);
                return Some(i as u32);
            }
            if b.hash == hash && b.size == size && b.depth as usize == stack.len() && b.stack[..stack.len()] == *stack {
                return Some(i as u32);
            }
            i = (i + 1) & mask;
        }
    }

    /// Bucket `i` (below [`PROFILE_BUCKETS`]).
    pub fn bucket_at(&mut self, i: u32) -> &mut Bucket {
        debug_assert!((i as usize) < PROFILE_BUCKETS);
        // SAFETY: `i < PROFILE_BUCKETS`, tables ready, ours under the lock.
        unsafe { &mut *self.buckets.add(i as usize) }
    }

    fn special_at(&mut self, i: usize) -> &mut Special {
        // SAFETY: callers mask `i` below `PROFILE_SPECIALS`; tables ready, ours under the lock.
        unsafe { &mut *self.specials.add(i) }
    }

    /// Records the live sampled object at `addr`; `false` when the table is (three quarters) full.
    pub fn insert_special(&mut self, s: Special) -> bool {
        if self.live_specials >= PROFILE_SPECIALS / 4 * 3 {
            return false;
        }
        let mask = PROFILE_SPECIALS - 1;
        let mut i = addr_hash(s.addr) & mask;
        while self.special_at(i).addr != 0 {
            i = (i + 1) & mask;
        }
        *self.special_at(i) = s;
        self.live_specials += 1;
        true
    }

    /// Removes and returns the record of `addr`, if any (linear probing with backward-shift deletion, so the
    /// table needs no tombstones).
    pub fn remove_special(&mut self, addr: usize) -> Option<Special> {
        let i = self.find_special(addr)?;
        let found = *self.special_at(i);
        let mask = PROFILE_SPECIALS - 1;
        let mut hole = i;
        let mut j = (i + 1) & mask;
        loop {
            let e = *self.special_at(j);
            if e.addr == 0 {
                break;
            }
            let home = addr_hash(e.addr) & mask;
            // Move `e` into the hole unless its home lies cyclically in (hole, j].
            let dist_home = j.wrapping_sub(home) & mask;
            let dist_hole = j.wrapping_sub(hole) & mask;
            if dist_home >= dist_hole {
                *self.special_at(hole) = e;
                hole = j;
            }
            j = (j + 1) & mask;
        }
        self.special_at(hole).addr = 0;
        self.live_specials -= 1;
        Some(found)
    }

    /// The index of the record of `addr`, if any.
    pub fn find_special(&mut self, addr: usize) -> Option<usize> {
        if self.state != TableState::Ready {
            return None;
        }
        let mask = PROFILE_SPECIALS - 1;
        let mut i = addr_hash(addr) & mask;
        loop {
            let a = self.special_at(i).addr;
            if a == addr {
                return Some(i);
            }
            if a == 0 {
                return None;
            }
            i = (i + 1) & mask;
        }
    }

    /// Record `i` (from [`Tables::find_special`]).
    pub fn special(&mut self, i: usize) -> Special {
        *self.special_at(i & (PROFILE_SPECIALS - 1))
    }

    /// Takes a free slot of the region; its index.
    pub fn take_slot(&mut self) -> Option<usize> {
        for (w, word) in self.slots.iter_mut().enumerate() {
            if *word != u64::MAX {
                let b = (!*word).trailing_zeros() as usize;
                *word |= 1 << b;
                return Some(w * 64 + b);
            }
        }
        None
    }

    /// Gives slot `i` back.
    pub fn put_slot(&mut self, i: usize) {
        self.slots[i / 64] &= !(1 << (i % 64));
    }

    /// Takes the most recently freed warm slot; its index (its committed pages: `slot_npages`).
    pub fn take_warm(&mut self) -> Option<usize> {
        self.nwarm = self.nwarm.checked_sub(1)?;
        Some(self.warm[self.nwarm] as usize)
    }

    /// Keeps freed slot `i`, its `slot_npages` still committed, for a later sample (the caller checks the
    /// warm budget; there is room for every slot).
    pub fn put_warm(&mut self, i: usize) {
        debug_assert!(self.nwarm < REGION_SLOTS && self.slot_npages[i] > 0);
        self.warm[self.nwarm] = i as u16;
        self.nwarm += 1;
    }
}

/// FNV-1a over the stack's frames and the size.
fn stack_hash(stack: &[usize], size: usize) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &w in stack.iter().chain(core::iter::once(&size)) {
        h ^= w as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// Home index of an address in the specials table (objects are at least 8-byte aligned).
fn addr_hash(addr: usize) -> usize {
    ((addr as u64 >> 3).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 32) as usize
}
