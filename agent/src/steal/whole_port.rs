//! A whole-port steal: every new connection to the port goes to one
//! developer, as it is (the proxy carries its bytes).
use std::{net::SocketAddr, sync::Arc, time::Duration};

use remocal_proto::v1::{SessionEvent, SessionRequest, session_event};
use tokio::{net::TcpStream, sync::mpsc};
use tokio_util::sync::CancellationToken;
use tonic::Streaming;
use tracing::{debug, warn};

use super::canonical;
use crate::{
    live_session::{ATTACH_TIMEOUT, LinkBroken, LiveSession, Pending},
    proxy,
    redirect::Redirection,
};

/// The steal loop: accepts what the kernel hands the listener and
/// hands it to the client, until the session ends for the returned reason.
pub async fn run(
    live: &Arc<LiveSession>,
    redirection: Redirection,
    mut requests: Streaming<SessionRequest>,
    shutdown: CancellationToken,
) -> &'static str {
    let Redirection { listener, active } = redirection;
    let Some(events) = live.sender() else {
        return "the client stopped listening";
    };
    let listener = match tokio::net::TcpListener::from_std(listener) {
        Ok(listener) => listener,
        Err(err) => {
            live.warn(format!("the agent cannot watch the steal listener: {err}"));
            return "internal error";
        }
    };
    // One timer for the whole session rather than one per connection: a
    // task sleeping 10 s beside each new connection cost more memory than
    // the connection itself under a burst.
    let mut sweep = tokio::time::interval(ATTACH_TIMEOUT / 10);
    // An announcement waiting for room in a full event queue. Accepting
    // pauses meanwhile (the kernel's backlog absorbs the burst), so a
    // client reading events slowly slows accepting, not memory; and the
    // loop never waits on the queue itself, so closing, shutdown and
    // the sweep go on even for a client that stopped reading.
    let mut unsent: Option<SessionEvent> = None;
    let reason = loop {
        tokio::select! {
            _ = sweep.tick() => live.reset_unclaimed(),
            room = events.reserve(), if unsent.is_some() => match room {
                Ok(room) => room.send(unsent.take().expect("checked by the guard")),
                Err(_) => break "the client stopped listening",
            },
            accepted = listener.accept(), if unsent.is_none() => match accepted {
                Ok((stream, source)) => {
                    unsent = announce(live, stream, source).and_then(|event| {
                        match events.try_send(event) {
                            Err(mpsc::error::TrySendError::Full(event)) => Some(event),
                            // Closed: the loop notices below.
                            _ => None,
                        }
                    });
                }
                Err(err) => {
                    // Typically out of file descriptors: back off instead of spinning.
                    warn!(session = %live.id, %err, "accepting a stolen connection failed");
                    live.warn(format!("the agent could not accept a connection: {err}"));
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            request = requests.message() => if let Some(reason) = live.handle(request.map_err(|_| LinkBroken)) {
                break reason;
            },
            () = events.closed() => break "the client stopped listening",
            () = shutdown.cancelled() => break "the agent is shutting down",
        }
    };
    // Order matters: stop redirecting first, so every new connection from
    // here on reaches the pod; only then close what we already took.
    drop(active);
    close_backlog(listener);
    reason
}

/// Hands a stolen connection to a standby call, or returns the event
/// that announces it to the client.
fn announce(
    live: &Arc<LiveSession>,
    stream: TcpStream,
    source: SocketAddr,
) -> Option<SessionEvent> {
    let _ = stream.set_nodelay(true);
    let destination = match stream.local_addr() {
        Ok(addr) => canonical(addr),
        Err(err) => {
            debug!(%err, "a stolen connection closed before it was announced");
            return None;
        }
    };
    let source = canonical(source);
    let (id, announcement) = live.hand_over(
        Pending::Stolen(stream),
        source.to_string(),
        destination.to_string(),
    );
    debug!(session = %live.id, connection = id, %source, %destination, "stolen connection");
    announcement.map(|connection| SessionEvent {
        kind: Some(session_event::Kind::Connection(connection)),
    })
}

/// Connections the kernel completed after the last accept but before the
/// redirection was removed were meant for the developer: close them with a
/// FIN instead of letting the listener's close reset them.
fn close_backlog(listener: tokio::net::TcpListener) {
    let Ok(listener) = listener.into_std() else {
        return;
    };
    while let Ok((stream, _)) = listener.accept() {
        if let Ok(stream) = stream
            .set_nonblocking(true)
            .and_then(|()| TcpStream::from_std(stream))
        {
            tokio::spawn(async move { proxy::close_gracefully(&stream).await });
        }
    }
}
