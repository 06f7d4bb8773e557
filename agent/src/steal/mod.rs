//! Stealing a port: whole (every new connection goes to one developer) or
//! filtered (requests are routed one by one among several developers and
//! the pod). The kernel side is the same for both (see `redirect`).
mod ports;
mod shared_port;
pub mod whole_port;

pub use ports::{ClaimError, Membership, Ports, WholeClaim};
pub use shared_port::canonical;
