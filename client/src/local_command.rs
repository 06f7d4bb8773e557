//! `remocal steal|mirror ... -- COMMAND`: the developer's process runs under
//! the session. remocal starts it, opens the session only once it listens
//! (so no early connection is reset for want of a listener), and ends both
//! together: Ctrl-C ends the session first and then the command; the
//! command's own exit ends the session, and remocal exits as it did.
use std::{
    ffi::OsString,
    os::unix::process::{CommandExt as _, ExitStatusExt as _},
    process::ExitStatus,
    time::Duration,
};

use nix::{
    sys::signal::{Signal, killpg},
    unistd::Pid,
};
use tokio::{net::TcpStream, process::Child, time::Instant};

use crate::{
    exit::{Failure, Status},
    forward::Local,
};

/// How often remocal checks whether the command listens yet.
const LISTEN_POLL: Duration = Duration::from_millis(50);

/// What the command learns about its session from its environment.
pub struct SessionEnv {
    /// The target as the user named it.
    pub target: String,
    pub port: u16,
    /// `steal` or `mirror`.
    pub mode: &'static str,
}

pub struct LocalCommand {
    child: Child,
    /// The command's process group (its own: Ctrl-C in the terminal reaches
    /// remocal alone, which ends the session before passing it on).
    group: Pid,
    shown: String,
}

impl LocalCommand {
    pub fn start(argv: &[OsString], env: &SessionEnv) -> Result<Self, Failure> {
        let (program, args) = argv
            .split_first()
            .ok_or_else(|| Failure::new(Status::Usage, "no command after `--`"))?;
        let shown = program.to_string_lossy().into_owned();
        let mut command = std::process::Command::new(program);
        command
            .args(args)
            .env("REMOCAL_TARGET", &env.target)
            .env("REMOCAL_PORT", env.port.to_string())
            .env("REMOCAL_MODE", env.mode)
            .process_group(0);
        let child = tokio::process::Command::from(command)
            .kill_on_drop(false)
            .spawn()
            .map_err(|err| Failure::new(Status::Usage, format!("cannot start {shown:?}: {err}")))?;
        let group = Pid::from_raw(child.id().map_or(0, |id| id as i32));
        Ok(Self {
            child,
            group,
            shown,
        })
    }

    /// Returns once something accepts connections on `local`; fails when
    /// the command exits first or nothing listens within `limit`.
    pub async fn wait_listening(&mut self, local: &Local, limit: Duration) -> Result<(), Failure> {
        let deadline = Instant::now() + limit;
        loop {
            if TcpStream::connect((local.host.as_str(), local.port))
                .await
                .is_ok()
            {
                return Ok(());
            }
            if let Some(status) = self.child.try_wait().ok().flatten() {
                return Err(Failure::with_code(
                    exit_code(status),
                    format!(
                        "{} {} before listening on {local}; no session was opened",
                        self.shown,
                        describe(status)
                    ),
                ));
            }
            if Instant::now() >= deadline {
                self.stop(Signal::SIGTERM, Duration::from_secs(5)).await;
                return Err(Failure::new(
                    Status::Usage,
                    format!(
                        "{} did not listen on {local} within {} s, so no session was opened and it was stopped: make it listen on --local-host and --local-port, or give it longer with --listen-timeout",
                        self.shown,
                        limit.as_secs()
                    ),
                ));
            }
            tokio::time::sleep(LISTEN_POLL).await;
        }
    }

    /// Waits for the command to end on its own.
    pub async fn exited(&mut self) -> ExitStatus {
        self.child
            .wait()
            .await
            .unwrap_or_else(|_| ExitStatus::from_raw(1 << 8))
    }

    /// Passes `signal` to the command's process group, then, after `grace`,
    /// kills what is left of it.
    pub async fn stop(&mut self, signal: Signal, grace: Duration) -> ExitStatus {
        if let Some(status) = self.child.try_wait().ok().flatten() {
            return status;
        }
        let _ = killpg(self.group, signal);
        match tokio::time::timeout(grace, self.child.wait()).await {
            Ok(Ok(status)) => status,
            _ => {
                let _ = killpg(self.group, Signal::SIGKILL);
                self.exited().await
            }
        }
    }

    pub fn name(&self) -> &str {
        &self.shown
    }
}

/// The shell's convention: the exit code, or 128 + the signal that ended it.
pub fn exit_code(status: ExitStatus) -> u8 {
    match (status.code(), status.signal()) {
        (Some(code), _) => u8::try_from(code).unwrap_or(1),
        (None, Some(signal)) => 128u8.saturating_add(u8::try_from(signal).unwrap_or(0)),
        (None, None) => 1,
    }
}

pub fn describe(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exited with status {code}"),
        (None, Some(signal)) => format!(
            "was killed by {}",
            Signal::try_from(signal).map_or_else(|_| format!("signal {signal}"), |s| s.to_string())
        ),
        (None, None) => "ended".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_signal_becomes_128_plus_its_number() {
        assert_eq!(exit_code(ExitStatus::from_raw(3 << 8)), 3);
        assert_eq!(exit_code(ExitStatus::from_raw(libc_sigterm())), 143);
        assert_eq!(
            describe(ExitStatus::from_raw(libc_sigterm())),
            "was killed by SIGTERM"
        );
    }

    fn libc_sigterm() -> i32 {
        Signal::SIGTERM as i32
    }
}
