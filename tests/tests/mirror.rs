//! `remocal mirror`: the developer's process gets a byte-exact copy of every new
//! connection to a pod port while the pod itself keeps serving them, unchanged.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use remocal_tests::data::{Pattern, splitmix64};
use remocal_tests::netns::Netns;
use remocal_tests::scenario::Scenario;
use remocal_tests::servers::{self, TcpServer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::{Instant, sleep, timeout};

const PORT: u16 = 7000;
/// A copy cannot slow the remote sender down, so a burst larger than the agent's
/// buffers is cut off by design (tested below). The tests that expect complete
/// copies of bursts (a 50 MiB upload into a debug build on a busy CI machine) give
/// the agent room for the whole burst.
const ROOM_FOR_THE_BURST: &[&str] = &[
    "--capture-buffer",
    "134217728",
    "--mirror-flow-limit",
    "134217728",
];

/// What the local process received on one mirrored connection.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Copy {
    seed: u64,
    len: usize,
    exact: bool,
}

impl Copy {
    /// Checks a copy against the pattern its first 16 bytes name (seed, length).
    fn check(received: Vec<u8>) -> Copy {
        match received.get(..16) {
            Some(preamble) => {
                let seed = u64::from_le_bytes(preamble[..8].try_into().unwrap());
                let len = u64::from_le_bytes(preamble[8..].try_into().unwrap()) as usize;
                let body = &received[16..];
                let exact = body.len() == len && body == Pattern::new(seed).take(len).as_slice();
                Copy {
                    seed,
                    len: body.len(),
                    exact,
                }
            }
            None => Copy {
                seed: u64::MAX,
                len: received.len(),
                exact: false,
            },
        }
    }
}

/// The developer's process: checks each copy it receives.
fn recording_local() -> (TcpServer, Arc<Mutex<Vec<Copy>>>) {
    servers::recording(Copy::check)
}

/// The request of connection `seed`: a 16-byte preamble naming it, then `len` bytes.
fn request(seed: u64, len: usize) -> Vec<u8> {
    let mut data = Vec::with_capacity(16 + len);
    data.extend_from_slice(&seed.to_le_bytes());
    data.extend_from_slice(&(len as u64).to_le_bytes());
    data.extend_from_slice(&Pattern::new(seed).take(len));
    data
}

/// A remote client: sends the request, half-closes, and checks that the pod's echo
/// server answered with exactly the request: the pod is unaffected.
async fn remote_exchange(node: &Netns, addr: SocketAddr, data: Vec<u8>) {
    let mut stream = node.connect(addr).await.expect("connect to the pod");
    let (mut reader, mut writer) = stream.split();
    let send = async {
        writer.write_all(&data).await.expect("send to the pod");
        writer.shutdown().await.expect("half-close");
    };
    let mut answer = Vec::with_capacity(data.len());
    let receive = reader.read_to_end(&mut answer);
    let ((), received) = tokio::join!(send, receive);
    received.expect("the pod's answer");
    assert!(
        answer == data,
        "the pod's answer changed ({} of {} bytes)",
        answer.len(),
        data.len()
    );
}

async fn wait_for_copies(
    copies: &Arc<Mutex<Vec<Copy>>>,
    count: usize,
    limit: Duration,
) -> Vec<Copy> {
    let deadline = Instant::now() + limit;
    loop {
        let seen = copies.lock().unwrap().clone();
        if seen.len() >= count || Instant::now() > deadline {
            return seen;
        }
        sleep(Duration::from_millis(50)).await;
    }
}

/// 100 concurrent connections of 1 to 64 KiB, and one 50 MiB upload.
fn workload() -> Vec<(u64, usize)> {
    let mut connections: Vec<(u64, usize)> = (1..=100u64)
        .map(|seed| (seed, 1024 + (splitmix64(seed) % (63 * 1024)) as usize))
        .collect();
    connections.push((1000, 50 << 20));
    connections
}

async fn run_workload(scenario: &Scenario, connections: &[(u64, usize)]) {
    let addr = scenario.pod(0).v4(PORT);
    let exchanges = connections
        .iter()
        .map(|&(seed, len)| remote_exchange(scenario.node(), addr, request(seed, len)));
    futures::future::join_all(exchanges).await;
}

fn assert_complete(copies: &[Copy], connections: &[(u64, usize)], who: &str) {
    for &(seed, len) in connections {
        let copy = copies.iter().find(|copy| copy.seed == seed);
        assert!(
            copy.is_some_and(|copy| copy.exact && copy.len == len),
            "{who}: connection {seed} ({len} bytes) arrived as {copy:?}"
        );
    }
    assert_eq!(
        copies.len(),
        connections.len(),
        "{who}: one copy per connection"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_connection_arrives_byte_exact_while_the_pod_answers_them() {
    let scenario = Scenario::start_with(1, &[], ROOM_FOR_THE_BURST).await;
    let pod = TcpServer::in_netns(&scenario.pod(0).netns, PORT, servers::echo);
    let (local, copies) = recording_local();
    let _mirror = scenario.mirror(0, PORT, &local).start().await;

    let connections = workload();
    run_workload(&scenario, &connections).await;
    let copies = wait_for_copies(&copies, connections.len(), Duration::from_secs(60)).await;
    assert_complete(&copies, &connections, "the local process");
    assert_eq!(
        pod.accepted(),
        connections.len(),
        "the pod served every connection"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_mirror_sessions_on_one_port_both_get_complete_copies() {
    let scenario = Scenario::start_with(1, &[], ROOM_FOR_THE_BURST).await;
    let _pod = TcpServer::in_netns(&scenario.pod(0).netns, PORT, servers::echo);
    let (first_local, first) = recording_local();
    let (second_local, second) = recording_local();
    let _first = scenario.mirror(0, PORT, &first_local).start().await;
    let _second = scenario.mirror(0, PORT, &second_local).start().await;

    let connections: Vec<(u64, usize)> = (1..=10u64).map(|seed| (seed, 200_000)).collect();
    run_workload(&scenario, &connections).await;
    let limit = Duration::from_secs(30);
    assert_complete(
        &wait_for_copies(&first, 10, limit).await,
        &connections,
        "the first session",
    );
    assert_complete(
        &wait_for_copies(&second, 10, limit).await,
        &connections,
        "the second session",
    );
}

/// Loss on the path (3% of the remote's packets dropped by nftables in the node
/// namespace; this kernel has no netem) makes TCP retransmit, so the capture sees
/// holes, late fills and out-of-order segments: the copies must still be exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copies_stay_byte_exact_with_packet_loss_on_the_path() {
    let scenario = Scenario::start_with(1, &[], ROOM_FOR_THE_BURST).await;
    let _pod = TcpServer::in_netns(&scenario.pod(0).netns, PORT, servers::echo);
    let nft = |rule: &str| {
        let status = scenario
            .node()
            .command("nft")
            .arg(rule)
            .status()
            .expect("run nft (cargo xtask setup installs it)");
        assert!(status.success(), "nft {rule}");
    };
    nft("add table inet remocal_loss");
    nft("add chain inet remocal_loss out { type filter hook output priority 0; }");
    nft(&format!(
        "add rule inet remocal_loss out tcp dport {PORT} numgen random mod 100 < 3 drop"
    ));
    let (local, copies) = recording_local();
    let _mirror = scenario.mirror(0, PORT, &local).start().await;

    let connections: Vec<(u64, usize)> = (1..=20u64).map(|seed| (seed, 300_000)).collect();
    run_workload(&scenario, &connections).await;
    let copies = wait_for_copies(&copies, connections.len(), Duration::from_secs(60)).await;
    assert_complete(&copies, &connections, "the local process");
}

/// A capture buffer far too small for the traffic overruns: the loss is detected and
/// reported, the affected copies end short of their data instead of being stitched,
/// and the pod's clients notice nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_overrun_capture_buffer_is_reported_and_cuts_the_copies() {
    let scenario = Scenario::start_with(1, &[], &["--capture-buffer", "4096"]).await;
    let _pod = TcpServer::in_netns(&scenario.pod(0).netns, PORT, servers::echo);
    let (local, copies) = recording_local();
    let mut mirror = scenario.mirror(0, PORT, &local).start().await;

    let connections: Vec<(u64, usize)> = (1..=4u64).map(|seed| (seed, 4 << 20)).collect();
    run_workload(&scenario, &connections).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while !mirror.stderr().contains("cut off") && Instant::now() < deadline {
        sleep(Duration::from_millis(50)).await;
    }
    assert!(
        mirror.stderr().contains("cut off"),
        "remocal reports the loss: {}",
        mirror.stderr()
    );
    let copies = wait_for_copies(&copies, connections.len(), Duration::from_secs(10)).await;
    assert!(!copies.is_empty(), "the cut copies were closed");
    assert!(
        copies.iter().all(|copy| !copy.exact),
        "no copy may pretend to be complete after an overrun: {copies:?}"
    );
    let ended = mirror.stop().await;
    assert_eq!(ended.code, Some(0), "the session itself goes on: {ended:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pods_clients_see_no_error_when_the_agent_dies_mid_mirror() {
    let mut scenario = Scenario::start(1, &[]).await;
    let _pod = TcpServer::in_netns(&scenario.pod(0).netns, PORT, servers::echo);
    let (local, _copies) = recording_local();
    let _mirror = scenario.mirror(0, PORT, &local).start().await;

    let addr = scenario.pod(0).v4(PORT);
    let data = request(7, 8 << 20);
    let mut stream = scenario.node().connect(addr).await.unwrap();
    let (mut reader, mut writer) = stream.split();
    let send = async {
        for (index, chunk) in data.chunks(256 * 1024).enumerate() {
            writer
                .write_all(chunk)
                .await
                .expect("the pod keeps taking data");
            if index == 8 {
                scenario.agent.kill9();
            }
            sleep(Duration::from_millis(5)).await;
        }
        writer.shutdown().await.unwrap();
    };
    let mut answer = Vec::new();
    let (_, received) = tokio::join!(send, reader.read_to_end(&mut answer));
    received.expect("the pod's answer");
    assert!(
        answer == data,
        "the pod's answer changed when the agent died"
    );
}

/// Mirroring a port that is being stolen copies the stolen connections: the copy
/// shows what the remote clients send, whoever answers them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mirroring_a_stolen_port_copies_the_stolen_connections() {
    let scenario = Scenario::start(1, &[]).await;
    let pod = TcpServer::in_netns(&scenario.pod(0).netns, PORT, servers::echo);
    let stealer = TcpServer::local(servers::echo);
    let _steal = scenario.steal(0, PORT, &stealer).start().await;
    let (local, copies) = recording_local();
    let _mirror = timeout(
        Duration::from_secs(30),
        scenario.mirror(0, PORT, &local).start(),
    )
    .await
    .expect("mirror starts");

    let connections: Vec<(u64, usize)> = (1..=5u64).map(|seed| (seed, 100_000)).collect();
    run_workload(&scenario, &connections).await;
    assert_complete(
        &wait_for_copies(&copies, 5, Duration::from_secs(30)).await,
        &connections,
        "the mirror",
    );
    assert_eq!(stealer.accepted(), 5, "the steal still answered");
    assert_eq!(pod.accepted(), 0, "the pod got nothing while stolen");
}

/// A connection already open when mirroring starts is skipped: its beginning is
/// gone, and a copy starting mid-stream would only confuse the local process.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_open_before_the_mirror_are_skipped() {
    let scenario = Scenario::start(1, &[]).await;
    let _pod = TcpServer::in_netns(&scenario.pod(0).netns, PORT, servers::echo);
    let (local, copies) = recording_local();
    let mut early = scenario
        .node()
        .connect(scenario.pod(0).v4(PORT))
        .await
        .unwrap();
    let _mirror = scenario.mirror(0, PORT, &local).start().await;

    early.write_all(&request(1, 10_000)).await.unwrap();
    early.shutdown().await.unwrap();
    let mut answer = Vec::new();
    early.read_to_end(&mut answer).await.unwrap();
    assert_eq!(
        answer,
        request(1, 10_000),
        "the pod served the early connection"
    );
    run_workload(&scenario, &[(2, 10_000)]).await;
    let copies = wait_for_copies(&copies, 1, Duration::from_secs(30)).await;
    sleep(Duration::from_millis(300)).await;
    assert_complete(&copies, &[(2, 10_000)], "the local process");
}

/// A copy starts with a connection's first data: one that ends, with a FIN or a reset,
/// before sending anything never reaches the local process.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_that_end_before_sending_data_are_not_copied() {
    let scenario = Scenario::start(1, &[]).await;
    let _pod = TcpServer::in_netns(&scenario.pod(0).netns, PORT, servers::echo);
    let (local, copies) = recording_local();
    let _mirror = scenario.mirror(0, PORT, &local).start().await;
    let addr = scenario.pod(0).v4(PORT);

    let mut closed = scenario.node().connect(addr).await.unwrap();
    closed.shutdown().await.unwrap();
    let mut answer = Vec::new();
    closed.read_to_end(&mut answer).await.unwrap();
    assert!(answer.is_empty(), "the pod closed its side too");
    let reset = scenario.node().connect(addr).await.unwrap();
    reset.set_zero_linger().unwrap();
    drop(reset);
    // Captured after both: had either been copied, its copy would have come first.
    run_workload(&scenario, &[(4, 10_000)]).await;
    let copies = wait_for_copies(&copies, 1, Duration::from_secs(30)).await;
    assert_complete(&copies, &[(4, 10_000)], "the local process");
    assert_eq!(local.accepted(), 1, "one local connection");
}

/// The pod may end a connection abortively while the remote client, reset,
/// never sends anything again: the mirror classifier, which sees only what
/// reaches the pod, would see no end. The copy must end with the original
/// rather than hang on until it idles out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_the_pod_resets_ends_its_copy_too() {
    let scenario = Scenario::start(1, &[]).await;
    let _pod = TcpServer::in_netns(
        &scenario.pod(0).netns,
        PORT,
        |mut stream: tokio::net::TcpStream| async move {
            let mut greeting = [0u8; 5];
            let _ = stream.read_exact(&mut greeting).await;
            let _ = stream.set_zero_linger();
        },
    );
    let (ends_tx, mut ends) = tokio::sync::mpsc::unbounded_channel();
    let local = TcpServer::local(move |mut stream: tokio::net::TcpStream| {
        let ends_tx = ends_tx.clone();
        async move {
            let mut received = Vec::new();
            let ended = stream.read_to_end(&mut received).await;
            let _ = ends_tx.send((received, ended.map(|_| ()).map_err(|err| err.kind())));
        }
    });
    let _mirror = scenario.mirror(0, PORT, &local).start().await;

    let mut remote = scenario
        .node()
        .connect(scenario.pod(0).v4(PORT))
        .await
        .unwrap();
    remote.write_all(b"hello").await.unwrap();
    let mut answer = [0u8; 1];
    let reset = timeout(Duration::from_secs(5), remote.read(&mut answer)).await;
    assert!(
        matches!(&reset, Ok(Err(err)) if err.kind() == std::io::ErrorKind::ConnectionReset),
        "the pod resets the remote client: {reset:?}"
    );
    // `remote` stays open and silent from here on.
    let copy = timeout(Duration::from_secs(10), ends.recv()).await;
    let Ok(Some((received, ended))) = copy else {
        panic!("the copy of a connection the pod reset was still open after 10 s");
    };
    assert_eq!(received, b"hello", "the copy holds what the pod received");
    assert_eq!(
        ended,
        Err(std::io::ErrorKind::ConnectionReset),
        "the copy ends in a reset, as the original did"
    );
    drop(remote);
}

/// A local process that stops reading must not grow the agent's memory: past its
/// limit the copy is cut off and reported, while the pod serves the connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_local_process_that_stops_reading_has_its_copy_cut_off() {
    let scenario = Scenario::start_with(1, &[], &["--mirror-flow-limit", "1048576"]).await;
    let _pod = TcpServer::in_netns(&scenario.pod(0).netns, PORT, servers::echo);
    let stalled = TcpServer::local(|stream: tokio::net::TcpStream| async move {
        sleep(Duration::from_secs(60)).await;
        drop(stream);
    });
    let mirror = scenario.mirror(0, PORT, &stalled).start().await;

    run_workload(&scenario, &[(1, 32 << 20)]).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    while !mirror.stderr().contains("cut off") && Instant::now() < deadline {
        sleep(Duration::from_millis(50)).await;
    }
    assert!(
        mirror.stderr().contains("fell") && mirror.stderr().contains("cut off"),
        "remocal reports the slow local process: {}",
        mirror.stderr()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mirror_and_a_steal_on_different_ports_of_one_pod_coexist() {
    let scenario = Scenario::start(1, &[80]).await;
    let _pod = TcpServer::in_netns(&scenario.pod(0).netns, PORT, servers::echo);
    let stealer = TcpServer::local(|s| servers::http(s, "stolen"));
    let _steal = scenario.steal(0, 80, &stealer).start().await;
    let (local, copies) = recording_local();
    let _mirror = scenario.mirror(0, PORT, &local).start().await;

    assert_eq!(scenario.curl(scenario.pod(0).v4(80)).await, "stolen");
    run_workload(&scenario, &[(3, 50_000)]).await;
    assert_complete(
        &wait_for_copies(&copies, 1, Duration::from_secs(30)).await,
        &[(3, 50_000)],
        "the mirror",
    );
    assert_eq!(scenario.curl(scenario.pod(0).v6(80)).await, "stolen");
}

/// Each classifier runs on every packet reaching the pod, so it is attached
/// only while a session of its kind needs it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_classifier_is_attached_only_while_a_session_needs_it() {
    let scenario = Scenario::start(1, &[80]).await;
    let _pod = TcpServer::in_netns(&scenario.pod(0).netns, PORT, servers::echo);
    let stealer = TcpServer::local(|s| servers::http(s, "stolen"));
    let (local, _copies) = recording_local();

    let mut steal = scenario.steal(0, 80, &stealer).start().await;
    assert_classifiers(&scenario, &["remocal_steal"], &[]).await;
    let mut mirror = scenario.mirror(0, PORT, &local).start().await;
    assert_classifiers(
        &scenario,
        &["remocal_mirror", "remocal_steal"],
        &["remocal_pod_rst"],
    )
    .await;
    steal.stop().await;
    assert_classifiers(&scenario, &["remocal_mirror"], &["remocal_pod_rst"]).await;
    run_workload(&scenario, &[(5, 20_000)]).await;
    mirror.stop().await;
    assert_classifiers(&scenario, &[], &[]).await;
}

/// Waits (sessions end asynchronously in the agent) until exactly these are
/// attached to the pod's eth0, on ingress and on egress.
async fn assert_classifiers(scenario: &Scenario, ingress: &[&str], egress: &[&str]) {
    let deadline = Instant::now() + Duration::from_secs(5);
    let expected = (ingress, egress);
    loop {
        let programs = scenario.tcx_programs(0);
        let on = |direction: &str| {
            let mut names: Vec<String> = programs
                .iter()
                .filter(|p| p.interface == "eth0" && p.direction == direction)
                .map(|p| p.name.clone())
                .collect();
            names.sort();
            names
        };
        let attached = (on("ingress"), on("egress"));
        if attached.0 == expected.0 && attached.1 == expected.1 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "expected {expected:?} on the pod's eth0 (ingress, egress), found {attached:?}"
        );
        sleep(Duration::from_millis(50)).await;
    }
}
