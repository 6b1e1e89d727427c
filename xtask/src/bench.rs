//! `cargo xtask bench`: goheap against the allocators users would pick instead (issue 7).
//!
//! 1. Builds `bench/` (crate goheap-bench) once per allocator, in release, with `--cfg goheap_bench` and one
//!    `alloc-*` feature, into `target/bench/` (its own target dir: no lock fights with other builds), and
//!    copies each binary to `target/bench/bin/goheap-bench-<alloc>`. A peer that fails to build is left out
//!    and BENCHMARKS.md says why.
//! 2. Runs every workload group for every allocator interleaved (rep 1: A B C, rep 2: B C A, ...), each run
//!    a separate process printing JSON lines; a run over its time limit is killed and that allocator skips
//!    the group in later repetitions.
//! 3. Counts instructions per 64 B and per 8 B (tiny) alloc+free pair with callgrind (two run lengths, the
//!    difference divided by the extra pairs, so start-up does not count).
//! 4. Writes the raw lines to `bench/results/latest.jsonl`, the ratio chart to `bench/results/ratios.svg`
//!    and regenerates `BENCHMARKS.md` (medians and min–max over repetitions, goheap/peer ratios). A partial
//!    run (`--quick`, `--only`, `--alloc`) writes the same three files to `target/bench/report/` instead.
//!
//! `--kernel` runs the in-QEMU comparison instead (issue 7's second half, `bench_kernel.rs`): it writes
//! `bench/results/kernel.jsonl`, and every report here includes its "Kernel (QEMU)" section from that file.

use crate::{root, say, EXIT_ERROR};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

const USAGE: &str = "\
usage: cargo xtask bench [--quick] [--reps N] [--only GROUP,...] [--alloc NAME,...] [--scale F] [--cap SECS]
                         [--no-callgrind] [--report-only] [--kernel] [--kproxy] [--scavenger]

  --quick         smoke run: 2 repetitions, scale 0.05, short caps, short callgrind runs
                  (--quick, --only and --alloc write their report to target/bench/report/, not BENCHMARKS.md)
  --reps N        repetitions of every (group, allocator) run, interleaved (default 5)
  --only G,...    only these workload groups (see the list below)
  --alloc A,...   only these allocators (goheap is always included: ratios need it)
  --scale F       multiply every workload's operation count by F (default 1)
  --cap SECS      time cap of one group's run in one process (default 2.5)
  --no-callgrind  skip the instruction counts
  --budget SECS   no repetition starts that would end the command past SECS (default 840: the whole run
                  stays under 15 minutes on a loaded machine; at least one repetition always runs)
  --report-only   regenerate BENCHMARKS.md from bench/results/latest.jsonl without running anything
  --kernel        the in-QEMU subset instead: goheap against linked_list_allocator and talc heaps in the
                  demo kernel at 1 and 4 CPUs (see `cargo xtask bench --kernel --help`)
  --kproxy        the kernel workloads natively on the host instead, goheap with a kernel-shaped provider
                  against the kernel's peer heaps (see `cargo xtask bench --kproxy --help`)
  --scavenger     goheap's scavenger alone: the cost of one background step with a 64 MiB, 1 GiB and
                  16 GiB heap (examples/scav_step.rs; prints a table, writes no report)

groups: pair batch wset1 wset2 rust larson prodcons64 prodcons-mixed rptest large latency frag
allocators: goheap system mimalloc jemalloc snmalloc rpmalloc talc llalloc buddy
";

/// Every allocator: its name in the results and what it is, for the report.
const ALLOCATORS: &[(&str, &str)] = &[
    ("goheap", "goheap::Hosted (this crate)"),
    ("system", "glibc malloc (std::alloc::System)"),
    ("mimalloc", "mimalloc (crate mimalloc)"),
    ("jemalloc", "jemalloc (crate tikv-jemallocator)"),
    ("snmalloc", "snmalloc (crate snmalloc-rs, build_cc)"),
    ("rpmalloc", "rpmalloc (crate rpmalloc)"),
    ("talc", "talc (Talck<spinning_top::RawSpinlock>, 16 GiB mmapped arena)"),
    ("llalloc", "linked_list_allocator::LockedHeap (16 GiB mmapped arena)"),
    ("buddy", "buddy_system_allocator::LockedHeap<36> (16 GiB mmapped arena)"),
];

/// Crates whose versions the report quotes (from Cargo.lock).
const PEER_CRATES: &[&str] = &[
    "mimalloc",
    "libmimalloc-sys",
    "tikv-jemallocator",
    "snmalloc-rs",
    "rpmalloc",
    "talc",
    "linked_list_allocator",
    "buddy_system_allocator",
];

include!("../../bench/src/groups.rs");

/// What each workload does, for the report.
const WORKLOADS: &[(&str, &str)] = &[
    ("pair-16", "alloc+free of one 16 B block, repeated (fast path)"),
    ("pair-64", "alloc+free of one 64 B block, repeated (fast path)"),
    ("pair-256", "alloc+free of one 256 B block, repeated"),
    ("pair-1024", "alloc+free of one 1 KiB block, repeated"),
    ("pair-4096", "alloc+free of one 4 KiB block, repeated"),
    ("batch-fifo-64", "glibc bench-malloc-simple: 1000 × 64 B allocated, then freed first-in-first-out"),
    ("batch-lifo-64", "as above, freed last-in-first-out"),
    ("batch-fifo-1024", "1000 × 1 KiB, freed FIFO"),
    ("batch-lifo-1024", "1000 × 1 KiB, freed LIFO"),
    ("wset-1t", "random working set (4096 slots) of 4 B–32 KiB (log-uniform): free / realloc / replace, 1 thread"),
    ("wset-2t", "the same, 2 threads"),
    ("vec-grow", "Vec<u64> pushed to lengths 1..64Ki (per push)"),
    ("string-grow", "String grown by 8 B pieces to 8 B..128 KiB, plus 64 format!()ed short strings (per piece)"),
    ("hashmap-1m", "HashMap<u64,u64>: 1M random inserts from empty, then drop (per insert)"),
    ("btreemap-1m", "BTreeMap<u64,u64>: 1M random inserts, then drop (per insert)"),
    ("larson", "larson-style: 4 threads × 1000 slots of 16–1024 B replaced at random; 10 generations of threads, each inheriting (and freeing) the previous one's objects"),
    (
        "prodcons-64",
        "producer allocates 64 B and writes its first word, consumer thread reads it and frees (every free \
         remote), through a 4096-slot ring; per object. The pipeline floor is the same ring and the same \
         writes and reads with pooled blocks and no allocation: the part of the cost no allocator can remove",
    ),
    ("prodcons-8-2048", "the same with 8–2048 B (log-uniform)"),
    ("rptest", "rptest-style: 4 threads allocate batches of 256 × 16 B–16 KiB, keep 4 batches, free the oldest; every 4th batch is freed by the next thread"),
    ("large", "working set of 8 large blocks, 64 KiB–25 MiB (log-uniform), replaced at random, every 4 KiB page written"),
    ("latency-8t", "8 threads on this machine's cores: free+alloc of 16–1024 B in a 64-slot set, each timed (TSC)"),
    ("frag", "fill 256 MiB (× scale) with 8 B–1 KiB objects, free a random 90%: RSS vs live after free, after goheap's background step, after the allocator's trim"),
];

/// Where a run's report goes: the committed files for a complete run, `target/bench/report/` for a partial
/// one (`--quick`, `--only`, `--alloc`), so a smoke run never overwrites the published numbers.
struct Out {
    /// The report's directory (BENCHMARKS.md).
    md: PathBuf,
    /// Raw lines and chart.
    results: PathBuf,
    /// The chart's and raw lines' paths as linked from the report.
    link_prefix: &'static str,
}

impl Out {
    fn published(root: &Path) -> Self {
        Out { md: root.to_path_buf(), results: root.join("bench").join("results"), link_prefix: "bench/results/" }
    }
    fn scratch(root: &Path) -> Self {
        let d = bench_dir(root).join("report");
        Out { md: d.clone(), results: d, link_prefix: "" }
    }
}

/// Options of one run.
struct Opts {
    reps: usize,
    scale: f64,
    cap: f64,
    only: Option<Vec<String>>,
    allocs: Vec<String>,
    callgrind: bool,
    callgrind_n: u64,
    report_only: bool,
    quick: bool,
    /// Wall-time budget of the whole command: no new repetition starts if it would end past it.
    budget: f64,
}

fn parse(args: &[String]) -> Result<Opts, String> {
    let mut o = Opts {
        reps: 5,
        scale: 1.0,
        cap: 2.5,
        only: None,
        allocs: ALLOCATORS.iter().map(|a| a.0.to_string()).collect(),
        callgrind: true,
        callgrind_n: 200_000,
        report_only: false,
        quick: false,
        budget: 14.0 * 60.0,
    };
    let mut reps = None;
    let mut scale = None;
    let mut cap = None;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut val = || it.next().cloned().ok_or_else(|| format!("{a} needs a value"));
        match a.as_str() {
            "--quick" => o.quick = true,
            "--reps" => reps = Some(val()?.parse::<usize>().map_err(|e| format!("--reps: {e}"))?),
            "--scale" => scale = Some(val()?.parse::<f64>().map_err(|e| format!("--scale: {e}"))?),
            "--cap" => cap = Some(val()?.parse::<f64>().map_err(|e| format!("--cap: {e}"))?),
            "--only" => {
                let v: Vec<String> = val()?.split(',').map(str::to_string).collect();
                for g in &v {
                    if !GROUPS.contains(&g.as_str()) {
                        return Err(format!("unknown group {g:?}"));
                    }
                }
                o.only = Some(v);
            }
            "--alloc" => {
                let mut v: Vec<String> = val()?.split(',').map(str::to_string).collect();
                for n in &v {
                    if !ALLOCATORS.iter().any(|a| a.0 == n) {
                        return Err(format!("unknown allocator {n:?}"));
                    }
                }
                if !v.iter().any(|n| n == "goheap") {
                    v.insert(0, "goheap".into());
                }
                o.allocs = v;
            }
            "--no-callgrind" => o.callgrind = false,
            "--budget" => o.budget = val()?.parse::<f64>().map_err(|e| format!("--budget: {e}"))?,
            "--report-only" => o.report_only = true,
            "-h" | "--help" => return Err(String::new()),
            other => return Err(format!("unknown option {other:?}")),
        }
    }
    if o.quick {
        o.reps = 2;
        o.scale = 0.05;
        o.cap = 0.5;
        o.callgrind_n = 20_000;
    }
    o.reps = reps.unwrap_or(o.reps).max(1);
    o.scale = scale.unwrap_or(o.scale);
    o.cap = cap.unwrap_or(o.cap);
    Ok(o)
}

/// `cargo xtask bench --scavenger`: builds and runs `examples/scav_step.rs` (release, feature `std`), which
/// prints the cost of one background scavenger step as the heap grows from 64 MiB to 16 GiB.
fn scavenger_steps(args: &[String]) -> ExitCode {
    if let Some(a) = args.iter().find(|a| *a != "--scavenger") {
        eprintln!("cargo xtask bench --scavenger: takes no other argument (got {a})");
        return ExitCode::from(EXIT_ERROR);
    }
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(root()).env_remove("RUSTC_BOOTSTRAP").args([
        "run",
        "--release",
        "-p",
        "goheap",
        "--features",
        "std",
        "--example",
        "scav_step",
    ]);
    say!("$ {}", crate::proc::show(&cmd));
    match crate::proc::run_streaming(&mut cmd, "the scavenger step benchmark") {
        Ok(s) if s.success() => ExitCode::SUCCESS,
        Ok(s) => {
            eprintln!("cargo xtask bench --scavenger: the benchmark failed ({s})");
            ExitCode::from(EXIT_ERROR)
        }
        Err(e) => {
            eprintln!("cargo xtask bench --scavenger: cargo: {e}");
            ExitCode::from(EXIT_ERROR)
        }
    }
}

pub fn main(args: &[String]) -> ExitCode {
    if args.iter().any(|a| a == "--kernel") {
        return crate::bench_kernel::main(args);
    }
    if args.iter().any(|a| a == "--kproxy") {
        return crate::kproxy::main(args);
    }
    if args.iter().any(|a| a == "--scavenger") {
        return scavenger_steps(args);
    }
    let opts = match parse(args) {
        Ok(o) => o,
        Err(e) if e.is_empty() => {
            print!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("{e}\n\n{USAGE}");
            return ExitCode::from(EXIT_ERROR);
        }
    };
    match run(&opts) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("cargo xtask bench: {e}");
            ExitCode::from(EXIT_ERROR)
        }
    }
}

/// One JSON value of a result line (the lines are flat objects).
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Val {
    Num(f64),
    Str(String),
    Bool(bool),
}

pub(crate) type Record = BTreeMap<String, Val>;

/// Parses one flat JSON object of strings, numbers and booleans (what goheap-bench prints).
pub(crate) fn parse_line(line: &str) -> Option<Record> {
    let s = line.trim();
    let s = s.strip_prefix('{')?.strip_suffix('}')?;
    let b = s.as_bytes();
    let mut i = 0;
    let mut rec = Record::new();
    let string = |i: &mut usize| -> Option<String> {
        if b.get(*i) != Some(&b'"') {
            return None;
        }
        *i += 1;
        let mut out = String::new();
        while *i < b.len() {
            match b[*i] {
                b'"' => {
                    *i += 1;
                    return Some(out);
                }
                b'\\' => {
                    *i += 1;
                    out.push(*b.get(*i)? as char);
                }
                c => out.push(c as char),
            }
            *i += 1;
        }
        None
    };
    while i < b.len() {
        while i < b.len() && (b[i] == b',' || b[i] == b' ') {
            i += 1;
        }
        if i >= b.len() {
            break;
        }
        let k = string(&mut i)?;
        if b.get(i) != Some(&b':') {
            return None;
        }
        i += 1;
        let v = if b.get(i) == Some(&b'"') {
            Val::Str(string(&mut i)?)
        } else {
            let start = i;
            while i < b.len() && b[i] != b',' {
                i += 1;
            }
            match s[start..i].trim() {
                "true" => Val::Bool(true),
                "false" => Val::Bool(false),
                n => Val::Num(n.parse().ok()?),
            }
        };
        rec.insert(k, v);
    }
    Some(rec)
}

pub(crate) fn to_line(rec: &Record) -> String {
    let body: Vec<String> = rec
        .iter()
        .map(|(k, v)| match v {
            Val::Num(n) if n.fract() == 0.0 && n.abs() < 1e15 => format!("\"{k}\":{}", *n as i64),
            Val::Num(n) => format!("\"{k}\":{n}"),
            Val::Str(s) => format!("\"{k}\":\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\"")),
            Val::Bool(b) => format!("\"{k}\":{b}"),
        })
        .collect();
    format!("{{{}}}", body.join(","))
}

pub(crate) fn num(r: &Record, k: &str) -> Option<f64> {
    match r.get(k) {
        Some(Val::Num(n)) => Some(*n),
        _ => None,
    }
}

pub(crate) fn text<'a>(r: &'a Record, k: &str) -> Option<&'a str> {
    match r.get(k) {
        Some(Val::Str(s)) => Some(s),
        _ => None,
    }
}

/// Shell output of `cmd`, trimmed ("" if it fails).
fn sh(cmd: &str, args: &[&str]) -> String {
    Command::new(cmd)
        .args(args)
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

pub(crate) fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// The machine, for the report's header.
pub(crate) fn machine() -> Vec<(String, String)> {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|| "?".into());
    let mem = std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("MemTotal"))
        .and_then(|l| l.split_whitespace().nth(1).and_then(|k| k.parse::<u64>().ok()))
        .map(|kb| format!("{:.1} GiB", kb as f64 / (1 << 20) as f64))
        .unwrap_or_else(|| "?".into());
    let os = std::fs::read_to_string("/etc/os-release")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("PRETTY_NAME="))
        .map(|l| l.trim_start_matches("PRETTY_NAME=").trim_matches('"').to_string())
        .unwrap_or_default();
    vec![
        ("nproc".into(), sh("nproc", &[])),
        ("CPU".into(), model),
        ("memory".into(), mem),
        ("OS".into(), format!("{os}, kernel {}", sh("uname", &["-r"]))),
        ("rustc".into(), sh("rustc", &["--version"])),
        ("gcc".into(), sh("gcc", &["-dumpfullversion"])),
        ("glibc".into(), sh("ldd", &["--version"]).lines().next().unwrap_or("").to_string()),
        ("date (UTC)".into(), sh("date", &["-u", "+%Y-%m-%d %H:%M"])),
    ]
}

/// Versions of the crates named in `names`, from the lock file `lock` (unreadable: none).
pub(crate) fn locked_versions(lock: &Path, names: &[&str]) -> Vec<(String, String)> {
    let text = std::fs::read_to_string(lock).unwrap_or_default();
    let mut out = Vec::new();
    let mut name = None;
    for l in text.lines() {
        if let Some(n) = l.strip_prefix("name = ") {
            name = Some(n.trim_matches('"').to_string());
        } else if let Some(v) = l.strip_prefix("version = ") {
            if let Some(n) = name.take().filter(|n| names.contains(&n.as_str())) {
                out.push((n, v.trim_matches('"').to_string()));
            }
        }
    }
    out
}

fn bench_dir(root: &Path) -> PathBuf {
    root.join("target").join("bench")
}

fn bin_path(root: &Path, alloc: &str) -> PathBuf {
    bench_dir(root).join("bin").join(format!("goheap-bench-{alloc}"))
}

/// Builds the binary of `alloc`; the error is the tail of cargo's output.
fn build(root: &Path, alloc: &str) -> Result<(), String> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let t = Instant::now();
    let out = Command::new(cargo)
        .current_dir(root)
        .env("RUSTFLAGS", "--cfg goheap_bench")
        .env("CARGO_TARGET_DIR", bench_dir(root))
        .args(["build", "--release", "--quiet", "-p", "goheap-bench", "--no-default-features", "--features"])
        .arg(format!("alloc-{alloc}"))
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run cargo: {e}"))?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
        let tail = lines[lines.len().saturating_sub(12)..].join("\n");
        return Err(tail);
    }
    let src = bench_dir(root).join("release").join("goheap-bench");
    let dst = bin_path(root, alloc);
    std::fs::create_dir_all(dst.parent().unwrap()).map_err(|e| e.to_string())?;
    std::fs::copy(&src, &dst).map_err(|e| format!("copy {}: {e}", src.display()))?;
    say!("built {alloc} ({:.0} s)", t.elapsed().as_secs_f64());
    Ok(())
}

/// Outcome of one process run.
enum RunOutcome {
    Ok(Vec<Record>),
    /// Killed at the time limit; the lines it printed before.
    Timeout(Vec<Record>),
    Failed(Vec<Record>, String),
}

/// Runs `bin args...` with a time limit, collecting its JSON lines.
fn run_one(bin: &Path, args: &[String], limit: Duration) -> RunOutcome {
    let mut child =
        match Command::new(bin).args(args).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn() {
            Ok(c) => c,
            Err(e) => return RunOutcome::Failed(Vec::new(), format!("cannot start {}: {e}", bin.display())),
        };
    let stdout = child.stdout.take().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        BufReader::new(stdout).lines().map_while(Result::ok).filter_map(|l| parse_line(&l)).collect::<Vec<_>>()
    });
    let err_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    let t = Instant::now();
    let status = loop {
        match child.try_wait() {
            Ok(Some(st)) => break Some(st),
            Ok(None) if t.elapsed() > limit => {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(10)),
            Err(_) => break None,
        }
    };
    let recs = reader.join().unwrap_or_default();
    let err = err_reader.join().unwrap_or_default();
    match status {
        None => RunOutcome::Timeout(recs),
        Some(st) if st.success() => RunOutcome::Ok(recs),
        Some(st) => {
            let tail: Vec<&str> = err.lines().rev().take(6).collect::<Vec<_>>().into_iter().rev().collect();
            RunOutcome::Failed(recs, format!("{st}: {}", tail.join(" / ")))
        }
    }
}

/// The pair sizes the instruction counts are taken at: 64 B (a size class's fast path) and 8 B (the tiny
/// path, 8 B and less).
const CALLGRIND_PAIR_BYTES: [u32; 2] = [64, 8];

/// Instructions per alloc+free pair of `nbytes` (`goheap-bench callgrind-pairN`) under callgrind:
/// (Ir(2n) - Ir(n)) / n.
fn callgrind(bin: &Path, n: u64, nbytes: u32) -> Result<f64, String> {
    let ir = |pairs: u64| -> Result<u64, String> {
        let out = Command::new("valgrind")
            .args(["--tool=callgrind", "--callgrind-out-file=/dev/null"])
            .arg(bin)
            .args([format!("callgrind-pair{nbytes}"), pairs.to_string()])
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("cannot run valgrind: {e}"))?;
        let err = String::from_utf8_lossy(&out.stderr);
        err.lines()
            .find_map(|l| l.split("Collected :").nth(1).and_then(|v| v.trim().parse::<u64>().ok()))
            .ok_or_else(|| format!("no 'Collected' line from callgrind ({})", out.status))
    };
    let a = ir(n)?;
    let b = ir(2 * n)?;
    Ok(b.saturating_sub(a) as f64 / n as f64)
}

fn run(o: &Opts) -> Result<(), String> {
    let root = root();
    let partial_run = o.quick || o.only.is_some() || o.allocs.len() < ALLOCATORS.len();
    let out_to = if partial_run && !o.report_only { Out::scratch(&root) } else { Out::published(&root) };
    std::fs::create_dir_all(&out_to.results).map_err(|e| e.to_string())?;
    let jsonl = out_to.results.join("latest.jsonl");
    if o.report_only {
        let text = std::fs::read_to_string(&jsonl).map_err(|e| format!("{}: {e}", jsonl.display()))?;
        let recs: Vec<Record> = text.lines().filter_map(parse_line).collect();
        return report(&root, &out_to, &recs);
    }
    if partial_run {
        say!("partial run (--quick/--only/--alloc): report goes to {}, not BENCHMARKS.md", out_to.md.display());
    }
    let t_all = Instant::now();
    let load_before = load_average();
    let groups: Vec<&str> =
        GROUPS.iter().copied().filter(|g| o.only.as_ref().is_none_or(|v| v.iter().any(|x| x == g))).collect();

    // 1. Build.
    say!("building {} variants of goheap-bench into {}", o.allocs.len(), bench_dir(&root).display());
    let mut built = Vec::new();
    let mut not_built: Vec<(String, String)> = Vec::new();
    for a in &o.allocs {
        match build(&root, a) {
            Ok(()) => built.push(a.clone()),
            Err(e) => {
                say!("{a}: build failed, left out:\n{e}");
                not_built.push((a.clone(), e));
            }
        }
    }
    if !built.iter().any(|a| a == "goheap") {
        return Err("goheap's own variant did not build".into());
    }
    let t_build = t_all.elapsed();

    // 2. Run, interleaved.
    let mut meta = Record::new();
    let mut out: Vec<Record> = Vec::new();
    let mut skip: BTreeSet<(String, String)> = BTreeSet::new();
    let limit = Duration::from_secs_f64((o.cap * 4.0 + 8.0).max(10.0));
    let t_runs = Instant::now();
    let nb = built.len();
    let mut reps_done = 0;
    for rep in 0..o.reps {
        if rep > 0 {
            let per_rep = t_runs.elapsed().as_secs_f64() / rep as f64;
            let callgrind_left = if o.callgrind { 6.0 * nb as f64 } else { 0.0 };
            if t_all.elapsed().as_secs_f64() + per_rep + callgrind_left > o.budget {
                say!(
                    "time budget ({:.0} s): stopping after {rep} of {} repetitions (one takes {per_rep:.0} s here now)",
                    o.budget,
                    o.reps
                );
                break;
            }
        }
        reps_done = rep + 1;
        say!("repetition {}/{} ({} groups × {nb} allocators)", rep + 1, o.reps, groups.len());
        for g in &groups {
            for k in 0..nb {
                let a = &built[(k + rep) % nb];
                if skip.contains(&(g.to_string(), a.clone())) {
                    continue;
                }
                let args: Vec<String> =
                    vec![g.to_string(), "--scale".into(), o.scale.to_string(), "--cap".into(), o.cap.to_string()];
                let t = Instant::now();
                let (recs, problem) = match run_one(&bin_path(&root, a), &args, limit) {
                    RunOutcome::Ok(r) => (r, None),
                    RunOutcome::Timeout(r) => {
                        skip.insert((g.to_string(), a.clone()));
                        (r, Some(format!("killed after {:.0} s", limit.as_secs_f64())))
                    }
                    RunOutcome::Failed(r, e) => {
                        skip.insert((g.to_string(), a.clone()));
                        (r, Some(e))
                    }
                };
                let wall = t.elapsed().as_secs_f64();
                for mut r in recs {
                    r.insert("rep".into(), Val::Num(rep as f64));
                    r.insert("group".into(), Val::Str(g.to_string()));
                    r.insert("process_secs".into(), Val::Num((wall * 1000.0).round() / 1000.0));
                    out.push(r);
                }
                if let Some(p) = problem {
                    say!("{g} / {a} (rep {}): {p}; skipped in later repetitions", rep + 1);
                    let mut r = Record::new();
                    r.insert("group".into(), Val::Str(g.to_string()));
                    r.insert("alloc".into(), Val::Str(a.clone()));
                    r.insert("rep".into(), Val::Num(rep as f64));
                    r.insert("error".into(), Val::Str(p));
                    out.push(r);
                }
            }
        }
    }
    let t_runs = t_runs.elapsed();

    // 3. Callgrind.
    let t_cg = Instant::now();
    if o.callgrind {
        if crate::setup::which("valgrind").is_none() {
            say!("valgrind not found: no instruction counts (apt-get install valgrind)");
        } else {
            for a in &built {
                for nbytes in CALLGRIND_PAIR_BYTES {
                    match callgrind(&bin_path(&root, a), o.callgrind_n, nbytes) {
                        Ok(ipp) => {
                            say!("callgrind {a}: {ipp:.1} instructions per {nbytes} B pair");
                            let mut r = Record::new();
                            r.insert("workload".into(), Val::Str(format!("callgrind-pair-{nbytes}")));
                            r.insert("alloc".into(), Val::Str(a.clone()));
                            r.insert("instr_per_pair".into(), Val::Num((ipp * 10.0).round() / 10.0));
                            out.push(r);
                        }
                        Err(e) => say!("callgrind {a} ({nbytes} B): {e}"),
                    }
                }
            }
        }
    }
    let t_cg = t_cg.elapsed();

    // Meta line: how this run was made.
    meta.insert("meta".into(), Val::Bool(true));
    meta.insert("reps".into(), Val::Num(reps_done as f64));
    meta.insert("reps_asked".into(), Val::Num(o.reps as f64));
    meta.insert("scale".into(), Val::Num(o.scale));
    meta.insert("cap_secs".into(), Val::Num(o.cap));
    meta.insert("quick".into(), Val::Bool(o.quick));
    meta.insert("args".into(), Val::Str(std::env::args().skip(1).collect::<Vec<_>>().join(" ")));
    meta.insert("load_before".into(), Val::Str(load_before));
    meta.insert("load_after".into(), Val::Str(load_average()));
    meta.insert("build_secs".into(), Val::Num(t_build.as_secs_f64().round()));
    meta.insert("run_secs".into(), Val::Num(t_runs.as_secs_f64().round()));
    meta.insert("callgrind_secs".into(), Val::Num(t_cg.as_secs_f64().round()));
    meta.insert("total_secs".into(), Val::Num(t_all.elapsed().as_secs_f64().round()));
    for (k, v) in machine() {
        meta.insert(format!("machine {k}"), Val::Str(v));
    }
    for (a, e) in &not_built {
        meta.insert(format!("not_built {a}"), Val::Str(e.clone()));
    }
    let mut lines = vec![to_line(&meta)];
    lines.extend(out.iter().map(to_line));
    std::fs::write(&jsonl, lines.join("\n") + "\n").map_err(|e| format!("{}: {e}", jsonl.display()))?;
    say!("wrote {} ({} lines)", jsonl.display(), lines.len());
    let mut all = vec![meta];
    all.extend(out);
    report(&root, &out_to, &all)?;
    say!(
        "done in {:.0} s (build {:.0} s, runs {:.0} s, callgrind {:.0} s)",
        t_all.elapsed().as_secs_f64(),
        t_build.as_secs_f64(),
        t_runs.as_secs_f64(),
        t_cg.as_secs_f64()
    );
    Ok(())
}

pub(crate) fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let n = v.len();
    if n == 0 {
        f64::NAN
    } else if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Summary of one metric over repetitions.
#[derive(Clone, Copy)]
struct Stat {
    med: f64,
    min: f64,
    max: f64,
    n: usize,
}

fn stat(mut v: Vec<f64>) -> Option<Stat> {
    if v.is_empty() {
        return None;
    }
    let min = v.iter().copied().fold(f64::INFINITY, f64::min);
    let max = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let n = v.len();
    Some(Stat { med: median(&mut v), min, max, n })
}

/// Numbers in the tables: 3 significant digits.
fn fmt_num(x: f64) -> String {
    if !x.is_finite() {
        return "–".into();
    }
    let a = x.abs();
    if a >= 1000.0 {
        format!("{x:.0}")
    } else if a >= 100.0 {
        format!("{x:.1}")
    } else if a >= 10.0 {
        format!("{x:.2}")
    } else {
        format!("{x:.3}")
    }
}

fn fmt_ratio(r: f64) -> String {
    if r.is_finite() {
        format!("{r:.2}")
    } else {
        "–".into()
    }
}

fn mib(kb: f64) -> String {
    format!("{:.1}", kb / 1024.0)
}

/// Records of (workload, alloc), runs only.
struct Table<'a> {
    by: BTreeMap<(String, String), Vec<&'a Record>>,
}

impl<'a> Table<'a> {
    fn new(recs: &'a [Record]) -> Self {
        let mut by: BTreeMap<(String, String), Vec<&Record>> = BTreeMap::new();
        for r in recs {
            if let (Some(w), Some(a)) = (text(r, "workload"), text(r, "alloc")) {
                by.entry((w.to_string(), a.to_string())).or_default().push(r);
            }
        }
        Table { by }
    }
    fn recs(&self, w: &str, a: &str) -> &[&'a Record] {
        self.by.get(&(w.to_string(), a.to_string())).map(|v| v.as_slice()).unwrap_or(&[])
    }
    fn stat(&self, w: &str, a: &str, k: &str) -> Option<Stat> {
        stat(self.recs(w, a).iter().filter_map(|r| num(r, k)).collect())
    }
    fn partial(&self, w: &str, a: &str) -> bool {
        self.recs(w, a).iter().any(|r| r.get("partial") == Some(&Val::Bool(true)))
    }
}

/// Regenerates BENCHMARKS.md and the ratio chart (ratios.svg) from the records, section by section.
fn report(root: &Path, out_to: &Out, recs: &[Record]) -> Result<(), String> {
    let meta = recs.iter().find(|r| r.get("meta").is_some()).cloned().unwrap_or_default();
    let recs = without_superseded_frag(recs);
    let r = Report::new(&recs, &meta, out_to.link_prefix);

    let mut md = String::new();
    r.machine_and_run(&mut md);
    r.allocators(&mut md, root);
    r.headline(&mut md);
    let chart_rows = r.summary(&mut md);
    r.callgrind(&mut md);
    // The in-QEMU comparison (`cargo xtask bench --kernel`), from its own results file.
    md.push_str(&crate::bench_kernel::section(root));
    // The kernel workloads on the host (`cargo xtask bench --kproxy`), from its own results file.
    md.push_str(&crate::kproxy::section(root));
    r.per_workload(&mut md);
    r.unfinished_runs(&mut md);
    let notes_path = root.join("bench").join("NOTES.md");
    if let Ok(notes) = std::fs::read_to_string(&notes_path) {
        let _ = writeln!(md, "{}", notes.trim_end());
    }

    let md_path = out_to.md.join("BENCHMARKS.md");
    std::fs::write(&md_path, md).map_err(|e| format!("{}: {e}", md_path.display()))?;
    let svg_path = out_to.results.join("ratios.svg");
    std::fs::write(&svg_path, chart(&chart_rows, &r.peers)).map_err(|e| format!("{}: {e}", svg_path.display()))?;
    say!("wrote {} and {}", md_path.display(), svg_path.display());
    Ok(())
}

/// The records without the superseded frag runs: frag's state depends on how far the fill got, so a
/// repetition cut short by the cap is left out when the same allocator has complete ones.
fn without_superseded_frag(recs: &[Record]) -> Vec<Record> {
    let complete_frag: BTreeSet<&str> = recs
        .iter()
        .filter(|r| text(r, "workload") == Some("frag") && r.get("partial") == Some(&Val::Bool(false)))
        .filter_map(|r| text(r, "alloc"))
        .collect();
    recs.iter()
        .filter(|r| {
            !(text(r, "workload") == Some("frag")
                && r.get("partial") == Some(&Val::Bool(true))
                && text(r, "alloc").is_some_and(|a| complete_frag.contains(a)))
        })
        .cloned()
        .collect()
}

/// A peer's name as the report prints it (glibc for the system allocator).
fn peer_name(p: &str) -> &str {
    if p == "system" {
        "glibc"
    } else {
        p
    }
}

/// The largest ratio of `(peer, ratio)` pairs: goheap against its best peer.
fn max_ratio<'p>(pairs: impl Iterator<Item = (&'p str, f64)>) -> Option<(&'p str, f64)> {
    pairs.max_by(|a, b| a.1.partial_cmp(&b.1).unwrap_or(std::cmp::Ordering::Equal))
}

/// What every section of the report reads: the records by (workload, allocator), the run's metadata, and
/// the allocators and workloads present, in the report's order.
struct Report<'a> {
    t: Table<'a>,
    meta: &'a Record,
    /// The prefix of links to the raw results and the chart.
    lp: &'a str,
    allocs: Vec<&'static str>,
    peers: Vec<&'static str>,
    workloads: Vec<&'static str>,
    errors: Vec<&'a Record>,
}

impl<'a> Report<'a> {
    fn new(recs: &'a [Record], meta: &'a Record, lp: &'a str) -> Self {
        let t = Table::new(recs);
        let allocs: Vec<&str> = ALLOCATORS.iter().map(|a| a.0).filter(|a| t.by.keys().any(|(_, x)| x == a)).collect();
        let peers = allocs.iter().copied().filter(|a| *a != "goheap").collect();
        let workloads = WORKLOADS.iter().map(|w| w.0).filter(|w| t.by.keys().any(|(x, _)| x == w)).collect();
        let errors = recs.iter().filter(|r| r.get("error").is_some()).collect();
        Report { t, meta, lp, allocs, peers, workloads, errors }
    }

    /// goheap/peer ratio of the medians of `k`; None when either side is missing or was cut short by the cap
    /// in a workload whose state depends on how far it got (frag).
    fn ratio_of(&self, w: &str, p: &str, k: &str) -> Option<f64> {
        let g = self.t.stat(w, "goheap", k)?;
        let x = self.t.stat(w, p, k)?;
        if w == "frag" && (self.t.partial(w, p) || self.t.partial(w, "goheap")) {
            return None;
        }
        Some(g.med / x.med)
    }

    /// goheap/peer ratio of median ns/op (wall time).
    fn ratio(&self, w: &str, p: &str) -> Option<f64> {
        self.ratio_of(w, p, "ns_per_op")
    }

    /// goheap/peer ratio of median CPU ns/op.
    fn cpu_ratio(&self, w: &str, p: &str) -> Option<f64> {
        self.ratio_of(w, p, "cpu_ns_per_op")
    }

    /// The peer goheap compares worst against in `w` by wall time, and that ratio.
    fn best(&self, w: &str) -> Option<(&'static str, f64)> {
        max_ratio(self.peers.iter().filter_map(|p| self.ratio(w, p).map(|r| (*p, r))))
    }

    /// The same by CPU time.
    fn best_cpu(&self, w: &str) -> Option<(&'static str, f64)> {
        max_ratio(self.peers.iter().filter_map(|p| self.cpu_ratio(w, p).map(|r| (*p, r))))
    }

    /// The title, the introduction and the machine-and-run table.
    fn machine_and_run(&self, md: &mut String) {
        let (meta, lp) = (self.meta, self.lp);
        let m = |k: &str| text(meta, &format!("machine {k}")).unwrap_or("?").to_string();
        let mnum = |k: &str| num(meta, k).map(|v| v.to_string()).unwrap_or_else(|| "?".into());
        let _ = writeln!(md, "# Benchmarks: goheap::Hosted and the allocators users would pick instead\n");
        let _ = writeln!(
            md,
            "Generated by `cargo xtask bench{}` (issue 7); do not edit by hand. Raw results (one JSON line per \
             workload, allocator and repetition): [`{lp}latest.jsonl`]({lp}latest.jsonl); the benchmark source: \
             `bench/src/main.rs`, the runner: `xtask/src/bench.rs`.\n",
            text(meta, "args")
                .filter(|s| !s.is_empty())
                .map(|s| format!(" {s}"))
                .unwrap_or_default()
                .trim_start_matches(" bench")
        );
        let _ = writeln!(md, "## Machine and run\n");
        let _ = writeln!(md, "| | |\n|---|---|");
        for k in ["nproc", "CPU", "memory", "OS", "rustc", "gcc", "glibc", "date (UTC)"] {
            let _ = writeln!(md, "| {k} | {} |", m(k));
        }
        let _ = writeln!(
            md,
            "| load average (1/5/15 min) before / after | {} / {} |",
            text(meta, "load_before").unwrap_or("?"),
            text(meta, "load_after").unwrap_or("?")
        );
        let reps = match (num(meta, "reps"), num(meta, "reps_asked")) {
            (Some(d), Some(a)) if d < a => format!("{d} of {a} asked (time budget)"),
            _ => mnum("reps"),
        };
        let _ = writeln!(
            md,
            "| repetitions, scale, cap per group run | {}, {}, {} s |",
            reps,
            mnum("scale"),
            mnum("cap_secs")
        );
        let _ = writeln!(
            md,
            "| wall time of `cargo xtask bench` | {} s (build {} s, runs {} s, callgrind {} s) |\n",
            mnum("total_secs"),
            mnum("build_secs"),
            mnum("run_secs"),
            mnum("callgrind_secs")
        );
        let _ = writeln!(
            md,
            "The machine is shared (other builds ran during the measurement: see the load average), so absolute \
             times are noisy. Every allocator ran every workload in its own process, interleaved (repetition 1: \
             A B C …, repetition 2: B C … A), and the comparisons are **ratios of medians measured side by side in \
             this one run**. Absolute medians are in the per-workload tables for reference only.\n"
        );
    }

    /// The allocators: what each is, its crate versions, and whether it ran.
    fn allocators(&self, md: &mut String, root: &Path) {
        let _ = writeln!(md, "## Allocators\n");
        let _ = writeln!(md, "| name | what | crate versions |\n|---|---|---|");
        let versions = locked_versions(&root.join("Cargo.lock"), PEER_CRATES);
        for (a, what) in ALLOCATORS {
            let v: Vec<String> = versions
                .iter()
                .filter(|(n, _)| match *a {
                    "mimalloc" => n.contains("mimalloc"),
                    "jemalloc" => n.contains("jemalloc"),
                    "snmalloc" => n.contains("snmalloc"),
                    "rpmalloc" => n.contains("rpmalloc"),
                    "talc" => n == "talc",
                    "llalloc" => n == "linked_list_allocator",
                    "buddy" => n == "buddy_system_allocator",
                    _ => false,
                })
                .map(|(n, v)| format!("{n} {v}"))
                .collect();
            let status = if self.allocs.contains(a) {
                String::new()
            } else if let Some(Val::Str(e)) = self.meta.get(&format!("not_built {a}")) {
                format!(" **not built here:** `{}`", e.lines().last().unwrap_or("").replace('|', "\\|"))
            } else {
                " (not in this run)".into()
            };
            let _ = writeln!(md, "| {a} | {what}{status} | {} |", v.join(", "));
        }
        let _ = writeln!(
            md,
            "\nThe arena allocators (talc, linked_list_allocator, buddy_system_allocator) are `no_std` heaps over \
             one region; here they get a 16 GiB `MAP_NORESERVE` mapping claimed on first use (untouched pages cost \
             nothing). They never return memory to the OS and their locks are global.\n"
        );
    }

    /// `peer ratio, ...` of workload `w` against the peers `ps` by `ratio` (wall or CPU time), or `none`.
    fn ratio_list(&self, w: &str, ps: &[&str], ratio: fn(&Self, &str, &str) -> Option<f64>, none: &str) -> String {
        let v: Vec<String> =
            ps.iter().filter_map(|p| ratio(self, w, p).map(|r| format!("{} {}", peer_name(p), fmt_ratio(r)))).collect();
        if v.is_empty() {
            none.into()
        } else {
            v.join(", ")
        }
    }

    /// The headline: the figures the issue steers by, computed from this run.
    fn headline(&self, md: &mut String) {
        let rs = |w: &str, ps: &[&str]| self.ratio_list(w, ps, Self::ratio, "not measured in this run");
        let rc = |w: &str, ps: &[&str]| self.ratio_list(w, ps, Self::cpu_ratio, "not measured");
        let _ = writeln!(md, "## Headline (goheap / peer, medians of this run; < 1: goheap faster or smaller)\n");
        let pair_peers = ["jemalloc", "mimalloc", "system", "talc"];
        let _ = writeln!(
            md,
            "- 64 B alloc+free pair: {} (by CPU time: {}).",
            rs("pair-64", &pair_peers),
            rc("pair-64", &pair_peers)
        );
        let cross_peers = ["rpmalloc", "snmalloc", "mimalloc", "system"];
        let _ = writeln!(
            md,
            "- Cross-thread producer/consumer, 64 B: {} (by CPU time: {}); 8–2048 B: {} (by CPU time: {}).",
            rs("prodcons-64", &cross_peers),
            rc("prodcons-64", &cross_peers),
            rs("prodcons-8-2048", &cross_peers),
            rc("prodcons-8-2048", &cross_peers)
        );
        let (mut within, mut over) = (Vec::new(), Vec::new());
        for w in &self.workloads {
            if let Some((p, r)) = self.best(w) {
                if r <= 1.25 {
                    within.push(format!("{w} ({r:.2} vs {p})"));
                } else {
                    over.push(format!("{w} ({r:.2} vs {p})"));
                }
            }
        }
        let _ = writeln!(
            md,
            "- Against the best peer of each workload, goheap is within 1.25× on {} of {} workloads; over 1.25× on: {}.",
            within.len(),
            within.len() + over.len(),
            if over.is_empty() { "none".to_string() } else { over.join(", ") }
        );
        let over_cpu: Vec<String> = self
            .workloads
            .iter()
            .filter_map(|w| self.best_cpu(w).filter(|(_, r)| *r > 1.25).map(|(p, r)| format!("{w} ({r:.2} vs {p})")))
            .collect();
        let _ = writeln!(
            md,
            "- The same by CPU time: over 1.25× of the best peer on {} workloads: {}.",
            over_cpu.len(),
            if over_cpu.is_empty() { "none".to_string() } else { over_cpu.join(", ") }
        );
        let mv = self.group_rss_ratios("mimalloc");
        if !mv.is_empty() {
            let mut m2 = mv.clone();
            let _ = writeln!(
                md,
                "- Peak RSS against mimalloc over the {} workload groups: median {}, range {}–{}; groups over 1.1×: {}.",
                mv.len(),
                fmt_ratio(median(&mut m2)),
                fmt_ratio(mv[0]),
                fmt_ratio(mv[mv.len() - 1]),
                mv.iter().filter(|r| **r > 1.1).count()
            );
        }
        let cg_of = |a: &str| self.t.stat("callgrind-pair-64", a, "instr_per_pair").map(|s| s.med);
        if let Some(g) = cg_of("goheap") {
            let others: Vec<String> = ["jemalloc", "mimalloc", "system"]
                .iter()
                .filter_map(|a| cg_of(a).map(|v| format!("{} {v:.0}", peer_name(a))))
                .collect();
            let _ = writeln!(md, "- Instructions per 64 B pair (callgrind): goheap {g:.0}; {}.", others.join(", "));
        }
        let _ = writeln!(md);
    }

    /// goheap/peer peak RSS of each workload group (from the group's last workload), sorted.
    fn group_rss_ratios(&self, p: &str) -> Vec<f64> {
        let t = &self.t;
        let mut v: Vec<f64> = GROUPS
            .iter()
            .filter_map(|g| {
                let last = self
                    .workloads
                    .iter()
                    .rev()
                    .find(|w| t.recs(w, "goheap").first().and_then(|r| text(r, "group")) == Some(*g))?;
                Some(t.stat(last, "goheap", "peak_rss_kb")?.med / t.stat(last, p, "peak_rss_kb")?.med)
            })
            .collect();
        v.sort_by(|a, b| a.partial_cmp(b).unwrap());
        v
    }

    /// The header and separator of a table with one column per peer, after `| workload |` and, with
    /// `best`, a `goheap / best peer` column.
    fn peer_columns(&self, best: bool) -> (String, String) {
        let (mut hdr, mut sep) = if best {
            ("| workload | goheap / best peer |".to_string(), "|---|---|".to_string())
        } else {
            ("| workload |".to_string(), "|---|".to_string())
        };
        for p in &self.peers {
            let _ = write!(hdr, " {p} |");
            sep.push_str("---:|");
        }
        (hdr, sep)
    }

    /// The summary: goheap/peer ratio tables by wall time (also the chart's rows, returned), by CPU time and
    /// by peak RSS.
    fn summary(&self, md: &mut String) -> Vec<(String, Vec<(String, f64)>)> {
        let (lp, t) = (self.lp, &self.t);
        let _ = writeln!(md, "## Summary: goheap / peer, median time per operation\n");
        let _ = writeln!(
            md,
            "Each cell is goheap's median ns/op divided by the peer's: **< 1 means goheap is faster**, > 1 slower. \
             `*`: at least one run of either side hit the time cap (the ratio is still over the operations done). \
             The chart plots the same ratios on a log scale.\n"
        );
        let _ = writeln!(md, "![goheap/peer time ratios]({lp}ratios.svg)\n");
        let (hdr, sep) = self.peer_columns(true);
        let _ = writeln!(md, "{hdr}\n{sep}");
        let mut chart_rows: Vec<(String, Vec<(String, f64)>)> = Vec::new();
        for w in &self.workloads {
            let mut row = match self.best(w) {
                Some((p, r)) => format!("| {w} | {} ({p}) |", fmt_ratio(r)),
                None => format!("| {w} | – |"),
            };
            let mut pts = Vec::new();
            for p in &self.peers {
                match self.ratio(w, p) {
                    Some(r) => {
                        let star = if t.partial(w, p) || t.partial(w, "goheap") { "*" } else { "" };
                        let _ = write!(row, " {}{star} |", fmt_ratio(r));
                        pts.push((p.to_string(), r));
                    }
                    None => row.push_str(" – |"),
                }
            }
            let _ = writeln!(md, "{row}");
            chart_rows.push((w.to_string(), pts));
        }
        self.summary_cpu(md);
        self.summary_rss(md);
        chart_rows
    }

    /// The summary's ratios by CPU time, if the run measured it.
    fn summary_cpu(&self, md: &mut String) {
        if !self.workloads.iter().any(|w| self.t.stat(w, "goheap", "cpu_ns_per_op").is_some()) {
            return;
        }
        let _ = writeln!(
            md,
            "\nThe same ratios by **CPU time** per operation (the process's CPU time, all threads, over all its \
             operations): time the process spent descheduled by the machine's other load does not count, so \
             these move less from run to run on a shared machine; for multi-threaded workloads they include \
             time spent spinning while waiting for the other thread (prodcons, larson's hand-offs).\n"
        );
        let (hdr, sep) = self.peer_columns(true);
        let _ = writeln!(md, "{hdr}\n{sep}");
        for w in &self.workloads {
            let mut row = match self.best_cpu(w) {
                Some((p, r)) => format!("| {w} | {} ({p}) |", fmt_ratio(r)),
                None => format!("| {w} | – |"),
            };
            for p in &self.peers {
                match self.cpu_ratio(w, p) {
                    Some(r) => {
                        let _ = write!(row, " {} |", fmt_ratio(r));
                    }
                    None => row.push_str(" – |"),
                }
            }
            let _ = writeln!(md, "{row}");
        }
    }

    /// The summary's peak RSS ratios, one row per workload group.
    fn summary_rss(&self, md: &mut String) {
        let t = &self.t;
        let _ = writeln!(
            md,
            "\nPeak RSS, goheap / peer (median ru_maxrss of each workload group's process; < 1: goheap smaller):\n"
        );
        let (hdr, sep) = self.peer_columns(false);
        let _ = writeln!(md, "{hdr}\n{sep}");
        let groups_seen: Vec<(String, String)> = self
            .workloads
            .iter()
            .filter_map(|w| {
                t.by.get(&(w.to_string(), "goheap".into()))
                    .and_then(|v| v.first())
                    .map(|r| (text(r, "group").unwrap_or(w).to_string(), w.to_string()))
            })
            .collect();
        let mut done_groups = BTreeSet::new();
        for (g, w) in &groups_seen {
            if !done_groups.insert(g.clone()) {
                continue;
            }
            // The last workload of a group carries the group's peak.
            let last = groups_seen.iter().rev().find(|(g2, _)| g2 == g).map(|x| x.1.as_str()).unwrap_or(w);
            let mut row = format!("| {g} (`{last}`) |");
            for p in &self.peers {
                match (t.stat(last, "goheap", "peak_rss_kb"), t.stat(last, p, "peak_rss_kb")) {
                    (Some(a), Some(b)) => {
                        let _ = write!(row, " {} |", fmt_ratio(a.med / b.med));
                    }
                    _ => row.push_str(" – |"),
                }
            }
            let _ = writeln!(md, "{row}");
        }
    }

    /// The fast-path guard: instructions per 64 B pair (and per 8 B pair, the tiny path, when measured)
    /// under callgrind, if measured.
    fn callgrind(&self, md: &mut String) {
        let of =
            |a: &str, nbytes: u32| self.t.stat(&format!("callgrind-pair-{nbytes}"), a, "instr_per_pair").map(|s| s.med);
        let cg: Vec<(&str, f64, Option<f64>)> =
            self.allocs.iter().filter_map(|a| of(a, 64).map(|v| (*a, v, of(a, 8)))).collect();
        if cg.is_empty() {
            return;
        }
        let _ = writeln!(md, "\n## Fast-path guard: instructions per 64 B alloc+free pair (callgrind)\n");
        let _ = writeln!(
            md,
            "`valgrind --tool=callgrind` on `goheap-bench callgrind-pair64 N` (and `callgrind-pair8 N`) for N \
             and 2N pairs; the difference over N, so start-up does not count. Deterministic: a change of the \
             fast path shows here whatever the machine's load. The 8 B pair is goheap's tiny path (requests of \
             8 bytes and less, packed into 16-byte blocks), where the peers use an 8 or 16-byte size class.\n"
        );
        let _ = writeln!(
            md,
            "| allocator | instructions / 64 B pair | goheap / peer | instructions / 8 B pair | goheap / peer |\n\
             |---|---:|---:|---:|---:|"
        );
        let g = cg.iter().find(|c| c.0 == "goheap").map(|c| c.1).unwrap_or(f64::NAN);
        let g8 = cg.iter().find(|c| c.0 == "goheap").and_then(|c| c.2);
        for (a, v, v8) in &cg {
            let (c8, r8) = match (v8, g8) {
                (Some(v8), Some(g8)) => (format!("{v8:.1}"), fmt_ratio(g8 / v8)),
                (Some(v8), None) => (format!("{v8:.1}"), "—".to_string()),
                _ => ("—".to_string(), "—".to_string()),
            };
            let _ = writeln!(md, "| {a} | {v:.1} | {} | {c8} | {r8} |", fmt_ratio(g / v));
        }
    }

    /// One subsection per workload: its table, and the memory tables of the workloads that have them.
    fn per_workload(&self, md: &mut String) {
        let _ = writeln!(md, "\n## Per workload\n");
        let _ = writeln!(
            md,
            "ns/op is wall time per operation; for multi-threaded workloads, wall time × threads / all operations \
             (the per-thread cost while running in parallel). Medians and min–max over the repetitions (n). Peak \
             RSS is the process's ru_maxrss (the whole group's process, which ran the workloads listed before it \
             too).\n"
        );
        for (w, what) in WORKLOADS {
            if !self.workloads.contains(w) {
                continue;
            }
            let _ = writeln!(md, "### {w}\n\n{what}.\n");
            self.workload_table(md, w);
            let has_live = self.allocs.iter().any(|a| self.t.stat(w, a, "live_bytes").is_some());
            if has_live && *w != "frag" {
                self.held_against_live(md, w);
            }
            if *w == "frag" {
                self.frag_give_back(md, w);
            }
            let _ = writeln!(md);
        }
    }

    /// A workload's main table: time, CPU time and peak RSS per allocator (latency percentiles for
    /// latency-8t, the pipeline floor where measured).
    fn workload_table(&self, md: &mut String, w: &str) {
        let t = &self.t;
        let lat = w == "latency-8t";
        let floor = self.allocs.iter().any(|a| t.stat(w, a, "floor_ns_per_op").is_some());
        let mut h = "| allocator | ns/op median | min–max | n | goheap/peer | CPU ns/op median | CPU goheap/peer | \
                     peak RSS MiB | RSS goheap/peer |"
            .to_string();
        let mut s = "|---|---:|---:|---:|---:|---:|---:|---:|---:|".to_string();
        if lat {
            h.push_str(" p50 ns | p99 ns | p99.9 ns | max ns |");
            s.push_str("---:|---:|---:|---:|");
        }
        if floor {
            h.push_str(" pipeline floor ns/op (same process) |");
            s.push_str("---:|");
        }
        let _ = writeln!(md, "{h}\n{s}");
        let g_rss = t.stat(w, "goheap", "peak_rss_kb");
        for a in &self.allocs {
            let Some(st) = t.stat(w, a, "ns_per_op") else {
                continue;
            };
            let rss = t.stat(w, a, "peak_rss_kb");
            let star = if t.partial(w, a) { " (capped)" } else { "" };
            let r = if *a == "goheap" { "".into() } else { self.ratio(w, a).map(fmt_ratio).unwrap_or("–".into()) };
            let rr = match (g_rss, rss) {
                (Some(g), Some(x)) if *a != "goheap" => fmt_ratio(g.med / x.med),
                _ => "".into(),
            };
            let cpu = t.stat(w, a, "cpu_ns_per_op").map(|x| fmt_num(x.med)).unwrap_or_default();
            let cr =
                if *a == "goheap" { "".into() } else { self.cpu_ratio(w, a).map(fmt_ratio).unwrap_or("–".into()) };
            let mut row = format!(
                "| {a}{star} | {} | {}–{} | {} | {r} | {cpu} | {cr} | {} | {rr} |",
                fmt_num(st.med),
                fmt_num(st.min),
                fmt_num(st.max),
                st.n,
                rss.map(|x| mib(x.med)).unwrap_or_default()
            );
            if floor {
                let _ =
                    write!(row, " {} |", t.stat(w, a, "floor_ns_per_op").map(|x| fmt_num(x.med)).unwrap_or_default());
            }
            if lat {
                for k in ["p50_ns", "p99_ns", "p999_ns", "max_ns"] {
                    let _ = write!(row, " {} |", t.stat(w, a, k).map(|x| fmt_num(x.med)).unwrap_or_default());
                }
            }
            let _ = writeln!(md, "{row}");
        }
    }

    /// Memory held against live bytes at the workload's live point.
    fn held_against_live(&self, md: &mut String, w: &str) {
        let t = &self.t;
        let _ = writeln!(
            md,
            "\nHeld against live, at the workload's live point (all objects still allocated): live = bytes the \
             benchmark holds; RSS = the process's resident set then. For goheap, its own MemStats: \
             heap_inuse (pages of in-use spans), heap_sys − heap_released (pages held from the OS), \
             heap_alloc (its live bytes, class-rounded).\n"
        );
        let _ = writeln!(
            md,
            "| allocator | live MiB | RSS MiB | RSS / live | goheap heap_inuse MiB | held (sys − released) MiB | heap_alloc MiB | held / live |\n|---|---:|---:|---:|---:|---:|---:|---:|"
        );
        for a in &self.allocs {
            let Some(live) = t.stat(w, a, "live_bytes") else { continue };
            let rss = t.stat(w, a, "rss_live_kb").map(|x| x.med * 1024.0).unwrap_or(f64::NAN);
            let f = |k: &str| t.stat(w, a, k).map(|x| x.med).unwrap_or(f64::NAN);
            let held = f("gh_heap_sys") - f("gh_heap_released");
            let _ = writeln!(
                md,
                "| {a} | {} | {} | {} | {} | {} | {} | {} |",
                mib_of_bytes(live.med),
                mib_of_bytes(rss),
                fmt_ratio(rss / live.med),
                mib_of_bytes(f("gh_heap_inuse")),
                mib_of_bytes(held),
                mib_of_bytes(f("gh_heap_alloc")),
                if held.is_finite() { fmt_ratio(held / live.med) } else { "".into() }
            );
        }
    }

    /// frag: RSS against live bytes after freeing 90%, after each allocator's give-back.
    fn frag_give_back(&self, md: &mut String, w: &str) {
        let t = &self.t;
        let _ = writeln!(
            md,
            "\nRSS against live bytes after freeing 90% (medians; MiB). goheap only: \"1 step\": one \
             `background(usize::MAX, usize::MAX)` (sweep every class, scavenge without byte budget); \
             \"scavenger ran\": that step repeated until the scavenger's window of recent in-use peaks has \
             moved past the pre-free peak (what the `Hosted::start_background` thread does over that many \
             periods). \"after trim\": the allocator's own give-back call where it has one (goheap \
             `release_all()`, glibc `malloc_trim(0)`, mimalloc `mi_collect(true)`, jemalloc \
             `arena.<all>.purge`). goheap held = heap_sys − heap_released from its MemStats.\n"
        );
        let _ = writeln!(
            md,
            "| allocator | filled | live | RSS full | RSS after free | 1 step | scavenger ran | after trim | trim | \
             after-trim RSS / live | goheap held: after free / scavenger ran / trim |\n\
             |---|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|"
        );
        for a in &self.allocs {
            let f = |k: &str| t.stat(w, a, k).map(|x| x.med).unwrap_or(f64::NAN);
            let mb = mib_of_bytes;
            let kb = |x: f64| mb(x * 1024.0);
            let trim = t.recs(w, a).first().and_then(|r| text(r, "trim")).unwrap_or("");
            let held = |p: &str| f(&format!("{p}gh_heap_sys")) - f(&format!("{p}gh_heap_released"));
            let star = if t.partial(w, a) { " (capped)" } else { "" };
            let _ = writeln!(
                md,
                "| {a}{star} | {} | {} | {} | {} | {} | {} | {} | {trim} | {} | {} |",
                mb(f("filled_bytes")),
                mb(f("live_bytes")),
                kb(f("rss_full_kb")),
                kb(f("rss_after_free_kb")),
                kb(f("rss_after_background_kb")),
                kb(f("rss_after_scavenger_kb")),
                kb(f("rss_after_trim_kb")),
                fmt_ratio(f("rss_after_trim_kb") * 1024.0 / f("live_bytes")),
                if held("after_free_").is_finite() {
                    format!(
                        "{} / {} / {}",
                        mb(held("after_free_")),
                        mb(held("after_scavenger_")),
                        mb(held("after_trim_"))
                    )
                } else {
                    "".into()
                }
            );
        }
    }

    /// The runs killed at the time limit or failing, if any.
    fn unfinished_runs(&self, md: &mut String) {
        if self.errors.is_empty() {
            return;
        }
        let _ = writeln!(md, "## Runs that did not finish\n");
        let _ = writeln!(
            md,
            "A run killed at the time limit or failing is not repeated for that allocator; its missing \
             workloads have no entry above.\n"
        );
        let _ = writeln!(md, "| group | allocator | repetition | what happened |\n|---|---|---:|---|");
        for r in &self.errors {
            let _ = writeln!(
                md,
                "| {} | {} | {} | {} |",
                text(r, "group").unwrap_or("?"),
                text(r, "alloc").unwrap_or("?"),
                num(r, "rep").map(|x| x as i64 + 1).unwrap_or(0),
                text(r, "error").unwrap_or("").replace('|', "\\|")
            );
        }
        let _ = writeln!(md);
    }
}

/// Bytes in MiB with one decimal, or empty if not a number.
fn mib_of_bytes(x: f64) -> String {
    if x.is_finite() {
        format!("{:.1}", x / (1 << 20) as f64)
    } else {
        String::new()
    }
}

/// Colours of the peers in the chart.
const COLOURS: &[&str] =
    &["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#17becf"];

/// A dot plot of goheap/peer ratios per workload on a log2 axis, written by hand: plotters would have to be
/// a dependency of xtask (not ours to change) and needs a font stack for text; SVG text needs none.
fn chart(rows: &[(String, Vec<(String, f64)>)], peers: &[&str]) -> String {
    let (lo, hi) = (-4.0f64, 4.0f64); // log2 range: 1/16 .. 16
    let (left, right, top, row_h) = (150.0, 30.0, 60.0, 22.0);
    let width = 900.0;
    let plot_w = width - left - right;
    let height = top + row_h * rows.len() as f64 + 50.0;
    let x = |r: f64| left + (r.log2().clamp(lo, hi) - lo) / (hi - lo) * plot_w;
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="{left}" y="18" font-size="14" font-weight="bold">goheap / peer, median time per op (log scale; left of 1: goheap faster)</text>"#
    );
    // Legend.
    let mut lx = left;
    for (i, p) in peers.iter().enumerate() {
        let c = COLOURS[i % COLOURS.len()];
        let _ = writeln!(
            s,
            r#"<circle cx="{}" cy="36" r="5" fill="{c}"/><text x="{}" y="40">{p}</text>"#,
            lx + 5.0,
            lx + 13.0
        );
        lx += 13.0 + 8.0 * p.len() as f64 + 16.0;
    }
    // Grid.
    let bottom = top + row_h * rows.len() as f64;
    for e in (lo as i32)..=(hi as i32) {
        let r = 2f64.powi(e);
        let gx = x(r);
        let (col, w) = if e == 0 { ("#000", 1.5) } else { ("#ddd", 1.0) };
        let _ =
            writeln!(s, r#"<line x1="{gx}" y1="{top}" x2="{gx}" y2="{bottom}" stroke="{col}" stroke-width="{w}"/>"#);
        let label = if e >= 0 { format!("{}", 1u64 << e) } else { format!("1/{}", 1u64 << -e) };
        let _ = writeln!(s, r#"<text x="{gx}" y="{}" text-anchor="middle">{label}</text>"#, bottom + 16.0);
    }
    let gx = x(1.25);
    let _ = writeln!(
        s,
        r##"<line x1="{gx}" y1="{top}" x2="{gx}" y2="{bottom}" stroke="#c00" stroke-width="1" stroke-dasharray="4 3"/>"##
    );
    let _ = writeln!(
        s,
        r#"<text x="{}" y="{}" text-anchor="middle">goheap / peer (values outside 1/16..16 drawn at the edge; dashed: 1.25)</text>"#,
        left + plot_w / 2.0,
        bottom + 34.0
    );
    for (i, (w, pts)) in rows.iter().enumerate() {
        let y = top + row_h * (i as f64 + 0.5);
        if i % 2 == 0 {
            let _ = writeln!(
                s,
                r##"<rect x="{left}" y="{}" width="{plot_w}" height="{row_h}" fill="#f4f4f4" opacity="0.6"/>"##,
                y - row_h / 2.0
            );
        }
        let _ = writeln!(s, r#"<text x="{}" y="{}" text-anchor="end">{w}</text>"#, left - 8.0, y + 4.0);
        for (p, r) in pts {
            let k = peers.iter().position(|x| x == p).unwrap_or(0);
            let c = COLOURS[k % COLOURS.len()];
            let _ = writeln!(
                s,
                r#"<circle cx="{:.1}" cy="{y}" r="4.5" fill="{c}" fill-opacity="0.85"><title>{w}: goheap/{p} = {r:.2}</title></circle>"#,
                x(*r)
            );
        }
    }
    s.push_str("</svg>\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_bench_lines() {
        let r = parse_line(r#"{"workload":"pair-64","alloc":"goheap","threads":1,"ns_per_op":4.25,"partial":false}"#)
            .unwrap();
        assert_eq!(text(&r, "workload"), Some("pair-64"));
        assert_eq!(num(&r, "ns_per_op"), Some(4.25));
        assert_eq!(r.get("partial"), Some(&Val::Bool(false)));
        assert_eq!(parse_line(&to_line(&r)), Some(r));
    }

    #[test]
    fn medians() {
        assert_eq!(median(&mut [3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&mut [4.0, 1.0, 2.0, 3.0]), 2.5);
    }

    #[test]
    fn kernel_flag_goes_to_the_kernel_bench() {
        let args = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        // Its own usage and usage errors, answered before anything is built or booted; host-only options
        // are not taken with --kernel.
        assert_eq!(main(&args(&["--kernel", "--help"])), ExitCode::SUCCESS);
        assert_eq!(main(&args(&["--kernel", "--cpus", "0"])), ExitCode::from(EXIT_ERROR));
        assert_eq!(main(&args(&["--only", "pair", "--kernel"])), ExitCode::from(EXIT_ERROR));
    }
}
