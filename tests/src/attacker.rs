//! The agent's gRPC API called directly, from the project's proto, as an
//! attacker (or any other program) would call it: no `remocal` CLI in
//! between to be polite. Each call carries the `authorization` header given,
//! or none.

use std::time::Duration;

use remocal_proto::v1::{
    AgentInfo, Attach, ConnectionDownstream, ConnectionUpstream, HttpFilter, InfoRequest,
    ListSessionsRequest, Mode, OpenSession, PodRef, Ready, SessionEvent, SessionList,
    SessionRequest, Standby, Target, agent_client::AgentClient, connection_upstream, session_event,
    session_request, target,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::metadata::MetadataValue;
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tonic::{Request, Status, Streaming};

/// How long any single call may take before the test calls it hung.
const CALL_LIMIT: Duration = Duration::from_secs(15);

#[derive(Clone)]
pub struct Credential(Option<String>);

impl Interceptor for Credential {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        if let Some(value) = &self.0 {
            let value = MetadataValue::try_from(value.as_str())
                .map_err(|_| Status::internal("test credential is not a header value"))?;
            request.metadata_mut().insert("authorization", value);
        }
        Ok(request)
    }
}

pub struct RawAgent {
    client: AgentClient<InterceptedService<Channel, Credential>>,
}

/// A session opened by hand: its `ready`, its events, and its requests.
#[derive(Debug)]
pub struct RawSession {
    pub ready: Ready,
    pub events: Streaming<SessionEvent>,
    pub requests: mpsc::Sender<SessionRequest>,
}

impl RawAgent {
    /// `authorization`: the whole header value (`Bearer TOKEN`), or none.
    pub async fn connect(url: &str, authorization: Option<&str>) -> RawAgent {
        let channel = Channel::from_shared(url.to_string())
            .expect("agent URL")
            .connect()
            .await
            .unwrap_or_else(|err| panic!("connect to the agent at {url}: {err}"));
        RawAgent {
            client: AgentClient::with_interceptor(
                channel,
                Credential(authorization.map(str::to_string)),
            ),
        }
    }

    /// With `Authorization: Bearer TOKEN`.
    pub async fn with_token(url: &str, token: &str) -> RawAgent {
        RawAgent::connect(url, Some(&format!("Bearer {token}"))).await
    }

    pub async fn info(&self) -> Result<AgentInfo, Status> {
        let mut client = self.client.clone();
        limited(client.info(InfoRequest {}))
            .await
            .map(tonic::Response::into_inner)
    }

    pub async fn list_sessions(&self, namespace: &str) -> Result<SessionList, Status> {
        let mut client = self.client.clone();
        limited(client.list_sessions(ListSessionsRequest {
            namespace: namespace.to_string(),
        }))
        .await
        .map(tonic::Response::into_inner)
    }

    pub async fn open(&self, target: Target, port: u16, mode: Mode) -> Result<RawSession, Status> {
        self.open_with(target, port, mode, None).await
    }

    /// A filtered steal of the requests `filter` matches.
    pub async fn open_filtered(
        &self,
        target: Target,
        port: u16,
        filter: HttpFilter,
    ) -> Result<RawSession, Status> {
        self.open_with(target, port, Mode::Steal, Some(filter))
            .await
    }

    async fn open_with(
        &self,
        target: Target,
        port: u16,
        mode: Mode,
        filter: Option<HttpFilter>,
    ) -> Result<RawSession, Status> {
        let (requests, outgoing) = mpsc::channel(16);
        requests
            .send(SessionRequest {
                kind: Some(session_request::Kind::Open(OpenSession {
                    target: Some(target),
                    port: port.into(),
                    mode: mode as i32,
                    client: "attacker@nowhere".into(),
                    filter,
                    reset_existing: None,
                })),
            })
            .await
            .expect("queue the open request");
        let mut client = self.client.clone();
        let mut events = limited(client.session(ReceiverStream::new(outgoing)))
            .await?
            .into_inner();
        let first = limited(events.message()).await?;
        match first.and_then(|event| event.kind) {
            Some(session_event::Kind::Ready(ready)) => Ok(RawSession {
                ready,
                events,
                requests,
            }),
            other => panic!("expected `ready` as a session's first event, got {other:?}"),
        }
    }

    /// A `Connection` call whose first message is `standby` for `session_id`.
    pub async fn standby(
        &self,
        session_id: &str,
    ) -> Result<Streaming<ConnectionDownstream>, Status> {
        self.connection(connection_upstream::Kind::Standby(Standby {
            session_id: session_id.to_string(),
        }))
        .await
    }

    /// A standby call whose later messages the caller sends itself (data
    /// for the connection it will carry).
    pub async fn standby_with_data(
        &self,
        session_id: &str,
    ) -> Result<
        (
            mpsc::Sender<ConnectionUpstream>,
            Streaming<ConnectionDownstream>,
        ),
        Status,
    > {
        let (upstream, outgoing) = mpsc::channel(4);
        upstream
            .send(ConnectionUpstream {
                kind: Some(connection_upstream::Kind::Standby(Standby {
                    session_id: session_id.to_string(),
                })),
            })
            .await
            .expect("queue the standby message");
        let mut client = self.client.clone();
        let downstream = limited(client.connection(ReceiverStream::new(outgoing)))
            .await?
            .into_inner();
        Ok((upstream, downstream))
    }

    /// A `Connection` call whose first message is `attach`.
    pub async fn attach(
        &self,
        session_id: &str,
        connection_id: u64,
    ) -> Result<Streaming<ConnectionDownstream>, Status> {
        self.connection(connection_upstream::Kind::Attach(Attach {
            session_id: session_id.to_string(),
            connection_id,
        }))
        .await
    }

    async fn connection(
        &self,
        first: connection_upstream::Kind,
    ) -> Result<Streaming<ConnectionDownstream>, Status> {
        let upstream =
            futures::stream::once(async move { ConnectionUpstream { kind: Some(first) } })
                .chain(futures::stream::pending());
        let mut client = self.client.clone();
        limited(client.connection(upstream))
            .await
            .map(tonic::Response::into_inner)
    }
}

use futures::StreamExt as _;

async fn limited<T>(call: impl Future<Output = Result<T, Status>>) -> Result<T, Status> {
    tokio::time::timeout(CALL_LIMIT, call)
        .await
        .unwrap_or_else(|_| panic!("an agent call took more than {CALL_LIMIT:?}"))
}

pub fn pod(namespace: &str, name: &str) -> Target {
    Target {
        kind: Some(target::Kind::Pod(PodRef {
            namespace: namespace.into(),
            name: name.into(),
        })),
    }
}

pub fn netns(path: &str) -> Target {
    Target {
        kind: Some(target::Kind::NetnsPath(path.into())),
    }
}
