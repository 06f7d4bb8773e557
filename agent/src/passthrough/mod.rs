//! How requests no filtered session matched reach the pod's own server with
//! the remote client's address as their source (measured design:
//! docs/filtered-steal-passthrough.md).
//!
//! Inside the pod's namespace the agent opens a socket with
//! `IP_TRANSPARENT` (`IPV6_TRANSPARENT`) and `SO_REUSEADDR`, binds it to the
//! client's exact address and port and connects to the server on loopback
//! (`127.0.0.1:PORT`, `[::1]:PORT`; v4-mapped clients count as IPv4): the
//! server's peer is the client. Its answers (source loopback, destination
//! the client's non-local address) have no route by default; per family one
//! rule per port and one local route per namespace deliver them locally:
//!
//! ```text
//! ip    rule  add pref 0x524d from 127.0.0.0/8 iif lo ipproto tcp sport PORT lookup 0x52454d protocol 0x52
//! ip    route add local 0.0.0.0/0 dev lo table 0x52454d protocol 0x52
//! ip -6 rule  add pref 0x524d from ::1/128     iif lo ipproto tcp sport PORT lookup 0x52454d protocol 0x52
//! ip -6 route add local ::/0      dev lo table 0x52454d protocol 0x52
//! ```
//!
//! What stays in a namespace without the agent (it was killed) is inert: the
//! rule matches only TCP packets from a loopback address with the stolen
//! source port, sent locally (`iif lo`), whose destination no other rule
//! could route (a loopback source may not leave through any other device,
//! so the kernel refuses them without the rule). The pod's own traffic,
//! including its loopback connections, routes as before. The next agent
//! removes it at start ([`clean_leftovers`]).
mod connector;
mod leftovers;
mod maker;
mod registry;
mod rules;
#[cfg(test)]
mod tests;
mod time_wait;

use std::{future::Future, io, net::SocketAddr, os::fd::AsFd, sync::Arc};

use tokio::{net::TcpStream, sync::oneshot};
use tracing::{debug, info, warn};

pub use leftovers::clean_leftovers;
use maker::{Maker, Request};
use registry::NsKey;
use rules::Family;

use crate::{
    netlink::{Netlink, NetlinkError},
    netns::Netns,
};

#[derive(Debug, thiserror::Error)]
pub enum PassthroughError {
    #[error("cannot prepare {target} for pass-through connections: {detail}")]
    Setup { target: String, detail: String },
    #[error("cannot enter {target} to make pass-through sockets there: {source}")]
    Enter { target: String, source: io::Error },
    #[error(
        "cannot install the {family} routing rule for pass-through connections to port {port} in {target}: {source}"
    )]
    Routing {
        target: String,
        family: &'static str,
        port: u16,
        source: NetlinkError,
    },
}

/// Pass-through connections to one port of one namespace; its routing rules
/// stay in place while this value lives. Keep it (an `Arc` held by every
/// pass-through connection) until its last connection closes: once it is
/// dropped, the server's answers on connections still open have no route.
pub struct Passthrough {
    port: u16,
    target: Arc<str>,
    ns: NsKey,
    /// Why IPv6 clients cannot pass (the namespace has no IPv6), if so.
    no_ipv6: Option<Arc<str>>,
    /// Removes the rules on drop; `None` once they are someone else's
    /// business (tests simulating a killed agent).
    netlink: Option<Netlink>,
    /// Dropped after the rules are gone (field order), which stops the thread.
    maker: Maker,
}

impl Passthrough {
    /// Installs the rules and starts the namespace's socket maker. Blocks
    /// for a thread start and a few netlink requests (well under a
    /// millisecond). A namespace without IPv6 gets IPv4 only.
    pub fn open(netns: &Netns, port: u16) -> Result<Self, PassthroughError> {
        let target = netns.to_string();
        let setup = |detail: io::Error| PassthroughError::Setup {
            target: target.clone(),
            detail: detail.to_string(),
        };
        let ns = registry::ns_key(netns.as_fd()).map_err(setup)?;
        let fd = netns.as_fd().try_clone_to_owned().map_err(setup)?;
        let (maker, mut netlink) =
            Maker::start(fd, port).map_err(|source| PassthroughError::Enter {
                target: target.clone(),
                source,
            })?;
        let mut open = registry::lock();
        if let Err(source) = rules::install(&mut netlink, Family::V4, port) {
            // The route may be in; it is this namespace's only if no port
            // of it is open.
            if !open.has(ns) {
                let _ = rules::remove_route(&mut netlink, Family::V4);
            }
            return Err(PassthroughError::Routing {
                target,
                family: Family::V4.name(),
                port,
                source,
            });
        }
        let no_ipv6 = rules::install(&mut netlink, Family::V6, port).err().map(|err| {
            info!(netns = %target, port, error = %err, "no IPv6 pass-through in this namespace: IPv4 only");
            Arc::from(err.to_string())
        });
        open.add(ns, port);
        drop(open);
        debug!(netns = %target, port, ipv6 = no_ipv6.is_none(), "pass-through ready");
        Ok(Self {
            port,
            target: target.into(),
            ns,
            no_ipv6,
            netlink: Some(netlink),
            maker,
        })
    }

    /// A connection to the pod's server on loopback whose source address is
    /// `client`. The socket is made now (queued to the socket maker); the
    /// future waits for it and for the handshake.
    pub fn connect(
        &self,
        client: SocketAddr,
    ) -> impl Future<Output = io::Result<TcpStream>> + Send + 'static {
        let client = connector::canonical(client);
        let server = connector::server(client, self.port);
        let target = self.target.clone();
        let (reply, made) = oneshot::channel();
        let queued = match (&self.no_ipv6, client) {
            (Some(why), SocketAddr::V6(_)) => Err(io::Error::new(
                io::ErrorKind::Unsupported,
                format!(
                    "cannot pass the IPv6 client {client} to the pod's server in {target}: the namespace has no IPv6 ({why})"
                ),
            )),
            _ => self
                .maker
                .send(Request {
                    client: Some(client),
                    server,
                    reply,
                })
                .map_err(|_| connector::stopped(&target)),
        };
        async move {
            queued?;
            connector::finish(made, client, server, &target).await
        }
    }

    /// A plain connection from the pod's own address to `server` (the pod's
    /// address and port): for servers that do not listen on loopback. They
    /// see the pod as the peer, so the router names the client in a
    /// `Forwarded` header instead.
    pub fn connect_plain(
        &self,
        server: SocketAddr,
    ) -> impl Future<Output = io::Result<TcpStream>> + Send + 'static {
        let server = connector::canonical(server);
        let target = self.target.clone();
        let (reply, made) = oneshot::channel();
        let queued = self
            .maker
            .send(Request {
                client: None,
                server,
                reply,
            })
            .map_err(|_| connector::stopped(&target));
        async move {
            queued?;
            connector::finish(made, server, server, &target).await
        }
    }

    /// Gives up the rules without removing them and stops the thread, as a
    /// killed agent would.
    #[cfg(test)]
    fn abandon(mut self) {
        registry::lock().release(self.ns, self.port);
        self.netlink = None;
    }
}

impl Drop for Passthrough {
    /// Removes the port's rules when no other `Passthrough` of the port
    /// lives, and the namespace's routes when no other port is open there.
    /// Failures are logged: what stays is inert, and the next agent removes
    /// it at start.
    fn drop(&mut self) {
        let Some(mut netlink) = self.netlink.take() else {
            return;
        };
        let mut open = registry::lock();
        let released = open.release(self.ns, self.port);
        // Another agent on the node (a DaemonSet update with surge) may
        // still pass traffic through here: what it uses stays.
        let others = if released.rule || released.route {
            leftovers::ports_of_other_agents(self.ns)
        } else {
            Default::default()
        };
        let keep_rule = others.contains(&self.port);
        let keep_route = !others.is_empty();
        if keep_rule || keep_route {
            debug!(netns = %self.target, port = self.port, ?others, "another agent passes traffic through here: its rules stay");
        }
        for family in Family::BOTH {
            let no_family = family == Family::V6 && self.no_ipv6.is_some();
            if released.rule && !no_family && !keep_rule {
                report(
                    rules::remove_rule(&mut netlink, family, self.port),
                    "rule",
                    family,
                    self,
                );
            }
            if released.route && !keep_route {
                report(
                    rules::remove_route(&mut netlink, family),
                    "route",
                    family,
                    self,
                );
            }
        }
        drop(open);
        debug!(netns = %self.target, port = self.port, "pass-through closed");
    }
}

fn report(
    removed: Result<(), NetlinkError>,
    what: &str,
    family: Family,
    passthrough: &Passthrough,
) {
    match removed {
        Ok(()) => {}
        // Already gone (cleaned by hand, or a family the namespace lacks).
        Err(err)
            if matches!(
                err.errno(),
                Some(libc::ENOENT | libc::EAFNOSUPPORT | libc::ESRCH)
            ) => {}
        Err(err) => warn!(
            netns = %passthrough.target,
            port = passthrough.port,
            family = family.name(),
            error = %err,
            "cannot remove the pass-through {what}; it stays, inert, until the next agent starts"
        ),
    }
}
