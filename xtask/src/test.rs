//! The one test command, for developers and CI alike.
use std::{
    io::{BufRead as _, BufReader},
    process::Stdio,
};

use anyhow::{Context as _, bail};

use crate::{bench, demo, run, setup};

pub fn run(test_args: &[String]) -> anyhow::Result<()> {
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
    let mut child = cargo
        .stdout(Stdio::piped())
        .spawn()
        .context("cannot run cargo test")?;
    let totals = tally(child.stdout.take().context("cargo test's stdout")?);
    let status = child.wait().context("cannot wait for cargo test")?;
    // One closing line for the whole run: cargo prints one per test binary.
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

#[derive(Default)]
struct Totals {
    passed: u64,
    failed: u64,
}

/// Echoes cargo test's output and adds up its `test result:` lines.
fn tally(stdout: impl std::io::Read) -> Totals {
    let mut totals = Totals::default();
    for line in BufReader::new(stdout).lines().map_while(Result::ok) {
        println!("{line}");
        if let Some(result) = line.strip_prefix("test result: ") {
            totals.passed += count(result, " passed");
            totals.failed += count(result, " failed");
        }
    }
    totals
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
}
