//! The steal classifier, attached with tcx on ingress of the target's
//! interfaces. A new connection to a stolen port is handed to the agent's
//! listener with `bpf_sk_assign`; a packet of any connection that already has
//! a socket (the pod's own connections opened before the steal, and stolen
//! connections after their session ended) keeps its way. Nothing is dropped:
//! every path ends in `TCX_NEXT`, so the programs after ours (the mirror, a
//! CNI's own) still see every packet.
use core::mem::size_of;

use aya_ebpf::{
    EbpfContext as _,
    bindings::{
        BPF_F_CURRENT_NETNS, BPF_TCP_LISTEN, bpf_sock_tuple,
        bpf_sock_tuple__bindgen_ty_1__bindgen_ty_1 as Ipv4Tuple,
        bpf_sock_tuple__bindgen_ty_1__bindgen_ty_2 as Ipv6Tuple, tcx_action_base::TCX_NEXT,
    },
    helpers::{bpf_sk_assign, bpf_skc_lookup_tcp},
    macros::classifier,
    programs::TcContext,
};
use aya_log_ebpf::warn;
use remocal_agent_common::{Counter, PortKey};

use crate::{
    counters::bump,
    listeners::{lookup_listener, release},
    packet::{TcpPacket, parse_tcp},
};

#[classifier]
pub fn remocal_steal(ctx: TcContext) -> i32 {
    bump(Counter::PacketsSeen);
    if let Some(packet) = parse_tcp(&ctx) {
        steal(&ctx, &packet);
    }
    TCX_NEXT
}

#[inline(always)]
fn steal(ctx: &TcContext, packet: &TcpPacket) {
    let key = PortKey {
        port: u16::from_be(packet.dport),
    };
    let Some(listener) = lookup_listener(&key) else {
        return;
    };
    if belongs_to_existing_connection(ctx, packet) {
        release(listener);
        return;
    }
    // SAFETY: `listener` is a referenced socket from the sock hash; we release it below.
    let assigned = unsafe { bpf_sk_assign(ctx.as_ptr(), listener.cast(), 0) };
    release(listener);
    if assigned == 0 {
        if packet.is_syn() {
            bump(Counter::ConnectionsRedirected);
        }
    } else {
        bump(Counter::LookupsFailed);
        warn!(
            ctx,
            "sk_assign to the steal listener of port {} failed: {}", key.port, assigned
        );
    }
}

/// True when a socket other than a listener owns this 4-tuple: an established
/// connection, or one mid-handshake (a request socket), of the pod or of ours.
/// A SYN meeting a TIME_WAIT socket passes too: the kernel must retire the
/// TIME_WAIT socket itself (an assigned SYN would be dropped as a duplicate
/// of it), and then asks for a listener, which `remocal_lookup` answers.
#[inline(always)]
fn belongs_to_existing_connection(ctx: &TcContext, packet: &TcpPacket) -> bool {
    // Zeroed first: the verifier rejects stores of bytes the compiler
    // considers undefined, such as the unused part of the union.
    // SAFETY: all-zero is a valid bpf_sock_tuple.
    let mut tuple: bpf_sock_tuple = unsafe { core::mem::zeroed() };
    let size = if packet.ipv6 {
        tuple.__bindgen_anon_1.ipv6 = Ipv6Tuple {
            saddr: packet.saddr,
            daddr: packet.daddr,
            sport: packet.sport,
            dport: packet.dport,
        };
        size_of::<Ipv6Tuple>()
    } else {
        tuple.__bindgen_anon_1.ipv4 = Ipv4Tuple {
            saddr: packet.saddr[0],
            daddr: packet.daddr[0],
            sport: packet.sport,
            dport: packet.dport,
        };
        size_of::<Ipv4Tuple>()
    };
    // SAFETY: the tuple lives on our stack for the duration of the call.
    let sk = unsafe {
        bpf_skc_lookup_tcp(
            ctx.as_ptr(),
            &mut tuple,
            size as u32,
            BPF_F_CURRENT_NETNS as u64,
            0,
        )
    };
    if sk.is_null() {
        return false;
    }
    // SAFETY: a non-null result is a valid socket pointer until released.
    let state = unsafe { (*sk).state };
    release(sk);
    state != BPF_TCP_LISTEN
}
