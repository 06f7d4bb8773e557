//! Servers as separate processes, started the same way in the pod and
//! locally so direct and stolen traffic meet the same program: iperf3, and
//! this binary's own `serve-http` and `relay`. Separate processes also keep
//! their sockets out of this one's open-file limit.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context as _, bail};
use remocal_tests::netns::Netns;
use tokio::process::{Child, Command};
use tokio::time::{Instant, sleep};

/// A server child process, killed on drop.
pub struct ServerProcess {
    child: Child,
    port: u16,
}

/// Where a server runs: in the pod (every address) or on this host's loopback.
#[derive(Clone, Copy)]
pub enum Place<'a> {
    Pod(&'a Netns),
    Local,
}

impl Place<'_> {
    fn command(self, program: &str) -> Command {
        match self {
            Place::Pod(netns) => netns.tokio_command(program),
            Place::Local => Command::new(program),
        }
    }

    fn listen_addr(self, port: u16) -> SocketAddr {
        match self {
            Place::Pod(_) => (Ipv6Addr::UNSPECIFIED, port).into(),
            Place::Local => (Ipv4Addr::LOCALHOST, port).into(),
        }
    }
}

impl ServerProcess {
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The server's process id (for a relay in the pod, that of `ip netns
    /// exec`, which execs the relay: the same process).
    pub fn pid(&self) -> u32 {
        self.child.id().unwrap_or_default()
    }

    /// `iperf3 --server --one-off` on `port`.
    pub async fn iperf(place: Place<'_>, port: u16) -> anyhow::Result<ServerProcess> {
        let mut command = place.command("iperf3");
        command.args(["--server", "--one-off", "--port", &port.to_string()]);
        if let Place::Local = place {
            command.args(["--bind", "127.0.0.1"]);
        }
        let what = "iperf3 (apt-get install iperf3, or run `cargo xtask setup`)";
        ServerProcess::start(command, place, port, what).await
    }

    /// `remocal-bench serve-http` on `port`, answering `body`.
    pub async fn http(place: Place<'_>, port: u16, body: &str) -> anyhow::Result<ServerProcess> {
        let exe = std::env::current_exe().context("cannot find remocal-bench's own binary")?;
        let mut command = place.command(&exe.to_string_lossy());
        command
            .arg("serve-http")
            .arg("--listen")
            .arg(place.listen_addr(port).to_string())
            .arg("--body")
            .arg(body);
        ServerProcess::start(command, place, port, "remocal-bench serve-http").await
    }

    /// `remocal-bench relay` from `port` at `listen` to `to`, reading up to
    /// `buffer` bytes at once. The process runs on this host even when it
    /// listens in the pod, as the agent does: only its listener is the pod's.
    pub async fn relay(
        listen: Place<'_>,
        port: u16,
        to: SocketAddr,
        buffer: usize,
    ) -> anyhow::Result<ServerProcess> {
        let exe = std::env::current_exe().context("cannot find remocal-bench's own binary")?;
        let mut command = Command::new(exe);
        command
            .arg("relay")
            .arg("--listen")
            .arg(listen.listen_addr(port).to_string())
            .arg("--to")
            .arg(to.to_string())
            .arg(format!("--buffer={buffer}"));
        if let Place::Pod(netns) = listen {
            command.arg("--listen-netns").arg(netns.path());
        }
        ServerProcess::start(command, listen, port, "remocal-bench relay").await
    }

    /// `remocal-bench relay` run inside the pod's namespace, from `port` to
    /// `to` (the pod's own server on loopback): one plain hop in front of the
    /// pod, the one a filtered steal adds to the requests it passes through.
    pub async fn relay_in_pod(
        pod: &Netns,
        port: u16,
        to: SocketAddr,
        buffer: usize,
    ) -> anyhow::Result<ServerProcess> {
        let place = Place::Pod(pod);
        let exe = std::env::current_exe().context("cannot find remocal-bench's own binary")?;
        let mut command = place.command(&exe.to_string_lossy());
        command
            .arg("relay")
            .arg("--listen")
            .arg(place.listen_addr(port).to_string())
            .arg("--to")
            .arg(to.to_string())
            .arg(format!("--buffer={buffer}"));
        ServerProcess::start(command, place, port, "remocal-bench relay in the pod").await
    }

    async fn start(
        mut command: Command,
        place: Place<'_>,
        port: u16,
        what: &str,
    ) -> anyhow::Result<ServerProcess> {
        let child = command
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("cannot run {what}"))?;
        let server = ServerProcess { child, port };
        wait_listening(place, port)
            .await
            .with_context(|| format!("{what} did not start"))?;
        Ok(server)
    }
}

impl ServerProcess {
    /// Kills the server and waits until it is gone, so its port is free.
    pub async fn stop(mut self) {
        let _ = self.child.kill().await;
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}

/// `ss` in the right namespace, until something listens on `port`.
async fn wait_listening(place: Place<'_>, port: u16) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let output = place
            .command("ss")
            .args(["-Hltn", &format!("sport = :{port}")])
            .output()
            .await
            .context("cannot run ss (iproute2)")?;
        if !String::from_utf8_lossy(&output.stdout).trim().is_empty() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!("nothing listens on port {port} after 10 s");
        }
        sleep(Duration::from_millis(20)).await;
    }
}

/// `remocal-bench serve-http`: the HTTP server of both sides, the test
/// harness's keep-alive server in a process of its own.
pub fn serve_http(listen: SocketAddr, body: String) -> anyhow::Result<()> {
    let body: &'static str = body.leak();
    let listener = remocal_tests::netns::listen_in_current_namespace(listen)
        .with_context(|| format!("cannot listen on {listen}"))?;
    let runtime = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
    runtime.block_on(async {
        let _server = remocal_tests::servers::TcpServer::serve(listener, move |stream| {
            remocal_tests::servers::http(stream, body)
        });
        std::future::pending::<()>().await;
    });
    Ok(())
}
