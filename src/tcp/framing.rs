//! Wire framings as one tokio-util codec: `raw` (each read is a message),
//! `line` (newline-delimited) and `len32` (4-byte big-endian length prefix).
//! Limits are checked before buffering: a `len32` prefix over `max_message`
//! fails at once, without waiting for (or allocating) the body.

use bytes::{Bytes, BytesMut};
use tokio_util::codec::{AnyDelimiterCodec, BytesCodec, Decoder, Encoder, LengthDelimitedCodec};

use crate::config::Framing;

/// Spare room kept in a read buffer: reads into less than this are likely
/// to stop short of the next message (a second `read` for one message).
const MIN_SPARE: usize = 8 * 1024;
/// What a read buffer grows by when it is short of room.
const READ_CHUNK: usize = 32 * 1024;

/// Call after taking a message of `wire_len` bytes out of `buf`: makes sure the
/// next read has room for at least one more message that size. Without this a
/// split-off buffer shrinks message by message until a message takes two
/// reads and a copy (a 16 KiB message in a 32 KiB buffer did, every time).
pub fn keep_room(buf: &mut BytesMut, wire_len: usize) {
    let want = wire_len.max(MIN_SPARE);
    if buf.capacity() - buf.len() < want {
        buf.reserve(want.max(READ_CHUNK));
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
    /// Each read is a message.
    Raw(BytesCodec, usize),
    /// Newline-delimited.
    Line(AnyDelimiterCodec),
    /// Length-prefixed.
    Len32(LengthDelimitedCodec),
}

impl FrameCodec {
    /// A codec for `framing` that refuses messages over `max` bytes.
    pub fn new(framing: Framing, max: usize) -> Self {
        match framing {
            Framing::Raw => FrameCodec::Raw(BytesCodec::new(), max),
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
            FrameCodec::Raw(_, max) => *max,
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
        match self {
            FrameCodec::Raw(c, _) => Ok(c.decode(src)?.map(BytesMut::freeze)),
            FrameCodec::Line(c) => c.decode(src).map_err(|e| line_err(e, c.max_length())),
            FrameCodec::Len32(c) => {
                let r = c.decode(src);
                r.map(|f| f.map(BytesMut::freeze))
                    .map_err(|e| self.map_err(e))
            }
        }
    }

    fn decode_eof(&mut self, src: &mut BytesMut) -> Result<Option<Bytes>, FrameError> {
        match self {
            FrameCodec::Raw(c, _) => Ok(c.decode_eof(src)?.map(BytesMut::freeze)),
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
            FrameCodec::Raw(..) => dst.extend_from_slice(item),
            FrameCodec::Line(_) => {
                dst.reserve(item.len() + 1);
                dst.extend_from_slice(item);
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
                dst.extend_from_slice(item);
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
}
