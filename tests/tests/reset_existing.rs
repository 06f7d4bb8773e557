//! Clients already connected: `--reset-existing` ends the pod's idle
//! keep-alive connections to the stolen port, so their clients reconnect
//! into the steal; a connection busy with a request is ended only once it
//! was answered, or left to the pod at the deadline. Nothing else is ever
//! ended: not other ports, not the pod's own outgoing connections, not a
//! sidecar's over loopback, not the connections the agent holds. Without
//! the flag, the session says how many connections still go to the pod.
//!
//! Real clients (Python's http.client polling like a connection pool,
//! tonic's gRPC channel, a hand-written HTTP/1.1 client whose socket the
//! test can look at), the real agent and its kernel side, the real `remocal`
//! CLI. Every answer names the server that gave it
//! (`tests/src/http_servers.rs`), so the tests read from the bytes a client
//! got who served it.

use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::os::fd::AsRawFd as _;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use remocal_tests::grpc_echo::EchoClient;
use remocal_tests::http_clients::{EXCHANGE_LIMIT, Http1};
use remocal_tests::http_servers::{Answer, HttpServer};
use remocal_tests::netns::Netns;
use remocal_tests::processes::{Agent, Client, Steal, binary};
use remocal_tests::retry::until_ok;
use remocal_tests::scenario::Scenario;
use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::TcpStream;
use tokio::process::Child;
use tokio::task::JoinHandle;
use tokio::time::{Instant, sleep, timeout};

const PORT: u16 = 80;
const ALICE: &[&str] = &["--header", "x-dev: alice"];
const BOB: &[&str] = &["--header", "x-dev: bob"];
const RESET: &str = "--reset-existing";
/// A bound for what should happen soon: generous, for a loaded machine; a
/// test only waits that long when it is failing.
const SOON: Duration = Duration::from_secs(15);
/// How long clients are watched after `ready` to see that they keep being
/// served as they should.
const WATCH: f64 = 1.5;

const ENDED: &str = "remocal_reset_connections_total{outcome=\"ended\"}";
const LEFT_ALONE: &str = "remocal_reset_connections_total{outcome=\"left_alone\"}";

/// A node with one pod whose own servers answer on some ports (on PORT,
/// the server named `pod`), and an agent.
struct Pod {
    // Field order is drop order: the servers, then the agent and namespaces.
    _servers: Vec<HttpServer>,
    scenario: Scenario,
}

impl Pod {
    async fn start() -> Pod {
        Pod::with_servers(&[(PORT, "pod")]).await
    }

    /// The pod's servers: `(port, name)`.
    async fn with_servers(servers: &[(u16, &'static str)]) -> Pod {
        Pod::with_agent(servers, &[]).await
    }

    /// An agent that ends connections only `with` one way
    /// (`--end-connections-with`).
    async fn ending_with(with: &str) -> Pod {
        Pod::with_agent(&[(PORT, "pod")], &["--end-connections-with", with]).await
    }

    async fn with_agent(servers: &[(u16, &'static str)], agent_args: &[&str]) -> Pod {
        let scenario = Scenario::start_with(1, &[], agent_args).await;
        let servers = servers
            .iter()
            .map(|&(port, name)| HttpServer::in_netns(&scenario.pod(0).netns, port, name))
            .collect();
        Pod {
            _servers: servers,
            scenario,
        }
    }

    /// The pod's server on PORT listening on its IPv4 address alone (its
    /// connections are IPv4 sockets, not IPv4-mapped IPv6 ones).
    /// Its agent ends connections with netlink, the fallback for kernels
    /// without the iterator's kfunc.
    async fn ipv4_only() -> Pod {
        let scenario = Scenario::start_with(1, &[], &["--end-connections-with", "netlink"]).await;
        let server =
            HttpServer::in_netns_at(&scenario.pod(0).netns, scenario.pod(0).v4(PORT), "pod");
        Pod {
            _servers: vec![server],
            scenario,
        }
    }

    fn node(&self) -> &Netns {
        self.scenario.node()
    }

    fn netns(&self) -> &Netns {
        &self.scenario.pod(0).netns
    }

    fn agent(&self) -> &Agent {
        &self.scenario.agent
    }

    /// The pod's IPv4 address on PORT.
    fn addr(&self) -> SocketAddr {
        self.scenario.pod(0).v4(PORT)
    }

    /// `remocal steal --netns <pod> --port PORT --local-port <local> ARGS...`.
    fn steal(&self, local: &HttpServer, args: &[&str]) -> Steal {
        args.iter()
            .fold(self.scenario.steal(0, PORT, &local.server), |steal, arg| {
                steal.arg(arg)
            })
    }
}

/// The node's own address on the pod's link (see `Topology::new`).
fn node_addr(port: u16) -> SocketAddr {
    SocketAddr::new(Ipv4Addr::new(198, 18, 0, 1).into(), port)
}

fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

// ---------------------------------------------------------------------------
// A client polling like a connection pool: tests/scripts/polling_client.py.
// ---------------------------------------------------------------------------

/// What the polling client printed for one request.
#[derive(Clone, Debug)]
struct Poll {
    /// Wall-clock time the request went out.
    at: f64,
    /// 1 for the client's first connection, +1 per reconnect.
    connection: u64,
    answer: Option<Answer>,
    error: Option<String>,
}

impl Poll {
    fn by(&self) -> Option<&str> {
        self.answer.as_ref().map(|answer| answer.by.as_str())
    }
}

/// `polling_client.py` polling every 50 ms, its printed lines collected as
/// they come. Killed on drop.
struct Poller {
    label: &'static str,
    child: Child,
    polls: Arc<Mutex<Vec<Poll>>>,
    stderr: Arc<Mutex<String>>,
    readers: Vec<JoinHandle<()>>,
}

impl Poller {
    /// From `netns` to `addr`, with `x-dev: DEV` when given. It polls for
    /// longer than any test runs: the test stops it.
    fn start(label: &'static str, netns: &Netns, addr: SocketAddr, dev: Option<&str>) -> Poller {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/polling_client.py");
        let mut command = netns.tokio_command("python3");
        command
            .arg(script)
            .arg(addr.ip().to_string())
            .arg(addr.port().to_string())
            .arg("50")
            .arg("120");
        if let Some(dev) = dev {
            command.arg(dev);
        }
        let mut child = command
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("start python3");
        let polls = Arc::new(Mutex::new(Vec::new()));
        let stderr = Arc::new(Mutex::new(String::new()));
        let mut lines = BufReader::new(child.stdout.take().expect("piped stdout")).lines();
        let sink = polls.clone();
        let stdout_reader = tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                if let Some(poll) = parse_poll(&line) {
                    sink.lock().unwrap().push(poll);
                }
            }
        });
        let mut errors = child.stderr.take().expect("piped stderr");
        let sink = stderr.clone();
        let stderr_reader = tokio::spawn(async move {
            let mut text = Vec::new();
            let _ = errors.read_to_end(&mut text).await;
            sink.lock()
                .unwrap()
                .push_str(&String::from_utf8_lossy(&text));
        });
        Poller {
            label,
            child,
            polls,
            stderr,
            readers: vec![stdout_reader, stderr_reader],
        }
    }

    fn polls(&self) -> Vec<Poll> {
        self.polls.lock().unwrap().clone()
    }

    /// Waits (at most [`SOON`]) until `done` holds for the polls so far;
    /// returns them.
    async fn wait_for(&self, what: &str, done: impl Fn(&[Poll]) -> bool) -> Vec<Poll> {
        let deadline = Instant::now() + SOON;
        loop {
            let polls = self.polls();
            if done(&polls) {
                return polls;
            }
            assert!(
                Instant::now() < deadline,
                "{}: {what} did not happen within {SOON:?}: {polls:#?}\nstderr: {}",
                self.label,
                self.stderr.lock().unwrap()
            );
            sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until the client is connected and served by `by`: its first
    /// two requests answered on its first connection.
    async fn served_by(&self, by: &str) {
        let polls = self
            .wait_for(&format!("two answers by {by}"), |polls| polls.len() >= 2)
            .await;
        assert!(
            polls
                .iter()
                .all(|poll| poll.connection == 1 && poll.by() == Some(by)),
            "{}: expected answers by {by} on one connection: {polls:#?}",
            self.label
        );
    }

    /// Waits until requests sent `seconds` after `since` were answered.
    async fn answered_after(&self, since: f64, seconds: f64) {
        self.wait_for(&format!("an answer {seconds} s after ready"), |polls| {
            polls
                .iter()
                .any(|poll| poll.at > since + seconds && poll.answer.is_some())
        })
        .await;
    }

    /// Stops the client; every request it made.
    async fn stop(mut self) -> Vec<Poll> {
        let _ = self.child.start_kill();
        let _ = timeout(SOON, self.child.wait()).await;
        for reader in self.readers.drain(..) {
            let _ = timeout(SOON, reader).await;
        }
        self.polls()
    }
}

fn parse_poll(line: &str) -> Option<Poll> {
    let line: serde_json::Value = serde_json::from_str(line).ok()?;
    let answer = match (line["status"].as_u64(), line["body"].as_str()) {
        (Some(200), Some(body)) => Some(Answer::expect(body)),
        (None, None) => None,
        _ => panic!("not an answer of a test server: {line}"),
    };
    Some(Poll {
        at: line["t"].as_f64()?,
        connection: line["connection"].as_u64()?,
        answer,
        error: line["error"].as_str().map(str::to_string),
    })
}

/// How one client's requests went, across a reset.
#[derive(Debug)]
struct Followed {
    errors: usize,
    /// Distinct connections, in order.
    connections: Vec<u64>,
}

/// Checks the polls of one client: every request answered (with `dev` as
/// sent) or failed, at most one failed and at most one reconnect; answers
/// on each connection by the server `by[connection - 1]`.
fn follow(label: &str, polls: &[Poll], dev: &str, by: &[&str]) -> Followed {
    let mut followed = Followed {
        errors: 0,
        connections: Vec::new(),
    };
    for poll in polls {
        if !followed.connections.contains(&poll.connection) {
            followed.connections.push(poll.connection);
        }
        match (&poll.answer, &poll.error) {
            (Some(answer), None) => {
                let wanted = by.get(poll.connection as usize - 1);
                assert_eq!(
                    Some(&answer.by.as_str()),
                    wanted,
                    "{label}: connection {} answered by {answer}: {polls:#?}",
                    poll.connection
                );
                assert_eq!(answer.dev, dev, "{label}: {answer}");
            }
            (None, Some(_)) => followed.errors += 1,
            _ => panic!("{label}: neither answer nor error: {poll:?}"),
        }
    }
    assert!(
        followed.errors <= 1 && followed.connections.len() <= 2,
        "{label}: at most one failed request and one reconnect: {followed:?} {polls:#?}"
    );
    followed
}

// ---------------------------------------------------------------------------
// A hand-written HTTP/1.1 client, for requests the test sends piece by piece.
// ---------------------------------------------------------------------------

/// One keep-alive connection, speaking HTTP/1.1 by hand.
struct RawHttp {
    stream: BufReader<TcpStream>,
}

impl RawHttp {
    async fn connect(netns: &Netns, addr: SocketAddr) -> RawHttp {
        let stream = netns
            .connect(addr)
            .await
            .unwrap_or_else(|e| panic!("connect to {addr}: {e}"));
        RawHttp {
            stream: BufReader::new(stream),
        }
    }

    async fn send(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.stream.get_mut().write_all(bytes).await
    }

    /// Waits until the peer's kernel acknowledged everything sent: the
    /// request is the pod's, read or in its socket's receive queue.
    async fn delivered(&self) {
        let fd = self.stream.get_ref().as_raw_fd();
        let queued = || {
            let mut queued: libc::c_int = 0;
            // SAFETY: SIOCOUTQ (TIOCOUTQ) writes one int for a TCP socket we own.
            let done = unsafe { libc::ioctl(fd, libc::TIOCOUTQ, &mut queued) };
            assert_eq!(done, 0, "SIOCOUTQ: {}", io::Error::last_os_error());
            queued
        };
        let deadline = Instant::now() + SOON;
        while queued() > 0 {
            assert!(
                Instant::now() < deadline,
                "the request was never acknowledged"
            );
            sleep(Duration::from_millis(5)).await;
        }
    }

    /// `GET path`, without waiting for the answer.
    async fn send_get(&mut self, path: &str) -> io::Result<()> {
        self.send(format!("GET {path} HTTP/1.1\r\nHost: web.shop\r\n\r\n").as_bytes())
            .await
    }

    /// Reads one answer (status 200 with a Content-Length).
    async fn answer(&mut self) -> io::Result<Answer> {
        let mut line = String::new();
        let mut length = None;
        let mut status = None;
        loop {
            line.clear();
            if self.stream.read_line(&mut line).await? == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            let header = line.trim_end();
            if status.is_none() {
                status = Some(header.to_string());
                continue;
            }
            if header.is_empty() {
                break;
            }
            if let Some((name, value)) = header.split_once(':')
                && name.eq_ignore_ascii_case("content-length")
            {
                length = value.trim().parse::<usize>().ok();
            }
        }
        let status = status.unwrap_or_default();
        assert!(status.starts_with("HTTP/1.1 200 "), "{status}");
        let mut body = vec![0; length.expect("a Content-Length")];
        self.stream.read_exact(&mut body).await?;
        Ok(Answer::expect(&String::from_utf8_lossy(&body)))
    }

    /// `GET path` and its answer, bounded in time.
    async fn get(&mut self, path: &str) -> io::Result<Answer> {
        timeout(EXCHANGE_LIMIT, async {
            self.send_get(path).await?;
            self.answer().await
        })
        .await
        .unwrap_or_else(|_| panic!("GET {path}: no answer within {EXCHANGE_LIMIT:?}"))
    }
}

/// One GET on a hyper connection, bounded in time; the answer.
async fn exchange(client: &mut Http1, path: &str, dev: Option<&str>) -> Answer {
    let reply = timeout(EXCHANGE_LIMIT, client.get(path, dev))
        .await
        .unwrap_or_else(|_| panic!("GET {path} (x-dev {dev:?}): no answer"))
        .unwrap_or_else(|e| panic!("GET {path} (x-dev {dev:?}) failed: {e}"));
    assert_eq!(reply.status, 200, "GET {path}: {reply:?}");
    Answer::expect(&reply.text())
}

// ---------------------------------------------------------------------------
// The session's output.
// ---------------------------------------------------------------------------

/// Waits until `text()` contains `wanted`; returns the text.
async fn until_printed(what: &str, text: impl Fn() -> String, wanted: &str) -> String {
    let printed = until_ok(Instant::now() + SOON, Duration::from_millis(20), || {
        let text = text();
        std::future::ready(if text.contains(wanted) {
            Ok(text)
        } else {
            Err(text)
        })
    })
    .await;
    printed.unwrap_or_else(|text| panic!("no {wanted:?} in {what} within {SOON:?}:\n{text}"))
}

/// Waits for the session to say the reset is over, in its ready line
/// (`… reset: ended=N waiting=M done -> …`) or a later `reset ended=N
/// waiting=M done` line; returns `ended=N waiting=M done`.
async fn reset_done(session: &Client) -> String {
    let stdout = until_printed("the session's stdout", || session.stdout(), " done").await;
    let line = stdout
        .lines()
        .find(|line| {
            (line.starts_with("ready") || line.starts_with("reset ")) && line.contains(" done")
        })
        .unwrap_or_else(|| panic!("no reset line saying done: {stdout}"));
    let start = line.find("ended=").unwrap_or_else(|| panic!("{line}"));
    let end = line.find(" done").unwrap() + " done".len();
    line[start..end].to_string()
}

/// Waits until the agent's metric `sample` reads `wanted`.
async fn until_metric(agent: &Agent, sample: &str, wanted: f64) {
    let read = until_ok(Instant::now() + SOON, Duration::from_millis(50), || async {
        let value = agent.metric(sample).await;
        if value == wanted { Ok(()) } else { Err(value) }
    })
    .await;
    if let Err(value) = read {
        panic!("{sample} is {value}, not {wanted}, after {SOON:?}");
    }
}

/// `remocal steal … --output json`, its stdout lines collected as they come.
struct JsonSession {
    child: Child,
    lines: Arc<Mutex<Vec<serde_json::Value>>>,
    stderr: Arc<Mutex<String>>,
}

impl JsonSession {
    /// Returns once the ready event was printed.
    async fn start(pod: &Pod, local: &HttpServer, args: &[&str]) -> JsonSession {
        let mut child = tokio::process::Command::new(binary("remocal"))
            .args(["steal", "--agent", &pod.agent().url(), "--netns"])
            .arg(pod.netns().path())
            .args([
                "--port",
                &PORT.to_string(),
                "--local-port",
                &local.port().to_string(),
            ])
            .args(args)
            .args(["--output", "json"])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("start remocal");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let stderr = Arc::new(Mutex::new(String::new()));
        let sink = stderr.clone();
        let mut errors = BufReader::new(child.stderr.take().unwrap()).lines();
        tokio::spawn(async move {
            while let Ok(Some(line)) = errors.next_line().await {
                let mut text = sink.lock().unwrap();
                text.push_str(&line);
                text.push('\n');
            }
        });
        let sink = lines.clone();
        let mut stdout = BufReader::new(child.stdout.take().unwrap()).lines();
        tokio::spawn(async move {
            while let Ok(Some(line)) = stdout.next_line().await {
                let value = serde_json::from_str(&line)
                    .unwrap_or_else(|e| panic!("not JSON: {line:?}: {e}"));
                sink.lock().unwrap().push(value);
            }
        });
        let session = JsonSession {
            child,
            lines,
            stderr,
        };
        session
            .wait_for("the ready event", |line| line["event"] == "ready")
            .await;
        session
    }

    fn lines(&self) -> Vec<serde_json::Value> {
        self.lines.lock().unwrap().clone()
    }

    async fn wait_for(
        &self,
        what: &str,
        found: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let deadline = Instant::now() + SOON;
        loop {
            if let Some(line) = self.lines().into_iter().find(|line| found(line)) {
                return line;
            }
            assert!(
                Instant::now() < deadline,
                "no {what} within {SOON:?}: {:#?}\nstderr: {}",
                self.lines(),
                self.stderr.lock().unwrap()
            );
            sleep(Duration::from_millis(20)).await;
        }
    }

    /// The reset's outcome: the ready event's `reset`, or a `reset` event,
    /// with `done` set.
    async fn reset_done(&self) -> serde_json::Value {
        self.wait_for("a reset that is done", |line| {
            (line["event"] == "ready" && line["reset"]["done"] == true)
                || (line["event"] == "reset" && line["done"] == true)
        })
        .await;
        let line = self
            .lines()
            .into_iter()
            .find(|line| line["done"] == true || line["reset"]["done"] == true)
            .unwrap();
        if line["event"] == "ready" {
            line["reset"].clone()
        } else {
            line
        }
    }

    /// SIGTERM, like Ctrl-C; the exit is 0.
    async fn stop(&mut self) {
        let pid = self.child.id().expect("running") as i32;
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGTERM,
        );
        let status = timeout(SOON, self.child.wait())
            .await
            .expect("remocal exits on SIGTERM")
            .unwrap();
        assert_eq!(status.code(), Some(0), "{status}");
    }
}

// ---------------------------------------------------------------------------
// The tests.
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keepalive_client_connected_before_the_steal_reaches_it_within_a_second() {
    let pod = Pod::ending_with("kernel-iterator").await;
    let local = HttpServer::local("local");
    let client = Poller::start("client", pod.node(), pod.addr(), None);
    client.served_by("pod").await;

    let mut session = pod.steal(&local, &[RESET]).start().await;
    let ready = now();
    assert!(
        session.ready_line().contains(" reset: ended="),
        "{}",
        session.ready_line()
    );
    let polls = client
        .wait_for("an answer by the local process", |polls| {
            polls.iter().any(|poll| poll.by() == Some("local"))
        })
        .await;
    let first_stolen = polls
        .iter()
        .find(|poll| poll.by() == Some("local"))
        .unwrap();
    assert!(
        first_stolen.at - ready <= 1.0,
        "first stolen request {:.3} s after ready: {polls:#?}",
        first_stolen.at - ready
    );
    client.answered_after(ready, WATCH).await;
    let polls = client.stop().await;
    let followed = follow("client", &polls, "-", &["pod", "local"]);
    assert_eq!(followed.connections, [1, 2], "{polls:#?}");
    assert_eq!(reset_done(&session).await, "ended=1 waiting=0 done");
    let finished = session.stop().await;
    assert_eq!(finished.code, Some(0), "{finished:?}");
}

/// A pooled connection that served one request and fell silent: request,
/// answer and acknowledgement took far less than a kernel tick, so no look
/// can order them, and only the socket itself (in the kernel iterator)
/// shows that the answer came last. Ended all the same, and the client's
/// next request, on a new connection, reaches the local process.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_silent_since_its_answer_is_taken_over() {
    let pod = Pod::ending_with("kernel-iterator").await;
    let local = HttpServer::local("local");
    let mut pooled = Http1::connect(pod.node(), pod.addr()).await.unwrap();
    assert_eq!(exchange(&mut pooled, "/pooled", None).await.by, "pod");

    let mut session = pod.steal(&local, &[RESET]).start().await;
    assert_eq!(reset_done(&session).await, "ended=1 waiting=0 done");
    let again = timeout(EXCHANGE_LIMIT, pooled.get("/pooled/again", None))
        .await
        .expect("an answer or an error, not a hang");
    assert!(again.is_err(), "the pooled connection was ended: {again:?}");
    let mut fresh = Http1::connect(pod.node(), pod.addr()).await.unwrap();
    assert_eq!(exchange(&mut fresh, "/fresh", None).await.by, "local");
    let finished = session.stop().await;
    assert_eq!(finished.code, Some(0), "{finished:?}");
}

/// A server listening on the pod's IPv4 address alone has IPv4 sockets (a
/// dual-stack one has IPv4-mapped IPv6 ones): ended all the same, here by
/// the netlink fallback.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_of_an_ipv4_only_server_are_ended_too() {
    let pod = Pod::ipv4_only().await;
    let local = HttpServer::local("local");
    let client = Poller::start("client", pod.node(), pod.addr(), None);
    client.served_by("pod").await;

    let mut session = pod.steal(&local, &[RESET]).start().await;
    assert_eq!(reset_done(&session).await, "ended=1 waiting=0 done");
    client
        .wait_for("an answer by the local process", |polls| {
            polls.iter().any(|poll| poll.by() == Some("local"))
        })
        .await;
    let polls = client.stop().await;
    let followed = follow("client", &polls, "-", &["pod", "local"]);
    assert_eq!(followed.connections, [1, 2], "{polls:#?}");
    let finished = session.stop().await;
    assert_eq!(finished.code, Some(0), "{finished:?}");
}

/// A filtered steal ends the pod's connections of every client (the agent
/// cannot tell whose a connection is before its next request): alice's
/// client reconnects into her session within a second, the other client
/// reconnects once and goes on being served by the pod.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_filtered_reset_sends_alices_client_to_her_and_the_other_back_to_the_pod() {
    let pod = Pod::start().await;
    let alice = HttpServer::local("alice");
    let alices = Poller::start("alice's client", pod.node(), pod.addr(), Some("alice"));
    let others = Poller::start("the other client", pod.node(), pod.addr(), None);
    alices.served_by("pod").await;
    others.served_by("pod").await;

    let mut session = pod.steal(&alice, &[ALICE, &[RESET]].concat()).start().await;
    let ready = now();
    assert!(
        session
            .ready_line()
            .contains("port=80 requests matching --header 'x-dev: alice' reset: ended="),
        "{}",
        session.ready_line()
    );
    let polls = alices
        .wait_for("an answer by alice", |polls| {
            polls.iter().any(|poll| poll.by() == Some("alice"))
        })
        .await;
    let first = polls
        .iter()
        .position(|poll| poll.by() == Some("alice"))
        .unwrap();
    assert!(
        polls[first].at - ready <= 1.0,
        "alice's first request served by her went out {:.3} s after ready: {polls:#?}",
        polls[first].at - ready
    );
    alices.answered_after(ready, WATCH).await;
    others.answered_after(ready, WATCH).await;
    let alices = alices.stop().await;
    let others = others.stop().await;

    let followed = follow("alice's client", &alices, "alice", &["pod", "alice"]);
    assert_eq!(followed.connections, [1, 2], "{alices:#?}");
    assert!(
        alices[first..]
            .iter()
            .all(|poll| poll.by() == Some("alice")),
        "every request after her first went to alice: {alices:#?}"
    );
    follow("the other client", &others, "-", &["pod", "pod"]);
    assert!(
        others
            .iter()
            .any(|poll| poll.at > ready + WATCH && poll.by() == Some("pod")),
        "{others:#?}"
    );
    assert_eq!(reset_done(&session).await, "ended=2 waiting=0 done");
    let finished = session.stop().await;
    assert_eq!(finished.code, Some(0), "{finished:?}");
}

/// A request the pod is still working on when the steal starts (its server
/// takes 5 s to answer) gets the pod's whole answer; the connection is ended
/// only after it, and the client's next request reconnects into the steal.
/// The slow request follows the previous answer at once, usually within the
/// same kernel tick, where the kernel's times cannot tell them apart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_in_progress_is_answered_by_the_pod_before_its_connection_ends() {
    const SLOW_MS: u64 = 5000;
    let pod = Pod::start().await;
    let local = HttpServer::local("local");
    let mut client = RawHttp::connect(pod.node(), pod.addr()).await;
    assert_eq!(client.get("/before").await.unwrap().by, "pod");
    let path = format!("/slow?ms={SLOW_MS}");
    let sent = Instant::now();
    client.send_get(&path).await.unwrap();
    client.delivered().await;

    let mut session = pod.steal(&local, &[RESET]).start().await;
    assert!(
        sent.elapsed() < Duration::from_millis(SLOW_MS),
        "the steal took longer to start than the slow request"
    );
    let answer = {
        let answer = timeout(EXCHANGE_LIMIT, client.answer());
        tokio::pin!(answer);
        loop {
            tokio::select! {
                biased;
                answer = &mut answer => break answer,
                () = sleep(Duration::from_millis(50)) => {
                    // Well before the pod answers, nothing may have been ended.
                    if sent.elapsed() < Duration::from_millis(SLOW_MS - 500) {
                        assert!(
                            !session.stdout().contains("ended=1"),
                            "ended while the pod worked on the request: {}",
                            session.stdout()
                        );
                    }
                }
            }
        }
    };
    let answer = answer
        .expect("the slow answer within the exchange limit")
        .unwrap_or_else(|e| {
            panic!(
                "the request in progress was cut after {:?} ({e}); the session said: {}",
                sent.elapsed(),
                session.stdout()
            )
        });
    assert!(sent.elapsed() >= Duration::from_millis(SLOW_MS));
    assert_eq!(
        (answer.by.as_str(), answer.path.as_str()),
        ("pod", path.as_str()),
        "{answer}"
    );
    assert!(
        session
            .ready_line()
            .contains(" reset: ended=0 waiting=1 -> "),
        "the first look found the connection busy: {}",
        session.ready_line()
    );

    // Answered, then idle: ended.
    assert_eq!(reset_done(&session).await, "ended=1 waiting=0 done");
    let next = client.get("/next").await;
    assert!(next.is_err(), "the connection was ended: {next:?}");
    let mut again = RawHttp::connect(pod.node(), pod.addr()).await;
    assert_eq!(again.get("/again").await.unwrap().by, "local");
    let finished = session.stop().await;
    assert_eq!(finished.code, Some(0), "{finished:?}");
}

/// Whether a call failed only because its connection ended, not by an
/// answer: a status the server sent has no source, one tonic made of its
/// transport's failure has it.
fn the_connection_ended_under(status: &tonic::Status) -> bool {
    use std::error::Error as _;
    status.code() == tonic::Code::Unavailable
        || status
            .source()
            .is_some_and(|source| source.is::<tonic::transport::Error>())
}

/// tonic's channel on its one HTTP/2 connection to the pod, in use (a call
/// every 50 ms, as an application's): once the connection is ended, the
/// channel reconnects and its next calls reach the local process. One call
/// may fail first, as gRPC apps retry: one sent as the idle connection ended
/// meets the reset (the README's Known limits). tonic reports it as
/// Unavailable, Cancelled ("connection closed") or Unknown (an h2 I/O
/// error), depending on how far the call got: which one is timing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grpc_channel_reconnects_into_the_steal() {
    let pod = Pod::start().await;
    let local = HttpServer::local("local");
    let mut grpc = EchoClient::connect(pod.node(), pod.addr())
        .await
        .expect("connect the channel");
    let before = grpc.unary(None, "before").await.expect("a call to the pod");
    assert!(before.starts_with("pod: before "), "{before}");
    let caller = {
        let mut grpc = grpc.clone();
        tokio::spawn(async move {
            let mut calls = Vec::new();
            for n in 0.. {
                let answer = grpc.unary(None, &format!("call {n}")).await;
                let stolen = matches!(&answer, Ok(text) if text.starts_with("local: "));
                calls.push((Instant::now(), answer));
                if stolen {
                    break;
                }
                sleep(Duration::from_millis(50)).await;
            }
            calls
        })
    };
    sleep(Duration::from_millis(200)).await;

    let mut session = pod.steal(&local, &[RESET]).start().await;
    let ready = Instant::now();
    let calls = timeout(SOON, caller)
        .await
        .expect("a call reaches the local process")
        .expect("the calling task");
    let (stolen_at, _) = calls.last().expect("calls");
    // Typically within a few calls; bounded loosely, as a loaded machine
    // stretches the calls that give the agent its evidence.
    assert!(
        stolen_at.duration_since(ready) <= Duration::from_secs(5),
        "first stolen call {:?} after ready: {calls:?}",
        stolen_at.duration_since(ready)
    );
    let failed: Vec<_> = calls
        .iter()
        .filter_map(|(_, answer)| answer.as_ref().err())
        .collect();
    assert!(
        failed.len() <= 1
            && failed
                .iter()
                .all(|status| the_connection_ended_under(status)),
        "{failed:?}"
    );
    assert_eq!(reset_done(&session).await, "ended=1 waiting=0 done");
    for n in 0..3 {
        let text = format!("more {n}");
        let answer = grpc
            .unary(None, &text)
            .await
            .expect("a call into the steal");
        assert!(answer.starts_with(&format!("local: {text} ")), "{answer}");
    }
    assert_eq!(
        grpc.connections(),
        2,
        "one reconnect: {:?}",
        grpc.local_addrs()
    );
    let finished = session.stop().await;
    assert_eq!(finished.code, Some(0), "{finished:?}");
}

/// Without the flag, the session warns how many connections still go to
/// the pod, and ends none: the clients keep their connections and the pod
/// answers them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_flag_the_session_warns_and_ends_nothing() {
    let pod = Pod::start().await;
    let local = HttpServer::local("local");
    let first = Poller::start("first client", pod.node(), pod.addr(), None);
    let second = Poller::start("second client", pod.node(), pod.addr(), Some("alice"));
    first.served_by("pod").await;
    second.served_by("pod").await;

    let mut session = pod.steal(&local, &[]).start().await;
    let ready = now();
    assert!(
        !session.ready_line().contains("reset"),
        "{}",
        session.ready_line()
    );
    until_printed(
        "the session's stderr",
        || session.stderr(),
        "warning: 2 connections to port 80 opened before this steal still go to the pod: \
         --reset-existing ends them while idle, and their clients reconnect into the steal",
    )
    .await;
    first.answered_after(ready, WATCH).await;
    second.answered_after(ready, WATCH).await;
    for (label, polls, dev) in [
        ("first client", first.stop().await, "-"),
        ("second client", second.stop().await, "alice"),
    ] {
        let followed = follow(label, &polls, dev, &["pod"]);
        assert_eq!(
            (followed.errors, followed.connections),
            (0, vec![1]),
            "{polls:#?}"
        );
    }
    assert_eq!(local.accepted(), 0, "nothing reached the local process");
    let finished = session.stop().await;
    assert_eq!(finished.code, Some(0), "{finished:?}");
    assert!(!finished.stdout.contains("reset"), "{}", finished.stdout);
    assert_eq!(
        finished.stderr.matches("warning:").count(),
        1,
        "{}",
        finished.stderr
    );
}

/// Only connections to the stolen port from outside the pod are ended: a
/// client of another port of the pod, the pod's own connection to a server
/// on port 80 elsewhere, and a sidecar's connection to the stolen port over
/// loopback keep their connections and their answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_ports_and_the_pods_own_connections_are_untouched() {
    let pod = Pod::with_servers(&[(PORT, "pod"), (8080, "pod-8080")]).await;
    let _node_server = HttpServer::in_netns(pod.node(), PORT, "node");
    let local = HttpServer::local("local");
    let stolen = Poller::start("client of port 80", pod.node(), pod.addr(), None);
    let other_port = Poller::start(
        "client of port 8080",
        pod.node(),
        pod.scenario.pod(0).v4(8080),
        None,
    );
    let outgoing = Poller::start("the pod's own client", pod.netns(), node_addr(PORT), None);
    let sidecar = Poller::start(
        "a sidecar",
        pod.netns(),
        SocketAddr::new(Ipv4Addr::LOCALHOST.into(), PORT),
        None,
    );
    stolen.served_by("pod").await;
    other_port.served_by("pod-8080").await;
    outgoing.served_by("node").await;
    sidecar.served_by("pod").await;

    let mut session = pod.steal(&local, &[RESET]).start().await;
    let ready = now();
    assert_eq!(reset_done(&session).await, "ended=1 waiting=0 done");
    stolen
        .wait_for("an answer by the local process", |polls| {
            polls.iter().any(|poll| poll.by() == Some("local"))
        })
        .await;
    other_port.answered_after(ready, WATCH).await;
    outgoing.answered_after(ready, WATCH).await;
    sidecar.answered_after(ready, WATCH).await;
    let stolen = stolen.stop().await;
    follow("client of port 80", &stolen, "-", &["pod", "local"]);
    for (label, polls, by) in [
        ("client of port 8080", other_port.stop().await, "pod-8080"),
        ("the pod's own client", outgoing.stop().await, "node"),
        ("a sidecar", sidecar.stop().await, "pod"),
    ] {
        let followed = follow(label, &polls, "-", &[by]);
        assert_eq!(
            (followed.errors, followed.connections),
            (0, vec![1]),
            "{label}: {polls:#?}"
        );
    }
    let finished = session.stop().await;
    assert_eq!(finished.code, Some(0), "{finished:?}");
}

/// With alice's filtered session on, a client's connection is the agent's
/// (its other requests passed through to the pod): bob's session with
/// --reset-existing ends nothing, neither the agent's end of it nor the
/// pod's end of the pass-through, and the client keeps its one connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_the_agent_holds_are_never_ended() {
    let pod = Pod::start().await;
    let alice = HttpServer::local("alice");
    let bob = HttpServer::local("bob");
    let mut alices = pod.steal(&alice, ALICE).start().await;
    let through = Poller::start("client through the agent", pod.node(), pod.addr(), None);
    through.served_by("pod").await;
    let first = through.polls()[0].answer.clone().unwrap();
    assert_ne!(
        first.local,
        pod.addr(),
        "the client's requests pass through the agent: {first}"
    );
    let mut held = Http1::connect(pod.node(), pod.addr()).await.unwrap();
    assert_eq!(
        exchange(&mut held, "/held/1", Some("alice")).await.by,
        "alice"
    );
    assert_eq!(exchange(&mut held, "/held/2", None).await.by, "pod");

    let mut bobs = pod.steal(&bob, &[BOB, &[RESET]].concat()).start().await;
    let ready = now();
    assert!(
        bobs.ready_line()
            .contains(" reset: ended=0 waiting=0 done -> "),
        "{}",
        bobs.ready_line()
    );
    for (dev, by) in [
        (Some("bob"), "bob"),
        (Some("alice"), "alice"),
        (None, "pod"),
    ] {
        assert_eq!(exchange(&mut held, "/held/after", dev).await.by, by);
    }
    through.answered_after(ready, WATCH).await;
    let polls = through.stop().await;
    let followed = follow("client through the agent", &polls, "-", &["pod"]);
    assert_eq!(
        (followed.errors, followed.connections),
        (0, vec![1]),
        "{polls:#?}"
    );
    assert_eq!(pod.agent().metric(ENDED).await, 0.0);
    for session in [&mut bobs, &mut alices] {
        let finished = session.stop().await;
        assert_eq!(finished.code, Some(0), "{finished:?}");
    }
}

/// A mirror never ends connections: the flags are usage errors there, as is
/// a deadline without the reset.
#[tokio::test]
async fn the_flags_are_for_steals_that_reset() {
    // Refused before any agent is asked: none listens here.
    let agent = "http://127.0.0.1:9";
    for (flags, says) in [
        (
            &["--reset-existing"][..],
            "--reset-existing is for `remocal steal` only: it ends the pod's connections, and a mirror is read-only; drop --reset-existing",
        ),
        (
            &["--reset-deadline", "5"][..],
            "--reset-deadline is for `remocal steal` only: it ends the pod's connections, and a mirror is read-only; drop --reset-deadline",
        ),
        (
            &["--reset-existing", "--reset-deadline", "5"][..],
            "is for `remocal steal` only",
        ),
    ] {
        let mirror = flags.iter().fold(
            Steal::mirror(agent)
                .arg("--netns")
                .arg("/var/run/netns/none")
                .port(PORT)
                .local_port(8080),
            |mirror, flag| mirror.arg(flag),
        );
        let finished = mirror.run_to_exit().await;
        assert_eq!(finished.code, Some(2), "{flags:?}: {finished:?}");
        assert!(finished.stderr.contains(says), "{flags:?}: {finished:?}");
        assert!(finished.stdout.is_empty(), "{finished:?}");
    }
    let finished = Steal::new(agent)
        .arg("--netns")
        .arg("/var/run/netns/none")
        .port(PORT)
        .local_port(8080)
        .arg("--reset-deadline")
        .arg("5")
        .run_to_exit()
        .await;
    assert_eq!(finished.code, Some(2), "{finished:?}");
    assert!(
        finished
            .stderr
            .contains("--reset-deadline only applies to --reset-existing"),
        "{finished:?}"
    );
    assert!(!finished.stderr.contains("panicked"), "{finished:?}");
}

/// `--output json`: the ready event carries the reset's progress, later
/// `reset` events its outcome; the agent's metric counts what it ended. A
/// filtered steal, as in `a_filtered_reset_sends_alices_client_to_her_…`,
/// one of the clients over IPv6.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_counts_the_connections_it_ended() {
    let pod = Pod::start().await;
    let alice = HttpServer::local("alice");
    let clients = [
        (
            Poller::start("alice's client", pod.node(), pod.addr(), Some("alice")),
            "alice",
            ["pod", "alice"],
        ),
        (
            Poller::start(
                "the other client, over IPv6",
                pod.node(),
                pod.scenario.pod(0).v6(PORT),
                None,
            ),
            "-",
            ["pod", "pod"],
        ),
    ];
    for (client, _, _) in &clients {
        client.served_by("pod").await;
    }
    assert_eq!(pod.agent().metric(ENDED).await, 0.0);

    let mut session = JsonSession::start(&pod, &alice, &[ALICE, &[RESET]].concat()).await;
    let ready = session.lines().remove(0);
    assert_eq!(ready["event"], "ready", "{ready}");
    let reset = &ready["reset"];
    assert!(
        reset["ended"].is_u64() && reset["waiting"].is_u64() && reset["done"].is_boolean(),
        "{ready}"
    );
    let done = session.reset_done().await;
    let ended = done["ended"].as_u64().unwrap();
    assert_eq!(
        (ended, &done["waiting"]),
        (2, &serde_json::json!(0)),
        "{:#?}",
        session.lines()
    );
    until_metric(pod.agent(), ENDED, ended as f64).await;
    assert_eq!(pod.agent().metric(LEFT_ALONE).await, 0.0);
    // Both reconnected: alice's client into her session.
    let (alices, _, _) = &clients[0];
    alices
        .wait_for("an answer by alice", |polls| {
            polls.iter().any(|poll| poll.by() == Some("alice"))
        })
        .await;
    for (client, dev, by) in clients {
        let label = client.label;
        client
            .wait_for("a reconnect", |polls| {
                polls
                    .iter()
                    .any(|poll| poll.connection == 2 && poll.answer.is_some())
            })
            .await;
        let polls = client.stop().await;
        follow(label, &polls, dev, &by);
    }
    session.stop().await;
}

/// A connection busy past `--reset-deadline` is left to the pod: the session
/// says so, its request completes from the pod, it stays the pod's after,
/// and the agent counts it as left alone. The client keeps it busy by
/// sending its request's body slowly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_busy_past_the_deadline_is_left_to_the_pod() {
    let pod = Pod::start().await;
    let local = HttpServer::local("local");
    let mut client = RawHttp::connect(pod.node(), pod.addr()).await;
    assert_eq!(client.get("/before").await.unwrap().by, "pod");
    // The request and half its body; the rest when the deadline passed.
    client
        .send(b"POST /upload HTTP/1.1\r\nHost: web.shop\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
        .await
        .unwrap();
    client.delivered().await;

    // The agent's deadline starts after this: whenever the ready line is
    // read, `done` cannot come sooner than 1 s from here.
    let started = Instant::now();
    let mut session = pod
        .steal(&local, &[RESET, "--reset-deadline", "1"])
        .start()
        .await;
    assert!(
        session
            .ready_line()
            .contains(" reset: ended=0 waiting=1 -> "),
        "{}",
        session.ready_line()
    );
    assert_eq!(reset_done(&session).await, "ended=0 waiting=1 done");
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "the deadline is 1 s from the start: {:?}",
        started.elapsed()
    );
    until_printed(
        "the session's stderr",
        || session.stderr(),
        "warning: 1 connection of the pod stayed busy until the reset deadline and was left to the pod",
    )
    .await;
    until_metric(pod.agent(), LEFT_ALONE, 1.0).await;
    assert_eq!(pod.agent().metric(ENDED).await, 0.0);

    client.send(b"6\r\n world\r\n0\r\n\r\n").await.unwrap();
    let answer = timeout(EXCHANGE_LIMIT, client.answer())
        .await
        .expect("the upload's answer")
        .expect("the upload completes");
    assert_eq!(
        (answer.by.as_str(), answer.method.as_str(), answer.received),
        ("pod", "POST", 11),
        "{answer}"
    );
    // Idle now, for longer than a reset waits for, and still the pod's.
    sleep(Duration::from_millis(200)).await;
    assert_eq!(client.get("/after").await.unwrap().by, "pod");
    assert_eq!(pod.agent().metric(ENDED).await, 0.0);
    let finished = session.stop().await;
    assert_eq!(finished.code, Some(0), "{finished:?}");
}
