//! A call's outgoing messages as an HTTP/2 body.
use std::{
    pin::Pin,
    task::{Context, Poll, ready},
};

use bytes::Bytes;
use futures_core::Stream;
use http::{HeaderMap, HeaderValue};
use http_body::Frame;
use tonic::Status;

/// The encoded messages of a stream, then, from a server, the call's status
/// as trailers: `grpc-status: 0` when the stream ends, the error's when it
/// yields one. A client's body has no trailers: an error resets the stream.
pub struct FrameBody<S> {
    /// None once finished.
    frames: Option<S>,
    server: bool,
}

impl<S> FrameBody<S> {
    /// A response's body: the client learns how the call ended from its
    /// trailers.
    pub fn server(frames: S) -> Self {
        Self {
            frames: Some(frames),
            server: true,
        }
    }

    /// A request's body: gRPC requests carry no status, so an error can
    /// only reset the stream.
    pub fn client(frames: S) -> Self {
        Self {
            frames: Some(frames),
            server: false,
        }
    }
}

impl<S> http_body::Body for FrameBody<S>
where
    S: Stream<Item = Result<Bytes, Status>> + Unpin,
{
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let this = self.get_mut();
        let Some(frames) = this.frames.as_mut() else {
            return Poll::Ready(None);
        };
        let ending = match ready!(Pin::new(frames).poll_next(cx)) {
            Some(Ok(bytes)) => return Poll::Ready(Some(Ok(Frame::data(bytes)))),
            Some(Err(status)) => status,
            None => Status::ok(""),
        };
        this.frames = None;
        Poll::Ready(if this.server {
            Some(Ok(Frame::trailers(trailers(&ending))))
        } else if ending.code() == tonic::Code::Ok {
            None
        } else {
            Some(Err(ending))
        })
    }

    fn is_end_stream(&self) -> bool {
        self.frames.is_none()
    }
}

fn trailers(status: &Status) -> HeaderMap {
    let mut headers = HeaderMap::new();
    if status.add_header(&mut headers).is_err() {
        // Only metadata or details fail to encode, and this side sets
        // neither; the status code goes out in any case.
        headers.insert("grpc-status", HeaderValue::from(status.code() as i32));
    }
    headers
}
