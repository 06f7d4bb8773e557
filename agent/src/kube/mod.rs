//! Kubernetes pods as targets: by name through the API, then by UID through
//! the node's cgroups.
mod pod_events;
mod pod_lookup;
mod pod_netns;

pub use pod_events::PodEvents;
pub use pod_lookup::{PodLookup, PodLookupError, ScheduledPod, with_root_cause};
pub use pod_netns::{PodNetnsError, find_pod_netns};

/// How long any one API call of the agent may take: a session start or a
/// caller's check must not hang on a slow API server.
pub const API_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// An API call within [`API_TIMEOUT`]; a failure as the words to show (the
/// API server's message, the root cause of a failed connection, or the
/// timeout).
pub async fn within_timeout<T>(
    call: impl Future<Output = Result<T, kube::Error>>,
) -> Result<T, String> {
    match tokio::time::timeout(API_TIMEOUT, call).await {
        Ok(Ok(answer)) => Ok(answer),
        Ok(Err(kube::Error::Api(status))) => Err(status.message),
        Ok(Err(err)) => Err(with_root_cause(&err)),
        Err(_) => Err(format!(
            "the API server did not answer within {API_TIMEOUT:?}"
        )),
    }
}

/// A Kubernetes object name (DNS-1123 subdomain): anything else could only
/// be an attempt to reach another path of the API.
pub fn is_object_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
}
