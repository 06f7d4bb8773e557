//! External programs, echoed before they run so the user sees what happens.
use std::{
    ffi::OsString,
    path::{Path, PathBuf},
    process::Command,
    sync::OnceLock,
};

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

/// The command as one could paste it into a shell.
pub fn describe(command: &Command) -> String {
    std::iter::once(command.get_program())
        .chain(command.get_args())
        .map(|part| quote(&part.to_string_lossy()))
        .collect::<Vec<_>>()
        .join(" ")
}

fn quote(word: &str) -> String {
    let plain = |c: char| c.is_ascii_alphanumeric() || "_-./:=@%+,".contains(c);
    if !word.is_empty() && word.chars().all(plain) {
        word.to_string()
    } else {
        format!("'{}'", word.replace('\'', r"'\''"))
    }
}

/// The cargo that runs xtask (so `cargo +toolchain xtask` stays on that toolchain).
pub fn cargo() -> Command {
    let mut command = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    command.current_dir(workspace_root());
    command
}

/// Everything the demo and the end-to-end tests run (the agent's build also
/// builds the eBPF programs). The same package selection as `cargo test
/// --workspace` so both resolve the same features and the binaries are built
/// once, not once per command.
pub fn build_binaries() -> anyhow::Result<()> {
    checked(cargo().args([
        "build",
        "--workspace",
        "--exclude",
        "remocal-ebpf",
        "--bins",
    ]))
}

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map_or_else(|| PathBuf::from("."), Path::to_path_buf)
}

/// `cargo install` puts bpf-linker in `$CARGO_HOME/bin`, which a fresh root
/// shell (or sudo) often lacks in PATH; the agent's build finds bpf-linker
/// only through PATH.
pub fn put_cargo_bin_on_path() {
    let Some(cargo_bin) = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| Path::new(&home).join(".cargo")))
        .map(|home| home.join("bin"))
    else {
        return;
    };
    let path = std::env::var_os("PATH").unwrap_or_default();
    if std::env::split_paths(&path).any(|dir| dir == cargo_bin) {
        return;
    }
    let mut joined = OsString::from(cargo_bin.as_os_str());
    if !path.is_empty() {
        joined.push(":");
        joined.push(&path);
    }
    // SAFETY: called first thing in main, before any thread exists, so no
    // other thread can read the environment concurrently.
    unsafe { std::env::set_var("PATH", joined) };
}

/// This program's path, read at start: `cargo build --workspace` relinks
/// xtask, after which the kernel names the running file "... (deleted)".
static XTASK_EXE: OnceLock<PathBuf> = OnceLock::new();

pub fn remember_xtask_exe() {
    if let Ok(exe) = std::env::current_exe() {
        let _ = XTASK_EXE.set(exe);
    }
}

/// The path of xtask's binary, to start the demo's HTTP servers with.
pub fn xtask_exe() -> anyhow::Result<&'static Path> {
    XTASK_EXE
        .get()
        .map(PathBuf::as_path)
        .context("cannot find the xtask binary")
}

/// `why` completes "... needs root for ...".
pub fn require_root(what: &str, why: &str) -> anyhow::Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("{what} needs root for {why}: run it as root (e.g. with sudo)");
    }
    Ok(())
}
