//! `remocal steal` and `remocal mirror`: one session on the agent, one
//! forwarded connection per stolen or mirrored connection, and a clean end
//! on Ctrl-C or SIGTERM: the agent confirms the redirection is gone before
//! we exit. With a COMMAND, its process lives as long as the session.
use std::{pin::Pin, time::Duration};

use nix::sys::signal::Signal;
use remocal_proto::v1::{
    CloseSession, HttpFilter, Mode, OpenSession, ResetExisting, SessionEvent, SessionRequest,
    Target, session_event, session_request,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Streaming;

use crate::{
    agent_link::{Agent, AgentAddress},
    cli::{ResetArgs, SessionArgs, StealArgs},
    credentials::Credentials,
    exit::{Failure, Status},
    filter,
    forward::{self, Forwarding, InFlight, Local},
    local_command::{self, LocalCommand, SessionEnv},
    output::Printer,
    target::{self, Named},
};

/// How long we wait for the agent to confirm the end of the session.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a local command may take to exit after Ctrl-C before it is
/// killed.
const COMMAND_GRACE: Duration = Duration::from_secs(10);
/// How long the connections of a local command that exited may take to
/// deliver what it wrote before the session ends.
const EXIT_DRAIN: Duration = Duration::from_secs(2);
/// Calls kept open for connections to come. Each used one is replaced at
/// once, so this only needs to cover the connections that arrive within one
/// round trip to the agent; more arriving are announced, which costs them
/// that round trip, and nothing else.
const STANDBY_CALLS: usize = 16;

/// `remocal steal`: the filter flags are checked before anything is
/// contacted, so a typo costs no cluster call.
pub async fn steal(args: StealArgs) -> Result<(), Failure> {
    let filter = filter::from_args(&args.filter)?;
    let reset = reset_existing(&args.reset)?;
    run(args.session, Mode::Steal, filter, reset).await
}

/// What `--reset-existing` and `--reset-deadline` ask of the agent.
fn reset_existing(args: &ResetArgs) -> Result<Option<ResetExisting>, Failure> {
    match (args.reset_existing, args.reset_deadline) {
        (false, None) => Ok(None),
        (false, Some(_)) => Err(Failure::new(
            Status::Usage,
            "--reset-deadline only applies to --reset-existing: add --reset-existing, or drop --reset-deadline",
        )),
        (true, seconds) => Ok(Some(ResetExisting {
            // 0: the agent's default (10 s).
            deadline_ms: seconds.map_or(0, |seconds| seconds.saturating_mul(1000)),
        })),
    }
}

/// A session of `mode`; `filter` only for a filtered steal, `reset` only
/// for a steal that takes over the pod's existing connections.
pub async fn run(
    args: SessionArgs,
    mode: Mode,
    filter: Option<HttpFilter>,
    reset: Option<ResetExisting>,
) -> Result<(), Failure> {
    let printer = Printer {
        format: args.link.output,
        verbose: args.link.verbose,
    };
    let local = Local {
        host: args.local.local_host.clone(),
        port: args.local.local_port.unwrap_or(args.port),
    };
    let named = Named::parse(&args.target)?;
    let target_env = named.to_string();
    let located = target::locate(named, &args.cluster, args.link.agent.as_deref()).await?;
    let address = located.agent;
    let credentials = located.credentials;
    let agent = address.connect(&credentials).await?;
    // From here on Ctrl-C ends what was started cleanly, whenever it comes.
    let mut stop = Box::pin(stop_requested());
    // The local process first, so that no connection arrives before it
    // listens; after the agent answered, so that a bad target starts nothing.
    let mut command = match args.command.as_slice() {
        [] => None,
        argv => {
            let env = SessionEnv {
                target: target_env,
                port: args.port,
                mode: mode_name(mode),
            };
            let mut command = LocalCommand::start(argv, &env)?;
            let limit = Duration::from_secs(args.listen_timeout);
            tokio::select! {
                listening = command.wait_listening(&local, limit) => listening?,
                signal = &mut stop => {
                    let status = command.stop(signal, COMMAND_GRACE).await;
                    return command_exit(status, "");
                }
            }
            Some(command)
        }
    };
    let link = Link {
        agent,
        address,
        credentials,
        target: located.target,
        port: args.port,
        printer,
        local,
    };
    let ended = serve(link, mode, filter, reset, command.as_mut(), stop).await;
    match (ended, command) {
        (Ok(Ended::Stopped(_)), None) => Ok(()),
        (Ok(Ended::Stopped(signal)), Some(mut command)) => {
            let status = command.stop(signal, COMMAND_GRACE).await;
            command_exit(status, "")
        }
        (Ok(Ended::CommandExited(status)), Some(command)) => command_exit(
            status,
            &format!(
                "{} {}; the session is closed",
                command.name(),
                local_command::describe(status)
            ),
        ),
        (Ok(Ended::CommandExited(_)), None) => unreachable!("no command to exit"),
        (Err(failure), Some(mut command)) => {
            command.stop(Signal::SIGTERM, COMMAND_GRACE).await;
            Err(failure)
        }
        (Err(failure), None) => Err(failure),
    }
}

/// What a session was opened with, toward the agent and the local side.
struct Link {
    agent: Agent,
    address: AgentAddress,
    credentials: Credentials,
    target: Target,
    port: u16,
    printer: Printer,
    local: Local,
}

/// How a session ended when it did not fail.
enum Ended {
    /// Ctrl-C or SIGTERM.
    Stopped(Signal),
    /// The local command exited on its own.
    CommandExited(std::process::ExitStatus),
}

/// remocal exits as its command did: 0 quietly, else its code.
fn command_exit(status: std::process::ExitStatus, message: &str) -> Result<(), Failure> {
    match local_command::exit_code(status) {
        0 => Ok(()),
        code => Err(Failure::with_code(code, message)),
    }
}

fn mode_name(mode: Mode) -> &'static str {
    if mode == Mode::Mirror {
        "mirror"
    } else {
        "steal"
    }
}

/// Opens the session and serves it until Ctrl-C, the command's exit, or a
/// failure.
async fn serve(
    link: Link,
    mode: Mode,
    filter: Option<HttpFilter>,
    reset: Option<ResetExisting>,
    mut command: Option<&mut LocalCommand>,
    mut stop: Pin<Box<impl Future<Output = Signal>>>,
) -> Result<Ended, Failure> {
    let Link {
        mut agent,
        address,
        credentials,
        target,
        port,
        printer,
        local,
    } = link;

    let (requests, outgoing) = mpsc::channel(64);
    let filtered = filter.is_some();
    let resetting = reset.is_some();
    let open = OpenSession {
        target: Some(target),
        port: port.into(),
        mode: mode as i32,
        client: whoami(),
        filter,
        reset_existing: reset,
    };
    let _ = requests.try_send(request(session_request::Kind::Open(open)));
    let mut events = match agent.api.session(ReceiverStream::new(outgoing)).await {
        Ok(events) => events.into_inner(),
        Err(status) => {
            return Err(session_refused(&status, &address, &credentials, filtered).await);
        }
    };

    let ready = match events.message().await {
        Ok(Some(SessionEvent {
            kind: Some(session_event::Kind::Ready(ready)),
        })) => ready,
        Ok(_) => return Err(Failure::unexpected("the agent did not confirm the session")),
        Err(status) => return Err(refused(&status, &address, filtered)),
    };
    if filtered && ready.filter.is_none() {
        // An agent that predates filters ignores the field and steals the
        // whole port: give the port back at once rather than take every
        // request the developer did not ask for.
        close(&requests, &mut events, printer).await;
        return Err(Failure::new(
            Status::Rejected,
            format!(
                "{address} does not support filtered steals (it is older than this remocal) and stole the whole port, now given back: upgrade the remocal agent, or steal without --header, --path and --method"
            ),
        ));
    }
    printer.ready(mode_name(mode), &ready, &local.to_string());
    if resetting && ready.reset.is_none() {
        printer.warning(&format!(
            "{address} is older than this remocal and ignored --reset-existing: the pod's existing connections keep going to the pod; upgrade the remocal agent"
        ));
    }

    let (standby_used, mut replace_standby) = mpsc::unbounded_channel();
    let in_flight = InFlight::default();
    let forwarding = Forwarding {
        agent,
        session_id: ready.session_id.clone(),
        local,
        requests: requests.clone(),
        printer,
        mode,
        standby_used,
        in_flight: in_flight.clone(),
    };
    // An older agent announces every connection.
    if ready.standby_calls {
        for _ in 0..STANDBY_CALLS {
            tokio::spawn(forward::stand_by(forwarding.clone()));
        }
    }
    let ended = loop {
        tokio::select! {
            Some(()) = replace_standby.recv() => {
                tokio::spawn(forward::stand_by(forwarding.clone()));
            }
            event = events.message() => match event {
                Ok(Some(SessionEvent { kind: Some(kind) })) => match kind {
                    session_event::Kind::Connection(connection) => {
                        printer.connection(&connection);
                        tokio::spawn(forward::serve(forwarding.clone(), connection));
                    }
                    session_event::Kind::Closed(closed) => printer.closed(&closed),
                    session_event::Kind::Warning(warning) => printer.warning(&warning.message),
                    session_event::Kind::Reset(progress) => {
                        printer.reset(&progress);
                        if progress.done && progress.waiting > 0 {
                            printer.warning(&format!(
                                "{} connection{} of the pod stayed busy until the reset deadline and {} left to the pod",
                                progress.waiting,
                                if progress.waiting == 1 { "" } else { "s" },
                                if progress.waiting == 1 { "was" } else { "were" },
                            ));
                        }
                    }
                    session_event::Kind::Ended(ended) => {
                        return Err(Failure::session_lost(format!("the agent ended the session: {}", ended.reason)));
                    }
                    session_event::Kind::Ready(_) => {}
                },
                Ok(Some(SessionEvent { kind: None })) => {}
                Ok(None) => return Err(Failure::session_lost(format!("{address} closed the session"))),
                Err(status) => {
                    return Err(Failure::session_lost(format!(
                        "lost the link to {address}: {}; the agent removes the redirection by itself",
                        status.message()
                    )));
                }
            },
            signal = &mut stop => break Ended::Stopped(signal),
            status = exited(&mut command) => {
                // Its last answers may still be on their way to the agent,
                // and ending the session ends every connection: its
                // connections end with its sockets, unless a remote client
                // holds one open.
                let _ = tokio::time::timeout(EXIT_DRAIN, in_flight.drained()).await;
                break Ended::CommandExited(status);
            }
        }
    };
    close(&requests, &mut events, printer).await;
    Ok(ended)
}

/// The command's exit; never, without one.
async fn exited(command: &mut Option<&mut LocalCommand>) -> std::process::ExitStatus {
    match command {
        Some(command) => command.exited().await,
        None => std::future::pending().await,
    }
}

/// Who we were taken for, or why the link broke, when that explains the
/// refusal; anything else is the agent's own answer.
async fn session_refused(
    status: &tonic::Status,
    address: &AgentAddress,
    credentials: &Credentials,
    filtered: bool,
) -> Failure {
    if let Some(failure) = address.call_failure(status, credentials).await {
        return failure;
    }
    refused(status, address, filtered)
}

/// The agent's answer to opening the session; its refusal of our filter is
/// a usage error, like the same refusal here.
fn refused(status: &tonic::Status, address: &AgentAddress, filtered: bool) -> Failure {
    if filtered && let Some(failure) = filter::refused(status) {
        return failure;
    }
    Failure::from_status(status, address)
}

/// Asks the agent to end the session and waits for its confirmation, so the
/// pod serves its own traffic again by the time we exit.
async fn close(
    requests: &mpsc::Sender<SessionRequest>,
    events: &mut Streaming<SessionEvent>,
    printer: Printer,
) {
    let _ = requests
        .send(request(session_request::Kind::Close(CloseSession {})))
        .await;
    let confirmed = tokio::time::timeout(CLOSE_TIMEOUT, async {
        loop {
            match events.message().await {
                Ok(Some(SessionEvent {
                    kind: Some(session_event::Kind::Ended(_)),
                })) => return true,
                Ok(Some(SessionEvent {
                    kind: Some(session_event::Kind::Closed(closed)),
                })) => printer.closed(&closed),
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => return false,
            }
        }
    })
    .await;
    if confirmed != Ok(true) {
        printer.warning("the agent did not confirm the end of the session; it removes the redirection when it notices this client is gone");
    }
}

fn request(kind: session_request::Kind) -> SessionRequest {
    SessionRequest { kind: Some(kind) }
}

/// Ctrl-C or SIGTERM, whichever came (a local command gets the same). The
/// handlers are installed when this is called, not when the future is
/// first polled: a signal right after the `ready` line must end the
/// session cleanly, not kill the process.
fn stop_requested() -> impl Future<Output = Signal> {
    use tokio::signal::unix::{SignalKind, signal};
    let handlers = signal(SignalKind::terminate())
        .and_then(|term| signal(SignalKind::interrupt()).map(|interrupt| (term, interrupt)));
    async move {
        match handlers {
            Ok((mut term, mut interrupt)) => tokio::select! {
                _ = term.recv() => Signal::SIGTERM,
                _ = interrupt.recv() => Signal::SIGINT,
            },
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
                Signal::SIGINT
            }
        }
    }
}

/// Shown to a colleague who tries to steal the same port.
fn whoami() -> String {
    let user = std::env::var("USER")
        .or_else(|_| std::env::var("LOGNAME"))
        .unwrap_or_else(|_| "someone".into());
    let host = nix::unistd::gethostname()
        .ok()
        .and_then(|host| host.into_string().ok())
        .unwrap_or_else(|| "unknown-host".into());
    format!("{user}@{host} (pid {})", std::process::id())
}

#[cfg(test)]
mod tests;
