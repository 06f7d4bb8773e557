//! Requests and their latency distribution, whoever made them (wrk, or the
//! bench's own one-connection probe).

use serde::Serialize;

/// Percentiles reported (0 is the minimum, 100 the maximum).
pub const PERCENTILES: &[f64] = &[
    0.0, 10.0, 25.0, 50.0, 75.0, 90.0, 95.0, 99.0, 99.5, 99.9, 99.95, 99.99, 100.0,
];

#[derive(Clone, Debug, Serialize)]
pub struct RequestRun {
    pub connections: u32,
    pub requests: u64,
    pub errors: u64,
    pub requests_per_second: f64,
    /// (percentile, microseconds), in [`PERCENTILES`] order.
    pub latency_us: Vec<(f64, f64)>,
}

impl RequestRun {
    pub fn percentile(&self, wanted: f64) -> f64 {
        self.latency_us
            .iter()
            .find(|(p, _)| *p == wanted)
            .map_or(f64::NAN, |(_, us)| *us)
    }
}

/// [`PERCENTILES`] of `samples` (microseconds), nearest rank.
pub fn percentiles(samples: &mut [f64]) -> Vec<(f64, f64)> {
    samples.sort_by(f64::total_cmp);
    PERCENTILES
        .iter()
        .map(|&p| {
            // Less a hair: 99.9% of 1000 must be rank 999 despite rounding.
            let rank = ((p / 100.0) * samples.len() as f64 - 1e-9).ceil() as usize;
            let index = rank.clamp(1, samples.len().max(1)) - 1;
            (p, samples.get(index).copied().unwrap_or(f64::NAN))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let mut samples: Vec<f64> = (1..=1000).map(f64::from).collect();
        samples.reverse();
        let run = percentiles(&mut samples);
        let at = |p: f64| run.iter().find(|(q, _)| *q == p).unwrap().1;
        assert_eq!(
            (at(0.0), at(50.0), at(99.0), at(99.9), at(100.0)),
            (1.0, 500.0, 990.0, 999.0, 1000.0)
        );
    }
}
