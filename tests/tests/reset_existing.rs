//! Clients already connected: `--reset-existing` ends the pod's idle
//! keep-alive connections to the stolen port, so their clients reconnect
//! into the steal. Real clients (Python's http.client), the real agent and
//! its kernel side, the real `remocal` CLI.

use std::net::SocketAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use remocal_tests::http_servers::{Answer, HttpServer};
use remocal_tests::netns::Netns;
use remocal_tests::scenario::Scenario;
use tokio::process::Child;

const PORT: u16 = 80;

/// A node with one pod whose own server (named `pod`) answers on PORT.
struct Pod {
    _server: HttpServer,
    scenario: Scenario,
}

impl Pod {
    async fn start() -> Pod {
        let scenario = Scenario::start(1, &[]).await;
        let server = HttpServer::in_netns(&scenario.pod(0).netns, PORT, "pod");
        Pod {
            _server: server,
            scenario,
        }
    }

    fn node(&self) -> &Netns {
        self.scenario.node()
    }

    fn addr(&self) -> SocketAddr {
        self.scenario.pod(0).v4(PORT)
    }
}

/// What the polling client printed for one request.
#[derive(Debug)]
struct Poll {
    at: f64,
    connection: u64,
    by: Option<String>,
}

/// `polling_client.py` on the node, polling `addr` every `interval_ms` for
/// `seconds`, with `x-dev: DEV` when given.
fn polling_client(node: &Netns, addr: SocketAddr, interval_ms: u32, seconds: f64, dev: Option<&str>) -> Child {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/polling_client.py");
    let mut command = node.tokio_command("python3");
    command
        .arg(script)
        .arg(addr.ip().to_string())
        .arg(addr.port().to_string())
        .arg(interval_ms.to_string())
        .arg(seconds.to_string());
    if let Some(dev) = dev {
        command.arg(dev);
    }
    command
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("start python3")
}

async fn polls(client: Child) -> Vec<Poll> {
    let output = tokio::time::timeout(Duration::from_secs(60), client.wait_with_output())
        .await
        .expect("the polling client ends")
        .expect("the polling client ran");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "polling client failed: {stderr}");
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(|line| {
            let line: serde_json::Value = serde_json::from_str(line).expect("a JSON line");
            Poll {
                at: line["t"].as_f64().unwrap(),
                connection: line["connection"].as_u64().unwrap(),
                by: line["body"].as_str().map(|body| Answer::expect(body).by),
            }
        })
        .collect()
}

fn now() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs_f64()
}

#[tokio::test]
async fn a_keepalive_client_connected_before_the_steal_reaches_it_within_a_second() {
    let pod = Pod::start().await;
    let local = HttpServer::local("local");
    let client = polling_client(pod.node(), pod.addr(), 50, 4.0, None);
    tokio::time::sleep(Duration::from_millis(700)).await;

    let mut session = pod
        .scenario
        .steal(0, PORT, &local.server)
        .arg("--reset-existing")
        .start()
        .await;
    let ready = now();
    assert!(
        session.ready_line().contains("reset: ended="),
        "{}",
        session.ready_line()
    );
    let polls = polls(client).await;
    let before: Vec<_> = polls.iter().filter(|poll| poll.at < ready - 0.1).collect();
    assert!(
        before.iter().all(|poll| poll.connection == 1 && poll.by.as_deref() == Some("pod")),
        "{before:?}"
    );
    let first_stolen = polls
        .iter()
        .find(|poll| poll.by.as_deref() == Some("local"))
        .unwrap_or_else(|| panic!("no request reached the local process: {polls:?}\n{}", session.stderr()));
    assert!(
        first_stolen.at - ready <= 1.0,
        "first stolen request {:.3} s after ready: {polls:?}",
        first_stolen.at - ready
    );
    let finished = session.stop().await;
    let reported_done = finished
        .stdout
        .lines()
        .any(|line| (line.starts_with("ready") || line.starts_with("reset")) && line.contains("ended=1 waiting=0 done"));
    assert!(reported_done, "{}", finished.stdout);
}
