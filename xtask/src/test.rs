//! The one test command, for developers and CI alike.
use std::{
    io::{BufRead as _, BufReader},
    num::NonZero,
    process::ExitStatus,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
};

use anyhow::{Context as _, bail};

use crate::{bench, demo, run, setup};

#[derive(clap::Args)]
pub struct Options {
    /// Keep every core busy with a CPU hog while the tests run, as on a loaded
    /// CI runner: a test that relies on timing fails here first.
    #[arg(long)]
    stress: bool,
    /// Extra arguments for the test binaries (after `--`).
    #[arg(last = true)]
    test_args: Vec<String>,
}

pub fn run(options: &Options) -> anyhow::Result<()> {
    run::require_root(
        "cargo xtask test",
        "its end-to-end tests (network namespaces and eBPF)",
    )?;
    setup::ensure()?;
    eprintln!("==> build");
    run::build_binaries()?;
    eprintln!("==> demo (smoke: the README's first command keeps working)");
    demo::smoke()?;
    eprintln!("==> unit and end-to-end tests");
    let (status, totals) = {
        let _hog = options.stress.then(CpuHog::start);
        cargo_test(&options.test_args)?
    };
    // Every failure, then one closing line for the whole run: cargo prints its
    // failures and a result line per test binary, scattered over a long log.
    for failure in &totals.failures {
        println!("FAILED {failure}");
    }
    println!("tests: {} passed, {} failed", totals.passed, totals.failed);
    if !status.success() || totals.failed > 0 {
        bail!("tests failed ({status})");
    }
    if totals.passed == 0 {
        bail!("no test ran");
    }
    eprintln!("==> benchmark smoke (--quick on debug binaries: checks it runs, not its figures)");
    bench::smoke()
}

/// Every test binary, even after one fails, with cargo's stdout and stderr in
/// one pipe: the `Running` lines (stderr) that name each binary then come in
/// order with its tests' results (stdout).
fn cargo_test(test_args: &[String]) -> anyhow::Result<(ExitStatus, Totals)> {
    let mut cargo = run::cargo();
    cargo
        .args([
            "test",
            "--workspace",
            "--exclude",
            "remocal-ebpf",
            "--no-fail-fast",
            "--",
        ])
        .args(test_args);
    eprintln!("  $ {}", run::describe(&cargo));
    let (output, writer) = std::io::pipe().context("cannot create a pipe for cargo test")?;
    let mut child = cargo
        .stdout(writer.try_clone().context("cannot duplicate a pipe")?)
        .stderr(writer)
        .spawn()
        .context("cannot run cargo test")?;
    // The command holds the pipe's write end: reading would never see its end.
    drop(cargo);
    let totals = tally(output);
    let status = child.wait().context("cannot wait for cargo test")?;
    Ok((status, totals))
}

#[derive(Default)]
struct Totals {
    passed: u64,
    failed: u64,
    /// `binary::test` for each failed test, in the order they failed.
    failures: Vec<String>,
}

/// Echoes cargo test's output, adds up its `test result:` lines and notes
/// each failed test under the binary that ran it. A binary that ends without
/// a result line (it crashed) counts as one failure.
fn tally(output: impl std::io::Read) -> Totals {
    let mut totals = Totals::default();
    let mut binary = String::new();
    let mut unfinished = false;
    for line in BufReader::new(output).lines().map_while(Result::ok) {
        println!("{line}");
        if let Some(next) = binary_name(&line) {
            if unfinished {
                totals.crashed(&binary);
            }
            binary = next.to_string();
            unfinished = true;
        } else if let Some(result) = line.strip_prefix("test result: ") {
            unfinished = false;
            totals.passed += count(result, " passed");
            totals.failed += count(result, " failed");
        } else if let Some(test) = line
            .strip_prefix("test ")
            .and_then(|rest| rest.strip_suffix(" ... FAILED"))
        {
            totals.failures.push(format!("{binary}::{test}"));
        }
    }
    if unfinished {
        totals.crashed(&binary);
    }
    totals
}

impl Totals {
    fn crashed(&mut self, binary: &str) {
        self.failed += 1;
        self.failures
            .push(format!("{binary} (ended without a test result)"));
    }
}

/// The test binary a cargo line starts: `metrics` from
/// `Running tests/metrics.rs (target/debug/deps/metrics-0123abcd)`, the
/// crate from `Doc-tests remocal_proto`.
fn binary_name(line: &str) -> Option<&str> {
    let line = line.trim_start();
    if let Some(krate) = line.strip_prefix("Doc-tests ") {
        return Some(krate.trim());
    }
    let path = line
        .strip_prefix("Running ")?
        .rsplit_once('(')?
        .1
        .strip_suffix(')')?;
    let file = path.rsplit('/').next()?;
    Some(file.rsplit_once('-').map_or(file, |(name, _hash)| name))
}

/// The number before `label` in "ok. 9 passed; 0 failed; ...".
fn count(result: &str, label: &str) -> u64 {
    result
        .split(';')
        .find_map(|part| {
            part.trim()
                .trim_start_matches("ok. ")
                .trim_start_matches("FAILED. ")
                .strip_suffix(label)
        })
        .and_then(|number| number.trim().parse().ok())
        .unwrap_or(0)
}

/// One busy thread per core, at normal priority, until dropped (so also when
/// the tests fail or xtask errors out): the tests contend for every core.
struct CpuHog {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl CpuHog {
    fn start() -> Self {
        let cores = std::thread::available_parallelism().map_or(1, NonZero::get);
        eprintln!("==> stress: {cores} busy threads for the duration of the tests");
        let stop = Arc::new(AtomicBool::new(false));
        let threads = (0..cores)
            .map(|_| {
                let stop = stop.clone();
                std::thread::spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        std::hint::spin_loop();
                    }
                })
            })
            .collect();
        Self { stop, threads }
    }
}

impl Drop for CpuHog {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adds_up_every_test_binary() {
        let output = "running 2 tests\ntest result: ok. 9 passed; 0 failed; 0 ignored\n\
                      test result: FAILED. 3 passed; 2 failed; 0 ignored\n";
        let totals = tally(output.as_bytes());
        assert_eq!((totals.passed, totals.failed), (12, 2));
    }

    #[test]
    fn names_each_failed_test_with_its_binary() {
        let output = "Running unittests src/lib.rs (target/debug/deps/remocal_agent-0a1b)\n\
                      test tests::quick ... ok\n\
                      test tests::slow ... FAILED\n\
                      test result: FAILED. 1 passed; 1 failed; 0 ignored\n\
                      Running tests/metrics.rs (target/debug/deps/metrics-2c3d)\n\
                      test counts ... FAILED\n\
                      test result: FAILED. 0 passed; 1 failed; 0 ignored\n\
                      Doc-tests remocal_proto\n\
                      test result: ok. 0 passed; 0 failed; 0 ignored\n";
        let totals = tally(output.as_bytes());
        assert_eq!(
            totals.failures,
            ["remocal_agent::tests::slow", "metrics::counts"]
        );
        assert_eq!((totals.passed, totals.failed), (1, 2));
    }

    #[test]
    fn a_binary_without_a_result_line_failed() {
        let output = "Running tests/crash.rs (target/debug/deps/crash-4e5f)\n\
                      running 1 test\n\
                      error: test failed, to rerun pass `--test crash`\n";
        let totals = tally(output.as_bytes());
        assert_eq!(totals.failures, ["crash (ended without a test result)"]);
        assert_eq!(totals.failed, 1);
    }
}
