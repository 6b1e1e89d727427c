//! Multi-thread stress with cross-thread frees: producer/consumer pipelines and random hand-offs between
//! threads, every object filled with a pattern and checked when freed.
#![cfg(all(feature = "std", feature = "validate"))]

mod common;

use common::{check, fill, layout};
use goheap::cpu::ThreadSlots;
use goheap::source::mmap::MmapSource;
use goheap::Malloc;
use std::sync::mpsc;
use std::sync::{Arc, Barrier, Mutex};
use testkit::Rng;

type M = Malloc<MmapSource, ThreadSlots>;

fn new_malloc() -> &'static M {
    Box::leak(Box::new(Malloc::with_max_bytes(MmapSource::new(), ThreadSlots::new(), 4 << 30)))
}

#[derive(Clone, Copy)]
struct Obj {
    addr: usize,
    size: usize,
    align: usize,
    seed: u64,
}

fn make(m: &M, size: usize, align: usize, seed: u64) -> Obj {
    let p = m.alloc(layout(size, align));
    assert!(!p.is_null());
    assert_eq!(p as usize % align, 0);
    // SAFETY: `p` is a fresh block of `size` bytes.
    unsafe { fill(p, size, seed) };
    Obj { addr: p as usize, size, align, seed }
}

fn free(m: &M, o: Obj) {
    // SAFETY: `o` is live (made by `make`, freed only here, once) and `o.size` bytes long.
    let contents = unsafe { check(o.addr as *const u8, o.size, o.seed) };
    assert_eq!(contents, Ok(()), "object {:#x} ({} B) was overwritten", o.addr, o.size);
    // SAFETY (test): allocated by `m` with this layout, freed once.
    unsafe { m.dealloc(o.addr as *mut u8, layout(o.size, o.align)) };
}

#[test]
fn producer_consumer_64b_and_mixed() {
    let m = new_malloc();
    for mixed in [false, true] {
        let (tx, rx) = mpsc::sync_channel::<Vec<Obj>>(64);
        let producer = std::thread::spawn(move || {
            let mut rng = Rng::new(7);
            for batch in 0..400u64 {
                let v: Vec<Obj> = (0..64)
                    .map(|i| {
                        let size = if mixed { 8 + (rng.next() % 2041) as usize } else { 64 };
                        make(m, size, 8, batch * 1000 + i)
                    })
                    .collect();
                tx.send(v).unwrap();
            }
        });
        let consumer = std::thread::spawn(move || {
            let mut n = 0;
            for v in rx {
                for o in v {
                    free(m, o);
                    n += 1;
                }
            }
            n
        });
        producer.join().unwrap();
        assert_eq!(consumer.join().unwrap(), 400 * 64);
    }
    m.validate();
    let st = m.mem_stats();
    assert_eq!(st.mallocs - st.frees, st.heap_objects);
    assert!(st.remote_frees > 0, "a consumer freeing a producer's objects made no cross-CPU free: {st:?}");
}

#[test]
fn random_handoffs_between_threads() {
    const THREADS: usize = 6;
    const ROUNDS: usize = 20;
    let m = new_malloc();
    let inboxes: Arc<Vec<Mutex<Vec<Obj>>>> = Arc::new((0..THREADS).map(|_| Mutex::new(Vec::new())).collect());
    let barrier = Arc::new(Barrier::new(THREADS));
    let handles: Vec<_> = (0..THREADS)
        .map(|t| {
            let inboxes = inboxes.clone();
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                let mut rng = Rng::new(0x1234_5678 + t as u64);
                let mut mine: Vec<Obj> = Vec::new();
                for round in 0..ROUNDS {
                    for i in 0..300 {
                        let size = match rng.next() % 10 {
                            0..=3 => 1 + (rng.next() % 15) as usize,
                            4..=7 => 16 + (rng.next() % 1000) as usize,
                            8 => 1024 + (rng.next() % 31744) as usize,
                            _ => 32769 + (rng.next() % 100_000) as usize,
                        };
                        let align = 1 << (rng.next() % 7);
                        mine.push(make(m, size, align, ((t * ROUNDS + round) * 1000 + i) as u64));
                    }
                    // Give a third away to random threads, free a third here, keep the rest a while.
                    let mut keep = Vec::new();
                    for o in mine.drain(..) {
                        match rng.next() % 3 {
                            0 => inboxes[(rng.next() % THREADS as u64) as usize].lock().unwrap().push(o),
                            1 => free(m, o),
                            _ => keep.push(o),
                        }
                    }
                    mine = keep;
                    let got: Vec<Obj> = std::mem::take(&mut *inboxes[t].lock().unwrap());
                    for o in got {
                        free(m, o);
                    }
                }
                barrier.wait();
                for o in mine {
                    free(m, o);
                }
                barrier.wait();
                let got: Vec<Obj> = std::mem::take(&mut *inboxes[t].lock().unwrap());
                for o in got {
                    free(m, o);
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    m.validate();
    let st = m.mem_stats();
    assert_eq!(st.live_objects(), 0, "{st:?}");
    // Each thread's current tiny block counts as live (one heap object, as in Go) until that cache retires
    // it.
    assert!(st.heap_alloc <= (16 * THREADS) as u64 && st.heap_objects == st.heap_alloc / 16, "{st:?}");
}

/// More threads than cache slots: the extra threads must fall back to the shared cache and stay correct.
#[test]
fn more_threads_than_slots() {
    let m = new_malloc();
    let handles: Vec<_> = (0..goheap::cpu::MAX_CPUS + 8)
        .map(|t| {
            std::thread::spawn(move || {
                let objs: Vec<Obj> = (0..200).map(|i| make(m, 8 + (i * 13) % 500, 8, (t * 1000 + i) as u64)).collect();
                std::thread::sleep(std::time::Duration::from_millis(50));
                for o in objs {
                    free(m, o);
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    m.validate();
    // Every object freed; the threads' current tiny blocks may still count as heap objects (as in Go).
    let st = m.mem_stats();
    assert_eq!(st.live_objects(), 0, "{st:?}");
    assert_eq!(st.heap_objects, st.tiny_blocks, "{st:?}");
}
