//! Fuzzes the CRI `Reader` with an oracle: arbitrary bytes never panic; the results do not
//! depend on how the bytes are cut into chunks (one piece, two pieces at a fuzzed point, small
//! chunks of a fuzzed size); checkpoints never decrease and never pass the end of the input;
//! every entry fits the maximum and a split one fills it exactly.
#![no_main]

use libfuzzer_sys::fuzz_target;
use log_shipper::cri::{End, Event, Reader};

fn read(data: &[u8], cuts: impl Iterator<Item = usize>, max: usize) -> Vec<Event> {
    let mut reader = Reader::new(0, max);
    let mut events = Vec::new();
    let mut prev = 0;
    for cut in cuts.chain([data.len()]) {
        let cut = cut.clamp(prev, data.len());
        reader.push(&data[prev..cut]);
        events.extend(reader.by_ref());
        prev = cut;
    }
    reader.finish();
    events.extend(reader.by_ref());
    events
}

fuzz_target!(|input: &[u8]| {
    let [max, split, chunk, data @ ..] = input else {
        return;
    };
    let max = usize::from(*max % 64) + 1;
    let split = usize::from(*split) * data.len() / 255;
    let chunk = usize::from(*chunk % 16) + 1;

    let whole = read(data, std::iter::empty(), max);
    assert_eq!(read(data, std::iter::once(split), max), whole);
    assert_eq!(read(data, (chunk..data.len()).step_by(chunk), max), whole);

    let mut last = 0;
    for event in &whole {
        let checkpoint = match event {
            Ok(entry) => {
                assert!(entry.content.len() <= max);
                if entry.end == End::Split {
                    assert_eq!(entry.content.len(), max);
                }
                entry.checkpoint
            }
            Err(malformed) => {
                assert!(malformed.start < malformed.end);
                malformed.checkpoint
            }
        };
        assert!(last <= checkpoint && checkpoint <= data.len() as u64);
        last = checkpoint;
    }
});
