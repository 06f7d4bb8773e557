//! Project automation: `cargo xtask setup | test | demo | bench`.
mod bench;
mod demo;
mod demo_http;
mod run;
mod setup;
mod test;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "remocal's setup, tests, demo and benchmarks")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Install what building remocal needs (idempotent: skips what is present).
    Setup,
    /// Set up if needed, build, and run every unit and end-to-end test (as root).
    Test(test::Options),
    /// Show a steal end to end on a simulated node in network namespaces (as root).
    Demo(demo::Options),
    /// Measure remocal against going direct, side by side (release build, as root).
    Bench(bench::Options),
    /// The demo's tiny HTTP server (started by `demo` inside and outside the pod).
    #[command(hide = true)]
    DemoHttp(demo_http::Options),
}

/// Errors end as one `error:` line, without the backtrace anyhow would add
/// under `RUST_BACKTRACE=1`: they are about the environment, not a bug here.
fn main() -> ExitCode {
    run::put_cargo_bin_on_path();
    run::remember_xtask_exe();
    let result = match Cli::parse().command {
        Command::Setup => setup::ensure(),
        Command::Test(options) => test::run(&options),
        Command::Demo(options) => demo::run(&options),
        Command::Bench(options) => bench::run(&options),
        Command::DemoHttp(options) => demo_http::serve(&options),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}
