//! Builds the eBPF object with the nightly toolchain and bpf-linker and puts it
//! in OUT_DIR, so `cargo build` of the agent is the only build step.
use anyhow::Context as _;

fn main() -> anyhow::Result<()> {
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "remocal-ebpf",
            root_dir: "../ebpf",
            ..Default::default()
        }],
        aya_build::Toolchain::Nightly,
    )
    .context("building the eBPF programs failed: run `cargo xtask setup` to install nightly, rust-src and bpf-linker")
}
