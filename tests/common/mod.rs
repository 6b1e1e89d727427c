//! Helpers shared by the object-level tests.
#![allow(dead_code)]

use std::alloc::Layout;

/// Fills `len` bytes at `p` with a pattern derived from `seed`.
///
/// # Safety
/// `p` is valid for writes of `len` bytes (a live block of at least `len` bytes that nothing else uses).
pub unsafe fn fill(p: *mut u8, len: usize, seed: u64) {
    for i in 0..len {
        // SAFETY: `i < len` and `p` is valid for `len` bytes of writes (caller's contract).
        unsafe { *p.add(i) = pattern(seed, i) };
    }
}

/// Checks the pattern written by `fill`; returns the first bad offset.
///
/// # Safety
/// `p` is valid for reads of `len` bytes (a live block of at least `len` bytes).
pub unsafe fn check(p: *const u8, len: usize, seed: u64) -> Result<(), usize> {
    for i in 0..len {
        // SAFETY: `i < len` and `p` is valid for `len` bytes of reads (caller's contract).
        if unsafe { *p.add(i) } != pattern(seed, i) {
            return Err(i);
        }
    }
    Ok(())
}

pub fn pattern(seed: u64, i: usize) -> u8 {
    let x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15).wrapping_add((i as u64).wrapping_mul(0x2545_F491_4F6C_DD1D));
    (x >> 56) as u8 ^ (i as u8)
}

pub fn layout(size: usize, align: usize) -> Layout {
    Layout::from_size_align(size, align).unwrap()
}
