//! The object level: size classes, the central lists and the per-CPU caches.
//!
//! See `lib.rs` for an overview of the allocator.
//!
//! - [`sizeclass`]: Go's size-class table (`sizeclasses.go`), generated and checked row for row;
//! - [`class`]: allocation classes (size classes plus the tiny class) and their span shapes;
//! - [`central`]: one locked list of spans per class (Go's `mcentral`);
//! - [`cpucache`]: the per-CPU caches and the fast paths (Go's `mcache`).
//!
//! Dependencies run down only: `cpucache` uses `central`, `class` and `sizeclass`; all of them use the
//! page level (`crate::page`), never the allocator above them (`crate::malloc`).

pub mod central;
pub mod class;
pub mod cpucache;
pub mod sizeclass;
