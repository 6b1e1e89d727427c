//! A summary of the boot memory map.

use bootloader_api::info::{MemoryRegionKind, MemoryRegions};

/// Totals over the bootloader's memory map.
#[derive(Debug, Clone, Copy, Default)]
pub struct MemorySummary {
    /// Number of regions in the map.
    pub regions: usize,
    /// Number of usable regions.
    pub usable_regions: usize,
    /// Bytes in usable regions.
    pub usable_bytes: u64,
    /// Size of the largest usable region.
    pub largest_usable: u64,
}

impl MemorySummary {
    /// Adds up the map.
    pub fn of(map: &MemoryRegions) -> Self {
        let mut s = Self { regions: map.len(), ..Self::default() };
        for region in map.iter().filter(|r| r.kind == MemoryRegionKind::Usable) {
            let size = region.end - region.start;
            s.usable_regions += 1;
            s.usable_bytes += size;
            s.largest_usable = s.largest_usable.max(size);
        }
        s
    }
}
