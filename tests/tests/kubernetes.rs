//! remocal in a cluster: pods named by name or deployment, the agent found on
//! the pod's node and reached through the port-forward API, and every refusal
//! a user can meet on the way. The API server is an in-process fake serving
//! real Kubernetes JSON; everything else is real: the agent's eBPF on the
//! kernel, a pod namespace whose process sits in a cgroup named the way
//! kubelet names it, and the two binaries.

use std::path::{Path, PathBuf};

use remocal_tests::kube_api::{self, FakeKubeApi};
use remocal_tests::kube_cluster::{AGENT_POD, AGENT_USER, KubeCluster};
use remocal_tests::kubelet_cgroup::KubeletCgroup;
use remocal_tests::processes::{Agent, Finished, PodProcess, Steal, free_port};
use remocal_tests::scenario::{POD_BODY, Scenario};
use remocal_tests::servers::{self, TcpServer};
use remocal_tests::user_roles;
use serde::Deserialize as _;
use serde_yaml::Value;

const LOCAL_BODY: &str = "local";
const DEVELOPER: &str = "developer";

/// One node (`node-a`) with its agent and a pod `shop/web` of deployment
/// `shop/web` answering [`POD_BODY`] on port 80.
struct Cluster {
    api: FakeKubeApi,
    // Drop order: the agent and namespaces, then the pod's process, then its cgroup.
    scenario: Scenario,
    _pod_process: PodProcess,
    _cgroup: KubeletCgroup,
    /// The developer's kubeconfig: context `dev`, namespace `shop`.
    kubeconfig: PathBuf,
}

impl Cluster {
    async fn start() -> Cluster {
        let KubeCluster {
            api,
            scenario,
            pod_process,
            cgroup,
        } = KubeCluster::start().await;
        api.add_user("dev-token", DEVELOPER);
        // The developer may do what the shipped roles grant, nothing more.
        api.strict(DEVELOPER);
        let kubeconfig = api.kubeconfig("dev", "dev-token", Some("shop"));
        // What a platform team grants a developer, from the shipped roles.
        for namespace in ["shop", "restricted"] {
            user_roles::bind(&api, DEVELOPER, "remocal-user", namespace);
        }
        user_roles::bind_role(&api, DEVELOPER, "remocal-user", "remocal");
        Cluster {
            api,
            scenario,
            _pod_process: pod_process,
            _cgroup: cgroup,
            kubeconfig,
        }
    }

    /// `remocal ARGS --kubeconfig <developer's>`.
    fn remocal(&self, args: &[&str]) -> Steal {
        Steal::remocal(args)
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn steal_of_a_deployment_reaches_the_local_process_through_the_port_forward() {
    let cluster = Cluster::start().await;
    let local = TcpServer::local(|s| servers::http(s, LOCAL_BODY));
    let scenario = &cluster.scenario;

    let mut session = cluster
        .remocal(&["steal", "deploy/web", "--port", "80"])
        .local_port(local.port())
        .start()
        .await;
    assert!(
        session.ready_line().contains("pod shop/web"),
        "the ready line names the pod the deployment resolved to: {}",
        session.ready_line()
    );
    for addr in scenario.pod(0).addrs(80) {
        assert_eq!(scenario.curl(addr).await, LOCAL_BODY, "curl {addr}");
    }
    assert_eq!(scenario.pod_server(0, 80).accepted(), 0);

    assert!(
        session.ready_line().ends_with(&format!("as {DEVELOPER}")),
        "the agent knows who the developer is: {}",
        session.ready_line()
    );
    let ended = session.stop().await;
    assert_eq!(ended.code, Some(0), "{ended:?}");
    scenario.assert_pod_answers(0, 80).await;
    scenario.assert_nothing_attached(0);

    // The agent asked the cluster whether the developer may steal this very pod.
    let review = kube_api::AccessReview {
        user: DEVELOPER.into(),
        groups: vec!["system:authenticated".into()],
        verb: "create".into(),
        group: "remocal.dev".into(),
        resource: "pods".into(),
        subresource: "steal".into(),
        namespace: "shop".into(),
        name: "web".into(),
        path: String::new(),
        allowed: true,
    };
    assert_eq!(cluster.api.access_reviews(), vec![review]);
    // And told whoever looks at the pod who stole its port, and when it ended.
    let events = remocal_tests::retry::until_ok(
        tokio::time::Instant::now() + std::time::Duration::from_secs(10),
        std::time::Duration::from_millis(50),
        || async {
            let events: Vec<(String, String)> = cluster
                .api
                .events()
                .into_iter()
                .filter(|event| event.involved_object.name.as_deref() == Some("web"))
                .map(|event| {
                    (
                        event.reason.unwrap_or_default(),
                        event.message.unwrap_or_default(),
                    )
                })
                .collect();
            if events.len() >= 2 {
                Ok(events)
            } else {
                Err(events)
            }
        },
    )
    .await
    .expect("an event at the start and at the end of the session");
    assert_eq!(events[0].0, "RemocalStarted", "{events:?}");
    assert!(
        events[0]
            .1
            .starts_with(&format!("{DEVELOPER} started stealing port 80")),
        "{events:?}"
    );
    assert_eq!(events[1].0, "RemocalEnded", "{events:?}");
    assert!(
        events[1].1.contains("stopped stealing port 80"),
        "{events:?}"
    );

    let requests = cluster.api.requests();
    assert!(
        requests.contains(&format!(
            "{AGENT_USER} get /api/v1/namespaces/shop/pods/web"
        )),
        "the agent reads the pod with its own account: {requests:#?}"
    );
    assert!(
        requests.iter().any(|request| request.starts_with(&format!(
            "{DEVELOPER} create /api/v1/namespaces/remocal/pods/{AGENT_POD}/portforward"
        ))),
        "the client reaches the agent through the port-forward API: {requests:#?}"
    );
    assert_user_roles_grant(&requests);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mirror_of_a_pod_by_name_reads_kubeconfig_like_kubectl() {
    let cluster = Cluster::start().await;
    let local = TcpServer::local(|s| servers::http(s, LOCAL_BODY));
    let scenario = &cluster.scenario;

    // KUBECONFIG instead of --kubeconfig, with the context and namespace named.
    let mut session = Steal::remocal(&[
        "mirror",
        "--pod",
        "web",
        "-n",
        "shop",
        "--context",
        "dev",
        "--port",
        "80",
    ])
    .env("KUBECONFIG", &cluster.kubeconfig)
    .local_port(local.port())
    .start()
    .await;
    assert!(
        session.ready_line().contains("pod shop/web"),
        "{}",
        session.ready_line()
    );
    let addr = scenario.pod(0).v4(80);
    assert_eq!(scenario.curl(addr).await, POD_BODY, "the pod keeps serving");
    remocal_tests::retry::until_ok(
        tokio::time::Instant::now() + std::time::Duration::from_secs(10),
        std::time::Duration::from_millis(50),
        || async {
            if local.accepted() == 1 {
                Ok(())
            } else {
                Err(local.accepted())
            }
        },
    )
    .await
    .expect("the local process gets the copy");
    let ended = session.stop().await;
    assert_eq!(ended.code, Some(0), "{ended:?}");
    scenario.assert_nothing_attached(0);
    assert_user_roles_grant(&cluster.api.requests());
}

/// Every refusal, with its exit code and a message that says what to do, and
/// the pod untouched afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_refusal_names_the_problem() {
    let cluster = Cluster::start().await;
    let api = &cluster.api;
    let running = |namespace: &str, name: &str, node: &str| {
        kube_api::pod(namespace, name)
            .node(node)
            .running()
            .ready(true)
    };
    api.upsert_pod(kube_api::pod("shop", "starting").node("node-a").pending());
    api.upsert_pod(running("shop", "hostnet", "node-a").host_network(true));
    api.upsert_pod(running("shop", "elsewhere", "node-b"));
    api.upsert_pod(running("shop", "orphan", "node-c"));
    api.upsert_pod(running("shop", "stranded", "node-d"));
    api.upsert_pod(kube_api::agent_pod(
        "node-d",
        "remocal-agent-dead1",
        free_port(),
    ));
    api.upsert_pod(running("restricted", "locked", "node-a"));
    api.forbid(AGENT_USER, "get", "pods", "restricted");
    api.upsert_deployment(kube_api::deployment("shop", "idle", &[("app", "idle")]));
    api.upsert_pod(
        kube_api::pod("shop", "idle-1")
            .node("node-a")
            .labels(&[("app", "idle")])
            .pending(),
    );
    api.add_user("intern-token", "intern");
    api.forbid("intern", "create", "pods/portforward", "remocal");
    api.add_user("guest-token", "guest");
    api.forbid("guest", "get", "pods", "shop");
    let intern = api.kubeconfig("intern", "intern-token", Some("shop"));
    let guest = api.kubeconfig("guest", "guest-token", Some("shop"));
    let stranger = api.kubeconfig("stranger", "wrong-token", Some("shop"));
    let no_api_agent = Agent::start().await;
    let node_a_agent = cluster.scenario.agent.url();

    let cases: Vec<(Steal, i32, Vec<&str>)> = vec![
        (
            cluster.remocal(&["steal", "pod/nope"]),
            4,
            vec!["pod nope not found in namespace shop (context dev)"],
        ),
        (
            cluster.remocal(&["steal", "deploy/gone"]),
            4,
            vec!["deployment gone not found in namespace shop"],
        ),
        (
            cluster.remocal(&["steal", "deploy/idle"]),
            4,
            vec!["deployment shop/idle has no Running and Ready pod"],
        ),
        (
            cluster.remocal(&["steal", "pod/starting"]),
            8,
            vec!["pod shop/starting is Pending, not Running"],
        ),
        (
            cluster.remocal(&["steal", "pod/hostnet"]),
            8,
            vec!["shop/hostnet uses the node's network (hostNetwork)"],
        ),
        (
            cluster.remocal(&["steal", "pod/elsewhere", "--agent", &node_a_agent]),
            8,
            vec!["pod shop/elsewhere runs on node node-b, but this agent is on node node-a"],
        ),
        (
            cluster.remocal(&["steal", "pod/orphan"]),
            3,
            vec![
                "no remocal agent runs on node node-c",
                "kubectl apply -k manifests/",
            ],
        ),
        (
            cluster.remocal(&["steal", "pod/stranded"]),
            3,
            vec!["remocal-agent-dead1", "does not answer on port"],
        ),
        (
            cluster.remocal(&["steal", "pod/locked", "-n", "restricted"]),
            6,
            vec![
                "the agent's service account may not read pod restricted/locked",
                "re-apply manifests/",
            ],
        ),
        (
            Steal::remocal(&["steal", "pod/web", "--agent", &no_api_agent.url()])
                .arg("--kubeconfig")
                .arg(&cluster.kubeconfig),
            8,
            vec!["this agent cannot read pods from the Kubernetes API"],
        ),
        (
            Steal::remocal(&["steal", "pod/web", "--kubeconfig"]).arg(&intern),
            6,
            vec![
                "no permission to create pods/portforward in namespace remocal (context intern)",
                "manifests/user-roles.yaml",
            ],
        ),
        (
            Steal::remocal(&["steal", "pod/web", "--kubeconfig"]).arg(&guest),
            6,
            vec!["no permission to get pods in namespace shop (context guest)"],
        ),
        (
            Steal::remocal(&["steal", "pod/web", "--kubeconfig"]).arg(&stranger),
            6,
            vec!["did not accept your credentials"],
        ),
        (
            cluster.remocal(&["steal", "pod/web", "--context", "nosuch"]),
            2,
            vec!["context nosuch is not in your kubeconfig (it has: dev)"],
        ),
        (
            cluster.remocal(&["steal", "svc/web"]),
            2,
            vec!["cannot target a svc"],
        ),
    ];
    for (command, code, expected) in cases {
        let command = command.port(80);
        let finished: Finished = command.run_to_exit().await;
        assert_eq!(finished.code, Some(code), "{command:?}: {finished:?}");
        for text in expected {
            assert!(
                finished.stderr.contains(text),
                "{command:?}: expected {text:?} in {:?}",
                finished.stderr
            );
        }
        assert!(!finished.stderr.contains("panicked"), "{finished:?}");
    }
    cluster.scenario.assert_nothing_attached(0);
    cluster.scenario.assert_pod_answers(0, 80).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_lists_each_node_with_health_and_version() {
    let cluster = Cluster::start().await;
    cluster.api.upsert_pod(kube_api::agent_pod(
        "node-b",
        "remocal-agent-dead2",
        free_port(),
    ));

    let listed = cluster.remocal(&["agents"]).run_to_exit().await;
    assert_eq!(
        listed.code,
        Some(3),
        "an unhealthy agent is an error for scripts: {listed:?}"
    );
    let lines: Vec<&str> = listed.stdout.lines().collect();
    assert_eq!(lines.len(), 3, "a header and one line per node: {listed:?}");
    assert!(lines[0].starts_with("NODE"), "{listed:?}");
    assert!(
        lines[1].starts_with("node-a")
            && lines[1].contains(AGENT_POD)
            && lines[1].contains(env!("CARGO_PKG_VERSION"))
            && lines[1].ends_with("healthy"),
        "{listed:?}"
    );
    assert!(
        lines[2].starts_with("node-b") && lines[2].contains("unreachable"),
        "{listed:?}"
    );

    cluster.api.remove_pod("remocal", "remocal-agent-dead2");
    let json = cluster
        .remocal(&["agents", "--output", "json"])
        .run_to_exit()
        .await;
    assert_eq!(json.code, Some(0), "{json:?}");
    let agents: Vec<serde_json::Value> = json
        .stdout
        .lines()
        .map(|line| serde_json::from_str(line).expect("one JSON object per line"))
        .collect();
    assert_eq!(agents.len(), 1, "{json:?}");
    assert_eq!(agents[0]["node"], "node-a");
    assert_eq!(agents[0]["healthy"], true);
    assert_eq!(agents[0]["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(agents[0]["kubernetes_api"], true);
    assert_eq!(agents[0]["active_sessions"], 0);

    // A namespace the developer may list pods in, with no agent.
    user_roles::bind(&cluster.api, DEVELOPER, "remocal-user", "nowhere");
    let none = cluster
        .remocal(&["agents", "--agent-namespace", "nowhere"])
        .run_to_exit()
        .await;
    assert_eq!(none.code, Some(3), "{none:?}");
    assert!(
        none.stderr
            .contains("no remocal agents in namespace nowhere"),
        "{none:?}"
    );
    assert!(
        none.stderr.contains("kubectl apply -k manifests/"),
        "{none:?}"
    );
}

/// Every call the developer made is allowed by manifests/user-roles.yaml: a
/// user bound to those roles can do all of this.
fn assert_user_roles_grant(requests: &[String]) {
    let text = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../manifests/user-roles.yaml"),
    )
    .unwrap();
    let roles: Vec<Value> = serde_yaml::Deserializer::from_str(&text)
        .map(|document| Value::deserialize(document).unwrap())
        .collect();
    for request in requests
        .iter()
        .filter(|r| r.starts_with(&format!("{DEVELOPER} ")))
    {
        let mut parts = request.split(' ');
        let (_, verb, path) = (parts.next(), parts.next().unwrap(), parts.next().unwrap());
        let path = path.split('?').next().unwrap();
        let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
        let (group, rest) = match segments.as_slice() {
            ["api", "v1", rest @ ..] => ("", rest),
            ["apis", group, _version, rest @ ..] => (*group, rest),
            _ => panic!("unexpected API path {path}"),
        };
        let (namespace, resource) = match rest {
            ["namespaces", namespace, resource] | ["namespaces", namespace, resource, _] => {
                (*namespace, resource.to_string())
            }
            ["namespaces", namespace, resource, _, sub] => {
                (*namespace, format!("{resource}/{sub}"))
            }
            _ => panic!("unexpected API path {path}"),
        };
        let granted = roles.iter().any(|role| {
            let applies =
                role["kind"] == "ClusterRole" || role["metadata"]["namespace"] == namespace;
            applies
                && role["rules"].as_sequence().unwrap().iter().any(|rule| {
                    let has = |key: &str, value: &str| {
                        rule[key]
                            .as_sequence()
                            .unwrap()
                            .iter()
                            .any(|item| item == value)
                    };
                    has("apiGroups", group) && has("resources", &resource) && has("verbs", verb)
                })
        });
        assert!(
            granted,
            "manifests/user-roles.yaml does not grant `{request}`"
        );
    }
}
