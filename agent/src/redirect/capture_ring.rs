//! Reads the mirror ring buffer of one namespace and hands each capture to
//! the mirror sessions of its port. Never blocks on a slow session: a tap
//! whose queue is full misses the capture and learns that it did (`lost`),
//! exactly like a capture the kernel could not fit in the ring.
use std::sync::{
    Arc, Mutex,
    atomic::{AtomicU64, AtomicUsize, Ordering},
};

use aya::maps::{MapData, PerCpuArray, RingBuf};
use remocal_agent_common::Counter;
use tokio::{io::unix::AsyncFd, sync::mpsc};
use tracing::warn;

use super::ebpf::total;
use crate::mirror::Capture;

/// Captures, and payload bytes, queued per mirror session before it counts
/// as falling behind (a 50 MiB burst of MTU-sized segments is ~36k captures).
const TAP_QUEUE: usize = 65536;
const TAP_BYTES: usize = 128 << 20;

#[derive(Default)]
pub struct Taps {
    entries: Mutex<Vec<TapEntry>>,
    next_id: AtomicU64,
}

struct TapEntry {
    id: u64,
    port: u16,
    captures: mpsc::Sender<Capture>,
    queued: Arc<AtomicUsize>,
    lost: Arc<AtomicU64>,
}

impl Taps {
    pub fn add(
        &self,
        port: u16,
    ) -> (
        u64,
        mpsc::Receiver<Capture>,
        Arc<AtomicUsize>,
        Arc<AtomicU64>,
    ) {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (captures, receiver) = mpsc::channel(TAP_QUEUE);
        let queued = Arc::new(AtomicUsize::new(0));
        let lost = Arc::new(AtomicU64::new(0));
        self.entries.lock().expect("taps lock").push(TapEntry {
            id,
            port,
            captures,
            queued: queued.clone(),
            lost: lost.clone(),
        });
        (id, receiver, queued, lost)
    }

    pub fn is_empty(&self) -> bool {
        self.entries.lock().expect("taps lock").is_empty()
    }

    /// True when no tap is left on the removed tap's port.
    pub fn remove(&self, id: u64) -> bool {
        let mut entries = self.entries.lock().expect("taps lock");
        let Some(index) = entries.iter().position(|entry| entry.id == id) else {
            return false;
        };
        let port = entries.swap_remove(index).port;
        !entries.iter().any(|entry| entry.port == port)
    }

    fn dispatch(&self, capture: &Capture) {
        let port = capture.flow().destination.port();
        for entry in self
            .entries
            .lock()
            .expect("taps lock")
            .iter()
            .filter(|entry| entry.port == port)
        {
            let bytes = capture.bytes();
            // Counted before sending, so the session can never take away
            // bytes that were not added yet.
            let queued = entry.queued.fetch_add(bytes, Ordering::Relaxed);
            if queued + bytes > TAP_BYTES || entry.captures.try_send(capture.clone()).is_err() {
                entry.queued.fetch_sub(bytes, Ordering::Relaxed);
                entry.lost.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// The kernel dropped captures; it cannot say whose, so every tap hears.
    fn lost_everywhere(&self, count: u64) {
        for entry in self.entries.lock().expect("taps lock").iter() {
            entry.lost.fetch_add(count, Ordering::Relaxed);
        }
    }
}

pub async fn read(
    ring: RingBuf<MapData>,
    counters: Arc<PerCpuArray<MapData, u64>>,
    taps: Arc<Taps>,
) {
    // SAFETY: the ring buffer owns its fd, which stays open as long as the AsyncFd owns it.
    let registered =
        unsafe { AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE) };
    let mut ring = match registered {
        Ok(ring) => ring,
        Err(err) => return warn!(%err, "mirroring is unavailable: cannot watch the capture ring"),
    };
    let mut dropped = total(&counters, Counter::CaptureDropped);
    loop {
        let Ok(mut ready) = ring.readable_mut().await else {
            return;
        };
        while let Some(record) = ready.get_inner_mut().next() {
            if let Some(capture) = Capture::parse(&record) {
                taps.dispatch(&capture);
            }
        }
        ready.clear_ready();
        let now = total(&counters, Counter::CaptureDropped);
        if now > dropped {
            taps.lost_everywhere(now - dropped);
            dropped = now;
        }
    }
}
