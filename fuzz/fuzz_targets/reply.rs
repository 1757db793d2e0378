//! Feeds arbitrary bytes to the client-side reply decoders.
#![no_main]

use libfuzzer_sys::fuzz_target;
use virtman_nbd::proto::transmission as tm;

fuzz_target!(|data: &[u8]| {
    if data.len() < 4 {
        return;
    }
    let magic = u32::from_be_bytes(data[..4].try_into().unwrap());
    let _ = tm::decode_reply_header(magic, &data[4..]);
    let _ = tm::decode_block_status(&data[4..]);
    let _ = tm::decode_error(&data[4..]);
    let _ = tm::decode_offset_hole(&data[4..]);
});
