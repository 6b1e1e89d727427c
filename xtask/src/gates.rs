//! The style gates of `cargo xtask test` (step 4): format and lints, each a pass or a fail in the summary.
//!
//! - `cargo fmt --all --check` in the root workspace and in `kernel-demo/` (its own workspace), with the
//!   root's `rustfmt.toml` (rustfmt finds it from either);
//! - `cargo clippy ... -- -D warnings` over goheap once per feature set in [`GOHEAP_FEATURE_SETS`] (each
//!   feature changes which code exists, so each set is linted on its own, as hermit's xtask does), then
//!   over the other crates of the root workspace (xtask, bench, testkit).
//!
//! The kernel side (`kernel-demo/`) is not linted here: clippy would need the kernel toolchain's
//! `-Zbuild-std` build; its format is checked.

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use crate::{proc, say};

/// goheap's feature sets that clippy lints one by one: none, the hosted build, hosted with the free
/// checks, the test-only walks with the generator, and the kernel adapters with and without the
/// bootloader_api frame allocator and KernelHeap (they build on the host too).
/// Every feature of goheap's Cargo.toml is in at least one set (a unit test below checks it).
pub const GOHEAP_FEATURE_SETS: &[&str] =
    &["", "std", "std,checks", "std,validate,generator", "x86_64", "bootloader_api"];

/// One gate: a name for the summary and the command that passes or fails it.
pub struct Gate {
    pub name: String,
    pub cmd: Command,
}

/// Every gate, in the order they run.
pub fn all(root: &Path, cargo: impl Fn() -> Command) -> Vec<Gate> {
    let mut gates = Vec::new();
    for (name, dir) in [("root workspace", root.to_path_buf()), ("kernel-demo", root.join("kernel-demo"))] {
        let mut cmd = cargo();
        cmd.current_dir(dir).args(["fmt", "--all", "--check"]);
        gates.push(Gate { name: format!("rustfmt --check ({name})"), cmd });
    }
    for set in GOHEAP_FEATURE_SETS {
        let mut cmd = cargo();
        cmd.current_dir(root).args(["clippy", "-p", "goheap", "--all-targets", "--no-default-features"]);
        if !set.is_empty() {
            cmd.args(["--features", set]);
        }
        cmd.args(["--", "-D", "warnings"]);
        let shown = if set.is_empty() { "no features".to_string() } else { format!("features {set}") };
        gates.push(Gate { name: format!("clippy -p goheap --all-targets, {shown}, -D warnings"), cmd });
    }
    // All features at once: the combination the host tests build.
    let mut cmd = cargo();
    cmd.current_dir(root).args(["clippy", "-p", "goheap", "--all-targets", "--all-features", "--", "-D", "warnings"]);
    gates.push(Gate { name: "clippy -p goheap --all-targets --all-features -D warnings".into(), cmd });
    for krate in ["xtask", "goheap-bench", "testkit"] {
        let mut cmd = cargo();
        cmd.current_dir(root).args(["clippy", "-p", krate, "--all-targets", "--all-features", "--", "-D", "warnings"]);
        gates.push(Gate { name: format!("clippy -p {krate} --all-targets --all-features -D warnings"), cmd });
    }
    gates
}

/// Runs one gate: `Ok(note)` if its command succeeded, `Err(note)` otherwise (the output is on the terminal).
pub fn run(gate: &mut Gate) -> Result<String, String> {
    say!("$ {}", proc::show(&gate.cmd));
    let start = Instant::now();
    let took = || proc::fmt_duration(start.elapsed());
    match proc::run_streaming(&mut gate.cmd, &gate.name) {
        Ok(s) if s.success() => Ok(took()),
        Ok(s) => Err(format!("{s} after {}: see above", took())),
        Err(e) => Err(format!("cannot run cargo: {e} (rust-toolchain.toml asks rustup for clippy and rustfmt)")),
    }
}

#[cfg(test)]
mod tests {
    use super::GOHEAP_FEATURE_SETS;

    /// The `[features]` table of goheap's Cargo.toml: the names left of `=`.
    fn goheap_features() -> Vec<String> {
        let toml = std::fs::read_to_string(crate::root().join("Cargo.toml")).unwrap();
        let mut in_features = false;
        let mut names = Vec::new();
        for line in toml.lines().map(str::trim) {
            if line.starts_with('[') {
                in_features = line == "[features]";
            } else if in_features && !line.starts_with('#') {
                if let Some((name, _)) = line.split_once('=') {
                    names.push(name.trim().to_string());
                }
            }
        }
        names
    }

    #[test]
    fn every_goheap_feature_is_linted_in_some_feature_set() {
        let features = goheap_features();
        assert!(features.iter().any(|f| f == "std"), "no features read from Cargo.toml: {features:?}");
        for f in features.iter().filter(|f| *f != "default") {
            assert!(
                GOHEAP_FEATURE_SETS.iter().any(|set| set.split(',').any(|s| s == f)),
                "goheap feature `{f}` is in no clippy feature set of xtask/src/gates.rs"
            );
        }
    }
}
