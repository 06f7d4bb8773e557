//! Mirroring: a passive, byte-exact copy of a pod's incoming connections.
//! The kernel copies segments; this module puts each connection's bytes
//! back in order and feeds them to the client without ever touching the
//! pod's own traffic. Its kernel half is the `remocal_mirror` program
//! (ebpf/src/mirror.rs), which copies segments into a ring that
//! `capture_ring` reads into the sessions' taps.
mod budget;
mod capture;
pub mod capture_ring;
mod half_open;
pub mod reassembly;
mod session;
mod tap;

pub use budget::{DEFAULT_BUDGET, held_bytes, set_limit as set_budget};
pub use capture::{Capture, Flow};
pub use session::run;
pub use tap::Tap;
