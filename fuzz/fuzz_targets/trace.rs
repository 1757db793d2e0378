//! libFuzzer entry of the `trace` target (see `src/lib.rs`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| virtman_fuzz::trace(data));
