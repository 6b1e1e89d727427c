//! The shadow model: what the allocator must have handed out, and what each block must contain.
//!
//! Every live block carries a pattern derived from its id. Blocks up to [`FULL_BYTES`] carry it in every
//! byte; larger ones in their first [`FULL_BYTES`], [`STRIDE_BYTES`] bytes every [`STRIDE`] bytes after that,
//! and their last [`TAIL_BYTES`] bytes (filling and checking megabytes per operation, through code that
//! libFuzzer instruments, would slow the fuzzer down more than it adds: overlaps are caught by the address
//! map anyway). The pattern of a byte depends only on the block's id and the byte's offset, so a
//! `realloc` keeps the id and the preserved prefix stays checkable.

use std::alloc::Layout;
use std::collections::BTreeMap;

/// Blocks up to this size are patterned (and checked) in every byte.
pub const FULL_BYTES: usize = 4 << 10;
/// Past [`FULL_BYTES`], a patterned run starts every `STRIDE` bytes...
pub const STRIDE: usize = 16 << 10;
/// ... and is this long.
pub const STRIDE_BYTES: usize = 16;
/// Past [`FULL_BYTES`], the block's last bytes are patterned too.
pub const TAIL_BYTES: usize = 16;

/// One live block of the model.
#[derive(Clone, Copy, Debug)]
pub struct Block {
    /// The id the pattern derives from (kept across `realloc`).
    pub id: u64,
    /// Its address.
    pub addr: usize,
    /// The layout it was allocated with (and must be freed with).
    pub layout: Layout,
    /// The bytes the allocator says are usable there (`Malloc::usable_size`): no other live block may
    /// overlap them.
    pub usable: usize,
}

impl Block {
    /// The end of the bytes the block may use (a zero-sized request still uses one byte).
    pub fn end(&self) -> usize {
        self.addr + self.usable.max(self.layout.size()).max(1)
    }
}

/// The pattern word `w` (bytes `8w..8w+8`) of block `id`.
#[inline]
fn word(id: u64, w: usize) -> u64 {
    let x = id.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (w as u64).wrapping_mul(0xD6E8_FEB8_6659_FD93);
    x ^ (x >> 29) ^ 0xA5A5_5A5A_A5A5_5A5A
}

/// The pattern byte at offset `i` of block `id`.
#[inline]
pub fn pattern_byte(id: u64, i: usize) -> u8 {
    word(id, i / 8).to_le_bytes()[i % 8]
}

/// The patterned ranges of a block of `size` bytes, clipped to `[lo, hi)`, in increasing order (they may
/// overlap at the tail).
pub fn patterned(size: usize, lo: usize, hi: usize) -> Vec<(usize, usize)> {
    let hi = hi.min(size);
    let mut out = Vec::new();
    let mut push = |a: usize, b: usize| {
        let (a, b) = (a.max(lo), b.min(hi));
        if a < b {
            out.push((a, b));
        }
    };
    push(0, size.min(FULL_BYTES));
    if size > FULL_BYTES {
        let mut s = FULL_BYTES;
        while s < size {
            push(s, s + STRIDE_BYTES);
            s += STRIDE;
        }
        push(size - TAIL_BYTES, size);
    }
    out
}

/// Writes block `id`'s pattern over `[a, b)` of the block at `addr`.
///
/// # Safety
/// `[addr + a, addr + b)` is writable memory the caller owns.
unsafe fn fill_range(addr: usize, id: u64, a: usize, b: usize) {
    let mut i = a;
    while i < b {
        if i % 8 == 0 && i + 8 <= b {
            // SAFETY: `[addr + i, addr + i + 8)` lies in the range the caller owns; unaligned write.
            unsafe { ((addr + i) as *mut u64).write_unaligned(word(id, i / 8).to_le()) };
            i += 8;
        } else {
            // SAFETY: as above, one byte.
            unsafe { *((addr + i) as *mut u8) = pattern_byte(id, i) };
            i += 1;
        }
    }
}

/// The first offset in `[a, b)` of the block at `addr` whose byte is not `expect(i)`, with the byte found.
///
/// # Safety
/// `[addr + a, addr + b)` is readable.
unsafe fn find_mismatch(addr: usize, a: usize, b: usize, expect: impl Fn(usize) -> u8) -> Option<(usize, u8)> {
    (a..b).find_map(|i| {
        // SAFETY: in the readable range.
        let got = unsafe { *((addr + i) as *const u8) };
        (got != expect(i)).then_some((i, got))
    })
}

/// Fast check of `[a, b)` against block `id`'s pattern: `None` if it matches, else the first bad offset.
///
/// # Safety
/// `[addr + a, addr + b)` is readable.
unsafe fn check_range(addr: usize, id: u64, a: usize, b: usize) -> Option<(usize, u8)> {
    let mut i = a;
    while i < b {
        if i % 8 == 0 && i + 8 <= b {
            // SAFETY: in the readable range; unaligned read.
            let got = unsafe { ((addr + i) as *const u64).read_unaligned() };
            if got != word(id, i / 8).to_le() {
                // SAFETY: in the readable range.
                return unsafe { find_mismatch(addr, i, i + 8, |j| pattern_byte(id, j)) };
            }
            i += 8;
        } else {
            // SAFETY: in the readable range.
            let got = unsafe { *((addr + i) as *const u8) };
            if got != pattern_byte(id, i) {
                return Some((i, got));
            }
            i += 1;
        }
    }
    None
}

/// The first offset in `[a, b)` of the block at `addr` that does not read zero, with the byte found.
///
/// # Safety
/// `[addr + a, addr + b)` is readable.
unsafe fn check_zero(addr: usize, a: usize, b: usize) -> Option<(usize, u8)> {
    let mut i = a;
    while i < b {
        if i % 8 == 0 && i + 8 <= b {
            // SAFETY: in the readable range; unaligned read.
            if unsafe { ((addr + i) as *const u64).read_unaligned() } != 0 {
                // SAFETY: in the readable range.
                return unsafe { find_mismatch(addr, i, i + 8, |_| 0) };
            }
            i += 8;
        } else {
            // SAFETY: in the readable range.
            let got = unsafe { *((addr + i) as *const u8) };
            if got != 0 {
                return Some((i, got));
            }
            i += 1;
        }
    }
    None
}

/// The live blocks, by position (for picking one from the input) and by address (for overlap checks).
#[derive(Default)]
pub struct Shadow {
    /// Live blocks in no particular order.
    pub blocks: Vec<Block>,
    /// Start address → (end address, id) of each live block.
    by_addr: BTreeMap<usize, (usize, u64)>,
    next_id: u64,
    /// Sum of the live blocks' sizes.
    pub live_bytes: usize,
}

impl Shadow {
    /// A fresh id.
    pub fn new_id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    /// Panics unless `[addr, end)` overlaps no live block.
    pub fn check_free_range(&self, addr: usize, end: usize, what: &str) {
        if let Some((&s, &(e, id))) = self.by_addr.range(..end).next_back() {
            assert!(
                e <= addr,
                "{what}: {addr:#x}..{end:#x} overlaps live block {id} at {s:#x}..{e:#x} (handed out twice)"
            );
        }
    }

    /// Records a new live block (after checking it overlaps nothing) and fills it with its pattern.
    ///
    /// # Safety
    /// The block is memory the allocator just handed out for `layout`.
    pub unsafe fn insert(&mut self, b: Block, what: &str) {
        self.check_free_range(b.addr, b.end(), what);
        self.by_addr.insert(b.addr, (b.end(), b.id));
        self.live_bytes += b.layout.size();
        for (x, y) in patterned(b.layout.size(), 0, usize::MAX) {
            // SAFETY: the block is ours (caller's contract).
            unsafe { fill_range(b.addr, b.id, x, y) };
        }
        self.blocks.push(b);
    }

    /// Removes block `i` from the model (its memory is about to be given back).
    pub fn remove(&mut self, i: usize) -> Block {
        let b = self.blocks.swap_remove(i);
        self.by_addr.remove(&b.addr);
        self.live_bytes -= b.layout.size();
        b
    }

    /// Panics unless block `b`'s patterned bytes are intact.
    pub fn verify(b: &Block, what: &str) {
        Self::verify_prefix(b, b.layout.size(), what)
    }

    /// Panics unless the patterned bytes of `b` below `len` are intact, read at `b.addr`.
    pub fn verify_prefix(b: &Block, len: usize, what: &str) {
        Self::verify_at(b, b.addr, len, what)
    }

    /// Panics unless the patterned bytes of `b` below `len` are intact, read at `at` (a moved copy).
    pub fn verify_at(b: &Block, at: usize, len: usize, what: &str) {
        for (x, y) in patterned(b.layout.size(), 0, len) {
            // SAFETY: the model only holds live blocks (or the caller's moved copy of one) of at least `len`
            // bytes.
            if let Some((i, got)) = unsafe { check_range(at, b.id, x, y) } {
                panic!(
                    "{what}: block {} at {at:#x} ({} B, align {}) corrupted at offset {i} (address {:#x}): \
                     found {got:#04x}, expected {:#04x}",
                    b.id,
                    b.layout.size(),
                    b.layout.align(),
                    at + i,
                    pattern_byte(b.id, i)
                );
            }
        }
    }

    /// Panics unless the patterned bytes of a fresh `alloc_zeroed` block read zero.
    pub fn verify_zero(addr: usize, size: usize, what: &str) {
        for (x, y) in patterned(size, 0, usize::MAX) {
            // SAFETY: the caller's fresh block of `size` bytes.
            if let Some((i, got)) = unsafe { check_zero(addr, x, y) } {
                panic!("{what}: alloc_zeroed block at {addr:#x} ({size} B) reads {got:#04x} at offset {i}");
            }
        }
    }

    /// Replaces block `i` after a successful `realloc` to `new` (same id): checks the preserved prefix at its
    /// new address, that it overlaps no other block, and patterns the rest.
    ///
    /// # Safety
    /// `new` is the memory `realloc` returned for the block.
    pub unsafe fn moved(&mut self, old: Block, new: Block, what: &str) {
        let keep = old.layout.size().min(new.layout.size());
        // The old block's patterned bytes below `keep` (its tail too, when it grew) must have moved intact.
        Self::verify_at(&old, new.addr, keep, what);
        self.check_free_range(new.addr, new.end(), what);
        self.by_addr.insert(new.addr, (new.end(), new.id));
        self.live_bytes += new.layout.size();
        // Pattern the whole new block: past `keep` it is new, and below it the new block's tail may fall where
        // the old block carried no pattern (rewriting the rest is idempotent).
        for (x, y) in patterned(new.layout.size(), 0, usize::MAX) {
            // SAFETY: the new block is ours (caller's contract).
            unsafe { fill_range(new.addr, new.id, x, y) };
        }
        self.blocks.push(new);
    }
}
