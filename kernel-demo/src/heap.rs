//! The kernel heap.
//!
//! SEAM: for now a stand-in, `linked_list_allocator` over a static array, so that `alloc` works in the
//! demo and in test kernels. The goheap-in-the-kernel issue replaces this file's contents: a goheap page
//! source over the usable regions of the boot memory map (reached through the physical-memory mapping at
//! `BootInfo::physical_memory_offset`, see `crate::BOOTLOADER_CONFIG`) and goheap as `#[global_allocator]`.
//! Callers only use [`init`] and [`HEAP_SIZE`].

use core::sync::atomic::{AtomicBool, Ordering};
use linked_list_allocator::LockedHeap;

/// Size of the stand-in heap.
pub const HEAP_SIZE: usize = 4 << 20;

static mut HEAP_AREA: [u8; HEAP_SIZE] = [0; HEAP_SIZE];

#[global_allocator]
static ALLOCATOR: LockedHeap = LockedHeap::empty();

static INITIALISED: AtomicBool = AtomicBool::new(false);

/// Hands the static heap area to the allocator, before the first allocation. Later calls do nothing.
pub fn init() {
    if INITIALISED.swap(true, Ordering::AcqRel) {
        return;
    }
    let start = core::ptr::addr_of_mut!(HEAP_AREA).cast::<u8>();
    // SAFETY: HEAP_AREA is `HEAP_SIZE` bytes, lives for the whole run and is touched by nothing but this
    // allocator; the INITIALISED flag makes this the only `init` call on it.
    unsafe { ALLOCATOR.lock().init(start, HEAP_SIZE) };
}
