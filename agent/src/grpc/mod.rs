//! The `remocal.v1.Agent` gRPC service: thin glue from calls to sessions and
//! proxied connections, and from our errors to status codes a client can act on.
//! The `Connection` call, which carries the bytes, is framed by hand
//! ([`connection_call`]); the others go through tonic's generated service.
use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use remocal_proto::v1::{
    AgentInfo, ConnectionDownstream, ConnectionUpstream, InfoRequest, ListSessionsRequest,
    SessionEvent, SessionList, SessionRequest, agent_server, session_request,
};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{
    Request, Response, Status, Streaming,
    transport::{Server, server::TcpIncoming},
};

use crate::{
    auth::{AccessError, Auth, AuthLayer, Identity},
    kube::{PodLookupError, PodNetnsError},
    netns::TargetError,
    redirect::RedirectError,
    reset_existing::ResetError,
    session::{ListError, OpenError, Sessions},
};

mod connection_call;
pub use connection_call::Router;

/// How long a new call may take to send its first message.
const FIRST_MESSAGE_TIMEOUT: Duration = Duration::from_secs(10);
/// HTTP/2 pings find a vanished client (laptop closed, network gone) within
/// interval + timeout, well inside the 10 s users are promised.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(3);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(5);
/// Calls open at once on one client's HTTP/2 connection: one per stolen or
/// mirrored connection (and the waiting standby calls), so this caps what one
/// client can make the agent hold at about 16k × 2.4 KiB ≈ 40 MiB, above the
/// 10,000 connections the benchmark holds.
const MAX_STREAMS_PER_CONNECTION: u32 = 16 * 1024;

/// The server settings the data path relies on: per-stream windows small
/// enough that one stalled connection pins little, a connection window large
/// enough that stalled streams cannot starve the others, and no cap on
/// concurrent streams below what a busy session needs (nor above what the
/// agent's memory budget allows). Every call passes `auth` first.
pub fn server(auth: Arc<Auth>) -> Server<tower_layer::Stack<AuthLayer, tower_layer::Identity>> {
    Server::builder()
        .layer(AuthLayer(auth))
        .http2_keepalive_interval(Some(KEEPALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(KEEPALIVE_TIMEOUT))
        .initial_stream_window_size(Some(1 << 20))
        .initial_connection_window_size(Some(64 << 20))
        .max_concurrent_streams(Some(MAX_STREAMS_PER_CONNECTION))
        .max_frame_size(Some(remocal_proto::HTTP2_FRAME_SIZE))
}

/// The clients' connections, with Nagle off. The builder's `tcp_nodelay`
/// does not reach sockets of a listener handed in: with Nagle on, small
/// frames written back to back (a response's headers, then its first data)
/// waited for the client's delayed ACK, 40 ms, on every new connection.
pub fn incoming(listener: tokio::net::TcpListener) -> TcpIncoming {
    TcpIncoming::from(listener).with_nodelay(Some(true))
}

struct AgentService {
    sessions: Arc<Sessions>,
    started: Instant,
}

/// The service to add to [`server`].
pub fn service(sessions: Arc<Sessions>) -> Router {
    let generated = agent_server::AgentServer::new(AgentService {
        sessions: sessions.clone(),
        started: Instant::now(),
    })
    .max_decoding_message_size(remocal_proto::wire::MAX_CONTROL_MESSAGE);
    Router::new(generated, sessions)
}

#[tonic::async_trait]
impl agent_server::Agent for AgentService {
    type SessionStream = tokio_stream::adapters::Map<
        ReceiverStream<SessionEvent>,
        fn(SessionEvent) -> Result<SessionEvent, Status>,
    >;
    type ConnectionStream = tokio_stream::Empty<Result<ConnectionDownstream, Status>>;

    async fn session(
        &self,
        request: Request<Streaming<SessionRequest>>,
    ) -> Result<Response<Self::SessionStream>, Status> {
        let identity = caller(request.extensions())?;
        let mut requests = request.into_inner();
        let open = match first_message(requests.message()).await? {
            SessionRequest {
                kind: Some(session_request::Kind::Open(open)),
            } => open,
            _ => {
                return Err(Status::invalid_argument(
                    "the first message of a session must be `open`",
                ));
            }
        };
        let events = self
            .sessions
            .open(open, identity, requests)
            .await
            .map_err(|err| {
                let status = open_status(err);
                self.sessions.metrics().session_error(status.code());
                status
            })?;
        let ok: fn(SessionEvent) -> Result<SessionEvent, Status> = Ok;
        Ok(Response::new(tokio_stream::StreamExt::map(
            ReceiverStream::new(events),
            ok,
        )))
    }

    /// Never reached: [`Router`] serves this call before the generated
    /// service sees it.
    async fn connection(
        &self,
        _: Request<Streaming<ConnectionUpstream>>,
    ) -> Result<Response<Self::ConnectionStream>, Status> {
        Err(Status::internal(
            "the Connection call is served by the router",
        ))
    }

    async fn info(&self, _: Request<InfoRequest>) -> Result<Response<AgentInfo>, Status> {
        let pods = self.sessions.pods();
        Ok(Response::new(AgentInfo {
            version: env!("CARGO_PKG_VERSION").to_string(),
            node_name: pods.node().unwrap_or_default().to_string(),
            kernel: nix::sys::utsname::uname()
                .map(|uts| uts.release().to_string_lossy().into_owned())
                .unwrap_or_default(),
            active_sessions: u32::try_from(self.sessions.active()).unwrap_or(u32::MAX),
            kubernetes_api: pods.has_api_access(),
            uptime_seconds: self.started.elapsed().as_secs(),
        }))
    }

    async fn list_sessions(
        &self,
        request: Request<ListSessionsRequest>,
    ) -> Result<Response<SessionList>, Status> {
        let identity = caller(request.extensions())?;
        let namespace = request.into_inner().namespace;
        if !namespace.is_empty() && !crate::kube::is_object_name(&namespace) {
            return Err(Status::invalid_argument(format!(
                "{namespace:?} is not a namespace name: lowercase letters, digits, '-' and '.'"
            )));
        }
        let listed = self
            .sessions
            .list(&identity, &namespace)
            .await
            .map_err(|err| match err {
                ListError::Busy | ListError::AlreadyListing => {
                    Status::resource_exhausted(err.to_string())
                }
                ListError::Access(err) => Status::unavailable(err.to_string()),
            })?;
        Ok(Response::new(listed))
    }
}

async fn first_message<T>(
    next: impl Future<Output = Result<Option<T>, Status>>,
) -> Result<T, Status> {
    match tokio::time::timeout(FIRST_MESSAGE_TIMEOUT, next).await {
        Ok(Ok(Some(message))) => Ok(message),
        Ok(Ok(None)) => Err(Status::invalid_argument(
            "the call ended before its first message",
        )),
        Ok(Err(status)) => Err(status),
        Err(_) => Err(Status::deadline_exceeded(format!(
            "no first message within {FIRST_MESSAGE_TIMEOUT:?}"
        ))),
    }
}

/// The identity [`AuthLayer`] verified. A call without one never reaches a
/// service; refusing here too keeps it so if the layering ever changes.
pub(crate) fn caller(extensions: &http::Extensions) -> Result<Identity, Status> {
    extensions
        .get::<Identity>()
        .cloned()
        .ok_or_else(|| Status::unauthenticated("the call was not authenticated"))
}

fn open_status(err: OpenError) -> Status {
    let message = err.to_string();
    match err {
        OpenError::InvalidPort(_)
        | OpenError::MissingTarget
        | OpenError::UnsupportedMode(_)
        | OpenError::InvalidPodName(_)
        | OpenError::Filter(_)
        | OpenError::FilterOnMirror
        | OpenError::ResetOnMirror
        | OpenError::ResetDeadline(_) => Status::invalid_argument(message),
        OpenError::Reset(
            ResetError::Unsupported | ResetError::NotPermitted(_) | ResetError::NoIterator(_),
        ) => Status::failed_precondition(message),
        OpenError::Reset(_) => Status::internal(message),
        OpenError::Target(
            TargetError::NoSuchNamespace(_)
            | TargetError::NoSuchProcess(_)
            | TargetError::Pod(PodNetnsError::NotOnThisNode(_)),
        ) => Status::not_found(message),
        OpenError::Target(TargetError::NotANamespace(_)) => Status::invalid_argument(message),
        OpenError::Target(
            TargetError::HostNamespace(_) | TargetError::Pod(PodNetnsError::HostNetwork(_)),
        )
        | OpenError::Redirect(RedirectError::NoInterfaces { .. }) => {
            Status::failed_precondition(message)
        }
        OpenError::Target(TargetError::PermissionDenied { .. }) => {
            Status::permission_denied(message)
        }
        OpenError::Conflict { .. } | OpenError::SameFilter { .. } => {
            Status::already_exists(message)
        }
        OpenError::Access(AccessError::Denied { .. }) => Status::permission_denied(message),
        OpenError::Access(AccessError::Unavailable(_)) => Status::unavailable(message),
        OpenError::TooManySessions { .. } => Status::resource_exhausted(message),
        OpenError::Target(TargetError::UnsupportedPath(_)) => Status::invalid_argument(message),
        OpenError::Target(TargetError::Timeout(_)) => Status::deadline_exceeded(message),
        OpenError::Target(TargetError::Io { .. }) | OpenError::Redirect(_) => {
            Status::internal(message)
        }
        OpenError::Pod(PodLookupError::NotFound { .. }) => Status::not_found(message),
        OpenError::Pod(PodLookupError::Forbidden { .. }) => Status::permission_denied(message),
        OpenError::Pod(PodLookupError::Api { .. }) => Status::unavailable(message),
        OpenError::Pod(
            PodLookupError::NoApiAccess
            | PodLookupError::NoNodeName
            | PodLookupError::NotScheduled { .. }
            | PodLookupError::OtherNode { .. }
            | PodLookupError::NotRunning { .. }
            | PodLookupError::HostNetwork { .. },
        ) => Status::failed_precondition(message),
    }
}
