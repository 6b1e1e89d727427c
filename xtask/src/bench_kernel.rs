//! `cargo xtask bench --kernel`: goheap against `linked_list_allocator` and talc heaps of the same size,
//! inside the demo kernel in QEMU, at 1 and 4 CPUs (issue 7's second half).
//!
//! 1. Builds the demo kernel in release without goheap's `checks` feature (kernel-demo's default feature,
//!    kept on for `run` and `test`: the must-panic test kernels rely on it), and a UEFI image whose kernel
//!    arguments are `--bench` (see `kernel-demo/src/kbench.rs` for the workloads and the method).
//! 2. Boots it once per CPU count (`-smp 1`, `-smp 4`, TCG, 512 MiB); the kernel runs every workload on
//!    goheap and on fresh peer heaps, interleaved, and prints one `KBENCH {json}` line per run.
//! 3. Writes the lines (plus a line describing the run) to `bench/results/kernel.jsonl` and regenerates
//!    `BENCHMARKS.md`, whose "Kernel (QEMU)" section [`section`] builds from that file: goheap/peer ratios
//!    of the median cycles per operation, per workload and CPU count. The host report
//!    (`cargo xtask bench`, `--report-only`) includes the same section from the committed file.
//!
//! A run with other settings (`--cpus`, `--quick`, fewer than 5 repetitions, `--checks`) writes its lines
//! and a KERNEL.md with the section to `target/bench/report/` instead, leaving the published files alone.

use crate::bench::{load_average, machine, median, num, parse_line, text, to_line, Record, Val};
use crate::kernel::KernelBuilder;
use crate::qemu::{self, Firmware, Outcome, QemuOptions};
use crate::{proc, root, say, setup, EXIT_ERROR};
use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

pub const USAGE: &str = "\
usage: cargo xtask bench --kernel [--icount] [--no-latency] [--cpus N,...] [--reps N] [--quick] [--checks]
                                  [--timeout SECS] [--report-only]

Boots the demo kernel (release, `-- --bench`) in QEMU once per CPU count and measures goheap against
linked_list_allocator and talc heaps of the same size (64 MiB) in the same boot, repetitions interleaved.
Writes bench/results/kernel.jsonl and regenerates BENCHMARKS.md (its \"Kernel (QEMU)\" section).

  --icount        boot with QEMU's `-icount shift=0`: the TSC advances by one per guest instruction, so the
                  figures are instructions per operation, repeatable from run to run; results go to
                  bench/results/kernel-icount.jsonl (default 3 repetitions)
  --no-latency    skip the interrupt-latency boots (a second kernel built with kernel-demo's `irq-latency`
                  feature, booted with `--bench --bench-latency` at each CPU count: goheap alone, every
                  interrupts-off section inside goheap timed, per call kind)
  --cpus N,...    CPU counts, one boot each (default 1,4)
  --reps N        interleaved repetitions per boot (default 7; 3 with --icount)
  --quick         smoke run: a tenth of the operations, 2 repetitions
  --checks        build goheap with its `checks` feature (every free verified), as `cargo xtask run` does
  --timeout SECS  kill a boot after SECS seconds (default 360)
  --report-only   regenerate BENCHMARKS.md from bench/results/kernel.jsonl and latest.jsonl
  (--cpus other than 1,4, --quick, --reps below 5 and --checks write to target/bench/report/ instead)

Takes about 2-3 minutes here once built (the 4-CPU boot most of it).
";

/// The published configuration's CPU counts, its repetitions, and the fewest a published run may have
/// (under `-icount` every repetition after the first gives nearly the same count: fewer suffice).
const DEFAULT_CPUS: &[u32] = &[1, 4];
const DEFAULT_REPS: usize = 7;
const MIN_PUBLISHED_REPS: usize = 5;
const DEFAULT_ICOUNT_REPS: usize = 3;
const MIN_PUBLISHED_ICOUNT_REPS: usize = 3;
/// QEMU's arguments for instruction counting: virtual time advances 2^0 ns per instruction, so the TSC
/// (which follows virtual time) counts instructions.
const ICOUNT_ARGS: &[&str] = &["-icount", "shift=0"];
/// Memory of each boot: the kernel, goheap's working sets and one 64 MiB peer heap at a time.
const MEM: &str = "512M";
/// The prefix of the kernel's result lines on serial.
const PREFIX: &str = "KBENCH ";
/// The peers, as the kernel names them.
const PEERS: &[&str] = &["llalloc", "talc"];
/// What each kernel workload does (kernel-demo/src/kbench.rs), for the report.
const WORKLOADS: &[(&str, &str)] = &[
    ("pair-64", "alloc + free of one 64 B block, repeated"),
    ("batch-fifo-64", "1000 × 64 B allocated, then freed first-in-first-out"),
    ("batch-lifo-64", "1000 × 64 B allocated, then freed last-in-first-out"),
    (
        "wset",
        "random working set of 1024 slots per CPU, 8 B–4 KiB log-uniform (1 in 64: 4–32 KiB); an empty slot \
         is filled, a full one freed or replaced",
    ),
    (
        "prodcons-64",
        "CPU k allocates 64 B blocks and passes them through a ring of 4096 slots to CPU k+1, which checks and \
         frees them (every free remote; 2 CPUs or more)",
    ),
];

#[derive(Debug, Clone, PartialEq)]
struct Opts {
    cpus: Vec<u32>,
    reps: usize,
    quick: bool,
    checks: bool,
    timeout: Duration,
    report_only: bool,
    icount: bool,
    latency: bool,
}

impl Opts {
    /// Whether this run's results replace the published ones.
    fn published(&self) -> bool {
        let min = if self.icount { MIN_PUBLISHED_ICOUNT_REPS } else { MIN_PUBLISHED_REPS };
        self.cpus == DEFAULT_CPUS && self.reps >= min && !self.quick && !self.checks && self.latency
    }

    /// The kernel arguments of a latency boot (one repetition of goheap's runs, then the latency phase).
    fn latency_args(&self) -> Vec<String> {
        let mut a = vec!["--bench".to_string(), "--bench-latency".into(), "--bench-reps=1".into()];
        if self.quick || self.icount {
            a.push("--bench-quick".into());
        }
        a
    }

    /// QEMU's extra arguments.
    fn qemu_extra(&self) -> Vec<String> {
        if self.icount {
            ICOUNT_ARGS.iter().map(|s| s.to_string()).collect()
        } else {
            Vec::new()
        }
    }

    /// The kernel arguments of a bench boot. Under `-icount` the runs are a tenth as long (the kernel's
    /// `--bench-quick`): a count per operation is exact after a few thousand operations, and emulation with
    /// `-icount` is slower.
    fn kernel_args(&self) -> Vec<String> {
        let mut a = vec!["--bench".to_string(), format!("--bench-reps={}", self.reps)];
        if self.quick || self.icount {
            a.push("--bench-quick".into());
        }
        a
    }
}

/// Parses the options after `cargo xtask bench` (`--kernel` itself is accepted and ignored). `Ok(None)`:
/// help was asked for.
fn parse(args: &[String]) -> Result<Option<Opts>, String> {
    let mut o = Opts {
        cpus: DEFAULT_CPUS.to_vec(),
        reps: DEFAULT_REPS,
        quick: false,
        checks: false,
        timeout: Duration::from_secs(360),
        report_only: false,
        icount: false,
        latency: true,
    };
    let mut reps = None;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut val = || it.next().cloned().ok_or_else(|| format!("{a} needs a value"));
        match a.as_str() {
            "--kernel" => {}
            "--cpus" => {
                let v = val()?;
                let mut cpus = Vec::new();
                for c in v.split(',') {
                    let n: u32 = c.trim().parse().map_err(|_| format!("--cpus {v}: {c:?} is not a CPU count"))?;
                    if !(1..=16).contains(&n) {
                        return Err(format!("--cpus {v}: {n} is outside 1..=16 (the kernel bench's limit)"));
                    }
                    if !cpus.contains(&n) {
                        cpus.push(n);
                    }
                }
                o.cpus = cpus;
            }
            "--reps" => {
                let v = val()?;
                let n: usize = v.parse().map_err(|_| format!("--reps {v}: not a number"))?;
                if !(1..=31).contains(&n) {
                    return Err(format!("--reps {v}: must be 1..=31"));
                }
                reps = Some(n);
            }
            "--quick" => o.quick = true,
            "--checks" => o.checks = true,
            "--timeout" => {
                let v = val()?;
                let s: u64 = v.parse().map_err(|_| format!("--timeout {v}: not a number of seconds"))?;
                o.timeout = Duration::from_secs(s);
            }
            "--report-only" => o.report_only = true,
            "--icount" => o.icount = true,
            "--no-latency" => o.latency = false,
            "-h" | "--help" => return Ok(None),
            other => return Err(format!("unknown option {other:?} (with --kernel)")),
        }
    }
    o.reps = reps.unwrap_or(if o.quick {
        2
    } else if o.icount {
        DEFAULT_ICOUNT_REPS
    } else {
        DEFAULT_REPS
    });
    Ok(Some(o))
}

pub fn main(args: &[String]) -> ExitCode {
    let o = match parse(args) {
        Ok(Some(o)) => o,
        Ok(None) => {
            print!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("cargo xtask bench --kernel: {e}\n\n{USAGE}");
            return ExitCode::from(EXIT_ERROR);
        }
    };
    let r = if o.report_only { regenerate() } else { run(&o) };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("cargo xtask bench --kernel: {e}");
            ExitCode::from(EXIT_ERROR)
        }
    }
}

/// The published results file (TCG timing).
fn results_path(root: &Path) -> PathBuf {
    root.join("bench").join("results").join("kernel.jsonl")
}

/// The published results file of `--icount` (instruction counts).
fn icount_path(root: &Path) -> PathBuf {
    root.join("bench").join("results").join("kernel-icount.jsonl")
}

/// Regenerates BENCHMARKS.md from the committed host and kernel results (the host report's
/// `--report-only`, which includes [`section`]).
fn regenerate() -> Result<(), String> {
    if crate::bench::main(&["--report-only".to_string()]) == ExitCode::SUCCESS {
        Ok(())
    } else {
        Err("regenerating BENCHMARKS.md failed (see above)".into())
    }
}

fn run(o: &Opts) -> Result<(), String> {
    let root = root();
    let t_all = Instant::now();
    let load_before = load_average();
    let tools = setup::ensure()?;
    say!("set-up: {}", tools.describe());
    let kb = KernelBuilder::new(&tools.kernel);
    let t_build = Instant::now();
    let tool = kb.build_image_tool()?;
    let features: &[&str] = if o.checks { &["checks"] } else { &[] };
    let kernel = kb.build_demo_with_features(true, features, "kernel-demo-kbench")?;
    // Separate names per mode, so a TCG and an -icount run can share the build directory.
    let tag = if o.icount { "-icount" } else { "" };
    let image = kb.make_image(&tool, &kernel, &format!("kbench{tag}"), Firmware::Uefi, &o.kernel_args())?;
    let build_secs = t_build.elapsed().as_secs_f64();

    let mut lines: Vec<Record> = Vec::new();
    let mut boot_secs = Vec::new();
    for &cpus in &o.cpus {
        let opts = QemuOptions {
            firmware: Firmware::Uefi,
            smp: cpus,
            mem: MEM.into(),
            timeout: o.timeout,
            extra: o.qemu_extra(),
        };
        say!(
            "kernel bench: booting with {cpus} CPU(s), {} repetitions{} (timeout {} s)",
            o.reps,
            if o.icount { ", -icount shift=0" } else { "" },
            o.timeout.as_secs()
        );
        let t = Instant::now();
        let (outcome, output) = qemu::run(&tools, &image, &opts)?;
        let secs = t.elapsed().as_secs_f64();
        if outcome != Outcome::Success {
            return Err(format!("the {cpus}-CPU boot failed: {}; nothing written", outcome.describe()));
        }
        let mut recs = collect(&output, cpus)?;
        for r in recs.iter_mut().filter(|r| r.contains_key("meta")) {
            r.insert("boot_secs".into(), Val::Num(secs.round()));
        }
        say!("kernel bench: {cpus} CPU(s): {} runs in {}", recs.len() - 2, proc::fmt_duration(t.elapsed()));
        boot_secs.push((cpus, secs));
        lines.extend(recs);
    }

    // The latency boots: a kernel whose goheap provider times every interrupts-off section.
    let mut latency_secs = Vec::new();
    if o.latency {
        let t_build = Instant::now();
        let mut features = features.to_vec();
        features.push("irq-latency");
        let kernel = kb.build_demo_with_features(true, &features, "kernel-demo-kbench-lat")?;
        let image = kb.make_image(&tool, &kernel, &format!("kbench-lat{tag}"), Firmware::Uefi, &o.latency_args())?;
        say!("kernel bench: latency kernel built in {}", proc::fmt_duration(t_build.elapsed()));
        for &cpus in &o.cpus {
            let opts = QemuOptions {
                firmware: Firmware::Uefi,
                smp: cpus,
                mem: MEM.into(),
                timeout: o.timeout,
                extra: o.qemu_extra(),
            };
            say!("kernel bench: latency boot with {cpus} CPU(s)");
            let t = Instant::now();
            let (outcome, output) = qemu::run(&tools, &image, &opts)?;
            let secs = t.elapsed().as_secs_f64();
            if outcome != Outcome::Success {
                return Err(format!("the {cpus}-CPU latency boot failed: {}; nothing written", outcome.describe()));
            }
            let recs = latency_records(collect(&output, cpus)?);
            say!("kernel bench: latency, {cpus} CPU(s): {} lines in {}", recs.len(), proc::fmt_duration(t.elapsed()));
            latency_secs.push((cpus, secs));
            lines.extend(recs);
        }
    }

    let mut meta = Record::new();
    meta.insert("run".into(), Val::Bool(true));
    meta.insert("args".into(), Val::Str(std::env::args().skip(1).collect::<Vec<_>>().join(" ")));
    for (k, v) in machine() {
        if ["nproc", "CPU", "date (UTC)"].contains(&k.as_str()) {
            meta.insert(format!("machine {k}"), Val::Str(v));
        }
    }
    meta.insert("qemu".into(), Val::Str(qemu_version(&tools.qemu)));
    for (name, version) in crate::bench::locked_versions(
        &root.join("kernel-demo").join("Cargo.lock"),
        &["linked_list_allocator", "talc", "spinning_top"],
    ) {
        meta.insert(format!("version {name}"), Val::Str(version));
    }
    meta.insert("goheap_source".into(), Val::Str(goheap_source(&root)));
    meta.insert("kernel_rustc".into(), Val::Str(tools.kernel.version.clone()));
    meta.insert("mem".into(), Val::Str(MEM.into()));
    meta.insert("load_before".into(), Val::Str(load_before));
    meta.insert("load_after".into(), Val::Str(load_average()));
    meta.insert("build_secs".into(), Val::Num(build_secs.round()));
    for (cpus, secs) in &boot_secs {
        meta.insert(format!("boot_secs_{cpus}"), Val::Num(secs.round()));
    }
    for (cpus, secs) in &latency_secs {
        meta.insert(format!("latency_boot_secs_{cpus}"), Val::Num(secs.round()));
    }
    meta.insert("icount".into(), Val::Bool(o.icount));
    meta.insert("total_secs".into(), Val::Num(t_all.elapsed().as_secs_f64().round()));
    let mut all = vec![meta];
    all.extend(lines);

    if o.icount {
        // Repeatability: the counts against the published -icount run's (any configuration may check).
        if let Ok(prev) = std::fs::read_to_string(icount_path(&root)) {
            let prev: Vec<Record> = prev.lines().filter_map(parse_line).collect();
            let check = crate::kbench_report::repeat_check(&prev, &all);
            say!("kernel bench: {check}");
            all[0].insert("repeat_check".into(), Val::Str(check));
        }
    }
    if o.published() {
        let path = if o.icount { icount_path(&root) } else { results_path(&root) };
        let text: String = all.iter().map(|r| to_line(r) + "\n").collect();
        std::fs::create_dir_all(path.parent().expect("has a parent")).map_err(|e| e.to_string())?;
        std::fs::write(&path, text).map_err(|e| format!("{}: {e}", path.display()))?;
        say!("wrote {}", path.display());
        regenerate()?;
    } else {
        let dir = root.join("target").join("bench").join("report");
        std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
        let (jsonl, md) = (dir.join("kernel.jsonl"), dir.join("KERNEL.md"));
        let text: String = all.iter().map(|r| to_line(r) + "\n").collect();
        std::fs::write(&jsonl, text).map_err(|e| format!("{}: {e}", jsonl.display()))?;
        let raw = "target/bench/report/kernel.jsonl";
        let body = if o.icount {
            crate::kbench_report::icount_section(&all, &[], raw) + &crate::kbench_report::latency_section(&all, &[])
        } else {
            section_from(&all, raw) + &crate::kbench_report::latency_section(&[], &all)
        };
        std::fs::write(&md, body).map_err(|e| format!("{}: {e}", md.display()))?;
        say!(
            "not the published configuration: wrote {} and {} (BENCHMARKS.md untouched)",
            jsonl.display(),
            md.display()
        );
    }
    if o.icount {
        print!("{}", crate::kbench_report::icount_tables(&all));
    } else {
        print!("{}", table(&Runs::from_records(&all)));
    }
    say!("kernel bench done in {}", proc::fmt_duration(t_all.elapsed()));
    Ok(())
}

/// Which goheap was measured: the commit, and the goheap files that differ from it in the working tree
/// (read-only git commands; "?" without git).
fn goheap_source(root: &Path) -> String {
    let git = |args: &[&str]| {
        Command::new("git")
            .current_dir(root)
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    let Some(commit) = git(&["rev-parse", "--short=12", "HEAD"]) else { return "?".into() };
    let changed = git(&["diff", "--name-only", "HEAD", "--", "src", "Cargo.toml"]).unwrap_or_default();
    let changed: Vec<&str> = changed.lines().collect();
    if changed.is_empty() {
        format!("commit {commit}")
    } else {
        format!("commit {commit} with uncommitted changes to {}", changed.join(", "))
    }
}

fn qemu_version(qemu: &Path) -> String {
    Command::new(qemu)
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).lines().next().map(|l| l.trim().to_string()))
        .unwrap_or_default()
}

/// The kernel's result lines in a boot's serial output, checked: a meta line and a done line for `cpus`
/// CPUs, and every run line from that many CPUs.
fn collect(output: &str, cpus: u32) -> Result<Vec<Record>, String> {
    let mut recs = Vec::new();
    for line in output.lines() {
        let Some(at) = line.find(PREFIX) else { continue };
        let json = &line[at + PREFIX.len()..];
        let rec = parse_line(json).ok_or_else(|| format!("unreadable result line from the kernel: {line:?}"))?;
        if num(&rec, "cpus") != Some(cpus as f64) {
            return Err(format!(
                "the kernel ran on {} CPU(s), not the {cpus} QEMU was given (an AP failed to start?): {line:?}",
                num(&rec, "cpus").map_or("?".into(), |c| c.to_string())
            ));
        }
        recs.push(rec);
    }
    if !recs.iter().any(|r| r.contains_key("meta")) {
        return Err(format!("no `{PREFIX}{{\"meta\":...}}` line in the {cpus}-CPU boot's output"));
    }
    if !recs.iter().any(|r| r.contains_key("done")) {
        return Err(format!("the {cpus}-CPU boot ended without its `{PREFIX}{{\"done\":...}}` line"));
    }
    Ok(recs)
}

/// Whether a record comes from a latency boot (see [`latency_records`]).
pub(crate) fn is_latency(r: &Record) -> bool {
    text(r, "boot") == Some("latency")
}

/// A latency boot's records, kept for the report: its goheap runs are dropped (the timing provider
/// slows them, so they are not comparable), the rest is tagged `"boot":"latency"`.
fn latency_records(recs: Vec<Record>) -> Vec<Record> {
    recs.into_iter()
        .filter(|r| !r.contains_key("workload"))
        .map(|mut r| {
            r.insert("boot".into(), Val::Str("latency".into()));
            r
        })
        .collect()
}

/// One run of one workload on one heap, from a `KBENCH` line.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Run {
    pub(crate) cpus: u32,
    pub(crate) workload: String,
    pub(crate) alloc: String,
    pub(crate) rep: u32,
    /// TSC cycles per operation (of the slowest CPU's time, over all CPUs' operations).
    pub(crate) cost: f64,
    pub(crate) capped: bool,
}

/// All runs of a results file, plus its description lines.
pub(crate) struct Runs {
    pub(crate) runs: Vec<Run>,
    /// The `{"run":true}` line (empty if absent).
    pub(crate) meta: Record,
    /// The kernel's meta lines, one per boot.
    pub(crate) boots: Vec<Record>,
}

impl Runs {
    pub(crate) fn from_records(recs: &[Record]) -> Self {
        let recs: Vec<&Record> = recs.iter().filter(|r| !is_latency(r)).collect();
        let mut runs = Vec::new();
        for r in recs.iter().copied() {
            let (Some(cpus), Some(w), Some(a), Some(rep), Some(cycles), Some(ops)) =
                (num(r, "cpus"), text(r, "workload"), text(r, "alloc"), num(r, "rep"), num(r, "cycles"), num(r, "ops"))
            else {
                continue;
            };
            if ops <= 0.0 {
                continue;
            }
            runs.push(Run {
                cpus: cpus as u32,
                workload: w.to_string(),
                alloc: a.to_string(),
                rep: rep as u32,
                cost: cycles / ops,
                capped: r.get("capped") == Some(&Val::Bool(true)),
            });
        }
        let meta = recs.iter().find(|r| r.contains_key("run")).map(|r| (*r).clone()).unwrap_or_default();
        let boots = recs.iter().filter(|r| r.contains_key("meta")).map(|r| (*r).clone()).collect();
        Runs { runs, meta, boots }
    }

    /// CPU counts, ascending.
    pub(crate) fn cpus(&self) -> Vec<u32> {
        self.runs.iter().map(|r| r.cpus).collect::<BTreeSet<_>>().into_iter().collect()
    }

    /// Workloads in the order the kernel ran them.
    pub(crate) fn workloads(&self) -> Vec<&str> {
        let mut v: Vec<&str> = Vec::new();
        for r in &self.runs {
            if !v.contains(&r.workload.as_str()) {
                v.push(&r.workload);
            }
        }
        v
    }

    fn of<'a>(&'a self, cpus: u32, w: &'a str, a: &'a str) -> impl Iterator<Item = &'a Run> + 'a {
        self.runs.iter().filter(move |r| r.cpus == cpus && r.workload == w && r.alloc == a)
    }

    /// goheap against `peer` on `w` at `cpus` CPUs.
    pub(crate) fn cell(&self, cpus: u32, w: &str, peer: &str) -> Option<Cell> {
        let g: Vec<&Run> = self.of(cpus, w, "goheap").collect();
        let p: Vec<&Run> = self.of(cpus, w, peer).collect();
        if g.is_empty() || p.is_empty() {
            return None;
        }
        let gm = median(&mut g.iter().map(|r| r.cost).collect::<Vec<_>>());
        let pm = median(&mut p.iter().map(|r| r.cost).collect::<Vec<_>>());
        // Per repetition (its runs ran back to back): the spread of the ratio.
        let per_rep: Vec<f64> =
            g.iter().filter_map(|gr| p.iter().find(|pr| pr.rep == gr.rep).map(|pr| gr.cost / pr.cost)).collect();
        let lo = per_rep.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = per_rep.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        Some(Cell {
            ratio: gm / pm,
            lo,
            hi,
            n: g.len().min(p.len()),
            capped: g.iter().chain(p.iter()).any(|r| r.capped),
        })
    }

    /// Whether any run of `peer` at `cpus` CPUs was capped.
    fn peer_capped(&self, cpus: u32, peer: &str) -> bool {
        self.runs.iter().any(|r| r.cpus == cpus && r.alloc == peer && r.capped)
    }
}

/// goheap/peer for one workload and CPU count.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Cell {
    /// Ratio of the medians (goheap / peer; < 1: goheap faster).
    pub(crate) ratio: f64,
    /// Smallest and largest ratio of one repetition's pair of runs.
    lo: f64,
    hi: f64,
    /// Repetitions with both sides.
    n: usize,
    /// A run of either side hit the time cap.
    capped: bool,
}

impl Cell {
    pub(crate) fn show(&self) -> String {
        let star = if self.capped { "*" } else { "" };
        if self.lo.is_finite() && self.hi.is_finite() {
            format!("{:.2}{star} ({:.2}–{:.2})", self.ratio, self.lo, self.hi)
        } else {
            format!("{:.2}{star}", self.ratio)
        }
    }
}

/// The ratio table: a row per workload, a column per (CPU count, peer).
fn table(runs: &Runs) -> String {
    let cpus = runs.cpus();
    let mut s = String::from("| workload |");
    let mut sep = String::from("|---|");
    for c in &cpus {
        for p in PEERS {
            let _ = write!(s, " {c} CPU{}: goheap/{p} |", if *c == 1 { "" } else { "s" });
            sep.push_str("---:|");
        }
    }
    let _ = writeln!(s, " reps |\n{sep}---:|");
    for w in runs.workloads() {
        let _ = write!(s, "| {w} |");
        let mut n = usize::MAX;
        for c in &cpus {
            for p in PEERS {
                match runs.cell(*c, w, p) {
                    Some(cell) => {
                        n = n.min(cell.n);
                        let _ = write!(s, " {} |", cell.show());
                    }
                    None => s.push_str(" – |"),
                }
            }
        }
        let _ = writeln!(s, " {} |", if n == usize::MAX { "–".to_string() } else { n.to_string() });
    }
    s
}

/// The "Kernel (QEMU)" section of BENCHMARKS.md from the committed `bench/results/kernel.jsonl`; empty if
/// there is none.
pub fn section(root: &Path) -> String {
    let read = |p: PathBuf| -> Vec<Record> {
        std::fs::read_to_string(p).map(|t| t.lines().filter_map(parse_line).collect()).unwrap_or_default()
    };
    let tcg = read(results_path(root));
    let icount = read(icount_path(root));
    let mut md = section_from(&tcg, "bench/results/kernel.jsonl");
    md.push_str(&crate::kbench_report::icount_section(&icount, &tcg, "bench/results/kernel-icount.jsonl"));
    md.push_str(&crate::kbench_report::latency_section(&icount, &tcg));
    md
}

/// The section from the records of one `--kernel` run, whose raw lines are at `raw` (repository-relative).
fn section_from(recs: &[Record], raw: &str) -> String {
    let runs = Runs::from_records(recs);
    if runs.runs.is_empty() {
        return String::new();
    }
    let m = &runs.meta;
    let mtext = |k: &str| text(m, k).unwrap_or("?").to_string();
    let mnum = |k: &str| num(m, k).map_or("?".to_string(), |v| format!("{v}"));
    let boot = |k: &str| -> String {
        let v: Vec<String> = runs
            .boots
            .iter()
            .map(|b| {
                let val = match b.get(k) {
                    Some(Val::Num(x)) => format!("{x}"),
                    Some(Val::Bool(x)) => if *x { "on" } else { "off" }.to_string(),
                    Some(Val::Str(x)) => x.clone(),
                    None => "?".into(),
                };
                format!(
                    "{val} ({} CPU{})",
                    num(b, "cpus").unwrap_or(0.0),
                    if num(b, "cpus") == Some(1.0) { "" } else { "s" }
                )
            })
            .collect();
        v.join(", ")
    };
    let heap_mib = runs.boots.first().and_then(|b| num(b, "heap_mib")).map_or("?".into(), |v| v.to_string());
    let cpus = runs.cpus();

    let mut md = String::new();
    let _ = writeln!(md, "\n## Kernel (QEMU): goheap against linked_list_allocator and talc in the demo kernel\n");
    let _ = writeln!(
        md,
        "Generated by `cargo xtask {}`; raw lines: `{raw}`; kernel side: \
         `kernel-demo/src/kbench.rs`, runner: `xtask/src/bench_kernel.rs`. The demo kernel (release build) \
         booted in QEMU once per CPU count. In each boot every workload ran on all CPUs at once, through the \
         kernel's global allocator routed to goheap (the kernel heap), to a linked_list_allocator heap or to a \
         talc heap, the two peer heaps {heap_mib} MiB each, set up fresh for each run in one allocation from \
         goheap. Repetitions are interleaved (repetition 1: goheap, llalloc, talc; repetition 2: llalloc, \
         talc, goheap; …). A run's time is the longest of its CPUs' TSC times (each CPU times its own part, \
         between barriers); under QEMU's TCG the TSC follows the host clock, and the virtual CPUs are host \
         threads sharing this machine's {} cores with its other load, so only **ratios of medians from the \
         same boot** are reported. A CPU with nothing to do (at a barrier, or in prodcons-64 with its ring \
         full and nothing to take) halts until another CPU pokes it with an IPI, so waiting CPUs leave the \
         host's cores to the working ones.\n",
        text(m, "args").unwrap_or("bench --kernel"),
        mtext("machine nproc"),
    );
    let _ = writeln!(md, "| | |\n|---|---|");
    let _ = writeln!(md, "| date (UTC) | {} |", mtext("machine date (UTC)"));
    let _ = writeln!(
        md,
        "| host | {}, {} cores; load average before / after: {} / {} |",
        mtext("machine CPU"),
        mtext("machine nproc"),
        mtext("load_before"),
        mtext("load_after")
    );
    let _ = writeln!(md, "| QEMU | {}, TCG, UEFI (OVMF), `-m {}` |", mtext("qemu"), mtext("mem"));
    let _ = writeln!(md, "| kernel toolchain | {} |", mtext("kernel_rustc"));
    let _ = writeln!(md, "| goheap | {} |", mtext("goheap_source"));
    let _ = writeln!(md, "| goheap `checks` (every free verified) | {} |", boot("checks"));
    let version = |c: &str| text(m, &format!("version {c}")).map_or(String::new(), |v| format!(" {v}"));
    let _ = writeln!(
        md,
        "| peer heaps, {heap_mib} MiB each | llalloc = `linked_list_allocator::LockedHeap` (linked_list_allocator{}); \
         talc = `talc::Talck<spinning_top::RawSpinlock, ErrOnOom>` (talc{}, spinning_top{}), as in the host \
         benchmark |",
        version("linked_list_allocator"),
        version("talc"),
        version("spinning_top")
    );
    let _ = writeln!(
        md,
        "| repetitions (done) | {} |",
        runs.boots
            .iter()
            .map(|b| {
                let c = num(b, "cpus").unwrap_or(0.0);
                let done = recs
                    .iter()
                    .find(|r| r.contains_key("done") && num(r, "cpus") == Some(c) && !is_latency(r))
                    .and_then(|r| num(r, "reps"));
                format!("{} ({c} CPU{})", done.map_or("?".into(), |d| d.to_string()), if c == 1.0 { "" } else { "s" })
            })
            .collect::<Vec<_>>()
            .join(", ")
    );
    let _ = writeln!(
        md,
        "| time cap per run and CPU | {} ms |",
        runs.boots.first().and_then(|b| num(b, "cap_ms")).map_or("?".into(), |v| v.to_string())
    );
    let boots: Vec<String> = cpus
        .iter()
        .map(|c| format!("{c} CPU{}: {} s", if *c == 1 { "" } else { "s" }, mnum(&format!("boot_secs_{c}"))))
        .collect();
    let _ = writeln!(
        md,
        "| wall time of the command | {} s (build {} s; boots {}) |\n",
        mnum("total_secs"),
        mnum("build_secs"),
        boots.join(", ")
    );

    let _ = writeln!(
        md,
        "**goheap / peer, median TSC cycles per operation** (an operation is an allocation and its free; **< 1: \
         goheap faster**). In brackets the range of the per-repetition ratios (each repetition's runs ran back \
         to back). `*`: at least one run of either side hit the time cap, and its cost is over the operations it \
         got through.\n"
    );
    md.push_str(&table(&runs));

    // In words, at the largest CPU count: how many times goheap's time each peer takes.
    if let Some(&top) = cpus.last() {
        let _ = writeln!(md);
        for p in PEERS {
            let v: Vec<String> = runs
                .workloads()
                .iter()
                .filter_map(|w| runs.cell(top, w, p).map(|c| format!("{w} {:.1}×", 1.0 / c.ratio)))
                .collect();
            if !v.is_empty() {
                let _ = writeln!(
                    md,
                    "- At {top} CPU{}, {p} takes this many times goheap's time per operation: {}{}.",
                    if top == 1 { "" } else { "s" },
                    v.join(", "),
                    if runs.peer_capped(top, p) { " (capped rows: over the operations done)" } else { "" }
                );
            }
        }
    }

    // The harness's share: the empty allocator's time bounds any allocator's factor over llalloc.
    if let Some(&top) = cpus.last() {
        let med = |w: &str, a: &str| {
            let mut v: Vec<f64> = runs.of(top, w, a).map(|r| r.cost).collect();
            (!v.is_empty()).then(|| median(&mut v))
        };
        let v: Vec<String> = runs
            .workloads()
            .iter()
            .filter_map(|w| {
                let (e, l, g) = (med(w, "empty")?, med(w, "llalloc")?, med(w, "goheap")?);
                (e > 0.0).then(|| format!("{w} {:.0}% of goheap's time (ceiling {:.1}×)", 100.0 * e / g, l / e))
            })
            .collect();
        if !v.is_empty() {
            let _ = writeln!(
                md,
                "- At {top} CPU{}, the harness alone (the empty allocator through the same loop) takes: {}. No \
                 allocator can be more times faster than llalloc than the ceiling (llalloc's time over the \
                 harness's), so the goal below is judged net of the harness.",
                if top == 1 { "" } else { "s" },
                v.join(", ")
            );
        }
    }

    let _ = writeln!(md, "\nWorkloads (operations per CPU per run, from goheap's uncapped runs):\n");
    for w in runs.workloads() {
        let what = WORKLOADS.iter().find(|x| x.0 == w).map_or("", |x| x.1);
        let mut per_cpu: Vec<f64> = recs
            .iter()
            .filter(|r| text(r, "workload") == Some(w) && text(r, "alloc") == Some("goheap"))
            .filter(|r| r.get("capped") != Some(&Val::Bool(true)))
            .filter_map(|r| Some(num(r, "ops")? / num(r, "cpus")?))
            .collect();
        let ops = if per_cpu.is_empty() { String::new() } else { format!(" ({:.0} per CPU)", median(&mut per_cpu)) };
        let _ = writeln!(md, "- `{w}`{ops}: {what}.");
    }
    md
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn parses_options() {
        let o = parse(&s(&["--kernel"])).unwrap().unwrap();
        assert_eq!(
            (o.cpus.as_slice(), o.reps, o.quick, o.checks, o.report_only),
            (DEFAULT_CPUS, 7, false, false, false)
        );
        assert!(o.published());
        assert_eq!(o.kernel_args(), s(&["--bench", "--bench-reps=7"]));
        assert!(parse(&s(&["--kernel", "--reps", "5"])).unwrap().unwrap().published());

        let o = parse(&s(&["--kernel", "--cpus", "2,4,2", "--reps", "7", "--checks"])).unwrap().unwrap();
        assert_eq!((o.cpus.clone(), o.reps, o.checks), (vec![2, 4], 7, true));
        assert!(!o.published());

        let q = parse(&s(&["--kernel", "--quick"])).unwrap().unwrap();
        assert_eq!(q.reps, 2);
        assert!(!q.published());
        assert_eq!(q.kernel_args(), s(&["--bench", "--bench-reps=2", "--bench-quick"]));
        assert_eq!(parse(&s(&["--kernel", "--quick", "--reps", "3"])).unwrap().unwrap().reps, 3);
        assert!(!parse(&s(&["--kernel", "--reps", "4"])).unwrap().unwrap().published());
        assert_eq!(parse(&s(&["--kernel", "--timeout", "90"])).unwrap().unwrap().timeout, Duration::from_secs(90));

        // -icount: 3 repetitions published, runs a tenth as long, QEMU counts instructions.
        let i = parse(&s(&["--kernel", "--icount"])).unwrap().unwrap();
        assert_eq!((i.reps, i.icount, i.latency), (3, true, true));
        assert!(i.published());
        assert_eq!(i.kernel_args(), s(&["--bench", "--bench-reps=3", "--bench-quick"]));
        assert_eq!(i.qemu_extra(), s(&["-icount", "shift=0"]));
        assert_eq!(i.latency_args(), s(&["--bench", "--bench-latency", "--bench-reps=1", "--bench-quick"]));
        assert!(!parse(&s(&["--kernel", "--icount", "--reps", "2"])).unwrap().unwrap().published());
        // TCG: no extra QEMU arguments, full-length runs; without the latency boots nothing is published.
        let t = parse(&s(&["--kernel"])).unwrap().unwrap();
        assert!(t.qemu_extra().is_empty());
        assert_eq!(t.latency_args(), s(&["--bench", "--bench-latency", "--bench-reps=1"]));
        assert!(!parse(&s(&["--kernel", "--no-latency"])).unwrap().unwrap().published());

        assert_eq!(parse(&s(&["--kernel", "--help"])), Ok(None));
        for bad in [
            &["--cpus", "0"][..],
            &["--cpus", "17"],
            &["--cpus", "x"],
            &["--reps", "0"],
            &["--reps"],
            &["--only", "pair"],
        ] {
            assert!(parse(&s(bad)).is_err(), "{bad:?} accepted");
        }
    }

    const OUTPUT: &str = "\x1b[2Jfirmware noise\r\n\
        kbench: 2 CPU(s) ...\r\n\
        KBENCH {\"meta\":true,\"cpus\":2,\"checks\":false,\"reps\":3,\"heap_mib\":64,\"cap_ms\":1500,\"quick\":false}\r\n\
        KBENCH {\"cpus\":2,\"workload\":\"pair-64\",\"alloc\":\"goheap\",\"rep\":0,\"cycles\":1000,\"ops\":100,\"capped\":false}\n\
        KBENCH {\"done\":true,\"cpus\":2,\"reps\":3}\n\
        kbench: done\n";

    #[test]
    fn collects_the_kernel_lines() {
        let recs = collect(OUTPUT, 2).unwrap();
        assert_eq!(recs.len(), 3);
        assert_eq!(text(&recs[1], "workload"), Some("pair-64"));
        assert_eq!(num(&recs[1], "cycles"), Some(1000.0));
        // Another CPU count than QEMU was given, a missing end line, a garbled line: errors.
        assert!(collect(OUTPUT, 4).unwrap_err().contains("not the 4"));
        assert!(collect(&OUTPUT.replace("KBENCH {\"done\"", "{\"done\""), 2).unwrap_err().contains("done"));
        assert!(collect(&OUTPUT.replace("\"ops\":100,", "\"ops\":,"), 2).is_err());
        assert!(collect("nothing\n", 2).is_err());
    }

    #[test]
    fn latency_boot_records_are_tagged_and_runs_dropped() {
        let recs = collect(
            &OUTPUT.replace(
                "kbench: done",
                "KBENCH {\"lat\":true,\"cpus\":2,\"kind\":\"small-alloc\",\"section\":\"leaf\",\"count\":1,\"sum\":9,\"max\":9,\"cpu_max\":\"9,0\",\"hist\":\"0,0,0,0,1\"}",
            ),
            2,
        )
        .unwrap();
        let lat = latency_records(recs);
        // meta, done and the latency line stay; the goheap run (slowed by the timing) goes.
        assert_eq!(lat.len(), 3);
        assert!(lat.iter().all(|r| is_latency(r) && !r.contains_key("workload")));
        assert!(Runs::from_records(&lat).runs.is_empty() && Runs::from_records(&lat).boots.is_empty());
        assert_eq!(crate::kbench_report::lat_lines(&lat).len(), 1);
    }

    fn run_line(cpus: u32, w: &str, a: &str, rep: u32, cycles: u64, ops: u64, capped: bool) -> Record {
        parse_line(&format!(
            "{{\"cpus\":{cpus},\"workload\":\"{w}\",\"alloc\":\"{a}\",\"rep\":{rep},\"cycles\":{cycles},\"ops\":{ops},\"capped\":{capped}}}"
        ))
        .unwrap()
    }

    fn sample() -> Vec<Record> {
        let mut v = vec![
            parse_line("{\"run\":true,\"machine nproc\":\"2\",\"total_secs\":300}").unwrap(),
            parse_line("{\"meta\":true,\"cpus\":1,\"checks\":false,\"heap_mib\":64,\"cap_ms\":1500}").unwrap(),
            parse_line("{\"meta\":true,\"cpus\":4,\"checks\":false,\"heap_mib\":64,\"cap_ms\":1500}").unwrap(),
            parse_line("{\"done\":true,\"cpus\":1,\"reps\":3}").unwrap(),
            parse_line("{\"done\":true,\"cpus\":4,\"reps\":3}").unwrap(),
        ];
        // 4 CPUs, pair-64: goheap 10, 30, 20 cycles/op; llalloc 100, 200, 200; talc 20, 20, 20 (rep 1 capped:
        // half the operations in the same time).
        for (rep, g, l, t, tops) in
            [(0, 1000, 10_000, 2000, 100), (1, 3000, 20_000, 1000, 50), (2, 2000, 20_000, 2000, 100)]
        {
            v.push(run_line(4, "pair-64", "goheap", rep, g, 100, false));
            v.push(run_line(4, "pair-64", "llalloc", rep, l, 100, false));
            v.push(run_line(4, "pair-64", "talc", rep, t, tops, tops < 100));
        }
        // 1 CPU, wset: goheap 40 and 60 (median of two: 50); llalloc only one run: 25.
        v.push(run_line(1, "wset", "goheap", 0, 4000, 100, false));
        v.push(run_line(1, "wset", "goheap", 1, 6000, 100, false));
        v.push(run_line(1, "wset", "llalloc", 1, 2500, 100, false));
        v
    }

    #[test]
    fn ratios_of_medians() {
        let recs = sample();
        let runs = Runs::from_records(&recs);
        assert_eq!(runs.cpus(), vec![1, 4]);
        assert_eq!(runs.workloads(), vec!["pair-64", "wset"]);

        let c = runs.cell(4, "pair-64", "llalloc").unwrap();
        assert!((c.ratio - 0.1).abs() < 1e-12, "{c:?}");
        assert!((c.lo - 0.1).abs() < 1e-12 && (c.hi - 0.15).abs() < 1e-12, "{c:?}");
        assert_eq!((c.n, c.capped), (3, false));

        // talc's costs: 20, 20, 20 (the capped run did 50 ops in 1000 cycles): median 20, goheap's 20.
        let c = runs.cell(4, "pair-64", "talc").unwrap();
        assert!((c.ratio - 1.0).abs() < 1e-12, "{c:?}");
        assert!((c.lo - 0.5).abs() < 1e-12 && (c.hi - 1.5).abs() < 1e-12, "{c:?}");
        assert!(c.capped);
        assert!(runs.peer_capped(4, "talc") && !runs.peer_capped(4, "llalloc"));

        // Even count: median of 40 and 60; the per-repetition ratio only where both sides ran (rep 1).
        let c = runs.cell(1, "wset", "llalloc").unwrap();
        assert!((c.ratio - 2.0).abs() < 1e-12, "{c:?}");
        assert!((c.lo - 2.4).abs() < 1e-12 && (c.hi - 2.4).abs() < 1e-12, "{c:?}");
        assert_eq!(c.n, 1);
        // No talc runs at 1 CPU, no runs at all at 2.
        assert_eq!(runs.cell(1, "wset", "talc"), None);
        assert_eq!(runs.cell(2, "pair-64", "llalloc"), None);
    }

    #[test]
    fn report_section() {
        let md = section_from(&sample(), "bench/results/kernel.jsonl");
        assert!(md.contains("## Kernel (QEMU)"), "{md}");
        assert!(md.contains("| workload | 1 CPU: goheap/llalloc | 1 CPU: goheap/talc | 4 CPUs: goheap/llalloc | 4 CPUs: goheap/talc | reps |"), "{md}");
        assert!(md.contains("| pair-64 | – | – | 0.10 (0.10–0.15) | 1.00* (0.50–1.50) | 3 |"), "{md}");
        assert!(md.contains("| wset | 2.00 (2.40–2.40) | – | – | – | 1 |"), "{md}");
        assert!(md.contains("llalloc takes this many times goheap's time per operation: pair-64 10.0×"), "{md}");
        assert!(
            md.contains("talc takes this many times goheap's time per operation: pair-64 1.0× (capped rows"),
            "{md}"
        );
        assert!(md.contains("- `pair-64` (25 per CPU)"), "{md}");
        assert!(md.contains("| goheap `checks` (every free verified) | off (1 CPU), off (4 CPUs) |"), "{md}");
        assert!(!md.contains("the harness alone"), "no empty-allocator runs, no ceiling: {md}");
        // With the empty allocator at 4 CPUs (5 cycles/op): 25% of goheap's median 20, ceiling 200 / 5 = 40×.
        let mut with_empty = sample();
        for rep in 0..3 {
            with_empty.push(run_line(4, "pair-64", "empty", rep, 500, 100, false));
        }
        let md = section_from(&with_empty, "x");
        assert!(md.contains("the harness alone (the empty allocator through the same loop) takes: pair-64 25% of goheap's time (ceiling 40.0×)"), "{md}");
        // Nothing to report: nothing written.
        assert_eq!(section_from(&[], "x"), "");
    }

    #[test]
    fn section_reads_the_committed_file() {
        let dir = std::env::temp_dir().join(format!("goheap-kbench-test-{}", std::process::id()));
        assert_eq!(section(&dir), "");
        std::fs::create_dir_all(dir.join("bench").join("results")).unwrap();
        let text: String = sample().iter().map(|r| to_line(r) + "\n").collect();
        std::fs::write(results_path(&dir), text).unwrap();
        assert_eq!(section(&dir), section_from(&sample(), "bench/results/kernel.jsonl"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
