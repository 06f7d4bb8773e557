//! Mirroring: a passive, byte-exact copy of a pod's incoming connections.
//! The kernel copies segments; this module puts each connection's bytes
//! back in order and feeds them to the client without ever touching the
//! pod's own traffic.
mod budget;
mod capture;
mod half_open;
pub mod reassembly;
mod session;

pub use budget::{DEFAULT_BUDGET, held_bytes, set_limit as set_budget};
pub use capture::{Capture, Flow};
pub use session::run;
