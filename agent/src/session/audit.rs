//! Who intercepts what, for the agent's log and the pod's events.
use super::Sessions;
use crate::live_session::LiveSession;

/// Where the caller says it runs (user@host), as shown to others, in the
/// log and in the pod's events: printable and short, whatever was sent.
pub(super) fn self_reported(client: &str) -> String {
    const SHOWN: usize = 128;
    let shown: String = client
        .chars()
        .filter(|c| !c.is_control())
        .take(SHOWN)
        .collect();
    if shown.is_empty() {
        "an unnamed client".to_string()
    } else {
        shown
    }
}

impl Sessions {
    /// Tells whoever looks at the pod (`kubectl describe pod`) who
    /// intercepts it.
    pub(super) fn record(&self, live: &LiveSession, reason: &str, message: String) {
        if let Some(pod) = &live.audit.pod {
            self.pod_events.record(
                pod,
                &format!("Remocal{reason}"),
                format!("{} {message}", live.owner),
            );
        }
    }
}
