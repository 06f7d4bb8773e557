//! When a pod's connection may be ended without cutting a request short.
//!
//! A connection is idle when all of these hold:
//! - the pod's server has read everything the client sent (nothing unread);
//! - everything the server wrote was sent, and reached the client: it was
//!   acknowledged, or, since clients delay their acknowledgements (up to
//!   200 ms, or until their next request), it went out more than twice the
//!   round-trip time ago and nothing of it was lost or retransmitted;
//! - the server answered: there is evidence that its last data went out
//!   after the client's last data came in (below);
//! - no data either way for [`QUIET`].
//!
//! The evidence: tcp_info's times have the kernel's tick (4 ms at HZ=250),
//! so a request and an answer in the same tick cannot be ordered by them.
//! The server answered when any of these shows it:
//! - its last data went out in a later tick than the client's last data
//!   came in;
//! - the client acknowledged something in a later tick than its last data:
//!   its last data acknowledged everything the server had sent before, so
//!   the server sent more after it;
//! - between two looks, the server sent and the client did not.
//!
//! Without evidence a request read in the same tick as the answer before
//! it, and still being worked on, could be taken for an answered one. Such
//! a connection, quiet otherwise, is [`Verdict::Unproven`]: the kernel's
//! socket iterator, which reads the socket itself, ends it only when the
//! client's last segment came after all its data and acknowledged
//! everything the server sent (the server's `snd_wl1 == rcv_nxt` and
//! `snd_una == snd_nxt`), which a request still waiting for its answer
//! never shows. Where only netlink can end sockets it stays busy: a client
//! that keeps using its connection shows evidence within a few requests
//! (looks come every 250 µs), one that fell silent right after an exchange
//! acknowledged at once may show none, and is left alone at the deadline.
//!
//! What TCP cannot show: several requests in flight on one connection
//! (HTTP/1.1 pipelining, HTTP/2 streams), and protocol frames that are not
//! answers (HTTP/2 flow control and pings). When the server sent last while
//! an earlier request is still being worked on, the connection looks idle.
use std::time::Duration;

use crate::sock_diag::{Activity, TcpSocket};

/// No data either way for this long: a client between two requests, not in
/// the middle of a burst. Shorter than the gap of a client that polls every
/// 50 ms, long enough to span a few ticks.
pub const QUIET: Duration = Duration::from_millis(20);

/// What a look at a connection saw, for the next look.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Seen {
    bytes_received: u64,
    bytes_sent: u64,
    /// Whether the server answered the client's last data.
    answered: Answered,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Answered {
    Yes,
    No,
    /// The request and the answer fell in one tick.
    Unknown,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Idle,
    /// Idle if the kernel shows that the server answered (see above).
    Unproven,
    Busy(Why),
}

/// Why a connection is left for now, for the agent's debug log.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Why {
    Unread,
    /// Unsent, or in flight.
    Undelivered,
    /// The client spoke last, or nothing shows yet that the server answered.
    Unanswered,
    Recent,
    /// The kernel gave no tcp_info: nothing can be claimed about it.
    Unknown,
}

/// Judges the connection now, given what the previous look saw of it.
pub fn judge(socket: &TcpSocket, before: Option<Seen>) -> (Verdict, Option<Seen>) {
    let Some(activity) = socket.activity else {
        return (Verdict::Busy(Why::Unknown), None);
    };
    let seen = Seen {
        bytes_received: activity.bytes_received,
        bytes_sent: activity.bytes_sent,
        answered: answered(&activity, before),
    };
    let verdict = if socket.unread != 0 {
        Verdict::Busy(Why::Unread)
    } else if activity.unsent != 0 || (socket.unacknowledged != 0 && !delivered(&activity)) {
        Verdict::Busy(Why::Undelivered)
    } else if seen.answered == Answered::No {
        Verdict::Busy(Why::Unanswered)
    } else if u128::from(activity.since_sent_ms.min(activity.since_received_ms)) < QUIET.as_millis()
    {
        Verdict::Busy(Why::Recent)
    } else if seen.answered == Answered::Yes {
        Verdict::Idle
    } else if socket.unacknowledged == 0 {
        Verdict::Unproven
    } else {
        // The kernel's proof needs everything acknowledged.
        Verdict::Busy(Why::Unanswered)
    };
    (verdict, Some(seen))
}

/// Unacknowledged data that surely arrived: sent long enough ago, and
/// nothing lost or retransmitted on the way.
fn delivered(activity: &Activity) -> bool {
    activity.lost == 0
        && activity.retransmitting == 0
        && u64::from(activity.since_sent_ms) * 1000 >= 2 * u64::from(activity.rtt_us)
        && u128::from(activity.since_sent_ms) >= QUIET.as_millis()
}

fn answered(activity: &Activity, before: Option<Seen>) -> Answered {
    let by_ticks = if activity.since_sent_ms < activity.since_received_ms
        || activity.since_acknowledged_ms < activity.since_received_ms
    {
        Answered::Yes
    } else if activity.since_sent_ms == activity.since_received_ms {
        Answered::Unknown
    } else {
        Answered::No
    };
    let Some(before) = before else {
        return by_ticks;
    };
    let client_spoke = activity.bytes_received != before.bytes_received;
    let server_spoke = activity.bytes_sent != before.bytes_sent;
    match (client_spoke, server_spoke) {
        (false, false) => before.answered,
        (false, true) => Answered::Yes,
        (true, false) => Answered::No,
        (true, true) => by_ticks,
    }
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
            since_acknowledged_ms: since_received_ms,
            unsent: 0,
            lost: 0,
            retransmitting: 0,
            rtt_us: 100,
            bytes_received: 500,
            bytes_sent: 1000,
        }
    }

    fn verdict(socket: &TcpSocket, before: Option<Seen>) -> Verdict {
        judge(socket, before).0
    }

    #[test]
    fn an_answer_in_a_later_tick_than_the_request_makes_a_quiet_connection_idle() {
        assert_eq!(
            verdict(&socket(0, 0, activity(28, 32)), None),
            Verdict::Idle
        );
    }

    #[test]
    fn a_request_and_an_answer_in_one_tick_need_more_evidence() {
        let (first, seen) = judge(&socket(0, 0, activity(40, 40)), None);
        assert_eq!(first, Verdict::Unproven);
        // Nothing moved since: still no evidence, however long it stays so
        // (a request read in the answer's tick may still be worked on).
        let (later, seen) = judge(&socket(0, 0, activity(3000, 3000)), seen);
        assert_eq!(later, Verdict::Unproven);
        // Not everything acknowledged: the kernel could not prove it.
        assert_eq!(
            judge(&socket(0, 300, activity(3000, 3000)), seen).0,
            Verdict::Busy(Why::Unanswered)
        );
        // The client asked again and a look caught it unanswered...
        let mut asked = activity(45, 1);
        asked.bytes_received += 80;
        let (asking, seen) = judge(&socket(0, 0, asked), seen);
        assert_eq!(asking, Verdict::Busy(Why::Unanswered));
        // ...and the next look saw the server's answer alone: evidence.
        let mut answer = asked;
        answer.bytes_sent += 200;
        (answer.since_sent_ms, answer.since_received_ms) = (1, 2);
        assert_eq!(
            judge(&socket(0, 0, answer), seen).0,
            Verdict::Busy(Why::Recent)
        );
        (answer.since_sent_ms, answer.since_received_ms) = (24, 25);
        let (quiet, seen) = judge(&socket(0, 0, answer), seen);
        assert_eq!(quiet, Verdict::Idle);
        // The evidence holds while nothing moves.
        assert_eq!(judge(&socket(0, 0, answer), seen).0, Verdict::Idle);
    }

    #[test]
    fn an_acknowledgement_after_the_clients_last_data_shows_an_answer() {
        let mut acked = activity(40, 40);
        acked.since_acknowledged_ms = 8;
        assert_eq!(verdict(&socket(0, 0, acked), None), Verdict::Idle);
    }

    #[test]
    fn a_request_read_but_not_answered_keeps_it_busy_however_old() {
        assert_eq!(
            verdict(&socket(0, 0, activity(3000, 2000)), None),
            Verdict::Busy(Why::Unanswered)
        );
    }

    #[test]
    fn bytes_from_the_client_since_the_last_look_without_an_answer_keep_it_busy() {
        let (_, before) = judge(&socket(0, 0, activity(28, 32)), None);
        let mut now = activity(60, 40);
        now.bytes_received += 80;
        assert_eq!(
            verdict(&socket(0, 0, now), before),
            Verdict::Busy(Why::Unanswered)
        );
        // Both spoke since: the ticks decide.
        now.bytes_sent += 200;
        assert_eq!(
            verdict(&socket(0, 0, now), before),
            Verdict::Busy(Why::Unanswered)
        );
        (now.since_sent_ms, now.since_received_ms) = (24, 28);
        assert_eq!(verdict(&socket(0, 0, now), before), Verdict::Idle);
    }

    #[test]
    fn unread_unsent_or_undelivered_bytes_keep_it_busy() {
        assert_eq!(
            verdict(&socket(12, 0, activity(28, 32)), None),
            Verdict::Busy(Why::Unread)
        );
        let mut unsent = activity(28, 32);
        unsent.unsent = 5;
        assert_eq!(
            verdict(&socket(0, 5, unsent), None),
            Verdict::Busy(Why::Undelivered)
        );
        let mut lost = activity(28, 32);
        lost.lost = 1;
        assert_eq!(
            verdict(&socket(0, 300, lost), None),
            Verdict::Busy(Why::Undelivered)
        );
        let mut retransmitted = activity(28, 32);
        retransmitted.retransmitting = 1;
        assert_eq!(
            verdict(&socket(0, 300, retransmitted), None),
            Verdict::Busy(Why::Undelivered)
        );
        // Sent less than two round trips ago: maybe still on its way.
        let mut far = activity(28, 32);
        far.rtt_us = 20_000;
        assert_eq!(
            verdict(&socket(0, 300, far), None),
            Verdict::Busy(Why::Undelivered)
        );
    }

    #[test]
    fn data_the_client_has_not_acknowledged_yet_but_surely_got_does_not() {
        // A delayed acknowledgement: sent 28 ms ago over a 100 us path.
        assert_eq!(
            verdict(&socket(0, 300, activity(28, 32)), None),
            Verdict::Idle
        );
    }

    #[test]
    fn recent_traffic_keeps_it_busy_until_quiet() {
        assert_eq!(
            verdict(&socket(0, 0, activity(8, 12)), None),
            Verdict::Busy(Why::Recent)
        );
    }

    #[test]
    fn without_tcp_info_nothing_is_ended() {
        let mut unknown = socket(0, 0, activity(28, 32));
        unknown.activity = None;
        assert_eq!(verdict(&unknown, None), Verdict::Busy(Why::Unknown));
    }
}
