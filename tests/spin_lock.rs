//! The spin lock every goheap lock is (`sync::SpinMutex`, through `cpu::GuardedMutex`): mutual exclusion
//! under contention with more threads than cores (where a waiter yields after a short spin), `try_lock`,
//! and the fork path's `force_unlock`.

use goheap::sync::SpinMutex;
use std::sync::Arc;

#[test]
fn excludes_under_oversubscription() {
    // 16 threads on however many cores: a non-atomic read-modify-write under the lock loses no update.
    let m = Arc::new(SpinMutex::new(0u64));
    let threads: Vec<_> = (0..16)
        .map(|_| {
            let m = m.clone();
            std::thread::spawn(move || {
                for _ in 0..20_000 {
                    let mut g = m.lock();
                    let v = *g;
                    std::hint::black_box(&v);
                    *g = v + 1;
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    assert_eq!(*m.lock(), 16 * 20_000);
}

#[test]
fn try_lock_and_force_unlock() {
    let m = SpinMutex::new(5);
    let g = m.lock();
    assert!(m.is_locked());
    assert!(m.try_lock().is_none(), "held: try_lock fails at once");
    drop(g);
    assert!(!m.is_locked());
    std::mem::forget(m.try_lock().expect("free"));
    assert!(m.try_lock().is_none());
    // SAFETY: the guard was forgotten just above and is not used.
    unsafe { m.force_unlock() };
    assert_eq!(*m.try_lock().expect("released"), 5);
}
