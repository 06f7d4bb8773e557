//! The response stream of a stolen connection's call. HTTP/2 polls it only
//! when the stream has window left, so the socket is read exactly as fast as
//! the client takes the bytes, and a readable socket wakes the task that
//! sends them: no queue, no extra task, and no buffer while idle.
use std::{
    io,
    pin::Pin,
    sync::Arc,
    sync::atomic::{AtomicU64, Ordering},
    task::{Context, Poll, ready},
};

use bytes::Bytes;
use remocal_proto::{
    v1::{ConnectionDownstream, Eof, connection_downstream},
    wire,
};
use tokio::sync::oneshot;
use tokio_stream::Stream;
use tonic::Status;

use super::{CHUNK, Carried};

/// Why the reader stopped reading.
pub(super) enum ReadEnd {
    Eof,
    Failed(io::Error),
    /// HTTP/2 dropped the stream: the client reset it or its link broke.
    ClientGone,
}

pub struct RemoteReader<C: Carried> {
    read: C::Read,
    /// Bytes read, for the connection's outcome.
    from_remote: Arc<AtomicU64>,
    /// Present while reading; tells the connection's task why reading ended.
    read_end: Option<oneshot::Sender<ReadEnd>>,
    /// The connection's task ends the call: with a status, or cleanly by
    /// dropping the sender. Taken once it has spoken.
    finish: Option<oneshot::Receiver<Status>>,
}

impl<C: Carried> RemoteReader<C> {
    pub(super) fn new(
        read: C::Read,
        from_remote: Arc<AtomicU64>,
        read_end: oneshot::Sender<ReadEnd>,
        finish: oneshot::Receiver<Status>,
    ) -> Self {
        Self {
            read,
            from_remote,
            read_end: Some(read_end),
            finish: Some(finish),
        }
    }

    fn stop_reading(&mut self, why: ReadEnd) {
        if let Some(read_end) = self.read_end.take() {
            let _ = read_end.send(why);
        }
    }

    /// The next message, already framed, so HTTP/2 sends the buffer the
    /// socket was read into as it is.
    fn poll_read(&mut self, cx: &mut Context<'_>) -> Poll<Bytes> {
        let message = match ready!(C::poll_read(&mut self.read, cx, CHUNK)) {
            Ok(buffer) if buffer.is_empty() => {
                self.stop_reading(ReadEnd::Eof);
                wire::encode(&ConnectionDownstream {
                    kind: Some(connection_downstream::Kind::Eof(Eof {})),
                })
            }
            Ok(buffer) => {
                self.from_remote
                    .fetch_add(buffer.len() as u64, Ordering::Relaxed);
                buffer.into_message::<ConnectionDownstream>()
            }
            Err(err) => {
                self.stop_reading(ReadEnd::Failed(err));
                return Poll::Pending;
            }
        };
        Poll::Ready(message)
    }
}

impl<C: Carried> Stream for RemoteReader<C> {
    type Item = Result<Bytes, Status>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        let Some(finish) = this.finish.as_mut() else {
            return Poll::Ready(None);
        };
        // The task's word comes first: after it, nothing more is read.
        if let Poll::Ready(word) = Pin::new(finish).poll(cx) {
            this.finish = None;
            this.read_end = None;
            return Poll::Ready(word.ok().map(Err));
        }
        if this.read_end.is_none() {
            // Done reading (FIN or failure): wait for the task's word, for
            // which `finish` is registered above.
            return Poll::Pending;
        }
        this.poll_read(cx).map(|frame| Some(Ok(frame)))
    }
}

impl<C: Carried> Drop for RemoteReader<C> {
    fn drop(&mut self) {
        self.stop_reading(ReadEnd::ClientGone);
    }
}
