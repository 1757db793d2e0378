//! libFuzzer entry of the `reply` target (see `src/lib.rs`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| virtman_fuzz::reply(data));
