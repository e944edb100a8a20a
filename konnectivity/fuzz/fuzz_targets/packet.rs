//! Fuzzes the `Packet` decoder with an oracle: arbitrary bytes never panic, and a decoded
//! packet (of a known type) re-encodes to bytes that decode to the same packet.
#![no_main]

use bytes::Bytes;
use konnectivity::proto::packet::Packet;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(packet) = Packet::decode(&Bytes::copy_from_slice(data)) {
        if !matches!(packet, Packet::Unknown { .. }) {
            let again = Packet::decode(&packet.to_bytes()).expect("re-encoded packet decodes");
            assert_eq!(again, packet);
        }
    }
});
