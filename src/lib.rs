//! goheap: Go's runtime allocator for kernels and bare metal.
//!
//! goheap brings the design of Go's memory allocator (`runtime/malloc.go` and friends, itself descended from
//! TCMalloc) to `no_std` Rust: size classes, per-CPU caches, per-class central lists and a page heap with a
//! radix-tree page allocator and a scavenger, all generic over a [`PageSource`](source::PageSource) that
//! provides memory (a kernel's frame allocator and page tables, or `mmap` on a host).
//!
//! # Getting started
//!
//! - **A Linux program:** `goheap::Hosted` as the `#[global_allocator]` (feature `std`; example in the
//!   `hosted` module's docs).
//! - **An x86_64 kernel:** the adapters of `goheap::x86_64` (feature `x86_64`): a page source over the
//!   `x86_64` crate's frame allocator and page tables, and interrupts-off CPU providers (`IrqSingle` for one
//!   CPU, `IrqCpus` keyed by APIC ID for several). The README's "Using goheap as your kernel heap" walks
//!   through the wiring.
//! - **Anything else:** implement [`PageSource`](source::PageSource) (its docs have a complete example over
//!   always-mapped memory) and [`CpuProvider`](cpu::CpuProvider), and build a [`Malloc`] in a `static`.
//!
//! The crate starts no threads and never allocates from itself: memory goes back to the page source only
//! through [`Malloc::background`] (call it from an idle loop, a timer or a thread), [`Malloc::release_all`]
//! and the soft limit of [`Malloc::set_memory_limit`].
//!
//! ## Features
//!
//! | feature | what it adds |
//! |---|---|
//! | `std` | `Hosted`, the `mmap` page source (`source::mmap`), per-thread cache slots (`cpu::ThreadSlots`), the scavenger thread (`page::heap::scavenger::spawn_scavenger`) |
//! | `x86_64` | the kernel adapters of `goheap::x86_64` (the `x86_64` crate 0.15) |
//! | `checks` | every free verified at once (double, foreign, interior, misaligned, wrong-layout frees reported with the address, span and class) and freed objects poisoned and verified when reused; costs nothing on the fast path when off |
//! | `validate` | whole-heap consistency walks (`Malloc::validate`), for tests |
//! | `generator` | the size-class table generator (implies `std`) |
//!
//! No feature is on by default: the default build is `no_std` and needs no `alloc`. The minimum supported
//! Rust version is 1.84 (Cargo.toml's `rust-version`, built by `cargo xtask test`).
//!
//! # Overview
//!
//! This overview plays the part of the long comment that opens Go's `malloc.go`. Each tier's module starts
//! with "See `lib.rs` for an overview of the allocator" and then states its own invariants and locks.
//!
//! ## Glossary
//!
//! | term | Go's name | module | what it is |
//! |---|---|---|---|
//! | page | page | this file | 8 KiB ([`PAGE_SIZE`]), the heap's unit of memory |
//! | span | `mspan` | [`page::span`] | a run of pages holding objects of one size class, or one large object |
//! | size class | size class | [`object::sizeclass`] | one of 67 object sizes from 8 B to 32 KiB, with its span length |
//! | tiny class | `tinySpanClass` | [`object::class`] | the 16-byte blocks small requests are packed into, with their start and freed masks |
//! | CPU cache | `mcache` | [`object::cpucache`] | per-CPU spans and stocks of freed objects; the lock-free fast path |
//! | central list | `mcentral` | [`object::central`] | per-class spans no CPU caches, under a per-class lock |
//! | page heap | `mheap` | [`page::heap`] | spans, the page-to-span map, large objects, growth |
//! | page allocator | `pageAlloc` | [`page::pagealloc`] | radix tree of bitmaps and summaries over the heap's pages |
//! | page cache | `pageCache` | [`page::heap::pagecache`] | per-CPU 64-page block for small spans without the heap lock |
//! | scavenger | `mgcscavenge` | [`page::heap::scavenger`] | gives free pages back to the page source; the memory limit |
//! | page source | `sys*` (`mem_*.go`) | [`source`] | reserve, commit and decommit memory |
//! | CPU provider | the P | [`cpu`] | which CPU cache the caller may use, and the guard that makes it exclusive |
//!
//! ## Layout: one module per tier, dependencies pointing down
//!
//! | level | modules | main types |
//! |---|---|---|
//! | primitives | [`sync`]: the atomics and the spin lock (loom's under `--cfg loom`) | [`SpinMutex`](sync::SpinMutex) |
//! | contracts | [`cpu`], [`source`] | [`CpuProvider`](cpu::CpuProvider), [`Guarded`](cpu::Guarded), [`PageSource`](source::PageSource) |
//! | page level | [`page`]: `span`, `fixalloc`, `pagealloc`, `heap` (with `pagecache`, `scavenger`) | `Span`, `PageAlloc`, `Heap` |
//! | reports | [`check`] | `BadFree` |
//! | object level | [`object`]: `sizeclass`, `class`, `central`, `cpucache` | `SizeClass`, `Central`, `CpuCache` |
//! | statistics | [`stats`] | `MemStats` |
//! | allocator | [`malloc`]: routing, `alloc`, `free`, `maintenance`, `profile`, `report`, `api` | [`Malloc`] |
//! | adapters | `hosted` (feature `std`), `x86_64` (feature `x86_64`; `x86_64/frames`, `x86_64/kernel` with `bootloader_api`) | `Hosted`, `FrameSource`, `IrqCpus`, `IrqSingle`, `BootFrames`, `KernelHeap` |
//!
//! A module imports only from its own row or the rows before it in this table (so no lower tier knows a
//! higher one, and no two modules import each other); `tests/layering.rs` checks it on every test run.
//!
//! ## The allocation path ([`Malloc::alloc`], Go's `mallocgc`)
//!
//! 1. Route by size and alignment (one function decides for alloc, free and realloc):
//!    tiny (`size <= 8`, `align <= 8`; Go's bound is 16, see `object/cpucache.rs`), small (`size <= 32 KiB`, some class aligned enough) or large.
//! 2. Enter the CPU cache: the [`CpuProvider`](cpu::CpuProvider) returns this CPU's cache index and a guard
//!    (interrupts off in a kernel; a per-thread slot on a host). No lock, no atomic read-modify-write. The
//!    fast path (steps 3 and the free's step 2 when nothing overflows) is a *leaf section* that calls
//!    nothing, so on a host the guard is one thread-local load; the general path marks the cache busy.
//! 3. Small: pop the class's stock of freed objects; if empty, take the next free object of the cached span
//!    from its `alloc_cache` (count trailing zeros, advance `freeindex`: Go's `nextFreeFast`).
//! 4. If the span is used up: fold the frees other CPUs deferred to it (a local sweep); failing that, put
//!    it at the back of the class's *held* spans (it stays cached by this CPU, up to `HELD_BYTES` of them)
//!    and take back the oldest held span if other CPUs have freed into it since (the same local sweep, no
//!    lock); failing that, give the oldest held span to its central list if the cache holds too many, and
//!    take one with free objects under the class's lock (Go's `refill`).
//! 5. If the central list has none: the page heap allocates a span, from the CPU's page cache when small
//!    (no heap lock), else from the radix-tree page allocator under the heap lock, growing the heap by
//!    committing pages from the page source when needed.
//! 6. Tiny: bump an offset in the CPU's current 16-byte block; take a new block (a small allocation of the
//!    tiny class) when the request does not fit. Both run in a leaf section (the tiny fast path, out of
//!    line) while the new block comes off the tiny class's stock or cached span; else the general path.
//! 7. Large: a span of whole pages straight from the page heap, any alignment.
//!
//! If the page allocator, the arena bound or the page source says no, every step unwinds without changing
//! state; the allocator then reclaims (as Go's `mheap.alloc` does before it fails: the calling CPU's stocks,
//! spans and page cache, every empty span of the central lists, and a flush request every other CPU honours
//! at its next entry; see `malloc/reclaim.rs`) and retries once before `alloc` returns null.
//!
//! ## The free path ([`Malloc::dealloc`]; Go has none, its GC frees)
//!
//! 1. Route by the layout, as for allocation.
//! 2. Small: check the pointer lies in the arena and carries no stock key (see "Bad input"), then push the
//!    object on this CPU's stock for its class (no lock, no atomic). When the stock
//!    exceeds its bound, the bound doubles if this CPU also ran the class dry since it last grew and the
//!    class and the cache may still grow (tcmalloc's cache resizing; the background step shrinks it
//!    again), else half the stock, at most `FLUSH_SLICE_OBJS` (64) objects, goes to the central list:
//!    under the class lock, each bitmap word's worth of objects is folded into its span at once if no CPU
//!    caches the span, else recorded in the span's atomic `free_bits` for the caching CPU to fold (so no
//!    free ever takes another CPU's lock).
//! 3. Tiny: check the block's starts mask (an object starts here) and set the object's bit in the block's
//!    done mask (one `fetch_or`: objects of a block may be freed on several CPUs; a bit already set is a
//!    double free); the free that completes a retired block's done mask frees the block as a small object.
//!    A free in a live tiny span's blocks (a page-map lookup) runs in a leaf section: the `fetch_or` is
//!    this path's one atomic read-modify-write, as objects of one block may be freed on several CPUs.
//! 4. Large: look up the span in the page map and return its pages to the page heap.
//!
//! ## Background work (the sweeper and scavenger goroutines of Go)
//!
//! The crate starts no threads. [`Malloc::background`] is called from a kernel's idle loop or timer interrupt
//! or a host thread: it folds deferred frees into the calling CPU's spans, returns empty spans from the central
//! lists to the page heap (Go's sweeper), and runs one budgeted step of the scavenger, which decommits free
//! pages down to a retained target steered by the recent peak and the soft memory limit (GOMEMLIMIT). Its pace
//! follows allocation volume and each CPU's own calls (or a clock), not the total number of calls: a call
//! that finds the heap idle sweeps and scavenges several budgets' worth, so an idle loop at a timer rate
//! returns a freed burst within about a second. Above the memory limit, allocation and the background
//! step reclaim as above (backing off while the live heap itself is above the limit). Like every entry
//! point it runs inside the CPU provider's guard, so an interrupt handler may call it (see "Interrupts and
//! signals" in [`cpu`]); the step keeps interrupts off for its length, which its budget bounds.
//!
//! ## What was adapted from Go, and why
//!
//! - **Explicit frees.** Go frees only by sweeping after a GC marks; goheap's `dealloc` is explicit, so the
//!   sweep became "fold deferred frees" and "return empty spans" (`central.rs`), and tcmalloc-style per-CPU
//!   stocks make a free as cheap as an allocation (`cpucache.rs`). Go's `mcache` gives a used-up span back
//!   to its `mcentral` at once (the GC will find its frees); goheap's CPU keeps holding it for a while, so
//!   frees from other CPUs flow back to the allocating CPU without the central list (`cpucache.rs`, "Held
//!   spans": what snmalloc and mimalloc get from slabs owned by their allocator).
//! - **Tiny blocks** are reused when a block's done mask says all their objects were freed, not when the GC
//!   finds the block dead (`cpucache.rs`).
//! - **Allocate-black and assists** have no counterpart: there is no collector to pace.
//! - **Per-CPU, not per-P**: the CPU provider supplies the exclusivity Go gets from its scheduler (`cpu.rs`).
//! - **The scavenger's goal** comes from the heap's own recent peak instead of the GC's heap goal.
//!
//! ## Concurrency and zeroing guarantees (spec section 3)
//!
//! Allocation is safe from any CPU or thread without outside locking; the allocator's metadata is guarded as
//! each module states. `alloc_zeroed` returns zeroed memory, skipping the clear only for memory known to be
//! zero (fresh from a source whose committed memory reads as zero and never handed out since). Pointers are
//! at least 8-byte aligned for every request of 8 bytes or more.
//!
//! ## Bad input
//!
//! The allocator never allocates from itself and never panics on out-of-memory: when memory runs out it
//! first gives back what it holds free (reclaim, see `malloc/reclaim.rs`) and retries once, then returns
//! null. Bad frees are reported with the address, span and class (see [`check`], whose module docs hold the
//! whole catalogue: each kind of bad free × tier × where the object is, with and without `checks`). In every
//! build the fast free checks that the pointer lies in the arena and is 8-byte aligned, and a free that finds
//! the stock key in the object's second word scans the stock for a double free (glibc tcache's idea); the
//! sweep reports frees of objects that were not allocated, and a tiny free checks its span's class and its
//! block's masks (interior pointers and double frees). With the
//! `checks` feature every free is verified at once (live bits) and freed small objects are
//! poisoned and verified when handed out again (Go's `clobberfree`). Use after free and overflows are caught
//! by efence mode ([`DebugFlags::EFENCE`], Go's `GODEBUG=efence=1`: freed pages are never reused) and, in
//! production, by sampled guarded allocations (KFENCE / GWP-ASan: [`Malloc::set_guarded_sample_rate`]); see
//! [`check`]'s "Use-after-free and overflow detection".
#![no_std]
#![deny(unsafe_op_in_unsafe_fn)]
#![warn(clippy::undocumented_unsafe_blocks, clippy::missing_safety_doc)]
#![warn(missing_debug_implementations)]
#![warn(missing_docs)]

#[cfg(any(feature = "std", test))]
extern crate std;

/// log2 of the page size: goheap's pages are 8 KiB, as Go's.
pub const PAGE_SHIFT: usize = 13;
/// Page size in bytes: `PAGE_SIZE = 1 << PAGE_SHIFT` = 8192.
pub const PAGE_SIZE: usize = 1 << PAGE_SHIFT;
/// Largest size served by the size classes (Go's `maxSmallSize`); larger objects take the large path.
pub const MAX_SMALL_SIZE: usize = 32 << 10;

// The contracts beside the tiers: what goheap asks of the platform.
pub mod cpu;
pub mod source;
pub mod sync;

// The tiers, bottom up (each imports only from the ones above it in this list; see "Layout" above).
// Page level: pages, spans, the page heap.
pub mod page;
// Bad-free reports: used by the object level, built on the page level.
pub mod check;
// Object level: size classes, central lists, CPU caches.
pub mod object;
// Go's MemStats and metrics, read off both levels.
pub mod stats;
// The allocator: routing between the tiers, maintenance and reports.
pub mod malloc;

// Adapters to platforms.
#[cfg(feature = "std")]
pub mod hosted;
#[cfg(all(feature = "x86_64", target_arch = "x86_64"))]
pub mod x86_64;

#[cfg(feature = "std")]
pub use hosted::Hosted;
pub use malloc::{DebugFlags, Malloc};
