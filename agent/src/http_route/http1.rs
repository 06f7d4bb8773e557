//! HTTP/1.x routing: each request of a keep-alive connection goes to the side
//! `Upstreams::pick` names, one request at a time (pipelined ones wait in
//! the buffer), over one upstream per side kept for the connection.
//!
//! Heads are forwarded byte for byte and bodies streamed through; only the
//! framing is read, and framing a server could read differently from us
//! (Transfer-Encoding with Content-Length, conflicting lengths, bare LFs)
//! is refused, so no request can be smuggled past the routing.
//!
//! Memory per connection is bounded, allocations included (the buffers
//! grow exactly, never by doubling): the client's buffer never exceeds
//! `max(max_head + HEAD_READ, BODY_READ)` bytes, since a head is read only
//! while less than `max_head` is held and a body only once the buffer is
//! empty; the upstreams' buffer (one, shared by the sides; `max_head` bounds
//! response heads too) the same. Once, when the port is closing, a response
//! head is rewritten into a copy of at most that size. With the default
//! limits that is 2 x 68 KiB, plus a tunnel's two 8 KiB copy buffers. A
//! busy keep-alive connection reuses its buffers (no allocation per
//! request); one idle for `IDLE_RELEASE` gives them back and holds none.
//! The sockets to the sides are the only other cost.
//!
//! Time is bounded where a client could hold us: `head_timeout` from a
//! head's first byte to its end (408), `CLOSING_GRACE` for an idle
//! connection once the port is closing, `LINGER` after our last answer.
//! A request in flight and an idle connection otherwise wait as long as the
//! client and the server do, as they would without us.
mod body;
mod buffer;
mod exchange;
mod head;
#[cfg(test)]
mod tests;

use std::{collections::HashMap, io, time::Duration};

use tokio::{io::AsyncWriteExt as _, time::Instant};
use tokio_util::sync::CancellationToken;
use tracing::debug;

use self::{
    body::Framing,
    buffer::Buffer,
    exchange::{Client, Exchanged, Failure, Link, Named, Next, exchange},
    head::{RequestError, RequestHead, error_response, parse_request},
};
use super::{Limits, Side, Upstreams, sniff::Sniffed};

/// Room made for each read while a head arrives: most heads fit in one.
const HEAD_READ: usize = 4 * 1024;
/// How long an idle connection may still bring a request once the port is
/// closing; the request is served, with `Connection: close`.
const CLOSING_GRACE: Duration = Duration::from_secs(5);
/// How long a connection may sit idle before its buffers are given back:
/// a busy keep-alive connection keeps reusing them, an idle one holds none.
const IDLE_RELEASE: Duration = Duration::from_secs(1);
/// After our last answer, how long what the client still sends is read and
/// dropped before closing: closing with unread bytes resets the connection,
/// and a reset can destroy the answer before the client read it.
const LINGER: Duration = Duration::from_secs(2);

/// Serves the HTTP/1 connection `sniffed` until it ends: closed by either
/// side, after an answer that closes it, or as a tunnel after an upgrade.
pub async fn serve(
    sniffed: Sniffed,
    upstreams: &impl Upstreams,
    closing: CancellationToken,
    limits: Limits,
) -> io::Result<()> {
    let Sniffed {
        mut downstream,
        prefix,
        pod,
        from_pod,
        ..
    } = sniffed;
    if !from_pod.is_empty() {
        debug!(
            bytes = from_pod.len(),
            "the pod spoke first on an HTTP connection; dropped"
        );
    }
    let mut links = HashMap::new();
    if let Some(pod) = pod {
        links.insert(Side::Pod, Link::new(pod));
    }
    let (end, early) = {
        let (reader, writer) = downstream.split();
        let mut client = Client {
            reader,
            writer,
            buffer: Buffer::holding(&prefix),
        };
        drop(prefix);
        let end = requests(&mut client, &mut links, upstreams, &closing, &limits).await;
        match end {
            End::Reply(ref answer) => {
                client.writer.write_all(answer).await?;
                finish(&mut client).await;
            }
            End::Close => finish(&mut client).await,
            End::Tunnel(_) | End::Reset => {}
        }
        (end, client.buffer)
    };
    match end {
        End::Tunnel(link) => {
            drop(links);
            let mut upstream = link.reader.unsplit(link.writer);
            upstream.write_all(early.data()).await?;
            drop(early);
            tokio::io::copy_bidirectional(&mut downstream, &mut upstream).await?;
        }
        // No bytes of ours may pass for the end of a broken answer.
        End::Reset => downstream.set_zero_linger()?,
        End::Reply(_) | End::Close => {}
    }
    Ok(())
}

/// How the connection ends once requests stop.
enum End {
    /// Cleanly: FIN after the last answer.
    Close,
    /// With this answer of ours, then FIN.
    Reply(Vec<u8>),
    /// As a tunnel to the upstream that accepted an upgrade.
    Tunnel(Link),
    /// With a reset: the client left, or an answer broke off midway.
    Reset,
}

async fn requests(
    client: &mut Client<'_>,
    links: &mut HashMap<Side, Link>,
    upstreams: &impl Upstreams,
    closing: &CancellationToken,
    limits: &Limits,
) -> End {
    let mut responses = Buffer::new();
    loop {
        let head = match next_request(client, &mut responses, upstreams, closing, limits).await {
            Ok(Some(head)) => head,
            Ok(None) => return End::Close,
            Err(HeadFailure::Io(err)) => {
                debug!(%err, "reading a request head failed");
                return End::Reset;
            }
            Err(HeadFailure::Timeout) => {
                debug!("request head timed out");
                return End::Reply(error_response(
                    "408 Request Timeout",
                    "the request head took too long to arrive",
                ));
            }
            Err(HeadFailure::Refused(err)) => {
                debug!(%err, "request refused");
                return End::Reply(error_response(err.status(), &err.to_string()));
            }
        };
        upstreams.routed(head.side);
        if let Some(end) = answer(
            &head,
            client,
            links,
            &mut responses,
            upstreams,
            closing,
            limits,
        )
        .await
        {
            return end;
        }
    }
}

/// Routes one request and forwards its answer; `None` when the connection
/// goes on to the next request.
async fn answer(
    head: &RequestHead,
    client: &mut Client<'_>,
    links: &mut HashMap<Side, Link>,
    responses: &mut Buffer,
    upstreams: &impl Upstreams,
    closing: &CancellationToken,
    limits: &Limits,
) -> Option<End> {
    let side = head.side;
    let mut retried = false;
    loop {
        let link = match link_for(links, side, upstreams).await {
            Ok(link) => link,
            Err(err) => {
                let failure = Failure::Open(Named(side), err);
                debug!(%failure, "no upstream");
                return Some(bad_gateway(&failure));
            }
        };
        let reused = std::mem::replace(&mut link.used, true);
        let exchanged = exchange(head, client, link, responses, closing, limits.max_head).await;
        responses.clear();
        match exchanged {
            Exchanged::Answered { next, reusable } => {
                if head.framing == Framing::Empty {
                    client.buffer.consume(head.len);
                }
                if next == Next::Tunnel {
                    return Some(links.remove(&side).map_or(End::Reset, End::Tunnel));
                }
                if !reusable {
                    links.remove(&side);
                }
                return match next {
                    Next::KeepAlive => None,
                    _ => Some(End::Close),
                };
            }
            Exchanged::Unanswered { failure, retryable } => {
                links.remove(&side);
                if retryable && reused && !retried && head.retryable() {
                    // A kept connection the server closed as we sent: the
                    // request never reached it, so a fresh one may take it.
                    debug!(%failure, "sending again on a fresh upstream");
                    retried = true;
                    continue;
                }
                debug!(%failure, "no answer");
                return Some(bad_gateway(&failure));
            }
            Exchanged::BadBody => {
                links.remove(&side);
                debug!("malformed chunked request body");
                return Some(End::Reply(error_response(
                    "400 Bad Request",
                    "malformed chunked request body",
                )));
            }
            Exchanged::Broken => {
                links.remove(&side);
                debug!(?side, "exchange broke off");
                return Some(End::Reset);
            }
        }
    }
}

fn bad_gateway(failure: &Failure) -> End {
    End::Reply(error_response("502 Bad Gateway", &failure.to_string()))
}

/// The side's kept upstream if it is still open, else a new one.
async fn link_for<'a>(
    links: &'a mut HashMap<Side, Link>,
    side: Side,
    upstreams: &impl Upstreams,
) -> io::Result<&'a mut Link> {
    if links
        .get_mut(&side)
        .is_some_and(|link| !link.idle_and_open())
    {
        debug!(?side, "kept upstream closed; opening another");
        links.remove(&side);
    }
    match links.entry(side) {
        std::collections::hash_map::Entry::Occupied(entry) => Ok(entry.into_mut()),
        std::collections::hash_map::Entry::Vacant(entry) => {
            Ok(entry.insert(Link::new(upstreams.open(side).await?)))
        }
    }
}

enum HeadFailure {
    Io(io::Error),
    Timeout,
    Refused(RequestError),
}

/// Waits for the next request and reads its head (`None`: the client is
/// done, or stayed idle through the closing grace). The head timeout runs
/// from the head's first byte; an idle connection has none.
async fn next_request(
    client: &mut Client<'_>,
    responses: &mut Buffer,
    upstreams: &impl Upstreams,
    closing: &CancellationToken,
    limits: &Limits,
) -> Result<Option<RequestHead>, HeadFailure> {
    if client.buffer.is_empty()
        && !wait_for_request(client, responses, closing)
            .await
            .map_err(HeadFailure::Io)?
    {
        return Ok(None);
    }
    let deadline = Instant::now() + limits.head_timeout;
    // A head can only be complete (or proven bad) once a line ended: parse
    // again only then, so a head dripping in costs no quadratic work.
    let mut unscanned = 0;
    loop {
        if client.buffer.data()[unscanned..].contains(&b'\n') {
            let parsed = parse_request(client.buffer.data(), limits.max_head, |request| {
                upstreams.pick(request)
            });
            if let Some(head) = parsed.map_err(HeadFailure::Refused)? {
                return Ok(Some(head));
            }
        }
        unscanned = client.buffer.len();
        if client.buffer.len() >= limits.max_head {
            return Err(HeadFailure::Refused(RequestError::TooLarge));
        }
        let Client { reader, buffer, .. } = client;
        match tokio::time::timeout_at(deadline, buffer.fill(reader, HEAD_READ)).await {
            Err(_) => return Err(HeadFailure::Timeout),
            Ok(Err(err)) => return Err(HeadFailure::Io(err)),
            // The client left halfway through a head: nobody to answer.
            Ok(Ok(0)) => return Ok(None),
            Ok(Ok(_)) => {}
        }
    }
}

/// Waits for a request's first bytes; `false` when the client closed, or
/// the port is closing and none came within the grace.
async fn wait_for_request(
    client: &mut Client<'_>,
    responses: &mut Buffer,
    closing: &CancellationToken,
) -> io::Result<bool> {
    let Client { reader, buffer, .. } = client;
    while !closing.is_cancelled() {
        tokio::select! {
            read = buffer.fill(reader, HEAD_READ) => return Ok(read? > 0),
            () = closing.cancelled() => {}
            () = tokio::time::sleep(IDLE_RELEASE) => {
                buffer.release();
                responses.release();
                // Readiness needs no buffer; the next turn reads with one.
                tokio::select! {
                    ready = reader.readable() => ready?,
                    () = closing.cancelled() => {}
                }
            }
        }
    }
    match tokio::time::timeout(CLOSING_GRACE, buffer.fill(reader, HEAD_READ)).await {
        Ok(read) => Ok(read? > 0),
        Err(_) => {
            debug!("idle connection closed: the port is closing");
            Ok(false)
        }
    }
}

/// Half-closes toward the client, then drains what it still sends (for at
/// most `LINGER`) so the last answer is not lost to a reset.
async fn finish(client: &mut Client<'_>) {
    let _ = client.writer.shutdown().await;
    let Client { reader, buffer, .. } = client;
    let drained = tokio::time::timeout(LINGER, async {
        loop {
            buffer.clear();
            match buffer.fill(reader, HEAD_READ).await {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
    })
    .await;
    if drained.is_err() {
        debug!("client still sending after our last answer; closing anyway");
    }
}
