//! Messages to bytes for HTTP/2: a connection's bytes are framed in place,
//! everything else is encoded with prost.
use bytes::{BufMut as _, Bytes, BytesMut};
use prost::encoding::{encode_varint, encoded_len_varint};

use super::{DataMessage, PREFIX, data_key};

/// Room for the prefix, a one-byte key and a length of up to 10 bytes.
const HEADROOM: usize = 16;

/// Unused room a message may keep: more is given back before it is queued.
const SPARE_KEPT: usize = 4096;

/// A buffer a connection's bytes are read into, with room in front for
/// their message's framing, so that the message goes to HTTP/2 as one
/// piece without being copied.
pub struct DataBuffer(Vec<u8>);

impl DataBuffer {
    /// Room for `capacity` bytes of payload.
    pub(super) fn with_capacity(capacity: usize) -> Self {
        let mut buffer = Vec::with_capacity(HEADROOM + capacity);
        buffer.resize(HEADROOM, 0);
        Self(buffer)
    }

    /// The buffer to read into. Only append to it: what is already there is
    /// the room kept for the framing.
    pub(super) fn tail(&mut self) -> &mut Vec<u8> {
        &mut self.0
    }

    /// Payload bytes read so far.
    pub fn len(&self) -> usize {
        self.0.len() - HEADROOM
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The whole gRPC message, a data message of type `M`.
    pub fn into_message<M: DataMessage>(self) -> Bytes {
        let payload = self.len();
        let mut buffer = self.0;
        let start = HEADROOM - header_len::<M>(payload);
        put_header::<M>(&mut buffer[start..HEADROOM], payload);
        // HTTP/2 may queue many messages behind a slow link, each holding
        // its whole buffer: a short read gives the rest back first, which
        // glibc does in place, without copying, so queued memory stays
        // close to the bytes queued.
        if buffer.capacity() - buffer.len() > SPARE_KEPT {
            buffer.shrink_to_fit();
        }
        Bytes::from(buffer).slice(start..)
    }
}

/// The framing in front of `payload` bytes: prefix, key and length.
fn header_len<M: DataMessage>(payload: usize) -> usize {
    PREFIX + encoded_len_varint(data_key::<M>()) + encoded_len_varint(payload as u64)
}

fn put_header<M: DataMessage>(mut into: &mut [u8], payload: usize) {
    let message = header_len::<M>(payload) - PREFIX + payload;
    debug_assert!(u32::try_from(message).is_ok(), "data is read in chunks");
    into.put_u8(0);
    into.put_u32(message as u32);
    encode_varint(data_key::<M>(), &mut into);
    encode_varint(payload as u64, &mut into);
}

/// Any message, as one gRPC message.
pub fn encode<M: prost::Message>(message: &M) -> Bytes {
    let len = message.encoded_len();
    let mut buffer = BytesMut::with_capacity(PREFIX + len);
    buffer.put_u8(0);
    buffer.put_u32(len as u32);
    message.encode_raw(&mut buffer);
    buffer.freeze()
}

/// A message as the pieces HTTP/2 sends: a data message as its framing and
/// its bytes, uncopied; any other as one piece.
pub fn frames<M: DataMessage>(message: M) -> impl Iterator<Item = Bytes> + Send {
    let (first, second) = match message.into_data() {
        Ok(payload) => {
            let mut header = BytesMut::zeroed(header_len::<M>(payload.len()));
            put_header::<M>(&mut header, payload.len());
            (header.freeze(), Some(payload))
        }
        Err(message) => (encode(&message), None),
    };
    std::iter::once(first).chain(second)
}
