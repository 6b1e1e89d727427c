//! Catching goheap's bad-free reports.
//!
//! goheap's report hook must not return. The harness's hook panics: with an [`Expected`] payload while the
//! current thread is inside [`catch_report`] (an injected bad free), which unwinds to it; otherwise with the
//! report's message, which is a failure (a valid operation was refused, or a bad free was caught late, in
//! the middle of some other operation). The panic hook stays silent for `Expected` panics and hands every
//! other one to the hook that was installed before (libFuzzer's, which prints and aborts; the test
//! harness's). Unwinding out of the hook is sound where goheap reports before touching any state, which is
//! what `checks` promises for the kinds injected; each caught report is followed by a `validate()`.

use goheap::check::BadFree;
use std::cell::Cell;
use std::panic::{self, AssertUnwindSafe};
use std::sync::Once;

/// Panic payload of a report the harness asked for.
pub struct Expected(pub BadFree);

std::thread_local! {
    static EXPECTING: Cell<bool> = const { Cell::new(false) };
}

/// The report hook given to every fuzzed heap (`Malloc::with_report_hook`).
pub fn hook(b: &BadFree) -> ! {
    if EXPECTING.with(Cell::get) {
        panic::panic_any(Expected(*b))
    }
    panic!("unexpected bad-free report outside an injected bad free: {b}")
}

/// Installs (once per process) the panic hook that keeps expected reports quiet.
pub fn install_panic_filter() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let prev = panic::take_hook();
        panic::set_hook(Box::new(move |info| {
            if !info.payload().is::<Expected>() {
                prev(info)
            }
        }));
    });
}

/// Runs `f` (an injected bad free) expecting a report: `Err(report)` if goheap reported, `Ok(r)` if `f`
/// returned. Any other panic goes on unwinding.
pub fn catch_report<R>(f: impl FnOnce() -> R) -> Result<R, BadFree> {
    EXPECTING.with(|e| e.set(true));
    let r = panic::catch_unwind(AssertUnwindSafe(f));
    EXPECTING.with(|e| e.set(false));
    match r {
        Ok(v) => Ok(v),
        Err(payload) => match payload.downcast::<Expected>() {
            Ok(e) => Err(e.0),
            Err(other) => panic::resume_unwind(other),
        },
    }
}
