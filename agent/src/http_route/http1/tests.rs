//! HTTP/1 routing end to end on loopback: a real client socket, the router
//! (`http_route::serve`, sniffing included), and small real HTTP/1 servers
//! for the pod and two sessions, each answering with its own name. Nothing
//! here uses the router's internals, so these tests outlive a rewrite.
use std::{
    collections::HashMap,
    io,
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use futures::{FutureExt as _, future::BoxFuture};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
    time::Instant,
};
use tokio_util::sync::CancellationToken;

use crate::http_route::{self, Limits, Opened, Request, Side, Upstreams};

const ALICE: Side = Side::Session(1);
const BOB: Side = Side::Session(2);
/// A session whose client cannot be reached.
const CAROL: Side = Side::Session(3);

/// Routes on `x-dev`, as a filter on that header would.
#[derive(Clone)]
struct Fake {
    addresses: Arc<HashMap<Side, SocketAddr>>,
    routed: Arc<Mutex<HashMap<Side, usize>>>,
}

impl Upstreams for Fake {
    fn pick(&self, request: &Request<'_>) -> Side {
        let dev = request
            .headers
            .iter()
            .find(|(name, _)| name.eq_ignore_ascii_case("x-dev"))
            .map(|(_, value)| *value);
        match dev {
            Some(b"alice") => ALICE,
            Some(b"bob") => BOB,
            Some(b"carol") => CAROL,
            _ => Side::Pod,
        }
    }

    fn open(&self, side: Side) -> BoxFuture<'static, io::Result<Opened>> {
        let address = self.addresses.get(&side).copied();
        async move {
            let address = address.ok_or_else(|| io::Error::other("no such side"))?;
            let stream = TcpStream::connect(address).await?;
            stream.set_nodelay(true)?;
            Ok(Opened::from(stream))
        }
        .boxed()
    }

    fn routed(&self, side: Side) {
        *self.routed.lock().unwrap().entry(side).or_default() += 1;
    }
}

/// The router on a loopback port, in front of three named servers.
struct Bed {
    address: SocketAddr,
    routed: Arc<Mutex<HashMap<Side, usize>>>,
    closing: CancellationToken,
    pod: Server,
    alice: Server,
}

impl Bed {
    async fn new(limits: Limits) -> Self {
        let pod = Server::start("pod").await;
        let alice = Server::start("alice").await;
        let bob = Server::start("bob").await;
        let nobody = {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            listener.local_addr().unwrap()
        };
        let fake = Fake {
            addresses: Arc::new(HashMap::from([
                (Side::Pod, pod.address),
                (ALICE, alice.address),
                (BOB, bob.address),
                (CAROL, nobody),
            ])),
            routed: Arc::default(),
        };
        let closing = CancellationToken::new();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let (routes, token) = (fake.clone(), closing.clone());
        tokio::spawn(async move {
            while let Ok((stream, client)) = listener.accept().await {
                let (routes, token) = (routes.clone(), token.clone());
                tokio::spawn(http_route::serve(stream, client, routes, token, limits));
            }
        });
        Self {
            address,
            routed: fake.routed,
            closing,
            pod,
            alice,
        }
    }

    async fn connect(&self) -> Wire {
        let stream = TcpStream::connect(self.address).await.unwrap();
        stream.set_nodelay(true).unwrap();
        Wire::new(stream)
    }

    fn routed(&self) -> HashMap<Side, usize> {
        self.routed.lock().unwrap().clone()
    }
}

/// A test server's connection count, to see upstreams reused or reopened.
struct Server {
    address: SocketAddr,
    accepted: Arc<AtomicUsize>,
}

impl Server {
    async fn start(name: &'static str) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                stream.set_nodelay(true).unwrap();
                tokio::spawn(async move {
                    let _ = serve_requests(name, Wire::new(stream)).await;
                });
            }
        });
        Self { address, accepted }
    }

    fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

/// A small HTTP/1.1 server whose answers depend on the path; by default the
/// body names the server and describes the request it received.
async fn serve_requests(name: &str, mut wire: Wire) -> io::Result<()> {
    // Set by `/then-drop`: the next request is read, then the connection
    // closed unanswered, as when a server's idle timeout races a request.
    let mut drop_next = false;
    while let Some(raw) = wire.head().await? {
        if drop_next {
            return Ok(());
        }
        let head = Head::parse(&raw);
        let path = head.target.split('?').next().unwrap_or_default();
        match path {
            "/no-answer" => return Ok(()),
            "/early" => {
                wire.send(b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                    .await?;
                return wire.linger().await;
            }
            _ => {}
        }
        if head.header("expect") == Some("100-continue") {
            wire.send(b"HTTP/1.1 100 Continue\r\n\r\n").await?;
        }
        let mut digest = Digest::default();
        let (length, trailers) = if head.header("transfer-encoding") == Some("chunked") {
            wire.chunked(&mut digest, &mut Vec::new()).await?
        } else {
            let length = head
                .header("content-length")
                .map_or(0, |value| value.parse().unwrap());
            wire.exact(length, &mut digest, None).await?;
            (length, String::new())
        };
        let close = head.header("connection") == Some("close") || head.http10;
        let info = format!(
            "{name} {} {path} len={length} fnv={:016x} trailers=[{trailers}]",
            head.method, digest.0
        );
        let ok = |extra: &str, body: &[u8]| {
            let mut answer = format!(
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nx-from: {name}\r\n{extra}{}\r\n",
                body.len(),
                if close { "Connection: close\r\n" } else { "" }
            )
            .into_bytes();
            if head.method != "HEAD" {
                answer.extend_from_slice(body);
            }
            answer
        };
        match path {
            "/raw" => wire.send(&ok("", &raw)).await?,
            "/ka" => {
                wire.send(&ok(
                    "Connection: keep-alive\r\nKeep-Alive: timeout=30\r\n",
                    info.as_bytes(),
                ))
                .await?
            }
            "/chunked" => wire.send(&chunked_answer(name)).await?,
            "/status/204" => {
                wire.send(b"HTTP/1.1 204 No Content\r\nx-from: 204\r\n\r\n")
                    .await?
            }
            "/status/304" => {
                wire.send(b"HTTP/1.1 304 Not Modified\r\nContent-Length: 5\r\n\r\n")
                    .await?
            }
            "/until-close" => {
                wire.send(format!("HTTP/1.1 200 OK\r\n\r\n{info}").as_bytes())
                    .await?;
                return wire.linger().await;
            }
            "/upgrade" if head.header("upgrade").is_some() => {
                wire.send(b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: echo\r\n\r\n")
                    .await?;
                return echo_until_closed(name, wire).await;
            }
            "/slow" => {
                tokio::time::sleep(Duration::from_millis(300)).await;
                wire.send(&ok("", info.as_bytes())).await?;
            }
            "/then-drop" => {
                wire.send(&ok("", info.as_bytes())).await?;
                drop_next = true;
            }
            "/close-after" => {
                // Closes without having said so, as an idle timeout would.
                wire.send(&ok("", info.as_bytes())).await?;
                return Ok(());
            }
            "/drop-midway" => {
                wire.send(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n0123456789")
                    .await?;
                return Ok(());
            }
            _ if path.starts_with("/download/") => {
                let length: u64 = path["/download/".len()..].parse().unwrap();
                wire.send(
                    format!("HTTP/1.1 200 OK\r\nContent-Length: {length}\r\n\r\n").as_bytes(),
                )
                .await?;
                send_pattern(&mut wire.stream, length).await?;
            }
            _ => wire.send(&ok("", info.as_bytes())).await?,
        }
        if close {
            return wire.linger().await;
        }
    }
    Ok(())
}

async fn echo_until_closed(name: &str, mut wire: Wire) -> io::Result<()> {
    let early = std::mem::take(&mut wire.buf);
    wire.send(&early).await?;
    let mut chunk = [0u8; 4096];
    loop {
        let read = wire.stream.read(&mut chunk).await?;
        if read == 0 {
            break;
        }
        wire.send(&chunk[..read]).await?;
    }
    wire.send(format!("bye from {name}").as_bytes()).await?;
    wire.stream.shutdown().await
}

fn chunked_answer(name: &str) -> Vec<u8> {
    format!(
        "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n{name}\r\n3;x=\"y\"\r\nabc\r\n0\r\nx-trailer: {name}\r\n\r\n",
        name.len()
    )
    .into_bytes()
}

/// The chunked body `chunked_answer` sends, as the client must see it.
fn chunked_answer_body(name: &str) -> Vec<u8> {
    let answer = chunked_answer(name);
    let at = find(&answer, b"\r\n\r\n").unwrap() + 4;
    answer[at..].to_vec()
}

/// Deterministic, aperiodic-enough bytes for the large bodies.
fn pattern(at: u64) -> u8 {
    (at.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 57) as u8 ^ (at >> 9) as u8
}

fn pattern_digest(length: u64) -> u64 {
    let mut digest = Digest::default();
    let mut at = 0;
    while at < length {
        let block: Vec<u8> = (at..(at + 65536).min(length)).map(pattern).collect();
        digest.update(&block);
        at += block.len() as u64;
    }
    digest.0
}

async fn send_pattern(stream: &mut TcpStream, length: u64) -> io::Result<()> {
    let mut at = 0;
    while at < length {
        let block: Vec<u8> = (at..(at + 65536).min(length)).map(pattern).collect();
        stream.write_all(&block).await?;
        at += block.len() as u64;
    }
    Ok(())
}

/// FNV-1a, enough to compare large bodies without keeping them.
struct Digest(u64);

impl Default for Digest {
    fn default() -> Self {
        Self(0xcbf2_9ce4_8422_2325)
    }
}

impl Digest {
    fn update(&mut self, bytes: &[u8]) {
        for byte in bytes {
            self.0 = (self.0 ^ u64::from(*byte)).wrapping_mul(0x0100_0000_01b3);
        }
    }

    fn of(bytes: &[u8]) -> u64 {
        let mut digest = Self::default();
        digest.update(bytes);
        digest.0
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack
        .windows(needle.len())
        .position(|window| window == needle)
}

/// A request or response head, parsed by the tests' own means.
struct Head {
    method: String,
    target: String,
    code: u16,
    http10: bool,
    headers: Vec<(String, String)>,
    raw: String,
}

impl Head {
    fn parse(raw: &[u8]) -> Self {
        let text = String::from_utf8_lossy(raw).into_owned();
        let mut lines = text.split("\r\n");
        let start: Vec<&str> = lines.next().unwrap().splitn(3, ' ').collect();
        let response = start[0].starts_with("HTTP/");
        let headers = lines
            .filter(|line| !line.is_empty())
            .map(|line| {
                let (name, value) = line.split_once(':').unwrap();
                (name.to_ascii_lowercase(), value.trim().to_string())
            })
            .collect();
        Self {
            method: if response {
                String::new()
            } else {
                start[0].to_string()
            },
            target: if response {
                String::new()
            } else {
                start[1].to_string()
            },
            code: if response {
                start[1].parse().unwrap()
            } else {
                0
            },
            http10: if response {
                start[0] == "HTTP/1.0"
            } else {
                start[2] == "HTTP/1.0"
            },
            headers,
            raw: text,
        }
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(header, _)| header == name)
            .map(|(_, value)| value.as_str())
    }
}

/// One end of a connection, with what was read and not consumed yet.
struct Wire {
    stream: TcpStream,
    buf: Vec<u8>,
}

/// A response as the client got it: a chunked body is kept as sent.
struct Answer {
    head: Head,
    body: Vec<u8>,
}

impl Answer {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

impl Wire {
    fn new(stream: TcpStream) -> Self {
        Self {
            stream,
            buf: Vec::new(),
        }
    }

    async fn send(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.stream.write_all(bytes).await
    }

    async fn fill(&mut self) -> io::Result<usize> {
        let mut chunk = [0u8; 16 * 1024];
        let read = self.stream.read(&mut chunk).await?;
        self.buf.extend_from_slice(&chunk[..read]);
        Ok(read)
    }

    async fn head(&mut self) -> io::Result<Option<Vec<u8>>> {
        loop {
            if let Some(at) = find(&self.buf, b"\r\n\r\n") {
                return Ok(Some(self.buf.drain(..at + 4).collect()));
            }
            if self.fill().await? == 0 {
                return match self.buf.is_empty() {
                    true => Ok(None),
                    false => Err(io::ErrorKind::UnexpectedEof.into()),
                };
            }
        }
    }

    async fn exact(
        &mut self,
        mut length: u64,
        digest: &mut Digest,
        mut keep: Option<&mut Vec<u8>>,
    ) -> io::Result<()> {
        while length > 0 {
            if self.buf.is_empty() && self.fill().await? == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            let taken = length.min(self.buf.len() as u64) as usize;
            digest.update(&self.buf[..taken]);
            if let Some(keep) = keep.as_deref_mut() {
                keep.extend_from_slice(&self.buf[..taken]);
            }
            self.buf.drain(..taken);
            length -= taken as u64;
        }
        Ok(())
    }

    async fn line(&mut self) -> io::Result<Vec<u8>> {
        loop {
            if let Some(at) = find(&self.buf, b"\r\n") {
                return Ok(self.buf.drain(..at + 2).collect());
            }
            if self.fill().await? == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
        }
    }

    /// Reads a chunked body, kept as sent in `raw`; its data length and trailers.
    async fn chunked(
        &mut self,
        digest: &mut Digest,
        raw: &mut Vec<u8>,
    ) -> io::Result<(u64, String)> {
        let mut length = 0;
        loop {
            let line = self.line().await?;
            raw.extend_from_slice(&line);
            let text = String::from_utf8_lossy(&line);
            let size =
                u64::from_str_radix(text.split([';', '\r']).next().unwrap().trim(), 16).unwrap();
            if size == 0 {
                let mut trailers = String::new();
                loop {
                    let line = self.line().await?;
                    raw.extend_from_slice(&line);
                    if line == b"\r\n" {
                        return Ok((length, trailers));
                    }
                    trailers.push_str(String::from_utf8_lossy(&line).trim());
                }
            }
            self.exact(size, digest, Some(raw)).await?;
            raw.extend_from_slice(&self.line().await?);
            length += size;
        }
    }

    /// The next response, its body read as its framing says.
    async fn answer(&mut self, method: &str) -> Answer {
        let raw = self.head().await.unwrap().expect("a response");
        let head = Head::parse(&raw);
        let mut body = Vec::new();
        let mut digest = Digest::default();
        if method == "HEAD" || head.code < 200 || head.code == 204 || head.code == 304 {
        } else if head.header("transfer-encoding") == Some("chunked") {
            self.chunked(&mut digest, &mut body).await.unwrap();
        } else if let Some(length) = head.header("content-length") {
            self.exact(length.parse().unwrap(), &mut digest, Some(&mut body))
                .await
                .unwrap();
        } else {
            body = std::mem::take(&mut self.buf);
            self.stream.read_to_end(&mut body).await.unwrap();
        }
        Answer { head, body }
    }

    /// Sends `request` and returns the answer.
    async fn ask(&mut self, request: &str) -> Answer {
        self.send(request.as_bytes()).await.unwrap();
        self.answer(request.split(' ').next().unwrap()).await
    }

    /// The peer closed the connection cleanly, with nothing more to say.
    async fn ends(&mut self) -> bool {
        self.buf.is_empty()
            && matches!(
                tokio::time::timeout(Duration::from_secs(3), self.fill()).await,
                Ok(Ok(0))
            )
    }

    /// Reads whatever else comes until the peer closes (or resets).
    async fn rest(&mut self) -> Vec<u8> {
        while let Ok(Ok(1..)) = tokio::time::timeout(Duration::from_secs(3), self.fill()).await {}
        std::mem::take(&mut self.buf)
    }

    /// Closes after our last answer without resetting the peer.
    async fn linger(&mut self) -> io::Result<()> {
        self.stream.shutdown().await?;
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            while let Ok(1..) = self.fill().await {
                self.buf.clear();
            }
        })
        .await;
        Ok(())
    }
}

fn get(path: &str, dev: &str) -> String {
    format!("GET {path} HTTP/1.1\r\nHost: web\r\nx-dev: {dev}\r\n\r\n")
}

/// Every test gets this long, so a bug shows as a failure, not a hang.
async fn within<T>(test: impl Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(60), test)
        .await
        .expect("the test took too long")
}

#[tokio::test]
async fn requests_on_one_connection_each_reach_their_side() {
    within(async {
        let bed = Bed::new(Limits::default()).await;
        let mut client = bed.connect().await;
        for (dev, server) in [
            ("alice", "alice"),
            ("bob", "bob"),
            ("nobody", "pod"),
            ("alice", "alice"),
        ] {
            let answer = client.ask(&get("/who", dev)).await;
            assert_eq!(answer.head.code, 200);
            assert!(
                answer.text().starts_with(&format!("{server} GET /who ")),
                "{}",
                answer.text()
            );
        }
        // Alice's upstream was kept for her second request.
        assert_eq!(bed.alice.accepted(), 1);
        assert_eq!(
            bed.routed(),
            HashMap::from([(ALICE, 2), (BOB, 1), (Side::Pod, 1)])
        );
    })
    .await;
}

#[tokio::test]
async fn a_connection_idle_for_a_while_still_serves_its_sides() {
    within(async {
        let bed = Bed::new(Limits::default()).await;
        let mut client = bed.connect().await;
        let expected = pattern_digest(100_000);
        for _ in 0..2 {
            for dev in ["alice", "nobody"] {
                client
                    .send(get("/download/100000", dev).as_bytes())
                    .await
                    .unwrap();
                client.head().await.unwrap().unwrap();
                let mut digest = Digest::default();
                client.exact(100_000, &mut digest, None).await.unwrap();
                assert_eq!(digest.0, expected);
            }
            // Long enough for the router to give its buffers back.
            tokio::time::sleep(Duration::from_millis(1500)).await;
        }
        assert_eq!((bed.alice.accepted(), bed.pod.accepted()), (1, 1));
    })
    .await;
}

#[tokio::test]
async fn pipelined_requests_are_answered_in_order() {
    within(async {
        let bed = Bed::new(Limits::default()).await;
        let mut client = bed.connect().await;
        let post =
            "POST /form HTTP/1.1\r\nHost: web\r\nx-dev: alice\r\nContent-Length: 5\r\n\r\nhello";
        let requests = [
            get("/1", "alice"),
            get("/2", "nobody"),
            get("/3", "bob"),
            post.to_string(),
        ]
        .concat();
        client.send(requests.as_bytes()).await.unwrap();
        let post_info = format!("alice POST /form len=5 fnv={:016x} ", Digest::of(b"hello"));
        for expected in ["alice GET /1 ", "pod GET /2 ", "bob GET /3 ", &post_info] {
            let answer = client.answer("GET").await;
            assert!(answer.text().starts_with(expected), "{}", answer.text());
        }
        assert!(
            client
                .ask(&get("/4", "alice"))
                .await
                .text()
                .starts_with("alice GET /4")
        );
    })
    .await;
}

#[tokio::test]
async fn request_heads_reach_the_server_verbatim() {
    within(async {
        let bed = Bed::new(Limits::default()).await;
        let mut client = bed.connect().await;
        for dev in ["alice", "someone"] {
            let request = format!(
                "GET /raw?q=%20a&b HTTP/1.1\r\nHost: web\r\nX-Dev:   {dev}  \r\nx-CaSe: MiXed\r\nx-dup: 1\r\nx-dup: 2\r\n\r\n"
            );
            let answer = client.ask(&request).await;
            assert_eq!(answer.body, request.as_bytes());
        }
    })
    .await;
}

#[tokio::test]
async fn chunked_bodies_pass_through_both_ways() {
    within(async {
        let bed = Bed::new(Limits::default()).await;
        let mut client = bed.connect().await;
        for (dev, server) in [("alice", "alice"), ("nobody", "pod")] {
            // In pieces that cut the framing anywhere, to be parsed as it comes.
            let request = format!(
                "POST /up HTTP/1.1\r\nHost: web\r\nx-dev: {dev}\r\nTransfer-Encoding: chunked\r\n\r\n4;ext=1\r\nwiki\r\n5\r\npedia\r\n0\r\nx-sum: 9\r\n\r\n"
            );
            for piece in request.as_bytes().chunks(7) {
                client.send(piece).await.unwrap();
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            let answer = client.answer("POST").await;
            let expected = format!(
                "{server} POST /up len=9 fnv={:016x} trailers=[x-sum: 9]",
                Digest::of(b"wikipedia")
            );
            assert_eq!(answer.text(), expected);
            let answer = client.ask(&get("/chunked", dev)).await;
            assert_eq!(answer.head.header("transfer-encoding"), Some("chunked"));
            assert_eq!(answer.body, chunked_answer_body(server));
        }
        // The framing ended where it should: the connection goes on.
        assert!(client.ask(&get("/after", "bob")).await.text().starts_with("bob GET /after"));
    })
    .await;
}

#[tokio::test]
async fn large_bodies_stream_through_byte_exact() {
    within(async {
        const LENGTH: u64 = 20 * 1024 * 1024;
        let bed = Bed::new(Limits::default()).await;
        let mut client = bed.connect().await;
        let expected = pattern_digest(LENGTH);
        for (dev, server) in [("alice", "alice"), ("nobody", "pod")] {
            let head = format!("PUT /upload HTTP/1.1\r\nHost: web\r\nx-dev: {dev}\r\nContent-Length: {LENGTH}\r\n\r\n");
            client.send(head.as_bytes()).await.unwrap();
            send_pattern(&mut client.stream, LENGTH).await.unwrap();
            let answer = client.answer("PUT").await;
            assert_eq!(
                answer.text(),
                format!("{server} PUT /upload len={LENGTH} fnv={expected:016x} trailers=[]")
            );
            client.send(get(&format!("/download/{LENGTH}"), dev).as_bytes()).await.unwrap();
            let raw = client.head().await.unwrap().unwrap();
            assert_eq!(Head::parse(&raw).header("content-length"), Some(LENGTH.to_string().as_str()));
            let mut digest = Digest::default();
            client.exact(LENGTH, &mut digest, None).await.unwrap();
            assert_eq!(digest.0, expected);
        }
    })
    .await;
}

#[tokio::test]
async fn expect_100_continue_gets_the_interim_answer_before_the_body() {
    within(async {
        let bed = Bed::new(Limits::default()).await;
        let mut client = bed.connect().await;
        client
            .send(b"POST /form HTTP/1.1\r\nHost: web\r\nx-dev: bob\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n")
            .await
            .unwrap();
        let interim = client.answer("POST").await;
        assert_eq!(interim.head.code, 100);
        client.send(b"hello").await.unwrap();
        let answer = client.answer("POST").await;
        assert_eq!(answer.head.code, 200);
        assert!(answer.text().starts_with("bob POST /form len=5 "), "{}", answer.text());
    })
    .await;
}

#[tokio::test]
async fn an_accepted_upgrade_becomes_a_tunnel_both_ways() {
    within(async {
        let bed = Bed::new(Limits::default()).await;
        let mut client = bed.connect().await;
        assert!(client.ask(&get("/first", "bob")).await.text().starts_with("bob GET /first"));
        let answer = client
            .ask("GET /upgrade HTTP/1.1\r\nHost: web\r\nx-dev: bob\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\n")
            .await;
        assert_eq!(answer.head.code, 101);
        const RAW: &[u8] = b"ping \x00\xff raw";
        client.send(RAW).await.unwrap();
        while client.buf.len() < RAW.len() {
            assert!(client.fill().await.unwrap() > 0);
        }
        assert_eq!(std::mem::take(&mut client.buf), RAW);
        // Our half-close reaches the server, which still answers after it.
        client.stream.shutdown().await.unwrap();
        assert_eq!(client.rest().await, b"bye from bob");
    })
    .await;
}

#[tokio::test]
async fn a_refused_upgrade_stays_http() {
    within(async {
        let bed = Bed::new(Limits::default()).await;
        let mut client = bed.connect().await;
        let answer = client
            .ask("GET /no-upgrade HTTP/1.1\r\nHost: web\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\n")
            .await;
        assert_eq!(answer.head.code, 200);
        assert!(answer.text().starts_with("pod GET /no-upgrade"));
        assert!(client.ask(&get("/next", "alice")).await.text().starts_with("alice GET /next"));
    })
    .await;
}

#[tokio::test]
async fn closing_marks_the_next_answer_and_ends_the_connection() {
    within(async {
        let bed = Bed::new(Limits::default()).await;
        let mut client = bed.connect().await;
        let answer = client.ask(&get("/ka", "alice")).await;
        assert_eq!(answer.head.header("connection"), Some("keep-alive"));
        bed.closing.cancel();
        let answer = client.ask(&get("/ka", "alice")).await;
        assert!(answer.text().starts_with("alice GET /ka"));
        assert_eq!(answer.head.header("connection"), Some("close"));
        assert_eq!(
            answer.head.header("keep-alive"),
            None,
            "{}",
            answer.head.raw
        );
        assert_eq!(answer.head.header("x-from"), Some("alice"));
        assert!(client.ends().await);
    })
    .await;
}

#[tokio::test]
async fn closing_during_a_request_marks_its_answer() {
    within(async {
        let bed = Bed::new(Limits::default()).await;
        let mut client = bed.connect().await;
        client
            .send(get("/slow", "nobody").as_bytes())
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        bed.closing.cancel();
        let answer = client.answer("GET").await;
        assert!(answer.text().starts_with("pod GET /slow"));
        assert_eq!(answer.head.header("connection"), Some("close"));
        assert!(client.ends().await);
    })
    .await;
}

#[tokio::test]
async fn an_idle_connection_closes_after_the_closing_grace() {
    within(async {
        let bed = Bed::new(Limits::default()).await;
        let mut client = bed.connect().await;
        assert_eq!(client.ask(&get("/", "alice")).await.head.code, 200);
        bed.closing.cancel();
        let cancelled = Instant::now();
        let read = client.fill().await.unwrap();
        let waited = cancelled.elapsed();
        assert_eq!(read, 0);
        assert!(
            waited >= Duration::from_millis(4500) && waited < Duration::from_secs(7),
            "{waited:?}"
        );
    })
    .await;
}

#[tokio::test]
async fn an_oversized_head_gets_431() {
    within(async {
        let bed = Bed::new(Limits::default()).await;
        let mut client = bed.connect().await;
        let request = format!(
            "GET / HTTP/1.1\r\nHost: web\r\nx-big: {}\r\n\r\n",
            "a".repeat(70 * 1024)
        );
        let answer = client.ask(&request).await;
        assert_eq!(answer.head.code, 431);
        assert_eq!(answer.head.header("connection"), Some("close"));
        assert!(client.ends().await);
        let mut client = bed.connect().await;
        let many: String = (0..300).map(|at| format!("x-{at}: v\r\n")).collect();
        let answer = client.ask(&format!("GET / HTTP/1.1\r\n{many}\r\n")).await;
        assert_eq!(answer.head.code, 431);
        assert!(bed.routed().is_empty());
    })
    .await;
}

#[tokio::test]
async fn ambiguous_framing_gets_400_and_reaches_nobody() {
    within(async {
        let bed = Bed::new(Limits::default()).await;
        for framing in [
            "Content-Length: 5\r\nTransfer-Encoding: chunked",
            "Content-Length: 5\r\nContent-Length: 6",
            "Content-Length: 5, 6",
            "Content-Length: -5",
            "Transfer-Encoding: chunked, gzip",
            "Transfer-Encoding: gzip",
        ] {
            let mut client = bed.connect().await;
            let answer = client
                .ask(&format!(
                    "POST / HTTP/1.1\r\nHost: web\r\nx-dev: alice\r\n{framing}\r\n\r\nhello"
                ))
                .await;
            assert_eq!(answer.head.code, 400, "{framing}");
            assert!(answer.text().starts_with("remocal: "), "{}", answer.text());
            assert!(client.ends().await);
        }
        assert!(bed.routed().is_empty());
        assert_eq!(bed.alice.accepted(), 0);
    })
    .await;
}

#[tokio::test]
async fn garbage_gets_400() {
    within(async {
        let bed = Bed::new(Limits::default()).await;
        for garbage in [
            &b"GET / HTTP/1.1\r\nnot a header\r\n\r\n"[..],
            b"GET /\x01 HTTP/1.1\r\n\r\n",
            b"GET / HTTP/1.1\nHost: web\n\n",
            b"GET / HTTP/7.1\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost : web\r\n\r\n",
        ] {
            let mut client = bed.connect().await;
            client.send(garbage).await.unwrap();
            let answer = client.answer("GET").await;
            assert_eq!(
                answer.head.code,
                400,
                "{}",
                String::from_utf8_lossy(garbage)
            );
            assert!(client.ends().await);
        }
        // A chunked body gone wrong before any answer is a 400 too.
        let mut client = bed.connect().await;
        let answer = client
            .ask("POST / HTTP/1.1\r\nHost: web\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n")
            .await;
        assert_eq!(answer.head.code, 400);
    })
    .await;
}

#[tokio::test]
async fn an_unreachable_side_gets_502_naming_it() {
    within(async {
        let bed = Bed::new(Limits::default()).await;
        let mut client = bed.connect().await;
        assert_eq!(client.ask(&get("/", "alice")).await.head.code, 200);
        let answer = client.ask(&get("/", "carol")).await;
        assert_eq!(answer.head.code, 502);
        assert_eq!(answer.head.header("connection"), Some("close"));
        assert_eq!(answer.head.header("content-type"), Some("text/plain"));
        let text = answer.text();
        assert!(
            text.starts_with("remocal: could not reach session 3: "),
            "{text}"
        );
        assert_eq!(text.lines().count(), 1);
        assert!(client.ends().await);
        assert_eq!(bed.routed()[&CAROL], 1);
    })
    .await;
}

#[tokio::test]
async fn an_upstream_closing_before_answering_gets_502() {
    within(async {
        let bed = Bed::new(Limits::default()).await;
        let mut client = bed.connect().await;
        let answer = client.ask(&get("/no-answer", "alice")).await;
        assert_eq!(answer.head.code, 502);
        assert_eq!(
            answer.text(),
            "remocal: session 1 closed the connection before answering\n"
        );
        assert!(client.ends().await);
    })
    .await;
}

#[tokio::test]
async fn an_answer_broken_midway_is_not_completed() {
    within(async {
        let bed = Bed::new(Limits::default()).await;
        let mut client = bed.connect().await;
        client
            .send(get("/drop-midway", "bob").as_bytes())
            .await
            .unwrap();
        let raw = client.head().await.unwrap().unwrap();
        assert_eq!(Head::parse(&raw).header("content-length"), Some("100"));
        assert_eq!(client.rest().await, b"0123456789");
    })
    .await;
}

#[tokio::test]
async fn bodiless_answers_carry_no_body() {
    within(async {
        let bed = Bed::new(Limits::default()).await;
        let mut client = bed.connect().await;
        for dev in ["alice", "nobody"] {
            let answer = client
                .ask(&format!(
                    "HEAD /head HTTP/1.1\r\nHost: web\r\nx-dev: {dev}\r\n\r\n"
                ))
                .await;
            assert_eq!(answer.head.code, 200);
            assert_ne!(answer.head.header("content-length"), Some("0"));
            assert_eq!(client.ask(&get("/status/204", dev)).await.head.code, 204);
            let answer = client.ask(&get("/status/304", dev)).await;
            assert_eq!(
                (answer.head.code, answer.head.header("content-length")),
                (304, Some("5"))
            );
            // Nothing was waited for, nothing is left over: the next answer is whole.
            let answer = client.ask(&get("/after", dev)).await;
            assert!(answer.text().contains(" GET /after "), "{}", answer.text());
        }
    })
    .await;
}

#[tokio::test]
async fn an_answer_delimited_by_close_ends_the_connection() {
    within(async {
        let bed = Bed::new(Limits::default()).await;
        let mut client = bed.connect().await;
        let answer = client.ask(&get("/until-close", "alice")).await;
        assert!(
            answer.text().starts_with("alice GET /until-close"),
            "{}",
            answer.text()
        );
        assert!(client.ends().await);
    })
    .await;
}

#[tokio::test]
async fn a_pod_connection_closed_between_requests_is_reopened() {
    within(async {
        let bed = Bed::new(Limits::default()).await;
        let mut client = bed.connect().await;
        assert!(
            client
                .ask(&get("/close-after", "nobody"))
                .await
                .text()
                .starts_with("pod GET")
        );
        let post = "POST /form HTTP/1.1\r\nHost: web\r\nContent-Length: 2\r\n\r\nhi";
        assert!(
            client
                .ask(post)
                .await
                .text()
                .starts_with("pod POST /form len=2")
        );
        assert!(
            client
                .ask(&get("/close-after", "alice"))
                .await
                .text()
                .starts_with("alice GET")
        );
        assert!(
            client
                .ask(&get("/again", "alice"))
                .await
                .text()
                .starts_with("alice GET /again")
        );
        assert_eq!((bed.pod.accepted(), bed.alice.accepted()), (2, 2));
    })
    .await;
}

#[tokio::test]
async fn a_request_a_kept_upstream_dropped_is_sent_again_only_when_safe() {
    within(async {
        let bed = Bed::new(Limits::default()).await;
        let mut client = bed.connect().await;
        for dev in ["alice", "nobody"] {
            assert_eq!(client.ask(&get("/then-drop", dev)).await.head.code, 200);
            // Idempotent and bodiless: sent again on a new connection.
            let answer = client.ask(&get("/again", dev)).await;
            assert!(answer.text().contains(" GET /again "), "{}", answer.text());
        }
        assert_eq!((bed.alice.accepted(), bed.pod.accepted()), (2, 2));
        assert_eq!(bed.routed(), HashMap::from([(ALICE, 2), (Side::Pod, 2)]));
        // A POST may have been acted on: the client is told, not retried for.
        assert_eq!(client.ask(&get("/then-drop", "alice")).await.head.code, 200);
        let answer = client
            .ask("POST /form HTTP/1.1\r\nHost: web\r\nx-dev: alice\r\nContent-Length: 2\r\n\r\nhi")
            .await;
        assert_eq!(answer.head.code, 502);
        assert!(
            answer.text().starts_with("remocal: session 1 "),
            "{}",
            answer.text()
        );
        assert_eq!(bed.alice.accepted(), 2);
    })
    .await;
}

#[tokio::test]
async fn the_pod_connection_opened_while_sniffing_is_used() {
    within(async {
        let limits = Limits {
            sniff: Duration::from_millis(50),
            ..Limits::default()
        };
        let bed = Bed::new(limits).await;
        let mut client = bed.connect().await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(bed.pod.accepted(), 1);
        assert!(
            client
                .ask(&get("/1", "nobody"))
                .await
                .text()
                .starts_with("pod GET /1")
        );
        assert!(
            client
                .ask(&get("/2", "alice"))
                .await
                .text()
                .starts_with("alice GET /2")
        );
        assert!(
            client
                .ask(&get("/3", "nobody"))
                .await
                .text()
                .starts_with("pod GET /3")
        );
        assert_eq!(bed.pod.accepted(), 1);
    })
    .await;
}

#[tokio::test]
async fn a_slow_head_gets_408() {
    within(async {
        let limits = Limits {
            head_timeout: Duration::from_millis(300),
            ..Limits::default()
        };
        let bed = Bed::new(limits).await;
        let mut client = bed.connect().await;
        client
            .send(b"GET / HTTP/1.1\r\nHost: web\r\n")
            .await
            .unwrap();
        let answer = client.answer("GET").await;
        assert_eq!(answer.head.code, 408);
        assert!(client.ends().await);
    })
    .await;
}

#[tokio::test]
async fn http10_without_keep_alive_is_closed_after_its_answer() {
    within(async {
        let bed = Bed::new(Limits::default()).await;
        let mut client = bed.connect().await;
        let answer = client.ask("GET /old HTTP/1.0\r\nx-dev: bob\r\n\r\n").await;
        assert!(answer.text().starts_with("bob GET /old"));
        assert!(client.ends().await);
    })
    .await;
}

#[tokio::test]
async fn an_early_answer_ends_the_upload() {
    within(async {
        let bed = Bed::new(Limits::default()).await;
        let mut client = bed.connect().await;
        let length = 8 * 1024 * 1024;
        let head = format!(
            "POST /early HTTP/1.1\r\nHost: web\r\nx-dev: alice\r\nContent-Length: {length}\r\n\r\n"
        );
        client.send(head.as_bytes()).await.unwrap();
        let (mut reader, mut writer) = client.stream.into_split();
        // The upload stops being read; writing it may then fail, as it would
        // with the server itself.
        let upload = tokio::spawn(async move {
            let block = vec![7u8; 64 * 1024];
            for _ in 0..length / block.len() {
                if writer.write_all(&block).await.is_err() {
                    break;
                }
            }
        });
        let mut received = Vec::new();
        let _ = reader.read_to_end(&mut received).await;
        let text = String::from_utf8_lossy(&received);
        assert!(
            text.starts_with("HTTP/1.1 413 Payload Too Large\r\n"),
            "{text}"
        );
        upload.abort();
    })
    .await;
}
