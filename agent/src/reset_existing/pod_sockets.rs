//! The pod's own connections to a port, through sock_diag in the pod's
//! network namespace: listed and ended by the kernel, no shell tool, no
//! conntrack (remocal's redirection keeps no connection state to flush).
//!
//! Which sockets on the port are the pod's to end:
//! - established, held by a process (a connection still in an accept queue
//!   belongs to nobody yet);
//! - not one of the agents' (this agent's stolen connections have the
//!   pod's address and port too; another agent's during a surge update);
//! - not talking to a socket in the same namespace: the pod-side ends of the
//!   agent's pass-through connections, and a sidecar's loopback connections,
//!   would come back the same way, never into the steal.
//!
//! Connections the pod opened itself have another local port and are never
//! listed.
use std::{
    collections::{HashMap, HashSet},
    net::SocketAddr,
};

use tracing::{debug, info};

use super::{
    EndWith, PodConnections, ResetError, Sweep,
    destroy_iterator::{DestroyIterator, Outcome, Proof},
    idle::{self, Seen, Verdict},
};
use crate::{
    agent_processes,
    netns::Netns,
    sock_diag::{SockDiag, TCP_ESTABLISHED, TcpSocket},
};

pub struct PodSockets {
    diag: SockDiag,
    port: u16,
    /// The pod's connections still open at the last look. Once the
    /// redirection is on the pod gets no new ones from outside, so after a
    /// first look (a dump of the kernel's tables) each later look asks for
    /// these by their addresses only.
    known: Option<Vec<TcpSocket>>,
    /// What the last look saw of each connection, by cookie.
    seen: HashMap<[u8; 8], Seen>,
    /// Inodes found to be the agents' sockets, and those found not to be.
    agents: HashSet<u32>,
    others: HashSet<u32>,
    /// How idle connections are ended; none when they are only counted.
    ender: Option<Ender>,
}

/// In the kernel's socket iterator, which checks under each socket's lock
/// that it is still as judged; or, on kernels without the
/// `bpf_sock_destroy` kfunc, with netlink's SOCK_DESTROY.
enum Ender {
    Iterator(DestroyIterator),
    Netlink,
}

impl Ender {
    /// Netlink, once this kernel showed it can end sockets with it
    /// (CONFIG_INET_DIAG_DESTROY, and the permission in the namespace).
    fn netlink(diag: &mut SockDiag) -> Result<Self, ResetError> {
        diag.can_destroy().map_err(ResetError::from_probe)?;
        Ok(Ender::Netlink)
    }
}

/// The fallback is logged once per agent, not once per reset.
static NETLINK_SAID: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

impl PodSockets {
    /// Opens sock_diag in `netns`; with `ending`, also what ends sockets,
    /// checking that this kernel can (the kfunc, else
    /// CONFIG_INET_DIAG_DESTROY) before anything relies on it.
    pub fn open(netns: &Netns, port: u16, ending: Option<EndWith>) -> Result<Self, ResetError> {
        let mut diag = netns
            .run_in(SockDiag::open_here)
            .and_then(|opened| opened)
            .map_err(ResetError::Open)?;
        let ender = match ending {
            None => None,
            Some(EndWith::Netlink) => Some(Ender::netlink(&mut diag)?),
            Some(EndWith::KernelIterator) => Some(Ender::Iterator(
                DestroyIterator::load(netns).map_err(ResetError::NoIterator)?,
            )),
            Some(EndWith::Auto) => Some(match DestroyIterator::load(netns) {
                Ok(iterator) => Ender::Iterator(iterator),
                Err(why) => {
                    if !NETLINK_SAID.swap(true, std::sync::atomic::Ordering::Relaxed) {
                        info!(%why, "ending idle connections with netlink SOCK_DESTROY: the kernel cannot run the socket iterator that checks each is still idle as it ends it");
                    }
                    Ender::netlink(&mut diag)?
                }
            }),
        };
        Ok(Self {
            ender,
            diag,
            port,
            known: None,
            seen: HashMap::new(),
            agents: HashSet::new(),
            others: HashSet::new(),
        })
    }

    fn is_agents(&mut self, inode: u32) -> bool {
        if self.agents.contains(&inode) {
            return true;
        }
        if self.others.contains(&inode) {
            return false;
        }
        // A socket not seen before: the agents' fd tables decide, read
        // again only now (inodes are unique while their sockets live).
        let mine = std::process::id();
        self.agents = std::iter::once(mine)
            .chain(agent_processes::others())
            .flat_map(agent_processes::socket_inodes)
            .collect();
        let agents = self.agents.contains(&inode);
        if !agents {
            self.others.insert(inode);
        }
        agents
    }

    /// The pod's own connections to the port, now.
    fn pods(&mut self) -> Result<Vec<TcpSocket>, ResetError> {
        let (served, peers): (Vec<_>, Vec<_>) = self
            .diag
            .dump(1 << TCP_ESTABLISHED, self.port)
            .map_err(ResetError::List)?
            .into_iter()
            .partition(|socket| socket.local.port() == self.port);
        let local_peers: HashSet<(SocketAddr, SocketAddr)> = peers
            .into_iter()
            .map(|peer| (canonical(peer.local), canonical(peer.remote)))
            .collect();
        Ok(served
            .into_iter()
            .filter(|socket| socket.inode != 0)
            .filter(|socket| {
                !local_peers.contains(&(canonical(socket.remote), canonical(socket.local)))
            })
            .filter(|socket| !self.is_agents(socket.inode))
            .collect())
    }

    /// The known connections as they are now; those closed meanwhile (or
    /// replaced by another socket with the same addresses) are dropped.
    fn refresh(&mut self, known: Vec<TcpSocket>) -> Result<Vec<TcpSocket>, ResetError> {
        let mut open = Vec::with_capacity(known.len());
        for socket in known {
            match self.diag.find(socket.local, socket.remote) {
                Ok(now) if now.cookie == socket.cookie && now.state == TCP_ESTABLISHED => {
                    open.push(now);
                }
                Ok(_) => {}
                Err(err) if err.errno() == Some(libc::ENOENT) => {}
                Err(err) => return Err(ResetError::List(err)),
            }
        }
        Ok(open)
    }

    /// Ends `idle` connections; those found busy again stay in `still_open`.
    fn end(
        &mut self,
        idle: Vec<(TcpSocket, Proof)>,
        sweep: &mut Sweep,
        still_open: &mut Vec<TcpSocket>,
    ) -> Result<(), ResetError> {
        let outcomes = match &self.ender {
            None => return Ok(()),
            Some(Ender::Iterator(iterator)) => {
                let sockets: Vec<(&TcpSocket, Proof)> = idle
                    .iter()
                    .map(|(socket, proof)| (socket, *proof))
                    .collect();
                iterator.end(&sockets).map_err(ResetError::EndInKernel)?
            }
            Some(Ender::Netlink) => {
                let mut outcomes = Vec::with_capacity(idle.len());
                for (socket, _) in &idle {
                    outcomes.push(match self.diag.destroy(socket) {
                        Ok(()) => Outcome::Ended,
                        Err(err) if err.errno() == Some(libc::ENOENT) => Outcome::Gone,
                        Err(err) => return Err(ResetError::End(err)),
                    });
                }
                outcomes
            }
        };
        for ((socket, _), outcome) in idle.into_iter().zip(outcomes) {
            match outcome {
                Outcome::Ended => {
                    debug!(local = %socket.local, remote = %socket.remote, "ended an idle pod connection");
                    sweep.ended += 1;
                }
                // Looked at again next time (which drops it if it closed).
                Outcome::Busy | Outcome::Unreached => {
                    debug!(local = %socket.local, remote = %socket.remote, ?outcome, "pod connection not ended: left for now");
                    sweep.busy += 1;
                    still_open.push(socket);
                }
                // Closed on its own meanwhile: nothing left to take over.
                Outcome::Gone => {}
            }
        }
        Ok(())
    }
}

impl PodConnections for PodSockets {
    fn sweep(&mut self, end_idle: bool) -> Result<Sweep, ResetError> {
        let pods = match self.known.take() {
            None => self.pods()?,
            Some(known) => self.refresh(known)?,
        };
        let mut still_open = Vec::with_capacity(pods.len());
        let mut idle = Vec::new();
        let mut sweep = Sweep::default();
        let mut seen = HashMap::with_capacity(pods.len());
        for socket in pods {
            let (verdict, now) = idle::judge(&socket, self.seen.get(&socket.cookie).copied());
            if let Some(now) = now {
                seen.insert(socket.cookie, now);
            }
            // An unproven one goes to the kernel iterator, which ends it
            // only if the socket shows the answer; netlink cannot check.
            let endable = match (&self.ender, verdict) {
                (Some(_), Verdict::Idle) => Some(Proof::Judged),
                (Some(Ender::Iterator(_)), Verdict::Unproven) => Some(Proof::KernelMustShowAnswer),
                _ => None,
            };
            let Some(proof) = endable.filter(|_| end_idle) else {
                debug!(
                    local = %socket.local,
                    remote = %socket.remote,
                    ?verdict,
                    unread = socket.unread,
                    unacknowledged = socket.unacknowledged,
                    activity = ?socket.activity,
                    "pod connection left for now"
                );
                sweep.busy += 1;
                still_open.push(socket);
                continue;
            };
            idle.push((socket, proof));
        }
        self.end(idle, &mut sweep, &mut still_open)?;
        self.seen = seen;
        self.known = Some(still_open);
        Ok(sweep)
    }
}

/// An IPv4 peer of a dual-stack socket shows as ::ffff:a.b.c.d.
fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}
