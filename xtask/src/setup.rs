//! Installs what building and testing need on a fresh Debian 12 machine,
//! skipping whatever is already there, so it is cheap to run before every
//! test run and demo. One line per step says what it found or does.
use std::{path::Path, process::Command};

use anyhow::Context as _;

use crate::run;

/// Debian packages the build and the tests use. Later features add theirs here.
const DEBIAN_PACKAGES: &[&str] = &[
    // bpf-linker links the eBPF programs with LLVM 22.
    "llvm-22-dev",
    "libpolly-22-dev",
    "libzstd-dev",
    "zlib1g-dev",
    // Network namespaces, veth pairs and addresses for the demo and the tests.
    "iproute2",
    "curl",
    // Shows what the agent attached (`bpftool net show`, `bpftool prog show`).
    "bpftool",
    // Packet loss on the path in the mirror tests (the kernel here has no netem).
    "nftables",
    // The metrics tests scrape the agent with a real Prometheus and promtool.
    "prometheus",
    // Load generators of `cargo xtask bench` (and its smoke run in the tests).
    "wrk",
    "iperf3",
    // RSA client keys as kind and minikube write them, for the tests'
    // certificate users (rcgen cannot make RSA keys with ring).
    "openssl",
];

/// Where kubernetes-validate lives: its own virtualenv, because Debian 12's
/// Python refuses `pip install` into the system (PEP 668).
const VALIDATE_VENV: &str = "/opt/remocal-tools/venv";
/// On PATH for the manifest tests.
const VALIDATE_LINK: &str = "/usr/local/bin/kubernetes-validate";

pub fn ensure() -> anyhow::Result<()> {
    eprintln!("==> setup");
    nightly_with_rust_src()?;
    debian_packages(DEBIAN_PACKAGES)?;
    bpf_linker()?;
    kubernetes_validate()
}

fn nightly_with_rust_src() -> anyhow::Result<()> {
    let toolchains = run::output(Command::new("rustup").args(["toolchain", "list"]))
        .context("cannot run `rustup toolchain list`: install rustup from https://rustup.rs")?;
    if toolchains.lines().any(|line| line.starts_with("nightly")) {
        eprintln!("ok: nightly toolchain already installed");
    } else {
        eprintln!("installing: nightly toolchain (builds the eBPF programs)");
        run::checked(Command::new("rustup").args([
            "toolchain",
            "install",
            "nightly",
            "--profile",
            "minimal",
        ]))?;
    }
    let components = run::output(Command::new("rustup").args([
        "component",
        "list",
        "--toolchain",
        "nightly",
        "--installed",
    ]))
    .unwrap_or_default();
    if components.lines().any(|line| line.starts_with("rust-src")) {
        eprintln!("ok: rust-src for nightly already installed");
    } else {
        eprintln!("installing: rust-src for nightly (the eBPF build compiles core from source)");
        run::checked(Command::new("rustup").args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            "nightly",
        ]))?;
    }
    Ok(())
}

/// One `apt-get update` and one install, and only when something is missing.
fn debian_packages(packages: &[&str]) -> anyhow::Result<()> {
    let missing: Vec<&str> = packages
        .iter()
        .copied()
        .filter(|package| !installed(package))
        .collect();
    if missing.is_empty() {
        eprintln!(
            "ok: Debian packages already installed ({})",
            packages.join(" ")
        );
        return Ok(());
    }
    eprintln!("installing: Debian packages {}", missing.join(" "));
    run::checked(
        Command::new("apt-get")
            .arg("update")
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )?;
    run::checked(
        Command::new("apt-get")
            .args(["install", "-y", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
}

fn installed(package: &str) -> bool {
    run::output(Command::new("dpkg-query").args(["-W", "-f=${Status}", package]))
        .is_some_and(|status| status == "install ok installed")
}

/// Found through PATH, which main extends with `$CARGO_HOME/bin`.
fn bpf_linker() -> anyhow::Result<()> {
    if run::output(Command::new("bpf-linker").arg("--version")).is_some() {
        eprintln!("ok: bpf-linker already installed");
        return Ok(());
    }
    eprintln!("installing: bpf-linker built against LLVM 22 (about a minute)");
    run::checked(
        run::cargo()
            .args([
                "install",
                "bpf-linker",
                "--no-default-features",
                "--features",
                "llvm-22",
            ])
            .env("LLVM_PREFIX", "/usr/lib/llvm-22"),
    )
}

/// Validates the Kubernetes manifests offline against the API's schemas.
fn kubernetes_validate() -> anyhow::Result<()> {
    if run::output(Command::new("kubernetes-validate").arg("--version")).is_some() {
        eprintln!("ok: kubernetes-validate already installed");
        return Ok(());
    }
    eprintln!("installing: kubernetes-validate from PyPI into {VALIDATE_VENV}");
    // Debian's python3 creates virtualenvs only with python3-venv.
    debian_packages(&["python3-venv"])?;
    let venv = Path::new(VALIDATE_VENV);
    run::checked(Command::new("python3").args(["-m", "venv"]).arg(venv))?;
    run::checked(Command::new(venv.join("bin/pip")).args([
        "install",
        "--quiet",
        "kubernetes-validate",
    ]))?;
    let target = venv.join("bin/kubernetes-validate");
    eprintln!("  $ ln -sf {} {VALIDATE_LINK}", target.display());
    let _ = std::fs::remove_file(VALIDATE_LINK);
    std::os::unix::fs::symlink(&target, VALIDATE_LINK)
        .with_context(|| format!("cannot link {VALIDATE_LINK} to {}", target.display()))
}
