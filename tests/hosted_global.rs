//! A program whose global allocator is `goheap::Hosted`, doing ordinary std work.
#![cfg(feature = "std")]

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

#[global_allocator]
static GLOBAL: goheap::Hosted = goheap::Hosted::new();

#[test]
fn collections_strings_threads() {
    let before = GLOBAL.mem_stats();
    let mut map = HashMap::new();
    let mut tree = BTreeMap::new();
    for i in 0..50_000u64 {
        map.insert(i, format!("value-{i}"));
        tree.insert(format!("key-{i:08}"), vec![i as u8; (i % 300) as usize]);
    }
    let mut s = String::new();
    for i in 0..10_000 {
        s.push_str(&i.to_string());
    }
    assert_eq!(map[&4242], "value-4242");
    assert_eq!(tree["key-00000299"].len(), 299);
    assert!(s.starts_with("0123456789101112"));

    let shared = Arc::new(tree);
    let handles: Vec<_> = (0..4)
        .map(|t| {
            let shared = shared.clone();
            std::thread::spawn(move || {
                let mut total = 0usize;
                let mut v: Vec<Box<[u8]>> = Vec::new();
                for i in 0..20_000 {
                    v.push(vec![t as u8; i % 700 + 1].into_boxed_slice());
                    if v.len() > 1000 {
                        v.drain(..500);
                    }
                    total += shared.len();
                }
                (total, v)
            })
        })
        .collect();
    // Vectors built on other threads are dropped here: cross-thread frees.
    for h in handles {
        let (total, v) = h.join().unwrap();
        assert_eq!(total, 20_000 * 50_000);
        assert!(v.iter().all(|b| b.iter().all(|&x| x == b[0])));
    }
    drop(map);
    drop(shared);
    let big: Vec<u64> = (0..1_000_000).collect(); // a large object (8 MB)
    assert_eq!(big.iter().sum::<u64>(), 499_999_500_000);
    let after = GLOBAL.mem_stats();
    assert!(after.mallocs > before.mallocs + 100_000, "goheap did not serve the program: {after:?}");
    assert!(after.large_allocs > before.large_allocs);
}
