//! One request stream, from the client's connection to its side's and back:
//! the head as the client sent it, interim answers (1xx), then both bodies
//! at once (bidirectional gRPC streams included), trailers both ways, and a
//! reset on either side carried to the other with its reason. A side that
//! cannot be reached gets the client a 502 (gRPC: UNAVAILABLE) on this
//! stream only.
//!
//! The stream is one task polling every handle of both h2 streams, so a
//! reset seen on one side reaches the other at once, whichever direction is
//! waiting for what.
use std::{
    future::{Future as _, poll_fn},
    pin::{Pin, pin},
    task::{Context, Poll},
};

use bytes::Bytes;
use h2::{Reason, RecvStream, SendStream, client::ResponseFuture, server::SendResponse};

use super::{
    answer::{answer_failure, is_grpc},
    clients::{Client, Failure, Named, Opening, Reopen},
    pipe::{Broken, Pipe, remote_reset},
};
use crate::http_route::Side;

/// Serves one stream until both its directions ended.
pub async fn relay(
    request: http::Request<RecvStream>,
    mut respond: SendResponse<Bytes>,
    opening: Opening,
    reopen: Reopen,
) {
    let side = reopen.side();
    let (parts, down_recv) = request.into_parts();
    let grpc = is_grpc(&parts.headers);
    let end_of_stream = down_recv.is_end_stream();
    let head = upstream_head(parts);
    let sent = {
        let mut send = pin!(send_head(opening, &reopen, head, end_of_stream));
        poll_fn(|cx| {
            if let Poll::Ready(reset) = respond.poll_reset(cx) {
                return Poll::Ready(Err(reset));
            }
            send.as_mut().poll(cx).map(Ok)
        })
        .await
    };
    let (head, up_send) = match sent {
        Ok(Ok(sent)) => sent,
        Ok(Err(failure)) => return answer_failure(respond, grpc, &failure),
        Err(reset) => {
            tracing::debug!(
                ?side,
                ?reset,
                "client reset an h2 stream before it was sent"
            );
            return;
        }
    };
    let mut relay = Relay {
        side,
        grpc,
        down_recv,
        up_send,
        request: Pipe::default(),
        request_done: end_of_stream,
        side_reset_seen: false,
        downstream: Downstream::Head(respond, head),
    };
    poll_fn(|cx| relay.poll(cx)).await;
}

/// Sends the head on the side's connection; when that connection stopped
/// taking streams (it closed, or said GOAWAY since it was handed out), once
/// more on a new one: the request has not left yet, so nothing is repeated.
pub(super) async fn send_head(
    opening: Opening,
    reopen: &Reopen,
    head: http::Request<()>,
    end_of_stream: bool,
) -> Result<(ResponseFuture, SendStream<Bytes>), Failure> {
    let side = Named(reopen.side());
    let Client {
        mut send,
        mut generation,
        forwarded,
    } = opening.await?;
    let mut head = head;
    if let Some(forwarded) = forwarded {
        // Ours only: whoever reads the first one would believe the client.
        head.headers_mut()
            .insert(http::header::FORWARDED, forwarded);
    }
    let mut reopened = false;
    loop {
        match send.ready().await {
            Ok(mut ready) => {
                return ready
                    .send_request(head, end_of_stream)
                    .map_err(|err| Failure::Upstream(side, err.into()));
            }
            Err(err) if !reopened => {
                tracing::debug!(%side, %err, "h2 connection to a side ended; opening another");
                reopened = true;
                Client {
                    send,
                    generation,
                    ..
                } = reopen.reopen(generation).await?;
            }
            Err(err) => return Err(Failure::Upstream(side, err.into())),
        }
    }
}

/// The request as the side gets it: method, URI and headers as the client
/// sent them. Without `:authority` the `http` crate keeps no scheme either,
/// and h2 then sends the request as one forwarded from HTTP/1 (`:scheme
/// http`, the client's `host` header, if any, as a header).
fn upstream_head(mut parts: http::request::Parts) -> http::Request<()> {
    if parts.uri.scheme().is_none() && parts.uri.authority().is_none() {
        parts.version = http::Version::HTTP_11;
    }
    http::Request::from_parts(parts, ())
}

/// The client's half of the stream, as the response goes.
enum Downstream {
    /// Waiting for the side's response head.
    Head(SendResponse<Bytes>, ResponseFuture),
    /// The response body, from the side's stream to the client's.
    Body(SendStream<Bytes>, RecvStream, Pipe),
    /// The response was sent whole; the request body may still be going.
    Sent(SendStream<Bytes>),
    /// Answered by the agent, or reset.
    Gone,
}

impl Downstream {
    fn reset(&mut self, reason: Reason) {
        match std::mem::replace(self, Downstream::Gone) {
            Downstream::Head(mut respond, _) => respond.send_reset(reason),
            Downstream::Body(mut send, ..) | Downstream::Sent(mut send) => send.send_reset(reason),
            Downstream::Gone => {}
        }
    }

    /// A reset by the client (or the loss of its connection).
    fn poll_reset(&mut self, cx: &mut Context<'_>) -> Poll<Option<Reason>> {
        let reset = match self {
            Downstream::Head(respond, _) => respond.poll_reset(cx),
            Downstream::Body(send, ..) | Downstream::Sent(send) => send.poll_reset(cx),
            Downstream::Gone => return Poll::Pending,
        };
        reset.map(Result::ok)
    }
}

struct Relay {
    side: Side,
    grpc: bool,
    /// The request body, from the client's stream to the side's.
    down_recv: RecvStream,
    up_send: SendStream<Bytes>,
    request: Pipe,
    request_done: bool,
    side_reset_seen: bool,
    downstream: Downstream,
}

impl Relay {
    /// Ready when the stream is over, both ways or by a reset.
    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        if let Poll::Ready(reason) = self.downstream.poll_reset(cx) {
            tracing::debug!(side = ?self.side, ?reason, "client reset an h2 stream");
            self.up_send.send_reset(reason.unwrap_or(Reason::CANCEL));
            return Poll::Ready(());
        }
        if self.poll_side_reset(cx).is_ready() {
            return Poll::Ready(());
        }
        if !self.request_done {
            match self
                .request
                .poll(cx, &mut self.down_recv, &mut self.up_send)
            {
                Poll::Ready(Ok(())) => self.request_done = true,
                Poll::Ready(Err(Broken::Recv(reason))) => {
                    self.up_send.send_reset(reason.unwrap_or(Reason::CANCEL));
                    return Poll::Ready(());
                }
                // The side takes no more of the body: its response, or its
                // reset, says the rest.
                Poll::Ready(Err(Broken::Send(_))) => self.request_done = true,
                Poll::Pending => {}
            }
        }
        match self.poll_response(cx) {
            Poll::Ready(Ok(())) if self.request_done => Poll::Ready(()),
            Poll::Ready(Ok(())) | Poll::Pending => Poll::Pending,
            Poll::Ready(Err(())) => Poll::Ready(()),
        }
    }

    /// Watches for the side resetting its stream once the response began
    /// (before, the response future reports it). NO_ERROR only asks to stop
    /// sending the request body; any other reason resets the client's stream
    /// at once, also when waiting for the client to read: Ready then.
    fn poll_side_reset(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        if self.side_reset_seen
            || matches!(self.downstream, Downstream::Head(..) | Downstream::Gone)
        {
            return Poll::Pending;
        }
        match self.up_send.poll_reset(cx) {
            Poll::Ready(Ok(Reason::NO_ERROR)) => {
                self.side_reset_seen = true;
                self.request_done = true;
                Poll::Pending
            }
            Poll::Ready(Ok(reason)) => {
                tracing::debug!(side = ?self.side, ?reason, "side reset an h2 stream");
                self.downstream.reset(reason);
                Poll::Ready(())
            }
            // The side's connection failed: the response body's end tells.
            Poll::Ready(Err(_)) => {
                self.side_reset_seen = true;
                Poll::Pending
            }
            Poll::Pending => Poll::Pending,
        }
    }

    /// Ok once the response went to the client whole; Err once the stream
    /// ended otherwise (answered by the agent, or reset both ways).
    fn poll_response(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ()>> {
        loop {
            match &mut self.downstream {
                Downstream::Head(respond, head) => {
                    // Interim answers (100 Continue, 103 Early Hints) first,
                    // as they came.
                    while let Poll::Ready(Some(Ok(interim))) = head.poll_informational(cx) {
                        let _ = respond.send_informational(interim);
                    }
                    let response = std::task::ready!(Pin::new(head).poll(cx));
                    let Downstream::Head(mut respond, _) =
                        std::mem::replace(&mut self.downstream, Downstream::Gone)
                    else {
                        return Poll::Ready(Err(()));
                    };
                    let response = match response {
                        Ok(response) => response,
                        Err(err) => {
                            match remote_reset(&err) {
                                Some(reason) => respond.send_reset(reason),
                                None => {
                                    let failure = Failure::Upstream(Named(self.side), err.into());
                                    answer_failure(respond, self.grpc, &failure);
                                }
                            }
                            return Poll::Ready(Err(()));
                        }
                    };
                    let (parts, up_recv) = response.into_parts();
                    let end_of_stream = up_recv.is_end_stream();
                    let head = http::Response::from_parts(parts, ());
                    match respond.send_response(head, end_of_stream) {
                        Ok(send) if end_of_stream => self.downstream = Downstream::Sent(send),
                        Ok(send) => {
                            self.downstream = Downstream::Body(send, up_recv, Pipe::default())
                        }
                        Err(_) => {
                            self.up_send.send_reset(Reason::CANCEL);
                            return Poll::Ready(Err(()));
                        }
                    }
                }
                Downstream::Body(send, recv, pipe) => {
                    match std::task::ready!(pipe.poll(cx, recv, send)) {
                        Ok(()) => {
                            let Downstream::Body(send, ..) =
                                std::mem::replace(&mut self.downstream, Downstream::Gone)
                            else {
                                return Poll::Ready(Err(()));
                            };
                            self.downstream = Downstream::Sent(send);
                        }
                        Err(Broken::Recv(reason)) => {
                            send.send_reset(reason.unwrap_or(Reason::INTERNAL_ERROR));
                            return Poll::Ready(Err(()));
                        }
                        Err(Broken::Send(reason)) => {
                            self.up_send.send_reset(reason.unwrap_or(Reason::CANCEL));
                            return Poll::Ready(Err(()));
                        }
                    }
                }
                Downstream::Sent(_) => return Poll::Ready(Ok(())),
                Downstream::Gone => return Poll::Ready(Err(())),
            }
        }
    }
}
