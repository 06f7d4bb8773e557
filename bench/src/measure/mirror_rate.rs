//! The highest rate at which the mirror still hands the local process an exact
//! copy: a paced sender in the node writes a known byte sequence to a sink in
//! the pod; the local server checks every byte of its copy and the count.
//! A copy cannot slow the sender, so past some rate the capture overruns and
//! remocal cuts the copy (by design); this finds where.

use std::io::Write as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use serde::Serialize;
use tokio::io::AsyncReadExt as _;
use tokio::sync::mpsc;

use remocal_tests::processes::Client;

use crate::bed::{Bed, MIRROR_PORT};
use crate::profile::Profile;

/// Bytes written per send call.
const CHUNK: usize = 256 << 10;

#[derive(Serialize)]
pub struct MirrorRate {
    pub steps: Vec<Step>,
    /// The fastest step whose copy was exact, in GB/s (10^9 bytes).
    pub best_exact_gbyte_per_second: Option<f64>,
}

#[derive(Serialize)]
pub struct Step {
    /// What the sender was paced to; None: as fast as it could.
    pub paced_gbit_per_second: Option<f64>,
    pub sent_gbyte_per_second: f64,
    pub bytes_sent: u64,
    pub bytes_copied: u64,
    pub exact: bool,
    /// Why remocal cut the copy off, as it told the developer: the copy fell
    /// behind (CPU or link too slow) or the capture ring overran.
    pub cut_because: Option<String>,
}

/// What the local server saw of one mirrored connection.
struct Copy {
    bytes: u64,
    intact: bool,
}

pub async fn measure(bed: &Bed, profile: &Profile) -> anyhow::Result<MirrorRate> {
    let sequence = Arc::new(Sequence::new());
    let (copies_tx, mut copies) = mpsc::unbounded_channel();
    let checker = sequence.clone();
    let local = remocal_tests::servers::TcpServer::local(move |stream| {
        check_copy(stream, checker.clone(), copies_tx.clone())
    });
    let mut session = bed.mirror(MIRROR_PORT, local.port()).start().await;
    let mut steps = Vec::new();
    let mut failure = None;
    for &gbit in profile.mirror_rates_gbit {
        let paced = (gbit > 0.0).then_some(gbit);
        match step(
            bed,
            &session,
            &sequence,
            &mut copies,
            paced,
            profile.mirror_bytes,
        )
        .await
        {
            Ok(step) => steps.push(step),
            Err(err) => {
                failure = Some(err);
                break;
            }
        }
    }
    session.stop().await;
    if let Some(err) = failure {
        return Err(err);
    }
    let best = steps
        .iter()
        .filter(|step| step.exact)
        .map(|step| step.sent_gbyte_per_second)
        .max_by(f64::total_cmp);
    Ok(MirrorRate {
        steps,
        best_exact_gbyte_per_second: best,
    })
}

async fn step(
    bed: &Bed,
    session: &Client,
    sequence: &Arc<Sequence>,
    copies: &mut mpsc::UnboundedReceiver<Copy>,
    paced_gbit: Option<f64>,
    bytes: u64,
) -> anyhow::Result<Step> {
    // A copy that came after an earlier step gave up on it is not this one's.
    while copies.try_recv().is_ok() {}
    let warnings_before = session.stderr().len();
    let socket = bed.node().tcp_sockets(1, false).pop().context("a socket")?;
    let stream = socket
        .connect(bed.pod_addr(MIRROR_PORT))
        .await
        .context("connect to the pod's sink")?
        .into_std()?;
    stream.set_nonblocking(false)?;
    let sequence = sequence.clone();
    let seconds = tokio::task::spawn_blocking(move || send(stream, &sequence, bytes, paced_gbit))
        .await
        .context("the sender died")??;
    // The copy trails the original; a cut copy ends early, a skipped one never comes.
    let wait = Duration::from_secs(10);
    let copy = tokio::time::timeout(wait, copies.recv()).await;
    let (bytes_copied, exact) = match copy {
        Ok(Some(copy)) => (copy.bytes, copy.intact && copy.bytes == bytes),
        _ => (0, false),
    };
    // The text before `warnings_before` is unchanged: stderr only grows.
    let warnings = session.stderr();
    let cut_because = (!exact)
        .then(|| cut_reason(warnings.get(warnings_before..).unwrap_or("")))
        .flatten();
    Ok(Step {
        paced_gbit_per_second: paced_gbit,
        sent_gbyte_per_second: bytes as f64 / seconds / 1e9,
        bytes_sent: bytes,
        bytes_copied,
        exact,
        cut_because,
    })
}

/// The reason in remocal's first "cut off" warning, up to its explanation.
fn cut_reason(warnings: &str) -> Option<String> {
    let line = warnings
        .lines()
        .find(|line| line.contains("was cut off: "))?;
    let reason = line.split_once("was cut off: ")?.1;
    let end = [reason.find(" ("), reason.find(';')]
        .into_iter()
        .flatten()
        .min()
        .unwrap_or(reason.len());
    Some(reason[..end].to_string())
}

/// Writes `bytes` of the sequence, sleeping whenever it is ahead of the pace,
/// then closes; returns the seconds it took.
fn send(
    mut stream: std::net::TcpStream,
    sequence: &Sequence,
    bytes: u64,
    paced_gbit: Option<f64>,
) -> anyhow::Result<f64> {
    let started = Instant::now();
    let mut sent = 0u64;
    while sent < bytes {
        let len = CHUNK.min((bytes - sent) as usize);
        stream
            .write_all(sequence.at(sent, len))
            .context("send to the pod's sink")?;
        sent += len as u64;
        if let Some(gbit) = paced_gbit {
            let due = Duration::from_secs_f64(sent as f64 * 8.0 / (gbit * 1e9));
            if let Some(ahead) = due.checked_sub(started.elapsed()) {
                std::thread::sleep(ahead);
            }
        }
    }
    stream.shutdown(std::net::Shutdown::Write)?;
    let seconds = started.elapsed().as_secs_f64();
    if seconds == 0.0 {
        bail!("the send took no time");
    }
    Ok(seconds)
}

async fn check_copy(
    mut stream: tokio::net::TcpStream,
    sequence: Arc<Sequence>,
    copies: mpsc::UnboundedSender<Copy>,
) {
    let mut buffer = vec![0u8; 1 << 20];
    let (mut bytes, mut intact) = (0u64, true);
    loop {
        match stream.read(&mut buffer).await {
            Ok(0) => break,
            Ok(n) => {
                intact &= buffer[..n] == *sequence.at(bytes, n);
                bytes += n as u64;
            }
            Err(_) => {
                intact = false;
                break;
            }
        }
    }
    let _ = copies.send(Copy { bytes, intact });
}

/// A repeating pseudo-random byte sequence whose period (1 MiB + 7) is not a
/// multiple of any chunk or segment size, so a lost, repeated or shifted
/// chunk shows as a mismatch; a lost whole period shows in the count.
struct Sequence {
    /// Two periods back to back: any window up to one period is contiguous.
    doubled: Vec<u8>,
}

const PERIOD: usize = (1 << 20) + 7;

impl Sequence {
    fn new() -> Sequence {
        let mut state = 0x5eed_u64;
        let period: Vec<u8> = (0..PERIOD)
            .map(|_| {
                state = remocal_tests::data::splitmix64(state);
                state as u8
            })
            .collect();
        Sequence {
            doubled: [period.as_slice(), period.as_slice()].concat(),
        }
    }

    /// `len` (at most one period) bytes from stream offset `offset`.
    fn at(&self, offset: u64, len: usize) -> &[u8] {
        let start = (offset % PERIOD as u64) as usize;
        &self.doubled[start..start + len.min(PERIOD)]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cut_is_explained_by_the_first_warning() {
        let warnings = "ready\nwarning: connection 4 was cut off: the copy fell 33554432 bytes \
            behind the original (the local process ...); this ...\nwarning: connection 6 was cut \
            off: part of this connection was not captured (the capture buffer overran)\n";
        assert_eq!(
            cut_reason(warnings).as_deref(),
            Some("the copy fell 33554432 bytes behind the original")
        );
        assert_eq!(cut_reason("ready\n"), None);
    }

    #[test]
    fn windows_continue_across_the_period() {
        let sequence = Sequence::new();
        let whole: Vec<u8> = [sequence.at(0, PERIOD), sequence.at(PERIOD as u64, 100)].concat();
        assert_eq!(
            &whole[PERIOD - 50..PERIOD + 50],
            sequence.at(PERIOD as u64 - 50, 100)
        );
        assert_ne!(sequence.at(0, 64), sequence.at(CHUNK as u64, 64));
    }
}
