//! `cargo xtask soak [--minutes N] [--kernel] [--smp N[,N...]] [--threads N] [--hang-secs S] [--debug]`
//! (issue 13): long randomized runs of goheap, on the host or in QEMU.
//!
//! - host (default): `examples/soak.rs`, built in release with `std,checks,validate`, run for N minutes
//!   (default 60): more worker threads than goheap's cache slots, coming and going, a random mix of sizes
//!   and alignments with every block verified, blocks handed between threads, and service threads running
//!   `background`, `release_all`, `set_memory_limit` and statistics reads; a watchdog fails it on a hang.
//! - `--kernel`: the soak test kernel (`kernel-demo/tests/soak.rs`) booted in QEMU with
//!   `--soak-secs=N*60` at each CPU count of `--smp` (default 4), 1 GiB of memory (2 GiB above 4 CPUs), a
//!   QEMU timeout of the soak's length plus 15 minutes as the outer watchdog. Built in release (under TCG a
//!   debug kernel does a few operations per second per CPU on a loaded host) unless `--debug`. `cargo xtask
//!   test` boots the same kernel in debug for one minute (its `//! xtask:` line).
//!
//! Both print operations done, peak and final committed memory and the largest single-call latency, and
//! the command exits non-zero when a run fails (mismatch, report, hang, fault, timeout).

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::Duration;

use crate::kernel::KernelBuilder;
use crate::qemu::{self, Firmware, Outcome, QemuOptions};
use crate::{proc, say, setup, EXIT_ERROR};

const USAGE: &str = "\
usage: cargo xtask soak [--minutes N] [--kernel] [--smp N[,N...]] [--threads N] [--hang-secs S] [--debug]

  --minutes N      length of each run (default 60; fractions allowed)
  --kernel         the QEMU soak kernel (kernel-demo/tests/soak.rs) instead of the host soak
  --smp N[,N...]   CPU counts of the kernel runs, one run each (default 4)
  --threads N      host: worker threads at once (default 80; goheap has 64 cache slots)
  --hang-secs S    host: watchdog, fail after S seconds without progress of a thread (default 300)
  --debug          kernel: boot the debug build (default: release)
exit status: 0 every run passed; 1 a run failed; 2 usage, set-up or build error
";

struct Args {
    minutes: f64,
    kernel: bool,
    smp: Vec<u32>,
    threads: usize,
    hang_secs: u64,
    debug: bool,
}

fn parse(args: &[String]) -> Result<Option<Args>, String> {
    let mut a = Args { minutes: 60.0, kernel: false, smp: vec![4], threads: 80, hang_secs: 300, debug: false };
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let mut value = |name: &str| it.next().cloned().ok_or(format!("{name} needs a value"));
        match arg.as_str() {
            "--minutes" => {
                let v = value("--minutes")?;
                a.minutes = v.parse().ok().filter(|m: &f64| *m > 0.0).ok_or(format!("--minutes {v}: not a length"))?;
            }
            "--kernel" => a.kernel = true,
            "--debug" => a.debug = true,
            "--smp" => {
                let v = value("--smp")?;
                a.smp = v
                    .split(',')
                    .map(|n| n.parse().ok().filter(|&n| (1..=64).contains(&n)))
                    .collect::<Option<Vec<u32>>>()
                    .ok_or(format!("--smp {v}: not a list of CPU counts"))?;
            }
            "--threads" => {
                let v = value("--threads")?;
                a.threads = v.parse().ok().filter(|&n| n > 0).ok_or(format!("--threads {v}: not a count"))?;
            }
            "--hang-secs" => {
                let v = value("--hang-secs")?;
                a.hang_secs = v.parse().ok().filter(|&n| n > 0).ok_or(format!("--hang-secs {v}: not a count"))?;
            }
            "-h" | "--help" => return Ok(None),
            other => return Err(format!("unknown option {other:?}")),
        }
    }
    Ok(Some(a))
}

pub fn main(args: &[String]) -> ExitCode {
    let a = match parse(args) {
        Ok(Some(a)) => a,
        Ok(None) => {
            print!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("cargo xtask soak: {e}\n\n{USAGE}");
            return ExitCode::from(EXIT_ERROR);
        }
    };
    let root = crate::root();
    let seconds = a.minutes * 60.0;
    if !a.kernel {
        let bin = match build_host(&root) {
            Ok(b) => b,
            Err(e) => {
                eprintln!("cargo xtask soak: {e}");
                return ExitCode::from(EXIT_ERROR);
            }
        };
        return match run_host(&bin, seconds, a.threads, a.hang_secs) {
            Ok(line) => {
                say!("host soak passed: {line}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                say!("host soak FAILED: {e}");
                ExitCode::FAILURE
            }
        };
    }
    let tools = match setup::ensure() {
        Ok(t) => t,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(EXIT_ERROR);
        }
    };
    let kb = KernelBuilder::new(&tools.kernel);
    let release = !a.debug;
    let built = kb.build_image_tool().and_then(|tool| {
        let tests = kb.build_tests(release)?;
        let soak =
            tests.into_iter().find(|t| t.name == "soak").ok_or("no soak test kernel (kernel-demo/tests/soak.rs)")?;
        Ok((tool, soak))
    });
    let (tool, soak) = match built {
        Ok(b) => b,
        Err(e) => {
            eprintln!("cargo xtask soak: {e}");
            return ExitCode::from(EXIT_ERROR);
        }
    };
    let secs = seconds.ceil() as u64;
    let mut failed = false;
    let mut results = Vec::new();
    for &smp in &a.smp {
        let opts = QemuOptions {
            firmware: Firmware::Uefi,
            smp,
            mem: if smp > 4 { "2G".into() } else { "1G".into() },
            timeout: Duration::from_secs(secs + 900),
            extra: Vec::new(),
        };
        let name = format!("soak-smp{smp}");
        let args = vec![format!("--soak-secs={secs}")];
        say!(
            "kernel soak: {secs} s at {smp} CPUs ({}), QEMU timeout {} s",
            if release { "release" } else { "debug" },
            opts.timeout.as_secs()
        );
        let r =
            kb.make_image(&tool, &soak.elf, &name, opts.firmware, &args).and_then(|img| qemu::run(&tools, &img, &opts));
        let line = match r {
            Ok((Outcome::Success, out)) => format!("{smp} CPUs: passed; {}", figures(&out, "soak kernel:")),
            Ok((o, out)) => {
                failed = true;
                format!("{smp} CPUs: FAILED: {}; {}", o.describe(), figures(&out, "soak kernel:"))
            }
            Err(e) => {
                failed = true;
                format!("{smp} CPUs: FAILED: {e}")
            }
        };
        results.push(line);
    }
    for l in &results {
        say!("kernel soak, {l}");
    }
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

/// The figure lines of a soak's output (those starting with `prefix` after the progress lines).
fn figures(out: &str, prefix: &str) -> String {
    let lines: Vec<&str> = out
        .lines()
        .map(str::trim)
        .filter(|l| {
            l.starts_with(prefix)
                && (l.contains("operations") || l.contains("committed memory") || l.contains("latency"))
        })
        .collect();
    if lines.is_empty() {
        "no figures printed".into()
    } else {
        lines.join(" | ")
    }
}

/// Builds the host soak (release, `std,checks,validate`); returns the binary.
pub fn build_host(root: &Path) -> Result<PathBuf, String> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(root).env_remove("RUSTC_BOOTSTRAP").args([
        "build",
        "--release",
        "-p",
        "goheap",
        "--example",
        "soak",
        "--features",
        "std,checks,validate",
    ]);
    say!("$ {}", proc::show(&cmd));
    let status = proc::run_streaming(&mut cmd, "building the host soak").map_err(|e| format!("cargo: {e}"))?;
    if !status.success() {
        return Err(format!("building the host soak failed ({status})"));
    }
    Ok(root.join("target/release/examples/soak"))
}

/// Runs the host soak for `seconds`; Ok(its figures) when it passed.
pub fn run_host(bin: &Path, seconds: f64, threads: usize, hang_secs: u64) -> Result<String, String> {
    let mut cmd = Command::new(bin);
    cmd.arg("--seconds")
        .arg(format!("{seconds}"))
        .arg("--threads")
        .arg(threads.to_string())
        .arg("--hang-secs")
        .arg(hang_secs.to_string())
        .stdout(std::process::Stdio::piped());
    say!("$ {}", proc::show(&cmd));
    let mut child = proc::die_with_parent(&mut cmd).spawn().map_err(|e| format!("{}: {e}", bin.display()))?;
    let mut out = String::new();
    if let Some(stdout) = child.stdout.take() {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stdout).lines().map_while(Result::ok) {
            println!("{line}");
            out.push_str(&line);
            out.push('\n');
        }
    }
    let status = child.wait().map_err(|e| e.to_string())?;
    let figs = figures(&out, "soak host:");
    if status.success() {
        Ok(figs)
    } else {
        Err(format!("{status}; {figs}"))
    }
}
