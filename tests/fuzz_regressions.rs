//! The fuzz targets' inputs replayed on the host (stable, no sanitizer), through the very harness the fuzz
//! targets run (`fuzz/src`, included here): the committed seed corpus of each target, and each crash the
//! fuzzers found, minimized, as a regression case.
//!
//! Inputs run one at a time (a lock): the harness's end-of-input check flushes the cache slot another thread
//! of the input used, which it finds as the lowest free slot only when no other test claims slots meanwhile.
#![cfg(all(feature = "std", feature = "checks", feature = "validate"))]

#[path = "../fuzz/src/lib.rs"]
#[allow(dead_code)]
mod fuzz_harness;

use std::path::{Path, PathBuf};
use std::sync::Mutex;

static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz")
}

/// Every file of `fuzz/corpus/TARGET`, sorted.
fn corpus(target: &str) -> Vec<PathBuf> {
    let dir = fuzz_dir().join("corpus").join(target);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    files
}

/// Replays each file through `run`, naming the file if it fails.
fn replay(files: &[PathBuf], run: impl Fn(&[u8])) {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    for f in files {
        let data = std::fs::read(f).unwrap();
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run(&data)));
        if let Err(e) = r {
            eprintln!("fuzz input {} fails", f.display());
            std::panic::resume_unwind(e);
        }
    }
}

#[test]
fn ops_corpus_replays_clean() {
    let files = corpus("ops");
    assert!(files.len() >= 8, "the committed ops corpus is missing ({} files)", files.len());
    replay(&files, fuzz_harness::run_ops);
}

#[test]
fn bad_free_corpus_replays_clean() {
    let files = corpus("bad_free");
    assert!(files.len() >= 8, "the committed bad_free corpus is missing ({} files)", files.len());
    replay(&files, |d| fuzz_harness::run_bad_free(d, false));
}

/// The harness itself catches what it should (so a clean replay above means something): a block whose
/// pattern changed, an overlapping block, and a goheap report (caught, with its address and reason), while a
/// valid free passes through.
#[test]
fn harness_detects_corruption_and_reports() {
    use fuzz_harness::model::{Block, Shadow};
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let mut buf = vec![0u64; 1024];
    let layout = std::alloc::Layout::from_size_align(8192, 8).unwrap();
    let b = Block { id: 7, addr: buf.as_mut_ptr() as usize, layout, usable: 8192 };
    let mut sh = Shadow::default();
    // SAFETY (test): `buf` is 8 KiB of our own memory.
    unsafe { sh.insert(b, "test") };
    Shadow::verify(&b, "intact");
    buf[3] ^= 1;
    let r = std::panic::catch_unwind(|| Shadow::verify(&b, "corrupted"));
    assert!(r.is_err(), "a changed byte went unnoticed");
    let r = std::panic::catch_unwind(|| sh.check_free_range(b.addr + 100, b.addr + 200, "overlap"));
    assert!(r.is_err(), "an overlapping block went unnoticed");

    use goheap::check::Reason;
    fuzz_harness::report::install_panic_filter();
    let m = Box::new(
        goheap::Malloc::with_max_bytes(
            goheap::source::mmap::MmapSource::new(),
            goheap::cpu::NoCpuCache,
            fuzz_harness::harness::ARENA_BYTES,
        )
        .with_report_hook(fuzz_harness::report::hook),
    );
    let l = std::alloc::Layout::from_size_align(64, 8).unwrap();
    let p = m.alloc(l);
    assert!(!p.is_null());
    // SAFETY (test): a valid free, then the same pointer again (a double free goheap must report).
    let first = fuzz_harness::report::catch_report(|| unsafe { m.dealloc(p, l) });
    assert!(first.is_ok(), "a valid free was reported: {first:?}");
    // SAFETY (test): as above.
    let second = fuzz_harness::report::catch_report(|| unsafe { m.dealloc(p, l) });
    let report = second.expect_err("the double free was not reported");
    assert_eq!((report.addr, report.reason), (p as usize, Reason::DoubleFree));
}

/// Replays the file named by `GOHEAP_FUZZ_REPLAY` as target `GOHEAP_FUZZ_TARGET` (`ops` by default), for
/// reading a crash input with `GOHEAP_FUZZ_TRACE=1`; does nothing without it.
#[test]
fn replay_from_env() {
    let Some(path) = std::env::var_os("GOHEAP_FUZZ_REPLAY") else { return };
    let target = std::env::var("GOHEAP_FUZZ_TARGET").unwrap_or_else(|_| "ops".into());
    let files = [PathBuf::from(path)];
    match target.as_str() {
        "bad_free" => replay(&files, |d| fuzz_harness::run_bad_free(d, fuzz_harness::known_defects_from_env())),
        _ => replay(&files, fuzz_harness::run_ops),
    }
}
