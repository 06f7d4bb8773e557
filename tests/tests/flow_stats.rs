//! The kernel's TCP statistics of stolen connections (TCP_INFO of the agent's
//! socket), as a developer sees them with `remocal steal -v` when a
//! connection closes.

use std::time::Duration;

use remocal_tests::scenario::Scenario;
use remocal_tests::servers::{self, TcpServer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::{Instant, sleep};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_stolen_connection_reports_its_rtt_and_bytes() {
    let scenario = Scenario::start(1, &[80]).await;
    let local = TcpServer::local(servers::reverse_after_eof);
    let session = scenario.steal(0, 80, &local).arg("-v").start().await;

    let request = exchange(&scenario, 80).await;

    let closed = closed_line(&session).await;
    let field = |name: &str| field(&closed, name);
    assert!(field("rtt") > 0, "a measured RTT: {closed}");
    assert_eq!(
        field("received"),
        request.len() as u64,
        "bytes received from the remote: {closed}"
    );
    // The last acknowledgements may still be in flight when the agent closes
    // the socket and reads the statistics: acked is a lower bound.
    let acked = field("acked");
    assert!(
        acked > 0 && acked <= request.len() as u64,
        "bytes the remote acknowledged: {closed}"
    );
}

/// A mirrored connection is the pod's own socket: its statistics come from
/// the sock_ops program, attached while the namespace has a mirror.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_mirrored_connection_reports_its_rtt_and_bytes() {
    let scenario = Scenario::start(1, &[]).await;
    let _pod = TcpServer::in_netns(&scenario.pod(0).netns, 7000, servers::reverse_after_eof);
    let local = TcpServer::local(servers::reverse_after_eof);
    let session = scenario.mirror(0, 7000, &local).arg("-v").start().await;

    let request = exchange(&scenario, 7000).await;

    let closed = closed_line(&session).await;
    assert!(field(&closed, "rtt") > 0, "a measured RTT: {closed}");
    assert_eq!(
        field(&closed, "received"),
        request.len() as u64,
        "bytes the pod received from the remote: {closed}"
    );
}

/// One connection from the node to the pod's `port`: 100,000 bytes, a FIN,
/// and the whole answer read (the servers here answer the reversed bytes).
async fn exchange(scenario: &Scenario, port: u16) -> Vec<u8> {
    let request = vec![42u8; 100_000];
    let mut stream = scenario
        .node()
        .connect(scenario.pod(0).v4(port))
        .await
        .unwrap();
    stream.write_all(&request).await.unwrap();
    stream.shutdown().await.unwrap();
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).await.unwrap();
    assert_eq!(answer.len(), request.len(), "the whole answer");
    request
}

/// The first `closed ...` line the session prints, within 10 s.
async fn closed_line(session: &remocal_tests::processes::Client) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(line) = session
            .stdout()
            .lines()
            .find(|line| line.starts_with("closed "))
        {
            return line.to_string();
        }
        assert!(
            Instant::now() < deadline,
            "no `closed` line: {}",
            session.stdout()
        );
        sleep(Duration::from_millis(50)).await;
    }
}

/// The number in `name=NUMBER[unit]` of a `closed` line.
fn field(closed: &str, name: &str) -> u64 {
    closed
        .split_whitespace()
        .find_map(|part| part.strip_prefix(&format!("{name}=")))
        .and_then(|value| {
            value
                .trim_end_matches(|c: char| c.is_ascii_alphabetic())
                .parse()
                .ok()
        })
        .unwrap_or_else(|| panic!("no {name}= in `{closed}`"))
}
