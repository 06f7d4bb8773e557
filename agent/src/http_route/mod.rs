//! Request-by-request routing of one connection on a port shared by filtered
//! steals. The first bytes tell the protocol: HTTP/1.x requests and h2c
//! streams are routed one by one, each to the first filtered session whose
//! filter matches or else to the pod; anything else goes to the pod whole.
//!
//! This module knows nothing of sessions or of the kernel: the port it
//! serves supplies the sides through [`Upstreams`], so the routing is tested
//! in-process against plain loopback servers.
mod filter;
mod http1;
mod http2;
mod sniff;

use std::{io, net::SocketAddr, pin::Pin, time::Duration};

use futures::future::BoxFuture;
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::TcpStream,
};
use tokio_util::sync::CancellationToken;

pub use filter::{Filter, FilterError};
pub use sniff::Protocol;

/// A byte stream to one side: the pod's server or a session's client.
pub trait Stream: AsyncRead + AsyncWrite + Send + Unpin + 'static {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> Stream for T {}

pub type Upstream = Pin<Box<dyn Stream>>;

/// A new stream to one side, and what the requests sent on it must carry.
pub struct Opened {
    pub stream: Upstream,
    /// A `Forwarded` header value (`for="203.0.113.7:41000"`) for the side
    /// when it could not be reached from the client's own address.
    pub forwarded: Option<String>,
}

impl<T: Stream> From<T> for Opened {
    fn from(stream: T) -> Self {
        Self {
            stream: Box::pin(stream),
            forwarded: None,
        }
    }
}

/// Which side serves a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Side {
    /// The pod's own server, reached with the client's address.
    Pod,
    /// A filtered session, by its key on the port.
    Session(u64),
}

/// What routing needs to know of a request.
pub struct Request<'a> {
    pub method: &'a str,
    /// Path and query, as sent (`/a/b?c=d`).
    pub path: &'a str,
    /// Every header, as (name, value); names in any case.
    pub headers: &'a [(&'a str, &'a [u8])],
}

/// The sides one downstream connection can reach; implemented by the shared
/// port for each connection it accepted (and by loopback fakes in tests).
pub trait Upstreams: Send + Sync + 'static {
    /// Who serves `request`: the first session, in start order, whose filter
    /// matches it; the pod when none does.
    fn pick(&self, request: &Request<'_>) -> Side;
    /// A new byte stream to `side` for this connection. The router keeps one
    /// per side and reuses it for that side's next requests.
    fn open(&self, side: Side) -> BoxFuture<'static, io::Result<Opened>>;
    /// Counts a request routed to `side` (after `pick`, once per request).
    fn routed(&self, _side: Side) {}
    /// A place for one more HTTP/2 connection, held while it lasts; `None`
    /// when the port has as many as it may hold (each can pin a few MiB),
    /// and the connection then goes to the pod whole.
    fn admit_http2(&self) -> Option<Box<dyn Send>> {
        Some(Box::new(()))
    }
}

/// Bounds that keep a hostile or broken client from holding memory or the
/// connection forever.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Longest request head (request line and headers) accepted; a longer one
    /// is answered 431 and the connection closed.
    pub max_head: usize,
    /// How long the first bytes may take before the connection is taken for
    /// a protocol where the server speaks first.
    pub sniff: Duration,
    /// How long a request head may take to arrive once it started.
    pub head_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_head: 32 * 1024,
            sniff: Duration::from_millis(200),
            head_timeout: Duration::from_secs(30),
        }
    }
}

/// Serves one accepted connection until it ends. `closing` is cancelled when
/// the port's last filtered session ended: requests in flight finish, then
/// HTTP/1.1 answers carry `Connection: close` and HTTP/2 gets a GOAWAY.
pub async fn serve(
    downstream: TcpStream,
    client: SocketAddr,
    upstreams: impl Upstreams,
    closing: CancellationToken,
    limits: Limits,
) -> Protocol {
    let _ = downstream.set_nodelay(true);
    let sniffed = sniff::sniff(downstream, &upstreams, limits.sniff, limits.head_timeout).await;
    let protocol = sniffed.protocol;
    let result = match protocol {
        Protocol::Http1 => http1::serve(sniffed, &upstreams, closing, limits).await,
        Protocol::Http2 => match upstreams.admit_http2() {
            Some(_admitted) => http2::serve(sniffed, &upstreams, closing, limits).await,
            None => sniff::pass_whole(sniffed, &upstreams).await,
        },
        Protocol::Other => sniff::pass_whole(sniffed, &upstreams).await,
    };
    if let Err(err) = result {
        tracing::debug!(%client, ?protocol, %err, "routed connection ended with an error");
    }
    protocol
}
