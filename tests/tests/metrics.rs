//! What operators see: the agent's `/metrics`, checked by Prometheus's own tools.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use remocal_tests::processes::free_port;
use remocal_tests::retry::until_ok;
use remocal_tests::scenario::Scenario;
use remocal_tests::servers::{self, TcpServer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::{Instant, sleep};

const LOCAL_BODY: &str = "local";
const MIRRORED: u16 = 7000;

fn http_get(addr: SocketAddr, path: &str) -> (bool, String) {
    let out = Command::new("curl")
        .args(["--silent", "--show-error", "--fail", "--max-time", "5"])
        .arg(format!("http://{addr}{path}"))
        .output()
        .expect("run curl");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

/// Steals three HTTP connections and mirrors two uploads of known size.
async fn known_traffic(scenario: &Scenario) -> (usize, usize, u64) {
    let local = TcpServer::local(|s| servers::http(s, LOCAL_BODY));
    let mut steal = scenario.steal(0, 80, &local).start().await;
    for _ in 0..3 {
        assert_eq!(scenario.curl(scenario.pod(0).v4(80)).await, LOCAL_BODY);
    }
    steal.stop().await;

    let _pod = TcpServer::in_netns(&scenario.pod(0).netns, MIRRORED, servers::echo);
    let sink = TcpServer::local(|mut s: tokio::net::TcpStream| async move {
        let mut data = Vec::new();
        let _ = s.read_to_end(&mut data).await;
    });
    let mut mirror = scenario.mirror(0, MIRRORED, &sink).start().await;
    let upload = vec![7u8; 100_000];
    for _ in 0..2 {
        let mut stream = scenario
            .node()
            .connect(scenario.pod(0).v4(MIRRORED))
            .await
            .unwrap();
        stream.write_all(&upload).await.unwrap();
        stream.shutdown().await.unwrap();
        let mut echo = Vec::new();
        stream.read_to_end(&mut echo).await.unwrap();
        assert_eq!(echo.len(), upload.len());
    }
    let (stolen, mirrored, mirrored_bytes) = (3, 2, 2 * upload.len() as u64);
    // The copies are counted when they end, after the remote client saw its
    // echo: stopping the mirror before would cut them short.
    let metrics = scenario.agent.metrics_addr();
    metrics_showing(metrics, &counted(stolen, mirrored, mirrored_bytes)).await;
    mirror.stop().await;
    (stolen, mirrored, mirrored_bytes)
}

/// The counter lines `known_traffic` leaves in `/metrics`.
fn counted(stolen: usize, mirrored: usize, mirrored_bytes: u64) -> Vec<String> {
    vec![
        format!("remocal_connections_total{{mode=\"steal\"}} {stolen}"),
        format!("remocal_connections_total{{mode=\"mirror\"}} {mirrored}"),
        format!(
            "remocal_bytes_total{{mode=\"mirror\",direction=\"from_remote\"}} {mirrored_bytes}"
        ),
        format!(
            "remocal_ebpf_packets_total{{program=\"remocal_steal\",verdict=\"redirected\"}} {stolen}"
        ),
    ]
}

/// Polls `/metrics` until it has every one of `lines` (the agent updates them
/// as connections and sessions end, a moment after their clients see the
/// end), and returns that body.
async fn metrics_showing(metrics: SocketAddr, lines: &[String]) -> String {
    let seen = until_ok(
        Instant::now() + Duration::from_secs(30),
        Duration::from_millis(100),
        async || {
            let (ok, body) = http_get(metrics, "/metrics");
            let missing: Vec<_> = lines
                .iter()
                .filter(|line| !body.lines().any(|l| l == line.as_str()))
                .collect();
            if ok && missing.is_empty() {
                Ok(body)
            } else {
                Err(format!("missing {missing:?} in\n{body}"))
            }
        },
    )
    .await;
    seen.unwrap_or_else(|err| panic!("GET /metrics: {err}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn promtool_accepts_the_metrics_and_they_count_known_traffic() {
    let scenario = Scenario::start(1, &[80]).await;
    let metrics = scenario.agent.metrics_addr();
    assert!(http_get(metrics, "/healthz").0, "/healthz answers");
    assert!(http_get(metrics, "/readyz").0, "/readyz answers");
    let (stolen, mirrored, mirrored_bytes) = known_traffic(&scenario).await;

    let mut expected = counted(stolen, mirrored, mirrored_bytes);
    expected.extend([
        "remocal_sessions_active{mode=\"steal\"} 0".to_string(),
        "remocal_connections_active{mode=\"steal\"} 0".to_string(),
        format!(
            "remocal_build_info{{version=\"{}\"}} 1",
            env!("CARGO_PKG_VERSION")
        ),
    ]);
    let body = metrics_showing(metrics, &expected).await;
    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run promtool (cargo xtask setup installs prometheus)");
    use std::io::Write as _;
    promtool
        .stdin
        .take()
        .unwrap()
        .write_all(body.as_bytes())
        .unwrap();
    let checked = promtool.wait_with_output().unwrap();
    assert!(
        checked.status.success(),
        "promtool check metrics: {}{}\n{body}",
        String::from_utf8_lossy(&checked.stdout),
        String::from_utf8_lossy(&checked.stderr)
    );
}

/// A real Prometheus server scrapes the agent during the traffic; its query API
/// returns the counts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_scrapes_the_agent_and_its_queries_see_the_traffic() {
    let scenario = Scenario::start(1, &[80]).await;
    let prometheus = Prometheus::start(scenario.agent.metrics_addr());
    let (stolen, mirrored, mirrored_bytes) = known_traffic(&scenario).await;

    let expectations = [
        ("remocal_connections_total{mode=\"steal\"}", stolen as f64),
        (
            "remocal_connections_total{mode=\"mirror\"}",
            mirrored as f64,
        ),
        (
            "remocal_bytes_total{mode=\"mirror\",direction=\"from_remote\"}",
            mirrored_bytes as f64,
        ),
    ];
    for (query, expected) in expectations {
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut last = None;
        while Instant::now() < deadline {
            last = prometheus.query(query);
            if last == Some(expected) {
                break;
            }
            sleep(Duration::from_millis(250)).await;
        }
        assert_eq!(last, Some(expected), "Prometheus query {query}");
    }
}

/// Debian's prometheus, scraping one target every second, in a temporary directory.
struct Prometheus {
    child: Child,
    addr: SocketAddr,
    dir: PathBuf,
}

impl Prometheus {
    fn start(target: SocketAddr) -> Prometheus {
        let dir = std::env::temp_dir().join(format!(
            "remocal-prometheus-{}-{}",
            std::process::id(),
            free_port()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let config = dir.join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: remocal\n    static_configs:\n      - targets: ['{target}']\n"
            ),
        )
        .unwrap();
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("run prometheus (cargo xtask setup installs it)");
        Prometheus { child, addr, dir }
    }

    /// The value of an instant query with one result, if Prometheus has it.
    fn query(&self, query: &str) -> Option<f64> {
        let out = Command::new("curl")
            .args(["--silent", "--fail", "--max-time", "5", "--get"])
            .arg("--data-urlencode")
            .arg(format!("query={query}"))
            .arg(format!("http://{}/api/v1/query", self.addr))
            .output()
            .ok()?;
        let answer: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        let value = answer["data"]["result"].get(0)?["value"][1].as_str()?;
        value.parse().ok()
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
