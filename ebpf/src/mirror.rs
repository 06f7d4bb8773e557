//! The mirror classifier, attached with tcx on ingress next to the steal
//! classifier. For connections to a mirrored port it copies the TCP payload
//! and the SYN/FIN/RST events into a ring buffer; the packet itself always
//! passes untouched, so the pod's traffic never depends on the agent.
//!
//! A ring buffer rather than a perf buffer: one buffer shared by all CPUs
//! keeps a flow's records in the order they were captured and sizes memory
//! once for the node instead of per CPU. When it is full a record is
//! dropped, counted, and the agent cuts off the affected connections instead
//! of stitching over the hole.
//!
//! Each segment becomes one record, reserved in one of a few fixed sizes
//! (the verifier wants constant sizes, and a loop over chunks would not pass
//! it): a small packet takes little room, a 64 KiB GRO packet fits whole.
use core::mem::size_of;

use aya_ebpf::{
    EbpfContext as _,
    bindings::tcx_action_base::TCX_NEXT,
    helpers::bpf_skb_load_bytes,
    macros::{classifier, map},
    maps::{HashMap, RingBuf},
    programs::TcContext,
};
use remocal_agent_common::{
    CAPTURE_MAX, CaptureHeader, Counter, DEFAULT_CAPTURE_BUFFER, PortKey, TCP_FIN, TCP_RST, TCP_SYN,
};

use crate::{
    counters::bump,
    packet::{TcpPacket, parse_tcp},
};

const HEADER: usize = size_of::<CaptureHeader>();

/// Ports being mirrored in this namespace (the value is unused).
#[map(name = "MIRROR_PORTS")]
pub(crate) static MIRROR_PORTS: HashMap<PortKey, u8> = HashMap::with_max_entries(1024, 0);

/// Capture records for the agent. The agent sets the size at load time.
#[map(name = "MIRROR_EVENTS")]
pub(crate) static MIRROR_EVENTS: RingBuf = RingBuf::with_byte_size(DEFAULT_CAPTURE_BUFFER, 0);

#[classifier]
pub fn remocal_mirror(ctx: TcContext) -> i32 {
    if let Some(packet) = parse_tcp(&ctx) {
        let key = PortKey {
            port: u16::from_be(packet.dport),
        };
        if MIRROR_PORTS.get_ptr(&key).is_some() {
            capture(&ctx, &packet);
        }
    }
    TCX_NEXT
}

#[inline(always)]
fn capture(ctx: &TcContext, packet: &TcpPacket) {
    let (Some(seq), Some((start, len))) = (packet.seq(ctx), packet.payload(ctx)) else {
        return;
    };
    let mut header = CaptureHeader {
        saddr: packet.saddr,
        daddr: packet.daddr,
        sport: u16::from_be(packet.sport),
        dport: u16::from_be(packet.dport),
        seq,
        len: 0,
        flags: 0,
        family: if packet.ipv6 { 6 } else { 4 },
        _pad: 0,
    };
    if packet.flags & TCP_SYN != 0 {
        control(&mut header, TCP_SYN, seq);
    }
    if len > 0 {
        header.seq = seq;
        let captured = if len <= 2048 {
            data::<2048>(ctx, &mut header, start, len)
        } else if len <= 8192 {
            data::<8192>(ctx, &mut header, start, len)
        } else if len <= 32768 {
            data::<32768>(ctx, &mut header, start, len)
        } else {
            data::<CAPTURE_MAX>(ctx, &mut header, start, len.min(CAPTURE_MAX))
        };
        if !captured || len > CAPTURE_MAX {
            bump(Counter::CaptureDropped);
        }
    }
    if packet.flags & TCP_FIN != 0 {
        control(&mut header, TCP_FIN, seq.wrapping_add(len as u32));
    }
    if packet.flags & TCP_RST != 0 {
        control(&mut header, TCP_RST, seq);
    }
}

/// One record holding `len` (1..=N) payload bytes from `start`.
#[inline(always)]
fn data<const N: usize>(
    ctx: &TcContext,
    header: &mut CaptureHeader,
    start: usize,
    len: usize,
) -> bool {
    let Some(mut record) = MIRROR_EVENTS.reserve_bytes(HEADER + N, 0) else {
        return false;
    };
    // In 1..=N, written so the verifier sees the bound (N is a power of
    // two); black_box keeps the compiler from folding the mask away.
    let len = (core::hint::black_box(len).wrapping_sub(1) & (N - 1)) + 1;
    // SAFETY: the record has room for the header plus N bytes, and len <= N.
    let loaded = unsafe {
        bpf_skb_load_bytes(
            ctx.as_ptr().cast(),
            start as u32,
            record.as_mut_ptr().add(HEADER).cast(),
            len as u32,
        )
    };
    if loaded != 0 {
        record.discard(0);
        return false;
    }
    header.len = len as u32;
    header.flags = 0;
    write_header(&mut record, header);
    record.submit(0);
    true
}

#[inline(always)]
pub(crate) fn control(header: &mut CaptureHeader, flag: u8, seq: u32) {
    header.seq = seq;
    header.len = 0;
    header.flags = flag;
    match MIRROR_EVENTS.reserve_bytes(HEADER, 0) {
        Some(mut record) => {
            write_header(&mut record, header);
            record.submit(0);
        }
        None => bump(Counter::CaptureDropped),
    }
}

#[inline(always)]
fn write_header(record: &mut [u8], header: &CaptureHeader) {
    // SAFETY: every record starts with room for a header; the ring buffer
    // hands out 8-byte aligned records.
    unsafe { core::ptr::write_unaligned(record.as_mut_ptr().cast::<CaptureHeader>(), *header) };
}
