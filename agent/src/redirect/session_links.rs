//! The links of the programs only some sessions need. Each classifier runs
//! on every packet that reaches the pod (about 0.35 us a run here), and the
//! flow statistics program on socket events of the whole node, so each is
//! attached only while a session of its kind needs it: a steal attaches the
//! steal classifier; a mirror, the mirror classifier and the statistics
//! program (a stolen connection's statistics come from the agent's own
//! socket). A namespace whose sessions ended runs none of them.
use aya::{
    Ebpf,
    programs::{
        CgroupAttachMode, LinkOrder, SchedClassifier, SockOps, TcAttachType,
        sock_ops::SockOpsLinkId,
        tc::{SchedClassifierLinkId, TcAttachOptions},
    },
};
use remocal_agent_common::{FLOW_PROGRAM, MIRROR_PROGRAM, STEAL_PROGRAM};
use tracing::{debug, warn};

use super::{
    RedirectError,
    ebpf::{PRIVILEGE_HINT, cgroup_root, program},
};
use crate::netns::Netns;

#[derive(Clone, Copy, Debug)]
pub enum SessionKind {
    Steal,
    Mirror,
}

impl SessionKind {
    fn classifier(self) -> &'static str {
        match self {
            SessionKind::Steal => STEAL_PROGRAM,
            SessionKind::Mirror => MIRROR_PROGRAM,
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// What one kind of session has attached.
#[derive(Default)]
struct Links {
    users: usize,
    classifier: Vec<SchedClassifierLinkId>,
    flows: Option<SockOpsLinkId>,
}

pub struct SessionLinks {
    /// Owns every program of the namespace, and through them their links.
    ebpf: Ebpf,
    interfaces: Vec<String>,
    kinds: [Links; 2],
}

impl SessionLinks {
    pub fn new(ebpf: Ebpf, interfaces: Vec<String>) -> Self {
        Self {
            ebpf,
            interfaces,
            kinds: Default::default(),
        }
    }

    /// Counts one more session of `kind`; the first attaches its programs
    /// (the classifier inside `target`, where interface names mean something).
    pub fn acquire(&mut self, kind: SessionKind, target: &Netns) -> Result<(), RedirectError> {
        let index = kind.index();
        if self.kinds[index].users == 0 {
            let (ebpf, interfaces) = (&mut self.ebpf, &self.interfaces);
            let classifier = target
                .run_in(|| attach_classifier(ebpf, kind.classifier(), interfaces))
                .map_err(|err| RedirectError::kernel(format!("entering {target} failed"), err))??;
            let flows = match kind {
                SessionKind::Steal => None,
                SessionKind::Mirror => match attach_flows(&mut self.ebpf) {
                    Ok(link) => Some(link),
                    Err(err) => {
                        detach_classifier(&mut self.ebpf, kind.classifier(), classifier);
                        return Err(err);
                    }
                },
            };
            self.kinds[index].classifier = classifier;
            self.kinds[index].flows = flows;
            debug!(%target, ?kind, "programs attached");
        }
        self.kinds[index].users += 1;
        Ok(())
    }

    /// Counts one session of `kind` less; the last detaches its programs.
    pub fn release(&mut self, kind: SessionKind) {
        let links = &mut self.kinds[kind.index()];
        links.users = links.users.saturating_sub(1);
        if links.users > 0 {
            return;
        }
        let classifier = std::mem::take(&mut links.classifier);
        let flows = links.flows.take();
        detach_classifier(&mut self.ebpf, kind.classifier(), classifier);
        if let Some(link) = flows
            && let Ok(program) = program::<SockOps>(&mut self.ebpf, FLOW_PROGRAM)
            && let Err(err) = program.detach(link)
        {
            warn!(program = FLOW_PROGRAM, %err, "detaching failed");
        }
    }
}

fn attach_classifier(
    ebpf: &mut Ebpf,
    name: &str,
    interfaces: &[String],
) -> Result<Vec<SchedClassifierLinkId>, RedirectError> {
    let mut links = Vec::with_capacity(interfaces.len());
    for interface in interfaces {
        let attached = program::<SchedClassifier>(ebpf, name)?.attach_with_options(
            interface,
            TcAttachType::Ingress,
            TcAttachOptions::TcxOrder(LinkOrder::default()),
        );
        match attached {
            Ok(link) => links.push(link),
            Err(err) => {
                // All interfaces or none: a half-attached classifier would
                // act on some paths to the pod only.
                detach_classifier(ebpf, name, links);
                return Err(RedirectError::kernel(
                    format!("attaching {name} to {interface} with tcx failed ({PRIVILEGE_HINT})"),
                    err,
                ));
            }
        }
    }
    Ok(links)
}

fn detach_classifier(ebpf: &mut Ebpf, name: &str, links: Vec<SchedClassifierLinkId>) {
    let Ok(program) = program::<SchedClassifier>(ebpf, name) else {
        return;
    };
    for link in links {
        if let Err(err) = program.detach(link) {
            warn!(program = name, %err, "detaching failed");
        }
    }
}

/// The statistics program goes on the root of the cgroup v2 hierarchy: the
/// pod's cgroup is known only for pod targets; the namespace cookie keeps
/// the program to the target.
fn attach_flows(ebpf: &mut Ebpf) -> Result<SockOpsLinkId, RedirectError> {
    let cgroup = cgroup_root()?;
    program::<SockOps>(ebpf, FLOW_PROGRAM)?
        .attach(&cgroup, CgroupAttachMode::Single)
        .map_err(|err| {
            RedirectError::kernel(
                "attaching the flow statistics program to the cgroup root failed",
                err,
            )
        })
}
