//! `GOMEMLIMIT` and `GODEBUG` read by `goheap::Hosted` at its first allocation: each test runs this test
//! binary again as a child process (`env_child`) with the variables set, and checks their effect from the
//! child's report, its stderr or how it died.
#![cfg(feature = "std")]

use std::alloc::{GlobalAlloc, Layout};
use std::process::{Command, Output};

#[global_allocator]
static GLOBAL: goheap::Hosted = goheap::Hosted::new();

/// The child: does what `GOHEAP_ENV_CHILD` says and prints one `RESULT` line. A no-op in a normal run.
#[test]
fn env_child() {
    let Ok(mode) = std::env::var("GOHEAP_ENV_CHILD") else { return };
    let src = GLOBAL.heap().source();
    match mode.as_str() {
        "report" => {
            // 1 MiB of 64-byte objects: about 1 MiB / rate samples.
            let keep: Vec<Box<[u8; 64]>> = (0..16_384).map(|_| Box::new([1u8; 64])).collect();
            let samples: u64 = GLOBAL.profile().iter().map(|b| b.samples).sum();
            drop(keep);
            println!(
                "RESULT limit={} guard={} hard={} lazy={} samples={}",
                GLOBAL.heap().memory_limit(),
                GLOBAL.debug_flags().contains(goheap::DebugFlags::EFENCE),
                src.hard_decommit(),
                src.lazy_free(),
                samples
            );
        }
        "overrun" => {
            let l = Layout::from_size_align(100, 8).unwrap();
            // SAFETY (test): a valid layout; the writes past the object are the point: they must fault.
            unsafe {
                let p = GLOBAL.alloc(l);
                assert!(!p.is_null());
                println!("RESULT allocated {p:p}; overrunning");
                for i in 0..8192 {
                    p.add(l.size() + i).write_volatile(0xEE);
                }
            }
            println!("RESULT no fault");
        }
        "maps" => {
            let l = Layout::from_size_align(64 << 20, 8).unwrap();
            // SAFETY (test): valid layout; freed once.
            let p = unsafe { GLOBAL.alloc(l) } as usize;
            assert!(p != 0);
            // SAFETY (test): allocated just above with `l`.
            unsafe { GLOBAL.dealloc(p as *mut u8, l) };
            let released = GLOBAL.release_all();
            let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
            let perms = maps
                .lines()
                .find_map(|line| {
                    let mut f = line.split_whitespace();
                    let (range, perms) = (f.next()?, f.next()?);
                    let (lo, hi) = range.split_once('-')?;
                    let (lo, hi) = (usize::from_str_radix(lo, 16).ok()?, usize::from_str_radix(hi, 16).ok()?);
                    (lo <= p + (1 << 20) && p + (1 << 20) < hi).then(|| perms.to_string())
                })
                .unwrap_or_default();
            println!("RESULT released={} perms={perms}", released >= 64 << 20);
        }
        "zeroed" => {
            let l = Layout::from_size_align(8 << 20, 8).unwrap();
            // SAFETY (test): valid layouts; each block freed once.
            unsafe {
                let p = GLOBAL.alloc(l);
                assert!(!p.is_null());
                p.write_bytes(0xAB, l.size());
                GLOBAL.dealloc(p, l);
                GLOBAL.release_all();
                let q = GLOBAL.alloc_zeroed(l);
                assert!(!q.is_null());
                let zero = std::slice::from_raw_parts(q, l.size()).iter().all(|&b| b == 0);
                // Bytes of the new block that were the old one's (the page allocator may start it lower).
                let (a, b) = (p as usize, q as usize);
                let overlap = (a + l.size()).min(b + l.size()).saturating_sub(a.max(b));
                println!("RESULT lazy={} overlap={overlap} zero={zero}", src.lazy_free());
                GLOBAL.dealloc(q, l);
            }
        }
        "clock" => {
            let l = Layout::from_size_align(32 << 20, 8).unwrap();
            // SAFETY (test): valid layout; freed once.
            unsafe {
                let p = GLOBAL.alloc(l);
                assert!(!p.is_null());
                p.write_bytes(1, l.size());
                GLOBAL.dealloc(p, l);
            }
            let released = GLOBAL.release_all();
            println!("RESULT released={} cpu_nanos={}", released, GLOBAL.heap().stats().scavenge_cpu_nanos);
        }
        other => panic!("unknown child mode {other}"),
    }
}

/// Runs `env_child` in `mode` with `vars` set (and `GOMEMLIMIT`/`GODEBUG` cleared unless given).
fn child(mode: &str, vars: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args(["env_child", "--exact", "--nocapture", "--test-threads=1"])
        .env("GOHEAP_ENV_CHILD", mode)
        .env_remove("GOMEMLIMIT")
        .env_remove("GODEBUG");
    for (k, v) in vars {
        cmd.env(k, v);
    }
    cmd.output().unwrap()
}

/// The child's `RESULT` line, as `key=value` pairs; panics with its output if it failed.
fn result(out: &Output) -> std::collections::BTreeMap<String, String> {
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "child failed: {:?}\n{stdout}\n{}", out.status, String::from_utf8_lossy(&out.stderr));
    let line = stdout.lines().find_map(|l| l.split_once("RESULT ").map(|(_, r)| r)).expect("no RESULT line");
    line.split_whitespace().filter_map(|kv| kv.split_once('=')).map(|(k, v)| (k.into(), v.into())).collect()
}

fn goheap_lines(out: &Output) -> Vec<String> {
    String::from_utf8_lossy(&out.stderr).lines().filter(|l| l.starts_with("goheap:")).map(String::from).collect()
}

#[test]
fn gomemlimit_and_memprofilerate_from_the_environment() {
    let out = child("report", &[("GOMEMLIMIT", "512MiB"), ("GODEBUG", "gctrace=1,nosuchkey=x,memprofilerate=4096")]);
    let r = result(&out);
    assert_eq!(r["limit"], (512usize << 20).to_string());
    let samples: u64 = r["samples"].parse().unwrap();
    assert!((64..=1024).contains(&samples), "{samples} samples for 1 MiB at 4 KiB: memprofilerate not applied");
    assert_eq!(goheap_lines(&out), Vec::<String>::new(), "unknown keys must be ignored silently");

    let r = result(&child("report", &[("GOMEMLIMIT", "1073741824"), ("GODEBUG", "memprofilerate=0")]));
    assert_eq!((r["limit"].as_str(), r["samples"].as_str()), ("1073741824", "0"));
    assert_eq!((r["guard"].as_str(), r["hard"].as_str(), r["lazy"].as_str()), ("false", "false", "false"));

    let r = result(&child("report", &[]));
    assert_eq!(r["limit"], usize::MAX.to_string(), "no GOMEMLIMIT: no limit");
    let r = result(&child("report", &[("GOMEMLIMIT", "off")]));
    assert_eq!(r["limit"], usize::MAX.to_string());
}

#[test]
fn malformed_values_are_reported_and_ignored() {
    for bad in ["12XB", "1.5GiB", "-1", "99999999999TiB", "9223372036854775808", "512 MiB"] {
        let out = child("report", &[("GOMEMLIMIT", bad), ("GODEBUG", "harddecommit=yes,memprofilerate=4096")]);
        let r = result(&out);
        assert_eq!(r["limit"], usize::MAX.to_string(), "GOMEMLIMIT={bad} was not ignored");
        assert_eq!(r["hard"], "false");
        assert!(r["samples"] != "0", "the valid setting after a bad one was not applied");
        let lines = goheap_lines(&out);
        assert_eq!(lines.len(), 2, "{lines:?}");
        assert!(lines[0].starts_with(&format!("goheap: GOMEMLIMIT={bad} is malformed")), "{lines:?}");
        assert_eq!(lines[1], "goheap: GODEBUG harddecommit=yes: not an integer; ignored");
    }
}

#[test]
fn harddecommit_makes_released_memory_inaccessible() {
    let r = result(&child("maps", &[("GODEBUG", "harddecommit=1")]));
    assert_eq!((r["released"].as_str(), r["perms"].as_str()), ("true", "---p"), "{r:?}");
    let r = result(&child("report", &[("GODEBUG", "harddecommit=1")]));
    assert_eq!(r["hard"], "true");
}

#[test]
fn madvdontneed_0_releases_lazily_and_alloc_zeroed_still_zeroes() {
    let r = result(&child("zeroed", &[("GODEBUG", "madvdontneed=0")]));
    assert_eq!(r["lazy"], "true");
    let overlap: usize = r["overlap"].parse().unwrap();
    assert!(overlap >= 1 << 20, "the block's memory was not reused ({overlap} B): the test checks nothing");
    assert_eq!(r["zero"], "true", "alloc_zeroed returned old bytes of memory released with MADV_FREE");
    let r = result(&child("zeroed", &[("GODEBUG", "madvdontneed=1")]));
    assert_eq!((r["lazy"].as_str(), r["zero"].as_str()), ("false", "true"));
}

#[test]
fn efence_puts_a_guard_page_after_each_object() {
    use std::os::unix::process::ExitStatusExt;
    let r = result(&child("report", &[("GODEBUG", "efence=1")]));
    assert_eq!((r["guard"].as_str(), r["hard"].as_str()), ("true", "true"));
    let out = child("overrun", &[("GODEBUG", "efence=1")]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("RESULT allocated"), "{stdout}");
    assert!(!stdout.contains("RESULT no fault"), "an overrun past an efence object did not fault");
    assert_eq!(out.status.signal(), Some(libc::SIGSEGV), "{:?}", out.status);
}

#[test]
fn scavtrace_prints_gos_line_on_stderr() {
    let scav_lines = |out: &Output| -> Vec<String> {
        String::from_utf8_lossy(&out.stderr).lines().filter(|l| l.starts_with("scav ")).map(String::from).collect()
    };
    let on = child("maps", &[("GODEBUG", "scavtrace=1")]);
    assert_eq!(result(&on)["released"], "true");
    let lines = scav_lines(&on);
    // release_all (Go's FreeOSMemory) ends in "(forced)"; Go's format: KiB figures and a utilisation.
    let forced = lines.iter().find(|l| l.ends_with(" (forced)")).unwrap_or_else(|| panic!("no forced line: {lines:?}"));
    let words: Vec<&str> = forced.split_whitespace().collect();
    assert_eq!(words[0], "scav");
    assert_eq!(&words[2..5], ["KiB", "work", "(bg),"], "{forced}");
    assert_eq!(&words[6..9], ["KiB", "work", "(eager),"], "{forced}");
    assert_eq!(&words[10..12], ["KiB", "now,"], "{forced}");
    assert!(words[12].ends_with('%') && words[13] == "util", "{forced}");
    assert!(words[9].parse::<u64>().unwrap() >= 64 << 10, "64 MiB released, now {forced}");
    assert!(goheap_lines(&on).is_empty(), "{:?}", goheap_lines(&on));
    let off = child("maps", &[]);
    assert_eq!(result(&off)["released"], "true");
    assert!(scav_lines(&off).is_empty(), "scavtrace is off by default: {:?}", scav_lines(&off));
}

/// `Hosted` gives the scavenger a clock (Go paces its scavenger by time and reports its CPU time): the time
/// `release_all` spent decommitting is counted.
#[test]
fn hosted_scavenger_has_a_clock() {
    let r = result(&child("clock", &[]));
    assert!(r["released"].parse::<u64>().unwrap() >= 32 << 20, "{r:?}");
    assert!(r["cpu_nanos"].parse::<u64>().unwrap() > 0, "no scavenger CPU time counted: {r:?}");
}
