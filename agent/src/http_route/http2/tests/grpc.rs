//! Real gRPC through the router: tonic's client and server (remocal's own
//! `Agent` service, answered by a small echo), routed by call metadata.
use bytes::Bytes;
use remocal_proto::v1::{
    AgentInfo, ConnectionDownstream, ConnectionUpstream, InfoRequest, SessionEvent, SessionRequest,
    agent_client::AgentClient,
    agent_server::{Agent, AgentServer},
    connection_downstream, connection_upstream,
};
use tokio::{net::TcpListener, sync::mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Request, Response, Status, Streaming, transport::Channel};

use super::support::{Sides, refusing, router, within};

/// Says its name in `Info`, echoes `Connection`'s data, has no `Session`.
struct Echo(&'static str);

#[tonic::async_trait]
impl Agent for Echo {
    type SessionStream = ReceiverStream<Result<SessionEvent, Status>>;
    type ConnectionStream = ReceiverStream<Result<ConnectionDownstream, Status>>;

    async fn session(
        &self,
        _request: Request<Streaming<SessionRequest>>,
    ) -> Result<Response<Self::SessionStream>, Status> {
        Err(Status::unimplemented(format!("{} has no sessions", self.0)))
    }

    async fn connection(
        &self,
        request: Request<Streaming<ConnectionUpstream>>,
    ) -> Result<Response<Self::ConnectionStream>, Status> {
        let mut upstream = request.into_inner();
        let (tx, rx) = mpsc::channel(4);
        tokio::spawn(async move {
            while let Ok(Some(message)) = upstream.message().await {
                if let Some(connection_upstream::Kind::Data(data)) = message.kind {
                    let echo = ConnectionDownstream {
                        kind: Some(connection_downstream::Kind::Data(data)),
                    };
                    if tx.send(Ok(echo)).await.is_err() {
                        return;
                    }
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn info(&self, _request: Request<InfoRequest>) -> Result<Response<AgentInfo>, Status> {
        Ok(Response::new(AgentInfo {
            node_name: self.0.into(),
            ..AgentInfo::default()
        }))
    }
    async fn list_sessions(
        &self,
        _: Request<remocal_proto::v1::ListSessionsRequest>,
    ) -> Result<Response<remocal_proto::v1::SessionList>, tonic::Status> {
        Err(tonic::Status::unimplemented("not in this test"))
    }
}

async fn grpc_server(name: &'static str) -> std::net::SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(AgentServer::new(Echo(name)))
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
    );
    addr
}

fn for_dev<T>(message: T, dev: Option<&str>) -> Request<T> {
    let mut request = Request::new(message);
    if let Some(dev) = dev {
        request.metadata_mut().insert("x-dev", dev.parse().unwrap());
    }
    request
}

async fn name(client: &mut AgentClient<Channel>, dev: Option<&str>) -> Result<String, Status> {
    let info = client.info(for_dev(InfoRequest {}, dev)).await?;
    Ok(info.into_inner().node_name)
}

#[tokio::test]
async fn grpc_calls_are_routed_by_their_metadata() {
    within(async {
        let (pod, alice) = (grpc_server("pod").await, grpc_server("alice").await);
        let sides = Sides::new(pod, alice, refusing().await);
        let router = router(sides).await;
        let mut client = AgentClient::connect(format!("http://{}", router.addr))
            .await
            .unwrap();

        assert_eq!(name(&mut client, Some("alice")).await.unwrap(), "alice");
        assert_eq!(name(&mut client, None).await.unwrap(), "pod");

        // A status from the side's server reaches the client as it was.
        let refused = client
            .session(for_dev(tokio_stream::empty(), Some("alice")))
            .await
            .unwrap_err();
        assert_eq!(refused.code(), Code::Unimplemented);
        assert_eq!(refused.message(), "alice has no sessions");

        // Bob's side refuses connections: UNAVAILABLE, saying why.
        let unavailable = name(&mut client, Some("bob")).await.unwrap_err();
        assert_eq!(unavailable.code(), Code::Unavailable);
        assert!(
            unavailable
                .message()
                .starts_with("remocal: cannot connect to session 2: "),
            "{}",
            unavailable.message()
        );

        // A bidirectional call, one message answered before the next is sent.
        let (tx, rx) = mpsc::channel(1);
        let mut echoed = client
            .connection(for_dev(ReceiverStream::new(rx), Some("alice")))
            .await
            .unwrap()
            .into_inner();
        for text in ["one", "two", "three"] {
            let data = Bytes::from_static(text.as_bytes());
            tx.send(ConnectionUpstream {
                kind: Some(connection_upstream::Kind::Data(data.clone())),
            })
            .await
            .unwrap();
            let echo = echoed.message().await.unwrap().unwrap();
            assert_eq!(echo.kind, Some(connection_downstream::Kind::Data(data)));
        }
        drop(tx);
        assert!(echoed.message().await.unwrap().is_none());
    })
    .await;
}
