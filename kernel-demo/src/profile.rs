//! goheap's heap profile in the kernel: a frame-pointer stack walk for goheap's stack hook, and the dump of
//! the profile over serial (the demo's `--profile`, the `heap_profile` test kernel), which `cargo xtask
//! profile` turns into a pprof file.
//!
//! The kernel target spec builds everything with frame pointers (`"frame-pointer": "always"` in
//! `x86_64-target.json`), so each frame starts with the saved `rbp` of its caller and the return address
//! above it. The walk follows that chain up to a stack top the caller sets ([`set_stack_top`]): a walk that
//! starts on another stack, or finds a link that does not go up the stack by less than 64 KiB, stops.
//!
//! Wire: the dump is goheap's wire format (`goheap::malloc::wire_header`, `ProfileRecord::to_wire`) in base64
//! lines between [`BEGIN`] and [`END`]; the begin line also carries the kernel's load offset
//! (`BootInfo::kernel_image_offset`) so the host can resolve the return addresses against the ELF.

use crate::heap::HEAP;
use crate::serial_println;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicUsize, Ordering};
use goheap::malloc::{wire_header, WIRE_RECORD_MAX};

/// First line of a dump (followed by ` image_offset=0x...`).
pub const BEGIN: &str = "-----BEGIN GOHEAP HEAP PROFILE-----";
/// Last line of a dump.
pub const END: &str = "-----END GOHEAP HEAP PROFILE-----";

/// The highest address a stack walk may read (the caller's own frame: set by whoever runs the profiled
/// work on this stack); 0: walks capture nothing.
static STACK_TOP: AtomicUsize = AtomicUsize::new(0);

/// Bounds the walk to the stack of the caller's frame: call it from the function under which the profiled
/// work runs, with the address of one of its locals.
pub fn set_stack_top(top: usize) {
    STACK_TOP.store(top, Ordering::Relaxed);
}

/// goheap's stack hook: the return addresses of the frame-pointer chain, innermost first.
pub fn fp_stack(frames: &mut [usize]) -> usize {
    let top = STACK_TOP.load(Ordering::Relaxed);
    let mut fp: usize;
    // SAFETY: reads `rbp`, no memory access.
    unsafe { core::arch::asm!("mov {}, rbp", out(reg) fp, options(nomem, nostack, preserves_flags)) };
    let mut n = 0;
    while n < frames.len() && fp != 0 && fp % 8 == 0 && fp < top {
        // SAFETY: `fp` is a frame record of this stack below `top` (every frame has one with frame pointers
        // forced, and each link was checked to go up this stack): its two words are mapped and readable.
        let (next, ret) = unsafe { (*(fp as *const usize), *((fp + 8) as *const usize)) };
        if ret == 0 {
            break;
        }
        frames[n] = ret;
        n += 1;
        if next <= fp || next - fp > 64 << 10 {
            break;
        }
        fp = next;
    }
    n
}

/// Prints goheap's heap profile, sampled at `rate`, over serial: [`BEGIN`], the wire form in base64 lines,
/// [`END`]. (The caller may have turned sampling off for the dump itself: the rate is the workload's.)
pub fn dump(rate: usize, image_offset: u64) {
    let mut records = Vec::new();
    HEAP.heap_profile(|r| records.push(*r));
    let mut bytes = Vec::new();
    bytes.extend_from_slice(&wire_header(rate));
    let mut buf = [0u8; WIRE_RECORD_MAX];
    for r in &records {
        let n = r.to_wire(&mut buf);
        bytes.extend_from_slice(&buf[..n]);
    }
    let dropped = HEAP.profile_dropped();
    serial_println!(
        "heap profile: {} buckets at rate {}, {} bytes; dropped {} records, {} untracked, {} without stack",
        records.len(),
        rate,
        bytes.len(),
        dropped.records,
        dropped.untracked,
        dropped.no_stack
    );
    serial_println!("{BEGIN} image_offset={image_offset:#x}");
    for chunk in bytes.chunks(57) {
        let mut line = [0u8; 76];
        let n = base64(chunk, &mut line);
        serial_println!("{}", core::str::from_utf8(&line[..n]).unwrap_or(""));
    }
    serial_println!("{END}");
}

/// Standard base64 (RFC 4648, with padding) of `src` into `out` (at least `4 * ceil(len / 3)` bytes);
/// returns the length written.
fn base64(src: &[u8], out: &mut [u8]) -> usize {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut n = 0;
    for c in src.chunks(3) {
        let w = (c[0] as u32) << 16 | (*c.get(1).unwrap_or(&0) as u32) << 8 | *c.get(2).unwrap_or(&0) as u32;
        for i in 0..4 {
            out[n + i] = if i <= c.len() { ALPHABET[(w >> (18 - 6 * i)) as usize & 63] } else { b'=' };
        }
        n += 4;
    }
    n
}

/// The profiled workload of `--profile`: three allocation sites with known totals, so the profile can be
/// checked against them (`cargo xtask profile` prints the `-top` view).
/// - [`profile_site_live`]: 4096 live 256 B boxes (1 MiB in use);
/// - [`profile_site_freed`]: 8192 buffers of 1000 B, all freed (8 MB allocated, none in use);
/// - [`profile_site_large`]: 16 live 64 KiB buffers (1 MiB in use, large objects).
///
/// Returns what it keeps live (the caller drops it after the dump).
#[inline(never)]
pub fn workload() -> Vec<Vec<u8>> {
    let mut keep = Vec::new();
    profile_site_live(&mut keep);
    profile_site_freed();
    profile_site_large(&mut keep);
    keep
}

/// 4096 live 256 B allocations.
#[inline(never)]
pub fn profile_site_live(keep: &mut Vec<Vec<u8>>) {
    for i in 0..4096 {
        keep.push(alloc::vec![i as u8; 256]);
    }
}

/// 8192 allocations of 1000 B, each freed at once.
#[inline(never)]
pub fn profile_site_freed() {
    for i in 0..8192 {
        let v = alloc::vec![i as u8; 1000];
        core::hint::black_box(&v);
    }
}

/// 16 live 64 KiB allocations.
#[inline(never)]
pub fn profile_site_large(keep: &mut Vec<Vec<u8>>) {
    for i in 0..16 {
        keep.push(alloc::vec![i as u8; 64 << 10]);
    }
}
