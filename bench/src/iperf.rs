//! Single-stream iperf3 runs from the node namespace (the servers are
//! [`crate::server_process::ServerProcess::iperf`]).

use std::net::SocketAddr;

use anyhow::{Context as _, bail};
use remocal_tests::netns::Netns;
use serde::Serialize;

#[derive(Clone, Copy, Debug, Serialize)]
pub struct Stream {
    pub bytes: u64,
    pub seconds: f64,
    pub gbit_per_second: f64,
}

/// Which way the bytes flow, seen from the pod.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    /// Node → pod (the pod, or the stolen local server, receives).
    IntoPod,
    /// Pod → node (`iperf3 --reverse`).
    OutOfPod,
}

/// One TCP stream of `bytes` from `from` to `server`.
pub async fn stream(
    from: &Netns,
    server: SocketAddr,
    bytes: u64,
    direction: Direction,
) -> anyhow::Result<Stream> {
    let mut command = from.tokio_command("iperf3");
    command.args([
        "--client",
        &server.ip().to_string(),
        "--port",
        &server.port().to_string(),
        "--bytes",
        &bytes.to_string(),
        "--json",
    ]);
    if direction == Direction::OutOfPod {
        command.arg("--reverse");
    }
    let output = command.output().await.context("cannot run iperf3")?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    let report: serde_json::Value = serde_json::from_str(&stdout)
        .with_context(|| format!("iperf3 printed no JSON report: {stdout}"))?;
    if let Some(error) = report.get("error").and_then(|e| e.as_str()) {
        bail!("iperf3 to {server} failed: {error}");
    }
    parse(&report).with_context(|| format!("unexpected iperf3 report: {stdout}"))
}

/// The receiver's view: what arrived, not what was handed to the kernel.
fn parse(report: &serde_json::Value) -> anyhow::Result<Stream> {
    let received = &report["end"]["sum_received"];
    let (Some(bytes), Some(seconds), Some(bits)) = (
        received["bytes"].as_u64(),
        received["seconds"].as_f64(),
        received["bits_per_second"].as_f64(),
    ) else {
        bail!("no end.sum_received");
    };
    Ok(Stream {
        bytes,
        seconds,
        gbit_per_second: bits / 1e9,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_what_the_receiver_got() {
        let report = serde_json::json!({"end": {"sum_received":
            {"bytes": 1073741824u64, "seconds": 0.5, "bits_per_second": 17179869184.0}}});
        let stream = parse(&report).unwrap();
        assert_eq!(stream.bytes, 1 << 30);
        assert!((stream.gbit_per_second - 17.18).abs() < 0.01);
    }
}
