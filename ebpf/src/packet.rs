//! Just enough header parsing to find a TCP 4-tuple, and, for the mirror,
//! where the payload is. Reads go through `bpf_skb_load_bytes`
//! (`TcContext::load`), which copes with non-linear skbs.
use aya_ebpf::programs::TcContext;

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86DD;
const IPPROTO_TCP: u8 = 6;
const IPV6_HLEN: usize = 40;
const TCP_FLAG_SYN: u8 = 0x02;
const TCP_FLAG_ACK: u8 = 0x10;

pub struct TcpPacket {
    pub ipv6: bool,
    /// Addresses in network byte order, exactly as `bpf_sock_tuple` wants
    /// them; IPv4 uses the first word and zeroes the rest. (A plain struct
    /// rather than an enum: the verifier rejects the undefined bytes a
    /// smaller enum variant leaves behind when the compiler copies it.)
    pub saddr: [u32; 4],
    pub daddr: [u32; 4],
    /// Network byte order.
    pub sport: u16,
    /// Network byte order.
    pub dport: u16,
    pub flags: u8,
    /// Offset of the TCP header in the packet.
    l4: usize,
    /// Bytes after the IP header according to the IP header; 0 when the
    /// header does not say (BIG TCP), then the skb length decides.
    ip_payload: usize,
}

impl TcpPacket {
    /// A SYN without ACK opens a connection; counting those counts connections.
    pub fn is_syn(&self) -> bool {
        self.flags & (TCP_FLAG_SYN | TCP_FLAG_ACK) == TCP_FLAG_SYN
    }

    /// Sequence number (host order), loaded only by the programs that need it.
    #[inline(always)]
    pub fn seq(&self, ctx: &TcContext) -> Option<u32> {
        ctx.load::<u32>(self.l4 + 4).ok().map(u32::from_be)
    }

    /// Offset and length of the TCP payload. The IP length excludes the
    /// Ethernet padding of tiny frames, which tc ingress still sees.
    #[inline(always)]
    pub fn payload(&self, ctx: &TcContext) -> Option<(usize, usize)> {
        let data_offset: u8 = ctx.load(self.l4 + 12).ok()?;
        let header = usize::from(data_offset >> 4) * 4;
        let start = self.l4 + header;
        let end = if self.ip_payload == 0 {
            ctx.len() as usize
        } else {
            self.l4 + self.ip_payload
        };
        Some((start, end.saturating_sub(start)))
    }
}

/// `None` for anything that is not the first fragment of a TCP segment over
/// Ethernet: such packets are none of our business and pass untouched.
#[inline(always)]
pub fn parse_tcp(ctx: &TcContext) -> Option<TcpPacket> {
    let ethertype = u16::from_be(ctx.load::<u16>(12).ok()?);
    let (ipv6, saddr, daddr, l4, ip_payload) = match ethertype {
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
            let total = usize::from(u16::from_be(ctx.load::<u16>(ETH_HLEN + 2).ok()?));
            let saddr = ctx.load::<u32>(ETH_HLEN + 12).ok()?;
            let daddr = ctx.load::<u32>(ETH_HLEN + 16).ok()?;
            let ihl = usize::from(version_ihl & 0x0f) * 4;
            (
                false,
                [saddr, 0, 0, 0],
                [daddr, 0, 0, 0],
                ETH_HLEN + ihl,
                total.saturating_sub(ihl),
            )
        }
        ETH_P_IPV6 => {
            // Extension headers are rare on pod traffic; such packets pass.
            if ctx.load::<u8>(ETH_HLEN + 6).ok()? != IPPROTO_TCP {
                return None;
            }
            let payload = usize::from(u16::from_be(ctx.load::<u16>(ETH_HLEN + 4).ok()?));
            let saddr = ctx.load::<[u32; 4]>(ETH_HLEN + 8).ok()?;
            let daddr = ctx.load::<[u32; 4]>(ETH_HLEN + 24).ok()?;
            (true, saddr, daddr, ETH_HLEN + IPV6_HLEN, payload)
        }
        _ => return None,
    };
    let ports = ctx.load::<[u16; 2]>(l4).ok()?;
    let flags = ctx.load::<u8>(l4 + 13).ok()?;
    Some(TcpPacket {
        ipv6,
        saddr,
        daddr,
        sport: ports[0],
        dport: ports[1],
        flags,
        l4,
        ip_payload,
    })
}
