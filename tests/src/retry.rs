//! Polling for conditions that become true asynchronously (a redirection being removed,
//! a process exiting), so tests wait exactly as long as needed and no longer than a bound.

use std::future::Future;
use std::time::Duration;

use tokio::time::{Instant, sleep};

/// Calls `attempt` until it returns `Ok`, or until `deadline` passes; then returns the
/// last error so the failure message can say what was seen last.
pub async fn until_ok<T, E, F, Fut>(
    deadline: Instant,
    interval: Duration,
    mut attempt: F,
) -> Result<T, E>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    loop {
        let result = attempt().await;
        if result.is_ok() || Instant::now() + interval > deadline {
            return result;
        }
        sleep(interval).await;
    }
}
