//! External programs, echoed before they run so the user sees what happens.
use std::{path::PathBuf, process::Command};

use anyhow::{Context as _, bail};

/// Runs to completion; a non-zero exit is an error naming the command.
pub fn checked(command: &mut Command) -> anyhow::Result<()> {
    eprintln!("  $ {}", describe(command));
    let status = command
        .status()
        .with_context(|| format!("cannot run {}", describe(command)))?;
    if !status.success() {
        bail!("`{}` failed ({status})", describe(command));
    }
    Ok(())
}

/// Runs quietly and returns stdout, or None if the program is missing or fails.
pub fn output(command: &mut Command) -> Option<String> {
    let output = command.output().ok()?;
    output
        .status
        .success()
        .then(|| String::from_utf8_lossy(&output.stdout).into_owned())
}

pub fn describe(command: &Command) -> String {
    std::iter::once(command.get_program())
        .chain(command.get_args())
        .map(|part| part.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

pub fn cargo() -> Command {
    let mut command = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    command.current_dir(workspace_root());
    command
}

/// The two binaries users run (the agent's build also builds the eBPF programs).
pub fn build_binaries() -> anyhow::Result<()> {
    checked(cargo().args([
        "build",
        "--package",
        "remocal-agent",
        "--package",
        "remocal",
    ]))
}

pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

pub fn require_root(what: &str) -> anyhow::Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("{what} needs root (network namespaces and eBPF): run it with sudo");
    }
    Ok(())
}
