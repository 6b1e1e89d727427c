//! Spans (Go's `mspan.go`): a run of pages serving one size class or one large object.
//!
//! See `lib.rs` for an overview of the allocator.
//!
//! # Access discipline
//!
//! Spans are handled through raw `NonNull<Span>` pointers: descriptors come from the heap's fixed-size
//! allocator and are recycled, and different fields are guarded by different owners. Code never forms a
//! `&mut Span`; it reads and writes fields through raw places and takes shared references only to the atomic
//! fields. Who may touch what:
//!
//! | fields | written by | while |
//! |---|---|---|
//! | page level (`base`, `npages`, `class`, `needzero`) | the heap | the span is not `InUse` (before publication through the page map, or after it left the page map) |
//! | `state` | the heap | atomically; read lock-free by pointer lookups |
//! | object level (`freeindex`, `alloc_cache`, `alloc_bits`, `nalloc`, ...) | the span's owner | owner = the CPU cache that caches it, else the holder of its class's `Central` lock |
//! | `free_bits` | anyone holding the class's `Central` lock | atomically (fetch_or); folded by the owner |

use core::sync::atomic::{AtomicU64, AtomicU8};

/// Largest object count of any span: an 8 KiB page of 8 B objects.
pub const MAX_OBJS_PER_SPAN: usize = crate::PAGE_SIZE / 8;
/// Words in a per-span object bitmap: `MAX_OBJS_PER_SPAN / 64`.
pub const SPAN_BITMAP_WORDS: usize = MAX_OBJS_PER_SPAN / 64;

/// Life-cycle state of a span descriptor.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SpanState {
    /// Descriptor is free (in the fixed-size allocator) or describes no memory.
    Dead = 0,
    /// Pages belong to a live small-object span or a live large object.
    InUse = 1,
}

/// A span descriptor (Go's `mspan`).
#[repr(C)]
pub struct Span {
    // ---- Page level: owned by the heap (see the module docs) -------------------------------------------
    /// Address of the first byte. Page aligned.
    pub(crate) base: usize,
    /// Length in pages. `npages >= 1`.
    pub(crate) npages: usize,
    /// [`SpanState`] as `u8`; read without locks.
    pub(crate) state: AtomicU8,
    /// Size class; 0 for a large-object span.
    pub(crate) class: u8,
    /// The memory may hold non-zero bytes (used before, or the source does not return zeroed pages).
    pub(crate) needzero: bool,
    /// Intrusive list links (heap free-descriptor lists, central span lists). Guarded by whoever owns the
    /// list the span is on.
    pub(crate) next: *mut Span,
    pub(crate) prev: *mut Span,
    // (page-level work: add further page-level fields here)

    // ---- Object level: owned by the caching CPU, else by the class's Central lock ----------------------
    /// Object size in bytes (`npages * PAGE_SIZE` for a large span).
    pub(crate) elemsize: u32,
    /// Objects in the span: `nelems = npages * PAGE_SIZE / elemsize` (1 for a large span).
    pub(crate) nelems: u16,
    /// `objindex(offset) = (offset * divmagic) >> 32` (Go's `divMagic`).
    pub(crate) divmagic: u32,
    /// Object bitmap bookkeeping; see `SpanObjects` in this module.
    pub(crate) freeindex: u16,
    pub(crate) nalloc: u16,
    pub(crate) alloc_cache: u64,
    pub(crate) alloc_bits: [u64; SPAN_BITMAP_WORDS],
    /// Frees of objects in a span currently cached by a CPU, waiting to be folded back by that CPU.
    pub(crate) free_bits: [AtomicU64; SPAN_BITMAP_WORDS],
}
