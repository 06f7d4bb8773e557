//! How many sessions a user, and all users together, may hold.
use std::{collections::HashMap, sync::Arc};

use super::{OpenError, Sessions};
use crate::auth::Identity;

/// Sessions one user may hold on this agent at once, and all users together:
/// each holds an event queue, a listener or a tap, and kernel state, so a
/// caller looping on `open` hits this instead of the node's memory.
pub const MAX_SESSIONS_PER_USER: usize = 16;
pub const MAX_SESSIONS: usize = 256;

/// Sessions held or starting, all together and per user (name, uid).
#[derive(Default)]
pub(super) struct Slots {
    total: usize,
    per_user: HashMap<(String, String), usize>,
}

/// One place in [`Slots`], given back when the session is gone (or never
/// started).
pub(super) struct Slot {
    sessions: Arc<Sessions>,
    user: (String, String),
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut slots = self.sessions.slots.lock().expect("slots lock");
        slots.total -= 1;
        if let Some(held) = slots.per_user.get_mut(&self.user) {
            *held -= 1;
            if *held == 0 {
                slots.per_user.remove(&self.user);
            }
        }
    }
}

impl Sessions {
    /// A place among the sessions `identity`, and all users together, may
    /// hold. Taken before anything slow (the pod lookup, the redirection),
    /// so that concurrent opens cannot all pass the check.
    pub(super) fn take_slot(self: &Arc<Self>, identity: &Identity) -> Result<Slot, OpenError> {
        let user = (identity.user.clone(), identity.uid.clone());
        let mut slots = self.slots.lock().expect("slots lock");
        let held = slots.per_user.get(&user).copied().unwrap_or(0);
        let (held, limit, scope) = if slots.total >= MAX_SESSIONS {
            (slots.total, MAX_SESSIONS, " for all users together")
        } else if held >= MAX_SESSIONS_PER_USER {
            (held, MAX_SESSIONS_PER_USER, " per user")
        } else {
            slots.total += 1;
            *slots.per_user.entry(user.clone()).or_default() += 1;
            return Ok(Slot {
                sessions: self.clone(),
                user,
            });
        };
        Err(OpenError::TooManySessions {
            user: identity.to_string(),
            held,
            limit,
            scope,
        })
    }
}
