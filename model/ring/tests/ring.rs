//! The shared-memory ring's protocol, model-checked with loom: one producer
//! and one consumer on a small ring, every interleaving (up to loom's
//! preemption bound) of their atomic operations. The position arithmetic is
//! the daemon's own (`src/shm/ring/positions.rs`, included here); the
//! memory operations mirror `src/shm/ring/mod.rs`: header words are relaxed
//! atomics, payload bytes are plain memory (loom `UnsafeCell`s, so a read
//! not ordered after its write, or a write over bytes still being read, is
//! reported as a data race), `tail` is published with release and read with
//! acquire, `head` likewise the other way.
//!
//! Run: `RUSTFLAGS="--cfg loom" cargo test --release` in model/ring.
#![cfg(loom)]

#[path = "../../../src/shm/ring/positions.rs"]
#[allow(dead_code)]
mod positions;

use loom::cell::UnsafeCell;
use loom::sync::Arc;
use loom::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use positions::{Found, RECORD_HEADER, WRAP, locate, place, record_size};

/// A ring of `size` data bytes, by 8-byte word.
struct Ring {
    size: usize,
    head: AtomicU64,
    tail: AtomicU64,
    /// The `len` word of a header starting at this word.
    len: Vec<AtomicU32>,
    /// The `seq` word of a header starting at this word.
    seq: Vec<AtomicU32>,
    /// Payload bytes, a word at a time.
    payload: Vec<UnsafeCell<u64>>,
}

impl Ring {
    fn new(size: usize) -> Self {
        let words = size / 8;
        Self {
            size,
            head: AtomicU64::new(0),
            tail: AtomicU64::new(0),
            len: (0..words).map(|_| AtomicU32::new(0)).collect(),
            seq: (0..words).map(|_| AtomicU32::new(0)).collect(),
            payload: (0..words).map(|_| UnsafeCell::new(0)).collect(),
        }
    }

    /// `try_push`: false when full. The payload words hold `seq`.
    fn push(&self, seq: u32, len: usize) -> bool {
        let tail = self.tail.load(Ordering::Relaxed);
        let head = self.head.load(Ordering::Acquire);
        let Some(spot) = place(head, tail, self.size, record_size(len)) else {
            return false;
        };
        if let Some(marker) = spot.wrap_marker_at {
            self.len[marker / 8].store(WRAP, Ordering::Relaxed);
        }
        let w = spot.at / 8;
        self.seq[w].store(seq, Ordering::Relaxed);
        self.len[w].store(len as u32, Ordering::Relaxed);
        let first = (spot.at + RECORD_HEADER) / 8;
        for word in &self.payload[first..first + len.div_ceil(8)] {
            word.with_mut(|p| unsafe { *p = u64::from(seq) });
        }
        self.tail.store(spot.new_tail, Ordering::Release);
        true
    }

    /// `pop_in_place`: the record's seq and len, its payload checked.
    fn pop(&self) -> Option<(u32, u32)> {
        let head = self.head.load(Ordering::Relaxed);
        let tail = self.tail.load(Ordering::Acquire);
        let found = locate(head, tail, self.size, |pos| {
            self.len[pos / 8].load(Ordering::Relaxed)
        });
        let (pos, len, next_head) = match found {
            Found::Empty => return None,
            Found::Record {
                pos,
                len,
                next_head,
            } => (pos, len, next_head),
            other => panic!("a well-behaved producer left {other:?} (head {head}, tail {tail})"),
        };
        let seq = self.seq[pos / 8].load(Ordering::Relaxed);
        let first = (pos + RECORD_HEADER) / 8;
        for word in &self.payload[first..first + (len as usize).div_ceil(8)] {
            let got = word.with(|p| unsafe { *p });
            assert_eq!(
                got,
                u64::from(seq),
                "record {seq}'s payload was overwritten"
            );
        }
        // Released only after the payload was read.
        self.head.store(next_head, Ordering::Release);
        Some((seq, len))
    }
}

/// How many times a side retries while the other has not moved: loom
/// explores every value a spinning load may see, so waits are bounded; what
/// is left is finished on one thread after the join.
const TRIES: usize = 3;

/// A producer pushes records of `lens` payload bytes while the consumer pops
/// (each side retrying a bounded number of times); then the rest is pushed
/// and popped on one thread. Every record arrives once, in order, whole.
fn check(size: usize, lens: &'static [usize], preemptions: usize) {
    let mut model = loom::model::Builder::new();
    model.preemption_bound = Some(preemptions);
    model.check(move || {
        let ring = Arc::new(Ring::new(size));
        let producer = {
            let ring = ring.clone();
            loom::thread::spawn(move || {
                let mut pushed = 0;
                'records: for (seq, &len) in lens.iter().enumerate() {
                    for _ in 0..TRIES {
                        if ring.push(seq as u32, len) {
                            pushed += 1;
                            continue 'records;
                        }
                        loom::thread::yield_now();
                    }
                    break;
                }
                pushed
            })
        };
        let mut got = Vec::new();
        for _ in 0..TRIES * lens.len() {
            match ring.pop() {
                Some(r) => got.push(r),
                None => loom::thread::yield_now(),
            }
        }
        let mut pushed = producer.join().unwrap();
        // The rest, on this thread alone.
        loop {
            while let Some(r) = ring.pop() {
                got.push(r);
            }
            if pushed == lens.len() {
                break;
            }
            assert!(
                ring.push(pushed as u32, lens[pushed]),
                "an empty ring took nothing"
            );
            pushed += 1;
        }
        let want: Vec<(u32, u32)> = lens
            .iter()
            .enumerate()
            .map(|(seq, &len)| (seq as u32, len as u32))
            .collect();
        assert_eq!(got, want);
    });
}

// Record sizes: header 24 + payload padded to 8; the daemon allows records
// up to half the ring (check_sizes), so an empty ring always takes one.

#[test]
fn records_wrap_without_a_marker_and_wait_on_a_full_ring() {
    // 64 bytes: 32 + 24 fill 56; the next 32 does not fit in the 8 left
    // (no room for a marker: skipped), and waits for the consumer.
    check(64, &[8, 0, 8, 0], 3);
}

#[test]
fn records_follow_a_wrap_marker() {
    // 128 bytes: 64 + 40 fill 104; the next 32 does not fit in the 24 left:
    // a wrap marker at 104, the record at 0.
    check(128, &[40, 16, 8, 0, 40], 2);
}

#[test]
fn the_smallest_records_fill_and_drain_the_ring() {
    check(64, &[0, 0, 0, 0, 0], 3);
}
