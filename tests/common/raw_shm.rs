//! A shared-memory channel driven with raw reads and writes of the mapping,
//! written from docs/shm-protocol.md alone (no code of the crate's ring or
//! clients): the conformance tests' peer, and the "dead client" that leaves
//! rings full or records half-written.

use std::path::Path;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

pub const PAGE: u64 = 4096;
pub const RECORD_HEADER: u64 = 24;
pub const WRAP: u32 = 0xFFFF_FFFF;
pub const EPOCH: u64 = 48;

/// Requests go client → daemon, responses daemon → client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ring {
    Request,
    Response,
}

/// One record as found in a ring.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawRecord {
    pub len: u32,
    pub seq: u32,
    pub crc: u32,
    pub flags: u32,
    pub epoch: u64,
    pub payload: Vec<u8>,
}

impl RawRecord {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.payload).into_owned()
    }
}

pub struct RawChannel {
    map: memmap2::MmapRaw,
    _file: std::fs::File,
    pub ring: u64,
    pub max: u32,
    pub epoch: u64,
}

impl RawChannel {
    /// Maps the file (no lock taken: a peer that holds none is what a dead client looks like).
    pub fn open(path: &Path) -> Self {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .unwrap();
        let map = memmap2::MmapOptions::new().map_raw(&file).unwrap();
        let mut ch = Self {
            map,
            _file: file,
            ring: 0,
            max: 0,
            epoch: 0,
        };
        ch.ring = u64::from(ch.u32(16));
        ch.max = ch.u32(20);
        ch
    }

    pub fn bytes(&self, off: u64, n: usize) -> Vec<u8> {
        assert!(off as usize + n <= self.map.len());
        let mut out = vec![0; n];
        // SAFETY: in bounds of the live mapping.
        unsafe {
            std::ptr::copy_nonoverlapping(self.map.as_ptr().add(off as usize), out.as_mut_ptr(), n)
        };
        out
    }

    pub fn write(&self, off: u64, data: &[u8]) {
        assert!(off as usize + data.len() <= self.map.len());
        // SAFETY: in bounds of the live mapping.
        unsafe {
            std::ptr::copy_nonoverlapping(
                data.as_ptr(),
                self.map.as_mut_ptr().add(off as usize),
                data.len(),
            )
        };
    }

    fn atomic32(&self, off: u64) -> &AtomicU32 {
        assert!(off % 4 == 0 && off as usize + 4 <= self.map.len());
        // SAFETY: aligned, in bounds, shared words are accessed atomically by every party.
        unsafe { &*(self.map.as_ptr().add(off as usize) as *const AtomicU32) }
    }

    fn atomic64(&self, off: u64) -> &AtomicU64 {
        assert!(off % 8 == 0 && off as usize + 8 <= self.map.len());
        // SAFETY: as above.
        unsafe { &*(self.map.as_ptr().add(off as usize) as *const AtomicU64) }
    }

    pub fn u32(&self, off: u64) -> u32 {
        self.atomic32(off).load(Ordering::Acquire)
    }

    pub fn u64(&self, off: u64) -> u64 {
        self.atomic64(off).load(Ordering::Acquire)
    }

    pub fn set_u64(&self, off: u64, v: u64) {
        self.atomic64(off).store(v, Ordering::Release)
    }

    /// The control page and data area of a ring.
    pub fn ctl(&self, ring: Ring) -> u64 {
        match ring {
            Ring::Request => PAGE,
            Ring::Response => 2 * PAGE + self.ring,
        }
    }

    pub fn data(&self, ring: Ring) -> u64 {
        self.ctl(ring) + PAGE
    }

    /// (head, tail).
    pub fn positions(&self, ring: Ring) -> (u64, u64) {
        let ctl = self.ctl(ring);
        (self.u64(ctl + 64), self.u64(ctl))
    }

    /// Attach step: a new epoch.
    pub fn attach(&mut self) -> u64 {
        self.epoch = self.u64(EPOCH) + 1;
        self.set_u64(EPOCH, self.epoch);
        self.epoch
    }

    /// Writes a request record at the request ring's tail (wrapping as the
    /// spec says) with the fields given; publishes it when `publish`.
    /// `false` if it does not fit.
    pub fn put(&self, header: [u32; 4], epoch: u64, payload: &[u8], publish: bool) -> bool {
        let ctl = self.ctl(Ring::Request);
        let (head, tail) = self.positions(Ring::Request);
        let need = RECORD_HEADER + (payload.len() as u64).next_multiple_of(8);
        let pos = tail % self.ring;
        let room = self.ring - pos;
        let skip = if room < need { room } else { 0 };
        if tail + skip + need - head > self.ring {
            return false;
        }
        let base = self.data(Ring::Request);
        let mut at = pos;
        if skip > 0 {
            if skip >= RECORD_HEADER {
                self.write(base + at, &WRAP.to_le_bytes());
            }
            at = 0;
        }
        let mut rec = Vec::with_capacity(need as usize);
        for w in header {
            rec.extend_from_slice(&w.to_le_bytes());
        }
        rec.extend_from_slice(&epoch.to_le_bytes());
        rec.extend_from_slice(payload);
        rec.resize(need as usize, 0);
        self.write(base + at, &rec);
        if publish {
            self.set_u64(ctl, tail + skip + need);
            self.ring_bell(Ring::Request);
        }
        true
    }

    /// The doorbell rule: after publishing, wake the consumer if it sleeps.
    pub fn ring_bell(&self, ring: Ring) {
        let ctl = self.ctl(ring);
        std::sync::atomic::fence(Ordering::SeqCst);
        if self.u32(ctl + 132) != 0 {
            self.atomic32(ctl + 128).fetch_add(1, Ordering::Release);
            // SAFETY: FUTEX_WAKE on an aligned word of the shared mapping.
            unsafe {
                libc::syscall(
                    libc::SYS_futex,
                    self.atomic32(ctl + 128).as_ptr(),
                    libc::FUTEX_WAKE,
                    i32::MAX,
                    std::ptr::null::<libc::timespec>(),
                    std::ptr::null::<u32>(),
                    0u32,
                );
            }
        }
    }

    /// A well-formed request of the current epoch.
    pub fn send(&self, seq: u32, payload: &[u8]) -> bool {
        let crc = crc32fast::hash(payload);
        self.put(
            [payload.len() as u32, seq, crc, 0],
            self.epoch,
            payload,
            true,
        )
    }

    /// The consumer's side of the doorbell on the response ring: announce
    /// sleeping, then sleep on the bell for at most `timeout` unless a reply
    /// is already there. Returns how long it slept.
    pub fn sleep_for_reply(&self, timeout: Duration) -> Duration {
        let ctl = self.ctl(Ring::Response);
        let start = Instant::now();
        let seen = self.u32(ctl + 128);
        self.atomic32(ctl + 132).store(1, Ordering::SeqCst);
        std::sync::atomic::fence(Ordering::SeqCst);
        let (head, tail) = self.positions(Ring::Response);
        if head == tail {
            let ts = libc::timespec {
                tv_sec: timeout.as_secs() as libc::time_t,
                tv_nsec: timeout.subsec_nanos() as libc::c_long,
            };
            // SAFETY: FUTEX_WAIT on an aligned word of the shared mapping.
            unsafe {
                libc::syscall(
                    libc::SYS_futex,
                    self.atomic32(ctl + 128).as_ptr(),
                    libc::FUTEX_WAIT,
                    seen,
                    &ts as *const libc::timespec,
                    std::ptr::null::<u32>(),
                    0u32,
                );
            }
        }
        self.atomic32(ctl + 132).store(0, Ordering::SeqCst);
        start.elapsed()
    }

    /// Writes a reply record into the response ring as the daemon would
    /// (only while the daemon is idle: it is that ring's producer).
    pub fn inject_reply(&self, seq: u32, epoch: u64, payload: &[u8]) {
        let ctl = self.ctl(Ring::Response);
        let (_, tail) = self.positions(Ring::Response);
        let need = RECORD_HEADER + (payload.len() as u64).next_multiple_of(8);
        assert!(
            tail % self.ring + need <= self.ring,
            "no wrap in this helper"
        );
        let mut rec = Vec::new();
        for w in [payload.len() as u32, seq, crc32fast::hash(payload), 0] {
            rec.extend_from_slice(&w.to_le_bytes());
        }
        rec.extend_from_slice(&epoch.to_le_bytes());
        rec.extend_from_slice(payload);
        rec.resize(need as usize, 0);
        self.write(self.data(Ring::Response) + tail % self.ring, &rec);
        self.set_u64(ctl, tail + need);
    }

    /// The next response record, whatever its epoch (waits up to `timeout`).
    pub fn recv(&self, timeout: Duration) -> Option<RawRecord> {
        let ctl = self.ctl(Ring::Response);
        let base = self.data(Ring::Response);
        let deadline = Instant::now() + timeout;
        loop {
            let (mut head, tail) = self.positions(Ring::Response);
            while head != tail {
                let pos = head % self.ring;
                let room = self.ring - pos;
                let w =
                    |o: u64| u32::from_le_bytes(self.bytes(base + pos + o, 4).try_into().unwrap());
                if room < RECORD_HEADER || w(0) == WRAP {
                    head += room;
                    continue;
                }
                let len = w(0);
                let epoch = u64::from_le_bytes(self.bytes(base + pos + 16, 8).try_into().unwrap());
                let rec = RawRecord {
                    len,
                    seq: w(4),
                    crc: w(8),
                    flags: w(12),
                    epoch,
                    payload: self.bytes(base + pos + RECORD_HEADER, len as usize),
                };
                let need = RECORD_HEADER + u64::from(len).next_multiple_of(8);
                self.set_u64(ctl + 64, head + need);
                return Some(rec);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_micros(200));
        }
    }
}
