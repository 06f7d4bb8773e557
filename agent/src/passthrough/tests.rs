//! Pass-through on the real kernel: throw-away namespaces (`ip netns add`,
//! removed by a guard even when a test fails), a server inside reporting the
//! peer it sees, and the agent's side from the test's own namespace. Nothing
//! of the test machine's own namespace is touched.
use std::{
    io::{Read as _, Write as _},
    net::{Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpListener},
    sync::mpsc,
    time::{Duration, Instant},
};

use socket2::{Domain, SockRef, Socket, Type};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use super::{connector::canonical, *};
use crate::netns::throwaway::TestNs;

/// What a pass-through leaves in a test namespace.
trait Inspect {
    fn ours(&self) -> String;
    fn time_wait(&self) -> String;
}

impl Inspect for TestNs {
    /// remocal's rules and routes in the namespace, as `ip` shows them.
    fn ours(&self) -> String {
        let table = rules::TABLE.to_string();
        let mut found = String::new();
        for family in ["-4", "-6"] {
            for line in self.ip(&[family, "rule", "show"]).lines() {
                if line.contains(&table) || line.contains("proto 82") {
                    found += &format!("{line}\n");
                }
            }
            found += &self.ip(&[family, "route", "show", "table", &table]);
        }
        found
    }

    fn time_wait(&self) -> String {
        self.exec(&["ss", "-Htan", "state", "time-wait"])
    }
}

/// An echo server inside the namespace on `[::]:port` (`0.0.0.0:port` when
/// the namespace has no IPv6), sending each connection's peer on `peers`.
/// Receiving "quit" makes it close first.
struct Server {
    listener: TcpListener,
    peers: mpsc::Receiver<SocketAddr>,
}

impl Server {
    fn start(ns: &Netns, port: u16) -> Self {
        let listener = ns
            .run_in(|| listen(port))
            .expect("enter the test namespace")
            .expect("listen in the test namespace");
        let (tx, peers) = mpsc::channel();
        let accepting = listener.try_clone().unwrap();
        std::thread::spawn(move || {
            while let Ok((stream, peer)) = accepting.accept() {
                let _ = tx.send(canonical(peer));
                std::thread::spawn(move || echo(stream));
            }
        });
        Self { listener, peers }
    }

    fn peer(&self) -> SocketAddr {
        self.peers
            .recv_timeout(Duration::from_secs(5))
            .expect("the server accepted nothing")
    }
}

impl Drop for Server {
    /// Wakes the accepting thread (accept fails on a shut-down listener).
    fn drop(&mut self) {
        let _ = SockRef::from(&self.listener).shutdown(Shutdown::Read);
    }
}

fn listen(port: u16) -> std::io::Result<TcpListener> {
    let dual = || -> std::io::Result<Socket> {
        let socket = Socket::new(Domain::IPV6, Type::STREAM, None)?;
        socket.set_only_v6(false)?;
        socket.set_reuse_address(true)?;
        socket.bind(&SocketAddr::from((Ipv6Addr::UNSPECIFIED, port)).into())?;
        Ok(socket)
    };
    let socket = match dual() {
        Ok(socket) => socket,
        Err(_) => {
            let socket = Socket::new(Domain::IPV4, Type::STREAM, None)?;
            socket.set_reuse_address(true)?;
            socket.bind(&SocketAddr::from((Ipv4Addr::UNSPECIFIED, port)).into())?;
            socket
        }
    };
    socket.listen(128)?;
    Ok(socket.into())
}

fn echo(mut stream: std::net::TcpStream) {
    let mut buf = [0; 4096];
    while let Ok(n @ 1..) = stream.read(&mut buf) {
        if &buf[..n] == b"quit" {
            return;
        }
        if stream.write_all(&buf[..n]).is_err() {
            return;
        }
    }
}

/// One connection through `passthrough` from `client`: checks the server's
/// peer and an echo, then closes from the agent's side, or lets the server
/// close first.
async fn round_trip(passthrough: &Passthrough, server: &Server, client: &str, server_closes: bool) {
    let client: SocketAddr = client.parse().unwrap();
    let mut stream = passthrough
        .connect(client)
        .await
        .expect("pass-through connect");
    assert_eq!(
        server.peer(),
        canonical(client),
        "the server's peer is the client"
    );
    stream.write_all(b"hello").await.unwrap();
    let mut answer = [0; 5];
    stream.read_exact(&mut answer).await.unwrap();
    assert_eq!(&answer, b"hello");
    if server_closes {
        stream.write_all(b"quit").await.unwrap();
    } else {
        stream.shutdown().await.unwrap();
    }
    let mut rest = Vec::new();
    stream.read_to_end(&mut rest).await.unwrap();
    assert!(rest.is_empty());
}

#[tokio::test]
async fn ipv4_clients_are_the_servers_peer() {
    let ns = TestNs::new();
    let netns = ns.netns();
    let server = Server::start(&netns, 8080);
    let passthrough = Passthrough::open(&netns, 8080).unwrap();
    round_trip(&passthrough, &server, "203.0.113.7:40001", false).await;
    // What a dual-stack listener reports for an IPv4 client.
    round_trip(&passthrough, &server, "[::ffff:203.0.113.9]:40003", false).await;
    let ours = ns.ours();
    for expected in [
        "21069:\tfrom 127.0.0.0/8 iif lo ipproto tcp sport 8080 lookup 5391693 proto 82",
        "21069:\tfrom ::1 iif lo ipproto tcp sport 8080 lookup 5391693 proto 82",
        "local default dev lo proto 82 scope host",
        "local default dev lo proto 82 metric 1024 pref medium",
    ] {
        assert!(ours.contains(expected), "{expected:?} in {ours}");
    }
    drop(passthrough);
    assert_eq!(ns.ours(), "", "nothing of ours stays after drop");
}

#[tokio::test]
async fn ipv6_clients_are_the_servers_peer() {
    let ns = TestNs::new();
    let netns = ns.netns();
    let server = Server::start(&netns, 8080);
    let passthrough = Passthrough::open(&netns, 8080).unwrap();
    round_trip(&passthrough, &server, "[2001:db8::7]:40002", false).await;
    drop(passthrough);
    assert_eq!(ns.ours(), "");
}

/// A client reusing its source port right after: the earlier pass-through's
/// four-tuple is in TIME_WAIT on the agent's side (it closed first) or on
/// the server's; with TCP timestamps (the default) and without.
#[tokio::test]
async fn a_client_address_in_time_wait_passes_again() {
    for timestamps in ["1", "0"] {
        let ns = TestNs::new();
        ns.exec(&[
            "sysctl",
            "-qw",
            &format!("net.ipv4.tcp_timestamps={timestamps}"),
        ]);
        let netns = ns.netns();
        let server = Server::start(&netns, 8080);
        let passthrough = Passthrough::open(&netns, 8080).unwrap();
        for client in ["203.0.113.7:40001", "[2001:db8::7]:40002"] {
            for server_closes in [false, true] {
                round_trip(&passthrough, &server, client, server_closes).await;
                // The side that closed first waits: the agent's socket
                // (local address the client's), or the server's.
                let waiting = ns.time_wait();
                let addr = client.parse::<SocketAddr>().unwrap();
                let (ip, port) = (addr.ip().to_string(), format!(":{}", addr.port()));
                let holder = waiting.lines().find_map(|line| {
                    let fields: Vec<_> = line.split_whitespace().collect();
                    (fields.len() >= 4 && line.contains(&ip) && line.contains(&port))
                        .then(|| fields[2].to_string())
                });
                let holder =
                    holder.unwrap_or_else(|| panic!("no TIME_WAIT for {client}: {waiting}"));
                assert_eq!(holder.ends_with(":8080"), server_closes, "{waiting}");
                let started = Instant::now();
                round_trip(&passthrough, &server, client, server_closes).await;
                assert!(
                    started.elapsed() < Duration::from_millis(900),
                    "timestamps={timestamps} server_closes={server_closes} {client}: took {:?}",
                    started.elapsed()
                );
            }
        }
    }
}

/// A pass-through still open keeps its four-tuple: a second one from the
/// same client address fails and the first goes on.
#[tokio::test]
async fn an_open_pass_through_is_never_ended_for_a_new_one() {
    let ns = TestNs::new();
    let netns = ns.netns();
    let server = Server::start(&netns, 8080);
    let passthrough = Passthrough::open(&netns, 8080).unwrap();
    let client: SocketAddr = "203.0.113.7:40005".parse().unwrap();
    let mut first = passthrough.connect(client).await.unwrap();
    server.peer();
    let err = passthrough.connect(client).await.unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::AddrNotAvailable, "{err}");
    assert!(err.to_string().contains("still holds"), "{err}");
    first.write_all(b"still").await.unwrap();
    let mut answer = [0; 5];
    first.read_exact(&mut answer).await.unwrap();
    assert_eq!(&answer, b"still");
}

#[tokio::test]
async fn ports_share_the_route_until_the_last_one_closes() {
    let ns = TestNs::new();
    let netns = ns.netns();
    let (server_a, server_b) = (Server::start(&netns, 8080), Server::start(&netns, 8081));
    let a = Passthrough::open(&netns, 8080).unwrap();
    let b = Passthrough::open(&netns, 8081).unwrap();
    round_trip(&a, &server_a, "203.0.113.7:40001", false).await;
    drop(a);
    let left = ns.ours();
    assert!(!left.contains("sport 8080"), "{left}");
    assert!(left.contains("sport 8081"), "{left}");
    round_trip(&b, &server_b, "203.0.113.7:40002", false).await;
    round_trip(&b, &server_b, "[2001:db8::7]:40003", false).await;
    drop(b);
    assert_eq!(ns.ours(), "");
}

#[tokio::test]
async fn clean_leftovers_removes_what_a_killed_agent_left() {
    let ns = TestNs::new();
    let netns = ns.netns();
    Passthrough::open(&netns, 8080).unwrap().abandon();
    let left = ns.ours();
    assert!(
        left.contains("sport 8080") && left.contains("local default"),
        "{left}"
    );
    let started = Instant::now();
    let cleaned = clean_leftovers();
    eprintln!(
        "clean_leftovers: {cleaned} namespace(s) cleaned in {:?}",
        started.elapsed()
    );
    assert!(cleaned >= 1);
    assert_eq!(ns.ours(), "");
}

#[tokio::test]
async fn opening_over_leftovers_works_and_leaves_nothing() {
    let ns = TestNs::new();
    let netns = ns.netns();
    let server = Server::start(&netns, 8080);
    Passthrough::open(&netns, 8080).unwrap().abandon();
    let passthrough = Passthrough::open(&netns, 8080).unwrap();
    round_trip(&passthrough, &server, "203.0.113.7:40001", false).await;
    drop(passthrough);
    assert_eq!(ns.ours(), "");
}

#[tokio::test]
async fn a_server_not_listening_is_named() {
    let ns = TestNs::new();
    let netns = ns.netns();
    let passthrough = Passthrough::open(&netns, 8080).unwrap();
    let err = passthrough
        .connect("203.0.113.7:40001".parse().unwrap())
        .await
        .expect_err("nothing listens");
    assert_eq!(err.kind(), io::ErrorKind::ConnectionRefused);
    assert!(
        err.to_string()
            .contains("the pod's server does not listen on 127.0.0.1:8080"),
        "{err}"
    );
    let err = passthrough
        .connect("[2001:db8::7]:40002".parse().unwrap())
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("does not listen on [::1]:8080"),
        "{err}"
    );
}

#[tokio::test]
async fn a_namespace_without_ipv6_still_passes_ipv4() {
    let ns = TestNs::new();
    ns.exec(&["sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1"]);
    ns.exec(&["sysctl", "-qw", "net.ipv6.conf.lo.disable_ipv6=1"]);
    let netns = ns.netns();
    let server = Server::start(&netns, 8080);
    let passthrough = Passthrough::open(&netns, 8080).unwrap();
    round_trip(&passthrough, &server, "203.0.113.7:40001", false).await;
    let err = passthrough
        .connect("[2001:db8::7]:40002".parse().unwrap())
        .await
        .unwrap_err();
    let err = err.to_string();
    assert!(
        err.contains("[2001:db8::7]:40002") && err.contains("has no IPv6"),
        "{err}"
    );
    drop(passthrough);
    assert_eq!(ns.ours(), "");
}

/// Not a bound (machines differ): prints what a pass-through connect costs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_cost() {
    let ns = TestNs::new();
    let netns = ns.netns();
    let server = Server::start(&netns, 8080);
    let passthrough = Passthrough::open(&netns, 8080).unwrap();
    const CONNECTIONS: u16 = 500;
    let mut spent = Duration::ZERO;
    for port in 0..CONNECTIONS {
        let client = SocketAddr::from(([203, 0, 113, 7], 20000 + port));
        let started = Instant::now();
        let stream = passthrough.connect(client).await.unwrap();
        spent += started.elapsed();
        drop(stream);
        server.peer();
    }
    eprintln!(
        "pass-through connect: {:?} each",
        spent / u32::from(CONNECTIONS)
    );
    // What the socket maker saves: a thread entering the namespace per
    // connection, just to make the socket.
    let started = Instant::now();
    for _ in 0..CONNECTIONS {
        netns
            .run_in(|| Socket::new(Domain::IPV4, Type::STREAM, None))
            .unwrap()
            .unwrap();
    }
    eprintln!(
        "a setns thread per socket instead: {:?} each",
        started.elapsed() / u32::from(CONNECTIONS)
    );
    let started = Instant::now();
    let opened = Passthrough::open(&netns, 9090).unwrap();
    let open_cost = started.elapsed();
    let started = Instant::now();
    drop(opened);
    eprintln!("open: {open_cost:?}, drop: {:?}", started.elapsed());
}
