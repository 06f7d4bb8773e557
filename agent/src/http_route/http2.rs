//! HTTP/2 with prior knowledge (h2c, gRPC included), routed stream by stream.
//!
//! The agent is an h2 server to the downstream client and an h2 client to
//! each side, so every request stream can go to a different side while the
//! client keeps one connection: the router opens at most one upstream
//! connection per side for each downstream connection, when a request first
//! needs it, and opens it again when it died or said GOAWAY.
//!
//! # Bounds
//!
//! A downstream connection has at most [`MAX_STREAMS`] streams open at once
//! (the client is told in SETTINGS; gRPC clients queue beyond it), and header
//! lists up to `Limits::max_head` bytes. Bodies are never buffered whole:
//! a stream's received bytes are released to its sender (WINDOW_UPDATE) only
//! once the other side's stream took them, so the memory one downstream
//! connection holds is at most
//!
//! * [`CONNECTION_WINDOW`] (1 MiB) of request bodies received from the client,
//! * [`CONNECTION_WINDOW`] of response bodies per side it reached,
//! * [`SEND_BUFFER`] (32 KiB, two frames) queued for writing per stream and
//!   direction, that is 100 × 2 × 32 KiB = 6.25 MiB in the worst case (every
//!   stream of a peer that stopped reading its socket has a full queue); a
//!   queue also never holds more than the window its reader opened,
//! * header blocks: `max_head` per head or trailers being received.
//!
//! A stream's window, [`STREAM_WINDOW`] (256 KiB), is a quarter of the
//! connection's: a stream whose side stopped reading (a session paused in
//! a debugger) holds its whole window, and it takes four such streams to
//! stall the client's other streams, which may be other developers' or the
//! pod's (a gateway multiplexes many users on one connection). The windows
//! are small because a client that stops reading makes the agent hold
//! them: what a hostile client can pin is about 4 MiB per connection, and
//! the port admits a bounded number of h2 connections (see `steal`).
mod answer;
mod clients;
mod pipe;
mod relay;
mod rewind;
#[cfg(test)]
mod tests;

use std::{io, pin::pin, time::Duration};

use bytes::Bytes;
use h2::RecvStream;
use tokio::{sync::mpsc, time::Instant};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use super::{Limits, Request, Side, Upstreams, sniff::Sniffed};
use clients::{Clients, Reopen};
use rewind::Rewind;

/// Streams one downstream connection may have open at once: what browsers
/// open, and it bounds what one connection holds (see the module's bounds);
/// gRPC clients queue calls beyond it.
pub const MAX_STREAMS: u32 = 100;
/// Bytes one stream may have in flight toward the agent, in each direction.
pub const STREAM_WINDOW: u32 = 256 << 10;
/// Bytes all streams of one h2 connection may have in flight toward the
/// agent together, downstream and upstream alike.
pub const CONNECTION_WINDOW: u32 = 1 << 20;
/// Bytes one stream may have queued for writing to a peer: h2 assigns send
/// capacity only up to this, so a slow reader holds back the sender instead
/// of growing a queue. Two 16 KiB frames: one being written, one ready.
pub const SEND_BUFFER: usize = 32 << 10;

/// How long a connection told GOAWAY may stay open without a stream in
/// flight: clients close it at once, but h2 only ends it after the client
/// acknowledged the PING sent with the GOAWAY, which a broken client never
/// does.
const CLOSING_GRACE: Duration = Duration::from_secs(5);

/// Serves one h2c connection until the client or the agent closes it.
/// `closing` being cancelled sends GOAWAY: streams in flight finish and the
/// client opens a new connection for the next ones, which then is the pod's.
pub async fn serve(
    sniffed: Sniffed,
    upstreams: &impl Upstreams,
    closing: CancellationToken,
    limits: Limits,
) -> io::Result<()> {
    let Sniffed {
        downstream,
        prefix,
        pod,
        ..
    } = sniffed;
    let max_head = u32::try_from(limits.max_head).unwrap_or(u32::MAX);
    let handshake = h2::server::Builder::new()
        .max_concurrent_streams(MAX_STREAMS)
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_send_buffer_size(SEND_BUFFER)
        .max_header_list_size(max_head)
        .handshake::<_, Bytes>(Rewind::new(prefix.freeze(), downstream));
    // The client sends its SETTINGS right after the preface: as slow as a
    // request head may be, no slower.
    let mut connection = tokio::time::timeout(limits.head_timeout, handshake)
        .await
        .map_err(|_| {
            io::Error::new(
                io::ErrorKind::TimedOut,
                "no HTTP/2 SETTINGS from the client",
            )
        })?
        .map_err(into_io)?;
    let mut clients = Clients::new(upstreams, pod, max_head);
    // Streams whose side's connection turned out dead ask for a new one here,
    // where `upstreams` can be reached; at most one request per stream.
    let (reopen_tx, mut reopen_rx) = mpsc::channel(MAX_STREAMS as usize);
    let relays = TaskTracker::new();
    let mut going_away = false;
    let mut grace = pin!(tokio::time::sleep(Duration::ZERO));
    loop {
        tokio::select! {
            accepted = connection.accept() => match accepted {
                Some(Ok((request, respond))) => {
                    let side = pick(upstreams, &request);
                    upstreams.routed(side);
                    let client = clients.get(side, None);
                    let reopen = Reopen::new(side, reopen_tx.clone());
                    relays.spawn(relay::relay(request, respond, client, reopen));
                }
                Some(Err(err)) => return Err(into_io(err)),
                None => return Ok(()),
            },
            Some((side, dead, reply)) = reopen_rx.recv() => {
                let _ = reply.send(clients.get(side, Some(dead)));
            }
            () = closing.cancelled(), if !going_away => {
                tracing::debug!("filtered steal closing: GOAWAY to the h2 client");
                going_away = true;
                connection.graceful_shutdown();
                grace.as_mut().reset(Instant::now() + CLOSING_GRACE);
            }
            () = &mut grace, if going_away => {
                if relays.is_empty() {
                    tracing::debug!("h2 client kept an idle connection after GOAWAY: closed");
                    return Ok(());
                }
                grace.as_mut().reset(Instant::now() + CLOSING_GRACE);
            }
        }
    }
}

/// Asks `upstreams` who serves a request, from its method, path and query,
/// and regular headers (gRPC metadata included; pseudo-headers are not
/// headers to a filter, except `:authority`, which HTTP/2 clients send
/// instead of `host`: a filter on `host` sees it as HTTP/1 sends it).
fn pick(upstreams: &impl Upstreams, request: &http::Request<RecvStream>) -> Side {
    let mut headers: Vec<(&str, &[u8])> = request
        .headers()
        .iter()
        .map(|(name, value)| (name.as_str(), value.as_bytes()))
        .collect();
    if !request.headers().contains_key(http::header::HOST)
        && let Some(authority) = request.uri().authority()
    {
        headers.push(("host", authority.as_str().as_bytes()));
    }
    let path = request
        .uri()
        .path_and_query()
        .map_or("", |path| path.as_str());
    upstreams.pick(&Request {
        method: request.method().as_str(),
        path,
        headers: &headers,
    })
}

fn into_io(err: h2::Error) -> io::Error {
    if err.is_io() {
        err.into_io()
            .unwrap_or_else(|| io::Error::other("h2 I/O error"))
    } else {
        io::Error::other(err)
    }
}
