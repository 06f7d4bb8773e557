//! Ending a TIME_WAIT pass-through socket that holds the four-tuple a new
//! pass-through needs.
//!
//! When the agent's side closed first, its socket (client address ->
//! loopback:port) waits in TIME_WAIT for 60 s. A client that reuses its
//! source port soon after (common when the agent closed first on the client
//! side too) needs that same four-tuple again. The kernel reuses a TIME_WAIT
//! tuple for an explicitly bound socket at once when the old connection
//! carried TCP timestamps (the default), and refuses with EADDRNOTAVAIL for
//! the whole 60 s when the namespace turned timestamps off. For that case
//! the maker destroys the TIME_WAIT entry with SOCK_DESTROY (sock_diag,
//! CONFIG_INET_DIAG_DESTROY): it is the agent's own finished connection on
//! loopback, where no stray segment of it can still be in flight.
//!
//! Only a socket no process holds is ended (TIME_WAIT, or closed by the
//! agent and still finishing its close), found first by an exact lookup and
//! then destroyed by its cookie: a pass-through of the same four-tuple the
//! agent still has open (its client already reused the port while the
//! server still sends) keeps going, and the new one fails.
use std::net::SocketAddr;

use super::netlink::{Message, Netlink, NetlinkError};

/// From include/uapi/linux/sock_diag.h and inet_diag.h.
const SOCK_DIAG_BY_FAMILY: u16 = 20;
const SOCK_DESTROY: u16 = 21;
/// No cookie: find the socket by its addresses.
const NO_COOKIE: [u8; 8] = [0xff; 8];
/// Offsets in struct inet_diag_msg: the state, the cookie at the end of its
/// inet_diag_sockid, and the inode of the socket's file (0 when no process
/// holds it: TIME_WAIT entries and orphans).
const STATE_AT: usize = 1;
const COOKIE_AT: usize = 4 + 40;
const INODE_AT: usize = 4 + 48 + 16;

#[derive(Debug, thiserror::Error)]
pub enum ForgetError {
    #[error("the agent still holds the socket with that four-tuple (TCP state {0})")]
    Held(u8),
    #[error("short sock_diag answer")]
    Short,
    #[error(transparent)]
    Netlink(#[from] NetlinkError),
}

/// Destroys the unheld socket bound to `local` and connected to `remote`
/// in the namespace of the calling thread (the maker's), opening `diag`
/// there on first use.
pub fn forget(
    diag: &mut Option<Netlink>,
    local: SocketAddr,
    remote: SocketAddr,
) -> Result<(), ForgetError> {
    let netlink = match diag {
        Some(netlink) => netlink,
        None => diag.insert(Netlink::open(libc::NETLINK_SOCK_DIAG).map_err(NetlinkError::from)?),
    };
    let found = netlink.query(SOCK_DIAG_BY_FAMILY, &request(local, remote, NO_COOKIE))?;
    let state = *found.get(STATE_AT).ok_or(ForgetError::Short)?;
    let inode = found
        .get(INODE_AT..INODE_AT + 4)
        .ok_or(ForgetError::Short)?;
    if inode != [0; 4] {
        return Err(ForgetError::Held(state));
    }
    let cookie = found
        .get(COOKIE_AT..COOKIE_AT + 8)
        .ok_or(ForgetError::Short)?
        .try_into()
        .expect("8 bytes");
    netlink.request(SOCK_DESTROY, 0, &request(local, remote, cookie))?;
    Ok(())
}

/// struct inet_diag_req_v2 naming one socket.
fn request(local: SocketAddr, remote: SocketAddr, cookie: [u8; 8]) -> Message {
    let family = match local {
        SocketAddr::V4(_) => libc::AF_INET as u8,
        SocketAddr::V6(_) => libc::AF_INET6 as u8,
    };
    let mut req = vec![family, libc::IPPROTO_TCP as u8, 0, 0];
    req.extend_from_slice(&u32::MAX.to_ne_bytes()); // any state
    // struct inet_diag_sockid: ports and addresses in network order.
    req.extend_from_slice(&local.port().to_be_bytes());
    req.extend_from_slice(&remote.port().to_be_bytes());
    req.extend_from_slice(&address(local));
    req.extend_from_slice(&address(remote));
    req.extend_from_slice(&0u32.to_ne_bytes());
    req.extend_from_slice(&cookie);
    Message::new(&req)
}

/// An address in the 16 bytes inet_diag gives every family.
fn address(addr: SocketAddr) -> [u8; 16] {
    let mut bytes = [0; 16];
    match addr {
        SocketAddr::V4(v4) => bytes[..4].copy_from_slice(&v4.ip().octets()),
        SocketAddr::V6(v6) => bytes = v6.ip().octets(),
    }
    bytes
}
