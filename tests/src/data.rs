//! Reproducible pseudo-random byte streams.
//!
//! Each connection of a test gets its own seed, so a byte delivered on the wrong
//! connection, duplicated, dropped or reordered shows up as a mismatch. Both ends
//! regenerate the stream from the seed, so nothing needs to be kept in memory or hashed.

/// An endless byte stream determined by its seed, independent of how it is chunked.
#[derive(Clone, Debug)]
pub struct Pattern {
    state: u64,
    word: [u8; 8],
    used: usize,
}

impl Pattern {
    pub fn new(seed: u64) -> Pattern {
        Pattern {
            // splitmix64 spreads neighbouring seeds; xorshift needs a non-zero state.
            state: splitmix64(seed) | 1,
            word: [0; 8],
            used: 8,
        }
    }

    fn next_word(&mut self) -> [u8; 8] {
        // xorshift64*
        self.state ^= self.state >> 12;
        self.state ^= self.state << 25;
        self.state ^= self.state >> 27;
        self.state.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes()
    }

    /// Fills `buf` with the next bytes of the stream.
    pub fn fill(&mut self, buf: &mut [u8]) {
        let mut rest = buf;
        while self.used < 8 && !rest.is_empty() {
            rest[0] = self.word[self.used];
            self.used += 1;
            rest = &mut rest[1..];
        }
        let mut words = rest.chunks_exact_mut(8);
        for chunk in &mut words {
            chunk.copy_from_slice(&self.next_word());
        }
        let tail = words.into_remainder();
        if !tail.is_empty() {
            self.word = self.next_word();
            let n = tail.len();
            tail.copy_from_slice(&self.word[..n]);
            self.used = n;
        }
    }

    /// The next `len` bytes of the stream.
    pub fn take(&mut self, len: usize) -> Vec<u8> {
        let mut buf = vec![0; len];
        self.fill(&mut buf);
        buf
    }

    /// Whether `data` is exactly the next bytes of the stream (consumes them either way).
    pub fn matches(&mut self, data: &[u8], scratch: &mut Vec<u8>) -> bool {
        scratch.resize(data.len(), 0);
        self.fill(scratch);
        scratch.as_slice() == data
    }
}

/// A well-mixed 64-bit value for `x`, also handy to derive per-connection sizes.
pub fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

pub const MIB: usize = 1024 * 1024;
pub const KIB: usize = 1024;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunking_does_not_change_the_stream() {
        let whole = Pattern::new(7).take(1000);
        let mut pattern = Pattern::new(7);
        let mut pieces = Vec::new();
        for size in [1, 3, 8, 13, 0, 200, 775] {
            pieces.extend(pattern.take(size));
        }
        assert_eq!(whole, pieces);
        assert_ne!(whole, Pattern::new(8).take(1000));
    }
}
