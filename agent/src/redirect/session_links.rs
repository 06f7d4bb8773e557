//! The links of the programs only some sessions need. Each classifier runs
//! on every packet that reaches the pod (about 0.35 us a run here), and the
//! flow statistics program on socket events of the whole node, so each is
//! attached only while a session of its kind needs it: a steal attaches the
//! steal classifier; a mirror, the mirror classifier, the classifier that
//! reports the pod's resets (on egress) and the statistics program (a stolen
//! connection's statistics come from the agent's own socket). A namespace
//! whose sessions ended runs none of them.
use aya::{
    Ebpf,
    programs::{
        CgroupAttachMode, LinkOrder, SchedClassifier, SockOps, TcAttachType,
        sock_ops::SockOpsLinkId,
        tc::{SchedClassifierLinkId, TcAttachOptions},
    },
};
use remocal_agent_common::{FLOW_PROGRAM, MIRROR_PROGRAM, MIRROR_RESET_PROGRAM, STEAL_PROGRAM};
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

/// A classifier and where it goes on each of the pod's interfaces.
type Classifier = (&'static str, TcAttachType);

impl SessionKind {
    fn classifiers(self) -> &'static [Classifier] {
        match self {
            SessionKind::Steal => &[(STEAL_PROGRAM, TcAttachType::Ingress)],
            SessionKind::Mirror => &[
                (MIRROR_PROGRAM, TcAttachType::Ingress),
                (MIRROR_RESET_PROGRAM, TcAttachType::Egress),
            ],
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
    classifiers: Vec<(&'static str, SchedClassifierLinkId)>,
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
            let classifiers = target
                .run_in(|| attach_classifiers(ebpf, kind.classifiers(), interfaces))
                .map_err(|err| RedirectError::kernel(format!("entering {target} failed"), err))??;
            let flows = match kind {
                SessionKind::Steal => None,
                SessionKind::Mirror => match attach_flows(&mut self.ebpf) {
                    Ok(link) => Some(link),
                    Err(err) => {
                        detach_classifiers(&mut self.ebpf, classifiers);
                        return Err(err);
                    }
                },
            };
            self.kinds[index].classifiers = classifiers;
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
        let classifiers = std::mem::take(&mut links.classifiers);
        let flows = links.flows.take();
        detach_classifiers(&mut self.ebpf, classifiers);
        if let Some(link) = flows
            && let Ok(program) = program::<SockOps>(&mut self.ebpf, FLOW_PROGRAM)
            && let Err(err) = program.detach(link)
        {
            warn!(program = FLOW_PROGRAM, %err, "detaching failed");
        }
    }
}

/// Every classifier on every interface, or none: a half-attached set would
/// act on some paths to the pod only.
fn attach_classifiers(
    ebpf: &mut Ebpf,
    classifiers: &[Classifier],
    interfaces: &[String],
) -> Result<Vec<(&'static str, SchedClassifierLinkId)>, RedirectError> {
    let mut links = Vec::with_capacity(classifiers.len() * interfaces.len());
    for &(name, direction) in classifiers {
        for interface in interfaces {
            match attach_classifier(ebpf, name, interface, direction) {
                Ok(link) => links.push((name, link)),
                Err(err) => {
                    detach_classifiers(ebpf, links);
                    return Err(err);
                }
            }
        }
    }
    Ok(links)
}

fn attach_classifier(
    ebpf: &mut Ebpf,
    name: &str,
    interface: &str,
    direction: TcAttachType,
) -> Result<SchedClassifierLinkId, RedirectError> {
    program::<SchedClassifier>(ebpf, name)?
        .attach_with_options(
            interface,
            direction,
            TcAttachOptions::TcxOrder(LinkOrder::default()),
        )
        .map_err(|err| {
            RedirectError::kernel(
                format!("attaching {name} to {interface} with tcx failed ({PRIVILEGE_HINT})"),
                err,
            )
        })
}

fn detach_classifiers(ebpf: &mut Ebpf, links: Vec<(&'static str, SchedClassifierLinkId)>) {
    for (name, link) in links {
        let Ok(program) = program::<SchedClassifier>(ebpf, name) else {
            continue;
        };
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
