//! Per-connection TCP statistics (smoothed RTT, retransmits, bytes) of the
//! pod's own connections on mirrored ports. (Stolen connections are the
//! agent's sockets: it reads theirs with TCP_INFO, with no per-ACK callback
//! on the data path.) Attached, while the namespace has a mirror, to the root
//! of the cgroup v2 hierarchy so the agent needs no knowledge of the pod's
//! cgroup; the namespace cookie keeps it to the target, and the port set
//! keeps the pod's other traffic free of per-ACK callbacks (they cost a busy
//! stream on another port about 10%).
use aya_ebpf::{
    Global,
    bindings::{
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB,
        BPF_SOCK_OPS_RTT_CB, BPF_SOCK_OPS_RTT_CB_FLAG, BPF_SOCK_OPS_STATE_CB,
        BPF_SOCK_OPS_STATE_CB_FLAG,
    },
    helpers::bpf_get_netns_cookie,
    macros::{map, sock_ops},
    maps::{HashMap, LruHashMap},
    programs::SockOpsContext,
};
use remocal_agent_common::{FlowKey, FlowStats, PortKey};

const AF_INET: u32 = 2;

/// The target namespace's cookie, set by the agent when it loads the object.
#[unsafe(no_mangle)]
static TARGET_NETNS_COOKIE: Global<u64> = Global::new(0);

/// Local ports whose connections are followed (the value is unused); the
/// agent adds a port before it steals or mirrors it.
#[map(name = "FLOW_PORTS")]
static FLOW_PORTS: HashMap<PortKey, u8> = HashMap::with_max_entries(1024, 0);

/// Least recently used flows give way first: closed connections linger
/// until the agent has read them, then age out.
#[map(name = "FLOW_STATS")]
static FLOW_STATS: LruHashMap<FlowKey, FlowStats> = LruHashMap::with_max_entries(65536, 0);

#[sock_ops]
pub fn remocal_flows(ctx: SockOpsContext) -> u32 {
    // SAFETY: the context is valid for the whole program run.
    let cookie = unsafe { bpf_get_netns_cookie(ctx.ops.cast()) };
    if cookie != TARGET_NETNS_COOKIE.load() {
        return 1;
    }
    match ctx.op() {
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB | BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB => {
            let port = PortKey {
                port: ctx.local_port() as u16,
            };
            if FLOW_PORTS.get_ptr(&port).is_none() {
                return 1;
            }
            let _ =
                ctx.set_cb_flags((BPF_SOCK_OPS_RTT_CB_FLAG | BPF_SOCK_OPS_STATE_CB_FLAG) as i32);
            record(&ctx);
        }
        BPF_SOCK_OPS_RTT_CB | BPF_SOCK_OPS_STATE_CB => record(&ctx),
        _ => {}
    }
    1
}

/// The verifier only allows context reads at constant offsets from the
/// context pointer: one volatile read per word keeps the compiler from
/// copying the array through a computed pointer.
#[inline(always)]
unsafe fn ipv6(words: *const [u32; 4]) -> [u32; 4] {
    let words = words.cast::<u32>();
    // SAFETY: the caller passes a pointer to a context array of four words.
    unsafe {
        [
            core::ptr::read_volatile(words),
            core::ptr::read_volatile(words.add(1)),
            core::ptr::read_volatile(words.add(2)),
            core::ptr::read_volatile(words.add(3)),
        ]
    }
}

#[inline(always)]
fn record(ctx: &SockOpsContext) {
    let (local_ip, remote_ip) = if ctx.family() == AF_INET {
        ([ctx.local_ip4(), 0, 0, 0], [ctx.remote_ip4(), 0, 0, 0])
    } else {
        // SAFETY: reads of context fields at constant offsets.
        unsafe {
            (
                ipv6(&raw const (*ctx.ops).local_ip6),
                ipv6(&raw const (*ctx.ops).remote_ip6),
            )
        }
    };
    let key = FlowKey {
        local_ip,
        remote_ip,
        local_port: ctx.local_port() as u16,
        // The kernel hands the remote port over in network order in the
        // upper half of the word (on little-endian machines).
        remote_port: u16::from_be((ctx.remote_port() >> 16) as u16),
    };
    // SAFETY: reading the context's fields; the kernel zeroes what a request
    // socket does not have.
    let stats = unsafe {
        let ops = &*ctx.ops;
        FlowStats {
            srtt_us: ops.srtt_us >> 3,
            total_retrans: ops.total_retrans,
            bytes_acked: ops.bytes_acked,
            bytes_received: ops.bytes_received,
        }
    };
    let _ = FLOW_STATS.insert(&key, &stats, 0);
}
