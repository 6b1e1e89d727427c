//! Test kernel: the per-CPU mapping, 4 CPUs with dense APIC IDs. Each CPU allocates through its own
//! goheap cache: its cache index is its own dense index, distinct from the others'; the cache of every
//! online CPU counts the CPU's allocations; no span holds objects of two CPUs. (The check itself is in
//! `tests/common/percpu.rs`, shared with `percpu_caches_gaps.rs`.)
//!
//! xtask: smp=4 timeout=120
#![no_std]
#![no_main]
#![feature(custom_test_frameworks)]
#![test_runner(kernel_demo::test_runner)]
#![reexport_test_harness_main = "test_main"]

extern crate alloc;

#[path = "common/percpu.rs"]
mod common;

kernel_demo::test_kernel!();

#[test_case]
fn each_cpu_allocates_through_its_own_cache() {
    common::each_cpu_allocates_through_its_own_cache();
}
