//! Request and response heads: parsed in place (httparse, headers on the
//! stack) for what routing and framing need, and never re-encoded, so the
//! pod sees each request exactly as the client sent it. The only rewrite is
//! a response's `Connection: close` once the port is closing.
use std::mem::MaybeUninit;

use super::body::Framing;
use crate::http_route::{Request, Side};

/// More header lines than this in a request is answered 431.
const MAX_REQUEST_HEADERS: usize = 128;
/// More than this in a response is a bad gateway.
const MAX_RESPONSE_HEADERS: usize = 256;

/// What the router needs of a request it parsed.
#[derive(Debug)]
pub struct RequestHead {
    /// Bytes of the head, blank line included.
    pub len: usize,
    pub side: Side,
    pub framing: Framing,
    /// The client expects the connection to stay open after the answer.
    pub keep_alive: bool,
    pub http10: bool,
    pub method: Method,
    /// `Upgrade` was asked for (`Connection: upgrade` and an `Upgrade` header).
    pub upgrade: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    Head,
    Connect,
    /// Safe to send again on a fresh connection when a reused one turned out
    /// closed before answering (RFC 9110, section 9.2.2).
    Idempotent,
    Other,
}

impl RequestHead {
    /// Can be sent again, whole, if a kept upstream was found closed before it
    /// answered: no body (nothing streamed that we no longer hold).
    pub fn retryable(&self) -> bool {
        self.framing == Framing::Empty && matches!(self.method, Method::Idempotent | Method::Head)
    }
}

/// Why a request head was refused; each is answered and the connection closed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RequestError {
    #[error("malformed request head ({0})")]
    Malformed(&'static str),
    #[error("request head too large")]
    TooLarge,
    #[error("ambiguous request framing ({0})")]
    Framing(&'static str),
}

impl RequestError {
    pub fn status(&self) -> &'static str {
        match self {
            Self::TooLarge => "431 Request Header Fields Too Large",
            Self::Malformed(_) | Self::Framing(_) => "400 Bad Request",
        }
    }
}

/// Parses the request head at the start of `buf`; `None` while it is
/// incomplete. Calls `pick` once a whole head no longer than `max_head` is
/// there.
pub fn parse_request(
    buf: &[u8],
    max_head: usize,
    pick: impl FnOnce(&Request<'_>) -> Side,
) -> Result<Option<RequestHead>, RequestError> {
    let mut slots = [const { MaybeUninit::uninit() }; MAX_REQUEST_HEADERS];
    let mut request = httparse::Request::new(&mut []);
    let len = match httparse::ParserConfig::default().parse_request_with_uninit_headers(
        &mut request,
        buf,
        &mut slots,
    ) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(RequestError::TooLarge),
        Err(err) => return Err(RequestError::Malformed(describe(err))),
    };
    if len > max_head {
        return Err(RequestError::TooLarge);
    }
    // A bare LF ends a line for httparse but not for every server: refuse
    // it rather than let the pod split the head where we did not.
    let head = &buf[..len];
    if head
        .iter()
        .enumerate()
        .any(|(at, byte)| *byte == b'\n' && (at == 0 || head[at - 1] != b'\r'))
    {
        return Err(RequestError::Malformed("bare LF"));
    }
    let (Some(method), Some(path), Some(version)) = (request.method, request.path, request.version)
    else {
        return Err(RequestError::Malformed("incomplete request line"));
    };
    let http10 = version == 0;
    let fields = Fields::read(request.headers)?;
    let framing = match (fields.chunked, fields.length) {
        (Some(_), Some(_)) => {
            return Err(RequestError::Framing(
                "Transfer-Encoding with Content-Length",
            ));
        }
        (Some(false), None) => {
            return Err(RequestError::Framing(
                "Transfer-Encoding not ending in chunked",
            ));
        }
        // RFC 9112, 6.1: an HTTP/1.0 message with Transfer-Encoding is faulty.
        (Some(true), None) if http10 => {
            return Err(RequestError::Framing("Transfer-Encoding in HTTP/1.0"));
        }
        (Some(true), None) => Framing::Chunked,
        (None, Some(0)) | (None, None) => Framing::Empty,
        (None, Some(length)) => Framing::Length(length),
    };
    let mut pairs = [("", &b""[..]); MAX_REQUEST_HEADERS];
    for (pair, header) in pairs.iter_mut().zip(request.headers.iter()) {
        *pair = (header.name, header.value);
    }
    let side = pick(&Request {
        method,
        path,
        headers: &pairs[..request.headers.len()],
    });
    Ok(Some(RequestHead {
        len,
        side,
        framing,
        keep_alive: fields.keep_alive(http10),
        http10,
        method: match method {
            "HEAD" => Method::Head,
            "CONNECT" => Method::Connect,
            "GET" | "OPTIONS" | "TRACE" | "PUT" | "DELETE" => Method::Idempotent,
            _ => Method::Other,
        },
        upgrade: fields.upgrade && fields.connection_upgrade,
    }))
}

/// What the router needs of a response head.
#[derive(Debug)]
pub struct ResponseHead {
    pub len: usize,
    pub kind: Kind,
    pub framing: Framing,
    /// Both ends may keep the connection for another request.
    pub keep_alive: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// 1xx other than 101: forwarded, then the final answer follows.
    Interim,
    /// 101 to an upgrade, or 2xx to CONNECT: the connection becomes a tunnel.
    Tunnel,
    Final,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ResponseError {
    #[error("a malformed response head ({0})")]
    Malformed(&'static str),
    #[error("a response head with too many header lines")]
    TooManyHeaders,
    #[error("a response with ambiguous framing ({0})")]
    Framing(&'static str),
    #[error("101 Switching Protocols to a request that asked for no upgrade")]
    UnaskedSwitch,
}

/// Parses the response head at the start of `buf`, the answer to `request`.
pub fn parse_response(
    buf: &[u8],
    request: &RequestHead,
) -> Result<Option<ResponseHead>, ResponseError> {
    let mut slots = [const { MaybeUninit::uninit() }; MAX_RESPONSE_HEADERS];
    let mut response = httparse::Response::new(&mut []);
    let len = match httparse::ParserConfig::default().parse_response_with_uninit_headers(
        &mut response,
        buf,
        &mut slots,
    ) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(ResponseError::TooManyHeaders),
        Err(err) => return Err(ResponseError::Malformed(describe(err))),
    };
    let (Some(code), Some(version)) = (response.code, response.version) else {
        return Err(ResponseError::Malformed("incomplete status line"));
    };
    let http10 = version == 0;
    let kind = match code {
        101 if request.upgrade => Kind::Tunnel,
        101 => return Err(ResponseError::UnaskedSwitch),
        100..=199 => Kind::Interim,
        200..=299 if request.method == Method::Connect => Kind::Tunnel,
        _ => Kind::Final,
    };
    let fields = Fields::read(response.headers).map_err(|err| match err {
        RequestError::Framing(what) | RequestError::Malformed(what) => ResponseError::Framing(what),
        RequestError::TooLarge => ResponseError::TooManyHeaders,
    })?;
    let framing =
        if kind != Kind::Final || request.method == Method::Head || code == 204 || code == 304 {
            Framing::Empty
        } else {
            match (fields.chunked, fields.length) {
                // RFC 9112, 6.3: such a message ought to be handled as an error,
                // and we forward heads unchanged, so we cannot drop the length.
                (Some(_), Some(_)) => {
                    return Err(ResponseError::Framing(
                        "Transfer-Encoding with Content-Length",
                    ));
                }
                (Some(true), None) => Framing::Chunked,
                (Some(false), None) | (None, None) => Framing::UntilClose,
                (None, Some(length)) => Framing::Length(length),
            }
        };
    // A 1.1 server answering a 1.0 client keeps the connection only if it says so.
    let keep_alive = request.keep_alive
        && framing != Framing::UntilClose
        && fields.keep_alive(http10 || request.http10);
    Ok(Some(ResponseHead {
        len,
        kind,
        framing,
        keep_alive,
    }))
}

/// `head` (a whole response head) with its `Connection` and `Keep-Alive`
/// lines replaced by `Connection: close`, appended to `out`.
pub fn with_close(head: &[u8], out: &mut Vec<u8>) {
    let mut lines = head.split_inclusive(|byte| *byte == b'\n');
    // The status line, and any blank lines before it.
    for line in lines.by_ref() {
        out.extend_from_slice(line);
        if !is_blank(line) {
            break;
        }
    }
    for line in lines {
        if is_blank(line) {
            break;
        }
        if !is_field(line, b"connection") && !is_field(line, b"keep-alive") {
            out.extend_from_slice(line);
        }
    }
    out.extend_from_slice(b"Connection: close\r\n\r\n");
}

/// A complete answer of ours, for when the request cannot be served.
pub fn error_response(status: &str, message: &str) -> Vec<u8> {
    // One line, whatever an error's text holds.
    let body = format!("remocal: {}\n", message.replace(['\r', '\n'], " "));
    format!(
        "HTTP/1.1 {status}\r\nConnection: close\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

fn describe(err: httparse::Error) -> &'static str {
    match err {
        httparse::Error::HeaderName => "invalid header name",
        httparse::Error::HeaderValue => "invalid header value",
        httparse::Error::NewLine => "invalid line end",
        httparse::Error::Status => "invalid status",
        httparse::Error::Token => "invalid token",
        httparse::Error::TooManyHeaders => "too many headers",
        httparse::Error::Version => "invalid HTTP version",
    }
}

fn is_blank(line: &[u8]) -> bool {
    line == b"\r\n" || line == b"\n"
}

fn is_field(line: &[u8], name: &[u8]) -> bool {
    line.len() > name.len()
        && line[..name.len()].eq_ignore_ascii_case(name)
        && line[name.len()] == b':'
}

/// The header fields that decide framing and persistence.
#[derive(Default)]
struct Fields {
    /// `Some(last coding is chunked)` when Transfer-Encoding was sent.
    chunked: Option<bool>,
    length: Option<u64>,
    close: bool,
    keep_alive: bool,
    connection_upgrade: bool,
    upgrade: bool,
}

impl Fields {
    fn read(headers: &[httparse::Header<'_>]) -> Result<Self, RequestError> {
        let mut fields = Self::default();
        for header in headers {
            let name = header.name.as_bytes();
            if name.eq_ignore_ascii_case(b"content-length") {
                let mut found = false;
                for value in list(header.value) {
                    found = true;
                    let length = parse_length(value)
                        .ok_or(RequestError::Framing("invalid Content-Length"))?;
                    if fields.length.is_some_and(|seen| seen != length) {
                        return Err(RequestError::Framing("conflicting Content-Length values"));
                    }
                    fields.length = Some(length);
                }
                if !found {
                    return Err(RequestError::Framing("empty Content-Length"));
                }
            } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
                for coding in list(header.value) {
                    if fields.chunked == Some(true) {
                        // Chunked must be applied once, and last.
                        return Err(RequestError::Framing("a coding after chunked"));
                    }
                    fields.chunked = Some(coding.eq_ignore_ascii_case(b"chunked"));
                }
                fields.chunked.get_or_insert(false);
            } else if name.eq_ignore_ascii_case(b"connection") {
                for option in list(header.value) {
                    fields.close |= option.eq_ignore_ascii_case(b"close");
                    fields.keep_alive |= option.eq_ignore_ascii_case(b"keep-alive");
                    fields.connection_upgrade |= option.eq_ignore_ascii_case(b"upgrade");
                }
            } else if name.eq_ignore_ascii_case(b"upgrade") {
                fields.upgrade = true;
            }
        }
        Ok(fields)
    }

    /// HTTP/1.1 persists unless told to close; HTTP/1.0 only when asked.
    fn keep_alive(&self, http10: bool) -> bool {
        !self.close && (!http10 || self.keep_alive)
    }
}

/// The non-empty elements of a comma-separated header value.
fn list(value: &[u8]) -> impl Iterator<Item = &[u8]> {
    value
        .split(|byte| *byte == b',')
        .map(<[u8]>::trim_ascii)
        .filter(|element| !element.is_empty())
}

fn parse_length(value: &[u8]) -> Option<u64> {
    if value.is_empty() || value.len() > 19 || !value.iter().all(u8::is_ascii_digit) {
        return None;
    }
    value.iter().try_fold(0u64, |total, digit| {
        total.checked_mul(10)?.checked_add(u64::from(digit - b'0'))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn closing_replaces_every_connection_line() {
        let head = b"HTTP/1.1 200 OK\r\nconnection: keep-alive, x-a\r\nKeep-Alive: timeout=5\r\nx-connection: kept\r\nContent-Length: 2\r\nCONNECTION: x-b\r\n\r\n";
        let mut out = Vec::new();
        with_close(head, &mut out);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "HTTP/1.1 200 OK\r\nx-connection: kept\r\nContent-Length: 2\r\nConnection: close\r\n\r\n"
        );
    }

    #[test]
    fn routing_sees_the_request_as_sent() {
        let head =
            b"PUT /a/b?c=d HTTP/1.1\r\nHost: web\r\nX-Dev: alice\r\nContent-Length: 3\r\n\r\nabc";
        let parsed = parse_request(head, 1024, |request| {
            assert_eq!((request.method, request.path), ("PUT", "/a/b?c=d"));
            assert_eq!(request.headers[1], ("X-Dev", &b"alice"[..]));
            Side::Session(7)
        })
        .unwrap()
        .unwrap();
        assert_eq!(parsed.len, head.len() - 3);
        assert_eq!(
            (parsed.side, parsed.framing),
            (Side::Session(7), Framing::Length(3))
        );
        assert!(parsed.keep_alive && !parsed.retryable());
        let partial = parse_request(&head[..20], 1024, |_| unreachable!("not whole yet"));
        assert!(matches!(partial, Ok(None)));
        let long = parse_request(head, 20, |_| unreachable!("too long to route"));
        assert_eq!(long.unwrap_err(), RequestError::TooLarge);
    }

    /// Shuffled pieces of HTTP and junk: no input may panic the parsers.
    #[test]
    fn no_input_makes_parsing_panic() {
        let pieces: [&[u8]; 14] = [
            b"GET ",
            b"/ ",
            b"HTTP/1.1",
            b"HTTP/1.0",
            b"\r\n",
            b"\n",
            b"\r",
            b"Content-Length: ",
            b"Transfer-Encoding: chunked",
            b"0",
            b"5",
            b":",
            b"\xff",
            b"HTTP/1.1 101 x",
        ];
        let upgrade = b"GET / HTTP/1.1\r\nConnection: upgrade\r\nUpgrade: x\r\n\r\n";
        let request = parse_request(upgrade, 1024, |_| Side::Pod)
            .unwrap()
            .unwrap();
        let mut seed = 0x2545_f491_4f6c_dd1d_u64;
        for _ in 0..20_000 {
            let mut input = Vec::new();
            seed = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
            for _ in 0..(seed >> 60) {
                seed = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
                input.extend_from_slice(pieces[(seed >> 33) as usize % pieces.len()]);
            }
            let _ = parse_request(&input, 64, |_| Side::Pod);
            let _ = parse_response(&input, &request);
            let _ = super::super::body::Body::new(Framing::Chunked).take(&input);
            with_close(&input, &mut Vec::new());
        }
    }
}
