//! `remocal-bench relay`: a TCP relay with nothing on its data path but the
//! kernel's copies. Two of them in a row take a stolen connection's hops (the
//! pod's namespace → a host process → loopback → a second host process →
//! the local server), so what they cost is the least any agent and client can
//! add on this machine.

use std::fs::File;
use std::io;
use std::net::SocketAddr;
use std::path::Path;

use anyhow::Context as _;
use nix::sched::{CloneFlags, setns};
use remocal_tests::netns::listen_in_current_namespace;
use tokio::net::{TcpListener, TcpStream};

/// tokio's own copy size: small requests and answers gain nothing from more,
/// and each connection allocates its buffers when it starts.
pub const DEFAULT_BUFFER: usize = 8 * 1024;
/// What remocal reads at once on each side: a stream through the relays
/// moves bytes in the same bites as a stolen one.
pub const STREAM_BUFFER: usize = 128 * 1024;

/// Relays every connection accepted on `listen` to `to`, reading up to
/// `buffer` bytes at once each way, until killed. With `listen_netns`, only
/// the listener lives in that namespace, as the agent's does; the process
/// stays in this one.
pub fn run(
    listen: SocketAddr,
    to: SocketAddr,
    listen_netns: Option<&Path>,
    buffer: usize,
) -> anyhow::Result<()> {
    let listener = match listen_netns {
        Some(netns) => listen_in(netns, listen),
        None => Ok(listen_in_current_namespace(listen)?),
    }
    .with_context(|| format!("cannot listen on {listen}"))?;
    // One thread, like the agent's and the client's data paths by default.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(serve(listener, to, buffer))
}

/// A listener made by a short-lived thread that joined `netns`: a socket
/// stays in the namespace it was created in.
fn listen_in(netns: &Path, addr: SocketAddr) -> anyhow::Result<std::net::TcpListener> {
    let file = File::open(netns).with_context(|| format!("cannot open {}", netns.display()))?;
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                setns(&file, CloneFlags::CLONE_NEWNET)
                    .with_context(|| format!("cannot enter {}", netns.display()))?;
                Ok(listen_in_current_namespace(addr)?)
            })
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}

async fn serve(
    listener: std::net::TcpListener,
    to: SocketAddr,
    buffer: usize,
) -> anyhow::Result<()> {
    let listener = TcpListener::from_std(listener).context("cannot watch the listener")?;
    loop {
        match listener.accept().await {
            Ok((inbound, _)) => {
                tokio::spawn(relay(inbound, to, buffer));
            }
            // The peer gave up before we accepted: not the relay's problem.
            Err(err) if err.kind() == io::ErrorKind::ConnectionAborted => {}
            Err(err) => return Err(err).context("cannot accept"),
        }
    }
}

/// One connection, both ways, each half closed when its source ends (a
/// `Connection: close` answer ends the server's side first).
async fn relay(mut inbound: TcpStream, to: SocketAddr, buffer: usize) {
    let mut outbound = match TcpStream::connect(to).await {
        Ok(outbound) => outbound,
        Err(err) => {
            eprintln!("relay: cannot connect to {to}: {err}");
            return;
        }
    };
    // Small requests and answers must not wait for an ACK (Nagle).
    if inbound.set_nodelay(true).is_err() || outbound.set_nodelay(true).is_err() {
        return;
    }
    // Resets are how load generators often end connections; nothing to report.
    let _ =
        tokio::io::copy_bidirectional_with_sizes(&mut inbound, &mut outbound, buffer, buffer).await;
}
