//! The kernel bench's instruction counts (`cargo xtask bench --kernel --icount`) and interrupt-latency
//! figures (the latency boots of `--kernel`), rendered for BENCHMARKS.md (issue 16).
//!
//! - [`icount_section`]: instructions per operation for the empty allocator (the harness's own cost),
//!   goheap, linked_list_allocator and talc, each net of the harness, their ratios beside the TCG ratios
//!   of `bench/results/kernel.jsonl`, and the goals marked met or not.
//! - [`latency_section`]: per call kind, the interrupts-off stretches inside goheap (count, mean, 99th
//!   percentile bucket, maximum, per-CPU maxima, log2 histogram), in instructions (`-icount` boots) and
//!   TSC ticks (TCG boots).
//! - [`repeat_check`]: compares two `-icount` runs' medians (the counts must repeat).

use crate::bench::{median, num, text, Record, Val};
use crate::bench_kernel::{is_latency, Runs};
use std::collections::BTreeMap;
use std::fmt::Write as _;

/// The peers, as the kernel names them.
const PEERS: &[&str] = &["llalloc", "talc"];
/// The empty allocator: the harness's own cost.
const EMPTY: &str = "empty";
/// The host fast path's instructions per 64 B pair as issue 16 states it (`callgrind-pair64` when the
/// issue was filed), and the goal: within 1.2× of it in-kernel. The current host figure is in the host
/// report's callgrind table; the goal stays at the issue's, the stricter of the two.
pub(crate) const HOST_PAIR_INSNS: f64 = 69.0;
const PAIR_GOAL_FACTOR: f64 = 1.2;

/// Median, smallest and largest cost per operation of `alloc` on `w` at `cpus` CPUs.
fn stats(runs: &Runs, cpus: u32, w: &str, alloc: &str) -> Option<(f64, f64, f64)> {
    let mut v: Vec<f64> =
        runs.runs.iter().filter(|r| r.cpus == cpus && r.workload == w && r.alloc == alloc).map(|r| r.cost).collect();
    if v.is_empty() {
        return None;
    }
    let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    Some((median(&mut v), lo, hi))
}

/// Instructions per operation of `alloc`, net of the harness (the empty allocator's median), at least 0.
fn net(runs: &Runs, cpus: u32, w: &str, alloc: &str) -> Option<f64> {
    let (m, _, _) = stats(runs, cpus, w, alloc)?;
    let (e, _, _) = stats(runs, cpus, w, EMPTY).unwrap_or((0.0, 0.0, 0.0));
    Some((m - e).max(0.0))
}

/// Net goheap / net peer on `w` at `cpus`.
fn net_ratio(runs: &Runs, cpus: u32, w: &str, peer: &str) -> Option<f64> {
    let g = net(runs, cpus, w, "goheap")?;
    let p = net(runs, cpus, w, peer)?;
    (p > 0.0).then(|| g / p)
}

fn fmt_count(x: f64) -> String {
    if x >= 100.0 {
        format!("{x:.0}")
    } else {
        format!("{x:.1}")
    }
}

/// The instruction-count tables (one per CPU count), with the TCG ratios of `tcg` beside them.
fn tables(runs: &Runs, tcg: &Runs) -> String {
    let mut md = String::new();
    for cpus in runs.cpus() {
        let _ = writeln!(md, "\n**{cpus} CPU{}**\n", if cpus == 1 { "" } else { "s" });
        md.push_str(
            "| workload | harness (empty allocator) | goheap | llalloc | talc | goheap/llalloc | goheap/talc | \
             TCG goheap/llalloc | TCG goheap/talc | spread over reps |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
        );
        for w in runs.workloads() {
            if stats(runs, cpus, w, "goheap").is_none() {
                continue;
            }
            let (e, _, _) = stats(runs, cpus, w, EMPTY).unwrap_or((0.0, 0.0, 0.0));
            let cell = |a: &str| net(runs, cpus, w, a).map_or("–".to_string(), fmt_count);
            let ratio = |p: &str| net_ratio(runs, cpus, w, p).map_or("–".to_string(), |r| format!("{r:.2}"));
            let tcg_cell = |p: &str| tcg.cell(cpus, w, p).map_or("–".to_string(), |c| c.show());
            // Largest relative spread (max - min) / median over the four allocators' repetitions.
            let spread = ["goheap", "llalloc", "talc", EMPTY]
                .iter()
                .filter_map(|a| stats(runs, cpus, w, a))
                .map(|(m, lo, hi)| if m > 0.0 { (hi - lo) / m } else { 0.0 })
                .fold(0.0f64, f64::max);
            let _ = writeln!(
                md,
                "| {w} | {} | {} | {} | {} | {} | {} | {} | {} | {:.2}% |",
                fmt_count(e),
                cell("goheap"),
                cell("llalloc"),
                cell("talc"),
                ratio("llalloc"),
                ratio("talc"),
                tcg_cell("llalloc"),
                tcg_cell("talc"),
                spread * 100.0
            );
        }
    }
    md
}

/// The tables alone, from one run's records (printed at the end of a `--icount` run).
pub(crate) fn icount_tables(recs: &[Record]) -> String {
    tables(&Runs::from_records(recs), &Runs::from_records(&[]))
}

/// One goal of issue 16, judged.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Goal {
    pub(crate) what: String,
    /// `None`: not measured in these files.
    pub(crate) met: Option<bool>,
    pub(crate) detail: String,
}

/// The kernel goals of issue 16 from an `-icount` run and a TCG run (the host-proxy goal is judged in
/// the proxy's section).
pub(crate) fn goals(icount: &Runs, tcg: &Runs) -> Vec<Goal> {
    let mut v = Vec::new();
    let limit = HOST_PAIR_INSNS * PAIR_GOAL_FACTOR;
    let pair = net(icount, 1, "pair-64", "goheap");
    v.push(Goal {
        what: format!(
            "in-kernel 64 B pair within {PAIR_GOAL_FACTOR}× of the host fast path's {HOST_PAIR_INSNS:.0} instructions \
             (the issue's figure; ≤ {limit:.1}; 1 CPU, net of the harness)"
        ),
        met: pair.map(|p| p <= limit),
        detail: pair.map_or("not measured".into(), |p| {
            format!("{} instructions ({:.2}× the issue's host figure)", fmt_count(p), p / HOST_PAIR_INSNS)
        }),
    });
    let mut worst: Option<(f64, String)> = None;
    for w in icount.workloads() {
        for p in PEERS {
            if let Some(r) = net_ratio(icount, 1, w, p) {
                if worst.as_ref().is_none_or(|(x, _)| r > *x) {
                    worst = Some((r, format!("{w} against {p}")));
                }
            }
        }
    }
    v.push(Goal {
        what: "at 1 CPU fewer instructions than both peers on every workload (-icount, net)".into(),
        met: worst.as_ref().map(|(r, _)| *r < 1.0),
        detail: worst.as_ref().map_or("not measured".into(), |(r, at)| format!("worst ratio {r:.2} ({at})")),
    });
    v.push(Goal {
        what: "aim: ≤ 0.7× both peers at 1 CPU on every workload (-icount, net)".into(),
        met: worst.as_ref().map(|(r, _)| *r <= 0.7),
        detail: worst.as_ref().map_or("not measured".into(), |(r, at)| format!("worst ratio {r:.2} ({at})")),
    });
    v.push(tcg_goal(tcg, 4));
    v
}

/// The goal "at `cpus` CPUs ≥ 10× faster than linked_list_allocator by TSC on every workload", judged per
/// workload from the TCG medians. The raw factor is llalloc's time per operation over goheap's. Both include
/// the harness (the ring, the loop, the kernel's dispatch: the empty allocator's time), which is neither
/// allocator's work and caps the raw factor at the *ceiling* llalloc / empty; so where a harness run exists
/// the workload is judged net of it ((llalloc − empty) / (goheap − empty)), as the `-icount` counts are
/// (the net factor is at least the raw one whenever goheap is the faster). A workload where goheap's median
/// is not above the empty allocator's cannot be judged (the harness's noise is larger than goheap's cost);
/// one without a harness run is judged raw.
fn tcg_goal(tcg: &Runs, cpus: u32) -> Goal {
    const FACTOR: f64 = 10.0;
    let what = format!(
        "at {cpus} CPUs ≥ {FACTOR:.0}× faster than linked_list_allocator by TSC on every workload (TCG; net of the \
         harness, the empty allocator's time, as the instruction counts are)"
    );
    let (mut parts, mut all, mut any) = (Vec::new(), true, false);
    for w in tcg.workloads() {
        let (Some((g, _, _)), Some((l, _, _))) = (stats(tcg, cpus, w, "goheap"), stats(tcg, cpus, w, "llalloc")) else {
            continue;
        };
        any = true;
        let raw = l / g;
        let ok = match stats(tcg, cpus, w, EMPTY).map(|(e, _, _)| e) {
            Some(e) if e > 0.0 => {
                let c = l / e;
                if g > e {
                    let n = (l - e) / (g - e);
                    parts.push(format!("{w} {n:.1}× net ({raw:.1}× raw, ceiling {c:.1}×)"));
                    n >= FACTOR
                } else {
                    parts.push(format!(
                        "{w} not measurable ({raw:.1}× raw, ceiling {c:.1}×: goheap within the harness's time)"
                    ));
                    false
                }
            }
            _ => {
                parts.push(format!("{w} {raw:.1}× raw (no harness run)"));
                raw >= FACTOR
            }
        };
        all &= ok;
    }
    Goal { what, met: any.then_some(all), detail: if any { parts.join("; ") } else { "not measured".into() } }
}

fn mark(met: Option<bool>) -> &'static str {
    match met {
        Some(true) => "**met**",
        Some(false) => "**not met**",
        None => "not measured",
    }
}

/// The "instructions per operation" section from an `--icount` run's records (`recs`), with the TCG
/// ratios of `tcg_recs` beside them; empty if `recs` has no runs.
pub(crate) fn icount_section(recs: &[Record], tcg_recs: &[Record], raw: &str) -> String {
    let runs = Runs::from_records(recs);
    if runs.runs.is_empty() {
        return String::new();
    }
    let tcg = Runs::from_records(tcg_recs);
    let m = &runs.meta;
    let mtext = |k: &str| text(m, k).unwrap_or("?").to_string();
    let mut md = String::new();
    let _ = writeln!(md, "\n### Kernel (QEMU -icount): instructions per operation\n");
    let _ = writeln!(
        md,
        "Generated by `cargo xtask {}`; raw lines: `{raw}`. The same kernel and workloads as above, booted \
         with QEMU's `-icount shift=0`: virtual time advances one nanosecond per guest instruction and the TSC \
         follows it, so a run's TSC delta is the number of instructions executed. At 1 CPU that is the \
         benchmark's own instructions, exactly. **At 4 CPUs the counts are not a contention measure**: with \
         `-icount` QEMU runs the virtual CPUs one at a time on one host thread, each for a slice of up to \
         0.1 s of virtual time (100 million instructions), so a CPU's part of a run mostly executes alone \
         (the figure per operation is then about a quarter of the 1-CPU count, as the run's time is one \
         CPU's and its operations four CPUs'), unless a slice switch falls inside the run: then the other \
         CPUs' slices (their spinning at a lock or barrier included) land in its count. Which repetition \
         that hits is a matter of slice placement (the spread column). prodcons-64 is the exception: a CPU \
         whose ring is full and input empty halts, and QEMU moves on to the next CPU at once, so the CPUs \
         take turns throughout and every CPU's part spans the run: its figure per operation is all CPUs' \
         instructions over all their operations (halting and waking included, in the harness column). Read the 4-CPU rows as \"the allocator's work \
         without contention\"; contention shows only in the TCG columns and the host proxy. The \
         **harness** column is the \
         empty allocator (a per-CPU bump pointer whose free does nothing, `kernel-demo/src/heap.rs`) through \
         the same loop and the kernel's global-allocator dispatch; the allocators' columns are their medians \
         **minus** that harness median, so they count the allocator (the empty allocator's own ~10 \
         instructions per operation are subtracted too, the same for each allocator). Ratios are of these net \
         counts. goheap: {}; date {}; {} repetitions per boot.\n",
        text(m, "args").unwrap_or("bench --kernel --icount"),
        mtext("goheap_source"),
        mtext("machine date (UTC)"),
        runs.boots.first().and_then(|b| num(b, "reps")).map_or("?".into(), |r| r.to_string()),
    );
    md.push_str(
        "**What each measure can and cannot show.** Instruction counts are repeatable to the instruction \
         (at 1 CPU; a second run gives the same counts, see the notes), so a 2% change is visible. They \
         weigh every instruction the same: a locked compare-and-swap, an `xchg` spin-lock acquire, a `popf` or a \
         cache miss counts as one, though on silicon a locked RMW costs about 20 cycles and a miss hundreds; \
         the peers' spin locks and goheap's `pushf`/`cli`/`popf` are thus undercharged alike, and memory \
         behaviour (working-set size, false sharing) does not show at all. The TCG ratios (in brackets the \
         range of per-repetition ratios) follow host time, so they do charge memory and host-atomic costs \
         (TCG emulates a locked guest RMW with a host atomic), but swing by 2× from run to run on this \
         loaded machine; the host proxy below measures the same workloads natively.\n",
    );
    md.push_str(&tables(&runs, &tcg));
    if let Some(check) = text(m, "repeat_check") {
        let _ = writeln!(md, "\nRepeatability: {check}.");
    }
    let _ = writeln!(md, "\n**Goals of issue 16 (kernel side)**\n\n| goal | status | measured |\n|---|---|---|");
    for g in goals(&runs, &tcg) {
        let _ = writeln!(md, "| {} | {} | {} |", g.what, mark(g.met), g.detail);
    }
    md
}

/// Compares the medians of two `-icount` runs' records: "identical", or the largest difference.
pub(crate) fn repeat_check(prev: &[Record], new: &[Record]) -> String {
    let (a, b) = (Runs::from_records(prev), Runs::from_records(new));
    let src = |r: &Runs| text(&r.meta, "goheap_source").unwrap_or("?").to_string();
    let mut n = 0;
    let mut same = 0;
    let mut worst: Option<(f64, String)> = None;
    for cpus in b.cpus() {
        for w in b.workloads() {
            for alloc in ["goheap", "llalloc", "talc", EMPTY] {
                let (Some((x, _, _)), Some((y, _, _))) = (stats(&a, cpus, w, alloc), stats(&b, cpus, w, alloc)) else {
                    continue;
                };
                n += 1;
                let d = if x > 0.0 { (y - x).abs() / x } else { 0.0 };
                if d == 0.0 {
                    same += 1;
                }
                if worst.as_ref().is_none_or(|(z, _)| d > *z) {
                    worst = Some((d, format!("{alloc} {w} at {cpus} CPU{}: {x:.2} then {y:.2}", plural(cpus))));
                }
            }
        }
    }
    let code = if src(&a) == src(&b) {
        format!("same goheap ({})", src(&b))
    } else {
        format!("goheap changed between the runs ({} then {})", src(&a), src(&b))
    };
    match worst {
        None => format!("no common figures with the previous run ({code})"),
        Some((d, at)) => format!(
            "against the previous -icount run ({code}), {same} of {n} median counts per operation are identical; \
             the largest difference is {:.3}% ({at})",
            d * 100.0
        ),
    }
}

fn plural(n: u32) -> &'static str {
    if n == 1 {
        ""
    } else {
        "s"
    }
}

/// One (kind, section) line of a latency boot.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Lat {
    pub(crate) cpus: u32,
    pub(crate) kind: String,
    pub(crate) section: String,
    pub(crate) count: f64,
    pub(crate) sum: f64,
    pub(crate) max: f64,
    pub(crate) cpu_max: Vec<u64>,
    pub(crate) hist: Vec<u64>,
}

fn numbers(s: &str) -> Vec<u64> {
    s.split(',').filter_map(|x| x.trim().parse().ok()).collect()
}

/// The latency lines of a file's records.
pub(crate) fn lat_lines(recs: &[Record]) -> Vec<Lat> {
    recs.iter()
        .filter(|r| r.get("lat") == Some(&Val::Bool(true)))
        .filter_map(|r| {
            Some(Lat {
                cpus: num(r, "cpus")? as u32,
                kind: text(r, "kind")?.to_string(),
                section: text(r, "section")?.to_string(),
                count: num(r, "count")?,
                sum: num(r, "sum")?,
                max: num(r, "max")?,
                cpu_max: numbers(text(r, "cpu_max").unwrap_or("")),
                hist: numbers(text(r, "hist").unwrap_or("")),
            })
        })
        .collect()
}

impl Lat {
    /// Upper edge of the bucket holding the `permille`-th stretch (bucket b: up to 2^b - 1).
    pub(crate) fn quantile_upper(&self, permille: u64) -> u64 {
        let total: u64 = self.hist.iter().sum();
        if total == 0 {
            return 0;
        }
        let want = (total * permille).div_ceil(1000).max(1);
        let mut seen = 0;
        for (b, &n) in self.hist.iter().enumerate() {
            seen += n;
            if seen >= want {
                return if b == 0 { 0 } else { (1u64 << b) - 1 };
            }
        }
        self.max as u64
    }

    /// The histogram's non-empty buckets: "< 2^b: n".
    pub(crate) fn hist_text(&self) -> String {
        self.hist
            .iter()
            .enumerate()
            .filter(|(_, &n)| n != 0)
            .map(|(b, n)| format!("<{}: {n}", 1u64 << b))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// What a (kind, section) row is, for people.
fn row_name(kind: &str, section: &str) -> String {
    let leaf = section == "leaf";
    let name: String = match kind {
        "small-alloc" if leaf => "small alloc, fast path".into(),
        "small-alloc" => "small alloc, refill / general path".into(),
        "small-free" if leaf => "small free, fast path".into(),
        "small-free" => "small free, general path (stock overflow to the central list)".into(),
        "large-alloc" => "large alloc (> 32 KiB, up to 64 MiB; fresh pages committed)".into(),
        "large-free" => "large free".into(),
        "realloc" => "realloc (8 B ↔ 16 MiB, doubling and halving)".into(),
        "background" => "background step (`background::step`)".into(),
        "release-all" => "`release_all`".into(),
        "set-memory-limit" => "`set_memory_limit` (limit 4 MiB above the live heap)".into(),
        "other" => format!("untagged ({section})"),
        k => format!("{k} ({section})"),
    };
    // Kinds other than small alloc/free can have leaf sections too (a small free inside a realloc, say).
    if leaf && !kind.starts_with("small-") && kind != "other" {
        format!("{name}: its fast-path sections")
    } else {
        name
    }
}

/// One table of latency lines (one boot: one mode, one CPU count).
fn lat_table(lats: &[&Lat], calls: &BTreeMap<String, f64>, unit: &str) -> String {
    let mut md = format!(
        "| call kind | sections | mean ({unit}) | 99% below ({unit}) | max ({unit}) | max per CPU | whole call, max ({unit}) | \
         histogram (bucket: sections) |\n|---|---:|---:|---:|---:|---|---:|---|\n"
    );
    for l in lats {
        let call = if l.section == "full" {
            calls.get(&l.kind).map_or("–".into(), |m| format!("{m:.0}"))
        } else {
            "–".into()
        };
        let _ = writeln!(
            md,
            "| {} | {:.0} | {:.0} | {} | {:.0} | {} | {} | {} |",
            row_name(&l.kind, &l.section),
            l.count,
            if l.count > 0.0 { l.sum / l.count } else { 0.0 },
            l.quantile_upper(990) + 1,
            l.max,
            l.cpu_max.iter().map(|x| x.to_string()).collect::<Vec<_>>().join(", "),
            call,
            l.hist_text()
        );
    }
    // Kinds measured only as whole calls (no section recorded: their work ran outside goheap's guard).
    for (k, m) in calls {
        if !lats.iter().any(|l| &l.kind == k) {
            let _ = writeln!(md, "| {} | 0 | – | – | – | – | {m:.0} | no section |", row_name(k, "full"));
        }
    }
    md
}

/// The "interrupt latency" section from the latency boots in an `-icount` file and a TCG file; empty
/// when neither has any.
pub(crate) fn latency_section(icount: &[Record], tcg: &[Record]) -> String {
    let sets = [(icount, "instructions", "-icount"), (tcg, "TSC ticks", "TCG")];
    if sets.iter().all(|(r, _, _)| lat_lines(r).is_empty()) {
        return String::new();
    }
    let mut md = String::new();
    let _ = writeln!(md, "\n### Kernel: interrupts-off stretches inside goheap, per call kind\n");
    md.push_str(
        "From the latency boots of `cargo xtask bench --kernel [--icount]`: a second demo kernel built with \
         kernel-demo's `irq-latency` feature, whose goheap CPU provider is `IrqCpus` wrapped in \
         `kernel-demo/src/irqlat.rs`'s `MeasuredCpus`: each guard reads the TSC before interrupts go off \
         and again before they come back on, and keeps, per CPU, a log2 histogram and the maximum by the call \
         kind the bench set before the call. Leaf sections are goheap's fast paths (`enter_leaf`); full \
         sections everything else (`enter`). Only a CPU's outermost section counts. The boot runs one \
         repetition of the workloads on goheap alone, then a latency phase on the first CPU (large objects \
         of 64 KiB–64 MiB, fresh after a `release_all` and reused; realloc 8 B ↔ 16 MiB; 20 000 mixed \
         frees then 64 background steps; a memory limit 4 MiB above the live heap; `release_all`), three \
         rounds. \"Whole call\" is the longest call of that kind in the latency phase, guard or not: where it \
         is far above the longest section, most of the call ran with interrupts on. Under -icount the figures \
         are instructions (at 4 CPUs a stretch into which QEMU's round-robin slice switch falls also counts \
         the other CPUs' slices, their spinning included: an upper bound); under TCG, TSC ticks of host time: a virtual CPU is a host thread that the \
         loaded host deschedules at any instruction, so TCG maxima (even of a fast path) are mostly host \
         preemption, and only the body of those histograms means anything. Bucket `<2^b` holds stretches of \
         2^(b-1) to 2^b - 1. A section on one CPU also grows while it spins on a goheap lock that another \
         CPU holds (at 4 CPUs the other CPUs' background steps wait for the heap lock while the first CPU \
         commits or releases large runs).\n",
    );
    for (recs, unit, mode) in sets {
        let lats = lat_lines(recs);
        let cpus: Vec<u32> = {
            let mut c: Vec<u32> = lats.iter().map(|l| l.cpus).collect();
            c.sort_unstable();
            c.dedup();
            c
        };
        for c in cpus {
            let rows: Vec<&Lat> = lats.iter().filter(|l| l.cpus == c).collect();
            let calls: BTreeMap<String, f64> = recs
                .iter()
                .filter(|r| r.get("call") == Some(&Val::Bool(true)) && num(r, "cpus") == Some(c as f64))
                .filter_map(|r| Some((text(r, "kind")?.to_string(), num(r, "max")?)))
                .collect();
            let tsc = recs
                .iter()
                .find(|r| is_latency(r) && r.contains_key("meta") && num(r, "cpus") == Some(c as f64))
                .and_then(|r| num(r, "tsc_per_ms"))
                .filter(|&t| t > 0.0);
            let scale = match (mode, tsc) {
                ("TCG", Some(t)) => format!(" (TSC {:.0} ticks per µs)", t / 1000.0),
                _ => String::new(),
            };
            let _ = writeln!(md, "\n**{mode}, {c} CPU{}, in {unit}{scale}**\n", plural(c));
            md.push_str(&lat_table(&rows, &calls, unit));
            if let Some(w) = rows.iter().filter(|l| l.kind != "other").max_by(|a, b| a.max.total_cmp(&b.max)) {
                let _ = writeln!(md, "\nLongest stretch: {:.0} {unit}, {}.", w.max, row_name(&w.kind, &w.section));
            }
        }
    }
    md
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::parse_line;

    fn run(cpus: u32, w: &str, a: &str, rep: u32, cycles: u64, ops: u64) -> Record {
        parse_line(&format!(
            "{{\"cpus\":{cpus},\"workload\":\"{w}\",\"alloc\":\"{a}\",\"rep\":{rep},\"cycles\":{cycles},\"ops\":{ops},\"capped\":false}}"
        ))
        .unwrap()
    }

    /// 1 CPU, pair-64: harness 30/op, goheap 100, llalloc 130, talc 90 (net 70, 100, 60); rep 1 of goheap
    /// one instruction per op more. batch: goheap 50, llalloc 230, talc 130 (net 20, 200, 100).
    fn icount_sample() -> Vec<Record> {
        let mut v = vec![
            parse_line("{\"run\":true,\"goheap_source\":\"commit abc\",\"machine date (UTC)\":\"d\"}").unwrap(),
            parse_line("{\"meta\":true,\"cpus\":1,\"reps\":2}").unwrap(),
        ];
        for rep in 0..2 {
            v.push(run(1, "pair-64", "empty", rep, 3000, 100));
            v.push(run(1, "pair-64", "goheap", rep, 10_000 + rep as u64 * 100, 100));
            v.push(run(1, "pair-64", "llalloc", rep, 13_000, 100));
            v.push(run(1, "pair-64", "talc", rep, 9000, 100));
            v.push(run(1, "batch", "empty", rep, 3000, 100));
            v.push(run(1, "batch", "goheap", rep, 5000, 100));
            v.push(run(1, "batch", "llalloc", rep, 23_000, 100));
            v.push(run(1, "batch", "talc", rep, 13_000, 100));
        }
        v
    }

    #[test]
    fn net_counts_subtract_the_harness() {
        let runs = Runs::from_records(&icount_sample());
        // goheap's median of 100 and 101 is 100.5; minus the harness's 30.
        assert_eq!(net(&runs, 1, "pair-64", "goheap"), Some(70.5));
        assert_eq!(net(&runs, 1, "pair-64", "talc"), Some(60.0));
        assert!((net_ratio(&runs, 1, "pair-64", "llalloc").unwrap() - 0.705).abs() < 1e-12);
        assert_eq!(net_ratio(&runs, 1, "batch", "talc"), Some(0.2));
        assert_eq!(net(&runs, 4, "pair-64", "goheap"), None);
        let t = tables(&runs, &Runs::from_records(&[]));
        assert!(t.contains("| pair-64 | 30.0 | 70.5 | 100 | 60.0 | 0.70 | 1.18 | – | – | 1.00% |"), "{t}");
        assert!(t.contains("| batch | 30.0 | 20.0 | 200 | 100 | 0.10 | 0.20 | – | – | 0.00% |"), "{t}");
    }

    #[test]
    fn goals_are_judged_from_the_figures() {
        let runs = Runs::from_records(&icount_sample());
        let mut tcg_recs = Vec::new();
        for rep in 0..3 {
            tcg_recs.push(run(4, "pair-64", "goheap", rep, 1000, 100));
            tcg_recs.push(run(4, "pair-64", "llalloc", rep, 12_000, 100));
            tcg_recs.push(run(4, "wset", "goheap", rep, 1000, 100));
            tcg_recs.push(run(4, "wset", "llalloc", rep, 9000, 100));
        }
        let g = goals(&runs, &Runs::from_records(&tcg_recs));
        // Pair: 70.5 ≤ 82.8: met. 1 CPU: worst ratio 1.18 (pair-64 against talc): not met, nor the aim.
        assert_eq!(g[0].met, Some(true), "{g:?}");
        assert!(g[0].detail.starts_with("70.5 instructions"), "{g:?}");
        assert_eq!(g[1].met, Some(false));
        assert!(g[1].detail.contains("1.18 (pair-64 against talc)"), "{g:?}");
        assert_eq!(g[2].met, Some(false));
        // 4 CPUs: pair 12×, wset 9× (no harness run: judged raw): not met.
        assert_eq!(g[3].met, Some(false));
        assert!(g[3].detail.contains("pair-64 12.0× raw (no harness run); wset 9.0× raw (no harness run)"), "{g:?}");
        // With harness runs every workload is judged net: wset (9000 - 800) / (1000 - 800) = 41×, though
        // 9× raw (ceiling 11.25×).
        let mut with_empty = tcg_recs.clone();
        for rep in 0..3 {
            with_empty.push(run(4, "wset", "empty", rep, 800, 100));
        }
        let g = tcg_goal(&Runs::from_records(&with_empty), 4);
        assert_eq!(g.met, Some(true), "{g:?}");
        assert!(g.detail.contains("wset 41.0× net (9.0× raw, ceiling 11.2×)"), "{g:?}");
        // Net under 10×: not met, whatever the raw factor's ceiling.
        let mut near = Vec::new();
        for rep in 0..3 {
            // Net (5000 - 1000) / (1500 - 1000) = 8×.
            near.push(run(4, "pair-64", "goheap", rep, 1500, 1));
            near.push(run(4, "pair-64", "llalloc", rep, 5000, 1));
            near.push(run(4, "pair-64", "empty", rep, 1000, 1));
        }
        let g = tcg_goal(&Runs::from_records(&near), 4);
        assert_eq!(g.met, Some(false), "{g:?}");
        assert!(g.detail.contains("pair-64 8.0× net (3.3× raw, ceiling 5.0×)"), "{g:?}");
        let mut capped = Vec::new();
        for rep in 0..3 {
            // Ceiling 2000 / 250 = 8×; net (2000 - 250) / (260 - 250) = 175×.
            capped.push(run(4, "pair-64", "goheap", rep, 260, 1));
            capped.push(run(4, "pair-64", "llalloc", rep, 2000, 1));
            capped.push(run(4, "pair-64", "empty", rep, 250, 1));
        }
        let g = tcg_goal(&Runs::from_records(&capped), 4);
        assert_eq!(g.met, Some(true), "{g:?}");
        assert!(g.detail.contains("pair-64 175.0× net (7.7× raw, ceiling 8.0×)"), "{g:?}");
        for rep in 0..3 {
            capped.push(run(4, "prodcons-64", "goheap", rep, 1700, 1));
            capped.push(run(4, "prodcons-64", "llalloc", rep, 5000, 1));
            capped.push(run(4, "prodcons-64", "empty", rep, 2700, 1));
        }
        let g = tcg_goal(&Runs::from_records(&capped), 4);
        assert_eq!(g.met, Some(false), "{g:?}");
        assert!(g.detail.contains("prodcons-64 not measurable (2.9× raw, ceiling 1.9×"), "{g:?}");
        // Nothing measured: nothing judged.
        let none = goals(&Runs::from_records(&[]), &Runs::from_records(&[]));
        assert!(none.iter().all(|g| g.met.is_none()));
        let md = icount_section(&icount_sample(), &tcg_recs, "x.jsonl");
        assert!(md.contains("| in-kernel 64 B pair within 1.2×"), "{md}");
        assert!(md.contains("**not met** | worst ratio 1.18"), "{md}");
        assert_eq!(icount_section(&[], &tcg_recs, "x"), "");
    }

    #[test]
    fn repeat_check_reports_differences() {
        let a = icount_sample();
        let same = repeat_check(&a, &a);
        assert!(same.contains("8 of 8 median counts per operation are identical"), "{same}");
        assert!(same.contains("largest difference is 0.000%"), "{same}");
        let mut b = a.clone();
        b[0].insert("goheap_source".into(), Val::Str("commit def".into()));
        // talc's batch from 130 to 143 per op: 10%.
        for r in b.iter_mut() {
            if text(r, "alloc") == Some("talc") && text(r, "workload") == Some("batch") {
                r.insert("cycles".into(), Val::Num(14_300.0));
            }
        }
        let diff = repeat_check(&a, &b);
        assert!(diff.contains("7 of 8"), "{diff}");
        assert!(diff.contains("10.000% (talc batch at 1 CPU: 130.00 then 143.00)"), "{diff}");
        assert!(diff.contains("goheap changed between the runs"), "{diff}");
        assert!(repeat_check(&[], &a).starts_with("no common figures"));
    }

    fn lat_recs() -> Vec<Record> {
        [
            "{\"meta\":true,\"cpus\":1,\"latency\":true,\"tsc_per_ms\":2000000,\"boot\":\"latency\"}",
            "{\"lat\":true,\"cpus\":1,\"kind\":\"small-alloc\",\"section\":\"leaf\",\"count\":100,\"sum\":4000,\"max\":60,\"cpu_max\":\"60\",\"hist\":\"0,0,0,0,0,0,99,1\",\"boot\":\"latency\"}",
            "{\"lat\":true,\"cpus\":1,\"kind\":\"large-alloc\",\"section\":\"full\",\"count\":4,\"sum\":90000,\"max\":70000,\"cpu_max\":\"70000\",\"hist\":\"0,0,0,0,0,0,0,0,0,0,0,1,0,1,0,1,0,1\",\"boot\":\"latency\"}",
            "{\"call\":true,\"cpus\":1,\"kind\":\"large-alloc\",\"max\":71000,\"boot\":\"latency\"}",
            "{\"call\":true,\"cpus\":1,\"kind\":\"release-all\",\"max\":900000,\"boot\":\"latency\"}",
        ]
        .iter()
        .map(|l| parse_line(l).unwrap())
        .collect()
    }

    #[test]
    fn latency_lines_and_table() {
        let recs = lat_recs();
        let lats = lat_lines(&recs);
        assert_eq!(lats.len(), 2);
        assert_eq!(lats[0].hist.len(), 8);
        // 99 of 100 in bucket 6 (32..63): the 99th percentile is below 64; the 100th in bucket 7.
        assert_eq!(lats[0].quantile_upper(990), 63);
        assert_eq!(lats[0].quantile_upper(1000), 127);
        assert_eq!(lats[0].hist_text(), "<64: 99, <128: 1");
        let md = latency_section(&[], &recs);
        assert!(md.contains("**TCG, 1 CPU, in TSC ticks (TSC 2000 ticks per µs)**"), "{md}");
        assert!(md.contains("| small alloc, fast path | 100 | 40 | 64 | 60 | 60 | – | <64: 99, <128: 1 |"), "{md}");
        assert!(md.contains("| large alloc (> 32 KiB, up to 64 MiB; fresh pages committed) | 4 | 22500 |"), "{md}");
        assert!(md.contains("| 70000 | 70000 | 71000 |"), "{md}");
        // release_all had no section (its work ran outside the guard): a row from the whole call alone.
        assert!(md.contains("| `release_all` | 0 | – | – | – | – | 900000 | no section |"), "{md}");
        assert!(md.contains("Longest stretch: 70000 TSC ticks, large alloc"), "{md}");
        assert_eq!(latency_section(&[], &[]), "");
        // Latency records never count as runs.
        assert!(Runs::from_records(&recs).runs.is_empty());
    }
}
