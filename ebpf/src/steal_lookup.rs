//! Socket-lookup program attached to the target namespace. It only runs when
//! the kernel looks for a listener, which is after the classifier has passed
//! a SYN: in practice a SYN that reuses the 4-tuple of a TIME_WAIT socket.
//! The kernel retires the TIME_WAIT socket and asks for a listener; we answer
//! with the steal listener so the new connection is stolen like any other.
use aya_ebpf::{macros::sk_lookup, programs::SkLookupContext};
use remocal_agent_common::{Counter, PortKey};

use crate::{counters::bump, listeners::STEAL_LISTENERS};

const IPPROTO_TCP: u32 = 6;
const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;
/// Every namespace's loopback has ifindex 1; the pod's own local traffic is
/// not ours to steal (the classifier is not attached to lo either).
const LOOPBACK_IFINDEX: u32 = 1;
const SK_PASS: u32 = 1;

#[sk_lookup]
pub fn remocal_lookup(ctx: SkLookupContext) -> u32 {
    // SAFETY: the context pointer is valid for the whole program run.
    let (protocol, ifindex, port, to_itself) = unsafe {
        let lookup = &*ctx.lookup;
        // The pod calling its own address (not loopback): the kernel names
        // the address's device, not lo, so only the addresses tell.
        let to_itself = match lookup.family {
            AF_INET => lookup.remote_ip4 == lookup.local_ip4,
            AF_INET6 => lookup.remote_ip6 == lookup.local_ip6,
            _ => false,
        };
        (
            lookup.protocol,
            lookup.ingress_ifindex,
            lookup.local_port,
            to_itself,
        )
    };
    if protocol == IPPROTO_TCP && ifindex != LOOPBACK_IFINDEX && !to_itself {
        let key = PortKey { port: port as u16 };
        if STEAL_LISTENERS.redirect_sk_lookup(&ctx, key, 0).is_ok() {
            bump(Counter::LookupsAnswered);
        }
    }
    SK_PASS
}
