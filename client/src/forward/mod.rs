//! One stolen or mirrored connection on the developer's side: a local TCP
//! connection to the developer's process, and a gRPC stream to the agent.
//! FIN and reset travel as such; each direction reads only as fast as the
//! other end takes. A mirrored connection only flows toward the local
//! process; what it answers is read and dropped.
//!
//! The local process's bytes are read by the call's request stream itself
//! ([`LocalReader`]); the agent's are written by the connection's task.
mod local_reader;

use std::{fmt, time::Duration};

use remocal_proto::v1::{
    Attach, ConnectionDownstream, ConnectionUpstream, Mode, NewConnection, RejectConnection,
    SessionRequest, connection_downstream, connection_upstream, session_request,
};
use socket2::SockRef;
use tokio::{
    io::{AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _},
    net::{
        TcpStream,
        tcp::{OwnedWriteHalf, ReadHalf},
    },
    sync::mpsc,
};
use tonic::Streaming;

use crate::{agent_link::Agent, output::Printer};
use local_reader::{Failed, Handle, LocalReader};

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

/// A connection the agent announced, with what serving it needs.
pub struct Announced {
    pub agent: Agent,
    pub session_id: String,
    pub connection: NewConnection,
    pub local: Local,
    pub requests: mpsc::Sender<SessionRequest>,
    pub printer: Printer,
    pub mode: Mode,
}

/// Serves one connection until it ends. Setting it up takes a lot of state
/// (the agent's client, the connection's details) and is boxed, so the
/// future that lives as long as the connection holds only the connection.
pub fn serve(announced: Announced) -> impl Future<Output = ()> + Send + 'static {
    let opening = Box::pin(open(announced));
    async move {
        let Some(opened) = opening.await else {
            return;
        };
        opened.run().await;
    }
}

/// A connection whose local side is connected and whose call is open.
struct Opened {
    downstream: Streaming<ConnectionDownstream>,
    local: LocalSide,
}

enum LocalSide {
    /// The read half belongs to the call's request stream.
    Stolen {
        write: OwnedWriteHalf,
        handle: Handle,
    },
    /// A copy only flows toward the local process.
    Mirrored(TcpStream),
}

impl LocalSide {
    /// Closing with a zero linger sends RST, so the local process sees the
    /// failure instead of a clean end of data.
    fn reset(self) {
        let stream = match &self {
            LocalSide::Stolen { write, .. } => write.as_ref(),
            LocalSide::Mirrored(stream) => stream,
        };
        let _ = SockRef::from(stream).set_linger(Some(Duration::ZERO));
        if let LocalSide::Stolen { write, .. } = self {
            // Dropping the write half would send a FIN before the RST.
            write.forget();
        }
    }
}

async fn open(announced: Announced) -> Option<Opened> {
    let Announced {
        mut agent,
        session_id,
        connection,
        local,
        requests,
        printer,
        mode,
    } = announced;
    let id = connection.connection_id;
    let connected = tokio::time::timeout(
        CONNECT_TIMEOUT,
        TcpStream::connect((local.host.as_str(), local.port)),
    )
    .await;
    let why = match connected {
        Ok(Ok(stream)) => {
            let _ = stream.set_nodelay(true);
            return call(&mut agent, session_id, id, stream, printer, mode).await;
        }
        Ok(Err(err)) => err.to_string(),
        Err(_) => "timed out".to_string(),
    };
    reject(&requests, &connection, &local, &why, printer).await;
    None
}

async fn call(
    agent: &mut Agent,
    session_id: String,
    id: u64,
    stream: TcpStream,
    printer: Printer,
    mode: Mode,
) -> Option<Opened> {
    let attach = ConnectionUpstream {
        kind: Some(connection_upstream::Kind::Attach(Attach {
            session_id,
            connection_id: id,
        })),
    };
    // A copy is read-only: nothing goes upstream after `attach`.
    let (reader, local) = if mode == Mode::Mirror {
        (LocalReader::mirror(attach), LocalSide::Mirrored(stream))
    } else {
        let (read, write) = stream.into_split();
        let (reader, handle) = LocalReader::steal(attach, read);
        (reader, LocalSide::Stolen { write, handle })
    };
    match agent.connection(reader).await {
        Ok(response) => Some(Opened {
            downstream: response.into_inner(),
            local,
        }),
        Err(status) => {
            printer.warning(&format!(
                "connection {id} could not be picked up: {}",
                status.message()
            ));
            local.reset();
            None
        }
    }
}

impl Opened {
    fn run(self) -> impl Future<Output = ()> + Send {
        let Opened {
            mut downstream,
            mut local,
        } = self;
        async move {
            let failed = match &mut local {
                // Boxed: its linger timer would otherwise enlarge every
                // stolen connection's future too.
                LocalSide::Mirrored(stream) => {
                    Box::pin(copy_to_local(&mut downstream, stream)).await
                }
                LocalSide::Stolen { write, handle } => {
                    let read_end = &mut handle.read_end;
                    let from_local = async { read_end.await.unwrap_or(Err(Failed)) };
                    let to_local = async {
                        let written = agent_to_local(&mut downstream, write).await;
                        if written.is_err() {
                            // The agent resets the remote side too.
                            if let Some(reset) = handle.reset.take() {
                                let _ = reset.send(());
                            }
                        }
                        written
                    };
                    futures::future::try_join(from_local, to_local)
                        .await
                        .is_err()
                }
            };
            if failed {
                local.reset();
            }
        }
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

async fn agent_to_local(
    downstream: &mut Streaming<ConnectionDownstream>,
    mut write: impl AsyncWrite + Unpin,
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
        written.map_err(|_| Failed)?;
    }
}

/// Writes a mirrored connection's bytes to the local process while dropping
/// its answers; true if the copy ended in failure.
async fn copy_to_local(
    downstream: &mut Streaming<ConnectionDownstream>,
    stream: &mut TcpStream,
) -> bool {
    let (read, write) = stream.split();
    let copy = agent_to_local(downstream, write);
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
