//! The bytes read from one socket and not handled yet. A plain `Vec` with a
//! window into it rather than `BytesMut`: growth is exact (`reserve_exact`,
//! no doubling), so the per-connection bound stated in `http1` holds for the
//! allocation itself and not only for the bytes kept.
use std::io;

use tokio::io::{AsyncRead, AsyncReadExt as _};

pub struct Buffer {
    bytes: Vec<u8>,
    start: usize,
    end: usize,
}

impl Buffer {
    pub fn new() -> Self {
        Self {
            bytes: Vec::new(),
            start: 0,
            end: 0,
        }
    }

    /// Starts with what the sniffer already read.
    pub fn holding(prefix: &[u8]) -> Self {
        Self {
            bytes: prefix.to_vec(),
            start: 0,
            end: prefix.len(),
        }
    }

    pub fn data(&self) -> &[u8] {
        &self.bytes[self.start..self.end]
    }

    pub fn len(&self) -> usize {
        self.end - self.start
    }

    pub fn is_empty(&self) -> bool {
        self.start == self.end
    }

    /// Drops the first `count` bytes (they were handled).
    pub fn consume(&mut self, count: usize) {
        self.start = (self.start + count).min(self.end);
        if self.start == self.end {
            self.clear();
        }
    }

    /// Gives the allocation back when nothing is kept: an idle connection
    /// then holds no buffer.
    pub fn release(&mut self) {
        if self.is_empty() {
            *self = Self::new();
        }
    }

    pub fn clear(&mut self) {
        self.start = 0;
        self.end = 0;
    }

    /// Reads once from `reader`, first making room for at least `room` more
    /// bytes. The allocation only grows to what is kept plus `room`, so its
    /// size is bounded by what callers keep before they read. Cancel-safe: a
    /// read that did not complete took nothing.
    pub async fn fill(
        &mut self,
        reader: &mut (impl AsyncRead + Unpin + ?Sized),
        room: usize,
    ) -> io::Result<usize> {
        if self.bytes.len() - self.end < room {
            if self.start > 0 {
                self.bytes.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
            }
            let needed = self.end + room;
            if self.bytes.len() < needed {
                self.bytes.reserve_exact(needed - self.bytes.len());
                self.bytes.resize(needed, 0);
            }
        }
        let read = reader.read(&mut self.bytes[self.end..]).await?;
        self.end += read;
        Ok(read)
    }

    /// The size of the allocation, for the tests of the memory bound.
    #[cfg(test)]
    pub fn allocated(&self) -> usize {
        self.bytes.capacity()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn grows_exactly_and_reuses_the_front() {
        let mut buffer = Buffer::holding(b"abc");
        let mut source: &[u8] = b"defghij";
        buffer.consume(2);
        let read = buffer.fill(&mut source, 4).await.unwrap();
        // "c" moved to the front, the allocation is 1 + 4 bytes.
        assert_eq!(read, 4);
        assert_eq!(buffer.data(), b"cdefg");
        assert_eq!(buffer.allocated(), 5);
        buffer.consume(5);
        assert!(buffer.is_empty());
        // Reads as much as fits, not just the room asked for.
        let read = buffer.fill(&mut source, 2).await.unwrap();
        assert_eq!((read, buffer.data()), (3, &b"hij"[..]));
        assert_eq!(buffer.allocated(), 5);
        buffer.release();
        assert_eq!(buffer.allocated(), 5, "it still holds bytes");
        buffer.consume(3);
        buffer.release();
        assert_eq!(buffer.allocated(), 0);
    }
}
