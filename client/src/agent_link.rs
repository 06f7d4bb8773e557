//! The one HTTP/2 connection to the agent that carries the session and every
//! stolen connection: straight to a URL, or through the Kubernetes
//! port-forward API. Keepalive pings notice a dead agent or network the same
//! way the agent notices a dead client.
use std::{
    fmt,
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use futures::Stream;
use http::{
    HeaderValue, Method,
    header::{AUTHORIZATION, CONTENT_TYPE, TE},
};
use remocal_proto::{
    v1::{ConnectionDownstream, agent_client::AgentClient},
    wire::{self, FrameBody, Messages},
};
use tonic::{
    Code,
    body::Body,
    codegen::BoxFuture,
    transport::{Channel, Endpoint, Uri},
};
use tower::{BoxError, Service, ServiceExt as _};

use crate::{
    cluster::PortForward,
    credentials::Credentials,
    exit::{Failure, Status, root_cause},
};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(3);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(5);

/// The agent's calls: the generated client, and under it the channel for
/// the `Connection` call, which is made by hand so that a connection's bytes
/// are not copied on their way (see [`remocal_proto::wire`]).
#[derive(Clone)]
pub struct Agent {
    pub api: AgentClient<Authenticated>,
    channel: Authenticated,
}

/// The channel to the agent, with our credential on every call.
#[derive(Clone)]
pub struct Authenticated {
    channel: Channel,
    credentials: Credentials,
}

impl Service<http::Request<Body>> for Authenticated {
    type Response = http::Response<Body>;
    type Error = BoxError;
    type Future = BoxFuture<Self::Response, Self::Error>;

    /// Always ready: the channel's own readiness (a slot in its request
    /// buffer) is awaited in the call, after the credential is ready, so a
    /// call never holds a slot while the credential may need a call of its
    /// own (a certificate user's new challenge).
    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut request: http::Request<Body>) -> Self::Future {
        let mut channel = self.channel.clone();
        let credentials = self.credentials.clone();
        Box::pin(async move {
            if let Some(header) = credentials.header(&channel).await? {
                request.headers_mut().insert(AUTHORIZATION, header);
            }
            channel
                .ready()
                .await?
                .call(request)
                .await
                .map_err(Into::into)
        })
    }
}

impl Agent {
    /// Opens a connection's call; `messages` are its encoded messages.
    pub async fn connection(
        &mut self,
        messages: impl Stream<Item = Result<Bytes, tonic::Status>> + Unpin + Send + 'static,
    ) -> Result<Messages<ConnectionDownstream>, tonic::Status> {
        let mut request = http::Request::new(Body::new(FrameBody::client(messages)));
        *request.method_mut() = Method::POST;
        *request.uri_mut() = Uri::from_static(wire::CONNECTION_PATH);
        let headers = request.headers_mut();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
        headers.insert(TE, HeaderValue::from_static("trailers"));
        let response = self
            .channel
            .ready()
            .await
            .map_err(tonic::Status::from_error)?
            .call(request)
            .await
            .map_err(tonic::Status::from_error)?;
        let (head, body) = response.into_parts();
        // A call refused at once answers with its status in the headers.
        let status = tonic::Status::from_header_map(&head.headers);
        if let Some(status) = &status
            && status.code() != Code::Ok
        {
            return Err(status.clone());
        }
        if !head.status.is_success() {
            return Err(http_failure(head.status));
        }
        Ok(Messages::response(body, status.is_some()))
    }
}

/// What an HTTP status instead of a gRPC answer means, as gRPC clients read
/// it: a proxy or gateway in between that could not reach the agent is
/// worth retrying, a path it does not know is not.
fn http_failure(status: http::StatusCode) -> tonic::Status {
    use http::StatusCode as Http;
    let message = format!("the agent's address answered HTTP {status}, not gRPC");
    match status {
        Http::BAD_REQUEST => tonic::Status::internal(message),
        Http::UNAUTHORIZED => tonic::Status::unauthenticated(message),
        Http::FORBIDDEN => tonic::Status::permission_denied(message),
        Http::NOT_FOUND => tonic::Status::unimplemented(message),
        Http::TOO_MANY_REQUESTS
        | Http::BAD_GATEWAY
        | Http::SERVICE_UNAVAILABLE
        | Http::GATEWAY_TIMEOUT => tonic::Status::unavailable(message),
        _ => tonic::Status::unknown(message),
    }
}

/// Where the agent is.
#[derive(Clone)]
pub enum AgentAddress {
    Url(String),
    PortForward(Box<PortForward>),
}

impl fmt::Display for AgentAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AgentAddress::Url(url) => write!(f, "the remocal agent at {url}"),
            AgentAddress::PortForward(forward) => f.write_str(&forward.describe()),
        }
    }
}

impl AgentAddress {
    pub fn url(url: &str) -> Self {
        if url.contains("://") {
            Self::Url(url.to_string())
        } else {
            Self::Url(format!("http://{url}"))
        }
    }

    /// Connects, and gets our credential ready (a failing exec plugin, say,
    /// is reported here rather than on the first stolen connection).
    pub async fn connect(&self, credentials: &Credentials) -> Result<Agent, Failure> {
        let connected = match self {
            AgentAddress::Url(url) => {
                refuse_clear_text(url, credentials)?;
                endpoint(url)?.connect().await
            }
            AgentAddress::PortForward(forward) => {
                let forward = PortForward::clone(forward);
                let connector = tower::service_fn(move |_: Uri| {
                    let forward = forward.clone();
                    async move { forward.open().await }
                });
                endpoint("http://remocal-agent")?
                    .connect_with_connector(connector)
                    .await
            }
        };
        match connected {
            Ok(channel) => {
                credentials.header(&channel).await.map_err(|message| {
                    Failure::new(
                        Status::PermissionDenied,
                        format!("{message}; check `kubectl auth whoami`"),
                    )
                })?;
                let channel = Authenticated {
                    channel,
                    credentials: credentials.clone(),
                };
                Ok(Agent {
                    api: AgentClient::new(channel.clone())
                        .max_decoding_message_size(wire::MAX_CONTROL_MESSAGE),
                    channel,
                })
            }
            Err(err) => Err(match self.explain().await {
                Some(failure) => failure,
                None => Failure::new(
                    Status::AgentUnreachable,
                    format!(
                        "cannot reach {self} ({}): {}",
                        root_cause(&err),
                        self.remedy()
                    ),
                ),
            }),
        }
    }

    /// Why the link failed, when the port-forward knows better than tonic.
    pub async fn explain(&self) -> Option<Failure> {
        match self {
            AgentAddress::Url(_) => None,
            AgentAddress::PortForward(forward) => forward.explain().await,
        }
    }

    /// What a failed call means when it is not the agent's own answer: the
    /// agent did not know who we are (and what we sent), or the link broke
    /// (the port-forward may say why).
    pub async fn call_failure(
        &self,
        status: &tonic::Status,
        credentials: &Credentials,
    ) -> Option<Failure> {
        match status.code() {
            Code::Unauthenticated => Some(Failure::new(
                Status::PermissionDenied,
                format!(
                    "{self} does not know who you are: {} (remocal sent {})",
                    status.message(),
                    credentials.describe()
                ),
            )),
            // A forwarded stream that dies mid-call surfaces as Cancelled.
            Code::Unavailable | Code::Unknown | Code::Cancelled => self.explain().await,
            _ => None,
        }
    }

    fn remedy(&self) -> &'static str {
        match self {
            AgentAddress::Url(_) => {
                "start it on the node (as root: `remocal-agent`), or point --agent at a running one"
            }
            AgentAddress::PortForward(_) => {
                "check the agent pod (`kubectl -n remocal get pods -o wide`) and its logs"
            }
        }
    }
}

/// A token sent over plain HTTP to another machine could be read on the
/// way and replayed against the API server: only to this machine's
/// loopback (a port-forward, or an agent on this node), or over HTTPS.
fn refuse_clear_text(url: &str, credentials: &Credentials) -> Result<(), Failure> {
    let Ok(uri) = url.parse::<Uri>() else {
        return Ok(()); // `endpoint` explains a malformed URL
    };
    let host = uri.host().unwrap_or_default().trim_matches(['[', ']']);
    let local = host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    if credentials.is_replayable() && uri.scheme_str() == Some("http") && !local {
        return Err(Failure::new(
            Status::Usage,
            format!(
                "--agent {url} is plain HTTP to another machine, and remocal would send your token over it: reach the agent through the cluster (leave out --agent) or on this machine's loopback"
            ),
        ));
    }
    Ok(())
}

fn endpoint(url: &str) -> Result<Endpoint, Failure> {
    let endpoint = Endpoint::from_shared(url.to_string()).map_err(|_| {
        Failure::new(
            Status::Usage,
            format!("--agent {url} is not a valid URL: use http://HOST:PORT"),
        )
    })?;
    Ok(endpoint
        .connect_timeout(CONNECT_TIMEOUT)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
        .keep_alive_timeout(KEEPALIVE_TIMEOUT)
        .keep_alive_while_idle(true)
        .initial_stream_window_size(1 << 20)
        .initial_connection_window_size(64 << 20)
        .max_frame_size(remocal_proto::HTTP2_FRAME_SIZE))
}

#[cfg(test)]
mod tests;
