//! Which protocol a connection speaks, from its first bytes. A client that
//! says nothing for a moment may be waiting for a server that speaks first
//! (SMTP, MySQL): the pod is then connected, and whoever speaks first
//! decides. An HTTP client that merely connected early is still routed, on
//! the pod connection already open.
use std::{io, time::Duration};

use bytes::BytesMut;
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpStream,
};

use remocal_proto::filter::is_token;

use super::{Opened, Side, Upstreams};

/// What HTTP/2 with prior knowledge starts with (RFC 9113, 3.4).
pub const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// Longer than any method we would take for HTTP/1.
const LONGEST_METHOD: usize = 32;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    Http1,
    Http2,
    Other,
}

/// A connection whose protocol is known.
pub struct Sniffed {
    pub protocol: Protocol,
    pub downstream: TcpStream,
    /// Bytes already read from the downstream; they come first.
    pub prefix: BytesMut,
    /// The pod's connection, when it was opened while the client was silent:
    /// the first upstream to the pod for this connection.
    pub pod: Option<Opened>,
    /// What the pod said first, when it spoke before the client.
    pub from_pod: BytesMut,
}

pub async fn sniff(
    mut downstream: TcpStream,
    upstreams: &impl Upstreams,
    quiet: Duration,
    undecided: Duration,
) -> Sniffed {
    let mut prefix = BytesMut::with_capacity(1024);
    let mut pod: Option<Opened> = None;
    let mut from_pod = BytesMut::new();
    let protocol = loop {
        if let Some(protocol) = classify(&prefix) {
            break protocol;
        }
        let read = if prefix.is_empty() && pod.is_none() {
            match tokio::time::timeout(quiet, downstream.read_buf(&mut prefix)).await {
                Ok(read) => read,
                Err(_) => {
                    // Silent client: connect the pod and see who speaks first.
                    match upstreams.open(Side::Pod).await {
                        Ok(upstream) => pod = Some(upstream),
                        Err(_) => break Protocol::Other,
                    }
                    continue;
                }
            }
        } else if let Some(upstream) = pod.as_mut().filter(|_| prefix.is_empty()) {
            tokio::select! {
                read = downstream.read_buf(&mut prefix) => read,
                // The server spoke first (or hung up): not HTTP.
                _ = upstream.stream.read_buf(&mut from_pod) => break Protocol::Other,
            }
        } else {
            // A client that started but stays undecided (`G`, then nothing)
            // is given to the pod after a while rather than held forever.
            match tokio::time::timeout(undecided, downstream.read_buf(&mut prefix)).await {
                Ok(read) => read,
                Err(_) => break Protocol::Other,
            }
        };
        match read {
            Ok(0) | Err(_) => break Protocol::Other,
            Ok(_) => {}
        }
    };
    Sniffed {
        protocol,
        downstream,
        prefix,
        pod,
        from_pod,
    }
}

/// `None` while the bytes so far could still be either protocol.
pub fn classify(bytes: &[u8]) -> Option<Protocol> {
    if bytes.is_empty() {
        return None;
    }
    let common = bytes.len().min(H2_PREFACE.len());
    if bytes[..common] == H2_PREFACE[..common] {
        return (common == H2_PREFACE.len()).then_some(Protocol::Http2);
    }
    let method_len = bytes.iter().take_while(|byte| is_token(**byte)).count();
    if method_len == bytes.len() {
        // Still reading the method.
        return (method_len > LONGEST_METHOD).then_some(Protocol::Other);
    }
    let looks_like_http1 = (1..=LONGEST_METHOD).contains(&method_len)
        && bytes[method_len] == b' '
        && bytes.get(method_len + 1).is_none_or(|target| {
            *target == b'/' || *target == b'*' || target.is_ascii_alphabetic()
        });
    Some(if looks_like_http1 {
        Protocol::Http1
    } else {
        Protocol::Other
    })
}

/// Hands the whole connection to the pod, byte for byte, half-closes included.
pub async fn pass_whole(sniffed: Sniffed, upstreams: &impl Upstreams) -> io::Result<()> {
    let Sniffed {
        mut downstream,
        prefix,
        pod,
        from_pod,
        ..
    } = sniffed;
    let mut upstream = match pod {
        Some(pod) => pod,
        None => upstreams.open(Side::Pod).await?,
    }
    .stream;
    downstream.write_all(&from_pod).await?;
    upstream.write_all(&prefix).await?;
    tokio::io::copy_bidirectional(&mut downstream, &mut upstream).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_and_prefaces_are_told_apart() {
        assert_eq!(classify(b"GET / HTTP/1.1\r\n"), Some(Protocol::Http1));
        assert_eq!(classify(b"POST /orders"), Some(Protocol::Http1));
        assert_eq!(classify(b"OPTIONS * HTTP/1.1"), Some(Protocol::Http1));
        assert_eq!(classify(b"GET http://x/ HTTP/1.1"), Some(Protocol::Http1));
        assert_eq!(classify(b"GE"), None);
        assert_eq!(classify(b"PRI * HTTP/2.0"), None);
        assert_eq!(classify(H2_PREFACE), Some(Protocol::Http2));
        assert_eq!(classify(b"\x16\x03\x01\x02\x00"), Some(Protocol::Other));
        assert_eq!(classify(b"SSH-2.0-OpenSSH\r\n"), Some(Protocol::Other));
        assert_eq!(classify(b"GET\t/"), Some(Protocol::Other));
        assert_eq!(classify(&[b'A'; 40]), Some(Protocol::Other));
    }
}
