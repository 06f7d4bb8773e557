//! The gRPC API between the remocal agent and client (package `remocal.v1`).
pub mod v1 {
    tonic::include_proto!("remocal.v1");
}

/// Port the agent's gRPC server listens on by default (agent and client agree on it).
pub const DEFAULT_GRPC_PORT: u16 = 7420;
