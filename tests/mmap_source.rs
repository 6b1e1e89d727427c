//! `MmapSource`: read-write reservations where Linux overcommits, `PROT_NONE` ones under strict
//! accounting and for `MmapSource::strict()`; commit/decommit round trips read zero either way.
#![cfg(feature = "std")]

use goheap::source::mmap::MmapSource;
use goheap::source::PageSource;

const MIB: usize = 1 << 20;

fn overcommits() -> bool {
    std::fs::read_to_string("/proc/sys/vm/overcommit_memory").is_ok_and(|s| s.trim() != "2")
}

/// Commits `[p, p + n)`, writes it, decommits it, commits it again and checks it reads zero.
fn round_trip(src: &MmapSource) {
    let p = src.reserve(4 * MIB, 2 * MIB).expect("reserve");
    assert_eq!(p.as_ptr() as usize % (2 * MIB), 0, "reservation not aligned");
    let before = src.committed_bytes();
    // SAFETY (test): the ranges lie in the reservation above and follow commit/decommit order.
    unsafe {
        assert!(src.commit(p, MIB));
        assert_eq!(src.committed_bytes(), before + MIB);
        std::ptr::write_bytes(p.as_ptr(), 0xA5, MIB);
        src.decommit(p, MIB);
        assert_eq!(src.committed_bytes(), before);
        assert!(src.commit(p, MIB));
        let bytes = std::slice::from_raw_parts(p.as_ptr(), MIB);
        assert!(bytes.iter().all(|&b| b == 0), "recommitted memory does not read zero");
        src.decommit(p, MIB);
    }
}

#[test]
fn default_source_maps_read_write_where_linux_overcommits() {
    let src = MmapSource::new();
    assert_eq!(src.maps_read_write(), overcommits());
    round_trip(&src);
}

#[test]
fn strict_source_keeps_prot_none() {
    let src = MmapSource::strict();
    assert!(!src.maps_read_write());
    round_trip(&src);
}
