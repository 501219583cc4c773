//! The ring's position arithmetic as pure functions: where a producer puts
//! the next record (or that the ring is full), and what a consumer finds at
//! its position. Shared by the ring (`super`) and by its loom model
//! (`model/ring`), which checks the publish/consume protocol built on it
//! across every interleaving of a producer and a consumer.
//!
//! Positions are byte counters that only grow (wrapping at 2^64); a ring
//! offset is a position modulo the ring size (a power of two). Records start
//! 8-aligned. A record that would not fit before the end of the ring goes
//! to its start; the producer leaves a wrap marker (`len = WRAP`) where it
//! skipped from when there is room for a header there.

/// Record header: len, seq, crc32, flags (u32 each), epoch (u64).
pub const RECORD_HEADER: usize = 24;
/// A `len` that means "skip to the start of the ring".
pub const WRAP: u32 = u32::MAX;

/// Bytes a record with a `len`-byte payload takes: its header and the
/// payload padded to 8.
pub fn record_size(len: usize) -> usize {
    RECORD_HEADER + len.next_multiple_of(8)
}

/// Where a producer writes the next record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Placement {
    /// Ring offset of a wrap marker to write first, if any.
    pub wrap_marker_at: Option<usize>,
    /// Ring offset of the record.
    pub at: usize,
    /// The tail to publish once the record is written.
    pub new_tail: u64,
}

/// Where a `need`-byte record goes in a ring of `ring` bytes whose consumer
/// is at `head` and producer at `tail`; `None` when it does not fit (the
/// ring is full) or the positions are nonsense (a peer scribbled on them:
/// that reads as full rather than letting the producer write anywhere).
pub fn place(head: u64, tail: u64, ring: usize, need: usize) -> Option<Placement> {
    if tail % 8 != 0 {
        return None;
    }
    let pos = (tail % ring as u64) as usize;
    let room_to_end = ring - pos;
    let skip = if room_to_end < need { room_to_end } else { 0 };
    let used = tail.wrapping_sub(head);
    if used > ring as u64 || used + ((skip + need) as u64) > ring as u64 {
        return None;
    }
    Some(Placement {
        wrap_marker_at: (skip >= RECORD_HEADER).then_some(pos),
        at: if skip > 0 { 0 } else { pos },
        new_tail: tail.wrapping_add((skip + need) as u64),
    })
}

/// What a consumer at `head` finds, the producer being at `tail`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Found {
    /// Nothing published.
    Empty,
    /// Positions that cannot both be right (misaligned, or further apart
    /// than the ring): nothing is readable, nothing may be touched.
    Unreadable,
    /// A record of `len` payload bytes at ring offset `pos`; the consumer's
    /// next position is `next_head`.
    Record {
        /// Ring offset of its header.
        pos: usize,
        /// Its payload length, as written.
        len: u32,
        /// Where the consumer goes after it.
        next_head: u64,
    },
    /// A header at `pos` whose `len` no producer could have written (it
    /// overruns the ring's end or what was published): where the next
    /// record starts is unknown; `dropped` bytes are published past `head`.
    BadLength {
        /// Ring offset of the header.
        pos: usize,
        /// The length found.
        len: u32,
        /// Bytes published from the record on.
        dropped: u64,
    },
    /// A second skip to the ring's start in a row (a wrap marker at offset
    /// 0): the framing is lost; `dropped` bytes are published past `head`.
    Lost {
        /// Bytes published past the consumer's position.
        dropped: u64,
    },
}

/// What is at `head`; `len_at(offset)` reads the `u32` length word at a
/// ring offset (8-aligned, in the ring).
pub fn locate(head: u64, tail: u64, ring: usize, len_at: impl Fn(usize) -> u32) -> Found {
    if head % 8 != 0 || tail % 8 != 0 {
        return Found::Unreadable;
    }
    let start = head;
    let mut head = head;
    let mut skipped = false;
    loop {
        if head == tail {
            return Found::Empty;
        }
        if tail.wrapping_sub(head) > ring as u64 {
            return Found::Unreadable;
        }
        let pos = (head % ring as u64) as usize;
        let room_to_end = ring - pos;
        if room_to_end < RECORD_HEADER || len_at(pos) == WRAP {
            // At most one skip to the start per record is legitimate.
            if skipped {
                return Found::Lost {
                    dropped: tail.wrapping_sub(start),
                };
            }
            skipped = true;
            head = head.wrapping_add(room_to_end as u64);
            continue;
        }
        let len = len_at(pos);
        let need = (RECORD_HEADER as u64).saturating_add(u64::from(len).next_multiple_of(8));
        if need > room_to_end as u64 || tail.wrapping_sub(head) < need {
            return Found::BadLength {
                pos,
                len,
                dropped: tail.wrapping_sub(head),
            };
        }
        return Found::Record {
            pos,
            len,
            next_head: head.wrapping_add(need),
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_that_does_not_fit_before_the_end_goes_to_the_start() {
        // 64-byte ring, consumer and producer at 48: 16 bytes to the end.
        let p = place(48, 48, 64, record_size(8)).unwrap();
        assert_eq!(
            p,
            Placement {
                wrap_marker_at: None, // 16 < a header: no room for a marker
                at: 0,
                new_tail: 48 + 16 + 32,
            }
        );
        // 24 bytes to the end: a marker fits.
        let p = place(40, 40, 64, record_size(8)).unwrap();
        assert_eq!(p.wrap_marker_at, Some(40));
    }

    #[test]
    fn a_full_ring_and_scribbled_positions_read_as_full() {
        assert_eq!(place(0, 40, 64, record_size(8)), None);
        assert_eq!(place(0, 3, 64, 24), None);
        assert_eq!(place(100, 0, 64, 24), None);
    }

    #[test]
    fn the_consumer_follows_a_wrap_marker_and_not_two() {
        let lens = |marker_at_zero: bool| {
            move |pos: usize| match pos {
                40 => WRAP,
                0 if marker_at_zero => WRAP,
                _ => 8,
            }
        };
        assert_eq!(
            locate(40, 96, 64, lens(false)),
            Found::Record {
                pos: 0,
                len: 8,
                next_head: 96
            }
        );
        assert_eq!(locate(40, 96, 64, lens(true)), Found::Lost { dropped: 56 });
        assert_eq!(locate(8, 8, 64, lens(false)), Found::Empty);
        assert_eq!(locate(0, 200, 64, lens(false)), Found::Unreadable);
        assert_eq!(
            locate(0, 16, 64, |_| 8),
            Found::BadLength {
                pos: 0,
                len: 8,
                dropped: 16
            }
        );
    }
}
