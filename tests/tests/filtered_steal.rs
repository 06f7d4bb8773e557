//! Shared ports: filtered steals (`--header`, `--path`, `--method`). Several
//! developers steal the HTTP requests meant for them from one port of a pod,
//! while the pod serves every other request as if remocal were not there.
//!
//! Everything is real: the agent with its eBPF, the `remocal` CLI, and the
//! clients users run (curl over HTTP/1.1 and h2c, Python's http.client,
//! tonic's gRPC client, a WebSocket client). The pod's server and the
//! developers' local processes are one HTTP server (hyper) whose every answer
//! names who served it and the TCP peer it saw (`tests/src/http_servers.rs`),
//! so each test reads from the bytes a client got which side answered, and
//! whether the pod saw the client's real address.

use std::net::{IpAddr, SocketAddr};
use std::process::Output;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use futures::{SinkExt as _, StreamExt as _};
use hyper::Method;
use remocal_tests::bpf;
use remocal_tests::data::{MIB, Pattern};
use remocal_tests::grpc_echo::EchoClient;
use remocal_tests::http_clients::{
    EXCHANGE_LIMIT, Http1, Http2, Reply, check_pattern, empty, pattern_body, request,
};
use remocal_tests::http_servers::{Answer, HttpServer, canonical};
use remocal_tests::netns::Netns;
use remocal_tests::processes::{Agent, Client, PodProcess, Steal, Target, binary};
use remocal_tests::retry::until_ok;
use remocal_tests::scenario::Scenario;
use remocal_tests::servers::{self, TcpServer};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::time::{Instant, timeout};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;

const PORT: u16 = 80;
const ALICE: &[&str] = &["--header", "x-dev: alice"];
const BOB: &[&str] = &["--header", "x-dev: bob"];

/// A node with one pod whose own server (named `pod`) answers on `ports`, and an agent.
struct Shared {
    // Field order is drop order: sessions are the tests' own locals (dropped
    // first), then the pod's servers, then the agent and the namespaces.
    _pod_servers: Vec<HttpServer>,
    scenario: Scenario,
}

impl Shared {
    async fn start() -> Shared {
        Shared::with_ports(&[PORT]).await
    }

    async fn with_ports(ports: &[u16]) -> Shared {
        let scenario = Scenario::start(1, &[]).await;
        let pod_servers = ports
            .iter()
            .map(|&port| HttpServer::in_netns(&scenario.pod(0).netns, port, "pod"))
            .collect();
        Shared {
            _pod_servers: pod_servers,
            scenario,
        }
    }

    fn node(&self) -> &Netns {
        self.scenario.node()
    }

    fn addr(&self) -> SocketAddr {
        self.scenario.pod(0).v4(PORT)
    }

    /// `remocal steal --netns <pod> --port PORT --local-port <local> FILTER...`.
    fn steal_on(&self, port: u16, local: &HttpServer, filter: &[&str]) -> Steal {
        filter
            .iter()
            .fold(self.scenario.steal(0, port, &local.server), |steal, arg| {
                steal.arg(arg)
            })
    }

    fn steal(&self, local: &HttpServer, filter: &[&str]) -> Steal {
        self.steal_on(PORT, local, filter)
    }

    /// A filtered steal on PORT that printed `ready`.
    async fn filtered(&self, local: &HttpServer, filter: &[&str]) -> Client {
        self.steal(local, filter).start().await
    }

    /// alice's and bob's local processes, each with a filtered steal of
    /// PORT (`x-dev: alice`, `x-dev: bob`), alice's started first.
    async fn alice_and_bob(&self) -> (HttpServer, HttpServer, [Client; 2]) {
        let alice = HttpServer::local("alice");
        let bob = HttpServer::local("bob");
        let sessions = [
            self.filtered(&alice, ALICE).await,
            self.filtered(&bob, BOB).await,
        ];
        (alice, bob, sessions)
    }

    /// Asserts that a new connection reaches the pod's server directly: the
    /// answer is the pod's, and the pod's own end of it is the pod's address
    /// (the agent's pass-through would show loopback there).
    async fn assert_pod_serves_directly(&self) {
        for addr in self.scenario.pod(0).addrs(PORT) {
            let mut client = Http1::connect(self.node(), addr)
                .await
                .unwrap_or_else(|e| panic!("connect to {addr}: {e}"));
            let answer = exchange(&mut client, "/direct", Some("alice")).await;
            assert_eq!(answer.by, "pod", "{addr}: {answer}");
            assert_eq!(
                answer.local, addr,
                "the pod accepted {addr} itself: {answer}"
            );
            assert_eq!(answer.peer, canonical(client.local), "{answer}");
        }
    }
}

/// One GET on `client`, bounded in time; the answer of a test server.
async fn exchange(client: &mut Http1, path: &str, dev: Option<&str>) -> Answer {
    let reply = timeout(EXCHANGE_LIMIT, client.get(path, dev))
        .await
        .unwrap_or_else(|_| {
            panic!("GET {path} (x-dev {dev:?}) got no answer within {EXCHANGE_LIMIT:?}")
        })
        .unwrap_or_else(|e| panic!("GET {path} (x-dev {dev:?}) failed: {e}"));
    assert_eq!(reply.status, 200, "GET {path}: {reply:?}");
    Answer::expect(&reply.text())
}

/// Runs `program ARGS` in `netns`, bounded, and returns what it printed.
async fn run_in(netns: &Netns, program: &str, args: &[String]) -> Output {
    let run = netns
        .tokio_command(program)
        .args(args)
        .kill_on_drop(true)
        .output();
    timeout(Duration::from_secs(120), run)
        .await
        .unwrap_or_else(|_| panic!("{program} {args:?} still ran after 120 s"))
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"))
}

fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|arg| arg.to_string()).collect()
}

/// What curl's `--write-out` of [`WRITE_OUT`] says about one transfer.
#[derive(Debug)]
struct Transfer {
    answer: Answer,
    local_port: u16,
    /// New connections curl made for this transfer (0: it reused one).
    connects: u32,
}

const WRITE_OUT: &str = "\n@@ %{local_port} %{num_connects}\n";

/// Pairs each answer line of curl's output with the `--write-out` line after it.
fn transfers(output: &Output) -> Vec<Transfer> {
    let stdout = String::from_utf8_lossy(&output.stdout);
    let mut found = Vec::new();
    let mut answer = None;
    for line in stdout.lines() {
        if let Some(parsed) = Answer::parse(line) {
            answer = Some(parsed);
        } else if let Some(rest) = line.strip_prefix("@@ ") {
            let mut fields = rest.split(' ');
            let local_port = fields
                .next()
                .and_then(|f| f.parse().ok())
                .expect("local port");
            let connects = fields
                .next()
                .and_then(|f| f.parse().ok())
                .expect("connects");
            found.push(Transfer {
                answer: answer
                    .take()
                    .unwrap_or_else(|| panic!("no answer before {line:?} in {stdout}")),
                local_port,
                connects,
            });
        }
    }
    found
}

/// curl arguments for one transfer per `(path, x-dev)`, joined with `--next`
/// so that one curl run sends them one after the other, on one connection if
/// it can (as curl does for several URLs of one host).
fn curl_transfers(
    base: &[&str],
    addr: SocketAddr,
    requests: &[(&str, Option<&str>)],
) -> Vec<String> {
    let mut args = Vec::new();
    for (index, (path, dev)) in requests.iter().enumerate() {
        if index > 0 {
            args.push("--next".to_string());
        }
        args.extend(strings(base));
        args.extend(strings(&["--silent", "--show-error", "--max-time", "20"]));
        args.extend(["--write-out".to_string(), WRITE_OUT.to_string()]);
        if let Some(dev) = dev {
            args.extend(["--header".to_string(), format!("X-Dev: {dev}")]);
        }
        args.push(format!("http://{addr}{path}"));
    }
    args
}

fn node_ip(shared: &Shared) -> IpAddr {
    // The node's end of the pod's veth: 198.18.0.1 (the harness's topology).
    let IpAddr::V4(pod) = shared.addr().ip() else {
        unreachable!()
    };
    let [a, b, c, _] = pod.octets();
    IpAddr::from([a, b, c, 1])
}

// ---------------------------------------------------------------------------
// 1. One keep-alive connection, routed request by request.
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_on_one_keep_alive_connection_is_answered_by_alice_bob_and_the_pod_in_turn() {
    let shared = Shared::start().await;
    let alice = HttpServer::local("alice");
    let bob = HttpServer::local("bob");
    let alice_session = shared.filtered(&alice, ALICE).await;
    let _bob_session = shared.filtered(&bob, BOB).await;
    assert!(
        alice_session.ready_line().contains(&format!(
            "port={PORT} requests matching --header 'x-dev: alice' -> 127.0.0.1:{}",
            alice.port()
        )),
        "the ready line shows the filter: {}",
        alice_session.ready_line()
    );

    let requests = [
        ("/one", Some("alice")),
        ("/two", Some("bob")),
        ("/three", None),
        ("/four", Some("alice")),
        ("/five", None),
    ];
    let output = run_in(
        shared.node(),
        "curl",
        &curl_transfers(&["--verbose"], shared.addr(), &requests),
    )
    .await;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "curl failed: {stderr}");
    let transfers = transfers(&output);
    let served: Vec<(&str, &str)> = transfers
        .iter()
        .map(|t| (t.answer.by.as_str(), t.answer.path.as_str()))
        .collect();
    assert_eq!(
        served,
        [
            ("alice", "/one"),
            ("bob", "/two"),
            ("pod", "/three"),
            ("alice", "/four"),
            ("pod", "/five")
        ],
        "{transfers:#?}"
    );
    // One connection for all five: curl opened one and reused it.
    let connects: Vec<u32> = transfers.iter().map(|t| t.connects).collect();
    assert_eq!(connects, [1, 0, 0, 0, 0], "{stderr}");
    let port = transfers[0].local_port;
    assert!(
        transfers.iter().all(|t| t.local_port == port),
        "{transfers:#?}"
    );
    assert_eq!(
        stderr.matches("Re-using existing connection").count(),
        4,
        "curl says it reused its connection: {stderr}"
    );
    for transfer in &transfers {
        assert_eq!(transfer.answer.version, "HTTP/1.1", "{}", transfer.answer);
        assert_eq!(
            transfer.answer.dev,
            transfer_dev(&requests, &transfer.answer.path),
            "the request arrived with its headers: {}",
            transfer.answer
        );
        if transfer.answer.by == "pod" {
            assert_eq!(
                transfer.answer.peer,
                SocketAddr::new(node_ip(&shared), port),
                "the pod sees curl's own address and port: {}",
                transfer.answer
            );
        }
    }
}

fn transfer_dev(requests: &[(&str, Option<&str>)], path: &str) -> String {
    let (_, dev) = requests
        .iter()
        .find(|(p, _)| *p == path)
        .unwrap_or_else(|| panic!("no request for {path}"));
    dev.unwrap_or("-").to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_http_client_on_one_connection_over_ipv6_is_routed_request_by_request() {
    let shared = Shared::start().await;
    let (_alice, _bob, _sessions) = shared.alice_and_bob().await;

    let pod = shared.scenario.pod(0);
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/keepalive_client.py");
    let devs = ["alice", "bob", "-", "bob", "alice", "-"];
    let mut args = strings(&[script, &pod.ipv6.to_string(), &PORT.to_string()]);
    args.extend(strings(&devs));
    let output = run_in(shared.node(), "python3", &args).await;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "python failed: {stderr}");
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(|line| serde_json::from_str(line).expect("a JSON line"))
        .collect();
    assert_eq!(lines.len(), devs.len(), "{lines:?} {stderr}");
    let first_local = lines[0]["local"].clone();
    for (index, (line, dev)) in lines.iter().zip(devs).enumerate() {
        assert_eq!(line["status"], 200, "{line}");
        assert_eq!(
            line["same_socket"], true,
            "one connection throughout: {line}"
        );
        assert_eq!(line["local"], first_local, "{line}");
        let answer = Answer::expect(line["body"].as_str().expect("a body"));
        let expected = if dev == "-" { "pod" } else { dev };
        assert_eq!(
            answer.by, expected,
            "request {index} with x-dev {dev}: {answer}"
        );
        assert_eq!(answer.path, format!("/python/{index}"), "{answer}");
        if expected == "pod" {
            let ip: IpAddr = first_local[0].as_str().unwrap().parse().unwrap();
            let port = first_local[1].as_u64().unwrap() as u16;
            assert_eq!(
                answer.peer,
                SocketAddr::new(ip, port),
                "the pod sees Python's own address and port: {answer}"
            );
        }
    }
}

/// Requests written back to back before any answer (pipelining), one with a
/// chunked body: each is answered in order by its side.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_requests_are_answered_in_order_each_by_its_side() {
    let shared = Shared::start().await;
    let (_alice, _bob, _sessions) = shared.alice_and_bob().await;

    let mut stream = shared.node().connect(shared.addr()).await.expect("connect");
    let local = stream.local_addr().unwrap();
    let requests = concat!(
        "GET /p/1 HTTP/1.1\r\nHost: web\r\nx-dev: alice\r\n\r\n",
        "POST /p/2 HTTP/1.1\r\nHost: web\r\nContent-Length: 11\r\n\r\nhello world",
        "POST /p/3 HTTP/1.1\r\nHost: web\r\nX-DEV: bob\r\nTransfer-Encoding: chunked\r\n\r\n",
        "5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n",
        "GET /p/4 HTTP/1.1\r\nHost: web\r\n\r\n",
        "POST /p/5 HTTP/1.1\r\nHost: web\r\nx-dev: alice\r\nContent-Length: 3\r\n\r\nabc",
        "GET /p/6 HTTP/1.1\r\nHost: web\r\nx-dev: bob\r\n\r\n",
    );
    stream.write_all(requests.as_bytes()).await.unwrap();
    let mut reader = BufReader::new(stream);
    let expected = [
        ("alice", "/p/1", 0),
        ("pod", "/p/2", 11),
        ("bob", "/p/3", 11),
        ("pod", "/p/4", 0),
        ("alice", "/p/5", 3),
        ("bob", "/p/6", 0),
    ];
    for (by, path, received) in expected {
        let (head, body) = timeout(EXCHANGE_LIMIT, read_response(&mut reader))
            .await
            .unwrap_or_else(|_| panic!("no answer for {path}"))
            .unwrap_or_else(|e| panic!("answer for {path}: {e}"));
        assert!(head.starts_with("HTTP/1.1 200"), "{path}: {head}");
        let answer = Answer::expect(&String::from_utf8_lossy(&body));
        assert_eq!(
            (answer.by.as_str(), answer.path.as_str(), answer.received),
            (by, path, received),
            "{answer}"
        );
        if by == "pod" {
            assert_eq!(answer.peer, local, "{answer}");
        }
    }
}

/// Reads one HTTP/1.1 response with a Content-Length body: (head, body).
async fn read_response(reader: &mut BufReader<TcpStream>) -> std::io::Result<(String, Vec<u8>)> {
    let mut head = String::new();
    let mut length = 0;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).await? == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                format!("connection closed after {head:?}"),
            ));
        }
        if let Some(value) = line.to_ascii_lowercase().strip_prefix("content-length:") {
            length = value.trim().parse().unwrap_or(0);
        }
        let end = line == "\r\n";
        head.push_str(&line);
        if end {
            break;
        }
    }
    let mut body = vec![0; length];
    reader.read_exact(&mut body).await?;
    Ok((head, body))
}

// ---------------------------------------------------------------------------
// 2. Many clients at once; large bodies.
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_concurrent_clients_each_get_every_answer_from_the_right_side() {
    let shared = Shared::start().await;
    let (_alice, _bob, _sessions) = shared.alice_and_bob().await;

    const CLIENTS: usize = 200;
    let pod = shared.scenario.pod(0);
    let mut sockets = shared.node().tcp_sockets(CLIENTS / 2, false);
    sockets.extend(shared.node().tcp_sockets(CLIENTS / 2, true));
    let mut clients = tokio::task::JoinSet::new();
    for (index, socket) in sockets.into_iter().enumerate() {
        let addr = if index < CLIENTS / 2 {
            pod.v4(PORT)
        } else {
            pod.v6(PORT)
        };
        clients.spawn(async move {
            let attempt = async {
                let mut client = Http1::connect_socket(socket, addr)
                    .await
                    .map_err(|e| format!("connect: {e}"))?;
                let mut order = [Some("alice"), Some("bob"), None];
                order.rotate_left(index % 3);
                if index % 2 == 1 {
                    order.reverse();
                }
                for (round, dev) in order.into_iter().chain(order).enumerate() {
                    let path = format!("/client/{index}/{round}");
                    let reply = client
                        .get(&path, dev)
                        .await
                        .map_err(|e| format!("{path}: {e}"))?;
                    let answer = Answer::parse(&reply.text())
                        .ok_or_else(|| format!("{path}: not an answer: {reply:?}"))?;
                    let expected = dev.unwrap_or("pod");
                    if answer.by != expected || answer.path != path {
                        return Err(format!("{path} with x-dev {dev:?} was answered {answer}"));
                    }
                    if expected == "pod" && answer.peer != canonical(client.local) {
                        return Err(format!(
                            "the pod saw {} for client {}: {answer}",
                            answer.peer, client.local
                        ));
                    }
                }
                Ok::<_, String>(())
            };
            timeout(Duration::from_secs(60), attempt)
                .await
                .unwrap_or_else(|_| Err(format!("client {index} hung")))
        });
    }
    let mut failures = Vec::new();
    let mut done = 0;
    while let Some(result) = clients.join_next().await {
        match result.expect("client task") {
            Ok(()) => done += 1,
            Err(failure) => failures.push(failure),
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {CLIENTS} clients got a wrong or no answer, e.g.: {:#?}",
        failures.len(),
        &failures[..failures.len().min(10)]
    );
    assert_eq!(done, CLIENTS);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_mib_uploads_and_downloads_are_byte_exact_matched_and_unmatched() {
    const SIZE: usize = 50 * MIB;
    let shared = Shared::start().await;
    let alice = HttpServer::local("alice");
    let _alice_session = shared.filtered(&alice, ALICE).await;

    // curl uploads a file (Content-Length; curl asks `Expect: 100-continue`).
    let file = tempfile::NamedTempFile::new().expect("a temporary file");
    std::fs::write(file.path(), Pattern::new(50).take(SIZE)).expect("write the upload");
    let upload = format!("@{}", file.path().display());
    for dev in [Some("alice"), None] {
        let mut args = strings(&["--silent", "--show-error", "--verbose", "--max-time", "120"]);
        args.extend(strings(&[
            "--data-binary",
            &upload,
            "--header",
            "x-seed: 50",
        ]));
        if let Some(dev) = dev {
            args.extend(["--header".to_string(), format!("x-dev: {dev}")]);
        }
        args.push(format!("http://{}/upload", shared.addr()));
        let output = run_in(shared.node(), "curl", &args).await;
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            output.status.success(),
            "curl upload (x-dev {dev:?}): {stderr}"
        );
        let answer = Answer::expect(&String::from_utf8_lossy(&output.stdout));
        assert_eq!(answer.by, dev.unwrap_or("pod"), "{answer}");
        assert_eq!(answer.received, SIZE as u64, "{answer}");
        assert_eq!(
            answer.exact,
            Some(true),
            "the body arrived byte for byte: {answer}"
        );
        assert!(
            stderr.contains("Expect: 100-continue") && stderr.contains("HTTP/1.1 100 Continue"),
            "curl asked to continue and was told to (x-dev {dev:?}): {stderr}"
        );
    }

    // A chunked upload and a download, one after the other on one connection each side.
    for dev in [Some("alice"), None] {
        let mut client = Http1::connect(shared.node(), shared.addr())
            .await
            .expect("connect");
        let upload = request(Method::PUT, "/chunked", dev, pattern_body(51, SIZE as u64));
        let mut upload = upload;
        upload.headers_mut().insert("x-seed", "51".parse().unwrap());
        let reply = timeout(Duration::from_secs(120), client.send(upload))
            .await
            .expect("the chunked upload finished")
            .expect("the chunked upload");
        let answer = Answer::expect(&reply.text());
        assert_eq!(
            (answer.by.as_str(), answer.received, answer.exact),
            (dev.unwrap_or("pod"), SIZE as u64, Some(true)),
            "{answer}"
        );

        let download = request(
            Method::GET,
            &format!("/download?bytes={SIZE}&seed=52"),
            dev,
            empty(),
        );
        let response = client
            .send_streamed(download)
            .await
            .expect("the download starts");
        assert_eq!(response.status(), 200);
        assert_eq!(
            response
                .headers()
                .get("x-served-by")
                .and_then(|v| v.to_str().ok()),
            Some(dev.unwrap_or("pod"))
        );
        let (received, exact) = timeout(Duration::from_secs(120), check_pattern(response, 52))
            .await
            .expect("the download finished")
            .expect("the download");
        assert_eq!(
            (received, exact),
            (SIZE as u64, true),
            "download with x-dev {dev:?}"
        );
    }
}

// ---------------------------------------------------------------------------
// 3. HTTP/2 with prior knowledge, gRPC.
// ---------------------------------------------------------------------------

/// curl with `--http2-prior-knowledge`, one request per run: Debian 12's curl
/// (7.88.1) cannot reuse an h2c connection for a second transfer ("Error in
/// the HTTP2 framing layer", against a plain hyper server too), so streams
/// sharing one connection are hyper's client's below.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_prior_knowledge_is_routed_stream_by_stream() {
    let shared = Shared::start().await;
    let (_alice, _bob, _sessions) = shared.alice_and_bob().await;

    for addr in shared.scenario.pod(0).addrs(PORT) {
        for (path, dev) in [
            ("/curl/1", Some("alice")),
            ("/curl/2", None),
            ("/curl/3", Some("bob")),
        ] {
            let output = run_in(
                shared.node(),
                "curl",
                &curl_transfers(&["--http2-prior-knowledge"], addr, &[(path, dev)]),
            )
            .await;
            let stderr = String::from_utf8_lossy(&output.stderr);
            assert!(output.status.success(), "curl {addr}{path}: {stderr}");
            let transfer = transfers(&output).pop().expect("one transfer");
            let answer = &transfer.answer;
            assert_eq!(
                (
                    answer.by.as_str(),
                    answer.path.as_str(),
                    answer.version.as_str()
                ),
                (dev.unwrap_or("pod"), path, "HTTP/2.0"),
                "{answer}"
            );
            if answer.by == "pod" {
                assert_eq!(
                    answer.peer.port(),
                    transfer.local_port,
                    "the pod sees curl's own port: {answer}"
                );
                assert_eq!(answer.peer.is_ipv6(), addr.is_ipv6(), "{answer}");
            }
        }
    }

    // Streams of one connection, one after the other, then all at once.
    let mut client = Http2::connect(shared.node(), shared.addr())
        .await
        .expect("an h2c connection");
    for (index, dev) in [Some("alice"), None, Some("bob"), Some("alice"), None]
        .into_iter()
        .enumerate()
    {
        let path = format!("/seq/{index}");
        let reply = timeout(EXCHANGE_LIMIT, client.get(&path, dev))
            .await
            .expect("answered")
            .expect("a stream");
        let answer = Answer::expect(&reply.text());
        assert_eq!(
            (answer.by.as_str(), answer.path.as_str()),
            (dev.unwrap_or("pod"), path.as_str()),
            "{answer}"
        );
        assert_eq!(answer.version, "HTTP/2.0");
        if answer.by == "pod" {
            assert_eq!(
                answer.peer,
                canonical(client.local),
                "the pod sees the client's address: {answer}"
            );
        }
    }
    let mut streams = tokio::task::JoinSet::new();
    for index in 0..30 {
        let mut client = client.clone();
        streams.spawn(async move {
            let dev = [Some("alice"), None, Some("bob")][index % 3];
            let path = format!("/at-once/{index}");
            let reply = timeout(EXCHANGE_LIMIT, client.get(&path, dev)).await;
            (dev, path, reply)
        });
    }
    while let Some(result) = streams.join_next().await {
        let (dev, path, reply) = result.expect("stream task");
        let reply = reply
            .unwrap_or_else(|_| panic!("{path}: no answer"))
            .unwrap_or_else(|e| panic!("{path}: {e}"));
        let answer = Answer::expect(&reply.text());
        assert_eq!(
            (answer.by.as_str(), answer.path.as_str()),
            (dev.unwrap_or("pod"), path.as_str()),
            "{answer}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_calls_on_one_channel_are_routed_call_by_call_by_their_metadata() {
    let shared = Shared::start().await;
    let (_alice, _bob, _sessions) = shared.alice_and_bob().await;

    let mut client = EchoClient::connect(shared.node(), shared.addr())
        .await
        .expect("a gRPC channel to the pod");
    let peer = canonical(client.local_addrs()[0]);

    for (dev, by) in [
        (Some("alice"), "alice"),
        (None, "pod"),
        (Some("bob"), "bob"),
        (Some("alice"), "alice"),
    ] {
        let reply = timeout(EXCHANGE_LIMIT, client.unary(dev, "hi"))
            .await
            .expect("the call returned")
            .unwrap_or_else(|status| panic!("unary call with x-dev {dev:?}: {status:?}"));
        let expected_peer = if by == "pod" {
            format!(" peer={peer}")
        } else {
            String::new()
        };
        assert!(
            reply.starts_with(&format!("{by}: hi dev={}", dev.unwrap_or("-")))
                && reply.ends_with(&expected_peer),
            "unary call with x-dev {dev:?} answered {reply:?}"
        );
    }

    // Streaming calls: every message of a call is answered by the call's side.
    for (dev, by) in [
        (Some("bob"), "bob"),
        (None, "pod"),
        (Some("alice"), "alice"),
    ] {
        let replies = timeout(EXCHANGE_LIMIT, client.chat(dev, &["one", "two", "three"]))
            .await
            .expect("the streaming call returned")
            .unwrap_or_else(|status| panic!("streaming call with x-dev {dev:?}: {status:?}"));
        assert_eq!(replies.len(), 3, "{replies:?}");
        for (reply, text) in replies.iter().zip(["one", "two", "three"]) {
            assert!(
                reply.starts_with(&format!("{by}: {text} dev={}", dev.unwrap_or("-"))),
                "streaming call with x-dev {dev:?}: {replies:?}"
            );
        }
    }

    // Calls at once, interleaved on the one connection.
    let mut calls = tokio::task::JoinSet::new();
    for index in 0..30 {
        let mut client = client.clone();
        calls.spawn(async move {
            let dev = [Some("alice"), None, Some("bob")][index % 3];
            let text = format!("call{index}");
            let reply = client.unary(dev, &text).await;
            (dev, text, reply)
        });
    }
    while let Some(result) = calls.join_next().await {
        let (dev, text, reply) = result.expect("call task");
        let reply = reply.unwrap_or_else(|status| panic!("{text} with x-dev {dev:?}: {status:?}"));
        assert!(
            reply.starts_with(&format!("{}: {text} ", dev.unwrap_or("pod"))),
            "{text} with x-dev {dev:?} answered {reply:?}"
        );
    }
    assert_eq!(
        client.connections(),
        1,
        "every call went over one connection"
    );
}

// ---------------------------------------------------------------------------
// 4. Upgrades, and protocols that are not HTTP.
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_goes_whole_to_the_side_its_upgrade_request_matched() {
    let shared = Shared::start().await;
    let alice = HttpServer::local("alice");
    let _alice_session = shared.filtered(&alice, ALICE).await;

    for addr in shared.scenario.pod(0).addrs(PORT) {
        for (dev, by) in [(Some("alice"), "alice"), (None, "pod")] {
            let stream = shared.node().connect(addr).await.expect("connect");
            let local = canonical(stream.local_addr().unwrap());
            let mut request = format!("ws://{addr}/ws").into_client_request().unwrap();
            if let Some(dev) = dev {
                request.headers_mut().insert("x-dev", dev.parse().unwrap());
            }
            let (mut socket, response) = timeout(
                EXCHANGE_LIMIT,
                tokio_tungstenite::client_async(request, stream),
            )
            .await
            .expect("the handshake finished")
            .unwrap_or_else(|e| panic!("WebSocket handshake to {addr} (x-dev {dev:?}): {e}"));
            assert_eq!(
                response
                    .headers()
                    .get("x-served-by")
                    .and_then(|v| v.to_str().ok()),
                Some(by),
                "{addr}: {response:?}"
            );
            let big = Bytes::from(Pattern::new(7).take(MIB));
            for round in 0..3 {
                socket
                    .send(Message::text(format!("hello {round}")))
                    .await
                    .expect("send text");
                let reply = timeout(EXCHANGE_LIMIT, socket.next())
                    .await
                    .expect("an answer");
                let Some(Ok(Message::Text(text))) = reply else {
                    panic!("{addr} x-dev {dev:?}: {reply:?}");
                };
                let mut expected = format!("{by}: hello {round}");
                if by == "pod" {
                    expected.push_str(&format!(" peer={local}"));
                }
                assert!(
                    text.as_str().starts_with(&expected),
                    "{addr} x-dev {dev:?}: {text}"
                );
                socket
                    .send(Message::Binary(big.clone()))
                    .await
                    .expect("send binary");
                let reply = timeout(EXCHANGE_LIMIT, socket.next())
                    .await
                    .expect("an echo");
                let Some(Ok(Message::Binary(echoed))) = reply else {
                    panic!("{addr} x-dev {dev:?}: {reply:?}");
                };
                assert!(
                    echoed == big,
                    "1 MiB echoed byte for byte ({addr}, x-dev {dev:?})"
                );
            }
            socket.close(None).await.expect("close");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_speaks_first_protocol_and_other_bytes_pass_to_the_pod_unchanged() {
    const SMTP: u16 = 2525;
    let shared = Shared::with_ports(&[]).await;
    // The pod's server greets first (SMTP-like), then echoes.
    let _greeter = TcpServer::in_netns(
        &shared.scenario.pod(0).netns,
        SMTP,
        |mut stream: TcpStream| async move {
            let peer = canonical(stream.peer_addr().unwrap());
            if stream
                .write_all(format!("220 pod ready, you are {peer}\r\n").as_bytes())
                .await
                .is_ok()
            {
                servers::echo(stream).await;
            }
        },
    );
    let alice = HttpServer::local("alice");
    let _session = shared.steal_on(SMTP, &alice, ALICE).start().await;

    for addr in shared.scenario.pod(0).addrs(SMTP) {
        // Waits for the greeting before saying anything.
        let stream = shared.node().connect(addr).await.expect("connect");
        let local = canonical(stream.local_addr().unwrap());
        let mut reader = BufReader::new(stream);
        let mut greeting = String::new();
        timeout(EXCHANGE_LIMIT, reader.read_line(&mut greeting))
            .await
            .unwrap_or_else(|_| panic!("{addr}: the pod's greeting never came"))
            .expect("read the greeting");
        assert_eq!(greeting, format!("220 pod ready, you are {local}\r\n"));
        reader
            .get_mut()
            .write_all(b"HELO remocal\r\n")
            .await
            .unwrap();
        let mut echoed = String::new();
        timeout(EXCHANGE_LIMIT, reader.read_line(&mut echoed))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(echoed, "HELO remocal\r\n");

        // Speaks first, in bytes that are no HTTP (a TLS record header, then noise).
        let stream = shared.node().connect(addr).await.expect("connect");
        let local = canonical(stream.local_addr().unwrap());
        let mut sent = vec![0x16, 0x03, 0x01, 0x02, 0x00];
        sent.extend(Pattern::new(9).take(MIB));
        let (mut reader, mut writer) = stream.into_split();
        let mut received = Vec::new();
        let (written, read) = timeout(EXCHANGE_LIMIT, async {
            tokio::join!(
                async {
                    writer.write_all(&sent).await?;
                    writer.shutdown().await
                },
                reader.read_to_end(&mut received)
            )
        })
        .await
        .expect("the pod's answer ended");
        written.expect("send");
        read.expect("read the answer");
        let greeting = format!("220 pod ready, you are {local}\r\n");
        assert!(
            received.starts_with(greeting.as_bytes()),
            "{:?}",
            String::from_utf8_lossy(&received[..received.len().min(80)])
        );
        assert!(
            received[greeting.len()..] == sent[..],
            "the bytes came back unchanged ({addr})"
        );
    }
    assert_eq!(
        alice.accepted(),
        0,
        "nothing that is not HTTP reaches a developer"
    );
}

// ---------------------------------------------------------------------------
// 5. The pod sees its clients.
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pod_sees_each_clients_real_address_and_port_over_ipv4_and_ipv6() {
    let shared = Shared::start().await;
    let alice = HttpServer::local("alice");
    let _session = shared.filtered(&alice, ALICE).await;

    for addr in shared.scenario.pod(0).addrs(PORT) {
        let mut first = Http1::connect(shared.node(), addr).await.expect("connect");
        let mut second = Http1::connect(shared.node(), addr).await.expect("connect");
        assert_ne!(first.local, second.local);
        for round in 0..2 {
            for client in [&mut first, &mut second] {
                let answer = exchange(client, &format!("/real/{round}"), None).await;
                assert_eq!(answer.by, "pod", "{answer}");
                assert_eq!(
                    answer.peer,
                    canonical(client.local),
                    "the pod's server sees the client's address and port as its peer ({addr})"
                );
                let answer = exchange(client, "/mine", Some("alice")).await;
                assert_eq!(answer.by, "alice", "{answer}");
            }
        }
    }
}

// ---------------------------------------------------------------------------
// 6. Conflicts, precedence, mirrors, and the end of a session.
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_identical_filter_is_refused_naming_who_holds_it() {
    let shared = Shared::start().await;
    let alice = HttpServer::local("alice");
    let other = HttpServer::local("other");
    let holder = shared
        .filtered(&alice, &["--header", "x-dev: alice", "--path", "^/api/"])
        .await;

    // The same conditions, written differently: header names in another case, another order.
    for filter in [
        &["--header", "x-dev: alice", "--path", "^/api/"][..],
        &["--path", "^/api/", "--header", "X-Dev: alice"],
    ] {
        let refused = shared.steal(&other, filter).run_to_exit().await;
        assert_eq!(refused.code, Some(5), "conflict: {refused:?}");
        assert!(
            refused.stderr.starts_with("error:")
                && refused.stderr.contains(&format!("(pid {})", holder.pid()))
                && refused.stderr.to_ascii_lowercase().contains("x-dev: alice"),
            "names the holder and the filter: {}",
            refused.stderr
        );
    }
    // Another filter on the same port is welcome.
    let _neighbour = shared
        .filtered(&other, &["--header", "x-dev: alice", "--path", "^/web/"])
        .await;
    let mut client = Http1::connect(shared.node(), shared.addr()).await.unwrap();
    assert_eq!(
        exchange(&mut client, "/api/x", Some("alice")).await.by,
        "alice"
    );
    assert_eq!(
        exchange(&mut client, "/web/x", Some("alice")).await.by,
        "other"
    );
    assert_eq!(
        exchange(&mut client, "/other", Some("alice")).await.by,
        "pod"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_whole_port_steal_and_filtered_steals_exclude_each_other() {
    let shared = Shared::start().await;
    let alice = HttpServer::local("alice");
    let whole = HttpServer::local("whole");

    // Filtered first: a whole-port steal is refused.
    let mut filtered = shared.filtered(&alice, ALICE).await;
    let refused = shared.steal(&whole, &[]).run_to_exit().await;
    assert_eq!(refused.code, Some(5), "{refused:?}");
    assert!(
        refused
            .stderr
            .contains(&format!("(pid {})", filtered.pid())),
        "names the filtered session holding the port: {}",
        refused.stderr
    );
    let ended = filtered.stop().await;
    assert_eq!(ended.code, Some(0), "{ended:?}");

    // Whole first: a filtered steal is refused.
    let whole_session = shared.steal(&whole, &[]).start().await;
    let refused = shared.steal(&alice, ALICE).run_to_exit().await;
    assert_eq!(refused.code, Some(5), "{refused:?}");
    assert!(
        refused
            .stderr
            .contains(&format!("(pid {})", whole_session.pid())),
        "names the whole-port steal holding the port: {}",
        refused.stderr
    );
    // The whole-port steal is untouched by the attempt.
    let mut client = Http1::connect(shared.node(), shared.addr()).await.unwrap();
    assert_eq!(exchange(&mut client, "/", Some("alice")).await.by, "whole");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_filters_overlap_the_session_started_first_wins() {
    const OTHER_PORT: u16 = 8080;
    let shared = Shared::with_ports(&[PORT, OTHER_PORT]).await;
    let narrow = HttpServer::local("narrow");
    let broad = HttpServer::local("broad");
    let everyone = &["--header", "x-dev: .*"];

    // Port 80: the narrow filter first. Port 8080: the broad one first.
    let mut narrow_80 = shared.steal_on(PORT, &narrow, ALICE).start().await;
    let broad_80 = shared.steal_on(PORT, &broad, everyone).start().await;
    let _broad_8080 = shared.steal_on(OTHER_PORT, &broad, everyone).start().await;
    let _narrow_8080 = shared.steal_on(OTHER_PORT, &narrow, ALICE).start().await;

    let pod = shared.scenario.pod(0);
    let mut on_80 = Http1::connect(shared.node(), pod.v4(PORT)).await.unwrap();
    let mut on_8080 = Http1::connect(shared.node(), pod.v4(OTHER_PORT))
        .await
        .unwrap();
    assert_eq!(exchange(&mut on_80, "/", Some("alice")).await.by, "narrow");
    assert_eq!(exchange(&mut on_80, "/", Some("carol")).await.by, "broad");
    assert_eq!(exchange(&mut on_80, "/", None).await.by, "pod");
    assert_eq!(exchange(&mut on_8080, "/", Some("alice")).await.by, "broad");
    assert_eq!(exchange(&mut on_8080, "/", Some("carol")).await.by, "broad");
    assert_eq!(exchange(&mut on_8080, "/", None).await.by, "pod");
    // The one that joined later was told who comes first; the first was not.
    let warned = until_ok(
        Instant::now() + Duration::from_secs(5),
        Duration::from_millis(50),
        || {
            let stderr = broad_80.stderr();
            std::future::ready(
                if stderr.contains("warning:")
                    && stderr.contains("x-dev: alice")
                    && stderr.contains("started first")
                {
                    Ok(())
                } else {
                    Err(stderr)
                },
            )
        },
    )
    .await;
    assert!(warned.is_ok(), "{warned:?}");
    assert!(
        !narrow_80.stderr().contains("started first"),
        "{}",
        narrow_80.stderr()
    );

    // When the first leaves, the next match takes its requests, on the same connection.
    let ended = narrow_80.stop().await;
    assert_eq!(ended.code, Some(0), "{ended:?}");
    assert_eq!(exchange(&mut on_80, "/", Some("alice")).await.by, "broad");
    assert_eq!(exchange(&mut on_80, "/", None).await.by, "pod");
}

/// The conditions as documented: all must match; method exact; path and query
/// by an unanchored regex unless anchored; header names in any case.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_is_a_sessions_only_when_all_its_conditions_match() {
    let shared = Shared::start().await;
    let orders = HttpServer::local("orders");
    let tenant = HttpServer::local("tenant");
    let _orders = shared
        .filtered(&orders, &["--method", "POST", "--path", "^/orders"])
        .await;
    let _tenant = shared
        .filtered(
            &tenant,
            &[
                "--header",
                "X-Tenant: ^t-4[0-9]$",
                "--header",
                "x-debug: yes",
                "--path",
                "debug=1",
            ],
        )
        .await;

    let mut client = Http1::connect(shared.node(), shared.addr()).await.unwrap();
    // (method, path and query, headers, who serves it)
    type Case = (
        Method,
        &'static str,
        &'static [(&'static str, &'static str)],
        &'static str,
    );
    let cases: [Case; 10] = [
        (Method::POST, "/orders", &[], "orders"),
        (Method::POST, "/orders/7?x=1", &[], "orders"),
        (Method::GET, "/orders", &[], "pod"),
        (Method::POST, "/api/orders", &[], "pod"),
        (
            Method::GET,
            "/x?debug=1",
            &[("x-tenant", "t-42"), ("x-debug", "yes")],
            "tenant",
        ),
        (
            Method::GET,
            "/x?debug=1",
            &[("X-TENANT", "t-40"), ("X-Debug", "oh yes please")],
            "tenant",
        ),
        (Method::GET, "/x?debug=1", &[("x-tenant", "t-42")], "pod"),
        (
            Method::GET,
            "/x?debug=1",
            &[("x-tenant", "t-420"), ("x-debug", "yes")],
            "pod",
        ),
        (
            Method::GET,
            "/x?debug=0",
            &[("x-tenant", "t-42"), ("x-debug", "yes")],
            "pod",
        ),
        (
            Method::GET,
            "/x",
            &[("x-tenant", "t-42"), ("x-debug", "yes")],
            "pod",
        ),
    ];
    for (method, path, headers, by) in cases {
        let mut sent = request(method.clone(), path, None, empty());
        for (name, value) in headers {
            sent.headers_mut().append(
                hyper::header::HeaderName::from_bytes(name.as_bytes()).unwrap(),
                value.parse().unwrap(),
            );
        }
        let reply = timeout(EXCHANGE_LIMIT, client.send(sent))
            .await
            .unwrap()
            .unwrap();
        let answer = Answer::expect(&reply.text());
        assert_eq!(answer.by, by, "{method} {path} {headers:?}: {answer}");
        assert_eq!(
            (answer.method.as_str(), answer.path.as_str()),
            (method.as_str(), path)
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mirror_copies_the_connections_of_a_port_shared_by_filtered_steals() {
    let shared = Shared::start().await;
    let alice = HttpServer::local("alice");
    let (recorder, recorded) = servers::recording(|bytes| bytes);
    let _mirror = shared.scenario.mirror(0, PORT, &recorder).start().await;
    let _alice_session = shared.filtered(&alice, ALICE).await;
    // And a mirror started after the filtered steal.
    let (late_recorder, late_recorded) = servers::recording(|bytes| bytes);
    let _late_mirror = shared
        .scenario
        .mirror(0, PORT, &late_recorder)
        .start()
        .await;

    let sent = concat!(
        "GET /m/1 HTTP/1.1\r\nHost: web\r\nx-dev: alice\r\n\r\n",
        "GET /m/2 HTTP/1.1\r\nHost: web\r\n\r\n",
        "POST /m/3 HTTP/1.1\r\nHost: web\r\nx-dev: alice\r\nContent-Length: 4\r\n\r\nbody",
    );
    let mut stream = shared.node().connect(shared.addr()).await.unwrap();
    stream.write_all(sent.as_bytes()).await.unwrap();
    let mut reader = BufReader::new(stream);
    for (by, path) in [("alice", "/m/1"), ("pod", "/m/2"), ("alice", "/m/3")] {
        let (_, body) = timeout(EXCHANGE_LIMIT, read_response(&mut reader))
            .await
            .unwrap()
            .unwrap();
        let answer = Answer::expect(&String::from_utf8_lossy(&body));
        assert_eq!(
            (answer.by.as_str(), answer.path.as_str()),
            (by, path),
            "{answer}"
        );
    }
    reader.get_mut().shutdown().await.unwrap();
    drop(reader);

    for (which, recorded) in [
        ("mirror started first", &recorded),
        ("mirror started later", &late_recorded),
    ] {
        let copies = until_ok(
            Instant::now() + Duration::from_secs(15),
            Duration::from_millis(50),
            || {
                let copies = recorded.lock().unwrap().clone();
                std::future::ready(if copies.is_empty() {
                    Err(copies)
                } else {
                    Ok(copies)
                })
            },
        )
        .await
        .unwrap_or_else(|copies| panic!("{which}: no copy arrived: {copies:?}"));
        assert_eq!(
            copies,
            vec![sent.as_bytes().to_vec()],
            "{which}: one copy, byte for byte what the client sent"
        );
    }
}

/// One answer a client of the mid-traffic test got.
#[derive(Debug)]
struct Seen {
    by: String,
    sent_after_stop: bool,
    /// The answer said `Connection: close`.
    closes: bool,
    /// The pod's server accepted the connection itself (not the agent's pass-through).
    direct: bool,
}

/// The last session ends while clients keep sending keep-alive requests its
/// filter matches: every request gets an answer, from alice until she is gone,
/// from the pod after; connections the agent held are closed between answers
/// (`Connection: close`), an upload in flight to the pod completes, and new
/// connections go straight to the pod again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_last_session_ending_mid_traffic_loses_no_request() {
    const CLIENTS: usize = 5;
    let shared = Arc::new(Shared::start().await);
    let alice = HttpServer::local("alice");
    let mut session = shared.filtered(&alice, ALICE).await;

    // An upload to the pod, half sent before the session ends and half after.
    let (more, rest) = tokio::sync::mpsc::channel::<Bytes>(4);
    let upload_body = http_body_util::BodyExt::boxed(http_body_util::StreamBody::new(
        tokio_stream::wrappers::ReceiverStream::new(rest)
            .map(|chunk| Ok::<_, std::io::Error>(hyper::body::Frame::data(chunk))),
    ));
    let mut uploader = Http1::connect(shared.node(), shared.addr()).await.unwrap();
    let mut upload = request(Method::POST, "/in-flight", None, upload_body);
    upload.headers_mut().insert("x-seed", "77".parse().unwrap());
    let upload = tokio::spawn(async move { uploader.send(upload).await });
    let mut pattern = Pattern::new(77);
    for _ in 0..8 {
        more.send(Bytes::from(pattern.take(256 * 1024)))
            .await
            .unwrap();
    }

    let stopped = Arc::new(AtomicBool::new(false));
    let alice_answers = Arc::new(AtomicUsize::new(0));
    let mut clients = tokio::task::JoinSet::new();
    for index in 0..CLIENTS {
        let (shared, stopped, alice_answers) =
            (shared.clone(), stopped.clone(), alice_answers.clone());
        clients.spawn(async move {
            let mut seen = Vec::new();
            let mut after_stop = 0;
            let mut client: Option<Http1> = None;
            let mut n = 0;
            while after_stop < 20 {
                let sent_after_stop = stopped.load(Ordering::SeqCst);
                if client.is_none() {
                    client = Some(
                        Http1::connect(shared.node(), shared.addr())
                            .await
                            .map_err(|e| format!("client {index}: connect: {e}"))?,
                    );
                }
                let path = format!("/loop/{index}/{n}");
                let reply: Reply = timeout(EXCHANGE_LIMIT, client.as_mut().unwrap().get(&path, Some("alice")))
                    .await
                    .map_err(|_| format!("{path}: no answer; before: {seen:?}"))?
                    .map_err(|e| format!("{path}: lost ({e}); before: {seen:?}"))?;
                let answer = Answer::parse(&reply.text())
                    .ok_or_else(|| format!("{path}: not an answer: {reply:?}"))?;
                if answer.path != path || answer.dev != "alice" {
                    return Err(format!("{path} answered {answer}"));
                }
                if answer.by == "alice" {
                    alice_answers.fetch_add(1, Ordering::SeqCst);
                }
                if sent_after_stop {
                    after_stop += 1;
                }
                seen.push(Seen {
                    by: answer.by.clone(),
                    sent_after_stop,
                    closes: reply.closes(),
                    direct: answer.local == shared.addr(),
                });
                if reply.closes() {
                    client = None;
                } else if !client.as_mut().unwrap().usable().await {
                    return Err(format!("{path}: the connection was closed without `Connection: close`; before: {seen:?}"));
                }
                n += 1;
            }
            Ok::<_, String>(seen)
        });
    }

    // Alice serves for a while, then ends her session.
    let served = until_ok(
        Instant::now() + Duration::from_secs(20),
        Duration::from_millis(20),
        || {
            let count = alice_answers.load(Ordering::SeqCst);
            std::future::ready(if count >= 10 * CLIENTS {
                Ok(count)
            } else {
                Err(count)
            })
        },
    )
    .await;
    assert!(served.is_ok(), "alice answered only {served:?} requests");
    let ended = session.stop().await;
    assert_eq!(ended.code, Some(0), "{ended:?}");
    stopped.store(true, Ordering::SeqCst);

    // The upload's second half, after the session is gone.
    for _ in 0..8 {
        more.send(Bytes::from(pattern.take(256 * 1024)))
            .await
            .unwrap();
    }
    drop(more);

    while let Some(result) = clients.join_next().await {
        let seen = result
            .expect("client task")
            .unwrap_or_else(|failure| panic!("{failure}"));
        let first_pod = seen
            .iter()
            .position(|seen| seen.by == "pod")
            .expect("the pod answered");
        assert!(
            seen[..first_pod].iter().all(|seen| seen.by == "alice")
                && seen[first_pod..].iter().all(|seen| seen.by == "pod"),
            "alice, then the pod: {seen:#?}"
        );
        assert!(
            seen.iter()
                .filter(|seen| seen.sent_after_stop)
                .all(|seen| seen.by == "pod"),
            "nothing sent after the session ended reached alice: {seen:#?}"
        );
        // The connection the agent held was closed after an answer, and the
        // client's next connection was the pod's own.
        let closed = seen
            .iter()
            .position(|seen| seen.closes)
            .unwrap_or_else(|| panic!("no `Connection: close` from the agent: {seen:#?}"));
        assert!(
            seen[closed + 1..].iter().all(|seen| seen.direct),
            "after the agent's connection closed, the pod served directly: {seen:#?}"
        );
    }
    let reply = timeout(Duration::from_secs(30), upload)
        .await
        .expect("the upload finished")
        .expect("upload task")
        .expect("the upload in flight was answered");
    let answer = Answer::expect(&reply.text());
    assert_eq!(
        (answer.by.as_str(), answer.received, answer.exact),
        ("pod", 4 * MIB as u64, Some(true)),
        "{answer}"
    );

    shared.assert_pod_serves_directly().await;
    shared.scenario.assert_nothing_attached(0);
    let left = until_ok(
        Instant::now() + Duration::from_secs(10),
        Duration::from_millis(100),
        || {
            std::future::ready(match passthrough_rules(&shared.scenario.pod(0).netns) {
                rules if rules.is_empty() => Ok(()),
                rules => Err(rules),
            })
        },
    )
    .await;
    assert_eq!(
        left,
        Ok(()),
        "the pass-through rules went with the last session"
    );
}

/// The same for HTTP/2: when the last session ends, a stream in flight to
/// the pod completes, and the agent sends its h2 clients away (GOAWAY) and
/// closes their connections once their streams are done; new connections are
/// the pod's own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_last_session_ending_sends_http2_clients_away_once_their_streams_are_done() {
    let shared = Shared::start().await;
    let alice = HttpServer::local("alice");
    let mut session = shared.filtered(&alice, ALICE).await;

    let mut idle = Http2::connect(shared.node(), shared.addr()).await.unwrap();
    let reply = timeout(EXCHANGE_LIMIT, idle.get("/idle", Some("alice")))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(Answer::expect(&reply.text()).by, "alice");

    // A stream to the pod whose body is half sent when the session ends.
    let mut busy = Http2::connect(shared.node(), shared.addr()).await.unwrap();
    let reply = timeout(EXCHANGE_LIMIT, busy.get("/busy", None))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(Answer::expect(&reply.text()).by, "pod");
    let (more, rest) = tokio::sync::mpsc::channel::<Bytes>(4);
    let body = http_body_util::BodyExt::boxed(http_body_util::StreamBody::new(
        tokio_stream::wrappers::ReceiverStream::new(rest)
            .map(|chunk| Ok::<_, std::io::Error>(hyper::body::Frame::data(chunk))),
    ));
    let mut upload = request(Method::POST, "http://web.shop/in-flight", None, body);
    upload.headers_mut().remove(hyper::header::HOST);
    upload.headers_mut().insert("x-seed", "78".parse().unwrap());
    let mut uploader = busy.clone();
    let upload = tokio::spawn(async move { uploader.send(upload).await });
    let mut pattern = Pattern::new(78);
    for _ in 0..4 {
        more.send(Bytes::from(pattern.take(256 * 1024)))
            .await
            .unwrap();
    }

    let ended = session.stop().await;
    assert_eq!(ended.code, Some(0), "{ended:?}");
    for _ in 0..4 {
        more.send(Bytes::from(pattern.take(256 * 1024)))
            .await
            .unwrap();
    }
    drop(more);
    let reply = timeout(Duration::from_secs(30), upload)
        .await
        .expect("the stream in flight finished")
        .expect("upload task")
        .expect("the stream in flight was answered");
    let answer = Answer::expect(&reply.text());
    assert_eq!(
        (answer.by.as_str(), answer.received, answer.exact),
        ("pod", 2 * MIB as u64, Some(true)),
        "{answer}"
    );
    for (which, connection) in [("idle", &mut idle), ("busy", &mut busy)] {
        let closed = timeout(Duration::from_secs(20), connection.ended()).await;
        assert!(
            matches!(closed, Ok(Ok(()))),
            "the agent closed the {which} h2 connection cleanly once its streams were done: {closed:?}"
        );
    }
    let mut fresh = Http2::connect(shared.node(), shared.addr()).await.unwrap();
    let reply = timeout(EXCHANGE_LIMIT, fresh.get("/fresh", Some("alice")))
        .await
        .unwrap()
        .unwrap();
    let answer = Answer::expect(&reply.text());
    assert_eq!(
        (answer.by.as_str(), answer.local),
        ("pod", shared.addr()),
        "straight to the pod: {answer}"
    );
}

// ---------------------------------------------------------------------------
// 7. Bad input.
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_filter_is_a_usage_error_and_nothing_is_attached() {
    let shared = Shared::start().await;
    let alice = HttpServer::local("alice");
    let cases: [(&[&str], &[&str]); 5] = [
        (
            &["--header", "x-dev: ("],
            &["--header 'x-dev: ('", "regular expression"],
        ),
        (
            &["--path", "^/api/[a-"],
            &["--path '^/api/[a-'", "regular expression"],
        ),
        (
            &["--header", ": alice"],
            &["--header ': alice'", "header name"],
        ),
        (&["--header", "x-dev"], &["--header 'x-dev'"]),
        (&["--header", "x-dev:"], &["--header 'x-dev:'"]),
    ];
    for (filter, said) in cases {
        let refused = shared.steal(&alice, filter).run_to_exit().await;
        assert_eq!(refused.code, Some(2), "{filter:?}: {refused:?}");
        assert!(
            refused.stderr.starts_with("error:") && said.iter().all(|s| refused.stderr.contains(s)),
            "{filter:?}: the error names the problem ({said:?}): {}",
            refused.stderr
        );
        assert!(!refused.stdout.contains("ready"), "{refused:?}");
        shared.scenario.assert_nothing_attached(0);
    }
    shared.assert_pod_serves_directly().await;
    assert_eq!(alice.accepted(), 0);
    assert!(passthrough_rules(&shared.scenario.pod(0).netns).is_empty());
    assert_eq!(
        shared
            .scenario
            .agent
            .metric("remocal_sessions_active{mode=\"steal\"}")
            .await,
        0.0
    );
}

/// A client that skips the CLI's checks (an older or a hostile one) meets the
/// same rules in the agent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_itself_refuses_a_bad_filter() {
    use remocal_proto::v1::{
        HeaderMatch, HttpFilter, Mode, OpenSession, SessionRequest, Target as ProtoTarget,
        agent_client::AgentClient, session_request, target,
    };
    let shared = Shared::start().await;
    let mut agent = AgentClient::connect(shared.scenario.agent.url())
        .await
        .expect("connect to the agent");
    let bad = [
        HttpFilter {
            headers: vec![HeaderMatch {
                name: "x-dev".into(),
                value: "(".into(),
            }],
            ..Default::default()
        },
        HttpFilter {
            headers: vec![HeaderMatch {
                name: String::new(),
                value: "alice".into(),
            }],
            ..Default::default()
        },
        HttpFilter {
            path: "[a-".into(),
            ..Default::default()
        },
        HttpFilter {
            method: "GE T".into(),
            ..Default::default()
        },
        HttpFilter::default(),
    ];
    for filter in bad {
        let open = SessionRequest {
            kind: Some(session_request::Kind::Open(OpenSession {
                target: Some(ProtoTarget {
                    kind: Some(target::Kind::NetnsPath(
                        shared.scenario.pod(0).netns.path().display().to_string(),
                    )),
                }),
                port: PORT.into(),
                mode: Mode::Steal as i32,
                client: "test@nowhere".into(),
                filter: Some(filter.clone()),
                reset_existing: None,
            })),
        };
        let result = timeout(EXCHANGE_LIMIT, async {
            let mut events = agent
                .session(futures::stream::iter([open]).chain(futures::stream::pending()))
                .await?
                .into_inner();
            events.message().await
        })
        .await
        .expect("the agent answered");
        let status = match result {
            Err(status) => status,
            Ok(event) => panic!("{filter:?} was accepted: {event:?}"),
        };
        assert_eq!(
            status.code(),
            tonic::Code::InvalidArgument,
            "{filter:?}: {status:?}"
        );
        shared.scenario.assert_nothing_attached(0);
    }
    shared.assert_pod_serves_directly().await;
}

// ---------------------------------------------------------------------------
// 8. Metrics.
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_counts_routed_requests_by_side_and_connections_by_protocol() {
    let shared = Shared::start().await;
    let agent = &shared.scenario.agent;
    let alice = HttpServer::local("alice");

    // Before any filtered steal: the pod's own traffic is nobody's business.
    shared.assert_pod_serves_directly().await;
    let mut session = shared.filtered(&alice, ALICE).await;
    assert_eq!(
        agent
            .metric("remocal_sessions_active{mode=\"steal\"}")
            .await,
        1.0
    );

    // HTTP/1.1: 2 to alice, 3 to the pod, on one connection.
    let mut client = Http1::connect(shared.node(), shared.addr()).await.unwrap();
    for dev in [Some("alice"), None, None, Some("alice"), None] {
        let answer = exchange(&mut client, "/counted", dev).await;
        assert_eq!(answer.by, dev.unwrap_or("pod"));
    }
    drop(client);
    // HTTP/2: 1 to alice, 2 to the pod, on one connection.
    let mut h2 = Http2::connect(shared.node(), shared.addr()).await.unwrap();
    for dev in [None, Some("alice"), None] {
        let reply = timeout(EXCHANGE_LIMIT, h2.get("/h2", dev))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(Answer::expect(&reply.text()).by, dev.unwrap_or("pod"));
    }
    drop(h2);
    // Not HTTP: passed whole.
    let mut other = shared.node().connect(shared.addr()).await.unwrap();
    other
        .write_all(&[0x16, 0x03, 0x01, 0x00, 0x05, 1, 2, 3, 4, 5])
        .await
        .unwrap();
    other.shutdown().await.unwrap();
    let mut rest = Vec::new();
    let _ = timeout(EXCHANGE_LIMIT, other.read_to_end(&mut rest))
        .await
        .expect("the pod closed");

    let wanted: [(&str, f64); 5] = [
        ("remocal_routed_requests_total{route=\"session\"}", 3.0),
        ("remocal_routed_requests_total{route=\"pod\"}", 5.0),
        ("remocal_routed_connections_total{protocol=\"http1\"}", 1.0),
        ("remocal_routed_connections_total{protocol=\"http2\"}", 1.0),
        ("remocal_routed_connections_total{protocol=\"other\"}", 1.0),
    ];
    let counted = until_ok(
        Instant::now() + Duration::from_secs(15),
        Duration::from_millis(100),
        || async {
            let mut values = Vec::new();
            for (sample, _) in wanted {
                values.push((sample, agent.metric(sample).await));
            }
            if values
                .iter()
                .zip(wanted)
                .all(|((_, got), (_, want))| *got == want)
            {
                Ok(values)
            } else {
                Err(values)
            }
        },
    )
    .await;
    assert!(
        counted.is_ok(),
        "expected {wanted:?}, the agent says {counted:?}"
    );

    let ended = session.stop().await;
    assert_eq!(ended.code, Some(0), "{ended:?}");
    assert_eq!(
        agent
            .metric("remocal_sessions_active{mode=\"steal\"}")
            .await,
        0.0
    );
    // Direct traffic after the session is not counted.
    shared.assert_pod_serves_directly().await;
    assert_eq!(
        agent
            .metric("remocal_routed_requests_total{route=\"pod\"}")
            .await,
        5.0
    );
}

// ---------------------------------------------------------------------------
// 9. kill -9 of the agent.
// ---------------------------------------------------------------------------

/// Each HTTP/2 connection can pin a few MiB in the agent, so it routes at
/// most 16 at once; the next ones go to the pod whole, unfiltered and
/// counted, and the pod still answers them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_connections_beyond_the_agents_limit_go_to_the_pod_whole() {
    let shared = Shared::start().await;
    let alice = HttpServer::local("alice");
    let _session = shared.filtered(&alice, ALICE).await;
    let mut held = Vec::new();
    for _ in 0..16 {
        let mut client = Http2::connect(shared.node(), shared.addr()).await.unwrap();
        let reply = client.get("/", Some("alice")).await.unwrap();
        assert_eq!(Answer::expect(&reply.text()).by, "alice");
        held.push(client);
    }
    let mut beyond = Http2::connect(shared.node(), shared.addr()).await.unwrap();
    let reply = beyond.get("/", Some("alice")).await.unwrap();
    let answer = Answer::expect(&reply.text());
    assert_eq!(answer.by, "pod", "{answer}");
    assert_eq!(
        shared
            .scenario
            .agent
            .metric(r#"remocal_routed_connections_total{protocol="not_routed"}"#)
            .await,
        1.0
    );
    // A place is given back when a routed connection ends.
    drop(held.pop());
    let reply = until_ok(
        Instant::now() + Duration::from_secs(5),
        Duration::from_millis(50),
        || async {
            let mut client = Http2::connect(shared.node(), shared.addr())
                .await
                .map_err(|e| e.to_string())?;
            let reply = client
                .get("/", Some("alice"))
                .await
                .map_err(|e| e.to_string())?;
            let answer = Answer::expect(&reply.text());
            if answer.by == "alice" {
                Ok(answer)
            } else {
                Err(answer.to_string())
            }
        },
    )
    .await;
    assert!(reply.is_ok(), "{reply:?}");
}

/// Two agents on one node (a DaemonSet update with surge) passing traffic
/// through in the same pod namespace share its local route: the one that
/// finishes first must leave it, and the rules of ports the other uses.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_finishing_leaves_what_another_agent_passes_through_with() {
    const OTHER_PORT: u16 = 8080;
    let shared = Shared::with_ports(&[PORT, OTHER_PORT]).await;
    let alice = HttpServer::local("alice");
    let bob = HttpServer::local("bob");
    let mut first = shared.filtered(&alice, ALICE).await;
    let second_agent = Agent::start().await;
    let filtered_on_second = BOB.iter().fold(
        Steal::new(&second_agent.url())
            .target(&shared.scenario.pod_target(0))
            .port(OTHER_PORT)
            .local_port(bob.port()),
        |steal, arg| steal.arg(arg),
    );
    let _second = filtered_on_second.start().await;
    let other = shared.scenario.pod(0).v4(OTHER_PORT);
    let mut client = Http1::connect(shared.node(), other).await.unwrap();
    assert_eq!(exchange(&mut client, "/", None).await.by, "pod");

    // The first agent's session ends, and its port drains.
    let ended = first.stop().await;
    assert_eq!(ended.code, Some(0), "{ended:?}");
    let netns = &shared.scenario.pod(0).netns;
    let drained = until_ok(
        Instant::now() + Duration::from_secs(15),
        Duration::from_millis(100),
        || {
            let rules = passthrough_rules(netns);
            std::future::ready(
                if rules
                    .iter()
                    .any(|rule| rule.contains(&format!("sport {PORT} ")))
                {
                    Err(rules)
                } else {
                    Ok(rules)
                },
            )
        },
    )
    .await
    .expect("the first agent removed its own port's rules");
    assert!(
        drained.iter().any(|rule| rule.contains("local default")),
        "the shared route stayed for the second agent: {drained:?}"
    );
    // The second agent's unmatched requests still reach the pod, on the
    // open connection and on a new one.
    assert_eq!(exchange(&mut client, "/", None).await.by, "pod");
    let mut fresh = Http1::connect(shared.node(), other).await.unwrap();
    assert_eq!(exchange(&mut fresh, "/", None).await.by, "pod");
    assert_eq!(exchange(&mut fresh, "/", Some("bob")).await.by, "bob");
}

/// A server that listens only on the pod's own address refuses the
/// loopback pass-through: the agent reaches it from the pod's address and
/// names the client in a `Forwarded` header instead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_bound_to_the_pods_address_gets_the_client_in_a_forwarded_header() {
    let scenario = Scenario::start(1, &[]).await;
    let pod_addr = scenario.pod(0).v4(PORT);
    let _pod = HttpServer::in_netns_at(&scenario.pod(0).netns, pod_addr, "pod");
    let shared = Shared {
        _pod_servers: Vec::new(),
        scenario,
    };
    let alice = HttpServer::local("alice");
    let _session = shared.filtered(&alice, ALICE).await;
    let mut client = Http1::connect(shared.node(), pod_addr).await.unwrap();
    let passed = exchange(&mut client, "/", None).await;
    assert_eq!(passed.by, "pod", "{passed}");
    assert_eq!(passed.peer.ip(), pod_addr.ip(), "{passed}");
    assert_eq!(
        passed.forwarded,
        format!("for=\"{}\"", canonical(client.local)),
        "{passed}"
    );
    let matched = exchange(&mut client, "/", Some("alice")).await;
    assert_eq!(
        (matched.by.as_str(), matched.forwarded.as_str()),
        ("alice", "-")
    );
    assert_eq!(exchange(&mut client, "/", None).await.by, "pod");
}

/// Two agents share a node for a while during a DaemonSet update with
/// surge: the one starting must not take the other's pass-through rules for
/// leftovers (it would leave that agent's unmatched requests unanswered).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_starting_beside_a_live_one_keeps_its_pass_through_rules() {
    let shared = Shared::start().await;
    let alice = HttpServer::local("alice");
    let _session = shared.filtered(&alice, ALICE).await;
    let mut client = Http1::connect(shared.node(), shared.addr()).await.unwrap();
    assert_eq!(exchange(&mut client, "/", None).await.by, "pod");
    let rules = passthrough_rules(&shared.scenario.pod(0).netns);
    assert!(!rules.is_empty(), "the rules are in place while stealing");

    let second = Agent::start().await;
    assert_eq!(
        passthrough_rules(&shared.scenario.pod(0).netns),
        rules,
        "the second agent left the first one's rules alone"
    );
    // Both the open connection and a new one still reach the pod.
    assert_eq!(exchange(&mut client, "/", None).await.by, "pod");
    let mut fresh = Http1::connect(shared.node(), shared.addr()).await.unwrap();
    assert_eq!(exchange(&mut fresh, "/", None).await.by, "pod");
    assert_eq!(exchange(&mut fresh, "/", Some("alice")).await.by, "alice");
    drop(second);
}

/// The agent's pass-through rules in `netns` (IPv4 and IPv6): the rules
/// tagged with its routing protocol number, and routes of its table.
fn passthrough_rules(netns: &Netns) -> Vec<String> {
    let mut found = Vec::new();
    for family in ["-4", "-6"] {
        for what in [&["rule", "show"][..], &["route", "show", "table", "all"]] {
            let mut args = vec![family];
            args.extend_from_slice(what);
            let output = netns.command("ip").args(&args).output().expect("run ip");
            assert!(
                output.status.success(),
                "ip {args:?}: {}",
                String::from_utf8_lossy(&output.stderr)
            );
            for line in String::from_utf8_lossy(&output.stdout).lines() {
                if line.contains(&format!("proto {PASSTHROUGH_PROTOCOL}"))
                    || line.contains(&format!("table {PASSTHROUGH_TABLE}"))
                    || line.contains(&format!("lookup {PASSTHROUGH_TABLE}"))
                {
                    found.push(format!("ip {family}: {line}"));
                }
            }
        }
    }
    found
}

/// The routing protocol number the agent tags its rules with ('R', 0x52), as `ip` prints it.
const PASSTHROUGH_PROTOCOL: u32 = 0x52;
/// The routing table of its local routes.
const PASSTHROUGH_TABLE: u32 = 0x52_45_4d;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_kill_9_of_the_agent_the_pod_serves_and_a_new_agent_removes_the_leftover_rules() {
    let mut shared = Shared::start().await;
    let alice = HttpServer::local("alice");
    let mut session = shared.filtered(&alice, ALICE).await;
    let mut client = Http1::connect(shared.node(), shared.addr()).await.unwrap();
    assert_eq!(exchange(&mut client, "/", Some("alice")).await.by, "alice");
    assert_eq!(exchange(&mut client, "/", None).await.by, "pod");
    let netns = &shared.scenario.pod(0).netns;
    assert!(
        !passthrough_rules(netns).is_empty(),
        "the pass-through rules are in place while stealing"
    );

    shared.scenario.agent.kill9();
    let served = until_ok(
        Instant::now() + Duration::from_secs(5),
        Duration::from_millis(50),
        || async {
            let mut client = timeout(
                Duration::from_millis(500),
                Http1::connect(shared.node(), shared.addr()),
            )
            .await
            .map_err(|_| "connect timed out".to_string())?
            .map_err(|e| e.to_string())?;
            let reply = timeout(
                Duration::from_millis(500),
                client.get("/after", Some("alice")),
            )
            .await
            .map_err(|_| "no answer".to_string())?
            .map_err(|e| e.to_string())?;
            Answer::parse(&reply.text())
                .filter(|answer| answer.by == "pod")
                .ok_or_else(|| reply.text())
        },
    )
    .await;
    assert!(
        served.is_ok(),
        "the pod serves its own traffic once the agent is gone: {served:?}"
    );
    shared.assert_pod_serves_directly().await;
    assert!(
        until_ok(
            Instant::now() + Duration::from_secs(2),
            Duration::from_millis(50),
            || {
                std::future::ready(if shared.scenario.tcx_programs(0).is_empty() {
                    Ok(())
                } else {
                    Err(())
                })
            }
        )
        .await
        .is_ok(),
        "still attached: {}",
        bpf::describe(&shared.scenario.tcx_programs(0))
    );
    let ended = session.wait_exit(Duration::from_secs(20)).await;
    assert_eq!(
        ended.code,
        Some(7),
        "the developer is told the session is lost: {ended:?}"
    );

    // The rules the dead agent left are inert: the pod's own traffic, to
    // loopback and to its own address, on the port, is served as ever.
    // (Another test's agent starting meanwhile may have removed them
    // already, as any agent starting on the node does.)
    let left = passthrough_rules(&shared.scenario.pod(0).netns);
    let netns = &shared.scenario.pod(0).netns;
    for addr in [
        "127.0.0.1".parse::<IpAddr>().unwrap(),
        "::1".parse().unwrap(),
        shared.scenario.pod(0).ipv4.into(),
        shared.scenario.pod(0).ipv6.into(),
    ] {
        let mut client = Http1::connect(netns, SocketAddr::new(addr, PORT))
            .await
            .unwrap();
        let answer = exchange(&mut client, "/self", None).await;
        assert_eq!(answer.by, "pod", "the pod calling itself at {addr}");
        assert_eq!(answer.peer, canonical(client.local), "{answer}");
    }

    // A new agent cleans up before anything else.
    shared.scenario.agent = Agent::start().await;
    let netns = &shared.scenario.pod(0).netns;
    let cleaned = until_ok(
        Instant::now() + Duration::from_secs(10),
        Duration::from_millis(100),
        || {
            std::future::ready(match passthrough_rules(netns) {
                rules if rules.is_empty() => Ok(()),
                rules => Err(rules),
            })
        },
    )
    .await;
    assert_eq!(
        cleaned,
        Ok(()),
        "the restarted agent removed the rules {left:?}"
    );
    shared.assert_pod_serves_directly().await;

    // And shares the port again.
    let _again = shared.filtered(&alice, ALICE).await;
    let mut client = Http1::connect(shared.node(), shared.addr()).await.unwrap();
    assert_eq!(exchange(&mut client, "/", Some("alice")).await.by, "alice");
    let answer = exchange(&mut client, "/", None).await;
    assert_eq!(
        (answer.by.as_str(), answer.peer),
        ("pod", canonical(client.local))
    );
}

// ---------------------------------------------------------------------------
// Every target form, and the ready event.
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_filtered_steal_by_pid_shares_the_port_of_that_processs_namespace() {
    let shared = Shared::start().await;
    let alice = HttpServer::local("alice");
    let pod_process = PodProcess::start(&shared.scenario.pod(0).netns).await;
    let mut session = Steal::new(&shared.scenario.agent.url())
        .target(&Target::Pid(pod_process.pid()))
        .port(PORT)
        .local_port(alice.port())
        .arg("--method")
        .arg("post")
        .arg("--path")
        .arg("^/api/")
        .start()
        .await;
    assert!(
        session
            .ready_line()
            .contains("requests matching --method POST --path '^/api/' ->"),
        "{}",
        session.ready_line()
    );
    let mut client = Http1::connect(shared.node(), shared.addr()).await.unwrap();
    let reply = client
        .send(request(Method::POST, "/api/x", None, empty()))
        .await
        .unwrap();
    assert_eq!(Answer::expect(&reply.text()).by, "alice");
    let reply = client
        .send(request(Method::GET, "/api/x", None, empty()))
        .await
        .unwrap();
    assert_eq!(Answer::expect(&reply.text()).by, "pod");
    let ended = session.stop().await;
    assert_eq!(ended.code, Some(0), "{ended:?}");
    shared.assert_pod_serves_directly().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_json_ready_event_carries_the_filter() {
    let shared = Shared::start().await;
    let alice = HttpServer::local("alice");
    let mut command = tokio::process::Command::new(binary("remocal"));
    command
        .args(["steal", "--agent", &shared.scenario.agent.url(), "--netns"])
        .arg(shared.scenario.pod(0).netns.path())
        .args([
            "--port",
            &PORT.to_string(),
            "--local-port",
            &alice.port().to_string(),
        ])
        .args([
            "--header",
            "x-dev: alice",
            "--header",
            "x-b: ^1$",
            "--method",
            "POST",
            "--path",
            "^/api/",
        ])
        .args(["--output", "json"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    let mut child = command.spawn().expect("start remocal");
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    timeout(Duration::from_secs(20), stdout.read_line(&mut line))
        .await
        .expect("a ready event")
        .expect("read stdout");
    let ready: serde_json::Value =
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("{line:?}: {e}"));
    assert_eq!(ready["event"], "ready", "{ready}");
    assert_eq!(
        ready["filter"],
        serde_json::json!({
            "headers": [{"name": "x-dev", "value": "alice"}, {"name": "x-b", "value": "^1$"}],
            "path": "^/api/",
            "method": "POST",
        }),
        "{ready}"
    );
    // Dropping the child kills it; the agent ends the session with the test.
    drop(child);
}

/// Ctrl-C or SIGTERM as soon as `ready` was printed (a script that waits
/// for the line, then stops the session) ends the session cleanly: exit 0,
/// and the port is the pod's again at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_right_after_the_ready_line_ends_the_session_cleanly() {
    let shared = Shared::start().await;
    let alice = HttpServer::local("alice");
    // A few rounds: the moment between the line and the signal is short.
    for round in 0..5 {
        let mut child = tokio::process::Command::new(binary("remocal"))
            .args(["steal", "--agent", &shared.scenario.agent.url(), "--netns"])
            .arg(shared.scenario.pod(0).netns.path())
            .args([
                "--port",
                &PORT.to_string(),
                "--local-port",
                &alice.port().to_string(),
            ])
            .args(ALICE)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("start remocal");
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        timeout(Duration::from_secs(20), stdout.read_line(&mut line))
            .await
            .expect("a ready line")
            .expect("read stdout");
        assert!(line.starts_with("ready"), "{line:?}");
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(child.id().expect("running") as i32),
            nix::sys::signal::Signal::SIGTERM,
        )
        .unwrap();
        let status = timeout(Duration::from_secs(10), child.wait())
            .await
            .expect("remocal exited")
            .unwrap();
        assert_eq!(
            status.code(),
            Some(0),
            "round {round}: remocal ended by SIGTERM right after `ready` exits 0 having closed its session ({status})"
        );
        shared.scenario.assert_nothing_attached(0);
    }
    shared.scenario.assert_nothing_attached(0);
    shared.assert_pod_serves_directly().await;
}

/// `remocal steal pod/NAME` in a cluster: the same routing, authorized as a filtered steal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_filtered_steal_of_a_pod_by_name_is_authorized_as_a_filtered_steal() {
    use remocal_tests::kube_api;
    use remocal_tests::kube_cluster::KubeCluster;
    use remocal_tests::user_roles;

    const DEVELOPER: &str = "developer";
    let cluster = KubeCluster::start().await;
    cluster.api.add_user("dev-token", DEVELOPER);
    cluster.api.strict(DEVELOPER);
    let kubeconfig = cluster.api.kubeconfig("dev", "dev-token", Some("shop"));
    user_roles::bind(&cluster.api, DEVELOPER, "remocal-user", "shop");
    user_roles::bind_role(&cluster.api, DEVELOPER, "remocal-user", "remocal");
    let local = TcpServer::local(|s| servers::http(s, "alice"));

    let mut session = Steal::remocal(&[
        "steal",
        "pod/web",
        "--port",
        "80",
        "--header",
        "x-dev: alice",
    ])
    .arg("--kubeconfig")
    .arg(&kubeconfig)
    .local_port(local.port())
    .start()
    .await;
    assert!(
        session
            .ready_line()
            .contains("pod shop/web port=80 requests matching --header 'x-dev: alice'")
            && session.ready_line().ends_with(&format!("as {DEVELOPER}")),
        "{}",
        session.ready_line()
    );
    let scenario = &cluster.scenario;
    for addr in scenario.pod(0).addrs(80) {
        let mut client = Http1::connect(scenario.node(), addr).await.unwrap();
        let mine = client.get("/", Some("alice")).await.unwrap();
        assert_eq!(mine.text().trim(), "alice", "{addr}");
        let theirs = client.get("/", None).await.unwrap();
        assert_eq!(
            theirs.text().trim(),
            remocal_tests::scenario::POD_BODY,
            "{addr}"
        );
    }
    let ended = session.stop().await;
    assert_eq!(ended.code, Some(0), "{ended:?}");
    scenario.assert_pod_answers(0, 80).await;

    let reviews = cluster.api.access_reviews();
    assert!(
        reviews
            .iter()
            .any(|review: &kube_api::AccessReview| review.user == DEVELOPER
                && review.group == "remocal.dev"
                && review.resource == "pods"
                && review.subresource == "steal-filtered"
                && review.namespace == "shop"
                && review.name == "web"
                && review.allowed),
        "the agent asked whether the developer may steal filtered: {reviews:#?}"
    );
    assert!(
        !reviews.iter().any(|review| review.subresource == "steal"),
        "and not for a whole-port steal: {reviews:#?}"
    );
}
