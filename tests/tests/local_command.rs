//! `remocal steal ... -- COMMAND`: remocal runs the developer's process,
//! opens the session once it listens, and ends both together. Real
//! processes: the `remocal` CLI, Python servers it starts, the agent.

use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use remocal_tests::processes::{Steal, free_port};
use remocal_tests::scenario::{POD_BODY, Scenario};

const PORT: u16 = 80;

/// A Python HTTP server on 127.0.0.1:PORT answering every GET with its
/// REMOCAL_* environment, `by=local`; with a second argument N it exits
/// with status N after answering its first request.
const SERVER: &str = r#"
import http.server, os, sys
port = int(sys.argv[1])
exit_after = int(sys.argv[2]) if len(sys.argv) > 2 else None
class Answer(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = "by=local target={} port={} mode={}\n".format(
            os.environ.get("REMOCAL_TARGET"), os.environ.get("REMOCAL_PORT"),
            os.environ.get("REMOCAL_MODE")).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
        self.wfile.flush()
        if exit_after is not None:
            os._exit(exit_after)
    def log_message(self, *args):
        pass
http.server.HTTPServer(("127.0.0.1", port), Answer).serve_forever()
"#;

/// `remocal steal --netns <pod 0> --port PORT --local-port LOCAL`.
fn steal(scenario: &Scenario, local: u16) -> Steal {
    Steal::new(&scenario.agent.url())
        .target(&scenario.pod_target(0))
        .port(PORT)
        .local_port(local)
}

/// The same, `-- python3 -c SERVER LOCAL EXTRA...`.
fn steal_running(scenario: &Scenario, local: u16, extra: &[&str]) -> Steal {
    let steal = steal(scenario, local)
        .arg("--")
        .arg("python3")
        .arg("-c")
        .arg(SERVER)
        .arg(local.to_string());
    extra.iter().fold(steal, |steal, arg| steal.arg(arg))
}

#[tokio::test]
async fn the_command_serves_the_stolen_requests_and_knows_its_session() {
    let scenario = Scenario::start(1, &[PORT]).await;
    let local = free_port();
    let mut session = steal_running(&scenario, local, &[]).start().await;
    let pod = scenario.pod(0);
    let netns = pod.netns.path();
    let body = scenario.curl(pod.v4(PORT)).await;
    assert_eq!(
        body,
        format!("by=local target={} port={PORT} mode=steal", netns.display()),
        "{}",
        session.stderr()
    );
    let finished = session.stop().await;
    assert_eq!(
        finished.code,
        Some(143),
        "the command's status after SIGTERM: {finished:?}"
    );
    scenario.assert_pod_answers(0, PORT).await;
}

#[tokio::test]
async fn the_commands_exit_ends_the_session_with_its_status() {
    let scenario = Scenario::start(1, &[PORT]).await;
    let local = free_port();
    let mut session = steal_running(&scenario, local, &["3"]).start().await;
    let body = scenario.curl(scenario.pod(0).v4(PORT)).await;
    assert!(body.starts_with("by=local "), "{body}");
    let finished = session.wait_exit(Duration::from_secs(10)).await;
    assert_eq!(finished.code, Some(3), "{finished:?}");
    assert!(
        finished
            .stderr
            .contains("exited with status 3; the session is closed"),
        "{finished:?}"
    );
    scenario.assert_pod_answers(0, PORT).await;
    assert!(scenario.tcx_programs(0).is_empty(), "nothing left attached");
}

#[tokio::test]
async fn ctrl_c_ends_the_session_then_the_command() {
    let scenario = Scenario::start(1, &[PORT]).await;
    let local = free_port();
    let mut session = steal_running(&scenario, local, &[]).start().await;
    kill(Pid::from_raw(session.pid() as i32), Signal::SIGINT).unwrap();
    let finished = session.wait_exit(Duration::from_secs(15)).await;
    // Python ends on SIGINT with KeyboardInterrupt: status 1, or 130 when
    // killed by the signal; either is the command's own.
    assert!(
        matches!(finished.code, Some(1 | 130)),
        "remocal exits as its command did: {finished:?}"
    );
    scenario.assert_pod_answers(0, PORT).await;
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", local)).is_err(),
        "the command is gone"
    );
}

#[tokio::test]
async fn a_command_that_never_listens_opens_no_session() {
    let scenario = Scenario::start(1, &[PORT]).await;
    let local = free_port();
    let finished = steal(&scenario, local)
        .arg("--listen-timeout")
        .arg("1")
        .arg("--")
        .arg("sleep")
        .arg("30")
        .run_to_exit()
        .await;
    assert_eq!(finished.code, Some(2), "{finished:?}");
    assert!(
        finished.stderr.contains(&format!(
            "sleep did not listen on 127.0.0.1:{local} within 1 s"
        )),
        "{finished:?}"
    );
    assert!(!finished.stdout.contains("ready"), "{finished:?}");
    assert!(scenario.tcx_programs(0).is_empty(), "nothing attached");
    assert_eq!(scenario.curl(scenario.pod(0).v4(PORT)).await, POD_BODY);
}

#[tokio::test]
async fn a_command_that_dies_first_is_reported_with_its_status() {
    let scenario = Scenario::start(1, &[PORT]).await;
    let finished = steal(&scenario, free_port())
        .arg("--")
        .arg("sh")
        .arg("-c")
        .arg("exit 7")
        .run_to_exit()
        .await;
    assert_eq!(finished.code, Some(7), "{finished:?}");
    assert!(
        finished
            .stderr
            .contains("sh exited with status 7 before listening on 127.0.0.1:"),
        "{finished:?}"
    );
    assert!(scenario.tcx_programs(0).is_empty(), "nothing attached");
}

#[tokio::test]
async fn ctrl_c_while_the_command_starts_stops_it_and_opens_nothing() {
    let scenario = Scenario::start(1, &[PORT]).await;
    let pid_file = std::env::temp_dir().join(format!("remocal-cmd-{}", std::process::id()));
    let _ = std::fs::remove_file(&pid_file);
    let script = format!("echo $$ > {}; exec sleep 30", pid_file.display());
    let mut session = steal(&scenario, free_port())
        .arg("--")
        .arg("sh")
        .arg("-c")
        .arg(&script)
        .spawn_running();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let pid = loop {
        if let Some(pid) = std::fs::read_to_string(&pid_file)
            .ok()
            .and_then(|text| text.trim().parse::<i32>().ok())
        {
            break pid;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the command never started"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    kill(Pid::from_raw(session.pid() as i32), Signal::SIGINT).unwrap();
    let finished = session.wait_exit(Duration::from_secs(15)).await;
    let _ = std::fs::remove_file(&pid_file);
    assert_eq!(
        finished.code,
        Some(130),
        "sleep ended by SIGINT: {finished:?}"
    );
    assert!(!finished.stdout.contains("ready"), "{finished:?}");
    assert!(
        !std::path::Path::new(&format!("/proc/{pid}")).exists(),
        "the command is gone"
    );
    assert!(scenario.tcx_programs(0).is_empty(), "nothing attached");
}
