//! One request and its answer. The request (head, then body) and the
//! response travel at the same time: a server may answer before it read the
//! whole body (`Expect: 100-continue`, an early error), and waiting for the
//! body first would deadlock the first case.
use std::{fmt, io};

use futures::FutureExt as _;
use tokio::io::{
    AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _, ReadHalf, WriteHalf,
};
use tokio_util::sync::CancellationToken;

use super::{
    HEAD_READ,
    body::{Body, ForwardError, Framing, forward},
    buffer::Buffer,
    head::{Kind, RequestHead, ResponseError, parse_response, with_close},
};
use crate::http_route::{Opened, Side, Upstream};

/// This connection's stream to one side, kept for that side's next requests.
pub struct Link {
    pub reader: ReadHalf<Upstream>,
    pub writer: WriteHalf<Upstream>,
    /// It carried a request already (a closed one may then be retried).
    pub used: bool,
    /// A `Forwarded` header line to add to each request head (a side that
    /// cannot see the client's address otherwise).
    pub forwarded: Option<Vec<u8>>,
}

impl Link {
    pub fn new(opened: Opened) -> Self {
        let (reader, writer) = tokio::io::split(opened.stream);
        Self {
            reader,
            writer,
            used: false,
            forwarded: opened
                .forwarded
                .map(|value| format!("Forwarded: {value}\r\n").into_bytes()),
        }
    }

    /// Whether a link kept between requests can take another: a server that
    /// closed it (idle timeout) or says something unasked is not reused.
    pub fn idle_and_open(&mut self) -> bool {
        let mut byte = [0u8; 1];
        self.reader.read(&mut byte).now_or_never().is_none()
    }
}

/// The client's side of the connection.
pub struct Client<'a> {
    pub reader: tokio::net::tcp::ReadHalf<'a>,
    pub writer: tokio::net::tcp::WriteHalf<'a>,
    /// What the client sent that is not forwarded yet.
    pub buffer: Buffer,
}

/// A side, as 502 answers and logs name it.
#[derive(Debug)]
pub struct Named(pub Side);

impl fmt::Display for Named {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Side::Pod => f.write_str("the pod"),
            Side::Session(key) => write!(f, "session {key}"),
        }
    }
}

/// Why an upstream gave no (whole) answer.
#[derive(Debug, thiserror::Error)]
pub enum Failure {
    #[error("could not reach {0}: {1}")]
    Open(Named, io::Error),
    #[error("{0} closed the connection before answering")]
    Closed(Named),
    #[error("{0} failed: {1}")]
    Io(Named, io::Error),
    #[error("{0} sent {1}")]
    Response(Named, ResponseError),
    #[error("{0} sent a response head longer than {1} bytes")]
    TooLarge(Named, usize),
}

/// What comes after the answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Next {
    KeepAlive,
    Close,
    Tunnel,
}

pub enum Exchanged {
    /// The response went to the client whole (or, for a tunnel, its head).
    Answered { next: Next, reusable: bool },
    /// No final response head reached the client: it can still be told why.
    Unanswered {
        failure: Failure,
        /// Nothing came back at all, so the request may be sent again.
        retryable: bool,
    },
    /// The request's chunked body was malformed before any answer began.
    BadBody,
    /// The client left, or a response broke off midway: close, say nothing.
    Broken,
}

enum SendError {
    Client,
    Chunk,
    Upstream,
}

enum ReceiveError {
    Upstream(Failure),
    Client,
}

/// How far the response got; read after the exchange to tell the cases apart.
#[derive(Default)]
struct Progress {
    received: bool,
    interim_sent: bool,
    final_started: bool,
}

/// Sends `head` (at the start of the client's buffer) and its body on
/// `link`, and forwards the answer.
pub async fn exchange(
    head: &RequestHead,
    client: &mut Client<'_>,
    link: &mut Link,
    responses: &mut Buffer,
    closing: &CancellationToken,
    max_head: usize,
) -> Exchanged {
    let Client {
        reader,
        writer,
        buffer,
    } = client;
    let mut progress = Progress::default();
    let (sent, received) = {
        let send = send_request(
            head,
            reader,
            buffer,
            &mut link.writer,
            link.forwarded.as_deref(),
        );
        let receive = receive_response(
            head,
            &mut link.reader,
            responses,
            writer,
            closing,
            max_head,
            &mut progress,
        );
        tokio::pin!(send, receive);
        let mut sent = None;
        let mut received = None;
        while received.is_none() || sent.is_none() {
            tokio::select! {
                biased;
                result = &mut send, if sent.is_none() => {
                    let stop = matches!(result, Err(SendError::Client | SendError::Chunk));
                    sent = Some(result);
                    if stop {
                        break;
                    }
                }
                result = &mut receive, if received.is_none() => {
                    let failed = result.is_err();
                    received = Some(result);
                    if failed {
                        break;
                    }
                    if sent.is_none() {
                        // Answered before the body was all sent: unless it is
                        // done now, the connection cannot be reused, and the
                        // client may never send the rest (it was told no).
                        sent = (&mut send).now_or_never();
                        break;
                    }
                }
            }
        }
        (sent, received)
    };
    match (sent, received) {
        (Some(Ok(())), Some(Ok(answer))) => Exchanged::Answered {
            next: answer.next,
            reusable: answer.reusable && responses.is_empty(),
        },
        (_, Some(Ok(answer))) => Exchanged::Answered {
            next: match answer.next {
                Next::Tunnel => return Exchanged::Broken,
                _ => Next::Close,
            },
            reusable: false,
        },
        (Some(Err(SendError::Client)), _) | (_, Some(Err(ReceiveError::Client))) => {
            Exchanged::Broken
        }
        (Some(Err(SendError::Chunk)), _) if !progress.final_started => Exchanged::BadBody,
        (_, Some(Err(ReceiveError::Upstream(failure)))) if !progress.final_started => {
            let retryable = !progress.received
                && !progress.interim_sent
                && matches!(failure, Failure::Closed(_) | Failure::Io(..));
            Exchanged::Unanswered { failure, retryable }
        }
        _ => Exchanged::Broken,
    }
}

/// Writes the head with whatever body bytes are already buffered (one write,
/// one segment for a small request), then streams the rest of the body.
/// A bodiless request's head stays in the buffer, to be sent again if the
/// upstream turns out closed; the caller consumes it.
async fn send_request(
    head: &RequestHead,
    reader: &mut (impl AsyncRead + Unpin),
    buffer: &mut Buffer,
    upstream: &mut (impl AsyncWrite + Unpin),
    forwarded: Option<&[u8]>,
) -> Result<(), SendError> {
    let mut body = Body::new(head.framing);
    let first = body
        .take(&buffer.data()[head.len..])
        .map_err(|_| SendError::Chunk)?;
    let sent = buffer.data();
    match forwarded {
        None => upstream.write_all(&sent[..head.len + first]).await,
        Some(line) => {
            let rewritten =
                with_forwarded(&sent[..head.len], line, &sent[head.len..head.len + first]);
            upstream.write_all(&rewritten).await
        }
    }
    .map_err(|_| SendError::Upstream)?;
    upstream.flush().await.map_err(|_| SendError::Upstream)?;
    if head.framing == Framing::Empty {
        return Ok(());
    }
    buffer.consume(head.len + first);
    forward(reader, buffer, upstream, &mut body)
        .await
        .map_err(|err| match err {
            ForwardError::Read(_) | ForwardError::Closed => SendError::Client,
            ForwardError::Framing(_) => SendError::Chunk,
            ForwardError::Write(_) => SendError::Upstream,
        })
}

/// The head with our `Forwarded` line before the blank line that ends it,
/// and without any the client sent (whoever reads the first one would
/// believe the client), followed by `body`.
fn with_forwarded(head: &[u8], line: &[u8], body: &[u8]) -> Vec<u8> {
    let mut rewritten = Vec::with_capacity(head.len() + line.len() + body.len());
    // Heads end in CRLF CRLF (a bare LF is refused before this).
    let lines = head[..head.len() - 2].split_inclusive(|byte| *byte == b'\n');
    for (index, header) in lines.enumerate() {
        let is_forwarded =
            index > 0 && header.len() > 10 && header[..10].eq_ignore_ascii_case(b"forwarded:");
        if !is_forwarded {
            rewritten.extend_from_slice(header);
        }
    }
    rewritten.extend_from_slice(line);
    rewritten.extend_from_slice(b"\r\n");
    rewritten.extend_from_slice(body);
    rewritten
}

struct Answer {
    next: Next,
    /// The upstream may take another request.
    reusable: bool,
}

/// Forwards interim responses, then the final one; its head gets
/// `Connection: close` when the port is closing by then.
async fn receive_response(
    request: &RequestHead,
    upstream: &mut (impl AsyncRead + Unpin),
    buffer: &mut Buffer,
    client: &mut (impl AsyncWrite + Unpin),
    closing: &CancellationToken,
    max_head: usize,
    progress: &mut Progress,
) -> Result<Answer, ReceiveError> {
    let side = request.side;
    let response = loop {
        let response = read_head(request, upstream, buffer, max_head, progress).await?;
        if response.kind != Kind::Interim {
            break response;
        }
        client
            .write_all(&buffer.data()[..response.len])
            .await
            .map_err(|_| ReceiveError::Client)?;
        buffer.consume(response.len);
        progress.interim_sent = true;
    };
    if response.kind == Kind::Tunnel {
        // What follows the head is the new protocol's: it goes along.
        progress.final_started = true;
        client
            .write_all(buffer.data())
            .await
            .map_err(|_| ReceiveError::Client)?;
        buffer.clear();
        return Ok(Answer {
            next: Next::Tunnel,
            reusable: false,
        });
    }
    let mut body = Body::new(response.framing);
    let first = body.take(&buffer.data()[response.len..]).map_err(|_| {
        ReceiveError::Upstream(Failure::Response(
            Named(side),
            ResponseError::Malformed("chunked body"),
        ))
    })?;
    let close = response.keep_alive && closing.is_cancelled();
    progress.final_started = true;
    let written = if close {
        let mut rewritten = Vec::with_capacity(response.len + first + 32);
        with_close(&buffer.data()[..response.len], &mut rewritten);
        rewritten.extend_from_slice(&buffer.data()[response.len..response.len + first]);
        client.write_all(&rewritten).await
    } else {
        client
            .write_all(&buffer.data()[..response.len + first])
            .await
    };
    written.map_err(|_| ReceiveError::Client)?;
    buffer.consume(response.len + first);
    forward(upstream, buffer, client, &mut body)
        .await
        .map_err(|err| match err {
            ForwardError::Read(err) => ReceiveError::Upstream(Failure::Io(Named(side), err)),
            ForwardError::Closed => ReceiveError::Upstream(Failure::Closed(Named(side))),
            ForwardError::Framing(_) => ReceiveError::Upstream(Failure::Response(
                Named(side),
                ResponseError::Malformed("chunked body"),
            )),
            ForwardError::Write(_) => ReceiveError::Client,
        })?;
    Ok(Answer {
        next: if response.keep_alive && !close {
            Next::KeepAlive
        } else {
            Next::Close
        },
        reusable: response.keep_alive,
    })
}

async fn read_head(
    request: &RequestHead,
    upstream: &mut (impl AsyncRead + Unpin),
    buffer: &mut Buffer,
    max_head: usize,
    progress: &mut Progress,
) -> Result<super::head::ResponseHead, ReceiveError> {
    let side = request.side;
    loop {
        if !buffer.is_empty() {
            match parse_response(buffer.data(), request) {
                Ok(Some(response)) => return Ok(response),
                Ok(None) => {}
                Err(err) => {
                    return Err(ReceiveError::Upstream(Failure::Response(Named(side), err)));
                }
            }
        }
        if buffer.len() >= max_head {
            return Err(ReceiveError::Upstream(Failure::TooLarge(
                Named(side),
                max_head,
            )));
        }
        match buffer.fill(upstream, HEAD_READ).await {
            Ok(0) => return Err(ReceiveError::Upstream(Failure::Closed(Named(side)))),
            Ok(_) => progress.received = true,
            Err(err) => return Err(ReceiveError::Upstream(Failure::Io(Named(side), err))),
        }
    }
}

#[cfg(test)]
mod forwarded_tests {
    #[test]
    fn our_forwarded_line_replaces_the_clients() {
        let head = b"GET / HTTP/1.1\r\nHost: web\r\nForwarded: for=evil\r\nFORWARDED:for=x\r\nX-Forwarded-For: a\r\n\r\n";
        let rewritten =
            super::with_forwarded(head, b"Forwarded: for=\"10.0.0.7:41000\"\r\n", b"body");
        assert_eq!(
            rewritten,
            b"GET / HTTP/1.1\r\nHost: web\r\nX-Forwarded-For: a\r\nForwarded: for=\"10.0.0.7:41000\"\r\n\r\nbody"
        );
    }
}
