//! Fill patterns for live blocks: a test writes one into every block it holds and checks it before the
//! free, so an allocator that hands out a live block twice, or writes into one, is caught at once.
//!
//! - [`fill`] / [`check`]: every byte of the block, written a word at a time (the soaks, the models);
//! - [`fill_marked`] / [`check_marked`]: only the [`marked`] bytes (the first 64, then one in 509), cheap
//!   enough for interrupt handlers under QEMU's TCG; the same set for every size, so a prefix of a
//!   reallocated block checks as it was written.
//!
//! The byte at an offset depends on the seed and the offset only, so a prefix check needs no length.

/// Word `j` of a block filled with `seed`.
#[inline]
pub fn word(seed: u64, j: usize) -> u64 {
    (seed ^ (j as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)).wrapping_mul(0xD6E8_FEB8_6659_FD93).rotate_left(29)
}

/// Byte `offset` of a block filled with `seed`: the byte of [`word`] (little-endian) it falls in.
#[inline]
pub fn byte(seed: u64, offset: usize) -> u8 {
    (word(seed, offset / 8) >> ((offset % 8) * 8)) as u8
}

/// Fills `len` bytes at `p` with the pattern of `seed` (whole words, then the tail bytes).
///
/// # Safety
/// `p` is valid for writes of `len` bytes that nothing else uses meanwhile (any alignment).
pub unsafe fn fill(p: *mut u8, len: usize, seed: u64) {
    let words = len / 8;
    for j in 0..words {
        // SAFETY: `8 * j + 8 <= len`, inside the caller's block; unaligned writes need no alignment.
        unsafe { p.add(8 * j).cast::<u64>().write_unaligned(word(seed, j)) };
    }
    for i in 8 * words..len {
        // SAFETY: `i < len`, inside the caller's block.
        unsafe { p.add(i).write(byte(seed, i)) };
    }
}

/// Checks the first `len` bytes at `p` against the pattern of `seed`; `Err` holds the first wrong offset.
///
/// # Safety
/// `p` is valid for reads of `len` bytes (any alignment).
pub unsafe fn check(p: *const u8, len: usize, seed: u64) -> Result<(), usize> {
    let words = len / 8;
    for j in 0..words {
        // SAFETY: `8 * j + 8 <= len`, inside the caller's block.
        if unsafe { p.add(8 * j).cast::<u64>().read_unaligned() } != word(seed, j) {
            return Err((8 * j..8 * j + 8)
                // SAFETY: `i < 8 * j + 8 <= len`.
                .find(|&i| unsafe { p.add(i).read() } != byte(seed, i))
                .unwrap_or(8 * j));
        }
    }
    for i in 8 * words..len {
        // SAFETY: `i < len`.
        if unsafe { p.add(i).read() } != byte(seed, i) {
            return Err(i);
        }
    }
    Ok(())
}

/// The offsets [`fill_marked`] writes in a block of `len` bytes: the first 64, then one in 509.
pub fn marked(len: usize) -> impl Iterator<Item = usize> {
    (0..len.min(64)).chain((509..len).step_by(509))
}

/// Writes the pattern of `seed` into the [`marked`] bytes of `len` bytes at `p`.
///
/// # Safety
/// As [`fill`].
pub unsafe fn fill_marked(p: *mut u8, len: usize, seed: u64) {
    for i in marked(len) {
        // SAFETY: `i < len`, inside the caller's block.
        unsafe { p.add(i).write(byte(seed, i)) };
    }
}

/// Checks the [`marked`] bytes of `len` bytes at `p`; `Err` holds the first wrong offset.
///
/// # Safety
/// As [`check`].
pub unsafe fn check_marked(p: *const u8, len: usize, seed: u64) -> Result<(), usize> {
    for i in marked(len) {
        // SAFETY: `i < len`, inside the caller's block.
        if unsafe { p.add(i).read() } != byte(seed, i) {
            return Err(i);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn check_finds_the_first_changed_byte() {
        let mut buf = [0u8; 100];
        for len in [0, 1, 7, 8, 9, 64, 100] {
            // SAFETY: `buf` has 100 bytes.
            unsafe { fill(buf.as_mut_ptr().wrapping_add(100 - len), len, 5) };
            let p = buf.as_ptr().wrapping_add(100 - len);
            // SAFETY: as above.
            assert_eq!(unsafe { check(p, len, 5) }, Ok(()));
            if len > 0 {
                // SAFETY: as above.
                assert_eq!(unsafe { check(p, len, 6) }.map_err(|i| i < len), Err(true), "another seed differs");
                buf[100 - 1] ^= 1;
                // SAFETY: as above.
                assert_eq!(unsafe { check(p, len, 5) }, Err(len - 1));
            }
        }
    }

    #[test]
    fn marked_bytes_only() {
        let mut buf = [0u8; 1100];
        // SAFETY: `buf` has 1100 bytes.
        unsafe { fill_marked(buf.as_mut_ptr(), 1100, 9) };
        assert!(marked(1100).eq((0..64).chain([509, 1018])));
        buf[510] ^= 0xff; // not marked
                          // SAFETY: as above.
        assert_eq!(unsafe { check_marked(buf.as_ptr(), 1100, 9) }, Ok(()));
        buf[509] ^= 0xff;
        // SAFETY: as above.
        assert_eq!(unsafe { check_marked(buf.as_ptr(), 1100, 9) }, Err(509));
    }
}
