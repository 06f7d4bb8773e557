//! What is left when a side of a steal dies without cleaning up: the pod must get its
//! traffic back, within the bounds the issue sets, with no program left attached.

use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use remocal_tests::bpf;
use remocal_tests::processes::Client;
use remocal_tests::remote::http_get;
use remocal_tests::retry::until_ok;
use remocal_tests::scenario::{POD_BODY, STEAL_PROGRAM, Scenario};
use remocal_tests::servers::{self, TcpServer};
use tokio::time::Instant;

const LOCAL_BODY: &str = "local";

/// One attempt to see the pod's own process answer a new connection, within `limit`.
async fn pod_answers(scenario: &Scenario, limit: Duration) -> Result<(), String> {
    let addr = scenario.pod(0).v4(80);
    match http_get(scenario.node(), addr, limit).await {
        Ok(body) if body == POD_BODY => Ok(()),
        Ok(body) => Err(format!("{addr} answered {body:?}")),
        Err(e) => Err(format!("{addr}: {e}")),
    }
}

fn nothing_attached(scenario: &Scenario) -> Result<(), String> {
    match scenario.tcx_programs(0) {
        programs if programs.is_empty() => Ok(()),
        programs => Err(format!("still attached: {}", bpf::describe(&programs))),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_kill_9_of_the_agent_the_pod_answers_within_one_second() {
    let mut scenario = Scenario::start(1, &[80]).await;
    let local = TcpServer::local(|s| servers::http(s, LOCAL_BODY));
    let mut session = stealing(&scenario, &local).await;

    scenario.agent.kill9();
    let killed = Instant::now();
    let bound = Duration::from_secs(1);
    let deadline = killed + bound;
    // What counts is when the request that the pod answered was sent: a
    // loaded machine may take a while to carry the exchange itself.
    let sent = std::cell::Cell::new(killed);
    let answered = until_ok(deadline, Duration::from_millis(20), || {
        sent.set(Instant::now());
        // Short attempts: a SYN that went nowhere must not eat the whole
        // second (its retransmission comes after one).
        let limit = deadline
            .saturating_duration_since(Instant::now())
            .clamp(Duration::from_millis(250), Duration::from_millis(500));
        pod_answers(&scenario, limit)
    })
    .await;
    let after = sent.get() - killed;
    assert!(
        answered.is_ok() && after <= bound,
        "the pod did not answer a request sent within {bound:?} of kill -9 of the agent \
         (the last sent after {after:?}: {answered:?})"
    );

    // The links die with the agent's descriptors; allow the kernel a moment to free them.
    let detached = until_ok(
        Instant::now() + Duration::from_secs(2),
        Duration::from_millis(50),
        || std::future::ready(nothing_attached(&scenario)),
    )
    .await;
    assert_eq!(
        detached,
        Ok(()),
        "no {STEAL_PROGRAM} may stay attached after the agent died"
    );
    scenario.assert_pod_answers(0, 80).await;

    // The developer is told the session is gone rather than left with a dead CLI.
    let ended = session.wait_exit(Duration::from_secs(20)).await;
    assert_eq!(ended.code, Some(7), "session lost: {ended:?}");
    assert!(
        ended.stderr.lines().any(|line| line.starts_with("error:")),
        "expected an `error:` line: {:?}",
        ended.stderr
    );
}

/// A client killed with SIGKILL has its sockets closed by the kernel: the agent
/// sees its connection end and lets go at once, well before keepalive (whose
/// ping alone waits 5 s for an answer) could have told it anything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_kill_9_of_the_client_the_redirection_goes_with_its_connection() {
    let scenario = Scenario::start(1, &[80]).await;
    let local = TcpServer::local(|s| servers::http(s, LOCAL_BODY));
    let mut session = stealing(&scenario, &local).await;

    session.kill9();
    let killed = Instant::now();
    let recovered = redirection_gone(&scenario, killed + Duration::from_secs(3)).await;
    assert_eq!(
        recovered,
        Ok(()),
        "redirection still in place {:?} after kill -9 of the client",
        killed.elapsed()
    );
    steal_again(&scenario, &local).await;
}

/// The agent's HTTP/2 keepalive (agent/src/grpc: a ping after 3 s without a
/// frame from the client, 5 s for its answer) notices a client that vanished
/// without closing anything within 8 s; users are promised 10 s.
const KEEPALIVE_PROMISE: Duration = Duration::from_secs(10);

/// A client frozen by SIGSTOP is a laptop closed or a network gone: its
/// sockets stay open and the kernel still acknowledges what the agent sends,
/// but nothing answers. Only the agent's keepalive pings can tell.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_client_loses_its_redirection_within_the_keepalive_window() {
    let scenario = Scenario::start(1, &[80]).await;
    let local = TcpServer::local(|s| servers::http(s, LOCAL_BODY));
    let mut session = stealing(&scenario, &local).await;

    kill(Pid::from_raw(session.pid() as i32), Signal::SIGSTOP).expect("SIGSTOP the client");
    let frozen = Instant::now();
    let recovered = redirection_gone(&scenario, frozen + KEEPALIVE_PROMISE).await;
    let elapsed = frozen.elapsed();
    session.kill9();
    assert_eq!(
        recovered,
        Ok(()),
        "redirection still in place {elapsed:?} after the client froze"
    );
    steal_again(&scenario, &local).await;
}

/// The pod's port 80 stolen to `local`, seen working.
async fn stealing(scenario: &Scenario, local: &TcpServer) -> Client {
    let session = scenario.steal(0, 80, local).start().await;
    assert_eq!(scenario.curl(scenario.pod(0).v4(80)).await, LOCAL_BODY);
    scenario.assert_steal_attached(0);
    session
}

/// Polls until the pod's own process answers again with nothing attached, or
/// `deadline` passes; the last failed attempt otherwise.
async fn redirection_gone(scenario: &Scenario, deadline: Instant) -> Result<(), String> {
    until_ok(deadline, Duration::from_millis(200), || async {
        pod_answers(scenario, Duration::from_secs(1)).await?;
        nothing_attached(scenario)
    })
    .await
}

/// The agent forgot the dead session: the developer can simply start again.
async fn steal_again(scenario: &Scenario, local: &TcpServer) {
    scenario.assert_pod_answers(0, 80).await;
    let mut again = scenario.steal(0, 80, local).start().await;
    assert_eq!(scenario.curl(scenario.pod(0).v6(80)).await, LOCAL_BODY);
    let ended = again.stop().await;
    assert_eq!(ended.code, Some(0), "{ended:?}");
}
