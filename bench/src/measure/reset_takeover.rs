//! From the `ready` line of `remocal steal --reset-existing` to the first
//! answer the local server gives a client that held a keep-alive connection
//! to the pod before the steal. Without the flag such a client stays on the
//! pod for as long as its connection lives (minutes, for a pool); with it the
//! agent ends the idle connection and the client reconnects into the steal.
//!
//! The `ready` line is seen when the test helper next looks at the command's
//! output, up to 20 ms after it was printed, and the agent makes its first
//! look at the pod's connections before the session reports ready: a start
//! can come out a little below zero.

use std::time::{Duration, Instant};

use anyhow::Context as _;
use serde::Serialize;

use crate::bed::{Bed, HTTP_PORT, LOCAL_BODY, POD_BODY};
use crate::polling_client::PollingClient;
use crate::profile::Profile;

use super::median;

/// How often the client polls: a busy service's pool, and the polling
/// client of the end-to-end test.
const POLL_EVERY: Duration = Duration::from_millis(50);
/// Answers in a row on one connection to the pod before a start: the
/// connection is an established keep-alive one, idle between polls.
const HELD_POLLS: usize = 4;
/// A client still on the pod this long after `ready` was never reached: the
/// agent stops trying at its reset deadline, 10 s by default, and leaves a
/// connection that never looked idle to the pod.
const STOLEN_WITHIN: Duration = Duration::from_secs(12);

#[derive(Serialize)]
pub struct ResetTakeover {
    pub poll_every_ms: f64,
    /// Per start, from `ready` to the client's first answer from the local
    /// server; none when the client was never reached.
    pub trials_ms: Vec<Option<f64>>,
    /// What each session said last of its reset (`ended=1 waiting=0 done`):
    /// its `ready` line has the first look's counts, later `reset` lines
    /// the progress of the agent's further looks.
    pub resets: Vec<String>,
    /// A start whose client was never reached counts as longer than any
    /// other: none when the median falls on such a start.
    pub median_ms: Option<f64>,
    /// None when any start's client was never reached.
    pub max_ms: Option<f64>,
}

pub async fn measure(bed: &Bed, profile: &Profile) -> anyhow::Result<ResetTakeover> {
    let local = bed.local_http().await?;
    let mut client = PollingClient::start(bed.node(), bed.pod_addr(HTTP_PORT), POLL_EVERY);
    let (mut trials_ms, mut resets) = (Vec::new(), Vec::new());
    for start in 1..=profile.reset_trials {
        // After a session ends, its connections end too and the client is
        // back on the pod.
        client
            .held_by(POD_BODY, HELD_POLLS, Duration::from_secs(10))
            .await
            .with_context(|| format!("before start {start}"))?;
        let mut session = bed
            .steal(HTTP_PORT, local.port())
            .arg("--reset-existing")
            .start()
            .await;
        let ready = Instant::now();
        let stolen = client.first_answered_by(LOCAL_BODY, STOLEN_WITHIN).await;
        let said = session.stop().await.stdout;
        let stolen = stolen.with_context(|| format!("start {start}"))?;
        resets.push(last_reset(&said).with_context(|| {
            format!("remocal steal --reset-existing said nothing of a reset: {said:?}")
        })?);
        trials_ms.push(stolen.map(|poll| ms_after(poll.at, ready)));
    }
    let never_as_longest: Vec<f64> = trials_ms
        .iter()
        .map(|ms| ms.unwrap_or(f64::INFINITY))
        .collect();
    let finite = |ms: f64| ms.is_finite().then_some(ms);
    Ok(ResetTakeover {
        poll_every_ms: POLL_EVERY.as_secs_f64() * 1e3,
        median_ms: finite(median(&never_as_longest)),
        max_ms: finite(never_as_longest.iter().copied().fold(f64::MIN, f64::max)),
        trials_ms,
        resets,
    })
}

/// The last reset counts in a session's output: `ended=1 waiting=0 done` out
/// of a later `reset ended=1 waiting=0 done` line, or else out of the ready
/// line, `ready steal ... reset: ended=1 waiting=0 done -> 127.0.0.1:8080 as
/// root`.
fn last_reset(output: &str) -> Option<String> {
    output.lines().rev().find_map(|line| {
        let counts = match line.strip_prefix("reset ") {
            Some(counts) => counts,
            None => {
                line.strip_prefix("ready ")?
                    .split_once(" reset: ")?
                    .1
                    .split_once(" -> ")?
                    .0
            }
        };
        Some(counts.to_string())
    })
}

/// Milliseconds from `ready` to `at`, negative when `at` came first.
fn ms_after(at: Instant, ready: Instant) -> f64 {
    match at.checked_duration_since(ready) {
        Some(after) => after.as_secs_f64() * 1e3,
        None => -(ready - at).as_secs_f64() * 1e3,
    }
}

#[cfg(test)]
mod tests {
    use super::last_reset;

    #[test]
    fn the_last_reset_counts_come_from_a_reset_line_or_the_ready_line() {
        let ready = "ready steal netns /run/netns/x port=80 reset: ended=0 waiting=1 -> 127.0.0.1:8080 as root\n";
        assert_eq!(last_reset(ready).as_deref(), Some("ended=0 waiting=1"));
        let later = format!("{ready}reset ended=1 waiting=0 done\n");
        assert_eq!(
            last_reset(&later).as_deref(),
            Some("ended=1 waiting=0 done")
        );
        assert_eq!(
            last_reset("ready steal netns /run/netns/x port=80 -> 127.0.0.1:8080 as root\n"),
            None
        );
    }
}
