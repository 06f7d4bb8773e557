//! TCP segments from spoofed source addresses, the way an attacker on the cluster's
//! network sends them (`hping3 --rand-source`): a raw IPv4 socket with `IP_HDRINCL`
//! writes whole packets, source address included, so nothing ties them to a socket.
//!
//! The socket is made inside a test namespace and keeps it. The answers the target's
//! kernel gives (SYN-ACKs, resets) are addressed to the spoofed sources: inside the
//! test topology no route leads there, so they are dropped where they are made.

use std::io;
use std::net::{Ipv4Addr, SocketAddrV4};

use socket2::{Domain, Protocol, SockAddr, Socket, Type};

use crate::data::splitmix64;
use crate::netns::Netns;

/// TCP header flags.
pub const FIN: u8 = 0x01;
pub const SYN: u8 = 0x02;
pub const PSH: u8 = 0x08;
pub const ACK: u8 = 0x10;

const IP_HEADER: usize = 20;
const TCP_HEADER: usize = 20;

/// Sends spoofed segments to one address.
pub struct Spoofer {
    socket: Socket,
    destination: SocketAddrV4,
    random: u64,
}

impl Spoofer {
    /// A raw socket in `from` sending to `destination`; `seed` makes the spoofed
    /// sources reproducible.
    pub fn new(from: &Netns, destination: SocketAddrV4, seed: u64) -> io::Result<Spoofer> {
        let socket = from.run(|| {
            let socket = Socket::new(
                Domain::IPV4,
                Type::RAW,
                Some(Protocol::from(libc::IPPROTO_RAW)),
            )?;
            // Implied by IPPROTO_RAW; said anyway, since the packets depend on it.
            socket.set_header_included_v4(true)?;
            Ok::<_, io::Error>(socket)
        })?;
        Ok(Spoofer {
            socket,
            destination,
            random: seed,
        })
    }

    fn next(&mut self) -> u64 {
        self.random = self.random.wrapping_add(1);
        splitmix64(self.random)
    }

    /// A random unicast address and port that nothing in the test topology uses (not
    /// 0/8, loopback, the topology's 198.18.0.0/15, nor multicast and above).
    pub fn random_source(&mut self) -> SocketAddrV4 {
        loop {
            let random = self.next();
            let ip = Ipv4Addr::from(random as u32);
            let [first, second, ..] = ip.octets();
            let taken = first == 0 || first == 127 || first >= 224;
            if taken || (first == 198 && (second & 0xfe) == 18) {
                continue;
            }
            let port = 1024 + (random >> 32) as u16 % (u16::MAX - 1024);
            return SocketAddrV4::new(ip, port);
        }
    }

    /// A random sequence number.
    pub fn random_seq(&mut self) -> u32 {
        self.next() as u32
    }

    /// One segment from `source` with `flags`, sequence number `seq` and `payload`
    /// (acknowledging nothing in particular when `flags` has ACK).
    pub fn send(
        &self,
        source: SocketAddrV4,
        seq: u32,
        flags: u8,
        payload: &[u8],
    ) -> io::Result<()> {
        let packet = packet(source, self.destination, seq, flags, payload);
        let sent = self
            .socket
            .send_to(&packet, &SockAddr::from(self.destination))?;
        if sent != packet.len() {
            return Err(io::Error::other(format!(
                "sent {sent} of {} bytes",
                packet.len()
            )));
        }
        Ok(())
    }

    /// `count` SYNs, each from a new random address and port with a random ISN.
    pub fn syn_flood(&mut self, count: usize) -> io::Result<()> {
        for _ in 0..count {
            let source = self.random_source();
            let isn = self.random_seq();
            self.send(source, isn, SYN, &[])?;
        }
        Ok(())
    }
}

/// An IPv4 packet carrying one TCP segment. The kernel fills in the IP header's
/// checksum and identification (raw(7)); the TCP checksum is ours to compute.
fn packet(
    source: SocketAddrV4,
    destination: SocketAddrV4,
    seq: u32,
    flags: u8,
    payload: &[u8],
) -> Vec<u8> {
    let total = IP_HEADER + TCP_HEADER + payload.len();
    let mut packet = Vec::with_capacity(total);
    packet.extend_from_slice(&[0x45, 0]); // version 4, 5 words of header; no TOS
    packet.extend_from_slice(&(total as u16).to_be_bytes());
    packet.extend_from_slice(&[0, 0, 0x40, 0]); // identification; don't fragment
    packet.extend_from_slice(&[64, libc::IPPROTO_TCP as u8, 0, 0]); // TTL, protocol, checksum
    packet.extend_from_slice(&source.ip().octets());
    packet.extend_from_slice(&destination.ip().octets());
    packet.extend_from_slice(&source.port().to_be_bytes());
    packet.extend_from_slice(&destination.port().to_be_bytes());
    packet.extend_from_slice(&seq.to_be_bytes());
    let ack = if flags & ACK != 0 {
        seq ^ 0x5a5a_5a5a
    } else {
        0
    };
    packet.extend_from_slice(&ack.to_be_bytes());
    packet.extend_from_slice(&[(TCP_HEADER as u8 / 4) << 4, flags]);
    packet.extend_from_slice(&64240u16.to_be_bytes()); // window
    packet.extend_from_slice(&[0, 0, 0, 0]); // checksum, urgent pointer
    packet.extend_from_slice(payload);

    let segment = &packet[IP_HEADER..];
    let mut pseudo = Vec::with_capacity(12);
    pseudo.extend_from_slice(&source.ip().octets());
    pseudo.extend_from_slice(&destination.ip().octets());
    pseudo.extend_from_slice(&[0, libc::IPPROTO_TCP as u8]);
    pseudo.extend_from_slice(&(segment.len() as u16).to_be_bytes());
    let checksum = internet_checksum(&[&pseudo, segment]);
    packet[IP_HEADER + 16..IP_HEADER + 18].copy_from_slice(&checksum.to_be_bytes());
    packet
}

/// RFC 1071: the ones' complement of the ones' complement sum of 16-bit words.
fn internet_checksum(parts: &[&[u8]]) -> u16 {
    let mut sum: u32 = 0;
    for part in parts {
        // Every part but the last has an even length here.
        for word in part.chunks(2) {
            sum += u32::from(u16::from_be_bytes([word[0], *word.get(1).unwrap_or(&0)]));
        }
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A receiver sums the segment with its checksum in place and must get zero.
    #[test]
    fn a_segment_checks_out_with_its_checksum() {
        let source = SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, 1), 12345);
        let destination = SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, 2), 80);
        for payload in [&b""[..], b"odd", b"even"] {
            let packet = packet(source, destination, 1, PSH | ACK, payload);
            let segment = &packet[IP_HEADER..];
            let mut pseudo = vec![10, 0, 0, 1, 10, 0, 0, 2, 0, 6, 0];
            pseudo.push(segment.len() as u8);
            assert_eq!(internet_checksum(&[&pseudo, segment]), 0, "{payload:?}");
            assert_eq!(packet.len(), 40 + payload.len());
        }
    }
}
