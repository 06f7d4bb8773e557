//! Kubernetes pods as targets: by name through the API, then by UID through
//! the node's cgroups.
mod pod_events;
mod pod_lookup;
mod pod_netns;

pub use pod_events::PodEvents;
pub use pod_lookup::{PodLookup, PodLookupError, ScheduledPod, with_root_cause};
pub use pod_netns::{PodNetnsError, find_pod_netns};
