//! Physical frames: goheap's `BootFrames` (`goheap::x86_64`), the frame allocator inside the kernel heap
//! ([`crate::heap::HEAP`]`.frames()`), which `heap::init_goheap` gives the boot memory map. It hands out the
//! usable frames at or above 1 MiB ([`LOW_MEMORY_END`]: below, the AP start-up trampoline and real-mode
//! leftovers, which the CPU bring-up uses directly) and takes frames back on a free stack threaded through
//! the free frames. These functions are the kernel's reports and the `--oom` demo's cap on it.

use crate::heap::HEAP;
pub use goheap::x86_64::{FrameCounts, LOW_MEMORY_END};

/// Current counts (total, free, in use, bytes not managed).
pub fn counts() -> FrameCounts {
    HEAP.frames().counts()
}

/// Frames that can be handed out now.
pub fn free_count() -> usize {
    HEAP.frames().free_count()
}

/// Caps the frames in use at `max_in_use` (`usize::MAX`: no cap). Frames beyond the cap are refused as if
/// memory were exhausted: the `--oom` demo and the `oom` test kernel use it to run out of memory quickly.
pub fn set_limit(max_in_use: usize) {
    HEAP.frames().set_limit(max_in_use);
}
