//! Booting a disk image in QEMU: serial on stdout, isa-debug-exit mapped to an outcome, `-no-reboot`,
//! a timeout, and QEMU killed if the runner dies.

use std::io::{Read, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::proc;
use crate::say;
use crate::setup::Tools;

/// Default time a kernel may run before it is killed.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(120);
/// QEMU's status when the kernel wrote 0x10 (success) to isa-debug-exit: (0x10 << 1) | 1.
const QEMU_SUCCESS: i32 = 33;
/// QEMU's status when the kernel wrote 0x11 (failure).
const QEMU_FAILURE: i32 = 35;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Firmware {
    Uefi,
    Bios,
}

impl Firmware {
    pub fn name(self) -> &'static str {
        match self {
            Firmware::Uefi => "uefi",
            Firmware::Bios => "bios",
        }
    }
}

#[derive(Debug, Clone)]
pub struct QemuOptions {
    pub firmware: Firmware,
    pub smp: u32,
    pub mem: String,
    pub timeout: Duration,
    /// Appended to QEMU's command line as they are.
    pub extra: Vec<String>,
}

impl Default for QemuOptions {
    fn default() -> Self {
        Self { firmware: Firmware::Uefi, smp: 4, mem: "256M".into(), timeout: DEFAULT_TIMEOUT, extra: Vec::new() }
    }
}

/// How a QEMU run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The kernel wrote 0x10 to isa-debug-exit.
    Success,
    /// The kernel wrote another value (0x11 is the failure code; panics use it).
    Failure { code: i32 },
    /// QEMU ended without the kernel writing to isa-debug-exit: a triple fault or reset (with
    /// `-no-reboot` QEMU then exits with 0), a shutdown, a QEMU error, or a signal.
    NoExit { status: String },
    /// Killed after the timeout.
    Timeout(Duration),
}

impl Outcome {
    /// The exit status of `cargo xtask run` for this outcome (documented in README.md and `run --help`).
    pub fn exit_code(&self) -> u8 {
        match self {
            Outcome::Success => 0,
            Outcome::Failure { .. } => 1,
            Outcome::NoExit { .. } => 3,
            Outcome::Timeout(_) => 124,
        }
    }

    pub fn describe(&self) -> String {
        match self {
            Outcome::Success => "kernel exited with success".into(),
            Outcome::Failure { code: 0x11 } => "kernel exited with FAILURE (isa-debug-exit code 0x11)".into(),
            Outcome::Failure { code } => format!("kernel exited with FAILURE (isa-debug-exit code {code:#x})"),
            Outcome::NoExit { status } => format!(
                "QEMU ended without the kernel exiting through isa-debug-exit ({status}): a triple fault or \
                 reset (-no-reboot), a shutdown, or a QEMU error"
            ),
            Outcome::Timeout(t) => format!("TIMEOUT: kernel still running after {}s, QEMU killed", t.as_secs()),
        }
    }
}

/// The QEMU command line for `image`.
pub fn command(tools: &Tools, image: &Path, opts: &QemuOptions) -> Command {
    let mut cmd = Command::new(&tools.qemu);
    // `snapshot=on`: writes go to a temporary overlay, so two runs may boot the same image at once (a test
    // run beside `cargo xtask run`) without QEMU's image write lock failing one of them.
    cmd.arg("-drive").arg(format!("format=raw,snapshot=on,file={}", image.display()));
    if opts.firmware == Firmware::Uefi {
        cmd.arg("-bios").arg(&tools.ovmf);
    }
    cmd.args(["-serial", "stdio", "-display", "none", "-monitor", "none"])
        .args(["-device", "isa-debug-exit,iobase=0xf4,iosize=0x04"])
        // Software emulation: the machine's /dev/kvm is nested and far slower for firmware than TCG.
        .args(["-accel", "tcg", "-no-reboot"])
        .arg("-smp")
        .arg(opts.smp.to_string())
        .arg("-m")
        .arg(&opts.mem)
        .args(&opts.extra);
    cmd
}

/// Boots `image`, copying the serial console to stdout as it comes; returns the outcome and the output.
pub fn run(tools: &Tools, image: &Path, opts: &QemuOptions) -> Result<(Outcome, String), String> {
    let mut cmd = command(tools, image, opts);
    cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::inherit());
    say!("$ {}", proc::show(&cmd));
    let start = Instant::now();
    let mut child = proc::die_with_parent(&mut cmd).spawn().map_err(|e| format!("starting QEMU: {e}"))?;
    let mut stdout = child.stdout.take().expect("stdout is piped");
    let copier = std::thread::spawn(move || {
        let mut seen = Vec::new();
        let mut buf = [0u8; 4096];
        let mut out = std::io::stdout();
        while let Ok(n) = stdout.read(&mut buf) {
            if n == 0 {
                break;
            }
            let _ = out.write_all(&buf[..n]);
            let _ = out.flush();
            seen.extend_from_slice(&buf[..n]);
        }
        String::from_utf8_lossy(&seen).into_owned()
    });
    let outcome = loop {
        match child.try_wait() {
            Ok(Some(status)) => {
                break match status.code() {
                    Some(QEMU_SUCCESS) => Outcome::Success,
                    Some(QEMU_FAILURE) => Outcome::Failure { code: 0x11 },
                    // Any other odd status above 1 is another value written to isa-debug-exit.
                    Some(c) if c > 1 && c % 2 == 1 => Outcome::Failure { code: c >> 1 },
                    _ => Outcome::NoExit { status: status.to_string() },
                };
            }
            Ok(None) if start.elapsed() >= opts.timeout => {
                let _ = child.kill();
                let _ = child.wait();
                break Outcome::Timeout(opts.timeout);
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(50)),
            Err(e) => return Err(format!("waiting for QEMU: {e}")),
        }
    };
    let output = copier.join().unwrap_or_default();
    if !output.ends_with('\n') {
        println!();
    }
    say!("{} after {}", outcome.describe(), proc::fmt_duration(start.elapsed()));
    Ok((outcome, output))
}
