//! What the kernel's mirror program reports, as the agent works with it.
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use bytes::Bytes;
use remocal_agent_common::{CAPTURE_POD_RESET, CaptureHeader, TCP_FIN, TCP_RST, TCP_SYN};

/// One direction of one connection: remote client → pod.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Flow {
    pub source: SocketAddr,
    pub destination: SocketAddr,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Capture {
    Syn {
        flow: Flow,
        isn: u32,
    },
    Data {
        flow: Flow,
        seq: u32,
        payload: Bytes,
    },
    Fin {
        flow: Flow,
        seq: u32,
    },
    Rst {
        flow: Flow,
        /// Sent by the pod rather than by the remote client.
        by_pod: bool,
    },
}

impl Capture {
    /// Parses one ring buffer record (header, then payload); None for a
    /// record this agent does not understand.
    pub fn parse(record: &[u8]) -> Option<Capture> {
        let header_len = size_of::<CaptureHeader>();
        let header_bytes = record.get(..header_len)?;
        // SAFETY: CaptureHeader is plain old data and the slice is exactly its size;
        // read_unaligned copes with the ring buffer's alignment.
        let header: CaptureHeader =
            unsafe { std::ptr::read_unaligned(header_bytes.as_ptr().cast()) };
        let flow = Flow {
            source: SocketAddr::new(address(header.family, header.saddr)?, header.sport),
            destination: SocketAddr::new(address(header.family, header.daddr)?, header.dport),
        };
        Some(match header.flags {
            TCP_SYN => Capture::Syn {
                flow,
                isn: header.seq,
            },
            TCP_FIN => Capture::Fin {
                flow,
                seq: header.seq,
            },
            TCP_RST => Capture::Rst {
                flow,
                by_pod: false,
            },
            CAPTURE_POD_RESET => Capture::Rst { flow, by_pod: true },
            _ => {
                let payload = record.get(header_len..header_len + header.len as usize)?;
                Capture::Data {
                    flow,
                    seq: header.seq,
                    payload: Bytes::copy_from_slice(payload),
                }
            }
        })
    }

    /// Payload bytes this capture holds in memory.
    pub fn bytes(&self) -> usize {
        match self {
            Capture::Data { payload, .. } => payload.len(),
            _ => 0,
        }
    }

    pub fn flow(&self) -> Flow {
        match self {
            Capture::Syn { flow, .. }
            | Capture::Data { flow, .. }
            | Capture::Fin { flow, .. }
            | Capture::Rst { flow, .. } => *flow,
        }
    }
}

/// Addresses arrive in network byte order, as the words of the packet.
fn address(family: u8, words: [u32; 4]) -> Option<IpAddr> {
    match family {
        4 => Some(IpAddr::V4(Ipv4Addr::from(u32::from_be(words[0])))),
        6 => {
            let mut octets = [0u8; 16];
            for (chunk, word) in octets.chunks_exact_mut(4).zip(words) {
                chunk.copy_from_slice(&word.to_ne_bytes());
            }
            Some(IpAddr::V6(Ipv6Addr::from(octets)))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(header: CaptureHeader, payload: &[u8]) -> Vec<u8> {
        let mut bytes = vec![0u8; size_of::<CaptureHeader>()];
        // SAFETY: the buffer is exactly the header's size.
        unsafe { std::ptr::write_unaligned(bytes.as_mut_ptr().cast(), header) };
        bytes.extend_from_slice(payload);
        bytes
    }

    #[test]
    fn records_parse_into_flows_in_host_terms() {
        let v4 = CaptureHeader {
            saddr: [u32::from_ne_bytes([198, 18, 0, 1]), 0, 0, 0],
            daddr: [u32::from_ne_bytes([198, 18, 0, 2]), 0, 0, 0],
            sport: 40000,
            dport: 80,
            seq: 7,
            len: 3,
            flags: 0,
            family: 4,
            _pad: 0,
        };
        let parsed = Capture::parse(&record(v4, b"abc")).unwrap();
        assert_eq!(
            parsed,
            Capture::Data {
                flow: Flow {
                    source: "198.18.0.1:40000".parse().unwrap(),
                    destination: "198.18.0.2:80".parse().unwrap(),
                },
                seq: 7,
                payload: Bytes::from_static(b"abc"),
            }
        );
        let mut v6 = v4;
        v6.family = 6;
        let ip: Ipv6Addr = "fd72:656d::2".parse().unwrap();
        for (word, chunk) in v6.daddr.iter_mut().zip(ip.octets().chunks_exact(4)) {
            *word = u32::from_ne_bytes(chunk.try_into().unwrap());
        }
        v6.flags = TCP_SYN;
        v6.len = 0;
        let parsed = Capture::parse(&record(v6, b"")).unwrap();
        assert_eq!(
            parsed.flow().destination,
            "[fd72:656d::2]:80".parse().unwrap()
        );
        assert!(matches!(parsed, Capture::Syn { isn: 7, .. }));
        v6.flags = CAPTURE_POD_RESET;
        assert!(matches!(
            Capture::parse(&record(v6, b"")),
            Some(Capture::Rst { by_pod: true, .. })
        ));
        assert_eq!(
            Capture::parse(&record(v4, b"ab")),
            None,
            "a record shorter than its length"
        );
    }
}
