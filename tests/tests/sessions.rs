//! `remocal sessions`: who intercepts what. A team on one cluster (the fake
//! API server, with the shipped roles bound as a platform team binds them)
//! steals, mirrors and targets a node's namespace for real; each developer
//! lists the sessions with the CLI and sees exactly what RBAC lets them
//! see, with the connections each session was really handed.

use std::time::Duration;

use remocal_tests::attacker::RawAgent;
use remocal_tests::http_clients::Http1;
use remocal_tests::kube_api;
use remocal_tests::kube_cluster::{KubeCluster, NODE};
use remocal_tests::processes::{Client, Finished, Steal, Target, free_port};
use remocal_tests::retry::until_ok;
use remocal_tests::scenario::Scenario;
use remocal_tests::servers::{self, TcpServer};
use remocal_tests::user_roles;
use serde_json::Value;
use tokio::time::Instant;
use tonic::Code;

const LOCAL_BODY: &str = "local";
/// Steals with a filter in `shop` (remocal-user).
const ALICE: &str = "alice-token";
/// Mirrors in `shop` (remocal-mirror-only).
const BOB: &str = "bob-token";
/// Looks only: remocal-user in `shop`, no session of her own.
const CAROL: &str = "carol-token";
/// Node admin (remocal-node-admin): targets a namespace of the node.
const DANA: &str = "dana-token";
/// May reach the agents, but may not `get` the pods of `shop`.
const EVE: &str = "eve-token";

struct Team {
    cluster: KubeCluster,
}

impl Team {
    async fn start() -> Team {
        let cluster = KubeCluster::start().await;
        let api = &cluster.api;
        for (token, user) in [
            (ALICE, "alice"),
            (BOB, "bob"),
            (CAROL, "carol"),
            (DANA, "dana"),
            (EVE, "eve"),
        ] {
            api.add_user(token, user);
            user_roles::bind_role(api, user, "remocal-user", "remocal");
        }
        user_roles::bind(api, "alice", "remocal-user", "shop");
        user_roles::bind(api, "bob", "remocal-mirror-only", "shop");
        user_roles::bind(api, "carol", "remocal-user", "shop");
        user_roles::bind(api, "dana", "remocal-node-admin", "");
        api.forbid("eve", "get", "pods", "shop");
        Team { cluster }
    }

    /// `remocal ARGS` as the user of `token`, whose context's namespace is `shop`.
    fn remocal(&self, token: &str, args: &[&str]) -> Steal {
        Steal::remocal(args)
            .arg("--kubeconfig")
            .arg(self.cluster.api.kubeconfig("dev", token, Some("shop")))
    }

    async fn sessions(&self, token: &str, args: &[&str]) -> Finished {
        let mut all = vec!["sessions"];
        all.extend_from_slice(args);
        self.remocal(token, &all).run_to_exit().await
    }

    /// `remocal sessions --output json` as `token`, one object per session.
    async fn sessions_json(&self, token: &str, args: &[&str]) -> Vec<Value> {
        let mut all = vec!["--output", "json"];
        all.extend_from_slice(args);
        let listed = self.sessions(token, &all).await;
        assert_eq!(listed.code, Some(0), "{listed:?}");
        listed
            .stdout
            .lines()
            .map(|line| serde_json::from_str(line).expect("one JSON object per line"))
            .collect()
    }

    /// bob mirrors shop/web:80 to a local echo server, until he stops.
    async fn bob_mirrors(&self) -> (TcpServer, Client) {
        let local = TcpServer::local(servers::echo);
        let session = self
            .remocal(BOB, &["mirror", "pod/web", "--port", "80"])
            .local_port(local.port())
            .start()
            .await;
        (local, session)
    }

    /// A new connection to the pod's port with one request, `x-dev: DEV`
    /// when given; its body.
    async fn request(&self, dev: Option<&str>) -> String {
        let scenario = &self.cluster.scenario;
        let mut client = Http1::connect(scenario.node(), scenario.pod(0).v4(80))
            .await
            .expect("connect to the pod");
        client
            .get("/", dev)
            .await
            .expect("an answer")
            .text()
            .trim()
            .to_string()
    }
}

/// `remocal sessions --agent URL ARGS` on a machine without a kubeconfig.
async fn without_kubeconfig(url: &str, args: &[&str]) -> Finished {
    let mut all = vec!["sessions", "--agent", url];
    all.extend_from_slice(args);
    Steal::remocal(&all)
        .env("KUBECONFIG", "/nonexistent/kubeconfig")
        .run_to_exit()
        .await
}

/// The `sessions` rows of a text listing: cells split on the table's gaps.
fn rows(listed: &Finished) -> Vec<Vec<String>> {
    listed
        .stdout
        .lines()
        .map(|line| {
            line.split("  ")
                .map(str::trim)
                .filter(|cell| !cell.is_empty())
                .map(str::to_string)
                .collect()
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_developer_sees_who_intercepts_the_pods_they_may_see() {
    let team = Team::start().await;
    let netns = team.cluster.scenario.pod(0).netns.path().to_path_buf();

    let alices = TcpServer::local(|s| servers::http(s, LOCAL_BODY));
    let mut alice = team
        .remocal(ALICE, &["steal", "pod/web", "--port", "80"])
        .arg("--header")
        .arg("x-dev: alice")
        .local_port(alices.port())
        .start()
        .await;
    let (_bobs, mut bob) = team.bob_mirrors().await;
    let danas = TcpServer::local(|s| servers::http(s, LOCAL_BODY));
    let mut dana = team
        .remocal(DANA, &["steal", "--port", "81"])
        .arg("--agent")
        .arg(team.cluster.scenario.agent.url())
        .target(&Target::Netns(netns.clone()))
        .local_port(danas.port())
        .start()
        .await;

    // Two connections with alice's requests, one with nobody's: alice was
    // handed two, bob's mirror copied all three.
    assert_eq!(team.request(Some("alice")).await, LOCAL_BODY);
    assert_eq!(team.request(Some("alice")).await, LOCAL_BODY);
    assert_ne!(team.request(None).await, LOCAL_BODY);

    // carol may get shop's pods, and is no node admin.
    let carol_from = Instant::now();
    let counted = until_ok(
        Instant::now() + Duration::from_secs(10),
        Duration::from_millis(100),
        || async {
            let listed = team.sessions(CAROL, &[]).await;
            let table = rows(&listed);
            let counts: Vec<&str> = table.iter().skip(1).map(|row| row[6].as_str()).collect();
            if counts == ["2", "3"] {
                Ok(listed)
            } else {
                Err(listed)
            }
        },
    )
    .await
    .unwrap_or_else(|listed| {
        panic!("alice's and bob's sessions with 2 and 3 connections: {listed:?}")
    });
    assert_eq!(counted.code, Some(0), "{counted:?}");
    let table = rows(&counted);
    assert_eq!(
        table[0],
        [
            "TARGET",
            "PORT",
            "MODE",
            "FILTER",
            "USER",
            "FROM",
            "CONNECTIONS",
            "AGE",
            "NODE"
        ],
        "{counted:?}"
    );
    assert_eq!(table.len(), 3, "oldest first, dana's hidden: {counted:?}");
    assert_eq!(
        table[1][..5],
        ["pod/web", "80", "steal", "--header 'x-dev: alice'", "alice"]
    );
    assert_eq!(table[2][..5], ["pod/web", "80", "mirror", "-", "bob"]);
    for row in &table[1..] {
        assert!(row[5].contains('@'), "FROM is user@host: {row:?}");
        assert!(row[7].ends_with('s'), "started seconds ago: {row:?}");
        assert_eq!(row[8], NODE);
    }
    assert!(
        !counted.stderr.contains("more session"),
        "how many are hidden in one namespace is not said: {counted:?}"
    );

    // The same as JSON lines, for scripts.
    let json = team.sessions_json(CAROL, &[]).await;
    assert_eq!(json.len(), 2, "{json:?}");
    assert_eq!(json[0]["namespace"], "shop");
    assert_eq!(json[0]["pod"], "web");
    assert_eq!(json[0]["target"], "pod shop/web");
    assert_eq!(json[0]["port"], 80);
    assert_eq!(json[0]["mode"], "steal");
    assert_eq!(json[0]["filter"]["headers"][0]["name"], "x-dev");
    assert_eq!(json[0]["filter"]["headers"][0]["value"], "alice");
    assert_eq!(json[0]["user"], "alice");
    assert_eq!(json[0]["connections"], 2);
    assert_eq!(json[0]["node"], NODE);
    assert!(json[0]["age_seconds"].as_u64().unwrap() < 120, "{json:?}");
    let started = json[0]["started"].as_str().expect("a timestamp");
    assert!(
        started.starts_with("20") && started.ends_with('Z'),
        "RFC 3339 UTC: {started}"
    );
    assert_eq!(json[1]["mode"], "mirror");
    assert_eq!(json[1]["filter"], Value::Null);
    assert_eq!(json[1]["connections"], 3);

    // eve may reach the agents but not read shop's pods: nothing of them,
    // and for all namespaces, how many she may not see.
    let hidden = team.sessions(EVE, &[]).await;
    assert_eq!(hidden.code, Some(0), "{hidden:?}");
    assert_eq!(hidden.stdout, "", "{hidden:?}");
    assert!(
        hidden
            .stderr
            .contains("No sessions found in namespace shop")
            && !hidden.stderr.contains("more session"),
        "{hidden:?}"
    );
    let hidden = team.sessions(EVE, &["--all-namespaces"]).await;
    assert_eq!(hidden.stdout, "", "{hidden:?}");
    assert!(
        hidden.stderr.contains("No sessions found.")
            && hidden.stderr.contains("3 more session(s) on node-a:"),
        "{hidden:?}"
    );
    // carol, in every namespace: alice's and bob's, and one she may not see.
    let carols = team.sessions(CAROL, &["-A"]).await;
    assert_eq!(rows(&carols).len(), 3, "{carols:?}");
    assert!(
        carols.stderr.contains("1 more session(s) on node-a:"),
        "{carols:?}"
    );

    // dana, node admin, sees her own namespace session and, in every
    // namespace, the pods' too (the fake lets her `get` pods).
    let everywhere = team.sessions(DANA, &["-A"]).await;
    assert_eq!(everywhere.code, Some(0), "{everywhere:?}");
    let table = rows(&everywhere);
    assert_eq!(table[0][0], "NAMESPACE", "{everywhere:?}");
    assert_eq!(table.len(), 4, "{everywhere:?}");
    assert_eq!(
        table[3][..4],
        ["-", &format!("netns={}", netns.display()), "81", "steal"]
    );
    assert_eq!(table[3][5], "dana");

    // Another namespace: no pod session, and the node's one is not hers.
    let elsewhere = team.sessions(CAROL, &["-n", "payments"]).await;
    assert_eq!(elsewhere.code, Some(0), "{elsewhere:?}");
    assert_eq!(elsewhere.stdout, "", "{elsewhere:?}");
    assert!(
        elsewhere
            .stderr
            .contains("No sessions found in namespace payments"),
        "{elsewhere:?}"
    );
    let both = team.sessions(CAROL, &["-A", "-n", "shop"]).await;
    assert_eq!(both.code, Some(2), "{both:?}");

    // A listing asks whether the caller may get the pod (once, whatever
    // the number of sessions on it), and the verdict serves the next
    // listings for 10 s: carol listed shop's sessions at least 3 times,
    // and asked again only as often as verdicts expired meanwhile.
    let verdicts_expired = carol_from.elapsed().as_secs() / 10;
    let reviews = team.cluster.api.access_reviews();
    let carol_reads: Vec<_> = reviews
        .iter()
        .filter(|review| review.user == "carol" && review.verb == "get")
        .collect();
    assert!(
        !carol_reads.is_empty() && carol_reads.len() as u64 <= 1 + verdicts_expired,
        "{verdicts_expired} expiries: {carol_reads:#?}"
    );
    assert!(
        carol_reads.iter().all(|review| review.group.is_empty()
            && review.resource == "pods"
            && review.namespace == "shop"
            && review.name == "web"
            && review.allowed),
        "{carol_reads:#?}"
    );
    assert!(
        reviews.iter().any(|review| review.user == "eve"
            && review.verb == "get"
            && review.name == "web"
            && !review.allowed),
        "{reviews:#?}"
    );

    // A session that ends leaves the listing.
    assert_eq!(alice.stop().await.code, Some(0));
    let json = team.sessions_json(CAROL, &[]).await;
    assert_eq!(json.len(), 1, "{json:?}");
    assert_eq!(json[0]["user"], "bob");
    assert_eq!(bob.stop().await.code, Some(0));
    assert_eq!(dana.stop().await.code, Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callers_without_credentials_or_with_bad_input_learn_nothing() {
    let team = Team::start().await;
    let (_bobs, mut bob) = team.bob_mirrors().await;
    let url = team.cluster.scenario.agent.url();

    let anonymous = RawAgent::connect(&url, None).await;
    let status = anonymous
        .list_sessions("")
        .await
        .expect_err("no credential, no listing");
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    let stranger = RawAgent::with_token(&url, "not-a-token").await;
    let status = stranger
        .list_sessions("shop")
        .await
        .expect_err("a token the cluster rejects, no listing");
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    // Through the CLI: exit 6, naming what was missing.
    let finished = without_kubeconfig(&url, &[]).await;
    assert_eq!(finished.code, Some(6), "{finished:?}");
    assert!(finished.stderr.contains("no credential"), "{finished:?}");

    let carol = RawAgent::with_token(&url, CAROL).await;
    let status = carol
        .list_sessions("../kube-system")
        .await
        .expect_err("not a namespace name");
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(
        status.message().contains("not a namespace name"),
        "{status:?}"
    );
    let listed = carol.list_sessions("shop").await.expect("carol may list");
    assert_eq!(listed.sessions.len(), 1, "{listed:?}");
    assert_eq!(listed.sessions[0].user, "bob");

    // An agent that does not answer: the others' sessions still show, and
    // the exit status says one failed.
    team.cluster.api.upsert_pod(kube_api::agent_pod(
        "node-b",
        "remocal-agent-dead2",
        free_port(),
    ));
    let partial = team.sessions(CAROL, &[]).await;
    assert_eq!(partial.code, Some(3), "{partial:?}");
    assert!(partial.stdout.contains("bob"), "{partial:?}");
    assert!(partial.stderr.contains("error: node node-b"), "{partial:?}");
    assert!(!partial.stderr.contains("panicked"), "{partial:?}");
    assert_eq!(bob.stop().await.code, Some(0));
}

/// A developer's own machine: an agent with `--auth none` on loopback,
/// no kubeconfig, asked with --agent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_local_agent_lists_its_sessions_without_a_cluster() {
    let scenario = Scenario::start(1, &[80]).await;
    let local = TcpServer::local(|s| servers::http(s, LOCAL_BODY));
    let url = scenario.agent.url();
    let mut steal = scenario.steal(0, 80, &local).start().await;
    assert_eq!(scenario.curl(scenario.pod(0).v4(80)).await, LOCAL_BODY);

    let listed = without_kubeconfig(&url, &["--output", "json"]).await;
    assert_eq!(listed.code, Some(0), "{listed:?}");
    let sessions: Vec<Value> = listed
        .stdout
        .lines()
        .map(|line| serde_json::from_str(line).expect("one JSON object per line"))
        .collect();
    assert_eq!(sessions.len(), 1, "{listed:?}");
    let netns = scenario.pod(0).netns.path().display().to_string();
    assert_eq!(sessions[0]["target"], format!("netns={netns}"));
    assert_eq!(sessions[0]["namespace"], Value::Null);
    assert_eq!(sessions[0]["user"], "anonymous");
    assert_eq!(sessions[0]["connections"], 1);
    assert_eq!(steal.stop().await.code, Some(0));

    let empty = without_kubeconfig(&url, &[]).await;
    assert_eq!(empty.code, Some(0), "{empty:?}");
    assert!(empty.stderr.contains("No sessions found."), "{empty:?}");

    let dead = format!("http://127.0.0.1:{}", free_port());
    let unreachable = without_kubeconfig(&dead, &[]).await;
    assert_eq!(unreachable.code, Some(3), "{unreachable:?}");
    assert!(
        unreachable.stderr.contains("cannot reach"),
        "{unreachable:?}"
    );
}
