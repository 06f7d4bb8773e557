//! Kubernetes pods as targets.
mod pod_netns;

pub use pod_netns::{PodNetnsError, find_pod_netns};
