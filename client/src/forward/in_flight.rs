//! The connections being served right now, so that a session whose local
//! command exited can let their last bytes (the command's final answers)
//! reach the agent before the session, and with it every connection, ends.
use std::sync::{
    Arc,
    atomic::{AtomicUsize, Ordering},
};

use tokio::sync::Notify;

#[derive(Clone, Default)]
pub struct InFlight(Arc<Shared>);

#[derive(Default)]
struct Shared {
    open: AtomicUsize,
    changed: Notify,
}

/// One connection being served; it counts until dropped.
pub struct Serving(Arc<Shared>);

impl InFlight {
    pub fn serving(&self) -> Serving {
        self.0.open.fetch_add(1, Ordering::SeqCst);
        Serving(self.0.clone())
    }

    /// Returns once no connection is being served.
    pub async fn drained(&self) {
        loop {
            let changed = self.0.changed.notified();
            if self.0.open.load(Ordering::SeqCst) == 0 {
                return;
            }
            changed.await;
        }
    }
}

impl Drop for Serving {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::SeqCst);
        self.0.changed.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn drained_waits_for_every_connection_served() {
        let in_flight = InFlight::default();
        in_flight.drained().await;
        let first = in_flight.serving();
        let second = in_flight.serving();
        drop(first);
        let waiting = tokio::time::timeout(Duration::from_millis(50), in_flight.drained()).await;
        assert!(waiting.is_err(), "one connection is still served");
        drop(second);
        in_flight.drained().await;
    }
}
