//! Puts one direction of a TCP connection back in order from captured segments.
//!
//! The mirror captures at tc ingress, before the pod's TCP stack, so it sees the wire as it
//! is: retransmissions, reordering, segments overlapping earlier ones, and (when the capture
//! buffer overruns) gaps that never fill. This module turns that into the byte stream the
//! pod's socket reads: every byte exactly once, in order.
//!
//! - Positions are `u64` offsets from the first payload byte. A 32-bit sequence number is
//!   mapped to the offset nearest the next expected byte (within ±2^31). That is unambiguous
//!   because TCP never has more than a window (< 2^30) in flight, and past that point no
//!   code needs wrap-around arithmetic: streams longer than 4 GiB just work.
//! - Nothing is held further than [`AHEAD`] beyond the next expected byte: a segment with
//!   bytes beyond it is an error, and the caller cuts the flow. Dropping it instead would
//!   leave a hole that the sender never fills (the pod acknowledged those bytes), so a
//!   real connection with a larger window would hang silently; a forged segment can
//!   already spoil a copy, so cutting gives it nothing new.
//! - Overlaps are trimmed on arrival ("first copy wins": TCP retransmits identical bytes),
//!   so held pieces never overlap, each byte is counted once, and later steps need no
//!   overlap logic.
//! - Pieces are slices of the captured `Bytes` (no copy), except when only a small part of
//!   a segment is new: that part is copied so a mostly duplicate 64 KiB segment cannot pin
//!   its whole buffer while counting as a few bytes. Payload memory stays within about
//!   twice [`Reassembler::held`].
//! - Everything held is bounded by `limit`, counting [`PIECE_OVERHEAD`] for each piece
//!   besides its bytes. Going over is an error that changes nothing, and the caller cuts
//!   the flow: neither a slow local process, nor a hole that never fills, nor a flood of
//!   tiny out-of-order segments may grow the agent's memory.
//! - Whatever cannot be part of the stream the receiver reads is silently dropped: bytes
//!   before the first one or already in order, bytes beyond the FIN, FINs that contradict
//!   bytes already in order or lie beyond [`AHEAD`] (the bytes before such a FIN would
//!   have cut the flow). These come from retransmissions, stray or forged packets that
//!   the pod's stack drops as well.
use std::collections::BTreeMap;

use bytes::Bytes;

/// How far beyond the next expected byte data is held, 16 MiB. TCP allows windows up
/// to 2^30, but a real one rarely exceeds a few MiB (Linux's default `tcp_rmem` maximum
/// is 6 MiB); without this, anyone who can reach a mirrored port could have a
/// copy hold data up to 1 GiB past a 1-byte gap (up to --mirror-flow-limit).
pub const AHEAD: u64 = 16 << 20;

/// What a held piece costs beyond its bytes, counted against the limit: its `Bytes`
/// handle, its slot in the map or list, and the allocations behind a small piece (the
/// captured buffer and the handle's shared header). Measured at 105 bytes for a piece in
/// order and 142 for a 1-byte piece out of order; without this, 1-byte segments held
/// out of order took 143 times the memory the limit allowed.
pub const PIECE_OVERHEAD: usize = 160;

/// Bytes of one direction of one TCP connection, put back in order.
pub struct Reassembler {
    /// Sequence number of the first payload byte, offset 0.
    first_seq: u32,
    /// Offset of the first byte not yet in order; everything before it is ready or taken.
    next: u64,
    /// In-order bytes not yet taken, in stream order.
    ready: Vec<Bytes>,
    ready_len: usize,
    /// Out-of-order pieces by offset: non-empty, non-overlapping, all after `next` and
    /// before `end`.
    pending: BTreeMap<u64, Bytes>,
    pending_len: usize,
    delivered: u64,
    /// Offset just past the last byte, once a FIN was seen.
    end: Option<u64>,
    limit: usize,
}

#[derive(Debug, PartialEq, Eq)]
pub enum ReassemblyError {
    /// More than `limit` would have to be held (out-of-order data waiting for a gap, plus
    /// data delivered but not yet taken, counted by [`Reassembler::footprint`]); the flow
    /// must be cut off.
    Overflow { footprint: usize, limit: usize },
    /// Bytes up to `ahead` past the next expected byte, further than [`AHEAD`]: no window
    /// the agent follows is that large; the flow must be cut off.
    TooFarAhead { ahead: u64 },
}

impl Reassembler {
    /// `isn` is the sequence number of the SYN: the first payload byte has sequence isn+1.
    /// `limit` bounds the bytes held for this flow.
    pub fn new(isn: u32, limit: usize) -> Self {
        Self {
            first_seq: isn.wrapping_add(1),
            next: 0,
            ready: Vec::new(),
            ready_len: 0,
            pending: BTreeMap::new(),
            pending_len: 0,
            delivered: 0,
            end: None,
            limit,
        }
    }

    /// A segment's payload starting at sequence `seq` (as seen in the TCP header; may be a
    /// retransmission, overlap already-delivered data partly or wholly, arrive out of
    /// order, or straddle the 2^32 wrap-around; bytes further than [`AHEAD`] are an error).
    pub fn segment(&mut self, seq: u32, payload: Bytes) -> Result<(), ReassemblyError> {
        let start = position(self.first_seq, self.next, seq);
        let Some((from, to)) = self.acceptable(start, payload.len())? else {
            return Ok(());
        };
        let gaps = self.uncovered(from, to);
        let new: u64 = gaps.iter().map(|(from, to)| to - from).sum();
        let footprint = self
            .footprint()
            .saturating_add(usize::try_from(new).unwrap_or(usize::MAX))
            .saturating_add(gaps.len() * PIECE_OVERHEAD);
        if footprint > self.limit {
            return Err(ReassemblyError::Overflow {
                footprint,
                limit: self.limit,
            });
        }
        // Copy what is kept when it is under half the segment, so the rest can be freed.
        let copy = new.saturating_mul(2) < payload.len() as u64;
        // In range: every gap lies within [start, start + payload.len()].
        let index = |offset: u64| (i128::from(offset) - start) as usize;
        for (from, to) in gaps {
            let slice = payload.slice(index(from)..index(to));
            let piece = if copy {
                Bytes::copy_from_slice(&slice)
            } else {
                slice
            };
            self.pending_len += piece.len();
            self.pending.insert(from, piece);
        }
        self.promote();
        Ok(())
    }

    /// A FIN with sequence `seq` (the sequence number just after the last payload byte).
    pub fn fin(&mut self, seq: u32) {
        if self.end.is_some() {
            return; // a retransmitted FIN carries the same sequence number
        }
        let at = position(self.first_seq, self.next, seq);
        let next = i128::from(self.next);
        if at < next || at > next + i128::from(AHEAD) {
            return; // contradicts bytes already in order, or beyond what is held
        }
        let end = at as u64; // in range: checked just above
        self.end = Some(end);
        for piece in self.pending.split_off(&end).into_values() {
            self.pending_len -= piece.len();
        }
        if let Some(mut last) = self.pending.last_entry() {
            let keep = usize::try_from(end - *last.key()).unwrap_or(usize::MAX);
            let piece = last.get_mut();
            if keep < piece.len() {
                self.pending_len -= piece.len() - keep;
                piece.truncate(keep);
            }
        }
    }

    /// Takes the bytes that are now in order and not yet taken (empty if none), as a list of
    /// chunks in stream order; zero-copy where possible (slices of the given Bytes).
    pub fn take_ready(&mut self) -> Vec<Bytes> {
        self.delivered += self.ready_len as u64;
        self.ready_len = 0;
        std::mem::take(&mut self.ready)
    }

    /// True once a FIN was seen and every byte before it has been taken.
    pub fn finished(&self) -> bool {
        self.end == Some(self.next) && self.ready.is_empty()
    }

    /// The first missing range as (offset from the first payload byte, length) when data
    /// beyond a hole is held; None when nothing is missing. Used to declare loss when the
    /// hole never fills (e.g. the capture buffer overran).
    ///
    /// A FIN beyond the last byte in order counts as data beyond a hole: the bytes before
    /// it are known to exist and are missing.
    pub fn hole(&self) -> Option<(u64, u64)> {
        let beyond = self.pending.keys().next().copied().or(self.end)?;
        (beyond > self.next).then(|| (self.next, beyond - self.next))
    }

    /// Bytes delivered (taken) so far.
    pub fn delivered(&self) -> u64 {
        self.delivered
    }

    /// Bytes currently held: out-of-order data plus in-order data not yet taken.
    pub fn held(&self) -> usize {
        self.ready_len + self.pending_len
    }

    /// Pieces those bytes are held in.
    pub fn pieces(&self) -> usize {
        self.ready.len() + self.pending.len()
    }

    /// What the limit bounds: the bytes held and [`PIECE_OVERHEAD`] for each piece.
    pub fn footprint(&self) -> usize {
        self.held() + self.pieces() * PIECE_OVERHEAD
    }

    /// The part of `len` bytes from position `start` that may still join the stream: not
    /// yet in order, before the FIN. None if no byte is; an error if some are further
    /// than [`AHEAD`] from the next byte.
    fn acceptable(&self, start: i128, len: usize) -> Result<Option<(u64, u64)>, ReassemblyError> {
        let next = i128::from(self.next);
        let mut to = start + len as i128;
        if let Some(end) = self.end {
            to = to.min(i128::from(end));
        }
        let from = start.max(next);
        if from >= to {
            return Ok(None);
        }
        if to > next + i128::from(AHEAD) {
            let ahead = (to - next) as u64; // in range: to > next, and < next + 2^32
            return Err(ReassemblyError::TooFarAhead { ahead });
        }
        // In range: next <= from < to <= next + AHEAD.
        Ok(Some((from as u64, to as u64)))
    }

    /// The parts of [from, to) that no pending piece covers yet, in order.
    fn uncovered(&self, from: u64, to: u64) -> Vec<(u64, u64)> {
        let mut gaps = Vec::new();
        let mut cursor = from;
        // A piece starting before `from` may reach into the range.
        if let Some((&at, piece)) = self.pending.range(..from).next_back() {
            cursor = cursor.max(at + piece.len() as u64);
        }
        for (&at, piece) in self.pending.range(from..to) {
            if at > cursor {
                gaps.push((cursor, at));
            }
            cursor = cursor.max(at + piece.len() as u64);
        }
        if cursor < to {
            gaps.push((cursor, to));
        }
        gaps
    }

    /// Moves the pending pieces that now continue the stream to `ready`.
    fn promote(&mut self) {
        while let Some(entry) = self.pending.first_entry() {
            if *entry.key() != self.next {
                break;
            }
            let piece = entry.remove();
            self.pending_len -= piece.len();
            self.ready_len += piece.len();
            self.next += piece.len() as u64;
            self.ready.push(piece);
        }
    }
}

/// The position of `seq` as an offset from the first payload byte (sequence `first_seq`):
/// of all positions with these low 32 bits, the one nearest `near`, from 2^31 before it to
/// 2^31 - 1 after. Negative before the first payload byte.
fn position(first_seq: u32, near: u64, seq: u32) -> i128 {
    let at_near = first_seq.wrapping_add(near as u32); // low 32 bits, by design
    i128::from(near) + i128::from(seq.wrapping_sub(at_near) as i32)
}

#[cfg(test)]
mod tests {
    use super::*;

    const ISN: u32 = 1000;
    const MIB: usize = 1 << 20;

    /// The stream's byte at `offset`: no short period, so a misplaced byte shows.
    fn byte_at(offset: u64) -> u8 {
        (offset.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 56) as u8
    }

    fn stream(from: u64, to: u64) -> Bytes {
        (from..to).map(byte_at).collect()
    }

    /// Sequence number of the byte at `offset`.
    fn seq_at(isn: u32, offset: u64) -> u32 {
        isn.wrapping_add(1).wrapping_add(offset as u32)
    }

    /// Feeds the stream's bytes [from, to).
    fn feed(r: &mut Reassembler, isn: u32, from: u64, to: u64) -> Result<(), ReassemblyError> {
        r.segment(seq_at(isn, from), stream(from, to))
    }

    fn take(r: &mut Reassembler) -> Vec<u8> {
        r.take_ready().concat()
    }

    /// xorshift64: deterministic and dependency-free.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }

        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }

        fn shuffle<T>(&mut self, items: &mut [T]) {
            for i in (1..items.len()).rev() {
                items.swap(i, self.below(i as u64 + 1) as usize);
            }
        }
    }

    /// The invariants every other method relies on.
    fn check(r: &Reassembler) {
        let mut cursor = r.next;
        for (&at, piece) in &r.pending {
            assert!(
                at > r.next && at >= cursor,
                "overlap, or in order yet pending"
            );
            assert!(!piece.is_empty());
            cursor = at + piece.len() as u64;
        }
        if let Some(end) = r.end {
            assert!(cursor <= end && r.next <= end, "bytes beyond the FIN");
        }
        assert!(cursor <= r.next + AHEAD, "bytes too far ahead");
        assert_eq!(
            r.pending_len,
            r.pending.values().map(Bytes::len).sum::<usize>()
        );
        assert_eq!(r.ready_len, r.ready.iter().map(Bytes::len).sum::<usize>());
        assert!(r.footprint() <= r.limit);
        assert_eq!(r.delivered + r.ready_len as u64, r.next);
    }

    #[test]
    fn in_order_segments_come_out_as_given_without_copying() {
        let mut r = Reassembler::new(ISN, MIB);
        let first = stream(0, 1000);
        r.segment(seq_at(ISN, 0), first.clone()).unwrap();
        feed(&mut r, ISN, 1000, 2500).unwrap();
        assert_eq!(r.held(), 2500);
        let chunks = r.take_ready();
        assert_eq!(chunks.len(), 2);
        assert_eq!(chunks[0].as_ptr(), first.as_ptr(), "a slice, not a copy");
        assert_eq!(chunks.concat(), stream(0, 2500));
        assert_eq!((r.delivered(), r.held(), r.hole()), (2500, 0, None));
        assert!(r.take_ready().is_empty());
        assert!(!r.finished(), "no FIN yet");
    }

    #[test]
    fn reversed_segments_come_out_in_order() {
        let mut r = Reassembler::new(ISN, MIB);
        for from in (0..10).rev().map(|i| i * 1000) {
            feed(&mut r, ISN, from, from + 1000).unwrap();
            check(&r);
            if from > 0 {
                assert!(r.take_ready().is_empty());
                assert_eq!(r.hole(), Some((0, from)));
            }
        }
        assert_eq!(take(&mut r), stream(0, 10_000));
        assert_eq!(r.hole(), None);
    }

    /// Shuffled segments, duplicates, overlaps and a FIN at a random point reproduce a
    /// mebibyte byte-exact; the ISN is near u32::MAX so sequence numbers wrap.
    #[test]
    fn shuffled_duplicated_overlapping_segments_reproduce_a_mebibyte() {
        let len = MIB as u64;
        for seed in [1, 0x9E37_79B9, 0xDEAD_BEEF_CAFE] {
            let mut rng = Rng(seed);
            let isn = u32::MAX - 100_000 - rng.below(1000) as u32;
            let mut segments = Vec::new();
            let mut from = 0;
            while from < len {
                let to = (from + 1 + rng.below(3000)).min(len);
                segments.push((from, to));
                from = to;
            }
            for _ in 0..segments.len() / 2 {
                // duplicates and overlaps, some reaching into the next byte or past the end
                let from = rng.below(len);
                let to = (from + rng.below(5000)).min(len);
                segments.push((from, to));
            }
            rng.shuffle(&mut segments);
            let fin_at = rng.below(segments.len() as u64) as usize;
            let mut r = Reassembler::new(isn, 2 * MIB);
            let mut out = Vec::new();
            for (i, &(from, to)) in segments.iter().enumerate() {
                if i == fin_at {
                    r.fin(seq_at(isn, len));
                }
                feed(&mut r, isn, from, to).unwrap();
                check(&r);
                if rng.below(8) == 0 {
                    out.extend(take(&mut r));
                }
            }
            out.extend(take(&mut r));
            assert!(out == stream(0, len), "seed {seed}: bytes differ");
            assert!(r.finished());
            assert_eq!((r.delivered(), r.held(), r.hole()), (len, 0, None));
        }
    }

    #[test]
    fn a_stream_wraps_the_sequence_space() {
        let isn = u32::MAX - 2; // bytes 0, 1 have sequence MAX-1, MAX; byte 2 has 0
        let mut r = Reassembler::new(isn, MIB);
        feed(&mut r, isn, 4, 10).unwrap(); // after the wrap, out of order
        feed(&mut r, isn, 0, 5).unwrap(); // straddles it
        r.fin(seq_at(isn, 10));
        assert_eq!(seq_at(isn, 2), 0);
        assert_eq!(take(&mut r), stream(0, 10));
        assert!(r.finished());
    }

    #[test]
    fn positions_are_nearest_to_the_next_byte_at_the_boundaries() {
        const HALF: i128 = 1 << 31;
        const FOUR_GIB: i128 = 1 << 32;
        // first byte at sequence 0: the SYN was u32::MAX
        assert_eq!(position(0, 0, 0), 0);
        assert_eq!(position(0, 0, u32::MAX), -1);
        assert_eq!(position(0, 0, (1 << 31) - 1), HALF - 1);
        assert_eq!(
            position(0, 0, 1 << 31),
            -HALF,
            "exactly half way counts as behind"
        );
        // about to wrap the first time
        assert_eq!(position(10, (1 << 32) - 12, u32::MAX), FOUR_GIB - 11);
        assert_eq!(position(10, (1 << 32) - 12, 0), FOUR_GIB - 10);
        assert_eq!(position(10, (1 << 32) - 12, 9), FOUR_GIB - 1);
        assert_eq!(position(10, (1 << 32) - 12, 10), FOUR_GIB);
        // beyond 4 GiB, and beyond 2^32 wraps
        let near = (5 << 32) + 7;
        let at_near: u32 = 17; // 10 + 7
        let around = |delta: i32| position(10, near, at_near.wrapping_add_signed(delta));
        assert_eq!(around(0), i128::from(near));
        assert_eq!(around(-8), i128::from(near) - 8);
        assert_eq!(around(-18), i128::from(near) - 18, "behind, across a wrap");
        assert_eq!(around(i32::MAX), i128::from(near) + HALF - 1);
        assert_eq!(around(i32::MIN), i128::from(near) - HALF);
        // the far end of u64: no overflow
        assert_eq!(
            position(0, u64::MAX, u32::MAX - 1),
            i128::from(u64::MAX) - 1
        );
        assert_eq!(position(0, u64::MAX, 0), i128::from(u64::MAX) + 1);
    }

    /// Reassembly past 4 GiB, simulated by moving the stream forward without the bytes.
    #[test]
    fn a_stream_beyond_four_gibibytes_keeps_its_positions() {
        let mut r = Reassembler::new(ISN, MIB);
        let skip = (1 << 32) - 30;
        r.next = skip;
        r.delivered = skip;
        feed(&mut r, ISN, skip + 50, skip + 80).unwrap();
        feed(&mut r, ISN, skip, skip + 60).unwrap();
        feed(&mut r, ISN, skip - 100, skip + 10).unwrap(); // old bytes, 2^32 later
        assert_eq!(take(&mut r), stream(skip, skip + 80));
        feed(&mut r, ISN, skip + 100, skip + 110).unwrap();
        assert_eq!(r.hole(), Some((skip + 80, 20)));
        r.fin(seq_at(ISN, skip + 110));
        feed(&mut r, ISN, skip + 80, skip + 100).unwrap();
        assert_eq!(take(&mut r), stream(skip + 80, skip + 110));
        assert!(r.finished());
        assert_eq!(r.delivered(), skip + 110);
    }

    #[test]
    fn retransmitted_data_is_delivered_once() {
        let mut r = Reassembler::new(ISN, MIB);
        feed(&mut r, ISN, 0, 100).unwrap();
        assert_eq!(take(&mut r), stream(0, 100));
        feed(&mut r, ISN, 0, 100).unwrap(); // wholly delivered
        feed(&mut r, ISN, 30, 60).unwrap(); // inside delivered data
        assert!(r.take_ready().is_empty());
        assert_eq!(r.held(), 0);
        feed(&mut r, ISN, 90, 120).unwrap(); // partly delivered
        assert_eq!(take(&mut r), stream(100, 120));
        // overlapping data that is held, not yet taken
        feed(&mut r, ISN, 150, 200).unwrap();
        feed(&mut r, ISN, 140, 210).unwrap();
        feed(&mut r, ISN, 160, 170).unwrap();
        assert_eq!(r.held(), 70, "held bytes are counted once");
        feed(&mut r, ISN, 110, 140).unwrap();
        assert_eq!(take(&mut r), stream(120, 210));
        assert_eq!(r.delivered(), 210);
    }

    #[test]
    fn bytes_before_the_first_payload_byte_are_dropped() {
        let mut r = Reassembler::new(ISN, MIB);
        r.segment(ISN.wrapping_sub(2), Bytes::from_static(b"xyz01"))
            .unwrap();
        assert_eq!(take(&mut r), b"01");
    }

    #[test]
    fn a_mostly_duplicate_segment_does_not_pin_its_buffer() {
        let mut r = Reassembler::new(ISN, MIB);
        feed(&mut r, ISN, 0, 1000).unwrap();
        let retransmission = stream(0, 1010);
        r.segment(seq_at(ISN, 0), retransmission.clone()).unwrap();
        let chunks = r.take_ready();
        assert_eq!(chunks.concat(), stream(0, 1010));
        let tail = chunks.last().unwrap();
        assert_eq!(tail.len(), 10);
        let buffer = retransmission.as_ptr_range();
        assert!(!buffer.contains(&tail.as_ptr()), "a copy, not a slice");
    }

    #[test]
    fn data_beyond_the_fin_is_dropped() {
        let mut r = Reassembler::new(ISN, MIB);
        feed(&mut r, ISN, 20, 40).unwrap(); // held, partly beyond the FIN to come
        feed(&mut r, ISN, 50, 60).unwrap(); // held, wholly beyond
        assert_eq!(r.held(), 30);
        r.fin(seq_at(ISN, 30));
        check(&r);
        assert_eq!(r.held(), 10);
        feed(&mut r, ISN, 25, 45).unwrap(); // straddles the FIN
        feed(&mut r, ISN, 30, 45).unwrap(); // starts at it
        feed(&mut r, ISN, 0, 35).unwrap();
        assert_eq!(take(&mut r), stream(0, 30));
        assert!(r.finished());
        feed(&mut r, ISN, 30, 100).unwrap();
        assert_eq!((r.held(), r.delivered()), (0, 30));
        assert!(r.finished());
    }

    #[test]
    fn finished_only_once_everything_before_the_fin_is_taken() {
        let mut r = Reassembler::new(ISN, MIB);
        feed(&mut r, ISN, 0, 10).unwrap();
        r.fin(seq_at(ISN, 10));
        assert!(!r.finished(), "bytes not yet taken");
        assert_eq!(take(&mut r), stream(0, 10));
        assert!(r.finished());
        r.fin(seq_at(ISN, 10)); // retransmitted
        assert!(r.finished());

        let mut empty = Reassembler::new(ISN, MIB);
        assert!(!empty.finished());
        empty.fin(seq_at(ISN, 0));
        assert!(empty.finished(), "a stream without payload");
    }

    #[test]
    fn fins_that_cannot_be_the_end_are_ignored() {
        let mut r = Reassembler::new(ISN, MIB);
        feed(&mut r, ISN, 0, 10).unwrap();
        r.fin(seq_at(ISN, 5)); // before bytes already in order
        r.fin(seq_at(ISN, 10 + AHEAD + 1)); // further ahead than anything held
        assert_eq!(r.hole(), None);
        r.fin(seq_at(ISN, 20));
        r.fin(seq_at(ISN, 15)); // the first FIN stands
        feed(&mut r, ISN, 10, 20).unwrap();
        assert_eq!(take(&mut r), stream(0, 20));
        assert!(r.finished());
    }

    #[test]
    fn a_fin_before_missing_data_waits_for_it() {
        let mut r = Reassembler::new(ISN, MIB);
        r.fin(seq_at(ISN, 30));
        assert_eq!(r.hole(), Some((0, 30)), "the FIN shows bytes are missing");
        feed(&mut r, ISN, 20, 30).unwrap();
        feed(&mut r, ISN, 0, 10).unwrap();
        assert_eq!(take(&mut r), stream(0, 10));
        assert!(!r.finished());
        assert_eq!(r.hole(), Some((10, 10)));
        feed(&mut r, ISN, 10, 20).unwrap();
        assert_eq!(r.hole(), None);
        assert!(!r.finished());
        assert_eq!(take(&mut r), stream(10, 30));
        assert!(r.finished());
    }

    #[test]
    fn zero_length_segments_change_nothing() {
        let mut r = Reassembler::new(ISN, 0);
        for offset in [0, 5, 1 << 31, 1 << 40] {
            r.segment(seq_at(ISN, offset), Bytes::new()).unwrap();
            check(&r);
        }
        assert_eq!((r.held(), r.hole(), r.delivered()), (0, None, 0));
        assert!(r.take_ready().is_empty());
        r.fin(seq_at(ISN, 0));
        r.segment(seq_at(ISN, 0), Bytes::new()).unwrap();
        assert!(r.finished());
    }

    /// Bytes beyond [`AHEAD`] from the next expected byte are refused, whole segment and
    /// all, leaving the flow as it was; up to it they are held. The limit moves with the
    /// next expected byte.
    #[test]
    fn data_further_ahead_than_the_limit_is_refused() {
        let mut r = Reassembler::new(ISN, 64 * MIB);
        feed(&mut r, ISN, AHEAD - 10, AHEAD).unwrap(); // ends exactly at the limit
        assert_eq!(r.hole(), Some((0, AHEAD - 10)));
        for (from, to, ahead) in [
            (AHEAD, AHEAD + 1, AHEAD + 1),               // the first byte beyond
            (AHEAD - 5, AHEAD + 5, AHEAD + 5),           // straddles it
            (AHEAD + 1000, AHEAD + 1100, AHEAD + 1100),  // a 1-byte gap at 16 MiB
            (1 << 30, (1 << 30) + 100, (1 << 30) + 100), // a window TCP allows
        ] {
            assert_eq!(
                feed(&mut r, ISN, from, to),
                Err(ReassemblyError::TooFarAhead { ahead }),
                "{from}..{to}"
            );
            check(&r);
        }
        assert_eq!(r.held(), 10, "nothing refused was kept");
        // Half the sequence space ahead is the same as half behind: old, dropped.
        feed(&mut r, ISN, 1 << 31, (1 << 31) + 100).unwrap();
        // Once the stream moves on, so does the limit.
        feed(&mut r, ISN, 0, 1000).unwrap();
        feed(&mut r, ISN, 1000 + AHEAD - 1, 1000 + AHEAD).unwrap();
        assert_eq!(
            feed(&mut r, ISN, 1000 + AHEAD, 1001 + AHEAD),
            Err(ReassemblyError::TooFarAhead { ahead: AHEAD + 1 })
        );
        assert_eq!(r.held(), 1011);
        check(&r);
    }

    #[test]
    fn hole_reports_the_first_missing_range_until_filled() {
        let mut r = Reassembler::new(ISN, MIB);
        assert_eq!(r.hole(), None);
        feed(&mut r, ISN, 0, 10).unwrap();
        assert_eq!(r.hole(), None, "nothing beyond");
        feed(&mut r, ISN, 40, 50).unwrap();
        feed(&mut r, ISN, 20, 30).unwrap();
        assert_eq!(r.hole(), Some((10, 10)));
        take(&mut r); // taking does not move the hole
        assert_eq!(r.hole(), Some((10, 10)));
        feed(&mut r, ISN, 12, 15).unwrap(); // inside it: the first hole is still at 10
        assert_eq!(r.hole(), Some((10, 2)));
        feed(&mut r, ISN, 5, 25).unwrap();
        assert_eq!(r.hole(), Some((30, 10)));
        feed(&mut r, ISN, 30, 40).unwrap();
        assert_eq!(r.hole(), None);
        assert_eq!(take(&mut r), stream(10, 50));
    }

    /// The footprint of `bytes` held in `pieces`.
    fn footprint(bytes: usize, pieces: usize) -> usize {
        bytes + pieces * PIECE_OVERHEAD
    }

    #[test]
    fn overflow_is_refused_without_change_and_taking_frees_room() {
        let limit = footprint(10, 2);
        let mut r = Reassembler::new(ISN, limit);
        feed(&mut r, ISN, 0, 7).unwrap(); // ready, not taken
        assert_eq!(r.footprint(), footprint(7, 1));
        assert_eq!(
            feed(&mut r, ISN, 7, 11),
            Err(ReassemblyError::Overflow {
                footprint: footprint(11, 2),
                limit
            })
        );
        assert_eq!(
            feed(&mut r, ISN, 20, 24), // out of order counts too
            Err(ReassemblyError::Overflow {
                footprint: footprint(11, 2),
                limit
            })
        );
        check(&r);
        assert_eq!((r.held(), r.hole(), r.delivered()), (7, None, 0));
        feed(&mut r, ISN, 0, 10).unwrap(); // exactly the limit; 3 new bytes
        assert_eq!(take(&mut r), stream(0, 10));
        assert_eq!(r.footprint(), 0);
        feed(&mut r, ISN, 10, 20).unwrap();
        assert_eq!(take(&mut r), stream(10, 20));
    }

    #[test]
    fn overflow_counts_only_new_bytes_and_keeps_held_ones() {
        let limit = footprint(10, 3);
        let mut r = Reassembler::new(ISN, limit);
        feed(&mut r, ISN, 12, 18).unwrap();
        feed(&mut r, ISN, 10, 20).unwrap(); // 4 new of 10, in 2 pieces: exactly the limit
        let refused = feed(&mut r, ISN, 0, 21);
        assert_eq!(
            refused,
            Err(ReassemblyError::Overflow {
                footprint: footprint(21, 5),
                limit
            })
        );
        assert_eq!((r.held(), r.hole()), (10, Some((0, 10))));
        assert!(r.take_ready().is_empty());
        r.limit = footprint(20, 4); // as if a bigger flow: the held bytes are intact
        feed(&mut r, ISN, 0, 10).unwrap();
        assert_eq!(take(&mut r), stream(0, 20));
    }

    /// 1-byte segments held out of order cost far more than their byte: counted per piece,
    /// they reach the limit after limit / PIECE_OVERHEAD pieces, holding a few KiB of data.
    #[test]
    fn tiny_out_of_order_segments_reach_the_limit_by_their_overhead() {
        let limit = MIB;
        let mut r = Reassembler::new(ISN, limit);
        let mut pieces = 0;
        let refused = loop {
            let at = 2 * pieces as u64 + 1; // every other byte: each its own piece
            match feed(&mut r, ISN, at, at + 1) {
                Ok(()) => pieces += 1,
                Err(refused) => break refused,
            }
            check(&r);
        };
        assert_eq!(pieces, limit / (1 + PIECE_OVERHEAD));
        assert_eq!(r.held(), pieces, "a few KiB of data reached the limit");
        assert_eq!(
            refused,
            ReassemblyError::Overflow {
                footprint: footprint(pieces + 1, pieces + 1),
                limit
            }
        );
        // In order but not taken (a slow reader of tiny segments) counts the same.
        let mut r = Reassembler::new(ISN, limit);
        let mut offset = 0;
        while feed(&mut r, ISN, offset, offset + 1).is_ok() {
            offset += 1;
        }
        assert_eq!(offset as usize, limit / (1 + PIECE_OVERHEAD));
        assert_eq!(take(&mut r), stream(0, offset));
        assert_eq!(r.footprint(), 0, "taking frees the room");
    }

    #[test]
    fn a_huge_limit_does_not_overflow_the_count() {
        let mut r = Reassembler::new(ISN, usize::MAX);
        feed(&mut r, ISN, 5, 10).unwrap();
        feed(&mut r, ISN, 0, 5).unwrap();
        assert_eq!(take(&mut r), stream(0, 10));
    }

    /// Random operations, sequence numbers and FINs, valid or not: no panic, the
    /// invariants hold, and what comes out is always a prefix of the stream.
    #[test]
    fn random_input_keeps_the_invariants() {
        for seed in 1..=20u64 {
            let mut rng = Rng(seed.wrapping_mul(0x2545_F491_4F6C_DD1D));
            let isn = rng.next() as u32;
            let limit = rng.below(1 << 16) as usize;
            let mut r = Reassembler::new(isn, limit);
            let mut out = Vec::new();
            for _ in 0..5000 {
                let next = r.next;
                let around = |rng: &mut Rng| match rng.below(4) {
                    0 => rng.next() & u64::from(u32::MAX), // anywhere
                    1 => next.saturating_sub(rng.below(3000)),
                    _ => next + rng.below(3000),
                };
                match rng.below(12) {
                    0 => r.fin(seq_at(isn, around(&mut rng))),
                    1 | 2 => out.extend(take(&mut r)),
                    _ => {
                        let from = around(&mut rng);
                        let to = from + rng.below(3000);
                        let held = r.held();
                        if feed(&mut r, isn, from, to).is_err() {
                            assert_eq!(r.held(), held, "unchanged after an error");
                        }
                    }
                }
                check(&r);
            }
            out.extend(take(&mut r));
            assert!(
                out == stream(0, out.len() as u64),
                "seed {seed}: not the stream"
            );
            assert_eq!(r.delivered(), out.len() as u64);
        }
    }

    #[test]
    fn garbage_never_panics() {
        let mut rng = Rng(42);
        let mut r = Reassembler::new(rng.next() as u32, 1 << 16);
        for _ in 0..20_000 {
            match rng.below(10) {
                0 => r.fin(rng.next() as u32),
                1 => drop(r.take_ready()),
                2 => drop(r.hole()),
                _ => {
                    let len = rng.below(2000) as usize;
                    let _ = r.segment(rng.next() as u32, Bytes::from(vec![7u8; len]));
                }
            }
            check(&r);
        }
    }
}
