//! Physical frames: the allocator behind the kernel heap's page source (and anyone who needs a 4 KiB frame).
//!
//! It hands out the 4 KiB frames of the boot memory map's `Usable` regions, at or above 1 MiB (below 1 MiB
//! lie the AP start-up trampoline, the BIOS data areas and other real-mode leftovers, which the CPU
//! bring-up uses directly). Everything else in the map (the kernel image, its stack, the boot information,
//! the bootloader's page tables, the ramdisk) the bootloader marks non-`Usable`, so it is never handed out.
//!
//! Frames come from two places: first a **free stack**, threaded through the freed frames themselves (each
//! free frame's first 8 bytes hold the physical address of the next, written through the bootloader's
//! physical-memory mapping), then the part of the usable regions never handed out yet (a bump cursor). So
//! the allocator needs no heap and no bitmap, and frames given back by the heap's scavenger are reused first.
//!
//! One spin lock guards the state, taken with interrupts off: the heap's page source calls in here with
//! interrupts off and goheap's locks held, so no interrupt handler may ever wait for this lock while its CPU
//! holds it. Frames are handed out as they are (not zeroed): goheap's `FrameSource` zeroes what it maps and
//! the `x86_64` mapper zeroes the page tables it creates.

use bootloader_api::info::{MemoryRegionKind, MemoryRegions};
use core::sync::atomic::{AtomicU64, Ordering};
use x86_64::structures::paging::{FrameAllocator, FrameDeallocator, PhysFrame, Size4KiB};
use x86_64::PhysAddr;

const FRAME: u64 = 4096;
/// Frames below this physical address are never handed out.
pub const LOW_MEMORY_END: u64 = 1 << 20;
/// Usable regions kept (QEMU's UEFI map has about 100; the rest, if any, are left unused and counted).
const MAX_RANGES: usize = 256;
/// Marks the end of the free stack (physical address 0 is below 1 MiB, so never a stacked frame).
const NIL: u64 = 0;

struct State {
    /// Usable `[start, end)` ranges, frame aligned, at or above 1 MiB, in map order.
    ranges: [(u64, u64); MAX_RANGES],
    nranges: usize,
    /// The bump cursor: range index and next never-handed-out frame in it.
    cur: usize,
    next: u64,
    /// Frames never handed out yet (all ranges from the cursor on).
    untouched: usize,
    /// Top of the free stack and its length.
    free_top: u64,
    stacked: usize,
    /// Frames handed out and not given back.
    in_use: usize,
    /// `in_use` may not exceed this (the `--oom` demo sets it, to make "out of memory" quick).
    limit: usize,
    /// Usable frames in all kept ranges; usable bytes dropped (too many ranges, or below 1 MiB).
    total: usize,
    dropped_bytes: u64,
}

static STATE: spin::Mutex<State> = spin::Mutex::new(State {
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
});

/// The physical-memory mapping offset (`BootInfo::physical_memory_offset`), set by [`init`].
static PHYS_OFFSET: AtomicU64 = AtomicU64::new(0);

/// Runs `f` on the state with interrupts off (see the module docs for why).
fn with_state<R>(f: impl FnOnce(&mut State) -> R) -> R {
    x86_64::instructions::interrupts::without_interrupts(|| f(&mut STATE.lock()))
}

/// Takes the usable regions of the boot memory map.
///
/// # Safety
/// Call once, before any frame is requested. `phys_offset` is where the bootloader mapped all physical
/// memory (read-write), and nothing else uses the `Usable` frames at or above 1 MiB: the bootloader marked
/// everything it handed to the kernel as non-`Usable`.
pub unsafe fn init(regions: &MemoryRegions, phys_offset: u64) {
    PHYS_OFFSET.store(phys_offset, Ordering::Relaxed);
    with_state(|s| {
        for r in regions.iter().filter(|r| r.kind == MemoryRegionKind::Usable) {
            let start = r.start.max(LOW_MEMORY_END).next_multiple_of(FRAME);
            let end = r.end & !(FRAME - 1);
            if r.end > r.start {
                s.dropped_bytes += (r.end - r.start).saturating_sub(end.saturating_sub(start));
            }
            if end <= start {
                continue;
            }
            if s.nranges == MAX_RANGES {
                s.dropped_bytes += end - start;
                continue;
            }
            s.ranges[s.nranges] = (start, end);
            s.nranges += 1;
            s.total += ((end - start) / FRAME) as usize;
        }
        s.untouched = s.total;
        s.cur = 0;
        s.next = if s.nranges > 0 { s.ranges[0].0 } else { 0 };
    });
}

/// The physical-memory mapping offset given to [`init`].
pub fn phys_offset() -> u64 {
    PHYS_OFFSET.load(Ordering::Relaxed)
}

/// A frame allocator counter snapshot, for reports.
#[derive(Clone, Copy, Debug)]
pub struct FrameCounts {
    /// Usable frames managed (at or above 1 MiB).
    pub total: usize,
    /// Frames that can be handed out now (free stack + never handed out), ignoring any limit.
    pub free: usize,
    /// Frames handed out and not returned.
    pub in_use: usize,
    /// Usable bytes not managed (below 1 MiB, partial frames, ranges beyond the table).
    pub dropped_bytes: u64,
}

/// Current counts.
pub fn counts() -> FrameCounts {
    with_state(|s| FrameCounts {
        total: s.total,
        free: s.stacked + s.untouched,
        in_use: s.in_use,
        dropped_bytes: s.dropped_bytes,
    })
}

/// Frames that can be handed out now.
pub fn free_count() -> usize {
    counts().free
}

/// Caps the frames in use at `max_in_use` (`usize::MAX`: no cap). Frames beyond the cap are refused as if
/// memory were exhausted: the `--oom` demo uses it to run out of memory quickly.
pub fn set_limit(max_in_use: usize) {
    with_state(|s| s.limit = max_in_use);
}

/// A handle on the frame allocator: `FrameAllocator` + `FrameDeallocator` for 4 KiB frames. Zero-sized, so
/// goheap's `FrameSource` can own one while other kernel code uses another.
#[derive(Clone, Copy, Debug, Default)]
pub struct Frames;

// SAFETY: every frame returned is a 4 KiB `Usable` frame at or above 1 MiB that is not on the free stack
// and not handed out since it was last given back (the stack and the bump cursor never overlap: the cursor
// only moves forward over frames never handed out, and only handed-out frames are pushed).
unsafe impl FrameAllocator<Size4KiB> for Frames {
    fn allocate_frame(&mut self) -> Option<PhysFrame<Size4KiB>> {
        let offset = phys_offset();
        let addr = with_state(|s| {
            if s.in_use >= s.limit {
                return None;
            }
            let addr = if s.free_top != NIL {
                let top = s.free_top;
                // SAFETY: `top` is a free frame (on the stack), mapped at `offset + top` by the bootloader's
                // physical-memory mapping; its first word holds the next stacked frame (written by
                // `deallocate_frame`), and nobody else touches a free frame.
                s.free_top = unsafe { core::ptr::read_volatile((offset + top) as *const u64) };
                s.stacked -= 1;
                top
            } else {
                while s.cur < s.nranges && s.next >= s.ranges[s.cur].1 {
                    s.cur += 1;
                    if s.cur < s.nranges {
                        s.next = s.ranges[s.cur].0;
                    }
                }
                if s.cur >= s.nranges {
                    return None;
                }
                let a = s.next;
                s.next += FRAME;
                s.untouched -= 1;
                a
            };
            s.in_use += 1;
            Some(addr)
        })?;
        Some(PhysFrame::containing_address(PhysAddr::new(addr)))
    }
}

impl FrameDeallocator<Size4KiB> for Frames {
    /// # Safety
    /// `frame` came from [`Frames::allocate_frame`] and nothing uses it (or maps it) any more.
    unsafe fn deallocate_frame(&mut self, frame: PhysFrame<Size4KiB>) {
        let offset = phys_offset();
        let addr = frame.start_address().as_u64();
        debug_assert!(addr >= LOW_MEMORY_END);
        with_state(|s| {
            // SAFETY: the caller gave the frame back, so we own it; the physical-memory mapping reaches it.
            unsafe { core::ptr::write_volatile((offset + addr) as *mut u64, s.free_top) };
            s.free_top = addr;
            s.stacked += 1;
            s.in_use -= 1;
        });
    }
}
