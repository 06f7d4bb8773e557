//! The latency distributions, direct and stolen, as an SVG: latency (log
//! scale, so microsecond medians and millisecond tails both show) against
//! percentile on the usual "nines" axis (50, 90, 99, 99.9, 99.99), where the
//! tail that users feel gets as much room as the median.

use std::fmt::Write as _;

use crate::request_run::RequestRun;

const WIDTH: f64 = 720.0;
const HEIGHT: f64 = 420.0;
const LEFT: f64 = 70.0;
const RIGHT: f64 = 20.0;
const TOP: f64 = 40.0;
const BOTTOM: f64 = 50.0;
/// The axis ends at 99.99%: 10^4.
const MAX_NINES: f64 = 4.0;

pub fn latency(direct: &RequestRun, stolen: &RequestRun) -> String {
    let series = [("direct", "#1f77b4", direct), ("stolen", "#d62728", stolen)];
    let latencies: Vec<f64> = series
        .iter()
        .flat_map(|(_, _, run)| points(run))
        .map(|(_, us)| us.max(1.0))
        .collect();
    // Whole decades: 10 µs, 100 µs, 1 ms...
    let low = latencies
        .iter()
        .copied()
        .fold(f64::MAX, f64::min)
        .log10()
        .floor();
    let high = latencies
        .iter()
        .copied()
        .fold(1.0, f64::max)
        .log10()
        .ceil()
        .max(low + 1.0);
    let x = |nines: f64| LEFT + nines / MAX_NINES * (WIDTH - LEFT - RIGHT);
    let y = |us: f64| {
        HEIGHT - BOTTOM - (us.max(1.0).log10() - low) / (high - low) * (HEIGHT - TOP - BOTTOM)
    };

    let mut svg = String::new();
    let _ = writeln!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(svg, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        svg,
        r#"<text x="{}" y="22" text-anchor="middle" font-size="15">Keep-alive request latency, direct vs stolen ({} and {} requests)</text>"#,
        WIDTH / 2.0,
        direct.requests,
        stolen.requests
    );
    for (nines, label) in [
        (0.0, "0%"),
        (std::f64::consts::LOG10_2, "50%"),
        (1.0, "90%"),
        (2.0, "99%"),
        (3.0, "99.9%"),
        (4.0, "99.99%"),
    ] {
        let px = x(nines);
        let _ = writeln!(
            svg,
            r##"<line x1="{px:.1}" y1="{TOP}" x2="{px:.1}" y2="{:.1}" stroke="#ddd"/><text x="{px:.1}" y="{:.1}" text-anchor="middle">{label}</text>"##,
            HEIGHT - BOTTOM,
            HEIGHT - BOTTOM + 16.0
        );
    }
    for decade in low as i32..=high as i32 {
        let us = 10f64.powi(decade);
        let py = y(us);
        let label = if us >= 1000.0 {
            format!("{} ms", us / 1000.0)
        } else {
            format!("{us} µs")
        };
        let _ = writeln!(
            svg,
            r##"<line x1="{LEFT}" y1="{py:.1}" x2="{:.1}" y2="{py:.1}" stroke="#ddd"/><text x="{:.1}" y="{:.1}" text-anchor="end">{label}</text>"##,
            WIDTH - RIGHT,
            LEFT - 6.0,
            py + 4.0
        );
    }
    let _ = writeln!(
        svg,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">percentile</text>"#,
        (LEFT + WIDTH - RIGHT) / 2.0,
        HEIGHT - 12.0
    );
    let _ = writeln!(
        svg,
        r#"<text transform="translate(14 {:.1}) rotate(-90)" text-anchor="middle">latency</text>"#,
        (TOP + HEIGHT - BOTTOM) / 2.0
    );
    for (index, (name, colour, run)) in series.iter().enumerate() {
        let path: Vec<String> = points(run)
            .map(|(nines, us)| format!("{:.1},{:.1}", x(nines), y(us)))
            .collect();
        let _ = writeln!(
            svg,
            r#"<polyline fill="none" stroke="{colour}" stroke-width="2" points="{}"/>"#,
            path.join(" ")
        );
        let legend_y = TOP + 16.0 * index as f64 + 6.0;
        let _ = writeln!(
            svg,
            r#"<line x1="{:.1}" y1="{legend_y:.1}" x2="{:.1}" y2="{legend_y:.1}" stroke="{colour}" stroke-width="2"/><text x="{:.1}" y="{:.1}">{name}: p50 {:.0} µs, p99 {:.0} µs</text>"#,
            LEFT + 12.0,
            LEFT + 36.0,
            LEFT + 42.0,
            legend_y + 4.0,
            run.percentile(50.0),
            run.percentile(99.0)
        );
    }
    svg.push_str("</svg>\n");
    svg
}

/// (nines, µs) for each measured percentile below 100%: 90% is one nine,
/// 99% two; the maximum has no place on this axis.
fn points(run: &RequestRun) -> impl Iterator<Item = (f64, f64)> + '_ {
    run.latency_us
        .iter()
        .filter(|(p, _)| *p < 100.0)
        .map(|&(p, us)| ((1.0 / (1.0 - p / 100.0)).log10().min(MAX_NINES), us))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(latencies: &[(f64, f64)]) -> RequestRun {
        RequestRun {
            connections: 1,
            requests: 1000,
            errors: 0,
            requests_per_second: 1000.0,
            latency_us: latencies.to_vec(),
        }
    }

    #[test]
    fn draws_both_series_with_their_medians() {
        let direct = run(&[(50.0, 30.0), (99.0, 80.0), (100.0, 900.0)]);
        let stolen = run(&[(50.0, 70.0), (99.0, 190.0), (100.0, 2000.0)]);
        let svg = latency(&direct, &stolen);
        assert_eq!(svg.matches("<polyline").count(), 2);
        assert!(svg.contains("direct: p50 30 µs, p99 80 µs"));
        assert!(svg.contains("stolen: p50 70 µs, p99 190 µs"));
        assert!(svg.trim_end().ends_with("</svg>"));
        // Whole decades frame 30 µs to 190 µs.
        assert!(svg.contains(">10 µs<") && svg.contains(">100 µs<") && svg.contains(">1 ms<"));
    }
}
