//! One stolen or mirrored connection on the developer's side: a local TCP
//! connection to the developer's process, and a gRPC stream to the agent.
//! FIN and reset travel as such; each direction reads only as fast as the
//! other end takes. A mirrored connection only flows toward the local
//! process; what it answers is read and dropped.
use std::{fmt, time::Duration};

use bytes::BytesMut;
use remocal_proto::v1::{
    Attach, ConnectionDownstream, ConnectionUpstream, Mode, NewConnection, RejectConnection, Reset,
    SessionRequest, connection_downstream, connection_upstream, session_request,
};
use socket2::SockRef;
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{
        TcpStream,
        tcp::{ReadHalf, WriteHalf},
    },
    sync::mpsc,
};
use tokio_stream::wrappers::ReceiverStream;
use tonic::Streaming;

use crate::{agent_link::Agent, output::Printer};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const CHUNK: usize = 128 * 1024;
/// How long a mirrored connection waits for the local process's answer after
/// the remote side finished.
const LINGER: Duration = Duration::from_secs(5);

/// Where the developer's process listens.
#[derive(Clone, Debug)]
pub struct Local {
    pub host: String,
    pub port: u16,
}

impl fmt::Display for Local {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

pub async fn serve(
    mut agent: Agent,
    session_id: String,
    connection: NewConnection,
    local: Local,
    requests: mpsc::Sender<SessionRequest>,
    printer: Printer,
    mode: Mode,
) {
    let id = connection.connection_id;
    let connected = tokio::time::timeout(
        CONNECT_TIMEOUT,
        TcpStream::connect((local.host.as_str(), local.port)),
    )
    .await;
    let mut stream = match connected {
        Ok(Ok(stream)) => stream,
        Ok(Err(err)) => {
            return reject(&requests, &connection, &local, &err.to_string(), printer).await;
        }
        Err(_) => return reject(&requests, &connection, &local, "timed out", printer).await,
    };
    let _ = stream.set_nodelay(true);

    let (upstream, outgoing) = mpsc::channel(2);
    let attach = connection_upstream::Kind::Attach(Attach {
        session_id,
        connection_id: id,
    });
    let _ = upstream.try_send(ConnectionUpstream { kind: Some(attach) });
    let mut downstream = match agent.connection(ReceiverStream::new(outgoing)).await {
        Ok(response) => response.into_inner(),
        Err(status) => {
            printer.warning(&format!(
                "connection {id} could not be picked up: {}",
                status.message()
            ));
            return reset(&stream);
        }
    };

    let failed = if mode == Mode::Mirror {
        // A copy is read-only: nothing goes upstream.
        drop(upstream);
        copy_to_local(&mut downstream, &mut stream).await
    } else {
        let (read, write) = stream.split();
        let weak = upstream.downgrade();
        tokio::try_join!(
            local_to_agent(read, upstream),
            agent_to_local(&mut downstream, write, Some(weak))
        )
        .is_err()
    };
    if failed {
        reset(&stream);
    }
}

async fn reject(
    requests: &mpsc::Sender<SessionRequest>,
    connection: &NewConnection,
    local: &Local,
    why: &str,
    printer: Printer,
) {
    let reason = format!("nothing answers at {local} ({why})");
    printer.warning(&format!(
        "connection {} from {} was reset: {reason}; start your local process or pass the right --local-port",
        connection.connection_id, connection.source
    ));
    let reject = session_request::Kind::Reject(RejectConnection {
        connection_id: connection.connection_id,
        reason,
    });
    let _ = requests.send(SessionRequest { kind: Some(reject) }).await;
}

/// A side of the connection failed: the whole connection is reset.
struct Failed;

async fn local_to_agent(
    read: ReadHalf<'_>,
    upstream: mpsc::Sender<ConnectionUpstream>,
) -> Result<(), Failed> {
    loop {
        // A buffer exists only while there is something to read: an idle
        // connection holds no memory of its own.
        let read_once = async {
            read.readable().await?;
            let mut buffer = BytesMut::with_capacity(CHUNK);
            read.try_read_buf(&mut buffer).map(|n| (n, buffer))
        };
        let kind = match read_once.await {
            // Dropping the sender ends the call's request stream: the agent
            // turns that into a FIN to the remote.
            Ok((0, _)) => return Ok(()),
            Ok((_, buffer)) => connection_upstream::Kind::Data(buffer.freeze()),
            Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(_) => {
                let _ = upstream.send(reset_frame()).await;
                return Err(Failed);
            }
        };
        upstream
            .send(ConnectionUpstream { kind: Some(kind) })
            .await
            .map_err(|_| Failed)?;
    }
}

async fn agent_to_local(
    downstream: &mut Streaming<ConnectionDownstream>,
    mut write: WriteHalf<'_>,
    // Where to report a local failure; a mirrored copy has nobody to tell.
    upstream: Option<mpsc::WeakSender<ConnectionUpstream>>,
) -> Result<(), Failed> {
    loop {
        let kind = match downstream.message().await {
            Ok(Some(ConnectionDownstream { kind: Some(kind) })) => kind,
            Ok(Some(ConnectionDownstream { kind: None })) => continue,
            Ok(None) => return Ok(()),
            // The agent reports a remote reset, the end of the session, or
            // a mirrored copy that can no longer be exact (the session's
            // event stream says why).
            Err(_) => return Err(Failed),
        };
        let written = match kind {
            connection_downstream::Kind::Data(data) => write.write_all(&data).await,
            connection_downstream::Kind::Eof(_) => write.shutdown().await,
        };
        if written.is_err() {
            if let Some(upstream) = upstream.as_ref().and_then(mpsc::WeakSender::upgrade) {
                let _ = upstream.send(reset_frame()).await;
            }
            return Err(Failed);
        }
    }
}

/// Writes a mirrored connection's bytes to the local process while dropping
/// its answers; true if the copy ended in failure.
async fn copy_to_local(
    downstream: &mut Streaming<ConnectionDownstream>,
    stream: &mut TcpStream,
) -> bool {
    let (read, write) = stream.split();
    let copy = agent_to_local(downstream, write, None);
    let drain = discard(read);
    tokio::pin!(copy, drain);
    let mut drained = false;
    let failed = loop {
        tokio::select! {
            copied = &mut copy => break copied.is_err(),
            () = &mut drain, if !drained => drained = true,
        }
    };
    if !failed && !drained {
        // Let the local process finish its answer before we close.
        let _ = tokio::time::timeout(LINGER, drain).await;
    }
    failed
}

/// Reads and drops what the local process sends (its answers to a mirrored
/// request), so it never blocks on a full socket.
async fn discard(mut read: ReadHalf<'_>) {
    let mut sink = vec![0u8; CHUNK];
    while let Ok(n) = read.read(&mut sink).await {
        if n == 0 {
            break;
        }
    }
}

fn reset_frame() -> ConnectionUpstream {
    ConnectionUpstream {
        kind: Some(connection_upstream::Kind::Reset(Reset {})),
    }
}

/// Closing with a zero linger sends RST, so the local process sees the
/// failure instead of a clean end of data.
fn reset(stream: &TcpStream) {
    let _ = SockRef::from(stream).set_linger(Some(Duration::ZERO));
}
