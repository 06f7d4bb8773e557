//! Just enough header parsing to find a TCP 4-tuple. Reads go through
//! `bpf_skb_load_bytes` (`TcContext::load`), which copes with non-linear skbs.
use aya_ebpf::programs::TcContext;

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86DD;
const IPPROTO_TCP: u8 = 6;
const IPV6_HLEN: usize = 40;
const TCP_FLAG_SYN: u8 = 0x02;
const TCP_FLAG_ACK: u8 = 0x10;

/// Addresses in network byte order, exactly as `bpf_sock_tuple` wants them.
pub enum Addresses {
    V4 { saddr: u32, daddr: u32 },
    V6 { saddr: [u32; 4], daddr: [u32; 4] },
}

pub struct TcpPacket {
    pub addresses: Addresses,
    /// Network byte order.
    pub sport: u16,
    /// Network byte order.
    pub dport: u16,
    flags: u8,
}

impl TcpPacket {
    /// A SYN without ACK opens a connection; counting those counts connections.
    pub fn is_syn(&self) -> bool {
        self.flags & (TCP_FLAG_SYN | TCP_FLAG_ACK) == TCP_FLAG_SYN
    }
}

/// `None` for anything that is not the first fragment of a TCP segment over
/// Ethernet: such packets are none of our business and pass untouched.
#[inline(always)]
pub fn parse_tcp(ctx: &TcContext) -> Option<TcpPacket> {
    let ethertype = u16::from_be(ctx.load::<u16>(12).ok()?);
    let (addresses, l4) = match ethertype {
        ETH_P_IP => {
            let version_ihl: u8 = ctx.load(ETH_HLEN).ok()?;
            if version_ihl >> 4 != 4 || ctx.load::<u8>(ETH_HLEN + 9).ok()? != IPPROTO_TCP {
                return None;
            }
            // A non-first fragment carries no TCP header.
            let frag = u16::from_be(ctx.load::<u16>(ETH_HLEN + 6).ok()?);
            if frag & 0x1fff != 0 {
                return None;
            }
            let saddr = ctx.load::<u32>(ETH_HLEN + 12).ok()?;
            let daddr = ctx.load::<u32>(ETH_HLEN + 16).ok()?;
            let ihl = usize::from(version_ihl & 0x0f) * 4;
            (Addresses::V4 { saddr, daddr }, ETH_HLEN + ihl)
        }
        ETH_P_IPV6 => {
            // Extension headers are rare on pod traffic; such packets pass.
            if ctx.load::<u8>(ETH_HLEN + 6).ok()? != IPPROTO_TCP {
                return None;
            }
            let saddr = ctx.load::<[u32; 4]>(ETH_HLEN + 8).ok()?;
            let daddr = ctx.load::<[u32; 4]>(ETH_HLEN + 24).ok()?;
            (Addresses::V6 { saddr, daddr }, ETH_HLEN + IPV6_HLEN)
        }
        _ => return None,
    };
    let ports = ctx.load::<[u16; 2]>(l4).ok()?;
    let flags = ctx.load::<u8>(l4 + 13).ok()?;
    Some(TcpPacket {
        addresses,
        sport: ports[0],
        dport: ports[1],
        flags,
    })
}
