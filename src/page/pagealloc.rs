//! The radix-tree page allocator (Go 1.14's `mpagealloc.go`, design 35112).
//!
//! See `lib.rs` for an overview of the allocator.
//!
//! # Role
//! Tracks which pages of the heap's arena are free, and finds the lowest-addressed run of `npages` free pages.
//! Pages are indexed from the arena base: page `i` is `[base + i * PAGE_SIZE, base + (i + 1) * PAGE_SIZE)`.
//!
//! - The arena is cut into **chunks** of [`PALLOC_CHUNK_PAGES`] = 512 pages (4 MiB). Each chunk has an
//!   allocation bitmap (1 = allocated) and a scavenged bitmap (1 = not committed: the memory was never
//!   committed or was given back to the source).
//! - Over the chunks sits a **radix tree of summaries** with [`SUMMARY_LEVELS`] = 4 levels. A summary is a
//!   packed `(start, max, end)`: free pages at the start of the region, longest free run, free pages at the
//!   end. Level 3 has one summary per chunk; each entry of level `l < 3` summarises
//!   [`SUMMARY_FANOUT`] = 8 entries of level `l + 1`. The root level (0) is a flat array with one entry per
//!   `8^3 = 512` chunks (2 GiB), scanned linearly (Go's root level is likewise a flat array).
//! - `find` walks down from the root, using `max` to pick the first child that can hold the run and
//!   `end`/`start` to detect runs that cross children; it returns the lowest-addressed fit (first fit).
//! - A **search hint** `search_idx` (Go's `searchAddr`) skips the allocated prefix.
//! - A **scavenge index** (Go's `scavengeIndex`) tells the scavenger which chunks hold something to
//!   release, without looking at the chunks: per chunk, in [`ScavIndexWord`]s of 64 chunks, a `free` bit
//!   (a free page that is not scavenged), a `dense` bit (at least [`SCAV_CHUNK_HI_OCC_PAGES`] pages
//!   allocated), the density history of the current and previous *generation* (`dense_gen`,
//!   `dense_prev`: set when an allocation or free leaves the chunk dense; the scavenger's own runs do not
//!   count) and the derived `bg` bit (the background may take the chunk). A summary level
//!   ([`ScavIndexSum`], one bit per index word) and two cursors — background and forced, Go's
//!   `searchAddrBg`/`searchAddrForce` — make [`PageAlloc::index_find`] cost one index word plus one summary
//!   word per 4096 chunks it passes. Every method that changes a chunk's bitmaps updates its bits (O(1));
//!   [`PageAlloc::index_next_gen`] starts a generation (the scavenger calls it once per epoch).
//!
//! # Bound and growth
//! The tree covers the heap's reserved arena only: `max_chunks` chunks, fixed at [`PageAlloc::init`] from
//! the heap's `max_heap_bytes` (default 64 GiB on 64-bit hosts). It never covers more. Within it, the
//! allocator *grows* by whole chunks ([`PageAlloc::grow`]): the heap commits the metadata for the new chunks
//! (bitmaps, summaries, page map) and the new pages become free and scavenged (no heap memory is committed
//! until pages are allocated). Metadata layout for `max_chunks` is reserved once ([`PageAllocLayout`]) and
//! committed as prefixes, so its committed size is proportional to the grown heap:
//! `128 B per chunk (bitmaps) + 8 B per chunk per level (summaries) + 40 B per 64 chunks (scavenge index)
//! + 16 B per 4096 chunks (its summary)`, about 0.005% of the heap.
//!
//! # Invariants (equations; `G = grown_chunks`, `P = G * 512` grown pages)
//! - `summary[3][c] = summarize(chunk[c].alloc)` for `c < G`; `summary[l][i] = merge(summary[l+1][8i..8i+8])`
//!   where children at indices `>= level_len(l+1, G)` count as fully allocated (0).
//! - `scav ⊆ !alloc` page-wise: an allocated page is committed (the heap commits scavenged pages as it
//!   allocates them; pages handed to a page cache carry their scavenged bit in the cache).
//! - `free_npages = popcount(!alloc)` over grown chunks; `scav_npages = popcount(scav)`.
//! - Search hint: every page `< search_idx` is allocated.
//! - `G <= max_chunks`; metadata for chunks `< G` is committed.
//! - Scavenge index, for every chunk `c < G` with bit `b = 1 << (c % 64)` of index word `x = index[c / 64]`:
//!   `x.free & b ⇔ popcount(!alloc[c] & !scav[c]) > 0`;
//!   `x.dense & b ⇔ popcount(alloc[c]) >= SCAV_CHUNK_HI_OCC_PAGES`;
//!   `x.bg = x.free & !(x.dense | x.dense_gen | x.dense_prev)`; bits of chunks `>= G` are 0;
//!   `dense_gen` ⊇ chunks left dense by an allocation or free since the generation began; `dense_prev` = the
//!   previous generation's `dense_gen`.
//! - Index summary: bit `w % 64` of `sum[w / 64].free` (`.bg`) ⇔ `index[w].free != 0` (`.bg != 0`).
//! - Cursors (upper bounds): no chunk `>= cursor_force` has its `free` bit, none `>= cursor_bg` its `bg` bit.
//!   Setting a bit raises the cursor over it; `index_find` lowers it to just above the chunk it returns.
//!
//! # Locking
//! None inside: every method takes `&mut self` or `&self`; the heap keeps the `PageAlloc` under its heap
//! lock (`Heap::inner`), so every field here — bitmaps, summaries, the scavenge index and its cursors — is
//! guarded by that lock.
//!
//! # Adapted from Go
//! - Go's tree spans the whole 48-bit address space with 5 levels and sparse, lazily mapped summary arrays;
//!   here it spans one reserved arena (4 levels, flat root), which fits a kernel's small heap window.
//! - Go's scavenge index keeps per-chunk `inUse`/`lastInUse`/`gen` words and a `free` hint that the
//!   scavenger clears lazily; here the index is bitmaps kept exact (an update is O(1) per chunk touched),
//!   with a summary level so a search skips 4096 chunks per word; the density history is two bitmaps
//!   (dense at any point of this or the previous generation) rather than the in-use count at the
//!   generation's end. See `scavenger.rs` for what stands for Go's GC cycle (the generation).
//! - Metadata lives wherever the caller puts it ([`PageAlloc::init`] takes a pointer), so this module is
//!   tested on its own over plain memory.

use crate::PAGE_SIZE;

/// log2 of the pages per chunk.
pub const LOG_PALLOC_CHUNK_PAGES: usize = 9;
/// Pages per chunk: `PALLOC_CHUNK_PAGES = 1 << LOG_PALLOC_CHUNK_PAGES` = 512.
pub const PALLOC_CHUNK_PAGES: usize = 1 << LOG_PALLOC_CHUNK_PAGES;
/// Bytes per chunk: `PALLOC_CHUNK_BYTES = PALLOC_CHUNK_PAGES * PAGE_SIZE` = 4 MiB.
pub const PALLOC_CHUNK_BYTES: usize = PALLOC_CHUNK_PAGES * PAGE_SIZE;
/// 64-bit words per chunk bitmap: `PALLOC_CHUNK_WORDS = PALLOC_CHUNK_PAGES / 64` = 8.
pub const PALLOC_CHUNK_WORDS: usize = PALLOC_CHUNK_PAGES / 64;
/// Levels of the summary tree (level 3 = one summary per chunk).
pub const SUMMARY_LEVELS: usize = 4;
/// log2 of the fan-out between levels.
pub const SUMMARY_LEVEL_BITS: usize = 3;
/// Children per summary: `SUMMARY_FANOUT = 1 << SUMMARY_LEVEL_BITS` = 8.
pub const SUMMARY_FANOUT: usize = 1 << SUMMARY_LEVEL_BITS;
/// log2 of the pages one root entry covers:
/// `LOG_MAX_PACKED_VALUE = LOG_PALLOC_CHUNK_PAGES + (SUMMARY_LEVELS - 1) * SUMMARY_LEVEL_BITS` = 18.
pub const LOG_MAX_PACKED_VALUE: usize = LOG_PALLOC_CHUNK_PAGES + (SUMMARY_LEVELS - 1) * SUMMARY_LEVEL_BITS;
/// Pages one root entry covers: `1 << 18` = 262144 (2 GiB). Largest value stored in a summary field.
pub const MAX_PACKED_VALUE: usize = 1 << LOG_MAX_PACKED_VALUE;
/// Chunks per root entry: `1 << ((SUMMARY_LEVELS - 1) * SUMMARY_LEVEL_BITS)` = 512.
pub const CHUNKS_PER_ROOT: usize = 1 << ((SUMMARY_LEVELS - 1) * SUMMARY_LEVEL_BITS);
/// A chunk with at least this many allocated pages is dense: `512 * 31 / 32` = 496 (Go's
/// `scavChunkHiOccFrac` = 96.875%). The background scavenger leaves dense chunks alone (see the scavenge
/// index in the module docs).
pub const SCAV_CHUNK_HI_OCC_PAGES: usize = PALLOC_CHUNK_PAGES * 31 / 32;
/// Chunks per word of the scavenge index (one bit per chunk).
pub const INDEX_WORD_CHUNKS: usize = 64;
/// Chunks per word of the index's summary level: `64 * 64` = 4096 (16 GiB).
pub const INDEX_SUM_CHUNKS: usize = INDEX_WORD_CHUNKS * 64;
/// Bits per packed field (values up to `MAX_PACKED_VALUE` need 19; 21 as in Go).
const PACKED_FIELD_BITS: u32 = 21;
const PACKED_FIELD_MASK: u64 = (1 << PACKED_FIELD_BITS) - 1;

/// log2 of the pages an entry of level `l` covers:
/// `level_log_pages(l) = LOG_PALLOC_CHUNK_PAGES + (SUMMARY_LEVELS - 1 - l) * SUMMARY_LEVEL_BITS`.
pub const fn level_log_pages(l: usize) -> usize {
    LOG_PALLOC_CHUNK_PAGES + (SUMMARY_LEVELS - 1 - l) * SUMMARY_LEVEL_BITS
}

/// Entries of level `l` needed to cover `nchunks` chunks: `ceil(nchunks / 8^(SUMMARY_LEVELS - 1 - l))`.
pub const fn level_len(l: usize, nchunks: usize) -> usize {
    let shift = (SUMMARY_LEVELS - 1 - l) * SUMMARY_LEVEL_BITS;
    (nchunks + (1 << shift) - 1) >> shift
}

/// A packed summary `(start, max, end)` of a power-of-two aligned region (Go's `pallocSum`).
/// `start, end <= max <= region pages`; 0 means fully allocated.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct PallocSum(pub u64);

impl PallocSum {
    /// Packs the three fields.
    #[inline]
    pub const fn pack(start: usize, max: usize, end: usize) -> Self {
        PallocSum((start as u64) | ((max as u64) << PACKED_FIELD_BITS) | ((end as u64) << (2 * PACKED_FIELD_BITS)))
    }
    /// Free pages at the start.
    #[inline]
    pub const fn start(self) -> usize {
        (self.0 & PACKED_FIELD_MASK) as usize
    }
    /// Longest free run.
    #[inline]
    pub const fn max(self) -> usize {
        ((self.0 >> PACKED_FIELD_BITS) & PACKED_FIELD_MASK) as usize
    }
    /// Free pages at the end.
    #[inline]
    pub const fn end(self) -> usize {
        ((self.0 >> (2 * PACKED_FIELD_BITS)) & PACKED_FIELD_MASK) as usize
    }
}

/// Merges consecutive summaries of regions of `1 << log_pages` pages each (Go's `mergeSummaries`).
pub fn merge_summaries(sums: &[PallocSum], log_pages: usize) -> PallocSum {
    let full = 1usize << log_pages;
    let (mut start, mut most, mut end) = (sums[0].start(), sums[0].max(), sums[0].end());
    for (i, s) in sums.iter().enumerate().skip(1) {
        let (si, mi, ei) = (s.start(), s.max(), s.end());
        if start == i << log_pages {
            start += si;
        }
        most = most.max(end + si).max(mi);
        end = if ei == full { end + full } else { ei };
    }
    PallocSum::pack(start, most, end)
}

/// One chunk's bitmaps (Go's `pallocData`). Bit `i % 64` of word `i / 64` is page `i` of the chunk.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct PallocChunk {
    /// 1 = allocated (in a span, in a page cache, or taken by the scavenger).
    pub alloc: [u64; PALLOC_CHUNK_WORDS],
    /// 1 = scavenged: not committed.
    pub scav: [u64; PALLOC_CHUNK_WORDS],
}

/// Summarises an allocation bitmap (Go's `pallocBits.summarize`): word-level passes for `start`, `end` and
/// runs crossing words, then, only if a longer run could hide inside a word, Go's run-shrinking trick.
pub fn summarize(bits: &[u64; PALLOC_CHUNK_WORDS]) -> PallocSum {
    let mut start = usize::MAX;
    let mut most = 0;
    let mut cur = 0;
    for &x in bits {
        if x == 0 {
            cur += 64;
            continue;
        }
        cur += x.trailing_zeros() as usize;
        if start == usize::MAX {
            start = cur;
        }
        most = most.max(cur);
        cur = x.leading_zeros() as usize;
    }
    if start == usize::MAX {
        return PallocSum::pack(PALLOC_CHUNK_PAGES, PALLOC_CHUNK_PAGES, PALLOC_CHUNK_PAGES);
    }
    most = most.max(cur);
    if most >= 64 - 2 {
        // No run inside a single word can be longer.
        return PallocSum::pack(start, most, cur);
    }
    // Look inside each word for runs of zeros longer than `most`.
    'outer: for &w in bits {
        // Pattern 000 1xxx1 000: drop the low zeros and the lowest one.
        let mut x = w >> (w.trailing_zeros() & 63);
        if x & x.wrapping_add(1) == 0 {
            continue; // no zeros left but the top ones (already counted)
        }
        // Shrink every zero run by `p`; if a run survives, it is longer than `most`.
        let mut p = most;
        let mut k = 1; // current minimum length of runs of ones in x
        loop {
            while p > 0 {
                if p <= k {
                    x |= x >> (p & 63);
                    if x & x.wrapping_add(1) == 0 {
                        continue 'outer;
                    }
                    break;
                }
                x |= x >> (k & 63);
                if x & x.wrapping_add(1) == 0 {
                    continue 'outer;
                }
                p -= k;
                k *= 2;
            }
            // The lowest surviving zero run adds to the maximum.
            let j = (!x).trailing_zeros();
            x >>= j & 63;
            let j = x.trailing_zeros();
            x >>= j & 63;
            most += j as usize;
            if x & x.wrapping_add(1) == 0 {
                continue 'outer;
            }
            p = j as usize;
        }
    }
    PallocSum::pack(start, most, cur)
}

/// Reference implementation of [`summarize`] (bit by bit), for tests.
#[cfg(test)]
fn summarize_naive(bits: &[u64; PALLOC_CHUNK_WORDS]) -> PallocSum {
    let free = |i: usize| bits[i / 64] & (1 << (i % 64)) == 0;
    let start = (0..PALLOC_CHUNK_PAGES).take_while(|&i| free(i)).count();
    let end = (0..PALLOC_CHUNK_PAGES).rev().take_while(|&i| free(i)).count();
    let (mut most, mut cur) = (0, 0);
    for i in 0..PALLOC_CHUNK_PAGES {
        cur = if free(i) { cur + 1 } else { 0 };
        most = most.max(cur);
    }
    PallocSum::pack(start, most, end)
}

/// First index `>= from` where `npages` bits are clear (free), or `None` (Go's `pallocBits.find`).
pub fn find_in_chunk(bits: &[u64; PALLOC_CHUNK_WORDS], npages: usize, from: usize) -> Option<usize> {
    let mut run_start = 0;
    let mut run = 0;
    let mut i = from;
    while i < PALLOC_CHUNK_PAGES {
        let avail = 64 - i % 64;
        let x = bits[i / 64] >> (i % 64);
        if x & 1 == 0 {
            let n = (x.trailing_zeros() as usize).min(avail);
            if run == 0 {
                run_start = i;
            }
            run += n;
            if run >= npages {
                return Some(run_start);
            }
            i += n;
        } else {
            let n = ((!x).trailing_zeros() as usize).min(avail);
            run = 0;
            i += n;
        }
    }
    None
}

/// The pieces of page range `[start, end)` within single chunks: `(chunk index, first page in the chunk,
/// pages)`, in address order.
fn chunk_pieces(start: usize, end: usize) -> impl Iterator<Item = (usize, usize, usize)> {
    let mut p = start;
    core::iter::from_fn(move || {
        if p >= end {
            return None;
        }
        let (ci, i) = (p / PALLOC_CHUNK_PAGES, p % PALLOC_CHUNK_PAGES);
        let cnt = (end - p).min(PALLOC_CHUNK_PAGES - i);
        p += cnt;
        Some((ci, i, cnt))
    })
}

/// Sets (`set`) or clears bits `[i, i + n)` of a chunk bitmap; `i + n <= 512`.
pub fn set_bits(bits: &mut [u64; PALLOC_CHUNK_WORDS], i: usize, n: usize, set: bool) {
    let mut i = i;
    let end = i + n;
    while i < end {
        let w = i / 64;
        let lo = i % 64;
        let cnt = (end - i).min(64 - lo);
        let mask = if cnt == 64 { !0 } else { ((1u64 << cnt) - 1) << lo };
        if set {
            bits[w] |= mask;
        } else {
            bits[w] &= !mask;
        }
        i += cnt;
    }
}

/// Set bits in `[i, i + n)` of a chunk bitmap.
pub fn count_bits(bits: &[u64; PALLOC_CHUNK_WORDS], i: usize, n: usize) -> usize {
    let mut i = i;
    let end = i + n;
    let mut total = 0;
    while i < end {
        let w = i / 64;
        let lo = i % 64;
        let cnt = (end - i).min(64 - lo);
        let mask = if cnt == 64 { !0 } else { ((1u64 << cnt) - 1) << lo };
        total += (bits[w] & mask).count_ones() as usize;
        i += cnt;
    }
    total
}

/// The low `n` bits set (`n <= 64`).
#[inline]
const fn low_mask(n: usize) -> u64 {
    if n >= 64 {
        !0
    } else {
        (1u64 << n) - 1
    }
}

const fn page_align_up(n: usize) -> usize {
    (n + PAGE_SIZE - 1) & !(PAGE_SIZE - 1)
}

/// Where the page allocator's metadata lives in its one reservation (each part page aligned), for an arena
/// of `max_chunks` chunks: `[chunk bitmaps | summary level 0 | 1 | 2 | 3]`.
#[derive(Clone, Copy, Debug)]
pub struct PageAllocLayout {
    /// Chunks the arena has room for.
    pub max_chunks: usize,
    /// Byte offset of part `k` (0 = chunk bitmaps, `1 + l` = summary level `l`, then the scavenge index's
    /// words and summary words).
    pub part_off: [usize; META_PARTS],
    /// Total bytes to reserve.
    pub total_bytes: usize,
}

/// Parts of the metadata reservation: chunk bitmaps, one per summary level, the scavenge index's words and
/// its summary words.
pub const META_PARTS: usize = 1 + SUMMARY_LEVELS + 2;
/// Part of the scavenge index's words ([`ScavIndexWord`], one per 64 chunks).
pub const META_PART_INDEX: usize = 1 + SUMMARY_LEVELS;
/// Part of the scavenge index's summary words ([`ScavIndexSum`], one per 4096 chunks).
pub const META_PART_INDEX_SUM: usize = 2 + SUMMARY_LEVELS;

impl PageAllocLayout {
    /// The layout for `max_chunks` chunks.
    pub const fn new(max_chunks: usize) -> Self {
        let mut part_off = [0; META_PARTS];
        let mut off = page_align_up(max_chunks * core::mem::size_of::<PallocChunk>());
        let mut l = 0;
        while l < SUMMARY_LEVELS {
            part_off[1 + l] = off;
            off += page_align_up(level_len(l, max_chunks) * 8);
            l += 1;
        }
        part_off[META_PART_INDEX] = off;
        off += page_align_up(max_chunks.div_ceil(INDEX_WORD_CHUNKS) * core::mem::size_of::<ScavIndexWord>());
        part_off[META_PART_INDEX_SUM] = off;
        off += page_align_up(max_chunks.div_ceil(INDEX_SUM_CHUNKS) * core::mem::size_of::<ScavIndexSum>());
        Self { max_chunks, part_off, total_bytes: off }
    }

    /// Bytes of part `k` in use when `grown_chunks` chunks are grown (commit up to this, page rounded).
    pub const fn part_used_bytes(&self, k: usize, grown_chunks: usize) -> usize {
        if k == 0 {
            grown_chunks * core::mem::size_of::<PallocChunk>()
        } else if k == META_PART_INDEX {
            grown_chunks.div_ceil(INDEX_WORD_CHUNKS) * core::mem::size_of::<ScavIndexWord>()
        } else if k == META_PART_INDEX_SUM {
            grown_chunks.div_ceil(INDEX_SUM_CHUNKS) * core::mem::size_of::<ScavIndexSum>()
        } else {
            level_len(k - 1, grown_chunks) * 8
        }
    }
}

/// The page allocator (Go's `pageAlloc`). See the module docs. All fields guarded by the heap lock.
#[derive(Debug)]
pub struct PageAlloc {
    layout: PageAllocLayout,
    /// Base of the metadata reservation (`layout.total_bytes`); null before `init`.
    meta: *mut u8,
    /// Chunks covered so far: `grown_chunks <= layout.max_chunks`.
    grown_chunks: usize,
    /// Every page `< search_idx` is allocated.
    search_idx: usize,
    /// `popcount(!alloc)` over grown chunks.
    free_npages: usize,
    /// `popcount(scav)` over grown chunks.
    scav_npages: usize,
    /// Scavenge index cursors (chunk indices, exclusive): no chunk at or above `cursor_bg` has its `bg` bit
    /// set, none at or above `cursor_force` its `free` bit (see the module docs).
    cursor_bg: usize,
    cursor_force: usize,
}

/// One word of the scavenge index: one bit per chunk for 64 chunks (bit `c % 64` of word `c / 64`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ScavIndexWord {
    /// The chunk has a free page that is not scavenged (something to release).
    pub free: u64,
    /// The chunk is dense now: `popcount(alloc) >= SCAV_CHUNK_HI_OCC_PAGES`.
    pub dense: u64,
    /// The chunk was dense at some point of the current generation (set by allocation and free, not by the
    /// scavenger's own runs).
    pub dense_gen: u64,
    /// The chunk was dense at some point of the previous generation.
    pub dense_prev: u64,
    /// The background scavenger may take the chunk: `free & !(dense | dense_gen | dense_prev)`.
    pub bg: u64,
}

/// One word of the scavenge index's summary level: bit `w % 64` of word `w / 64` is set iff index word `w`
/// has a non-zero `free` (resp. `bg`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ScavIndexSum {
    /// Index words with a `free` bit set.
    pub free: u64,
    /// Index words with a `bg` bit set.
    pub bg: u64,
}

// SAFETY: the raw pointer refers to metadata owned by this allocator alone; whoever holds the `PageAlloc`
// (under the heap lock) has exclusive access to it.
unsafe impl Send for PageAlloc {}

impl PageAlloc {
    /// An allocator covering nothing (before `init`).
    pub const fn empty() -> Self {
        Self {
            layout: PageAllocLayout::new(0),
            meta: core::ptr::null_mut(),
            grown_chunks: 0,
            search_idx: 0,
            free_npages: 0,
            scav_npages: 0,
            cursor_bg: 0,
            cursor_force: 0,
        }
    }

    /// Sets the allocator over metadata at `meta`, laid out by `layout`, with nothing grown yet.
    ///
    /// # Safety
    /// `meta` points to `layout.total_bytes` of memory exclusively the allocator's, of which the caller
    /// commits (and zeroes) the prefixes [`PageAllocLayout::part_used_bytes`] of each part before each
    /// [`PageAlloc::grow`]. `meta` is 8-byte aligned.
    pub unsafe fn init(&mut self, layout: PageAllocLayout, meta: *mut u8) {
        *self = Self::empty();
        self.layout = layout;
        self.meta = meta;
    }

    /// The metadata layout.
    pub fn layout(&self) -> &PageAllocLayout {
        &self.layout
    }
    /// Chunks grown.
    pub fn grown_chunks(&self) -> usize {
        self.grown_chunks
    }
    /// Pages grown: `grown_chunks * PALLOC_CHUNK_PAGES`.
    pub fn grown_npages(&self) -> usize {
        self.grown_chunks * PALLOC_CHUNK_PAGES
    }
    /// Free pages (not counting pages held by page caches).
    pub fn free_npages(&self) -> usize {
        self.free_npages
    }
    /// Scavenged (uncommitted) pages.
    pub fn scav_npages(&self) -> usize {
        self.scav_npages
    }
    /// The search hint (a page index).
    pub fn search_idx(&self) -> usize {
        self.search_idx
    }

    #[inline]
    fn chunk_ptr(&self, ci: usize) -> *mut PallocChunk {
        debug_assert!(ci < self.grown_chunks);
        // SAFETY: pointer arithmetic only: `ci < max_chunks`, inside the chunk part of the reservation.
        unsafe { self.meta.cast::<PallocChunk>().add(ci) }
    }

    /// Chunk `ci`'s bitmaps; `ci < grown_chunks`.
    #[inline]
    pub fn chunk(&self, ci: usize) -> &PallocChunk {
        // SAFETY: chunks below `grown_chunks` are committed and initialised (init contract + grow), and
        // `&self` excludes writers.
        unsafe { &*self.chunk_ptr(ci) }
    }

    #[inline]
    fn chunk_mut(&mut self, ci: usize) -> &mut PallocChunk {
        // SAFETY: as `chunk`, and `&mut self` gives exclusive access.
        unsafe { &mut *self.chunk_ptr(ci) }
    }

    #[inline]
    fn sum_ptr(&self, l: usize, i: usize) -> *mut u64 {
        // SAFETY: pointer arithmetic only: `i < level_len(l, max_chunks)`, inside part `1 + l`.
        unsafe { self.meta.add(self.layout.part_off[1 + l]).cast::<u64>().add(i) }
    }

    /// Summary `i` of level `l`; entries beyond the grown range read as 0 (fully allocated).
    #[inline]
    pub fn sum(&self, l: usize, i: usize) -> PallocSum {
        if i >= level_len(l, self.grown_chunks) {
            return PallocSum(0);
        }
        // SAFETY: entries below `level_len(l, grown_chunks)` are committed (init contract).
        PallocSum(unsafe { *self.sum_ptr(l, i) })
    }

    #[inline]
    fn set_sum(&mut self, l: usize, i: usize, s: PallocSum) {
        debug_assert!(i < level_len(l, self.grown_chunks));
        // SAFETY: as `sum`; `&mut self` gives exclusive access.
        unsafe { *self.sum_ptr(l, i) = s.0 };
    }

    /// Covers chunks up to `new_grown_chunks`: their pages become free and scavenged.
    ///
    /// # Safety
    /// `grown_chunks <= new_grown_chunks <= max_chunks`, and the metadata prefixes for `new_grown_chunks`
    /// are committed (contents may be anything: they are initialised here).
    pub unsafe fn grow(&mut self, new_grown_chunks: usize) {
        assert!(new_grown_chunks <= self.layout.max_chunks && new_grown_chunks >= self.grown_chunks);
        let old = self.grown_chunks;
        // Clear summary entries that become visible (they may hold garbage if the source does not zero).
        for l in 0..SUMMARY_LEVELS {
            let (a, b) = (level_len(l, old), level_len(l, new_grown_chunks));
            for i in a..b {
                // SAFETY: `i < level_len(l, new_grown_chunks)`: committed per the contract.
                unsafe { *self.sum_ptr(l, i) = 0 };
            }
        }
        let (a, b) = (old.div_ceil(INDEX_WORD_CHUNKS), new_grown_chunks.div_ceil(INDEX_WORD_CHUNKS));
        for w in a..b {
            // SAFETY: `w < ceil(new_grown_chunks / 64)`: committed per the contract.
            unsafe { *self.index_word_ptr(w) = ScavIndexWord::default() };
        }
        let (a, b) = (old.div_ceil(INDEX_SUM_CHUNKS), new_grown_chunks.div_ceil(INDEX_SUM_CHUNKS));
        for j in a..b {
            // SAFETY: `j < ceil(new_grown_chunks / 4096)`: committed per the contract.
            unsafe { *self.index_sum_ptr(j) = ScavIndexSum::default() };
        }
        self.grown_chunks = new_grown_chunks;
        for ci in old..new_grown_chunks {
            let c = self.chunk_mut(ci);
            c.alloc = [0; PALLOC_CHUNK_WORDS];
            c.scav = [!0; PALLOC_CHUNK_WORDS];
        }
        let n = (new_grown_chunks - old) * PALLOC_CHUNK_PAGES;
        self.free_npages += n;
        self.scav_npages += n;
        if n != 0 {
            self.update(old * PALLOC_CHUNK_PAGES, n);
            // The new pages are free; all pages before them keep their state.
            self.search_idx = self.search_idx.min(old * PALLOC_CHUNK_PAGES);
        }
    }

    /// Recomputes the summaries covering pages `[idx, idx + n)` (Go's `pageAlloc.update`). Stops going up
    /// as soon as a level is unchanged (a parent depends only on its children).
    fn update(&mut self, idx: usize, n: usize) {
        let c0 = idx / PALLOC_CHUNK_PAGES;
        let c1 = (idx + n - 1) / PALLOC_CHUNK_PAGES;
        let mut changed = false;
        for ci in c0..=c1 {
            let s = summarize(&self.chunk(ci).alloc);
            if s != self.sum(SUMMARY_LEVELS - 1, ci) {
                self.set_sum(SUMMARY_LEVELS - 1, ci, s);
                changed = true;
            }
        }
        let (mut lo, mut hi) = (c0, c1);
        for l in (0..SUMMARY_LEVELS - 1).rev() {
            if !changed {
                return;
            }
            changed = false;
            lo >>= SUMMARY_LEVEL_BITS;
            hi >>= SUMMARY_LEVEL_BITS;
            for i in lo..=hi {
                let s = self.merge_children(l, i);
                if s != self.sum(l, i) {
                    self.set_sum(l, i, s);
                    changed = true;
                }
            }
        }
    }

    /// `merge(summary[l + 1][8i..8i+8])`, children beyond the grown range counting as 0.
    #[inline]
    fn merge_children(&self, l: usize, i: usize) -> PallocSum {
        let first = i * SUMMARY_FANOUT;
        let avail = level_len(l + 1, self.grown_chunks).saturating_sub(first).min(SUMMARY_FANOUT);
        let mut kids = [PallocSum(0); SUMMARY_FANOUT];
        let p = self.sum_ptr(l + 1, first);
        for (k, kid) in kids.iter_mut().enumerate().take(avail) {
            // SAFETY: `first + k < level_len(l + 1, grown_chunks)`: a committed entry.
            *kid = PallocSum(unsafe { *p.add(k) });
        }
        merge_summaries(&kids, level_log_pages(l + 1))
    }

    /// Lowest page index of a run of `npages` free pages, or `None` (Go's `pageAlloc.find`).
    pub fn find(&self, npages: usize) -> Option<usize> {
        if npages == 0 || self.grown_chunks == 0 || npages > self.free_npages {
            return None;
        }
        let hint = self.search_idx;
        let mut i = 0usize; // first entry index of the block examined at this level
        for l in 0..SUMMARY_LEVELS {
            let log_pages = level_log_pages(l);
            let entries = if l == 0 {
                level_len(0, self.grown_chunks)
            } else {
                i <<= SUMMARY_LEVEL_BITS;
                SUMMARY_FANOUT
            };
            // Skip entries wholly below the hint (all allocated).
            let hint_idx = hint >> log_pages;
            let j0 = if hint_idx >= i && hint_idx < i + entries { hint_idx - i } else { 0 };
            let (mut base, mut size) = (0usize, 0usize);
            let mut descend = None;
            for j in j0..entries {
                let s = self.sum(l, i + j);
                if s.0 == 0 {
                    size = 0;
                    continue;
                }
                let st = s.start();
                if size + st >= npages {
                    if size == 0 {
                        base = j << log_pages;
                    }
                    size += st;
                    break;
                }
                if s.max() >= npages {
                    descend = Some(j);
                    break;
                }
                if size == 0 || st < (1 << log_pages) {
                    size = s.end();
                    base = ((j + 1) << log_pages) - size;
                    continue;
                }
                size += 1 << log_pages;
            }
            if let Some(j) = descend {
                i += j;
                continue;
            }
            if size >= npages {
                return Some((i << log_pages) + base);
            }
            // Nothing fits here. At the root that means no fit at all; below it the parent's `max`
            // promised a fit, so the summaries are inconsistent (validate() would catch it).
            debug_assert!(l == 0, "pagealloc: summary at level {} promised a fit that is not there", l - 1);
            return None;
        }
        // Leaf: `i` is a chunk index whose longest run fits.
        let from = if hint / PALLOC_CHUNK_PAGES == i { hint % PALLOC_CHUNK_PAGES } else { 0 };
        let j = find_in_chunk(&self.chunk(i).alloc, npages, from);
        debug_assert!(j.is_some(), "pagealloc: chunk {i} summary promised a fit that is not there");
        j.map(|j| i * PALLOC_CHUNK_PAGES + j)
    }

    /// Allocates the lowest run of `npages` free pages; returns its first page index.
    pub fn alloc(&mut self, npages: usize) -> Option<usize> {
        let idx = self.find(npages)?;
        self.alloc_range(idx, npages);
        Some(idx)
    }

    /// Marks `[idx, idx + n)` allocated. The pages must be free.
    pub fn alloc_range(&mut self, idx: usize, n: usize) {
        self.alloc_range_as(idx, n, true);
    }

    /// Takes `[idx, idx + n)` (free, not scavenged) for the scavenger while it decommits them without the
    /// heap lock: allocated like [`PageAlloc::alloc_range`], but the pages do not count towards the chunk's
    /// density history (`dense_gen`), as Go's scavenger leaves its index's `inUse` alone for its own runs.
    pub fn scav_take(&mut self, idx: usize, n: usize) {
        self.alloc_range_as(idx, n, false);
    }

    /// Gives back a run taken by [`PageAlloc::scav_take`], now decommitted: free and scavenged.
    pub fn scav_return(&mut self, idx: usize, n: usize) {
        debug_assert!(self.count_alloc(idx, n) == n, "pagealloc: returning free pages at {idx}+{n}");
        let before = self.count_scav(idx, n);
        // `free_range` and `set_scav` in one pass: one index update per chunk.
        for (ci, i, cnt) in chunk_pieces(idx, idx + n) {
            let c = self.chunk_mut(ci);
            set_bits(&mut c.alloc, i, cnt, false);
            set_bits(&mut c.scav, i, cnt, true);
            self.index_update(ci, false);
        }
        self.free_npages += n;
        self.scav_npages = self.scav_npages - before + n;
        self.search_idx = self.search_idx.min(idx);
        self.update(idx, n);
    }

    fn alloc_range_as(&mut self, idx: usize, n: usize, history: bool) {
        debug_assert!(self.is_free_range(idx, n));
        for (ci, i, cnt) in chunk_pieces(idx, idx + n) {
            set_bits(&mut self.chunk_mut(ci).alloc, i, cnt, true);
            self.index_update(ci, history);
        }
        self.free_npages -= n;
        if idx <= self.search_idx {
            // Pages below `idx` are allocated (invariant), and `[idx, idx + n)` now is.
            self.search_idx = self.search_idx.max(idx + n);
        }
        self.update(idx, n);
    }

    /// Marks `[idx, idx + n)` free. The pages must be allocated.
    pub fn free_range(&mut self, idx: usize, n: usize) {
        self.free_range_as(idx, n, true);
    }

    fn free_range_as(&mut self, idx: usize, n: usize, history: bool) {
        debug_assert!(self.count_alloc(idx, n) == n, "pagealloc: freeing free pages at {idx}+{n}");
        for (ci, i, cnt) in chunk_pieces(idx, idx + n) {
            set_bits(&mut self.chunk_mut(ci).alloc, i, cnt, false);
            self.index_update(ci, history);
        }
        self.free_npages += n;
        self.search_idx = self.search_idx.min(idx);
        self.update(idx, n);
    }

    /// Whether every page of `[idx, idx + n)` is grown and free.
    pub fn is_free_range(&self, idx: usize, n: usize) -> bool {
        idx + n <= self.grown_npages() && self.count_alloc(idx, n) == 0
    }

    /// Allocated pages in `[idx, idx + n)` (grown pages only).
    pub fn count_alloc(&self, idx: usize, n: usize) -> usize {
        let mut total = 0;
        for (ci, i, cnt) in chunk_pieces(idx, (idx + n).min(self.grown_npages())) {
            total += count_bits(&self.chunk(ci).alloc, i, cnt);
        }
        total
    }

    /// Scavenged pages in `[idx, idx + n)`.
    pub fn count_scav(&self, idx: usize, n: usize) -> usize {
        let mut total = 0;
        for (ci, i, cnt) in chunk_pieces(idx, (idx + n).min(self.grown_npages())) {
            total += count_bits(&self.chunk(ci).scav, i, cnt);
        }
        total
    }

    /// Marks `[idx, idx + n)` scavenged (`set`) or committed, keeping `scav_npages` exact.
    pub fn set_scav(&mut self, idx: usize, n: usize, set: bool) {
        let before = self.count_scav(idx, n);
        for (ci, i, cnt) in chunk_pieces(idx, idx + n) {
            set_bits(&mut self.chunk_mut(ci).scav, i, cnt, set);
            self.index_update(ci, false);
        }
        self.scav_npages = self.scav_npages - before + if set { n } else { 0 };
    }

    /// Calls `f(run_idx, run_npages)` for each maximal run of scavenged pages in `[idx, idx + n)`, in
    /// address order, until `f` returns `false`. Returns `false` if stopped.
    pub fn for_each_scav_run(&self, idx: usize, n: usize, mut f: impl FnMut(usize, usize) -> bool) -> bool {
        let end = idx + n;
        let mut p = idx;
        while p < end {
            let c = self.chunk(p / PALLOC_CHUNK_PAGES);
            let bit = p % PALLOC_CHUNK_PAGES;
            if c.scav[bit / 64] & (1 << (bit % 64)) == 0 {
                p += 1;
                continue;
            }
            let start = p;
            while p < end {
                let c = self.chunk(p / PALLOC_CHUNK_PAGES);
                let bit = p % PALLOC_CHUNK_PAGES;
                if c.scav[bit / 64] & (1 << (bit % 64)) == 0 {
                    break;
                }
                p += 1;
            }
            if !f(start, p - start) {
                return false;
            }
        }
        true
    }

    /// Takes a 64-page aligned block containing the lowest free page for a page cache (Go's
    /// `allocToCache`): returns `(first page index, free mask, scavenged mask)`; every page of the block is
    /// marked allocated, and the scavenged bits of the handed-over pages move into the cache.
    pub fn alloc_to_cache(&mut self) -> Option<(usize, u64, u64)> {
        let idx = self.find(1)?;
        let base = idx & !63;
        let ci = base / PALLOC_CHUNK_PAGES;
        let w = (base % PALLOC_CHUNK_PAGES) / 64;
        let c = self.chunk_mut(ci);
        let free = !c.alloc[w];
        let scav = c.scav[w] & free;
        c.alloc[w] = !0;
        c.scav[w] &= !free;
        self.free_npages -= free.count_ones() as usize;
        self.scav_npages -= scav.count_ones() as usize;
        self.index_update(ci, true);
        // `idx` is the lowest free page, so every page below `base + 64` is now allocated.
        self.search_idx = self.search_idx.max(base + 64);
        self.update(base, 64);
        Some((base, free, scav))
    }

    /// Returns a page cache's block (Go's `pageCache.flush`): pages in `free` become free, those in `scav`
    /// (a subset of `free`) scavenged.
    pub fn free_from_cache(&mut self, base: usize, free: u64, scav: u64) {
        debug_assert!(scav & !free == 0);
        let ci = base / PALLOC_CHUNK_PAGES;
        let w = (base % PALLOC_CHUNK_PAGES) / 64;
        let c = self.chunk_mut(ci);
        debug_assert!(c.alloc[w] & free == free, "pagealloc: cache returns free pages");
        c.alloc[w] &= !free;
        c.scav[w] |= scav;
        self.free_npages += free.count_ones() as usize;
        self.scav_npages += scav.count_ones() as usize;
        self.index_update(ci, true);
        if free != 0 {
            self.search_idx = self.search_idx.min(base + free.trailing_zeros() as usize);
            self.update(base, 64);
        }
    }

    /// Length of the free run that ends at the grown end (what a grow would extend). Walks leaf
    /// summaries backwards: O(chunks in the tail), called only when the heap must grow.
    pub fn free_tail_npages(&self) -> usize {
        let mut tail = 0;
        for ci in (0..self.grown_chunks).rev() {
            let e = self.sum(SUMMARY_LEVELS - 1, ci).end();
            tail += e;
            if e != PALLOC_CHUNK_PAGES {
                break;
            }
        }
        tail
    }

    // ---- Scavenge index (see the module docs) -------------------------------------------------------------

    #[inline]
    fn index_word_ptr(&self, w: usize) -> *mut ScavIndexWord {
        // SAFETY: pointer arithmetic only: `w < ceil(max_chunks / 64)`, inside the index part.
        unsafe { self.meta.add(self.layout.part_off[META_PART_INDEX]).cast::<ScavIndexWord>().add(w) }
    }

    #[inline]
    fn index_sum_ptr(&self, j: usize) -> *mut ScavIndexSum {
        // SAFETY: pointer arithmetic only: `j < ceil(max_chunks / 4096)`, inside the index summary part.
        unsafe { self.meta.add(self.layout.part_off[META_PART_INDEX_SUM]).cast::<ScavIndexSum>().add(j) }
    }

    /// Index word `w` (chunks `[64w, 64w + 64)`); `w < ceil(grown_chunks / 64)`.
    #[inline]
    pub fn index_word(&self, w: usize) -> ScavIndexWord {
        assert!(w < self.grown_chunks.div_ceil(INDEX_WORD_CHUNKS));
        // SAFETY: committed and initialised for grown chunks (init contract + grow); `&self` excludes writers.
        unsafe { *self.index_word_ptr(w) }
    }

    /// Index summary word `j` (index words `[64j, 64j + 64)`); `j < ceil(grown_chunks / 4096)`.
    #[inline]
    pub fn index_sum(&self, j: usize) -> ScavIndexSum {
        assert!(j < self.grown_chunks.div_ceil(INDEX_SUM_CHUNKS));
        // SAFETY: as `index_word`.
        unsafe { *self.index_sum_ptr(j) }
    }

    /// The index's search cursors `(background, forced)` (chunk indices, exclusive upper bounds).
    pub fn index_cursors(&self) -> (usize, usize) {
        (self.cursor_bg, self.cursor_force)
    }

    /// Stores index word `w` and refreshes its summary bits and the cursors.
    fn set_index_word(&mut self, w: usize, new: ScavIndexWord) {
        // SAFETY: `w < ceil(grown_chunks / 64)` (callers pass grown chunks' words): committed; `&mut self`.
        unsafe { *self.index_word_ptr(w) = new };
        let (j, bit) = (w / 64, 1u64 << (w % 64));
        // SAFETY: `j < ceil(grown_chunks / 4096)` as `w` is a grown word.
        let sum = unsafe { &mut *self.index_sum_ptr(j) };
        sum.free = if new.free != 0 { sum.free | bit } else { sum.free & !bit };
        sum.bg = if new.bg != 0 { sum.bg | bit } else { sum.bg & !bit };
        // Raise the cursors over any set bit (they are upper bounds; `find` lowers them).
        if new.free != 0 {
            self.cursor_force = self.cursor_force.max(w * 64 + 64 - new.free.leading_zeros() as usize);
        }
        if new.bg != 0 {
            self.cursor_bg = self.cursor_bg.max(w * 64 + 64 - new.bg.leading_zeros() as usize);
        }
    }

    /// Recomputes chunk `ci`'s index bits from its bitmaps (O(1): 8 words). `history`: a density reached now
    /// counts for the generation (`dense_gen`); the scavenger's own runs pass `false`.
    fn index_update(&mut self, ci: usize, history: bool) {
        let c = self.chunk(ci);
        let mut free = 0u64;
        let mut nalloc = 0;
        for (a, sc) in c.alloc.iter().zip(&c.scav) {
            free |= !a & !sc;
            nalloc += a.count_ones() as usize;
        }
        let (w, bit) = (ci / INDEX_WORD_CHUNKS, 1u64 << (ci % INDEX_WORD_CHUNKS));
        // SAFETY: `ci` is grown, so word `w` is committed and initialised.
        let mut x = unsafe { *self.index_word_ptr(w) };
        let old = x;
        let set = |v: u64, on: bool| if on { v | bit } else { v & !bit };
        x.free = set(x.free, free != 0);
        x.dense = set(x.dense, nalloc >= SCAV_CHUNK_HI_OCC_PAGES);
        if history && nalloc >= SCAV_CHUNK_HI_OCC_PAGES {
            x.dense_gen |= bit;
        }
        x.bg = x.free & !(x.dense | x.dense_gen | x.dense_prev);
        if x != old {
            self.set_index_word(w, x);
        }
    }

    /// Starts a new generation of the index's density history (Go's `scavengeIndex.nextGen`, once per GC
    /// cycle; here once per scavenger epoch): `dense_prev = dense_gen`, `dense_gen = dense`. O(grown chunks /
    /// 64) word operations, once per generation.
    pub fn index_next_gen(&mut self) {
        for w in 0..self.grown_chunks.div_ceil(INDEX_WORD_CHUNKS) {
            // SAFETY: a grown word.
            let mut x = unsafe { *self.index_word_ptr(w) };
            x.dense_prev = x.dense_gen;
            x.dense_gen = x.dense;
            x.bg = x.free & !(x.dense | x.dense_gen | x.dense_prev);
            self.set_index_word(w, x);
        }
    }

    /// The highest chunk below the cursor with something the scavenger may release (Go's
    /// `scavengeIndex.find`): `force` = any chunk with a free unscavenged page, else only chunks the
    /// background may take (not dense now nor in this or the previous generation). Lowers the cursor to just
    /// above the chunk found (0 when none). Cost: one index word, plus one summary word per 4096 chunks
    /// between the cursor and the chunk found.
    pub fn index_find(&mut self, force: bool) -> Option<usize> {
        let pick = |x: ScavIndexWord| if force { x.free } else { x.bg };
        let pick_sum = |x: ScavIndexSum| if force { x.free } else { x.bg };
        let cursor = if force { self.cursor_force } else { self.cursor_bg }.min(self.grown_chunks);
        let found = 'search: {
            if cursor == 0 {
                break 'search None;
            }
            let top = cursor - 1;
            let w = top / INDEX_WORD_CHUNKS;
            let m = pick(self.index_word(w)) & low_mask(top % INDEX_WORD_CHUNKS + 1);
            if m != 0 {
                break 'search Some(w * 64 + 63 - m.leading_zeros() as usize);
            }
            // Index words below `w`, through the summary level.
            if w == 0 {
                break 'search None;
            }
            let below = w - 1;
            let mut j = below / 64;
            let mut sm = pick_sum(self.index_sum(j)) & low_mask(below % 64 + 1);
            loop {
                if sm != 0 {
                    let w2 = j * 64 + 63 - sm.leading_zeros() as usize;
                    let m = pick(self.index_word(w2));
                    debug_assert!(m != 0, "pagealloc: index summary promises a chunk in word {w2}");
                    break 'search Some(w2 * 64 + 63 - m.leading_zeros() as usize);
                }
                if j == 0 {
                    break 'search None;
                }
                j -= 1;
                sm = pick_sum(self.index_sum(j));
            }
        };
        let c = found.map_or(0, |c| c + 1);
        if force {
            self.cursor_force = c;
        } else {
            self.cursor_bg = c;
        }
        found
    }

    /// Checks the scavenge index against the chunks' bitmaps (the equations in the module docs); panics with
    /// the first violation.
    pub fn validate_index(&self) {
        let g = self.grown_chunks;
        for w in 0..g.div_ceil(INDEX_WORD_CHUNKS) {
            let x = self.index_word(w);
            let (mut free, mut dense) = (0u64, 0u64);
            for k in 0..INDEX_WORD_CHUNKS.min(g - w * 64) {
                let c = self.chunk(w * 64 + k);
                let any = c.alloc.iter().zip(&c.scav).any(|(a, sc)| !a & !sc != 0);
                let nalloc: usize = c.alloc.iter().map(|a| a.count_ones() as usize).sum();
                free |= (any as u64) << k;
                dense |= ((nalloc >= SCAV_CHUNK_HI_OCC_PAGES) as u64) << k;
            }
            assert_eq!(x.free, free, "scavenge index: free bits of chunks {}..{} stale", w * 64, w * 64 + 64);
            assert_eq!(x.dense, dense, "scavenge index: dense bits of chunks {}..{} stale", w * 64, w * 64 + 64);
            let grown_mask = low_mask(INDEX_WORD_CHUNKS.min(g - w * 64));
            assert_eq!(x.dense_gen & !grown_mask, 0, "scavenge index: history bits beyond the grown chunks");
            assert_eq!(x.dense_prev & !grown_mask, 0, "scavenge index: history bits beyond the grown chunks");
            assert_eq!(x.bg, x.free & !(x.dense | x.dense_gen | x.dense_prev), "scavenge index: bg bits of word {w}");
            let s = self.index_sum(w / 64);
            let bit = 1u64 << (w % 64);
            assert_eq!(s.free & bit != 0, x.free != 0, "scavenge index: summary free bit of word {w}");
            assert_eq!(s.bg & bit != 0, x.bg != 0, "scavenge index: summary bg bit of word {w}");
            for k in 0..64 {
                let ci = w * 64 + k;
                if x.free & (1 << k) != 0 {
                    assert!(ci < self.cursor_force, "scavenge index: chunk {ci} above the forced cursor");
                }
                if x.bg & (1 << k) != 0 {
                    assert!(ci < self.cursor_bg, "scavenge index: chunk {ci} above the background cursor");
                }
            }
        }
        for j in 0..g.div_ceil(INDEX_SUM_CHUNKS) {
            let words = g.div_ceil(INDEX_WORD_CHUNKS) - j * 64;
            let s = self.index_sum(j);
            assert_eq!((s.free | s.bg) & !low_mask(words.min(64)), 0, "scavenge index: summary bits beyond grown");
        }
    }

    /// Checks the invariants in the module docs except `scav ⊆ !alloc`, which the heap maintains (it commits
    /// what it allocates) and checks itself; panics with a description of the first violation.
    pub fn validate(&self) {
        let g = self.grown_chunks;
        let mut free = 0;
        let mut scav = 0;
        for ci in 0..g {
            let c = self.chunk(ci);
            let s = summarize(&c.alloc);
            assert_eq!(self.sum(SUMMARY_LEVELS - 1, ci), s, "pagealloc: leaf summary of chunk {ci} stale");
            for w in 0..PALLOC_CHUNK_WORDS {
                free += (!c.alloc[w]).count_ones() as usize;
                scav += c.scav[w].count_ones() as usize;
            }
        }
        for l in (0..SUMMARY_LEVELS - 1).rev() {
            for i in 0..level_len(l, g) {
                let mut kids = [PallocSum(0); SUMMARY_FANOUT];
                for (k, kid) in kids.iter_mut().enumerate() {
                    *kid = self.sum(l + 1, i * SUMMARY_FANOUT + k);
                }
                let want = merge_summaries(&kids, level_log_pages(l + 1));
                assert_eq!(self.sum(l, i), want, "pagealloc: summary level {l} entry {i} inconsistent");
            }
        }
        assert_eq!(free, self.free_npages, "pagealloc: free page count");
        assert_eq!(scav, self.scav_npages, "pagealloc: scavenged page count");
        let below = self.search_idx.min(self.grown_npages());
        assert_eq!(self.count_alloc(0, below), below, "pagealloc: free page below the search hint {}", self.search_idx);
        self.validate_index();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::vec;
    use std::vec::Vec;

    /// A page allocator over plain heap memory (no page source).
    struct TestPa {
        pa: PageAlloc,
        _mem: Vec<u64>,
    }

    fn test_pa(max_chunks: usize, grown: usize) -> TestPa {
        let layout = PageAllocLayout::new(max_chunks);
        let mut mem = vec![0xABAB_ABAB_ABAB_ABABu64; layout.total_bytes / 8];
        let mut pa = PageAlloc::empty();
        // SAFETY: `mem` is ours, big enough, fully "committed", and outlives `pa` (same struct).
        unsafe {
            pa.init(layout, mem.as_mut_ptr().cast());
            pa.grow(grown);
        }
        TestPa { pa, _mem: mem }
    }

    fn naive_find(bits: &[bool], n: usize) -> Option<usize> {
        let mut run = 0;
        for (i, &b) in bits.iter().enumerate() {
            if b {
                run = 0;
            } else {
                run += 1;
                if run == n {
                    return Some(i + 1 - n);
                }
            }
        }
        None
    }

    #[test]
    fn summarize_matches_naive() {
        let mut bits = [0u64; 8];
        assert_eq!(summarize(&bits), PallocSum::pack(512, 512, 512));
        set_bits(&mut bits, 3, 10, true);
        set_bits(&mut bits, 100, 200, true);
        set_bits(&mut bits, 500, 2, true);
        assert_eq!(summarize(&bits), PallocSum::pack(3, 200, 10));
        bits = [!0; 8];
        assert_eq!(summarize(&bits), PallocSum(0));
    }

    #[test]
    fn summarize_matches_bit_by_bit() {
        let mut x = 0x2545_F491_4F6C_DD1Du64;
        for round in 0..20_000 {
            let mut bits = [0u64; 8];
            for w in bits.iter_mut() {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                // Mix dense, sparse and structured words.
                *w = match (x >> 60) % 6 {
                    0 => 0,
                    1 => !0,
                    2 => x,
                    3 => x & (x >> 3) & (x >> 7),
                    4 => x | (x >> 5) | (x << 9),
                    _ => 0x5555_5555_5555_5555 << (x % 64),
                };
            }
            assert_eq!(summarize(&bits), summarize_naive(&bits), "round {round}: {bits:x?}");
        }
    }

    #[test]
    fn merge_crossing_runs() {
        let full = PallocSum::pack(512, 512, 512);
        let a = PallocSum::pack(0, 5, 100);
        let b = PallocSum::pack(7, 7, 0);
        let m = merge_summaries(&[a, full, full, b, PallocSum(0), PallocSum(0), PallocSum(0), PallocSum(0)], 9);
        assert_eq!(m, PallocSum::pack(0, 100 + 1024 + 7, 0));
    }

    #[test]
    fn find_cross_chunk_and_first_fit() {
        let mut t = test_pa(40, 20);
        let pa = &mut t.pa;
        // Allocate everything, then free a few holes, including ones crossing chunk and root boundaries.
        assert_eq!(pa.alloc(20 * 512), Some(0));
        assert_eq!(pa.alloc(1), None);
        pa.free_range(700, 3);
        pa.free_range(1000, 100); // crosses chunk 1 -> 2
        pa.free_range(5000, 3000); // spans many chunks
        pa.validate();
        assert_eq!(pa.find(1), Some(700));
        assert_eq!(pa.find(4), Some(1000));
        assert_eq!(pa.find(101), Some(5000));
        assert_eq!(pa.find(3000), Some(5000));
        assert_eq!(pa.find(3001), None);
        assert_eq!(pa.free_tail_npages(), 0);
        pa.free_range(20 * 512 - 10, 10);
        assert_eq!(pa.free_tail_npages(), 10);
        // SAFETY: the test memory covers 40 chunks.
        unsafe { pa.grow(30) };
        assert_eq!(pa.free_tail_npages(), 10 + 10 * 512);
        assert_eq!(pa.find(10 + 5000), Some(20 * 512 - 10));
        pa.validate();
    }

    #[test]
    fn random_against_naive() {
        // Deterministic pseudo-random sequence (xorshift), arena across two root entries.
        let chunks = CHUNKS_PER_ROOT + 16;
        let mut t = test_pa(chunks, chunks);
        let pa = &mut t.pa;
        let mut model = vec![false; chunks * 512];
        let mut live: Vec<(usize, usize)> = Vec::new();
        let mut x = 0x1234_5678_9abc_def0u64;
        for step in 0..4000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            if live.is_empty() || x % 3 != 0 {
                let n = match x % 7 {
                    0 => 1 + (x >> 8) as usize % 4096,
                    1 => 1 + (x >> 8) as usize % 300_000,
                    _ => 1 + (x >> 8) as usize % 64,
                };
                let want = naive_find(&model, n);
                let got = pa.alloc(n);
                assert_eq!(got, want, "step {step}: alloc {n}");
                if let Some(i) = got {
                    model[i..i + n].iter_mut().for_each(|b| *b = true);
                    live.push((i, n));
                }
            } else {
                let k = (x >> 20) as usize % live.len();
                let (i, n) = live.swap_remove(k);
                pa.free_range(i, n);
                model[i..i + n].iter_mut().for_each(|b| *b = false);
            }
            if step % 97 == 0 {
                pa.validate();
            }
        }
        pa.validate();
    }

    #[test]
    fn cache_blocks_round_trip() {
        let mut t = test_pa(2, 1);
        let pa = &mut t.pa;
        pa.alloc_range(0, 3);
        let (base, free, scav) = pa.alloc_to_cache().unwrap();
        assert_eq!(base, 0);
        assert_eq!(free, !0b111);
        assert_eq!(scav, free);
        assert_eq!(pa.find(1), Some(64));
        pa.free_from_cache(base, free, scav);
        assert_eq!(pa.find(1), Some(3));
        pa.validate();
    }

    /// The page-level shadow of a [`PageAlloc`] and of its scavenge index's defining equations (see the
    /// module docs): pages' allocated and scavenged bits, and each chunk's density history.
    struct Shadow {
        alloc: Vec<bool>,
        scav: Vec<bool>,
        dense_gen: Vec<bool>,
        dense_prev: Vec<bool>,
    }

    impl Shadow {
        fn new(chunks: usize) -> Self {
            let n = chunks * PALLOC_CHUNK_PAGES;
            Self {
                alloc: vec![false; n],
                scav: vec![true; n],
                dense_gen: vec![false; chunks],
                dense_prev: vec![false; chunks],
            }
        }
        fn pages(&self, c: usize) -> core::ops::Range<usize> {
            c * PALLOC_CHUNK_PAGES..(c + 1) * PALLOC_CHUNK_PAGES
        }
        fn free(&self, c: usize) -> bool {
            self.pages(c).any(|p| !self.alloc[p] && !self.scav[p])
        }
        fn dense(&self, c: usize) -> bool {
            self.pages(c).filter(|&p| self.alloc[p]).count() >= SCAV_CHUNK_HI_OCC_PAGES
        }
        fn bg(&self, c: usize) -> bool {
            self.free(c) && !self.dense(c) && !self.dense_gen[c] && !self.dense_prev[c]
        }
        /// After an allocation or free of pages (not the scavenger's): a chunk dense now was dense in this
        /// generation.
        fn note(&mut self, lo: usize, n: usize) {
            for c in lo / PALLOC_CHUNK_PAGES..=(lo + n - 1) / PALLOC_CHUNK_PAGES {
                if self.dense(c) {
                    self.dense_gen[c] = true;
                }
            }
        }
        fn set(v: &mut [bool], lo: usize, n: usize, b: bool) {
            v[lo..lo + n].iter_mut().for_each(|x| *x = b);
        }
    }

    /// Checks every chunk's index bits against the shadow, and the searches against a brute-force scan.
    fn check_index(pa: &mut PageAlloc, sh: &Shadow, chunks: usize) {
        pa.validate();
        for c in 0..chunks {
            let x = pa.index_word(c / 64);
            let bit = |v: u64| v & (1 << (c % 64)) != 0;
            assert_eq!(bit(x.free), sh.free(c), "chunk {c}: free");
            assert_eq!(bit(x.dense), sh.dense(c), "chunk {c}: dense");
            assert_eq!(bit(x.bg), sh.bg(c), "chunk {c}: bg");
        }
        // The searches return the highest chunk with the bit, and again after (the cursor stays above it).
        let want_bg = (0..chunks).rev().find(|&c| sh.bg(c));
        let want_force = (0..chunks).rev().find(|&c| sh.free(c));
        assert_eq!(pa.index_find(false), want_bg);
        assert_eq!(pa.index_find(false), want_bg);
        assert_eq!(pa.index_find(true), want_force);
        assert_eq!(pa.index_cursors(), (want_bg.map_or(0, |c| c + 1), want_force.map_or(0, |c| c + 1)));
    }

    /// The scavenge index against a brute-force shadow over random allocations, frees, commits, page-cache
    /// blocks, scavenger runs and generation changes (the scavenger's own runs leave the density history
    /// alone).
    #[test]
    fn scavenge_index_against_shadow() {
        let chunks = 150; // three index words, the last partial
        let mut t = test_pa(chunks + 10, chunks);
        let pa = &mut t.pa;
        let mut sh = Shadow::new(chunks);
        let mut live: Vec<(usize, usize)> = Vec::new();
        let mut cached: Vec<(usize, u64, u64)> = Vec::new();
        let mut rng = testkit::Rng::new(14);
        for step in 0..3000 {
            match rng.index(12) {
                0..=3 => {
                    let n = match rng.index(5) {
                        0 => 400 + rng.index(700),
                        1 => 490 + rng.index(30),
                        _ => 1 + rng.index(64),
                    };
                    if let Some(i) = pa.alloc(n) {
                        Shadow::set(&mut sh.alloc, i, n, true);
                        sh.note(i, n);
                        // The heap commits what it allocates.
                        if rng.index(4) != 0 {
                            pa.set_scav(i, n, false);
                            Shadow::set(&mut sh.scav, i, n, false);
                        }
                        live.push((i, n));
                    }
                }
                4..=6 if !live.is_empty() => {
                    let (i, n) = live.swap_remove(rng.index(live.len()));
                    pa.free_range(i, n);
                    Shadow::set(&mut sh.alloc, i, n, false);
                    sh.note(i, n);
                }
                7 => {
                    if let Some((base, free, scav)) = pa.alloc_to_cache() {
                        for b in 0..64 {
                            if free & (1 << b) != 0 {
                                sh.alloc[base + b] = true;
                                sh.scav[base + b] = false;
                            }
                        }
                        sh.note(base, 64);
                        cached.push((base, free, scav));
                    }
                }
                8 if !cached.is_empty() => {
                    let (base, free, scav) = cached.swap_remove(rng.index(cached.len()));
                    for b in 0..64 {
                        if free & (1 << b) != 0 {
                            sh.alloc[base + b] = false;
                            sh.scav[base + b] = scav & (1 << b) != 0;
                        }
                    }
                    pa.free_from_cache(base, free, scav);
                    sh.note(base, 64);
                }
                9 | 10 => {
                    // A scavenger run: the highest free unscavenged page of the chunk the index gives, and up
                    // to 40 pages below it.
                    let force = rng.index(2) == 0;
                    if let Some(c) = pa.index_find(force) {
                        let p = sh.pages(c).rev().find(|&p| !sh.alloc[p] && !sh.scav[p]).expect("index: free");
                        let mut lo = p;
                        while lo > c * PALLOC_CHUNK_PAGES && p - lo < 40 && !sh.alloc[lo - 1] && !sh.scav[lo - 1] {
                            lo -= 1;
                        }
                        let n = p - lo + 1;
                        pa.scav_take(lo, n);
                        Shadow::set(&mut sh.alloc, lo, n, true);
                        if rng.index(3) == 0 {
                            check_index(pa, &sh, chunks); // while the run is in flight
                        }
                        pa.scav_return(lo, n);
                        Shadow::set(&mut sh.alloc, lo, n, false);
                        Shadow::set(&mut sh.scav, lo, n, true);
                    }
                }
                _ => {
                    pa.index_next_gen();
                    sh.dense_prev = core::mem::take(&mut sh.dense_gen);
                    sh.dense_gen = (0..chunks).map(|c| sh.dense(c)).collect();
                }
            }
            if step % 7 == 0 {
                check_index(pa, &sh, chunks);
            }
        }
        check_index(pa, &sh, chunks);
    }

    /// The index's summary level: chunks more than 4096 apart (two summary words) are found from the top
    /// down, and growing keeps the index (new chunks are scavenged: nothing to find in them).
    #[test]
    fn scavenge_index_across_summary_words() {
        let chunks = INDEX_SUM_CHUNKS + 200;
        let mut t = test_pa(chunks, INDEX_SUM_CHUNKS - 3);
        let pa = &mut t.pa;
        let lo = 5 * PALLOC_CHUNK_PAGES + 7;
        pa.alloc_range(lo, 1);
        pa.set_scav(lo, 1, false);
        pa.free_range(lo, 1); // chunk 5: one free committed page
        assert_eq!(pa.index_find(true), Some(5));
        // SAFETY: the test memory covers `chunks`.
        unsafe { pa.grow(chunks) };
        let hi = (INDEX_SUM_CHUNKS + 100) * PALLOC_CHUNK_PAGES + 300;
        pa.alloc_range(hi, 2);
        pa.set_scav(hi, 2, false);
        pa.free_range(hi, 2);
        pa.validate();
        assert_eq!(pa.index_find(false), Some(INDEX_SUM_CHUNKS + 100));
        assert_eq!(pa.index_find(true), Some(INDEX_SUM_CHUNKS + 100));
        pa.scav_take(hi, 2);
        pa.scav_return(hi, 2);
        assert_eq!(pa.index_find(false), Some(5), "found through the summary word below");
        assert_eq!(pa.index_find(true), Some(5));
        pa.scav_take(lo, 1);
        pa.scav_return(lo, 1);
        assert_eq!(pa.index_find(false), None);
        assert_eq!(pa.index_find(true), None);
        assert_eq!(pa.index_cursors(), (0, 0));
        pa.validate();
    }
}
