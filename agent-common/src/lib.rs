//! Types shared by the eBPF programs and the agent. Both sides read the same
//! bytes out of the same maps, so every type here is `#[repr(C)]` and has no
//! implicit padding.
#![no_std]

/// Key of the steal listener map: the TCP destination port (host byte order)
/// whose new connections go to the agent's listener instead of the pod.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PortKey {
    pub port: u16,
}

#[cfg(feature = "user")]
// SAFETY: plain old data without padding.
unsafe impl aya::Pod for PortKey {}

/// Slots of the per-CPU counter array, one per thing operators want counted
/// without paying for a log line per packet.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    /// Every packet the classifier looked at.
    PacketsSeen = 0,
    /// SYNs assigned to a steal listener: one per stolen connection.
    ConnectionsRedirected = 1,
    /// A stolen port whose listener could not be found or assigned; the
    /// packet went to the pod instead (never dropped).
    LookupsFailed = 2,
    /// Listener lookups the socket-lookup program answered with a steal
    /// listener: mostly new connections reusing a TIME_WAIT 4-tuple.
    LookupsAnswered = 3,
    /// Capture records of mirrored traffic that did not fit in the ring
    /// buffer: the affected mirrored connections have lost data.
    CaptureDropped = 4,
}

impl Counter {
    pub const ALL: [Counter; 5] = [
        Counter::PacketsSeen,
        Counter::ConnectionsRedirected,
        Counter::LookupsFailed,
        Counter::LookupsAnswered,
        Counter::CaptureDropped,
    ];
    pub const COUNT: u32 = Self::ALL.len() as u32;
}

/// Name of the tc classifier in the eBPF object (also what `bpftool` shows).
pub const STEAL_PROGRAM: &str = "remocal_steal";
/// Name of the socket-lookup program that catches new connections the
/// classifier lets through (SYNs reusing a TIME_WAIT 4-tuple).
pub const STEAL_LOOKUP_PROGRAM: &str = "remocal_lookup";
/// Name of the map from stolen port to the agent's listener socket.
pub const STEAL_LISTENERS_MAP: &str = "STEAL_LISTENERS";
/// Name of the per-CPU counter array.
pub const COUNTERS_MAP: &str = "COUNTERS";
/// How many ports one target namespace can have stolen at once.
pub const MAX_STOLEN_PORTS: u32 = 1024;

/// TCP flags a capture record carries (the TCP header's own bits).
pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
/// A control record (not a TCP bit): the pod's side reset the connection.
/// The mirror classifier sees only what reaches the pod; this reset leaves
/// it, so another program reports it, naming the flow remote → pod as every
/// other record does.
pub const CAPTURE_POD_RESET: u8 = 0x80;

/// Start of every record in the mirror ring buffer; `len` payload bytes
/// follow. One record per segment, GRO/GSO segments of up to
/// [`CAPTURE_MAX`] bytes included.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CaptureHeader {
    /// Addresses in network byte order; IPv4 uses the first word only.
    pub saddr: [u32; 4],
    pub daddr: [u32; 4],
    /// Ports in host byte order.
    pub sport: u16,
    pub dport: u16,
    /// Sequence number of the first payload byte (or of the flag), host order.
    pub seq: u32,
    /// Payload bytes following this header (the record may be longer: it
    /// is reserved in a few fixed sizes).
    pub len: u32,
    /// SYN, FIN, RST or [`CAPTURE_POD_RESET`] for a control record (then
    /// `len` is 0), 0 for data.
    pub flags: u8,
    /// 4 or 6.
    pub family: u8,
    pub _pad: u16,
}

#[cfg(feature = "user")]
// SAFETY: plain old data; the explicit padding field leaves no implicit padding.
unsafe impl aya::Pod for CaptureHeader {}

/// The largest segment payload captured whole; a larger one (BIG TCP) is
/// counted as dropped, so its connection is reported as lossy.
pub const CAPTURE_MAX: usize = 65536;
/// Default size of the mirror ring buffer: room for bursts while userspace
/// catches up; a power of two, as the kernel requires.
pub const DEFAULT_CAPTURE_BUFFER: u32 = 16 << 20;

/// Name of the mirror classifier.
pub const MIRROR_PROGRAM: &str = "remocal_mirror";
/// Name of the classifier on the pod's egress that reports the pod's resets
/// of mirrored connections (the kernel keeps 15 characters of a name).
pub const MIRROR_RESET_PROGRAM: &str = "remocal_pod_rst";
/// Name of the set of mirrored ports.
pub const MIRROR_PORTS_MAP: &str = "MIRROR_PORTS";
/// Name of the ring buffer carrying capture records.
pub const MIRROR_EVENTS_MAP: &str = "MIRROR_EVENTS";

/// A socket's own view of its connection, the key of the flow statistics.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FlowKey {
    /// Network byte order; an IPv4 socket uses the first word only (an IPv6
    /// socket carrying IPv4 keeps its ::ffff:a.b.c.d form).
    pub local_ip: [u32; 4],
    pub remote_ip: [u32; 4],
    /// Host byte order.
    pub local_port: u16,
    pub remote_port: u16,
}

/// TCP statistics of one connection: of a mirrored one, refreshed by the
/// sock_ops program at every RTT sample and state change; of a stolen one,
/// read from the agent's socket when it closes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowStats {
    /// Smoothed round-trip time, microseconds.
    pub srtt_us: u32,
    pub total_retrans: u32,
    pub bytes_acked: u64,
    pub bytes_received: u64,
}

#[cfg(feature = "user")]
// SAFETY: plain old data without padding.
unsafe impl aya::Pod for FlowKey {}
#[cfg(feature = "user")]
// SAFETY: plain old data without padding.
unsafe impl aya::Pod for FlowStats {}

/// Name of the sock_ops program.
pub const FLOW_PROGRAM: &str = "remocal_flows";
/// Name of the flow statistics map.
pub const FLOW_STATS_MAP: &str = "FLOW_STATS";
/// Name of the set of local ports whose connections get statistics.
pub const FLOW_PORTS_MAP: &str = "FLOW_PORTS";
/// Name of the global holding the target namespace's cookie.
pub const TARGET_NETNS_COOKIE: &str = "TARGET_NETNS_COOKIE";
