//! The tcx links of the two classifiers of a target namespace. Each runs on
//! every packet that reaches the pod (about 0.35 us a run here), so each is
//! attached only while a session of its kind needs it: a namespace with only
//! a steal pays for one classifier, not two, and one whose sessions ended
//! pays for none.
use aya::{
    Ebpf,
    programs::{
        LinkOrder, SchedClassifier, TcAttachType,
        tc::{SchedClassifierLinkId, TcAttachOptions},
    },
};
use remocal_agent_common::{MIRROR_PROGRAM, STEAL_PROGRAM};
use tracing::{debug, warn};

use super::{
    RedirectError,
    ebpf::{PRIVILEGE_HINT, program},
};
use crate::netns::Netns;

#[derive(Clone, Copy, Debug)]
pub enum Classifier {
    Steal,
    Mirror,
}

impl Classifier {
    fn program(self) -> &'static str {
        match self {
            Classifier::Steal => STEAL_PROGRAM,
            Classifier::Mirror => MIRROR_PROGRAM,
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

pub struct Classifiers {
    /// Owns every program of the namespace, and through them their links.
    ebpf: Ebpf,
    interfaces: Vec<String>,
    /// Per classifier: the sessions using it, and its links while attached.
    users: [usize; 2],
    links: [Vec<SchedClassifierLinkId>; 2],
}

impl Classifiers {
    pub fn new(ebpf: Ebpf, interfaces: Vec<String>) -> Self {
        Self {
            ebpf,
            interfaces,
            users: [0; 2],
            links: [Vec::new(), Vec::new()],
        }
    }

    /// Counts one more user; the first attaches the classifier to every
    /// interface (inside `target`, where the interface names mean something).
    pub fn acquire(&mut self, which: Classifier, target: &Netns) -> Result<(), RedirectError> {
        let index = which.index();
        if self.users[index] == 0 {
            let (ebpf, interfaces) = (&mut self.ebpf, &self.interfaces);
            self.links[index] = target
                .run_in(|| attach(ebpf, which.program(), interfaces))
                .map_err(|err| RedirectError::kernel(format!("entering {target} failed"), err))??;
            debug!(%target, classifier = which.program(), "attached");
        }
        self.users[index] += 1;
        Ok(())
    }

    /// Counts one user less; the last detaches the classifier.
    pub fn release(&mut self, which: Classifier) {
        let index = which.index();
        self.users[index] = self.users[index].saturating_sub(1);
        if self.users[index] == 0 {
            let links = std::mem::take(&mut self.links[index]);
            detach(&mut self.ebpf, which.program(), links);
        }
    }
}

fn attach(
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
                // steal on some paths to the pod only.
                detach(ebpf, name, links);
                return Err(RedirectError::kernel(
                    format!("attaching {name} to {interface} with tcx failed ({PRIVILEGE_HINT})"),
                    err,
                ));
            }
        }
    }
    Ok(links)
}

fn detach(ebpf: &mut Ebpf, name: &str, links: Vec<SchedClassifierLinkId>) {
    let Ok(program) = program::<SchedClassifier>(ebpf, name) else {
        return;
    };
    for link in links {
        if let Err(err) = program.detach(link) {
            warn!(classifier = name, %err, "detaching failed");
        }
    }
}
