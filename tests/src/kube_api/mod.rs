//! An in-process fake Kubernetes API server for tests without a cluster.
//!
//! It answers the requests remocal's client and agent make through the `kube`
//! crate with the JSON a real apiserver sends (objects from `k8s-openapi`,
//! `meta/v1 Status` errors with the real messages), authenticates bearer tokens,
//! refuses what a test forbade, and forwards `pods/portforward` WebSockets to
//! real TCP servers. HTTPS (HTTP/1.1) on 127.0.0.1 as a real apiserver serves it:
//! each fake makes its own cluster CA and a serving certificate for `127.0.0.1`
//! and `localhost`, and its kubeconfigs carry that CA, so kube's TLS (rustls,
//! certificate and address verification) is exercised as against a cluster.
//!
//! ```ignore
//! let api = FakeKubeApi::start().await;
//! api.add_user("dev-token", "developer");
//! api.upsert_pod(kube_api::pod("default", "web").node("node-a").running().ready(true).build());
//! let kubeconfig = api.kubeconfig("test", "dev-token", Some("default"));
//! ```

mod auth;
mod objects;
mod port_forward;
mod request_info;
mod selectors;
mod status;
mod tls;

use std::collections::BTreeMap;
use std::fs;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use axum::Router;
use axum::extract::{Request, State};
use axum::http::{Method, StatusCode};
use axum::response::Response;
use base64::prelude::{BASE64_STANDARD, Engine as _};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ListMeta, ObjectMeta};
use k8s_openapi::{List, ListableResource, Metadata};
use tokio::net::TcpListener;
use tokio::sync::watch;

pub use auth::ANY;
pub use objects::{
    AGENT_LABEL, AGENT_NAMESPACE, GRPC_PORT_ANNOTATION, Phase, PodBuilder, agent_pod, container_id,
    deployment, fresh_uid, pod,
};

use request_info::RequestInfo;
use selectors::{Selectable, Selector};

/// Recorded for requests without a valid token.
pub const UNAUTHENTICATED: &str = "<unauthenticated>";

/// A running fake apiserver; it stops (listener, connections, port-forwards) on drop.
pub struct FakeKubeApi {
    addr: SocketAddr,
    state: Arc<Mutex<Cluster>>,
    /// Dropping it tells the server and every port-forward to stop.
    _shutdown: watch::Sender<()>,
    /// The cluster CA that signed the serving certificate, PEM.
    ca_pem: String,
    kubeconfigs: tempfile::TempDir,
    next_kubeconfig: AtomicU64,
}

/// What the fake stores and has seen. Never locked across an await.
#[derive(Default)]
struct Cluster {
    policy: auth::Policy,
    pods: BTreeMap<(String, String), Pod>,
    deployments: BTreeMap<(String, String), Deployment>,
    requests: Vec<String>,
    resource_version: u64,
}

#[derive(Clone)]
struct Shared {
    state: Arc<Mutex<Cluster>>,
    shutdown: watch::Receiver<()>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Cluster> {
        lock(&self.state)
    }
}

/// A test that panicked while holding the lock must not hide its own failure
/// behind a poisoned-lock panic from the server.
fn lock(state: &Mutex<Cluster>) -> MutexGuard<'_, Cluster> {
    state
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl FakeKubeApi {
    /// Serves HTTPS on 127.0.0.1 (an ephemeral port) from a task of the current
    /// runtime, with a CA and serving certificate made for this server alone.
    pub async fn start() -> FakeKubeApi {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the fake apiserver on 127.0.0.1");
        let addr = listener.local_addr().expect("fake apiserver address");
        let pki = tls::Pki::generate();
        let listener = tls::TlsListener::new(listener, pki.acceptor);
        let state = Arc::new(Mutex::new(Cluster::default()));
        let (shutdown_tx, shutdown) = watch::channel(());
        let app = Router::new().fallback(handle).with_state(Shared {
            state: state.clone(),
            shutdown: shutdown.clone(),
        });
        let mut stop = shutdown.clone();
        tokio::spawn(async move {
            let server = axum::serve(listener, app).with_graceful_shutdown(async move {
                let _ = stop.changed().await;
            });
            if let Err(e) = server.await {
                eprintln!("fake apiserver on {addr}: {e}");
            }
        });
        FakeKubeApi {
            addr,
            state,
            _shutdown: shutdown_tx,
            ca_pem: pki.ca_pem,
            kubeconfigs: tempfile::tempdir().expect("temporary directory for kubeconfigs"),
            next_kubeconfig: AtomicU64::new(0),
        }
    }

    /// `https://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("https://{}", self.addr)
    }

    /// The CA certificate (PEM) a client must trust to reach this server; the
    /// serving certificate names `127.0.0.1` and `localhost`.
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Writes a new kubeconfig (removed on drop) whose current context is
    /// `context`: this server as cluster, a user with bearer token `token`, and
    /// `namespace` as the context's namespace if given. The cluster entry has
    /// `server: https://127.0.0.1:PORT` and this server's CA as
    /// `certificate-authority-data`, as `kubeadm` writes it.
    pub fn kubeconfig(&self, context: &str, token: &str, namespace: Option<&str>) -> PathBuf {
        let user = format!("{context}-user");
        let mut context_body = serde_json::json!({ "cluster": "fake-kube-api", "user": user });
        if let Some(namespace) = namespace {
            context_body["namespace"] = namespace.into();
        }
        let config = serde_json::json!({
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{
                "name": "fake-kube-api",
                "cluster": {
                    "server": self.url(),
                    "certificate-authority-data": BASE64_STANDARD.encode(&self.ca_pem),
                },
            }],
            "users": [{ "name": user, "user": { "token": token } }],
            "contexts": [{ "name": context, "context": context_body }],
            "current-context": context,
        });
        let n = self.next_kubeconfig.fetch_add(1, Ordering::Relaxed);
        let path = self.kubeconfigs.path().join(format!("kubeconfig-{n}"));
        let yaml = serde_yaml::to_string(&config).expect("kubeconfig as YAML");
        fs::write(&path, yaml).expect("write kubeconfig");
        path
    }

    pub fn add_user(&self, token: &str, user_name: &str) {
        lock(&self.state).policy.add_user(token, user_name);
    }

    /// Refuses `verb` on `resource` (`pods`, `pods/portforward`, `deployments`) in
    /// `namespace` ("" is the cluster scope) to `user_name`; [`ANY`] for verb or
    /// namespace matches them all.
    pub fn forbid(&self, user_name: &str, verb: &str, resource: &str, namespace: &str) {
        lock(&self.state)
            .policy
            .forbid(user_name, verb, resource, namespace);
    }

    /// Stores the pod (namespace "default" if unset), filling in uid and
    /// creationTimestamp if missing and giving it a new resourceVersion.
    pub fn upsert_pod(&self, pod: impl Into<Pod>) {
        let mut pod = pod.into();
        let mut cluster = lock(&self.state);
        let key = cluster.stamp(&mut pod.metadata);
        cluster.pods.insert(key, pod);
    }

    pub fn remove_pod(&self, namespace: &str, name: &str) {
        let mut cluster = lock(&self.state);
        cluster.resource_version += 1;
        cluster
            .pods
            .remove(&(namespace.to_string(), name.to_string()));
    }

    pub fn upsert_deployment(&self, deployment: impl Into<Deployment>) {
        let mut deployment = deployment.into();
        let mut cluster = lock(&self.state);
        let key = cluster.stamp(&mut deployment.metadata);
        cluster.deployments.insert(key, deployment);
    }

    /// Every request so far as `USER VERB PATH[?QUERY]`, the query decoded and
    /// without kube's empty leading pair, e.g.
    /// `developer list /api/v1/namespaces/default/pods?labelSelector=app=web`.
    /// Port-forwards are recorded with the verb they are authorized with, `create`.
    pub fn requests(&self) -> Vec<String> {
        lock(&self.state).requests.clone()
    }
}

impl Cluster {
    fn stamp(&mut self, metadata: &mut ObjectMeta) -> (String, String) {
        self.resource_version += 1;
        let namespace = metadata
            .namespace
            .get_or_insert_with(|| "default".to_string())
            .clone();
        let name = metadata.name.clone().unwrap_or_default();
        metadata.uid.get_or_insert_with(fresh_uid);
        metadata.creation_timestamp.get_or_insert_with(objects::now);
        metadata.resource_version = Some(self.resource_version.to_string());
        (namespace, name)
    }
}

async fn handle(State(shared): State<Shared>, mut request: Request) -> Response {
    let method = request.method().clone();
    let path = request.uri().path().to_string();
    let query = request_info::query_pairs(request.uri().query());
    let info = request_info::parse(&method, &path, &query);
    let mut cluster = shared.lock();
    let user = cluster.policy.authenticate(request.headers());

    // kube sends the port-forward as a WebSocket GET, but Kubernetes authorizes
    // it as `create` on pods/portforward (and checks `get` first, as for any GET).
    let is_port_forward = info.as_ref().is_some_and(|i| {
        i.resource == "pods" && i.subresource == "portforward" && method == Method::GET
    });
    let verb = match &info {
        Some(_) if is_port_forward => "create".to_string(),
        Some(info) => info.verb.clone(),
        None => request_info::non_resource_verb(&method),
    };
    let pairs: Vec<String> = query.iter().map(|(k, v)| format!("{k}={v}")).collect();
    let shown_query = if pairs.is_empty() {
        String::new()
    } else {
        format!("?{}", pairs.join("&"))
    };
    cluster.requests.push(format!(
        "{} {verb} {path}{shown_query}",
        user.as_deref().unwrap_or(UNAUTHENTICATED)
    ));

    let Some(user) = user else {
        return status::unauthorized();
    };
    let Some(info) = info else {
        return status::no_such_path();
    };
    let verbs: &[&str] = if is_port_forward {
        &["get", "create"]
    } else {
        &[&info.verb]
    };
    for verb in verbs {
        if let Err(reason) = cluster.policy.authorize(&user, verb, &info) {
            return status::forbidden(&info.group, &info.resource, &info.name, &reason);
        }
    }

    match (
        info.group.as_str(),
        info.version.as_str(),
        info.resource.as_str(),
    ) {
        ("", "v1", "pods") => match (info.verb.as_str(), info.subresource.as_str()) {
            ("get", "") => get(&cluster.pods, &info),
            ("list", "") => list(
                cluster.pods.values(),
                &info,
                &query,
                cluster.resource_version,
            ),
            ("get", "portforward") => {
                let Some(pod) = cluster
                    .pods
                    .get(&(info.namespace.clone(), info.name.clone()))
                else {
                    return status::not_found("", "pods", &info.name);
                };
                let pod = pod.clone();
                drop(cluster);
                port_forward::upgrade(&pod, &query, &mut request, shared.shutdown.clone())
            }
            (_, "") => status::method_not_allowed(),
            _ => status::no_such_path(),
        },
        ("apps", "v1", "deployments") if info.subresource.is_empty() => match info.verb.as_str() {
            "get" => get(&cluster.deployments, &info),
            "list" => list(
                cluster.deployments.values(),
                &info,
                &query,
                cluster.resource_version,
            ),
            _ => status::method_not_allowed(),
        },
        _ => status::no_such_path(),
    }
}

fn get<T: serde::Serialize>(
    objects: &BTreeMap<(String, String), T>,
    info: &RequestInfo,
) -> Response {
    match objects.get(&(info.namespace.clone(), info.name.clone())) {
        Some(object) => status::json(StatusCode::OK, object),
        None => status::not_found(&info.group, &info.resource, &info.name),
    }
}

fn list<'a, T>(
    objects: impl Iterator<Item = &'a T>,
    info: &RequestInfo,
    query: &[(String, String)],
    resource_version: u64,
) -> Response
where
    T: ListableResource + Selectable + Metadata<Ty = ObjectMeta> + Clone + serde::Serialize + 'a,
{
    let labels = request_info::query_value(query, "labelSelector").unwrap_or("");
    let fields = request_info::query_value(query, "fieldSelector").unwrap_or("");
    let selector = match Selector::parse::<T>(labels, fields) {
        Ok(selector) => selector,
        Err(message) => return status::bad_request(message),
    };
    let items = objects
        .filter(|o| {
            info.namespace.is_empty() || o.metadata().namespace.as_deref() == Some(&info.namespace)
        })
        .filter(|o| selector.matches(*o))
        .cloned()
        .collect();
    let list = List {
        items,
        metadata: ListMeta {
            resource_version: Some(resource_version.to_string()),
            ..Default::default()
        },
    };
    // The apiserver writes list items without their own apiVersion and kind.
    let mut value = match serde_json::to_value(&list) {
        Ok(value) => value,
        Err(e) => {
            return status::bad_request(format!("fake apiserver could not encode a list: {e}"));
        }
    };
    if let Some(items) = value.get_mut("items").and_then(|i| i.as_array_mut()) {
        for item in items.iter_mut().filter_map(|i| i.as_object_mut()) {
            item.remove("apiVersion");
            item.remove("kind");
        }
    }
    status::json(StatusCode::OK, &value)
}
