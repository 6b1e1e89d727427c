/// The workload groups, one process each, in the order `cargo xtask bench` runs them (fast-path ones first).
/// The single list: `bench/src/main.rs` and `xtask/src/bench.rs` both `include!` this file.
pub const GROUPS: &[&str] = &[
    "pair",
    "batch",
    "wset1",
    "wset2",
    "rust",
    "larson",
    "prodcons64",
    "prodcons-mixed",
    "rptest",
    "large",
    "latency",
    "frag",
];
