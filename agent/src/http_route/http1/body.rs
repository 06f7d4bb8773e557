//! Message bodies, forwarded as they arrive and never held whole. Only the
//! framing is decoded, to know where a body ends: the bytes themselves
//! (chunk sizes, extensions, trailers) go through unchanged.
use std::io;

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt as _};

use super::buffer::Buffer;

/// How much is read at once while a body streams through.
pub const BODY_READ: usize = 32 * 1024;

/// How a message's body ends (RFC 9112, section 6.3).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Framing {
    Empty,
    Length(u64),
    Chunked,
    /// Responses only: the body ends when the server closes.
    UntilClose,
}

#[derive(Debug, thiserror::Error)]
#[error("malformed chunked body")]
pub struct BadChunk;

/// Where a body being forwarded stands.
pub enum Body {
    Length(u64),
    Chunked(Chunked),
    UntilClose,
}

impl Body {
    pub fn new(framing: Framing) -> Self {
        match framing {
            Framing::Empty => Self::Length(0),
            Framing::Length(length) => Self::Length(length),
            Framing::Chunked => Self::Chunked(Chunked::default()),
            Framing::UntilClose => Self::UntilClose,
        }
    }

    pub fn is_done(&self) -> bool {
        match self {
            Self::Length(left) => *left == 0,
            Self::Chunked(chunked) => chunked.state == State::Done,
            Self::UntilClose => false,
        }
    }

    /// How many of `bytes`, which follow what was taken before, belong to
    /// the body; the rest is the next message.
    pub fn take(&mut self, bytes: &[u8]) -> Result<usize, BadChunk> {
        match self {
            Self::Length(left) => {
                let taken = usize::try_from(*left)
                    .unwrap_or(usize::MAX)
                    .min(bytes.len());
                *left -= taken as u64;
                Ok(taken)
            }
            Self::Chunked(chunked) => chunked.take(bytes),
            Self::UntilClose => Ok(bytes.len()),
        }
    }
}

/// Why forwarding a body stopped early.
#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    #[error("reading: {0}")]
    Read(io::Error),
    #[error("the sender closed before the body ended")]
    Closed,
    #[error(transparent)]
    Framing(#[from] BadChunk),
    #[error("writing: {0}")]
    Write(io::Error),
}

/// Forwards the rest of `body` from `reader` to `writer`, through `buffer`
/// (empty of body bytes on entry; on return it holds only what follows the
/// body). Reads only once the buffer is empty, so it never holds more than
/// `BODY_READ` bytes here.
pub async fn forward(
    reader: &mut (impl AsyncRead + Unpin + ?Sized),
    buffer: &mut Buffer,
    writer: &mut (impl AsyncWrite + Unpin + ?Sized),
    body: &mut Body,
) -> Result<(), ForwardError> {
    while !body.is_done() {
        if buffer
            .fill(reader, BODY_READ)
            .await
            .map_err(ForwardError::Read)?
            == 0
        {
            return match body {
                Body::UntilClose => Ok(()),
                _ => Err(ForwardError::Closed),
            };
        }
        let taken = body.take(buffer.data())?;
        writer
            .write_all(&buffer.data()[..taken])
            .await
            .map_err(ForwardError::Write)?;
        // Free on a socket; a buffered stream to a side must not sit on a
        // piece of a body the server waits for.
        writer.flush().await.map_err(ForwardError::Write)?;
        buffer.consume(taken);
    }
    Ok(())
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// Reading the chunk size's hex digits.
    Size,
    /// Blanks after the size, before `;` or the line's end.
    SizeBlank,
    /// A chunk extension, up to the line's end (its content is not ours).
    Extension,
    SizeLf,
    Data,
    DataCr,
    DataLf,
    /// At the start of a trailer line, or of the final empty line.
    LineStart,
    /// A trailer field's name, up to its colon: a line that is not a
    /// `name: value` field (say, a smuggled request line) is refused rather
    /// than passed to a server that might read it as the next request.
    TrailerName,
    Trailer,
    TrailerLf,
    EndLf,
    Done,
}

/// The chunked framing (RFC 9112, section 7.1), decoded a byte at a time
/// except inside chunk data, so nothing is ever kept between reads. Strict
/// on line ends (CRLF only): a server that reads a bare LF differently from
/// us must not be handed a body we framed otherwise.
pub struct Chunked {
    state: State,
    /// The size being read, then what is left of the chunk's data.
    size: u64,
    digits: bool,
}

impl Default for Chunked {
    fn default() -> Self {
        Self {
            state: State::Size,
            size: 0,
            digits: false,
        }
    }
}

impl Chunked {
    fn take(&mut self, bytes: &[u8]) -> Result<usize, BadChunk> {
        let mut at = 0;
        while at < bytes.len() {
            match self.state {
                State::Done => break,
                State::Data => {
                    let taken = usize::try_from(self.size)
                        .unwrap_or(usize::MAX)
                        .min(bytes.len() - at);
                    at += taken;
                    self.size -= taken as u64;
                    if self.size == 0 {
                        self.state = State::DataCr;
                    }
                }
                state => {
                    self.state = self.step(state, bytes[at])?;
                    at += 1;
                }
            }
        }
        Ok(at)
    }

    fn step(&mut self, state: State, byte: u8) -> Result<State, BadChunk> {
        Ok(match (state, byte) {
            (State::Size, _) if byte.is_ascii_hexdigit() => {
                if self.size >> 60 != 0 {
                    return Err(BadChunk);
                }
                let digit = (byte as char).to_digit(16).unwrap_or(0);
                self.size = self.size << 4 | u64::from(digit);
                self.digits = true;
                State::Size
            }
            (State::Size, b' ' | b'\t') | (State::SizeBlank, b' ' | b'\t') if self.digits => {
                State::SizeBlank
            }
            (State::Size | State::SizeBlank, b';') if self.digits => State::Extension,
            (State::Size | State::SizeBlank | State::Extension, b'\r') if self.digits => {
                State::SizeLf
            }
            (State::Extension, _) if byte == b'\t' || (byte >= b' ' && byte != 0x7f) => {
                State::Extension
            }
            (State::SizeLf, b'\n') if self.size == 0 => State::LineStart,
            (State::SizeLf, b'\n') => State::Data,
            (State::DataCr, b'\r') => State::DataLf,
            (State::DataLf, b'\n') => {
                self.digits = false;
                State::Size
            }
            (State::LineStart, b'\r') => State::EndLf,
            (State::LineStart | State::TrailerName, _) if remocal_proto::filter::is_token(byte) => {
                State::TrailerName
            }
            (State::TrailerName, b':') => State::Trailer,
            (State::Trailer, _) if byte == b'\t' || (byte >= b' ' && byte != 0x7f) => {
                State::Trailer
            }
            (State::Trailer, b'\r') => State::TrailerLf,
            (State::TrailerLf, b'\n') => State::LineStart,
            (State::EndLf, b'\n') => State::Done,
            _ => return Err(BadChunk),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `input` one byte at a time and all at once; both must agree.
    fn taken(input: &[u8]) -> Result<(usize, bool), BadChunk> {
        let mut whole = Body::new(Framing::Chunked);
        let all = whole.take(input)?;
        let mut bytewise = Body::new(Framing::Chunked);
        let mut count = 0;
        for byte in input.chunks(1) {
            count += bytewise.take(byte)?;
        }
        assert_eq!((all, whole.is_done()), (count, bytewise.is_done()));
        Ok((all, whole.is_done()))
    }

    #[test]
    fn chunked_bodies_end_where_their_framing_says() {
        let body = b"5\r\nhello\r\n1A;name=\"v\"\r\nabcdefghijklmnopqrstuvwxyz\r\n0\r\n\r\nNEXT";
        assert_eq!(taken(body).unwrap(), (body.len() - 4, true));
        let trailers = b"0 ; ext\r\nx-sum: 1\r\nx-more: 2\r\n\r\nGET";
        assert_eq!(taken(trailers).unwrap(), (trailers.len() - 3, true));
        assert_eq!(taken(b"000\r\n\r\n").unwrap(), (7, true));
        assert_eq!(taken(b"10\r\nabc").unwrap(), (7, false));
    }

    #[test]
    fn malformed_chunked_framing_is_refused() {
        for bad in [
            &b"\r\n"[..],
            b"x\r\n",
            b"5\nhello\r\n",
            b"5\r\nhelloX",
            b"0\r\n\n",
            b"1 2\r\n",
            b"0\r\nx-bad\n",
            b"ffffffffffffffffff\r\n",
            b"5;a\x01\r\n",
            // Not a trailer field: a request line smuggled after the body.
            b"0\r\nGET /admin HTTP/1.1\r\n",
            b"0\r\n: no-name\r\n",
            b"0\r\nx-sum 1\r\n",
        ] {
            assert!(taken(bad).is_err(), "{:?}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn lengths_take_only_their_bytes() {
        let mut body = Body::new(Framing::Length(3));
        assert_eq!(body.take(b"ab").unwrap(), 2);
        assert_eq!(body.take(b"cdef").unwrap(), 1);
        assert!(body.is_done());
        assert!(Body::new(Framing::Empty).is_done());
    }
}
