//! The mirror loop of one session: captures in, one ordered byte stream per
//! remote connection out. Connections already open when the session starts
//! are skipped (their beginning is gone; a copy starting mid-request would
//! only confuse the local process): a connection is mirrored from its SYN,
//! and its copy starts with its first data (see [`super::half_open`]).
use std::{
    collections::{HashMap, VecDeque},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use bytes::{Bytes, BytesMut};
use remocal_proto::v1::{
    ConnectionDownstream, Eof, SessionEvent, SessionRequest, Warning, connection_downstream,
    session_event,
};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tonic::Streaming;

use super::{
    Capture, Flow, Tap,
    budget::{self, Budget, Holding},
    half_open::{HalfOpen, Opening},
    reassembly::{AHEAD, PIECE_OVERHEAD, Reassembler, ReassemblyError},
};
use crate::{
    live_session::{CopyCut, CutKind, LinkBroken, LiveSession, Pending},
    proxy::Outcome,
};

/// Messages queued toward one client stream; one slot is always kept free
/// for the final status, so an ending is never lost to a full queue.
const DOWNSTREAM_QUEUE: usize = 64;
/// Largest data message: chunks of captured payload are merged up to this.
const MESSAGE: usize = 64 * 1024;
/// How often held data is retried, losses checked and idle flows expired.
const TICK: Duration = Duration::from_millis(50);
/// A connection without any capture for this long is closed.
const IDLE: Duration = Duration::from_secs(300);
/// After a capture was lost, a connection quiet for this long may have lost
/// its last bytes or its FIN: it is cut rather than left hanging.
const QUIET_AFTER_LOSS: Duration = Duration::from_secs(2);
/// Copies one session makes at once. Each holds a reassembler, a queue
/// toward the client, an HTTP/2 stream and a local connection on the
/// developer's machine: in the agent 5 to 7 KiB before any data (4096
/// spoofed copies took it from 58 to 76-83 MiB), its data bounded by
/// --mirror-flow-limit and, with all other copies, by the agent's
/// [`budget`]. A spoofed SYN followed by a data segment starts one,
/// since the mirror cannot tell whether the handshake completed. Beyond it,
/// new connections are not copied until some copies end.
const MAX_COPIES: usize = 4096;
/// A copy announced on the session whose data call never comes is dropped,
/// as a steal session resets its unclaimed connections.
const UNCLAIMED: Duration = Duration::from_secs(10);

type Downstream = mpsc::Sender<Result<ConnectionDownstream, CopyCut>>;

struct MirroredFlow {
    id: u64,
    reassembler: Reassembler,
    downstream: Downstream,
    /// In-order bytes waiting for room in the client's queue.
    outbox: VecDeque<Bytes>,
    outbox_bytes: usize,
    /// What it holds, in the agent's budget: the reassembler and outbox as
    /// of the last [`MirroredFlow::sync`] (`synced`), and the messages in
    /// its queue until they are sent or dropped (they count themselves).
    holding: Arc<Holding>,
    synced: usize,
    /// Announced on the session, so possibly still waiting for its call in
    /// the session's pending connections (and in [`Mirror::unclaimed`]).
    announced: bool,
    last_capture: Instant,
    /// A capture was lost since this flow started: any hole is now final.
    suspect: bool,
}

impl MirroredFlow {
    /// What --mirror-flow-limit bounds: everything held for the client, in
    /// reassembly, outbox and queue, with [`PIECE_OVERHEAD`] a piece.
    fn footprint(&self) -> usize {
        self.holding.bytes()
    }

    /// Counts the reassembler and outbox as they are now.
    fn sync(&mut self) {
        let now =
            self.reassembler.footprint() + self.outbox_bytes + self.outbox.len() * PIECE_OVERHEAD;
        self.holding.resize(self.synced, now);
        self.synced = now;
    }
}

impl Drop for MirroredFlow {
    fn drop(&mut self) {
        self.holding.resize(self.synced, 0);
    }
}

/// Why a mirrored connection stops before its natural end.
/// (`TooFarAhead`: data further than [`AHEAD`] beyond the first missing
/// byte; `Budget`: the agent's budget was reached and this copy held the most.)
enum Cut {
    Lost,
    TooSlow { held: usize },
    TooFarAhead { ahead: u64 },
    Budget { held: usize, limit: usize },
    Reset { by_pod: bool },
    SessionEnded,
    Idle,
}

impl Cut {
    fn cut(&self) -> CopyCut {
        let (kind, message) = match self {
            Cut::Lost => (CutKind::DataLoss,
                "part of this connection was not captured (the capture buffer overran); the copy ends here rather than skip bytes".to_string(),
            ),
            Cut::TooSlow { held } => (CutKind::ResourceExhausted, format!(
                "the copy fell behind the original: the agent held {held} bytes for it, counting {PIECE_OVERHEAD} bytes a piece (the local process, or the link from the agent to remocal, is slower than the mirrored traffic, or the traffic arrives out of order in many small pieces); this mirrored connection was cut off to bound the agent's memory (the agent's --mirror-flow-limit sets how much a copy may hold)"
            )),
            Cut::TooFarAhead { ahead } => (CutKind::DataLoss, format!(
                "data arrived {ahead} bytes past the first byte still missing, further than the {AHEAD} bytes the agent holds ahead of a gap (a TCP receive window that large is rare; a forged segment looks like this); the copy ends here rather than skip bytes"
            )),
            Cut::Budget { held, limit } => (CutKind::ResourceExhausted, format!(
                "the agent's mirror memory budget ({limit} bytes, shared by every mirror session on its node) was reached, and this copy held the most ({held} bytes, counting {PIECE_OVERHEAD} bytes a piece): it was cut off to bound the agent's memory"
            )),
            Cut::Reset { by_pod: false } => (CutKind::Aborted, "the remote client reset the connection".to_string()),
            Cut::Reset { by_pod: true } => (CutKind::Aborted, "the pod reset the connection".to_string()),
            Cut::SessionEnded => (CutKind::Unavailable, "the session ended".to_string()),
            Cut::Idle => (CutKind::DeadlineExceeded, "the connection was idle too long".to_string()),
        };
        CopyCut { kind, message }
    }

    fn reason(&self) -> &'static str {
        match self {
            Cut::Lost => "data lost in capture",
            Cut::TooSlow { .. } => "copy too slow",
            Cut::TooFarAhead { .. } => "data too far ahead",
            Cut::Budget { .. } => "mirror memory budget reached",
            Cut::Reset { by_pod: false } => "remote reset",
            Cut::Reset { by_pod: true } => "pod reset",
            Cut::SessionEnded => "session ended",
            Cut::Idle => "idle",
        }
    }
}

/// Runs until the session ends; returns why.
pub async fn run(
    live: &Arc<LiveSession>,
    mut tap: Tap,
    mut requests: Streaming<SessionRequest>,
    shutdown: CancellationToken,
    flow_limit: usize,
) -> &'static str {
    let Some(events) = live.sender() else {
        return "the client stopped listening";
    };
    let mut mirror = Mirror {
        live: live.clone(),
        budget: budget::agent(),
        chosen: Arc::new(AtomicBool::new(false)),
        flows: HashMap::new(),
        half_open: HalfOpen::new(live.metrics().mirror_half_open.clone()),
        unclaimed: VecDeque::new(),
        flow_limit,
        lost_seen: tap.lost.load(Ordering::Relaxed),
        losses: 0,
        warned_full: false,
    };
    let mut tick = tokio::time::interval(TICK);
    let reason = loop {
        tokio::select! {
            capture = tap.next() => match capture {
                Some(capture) => mirror.capture(capture, &events),
                None => break "the capture stopped",
            },
            _ = tick.tick() => mirror.maintain(tap.lost.load(Ordering::Relaxed)),
            request = requests.message() => if let Some(reason) = live.handle(request.map_err(|_| LinkBroken)) {
                break reason;
            },
            () = events.closed() => break "the client stopped listening",
            () = shutdown.cancelled() => break "the agent is shutting down",
        }
    };
    drop(tap.active);
    for flow in mirror.flows.keys().copied().collect::<Vec<_>>() {
        mirror.cut(&flow, Cut::SessionEnded);
    }
    // Nobody will act on them being chosen any more.
    for (.., holding) in &mirror.unclaimed {
        holding.settle();
    }
    reason
}

struct Mirror {
    live: Arc<LiveSession>,
    budget: Arc<Budget>,
    /// Set when the budget chose one of this session's holdings.
    chosen: Arc<AtomicBool>,
    flows: HashMap<Flow, MirroredFlow>,
    half_open: HalfOpen,
    /// Copies announced on the session rather than handed to a standby
    /// call, oldest first, until their call comes or [`UNCLAIMED`] passes.
    /// Their holdings stay here, for the budget to free a copy that ended
    /// before its call came (its queue waits in the session's pending
    /// connections).
    unclaimed: VecDeque<(u64, Flow, Instant, Arc<Holding>)>,
    flow_limit: usize,
    lost_seen: u64,
    /// Times captures were lost during this session.
    losses: u64,
    /// The developer was told that [`MAX_COPIES`] was reached.
    warned_full: bool,
}

impl Mirror {
    fn capture(&mut self, capture: Capture, events: &mpsc::Sender<SessionEvent>) {
        let flow = capture.flow();
        match capture {
            Capture::Syn { isn, .. } => {
                if self.flows.contains_key(&flow) {
                    return; // a retransmitted SYN
                }
                let opening = Opening {
                    isn,
                    losses: self.losses,
                };
                self.half_open.syn(flow, opening, Instant::now());
            }
            Capture::Data { seq, payload, .. } => {
                if !self.copying(flow, None, events) {
                    return;
                }
                let Some(state) = self.flows.get_mut(&flow) else {
                    return;
                };
                state.last_capture = Instant::now();
                match state.reassembler.segment(seq, payload) {
                    Ok(()) => self.pump(&flow),
                    Err(ReassemblyError::Overflow { footprint, .. }) => {
                        let held = state.footprint().max(footprint);
                        self.cut(&flow, Cut::TooSlow { held });
                    }
                    Err(ReassemblyError::TooFarAhead { ahead }) => {
                        self.cut(&flow, Cut::TooFarAhead { ahead });
                    }
                }
                self.keep_within_budget();
            }
            Capture::Fin { seq, .. } => {
                if !self.copying(flow, Some(seq), events) {
                    return;
                }
                if let Some(state) = self.flows.get_mut(&flow) {
                    state.last_capture = Instant::now();
                    state.reassembler.fin(seq);
                    self.pump(&flow);
                }
            }
            Capture::Rst { by_pod, .. } => {
                self.half_open.take(&flow);
                if self.flows.contains_key(&flow) {
                    self.cut(&flow, Cut::Reset { by_pod });
                }
            }
        }
    }

    /// Whether `flow` is copied, starting its copy if this capture (data,
    /// or a FIN at `fin`) shows that its connection sent data.
    fn copying(
        &mut self,
        flow: Flow,
        fin: Option<u32>,
        events: &mpsc::Sender<SessionEvent>,
    ) -> bool {
        if self.flows.contains_key(&flow) {
            return true;
        }
        let Some(opening) = self.half_open.take(&flow) else {
            return false; // not seen from its SYN, or forgotten since
        };
        if fin == Some(opening.isn.wrapping_add(1)) {
            return false; // closed without sending anything: nothing to copy
        }
        if self.flows.len() >= MAX_COPIES {
            self.live.metrics().mirror_not_copied_total.inc();
            if !self.warned_full {
                self.warned_full = true;
                let message = format!(
                    "{MAX_COPIES} connections are being copied, the most one mirror session copies at once: new connections are not copied until some of these end"
                );
                // Never awaited: a client that stopped reading its events
                // must not stop the session from seeing its close.
                let event = session_event::Kind::Warning(Warning { message });
                let _ = events.try_send(SessionEvent { kind: Some(event) });
            }
            return false;
        }
        let (downstream, receiver) = mpsc::channel(DOWNSTREAM_QUEUE);
        let (id, announcement) = self.live.hand_over(
            Pending::Mirrored(receiver),
            flow.source.to_string(),
            flow.destination.to_string(),
        );
        let now = Instant::now();
        let holding = self.budget.holding(self.chosen.clone());
        self.flows.insert(
            flow,
            MirroredFlow {
                id,
                reassembler: Reassembler::new(opening.isn, self.flow_limit),
                downstream,
                outbox: VecDeque::new(),
                outbox_bytes: 0,
                holding: holding.clone(),
                synced: 0,
                announced: false,
                last_capture: now,
                suspect: opening.losses != self.losses,
            },
        );
        if let Some(connection) = announcement {
            // Never awaited, so that a client that stopped reading its
            // events cannot hold the session open (its close, the agent's
            // shutdown and the sweep are handled by the same loop). A copy
            // whose announcement finds the queue full could not be picked
            // up in time anyway: it ends at once.
            let event = session_event::Kind::Connection(connection);
            if events.try_send(SessionEvent { kind: Some(event) }).is_err() {
                self.live.take_pending(id);
                self.close(
                    &flow,
                    "announced while the session's events were not read".into(),
                );
                return false;
            }
            if let Some(state) = self.flows.get_mut(&flow) {
                state.announced = true;
            }
            self.unclaimed.push_back((id, flow, now, holding));
        }
        true
    }

    /// Periodic work: retry held data, act on losses, expire idle flows,
    /// forget old half-open ones and drop copies nobody picked up.
    fn maintain(&mut self, lost: u64) {
        if lost != self.lost_seen {
            self.lost_seen = lost;
            self.losses += 1;
            for state in self.flows.values_mut() {
                state.suspect = true;
            }
        }
        self.keep_within_budget();
        let now = Instant::now();
        self.half_open.expire(now);
        self.drop_unclaimed(now);
        if self.flows.len() <= MAX_COPIES / 2 {
            self.warned_full = false;
        }
        let flows: Vec<Flow> = self.flows.keys().copied().collect();
        for flow in flows {
            let Some(state) = self.flows.get(&flow) else {
                continue;
            };
            let quiet = state.last_capture.elapsed();
            if quiet > IDLE {
                self.cut(&flow, Cut::Idle);
            } else if state.suspect && quiet > QUIET_AFTER_LOSS {
                self.cut(&flow, Cut::Lost);
            } else {
                self.pump(&flow);
            }
        }
    }

    /// Moves in-order bytes toward the client as far as its queue allows,
    /// ends the stream after the FIN, and cuts a flow whose gap can no
    /// longer fill or whose backlog outgrew its limit.
    fn pump(&mut self, flow: &Flow) {
        let Some(state) = self.flows.get_mut(flow) else {
            return;
        };
        if state.downstream.is_closed() {
            // The client rejected it or went away: nobody wants this copy.
            let id = state.id;
            self.live.take_pending(id);
            return self.close(flow, "nobody wanted the copy".into());
        }
        for chunk in state.reassembler.take_ready() {
            state.outbox_bytes += chunk.len();
            state.outbox.push_back(chunk);
        }
        while state.downstream.capacity() > 1 && !state.outbox.is_empty() {
            let message = merge(&mut state.outbox, &mut state.outbox_bytes);
            let frame = connection_downstream::Kind::Data(state.holding.queue(message));
            let _ = state
                .downstream
                .try_send(Ok(ConnectionDownstream { kind: Some(frame) }));
        }
        state.sync();
        if state.suspect && state.reassembler.hole().is_some() {
            return self.cut(flow, Cut::Lost);
        }
        let held = state.footprint();
        if held > self.flow_limit {
            return self.cut(flow, Cut::TooSlow { held });
        }
        if state.reassembler.finished() && state.outbox.is_empty() {
            let eof = connection_downstream::Kind::Eof(Eof {});
            let _ = state
                .downstream
                .try_send(Ok(ConnectionDownstream { kind: Some(eof) }));
            self.close(flow, String::new());
        }
    }

    fn cut(&mut self, flow: &Flow, cut: Cut) {
        if let Some(state) = self.flows.get(flow) {
            let status = cut.cut();
            if let (Cut::Lost, Some((_, missing))) = (&cut, state.reassembler.hole()) {
                self.live.metrics().mirror_lost_bytes_total.inc_by(missing);
            }
            if !matches!(cut, Cut::Reset { .. } | Cut::SessionEnded | Cut::Idle) {
                self.live.warn(format!(
                    "connection {} was cut off: {}",
                    state.id, status.message
                ));
            }
            let _ = state.downstream.try_send(Err(status));
            // An incomplete copy nobody has picked up yet goes now, queue
            // and all: kept for its call, it would only hold memory. A reset
            // copy is whole up to its reset, like a closed one: it waits.
            if !matches!(cut, Cut::Reset { .. }) {
                self.live.take_pending(state.id);
            }
        }
        self.close(flow, cut.reason().to_string());
    }

    /// Asks the budget to choose what to free if the agent's copies hold too
    /// much, and frees what it chose of this session: live copies are cut
    /// off, ended ones still waiting for their call are dropped.
    fn keep_within_budget(&mut self) {
        self.budget.enforce();
        if !self.chosen.swap(false, Ordering::Acquire) {
            return;
        }
        let limit = self.budget.limit();
        let chosen: Vec<(Flow, usize)> = self
            .flows
            .iter()
            .filter(|(_, state)| state.holding.evicting())
            .map(|(flow, state)| (*flow, state.footprint()))
            .collect();
        for (flow, held) in chosen {
            self.cut(&flow, Cut::Budget { held, limit });
        }
        for (id, flow, _, holding) in &self.unclaimed {
            if !holding.evicting() || self.flows.get(flow).is_some_and(|s| s.id == *id) {
                continue; // a live copy is cut above, at the next look if chosen since
            }
            if self.live.take_pending(*id).is_some() {
                self.live.warn(format!(
                    "connection {id} was not copied: it ended before remocal picked it up, and the agent's mirror memory budget ({limit} bytes) was reached"
                ));
            }
            holding.settle();
        }
    }

    /// Drops the copies announced [`UNCLAIMED`] ago whose data call never
    /// came, also those that ended meanwhile: their queues hold their bytes.
    fn drop_unclaimed(&mut self, now: Instant) {
        while let Some(&(.., announced, _)) = self.unclaimed.front()
            && now.duration_since(announced) >= UNCLAIMED
        {
            let (id, flow, _, holding) = self.unclaimed.pop_front().expect("checked above");
            // Whatever happens below, its queue is no longer in reach here:
            // taken by its call, or dropped.
            let alive = self.flows.get_mut(&flow).filter(|state| state.id == id);
            match alive {
                Some(state) => state.announced = false, // its close settles it
                None => holding.settle(),
            }
            if self.live.take_pending(id).is_none() {
                continue; // picked up, or refused
            }
            self.live.warn(format!(
                "connection {id} was not copied: the client did not pick it up within {UNCLAIMED:?}"
            ));
            if self.flows.get(&flow).is_some_and(|state| state.id == id) {
                self.close(&flow, "not picked up".into());
            }
        }
    }

    fn close(&mut self, flow: &Flow, error: String) {
        if let Some(state) = self.flows.remove(flow) {
            if !state.announced {
                // Its queue, if any, belongs to its call now.
                state.holding.settle();
            }
            let outcome = Outcome {
                bytes_from_remote: state.reassembler.delivered(),
                bytes_to_remote: 0,
                error,
                stats: None,
                // The pod's own socket of this connection.
                sockets: Some((flow.destination, flow.source)),
            };
            self.live.connection_closed(state.id, outcome);
        }
    }
}

/// Joins queued chunks into one message of at most [`MESSAGE`] bytes.
fn merge(outbox: &mut VecDeque<Bytes>, outbox_bytes: &mut usize) -> Bytes {
    let first = outbox.pop_front().expect("a non-empty outbox");
    *outbox_bytes -= first.len();
    if outbox
        .front()
        .is_none_or(|next| first.len() + next.len() > MESSAGE)
    {
        return first;
    }
    let mut message = BytesMut::from(first.as_ref());
    while let Some(next) = outbox.front() {
        if message.len() + next.len() > MESSAGE {
            break;
        }
        let next = outbox.pop_front().expect("checked above");
        *outbox_bytes -= next.len();
        message.extend_from_slice(&next);
    }
    message.freeze()
}
