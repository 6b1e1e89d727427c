//! `cargo xtask test`: every test, then a summary ending in `N passed, N failed`.
//!
//! 1. set-up (install what is missing);
//! 2. host tests: `cargo test --workspace --all-features` with the toolchain running xtask (rustup's), then
//!    `cargo test -p goheap --features std` (goheap's default build, without `checks`), then the loom
//!    models (`RUSTFLAGS="--cfg loom" cargo test --release --test 'loom_*'` in `target/loom`);
//!    issue 13's short runs: ThreadSanitizer and AddressSanitizer (`sanitize.rs --short`) and a one-minute
//!    host soak (`soak.rs`); cold, their builds took 19 and 2.5 minutes on a loaded 2-core machine (TSan
//!    rebuilds std). `GOHEAP_TEST_CONCURRENCY=0` leaves them out (a quicker local run);
//! 3. goheap built for `x86_64-unknown-none` with the kernel toolchain (it must stay no_std);
//! 4. style gates (`gates.rs`): `cargo fmt --check` in both workspaces, clippy `-D warnings` over each
//!    feature set of goheap and over xtask and bench, `cargo doc -D warnings` per feature set, `cargo
//!    package -p goheap`, and goheap built with its MSRV toolchain, each a pass or a fail (MSRV: skipped
//!    where rustup cannot install it);
//!    then a short run of each fuzz target (`fuzz.rs`; skipped, with the reason, where the toolchain
//!    cannot fuzz);
//! 5. QEMU: the demo kernel under UEFI and BIOS, the minimal example kernel (`kernel-demo/examples/minimal.rs`)
//!    on one CPU under UEFI and BIOS, then every test kernel in `kernel-demo/tests/*.rs`.
//!
//! Test kernels: each `kernel-demo/tests/NAME.rs` is one kernel (custom_test_frameworks, or
//! `harness = false` in kernel-demo/Cargo.toml for must-panic kernels whose panic handler exits with
//! success). It passes when it exits through isa-debug-exit with success. QEMU options per test kernel come
//! from lines of its source that start with `//! xtask:` or `// xtask:`, with space-separated settings:
//!
//! ```text
//! //! xtask: smp=4 mem=512M timeout=300 firmware=both
//! //! xtask: qemu-args=-cpu,max       (commas stand for spaces)
//! //! xtask: kernel-args=--oom,--verbose
//! ```
//!
//! Defaults: smp=4, mem=256M, timeout=120, firmware=uefi (`bios` or `both` also accepted).

use std::path::Path;
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use crate::gates;
use crate::kernel::{KernelBuilder, TestKernel};
use crate::qemu::{self, Firmware, Outcome, QemuOptions};
use crate::setup::{self, Tools};
use crate::{proc, say, EXIT_ERROR};

/// One line of the summary.
struct Line {
    what: String,
    passed: u64,
    failed: u64,
    note: String,
}

#[derive(Default)]
struct Summary {
    lines: Vec<Line>,
    qemu_ran: u64,
    qemu_passed: u64,
    /// Test cases inside the QEMU kernels that passed.
    qemu_cases: u64,
}

impl Summary {
    fn add(&mut self, what: impl Into<String>, passed: u64, failed: u64, note: impl Into<String>) {
        self.lines.push(Line { what: what.into(), passed, failed, note: note.into() });
    }
    fn check(&mut self, what: &str, result: Result<String, String>) {
        match result {
            Ok(note) => self.add(what, 1, 0, note),
            Err(note) => self.add(what, 0, 1, note),
        }
    }
}

pub fn main(args: &[String]) -> ExitCode {
    if !args.is_empty() {
        eprintln!("usage: cargo xtask test");
        return ExitCode::from(EXIT_ERROR);
    }
    let start = Instant::now();
    let root = crate::root();
    let mut sum = Summary::default();

    say!("step 1/5: set-up");
    let tools = match setup::ensure() {
        Ok(t) => {
            say!("set-up: {}", t.describe());
            Some(t)
        }
        Err(e) => {
            eprintln!("{e}");
            sum.add("set-up", 0, 1, "kernel-side tools missing: no-std build and QEMU tests skipped");
            None
        }
    };

    let mut step = Instant::now();
    let mut done = |what: &str| {
        say!("{what} took {}", proc::fmt_duration(step.elapsed()));
        step = Instant::now();
    };
    done("step 1/5 (set-up)");
    say!("step 2/5: host tests (cargo test --workspace --all-features --no-fail-fast)");
    host_tests(&root, &mut sum);
    if std::env::var_os("GOHEAP_TEST_CONCURRENCY").is_some_and(|v| v == "0") {
        say!("sanitizers and the host soak: left out (GOHEAP_TEST_CONCURRENCY=0)");
        sum.add("sanitizers and the host soak", 0, 0, "SKIPPED: GOHEAP_TEST_CONCURRENCY=0");
    } else {
        concurrency_checks(&root, tools.as_ref(), &mut sum);
    }

    done("step 2/5 (host tests)");
    say!("step 3/5: goheap for x86_64-unknown-none (no_std) with the kernel toolchain");
    if let Some(tools) = &tools {
        let r = nostd_build(&root, tools);
        sum.check("goheap builds for x86_64-unknown-none", r);
    }

    done("step 3/5 (no_std build)");
    say!("step 4/5: style gates (rustfmt --check, clippy -D warnings per feature set and crate, docs, package, MSRV)");
    style_gates(&root, &mut sum);

    done("step 4/5 (style gates)");
    say!("fuzz: {} s of each fuzz target (cargo xtask fuzz --time {})", crate::fuzz::TEST_SECS, crate::fuzz::TEST_SECS);
    for (what, passed, failed, note) in crate::fuzz::test_step(&root) {
        sum.add(what, passed, failed, note);
    }
    done("fuzz");
    say!("step 5/5: QEMU kernels");
    if let Some(tools) = &tools {
        qemu_kernels(tools, &mut sum);
    }
    done("step 5/5 (QEMU kernels)");

    let passed: u64 = sum.lines.iter().map(|l| l.passed).sum();
    let failed: u64 = sum.lines.iter().map(|l| l.failed).sum();
    println!();
    println!("==================== cargo xtask test: summary ====================");
    for l in &sum.lines {
        let verdict = if l.failed == 0 { "ok    " } else { "FAILED" };
        println!("{verdict} {}: {} passed, {} failed{}", l.what, l.passed, l.failed, note(&l.note));
    }
    let host: (u64, u64) =
        sum.lines.iter().filter(|l| l.what.starts_with("host")).fold((0, 0), |(p, f), l| (p + l.passed, f + l.failed));
    println!("host tests: {} passed, {} failed", host.0, host.1);
    println!(
        "QEMU test kernels: {} ran, {} passed, {} failed; {} test case(s) passed in them",
        sum.qemu_ran,
        sum.qemu_passed,
        sum.qemu_ran - sum.qemu_passed,
        sum.qemu_cases
    );
    println!("wall time: {}", proc::fmt_duration(start.elapsed()));
    println!("{passed} passed, {failed} failed");
    if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn note(n: &str) -> String {
    if n.is_empty() {
        String::new()
    } else {
        format!(" ({n})")
    }
}

/// The cargo that runs xtask (rustup's, with its RUSTUP_TOOLCHAIN), for host-side work.
fn host_cargo(root: &Path) -> Command {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(root).env_remove("RUSTC_BOOTSTRAP");
    cmd
}

/// Counts from `test result: ok. 12 passed; 0 failed; ...` lines.
pub(crate) fn parse_test_result(line: &str) -> Option<(u64, u64)> {
    let rest = line.trim().strip_prefix("test result: ")?;
    let num_before = |word: &str| -> Option<u64> {
        let idx = rest.find(word)?;
        rest[..idx].trim_end().rsplit([' ', '.', ';']).next()?.parse().ok()
    };
    Some((num_before(" passed")?, num_before(" failed")?))
}

fn host_tests(root: &Path, sum: &mut Summary) {
    host_test_run(root, sum, &["--workspace", "--all-features"]);
    // Cargo unifies features, so goheap's default build (without `checks`, whose column of the bad-free
    // catalogue differs, and with the other tiny-span layout) is tested by a run of its own.
    host_test_run(root, sum, &["-p", "goheap", "--features", "std"]);
    // Issue 13's loom models (tests/loom_*.rs, each prints its explored count): the real code with loom's
    // atomics and lock (`src/sync.rs`), in release and in a target directory of their own so the normal
    // tree is not rebuilt.
    let loom_dir = root.join("target").join("loom");
    host_test_run_env(
        root,
        sum,
        &["--release", "-p", "goheap", "--features", "std,validate", "--test", "loom_*"],
        &[
            ("RUSTFLAGS", "--cfg loom".as_ref()),
            ("CARGO_TARGET_DIR", loom_dir.as_os_str()),
            ("RUST_TEST_NOCAPTURE", "1".as_ref()),
            // One model at a time: goheap's loom atomics belong to the model running (`sync`'s docs).
            ("RUST_TEST_THREADS", "1".as_ref()),
        ],
    );
}

/// One `cargo test ARGS --no-fail-fast` run, counted in the summary.
fn host_test_run(root: &Path, sum: &mut Summary, args: &[&str]) {
    host_test_run_env(root, sum, args, &[]);
}

/// As [`host_test_run`], with environment variables set for cargo.
fn host_test_run_env(root: &Path, sum: &mut Summary, args: &[&str], envs: &[(&str, &std::ffi::OsStr)]) {
    let env_shown: Vec<String> = envs.iter().map(|(k, v)| format!("{k}=\"{}\" ", v.to_string_lossy())).collect();
    let what = format!("host tests ({}cargo test {} --no-fail-fast)", env_shown.concat(), args.join(" "));
    let mut cmd = host_cargo(root);
    cmd.envs(envs.iter().copied());
    cmd.arg("test").args(args).arg("--no-fail-fast").stdout(Stdio::piped());
    say!("$ {}", proc::show(&cmd));
    let _beat = proc::Heartbeat::start("host tests".into(), Duration::from_secs(60));
    let child = proc::die_with_parent(&mut cmd).spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(e) => return sum.add(&what, 0, 1, format!("cannot run cargo: {e}")),
    };
    // Copy cargo test's stdout through while counting its `test result:` lines.
    let (mut passed, mut failed, mut suites) = (0, 0, 0);
    if let Some(out) = child.stdout.take() {
        use std::io::BufRead;
        for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
            println!("{line}");
            if let Some((p, f)) = parse_test_result(&line) {
                passed += p;
                failed += f;
                suites += 1;
            }
        }
    }
    let status = child.wait();
    let ok = status.as_ref().is_ok_and(|s| s.success());
    let mut note = format!("{suites} test binaries");
    if !ok && failed == 0 {
        // A build error (or a crashed test binary) fails without a `test result` line to count.
        failed = 1;
        note = format!("cargo test failed without a failing test to count ({}): see above", show_status(&status));
    }
    sum.add(&what, passed, failed, note);
}

/// Issue 13's short runs: TSan and ASan over goheap's host tests (`sanitize.rs`, skipped with the reason
/// where the toolchain does not allow them) and a one-minute host soak (`soak.rs`). The one-minute kernel
/// soak is a test kernel (`kernel-demo/tests/soak.rs`), booted with the others.
fn concurrency_checks(root: &Path, tools: Option<&Tools>, sum: &mut Summary) {
    use crate::sanitize::{self, Kind, Outcome as San};
    for kind in [Kind::Thread, Kind::Address] {
        say!("{} (short): goheap's host tests", kind.name());
        let what = format!("{} (cargo xtask sanitize --short)", kind.name());
        match sanitize::run(root, kind, true, tools.map(|t| &t.kernel)) {
            San::Skipped(why) => {
                say!("{}: SKIPPED: {why}", kind.name());
                sum.add(what, 0, 0, format!("SKIPPED: {why}"));
            }
            San::Ran { passed, failed, reports, note } => {
                sum.add(what, passed, failed, format!("{reports} report(s); {note}"))
            }
        }
    }
    say!("host soak, one minute (cargo xtask soak --minutes 1)");
    let r = crate::soak::build_host(root).and_then(|bin| crate::soak::run_host(&bin, 60.0, 80, 300));
    sum.check("host soak, 1 minute", r);
}

fn show_status(s: &std::io::Result<std::process::ExitStatus>) -> String {
    match s {
        Ok(s) => s.to_string(),
        Err(e) => e.to_string(),
    }
}

fn nostd_build(root: &Path, tools: &Tools) -> Result<String, String> {
    let mut cmd = tools.kernel.cargo();
    // A target directory of its own: another rustc than rustup's would invalidate the host builds' cache.
    cmd.current_dir(root)
        .args(["build", "-p", "goheap", "--lib", "--target", "x86_64-unknown-none"])
        .args(["-Zbuild-std=core,alloc", "--target-dir"])
        .arg(root.join("target/kernel-toolchain"));
    say!("$ {}", proc::show(&cmd));
    let status = proc::run_streaming(&mut cmd, "no_std build").map_err(|e| e.to_string())?;
    if status.success() {
        Ok(tools.kernel.version.clone())
    } else {
        Err(format!("build failed ({status}): see above"))
    }
}

fn style_gates(root: &Path, sum: &mut Summary) {
    for mut gate in gates::all(root, || host_cargo(root)) {
        match gates::run(&mut gate) {
            gates::Outcome::Ran(r) => sum.check(&gate.name, r),
            gates::Outcome::Skipped(why) => {
                sum.add(format!("{} (skipped)", gate.name), 0, 0, format!("skipped: {why}"))
            }
        }
    }
}

/// Per-kernel settings from `//! xtask:` lines (see the module docs).
struct KernelSettings {
    qemu: QemuOptions,
    firmwares: Vec<Firmware>,
    kernel_args: Vec<String>,
}

fn settings_of(src: &Path) -> Result<KernelSettings, String> {
    let mut s =
        KernelSettings { qemu: QemuOptions::default(), firmwares: vec![Firmware::Uefi], kernel_args: Vec::new() };
    let text = std::fs::read_to_string(src).map_err(|e| format!("reading {}: {e}", src.display()))?;
    for line in text.lines() {
        let line = line.trim_start();
        let Some(rest) = line.strip_prefix("//!").or_else(|| line.strip_prefix("//")) else { continue };
        let Some(settings) = rest.trim_start().strip_prefix("xtask:") else { continue };
        for item in settings.split_whitespace() {
            let (key, value) = item.split_once('=').ok_or(format!("{}: `{item}` is not key=value", src.display()))?;
            let bad = || format!("{}: bad setting `{item}`", src.display());
            match key {
                "smp" => s.qemu.smp = value.parse().map_err(|_| bad())?,
                "mem" => s.qemu.mem = value.to_string(),
                "timeout" => s.qemu.timeout = Duration::from_secs(value.parse().map_err(|_| bad())?),
                "firmware" => {
                    s.firmwares = match value {
                        "uefi" => vec![Firmware::Uefi],
                        "bios" => vec![Firmware::Bios],
                        "both" => vec![Firmware::Uefi, Firmware::Bios],
                        _ => return Err(bad()),
                    }
                }
                "qemu-args" => s.qemu.extra.extend(value.split(',').filter(|a| !a.is_empty()).map(String::from)),
                "kernel-args" => s.kernel_args.extend(value.split(',').filter(|a| !a.is_empty()).map(String::from)),
                _ => return Err(bad()),
            }
        }
    }
    Ok(s)
}

fn qemu_kernels(tools: &Tools, sum: &mut Summary) {
    let kb = KernelBuilder::new(&tools.kernel);
    let tool = match kb.build_image_tool() {
        Ok(t) => t,
        Err(e) => return sum.add("QEMU kernels", 0, 1, e),
    };
    // The demo kernel, under both firmwares.
    match kb.build_demo(false) {
        Ok(elf) => {
            for fw in [Firmware::Uefi, Firmware::Bios] {
                // A generous timeout: under TCG on a loaded 2-core machine a BIOS boot with 4 CPUs can take
                // minutes (seen: 3 min), though it takes 35 s on an idle one.
                let opts = QemuOptions {
                    firmware: fw,
                    timeout: std::time::Duration::from_secs(300),
                    ..QemuOptions::default()
                };
                boot_one(tools, &kb, &tool, sum, "kernel-demo", &elf, &opts, &[]);
            }
            // The kernel bench's smoke run (`cargo xtask bench --kernel --quick`, one repetition) on 4 CPUs:
            // every workload on every allocator through the bench's barriers and halting waits, which must
            // not hang, and the peer heaps' leak checks after each run.
            let opts = QemuOptions {
                mem: "512M".into(),
                timeout: std::time::Duration::from_secs(300),
                ..QemuOptions::default()
            };
            let args = ["--bench".to_string(), "--bench-quick".into(), "--bench-reps=1".into()];
            boot_one(tools, &kb, &tool, sum, "kernel-demo-bench", &elf, &opts, &args);
        }
        Err(e) => sum.add("QEMU kernel-demo", 0, 1, e),
    }
    // The minimal example kernel (examples/minimal.rs, the README's kernel section): one CPU, both firmwares.
    match kb.build_example("minimal", false) {
        Ok(elf) => {
            for fw in [Firmware::Uefi, Firmware::Bios] {
                // The demo's generous timeout: a BIOS boot loads the kernel through real-mode disk reads,
                // which under TCG on a loaded machine took over two minutes (seen: no output after 120 s
                // while heap_basics' BIOS boot took 4 min), though 35 s on a quieter one.
                let opts = QemuOptions {
                    firmware: fw,
                    smp: 1,
                    timeout: std::time::Duration::from_secs(300),
                    ..QemuOptions::default()
                };
                boot_one(tools, &kb, &tool, sum, "example-minimal", &elf, &opts, &[]);
            }
        }
        Err(e) => sum.add("QEMU example-minimal", 0, 1, e),
    }
    // Every test kernel.
    let tests: Vec<TestKernel> = match kb.build_tests(false) {
        Ok(t) => t,
        Err(e) => return sum.add("QEMU test kernels (build)", 0, 1, e),
    };
    say!("{} test kernel(s): {}", tests.len(), tests.iter().map(|t| t.name.as_str()).collect::<Vec<_>>().join(", "));
    for t in &tests {
        let settings = match settings_of(&t.src) {
            Ok(s) => s,
            Err(e) => {
                sum.add(format!("QEMU {}", t.name), 0, 1, e);
                continue;
            }
        };
        for fw in &settings.firmwares {
            let opts = QemuOptions { firmware: *fw, ..settings.qemu.clone() };
            boot_one(tools, &kb, &tool, sum, &t.name, &t.elf, &opts, &settings.kernel_args);
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn boot_one(
    tools: &Tools,
    kb: &KernelBuilder,
    tool: &Path,
    sum: &mut Summary,
    name: &str,
    elf: &Path,
    opts: &QemuOptions,
    kernel_args: &[String],
) {
    let what = format!("QEMU {name} ({}, smp {}, {})", opts.firmware.name(), opts.smp, opts.mem);
    say!("booting {what}");
    sum.qemu_ran += 1;
    let start = Instant::now();
    let result =
        kb.make_image(tool, elf, name, opts.firmware, kernel_args).and_then(|image| qemu::run(tools, &image, opts));
    match result {
        Ok((Outcome::Success, out)) if out.contains(crate::profile::BEGIN) && profile_check(&out, elf).is_err() => {
            let e = profile_check(&out, elf).unwrap_err();
            sum.add(what, 0, 1, format!("the kernel's heap profile dump does not decode: {e}"))
        }
        Ok((Outcome::Success, out)) => {
            sum.qemu_passed += 1;
            // Test cases: the custom test framework prints `name... [ok]` per case; a kernel without cases
            // (the demo, a must-panic kernel) counts as one.
            let cases = out.lines().filter(|l| l.trim_end().ends_with("[ok]")).count().max(1);
            sum.qemu_cases += cases as u64;
            sum.add(what, 1, 0, format!("{} case(s), {}", cases, proc::fmt_duration(start.elapsed())));
        }
        Ok((outcome, _)) => sum.add(what, 0, 1, outcome.describe()),
        Err(e) => sum.add(what, 0, 1, e),
    }
}

/// A heap profile dump in a kernel's output (`kernel-demo/src/profile.rs`) must decode into a pprof profile
/// with samples that have stacks.
fn profile_check(out: &str, elf: &Path) -> Result<(), String> {
    let dump = crate::profile::parse_dump(out)?;
    let prof = crate::profile::to_pprof(&dump, elf);
    if prof.sample.is_empty() || prof.sample.iter().all(|s| s.location_id.is_empty()) {
        return Err(format!("{} samples, none with a stack", prof.sample.len()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::parse_test_result;

    #[test]
    fn parses_cargo_test_result_lines() {
        let ok = "test result: ok. 12 passed; 0 failed; 1 ignored; 0 measured; 0 filtered out; finished in 0.01s";
        assert_eq!(parse_test_result(ok), Some((12, 0)));
        let bad = "test result: FAILED. 3 passed; 2 failed; 0 ignored; 0 measured; 0 filtered out";
        assert_eq!(parse_test_result(bad), Some((3, 2)));
        assert_eq!(parse_test_result("running 3 tests"), None);
    }
}
