use bytes::{BufMut as _, Bytes, BytesMut};
use futures::stream;
use http_body::Frame;
use http_body_util::{BodyExt as _, StreamBody};
use tonic::{Code, Status, body::Body};

use super::*;
use crate::v1::{Attach, Eof, Reset, agent_server};

/// What a stock gRPC peer sends for `message`: prefix, then prost's encoding.
fn stock<M: prost::Message>(message: &M) -> Vec<u8> {
    let encoded = message.encode_to_vec();
    let mut framed = vec![0];
    framed.extend_from_slice(&(encoded.len() as u32).to_be_bytes());
    framed.extend_from_slice(&encoded);
    framed
}

fn pattern(len: usize) -> Bytes {
    (0..len).map(|i| (i * 7 + i / 251) as u8).collect()
}

const SIZES: [usize; 9] = [0, 1, 127, 128, 16_383, 16_384, 65_536, 128 << 10, 2_097_152];

#[test]
fn the_path_is_the_services() {
    assert_eq!(
        CONNECTION_PATH,
        format!("/{}/Connection", agent_server::SERVICE_NAME)
    );
}

#[test]
fn data_framed_in_place_is_what_a_stock_peer_sends() {
    for len in SIZES {
        let payload = pattern(len);
        let mut buffer = DataBuffer::with_capacity(len);
        buffer.tail().extend_from_slice(&payload);
        assert_eq!(buffer.len(), len);
        let up = buffer.into_message::<ConnectionUpstream>();
        assert_eq!(
            up,
            stock(&ConnectionUpstream::data(payload.clone())),
            "{len}"
        );

        let split: Vec<u8> = frames(ConnectionDownstream::data(payload.clone()))
            .flat_map(|piece| piece.to_vec())
            .collect();
        assert_eq!(split, stock(&ConnectionDownstream::data(payload)), "{len}");
    }
    let eof = ConnectionDownstream {
        kind: Some(connection_downstream::Kind::Eof(Eof {})),
    };
    assert_eq!(encode(&eof), stock(&eof));
    assert_eq!(frames(eof.clone()).count(), 1);
}

/// A body that delivers `bytes` cut at `cuts`, then `trailers`.
fn body(bytes: &[u8], cuts: &[usize], trailers: Option<Status>) -> Body {
    let mut frames = Vec::new();
    let mut start = 0;
    for &cut in cuts.iter().chain([&bytes.len()]) {
        frames.push(Ok::<_, Status>(Frame::data(Bytes::copy_from_slice(
            &bytes[start..cut],
        ))));
        start = cut;
    }
    if let Some(status) = trailers {
        let mut headers = http::HeaderMap::new();
        status.add_header(&mut headers).unwrap();
        frames.push(Ok(Frame::trailers(headers)));
    }
    Body::new(StreamBody::new(stream::iter(frames)))
}

/// Everything read until the end: adjacent data pieces joined (a byte
/// stream may be cut anywhere), other messages as they are.
async fn read_all<M: DataMessage + Clone>(
    messages: &mut Messages<M>,
) -> (Vec<Result<Bytes, M>>, Result<(), Status>) {
    let mut read: Vec<Result<Bytes, M>> = Vec::new();
    loop {
        match messages.message().await {
            Ok(Some(message)) => match (message.into_data(), read.last_mut()) {
                (Ok(piece), Some(Ok(joined))) => {
                    let mut both = BytesMut::from(&joined[..]);
                    both.put_slice(&piece);
                    *joined = both.freeze();
                }
                (item, _) => read.push(item),
            },
            Ok(None) => return (read, Ok(())),
            Err(status) => return (read, Err(status)),
        }
    }
}

fn mixed() -> Vec<ConnectionUpstream> {
    let attach = ConnectionUpstream {
        kind: Some(connection_upstream::Kind::Attach(Attach {
            session_id: "s-1".into(),
            connection_id: 7,
        })),
    };
    let reset = ConnectionUpstream {
        kind: Some(connection_upstream::Kind::Reset(Reset {
            reason: "nothing answers".into(),
        })),
    };
    vec![
        attach,
        ConnectionUpstream::data(pattern(300)),
        ConnectionUpstream::default(),
        ConnectionUpstream::data(pattern(1)),
        ConnectionUpstream::data(Bytes::new()),
        reset,
    ]
}

#[tokio::test]
async fn messages_come_back_however_the_frames_cut_them() {
    let sent = mixed();
    let bytes: Vec<u8> = sent.iter().flat_map(stock).collect();
    let mut expected: Vec<Result<Bytes, ConnectionUpstream>> =
        sent.iter().cloned().map(DataMessage::into_data).collect();
    // The empty message is a data-less message.
    assert!(expected[2].is_err());
    // Empty data says nothing about the byte stream: it is not handed on.
    expected.retain(|item| item.as_ref().map_or(true, |data| !data.is_empty()));
    for cut in 0..=bytes.len() {
        for second in [cut, (cut + 3).min(bytes.len())] {
            let mut messages =
                Messages::<ConnectionUpstream>::request(body(&bytes, &[cut, second], None));
            let (read, end) = read_all(&mut messages).await;
            assert!(end.is_ok(), "cut at {cut}: {end:?}");
            assert_eq!(read, expected, "cut at {cut} and {second}");
        }
    }
}

#[tokio::test]
async fn data_arrives_without_copies_in_the_pieces_it_came_in() {
    let payload = pattern(100_000);
    let framed = Bytes::from(stock(&ConnectionDownstream::data(payload.clone())));
    let frames = [0..40_000, 40_000..70_000, 70_000..framed.len()]
        .map(|range| Ok::<_, Status>(Frame::data(framed.slice(range))));
    let mut messages = Messages::<ConnectionDownstream>::response(
        Body::new(StreamBody::new(stream::iter(frames))),
        true,
    );
    let mut pieces = Vec::new();
    while let Some(message) = messages.message().await.unwrap() {
        let piece = message.into_data().unwrap();
        // Where the piece lies in the frames' memory: a copy lies elsewhere.
        let offset = piece.as_ptr() as usize - framed.as_ptr() as usize;
        assert!(offset + piece.len() <= framed.len(), "a copy");
        pieces.push((offset, piece));
    }
    // The first piece starts after the framing: 5 + 1 + 3 bytes.
    let layout: Vec<_> = pieces
        .iter()
        .map(|(at, piece)| (*at, piece.len()))
        .collect();
    assert_eq!(
        layout,
        [(9, 40_000 - 9), (40_000, 30_000), (70_000, 30_009)]
    );
    let joined: Vec<u8> = pieces
        .iter()
        .flat_map(|(_, piece)| piece.to_vec())
        .collect();
    assert_eq!(joined, payload);
}

#[tokio::test]
async fn a_status_in_the_trailers_ends_the_messages_with_it() {
    let framed = stock(&ConnectionDownstream::data(pattern(10)));
    let aborted = Status::aborted("the remote connection failed");
    let mut messages =
        Messages::<ConnectionDownstream>::response(body(&framed, &[], Some(aborted)), false);
    let (read, end) = read_all(&mut messages).await;
    assert_eq!(read, [Ok(pattern(10))]);
    let status = end.unwrap_err();
    assert_eq!(status.code(), Code::Aborted);
    assert_eq!(status.message(), "the remote connection failed");

    let mut clean =
        Messages::<ConnectionDownstream>::response(body(&framed, &[], Some(Status::ok(""))), false);
    assert!(read_all(&mut clean).await.1.is_ok());
}

#[tokio::test]
async fn a_response_cut_off_before_its_status_is_an_error() {
    let framed = stock(&ConnectionDownstream::data(pattern(10)));
    let mut cut = Messages::<ConnectionDownstream>::response(body(&framed, &[], None), false);
    let (read, end) = read_all(&mut cut).await;
    assert_eq!(read, [Ok(pattern(10))]);
    assert_eq!(end.unwrap_err().code(), Code::Unavailable);

    // A status already in the headers (trailers-only) needs none at the end.
    let mut given = Messages::<ConnectionDownstream>::response(body(&[], &[], None), true);
    let (read, end) = read_all(&mut given).await;
    assert!(read.is_empty() && end.is_ok(), "{end:?}");
    // A request's messages end with the stream.
    let mut request = Messages::<ConnectionUpstream>::request(body(&[], &[], None));
    let (read, end) = read_all(&mut request).await;
    assert!(read.is_empty() && end.is_ok(), "{end:?}");
}

#[tokio::test]
async fn broken_framing_is_an_error_not_a_hang() {
    let mut compressed = stock(&ConnectionUpstream::data(pattern(3)));
    compressed[0] = 1;
    let mut truncated = stock(&ConnectionUpstream::data(pattern(30)));
    truncated.truncate(20);
    let mut oversized = vec![0];
    oversized.extend_from_slice(&(MAX_CONTROL_MESSAGE as u32 + 1).to_be_bytes());
    // An `attach` (field 1), not data: it would have to be held whole.
    oversized.extend_from_slice(&[0x0a; 11]);
    for (bytes, code) in [
        (compressed, Code::Unimplemented),
        (truncated, Code::Internal),
        (oversized, Code::ResourceExhausted),
        (vec![0, 0, 0, 0, 2, 0xff, 0xff], Code::Internal),
    ] {
        let mut messages = Messages::<ConnectionUpstream>::request(body(&bytes, &[], None));
        let (_, end) = read_all(&mut messages).await;
        assert_eq!(end.unwrap_err().code(), code, "{bytes:?}");
        // Nothing after the failure is read as a message.
        let again = messages.message().await.unwrap_err();
        assert_eq!(again.code(), code, "{bytes:?}");
    }
}

#[tokio::test]
async fn a_server_body_ends_with_the_status_and_reads_back() {
    let eof = ConnectionDownstream {
        kind: Some(connection_downstream::Kind::Eof(Eof {})),
    };
    let sent = stream::iter(
        frames(ConnectionDownstream::data(pattern(5000)))
            .chain(frames(eof.clone()))
            .map(Ok)
            .chain([Err(Status::unavailable("the session ended"))]),
    );
    let mut messages =
        Messages::<ConnectionDownstream>::response(Body::new(FrameBody::server(sent)), false);
    let (read, end) = read_all(&mut messages).await;
    assert_eq!(read, [Ok(pattern(5000)), Err(eof)]);
    assert_eq!(end.unwrap_err().code(), Code::Unavailable);

    let clean = FrameBody::server(stream::iter([Ok(encode(&ConnectionDownstream::default()))]));
    let collected = clean.collect().await.unwrap();
    assert_eq!(collected.trailers().unwrap()["grpc-status"], "0");
    assert_eq!(
        collected.to_bytes(),
        Bytes::from(stock(&ConnectionDownstream::default()))
    );
}

#[tokio::test]
async fn a_client_body_has_no_trailers_and_fails_with_its_error() {
    let clean = FrameBody::client(stream::iter([Ok(encode(&ConnectionUpstream::default()))]));
    assert!(clean.collect().await.unwrap().trailers().is_none());
    let failed = FrameBody::client(stream::iter([Err(Status::cancelled("gone"))]));
    assert_eq!(failed.collect().await.unwrap_err().code(), Code::Cancelled);
}

#[tokio::test]
async fn a_message_with_more_than_data_is_decoded_whole() {
    // `data` = "abc", then an empty `attach`: for a oneof the last field
    // wins, as prost decides when it gets the whole message.
    let message = [0x12, 3, b'a', b'b', b'c', 0x0a, 0];
    let mut framed = vec![0, 0, 0, 0, message.len() as u8];
    framed.extend_from_slice(&message);
    let mut messages = Messages::<ConnectionUpstream>::request(body(&framed, &[6], None));
    let (read, end) = read_all(&mut messages).await;
    assert!(end.is_ok());
    let attach = ConnectionUpstream {
        kind: Some(connection_upstream::Kind::Attach(Attach::default())),
    };
    assert_eq!(read, [Err(attach)]);
}

#[tokio::test]
async fn a_socket_is_read_into_messages_until_its_end() {
    use tokio::io::AsyncWriteExt as _;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mut sender = tokio::net::TcpStream::connect(listener.local_addr().unwrap())
        .await
        .unwrap();
    let (mut socket, _) = listener.accept().await.unwrap().0.into_split();

    sender.write_all(&pattern(100)).await.unwrap();
    let buffer = read(&mut socket).await.unwrap();
    assert_eq!(buffer.len(), 100);
    assert_eq!(
        buffer.into_message::<ConnectionUpstream>(),
        stock(&ConnectionUpstream::data(pattern(100)))
    );
    // More than one read holds: the rest comes with the next.
    sender.write_all(&pattern(1500)).await.unwrap();
    let mut received = Vec::new();
    while received.len() < 1500 {
        let buffer = read(&mut socket).await.unwrap();
        assert!(!buffer.is_empty() && buffer.len() <= 1 << 10);
        let message = buffer.into_message::<ConnectionUpstream>();
        let decoded = <ConnectionUpstream as prost::Message>::decode(&message[PREFIX..]).unwrap();
        received.extend_from_slice(&decoded.into_data().unwrap());
    }
    assert_eq!(received, pattern(1500));

    sender.shutdown().await.unwrap();
    assert!(read(&mut socket).await.unwrap().is_empty());
}

async fn read(socket: &mut tokio::net::tcp::OwnedReadHalf) -> std::io::Result<DataBuffer> {
    std::future::poll_fn(|cx| DataBuffer::poll_read(socket, cx, 1 << 10)).await
}
