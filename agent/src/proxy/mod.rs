//! Moves the bytes of one stolen connection between its socket and its gRPC
//! call, keeping TCP's semantics: a FIN travels as such (half-close), a
//! reset as a reset, and each direction only reads when the other end can
//! take more (backpressure comes from HTTP/2 flow control per stream).
//!
//! The remote's bytes are read by the call's response stream itself
//! ([`RemoteReader`]), so they reach HTTP/2 without a queue or a task switch
//! in between; the client's bytes are written by one task per connection,
//! which also decides how the connection ends.
mod carried;
mod remote_reader;
mod tcp_stats;

use std::{
    io,
    net::Shutdown,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use remocal_agent_common::FlowStats;
use remocal_proto::{
    v1::{ConnectionUpstream, connection_upstream},
    wire::Messages,
};
use socket2::SockRef;
use tokio::{
    io::{AsyncWrite, AsyncWriteExt as _},
    net::TcpStream,
    sync::oneshot,
};
use tokio_util::sync::CancellationToken;
use tonic::Status;

pub use carried::Carried;
use remote_reader::ReadEnd;
pub use remote_reader::RemoteReader;

/// Large enough for throughput (128 KiB moved a stolen stream 10% faster
/// than 64 KiB), small enough that a stalled connection pins little memory
/// and below the allocator's threshold for a mapping of its own.
pub const CHUNK: usize = 128 * 1024;

/// How long a connection closed by the end of its session may take to finish
/// reading what the remote still sends before it is dropped.
const LINGER_AFTER_SESSION_END: Duration = Duration::from_secs(2);

/// How a stolen connection ended, for the session's event stream.
#[derive(Debug, Default)]
pub struct Outcome {
    pub bytes_from_remote: u64,
    pub bytes_to_remote: u64,
    /// Empty when both sides closed normally.
    pub error: String,
    /// The kernel's TCP statistics of the connection, when the agent owns
    /// its socket (a stolen connection).
    pub stats: Option<FlowStats>,
    /// Otherwise the connection's addresses as its socket in the target sees
    /// them (local, remote): the key of its statistics from sock_ops.
    pub sockets: Option<(std::net::SocketAddr, std::net::SocketAddr)>,
}

enum Ended {
    RemoteFailed(io::Error),
    /// With the client's reason, when it gave one.
    LocalReset(String),
    ClientGone,
}

/// Splits a stolen connection between its call's response stream (the
/// remote's bytes) and the returned future, which writes the client's bytes
/// until the connection is over (both directions finished, a side reset, or
/// the session ended, when the remote gets a clean FIN) and then hands its
/// outcome to `closed`.
///
/// The future lives as long as the connection, so its size is memory per
/// connection: it is one flat state machine, without a wrapper that would
/// hold a second copy of it (an earlier `async fn` plus wrapper took 3 KiB).
pub fn start<C: Carried>(
    stream: C,
    mut upstream: Messages<ConnectionUpstream>,
    session_ended: CancellationToken,
    closed: impl FnOnce(Outcome) + Send + 'static,
) -> (RemoteReader<C>, impl Future<Output = ()> + Send + 'static) {
    let (read, mut write) = stream.split();
    let from_remote = Arc::new(AtomicU64::new(0));
    let (read_end_tx, read_end) = oneshot::channel();
    // Sent to end the call with an error; dropped to end it cleanly.
    let (finish, finish_rx) = oneshot::channel();
    let reader = RemoteReader::new(read, from_remote.clone(), read_end_tx, finish_rx);
    let pipe = async move {
        let mut bytes_to_remote = 0;
        let ended = {
            let remote_done = async {
                match read_end.await {
                    Ok(ReadEnd::Eof) => Ok(()),
                    Ok(ReadEnd::Failed(err)) => Err(Ended::RemoteFailed(err)),
                    Ok(ReadEnd::ClientGone) | Err(_) => Err(Ended::ClientGone),
                }
            };
            let to_remote = client_to_remote(&mut upstream, &mut write, &mut bytes_to_remote);
            // Biased: when the session ends, the client's calls break right
            // after; the end of the session must win that race.
            tokio::select! {
                biased;
                () = session_ended.cancelled() => None,
                result = futures::future::try_join(remote_done, to_remote) => Some(result.map(|_| ())),
            }
        };
        let error = match ended {
            Some(Ok(())) => String::new(),
            None => {
                let _ = finish.send(Status::unavailable("the session ended"));
                C::close_gracefully(&mut write).await;
                "session ended".to_string()
            }
            Some(Err(Ended::RemoteFailed(err))) => {
                let _ = finish.send(Status::aborted(format!(
                    "the remote connection failed: {err}"
                )));
                C::reset(&write);
                format!("remote: {err}")
            }
            Some(Err(Ended::LocalReset(reason))) => {
                C::reset(&write);
                if reason.is_empty() {
                    "local side reset the connection".to_string()
                } else {
                    reason
                }
            }
            // The client vanished (its link broke): that ends the session,
            // whose connections close cleanly. Only an explicit reset from
            // the local side becomes a reset.
            Some(Err(Ended::ClientGone)) => {
                C::close_gracefully(&mut write).await;
                "client went away".to_string()
            }
        };
        let stats = C::stats(&write);
        // Every FIN due was sent above; a reset must not get one first.
        C::forget(write);
        closed(Outcome {
            bytes_from_remote: from_remote.load(Ordering::Relaxed),
            bytes_to_remote,
            error,
            stats,
            sockets: None,
        });
    };
    (reader, pipe)
}

async fn client_to_remote(
    upstream: &mut Messages<ConnectionUpstream>,
    write: &mut (impl AsyncWrite + Unpin),
    bytes: &mut u64,
) -> Result<(), Ended> {
    loop {
        match upstream.message().await {
            Ok(Some(ConnectionUpstream {
                kind: Some(connection_upstream::Kind::Data(data)),
            })) => {
                write.write_all(&data).await.map_err(Ended::RemoteFailed)?;
                *bytes += data.len() as u64;
            }
            Ok(Some(ConnectionUpstream {
                kind: Some(connection_upstream::Kind::Reset(reset)),
            })) => return Err(Ended::LocalReset(reset.reason)),
            // A second attach or standby, or an empty frame, carries nothing to deliver.
            Ok(Some(_)) => {}
            Ok(None) => {
                write.shutdown().await.map_err(Ended::RemoteFailed)?;
                return Ok(());
            }
            Err(_) => return Err(Ended::ClientGone),
        }
    }
}

/// Sends a FIN and reads (and drops) what the remote still sends for a
/// moment, so that closing does not turn into a reset for unread data.
pub async fn close_gracefully(stream: &TcpStream) {
    let _ = SockRef::from(stream).shutdown(Shutdown::Write);
    // On the heap: an array here would make every connection's task (whose
    // future embeds this one) 4 KiB larger for its whole life.
    let mut sink = vec![0u8; 4096];
    let _ = tokio::time::timeout(LINGER_AFTER_SESSION_END, async {
        loop {
            if stream.readable().await.is_err() {
                break;
            }
            match stream.try_read(&mut sink) {
                Ok(0) => break,
                Ok(_) => {}
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => {}
                Err(_) => break,
            }
        }
    })
    .await;
}

/// A zero linger makes the close send RST: the remote learns at once that
/// the other side failed instead of waiting on a silent connection.
pub fn reset(stream: &TcpStream) {
    let _ = SockRef::from(stream).set_linger(Some(Duration::ZERO));
}
