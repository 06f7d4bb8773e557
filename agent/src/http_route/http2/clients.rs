//! The h2 client connections of one downstream connection: one per side,
//! opened when a stream first needs it and shared by that side's streams.
//! Opening is a shared future, so the streams that arrive while a side is
//! being connected wait for the same connection instead of opening more.
use std::{
    collections::HashMap,
    fmt, io,
    sync::Arc,
    task::{Context, Poll, Waker},
};

use bytes::Bytes;
use futures::{
    FutureExt as _,
    future::{BoxFuture, Shared},
};
use h2::client::SendRequest;
use tokio::sync::{mpsc, oneshot};

use super::{CONNECTION_WINDOW, SEND_BUFFER, STREAM_WINDOW};
use crate::http_route::{Opened, Side, Upstreams};

/// A side as messages to the client name it.
#[derive(Clone, Copy, Debug)]
pub struct Named(pub Side);

impl fmt::Display for Named {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Side::Pod => f.write_str("the pod's server"),
            Side::Session(key) => write!(f, "session {key}"),
        }
    }
}

/// Why a stream got no response from its side; the client reads it in the
/// 502's body or the gRPC status message.
#[derive(Clone, Debug, thiserror::Error)]
pub enum Failure {
    #[error("cannot connect to {0}: {1}")]
    Open(Named, Arc<io::Error>),
    #[error("{0} does not speak HTTP/2: {1}")]
    Handshake(Named, Arc<h2::Error>),
    #[error("{0} failed before answering: {1}")]
    Upstream(Named, Arc<h2::Error>),
    #[error("the connection is closing")]
    Closing,
}

/// A side's connection; `generation` tells a dead one from its successor.
#[derive(Clone)]
pub struct Client {
    pub send: SendRequest<Bytes>,
    pub generation: u64,
    /// A `Forwarded` header for the requests sent on it (see [`Opened`]).
    pub forwarded: Option<http::HeaderValue>,
}

/// A connection being opened, or opened, to a side.
pub type Opening = Shared<BoxFuture<'static, Result<Client, Failure>>>;

pub struct Clients<'a, U> {
    upstreams: &'a U,
    builder: h2::client::Builder,
    slots: HashMap<Side, Opening>,
    /// The pod connection sniffing opened, for the first stream to the pod.
    pod: Option<Opened>,
    generations: u64,
}

impl<'a, U: Upstreams> Clients<'a, U> {
    pub fn new(upstreams: &'a U, pod: Option<Opened>, max_head: u32) -> Self {
        let mut builder = h2::client::Builder::new();
        builder
            .enable_push(false)
            .initial_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .max_send_buffer_size(SEND_BUFFER)
            .max_header_list_size(max_head);
        Self {
            upstreams,
            builder,
            slots: HashMap::new(),
            pod,
            generations: 0,
        }
    }

    /// The connection a new stream to `side` should use: the one open or
    /// being opened, unless a stream found it `dead`, it failed to open, or
    /// it no longer takes streams (closed, or the side sent GOAWAY); then a
    /// new one. A side that failed is thus tried again by its next stream.
    pub fn get(&mut self, side: Side, dead: Option<u64>) -> Opening {
        if let Some(opening) = self.slots.get(&side)
            && usable(opening, dead)
        {
            return opening.clone();
        }
        self.generations += 1;
        let stream = match self.pod.take_if(|_| side == Side::Pod) {
            Some(pod) => futures::future::ready(Ok(pod)).boxed(),
            None => self.upstreams.open(side),
        };
        let opening = connect(side, self.generations, stream, self.builder.clone())
            .boxed()
            .shared();
        self.slots.insert(side, opening.clone());
        opening
    }
}

fn usable(opening: &Opening, dead: Option<u64>) -> bool {
    match opening.peek() {
        // Still opening: newer than any connection a stream found dead.
        None => true,
        Some(Err(_)) => false,
        Some(Ok(client)) => Some(client.generation) != dead && takes_streams(&client.send),
    }
}

/// Whether h2 would open a stream on the connection now: not once it closed
/// or received GOAWAY. A fresh handle has no stream of its own waiting to
/// open, so this only reads the connection's state and never waits.
fn takes_streams(send: &SendRequest<Bytes>) -> bool {
    let mut send = send.clone();
    matches!(
        send.poll_ready(&mut Context::from_waker(Waker::noop())),
        Poll::Ready(Ok(()))
    )
}

async fn connect(
    side: Side,
    generation: u64,
    stream: BoxFuture<'static, io::Result<Opened>>,
    builder: h2::client::Builder,
) -> Result<Client, Failure> {
    let Opened { stream, forwarded } = stream
        .await
        .map_err(|err| Failure::Open(Named(side), Arc::new(err)))?;
    let forwarded = forwarded.and_then(|value| http::HeaderValue::try_from(value).ok());
    let (send, connection) = builder
        .handshake::<_, Bytes>(stream)
        .await
        .map_err(|err| Failure::Handshake(Named(side), Arc::new(err)))?;
    // Ends once the side closes it, or once every handle and stream of it is
    // gone (the downstream connection ended).
    tokio::spawn(async move {
        if let Err(err) = connection.await {
            tracing::debug!(?side, %err, "h2 connection to a side failed");
        }
    });
    Ok(Client {
        send,
        generation,
        forwarded,
    })
}

/// What a stream sends to ask for a new connection to its side.
pub type ReopenRequest = (Side, u64, oneshot::Sender<Opening>);

/// How a stream asks the connection's task, which alone reaches
/// [`Upstreams`], for a new connection when the one it got stopped taking
/// streams.
pub struct Reopen {
    side: Side,
    tx: mpsc::Sender<ReopenRequest>,
}

impl Reopen {
    pub fn new(side: Side, tx: mpsc::Sender<ReopenRequest>) -> Self {
        Self { side, tx }
    }

    pub fn side(&self) -> Side {
        self.side
    }

    pub async fn reopen(&self, dead: u64) -> Result<Client, Failure> {
        let (reply, answer) = oneshot::channel();
        self.tx
            .send((self.side, dead, reply))
            .await
            .map_err(|_| Failure::Closing)?;
        answer.await.map_err(|_| Failure::Closing)?.await
    }
}
