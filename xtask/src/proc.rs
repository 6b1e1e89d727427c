//! Child-process helpers: heartbeats for long steps, and children that die with the runner.

use std::io;
use std::os::unix::process::CommandExt;
use std::process::{Command, ExitStatus};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Makes the child receive SIGKILL when the runner dies (Linux `PR_SET_PDEATHSIG`), so an interrupted
/// or killed `cargo xtask` never leaves QEMU behind.
pub fn die_with_parent(cmd: &mut Command) -> &mut Command {
    // SAFETY: the closure runs in the forked child before exec and only makes async-signal-safe calls
    // (prctl, getppid) with no allocation.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong, 0, 0, 0) != 0 {
                return Err(io::Error::last_os_error());
            }
            // The parent may have died before prctl: then we were re-parented already.
            if libc::getppid() == 1 {
                return Err(io::Error::other("parent exited before the child started"));
            }
            Ok(())
        })
    }
}

/// Prints `[xtask] <what>: still running (Nm Ns)` every `every` while it lives; stops when dropped.
pub struct Heartbeat {
    done: Arc<AtomicBool>,
}

impl Heartbeat {
    pub fn start(what: String, every: Duration) -> Self {
        let done = Arc::new(AtomicBool::new(false));
        let flag = done.clone();
        std::thread::spawn(move || {
            let start = Instant::now();
            let mut next = every;
            while !flag.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(250));
                let elapsed = start.elapsed();
                if elapsed >= next && !flag.load(Ordering::Relaxed) {
                    crate::say!("{what}: still running ({})", fmt_duration(elapsed));
                    next += every;
                }
            }
        });
        Self { done }
    }
}

impl Drop for Heartbeat {
    fn drop(&mut self) {
        self.done.store(true, Ordering::Relaxed);
    }
}

/// Runs `cmd` with inherited stdout/stderr and a heartbeat every 30 s.
pub fn run_streaming(cmd: &mut Command, what: &str) -> io::Result<ExitStatus> {
    let _beat = Heartbeat::start(what.to_string(), Duration::from_secs(30));
    die_with_parent(cmd).status()
}

/// `1m 05s`, `4.2s`.
pub fn fmt_duration(d: Duration) -> String {
    let s = d.as_secs_f64();
    if s < 60.0 {
        format!("{s:.1}s")
    } else {
        format!("{}m {:02}s", d.as_secs() / 60, d.as_secs() % 60)
    }
}

/// Shows a command the way a person would type it.
pub fn show(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        let a = a.to_string_lossy();
        if a.is_empty() || a.contains(char::is_whitespace) {
            s.push_str(&format!(" '{a}'"));
        } else {
            s.push(' ');
            s.push_str(&a);
        }
    }
    s
}
