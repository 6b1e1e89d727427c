//! The page level: memory in whole 8 KiB pages, from the page source to spans.
//!
//! See `lib.rs` for an overview of the allocator.
//!
//! Everything here deals in pages and knows nothing of objects beyond a span's shape fields:
//! - [`span`]: the span descriptor (Go's `mspan`), shared with the object level, which owns its object
//!   fields (see the field ownership table there);
//! - [`fixalloc`]: fixed-size metadata blocks (span descriptors) straight from the page source;
//! - [`pagealloc`]: the radix tree of bitmaps and summaries over the arena (Go's `pageAlloc`);
//! - [`heap`]: the page heap (Go's `mheap`), with its per-CPU [`heap::pagecache`] and the
//!   [`heap::scavenger`], both of which work on the heap's locked state.
//!
//! Dependencies run down only: `heap` uses `pagealloc`, `fixalloc` and `span`; nothing here imports the
//! object level or the allocator above it.

pub mod fixalloc;
pub mod heap;
pub mod pagealloc;
pub mod span;
