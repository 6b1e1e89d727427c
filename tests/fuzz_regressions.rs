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
fn replay(files: &[PathBuf], run: impl Fn(&[u8]) + Send + Sync) {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    // On a thread with the main thread's stack (8 MiB), as `cargo fuzz` runs the harness: an unoptimised
    // build moves the harness's `Malloc` (about 300 KiB) through several temporaries on its way into its
    // box, more than a test thread's 2 MiB holds.
    std::thread::scope(|sc| {
        std::thread::Builder::new()
            .stack_size(8 << 20)
            .spawn_scoped(sc, || {
                for f in files {
                    let data = std::fs::read(f).unwrap();
                    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run(&data)));
                    if let Err(e) = r {
                        eprintln!("fuzz input {} fails", f.display());
                        std::panic::resume_unwind(e);
                    }
                }
            })
            .unwrap()
            .join()
            .unwrap_or_else(|e| std::panic::resume_unwind(e))
    });
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
    replay(&files, fuzz_harness::run_bad_free);
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

/// Replays `fuzz/regressions/known-defects/NAME` as target `bad_free`.
fn replay_known_defect(name: &str) {
    let file = fuzz_dir().join("regressions/known-defects").join(name);
    replay(&[file], fuzz_harness::run_bad_free);
}

// Issue 12's defects, as `bad_free` found them before their fixes (inputs minimized by libFuzzer
// or written by hand in the harness's format; `GOHEAP_FUZZ_TRACE=1` with `replay_from_env` shows each
// operation). Each failed before issue 12's fixes (branch c-badinput); the docs below describe the defect as it
// was, and each case now checks the report the fuzz harness expects.

/// A tiny object (1 B) freed twice with `checks` on: the second free is not reported (the tiny path checks
/// no live bit; the block's count goes negative and the block can be reused while a sibling lives).
#[test]
fn known_defect_tiny_double_free() {
    replay_known_defect("tiny-double-free");
}

/// `dealloc(p + 1, Layout(7, 1))` of a tiny object with `checks` on: accepted (the tiny path returns before
/// the interior check), the block's count is decremented for an object that is still live.
#[test]
fn known_defect_tiny_interior_pointer() {
    replay_known_defect("tiny-interior");
}

/// `realloc(p + 8192, Layout(32769, 1), 32770)` of a large object: realloc validates nothing on the large
/// path; the page count stays, so it returns the interior pointer as the "resized" block. (With a size that
/// needs more pages it allocates, copies 32769 bytes from `p + 8192`, past the object's span, and only
/// then reports at the free; where the new block follows the span, the copy overlaps its source: the fuzzer
/// saw `copy_nonoverlapping`'s precondition fail and AddressSanitizer report the copy.)
#[test]
fn known_defect_realloc_large_interior_pointer() {
    replay_known_defect("realloc-large-interior");
}

/// `realloc(p + 1, Layout(7, 1), 1016)` of a tiny object: moved to a 1016 B block and the interior pointer
/// "freed" on the unchecked tiny path, so the original object's block count is corrupted, unreported.
#[test]
fn known_defect_realloc_tiny_interior_pointer() {
    replay_known_defect("realloc-tiny-interior");
}

/// Found by `cargo xtask test`'s short `bad_free` run the day the tiny bound went from 16 to 8 bytes (the
/// crash input, not minimized): the harness's route model still called `Layout(9, 4)` tiny, so a free of
/// such an object with `Layout(9, 16)` (the 16-byte class either way) looked like a wrong-route free that
/// goheap failed to report. The model now takes goheap's `TINY_REQUEST_LIMIT`; goheap was right.
#[test]
fn harness_model_tiny_bound() {
    replay_known_defect("tiny-bound-wrong-layout");
}

/// Replays the file named by `GOHEAP_FUZZ_REPLAY` as target `GOHEAP_FUZZ_TARGET` (`ops` by default), for
/// reading a crash input with `GOHEAP_FUZZ_TRACE=1`; does nothing without it.
#[test]
fn replay_from_env() {
    let Some(path) = std::env::var_os("GOHEAP_FUZZ_REPLAY") else { return };
    let target = std::env::var("GOHEAP_FUZZ_TARGET").unwrap_or_else(|_| "ops".into());
    let files = [PathBuf::from(path)];
    match target.as_str() {
        "bad_free" => replay(&files, fuzz_harness::run_bad_free),
        _ => replay(&files, fuzz_harness::run_ops),
    }
}
