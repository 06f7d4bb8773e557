//! What operators scrape: `/metrics` (OpenMetrics text, which Prometheus
//! reads natively), `/healthz` and `/readyz`. Labels are bounded sets (mode,
//! direction, reason, program, verdict): nothing per connection or per
//! client address, so cardinality cannot grow with traffic.
use std::{net::SocketAddr, sync::Arc};

use axum::{
    Router,
    http::{HeaderMap, StatusCode, header},
    response::IntoResponse,
    routing::get,
};
use prometheus_client::{
    collector::Collector,
    encoding::{EncodeLabelSet, EncodeLabelValue},
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
        info::Info,
    },
    registry::Registry,
};
use tracing::warn;

use crate::health::{Heartbeat, STALL_LIMIT};

#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum Mode {
    steal,
    mirror,
}

#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum Direction {
    /// Sent by the remote client (toward the pod, or the local process).
    from_remote,
    /// Sent back to the remote client.
    to_remote,
}

/// Who served a request on a port shared by filtered steals.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum Route {
    /// A filtered session's filter matched: the developer's process.
    session,
    /// No filter matched: passed through to the pod's own server.
    pod,
}

#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum Protocol {
    http1,
    http2,
    /// Not HTTP: the connection went to the pod whole.
    other,
    /// Beyond the connections the agent routes at once: to the pod whole,
    /// unfiltered.
    not_routed,
}

/// What became of a pod's existing connection under `--reset-existing`.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum ResetOutcome {
    /// Ended while idle: its client reconnects, into the steal.
    ended,
    /// Still busy at the deadline: left to the pod.
    left_alone,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResetLabels {
    pub outcome: ResetOutcome,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    pub route: Route,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProtocolLabels {
    pub protocol: Protocol,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ModeLabels {
    pub mode: Mode,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TrafficLabels {
    pub mode: Mode,
    pub direction: Direction,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    /// A gRPC status code name: a small fixed set.
    pub reason: String,
}

pub struct Metrics {
    pub sessions_active: Family<ModeLabels, Gauge>,
    pub connections_total: Family<ModeLabels, Counter>,
    pub connections_active: Family<ModeLabels, Gauge>,
    pub bytes_total: Family<TrafficLabels, Counter>,
    pub mirror_lost_bytes_total: Counter,
    pub mirror_half_open: Gauge,
    pub mirror_not_copied_total: Counter,
    /// The agent's mirror memory budget in use: the agent hands in the
    /// budget's own gauge, which every mirror session updates.
    pub mirror_held_bytes: Gauge,
    pub session_errors_total: Family<ReasonLabels, Counter>,
    pub flow_rtt_seconds: Histogram,
    pub routed_requests_total: Family<RouteLabels, Counter>,
    pub routed_connections_total: Family<ProtocolLabels, Counter>,
    pub reset_connections_total: Family<ResetLabels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            sessions_active: Family::default(),
            connections_total: Family::default(),
            connections_active: Family::default(),
            bytes_total: Family::default(),
            mirror_lost_bytes_total: Counter::default(),
            mirror_half_open: Gauge::default(),
            mirror_not_copied_total: Counter::default(),
            mirror_held_bytes: Gauge::default(),
            session_errors_total: Family::default(),
            // 50 µs to ~1.6 s: from a pod next door to a remote region.
            flow_rtt_seconds: Histogram::new(exponential_buckets(50e-6, 2.0, 16)),
            routed_requests_total: Family::default(),
            routed_connections_total: Family::default(),
            reset_connections_total: Family::default(),
        }
    }
}

impl Metrics {
    pub fn connection_opened(&self, mode: Mode) {
        let labels = ModeLabels { mode };
        self.connections_total.get_or_create(&labels).inc();
        self.connections_active.get_or_create(&labels).inc();
    }

    pub fn connection_closed(&self, mode: Mode, from_remote: u64, to_remote: u64) {
        self.connections_active
            .get_or_create(&ModeLabels { mode })
            .dec();
        for (direction, bytes) in [
            (Direction::from_remote, from_remote),
            (Direction::to_remote, to_remote),
        ] {
            self.bytes_total
                .get_or_create(&TrafficLabels { mode, direction })
                .inc_by(bytes);
        }
    }

    pub fn request_routed(&self, route: Route) {
        self.routed_requests_total
            .get_or_create(&RouteLabels { route })
            .inc();
    }

    /// Counts a connection of a shared port once it ended, by the protocol
    /// it turned out to speak.
    pub fn routed_connection(&self, protocol: crate::http_route::Protocol) {
        let protocol = match protocol {
            crate::http_route::Protocol::Http1 => Protocol::http1,
            crate::http_route::Protocol::Http2 => Protocol::http2,
            crate::http_route::Protocol::Other => Protocol::other,
        };
        self.routed_connections_total
            .get_or_create(&ProtocolLabels { protocol })
            .inc();
    }

    pub fn unrouted_connection(&self) {
        self.routed_connections_total
            .get_or_create(&ProtocolLabels {
                protocol: Protocol::not_routed,
            })
            .inc();
    }

    pub fn connections_reset(&self, outcome: ResetOutcome, count: usize) {
        self.reset_connections_total
            .get_or_create(&ResetLabels { outcome })
            .inc_by(count as u64);
    }

    pub fn session_error(&self, code: tonic::Code) {
        let reason = format!("{code:?}");
        self.session_errors_total
            .get_or_create(&ReasonLabels { reason })
            .inc();
    }
}

/// The registry: our metrics, the kernel's counters (read at scrape time),
/// and the build.
pub fn registry(metrics: &Metrics, kernel: Box<dyn Collector>) -> Registry {
    let mut registry = Registry::with_prefix("remocal");
    registry.register(
        "sessions_active",
        "Sessions running",
        metrics.sessions_active.clone(),
    );
    registry.register(
        "connections",
        "Connections stolen or mirrored",
        metrics.connections_total.clone(),
    );
    registry.register(
        "connections_active",
        "Connections being served",
        metrics.connections_active.clone(),
    );
    registry.register(
        "bytes",
        "Bytes carried for stolen and mirrored connections",
        metrics.bytes_total.clone(),
    );
    registry.register(
        "mirror_lost_bytes",
        "Bytes of mirrored connections that were not captured (their copies were cut off)",
        metrics.mirror_lost_bytes_total.clone(),
    );
    registry.register(
        "mirror_half_open",
        "Connections to mirrored ports whose SYN was seen and no data yet (copies start with the first data)",
        metrics.mirror_half_open.clone(),
    );
    registry.register(
        "mirror_not_copied",
        "New mirrored connections not copied because their session already had the most copies in progress",
        metrics.mirror_not_copied_total.clone(),
    );
    registry.register(
        "mirror_held_bytes",
        "Bytes all mirrored copies hold in the agent (reassembly and queues toward clients, counting a per-piece overhead), bounded by the agent's mirror memory budget",
        metrics.mirror_held_bytes.clone(),
    );
    registry.register(
        "session_errors",
        "Session requests refused or failed, by gRPC status",
        metrics.session_errors_total.clone(),
    );
    registry.register(
        "flow_rtt_seconds",
        "Smoothed TCP round-trip time of stolen and mirrored connections when they close (from sock_ops)",
        metrics.flow_rtt_seconds.clone(),
    );
    registry.register(
        "routed_requests",
        "HTTP requests on ports shared by filtered steals, by who served them: a developer's session (matched) or the pod (passed through)",
        metrics.routed_requests_total.clone(),
    );
    registry.register(
        "routed_connections",
        "Connections to ports shared by filtered steals, counted when they end, by protocol (other: not HTTP, passed to the pod whole; not_routed: beyond the agent's limit, passed to the pod whole unfiltered, counted when they start)",
        metrics.routed_connections_total.clone(),
    );
    registry.register(
        "reset_connections",
        "A pod's connections that were open before a steal with --reset-existing: ended while idle so their clients reconnect into the steal, or left alone, still busy at the deadline",
        metrics.reset_connections_total.clone(),
    );
    registry.register(
        "build",
        "The agent's version",
        Info::new(vec![(
            "version".to_string(),
            env!("CARGO_PKG_VERSION").to_string(),
        )]),
    );
    registry.register_collector(kernel);
    registry
}

/// Serves the registry; an address already taken is an error at start-up.
/// Returns the address bound (port 0 picks a free one). Serves on a thread
/// and runtime of its own: a scrape or a probe never waits behind the data
/// path, and `/healthz` can tell that the main runtime is stuck (see
/// [`Heartbeat`]).
pub async fn serve(
    addr: SocketAddr,
    registry: Registry,
    heartbeat: Heartbeat,
) -> std::io::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr).await?.into_std()?;
    let bound = listener.local_addr()?;
    let registry = Arc::new(registry);
    let app = Router::new()
        .route(
            "/metrics",
            get(move |headers: HeaderMap| {
                let registry = registry.clone();
                async move { scrape(&registry, &headers) }
            }),
        )
        .route("/healthz", get(move || async move { health(&heartbeat) }))
        // Ready once serving: the eBPF programs were verified before this starts.
        .route("/readyz", get(|| async { "ready\n" }));
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    std::thread::Builder::new()
        .name("metrics".into())
        .spawn(move || {
            runtime.block_on(async move {
                let served = match tokio::net::TcpListener::from_std(listener) {
                    Ok(listener) => axum::serve(listener, app).await,
                    Err(err) => Err(err),
                };
                if let Err(err) = served {
                    warn!(%err, "the metrics server stopped");
                }
            });
        })?;
    Ok(bound)
}

fn health(heartbeat: &Heartbeat) -> impl IntoResponse + use<> {
    match heartbeat.stalled(STALL_LIMIT) {
        None => (StatusCode::OK, "ok\n".to_string()),
        Some(silent) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "stuck: the agent's runtime has made no progress for {}s\n",
                silent.as_secs()
            ),
        ),
    }
}

/// OpenMetrics for scrapers that ask for it (Prometheus does), the classic
/// Prometheus text format for everyone else (curl, promtool, older tools).
fn scrape(registry: &Registry, headers: &HeaderMap) -> impl IntoResponse + use<> {
    let mut body = String::new();
    if let Err(err) = prometheus_client::encoding::text::encode(&mut body, registry) {
        warn!(%err, "encoding metrics failed");
    }
    let openmetrics = headers
        .get(header::ACCEPT)
        .and_then(|accept| accept.to_str().ok())
        .is_some_and(|accept| accept.contains("application/openmetrics-text"));
    if openmetrics {
        (
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            body,
        )
    } else {
        (
            [(
                header::CONTENT_TYPE,
                "text/plain; version=0.0.4; charset=utf-8",
            )],
            prometheus_text(&body),
        )
    }
}

/// OpenMetrics text differs from the Prometheus text format in its metadata:
/// families are named without their `_total`/`_info` suffix, `info` is a
/// type of its own, and the exposition ends with `# EOF`.
fn prometheus_text(openmetrics: &str) -> String {
    let mut out = String::with_capacity(openmetrics.len());
    // HELP comes before TYPE, but only TYPE tells the suffix.
    let mut help = None;
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# HELP ") {
            help = Some(rest.split_once(' ').unwrap_or((rest, "")));
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap_or((rest, "untyped"));
            let (suffix, kind) = match kind {
                "counter" => ("_total", "counter"),
                "info" => ("_info", "gauge"),
                other => ("", other),
            };
            if let Some((_, text)) = help.take().filter(|(helped, _)| *helped == name) {
                out.push_str(&format!("# HELP {name}{suffix} {text}\n"));
            }
            out.push_str(&format!("# TYPE {name}{suffix} {kind}\n"));
            continue;
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn openmetrics_metadata_becomes_prometheus_text() {
        let openmetrics = "# HELP remocal_connections Connections.\n# TYPE remocal_connections counter\n\
                           remocal_connections_total{mode=\"steal\"} 3\n# HELP remocal_build The version.\n\
                           # TYPE remocal_build info\nremocal_build_info{version=\"0.1.0\"} 1\n# EOF\n";
        assert_eq!(
            prometheus_text(openmetrics),
            "# HELP remocal_connections_total Connections.\n# TYPE remocal_connections_total counter\n\
             remocal_connections_total{mode=\"steal\"} 3\n# HELP remocal_build_info The version.\n\
             # TYPE remocal_build_info gauge\nremocal_build_info{version=\"0.1.0\"} 1\n"
        );
    }
}
