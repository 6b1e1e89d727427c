//! Deliberate bugs for `cargo xtask sanitize`: `canary thread` writes a plain static from two threads
//! without synchronisation (ThreadSanitizer must report a data race), `canary address` reads a freed heap
//! block (AddressSanitizer must report a heap use after free). Built only with a sanitizer.

use std::ptr::{addr_of_mut, read_volatile};

/// Written by two threads without synchronisation: the race TSan must see.
static mut COUNTER: u64 = 0;

fn race() {
    // SAFETY: none: a deliberate data race for the sanitizer to report.
    let t = std::thread::spawn(|| unsafe { *addr_of_mut!(COUNTER) = 1 });
    // SAFETY: as above.
    unsafe { *addr_of_mut!(COUNTER) = 2 };
    t.join().expect("the racing thread ends");
}

fn use_after_free() {
    let p = Box::into_raw(Box::new([7u8; 64]));
    // SAFETY: `p` came from Box::into_raw above.
    drop(unsafe { Box::from_raw(p) });
    // SAFETY: none: a deliberate read of the freed block for the sanitizer to report.
    let v = unsafe { read_volatile(p.cast::<u8>()) };
    println!("read {v} from a freed block");
}

fn main() {
    match std::env::args().nth(1).as_deref() {
        Some("thread") => race(),
        Some("address") => use_after_free(),
        _ => {
            eprintln!("usage: sanitizer-canary thread|address");
            std::process::exit(2);
        }
    }
}
