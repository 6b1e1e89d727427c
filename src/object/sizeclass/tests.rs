//! Tests of the size-class tier: the committed table against the generator and against Go's published
//! classes, the lookups against linear scans, the division magic against real division, the waste bound.

use super::*;
use crate::page::span::obj_index;

/// Go's published size classes (runtime/sizeclasses.go), class 0 first: the spec's "68 classes".
const GO_CLASS_SIZES: [u32; 68] = [
    0, 8, 16, 24, 32, 48, 64, 80, 96, 112, 128, 144, 160, 176, 192, 208, 224, 240, 256, 288, 320, 352, 384, 416, 448,
    480, 512, 576, 640, 704, 768, 896, 1024, 1152, 1280, 1408, 1536, 1792, 2048, 2304, 2688, 3072, 3200, 3456, 4096,
    4864, 5376, 6144, 6528, 6784, 6912, 8192, 9472, 9728, 10240, 10880, 12288, 13568, 14336, 16384, 18432, 19072,
    20480, 21760, 24576, 27264, 28672, 32768,
];

/// Smallest class `c >= 1` whose size is at least `size` and a multiple of `align`, by a linear scan.
fn scan(size: usize, align: usize) -> Option<usize> {
    (1..NUM_SIZE_CLASSES).find(|&c| {
        let s = CLASSES[c].size as usize;
        s >= size && s % align == 0
    })
}

#[cfg(feature = "generator")]
#[test]
fn table_is_current() {
    let committed = include_str!("table.rs");
    let generated = gen::render();
    if committed != generated {
        let line = committed.lines().zip(generated.lines()).position(|(a, b)| a != b);
        panic!(
            "src/object/sizeclass/table.rs is stale (first difference at line {}): run `cargo xtask gen-size-classes`",
            line.unwrap_or_else(|| committed.lines().count().min(generated.lines().count())) + 1
        );
    }
}

#[cfg(feature = "generator")]
#[test]
fn generator_matches_go() {
    let sizes: std::vec::Vec<u32> = gen::classes().iter().map(|c| c.size as u32).collect();
    assert_eq!(sizes, GO_CLASS_SIZES, "the generator no longer reproduces Go's size classes");
}

#[test]
fn classes_match_go() {
    assert_eq!(NUM_SIZE_CLASSES, 68);
    let sizes: [u32; NUM_SIZE_CLASSES] = core::array::from_fn(|c| CLASSES[c].size);
    assert_eq!(sizes, GO_CLASS_SIZES);
}

#[test]
fn class_zero_is_empty_and_invariants_hold() {
    let z = CLASSES[0];
    assert_eq!((z.size, z.npages, z.nelems, z.divmagic), (0, 0, 0, 0));
    assert_eq!(CLASSES[1].size as usize, MIN_ALIGN);
    assert_eq!(CLASSES[NUM_SIZE_CLASSES - 1].size as usize, MAX_SMALL_SIZE);
    for c in 1..NUM_SIZE_CLASSES {
        let k = CLASSES[c];
        let size = k.size as usize;
        assert!(size > CLASSES[c - 1].size as usize, "class {c}: sizes not increasing");
        assert_eq!(size % MIN_ALIGN, 0, "class {c}");
        assert!(size <= SMALL_SIZE_MAX || size % LARGE_SIZE_DIV == 0, "class {c}: off the 128-byte grid");
        assert!(k.npages >= 1, "class {c}");
        assert_eq!(k.span_bytes(), k.npages as usize * PAGE_SIZE);
    }
}

#[test]
fn waste_bound() {
    for (c, k) in CLASSES.iter().enumerate().skip(1) {
        let span = k.span_bytes();
        let size = k.size as usize;
        assert_eq!(k.nelems as usize, span / size, "class {c}: nelems != span / size");
        let tail = span - k.nelems as usize * size;
        assert!(tail <= span / 8, "class {c}: tail waste {tail} of span {span} exceeds 1/8");
    }
}

#[test]
fn class_of_matches_linear_scan() {
    assert_eq!(class_of(0), 1);
    for size in 1..=MAX_SMALL_SIZE {
        let c = class_of(size);
        assert_eq!(Some(c), scan(size, 1), "class_of({size})");
        assert!(CLASSES[c].size as usize >= size);
    }
}

#[test]
fn class_for_matches_linear_scan() {
    for shift in 0..=crate::PAGE_SHIFT {
        let align = 1 << shift;
        for size in 1..=MAX_SMALL_SIZE {
            let got = class_for(size, align);
            assert_eq!(got, scan(size, align), "class_for({size}, {align})");
            let c = got.expect("every size has a class at alignments up to the page size");
            assert_eq!(CLASSES[c].size as usize % align, 0, "class_for({size}, {align})");
        }
        assert_eq!(class_for(0, align), scan(0, align), "class_for(0, {align})");
        assert_eq!(class_for(MAX_SMALL_SIZE + 1, align), None);
        assert_eq!(class_for(usize::MAX - 1, align), None);
    }
    assert_eq!(class_for(8, 2 * PAGE_SIZE), None);
    assert_eq!(class_for(8, 1 << 40), None);
}

/// The walk in `class_for_aligned` past the class of the rounded-up size stays short.
#[test]
fn class_for_walk_is_short() {
    let mut longest = 0;
    for shift in 4..=crate::PAGE_SHIFT {
        let align = 1usize << shift;
        for size in 0..=MAX_SMALL_SIZE {
            if let Some(min) = size.max(align).checked_next_multiple_of(align).filter(|&m| m <= MAX_SMALL_SIZE) {
                let start = class_of(min);
                let c = class_for(size, align).unwrap();
                longest = longest.max(c - start);
            }
        }
    }
    assert!(longest <= 2, "class_for walks {longest} classes past the class of the rounded-up size");
}

#[test]
fn obj_index_exact() {
    for (c, k) in CLASSES.iter().enumerate().skip(1) {
        let size = k.size as usize;
        assert_eq!(k.divmagic, u32::MAX / k.size + 1, "class {c}: divmagic");
        // Every offset of the span (and the span end): the object starts map to their index, and every
        // byte inside an object maps to that object.
        for offset in 0..=k.span_bytes() {
            assert_eq!(obj_index(k.divmagic, offset), offset / size, "class {c}, offset {offset}");
        }
        for i in 0..k.nelems as usize {
            assert_eq!(obj_index(k.divmagic, i * size), i);
            assert_eq!(obj_index(k.divmagic, i * size + size - 1), i);
        }
    }
}
