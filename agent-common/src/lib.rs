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
}

impl Counter {
    pub const ALL: [Counter; 4] = [
        Counter::PacketsSeen,
        Counter::ConnectionsRedirected,
        Counter::LookupsFailed,
        Counter::LookupsAnswered,
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
