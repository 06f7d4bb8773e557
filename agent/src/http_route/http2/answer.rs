//! The agent's own answer to a stream its side did not answer: the client
//! learns which side failed and why, in the form it reads (a 502 body for
//! HTTP, the status message for gRPC, whose clients ignore HTTP statuses).
use std::fmt::Write as _;

use bytes::Bytes;
use h2::server::SendResponse;
use http::{
    HeaderMap, HeaderValue, StatusCode,
    header::{CONTENT_LENGTH, CONTENT_TYPE},
};

use super::clients::Failure;

pub fn is_grpc(headers: &HeaderMap) -> bool {
    headers
        .get(CONTENT_TYPE)
        .is_some_and(|value| value.as_bytes().starts_with(b"application/grpc"))
}

/// Answers a stream whose side gave no response head, saying why: a 502 to
/// HTTP clients, UNAVAILABLE to gRPC clients (which read no HTTP status).
pub fn answer_failure(mut respond: SendResponse<Bytes>, grpc: bool, failure: &Failure) {
    tracing::debug!(%failure, grpc, "answering an h2 stream itself");
    let mut response = http::Response::new(());
    let headers = response.headers_mut();
    if grpc {
        // Trailers-only: the status in the one HEADERS frame, ending the stream.
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
        headers.insert("grpc-status", HeaderValue::from_static("14"));
        if let Ok(message) = HeaderValue::try_from(grpc_message(&format!("remocal: {failure}"))) {
            headers.insert("grpc-message", message);
        }
        let _ = respond.send_response(response, true);
        return;
    }
    let body = Bytes::from(format!("remocal: {failure}\n"));
    headers.insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    headers.insert(CONTENT_LENGTH, HeaderValue::from(body.len()));
    *response.status_mut() = StatusCode::BAD_GATEWAY;
    if let Ok(mut send) = respond.send_response(response, false) {
        // A few bytes: queued past the window if need be.
        let _ = send.send_data(body, true);
    }
}

/// gRPC's percent-encoding of `grpc-message`: printable ASCII but `%` as is.
fn grpc_message(text: &str) -> String {
    let mut encoded = String::with_capacity(text.len());
    for byte in text.bytes() {
        if (0x20..=0x7e).contains(&byte) && byte != b'%' {
            encoded.push(char::from(byte));
        } else {
            let _ = write!(encoded, "%{byte:02X}");
        }
    }
    encoded
}

#[cfg(test)]
mod tests {
    use super::grpc_message;

    #[test]
    fn grpc_messages_are_percent_encoded() {
        assert_eq!(grpc_message("plain: text (1)"), "plain: text (1)");
        assert_eq!(grpc_message("100% été\n"), "100%25 %C3%A9t%C3%A9%0A");
    }
}
