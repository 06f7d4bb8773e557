//! What a mirror session reads: the captures of its port, from the ring
//! reader, with the kernel's attachment that produces them.
use std::sync::{
    Arc,
    atomic::{AtomicU64, AtomicUsize, Ordering},
};

use tokio::sync::mpsc;

use super::Capture;

/// Copies of a mirrored port's incoming segments, in capture order.
pub struct Tap {
    captures: mpsc::Receiver<Capture>,
    /// Payload bytes queued in `captures`: the producer adds, `next` takes
    /// away, so the queue is bounded in memory and not just in count.
    queued: Arc<AtomicUsize>,
    /// Grows whenever a capture meant for this tap was lost (the kernel's
    /// ring or this tap's queue was full): connections with a gap are then
    /// incomplete for good.
    pub lost: Arc<AtomicU64>,
    /// The kernel's side of the mirror: dropping it stops the copying.
    pub active: Box<dyn Send + Sync>,
}

impl Tap {
    pub fn new(
        captures: mpsc::Receiver<Capture>,
        queued: Arc<AtomicUsize>,
        lost: Arc<AtomicU64>,
        active: impl Send + Sync + 'static,
    ) -> Self {
        Self {
            captures,
            queued,
            lost,
            active: Box::new(active),
        }
    }

    /// The next capture; None once the capture stopped.
    pub async fn next(&mut self) -> Option<Capture> {
        let capture = self.captures.recv().await?;
        let bytes = capture.bytes();
        let _ = self
            .queued
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |queued| {
                Some(queued.saturating_sub(bytes))
            });
        Some(capture)
    }
}
