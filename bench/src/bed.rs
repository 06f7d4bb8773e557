//! The test bed every measurement shares: a node namespace and one pod
//! namespace joined by a veth (as a CNI wires pods), the pod's own servers,
//! and a remocal agent on the host. Direct traffic goes node → pod's server;
//! stolen traffic goes node → pod → eBPF → agent → gRPC → remocal → a local
//! server running the very same code. The floor takes the stolen hops through
//! two plain relays instead (`measure::floor`). A filtered steal
//! (`measure::filtered`) takes every connection to the port and passes the
//! requests it does not match to the pod's own server; its floor is one plain
//! relay in front of that server.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::bail;
use remocal_tests::netns::Netns;
use remocal_tests::processes::{Agent, Steal, Target, free_port};
use remocal_tests::remote::http_get;
use remocal_tests::servers::TcpServer;
use remocal_tests::topology::{Pod, Topology};
use tokio::time::{Instant, sleep};

use crate::probe;
use crate::server_process::{Place, ServerProcess};

/// The pod's HTTP port that sessions steal.
pub const HTTP_PORT: u16 = 80;
/// Another HTTP port of the same pod that no session touches.
pub const BYSTANDER_HTTP_PORT: u16 = 8080;
/// The pod's iperf3 port that sessions steal.
pub const STREAM_PORT: u16 = 5201;
/// Another iperf3 port of the same pod that no session touches.
pub const BYSTANDER_STREAM_PORT: u16 = 5202;
/// A sink in the pod whose traffic the mirror copies.
pub const MIRROR_PORT: u16 = 9000;
/// The pod's port the floor's first relay listens on; no server of the pod
/// has it.
pub const FLOOR_PORT: u16 = 8090;
/// The same, for the floor's stream to a local iperf3.
pub const FLOOR_STREAM_PORT: u16 = 5203;
/// The pod's port where one plain relay, in front of the pod's server on
/// [`HTTP_PORT`], takes the hop a filtered steal adds to the requests it
/// passes through; no server of the pod has it.
pub const PASSTHROUGH_FLOOR_PORT: u16 = 8091;

/// What a filtered steal matches (`--header`), and what a request carries to
/// be matched.
pub const FILTER_HEADER: &str = "x-dev: alice";

/// What the pod's HTTP servers answer, and what the local one answers: who
/// served a request is visible in its body.
pub const POD_BODY: &str = "pod";
pub const LOCAL_BODY: &str = "local";

pub struct Bed {
    // Field order is drop order: the agent detaches before the namespaces go.
    pub agent: Agent,
    _pod_http: [ServerProcess; 2],
    _pod_sink: TcpServer,
    topology: Topology,
}

impl Bed {
    pub async fn start() -> anyhow::Result<Bed> {
        let topology = Topology::new(1);
        let pod = Place::Pod(&topology.pod(0).netns);
        let pod_http = [
            ServerProcess::http(pod, HTTP_PORT, POD_BODY).await?,
            ServerProcess::http(pod, BYSTANDER_HTTP_PORT, POD_BODY).await?,
        ];
        let pod_sink = TcpServer::in_netns(&topology.pod(0).netns, MIRROR_PORT, discard);
        let agent = Agent::start().await;
        Ok(Bed {
            agent,
            _pod_http: pod_http,
            _pod_sink: pod_sink,
            topology,
        })
    }

    /// The developer's local HTTP server, answering [`LOCAL_BODY`].
    pub async fn local_http(&self) -> anyhow::Result<ServerProcess> {
        ServerProcess::http(Place::Local, free_port(), LOCAL_BODY).await
    }

    pub fn node(&self) -> &Netns {
        &self.topology.node
    }

    pub fn pod(&self) -> &Pod {
        self.topology.pod(0)
    }

    pub fn pod_addr(&self, port: u16) -> SocketAddr {
        self.pod().v4(port)
    }

    /// `http://POD:PORT/`, for wrk.
    pub fn pod_url(&self, port: u16) -> String {
        format!("http://{}/", self.pod_addr(port))
    }

    /// `remocal steal` of `port` to `127.0.0.1:local_port`, not started.
    pub fn steal(&self, port: u16, local_port: u16) -> Steal {
        self.session(Steal::new(&self.agent.url()), port, local_port)
    }

    /// `remocal mirror` of `port` to `127.0.0.1:local_port`, not started.
    pub fn mirror(&self, port: u16, local_port: u16) -> Steal {
        self.session(Steal::mirror(&self.agent.url()), port, local_port)
    }

    /// `remocal steal --header FILTER_HEADER` of `port` to
    /// `127.0.0.1:local_port`, not started: only requests carrying
    /// [`FILTER_HEADER`] reach the local server.
    pub fn filtered_steal(&self, port: u16, local_port: u16) -> Steal {
        self.steal(port, local_port)
            .arg("--header")
            .arg(FILTER_HEADER)
    }

    fn session(&self, command: Steal, port: u16, local_port: u16) -> Steal {
        command
            .target(&Target::Netns(self.pod().netns.path()))
            .port(port)
            .local_port(local_port)
    }

    /// Runs `measure` while a session steals the pod's HTTP port to a local
    /// server answering [`LOCAL_BODY`], and ends the session either way.
    pub async fn while_http_stolen<T>(
        &self,
        measure: impl AsyncFnOnce() -> anyhow::Result<T>,
    ) -> anyhow::Result<T> {
        let local = self.local_http().await?;
        let mut session = self.steal(HTTP_PORT, local.port()).start().await;
        let result = async {
            self.wait_for_server(LOCAL_BODY).await?;
            measure().await
        }
        .await;
        session.stop().await;
        result
    }

    /// Runs `measure` while a filtered steal of the pod's HTTP port sends the
    /// requests carrying [`FILTER_HEADER`] to a local server answering
    /// [`LOCAL_BODY`] (the pod answers the others), and ends the session
    /// either way.
    pub async fn while_http_filtered<T>(
        &self,
        measure: impl AsyncFnOnce() -> anyhow::Result<T>,
    ) -> anyhow::Result<T> {
        let local = self.local_http().await?;
        let mut session = self.filtered_steal(HTTP_PORT, local.port()).start().await;
        let result = async {
            self.wait_until_routed().await?;
            measure().await
        }
        .await;
        session.stop().await;
        result
    }

    /// Waits until a new connection's request with [`FILTER_HEADER`] is
    /// served locally and one without it by the pod.
    async fn wait_until_routed(&self) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(10);
        let addr = self.pod_addr(HTTP_PORT);
        let limit = Duration::from_secs(1);
        loop {
            let matched = probe::once(self.node(), addr, Some(FILTER_HEADER), limit).await;
            let unmatched = probe::once(self.node(), addr, None, limit).await;
            let served =
                |answer: &anyhow::Result<String>, body: &str| answer.as_deref().ok() == Some(body);
            if served(&matched, LOCAL_BODY) && served(&unmatched, POD_BODY) {
                return Ok(());
            }
            let (matched, unmatched) = (shown(&matched), shown(&unmatched));
            if Instant::now() >= deadline {
                bail!(
                    "the filtered steal of port {HTTP_PORT} does not route yet: with {FILTER_HEADER:?} the answer was {matched}, without it {unmatched} (wanted {LOCAL_BODY:?} and {POD_BODY:?})"
                );
            }
            sleep(Duration::from_millis(10)).await;
        }
    }

    /// Waits until a new connection to the pod's HTTP port is served by
    /// `body`'s server: a session ending gives new connections back to the pod.
    pub async fn wait_for_server(&self, body: &str) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let answer = http_get(
                self.node(),
                self.pod_addr(HTTP_PORT),
                Duration::from_secs(1),
            )
            .await;
            if answer.as_deref().ok() == Some(body) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!(
                    "the pod's port {HTTP_PORT} is not served by {body:?} (last answer {answer:?})"
                );
            }
            sleep(Duration::from_millis(10)).await;
        }
    }
}

fn shown(answer: &anyhow::Result<String>) -> String {
    match answer {
        Ok(body) => format!("{body:?}"),
        Err(err) => format!("an error ({err:#})"),
    }
}

/// Reads and forgets everything, like a log collector would.
async fn discard(mut stream: tokio::net::TcpStream) {
    let _ = tokio::io::copy(&mut stream, &mut tokio::io::sink()).await;
}
