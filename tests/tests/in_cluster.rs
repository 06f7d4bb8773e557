//! The agent as the DaemonSet runs it: without `--kubeconfig`, reading the API
//! with its pod's service account. kube's in-cluster configuration takes the
//! server from `KUBERNETES_SERVICE_HOST`/`KUBERNETES_SERVICE_PORT` and the
//! token, CA and namespace from files under
//! `/var/run/secrets/kubernetes.io/serviceaccount/`, the paths kubelet mounts
//! them at. The agent gets those files in a mount namespace of its own
//! (`unshare`), on a tmpfs over `/run`, so they never appear on this host and
//! vanish with the agent process; everything else (the fake API server's TLS,
//! the eBPF steal of a real pod namespace) is as in `kubernetes.rs`.

use std::path::Path;
use std::process::Command;

use remocal_tests::bpf;
use remocal_tests::kube_api::{self, FakeKubeApi};
use remocal_tests::kubelet_cgroup::KubeletCgroup;
use remocal_tests::processes::{Agent, PodProcess, Steal, binary};
use remocal_tests::remote::curl_body;
use remocal_tests::scenario::POD_BODY;
use remocal_tests::servers::{self, TcpServer};
use remocal_tests::topology::Topology;
use remocal_tests::user_roles;

const LOCAL_BODY: &str = "local";
const NODE: &str = "node-a";
/// The identity the DaemonSet's pods get (manifests/: namespace `remocal`,
/// service account `remocal-agent`).
const AGENT_ACCOUNT: &str = "system:serviceaccount:remocal:remocal-agent";
const SERVICE_ACCOUNT_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

/// Runs as `sh -c POD_FILES sh STAGE AGENT ARGS...` inside a fresh private
/// mount namespace: builds on a tmpfs what kubelet mounts into the agent's pod
/// (the service-account files, and the node's `/var/run/netns` the DaemonSet
/// mounts), puts that tmpfs where `/var/run` leads, and execs the agent, which
/// thus keeps this process's PID. `/proc`, `/sys` (bpffs, cgroups) are untouched.
const POD_FILES: &str = r#"
set -eu
stage=$1
shift
run=$(readlink -f /var/run)
sa="$stage/secrets/kubernetes.io/serviceaccount"
mount --no-mtab -t tmpfs -o mode=0755 remocal-test-pod-run "$stage"
mkdir -p "$sa" "$stage/netns"
if [ -d "$run/netns" ]; then
    mount --no-mtab --rbind "$run/netns" "$stage/netns"
fi
printf '%s' "$SA_TOKEN" > "$sa/token"
printf '%s' "$SA_CA_CRT" > "$sa/ca.crt"
printf '%s' "$SA_NAMESPACE" > "$sa/namespace"
unset SA_TOKEN SA_CA_CRT SA_NAMESPACE
mount --no-mtab --move "$stage" "$run"
exec "$@"
"#;

/// Starts `remocal-agent` with no `--kubeconfig`, as in a pod of the DaemonSet
/// on node [`NODE`] of the cluster served by `api`, whose service account has
/// `token` and trusts `ca_pem` as the cluster's CA.
async fn in_cluster_agent(api: &FakeKubeApi, token: &str, ca_pem: &str) -> Agent {
    // Only the mount point for staging; the agent's namespace moves the tmpfs
    // away from it, and this host never sees anything inside it.
    let stage = tempfile::tempdir().expect("temporary staging directory");
    let mut command = Command::new("unshare");
    command
        .args(["--mount", "--propagation", "private", "--", "sh", "-c"])
        .args([POD_FILES, "sh"])
        .arg(stage.path())
        .arg(binary("remocal-agent"))
        .args(Agent::LISTEN_ARGS)
        .env("SA_TOKEN", token)
        .env("SA_CA_CRT", ca_pem)
        .env("SA_NAMESPACE", "remocal")
        .env("KUBERNETES_SERVICE_HOST", api.addr().ip().to_string())
        .env("KUBERNETES_SERVICE_PORT", api.addr().port().to_string())
        .env("NODE_NAME", NODE);
    let agent = Agent::start_command(command).await;
    // The files are where kube looks for them in the agent's view, and only
    // there. Under /proc/PID/root an absolute symlink would lead back to this
    // process's root, so /var/run is resolved here first.
    let run = std::fs::canonicalize("/var/run").expect("resolve /var/run");
    let in_agent = Path::new(&format!("/proc/{}/root", agent.pid()))
        .join(run.strip_prefix("/").expect("an absolute path"))
        .join("secrets/kubernetes.io/serviceaccount/token");
    assert_eq!(
        std::fs::read_to_string(&in_agent).ok().as_deref(),
        Some(token),
        "{}",
        in_agent.display()
    );
    assert_ne!(
        std::fs::read_to_string(Path::new(SERVICE_ACCOUNT_DIR).join("token"))
            .ok()
            .as_deref(),
        Some(token),
        "the token must not reach this host's {SERVICE_ACCOUNT_DIR}"
    );
    agent
}

/// A token only the agent's service account has, new for every test.
fn fresh_token() -> String {
    format!("sa-token-{}", kube_api::fresh_uid())
}

/// `remocal steal pod/web -n shop --port 80 --agent URL` as a developer bound
/// to `remocal-user` in `shop`: with `--agent` and a namespace the client asks
/// the cluster nothing (it only sends its token to the agent), so every API
/// request is the agent's.
fn steal_web(api: &FakeKubeApi, agent: &Agent) -> Steal {
    api.add_user("dev-token", "developer");
    api.strict("developer");
    user_roles::bind(api, "developer", "remocal-user", "shop");
    let kubeconfig = api.kubeconfig("dev", "dev-token", Some("shop"));
    Steal::remocal(&["steal", "pod/web", "-n", "shop", "--agent", &agent.url()])
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .port(80)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_reads_pods_with_its_service_account_and_steals_by_pod_name() {
    let api = FakeKubeApi::start().await;
    let token = fresh_token();
    api.add_user(&token, AGENT_ACCOUNT);
    api.strict(AGENT_ACCOUNT);
    user_roles::bind_agent(&api, AGENT_ACCOUNT);
    // Dropped in reverse: the agent detaches first, the pod's process stops
    // before its cgroup goes, the namespaces go last.
    let topology = Topology::new(1);
    let pod = topology.pod(0);
    let pod_server = TcpServer::in_netns(&pod.netns, 80, |s| servers::http(s, POD_BODY));
    let uid = kube_api::fresh_uid();
    let cgroup = KubeletCgroup::create(&uid);
    let pod_process = PodProcess::start(&pod.netns).await;
    cgroup.add(pod_process.pid());
    api.upsert_pod(
        kube_api::pod("shop", "web")
            .uid(&uid)
            .node(NODE)
            .ip(&pod.ipv4.to_string())
            .running()
            .ready(true),
    );
    let agent = in_cluster_agent(&api, &token, api.ca_pem()).await;
    let local = TcpServer::local(|s| servers::http(s, LOCAL_BODY));

    let mut session = steal_web(&api, &agent)
        .local_port(local.port())
        .start()
        .await;
    assert!(
        session.ready_line().contains("pod shop/web"),
        "{}",
        session.ready_line()
    );
    for addr in pod.addrs(80) {
        assert_eq!(curl_body(&topology.node, addr).await, LOCAL_BODY, "{addr}");
    }
    assert_eq!(pod_server.accepted(), 0, "every connection was stolen");
    assert_eq!(local.accepted(), 2);

    let ended = session.stop().await;
    assert_eq!(ended.code, Some(0), "{ended:?}");
    for addr in pod.addrs(80) {
        assert_eq!(curl_body(&topology.node, addr).await, POD_BODY, "{addr}");
    }
    let programs = bpf::tcx_programs(&pod.netns);
    assert!(programs.is_empty(), "{}", bpf::describe(&programs));

    let requests = api.requests();
    assert!(
        requests.contains(&format!(
            "{AGENT_ACCOUNT} get /api/v1/namespaces/shop/pods/web"
        )),
        "the agent reads the pod with its service account's token: {requests:#?}"
    );
    assert!(
        requests
            .iter()
            .all(|request| request.starts_with(&format!("{AGENT_ACCOUNT} "))),
        "every request carried the service account's token: {requests:#?}"
    );
}

/// A cluster CA that did not sign the API server's certificate (a stale
/// `ca.crt`) fails the session at once, as "cluster unreachable" (exit 3),
/// and the token is never sent to the unverified server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_refuses_an_api_server_its_service_account_ca_does_not_sign() {
    let api = FakeKubeApi::start().await;
    let other_cluster = FakeKubeApi::start().await;
    let token = fresh_token();
    api.add_user(&token, AGENT_ACCOUNT);
    api.strict(AGENT_ACCOUNT);
    user_roles::bind_agent(&api, AGENT_ACCOUNT);
    api.upsert_pod(
        kube_api::pod("shop", "web")
            .node(NODE)
            .ip("198.18.0.2")
            .running()
            .ready(true),
    );
    let agent = in_cluster_agent(&api, &token, other_cluster.ca_pem()).await;

    let finished = steal_web(&api, &agent).run_to_exit().await;
    assert_eq!(finished.code, Some(3), "{finished:?}");
    // The first thing the agent asks the API server is who the caller is.
    assert!(
        finished.stderr.contains("cannot check your token"),
        "{finished:?}"
    );
    // A failed handshake, named as one, not a wait for an answer that never comes.
    assert!(finished.stderr.contains("certificate"), "{finished:?}");
    assert!(
        !finished.stderr.contains("no answer within"),
        "{finished:?}"
    );
    assert!(!finished.stderr.contains("panicked"), "{finished:?}");
    assert_eq!(
        api.requests(),
        Vec::<String>::new(),
        "no request reaches a server the CA does not vouch for"
    );
}
