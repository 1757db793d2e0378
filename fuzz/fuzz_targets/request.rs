//! libFuzzer entry of the `request` target (see `src/lib.rs`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| virtman_fuzz::request(data));
