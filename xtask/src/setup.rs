//! Installs what the eBPF build needs on a fresh Debian machine, skipping
//! whatever is already there, so it is cheap to run before every test run.
use std::process::Command;

use crate::run;

/// Debian packages the build and the tests use.
const DEBIAN_PACKAGES: &[&str] = &[
    "llvm-22-dev",
    "libpolly-22-dev",
    "libzstd-dev",
    "zlib1g-dev",
    "iproute2",
    "curl",
    "bpftool",
    // Packet loss on the path in the mirror tests (the kernel here has no netem).
    "nftables",
    // The metrics tests scrape the agent with a real Prometheus and promtool.
    "prometheus",
];

pub fn ensure() -> anyhow::Result<()> {
    eprintln!("==> setup");
    nightly_with_rust_src()?;
    debian_packages()?;
    bpf_linker()?;
    kubernetes_validate()
}

/// Validates the Kubernetes manifests offline against the API's schemas.
fn kubernetes_validate() -> anyhow::Result<()> {
    if run::output(Command::new("kubernetes-validate").arg("--version")).is_some() {
        eprintln!("ok: kubernetes-validate");
        return Ok(());
    }
    eprintln!("installing: kubernetes-validate from PyPI (offline manifest validation)");
    run::checked(Command::new("python3").args([
        "-m",
        "pip",
        "install",
        "--quiet",
        "kubernetes-validate",
    ]))
}

fn nightly_with_rust_src() -> anyhow::Result<()> {
    let toolchains =
        run::output(Command::new("rustup").args(["toolchain", "list"])).unwrap_or_default();
    if toolchains.lines().any(|line| line.starts_with("nightly")) {
        eprintln!("ok: nightly toolchain");
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
        eprintln!("ok: rust-src for nightly");
    } else {
        eprintln!("installing: rust-src for nightly (eBPF builds core from source)");
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

fn debian_packages() -> anyhow::Result<()> {
    let missing: Vec<&str> = DEBIAN_PACKAGES
        .iter()
        .copied()
        .filter(|package| !installed(package))
        .collect();
    if missing.is_empty() {
        eprintln!("ok: Debian packages ({})", DEBIAN_PACKAGES.join(" "));
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

fn bpf_linker() -> anyhow::Result<()> {
    if run::output(Command::new("bpf-linker").arg("--version")).is_some() {
        eprintln!("ok: bpf-linker");
        return Ok(());
    }
    eprintln!("installing: bpf-linker built against LLVM 22 (about a minute)");
    run::checked(
        Command::new("cargo")
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
