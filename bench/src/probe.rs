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

/// What the probe sends and, optionally, who must answer it.
#[derive(Clone, Copy, Default)]
pub struct Ask {
    /// One more header line (`name: value`): what a filtered steal matches.
    pub header: Option<&'static str>,
    /// The body the answer must carry (`bed::POD_BODY` or `bed::LOCAL_BODY`):
    /// a request served by the wrong side ends the run with an error.
    pub served_by: Option<&'static str>,
}

impl Ask {
    fn request(&self) -> Vec<u8> {
        let header = self
            .header
            .map_or(String::new(), |header| format!("{header}\r\n"));
        format!("GET / HTTP/1.1\r\nHost: remocal-bench\r\n{header}\r\n").into_bytes()
    }
}

/// Sequential requests to `addr` from `from` for `duration`.
pub async fn keep_alive(
    from: &Netns,
    addr: SocketAddr,
    duration: Duration,
) -> anyhow::Result<RequestRun> {
    keep_alive_asking(from, addr, duration, Ask::default()).await
}

/// The same, each request being `ask`.
pub async fn keep_alive_asking(
    from: &Netns,
    addr: SocketAddr,
    duration: Duration,
    ask: Ask,
) -> anyhow::Result<RequestRun> {
    let stream = from
        .run(|| TcpStream::connect(addr))
        .with_context(|| format!("connect to {addr}"))?;
    tokio::task::spawn_blocking(move || requests(stream, duration, ask))
        .await
        .context("the probe died")?
}

/// One request on a fresh connection, within `limit`: the body of the answer.
pub async fn once(
    from: &Netns,
    addr: SocketAddr,
    header: Option<&'static str>,
    limit: Duration,
) -> anyhow::Result<String> {
    let stream = from
        .run(|| TcpStream::connect_timeout(&addr, limit))
        .with_context(|| format!("connect to {addr}"))?;
    let ask = Ask {
        header,
        served_by: None,
    };
    tokio::task::spawn_blocking(move || -> anyhow::Result<String> {
        let mut stream = stream;
        stream.set_read_timeout(Some(limit))?;
        answer_body(&mut stream, &ask)
    })
    .await
    .context("the probe died")?
}

/// One request on `stream`, an open connection: the body of its answer,
/// trimmed (`bed::POD_BODY` or `bed::LOCAL_BODY`).
pub fn answer_body(stream: &mut TcpStream, ask: &Ask) -> anyhow::Result<String> {
    let answer = exchange(stream, &ask.request(), &mut [0u8; 4096])?;
    Ok(String::from_utf8_lossy(body(&answer)).trim().to_string())
}

fn requests(mut stream: TcpStream, duration: Duration, ask: Ask) -> anyhow::Result<RequestRun> {
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    let request = ask.request();
    let expected = ask.served_by.map(|body| format!("{body}\n"));
    let mut samples = Vec::new();
    let mut buffer = [0u8; 4096];
    let started = Instant::now();
    while started.elapsed() < duration {
        let sent = Instant::now();
        let answer = exchange(&mut stream, &request, &mut buffer)?;
        samples.push(sent.elapsed().as_secs_f64() * 1e6);
        if let Some(expected) = &expected
            && body(&answer) != expected.as_bytes()
        {
            bail!(
                "request {} was answered {:?}, not {expected:?}: served by the wrong side",
                samples.len(),
                String::from_utf8_lossy(body(&answer))
            );
        }
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

/// Writes `request` and reads its whole answer.
fn exchange(stream: &mut TcpStream, request: &[u8], buffer: &mut [u8]) -> anyhow::Result<Vec<u8>> {
    stream.write_all(request)?;
    let mut answer = Vec::new();
    while !complete(&answer)? {
        let n = stream.read(buffer).context("read the answer")?;
        if n == 0 {
            bail!("the server closed the connection");
        }
        answer.extend_from_slice(&buffer[..n]);
    }
    Ok(answer)
}

/// The body of a complete answer.
fn body(answer: &[u8]) -> &[u8] {
    answer
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map_or(&[][..], |end| &answer[end + 4..])
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
    use super::{Ask, body, complete};

    #[test]
    fn an_answer_is_complete_with_its_whole_body() {
        let answer = b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nlocal\n";
        assert!(complete(answer).unwrap());
        assert!(!complete(&answer[..answer.len() - 1]).unwrap());
        assert!(!complete(b"HTTP/1.1 200 OK\r\n").unwrap());
        assert_eq!(body(answer), b"local\n");
    }

    #[test]
    fn a_header_goes_before_the_blank_line() {
        let ask = Ask {
            header: Some("x-dev: alice"),
            served_by: None,
        };
        assert_eq!(
            ask.request(),
            b"GET / HTTP/1.1\r\nHost: remocal-bench\r\nx-dev: alice\r\n\r\n"
        );
        assert_eq!(
            Ask::default().request(),
            b"GET / HTTP/1.1\r\nHost: remocal-bench\r\n\r\n"
        );
    }
}
