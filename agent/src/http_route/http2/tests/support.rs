//! What the h2 routing tests run against: real h2c servers on loopback as
//! the sides, the router serving one accepted connection, and an h2 client.
use std::{
    collections::HashMap,
    future::{Future, poll_fn},
    io,
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    task::Poll,
    time::Duration,
};

use bytes::Bytes;
use futures::{FutureExt as _, future::BoxFuture};
use h2::{Reason, RecvStream, SendStream, client::SendRequest};
use http::{HeaderMap, HeaderValue};
use tokio::{
    net::{TcpListener, TcpStream},
    sync::mpsc,
    task::JoinHandle,
};
use tokio_util::sync::CancellationToken;

use crate::http_route::{self, Limits, Opened, Protocol, Request, Side, Upstreams};

/// Fails the test instead of hanging it.
pub async fn within<T>(future: impl Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(20), future)
        .await
        .expect("the test took longer than 20 s")
}

/// What a request looked like to `pick`.
#[derive(Debug, Clone)]
pub struct Picked {
    pub method: String,
    pub path: String,
    pub headers: Vec<(String, Vec<u8>)>,
}

/// Routes by `x-dev`: `alice` to session 1, `bob` to session 2, anyone
/// else to the pod; each side is a real address (possibly refusing).
#[derive(Clone)]
pub struct Sides {
    addrs: Arc<HashMap<Side, SocketAddr>>,
    pub opens: Arc<Mutex<HashMap<Side, usize>>>,
    pub routed: Arc<Mutex<HashMap<Side, usize>>>,
    pub picked: Arc<Mutex<Vec<Picked>>>,
}

impl Sides {
    pub fn new(pod: SocketAddr, alice: SocketAddr, bob: SocketAddr) -> Self {
        Self {
            addrs: Arc::new(HashMap::from([
                (Side::Pod, pod),
                (Side::Session(1), alice),
                (Side::Session(2), bob),
            ])),
            opens: Arc::default(),
            routed: Arc::default(),
            picked: Arc::default(),
        }
    }

    pub fn opens(&self, side: Side) -> usize {
        self.opens.lock().unwrap().get(&side).copied().unwrap_or(0)
    }

    pub fn routed(&self, side: Side) -> usize {
        self.routed.lock().unwrap().get(&side).copied().unwrap_or(0)
    }
}

impl Upstreams for Sides {
    fn pick(&self, request: &Request<'_>) -> Side {
        self.picked.lock().unwrap().push(Picked {
            method: request.method.to_owned(),
            path: request.path.to_owned(),
            headers: request
                .headers
                .iter()
                .map(|(name, value)| (name.to_string(), value.to_vec()))
                .collect(),
        });
        let dev = request
            .headers
            .iter()
            .find(|(name, _)| name.eq_ignore_ascii_case("x-dev"))
            .map(|(_, value)| *value);
        match dev {
            Some(b"alice") => Side::Session(1),
            Some(b"bob") => Side::Session(2),
            _ => Side::Pod,
        }
    }

    fn open(&self, side: Side) -> BoxFuture<'static, io::Result<Opened>> {
        *self.opens.lock().unwrap().entry(side).or_default() += 1;
        let addr = self.addrs[&side];
        async move {
            let stream = TcpStream::connect(addr).await?;
            stream.set_nodelay(true)?;
            Ok(Opened::from(stream))
        }
        .boxed()
    }

    fn routed(&self, side: Side) {
        *self.routed.lock().unwrap().entry(side).or_default() += 1;
    }
}

/// An address nothing listens on: connecting is refused.
pub async fn refusing() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    listener.local_addr().unwrap()
}

/// What a side's server saw happen to a stream.
#[derive(Debug, PartialEq, Eq)]
pub enum Seen {
    /// The stream's request body ended with this reset (`None`: not a reset).
    Reset(String, Option<Reason>),
}

/// An h2c server answering as a side named `name`, by path:
/// - `/refuse`: resets the stream with REFUSED_STREAM before any head;
/// - `/reset`: a head, a chunk, then a reset with ENHANCE_YOUR_CALM;
/// - `/stall`: never reads the body nor answers;
/// - `/early`: a 103 Early Hints before answering as below;
/// - `/goaway`: answers, then closes its connection gracefully;
/// - `/crash`: drops its connection without answering;
/// - anything else: headers naming the server and the request, the request
///   body echoed as it comes (or the server's name when there is none),
///   then trailers `grpc-status: 0`, `x-server` and the request's trailers.
pub struct Server {
    pub addr: SocketAddr,
    pub connections: Arc<AtomicUsize>,
    /// Connections that ended.
    pub closed: Arc<AtomicUsize>,
    pub seen: mpsc::UnboundedReceiver<Seen>,
}

pub async fn server(name: &'static str) -> Server {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let connections = Arc::new(AtomicUsize::new(0));
    let (seen_tx, seen) = mpsc::unbounded_channel();
    let closed = Arc::new(AtomicUsize::new(0));
    let (counted, ended) = (connections.clone(), closed.clone());
    tokio::spawn(async move {
        loop {
            let Ok((socket, _)) = listener.accept().await else {
                return;
            };
            counted.fetch_add(1, Ordering::SeqCst);
            let seen = seen_tx.clone();
            let ended = ended.clone();
            tokio::spawn(async move {
                let Ok(mut connection) = h2::server::handshake(socket).await else {
                    return;
                };
                while let Some(Ok((request, respond))) = connection.accept().await {
                    if request.uri().path() == "/crash" {
                        break;
                    }
                    let goaway = request.uri().path() == "/goaway";
                    tokio::spawn(answer(name, request, respond, seen.clone()));
                    if goaway {
                        connection.graceful_shutdown();
                    }
                }
                ended.fetch_add(1, Ordering::SeqCst);
            });
        }
    });
    Server {
        addr,
        connections,
        closed,
        seen,
    }
}

async fn answer(
    name: &'static str,
    request: http::Request<RecvStream>,
    mut respond: h2::server::SendResponse<Bytes>,
    seen: mpsc::UnboundedSender<Seen>,
) {
    let path = request.uri().path().to_owned();
    let (parts, mut body) = request.into_parts();
    match path.as_str() {
        "/refuse" => return respond.send_reset(Reason::REFUSED_STREAM),
        "/stall" => {
            let _held = body;
            // Until the router resets it.
            let _ = poll_fn(|cx| respond.poll_reset(cx)).await;
            return;
        }
        "/early" => {
            let hints = http::Response::builder()
                .status(103)
                .header("link", "</a.css>; rel=preload");
            let _ = respond.send_informational(hints.body(()).unwrap());
        }
        _ => {}
    }
    let mut head = http::Response::builder()
        .header("x-server", name)
        .header("x-uri", parts.uri.to_string())
        .header("x-method", parts.method.as_str())
        .header(
            "x-host",
            parts
                .headers
                .get("host")
                .cloned()
                .unwrap_or(HeaderValue::from_static("")),
        )
        .header(
            "x-eos",
            if body.is_end_stream() {
                "true"
            } else {
                "false"
            },
        );
    if let Some(content_type) = parts.headers.get("content-type") {
        head = head.header("content-type", content_type);
    }
    let end_of_stream = body.is_end_stream();
    let Ok(mut send) = respond.send_response(head.body(()).unwrap(), false) else {
        return;
    };
    if path == "/reset" {
        let _ = send.send_data(Bytes::from_static(b"partial"), false);
        tokio::time::sleep(Duration::from_millis(50)).await;
        return send.send_reset(Reason::ENHANCE_YOUR_CALM);
    }
    let mut trailers = HeaderMap::new();
    if end_of_stream {
        let _ = send_all(&mut send, Bytes::from_static(name.as_bytes())).await;
    } else {
        loop {
            match body.data().await {
                Some(Ok(data)) => {
                    let len = data.len();
                    if send_all(&mut send, data).await.is_err() {
                        return;
                    }
                    let _ = body.flow_control().release_capacity(len);
                }
                Some(Err(err)) => {
                    let _ = seen.send(Seen::Reset(path, err.reason().filter(|_| err.is_reset())));
                    return;
                }
                None => break,
            }
        }
        if let Ok(Some(theirs)) = body.trailers().await {
            trailers = theirs;
        }
    }
    trailers.insert("grpc-status", HeaderValue::from_static("0"));
    trailers.insert("x-server", HeaderValue::from_static(name));
    let _ = send.send_trailers(trailers);
}

/// Sends `data` as the peer's window allows, never more.
pub async fn send_all(send: &mut SendStream<Bytes>, mut data: Bytes) -> Result<(), h2::Error> {
    while !data.is_empty() {
        send.reserve_capacity(data.len());
        let capacity = poll_fn(|cx| {
            if send.capacity() > 0 {
                return Poll::Ready(Some(Ok(send.capacity())));
            }
            send.poll_capacity(cx)
        })
        .await
        .ok_or_else(|| h2::Error::from(Reason::CANCEL))??;
        send.send_data(data.split_to(capacity.min(data.len())), false)?;
    }
    Ok(())
}

/// The router serving the one connection accepted on `addr`.
pub struct Router {
    pub addr: SocketAddr,
    pub closing: CancellationToken,
    pub served: JoinHandle<Protocol>,
}

pub async fn router(sides: Sides) -> Router {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let closing = CancellationToken::new();
    let token = closing.clone();
    let served = tokio::spawn(async move {
        let (socket, client) = listener.accept().await.unwrap();
        http_route::serve(socket, client, sides, token, Limits::default()).await
    });
    Router {
        addr,
        closing,
        served,
    }
}

/// An h2c client (prior knowledge) on a new connection to `addr`.
pub async fn client(addr: SocketAddr) -> (SendRequest<Bytes>, JoinHandle<Result<(), h2::Error>>) {
    let socket = TcpStream::connect(addr).await.unwrap();
    let (send, connection) = h2::client::handshake(socket).await.unwrap();
    (send, tokio::spawn(connection))
}

/// A request for `path` on behalf of `dev` (nobody's when `None`).
pub fn request(path: &str, dev: Option<&str>) -> http::Request<()> {
    let mut request = http::Request::builder()
        .method("POST")
        .uri(format!("http://app.test{path}"));
    if let Some(dev) = dev {
        request = request.header("x-dev", dev);
    }
    request.body(()).unwrap()
}

/// Sends a request without a body and reads the whole answer.
pub async fn get(
    send: &SendRequest<Bytes>,
    request: http::Request<()>,
) -> (http::response::Parts, Bytes, Option<HeaderMap>) {
    let mut send = send.clone().ready().await.unwrap();
    let (response, _) = send.send_request(request, true).unwrap();
    read(response.await.unwrap()).await
}

/// Reads a whole response: head, body and trailers.
pub async fn read(
    response: http::Response<RecvStream>,
) -> (http::response::Parts, Bytes, Option<HeaderMap>) {
    let (parts, mut body) = response.into_parts();
    let mut bytes = Vec::new();
    while let Some(data) = body.data().await {
        let data = data.unwrap();
        bytes.extend_from_slice(&data);
        let _ = body.flow_control().release_capacity(data.len());
    }
    let trailers = body.trailers().await.unwrap();
    (parts, Bytes::from(bytes), trailers)
}

/// Reads exactly `len` bytes of a body, releasing them as they come.
pub async fn read_exactly(body: &mut RecvStream, len: usize) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(len);
    while bytes.len() < len {
        let data = body.data().await.expect("the body ended early").unwrap();
        bytes.extend_from_slice(&data);
        let _ = body.flow_control().release_capacity(data.len());
    }
    bytes
}

pub fn header<'a>(headers: &'a HeaderMap, name: &str) -> &'a str {
    headers
        .get(name)
        .and_then(|value| value.to_str().ok())
        .unwrap_or_default()
}
