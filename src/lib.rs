//! goheap: Go's runtime allocator for kernels and bare metal.
//!
//! (overview: to be written)
#![no_std]
#![deny(unsafe_op_in_unsafe_fn)]
#![warn(clippy::undocumented_unsafe_blocks, clippy::missing_safety_doc)]

#[cfg(any(feature = "std", test))]
extern crate std;

/// log2 of the page size: goheap's pages are 8 KiB, as Go's.
pub const PAGE_SHIFT: usize = 13;
/// Page size in bytes: `PAGE_SIZE = 1 << PAGE_SHIFT` = 8192.
pub const PAGE_SIZE: usize = 1 << PAGE_SHIFT;
/// Largest size served by the size classes (Go's `maxSmallSize`); larger objects take the large path.
pub const MAX_SMALL_SIZE: usize = 32 << 10;

pub mod source;
pub mod span;
pub mod fixalloc;
pub mod pagealloc;
pub mod pagecache;
pub mod heap;
pub mod scavenger;
pub mod sizeclass;
pub mod cpu;
pub mod cpucache;
pub mod central;
pub mod check;
pub mod stats;
pub mod malloc;
