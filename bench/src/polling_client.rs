//! A client that holds one keep-alive connection to the pod and polls on it,
//! as a service's connection pool does: the kind of client a steal alone
//! never reaches, because only new connections are redirected. It reports
//! every answer, with who served it and on which connection.

use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use remocal_tests::netns::Netns;
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender, unbounded_channel};

use crate::probe::{self, Ask};

/// How long one connect or one answer may take before the poll counts as
/// failed.
const LIMIT: Duration = Duration::from_secs(1);

/// One poll, as the client saw it.
#[derive(Debug)]
pub struct Poll {
    /// When its answer was complete (or the request failed).
    pub at: Instant,
    /// Which connection: 1 for the first, one more for each the client opened
    /// since.
    pub connection: u64,
    /// The answer's body (`bed::POD_BODY` or `bed::LOCAL_BODY`), or why there
    /// was none.
    pub answer: Result<String, String>,
}

pub struct PollingClient {
    polls: UnboundedReceiver<Poll>,
}

impl PollingClient {
    /// Starts polling `addr` from `from` every `interval`. The polling thread
    /// is started by one that joined `from`, so it is in that namespace too;
    /// it ends at its next poll once this client is dropped.
    pub fn start(from: &Netns, addr: SocketAddr, interval: Duration) -> PollingClient {
        let (sender, polls) = unbounded_channel();
        from.run(|| std::thread::spawn(move || poll_until_dropped(addr, interval, sender)));
        PollingClient { polls }
    }

    /// The next poll; an error if the client is gone (it never is on its own).
    async fn next(&mut self) -> anyhow::Result<Poll> {
        self.polls.recv().await.context("the polling client died")
    }

    /// Waits until `polls` answers in a row came from `body`'s server on one
    /// connection: the client holds a keep-alive connection there.
    pub async fn held_by(
        &mut self,
        body: &str,
        polls: usize,
        limit: Duration,
    ) -> anyhow::Result<()> {
        let deadline = Instant::now() + limit;
        let (mut connection, mut in_a_row) = (0, 0);
        while in_a_row < polls {
            let poll = self.next().await?;
            let served = poll.answer.as_deref() == Ok(body);
            in_a_row = match (served, poll.connection == connection) {
                (false, _) => 0,
                (true, true) => in_a_row + 1,
                (true, false) => 1,
            };
            connection = poll.connection;
            if poll.at >= deadline {
                bail!(
                    "the polling client held no connection served by {body:?} within {limit:?} (last poll {poll:?})"
                );
            }
        }
        Ok(())
    }

    /// The first poll from now on that `body`'s server answered, if one
    /// did within `limit`.
    pub async fn first_answered_by(
        &mut self,
        body: &str,
        limit: Duration,
    ) -> anyhow::Result<Option<Poll>> {
        let deadline = Instant::now() + limit;
        loop {
            let poll = self.next().await?;
            if poll.answer.as_deref() == Ok(body) {
                return Ok(Some(poll));
            }
            if poll.at >= deadline {
                return Ok(None);
            }
        }
    }
}

fn poll_until_dropped(addr: SocketAddr, interval: Duration, polls: UnboundedSender<Poll>) {
    let mut held = None;
    let mut opened = 0;
    loop {
        let answer = request(&mut held, &mut opened, addr).map_err(|err| format!("{err:#}"));
        let poll = Poll {
            at: Instant::now(),
            connection: opened,
            answer,
        };
        if polls.send(poll).is_err() {
            return;
        }
        std::thread::sleep(interval);
    }
}

/// One request on the held connection. When the server has ended that one,
/// the request goes again at once on a new connection, as pools do
/// (urllib3, Go's net/http): the client notices the reset at its next poll,
/// not a poll later.
fn request(
    held: &mut Option<TcpStream>,
    opened: &mut u64,
    addr: SocketAddr,
) -> anyhow::Result<String> {
    if let Some(stream) = held {
        match probe::answer_body(stream, &Ask::default()) {
            Ok(body) => return Ok(body),
            Err(_) => *held = None,
        }
    }
    let mut stream =
        TcpStream::connect_timeout(&addr, LIMIT).with_context(|| format!("connect to {addr}"))?;
    *opened += 1;
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(LIMIT))?;
    let body = probe::answer_body(&mut stream, &Ask::default())?;
    *held = Some(stream);
    Ok(body)
}
