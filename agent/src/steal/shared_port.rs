//! A port shared by filtered steals: the agent takes every new connection
//! to it and routes each request to the first session (in start order)
//! whose filter matches, or else to the pod with the client's own address.
//! The port outlives its sessions by as long as its connections: when the
//! last session leaves, the redirection goes off at once (new connections
//! reach the pod directly) and the connections already taken drain.
use std::{
    fmt::Write as _,
    io,
    net::SocketAddr,
    sync::{
        Arc, Mutex, RwLock,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use futures::{FutureExt as _, future::BoxFuture};
use tokio::{
    net::TcpStream,
    sync::{Semaphore, watch},
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{debug, warn};

use super::ports::Ports;
use crate::{
    http_route::{self, Filter, Limits, Opened, Request, Side, Upstreams},
    live_session::LiveSession,
    metrics::{self, Metrics},
    netns::{Netns, NsId},
    passthrough::Passthrough,
    redirect::{ActiveRedirection, RedirectError, Redirection, Redirector},
};

/// Bytes a routed request's pipe to its session holds in each direction
/// before the writer waits: the proxy reads up to this at once.
const ROUTED_PIPE: usize = 64 * 1024;

/// How long pass-through rules stay after the port's last connection.
const RULES_LINGER: Duration = Duration::from_secs(5);

/// One filtered steal on the port.
pub struct Member {
    key: u64,
    filter: Arc<Filter>,
    live: Arc<LiveSession>,
    holder: String,
    since: Instant,
    /// Requests are routed to it only once its client was told `ready`: a
    /// connection announced before that would come first on its events.
    routed: AtomicBool,
}

impl Member {
    pub fn new(filter: Arc<Filter>, live: Arc<LiveSession>, holder: String) -> Self {
        Self {
            key: 0,
            filter,
            live,
            holder,
            since: Instant::now(),
            routed: AtomicBool::new(false),
        }
    }
}

pub struct SharedPort {
    key: (NsId, u16),
    netns: Netns,
    /// In start order: the first match wins.
    members: RwLock<Vec<Arc<Member>>>,
    next_member: AtomicU64,
    /// The setup's outcome once it is known (see [`SharedPort::set_up`]).
    started: watch::Receiver<Option<Result<(), String>>>,
    /// The setup is over (it succeeded or failed): only then may the port
    /// be given to anyone else, since a redirection still being made for
    /// it would later undo theirs. Read and written under the ports' lock.
    pub(super) settled: AtomicBool,
    /// The kernel's redirection; taken (turned off) by the last to leave.
    active: Mutex<Option<ActiveRedirection>>,
    closing: CancellationToken,
    connections: TaskTracker,
    /// The agent's places for routed connections (shared by all ports).
    slots: Arc<RoutingSlots>,
    /// Whether the port already said it is over the limit.
    over_limit: AtomicBool,
    metrics: Arc<Metrics>,
}

/// Connections the agent routes at once, all shared ports together: each
/// can pin buffers (an HTTP/1 connection about 72 KiB while a head arrives,
/// an HTTP/2 one about 4 MiB when its client stops reading), so their number
/// bounds the agent's memory. Beyond it, new connections go to the pod whole
/// (unfiltered) and are counted in `remocal_routed_connections_total{protocol="not_routed"}`.
pub struct RoutingSlots {
    connections: Arc<Semaphore>,
    http2: Arc<Semaphore>,
}

pub const MAX_ROUTED_CONNECTIONS: usize = 1024;
pub const MAX_ROUTED_HTTP2_CONNECTIONS: usize = 16;

impl Default for RoutingSlots {
    fn default() -> Self {
        Self {
            connections: Arc::new(Semaphore::new(MAX_ROUTED_CONNECTIONS)),
            http2: Arc::new(Semaphore::new(MAX_ROUTED_HTTP2_CONNECTIONS)),
        }
    }
}

impl SharedPort {
    /// A new shared port, whose setup starts at once on a task of its own:
    /// a caller that goes away cannot interrupt it halfway.
    pub(super) fn new(
        key: (NsId, u16),
        netns: Netns,
        metrics: Arc<Metrics>,
        redirector: Arc<dyn Redirector>,
        ports: Arc<Ports>,
    ) -> Arc<Self> {
        let (outcome, started) = watch::channel(None);
        let shared = Arc::new(Self {
            key,
            netns,
            members: RwLock::default(),
            next_member: AtomicU64::new(1),
            started,
            settled: AtomicBool::new(false),
            active: Mutex::default(),
            closing: CancellationToken::new(),
            connections: TaskTracker::new(),
            slots: ports.routing_slots(),
            over_limit: AtomicBool::new(false),
            metrics,
        });
        tokio::spawn(shared.clone().set_up(redirector, ports, outcome));
        shared
    }

    pub(super) fn key(&self) -> (NsId, u16) {
        self.key
    }

    /// Starts routing requests to the member `key`.
    pub(super) fn route_to(&self, key: u64) {
        if let Some(member) = self
            .members
            .read()
            .expect("members lock")
            .iter()
            .find(|member| member.key == key)
        {
            member.routed.store(true, Ordering::Relaxed);
        }
    }

    pub(super) fn join(&self, mut member: Member) -> u64 {
        member.key = self.next_member.fetch_add(1, Ordering::Relaxed);
        let key = member.key;
        self.members
            .write()
            .expect("members lock")
            .push(Arc::new(member));
        key
    }

    /// Removes a member; true when it was the last, in which case the
    /// redirection is off when this returns.
    pub(super) fn leave(&self, key: u64) -> bool {
        let mut members = self.members.write().expect("members lock");
        members.retain(|member| member.key != key);
        if !members.is_empty() {
            return false;
        }
        // Redirection off first, so no SYN reaches a listener that is about
        // to go; then the connections drain.
        let mut active = self.active.lock().expect("active lock");
        drop(active.take());
        self.closing.cancel();
        true
    }

    pub(super) fn is_empty(&self) -> bool {
        self.members.read().expect("members lock").is_empty()
    }

    pub(super) fn holders(&self) -> String {
        let members = self.members.read().expect("members lock");
        let mut shown = String::from("filtered steals of ");
        for (index, member) in members.iter().enumerate() {
            if index > 0 {
                shown.push_str(", ");
            }
            let _ = write!(
                shown,
                "{} ({}, for {}s)",
                member.holder,
                member.filter,
                member.since.elapsed().as_secs()
            );
        }
        shown
    }

    pub(super) fn holder_of_same(&self, filter: &Filter) -> Option<String> {
        self.members
            .read()
            .expect("members lock")
            .iter()
            .find(|member| member.filter.same_as(filter))
            .map(|member| member.holder.clone())
    }

    /// Waits until the port redirects and routes (or failed to).
    pub async fn started(&self) -> Result<(), RedirectError> {
        let mut started = self.started.clone();
        let outcome = match started.wait_for(Option::is_some).await {
            Ok(outcome) => outcome.clone().unwrap_or(Ok(())),
            Err(_) => Err("the shared port's setup stopped".to_string()),
        };
        outcome.map_err(|detail| RedirectError::kernel("cannot share the port", detail))
    }

    /// Pass-through first (once redirected, connections need it), then the
    /// kernel's redirection, then the accept loop. If everyone left
    /// meanwhile, the redirection goes at once, and the port is freed here.
    async fn set_up(
        self: Arc<Self>,
        redirector: Arc<dyn Redirector>,
        ports: Arc<Ports>,
        outcome: watch::Sender<Option<Result<(), String>>>,
    ) {
        let port = self.key.1;
        let made = match self.netns.try_clone() {
            Err(err) => Err(format!("cannot hold the target's namespace: {err}")),
            Ok(netns) => {
                let setup_ports = ports.clone();
                tokio::task::spawn_blocking(move || {
                    let passthrough = setup_ports
                        .passthrough(&netns, port)
                        .map_err(|err| err.to_string())?;
                    let redirection = redirector
                        .steal(&netns, port)
                        .map_err(|err| err.to_string())?;
                    Ok((passthrough, redirection))
                })
                .await
                .unwrap_or_else(|err| Err(format!("the setup panicked: {err}")))
            }
        };
        let result = made.and_then(|(passthrough, redirection)| {
            let Redirection { listener, active } = redirection;
            let listener = tokio::net::TcpListener::from_std(listener)
                .map_err(|err| format!("cannot watch the steal listener: {err}"))?;
            {
                let mut slot = self.active.lock().expect("active lock");
                if self.closing.is_cancelled() {
                    drop(active);
                } else {
                    *slot = Some(active);
                }
            }
            tokio::spawn(self.clone().accept(listener, passthrough));
            Ok(())
        });
        ports.settle(&self);
        let _ = outcome.send(Some(result));
    }

    async fn accept(
        self: Arc<Self>,
        listener: tokio::net::TcpListener,
        passthrough: Arc<Passthrough>,
    ) {
        loop {
            tokio::select! {
                biased;
                () = self.closing.cancelled() => break,
                accepted = listener.accept() => match accepted {
                    Ok((stream, client)) => self.route(stream, client, &passthrough),
                    Err(err) => {
                        warn!(%err, port = self.key.1, "accepting on a shared port failed");
                        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    }
                },
            }
        }
        // Connections the kernel completed before the redirection went off
        // were meant for this port: the pod serves them, through us.
        if let Ok(listener) = listener.into_std() {
            while let Ok((stream, client)) = listener.accept() {
                if let Ok(stream) = stream
                    .set_nonblocking(true)
                    .and_then(|()| TcpStream::from_std(stream))
                {
                    self.route(stream, client, &passthrough);
                }
            }
        }
        self.connections.close();
        self.connections.wait().await;
        // The pod's server may close its side of the last pass-through
        // connections a moment after ours: its FIN needs the rules too.
        tokio::time::sleep(RULES_LINGER).await;
        // Removing the rules looks for other agents in /proc: off the runtime.
        let _ = tokio::task::spawn_blocking(move || drop(passthrough)).await;
        debug!(port = self.key.1, "shared port drained");
    }

    fn route(
        self: &Arc<Self>,
        stream: TcpStream,
        client: SocketAddr,
        passthrough: &Arc<Passthrough>,
    ) {
        let client = canonical(client);
        // The pod's address and the shared port: a client that reached the
        // steal listener's own (ephemeral) port directly must not make the
        // pass-through connect back to it.
        let Ok(local) = stream.local_addr() else {
            // Closed before it could be routed.
            return;
        };
        let destination = SocketAddr::new(local.ip().to_canonical(), self.key.1);
        let routes = ConnectionRoutes {
            port: self.clone(),
            passthrough: passthrough.clone(),
            client,
            destination,
        };
        let metrics = self.metrics.clone();
        let Ok(admitted) = self.slots.connections.clone().try_acquire_owned() else {
            // Beyond what the agent may hold: the pod serves it, unfiltered.
            if !self.over_limit.swap(true, Ordering::Relaxed) {
                warn!(
                    port = self.key.1,
                    limit = MAX_ROUTED_CONNECTIONS,
                    "too many connections on ports shared by filtered steals: further ones go to the pod unfiltered"
                );
            }
            metrics.unrouted_connection();
            self.connections.spawn(async move {
                let mut stream = stream;
                if let Ok(mut pod) = routes.open(Side::Pod).await {
                    let _ = tokio::io::copy_bidirectional(&mut stream, &mut pod.stream).await;
                }
            });
            return;
        };
        let closing = self.closing.clone();
        self.connections.spawn(async move {
            let protocol =
                http_route::serve(stream, client, routes, closing, Limits::default()).await;
            metrics.routed_connection(protocol);
            drop(admitted);
        });
    }
}

/// The sides one connection on the shared port can reach.
struct ConnectionRoutes {
    port: Arc<SharedPort>,
    passthrough: Arc<Passthrough>,
    client: SocketAddr,
    destination: SocketAddr,
}

impl Upstreams for ConnectionRoutes {
    fn pick(&self, request: &Request<'_>) -> Side {
        self.port
            .members
            .read()
            .expect("members lock")
            .iter()
            .find(|member| member.routed.load(Ordering::Relaxed) && member.filter.matches(request))
            .map_or(Side::Pod, |member| Side::Session(member.key))
    }

    fn open(&self, side: Side) -> BoxFuture<'static, io::Result<Opened>> {
        match side {
            Side::Pod => {
                let transparent = self.passthrough.connect(self.client);
                let passthrough = self.passthrough.clone();
                let (client, destination) = (self.client, self.destination);
                async move {
                    match transparent.await {
                        Ok(stream) => Ok(Opened::from(stream)),
                        // The server does not listen on loopback: reach it
                        // where the client did, from the pod's own address,
                        // and name the client in a header instead.
                        Err(refused) if refused.kind() == io::ErrorKind::ConnectionRefused => {
                            let stream = passthrough
                                .connect_plain(destination)
                                .await
                                .map_err(|_| refused)?;
                            debug!(%client, %destination, "pass-through from the pod's address, with a Forwarded header");
                            Ok(Opened {
                                stream: Box::pin(stream),
                                forwarded: Some(forwarded_for(client)),
                            })
                        }
                        Err(err) => Err(err),
                    }
                }
                .boxed()
            }
            Side::Session(key) => match self.open_session(key) {
                // The session ended between pick and open: the pod serves it.
                Err(err) if err.kind() == io::ErrorKind::NotFound => self.open(Side::Pod),
                opened => async move { opened }.boxed(),
            },
        }
    }

    fn admit_http2(&self) -> Option<Box<dyn Send>> {
        let admitted = self.port.slots.http2.clone().try_acquire_owned().ok();
        if admitted.is_none() {
            self.port.metrics.unrouted_connection();
        }
        admitted.map(|admitted| Box::new(admitted) as Box<dyn Send>)
    }

    fn routed(&self, side: Side) {
        self.port.metrics.request_routed(match side {
            Side::Pod => metrics::Route::pod,
            Side::Session(_) => metrics::Route::session,
        });
    }
}

impl ConnectionRoutes {
    /// A new connection to the session's client, announced like a stolen
    /// one; the router writes the requests into our end of it.
    fn open_session(&self, key: u64) -> io::Result<Opened> {
        let member = self
            .port
            .members
            .read()
            .expect("members lock")
            .iter()
            .find(|member| member.key == key)
            .cloned()
            .ok_or_else(|| {
                io::Error::new(io::ErrorKind::NotFound, "the developer's session ended")
            })?;
        let (ours, theirs) = tokio::io::duplex(ROUTED_PIPE);
        member
            .live
            .announce_routed(theirs, self.client, self.destination)
            .map_err(io::Error::other)?;
        Ok(Opened::from(ours))
    }
}

/// RFC 7239's `for=` with the port, quoted (IPv6 in brackets).
fn forwarded_for(client: SocketAddr) -> String {
    format!("for=\"{client}\"")
}

/// Dual-stack sockets report IPv4 peers as ::ffff:a.b.c.d; users expect a.b.c.d.
pub fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}
