//! The agent's `/metrics`, read the way a scraper without OpenMetrics reads
//! it (the classic text format). Unlike the test harness's reader, a failure
//! is an error to report, not a panic: the benchmark checks the agent's
//! counts against what it sent and says whether they agree.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context as _, bail};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio::time::timeout;

/// The whole `/metrics` page.
pub async fn page(addr: SocketAddr) -> anyhow::Result<String> {
    let read = async {
        let mut stream = TcpStream::connect(addr).await?;
        stream
            .write_all(b"GET /metrics HTTP/1.0\r\nHost: agent\r\n\r\n")
            .await?;
        let mut response = String::new();
        stream.read_to_string(&mut response).await?;
        anyhow::Ok(response)
    };
    let response = timeout(Duration::from_secs(5), read)
        .await
        .context("no answer within 5 s")?
        .with_context(|| format!("cannot read the agent's metrics at {addr}"))?;
    let Some((status, _)) = response.split_once("\r\n") else {
        bail!("the agent's metrics answer is not HTTP: {response:?}");
    };
    if !status.contains(" 200") {
        bail!("the agent's metrics answered {status:?}");
    }
    Ok(response)
}

/// The value of one sample (`name{labels}` exactly as exposed); 0 when
/// absent: a counter nothing incremented yet is not listed.
pub fn sample(page: &str, sample: &str) -> anyhow::Result<f64> {
    match page
        .lines()
        .find_map(|line| line.strip_prefix(sample)?.strip_prefix(' '))
    {
        // A timestamp may follow the value.
        Some(rest) => {
            let value = rest.split_whitespace().next().unwrap_or_default();
            value
                .parse()
                .with_context(|| format!("{sample} has the value {value:?}"))
        }
        None => Ok(0.0),
    }
}

#[cfg(test)]
mod tests {
    use super::sample;

    #[test]
    fn reads_a_labelled_sample_and_treats_an_absent_one_as_zero() {
        let page = "# TYPE remocal_routed_requests counter\n\
                    remocal_routed_requests_total{route=\"pod\"} 1200\n\
                    remocal_routed_requests_total{route=\"session\"} 7 1700000000\n";
        let of = |name| sample(page, name).unwrap();
        assert_eq!(of("remocal_routed_requests_total{route=\"pod\"}"), 1200.0);
        assert_eq!(of("remocal_routed_requests_total{route=\"session\"}"), 7.0);
        assert_eq!(of("remocal_sessions_active{mode=\"steal\"}"), 0.0);
    }
}
