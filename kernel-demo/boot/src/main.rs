//! `boot --kernel KERNEL_ELF --out IMAGE [--bios] [--ramdisk FILE] [--log-level off|error|warn|info|debug|trace]`
//!
//! Called by `cargo xtask`; makes a UEFI (default) or BIOS disk image with bootloader 0.11.15.
use bootloader_boot_config::LevelFilter;
use std::path::PathBuf;
use std::process::ExitCode;

fn main() -> ExitCode {
    let mut kernel = None;
    let mut out = None;
    let mut ramdisk = None;
    let mut bios = false;
    let mut config = bootloader::BootConfig::default();
    // The bootloader's own log (serial and frame buffer): warnings only unless asked, so the kernel's
    // output is what shows.
    config.log_level = LevelFilter::Warn;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--kernel" => kernel = args.next().map(PathBuf::from),
            "--out" => out = args.next().map(PathBuf::from),
            "--ramdisk" => ramdisk = args.next().map(PathBuf::from),
            "--bios" => bios = true,
            "--uefi" => bios = false,
            "--log-level" => {
                config.log_level = match args.next().as_deref() {
                    Some("off") => LevelFilter::Off,
                    Some("error") => LevelFilter::Error,
                    Some("warn") => LevelFilter::Warn,
                    Some("info") => LevelFilter::Info,
                    Some("debug") => LevelFilter::Debug,
                    Some("trace") => LevelFilter::Trace,
                    other => {
                        eprintln!("boot: bad --log-level {other:?}");
                        return ExitCode::from(2);
                    }
                }
            }
            other => {
                eprintln!("boot: unknown argument {other:?}");
                return ExitCode::from(2);
            }
        }
    }
    let (Some(kernel), Some(out)) = (kernel, out) else {
        eprintln!("usage: boot --kernel KERNEL_ELF --out IMAGE [--bios] [--ramdisk FILE] [--log-level LEVEL]");
        return ExitCode::from(2);
    };
    let result = if bios {
        let mut b = bootloader::BiosBoot::new(&kernel);
        b.set_boot_config(&config);
        if let Some(r) = &ramdisk {
            b.set_ramdisk(r);
        }
        b.create_disk_image(&out)
    } else {
        let mut b = bootloader::UefiBoot::new(&kernel);
        b.set_boot_config(&config);
        if let Some(r) = &ramdisk {
            b.set_ramdisk(r);
        }
        b.create_disk_image(&out)
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("boot: creating {} from {} failed: {e:#}", out.display(), kernel.display());
            ExitCode::FAILURE
        }
    }
}
