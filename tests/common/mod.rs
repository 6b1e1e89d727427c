//! Helpers shared by the object-level tests.
#![allow(dead_code)]

use std::alloc::Layout;

#[allow(unused_imports)] // not every test uses both
pub use testkit::pattern::{check, fill};

pub fn layout(size: usize, align: usize) -> Layout {
    Layout::from_size_align(size, align).unwrap()
}

/// Captures `log` lines with the thread that emitted them (tests run in parallel in one process).
struct Capture;
static LINES: std::sync::Mutex<Vec<(std::thread::ThreadId, String)>> = std::sync::Mutex::new(Vec::new());
impl log::Log for Capture {
    fn enabled(&self, _: &log::Metadata) -> bool {
        true
    }
    fn log(&self, r: &log::Record) {
        LINES.lock().unwrap().push((std::thread::current().id(), format!("{}", r.args())));
    }
    fn flush(&self) {}
}

/// The `log` lines the calling thread emitted so far (the first call installs the capturing logger).
pub fn my_log_lines() -> Vec<String> {
    static INIT: std::sync::Once = std::sync::Once::new();
    INIT.call_once(|| {
        let _ = log::set_logger(&Capture);
        log::set_max_level(log::LevelFilter::Info);
    });
    let me = std::thread::current().id();
    LINES.lock().unwrap().iter().filter(|(t, _)| *t == me).map(|(_, l)| l.clone()).collect()
}
