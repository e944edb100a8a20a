//! Fuzzes the PROXY protocol parser: arbitrary bytes never panic, a parsed header never claims
//! more bytes than it was given, and a parsed v2 header's addresses and TLVs survive
//! `encode_v2` and a second parse.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sni_proxy::protocol::proxy_protocol::{encode_v2, parse, Version};

fuzz_target!(|data: &[u8]| {
    let Ok(Some(header)) = parse(data) else {
        return;
    };
    assert!(header.len <= data.len());
    assert_eq!(parse(&data[..header.len]), Ok(Some(header.clone())));
    if let (Version::V2, Some(addrs)) = (header.version, header.addresses) {
        let tlvs: Vec<(u8, &[u8])> = header
            .tlvs
            .iter()
            .map(|(t, v)| (*t, v.as_slice()))
            .collect();
        let mut out = Vec::new();
        encode_v2(&addrs, &tlvs, &mut out);
        let again = parse(&out).ok().flatten().expect("encoded header parses");
        assert_eq!(again.len, out.len());
        assert_eq!(again.addresses, Some(addrs));
        assert_eq!(again.tlvs, header.tlvs);
    }
});
