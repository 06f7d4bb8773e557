//! What remocal prints on stdout: a `ready` line, and with -v a line per
//! connection and per close. Text for people, JSON lines for scripts.
use remocal_proto::v1::{ConnectionClosed, NewConnection, Ready};
use serde_json::json;

use crate::cli::OutputFormat;

#[derive(Clone, Copy)]
pub struct Printer {
    pub format: OutputFormat,
    pub verbose: bool,
}

impl Printer {
    pub fn ready(&self, mode: &str, ready: &Ready, local: &str) {
        match self.format {
            OutputFormat::Text => println!(
                "ready {mode} {} port={} -> {local} as {}",
                ready.target,
                ready.port,
                if ready.user.is_empty() {
                    "anonymous"
                } else {
                    &ready.user
                }
            ),
            OutputFormat::Json => println!(
                "{}",
                json!({"event": "ready", "mode": mode, "target": ready.target, "port": ready.port,
                       "local": local, "user": ready.user})
            ),
        }
    }

    pub fn connection(&self, connection: &NewConnection) {
        if !self.verbose {
            return;
        }
        match self.format {
            OutputFormat::Text => println!(
                "connection {} {} -> {}",
                connection.connection_id, connection.source, connection.destination
            ),
            OutputFormat::Json => println!(
                "{}",
                json!({"event": "connection", "id": connection.connection_id,
                       "source": connection.source, "destination": connection.destination})
            ),
        }
    }

    pub fn closed(&self, closed: &ConnectionClosed) {
        if !self.verbose {
            return;
        }
        match self.format {
            OutputFormat::Text => {
                let error = if closed.error.is_empty() {
                    String::new()
                } else {
                    format!(" error=\"{}\"", closed.error)
                };
                let stats = closed.stats.as_ref().map_or(String::new(), |stats| {
                    format!(
                        " rtt={}us retransmits={} received={}B acked={}B",
                        stats.srtt_us, stats.retransmits, stats.bytes_received, stats.bytes_acked
                    )
                });
                println!(
                    "closed {} from_remote={}B to_remote={}B{stats}{error}",
                    closed.connection_id, closed.bytes_from_remote, closed.bytes_to_remote
                );
            }
            OutputFormat::Json => println!(
                "{}",
                json!({"event": "closed", "id": closed.connection_id,
                       "bytes_from_remote": closed.bytes_from_remote,
                       "bytes_to_remote": closed.bytes_to_remote, "error": closed.error,
                       "rtt_us": closed.stats.as_ref().map(|s| s.srtt_us),
                       "retransmits": closed.stats.as_ref().map(|s| s.retransmits)})
            ),
        }
    }

    /// Warnings go to stderr in both formats: they are for the person.
    pub fn warning(&self, message: &str) {
        eprintln!("warning: {message}");
    }
}
