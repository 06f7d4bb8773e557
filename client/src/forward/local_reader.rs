//! The request stream of a connection's call: the `attach` message, then
//! the local process's bytes, read straight from its socket whenever HTTP/2
//! has window for them (no queue and no task in between).
use std::{
    io,
    pin::Pin,
    task::{Context, Poll, ready},
};

use bytes::BytesMut;
use remocal_proto::v1::{ConnectionUpstream, Reset, connection_upstream};
use tokio::{net::tcp::OwnedReadHalf, sync::oneshot};
use tokio_stream::Stream;

use super::CHUNK;

/// A side of the connection failed: the whole connection is reset.
pub struct Failed;

pub struct LocalReader {
    attach: Option<ConnectionUpstream>,
    /// None for a mirrored copy, which sends nothing after `attach`.
    local: Option<Local>,
}

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
    pub fn mirror(attach: ConnectionUpstream) -> Self {
        Self {
            attach: Some(attach),
            local: None,
        }
    }

    pub fn steal(attach: ConnectionUpstream, read: OwnedReadHalf) -> (Self, Handle) {
        let (read_end_tx, read_end) = oneshot::channel();
        let (reset, reset_rx) = oneshot::channel();
        let reader = Self {
            attach: Some(attach),
            local: Some(Local {
                read,
                read_end: Some(read_end_tx),
                reset: reset_rx,
            }),
        };
        (
            reader,
            Handle {
                read_end,
                reset: Some(reset),
            },
        )
    }
}

impl Local {
    fn stop_reading(&mut self, how: Result<(), Failed>) {
        if let Some(read_end) = self.read_end.take() {
            let _ = read_end.send(how);
        }
    }

    fn poll_frame(&mut self, cx: &mut Context<'_>) -> Poll<Option<ConnectionUpstream>> {
        if self.read_end.is_none() {
            return Poll::Ready(None);
        }
        if Pin::new(&mut self.reset).poll(cx).is_ready() {
            self.stop_reading(Err(Failed));
            return Poll::Ready(Some(reset_frame()));
        }
        loop {
            if ready!(self.read.as_ref().poll_read_ready(cx)).is_err() {
                self.stop_reading(Err(Failed));
                return Poll::Ready(Some(reset_frame()));
            }
            // A buffer exists only while there is something to read: an idle
            // connection holds no memory of its own.
            let mut buffer = BytesMut::with_capacity(CHUNK);
            return match self.read.try_read_buf(&mut buffer) {
                // The end of this stream is the local side's FIN: the agent
                // passes it on to the remote.
                Ok(0) => {
                    self.stop_reading(Ok(()));
                    Poll::Ready(None)
                }
                Ok(_) => Poll::Ready(Some(ConnectionUpstream {
                    kind: Some(connection_upstream::Kind::Data(buffer.freeze())),
                })),
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => continue,
                Err(_) => {
                    self.stop_reading(Err(Failed));
                    Poll::Ready(Some(reset_frame()))
                }
            };
        }
    }
}

impl Stream for LocalReader {
    type Item = ConnectionUpstream;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        if let Some(attach) = this.attach.take() {
            return Poll::Ready(Some(attach));
        }
        match this.local.as_mut() {
            Some(local) => local.poll_frame(cx),
            None => Poll::Ready(None),
        }
    }
}

impl Drop for LocalReader {
    /// HTTP/2 dropped the call's request stream: the agent is gone or reset
    /// the connection.
    fn drop(&mut self) {
        if let Some(local) = self.local.as_mut() {
            local.stop_reading(Err(Failed));
        }
    }
}

fn reset_frame() -> ConnectionUpstream {
    ConnectionUpstream {
        kind: Some(connection_upstream::Kind::Reset(Reset {})),
    }
}
