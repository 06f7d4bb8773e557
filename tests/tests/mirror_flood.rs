//! Spoofed traffic against a mirrored port: a SYN alone must never become a copy
//! for the developer, what the agent remembers of such SYNs is bounded and
//! forgotten within seconds, and data held beyond gaps stays within the agent's
//! mirror memory budget.

use std::cell::Cell;
use std::net::SocketAddr;
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use remocal_tests::data::Pattern;
use remocal_tests::netns::Netns;
use remocal_tests::processes::{Agent, Steal, Target, binary, rss_kib};
use remocal_tests::retry::until_ok;
use remocal_tests::scenario::Scenario;
use remocal_tests::servers::{self, TcpServer};
use remocal_tests::syn_flood::{ACK, PSH, SYN, Spoofer};
use remocal_tests::topology::Topology;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::{Instant, sleep};

const PORT: u16 = 7000;
const FLOOD: usize = 100_000;
/// The agent's `MAX_HALF_OPEN` (agent/src/mirror/half_open.rs): the flood fills the
/// session's table of half-open connections exactly this far.
const HALF_OPEN_BOUND: f64 = 8192.0;
/// How far the agent's resident memory may grow above its pre-flood size while the flood
/// is handled. Measured on the 2-core VM (debug build): +11 to +13 MiB at the peak (the
/// table's 4.5 MiB and the captures queued toward the session, which malloc keeps once
/// freed). Before a copy waited for data, the same flood grew the agent by 105 MiB and
/// counted 32,000 mirrored connections.
const RSS_BUDGET_KIB: u64 = 32 * 1024;

/// The developer's process: keeps what each copy delivered.
fn recording_local() -> (TcpServer, Arc<Mutex<Vec<Vec<u8>>>>) {
    servers::recording(|received| received)
}

/// A real connection from the node: sends `data`, half-closes, reads the pod's echo
/// meanwhile (the echo of a large `data` would fill both sockets' buffers otherwise).
async fn exchange(node: &Netns, addr: SocketAddr, data: &[u8]) {
    let mut stream = node.connect(addr).await.expect("connect to the pod");
    let (mut reader, mut writer) = stream.split();
    let send = async {
        writer.write_all(data).await.expect("send to the pod");
        writer.shutdown().await.expect("half-close");
    };
    let mut answer = Vec::new();
    let (_, received) = tokio::join!(send, reader.read_to_end(&mut answer));
    received.expect("the pod's answer");
    assert!(answer == data, "the pod's answer changed");
}

/// Waits until the local process holds `count` finished copies; returns them.
async fn copies(copies: &Arc<Mutex<Vec<Vec<u8>>>>, count: usize) -> Vec<Vec<u8>> {
    let deadline = Instant::now() + Duration::from_secs(30);
    until_ok(deadline, Duration::from_millis(50), || async {
        let seen = copies.lock().unwrap().clone();
        if seen.len() >= count {
            Ok(seen)
        } else {
            Err(seen.len())
        }
    })
    .await
    .unwrap_or_else(|seen| panic!("{seen} of {count} copies reached the local process"))
}

/// The highest resident memory of `pid` seen until dropped, sampled every 10 ms.
struct PeakRss {
    peak: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl PeakRss {
    fn watch(pid: u32) -> PeakRss {
        let peak = Arc::new(AtomicU64::new(rss_kib(pid)));
        let seen = peak.clone();
        let task = tokio::spawn(async move {
            loop {
                seen.fetch_max(rss_kib(pid), Ordering::Relaxed);
                sleep(Duration::from_millis(10)).await;
            }
        });
        PeakRss { peak, task }
    }

    fn kib(&self) -> u64 {
        self.peak.load(Ordering::Relaxed)
    }
}

impl Drop for PeakRss {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The pod's kernel answers a SYN with a SYN-ACK to its source, here a spoofed one.
/// Neither the pod nor the node has a route beyond the test's own subnets, so no such
/// answer can leave the pod's namespace, let alone reach the host.
fn assert_no_default_route(netns: &Netns) {
    for family in ["-4", "-6"] {
        let out = Command::new("ip")
            .args([family, "-n", netns.name(), "route", "show", "default"])
            .output()
            .expect("run ip");
        assert!(
            out.status.success() && out.stdout.is_empty(),
            "{} must have no default route: {}",
            netns.name(),
            String::from_utf8_lossy(&out.stdout)
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spoofed_syn_flood_is_not_mirrored_and_its_memory_is_bounded() {
    let scenario = Scenario::start(1, &[]).await;
    assert_no_default_route(scenario.node());
    assert_no_default_route(&scenario.pod(0).netns);
    let _pod = TcpServer::in_netns(&scenario.pod(0).netns, PORT, servers::echo);
    let (local, copied) = recording_local();
    let _mirror = scenario.mirror(0, PORT, &local).start().await;
    let addr = scenario.pod(0).v4(PORT);
    let SocketAddr::V4(target) = addr else {
        unreachable!("v4")
    };
    const MIRRORED: &str = "remocal_connections_total{mode=\"mirror\"}";
    const HALF_OPEN: &str = "remocal_mirror_half_open";

    // One real copy first, so the agent has done its usual work once before it is
    // measured.
    let first = Pattern::new(1).take(10_000);
    exchange(scenario.node(), addr, &first).await;
    assert!(copies(&copied, 1).await[0] == first, "the first copy");
    assert_eq!(scenario.agent.metric(MIRRORED).await, 1.0);

    let pid = scenario.agent.pid();
    let before = rss_kib(pid);
    let peak = PeakRss::watch(pid);
    let mut spoofer = Spoofer::new(scenario.node(), target, 7).expect("a raw socket");
    let flood = tokio::task::spawn_blocking(move || spoofer.syn_flood(FLOOD));

    // The SYNs reach the session, whose table fills to its bound and no further.
    let highest = Cell::new(0.0f64);
    let half_open = || async {
        let half_open = scenario.agent.metric(HALF_OPEN).await;
        highest.set(highest.get().max(half_open));
        half_open
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    let filled = until_ok(deadline, Duration::from_millis(50), || async {
        let now = half_open().await;
        if now >= HALF_OPEN_BOUND {
            Ok(())
        } else {
            Err(now)
        }
    })
    .await;
    flood
        .await
        .expect("the flood's thread")
        .expect("send the flood");
    let flooded = Instant::now();
    assert!(filled.is_ok(), "half-open connections: {filled:?}");

    // Then forgets them within seconds.
    let deadline = flooded + Duration::from_secs(30);
    let emptied = until_ok(deadline, Duration::from_millis(100), || async {
        let now = half_open().await;
        if now == 0.0 { Ok(()) } else { Err(now) }
    })
    .await;
    let forgotten_after = flooded.elapsed();
    assert!(
        emptied.is_ok(),
        "half-open connections left 30 s after the flood: {emptied:?}"
    );
    assert_eq!(highest.get(), HALF_OPEN_BOUND, "never more than the bound");

    let grown = peak.kib().saturating_sub(before);
    eprintln!(
        "agent RSS: {before} KiB before the flood, {} KiB at its peak (+{grown} KiB), {} KiB after; half-open connections forgotten {forgotten_after:?} after the flood",
        peak.kib(),
        rss_kib(pid)
    );
    assert!(
        grown <= RSS_BUDGET_KIB,
        "the flood grew the agent by {grown} KiB (from {before} KiB), more than {RSS_BUDGET_KIB} KiB"
    );
    assert_eq!(
        scenario.agent.metric(MIRRORED).await,
        1.0,
        "no SYN was counted as a mirrored connection"
    );
    assert_eq!(local.accepted(), 1, "no SYN reached the local process");

    // A real connection after the flood is copied, byte-exact.
    let second = Pattern::new(2).take(100_000);
    exchange(scenario.node(), addr, &second).await;
    let copies = copies(&copied, 2).await;
    assert!(copies[1] == second, "the copy after the flood");
    assert_eq!(scenario.agent.metric(MIRRORED).await, 2.0);
    assert_eq!(local.accepted(), 2);
}

/// A spoofer who follows each SYN with a data segment (no handshake needed: the mirror
/// sees the pod's ingress, not its sockets) does start copies, but a session copies at
/// most `MAX_COPIES` connections at once: beyond it connections are counted, not copied,
/// and the developer is told once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spoofed_connections_with_data_are_copied_only_up_to_the_sessions_bound() {
    /// The agent's `MAX_COPIES` (agent/src/mirror/session.rs).
    const COPIES_BOUND: usize = 4096;
    const NOT_COPIED: usize = 500;
    const SPOOFED: usize = COPIES_BOUND + NOT_COPIED;
    let scenario = Scenario::start(1, &[]).await;
    assert_no_default_route(scenario.node());
    assert_no_default_route(&scenario.pod(0).netns);
    let _pod = TcpServer::in_netns(&scenario.pod(0).netns, PORT, servers::echo);
    let (local, _copied) = recording_local();
    let mirror = scenario.mirror(0, PORT, &local).start().await;
    let SocketAddr::V4(target) = scenario.pod(0).v4(PORT) else {
        unreachable!("v4")
    };
    let pid = scenario.agent.pid();
    let before = rss_kib(pid);

    let mut spoofer = Spoofer::new(scenario.node(), target, 11).expect("a raw socket");
    tokio::task::spawn_blocking(move || {
        for _ in 0..SPOOFED {
            let source = spoofer.random_source();
            let isn = spoofer.random_seq();
            spoofer.send(source, isn, SYN, &[])?;
            spoofer.send(
                source,
                isn.wrapping_add(1),
                PSH | ACK,
                b"GET / HTTP/1.1\r\n\r\n",
            )?;
        }
        std::io::Result::Ok(())
    })
    .await
    .expect("the spoofer's thread")
    .expect("send the spoofed connections");

    let warning = format!("{COPIES_BOUND} connections are being copied");
    let deadline = Instant::now() + Duration::from_secs(60);
    let counted = until_ok(deadline, Duration::from_millis(100), || async {
        let copied = scenario
            .agent
            .metric("remocal_connections_total{mode=\"mirror\"}")
            .await;
        let not_copied = scenario
            .agent
            .metric("remocal_mirror_not_copied_total")
            .await;
        let accepted = local.accepted();
        let warned = mirror.stderr().contains(&warning);
        let seen = (copied, not_copied, accepted, warned);
        let expected = (COPIES_BOUND as f64, NOT_COPIED as f64, COPIES_BOUND, true);
        if seen == expected { Ok(()) } else { Err(seen) }
    })
    .await;
    assert!(
        counted.is_ok(),
        "(copied, not copied, local connections, warned): {counted:?}\n{}",
        mirror.stderr()
    );
    eprintln!(
        "agent RSS: {before} KiB before, {} KiB with {COPIES_BOUND} copies",
        rss_kib(pid)
    );
    let warnings = mirror.stderr().matches(&warning).count();
    assert_eq!(warnings, 1, "one warning: {}", mirror.stderr());
}

/// Connections that send data after a 1-byte gap make the agent hold that data until the
/// gap fills, which it never does. Each copy stays under --mirror-flow-limit (32 MiB) and
/// the 16 MiB the agent holds ahead of a gap, but together they pass the agent's mirror
/// memory budget (lowered to 16 MiB here through `REMOCAL_MIRROR_BUDGET`): the copies
/// holding the most are cut off, what the agent holds stays within the budget, and a real
/// connection afterwards is still copied byte-exact. Before the budget, the 96 MiB sent
/// here were all held (and 16 such connections at the flow limit exceeded the DaemonSet's
/// 512 MiB).
///
/// The connections come from spoofed sources (as in the tests above): the mirror sees the
/// pod's ingress, so a SYN and data segments are a connection to it whether or not the
/// pod's kernel completed a handshake, and no answer of the pod can leave its namespace
/// (a reset reaching the pod's egress would end the copy as the original's end).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_held_beyond_gaps_stays_within_the_agents_mirror_budget() {
    const BUDGET: usize = 16 << 20;
    const CONNECTIONS: usize = 8;
    const PER_CONNECTION: usize = 12 << 20;
    /// A segment's payload: the packet fits the veth's 1500-byte MTU.
    const SEGMENT: usize = 1400;
    /// One capture may pass the budget before the copy holding the most is cut.
    const HELD_BOUND: f64 = (BUDGET + 64 * 1024) as f64;
    /// Growth of the agent's resident memory allowed beyond the budget: the captures in
    /// flight and what malloc keeps of freed copies. Measured on the 2-core VM (debug
    /// build): +16 MiB at the peak; with a 1 GiB budget the same attack took +104 MiB.
    const RSS_MARGIN_KIB: u64 = 24 * 1024;
    const HELD: &str = "remocal_mirror_held_bytes";

    // Field order is drop order: the agent detaches before the namespaces go away.
    let topology = Topology::new(1);
    let mut agent = std::process::Command::new(binary("remocal-agent"));
    agent
        .args(Agent::LISTEN_ARGS)
        .env("REMOCAL_MIRROR_BUDGET", BUDGET.to_string());
    let agent = Agent::start_command(agent).await;
    let pod = topology.pod(0);
    assert_no_default_route(&topology.node);
    assert_no_default_route(&pod.netns);
    let _pod = TcpServer::in_netns(&pod.netns, PORT, servers::echo);
    let (local, copied) = recording_local();
    let mirror = Steal::mirror(&agent.url())
        .target(&Target::Netns(pod.netns.path()))
        .port(PORT)
        .local_port(local.port())
        .start()
        .await;
    let addr = pod.v4(PORT);
    let SocketAddr::V4(target) = addr else {
        unreachable!("v4")
    };

    // One real copy first, so the agent has done its usual work once before it is
    // measured.
    let first = Pattern::new(1).take(10_000);
    exchange(&topology.node, addr, &first).await;
    assert!(copies(&copied, 1).await[0] == first, "the first copy");

    let pid = agent.pid();
    let before = rss_kib(pid);
    let peak = PeakRss::watch(pid);
    let mut spoofer = Spoofer::new(&topology.node, target, 13).expect("a raw socket");
    let attack = tokio::task::spawn_blocking(move || {
        let payload = Pattern::new(2).take(SEGMENT);
        let connections: Vec<_> = (0..CONNECTIONS)
            .map(|_| (spoofer.random_source(), spoofer.random_seq()))
            .collect();
        for &(source, isn) in &connections {
            spoofer.send(source, isn, SYN, &[])?;
        }
        // The copies grow side by side, past a missing first byte (sequence isn + 1).
        for (round, offset) in (0..PER_CONNECTION).step_by(SEGMENT).enumerate() {
            for &(source, isn) in &connections {
                let seq = isn.wrapping_add(2).wrapping_add(offset as u32);
                spoofer.send(source, seq, PSH | ACK, &payload)?;
            }
            // Paced so the capture ring never overruns: a loss would cut these copies
            // for a reason of its own.
            if round % 64 == 63 {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        std::io::Result::Ok(())
    });
    let mut held_peak = 0.0f64;
    while !attack.is_finished() {
        held_peak = held_peak.max(agent.metric(HELD).await);
        sleep(Duration::from_millis(20)).await;
    }
    attack
        .await
        .expect("the spoofer's thread")
        .expect("send the segments");
    // Until the agent has taken every capture: what it holds stops changing.
    let mut last = f64::NAN;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let held = agent.metric(HELD).await;
        held_peak = held_peak.max(held);
        if held == last || Instant::now() > deadline {
            break;
        }
        last = held;
        sleep(Duration::from_millis(500)).await;
    }

    let grown = peak.kib().saturating_sub(before);
    let stderr = mirror.stderr();
    let budget_cuts = stderr.matches("mirror memory budget").count();
    eprintln!(
        "agent RSS: {before} KiB before, {} KiB at the peak (+{grown} KiB), {} KiB after; held at most {held_peak} bytes, {last} at the end; {budget_cuts} copies cut for the budget",
        peak.kib(),
        rss_kib(pid)
    );
    assert!(
        !stderr.contains("not captured"),
        "the capture ring overran: pace the segments more\n{stderr}"
    );
    assert!(
        held_peak <= HELD_BOUND,
        "the agent held {held_peak} bytes, more than its budget of {BUDGET}"
    );
    // At most one copy of 12 MiB fits in 16 MiB.
    assert!(
        budget_cuts >= CONNECTIONS - 1,
        "{budget_cuts} copies cut for the budget:\n{stderr}"
    );
    let allowed = (BUDGET / 1024) as u64 + RSS_MARGIN_KIB;
    assert!(
        grown <= allowed,
        "the agent grew by {grown} KiB (from {before} KiB), more than {allowed} KiB"
    );

    // A real connection afterwards is copied, byte-exact. Its copy holds less than the
    // one the attack left behind: if it takes the total past the budget, that one goes.
    let second = Pattern::new(3).take(4 << 20);
    exchange(&topology.node, addr, &second).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    let copied = until_ok(deadline, Duration::from_millis(50), || async {
        let seen = copied.lock().unwrap();
        if seen.contains(&second) {
            Ok(())
        } else {
            Err(seen.iter().map(Vec::len).collect::<Vec<_>>())
        }
    })
    .await;
    assert!(
        copied.is_ok(),
        "no exact copy of the real connection; copies of {copied:?} bytes\n{}",
        mirror.stderr()
    );
    assert!(
        agent.metric(HELD).await <= HELD_BOUND,
        "within the budget afterwards"
    );
}
