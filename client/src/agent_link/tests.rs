//! The hand-made `Connection` call against tonic's own server: the wire
//! format is gRPC's, so a stock server must read it and be read back.
use std::net::SocketAddr;

use remocal_proto::v1::{
    AgentInfo, ConnectionUpstream, InfoRequest, SessionEvent, SessionRequest, agent_server,
    connection_downstream,
};
use tokio_stream::{StreamExt as _, wrappers::TcpListenerStream};
use tonic::{Request, Response, Streaming};
use wire::{DataMessage as _, encode};

use super::*;

/// Answers each data message with the same bytes reversed, then ends the
/// call with the status a test names in the first message's bytes.
struct Reverser;

#[tonic::async_trait]
impl agent_server::Agent for Reverser {
    type SessionStream = tokio_stream::Empty<Result<SessionEvent, tonic::Status>>;
    type ConnectionStream =
        std::pin::Pin<Box<dyn Stream<Item = Result<ConnectionDownstream, tonic::Status>> + Send>>;

    async fn session(
        &self,
        _: Request<Streaming<SessionRequest>>,
    ) -> Result<Response<Self::SessionStream>, tonic::Status> {
        Err(tonic::Status::unimplemented("not in this test"))
    }

    async fn connection(
        &self,
        request: Request<Streaming<ConnectionUpstream>>,
    ) -> Result<Response<Self::ConnectionStream>, tonic::Status> {
        let mut upstream = request.into_inner();
        let first = upstream.message().await?.and_then(|m| m.into_data().ok());
        if first.as_deref() == Some(b"refuse") {
            return Err(tonic::Status::permission_denied("refused at once"));
        }
        let answers = upstream.map(|message| {
            let data = message?
                .into_data()
                .map_err(|_| tonic::Status::invalid_argument("not data"))?;
            Ok(ConnectionDownstream::data(
                data.iter().rev().copied().collect(),
            ))
        });
        let end = tokio_stream::once(Err(tonic::Status::aborted("the remote side failed")));
        Ok(Response::new(Box::pin(answers.chain(end))))
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

async fn stock_server() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(agent_server::AgentServer::new(Reverser))
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );
    addr
}

fn data(bytes: &'static [u8]) -> Result<Bytes, tonic::Status> {
    Ok(encode(&ConnectionUpstream::data(Bytes::from_static(bytes))))
}

#[tokio::test]
async fn a_stock_grpc_server_reads_the_call_and_is_read_back() {
    let addr = stock_server().await;
    let mut agent = AgentAddress::url(&addr.to_string())
        .connect(&crate::credentials::Credentials::None {
            why: "a test".into(),
        })
        .await
        .unwrap();

    let sent = tokio_stream::iter([data(b"first"), data(b"hello"), data(b"world")]);
    let mut answers = agent.connection(sent).await.unwrap();
    let mut received = Vec::new();
    let end = loop {
        match answers.message().await {
            Ok(Some(message)) => match message.kind {
                Some(connection_downstream::Kind::Data(bytes)) => received.push(bytes),
                other => panic!("unexpected {other:?}"),
            },
            Ok(None) => panic!("the call ended without the server's status"),
            Err(status) => break status,
        }
    };
    assert_eq!(received.concat(), b"ollehdlrow");
    assert_eq!(end.code(), Code::Aborted);
    assert_eq!(end.message(), "the remote side failed");

    // Refused before any message: the status comes in the headers.
    let refused = agent
        .connection(tokio_stream::iter([data(b"refuse")]))
        .await;
    let status = match refused {
        Ok(mut messages) => messages.message().await.unwrap_err(),
        Err(status) => status,
    };
    assert_eq!(status.code(), Code::PermissionDenied);
    assert_eq!(status.message(), "refused at once");
}
