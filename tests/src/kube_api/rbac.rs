//! Authorization: the same decision for the fake's own requests and for the
//! SubjectAccessReviews it answers, so a test states permissions once.
//!
//! 1. A `forbid` rule refuses first: tests care about the refusals remocal
//!    must explain, so a deny list reads better than roles for those.
//! 2. A `grant` rule allows, with RBAC's reason naming the binding.
//! 3. Without either, API group `remocal.dev` is refused: remocal's own
//!    permissions are opt-in, as a platform team grants them. Everything else
//!    is allowed (tests of other things need no RBAC setup), except for
//!    *strict* subjects, which get only what was granted, as in a real
//!    cluster (tests that check the shipped roles are all a subject needs).
//!
//! A rule's subject is a user name, or `group:NAME` for everyone in a group.

use super::request_info::RequestInfo;

/// Matches every verb, group, resource, or namespace (and the cluster scope).
pub const ANY: &str = "*";
/// The API group whose permissions must be granted.
pub const REMOCAL_GROUP: &str = "remocal.dev";
/// A subject `group:NAME` names a group.
const GROUP_PREFIX: &str = "group:";

struct Rule {
    subject: String,
    verb: String,
    group: String,
    /// `resource` or `resource/subresource`.
    resource: String,
    namespace: String,
    /// `""`: every name.
    name: String,
}

impl Rule {
    fn names(&self, user: &str, groups: &[String]) -> Option<Subject<'_>> {
        match self.subject.strip_prefix(GROUP_PREFIX) {
            Some(group) => groups
                .iter()
                .any(|g| g == group)
                .then_some(Subject::Group(group)),
            None => (self.subject == user).then_some(Subject::User(&self.subject)),
        }
    }

    fn covers(&self, verb: &str, info: &RequestInfo) -> bool {
        let matches = |rule: &str, value: &str| rule == ANY || rule == value;
        matches(&self.verb, verb)
            && matches(&self.group, &info.group)
            && matches(&self.resource, &info.resource_path())
            && (self.name.is_empty() || self.name == info.name)
    }
}

enum Subject<'a> {
    User(&'a str),
    Group(&'a str),
}

/// What the authorizer says: a SubjectAccessReview's status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Decision {
    pub allowed: bool,
    /// An explicit refusal (a `forbid` rule), not just no rule allowing it.
    pub denied: bool,
    pub reason: String,
}

#[derive(Default)]
pub(super) struct Rbac {
    forbidden: Vec<Rule>,
    granted: Vec<Rule>,
    /// Users denied whatever no grant allows.
    strict: Vec<String>,
}

impl Rbac {
    pub fn strict(&mut self, user: &str) {
        self.strict.push(user.to_string());
    }

    /// `namespace` `""` is the cluster scope alone.
    pub fn forbid(&mut self, subject: &str, verb: &str, resource: &str, namespace: &str) {
        self.forbidden.push(Rule {
            subject: subject.to_string(),
            verb: verb.to_string(),
            group: ANY.to_string(),
            resource: resource.to_string(),
            namespace: namespace.to_string(),
            name: String::new(),
        });
    }

    /// `namespace` `""` or [`ANY`] binds cluster-wide (a ClusterRoleBinding:
    /// cluster-scoped resources and every namespace), a name binds in that
    /// namespace (a RoleBinding). Returns the binding's name, which the
    /// reasons of what it allows carry.
    pub fn grant(
        &mut self,
        subject: &str,
        verb: &str,
        group: &str,
        resource: &str,
        namespace: &str,
        name: &str,
    ) -> String {
        self.granted.push(Rule {
            subject: subject.to_string(),
            verb: verb.to_string(),
            group: group.to_string(),
            resource: resource.to_string(),
            namespace: namespace.to_string(),
            name: name.to_string(),
        });
        binding_name(self.granted.len() - 1)
    }

    /// `verb` apart from `info.verb`: a port-forward is checked for two.
    pub fn decide(
        &self,
        user: &str,
        groups: &[String],
        verb: &str,
        info: &RequestInfo,
    ) -> Decision {
        let forbidden = self.forbidden.iter().find(|rule| {
            rule.names(user, groups).is_some()
                && rule.covers(verb, info)
                && (rule.namespace == ANY || rule.namespace == info.namespace)
        });
        if let Some(rule) = forbidden {
            return Decision {
                allowed: false,
                denied: true,
                reason: format!(
                    "forbidden by the test: forbid({:?}, {:?}, {:?}, {:?})",
                    rule.subject, rule.verb, rule.resource, rule.namespace
                ),
            };
        }
        for (index, rule) in self.granted.iter().enumerate() {
            let cluster_wide = rule.namespace.is_empty() || rule.namespace == ANY;
            if !cluster_wide && rule.namespace != info.namespace {
                continue;
            }
            let Some(subject) = rule.names(user, groups) else {
                continue;
            };
            if !rule.covers(verb, info) {
                continue;
            }
            // The RBAC authorizer's reason.
            let binding = binding_name(index);
            let (binding, role) = if cluster_wide {
                (
                    format!("ClusterRoleBinding \"{binding}\""),
                    format!("ClusterRole \"{binding}\""),
                )
            } else {
                (
                    format!("RoleBinding \"{binding}/{}\"", rule.namespace),
                    format!("Role \"{binding}\""),
                )
            };
            let to = match subject {
                Subject::User(name) => format!("User \"{name}\""),
                Subject::Group(name) => format!("Group \"{name}\""),
            };
            return Decision {
                allowed: true,
                denied: false,
                reason: format!("RBAC: allowed by {binding} of {role} to {to}"),
            };
        }
        if info.group == REMOCAL_GROUP || self.strict.iter().any(|strict| strict == user) {
            Decision {
                allowed: false,
                denied: false,
                reason: "no RBAC rule allowed it".to_string(),
            }
        } else {
            Decision {
                allowed: true,
                denied: false,
                reason: "the fake apiserver allows what no rule forbids outside remocal.dev"
                    .to_string(),
            }
        }
    }
}

/// The `n`th grant's binding (and role) name.
fn binding_name(n: usize) -> String {
    format!("fake-grant-{n}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(group: &str, resource: &str, sub: &str, namespace: &str, name: &str) -> RequestInfo {
        RequestInfo {
            verb: "create".into(),
            group: group.into(),
            version: "v1".into(),
            resource: resource.into(),
            subresource: sub.into(),
            namespace: namespace.into(),
            name: name.into(),
        }
    }

    fn allowed(rbac: &Rbac, user: &str, groups: &[&str], info: &RequestInfo) -> bool {
        let groups: Vec<String> = groups.iter().map(|g| g.to_string()).collect();
        rbac.decide(user, &groups, &info.verb, info).allowed
    }

    #[test]
    fn remocal_needs_a_grant_and_forbid_wins() {
        let mut rbac = Rbac::default();
        let steal = info(REMOCAL_GROUP, "pods", "steal", "shop", "web");
        assert!(!allowed(&rbac, "dev", &[], &steal));
        assert!(allowed(
            &rbac,
            "dev",
            &[],
            &info("", "pods", "", "shop", "web")
        ));
        rbac.grant(
            "group:devs",
            "create",
            REMOCAL_GROUP,
            "pods/steal",
            "shop",
            "",
        );
        assert!(allowed(&rbac, "dev", &["devs"], &steal));
        assert!(!allowed(&rbac, "dev", &[], &steal));
        let elsewhere = info(REMOCAL_GROUP, "pods", "steal", "default", "web");
        assert!(!allowed(&rbac, "dev", &["devs"], &elsewhere));
        let mirror = info(REMOCAL_GROUP, "pods", "mirror", "shop", "web");
        assert!(!allowed(&rbac, "dev", &["devs"], &mirror));
        rbac.forbid("dev", ANY, "pods/steal", ANY);
        assert!(!allowed(&rbac, "dev", &["devs"], &steal));
    }

    #[test]
    fn named_grants_cover_one_name() {
        let mut rbac = Rbac::default();
        let binding = rbac.grant(
            "admin",
            "create",
            REMOCAL_GROUP,
            "nodes/targets",
            "",
            "node-a",
        );
        let node = |name| info(REMOCAL_GROUP, "nodes", "targets", "", name);
        let groups = vec![];
        let decision = rbac.decide("admin", &groups, "create", &node("node-a"));
        assert_eq!(
            decision.reason,
            format!(
                "RBAC: allowed by ClusterRoleBinding \"{binding}\" of ClusterRole \"{binding}\" to User \"admin\""
            )
        );
        assert!(!allowed(&rbac, "admin", &[], &node("node-b")));
    }
}
