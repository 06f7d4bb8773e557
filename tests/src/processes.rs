//! The two binaries under test, run as child processes the way a user runs them.
//!
//! Their output is drained continuously on helper threads (a full pipe would block
//! them) and kept, so failures can show what the programs said. Both are stopped on
//! drop, also when the test panics, so no stray agent keeps programs attached.

use std::ffi::OsString;
use std::io::{BufRead, BufReader, Read};
use std::net::{SocketAddr, TcpListener};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::time::{Instant, sleep};

use crate::netns::Netns;

/// How long a process may take to start (agent accepting, client printing `ready`) and
/// to stop; generous because debug builds on a busy machine are slow.
pub const START_TIMEOUT: Duration = Duration::from_secs(20);
const STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// How long an exited process's output may take to reach its end.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// Where the binaries are: `REMOCAL_BIN_DIR`, or the workspace's `target/debug`.
pub fn bin_dir() -> PathBuf {
    match std::env::var_os("REMOCAL_BIN_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debug"),
    }
}

/// Path to a binary under test, failing with what to do if it has not been built.
pub fn binary(name: &str) -> PathBuf {
    built_binary(name).unwrap_or_else(|missing| panic!("{missing}"))
}

/// The same, as an error for callers that report rather than panic.
pub fn built_binary(name: &str) -> Result<PathBuf, String> {
    let path = bin_dir().join(name);
    if path.is_file() {
        return Ok(path);
    }
    Err(format!(
        "{} not found: run `cargo xtask test`, or `cargo build -p remocal-agent -p remocal` first \
         (or point REMOCAL_BIN_DIR at the directory holding remocal-agent and remocal)",
        path.display()
    ))
}

/// A port on 127.0.0.1 that nothing listens on right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("find a free port")
        .port()
}

/// Text a child wrote so far, filled by a draining thread.
#[derive(Clone, Default)]
struct Captured {
    text: Arc<Mutex<String>>,
    /// The pipe reached its end: everything written is in `text`.
    complete: Arc<AtomicBool>,
}

impl Captured {
    fn drain(stream: impl Read + Send + 'static) -> Captured {
        let captured = Captured::default();
        let sink = captured.clone();
        std::thread::spawn(move || {
            let mut reader = BufReader::new(stream);
            let mut line = Vec::new();
            while matches!(reader.read_until(b'\n', &mut line), Ok(n) if n > 0) {
                sink.text
                    .lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&line));
                line.clear();
            }
            sink.complete.store(true, Ordering::Release);
        });
        captured
    }

    fn text(&self) -> String {
        self.text.lock().unwrap().clone()
    }

    fn is_complete(&self) -> bool {
        self.complete.load(Ordering::Acquire)
    }
}

/// A child process whose output is captured; signalled and reaped on drop.
struct Process {
    label: String,
    child: Child,
    stdout: Captured,
    stderr: Captured,
    status: Option<ExitStatus>,
}

impl Process {
    fn spawn(label: &str, mut command: Command) -> Process {
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {label} ({command:?}): {e}"));
        let stdout = Captured::drain(child.stdout.take().expect("piped stdout"));
        let stderr = Captured::drain(child.stderr.take().expect("piped stderr"));
        Process {
            label: label.to_string(),
            child,
            stdout,
            stderr,
            status: None,
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn try_status(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = self.child.try_wait().expect("waitpid");
        }
        self.status
    }

    fn signal(&mut self, signal: Signal) {
        if self.try_status().is_none() {
            let _ = kill(Pid::from_raw(self.pid() as i32), signal);
        }
    }

    async fn wait(&mut self, limit: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.try_status() {
                self.drained().await;
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until the draining threads have read the exited process's last
    /// lines: its pipes end once every holder closed them. Bounded, as a
    /// child of its own may still hold them.
    async fn drained(&self) {
        let deadline = Instant::now() + DRAIN_TIMEOUT;
        while !(self.stdout.is_complete() && self.stderr.is_complete()) && Instant::now() < deadline
        {
            sleep(Duration::from_millis(5)).await;
        }
    }

    /// SIGKILL and reap: when this returns the kernel has closed all its descriptors.
    fn kill9(&mut self) {
        self.signal(Signal::SIGKILL);
        if self.status.is_none() {
            self.status = Some(self.child.wait().expect("reap killed process"));
        }
    }

    fn report(&mut self) -> String {
        let state = match self.try_status() {
            Some(status) => format!("exited: {status}"),
            None => "running".to_string(),
        };
        format!(
            "--- {} (pid {}, {state}) stdout ---\n{}--- {} stderr ---\n{}",
            self.label,
            self.child.id(),
            self.stdout.text(),
            self.label,
            self.stderr.text()
        )
    }

    /// Graceful first so a running session removes its redirection like a user's
    /// Ctrl-C would, then forceful.
    fn stop_blocking(&mut self) {
        if self.try_status().is_some() {
            return;
        }
        self.signal(Signal::SIGTERM);
        let deadline = std::time::Instant::now() + STOP_TIMEOUT;
        while std::time::Instant::now() < deadline {
            if self.try_status().is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        eprintln!("{} did not stop on SIGTERM, killing it", self.label);
        self.kill9();
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        // Reported before stopping, so the state shows how the test left it.
        let report = std::thread::panicking().then(|| self.report());
        self.stop_blocking();
        if let Some(report) = report {
            eprintln!("{report}");
        }
    }
}

/// Resident memory of a process, in KiB.
pub fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("the process runs");
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/PID/status")
}

/// A running `remocal-agent`, listening for gRPC on a private loopback port.
pub struct Agent {
    process: Process,
    addr: SocketAddr,
    metrics: SocketAddr,
}

impl Agent {
    /// Starts the agent and returns once its gRPC port accepts connections.
    pub async fn start() -> Agent {
        Agent::start_with(&[]).await
    }

    /// Arguments every test agent needs: it picks its own free ports (port 0)
    /// and reports them in its ready line; ports chosen here and bound later
    /// could be taken by a concurrent test in between.
    pub const LISTEN_ARGS: [&'static str; 4] = [
        "--grpc-listen",
        "127.0.0.1:0",
        "--metrics-listen",
        "127.0.0.1:0",
    ];

    /// The same, with extra command line arguments (after [`Agent::LISTEN_ARGS`]).
    pub async fn start_with(args: &[&str]) -> Agent {
        let mut command = Command::new(binary("remocal-agent"));
        command.args(Agent::LISTEN_ARGS).args(args);
        Agent::start_command(command).await
    }

    /// Starts the agent from a command line the caller built, for agents that
    /// need more than arguments: a wrapper that prepares the process's world
    /// (say, a mount namespace holding a pod's service-account files) and then
    /// `exec`s `remocal-agent` with [`Agent::LISTEN_ARGS`]. The wrapper must
    /// exec, not fork: the agent is then the spawned process itself, so
    /// [`Agent::pid`] is the agent's and stopping it on drop stops the agent.
    /// Returns once the agent logged its ready line.
    pub async fn start_command(command: Command) -> Agent {
        let mut process = Process::spawn("remocal-agent", command);
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(status) = process.try_status() {
                panic!(
                    "remocal-agent exited during startup ({status})\n{}",
                    process.report()
                );
            }
            let logs = process.stderr.text();
            if let Some(ready) = logs
                .lines()
                .find(|line| line.contains("remocal-agent ready"))
            {
                let field = |name: &str| -> SocketAddr {
                    ready
                        .split_whitespace()
                        .find_map(|part| part.strip_prefix(&format!("{name}=")))
                        .and_then(|addr| addr.parse().ok())
                        .unwrap_or_else(|| {
                            panic!("no {name}= address in the agent's ready line: {ready}")
                        })
                };
                let (addr, metrics) = (field("grpc"), field("metrics"));
                return Agent {
                    process,
                    addr,
                    metrics,
                };
            }
            if Instant::now() >= deadline {
                panic!(
                    "remocal-agent was not ready within {START_TIMEOUT:?}\n{}",
                    process.report()
                );
            }
            sleep(Duration::from_millis(20)).await;
        }
    }

    /// Where the agent serves `/metrics`, `/healthz` and `/readyz`.
    pub fn metrics_addr(&self) -> SocketAddr {
        self.metrics
    }

    /// Where the agent serves gRPC (on the host's loopback, like in a cluster).
    pub fn grpc_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The `--agent` value that reaches this agent.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    /// `kill -9`, returning once the process is gone.
    pub fn kill9(&mut self) {
        self.process.kill9();
    }

    pub fn logs(&self) -> String {
        self.process.stderr.text()
    }

    /// SIGTERM, as a rolling update sends it; the exit status if the agent
    /// exited within `limit`.
    pub async fn terminate(&mut self, limit: Duration) -> Option<ExitStatus> {
        self.process.signal(Signal::SIGTERM);
        self.process.wait(limit).await
    }

    /// Resident memory, in KiB.
    pub fn rss_kib(&self) -> u64 {
        rss_kib(self.pid())
    }

    /// The value of one sample of `/metrics`, e.g.
    /// `remocal_session_errors_total{reason="Unauthenticated"}`; 0 when absent
    /// (a counter nothing incremented yet).
    pub async fn metric(&self, sample: &str) -> f64 {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let mut stream = tokio::net::TcpStream::connect(self.metrics)
            .await
            .expect("reach the agent's metrics");
        stream
            .write_all(b"GET /metrics HTTP/1.0\r\nHost: agent\r\n\r\n")
            .await
            .expect("ask for the metrics");
        let mut response = String::new();
        stream
            .read_to_string(&mut response)
            .await
            .expect("read the metrics");
        response
            .lines()
            .find_map(|line| line.strip_prefix(sample)?.strip_prefix(' '))
            .map_or(0.0, |value| value.trim().parse().expect("a number"))
    }
}

/// What the user names as the thing to steal from.
#[derive(Clone, Debug)]
pub enum Target {
    Netns(PathBuf),
    Pid(u32),
}

/// A `remocal steal` command line being put together.
#[derive(Clone, Debug)]
pub struct Steal {
    args: Vec<OsString>,
    envs: Vec<(OsString, OsString)>,
}

impl Steal {
    /// A `remocal` command line from scratch (`agents`, or a session that finds
    /// its agent through the cluster).
    pub fn remocal(args: &[&str]) -> Steal {
        Steal {
            args: args.iter().map(OsString::from).collect(),
            envs: Vec::new(),
        }
    }

    /// `remocal steal --agent URL`, without target or port (tests of usage errors leave
    /// some out on purpose).
    pub fn new(agent_url: &str) -> Steal {
        Steal::remocal(&["steal", "--agent", agent_url])
    }

    /// `remocal mirror --agent URL`: the same command line otherwise.
    pub fn mirror(agent_url: &str) -> Steal {
        Steal::remocal(&["mirror", "--agent", agent_url])
    }

    pub fn target(self, target: &Target) -> Steal {
        match target {
            Target::Netns(path) => self.arg("--netns").arg(path),
            Target::Pid(pid) => self.arg("--pid").arg(pid.to_string()),
        }
    }

    /// Takes any text so that out-of-range values can be tried.
    pub fn port(self, port: impl ToString) -> Steal {
        self.arg("--port").arg(port.to_string())
    }

    pub fn local_port(self, port: u16) -> Steal {
        self.arg("--local-port").arg(port.to_string())
    }

    /// An environment variable for the command (KUBECONFIG, say).
    pub fn env(mut self, key: impl Into<OsString>, value: impl Into<OsString>) -> Steal {
        self.envs.push((key.into(), value.into()));
        self
    }

    pub fn arg(mut self, arg: impl Into<OsString>) -> Steal {
        self.args.push(arg.into());
        self
    }

    fn spawn(&self) -> Process {
        let mut command = Command::new(binary("remocal"));
        command.args(&self.args).envs(self.envs.iter().cloned());
        Process::spawn("remocal", command)
    }

    /// Runs the session without waiting for its `ready` line (which may
    /// never come); the returned client's `ready_line` is empty.
    pub fn spawn_running(&self) -> Client {
        Client {
            process: self.spawn(),
            ready_line: String::new(),
        }
    }

    /// Runs the session and returns once it printed its `ready` line.
    pub async fn start(&self) -> Client {
        let mut process = self.spawn();
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            let stdout = process.stdout.text();
            if let Some(line) = stdout.lines().find(|line| line.starts_with("ready")) {
                let ready_line = line.to_string();
                return Client {
                    process,
                    ready_line,
                };
            }
            if let Some(status) = process.try_status() {
                sleep(Duration::from_millis(50)).await;
                panic!(
                    "remocal steal {:?} exited ({status}) before printing `ready`\n{}",
                    self.args,
                    process.report()
                );
            }
            if Instant::now() >= deadline {
                panic!(
                    "remocal steal {:?} printed no `ready` line within {START_TIMEOUT:?}\n{}",
                    self.args,
                    process.report()
                );
            }
            sleep(Duration::from_millis(20)).await;
        }
    }

    /// Runs a command that is expected to end by itself (a rejected one).
    pub async fn run_to_exit(&self) -> Finished {
        let mut process = self.spawn();
        let Some(status) = process.wait(START_TIMEOUT).await else {
            process.kill9();
            panic!(
                "remocal steal {:?} was expected to exit but still ran after {START_TIMEOUT:?}\n{}",
                self.args,
                process.report()
            );
        };
        Finished {
            code: status.code(),
            stdout: process.stdout.text(),
            stderr: process.stderr.text(),
        }
    }
}

/// A long-running process inside a pod, the kind `--pid` points at and the
/// kind kubelet puts in a pod's cgroup. Killed on drop.
pub struct PodProcess(Child);

impl PodProcess {
    pub async fn start(netns: &Netns) -> PodProcess {
        let child = netns
            .command("sleep")
            .arg("600")
            .spawn()
            .expect("start a process in the pod");
        let process = PodProcess(child);
        // `ip netns exec` joins the namespace before it execs sleep; wait for that.
        let wanted = std::fs::metadata(netns.path()).expect("stat netns").ino();
        let link = format!("/proc/{}/ns/net", process.pid());
        for _ in 0..500 {
            if std::fs::metadata(&link).map(|m| m.ino()).ok() == Some(wanted) {
                return process;
            }
            sleep(Duration::from_millis(10)).await;
        }
        panic!("process {} never entered {}", process.pid(), netns.name());
    }

    pub fn pid(&self) -> u32 {
        self.0.id()
    }
}

impl Drop for PodProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// How a finished `remocal` run ended, as a user sees it.
#[derive(Debug)]
pub struct Finished {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

/// A running `remocal steal` session that printed `ready`.
pub struct Client {
    process: Process,
    ready_line: String,
}

impl Client {
    pub fn ready_line(&self) -> &str {
        &self.ready_line
    }

    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    /// Ctrl-C equivalent: SIGTERM, then wait for the exit.
    pub async fn stop(&mut self) -> Finished {
        self.process.signal(Signal::SIGTERM);
        self.wait_exit(STOP_TIMEOUT).await
    }

    /// Waits for the session to end on its own (e.g. its agent died).
    pub async fn wait_exit(&mut self, limit: Duration) -> Finished {
        let Some(status) = self.process.wait(limit).await else {
            panic!(
                "remocal did not exit within {limit:?}\n{}",
                self.process.report()
            );
        };
        Finished {
            code: status.code(),
            stdout: self.process.stdout.text(),
            stderr: self.process.stderr.text(),
        }
    }

    /// `kill -9`, returning once the process is gone.
    pub fn kill9(&mut self) {
        self.process.kill9();
    }

    pub fn stderr(&self) -> String {
        self.process.stderr.text()
    }

    /// Everything printed on stdout so far (the `ready` line, and with -v the
    /// connection lines).
    pub fn stdout(&self) -> String {
        self.process.stdout.text()
    }
}
