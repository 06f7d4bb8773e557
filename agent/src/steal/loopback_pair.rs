//! A private pair of connected TCP sockets on the agent's loopback: how a
//! routed request reaches a filtered session. The session's end is carried
//! to the developer exactly like a stolen connection (same proxy, same
//! half-close and reset semantics), and the router writes the request into
//! the other end.
use std::{io, net::SocketAddr};

use socket2::{Domain, Protocol, SockAddr, Socket, Type};
use tokio::net::TcpStream;

/// Connects a fresh socket to a fresh listener that exists only for this
/// pair. Another process could connect to that listener in the moment it
/// exists, so the accepted peer must be our own socket's address.
pub fn loopback_pair() -> io::Result<(TcpStream, TcpStream)> {
    let listener = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP))?;
    listener.bind(&SockAddr::from(SocketAddr::from(([127, 0, 0, 1], 0))))?;
    listener.listen(4)?;
    // accept(2) honours the receive timeout: never wait long on a runtime thread.
    listener.set_read_timeout(Some(std::time::Duration::from_secs(1)))?;
    let address = listener.local_addr()?;
    let ours = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP))?;
    // Non-blocking, so that a SYN dropped from a listen queue someone else
    // filled cannot hold a runtime thread; on loopback the handshake
    // completes inside connect(2) anyway, and accept below waits at most 1 s.
    ours.set_nonblocking(true)?;
    match ours.connect(&address) {
        Err(err) if err.raw_os_error() == Some(libc::EINPROGRESS) => {}
        other => other?,
    }
    let own_address = ours.local_addr()?.as_socket();
    let theirs = loop {
        let (accepted, peer) = listener.accept()?;
        if peer.as_socket() == own_address {
            break accepted;
        }
    };
    drop(listener);
    let into_tokio = |socket: Socket| -> io::Result<TcpStream> {
        socket.set_tcp_nodelay(true)?;
        socket.set_nonblocking(true)?;
        TcpStream::from_std(socket.into())
    };
    Ok((into_tokio(ours)?, into_tokio(theirs)?))
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    #[tokio::test]
    async fn the_two_ends_are_connected_to_each_other() {
        let (mut ours, mut theirs) = super::loopback_pair().unwrap();
        assert_eq!(ours.local_addr().unwrap(), theirs.peer_addr().unwrap());
        ours.write_all(b"ping").await.unwrap();
        let mut got = [0; 4];
        theirs.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"ping");
    }
}
