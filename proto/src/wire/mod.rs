//! gRPC's message framing for the `Connection` call, done by hand on both
//! sides so that a connection's bytes are never copied in user space.
//!
//! tonic's codec copies every message it sends into its encoding buffer and
//! every frame it receives into its decoding buffer: two of the eight copies
//! each byte of a stolen stream took, and most of the user-space CPU of both
//! processes (perf: 13 to 18% in `memmove`). Here a connection's bytes are
//! read into a buffer with room in front for the framing ([`DataBuffer`]),
//! handed to HTTP/2 as they are, and arrive as slices of HTTP/2's own read
//! buffer ([`Messages`]).
//!
//! What goes over the wire is unchanged: the call is still the
//! `remocal.v1.Agent/Connection` of the .proto, and a stock gRPC client or
//! server on the other side interoperates with this one.
mod body;
mod decode;
mod encode;
mod socket;

use bytes::Bytes;

use crate::v1::{
    ConnectionDownstream, ConnectionUpstream, connection_downstream, connection_upstream,
};

pub use body::FrameBody;
pub use decode::Messages;
pub use encode::{DataBuffer, encode, frames};

/// The call's HTTP/2 path.
pub const CONNECTION_PATH: &str = "/remocal.v1.Agent/Connection";

/// gRPC's length prefix: a compression flag and a big-endian u32 length.
const PREFIX: usize = 5;

/// Largest message other than data a side accepts; data of any length is
/// passed on in pieces as it arrives, so it needs no limit.
pub const MAX_CONTROL_MESSAGE: usize = 1 << 20;

/// A message of the `Connection` call whose `oneof` carries a connection's
/// bytes in a `bytes` field.
pub trait DataMessage: prost::Message + Default + Send + 'static {
    /// The number of the `bytes` field.
    const DATA_FIELD: u32;

    fn data(bytes: Bytes) -> Self;

    /// The bytes, if this is a data message.
    fn into_data(self) -> Result<Bytes, Self>;
}

impl DataMessage for ConnectionUpstream {
    const DATA_FIELD: u32 = 2;

    fn data(bytes: Bytes) -> Self {
        Self {
            kind: Some(connection_upstream::Kind::Data(bytes)),
        }
    }

    fn into_data(self) -> Result<Bytes, Self> {
        match self.kind {
            Some(connection_upstream::Kind::Data(bytes)) => Ok(bytes),
            kind => Err(Self { kind }),
        }
    }
}

impl DataMessage for ConnectionDownstream {
    const DATA_FIELD: u32 = 1;

    fn data(bytes: Bytes) -> Self {
        Self {
            kind: Some(connection_downstream::Kind::Data(bytes)),
        }
    }

    fn into_data(self) -> Result<Bytes, Self> {
        match self.kind {
            Some(connection_downstream::Kind::Data(bytes)) => Ok(bytes),
            kind => Err(Self { kind }),
        }
    }
}

/// The protobuf key of a message's data field (wire type 2: length-delimited).
fn data_key<M: DataMessage>() -> u64 {
    u64::from(M::DATA_FIELD << 3 | 2)
}

#[cfg(test)]
mod tests;
