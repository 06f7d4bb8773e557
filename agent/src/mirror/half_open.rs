//! Connections to a mirrored port whose SYN was seen and no data yet.
//!
//! A copy starts with a connection's first data, never with its SYN alone:
//! anyone can send SYNs (a port scan, a flood from spoofed sources), and
//! each copy costs the agent memory and the developer a local connection.
//! Until its data comes, a connection is only remembered here, for the
//! sequence number its copy will start from; since anyone can fill this
//! table too, it is bounded and forgets quickly.
use std::{
    collections::{BTreeMap, HashMap},
    time::{Duration, Instant},
};

use prometheus_client::metrics::gauge::Gauge;

use super::Flow;

/// Half-open connections one session remembers; beyond it the oldest is
/// forgotten (its data, if it ever comes, is then skipped like that of a
/// connection open before the mirror). An entry costs about 560 bytes
/// (measured: a 64-byte flow in a hash map that a full, churning table
/// grows to four slots an entry, and again in the age index), so this
/// bounds a session's table to about 4.5 MiB. Under a flood of 50,000
/// SYNs a second, a real connection still has 160 ms to send its first
/// data.
pub const MAX_HALF_OPEN: usize = 8192;

/// A handshake takes one round trip and a client sends its request right
/// after it, so a real connection's data follows its SYN within a second;
/// a SYN retransmitted by a slow handshake renews its entry. Anything
/// older was most likely never a connection.
pub const HALF_OPEN_EXPIRY: Duration = Duration::from_secs(10);

/// What a copy needs from its connection's SYN.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Opening {
    pub isn: u32,
    /// The session's count of capture losses when the SYN came: a copy
    /// starting after another loss may already have a hole that never fills.
    pub losses: u64,
}

pub struct HalfOpen {
    flows: HashMap<Flow, Entry>,
    /// The same flows by insertion number: the oldest first.
    by_age: BTreeMap<u64, Flow>,
    next: u64,
    /// Half-open connections of all sessions, for operators.
    gauge: Gauge,
}

struct Entry {
    opening: Opening,
    number: u64,
    since: Instant,
}

impl HalfOpen {
    pub fn new(gauge: Gauge) -> Self {
        Self {
            flows: HashMap::new(),
            by_age: BTreeMap::new(),
            next: 0,
            gauge,
        }
    }

    /// A SYN: remembers its flow, as the newest.
    pub fn syn(&mut self, flow: Flow, opening: Opening, now: Instant) {
        if self.take(&flow).is_none() && self.flows.len() >= MAX_HALF_OPEN {
            self.pop_oldest();
        }
        let number = self.next;
        self.next += 1;
        self.flows.insert(
            flow,
            Entry {
                opening,
                number,
                since: now,
            },
        );
        self.by_age.insert(number, flow);
        self.gauge.inc();
    }

    /// Forgets `flow`, returning its SYN's details if it was remembered.
    pub fn take(&mut self, flow: &Flow) -> Option<Opening> {
        let entry = self.flows.remove(flow)?;
        self.by_age.remove(&entry.number);
        self.gauge.dec();
        Some(entry.opening)
    }

    /// Forgets every flow whose SYN is older than [`HALF_OPEN_EXPIRY`].
    pub fn expire(&mut self, now: Instant) {
        while let Some(flow) = self.by_age.values().next()
            && now.duration_since(self.flows[flow].since) >= HALF_OPEN_EXPIRY
        {
            self.pop_oldest();
        }
    }

    fn pop_oldest(&mut self) {
        if let Some((_, flow)) = self.by_age.pop_first() {
            self.flows.remove(&flow);
            self.gauge.dec();
        }
    }
}

impl Drop for HalfOpen {
    fn drop(&mut self) {
        self.gauge.dec_by(self.flows.len() as i64);
    }
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, SocketAddr};

    use super::*;

    fn flow(n: u32) -> Flow {
        Flow {
            source: SocketAddr::from((Ipv4Addr::from(n), 40000)),
            destination: "198.18.0.2:80".parse().unwrap(),
        }
    }

    fn opening(isn: u32) -> Opening {
        Opening { isn, losses: 0 }
    }

    #[test]
    fn a_syn_is_remembered_until_taken_once() {
        let gauge = Gauge::default();
        let mut table = HalfOpen::new(gauge.clone());
        let now = Instant::now();
        table.syn(flow(1), opening(7), now);
        table.syn(flow(2), opening(8), now);
        assert_eq!(gauge.get(), 2);
        assert_eq!(table.take(&flow(1)), Some(opening(7)));
        assert_eq!(table.take(&flow(1)), None, "taken once");
        assert_eq!((table.flows.len(), gauge.get()), (1, 1));
        drop(table);
        assert_eq!(gauge.get(), 0, "a session's flows leave the gauge with it");
    }

    #[test]
    fn the_table_is_bounded_and_the_oldest_goes_first() {
        let gauge = Gauge::default();
        let mut table = HalfOpen::new(gauge.clone());
        let now = Instant::now();
        let flood = MAX_HALF_OPEN as u32 * 3;
        for n in 0..flood {
            table.syn(flow(n), opening(n), now);
            assert!(table.flows.len() <= MAX_HALF_OPEN);
        }
        assert_eq!(table.flows.len(), MAX_HALF_OPEN);
        assert_eq!(table.by_age.len(), MAX_HALF_OPEN, "the age index too");
        assert_eq!(gauge.get(), MAX_HALF_OPEN as i64);
        let oldest_kept = flood - MAX_HALF_OPEN as u32;
        assert_eq!(table.take(&flow(oldest_kept - 1)), None, "evicted");
        assert_eq!(table.take(&flow(oldest_kept)), Some(opening(oldest_kept)));
        assert_eq!(table.take(&flow(flood - 1)), Some(opening(flood - 1)));
    }

    #[test]
    fn a_retransmitted_syn_renews_its_flow() {
        let mut table = HalfOpen::new(Gauge::default());
        let start = Instant::now();
        table.syn(flow(0), opening(1), start);
        for n in 1..MAX_HALF_OPEN as u32 {
            table.syn(flow(n), opening(n), start);
        }
        let later = start + Duration::from_secs(3);
        table.syn(flow(0), opening(1), later); // now the newest
        assert_eq!(table.flows.len(), MAX_HALF_OPEN, "renewed, not added");
        table.syn(flow(u32::MAX), opening(9), later);
        assert_eq!(table.take(&flow(1)), None, "the oldest went instead");
        table.expire(start + HALF_OPEN_EXPIRY);
        assert_eq!(table.flows.len(), 2, "the renewed flow and the last one");
        assert_eq!(table.take(&flow(0)), Some(opening(1)));
    }

    #[test]
    fn flows_expire_in_age_order() {
        let gauge = Gauge::default();
        let mut table = HalfOpen::new(gauge.clone());
        let start = Instant::now();
        for n in 0..10 {
            table.syn(flow(n), opening(n), start + Duration::from_secs(n.into()));
        }
        table.take(&flow(3)); // taken in between: no hole in the age order
        table.expire(start + HALF_OPEN_EXPIRY - Duration::from_millis(1));
        assert_eq!(table.flows.len(), 9, "nothing expires early");
        table.expire(start + HALF_OPEN_EXPIRY + Duration::from_secs(4));
        assert_eq!(table.flows.len(), 5, "the SYNs of seconds 0 to 4 expired");
        assert_eq!(table.take(&flow(4)), None);
        assert_eq!(table.take(&flow(5)), Some(opening(5)));
        table.expire(start + Duration::from_secs(60));
        assert_eq!((table.flows.len(), gauge.get()), (0, 0));
        assert!(table.by_age.is_empty());
    }
}
