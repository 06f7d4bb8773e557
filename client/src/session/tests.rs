//! A session against a stand-in agent: what reaches the agent, and how its
//! answers to a filtered steal end the command.
use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
};

use remocal_proto::v1::{
    AgentInfo, ConnectionDownstream, ConnectionUpstream, HeaderMatch, InfoRequest, Ready,
    SessionEnded, agent_server,
};
use tokio_stream::wrappers::{TcpListenerStream, UnboundedReceiverStream};
use tonic::{Request, Response};

use super::*;
use crate::cli::{
    ClusterArgs, FilterArgs, LinkArgs, LocalArgs, OutputFormat, ResetArgs, TargetArgs,
};

/// How the stand-in agent answers an `OpenSession`.
#[derive(Clone, Copy)]
enum Answer {
    /// Ready without a filter (an agent older than filters), then Ended once
    /// the client closes.
    IgnoreFilter,
    /// The agent's own refusal of the filter.
    RefuseFilter,
}

#[derive(Default)]
struct Seen {
    opened: Vec<OpenSession>,
    closed: bool,
}

#[derive(Clone)]
struct FakeAgent {
    answer: Answer,
    seen: Arc<Mutex<Seen>>,
}

type Events = UnboundedReceiverStream<Result<SessionEvent, tonic::Status>>;

#[tonic::async_trait]
impl agent_server::Agent for FakeAgent {
    type SessionStream = Events;
    type ConnectionStream = tokio_stream::Empty<Result<ConnectionDownstream, tonic::Status>>;

    async fn session(
        &self,
        request: Request<Streaming<SessionRequest>>,
    ) -> Result<Response<Events>, tonic::Status> {
        let mut requests = request.into_inner();
        let Some(SessionRequest {
            kind: Some(session_request::Kind::Open(open)),
        }) = requests.message().await?
        else {
            return Err(tonic::Status::invalid_argument("no open"));
        };
        self.seen.lock().unwrap().opened.push(open.clone());
        if let Answer::RefuseFilter = self.answer {
            return Err(tonic::Status::invalid_argument(
                "--path has an invalid regular expression: too new for this agent",
            ));
        }
        let (events, stream) = mpsc::unbounded_channel();
        let event = |kind| Ok(SessionEvent { kind: Some(kind) });
        let _ = events.send(event(session_event::Kind::Ready(Ready {
            session_id: "s1".into(),
            target: "netns /x".into(),
            port: open.port,
            ..Ready::default()
        })));
        let seen = self.seen.clone();
        tokio::spawn(async move {
            while let Ok(Some(request)) = requests.message().await {
                if let Some(session_request::Kind::Close(_)) = request.kind {
                    seen.lock().unwrap().closed = true;
                    let _ = events.send(event(session_event::Kind::Ended(SessionEnded {
                        reason: "closed".into(),
                    })));
                }
            }
        });
        Ok(Response::new(UnboundedReceiverStream::new(stream)))
    }

    async fn connection(
        &self,
        _: Request<Streaming<ConnectionUpstream>>,
    ) -> Result<Response<Self::ConnectionStream>, tonic::Status> {
        Err(tonic::Status::unimplemented("not in this test"))
    }

    async fn info(&self, _: Request<InfoRequest>) -> Result<Response<AgentInfo>, tonic::Status> {
        Err(tonic::Status::unimplemented("not in this test"))
    }
    async fn list_sessions(
        &self,
        _: Request<remocal_proto::v1::ListSessionsRequest>,
    ) -> Result<Response<remocal_proto::v1::SessionList>, tonic::Status> {
        Err(tonic::Status::unimplemented("not in this test"))
    }
}

async fn fake_agent(answer: Answer) -> (SocketAddr, Arc<Mutex<Seen>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::default();
    let agent = FakeAgent {
        answer,
        seen: Arc::clone(&seen),
    };
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(agent_server::AgentServer::new(agent))
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );
    (addr, seen)
}

fn steal_args(agent: SocketAddr, filter: FilterArgs) -> StealArgs {
    StealArgs {
        session: SessionArgs {
            target: TargetArgs {
                resource: None,
                pod: None,
                netns: Some("/x".into()),
                pid: None,
            },
            port: 80,
            local: LocalArgs {
                local_port: None,
                local_host: "127.0.0.1".into(),
            },
            cluster: ClusterArgs {
                namespace: None,
                context: None,
                kubeconfig: Some("/nonexistent/remocal-test-kubeconfig".into()),
                agent_namespace: "remocal".into(),
            },
            link: LinkArgs {
                agent: Some(format!("http://{agent}")),
                verbose: false,
                output: OutputFormat::Text,
            },
            listen_timeout: 30,
            command: Vec::new(),
        },
        filter,
        reset: ResetArgs::default(),
    }
}

fn path(pattern: &str) -> FilterArgs {
    FilterArgs {
        path: Some(pattern.into()),
        ..FilterArgs::default()
    }
}

#[tokio::test]
async fn a_bad_filter_is_refused_before_the_agent_is_called() {
    let (addr, seen) = fake_agent(Answer::IgnoreFilter).await;
    let failure = steal(steal_args(addr, path("(")))
        .await
        .expect_err("refused");
    assert_eq!(failure.status(), Status::Usage, "{}", failure.message());
    assert!(seen.lock().unwrap().opened.is_empty());
}

#[tokio::test]
async fn an_agent_that_ignores_the_filter_gets_the_port_back() {
    let (addr, seen) = fake_agent(Answer::IgnoreFilter).await;
    let filter = FilterArgs {
        headers: vec!["x-dev: alice".into()],
        method: Some("get".into()),
        ..path("^/api/")
    };
    let failure = steal(steal_args(addr, filter)).await.expect_err("refused");
    assert_eq!(failure.status(), Status::Rejected, "{}", failure.message());
    assert!(
        failure
            .message()
            .contains("does not support filtered steals")
    );
    let seen = seen.lock().unwrap();
    assert!(seen.closed, "the whole-port steal must be closed");
    assert_eq!(
        seen.opened[0].filter,
        Some(HttpFilter {
            headers: vec![HeaderMatch {
                name: "x-dev".into(),
                value: "alice".into(),
            }],
            path: "^/api/".into(),
            method: "GET".into(),
        })
    );
}

#[tokio::test]
async fn the_agents_refusal_of_a_filter_is_a_usage_error() {
    let (addr, seen) = fake_agent(Answer::RefuseFilter).await;
    let failure = steal(steal_args(addr, path("^/api/")))
        .await
        .expect_err("refused");
    assert_eq!(failure.status(), Status::Usage, "{}", failure.message());
    assert!(
        failure
            .message()
            .contains("the agent refused the filter: --path")
    );
    assert_eq!(seen.lock().unwrap().opened.len(), 1);
}

#[tokio::test]
async fn a_mirror_sends_no_filter() {
    let (addr, seen) = fake_agent(Answer::RefuseFilter).await;
    let args = steal_args(addr, FilterArgs::default()).session;
    let failure = run(args, Mode::Mirror, None, None)
        .await
        .expect_err("refused");
    // Without a filter, the agent's INVALID_ARGUMENT keeps its own status.
    assert_eq!(failure.status(), Status::Rejected, "{}", failure.message());
    let seen = seen.lock().unwrap();
    assert_eq!(seen.opened[0].filter, None);
    assert_eq!(seen.opened[0].mode, Mode::Mirror as i32);
}

#[tokio::test]
async fn a_reset_deadline_without_the_reset_is_refused_before_the_agent_is_called() {
    let (addr, seen) = fake_agent(Answer::IgnoreFilter).await;
    let mut args = steal_args(addr, FilterArgs::default());
    args.reset.reset_deadline = Some(5);
    let failure = steal(args).await.expect_err("refused");
    assert_eq!(failure.status(), Status::Usage);
    assert!(
        failure
            .message()
            .starts_with("--reset-deadline only applies to --reset-existing"),
        "{}",
        failure.message()
    );
    assert!(seen.lock().unwrap().opened.is_empty());
}

#[tokio::test]
async fn a_reset_asks_the_agent_with_its_deadline() {
    let (addr, seen) = fake_agent(Answer::IgnoreFilter).await;
    let mut args = steal_args(addr, FilterArgs::default());
    args.reset = ResetArgs {
        reset_existing: true,
        reset_deadline: Some(7),
    };
    // The stand-in agent confirms, then the session runs: end it from
    // outside once the agent saw the open.
    let session = tokio::spawn(steal(args));
    let opened = loop {
        if let Some(open) = seen.lock().unwrap().opened.first().cloned() {
            break open;
        }
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    };
    session.abort();
    assert_eq!(
        opened.reset_existing,
        Some(remocal_proto::v1::ResetExisting { deadline_ms: 7000 })
    );
}
