//! One direction of a stream's body: DATA from the h2 stream it arrives on
//! to the one it leaves on, then trailers or the end. Each chunk is sent only
//! as far as the leaving stream has capacity (its peer's window, capped by
//! the send buffer), and only what was sent is released to the arriving
//! stream's peer: a slow reader holds back its writer, no side buffers more
//! than its windows, and `Bytes` go through as h2 received them.
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use h2::{Reason, RecvStream, SendStream};

/// How a direction ended early. The reason is the peer's when it reset the
/// stream; `None` when the stream failed otherwise (its connection, or a
/// protocol error h2 found and answered itself).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Broken {
    /// The stream the body arrives on.
    Recv(Option<Reason>),
    /// The stream the body leaves on.
    Send(Option<Reason>),
}

#[derive(Default)]
pub struct Pipe {
    /// Received, not yet sent.
    pending: Bytes,
    data_done: bool,
}

impl Pipe {
    /// Ready once the body and its trailers (or its end) were handed to
    /// `send`.
    pub fn poll(
        &mut self,
        cx: &mut Context<'_>,
        recv: &mut RecvStream,
        send: &mut SendStream<Bytes>,
    ) -> Poll<Result<(), Broken>> {
        loop {
            if !self.pending.is_empty() {
                let capacity = ready!(poll_capacity(cx, send, self.pending.len()))?;
                let chunk = self.pending.split_to(capacity.min(self.pending.len()));
                let len = chunk.len();
                send.send_data(chunk, false)
                    .map_err(|err| Broken::Send(remote_reset(&err)))?;
                // Fails only when the arriving stream is gone, which its next
                // poll tells.
                let _ = recv.flow_control().release_capacity(len);
                continue;
            }
            if !self.data_done {
                match ready!(recv.poll_data(cx)) {
                    Some(Ok(data)) => self.pending = data,
                    Some(Err(err)) => return Poll::Ready(Err(Broken::Recv(remote_reset(&err)))),
                    None => self.data_done = true,
                }
                continue;
            }
            let sent = match ready!(recv.poll_trailers(cx)) {
                Ok(Some(trailers)) => send.send_trailers(trailers),
                Ok(None) => send.send_data(Bytes::new(), true),
                Err(err) => return Poll::Ready(Err(Broken::Recv(remote_reset(&err)))),
            };
            return Poll::Ready(sent.map_err(|err| Broken::Send(remote_reset(&err))));
        }
    }
}

/// Capacity to send up to `wanted` bytes on `send`, at least one.
fn poll_capacity(
    cx: &mut Context<'_>,
    send: &mut SendStream<Bytes>,
    wanted: usize,
) -> Poll<Result<usize, Broken>> {
    send.reserve_capacity(wanted);
    loop {
        let capacity = send.capacity();
        if capacity > 0 {
            return Poll::Ready(Ok(capacity));
        }
        match ready!(send.poll_capacity(cx)) {
            Some(Ok(_)) => {}
            Some(Err(err)) => return Poll::Ready(Err(Broken::Send(remote_reset(&err)))),
            // The stream stopped sending: reset, or its connection is gone.
            None => {
                let reason = match send.poll_reset(cx) {
                    Poll::Ready(Ok(reason)) => Some(reason),
                    _ => None,
                };
                return Poll::Ready(Err(Broken::Send(reason)));
            }
        }
    }
}

/// The reason a peer reset a stream with, to reset the other side's stream
/// alike; `None` when the stream failed some other way.
pub fn remote_reset(err: &h2::Error) -> Option<Reason> {
    if err.is_reset() && err.is_remote() {
        err.reason()
    } else {
        None
    }
}
