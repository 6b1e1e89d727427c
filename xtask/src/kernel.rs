//! Building the kernel side with the kernel toolchain: kernels (demo and test kernels), the image
//! builder (`kernel-demo/boot`, on `bootloader = "=0.11.15"`) and UEFI/BIOS disk images.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::proc;
use crate::qemu::Firmware;
use crate::say;
use crate::setup::KernelToolchain;

/// The kernel target spec at the repository root (x86_64-unknown-none's: no red zone, soft float,
/// panic=abort, static PIE).
pub const TARGET_SPEC: &str = "x86_64-target.json";
/// `-Z` flags of every kernel build.
const BUILD_STD: &[&str] =
    &["-Zbuild-std=core,alloc", "-Zbuild-std-features=compiler-builtins-mem", "-Zjson-target-spec"];

pub struct KernelBuilder<'a> {
    tc: &'a KernelToolchain,
    dir: PathBuf,
    target_dir: PathBuf,
}

/// A test kernel found in kernel-demo/tests/.
#[derive(Debug, Clone)]
pub struct TestKernel {
    pub name: String,
    pub elf: PathBuf,
    pub src: PathBuf,
}

impl<'a> KernelBuilder<'a> {
    pub fn new(tc: &'a KernelToolchain) -> Self {
        let dir = crate::root().join("kernel-demo");
        let target_dir = dir.join("target");
        Self { tc, dir, target_dir }
    }

    fn cargo(&self, sub: &str) -> Command {
        let mut cmd = self.tc.cargo();
        cmd.current_dir(&self.dir).arg(sub).arg("--target-dir").arg(&self.target_dir);
        cmd
    }

    fn kernel_cargo(&self, sub: &str, release: bool) -> Command {
        let mut cmd = self.cargo(sub);
        cmd.args(["-p", "kernel-demo", "--target"]).arg(crate::root().join(TARGET_SPEC)).args(BUILD_STD);
        if release {
            cmd.arg("--release");
        }
        cmd
    }

    fn profile_dir(&self, release: bool) -> PathBuf {
        let spec = Path::new(TARGET_SPEC).file_stem().expect("spec has a stem");
        self.target_dir.join(spec).join(if release { "release" } else { "debug" })
    }

    /// Builds the demo kernel; returns its ELF.
    pub fn build_demo(&self, release: bool) -> Result<PathBuf, String> {
        let mut cmd = self.kernel_cargo("build", release);
        cmd.args(["--bin", "kernel-demo"]);
        run(&mut cmd, "building the demo kernel")?;
        Ok(self.profile_dir(release).join("kernel-demo"))
    }

    /// Builds the demo kernel with `--no-default-features` and `features` (kernel-demo's own cargo
    /// features, e.g. `checks`) and copies the ELF to `copy_as` beside it, so a later build with the
    /// default features (`run`, `test`) does not replace the file under the caller. Returns the copy.
    pub fn build_demo_with_features(&self, release: bool, features: &[&str], copy_as: &str) -> Result<PathBuf, String> {
        let mut cmd = self.kernel_cargo("build", release);
        cmd.args(["--bin", "kernel-demo", "--no-default-features"]);
        if !features.is_empty() {
            cmd.arg("--features").arg(features.join(","));
        }
        run(&mut cmd, "building the demo kernel")?;
        let elf = self.profile_dir(release).join("kernel-demo");
        let copy = self.profile_dir(release).join(copy_as);
        std::fs::copy(&elf, &copy).map_err(|e| format!("copying {} to {}: {e}", elf.display(), copy.display()))?;
        Ok(copy)
    }

    /// Builds the example kernel `kernel-demo/examples/NAME.rs` (e.g. `minimal`); returns its ELF.
    pub fn build_example(&self, name: &str, release: bool) -> Result<PathBuf, String> {
        let mut cmd = self.kernel_cargo("build", release);
        cmd.args(["--example", name]);
        run(&mut cmd, &format!("building the example kernel {name}"))?;
        Ok(self.profile_dir(release).join("examples").join(name))
    }

    /// Builds every test kernel (tests/*.rs of kernel-demo); returns them in name order.
    pub fn build_tests(&self, release: bool) -> Result<Vec<TestKernel>, String> {
        let mut cmd = self.kernel_cargo("test", release);
        cmd.args(["--tests", "--no-run", "--message-format=json-render-diagnostics"]).stdout(Stdio::piped());
        say!("$ {}", proc::show(&cmd));
        let _beat = proc::Heartbeat::start("building the test kernels".into(), std::time::Duration::from_secs(30));
        let out = proc::die_with_parent(&mut cmd).output().map_err(|e| format!("cargo: {e}"))?;
        if !out.status.success() {
            return Err(format!("building the test kernels failed ({})", out.status));
        }
        let mut tests = Vec::new();
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            if !line.contains("\"reason\":\"compiler-artifact\"") || !line.contains("\"test\":true") {
                continue;
            }
            let (Some(elf), Some(src), Some(name)) =
                (json_str(line, "executable"), json_str(line, "src_path"), json_str(line, "name"))
            else {
                continue;
            };
            tests.push(TestKernel { name, elf: elf.into(), src: src.into() });
        }
        tests.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(tests)
    }

    /// Builds the image builder (once: its first build compiles the bootloader stages, ~7 minutes).
    pub fn build_image_tool(&self) -> Result<PathBuf, String> {
        let tool = self.target_dir.join("debug/boot");
        if !tool.exists() {
            say!(
                "building the image builder (bootloader 0.11.15): the first build compiles the bootloader's \
                 UEFI and BIOS stages with build-std and takes about 7 minutes on 2 cores; later runs reuse it"
            );
        }
        let mut cmd = self.cargo("build");
        cmd.args(["-p", "boot"]);
        run(&mut cmd, "building the image builder (bootloader stages)")?;
        Ok(tool)
    }

    /// Makes a disk image for `kernel`; `args` (kernel arguments) go into a ramdisk when not empty.
    pub fn make_image(
        &self,
        tool: &Path,
        kernel: &Path,
        name: &str,
        firmware: Firmware,
        args: &[String],
    ) -> Result<PathBuf, String> {
        let images = self.target_dir.join("images");
        std::fs::create_dir_all(&images).map_err(|e| format!("mkdir {}: {e}", images.display()))?;
        let image = images.join(format!("{name}-{}.img", firmware.name()));
        let mut cmd = Command::new(tool);
        cmd.arg("--kernel").arg(kernel).arg("--out").arg(&image);
        if firmware == Firmware::Bios {
            cmd.arg("--bios");
        }
        let log = std::env::var("GOHEAP_BOOT_LOG").unwrap_or_else(|_| "warn".into());
        cmd.args(["--log-level", &log]);
        if !args.is_empty() {
            // The kernel reads these in kernel-demo/src/args.rs (MAGIC line, then one argument per line).
            let ramdisk = images.join(format!("{name}-args.txt"));
            let mut text = String::from("goheap-kernel-args v1\n");
            for a in args {
                text.push_str(a);
                text.push('\n');
            }
            std::fs::write(&ramdisk, text).map_err(|e| format!("writing {}: {e}", ramdisk.display()))?;
            cmd.arg("--ramdisk").arg(&ramdisk);
        }
        let out = cmd.output().map_err(|e| format!("{}: {e}", tool.display()))?;
        if !out.status.success() {
            return Err(format!(
                "making the {} image failed: {}",
                firmware.name(),
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Ok(image)
    }
}

fn run(cmd: &mut Command, what: &str) -> Result<(), String> {
    say!("$ {}", proc::show(cmd));
    let status = proc::run_streaming(cmd, what).map_err(|e| format!("{what}: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("{what} failed ({status})"))
    }
}

/// The first `"key":"value"` string in a line of cargo's JSON output (paths and names need no unescaping
/// beyond `\\` and `\"`).
fn json_str(line: &str, key: &str) -> Option<String> {
    let pat = format!("\"{key}\":\"");
    let start = line.find(&pat)? + pat.len();
    let mut out = String::new();
    let mut chars = line[start..].chars();
    while let Some(c) = chars.next() {
        match c {
            '"' => return Some(out),
            '\\' => out.push(chars.next()?),
            c => out.push(c),
        }
    }
    None
}
