//! Whether the agent's async runtime still makes progress. A runtime whose
//! threads are all stuck (a blocking call where none belongs, a deadlock)
//! serves nobody while the process looks alive; `/healthz` says so, from a
//! thread of its own, so the kubelet restarts the agent.
use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

/// How often the runtime proves it is alive.
const BEAT: Duration = Duration::from_secs(1);
/// No beat for this long means stuck: far beyond any pause a busy but
/// healthy runtime shows (a poll never runs for seconds), and well inside
/// the kubelet's three probes ten seconds apart.
pub const STALL_LIMIT: Duration = Duration::from_secs(10);

#[derive(Clone)]
pub struct Heartbeat {
    origin: Instant,
    /// Milliseconds after `origin` of the last beat.
    last: Arc<AtomicU64>,
}

impl Heartbeat {
    /// Beats from a task of the current runtime for as long as it runs.
    pub fn start() -> Self {
        let heartbeat = Self {
            origin: Instant::now(),
            last: Arc::default(),
        };
        let beating = heartbeat.clone();
        tokio::spawn(async move {
            let mut beat = tokio::time::interval(BEAT);
            loop {
                beat.tick().await;
                beating.last.store(beating.now(), Ordering::Relaxed);
            }
        });
        heartbeat
    }

    /// How long the runtime has been silent, when that is longer than `limit`.
    pub fn stalled(&self, limit: Duration) -> Option<Duration> {
        let silent =
            Duration::from_millis(self.now().saturating_sub(self.last.load(Ordering::Relaxed)));
        (silent > limit).then_some(silent)
    }

    fn now(&self) -> u64 {
        u64::try_from(self.origin.elapsed().as_millis()).unwrap_or(u64::MAX)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_runtime_whose_only_thread_is_blocked_is_reported_stalled() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let heartbeat = runtime.block_on(async {
            let heartbeat = Heartbeat::start();
            tokio::time::sleep(Duration::from_millis(50)).await;
            heartbeat
        });
        let limit = BEAT + Duration::from_millis(500);
        assert_eq!(heartbeat.stalled(limit), None, "just beat");
        // Nothing drives the runtime now, as if its thread were stuck.
        std::thread::sleep(limit + Duration::from_millis(500));
        assert!(heartbeat.stalled(limit).is_some());
        runtime.block_on(async {
            // The runtime moves again: the missed beat runs at once.
            tokio::time::sleep(Duration::from_millis(100)).await;
        });
        assert_eq!(heartbeat.stalled(limit), None, "beating again");
    }
}
