//! `Hosted`: goheap as a Linux program's `#[global_allocator]` (feature `std`).
//!
//! See `lib.rs` for an overview of the allocator.
//!
//! ```ignore
//! #[global_allocator]
//! static GLOBAL: goheap::Hosted = goheap::Hosted::new();
//! ```
//!
//! It is [`Malloc`] over the mmap page source with one cache slot per thread ([`ThreadSlots`]); bad frees
//! are printed to stderr without allocating and abort the process (a global allocator must not unwind).
//! The crate starts no thread by itself: call [`Hosted::start_background`] for a thread that runs the sweep
//! and the scavenger periodically, or call [`Malloc::background`] from a thread of your own.

use crate::check::BadFree;
use crate::cpu::ThreadSlots;
use crate::malloc::Malloc;
use crate::source::mmap::MmapSource;
use core::alloc::{GlobalAlloc, Layout};
use core::fmt::Write;
use core::ops::Deref;
use std::time::Duration;

/// The hosted allocator: `Malloc<MmapSource, ThreadSlots>`, usable as `#[global_allocator]`.
#[derive(Debug)]
pub struct Hosted(Malloc<MmapSource, ThreadSlots>);

/// A fixed buffer for formatting a report without allocating.
struct StackBuf {
    buf: [u8; 512],
    len: usize,
}

impl Write for StackBuf {
    fn write_str(&mut self, s: &str) -> core::fmt::Result {
        let n = s.len().min(self.buf.len() - self.len);
        self.buf[self.len..self.len + n].copy_from_slice(&s.as_bytes()[..n]);
        self.len += n;
        Ok(())
    }
}

fn abort_hook(b: &BadFree) -> ! {
    let mut out = StackBuf { buf: [0; 512], len: 0 };
    let _ = writeln!(out, "{b}");
    // SAFETY: writes `len` initialised bytes from our buffer to fd 2.
    unsafe { libc::write(2, out.buf.as_ptr().cast(), out.len) };
    std::process::abort()
}

impl Hosted {
    /// The allocator; nothing is reserved until the first allocation.
    pub const fn new() -> Self {
        Hosted(Malloc::new(MmapSource::new(), ThreadSlots::new()).with_report_hook(abort_hook))
    }

    /// Spawns a thread that calls [`Malloc::background`] every `period`, returning empty spans to the page
    /// heap and letting the scavenger give memory back to the OS.
    pub fn start_background(&'static self, period: Duration) -> std::thread::JoinHandle<()> {
        std::thread::Builder::new()
            .name("goheap-background".into())
            .spawn(move || loop {
                self.0.background(64, 1 << 20);
                std::thread::sleep(period);
            })
            .expect("spawn goheap background thread")
    }
}

impl Default for Hosted {
    fn default() -> Self {
        Self::new()
    }
}

impl Deref for Hosted {
    type Target = Malloc<MmapSource, ThreadSlots>;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

// SAFETY: forwards to `Malloc`'s `GlobalAlloc` implementation, whose bad-free reports abort here.
unsafe impl GlobalAlloc for Hosted {
    #[inline]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        self.0.alloc(layout)
    }
    #[inline]
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        self.0.alloc_zeroed(layout)
    }
    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded contract.
        unsafe { self.0.dealloc(ptr, layout) }
    }
    #[inline]
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: forwarded contract.
        unsafe { self.0.realloc(ptr, layout, new_size) }
    }
}
