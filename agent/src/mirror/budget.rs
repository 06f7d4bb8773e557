//! What all mirror sessions of the agent may hold at once.
//!
//! `--mirror-flow-limit` bounds one copy, but anyone who can reach a mirrored
//! port can open many copies (a session copies up to 4,096 connections, and
//! every session on the port gets each one): 16 copies at their limit would
//! already exceed the DaemonSet's memory limit, and an OOM kill ends every
//! session of the node. So every copy counts what it holds (its reassembly,
//! its outbox and the messages queued toward its call, each piece with its
//! overhead) in one agent-wide [`Budget`], and a capture that takes the total
//! past it has the copy holding the most cut off, wherever it is.
//!
//! The budget is process-wide state (a `static`) because it must be shared
//! by sessions that know nothing of each other, without changing how they
//! are started.
use std::sync::{
    Arc, LazyLock, Mutex, OnceLock, Weak,
    atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering},
};

use bytes::Bytes;
use prometheus_client::metrics::gauge::Gauge;

use super::reassembly::PIECE_OVERHEAD;

/// The default budget, 256 MiB: the DaemonSet's 512 MiB limit leaves that
/// much for mirrored data beside the agent itself, its rings, stolen
/// connections and half-open tables (see the README's "Memory under abuse").
/// It is eight copies at the default --mirror-flow-limit.
pub const DEFAULT_BUDGET: usize = 256 << 20;

/// The agent's `--mirror-budget`, set once at start.
static LIMIT: OnceLock<usize> = OnceLock::new();

static AGENT: LazyLock<Arc<Budget>> =
    LazyLock::new(|| Arc::new(Budget::new(LIMIT.get().copied().unwrap_or(DEFAULT_BUDGET))));

/// Sets the budget; only before the first mirror session starts (the agent
/// does so at start).
pub fn set_limit(bytes: usize) {
    let _ = LIMIT.set(bytes);
}

/// The budget all mirror sessions of this agent share.
pub fn agent() -> Arc<Budget> {
    AGENT.clone()
}

/// What the agent's copies hold now, for `remocal_mirror_held_bytes`.
pub fn held_bytes() -> Gauge {
    AGENT.held.clone()
}

pub struct Budget {
    limit: usize,
    /// The sum of all holdings' bytes.
    held: Gauge,
    /// Every holding still alive, to find the largest. Pruned whenever it
    /// would grow, so it stays within twice the live holdings.
    holdings: Mutex<Vec<Weak<Holding>>>,
}

/// A holding counts toward the budget and may be chosen to be freed.
const HOLDING: u8 = 0;
/// Chosen: its session cuts it at its next look and frees what it can.
const EVICTING: u8 = 1;
/// Still counted, but nothing more can free it: the queue of a copy whose
/// call took it drains as fast as the developer reads.
const SETTLED: u8 = 2;

/// What one copy holds.
pub struct Holding {
    budget: Arc<Budget>,
    bytes: AtomicUsize,
    state: AtomicU8,
    /// Its session's flag: set when one of its holdings is chosen.
    session: Arc<AtomicBool>,
}

impl Budget {
    pub fn new(limit: usize) -> Self {
        Self {
            limit,
            held: Gauge::default(),
            holdings: Mutex::default(),
        }
    }

    pub fn limit(&self) -> usize {
        self.limit
    }

    pub fn held(&self) -> usize {
        usize::try_from(self.held.get()).unwrap_or(0)
    }

    /// A new copy's holding; `session` is set when it is chosen to be freed.
    pub fn holding(self: &Arc<Self>, session: Arc<AtomicBool>) -> Arc<Holding> {
        let holding = Arc::new(Holding {
            budget: self.clone(),
            bytes: AtomicUsize::new(0),
            state: AtomicU8::new(HOLDING),
            session,
        });
        let mut holdings = self.holdings.lock().expect("holdings lock");
        if holdings.len() == holdings.capacity() {
            holdings.retain(|holding| holding.strong_count() > 0);
        }
        holdings.push(Arc::downgrade(&holding));
        holding
    }

    /// Over the limit, chooses the largest holdings (that are not being
    /// freed already) until what remains fits, and flags their sessions.
    /// Cheap within the limit: one atomic load.
    pub fn enforce(&self) {
        if self.held() <= self.limit {
            return;
        }
        let live: Vec<Arc<Holding>> = {
            let holdings = self.holdings.lock().expect("holdings lock");
            holdings.iter().filter_map(Weak::upgrade).collect()
        };
        let freeing: usize = live
            .iter()
            .filter(|holding| holding.state.load(Ordering::Relaxed) == EVICTING)
            .map(|holding| holding.bytes())
            .sum();
        let mut remaining = self.held().saturating_sub(freeing);
        while remaining > self.limit {
            let Some(largest) = live
                .iter()
                .filter(|holding| holding.state.load(Ordering::Relaxed) == HOLDING)
                .filter(|holding| holding.bytes() > 0)
                .max_by_key(|holding| holding.bytes())
            else {
                break; // all that is held is being freed or cannot be
            };
            if largest
                .state
                .compare_exchange(HOLDING, EVICTING, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
            {
                remaining = remaining.saturating_sub(largest.bytes());
                largest.session.store(true, Ordering::Release);
            }
        }
    }
}

impl Holding {
    /// Bytes counted for this copy, with their pieces' overhead.
    pub fn bytes(&self) -> usize {
        self.bytes.load(Ordering::Relaxed)
    }

    /// Replaces `from` bytes counted by `to`.
    pub fn resize(&self, from: usize, to: usize) {
        if to > from {
            self.bytes.fetch_add(to - from, Ordering::Relaxed);
            self.budget.held.inc_by(to as i64 - from as i64);
        } else if from > to {
            self.bytes.fetch_sub(from - to, Ordering::Relaxed);
            self.budget.held.dec_by(from as i64 - to as i64);
        }
    }

    /// Chosen to be freed, and not yet dealt with by its session.
    pub fn evicting(&self) -> bool {
        self.state.load(Ordering::Relaxed) == EVICTING
    }

    /// Nothing more can free this holding: it is no longer chosen.
    pub fn settle(&self) {
        self.state.store(SETTLED, Ordering::Relaxed);
    }

    /// `message` as it is queued toward the copy's call: counted (with
    /// [`PIECE_OVERHEAD`] for its slot and handle) until its last reference
    /// is dropped, sent or thrown away with the queue.
    pub fn queue(self: &Arc<Self>, message: Bytes) -> Bytes {
        let cost = message.len() + PIECE_OVERHEAD;
        self.resize(0, cost);
        Bytes::from_owner(Queued {
            message,
            holding: self.clone(),
            cost,
        })
    }
}

impl Drop for Holding {
    fn drop(&mut self) {
        self.resize(self.bytes(), 0);
    }
}

struct Queued {
    message: Bytes,
    holding: Arc<Holding>,
    cost: usize,
}

impl AsRef<[u8]> for Queued {
    fn as_ref(&self) -> &[u8] {
        &self.message
    }
}

impl Drop for Queued {
    fn drop(&mut self) {
        self.holding.resize(self.cost, 0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn session() -> Arc<AtomicBool> {
        Arc::new(AtomicBool::new(false))
    }

    /// Two copies: once a capture takes the total past the budget, the
    /// larger one is chosen, even when the smaller one grew last.
    #[test]
    fn the_copy_holding_the_most_is_chosen_past_the_budget() {
        let budget = Arc::new(Budget::new(1000));
        let (first, second) = (session(), session());
        let small = budget.holding(first.clone());
        let large = budget.holding(second.clone());
        small.resize(0, 300);
        large.resize(0, 600);
        budget.enforce();
        assert!(!small.evicting() && !large.evicting(), "within the budget");
        small.resize(300, 450); // 1050 in all
        budget.enforce();
        assert!(large.evicting() && !small.evicting());
        assert!(second.load(Ordering::Relaxed) && !first.load(Ordering::Relaxed));
        budget.enforce(); // what remains once it is freed fits: nothing more
        assert!(!small.evicting());
        // Its session cuts it: what it held is freed.
        large.resize(600, 0);
        large.settle();
        assert_eq!(budget.held(), 450);
        drop(large);
        drop(small);
        assert_eq!(budget.held(), 0, "a dropped holding leaves nothing counted");
    }

    /// Bytes that cannot be freed (a queue its call took) still count: the
    /// others make room.
    #[test]
    fn settled_bytes_count_and_the_others_make_room() {
        let budget = Arc::new(Budget::new(1000));
        let draining = budget.holding(session());
        let copy = budget.holding(session());
        draining.resize(0, 900);
        draining.settle();
        copy.resize(0, 200);
        budget.enforce();
        assert!(copy.evicting(), "the only copy that can be freed");
        assert!(!draining.evicting());
    }

    /// Several copies may have to go, each the largest of what is left.
    #[test]
    fn enough_is_chosen_for_the_rest_to_fit() {
        let budget = Arc::new(Budget::new(500)); // 1300 held: 500 and 400 must go
        let holdings: Vec<_> = [100, 500, 400, 300]
            .into_iter()
            .map(|bytes| {
                let holding = budget.holding(session());
                holding.resize(0, bytes);
                holding
            })
            .collect();
        budget.enforce();
        let chosen: Vec<bool> = holdings.iter().map(|h| h.evicting()).collect();
        assert_eq!(chosen, [false, true, true, false]);
    }

    /// A queued message counts until its last slice is gone.
    #[test]
    fn a_queued_message_counts_until_dropped() {
        let budget = Arc::new(Budget::new(usize::MAX));
        let holding = budget.holding(session());
        let message = holding.queue(Bytes::from_static(b"hello"));
        let slice = message.slice(1..3);
        assert_eq!(&slice[..], b"el");
        assert_eq!(holding.bytes(), 5 + PIECE_OVERHEAD);
        assert_eq!(budget.held(), 5 + PIECE_OVERHEAD);
        drop(message);
        assert_eq!(budget.held(), 5 + PIECE_OVERHEAD, "a slice still holds it");
        drop(slice);
        assert_eq!((holding.bytes(), budget.held()), (0, 0));
    }

    #[test]
    fn the_registry_does_not_grow_with_dead_holdings() {
        let budget = Arc::new(Budget::new(usize::MAX));
        let kept = budget.holding(session());
        for _ in 0..10_000 {
            drop(budget.holding(session()));
        }
        let holdings = budget.holdings.lock().unwrap();
        assert!(holdings.len() <= 64, "{} entries", holdings.len());
        drop(kept);
    }
}
