//! Fuzzes the ClientHello parser: arbitrary bytes never panic, and feeding any prefix of the
//! input never yields a result that differs from the whole input's once it is decided.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sni_proxy::protocol::client_hello::{parse, MAX_CLIENT_HELLO_BYTES};

fuzz_target!(|data: &[u8]| {
    // The first byte picks a cap (as configured: 512..=65536), the rest is the stream.
    let Some((&cap, stream)) = data.split_first() else {
        return;
    };
    let max = if cap == 0 {
        MAX_CLIENT_HELLO_BYTES
    } else {
        512 + usize::from(cap) * 64
    };
    let whole = parse(stream, max);
    if let Ok(Some(hello)) = &whole {
        assert!(hello.record_bytes <= stream.len());
        if let Some(name) = &hello.server_name {
            assert!(!name.is_empty());
            assert!(name
                .bytes()
                .all(|b| b.is_ascii_graphic() && !b.is_ascii_uppercase()));
        }
    }
    for cut in 0..stream.len() {
        match parse(&stream[..cut], max) {
            Ok(None) => {}
            Ok(Some(prefix)) => assert_eq!(Ok(Some(prefix)), whole, "prefix of {cut} bytes"),
            Err(e) => assert_eq!(Err(e), whole, "prefix of {cut} bytes"),
        }
    }
});
