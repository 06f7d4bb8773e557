//! Remote HTTP clients for the filtered-steal tests, besides `curl` and Python:
//! hyper's HTTP/1.1 client on one connection opened from a namespace, for many
//! connections at once, streamed bodies, and following one connection over time.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt as _, Empty, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::client::conn::http1::SendRequest;
use hyper::header::HeaderValue;
use hyper::{HeaderMap, Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpSocket;
use tokio::task::JoinHandle;

use crate::data::Pattern;
use crate::netns::Netns;

pub type RequestBody = BoxBody<Bytes, io::Error>;

/// One answer, read to its end.
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Reply {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// Whether the server said it closes the connection after this answer.
    pub fn closes(&self) -> bool {
        self.headers
            .get_all(hyper::header::CONNECTION)
            .iter()
            .any(|value| {
                value
                    .to_str()
                    .is_ok_and(|v| v.to_ascii_lowercase().contains("close"))
            })
    }
}

/// A keep-alive HTTP/1.1 connection from a namespace.
pub struct Http1 {
    sender: SendRequest<RequestBody>,
    /// The client's own address on this connection.
    pub local: SocketAddr,
    connection: JoinHandle<()>,
}

impl Http1 {
    pub async fn connect(netns: &Netns, addr: SocketAddr) -> io::Result<Http1> {
        let socket = netns
            .tcp_sockets(1, addr.is_ipv6())
            .pop()
            .expect("a socket");
        Http1::connect_socket(socket, addr).await
    }

    /// From a socket made earlier in the client's namespace (see `Netns::tcp_sockets`).
    pub async fn connect_socket(socket: TcpSocket, addr: SocketAddr) -> io::Result<Http1> {
        let stream = socket.connect(addr).await?;
        let local = stream.local_addr()?;
        let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(io::Error::other)?;
        let connection = tokio::spawn(async move {
            let _ = connection.await;
        });
        Ok(Http1 {
            sender,
            local,
            connection,
        })
    }

    /// Whether the connection can take another request (not closed by either side).
    pub async fn usable(&mut self) -> bool {
        self.sender.ready().await.is_ok()
    }

    /// Sends `request` and reads the whole answer.
    pub async fn send(&mut self, request: Request<RequestBody>) -> Result<Reply, hyper::Error> {
        self.sender.ready().await?;
        let response = self.sender.send_request(request).await?;
        read_reply(response).await
    }

    /// Sends `request`, returning the answer with its body unread (for large downloads).
    pub async fn send_streamed(
        &mut self,
        request: Request<RequestBody>,
    ) -> Result<Response<Incoming>, hyper::Error> {
        self.sender.ready().await?;
        self.sender.send_request(request).await
    }

    /// `GET path` with `x-dev: DEV` when given.
    pub async fn get(&mut self, path: &str, dev: Option<&str>) -> Result<Reply, hyper::Error> {
        self.send(request(Method::GET, path, dev, empty())).await
    }
}

impl Drop for Http1 {
    fn drop(&mut self) {
        self.connection.abort();
    }
}

pub async fn read_reply(response: Response<Incoming>) -> Result<Reply, hyper::Error> {
    let (parts, body) = response.into_parts();
    let body = body.collect().await?.to_bytes();
    Ok(Reply {
        status: parts.status,
        headers: parts.headers,
        body,
    })
}

/// A request with a Host header, and `x-dev: DEV` when given.
pub fn request(
    method: Method,
    path: &str,
    dev: Option<&str>,
    body: RequestBody,
) -> Request<RequestBody> {
    let mut request = Request::builder()
        .method(method)
        .uri(path)
        .header(hyper::header::HOST, "web.shop")
        .body(body)
        .expect("a valid request");
    if let Some(dev) = dev {
        request
            .headers_mut()
            .insert("x-dev", HeaderValue::from_str(dev).expect("a header value"));
    }
    request
}

pub fn empty() -> RequestBody {
    Empty::new().map_err(|never| match never {}).boxed()
}

/// `size` bytes of `Pattern::new(seed)`, made as they are sent, in chunks of
/// 64 KiB; without a size hint, so HTTP/1.1 sends it chunked.
pub fn pattern_body(seed: u64, size: u64) -> RequestBody {
    const CHUNK: u64 = 64 * 1024;
    let chunks = futures::stream::unfold((Pattern::new(seed), size), |(mut pattern, left)| {
        std::future::ready((left > 0).then(|| {
            let n = left.min(CHUNK);
            (
                Ok::<_, io::Error>(Frame::data(Bytes::from(pattern.take(n as usize)))),
                (pattern, left - n),
            )
        }))
    });
    StreamBody::new(chunks).boxed()
}

/// Reads a streamed body to its end, checking it against `Pattern::new(seed)`;
/// returns how many bytes came and whether all were the pattern's.
pub async fn check_pattern(
    response: Response<Incoming>,
    seed: u64,
) -> Result<(u64, bool), hyper::Error> {
    let mut body = response.into_body();
    let mut pattern = Pattern::new(seed);
    let (mut received, mut exact) = (0u64, true);
    let mut scratch = Vec::new();
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame?.into_data() {
            received += data.len() as u64;
            exact &= pattern.matches(&data, &mut scratch);
        }
    }
    Ok((received, exact))
}

/// A limit for one exchange that should never take long, so a hang fails the
/// test with a message instead of holding it forever.
pub const EXCHANGE_LIMIT: Duration = Duration::from_secs(20);

/// An HTTP/2 connection with prior knowledge (h2c) from a namespace; its
/// requests are streams of the one connection, and may run at once (clone it).
#[derive(Clone)]
pub struct Http2 {
    sender: hyper::client::conn::http2::SendRequest<RequestBody>,
    /// The client's own address on this connection.
    pub local: SocketAddr,
    /// Becomes `Some(how)` when the connection is over.
    ended: tokio::sync::watch::Receiver<Option<Result<(), String>>>,
}

impl Http2 {
    pub async fn connect(netns: &Netns, addr: SocketAddr) -> io::Result<Http2> {
        let socket = netns
            .tcp_sockets(1, addr.is_ipv6())
            .pop()
            .expect("a socket");
        let stream = socket.connect(addr).await?;
        let local = stream.local_addr()?;
        let (sender, connection) = hyper::client::conn::http2::handshake(
            hyper_util::rt::TokioExecutor::new(),
            TokioIo::new(stream),
        )
        .await
        .map_err(io::Error::other)?;
        let (end, ended) = tokio::sync::watch::channel(None);
        tokio::spawn(async move {
            let how = connection.await.map_err(|e| e.to_string());
            let _ = end.send(Some(how));
        });
        Ok(Http2 {
            sender,
            local,
            ended,
        })
    }

    /// Waits until the connection is over: `Ok` when it ended cleanly.
    pub async fn ended(&mut self) -> Result<(), String> {
        let ended = self
            .ended
            .wait_for(Option::is_some)
            .await
            .map_err(|_| "the connection task is gone".to_string())?;
        ended.clone().expect("ended")
    }

    /// Sends `request` on a new stream and reads the whole answer.
    pub async fn send(&mut self, request: Request<RequestBody>) -> Result<Reply, hyper::Error> {
        self.sender.ready().await?;
        let response = self.sender.send_request(request).await?;
        read_reply(response).await
    }

    /// `GET path` with `x-dev: DEV` when given.
    pub async fn get(&mut self, path: &str, dev: Option<&str>) -> Result<Reply, hyper::Error> {
        let mut request = request(Method::GET, path, dev, empty());
        // h2 takes the authority from the URI, not from a Host header.
        request.headers_mut().remove(hyper::header::HOST);
        *request.uri_mut() = format!("http://web.shop{path}")
            .parse()
            .expect("a valid URI");
        self.send(request).await
    }
}
