//! The ring on a real file mapping: round trips, wrap-around, full rings,
//! and what a reader does with a scribbled file.

use super::*;

fn channel(ring: usize, max: usize) -> (tempfile::TempDir, Channel) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ch");
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)
        .unwrap();
    f.set_len(file_size(ring) as u64).unwrap();
    let map = memmap2::MmapOptions::new().map_raw(&f).unwrap();
    (dir, Channel::initialise(map, ring, max, 7).unwrap())
}

#[test]
fn payloads_in_the_slow_copy_window_are_written_whole() {
    let (_d, ch) = channel(65536, 20000);
    let len = 16 * 1024 + 5;
    let src: Vec<u8> = (0..len + 8192).map(|i| (i % 251) as u8).collect();
    let offset = ch.map.len() - len - 4096;
    let to = ch.map.as_ptr() as usize + offset;
    for gap in [0, 1, 15, 63, 64] {
        // The source starts so that the destination is `gap` bytes past it modulo 4 KiB.
        let from = to.wrapping_sub(gap).wrapping_sub(src.as_ptr() as usize) & 4095;
        ch.write_bytes(offset, &src[from..from + len]);
        assert_eq!(ch.bytes(offset, len), &src[from..from + len], "gap {gap}");
    }
}

#[test]
fn records_round_trip_across_wrap_around_and_full_rings_refuse() {
    let (_d, ch) = channel(4096, 1000);
    let mut expect = 0u32;
    for round in 0..200u32 {
        let payload = vec![round as u8; (round as usize * 37) % 1000];
        while !ch.try_push(Dir::Request, round, flags::OK, 5, &payload) {
            let r = ch.try_pop(Dir::Request).expect("full ring has records");
            assert_eq!((r.fault, r.epoch), (None, 5));
            assert_eq!(r.seq, expect);
            expect += 1;
        }
    }
    while let Some(r) = ch.try_pop(Dir::Request) {
        assert_eq!((r.fault, r.epoch), (None, 5));
        assert_eq!(r.seq, expect);
        expect += 1;
    }
    assert_eq!(expect, 200);
}

#[test]
fn nonsense_positions_and_markers_neither_panic_nor_hang() {
    let (_d, ch) = channel(4096, 1000);
    // A peer fills the ring with wrap markers and publishes a wild tail.
    for off in (0..4096).step_by(4) {
        ch.write_u32(ch.data(Dir::Request) + off, WRAP);
    }
    ch.ctl(Dir::Request, off::TAIL)
        .store(u64::MAX - 3, Ordering::Release);
    // Nothing readable, and no endless skipping either (this returns).
    assert_eq!(ch.try_pop(Dir::Request), None);
    // A wrap marker where a record should start after a skip: also nothing.
    ch.ctl(Dir::Request, off::TAIL).store(64, Ordering::Release);
    ch.ctl(Dir::Request, off::HEAD)
        .store(4080, Ordering::Release);
    assert_eq!(ch.try_pop(Dir::Request), None);
    ch.ctl(Dir::Request, off::HEAD).store(0, Ordering::Release);
    ch.ctl(Dir::Request, off::TAIL).store(0, Ordering::Release);
    // A wild head on the ring we produce into reads as full.
    ch.ctl(Dir::Response, off::HEAD)
        .store(1 << 40, Ordering::Release);
    assert!(!ch.try_push(Dir::Response, 1, flags::OK, 1, b"x"));
    // Garbage lengths are reported as corrupt, never read out of bounds.
    ch.discard(Dir::Request);
    let tail = ch.ctl(Dir::Request, off::TAIL).load(Ordering::Relaxed);
    let pos = (tail % 4096) as usize;
    ch.write_u32(ch.data(Dir::Request) + pos, 999_999);
    ch.ctl(Dir::Request, off::TAIL)
        .store(tail.wrapping_add(64), Ordering::Release);
    assert!(matches!(
        ch.try_pop(Dir::Request).unwrap().fault,
        Some(Fault::Framing { len: 999_999, .. })
    ));
    assert_eq!(
        ch.try_pop(Dir::Request),
        None,
        "everything published was dropped"
    );
}

#[test]
fn an_over_long_but_framed_record_is_skipped_alone() {
    let (_d, ch) = channel(4096, 100);
    // A producer that ignores max_record: 200 bytes, properly framed.
    let base = ch.data(Dir::Request);
    ch.write_u32(base, 200);
    ch.write_u32(base + 4, 1);
    let next = RECORD_HEADER + 200;
    ch.ctl(Dir::Request, off::TAIL)
        .store(next as u64, Ordering::Release);
    assert!(ch.try_push(Dir::Request, 2, flags::OK, 3, b"behind it"));
    let bad = ch.try_pop(Dir::Request).unwrap();
    assert_eq!((bad.seq, bad.fault), (1, Some(Fault::OverMax { len: 200 })));
    let good = ch.try_pop(Dir::Request).unwrap();
    assert_eq!((good.seq, good.fault, good.epoch), (2, None, 3));
    assert_eq!(good.payload, b"behind it");
}

#[test]
fn attach_refuses_bad_magic_version_and_sizes() {
    let (d, ch) = channel(4096, 1000);
    drop(ch);
    let path = d.path().join("ch");
    let open = || {
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        memmap2::MmapOptions::new().map_raw(&f).unwrap()
    };
    assert!(Channel::attach(open()).is_ok());
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[8] = 9;
    std::fs::write(&path, &bytes).unwrap();
    assert_eq!(
        Channel::attach(open()).unwrap_err(),
        LayoutError::Version(9)
    );
    bytes[8] = VERSION as u8;
    bytes[16..20].copy_from_slice(&3000u32.to_le_bytes());
    std::fs::write(&path, &bytes).unwrap();
    assert!(matches!(
        Channel::attach(open()).unwrap_err(),
        LayoutError::Size(_)
    ));
    bytes[0] = b'X';
    std::fs::write(&path, &bytes).unwrap();
    assert!(matches!(
        Channel::attach(open()).unwrap_err(),
        LayoutError::Magic(_)
    ));
}

#[test]
fn random_contents_and_positions_never_panic_hang_or_overread() {
    let (_d, ch) = channel(4096, 1000);
    let mut rng = crate::test_rng::Rng::new(0xC0FF_EE00_D15E_A5E5);
    let mut popped = 0;
    for _ in 0..50_000 {
        match rng.below(6) {
            // A misbehaving peer scribbles over the data area...
            0 => ch.write_u32(
                ch.data(Dir::Request) + 4 * rng.below(1024),
                if rng.below(4) == 0 {
                    WRAP
                } else {
                    rng.next() as u32
                },
            ),
            // ...or publishes positions, plausible or wild.
            1 => {
                let mut head = if rng.below(4) == 0 {
                    rng.next()
                } else {
                    rng.next() % 100_000
                };
                let mut ahead = if rng.below(4) == 0 {
                    rng.next()
                } else {
                    rng.below(5000) as u64
                };
                if rng.below(4) != 0 {
                    // Mostly aligned, so records get decoded too.
                    (head, ahead) = (head & !7, ahead & !7);
                }
                ch.ctl(Dir::Request, off::HEAD)
                    .store(head, Ordering::Release);
                ch.ctl(Dir::Request, off::TAIL)
                    .store(head.wrapping_add(ahead), Ordering::Release);
            }
            2 => ch
                .ctl(Dir::Response, off::HEAD)
                .store(rng.next() % 1_000_000, Ordering::Release),
            3 => {
                let n = rng.below(1001);
                let _ = ch.try_push(Dir::Request, 1, flags::OK, 1, &vec![7u8; n]);
            }
            4 => {
                let _ = ch.try_push(Dir::Response, 2, flags::OK, 1, &[1u8; 100]);
            }
            _ => {}
        }
        if let Some(r) = ch.try_pop(Dir::Request) {
            assert!(r.payload.len() <= 1000);
            popped += 1;
        }
    }
    assert!(popped > 1000, "only {popped} records decoded");
}
