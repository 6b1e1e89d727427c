//! The size-class generator (feature `generator`): computes the classes the way Go's
//! `runtime/mksizeclasses.go` does and renders `table.rs`. `cargo xtask gen-size-classes` writes
//! [`render`]'s output to `src/object/sizeclass/table.rs`; a test checks that the committed file is current.
//!
//! # Algorithm
//!
//! 1. Walk the sizes from [`MIN_ALIGN`] to [`MAX_SMALL_SIZE`] in steps of the current alignment. At each
//!    power of two the alignment is bumped: 16 from 32 B, `size/8` from 128 B, 256 from 2 KiB.
//! 2. For each size take the smallest span, in whole pages, whose tail waste
//!    `span % size` is at most `span / 8`.
//! 3. If the previous class has the same span size and the same object count, the size replaces the
//!    previous class's size (the class grows) instead of making a new class.
//! 4. Finally every class grows to the largest size that still gives the same object count in its span,
//!    `span / (span / size)` rounded down to a multiple of [`LARGE_SIZE_DIV`] (128), when that is larger.
//!    Go rounds to 128 rather than to the walk's alignment, and so do we: it keeps the classes above
//!    [`SMALL_SIZE_MAX`] on the 128-byte lookup grid, and the finer class alignments of step 1 would
//!    produce a different list (the two-page 5-object class grows to 3200 with 128 but would stay at
//!    3072 with 256, colliding with the three-page 8-object class that also grows to 3072). Below 1024 the
//!    rounding leaves every class as it is.
//!
//! The division magic of each class is `u32::MAX / size + 1`; [`div_magic`] checks it exhaustively
//! against real division for every offset in the span.

use super::{LARGE_SIZE_DIV, MIN_ALIGN, SMALL_SIZE_DIV, SMALL_SIZE_MAX};
use crate::{MAX_SMALL_SIZE, PAGE_SIZE};
use core::fmt::Write;
use std::string::{String, ToString};
use std::vec;
use std::vec::Vec;

/// A generated class. Index 0 of [`classes`] is the dummy class 0 (all zeros).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GenClass {
    /// Object size in bytes.
    pub size: usize,
    /// Span size in pages.
    pub npages: usize,
}

impl GenClass {
    /// Span size in bytes.
    pub fn span_bytes(&self) -> usize {
        self.npages * PAGE_SIZE
    }

    /// Objects per span.
    pub fn nelems(&self) -> usize {
        self.span_bytes().checked_div(self.size).unwrap_or(0)
    }

    /// Bytes left over at the end of a span.
    pub fn tail_waste(&self) -> usize {
        self.span_bytes() - self.nelems() * self.size
    }
}

/// The walk's alignment for `size`, given the alignment before it (bumped at powers of two).
fn bump_align(size: usize, align: usize) -> usize {
    if !size.is_power_of_two() {
        align
    } else if size >= 2048 {
        256
    } else if size >= 128 {
        size / 8
    } else if size >= 32 {
        16
    } else {
        align
    }
}

/// Smallest span (in pages) for `size` whose tail waste is at most 1/8 of the span.
fn span_pages(size: usize) -> usize {
    let mut span = PAGE_SIZE;
    while span % size > span / 8 {
        span += PAGE_SIZE;
    }
    span / PAGE_SIZE
}

/// Computes the size classes; index 0 is the dummy class 0.
pub fn classes() -> Vec<GenClass> {
    let mut classes = vec![GenClass { size: 0, npages: 0 }];
    let mut align = MIN_ALIGN;
    let mut size = MIN_ALIGN;
    while size <= MAX_SMALL_SIZE {
        align = bump_align(size, align);
        assert!(align.is_power_of_two(), "alignment {align} at size {size} is not a power of two");
        let npages = span_pages(size);
        let span = npages * PAGE_SIZE;
        let last = classes.len() - 1;
        if last > 0 && classes[last].npages == npages && span / classes[last].size == span / size {
            classes[last].size = size;
        } else {
            classes.push(GenClass { size, npages });
        }
        size += align;
    }
    for c in classes.iter_mut().skip(1) {
        let span = c.span_bytes();
        let grown = span / (span / c.size) / LARGE_SIZE_DIV * LARGE_SIZE_DIV;
        if grown > c.size {
            c.size = grown;
        }
    }
    check(&classes);
    classes
}

/// The invariants the rest of the allocator relies on; panics if one fails.
fn check(classes: &[GenClass]) {
    for (i, c) in classes.iter().enumerate().skip(1) {
        assert!(c.size > classes[i - 1].size, "class {i}: sizes not increasing");
        assert!(c.size % MIN_ALIGN == 0, "class {i}: size {} not a multiple of {MIN_ALIGN}", c.size);
        // The 128-byte lookup table rounds sizes above SMALL_SIZE_MAX up to LARGE_SIZE_DIV, so every
        // class there must be a multiple of it.
        assert!(
            c.size <= SMALL_SIZE_MAX || c.size % LARGE_SIZE_DIV == 0,
            "class {i}: size {} above {SMALL_SIZE_MAX} not a multiple of {LARGE_SIZE_DIV}",
            c.size
        );
        assert!(c.tail_waste() <= c.span_bytes() / 8, "class {i}: tail waste above 1/8");
        assert!(c.npages <= u8::MAX as usize, "class {i}: npages does not fit u8");
        assert!(c.nelems() <= u16::MAX as usize, "class {i}: nelems does not fit u16");
        div_magic(c);
    }
    assert_eq!(classes.last().map(|c| c.size), Some(MAX_SMALL_SIZE), "last class must be MAX_SMALL_SIZE");
}

/// The division magic of a class, `u32::MAX / size + 1` (0 for class 0): `(offset * magic) >> 32 ==
/// offset / size` for every `offset` in `0..=span_bytes`. Checked exhaustively; panics if it fails.
pub fn div_magic(c: &GenClass) -> u32 {
    if c.size == 0 {
        return 0;
    }
    let magic = (u32::MAX / c.size as u32).wrapping_add(1);
    for offset in 0..=c.span_bytes() as u64 {
        assert_eq!(
            (offset * magic as u64) >> 32,
            offset / c.size as u64,
            "division magic {magic} of size {} wrong at offset {offset}",
            c.size
        );
    }
    magic
}

/// For each lookup step `i` (size `i * step`, from `base`), the smallest class 1.. whose size is at least
/// that size.
fn lookup(classes: &[GenClass], base: usize, step: usize, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| {
            let size = base + i * step;
            let c = (1..classes.len()).find(|&c| classes[c].size >= size).expect("size beyond the classes");
            u8::try_from(c).expect("class index does not fit u8")
        })
        .collect()
}

/// Go's `size_to_class8`: entry `i` is the class of sizes `(i-1)*8+1 ..= i*8` (entry 0: class 1).
pub fn size_to_class8(classes: &[GenClass]) -> Vec<u8> {
    lookup(classes, 0, SMALL_SIZE_DIV, SMALL_SIZE_MAX / SMALL_SIZE_DIV + 1)
}

/// Go's `size_to_class128`: entry `i` is the class of sizes up to `SMALL_SIZE_MAX + i*128`.
pub fn size_to_class128(classes: &[GenClass]) -> Vec<u8> {
    lookup(classes, SMALL_SIZE_MAX, LARGE_SIZE_DIV, (MAX_SMALL_SIZE - SMALL_SIZE_MAX) / LARGE_SIZE_DIV + 1)
}

/// `num / den` as a percentage with two decimals, rounded half up (integer arithmetic, so the output is
/// the same everywhere).
fn percent(num: usize, den: usize) -> String {
    let hundredths = (num as u128 * 20_000 + den as u128) / (2 * den as u128);
    std::format!("{}.{:02}%", hundredths / 100, hundredths % 100)
}

/// Writes `pub const NAME: [TY; LEN] = [...];` with `per_line` values a line.
fn array(out: &mut String, doc: &str, name: &str, ty: &str, len: &str, values: &[u64], per_line: usize) {
    for line in doc.lines() {
        writeln!(out, "/// {line}").unwrap();
    }
    writeln!(out, "pub const {name}: [{ty}; {len}] = [").unwrap();
    for chunk in values.chunks(per_line) {
        let items: Vec<String> = chunk.iter().map(|v| std::format!("{v},")).collect();
        writeln!(out, "    {}", items.join(" ")).unwrap();
    }
    writeln!(out, "];").unwrap();
}

/// The full Rust source of `src/object/sizeclass/table.rs`.
pub fn render() -> String {
    let classes = classes();
    let mut out = String::new();
    let o = &mut out;
    writeln!(o, "// Code generated by `cargo xtask gen-size-classes`; DO NOT EDIT.").unwrap();
    writeln!(o, "//").unwrap();
    writeln!(o, "// Generator: src/object/sizeclass/gen.rs, after Go's runtime/mksizeclasses.go.").unwrap();
    writeln!(
        o,
        "// Pages of {PAGE_SIZE} bytes; objects of {MIN_ALIGN} to {MAX_SMALL_SIZE} bytes; tail waste at most 1/8 of a span."
    )
    .unwrap();
    writeln!(o, "//").unwrap();
    writeln!(o, "// class  bytes/obj  bytes/span  objects  tail waste  max waste  min align").unwrap();
    let mut prev = 0;
    let mut min_size_for_align = [0usize; crate::PAGE_SHIFT + 1];
    for (i, c) in classes.iter().enumerate().skip(1) {
        // Worst case: every object is one byte larger than the previous class.
        let max_waste = (c.size - prev - 1) * c.nelems() + c.tail_waste();
        let align_bits = (c.size.trailing_zeros() as usize).min(crate::PAGE_SHIFT);
        for (bits, min) in min_size_for_align.iter_mut().enumerate() {
            if bits > align_bits {
                *min = 0;
            } else if *min == 0 {
                *min = c.size;
            }
        }
        writeln!(
            o,
            "// {i:5}  {:9}  {:10}  {:7}  {:10}  {:>9}  {:9}",
            c.size,
            c.span_bytes(),
            c.nelems(),
            c.tail_waste(),
            percent(max_waste, c.span_bytes()),
            1usize << align_bits
        )
        .unwrap();
        prev = c.size;
    }
    writeln!(o, "//").unwrap();
    // As Go's table: for each alignment (from MIN_ALIGN), the size from which on every class is aligned
    // to it; only the rows where that size changes.
    writeln!(o, "// alignment  bits  min obj size").unwrap();
    let mut last_min = 0;
    for (bits, &min) in min_size_for_align.iter().enumerate().skip(MIN_ALIGN.trailing_zeros() as usize) {
        if min != last_min {
            writeln!(o, "// {:9}  {bits:4}  {min:12}", 1usize << bits).unwrap();
            last_min = min;
        }
    }
    writeln!(o).unwrap();
    writeln!(o, "//! The generated size-class table; see `mod.rs` for its meaning and `gen.rs` for how it is made.")
        .unwrap();
    writeln!(o).unwrap();
    writeln!(o, "/// Number of size classes, including class 0 (no class: large objects).").unwrap();
    writeln!(o, "pub const NUM_SIZE_CLASSES: usize = {};", classes.len()).unwrap();
    writeln!(o).unwrap();

    let n = "NUM_SIZE_CLASSES";
    let col = |f: &dyn Fn(&GenClass) -> u64| classes.iter().map(f).collect::<Vec<u64>>();
    array(o, "Object size in bytes per class.", "CLASS_SIZE", "u32", n, &col(&|c| c.size as u64), 16);
    writeln!(o).unwrap();
    array(o, "Span size in pages per class.", "CLASS_NPAGES", "u8", n, &col(&|c| c.npages as u64), 24);
    writeln!(o).unwrap();
    array(o, "Objects per span per class.", "CLASS_NELEMS", "u16", n, &col(&|c| c.nelems() as u64), 16);
    writeln!(o).unwrap();
    array(
        o,
        "Division magic per class: `offset / size == (offset * magic) >> 32` within a span.",
        "CLASS_DIVMAGIC",
        "u32",
        n,
        &col(&|c| div_magic(c) as u64),
        8,
    );
    writeln!(o).unwrap();
    let c8: Vec<u64> = size_to_class8(&classes).into_iter().map(u64::from).collect();
    let c8_len = c8.len().to_string();
    array(
        o,
        &std::format!(
            "Class of sizes up to {SMALL_SIZE_MAX}: index `(size + {}) / {SMALL_SIZE_DIV}`.",
            SMALL_SIZE_DIV - 1
        ),
        "SIZE_TO_CLASS8",
        "u8",
        &c8_len,
        &c8,
        24,
    );
    writeln!(o).unwrap();
    let c128: Vec<u64> = size_to_class128(&classes).into_iter().map(u64::from).collect();
    let c128_len = c128.len().to_string();
    array(
        o,
        &std::format!(
            "Class of sizes {SMALL_SIZE_MAX} to {MAX_SMALL_SIZE}: index `(size - {SMALL_SIZE_MAX} + {}) / {LARGE_SIZE_DIV}`.",
            LARGE_SIZE_DIV - 1
        ),
        "SIZE_TO_CLASS128",
        "u8",
        &c128_len,
        &c128,
        24,
    );
    out
}
