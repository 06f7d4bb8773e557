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

use crate::{netlink::NetlinkError, sock_diag::SockDiag};

#[derive(Debug, thiserror::Error)]
pub enum ForgetError {
    #[error("the agent still holds the socket with that four-tuple (TCP state {0})")]
    Held(u8),
    #[error(transparent)]
    Netlink(#[from] NetlinkError),
}

/// Destroys the unheld socket bound to `local` and connected to `remote`
/// in the namespace of the calling thread (the maker's), opening `diag`
/// there on first use.
pub fn forget(
    diag: &mut Option<SockDiag>,
    local: SocketAddr,
    remote: SocketAddr,
) -> Result<(), ForgetError> {
    let diag = match diag {
        Some(diag) => diag,
        None => diag.insert(SockDiag::open_here().map_err(NetlinkError::from)?),
    };
    let found = diag.find(local, remote)?;
    if found.inode != 0 {
        return Err(ForgetError::Held(found.state));
    }
    diag.destroy(&found)?;
    Ok(())
}
