//! Test kernel (`harness = false`): efence mode (`DebugFlags::EFENCE`, Go's `GODEBUG=efence=1`) catches a
//! use after free. A second goheap heap with efence on runs over its own `FrameSource` window (L4 entry
//! 137), mapping through the kernel heap's page-table mapper; it checks that freed objects' addresses are
//! never handed out again and that their pages go back to the frame allocator, then reads a freed object.
//! Passes only if the read page-faults at that object's address. Reaching the end, or another panic, fails.
//!
//! xtask: smp=1 timeout=180
#![no_std]
#![no_main]

extern crate alloc;

use alloc::vec::Vec;
use bootloader_api::BootInfo;
use core::alloc::Layout;
use core::fmt::Write;
use core::sync::atomic::{AtomicUsize, Ordering};
use goheap::malloc::DebugFlags;
use goheap::x86_64::{BootFrames, FrameSource, IrqSingle};
use goheap::{Malloc, PAGE_SIZE};
use kernel_demo::heap::HEAP;
use kernel_demo::testing::{self, MsgBuf};
use kernel_demo::{exit_qemu, serial_println, ExitCode};
use x86_64::structures::paging::mapper::{
    FlagUpdateError, MapToError, MapperFlush, MapperFlushAll, TranslateError, UnmapError,
};
use x86_64::structures::paging::{FrameAllocator, Mapper, Page, PageTableFlags, PhysFrame, Size4KiB};

kernel_demo::test_kernel!(must_panic: run, on_panic: |info| {
    let mut want = MsgBuf::new();
    let _ = write!(want, "page fault at address {:#x}: read", ADDR.load(Ordering::SeqCst));
    testing::expect_panic_containing(info, &[want.as_str(), "page not present"])
});

/// The object read after its free (0 until then).
static ADDR: AtomicUsize = AtomicUsize::new(0);

/// The efence heap's window: L4 entry 137 (the kernel heap has 136), unused by anything else.
const WINDOW_START: u64 = 137 << 39;
const MAX_BYTES: usize = 64 << 20;
const WINDOW_BYTES: u64 = goheap::page::heap::reservation_bytes(MAX_BYTES) as u64;

/// A `Mapper` that maps through the kernel heap's mapper (under its source's lock), so both heaps edit the
/// page tables through one `OffsetPageTable`.
struct SharedMapper;

fn with<R>(f: impl FnOnce(&mut x86_64::structures::paging::OffsetPageTable<'static>) -> R) -> R {
    HEAP.heap().source().with_mapper(|m, _| f(m)).expect("the kernel heap's source is initialised")
}

impl Mapper<Size4KiB> for SharedMapper {
    unsafe fn map_to_with_table_flags<A>(
        &mut self,
        page: Page<Size4KiB>,
        frame: PhysFrame<Size4KiB>,
        flags: PageTableFlags,
        parent_table_flags: PageTableFlags,
        frame_allocator: &mut A,
    ) -> Result<MapperFlush<Size4KiB>, MapToError<Size4KiB>>
    where
        Self: Sized,
        A: FrameAllocator<Size4KiB> + ?Sized,
    {
        // SAFETY: forwarded contract (the caller, the efence heap's `FrameSource`, maps a fresh frame into
        // its own window).
        with(|m| unsafe { m.map_to_with_table_flags(page, frame, flags, parent_table_flags, frame_allocator) })
    }

    fn unmap(&mut self, page: Page<Size4KiB>) -> Result<(PhysFrame<Size4KiB>, MapperFlush<Size4KiB>), UnmapError> {
        with(|m| m.unmap(page))
    }

    unsafe fn update_flags(
        &mut self,
        page: Page<Size4KiB>,
        flags: PageTableFlags,
    ) -> Result<MapperFlush<Size4KiB>, FlagUpdateError> {
        // SAFETY: forwarded contract.
        with(|m| unsafe { m.update_flags(page, flags) })
    }

    unsafe fn set_flags_p4_entry(
        &mut self,
        page: Page<Size4KiB>,
        flags: PageTableFlags,
    ) -> Result<MapperFlushAll, FlagUpdateError> {
        // SAFETY: forwarded contract.
        with(|m| unsafe { m.set_flags_p4_entry(page, flags) })
    }

    unsafe fn set_flags_p3_entry(
        &mut self,
        page: Page<Size4KiB>,
        flags: PageTableFlags,
    ) -> Result<MapperFlushAll, FlagUpdateError> {
        // SAFETY: forwarded contract.
        with(|m| unsafe { m.set_flags_p3_entry(page, flags) })
    }

    unsafe fn set_flags_p2_entry(
        &mut self,
        page: Page<Size4KiB>,
        flags: PageTableFlags,
    ) -> Result<MapperFlushAll, FlagUpdateError> {
        // SAFETY: forwarded contract.
        with(|m| unsafe { m.set_flags_p2_entry(page, flags) })
    }

    fn translate_page(&self, page: Page<Size4KiB>) -> Result<PhysFrame<Size4KiB>, TranslateError> {
        with(|m| m.translate_page(page))
    }
}

// SAFETY: one CPU runs this kernel (smp=1), and only this heap uses this provider.
static CPU: IrqSingle = unsafe { IrqSingle::new() };

static EFENCE: Malloc<FrameSource<SharedMapper, &BootFrames>, &IrqSingle> =
    Malloc::with_max_bytes(FrameSource::new(WINDOW_START, WINDOW_BYTES, None), &CPU, MAX_BYTES)
        .with_debug(DebugFlags::EFENCE);

fn run(boot_info: &'static mut BootInfo) -> ! {
    testing::boot(boot_info);
    kernel_demo::serial_print!("efence::use_after_free_faults...\t");
    assert!(
        with(|m| m.translate_page(Page::<Size4KiB>::containing_address(x86_64::VirtAddr::new(WINDOW_START)))).is_err(),
        "the efence window is mapped already"
    );
    // SAFETY: the window (L4 entry 137) is unused address space only this source maps; the mapper maps the
    // active tables (the kernel heap's); the kernel heap's `BootFrames` hands out frames nothing else uses.
    unsafe { EFENCE.heap().source().init(SharedMapper, HEAP.frames()) };
    let layout = Layout::from_size_align(64, 8).unwrap();

    // Addresses are never reused, and freed objects' frames go back.
    let mut seen: Vec<usize> = Vec::new();
    for i in 0..200 {
        let p = EFENCE.alloc(layout);
        assert!(!p.is_null(), "allocation {i} failed");
        assert!(!seen.contains(&(p as usize / PAGE_SIZE)), "page of {p:p} handed out again");
        seen.push(p as usize / PAGE_SIZE);
        // SAFETY: 64 bytes of ours, freed once with its layout.
        unsafe {
            p.write_bytes(0x5a, 64);
            EFENCE.dealloc(p, layout);
        }
    }
    let st = EFENCE.mem_stats();
    assert!(st.efence_retired_bytes >= 200 * 2 * PAGE_SIZE as u64, "{st:?}");
    assert!(EFENCE.heap().source().committed_frames() < 200, "freed objects' frames were not returned");

    let p = EFENCE.alloc(layout);
    assert!(!p.is_null());
    // SAFETY: 64 bytes of ours; freed once with its layout.
    unsafe {
        p.write_bytes(0xa5, 64);
        EFENCE.dealloc(p, layout);
    }
    ADDR.store(p as usize, Ordering::SeqCst);
    // SAFETY: deliberately invalid: a read after free; efence unmapped the object's pages, so it faults.
    let v = unsafe { core::ptr::read_volatile(core::hint::black_box(p)) };
    serial_println!("[failed: the read after free of {p:p} did not fault (read {v:#x})]");
    exit_qemu(ExitCode::Failed)
}
