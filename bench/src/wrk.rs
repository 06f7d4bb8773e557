//! wrk, run from the node namespace for the rate of new connections and of
//! requests on keep-alive connections, with a Lua `done` hook that prints its
//! figures as parseable lines.

use std::time::Duration;

use anyhow::{Context as _, bail};
use remocal_tests::netns::Netns;

use crate::request_run::{PERCENTILES, RequestRun};

const REPORT_SCRIPT: &str = r#"
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("remocal-bench requests %d\n", summary.requests))
  io.write(string.format("remocal-bench errors %d\n",
    e.connect + e.read + e.write + e.status + e.timeout))
  io.write(string.format("remocal-bench duration_us %d\n", summary.duration))
  for _, p in ipairs({PERCENTILE_LIST}) do
    local us = latency:percentile(p)
    if p == 0 then us = latency.min elseif p == 100 then us = latency.max end
    io.write(string.format("remocal-bench latency %g %d\n", p, us))
  end
end
"#;

/// wrk against `url` from `from` for `duration`, one request per connection
/// (`Connection: close`), `connections` at a time spread over `threads`.
pub async fn new_connections(
    from: &Netns,
    url: &str,
    threads: u32,
    connections: u32,
    duration: Duration,
) -> anyhow::Result<RequestRun> {
    let close = ["Connection: close"];
    run(from, url, threads, connections, duration, &close).await
}

/// wrk against `url` from `from` for `duration`, `connections` keep-alive
/// connections spread over `threads`, each request carrying `headers`
/// (`name: value`). Its latency figures are kept but not reported: see
/// `probe` for why.
pub async fn keep_alive(
    from: &Netns,
    url: &str,
    threads: u32,
    connections: u32,
    duration: Duration,
    headers: &[&str],
) -> anyhow::Result<RequestRun> {
    run(from, url, threads, connections, duration, headers).await
}

async fn run(
    from: &Netns,
    url: &str,
    threads: u32,
    connections: u32,
    duration: Duration,
    headers: &[&str],
) -> anyhow::Result<RequestRun> {
    let script = script_file()?;
    let mut command = from.tokio_command("wrk");
    command
        .arg(format!("--threads={threads}"))
        .arg(format!("--connections={connections}"))
        .arg(format!("--duration={}s", duration.as_secs().max(1)))
        .arg("--timeout=5s")
        .arg("--script")
        .arg(script.path());
    for header in headers {
        command.arg("--header").arg(header);
    }
    command.arg(url);
    let output = command
        .output()
        .await
        .context("cannot run wrk (install it: apt-get install wrk, or run `cargo xtask setup`)")?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        bail!(
            "wrk against {url} failed ({}): {}{}",
            output.status,
            stdout.trim(),
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    parse(&stdout, connections).with_context(|| format!("unexpected wrk output:\n{stdout}"))
}

fn parse(stdout: &str, connections: u32) -> anyhow::Result<RequestRun> {
    let mut requests = None;
    let mut errors = None;
    let mut duration_us = None;
    let mut latency_us = Vec::new();
    for line in stdout.lines() {
        let mut words = line.split_whitespace();
        if words.next() != Some("remocal-bench") {
            continue;
        }
        match (words.next(), words.next(), words.next()) {
            (Some("requests"), Some(n), None) => requests = Some(n.parse::<u64>()?),
            (Some("errors"), Some(n), None) => errors = Some(n.parse::<u64>()?),
            (Some("duration_us"), Some(n), None) => duration_us = Some(n.parse::<f64>()?),
            (Some("latency"), Some(p), Some(us)) => {
                latency_us.push((p.parse::<f64>()?, us.parse::<f64>()?))
            }
            _ => bail!("unknown line {line:?}"),
        }
    }
    let (Some(requests), Some(errors), Some(duration_us)) = (requests, errors, duration_us) else {
        bail!("the report script printed no summary");
    };
    if requests == 0 {
        bail!("no request completed");
    }
    Ok(RequestRun {
        connections,
        requests,
        errors,
        requests_per_second: requests as f64 / (duration_us / 1e6),
        latency_us,
    })
}

/// The report script, written where wrk can read it; removed on drop.
struct ScriptFile(std::path::PathBuf);

impl ScriptFile {
    fn path(&self) -> &std::path::Path {
        &self.0
    }
}

impl Drop for ScriptFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn script_file() -> anyhow::Result<ScriptFile> {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let list = PERCENTILES
        .iter()
        .map(|p| p.to_string())
        .collect::<Vec<_>>()
        .join(", ");
    let path = std::env::temp_dir().join(format!(
        "remocal-bench-{}-{}.lua",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::write(&path, REPORT_SCRIPT.replace("PERCENTILE_LIST", &list))
        .with_context(|| format!("cannot write {}", path.display()))?;
    Ok(ScriptFile(path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_report_lines_and_ignores_wrks_own() {
        let stdout = "Running 1s test @ http://x/\n  1 threads and 1 connections\n\
                      remocal-bench requests 2000\nremocal-bench errors 1\n\
                      remocal-bench duration_us 2000000\nremocal-bench latency 50 31\n\
                      remocal-bench latency 99.9 240\n";
        let run = parse(stdout, 1).unwrap();
        assert_eq!((run.requests, run.errors), (2000, 1));
        assert_eq!(run.requests_per_second, 1000.0);
        assert_eq!(run.percentile(99.9), 240.0);
    }

    #[test]
    fn a_run_without_requests_is_an_error() {
        let stdout =
            "remocal-bench requests 0\nremocal-bench errors 9\nremocal-bench duration_us 1\n";
        assert!(parse(stdout, 1).is_err());
    }
}
