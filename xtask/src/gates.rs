//! The style and publishing gates of `cargo xtask test` (step 4): format, lints, docs, the package and the
//! minimum supported Rust version, each a pass or a fail (or a skip, with the reason) in the summary.
//!
//! - `cargo fmt --all --check` in the root workspace and in `kernel-demo/` (its own workspace), with the
//!   root's `rustfmt.toml` (rustfmt finds it from either);
//! - `cargo clippy ... -- -D warnings` over goheap once per feature set in [`GOHEAP_FEATURE_SETS`] (each
//!   feature changes which code exists, so each set is linted on its own, as hermit's xtask does), then
//!   over the other crates of the root workspace (xtask, bench, testkit);
//! - `cargo doc -p goheap --no-deps` with `RUSTDOCFLAGS=-D warnings` for the same feature sets and for all
//!   features (docs.rs's set): a broken intra-doc link, e.g. to an item another feature gates, fails it
//!   (goheap has `#![warn(missing_docs)]`, which the clippy gates make an error);
//! - `cargo package -p goheap --all-features`: the published package (Cargo.toml's `include` list) builds on
//!   its own, without the repository's path crates. `--offline`: the host tests of step 2 have fetched
//!   every dependency by then, and `cargo publish --dry-run` is not used because it needs the registry's
//!   network API even for a dry run; `--allow-dirty` so a working tree with uncommitted edits is checked
//!   as it is;
//! - MSRV: goheap built (no features, then all features) with the exact toolchain of Cargo.toml's
//!   `rust-version`, through rustup (`rustup toolchain install VER --profile minimal` when missing), in
//!   `target/msrv`. Skipped, with the reason, where rustup is missing or cannot install the toolchain
//!   (no network).
//!
//! The kernel side (`kernel-demo/`) is not linted here: clippy would need the kernel toolchain's
//! `-Zbuild-std` build; its format is checked.

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use crate::{proc, say};

/// goheap's feature sets that clippy lints one by one: none, the hosted build, hosted with the free
/// checks, the test-only walks with the generator, the pprof writer, and the kernel adapters with and
/// without the bootloader_api frame allocator and KernelHeap (they build on the host too).
/// Every feature of goheap's Cargo.toml is in at least one set (a unit test below checks it).
pub const GOHEAP_FEATURE_SETS: &[&str] =
    &["", "std", "std,checks", "std,validate,generator", "std,pprof", "x86_64", "bootloader_api"];

/// One gate: a name for the summary and the command that passes or fails it.
pub struct Gate {
    pub name: String,
    pub cmd: Command,
    /// A rustup toolchain the command needs (the MSRV gates): installed first if missing; the gate is
    /// skipped where that is impossible.
    pub toolchain: Option<String>,
}

impl Gate {
    fn new(name: impl Into<String>, cmd: Command) -> Self {
        Gate { name: name.into(), cmd, toolchain: None }
    }
}

/// What became of a gate.
pub enum Outcome {
    /// It ran: `Ok(note)` if its command succeeded, `Err(note)` otherwise (the output is on the terminal).
    Ran(Result<String, String>),
    /// It could not run on this machine, for the reason given (counted neither way).
    Skipped(String),
}

/// Every gate, in the order they run.
pub fn all(root: &Path, cargo: impl Fn() -> Command) -> Vec<Gate> {
    let mut gates = Vec::new();
    for (name, dir) in [("root workspace", root.to_path_buf()), ("kernel-demo", root.join("kernel-demo"))] {
        let mut cmd = cargo();
        cmd.current_dir(dir).args(["fmt", "--all", "--check"]);
        gates.push(Gate::new(format!("rustfmt --check ({name})"), cmd));
    }
    for set in GOHEAP_FEATURE_SETS {
        let mut cmd = cargo();
        cmd.current_dir(root).args(["clippy", "-p", "goheap", "--all-targets", "--no-default-features"]);
        if !set.is_empty() {
            cmd.args(["--features", set]);
        }
        cmd.args(["--", "-D", "warnings"]);
        let shown = if set.is_empty() { "no features".to_string() } else { format!("features {set}") };
        gates.push(Gate::new(format!("clippy -p goheap --all-targets, {shown}, -D warnings"), cmd));
    }
    // All features at once: the combination the host tests build.
    let mut cmd = cargo();
    cmd.current_dir(root).args(["clippy", "-p", "goheap", "--all-targets", "--all-features", "--", "-D", "warnings"]);
    gates.push(Gate::new("clippy -p goheap --all-targets --all-features -D warnings", cmd));
    for krate in ["xtask", "goheap-bench", "testkit"] {
        let mut cmd = cargo();
        cmd.current_dir(root).args(["clippy", "-p", krate, "--all-targets", "--all-features", "--", "-D", "warnings"]);
        gates.push(Gate::new(format!("clippy -p {krate} --all-targets --all-features -D warnings"), cmd));
    }
    gates.extend(doc_gates(root, &cargo));
    let mut cmd = cargo();
    cmd.current_dir(root).args(["package", "-p", "goheap", "--all-features", "--offline", "--allow-dirty"]);
    gates.push(Gate::new("cargo package -p goheap --all-features (the published crate builds alone)", cmd));
    gates.extend(msrv_gates(root));
    gates
}

/// `cargo doc -p goheap --no-deps` with `RUSTDOCFLAGS=-D warnings`, per feature set and with all features.
fn doc_gates(root: &Path, cargo: &impl Fn() -> Command) -> Vec<Gate> {
    let mut gates = Vec::new();
    for set in GOHEAP_FEATURE_SETS.iter().copied().chain(Some(ALL_FEATURES)) {
        let mut cmd = cargo();
        cmd.current_dir(root).env("RUSTDOCFLAGS", "-D warnings").args(["doc", "-p", "goheap", "--no-deps"]);
        let shown = match set {
            ALL_FEATURES => {
                cmd.arg("--all-features");
                "all features".to_string()
            }
            "" => {
                cmd.arg("--no-default-features");
                "no features".to_string()
            }
            set => {
                cmd.args(["--no-default-features", "--features", set]);
                format!("features {set}")
            }
        };
        gates.push(Gate::new(format!("cargo doc -p goheap, {shown}, RUSTDOCFLAGS=-D warnings"), cmd));
    }
    gates
}

/// Marks the all-features doc gate among the feature sets.
const ALL_FEATURES: &str = "<all>";

/// The `rust-version` of goheap's Cargo.toml (`[package]`), e.g. `"1.84"`.
pub fn rust_version(root: &Path) -> Result<String, String> {
    let path = root.join("Cargo.toml");
    let toml = std::fs::read_to_string(&path).map_err(|e| format!("reading {}: {e}", path.display()))?;
    rust_version_in(&toml).map_err(|e| format!("{}: {e}", path.display()))
}

/// The `rust-version` of the `[package]` table of manifest text `toml`.
fn rust_version_in(toml: &str) -> Result<String, String> {
    let mut in_package = false;
    for line in toml.lines().map(str::trim) {
        if line.starts_with('[') {
            in_package = line == "[package]";
        } else if in_package {
            let Some(rest) = line.strip_prefix("rust-version") else { continue };
            let Some(v) = rest.trim_start().strip_prefix('=') else { continue };
            let v = v.split('#').next().unwrap_or("").trim().trim_matches('"');
            if !v.is_empty() && v.split('.').all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit())) {
                return Ok(v.to_string());
            }
            return Err(format!("rust-version `{v}` is not a version like 1.84"));
        }
    }
    Err("no rust-version in [package]".to_string())
}

/// goheap built with the toolchain of its `rust-version`, without features and with all of them (not the
/// tests: their dev-dependencies need not keep goheap's MSRV).
fn msrv_gates(root: &Path) -> Vec<Gate> {
    let version = match rust_version(root) {
        Ok(v) => v,
        Err(e) => {
            // A gate that fails with the reason: `false` stands in for the build that cannot be named.
            let mut cmd = Command::new("false");
            cmd.current_dir(root);
            return vec![Gate::new(format!("MSRV: {e}"), cmd)];
        }
    };
    let mut gates = Vec::new();
    for (features, shown) in [("--no-default-features", "no features"), ("--all-features", "all features")] {
        let mut cmd = Command::new("rustup");
        cmd.current_dir(root)
            .args(["run", &version, "cargo", "build", "-p", "goheap", "--locked", features])
            .args(["--target-dir", "target/msrv"])
            // The outer cargo's choices would override the toolchain `rustup run` puts first on PATH.
            .env_remove("CARGO")
            .env_remove("RUSTC")
            .env_remove("RUSTDOC")
            .env_remove("RUSTUP_TOOLCHAIN")
            .env_remove("RUSTC_BOOTSTRAP");
        let mut gate = Gate::new(format!("MSRV: goheap builds with Rust {version} (rust-version), {shown}"), cmd);
        gate.toolchain = Some(version.clone());
        gates.push(gate);
    }
    gates
}

/// Makes sure rustup has `toolchain`, installing it (minimal profile) if missing; `Err(reason)` if it cannot.
fn ensure_toolchain(toolchain: &str) -> Result<(), String> {
    let has = |t: &str| {
        Command::new("rustup")
            .args(["run", t, "rustc", "--version"])
            .env("RUSTUP_AUTO_INSTALL", "0")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
    };
    match has(toolchain) {
        Err(e) => return Err(format!("rustup is not available ({e}); install rustup to check the MSRV")),
        Ok(s) if s.success() => return Ok(()),
        Ok(_) => {}
    }
    let mut install = Command::new("rustup");
    install.args(["toolchain", "install", toolchain, "--profile", "minimal"]);
    say!("$ {}", proc::show(&install));
    match proc::run_streaming(&mut install, &format!("rustup toolchain install {toolchain}")) {
        Ok(s) if s.success() => Ok(()),
        Ok(s) => Err(format!("`rustup toolchain install {toolchain}` failed ({s}): no network?")),
        Err(e) => Err(format!("cannot run rustup: {e}")),
    }
}

/// Runs one gate (after installing the toolchain it needs, if any).
pub fn run(gate: &mut Gate) -> Outcome {
    if let Some(toolchain) = &gate.toolchain {
        if let Err(why) = ensure_toolchain(toolchain) {
            say!("{}: skipped: {why}", gate.name);
            return Outcome::Skipped(why);
        }
    }
    say!("$ {}", proc::show(&gate.cmd));
    let start = Instant::now();
    let took = || proc::fmt_duration(start.elapsed());
    Outcome::Ran(match proc::run_streaming(&mut gate.cmd, &gate.name) {
        Ok(s) if s.success() => Ok(took()),
        Ok(s) => Err(format!("{s} after {}: see above", took())),
        Err(e) => Err(format!(
            "cannot run {}: {e} (rust-toolchain.toml asks rustup for clippy and rustfmt)",
            gate.cmd.get_program().to_string_lossy()
        )),
    })
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

    #[test]
    fn rust_version_is_read_from_the_package_table() {
        let v = super::rust_version(&crate::root()).unwrap();
        assert!(v.starts_with("1."), "goheap's rust-version: {v}");
        let toml = "[workspace]\nrust-version = \"9.9\"\n[package]\nname = \"x\"\nrust-version = \"1.84\" # why\n";
        assert_eq!(super::rust_version_in(toml).unwrap(), "1.84");
        assert!(super::rust_version_in("[package]\nname = \"x\"\n[dependencies]\nrust-version = \"1.1\"\n").is_err());
        assert!(super::rust_version_in("[package]\nrust-version = \"1.x\"\n").is_err());
    }

    /// Every plain path (no glob) of goheap's `include` list exists: `cargo package` would silently leave a
    /// missing licence or changelog out of the package.
    #[test]
    fn every_file_goheap_includes_in_its_package_exists() {
        let toml = std::fs::read_to_string(crate::root().join("Cargo.toml")).unwrap();
        let line =
            toml.lines().find(|l| l.starts_with("include = [")).expect("goheap's Cargo.toml has an include list");
        let paths: Vec<&str> = line.split('"').skip(1).step_by(2).collect();
        assert!(paths.contains(&"/src/**"), "include list without the sources: {paths:?}");
        for p in paths.iter().filter(|p| !p.contains('*')) {
            let path = crate::root().join(p.trim_start_matches('/'));
            assert!(path.is_file(), "{p} is in goheap's include list but {} does not exist", path.display());
        }
    }
}
