//! In-process TCP servers: the pod's own process (inside the pod namespace) and the
//! developer's local process (on loopback of the host namespace).
//!
//! Every server counts the connections it accepted, because "the pod's process got
//! nothing while stolen" is only observable that way.

use std::future::Future;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::{JoinHandle, JoinSet};

use crate::netns::{Netns, listen_in_current_namespace};

/// A TCP server running `handler` for each connection on the current tokio runtime.
/// Dropping it closes the listener and aborts its connections.
pub struct TcpServer {
    addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

impl TcpServer {
    /// Serves an already bound listener (from any namespace).
    pub fn serve<H, F>(listener: std::net::TcpListener, handler: H) -> TcpServer
    where
        H: Fn(TcpStream) -> F + Send + Sync + 'static,
        F: Future<Output = ()> + Send + 'static,
    {
        let addr = listener.local_addr().expect("listener address");
        listener
            .set_nonblocking(true)
            .expect("nonblocking listener");
        let listener = TcpListener::from_std(listener).expect("tokio listener");
        let accepted = Arc::new(AtomicUsize::new(0));
        let counter = accepted.clone();
        let task = tokio::spawn(async move {
            // Connection tasks live in the set so that aborting the accept loop also
            // closes every connection it handed out.
            let mut connections = JoinSet::new();
            loop {
                tokio::select! {
                    result = listener.accept() => match result {
                        Ok((stream, _)) => {
                            counter.fetch_add(1, Ordering::SeqCst);
                            connections.spawn(handler(stream));
                        }
                        Err(e) => eprintln!("test server on {addr}: accept failed: {e}"),
                    },
                    Some(_) = connections.join_next(), if !connections.is_empty() => {}
                }
            }
        });
        TcpServer {
            addr,
            accepted,
            task,
        }
    }

    /// The developer's local process: loopback of the host namespace, free port.
    pub fn local<H, F>(handler: H) -> TcpServer
    where
        H: Fn(TcpStream) -> F + Send + Sync + 'static,
        F: Future<Output = ()> + Send + 'static,
    {
        let listener = listen_in_current_namespace((Ipv4Addr::LOCALHOST, 0).into())
            .expect("bind local server");
        TcpServer::serve(listener, handler)
    }

    /// A process inside `netns` listening on every address, IPv4 and IPv6, of `port`.
    pub fn in_netns<H, F>(netns: &Netns, port: u16, handler: H) -> TcpServer
    where
        H: Fn(TcpStream) -> F + Send + Sync + 'static,
        F: Future<Output = ()> + Send + 'static,
    {
        let listener = netns.listen(SocketAddr::new(Ipv6Addr::UNSPECIFIED.into(), port));
        TcpServer::serve(listener, handler)
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// How many connections this server has accepted so far.
    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

impl Drop for TcpServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A minimal HTTP/1.1 server answering every request with `200` and `body` plus a
/// newline, keeping the connection alive between requests, so one connection can be
/// followed across the start and end of a steal.
pub async fn http(stream: TcpStream, body: &'static str) {
    let mut stream = BufReader::new(stream);
    loop {
        let mut close = false;
        let mut line = String::new();
        // Request line and headers; a GET has no body to skip.
        loop {
            line.clear();
            match stream.read_line(&mut line).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
            if line.to_ascii_lowercase().starts_with("connection:")
                && line.to_ascii_lowercase().contains("close")
            {
                close = true;
            }
            if line == "\r\n" || line == "\n" {
                break;
            }
        }
        let response = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n{}\r\n{body}\n",
            body.len() + 1,
            if close { "Connection: close\r\n" } else { "" },
        );
        if stream
            .get_mut()
            .write_all(response.as_bytes())
            .await
            .is_err()
        {
            return;
        }
        if close {
            let _ = stream.get_mut().shutdown().await;
            return;
        }
    }
}

/// Sends back whatever it reads, passing half-close on.
/// A local process that reads each connection to its end (a reset ends it
/// too: what came before still counts) and keeps `what(received bytes)`.
pub fn recording<T: Send + 'static>(
    what: fn(Vec<u8>) -> T,
) -> (TcpServer, Arc<std::sync::Mutex<Vec<T>>>) {
    let kept = Arc::new(std::sync::Mutex::new(Vec::new()));
    let sink = kept.clone();
    let server = TcpServer::local(move |mut stream: TcpStream| {
        let sink = sink.clone();
        async move {
            let mut received = Vec::new();
            let _ = stream.read_to_end(&mut received).await;
            sink.lock().unwrap().push(what(received));
        }
    });
    (server, kept)
}

pub async fn echo(stream: TcpStream) {
    let (mut reader, mut writer) = stream.into_split();
    if tokio::io::copy(&mut reader, &mut writer).await.is_ok() {
        let _ = writer.shutdown().await;
    }
}

/// Reads the whole request (until the peer shuts its write side), and only then answers
/// with the request reversed: the answer cannot exist unless the EOF arrived, and every
/// byte of it depends on the request.
pub async fn reverse_after_eof(mut stream: TcpStream) {
    let mut request = Vec::new();
    if stream.read_to_end(&mut request).await.is_err() {
        return;
    }
    request.reverse();
    if stream.write_all(&request).await.is_ok() {
        let _ = stream.shutdown().await;
    }
}
