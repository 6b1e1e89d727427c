//! `fork()` from a multi-threaded program whose global allocator is `goheap::Hosted`: the child must be able
//! to allocate, whatever locks the other threads held when the parent forked (issue 11).
#![cfg(feature = "std")]

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[global_allocator]
static GLOBAL: goheap::Hosted = goheap::Hosted::new();

/// Allocation churn over every tier: tiny, small (stocks overflow to the central lists, refills), large
/// (heap lock), plus `background` and `release_all` now and then (sweep and scavenger paths).
fn churn(stop: &AtomicBool, seed: u64) {
    let mut x = seed | 1;
    let mut keep: Vec<Vec<u8>> = Vec::new();
    let mut round = 0u64;
    while !stop.load(Ordering::Relaxed) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let size = match x % 16 {
            0 => (64 << 10) + (x as usize >> 20) % 300_000,
            1..=4 => 1 + (x as usize >> 8) % 15,
            _ => 16 + (x as usize >> 8) % 4000,
        };
        keep.push(vec![x as u8; size]);
        if keep.len() > 2000 {
            keep.drain(..1000);
        }
        round += 1;
        if round % 5000 == 0 {
            GLOBAL.background(64, 1 << 20);
        }
        if round % 50_000 == 0 {
            GLOBAL.release_all();
        }
    }
}

/// Waits for `pid` up to `limit`; `Some(status)` if it exited, `None` if it still runs (then kills it). A
/// child that works needs milliseconds (seconds at worst on a loaded machine: the limit is generous); one
/// that waits for a lock no thread will release spins forever.
fn wait_child(pid: libc::pid_t, limit: Duration) -> Option<libc::c_int> {
    let start = Instant::now();
    loop {
        let mut status = 0;
        // SAFETY: plain system call on our own child.
        let r = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
        if r == pid {
            return Some(status);
        }
        assert_eq!(r, 0, "waitpid failed");
        if start.elapsed() > limit {
            // SAFETY: our own child, not yet reaped.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
                libc::waitpid(pid, &mut status, 0);
            }
            return None;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

#[test]
fn forks_from_allocating_threads_never_hang_the_child() {
    const THREADS: u64 = 4;
    const FORKS: usize = 100;
    const MAX_HANGS: usize = 5;
    let stop = Arc::new(AtomicBool::new(false));
    let workers: Vec<_> = (0..THREADS)
        .map(|t| {
            let stop = stop.clone();
            std::thread::spawn(move || churn(&stop, 0x9E37_79B9_7F4A_7C15 ^ (t + 1)))
        })
        .collect();
    let (mut hangs, mut failed, mut forks) = (0, 0, 0);
    for i in 0..FORKS {
        if hangs == MAX_HANGS {
            break; // enough to fail; each hang costs the whole time limit
        }
        forks += 1;
        std::thread::sleep(Duration::from_micros(200 + (i as u64 * 37) % 800));
        // SAFETY: the child only allocates, frees and `_exit`s.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork failed");
        if pid == 0 {
            // Child: the only thread left. Allocate through every tier, check, free, exit.
            let mut ok = true;
            let mut v: Vec<Vec<u8>> = Vec::new();
            for k in 0..70usize {
                let size = [3, 24, 100, 700, 5000, 40_000, 300_000][k % 7];
                v.push(vec![k as u8; size]);
            }
            for (k, b) in v.iter().enumerate() {
                ok &= b.iter().all(|&x| x == k as u8);
            }
            drop(v);
            GLOBAL.release_all();
            // SAFETY: ends the child without running the parent's atexit handlers or test harness.
            unsafe { libc::_exit(if ok { 0 } else { 3 }) };
        }
        match wait_child(pid, Duration::from_secs(20)) {
            None => hangs += 1,
            Some(status) if !(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0) => failed += 1,
            Some(_) => {}
        }
    }
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.join().unwrap();
    }
    println!("{forks} forks: {hangs} children hung (killed after 20 s), {failed} failed");
    assert_eq!((hangs, failed), (0, 0), "of {forks} forked children, (hung, failed)");
}
