//! The ACPI MADT ("APIC" table), parsed by hand: which CPUs (local APIC IDs) the machine has and where
//! the local APIC's registers are.
//!
//! Path: the RSDP (address from `BootInfo::rsdp_addr`) → the XSDT (ACPI 2+) or RSDT → the table with
//! signature `APIC`. Physical memory is read through the bootloader's physical-memory mapping
//! (`BootInfo::physical_memory_offset`). Nothing is allocated: the result is a fixed-size [`Madt`].
//! A hand parser keeps the kernel free of a dependency whose newer versions need nightly features.

use core::ptr::read_unaligned;

/// Most processor entries kept (xAPIC IDs are 8 bits).
pub const MAX_MADT_CPUS: usize = 256;

/// One processor entry of the MADT (local APIC, type 0, or local x2APIC, type 9).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MadtCpu {
    /// The CPU's local APIC ID.
    pub apic_id: u32,
    /// Usable now (flag bit 0). Disabled entries with the online-capable bit are hot-plug slots.
    pub enabled: bool,
}

/// What the kernel needs from the MADT.
#[derive(Debug, Clone, Copy)]
pub struct Madt {
    /// Physical address of the local APIC registers (the override entry, type 5, wins).
    pub lapic_phys: u64,
    /// Processor entries in table order (the first `len` are valid).
    cpus: [MadtCpu; MAX_MADT_CPUS],
    len: usize,
}

impl Madt {
    /// All processor entries, enabled or not, in table order.
    pub fn cpus(&self) -> &[MadtCpu] {
        &self.cpus[..self.len]
    }

    /// The enabled processors' APIC IDs, in table order.
    pub fn enabled(&self) -> impl Iterator<Item = u32> + '_ {
        self.cpus().iter().filter(|c| c.enabled).map(|c| c.apic_id)
    }

    /// Number of enabled processors.
    pub fn enabled_count(&self) -> usize {
        self.enabled().count()
    }
}

/// Why the MADT could not be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AcpiError {
    /// The bootloader passed no RSDP address.
    NoRsdp,
    /// The bootloader did not map physical memory.
    NoPhysicalMapping,
    /// The RSDP's signature or checksum is wrong.
    BadRsdp,
    /// A table's checksum is wrong (its signature given).
    BadChecksum([u8; 4]),
    /// The RSDT/XSDT lists no `APIC` table.
    NoMadt,
}

/// Reads the MADT through the physical-memory mapping at `phys_offset`.
///
/// # Safety
/// `rsdp_phys` is the RSDP's physical address as the firmware reported it, and all physical memory is
/// mapped (readable) at `phys_offset`, as the bootloader's physical-memory mapping provides.
pub unsafe fn read_madt(rsdp_phys: u64, phys_offset: u64) -> Result<Madt, AcpiError> {
    let p = |phys: u64| (phys + phys_offset) as *const u8;
    let rd8 = |phys: u64| -> u8 {
        // SAFETY: the caller guarantees physical memory is mapped at `phys_offset`; ACPI tables lie in
        // physical memory the firmware reserved for them, and one byte is read without alignment demands.
        unsafe { read_unaligned(p(phys)) }
    };
    let rd32 = |phys: u64| -> u32 {
        // SAFETY: as for `rd8`, four bytes read unaligned.
        unsafe { read_unaligned(p(phys) as *const u32) }
    };
    let rd64 = |phys: u64| -> u64 {
        // SAFETY: as for `rd8`, eight bytes read unaligned.
        unsafe { read_unaligned(p(phys) as *const u64) }
    };
    let sum = |phys: u64, len: u64| (0..len).fold(0u8, |s, i| s.wrapping_add(rd8(phys + i)));

    // RSDP: "RSD PTR ", checksum over 20 bytes (ACPI 1), revision at 15, RSDT at 16, XSDT at 24 (rev >= 2).
    let sig: [u8; 8] = core::array::from_fn(|i| rd8(rsdp_phys + i as u64));
    if &sig != b"RSD PTR " || sum(rsdp_phys, 20) != 0 {
        return Err(AcpiError::BadRsdp);
    }
    let revision = rd8(rsdp_phys + 15);
    let (root, entry_size) = if revision >= 2 && rd64(rsdp_phys + 24) != 0 {
        (rd64(rsdp_phys + 24), 8)
    } else {
        (u64::from(rd32(rsdp_phys + 16)), 4)
    };
    let table_sig = |phys: u64| -> [u8; 4] { core::array::from_fn(|i| rd8(phys + i as u64)) };
    let root_len = u64::from(rd32(root + 4));
    if sum(root, root_len) != 0 {
        return Err(AcpiError::BadChecksum(table_sig(root)));
    }
    // Find "APIC" among the root table's entries (after the 36-byte header).
    let mut madt_phys = None;
    let mut at = root + 36;
    while at + entry_size <= root + root_len {
        let t = if entry_size == 8 { rd64(at) } else { u64::from(rd32(at)) };
        if t != 0 && &table_sig(t) == b"APIC" {
            madt_phys = Some(t);
            break;
        }
        at += entry_size;
    }
    let madt = madt_phys.ok_or(AcpiError::NoMadt)?;
    let len = u64::from(rd32(madt + 4));
    if sum(madt, len) != 0 {
        return Err(AcpiError::BadChecksum(*b"APIC"));
    }
    let mut out = Madt {
        lapic_phys: u64::from(rd32(madt + 36)),
        cpus: [MadtCpu { apic_id: 0, enabled: false }; MAX_MADT_CPUS],
        len: 0,
    };
    // Entries start after the header (36), the LAPIC address (4) and the flags (4).
    let mut at = madt + 44;
    while at + 2 <= madt + len {
        let (kind, elen) = (rd8(at), u64::from(rd8(at + 1)));
        if elen < 2 || at + elen > madt + len {
            break;
        }
        let cpu = match kind {
            // Processor local APIC: ACPI processor ID (2), APIC ID (3), flags (4).
            0 if elen >= 8 => Some(MadtCpu { apic_id: u32::from(rd8(at + 3)), enabled: rd32(at + 4) & 1 != 0 }),
            // Local x2APIC: reserved (2), x2APIC ID (4), flags (8).
            9 if elen >= 16 => Some(MadtCpu { apic_id: rd32(at + 4), enabled: rd32(at + 8) & 1 != 0 }),
            // Local APIC address override: reserved (2), 64-bit address (4).
            5 if elen >= 12 => {
                out.lapic_phys = rd64(at + 4);
                None
            }
            _ => None,
        };
        if let Some(cpu) = cpu {
            if out.len < MAX_MADT_CPUS {
                out.cpus[out.len] = cpu;
                out.len += 1;
            }
        }
        at += elen;
    }
    Ok(out)
}
