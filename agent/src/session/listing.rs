//! `ListSessions`: who intercepts what on this node, shown to each caller
//! only as far as the cluster lets them see the targets. A session names its
//! owner, where they run and their filter (a header value may be personal):
//! whoever may `get` a pod may see who intercepts it and how, as the pod's
//! events tell whoever may read those.
use std::{
    collections::{HashMap, HashSet},
    sync::{Arc, Mutex},
    time::{Duration, UNIX_EPOCH},
};

use futures::{StreamExt as _, stream};
use remocal_proto::v1::{PodRef, SessionInfo, SessionList};
use tokio::sync::Semaphore;

use super::Sessions;
use crate::{
    auth::{Access, AccessError, Identity},
    live_session::LiveSession,
};

/// Listings served at once per agent, one per caller; later ones wait for a
/// turn. With at most [`REVIEWS_AT_ONCE`] reviews each, at most 4 × 8
/// SubjectAccessReviews are in flight to the API server, one per distinct
/// target with a session (at most 256, the agent's session limit), and a
/// caller listing in a loop asks again about a target every 10 s at most
/// (`Auth::allows_seeing` keeps verdicts that long).
const LISTINGS_AT_ONCE: usize = 4;
static LISTINGS: Semaphore = Semaphore::const_new(LISTINGS_AT_ONCE);
const REVIEWS_AT_ONCE: usize = 8;
/// How long a listing waits for its turn before it is refused as busy.
const TURN_TIMEOUT: Duration = Duration::from_secs(10);

/// Callers with a listing in progress: one each, so that no one caller
/// takes every turn.
static LISTING: Mutex<Vec<(String, String)>> = Mutex::new(Vec::new());

#[derive(Debug, thiserror::Error)]
pub enum ListError {
    #[error("a listing of yours is in progress on this agent: wait for it, then ask again")]
    AlreadyListing,
    #[error(
        "this agent is serving {LISTINGS_AT_ONCE} session listings already and none finished within {TURN_TIMEOUT:?}; try again shortly"
    )]
    Busy,
    /// The API server could not say who may see what: nothing is shown
    /// rather than too much.
    #[error(transparent)]
    Access(AccessError),
}

impl Sessions {
    /// The sessions `caller` may see, on pods of `namespace` (all for "")
    /// and on namespaces or processes of the node, oldest first. How many
    /// others there are is said only for all namespaces: per namespace it
    /// would tell what `Info`'s total does not.
    pub async fn list(&self, caller: &Identity, namespace: &str) -> Result<SessionList, ListError> {
        let _mine = OwnListing::start(caller)?;
        let mut asked: Vec<Arc<LiveSession>> = self
            .live
            .lock()
            .expect("live lock")
            .values()
            .filter(|live| {
                namespace.is_empty()
                    || live
                        .audit
                        .pod
                        .as_ref()
                        .is_none_or(|pod| pod.namespace == namespace)
            })
            .cloned()
            .collect();
        asked.sort_by_key(|live| live.audit.started);
        let _turn = tokio::time::timeout(TURN_TIMEOUT, LISTINGS.acquire())
            .await
            .map_err(|_| ListError::Busy)?
            .expect("the semaphore is never closed");
        let seen = self.reviews(caller, &asked).await?;
        let (shown, hidden): (Vec<_>, Vec<_>) = asked.into_iter().partition(|live| {
            live.owner.same_as(caller)
                || self
                    .needed_to_see(live)
                    .is_some_and(|access| seen.contains(&access))
        });
        let not_shown = if namespace.is_empty() {
            hidden.len()
        } else {
            0
        };
        Ok(SessionList {
            node_name: self.pods.node().unwrap_or_default().to_string(),
            sessions: shown.iter().map(|live| info(live)).collect(),
            not_shown: u32::try_from(not_shown).unwrap_or(u32::MAX),
        })
    }

    /// What RBAC must allow for someone else's session to be shown: `get`
    /// on its pod, or for a namespace or process of the node what targeting
    /// it takes (a pod named by UID counts as such). None: shown to nobody
    /// else (an agent outside a cluster has no node to check against).
    fn needed_to_see(&self, live: &LiveSession) -> Option<Access> {
        match &live.audit.pod {
            Some(pod) => Some(Access::ReadPod {
                namespace: pod.namespace.clone(),
                name: pod.name.clone(),
            }),
            None => self.pods.node().map(|node| Access::Node {
                node: node.to_string(),
            }),
        }
    }

    /// The accesses among those `sessions` need that `caller` has: one
    /// review each, however many sessions share a pod.
    async fn reviews(
        &self,
        caller: &Identity,
        sessions: &[Arc<LiveSession>],
    ) -> Result<HashSet<Access>, ListError> {
        let needed: HashSet<Access> = sessions
            .iter()
            .filter(|live| !live.owner.same_as(caller))
            .filter_map(|live| self.needed_to_see(live))
            .collect();
        let verdicts: HashMap<Access, Result<bool, AccessError>> = stream::iter(needed)
            .map(|access| async move {
                let verdict = self.auth.allows_seeing(caller, &access).await;
                (access, verdict)
            })
            .buffer_unordered(REVIEWS_AT_ONCE)
            .collect()
            .await;
        let mut allowed = HashSet::new();
        for (access, verdict) in verdicts {
            if verdict.map_err(ListError::Access)? {
                allowed.insert(access);
            }
        }
        Ok(allowed)
    }
}

/// A caller's place in [`LISTING`], given up on drop.
struct OwnListing((String, String));

impl OwnListing {
    fn start(caller: &Identity) -> Result<Self, ListError> {
        let who = (caller.user.clone(), caller.uid.clone());
        let mut listing = LISTING.lock().expect("listing lock");
        if listing.contains(&who) {
            return Err(ListError::AlreadyListing);
        }
        listing.push(who.clone());
        Ok(Self(who))
    }
}

impl Drop for OwnListing {
    fn drop(&mut self) {
        LISTING
            .lock()
            .expect("listing lock")
            .retain(|who| *who != self.0);
    }
}

fn info(live: &LiveSession) -> SessionInfo {
    let audit = &live.audit;
    SessionInfo {
        target: audit.target.clone(),
        pod: audit.pod.as_ref().map(|pod| PodRef {
            namespace: pod.namespace.clone(),
            name: pod.name.clone(),
        }),
        port: audit.port.into(),
        mode: audit.mode.into(),
        filter: audit.filter.as_ref().map(|filter| filter.spec().clone()),
        user: live.owner.user.clone(),
        client: audit.client.clone(),
        started_unix_ms: audit.started.duration_since(UNIX_EPOCH).map_or(0, |since| {
            u64::try_from(since.as_millis()).unwrap_or(u64::MAX)
        }),
        connections: live.connections_handed(),
    }
}
