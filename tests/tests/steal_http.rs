//! What a user sees through a steal with ordinary HTTP traffic: who answers, before,
//! during and after the session.

use std::time::Duration;

use remocal_tests::processes::{PodProcess, Steal, Target, free_port};
use remocal_tests::remote::{curl, http_exchange};
use remocal_tests::retry::until_ok;
use remocal_tests::scenario::{POD_BODY, Scenario};
use remocal_tests::servers::{self, TcpServer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::{Instant, timeout};

const LOCAL_BODY: &str = "local";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_gets_the_local_process_over_ipv4_and_ipv6_then_the_pod_again() {
    let scenario = Scenario::start(1, &[80]).await;
    let local = TcpServer::local(|s| servers::http(s, LOCAL_BODY));
    let pod = scenario.pod(0);
    let pod_server = scenario.pod_server(0, 80);

    let mut session = scenario.steal(0, 80, &local).start().await;
    for addr in pod.addrs(80) {
        assert_eq!(
            scenario.curl(addr).await,
            LOCAL_BODY,
            "curl {addr} while stolen"
        );
    }
    assert_eq!(local.accepted(), 2, "each curl reached the local process");
    assert_eq!(
        pod_server.accepted(),
        0,
        "the pod's own process must get nothing while stolen"
    );
    scenario.assert_steal_attached(0);

    let ended = session.stop().await;
    assert_eq!(
        ended.code,
        Some(0),
        "Ctrl-C ends the session cleanly: {ended:?}"
    );
    scenario.assert_pod_answers(0, 80).await;
    assert_eq!(pod_server.accepted(), 2);
    assert_eq!(
        local.accepted(),
        2,
        "nothing reaches the local process any more"
    );
    scenario.assert_nothing_attached(0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn steal_by_pid_targets_the_network_namespace_of_that_process() {
    let scenario = Scenario::start(1, &[80]).await;
    let local = TcpServer::local(|s| servers::http(s, LOCAL_BODY));
    let pod = scenario.pod(0);
    let pod_process = PodProcess::start(&pod.netns).await;

    let mut session = Steal::new(&scenario.agent.url())
        .target(&Target::Pid(pod_process.pid()))
        .port(80)
        .local_port(local.port())
        .start()
        .await;
    for addr in pod.addrs(80) {
        assert_eq!(
            scenario.curl(addr).await,
            LOCAL_BODY,
            "curl {addr} while stolen"
        );
    }
    assert_eq!(scenario.pod_server(0, 80).accepted(), 0);

    let ended = session.stop().await;
    assert_eq!(ended.code, Some(0), "{ended:?}");
    scenario.assert_pod_answers(0, 80).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_opened_before_the_steal_keeps_talking_to_the_pod() {
    let scenario = Scenario::start(1, &[80]).await;
    let local = TcpServer::local(|s| servers::http(s, LOCAL_BODY));
    let pod = scenario.pod(0);
    let mut early = scenario
        .node()
        .connect(pod.v4(80))
        .await
        .expect("connect to pod");
    assert_eq!(
        http_exchange(&mut early).await.unwrap(),
        POD_BODY,
        "before the steal"
    );

    let mut session = scenario.steal(0, 80, &local).start().await;
    assert_eq!(
        scenario.curl(pod.v4(80)).await,
        LOCAL_BODY,
        "new connections are stolen"
    );
    for round in 0..3 {
        let body = timeout(Duration::from_secs(10), http_exchange(&mut early))
            .await
            .expect("existing connection hung during the steal")
            .unwrap_or_else(|e| panic!("existing connection broke during the steal: {e}"));
        assert_eq!(
            body, POD_BODY,
            "exchange {round} on the existing connection"
        );
    }

    let ended = session.stop().await;
    assert_eq!(ended.code, Some(0), "{ended:?}");
    assert_eq!(
        http_exchange(&mut early)
            .await
            .expect("existing connection after the steal"),
        POD_BODY,
        "after the steal"
    );
    assert_eq!(
        scenario.pod_server(0, 80).accepted(),
        1,
        "the pod only ever saw the early connection"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stolen_connection_open_when_the_session_ends_is_closed_cleanly() {
    let scenario = Scenario::start(1, &[80]).await;
    let local = TcpServer::local(|s| servers::http(s, LOCAL_BODY));
    let pod = scenario.pod(0);

    let mut session = scenario.steal(0, 80, &local).start().await;
    let mut open = [
        scenario
            .node()
            .connect(pod.v4(80))
            .await
            .expect("connect v4"),
        scenario
            .node()
            .connect(pod.v6(80))
            .await
            .expect("connect v6"),
    ];
    for stream in &mut open {
        assert_eq!(http_exchange(stream).await.unwrap(), LOCAL_BODY);
    }

    let ended = session.stop().await;
    assert_eq!(ended.code, Some(0), "{ended:?}");
    for stream in &mut open {
        let mut rest = Vec::new();
        let read = timeout(Duration::from_secs(15), stream.read_to_end(&mut rest))
            .await
            .expect("stolen connection still hanging 15 s after the session ended");
        // A clean close is a FIN: EOF, not a reset, and no stray bytes.
        assert!(read.is_ok(), "expected EOF, got {read:?}");
        assert!(
            rest.is_empty(),
            "unexpected bytes after the session: {rest:?}"
        );
    }
    scenario.assert_pod_answers(0, 80).await;
}

/// A local process that closes first (like HTTP/1.0, or `Connection: close`) leaves the
/// stolen socket in TIME_WAIT inside the pod. A new connection from the same client port
/// then meets that TIME_WAIT socket: it must be stolen like any other new connection,
/// not handed to the pod's process.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_connection_reusing_a_time_wait_four_tuple_is_still_stolen() {
    let scenario = Scenario::start(1, &[80]).await;
    let local = TcpServer::local(|mut stream: tokio::net::TcpStream| async move {
        let mut request = [0u8; 1024];
        let _ = stream.read(&mut request).await;
        let _ = stream
            .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: close\r\n\r\nlocal")
            .await;
    });
    let pod_server = scenario.pod_server(0, 80);
    let _session = scenario.steal(0, 80, &local).start().await;

    let source_port = 40_000 + (std::process::id() % 20_000) as u16;
    for attempt in 0..3 {
        let mut busy = 0;
        let mut stream = loop {
            let socket = scenario.node().tcp_sockets(1, false).pop().unwrap();
            socket.set_reuseaddr(true).unwrap();
            socket
                .bind((std::net::Ipv4Addr::UNSPECIFIED, source_port).into())
                .unwrap();
            match timeout(
                Duration::from_secs(5),
                socket.connect(scenario.pod(0).v4(80)),
            )
            .await
            .unwrap_or_else(|_| {
                panic!("attempt {attempt}: the SYN reusing the 4-tuple went unanswered")
            }) {
                // Our end of the previous connection may still wait for the
                // last ACK of its close: the 4-tuple is free once it came.
                Err(err) if err.kind() == std::io::ErrorKind::AddrNotAvailable && busy < 50 => {
                    busy += 1;
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                connected => break connected.unwrap(),
            }
        };
        stream
            .write_all(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
            .await
            .unwrap();
        let mut response = String::new();
        timeout(Duration::from_secs(5), stream.read_to_string(&mut response))
            .await
            .unwrap()
            .unwrap();
        assert!(
            response.ends_with("local"),
            "attempt {attempt} got {response:?}"
        );
    }
    assert_eq!(local.accepted(), 3);
    assert_eq!(
        pod_server.accepted(),
        0,
        "no reused 4-tuple slipped through to the pod"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_nothing_answers_locally_is_reset_and_the_session_goes_on() {
    let scenario = Scenario::start(1, &[80]).await;
    let pod_server = scenario.pod_server(0, 80);
    let port = free_port();
    let mut session = Steal::new(&scenario.agent.url())
        .target(&Target::Netns(scenario.pod(0).netns.path()))
        .port(80)
        .local_port(port)
        .start()
        .await;
    let addr = scenario.pod(0).v4(80);

    let refused = curl(scenario.node(), addr).await;
    assert!(
        !refused.success && told_refused(&refused.stderr),
        "the remote client is refused, not left hanging: {refused:?}"
    );
    let said = until_ok(
        Instant::now() + Duration::from_secs(5),
        Duration::from_millis(50),
        async || {
            let stderr = session.stderr();
            let expected = format!("was reset: nothing answers at 127.0.0.1:{port}");
            if stderr.contains(&expected) && stderr.contains("start your local process") {
                Ok(())
            } else {
                Err(stderr)
            }
        },
    )
    .await;
    assert!(said.is_ok(), "remocal says why and what to do: {said:?}");
    assert_eq!(
        pod_server.accepted(),
        0,
        "a stolen connection is never handed back"
    );

    // Once the local process runs, the next connection reaches it.
    let listener = std::net::TcpListener::bind(("127.0.0.1", port)).unwrap();
    let _local = TcpServer::serve(listener, |s| servers::http(s, LOCAL_BODY));
    assert_eq!(scenario.curl(addr).await, LOCAL_BODY);
    let ended = session.stop().await;
    assert_eq!(ended.code, Some(0), "{ended:?}");
}

/// Whether curl says the other end refused the connection. A reset reaches it
/// once connected (`Connection reset by peer`) or, when it comes during the
/// handshake, as a failure to connect (`Couldn't connect to server`): the same
/// behaviour, worded by timing. A hang is neither: curl says `timed out`.
fn told_refused(stderr: &str) -> bool {
    ["reset", "Couldn't connect", "Connection refused"]
        .iter()
        .any(|wording| stderr.contains(wording))
}

/// The pod's own connections to its own address are its own business: only
/// other clients' connections are stolen.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pods_connections_to_its_own_address_are_not_stolen() {
    let scenario = Scenario::start(1, &[80]).await;
    let local = TcpServer::local(|s| servers::http(s, LOCAL_BODY));
    let pod = scenario.pod(0);
    let mut session = scenario.steal(0, 80, &local).start().await;
    for addr in pod.addrs(80) {
        assert_eq!(
            remocal_tests::remote::curl_body(&pod.netns, addr).await,
            POD_BODY,
            "the pod calling itself at {addr}"
        );
    }
    assert_eq!(
        local.accepted(),
        0,
        "nothing of the pod's own reached the local process"
    );
    assert_eq!(
        scenario.curl(pod.v4(80)).await,
        LOCAL_BODY,
        "a remote client is stolen"
    );
    let ended = session.stop().await;
    assert_eq!(ended.code, Some(0), "{ended:?}");
}
