//! h2c routing end to end on loopback: a real h2 client, the router serving
//! its connection, and real h2 servers as the pod and two sessions.
mod grpc;
mod support;

use std::{sync::atomic::Ordering, time::Duration};

use tokio::{io::AsyncWriteExt as _, sync::mpsc, time::Instant};

use bytes::Bytes;
use h2::Reason;
use http::{HeaderMap, HeaderValue, StatusCode};

use super::{
    clients::{Client, Clients, Reopen},
    relay::send_head,
};
use crate::http_route::{Limits, Protocol, Side};
use support::{
    Seen, Server, Sides, client, get, header, read, read_exactly, refusing, request, router,
    send_all, server, within,
};

struct World {
    pod: Server,
    alice: Server,
    bob: Server,
    sides: Sides,
}

async fn world() -> World {
    let (pod, alice, bob) = (
        server("pod").await,
        server("alice").await,
        server("bob").await,
    );
    let sides = Sides::new(pod.addr, alice.addr, bob.addr);
    World {
        pod,
        alice,
        bob,
        sides,
    }
}

#[tokio::test]
async fn each_stream_goes_to_the_side_its_headers_pick() {
    within(async {
        let world = world().await;
        let router = router(world.sides.clone()).await;
        let (send, _connection) = client(router.addr).await;
        for _ in 0..2 {
            for (dev, name) in [
                (Some("alice"), "alice"),
                (Some("bob"), "bob"),
                (None, "pod"),
            ] {
                let mut request = request("/a/b?c=d", dev);
                request
                    .headers_mut()
                    .insert("grpc-metadata-bin", HeaderValue::from_static("AAE="));
                let (head, body, trailers) = get(&send, request).await;
                assert_eq!(head.status, StatusCode::OK);
                assert_eq!(header(&head.headers, "x-server"), name);
                assert_eq!(body, name.as_bytes());
                assert_eq!(header(&head.headers, "x-uri"), "http://app.test/a/b?c=d");
                assert_eq!(header(&head.headers, "x-method"), "POST");
                // No body on the client's head: none on the side's either.
                assert_eq!(header(&head.headers, "x-eos"), "true");
                assert_eq!(header(&trailers.unwrap(), "grpc-status"), "0");
            }
        }
        // One connection per side, reused by its next streams.
        for (side, server) in [
            (Side::Pod, &world.pod),
            (Side::Session(1), &world.alice),
            (Side::Session(2), &world.bob),
        ] {
            assert_eq!(world.sides.opens(side), 1, "{side:?}");
            assert_eq!(world.sides.routed(side), 2, "{side:?}");
            assert_eq!(server.connections.load(Ordering::SeqCst), 1, "{side:?}");
        }
        let picked = world.sides.picked.lock().unwrap().clone();
        assert_eq!(picked.len(), 6);
        assert_eq!(picked[0].method, "POST");
        assert_eq!(picked[0].path, "/a/b?c=d");
        assert!(
            picked[0]
                .headers
                .iter()
                .all(|(name, _)| !name.starts_with(':'))
        );
        assert!(
            picked[0]
                .headers
                .contains(&("x-dev".into(), b"alice".to_vec()))
        );
        assert!(
            picked[0]
                .headers
                .contains(&("grpc-metadata-bin".into(), b"AAE=".to_vec()))
        );
    })
    .await;
}

#[tokio::test]
async fn a_request_without_authority_keeps_its_host_header() {
    within(async {
        let world = world().await;
        let router = router(world.sides.clone()).await;
        let (send, _connection) = client(router.addr).await;
        // As h2 forwards HTTP/1 requests: `:scheme http`, no `:authority`.
        let request = http::Request::builder()
            .version(http::Version::HTTP_11)
            .uri("/only/path?q")
            .header("host", "app.test:8080")
            .header("x-dev", "alice")
            .body(())
            .unwrap();
        let (head, body, _) = get(&send, request).await;
        assert_eq!(body, "alice".as_bytes());
        assert_eq!(header(&head.headers, "x-uri"), "/only/path?q");
        assert_eq!(header(&head.headers, "x-host"), "app.test:8080");
    })
    .await;
}

#[tokio::test]
async fn interim_answers_reach_the_client() {
    within(async {
        let world = world().await;
        let router = router(world.sides.clone()).await;
        let (send, _connection) = client(router.addr).await;
        let mut ready = send.ready().await.unwrap();
        let (mut response, _) = ready
            .send_request(request("/early", Some("bob")), true)
            .unwrap();
        let hints = std::future::poll_fn(|cx| response.poll_informational(cx))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(hints.status().as_u16(), 103);
        assert_eq!(header(hints.headers(), "link"), "</a.css>; rel=preload");
        let (head, body, _) = read(response.await.unwrap()).await;
        assert_eq!(head.status, StatusCode::OK);
        assert_eq!(body, "bob".as_bytes());
    })
    .await;
}

/// A client that waited before its preface had the pod connected by
/// sniffing: that connection serves the pod's streams.
#[tokio::test]
async fn the_pod_connection_opened_while_sniffing_is_used() {
    within(async {
        let world = world().await;
        let router = router(world.sides.clone()).await;
        let socket = tokio::net::TcpStream::connect(router.addr).await.unwrap();
        tokio::time::sleep(Limits::default().sniff * 2).await;
        assert_eq!(world.sides.opens(Side::Pod), 1);
        let (send, connection) = h2::client::handshake(socket).await.unwrap();
        tokio::spawn(connection);
        for dev in [None, Some("alice"), None] {
            let (head, _, _) = get(&send, request("/", dev)).await;
            assert_eq!(head.status, StatusCode::OK);
        }
        assert_eq!(world.sides.opens(Side::Pod), 1);
        assert_eq!(world.pod.connections.load(Ordering::SeqCst), 1);
    })
    .await;
}

#[tokio::test]
async fn concurrent_streams_interleave_both_ways() {
    within(async {
        let world = world().await;
        let router = router(world.sides.clone()).await;
        let (send, _connection) = client(router.addr).await;
        let mut streams = Vec::new();
        for (dev, name) in [
            (Some("alice"), "alice"),
            (Some("bob"), "bob"),
            (None, "pod"),
        ] {
            let mut ready = send.clone().ready().await.unwrap();
            let (response, body) = ready.send_request(request("/echo", dev), false).unwrap();
            streams.push((name, response, body));
        }
        let mut open = Vec::new();
        for (name, response, body) in streams {
            let response = response.await.unwrap();
            assert_eq!(header(response.headers(), "x-server"), name);
            open.push((name, response.into_body(), body));
        }
        // Each stream's echo comes back before its next message is sent,
        // with the three streams' messages interleaved on the connection.
        for round in 0..5 {
            for (name, received, sent) in &mut open {
                let message = format!("round {round} for {name}");
                send_all(sent, Bytes::from(message.clone())).await.unwrap();
                assert_eq!(
                    read_exactly(received, message.len()).await,
                    message.as_bytes()
                );
            }
        }
        for (name, mut received, mut sent) in open {
            sent.send_data(Bytes::new(), true).unwrap();
            assert!(received.data().await.is_none());
            let trailers = received.trailers().await.unwrap().unwrap();
            assert_eq!(header(&trailers, "x-server"), name);
            assert_eq!(header(&trailers, "grpc-status"), "0");
        }
    })
    .await;
}

#[tokio::test]
async fn grpc_style_bidi_stream_with_trailers_both_ways() {
    within(async {
        let world = world().await;
        let router = router(world.sides.clone()).await;
        let (send, _connection) = client(router.addr).await;
        let mut request = request("/pkg.Svc/Chat", Some("bob"));
        request
            .headers_mut()
            .insert("content-type", HeaderValue::from_static("application/grpc"));
        request
            .headers_mut()
            .insert("te", HeaderValue::from_static("trailers"));
        let mut ready = send.ready().await.unwrap();
        let (response, mut sent) = ready.send_request(request, false).unwrap();
        let response = response.await.unwrap();
        assert_eq!(
            header(response.headers(), "content-type"),
            "application/grpc"
        );
        let mut received = response.into_body();
        for message in ["\0\0\0\0\x05hello", "\0\0\0\0\x03you", "\0\0\0\0\x01!"] {
            send_all(&mut sent, Bytes::from_static(message.as_bytes()))
                .await
                .unwrap();
            assert_eq!(
                read_exactly(&mut received, message.len()).await,
                message.as_bytes()
            );
        }
        let mut trailers = HeaderMap::new();
        trailers.insert("x-request-trailer", HeaderValue::from_static("t1"));
        sent.send_trailers(trailers).unwrap();
        assert!(received.data().await.is_none());
        let trailers = received.trailers().await.unwrap().unwrap();
        assert_eq!(header(&trailers, "grpc-status"), "0");
        assert_eq!(header(&trailers, "x-server"), "bob");
        assert_eq!(header(&trailers, "x-request-trailer"), "t1");
    })
    .await;
}

/// 20 MiB each way through a session and through the pod at once, byte
/// for byte.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_bodies_are_echoed_byte_exact() {
    within(async {
        let world = world().await;
        let router = router(world.sides.clone()).await;
        let (send, _connection) = client(router.addr).await;
        let body: Bytes = (0..20 << 20).map(|i: u32| (i % 251) as u8).collect();
        let echo = |dev: Option<&'static str>| {
            let (send, body) = (send.clone(), body.clone());
            async move {
                let mut ready = send.ready().await.unwrap();
                let (response, mut sent) =
                    ready.send_request(request("/echo", dev), false).unwrap();
                let writer = async {
                    for chunk in body.chunks(100_000) {
                        send_all(&mut sent, body.slice_ref(chunk)).await.unwrap();
                    }
                    sent.send_data(Bytes::new(), true).unwrap();
                };
                let reader = async {
                    let (head, echoed, trailers) = read(response.await.unwrap()).await;
                    (
                        header(&head.headers, "x-server").to_owned(),
                        echoed,
                        trailers,
                    )
                };
                let ((), (server, echoed, trailers)) = tokio::join!(writer, reader);
                assert!(echoed == body, "{server}: the echo differs");
                assert_eq!(header(&trailers.unwrap(), "grpc-status"), "0");
                server
            }
        };
        let (alice, pod) = tokio::join!(echo(Some("alice")), echo(None));
        assert_eq!((alice.as_str(), pod.as_str()), ("alice", "pod"));
    })
    .await;
}

/// A side that reads nothing holds the client back after about one stream
/// window: nothing buffers the body whole.
#[tokio::test]
async fn a_stalled_side_holds_the_client_back() {
    within(async {
        let world = world().await;
        let router = router(world.sides.clone()).await;
        let (send, _connection) = client(router.addr).await;
        let mut ready = send.ready().await.unwrap();
        let (_response, mut sent) = ready
            .send_request(request("/stall", Some("alice")), false)
            .unwrap();
        let chunk = Bytes::from(vec![7u8; 64 << 10]);
        let mut accepted = 0;
        while accepted < 20 << 20 {
            let sending = send_all(&mut sent, chunk.clone());
            match tokio::time::timeout(Duration::from_millis(500), sending).await {
                Ok(result) => result.unwrap(),
                Err(_) => break,
            }
            accepted += chunk.len();
        }
        // The router's stream window (256 KiB), the side's (64 KiB) and a
        // send buffer between them; the client's own queue is not counted.
        assert!(accepted <= 1 << 20, "{accepted} bytes went into the router");
        assert!(
            accepted >= 128 << 10,
            "only {accepted} bytes went into the router"
        );
    })
    .await;
}

#[tokio::test]
async fn an_unreachable_side_fails_its_streams_only() {
    within(async {
        let world = world().await;
        let sides = Sides::new(world.pod.addr, world.alice.addr, refusing().await);
        let router = router(sides.clone()).await;
        let (send, _connection) = client(router.addr).await;

        let (head, body, _) = get(&send, request("/", Some("bob"))).await;
        assert_eq!(head.status, StatusCode::BAD_GATEWAY);
        let body = String::from_utf8(body.to_vec()).unwrap();
        assert!(
            body.starts_with("remocal: cannot connect to session 2: "),
            "{body}"
        );

        let mut grpc = request("/pkg.Svc/Call", Some("bob"));
        grpc.headers_mut().insert(
            "content-type",
            HeaderValue::from_static("application/grpc+proto"),
        );
        let mut ready = send.clone().ready().await.unwrap();
        let (response, _) = ready.send_request(grpc, true).unwrap();
        let response = response.await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(header(response.headers(), "grpc-status"), "14");
        let message = header(response.headers(), "grpc-message");
        assert!(
            message.starts_with("remocal: cannot connect to session 2"),
            "{message}"
        );
        // Trailers-only: the head ended the stream.
        assert!(response.body().is_end_stream());

        let (head, body, _) = get(&send, request("/", Some("alice"))).await;
        assert_eq!(head.status, StatusCode::OK);
        assert_eq!(body, "alice".as_bytes());
        // Each of bob's streams tried again.
        assert_eq!(sides.opens(Side::Session(2)), 2);

        // The pod's server drops the connection before answering.
        let (head, body, _) = get(&send, request("/crash", None)).await;
        assert_eq!(head.status, StatusCode::BAD_GATEWAY);
        let body = String::from_utf8(body.to_vec()).unwrap();
        assert!(
            body.starts_with("remocal: the pod's server failed before answering: "),
            "{body}"
        );
        // The next stream to the pod gets a new connection.
        let (head, body, _) = get(&send, request("/", None)).await;
        assert_eq!(head.status, StatusCode::OK);
        assert_eq!(body, "pod".as_bytes());
        assert_eq!(sides.opens(Side::Pod), 2);
    })
    .await;
}

#[tokio::test]
async fn resets_cross_with_their_reason() {
    within(async {
        let mut world = world().await;
        let router = router(world.sides.clone()).await;
        let (send, _connection) = client(router.addr).await;

        // The client resets: the side's stream is reset alike.
        let mut ready = send.clone().ready().await.unwrap();
        let (response, mut sent) = ready
            .send_request(request("/hold", Some("alice")), false)
            .unwrap();
        send_all(&mut sent, Bytes::from_static(b"ping"))
            .await
            .unwrap();
        let mut received = response.await.unwrap().into_body();
        assert_eq!(read_exactly(&mut received, 4).await, b"ping");
        sent.send_reset(Reason::INTERNAL_ERROR);
        assert_eq!(
            world.alice.seen.recv().await,
            Some(Seen::Reset("/hold".into(), Some(Reason::INTERNAL_ERROR)))
        );

        // The side resets after its head: so is the client's stream.
        let mut ready = send.clone().ready().await.unwrap();
        let (response, _sent) = ready
            .send_request(request("/reset", Some("bob")), false)
            .unwrap();
        let mut received = response.await.unwrap().into_body();
        let err = loop {
            match received.data().await {
                Some(Ok(_)) => continue,
                Some(Err(err)) => break err,
                None => panic!("the stream ended without its reset"),
            }
        };
        assert_eq!(err.reason(), Some(Reason::ENHANCE_YOUR_CALM));

        // The side refuses the stream before its head: so does the router.
        let mut ready = send.clone().ready().await.unwrap();
        let (response, _) = ready.send_request(request("/refuse", None), true).unwrap();
        let err = response.await.unwrap_err();
        assert_eq!(err.reason(), Some(Reason::REFUSED_STREAM));

        // The connection goes on.
        let (head, _, _) = get(&send, request("/", None)).await;
        assert_eq!(header(&head.headers, "x-server"), "pod");
    })
    .await;
}

#[tokio::test]
async fn a_side_that_went_away_is_connected_again() {
    within(async {
        let world = world().await;
        let router = router(world.sides.clone()).await;
        let (send, _connection) = client(router.addr).await;
        let (head, _, _) = get(&send, request("/goaway", None)).await;
        assert_eq!(header(&head.headers, "x-server"), "pod");
        // Let the pod's GOAWAY arrive.
        tokio::time::sleep(Duration::from_millis(100)).await;
        let (head, body, _) = get(&send, request("/", None)).await;
        assert_eq!(head.status, StatusCode::OK);
        assert_eq!(body, "pod".as_bytes());
        assert_eq!(world.pod.connections.load(Ordering::SeqCst), 2);
        assert_eq!(world.sides.opens(Side::Pod), 2);
    })
    .await;
}

#[tokio::test]
async fn closing_sends_goaway_and_lets_streams_in_flight_finish() {
    within(async {
        let world = world().await;
        let router = router(world.sides.clone()).await;
        let (send, connection) = client(router.addr).await;
        let mut ready = send.clone().ready().await.unwrap();
        let (response, mut sent) = ready
            .send_request(request("/echo", Some("alice")), false)
            .unwrap();
        send_all(&mut sent, Bytes::from_static(b"before"))
            .await
            .unwrap();
        let mut received = response.await.unwrap().into_body();
        assert_eq!(read_exactly(&mut received, 6).await, b"before");

        router.closing.cancel();
        let refused = loop {
            match send.clone().ready().await {
                Ok(_) => tokio::time::sleep(Duration::from_millis(10)).await,
                Err(err) => break err,
            }
        };
        assert!(refused.is_go_away(), "{refused}");
        assert_eq!(refused.reason(), Some(Reason::NO_ERROR));

        // The stream in flight still goes both ways, to its end.
        send_all(&mut sent, Bytes::from_static(b"after"))
            .await
            .unwrap();
        assert_eq!(read_exactly(&mut received, 5).await, b"after");
        assert!(!router.served.is_finished());
        sent.send_data(Bytes::new(), true).unwrap();
        assert!(received.data().await.is_none());
        let trailers = received.trailers().await.unwrap().unwrap();
        assert_eq!(header(&trailers, "grpc-status"), "0");

        drop((send, sent, received));
        assert_eq!(router.served.await.unwrap(), Protocol::Http2);
        connection.await.unwrap().unwrap();
        // The router's connection to alice ends with the client's.
        while world.alice.closed.load(Ordering::SeqCst) == 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
}

/// A client that never acknowledges the PING sent with the GOAWAY keeps h2
/// from ending the connection; without streams it is closed after a grace.
#[tokio::test]
async fn an_idle_client_deaf_to_goaway_is_closed_after_the_grace() {
    within(async {
        let world = world().await;
        let router = router(world.sides.clone()).await;
        let mut socket = tokio::net::TcpStream::connect(router.addr).await.unwrap();
        // The preface and an empty SETTINGS frame, then silence.
        socket
            .write_all(crate::http_route::sniff::H2_PREFACE)
            .await
            .unwrap();
        socket
            .write_all(&[0, 0, 0, 4, 0, 0, 0, 0, 0])
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        let cancelled = Instant::now();
        router.closing.cancel();
        assert_eq!(router.served.await.unwrap(), Protocol::Http2);
        assert!(cancelled.elapsed() >= super::CLOSING_GRACE);
    })
    .await;
}

/// A side's connection can say GOAWAY between a stream being given it and
/// the stream being sent: the stream then asks for a new one, once.
#[tokio::test]
async fn a_stream_given_a_connection_gone_away_sends_on_a_new_one() {
    within(async {
        let world = world().await;
        let mut clients = Clients::new(&world.sides, None, 64 << 10);
        let given = clients.get(Side::Pod, None);
        let Client {
            send, generation, ..
        } = given.clone().await.unwrap();
        let (head, _, _) = get(&send, request("/goaway", None)).await;
        assert_eq!(header(&head.headers, "x-server"), "pod");
        tokio::time::sleep(Duration::from_millis(100)).await;

        let (tx, mut rx) = mpsc::channel(1);
        let reopen = Reopen::new(Side::Pod, tx);
        let sending = send_head(given, &reopen, request("/", None), true);
        let reopening = async {
            let (side, dead, reply) = rx.recv().await.unwrap();
            assert_eq!((side, dead), (Side::Pod, generation));
            let _ = reply.send(clients.get(side, Some(dead)));
        };
        let (sent, ()) = tokio::join!(sending, reopening);
        let (response, _) = sent.unwrap_or_else(|failure| panic!("{failure}"));
        let (_, body, _) = read(response.await.unwrap()).await;
        assert_eq!(body, "pod".as_bytes());
        assert_eq!(world.pod.connections.load(Ordering::SeqCst), 2);
    })
    .await;
}
