//! `cargo xtask bench --kproxy`: the kernel bench's workloads on the host (issue 16's real-hardware proxy).
//!
//! Builds `bench/src/bin/kproxy.rs` (binary `goheap-kproxy`, feature `kproxy`, `--cfg goheap_bench`) in
//! release, runs it once (every allocator in the one process, repetitions interleaved), writes its lines to
//! `bench/results/kproxy.jsonl` and regenerates BENCHMARKS.md, whose kernel part then includes
//! [`section`]: goheap/peer ratios of median time per operation, per workload and thread count.

use crate::bench::{load_average, machine, median, num, parse_line, text, to_line, Record, Val};
use crate::{proc, root, say, EXIT_ERROR};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::Instant;

pub const USAGE: &str = "\
usage: cargo xtask bench --kproxy [--threads N,...] [--reps N] [--quick] [--report-only]

Runs the kernel bench's workloads (pair-64, batch-fifo-64, batch-lifo-64, wset, prodcons-64) natively on
the host: goheap over MmapSource with a kernel-shaped CPU provider, linked_list_allocator and talc behind
spin locks over a 64 MiB area, and the empty allocator (the harness), all in one process, repetitions
interleaved. Writes bench/results/kproxy.jsonl and regenerates BENCHMARKS.md.

  --threads N,... thread counts (default 1,2: this machine's cores)
  --reps N        interleaved repetitions (default 11)
  --quick         a tenth of the operations, 2 repetitions; writes target/bench/report/kproxy.jsonl only
  --report-only   regenerate BENCHMARKS.md from the committed results
";

const DEFAULT_THREADS: &str = "1,2";
const DEFAULT_REPS: usize = 11;
/// The goal of issue 16 on the host proxy: goheap within this fraction of both peers' time.
const PROXY_GOAL: f64 = 0.5;
const PEERS: &[&str] = &["llalloc", "talc"];

fn results_path(root: &Path) -> PathBuf {
    root.join("bench").join("results").join("kproxy.jsonl")
}

pub fn main(args: &[String]) -> ExitCode {
    let mut threads = DEFAULT_THREADS.to_string();
    let mut reps = None;
    let mut quick = false;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--kproxy" => {}
            "--threads" => match it.next() {
                Some(v) if v.split(',').all(|t| t.trim().parse::<u32>().is_ok_and(|n| (1..=16).contains(&n))) => {
                    threads = v.clone()
                }
                _ => return usage("--threads needs thread counts 1..=16, e.g. 1,2"),
            },
            "--reps" => match it.next().and_then(|v| v.parse::<usize>().ok()).filter(|n| (1..=31).contains(n)) {
                Some(n) => reps = Some(n),
                None => return usage("--reps needs 1..=31"),
            },
            "--quick" => quick = true,
            "--report-only" => {
                return if crate::bench::main(&["--report-only".to_string()]) == ExitCode::SUCCESS {
                    ExitCode::SUCCESS
                } else {
                    ExitCode::from(EXIT_ERROR)
                };
            }
            "-h" | "--help" => {
                print!("{USAGE}");
                return ExitCode::SUCCESS;
            }
            other => return usage(&format!("unknown option {other:?} (with --kproxy)")),
        }
    }
    let reps = reps.unwrap_or(if quick { 2 } else { DEFAULT_REPS });
    match run(&threads, reps, quick) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("cargo xtask bench --kproxy: {e}");
            ExitCode::from(EXIT_ERROR)
        }
    }
}

fn usage(e: &str) -> ExitCode {
    eprintln!("cargo xtask bench --kproxy: {e}\n\n{USAGE}");
    ExitCode::from(EXIT_ERROR)
}

fn run(threads: &str, reps: usize, quick: bool) -> Result<(), String> {
    let root = root();
    let t_all = Instant::now();
    let load_before = load_average();
    let target = root.join("target").join("bench");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    say!("kproxy: building goheap-kproxy (release, --cfg goheap_bench)");
    let out = Command::new(cargo)
        .current_dir(&root)
        .env("RUSTFLAGS", "--cfg goheap_bench")
        .env("CARGO_TARGET_DIR", &target)
        .args(["build", "--release", "--quiet", "-p", "goheap-bench", "--no-default-features", "--features", "kproxy"])
        .args(["--bin", "goheap-kproxy"])
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run cargo: {e}"))?;
    if !out.status.success() {
        return Err(format!("building goheap-kproxy failed:\n{}", String::from_utf8_lossy(&out.stderr)));
    }
    let bin = target.join("release").join("goheap-kproxy");
    let mut cmd = Command::new(&bin);
    cmd.args(["--threads", threads, "--reps", &reps.to_string()]);
    if quick {
        cmd.arg("--quick");
    }
    say!("kproxy: running {} --threads {threads} --reps {reps}{}", bin.display(), if quick { " --quick" } else { "" });
    let t = Instant::now();
    let out = cmd.stdin(Stdio::null()).output().map_err(|e| format!("cannot run {}: {e}", bin.display()))?;
    if !out.status.success() {
        return Err(format!("goheap-kproxy failed ({}):\n{}", out.status, String::from_utf8_lossy(&out.stderr)));
    }
    let run_secs = t.elapsed().as_secs_f64();
    let mut recs: Vec<Record> = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        recs.push(parse_line(line).ok_or_else(|| format!("unreadable line from goheap-kproxy: {line:?}"))?);
    }
    let mut meta = Record::new();
    meta.insert("kproxy_run".into(), Val::Bool(true));
    meta.insert("args".into(), Val::Str(std::env::args().skip(1).collect::<Vec<_>>().join(" ")));
    for (k, v) in machine() {
        if ["nproc", "CPU", "date (UTC)", "rustc"].contains(&k.as_str()) {
            meta.insert(format!("machine {k}"), Val::Str(v));
        }
    }
    for (name, version) in
        crate::bench::locked_versions(&root.join("Cargo.lock"), &["linked_list_allocator", "talc", "spinning_top"])
    {
        meta.insert(format!("version {name}"), Val::Str(version));
    }
    meta.insert("load_before".into(), Val::Str(load_before));
    meta.insert("load_after".into(), Val::Str(load_average()));
    meta.insert("run_secs".into(), Val::Num(run_secs.round()));
    meta.insert("total_secs".into(), Val::Num(t_all.elapsed().as_secs_f64().round()));
    let mut all = vec![meta];
    all.extend(recs);
    let text: String = all.iter().map(|r| to_line(r) + "\n").collect();
    let published = !quick && threads == DEFAULT_THREADS && reps >= 5;
    if published {
        let path = results_path(&root);
        std::fs::write(&path, text).map_err(|e| format!("{}: {e}", path.display()))?;
        say!("wrote {}", path.display());
        if crate::bench::main(&["--report-only".to_string()]) != ExitCode::SUCCESS {
            return Err("regenerating BENCHMARKS.md failed".into());
        }
    } else {
        let dir = root.join("target").join("bench").join("report");
        std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
        std::fs::write(dir.join("kproxy.jsonl"), text).map_err(|e| e.to_string())?;
        say!("not the published configuration: wrote target/bench/report/kproxy.jsonl (BENCHMARKS.md untouched)");
    }
    print!("{}", table(&all));
    say!("kproxy done in {}", proc::fmt_duration(t_all.elapsed()));
    Ok(())
}

/// Cost per operation of each run: (threads, workload, alloc) → per repetition (rep, ns per op).
fn costs(recs: &[Record]) -> Vec<(u32, String, String, u32, f64)> {
    recs.iter()
        .filter(|r| r.get("kproxy") == Some(&Val::Bool(true)))
        .filter_map(|r| {
            let ops = num(r, "ops")?;
            (ops > 0.0).then_some((
                num(r, "threads")? as u32,
                text(r, "workload")?.to_string(),
                text(r, "alloc")?.to_string(),
                num(r, "rep")? as u32,
                num(r, "cpu_ns").or_else(|| num(r, "ns"))? / ops,
            ))
        })
        .collect()
}

/// goheap / `peer` on `w` at `t` threads: ratio of medians, and the range of per-repetition ratios.
pub(crate) fn ratio(recs: &[Record], t: u32, w: &str, peer: &str) -> Option<(f64, f64, f64)> {
    let c = costs(recs);
    let of = |a: &str| -> Vec<(u32, f64)> {
        c.iter().filter(|x| x.0 == t && x.1 == w && x.2 == a).map(|x| (x.3, x.4)).collect()
    };
    let (g, p) = (of("goheap"), of(peer));
    if g.is_empty() || p.is_empty() {
        return None;
    }
    let gm = median(&mut g.iter().map(|x| x.1).collect::<Vec<_>>());
    let pm = median(&mut p.iter().map(|x| x.1).collect::<Vec<_>>());
    let per: Vec<f64> = g.iter().filter_map(|(r, gv)| p.iter().find(|x| x.0 == *r).map(|x| gv / x.1)).collect();
    let lo = per.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = per.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    Some((gm / pm, lo, hi))
}

fn threads_and_workloads(recs: &[Record]) -> (Vec<u32>, Vec<String>) {
    let c = costs(recs);
    let mut t: Vec<u32> = c.iter().map(|x| x.0).collect();
    t.sort_unstable();
    t.dedup();
    let mut w: Vec<String> = Vec::new();
    for x in &c {
        if !w.contains(&x.1) {
            w.push(x.1.clone());
        }
    }
    (t, w)
}

fn show(r: Option<(f64, f64, f64)>) -> String {
    match r {
        Some((m, lo, hi)) if lo.is_finite() => format!("{m:.2} ({lo:.2}–{hi:.2})"),
        Some((m, _, _)) => format!("{m:.2}"),
        None => "–".into(),
    }
}

/// The ratio table: a row per workload and thread count.
pub(crate) fn table(recs: &[Record]) -> String {
    let (threads, workloads) = threads_and_workloads(recs);
    let mut md = String::from(
        "| workload | threads | goheap/llalloc | goheap/talc | empty/goheap (harness share) |\n|---|---:|---:|---:|---:|\n",
    );
    for t in &threads {
        for w in &workloads {
            let g = ratio(recs, *t, w, "empty").map(|(m, lo, hi)| (1.0 / m, 1.0 / hi, 1.0 / lo));
            if ratio(recs, *t, w, "llalloc").is_none() && ratio(recs, *t, w, "talc").is_none() {
                continue;
            }
            let _ = writeln!(
                md,
                "| {w} | {t} | {} | {} | {} |",
                show(ratio(recs, *t, w, "llalloc")),
                show(ratio(recs, *t, w, "talc")),
                show(g)
            );
        }
    }
    md
}

/// The goal "≤ 0.5× of both peers on the host proxy": met when every (workload, threads) ratio is ≤ 0.5;
/// `None` without figures. Returns the worst ratio and where.
pub(crate) fn goal(recs: &[Record]) -> Option<(bool, f64, String)> {
    let (threads, workloads) = threads_and_workloads(recs);
    let mut worst: Option<(f64, String)> = None;
    for t in &threads {
        for w in &workloads {
            for p in PEERS {
                if let Some((r, _, _)) = ratio(recs, *t, w, p) {
                    if worst.as_ref().is_none_or(|(x, _)| r > *x) {
                        worst = Some((r, format!("{w}, {t} thread{}, against {p}", if *t == 1 { "" } else { "s" })));
                    }
                }
            }
        }
    }
    worst.map(|(r, at)| (r <= PROXY_GOAL, r, at))
}

/// The host-proxy section of BENCHMARKS.md from `bench/results/kproxy.jsonl`; empty without the file.
pub fn section(root: &Path) -> String {
    let Ok(t) = std::fs::read_to_string(results_path(root)) else { return String::new() };
    let recs: Vec<Record> = t.lines().filter_map(parse_line).collect();
    section_from(&recs)
}

fn section_from(recs: &[Record]) -> String {
    if costs(recs).is_empty() {
        return String::new();
    }
    let m = recs.iter().find(|r| r.contains_key("kproxy_run")).cloned().unwrap_or_default();
    let mt = |k: &str| text(&m, k).unwrap_or("?").to_string();
    let reps = recs.iter().find(|r| r.contains_key("kproxy_meta")).and_then(|r| num(r, "reps")).unwrap_or(0.0);
    let mut md = String::new();
    let _ = writeln!(md, "\n### Kernel workloads on the host (real-hardware proxy)\n");
    let _ = writeln!(
        md,
        "Generated by `cargo xtask {}`; raw lines: `bench/results/kproxy.jsonl`; program: \
         `bench/src/bin/kproxy.rs`. The kernel bench's five workloads (same sizes, counts and seeds) run \
         natively, all allocators in one process, {reps} repetitions interleaved (rotated order), after one \
         untimed warm-up pass. goheap is `Malloc<MmapSource, KernelShaped>`: the kernel's provider \
         (`IrqCpus<GsIndex>`) with a thread-local index read inline (the kernel's `gs:` load) and a \
         thread-local \"interrupts enabled\" flag saved, cleared and restored where the kernel does \
         `pushf`/`cli`/`sti` (on silicon those cost somewhat more than these loads and stores), plus \
         `IrqCpus`' busy flags. llalloc (`linked_list_allocator::LockedHeap`) and talc (`Talck<spinning_top::\
         RawSpinlock, ErrOnOom>`) are fresh heaps over the same 64 MiB area for every run, behind their spin \
         locks, as in the kernel. Every call goes through one dispatch on a global mode, as the kernel's \
         global allocator does. Here the locks' atomics, contention and memory behaviour cost what they cost \
         on this CPU ({}, {} cores; load average before / after {} / {}; {}). A run's cost is the CPU time of \
         its threads (`CLOCK_THREAD_CPUTIME_ID`: time spent descheduled by the machine's other load does not \
         count, spinning on a lock does); reported are **goheap / peer ratios of the median CPU time per \
         operation** (< 1: goheap faster), in brackets the range of per-repetition ratios. `empty/goheap`: the empty allocator's \
         time (a bump pointer, frees do nothing) over goheap's, the share of goheap's time that is harness; \
         it is not subtracted here, because natively the bump pointer's streaming through fresh memory \
         costs cache misses that a reusing allocator does not pay (pair-64's empty run can be slower than \
         goheap's). 2 threads at most: the machine has 2 cores, and more spinning threads than cores \
         measure the scheduler.\n",
        mt("args"),
        mt("machine CPU"),
        mt("machine nproc"),
        mt("load_before"),
        mt("load_after"),
        mt("machine date (UTC)"),
    );
    md.push_str(&table(recs));
    if let Some((met, r, at)) = goal(recs) {
        let _ = writeln!(
            md,
            "\nGoal of issue 16, goheap ≤ {PROXY_GOAL}× both peers on the host proxy on every workload: **{}** \
             (worst ratio {r:.2}: {at}).",
            if met { "met" } else { "not met" }
        );
    }
    md
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(t: u32, w: &str, a: &str, rep: u32, ns: u64, ops: u64) -> Record {
        parse_line(&format!(
            "{{\"kproxy\":true,\"threads\":{t},\"workload\":\"{w}\",\"alloc\":\"{a}\",\"rep\":{rep},\"ns\":{ns},\"ops\":{ops}}}"
        ))
        .unwrap()
    }

    fn sample() -> Vec<Record> {
        let mut v = vec![
            parse_line("{\"kproxy_run\":true,\"args\":\"bench --kproxy\"}").unwrap(),
            parse_line("{\"kproxy_meta\":true,\"reps\":3}").unwrap(),
        ];
        // pair-64 at 1 thread: goheap 10, 12, 11 ns/op; llalloc 40 each; talc 20, 20, 30; empty 5.
        for (rep, g, t) in [(0, 1000, 2000), (1, 1200, 2000), (2, 1100, 3000)] {
            v.push(line(1, "pair-64", "goheap", rep, g, 100));
            v.push(line(1, "pair-64", "llalloc", rep, 4000, 100));
            v.push(line(1, "pair-64", "talc", rep, t, 100));
            v.push(line(1, "pair-64", "empty", rep, 500, 100));
        }
        v
    }

    #[test]
    fn ratios_and_goal() {
        let recs = sample();
        let (m, lo, hi) = ratio(&recs, 1, "pair-64", "llalloc").unwrap();
        assert!((m - 11.0 / 40.0).abs() < 1e-12 && (lo - 0.25).abs() < 1e-12 && (hi - 0.3).abs() < 1e-12);
        // talc: median 20; goheap 11: 0.55 > 0.5: the goal is not met, at talc.
        let (met, r, at) = goal(&recs).unwrap();
        assert!(!met && (r - 0.55).abs() < 1e-12, "{r}");
        assert_eq!(at, "pair-64, 1 thread, against talc");
        let t = table(&recs);
        assert!(t.contains("| pair-64 | 1 | 0.28 (0.25–0.30) | 0.55 (0.37–0.60) | 0.45 (0.42–0.50) |"), "{t}");
        let md = section_from(&recs);
        assert!(md.contains("**not met** (worst ratio 0.55: pair-64, 1 thread, against talc)"), "{md}");
        assert_eq!(section_from(&[]), "");
        assert!(goal(&[]).is_none());
    }
}
