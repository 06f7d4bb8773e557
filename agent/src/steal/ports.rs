//! Who uses which port of which target for stealing: one whole-port steal,
//! or any number of filtered steals with different filters, never both.
//! Mirrors are not here: they take nothing from anyone.
use std::{
    collections::HashMap,
    sync::{Arc, Mutex, Weak, atomic::Ordering},
    time::Instant,
};

use super::shared_port::{Member, RoutingSlots, SharedPort};
use crate::{
    http_route::Filter,
    live_session::LiveSession,
    metrics::Metrics,
    netns::{Netns, NsId},
    passthrough::{Passthrough, PassthroughError},
    redirect::Redirector,
};

type Key = (NsId, u16);

#[derive(Debug, thiserror::Error)]
pub enum ClaimError {
    #[error("held by {holder}")]
    Held { holder: String },
    #[error("{holder} already steals the requests matching {filter}")]
    SameFilter { holder: String, filter: String },
}

pub struct Ports {
    uses: Mutex<HashMap<Key, Use>>,
    /// Pass-through setups by port, shared by a port's filtered steals and
    /// by the connections of an earlier round of them that still drain.
    passthroughs: Mutex<HashMap<Key, Weak<Passthrough>>>,
    routing_slots: Arc<RoutingSlots>,
    /// What a shared port needs to set itself up.
    redirector: Arc<dyn Redirector>,
    metrics: Arc<Metrics>,
}

enum Use {
    Whole { holder: String, since: Instant },
    Filtered(Arc<SharedPort>),
}

impl Use {
    fn holder(&self) -> String {
        match self {
            Use::Whole { holder, since } => {
                format!("{holder} (whole port, for {}s)", since.elapsed().as_secs())
            }
            Use::Filtered(shared) => shared.holders(),
        }
    }
}

/// A whole-port steal's hold on its port, released when dropped.
pub struct WholeClaim {
    ports: Arc<Ports>,
    key: Key,
}

impl Drop for WholeClaim {
    fn drop(&mut self) {
        self.ports
            .uses
            .lock()
            .expect("ports lock")
            .remove(&self.key);
    }
}

/// A filtered steal's place on a shared port; leaving is dropping it. The
/// last one to leave turns the redirection off at once, before the port is
/// free for anyone else, and lets the port's connections drain.
pub struct Membership {
    ports: Arc<Ports>,
    pub shared: Arc<SharedPort>,
    key: u64,
    /// Who shared the port already, and so takes the requests that match
    /// both filters.
    pub earlier: Option<String>,
}

impl Membership {
    /// Requests matching its filter go to the session from now on (its
    /// client has been told `ready`).
    pub fn route(&self) {
        self.shared.route_to(self.key);
    }
}

impl Drop for Membership {
    fn drop(&mut self) {
        let mut uses = self.ports.uses.lock().expect("ports lock");
        // While its setup runs, the port stays taken: the setup frees it.
        if self.shared.leave(self.key) && self.shared.settled.load(Ordering::Relaxed) {
            remove_if_same(&mut uses, &self.shared);
        }
    }
}

fn remove_if_same(uses: &mut HashMap<Key, Use>, shared: &Arc<SharedPort>) {
    let key = shared.key();
    if matches!(uses.get(&key), Some(Use::Filtered(held)) if Arc::ptr_eq(held, shared)) {
        uses.remove(&key);
    }
}

impl Ports {
    pub fn new(redirector: Arc<dyn Redirector>, metrics: Arc<Metrics>) -> Self {
        Self {
            uses: Mutex::default(),
            passthroughs: Mutex::default(),
            routing_slots: Arc::default(),
            redirector,
            metrics,
        }
    }

    pub fn claim_whole(
        self: &Arc<Self>,
        netns: &Netns,
        port: u16,
        holder: String,
    ) -> Result<WholeClaim, ClaimError> {
        let key = (netns.id(), port);
        let mut uses = self.uses.lock().expect("ports lock");
        if let Some(held) = uses.get(&key) {
            return Err(ClaimError::Held {
                holder: held.holder(),
            });
        }
        uses.insert(
            key,
            Use::Whole {
                holder,
                since: Instant::now(),
            },
        );
        Ok(WholeClaim {
            ports: self.clone(),
            key,
        })
    }

    /// Marks the port's setup as over; frees the port if everyone left
    /// while it ran (their leaving could not).
    pub(super) fn settle(&self, shared: &Arc<SharedPort>) {
        let mut uses = self.uses.lock().expect("ports lock");
        shared.settled.store(true, Ordering::Relaxed);
        if shared.is_empty() {
            remove_if_same(&mut uses, shared);
        }
    }

    /// Adds a filtered steal to the port, setting the port up for sharing
    /// if it is the first. The caller starts the port (`shared.start`).
    pub fn join_filtered(
        self: &Arc<Self>,
        netns: &Netns,
        port: u16,
        holder: String,
        filter: Arc<Filter>,
        live: Arc<LiveSession>,
    ) -> Result<Result<Membership, ClaimError>, std::io::Error> {
        let key = (netns.id(), port);
        let mut uses = self.uses.lock().expect("ports lock");
        let shared = match uses.get(&key) {
            Some(Use::Whole { .. }) => {
                return Ok(Err(ClaimError::Held {
                    holder: uses[&key].holder(),
                }));
            }
            Some(Use::Filtered(shared)) => shared.clone(),
            None => {
                let shared = SharedPort::new(
                    key,
                    netns.try_clone()?,
                    self.metrics.clone(),
                    self.redirector.clone(),
                    self.clone(),
                );
                uses.insert(key, Use::Filtered(shared.clone()));
                shared
            }
        };
        if let Some(holder) = shared.holder_of_same(&filter) {
            return Ok(Err(ClaimError::SameFilter {
                holder,
                filter: filter.to_string(),
            }));
        }
        let earlier = (!shared.is_empty()).then(|| shared.holders());
        let member = shared.join(Member::new(filter, live, holder));
        Ok(Ok(Membership {
            ports: self.clone(),
            shared,
            key: member,
            earlier,
        }))
    }

    pub(super) fn routing_slots(&self) -> Arc<RoutingSlots> {
        self.routing_slots.clone()
    }

    /// Ports whose pass-through is still in use by connections.
    pub fn draining(&self) -> usize {
        self.passthroughs
            .lock()
            .expect("passthroughs lock")
            .values()
            .filter(|weak| weak.strong_count() > 0)
            .count()
    }

    /// The port's pass-through, shared with connections still draining from
    /// an earlier round of filtered steals on it.
    pub fn passthrough(
        &self,
        netns: &Netns,
        port: u16,
    ) -> Result<Arc<Passthrough>, PassthroughError> {
        let key = (netns.id(), port);
        let mut passthroughs = self.passthroughs.lock().expect("passthroughs lock");
        passthroughs.retain(|_, weak| weak.strong_count() > 0);
        if let Some(existing) = passthroughs.get(&key).and_then(Weak::upgrade) {
            return Ok(existing);
        }
        let opened = Arc::new(Passthrough::open(netns, port)?);
        passthroughs.insert(key, Arc::downgrade(&opened));
        Ok(opened)
    }
}
