//! Helpers shared by goheap's host tests (`tests/`), the benchmark (`bench/`) and the demo kernel and its
//! test kernels (`kernel-demo/`), so each is written once.
//!
//! - [`Rng`]: the deterministic generator of every workload (test, benchmark, demo);
//! - [`pattern`]: the fill patterns that tests write into live blocks and check before freeing them.
//!
//! `no_std` (the kernel uses it); feature `std` adds what needs floating-point functions.
#![no_std]
#![deny(unsafe_op_in_unsafe_fn)]
#![warn(missing_docs, missing_debug_implementations)]

#[cfg(feature = "std")]
extern crate std;

pub mod pattern;

/// xorshift64*: deterministic per seed, cheap, allocation-free; the random source of the tests, the
/// benchmark and the kernel workloads. Not for anything that needs unpredictability.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    /// A generator from `seed` (any value, 0 included: the state is made odd, so never zero).
    pub const fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    /// The next value.
    #[inline]
    #[allow(clippy::should_implement_trait)] // not an iterator: it never ends
    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// A value in `0..n`, from the high 32 bits of [`next`](Self::next) (a multiply, no division).
    /// `n` is in `1..=2^32`.
    #[inline]
    pub fn below(&mut self, n: u64) -> u64 {
        debug_assert!(n > 0 && n <= 1 << 32, "Rng::below({n}): n must be in 1..=2^32");
        ((self.next() >> 32) * n) >> 32
    }

    /// An index into `len` items: [`below`](Self::below) as `usize`.
    #[inline]
    pub fn index(&mut self, len: usize) -> usize {
        self.below(len as u64) as usize
    }

    /// A soak's request size in `1..=max_bytes` (`max_bytes` at least 1 MiB; the host soak and the soak test
    /// kernel share this mix): bands of 1–16 B (40%), 17 B–1 KiB (35%), 1 KiB–32 KiB (20%), 32 KiB–512 KiB
    /// (4%) and above (1%), log-uniform within each band. No floating point (the kernel uses it).
    pub fn soak_size(&mut self, max_bytes: usize) -> usize {
        let (lo, hi): (usize, usize) = match self.below(1000) {
            0..400 => (1, 16),
            400..750 => (17, 1024),
            750..950 => (1025, 32 << 10),
            950..990 => ((32 << 10) + 1, 512 << 10),
            _ => ((512 << 10) + 1, max_bytes),
        };
        let (lb, hb) = (usize::BITS - lo.leading_zeros(), usize::BITS - hi.leading_zeros());
        let b = lb + self.below(u64::from(hb - lb + 1)) as u32;
        let base = 1usize << (b - 1);
        (base + self.index(base)).clamp(lo, hi)
    }

    /// A soak's alignment in 1 B..=2 MiB, most small: 1–16 B (70%), 32 B–4 KiB (22%), 8–64 KiB (7%),
    /// 128 KiB–2 MiB (1%).
    pub fn soak_align(&mut self) -> usize {
        match self.below(1000) {
            0..700 => 1 << self.below(5),
            700..920 => 1 << (5 + self.below(8)),
            920..990 => 1 << (13 + self.below(4)),
            _ => 1 << (17 + self.below(5)),
        }
    }

    /// Log-uniform in `lo..=hi` (small sizes more frequent, as in real programs).
    #[cfg(feature = "std")]
    #[inline]
    pub fn log_size(&mut self, lo: usize, hi: usize) -> usize {
        let (l, h) = ((lo as f64).ln(), (hi as f64).ln());
        let u = (self.next() >> 11) as f64 / (1u64 << 53) as f64;
        ((l + u * (h - l)).exp() as usize).clamp(lo, hi)
    }
}

#[cfg(test)]
mod tests {
    use super::Rng;

    #[test]
    fn same_seed_same_sequence_other_seed_other_sequence() {
        let (mut a, mut b, mut c) = (Rng::new(7), Rng::new(7), Rng::new(8));
        let xs: [u64; 16] = core::array::from_fn(|_| a.next());
        let ys: [u64; 16] = core::array::from_fn(|_| b.next());
        let zs: [u64; 16] = core::array::from_fn(|_| c.next());
        assert_eq!(xs, ys);
        assert_ne!(xs, zs);
        // A zero seed still moves (the state is never zero).
        let mut z = Rng::new(0);
        assert_ne!(z.next(), z.next());
    }

    #[test]
    fn below_stays_in_range_and_reaches_both_ends() {
        let mut r = Rng::new(1);
        for n in [1u64, 2, 3, 10, 1000, 1 << 32] {
            let (mut lo, mut hi) = (u64::MAX, 0);
            for _ in 0..20_000 {
                let v = r.below(n);
                assert!(v < n, "below({n}) gave {v}");
                lo = lo.min(v);
                hi = hi.max(v);
            }
            if n <= 1000 {
                assert_eq!((lo, hi), (0, n - 1), "below({n}) missed an end of its range");
            }
        }
    }

    #[test]
    fn below_is_roughly_uniform() {
        let mut r = Rng::new(42);
        let mut counts = [0u32; 8];
        for _ in 0..80_000 {
            counts[r.index(8)] += 1;
        }
        // 10 000 expected per bucket; a biased generator (or a `below` using only a few bits) misses this.
        assert!(counts.iter().all(|&c| (9_000..11_000).contains(&c)), "{counts:?}");
    }

    #[test]
    fn soak_mix_stays_in_range_and_reaches_every_band() {
        let mut r = Rng::new(9);
        let max = 4 << 20;
        let (mut bands, mut aligns) = ([0u32; 5], [0u32; 4]);
        for _ in 0..100_000 {
            let s = r.soak_size(max);
            assert!((1..=max).contains(&s), "{s}");
            bands[[16, 1024, 32 << 10, 512 << 10, max].iter().position(|&hi| s <= hi).unwrap()] += 1;
            let a = r.soak_align();
            assert!(a.is_power_of_two() && a <= 2 << 20, "{a}");
            aligns[[16, 4096, 64 << 10, 2 << 20].iter().position(|&hi| a <= hi).unwrap()] += 1;
        }
        // The stated shares (40/35/20/4/1% and 70/22/7/1%), within a few standard deviations.
        for (got, want) in bands.iter().zip([40_000, 35_000, 20_000, 4_000, 1_000]) {
            assert!(got.abs_diff(want) < want / 10 + 300, "sizes per band {bands:?}");
        }
        for (got, want) in aligns.iter().zip([70_000, 22_000, 7_000, 1_000]) {
            assert!(got.abs_diff(want) < want / 10 + 300, "alignments per band {aligns:?}");
        }
    }

    #[cfg(feature = "std")]
    #[test]
    fn log_size_stays_in_range_and_favours_small_sizes() {
        let mut r = Rng::new(3);
        let (lo, hi) = (8usize, 8192usize);
        let mut small = 0;
        for _ in 0..10_000 {
            let s = r.log_size(lo, hi);
            assert!((lo..=hi).contains(&s), "{s}");
            small += usize::from(s < 256);
        }
        // Log-uniform over 8..8192: half the draws fall below sqrt(8 * 8192) = 256 (uniform would give 3%).
        assert!((4_500..5_500).contains(&small), "{small} of 10000 below 256");
    }
}
