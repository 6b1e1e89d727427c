//! `cargo xtask fuzz [--time SECS] [TARGET]`: runs goheap's fuzz targets (`fuzz/`, cargo-fuzz layout).
//!
//! 1. checks the toolchain: rustup's `nightly` (cargo-fuzz needs `-Zsanitizer`) with its AddressSanitizer
//!    runtime, and `cargo-fuzz` (installed with `cargo install cargo-fuzz --locked` when missing);
//! 2. `cargo fuzz build -O` (AddressSanitizer, debug assertions on) in `fuzz/`;
//! 3. each target (or the one named) for SECS seconds (default 60), libFuzzer run directly on a scratch copy
//!    of the committed corpus `fuzz/corpus/TARGET` (under `target/fuzz/TARGET/`, so runs never dirty the
//!    tree), its output in `target/fuzz/TARGET/fuzz.log`;
//! 4. a summary line per target: runs, seconds, corpus growth; on a crash, the panic message and the path of
//!    the crash input (with the command that reproduces it), and the exit status is 1.
//!
//! When the toolchain cannot run (no rustup nightly, no sanitizer runtime, cargo-fuzz cannot be installed)
//! it says why and exits 2; `cargo xtask test` runs a short fuzz step through [`test_step`], which reports
//! such a machine as skipped instead (a build failure of the fuzz crate is a failure there).

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use crate::{proc, say, EXIT_ERROR};

const USAGE: &str = "\
usage: cargo xtask fuzz [--time SECS] [TARGET]

Builds the fuzz targets in fuzz/ with rustup's nightly (cargo-fuzz, AddressSanitizer) and runs each one
(or TARGET) for SECS seconds (default 60) on a scratch copy of its committed corpus fuzz/corpus/TARGET.
Exits 1 if a target crashed (the crash input's path is printed), 2 if the toolchain cannot run.
Targets: the files of fuzz/fuzz_targets/.
";

/// Seconds per target of the short run in `cargo xtask test`.
pub const TEST_SECS: u64 = 20;

/// Why nothing was fuzzed.
enum NotRun {
    /// The machine cannot fuzz (toolchain): a skip in `cargo xtask test`.
    Unavailable(String),
    /// The fuzz crate or its inputs are broken (build failure, unknown target): a failure.
    Failed(String),
}

impl std::fmt::Display for NotRun {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NotRun::Unavailable(e) | NotRun::Failed(e) => f.write_str(e),
        }
    }
}

/// How one target's run ended.
enum Verdict {
    /// Ran its time without a crash.
    Clean,
    /// Crashed: the panic or sanitizer message, and the crash input.
    Crash { message: String, artifact: Option<PathBuf> },
    /// Could not run (the binary failed to start, or exited in an unexpected way).
    Error(String),
}

struct TargetRun {
    name: String,
    verdict: Verdict,
    runs: Option<u64>,
    elapsed: Duration,
    corpus_before: usize,
    corpus_after: usize,
    log: PathBuf,
}

impl TargetRun {
    fn summary(&self) -> String {
        let runs = self.runs.map_or("? runs".to_string(), |r| format!("{r} runs"));
        let base = format!(
            "{runs} in {}, corpus {} -> {} inputs, log {}",
            proc::fmt_duration(self.elapsed),
            self.corpus_before,
            self.corpus_after,
            self.log.display()
        );
        match &self.verdict {
            Verdict::Clean => format!("no crash; {base}"),
            Verdict::Crash { artifact: Some(a), .. } => format!("CRASH, input {}; {base}", a.display()),
            Verdict::Crash { artifact: None, .. } => format!("CRASH (no input saved); {base}"),
            Verdict::Error(e) => format!("error: {e}; {base}"),
        }
    }
}

pub fn main(args: &[String]) -> ExitCode {
    let mut secs = 60u64;
    let mut only = None;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--time" => match it.next().and_then(|v| v.parse().ok()) {
                Some(v) => secs = v,
                None => {
                    eprint!("--time needs a number of seconds\n\n{USAGE}");
                    return ExitCode::from(EXIT_ERROR);
                }
            },
            "-h" | "--help" => {
                print!("{USAGE}");
                return ExitCode::SUCCESS;
            }
            t if !t.starts_with('-') && only.is_none() => only = Some(t.to_string()),
            other => {
                eprint!("unknown argument {other:?}\n\n{USAGE}");
                return ExitCode::from(EXIT_ERROR);
            }
        }
    }
    let root = crate::root();
    let runs = match run(&root, secs, only.as_deref()) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("cargo xtask fuzz: {e}");
            return ExitCode::from(EXIT_ERROR);
        }
    };
    println!();
    println!("==================== cargo xtask fuzz: summary ====================");
    for r in &runs {
        print_outcome(r);
    }
    let crashed = runs.iter().filter(|r| !matches!(r.verdict, Verdict::Clean)).count();
    println!("{} passed, {} failed", runs.len() - crashed, crashed);
    if crashed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn print_outcome(r: &TargetRun) {
    let verdict = if matches!(r.verdict, Verdict::Clean) { "ok    " } else { "FAILED" };
    println!("{verdict} fuzz {}: {}", r.name, r.summary());
    if let Verdict::Crash { message, artifact } = &r.verdict {
        for line in message.lines() {
            println!("         {line}");
        }
        if let Some(a) = artifact {
            println!("         reproduce: cd fuzz && cargo +nightly fuzz run -O {} {}", r.name, a.display());
            println!(
                "         read it:   GOHEAP_FUZZ_TRACE=1 GOHEAP_FUZZ_TARGET={} GOHEAP_FUZZ_REPLAY={} \
                 cargo test -p goheap --all-features --test fuzz_regressions replay_from_env -- --nocapture",
                r.name,
                a.display()
            );
        }
    }
}

/// The short fuzz step of `cargo xtask test`: one summary line per target as (what, passed, failed, note);
/// a machine whose toolchain cannot fuzz gives one line counted neither way, saying why it was skipped.
pub fn test_step(root: &Path) -> Vec<(String, u64, u64, String)> {
    match run(root, TEST_SECS, None) {
        Ok(runs) => runs
            .iter()
            .map(|r| {
                print_outcome(r);
                let ok = matches!(r.verdict, Verdict::Clean);
                (format!("fuzz {} ({TEST_SECS} s)", r.name), ok as u64, !ok as u64, r.summary())
            })
            .collect(),
        Err(NotRun::Unavailable(e)) => {
            say!("fuzz: skipped: {e}");
            vec![("fuzz (skipped)".to_string(), 0, 0, format!("skipped: {e}"))]
        }
        Err(NotRun::Failed(e)) => vec![("fuzz".to_string(), 0, 1, e)],
    }
}

/// A command run with rustup's nightly (cargo-fuzz runs the `cargo` it finds, which follows
/// `RUSTUP_TOOLCHAIN`), without the variables of the cargo that runs xtask.
fn nightly(program: &str) -> Command {
    let mut cmd = Command::new(program);
    cmd.env("RUSTUP_TOOLCHAIN", "nightly")
        .env_remove("RUSTC")
        .env_remove("RUSTDOC")
        .env_remove("RUSTC_WRAPPER")
        .env_remove("RUSTC_BOOTSTRAP")
        .env_remove("CARGO_TARGET_DIR")
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env_remove("CARGO_BUILD_TARGET");
    cmd
}

fn output_of(cmd: &mut Command) -> Result<String, String> {
    let out = cmd.stderr(Stdio::piped()).output().map_err(|e| format!("cannot run {}: {e}", proc::show(cmd)))?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        return Err(format!("{} failed ({}): {}", proc::show(cmd), out.status, err.trim()));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Checks nightly, its sanitizer runtime and cargo-fuzz (installing it if missing); returns the host triple.
fn check_toolchain() -> Result<String, String> {
    let vv = output_of(nightly("rustc").arg("-vV"))
        .map_err(|e| format!("rustup's nightly toolchain is not usable (`rustup toolchain install nightly`): {e}"))?;
    if !vv.contains("-nightly") {
        let first = vv.lines().next().unwrap_or_default();
        return Err(format!("`RUSTUP_TOOLCHAIN=nightly rustc` is not a nightly compiler (no rustup?): {first}"));
    }
    let host = vv
        .lines()
        .find_map(|l| l.strip_prefix("host: "))
        .ok_or_else(|| "rustc -vV printed no host line".to_string())?
        .trim()
        .to_string();
    let sysroot = output_of(nightly("rustc").arg("--print").arg("sysroot"))?;
    let libdir = PathBuf::from(sysroot.trim()).join("lib/rustlib").join(&host).join("lib");
    let has_asan = std::fs::read_dir(&libdir)
        .map(|d| d.filter_map(Result::ok).any(|e| e.file_name().to_string_lossy().contains("rt.asan")))
        .unwrap_or(false);
    if !has_asan {
        return Err(format!("nightly has no AddressSanitizer runtime in {}", libdir.display()));
    }
    if output_of(nightly("cargo").args(["fuzz", "--version"]).stdout(Stdio::piped())).is_err() {
        say!("cargo-fuzz is missing: cargo install cargo-fuzz --locked");
        let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
        cmd.args(["install", "cargo-fuzz", "--locked"]);
        let status = proc::run_streaming(&mut cmd, "cargo install cargo-fuzz").map_err(|e| e.to_string())?;
        if !status.success() {
            return Err(format!("cargo-fuzz is missing and `cargo install cargo-fuzz --locked` failed ({status})"));
        }
        output_of(nightly("cargo").args(["fuzz", "--version"]).stdout(Stdio::piped()))
            .map_err(|e| format!("cargo-fuzz was installed but does not run: {e}"))?;
    }
    Ok(host)
}

/// The fuzz targets: the files of `fuzz/fuzz_targets/`.
fn targets(fuzz: &Path) -> Result<Vec<String>, String> {
    let dir = fuzz.join("fuzz_targets");
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .map_err(|e| format!("reading {}: {e}", dir.display()))?
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_string_lossy().strip_suffix(".rs").map(String::from))
        .collect();
    names.sort();
    Ok(names)
}

/// Builds and runs the targets (`only`, or all); `Err` when nothing could be run (toolchain, build).
fn run(root: &Path, secs: u64, only: Option<&str>) -> Result<Vec<TargetRun>, NotRun> {
    let fuzz = root.join("fuzz");
    let mut names = targets(&fuzz).map_err(NotRun::Failed)?;
    if let Some(t) = only {
        if !names.iter().any(|n| n == t) {
            return Err(NotRun::Failed(format!("no fuzz target {t:?} (targets: {})", names.join(", "))));
        }
        names = vec![t.to_string()];
    }
    let host = check_toolchain().map_err(NotRun::Unavailable)?;
    let mut build = nightly("cargo");
    build.current_dir(&fuzz).args(["fuzz", "build", "-O"]);
    say!("$ (cd fuzz && RUSTUP_TOOLCHAIN=nightly {})", proc::show(&build));
    let status = proc::run_streaming(&mut build, "cargo fuzz build").map_err(|e| NotRun::Failed(e.to_string()))?;
    if !status.success() {
        return Err(NotRun::Failed(format!("cargo fuzz build failed ({status}): see above")));
    }
    let bindir = fuzz.join("target").join(&host).join("release");
    let mut out = Vec::new();
    for name in names {
        out.push(run_target(root, &bindir.join(&name), &name, secs).map_err(NotRun::Failed)?);
    }
    Ok(out)
}

fn count_files(dir: &Path) -> usize {
    std::fs::read_dir(dir).map(|d| d.filter_map(Result::ok).filter(|e| e.path().is_file()).count()).unwrap_or(0)
}

fn run_target(root: &Path, bin: &Path, name: &str, secs: u64) -> Result<TargetRun, String> {
    let scratch = root.join("target/fuzz").join(name);
    let corpus = scratch.join("corpus");
    let artifacts = scratch.join("artifacts");
    let _ = std::fs::remove_dir_all(&scratch);
    std::fs::create_dir_all(&corpus).map_err(|e| format!("creating {}: {e}", corpus.display()))?;
    std::fs::create_dir_all(&artifacts).map_err(|e| format!("creating {}: {e}", artifacts.display()))?;
    let seeds = root.join("fuzz/corpus").join(name);
    if let Ok(dir) = std::fs::read_dir(&seeds) {
        for e in dir.filter_map(Result::ok).filter(|e| e.path().is_file()) {
            std::fs::copy(e.path(), corpus.join(e.file_name())).map_err(|e| format!("copying the corpus: {e}"))?;
        }
    }
    let corpus_before = count_files(&corpus);
    let log = scratch.join("fuzz.log");
    let logfile = std::fs::File::create(&log).map_err(|e| format!("creating {}: {e}", log.display()))?;
    let mut cmd = Command::new(bin);
    cmd.arg(format!("-max_total_time={secs}"))
        .arg("-timeout=60")
        .arg("-print_final_stats=1")
        .arg(format!("-artifact_prefix={}/", artifacts.display()))
        .arg(&corpus)
        .stdout(logfile.try_clone().map_err(|e| e.to_string())?)
        .stderr(logfile);
    say!("fuzz {name}: {secs} s, $ {} (output in {})", proc::show(&cmd), log.display());
    let start = Instant::now();
    let status = {
        let _beat = proc::Heartbeat::start(format!("fuzz {name}"), Duration::from_secs(60));
        proc::die_with_parent(&mut cmd).status().map_err(|e| format!("cannot run {}: {e}", bin.display()))?
    };
    let elapsed = start.elapsed();
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    let runs = text.lines().rev().find_map(|l| {
        let rest = l.strip_prefix("stat::number_of_executed_units:").or_else(|| l.strip_prefix("Done "))?;
        rest.split_whitespace().next()?.parse().ok()
    });
    let artifact = text
        .lines()
        .find_map(|l| l.split_once("Test unit written to ").map(|(_, p)| PathBuf::from(p.trim())))
        .filter(|p| p.exists());
    let verdict = if status.success() {
        Verdict::Clean
    } else if artifact.is_some() || text.contains("panicked at") || text.contains("ERROR: AddressSanitizer") {
        Verdict::Crash { message: crash_message(&text), artifact }
    } else {
        let tail: Vec<&str> = text.lines().rev().take(5).collect();
        Verdict::Error(format!("{} exited with {status}: {}", bin.display(), tail.join(" | ")))
    };
    Ok(TargetRun {
        name: name.to_string(),
        verdict,
        runs,
        elapsed,
        corpus_before,
        corpus_after: count_files(&corpus),
        log,
    })
}

/// The lines that say what went wrong: a Rust panic's message, or a sanitizer's report head.
fn crash_message(text: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    if let Some(i) = lines.iter().position(|l| l.contains("panicked at")) {
        return lines[i..]
            .iter()
            .take_while(|l| !l.starts_with("stack backtrace"))
            .take(6)
            .copied()
            .collect::<Vec<_>>()
            .join("\n");
    }
    if let Some(i) = lines.iter().position(|l| l.contains("ERROR: AddressSanitizer") || l.contains("ERROR: libFuzzer"))
    {
        return lines[i..].iter().take(4).copied().collect::<Vec<_>>().join("\n");
    }
    "no message found (see the log)".to_string()
}

#[cfg(test)]
mod tests {
    use super::crash_message;

    #[test]
    fn crash_message_takes_the_panic_and_stops_at_the_backtrace() {
        let log = "INFO: x\nthread '<unnamed>' panicked at src/harness.rs:1:2:\ndouble free of 0x10 was not reported\n\
                   stack backtrace:\n  0: foo\n";
        assert_eq!(
            crash_message(log),
            "thread '<unnamed>' panicked at src/harness.rs:1:2:\ndouble free of 0x10 was not reported"
        );
        let asan = "INFO\n==1==ERROR: AddressSanitizer: SEGV on unknown address 0x0\n#0 a\n#1 b\n#2 c\n";
        assert!(crash_message(asan).starts_with("==1==ERROR: AddressSanitizer: SEGV"));
    }
}
