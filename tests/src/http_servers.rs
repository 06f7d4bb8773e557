//! HTTP servers that say who answered: the pod's own server and the developers'
//! local processes of the filtered-steal tests.
//!
//! Every answer names its server and what the server saw of the request and of
//! its TCP connection (peer and local address), so a test can tell from the
//! bytes a client received which side served it and whether the pod saw the
//! remote client's real address. One server speaks HTTP/1.1 (keep-alive,
//! pipelining, chunked bodies, `Expect: 100-continue`), h2c with prior
//! knowledge, gRPC ([`crate::grpc_echo`]) and WebSocket (an echo), like an
//! ordinary application server would, through hyper.
//!
//! Requests:
//! - any method, any path: the answer line; a request body is read to its end
//!   and counted, and checked byte for byte against [`Pattern`] when the request
//!   carries `x-seed: N`;
//! - `GET /download?bytes=N&seed=S`: N bytes of `Pattern::new(S)`;
//! - `/slow?ms=N`: the answer line, N milliseconds after the request was
//!   read (a server busy with one request on a keep-alive connection);
//! - `GET` with `Upgrade: websocket`: a WebSocket answering each text message
//!   `NAME: TEXT` and echoing binary messages;
//! - `content-type: application/grpc...`: the echo service of [`crate::grpc_echo`].

use std::convert::Infallible;
use std::fmt;
use std::net::SocketAddr;

use bytes::Bytes;
use futures::{SinkExt as _, StreamExt as _};
use http_body_util::{BodyExt as _, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::header::{self, HeaderValue};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpStream;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role;

use crate::data::Pattern;
use crate::grpc_echo;
use crate::netns::Netns;
use crate::servers::TcpServer;

/// The header the answers name their server in (also on streamed and gRPC answers).
pub const SERVED_BY: &str = "x-served-by";
/// The header carrying the TCP peer the server saw.
pub const PEER: &str = "x-peer";

/// An HTTP server that names itself in every answer. Dropping it stops it.
pub struct HttpServer {
    pub name: &'static str,
    pub server: TcpServer,
}

impl HttpServer {
    /// A developer's local process: loopback of the host namespace, free port.
    pub fn local(name: &'static str) -> HttpServer {
        HttpServer {
            name,
            server: TcpServer::local(move |stream| serve_connection(name, stream)),
        }
    }

    /// The pod's own server: every address of the pod (IPv4 and IPv6) on `port`.
    pub fn in_netns(netns: &Netns, port: u16, name: &'static str) -> HttpServer {
        HttpServer {
            name,
            server: TcpServer::in_netns(netns, port, move |stream| serve_connection(name, stream)),
        }
    }

    /// A server inside `netns` listening only on `addr` (say, the pod's own
    /// address, not loopback).
    pub fn in_netns_at(netns: &Netns, addr: SocketAddr, name: &'static str) -> HttpServer {
        HttpServer {
            name,
            server: TcpServer::serve(netns.listen(addr), move |stream| {
                serve_connection(name, stream)
            }),
        }
    }

    pub fn port(&self) -> u16 {
        self.server.port()
    }

    /// Connections the server accepted so far.
    pub fn accepted(&self) -> usize {
        self.server.accepted()
    }
}

/// What one answer says: which server, and what it saw.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Answer {
    pub by: String,
    /// `HTTP/1.1` or `HTTP/2.0`, as the server received the request.
    pub version: String,
    pub method: String,
    pub path: String,
    /// The TCP peer of the server's connection.
    pub peer: SocketAddr,
    /// The server's own address on that connection.
    pub local: SocketAddr,
    /// The `x-dev` header the request arrived with, `-` when none.
    pub dev: String,
    /// The `Forwarded` header the request arrived with, `-` when none.
    pub forwarded: String,
    /// Bytes of request body received.
    pub received: u64,
    /// With `x-seed`: whether the body was exactly the pattern; `None` without.
    pub exact: Option<bool>,
}

impl Answer {
    /// Parses one answer line; `None` when `line` is not one.
    pub fn parse(line: &str) -> Option<Answer> {
        let mut fields = std::collections::HashMap::new();
        for part in line.trim().split(' ') {
            let (key, value) = part.split_once('=')?;
            fields.insert(key, value);
        }
        Some(Answer {
            by: fields.get("by")?.to_string(),
            version: fields.get("version")?.to_string(),
            method: fields.get("method")?.to_string(),
            path: fields.get("path")?.to_string(),
            peer: fields.get("peer")?.parse().ok()?,
            local: fields.get("local")?.parse().ok()?,
            dev: fields.get("dev")?.to_string(),
            forwarded: fields.get("forwarded")?.to_string(),
            received: fields.get("received")?.parse().ok()?,
            exact: match *fields.get("exact")? {
                "true" => Some(true),
                "false" => Some(false),
                _ => None,
            },
        })
    }

    /// Parses an answer, failing the test with what was received instead.
    pub fn expect(text: &str) -> Answer {
        Answer::parse(text).unwrap_or_else(|| panic!("not an answer of a test server: {text:?}"))
    }
}

impl fmt::Display for Answer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "by={} version={} method={} path={} peer={} local={} dev={} forwarded={} received={} exact={}",
            self.by,
            self.version,
            self.method,
            self.path,
            self.peer,
            self.local,
            self.dev,
            self.forwarded,
            self.received,
            match self.exact {
                Some(true) => "true",
                Some(false) => "false",
                None => "-",
            }
        )
    }
}

/// What connection a request arrived on.
#[derive(Clone, Copy, Debug)]
pub struct ConnectionInfo {
    pub name: &'static str,
    pub peer: SocketAddr,
    pub local: SocketAddr,
}

/// Dual-stack listeners report IPv4 peers as `::ffff:a.b.c.d`; clients know
/// themselves as `a.b.c.d`.
pub fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

pub type Body = tonic::body::Body;

async fn serve_connection(name: &'static str, stream: TcpStream) {
    let (Ok(peer), Ok(local)) = (stream.peer_addr(), stream.local_addr()) else {
        return;
    };
    let info = ConnectionInfo {
        name,
        peer: canonical(peer),
        local: canonical(local),
    };
    let service = hyper::service::service_fn(move |request| handle(info, request));
    let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    // Errors are the client's business (a reset, a connection cut mid-request):
    // the client sees them, the server has nothing to add.
    let _ = builder
        .serve_connection_with_upgrades(TokioIo::new(stream), service)
        .await;
}

async fn handle(
    info: ConnectionInfo,
    request: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    let grpc = request
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .is_some_and(|value| value.starts_with("application/grpc"));
    let mut response = if grpc {
        grpc_echo::serve(info, request).await
    } else if is_websocket(&request) {
        websocket(info, request)
    } else if request.uri().path() == "/download" {
        download(&request)
    } else if request.uri().path() == "/slow" {
        tokio::time::sleep(std::time::Duration::from_millis(
            query_number(&request, "ms").unwrap_or(0),
        ))
        .await;
        answer(info, request).await
    } else {
        answer(info, request).await
    };
    let headers = response.headers_mut();
    headers.insert(SERVED_BY, HeaderValue::from_static(info.name));
    headers.insert(
        PEER,
        HeaderValue::from_str(&info.peer.to_string()).expect("an address is a header value"),
    );
    Ok(response)
}

/// The answer line, after reading (and checking) the whole request body.
async fn answer(info: ConnectionInfo, request: Request<Incoming>) -> Response<Body> {
    let (parts, mut body) = request.into_parts();
    let header = |name: &str| {
        parts
            .headers
            .get(name)
            .and_then(|value| value.to_str().ok())
            .map(str::to_string)
    };
    let mut pattern = header("x-seed")
        .and_then(|seed| seed.parse::<u64>().ok())
        .map(Pattern::new);
    let mut exact = pattern.as_ref().map(|_| true);
    let mut received = 0u64;
    let mut scratch = Vec::new();
    while let Some(frame) = body.frame().await {
        let Ok(frame) = frame else {
            // The client went away mid-body: nobody is left to answer.
            return status(StatusCode::BAD_REQUEST, "body cut off");
        };
        if let Ok(data) = frame.into_data() {
            received += data.len() as u64;
            if let Some(pattern) = pattern.as_mut()
                && !pattern.matches(&data, &mut scratch)
            {
                exact = Some(false);
            }
        }
    }
    let answer = Answer {
        by: info.name.to_string(),
        version: format!("{:?}", parts.version),
        method: parts.method.to_string(),
        path: parts
            .uri
            .path_and_query()
            .map_or("/".to_string(), ToString::to_string),
        peer: info.peer,
        local: info.local,
        dev: header("x-dev").unwrap_or_else(|| "-".to_string()),
        forwarded: header("forwarded")
            .map(|value| value.replace(' ', ""))
            .unwrap_or_else(|| "-".to_string()),
        received,
        exact,
    };
    let mut response = Response::new(Body::new(Full::new(Bytes::from(format!("{answer}\n")))));
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    response
}

fn status(code: StatusCode, text: &'static str) -> Response<Body> {
    let mut response = Response::new(Body::new(Full::new(Bytes::from_static(text.as_bytes()))));
    *response.status_mut() = code;
    response
}

/// The query parameter `name` of `request`, as a number.
fn query_number(request: &Request<Incoming>, name: &str) -> Option<u64> {
    form_urlencoded::parse(request.uri().query().unwrap_or("").as_bytes())
        .find(|(key, _)| key == name)
        .and_then(|(_, value)| value.parse().ok())
}

/// `bytes` bytes of `Pattern::new(seed)`, with a Content-Length, made as they are sent.
fn download(request: &Request<Incoming>) -> Response<Body> {
    let query: std::collections::HashMap<String, String> =
        form_urlencoded::parse(request.uri().query().unwrap_or("").as_bytes())
            .into_owned()
            .collect();
    let (Some(bytes), Some(seed)) = (
        query.get("bytes").and_then(|v| v.parse::<u64>().ok()),
        query.get("seed").and_then(|v| v.parse::<u64>().ok()),
    ) else {
        return status(StatusCode::BAD_REQUEST, "want /download?bytes=N&seed=S");
    };
    const CHUNK: u64 = 64 * 1024;
    let chunks = futures::stream::unfold((Pattern::new(seed), bytes), |(mut pattern, left)| {
        std::future::ready((left > 0).then(|| {
            let size = left.min(CHUNK);
            let chunk = Bytes::from(pattern.take(size as usize));
            (
                Ok::<_, Infallible>(Frame::data(chunk)),
                (pattern, left - size),
            )
        }))
    });
    let mut response = Response::new(Body::new(StreamBody::new(chunks)));
    response.headers_mut().insert(
        header::CONTENT_LENGTH,
        HeaderValue::from_str(&bytes.to_string()).expect("a number"),
    );
    response
}

fn is_websocket(request: &Request<Incoming>) -> bool {
    request
        .headers()
        .get(header::UPGRADE)
        .and_then(|value| value.to_str().ok())
        .is_some_and(|value| value.eq_ignore_ascii_case("websocket"))
}

/// Accepts the upgrade (RFC 6455's handshake) and echoes on the upgraded connection.
fn websocket(info: ConnectionInfo, mut request: Request<Incoming>) -> Response<Body> {
    let Some(key) = request.headers().get("sec-websocket-key").cloned() else {
        return status(StatusCode::BAD_REQUEST, "no Sec-WebSocket-Key");
    };
    let upgrading = hyper::upgrade::on(&mut request);
    tokio::spawn(async move {
        let Ok(upgraded) = upgrading.await else {
            return;
        };
        let mut socket =
            WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, None).await;
        while let Some(Ok(message)) = socket.next().await {
            let reply = match message {
                Message::Text(text) => Message::text(format!(
                    "{}: {} peer={}",
                    info.name,
                    text.as_str(),
                    info.peer
                )),
                Message::Binary(data) => Message::Binary(data),
                Message::Close(_) => break,
                _ => continue,
            };
            if socket.send(reply).await.is_err() {
                return;
            }
        }
        let _ = socket.close(None).await;
    });
    let mut response = Response::new(Body::empty());
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let headers = response.headers_mut();
    headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    headers.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    headers.insert(
        "sec-websocket-accept",
        HeaderValue::from_str(&derive_accept_key(key.as_bytes())).expect("base64 is a header"),
    );
    response
}
