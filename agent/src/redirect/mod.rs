//! The kernel-facing half of a steal, behind a small trait so the session and
//! proxy logic can be tested in-process against a plain loopback listener.
mod capture_ring;
mod ebpf;
mod flow_ports;
mod listener;
mod session_links;

use std::{
    net::{SocketAddr, TcpListener},
    sync::{
        Arc,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
};

pub use ebpf::EbpfRedirector;

use tokio::sync::mpsc;

use remocal_agent_common::FlowStats;

use crate::{
    mirror::Capture,
    netns::{Netns, NsId},
};

/// Something that can send new connections for a port of a target to a
/// listener of ours.
pub trait Redirector: Send + Sync + 'static {
    fn steal(&self, target: &Netns, port: u16) -> Result<Redirection, RedirectError>;
    /// Starts copying the connections to `port` of `target`; copies arrive on
    /// the tap until it is dropped.
    fn mirror(&self, target: &Netns, port: u16) -> Result<Tap, RedirectError>;
    /// The kernel's TCP statistics of a connection in `target`, seen from
    /// its socket's side (`local`, `remote`), while the target is attached.
    fn flow_stats(
        &self,
        _target: NsId,
        _local: SocketAddr,
        _remote: SocketAddr,
    ) -> Option<FlowStats> {
        None
    }
}

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
    pub active: ActiveRedirection,
}

/// An active redirection. New connections arrive on `listener` until `active`
/// is dropped; after that they go to the pod again, while connections already
/// accepted stay ours.
pub struct Redirection {
    pub listener: TcpListener,
    pub active: ActiveRedirection,
}

impl Tap {
    pub fn new(
        captures: mpsc::Receiver<Capture>,
        queued: Arc<AtomicUsize>,
        lost: Arc<AtomicU64>,
        active: ActiveRedirection,
    ) -> Self {
        Self {
            captures,
            queued,
            lost,
            active,
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

/// Undoes the redirection when dropped (crash or not: the kernel objects
/// behind it are owned by this process).
pub struct ActiveRedirection {
    _undo_on_drop: Box<dyn Send + Sync>,
}

impl ActiveRedirection {
    pub fn new(undo_on_drop: impl Send + Sync + 'static) -> Self {
        Self {
            _undo_on_drop: Box::new(undo_on_drop),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RedirectError {
    #[error("{target} has no network interface besides lo, so there is no traffic to steal")]
    NoInterfaces { target: String },
    #[error("{what}: {detail}")]
    Kernel { what: String, detail: String },
    #[error("cannot create the steal listener in {target}: {source}")]
    Listener {
        target: String,
        source: std::io::Error,
    },
}

impl RedirectError {
    pub fn kernel(what: impl Into<String>, detail: impl std::fmt::Display) -> Self {
        Self::Kernel {
            what: what.into(),
            detail: detail.to_string(),
        }
    }
}

#[cfg(test)]
pub mod loopback {
    //! A redirector for in-process tests: a listener on 127.0.0.1 that tests
    //! connect to directly, standing in for the kernel's redirection.
    use std::sync::{Arc, Mutex};

    use super::*;

    #[derive(Default)]
    pub struct LoopbackRedirector {
        /// Addresses of the listeners whose redirection is still active.
        pub active: Arc<Mutex<Vec<std::net::SocketAddr>>>,
        /// Where tests inject captures for mirror sessions.
        pub taps: Arc<Mutex<Vec<mpsc::Sender<Capture>>>>,
    }

    struct Undo(Arc<Mutex<Vec<std::net::SocketAddr>>>, std::net::SocketAddr);

    impl Drop for Undo {
        fn drop(&mut self) {
            self.0.lock().unwrap().retain(|addr| *addr != self.1);
        }
    }

    impl Redirector for LoopbackRedirector {
        fn mirror(&self, _target: &Netns, _port: u16) -> Result<Tap, RedirectError> {
            let (captures, receiver) = mpsc::channel(1024);
            self.taps.lock().unwrap().push(captures);
            Ok(Tap::new(
                receiver,
                Arc::default(),
                Arc::default(),
                ActiveRedirection::new(()),
            ))
        }

        fn steal(&self, _target: &Netns, _port: u16) -> Result<Redirection, RedirectError> {
            let listener = TcpListener::bind("127.0.0.1:0").unwrap();
            listener.set_nonblocking(true).unwrap();
            let addr = listener.local_addr().unwrap();
            self.active.lock().unwrap().push(addr);
            Ok(Redirection {
                listener,
                active: ActiveRedirection::new(Undo(self.active.clone(), addr)),
            })
        }
    }
}
