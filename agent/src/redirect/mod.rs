//! The kernel-facing half of a steal, behind a small trait so the session and
//! proxy logic can be tested in-process against a plain loopback listener.
mod ebpf;
mod flow_ports;
mod listener;
mod session_links;

use std::net::TcpListener;

pub use ebpf::EbpfRedirector;

use crate::{
    live_session::FlowStatsSource,
    mirror::Tap,
    netns::Netns,
    reset_existing::{EndWith, PodConnections, ResetError},
};

/// Something that can send new connections for a port of a target to a
/// listener of ours.
pub trait Redirector: FlowStatsSource + 'static {
    fn steal(&self, target: &Netns, port: u16) -> Result<Redirection, RedirectError>;
    /// Starts copying the connections to `port` of `target`; copies arrive on
    /// the tap until it is dropped.
    fn mirror(&self, target: &Netns, port: u16) -> Result<Tap, RedirectError>;
    /// The connections the pod itself serves on `port` of `target`: those
    /// open before a steal, which it leaves to the pod. With `ending`, ready
    /// to end them that way (refused where the kernel cannot).
    fn pod_connections(
        &self,
        target: &Netns,
        port: u16,
        ending: Option<EndWith>,
    ) -> Result<Box<dyn PodConnections>, ResetError>;
}

/// An active redirection. New connections arrive on `listener` until `active`
/// is dropped; after that they go to the pod again, while connections already
/// accepted stay ours.
pub struct Redirection {
    pub listener: TcpListener,
    pub active: ActiveRedirection,
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

    use tokio::sync::mpsc;

    use super::*;
    use crate::mirror::Capture;

    #[derive(Default)]
    pub struct LoopbackRedirector {
        /// Addresses of the listeners whose redirection is still active.
        pub active: Arc<Mutex<Vec<std::net::SocketAddr>>>,
        /// Where tests inject captures for mirror sessions.
        pub taps: Arc<Mutex<Vec<mpsc::Sender<Capture>>>>,
        /// The pod's own connections to every port, all idle; `None`
        /// stands for a kernel that cannot end sockets.
        pub pod_connections: Option<usize>,
    }

    /// Idle connections a reset ends at its first look.
    struct IdleConnections(usize);

    impl PodConnections for IdleConnections {
        fn sweep(&mut self, end_idle: bool) -> Result<crate::reset_existing::Sweep, ResetError> {
            let open = self.0;
            if end_idle {
                self.0 = 0;
            }
            Ok(crate::reset_existing::Sweep {
                ended: if end_idle { open } else { 0 },
                busy: if end_idle { 0 } else { open },
            })
        }
    }

    struct Undo(Arc<Mutex<Vec<std::net::SocketAddr>>>, std::net::SocketAddr);

    impl Drop for Undo {
        fn drop(&mut self) {
            self.0.lock().unwrap().retain(|addr| *addr != self.1);
        }
    }

    impl FlowStatsSource for LoopbackRedirector {}

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

        fn pod_connections(
            &self,
            _target: &Netns,
            _port: u16,
            _ending: Option<EndWith>,
        ) -> Result<Box<dyn PodConnections>, ResetError> {
            match self.pod_connections {
                Some(open) => Ok(Box::new(IdleConnections(open))),
                None => Err(ResetError::Unsupported),
            }
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
