//! Puts one direction of a TCP connection back in order from captured
//! segments. The capture sees what arrives on the wire: retransmissions,
//! reordering and overlaps included. Positions are kept as 64-bit offsets
//! from the first payload byte, mapped from 32-bit sequence numbers around
//! the next expected byte, so streams longer than 4 GiB and sequence
//! wrap-around need no special case. The first copy of a byte wins (TCP
//! guarantees retransmitted bytes are the same).
use std::collections::{BTreeMap, VecDeque};

use bytes::Bytes;

pub struct Reassembler {
    isn: u32,
    /// Offset of the next byte not yet in order.
    next: u64,
    /// In-order bytes not yet taken.
    ready: VecDeque<Bytes>,
    ready_bytes: usize,
    /// Out-of-order pieces by offset; they never overlap one another.
    pending: BTreeMap<u64, Bytes>,
    pending_bytes: usize,
    delivered: u64,
    /// Offset just past the last byte, once the FIN is seen.
    fin: Option<u64>,
    limit: usize,
}

#[derive(Debug, PartialEq, Eq)]
pub enum ReassemblyError {
    /// More than `limit` bytes would have to be held; the flow must be cut off.
    Overflow { held: usize, limit: usize },
}

impl Reassembler {
    pub fn new(isn: u32, limit: usize) -> Self {
        Self {
            isn,
            next: 0,
            ready: VecDeque::new(),
            ready_bytes: 0,
            pending: BTreeMap::new(),
            pending_bytes: 0,
            delivered: 0,
            fin: None,
            limit,
        }
    }

    pub fn segment(&mut self, seq: u32, payload: Bytes) -> Result<(), ReassemblyError> {
        let start = self.position(seq);
        let end = start + payload.len() as i64;
        let end = self.fin.map_or(end, |fin| end.min(fin as i64));
        let start = start.max(self.next as i64);
        if end <= start {
            return Ok(()); // already delivered, before the stream, or beyond FIN
        }
        let (start, end) = (start as u64, end as u64);
        let pieces = self.uncovered(start, end);
        let new_bytes: u64 = pieces.iter().map(|(from, to)| to - from).sum();
        let held = self.held() + new_bytes as usize;
        if held > self.limit {
            return Err(ReassemblyError::Overflow {
                held,
                limit: self.limit,
            });
        }
        let base = self.position(seq);
        for (from, to) in pieces {
            let piece = payload.slice((from as i64 - base) as usize..(to as i64 - base) as usize);
            self.pending_bytes += piece.len();
            self.pending.insert(from, piece);
        }
        self.promote();
        Ok(())
    }

    pub fn fin(&mut self, seq: u32) {
        if self.fin.is_some() {
            return;
        }
        let fin = self.position(seq).max(self.next as i64) as u64;
        self.fin = Some(fin);
        // Anything held past the end of the stream is not part of it.
        let beyond: Vec<u64> = self.pending.range(fin..).map(|(from, _)| *from).collect();
        for from in beyond {
            if let Some(piece) = self.pending.remove(&from) {
                self.pending_bytes -= piece.len();
            }
        }
        if let Some((&from, piece)) = self.pending.range(..fin).next_back()
            && from + piece.len() as u64 > fin
        {
            let kept = piece.slice(..(fin - from) as usize);
            self.pending_bytes -= piece.len() - kept.len();
            self.pending.insert(from, kept);
        }
    }

    pub fn take_ready(&mut self) -> Vec<Bytes> {
        self.delivered += self.ready_bytes as u64;
        self.ready_bytes = 0;
        self.ready.drain(..).collect()
    }

    pub fn finished(&self) -> bool {
        self.fin.is_some_and(|fin| self.next >= fin) && self.ready.is_empty()
    }

    pub fn hole(&self) -> Option<(u64, u64)> {
        let beyond = self.pending.keys().next().copied().or(self.fin)?;
        (beyond > self.next).then(|| (self.next, beyond - self.next))
    }

    pub fn delivered(&self) -> u64 {
        self.delivered
    }

    pub fn held(&self) -> usize {
        self.ready_bytes + self.pending_bytes
    }

    /// Offset of `seq`, taken as the nearest position to the next expected
    /// byte (within ±2^31); negative before the first payload byte.
    fn position(&self, seq: u32) -> i64 {
        let expected = self.isn.wrapping_add(1).wrapping_add(self.next as u32);
        self.next as i64 + i64::from(seq.wrapping_sub(expected) as i32)
    }

    /// The parts of [start, end) that no held piece covers yet.
    fn uncovered(&self, start: u64, end: u64) -> Vec<(u64, u64)> {
        let mut pieces = Vec::new();
        let mut cursor = start;
        if let Some((&from, piece)) = self.pending.range(..=start).next_back() {
            cursor = cursor.max(from + piece.len() as u64);
        }
        for (&from, piece) in self.pending.range(start..end) {
            if from > cursor {
                pieces.push((cursor, from));
            }
            cursor = cursor.max(from + piece.len() as u64);
        }
        if cursor < end {
            pieces.push((cursor, end));
        }
        pieces
    }

    /// Moves pieces that continue the in-order stream to `ready`.
    fn promote(&mut self) {
        while let Some(entry) = self.pending.first_entry() {
            if *entry.key() != self.next {
                break;
            }
            let piece = entry.remove();
            self.pending_bytes -= piece.len();
            self.next += piece.len() as u64;
            self.ready_bytes += piece.len();
            self.ready.push_back(piece);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ISN: u32 = 1000;

    fn pattern(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 + i / 251) as u8).collect()
    }

    fn take_all(reassembler: &mut Reassembler) -> Vec<u8> {
        reassembler.take_ready().concat()
    }

    /// xorshift: deterministic and dependency-free.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
    }

    fn seq_at(isn: u32, offset: usize) -> u32 {
        isn.wrapping_add(1).wrapping_add(offset as u32)
    }

    #[test]
    fn in_order_and_reversed_segments_come_out_in_order() {
        let data = pattern(10_000);
        for reversed in [false, true] {
            let mut r = Reassembler::new(ISN, 1 << 20);
            let mut chunks: Vec<(usize, usize)> = (0..data.len())
                .step_by(1000)
                .map(|s| (s, s + 1000))
                .collect();
            if reversed {
                chunks.reverse();
            }
            for (from, to) in chunks {
                r.segment(seq_at(ISN, from), Bytes::copy_from_slice(&data[from..to]))
                    .unwrap();
            }
            assert_eq!(take_all(&mut r), data);
            assert_eq!(r.hole(), None);
            assert_eq!(r.delivered(), data.len() as u64);
        }
    }

    #[test]
    fn shuffled_duplicated_overlapping_segments_reproduce_a_mebibyte_across_the_wrap() {
        let data = pattern(1 << 20);
        let isn = u32::MAX - 300_000; // the stream wraps the 32-bit sequence space
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let mut segments = Vec::new();
        let mut offset = 0;
        while offset < data.len() {
            let len = 1 + rng.below(3000);
            let end = (offset + len).min(data.len());
            segments.push((offset, end));
            if rng.below(4) == 0 {
                // an overlapping retransmission starting earlier
                segments.push((offset.saturating_sub(rng.below(500)), end));
            }
            offset = end;
        }
        for i in (1..segments.len()).rev() {
            let j = rng.below(i + 1);
            if i - j < 40 {
                segments.swap(i, j); // local reordering, like a network does
            }
        }
        let mut r = Reassembler::new(isn, 4 << 20);
        let mut out = Vec::new();
        for (from, to) in segments {
            r.segment(seq_at(isn, from), Bytes::copy_from_slice(&data[from..to]))
                .unwrap();
            out.extend(take_all(&mut r));
        }
        r.fin(seq_at(isn, data.len()));
        out.extend(take_all(&mut r));
        assert!(r.finished());
        assert_eq!(out.len(), data.len());
        assert!(out == data, "bytes differ");
        assert_eq!(r.held(), 0);
    }

    #[test]
    fn positions_map_around_the_next_byte_across_the_wrap() {
        let mut r = Reassembler::new(u32::MAX, 1 << 20);
        // first payload byte has seq 0 after the wrap
        assert_eq!(r.position(0), 0);
        assert_eq!(r.position(u32::MAX), -1);
        r.next = (1u64 << 32) + 5; // a stream beyond 4 GiB
        let expected = u32::MAX.wrapping_add(1).wrapping_add(5);
        assert_eq!(r.position(expected), (1i64 << 32) + 5);
        assert_eq!(r.position(expected.wrapping_sub(10)), (1i64 << 32) - 5);
        assert_eq!(
            r.position(expected.wrapping_add(1 << 30)),
            (1i64 << 32) + 5 + (1 << 30)
        );
    }

    #[test]
    fn bytes_before_the_stream_start_are_trimmed() {
        let mut r = Reassembler::new(ISN, 1 << 20);
        r.segment(ISN.wrapping_sub(2), Bytes::from_static(b"xyzab"))
            .unwrap();
        assert_eq!(take_all(&mut r), b"ab");
    }

    #[test]
    fn retransmitted_and_post_fin_data_is_ignored() {
        let mut r = Reassembler::new(ISN, 1 << 20);
        r.segment(seq_at(ISN, 0), Bytes::from_static(b"hello"))
            .unwrap();
        assert_eq!(take_all(&mut r), b"hello");
        r.segment(seq_at(ISN, 0), Bytes::from_static(b"hello"))
            .unwrap();
        r.segment(seq_at(ISN, 3), Bytes::from_static(b"lo world"))
            .unwrap();
        r.fin(seq_at(ISN, 11));
        r.segment(seq_at(ISN, 11), Bytes::from_static(b"after"))
            .unwrap();
        assert!(!r.finished(), "ready bytes not yet taken");
        assert_eq!(take_all(&mut r), b" world");
        assert!(r.finished());
        assert_eq!(r.delivered(), 11);
    }

    #[test]
    fn holes_are_reported_until_filled_and_fin_before_missing_data_waits() {
        let mut r = Reassembler::new(ISN, 1 << 20);
        r.segment(seq_at(ISN, 0), Bytes::from_static(b"ab"))
            .unwrap();
        r.segment(seq_at(ISN, 5), Bytes::from_static(b"fg"))
            .unwrap();
        r.fin(seq_at(ISN, 7));
        assert_eq!(r.hole(), Some((2, 3)));
        assert_eq!(take_all(&mut r), b"ab");
        assert!(!r.finished());
        r.segment(seq_at(ISN, 2), Bytes::new()).unwrap();
        r.segment(seq_at(ISN, 2), Bytes::from_static(b"cde"))
            .unwrap();
        assert_eq!(r.hole(), None);
        assert_eq!(take_all(&mut r), b"cdefg");
        assert!(r.finished());
    }

    #[test]
    fn a_missing_tail_before_fin_is_a_hole() {
        let mut r = Reassembler::new(ISN, 1 << 20);
        r.segment(seq_at(ISN, 0), Bytes::from_static(b"ab"))
            .unwrap();
        r.fin(seq_at(ISN, 4));
        assert_eq!(r.hole(), Some((2, 2)));
    }

    #[test]
    fn overflow_leaves_state_unchanged_and_taking_frees_room() {
        let mut r = Reassembler::new(ISN, 10);
        r.segment(seq_at(ISN, 0), Bytes::from_static(b"0123456"))
            .unwrap();
        let err = r
            .segment(seq_at(ISN, 7), Bytes::from_static(b"7890"))
            .unwrap_err();
        assert_eq!(
            err,
            ReassemblyError::Overflow {
                held: 11,
                limit: 10
            }
        );
        assert_eq!(r.held(), 7);
        assert_eq!(take_all(&mut r), b"0123456");
        r.segment(seq_at(ISN, 7), Bytes::from_static(b"7890"))
            .unwrap();
        assert_eq!(take_all(&mut r), b"7890");
    }

    #[test]
    fn random_input_never_panics() {
        let mut rng = Rng(42);
        let mut r = Reassembler::new(rng.next() as u32, 1 << 16);
        for _ in 0..20_000 {
            match rng.below(10) {
                0 => r.fin(rng.next() as u32),
                1 => drop(r.take_ready()),
                _ => {
                    let len = rng.below(2000);
                    let _ = r.segment(rng.next() as u32, Bytes::from(vec![1u8; len]));
                }
            }
            assert!(r.held() <= 1 << 16);
        }
    }
}
