//! Several sessions on one agent at once: each steals only its own pod and port, and
//! ending one leaves the others running.

use remocal_tests::scenario::Scenario;
use remocal_tests::servers::{self, TcpServer};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_sessions_on_different_ports_of_one_pod() {
    let scenario = Scenario::start(1, &[80, 8080, 9090]).await;
    let web = TcpServer::local(|s| servers::http(s, "local-web"));
    let api = TcpServer::local(|s| servers::http(s, "local-api"));
    let pod = scenario.pod(0);

    let mut web_session = scenario.steal(0, 80, &web).start().await;
    let mut api_session = scenario.steal(0, 8080, &api).start().await;
    for family in 0..2 {
        assert_eq!(scenario.curl(pod.addrs(80)[family]).await, "local-web");
        assert_eq!(scenario.curl(pod.addrs(8080)[family]).await, "local-api");
    }
    // A port nobody steals is still the pod's.
    scenario.assert_pod_answers(0, 9090).await;
    assert_eq!(scenario.pod_server(0, 80).accepted(), 0);
    assert_eq!(scenario.pod_server(0, 8080).accepted(), 0);

    // Ending one session gives its port back and keeps the other stolen.
    let ended = web_session.stop().await;
    assert_eq!(ended.code, Some(0), "{ended:?}");
    scenario.assert_pod_answers(0, 80).await;
    for addr in pod.addrs(8080) {
        assert_eq!(
            scenario.curl(addr).await,
            "local-api",
            "{addr} after the other session ended"
        );
    }
    scenario.assert_steal_attached(0);

    let ended = api_session.stop().await;
    assert_eq!(ended.code, Some(0), "{ended:?}");
    scenario.assert_pod_answers(0, 8080).await;
    scenario.assert_nothing_attached(0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_sessions_on_two_pods() {
    let scenario = Scenario::start(2, &[80]).await;
    let first = TcpServer::local(|s| servers::http(s, "local-0"));
    let second = TcpServer::local(|s| servers::http(s, "local-1"));

    let mut sessions = [
        scenario.steal(0, 80, &first).start().await,
        scenario.steal(1, 80, &second).start().await,
    ];
    for (pod, expected) in [(0, "local-0"), (1, "local-1")] {
        for addr in scenario.pod(pod).addrs(80) {
            assert_eq!(scenario.curl(addr).await, expected, "{addr}");
        }
        assert_eq!(scenario.pod_server(pod, 80).accepted(), 0);
        scenario.assert_steal_attached(pod);
    }

    // Ending the first pod's session leaves the second pod stolen.
    let ended = sessions[0].stop().await;
    assert_eq!(ended.code, Some(0), "{ended:?}");
    scenario.assert_pod_answers(0, 80).await;
    scenario.assert_nothing_attached(0);
    for addr in scenario.pod(1).addrs(80) {
        assert_eq!(scenario.curl(addr).await, "local-1", "{addr}");
    }

    let ended = sessions[1].stop().await;
    assert_eq!(ended.code, Some(0), "{ended:?}");
    scenario.assert_pod_answers(1, 80).await;
    scenario.assert_nothing_attached(1);
}
