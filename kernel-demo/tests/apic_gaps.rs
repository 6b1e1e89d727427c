//! Test kernel: APIC IDs with gaps still give dense CPU indices.
//!
//! QEMU's topology below (2 sockets of 3 cores, 4 of the 6 CPUs present) numbers APIC IDs by socket,
//! core and thread fields rounded up to powers of two: socket 1 starts at APIC ID 4, so the present CPUs
//! are 0, 1, 2 and 4 (and the MADT lists 5 and 6 as disabled hot-plug slots). The runner passes `-smp 4`
//! first; QEMU merges the later `-smp` options into it (commas in `qemu-args` stand for spaces, so each
//! key gets its own `-smp`).
//!
//! xtask: smp=4 timeout=120
//! xtask: qemu-args=-smp,sockets=2,-smp,cores=3,-smp,threads=1,-smp,maxcpus=6
#![no_std]
#![no_main]
#![feature(custom_test_frameworks)]
#![test_runner(kernel_demo::test_runner)]
#![reexport_test_harness_main = "test_main"]

use bootloader_api::BootInfo;
use core::sync::atomic::{AtomicU64, Ordering};
use kernel_demo::percpu::{self, PerCpu, CPU_MAP};
use kernel_demo::{apic, serial_println, smp};

const N: usize = smp::MAX_CPUS;
/// Per dense index: the APIC ID (register) and `current_index()` the CPU saw, +1 (0 = not seen).
static SEEN_APIC: [AtomicU64; N] = [const { AtomicU64::new(0) }; N];
static SEEN_INDEX: [AtomicU64; N] = [const { AtomicU64::new(0) }; N];

fn record() {
    let i = percpu::current_index().expect("per-CPU data set up");
    SEEN_APIC[i].store(u64::from(apic::id()) + 1, Ordering::Release);
    SEEN_INDEX[i].store(i as u64 + 1, Ordering::Release);
}

fn ap_main(cpu: &'static PerCpu) -> ! {
    serial_println!("AP up: APIC ID {} index {}", cpu.apic_id, cpu.index);
    record();
    loop {
        x86_64::instructions::interrupts::enable_and_hlt();
    }
}

/// The set-up before the cases.
fn boot(boot_info: &'static mut BootInfo) {
    kernel_demo::init();
    let madt = smp::init_bsp(boot_info).expect("smp::init_bsp");
    for c in madt.cpus() {
        serial_println!(
            "MADT: APIC ID {} {}",
            c.apic_id,
            if c.enabled { "enabled" } else { "disabled (hot-plug slot)" }
        );
    }
    let n = smp::start_aps(ap_main);
    serial_println!("{n} CPUs online");
    record();
}

kernel_demo::test_kernel!(boot);

#[test_case]
fn apic_ids_have_a_gap() {
    let madt = smp::madt().unwrap();
    let mut ids = [0u32; 4];
    assert_eq!(madt.enabled_count(), 4);
    for (slot, id) in ids.iter_mut().zip(madt.enabled()) {
        *slot = id;
    }
    ids.sort_unstable();
    assert_eq!(ids, [0, 1, 2, 4], "QEMU's topology (2 sockets x 3 cores, 4 present) gives APIC IDs 0, 1, 2, 4");
}

#[test_case]
fn all_cpus_online() {
    assert_eq!(smp::online(), 4);
    assert_eq!(smp::ap_failures(), 0);
}

#[test_case]
fn indices_are_dense_despite_the_gap() {
    for i in 0..4 {
        assert_eq!(SEEN_INDEX[i].load(Ordering::Acquire), i as u64 + 1, "index {i} not seen by its CPU");
        let apic_id = (SEEN_APIC[i].load(Ordering::Acquire) - 1) as u32;
        assert_eq!(CPU_MAP.index_of(apic_id), Some(i), "APIC ID {apic_id}");
        assert_eq!(percpu::get(i).unwrap().apic_id, apic_id);
    }
    assert_eq!(CPU_MAP.index_of(3), None, "APIC ID 3 does not exist here");
    assert_eq!(CPU_MAP.index_of(4), Some(3), "APIC ID 4 (socket 1) got the next dense index");
    assert_eq!(CPU_MAP.len(), 4);
    assert!(percpu::get(4).is_none());
}

#[test_case]
fn shootdown_reaches_the_cpu_past_the_gap() {
    let before = percpu::get(3).unwrap().shootdowns_done.load(Ordering::Relaxed);
    smp::tlb_shootdown(0xFFFF_FF80_0000_0000, 4096);
    assert_eq!(percpu::get(3).unwrap().shootdowns_done.load(Ordering::Relaxed), before + 1);
}
