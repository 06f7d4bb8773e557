//! The `Connection` call, served without tonic's codec so that a
//! connection's bytes are not copied on their way (see
//! [`remocal_proto::wire`]). Every other call goes to the generated service.
use std::{convert::Infallible, pin::Pin, sync::Arc};

use bytes::Bytes;
use futures::{StreamExt as _, stream};
use http::{HeaderValue, header::CONTENT_TYPE};
use remocal_proto::{
    v1::{
        ConnectionDownstream, ConnectionUpstream, agent_server::AgentServer, connection_downstream,
        connection_upstream,
    },
    wire::{self, FrameBody, Messages},
};
use tokio::sync::oneshot;
use tokio_stream::{Stream, wrappers::ReceiverStream};
use tonic::{
    Status,
    body::Body,
    codegen::{BoxFuture, Service},
    server::NamedService,
};

use super::{AgentService, caller, first_message};
use crate::{
    auth::Identity,
    live_session::{CopyCut, CutKind, Handoff, LiveSession, Pending, StandbyRefused},
    proxy,
    session::{AttachError, Sessions},
};

/// A connection's outgoing messages, encoded: a stolen connection's socket
/// reader or a mirrored connection's queue.
type Frames = Pin<Box<dyn Stream<Item = Result<Bytes, Status>> + Send + 'static>>;

/// The agent's gRPC service: `Connection` here, the rest generated.
#[derive(Clone)]
pub struct Router {
    generated: AgentServer<AgentService>,
    sessions: Arc<Sessions>,
}

impl Router {
    pub(super) fn new(generated: AgentServer<AgentService>, sessions: Arc<Sessions>) -> Self {
        Self {
            generated,
            sessions,
        }
    }
}

impl NamedService for Router {
    const NAME: &'static str = <AgentServer<AgentService> as NamedService>::NAME;
}

impl Service<http::Request<Body>> for Router {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Infallible>;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Infallible>> {
        Service::<http::Request<Body>>::poll_ready(&mut self.generated, cx)
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        if request.uri().path() != wire::CONNECTION_PATH {
            return self.generated.call(request);
        }
        let sessions = self.sessions.clone();
        let identity = caller(request.extensions());
        Box::pin(async move {
            let upstream = Messages::request(request.into_body());
            let carried = match identity {
                Ok(identity) => connection(&sessions, &identity, upstream).await,
                Err(status) => Err(status),
            };
            Ok(match carried {
                Ok(frames) => {
                    let mut response = http::Response::new(Body::new(FrameBody::server(frames)));
                    response
                        .headers_mut()
                        .insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
                    response
                }
                Err(status) => status.into_http(),
            })
        })
    }
}

async fn connection(
    sessions: &Sessions,
    identity: &Identity,
    mut upstream: Messages<ConnectionUpstream>,
) -> Result<Frames, Status> {
    Ok(match first_message(upstream.message()).await?.kind {
        Some(connection_upstream::Kind::Attach(attach)) => {
            let (pending, live) = sessions
                .attach(identity, &attach.session_id, attach.connection_id)
                .map_err(attach_status)?;
            carry(attach.connection_id, pending, upstream, live)
        }
        Some(connection_upstream::Kind::Standby(standby)) => {
            let (handoff, live) = sessions
                .stand_by(identity, &standby.session_id)
                .map_err(attach_status)?;
            stand_by(handoff, upstream, live)
        }
        _ => {
            return Err(Status::invalid_argument(
                "the first message of a connection must be `attach` or `standby`",
            ));
        }
    })
}

/// The data call of one connection, from the bytes the agent holds for it.
fn carry(
    id: u64,
    pending: Pending,
    mut upstream: Messages<ConnectionUpstream>,
    live: Arc<LiveSession>,
) -> Frames {
    match pending {
        Pending::Stolen(stream) => {
            let (reader, pipe) = proxy::start(stream, upstream, live.ended(), move |outcome| {
                live.connection_closed(id, outcome);
            });
            tokio::spawn(pipe);
            Box::pin(reader)
        }
        Pending::Routed(pipe) => {
            let (reader, pipe) = proxy::start(pipe, upstream, live.ended(), move |outcome| {
                live.connection_closed(id, outcome);
            });
            tokio::spawn(pipe);
            Box::pin(reader)
        }
        Pending::Mirrored(receiver) => {
            // A copy is read-only: whatever the client sends is drained so
            // the call's flow control never stalls. A reset says nothing
            // answers locally: the copy ends, and its queue with it.
            let (refused, refusal) = oneshot::channel();
            tokio::spawn(async move {
                let mut refused = Some(refused);
                while let Ok(Some(message)) = upstream.message().await {
                    if let Some(connection_upstream::Kind::Reset(_)) = message.kind
                        && let Some(refused) = refused.take()
                    {
                        let _ = refused.send(());
                    }
                }
            });
            let refusal = async {
                if refusal.await.is_err() {
                    // The client finished its side without refusing.
                    std::future::pending::<()>().await;
                }
            };
            let copy = ReceiverStream::new(receiver).map(|copied| copied.map_err(copy_status));
            Box::pin(encoded(copy.take_until(refusal)))
        }
    }
}

/// Messages as the pieces HTTP/2 sends; an error ends the call.
fn encoded(
    messages: impl Stream<Item = Result<ConnectionDownstream, Status>>,
) -> impl Stream<Item = Result<Bytes, Status>> {
    messages.flat_map(|message| {
        let (frames, failure) = match message {
            Ok(message) => (Some(wire::frames(message)), None),
            Err(status) => (None, Some(Err(status))),
        };
        stream::iter(frames.into_iter().flatten().map(Ok).chain(failure))
    })
}

/// A standby call answers at once and stays silent until the session hands
/// it a connection: its first message then says which, and the connection's
/// bytes follow. It ends without a message when the session ends first.
fn stand_by(
    handoff: oneshot::Receiver<Handoff>,
    upstream: Messages<ConnectionUpstream>,
    live: Arc<LiveSession>,
) -> Frames {
    let downstream = stream::once(async move {
        let Ok(Handoff {
            id,
            pending,
            connection,
        }) = handoff.await
        else {
            return stream::empty().boxed();
        };
        let first = wire::encode(&ConnectionDownstream {
            kind: Some(connection_downstream::Kind::Connection(connection)),
        });
        stream::once(std::future::ready(Ok(first)))
            .chain(carry(id, pending, upstream, live))
            .boxed()
    })
    .flatten();
    Box::pin(downstream)
}

/// A mirrored copy's end, as its data call ends.
fn copy_status(cut: CopyCut) -> Status {
    let code = match cut.kind {
        CutKind::DataLoss => tonic::Code::DataLoss,
        CutKind::ResourceExhausted => tonic::Code::ResourceExhausted,
        CutKind::Aborted => tonic::Code::Aborted,
        CutKind::Unavailable => tonic::Code::Unavailable,
        CutKind::DeadlineExceeded => tonic::Code::DeadlineExceeded,
    };
    Status::new(code, cut.message)
}

fn attach_status(err: AttachError) -> Status {
    match err {
        AttachError::Standby {
            refused: StandbyRefused::TooMany,
            ..
        } => Status::resource_exhausted(err.to_string()),
        _ => Status::not_found(err.to_string()),
    }
}
