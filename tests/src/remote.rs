//! The remote side: clients on the node that talk to a pod, as other workloads of the
//! cluster would. `curl` is the real thing a user runs; the programmatic client is for
//! following one connection over time and for polling with tight bounds.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::time::timeout;

use crate::netns::Netns;

/// What a `curl` run showed the user.
#[derive(Debug)]
pub struct Curl {
    pub success: bool,
    pub body: String,
    pub stderr: String,
}

/// `ip netns exec <ns> curl URL` for `addr`; bounded so a black-holed connection shows up
/// as a failure instead of a hang.
pub async fn curl(from: &Netns, addr: SocketAddr) -> Curl {
    let url = format!("http://{addr}/");
    let out = from
        .tokio_command("curl")
        .args([
            "--silent",
            "--show-error",
            "--globoff",
            "--max-time",
            "10",
            &url,
        ])
        .kill_on_drop(true)
        .output()
        .await
        .unwrap_or_else(|e| panic!("cannot run curl in {}: {e}", from.name()));
    Curl {
        success: out.status.success(),
        body: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Runs curl and returns the body, failing the test if curl itself failed.
pub async fn curl_body(from: &Netns, addr: SocketAddr) -> String {
    let result = curl(from, addr).await;
    assert!(
        result.success,
        "curl http://{addr}/ from {} failed: {}",
        from.name(),
        result.stderr.trim()
    );
    result.body.trim().to_string()
}

/// One HTTP request/response on an open keep-alive connection; returns the body.
pub async fn http_exchange(stream: &mut TcpStream) -> io::Result<String> {
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: remocal-test\r\nAccept: */*\r\n\r\n")
        .await?;
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    let mut content_length = None;
    let mut first = true;
    loop {
        line.clear();
        if reader.read_line(&mut line).await? == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "connection closed before a full HTTP response",
            ));
        }
        if first {
            if !line.starts_with("HTTP/1.1 200") {
                return Err(io::Error::other(format!("unexpected status line {line:?}")));
            }
            first = false;
        }
        if let Some(value) = line.to_ascii_lowercase().strip_prefix("content-length:") {
            content_length = value.trim().parse::<usize>().ok();
        }
        if line == "\r\n" {
            break;
        }
    }
    let length =
        content_length.ok_or_else(|| io::Error::other("HTTP response without Content-Length"))?;
    let mut body = vec![0; length];
    reader.read_exact(&mut body).await?;
    Ok(String::from_utf8_lossy(&body).trim().to_string())
}

/// A fresh connection from `from` and one request on it, all within `limit`: one attempt
/// of a poll that must not be held up by a SYN that went nowhere.
pub async fn http_get(from: &Netns, addr: SocketAddr, limit: Duration) -> io::Result<String> {
    let attempt = async {
        let mut stream = from.connect(addr).await?;
        http_exchange(&mut stream).await
    };
    timeout(limit, attempt).await.map_err(|_| {
        io::Error::new(
            io::ErrorKind::TimedOut,
            format!("no answer within {limit:?}"),
        )
    })?
}
