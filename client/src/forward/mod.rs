//! One stolen or mirrored connection on the developer's side: a local TCP
//! connection to the developer's process, and a gRPC stream to the agent.
//! FIN and reset travel as such; each direction reads only as fast as the
//! other end takes. A mirrored connection only flows toward the local
//! process; what it answers is read and dropped.
//!
//! A connection reaches us on a standby call, opened before it existed
//! ([`stand_by`]), or, when none was waiting, announced on the session
//! ([`serve`]), and then we open its call.
//!
//! The local process's bytes are read by the call's request stream itself
//! ([`LocalReader`]); the agent's are written by the connection's task.
mod in_flight;
mod local_reader;

use std::{fmt, pin::Pin, time::Duration};

use remocal_proto::{
    v1::{
        Attach, ConnectionDownstream, ConnectionUpstream, Mode, NewConnection, RejectConnection,
        SessionRequest, Standby, connection_downstream, connection_upstream, session_request,
    },
    wire::Messages,
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

use crate::{agent_link::Agent, output::Printer};
pub use in_flight::InFlight;
use local_reader::{Failed, Handle, LocalReader, Plug};

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

/// What serving any connection of a session needs.
#[derive(Clone)]
pub struct Forwarding {
    pub agent: Agent,
    pub session_id: String,
    pub local: Local,
    pub requests: mpsc::Sender<SessionRequest>,
    pub printer: Printer,
    pub mode: Mode,
    /// Told when a standby call got its connection, so that another one
    /// takes its place.
    pub standby_used: mpsc::UnboundedSender<()>,
    /// The connections being served.
    pub in_flight: InFlight,
}

/// Serves one connection the agent announced, until it ends. Setting it up
/// takes a lot of state (the agent's client, the connection's details) and
/// is boxed, so the future that lives as long as the connection holds only
/// the connection.
pub fn serve(
    forwarding: Forwarding,
    connection: NewConnection,
) -> impl Future<Output = ()> + Send + 'static {
    let in_flight = forwarding.in_flight.clone();
    run_opened(in_flight, Box::pin(open(forwarding, connection)))
}

/// Opens a standby call and serves the connection the agent hands it, if
/// any: the call ends unused when the session does.
pub fn stand_by(forwarding: Forwarding) -> impl Future<Output = ()> + Send + 'static {
    let in_flight = forwarding.in_flight.clone();
    run_opened(in_flight, Box::pin(wait_for_connection(forwarding)))
}

async fn run_opened(in_flight: InFlight, opening: Pin<Box<impl Future<Output = Option<Opened>>>>) {
    if let Some(opened) = opening.await {
        let _serving = in_flight.serving();
        opened.run().await;
    }
}

/// A connection whose local side is connected and whose call is open.
struct Opened {
    downstream: Messages<ConnectionDownstream>,
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

async fn open(forwarding: Forwarding, connection: NewConnection) -> Option<Opened> {
    let Forwarding {
        mut agent,
        session_id,
        local,
        requests,
        printer,
        mode,
        ..
    } = forwarding;
    let id = connection.connection_id;
    let stream = match connect_local(&local).await {
        Ok(stream) => stream,
        Err(why) => {
            let reason = refusal(&connection, &local, &why, printer);
            let reject = session_request::Kind::Reject(RejectConnection {
                connection_id: id,
                reason,
            });
            let _ = requests.send(SessionRequest { kind: Some(reject) }).await;
            return None;
        }
    };
    let attach = ConnectionUpstream {
        kind: Some(connection_upstream::Kind::Attach(Attach {
            session_id,
            connection_id: id,
        })),
    };
    let (reader, plug) = LocalReader::new(attach);
    let local = plug_in(plug, stream, mode);
    match agent.connection(reader).await {
        Ok(downstream) => Some(Opened { downstream, local }),
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

async fn wait_for_connection(forwarding: Forwarding) -> Option<Opened> {
    let Forwarding {
        mut agent,
        session_id,
        local,
        printer,
        mode,
        standby_used,
        ..
    } = forwarding;
    let standby = ConnectionUpstream {
        kind: Some(connection_upstream::Kind::Standby(Standby { session_id })),
    };
    let (reader, plug) = LocalReader::new(standby);
    // Refused when the session has just ended, or already has enough calls
    // waiting: its connections are then announced instead, nothing is lost.
    let mut downstream = agent.connection(reader).await.ok()?;
    let connection = match downstream.message().await {
        Ok(Some(ConnectionDownstream {
            kind: Some(connection_downstream::Kind::Connection(connection)),
        })) => connection,
        // The session ended before it needed this call.
        _ => return None,
    };
    let _ = standby_used.send(());
    printer.connection(&connection);
    match connect_local(&local).await {
        Ok(stream) => Some(Opened {
            downstream,
            local: plug_in(plug, stream, mode),
        }),
        Err(why) => {
            plug.refuse(refusal(&connection, &local, &why, printer));
            // The call lives until the agent has reset the remote side:
            // dropping it now could cancel it before the reset is read.
            let _ = tokio::time::timeout(CONNECT_TIMEOUT, async {
                while let Ok(Some(_)) = downstream.message().await {}
            })
            .await;
            None
        }
    }
}

async fn connect_local(local: &Local) -> Result<TcpStream, String> {
    let connecting = TcpStream::connect((local.host.as_str(), local.port));
    match tokio::time::timeout(CONNECT_TIMEOUT, connecting).await {
        Ok(Ok(stream)) => {
            let _ = stream.set_nodelay(true);
            Ok(stream)
        }
        Ok(Err(err)) => Err(err.to_string()),
        Err(_) => Err("timed out".to_string()),
    }
}

/// Hands the local socket's reading side to the call (a copy is read-only:
/// nothing goes upstream after the first message).
fn plug_in(plug: Plug, stream: TcpStream, mode: Mode) -> LocalSide {
    if mode == Mode::Mirror {
        plug.mirror();
        LocalSide::Mirrored(stream)
    } else {
        let (read, write) = stream.into_split();
        let handle = plug.steal(read);
        LocalSide::Stolen { write, handle }
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

/// Tells the developer that nothing serves a connection locally; returns
/// the reason for the agent, which resets the remote side.
fn refusal(connection: &NewConnection, local: &Local, why: &str, printer: Printer) -> String {
    let reason = format!("nothing answers at {local} ({why})");
    printer.warning(&format!(
        "connection {} from {} was reset: {reason}; start your local process or pass the right --local-port",
        connection.connection_id, connection.source
    ));
    reason
}

async fn agent_to_local(
    downstream: &mut Messages<ConnectionDownstream>,
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
            // Only ever a standby call's first message, read before this.
            connection_downstream::Kind::Connection(_) => continue,
        };
        written.map_err(|_| Failed)?;
    }
}

/// Writes a mirrored connection's bytes to the local process while dropping
/// its answers; true if the copy ended in failure.
async fn copy_to_local(
    downstream: &mut Messages<ConnectionDownstream>,
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
