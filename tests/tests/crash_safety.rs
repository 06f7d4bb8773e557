//! What is left when a side of a steal dies without cleaning up: the pod must get its
//! traffic back, within the bounds the issue sets, with no program left attached.

use std::time::Duration;

use remocal_tests::bpf;
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
    let mut session = scenario.steal(0, 80, &local).start().await;
    assert_eq!(scenario.curl(scenario.pod(0).v4(80)).await, LOCAL_BODY);
    scenario.assert_steal_attached(0);

    scenario.agent.kill9();
    let killed = Instant::now();
    let bound = Duration::from_secs(1);
    let deadline = killed + bound;
    let answered = until_ok(deadline, Duration::from_millis(20), || {
        // Short attempts: a SYN that went nowhere must not eat the whole second.
        let limit = deadline
            .saturating_duration_since(Instant::now())
            .clamp(Duration::from_millis(50), Duration::from_millis(250));
        pod_answers(&scenario, limit)
    })
    .await;
    let elapsed = killed.elapsed();
    assert!(
        answered.is_ok() && elapsed <= bound,
        "the pod did not answer within {bound:?} of kill -9 of the agent \
         (after {elapsed:?}, last attempt: {answered:?})"
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_kill_9_of_the_client_the_redirection_goes_within_the_keepalive_window() {
    let scenario = Scenario::start(1, &[80]).await;
    let local = TcpServer::local(|s| servers::http(s, LOCAL_BODY));
    let mut session = scenario.steal(0, 80, &local).start().await;
    assert_eq!(scenario.curl(scenario.pod(0).v4(80)).await, LOCAL_BODY);
    scenario.assert_steal_attached(0);

    session.kill9();
    let killed = Instant::now();
    let window = Duration::from_secs(12);
    let recovered = until_ok(killed + window, Duration::from_millis(200), || async {
        pod_answers(&scenario, Duration::from_secs(1)).await?;
        nothing_attached(&scenario)
    })
    .await;
    assert_eq!(
        recovered,
        Ok(()),
        "redirection still in place {:?} after kill -9 of the client",
        killed.elapsed()
    );
    scenario.assert_pod_answers(0, 80).await;

    // The agent forgot the dead session: the developer can simply start again.
    let mut again = scenario.steal(0, 80, &local).start().await;
    assert_eq!(scenario.curl(scenario.pod(0).v6(80)).await, LOCAL_BODY);
    let ended = again.stop().await;
    assert_eq!(ended.code, Some(0), "{ended:?}");
}
