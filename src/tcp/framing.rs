//! Wire framings as one tokio-util codec: `raw` (each read is a message, at
//! most `max_message` bytes, like `recv(max_message)`),
//! `line` (newline-delimited) and `len32` (4-byte big-endian length prefix).
//! Limits are checked before buffering: a `len32` prefix over `max_message`
//! fails at once, without waiting for (or allocating) the body.

use bytes::{Buf, Bytes, BytesMut};
use tokio_util::codec::{AnyDelimiterCodec, Decoder, Encoder, LengthDelimitedCodec};

use crate::config::Framing;

/// Spare room kept in a read buffer: reads into less than this are likely
/// to stop short of the next message (a second `read` for one message).
const MIN_SPARE: usize = 8 * 1024;
/// What a read buffer grows by when it is short of room.
const READ_CHUNK: usize = 32 * 1024;

/// Called after a message of `wire_len` bytes was taken out of `buf` (the
/// reader's buffer): makes sure the next read has room for at least one more
/// message that size. Without this a split-off buffer shrinks message by
/// message until a message takes two reads and a copy (a 16 KiB message in a
/// 32 KiB buffer did, every time).
fn keep_room(buf: &mut BytesMut, wire_len: usize) {
    let want = wire_len.max(MIN_SPARE);
    if buf.capacity() - buf.len() < want {
        grow_read_buffer(buf, want.max(READ_CHUNK));
    }
}

/// Bytes skipped at the start of a new read buffer, so its data does not
/// begin on a page boundary. mimalloc hands out page-aligned blocks at these
/// sizes, and the kernel copies a large Unix-socket message out of
/// page-aligned pages: a copy between addresses at the same offset in their
/// pages ran at half speed (a 16 KiB Unix echo: 42–62k msg/s with aligned
/// buffers, 79–124k skewed by 64–2048 bytes; TCP unchanged; see
/// docs/PERFORMANCE.md). Two cache lines.
const SKEW: usize = 128;

/// Makes room for `want` more bytes in a read buffer: an empty one is
/// replaced by a new one that starts [`SKEW`] bytes into its allocation.
pub(crate) fn grow_read_buffer(buf: &mut BytesMut, want: usize) {
    if buf.is_empty() {
        let mut fresh = BytesMut::with_capacity(want + SKEW);
        fresh.extend_from_slice(&[0u8; SKEW]);
        fresh.advance(SKEW);
        *buf = fresh;
    } else {
        buf.reserve(want);
    }
}

/// Why a stream cannot be decoded any further.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// A message longer than `max_message`.
    #[error("message longer than {0} bytes")]
    TooLarge(usize),
    /// The peer closed the connection in the middle of a message.
    #[error("connection closed in the middle of a message")]
    Truncated,
    /// The socket failed.
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// A codec for one of the [`Framing`]s.
#[derive(Debug)]
pub enum FrameCodec {
    /// Each read is a message, cut at the limit (like `recv(max)`).
    Raw(usize),
    /// Newline-delimited.
    Line(AnyDelimiterCodec),
    /// Length-prefixed.
    Len32(LengthDelimitedCodec),
}

impl FrameCodec {
    /// A codec for `framing` that refuses messages over `max` bytes.
    pub fn new(framing: Framing, max: usize) -> Self {
        match framing {
            Framing::Raw => FrameCodec::Raw(max.max(1)),
            Framing::Line => FrameCodec::Line(AnyDelimiterCodec::new_with_max_length(
                b"\n".to_vec(),
                b"\n".to_vec(),
                max,
            )),
            Framing::Len32 => FrameCodec::Len32(
                LengthDelimitedCodec::builder()
                    .big_endian()
                    .length_field_type::<u32>()
                    .max_frame_length(max)
                    .new_codec(),
            ),
        }
    }

    fn max(&self) -> usize {
        match self {
            FrameCodec::Raw(max) => *max,
            FrameCodec::Line(c) => c.max_length(),
            FrameCodec::Len32(c) => c.max_frame_length(),
        }
    }

    fn map_err(&self, e: std::io::Error) -> FrameError {
        let text = e.to_string();
        if text.contains("frame size too big") {
            FrameError::TooLarge(self.max())
        } else if text.contains("bytes remaining on stream") {
            FrameError::Truncated
        } else {
            FrameError::Io(e)
        }
    }
}

impl Decoder for FrameCodec {
    type Item = Bytes;
    type Error = FrameError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Bytes>, FrameError> {
        let (frame, framing_bytes) = match self {
            FrameCodec::Raw(max) => (take_raw(src, *max), 0),
            FrameCodec::Line(c) => (c.decode(src).map_err(|e| line_err(e, c.max_length()))?, 1),
            FrameCodec::Len32(c) => {
                let r = c.decode(src);
                (
                    r.map(|f| f.map(BytesMut::freeze))
                        .map_err(|e| self.map_err(e))?,
                    4,
                )
            }
        };
        if let Some(f) = &frame {
            keep_room(src, f.len() + framing_bytes);
        }
        Ok(frame)
    }

    fn decode_eof(&mut self, src: &mut BytesMut) -> Result<Option<Bytes>, FrameError> {
        match self {
            FrameCodec::Raw(max) => Ok(take_raw(src, *max)),
            // A last line without its newline is still a message (as `nc` sends it).
            FrameCodec::Line(c) => c.decode_eof(src).map_err(|e| line_err(e, c.max_length())),
            FrameCodec::Len32(c) => {
                let r = c.decode_eof(src);
                r.map(|f| f.map(BytesMut::freeze))
                    .map_err(|e| self.map_err(e))
            }
        }
    }
}

/// A raw message: what the reads delivered, at most `max` bytes of it.
fn take_raw(src: &mut BytesMut, max: usize) -> Option<Bytes> {
    (!src.is_empty()).then(|| src.split_to(src.len().min(max)).freeze())
}

fn line_err(e: tokio_util::codec::AnyDelimiterCodecError, max: usize) -> FrameError {
    match e {
        tokio_util::codec::AnyDelimiterCodecError::MaxChunkLengthExceeded => {
            FrameError::TooLarge(max)
        }
        tokio_util::codec::AnyDelimiterCodecError::Io(e) => FrameError::Io(e),
    }
}

impl FrameCodec {
    /// Appends `item` to `dst` as one framed message.
    ///
    /// # Errors
    /// [`FrameError::TooLarge`] for a `len32` message over the limit (or 4 GiB).
    pub fn encode_slice(&mut self, item: &[u8], dst: &mut BytesMut) -> Result<(), FrameError> {
        match self {
            FrameCodec::Raw(..) => crate::copy::extend(dst, item),
            FrameCodec::Line(_) => {
                dst.reserve(item.len() + 1);
                crate::copy::extend(dst, item);
                dst.extend_from_slice(b"\n");
            }
            FrameCodec::Len32(c) => {
                let max = c.max_frame_length();
                let len = u32::try_from(item.len())
                    .ok()
                    .filter(|_| item.len() <= max)
                    .ok_or(FrameError::TooLarge(max))?;
                dst.reserve(4 + item.len());
                dst.extend_from_slice(&len.to_be_bytes());
                crate::copy::extend(dst, item);
            }
        }
        Ok(())
    }
}

impl Encoder<Bytes> for FrameCodec {
    type Error = FrameError;

    fn encode(&mut self, item: Bytes, dst: &mut BytesMut) -> Result<(), FrameError> {
        self.encode_slice(&item, dst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn len32_refuses_an_oversize_prefix_before_the_body() {
        let mut c = FrameCodec::new(Framing::Len32, 1024);
        let mut buf = BytesMut::from(&[0xFF, 0xFF, 0xFF, 0xFF][..]);
        assert!(matches!(
            c.decode(&mut buf),
            Err(FrameError::TooLarge(1024))
        ));
    }

    #[test]
    fn len32_split_frames_and_truncation() {
        let mut c = FrameCodec::new(Framing::Len32, 1024);
        let mut buf = BytesMut::from(&[0, 0, 0, 3, b'a'][..]);
        assert!(c.decode(&mut buf).unwrap().is_none());
        buf.extend_from_slice(b"bc");
        assert_eq!(c.decode(&mut buf).unwrap().unwrap(), &b"abc"[..]);
        let mut buf = BytesMut::from(&[0, 0, 0, 3, b'a'][..]);
        assert!(matches!(c.decode_eof(&mut buf), Err(FrameError::Truncated)));
    }

    #[test]
    fn lines_strip_and_add_newlines_and_enforce_the_limit() {
        let mut c = FrameCodec::new(Framing::Line, 4);
        let mut buf = BytesMut::from(&b"ab\ncd"[..]);
        assert_eq!(c.decode(&mut buf).unwrap().unwrap(), &b"ab"[..]);
        assert!(c.decode(&mut buf).unwrap().is_none());
        assert_eq!(c.decode_eof(&mut buf).unwrap().unwrap(), &b"cd"[..]);
        let mut out = BytesMut::new();
        c.encode(Bytes::from_static(b"x"), &mut out).unwrap();
        assert_eq!(&out[..], b"x\n");
        let mut buf = BytesMut::from(&b"toolong"[..]);
        assert!(matches!(c.decode(&mut buf), Err(FrameError::TooLarge(4))));
    }

    #[test]
    fn len32_replies_carry_their_prefix_and_respect_the_limit() {
        let mut c = FrameCodec::new(Framing::Len32, 4);
        let mut out = BytesMut::new();
        c.encode_slice(b"abcd", &mut out).unwrap();
        assert_eq!(&out[..], b"\0\0\0\x04abcd");
        assert!(matches!(
            c.encode_slice(b"abcde", &mut out),
            Err(FrameError::TooLarge(4))
        ));
        assert_eq!(out.len(), 8, "a refused reply writes nothing");
    }

    #[test]
    fn taking_a_large_message_leaves_room_to_read_the_next_in_one_go() {
        let wire = 4 + 16 * 1024;
        let mut buf = BytesMut::with_capacity(READ_CHUNK);
        buf.resize(wire, 7);
        let taken = buf.split_to(wire).freeze(); // still alive, as if in flight
        assert!(buf.capacity() - buf.len() < wire);
        keep_room(&mut buf, wire);
        assert!(buf.capacity() - buf.len() >= wire);
        drop(taken);
        // Small messages do not reallocate every time.
        let mut small = BytesMut::with_capacity(READ_CHUNK);
        small.resize(68, 0);
        let _ = small.split_to(68);
        let before = small.capacity();
        keep_room(&mut small, 68);
        assert_eq!(small.capacity(), before);
    }

    #[test]
    fn random_streams_in_random_chunks_never_panic_or_pass_the_limit() {
        let mut rng = crate::test_rng::Rng::new(0x9E37_79B9_7F4A_7C15);
        for round in 0..3000 {
            let framing = [Framing::Raw, Framing::Line, Framing::Len32][round % 3];
            let max = 1 + rng.below(300);
            let mut c = FrameCodec::new(framing, max);
            // Random bytes, rich in newlines and zero bytes (short prefixes).
            let stream: Vec<u8> = (0..rng.below(2000))
                .map(|_| match rng.below(8) {
                    0 => b'\n',
                    1 => 0,
                    _ => rng.next() as u8,
                })
                .collect();
            let (mut buf, mut fed, mut out) = (BytesMut::new(), 0, Vec::new());
            'feed: while fed < stream.len() {
                let n = (1 + rng.below(64)).min(stream.len() - fed);
                buf.extend_from_slice(&stream[fed..fed + n]);
                fed += n;
                loop {
                    match c.decode(&mut buf) {
                        Ok(Some(f)) => {
                            assert!(f.len() <= max, "{framing:?}: {} > {max}", f.len());
                            out.extend_from_slice(&f);
                        }
                        Ok(None) => break,
                        Err(FrameError::TooLarge(m)) => {
                            assert_eq!(m, max);
                            break 'feed;
                        }
                        Err(e) => panic!("{framing:?}: unexpected {e}"),
                    }
                }
            }
            if framing == Framing::Raw {
                // Raw loses nothing and keeps the order, whatever the chunks.
                assert_eq!(out, stream);
            }
            let _ = c.decode_eof(&mut buf); // a last message, nothing or Truncated
        }
    }

    #[test]
    fn encoded_replies_decode_to_themselves() {
        let mut rng = crate::test_rng::Rng::new(42);
        for round in 0..2000 {
            let framing = [Framing::Raw, Framing::Line, Framing::Len32][round % 3];
            let mut c = FrameCodec::new(framing, 512);
            let payload: Vec<u8> = (0..1 + rng.below(512))
                .map(|_| rng.next() as u8)
                .filter(|b| framing != Framing::Line || *b != b'\n')
                .collect();
            let mut wire = BytesMut::new();
            c.encode_slice(&payload, &mut wire).unwrap();
            let got = c.decode(&mut wire).unwrap();
            assert_eq!(
                got.as_deref().unwrap_or_default(),
                &payload[..],
                "{framing:?}"
            );
            assert!(wire.is_empty(), "{framing:?}: bytes left over");
        }
    }
}
