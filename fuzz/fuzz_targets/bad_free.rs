//! Fuzz target `bad_free`: valid operations mixed with injected bad frees, each of which must be reported
//! with its address and reason (goheap feature `checks`), never a crash or corruption elsewhere.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| goheap_fuzz::run_bad_free(data));
