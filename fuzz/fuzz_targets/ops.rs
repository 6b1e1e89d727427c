//! Fuzz target `ops`: valid operation sequences against the shadow model (see `src/lib.rs`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| goheap_fuzz::run_ops(data));
