//! The fake apiserver against the client remocal really uses (the `kube` crate):
//! if kube reads something here differently from a real cluster, the end-to-end
//! tests built on the fake would prove nothing. It serves HTTPS with its own
//! CA, as a cluster does, so kube's TLS is part of what these tests exercise.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use base64::prelude::{BASE64_STANDARD, Engine as _};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec, TokenReviewStatus};
use k8s_openapi::api::authorization::v1::{
    ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec, SubjectAccessReviewStatus,
};
use k8s_openapi::api::core::v1::{ConfigMap, Event, EventSource, ObjectReference, Pod};
use k8s_openapi::api::events::v1::Event as EventV1;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ListParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};
use remocal_tests::data::Pattern;
use remocal_tests::kube_api::{self, AccessReview, ClientCertificate, FakeKubeApi, KeyKind};
use remocal_tests::kubelet_cgroup::{KubeletCgroup, cgroup2_root};
use remocal_tests::servers::{self, TcpServer};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

const DEV_TOKEN: &str = "dev-token";
const DEVELOPER: &str = "developer";

async fn client(api: &FakeKubeApi, token: &str, namespace: Option<&str>) -> Client {
    client_from(read_kubeconfig(api, token, namespace)).await
}

fn read_kubeconfig(api: &FakeKubeApi, token: &str, namespace: Option<&str>) -> Kubeconfig {
    let path = api.kubeconfig("fake", token, namespace);
    Kubeconfig::read_from(&path).expect("read the fake's kubeconfig")
}

async fn client_from(kubeconfig: Kubeconfig) -> Client {
    let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .expect("kube accepts the fake's kubeconfig");
    Client::try_from(config).expect("kube client")
}

/// The kubeconfig's only cluster entry.
fn cluster_of(kubeconfig: &mut Kubeconfig) -> &mut kube::config::Cluster {
    assert_eq!(kubeconfig.clusters.len(), 1);
    kubeconfig.clusters[0]
        .cluster
        .as_mut()
        .expect("a cluster entry")
}

async fn developer(api: &FakeKubeApi) -> Client {
    api.add_user(DEV_TOKEN, DEVELOPER);
    client(api, DEV_TOKEN, Some("default")).await
}

/// The `Status` of an API error, or a panic naming what came instead.
fn status<T>(result: kube::Result<T>) -> kube::core::Status {
    match result {
        Err(kube::Error::Api(status)) => *status,
        Err(other) => panic!("expected an API error, got {other:?}"),
        Ok(_) => panic!("expected an API error, got a success"),
    }
}

fn names(pods: impl IntoIterator<Item = Pod>) -> Vec<String> {
    let mut names: Vec<String> = pods
        .into_iter()
        .map(|p| p.metadata.name.unwrap_or_default())
        .collect();
    names.sort();
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_reads_back_field_for_field() {
    let api = FakeKubeApi::start().await;
    let client = developer(&api).await;
    let uid = "5c1e4c8a-2f5e-4b8e-9d3a-0a1b2c3d4e5f";
    api.upsert_pod(
        kube_api::pod("default", "web")
            .uid(uid)
            .node("node-a")
            .running()
            .ready(true)
            .labels(&[("app", "web")])
            .annotation("note", "x")
            .ip("198.18.0.2")
            .build(),
    );

    let pod = Api::<Pod>::default_namespaced(client)
        .get("web")
        .await
        .unwrap();

    assert_eq!(pod.metadata.uid.as_deref(), Some(uid));
    assert_eq!(pod.metadata.namespace.as_deref(), Some("default"));
    assert_eq!(pod.metadata.labels.unwrap()["app"], "web");
    assert_eq!(pod.metadata.annotations.unwrap()["note"], "x");
    assert!(pod.metadata.creation_timestamp.is_some());
    assert!(pod.metadata.resource_version.is_some());
    let spec = pod.spec.unwrap();
    assert_eq!(spec.node_name.as_deref(), Some("node-a"));
    assert_eq!(spec.host_network, None);
    let status = pod.status.unwrap();
    assert_eq!(status.phase.as_deref(), Some("Running"));
    assert_eq!(status.pod_ip.as_deref(), Some("198.18.0.2"));
    let ready = status
        .conditions
        .unwrap()
        .into_iter()
        .find(|c| c.type_ == "Ready")
        .unwrap();
    assert_eq!(ready.status, "True");
    let container = &status.container_statuses.unwrap()[0];
    assert_eq!(
        container.container_id.as_deref(),
        Some(format!("containerd://{}", kube_api::container_id(uid)).as_str())
    );
    assert_eq!(
        api.requests(),
        ["developer get /api/v1/namespaces/default/pods/web"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lists_filter_by_label_and_field_selectors() {
    let api = FakeKubeApi::start().await;
    let client = developer(&api).await;
    api.upsert_pod(kube_api::agent_pod("node-a", "agent-a", 7420));
    api.upsert_pod(kube_api::agent_pod("node-b", "agent-b", 7420));
    let web = |ns: &str, name: &str, node: &str| {
        kube_api::pod(ns, name)
            .node(node)
            .running()
            .ready(true)
            .labels(&[("app", "web")])
    };
    api.upsert_pod(web("default", "web-1", "node-a"));
    api.upsert_pod(web("default", "web-2", "node-b").failed());
    api.upsert_pod(web("other", "web-3", "node-a"));

    let all = Api::<Pod>::all(client.clone());
    let agents_on_a = all
        .list(
            &ListParams::default()
                .labels("app.kubernetes.io/name=remocal-agent")
                .fields("spec.nodeName=node-a"),
        )
        .await
        .unwrap();
    assert_eq!(names(agents_on_a), ["agent-a"]);
    assert!(
        api.requests().contains(
            &"developer list /api/v1/pods?fieldSelector=spec.nodeName=node-a&labelSelector=app.kubernetes.io/name=remocal-agent"
                .to_string()
        ),
        "{:?}",
        api.requests()
    );

    let default = Api::<Pod>::default_namespaced(client.clone());
    let list = |labels: &'static str, fields: &'static str| {
        let default = default.clone();
        async move {
            names(
                default
                    .list(&ListParams::default().labels(labels).fields(fields))
                    .await
                    .unwrap_or_else(|e| panic!("{labels} / {fields}: {e}")),
            )
        }
    };
    assert_eq!(list("app==web", "").await, ["web-1", "web-2"]);
    assert_eq!(list("app", "status.phase!=Failed").await, ["web-1"]);
    assert_eq!(list("!app", "").await, Vec::<String>::new());
    assert_eq!(list("app!=db", "metadata.name=web-2").await, ["web-2"]);
    assert_eq!(list("", "spec.nodeName==node-b").await, ["web-2"]);

    let all_web = all
        .list(&ListParams::default().labels("app=web"))
        .await
        .unwrap();
    assert_eq!(all_web.metadata.resource_version.as_deref(), Some("5"));
    assert_eq!(names(all_web), ["web-1", "web-2", "web-3"]);

    let bad = status(
        default
            .list(&ListParams::default().labels("app=web=x"))
            .await,
    );
    assert_eq!((bad.code, bad.reason.as_str()), (400, "BadRequest"));
    let bad = status(
        default
            .list(&ListParams::default().fields("spec.color=red"))
            .await,
    );
    assert_eq!(bad.code, 400);
    assert_eq!(bad.message, "field label not supported: spec.color");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_objects_and_paths_are_404_statuses() {
    let api = FakeKubeApi::start().await;
    let client = developer(&api).await;

    let missing = status(
        Api::<Pod>::default_namespaced(client.clone())
            .get("web")
            .await,
    );
    assert_eq!(missing.code, 404);
    assert_eq!(missing.reason, "NotFound");
    assert_eq!(missing.message, "pods \"web\" not found");
    let details = missing.details.unwrap();
    assert_eq!(
        (details.name.as_str(), details.kind.as_str()),
        ("web", "pods")
    );

    let missing = status(
        Api::<Deployment>::default_namespaced(client.clone())
            .get("web")
            .await,
    );
    assert_eq!(missing.message, "deployments.apps \"web\" not found");
    assert_eq!(missing.details.unwrap().group, "apps");

    let request = axum::http::Request::get("/apis/example.com/v1/widgets")
        .body(Vec::new())
        .unwrap();
    let unknown = status(client.request_text(request).await);
    assert_eq!(
        (unknown.code, unknown.message.as_str()),
        (404, "the server could not find the requested resource")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forbidden_requests_carry_the_apiservers_messages() {
    let api = FakeKubeApi::start().await;
    let client = developer(&api).await;
    api.upsert_pod(
        kube_api::pod("default", "web")
            .node("node-a")
            .running()
            .ready(true),
    );
    api.upsert_pod(kube_api::agent_pod("node-a", "remocal-agent-x", 7420));
    api.upsert_deployment(kube_api::deployment("default", "web", &[("app", "web")]));
    api.forbid(DEVELOPER, "get", "pods", "default");
    api.forbid(DEVELOPER, "list", "pods", "remocal");
    api.forbid(DEVELOPER, "list", "pods", "");
    api.forbid(DEVELOPER, "get", "deployments", "default");
    api.forbid(DEVELOPER, "create", "pods/portforward", "remocal");

    let expect = |status: kube::core::Status, message: &str| {
        assert_eq!((status.code, status.reason.as_str()), (403, "Forbidden"));
        assert_eq!(status.message, message);
    };
    expect(
        status(
            Api::<Pod>::default_namespaced(client.clone())
                .get("web")
                .await,
        ),
        "pods \"web\" is forbidden: User \"developer\" cannot get resource \"pods\" in API group \"\" in the namespace \"default\"",
    );
    let agents = Api::<Pod>::namespaced(client.clone(), "remocal");
    expect(
        status(agents.list(&ListParams::default()).await),
        "pods is forbidden: User \"developer\" cannot list resource \"pods\" in API group \"\" in the namespace \"remocal\"",
    );
    expect(
        status(
            Api::<Pod>::all(client.clone())
                .list(&ListParams::default())
                .await,
        ),
        "pods is forbidden: User \"developer\" cannot list resource \"pods\" in API group \"\" at the cluster scope",
    );
    let denied = status(
        Api::<Deployment>::default_namespaced(client.clone())
            .get("web")
            .await,
    );
    assert_eq!(denied.details.as_ref().unwrap().group, "apps");
    expect(
        denied,
        "deployments.apps \"web\" is forbidden: User \"developer\" cannot get resource \"deployments\" in API group \"apps\" in the namespace \"default\"",
    );
    expect(
        status(agents.portforward("remocal-agent-x", &[7420]).await),
        "pods \"remocal-agent-x\" is forbidden: User \"developer\" cannot create resource \"pods/portforward\" in API group \"\" in the namespace \"remocal\"",
    );
    assert!(
        api.requests().contains(
            &"developer create /api/v1/namespaces/remocal/pods/remocal-agent-x/portforward?ports=7420".to_string()
        ),
        "{:?}",
        api.requests()
    );
    // Other users and namespaces are unaffected.
    assert!(agents.get("remocal-agent-x").await.is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_token_is_401() {
    let api = FakeKubeApi::start().await;
    api.add_user(DEV_TOKEN, DEVELOPER);
    api.upsert_pod(kube_api::pod("default", "web"));
    let stranger = client(&api, "stolen-token", None).await;

    let refused = status(Api::<Pod>::default_namespaced(stranger).get("web").await);

    assert_eq!(refused.code, 401);
    assert_eq!(refused.reason, "Unauthorized");
    assert_eq!(refused.message, "Unauthorized");
    assert_eq!(
        api.requests(),
        ["<unauthenticated> get /api/v1/namespaces/default/pods/web"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deployment_reads_back() {
    let api = FakeKubeApi::start().await;
    let client = developer(&api).await;
    api.upsert_deployment(kube_api::deployment("default", "web", &[("app", "web")]));

    let deployment = Api::<Deployment>::default_namespaced(client)
        .get("web")
        .await
        .unwrap();

    let spec = deployment.spec.unwrap();
    assert_eq!(spec.selector.match_labels.unwrap()["app"], "web");
    assert_eq!(
        spec.template.metadata.unwrap().labels.unwrap()["app"],
        "web"
    );
    assert_eq!(spec.replicas, Some(1));
    assert_eq!(deployment.status.unwrap().available_replicas, Some(1));
}

/// Writes `len` pattern bytes and reads them back concurrently: kube's
/// port-forward stops reading the WebSocket while a port's reader is not reading.
async fn round_trip(stream: tokio::io::DuplexStream, len: usize, seed: u64) {
    let (mut reader, mut writer) = tokio::io::split(stream);
    let write = tokio::spawn(async move {
        let mut pattern = Pattern::new(seed);
        let mut left = len;
        while left > 0 {
            let chunk = pattern.take(left.min(256 * 1024));
            writer.write_all(&chunk).await.unwrap();
            left -= chunk.len();
        }
        writer
    });
    let mut pattern = Pattern::new(seed);
    let mut scratch = Vec::new();
    let mut buf = vec![0; 128 * 1024];
    let mut read = 0;
    while read < len {
        let n = reader.read(&mut buf).await.unwrap();
        assert_ne!(n, 0, "EOF after {read} of {len} bytes");
        assert!(
            pattern.matches(&buf[..n], &mut scratch),
            "bytes differ after {read}"
        );
        read += n;
    }
    write.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn port_forward_relays_megabytes_byte_exact() {
    let api = FakeKubeApi::start().await;
    let client = developer(&api).await;
    let echo = TcpServer::local(servers::echo);
    api.upsert_pod(kube_api::agent_pod(
        "node-a",
        "remocal-agent-x",
        echo.port(),
    ));
    // A pod without hostNetwork is reached at its own IP, not at 127.0.0.1.
    let pod_listener =
        std::net::TcpListener::bind((Ipv4Addr::new(127, 0, 0, 2), 0)).expect("bind 127.0.0.2");
    let pod_echo = TcpServer::serve(pod_listener, servers::echo);
    api.upsert_pod(
        kube_api::pod("default", "web")
            .node("node-a")
            .running()
            .ready(true)
            .ip("127.0.0.2"),
    );

    let agents = Api::<Pod>::namespaced(client.clone(), "remocal");
    let mut forwarder = agents
        .portforward("remocal-agent-x", &[echo.port()])
        .await
        .unwrap();
    let stream = forwarder.take_stream(echo.port()).unwrap();
    round_trip(stream, 8 << 20, 1).await;

    let pods = Api::<Pod>::default_namespaced(client);
    let mut to_pod = pods.portforward("web", &[pod_echo.port()]).await.unwrap();
    round_trip(to_pod.take_stream(pod_echo.port()).unwrap(), 64 * 1024, 2).await;
    assert_eq!(pod_echo.accepted(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_target_closing_ends_the_stream() {
    let api = FakeKubeApi::start().await;
    let client = developer(&api).await;
    let greeter = TcpServer::local(|mut stream: tokio::net::TcpStream| async move {
        let _ = stream.write_all(b"hello").await;
    });
    api.upsert_pod(kube_api::agent_pod("node-a", "agent", greeter.port()));

    let mut forwarder = Api::<Pod>::namespaced(client, "remocal")
        .portforward("agent", &[greeter.port()])
        .await
        .unwrap();
    let mut stream = forwarder.take_stream(greeter.port()).unwrap();
    let mut received = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut received))
        .await
        .expect("EOF once the target closed")
        .unwrap();
    assert_eq!(received, b"hello");
    // No check of `forwarder.join()`: after a server-side close kube 5 answers the
    // close frame and then sends one of its own, so `join` reports `SendAfterClosing`
    // (against a real kubelet too, which also closes when the target does).
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_dial_surfaces_on_the_error_channel() {
    let api = FakeKubeApi::start().await;
    let client = developer(&api).await;
    let echo = TcpServer::local(servers::echo);
    let closed_port = {
        let listener = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        listener.local_addr().unwrap().port()
    };
    let uid = kube_api::fresh_uid();
    api.upsert_pod(kube_api::agent_pod("node-a", "remocal-agent-x", closed_port).uid(&uid));

    let mut forwarder = Api::<Pod>::namespaced(client, "remocal")
        .portforward("remocal-agent-x", &[closed_port, echo.port()])
        .await
        .unwrap();
    let error = tokio::time::timeout(
        Duration::from_secs(5),
        forwarder.take_error(closed_port).unwrap(),
    )
    .await
    .expect("an error message for the refused port")
    .expect("the message itself, not a dropped channel");
    assert!(
        error.starts_with(&format!(
            "error forwarding port {closed_port} to pod remocal-agent-x, uid {uid}: failed to connect to localhost:{closed_port} inside namespace"
        )),
        "{error}"
    );
    assert!(
        error.ends_with(&format!(
            "dial tcp4 127.0.0.1:{closed_port}: connect: connection refused"
        )),
        "{error}"
    );
    // The other port of the same connection still works.
    round_trip(forwarder.take_stream(echo.port()).unwrap(), 1 << 20, 3).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn port_forward_needs_a_running_pod() {
    let api = FakeKubeApi::start().await;
    let client = developer(&api).await;
    api.upsert_pod(kube_api::pod("default", "web").node("node-a"));
    let pods = Api::<Pod>::default_namespaced(client);

    let pending = status(pods.portforward("web", &[80]).await);
    assert_eq!(pending.code, 400);
    assert!(
        pending
            .message
            .contains("pod web is not running (phase Pending)"),
        "{}",
        pending.message
    );

    let missing = status(pods.portforward("db", &[80]).await);
    assert_eq!(
        (missing.code, missing.message.as_str()),
        (404, "pods \"db\" not found")
    );

    api.remove_pod("default", "web");
    assert_eq!(status(pods.get("web").await).code, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_the_fake_stops_it() {
    let api = FakeKubeApi::start().await;
    let addr: SocketAddr = api.addr();
    drop(api);
    let refused = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            if tokio::net::TcpStream::connect(addr).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    assert!(refused.is_ok(), "{addr} still accepts connections");
}

#[test]
fn a_kubelet_cgroup_holds_a_process_and_leaves_nothing_behind() {
    let uid = kube_api::fresh_uid();
    let mut sleep = std::process::Command::new("sleep")
        .arg("30")
        .spawn()
        .unwrap();
    let pid = sleep.id();
    let cgroup = KubeletCgroup::create(&uid);
    let dir = cgroup.dir().to_path_buf();
    let path = cgroup.path();
    assert!(
        path.ends_with(&format!(
            "/kubepods-besteffort.slice/kubepods-besteffort-pod{}.slice/cri-containerd-{}.scope",
            uid.replace('-', "_"),
            kube_api::container_id(&uid)
        )),
        "{path}"
    );
    assert!(path.starts_with("/kubepods-remocal-test-"), "{path}");

    cgroup.add(pid);
    let in_proc = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    assert!(
        in_proc.lines().any(|l| l == format!("0::{path}")),
        "{in_proc}"
    );

    // The process is still alive: drop must move it out before removing.
    drop(cgroup);
    let top = cgroup2_root()
        .unwrap()
        .join(path.trim_start_matches('/').split('/').next().unwrap());
    assert!(
        !dir.exists() && !top.exists(),
        "{} left behind",
        top.display()
    );
    let in_proc = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    assert!(in_proc.lines().any(|l| l == "0::/"), "{in_proc}");
    sleep.kill().unwrap();
    sleep.wait().unwrap();
}

/// A TLS connection to the fake that trusts its CA alone and offers HTTP/2
/// before HTTP/1.1, as Go clients do: the fake must pick HTTP/1.1.
async fn tls_connect(api: &FakeKubeApi) -> TlsStream<TcpStream> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(api.ca_pem().as_bytes()) {
        roots.add(cert.expect("the fake's CA PEM")).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let tcp = TcpStream::connect(api.addr()).await.unwrap();
    let tls = TlsConnector::from(Arc::new(config))
        .connect(ServerName::from(api.addr().ip()), tcp)
        .await
        .expect("TLS handshake with the fake");
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
    tls
}

/// One raw HTTP/1.1 request, so the test sees the JSON itself and not kube's reading of it.
async fn raw_get(api: &FakeKubeApi, path: &str, token: &str) -> (u16, serde_json::Value) {
    let mut stream = tls_connect(api).await;
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\r\n",
        api.addr()
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: application/json"),
        "{head}"
    );
    let code = head.split(' ').nth(1).unwrap().parse().unwrap();
    (
        code,
        serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body}")),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_json_is_the_apiservers() {
    let api = FakeKubeApi::start().await;
    api.add_user(DEV_TOKEN, DEVELOPER);
    api.upsert_pod(kube_api::pod("default", "web").labels(&[("app", "web")]));

    let (code, not_found) = raw_get(&api, "/api/v1/namespaces/default/pods/db", DEV_TOKEN).await;
    assert_eq!(code, 404);
    assert_eq!(
        not_found,
        serde_json::json!({"kind":"Status","apiVersion":"v1","metadata":{},"status":"Failure","message":"pods \"db\" not found","reason":"NotFound","details":{"name":"db","kind":"pods"},"code":404})
    );
    let (code, unauthorized) = raw_get(&api, "/api/v1/pods", "nope").await;
    assert_eq!(code, 401);
    assert_eq!(
        unauthorized,
        serde_json::json!({"kind":"Status","apiVersion":"v1","metadata":{},"status":"Failure","message":"Unauthorized","reason":"Unauthorized","code":401})
    );

    let (code, pod) = raw_get(&api, "/api/v1/namespaces/default/pods/web", DEV_TOKEN).await;
    assert_eq!(code, 200);
    assert_eq!(
        (pod["apiVersion"].as_str(), pod["kind"].as_str()),
        (Some("v1"), Some("Pod"))
    );
    let (code, list) = raw_get(
        &api,
        "/api/v1/namespaces/default/pods?labelSelector=app%3Dweb",
        DEV_TOKEN,
    )
    .await;
    assert_eq!(code, 200);
    assert_eq!(
        (list["apiVersion"].as_str(), list["kind"].as_str()),
        (Some("v1"), Some("PodList"))
    );
    assert_eq!(list["metadata"]["resourceVersion"], "1");
    let item = &list["items"][0];
    assert_eq!(item["metadata"]["name"], "web");
    // As from the apiserver: list items carry no apiVersion or kind of their own.
    assert!(
        item.get("kind").is_none() && item.get("apiVersion").is_none(),
        "{item}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closing_the_client_side_closes_the_target_connection() {
    let api = FakeKubeApi::start().await;
    let client = developer(&api).await;
    let (closed_tx, closed_rx) = tokio::sync::oneshot::channel::<Vec<u8>>();
    let closed_tx = std::sync::Mutex::new(Some(closed_tx));
    let listener = tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .await
        .unwrap();
    let port = listener.local_addr().unwrap().port();
    let target = tokio::spawn(async move {
        let (mut stream, _) = listener.accept().await.unwrap();
        let mut received = Vec::new();
        let _ = stream.read_to_end(&mut received).await;
        if let Some(tx) = closed_tx.lock().unwrap().take() {
            let _ = tx.send(received);
        }
    });
    api.upsert_pod(kube_api::agent_pod("node-a", "agent", port));

    let mut forwarder = Api::<Pod>::namespaced(client, "remocal")
        .portforward("agent", &[port])
        .await
        .unwrap();
    let mut stream = forwarder.take_stream(port).unwrap();
    stream.write_all(b"bye").await.unwrap();
    drop(stream);

    let received = tokio::time::timeout(Duration::from_secs(5), closed_rx)
        .await
        .expect("the target connection closes when the client's stream is dropped")
        .unwrap();
    assert_eq!(received, b"bye");
    target.await.unwrap();
    let joined = tokio::time::timeout(Duration::from_secs(5), forwarder.join()).await;
    assert!(matches!(joined, Ok(Ok(()))), "{joined:?}");
}

/// `error` and its sources, one per line.
fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut chain = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        chain.push_str(&format!("\n  caused by: {cause}"));
        source = cause.source();
    }
    chain
}

/// The error chain of a request that must fail in the TLS handshake, before
/// anything reached the fake.
async fn tls_failure(api: &FakeKubeApi, kubeconfig: Kubeconfig) -> String {
    let client = client_from(kubeconfig).await;
    let result = tokio::time::timeout(
        Duration::from_secs(10),
        Api::<Pod>::default_namespaced(client).get("web"),
    )
    .await
    .expect("a refused handshake fails at once");
    let chain = match result {
        Err(kube::Error::Api(status)) => panic!("the request got through: {status:?}"),
        Err(other) => error_chain(&other),
        Ok(_) => panic!("the request got through"),
    };
    assert!(
        api.requests().is_empty(),
        "the fake saw {:?}",
        api.requests()
    );
    chain
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kube_reaches_the_fake_over_verified_tls() {
    let api = FakeKubeApi::start().await;
    api.add_user(DEV_TOKEN, DEVELOPER);
    let port = api.addr().port();
    assert_eq!(api.url(), format!("https://127.0.0.1:{port}"));
    let mut kubeconfig = read_kubeconfig(&api, DEV_TOKEN, Some("remocal"));
    let cluster = cluster_of(&mut kubeconfig);
    assert_eq!(cluster.server.as_deref(), Some(api.url().as_str()));
    let ca = BASE64_STANDARD
        .decode(cluster.certificate_authority_data.as_deref().unwrap())
        .unwrap();
    assert_eq!(String::from_utf8(ca).unwrap(), api.ca_pem());
    assert!(api.ca_pem().starts_with("-----BEGIN CERTIFICATE-----"));
    assert_eq!(cluster.insecure_skip_tls_verify, None);
    assert_eq!(cluster.tls_server_name, None);

    let echo = TcpServer::local(servers::echo);
    api.upsert_pod(kube_api::agent_pod(
        "node-a",
        "remocal-agent-x",
        echo.port(),
    ));
    let client = client_from(kubeconfig.clone()).await;
    let agents = Api::<Pod>::default_namespaced(client);
    let pod = agents.get("remocal-agent-x").await.unwrap();
    assert_eq!(pod.metadata.name.as_deref(), Some("remocal-agent-x"));
    // The port-forward upgrade and the relay behind it, over TLS.
    let mut forwarder = agents
        .portforward("remocal-agent-x", &[echo.port()])
        .await
        .unwrap();
    round_trip(forwarder.take_stream(echo.port()).unwrap(), 4 << 20, 4).await;
    assert_eq!(echo.accepted(), 1);

    // The serving certificate names localhost as well as 127.0.0.1.
    let mut by_name = kubeconfig.clone();
    cluster_of(&mut by_name).server = Some(format!("https://localhost:{port}"));
    let by_name = Api::<Pod>::default_namespaced(client_from(by_name).await);
    by_name.get("remocal-agent-x").await.unwrap();
    let mut named = kubeconfig.clone();
    cluster_of(&mut named).tls_server_name = Some("localhost".into());
    let named = Api::<Pod>::default_namespaced(client_from(named).await);
    named.get("remocal-agent-x").await.unwrap();
    assert_eq!(api.requests().len(), 4, "{:?}", api.requests());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kubeconfig_with_another_ca_is_refused_in_the_handshake() {
    let api = FakeKubeApi::start().await;
    api.add_user(DEV_TOKEN, DEVELOPER);
    api.upsert_pod(kube_api::pod("default", "web"));
    // Another fake's CA has the same name ("kubernetes") and a different key:
    // only a verified signature tells them apart.
    let other = FakeKubeApi::start().await;
    assert_ne!(other.ca_pem(), api.ca_pem());
    let mut kubeconfig = read_kubeconfig(&api, DEV_TOKEN, Some("default"));
    cluster_of(&mut kubeconfig).certificate_authority_data =
        Some(BASE64_STANDARD.encode(other.ca_pem()));

    let chain = tls_failure(&api, kubeconfig.clone()).await;
    // rustls 0.23 says `BadSignature`: the issuer name matched the trusted CA's.
    assert!(
        chain.contains("invalid peer certificate: BadSignature")
            || chain.contains("invalid peer certificate: UnknownIssuer"),
        "{chain}"
    );

    // The right CA with kube's client again: it is the CA that failed.
    let client = client_from(read_kubeconfig(&api, DEV_TOKEN, Some("default"))).await;
    Api::<Pod>::default_namespaced(client)
        .get("web")
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_name_the_certificate_lacks_is_refused_in_the_handshake() {
    let api = FakeKubeApi::start().await;
    api.add_user(DEV_TOKEN, DEVELOPER);
    let mut kubeconfig = read_kubeconfig(&api, DEV_TOKEN, Some("default"));
    // Right CA, but the certificate is for 127.0.0.1 and localhost only.
    cluster_of(&mut kubeconfig).tls_server_name = Some("kubernetes.default.svc".into());

    let chain = tls_failure(&api, kubeconfig).await;
    assert!(chain.contains("invalid peer certificate"), "{chain}");
    assert!(
        chain.contains("certificate not valid for name \"kubernetes.default.svc\""),
        "{chain}"
    );
}

const AGENT_TOKEN: &str = "agent-token";
const AGENT: &str = "system:serviceaccount:remocal:remocal-agent";

/// The agent's client: a service account that asks the reviews.
async fn agent(api: &FakeKubeApi) -> Client {
    api.add_user_in_groups(
        AGENT_TOKEN,
        AGENT,
        &["system:serviceaccounts", "system:serviceaccounts:remocal"],
    );
    client(api, AGENT_TOKEN, None).await
}

async fn review_token(client: &Client, token: &str, audiences: &[&str]) -> TokenReviewStatus {
    let review = TokenReview {
        spec: TokenReviewSpec {
            token: Some(token.to_string()),
            audiences: (!audiences.is_empty())
                .then(|| audiences.iter().map(|a| a.to_string()).collect()),
        },
        ..Default::default()
    };
    let answer = Api::<TokenReview>::all(client.clone())
        .create(&PostParams::default(), &review)
        .await
        .unwrap();
    assert_eq!(answer.spec.token.as_deref(), Some(token));
    answer.status.expect("a TokenReview status")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_reviews_say_who_a_token_is() {
    let api = FakeKubeApi::start().await;
    let agent = agent(&api).await;
    api.add_user_in_groups(DEV_TOKEN, DEVELOPER, &["devs"]);
    api.add_user("other-token", "other");

    let good = review_token(&agent, DEV_TOKEN, &[]).await;
    assert_eq!(good.authenticated, Some(true));
    assert_eq!(good.error, None);
    assert_eq!(
        good.audiences.as_deref(),
        Some(&[kube_api::API_AUDIENCE.to_string()][..])
    );
    let user = good.user.unwrap();
    assert_eq!(user.username.as_deref(), Some(DEVELOPER));
    assert_eq!(
        user.groups.as_deref(),
        Some(
            &[
                "devs".to_string(),
                kube_api::AUTHENTICATED_GROUP.to_string()
            ][..]
        )
    );
    let uid = user.uid.unwrap();
    assert!(!uid.is_empty());
    let other = review_token(&agent, "other-token", &[]).await.user.unwrap();
    assert_eq!(
        other.groups.as_deref(),
        Some(&[kube_api::AUTHENTICATED_GROUP.to_string()][..])
    );
    assert_ne!(other.uid.as_deref(), Some(uid.as_str()));

    let unknown = review_token(&agent, "stolen-token", &[]).await;
    assert_eq!(unknown.authenticated, Some(false));
    assert_eq!(unknown.user, None);
    assert_eq!(
        unknown.error.as_deref(),
        Some(kube_api::UNKNOWN_TOKEN_ERROR)
    );

    // A token for another audience than the apiserver's is no user, and no error.
    let elsewhere = review_token(&agent, DEV_TOKEN, &["remocal"]).await;
    assert_eq!(
        (elsewhere.authenticated, elsewhere.error, elsewhere.user),
        (Some(false), None, None)
    );

    let developer = client(&api, DEV_TOKEN, Some("default")).await;
    api.upsert_pod(kube_api::pod("default", "web"));
    let pods = Api::<Pod>::default_namespaced(developer);
    pods.get("web").await.unwrap();
    api.expire_token(DEV_TOKEN);
    let expired = review_token(&agent, DEV_TOKEN, &[]).await;
    assert_eq!(expired.authenticated, Some(false));
    assert_eq!(
        expired.error.as_deref(),
        Some(kube_api::EXPIRED_TOKEN_ERROR)
    );
    assert_eq!(status(pods.get("web").await).code, 401);
    // Still the same user behind a new token, with the same uid.
    api.add_user("renewed-token", DEVELOPER);
    let renewed = review_token(&agent, "renewed-token", &[]).await;
    assert_eq!(renewed.user.unwrap().uid, Some(uid));

    assert_eq!(
        api.token_reviews(),
        [
            DEV_TOKEN,
            "other-token",
            "stolen-token",
            DEV_TOKEN,
            DEV_TOKEN,
            "renewed-token"
        ]
    );
    let requests = api.requests();
    assert_eq!(
        requests
            .iter()
            .filter(|r| *r == &format!("{AGENT} create /apis/authentication.k8s.io/v1/tokenreviews"))
            .count(),
        6,
        "{requests:?}"
    );
    assert!(
        requests.contains(&"<unauthenticated> get /api/v1/namespaces/default/pods/web".to_string()),
        "{requests:?}"
    );

    // Reviews are authorized like any request.
    api.forbid(AGENT, "create", "tokenreviews", "");
    let refused = status(
        Api::<TokenReview>::all(agent)
            .create(&PostParams::default(), &TokenReview::default())
            .await,
    );
    assert_eq!(
        refused.message,
        format!(
            "tokenreviews.authentication.k8s.io is forbidden: User \"{AGENT}\" cannot create resource \"tokenreviews\" in API group \"authentication.k8s.io\" at the cluster scope"
        )
    );
    assert_eq!(api.token_reviews().len(), 6);
}

/// What the agent asks before a session: may `user` in `groups` do this?
fn remocal_attributes(
    subresource: &str,
    namespace: Option<&str>,
    name: &str,
) -> ResourceAttributes {
    let resource = if namespace.is_some() { "pods" } else { "nodes" };
    ResourceAttributes {
        group: Some(kube_api::REMOCAL_GROUP.to_string()),
        resource: Some(resource.to_string()),
        subresource: Some(subresource.to_string()),
        verb: Some("create".to_string()),
        namespace: namespace.map(str::to_string),
        name: Some(name.to_string()),
        ..Default::default()
    }
}

async fn review_access(
    client: &Client,
    user: &str,
    groups: &[&str],
    attributes: ResourceAttributes,
) -> SubjectAccessReviewStatus {
    let review = SubjectAccessReview {
        spec: SubjectAccessReviewSpec {
            user: Some(user.to_string()),
            groups: Some(groups.iter().map(|g| g.to_string()).collect()),
            resource_attributes: Some(attributes),
            ..Default::default()
        },
        ..Default::default()
    };
    let answer = Api::<SubjectAccessReview>::all(client.clone())
        .create(&PostParams::default(), &review)
        .await
        .unwrap();
    assert_eq!(answer.spec.user.as_deref(), Some(user));
    answer.status.expect("a SubjectAccessReview status")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subject_access_reviews_follow_the_grants() {
    let api = FakeKubeApi::start().await;
    let agent = agent(&api).await;
    let by_user = api.grant(
        DEVELOPER,
        "create",
        kube_api::REMOCAL_GROUP,
        "pods/steal",
        "",
    );
    let by_group = api.grant(
        "group:devs",
        kube_api::ANY,
        kube_api::REMOCAL_GROUP,
        "pods/mirror",
        "",
    );
    let in_shop = api.grant(
        "shopkeeper",
        "create",
        kube_api::REMOCAL_GROUP,
        "pods/steal-filtered",
        "shop",
    );
    let on_node = api.grant_named(
        "admin",
        "create",
        kube_api::REMOCAL_GROUP,
        "nodes/targets",
        "",
        "node-a",
    );
    let authenticated = [kube_api::AUTHENTICATED_GROUP];

    let steal = review_access(
        &agent,
        DEVELOPER,
        &authenticated,
        remocal_attributes("steal", Some("shop"), "web"),
    )
    .await;
    assert!(steal.allowed);
    assert_eq!(steal.denied, None);
    assert_eq!(
        steal.reason.unwrap(),
        format!(
            "RBAC: allowed by ClusterRoleBinding \"{by_user}\" of ClusterRole \"{by_user}\" to User \"developer\""
        )
    );
    // The user grant is for steal alone.
    let mirror = review_access(
        &agent,
        DEVELOPER,
        &authenticated,
        remocal_attributes("mirror", Some("shop"), "web"),
    )
    .await;
    assert!(!mirror.allowed);
    assert_eq!(mirror.reason.as_deref(), Some("no RBAC rule allowed it"));

    let by_devs = review_access(
        &agent,
        "dana",
        &["devs", "system:authenticated"],
        remocal_attributes("mirror", Some("shop"), "web"),
    )
    .await;
    assert!(by_devs.allowed);
    assert_eq!(
        by_devs.reason.unwrap(),
        format!(
            "RBAC: allowed by ClusterRoleBinding \"{by_group}\" of ClusterRole \"{by_group}\" to Group \"devs\""
        )
    );

    let shop = review_access(
        &agent,
        "shopkeeper",
        &[],
        remocal_attributes("steal-filtered", Some("shop"), "web"),
    )
    .await;
    assert!(shop.allowed);
    assert_eq!(
        shop.reason.unwrap(),
        format!(
            "RBAC: allowed by RoleBinding \"{in_shop}/shop\" of Role \"{in_shop}\" to User \"shopkeeper\""
        )
    );
    let other_namespace = review_access(
        &agent,
        "shopkeeper",
        &[],
        remocal_attributes("steal-filtered", Some("default"), "web"),
    )
    .await;
    assert!(!other_namespace.allowed);

    let node_a = review_access(
        &agent,
        "admin",
        &[],
        remocal_attributes("targets", None, "node-a"),
    )
    .await;
    let node_b = review_access(
        &agent,
        "admin",
        &[],
        remocal_attributes("targets", None, "node-b"),
    )
    .await;
    assert!(node_a.allowed && !node_b.allowed, "{node_a:?} {node_b:?}");
    assert!(node_a.reason.unwrap().contains(&on_node));

    // Outside remocal.dev, what no rule forbids is allowed; forbid wins over grants.
    let get_pods = ResourceAttributes {
        verb: Some("get".into()),
        resource: Some("pods".into()),
        namespace: Some("shop".into()),
        ..Default::default()
    };
    assert!(
        review_access(&agent, "stranger", &[], get_pods.clone())
            .await
            .allowed
    );
    api.forbid(DEVELOPER, kube_api::ANY, "pods/steal", "shop");
    let forbidden = review_access(
        &agent,
        DEVELOPER,
        &authenticated,
        remocal_attributes("steal", Some("shop"), "web"),
    )
    .await;
    assert_eq!((forbidden.allowed, forbidden.denied), (false, Some(true)));
    assert!(
        review_access(
            &agent,
            DEVELOPER,
            &authenticated,
            remocal_attributes("steal", Some("default"), "web")
        )
        .await
        .allowed
    );

    let reviews = api.access_reviews();
    assert_eq!(reviews.len(), 10);
    assert_eq!(
        reviews[0],
        AccessReview {
            user: DEVELOPER.into(),
            groups: vec![kube_api::AUTHENTICATED_GROUP.into()],
            verb: "create".into(),
            group: "remocal.dev".into(),
            resource: "pods".into(),
            subresource: "steal".into(),
            namespace: "shop".into(),
            name: "web".into(),
            path: String::new(),
            allowed: true,
        }
    );
    assert_eq!(
        (
            reviews[6].resource.as_str(),
            reviews[6].namespace.as_str(),
            reviews[6].name.as_str()
        ),
        ("nodes", "", "node-b")
    );
    let allowed: Vec<bool> = reviews.iter().map(|r| r.allowed).collect();
    assert_eq!(
        allowed,
        [
            true, false, true, true, false, true, false, true, false, true
        ]
    );
    assert!(
        api.requests().contains(&format!(
            "{AGENT} create /apis/authorization.k8s.io/v1/subjectaccessreviews"
        )),
        "{:?}",
        api.requests()
    );

    // The apiserver's validation: someone must be asked about.
    let nobody = SubjectAccessReview {
        spec: SubjectAccessReviewSpec {
            resource_attributes: Some(get_pods),
            ..Default::default()
        },
        ..Default::default()
    };
    let invalid = status(
        Api::<SubjectAccessReview>::all(agent)
            .create(&PostParams::default(), &nobody)
            .await,
    );
    assert_eq!((invalid.code, invalid.reason.as_str()), (422, "Invalid"));
    assert_eq!(
        invalid.message,
        "SubjectAccessReview.authorization.k8s.io \"\" is invalid: spec.user: Invalid value: \"\": at least one of user or group must be specified"
    );
    assert_eq!(api.access_reviews().len(), 10);
}

/// A kube client whose user is `certificate`.
async fn certificate_client(api: &FakeKubeApi, certificate: &ClientCertificate) -> Client {
    let path = api.kubeconfig_with_certificate("fake", certificate, Some("default"));
    client_from(Kubeconfig::read_from(&path).expect("read the fake's kubeconfig")).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_certificates_authenticate_by_cn_and_o() {
    for (ca_kind, key_kind) in [
        (KeyKind::EcdsaP256, KeyKind::EcdsaP256),
        (KeyKind::EcdsaP256, KeyKind::Rsa2048),
        (KeyKind::Rsa2048, KeyKind::Rsa2048),
    ] {
        let api = FakeKubeApi::start_with_client_ca(ca_kind).await;
        api.upsert_pod(kube_api::pod("default", "web"));
        let certificate = api.client_certificate("alice", &["ops", "devs"], key_kind);
        let key_header = match key_kind {
            KeyKind::EcdsaP256 => "-----BEGIN EC PRIVATE KEY-----",
            KeyKind::Rsa2048 => "-----BEGIN RSA PRIVATE KEY-----",
        };
        assert!(
            certificate.key_pem.starts_with(key_header),
            "{}",
            certificate.key_pem
        );
        assert!(
            certificate
                .cert_pem
                .starts_with("-----BEGIN CERTIFICATE-----")
        );
        let kubeconfig =
            Kubeconfig::read_from(api.kubeconfig_with_certificate("fake", &certificate, None))
                .unwrap();
        let user = kubeconfig.auth_infos[0].auth_info.as_ref().unwrap();
        assert!(user.token.is_none());
        assert_eq!(
            BASE64_STANDARD
                .decode(user.client_certificate_data.as_deref().unwrap())
                .unwrap(),
            certificate.cert_pem.as_bytes()
        );

        let pods = Api::<Pod>::default_namespaced(certificate_client(&api, &certificate).await);
        pods.get("web")
            .await
            .unwrap_or_else(|e| panic!("{ca_kind:?} CA, {key_kind:?} key: {e}"));
        // The groups are the certificate's O values.
        api.forbid("group:ops", "list", "pods", kube_api::ANY);
        assert_eq!(status(pods.list(&ListParams::default()).await).code, 403);
        assert_eq!(
            api.requests(),
            [
                "alice get /api/v1/namespaces/default/pods/web",
                "alice list /api/v1/namespaces/default/pods"
            ]
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_of_another_ca_is_401() {
    let api = FakeKubeApi::start().await;
    api.upsert_pod(kube_api::pod("default", "web"));
    let foreign = api.foreign_client_certificate("alice", &["system:masters"], KeyKind::EcdsaP256);
    let trusted = api.client_certificate("alice", &["system:masters"], KeyKind::EcdsaP256);
    assert_ne!(foreign.cert_pem, trusted.cert_pem);

    let pods = Api::<Pod>::default_namespaced(certificate_client(&api, &foreign).await);
    let refused = status(pods.get("web").await);
    assert_eq!(
        (refused.code, refused.message.as_str()),
        (401, "Unauthorized")
    );
    assert_eq!(
        api.requests(),
        ["<unauthenticated> get /api/v1/namespaces/default/pods/web"]
    );
    // The fake itself accepts the trusted one.
    Api::<Pod>::default_namespaced(certificate_client(&api, &trusted).await)
        .get("web")
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_ca_is_published_in_kube_system() {
    let api = FakeKubeApi::start().await;
    let agent = agent(&api).await;
    let (namespace, name) = kube_api::AUTHENTICATION_CONFIG_MAP;
    let config_maps = Api::<ConfigMap>::namespaced(agent, namespace);

    let published = config_maps.get(name).await.unwrap();
    let data = published.data.unwrap();
    assert_eq!(data[kube_api::CLIENT_CA_KEY], api.client_ca_pem());
    assert_ne!(api.client_ca_pem(), api.ca_pem());
    // As in a kubeadm cluster, the front proxy's CA is there too, and is another.
    assert!(data["requestheader-client-ca-file"].starts_with("-----BEGIN CERTIFICATE-----"));
    assert_ne!(data["requestheader-client-ca-file"], api.client_ca_pem());
    assert!(published.metadata.uid.is_some() && published.metadata.resource_version.is_some());

    let other = status(config_maps.get("kube-root-ca.crt").await);
    assert_eq!(
        (other.code, other.message.as_str()),
        (404, "configmaps \"kube-root-ca.crt\" not found")
    );
    api.forbid(AGENT, "get", "configmaps", namespace);
    let forbidden = status(config_maps.get(name).await);
    assert_eq!(forbidden.code, 403);
    assert_eq!(
        api.requests(),
        [
            format!("{AGENT} get /api/v1/namespaces/kube-system/configmaps/{name}"),
            format!("{AGENT} get /api/v1/namespaces/kube-system/configmaps/kube-root-ca.crt"),
            format!("{AGENT} get /api/v1/namespaces/kube-system/configmaps/{name}"),
        ]
    );
}

fn pod_event(name: &str, involved_namespace: &str) -> Event {
    Event {
        metadata: ObjectMeta {
            name: Some(name.to_string()),
            ..Default::default()
        },
        involved_object: ObjectReference {
            api_version: Some("v1".into()),
            kind: Some("Pod".into()),
            namespace: Some(involved_namespace.into()),
            name: Some("web".into()),
            uid: Some("5c1e4c8a-2f5e-4b8e-9d3a-0a1b2c3d4e5f".into()),
            ..Default::default()
        },
        reason: Some("TrafficStolen".into()),
        message: Some("developer steals port 8080".into()),
        type_: Some("Normal".into()),
        source: Some(EventSource {
            component: Some("remocal-agent".into()),
            host: Some("node-a".into()),
        }),
        count: Some(1),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_are_recorded() {
    let api = FakeKubeApi::start().await;
    let agent = agent(&api).await;
    let events = Api::<Event>::namespaced(agent.clone(), "shop");

    let created = events
        .create(&PostParams::default(), &pod_event("web.steal-1", "shop"))
        .await
        .unwrap();
    assert_eq!(created.metadata.namespace.as_deref(), Some("shop"));
    assert!(created.metadata.uid.is_some());
    let recorded = api.events();
    assert_eq!(recorded.len(), 1);
    assert_eq!(recorded[0], created);
    assert_eq!(
        recorded[0].message.as_deref(),
        Some("developer steals port 8080")
    );
    assert_eq!(recorded[0].involved_object.name.as_deref(), Some("web"));

    let again = status(
        events
            .create(&PostParams::default(), &pod_event("web.steal-1", "shop"))
            .await,
    );
    assert_eq!(
        (again.code, again.message.as_str()),
        (409, "events \"web.steal-1\" already exists")
    );
    let elsewhere = status(
        events
            .create(&PostParams::default(), &pod_event("web.steal-2", "default"))
            .await,
    );
    assert_eq!(elsewhere.code, 422);
    assert_eq!(
        elsewhere.message,
        "Event \"web.steal-2\" is invalid: involvedObject.namespace: Invalid value: \"default\": does not match event.namespace"
    );
    let mut generated = pod_event("", "shop");
    generated.metadata.name = None;
    generated.metadata.generate_name = Some("web.".into());
    let generated = events
        .create(&PostParams::default(), &generated)
        .await
        .unwrap();
    assert!(generated.metadata.name.unwrap().starts_with("web."));

    // Through events.k8s.io/v1, stored as the same Event.
    let v1 = EventV1 {
        metadata: ObjectMeta {
            name: Some("web.mirror-1".into()),
            ..Default::default()
        },
        event_time: Some(MicroTime(Timestamp::now())),
        regarding: Some(pod_event("", "shop").involved_object),
        note: Some("developer mirrors port 8080".into()),
        reason: Some("TrafficMirrored".into()),
        action: Some("Mirror".into()),
        reporting_controller: Some("remocal.dev/agent".into()),
        reporting_instance: Some("remocal-agent-node-a".into()),
        type_: Some("Normal".into()),
        ..Default::default()
    };
    Api::<EventV1>::namespaced(agent, "shop")
        .create(&PostParams::default(), &v1)
        .await
        .unwrap();
    let recorded = api.events();
    assert_eq!(recorded.len(), 3);
    assert_eq!(
        recorded[2].message.as_deref(),
        Some("developer mirrors port 8080")
    );
    assert_eq!(
        recorded[2].reporting_component.as_deref(),
        Some("remocal.dev/agent")
    );

    let mirrored = events
        .list(&ListParams::default().fields("reason=TrafficMirrored,involvedObject.name=web"))
        .await
        .unwrap();
    assert_eq!(mirrored.items.len(), 1);
    assert!(
        api.requests()
            .contains(&format!("{AGENT} create /api/v1/namespaces/shop/events")),
        "{:?}",
        api.requests()
    );
}
