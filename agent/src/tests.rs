//! Sessions and the proxy exercised in-process over real gRPC and real
//! sockets, with the kernel redirection replaced by a loopback listener that
//! the tests connect to directly. The eBPF path is covered by tests/.
use std::{
    net::SocketAddr,
    process::{Child, Command},
    sync::{Arc, Mutex},
    time::Duration,
};

use remocal_proto::v1::{
    Attach, CloseSession, ConnectionDownstream, ConnectionUpstream, Mode, NewConnection,
    OpenSession, RejectConnection, Reset, SessionEvent, SessionRequest, Standby, Target,
    agent_client::AgentClient, connection_downstream, connection_upstream, session_event,
    session_request, target,
};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpStream,
    sync::mpsc,
};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Streaming, transport::Channel};

use crate::{
    grpc,
    mirror::{Capture, Flow},
    redirect::loopback::LoopbackRedirector,
    session::Sessions,
};

/// A network namespace other than ours (a sleeping `unshare -n` child), so
/// the target checks pass; needs root, like the rest of the agent.
struct OtherNamespace(Child);

impl OtherNamespace {
    fn new() -> Self {
        let child = Command::new("unshare")
            .args(["--net", "sleep", "120"])
            .spawn()
            .expect("unshare --net (run the tests as root)");
        let ns = format!("/proc/{}/ns/net", child.id());
        let own = std::fs::read_link("/proc/self/ns/net").unwrap();
        while std::fs::read_link(&ns).map_or(true, |link| link == own) {
            std::thread::sleep(Duration::from_millis(5));
        }
        Self(child)
    }

    fn target(&self) -> Target {
        Target {
            kind: Some(target::Kind::Pid(self.0.id())),
        }
    }
}

impl Drop for OtherNamespace {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

struct Harness {
    client: AgentClient<Channel>,
    addr: SocketAddr,
    active: Arc<Mutex<Vec<SocketAddr>>>,
    taps: Arc<Mutex<Vec<mpsc::Sender<Capture>>>>,
    netns: OtherNamespace,
}

impl Harness {
    async fn start() -> Self {
        Self::start_with(LoopbackRedirector::default()).await
    }

    async fn start_with(redirector: LoopbackRedirector) -> Self {
        let active = redirector.active.clone();
        let taps = redirector.taps.clone();
        let metrics: Arc<crate::metrics::Metrics> = Arc::default();
        let auth = Arc::new(crate::auth::Auth::none(metrics.clone()));
        let sessions = Sessions::new(
            Arc::new(redirector),
            crate::kube::PodLookup::unavailable(),
            auth.clone(),
            crate::session::Settings {
                mirror_flow_limit: 1 << 20,
                end_connections_with: crate::reset_existing::EndWith::Auto,
            },
            metrics,
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(
            crate::grpc::server(auth)
                .add_service(grpc::service(sessions))
                .serve_with_incoming(crate::grpc::incoming(listener)),
        );
        let client = AgentClient::connect(format!("http://{addr}"))
            .await
            .unwrap();
        Self {
            client,
            addr,
            active,
            taps,
            netns: OtherNamespace::new(),
        }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    async fn open(&mut self, port: u32) -> Result<Session, tonic::Status> {
        self.open_target(Some(self.netns.target()), port).await
    }

    async fn open_target(
        &mut self,
        target: Option<Target>,
        port: u32,
    ) -> Result<Session, tonic::Status> {
        self.open_mode(target, port, Mode::Steal).await
    }

    async fn open_mode(
        &mut self,
        target: Option<Target>,
        port: u32,
        mode: Mode,
    ) -> Result<Session, tonic::Status> {
        let open = OpenSession {
            target,
            port,
            mode: mode as i32,
            client: "tester@laptop".into(),
            filter: None,
            reset_existing: None,
        };
        Ok(self.open_request(open).await?.0)
    }

    /// Opens the session `open` asks for; returns it with its `ready`.
    async fn open_request(
        &mut self,
        open: OpenSession,
    ) -> Result<(Session, remocal_proto::v1::Ready), tonic::Status> {
        let mode = Mode::try_from(open.mode).unwrap();
        let (requests, outgoing) = mpsc::channel(16);
        requests
            .send(SessionRequest {
                kind: Some(session_request::Kind::Open(open)),
            })
            .await
            .unwrap();
        let mut events = self
            .client
            .session(ReceiverStream::new(outgoing))
            .await?
            .into_inner();
        let Some(session_event::Kind::Ready(ready)) = next(&mut events).await else {
            panic!("no ready event");
        };
        // A mirror has no listener: its connections come from the tap.
        let listener = match mode {
            Mode::Mirror => SocketAddr::from(([0, 0, 0, 0], 0)),
            _ => *self
                .active
                .lock()
                .unwrap()
                .last()
                .expect("an active redirection"),
        };
        assert!(ready.standby_calls, "the agent takes standby calls");
        Ok((
            Session {
                id: ready.session_id.clone(),
                requests,
                events,
                listener,
            },
            ready,
        ))
    }

    /// A remote client connects "through the redirection"; the session
    /// announces it and the test attaches a data stream to it.
    async fn stolen(&mut self, session: &mut Session) -> (TcpStream, Connection) {
        let remote = TcpStream::connect(session.listener).await.unwrap();
        // Earlier connections may report their end first.
        let announced = loop {
            match next(&mut session.events).await {
                Some(session_event::Kind::Connection(announced)) => break announced,
                Some(session_event::Kind::Closed(_)) => {}
                other => panic!("expected a connection event, got {other:?}"),
            }
        };
        assert_eq!(announced.source, remote.local_addr().unwrap().to_string());
        assert_eq!(announced.destination, session.listener.to_string());
        let connection = self.attach(session, announced.connection_id).await;
        (remote, connection)
    }

    /// Opens the data call for an announced connection, as the client does.
    async fn attach(&mut self, session: &Session, connection_id: u64) -> Connection {
        let (upstream, outgoing) = mpsc::channel(16);
        let attach = connection_upstream::Kind::Attach(Attach {
            session_id: session.id.clone(),
            connection_id,
        });
        upstream.send(frame(attach)).await.unwrap();
        let downstream = self
            .client
            .connection(ReceiverStream::new(outgoing))
            .await
            .unwrap()
            .into_inner();
        Connection {
            id: connection_id,
            upstream: Some(upstream),
            downstream,
        }
    }
}

impl Harness {
    /// Opens a call ahead of its connection, as the client keeps a few.
    async fn standby(&mut self, session: &Session) -> Result<Connection, tonic::Status> {
        let (upstream, outgoing) = mpsc::channel(16);
        let standby = connection_upstream::Kind::Standby(Standby {
            session_id: session.id.clone(),
        });
        upstream.send(frame(standby)).await.unwrap();
        let downstream = self
            .client
            .connection(ReceiverStream::new(outgoing))
            .await?
            .into_inner();
        Ok(Connection {
            id: 0,
            upstream: Some(upstream),
            downstream,
        })
    }
}

struct Session {
    id: String,
    requests: mpsc::Sender<SessionRequest>,
    events: Streaming<SessionEvent>,
    listener: SocketAddr,
}

impl Session {
    /// Asks the agent to end the session, as the client does on Ctrl-C.
    async fn close(&self) {
        let close = session_request::Kind::Close(CloseSession {});
        let request = SessionRequest { kind: Some(close) };
        self.requests.send(request).await.unwrap();
    }
}

struct Connection {
    id: u64,
    upstream: Option<mpsc::Sender<ConnectionUpstream>>,
    downstream: Streaming<ConnectionDownstream>,
}

impl Connection {
    /// Sends `bytes` as the local side and checks the remote gets them.
    async fn answer(&self, remote: &mut TcpStream, bytes: &'static [u8]) {
        self.send(connection_upstream::Kind::Data(bytes.into()))
            .await;
        let mut got = vec![0u8; bytes.len()];
        remote.read_exact(&mut got).await.unwrap();
        assert_eq!(got, bytes);
    }

    /// A standby call's first message: the connection it now carries.
    async fn handed(&mut self) -> NewConnection {
        let first = tokio::time::timeout(Duration::from_secs(10), self.downstream.message())
            .await
            .expect("a connection within 10 s")
            .unwrap();
        let Some(ConnectionDownstream {
            kind: Some(connection_downstream::Kind::Connection(connection)),
        }) = first
        else {
            panic!("expected a connection as the first message, got {first:?}");
        };
        self.id = connection.connection_id;
        connection
    }

    async fn send(&self, kind: connection_upstream::Kind) {
        self.upstream
            .as_ref()
            .unwrap()
            .send(frame(kind))
            .await
            .unwrap();
    }

    /// Reads downstream data until `len` bytes or an Eof arrived.
    async fn receive(&mut self, len: usize) -> (Vec<u8>, bool) {
        let mut data = Vec::new();
        while data.len() < len {
            match self.downstream.message().await.unwrap() {
                Some(ConnectionDownstream {
                    kind: Some(connection_downstream::Kind::Data(chunk)),
                }) => data.extend_from_slice(&chunk),
                Some(ConnectionDownstream {
                    kind: Some(connection_downstream::Kind::Eof(_)),
                }) => return (data, true),
                other => panic!("unexpected downstream {other:?}"),
            }
        }
        (data, false)
    }
}

fn frame(kind: connection_upstream::Kind) -> ConnectionUpstream {
    ConnectionUpstream { kind: Some(kind) }
}

async fn next(events: &mut Streaming<SessionEvent>) -> Option<session_event::Kind> {
    tokio::time::timeout(Duration::from_secs(10), events.message())
        .await
        .expect("an event within 10 s")
        .unwrap()
        .and_then(|event| event.kind)
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

#[tokio::test]
async fn bytes_and_half_close_cross_in_both_directions() {
    let mut harness = Harness::start().await;
    let mut session = harness.open(80).await.unwrap();
    let (mut remote, mut connection) = harness.stolen(&mut session).await;

    let request = pattern(300_000, 7);
    remote.write_all(&request).await.unwrap();
    remote.shutdown().await.unwrap();
    let (received, eof) = connection.receive(request.len() + 1).await;
    assert!(eof, "the remote's FIN arrives as Eof");
    assert_eq!(received, request);

    let answer = pattern(200_000, 9);
    connection
        .send(connection_upstream::Kind::Data(answer.clone().into()))
        .await;
    connection.upstream = None; // the local side's FIN
    let mut got = Vec::new();
    remote.read_to_end(&mut got).await.unwrap();
    assert_eq!(
        got, answer,
        "the answer arrives after the remote's half-close"
    );

    let Some(session_event::Kind::Closed(closed)) = next(&mut session.events).await else {
        panic!("no closed event");
    };
    assert_eq!(closed.connection_id, connection.id);
    assert_eq!(
        (closed.bytes_from_remote, closed.bytes_to_remote),
        (300_000, 200_000)
    );
    assert_eq!(closed.error, "");
}

#[tokio::test]
async fn a_second_session_on_the_same_port_names_the_holder() {
    let mut harness = Harness::start().await;
    let _first = harness.open(8080).await.unwrap();
    let err = harness.open(8080).await.err().expect("conflict");
    assert_eq!(err.code(), Code::AlreadyExists);
    assert!(err.message().contains("tester@laptop"), "{}", err.message());
    assert!(err.message().contains("port 8080"), "{}", err.message());
    harness.open(8081).await.expect("another port is free");
    assert_eq!(harness.active.lock().unwrap().len(), 2);
}

#[tokio::test]
async fn bad_requests_get_actionable_statuses() {
    let mut harness = Harness::start().await;
    let target = Some(harness.netns.target());
    for port in [0, 65536] {
        let err = harness
            .open_target(target.clone(), port)
            .await
            .err()
            .unwrap();
        assert_eq!(err.code(), Code::InvalidArgument);
        assert!(err.message().contains("1 to 65535"), "{}", err.message());
    }
    let err = harness.open_target(None, 80).await.err().unwrap();
    assert_eq!(err.code(), Code::InvalidArgument);

    let missing = Target {
        kind: Some(target::Kind::NetnsPath("/var/run/netns/no-such-ns".into())),
    };
    let err = harness.open_target(Some(missing), 80).await.err().unwrap();
    assert_eq!(err.code(), Code::NotFound);
    assert!(
        err.message().contains("/var/run/netns/no-such-ns"),
        "{}",
        err.message()
    );

    let absent_pod = Target {
        kind: Some(target::Kind::PodUid(
            "00000000-0000-4000-8000-000000000000".into(),
        )),
    };
    let err = harness
        .open_target(Some(absent_pod), 80)
        .await
        .err()
        .unwrap();
    assert_eq!(err.code(), Code::NotFound);
    assert!(
        err.message()
            .contains("00000000-0000-4000-8000-000000000000"),
        "{}",
        err.message()
    );

    let own = Target {
        kind: Some(target::Kind::Pid(std::process::id())),
    };
    let err = harness.open_target(Some(own), 80).await.err().unwrap();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(
        harness.active.lock().unwrap().is_empty(),
        "nothing was redirected"
    );
}

#[tokio::test]
async fn closing_the_session_undoes_the_redirection_and_ends_connections_cleanly() {
    let mut harness = Harness::start().await;
    let mut session = harness.open(80).await.unwrap();
    let (mut remote, _connection) = harness.stolen(&mut session).await;
    session.close().await;
    loop {
        match next(&mut session.events).await {
            Some(session_event::Kind::Ended(ended)) => {
                assert_eq!(ended.reason, "closed by the client");
                break;
            }
            Some(_) => {}
            None => panic!("the session stream ended without an Ended event"),
        }
    }
    assert!(harness.active.lock().unwrap().is_empty());
    let mut rest = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), remote.read_to_end(&mut rest)).await;
    assert!(
        matches!(read, Ok(Ok(0))),
        "the remote sees a clean EOF: {read:?}"
    );
    // The port is free for the next developer.
    harness.open(80).await.unwrap();
}

#[tokio::test]
async fn a_dropped_session_call_ends_the_session() {
    let mut harness = Harness::start().await;
    let session = harness.open(80).await.unwrap();
    drop(session);
    until("the redirection outlived the client's call", || {
        harness.active.lock().unwrap().is_empty()
    })
    .await;
}

#[tokio::test]
async fn rejected_and_reset_connections_reset_the_remote() {
    let mut harness = Harness::start().await;
    let mut session = harness.open(80).await.unwrap();

    let mut remote = TcpStream::connect(session.listener).await.unwrap();
    let Some(session_event::Kind::Connection(announced)) = next(&mut session.events).await else {
        panic!("no connection event");
    };
    session
        .requests
        .send(SessionRequest {
            kind: Some(session_request::Kind::Reject(RejectConnection {
                connection_id: announced.connection_id,
                reason: "nothing listens locally".into(),
            })),
        })
        .await
        .unwrap();
    assert_reset(&mut remote).await;
    let Some(session_event::Kind::Closed(closed)) = next(&mut session.events).await else {
        panic!("no closed event");
    };
    assert_eq!(closed.connection_id, announced.connection_id);
    assert_eq!(closed.error, "nothing listens locally");

    let (mut remote, connection) = harness.stolen(&mut session).await;
    connection
        .send(connection_upstream::Kind::Reset(Default::default()))
        .await;
    assert_reset(&mut remote).await;
}

#[tokio::test]
async fn a_connection_the_client_never_picks_up_is_reset_and_reported() {
    let mut harness = Harness::start().await;
    let mut session = harness.open(80).await.unwrap();
    let mut remote = TcpStream::connect(session.listener).await.unwrap();
    let Some(session_event::Kind::Connection(announced)) = next(&mut session.events).await else {
        panic!("no connection event");
    };
    // Picked up ones are left alone by the same sweep.
    let (mut served, connection) = harness.stolen(&mut session).await;

    let mut buf = [0u8; 1];
    let read = tokio::time::timeout(Duration::from_secs(15), remote.read(&mut buf))
        .await
        .expect("the unclaimed connection ends within the attach timeout and a sweep");
    assert_eq!(
        read.map_err(|e| e.kind()),
        Err(std::io::ErrorKind::ConnectionReset)
    );
    let warning = loop {
        match next(&mut session.events).await {
            Some(session_event::Kind::Warning(warning)) => break warning.message,
            Some(_) => {}
            None => panic!("the session ended without a warning"),
        }
    };
    assert!(
        warning.contains(&format!("connection {} was reset", announced.connection_id))
            && warning.contains("did not pick it up"),
        "{warning}"
    );
    connection.answer(&mut served, b"still here").await;
}

/// A steal session whose one standby call was handed a new remote connection.
async fn handed_standby() -> (Harness, Session, Connection, TcpStream, NewConnection) {
    let mut harness = Harness::start().await;
    let session = harness.open(80).await.unwrap();
    let mut standby = harness.standby(&session).await.unwrap();
    let remote = TcpStream::connect(session.listener).await.unwrap();
    let handed = standby.handed().await;
    (harness, session, standby, remote, handed)
}

#[tokio::test]
async fn a_standby_call_carries_the_next_connection_and_later_ones_are_announced() {
    let (mut harness, mut session, mut standby, mut remote, handed) = handed_standby().await;
    assert_eq!(handed.source, remote.local_addr().unwrap().to_string());
    assert_eq!(handed.destination, session.listener.to_string());
    remote.write_all(b"hello local").await.unwrap();
    assert_eq!(standby.receive(11).await, (b"hello local".to_vec(), false));
    standby.answer(&mut remote, b"hello remote").await;

    // The one standby call is taken: the next connection is announced, and
    // it is the first announcement the session sees.
    let (second, announced) = harness.stolen(&mut session).await;
    assert_ne!(announced.id, standby.id);
    drop((second, announced));
    standby.upstream = None;
    drop(remote);
    let closed = loop {
        match next(&mut session.events).await {
            Some(session_event::Kind::Closed(closed)) if closed.connection_id == standby.id => {
                break closed;
            }
            Some(session_event::Kind::Closed(_)) => {}
            other => panic!("expected the handed connection's close, got {other:?}"),
        }
    };
    assert_eq!((closed.bytes_from_remote, closed.bytes_to_remote), (11, 12));
}

#[tokio::test]
async fn a_standby_call_that_cannot_serve_its_connection_resets_the_remote_and_says_why() {
    let (_harness, mut session, standby, mut remote, _) = handed_standby().await;
    let reason = "nothing answers at 127.0.0.1:8080 (connection refused)";
    standby
        .send(connection_upstream::Kind::Reset(Reset {
            reason: reason.into(),
        }))
        .await;
    assert_reset(&mut remote).await;
    let Some(session_event::Kind::Closed(closed)) = next(&mut session.events).await else {
        panic!("no closed event");
    };
    assert_eq!(closed.connection_id, standby.id);
    assert_eq!(closed.error, reason);
}

#[tokio::test]
async fn standby_calls_end_with_their_session_and_are_refused_after_it() {
    let mut harness = Harness::start().await;
    let session = harness.open(80).await.unwrap();
    let mut standby = harness.standby(&session).await.unwrap();
    session.close().await;
    let end = tokio::time::timeout(Duration::from_secs(5), standby.downstream.message())
        .await
        .expect("the standby call ends with its session");
    assert!(matches!(end, Ok(None)), "ends without a message: {end:?}");
    let refused = harness.standby(&session).await.err().expect("refused");
    assert_eq!(refused.code(), Code::NotFound, "{}", refused.message());
}

#[tokio::test]
async fn a_mirrored_copy_that_nothing_answers_locally_ends_its_standby_call() {
    let (mut harness, mut session, tap, flow) = mirroring().await;
    let mut standby = harness.standby(&session).await.unwrap();
    // A copy starts with its connection's first data, not with its SYN.
    connect_and_send(&tap, flow).await;
    assert_eq!(standby.handed().await.source, "198.18.0.1:40000");
    standby
        .send(connection_upstream::Kind::Reset(Reset {
            reason: "nothing answers at 127.0.0.1:8080".into(),
        }))
        .await;
    let end = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match standby.downstream.message().await {
                // The copy's first bytes may be on their way already.
                Ok(Some(ConnectionDownstream {
                    kind: Some(connection_downstream::Kind::Data(_)),
                })) => {}
                end => break end,
            }
        }
    })
    .await
    .expect("the refused copy ends at once");
    assert!(matches!(end, Ok(None)), "{end:?}");
    // The session forgets the copy at its next look.
    let Some(session_event::Kind::Closed(closed)) = next(&mut session.events).await else {
        panic!("no closed event");
    };
    assert_eq!(closed.connection_id, standby.id);
}

/// A copy starts with its connection's first data: a SYN alone, a connection
/// that ends before sending anything, and data after a reset are never announced.
#[tokio::test]
async fn a_mirrored_connection_without_data_is_never_announced() {
    let (_harness, mut session, tap, flow) = mirroring().await;
    let from = |port| Flow {
        source: SocketAddr::new(flow.source.ip(), port),
        ..flow
    };
    let data = |port, seq| Capture::Data {
        flow: from(port),
        seq,
        payload: b"GET /".as_slice().into(),
    };
    for capture in [
        Capture::Syn {
            flow: from(1),
            isn: 10,
        },
        Capture::Syn {
            flow: from(2),
            isn: 20,
        },
        Capture::Fin {
            flow: from(2),
            seq: 21,
        },
        Capture::Syn {
            flow: from(3),
            isn: 30,
        },
        Capture::Rst {
            flow: from(3),
            by_pod: false,
        },
        data(3, 31),
        Capture::Syn {
            flow: from(4),
            isn: 40,
        },
        data(4, 41),
    ] {
        tap.send(capture).await.unwrap();
    }
    let Some(session_event::Kind::Connection(announced)) = next(&mut session.events).await else {
        panic!("no connection event");
    };
    assert_eq!(announced.source, "198.18.0.1:4", "the first with data");
}

/// A copy announced on the session whose data call never comes is dropped
/// after 10 s, as a steal session resets its unclaimed connections.
#[tokio::test]
async fn a_mirrored_copy_nobody_picks_up_is_dropped() {
    let (mut harness, mut session, tap, flow) = mirroring().await;
    connect_and_send(&tap, flow).await;
    let Some(session_event::Kind::Connection(announced)) = next(&mut session.events).await else {
        panic!("no connection event");
    };
    let (mut warned, mut closed) = (None, None);
    let events = async {
        while warned.is_none() || closed.is_none() {
            match session.events.message().await.unwrap().and_then(|e| e.kind) {
                Some(session_event::Kind::Warning(warning)) => warned = Some(warning.message),
                Some(session_event::Kind::Closed(c)) => closed = Some(c),
                other => panic!("unexpected event {other:?}"),
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(15), events)
        .await
        .expect("dropped within 15 s");
    let closed = closed.unwrap();
    assert_eq!(closed.connection_id, announced.connection_id);
    assert_eq!(closed.error, "not picked up");
    assert!(warned.unwrap().contains("did not pick it up"));
    let (upstream, outgoing) = mpsc::channel(16);
    let attach = connection_upstream::Kind::Attach(Attach {
        session_id: session.id.clone(),
        connection_id: announced.connection_id,
    });
    upstream.send(frame(attach)).await.unwrap();
    let late = harness
        .client
        .connection(ReceiverStream::new(outgoing))
        .await;
    let refused = match late {
        Err(status) => status,
        Ok(response) => response.into_inner().message().await.unwrap_err(),
    };
    assert_eq!(refused.code(), Code::NotFound, "{}", refused.message());
}

/// A mirror session, its capture tap, and the flow the tests capture.
async fn mirroring() -> (Harness, Session, mpsc::Sender<Capture>, Flow) {
    let mut harness = Harness::start().await;
    let session = harness
        .open_mode(Some(harness.netns.target()), 80, Mode::Mirror)
        .await
        .unwrap();
    let tap = harness.taps.lock().unwrap().last().unwrap().clone();
    let flow = Flow {
        source: "198.18.0.1:40000".parse().unwrap(),
        destination: "198.18.0.2:80".parse().unwrap(),
    };
    (harness, session, tap, flow)
}

/// The captures of a connection's SYN (ISN 1) and its first data, `GET /`.
async fn connect_and_send(tap: &mpsc::Sender<Capture>, flow: Flow) {
    tap.send(Capture::Syn { flow, isn: 1 }).await.unwrap();
    let data = Capture::Data {
        flow,
        seq: 2,
        payload: b"GET /".as_slice().into(),
    };
    tap.send(data).await.unwrap();
}

async fn assert_reset(remote: &mut TcpStream) {
    let mut buf = [0u8; 1];
    let read = tokio::time::timeout(Duration::from_secs(5), remote.read(&mut buf))
        .await
        .expect("the remote hears back within 5 s");
    assert_eq!(
        read.map_err(|e| e.kind()),
        Err(std::io::ErrorKind::ConnectionReset)
    );
}

#[tokio::test]
async fn a_stalled_connection_does_not_stall_another() {
    use std::{
        cell::Cell,
        sync::atomic::{AtomicUsize, Ordering},
    };
    let mut harness = Harness::start().await;
    let mut session = harness.open(80).await.unwrap();
    let (mut stalled_remote, _stalled) = harness.stolen(&mut session).await;
    let (mut remote, mut connection) = harness.stolen(&mut session).await;

    // Nobody reads the first connection's stream: its remote fills every buffer.
    let written = Arc::new(AtomicUsize::new(0));
    let flood = tokio::spawn({
        let written = written.clone();
        async move {
            let chunk = vec![0u8; 64 * 1024];
            while let Ok(n) = stalled_remote.write(&chunk).await {
                written.fetch_add(n, Ordering::Relaxed);
            }
        }
    });
    // Full is when the flood's writes block: nothing more written for 300 ms.
    let (last, unchanged) = (Cell::new(0), Cell::new(0));
    until("the stalled connection's buffers never filled up", || {
        let now = written.load(Ordering::Relaxed);
        unchanged.set(if now > 0 && now == last.replace(now) {
            unchanged.get() + 1
        } else {
            0
        });
        unchanged.get() == 15 // polls of 20 ms
    })
    .await;
    let data = pattern(1 << 20, 3);
    let writer = tokio::spawn(async move {
        remote.write_all(&data).await.unwrap();
        remote
    });
    let (received, _) = tokio::time::timeout(Duration::from_secs(20), connection.receive(1 << 20))
        .await
        .expect("the second connection flows while the first is stalled");
    assert_eq!(received, pattern(1 << 20, 3));
    writer.await.unwrap();
    flood.abort();
}

#[tokio::test]
async fn a_mirrored_connection_arrives_in_order_and_ends_with_its_fin() {
    let (mut harness, mut session, tap, flow) = mirroring().await;
    let isn = u32::MAX - 2; // the stream wraps the sequence space
    let data = pattern(10_000, 5);
    let seq = |offset: usize| isn.wrapping_add(1).wrapping_add(offset as u32);
    tap.send(Capture::Syn { flow, isn }).await.unwrap();
    // Out of order, with a duplicate: the copy is still in order and exact.
    for (from, to) in [(4000, 10_000), (0, 5000), (0, 3000)] {
        let payload = data[from..to].to_vec().into();
        tap.send(Capture::Data {
            flow,
            seq: seq(from),
            payload,
        })
        .await
        .unwrap();
    }
    tap.send(Capture::Fin {
        flow,
        seq: seq(data.len()),
    })
    .await
    .unwrap();
    // Announced with its first data, not with its SYN.
    let Some(session_event::Kind::Connection(announced)) = next(&mut session.events).await else {
        panic!("no connection event");
    };
    assert_eq!(announced.source, "198.18.0.1:40000");

    let mut connection = harness.attach(&session, announced.connection_id).await;
    let (received, eof) = connection.receive(data.len() + 1).await;
    assert_eq!(received, data);
    assert!(eof, "the FIN ends the copy");
}

/// A client with a small HTTP/2 window, so that the session events it does
/// not read back up to the agent after a thousand or so instead of tens of
/// thousands.
async fn stingy_client(harness: &mut Harness) {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    setrlimit(Resource::RLIMIT_NOFILE, hard, hard).unwrap();
    let channel = tonic::transport::Endpoint::from_shared(harness.url())
        .unwrap()
        .initial_stream_window_size(Some(16 * 1024))
        .connect()
        .await
        .unwrap();
    harness.client = AgentClient::new(channel);
}

/// Polls until `done` says so; panics with `failure` after 10 s.
async fn until(failure: &str, done: impl Fn() -> bool) {
    for _ in 0..500 {
        if done() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("{failure}");
}

/// A client that stops reading its session's events fills the agent's
/// queue of announcements; the agent then stops accepting (the kernel's
/// backlog holds the rest), but closing the session still works.
#[tokio::test]
async fn a_client_that_stops_reading_events_cannot_keep_its_steal_alive() {
    let mut harness = Harness::start().await;
    stingy_client(&mut harness).await;
    let session = harness.open(80).await.unwrap();
    let mut remotes = Vec::new();
    // Until the agent stops accepting and the backlog is full.
    while let Ok(Ok(remote)) = tokio::time::timeout(
        Duration::from_millis(500),
        TcpStream::connect(session.listener),
    )
    .await
    {
        remotes.push(remote);
        assert!(remotes.len() < 20_000, "the agent never stopped accepting");
    }
    assert!(
        remotes.len() > 1024,
        "the event queue filled up: {}",
        remotes.len()
    );
    session.close().await;
    until(
        "the steal outlived its close while its client read no events",
        || harness.active.lock().unwrap().is_empty(),
    )
    .await;
}

/// The same for a mirror, whose copies are announced as their first data
/// arrives.
#[tokio::test]
async fn a_client_that_stops_reading_events_cannot_keep_its_mirror_alive() {
    let mut harness = Harness::start().await;
    stingy_client(&mut harness).await;
    let session = harness
        .open_mode(Some(harness.netns.target()), 80, Mode::Mirror)
        .await
        .unwrap();
    let tap = harness.taps.lock().unwrap().last().unwrap().clone();
    for port in 0..3000u16 {
        let flow = Flow {
            source: SocketAddr::from(([198, 18, 0, 1], 10_000 + port)),
            destination: "198.18.0.2:80".parse().unwrap(),
        };
        // An agent stuck on the unread events stops taking captures too.
        let sent = tokio::time::timeout(Duration::from_secs(1), connect_and_send(&tap, flow));
        if sent.await.is_err() {
            break;
        }
    }
    session.close().await;
    until(
        "the mirror outlived its close while its client read no events",
        || tap.is_closed(),
    )
    .await;
}

/// A steal on the harness's namespace, port 80, that asks to reset the
/// pod's existing connections.
fn resetting(harness: &Harness, mode: Mode, deadline_ms: u32) -> OpenSession {
    OpenSession {
        target: Some(harness.netns.target()),
        port: 80,
        mode: mode as i32,
        client: "tester@laptop".into(),
        filter: None,
        reset_existing: Some(remocal_proto::v1::ResetExisting { deadline_ms }),
    }
}

#[tokio::test]
async fn a_reset_reports_what_it_ended_in_ready() {
    let mut harness = Harness::start_with(LoopbackRedirector {
        pod_connections: Some(3),
        ..LoopbackRedirector::default()
    })
    .await;
    let open = resetting(&harness, Mode::Steal, 0);
    let (_session, ready) = harness.open_request(open).await.unwrap();
    let reset = ready.reset.expect("a reset was asked for");
    assert_eq!((reset.ended, reset.waiting, reset.done), (3, 0, true));
}

#[tokio::test]
async fn without_a_reset_the_pods_own_connections_are_named_in_a_warning() {
    let mut harness = Harness::start_with(LoopbackRedirector {
        pod_connections: Some(2),
        ..LoopbackRedirector::default()
    })
    .await;
    let mut session = harness.open(80).await.unwrap();
    let Some(session_event::Kind::Warning(warning)) = next(&mut session.events).await else {
        panic!("a warning after ready");
    };
    assert!(
        warning
            .message
            .starts_with("2 connections to port 80 opened before this steal")
            && warning.message.contains("--reset-existing"),
        "{}",
        warning.message
    );
}

#[tokio::test]
async fn a_reset_the_kernel_cannot_do_is_refused_before_anything_is_redirected() {
    // The loopback redirector's default stands for a kernel without
    // CONFIG_INET_DIAG_DESTROY.
    let mut harness = Harness::start().await;
    let open = resetting(&harness, Mode::Steal, 0);
    let err = harness.open_request(open).await.err().expect("refused");
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(
        err.message().contains("CONFIG_INET_DIAG_DESTROY")
            && err.message().contains("steal without it"),
        "{}",
        err.message()
    );
    assert!(
        harness.active.lock().unwrap().is_empty(),
        "nothing redirected"
    );
    // The same steal without the reset works: nothing was left claimed.
    harness.open(80).await.expect("a plain steal");
}

#[tokio::test]
async fn a_reset_on_a_mirror_or_with_a_deadline_too_long_is_refused() {
    let mut harness = Harness::start_with(LoopbackRedirector {
        pod_connections: Some(1),
        ..LoopbackRedirector::default()
    })
    .await;
    let open = resetting(&harness, Mode::Mirror, 0);
    let err = harness.open_request(open).await.err().expect("refused");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("read-only"), "{}", err.message());
    let open = resetting(&harness, Mode::Steal, 121_000);
    let err = harness.open_request(open).await.err().expect("refused");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("at most 120 s"), "{}", err.message());
    assert!(
        harness.active.lock().unwrap().is_empty(),
        "nothing redirected"
    );
}
