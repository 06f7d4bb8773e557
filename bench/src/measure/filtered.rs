//! A filtered steal (`--header 'x-dev: alice'`) of the pod's HTTP port: while
//! it is active every connection to the port crosses the agent, which reads
//! each request and sends it to the developer's process (matched) or passes
//! it to the pod's own server (unmatched). Side by side in each round:
//!
//! - direct: the pod's server, no session;
//! - one plain relay in front of the pod's server (inside the pod, on
//!   loopback): the hop the agent adds to unmatched requests, and the least
//!   any pass-through can cost here;
//! - unmatched requests (no header) with the filtered session active;
//! - matched requests (with the header) with the filtered session active;
//! - a whole-port steal, the requests carrying the header all the same.
//!
//! Each path gets the same keep-alive probe (one connection, one request at
//! a time: latency) and the same wrk load (several keep-alive connections:
//! the request rate). Compared paths run next to each other, every other
//! round runs backwards, and each comparison is the median of the rounds'
//! own: the machine's drift weighs on both sides alike. The agent's
//! `remocal_routed_requests_total` is checked against what was sent.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use anyhow::{Context as _, bail};
use serde::Serialize;

use crate::agent_metrics;
use crate::bed::{Bed, FILTER_HEADER, HTTP_PORT, LOCAL_BODY, PASSTHROUGH_FLOOR_PORT, POD_BODY};
use crate::probe::{self, Ask};
use crate::profile::Profile;
use crate::relay::DEFAULT_BUFFER;
use crate::request_run::RequestRun;
use crate::server_process::ServerProcess;
use crate::wrk;

use super::median;

/// wrk's keep-alive connections for the request rate, on two threads (one
/// per core here).
pub const CONNECTIONS: u32 = 8;
const THREADS: u32 = 2;

const ROUTED_TO_SESSION: &str = "remocal_routed_requests_total{route=\"session\"}";
const ROUTED_TO_POD: &str = "remocal_routed_requests_total{route=\"pod\"}";

#[derive(Serialize)]
pub struct Filtered {
    /// What the session matches and the matched requests carry.
    pub header: &'static str,
    pub rounds: usize,
    /// wrk's keep-alive connections behind `requests_per_second`.
    pub connections: u32,
    /// Medians over the rounds, path by path.
    pub medians: Paths,
    /// Unmatched requests against direct, the median of each round's.
    pub unmatched_vs_direct: Versus,
    /// One plain relay hop against direct, the same way: the floor of
    /// `unmatched_vs_direct`.
    pub relay_vs_direct: Versus,
    /// Unmatched requests against that relay: what the agent adds over the
    /// floor.
    pub unmatched_vs_relay: Versus,
    /// Matched requests against a whole-port steal.
    pub matched_vs_whole_port: Versus,
    /// What the agent counted against what was sent.
    pub routed: Routed,
    pub every_round: Vec<Paths>,
}

/// The figures of each path.
#[derive(Clone, Copy, Serialize)]
pub struct Paths {
    pub direct: Figures,
    /// One plain relay in front of the pod's server.
    pub relay: Figures,
    /// Requests without the header, a filtered session active.
    pub unmatched: Figures,
    /// Requests with the header, the whole port stolen.
    pub whole_port: Figures,
    /// Requests with the header, a filtered session active.
    pub matched: Figures,
}

#[derive(Clone, Copy, Serialize)]
pub struct Figures {
    /// The keep-alive probe: one connection, one request at a time.
    pub latency_p50_us: f64,
    pub latency_p99_us: f64,
    pub requests_per_second_one_connection: f64,
    /// wrk's keep-alive connections ([`CONNECTIONS`]).
    pub requests_per_second: f64,
}

/// One path against another: latency added, request rate kept.
#[derive(Clone, Copy, Serialize)]
pub struct Versus {
    pub added_p50_us: f64,
    pub added_p99_us: f64,
    /// `path / base` of each latency.
    pub p50_ratio: f64,
    pub p99_ratio: f64,
    /// `path / base` of the request rate at [`CONNECTIONS`] connections.
    pub requests_per_second_ratio: f64,
}

impl Versus {
    fn of(path: &Figures, base: &Figures) -> Versus {
        Versus {
            added_p50_us: path.latency_p50_us - base.latency_p50_us,
            added_p99_us: path.latency_p99_us - base.latency_p99_us,
            p50_ratio: path.latency_p50_us / base.latency_p50_us,
            p99_ratio: path.latency_p99_us / base.latency_p99_us,
            requests_per_second_ratio: path.requests_per_second / base.requests_per_second,
        }
    }

    /// The worst of the three as a cost over the base: 0.1 is 10% slower
    /// (longer latency, or a base rate 1.1 times this path's).
    pub fn worst_cost(&self) -> f64 {
        [
            self.p50_ratio,
            self.p99_ratio,
            1.0 / self.requests_per_second_ratio,
        ]
        .into_iter()
        .fold(f64::MIN, f64::max)
            - 1.0
    }
}

/// The agent's `remocal_routed_requests_total` over the filtered sessions'
/// measured requests, against the requests the bench completed.
#[derive(Serialize)]
pub struct Routed {
    pub to_session: Count,
    pub to_pod: Count,
    /// Both counts within their bounds.
    pub agree: bool,
    /// Why the metrics could not be read, if they could not.
    pub error: Option<String>,
}

#[derive(Default, Serialize)]
pub struct Count {
    /// Requests whose answer the bench received.
    pub answered: u64,
    /// Requests wrk may have sent without waiting for their answer when its
    /// time was up: the agent may have routed up to this many more.
    pub in_flight_at_most: u64,
    /// What the agent counted.
    pub counted: f64,
}

impl Count {
    fn agrees(&self) -> bool {
        self.counted >= self.answered as f64
            && self.counted <= (self.answered + self.in_flight_at_most) as f64
    }
}

/// The floor: one plain relay inside the pod in front of its server, the
/// hop the agent's pass-through takes.
async fn floor_relay(bed: &Bed) -> anyhow::Result<ServerProcess> {
    ServerProcess::relay_in_pod(
        &bed.pod().netns,
        PASSTHROUGH_FLOOR_PORT,
        (Ipv4Addr::LOCALHOST, HTTP_PORT).into(),
        DEFAULT_BUFFER,
    )
    .await
}

pub async fn measure(bed: &Bed, profile: &Profile) -> anyhow::Result<Filtered> {
    let relay = floor_relay(bed).await?;
    let measured = rounds(bed, profile).await;
    relay.stop().await;
    let (every_round, routed) = measured?;

    let medians = medians(&every_round);
    let versus = |path: fn(&Paths) -> Figures, base: fn(&Paths) -> Figures| {
        let each: Vec<Versus> = every_round
            .iter()
            .map(|round| Versus::of(&path(round), &base(round)))
            .collect();
        median_versus(&each)
    };
    Ok(Filtered {
        header: FILTER_HEADER,
        rounds: every_round.len(),
        connections: CONNECTIONS,
        medians,
        unmatched_vs_direct: versus(|r| r.unmatched, |r| r.direct),
        relay_vs_direct: versus(|r| r.relay, |r| r.direct),
        unmatched_vs_relay: versus(|r| r.unmatched, |r| r.relay),
        matched_vs_whole_port: versus(|r| r.matched, |r| r.whole_port),
        routed,
        every_round,
    })
}

async fn rounds(bed: &Bed, profile: &Profile) -> anyhow::Result<(Vec<Paths>, Routed)> {
    relay_reaches_the_pod(bed).await?;
    let mut every_round = Vec::new();
    let (mut to_session, mut to_pod) = (Count::default(), Count::default());
    let mut error = None;
    for round in 0..profile.filtered_rounds {
        // Every other round runs backwards, so a drift of the machine
        // through a round weighs on both sides of each comparison alike.
        let mut stages = Stage::IN_ORDER;
        let backwards = round % 2 == 1;
        if backwards {
            stages.reverse();
        }
        let mut measured = Measuring::default();
        for stage in stages {
            stage.run(bed, profile, backwards, &mut measured).await?;
        }
        let Measuring {
            direct: Some(direct),
            relay: Some(relay),
            unmatched: Some(unmatched),
            whole_port: Some(whole_port),
            matched: Some(matched),
            counted: Some(counted),
        } = measured
        else {
            unreachable!("every stage ran");
        };
        for (count, run) in [(&mut to_pod, &unmatched), (&mut to_session, &matched)] {
            count.answered += run.answered;
            count.in_flight_at_most += u64::from(CONNECTIONS);
        }
        match counted {
            Ok((session, pod)) => {
                to_session.counted += session;
                to_pod.counted += pod;
            }
            Err(err) => error = Some(format!("{err:#}")),
        }
        every_round.push(Paths {
            direct: direct.figures,
            relay: relay.figures,
            unmatched: unmatched.figures,
            whole_port: whole_port.figures,
            matched: matched.figures,
        });
    }
    let agree = error.is_none() && to_session.agrees() && to_pod.agrees();
    let routed = Routed {
        to_session,
        to_pod,
        agree,
        error,
    };
    Ok((every_round, routed))
}

/// A step of a round. In this order the paths compared are neighbours:
/// direct, the relay and unmatched; matched and the whole-port steal.
#[derive(Clone, Copy)]
enum Stage {
    Direct,
    Relay,
    /// Unmatched then matched requests in one filtered session (the other
    /// way round when the round runs backwards).
    Filtered,
    WholePort,
}

/// What a round measured so far.
#[derive(Default)]
struct Measuring {
    direct: Option<Measured>,
    relay: Option<Measured>,
    unmatched: Option<Measured>,
    whole_port: Option<Measured>,
    matched: Option<Measured>,
    /// The agent's routed counts over the filtered session's measured
    /// requests (to sessions, to the pod), or why they could not be read.
    counted: Option<anyhow::Result<(f64, f64)>>,
}

/// Requests without the header, answered by the pod.
const TO_POD: Ask = Ask {
    header: None,
    served_by: Some(POD_BODY),
};
/// Requests with the header, answered by the local server.
const MARKED_LOCAL: Ask = Ask {
    header: Some(FILTER_HEADER),
    served_by: Some(LOCAL_BODY),
};

impl Stage {
    const IN_ORDER: [Stage; 4] = [
        Stage::Direct,
        Stage::Relay,
        Stage::Filtered,
        Stage::WholePort,
    ];

    async fn run(
        self,
        bed: &Bed,
        profile: &Profile,
        backwards: bool,
        into: &mut Measuring,
    ) -> anyhow::Result<()> {
        match self {
            Stage::Direct => {
                let direct = figures(bed, HTTP_PORT, TO_POD, profile)
                    .await
                    .context("direct requests")?;
                into.direct = Some(direct);
            }
            Stage::Relay => {
                let relay = figures(bed, PASSTHROUGH_FLOOR_PORT, TO_POD, profile)
                    .await
                    .context("requests through one plain relay in front of the pod")?;
                into.relay = Some(relay);
            }
            Stage::WholePort => {
                let whole_port = bed
                    .while_http_stolen(async || {
                        figures(bed, HTTP_PORT, MARKED_LOCAL, profile)
                            .await
                            .context("requests with the header, the whole port stolen")
                    })
                    .await?;
                into.whole_port = Some(whole_port);
            }
            Stage::Filtered => {
                let unmatched = async || {
                    figures(bed, HTTP_PORT, TO_POD, profile)
                        .await
                        .context("requests without the header, a filtered steal active")
                };
                let matched = async || {
                    figures(bed, HTTP_PORT, MARKED_LOCAL, profile)
                        .await
                        .context("requests with the header, a filtered steal active")
                };
                let (unmatched, matched, counted) = bed
                    .while_http_filtered(async || {
                        let before = routed_counts(bed).await;
                        let (unmatched, matched) = if backwards {
                            let matched = matched().await?;
                            (unmatched().await?, matched)
                        } else {
                            let unmatched = unmatched().await?;
                            (unmatched, matched().await?)
                        };
                        let after = routed_counts(bed).await;
                        let counted = before.and_then(|(session, pod)| {
                            let (session_after, pod_after) = after?;
                            Ok((session_after - session, pod_after - pod))
                        });
                        Ok((unmatched, matched, counted))
                    })
                    .await?;
                into.unmatched = Some(unmatched);
                into.matched = Some(matched);
                into.counted = Some(counted);
            }
        }
        Ok(())
    }
}

/// One path's figures and how many requests were answered.
struct Measured {
    figures: Figures,
    answered: u64,
}

/// The probe, then wrk, at the pod's `port`; wrk sends `ask`'s header too.
/// Who answers is checked by the probe only (wrk reads no bodies): for the
/// filtered session the agent's counts cover wrk's requests.
async fn figures(bed: &Bed, port: u16, ask: Ask, profile: &Profile) -> anyhow::Result<Measured> {
    let run = profile.filtered_run;
    let probe = probe::keep_alive_asking(bed.node(), bed.pod_addr(port), run, ask)
        .await
        .context("the keep-alive probe")?;
    let headers: Vec<&str> = ask.header.into_iter().collect();
    let url = bed.pod_url(port);
    let load = wrk::keep_alive(bed.node(), &url, THREADS, CONNECTIONS, run, &headers)
        .await
        .context("wrk")?;
    if load.errors > 0 {
        bail!(
            "wrk saw {} errors in {} requests at {url}",
            load.errors,
            load.requests
        );
    }
    Ok(Measured {
        figures: Figures {
            latency_p50_us: probe.percentile(50.0),
            latency_p99_us: probe.percentile(99.0),
            requests_per_second_one_connection: probe.requests_per_second,
            requests_per_second: load.requests_per_second,
        },
        answered: probe.requests + load.requests,
    })
}

/// A path of this measurement, for `remocal-bench load`.
#[derive(Clone, Copy, clap::ValueEnum)]
pub enum LoadPath {
    /// Requests without the header, a filtered steal active.
    Unmatched,
    /// Requests with the header, a filtered steal active.
    Matched,
    /// Requests with the header, the whole port stolen.
    WholePort,
    /// Requests through one plain relay in front of the pod (its pid is
    /// printed instead of the agent's).
    Relay,
}

/// This measurement's wrk load along `path` for `duration` (with `probe`,
/// its keep-alive probe instead), on a bed of its own; the pid of the process
/// on the path goes to stderr once the path works.
pub async fn load(path: LoadPath, duration: Duration, probe: bool) -> anyhow::Result<RequestRun> {
    let bed = Bed::start().await?;
    let send = async |port: u16, pid: u32, headers: &[&'static str]| {
        eprintln!("pid {pid}: {}s of load from now", duration.as_secs());
        if probe {
            let ask = Ask {
                header: headers.first().copied(),
                served_by: None,
            };
            return probe::keep_alive_asking(bed.node(), bed.pod_addr(port), duration, ask).await;
        }
        let url = bed.pod_url(port);
        wrk::keep_alive(bed.node(), &url, THREADS, CONNECTIONS, duration, headers).await
    };
    let agent = bed.agent.pid();
    match path {
        LoadPath::Unmatched => {
            bed.while_http_filtered(async || send(HTTP_PORT, agent, &[]).await)
                .await
        }
        LoadPath::Matched => {
            bed.while_http_filtered(async || send(HTTP_PORT, agent, &[FILTER_HEADER]).await)
                .await
        }
        LoadPath::WholePort => {
            bed.while_http_stolen(async || send(HTTP_PORT, agent, &[FILTER_HEADER]).await)
                .await
        }
        LoadPath::Relay => {
            let relay = floor_relay(&bed).await?;
            let run = send(PASSTHROUGH_FLOOR_PORT, relay.pid(), &[]).await;
            relay.stop().await;
            run
        }
    }
}

/// The agent's counts of requests routed to sessions and to the pod.
async fn routed_counts(bed: &Bed) -> anyhow::Result<(f64, f64)> {
    let page = agent_metrics::page(bed.agent.metrics_addr()).await?;
    Ok((
        agent_metrics::sample(&page, ROUTED_TO_SESSION)?,
        agent_metrics::sample(&page, ROUTED_TO_POD)?,
    ))
}

/// Proves the relay reaches the pod's server before any figure is taken.
async fn relay_reaches_the_pod(bed: &Bed) -> anyhow::Result<()> {
    let addr: SocketAddr = bed.pod_addr(PASSTHROUGH_FLOOR_PORT);
    let answer = probe::once(bed.node(), addr, None, Duration::from_secs(5))
        .await
        .with_context(|| format!("no answer through the relay at {addr}"))?;
    if answer != POD_BODY {
        bail!("{addr} answered {answer:?} through the relay, not {POD_BODY:?}");
    }
    Ok(())
}

fn medians(rounds: &[Paths]) -> Paths {
    let of = |path: fn(&Paths) -> Figures| {
        let figures: Vec<Figures> = rounds.iter().map(path).collect();
        let field = |get: fn(&Figures) -> f64| median(&figures.iter().map(get).collect::<Vec<_>>());
        Figures {
            latency_p50_us: field(|f| f.latency_p50_us),
            latency_p99_us: field(|f| f.latency_p99_us),
            requests_per_second_one_connection: field(|f| f.requests_per_second_one_connection),
            requests_per_second: field(|f| f.requests_per_second),
        }
    };
    Paths {
        direct: of(|p| p.direct),
        relay: of(|p| p.relay),
        unmatched: of(|p| p.unmatched),
        whole_port: of(|p| p.whole_port),
        matched: of(|p| p.matched),
    }
}

fn median_versus(rounds: &[Versus]) -> Versus {
    let of = |get: fn(&Versus) -> f64| median(&rounds.iter().map(get).collect::<Vec<_>>());
    Versus {
        added_p50_us: of(|v| v.added_p50_us),
        added_p99_us: of(|v| v.added_p99_us),
        p50_ratio: of(|v| v.p50_ratio),
        p99_ratio: of(|v| v.p99_ratio),
        requests_per_second_ratio: of(|v| v.requests_per_second_ratio),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn worst_cost_takes_the_slowest_figure() {
        let base = Figures {
            latency_p50_us: 100.0,
            latency_p99_us: 200.0,
            requests_per_second_one_connection: 10_000.0,
            requests_per_second: 20_000.0,
        };
        let path = Figures {
            latency_p50_us: 105.0,
            latency_p99_us: 210.0,
            requests_per_second_one_connection: 9_500.0,
            requests_per_second: 16_000.0,
        };
        let versus = Versus::of(&path, &base);
        assert_eq!(versus.added_p50_us, 5.0);
        assert!(
            (versus.worst_cost() - 0.25).abs() < 1e-9,
            "20,000/16,000 - 1"
        );
    }

    #[test]
    fn counts_agree_within_what_wrk_left_in_flight() {
        let count = |counted| Count {
            answered: 100,
            in_flight_at_most: 8,
            counted,
        };
        assert!(count(100.0).agrees());
        assert!(count(108.0).agrees());
        assert!(!count(99.0).agrees());
        assert!(!count(109.0).agrees());
    }
}
