//! `ThreadSlots` at thread exit (issue 11): a slot is released whatever the order of TLS and pthread TSD
//! destructors, and a thread that found every slot taken gets one once a slot frees. The slot table is
//! process-wide, so the tests of this file run one at a time.
#![cfg(feature = "std")]

use goheap::cpu::{CpuProvider, ThreadSlots, MAX_CPUS};
use goheap::source::mmap::MmapSource;
use goheap::Malloc;
use std::alloc::Layout;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Mutex};

static SERIAL: Mutex<()> = Mutex::new(());

type M = Malloc<MmapSource, ThreadSlots>;
static MALLOC: M = Malloc::with_max_bytes(MmapSource::new(), ThreadSlots::new(), 1 << 30);

/// The slot the TSD destructor's thread used (`usize::MAX`: none yet).
static DTOR_SLOT: AtomicUsize = AtomicUsize::new(usize::MAX);
static DTOR_RUNS: AtomicUsize = AtomicUsize::new(0);

/// A pthread TSD destructor whose allocation is the thread's first: it claims a slot during thread exit.
extern "C" fn allocate_in_destructor(_: *mut libc::c_void) {
    let layout = Layout::from_size_align(48, 8).unwrap();
    let p = MALLOC.alloc(layout);
    assert!(!p.is_null());
    // SAFETY (test): allocated just above with `layout`.
    unsafe { MALLOC.dealloc(p, layout) };
    DTOR_SLOT.store(ThreadSlots::new().enter_leaf().1.unwrap_or(usize::MAX - 1), Ordering::SeqCst);
    DTOR_RUNS.fetch_add(1, Ordering::SeqCst);
}

#[test]
fn first_allocation_in_a_tsd_destructor_releases_its_slot() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut key: libc::pthread_key_t = 0;
    // SAFETY (test): valid out-pointer; the destructor never unwinds (an assertion failure aborts).
    assert_eq!(unsafe { libc::pthread_key_create(&mut key, Some(allocate_in_destructor)) }, 0);
    let owned_before = ThreadSlots::owned_count();
    for round in 0..3 {
        std::thread::spawn(move || {
            // SAFETY (test): a live key; the value is never dereferenced.
            unsafe { libc::pthread_setspecific(key, core::ptr::dangling::<libc::c_void>()) };
        })
        .join()
        .unwrap();
        // `join` returns once the thread has terminated, after its TSD destructors.
        assert_eq!(DTOR_RUNS.load(Ordering::SeqCst), round + 1);
        let slot = DTOR_SLOT.load(Ordering::SeqCst);
        assert!(slot < MAX_CPUS, "the destructor's allocation got no slot ({slot:#x})");
        assert!(!ThreadSlots::is_owned(slot), "round {round}: slot {slot} stayed owned after its thread exited");
        assert_eq!(ThreadSlots::owned_count(), owned_before, "round {round}: a slot leaked");
    }
    // SAFETY (test): no thread uses the key any more.
    unsafe { libc::pthread_key_delete(key) };
}

#[test]
fn ordinary_threads_release_their_slots() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let slot = std::thread::spawn(|| {
        let layout = Layout::from_size_align(100, 8).unwrap();
        let p = MALLOC.alloc(layout);
        // SAFETY (test): allocated just above with `layout`.
        unsafe { MALLOC.dealloc(p, layout) };
        ThreadSlots::new().enter_leaf().1.expect("a slot")
    })
    .join()
    .unwrap();
    assert!(!ThreadSlots::is_owned(slot), "slot {slot} stayed owned after its thread exited");
}

#[test]
fn a_thread_without_a_slot_gets_one_once_a_slot_frees() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let p = ThreadSlots::new();
    // Holders take every free slot and keep it until told to exit.
    let mut holders = Vec::new();
    loop {
        let (got_tx, got_rx) = mpsc::channel();
        let (exit_tx, exit_rx) = mpsc::channel::<()>();
        let h = std::thread::spawn(move || {
            let (g, s) = ThreadSlots::new().enter();
            drop(g);
            got_tx.send(s).unwrap();
            if s.is_some() {
                let _ = exit_rx.recv();
            }
        });
        match got_rx.recv().unwrap() {
            Some(_) => holders.push((h, exit_tx)),
            None => {
                h.join().unwrap();
                break;
            }
        }
        assert!(holders.len() <= MAX_CPUS);
    }
    assert_eq!(ThreadSlots::owned_count(), MAX_CPUS);

    // A thread that finds no slot, waits for one to free, and asks again.
    let (tx, rx) = mpsc::channel();
    let (go_tx, go_rx) = mpsc::channel::<()>();
    let late = std::thread::spawn(move || {
        let p = ThreadSlots::new();
        let first = p.enter().1;
        let leaf_first = p.enter_leaf().1;
        tx.send(()).unwrap();
        go_rx.recv().unwrap();
        let (g, second) = p.enter();
        drop(g);
        (first, leaf_first, second, p.enter_leaf().1)
    });
    rx.recv().unwrap();
    let (h, exit_tx) = holders.pop().unwrap();
    exit_tx.send(()).unwrap();
    h.join().unwrap();
    go_tx.send(()).unwrap();
    let (first, leaf_first, second, leaf_second) = late.join().unwrap();
    assert_eq!((first, leaf_first), (None, None), "the late thread found a slot while all were held");
    let second = second.expect("the late thread got no slot after one was released");
    assert_eq!(leaf_second, Some(second), "the fast path does not use the new slot");

    for (h, exit_tx) in holders {
        exit_tx.send(()).unwrap();
        h.join().unwrap();
    }
    let _ = p;
}
