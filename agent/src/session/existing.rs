//! A steal and the connections the pod already served when it started:
//! counted for a warning, or with `--reset-existing` ended while idle so
//! that their clients reconnect into the steal (see `reset_existing`).
use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use remocal_proto::v1::{ResetProgress, session_event};
use tracing::{debug, info, warn};

use super::{OpenError, Sessions, blocking};
use crate::{
    live_session::LiveSession,
    metrics::ResetOutcome,
    netns::Netns,
    reset_existing::{self, PodConnections, Progress, Sweep},
};

/// The pod's connections before the redirection: how to look at them, and
/// whether to end them (the deadline for busy ones).
pub(super) struct PodsOwn {
    connections: Option<Box<dyn PodConnections>>,
    reset: Option<Duration>,
}

/// What the first look, once the redirection is on, found.
pub(super) struct FirstLook {
    connections: Box<dyn PodConnections>,
    sweep: Sweep,
    reset: Option<(Duration, Instant)>,
}

impl Sessions {
    /// Opens the view of the pod's own connections to `port`. Before any
    /// redirection: a kernel that cannot end sockets refuses a reset while
    /// nothing is applied yet; without a reset it only costs the warning.
    pub(super) async fn pods_own(
        &self,
        netns: Netns,
        port: u16,
        reset: Option<Duration>,
    ) -> Result<(Netns, PodsOwn), OpenError> {
        let redirector = self.redirector.clone();
        let ending = reset.map(|_| self.settings.end_connections_with);
        let (netns, found) = blocking(move || {
            let found = redirector.pod_connections(&netns, port, ending);
            (netns, found)
        })
        .await;
        let connections = match found {
            Ok(connections) => Some(connections),
            Err(err) if reset.is_some() => return Err(err.into()),
            Err(err) => {
                debug!(target = %netns, port, %err, "cannot count the pod's own connections");
                None
            }
        };
        Ok((netns, PodsOwn { connections, reset }))
    }
}

impl PodsOwn {
    /// No look at all (a mirror).
    pub(super) fn none() -> Self {
        Self {
            connections: None,
            reset: None,
        }
    }

    /// With the redirection on: counts them, or ends those idle now (a
    /// client whose connection ends reconnects into the steal).
    pub(super) async fn first_look(self, netns: &Netns) -> Result<Option<FirstLook>, OpenError> {
        let Some(mut connections) = self.connections else {
            return Ok(None);
        };
        let started = Instant::now();
        let end_idle = self.reset.is_some();
        let (connections, swept) = blocking(move || {
            let swept = connections.sweep(end_idle);
            (connections, swept)
        })
        .await;
        match swept {
            Ok(sweep) => Ok(Some(FirstLook {
                connections,
                sweep,
                reset: self.reset.map(|deadline| (deadline, started)),
            })),
            Err(err) if end_idle => Err(err.into()),
            Err(err) => {
                debug!(target = %netns, %err, "cannot count the pod's own connections");
                Ok(None)
            }
        }
    }
}

impl FirstLook {
    /// For the `ready` message, when the session asked for a reset.
    pub(super) fn ready(look: Option<&Self>) -> Option<ResetProgress> {
        look.filter(|look| look.reset.is_some())
            .map(|look| reset_progress(Progress::after_first(look.sweep)))
    }

    /// Tells the client how things stand (a warning when it left them to
    /// the pod), and goes on ending the busy ones in the background.
    pub(super) fn follow_up(self, sessions: &Arc<Sessions>, live: &Arc<LiveSession>) {
        let port = live.audit.port;
        let Some((deadline, started)) = self.reset else {
            let busy = self.sweep.busy;
            if busy > 0 {
                live.warn(format!(
                    "{busy} connection{} to port {port} opened before this steal still go{} to the pod: --reset-existing ends them while idle, and their clients reconnect into the steal",
                    if busy == 1 { "" } else { "s" },
                    if busy == 1 { "es" } else { "" },
                ));
            }
            return;
        };
        let first = Progress::after_first(self.sweep);
        live.metrics
            .connections_reset(ResetOutcome::ended, first.ended);
        if first.done {
            sessions.record_reset(live, first);
            return;
        }
        let (sessions, live) = (sessions.clone(), live.clone());
        tokio::spawn(async move {
            let reporter = live.clone();
            let outcome = reset_existing::finish(
                self.connections,
                first,
                started + deadline,
                live.ended.clone(),
                move |progress| {
                    reporter.emit(session_event::Kind::Reset(reset_progress(progress)));
                },
            )
            .await;
            match outcome {
                Ok(progress) => {
                    live.metrics
                        .connections_reset(ResetOutcome::ended, progress.ended - first.ended);
                    if progress.done {
                        live.metrics
                            .connections_reset(ResetOutcome::left_alone, progress.waiting);
                    }
                    sessions.record_reset(&live, progress);
                }
                Err(err) => {
                    warn!(target = %live.audit.target, port, %err, "ending the pod's connections failed");
                    live.warn(format!(
                        "stopped ending the pod's existing connections: {err}"
                    ));
                }
            }
        });
    }
}

impl Sessions {
    /// In the agent's log and the pod's events: whose steal ended how many
    /// of the pod's connections.
    fn record_reset(&self, live: &LiveSession, progress: Progress) {
        if progress.ended == 0 && progress.waiting == 0 {
            // The pod had no connection to take over: nothing to tell.
            return;
        }
        let port = live.audit.port;
        info!(
            user = %live.owner,
            target = %live.audit.target,
            port,
            ended = progress.ended,
            left_alone = progress.waiting,
            "ended the pod's idle connections"
        );
        let left = if progress.waiting > 0 {
            format!(", left {} busy ones to the pod", progress.waiting)
        } else {
            String::new()
        };
        self.record(
            live,
            "ResetConnections",
            format!(
                "ended {} connections to port {port} so that their clients reconnect into the steal (--reset-existing){left}",
                progress.ended
            ),
        );
    }
}

fn reset_progress(progress: Progress) -> ResetProgress {
    let count = |n: usize| u32::try_from(n).unwrap_or(u32::MAX);
    ResetProgress {
        ended: count(progress.ended),
        waiting: count(progress.waiting),
        done: progress.done,
    }
}
