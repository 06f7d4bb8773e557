//! `remocal-bench`: what remocal costs, measured against going direct on the
//! same simulated node in one run: the same namespaces, the same server
//! programs and the same load generators (wrk, iperf3) on both sides of every
//! ratio.
//!
//! Run through `cargo xtask bench` (release build) or `cargo xtask bench --quick`.
//! It needs root (namespaces, eBPF) and `wrk`, `iperf3` and `ss` on PATH.
mod agent_metrics;
mod bed;
mod chart;
mod iperf;
mod measure;
mod polling_client;
mod probe;
mod process_memory;
mod profile;
mod program_run_time;
mod relay;
mod report;
mod request_run;
mod server_process;
mod wrk;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Parser, Subcommand};

use crate::profile::Profile;

#[derive(Parser)]
#[command(about = "remocal's overhead, stolen vs direct, side by side on one simulated node")]
struct Options {
    /// A short run (under 2 minutes) that proves every measurement works; its
    /// figures are rough.
    #[arg(long)]
    quick: bool,
    /// Where results.json and latency.svg go.
    #[arg(long, value_name = "DIR", default_value = "target/bench")]
    out: PathBuf,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// The HTTP server both sides run (started by the benchmark itself).
    #[command(hide = true)]
    ServeHttp {
        #[arg(long)]
        listen: SocketAddr,
        #[arg(long)]
        body: String,
    },
    /// The plain TCP relay of the floor measurement (started by the
    /// benchmark itself).
    #[command(hide = true)]
    Relay {
        #[arg(long)]
        listen: SocketAddr,
        #[arg(long)]
        to: SocketAddr,
        /// Listen in this network namespace; the process stays in its own.
        #[arg(long, value_name = "PATH")]
        listen_netns: Option<PathBuf>,
        /// Bytes each direction reads at once.
        #[arg(long, default_value_t = relay::DEFAULT_BUFFER)]
        buffer: usize,
    },
    /// Sets up the bed and sends wrk's keep-alive load along one path of the
    /// filtered-steal measurement for a while, printing first the pid of the
    /// process on that path (the agent, or the relay): for profiling it
    /// (`perf record -p PID`, `perf trace -s -p PID`).
    #[command(hide = true)]
    Load {
        #[arg(long, value_enum)]
        path: measure::filtered::LoadPath,
        #[arg(long, default_value_t = 20)]
        seconds: u64,
        /// The keep-alive probe (one connection, latency) instead of wrk.
        #[arg(long)]
        probe: bool,
    },
}

/// Errors end as one `error:` line: they are about the machine, not a bug.
fn main() -> ExitCode {
    let options = Options::parse();
    let result = match options.command {
        Some(Command::ServeHttp { listen, body }) => server_process::serve_http(listen, body),
        Some(Command::Relay {
            listen,
            to,
            listen_netns,
            buffer,
        }) => relay::run(listen, to, listen_netns.as_deref(), buffer),
        Some(Command::Load {
            path,
            seconds,
            probe,
        }) => load(path, seconds, probe),
        None => run(options.quick, &options.out),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(quick: bool, out: &Path) -> anyhow::Result<()> {
    let profile = if quick { Profile::QUICK } else { Profile::FULL };
    require_binaries()?;
    raise_fd_limit();
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    let runtime = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
    let results = runtime.block_on(measure::all(&profile))?;
    let targets = report::targets(&results);
    print!("{}", report::table(&results, &targets));
    let json = out.join("results.json");
    let document = serde_json::json!({ "results": results, "targets": targets });
    std::fs::write(&json, serde_json::to_string_pretty(&document)? + "\n")
        .with_context(|| format!("cannot write {}", json.display()))?;
    let svg = out.join("latency.svg");
    std::fs::write(
        &svg,
        chart::latency(&results.latency.direct, &results.latency.stolen),
    )
    .with_context(|| format!("cannot write {}", svg.display()))?;
    println!("wrote {} and {}", json.display(), svg.display());
    Ok(())
}

fn load(path: measure::filtered::LoadPath, seconds: u64, probe: bool) -> anyhow::Result<()> {
    require_binaries()?;
    raise_fd_limit();
    let runtime = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
    let duration = std::time::Duration::from_secs(seconds);
    let run = runtime.block_on(measure::filtered::load(path, duration, probe))?;
    println!(
        "{:.0} requests/s over {} connections, {} errors",
        run.requests_per_second, run.connections, run.errors
    );
    if probe {
        for p in [50.0, 90.0, 99.0, 99.9, 100.0] {
            println!("p{p} {:.0} us", run.percentile(p));
        }
    }
    Ok(())
}

/// The shared test helpers panic on a missing binary; run directly, the
/// benchmark says so up front as an error instead.
fn require_binaries() -> anyhow::Result<()> {
    for name in ["remocal-agent", "remocal"] {
        remocal_tests::processes::built_binary(name).map_err(anyhow::Error::msg)?;
    }
    Ok(())
}

/// Held connections need a descriptor each here, and the agent and the
/// client inherit the limit.
fn raise_fd_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    if let Ok((_, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
    }
}
