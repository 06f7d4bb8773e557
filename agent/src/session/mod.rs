//! Steal sessions: who holds which port of which target, the accept loop that
//! hands each stolen connection to the client, and the teardown order
//! that never loses traffic (redirection off first, then our connections
//! closed cleanly, then the claim released).
mod audit;
mod limits;
mod standby;
mod start;

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use ring::rand::SecureRandom as _;

use remocal_proto::v1::{
    ConnectionClosed, ConnectionDownstream, Mode, NewConnection, OpenSession, Ready, SessionEnded,
    SessionEvent, SessionRequest, Warning, session_event, session_request,
};
use tokio::{
    net::TcpStream,
    sync::{mpsc, oneshot},
};
use tokio_util::sync::CancellationToken;
use tonic::{Status, Streaming};
use tracing::{debug, info, warn};

use crate::{
    auth::{AccessError, Auth, Identity},
    kube::{PodEvents, PodLookup, PodLookupError},
    metrics::{self, Metrics},
    mirror,
    netns::{Netns, NsId, TargetError},
    proxy::{self, Outcome},
    redirect::{RedirectError, Redirection, Redirector, Tap},
};
use audit::{Audit, self_reported};
use limits::Slots;
use standby::StandbyCalls;
pub use standby::{Handoff, StandbyRefused};
use start::Started;

/// What the kernel side set up for a session.
enum Redirected {
    Steal(Redirection),
    Mirror(Tap),
}

/// A client that never picks up an announced connection must not leave the
/// remote side hanging forever.
const ATTACH_TIMEOUT: Duration = Duration::from_secs(10);
/// Events queued for a client that reads them slowly; beyond this the accept
/// loop waits, and the kernel's backlog absorbs the burst.
const EVENT_QUEUE: usize = 1024;

pub type Events = mpsc::Receiver<Result<SessionEvent, Status>>;

#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("port {0} is out of range: use a TCP port from 1 to 65535")]
    InvalidPort(u32),
    #[error("no target given: pass a network namespace path, a PID or a pod")]
    MissingTarget,
    #[error(transparent)]
    Pod(#[from] PodLookupError),
    #[error("unsupported session mode {0}: this agent supports steal")]
    UnsupportedMode(i32),
    #[error(transparent)]
    Target(#[from] TargetError),
    #[error(
        "port {port} of {target} is already stolen by {holder}; ask them to stop, or pick another port"
    )]
    Conflict {
        target: String,
        port: u16,
        holder: String,
    },
    #[error(transparent)]
    Redirect(#[from] RedirectError),
    #[error(transparent)]
    Access(#[from] AccessError),
    #[error(
        "{0:?} is not a pod's namespace/name: Kubernetes names are lowercase letters, digits, '-' and '.'"
    )]
    InvalidPodName(String),
    #[error(
        "{user} already holds {held} sessions on this agent (at most {limit}{scope}): end some first"
    )]
    TooManySessions {
        user: String,
        held: usize,
        limit: usize,
        scope: &'static str,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    #[error("no session {0} of yours exists (it has ended, or it was never yours)")]
    NoSession(String),
    #[error(
        "connection {0} is not waiting to be attached (already attached, rejected, or timed out)"
    )]
    NoConnection(u64),
    #[error("no standby call for session {session}: {refused}")]
    Standby {
        session: String,
        refused: StandbyRefused,
    },
}

pub struct Sessions {
    redirector: Arc<dyn Redirector>,
    pods: PodLookup,
    auth: Arc<Auth>,
    pod_events: PodEvents,
    claims: Mutex<HashMap<(NsId, u16), Holder>>,
    live: Mutex<HashMap<String, Arc<LiveSession>>>,
    slots: Mutex<Slots>,
    settings: Settings,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
}

struct Holder {
    description: String,
    since: Instant,
}

/// Limits that operators tune.
#[derive(Clone, Copy, Debug)]
pub struct Settings {
    /// Bytes a mirrored connection may hold while its local side is slow.
    pub mirror_flow_limit: usize,
}

/// A connection on its way to its data call.
pub enum Pending {
    Stolen(TcpStream),
    /// The copy of a mirrored connection, already flowing into this queue.
    Mirrored(mpsc::Receiver<Result<ConnectionDownstream, Status>>),
}

/// The part of a session that connection calls reach by session id.
pub struct LiveSession {
    id: String,
    /// Only its owner's calls may carry its connections.
    owner: Identity,
    /// What it is about, for the log and the pod's events.
    audit: Audit,
    mode: metrics::Mode,
    metrics: Arc<Metrics>,
    /// For the kernel's TCP statistics of this session's connections.
    redirector: Arc<dyn Redirector>,
    target: NsId,
    /// Connections announced, with when, for [`LiveSession::reset_unclaimed`].
    pending: Mutex<HashMap<u64, (Pending, Instant)>>,
    /// Calls waiting for connections not yet announced.
    standby: StandbyCalls,
    next_connection: AtomicU64,
    /// Taken when the session ends, so the client's event stream ends with
    /// it even while connection tasks still hold the session.
    events: Mutex<Option<mpsc::Sender<Result<SessionEvent, Status>>>>,
    ended: CancellationToken,
}

impl Sessions {
    pub fn new(
        redirector: Arc<dyn Redirector>,
        pods: PodLookup,
        auth: Arc<Auth>,
        settings: Settings,
        metrics: Arc<Metrics>,
    ) -> Arc<Self> {
        Arc::new(Self {
            redirector,
            pod_events: PodEvents::new(pods.client(), pods.node()),
            pods,
            auth,
            metrics,
            claims: Mutex::default(),
            live: Mutex::default(),
            slots: Mutex::default(),
            settings,
            shutdown: CancellationToken::new(),
        })
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    pub fn pods(&self) -> &PodLookup {
        &self.pods
    }

    pub fn active(&self) -> usize {
        self.live.lock().expect("live lock").len()
    }

    /// Authorizes, validates, claims and redirects; on success the session
    /// runs until the client closes it or its call breaks.
    pub async fn open(
        self: &Arc<Self>,
        open: OpenSession,
        identity: Identity,
        requests: Streaming<SessionRequest>,
    ) -> Result<Events, OpenError> {
        // What was asked, for the log of a refusal (the target as named).
        let asked = (
            open.target.as_ref().and_then(|target| target.kind.clone()),
            open.port,
            open.mode,
        );
        let started = self.start(open, &identity).await;
        if let Err(err) = &started {
            let (target, port, mode) = asked;
            warn!(
                user = %identity,
                groups = ?identity.groups,
                target = ?target,
                port,
                mode = ?Mode::try_from(mode),
                %err,
                "session refused"
            );
        }
        let Started {
            open,
            mode,
            port,
            netns,
            pod,
            slot,
        } = started?;
        let id = session_id();
        let client = self_reported(&open.client);
        // Several developers may mirror one port; only a steal is exclusive.
        let claim = (mode == Mode::Steal)
            .then(|| self.claim(&netns, port, format!("{identity} (from {client})")))
            .transpose()?;
        let redirector = self.redirector.clone();
        let (netns, redirection) = blocking(move || {
            let redirection = match mode {
                Mode::Mirror => redirector.mirror(&netns, port).map(Redirected::Mirror),
                _ => redirector.steal(&netns, port).map(Redirected::Steal),
            };
            (netns, redirection)
        })
        .await;
        let redirection = redirection?;

        let (events, receiver) = mpsc::channel(EVENT_QUEUE);
        let audit = Audit {
            target: netns.to_string(),
            port,
            mode,
            client,
            pod,
        };
        let live = Arc::new(LiveSession {
            id: id.clone(),
            owner: identity.clone(),
            audit,
            mode: if mode == Mode::Mirror {
                metrics::Mode::mirror
            } else {
                metrics::Mode::steal
            },
            metrics: self.metrics.clone(),
            redirector: self.redirector.clone(),
            target: netns.id(),
            pending: Mutex::default(),
            standby: StandbyCalls::default(),
            next_connection: AtomicU64::new(1),
            events: Mutex::new(Some(events)),
            ended: CancellationToken::new(),
        });
        live.emit(session_event::Kind::Ready(Ready {
            session_id: id.clone(),
            target: netns.to_string(),
            port: port.into(),
            standby_calls: true,
            user: identity.user.clone(),
        }));
        self.live
            .lock()
            .expect("live lock")
            .insert(id.clone(), live.clone());
        self.metrics
            .sessions_active
            .get_or_create(&metrics::ModeLabels { mode: live.mode })
            .inc();
        info!(
            user = %identity,
            groups = ?identity.groups,
            target = %netns,
            port,
            client = %live.audit.client,
            ?mode,
            "session started"
        );
        self.record(&live, "Started", format!("started {}", live.audit.doing()));
        let sessions = self.clone();
        tokio::spawn(async move {
            let reason = match redirection {
                Redirected::Steal(redirection) => {
                    sessions.steal(&live, redirection, requests).await
                }
                Redirected::Mirror(tap) => {
                    let shutdown = sessions.shutdown.clone();
                    mirror::run(
                        &live,
                        tap,
                        requests,
                        shutdown,
                        sessions.settings.mirror_flow_limit,
                    )
                    .await
                }
            };
            sessions.end(live, reason, claim);
            drop(slot);
            // What the session used in bursts (a mirror's reassembly, the
            // programs of a namespace it detached) is free now.
            tokio::task::spawn_blocking(crate::memory::release_free);
        });
        Ok(receiver)
    }

    /// Hands an announced connection to the data call that the client opened
    /// for it.
    pub fn attach(
        &self,
        caller: &Identity,
        session_id: &str,
        connection_id: u64,
    ) -> Result<(Pending, Arc<LiveSession>), AttachError> {
        let live = self.owned(caller, session_id)?;
        let pending = live
            .take_pending(connection_id)
            .ok_or(AttachError::NoConnection(connection_id))?;
        Ok((pending, live))
    }

    /// Registers a call the client opened ahead; it receives the session's
    /// next connection that no earlier call took.
    pub fn stand_by(
        &self,
        caller: &Identity,
        session_id: &str,
    ) -> Result<(oneshot::Receiver<Handoff>, Arc<LiveSession>), AttachError> {
        let live = self.owned(caller, session_id)?;
        let handoff = live.standby.add().map_err(|refused| AttachError::Standby {
            session: session_id.to_string(),
            refused,
        })?;
        Ok((handoff, live))
    }

    /// The session, if `caller` opened it. Someone else's session is
    /// answered like one that does not exist, and logged.
    fn owned(&self, caller: &Identity, session_id: &str) -> Result<Arc<LiveSession>, AttachError> {
        let live = self
            .live
            .lock()
            .expect("live lock")
            .get(session_id)
            .cloned();
        match live {
            Some(live) if live.owner.same_as(caller) => Ok(live),
            Some(live) => {
                warn!(
                    user = %caller,
                    groups = ?caller.groups,
                    owner = %live.owner,
                    target = %live.audit.target,
                    port = live.audit.port,
                    "refused a connection call for a session of another user"
                );
                self.metrics.session_error(tonic::Code::PermissionDenied);
                Err(AttachError::NoSession(session_id.to_string()))
            }
            None => Err(AttachError::NoSession(session_id.to_string())),
        }
    }

    /// Ends every session (their clients are told why) and waits briefly for
    /// their connections to close cleanly.
    pub async fn shutdown(&self) {
        self.shutdown.cancel();
        let deadline = Instant::now() + Duration::from_secs(3);
        while !self.live.lock().expect("live lock").is_empty() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn claim(
        self: &Arc<Self>,
        netns: &Netns,
        port: u16,
        description: String,
    ) -> Result<Claim, OpenError> {
        let key = (netns.id(), port);
        let mut claims = self.claims.lock().expect("claims lock");
        if let Some(holder) = claims.get(&key) {
            return Err(OpenError::Conflict {
                target: netns.to_string(),
                port,
                holder: format!(
                    "{} for {}s",
                    holder.description,
                    holder.since.elapsed().as_secs()
                ),
            });
        }
        claims.insert(
            key,
            Holder {
                description,
                since: Instant::now(),
            },
        );
        Ok(Claim {
            sessions: self.clone(),
            key,
        })
    }

    /// The steal loop: accepts what the kernel hands the listener and
    /// hands it to the client, until the session ends for the returned reason.
    async fn steal(
        &self,
        live: &Arc<LiveSession>,
        redirection: Redirection,
        mut requests: Streaming<SessionRequest>,
    ) -> &'static str {
        let Redirection { listener, active } = redirection;
        let Some(events) = live.sender() else {
            return "the client stopped listening";
        };
        let listener = match tokio::net::TcpListener::from_std(listener) {
            Ok(listener) => listener,
            Err(err) => {
                let _ = events.try_send(Err(Status::internal(format!(
                    "cannot watch the steal listener: {err}"
                ))));
                return "internal error";
            }
        };
        // One timer for the whole session rather than one per connection: a
        // task sleeping 10 s beside each new connection cost more memory than
        // the connection itself under a burst.
        let mut sweep = tokio::time::interval(ATTACH_TIMEOUT / 10);
        // An announcement waiting for room in a full event queue. Accepting
        // pauses meanwhile (the kernel's backlog absorbs the burst), so a
        // client reading events slowly slows accepting, not memory; and the
        // loop never waits on the queue itself, so closing, shutdown and
        // the sweep go on even for a client that stopped reading.
        let mut unsent: Option<SessionEvent> = None;
        let reason = loop {
            tokio::select! {
                _ = sweep.tick() => live.reset_unclaimed(),
                room = events.reserve(), if unsent.is_some() => match room {
                    Ok(room) => room.send(Ok(unsent.take().expect("checked by the guard"))),
                    Err(_) => break "the client stopped listening",
                },
                accepted = listener.accept(), if unsent.is_none() => match accepted {
                    Ok((stream, source)) => {
                        unsent = self.announce(live, stream, source).and_then(|event| {
                            match events.try_send(Ok(event)) {
                                Err(mpsc::error::TrySendError::Full(Ok(event))) => Some(event),
                                // Closed: the loop notices below.
                                _ => None,
                            }
                        });
                    }
                    Err(err) => {
                        // Typically out of file descriptors: back off instead of spinning.
                        warn!(session = %live.id, %err, "accepting a stolen connection failed");
                        live.warn(format!("the agent could not accept a connection: {err}"));
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                },
                request = requests.message() => if let Some(reason) = live.handle(request) {
                    break reason;
                },
                () = events.closed() => break "the client stopped listening",
                () = self.shutdown.cancelled() => break "the agent is shutting down",
            }
        };
        // Order matters: stop redirecting first, so every new connection from
        // here on reaches the pod; only then close what we already took.
        drop(active);
        close_backlog(listener);
        reason
    }

    fn end(&self, live: Arc<LiveSession>, reason: &str, claim: Option<Claim>) {
        live.ended.cancel();
        live.standby.close();
        let pending: Vec<(u64, (Pending, Instant))> =
            live.pending.lock().expect("pending lock").drain().collect();
        for (id, (pending, _)) in pending {
            if let Pending::Stolen(stream) = pending {
                live.never_served(id, "session ended");
                tokio::spawn(async move { proxy::close_gracefully(&stream).await });
            }
        }
        self.metrics
            .sessions_active
            .get_or_create(&metrics::ModeLabels { mode: live.mode })
            .dec();
        self.live.lock().expect("live lock").remove(&live.id);
        drop(claim);
        live.emit(session_event::Kind::Ended(SessionEnded {
            reason: reason.to_string(),
        }));
        live.events.lock().expect("events lock").take();
        info!(
            user = %live.owner,
            groups = ?live.owner.groups,
            target = %live.audit.target,
            port = live.audit.port,
            mode = ?live.audit.mode,
            reason,
            "session ended"
        );
        self.record(
            &live,
            "Ended",
            format!("stopped {}: {reason}", live.audit.doing()),
        );
    }

    /// Hands a stolen connection to a standby call, or returns the event
    /// that announces it to the client.
    fn announce(
        &self,
        live: &Arc<LiveSession>,
        stream: TcpStream,
        source: SocketAddr,
    ) -> Option<SessionEvent> {
        let _ = stream.set_nodelay(true);
        let destination = match stream.local_addr() {
            Ok(addr) => canonical(addr),
            Err(err) => {
                debug!(%err, "a stolen connection closed before it was announced");
                return None;
            }
        };
        let source = canonical(source);
        let (id, announcement) = live.hand_over(
            Pending::Stolen(stream),
            source.to_string(),
            destination.to_string(),
        );
        debug!(session = %live.id, connection = id, %source, %destination, "stolen connection");
        announcement.map(|connection| SessionEvent {
            kind: Some(session_event::Kind::Connection(connection)),
        })
    }
}

impl LiveSession {
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    pub fn ended(&self) -> CancellationToken {
        self.ended.clone()
    }

    pub fn connection_closed(&self, connection_id: u64, outcome: Outcome) {
        self.metrics.connection_closed(
            self.mode,
            outcome.bytes_from_remote,
            outcome.bytes_to_remote,
        );
        let mut stats = outcome.stats.or_else(|| {
            let (local, remote) = outcome.sockets?;
            self.redirector.flow_stats(self.target, local, remote)
        });
        // The kernel counts each FIN as a byte of sequence space; a
        // connection that closed normally (stolen or mirrored) exchanged one
        // each way. (Acked stays a lower bound: the last ACK may be in flight.)
        if let Some(stats) = stats.as_mut().filter(|_| outcome.error.is_empty()) {
            stats.bytes_received = stats.bytes_received.saturating_sub(1);
            stats.bytes_acked = stats.bytes_acked.saturating_sub(1);
        }
        if let Some(stats) = stats.filter(|stats| stats.srtt_us > 0) {
            self.metrics
                .flow_rtt_seconds
                .observe(f64::from(stats.srtt_us) / 1e6);
        }
        self.emit(session_event::Kind::Closed(ConnectionClosed {
            connection_id,
            bytes_from_remote: outcome.bytes_from_remote,
            bytes_to_remote: outcome.bytes_to_remote,
            error: outcome.error,
            stats: stats.map(|stats| remocal_proto::v1::FlowStats {
                srtt_us: stats.srtt_us,
                retransmits: stats.total_retrans,
                bytes_acked: stats.bytes_acked,
                bytes_received: stats.bytes_received,
            }),
        }));
    }

    pub fn sender(&self) -> Option<mpsc::Sender<Result<SessionEvent, Status>>> {
        self.events.lock().expect("events lock").clone()
    }

    /// Queues an event unless the queue is full: informational events must
    /// never block the data path.
    pub fn emit(&self, kind: session_event::Kind) {
        if let Some(events) = self.events.lock().expect("events lock").as_ref() {
            let _ = events.try_send(Ok(SessionEvent { kind: Some(kind) }));
        }
    }

    /// Gives a new connection a connection id and a standby call of the
    /// client, or else keeps it for the call the client opens once it is
    /// announced: then the announcement to send is returned too.
    pub fn hand_over(
        &self,
        pending: Pending,
        source: String,
        destination: String,
    ) -> (u64, Option<NewConnection>) {
        self.metrics.connection_opened(self.mode);
        let id = self.next_connection.fetch_add(1, Ordering::Relaxed);
        let connection = NewConnection {
            connection_id: id,
            source,
            destination,
        };
        let Err(Handoff {
            pending,
            connection,
            ..
        }) = self.standby.hand(Handoff {
            id,
            pending,
            connection,
        })
        else {
            return (id, None);
        };
        self.pending
            .lock()
            .expect("pending lock")
            .insert(id, (pending, Instant::now()));
        (id, Some(connection))
    }

    pub fn take_pending(&self, id: u64) -> Option<Pending> {
        self.pending
            .lock()
            .expect("pending lock")
            .remove(&id)
            .map(|(pending, _)| pending)
    }

    /// Resets stolen connections the client has not picked up in time (it
    /// saw the event but its data call never came).
    fn reset_unclaimed(&self) {
        let expired: Vec<(u64, Pending)> = {
            let mut pending = self.pending.lock().expect("pending lock");
            let ids: Vec<u64> = pending
                .iter()
                .filter(|(_, (_, parked))| parked.elapsed() >= ATTACH_TIMEOUT)
                .map(|(id, _)| *id)
                .collect();
            ids.into_iter()
                .filter_map(|id| pending.remove(&id).map(|(p, _)| (id, p)))
                .collect()
        };
        for (id, pending) in expired {
            if let Pending::Stolen(stream) = pending {
                proxy::reset(&stream);
                self.never_served(id, "not picked up");
                self.warn(format!(
                    "connection {id} was reset: the client did not pick it up within {ATTACH_TIMEOUT:?}"
                ));
            }
        }
    }

    /// Applies a client request; `Some(reason)` when it ends the session.
    pub fn handle(&self, request: Result<Option<SessionRequest>, Status>) -> Option<&'static str> {
        match request {
            Ok(Some(SessionRequest {
                kind: Some(session_request::Kind::Close(_)),
            })) => Some("closed by the client"),
            Ok(Some(SessionRequest {
                kind: Some(session_request::Kind::Reject(reject)),
            })) => {
                self.reject(reject.connection_id, &reject.reason);
                None
            }
            Ok(Some(_)) => None,
            Ok(None) => Some("the client ended the call"),
            Err(_) => Some("the link to the client broke"),
        }
    }

    fn reject(&self, id: u64, reason: &str) {
        debug!(session = %self.id, connection = id, reason, "client rejected a connection");
        if let Some(Pending::Stolen(stream)) = self.take_pending(id) {
            proxy::reset(&stream);
            // The client's reason (nothing answers locally, and where) is
            // what the developer needs to read in the connection's history.
            self.never_served(
                id,
                if reason.is_empty() {
                    "rejected by the client"
                } else {
                    reason
                },
            );
        }
    }

    /// Accounts for an announced connection that ends before a data call
    /// carried it.
    fn never_served(&self, id: u64, why: &str) {
        self.connection_closed(
            id,
            Outcome {
                error: why.to_string(),
                ..Outcome::default()
            },
        );
    }

    pub fn warn(&self, message: String) {
        self.emit(session_event::Kind::Warning(Warning { message }));
    }
}

/// Releases a (target, port) claim when the session is gone.
struct Claim {
    sessions: Arc<Sessions>,
    key: (NsId, u16),
}

impl Drop for Claim {
    fn drop(&mut self) {
        self.sessions
            .claims
            .lock()
            .expect("claims lock")
            .remove(&self.key);
    }
}

/// Connections the kernel completed after the last accept but before the
/// redirection was removed were meant for the developer: close them with a
/// FIN instead of letting the listener's close reset them.
fn close_backlog(listener: tokio::net::TcpListener) {
    let Ok(listener) = listener.into_std() else {
        return;
    };
    while let Ok((stream, _)) = listener.accept() {
        if let Ok(stream) = stream
            .set_nonblocking(true)
            .and_then(|()| TcpStream::from_std(stream))
        {
            tokio::spawn(async move { proxy::close_gracefully(&stream).await });
        }
    }
}

/// Dual-stack sockets report IPv4 peers as ::ffff:a.b.c.d; users expect a.b.c.d.
fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

/// 128 bits from the OS: a session id names a session to its owner's calls
/// and is never shown to anyone else, so none can be guessed from another.
fn session_id() -> String {
    let mut bytes = [0u8; 16];
    ring::rand::SystemRandom::new()
        .fill(&mut bytes)
        .expect("the OS random generator");
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}

async fn blocking<T: Send + 'static>(work: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(work)
        .await
        .expect("blocking task panicked")
}
