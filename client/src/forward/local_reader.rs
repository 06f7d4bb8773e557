//! The request stream of a connection's call: its first message (`attach`
//! or `standby`), then the local process's bytes, read straight from its
//! socket whenever HTTP/2 has window for them (no queue and no task in
//! between). A standby call is opened before its connection exists, so the
//! local side is plugged in later, through a [`Plug`].
use std::{
    pin::Pin,
    task::{Context, Poll, ready},
};

use bytes::Bytes;
use remocal_proto::{
    v1::{ConnectionUpstream, Reset, connection_upstream},
    wire::{self, DataBuffer},
};
use tokio::{net::tcp::OwnedReadHalf, sync::oneshot};
use tokio_stream::Stream;

use super::CHUNK;

/// A side of the connection failed: the whole connection is reset.
pub struct Failed;

/// Yields the call's messages encoded, as its body takes them.
pub struct LocalReader {
    first: Option<Bytes>,
    source: Source,
}

/// What follows the first message.
enum Source {
    /// The local side is not connected yet.
    Awaiting(oneshot::Receiver<Source>),
    Socket(Local),
    /// Nothing could be connected locally: the agent resets the remote side.
    Refused(String),
    /// A mirrored copy sends nothing after its first message.
    Done,
}

/// Connects the local side to the call's request stream, once.
pub struct Plug(oneshot::Sender<Source>);

struct Local {
    read: OwnedReadHalf,
    /// Present while reading; says how reading ended (FIN or failure).
    read_end: Option<oneshot::Sender<Result<(), Failed>>>,
    /// Fired when writing to the local process failed: the agent must reset
    /// the remote side.
    reset: oneshot::Receiver<()>,
}

/// What the connection's task keeps: how reading ended, and how to make the
/// reader send a reset.
pub struct Handle {
    pub read_end: oneshot::Receiver<Result<(), Failed>>,
    /// Taken when used.
    pub reset: Option<oneshot::Sender<()>>,
}

impl LocalReader {
    pub fn new(first: ConnectionUpstream) -> (Self, Plug) {
        let (plug, source) = oneshot::channel();
        let reader = Self {
            first: Some(wire::encode(&first)),
            source: Source::Awaiting(source),
        };
        (reader, Plug(plug))
    }
}

impl Plug {
    /// The local process's bytes go upstream from here on.
    pub fn steal(self, read: OwnedReadHalf) -> Handle {
        let (read_end_tx, read_end) = oneshot::channel();
        let (reset, reset_rx) = oneshot::channel();
        let _ = self.0.send(Source::Socket(Local {
            read,
            read_end: Some(read_end_tx),
            reset: reset_rx,
        }));
        Handle {
            read_end,
            reset: Some(reset),
        }
    }

    pub fn mirror(self) {
        let _ = self.0.send(Source::Done);
    }

    /// Nothing answers locally: the agent is asked to reset the remote side.
    pub fn refuse(self, reason: String) {
        let _ = self.0.send(Source::Refused(reason));
    }
}

impl Local {
    fn stop_reading(&mut self, how: Result<(), Failed>) {
        if let Some(read_end) = self.read_end.take() {
            let _ = read_end.send(how);
        }
    }

    fn poll_frame(&mut self, cx: &mut Context<'_>) -> Poll<Option<Bytes>> {
        if self.read_end.is_none() {
            return Poll::Ready(None);
        }
        if Pin::new(&mut self.reset).poll(cx).is_ready() {
            self.stop_reading(Err(Failed));
            return Poll::Ready(Some(reset_frame(String::new())));
        }
        match ready!(DataBuffer::poll_read(&mut self.read, cx, CHUNK)) {
            // The end of this stream is the local side's FIN: the agent
            // passes it on to the remote.
            Ok(buffer) if buffer.is_empty() => {
                self.stop_reading(Ok(()));
                Poll::Ready(None)
            }
            Ok(buffer) => Poll::Ready(Some(buffer.into_message::<ConnectionUpstream>())),
            Err(_) => {
                self.stop_reading(Err(Failed));
                Poll::Ready(Some(reset_frame(String::new())))
            }
        }
    }
}

impl Stream for LocalReader {
    /// Never an error: a failure here is told to the agent as a reset.
    type Item = Result<Bytes, tonic::Status>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.get_mut()
            .poll_message(cx)
            .map(|message| message.map(Ok))
    }
}

impl LocalReader {
    fn poll_message(&mut self, cx: &mut Context<'_>) -> Poll<Option<Bytes>> {
        if let Some(first) = self.first.take() {
            return Poll::Ready(Some(first));
        }
        loop {
            match &mut self.source {
                Source::Awaiting(source) => {
                    // A plug dropped unused: the connection's task is gone,
                    // and so is the call.
                    self.source = ready!(Pin::new(source).poll(cx)).unwrap_or(Source::Done);
                }
                Source::Socket(local) => return local.poll_frame(cx),
                Source::Refused(reason) => {
                    let reset = reset_frame(std::mem::take(reason));
                    self.source = Source::Done;
                    return Poll::Ready(Some(reset));
                }
                Source::Done => return Poll::Ready(None),
            }
        }
    }
}

impl Drop for LocalReader {
    /// HTTP/2 dropped the call's request stream: the agent is gone or reset
    /// the connection.
    fn drop(&mut self) {
        if let Source::Socket(local) = &mut self.source {
            local.stop_reading(Err(Failed));
        }
    }
}

fn reset_frame(reason: String) -> Bytes {
    wire::encode(&ConnectionUpstream {
        kind: Some(connection_upstream::Kind::Reset(Reset { reason })),
    })
}
