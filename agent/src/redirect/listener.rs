//! The listener a stolen port's connections are assigned to. It is created
//! inside the target namespace (bpf_sk_assign only assigns sockets of the
//! packet's own namespace) and bound to an ephemeral port: the kernel hands
//! it SYNs for the stolen port, and accepted sockets keep the original
//! destination as their local address.
use std::{io, net::TcpListener};

use socket2::{Domain, Protocol, SockAddr, Socket, Type};

/// Room for bursts of new connections while the proxy catches up.
const BACKLOG: i32 = 4096;

/// One dual-stack socket serves IPv4 and IPv6; namespaces without IPv6 get an
/// IPv4-only one.
pub fn steal_listener() -> io::Result<TcpListener> {
    let socket = match dual_stack() {
        Ok(socket) => socket,
        Err(_) => {
            let socket = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP))?;
            socket.bind(&SockAddr::from(std::net::SocketAddr::from((
                [0, 0, 0, 0],
                0,
            ))))?;
            socket
        }
    };
    socket.listen(BACKLOG)?;
    socket.set_nonblocking(true)?;
    Ok(socket.into())
}

fn dual_stack() -> io::Result<Socket> {
    let socket = Socket::new(Domain::IPV6, Type::STREAM, Some(Protocol::TCP))?;
    socket.set_only_v6(false)?;
    socket.bind(&SockAddr::from(std::net::SocketAddr::from((
        std::net::Ipv6Addr::UNSPECIFIED,
        0,
    ))))?;
    Ok(socket)
}
