//! Harness for remocal's end-to-end tests.
//!
//! The tests drive the real `remocal-agent` and `remocal` binaries against a real
//! kernel, so they need root. Every test builds its own throw-away topology of
//! network namespaces (a "node" and one or more "pods"), so tests can run in
//! parallel and never touch the host's own interfaces, routes or firewall.
//!
//! Running (as root, on a kernel with tcx, 6.6 or later):
//!
//! ```text
//! cargo build --workspace --exclude remocal-ebpf --bins
//! cargo test -p remocal-tests -- --test-threads=2
//! ```
//!
//! `REMOCAL_BIN_DIR` points the tests at binaries elsewhere than `target/debug`.
//! Besides the binaries they need `ip` (iproute2) and `curl`.

pub mod attacker;
pub mod bpf;
pub mod data;
pub mod grpc_echo;
pub mod http_clients;
pub mod http_servers;
pub mod kube_api;
pub mod kube_cluster;
pub mod kubelet_cgroup;
pub mod netns;
pub mod processes;
pub mod remote;
pub mod retry;
pub mod scenario;
pub mod servers;
pub mod syn_flood;
pub mod topology;
pub mod user_roles;
