//! Fuzzes the gRPC message deframer: the input, cut at a point the first byte picks, yields
//! the same messages (or the same error) as the input in one piece, and never panics.
#![no_main]

use konnectivity::proto::grpc::Deframer;
use libfuzzer_sys::fuzz_target;

fn messages(chunks: &[&[u8]]) -> Result<Vec<Vec<u8>>, String> {
    let mut d = Deframer::default();
    let mut out = Vec::new();
    for chunk in chunks {
        d.push(chunk);
        while let Some(m) = d.next_message().map_err(|e| e.to_string())? {
            out.push(m.to_vec());
        }
    }
    Ok(out)
}

fuzz_target!(|data: &[u8]| {
    let Some((&cut, rest)) = data.split_first() else { return };
    let cut = usize::from(cut).min(rest.len());
    let (a, b) = rest.split_at(cut);
    assert_eq!(messages(&[a, b]), messages(&[rest]));
});
