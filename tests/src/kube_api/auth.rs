//! Bearer-token authentication and deny rules. Everything an authenticated user
//! asks is allowed unless a test forbade it: tests only care about the refusals
//! remocal must explain, so a deny list reads better than full RBAC.

use std::collections::{HashMap, HashSet};

use axum::http::{HeaderMap, header};

use super::request_info::RequestInfo;

/// Matches every verb, or every namespace and the cluster scope.
pub const ANY: &str = "*";

#[derive(Default)]
pub(super) struct Policy {
    /// token -> user name
    users: HashMap<String, String>,
    /// (user, verb, resource[/subresource], namespace)
    denied: HashSet<(String, String, String, String)>,
}

impl Policy {
    pub fn add_user(&mut self, token: &str, user: &str) {
        self.users.insert(token.to_string(), user.to_string());
    }

    pub fn forbid(&mut self, user: &str, verb: &str, resource: &str, namespace: &str) {
        self.denied.insert((
            user.to_string(),
            verb.to_string(),
            resource.to_string(),
            namespace.to_string(),
        ));
    }

    /// The user behind `Authorization: Bearer TOKEN`; `None` means 401, as a
    /// token the apiserver does not know never falls back to anonymous.
    pub fn authenticate(&self, headers: &HeaderMap) -> Option<String> {
        let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
        let (scheme, token) = value.split_once(' ')?;
        if !scheme.eq_ignore_ascii_case("bearer") {
            return None;
        }
        self.users.get(token.trim()).cloned()
    }

    /// `Err(reason)` carries the authorizer's text for the forbidden message.
    pub fn authorize(&self, user: &str, verb: &str, info: &RequestInfo) -> Result<(), String> {
        let resource = info.resource_path();
        let denied = |v: &str, ns: &str| {
            self.denied.contains(&(
                user.to_string(),
                v.to_string(),
                resource.clone(),
                ns.to_string(),
            ))
        };
        let refused = [verb, ANY]
            .iter()
            .any(|v| denied(v, &info.namespace) || denied(v, ANY));
        if !refused {
            return Ok(());
        }
        // apiserver's `forbiddenMessage`.
        let scope = if info.namespace.is_empty() {
            "at the cluster scope".to_string()
        } else {
            format!("in the namespace \"{}\"", info.namespace)
        };
        Err(format!(
            "User \"{user}\" cannot {verb} resource \"{resource}\" in API group \"{}\" {scope}",
            info.group
        ))
    }
}
