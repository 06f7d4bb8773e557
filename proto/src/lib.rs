//! The gRPC API between the remocal agent and client (package `remocal.v1`).
pub mod allocator;
pub mod auth;
pub mod filter;
pub mod wire;

pub mod v1 {
    tonic::include_proto!("remocal.v1");
}

/// Port the agent's gRPC server listens on by default (agent and client agree on it).
pub const DEFAULT_GRPC_PORT: u16 = 7420;

/// Largest HTTP/2 frame each side accepts. HTTP/2's default, 16 KiB, cut
/// every 64 KiB read of a stolen stream into four frames, each handled on
/// its own by both sides.
pub const HTTP2_FRAME_SIZE: u32 = 256 << 10;

/// The prost codec with small per-call buffers. tonic allocates its codec
/// buffers eagerly, one to decode and one to encode per call (8 KiB each by
/// default); with one call per stolen connection that is most of what an
/// idle connection costs. Larger messages grow the buffers as needed.
pub struct LeanCodec<T, U>(tonic_prost::ProstCodec<T, U>);

fn lean_buffers() -> tonic::codec::BufferSettings {
    tonic::codec::BufferSettings::new(256, 32 * 1024)
}

impl<T, U> Default for LeanCodec<T, U> {
    fn default() -> Self {
        Self(tonic_prost::ProstCodec::default())
    }
}

impl<T, U> tonic::codec::Codec for LeanCodec<T, U>
where
    T: prost::Message + Send + 'static,
    U: prost::Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = tonic_prost::ProstEncoder<T>;
    type Decoder = tonic_prost::ProstDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        tonic_prost::ProstEncoder::new(lean_buffers())
    }

    fn decoder(&mut self) -> Self::Decoder {
        tonic_prost::ProstDecoder::new(lean_buffers())
    }
}
