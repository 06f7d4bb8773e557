//! Who intercepts what, for the agent's log and the pod's events.
use remocal_proto::v1::Mode;

use super::{LiveSession, Sessions};
use crate::kube::ScheduledPod;

/// What a session does, for the agent's log and the pod's events.
pub(super) struct Audit {
    pub(super) target: String,
    pub(super) port: u16,
    pub(super) mode: Mode,
    /// Where the owner runs, as they said (user@host).
    pub(super) client: String,
    pub(super) pod: Option<ScheduledPod>,
}

impl Audit {
    pub(super) fn doing(&self) -> String {
        let verb = if self.mode == Mode::Mirror {
            "mirroring"
        } else {
            "stealing"
        };
        format!(
            "{verb} port {} with remocal (from {})",
            self.port, self.client
        )
    }
}

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
