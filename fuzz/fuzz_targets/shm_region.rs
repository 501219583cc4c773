//! A shared-memory channel file with arbitrary contents, as a crashed,
//! hostile or foreign process could leave it: header validation and the
//! ring reader never panic, never hang and never read outside the mapping
//! (the mapping is exactly the file's size, so a read past it would fault),
//! and what a reader takes out is bounded by the record limit.
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use memmap2::{MmapMut, MmapRaw};
use pyipcd::shm::ring::{Channel, Dir, PAGE, file_size};

#[derive(Debug, Arbitrary)]
struct Input {
    /// Ring size 4 KiB << (n % 4).
    ring_shift: u8,
    /// A file half a page short of its layout.
    short: bool,
    /// Start from a real channel with these requests pushed, not zeros.
    initialised: bool,
    requests: Vec<Vec<u8>>,
    /// Bytes written over the file at an offset (mod its length).
    patches: Vec<(u32, Vec<u8>)>,
    pops: u8,
}

fn patch(base: *mut u8, len: usize, patches: &[(u32, Vec<u8>)]) {
    for (at, bytes) in patches {
        let at = *at as usize % len;
        let n = bytes.len().min(len - at);
        // SAFETY: `at + n <= len`, the mapping's length, and the mapping is alive.
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), base.add(at), n) };
    }
}

/// Reads everything it can from both rings, a bounded number of times.
fn drain(channel: &Channel, pops: u8) {
    let max = channel.max_record();
    for dir in [Dir::Request, Dir::Response] {
        let _ = channel.positions(dir);
        let _ = channel.readable(dir);
        for _ in 0..=pops % 32 {
            match channel.pop_in_place(dir, |r| r.payload.len()) {
                Some(n) => assert!(n <= max, "a payload over the record limit"),
                None => break,
            }
        }
        if let Some(record) = channel.try_pop(dir) {
            assert!(record.payload.len() <= max);
        }
    }
}

fuzz_target!(|input: Input| {
    let ring = 4096usize << (input.ring_shift % 4);
    let len = file_size(ring) - if input.short { PAGE / 2 } else { 0 };
    let raw = MmapRaw::from(MmapMut::map_anon(len).expect("anonymous mapping"));
    let base = raw.as_mut_ptr();
    if input.initialised && !input.short {
        // A real channel with records in its request ring, then corrupted:
        // the reader must cope with torn headers, lengths and positions.
        let Ok(channel) = Channel::initialise(raw, ring, ring / 2 - 24, 1) else {
            return;
        };
        for (seq, payload) in input.requests.iter().enumerate() {
            let payload = &payload[..payload.len().min(channel.max_record())];
            if !channel.try_push(Dir::Request, seq as u32, 0, 0, payload) {
                break;
            }
        }
        patch(base, len, &input.patches);
        drain(&channel, input.pops);
        // The same bytes, attached as a client would: header checks first.
        let copy = MmapRaw::from(MmapMut::map_anon(len).unwrap());
        // SAFETY: both mappings are `len` bytes long and alive.
        unsafe { std::ptr::copy_nonoverlapping(base, copy.as_mut_ptr(), len) };
        if let Ok(attached) = Channel::attach(copy) {
            drain(&attached, input.pops);
        }
    } else {
        patch(base, len, &input.patches);
        if let Ok(channel) = Channel::attach(raw) {
            drain(&channel, input.pops);
        }
    }
});
