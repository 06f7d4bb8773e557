//! Who may steal what. The agent is called as an attacker would call it
//! (a gRPC client built from the proto, `remocal_tests::attacker`) and as
//! developers do (the `remocal` CLI with their kubeconfig): no credential, a
//! wrong or expired token, a certificate of another CA, a user without the
//! RBAC grant, another user's session id, hostile namespace paths and
//! floods. Each gets the documented refusal or bound, and the legitimate
//! session beside it keeps working. Callers are checked by the agent with
//! real TokenReviews and SubjectAccessReviews against the fake API server,
//! whose RBAC is the shipped roles of manifests/user-roles.yaml.

use std::time::Duration;

use futures::StreamExt as _;
use remocal_proto::v1::{HeaderMatch, HttpFilter, Mode, connection_downstream};
use remocal_tests::attacker::{self, RawAgent};
use remocal_tests::kube_api::KeyKind;
use remocal_tests::kube_cluster::{KubeCluster, NODE};
use remocal_tests::processes::{Client, Finished, Steal};
use remocal_tests::servers::{self, TcpServer};
use remocal_tests::user_roles;
use tonic::Code;

const LOCAL_BODY: &str = "local";
/// May steal and mirror in `shop` (remocal-user).
const ALICE: &str = "alice-token";
/// May only mirror in `shop` (remocal-mirror-only).
const BOB: &str = "bob-token";
/// May target any namespace of node-a (remocal-node-admin).
const DANA: &str = "dana-token";
/// Authenticated, granted nothing.
const EVE: &str = "eve-token";

struct Secured {
    cluster: KubeCluster,
}

impl Secured {
    async fn start() -> Secured {
        let cluster = KubeCluster::start().await;
        let api = &cluster.api;
        api.add_user_in_groups(ALICE, "alice", &["developers"]);
        api.add_user(BOB, "bob");
        api.add_user(DANA, "dana");
        api.add_user(EVE, "eve");
        user_roles::bind(api, "alice", "remocal-user", "shop");
        user_roles::bind(api, "bob", "remocal-mirror-only", "shop");
        user_roles::bind(api, "dana", "remocal-node-admin", "");
        for user in ["alice", "bob", "dana", "eve", "carol", "erin"] {
            user_roles::bind_role(api, user, "remocal-user", "remocal");
        }
        Secured { cluster }
    }

    fn url(&self) -> String {
        self.cluster.scenario.agent.url()
    }

    async fn as_user(&self, token: &str) -> RawAgent {
        RawAgent::with_token(&self.url(), token).await
    }

    /// `remocal ARGS --port 80` with a kubeconfig holding `token`.
    fn remocal(&self, token: &str, args: &[&str]) -> Steal {
        with_kubeconfig(
            &self.cluster.api.kubeconfig("dev", token, Some("shop")),
            args,
        )
    }

    /// `remocal steal pod/web` with `kubeconfig`: the agent takes the caller
    /// for `user`, and the pod's port reaches a local process until it stops.
    async fn steals_as(&self, kubeconfig: &std::path::Path, user: &str) {
        let local = TcpServer::local(|s| servers::http(s, LOCAL_BODY));
        let mut session = with_kubeconfig(kubeconfig, &["steal", "pod/web"])
            .local_port(local.port())
            .start()
            .await;
        assert!(
            session.ready_line().ends_with(&format!("as {user}")),
            "{}",
            session.ready_line()
        );
        let addr = self.cluster.scenario.pod(0).v4(80);
        assert_eq!(self.cluster.scenario.curl(addr).await, LOCAL_BODY);
        let ended = session.stop().await;
        assert_eq!(ended.code, Some(0), "{ended:?}");
    }

    fn pod_netns(&self) -> String {
        self.cluster
            .scenario
            .pod(0)
            .netns
            .path()
            .display()
            .to_string()
    }

    fn agent_logs(&self) -> String {
        self.cluster.scenario.agent.logs()
    }

    async fn metric(&self, sample: &str) -> f64 {
        self.cluster.scenario.agent.metric(sample).await
    }

    /// The pod serves its own traffic and nothing of remocal is attached.
    async fn assert_untouched(&self) {
        self.cluster.scenario.assert_nothing_attached(0);
        self.cluster.scenario.assert_pod_answers(0, 80).await;
    }
}

/// alice stealing shop/web:80 with the CLI, beside whatever a test does.
struct Legitimate {
    local: TcpServer,
    session: Client,
}

impl Secured {
    async fn legitimate_steal(&self) -> Legitimate {
        let local = TcpServer::local(|s| servers::http(s, LOCAL_BODY));
        let session = self
            .remocal(ALICE, &["steal", "pod/web"])
            .local_port(local.port())
            .start()
            .await;
        Legitimate { local, session }
    }
}

impl Legitimate {
    /// Her local process still answers the pod's port; then she stops.
    async fn still_served_then_stop(mut self, secured: &Secured) {
        let addr = secured.cluster.scenario.pod(0).v4(80);
        let served = self.local.accepted();
        assert_eq!(secured.cluster.scenario.curl(addr).await, LOCAL_BODY);
        assert_eq!(self.local.accepted(), served + 1);
        let ended = self.session.stop().await;
        assert_eq!(ended.code, Some(0), "{ended:?}");
    }
}

/// `remocal ARGS --port 80 --kubeconfig PATH`.
fn with_kubeconfig(kubeconfig: &std::path::Path, args: &[&str]) -> Steal {
    Steal::remocal(args)
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .port(80)
}

fn assert_refused<T: std::fmt::Debug>(
    result: Result<T, tonic::Status>,
    code: Code,
    says: &[&str],
) -> tonic::Status {
    let status = result.expect_err("the agent must refuse this call");
    assert_eq!(status.code(), code, "{status:?}");
    for part in says {
        assert!(status.message().contains(part), "{part:?} in {status:?}");
    }
    status
}

fn assert_exit(finished: &Finished, code: i32, says: &[&str]) {
    assert_eq!(finished.code, Some(code), "{finished:?}");
    for part in says {
        assert!(finished.stderr.contains(part), "{part:?} in {finished:?}");
    }
    assert!(!finished.stderr.contains("panicked"), "{finished:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_without_a_valid_credential_are_unauthenticated() {
    let secured = Secured::start().await;
    let api = &secured.cluster.api;
    let url = secured.url();
    // alice steals the port all along; nothing below may disturb her.
    let legitimate = secured.legitimate_steal().await;

    // Every call, the hand-framed data call included, needs a credential.
    let anonymous = RawAgent::connect(&url, None).await;
    let status = assert_refused(
        anonymous.info().await,
        Code::Unauthenticated,
        &["no credential"],
    );
    assert!(
        status.metadata().get_bin("remocal-challenge-bin").is_some(),
        "an unauthenticated answer carries a challenge for certificate users"
    );
    assert_refused(
        anonymous
            .open(attacker::pod("shop", "web"), 80, Mode::Steal)
            .await,
        Code::Unauthenticated,
        &["no credential"],
    );
    assert_refused(
        anonymous.standby("00000000000000000000000000000000").await,
        Code::Unauthenticated,
        &[],
    );
    assert_refused(
        anonymous
            .attach("00000000000000000000000000000000", 1)
            .await,
        Code::Unauthenticated,
        &[],
    );

    let stranger = RawAgent::with_token(&url, "not-a-token").await;
    assert_refused(
        stranger
            .open(attacker::pod("shop", "web"), 80, Mode::Mirror)
            .await,
        Code::Unauthenticated,
        &["the cluster rejected your token"],
    );
    api.expire_token(BOB);
    let expired = secured.as_user(BOB).await;
    assert_refused(
        expired.info().await,
        Code::Unauthenticated,
        &["rejected your token", "expired"],
    );
    let empty = RawAgent::connect(&url, Some("Bearer ")).await;
    assert_refused(empty.info().await, Code::Unauthenticated, &["empty"]);
    let malformed = RawAgent::connect(&url, Some("Remocal-Certificate !!!")).await;
    assert_refused(
        malformed.info().await,
        Code::Unauthenticated,
        &["malformed"],
    );

    // A certificate of another CA, through the CLI: exit 6, saying why.
    let foreign = api.foreign_client_certificate("mallory", &["developers"], KeyKind::EcdsaP256);
    let kubeconfig = api.kubeconfig_with_certificate("mallory", &foreign, Some("shop"));
    let finished = with_kubeconfig(&kubeconfig, &["steal", "pod/web", "--agent", &url])
        .run_to_exit()
        .await;
    assert_exit(
        &finished,
        6,
        &["does not know who you are", "not valid for this cluster"],
    );
    // A token is never sent in clear text to another machine.
    let finished = secured
        .remocal(
            ALICE,
            &["steal", "pod/web", "--agent", "http://192.0.2.1:7420"],
        )
        .run_to_exit()
        .await;
    assert_exit(&finished, 2, &["plain HTTP to another machine"]);
    // No credential at all, through the CLI: exit 6 naming what was missing.
    let finished = Steal::remocal(&["steal", "pod/web", "-n", "shop", "--agent", &url])
        .env("KUBECONFIG", "/nonexistent/kubeconfig")
        .port(80)
        .run_to_exit()
        .await;
    assert_exit(
        &finished,
        6,
        &["no credential", "remocal sent no credential"],
    );

    assert!(
        secured
            .metric(r#"remocal_session_errors_total{reason="Unauthenticated"}"#)
            .await
            >= 8.0
    );
    legitimate.still_served_then_stop(&secured).await;
    secured.assert_untouched().await;
    // A rejected token is not asked about again and again.
    let reviews = api.token_reviews();
    assert_eq!(
        reviews
            .iter()
            .filter(|token| *token == "not-a-token")
            .count(),
        1,
        "{reviews:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn users_of_client_certificates_prove_their_key() {
    let secured = Secured::start().await;
    let api = &secured.cluster.api;
    // k3s writes ECDSA keys, kind and minikube RSA ones.
    for (user, kind) in [("carol", KeyKind::EcdsaP256), ("erin", KeyKind::Rsa2048)] {
        user_roles::bind(api, user, "remocal-user", "shop");
        let certificate = api.client_certificate(user, &["developers"], kind);
        let kubeconfig = api.kubeconfig_with_certificate(user, &certificate, Some("shop"));
        secured.steals_as(&kubeconfig, user).await;
    }
    let reviews = api.access_reviews();
    for user in ["carol", "erin"] {
        assert!(
            reviews.iter().any(|review| review.user == user
                && review.groups.contains(&"developers".to_string())
                && review.subresource == "steal"
                && review.allowed),
            "{user} authorized with the certificate's CN and O: {reviews:#?}"
        );
    }
    // Asking for a challenge to sign is not an authentication failure.
    assert_eq!(
        secured
            .metric(r#"remocal_session_errors_total{reason="Unauthenticated"}"#)
            .await,
        0.0
    );
    secured.assert_untouched().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rbac_decides_who_may_steal_or_mirror_which_pod() {
    let secured = Secured::start().await;
    let api = &secured.cluster.api;
    // A pod in a namespace alice has no grant in, on this node.
    api.upsert_pod(
        remocal_tests::kube_api::pod("payments", "ledger")
            .node(NODE)
            .running()
            .ready(true),
    );
    let alice = secured.as_user(ALICE).await;
    for (namespace, name) in [("payments", "ledger"), ("payments", "no-such-pod")] {
        // Denied the same way whether the pod exists or not: a caller
        // without the grant learns nothing about the target.
        assert_refused(
            alice
                .open(attacker::pod(namespace, name), 80, Mode::Steal)
                .await,
            Code::PermissionDenied,
            &[
                "\"alice\"",
                "create pods/steal",
                "remocal.dev",
                "\"payments\"",
            ],
        );
    }
    // Names that are not Kubernetes names never reach the API.
    for (namespace, name) in [
        ("shop", "web/status"),
        ("../kube-system", "x"),
        ("shop", "Web"),
    ] {
        assert_refused(
            alice
                .open(attacker::pod(namespace, name), 80, Mode::Steal)
                .await,
            Code::InvalidArgument,
            &["is not a pod's namespace/name"],
        );
    }
    // Allowed in shop.
    let session = alice
        .open(attacker::pod("shop", "web"), 80, Mode::Steal)
        .await
        .expect("alice may steal in shop");
    assert_eq!(session.ready.user, "alice");
    drop(session);

    // bob may mirror, not steal.
    let bob = secured.as_user(BOB).await;
    assert_refused(
        bob.open(attacker::pod("shop", "web"), 80, Mode::Steal)
            .await,
        Code::PermissionDenied,
        &["\"bob\"", "create pods/steal", "remocal-user"],
    );
    let mirror = bob
        .open(attacker::pod("shop", "web"), 80, Mode::Mirror)
        .await
        .expect("bob may mirror in shop");
    drop(mirror);

    // Namespaces and processes of the node are for node admins only.
    let eve = secured.as_user(EVE).await;
    for target in [
        attacker::netns(&secured.pod_netns()),
        attacker::netns("/var/run/netns/no-such-namespace"),
    ] {
        assert_refused(
            alice.open(target.clone(), 80, Mode::Steal).await,
            Code::PermissionDenied,
            &["create nodes/targets", NODE, "remocal-node-admin"],
        );
        assert_refused(
            eve.open(target, 80, Mode::Mirror).await,
            Code::PermissionDenied,
            &["\"eve\"", "nodes/targets"],
        );
    }
    let dana = secured.as_user(DANA).await;
    // alice's steal of that namespace's port 80 above ends as its call drops.
    let session = once_free(|| dana.open(attacker::netns(&secured.pod_netns()), 80, Mode::Steal))
        .await
        .expect("a node admin may target the node's namespaces");
    drop(session);

    // Through the CLI: exit 6 with the agent's reason.
    let finished = secured
        .remocal(ALICE, &["steal", "pod/ledger", "-n", "payments"])
        .run_to_exit()
        .await;
    assert_exit(&finished, 6, &["may not create pods/steal", "payments"]);

    assert!(
        secured
            .metric(r#"remocal_session_errors_total{reason="PermissionDenied"}"#)
            .await
            >= 7.0
    );
    let logs = secured.agent_logs();
    assert!(
        logs.contains("session refused") && logs.contains("alice"),
        "denials are logged with the user: {logs}"
    );
    secured.assert_untouched().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_filtered_steal_needs_its_own_grant() {
    let secured = Secured::start().await;
    let api = &secured.cluster.api;
    // frank may steal whole ports of shop, not requests of them.
    api.add_user("frank-token", "frank");
    api.strict("frank");
    api.grant("frank", "create", "remocal.dev", "pods/steal", "shop");
    let filter = HttpFilter {
        headers: vec![HeaderMatch {
            name: "x-dev".into(),
            value: "^frank$".into(),
        }],
        ..HttpFilter::default()
    };
    let frank = secured.as_user("frank-token").await;
    assert_refused(
        frank
            .open_filtered(attacker::pod("shop", "web"), 80, filter.clone())
            .await,
        Code::PermissionDenied,
        &["\"frank\"", "create pods/steal-filtered", "remocal-user"],
    );
    drop(
        frank
            .open(attacker::pod("shop", "web"), 80, Mode::Steal)
            .await
            .expect("frank may steal the whole port"),
    );

    // bob may only mirror: the CLI exits 6 naming the grant.
    let finished = secured
        .remocal(BOB, &["steal", "pod/web", "--header", "x-dev: bob"])
        .run_to_exit()
        .await;
    assert_exit(&finished, 6, &["may not create pods/steal-filtered"]);

    // alice's remocal-user grants it; the agent echoes the filter it applies.
    let alice = secured.as_user(ALICE).await;
    // frank's session above ends as its call drops.
    let session =
        once_free(|| alice.open_filtered(attacker::pod("shop", "web"), 80, filter.clone()))
            .await
            .expect("alice may steal requests in shop");
    assert_eq!(session.ready.user, "alice");
    assert_eq!(session.ready.filter, Some(filter));
}

/// Ending a pod's connections (`--reset-existing`) is a grant of its own,
/// beside the steal's: without it the CLI exits 6 naming it, and nothing
/// is redirected; the same user steals without the flag.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ending_the_pods_connections_needs_its_own_grant() {
    let secured = Secured::start().await;
    let api = &secured.cluster.api;
    // grace may find and steal the pods of shop, not end their connections.
    api.add_user("grace-token", "grace");
    api.strict("grace");
    for verb in ["get", "list"] {
        api.grant("grace", verb, "", "pods", "shop");
    }
    api.grant("grace", "create", "remocal.dev", "pods/steal", "shop");
    user_roles::bind_role(api, "grace", "remocal-user", "remocal");
    let local = TcpServer::local(|s| servers::http(s, LOCAL_BODY));

    let finished = secured
        .remocal("grace-token", &["steal", "pod/web", "--reset-existing"])
        .local_port(local.port())
        .run_to_exit()
        .await;
    assert_exit(
        &finished,
        6,
        &["\"grace\"", "may not create pods/reset-connections"],
    );
    assert!(!finished.stdout.contains("ready"), "{finished:?}");
    assert_eq!(local.accepted(), 0);
    secured.assert_untouched().await;
    let reviews = api.access_reviews();
    assert!(
        reviews.iter().any(|review| review.user == "grace"
            && review.group == "remocal.dev"
            && review.resource == "pods"
            && review.subresource == "reset-connections"
            && review.namespace == "shop"
            && review.name == "web"
            && !review.allowed),
        "the agent asked whether grace may end web's connections: {reviews:#?}"
    );

    let kubeconfig = api.kubeconfig("dev", "grace-token", Some("shop"));
    secured.steals_as(&kubeconfig, "grace").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_belongs_to_who_opened_it() {
    let secured = Secured::start().await;
    let scenario = &secured.cluster.scenario;
    let alice = secured.as_user(ALICE).await;
    let mut session = alice
        .open(attacker::pod("shop", "web"), 80, Mode::Steal)
        .await
        .expect("alice steals shop/web:80");
    let id = session.ready.session_id.clone();
    assert_eq!(id.len(), 32, "128 random bits: {id}");
    assert!(id.bytes().all(|byte| byte.is_ascii_hexdigit()), "{id}");

    // Another authenticated user with alice's session id gets nothing.
    let eve = secured.as_user(EVE).await;
    assert_refused(eve.standby(&id).await, Code::NotFound, &["no session"]);
    assert_refused(eve.attach(&id, 1).await, Code::NotFound, &["no session"]);
    assert!(
        secured
            .agent_logs()
            .contains("refused a connection call for a session of another user"),
        "{}",
        secured.agent_logs()
    );

    // A conflict names the holder by verified name, never by session id.
    let carol_token = "carol-token";
    secured.cluster.api.add_user(carol_token, "carol");
    user_roles::bind(&secured.cluster.api, "carol", "remocal-user", "shop");
    let carol = secured.as_user(carol_token).await;
    let status = assert_refused(
        carol
            .open(attacker::pod("shop", "web"), 80, Mode::Steal)
            .await,
        Code::AlreadyExists,
        &["already stolen by alice (from attacker@nowhere)"],
    );
    assert!(!status.message().contains(&id), "{status:?}");

    // alice's own call gets the next stolen connection.
    let mut standby = alice.standby(&id).await.expect("alice's standby call");
    let addr = scenario.pod(0).v4(80);
    let client = scenario
        .node()
        .connect(addr)
        .await
        .expect("connect to the pod");
    let first = tokio::time::timeout(Duration::from_secs(10), standby.message())
        .await
        .expect("a connection within 10 s")
        .expect("the call goes on")
        .expect("a first message");
    assert!(
        matches!(first.kind, Some(connection_downstream::Kind::Connection(_))),
        "{first:?}"
    );
    drop(client);
    let _ = session
        .requests
        .try_send(remocal_proto::v1::SessionRequest {
            kind: Some(remocal_proto::v1::session_request::Kind::Close(
                remocal_proto::v1::CloseSession {},
            )),
        });
    let _ = tokio::time::timeout(Duration::from_secs(5), session.events.message()).await;
}

/// A FIFO in /var/run/netns, removed even when the test fails.
struct Fifo(std::path::PathBuf);

impl Fifo {
    fn create() -> Fifo {
        let dir = std::path::Path::new("/var/run/netns");
        std::fs::create_dir_all(dir).expect("/var/run/netns");
        let path = dir.join(format!("remocal-fifo-{}", std::process::id()));
        let _ = std::fs::remove_file(&path);
        nix::unistd::mkfifo(&path, nix::sys::stat::Mode::from_bits_truncate(0o600))
            .expect("mkfifo");
        Fifo(path)
    }
}

impl Drop for Fifo {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_namespace_paths_reveal_nothing_and_cannot_hang_the_agent() {
    let mut secured = Secured::start().await;
    // Even a node admin names only namespaces.
    let dana = secured.as_user(DANA).await;
    for path in [
        "/proc/1/root/etc/shadow",
        "/proc/1/root/etc/no-such-file",
        "/var/run/netns/../../etc/passwd",
        "/proc/self/ns/net",
        "/dev/zero",
    ] {
        let status = assert_refused(
            dana.open(attacker::netns(path), 80, Mode::Steal).await,
            Code::InvalidArgument,
            &["is not a namespace path remocal accepts"],
        );
        // The same answer whether the file exists or not.
        assert!(!status.message().contains("does not exist"), "{status:?}");
    }
    let fifo = Fifo::create();
    assert_refused(
        dana.open(
            attacker::netns(&fifo.0.display().to_string()),
            80,
            Mode::Steal,
        )
        .await,
        Code::InvalidArgument,
        &["is not a network namespace"],
    );
    // Nothing was left waiting on the FIFO: the agent stops at once when told.
    let agent = &mut secured.cluster.scenario.agent;
    let status = agent.terminate(Duration::from_secs(10)).await;
    assert!(
        status.is_some_and(|status| status.success()),
        "the agent exits on SIGTERM: {status:?}\n{}",
        agent.logs()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_cannot_exhaust_the_agent_with_sessions_or_calls() {
    let secured = Secured::start().await;
    let alice = secured.as_user(ALICE).await;
    // Mirrors share a port, so nothing but the limit stops the 17th; and
    // opened all at once, none slips past the check while others start.
    let opens = (0..20).map(|_| alice.open(attacker::pod("shop", "web"), 80, Mode::Mirror));
    let (held, refused): (Vec<_>, Vec<_>) = futures::future::join_all(opens)
        .await
        .into_iter()
        .partition(Result::is_ok);
    assert_eq!(held.len(), 16, "{refused:?}");
    for refusal in refused {
        assert_refused(
            refusal,
            Code::ResourceExhausted,
            &["alice already holds 16 sessions", "at most 16 per user"],
        );
    }
    let held: Vec<_> = held.into_iter().map(Result::unwrap).collect();
    // One session's calls waiting for connections are bounded too.
    let id = held[0].ready.session_id.clone();
    let mut calls = Vec::new();
    for _ in 0..256 {
        calls.push(
            alice
                .standby(&id)
                .await
                .expect("a standby call within the limit"),
        );
    }
    assert_refused(
        alice.standby(&id).await,
        Code::ResourceExhausted,
        &["256 standby calls"],
    );
    assert!(
        secured
            .metric(r#"remocal_session_errors_total{reason="ResourceExhausted"}"#)
            .await
            >= 1.0
    );
    // Hundreds of calls, one TokenReview: the answer is kept for a while.
    let reviews = secured.cluster.api.token_reviews();
    assert_eq!(
        reviews.iter().filter(|token| *token == ALICE).count(),
        1,
        "{} reviews in all",
        reviews.len()
    );
    drop(calls);
    drop(held);

    // Someone else is not affected by alice's sessions.
    let carol_token = "carol-token";
    secured.cluster.api.add_user(carol_token, "carol");
    user_roles::bind(&secured.cluster.api, "carol", "remocal-user", "shop");
    let local = TcpServer::local(|s| servers::http(s, LOCAL_BODY));
    let mut session = secured
        .remocal(carol_token, &["steal", "pod/web"])
        .local_port(local.port())
        .start()
        .await;
    let addr = secured.cluster.scenario.pod(0).v4(80);
    assert_eq!(secured.cluster.scenario.curl(addr).await, LOCAL_BODY);
    let ended = session.stop().await;
    assert_eq!(ended.code, Some(0), "{ended:?}");
}

/// Whatever the kubeconfig resolves to is sent: here an exec plugin (as
/// EKS, GKE and OIDC logins use) that prints alice's token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_from_an_exec_plugin_is_sent_and_checked() {
    let secured = Secured::start().await;
    let path = secured
        .cluster
        .api
        .kubeconfig("dev", "unused", Some("shop"));
    let mut kubeconfig: serde_yaml::Value =
        serde_yaml::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let credential = serde_json::json!({
        "apiVersion": "client.authentication.k8s.io/v1",
        "kind": "ExecCredential",
        "status": { "token": ALICE },
    });
    kubeconfig["users"][0]["user"] = serde_yaml::to_value(serde_json::json!({
        "exec": {
            "apiVersion": "client.authentication.k8s.io/v1",
            "command": "/bin/sh",
            "args": ["-c", format!("printf '%s' '{credential}'")],
            "interactiveMode": "Never",
        }
    }))
    .unwrap();
    std::fs::write(&path, serde_yaml::to_string(&kubeconfig).unwrap()).unwrap();
    secured.steals_as(&path, "alice").await;
}

/// `--auth none` only where nobody but the node's own users can call, and
/// `--auth kubernetes` only with an API server to ask.
#[test]
fn the_agent_refuses_to_run_open_to_everyone() {
    let run = |args: &[&str]| {
        std::process::Command::new(remocal_tests::processes::binary("remocal-agent"))
            .args(args)
            .args(["--metrics-listen", "127.0.0.1:0"])
            .env_remove("KUBERNETES_SERVICE_HOST")
            .output()
            .expect("run remocal-agent")
    };
    for (args, says) in [
        (
            ["--auth", "none", "--grpc-listen", "0.0.0.0:0"],
            "--auth none is only allowed when --grpc-listen is a loopback address",
        ),
        (
            ["--auth", "kubernetes", "--grpc-listen", "127.0.0.1:0"],
            "--auth kubernetes needs the Kubernetes API",
        ),
    ] {
        let refused = run(&args);
        assert!(!refused.status.success(), "{args:?}: {refused:?}");
        let stderr = String::from_utf8_lossy(&refused.stderr);
        assert!(stderr.contains(says), "{args:?}: {stderr}");
    }
}

/// Thousands of calls without a credential, several connections at once:
/// each refused, the agent's memory and log bounded, and the session beside
/// them unaffected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_unauthenticated_calls_is_refused_within_bounds() {
    /// Calls in all, and the connections they come over.
    const CALLS: usize = 8_000;
    const CONNECTIONS: usize = 8;
    /// Three times what the refusals cost (measured: +11 MiB, debug build,
    /// which malloc keeps afterwards), far below what holding calls would.
    const RSS_BUDGET_KIB: u64 = 32 * 1024;
    let secured = Secured::start().await;
    let legitimate = secured.legitimate_steal().await;
    let agent = &secured.cluster.scenario.agent;
    let before = agent.rss_kib();
    let mut attackers = Vec::new();
    for _ in 0..CONNECTIONS {
        attackers.push(RawAgent::connect(&secured.url(), None).await);
    }
    let calls = (0..CALLS).map(|n| {
        let attacker = &attackers[n % CONNECTIONS];
        async move {
            if n % 2 == 0 {
                attacker.info().await.map(drop)
            } else {
                attacker
                    .standby("00000000000000000000000000000000")
                    .await
                    .map(drop)
            }
        }
    });
    // A thousand in flight at a time, so each call's time limit measures
    // that call, not the whole flood queued behind HTTP/2's stream limits.
    let answers: Vec<_> = futures::stream::iter(calls)
        .buffer_unordered(1_000)
        .collect()
        .await;
    let peak = agent.rss_kib();
    eprintln!("agent resident memory {before} KiB before {CALLS} refused calls, {peak} KiB after");
    for answer in &answers {
        let status = answer.as_ref().expect_err("refused");
        assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    }
    assert!(
        peak.saturating_sub(before) < RSS_BUDGET_KIB,
        "the agent grew from {before} to {peak} KiB"
    );
    assert!(
        secured
            .metric(r#"remocal_session_errors_total{reason="Unauthenticated"}"#)
            .await
            >= CALLS as f64
    );
    let logged = secured.agent_logs().matches("refused a call").count();
    assert!(
        logged < CALLS / 10,
        "{logged} log lines for {CALLS} refusals: the log is rate-limited"
    );
    legitimate.still_served_then_stop(&secured).await;
}

/// A caller with a stolen connection whose remote side stops reading can
/// push at most the flow-control windows into the agent: the agent stops
/// taking its bytes, and its memory stays bounded however much is sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_pushing_into_a_stalled_connection_is_held_by_the_windows() {
    /// Sent in all, as fast as the agent takes it.
    const PUSHED: usize = 256 << 20;
    /// The stream's window (1 MiB) and the messages in flight, with room
    /// for the allocator; far below what was pushed.
    const RSS_BUDGET_KIB: u64 = 32 * 1024;
    let secured = Secured::start().await;
    let scenario = &secured.cluster.scenario;
    let alice = secured.as_user(ALICE).await;
    let session = alice
        .open(attacker::pod("shop", "web"), 80, Mode::Steal)
        .await
        .expect("alice steals shop/web:80");
    let (upstream, mut downstream) = alice
        .standby_with_data(&session.ready.session_id)
        .await
        .expect("a standby call");
    // A remote client that connects and never reads.
    let _stalled = scenario
        .node()
        .connect(scenario.pod(0).v4(80))
        .await
        .expect("connect to the pod");
    let first = tokio::time::timeout(Duration::from_secs(10), downstream.message())
        .await
        .expect("the connection within 10 s")
        .expect("the call goes on");
    assert!(
        matches!(
            first.and_then(|message| message.kind),
            Some(connection_downstream::Kind::Connection(_))
        ),
        "the standby call carries the stolen connection"
    );
    let agent = &scenario.agent;
    let before = agent.rss_kib();
    let chunk = bytes::Bytes::from(vec![0x5a; 64 << 10]);
    let mut sent = 0;
    // Sends until the agent stops taking bytes (the call's window is full)
    // or everything went.
    while sent < PUSHED {
        let message = remocal_proto::v1::ConnectionUpstream {
            kind: Some(remocal_proto::v1::connection_upstream::Kind::Data(
                chunk.clone(),
            )),
        };
        match tokio::time::timeout(Duration::from_secs(2), upstream.send(message)).await {
            Ok(Ok(())) => sent += chunk.len(),
            _ => break,
        }
    }
    let peak = agent.rss_kib();
    eprintln!(
        "pushed {sent} bytes before the agent stopped taking them; agent {before} -> {peak} KiB"
    );
    assert!(
        sent < PUSHED,
        "the agent took all {PUSHED} bytes for a remote side that reads nothing"
    );
    assert!(
        peak.saturating_sub(before) < RSS_BUDGET_KIB,
        "the agent grew from {before} to {peak} KiB"
    );
}

/// However many users call, the agent holds at most 256 sessions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_holds_at_most_256_sessions_whoever_asks() {
    let secured = Secured::start().await;
    let mut held = Vec::new();
    // 16 users at their own limit of 16 each.
    for user in 0..16 {
        let token = format!("user-{user}-token");
        let name = format!("user-{user}");
        secured.cluster.api.add_user(&token, &name);
        user_roles::bind(&secured.cluster.api, &name, "remocal-user", "shop");
        let caller = secured.as_user(&token).await;
        for _ in 0..16 {
            held.push(
                caller
                    .open(attacker::pod("shop", "web"), 80, Mode::Mirror)
                    .await
                    .expect("a session within the limits"),
            );
        }
    }
    assert_eq!(held.len(), 256);
    let alice = secured.as_user(ALICE).await;
    assert_refused(
        alice
            .open(attacker::pod("shop", "web"), 80, Mode::Mirror)
            .await,
        Code::ResourceExhausted,
        &["at most 256 for all users together"],
    );
    // One ends; a place is free again.
    held.pop();
    let reopened = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match alice
                .open(attacker::pod("shop", "web"), 80, Mode::Mirror)
                .await
            {
                Ok(session) => return session,
                Err(status) if status.code() == Code::ResourceExhausted => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(status) => panic!("{status:?}"),
            }
        }
    })
    .await
    .expect("the ended session's place is given back");
    assert_eq!(reopened.ready.user, "alice");
}

/// Opens a session once the one a dropped call held on the same port is
/// gone: the agent ends a session whose call dropped asynchronously, and
/// until then refuses the port as taken (ALREADY_EXISTS). Waits up to 5 s.
async fn once_free<F, T>(mut open: impl FnMut() -> F) -> Result<T, tonic::Status>
where
    F: Future<Output = Result<T, tonic::Status>>,
{
    let mut retries = 0;
    loop {
        match open().await {
            Err(status) if status.code() == Code::AlreadyExists && retries < 50 => {
                retries += 1;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            opened => return opened,
        }
    }
}
