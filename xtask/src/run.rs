//! `cargo xtask run`: build the demo kernel, make its image and boot it in QEMU.

use std::process::ExitCode;
use std::time::Duration;

use crate::kernel::KernelBuilder;
use crate::qemu::{self, Firmware, QemuOptions};
use crate::{say, setup, EXIT_ERROR};

pub const USAGE: &str = "\
usage: cargo xtask run [OPTIONS] [-- KERNEL_ARGS...]

Builds the demo kernel (kernel-demo/) with the kernel toolchain, makes a disk image with bootloader 0.11.15
and boots it in QEMU (TCG); the kernel's serial console is copied to stdout.

options:
  --bios               boot through legacy BIOS instead of UEFI (OVMF)
  --smp N              number of CPUs (default 4)
  --mem SIZE           memory, as QEMU's -m takes it (default 256M)
  --release            build the kernel with the release profile
  --timeout SECS       kill QEMU after SECS seconds (default 120)
  --qemu-args \"ARGS\"   extra QEMU arguments, split on whitespace (repeatable), e.g. --qemu-args \"-d int\"
  --profile-out FILE   where the heap profile of a `-- --profile` run goes (default target/kernel-heap.pb.gz)
  -- KERNEL_ARGS...    arguments for the kernel (e.g. `-- --oom`); they reach it in a ramdisk
                       (kernel-demo/src/args.rs); with `-- --profile` the kernel prints goheap's heap
                       profile and the runner writes it as a pprof file (xtask/src/profile.rs)

environment: GOHEAP_BOOT_LOG=off|error|warn|info|debug|trace  the bootloader's own log level (default warn)

exit status: 0 the kernel exited with success; 1 the kernel exited with failure (a panic, say);
             3 QEMU ended without the kernel exiting (triple fault/reset, QEMU error); 124 timeout;
             2 the runner failed before booting (usage, set-up, build)
";

struct RunArgs {
    release: bool,
    /// Where a `--profile` kernel's heap profile goes (default `target/kernel-heap.pb.gz`).
    profile_out: Option<std::path::PathBuf>,
    qemu: QemuOptions,
    kernel_args: Vec<String>,
}

fn parse(args: &[String]) -> Result<Option<RunArgs>, String> {
    let mut r = RunArgs { release: false, profile_out: None, qemu: QemuOptions::default(), kernel_args: Vec::new() };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut value = |name: &str| it.next().cloned().ok_or(format!("{name} needs a value"));
        match a.as_str() {
            "--bios" => r.qemu.firmware = Firmware::Bios,
            "--uefi" => r.qemu.firmware = Firmware::Uefi,
            "--release" => r.release = true,
            "--smp" => {
                let v = value("--smp")?;
                r.qemu.smp = v.parse().ok().filter(|&n| n >= 1).ok_or(format!("--smp {v}: not a CPU count"))?;
            }
            "--mem" => r.qemu.mem = value("--mem")?,
            "--profile-out" => r.profile_out = Some(value("--profile-out")?.into()),
            "--timeout" => {
                let v = value("--timeout")?;
                let secs: u64 = v.parse().map_err(|_| format!("--timeout {v}: not a number of seconds"))?;
                r.qemu.timeout = Duration::from_secs(secs);
            }
            "--qemu-args" => r.qemu.extra.extend(value("--qemu-args")?.split_whitespace().map(String::from)),
            "-h" | "--help" => return Ok(None),
            "--" => {
                r.kernel_args.extend(it.by_ref().cloned());
            }
            other => return Err(format!("unknown option {other:?}")),
        }
    }
    Ok(Some(r))
}

pub fn main(args: &[String]) -> ExitCode {
    let r = match parse(args) {
        Ok(Some(r)) => r,
        Ok(None) => {
            print!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("cargo xtask run: {e}\n\n{USAGE}");
            return ExitCode::from(EXIT_ERROR);
        }
    };
    let tools = match setup::ensure() {
        Ok(t) => t,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(EXIT_ERROR);
        }
    };
    say!("set-up: {}", tools.describe());
    let kb = KernelBuilder::new(&tools.kernel);
    let image = kb.build_image_tool().and_then(|tool| {
        let kernel = kb.build_demo(r.release)?;
        Ok((kb.make_image(&tool, &kernel, "kernel-demo", r.qemu.firmware, &r.kernel_args)?, kernel))
    });
    let (image, kernel) = match image {
        Ok(i) => i,
        Err(e) => {
            eprintln!("cargo xtask run: {e}");
            return ExitCode::from(EXIT_ERROR);
        }
    };
    say!(
        "booting {} ({}, {} CPUs, {}, timeout {}s)",
        image.display(),
        r.qemu.firmware.name(),
        r.qemu.smp,
        r.qemu.mem,
        r.qemu.timeout.as_secs()
    );
    match qemu::run(&tools, &image, &r.qemu) {
        Ok((outcome, serial)) if r.kernel_args.iter().any(|a| a == "--profile") => {
            let out = r.profile_out.clone().unwrap_or_else(crate::profile::default_out);
            match crate::profile::save(&serial, &kernel, &out) {
                Ok(()) => ExitCode::from(outcome.exit_code()),
                Err(e) => {
                    eprintln!("cargo xtask run: {e}");
                    ExitCode::from(EXIT_ERROR)
                }
            }
        }
        Ok((outcome, _)) => ExitCode::from(outcome.exit_code()),
        Err(e) => {
            eprintln!("cargo xtask run: {e}");
            ExitCode::from(EXIT_ERROR)
        }
    }
}
