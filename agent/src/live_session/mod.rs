//! A running session as its connections see it: who owns it, the
//! connections waiting for the client's data calls, the client's standby
//! calls and its event stream. Steal, filtered steal and mirror hand their
//! connections to it; the data calls take them from it.
mod standby;

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant, SystemTime},
};

use remocal_agent_common::FlowStats;
use remocal_proto::v1::{
    ConnectionClosed, ConnectionDownstream, Mode, NewConnection, SessionEvent, SessionRequest,
    Warning, session_event, session_request,
};
use tokio::{io::DuplexStream, net::TcpStream, sync::mpsc};
use tokio_util::sync::CancellationToken;
use tracing::debug;

use crate::{
    auth::Identity,
    http_route::Filter,
    kube::ScheduledPod,
    metrics::{self, Metrics},
    netns::NsId,
    proxy::{self, Outcome},
};
pub use standby::{Handoff, StandbyCalls, StandbyRefused};

/// Where a session reads the kernel's TCP statistics of its connections
/// (the eBPF redirector's sock_ops records).
pub trait FlowStatsSource: Send + Sync {
    /// The statistics of a connection in `target`, seen from its socket's
    /// side (`local`, `remote`), while the target is attached.
    fn flow_stats(
        &self,
        _target: NsId,
        _local: SocketAddr,
        _remote: SocketAddr,
    ) -> Option<FlowStats> {
        None
    }
}

/// The client's control stream failed (rather than ended).
pub struct LinkBroken;

/// Why a mirrored copy ended before its connection did; the data call ends
/// with it (the gRPC status its kind maps to, and this message).
#[derive(Debug)]
pub struct CopyCut {
    pub kind: CutKind,
    pub message: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CutKind {
    /// Bytes are missing: the copy cannot be exact from here on.
    DataLoss,
    /// The copy needed more memory than it may hold.
    ResourceExhausted,
    /// A side reset the connection.
    Aborted,
    /// The session ended.
    Unavailable,
    /// Idle for too long.
    DeadlineExceeded,
}

/// A client that never picks up an announced connection must not leave the
/// remote side hanging forever.
pub const ATTACH_TIMEOUT: Duration = Duration::from_secs(10);

/// What a session does, for the agent's log and the pod's events.
pub struct Audit {
    pub target: String,
    pub port: u16,
    pub mode: Mode,
    /// Where the owner runs, as they said (user@host).
    pub client: String,
    pub pod: Option<ScheduledPod>,
    /// A filtered steal's filter.
    pub filter: Option<Arc<Filter>>,
    /// When it became ready, for `remocal sessions`.
    pub started: SystemTime,
}

impl Audit {
    pub fn doing(&self) -> String {
        let verb = if self.mode == Mode::Mirror {
            "mirroring"
        } else {
            "stealing"
        };
        let requests = self
            .filter
            .as_ref()
            .map(|filter| format!(" requests matching {filter}"))
            .unwrap_or_default();
        format!(
            "{verb} port {}{requests} with remocal (from {})",
            self.port, self.client
        )
    }
}

/// A connection on its way to its data call.
pub enum Pending {
    Stolen(TcpStream),
    /// The session's end of the pipe a shared port's router sends the
    /// requests it routed to the session into.
    Routed(DuplexStream),
    /// The copy of a mirrored connection, already flowing into this queue.
    Mirrored(mpsc::Receiver<Result<ConnectionDownstream, CopyCut>>),
}

impl Pending {
    /// Ends a stolen or routed connection no call carried, as failed (a
    /// reset, or the pipe's end, which its router answers for); true when
    /// it was one. A mirrored copy ends with its own queue.
    pub fn reset(self) -> bool {
        match self {
            Pending::Stolen(stream) => {
                proxy::reset(&stream);
                true
            }
            Pending::Routed(_) => true,
            Pending::Mirrored(_) => false,
        }
    }
}

/// The part of a session that connection calls reach by session id.
pub struct LiveSession {
    pub(crate) id: String,
    /// Only its owner's calls may carry its connections.
    pub(crate) owner: Identity,
    /// What it is about, for the log and the pod's events.
    pub(crate) audit: Audit,
    pub(crate) mode: metrics::Mode,
    pub(crate) metrics: Arc<Metrics>,
    /// For the kernel's TCP statistics of this session's connections.
    pub(crate) redirector: Arc<dyn FlowStatsSource>,
    pub(crate) target: NsId,
    /// Connections announced, with when, for [`LiveSession::reset_unclaimed`].
    pub(crate) pending: Mutex<HashMap<u64, (Pending, Instant)>>,
    /// Calls waiting for connections not yet announced.
    pub(crate) standby: StandbyCalls,
    pub(crate) next_connection: AtomicU64,
    /// Taken when the session ends, so the client's event stream ends with
    /// it even while connection tasks still hold the session.
    pub(crate) events: Mutex<Option<mpsc::Sender<SessionEvent>>>,
    pub(crate) ended: CancellationToken,
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

    /// Connections given to the client so far (connection ids start at 1).
    pub fn connections_handed(&self) -> u64 {
        self.next_connection.load(Ordering::Relaxed) - 1
    }

    pub fn sender(&self) -> Option<mpsc::Sender<SessionEvent>> {
        self.events.lock().expect("events lock").clone()
    }

    /// Queues an event unless the queue is full: informational events must
    /// never block the data path.
    pub fn emit(&self, kind: session_event::Kind) {
        if let Some(events) = self.events.lock().expect("events lock").as_ref() {
            let _ = events.try_send(SessionEvent { kind: Some(kind) });
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

    /// Hands the client a connection that carries requests routed to it
    /// from a shared port; the client serves it like a stolen one.
    pub fn announce_routed(
        &self,
        stream: DuplexStream,
        client: SocketAddr,
        destination: SocketAddr,
    ) -> Result<(), &'static str> {
        if self.ended.is_cancelled() {
            return Err("the developer's session ended");
        }
        let (id, announcement) = self.hand_over(
            Pending::Routed(stream),
            client.to_string(),
            destination.to_string(),
        );
        let Some(connection) = announcement else {
            return Ok(());
        };
        let sent = self.sender().is_some_and(|events| {
            events
                .try_send(SessionEvent {
                    kind: Some(session_event::Kind::Connection(connection)),
                })
                .is_ok()
        });
        if sent {
            return Ok(());
        }
        self.take_pending(id);
        self.never_served(id, "the client was not keeping up with new connections");
        Err("the developer's client is not keeping up with new connections")
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
    pub fn reset_unclaimed(&self) {
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
            if pending.reset() {
                self.never_served(id, "not picked up");
                self.warn(format!(
                    "connection {id} was reset: the client did not pick it up within {ATTACH_TIMEOUT:?}"
                ));
            }
        }
    }

    /// Applies a client request; `Some(reason)` when it ends the session.
    pub fn handle(
        &self,
        request: Result<Option<SessionRequest>, LinkBroken>,
    ) -> Option<&'static str> {
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
        if self.take_pending(id).is_some_and(Pending::reset) {
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
    pub fn never_served(&self, id: u64, why: &str) {
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
