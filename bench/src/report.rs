//! The results as people read them: a table with ratios and the issue's
//! targets, met or missed.

use std::fmt::Write as _;

use serde::Serialize;

use crate::measure::{Pair, Results};

const MIB: f64 = (1 << 20) as f64;

/// One of remocal's performance targets, against what this run measured.
#[derive(Serialize)]
pub struct Check {
    pub target: &'static str,
    pub measured: String,
    pub met: bool,
}

pub fn targets(results: &Results) -> Vec<Check> {
    let latency = &results.latency;
    let streams = &results.streams;
    let stream_ratio = streams
        .into_pod
        .gbit_per_second
        .ratio()
        .min(streams.out_of_pod.gbit_per_second.ratio());
    let floor_stream_ratio = (results.floor.into_pod.gbit_per_second
        / streams.into_pod.gbit_per_second.direct)
        .min(results.floor.out_of_pod.gbit_per_second / streams.out_of_pod.gbit_per_second.direct);
    let classifier = &results.bystander.classifier;
    let bystander = &results.bystander.ratios;
    let bystander_cost = [
        1.0 / bystander.requests_per_second,
        1.0 / bystander.stream_gbit_per_second,
        bystander.latency_p50_us,
    ]
    .into_iter()
    .fold(f64::MIN, f64::max)
        - 1.0;
    let agent_mib = results.concurrency.agent.holding_bytes as f64 / MIB;
    let mirror = results.mirror.best_exact_gbyte_per_second;
    let floor = &results.floor;
    let floor_added = |p: f64| floor.added_us(&latency.direct, p);
    let filtered = &results.filtered;
    let (unmatched, relay) = (&filtered.unmatched_vs_direct, &filtered.relay_vs_direct);
    let matched = &filtered.matched_vs_whole_port;
    let mut checks = vec![
        Check {
            target: "added p50 latency <= 50 us",
            measured: format!(
                "{:.0} us (two plain relays: {:.0} us)",
                latency.added_us(50.0),
                floor_added(50.0)
            ),
            met: latency.added_us(50.0) <= 50.0,
        },
        Check {
            target: "added p99 latency <= 250 us",
            measured: format!(
                "{:.0} us (two plain relays: {:.0} us)",
                latency.added_us(99.0),
                floor_added(99.0)
            ),
            met: latency.added_us(99.0) <= 250.0,
        },
        Check {
            target: "one stolen stream >= 40% of direct (worse direction)",
            measured: format!(
                "{:.0}% (two plain relays: {:.0}%)",
                stream_ratio * 100.0,
                floor_stream_ratio * 100.0
            ),
            met: stream_ratio >= 0.4,
        },
        Check {
            target: "new stolen connections >= 20,000/s",
            measured: format!(
                "{:.0}/s (two plain relays: {:.0}/s)",
                results.connect_rate.per_second.stolen, floor.connect_rate.requests_per_second
            ),
            met: results.connect_rate.per_second.stolen >= 20_000.0,
        },
        Check {
            target: "agent < 64 MiB holding 10,000 stolen connections",
            measured: format!(
                "{agent_mib:.1} MiB with {}",
                results.concurrency.connections
            ),
            met: results.concurrency.connections >= 10_000 && agent_mib < 64.0,
        },
        Check {
            target: "traffic not stolen within 2% of without remocal",
            measured: format!(
                "{:+.1}% (worst of rate, stream, p50; the classifier's own run time: {:.1}% of a CPU)",
                bystander_cost * 100.0,
                classifier.share_of_one_cpu * 100.0
            ),
            met: bystander_cost <= 0.02,
        },
        Check {
            target: "mirror byte-exact at >= 1 GB/s",
            measured: mirror.map_or("no exact copy".into(), |rate| format!("{rate:.2} GB/s")),
            met: mirror.is_some_and(|rate| rate >= 1.0),
        },
        Check {
            target: "steal active <= 200 ms after the command starts",
            measured: format!("{:.0} ms (median)", results.startup.median_ms),
            met: results.startup.median_ms <= 200.0,
        },
        Check {
            target: "held keep-alive client stolen <= 1 s after ready",
            measured: format!(
                "{} (median; max {})",
                ms_or_never(results.reset_takeover.median_ms),
                ms_or_never(results.reset_takeover.max_ms)
            ),
            met: results
                .reset_takeover
                .median_ms
                .is_some_and(|ms| ms <= 1000.0),
        },
    ];
    checks.extend([
        Check {
            target: "filtered, unmatched: added p50 <= one plain relay's",
            measured: format!(
                "{:+.0} us (one plain relay: {:+.0} us)",
                unmatched.added_p50_us, relay.added_p50_us
            ),
            met: unmatched.added_p50_us <= relay.added_p50_us,
        },
        Check {
            target: "filtered, unmatched: added p99 <= one plain relay's",
            measured: format!(
                "{:+.0} us (one plain relay: {:+.0} us)",
                unmatched.added_p99_us, relay.added_p99_us
            ),
            met: unmatched.added_p99_us <= relay.added_p99_us,
        },
        Check {
            target: "filtered, unmatched: requests/s >= 70% of direct",
            measured: format!(
                "{:.0}% at {} connections (one plain relay: {:.0}%)",
                unmatched.requests_per_second_ratio * 100.0,
                filtered.connections,
                relay.requests_per_second_ratio * 100.0
            ),
            met: unmatched.requests_per_second_ratio >= 0.7,
        },
        Check {
            target: "filtered, matched: within 10% of a whole-port steal",
            measured: format!(
                "{:+.1}% (worst of p50 {:+.1}%, p99 {:+.1}%, requests/s at {} connections {:.0}%)",
                matched.worst_cost() * 100.0,
                (matched.p50_ratio - 1.0) * 100.0,
                (matched.p99_ratio - 1.0) * 100.0,
                filtered.connections,
                matched.requests_per_second_ratio * 100.0
            ),
            met: matched.worst_cost() <= 0.10,
        },
    ]);
    checks
}

pub fn table(results: &Results, checks: &[Check]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "remocal bench: {} run, {} build, kernel {}, {} CPUs\n",
        results.profile, results.build, results.kernel, results.cpus
    );
    let _ = writeln!(
        out,
        "{:<34}{:>14}{:>14}{:>10}",
        "", "direct", "stolen", "ratio"
    );
    let latency = &results.latency;
    for p in [50.0, 90.0, 99.0, 99.9] {
        let pair = Pair {
            direct: latency.direct.percentile(p),
            stolen: latency.stolen.percentile(p),
        };
        row(
            &mut out,
            &format!("keep-alive latency p{p}"),
            pair,
            micros,
            Some(format!("+{:.0} us", latency.added_us(p))),
        );
    }
    let rps = Pair {
        direct: latency.direct.requests_per_second,
        stolen: latency.stolen.requests_per_second,
    };
    row(&mut out, "keep-alive requests/s (1 conn)", rps, count, None);
    row(
        &mut out,
        "new connections/s",
        results.connect_rate.per_second,
        count,
        None,
    );
    let single = results.connect_rate.one_at_a_time.p50_us();
    row(
        &mut out,
        "new connection's answer p50",
        single,
        micros,
        Some(format!(
            "+{:.0} us (one at a time)",
            single.stolen - single.direct
        )),
    );
    let streams = &results.streams;
    row(
        &mut out,
        "one stream into the pod",
        streams.into_pod.gbit_per_second,
        gbit,
        None,
    );
    row(
        &mut out,
        "one stream out of the pod",
        streams.out_of_pod.gbit_per_second,
        gbit,
        None,
    );
    floor_section(&mut out, results);
    filtered_section(&mut out, results);

    let bystander = &results.bystander;
    let _ = writeln!(
        out,
        "\n{:<34}{:>14}{:>14}{:>10}",
        "another port of the pod", "without", "with steal", "ratio"
    );
    let (without, with) = (&bystander.without, &bystander.with);
    let rows: [Row; 4] = [
        (
            "latency p50",
            without.latency_p50_us,
            with.latency_p50_us,
            micros,
        ),
        (
            "latency p99",
            without.latency_p99_us,
            with.latency_p99_us,
            micros,
        ),
        (
            "requests/s (1 conn)",
            without.requests_per_second,
            with.requests_per_second,
            count,
        ),
        (
            "one stream into the pod",
            without.stream_gbit_per_second,
            with.stream_gbit_per_second,
            gbit,
        ),
    ];
    for (label, direct, stolen, unit) in rows {
        row(&mut out, label, Pair { direct, stolen }, unit, None);
    }
    let classifier = &bystander.classifier;
    let _ = writeln!(
        out,
        "steal classifier, as the kernel timed it: {:.0} ns per packet over {} packets, {:.1}% of one CPU",
        classifier.nanoseconds_per_packet,
        classifier.packets,
        classifier.share_of_one_cpu * 100.0
    );

    let concurrency = &results.concurrency;
    let _ = writeln!(
        out,
        "\n{} stolen connections held (opened in {:.1} s):",
        concurrency.connections, concurrency.seconds_to_open
    );
    for (name, resident) in [
        ("agent", &concurrency.agent),
        ("client", &concurrency.client),
    ] {
        let _ = writeln!(
            out,
            "  {name:<7}{:>8.1} MiB idle, {:>7.1} MiB holding, {:>6.1} KiB per connection",
            resident.idle_bytes as f64 / MIB,
            resident.holding_bytes as f64 / MIB,
            resident.per_connection_bytes / 1024.0
        );
    }
    let _ = writeln!(
        out,
        "\nmirror, a paced stream's copy checked byte for byte:"
    );
    for step in &results.mirror.steps {
        let paced = step
            .paced_gbit_per_second
            .map_or("unpaced".to_string(), |g| format!("{g} Gbit/s"));
        let verdict = match (&step.cut_because, step.exact) {
            (_, true) => "exact".to_string(),
            (Some(why), false) => format!("CUT: {why}"),
            (None, false) => "CUT".to_string(),
        };
        let _ = writeln!(
            out,
            "  {paced:>12} {:>6.2} GB/s sent   {verdict}",
            step.sent_gbyte_per_second,
        );
    }
    let startup = &results.startup;
    let _ = writeln!(
        out,
        "steal active after: median {:.0} ms over {} starts (each: {})",
        startup.median_ms,
        startup.trials_ms.len(),
        each_ms(startup.trials_ms.iter().copied().map(Some))
    );
    let takeover = &results.reset_takeover;
    let _ = writeln!(
        out,
        "held keep-alive client (a poll every {:.0} ms) stolen after ready, --reset-existing: median {}, max {} over {} starts (each: {}; reset {})",
        takeover.poll_every_ms,
        ms_or_never(takeover.median_ms),
        ms_or_never(takeover.max_ms),
        takeover.trials_ms.len(),
        each_ms(takeover.trials_ms.iter().copied()),
        takeover.resets.join(", ")
    );

    let _ = writeln!(out, "\ntargets:");
    for check in checks {
        let _ = writeln!(
            out,
            "  {:<6} {:<54} {}",
            if check.met { "met" } else { "MISSED" },
            check.target,
            check.measured
        );
    }
    out
}

/// Stolen traffic's hops through two plain relays, and what remocal adds
/// over them: only that part is the agent's and the client's own to win back.
fn floor_section(out: &mut String, results: &Results) {
    let (latency, floor) = (&results.latency, &results.floor);
    let _ = writeln!(
        out,
        "\ntwo plain TCP relays, same hops (the least any agent + client adds here):"
    );
    let _ = writeln!(
        out,
        "{:<34}{:>14}{:>14}{:>22}",
        "", "relays", "vs direct", "remocal vs relays"
    );
    for p in [50.0, 99.0] {
        let relays = floor.latency.percentile(p);
        let _ = writeln!(
            out,
            "{:<34}{:>14}{:>14}{:>22}",
            format!("keep-alive latency p{p}"),
            micros(relays),
            format!("{:+.0} us", floor.added_us(&latency.direct, p)),
            format!("{:+.0} us", latency.stolen.percentile(p) - relays)
        );
    }
    let rate = floor.connect_rate.requests_per_second;
    let connect = results.connect_rate.per_second;
    let _ = writeln!(
        out,
        "{:<34}{:>14}{:>14}{:>22}",
        "new connections/s",
        count(rate),
        format!("{:.2}x", rate / connect.direct),
        format!("{:.2}x", connect.stolen / rate)
    );
    let streams = &results.streams;
    for (label, relays, remocal) in [
        (
            "one stream into the pod",
            &floor.into_pod,
            streams.into_pod.gbit_per_second,
        ),
        (
            "one stream out of the pod",
            &floor.out_of_pod,
            streams.out_of_pod.gbit_per_second,
        ),
    ] {
        let relays = relays.gbit_per_second;
        let _ = writeln!(
            out,
            "{label:<34}{:>14}{:>14}{:>22}",
            gbit(relays),
            format!("{:.2}x", relays / remocal.direct),
            format!("{:.2}x", remocal.stolen / relays)
        );
    }
}

/// The filtered steal's paths side by side, what each comparison comes to,
/// and whether the agent's counts agree with the requests sent.
fn filtered_section(out: &mut String, results: &Results) {
    let filtered = &results.filtered;
    let _ = writeln!(
        out,
        "\nfiltered steal (--header '{}'), median of {} round{}:",
        filtered.header,
        filtered.rounds,
        if filtered.rounds == 1 { "" } else { "s" }
    );
    let _ = writeln!(
        out,
        "{:<34}{:>12}{:>12}{:>15}{:>16}",
        "",
        "p50",
        "p99",
        "req/s 1 conn",
        format!("req/s {} conns", filtered.connections)
    );
    let paths = &filtered.medians;
    for (label, figures) in [
        ("direct", &paths.direct),
        ("one plain relay in front of pod", &paths.relay),
        ("unmatched, filtered session", &paths.unmatched),
        ("whole-port steal (header sent)", &paths.whole_port),
        ("matched, filtered session", &paths.matched),
    ] {
        let _ = writeln!(
            out,
            "{label:<34}{:>12}{:>12}{:>15}{:>16}",
            micros(figures.latency_p50_us),
            micros(figures.latency_p99_us),
            count(figures.requests_per_second_one_connection),
            count(figures.requests_per_second)
        );
    }
    let (unmatched, relay) = (&filtered.unmatched_vs_direct, &filtered.relay_vs_direct);
    let _ = writeln!(
        out,
        "unmatched vs direct: p50 {:+.0} us, p99 {:+.0} us, {:.0}% of the rate (one plain relay: {:+.0} us, {:+.0} us, {:.0}%)",
        unmatched.added_p50_us,
        unmatched.added_p99_us,
        unmatched.requests_per_second_ratio * 100.0,
        relay.added_p50_us,
        relay.added_p99_us,
        relay.requests_per_second_ratio * 100.0
    );
    let over_relay = &filtered.unmatched_vs_relay;
    let _ = writeln!(
        out,
        "unmatched vs one plain relay: p50 {:+.0} us, p99 {:+.0} us, {:.0}% of the rate",
        over_relay.added_p50_us,
        over_relay.added_p99_us,
        over_relay.requests_per_second_ratio * 100.0
    );
    let matched = &filtered.matched_vs_whole_port;
    let _ = writeln!(
        out,
        "matched vs whole-port steal: p50 {:+.0} us ({:+.1}%), p99 {:+.0} us ({:+.1}%), {:.0}% of the rate",
        matched.added_p50_us,
        (matched.p50_ratio - 1.0) * 100.0,
        matched.added_p99_us,
        (matched.p99_ratio - 1.0) * 100.0,
        matched.requests_per_second_ratio * 100.0
    );
    let routed = &filtered.routed;
    let counted = |count: &crate::measure::filtered::Count| {
        format!(
            "{:.0} (answered {}, up to {} more in flight)",
            count.counted, count.answered, count.in_flight_at_most
        )
    };
    let verdict = match (&routed.error, routed.agree) {
        (Some(err), _) => format!("NOT CHECKED: {err}"),
        (None, true) => "agree".to_string(),
        (None, false) => "DISAGREE".to_string(),
    };
    let _ = writeln!(
        out,
        "agent's remocal_routed_requests_total: session {}, pod {}: {verdict}",
        counted(&routed.to_session),
        counted(&routed.to_pod)
    );
}

/// Label, without, with, and how to print the unit.
type Row = (&'static str, f64, f64, fn(f64) -> String);

fn row(out: &mut String, label: &str, pair: Pair, unit: fn(f64) -> String, note: Option<String>) {
    let _ = writeln!(
        out,
        "{label:<34}{:>14}{:>14}{:>10.2}  {}",
        unit(pair.direct),
        unit(pair.stolen),
        pair.ratio(),
        note.unwrap_or_default()
    );
}

/// Each start's figure in ms, for the table: `41, 38, never, 57`.
fn each_ms(trials_ms: impl Iterator<Item = Option<f64>>) -> String {
    trials_ms
        .map(|ms| ms.map_or("never".to_string(), |ms| format!("{ms:.0}")))
        .collect::<Vec<_>>()
        .join(", ")
}

/// A time in ms, or `never` for what did not happen in time.
fn ms_or_never(ms: Option<f64>) -> String {
    ms.map_or("never".to_string(), |ms| format!("{ms:.0} ms"))
}

fn micros(value: f64) -> String {
    format!("{value:.0} us")
}

fn count(value: f64) -> String {
    format!("{value:.0}")
}

fn gbit(value: f64) -> String {
    format!("{value:.2} Gbit/s")
}
