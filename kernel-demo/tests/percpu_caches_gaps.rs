//! Test kernel: the per-CPU mapping when APIC IDs have gaps. QEMU's topology below (2 sockets of 3
//! cores, 4 CPUs present) gives APIC IDs 0, 1, 2 and 4 (see `apic_gaps.rs`); goheap's caches are keyed
//! by the dense index from `CpuIndexMap`, so the CPU with APIC ID 4 must get cache 3 and its own cache.
//! Checks the APIC IDs really have the gap, then the same as `percpu_caches.rs` (in
//! `tests/common/percpu.rs`): distinct cache indices, every online CPU's cache counts its allocations, no
//! span shared by two CPUs.
//!
//! xtask: smp=4 timeout=120
//! xtask: qemu-args=-smp,sockets=2,-smp,cores=3,-smp,threads=1,-smp,maxcpus=6
#![no_std]
#![no_main]
#![feature(custom_test_frameworks)]
#![test_runner(kernel_demo::test_runner)]
#![reexport_test_harness_main = "test_main"]

extern crate alloc;

#[path = "common/percpu.rs"]
mod common;

use kernel_demo::percpu::{self, CPU_MAP};

kernel_demo::test_kernel!();

#[test_case]
fn apic_ids_have_a_gap() {
    let mut ids = [0u32; 4];
    for (i, id) in ids.iter_mut().enumerate() {
        *id = percpu::get(i).expect("CPU online").apic_id;
    }
    ids.sort_unstable();
    assert_eq!(ids, [0, 1, 2, 4], "QEMU's topology (2 sockets x 3 cores, 4 present) gives APIC IDs 0, 1, 2, 4");
    assert_eq!(CPU_MAP.index_of(4), Some(3));
}

#[test_case]
fn each_cpu_allocates_through_its_own_cache() {
    common::each_cpu_allocates_through_its_own_cache();
}
