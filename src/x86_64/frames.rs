//! [`BootFrames`]: a 4 KiB frame allocator over a `bootloader_api` memory map that takes frames back
//! (feature `bootloader_api`).
//!
//! See `lib.rs` for an overview of the allocator and `x86_64.rs` for the kernel adapters.
//!
//! It hands out the frames of the map's `Usable` regions at or above 1 MiB ([`LOW_MEMORY_END`]: below lie
//! real-mode leftovers and the usual home of an AP start-up trampoline, which a kernel uses directly).
//! Everything the bootloader gave the kernel (its image, stack, boot information, page tables, ramdisk) is
//! marked non-`Usable` in the map, so it is never handed out.
//!
//! Frames come from two places: first a **free stack** threaded through the freed frames themselves (each
//! free frame's first 8 bytes hold the physical address of the next one, written through the bootloader's
//! physical-memory mapping at `phys_offset`), then the part of the usable regions never handed out yet (a
//! bump cursor over the ranges). So the allocator needs no heap and no bitmap (it never allocates), its
//! state is a fixed table of ranges, and frames given back (by the heap's scavenger) are reused first.
//!
//! One [`GuardedMutex`] guards the state, taken only under [`IrqsOff`]: the heap's page source calls in here
//! with interrupts off and goheap's locks held, so an interrupt handler must never wait for this lock on a
//! CPU that holds it; the lock's token makes "interrupts are off" a type-checked precondition. Frames are
//! handed out as they are (not zeroed): `FrameSource` zeroes what it maps, and the `x86_64` mapper zeroes
//! the page tables it creates.

use super::IrqsOff;
use crate::cpu::GuardedMutex;
use bootloader_api::info::{MemoryRegion, MemoryRegionKind};
use x86_64::structures::paging::{FrameAllocator, FrameDeallocator, PhysFrame, Size4KiB};
use x86_64::PhysAddr;

const FRAME: u64 = 4096;
/// Frames below this physical address (1 MiB) are never handed out.
pub const LOW_MEMORY_END: u64 = 1 << 20;
/// Usable regions [`BootFrames`] keeps (QEMU's UEFI map has about 100); usable memory in further regions
/// is left unused and counted in [`FrameCounts::dropped_bytes`].
pub const MAX_RANGES: usize = 256;
/// Ends the free stack: physical address 0 lies below 1 MiB, so it is never a stacked frame.
const NIL: u64 = 0;

/// A snapshot of [`BootFrames`]' counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FrameCounts {
    /// Usable frames managed (at or above 1 MiB, in the kept ranges).
    pub total: usize,
    /// Frames that can be handed out now (free stack + never handed out), ignoring any limit.
    pub free: usize,
    /// Frames handed out and not given back.
    pub in_use: usize,
    /// Usable bytes not managed (below 1 MiB, partial frames, regions beyond [`MAX_RANGES`]).
    pub dropped_bytes: u64,
}

/// The allocator's state. Invariants: `free + in_use == total` (free = `stacked + untouched`); the frames
/// on the free stack, the frames from the cursor on and the frames handed out are disjoint and together
/// make up the ranges; `in_use <= limit` unless the limit was lowered below it.
#[derive(Debug)]
struct State {
    /// Usable `[start, end)` ranges, frame aligned, at or above 1 MiB, in map order.
    ranges: [(u64, u64); MAX_RANGES],
    nranges: usize,
    /// The bump cursor: range index and next never-handed-out frame in it.
    cur: usize,
    next: u64,
    /// Frames never handed out (all ranges from the cursor on).
    untouched: usize,
    /// Top of the free stack (physical address, [`NIL`] when empty) and its length.
    free_top: u64,
    stacked: usize,
    in_use: usize,
    /// `in_use` may not exceed this ([`BootFrames::set_limit`]).
    limit: usize,
    total: usize,
    dropped_bytes: u64,
    /// Where all physical memory is mapped: physical address `p` is reached at virtual `phys_offset + p`.
    phys_offset: u64,
    initialised: bool,
}

impl State {
    const fn new() -> Self {
        State {
            ranges: [(0, 0); MAX_RANGES],
            nranges: 0,
            cur: 0,
            next: 0,
            untouched: 0,
            free_top: NIL,
            stacked: 0,
            in_use: 0,
            limit: usize::MAX,
            total: 0,
            dropped_bytes: 0,
            phys_offset: 0,
            initialised: false,
        }
    }

    /// Takes the usable regions; false (and no change) if it already did.
    fn init(&mut self, regions: &[MemoryRegion], phys_offset: u64) -> bool {
        if self.initialised {
            return false;
        }
        self.initialised = true;
        self.phys_offset = phys_offset;
        for r in regions.iter().filter(|r| r.kind == MemoryRegionKind::Usable) {
            let start = r.start.max(LOW_MEMORY_END).next_multiple_of(FRAME);
            let end = r.end & !(FRAME - 1);
            if r.end > r.start {
                self.dropped_bytes += (r.end - r.start).saturating_sub(end.saturating_sub(start));
            }
            if end <= start {
                continue;
            }
            if self.nranges == MAX_RANGES {
                self.dropped_bytes += end - start;
                continue;
            }
            self.ranges[self.nranges] = (start, end);
            self.nranges += 1;
            self.total += ((end - start) / FRAME) as usize;
        }
        self.untouched = self.total;
        self.cur = 0;
        self.next = if self.nranges > 0 { self.ranges[0].0 } else { 0 };
        true
    }

    fn counts(&self) -> FrameCounts {
        FrameCounts {
            total: self.total,
            free: self.stacked + self.untouched,
            in_use: self.in_use,
            dropped_bytes: self.dropped_bytes,
        }
    }

    /// A free frame's physical address: the top of the free stack, else the next never-handed-out frame.
    fn allocate(&mut self) -> Option<u64> {
        if self.in_use >= self.limit {
            return None;
        }
        let addr = if self.free_top != NIL {
            let top = self.free_top;
            // SAFETY: `top` is a free frame (on the stack), reached at `phys_offset + top` through the
            // physical-memory mapping (the `BootFrames::init` contract); its first word holds the next
            // stacked frame (written by `deallocate`), and nothing else touches a free frame.
            self.free_top = unsafe { core::ptr::read_volatile((self.phys_offset.wrapping_add(top)) as *const u64) };
            self.stacked -= 1;
            top
        } else {
            while self.cur < self.nranges && self.next >= self.ranges[self.cur].1 {
                self.cur += 1;
                if self.cur < self.nranges {
                    self.next = self.ranges[self.cur].0;
                }
            }
            if self.cur >= self.nranges {
                return None;
            }
            let a = self.next;
            self.next += FRAME;
            self.untouched -= 1;
            a
        };
        self.in_use += 1;
        Some(addr)
    }

    /// Why `addr` cannot be a frame this allocator handed out, if it cannot.
    fn reject(&self, addr: u64) -> Option<&'static str> {
        if addr % FRAME != 0 {
            Some("not 4 KiB aligned")
        } else if !self.ranges[..self.nranges].iter().any(|&(s, e)| (s..e).contains(&addr)) {
            Some("not in a usable region this allocator manages")
        } else if self.in_use == 0 {
            Some("no frame is handed out")
        } else {
            None
        }
    }

    /// Pushes `addr` on the free stack.
    ///
    /// # Safety
    /// `addr` was handed out by [`State::allocate`] and nothing uses or maps it any more.
    unsafe fn deallocate(&mut self, addr: u64) {
        if let Some(why) = self.reject(addr) {
            panic!("goheap BootFrames: frame {addr:#x} given back: {why}");
        }
        // SAFETY: the caller gave the frame back, so it is ours; the physical-memory mapping reaches it.
        unsafe { core::ptr::write_volatile((self.phys_offset.wrapping_add(addr)) as *mut u64, self.free_top) };
        self.free_top = addr;
        self.stacked += 1;
        self.in_use -= 1;
    }
}

/// A frame allocator over the boot memory map that takes frames back (see the module docs): the frame
/// allocator of [`KernelHeap`](super::KernelHeap), usable on its own as `FrameSource`'s (by reference:
/// `FrameSource<_, &'static BootFrames>`, so the kernel keeps reading [`BootFrames::counts`]) and by any
/// kernel code that needs a 4 KiB frame (`(&FRAMES).allocate_frame()`).
///
/// ```no_run
/// # fn demo(boot_info: &'static bootloader_api::BootInfo) {
/// use goheap::x86_64::BootFrames;
/// use x86_64::structures::paging::FrameAllocator;
///
/// static FRAMES: BootFrames = BootFrames::new();
///
/// let offset = boot_info.physical_memory_offset.into_option().expect("map physical memory");
/// // SAFETY: the bootloader's map and its physical-memory mapping at `offset`, taken once.
/// unsafe { FRAMES.init(&boot_info.memory_regions, offset) };
/// let frame = (&FRAMES).allocate_frame();
/// assert!(frame.is_some());
/// assert_eq!(FRAMES.counts().in_use, 1);
/// # }
/// ```
#[derive(Debug)]
pub struct BootFrames {
    state: GuardedMutex<State>,
}

impl Default for BootFrames {
    fn default() -> Self {
        Self::new()
    }
}

impl BootFrames {
    /// An allocator with no frames, for a `static`; [`BootFrames::init`] gives it the memory map.
    pub const fn new() -> Self {
        BootFrames { state: GuardedMutex::new(State::new()) }
    }

    /// Runs `f` on the state with interrupts off (see the module docs for why).
    fn with_state<R>(&self, f: impl FnOnce(&mut State) -> R) -> R {
        let off = IrqsOff::new();
        let mut s = self.state.lock(off.token());
        f(&mut s)
    }

    /// Takes the `Usable` regions of `regions` (the bootloader's `BootInfo::memory_regions`) at or above
    /// 1 MiB. Returns false, changing nothing, if it was called before.
    ///
    /// # Safety
    /// `phys_offset` is where the bootloader mapped all physical memory read-write
    /// (`BootInfo::physical_memory_offset`, with `mappings.physical_memory` set in the bootloader config),
    /// and nothing else uses the `Usable` frames at or above 1 MiB (the bootloader marks what it handed the
    /// kernel as non-`Usable`; the kernel must not use such frames on its own).
    pub unsafe fn init(&self, regions: &[MemoryRegion], phys_offset: u64) -> bool {
        self.with_state(|s| s.init(regions, phys_offset))
    }

    /// Whether [`BootFrames::init`] ran.
    pub fn is_initialised(&self) -> bool {
        self.with_state(|s| s.initialised)
    }

    /// The physical-memory offset given to [`BootFrames::init`] (0 before).
    pub fn phys_offset(&self) -> u64 {
        self.with_state(|s| s.phys_offset)
    }

    /// The current counters.
    pub fn counts(&self) -> FrameCounts {
        self.with_state(|s| s.counts())
    }

    /// Frames that can be handed out now (`counts().free`).
    pub fn free_count(&self) -> usize {
        self.counts().free
    }

    /// Caps the frames in use at `max_in_use` (`usize::MAX`: no cap, the default). Frames beyond the cap
    /// are refused as if memory were exhausted: for testing how a kernel (and goheap) behave out of memory.
    pub fn set_limit(&self, max_in_use: usize) {
        self.with_state(|s| s.limit = max_in_use);
    }
}

// SAFETY: every frame returned is a 4 KiB `Usable` frame at or above 1 MiB that is not on the free stack and
// was not handed out since it was last given back (the stack and the bump cursor never overlap: the cursor
// only moves forward over frames never handed out, and only handed-out frames are pushed).
unsafe impl FrameAllocator<Size4KiB> for &BootFrames {
    fn allocate_frame(&mut self) -> Option<PhysFrame<Size4KiB>> {
        let addr = self.with_state(State::allocate)?;
        Some(PhysFrame::containing_address(PhysAddr::new(addr)))
    }
}

impl FrameDeallocator<Size4KiB> for &BootFrames {
    /// Gives `frame` back (it is reused first). Panics, naming the address and the reason, for a frame
    /// this allocator cannot have handed out.
    ///
    /// # Safety
    /// `frame` came from this allocator's `allocate_frame`, was not given back since, and nothing uses or
    /// maps it any more.
    unsafe fn deallocate_frame(&mut self, frame: PhysFrame<Size4KiB>) {
        let addr = frame.start_address().as_u64();
        // SAFETY: forwarded contract.
        self.with_state(|s| unsafe { s.deallocate(addr) });
    }
}

// SAFETY: as for `&BootFrames`, to which it forwards.
unsafe impl FrameAllocator<Size4KiB> for BootFrames {
    fn allocate_frame(&mut self) -> Option<PhysFrame<Size4KiB>> {
        (&*self).allocate_frame()
    }
}

impl FrameDeallocator<Size4KiB> for BootFrames {
    /// As for `&BootFrames`.
    ///
    /// # Safety
    /// As for `&BootFrames`.
    unsafe fn deallocate_frame(&mut self, frame: PhysFrame<Size4KiB>) {
        // SAFETY: forwarded contract.
        unsafe { (&*self).deallocate_frame(frame) }
    }
}

#[cfg(test)]
mod tests {
    //! The state's logic over a host buffer standing in for physical memory: physical address `p` in the
    //! fake usable range lives at `buf + (p - BASE)`, so `phys_offset = buf - BASE` (wrapping). The
    //! interrupts-off lock (`cli`) only runs in a kernel, so these drive `State` directly.
    use super::*;
    use std::collections::BTreeSet;
    use std::vec;
    use std::vec::Vec;

    const BASE: u64 = 0x20_0000;

    fn region(start: u64, end: u64, kind: MemoryRegionKind) -> MemoryRegion {
        let mut r = MemoryRegion::empty();
        r.start = start;
        r.end = end;
        r.kind = kind;
        r
    }

    /// A buffer of `frames` frames and a state over it: the usable range `[BASE, BASE + frames * 4096)`
    /// split in two regions around a non-usable one, plus memory below 1 MiB and a partial frame.
    fn setup(frames: u64) -> (Vec<u64>, State) {
        let mut buf = vec![0u64; (frames * FRAME / 8) as usize];
        let offset = (buf.as_mut_ptr() as u64).wrapping_sub(BASE);
        let half = BASE + frames / 2 * FRAME;
        let regions = [
            region(0x1000, 0x9_f000, MemoryRegionKind::Usable),
            region(BASE, half, MemoryRegionKind::Usable),
            region(half, half, MemoryRegionKind::Bootloader),
            region(half, BASE + frames * FRAME + 100, MemoryRegionKind::Usable),
            region(0x1_0000_0000, 0x1_0010_0000, MemoryRegionKind::UnknownUefi(7)),
        ];
        let mut s = State::new();
        assert!(s.init(&regions, offset));
        assert!(!s.init(&regions, offset), "a second init changes nothing");
        (buf, s)
    }

    #[test]
    fn hands_out_each_usable_frame_once_and_none_below_1mib() {
        let (_buf, mut s) = setup(32);
        let c = s.counts();
        assert_eq!(c.total, 32);
        assert_eq!(c.free, 32);
        assert_eq!(c.dropped_bytes, 0x9_e000 + 100, "below 1 MiB and the partial frame are counted as dropped");
        let mut seen = BTreeSet::new();
        while let Some(a) = s.allocate() {
            assert!((BASE..BASE + 32 * FRAME).contains(&a) && a % FRAME == 0, "{a:#x}");
            assert!(seen.insert(a), "{a:#x} handed out twice");
        }
        assert_eq!(seen.len(), 32);
        assert_eq!(s.counts(), FrameCounts { total: 32, free: 0, in_use: 32, dropped_bytes: 0x9_e000 + 100 });
    }

    #[test]
    fn takes_frames_back_through_the_physical_mapping_and_reuses_them_first() {
        let (buf, mut s) = setup(16);
        let got: Vec<u64> = (0..10).map(|_| s.allocate().unwrap()).collect();
        // Give back every other frame: the stack is threaded through them (in the host buffer).
        for &a in got.iter().step_by(2) {
            // SAFETY: handed out above, unused.
            unsafe { s.deallocate(a) };
        }
        assert_eq!(s.counts().in_use, 5);
        assert_eq!(s.counts().free, 11);
        // The link word of the last pushed frame (got[8]) names the one pushed before it (got[6]).
        let word = |a: u64| buf[((a - BASE) / 8) as usize];
        assert_eq!(word(got[8]), got[6]);
        assert_eq!(word(got[0]), NIL);
        // Reused last in, first out, before any untouched frame.
        let again: Vec<u64> = (0..5).map(|_| s.allocate().unwrap()).collect();
        assert_eq!(again, [got[8], got[6], got[4], got[2], got[0]]);
        // Then the bump cursor continues where it stopped.
        let next = s.allocate();
        assert_eq!(next, Some(got[9] + FRAME));
        let mut all: BTreeSet<u64> = got.iter().copied().chain(next).collect();
        while let Some(a) = s.allocate() {
            assert!(all.insert(a), "{a:#x} handed out while in use");
        }
        assert_eq!(all.len(), 16);
        assert_eq!(s.counts().free, 0);
    }

    #[test]
    fn the_limit_refuses_frames_beyond_it() {
        let (_buf, mut s) = setup(8);
        s.limit = 3;
        let a: Vec<u64> = (0..3).map(|_| s.allocate().unwrap()).collect();
        assert_eq!(s.allocate(), None, "limit reached");
        // SAFETY: handed out above, unused.
        unsafe { s.deallocate(a[1]) };
        assert_eq!(s.allocate(), Some(a[1]));
        s.limit = usize::MAX;
        assert!(s.allocate().is_some());
    }

    #[test]
    fn rejects_frames_it_cannot_have_handed_out() {
        let (_buf, mut s) = setup(8);
        assert_eq!(s.reject(BASE), Some("no frame is handed out"));
        let a = s.allocate().unwrap();
        assert_eq!(s.reject(a), None);
        assert_eq!(s.reject(a + 8), Some("not 4 KiB aligned"));
        assert_eq!(s.reject(0x5000), Some("not in a usable region this allocator manages"));
        assert_eq!(s.reject(BASE + 8 * FRAME), Some("not in a usable region this allocator manages"));
    }

    #[test]
    #[should_panic(expected = "frame 0x5000 given back: not in a usable region")]
    fn giving_back_a_foreign_frame_is_reported() {
        let (_buf, mut s) = setup(8);
        s.allocate().unwrap();
        // SAFETY: rejected before anything is written.
        unsafe { s.deallocate(0x5000) };
    }

    #[test]
    fn keeps_at_most_max_ranges_and_counts_the_rest() {
        let regions: Vec<MemoryRegion> = (0..MAX_RANGES as u64 + 2)
            .map(|i| region(BASE + i * 2 * FRAME, BASE + i * 2 * FRAME + FRAME, MemoryRegionKind::Usable))
            .collect();
        let mut s = State::new();
        assert!(s.init(&regions, 0));
        assert_eq!(s.counts().total, MAX_RANGES);
        assert_eq!(s.counts().dropped_bytes, 2 * FRAME);
        // The cursor walks across ranges (no free stack here, so nothing is read through the offset).
        let mut n = 0;
        while s.allocate().is_some() {
            n += 1;
        }
        assert_eq!(n, MAX_RANGES);
    }
}
