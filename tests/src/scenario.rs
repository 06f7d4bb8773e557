//! The setting almost every test starts from: a node with pods whose own process
//! answers HTTP "pod" on some ports, and a remocal agent on the host. Plus the checks
//! tests repeat about it: who answers, and what is attached.

use std::net::SocketAddr;

use crate::bpf::{self, TcxProgram};
use crate::netns::Netns;
use crate::processes::{Agent, Steal, Target};
use crate::remote::curl_body;
use crate::servers::{self, TcpServer};
use crate::topology::{Pod, Topology};

/// Names of the agent's eBPF programs, as the kernel lists them.
pub use remocal_agent_common::{STEAL_LOOKUP_PROGRAM, STEAL_PROGRAM};

/// Body the pods' own processes answer with.
pub const POD_BODY: &str = "pod";

pub struct Scenario {
    // Field order is drop order: the agent detaches before the namespaces go away.
    pub agent: Agent,
    pod_servers: Vec<(usize, u16, TcpServer)>,
    pub topology: Topology,
}

impl Scenario {
    /// `pods` pods, each running an HTTP server answering [`POD_BODY`] on every port in
    /// `ports`, and a started agent.
    pub async fn start(pods: usize, ports: &[u16]) -> Scenario {
        Scenario::start_with(pods, ports, &[]).await
    }

    /// The same, with extra arguments for the agent.
    pub async fn start_with(pods: usize, ports: &[u16], agent_args: &[&str]) -> Scenario {
        let topology = Topology::new(pods);
        let mut pod_servers = Vec::new();
        for (index, pod) in topology.pods.iter().enumerate() {
            for &port in ports {
                let server =
                    TcpServer::in_netns(&pod.netns, port, |stream| servers::http(stream, POD_BODY));
                pod_servers.push((index, port, server));
            }
        }
        let agent = Agent::start_with(agent_args).await;
        Scenario {
            agent,
            pod_servers,
            topology,
        }
    }

    pub fn node(&self) -> &Netns {
        &self.topology.node
    }

    pub fn pod(&self, index: usize) -> &Pod {
        self.topology.pod(index)
    }

    /// The pod's own process on `port`, to count what reached it.
    pub fn pod_server(&self, pod: usize, port: u16) -> &TcpServer {
        self.pod_servers
            .iter()
            .find(|(index, p, _)| *index == pod && *p == port)
            .map(|(_, _, server)| server)
            .unwrap_or_else(|| panic!("no pod server for pod {pod} port {port}"))
    }

    pub fn pod_target(&self, pod: usize) -> Target {
        Target::Netns(self.pod(pod).netns.path())
    }

    /// `remocal steal --netns <pod> --port PORT --local-port <local>` against this agent.
    pub fn steal(&self, pod: usize, port: u16, local: &TcpServer) -> Steal {
        Steal::new(&self.agent.url())
            .target(&self.pod_target(pod))
            .port(port)
            .local_port(local.port())
    }

    /// `remocal mirror --netns <pod> --port PORT --local-port <local>` against this agent.
    pub fn mirror(&self, pod: usize, port: u16, local: &TcpServer) -> Steal {
        Steal::mirror(&self.agent.url())
            .target(&self.pod_target(pod))
            .port(port)
            .local_port(local.port())
    }

    /// curl from the node to `addr`; the body, curl failing fails the test.
    pub async fn curl(&self, addr: SocketAddr) -> String {
        curl_body(self.node(), addr).await
    }

    /// Asserts that the pod's own process answers `port` over IPv4 and IPv6, i.e. that
    /// nothing redirects it.
    pub async fn assert_pod_answers(&self, pod: usize, port: u16) {
        for addr in self.pod(pod).addrs(port) {
            assert_eq!(
                self.curl(addr).await,
                POD_BODY,
                "expected the pod's own process to answer {addr}"
            );
        }
    }

    pub fn tcx_programs(&self, pod: usize) -> Vec<TcxProgram> {
        bpf::tcx_programs(&self.pod(pod).netns)
    }

    /// Asserts the steal programs are attached: the classifier to the pod's
    /// `eth0` ingress, the socket-lookup program to its namespace.
    pub fn assert_steal_attached(&self, pod: usize) {
        let programs = self.tcx_programs(pod);
        assert!(
            programs.iter().any(|p| p.name == STEAL_PROGRAM
                && p.interface == "eth0"
                && p.direction == "ingress")
                && programs
                    .iter()
                    .any(|p| p.name == STEAL_LOOKUP_PROGRAM && p.direction == "sk_lookup"),
            "expected {STEAL_PROGRAM} on eth0 ingress and {STEAL_LOOKUP_PROGRAM} on the namespace \
             of pod {pod} while stealing, found: {}",
            bpf::describe(&programs)
        );
    }

    /// Asserts that no program at all is attached anywhere in the pod.
    pub fn assert_nothing_attached(&self, pod: usize) {
        let programs = self.tcx_programs(pod);
        assert!(
            programs.is_empty(),
            "expected no tcx program in pod {pod}, found: {}",
            bpf::describe(&programs)
        );
    }
}
