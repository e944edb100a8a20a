//! Fuzzes the HTTP CONNECT request-head parser: arbitrary bytes never panic and a parsed head
//! never claims more bytes than it was given or than the cap.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sni_proxy::protocol::http_connect::{parse, MAX_REQUEST_HEAD};

fuzz_target!(|data: &[u8]| {
    if let Ok(Some(request)) = parse(data) {
        assert!(request.head_len <= data.len());
        assert!(request.head_len <= MAX_REQUEST_HEAD);
        assert_eq!(parse(&data[..request.head_len]), Ok(Some(request)));
    }
});
