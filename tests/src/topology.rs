//! A miniature Kubernetes node: a "node" namespace linked by a veth pair to each "pod"
//! namespace, the way a CNI plugin wires pods. remocal attaches to the pod side (`eth0`),
//! and traffic from the node reaches it exactly as traffic from other pods would.
//!
//! Addresses come from the benchmarking range 198.18.0.0/15 and a ULA prefix so they
//! cannot collide with anything real on the host.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use crate::netns::Netns;

/// A pod: its namespace, with `eth0` carrying one IPv4 and one IPv6 address.
#[derive(Debug)]
pub struct Pod {
    pub netns: Netns,
    pub ipv4: Ipv4Addr,
    pub ipv6: Ipv6Addr,
}

impl Pod {
    pub fn v4(&self, port: u16) -> SocketAddr {
        SocketAddr::new(IpAddr::V4(self.ipv4), port)
    }

    pub fn v6(&self, port: u16) -> SocketAddr {
        SocketAddr::new(IpAddr::V6(self.ipv6), port)
    }

    /// Both addresses of the pod on `port`, IPv4 first.
    pub fn addrs(&self, port: u16) -> [SocketAddr; 2] {
        [self.v4(port), self.v6(port)]
    }
}

/// The node and its pods; all namespaces (and with them the veths) go away on drop.
#[derive(Debug)]
pub struct Topology {
    pub node: Netns,
    pub pods: Vec<Pod>,
}

impl Topology {
    /// Pod `i` gets 198.18.i.2/24 and fd72:656d:i::2/64; the node side of its veth gets
    /// `.1` / `::1` of the same subnets.
    pub fn new(pod_count: usize) -> Topology {
        assert!(pod_count <= 200, "one /24 per pod, keep it small");
        let node = Netns::create("node");
        let mut pods = Vec::with_capacity(pod_count);
        for i in 0..pod_count {
            let netns = Netns::create(&format!("pod{i}"));
            let veth = format!("vp{i}");
            let ipv4 = Ipv4Addr::new(198, 18, i as u8, 2);
            let ipv6: Ipv6Addr = format!("fd72:656d:{i:x}::2").parse().expect("valid ipv6");
            let node_v4 = format!("198.18.{i}.1/24");
            let node_v6 = format!("fd72:656d:{i:x}::1/64");

            node.ip(&[
                "link",
                "add",
                &veth,
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                netns.name(),
            ]);
            node.ip(&["addr", "add", &node_v4, "dev", &veth]);
            node.ip(&["addr", "add", &node_v6, "dev", &veth, "nodad"]);
            netns.ip(&["addr", "add", &format!("{ipv4}/24"), "dev", "eth0"]);
            netns.ip(&["addr", "add", &format!("{ipv6}/64"), "dev", "eth0", "nodad"]);
            node.ip(&["link", "set", &veth, "up"]);
            netns.ip(&["link", "set", "eth0", "up"]);
            pods.push(Pod { netns, ipv4, ipv6 });
        }
        Topology { node, pods }
    }

    pub fn pod(&self, index: usize) -> &Pod {
        &self.pods[index]
    }
}
