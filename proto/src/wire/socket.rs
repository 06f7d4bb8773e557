//! Filling a [`DataBuffer`] from a connection's socket, which both sides do
//! for every message they send.
use std::{
    io,
    pin::Pin,
    task::{Context, Poll, ready},
};

use tokio::{io::AsyncRead, net::tcp::OwnedReadHalf};

use super::DataBuffer;

impl DataBuffer {
    /// What the socket holds, up to `capacity` bytes; empty at its end.
    ///
    /// The buffer is allocated only once the socket is readable, so an idle
    /// connection (most of a large session's) holds none. The read goes
    /// through `poll_read`, not `try_read`: a read that leaves room in the
    /// buffer shows the socket drained, and tokio then waits for the next
    /// readiness without the extra `recv` that would only say `EAGAIN`,
    /// one system call per message saved.
    pub fn poll_read(
        socket: &mut OwnedReadHalf,
        cx: &mut Context<'_>,
        capacity: usize,
    ) -> Poll<io::Result<DataBuffer>> {
        ready!(socket.as_ref().poll_read_ready(cx))?;
        let mut buffer = DataBuffer::with_capacity(capacity);
        ready!(tokio_util::io::poll_read_buf(
            Pin::new(socket),
            cx,
            buffer.tail()
        ))?;
        Poll::Ready(Ok(buffer))
    }

    /// The same for a reader with no readiness to wait on (an in-memory
    /// pipe): the buffer is allocated for each attempt, and dropped when
    /// nothing is there yet.
    pub fn poll_read_from(
        reader: &mut (impl AsyncRead + Unpin),
        cx: &mut Context<'_>,
        capacity: usize,
    ) -> Poll<io::Result<DataBuffer>> {
        let mut buffer = DataBuffer::with_capacity(capacity);
        ready!(tokio_util::io::poll_read_buf(
            Pin::new(reader),
            cx,
            buffer.tail()
        ))?;
        Poll::Ready(Ok(buffer))
    }
}
