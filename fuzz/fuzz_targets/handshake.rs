//! Feeds arbitrary bytes to the server-side handshake decoders: client flags,
//! option headers and every option parser.
#![no_main]

use libfuzzer_sys::fuzz_target;
use virtman_nbd::proto::handshake::{self as hs, OPTION_HEADER_LEN};

fuzz_target!(|data: &[u8]| {
    if data.len() < 4 + OPTION_HEADER_LEN {
        return;
    }
    let flags: [u8; 4] = data[..4].try_into().unwrap();
    let _ = hs::decode_client_flags(flags, 3);
    let header: [u8; OPTION_HEADER_LEN] = data[4..4 + OPTION_HEADER_LEN].try_into().unwrap();
    let body = &data[4 + OPTION_HEADER_LEN..];
    if let Ok(h) = hs::decode_option_header(&header) {
        // Parse the body as the announced option, and as every known option.
        let _ = hs::parse_option(h.option, body);
        for code in 1..=11 {
            let _ = hs::parse_option(code, body);
        }
    }
    let _ = hs::Info::decode(body);
    let _ = hs::decode_rep_server(body);
    let _ = hs::decode_rep_meta_context(body);
});
