//! Byte streams through a steal: integrity under concurrency, half-close, and
//! per-connection backpressure.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use remocal_tests::data::{KIB, MIB, Pattern, splitmix64};
use remocal_tests::retry::until_ok;
use remocal_tests::scenario::Scenario;
use remocal_tests::servers::{self, TcpServer};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{Barrier, Notify};
use tokio::time::{Instant, sleep, timeout};

/// Seeds of the two directions of connection `id`, distinct across all connections.
fn seed_to_local(id: u32) -> u64 {
    u64::from(id) * 2
}
fn seed_to_remote(id: u32) -> u64 {
    u64::from(id) * 2 + 1
}

/// Writes `len` bytes of `pattern` in chunks, counting progress in `written`.
async fn write_pattern(
    writer: &mut (impl AsyncWrite + Unpin),
    mut pattern: Pattern,
    len: usize,
    written: &AtomicUsize,
) -> std::io::Result<()> {
    let mut buf = vec![0; 64 * KIB];
    let mut left = len;
    while left > 0 {
        let n = left.min(buf.len());
        pattern.fill(&mut buf[..n]);
        writer.write_all(&buf[..n]).await?;
        written.fetch_add(n, Ordering::Relaxed);
        left -= n;
    }
    Ok(())
}

/// Reads until EOF and checks that exactly `len` bytes of `pattern` arrived.
async fn expect_pattern(
    reader: &mut (impl AsyncRead + Unpin),
    mut pattern: Pattern,
    len: usize,
) -> Result<(), String> {
    let mut buf = vec![0; 64 * KIB];
    let mut scratch = Vec::new();
    let mut total = 0;
    loop {
        let n = reader
            .read(&mut buf)
            .await
            .map_err(|e| format!("read error after {total} bytes: {e}"))?;
        if n == 0 {
            break;
        }
        if total + n > len {
            return Err(format!("more than the {len} bytes expected"));
        }
        if !pattern.matches(&buf[..n], &mut scratch) {
            return Err(format!("wrong bytes at offset {total}..{}", total + n));
        }
        total += n;
    }
    if total == len {
        Ok(())
    } else {
        Err(format!("EOF after {total} of {len} bytes"))
    }
}

/// The local end of the integrity test: learns from a small header which connection it
/// serves, checks every byte the remote sent, and independently sends back that
/// connection's own stream, both directions at once.
async fn check_and_answer(
    mut stream: TcpStream,
    results: Arc<Mutex<HashMap<u32, Result<(), String>>>>,
) {
    let mut header = [0u8; 12];
    if stream.read_exact(&mut header).await.is_err() {
        return;
    }
    let id = u32::from_le_bytes(header[..4].try_into().unwrap());
    let len = u64::from_le_bytes(header[4..].try_into().unwrap()) as usize;
    let (mut reader, mut writer) = stream.into_split();
    let incoming = expect_pattern(&mut reader, Pattern::new(seed_to_local(id)), len);
    let outgoing = async {
        write_pattern(
            &mut writer,
            Pattern::new(seed_to_remote(id)),
            len,
            &AtomicUsize::new(0),
        )
        .await?;
        writer.shutdown().await
    };
    let (incoming, outgoing) = tokio::join!(incoming, outgoing);
    let result = incoming.and(outgoing.map_err(|e| format!("local write failed: {e}")));
    results.lock().unwrap().insert(id, result);
}

/// The remote end: sends its header and stream, half-closes, and checks what comes back.
async fn send_and_check(stream: TcpStream, id: u32, len: usize) -> Result<(), String> {
    let (mut reader, mut writer) = stream.into_split();
    let outgoing = async {
        let mut header = [0u8; 12];
        header[..4].copy_from_slice(&id.to_le_bytes());
        header[4..].copy_from_slice(&(len as u64).to_le_bytes());
        writer.write_all(&header).await?;
        write_pattern(
            &mut writer,
            Pattern::new(seed_to_local(id)),
            len,
            &AtomicUsize::new(0),
        )
        .await?;
        writer.shutdown().await
    };
    let incoming = expect_pattern(&mut reader, Pattern::new(seed_to_remote(id)), len);
    let (outgoing, incoming) = tokio::join!(outgoing, incoming);
    outgoing.map_err(|e| format!("remote write failed: {e}"))?;
    incoming
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_thousand_concurrent_stolen_connections_carry_their_own_bytes_both_ways() {
    const CONNECTIONS: u32 = 1000;
    // Every 40th connection carries 1 MiB each way, the others 4 to 64 KiB.
    let size_of = |id: u32| {
        if id.is_multiple_of(40) {
            MIB
        } else {
            4 * KIB + (splitmix64(u64::from(id)) % (60 * KIB as u64)) as usize
        }
    };

    let scenario = Scenario::start(1, &[80]).await;
    let results = Arc::new(Mutex::new(HashMap::new()));
    let local_results = results.clone();
    let local = TcpServer::local(move |s| check_and_answer(s, local_results.clone()));
    let pod = scenario.pod(0);
    let _session = scenario.steal(0, 80, &local).start().await;

    // Half over IPv4, half over IPv6; all open at once before any data flows.
    let v4 = scenario.node().tcp_sockets(CONNECTIONS as usize / 2, false);
    let v6 = scenario.node().tcp_sockets(CONNECTIONS as usize / 2, true);
    let barrier = Arc::new(Barrier::new(CONNECTIONS as usize));
    let connected = Arc::new(AtomicUsize::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    for (id, socket) in (0..CONNECTIONS).zip(v4.into_iter().chain(v6)) {
        let addr: SocketAddr = if id < CONNECTIONS / 2 {
            pod.v4(80)
        } else {
            pod.v6(80)
        };
        let barrier = barrier.clone();
        let connected = connected.clone();
        tasks.spawn(async move {
            let stream = socket
                .connect(addr)
                .await
                .map_err(|e| format!("connect to {addr}: {e}"));
            connected.fetch_add(1, Ordering::SeqCst);
            barrier.wait().await;
            (
                id,
                match stream {
                    Ok(stream) => send_and_check(stream, id, size_of(id)).await,
                    Err(e) => Err(e),
                },
            )
        });
    }

    let mut remote_failures = Vec::new();
    let all = async {
        while let Some(joined) = tasks.join_next().await {
            let (id, result) = joined.expect("connection task panicked");
            if let Err(e) = result {
                remote_failures.push(format!("connection {id}: {e}"));
            }
        }
    };
    if timeout(Duration::from_secs(180), all).await.is_err() {
        panic!(
            "connections still unfinished after 180 s ({} of {CONNECTIONS} had connected); \
             first failures: {:?}",
            connected.load(Ordering::SeqCst),
            &remote_failures[..remote_failures.len().min(10)]
        );
    }
    // The local end records its verdict after its last write, so it may lag a little
    // behind the remote end.
    if remote_failures.is_empty() {
        let _ = until_ok(
            Instant::now() + Duration::from_secs(30),
            Duration::from_millis(50),
            || {
                let done = results.lock().unwrap().len() == CONNECTIONS as usize;
                std::future::ready(if done { Ok(()) } else { Err(()) })
            },
        )
        .await;
    }
    let local_results = results.lock().unwrap().clone();
    let local_failures: Vec<String> = (0..CONNECTIONS)
        .filter_map(|id| match local_results.get(&id) {
            Some(Ok(())) => None,
            Some(Err(e)) => Some(format!("connection {id}: {e}")),
            None => Some(format!("connection {id}: never completed")),
        })
        .collect();
    assert!(
        remote_failures.is_empty() && local_failures.is_empty(),
        "{} connections failed at the remote end, {} at the local end \
         (the local server accepted {} connections, finished {}); \
         e.g. remote: {:#?} local: {:#?}",
        remote_failures.len(),
        local_failures.len(),
        local.accepted(),
        local_results.len(),
        &remote_failures[..remote_failures.len().min(5)],
        &local_failures[..local_failures.len().min(5)],
    );
    assert_eq!(local.accepted(), CONNECTIONS as usize);
    assert_eq!(scenario.pod_server(0, 80).accepted(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_followed_by_half_close_gets_the_whole_answer() {
    let scenario = Scenario::start(1, &[80]).await;
    let local = TcpServer::local(servers::reverse_after_eof);
    let pod = scenario.pod(0);
    let _session = scenario.steal(0, 80, &local).start().await;

    for (addr, len) in [
        (pod.v4(80), 1),
        (pod.v6(80), 100 * KIB),
        (pod.v4(80), 3 * MIB),
    ] {
        let mut stream = scenario.node().connect(addr).await.expect("connect");
        let request = Pattern::new(len as u64).take(len);
        let exchange = async {
            stream.write_all(&request).await?;
            stream.shutdown().await?;
            let mut answer = Vec::new();
            stream.read_to_end(&mut answer).await?;
            Ok::<_, std::io::Error>(answer)
        };
        let answer = timeout(Duration::from_secs(60), exchange)
            .await
            .unwrap_or_else(|_| panic!("no complete answer within 60 s for {len} bytes to {addr}"))
            .unwrap_or_else(|e| panic!("exchange of {len} bytes with {addr} failed: {e}"));
        let mut expected = request;
        expected.reverse();
        assert_eq!(
            answer.len(),
            expected.len(),
            "answer length for {len} bytes to {addr}"
        );
        assert!(
            answer == expected,
            "answer content for {len} bytes to {addr}"
        );
    }
    assert_eq!(scenario.pod_server(0, 80).accepted(), 0);
}

/// Local behaviour picked by the remote's first byte: `S` stalls (stops reading until
/// released, then checks the rest), `E` echoes.
struct StallOrEcho {
    stalled: Notify,
    release: Notify,
    stalled_result: Mutex<Option<Result<(), String>>>,
}

const STALLED_LEN: usize = 16 * MIB;
const STALLED_SEED: u64 = 4242;

async fn stall_or_echo(mut stream: TcpStream, state: Arc<StallOrEcho>) {
    let mut mode = [0u8; 1];
    if stream.read_exact(&mut mode).await.is_err() {
        return;
    }
    match mode[0] {
        b'S' => {
            state.stalled.notify_one();
            state.release.notified().await;
            let result = expect_pattern(&mut stream, Pattern::new(STALLED_SEED), STALLED_LEN).await;
            *state.stalled_result.lock().unwrap() = Some(result);
            let _ = stream.shutdown().await;
        }
        _ => servers::echo(stream).await,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_local_reader_does_not_stall_other_connections() {
    let scenario = Scenario::start(1, &[80]).await;
    let state = Arc::new(StallOrEcho {
        stalled: Notify::new(),
        release: Notify::new(),
        stalled_result: Mutex::new(None),
    });
    let local_state = state.clone();
    let local = TcpServer::local(move |s| stall_or_echo(s, local_state.clone()));
    let pod = scenario.pod(0);
    let _session = scenario.steal(0, 80, &local).start().await;

    // Connection A: the remote keeps writing 16 MiB that the local side does not read.
    let mut a = scenario
        .node()
        .connect(pod.v4(80))
        .await
        .expect("connect A");
    a.write_all(b"S").await.unwrap();
    timeout(Duration::from_secs(20), state.stalled.notified())
        .await
        .expect("connection A never reached the local server");
    let a_written = Arc::new(AtomicUsize::new(0));
    let a_writer = {
        let written = a_written.clone();
        tokio::spawn(async move {
            let result =
                write_pattern(&mut a, Pattern::new(STALLED_SEED), STALLED_LEN, &written).await;
            (a, result)
        })
    };
    // Let A fill every buffer on its path: wait until its writer stops making progress.
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut last = usize::MAX;
    let mut steady = 0;
    while steady < 3 && !a_writer.is_finished() && Instant::now() < deadline {
        sleep(Duration::from_millis(200)).await;
        let now = a_written.load(Ordering::Relaxed);
        steady = if now == last { steady + 1 } else { 0 };
        last = now;
    }

    // Connection B must still work end to end.
    let mut b = scenario
        .node()
        .connect(pod.v4(80))
        .await
        .expect("connect B");
    let b_data = Pattern::new(7).take(MIB);
    let b_exchange = async {
        let (mut reader, mut writer) = b.split();
        let send = async {
            writer.write_all(b"E").await?;
            writer.write_all(&b_data).await?;
            writer.shutdown().await
        };
        let mut echoed = Vec::new();
        let (sent, received) = tokio::join!(send, reader.read_to_end(&mut echoed));
        sent?;
        received?;
        Ok::<_, std::io::Error>(echoed)
    };
    let echoed = timeout(Duration::from_secs(30), b_exchange)
        .await
        .unwrap_or_else(|_| {
            panic!(
                "connection B stalled while the local reader of A stalled \
                 ({} bytes written into A)",
                a_written.load(Ordering::Relaxed)
            )
        })
        .expect("connection B failed");
    // The mode byte is the local server's, not echoed.
    assert_eq!(echoed.len(), MIB, "B's echo length");
    assert!(echoed == b_data, "B's echo content");

    // Releasing A delivers every byte it was holding back, intact.
    state.release.notify_one();
    let (mut a, written) = timeout(Duration::from_secs(60), a_writer)
        .await
        .expect("A's writer did not finish after the local reader resumed")
        .expect("A's writer task");
    written.expect("writing into A");
    a.shutdown().await.expect("half-close A");
    let mut rest = Vec::new();
    timeout(Duration::from_secs(30), a.read_to_end(&mut rest))
        .await
        .expect("A not closed after the local side finished")
        .expect("reading A's end");
    let result = state.stalled_result.lock().unwrap().take();
    assert_eq!(result, Some(Ok(())), "what the local side received on A");
}
