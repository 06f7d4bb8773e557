//! What remocal prints on stdout: a `ready` line, and with -v a line per
//! connection and per close. Text for people, JSON lines for scripts.
use remocal_proto::v1::{ConnectionClosed, NewConnection, Ready, ResetProgress};
use serde_json::json;

use crate::{cli::OutputFormat, filter};

#[derive(Clone, Copy)]
pub struct Printer {
    pub format: OutputFormat,
    pub verbose: bool,
}

impl Printer {
    pub fn ready(&self, mode: &str, ready: &Ready, local: &str) {
        println!("{}", self.ready_line(mode, ready, local));
    }

    /// A filtered steal names its filter as the agent applies it (the flags
    /// that give it), and a steal with --reset-existing how many of the
    /// pod's connections it ended, before the local side:
    /// `ready steal pod shop/web port=80 requests matching --header 'x-dev: alice' reset: ended=2 waiting=1 -> 127.0.0.1:8080 as alice`.
    fn ready_line(&self, mode: &str, ready: &Ready, local: &str) -> String {
        match self.format {
            OutputFormat::Text => {
                let filter = ready.filter.as_ref().map_or(String::new(), |filter| {
                    format!(
                        " requests matching {}",
                        remocal_proto::filter::describe(filter)
                    )
                });
                let reset = ready.reset.as_ref().map_or(String::new(), |reset| {
                    format!(" reset: {}", reset_counts(reset))
                });
                let user = if ready.user.is_empty() {
                    "anonymous"
                } else {
                    &ready.user
                };
                format!(
                    "ready {mode} {} port={}{filter}{reset} -> {local} as {user}",
                    ready.target, ready.port
                )
            }
            OutputFormat::Json => json!({"event": "ready", "mode": mode, "target": ready.target,
                   "port": ready.port, "local": local, "user": ready.user,
                   "filter": ready.filter.as_ref().map(filter::to_json),
                   "reset": ready.reset.as_ref().map(reset_json)})
            .to_string(),
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

    /// How ending the pod's existing connections goes, after `ready`:
    /// `reset ended=3 waiting=1`, and last `reset ended=4 waiting=0 done`.
    pub fn reset(&self, progress: &ResetProgress) {
        match self.format {
            OutputFormat::Text => println!("reset {}", reset_counts(progress)),
            OutputFormat::Json => {
                let mut line = reset_json(progress);
                line["event"] = json!("reset");
                println!("{line}");
            }
        }
    }

    /// Warnings go to stderr in both formats: they are for the person.
    pub fn warning(&self, message: &str) {
        eprintln!("warning: {message}");
    }
}

/// Columns aligned as kubectl aligns them: two spaces apart, each as wide
/// as its widest cell, no trailing blanks.
pub fn print_table(header: &[&str], rows: &[Vec<String>]) {
    let header: Vec<String> = header.iter().map(|title| title.to_string()).collect();
    let mut widths: Vec<usize> = header.iter().map(String::len).collect();
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    for row in std::iter::once(&header).chain(rows) {
        let line: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(cell, width)| format!("{cell:width$}"))
            .collect();
        println!("{}", line.join("  ").trim_end());
    }
}

fn reset_counts(progress: &ResetProgress) -> String {
    let done = if progress.done { " done" } else { "" };
    format!(
        "ended={} waiting={}{done}",
        progress.ended, progress.waiting
    )
}

fn reset_json(progress: &ResetProgress) -> serde_json::Value {
    json!({"ended": progress.ended, "waiting": progress.waiting, "done": progress.done})
}

#[cfg(test)]
mod tests;
