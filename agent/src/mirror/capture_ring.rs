//! Reads the mirror ring buffer of one namespace and hands each capture to
//! the mirror sessions of its port. Never blocks on a slow session: a tap
//! whose queue is full misses the capture and learns that it did (`lost`),
//! exactly like a capture the kernel could not fit in the ring.
use std::{
    io::{PipeReader, PipeWriter},
    ops::ControlFlow,
    os::fd::AsRawFd as _,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
};

use aya::maps::{MapData, PerCpuArray, RingBuf};
use remocal_agent_common::Counter;
use tokio::sync::mpsc;
use tracing::warn;

use super::Capture;
use crate::bpf_counters::total;

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

/// Reads the ring on a thread of its own until the returned reader is
/// stopped. Copying captures out of the ring is the mirror's heaviest work
/// (the ring is written on another CPU, so every byte is a cache miss); on
/// the runtime's thread a draining ring starved the sessions that forward
/// those bytes, and the captures piled up until they were cut off.
pub fn spawn_reader(
    ring: RingBuf<MapData>,
    counters: Arc<PerCpuArray<MapData, u64>>,
    taps: Arc<Taps>,
) -> std::io::Result<Reader> {
    let (stop_rx, stop) = std::io::pipe()?;
    let thread = std::thread::Builder::new()
        .name("remocal-capture".into())
        .spawn(move || read(ring, &stop_rx, &counters, &taps))?;
    Ok(Reader {
        stop: Some(stop),
        thread: Some(thread),
    })
}

/// A running ring reader; dropping it stops the thread and waits for it, so
/// a new reader of the same ring never races an old one for records.
pub struct Reader {
    stop: Option<PipeWriter>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Reader {
    fn drop(&mut self) {
        // Closing the pipe's write end wakes the thread's poll.
        drop(self.stop.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Records handled between looks at the stop pipe, which bounds how long
/// stopping a reader of a busy ring takes.
const BATCH: usize = 4096;
/// After finding records, how long the reader lets more pile up before it
/// looks again. The kernel wakes an idle reader for every record, and at
/// line rate those wakeups (and the reader's wakeups of the sessions) cost
/// more than the copying; a mirror is a copy, so a millisecond is no harm.
const GATHER_MS: i32 = 1;

/// Longest wait on an empty ring. The kernel wakes a waiting reader only
/// when a record lands exactly where the reader stopped, and that wakeup
/// was measured to go missing at line rate: a connection's last segments
/// then sat in the ring until the next packet came. Looking again after this
/// long bounds that delay for a quiet connection.
const IDLE_MS: i32 = 10;

fn read(
    mut ring: RingBuf<MapData>,
    stop: &PipeReader,
    counters: &PerCpuArray<MapData, u64>,
    taps: &Taps,
) {
    let mut dropped = total(counters, Counter::CaptureDropped);
    let mut fds = [
        libc::pollfd {
            fd: stop.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: ring.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    loop {
        let mut handled = 0;
        while handled < BATCH
            && let Some(record) = ring.next()
        {
            if let Some(capture) = Capture::parse(&record) {
                drop(record);
                taps.dispatch(&capture);
            }
            handled += 1;
        }
        let now = total(counters, Counter::CaptureDropped);
        if now > dropped {
            taps.lost_everywhere(now - dropped);
            dropped = now;
        }
        let waited = match handled {
            BATCH => wait(&mut fds[..1], 0),
            0 => wait(&mut fds, IDLE_MS),
            _ => wait(&mut fds[..1], GATHER_MS),
        };
        if waited.is_break() {
            return;
        }
    }
}

/// Waits up to `timeout_ms` on the stop pipe (first) and, if given, the
/// ring; breaks once the reader must stop.
fn wait(fds: &mut [libc::pollfd], timeout_ms: i32) -> ControlFlow<()> {
    for fd in fds.iter_mut() {
        fd.revents = 0;
    }
    // SAFETY: the descriptors stay open for the reader's lifetime and the
    // slice's length is passed with it.
    let ready = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout_ms) };
    if ready < 0 {
        let err = std::io::Error::last_os_error();
        if err.kind() == std::io::ErrorKind::Interrupted {
            return ControlFlow::Continue(());
        }
        warn!(%err, "mirroring stopped: waiting on the capture ring failed");
        return ControlFlow::Break(());
    }
    if fds[0].revents != 0 {
        ControlFlow::Break(())
    } else {
        ControlFlow::Continue(())
    }
}
