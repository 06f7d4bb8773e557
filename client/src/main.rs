//! remocal: the developer's side. Opens a session on the node agent and serves
//! each stolen connection to an unmodified local process through an ordinary
//! local TCP connection.
mod agent_link;
mod agents;
mod cli;
mod cluster;
mod credentials;
mod exit;
mod filter;
mod forward;
mod local_command;
mod output;
mod session;
mod sessions;
mod target;

use std::process::ExitCode;

use remocal_proto::v1::Mode;

use crate::{cli::Command, exit::Failure};

fn main() -> ExitCode {
    remocal_proto::allocator::configure();
    let cli = match cli::parse() {
        Ok(cli) => cli,
        Err(failure) => return failure.report(),
    };
    if let Command::Completions { shell } = cli.command {
        cli::completions(shell);
        return ExitCode::SUCCESS;
    }
    raise_fd_limit();
    // kube's TLS uses rustls' process-wide provider; naming it keeps that true
    // even if another dependency ever compiles a second provider in.
    let _ = rustls::crypto::ring::default_provider().install_default();
    // One thread: the client serves one developer, and handing each
    // connection between threads cost every request about 35 us.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build();
    let runtime = match runtime {
        Ok(runtime) => runtime,
        Err(err) => {
            return Failure::unexpected(format!("cannot start the async runtime: {err}")).report();
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Steal(args) => session::steal(args).await,
            Command::Mirror(args) => session::run(args, Mode::Mirror, None, None).await,
            Command::Agents(args) => agents::run(args).await,
            Command::Sessions(args) => sessions::run(args).await,
            Command::Completions { .. } => Ok(()),
        }
    });
    // Connections still draining must not keep a finished session alive.
    runtime.shutdown_background();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => failure.report(),
    }
}

/// One local socket per stolen connection: lift the soft limit so a busy
/// session is not capped at ~1000 connections.
fn raise_fd_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    if let Ok((_, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
    }
}
