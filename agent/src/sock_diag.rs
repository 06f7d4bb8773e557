//! The TCP sockets of a network namespace as the kernel's sock_diag netlink
//! family shows them, and ending one (SOCK_DESTROY, the call `ss -K`
//! makes; CONFIG_INET_DIAG_DESTROY). Used to take over a pod's existing
//! connections and to clear the pass-through's own TIME_WAIT leftovers.
//!
//! The netlink socket answers for the namespace of the thread that opened
//! it, whatever thread uses it later.
use std::{
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
};

use crate::netlink::{Message, Netlink, NetlinkError};

/// From include/uapi/linux/sock_diag.h and inet_diag.h.
const SOCK_DIAG_BY_FAMILY: u16 = 20;
const SOCK_DESTROY: u16 = 21;
const INET_DIAG_INFO: u16 = 2;
const INET_DIAG_REQ_BYTECODE: u16 = 1;
const INET_DIAG_BC_JMP: u8 = 1;
const INET_DIAG_BC_S_EQ: u8 = 11;
const INET_DIAG_BC_D_EQ: u8 = 12;
/// No cookie: find the socket by its addresses.
const NO_COOKIE: [u8; 8] = [0xff; 8];
pub const TCP_ESTABLISHED: u8 = 1;

/// Offsets in struct inet_diag_msg (family, state, timer, retrans, then
/// the 48-byte inet_diag_sockid, expires, rqueue, wqueue, uid, inode).
const STATE_AT: usize = 1;
const SPORT_AT: usize = 4;
const DPORT_AT: usize = 6;
const SRC_AT: usize = 8;
const DST_AT: usize = 24;
const COOKIE_AT: usize = 44;
const RQUEUE_AT: usize = 56;
const WQUEUE_AT: usize = 60;
const INODE_AT: usize = 68;
const MSG_LEN: usize = 72;

/// Offsets in struct tcp_info (include/uapi/linux/tcp.h), checked against
/// libc's definition by a test.
const LOST_AT: usize = 32;
const RETRANS_AT: usize = 36;
const RTT_AT: usize = 68;
const LAST_DATA_SENT_AT: usize = 44;
const LAST_DATA_RECV_AT: usize = 52;
const LAST_ACK_RECV_AT: usize = 56;
const BYTES_RECEIVED_AT: usize = 128;
const NOTSENT_AT: usize = 144;
const BYTES_SENT_AT: usize = 200;

/// One TCP socket as sock_diag reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TcpSocket {
    pub local: SocketAddr,
    pub remote: SocketAddr,
    pub state: u8,
    /// The kernel's id of the socket; a destroy names it so that a newer
    /// socket with the same four-tuple is never hit.
    pub cookie: [u8; 8],
    /// The inode of the socket's file: 0 when no process holds it (not yet
    /// accepted, TIME_WAIT, orphaned).
    pub inode: u32,
    /// Bytes received that the owner has not read.
    pub unread: u32,
    /// Bytes written that the peer has not acknowledged, sent or not.
    pub unacknowledged: u32,
    /// Present when the dump asked for it and the socket has it (a full
    /// socket, not a TIME_WAIT entry).
    pub activity: Option<Activity>,
}

/// What tcp_info says about a connection's recent traffic.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Activity {
    /// Milliseconds since the last data segment went out / came in, at the
    /// kernel's tick granularity (4 ms at HZ=250).
    pub since_sent_ms: u32,
    pub since_received_ms: u32,
    /// Milliseconds since the last acknowledgement came in, data or not.
    pub since_acknowledged_ms: u32,
    /// Bytes written but not yet sent.
    pub unsent: u32,
    /// Segments the kernel holds for lost, and segments retransmitted and
    /// not yet acknowledged.
    pub lost: u32,
    pub retransmitting: u32,
    /// Smoothed round-trip time, microseconds.
    pub rtt_us: u32,
    pub bytes_received: u64,
    /// Bytes sent, retransmissions included: it grows when the socket's
    /// owner speaks, not when the peer acknowledges.
    pub bytes_sent: u64,
}

pub struct SockDiag {
    netlink: Netlink,
}

impl SockDiag {
    /// A sock_diag socket for the calling thread's network namespace.
    pub fn open_here() -> io::Result<Self> {
        Ok(Self {
            netlink: Netlink::open(libc::NETLINK_SOCK_DIAG)?,
        })
    }

    /// Every socket of either family in `states` (a bit per TCP state) with
    /// `port` at either end, with its activity. The kernel filters on the
    /// port, but walks its whole connection table to do so (shared by all
    /// namespaces, sized by the node's memory): milliseconds, so for a first
    /// look, not for polling.
    pub fn dump(&mut self, states: u32, port: u16) -> Result<Vec<TcpSocket>, NetlinkError> {
        let mut sockets = Vec::new();
        for family in [libc::AF_INET, libc::AF_INET6] {
            let header = dump_request(family as u8, states, port);
            let mut bad = None;
            self.netlink
                .dump(SOCK_DIAG_BY_FAMILY, header.bytes(), |_, body| {
                    match parse(body) {
                        Some(socket) => sockets.push(socket),
                        None => bad = Some(body.len()),
                    }
                })?;
            if let Some(len) = bad {
                return Err(
                    io::Error::other(format!("short sock_diag answer ({len} bytes)")).into(),
                );
            }
        }
        Ok(sockets)
    }

    /// The socket bound to `local` and connected to `remote`, in any state,
    /// with its activity: one hash lookup in the kernel, microseconds.
    pub fn find(
        &mut self,
        local: SocketAddr,
        remote: SocketAddr,
    ) -> Result<TcpSocket, NetlinkError> {
        let found = self.netlink.query(
            SOCK_DIAG_BY_FAMILY,
            &exact_request(local, remote, NO_COOKIE, true),
        )?;
        parse(&found).ok_or_else(|| io::Error::other("short sock_diag answer").into())
    }

    /// Ends the socket at once, as a reset: its owner's next call fails
    /// with ECONNABORTED and the peer receives an RST. Refused with ENOENT
    /// when that socket is gone, even if another now has its four-tuple.
    pub fn destroy(&mut self, socket: &TcpSocket) -> Result<(), NetlinkError> {
        self.netlink.request(
            SOCK_DESTROY,
            0,
            &exact_request(socket.local, socket.remote, socket.cookie, false),
        )
    }
    /// Whether this kernel lets us end sockets (CONFIG_INET_DIAG_DESTROY)
    /// in this namespace: ending a socket that cannot exist is answered
    /// ENOENT where it does, EOPNOTSUPP where the kernel lacks it, and
    /// EPERM without CAP_NET_ADMIN there.
    pub fn can_destroy(&mut self) -> Result<(), NetlinkError> {
        let nowhere = SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0));
        match self.netlink.request(
            SOCK_DESTROY,
            0,
            &exact_request(nowhere, nowhere, [0; 8], false),
        ) {
            Ok(()) => Ok(()),
            Err(err) if matches!(err.errno(), Some(libc::ENOENT | libc::ESTALE)) => Ok(()),
            Err(err) => Err(err),
        }
    }
}

/// struct inet_diag_req_v2 for a dump, with a bytecode filter: local port
/// or remote port equal to `port`.
fn dump_request(family: u8, states: u32, port: u16) -> Message {
    let mut req = vec![family, libc::IPPROTO_TCP as u8];
    req.push(1 << (INET_DIAG_INFO - 1)); // idiag_ext: tcp_info
    req.push(0);
    req.extend_from_slice(&states.to_ne_bytes());
    req.extend_from_slice(&[0; 48]); // any socket: the bytecode picks
    // inet_diag_bc_op {code, yes, no} steps, as `ss` compiles an OR: a
    // port comparison is its op and one carrying the port in `no`; `yes`
    // goes on 8 bytes, `no` skips 12. Matching the local port lands on the
    // JMP, which always takes its `no` to the end (accept); not matching it
    // skips to the remote port's comparison, whose `no` lands past the end
    // (reject). The kernel checks that every jump lands on an op.
    let mut bytecode = Vec::with_capacity(20);
    for (code, yes, no) in [
        (INET_DIAG_BC_S_EQ, 8u8, 12u16),
        (0, 0, port),
        (INET_DIAG_BC_JMP, 4, 12),
        (INET_DIAG_BC_D_EQ, 8, 12),
        (0, 0, port),
    ] {
        bytecode.extend_from_slice(&[code, yes]);
        bytecode.extend_from_slice(&no.to_ne_bytes());
    }
    Message::new(&req).attr(INET_DIAG_REQ_BYTECODE, &bytecode)
}

/// struct inet_diag_req_v2 naming one socket, asking for its tcp_info
/// with `info`.
fn exact_request(local: SocketAddr, remote: SocketAddr, cookie: [u8; 8], info: bool) -> Message {
    let family = match local {
        SocketAddr::V4(_) => libc::AF_INET as u8,
        SocketAddr::V6(_) => libc::AF_INET6 as u8,
    };
    let ext = if info { 1 << (INET_DIAG_INFO - 1) } else { 0 };
    let mut req = vec![family, libc::IPPROTO_TCP as u8, ext, 0];
    req.extend_from_slice(&u32::MAX.to_ne_bytes()); // any state
    // struct inet_diag_sockid: ports and addresses in network order.
    req.extend_from_slice(&local.port().to_be_bytes());
    req.extend_from_slice(&remote.port().to_be_bytes());
    req.extend_from_slice(&address_bytes(local));
    req.extend_from_slice(&address_bytes(remote));
    req.extend_from_slice(&0u32.to_ne_bytes());
    req.extend_from_slice(&cookie);
    Message::new(&req)
}

/// An address in the 16 bytes inet_diag gives every family.
fn address_bytes(addr: SocketAddr) -> [u8; 16] {
    let mut bytes = [0; 16];
    match addr {
        SocketAddr::V4(v4) => bytes[..4].copy_from_slice(&v4.ip().octets()),
        SocketAddr::V6(v6) => bytes = v6.ip().octets(),
    }
    bytes
}

/// struct inet_diag_msg and its attributes.
fn parse(body: &[u8]) -> Option<TcpSocket> {
    if body.len() < MSG_LEN {
        return None;
    }
    let u32_at = |at: usize| u32::from_ne_bytes(body[at..at + 4].try_into().unwrap());
    let port_at = |at: usize| u16::from_be_bytes([body[at], body[at + 1]]);
    let ip_at = |at: usize| -> IpAddr {
        let bytes: [u8; 16] = body[at..at + 16].try_into().unwrap();
        if i32::from(body[0]) == libc::AF_INET {
            IpAddr::V4(Ipv4Addr::new(bytes[0], bytes[1], bytes[2], bytes[3]))
        } else {
            IpAddr::V6(Ipv6Addr::from(bytes))
        }
    };
    let activity = crate::netlink::attributes(body, MSG_LEN)
        .find(|(kind, _)| *kind == INET_DIAG_INFO)
        .and_then(|(_, info)| activity(info));
    Some(TcpSocket {
        local: SocketAddr::new(ip_at(SRC_AT), port_at(SPORT_AT)),
        remote: SocketAddr::new(ip_at(DST_AT), port_at(DPORT_AT)),
        state: body[STATE_AT],
        cookie: body[COOKIE_AT..COOKIE_AT + 8].try_into().unwrap(),
        inode: u32_at(INODE_AT),
        unread: u32_at(RQUEUE_AT),
        unacknowledged: u32_at(WQUEUE_AT),
        activity,
    })
}

/// The fields of struct tcp_info we use; an older kernel's shorter struct
/// lacks some, and then nothing is claimed about the connection.
fn activity(info: &[u8]) -> Option<Activity> {
    let u32_at = |at: usize| {
        info.get(at..at + 4)
            .map(|b| u32::from_ne_bytes(b.try_into().unwrap()))
    };
    let u64_at = |at: usize| {
        info.get(at..at + 8)
            .map(|b| u64::from_ne_bytes(b.try_into().unwrap()))
    };
    Some(Activity {
        since_sent_ms: u32_at(LAST_DATA_SENT_AT)?,
        since_received_ms: u32_at(LAST_DATA_RECV_AT)?,
        since_acknowledged_ms: u32_at(LAST_ACK_RECV_AT)?,
        unsent: u32_at(NOTSENT_AT)?,
        lost: u32_at(LOST_AT)?,
        retransmitting: u32_at(RETRANS_AT)?,
        rtt_us: u32_at(RTT_AT)?,
        bytes_received: u64_at(BYTES_RECEIVED_AT)?,
        bytes_sent: u64_at(BYTES_SENT_AT)?,
    })
}

#[cfg(test)]
mod tests {
    use std::{
        io::{Read as _, Write as _},
        mem::offset_of,
        net::{TcpListener, TcpStream},
    };

    use super::*;

    #[test]
    fn tcp_info_offsets_match_the_kernel_header() {
        assert_eq!(
            offset_of!(libc::tcp_info, tcpi_last_data_sent),
            LAST_DATA_SENT_AT
        );
        assert_eq!(
            offset_of!(libc::tcp_info, tcpi_last_data_recv),
            LAST_DATA_RECV_AT
        );
        assert_eq!(
            offset_of!(libc::tcp_info, tcpi_last_ack_recv),
            LAST_ACK_RECV_AT
        );
        assert_eq!(
            offset_of!(libc::tcp_info, tcpi_bytes_received),
            BYTES_RECEIVED_AT
        );
        assert_eq!(offset_of!(libc::tcp_info, tcpi_notsent_bytes), NOTSENT_AT);
        assert_eq!(offset_of!(libc::tcp_info, tcpi_lost), LOST_AT);
        assert_eq!(offset_of!(libc::tcp_info, tcpi_retrans), RETRANS_AT);
        assert_eq!(offset_of!(libc::tcp_info, tcpi_rtt), RTT_AT);
        assert_eq!(offset_of!(libc::tcp_info, tcpi_bytes_sent), BYTES_SENT_AT);
    }

    /// Real sockets on loopback (the test's own namespace): the dump finds
    /// the server's side with its counters, and a destroy resets the peer.
    #[test]
    fn dump_reports_a_connection_and_destroy_resets_it() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let mut client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (mut served, _) = listener.accept().unwrap();
        client.write_all(b"ping").unwrap();
        let mut buf = [0; 4];
        served.read_exact(&mut buf).unwrap();
        served.write_all(b"pong!").unwrap();
        client.read_exact(&mut [0; 5]).unwrap();

        let mut diag = SockDiag::open_here().unwrap();
        let found = diag.dump(1 << TCP_ESTABLISHED, port).unwrap();
        assert_eq!(found.len(), 2, "both ends: {found:?}");
        let socket = found
            .iter()
            .find(|socket| socket.local.port() == port)
            .expect("the server's end");
        assert_eq!(socket.local, served.local_addr().unwrap());
        assert_eq!(socket.remote, client.local_addr().unwrap());
        assert_ne!(socket.inode, 0);
        let activity = socket.activity.expect("tcp_info");
        assert_eq!(activity.bytes_received, 4);
        assert_eq!(activity.bytes_sent, 5);
        assert_eq!(activity.unsent, 0);
        let other = found.iter().find(|socket| socket.remote.port() == port);
        assert_eq!(
            other.expect("the client's end").local,
            client.local_addr().unwrap()
        );
        let unrelated = diag
            .dump(1 << TCP_ESTABLISHED, port.wrapping_add(1))
            .unwrap();
        assert!(
            unrelated
                .iter()
                .all(|socket| socket.local.port() != port && socket.remote.port() != port),
            "{unrelated:?}"
        );

        let again = diag.find(socket.local, socket.remote).unwrap();
        assert_eq!(again.cookie, socket.cookie);
        assert_eq!(again.activity.expect("tcp_info").bytes_sent, 5);

        diag.destroy(socket).unwrap();
        let err = client.read(&mut buf).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::ConnectionReset, "{err}");
        let gone = diag.destroy(socket).unwrap_err();
        assert_eq!(gone.errno(), Some(libc::ENOENT), "{gone}");
    }
}
