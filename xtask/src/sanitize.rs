//! `cargo xtask sanitize [--asan] [--tsan] [--short]`: goheap's host tests under ThreadSanitizer and
//! AddressSanitizer (issue 13). With neither flag, both run.
//!
//! # ThreadSanitizer: the multi-threaded host tests, with an instrumented standard library
//! TSan only knows what it sees: a std built without `-Zsanitizer=thread` hides the synchronisation inside
//! `Mutex`, `Once`, `thread::spawn`/`join`, channels and `Arc`, and TSan then reports races that are none.
//! So std is rebuilt instrumented (`-Zbuild-std`), which needs the library sources of the compiler that
//! builds it. rustup's `nightly` here has the TSan runtime but no rust-src; Debian's rustc (the kernel
//! toolchain, `setup.rs`) has the sources but no sanitizer runtimes. The build takes the best of both:
//!
//! - the compiler and std sources: the kernel toolchain (`RUSTC_BOOTSTRAP=1`, `-Zbuild-std`), or rustup's
//!   `nightly` itself when it has rust-src;
//! - the runtime: nightly's `librustc-nightly_rt.tsan.a`, linked whole (`-Zexternal-clangrt` tells rustc
//!   not to look for its own). Both compilers must use the same LLVM major version (checked; the runtime's
//!   entry points are LLVM's), and the link goes through `ld.lld` (GNU ld rejects the runtime's versioned
//!   `tmpnam@@GLIBC_2.2.5` references).
//!
//! No suppressions are needed or used. The tests run: goheap's unit tests (`--lib`) and the integration
//! tests that start threads ([`TSAN_TESTS`]). Build directory: `target/tsan` (first build ~10 minutes:
//! std itself).
//!
//! # AddressSanitizer: every host test of goheap
//! rustup's `nightly` with its own (uninstrumented) std: ASan reports no false errors from code it did not
//! instrument, it only misses them there, so std is not rebuilt (`-Cunsafe-allow-abi-mismatch=sanitizer`
//! lets instrumented crates link the prebuilt std). Leak detection is off: tests leak their allocators on
//! purpose (`Box::leak` for `'static` heaps); ASan's SEGV handler is off (`handle_segv=0`), so the
//! guard-mode test still sees its child die of SIGSEGV. goheap's own memory comes from `mmap` (`MmapSource`), which
//! ASan does not track as heap memory; it checks the tests' own heap (the system allocator's), stacks and
//! globals. Build directory: `target/asan`.
//!
//! # Canaries
//! Before the tests, each sanitizer builds and runs a small program with a deliberate bug (`xtask/canary`:
//! a data race for TSan, a use after free for ASan) with the same flags, and requires the report: a
//! sanitizer that silently checks nothing fails the run.
//!
//! # `--short` (the step in `cargo xtask test`)
//! TSan: the unit tests and the threaded tests but `malloc_threads` (over 5 minutes under TSan here) and
//! `page_threads`, replaced by `malloc_threads`' `more_threads_than_slots`; ASan: all but the proptest
//! models (`tests/*_model.rs`). Where the toolchain does not allow a sanitizer (no nightly, no runtime, LLVM versions
//! apart, no `ld.lld`, no kernel toolchain with library sources for TSan), it is skipped with the reason.
//!
//! Each run counts the `test result:` lines and the sanitizer reports (`WARNING: ThreadSanitizer:`,
//! `ERROR: AddressSanitizer:`); a report fails the run (TSan/ASan also make the test binary exit non-zero).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::Instant;

use crate::setup::{self, KernelToolchain};
use crate::{proc, say, EXIT_ERROR};

const HOST: &str = "x86_64-unknown-linux-gnu";
/// Integration tests that start threads (TSan's share).
const TSAN_TESTS: &[&str] = &[
    "cpu_provider",
    "hosted_global",
    "irq_sections",
    "malloc_threads",
    "page_scavenger",
    "page_threads",
    "remote_free_pipeline",
    "stock_bounds",
];
/// In `--short`: the threaded tests that take long under TSan are left out (one test of `malloc_threads`
/// runs instead, see [`tsan_cargo_args`]).
const TSAN_SHORT_SKIP: &[&str] = &["malloc_threads", "page_threads"];

const USAGE: &str = "\
usage: cargo xtask sanitize [--tsan] [--asan] [--short]

  --tsan    ThreadSanitizer over goheap's multi-threaded host tests (std rebuilt instrumented)
  --asan    AddressSanitizer over all of goheap's host tests
  --short   the subset run by `cargo xtask test`
With neither --tsan nor --asan, both run. Exit status: 0 every run passed (or was skipped: the reason is
printed), 1 a test failed or a sanitizer reported, 2 usage or set-up error.
";

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Kind {
    Thread,
    Address,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Thread => "ThreadSanitizer",
            Kind::Address => "AddressSanitizer",
        }
    }
    fn flag(self) -> &'static str {
        match self {
            Kind::Thread => "thread",
            Kind::Address => "address",
        }
    }
    fn runtime(self) -> &'static str {
        match self {
            Kind::Thread => "librustc-nightly_rt.tsan.a",
            Kind::Address => "librustc-nightly_rt.asan.a",
        }
    }
    fn report_marker(self) -> &'static str {
        match self {
            Kind::Thread => "WARNING: ThreadSanitizer:",
            Kind::Address => "ERROR: AddressSanitizer:",
        }
    }
    fn target_dir(self) -> &'static str {
        match self {
            Kind::Thread => "target/tsan",
            Kind::Address => "target/asan",
        }
    }
}

/// What one sanitizer run did.
pub enum Outcome {
    /// The toolchain does not allow this sanitizer here; the reason.
    Skipped(String),
    /// Tests ran: passed, failed (including a build failure or a report counted as one), reports, note.
    Ran { passed: u64, failed: u64, reports: u64, note: String },
}

pub fn main(args: &[String]) -> ExitCode {
    let (mut tsan, mut asan, mut short) = (false, false, false);
    for a in args {
        match a.as_str() {
            "--tsan" => tsan = true,
            "--asan" => asan = true,
            "--short" => short = true,
            "-h" | "--help" => {
                print!("{USAGE}");
                return ExitCode::SUCCESS;
            }
            other => {
                eprintln!("cargo xtask sanitize: unknown option {other:?}\n\n{USAGE}");
                return ExitCode::from(EXIT_ERROR);
            }
        }
    }
    if !tsan && !asan {
        (tsan, asan) = (true, true);
    }
    let kernel = if tsan {
        match setup::ensure() {
            Ok(t) => Some(t.kernel),
            Err(e) => {
                say!("no kernel toolchain ({e}); TSan needs one unless rustup's nightly has rust-src");
                None
            }
        }
    } else {
        None
    };
    let root = crate::root();
    let mut failed = false;
    let mut lines = Vec::new();
    for (on, kind) in [(tsan, Kind::Thread), (asan, Kind::Address)] {
        if !on {
            continue;
        }
        let start = Instant::now();
        let outcome = run(&root, kind, short, kernel.as_ref());
        let line = match &outcome {
            Outcome::Skipped(why) => format!("{}: SKIPPED: {why}", kind.name()),
            Outcome::Ran { passed, failed: f, reports, note } => {
                failed |= *f > 0;
                format!(
                    "{}: {passed} passed, {f} failed, {reports} sanitizer report(s) ({note}; {})",
                    kind.name(),
                    proc::fmt_duration(start.elapsed())
                )
            }
        };
        lines.push(line);
    }
    println!();
    for l in &lines {
        println!("sanitize: {l}");
    }
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

/// rustup's nightly sysroot, if rustup and a nightly are there.
fn nightly_sysroot() -> Option<PathBuf> {
    let out = Command::new("rustup").args(["run", "nightly", "rustc", "--print", "sysroot"]).output().ok()?;
    if !out.status.success() {
        return None;
    }
    Some(PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
}

/// The LLVM major version `rustc -vV` reports.
fn llvm_major(rustc: &mut Command) -> Option<u32> {
    let out = rustc.arg("-vV").output().ok()?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let v = text.lines().find_map(|l| l.strip_prefix("LLVM version: "))?;
    v.split('.').next()?.trim().parse().ok()
}

/// A directory holding `ld.lld` (LLVM's packages, then PATH).
fn lld_dir() -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir("/usr/lib")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("llvm-")))
        .map(|p| p.join("bin"))
        .collect();
    dirs.sort();
    dirs.reverse();
    dirs.into_iter()
        .find(|d| d.join("ld.lld").is_file())
        .or_else(|| setup::which("ld.lld")?.parent().map(Path::to_path_buf))
}

/// A cargo command with a sanitizer's environment, and whether it rebuilds std.
struct Prepared {
    cmd: Command,
    build_std: bool,
}

/// How the tests of one sanitizer are built: the cargo command with its environment, or why not.
fn prepare(kind: Kind, kernel: Option<&KernelToolchain>) -> Result<Prepared, String> {
    let sysroot = nightly_sysroot().ok_or("rustup's `nightly` toolchain is not installed")?;
    let rt_dir = sysroot.join("lib/rustlib").join(HOST).join("lib");
    let runtime = rt_dir.join(kind.runtime());
    if !runtime.is_file() {
        return Err(format!("rustup's nightly has no {} runtime ({})", kind.name(), runtime.display()));
    }
    let mut nightly_rustc = Command::new("rustup");
    nightly_rustc.args(["run", "nightly", "rustc"]);
    let mut flags = vec![format!("-Zsanitizer={}", kind.flag())];
    let mut cmd;
    let mut build_std = true;
    match kind {
        Kind::Address => {
            cmd = Command::new("rustup");
            cmd.args(["run", "nightly", "cargo"]);
            flags.push("-Cunsafe-allow-abi-mismatch=sanitizer".into());
            build_std = false;
        }
        Kind::Thread if sysroot.join("lib/rustlib/src/rust/library").is_dir() => {
            cmd = Command::new("rustup");
            cmd.args(["run", "nightly", "cargo"]);
        }
        Kind::Thread => {
            let tc = kernel.ok_or(
                "TSan needs std rebuilt instrumented: rustup's nightly has no rust-src and no kernel toolchain \
                 (a rustc with library sources) was found",
            )?;
            let (a, b) = (llvm_major(&mut nightly_rustc), llvm_major(&mut Command::new(&tc.rustc)));
            if a.is_none() || a != b {
                return Err(format!(
                    "the kernel toolchain ({}) and rustup's nightly use different LLVM versions ({b:?} vs {a:?}): \
                     nightly's TSan runtime would not match",
                    tc.version
                ));
            }
            let lld = lld_dir().ok_or("no ld.lld found (package lld-22): GNU ld cannot link the TSan runtime")?;
            cmd = tc.cargo();
            flags.push("-Zexternal-clangrt".into());
            for arg in [
                format!("-B{}", lld.display()),
                "-fuse-ld=lld".into(),
                "-Wl,--whole-archive".into(),
                runtime.display().to_string(),
                "-Wl,--no-whole-archive".into(),
                "-Wl,--no-as-needed".into(),
                "-lm".into(),
                "-lpthread".into(),
                "-ldl".into(),
                "-lrt".into(),
                "-lc".into(),
            ] {
                flags.push(format!("-Clink-arg={arg}"));
            }
        }
    }
    for var in ["RUSTFLAGS", "CARGO_ENCODED_RUSTFLAGS", "RUSTDOCFLAGS", "CARGO_TARGET_DIR", "CARGO_BUILD_TARGET"] {
        cmd.env_remove(var);
    }
    if kind == Kind::Address {
        for var in ["RUSTC", "RUSTUP_TOOLCHAIN", "CARGO", "RUSTC_BOOTSTRAP"] {
            cmd.env_remove(var);
        }
    }
    // One string, space-separated: no flag here holds a space (paths under rustup's and LLVM's homes).
    cmd.env("RUSTFLAGS", flags.join(" "));
    cmd.env("TSAN_OPTIONS", "halt_on_error=0 exitcode=66 second_deadlock_stack=1");
    // `handle_segv=0`: a fault stays a SIGSEGV (bad_free's guard-mode test expects its child to die of one;
    // ASan's own handler would turn it into a report and exit status 66).
    cmd.env("ASAN_OPTIONS", "detect_leaks=0 halt_on_error=1 exitcode=66 handle_segv=0");
    Ok(Prepared { cmd, build_std })
}

/// `cargo <sub> ...` of a prepared command, for the host target in the sanitizer's own target directory.
fn cargo(root: &Path, kind: Kind, kernel: Option<&KernelToolchain>, sub: &str) -> Result<Command, String> {
    let Prepared { mut cmd, build_std } = prepare(kind, kernel)?;
    cmd.arg(sub).current_dir(root).arg("--target").arg(HOST).arg("--target-dir").arg(root.join(kind.target_dir()));
    if build_std {
        cmd.arg("-Zbuild-std");
    }
    Ok(cmd)
}

fn tsan_cargo_args(short: bool) -> Vec<String> {
    let mut a: Vec<String> = vec!["--lib".into()];
    for t in TSAN_TESTS {
        if !(short && TSAN_SHORT_SKIP.contains(t)) {
            a.push("--test".into());
            a.push((*t).into());
        }
    }
    a
}

/// In `--short`, ASan runs every integration test (`tests/*.rs`) but the proptest models (`*_model.rs`),
/// which take many minutes under ASan on a loaded machine.
fn asan_short_tests(root: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(root.join("tests"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str().and_then(|n| n.strip_suffix(".rs")).map(String::from))
        .filter(|n| !n.ends_with("_model"))
        .collect();
    names.sort();
    names
}

/// Builds and runs the canary of `kind`; Ok when the sanitizer reported its bug.
fn canary(root: &Path, kind: Kind, kernel: Option<&KernelToolchain>) -> Result<String, String> {
    let mut cmd = cargo(root, kind, kernel, "run")?;
    cmd.arg("--manifest-path").arg(root.join("xtask/canary/Cargo.toml")).arg("--").arg(kind.flag());
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    say!("canary: {}", proc::show(&cmd));
    let out = proc::die_with_parent(&mut cmd).output().map_err(|e| format!("cargo: {e}"))?;
    let err = String::from_utf8_lossy(&out.stderr);
    if err.contains(kind.report_marker()) && !out.status.success() {
        Ok(format!("the canary's deliberate bug was reported ({})", kind.report_marker()))
    } else {
        eprintln!("{err}");
        Err(format!(
            "the canary's deliberate bug was NOT reported by {} (status {}): the sanitizer checks nothing",
            kind.name(),
            out.status
        ))
    }
}

/// Runs one sanitizer over goheap's tests (see the module docs).
pub fn run(root: &Path, kind: Kind, short: bool, kernel: Option<&KernelToolchain>) -> Outcome {
    let mut cmd = match cargo(root, kind, kernel, "test") {
        Ok(c) => c,
        Err(why) => return Outcome::Skipped(why),
    };
    let canary_note = match canary(root, kind, kernel) {
        Ok(n) => n,
        Err(e) => return Outcome::Ran { passed: 0, failed: 1, reports: 0, note: e },
    };
    say!("{}: {canary_note}", kind.name());
    cmd.args(["-p", "goheap", "--all-features", "--no-fail-fast"]);
    match kind {
        Kind::Thread => {
            cmd.args(tsan_cargo_args(short));
        }
        Kind::Address if short => {
            cmd.arg("--lib");
            for t in asan_short_tests(root) {
                cmd.arg("--test").arg(t);
            }
        }
        Kind::Address => {
            cmd.args(["--lib", "--tests"]);
        }
    }
    if kind == Kind::Thread && short {
        // One test of malloc_threads: more threads than cache slots (the shared cache under its lock).
        let mut one = match cargo(root, kind, kernel, "test") {
            Ok(c) => c,
            Err(why) => return Outcome::Skipped(why),
        };
        one.args(["-p", "goheap", "--all-features"]);
        one.args(["--test", "malloc_threads", "--", "--exact", "more_threads_than_slots"]);
        let a = run_counting(&mut one, kind);
        let b = run_counting(&mut cmd, kind);
        return match (a, b) {
            (
                Outcome::Ran { passed: p1, failed: f1, reports: r1, .. },
                Outcome::Ran { passed: p2, failed: f2, reports: r2, note },
            ) => Outcome::Ran {
                passed: p1 + p2,
                failed: f1 + f2,
                reports: r1 + r2,
                note: format!("{note}; {canary_note}"),
            },
            (Outcome::Skipped(w), _) | (_, Outcome::Skipped(w)) => Outcome::Skipped(w),
        };
    }
    match run_counting(&mut cmd, kind) {
        Outcome::Ran { passed, failed, reports, note } => {
            Outcome::Ran { passed, failed, reports, note: format!("{note}; {canary_note}") }
        }
        s => s,
    }
}

/// Runs a `cargo test` command, echoing its output while counting `test result:` lines and reports.
fn run_counting(cmd: &mut Command, kind: Kind) -> Outcome {
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    say!("$ RUSTFLAGS='{}' {}", env_of(cmd, "RUSTFLAGS"), proc::show(cmd));
    let _beat = proc::Heartbeat::start(format!("{} tests", kind.name()), std::time::Duration::from_secs(60));
    let mut child = match proc::die_with_parent(cmd).spawn() {
        Ok(c) => c,
        Err(e) => return Outcome::Ran { passed: 0, failed: 1, reports: 0, note: format!("cannot run cargo: {e}") },
    };
    let marker = kind.report_marker();
    let err = child.stderr.take().expect("piped");
    let err_thread = std::thread::spawn(move || {
        let mut reports = 0u64;
        for line in BufReader::new(err).lines().map_while(Result::ok) {
            eprintln!("{line}");
            if line.contains(marker) {
                reports += 1;
            }
        }
        reports
    });
    let (mut passed, mut failed, mut suites) = (0, 0, 0);
    if let Some(out) = child.stdout.take() {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            println!("{line}");
            if let Some((p, f)) = crate::test::parse_test_result(&line) {
                passed += p;
                failed += f;
                suites += 1;
            }
        }
    }
    let status = child.wait();
    let reports = err_thread.join().unwrap_or(0);
    let ok = status.as_ref().is_ok_and(|s| s.success());
    let mut note = format!("{suites} test binaries");
    if reports > 0 {
        failed += 1;
        note = format!("{note}; {reports} {} report(s): see above", kind.name());
    } else if !ok && failed == 0 {
        failed = 1;
        note = format!("cargo test failed without a failing test to count ({status:?}): see above");
    }
    Outcome::Ran { passed, failed, reports, note }
}

fn env_of(cmd: &Command, key: &str) -> String {
    cmd.get_envs()
        .find(|(k, _)| *k == key)
        .and_then(|(_, v)| v)
        .map(|v| v.to_string_lossy().into_owned())
        .unwrap_or_default()
}
