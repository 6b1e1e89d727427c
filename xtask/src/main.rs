//! `cargo xtask`: the project's task runner (the alias lives in `.cargo/config.toml`).
//!
//! - `cargo xtask run [OPTIONS] [-- KERNEL_ARGS...]`: build the demo kernel, make a disk image and boot it in
//!   QEMU (serial on stdout). See `run::USAGE`.
//! - `cargo xtask test`: every test: host tests, the no_std build, format and lint gates, and the QEMU test kernels.
//! - `cargo xtask setup`: only install/check what the kernel side needs.
//! - `cargo xtask gen-size-classes`: regenerate `src/object/sizeclass/table.rs`.
//! - `cargo xtask profile [RUN OPTIONS]`: `run -- --profile`: the demo kernel's heap profile as a pprof file
//!   (`profile.rs`).
//! - `cargo xtask fuzz [--time SECS] [TARGET]`: run the fuzz targets in `fuzz/` (see `fuzz.rs`).
//! - `cargo xtask sanitize`: goheap's host tests under ThreadSanitizer and AddressSanitizer (`sanitize.rs`).
//! - `cargo xtask soak`: long randomized runs on the host or in QEMU (`soak.rs`).
//!
//! Each subcommand lives in its own module; add new ones beside them and a line in `main`.

mod bench;
mod bench_kernel;
mod fuzz;
mod gates;
mod gen;
mod kbench_report;
mod kernel;
mod kproxy;
mod proc;
mod profile;
mod qemu;
mod run;
mod sanitize;
mod setup;
mod soak;
mod test;

use std::path::PathBuf;
use std::process::ExitCode;

/// Exit status of the runner when it could not get as far as a verdict (usage, set-up or build error).
pub const EXIT_ERROR: u8 = 2;

const USAGE: &str = "\
usage: cargo xtask <command>

commands:
  run [--bios] [--smp N] [--mem SIZE] [--release] [--timeout SECS] [--qemu-args \"ARGS\"] [-- KERNEL_ARGS...]
                      build and boot the demo kernel in QEMU (see `cargo xtask run --help`)
  profile [RUN OPTIONS] [-- KERNEL_ARGS...]
                      boot the demo kernel with --profile and write its heap profile as a pprof file
                      (target/kernel-heap.pb.gz, or --profile-out FILE; see xtask/src/profile.rs)
  test                run every test: host tests, no_std build, fmt/clippy gates, QEMU test kernels
  setup               install/check QEMU, OVMF and the kernel toolchain only
  gen-size-classes    regenerate src/object/sizeclass/table.rs from goheap's generator
  bench [--quick] [--reps N] [--only GROUP,...] [--alloc NAME,...]
                      goheap against peer allocators; regenerates BENCHMARKS.md (see `cargo xtask bench --help`)
  sanitize [--tsan] [--asan] [--short]
                      goheap's host tests under ThreadSanitizer / AddressSanitizer (rustup's nightly)
  soak [--minutes N] [--kernel] [--smp N,...]
                      long randomized run on the host, or of the soak kernel in QEMU (see --help)
  bench --kernel [--cpus N,...] [--reps N] [--quick]
                      the same in the demo kernel in QEMU, against linked_list_allocator and talc heaps
                      (see `cargo xtask bench --kernel --help`)
  fuzz [--time SECS] [TARGET]
                      run the fuzz targets in fuzz/ (nightly, cargo-fuzz, AddressSanitizer) for SECS each
";

/// The repository root (the workspace that holds xtask/).
pub fn root() -> PathBuf {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().expect("xtask/ has a parent").to_path_buf()
}

/// A progress line of the runner (stderr, beside cargo's own output).
#[macro_export]
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = std::io::stdout().flush();
        eprintln!("[xtask] {}", format_args!($($arg)*));
    }};
}

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let Some(cmd) = args.next() else {
        eprint!("{USAGE}");
        return ExitCode::from(EXIT_ERROR);
    };
    let rest: Vec<String> = args.collect();
    match cmd.as_str() {
        "run" => run::main(&rest),
        "profile" => {
            // `cargo xtask run [OPTIONS] -- [KERNEL_ARGS] --profile`.
            let mut a = rest.clone();
            if !a.iter().any(|x| x == "--") {
                a.push("--".into());
            }
            a.push("--profile".into());
            run::main(&a)
        }
        "test" => test::main(&rest),
        "setup" => match setup::ensure() {
            Ok(tools) => {
                say!("set-up complete: {}", tools.describe());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{e}");
                ExitCode::from(EXIT_ERROR)
            }
        },
        "gen-size-classes" => gen::main(&rest),
        "bench" => bench::main(&rest),
        "fuzz" => fuzz::main(&rest),
        "sanitize" => sanitize::main(&rest),
        "soak" => soak::main(&rest),
        "help" | "-h" | "--help" => {
            print!("{USAGE}");
            ExitCode::SUCCESS
        }
        other => {
            eprintln!("unknown command {other:?}\n\n{USAGE}");
            ExitCode::from(EXIT_ERROR)
        }
    }
}
