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
//! Users are bearer tokens or certificates of the fake's client CA (another
//! CA than the serving one, published in kube-system's
//! `extension-apiserver-authentication` ConfigMap as a cluster does). A
//! component such as the agent checks them as against a cluster: TokenReviews,
//! and SubjectAccessReviews answered by the same rules as the fake's own
//! requests (`forbid`, `grant`; API group `remocal.dev` needs a grant). It can
//! record Events too. Every review and event is kept for the test to check.
//!
//! ```ignore
//! let api = FakeKubeApi::start().await;
//! api.add_user("dev-token", "developer");
//! api.upsert_pod(kube_api::pod("default", "web").node("node-a").running().ready(true).build());
//! let kubeconfig = api.kubeconfig("test", "dev-token", Some("default"));
//! api.grant("developer", "create", "remocal.dev", "pods/steal", "default");
//! ```

mod auth;
mod client_pki;
mod events;
mod objects;
mod port_forward;
mod rbac;
mod request_info;
mod reviews;
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
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{Method, StatusCode};
use axum::response::Response;
use base64::prelude::{BASE64_STANDARD, Engine as _};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Event, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ListMeta, ObjectMeta};
use k8s_openapi::{List, ListableResource, Metadata};
use tokio::net::TcpListener;
use tokio::sync::watch;

pub use auth::{AUTHENTICATED_GROUP, EXPIRED_TOKEN_ERROR, UNKNOWN_TOKEN_ERROR};
pub use client_pki::{AUTHENTICATION_CONFIG_MAP, CLIENT_CA_KEY, ClientCertificate, KeyKind};
pub use objects::{
    AGENT_LABEL, AGENT_NAMESPACE, GRPC_PORT_ANNOTATION, Phase, PodBuilder, agent_pod, container_id,
    deployment, fresh_uid, pod,
};
pub use rbac::{ANY, REMOCAL_GROUP};
pub use reviews::{API_AUDIENCE, AccessReview};

use request_info::RequestInfo;
use selectors::{Selectable, Selector};

/// Recorded for requests without a valid credential.
pub const UNAUTHENTICATED: &str = "<unauthenticated>";
/// The largest request body read (a review, an event).
const MAX_BODY: usize = 1 << 20;

/// A running fake apiserver; it stops (listener, connections, port-forwards) on drop.
pub struct FakeKubeApi {
    addr: SocketAddr,
    state: Arc<Mutex<Cluster>>,
    /// Dropping it tells the server and every port-forward to stop.
    _shutdown: watch::Sender<()>,
    /// The cluster CA that signed the serving certificate, PEM.
    ca_pem: String,
    client_ca: Arc<client_pki::ClientCa>,
    kubeconfigs: tempfile::TempDir,
    next_kubeconfig: AtomicU64,
}

/// What the fake stores and has seen. Never locked across an await.
#[derive(Default)]
struct Cluster {
    policy: auth::Policy,
    pods: BTreeMap<(String, String), Pod>,
    deployments: BTreeMap<(String, String), Deployment>,
    config_maps: BTreeMap<(String, String), ConfigMap>,
    events: BTreeMap<(String, String), Event>,
    requests: Vec<String>,
    /// The token of each TokenReview, in order.
    token_reviews: Vec<String>,
    access_reviews: Vec<AccessReview>,
    resource_version: u64,
}

#[derive(Clone)]
struct Shared {
    state: Arc<Mutex<Cluster>>,
    shutdown: watch::Receiver<()>,
    /// Verifies the client certificates of requests.
    client_ca: Arc<client_pki::ClientCa>,
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
    /// runtime, with a CA and serving certificate made for this server alone,
    /// and an ECDSA P-256 client CA (as k3s has).
    pub async fn start() -> FakeKubeApi {
        FakeKubeApi::start_with_client_ca(KeyKind::EcdsaP256).await
    }

    /// As [`FakeKubeApi::start`], with a client CA of `kind`: RSA as kubeadm,
    /// kind and minikube make theirs (its key is made with `openssl`).
    pub async fn start_with_client_ca(kind: KeyKind) -> FakeKubeApi {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the fake apiserver on 127.0.0.1");
        let addr = listener.local_addr().expect("fake apiserver address");
        let client_ca = Arc::new(client_pki::ClientCa::generate(kind));
        let pki = tls::Pki::generate(client_ca.verifier());
        let listener = tls::TlsListener::new(listener, pki.acceptor);
        let mut cluster = Cluster::default();
        let (namespace, name) = AUTHENTICATION_CONFIG_MAP;
        cluster.config_maps.insert(
            (namespace.to_string(), name.to_string()),
            client_pki::authentication_config_map(&client_ca.cert_pem),
        );
        let state = Arc::new(Mutex::new(cluster));
        let (shutdown_tx, shutdown) = watch::channel(());
        let app = Router::new().fallback(handle).with_state(Shared {
            state: state.clone(),
            shutdown: shutdown.clone(),
            client_ca: client_ca.clone(),
        });
        let app = app.into_make_service_with_connect_info::<tls::PeerCertificates>();
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
            client_ca,
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
        self.write_kubeconfig(context, serde_json::json!({ "token": token }), namespace)
    }

    /// As [`FakeKubeApi::kubeconfig`], with a user of a client certificate
    /// (`client-certificate-data` and `client-key-data`, as kubeadm, kind and
    /// k3s write their admin kubeconfigs) instead of a token.
    pub fn kubeconfig_with_certificate(
        &self,
        context: &str,
        certificate: &ClientCertificate,
        namespace: Option<&str>,
    ) -> PathBuf {
        let user = serde_json::json!({
            "client-certificate-data": BASE64_STANDARD.encode(&certificate.cert_pem),
            "client-key-data": BASE64_STANDARD.encode(&certificate.key_pem),
        });
        self.write_kubeconfig(context, user, namespace)
    }

    fn write_kubeconfig(
        &self,
        context: &str,
        user_body: serde_json::Value,
        namespace: Option<&str>,
    ) -> PathBuf {
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
            "users": [{ "name": user, "user": user_body }],
            "contexts": [{ "name": context, "context": context_body }],
            "current-context": context,
        });
        let n = self.next_kubeconfig.fetch_add(1, Ordering::Relaxed);
        let path = self.kubeconfigs.path().join(format!("kubeconfig-{n}"));
        let yaml = serde_yaml::to_string(&config).expect("kubeconfig as YAML");
        fs::write(&path, yaml).expect("write kubeconfig");
        path
    }

    /// A user whose bearer token is `token`, in group [`AUTHENTICATED_GROUP`]
    /// only. A user keeps one uid (what a TokenReview returns) across tokens.
    pub fn add_user(&self, token: &str, user_name: &str) {
        self.add_user_in_groups(token, user_name, &[]);
    }

    /// As [`FakeKubeApi::add_user`], in `groups` and [`AUTHENTICATED_GROUP`].
    pub fn add_user_in_groups(&self, token: &str, user_name: &str, groups: &[&str]) {
        lock(&self.state).policy.add_user(token, user_name, groups);
    }

    /// From now on the token is refused (401) and a TokenReview of it says
    /// `authenticated: false` with [`EXPIRED_TOKEN_ERROR`]. Panics for a token
    /// no user has.
    pub fn expire_token(&self, token: &str) {
        let known = lock(&self.state).policy.expire_token(token);
        assert!(known, "expire_token: no user has token {token:?}");
    }

    /// Refuses `verb` on `resource` (`pods`, `pods/portforward`, `deployments`) in
    /// `namespace` ("" is the cluster scope) to `user_name` (or `group:NAME`),
    /// in every API group, before any grant; [`ANY`] for verb, resource or
    /// namespace matches them all.
    pub fn forbid(&self, user_name: &str, verb: &str, resource: &str, namespace: &str) {
        lock(&self.state)
            .policy
            .rbac
            .forbid(user_name, verb, resource, namespace);
    }

    /// Allows `verb` on `resource` (`pods/steal`, `nodes/targets`: a
    /// subresource must be named) in API `group` to `subject`, a user name or
    /// `group:NAME`. `namespace` `""` (or [`ANY`]) binds cluster-wide, as a
    /// ClusterRoleBinding: cluster-scoped resources and every namespace; a
    /// namespace binds there only, as a RoleBinding. [`ANY`] matches every
    /// verb, group or resource. Only API group [`REMOCAL_GROUP`] needs grants
    /// (and everything, for a [`FakeKubeApi::strict`] user): anything else is
    /// allowed unless forbidden. Returns the binding's name,
    /// which a SubjectAccessReview's reason names:
    /// `RBAC: allowed by ClusterRoleBinding "NAME" of ClusterRole "NAME" to User "developer"`,
    /// `RBAC: allowed by RoleBinding "NAME/NAMESPACE" of Role "NAME" to Group "devs"`.
    pub fn grant(
        &self,
        subject: &str,
        verb: &str,
        group: &str,
        resource: &str,
        namespace: &str,
    ) -> String {
        self.grant_named(subject, verb, group, resource, namespace, "")
    }

    /// From now on `user` may do only what grants allow, in every API group,
    /// as in a real cluster.
    pub fn strict(&self, user: &str) {
        lock(&self.state).policy.rbac.strict(user);
    }

    /// As [`FakeKubeApi::grant`], for the object `name` only (RBAC's
    /// `resourceNames`), e.g. `nodes/targets` of one node; `""` is every name.
    pub fn grant_named(
        &self,
        subject: &str,
        verb: &str,
        group: &str,
        resource: &str,
        namespace: &str,
        name: &str,
    ) -> String {
        lock(&self.state)
            .policy
            .rbac
            .grant(subject, verb, group, resource, namespace, name)
    }

    /// The client CA (PEM) whose certificates authenticate, as published in
    /// the ConfigMap [`AUTHENTICATION_CONFIG_MAP`] under [`CLIENT_CA_KEY`]; it
    /// is not the CA of [`FakeKubeApi::ca_pem`].
    pub fn client_ca_pem(&self) -> &str {
        &self.client_ca.cert_pem
    }

    /// A certificate of the client CA for user `common_name` (subject CN) in
    /// `groups` (one subject O each): it authenticates as that user, in
    /// `groups` and [`AUTHENTICATED_GROUP`]. Takes `openssl`, some 100 ms for RSA.
    pub fn client_certificate(
        &self,
        common_name: &str,
        groups: &[&str],
        kind: KeyKind,
    ) -> ClientCertificate {
        self.client_ca.issue(common_name, groups, kind)
    }

    /// As [`FakeKubeApi::client_certificate`], signed by a throw-away CA of
    /// the same name and key kind as the client CA, which nothing trusts: the
    /// fake answers its requests 401.
    pub fn foreign_client_certificate(
        &self,
        common_name: &str,
        groups: &[&str],
        kind: KeyKind,
    ) -> ClientCertificate {
        client_pki::ClientCa::generate(self.client_ca.kind()).issue(common_name, groups, kind)
    }

    /// The token of every TokenReview so far, in order.
    pub fn token_reviews(&self) -> Vec<String> {
        lock(&self.state).token_reviews.clone()
    }

    /// Every SubjectAccessReview so far, in order, with the fake's answer.
    pub fn access_reviews(&self) -> Vec<AccessReview> {
        lock(&self.state).access_reviews.clone()
    }

    /// Every Event created so far (through core/v1 or events.k8s.io/v1), in
    /// order of creation, as core/v1 Events with their stored metadata.
    pub fn events(&self) -> Vec<Event> {
        let mut events: Vec<Event> = lock(&self.state).events.values().cloned().collect();
        events.sort_by_key(|e| {
            e.metadata
                .resource_version
                .as_deref()
                .and_then(|v| v.parse::<u64>().ok())
        });
        events
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

async fn handle(
    State(shared): State<Shared>,
    ConnectInfo(peer): ConnectInfo<tls::PeerCertificates>,
    mut request: Request,
) -> Response {
    let method = request.method().clone();
    let path = request.uri().path().to_string();
    let query = request_info::query_pairs(request.uri().query());
    let info = request_info::parse(&method, &path, &query);
    // Read before taking the lock, which is never held across an await.
    let body = if matches!(method, Method::POST | Method::PUT | Method::PATCH) {
        match axum::body::to_bytes(std::mem::take(request.body_mut()), MAX_BODY).await {
            Ok(body) => body,
            Err(e) => {
                return status::bad_request(format!(
                    "the fake apiserver could not read the body: {e}"
                ));
            }
        }
    } else {
        bytes::Bytes::new()
    };
    let x509 = peer
        .0
        .as_deref()
        .and_then(|chain| shared.client_ca.identify(chain));
    let mut cluster = shared.lock();
    let user = cluster.policy.authenticate(request.headers(), x509);

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
        user.as_ref().map_or(UNAUTHENTICATED, |u| u.name.as_str())
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
        ("", "v1", "configmaps") if info.subresource.is_empty() => match info.verb.as_str() {
            "get" => get(&cluster.config_maps, &info),
            _ => status::method_not_allowed(),
        },
        ("", "v1", "events") if info.subresource.is_empty() => match info.verb.as_str() {
            "create" if info.name.is_empty() => events::create(&mut cluster, &info, &body),
            "get" => get(&cluster.events, &info),
            "list" => list(
                cluster.events.values(),
                &info,
                &query,
                cluster.resource_version,
            ),
            _ => status::method_not_allowed(),
        },
        ("events.k8s.io", "v1", "events")
            if info.subresource.is_empty() && info.name.is_empty() && info.verb == "create" =>
        {
            events::create_v1(&mut cluster, &info, &body)
        }
        ("authentication.k8s.io", "v1", "tokenreviews") if is_cluster_create(&info) => {
            reviews::token_review(&mut cluster, &body)
        }
        ("authorization.k8s.io", "v1", "subjectaccessreviews") if is_cluster_create(&info) => {
            reviews::subject_access_review(&mut cluster, &body)
        }
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

/// A POST to a cluster-scoped collection: how reviews are asked.
fn is_cluster_create(info: &RequestInfo) -> bool {
    info.verb == "create"
        && info.namespace.is_empty()
        && info.name.is_empty()
        && info.subresource.is_empty()
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
