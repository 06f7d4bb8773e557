//! The socket maker: one long-lived thread per `Passthrough` that entered the
//! pod's namespace once and makes the pass-through sockets there on request.
//! A socket belongs to the namespace of the thread that creates it, and
//! starting a thread that calls setns(2) per connection would put a thread
//! start (40 to several hundred microseconds on the 2-core test VM, for the
//! socket alone) on the path of every new client connection; handing a
//! request to a waiting thread costs a wake-up.
//!
//! The thread also starts each connection (a non-blocking connect), so a
//! connection costs one round trip to it; the caller's runtime waits for
//! the handshake.
use std::{
    io,
    net::{SocketAddr, TcpStream},
    os::fd::{AsRawFd, OwnedFd},
    sync::mpsc,
    thread::JoinHandle,
};

use nix::sched::{CloneFlags, setns};
use socket2::{Domain, Protocol, SockAddr, Socket, Type};
use tokio::sync::oneshot;
use tracing::debug;

use super::time_wait::{self, ForgetError};
use crate::{netlink::Netlink, sock_diag::SockDiag};

/// Socket makers are named this plus their port; another agent starting on
/// the node recognises them (see `leftovers`).
pub const THREAD_PREFIX: &str = "remocal-pt";

pub struct Request {
    /// Whose address the socket takes (already IPv4 for v4-mapped clients);
    /// `None` for a plain socket with the pod's own address.
    pub client: Option<SocketAddr>,
    /// The pod's server on loopback, in the client's family.
    pub server: SocketAddr,
    pub reply: oneshot::Sender<Result<TcpStream, Failure>>,
}

/// Which step failed, so the caller can say it in the pod's terms.
#[derive(Debug)]
pub enum Failure {
    Socket(io::Error),
    Bind(io::Error),
    Connect(io::Error),
    /// The four-tuple is taken by a pass-through still open.
    TupleInUse(String),
}

pub struct Maker {
    requests: Option<mpsc::Sender<Request>>,
    thread: Option<JoinHandle<()>>,
}

impl Maker {
    /// Starts the thread in the namespace of `netns` and returns it with a
    /// NETLINK_ROUTE socket it opened there.
    pub fn start(netns: OwnedFd, port: u16) -> io::Result<(Self, Netlink)> {
        let (ready_tx, ready_rx) = mpsc::sync_channel(1);
        let (requests, inbox) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name(format!("{THREAD_PREFIX}{port}"))
            // It makes sockets and nothing else: a small stack per open port.
            .stack_size(256 << 10)
            .spawn(move || {
                let entered = setns(&netns, CloneFlags::CLONE_NEWNET)
                    .map_err(io::Error::from)
                    .and_then(|()| Netlink::open(libc::NETLINK_ROUTE));
                drop(netns);
                let ok = entered.is_ok();
                let _ = ready_tx.send(entered);
                if ok {
                    serve(inbox);
                }
            })?;
        let ready = ready_rx
            .recv()
            .unwrap_or_else(|_| Err(io::Error::other("the socket maker thread died")));
        let maker = Self {
            requests: Some(requests),
            thread: Some(thread),
        };
        // On failure `maker` is dropped here, which joins the thread.
        Ok((maker, ready?))
    }

    /// Queues a request; fails only if the thread is gone.
    pub fn send(&self, request: Request) -> Result<(), Request> {
        match &self.requests {
            Some(requests) => requests.send(request).map_err(|err| err.0),
            None => Err(request),
        }
    }
}

impl Drop for Maker {
    /// Closing the channel ends the thread once it has answered what was
    /// already queued; joining makes the end observable (tests, and no
    /// thread outliving its namespace's `Passthrough`).
    fn drop(&mut self) {
        self.requests.take();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn serve(inbox: mpsc::Receiver<Request>) {
    // Made on first need: only a client reusing a port it used a moment ago
    // asks for it.
    let mut diag = None;
    while let Ok(request) = inbox.recv() {
        let made = match request.client {
            Some(client) => make(client, request.server, &mut diag),
            None => plain(request.server),
        };
        let _ = request.reply.send(made);
    }
}

/// A socket bound to the client's address, connecting to the server.
fn make(
    client: SocketAddr,
    server: SocketAddr,
    diag: &mut Option<SockDiag>,
) -> Result<TcpStream, Failure> {
    let socket = transparent(client).map_err(Failure::Socket)?;
    socket.bind(&client.into()).map_err(Failure::Bind)?;
    match start_connect(&socket, server) {
        Err(err) if err.raw_os_error() == Some(libc::EADDRNOTAVAIL) => {}
        other => return other.map(|()| socket.into()).map_err(Failure::Connect),
    }
    // The same four-tuple is still taken by an earlier pass-through of
    // this client address, which the kernel could not reuse (TIME_WAIT
    // without TCP timestamps): end it if the agent is done with it, and
    // try again.
    match time_wait::forget(diag, client, server) {
        Ok(()) => debug!(%client, %server, "ended a finished pass-through socket in the way"),
        Err(held @ ForgetError::Held(_)) => return Err(Failure::TupleInUse(held.to_string())),
        Err(err) => {
            debug!(%client, %server, error = %err, "could not end a pass-through socket in the way")
        }
    }
    let socket = transparent(client).map_err(Failure::Socket)?;
    socket.bind(&client.into()).map_err(Failure::Bind)?;
    start_connect(&socket, server).map_err(Failure::Connect)?;
    Ok(socket.into())
}

/// A socket of the namespace's own, connecting to the server: the kernel
/// picks the source (the pod's address when the server is the pod's).
fn plain(server: SocketAddr) -> Result<TcpStream, Failure> {
    let domain = if server.is_ipv4() {
        Domain::IPV4
    } else {
        Domain::IPV6
    };
    let socket = Socket::new(domain, Type::STREAM.cloexec(), Some(Protocol::TCP))
        .map_err(Failure::Socket)?;
    socket.set_tcp_nodelay(true).map_err(Failure::Socket)?;
    socket.set_nonblocking(true).map_err(Failure::Socket)?;
    start_connect(&socket, server).map_err(Failure::Connect)?;
    Ok(socket.into())
}

/// A non-blocking TCP socket that may bind a non-local address (the
/// client's) and share it with TIME_WAIT leftovers of the same address.
fn transparent(client: SocketAddr) -> io::Result<Socket> {
    let (domain, level, option) = match client {
        SocketAddr::V4(_) => (Domain::IPV4, libc::SOL_IP, libc::IP_TRANSPARENT),
        SocketAddr::V6(_) => (Domain::IPV6, libc::SOL_IPV6, libc::IPV6_TRANSPARENT),
    };
    let socket = Socket::new(domain, Type::STREAM.cloexec(), Some(Protocol::TCP))?;
    if client.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    set_flag(&socket, level, option)?;
    socket.set_reuse_address(true)?;
    socket.set_tcp_nodelay(true)?;
    socket.set_nonblocking(true)?;
    Ok(socket)
}

fn start_connect(socket: &Socket, server: SocketAddr) -> io::Result<()> {
    match socket.connect(&SockAddr::from(server)) {
        Err(err) if err.raw_os_error() == Some(libc::EINPROGRESS) => Ok(()),
        other => other,
    }
}

fn set_flag(socket: &Socket, level: libc::c_int, option: libc::c_int) -> io::Result<()> {
    let one: libc::c_int = 1;
    // SAFETY: `one` is a valid c_int for the call's duration.
    let result = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            level,
            option,
            (&raw const one).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if result < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}
