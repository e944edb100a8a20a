//! Fuzzes what log-shipper reads back from bytes it did not write itself: an OTLP answer's
//! `partial_success` (arbitrary bytes and any cut of them never panic; one that is found says
//! something) and `loki::parse_labels` (never panics; what it reads, `format_labels` writes in a
//! form that reads back the same, sorted and without empty values).
#![no_main]

use libfuzzer_sys::fuzz_target;
use log_shipper::{loki, otlp};

fuzz_target!(|data: &[u8]| {
    for cut in [data.len(), data.len() / 2, data.len().saturating_sub(1)] {
        if let Some(partial) = otlp::partial_success(&data[..cut]) {
            assert!(partial.rejected > 0 || !partial.message.is_empty());
        }
    }
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(pairs) = loki::parse_labels(text) else {
        return;
    };
    let borrowed: Vec<(&str, &str)> = pairs
        .iter()
        .map(|(n, v)| (n.as_str(), v.as_str()))
        .collect();
    if let Ok(again) = loki::format_labels(&borrowed) {
        let mut want: Vec<(String, String)> =
            pairs.into_iter().filter(|(_, v)| !v.is_empty()).collect();
        want.sort();
        assert_eq!(loki::parse_labels(&again).expect("reads back"), want);
    }
});
