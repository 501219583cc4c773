//! The channel's binary layout and its rings (see `docs/shm-protocol.md`).
//!
//! One file: a 4 KiB header, then the request ring, then the response ring.
//! Each ring is a 4 KiB control page (producer `tail` and consumer `head` on
//! separate cache lines) followed by `ring_size` data bytes. Each ring has
//! exactly one producer and one consumer: the client lock in the header makes
//! sure only one client is attached, and the daemon's channel thread is the
//! other side. Positions are byte counters that only grow; a record is
//! published by a release-store of `tail` after its bytes are written, and
//! consumed by a release-store of `head` after they are read, so a producer
//! that dies mid-write leaves nothing visible and a full ring is never
//! overwritten.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use memmap2::MmapRaw;

use super::doorbell::Bell;

mod positions;
use positions::{Found, place, record_size};
pub use positions::{RECORD_HEADER, WRAP};

/// `b"PYIPCSH1"`.
pub const MAGIC: [u8; 8] = *b"PYIPCSH1";
/// Layout version (2: client epochs, 24-byte record headers).
pub const VERSION: u32 = 2;
/// Header and ring control pages.
pub const PAGE: usize = 4096;

/// Header field offsets.
pub mod off {
    /// `[u8; 8]` magic.
    pub const MAGIC: usize = 0;
    /// `u32` layout version.
    pub const VERSION: usize = 8;
    /// `u32` header size (4096).
    pub const HEADER_SIZE: usize = 12;
    /// `u32` data bytes per ring.
    pub const RING_SIZE: usize = 16;
    /// `u32` largest payload.
    pub const MAX_RECORD: usize = 20;
    /// `u64` daemon generation (changes on every daemon start).
    pub const GENERATION: usize = 24;
    /// `u32` daemon state (see [`super::State`]).
    pub const STATE: usize = 32;
    /// `u32` daemon pid.
    pub const DAEMON_PID: usize = 36;
    /// `u32` pid of the attached client, 0 when free.
    pub const CLIENT_PID: usize = 40;
    /// `u64` client epoch: each client adds one when it attaches.
    pub const EPOCH: usize = 48;
    /// Ring control: producer position.
    pub const TAIL: usize = 0;
    /// Ring control: consumer position (own cache line).
    pub const HEAD: usize = 64;
    /// Ring control: `u32` doorbell the producer bumps (a futex word, own cache line).
    pub const BELL: usize = 128;
    /// Ring control: `u32`, non-zero while the consumer sleeps on the bell.
    pub const SLEEPING: usize = 132;
}

/// Daemon state in the header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum State {
    /// Being (re)initialised: clients wait.
    Initialising = 0,
    /// Serving.
    Ready = 1,
    /// Stopped: calls fail until a daemon starts again.
    Stopped = 2,
}

/// Record flags.
pub mod flags {
    /// A reply (or a request).
    pub const OK: u32 = 0;
    /// The handler returned `None`: no payload.
    pub const NO_REPLY: u32 = 1;
    /// The request failed (handler exception, bad record); the payload is
    /// the error text (UTF-8).
    pub const ERROR: u32 = 2;
    /// The daemon lost the request stream's framing and dropped every
    /// request published so far: no request sent before this reply will be
    /// answered. The payload says why (UTF-8).
    pub const RESET: u32 = 3;
}

/// Total file size for a ring size.
pub fn file_size(ring_size: usize) -> usize {
    PAGE + 2 * (PAGE + ring_size)
}

/// Why a mapping is not a usable channel.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LayoutError {
    /// Not a pyipcd channel.
    #[error("bad magic {0:02x?} (not a pyipcd channel)")]
    Magic([u8; 8]),
    /// A layout version this code does not speak.
    #[error("layout version {0}, this build speaks {VERSION}")]
    Version(u32),
    /// Sizes that do not fit the file or each other.
    #[error("bad sizes: {0}")]
    Size(String),
}

/// A mapped channel file (header plus two rings) seen through raw pointers.
#[derive(Debug)]
pub struct Channel {
    map: MmapRaw,
    ring_size: usize,
    max_record: usize,
}

/// One direction of a channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dir {
    /// Client to daemon.
    Request,
    /// Daemon to client.
    Response,
}

/// A record read from a ring (its bytes already copied out).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// Sequence number given by the request's producer; replies repeat it.
    pub seq: u32,
    /// See [`flags`].
    pub flags: u32,
    /// The client epoch it belongs to (requests: the sender's; replies: the
    /// request's).
    pub epoch: u64,
    /// The payload (empty when there is a fault).
    pub payload: Vec<u8>,
    /// What was wrong with it, if anything.
    pub fault: Option<Fault>,
}

/// A record seen in place by [`Channel::pop_in_place`].
#[derive(Debug)]
pub struct InPlace<'a> {
    /// As in [`Record`].
    pub seq: u32,
    /// As in [`Record`].
    pub flags: u32,
    /// As in [`Record`].
    pub epoch: u64,
    /// The payload, in the mapping (empty when there is a fault).
    pub payload: &'a [u8],
    /// As in [`Record`].
    pub fault: Option<Fault>,
}

/// A record that could not be taken as written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// The payload does not match its CRC-32.
    Checksum,
    /// A well-framed record whose length is over the channel's max (it was
    /// skipped; the records behind it are intact).
    OverMax {
        /// The length it claims.
        len: u32,
    },
    /// A length that cannot be right (past the published bytes or the end
    /// of the data area): the framing is lost, everything published so far
    /// was dropped.
    Framing {
        /// The length it claims.
        len: u32,
        /// Bytes dropped.
        dropped: u64,
    },
}

impl Channel {
    /// Wraps a mapping after checking its header.
    ///
    /// # Errors
    /// [`LayoutError`] for a bad magic, version or sizes.
    pub fn attach(map: MmapRaw) -> Result<Self, LayoutError> {
        let mut ch = Self {
            map,
            ring_size: 0,
            max_record: 0,
        };
        let mut magic = [0u8; 8];
        for (i, b) in magic.iter_mut().enumerate() {
            *b = ch.read_u8(off::MAGIC + i);
        }
        if magic != MAGIC {
            return Err(LayoutError::Magic(magic));
        }
        let version = ch.u32_at(off::VERSION).load(Ordering::Acquire);
        if version != VERSION {
            return Err(LayoutError::Version(version));
        }
        let header = ch.u32_at(off::HEADER_SIZE).load(Ordering::Relaxed) as usize;
        let ring = ch.u32_at(off::RING_SIZE).load(Ordering::Relaxed) as usize;
        let max = ch.u32_at(off::MAX_RECORD).load(Ordering::Relaxed) as usize;
        check_sizes(header, ring, max, ch.map.len()).map_err(LayoutError::Size)?;
        ch.ring_size = ring;
        ch.max_record = max;
        Ok(ch)
    }

    /// Writes a fresh header and empty rings into `map` (the daemon's side),
    /// with state [`State::Initialising`]; call [`Channel::set_state`] to open it.
    ///
    /// # Errors
    /// [`LayoutError::Size`] if the sizes do not fit the mapping.
    pub fn initialise(
        map: MmapRaw,
        ring_size: usize,
        max_record: usize,
        generation: u64,
    ) -> Result<Self, LayoutError> {
        check_sizes(PAGE, ring_size, max_record, map.len()).map_err(LayoutError::Size)?;
        let ch = Self {
            map,
            ring_size,
            max_record,
        };
        ch.u32_at(off::STATE)
            .store(State::Initialising as u32, Ordering::SeqCst);
        for (i, b) in MAGIC.iter().enumerate() {
            ch.write_u8(off::MAGIC + i, *b);
        }
        ch.u32_at(off::VERSION).store(VERSION, Ordering::Relaxed);
        ch.u32_at(off::HEADER_SIZE)
            .store(PAGE as u32, Ordering::Relaxed);
        ch.u32_at(off::RING_SIZE)
            .store(ring_size as u32, Ordering::Relaxed);
        ch.u32_at(off::MAX_RECORD)
            .store(max_record as u32, Ordering::Relaxed);
        ch.u32_at(off::DAEMON_PID)
            .store(std::process::id(), Ordering::Relaxed);
        for dir in [Dir::Request, Dir::Response] {
            ch.ctl(dir, off::TAIL).store(0, Ordering::Relaxed);
            ch.ctl(dir, off::HEAD).store(0, Ordering::Relaxed);
            ch.bell(dir).sleeping.store(0, Ordering::Relaxed);
        }
        // No epoch of an earlier generation comes back, even when the file
        // was emptied (a client of it may still publish a request).
        let epoch = ch.epoch().max(generation << 32);
        ch.u64_at(off::EPOCH).store(epoch, Ordering::Relaxed);
        ch.u64_at(off::GENERATION)
            .store(generation, Ordering::SeqCst);
        // Anyone still asleep on an old bell wakes and sees the new generation.
        for dir in [Dir::Request, Dir::Response] {
            ch.bell(dir).wake();
        }
        Ok(ch)
    }

    /// Data bytes per ring.
    pub fn ring_size(&self) -> usize {
        self.ring_size
    }

    /// Largest payload.
    pub fn max_record(&self) -> usize {
        self.max_record
    }

    /// The daemon generation.
    pub fn generation(&self) -> u64 {
        self.u64_at(off::GENERATION).load(Ordering::Acquire)
    }

    /// The daemon state.
    pub fn state(&self) -> u32 {
        self.u32_at(off::STATE).load(Ordering::Acquire)
    }

    /// Sets the daemon state.
    pub fn set_state(&self, s: State) {
        self.u32_at(off::STATE).store(s as u32, Ordering::SeqCst);
    }

    /// The current client epoch.
    pub fn epoch(&self) -> u64 {
        self.u64_at(off::EPOCH).load(Ordering::Acquire)
    }

    /// Starts a new client epoch (a client attaching, holding the client
    /// lock); returns it.
    pub fn next_epoch(&self) -> u64 {
        let epoch = self.epoch().wrapping_add(1);
        self.u64_at(off::EPOCH).store(epoch, Ordering::Release);
        epoch
    }

    /// The client-lock word.
    pub fn client_pid(&self) -> &AtomicU32 {
        self.u32_at(off::CLIENT_PID)
    }

    /// The daemon's pid.
    pub fn daemon_pid(&self) -> u32 {
        self.u32_at(off::DAEMON_PID).load(Ordering::Relaxed)
    }

    /// Producer and consumer positions of a ring.
    pub fn positions(&self, dir: Dir) -> (u64, u64) {
        (
            self.ctl(dir, off::HEAD).load(Ordering::Acquire),
            self.ctl(dir, off::TAIL).load(Ordering::Acquire),
        )
    }

    /// Whether [`Channel::try_pop`] would find something: unread bytes
    /// behind positions that can both be right. A consumer waits for this,
    /// not for "head != tail", so positions a peer scribbled (which
    /// `try_pop` refuses to read) cannot turn its wait into a busy loop.
    pub fn readable(&self, dir: Dir) -> bool {
        let (head, tail) = self.positions(dir);
        head % 8 == 0
            && tail % 8 == 0
            && head != tail
            && tail.wrapping_sub(head) <= self.ring_size as u64
    }

    /// The ring's doorbell (see [`super::doorbell`]).
    pub fn bell(&self, dir: Dir) -> Bell<'_> {
        let page = match dir {
            Dir::Request => PAGE,
            Dir::Response => 2 * PAGE + self.ring_size,
        };
        Bell {
            bell: self.u32_at(page + off::BELL),
            sleeping: self.u32_at(page + off::SLEEPING),
        }
    }

    /// Drops everything unread in a ring (a new client discarding stale replies).
    pub fn discard(&self, dir: Dir) {
        let tail = self.ctl(dir, off::TAIL).load(Ordering::Acquire);
        self.ctl(dir, off::HEAD).store(tail, Ordering::Release);
    }

    /// Appends a record if it fits; `false` when the ring is full (nothing written).
    ///
    /// # Panics
    /// If `payload` is longer than `max_record` (callers check first).
    pub fn try_push(&self, dir: Dir, seq: u32, flags: u32, epoch: u64, payload: &[u8]) -> bool {
        assert!(payload.len() <= self.max_record, "payload over max_record");
        let tail_ref = self.ctl(dir, off::TAIL);
        let tail = tail_ref.load(Ordering::Relaxed);
        let head = self.ctl(dir, off::HEAD).load(Ordering::Acquire);
        let Some(spot) = place(head, tail, self.ring_size, record_size(payload.len())) else {
            return false;
        };
        let base = self.data(dir);
        if let Some(marker) = spot.wrap_marker_at {
            self.write_u32(base + marker, WRAP);
        }
        let at = spot.at;
        self.write_u32(base + at + 4, seq);
        self.write_u32(base + at + 8, crc32fast::hash(payload));
        self.write_u32(base + at + 12, flags);
        self.u64_at(base + at + 16).store(epoch, Ordering::Relaxed);
        self.write_u32(base + at, payload.len() as u32);
        self.write_bytes(base + at + RECORD_HEADER, payload);
        // Publish: everything above happens-before a consumer's acquire of tail.
        tail_ref.store(spot.new_tail, Ordering::Release);
        self.bell(dir).ring();
        true
    }

    /// Takes the next record, if any (its payload copied out).
    pub fn try_pop(&self, dir: Dir) -> Option<Record> {
        self.pop_in_place(dir, |r| Record {
            seq: r.seq,
            flags: r.flags,
            epoch: r.epoch,
            payload: r.payload.to_vec(),
            fault: r.fault,
        })
    }

    /// Takes the next record, if any, handing it to `f` with its payload
    /// still in the mapping; the space is released (head advanced) only
    /// when `f` returns, so the producer cannot reuse it meanwhile.
    pub fn pop_in_place<R>(&self, dir: Dir, f: impl FnOnce(InPlace<'_>) -> R) -> Option<R> {
        let head_ref = self.ctl(dir, off::HEAD);
        let head = head_ref.load(Ordering::Relaxed);
        let tail = self.ctl(dir, off::TAIL).load(Ordering::Acquire);
        let base = self.data(dir);
        let (pos, len, next_head) =
            match positions::locate(head, tail, self.ring_size, |pos| self.read_u32(base + pos)) {
                // Nothing, or positions a peer scribbled: touch nothing.
                Found::Empty | Found::Unreadable => return None,
                Found::Lost { dropped } => {
                    // The framing is lost: drop everything published so far.
                    head_ref.store(tail, Ordering::Release);
                    return Some(f(InPlace {
                        seq: 0,
                        flags: 0,
                        epoch: 0,
                        payload: &[],
                        fault: Some(Fault::Framing { len: WRAP, dropped }),
                    }));
                }
                Found::BadLength { pos, len, dropped } => (pos, len, Err(dropped)),
                Found::Record {
                    pos,
                    len,
                    next_head,
                } => (pos, len, Ok(next_head)),
            };
        let seq = self.read_u32(base + pos + 4);
        let crc = self.read_u32(base + pos + 8);
        let flags = self.read_u32(base + pos + 12);
        let epoch = self.u64_at(base + pos + 16).load(Ordering::Relaxed);
        let record = |payload, fault| InPlace {
            seq,
            flags,
            epoch,
            payload,
            fault,
        };
        let next_head = match next_head {
            Ok(h) => h,
            Err(dropped) => {
                // A length no producer could have written: where the next
                // record starts is unknown. Drop everything published so far
                // rather than read nonsense.
                head_ref.store(tail, Ordering::Release);
                return Some(f(record(&[], Some(Fault::Framing { len, dropped }))));
            }
        };
        if len as usize > self.max_record {
            // Framed, but longer than the channel takes: skip it alone.
            head_ref.store(next_head, Ordering::Release);
            return Some(f(record(&[], Some(Fault::OverMax { len }))));
        }
        let payload = self.bytes(base + pos + RECORD_HEADER, len as usize);
        let fault = (crc32fast::hash(payload) != crc).then_some(Fault::Checksum);
        let out = f(record(payload, fault));
        head_ref.store(next_head, Ordering::Release);
        Some(out)
    }

    fn data(&self, dir: Dir) -> usize {
        match dir {
            Dir::Request => 2 * PAGE,
            Dir::Response => 2 * PAGE + self.ring_size + PAGE,
        }
    }

    fn ctl(&self, dir: Dir, field: usize) -> &AtomicU64 {
        let page = match dir {
            Dir::Request => PAGE,
            Dir::Response => 2 * PAGE + self.ring_size,
        };
        self.u64_at(page + field)
    }

    fn u64_at(&self, offset: usize) -> &AtomicU64 {
        assert!(offset % 8 == 0 && offset + 8 <= self.map.len());
        // SAFETY: in bounds and 8-aligned (the mapping is page-aligned); the
        // mapping outlives `&self`; other processes access this word only
        // atomically (the protocol's rule), so treating it as an AtomicU64 is sound.
        unsafe { &*(self.map.as_ptr().add(offset) as *const AtomicU64) }
    }

    fn u32_at(&self, offset: usize) -> &AtomicU32 {
        assert!(offset % 4 == 0 && offset + 4 <= self.map.len());
        // SAFETY: as in `u64_at`, for a 4-aligned 4-byte word.
        unsafe { &*(self.map.as_ptr().add(offset) as *const AtomicU32) }
    }

    fn read_u32(&self, offset: usize) -> u32 {
        self.u32_at(offset).load(Ordering::Relaxed)
    }

    fn write_u32(&self, offset: usize, v: u32) {
        self.u32_at(offset).store(v, Ordering::Relaxed);
    }

    fn read_u8(&self, offset: usize) -> u8 {
        assert!(offset < self.map.len());
        // SAFETY: in bounds of the live mapping; volatile since another
        // process may write it (a byte cannot tear).
        unsafe { self.map.as_ptr().add(offset).read_volatile() }
    }

    fn write_u8(&self, offset: usize, v: u8) {
        assert!(offset < self.map.len());
        // SAFETY: as in `read_u8`.
        unsafe { self.map.as_mut_ptr().add(offset).write_volatile(v) }
    }

    /// `len` bytes of the mapping in place.
    fn bytes(&self, offset: usize, len: usize) -> &[u8] {
        assert!(offset + len <= self.map.len());
        // SAFETY: in bounds of the mapping, which outlives `&self`. These are
        // a published record's bytes between our acquire of `tail` and our
        // release of `head`: by the protocol the producer does not touch
        // them until then (a peer that breaks the protocol can only make us
        // read bytes it scribbled, as with any copy).
        unsafe { std::slice::from_raw_parts(self.map.as_ptr().add(offset), len) }
    }

    fn write_bytes(&self, offset: usize, src: &[u8]) {
        assert!(offset + src.len() <= self.map.len());
        // SAFETY: in bounds; this span is free (behind the consumer's head and
        // not yet published), so no one else reads or writes it now. In
        // pieces when a single `memcpy` would be slow (see `crate::copy`).
        unsafe { crate::copy::copy_to(self.map.as_mut_ptr().add(offset), src) }
    }
}

fn check_sizes(header: usize, ring: usize, max: usize, file: usize) -> Result<(), String> {
    if header != PAGE {
        return Err(format!("header size {header}, expected {PAGE}"));
    }
    if !ring.is_power_of_two() || ring < PAGE {
        return Err(format!("ring size {ring} is not a power of two ≥ {PAGE}"));
    }
    if max == 0 || RECORD_HEADER + max.next_multiple_of(8) > ring / 2 {
        return Err(format!(
            "max record {max} must be ≥ 1 and fit twice in the ring ({ring})"
        ));
    }
    if file < file_size(ring) {
        return Err(format!(
            "file has {file} bytes, the layout needs {}",
            file_size(ring)
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests;
