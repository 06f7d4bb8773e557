//! Calls the client opens before their connections exist. Handing a new
//! connection to one of them saves the round trip of announcing it on the
//! session and waiting for the client's `attach`: over a developer's link to
//! a remote cluster, that round trip is most of what a new connection waits.
use std::{collections::VecDeque, sync::Mutex};

use remocal_proto::v1::NewConnection;
use tokio::sync::oneshot;

use super::Pending;

/// More would only hold HTTP/2 streams and memory: the client replaces each
/// call as soon as it is used, so a handful covers any burst it can see
/// coming within one round trip.
pub const MAX_STANDBY_CALLS: usize = 256;

/// A new connection on its way to a standby call.
pub struct Handoff {
    pub id: u64,
    pub pending: Pending,
    /// Its announcement, now the call's first message.
    pub connection: NewConnection,
}

#[derive(Debug, thiserror::Error)]
pub enum StandbyRefused {
    #[error("the session has ended")]
    Ended,
    #[error("the session already has {MAX_STANDBY_CALLS} standby calls waiting")]
    TooMany,
}

/// A session's waiting calls, oldest first; `None` once the session ended,
/// so that a call arriving after the end is refused rather than kept forever.
pub struct StandbyCalls(Mutex<Option<VecDeque<oneshot::Sender<Handoff>>>>);

impl Default for StandbyCalls {
    fn default() -> Self {
        Self(Mutex::new(Some(VecDeque::new())))
    }
}

impl StandbyCalls {
    /// Registers a call; it receives the connection it will carry.
    pub fn add(&self) -> Result<oneshot::Receiver<Handoff>, StandbyRefused> {
        let mut calls = self.0.lock().expect("standby lock");
        let calls = calls.as_mut().ok_or(StandbyRefused::Ended)?;
        // Calls the client cancelled are still queued until someone looks.
        calls.retain(|call| !call.is_closed());
        if calls.len() >= MAX_STANDBY_CALLS {
            return Err(StandbyRefused::TooMany);
        }
        let (call, handoff) = oneshot::channel();
        calls.push_back(call);
        Ok(handoff)
    }

    /// Gives the connection to the oldest waiting call, or back when none
    /// is left to take it.
    pub fn hand(&self, mut handoff: Handoff) -> Result<(), Handoff> {
        loop {
            let Some(call) = self.next() else {
                return Err(handoff);
            };
            match call.send(handoff) {
                Ok(()) => return Ok(()),
                // That call was cancelled meanwhile: the next one.
                Err(back) => handoff = back,
            }
        }
    }

    /// Ends every waiting call (with no message) and refuses new ones.
    pub fn close(&self) {
        self.0.lock().expect("standby lock").take();
    }

    fn next(&self) -> Option<oneshot::Sender<Handoff>> {
        self.0.lock().expect("standby lock").as_mut()?.pop_front()
    }
}
