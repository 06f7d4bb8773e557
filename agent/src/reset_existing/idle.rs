//! When a pod's connection may be ended without cutting anything short.
//!
//! A connection is idle when all of these hold:
//! - the pod's server has read everything the client sent (nothing unread);
//! - everything the server wrote was sent and acknowledged by the client;
//! - the server spoke last: its last data went out no earlier than the
//!   client's last data came in, and the client sent nothing since the
//!   previous look while the server sent nothing (a request it has read but
//!   not answered yet keeps the connection busy however long it takes);
//! - no data either way for [`QUIET`].
//!
//! tcp_info gives times in milliseconds at the kernel's tick (4 ms at
//! HZ=250): a request that arrives in the same tick as the answer before it
//! looks answered until the next look sees its bytes without an answer.
use std::time::Duration;

use crate::sock_diag::{Activity, TcpSocket};

/// No data either way for this long: a client between two requests, not in
/// the middle of a burst. Shorter than the gap of a client that polls every
/// 50 ms, long enough to span a few ticks.
pub const QUIET: Duration = Duration::from_millis(20);

/// What the last look at a connection saw.
#[derive(Clone, Copy, Debug)]
pub struct Seen {
    bytes_received: u64,
    bytes_acked: u64,
}

impl Seen {
    pub fn of(activity: &Activity) -> Self {
        Self {
            bytes_received: activity.bytes_received,
            bytes_acked: activity.bytes_acked,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Idle,
    Busy(Why),
}

/// Why a connection is left for now, for the agent's debug log.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Why {
    Unread,
    Unacknowledged,
    Unanswered,
    Recent,
    /// The kernel gave no tcp_info: nothing can be claimed about it.
    Unknown,
}

pub fn judge(socket: &TcpSocket, before: Option<Seen>) -> Verdict {
    let Some(activity) = socket.activity else {
        return Verdict::Busy(Why::Unknown);
    };
    if socket.unread != 0 {
        return Verdict::Busy(Why::Unread);
    }
    if socket.unacknowledged != 0 || activity.unsent != 0 {
        return Verdict::Busy(Why::Unacknowledged);
    }
    let client_spoke_since = before.is_some_and(|before| {
        activity.bytes_received > before.bytes_received && activity.bytes_acked == before.bytes_acked
    });
    if activity.since_sent_ms > activity.since_received_ms || client_spoke_since {
        return Verdict::Busy(Why::Unanswered);
    }
    let quiet = activity.since_sent_ms.min(activity.since_received_ms);
    if u128::from(quiet) < QUIET.as_millis() {
        return Verdict::Busy(Why::Recent);
    }
    Verdict::Idle
}

#[cfg(test)]
mod tests {
    use super::*;

    fn socket(unread: u32, unacknowledged: u32, activity: Activity) -> TcpSocket {
        TcpSocket {
            local: "10.0.0.2:80".parse().unwrap(),
            remote: "10.0.0.1:40000".parse().unwrap(),
            state: crate::sock_diag::TCP_ESTABLISHED,
            cookie: [1; 8],
            inode: 7,
            unread,
            unacknowledged,
            activity: Some(activity),
        }
    }

    fn activity(since_sent_ms: u32, since_received_ms: u32) -> Activity {
        Activity {
            since_sent_ms,
            since_received_ms,
            unsent: 0,
            bytes_acked: 1000,
            bytes_received: 500,
        }
    }

    #[test]
    fn an_answered_quiet_connection_is_idle() {
        assert_eq!(judge(&socket(0, 0, activity(30, 32)), None), Verdict::Idle);
        // The answer in the same tick as the request.
        assert_eq!(judge(&socket(0, 0, activity(40, 40)), None), Verdict::Idle);
    }

    #[test]
    fn a_request_read_but_not_answered_keeps_it_busy_however_old() {
        assert_eq!(
            judge(&socket(0, 0, activity(3000, 2000)), None),
            Verdict::Busy(Why::Unanswered)
        );
    }

    #[test]
    fn bytes_from_the_client_since_the_last_look_without_an_answer_keep_it_busy() {
        let before = Seen::of(&activity(0, 0));
        let mut now = activity(40, 40);
        now.bytes_received += 80;
        assert_eq!(
            judge(&socket(0, 0, now), Some(before)),
            Verdict::Busy(Why::Unanswered)
        );
        // Answered since: both counters moved.
        now.bytes_acked += 200;
        assert_eq!(judge(&socket(0, 0, now), Some(before)), Verdict::Idle);
    }

    #[test]
    fn unread_unsent_or_unacknowledged_bytes_keep_it_busy() {
        assert_eq!(
            judge(&socket(12, 0, activity(30, 32)), None),
            Verdict::Busy(Why::Unread)
        );
        assert_eq!(
            judge(&socket(0, 300, activity(30, 32)), None),
            Verdict::Busy(Why::Unacknowledged)
        );
        let mut unsent = activity(30, 32);
        unsent.unsent = 5;
        assert_eq!(
            judge(&socket(0, 0, unsent), None),
            Verdict::Busy(Why::Unacknowledged)
        );
    }

    #[test]
    fn recent_traffic_keeps_it_busy_until_quiet() {
        assert_eq!(
            judge(&socket(0, 0, activity(8, 12)), None),
            Verdict::Busy(Why::Recent)
        );
    }

    #[test]
    fn without_tcp_info_nothing_is_ended() {
        let mut unknown = socket(0, 0, activity(30, 32));
        unknown.activity = None;
        assert_eq!(judge(&unknown, None), Verdict::Busy(Why::Unknown));
    }
}
