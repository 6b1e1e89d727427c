//! Kernel arguments: what follows `--` in `cargo xtask run -- ARGS...`.
//!
//! The xtask writes them, one per line, into a small file that the bootloader loads as the ramdisk;
//! `BootInfo::ramdisk_addr`/`ramdisk_len` point at it (mapped by the bootloader). No ramdisk means no
//! arguments.

use bootloader_api::BootInfo;

/// First line of the ramdisk file, so another ramdisk is not mistaken for arguments.
pub const MAGIC: &str = "goheap-kernel-args v1";

/// The kernel arguments, borrowed from the ramdisk.
#[derive(Clone, Copy)]
pub struct Args {
    text: &'static str,
}

impl Args {
    /// Reads the arguments from the boot information (none if there is no ramdisk or it isn't ours).
    pub fn from_boot_info(boot_info: &BootInfo) -> Self {
        let none = Self { text: "" };
        let Some(addr) = boot_info.ramdisk_addr.into_option() else { return none };
        let len = boot_info.ramdisk_len as usize;
        // SAFETY: the bootloader mapped the ramdisk at `addr` for `len` bytes and leaves it mapped,
        // read-only as far as the kernel is concerned, for the whole run.
        let bytes = unsafe { core::slice::from_raw_parts(addr as *const u8, len) };
        let Ok(text) = core::str::from_utf8(bytes) else { return none };
        match text.strip_prefix(MAGIC) {
            Some(rest) => Self { text: rest.trim_start_matches('\n') },
            None => none,
        }
    }

    /// The arguments, in order.
    pub fn iter(&self) -> impl Iterator<Item = &'static str> {
        self.text.lines().filter(|l| !l.is_empty())
    }

    /// Whether `flag` (e.g. `"--oom"`) was given.
    pub fn has(&self, flag: &str) -> bool {
        self.iter().any(|a| a == flag)
    }

    /// Whether there are no arguments.
    pub fn is_empty(&self) -> bool {
        self.iter().next().is_none()
    }
}
