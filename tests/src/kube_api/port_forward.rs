//! `pods/portforward` over WebSocket, as kubelet serves it behind the apiserver
//! (subprotocol `v4.channel.k8s.io`): port i uses data channel 2i and error
//! channel 2i+1, each opened by a frame carrying the port number (u16, little
//! endian), then every binary frame is `[channel, bytes...]`.
//!
//! remocal's client reaches agents only through this, with gRPC on top, so the
//! relay must be byte-exact, keep directions independent (one side blocking must
//! not stall the other) and move data in large frames.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use axum::body::Body;
use axum::extract::Request;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::Response;
use bytes::{BufMut, Bytes, BytesMut};
use futures::stream::{SplitSink, SplitStream};
use futures::{SinkExt, StreamExt};
use hyper::upgrade::{OnUpgrade, Upgraded};
use hyper_util::rt::TokioIo;
use k8s_openapi::api::core::v1::Pod;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role;

use super::objects::container_id;
use super::status;

const PROTOCOL: &str = "v4.channel.k8s.io";
/// Large reads keep a bulk transfer at a few thousand frames per hundred MB.
const READ_CHUNK: usize = 64 * 1024;
/// How long a dial may take before it fails the way Go's does (`i/o timeout`).
const DIAL_TIMEOUT: Duration = Duration::from_secs(5);
/// How long to wait for the client's answer to our close frame before hanging up.
const CLOSE_GRACE: Duration = Duration::from_secs(1);

type Ws = WebSocketStream<TokioIo<Upgraded>>;

/// One forwarded port: where kubelet would connect for it.
struct Target {
    port: u16,
    /// `None` when the pod has no usable IP (the dial fails with that).
    addr: Option<SocketAddr>,
    pod: String,
    uid: String,
}

/// Validates the request, answers `101 Switching Protocols` and relays in a task
/// that ends when the connection ends or `shutdown`'s sender is dropped.
pub(super) fn upgrade(
    pod: &Pod,
    query: &[(String, String)],
    request: &mut Request,
    mut shutdown: watch::Receiver<()>,
) -> Response {
    let name = pod.metadata.name.clone().unwrap_or_default();
    let ports = match parse_ports(query) {
        Ok(ports) => ports,
        Err(message) => return status::bad_request(message),
    };
    let phase = pod
        .status
        .as_ref()
        .and_then(|s| s.phase.clone())
        .unwrap_or_else(|| "Pending".into());
    if phase != "Running" {
        return status::bad_request(format!(
            "unable to upgrade connection: pod {name} is not running (phase {phase})"
        ));
    }
    let Some(key) = websocket_key(request.headers()) else {
        return status::bad_request("Upgrade request required".into());
    };
    if !offers_protocol(request.headers()) {
        return status::bad_request(format!(
            "unable to upgrade connection: the client offers no supported subprotocol (supported: {PROTOCOL})"
        ));
    }
    let Some(on_upgrade) = request.extensions_mut().remove::<OnUpgrade>() else {
        return status::bad_request("Upgrade request required".into());
    };

    let targets = targets(pod, &ports);
    tokio::spawn(async move {
        tokio::select! {
            _ = shutdown.changed() => {}
            _ = async move {
                if let Ok(upgraded) = on_upgrade.await {
                    let ws = WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, None).await;
                    relay(ws, targets).await;
                }
            } => {}
        }
    });

    Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(header::CONNECTION, "Upgrade")
        .header(header::UPGRADE, "websocket")
        .header(
            header::SEC_WEBSOCKET_ACCEPT,
            derive_accept_key(key.as_bytes()),
        )
        .header(header::SEC_WEBSOCKET_PROTOCOL, PROTOCOL)
        .body(Body::empty())
        .unwrap_or_else(|_| status::bad_request("Upgrade request required".into()))
}

/// `ports=80,8080` (kube) or repeated `ports=` parameters (kubectl).
fn parse_ports(query: &[(String, String)]) -> Result<Vec<u16>, String> {
    let mut ports = Vec::new();
    for (_, value) in query.iter().filter(|(k, _)| k == "ports") {
        for text in value.split(',').map(str::trim) {
            match text.parse::<u16>() {
                Ok(port) if port > 0 => ports.push(port),
                _ => {
                    return Err(format!(
                        "unable to parse \"{text}\" as a port: port must be in the range 1-65535"
                    ));
                }
            }
        }
    }
    if ports.is_empty() {
        return Err("at least 1 port must be specified".into());
    }
    Ok(ports)
}

fn websocket_key(headers: &HeaderMap) -> Option<String> {
    let upgrade = headers.get(header::UPGRADE)?.to_str().ok()?;
    if !upgrade.eq_ignore_ascii_case("websocket") {
        return None;
    }
    Some(
        headers
            .get(header::SEC_WEBSOCKET_KEY)?
            .to_str()
            .ok()?
            .to_string(),
    )
}

/// kube offers one comma-separated header (`v5.channel.k8s.io, v4.channel.k8s.io`);
/// other clients send several headers.
fn offers_protocol(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|p| p.trim() == PROTOCOL)
}

/// kubelet dials localhost inside the pod's network namespace; for a hostNetwork
/// pod that is the node's (here: this host), otherwise the pod's own address.
fn targets(pod: &Pod, ports: &[u16]) -> Vec<Target> {
    let host_network = pod
        .spec
        .as_ref()
        .and_then(|s| s.host_network)
        .unwrap_or(false);
    let ip = if host_network {
        Some(IpAddr::V4(Ipv4Addr::LOCALHOST))
    } else {
        pod.status
            .as_ref()
            .and_then(|s| s.pod_ip.as_deref())
            .and_then(|ip| ip.parse().ok())
    };
    ports
        .iter()
        .map(|&port| Target {
            port,
            addr: ip.map(|ip| SocketAddr::new(ip, port)),
            pod: pod.metadata.name.clone().unwrap_or_default(),
            uid: pod.metadata.uid.clone().unwrap_or_default(),
        })
        .collect()
}

fn frame(channel: u8, payload: &[u8]) -> Message {
    let mut bytes = Vec::with_capacity(1 + payload.len());
    bytes.push(channel);
    bytes.extend_from_slice(payload);
    Message::binary(bytes)
}

/// Runs one port-forward connection to its end: when every port is done (target
/// closed or dial failed) the WebSocket is closed; when the client closes it,
/// every target connection is dropped.
async fn relay(ws: Ws, targets: Vec<Target>) {
    let (mut sink, mut stream) = ws.split();
    for (i, target) in targets.iter().enumerate() {
        let data = u8::try_from(2 * i).unwrap_or(u8::MAX);
        for channel in [data, data.saturating_add(1)] {
            if sink
                .feed(frame(channel, &target.port.to_le_bytes()))
                .await
                .is_err()
            {
                return;
            }
        }
    }
    if sink.flush().await.is_err() {
        return;
    }

    let (outbound_tx, outbound_rx) = mpsc::channel::<Message>(64);
    let mut to_targets = Vec::new();
    // Dropping the set (when this function returns) closes every target connection.
    let mut ports = JoinSet::new();
    for (i, target) in targets.into_iter().enumerate() {
        let (tx, rx) = mpsc::channel::<Bytes>(32);
        to_targets.push(tx);
        ports.spawn(forward_port(i, target, rx, outbound_tx.clone()));
    }
    drop(outbound_tx);

    let ports_done = tokio::select! {
        _ = send_outbound(&mut sink, outbound_rx) => true,
        _ = relay_inbound(&mut stream, &to_targets) => false,
    };
    if ports_done {
        // Every target is gone: close as kubelet does and give the client a moment
        // to answer, so its side sees a clean close rather than a reset.
        let _ = sink.send(Message::Close(None)).await;
        let _ = tokio::time::timeout(CLOSE_GRACE, async {
            while let Some(Ok(_)) = stream.next().await {}
        })
        .await;
    } else {
        // The client closed: send the answer tungstenite queued, or kube reports
        // `ResetWithoutClosingHandshake` from `Portforwarder::join`.
        let _ = tokio::time::timeout(CLOSE_GRACE, sink.close()).await;
        // What the client sent before closing still reaches its target, then a
        // FIN; aborting the ports here would lose it, or the whole connection
        // when a port had not even dialed yet.
        drop(to_targets);
        let _ = tokio::time::timeout(CLOSE_GRACE, async {
            while ports.join_next().await.is_some() {}
        })
        .await;
    }
}

/// Frames from the targets to the client, flushed once per burst rather than per frame.
async fn send_outbound(sink: &mut SplitSink<Ws, Message>, mut rx: mpsc::Receiver<Message>) {
    while let Some(message) = rx.recv().await {
        if sink.feed(message).await.is_err() {
            return;
        }
        while let Ok(message) = rx.try_recv() {
            if sink.feed(message).await.is_err() {
                return;
            }
        }
        if sink.flush().await.is_err() {
            return;
        }
    }
}

/// Frames from the client to the targets; ends when the client closes or goes away.
async fn relay_inbound(stream: &mut SplitStream<Ws>, to_targets: &[mpsc::Sender<Bytes>]) {
    while let Some(Ok(message)) = stream.next().await {
        match message {
            Message::Binary(bytes) => {
                // A frame of only the channel byte carries nothing; odd channels
                // (errors) are never written by clients.
                let Some(&channel) = bytes.first() else {
                    continue;
                };
                if bytes.len() < 2 || channel % 2 == 1 {
                    continue;
                }
                if let Some(tx) = to_targets.get(usize::from(channel / 2)) {
                    // A target that is gone just drops what is sent to it.
                    let _ = tx.send(bytes.slice(1..)).await;
                }
            }
            Message::Close(_) => return,
            _ => {}
        }
    }
}

/// One port: dial, then copy both ways until the target's side ends.
async fn forward_port(
    index: usize,
    target: Target,
    mut from_client: mpsc::Receiver<Bytes>,
    to_client: mpsc::Sender<Message>,
) {
    let data_channel = u8::try_from(2 * index).unwrap_or(u8::MAX);
    let connection = match dial(&target).await {
        Ok(connection) => connection,
        Err(reason) => {
            let message = format!(
                "error forwarding port {port} to pod {pod}, uid {uid}: failed to connect to localhost:{port} inside namespace \"{sandbox}\": {reason}",
                port = target.port,
                pod = target.pod,
                uid = target.uid,
                sandbox = container_id(&format!("sandbox/{}", target.uid)),
            );
            let _ = to_client
                .send(frame(data_channel.saturating_add(1), message.as_bytes()))
                .await;
            return;
        }
    };
    let _ = connection.set_nodelay(true);
    let (mut reader, mut writer) = connection.into_split();
    let to_target = async move {
        while let Some(bytes) = from_client.recv().await {
            if writer.write_all(&bytes).await.is_err() {
                return;
            }
        }
    };
    let from_target = async {
        let mut buffer = BytesMut::new();
        loop {
            buffer.reserve(1 + READ_CHUNK);
            buffer.put_u8(data_channel);
            match reader.read_buf(&mut buffer).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {
                    let message = Message::Binary(buffer.split().freeze());
                    if to_client.send(message).await.is_err() {
                        return;
                    }
                }
            }
        }
    };
    tokio::select! {
        _ = from_target => {}
        _ = to_target => {}
    }
}

/// Errors read like Go's `net.Dial` ones, as kubelet reports them.
async fn dial(target: &Target) -> Result<TcpStream, String> {
    let Some(addr) = target.addr else {
        return Err("pod has no IP address".into());
    };
    let network = if addr.is_ipv4() { "tcp4" } else { "tcp6" };
    match tokio::time::timeout(DIAL_TIMEOUT, TcpStream::connect(addr)).await {
        Ok(Ok(connection)) => Ok(connection),
        Ok(Err(e)) => Err(format!(
            "dial {network} {addr}: connect: {}",
            go_error_text(&e)
        )),
        Err(_) => Err(format!("dial {network} {addr}: i/o timeout")),
    }
}

/// `Connection refused (os error 111)` -> `connection refused`.
fn go_error_text(error: &std::io::Error) -> String {
    let text = error.to_string();
    let text = text.split(" (os error").next().unwrap_or(&text);
    let mut chars = text.chars();
    match chars.next() {
        Some(first) => first.to_lowercase().chain(chars).collect(),
        None => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn query(text: &str) -> Vec<(String, String)> {
        super::super::request_info::query_pairs(Some(text))
    }

    #[test]
    fn ports_in_either_spelling() {
        assert_eq!(parse_ports(&query("&ports=80%2C1234")), Ok(vec![80, 1234]));
        assert_eq!(parse_ports(&query("ports=80&ports=81")), Ok(vec![80, 81]));
        assert!(parse_ports(&query("ports=0")).is_err());
        assert!(parse_ports(&query("ports=http")).is_err());
        assert!(parse_ports(&query("")).is_err());
    }

    #[test]
    fn os_errors_read_like_go() {
        let refused = std::io::Error::from_raw_os_error(libc::ECONNREFUSED);
        assert_eq!(go_error_text(&refused), "connection refused");
    }
}
