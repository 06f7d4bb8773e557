//! `cargo xtask bench`: remocal's overhead against going direct, measured by
//! `remocal-bench` on optimised binaries; and the quick smoke run that
//! `cargo xtask test` makes so the benchmark keeps working.
use std::path::Path;

use crate::{run, setup};

#[derive(clap::Args)]
pub struct Options {
    /// A run under 2 minutes with rough figures, instead of the full one.
    #[arg(long)]
    quick: bool,
}

pub fn run(options: &Options) -> anyhow::Result<()> {
    run::require_root(
        "cargo xtask bench",
        "its network namespaces and eBPF programs",
    )?;
    setup::ensure()?;
    eprintln!("==> build (release)");
    run::checked(run::cargo().args([
        "build",
        "--release",
        "-p",
        "remocal-agent",
        "-p",
        "remocal",
        "-p",
        "remocal-bench",
    ]))?;
    eprintln!("==> bench");
    bench("release", options.quick, "target/bench")
}

/// The quick run on the debug binaries `cargo xtask test` has just built: it
/// proves every measurement still works; its figures mean nothing.
pub fn smoke() -> anyhow::Result<()> {
    bench("debug", true, "target/bench-smoke")
}

fn bench(profile_dir: &str, quick: bool, out: &str) -> anyhow::Result<()> {
    let root = run::workspace_root();
    let bin_dir = root.join("target").join(profile_dir);
    let mut command = std::process::Command::new(bin_dir.join("remocal-bench"));
    command
        .current_dir(&root)
        .env("REMOCAL_BIN_DIR", &bin_dir)
        .arg("--out")
        .arg(Path::new(out));
    if quick {
        command.arg("--quick");
    }
    run::checked(&mut command)
}
