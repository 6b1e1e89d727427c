//! The fuzz harness shared by the fuzz targets (`fuzz_targets/*.rs`, built by cargo-fuzz on nightly) and the
//! host test `tests/fuzz_regressions.rs` (which includes this file with `#[path]` and replays the committed
//! corpus and the regression inputs on stable). Both run an input through exactly the same code.
//!
//! An input is a byte string decoded by [`input::Input`] (a missing byte reads as 0, so every input is
//! valid): a header picks the configuration (page source, CPU provider, debug knobs, commit budget), then
//! each following group of bytes is one operation on a fresh [`goheap::Malloc`]:
//! alloc / alloc_zeroed / realloc / free with layouts across every tier (tiny, small, large; alignments up to
//! 2 MiB), memory-limit changes, `release_all`, `background`, `flush_cpu_cache`, `validate`, a batch of
//! operations on another thread, commit failures of the bounded source, profile-rate changes, and (target
//! `bad_free`) injected bad frees.
//!
//! Every result is checked against a shadow model ([`model::Shadow`]): each live block is filled with a
//! pattern derived from its id and verified before it is freed or reallocated, `alloc_zeroed` blocks read
//! zero, pointers are aligned, no two live blocks overlap, a null return happens only where memory may run
//! out, and once everything is freed the statistics count no live object. A violation panics with the
//! address and what was expected, which the fuzzer records as a crash.

pub mod harness;
pub mod input;
pub mod model;
pub mod report;
pub mod sources;

pub use harness::{run, Options};

/// Runs `data` as target `ops`: valid operations only; any bad-free report is a failure.
pub fn run_ops(data: &[u8]) {
    run(data, Options { inject: false })
}

/// Runs `data` as target `bad_free`: valid operations mixed with injected bad frees, each of which must be
/// reported (or, where `checks` does not promise a report, be harmless). Every kind of the catalogue is
/// injected, the tiny double free, the aligned tiny interior pointer and `realloc` of a bad pointer included
/// (issue 12's last defects, which until their fix had to be switched on apart).
pub fn run_bad_free(data: &[u8]) {
    run(data, Options { inject: true })
}
