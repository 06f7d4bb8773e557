//! `remocal steal` and `remocal mirror`: one session on the agent, one
//! forwarded connection per stolen or mirrored connection, and a clean end
//! on Ctrl-C or SIGTERM: the agent confirms the redirection is gone before
//! we exit.
use std::time::Duration;

use remocal_proto::v1::{
    CloseSession, Mode, OpenSession, SessionEvent, SessionRequest, Target, session_event,
    session_request, target,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Streaming;

use crate::{
    agent_link,
    cli::SessionArgs,
    exit::Failure,
    forward::{self, Local},
    output::Printer,
};

/// How long we wait for the agent to confirm the end of the session.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

pub async fn run(args: SessionArgs, mode: Mode) -> Result<(), Failure> {
    let printer = Printer {
        format: args.link.output,
        verbose: args.link.verbose,
    };
    let local = Local {
        host: args.local.local_host.clone(),
        port: args.local.local_port.unwrap_or(args.port),
    };
    let agent_url = args.link.agent.clone();
    let mut agent = agent_link::connect(&agent_url).await?;

    let (requests, outgoing) = mpsc::channel(64);
    let target = match (args.target.netns, args.target.pid) {
        (Some(path), _) => target::Kind::NetnsPath(path),
        (None, Some(pid)) => target::Kind::Pid(pid),
        (None, None) => unreachable!("clap requires --netns or --pid"),
    };
    let open = OpenSession {
        target: Some(Target { kind: Some(target) }),
        port: args.port.into(),
        mode: mode as i32,
        client: whoami(),
    };
    let _ = requests.try_send(request(session_request::Kind::Open(open)));
    let mut events = agent
        .session(ReceiverStream::new(outgoing))
        .await
        .map_err(|status| Failure::from_status(&status, &agent_url))?
        .into_inner();

    let ready = match events.message().await {
        Ok(Some(SessionEvent {
            kind: Some(session_event::Kind::Ready(ready)),
        })) => ready,
        Ok(_) => return Err(Failure::unexpected("the agent did not confirm the session")),
        Err(status) => return Err(Failure::from_status(&status, &agent_url)),
    };
    let mode_name = if mode == Mode::Mirror {
        "mirror"
    } else {
        "steal"
    };
    printer.ready(mode_name, &ready, &local.to_string());

    let mut stop = Box::pin(stop_requested());
    loop {
        tokio::select! {
            event = events.message() => match event {
                Ok(Some(SessionEvent { kind: Some(kind) })) => match kind {
                    session_event::Kind::Connection(connection) => {
                        printer.connection(&connection);
                        tokio::spawn(forward::serve(
                            agent.clone(), ready.session_id.clone(), connection,
                            local.clone(), requests.clone(), printer, mode,
                        ));
                    }
                    session_event::Kind::Closed(closed) => printer.closed(&closed),
                    session_event::Kind::Warning(warning) => printer.warning(&warning.message),
                    session_event::Kind::Ended(ended) => {
                        return Err(Failure::session_lost(format!("the agent ended the session: {}", ended.reason)));
                    }
                    session_event::Kind::Ready(_) => {}
                },
                Ok(Some(SessionEvent { kind: None })) => {}
                Ok(None) => return Err(Failure::session_lost(format!("the agent at {agent_url} closed the session"))),
                Err(status) => {
                    return Err(Failure::session_lost(format!(
                        "lost the link to the agent at {agent_url}: {}; the agent removes the redirection by itself",
                        status.message()
                    )));
                }
            },
            () = &mut stop => break,
        }
    }
    close(&requests, &mut events, printer).await;
    Ok(())
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

async fn stop_requested() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => tokio::select! {
            _ = tokio::signal::ctrl_c() => {},
            _ = term.recv() => {},
        },
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
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
