//! Each framing's decoder on an arbitrary stream cut into arbitrary chunks:
//! no panic, never more buffered than one message of `max_message` (plus
//! its framing) while waiting for the rest, and messages encoded then
//! decoded come back unchanged, however the stream is cut.
#![no_main]

use arbitrary::Arbitrary;
use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use pyipcd::config::Framing;
use pyipcd::tcp::framing::FrameCodec;
use tokio_util::codec::Decoder;

#[derive(Debug, Arbitrary)]
struct Input {
    framing: u8,
    max: u16,
    /// Raw bytes as they arrive, read by read.
    chunks: Vec<Vec<u8>>,
    /// Messages to encode, and where to cut the encoded stream.
    messages: Vec<Vec<u8>>,
    cuts: Vec<u16>,
}

fn framing(n: u8) -> (Framing, usize) {
    match n % 3 {
        0 => (Framing::Raw, 0),
        1 => (Framing::Line, 1),
        _ => (Framing::Len32, 4),
    }
}

fuzz_target!(|input: Input| {
    let (kind, overhead) = framing(input.framing);
    let max = usize::from(input.max).max(1);

    // Arbitrary bytes: decode until an error, checking what stays buffered.
    let mut codec = FrameCodec::new(kind, max);
    let mut buf = BytesMut::new();
    'stream: for chunk in &input.chunks {
        buf.extend_from_slice(chunk);
        loop {
            match codec.decode(&mut buf) {
                Ok(Some(msg)) => assert!(msg.len() <= max, "a message over max_message"),
                Ok(None) => {
                    assert!(
                        buf.len() <= max + overhead,
                        "{kind:?}: {} bytes buffered for one message (max {max})",
                        buf.len()
                    );
                    break;
                }
                Err(_) => break 'stream,
            }
        }
    }

    // Round trip: what is encoded decodes to the same messages.
    let mut codec = FrameCodec::new(kind, max);
    let messages: Vec<&[u8]> = input
        .messages
        .iter()
        .map(|m| &m[..m.len().min(max)])
        .filter(|m| match kind {
            // A line cannot hold a newline; raw has no boundaries to keep.
            Framing::Line => !m.contains(&b'\n'),
            Framing::Raw => false,
            Framing::Len32 => true,
        })
        .collect();
    let mut wire = BytesMut::new();
    for m in &messages {
        codec
            .encode_slice(m, &mut wire)
            .expect("within max_message");
    }
    let mut decoded = Vec::new();
    let mut buf = BytesMut::new();
    let mut at = 0;
    let mut cuts = input.cuts.iter().map(|&c| usize::from(c) + 1);
    while at < wire.len() {
        let n = cuts.next().unwrap_or(wire.len()).min(wire.len() - at);
        buf.extend_from_slice(&wire[at..at + n]);
        at += n;
        while let Some(m) = codec.decode(&mut buf).expect("a valid stream") {
            decoded.push(m);
        }
    }
    assert!(buf.is_empty(), "bytes left over");
    assert_eq!(decoded.len(), messages.len());
    for (d, m) in decoded.iter().zip(&messages) {
        assert_eq!(&d[..], *m);
    }
});
