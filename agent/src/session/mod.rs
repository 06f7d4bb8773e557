//! Steal sessions: who holds which port of which target, the accept loop that
//! hands each stolen connection to the client, and the teardown order
//! that never loses traffic (redirection off first, then our connections
//! closed cleanly, then the claim released).
mod audit;
mod existing;
mod limits;
mod listing;
mod start;

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, atomic::AtomicU64},
    time::{Duration, Instant},
};

use ring::rand::SecureRandom as _;

use remocal_proto::v1::{
    Mode, OpenSession, Ready, SessionEnded, SessionEvent, SessionRequest, session_event,
};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tonic::Streaming;
use tracing::{info, warn};

use crate::{
    auth::{AccessError, Auth, Identity},
    http_route::{Filter, FilterError},
    kube::{PodEvents, PodLookup, PodLookupError},
    live_session::{
        ATTACH_TIMEOUT, Audit, Handoff, LinkBroken, LiveSession, Pending, StandbyCalls,
        StandbyRefused,
    },
    metrics::{self, Metrics},
    mirror,
    mirror::Tap,
    netns::{Netns, TargetError},
    proxy,
    redirect::{RedirectError, Redirection, Redirector},
    reset_existing::{self, ResetError},
    steal::{self, ClaimError, Membership, Ports, WholeClaim},
};
use audit::self_reported;
use existing::{FirstLook, PodsOwn};
use limits::Slots;
pub use listing::ListError;
use start::Started;

/// What the kernel side set up for a session.
enum Redirected {
    Steal(Redirection),
    Mirror(Tap),
    /// A place on a port shared by filtered steals.
    Filtered(Membership),
}

/// Events queued for a client that reads them slowly; beyond this the accept
/// loop waits, and the kernel's backlog absorbs the burst.
const EVENT_QUEUE: usize = 1024;

pub type Events = mpsc::Receiver<SessionEvent>;

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
    #[error(
        "{holder} already steals the requests of port {port} of {target} matching {filter}; ask them to stop, or use another filter"
    )]
    SameFilter {
        target: String,
        port: u16,
        holder: String,
        filter: String,
    },
    #[error("invalid filter: {0}")]
    Filter(#[from] FilterError),
    #[error("a mirror copies whole connections and takes no filter: filters apply to steal")]
    FilterOnMirror,
    #[error(
        "a mirror is read-only and never ends the pod's connections: reset-existing applies to steal"
    )]
    ResetOnMirror,
    #[error(
        "a reset deadline of {0} ms is too long: at most {max} s",
        max = reset_existing::MAX_DEADLINE.as_secs()
    )]
    ResetDeadline(u32),
    #[error(transparent)]
    Reset(#[from] ResetError),
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

impl OpenError {
    fn claim(err: ClaimError, netns: &Netns, port: u16) -> Self {
        match err {
            ClaimError::Held { holder } => OpenError::Conflict {
                target: netns.to_string(),
                port,
                holder,
            },
            ClaimError::SameFilter { holder, filter } => OpenError::SameFilter {
                target: netns.to_string(),
                port,
                holder,
                filter,
            },
        }
    }
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
    ports: Arc<Ports>,
    live: Mutex<HashMap<String, Arc<LiveSession>>>,
    slots: Mutex<Slots>,
    settings: Settings,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
}

/// Limits that operators tune.
#[derive(Clone, Copy, Debug)]
pub struct Settings {
    /// Bytes a mirrored connection may hold while its local side is slow.
    pub mirror_flow_limit: usize,
    /// How `--reset-existing` ends connections.
    pub end_connections_with: reset_existing::EndWith,
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
            ports: Arc::new(Ports::new(redirector.clone(), metrics.clone())),
            redirector,
            pod_events: PodEvents::new(pods.client(), pods.node()),
            pods,
            auth,
            metrics,
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
            filter,
            reset_deadline,
        } = started?;
        let id = session_id();
        let client = self_reported(&open.client);
        let holder = format!("{identity} (from {client})");
        // Several developers may mirror one port, or steal requests of it
        // with different filters; a whole-port steal is exclusive.
        let claim = (mode == Mode::Steal && filter.is_none())
            .then(|| {
                self.ports
                    .claim_whole(&netns, port, holder.clone())
                    .map_err(|err| OpenError::claim(err, &netns, port))
            })
            .transpose()?;
        // The pod's own connections, which a steal leaves to the pod.
        let (netns, pods_own) = if mode == Mode::Steal {
            self.pods_own(netns, port, reset_deadline).await?
        } else {
            (netns, PodsOwn::none())
        };
        let (netns, redirection) = if filter.is_some() {
            // The shared port does the kernel's part, once the session exists.
            (netns, None)
        } else {
            let redirector = self.redirector.clone();
            let (netns, redirection) = blocking(move || {
                let redirection = match mode {
                    Mode::Mirror => redirector.mirror(&netns, port).map(Redirected::Mirror),
                    _ => redirector.steal(&netns, port).map(Redirected::Steal),
                };
                (netns, redirection)
            })
            .await;
            (netns, Some(redirection?))
        };

        let (events, receiver) = mpsc::channel(EVENT_QUEUE);
        let audit = Audit {
            target: netns.to_string(),
            port,
            mode,
            client,
            pod,
            filter: filter.clone(),
            started: std::time::SystemTime::now(),
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
        let redirection = match (redirection, &filter) {
            (Some(redirection), _) => redirection,
            (None, Some(filter)) => Redirected::Filtered(
                self.join_filtered(&netns, port, holder, filter, &live)
                    .await?,
            ),
            (None, None) => unreachable!("only filtered steals skip the redirection above"),
        };
        let first_look = pods_own.first_look(&netns).await?;
        live.emit(session_event::Kind::Ready(Ready {
            session_id: id.clone(),
            target: netns.to_string(),
            port: port.into(),
            standby_calls: true,
            user: identity.user.clone(),
            filter: filter.map(|filter| filter.spec().clone()),
            reset: FirstLook::ready(first_look.as_ref()),
        }));
        if let Redirected::Filtered(Membership {
            earlier: Some(earlier),
            ..
        }) = &redirection
        {
            // Filters can overlap in ways no check can tell (`.` matches
            // every path): say who comes first.
            live.warn(format!(
                "port {port} is shared with {earlier}: a request that matches their filter as well as yours goes to them, as they started first"
            ));
        }
        self.live
            .lock()
            .expect("live lock")
            .insert(id.clone(), live.clone());
        if let Redirected::Filtered(membership) = &redirection {
            // Known to its client and reachable by its calls: route to it.
            membership.route();
        }
        if let Some(look) = first_look {
            look.follow_up(self, &live);
        }
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
                    steal::whole_port::run(&live, redirection, requests, sessions.shutdown.clone())
                        .await
                }
                Redirected::Filtered(membership) => {
                    let reason = sessions.serve_filtered(&live, requests).await;
                    // Off the port first: no request is routed to it any more.
                    drop(membership);
                    reason
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
        // Shared ports drain their connections (answers in flight finish),
        // then take their pass-through rules out of the pods' namespaces.
        // What is still open at the deadline ends with the process; its
        // inert rules go at the next start.
        while self.ports.draining() > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Joins the port shared by filtered steals, setting it up when this
    /// is its first session; nothing of it is left when this fails.
    async fn join_filtered(
        &self,
        netns: &Netns,
        port: u16,
        holder: String,
        filter: &Arc<Filter>,
        live: &Arc<LiveSession>,
    ) -> Result<Membership, OpenError> {
        let membership = self
            .ports
            .join_filtered(netns, port, holder, filter.clone(), live.clone())
            .map_err(|err| RedirectError::kernel("cannot hold the target's namespace", err))?
            .map_err(|err| OpenError::claim(err, netns, port))?;
        membership.shared.started().await?;
        Ok(membership)
    }

    /// A filtered session's own loop: its connections are opened by the
    /// shared port as requests match; here the client's requests are
    /// handled and connections it never picked up are reset.
    async fn serve_filtered(
        &self,
        live: &Arc<LiveSession>,
        mut requests: Streaming<SessionRequest>,
    ) -> &'static str {
        let Some(events) = live.sender() else {
            return "the client stopped listening";
        };
        let mut sweep = tokio::time::interval(ATTACH_TIMEOUT / 10);
        loop {
            tokio::select! {
                _ = sweep.tick() => live.reset_unclaimed(),
                request = requests.message() => if let Some(reason) = live.handle(request.map_err(|_| LinkBroken)) {
                    break reason;
                },
                () = events.closed() => break "the client stopped listening",
                () = self.shutdown.cancelled() => break "the agent is shutting down",
            }
        }
    }

    fn end(&self, live: Arc<LiveSession>, reason: &str, claim: Option<WholeClaim>) {
        live.ended.cancel();
        live.standby.close();
        let pending: Vec<(u64, (Pending, Instant))> =
            live.pending.lock().expect("pending lock").drain().collect();
        for (id, (pending, _)) in pending {
            match pending {
                Pending::Stolen(stream) => {
                    live.never_served(id, "session ended");
                    tokio::spawn(async move { proxy::close_gracefully(&stream).await });
                }
                Pending::Routed(_) => live.never_served(id, "session ended"),
                Pending::Mirrored(_) => {}
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
