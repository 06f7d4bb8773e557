//! A gRPC echo service, served by [`crate::http_servers`] and called with
//! tonic's own client: no code generation (the messages are written out with
//! prost's derive), so the tests need no `protoc` and no build script.
//!
//! `remocal.test.Echo/Unary` answers `NAME: TEXT dev=X-DEV peer=ADDR`;
//! `remocal.test.Echo/Chat` (bidirectional streaming) answers every message
//! the same way, as it arrives.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use futures::{Stream, StreamExt as _};
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tonic::codegen::http::uri::PathAndQuery;
use tonic::metadata::MetadataValue;
use tonic::transport::{Channel, Endpoint};
use tonic::{Status, Streaming};
use tonic_prost::ProstCodec;

use crate::http_servers::{Body, ConnectionInfo};
use crate::netns::Netns;

pub const UNARY: &str = "/remocal.test.Echo/Unary";
pub const CHAT: &str = "/remocal.test.Echo/Chat";

/// The one message both ways.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Note {
    #[prost(string, tag = "1")]
    pub text: String,
}

fn reply(info: ConnectionInfo, dev: &str, text: &str) -> Note {
    Note {
        text: format!("{}: {text} dev={dev} peer={}", info.name, info.peer),
    }
}

/// Serves one gRPC request of the echo service.
pub async fn serve(info: ConnectionInfo, request: Request<Incoming>) -> Response<Body> {
    let mut grpc = tonic::server::Grpc::new(ProstCodec::<Note, Note>::default());
    match request.uri().path() {
        UNARY => {
            let service = tower::service_fn(move |request: tonic::Request<Note>| {
                let dev = dev_of(request.metadata());
                async move {
                    Ok::<_, Status>(tonic::Response::new(reply(
                        info,
                        &dev,
                        &request.into_inner().text,
                    )))
                }
            });
            grpc.unary(service, request).await
        }
        CHAT => {
            let service = tower::service_fn(move |request: tonic::Request<Streaming<Note>>| {
                let dev = dev_of(request.metadata());
                let incoming = request.into_inner();
                let replies =
                    incoming.map(move |note| note.map(|note| reply(info, &dev, &note.text)));
                let replies: Pin<Box<dyn Stream<Item = Result<Note, Status>> + Send>> =
                    Box::pin(replies);
                async move { Ok::<_, Status>(tonic::Response::new(replies)) }
            });
            grpc.streaming(service, request).await
        }
        _ => Status::unimplemented("no such method").into_http(),
    }
}

fn dev_of(metadata: &tonic::metadata::MetadataMap) -> String {
    metadata
        .get("x-dev")
        .and_then(|value| value.to_str().ok())
        .unwrap_or("-")
        .to_string()
}

/// A tonic client on one HTTP/2 connection opened from `netns` to `addr`.
#[derive(Clone)]
pub struct EchoClient {
    grpc: tonic::client::Grpc<Channel>,
    connections: Arc<AtomicUsize>,
    locals: Arc<std::sync::Mutex<Vec<SocketAddr>>>,
}

impl EchoClient {
    /// Connects at once. The channel would reconnect after losing its
    /// connection; [`EchoClient::connections`] tells how often it connected.
    pub async fn connect(
        netns: &Netns,
        addr: SocketAddr,
    ) -> Result<EchoClient, tonic::transport::Error> {
        // Sockets are made in the namespace up front: the connector runs on
        // tokio's threads, which are in the host's namespace.
        let sockets = Arc::new(std::sync::Mutex::new(netns.tcp_sockets(4, addr.is_ipv6())));
        let connections = Arc::new(AtomicUsize::new(0));
        let locals = Arc::new(std::sync::Mutex::new(Vec::new()));
        let (counter, seen) = (connections.clone(), locals.clone());
        let connector = tower::service_fn(move |_uri| {
            let socket = sockets.lock().unwrap().pop();
            counter.fetch_add(1, Ordering::SeqCst);
            let seen = seen.clone();
            async move {
                let socket = socket.ok_or_else(|| std::io::Error::other("no more test sockets"))?;
                let stream = socket.connect(addr).await?;
                // As tonic's own connector does: a call's HEADERS and DATA
                // frames must not wait for each other's acknowledgement.
                stream.set_nodelay(true)?;
                seen.lock().unwrap().push(stream.local_addr()?);
                Ok::<_, std::io::Error>(TokioIo::new(stream))
            }
        });
        let channel = Endpoint::from_shared(format!("http://{addr}"))
            .expect("a valid URI")
            .connect_with_connector(connector)
            .await?;
        Ok(EchoClient {
            grpc: tonic::client::Grpc::new(channel),
            connections,
            locals,
        })
    }

    /// The client's own address on each connection it opened, in order.
    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        self.locals.lock().unwrap().clone()
    }

    /// How many TCP connections the channel opened so far.
    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }

    /// One unary call, with `x-dev: DEV` metadata when given.
    pub async fn unary(&mut self, dev: Option<&str>, text: &str) -> Result<String, Status> {
        let mut request = tonic::Request::new(Note { text: text.into() });
        with_dev(&mut request, dev);
        self.grpc
            .ready()
            .await
            .map_err(|err| Status::unavailable(err.to_string()))?;
        let response = self
            .grpc
            .unary(
                request,
                PathAndQuery::from_static(UNARY),
                ProstCodec::<Note, Note>::default(),
            )
            .await?;
        Ok(response.into_inner().text)
    }

    /// One bidirectional streaming call: sends `texts` one at a time, each
    /// after the answer to the previous one arrived, and returns the answers.
    pub async fn chat(&mut self, dev: Option<&str>, texts: &[&str]) -> Result<Vec<String>, Status> {
        let (sender, receiver) = tokio::sync::mpsc::channel::<Note>(1);
        let mut request =
            tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(receiver));
        with_dev(&mut request, dev);
        self.grpc
            .ready()
            .await
            .map_err(|err| Status::unavailable(err.to_string()))?;
        let mut first = texts.iter();
        if let Some(text) = first.next() {
            sender
                .send(Note {
                    text: text.to_string(),
                })
                .await
                .expect("the request stream is open");
        }
        let response = self
            .grpc
            .streaming(
                request,
                PathAndQuery::from_static(CHAT),
                ProstCodec::<Note, Note>::default(),
            )
            .await?;
        let mut replies = response.into_inner();
        let mut answers = Vec::new();
        let mut rest = first;
        loop {
            match replies.message().await? {
                Some(note) => answers.push(note.text),
                None => break,
            }
            match rest.next() {
                Some(text) => {
                    if sender
                        .send(Note {
                            text: text.to_string(),
                        })
                        .await
                        .is_err()
                    {
                        return Err(Status::internal("request stream closed early"));
                    }
                }
                None => break,
            }
        }
        drop(sender);
        // The server ends its side once ours ended.
        while let Some(note) = replies.message().await? {
            answers.push(note.text);
        }
        Ok(answers)
    }
}

fn with_dev<T>(request: &mut tonic::Request<T>, dev: Option<&str>) {
    if let Some(dev) = dev {
        request.metadata_mut().insert(
            "x-dev",
            MetadataValue::try_from(dev).expect("a metadata value"),
        );
    }
}
