//! HTTP/2 data frames back to messages. A data message's bytes are handed on
//! as slices of the frames they arrived in, in as many pieces as they
//! arrived in (a connection's bytes may be cut anywhere); other messages are
//! gathered whole and decoded with prost.
use std::{collections::VecDeque, marker::PhantomData};

use bytes::{Buf as _, Bytes, BytesMut};
use http_body_util::BodyExt as _;
use prost::encoding::decode_varint;
use tonic::{Code, Status, body::Body};

use super::{DataMessage, MAX_CONTROL_MESSAGE, PREFIX, data_key};

/// The messages of one direction of a call.
pub struct Messages<M> {
    body: Body,
    /// Received and not yet handed on, in order.
    received: VecDeque<Bytes>,
    buffered: usize,
    next: Next,
    /// The body has ended (trailers, if any, were read).
    ended: bool,
    /// A response must end with a status: without one, the server's side
    /// was cut short, not finished.
    status_due: bool,
    /// Once the call failed, every later read says so too.
    failed: Option<Status>,
    message: PhantomData<fn() -> M>,
}

/// What the received bytes hold next.
#[derive(Clone, Copy, Debug)]
enum Next {
    Prefix,
    /// A message of this length, of a kind not known yet.
    Message(usize),
    /// The rest of a data message's bytes.
    Data(usize),
    /// Another message, decoded once it is all here.
    Whole(usize),
}

/// Enough of a message to tell a data message: its key and length.
const DATA_HEADER: usize = 1 + 10;

impl<M: DataMessage> Messages<M> {
    /// A request's messages: they end with the stream.
    pub fn request(body: Body) -> Self {
        Self::new(body, false)
    }

    /// A response's messages: they end with the server's status, which a
    /// status in the response's headers has already given (`status_given`).
    pub fn response(body: Body, status_given: bool) -> Self {
        Self::new(body, !status_given)
    }

    fn new(body: Body, status_due: bool) -> Self {
        Self {
            body,
            received: VecDeque::new(),
            buffered: 0,
            next: Next::Prefix,
            ended: false,
            status_due,
            failed: None,
            message: PhantomData,
        }
    }

    /// The next message; `None` once the other side finished cleanly, an
    /// error when it ended the call with one, reset it, or broke the framing.
    pub async fn message(&mut self) -> Result<Option<M>, Status> {
        if let Some(status) = &self.failed {
            return Err(status.clone());
        }
        let result = self.read().await;
        if let Err(status) = &result {
            self.failed = Some(status.clone());
        }
        result
    }

    async fn read(&mut self) -> Result<Option<M>, Status> {
        loop {
            if let Some(message) = self.decode()? {
                return Ok(Some(message));
            }
            if self.ended {
                if self.status_due {
                    return Err(Status::unavailable(
                        "the call ended without a status: the other side was cut off",
                    ));
                }
                return match (self.next, self.buffered) {
                    (Next::Prefix, 0) => Ok(None),
                    _ => Err(Status::internal(
                        "the call ended in the middle of a message",
                    )),
                };
            }
            let frame = match self.body.frame().await {
                Some(Ok(frame)) => frame,
                Some(Err(status)) => return Err(status),
                None => {
                    self.ended = true;
                    continue;
                }
            };
            match frame.into_data() {
                Ok(data) => self.receive(data),
                Err(frame) => {
                    self.ended = true;
                    let status = frame.trailers_ref().and_then(Status::from_header_map);
                    self.status_due &= status.is_none();
                    if let Some(status) = status.filter(|status| status.code() != Code::Ok) {
                        return Err(status);
                    }
                }
            }
        }
    }

    fn receive(&mut self, data: Bytes) {
        if !data.is_empty() {
            self.buffered += data.len();
            self.received.push_back(data);
        }
    }

    /// The next message, if the bytes received hold one (or a piece of one).
    fn decode(&mut self) -> Result<Option<M>, Status> {
        loop {
            match self.next {
                Next::Prefix => {
                    if self.buffered < PREFIX {
                        return Ok(None);
                    }
                    let prefix = self.take(PREFIX);
                    if prefix[0] != 0 {
                        return Err(Status::unimplemented(
                            "compressed messages are not supported on this call",
                        ));
                    }
                    let len = u32::from_be_bytes([prefix[1], prefix[2], prefix[3], prefix[4]]);
                    self.next = Next::Message(len as usize);
                }
                Next::Message(len) => {
                    let head = len.min(DATA_HEADER);
                    if self.buffered < head {
                        return Ok(None);
                    }
                    let mut peeked = [0; DATA_HEADER];
                    self.peek(&mut peeked[..head]);
                    self.next = match data_header::<M>(&peeked[..head], len) {
                        Some((header, payload)) => {
                            self.take(header);
                            Next::Data(payload)
                        }
                        None if len > MAX_CONTROL_MESSAGE => {
                            return Err(Status::resource_exhausted(format!(
                                "a message of {len} bytes is over the limit of {MAX_CONTROL_MESSAGE}"
                            )));
                        }
                        None => Next::Whole(len),
                    };
                }
                Next::Data(0) => self.next = Next::Prefix,
                Next::Data(remaining) => {
                    let Some(front) = self.received.front_mut() else {
                        return Ok(None);
                    };
                    let piece = if front.len() <= remaining {
                        self.received.pop_front().unwrap_or_default()
                    } else {
                        front.split_to(remaining)
                    };
                    self.buffered -= piece.len();
                    self.next = Next::Data(remaining - piece.len());
                    return Ok(Some(M::data(piece)));
                }
                Next::Whole(len) => {
                    if self.buffered < len {
                        return Ok(None);
                    }
                    self.next = Next::Prefix;
                    let message = M::decode(self.take(len)).map_err(|err| {
                        Status::internal(format!("a message could not be decoded: {err}"))
                    })?;
                    return Ok(Some(message));
                }
            }
        }
    }

    /// The next `len` received bytes, removed; a slice when they arrived in
    /// one piece, which is the usual case.
    fn take(&mut self, len: usize) -> Bytes {
        self.buffered -= len;
        if let Some(front) = self.received.front_mut()
            && front.len() >= len
        {
            let taken = front.split_to(len);
            if front.is_empty() {
                self.received.pop_front();
            }
            return taken;
        }
        let mut gathered = BytesMut::with_capacity(len);
        while gathered.len() < len {
            let Some(front) = self.received.front_mut() else {
                break;
            };
            let n = front.len().min(len - gathered.len());
            gathered.extend_from_slice(&front[..n]);
            front.advance(n);
            if front.is_empty() {
                self.received.pop_front();
            }
        }
        gathered.freeze()
    }

    /// Copies the next (few) received bytes into `into`, leaving them in place.
    fn peek(&self, into: &mut [u8]) {
        let mut filled = 0;
        for piece in &self.received {
            let n = piece.len().min(into.len() - filled);
            into[filled..filled + n].copy_from_slice(&piece[..n]);
            filled += n;
            if filled == into.len() {
                break;
            }
        }
    }
}

/// For a message of `len` bytes that starts with `head`: if it holds
/// nothing but a data field, the length of the key and length in front of
/// the bytes, and the number of bytes.
fn data_header<M: DataMessage>(mut head: &[u8], len: usize) -> Option<(usize, usize)> {
    let start = head.len();
    let key = decode_varint(&mut head).ok()?;
    if key != data_key::<M>() {
        return None;
    }
    let payload = usize::try_from(decode_varint(&mut head).ok()?).ok()?;
    let header = start - head.len();
    (header.checked_add(payload)? == len).then_some((header, payload))
}
