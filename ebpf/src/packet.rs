//! Just enough header parsing to find a TCP 4-tuple, and, for the mirror,
//! where the payload is. Every packet of the pod passes through here, so
//! headers are read straight from the packet when its linear part holds
//! them (the usual case); only otherwise through `bpf_skb_load_bytes`
//! (`TcContext::load`), which copes with non-linear skbs. Nine helper calls
//! per packet had made each program run cost about 0.6 us.
use core::mem::size_of;

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
        read::<u32>(ctx, self.l4 + 4).map(u32::from_be)
    }

    /// Offset and length of the TCP payload. The IP length excludes the
    /// Ethernet padding of tiny frames, which tc ingress still sees.
    #[inline(always)]
    pub fn payload(&self, ctx: &TcContext) -> Option<(usize, usize)> {
        let data_offset: u8 = read(ctx, self.l4 + 12)?;
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
    let ethertype = u16::from_be(read::<u16>(ctx, 12)?);
    let (ipv6, saddr, daddr, l4, ip_payload) = match ethertype {
        ETH_P_IP => {
            let version_ihl: u8 = read(ctx, ETH_HLEN)?;
            if version_ihl >> 4 != 4 || read::<u8>(ctx, ETH_HLEN + 9)? != IPPROTO_TCP {
                return None;
            }
            // A non-first fragment carries no TCP header.
            let frag = u16::from_be(read::<u16>(ctx, ETH_HLEN + 6)?);
            if frag & 0x1fff != 0 {
                return None;
            }
            let total = usize::from(u16::from_be(read::<u16>(ctx, ETH_HLEN + 2)?));
            let saddr = read::<u32>(ctx, ETH_HLEN + 12)?;
            let daddr = read::<u32>(ctx, ETH_HLEN + 16)?;
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
            if read::<u8>(ctx, ETH_HLEN + 6)? != IPPROTO_TCP {
                return None;
            }
            let payload = usize::from(u16::from_be(read::<u16>(ctx, ETH_HLEN + 4)?));
            let saddr = read::<[u32; 4]>(ctx, ETH_HLEN + 8)?;
            let daddr = read::<[u32; 4]>(ctx, ETH_HLEN + 24)?;
            (true, saddr, daddr, ETH_HLEN + IPV6_HLEN, payload)
        }
        _ => return None,
    };
    let ports = read::<[u16; 2]>(ctx, l4)?;
    let flags = read::<u8>(ctx, l4 + 13)?;
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

/// `size_of::<T>()` bytes at `offset`: straight from the packet when they
/// lie in its linear part, else copied by the kernel.
#[inline(always)]
fn read<T: Copy>(ctx: &TcContext, offset: usize) -> Option<T> {
    let first = ctx.data() + offset;
    // Opaque to the compiler, which would otherwise turn `first + 1 <=
    // end` into `first < end`, a form the verifier draws no bound from.
    let last = core::hint::black_box(first + size_of::<T>());
    if last <= ctx.data_end() {
        // SAFETY: the bytes lie between data and data_end, checked just
        // above in a form the verifier follows.
        Some(unsafe { core::ptr::read_unaligned(first as *const T) })
    } else {
        ctx.load::<T>(offset).ok()
    }
}
