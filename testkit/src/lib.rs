//! Helpers shared by goheap's host tests (`tests/`), the benchmark (`bench/`) and the demo kernel and its
//! test kernels (`kernel-demo/`), so each is written once.
//!
//! - [`Rng`]: the deterministic generator of every workload (test, benchmark, demo).
//!
//! `no_std` (the kernel uses it); feature `std` adds what needs floating-point functions.
#![no_std]
#![deny(unsafe_op_in_unsafe_fn)]
#![warn(missing_docs, missing_debug_implementations)]

#[cfg(feature = "std")]
extern crate std;

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
