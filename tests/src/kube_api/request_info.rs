//! What a request asks for, in the terms the apiserver authorizes it with
//! (apiserver's `RequestInfoFactory`): verb, API group, resource, subresource,
//! namespace and name. Authorization and the recorded request log both need
//! these before any handler runs, exactly as in the real server.

use axum::http::Method;

#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct RequestInfo {
    /// `get`, `list`, `watch`, `create`, ... (what RBAC rules name).
    pub verb: String,
    /// `""` for the core group.
    pub group: String,
    pub version: String,
    pub resource: String,
    pub subresource: String,
    /// `""` when the request is not namespaced (cluster scope).
    pub namespace: String,
    /// `""` for collections.
    pub name: String,
}

impl RequestInfo {
    /// `pods` or `pods/portforward`, as RBAC rules and forbidden messages say it.
    pub fn resource_path(&self) -> String {
        if self.subresource.is_empty() {
            self.resource.clone()
        } else {
            format!("{}/{}", self.resource, self.subresource)
        }
    }
}

/// The decoded query, in order; empty pairs (kube writes `?&ports=...`) dropped.
pub(super) fn query_pairs(query: Option<&str>) -> Vec<(String, String)> {
    form_urlencoded::parse(query.unwrap_or("").as_bytes())
        .filter(|(key, _)| !key.is_empty())
        .map(|(key, value)| (key.into_owned(), value.into_owned()))
        .collect()
}

pub(super) fn query_value<'a>(pairs: &'a [(String, String)], key: &str) -> Option<&'a str> {
    pairs
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
}

/// The verb a non-resource request (`/version`, `/healthz`) is authorized with.
pub(super) fn non_resource_verb(method: &Method) -> String {
    method.as_str().to_ascii_lowercase()
}

/// `None` for paths outside `/api/v1` and `/apis/GROUP/VERSION`.
pub(super) fn parse(
    method: &Method,
    path: &str,
    query: &[(String, String)],
) -> Option<RequestInfo> {
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (group, version, rest) = match parts.as_slice() {
        ["api", version, rest @ ..] => ("", *version, rest),
        ["apis", group, version, rest @ ..] => (*group, *version, rest),
        _ => return None,
    };
    let (namespace, rest) = match rest {
        // `/api/v1/namespaces/NS` is the namespace object itself.
        ["namespaces", ns, rest @ ..] if !rest.is_empty() => (*ns, rest),
        _ => ("", rest),
    };
    let (resource, name, subresource) = match rest {
        [resource] => (*resource, "", ""),
        [resource, name] => (*resource, *name, ""),
        [resource, name, sub] => (*resource, *name, *sub),
        _ => return None,
    };
    if resource.is_empty() {
        return None;
    }
    let watching = matches!(query_value(query, "watch"), Some("true" | "1"));
    let verb = match (method.as_str(), name.is_empty()) {
        ("GET" | "HEAD", true) if watching => "watch".to_string(),
        ("GET" | "HEAD", true) => "list".to_string(),
        ("GET" | "HEAD", false) => "get".to_string(),
        ("POST", _) => "create".to_string(),
        ("PUT", _) => "update".to_string(),
        ("PATCH", _) => "patch".to_string(),
        ("DELETE", true) => "deletecollection".to_string(),
        ("DELETE", false) => "delete".to_string(),
        (other, _) => other.to_ascii_lowercase(),
    };
    Some(RequestInfo {
        verb,
        group: group.to_string(),
        version: version.to_string(),
        resource: resource.to_string(),
        subresource: subresource.to_string(),
        namespace: namespace.to_string(),
        name: name.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(method: Method, path: &str, query: &str) -> Option<RequestInfo> {
        parse(&method, path, &query_pairs(Some(query)))
    }

    #[test]
    fn core_and_group_paths() {
        let pod = info(Method::GET, "/api/v1/namespaces/default/pods/web", "").unwrap();
        assert_eq!(
            (
                pod.verb.as_str(),
                pod.group.as_str(),
                pod.namespace.as_str(),
                pod.name.as_str()
            ),
            ("get", "", "default", "web")
        );
        let all = info(Method::GET, "/api/v1/pods", "&labelSelector=a%3Db").unwrap();
        assert_eq!((all.verb.as_str(), all.namespace.as_str()), ("list", ""));
        let deploy = info(
            Method::GET,
            "/apis/apps/v1/namespaces/ns/deployments/web",
            "",
        )
        .unwrap();
        assert_eq!(deploy.resource_path(), "deployments");
        assert_eq!(deploy.group, "apps");
        let pf = info(
            Method::GET,
            "/api/v1/namespaces/ns/pods/p/portforward",
            "&ports=1",
        )
        .unwrap();
        assert_eq!(pf.resource_path(), "pods/portforward");
        let watch = info(Method::GET, "/api/v1/namespaces/ns/pods", "watch=true").unwrap();
        assert_eq!(watch.verb, "watch");
        let namespace = info(Method::GET, "/api/v1/namespaces/ns", "").unwrap();
        assert_eq!(
            (namespace.resource.as_str(), namespace.name.as_str()),
            ("namespaces", "ns")
        );
    }

    #[test]
    fn non_resource_paths() {
        assert_eq!(info(Method::GET, "/version", ""), None);
        assert_eq!(info(Method::GET, "/", ""), None);
        assert_eq!(info(Method::GET, "/api/v1/a/b/c/d", ""), None);
    }

    #[test]
    fn query_drops_empty_pairs_and_decodes() {
        assert_eq!(
            query_pairs(Some("&ports=80%2C1234")),
            vec![("ports".to_string(), "80,1234".to_string())]
        );
    }
}
