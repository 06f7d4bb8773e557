//! Each way a `remocal steal` can be refused: the exit code and message the user gets,
//! and that a refused steal leaves the pod exactly as it was.

use remocal_tests::processes::{Finished, Steal, Target, free_port};
use remocal_tests::scenario::Scenario;
use remocal_tests::servers::{self, TcpServer};

const LOCAL_BODY: &str = "local";

/// A refusal: the expected exit code and an `error:` line.
fn assert_refused(finished: &Finished, code: i32) {
    assert_eq!(finished.code, Some(code), "exit code; {finished:#?}");
    assert!(
        finished
            .stderr
            .lines()
            .any(|line| line.starts_with("error:")),
        "expected a line starting with `error:` on stderr; {finished:#?}"
    );
    assert!(
        !finished
            .stdout
            .lines()
            .any(|line| line.starts_with("ready")),
        "a refused steal must not claim to be ready; {finished:#?}"
    );
}

/// Nothing of the refused steal is left: the pod's own process still answers the port
/// and no program is attached to the pod.
async fn assert_untouched(scenario: &Scenario, port: u16) {
    scenario.assert_pod_answers(0, port).await;
    scenario.assert_nothing_attached(0);
}

async fn refused_port(port: &str) {
    let scenario = Scenario::start(1, &[80]).await;
    let local = TcpServer::local(|s| servers::http(s, LOCAL_BODY));
    let finished = Steal::new(&scenario.agent.url())
        .target(&scenario.pod_target(0))
        .port(port)
        .local_port(local.port())
        .run_to_exit()
        .await;
    assert_refused(&finished, 2);
    assert!(
        finished.stderr.contains("port"),
        "the message should name --port; {finished:#?}"
    );
    assert_untouched(&scenario, 80).await;
    assert_eq!(local.accepted(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn port_0_is_a_usage_error() {
    refused_port("0").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn port_65536_is_a_usage_error() {
    refused_port("65536").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_steal_without_a_target_is_a_usage_error() {
    let scenario = Scenario::start(1, &[80]).await;
    let finished = Steal::new(&scenario.agent.url())
        .port(80)
        .run_to_exit()
        .await;
    assert_refused(&finished, 2);
    assert_untouched(&scenario, 80).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_netns_path_is_target_not_found() {
    let scenario = Scenario::start(1, &[80]).await;
    let missing = format!("/var/run/netns/{}-missing", scenario.pod(0).netns.name());
    let target = Target::Netns(missing.clone().into());
    refused_steal(&scenario, &scenario.agent.url(), &target, 4, &missing).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_pid_is_target_not_found() {
    let scenario = Scenario::start(1, &[80]).await;
    let pid = unused_pid();
    refused_steal(
        &scenario,
        &scenario.agent.url(),
        &Target::Pid(pid),
        4,
        &pid.to_string(),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_agent_is_reported_with_its_address() {
    let scenario = Scenario::start(1, &[80]).await;
    let nobody = format!("127.0.0.1:{}", free_port());
    let target = scenario.pod_target(0);
    refused_steal(&scenario, &format!("http://{nobody}"), &target, 3, &nobody).await;
}

/// A steal that must be refused with `code`, its message naming `named`, and
/// leave the pod's port untouched.
async fn refused_steal(scenario: &Scenario, agent: &str, target: &Target, code: i32, named: &str) {
    let local = TcpServer::local(|s| servers::http(s, LOCAL_BODY));
    let finished = Steal::new(agent)
        .target(target)
        .port(80)
        .local_port(local.port())
        .run_to_exit()
        .await;
    assert_refused(&finished, code);
    assert!(
        finished.stderr.contains(named),
        "the message should name {named}; {finished:#?}"
    );
    assert_untouched(scenario, 80).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_steal_of_the_same_port_is_a_conflict_and_leaves_the_first_alone() {
    let scenario = Scenario::start(1, &[80]).await;
    let first_local = TcpServer::local(|s| servers::http(s, "first"));
    let second_local = TcpServer::local(|s| servers::http(s, "second"));
    let mut first = scenario.steal(0, 80, &first_local).start().await;
    assert_eq!(scenario.curl(scenario.pod(0).v4(80)).await, "first");

    let finished = scenario.steal(0, 80, &second_local).run_to_exit().await;
    assert_refused(&finished, 5);
    let message = finished.stderr.to_lowercase();
    let holder_named = message.contains(&first.pid().to_string())
        || ["held by", "holder", "owned by", "in use by", "used by"]
            .iter()
            .any(|phrase| message.contains(phrase));
    assert!(
        holder_named,
        "the message should name who holds the port (first session: pid {}); {finished:#?}",
        first.pid()
    );

    for addr in scenario.pod(0).addrs(80) {
        assert_eq!(
            scenario.curl(addr).await,
            "first",
            "the first session still steals {addr}"
        );
    }
    assert_eq!(second_local.accepted(), 0);
    assert_eq!(scenario.pod_server(0, 80).accepted(), 0);

    let ended = first.stop().await;
    assert_eq!(ended.code, Some(0), "{ended:?}");
    assert_untouched(&scenario, 80).await;
}

/// A PID no process has right now, counting down from the top of the PID space where
/// the kernel rarely is.
fn unused_pid() -> u32 {
    let max: u32 = std::fs::read_to_string("/proc/sys/kernel/pid_max")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(32768);
    (2..max)
        .rev()
        .find(|pid| !std::path::Path::new(&format!("/proc/{pid}")).exists())
        .expect("an unused pid")
}
