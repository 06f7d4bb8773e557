//! The mirror's view of resets the pod sends, attached with tcx on the pod's
//! egress while a mirror runs. The mirror classifier sees only what reaches
//! the pod: when the pod resets a connection (an abortive close, data
//! arriving for a closed socket), the remote client usually goes quiet
//! rather than answer, and the developer's copy would hang on until it idled
//! out. This reports the reset so the copy ends with the original.
//!
//! Only packets with RST set reach the port lookup; everything else costs a
//! header parse. The packet always passes untouched.
use aya_ebpf::{bindings::tcx_action_base::TCX_NEXT, macros::classifier, programs::TcContext};
use remocal_agent_common::{CAPTURE_POD_RESET, CaptureHeader, PortKey, TCP_RST};

use crate::{
    mirror::{MIRROR_PORTS, control},
    packet::parse_tcp,
};

#[classifier]
pub fn remocal_pod_rst(ctx: TcContext) -> i32 {
    if let Some(packet) = parse_tcp(&ctx)
        && packet.flags & TCP_RST != 0
    {
        let key = PortKey {
            port: u16::from_be(packet.sport),
        };
        if MIRROR_PORTS.get_ptr(&key).is_some() {
            // Leaving the pod: the remote end is the destination.
            let mut header = CaptureHeader {
                saddr: packet.daddr,
                daddr: packet.saddr,
                sport: u16::from_be(packet.dport),
                dport: u16::from_be(packet.sport),
                seq: 0,
                len: 0,
                flags: 0,
                family: if packet.ipv6 { 6 } else { 4 },
                _pad: 0,
            };
            control(&mut header, CAPTURE_POD_RESET, 0);
        }
    }
    TCX_NEXT
}
