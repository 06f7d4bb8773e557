//! `--reset-existing`: the pod's connections that were open before a steal
//! keep going to the pod (only new connections are redirected), so clients
//! that hold keep-alive connections would never reach the developer. Once
//! the redirection is on, the agent ends those connections while they are
//! idle (see [`idle`]), and their clients reconnect, into the steal. A
//! busy connection is looked at again every 250 µs until it is
//! idle or the deadline passes; then it is left alone and reported.
//!
//! Without the flag, the same look only counts them, for a warning.
//!
//! The kernel-facing part is behind [`PodConnections`], so that the session
//! logic can be tested in-process.
mod destroy_iterator;
mod idle;
mod pod_sockets;

use std::{
    io,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use tokio::sync::{Semaphore, mpsc};
use tokio_util::sync::CancellationToken;

pub use pod_sockets::PodSockets;

use crate::netlink::NetlinkError;

/// How long busy connections are retried unless the client says otherwise.
pub const DEFAULT_DEADLINE: Duration = Duration::from_secs(10);
/// The longest deadline a client may ask for: a session start must not
/// leave a sweeper running for long after its purpose is gone.
pub const MAX_DEADLINE: Duration = Duration::from_secs(120);
/// Between two looks at busy connections: often enough to catch a client's
/// request before its answer now and then (the evidence `idle` needs when
/// both fall in one tick), at one netlink lookup per connection per look
/// (a few microseconds each).
const RETRY_EVERY: Duration = Duration::from_micros(250);
/// Resets looking at once on one agent, each taking at most a fifth of a
/// core: callers with the grant cannot take more than most of one core
/// with them, however many sessions they open.
const MAX_LOOKERS: usize = 4;
static LOOKERS: Semaphore = Semaphore::const_new(MAX_LOOKERS);

/// How idle connections are ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum EndWith {
    /// The kernel iterator where this kernel can run it, else netlink.
    Auto,
    /// Only the kernel iterator: a reset is refused where it cannot run.
    KernelIterator,
    /// Only netlink SOCK_DESTROY (CONFIG_INET_DIAG_DESTROY).
    Netlink,
}

/// A pod's own connections to one port.
pub trait PodConnections: Send + 'static {
    /// One look at them; with `end_idle`, those idle now are ended.
    fn sweep(&mut self, end_idle: bool) -> Result<Sweep, ResetError>;
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Sweep {
    /// Ended by this look.
    pub ended: usize,
    /// Still open and still the pod's after it.
    pub busy: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum ResetError {
    #[error("cannot look at the target's sockets: {0}")]
    Open(io::Error),
    #[error(
        "this node's kernel cannot end sockets (it lacks CONFIG_INET_DIAG_DESTROY), so --reset-existing is unavailable here: steal without it, and restart the clients that hold connections to the pod"
    )]
    Unsupported,
    #[error(
        "the agent may not end sockets in the target's network namespace ({0}): it needs CAP_NET_ADMIN there"
    )]
    NotPermitted(NetlinkError),
    #[error("cannot list the target's connections: {0}")]
    List(NetlinkError),
    #[error("cannot end a connection of the target: {0}")]
    End(NetlinkError),
    #[error("cannot end a connection of the target with the socket iterator: {0}")]
    EndInKernel(io::Error),
    #[error(
        "this agent ends connections only with the kernel's socket iterator (--end-connections-with kernel-iterator), and this node's kernel cannot run it ({0}): start the agent with --end-connections-with auto"
    )]
    NoIterator(destroy_iterator::Unavailable),
}

impl ResetError {
    fn from_probe(err: NetlinkError) -> Self {
        match err.errno() {
            Some(libc::EOPNOTSUPP) => Self::Unsupported,
            Some(libc::EPERM | libc::EACCES) => Self::NotPermitted(err),
            _ => Self::End(err),
        }
    }
}

/// How far a reset got, as its client is told.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Progress {
    /// Ended so far.
    pub ended: usize,
    /// Busy, still retried (or, once `done`, left alone).
    pub waiting: usize,
    /// No more looks follow.
    pub done: bool,
}

impl Progress {
    pub fn after_first(sweep: Sweep) -> Self {
        Self {
            ended: sweep.ended,
            waiting: sweep.busy,
            done: sweep.busy == 0,
        }
    }
}

/// Retries the busy connections left by the first look until none is left,
/// `deadline` (from the start of the session) passes, or `stop` fires.
/// `report` hears every change and, last, the outcome with `done` set.
///
/// The looks run on one blocking thread: their spacing is finer than the
/// runtime's timer, and a look never waits for the runtime.
pub async fn finish(
    mut connections: Box<dyn PodConnections>,
    progress: Progress,
    deadline: Instant,
    stop: CancellationToken,
    report: impl Fn(Progress),
) -> Result<Progress, ResetError> {
    // A turn among the agent's resets; one that waits past its deadline
    // leaves its busy connections alone.
    let turn = tokio::select! {
        turn = LOOKERS.acquire() => turn.expect("the semaphore is never closed"),
        () = tokio::time::sleep_until(deadline.into()) => {
            let left = Progress { done: true, ..progress };
            report(left);
            return Ok(left);
        }
        () = stop.cancelled() => return Ok(progress),
    };
    let (changes, mut heard) = mpsc::unbounded_channel();
    let stopped = Arc::new(AtomicBool::new(false));
    let looker = {
        let stopped = stopped.clone();
        tokio::task::spawn_blocking(move || {
            let mut progress = progress;
            while !progress.done && !stopped.load(Ordering::Relaxed) {
                let started = Instant::now();
                let sweep = connections.sweep(true)?;
                let before = progress;
                progress.ended += sweep.ended;
                progress.waiting = sweep.busy;
                progress.done = sweep.busy == 0 || Instant::now() >= deadline;
                if progress != before {
                    let _ = changes.send(progress);
                }
                // A look over many connections takes longer: space them so
                // that looking takes at most a fifth of a core.
                std::thread::sleep(RETRY_EVERY.max(started.elapsed() * 4));
            }
            Ok(progress)
        })
    };
    tokio::pin!(looker);
    loop {
        tokio::select! {
            Some(progress) = heard.recv() => report(progress),
            () = stop.cancelled(), if !stopped.load(Ordering::Relaxed) => {
                stopped.store(true, Ordering::Relaxed);
            }
            outcome = &mut looker => {
                drop(turn);
                // Changes sent before the thread ended come first.
                while let Ok(progress) = heard.try_recv() {
                    report(progress);
                }
                return outcome.map_err(|err| ResetError::Open(io::Error::other(err)))?;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;
    use std::sync::Mutex;

    use super::*;

    /// Answers each look with the next scripted sweep, then with the last
    /// one forever.
    struct Scripted(VecDeque<Sweep>);

    impl PodConnections for Scripted {
        fn sweep(&mut self, end_idle: bool) -> Result<Sweep, ResetError> {
            assert!(end_idle, "a reset ends what is idle");
            Ok(if self.0.len() > 1 {
                self.0.pop_front().unwrap()
            } else {
                self.0[0]
            })
        }
    }

    /// Runs `finish` over the script after a first look that found
    /// `first`; returns its outcome and every report it made.
    async fn finish_script(
        script: &[Sweep],
        first: Sweep,
        deadline: Duration,
    ) -> (Progress, Vec<Progress>) {
        let heard = Arc::new(Mutex::new(Vec::new()));
        let sink = heard.clone();
        let outcome = finish(
            Box::new(Scripted(script.iter().copied().collect())),
            Progress::after_first(first),
            Instant::now() + deadline,
            CancellationToken::new(),
            move |progress| sink.lock().unwrap().push(progress),
        )
        .await
        .unwrap();
        let heard = heard.lock().unwrap().clone();
        (outcome, heard)
    }

    #[tokio::test]
    async fn busy_connections_are_retried_until_they_are_ended() {
        let script = [
            Sweep { ended: 0, busy: 2 },
            Sweep { ended: 1, busy: 1 },
            Sweep { ended: 1, busy: 0 },
        ];
        let (outcome, heard) = finish_script(
            &script,
            Sweep { ended: 3, busy: 2 },
            Duration::from_secs(10),
        )
        .await;
        let done = Progress {
            ended: 5,
            waiting: 0,
            done: true,
        };
        assert_eq!(outcome, done);
        let midway = Progress {
            ended: 4,
            waiting: 1,
            done: false,
        };
        assert_eq!(heard, [midway, done]);
    }

    #[tokio::test]
    async fn connections_still_busy_at_the_deadline_are_left_alone() {
        let busy = Sweep { ended: 0, busy: 1 };
        let (outcome, heard) = finish_script(&[busy], busy, Duration::from_millis(50)).await;
        let left = Progress {
            ended: 0,
            waiting: 1,
            done: true,
        };
        assert_eq!(outcome, left);
        assert_eq!(heard, [left], "one report, at the end");
    }

    #[tokio::test]
    async fn an_ending_session_stops_the_reset() {
        let script = Scripted(VecDeque::from([Sweep { ended: 0, busy: 1 }]));
        let first = Progress::after_first(Sweep { ended: 0, busy: 1 });
        let stop = CancellationToken::new();
        stop.cancel();
        let deadline = Instant::now() + Duration::from_secs(10);
        let outcome = finish(Box::new(script), first, deadline, stop, |_| {})
            .await
            .unwrap();
        assert!(!outcome.done);
    }

    #[test]
    fn a_kernel_that_cannot_end_sockets_is_named() {
        let refused = |errno| NetlinkError::Refused {
            errno,
            detail: None,
        };
        let unsupported = ResetError::from_probe(refused(libc::EOPNOTSUPP));
        assert!(matches!(unsupported, ResetError::Unsupported));
        assert!(
            unsupported.to_string().contains("CONFIG_INET_DIAG_DESTROY"),
            "{unsupported}"
        );
        assert!(matches!(
            ResetError::from_probe(refused(libc::EPERM)),
            ResetError::NotPermitted(_)
        ));
    }
}
