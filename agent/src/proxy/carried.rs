//! What the proxy carries to a client: a stolen connection's socket, or
//! the in-memory pipe through which a shared port's router sends the
//! requests it routed to a session (no extra trip through the kernel).
use std::{
    io,
    task::{Context, Poll},
};

use remocal_agent_common::FlowStats;
use remocal_proto::wire::DataBuffer;
use tokio::{
    io::{AsyncWrite, AsyncWriteExt as _, DuplexStream, ReadHalf, WriteHalf},
    net::{
        TcpStream,
        tcp::{OwnedReadHalf, OwnedWriteHalf},
    },
};

use super::{close_gracefully, reset, tcp_stats};

pub trait Carried: Send + 'static {
    type Read: Send + Unpin + 'static;
    type Write: AsyncWrite + Send + Unpin + 'static;

    fn split(self) -> (Self::Read, Self::Write);
    /// What the remote sent, up to `capacity` bytes; empty at its end.
    fn poll_read(
        read: &mut Self::Read,
        cx: &mut Context<'_>,
        capacity: usize,
    ) -> Poll<io::Result<DataBuffer>>;
    /// Ends the remote's side cleanly (a FIN) when the session ends.
    fn close_gracefully(write: &mut Self::Write) -> impl Future<Output = ()> + Send;
    /// Ends it as failed (a reset, where there is one).
    fn reset(write: &Self::Write);
    /// The kernel's TCP statistics of the connection, where it is a socket.
    fn stats(write: &Self::Write) -> Option<FlowStats>;
    /// Lets go of the write side without another FIN.
    fn forget(write: Self::Write);
}

impl Carried for TcpStream {
    type Read = OwnedReadHalf;
    type Write = OwnedWriteHalf;

    fn split(self) -> (OwnedReadHalf, OwnedWriteHalf) {
        self.into_split()
    }

    fn poll_read(
        read: &mut OwnedReadHalf,
        cx: &mut Context<'_>,
        capacity: usize,
    ) -> Poll<io::Result<DataBuffer>> {
        DataBuffer::poll_read(read, cx, capacity)
    }

    async fn close_gracefully(write: &mut OwnedWriteHalf) {
        Box::pin(close_gracefully(write.as_ref())).await;
    }

    fn reset(write: &OwnedWriteHalf) {
        reset(write.as_ref());
    }

    fn stats(write: &OwnedWriteHalf) -> Option<FlowStats> {
        tcp_stats::read(write.as_ref())
    }

    fn forget(write: OwnedWriteHalf) {
        write.forget();
    }
}

impl Carried for DuplexStream {
    type Read = ReadHalf<DuplexStream>;
    type Write = WriteHalf<DuplexStream>;

    fn split(self) -> (Self::Read, Self::Write) {
        tokio::io::split(self)
    }

    fn poll_read(
        read: &mut Self::Read,
        cx: &mut Context<'_>,
        capacity: usize,
    ) -> Poll<io::Result<DataBuffer>> {
        DataBuffer::poll_read_from(read, cx, capacity)
    }

    async fn close_gracefully(write: &mut Self::Write) {
        let _ = write.shutdown().await;
    }

    /// The router sees the pipe end, which it treats as a failed side.
    fn reset(_: &Self::Write) {}

    fn stats(_: &Self::Write) -> Option<FlowStats> {
        None
    }

    fn forget(write: Self::Write) {
        drop(write);
    }
}
