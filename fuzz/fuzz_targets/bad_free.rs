//! Fuzz target `bad_free`: valid operations mixed with injected bad frees, each of which must be reported
//! with its address and reason (goheap feature `checks`), never a crash or corruption elsewhere. Set
//! `GOHEAP_FUZZ_KNOWN_DEFECTS=1` to also inject the kinds issue 12 lists as undetected today.
#![no_main]

use std::sync::OnceLock;

static KNOWN_DEFECTS: OnceLock<bool> = OnceLock::new();

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    goheap_fuzz::run_bad_free(data, *KNOWN_DEFECTS.get_or_init(goheap_fuzz::known_defects_from_env))
});
