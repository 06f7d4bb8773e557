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
        atomic::{AtomicU64, Ordering},
    },
    time::Instant,
};

use futures::{FutureExt as _, future::BoxFuture};
use tokio::{net::TcpStream, sync::OnceCell};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{debug, warn};

use super::loopback_pair::loopback_pair;
use crate::{
    http_route::{self, Filter, Limits, Opened, Request, Side, Upstreams},
    live_session::LiveSession,
    metrics::{self, Metrics},
    netns::{Netns, NsId},
    passthrough::Passthrough,
    redirect::{ActiveRedirection, RedirectError, Redirection, Redirector},
};

/// One filtered steal on the port.
pub struct Member {
    key: u64,
    filter: Arc<Filter>,
    live: Arc<LiveSession>,
    holder: String,
    since: Instant,
}

impl Member {
    pub fn new(filter: Arc<Filter>, live: Arc<LiveSession>, holder: String) -> Self {
        Self {
            key: 0,
            filter,
            live,
            holder,
            since: Instant::now(),
        }
    }
}

pub struct SharedPort {
    key: (NsId, u16),
    netns: Netns,
    /// In start order: the first match wins.
    members: RwLock<Vec<Arc<Member>>>,
    next_member: AtomicU64,
    started: OnceCell<Arc<Passthrough>>,
    /// The kernel's redirection; taken (turned off) by the last to leave.
    active: Mutex<Option<ActiveRedirection>>,
    closing: CancellationToken,
    connections: TaskTracker,
    metrics: Arc<Metrics>,
}

impl SharedPort {
    pub(super) fn new(key: (NsId, u16), netns: Netns, metrics: Arc<Metrics>) -> Arc<Self> {
        Arc::new(Self {
            key,
            netns,
            members: RwLock::default(),
            next_member: AtomicU64::new(1),
            started: OnceCell::new(),
            active: Mutex::default(),
            closing: CancellationToken::new(),
            connections: TaskTracker::new(),
            metrics,
        })
    }

    pub(super) fn key(&self) -> (NsId, u16) {
        self.key
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
        let mut active = self.active.lock().expect("active lock");
        self.closing.cancel();
        drop(active.take());
        true
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

    /// Turns the redirection on and starts routing, unless an earlier
    /// member did already. Waits for that setup either way.
    pub async fn start(
        self: &Arc<Self>,
        redirector: Arc<dyn Redirector>,
        passthrough: impl FnOnce() -> Result<Arc<Passthrough>, RedirectError> + Send + 'static,
    ) -> Result<(), RedirectError> {
        self.started
            .get_or_try_init(|| async {
                let netns = self.netns.try_clone().map_err(|err| {
                    RedirectError::kernel("cannot hold the target's namespace", err)
                })?;
                let port = self.key.1;
                let (passthrough, redirection) = tokio::task::spawn_blocking(move || {
                    // Pass-through first: once redirected, connections need it.
                    let passthrough = passthrough()?;
                    let redirection = redirector.steal(&netns, port)?;
                    Ok::<_, RedirectError>((passthrough, redirection))
                })
                .await
                .map_err(|err| RedirectError::kernel("setting up the shared port", err))??;
                let Redirection { listener, active } = redirection;
                {
                    let mut slot = self.active.lock().expect("active lock");
                    if self.closing.is_cancelled() {
                        // Everyone left while this was being set up.
                        drop(active);
                    } else {
                        *slot = Some(active);
                    }
                }
                let listener = tokio::net::TcpListener::from_std(listener)
                    .map_err(|err| RedirectError::kernel("watching the steal listener", err))?;
                tokio::spawn(self.clone().accept(listener, passthrough.clone()));
                Ok(passthrough)
            })
            .await
            .map(|_| ())
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
        debug!(port = self.key.1, "shared port drained");
    }

    fn route(
        self: &Arc<Self>,
        stream: TcpStream,
        client: SocketAddr,
        passthrough: &Arc<Passthrough>,
    ) {
        let client = canonical(client);
        let destination = stream.local_addr().map(canonical).unwrap_or(client);
        let routes = ConnectionRoutes {
            port: self.clone(),
            passthrough: passthrough.clone(),
            client,
            destination,
        };
        let closing = self.closing.clone();
        let metrics = self.metrics.clone();
        self.connections.spawn(async move {
            let protocol =
                http_route::serve(stream, client, routes, closing, Limits::default()).await;
            metrics.routed_connection(protocol);
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
            .find(|member| member.filter.matches(request))
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
            Side::Session(key) => {
                let opened = self.open_session(key);
                async move { opened }.boxed()
            }
        }
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
            .ok_or_else(|| io::Error::other("the developer's session ended"))?;
        let (ours, theirs) = loopback_pair()?;
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
