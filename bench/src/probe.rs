//! Keep-alive request latency measured by the bench itself: one connection,
//! one request at a time, each timed from its write to the last byte of its
//! answer. wrk's latency histogram disagreed with its own request count on
//! the stolen path here (a mean of 1.9 ms at 3,800 sequential requests/s), so
//! latency comes from this probe; wrk still drives the connection rate.

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use remocal_tests::netns::Netns;

use crate::request_run::{RequestRun, percentiles};

const REQUEST: &[u8] = b"GET / HTTP/1.1\r\nHost: remocal-bench\r\n\r\n";

/// Sequential requests to `addr` from `from` for `duration`.
pub async fn keep_alive(
    from: &Netns,
    addr: SocketAddr,
    duration: Duration,
) -> anyhow::Result<RequestRun> {
    let stream = from
        .run(|| TcpStream::connect(addr))
        .with_context(|| format!("connect to {addr}"))?;
    tokio::task::spawn_blocking(move || requests(stream, duration))
        .await
        .context("the probe died")?
}

fn requests(mut stream: TcpStream, duration: Duration) -> anyhow::Result<RequestRun> {
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut samples = Vec::new();
    let mut buffer = [0u8; 4096];
    let started = Instant::now();
    while started.elapsed() < duration {
        let sent = Instant::now();
        stream.write_all(REQUEST)?;
        let mut answer = Vec::new();
        while !complete(&answer)? {
            let n = stream.read(&mut buffer).context("read the answer")?;
            if n == 0 {
                bail!("the server closed the connection");
            }
            answer.extend_from_slice(&buffer[..n]);
        }
        samples.push(sent.elapsed().as_secs_f64() * 1e6);
    }
    let seconds = started.elapsed().as_secs_f64();
    Ok(RequestRun {
        connections: 1,
        requests: samples.len() as u64,
        errors: 0,
        requests_per_second: samples.len() as f64 / seconds,
        latency_us: percentiles(&mut samples),
    })
}

/// Whether `answer` holds a whole response (headers and Content-Length body).
fn complete(answer: &[u8]) -> anyhow::Result<bool> {
    let Some(end) = answer.windows(4).position(|w| w == b"\r\n\r\n") else {
        return Ok(false);
    };
    let headers = String::from_utf8_lossy(&answer[..end]).to_ascii_lowercase();
    let length = headers
        .lines()
        .find_map(|line| line.strip_prefix("content-length:"))
        .and_then(|value| value.trim().parse::<usize>().ok())
        .context("an answer without Content-Length")?;
    Ok(answer.len() >= end + 4 + length)
}

#[cfg(test)]
mod tests {
    use super::complete;

    #[test]
    fn an_answer_is_complete_with_its_whole_body() {
        let answer = b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nlocal\n";
        assert!(complete(answer).unwrap());
        assert!(!complete(&answer[..answer.len() - 1]).unwrap());
        assert!(!complete(b"HTTP/1.1 200 OK\r\n").unwrap());
    }
}
