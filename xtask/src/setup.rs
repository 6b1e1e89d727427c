//! Set-up: find QEMU, OVMF and a kernel toolchain; install what is missing (Debian/Ubuntu, as root).
//!
//! Idempotent: everything is probed first and only missing pieces are installed. Facts behind the choices
//! are in the kernel-toolchain note (shared/notes/kernel-toolchain.md) and README.md:
//! - A kernel toolchain is any rustc whose sysroot has the standard library sources
//!   (`lib/rustlib/src/rust/library`, needed by `-Zbuild-std`), with a `cargo` beside it. Preferred:
//!   `GOHEAP_KERNEL_RUSTC` if set, else the rustc in use, else rustup's `nightly`, else Debian's
//!   `/usr/bin/rustc` (packages rustc-web cargo-web rust-web-src lld-22 llvm-22).
//! - The `bootloader` build script looks for llvm-objdump/llvm-objcopy under
//!   `$(rustc --print sysroot)/lib/rustlib/*/bin/`; for Debian's rustc we link them from llvm-22.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::proc;
use crate::say;

/// Debian packages of the kernel toolchain (see the module docs).
const DEBIAN_TOOLCHAIN: &[&str] = &["rustc-web", "cargo-web", "rust-web-src", "lld-22", "llvm-22"];
const LLVM_BIN: &str = "/usr/lib/llvm-22/bin";
const LLVM_TOOLS_LINK_DIR: &str = "/usr/lib/rustlib/llvm-tools/bin";
const LLVM_TOOLS: &[&str] = &["llvm-objdump", "llvm-objcopy"];
const OVMF_CANDIDATES: &[&str] = &[
    "/usr/share/OVMF/OVMF_CODE.fd",
    "/usr/share/ovmf/OVMF.fd",
    "/usr/share/edk2/ovmf/OVMF_CODE.fd",
    "/usr/share/edk2-ovmf/x64/OVMF_CODE.fd",
    "/usr/share/qemu/OVMF.fd",
];

/// Everything the kernel side needs, found.
#[derive(Debug, Clone)]
pub struct Tools {
    pub qemu: PathBuf,
    pub ovmf: PathBuf,
    pub kernel: KernelToolchain,
}

impl Tools {
    pub fn describe(&self) -> String {
        format!(
            "{} (firmware {}), kernel toolchain {} [{}]",
            self.qemu.display(),
            self.ovmf.display(),
            self.kernel.version,
            self.kernel.origin
        )
    }
}

/// A rustc (with cargo) that can build `core`/`alloc` from source.
#[derive(Debug, Clone)]
pub struct KernelToolchain {
    pub rustc: PathBuf,
    pub cargo: PathBuf,
    pub sysroot: PathBuf,
    pub bin_dir: PathBuf,
    pub version: String,
    pub origin: String,
}

impl KernelToolchain {
    /// A `cargo` command of this toolchain, with the environment the kernel builds need:
    /// `RUSTC_BOOTSTRAP=1` (unstable `-Z` flags on a stable compiler; it must be in cargo's own
    /// environment), `RUSTC` pointing at this rustc, this toolchain's bin/ first in PATH (the bootloader's
    /// build script runs plain `rustc` and `cargo install`), and rustup's/the outer cargo's variables removed.
    pub fn cargo(&self) -> Command {
        let mut cmd = Command::new(&self.cargo);
        for (key, _) in std::env::vars_os() {
            let k = key.to_string_lossy();
            let outer = k.starts_with("CARGO_PKG_")
                || k.starts_with("CARGO_BUILD_")
                || k.starts_with("CARGO_CFG_")
                || matches!(
                    k.as_ref(),
                    "CARGO"
                        | "CARGO_MANIFEST_DIR"
                        | "CARGO_MANIFEST_PATH"
                        | "CARGO_CRATE_NAME"
                        | "CARGO_BIN_NAME"
                        | "CARGO_PRIMARY_PACKAGE"
                        | "CARGO_TARGET_DIR"
                        | "CARGO_MAKEFLAGS"
                        | "RUSTUP_TOOLCHAIN"
                        | "RUSTC"
                        | "RUSTDOC"
                        | "RUSTC_WRAPPER"
                        | "RUSTC_WORKSPACE_WRAPPER"
                        | "RUSTFLAGS"
                        | "CARGO_ENCODED_RUSTFLAGS"
                );
            if outer {
                cmd.env_remove(&key);
            }
        }
        let path = std::env::var_os("PATH").unwrap_or_default();
        let mut dirs = vec![self.bin_dir.clone()];
        dirs.extend(std::env::split_paths(&path));
        cmd.env("PATH", std::env::join_paths(dirs).expect("PATH entries have no ':'"));
        cmd.env("RUSTC", &self.rustc).env("RUSTC_BOOTSTRAP", "1");
        cmd
    }

    fn is_debian(&self) -> bool {
        self.sysroot == Path::new("/usr")
    }

    /// Whether llvm-objdump and llvm-objcopy are where the bootloader's build script looks.
    fn has_llvm_tools(&self) -> bool {
        let Ok(dirs) = std::fs::read_dir(self.sysroot.join("lib/rustlib")) else { return false };
        let dirs: Vec<PathBuf> = dirs.flatten().map(|d| d.path().join("bin")).collect();
        LLVM_TOOLS.iter().all(|tool| dirs.iter().any(|d| d.join(tool).exists()))
    }

    fn has_rust_lld(&self) -> bool {
        self.bin_dir.join("rust-lld").exists()
            || self.sysroot.join("lib/rustlib/x86_64-unknown-linux-gnu/bin/rust-lld").exists()
            || which("rust-lld").is_some()
    }
}

/// Looks for `name` in PATH.
pub fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|d| d.join(name)).find(|p| p.is_file())
}

fn find_ovmf() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("GOHEAP_OVMF") {
        return Some(PathBuf::from(p)).filter(|p| p.is_file());
    }
    OVMF_CANDIDATES.iter().map(PathBuf::from).find(|p| p.is_file())
}

fn find_qemu() -> Option<PathBuf> {
    which("qemu-system-x86_64")
}

/// Probes one candidate rustc: `Ok` if it qualifies as a kernel toolchain, else why not.
fn probe(mut rustc_cmd: Command, origin: &str) -> Result<KernelToolchain, String> {
    let shown = proc::show(&rustc_cmd);
    let out = rustc_cmd.args(["--print", "sysroot"]).output().map_err(|e| format!("{shown}: {e}"))?;
    if !out.status.success() {
        return Err(format!("{shown} --print sysroot failed"));
    }
    let sysroot = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    let bin_dir = sysroot.join("bin");
    let rustc = bin_dir.join("rustc");
    let cargo = bin_dir.join("cargo");
    if !sysroot.join("lib/rustlib/src/rust/library/core").is_dir() {
        return Err(format!("{origin} ({}) has no rust-src", sysroot.display()));
    }
    if !rustc.is_file() || !cargo.is_file() {
        return Err(format!("{origin} ({}) has no rustc and cargo in bin/", sysroot.display()));
    }
    let version = Command::new(&rustc)
        .arg("-V")
        .env_remove("RUSTUP_TOOLCHAIN")
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|| "rustc (unknown version)".into());
    Ok(KernelToolchain { rustc, cargo, sysroot, bin_dir, version, origin: origin.to_string() })
}

/// Finds a kernel toolchain, in order of preference; `Err` lists why each candidate failed.
pub fn find_kernel_toolchain() -> Result<KernelToolchain, Vec<String>> {
    if let Some(rustc) = std::env::var_os("GOHEAP_KERNEL_RUSTC") {
        return probe(Command::new(rustc), "GOHEAP_KERNEL_RUSTC").map_err(|e| vec![e]);
    }
    let mut why = Vec::new();
    let mut candidates: Vec<(Command, &str)> = vec![(Command::new("rustc"), "the rustc in use")];
    if which("rustup").is_some() {
        let mut c = Command::new("rustup");
        c.args(["run", "nightly", "rustc"]).env("RUSTUP_AUTO_INSTALL", "0");
        candidates.push((c, "rustup's nightly"));
    }
    let mut debian = Command::new("/usr/bin/rustc");
    debian.env_remove("RUSTUP_TOOLCHAIN");
    candidates.push((debian, "Debian's /usr/bin/rustc"));
    for (cmd, origin) in candidates {
        match probe(cmd, origin) {
            Ok(tc) => return Ok(tc),
            Err(e) => why.push(e),
        }
    }
    Err(why)
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

fn can_apt() -> bool {
    Path::new("/etc/debian_version").exists() && Path::new("/usr/bin/apt-get").exists()
}

/// What to install.
#[derive(Default)]
struct Plan {
    missing: Vec<String>,
    apt: BTreeSet<&'static str>,
    llvm_links: bool,
    manual: Vec<String>,
}

fn plan() -> Plan {
    let mut p = Plan::default();
    if find_qemu().is_none() {
        p.missing.push("qemu-system-x86_64".into());
        p.apt.insert("qemu-system-x86");
    }
    if which("go").is_none() {
        // `go tool pprof` reads the heap profiles (tests/heap_profile.rs checks it does; `cargo xtask profile`
        // prints its -top view). Debian's golang-go (1.19) has it.
        p.missing.push("go (for go tool pprof)".into());
        p.apt.insert("golang-go");
    }
    if find_ovmf().is_none() {
        p.missing.push("OVMF UEFI firmware (/usr/share/OVMF/OVMF_CODE.fd, or $GOHEAP_OVMF)".into());
        p.apt.insert("ovmf");
    }
    match find_kernel_toolchain() {
        Ok(tc) if tc.is_debian() => {
            if !Path::new(LLVM_BIN).join("llvm-objcopy").exists() {
                p.missing.push(format!("{LLVM_BIN}/llvm-objcopy"));
                p.apt.insert("llvm-22");
            }
            if !tc.has_rust_lld() {
                p.missing.push("rust-lld".into());
                p.apt.extend(["lld-22", "rust-web-llvm"]);
            }
            if !tc.has_llvm_tools() {
                p.missing.push(format!("llvm-tools links in {LLVM_TOOLS_LINK_DIR}"));
                p.llvm_links = true;
            }
        }
        Ok(tc) => {
            if !tc.has_llvm_tools() {
                p.missing.push(format!("llvm-tools of {} ({})", tc.origin, tc.sysroot.display()));
                p.manual.push(format!(
                    "rustup component add llvm-tools --toolchain {}   # or: unset GOHEAP_KERNEL_RUSTC",
                    tc.sysroot.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
                ));
            }
        }
        Err(why) => {
            p.missing.push(format!("a kernel toolchain (a rustc with rust-src): {}", why.join("; ")));
            p.apt.extend(DEBIAN_TOOLCHAIN.iter().copied());
            p.llvm_links = true;
        }
    }
    p
}

fn link_commands() -> Vec<String> {
    let mut v = vec![format!("mkdir -p {LLVM_TOOLS_LINK_DIR}")];
    for t in LLVM_TOOLS {
        v.push(format!("ln -sf {LLVM_BIN}/{t} {LLVM_TOOLS_LINK_DIR}/{t}"));
    }
    v
}

fn manual_message(p: &Plan) -> String {
    let mut m = String::from("cargo xtask: the kernel side needs tools that are missing:\n");
    for what in &p.missing {
        let _ = writeln!(m, "  - {what}");
    }
    let mut cmds = Vec::new();
    if !p.apt.is_empty() {
        cmds.push("apt-get update".to_string());
        cmds.push(format!(
            "DEBIAN_FRONTEND=noninteractive apt-get install -y {}",
            p.apt.iter().copied().collect::<Vec<_>>().join(" ")
        ));
    }
    if p.llvm_links {
        cmds.extend(link_commands());
    }
    cmds.extend(p.manual.iter().cloned());
    let why = if !is_root() && (!p.apt.is_empty() || p.llvm_links) {
        "not running as root"
    } else if !can_apt() && !p.apt.is_empty() {
        "this is not a Debian/Ubuntu system with apt-get"
    } else {
        "this step cannot be automated"
    };
    let _ = writeln!(m, "\nThe runner cannot install them itself ({why}). Run (as root on Debian/Ubuntu):");
    for c in &cmds {
        let _ = writeln!(m, "  {c}");
    }
    m.push_str(
        "\nElsewhere, with rustup: a nightly with the rust-src and llvm-tools components, and QEMU and OVMF\n\
         from your package manager:\n  \
         rustup toolchain install nightly --component rust-src --component llvm-tools\n  \
         GOHEAP_KERNEL_RUSTC=\"$(rustup which --toolchain nightly rustc)\" cargo xtask test\n\
         (GOHEAP_OVMF=/path/to/OVMF_CODE.fd if the firmware is somewhere else.)",
    );
    m
}

fn apt(args: &[&str]) -> Result<(), String> {
    let mut cmd = Command::new("apt-get");
    cmd.args(["-o", "DPkg::Lock::Timeout=600"])
        .args(args)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .stdin(std::process::Stdio::null());
    say!("$ {}", proc::show(&cmd));
    let status = proc::run_streaming(&mut cmd, "apt-get").map_err(|e| format!("apt-get: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("`{}` failed ({status})", proc::show(&cmd)))
    }
}

fn make_llvm_links() -> Result<(), String> {
    std::fs::create_dir_all(LLVM_TOOLS_LINK_DIR).map_err(|e| format!("mkdir {LLVM_TOOLS_LINK_DIR}: {e}"))?;
    for t in LLVM_TOOLS {
        let link = Path::new(LLVM_TOOLS_LINK_DIR).join(t);
        let target = Path::new(LLVM_BIN).join(t);
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(&target, &link)
            .map_err(|e| format!("ln -s {} {}: {e}", target.display(), link.display()))?;
        say!("linked {} -> {}", link.display(), target.display());
    }
    Ok(())
}

/// Finds everything, installing what is missing where it can; `Err` is a message for the user.
pub fn ensure() -> Result<Tools, String> {
    let p = plan();
    if !p.missing.is_empty() {
        let automatic = p.manual.is_empty() && is_root() && (p.apt.is_empty() || can_apt());
        if !automatic {
            return Err(manual_message(&p));
        }
        say!("set-up: missing: {}", p.missing.join(", "));
        if !p.apt.is_empty() {
            let pkgs: Vec<&str> = p.apt.iter().copied().collect();
            say!("set-up: installing {} with apt-get (a few minutes on a fresh machine)", pkgs.join(" "));
            apt(&["update", "-q"])?;
            let mut args = vec!["install", "-y", "-q"];
            args.extend(pkgs);
            apt(&args)?;
        }
        if p.llvm_links || plan().llvm_links {
            make_llvm_links()?;
        }
        let again = plan();
        if !again.missing.is_empty() {
            return Err(format!(
                "set-up: still missing after installing: {}\n\n{}",
                again.missing.join(", "),
                manual_message(&again)
            ));
        }
    }
    let kernel = find_kernel_toolchain().map_err(|why| why.join("; "))?;
    let qemu = find_qemu().ok_or("qemu-system-x86_64 not found")?;
    let ovmf = find_ovmf().ok_or("OVMF firmware not found")?;
    Ok(Tools { qemu, ovmf, kernel })
}
