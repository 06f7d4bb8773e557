//! The caller's half of a pass-through connection: what it asks the socket
//! maker for, waiting for the handshake, and saying what failed in the
//! pod's terms.
use std::{
    io,
    net::{Ipv4Addr, Ipv6Addr, SocketAddr},
    time::Duration,
};

use tokio::{io::Interest, net::TcpStream, sync::oneshot};

use super::maker::Failure;

/// How long the pod's server may take to accept a pass-through connection:
/// loopback never loses a SYN, so only a full accept queue delays it, and
/// this lets the kernel retry the SYN three times (1 s, 2 s, 4 s).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// A v4-mapped IPv6 address (what a dual-stack listener reports for IPv4
/// clients) is the IPv4 client it stands for.
pub fn canonical(client: SocketAddr) -> SocketAddr {
    match client {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::from((v4, v6.port())),
            None => client,
        },
        v4 => v4,
    }
}

/// The pod's server on loopback in the client's family: a socket bound to
/// an IPv4 address can only reach an IPv4 one.
pub fn server(client: SocketAddr, port: u16) -> SocketAddr {
    match client {
        SocketAddr::V4(_) => SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
        SocketAddr::V6(_) => SocketAddr::from((Ipv6Addr::LOCALHOST, port)),
    }
}

pub fn stopped(target: &str) -> io::Error {
    io::Error::other(format!(
        "the pass-through socket maker of {target} has stopped"
    ))
}

/// Waits for the maker's socket and for its handshake with the server.
pub async fn finish(
    made: oneshot::Receiver<Result<std::net::TcpStream, Failure>>,
    client: SocketAddr,
    server: SocketAddr,
    target: &str,
) -> io::Result<TcpStream> {
    let made = made.await.map_err(|_| stopped(target))?;
    let stream = made.map_err(|failure| explain(failure, client, server, target))?;
    let stream = TcpStream::from_std(stream)?;
    match tokio::time::timeout(CONNECT_TIMEOUT, connected(&stream)).await {
        Ok(Ok(())) => Ok(stream),
        Ok(Err(err)) => Err(explain(Failure::Connect(err), client, server, target)),
        Err(_) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!(
                "the pod's server on {server} in {target} did not accept the pass-through connection of {client} within {}s (its accept queue may be full)",
                CONNECT_TIMEOUT.as_secs()
            ),
        )),
    }
}

/// Waits for a non-blocking connect to finish, as tokio's own connect does.
async fn connected(stream: &TcpStream) -> io::Result<()> {
    loop {
        stream.writable().await?;
        if let Some(err) = stream.take_error()? {
            return Err(err);
        }
        match stream.peer_addr() {
            Ok(_) => return Ok(()),
            // Woken before the handshake finished: wait for the next event.
            Err(err) if err.raw_os_error() == Some(libc::ENOTCONN) => {
                let _ = stream.try_io(Interest::WRITABLE, || {
                    Err::<(), _>(io::ErrorKind::WouldBlock.into())
                });
            }
            Err(err) => return Err(err),
        }
    }
}

/// A failure in the pod's terms, keeping the error's kind.
fn explain(failure: Failure, client: SocketAddr, server: SocketAddr, target: &str) -> io::Error {
    let (err, message) = match failure {
        Failure::Socket(err) => {
            let message = format!(
                "cannot create a transparent socket in {target} for the pass-through of {client}: {err}"
            );
            (err, message)
        }
        Failure::Bind(err) if err.raw_os_error() == Some(libc::EADDRINUSE) => {
            let message = format!(
                "cannot use the client's address {client} in {target} for its pass-through: a socket there holds port {} (the pod listens on it itself)",
                client.port()
            );
            (err, message)
        }
        Failure::Bind(err) => {
            let message = format!(
                "cannot bind the pass-through socket to the client's address {client} in {target}: {err}"
            );
            (err, message)
        }
        Failure::Connect(err) if err.kind() == io::ErrorKind::ConnectionRefused => {
            let message = format!(
                "the pod's server does not listen on {server} in {target}, so the request of {client} cannot pass through (a server bound only to the pod's IP, or to one IP family, refuses pass-through connections)"
            );
            (err, message)
        }
        Failure::TupleInUse(detail) => {
            let message = format!(
                "cannot reuse the client's address {client} towards {server} in {target}: {detail}"
            );
            (io::Error::from(io::ErrorKind::AddrNotAvailable), message)
        }
        Failure::Connect(err) if err.raw_os_error() == Some(libc::EADDRNOTAVAIL) => {
            let message = format!(
                "cannot reuse the client's address {client} towards {server} in {target}: an earlier pass-through of it is still open or could not be ended"
            );
            (err, message)
        }
        Failure::Connect(err) => {
            let message = format!(
                "cannot connect the pass-through of {client} to the pod's server on {server} in {target}: {err}"
            );
            (err, message)
        }
    };
    io::Error::new(err.kind(), message)
}
