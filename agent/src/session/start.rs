//! What a session start checks before it claims anything, in the order
//! that reveals nothing: a well-formed request, then RBAC, then the limits,
//! and only then the target itself.
use std::{sync::Arc, time::Duration};

use remocal_proto::v1::{Mode, OpenSession, target};

use super::{OpenError, Sessions, blocking, limits::Slot};
use crate::{
    auth::{Access, AuthMode, Identity},
    http_route::Filter,
    kube::{PodLookupError, ScheduledPod, is_object_name},
    netns::{Netns, TargetError, TargetSpec},
    reset_existing,
};

/// Opening a target's namespace file must never hold a session start for long.
const OPEN_TIMEOUT: Duration = Duration::from_secs(5);

/// What a session start resolved, before it claims anything.
pub(super) struct Started {
    pub(super) open: OpenSession,
    pub(super) mode: Mode,
    pub(super) port: u16,
    pub(super) netns: Netns,
    pub(super) pod: Option<ScheduledPod>,
    pub(super) slot: Slot,
    /// A filtered steal's filter, compiled.
    pub(super) filter: Option<Arc<Filter>>,
    /// With --reset-existing: how long busy connections are retried.
    pub(super) reset_deadline: Option<Duration>,
}

impl Sessions {
    /// Everything a session start checks and resolves before it claims
    /// anything. Authorization comes first: a caller without the grant
    /// learns nothing about the target (whether it exists, who holds it).
    pub(super) async fn start(
        self: &Arc<Self>,
        open: OpenSession,
        identity: &Identity,
    ) -> Result<Started, OpenError> {
        let mode = Mode::try_from(open.mode)
            .ok()
            .filter(|mode| *mode != Mode::Unspecified)
            .ok_or(OpenError::UnsupportedMode(open.mode))?;
        let port = u16::try_from(open.port)
            .ok()
            .filter(|port| *port != 0)
            .ok_or(OpenError::InvalidPort(open.port))?;
        if open.filter.is_some() && mode == Mode::Mirror {
            return Err(OpenError::FilterOnMirror);
        }
        let reset_deadline = match &open.reset_existing {
            None => None,
            Some(_) if mode == Mode::Mirror => return Err(OpenError::ResetOnMirror),
            Some(reset) => Some(reset_deadline(reset.deadline_ms)?),
        };
        let kind = open
            .target
            .as_ref()
            .and_then(|target| target.kind.clone())
            .ok_or(OpenError::MissingTarget)?;
        if let target::Kind::Pod(named) = &kind
            && !(is_object_name(&named.name)
                && (named.namespace.is_empty() || is_object_name(&named.namespace)))
        {
            return Err(OpenError::InvalidPodName(format!(
                "{}/{}",
                named.namespace, named.name
            )));
        }
        if self.auth.mode() == AuthMode::Kubernetes {
            let access = self.access(&kind, mode, open.filter.is_some())?;
            self.auth.authorize(identity, &access).await?;
            // Ending the pod's connections disturbs every client of the pod
            // once: a grant of its own, which operators may withhold.
            if reset_deadline.is_some()
                && let Access::Pod {
                    namespace, name, ..
                } = access
            {
                let reset = Access::Pod {
                    namespace,
                    name,
                    subresource: "reset-connections",
                };
                self.auth.authorize(identity, &reset).await?;
            }
        }
        // Compiling takes up to a few tens of milliseconds for a hostile
        // pattern: only for authorized callers, and off the runtime.
        let filter = match open.filter.clone() {
            None => None,
            Some(spec) => Some(Arc::new(blocking(move || Filter::compile(&spec)).await?)),
        };
        let slot = self.take_slot(identity)?;
        let mut pod = None;
        let spec = match kind {
            target::Kind::NetnsPath(path) if !path.is_empty() => TargetSpec::Path(path),
            target::Kind::Pid(pid) if pid != 0 => TargetSpec::Pid(pid),
            target::Kind::PodUid(uid) if !uid.is_empty() => TargetSpec::PodUid(uid),
            target::Kind::Pod(named) if !named.name.is_empty() => {
                let found = self
                    .pods
                    .find(pod_namespace(&named.namespace), &named.name)
                    .await?;
                pod = Some(found.clone());
                TargetSpec::Pod(found)
            }
            _ => return Err(OpenError::MissingTarget),
        };
        let shown = spec.to_string();
        let netns = tokio::time::timeout(OPEN_TIMEOUT, blocking(move || Netns::open(&spec)))
            .await
            .map_err(|_| TargetError::Timeout(shown))??;
        Ok(Started {
            open,
            mode,
            port,
            netns,
            pod,
            slot,
            filter,
            reset_deadline,
        })
    }

    /// What RBAC must allow for a session on this target.
    fn access(&self, kind: &target::Kind, mode: Mode, filtered: bool) -> Result<Access, OpenError> {
        Ok(match kind {
            target::Kind::Pod(named) => Access::Pod {
                namespace: pod_namespace(&named.namespace).to_string(),
                name: named.name.clone(),
                subresource: match mode {
                    Mode::Mirror => "mirror",
                    Mode::Steal if filtered => "steal-filtered",
                    Mode::Steal => "steal",
                    Mode::Unspecified => return Err(OpenError::UnsupportedMode(mode as i32)),
                },
            },
            target::Kind::NetnsPath(_) | target::Kind::Pid(_) | target::Kind::PodUid(_) => {
                Access::Node {
                    node: self
                        .pods
                        .node()
                        .ok_or(PodLookupError::NoNodeName)?
                        .to_string(),
                }
            }
        })
    }
}

/// The client's deadline for busy connections (0: the default).
fn reset_deadline(deadline_ms: u32) -> Result<Duration, OpenError> {
    let deadline = match deadline_ms {
        0 => reset_existing::DEFAULT_DEADLINE,
        ms => Duration::from_millis(ms.into()),
    };
    if deadline > reset_existing::MAX_DEADLINE {
        return Err(OpenError::ResetDeadline(deadline_ms));
    }
    Ok(deadline)
}

/// A pod named without a namespace is in `default`, as kubectl has it.
fn pod_namespace(namespace: &str) -> &str {
    if namespace.is_empty() {
        "default"
    } else {
        namespace
    }
}
