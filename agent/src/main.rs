//! remocal-agent: runs on every node (a DaemonSet with hostNetwork and
//! hostPID), steals selected TCP connections of pods with eBPF and serves them
//! to remocal clients over gRPC.
mod agent_processes;
mod auth;
mod bpf_counters;
mod bpf_syscall;
mod grpc;
mod health;
mod http_route;
mod kernel_btf;
mod kube;
mod live_session;
mod logging;
mod memory;
mod metrics;
mod mirror;
mod netlink;
mod netns;
mod passthrough;
mod proxy;
mod redirect;
mod reset_existing;
mod session;
mod sock_diag;
mod steal;
#[cfg(test)]
mod tests;

use std::{net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use anyhow::Context as _;
use clap::Parser;
use tokio::signal::unix::{SignalKind, signal};
use tracing::{info, warn};

use crate::{
    auth::{Auth, AuthMode},
    kube::PodLookup,
    logging::LogFormat,
    metrics::Metrics,
    redirect::EbpfRedirector,
    reset_existing::EndWith,
    session::{Sessions, Settings},
};

/// How long connections may take to close cleanly once the agent is told to stop.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

#[derive(Parser)]
#[command(
    version,
    about = "remocal node agent: steals pod traffic with eBPF and serves it to remocal clients over gRPC"
)]
struct Cli {
    /// Address of the gRPC server remocal clients connect to.
    #[arg(long, default_value_t = SocketAddr::from(([127, 0, 0, 1], remocal_proto::DEFAULT_GRPC_PORT)))]
    grpc_listen: SocketAddr,
    /// Address of the metrics server (`/metrics`, `/healthz`, `/readyz`).
    #[arg(long, default_value_t = SocketAddr::from(([0, 0, 0, 0], 9420)))]
    metrics_listen: SocketAddr,
    /// Bytes of the kernel's capture ring buffer per target namespace (a power
    /// of two, at least 4096). When mirrored traffic outruns it, the affected
    /// mirrored connections are cut off and reported, never stitched.
    #[arg(long, default_value_t = remocal_agent_common::DEFAULT_CAPTURE_BUFFER, value_parser = capture_buffer)]
    capture_buffer: u32,
    /// Bytes one mirrored connection may hold while the developer's local
    /// process reads slowly; beyond that the copy is cut off and reported.
    #[arg(long, default_value_t = 32 << 20)]
    mirror_flow_limit: usize,
    /// Bytes all mirrored connections together may hold in the agent; beyond
    /// that the copy holding the most is cut off and reported. Size the
    /// DaemonSet's memory limit with it (see the README's "Memory under abuse").
    #[arg(long, env = "REMOCAL_MIRROR_BUDGET", default_value_t = mirror::DEFAULT_BUDGET)]
    mirror_budget: usize,
    /// How `--reset-existing` ends the pod's idle connections: in the
    /// kernel (a socket iterator calling bpf_sock_destroy, which checks
    /// under each socket's lock that it is still idle; kernel 6.5+), with
    /// netlink SOCK_DESTROY, or the first of them this kernel offers.
    #[arg(long, value_enum, default_value_t = EndWith::Auto)]
    end_connections_with: EndWith,
    /// This node's name as Kubernetes knows it; pods named by clients must run
    /// here (the DaemonSet sets NODE_NAME from spec.nodeName).
    #[arg(long, env = "NODE_NAME")]
    node_name: Option<String>,
    /// Kubeconfig for reading pods when the agent runs outside a cluster; in a
    /// pod the agent uses its service account.
    #[arg(long, value_name = "PATH")]
    kubeconfig: Option<PathBuf>,
    /// Log line format (filter with RUST_LOG, default info).
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    /// Threads moving stolen and mirrored bytes. One thread serves one
    /// developer's traffic fastest (a handoff between threads cost each
    /// request about 35 us); raise it for nodes where many developers push
    /// heavy traffic at once.
    #[arg(long, env = "REMOCAL_WORKER_THREADS", default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=256))]
    worker_threads: u16,
    /// Who may call: `kubernetes` (callers prove their kubeconfig identity,
    /// RBAC decides what they may steal or mirror) or `none` (everyone may
    /// do anything; only with a loopback --grpc-listen). Default:
    /// `kubernetes` whenever the agent has API access, else `none`.
    #[arg(long, value_enum)]
    auth: Option<AuthMode>,
}

fn main() -> anyhow::Result<()> {
    // Fixed thresholds: frame buffers reused from the heap; what a burst
    // leaves behind is returned by `memory::release_free` after it.
    remocal_proto::allocator::configure();
    let cli = Cli::parse();
    logging::init(cli.log_format);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(cli.worker_threads.into())
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let result = runtime.block_on(run(cli));
    // A blocking thread stuck in the kernel must not keep a stopping agent
    // alive until the kubelet's kill timeout.
    runtime.shutdown_timeout(Duration::from_secs(1));
    result
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    raise_fd_limit();
    // kube's TLS uses rustls' process-wide provider; naming it keeps that true
    // even if another dependency ever compiles a second provider in.
    let _ = rustls::crypto::ring::default_provider().install_default();

    let redirector = EbpfRedirector::new(tokio::runtime::Handle::current(), cli.capture_buffer)
        .context("the agent cannot use eBPF on this node")?;
    mirror::set_budget(cli.mirror_budget);
    // A killed agent leaves its (inert) pass-through rules in pods'
    // namespaces; they go before anything new is set up.
    let cleaned = tokio::task::spawn_blocking(passthrough::clean_leftovers)
        .await
        .unwrap_or_default();
    if cleaned > 0 {
        info!(
            namespaces = cleaned,
            "removed pass-through rules an earlier agent left behind"
        );
    }
    let settings = Settings {
        mirror_flow_limit: cli.mirror_flow_limit,
        end_connections_with: cli.end_connections_with,
    };
    let pods = PodLookup::connect(cli.kubeconfig.as_deref(), cli.node_name)
        .await
        .context("cannot set up access to the Kubernetes API (check --kubeconfig, or the pod's service account)")?;
    if !pods.has_api_access() {
        info!(
            "no Kubernetes API access: pods can be targeted by UID, namespace or PID, not by name"
        );
    } else if pods.node().is_none() {
        warn!("NODE_NAME is not set: pods cannot be targeted by name");
    }
    let metrics = Arc::new(Metrics {
        mirror_held_bytes: mirror::held_bytes(),
        ..Metrics::default()
    });
    let auth = Arc::new(authentication(
        cli.auth,
        &pods,
        cli.grpc_listen,
        metrics.clone(),
    )?);
    let registry = metrics::registry(&metrics, Box::new(redirector.kernel_counters()));
    let sessions = Sessions::new(Arc::new(redirector), pods, auth.clone(), settings, metrics);
    let metrics_addr = metrics::serve(cli.metrics_listen, registry, health::Heartbeat::start())
        .await.with_context(|| {
        format!(
            "cannot serve metrics on {}: is another remocal-agent running? Choose another address with --metrics-listen",
            cli.metrics_listen
        )
    })?;
    let listener = tokio::net::TcpListener::bind(cli.grpc_listen)
        .await
        .with_context(|| {
            format!(
                "cannot listen for clients on {}: is another remocal-agent running? Choose another address with --grpc-listen",
                cli.grpc_listen
            )
        })?;
    // The bound addresses: with port 0 the kernel picked them (tests rely on this line).
    let grpc_addr = listener
        .local_addr()
        .context("the gRPC listener has no address")?;
    info!(grpc = %grpc_addr, metrics = %metrics_addr, version = env!("CARGO_PKG_VERSION"), "remocal-agent ready");

    let (stop_serving, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = grpc::server(auth)
        .add_service(grpc::service(sessions.clone()))
        .serve_with_incoming_shutdown(grpc::incoming(listener), async {
            let _ = stopped.await;
        });
    tokio::pin!(server);
    tokio::select! {
        served = &mut server => return served.context("the gRPC server failed"),
        () = terminated() => {}
    }
    // Sessions first: their long-lived calls would otherwise hold the
    // server's graceful shutdown open forever.
    info!("shutting down: ending all sessions");
    sessions.shutdown().await;
    let _ = stop_serving.send(());
    match tokio::time::timeout(SHUTDOWN_GRACE, server).await {
        Ok(served) => served.context("the gRPC server failed"),
        Err(_) => Ok(()),
    }
}

/// `kubernetes` wherever the agent can ask the API server; `none` only where
/// no one but the node's own users can call.
fn authentication(
    mode: Option<AuthMode>,
    pods: &PodLookup,
    listen: SocketAddr,
    metrics: Arc<Metrics>,
) -> anyhow::Result<Auth> {
    let client = pods.client();
    let mode = mode.unwrap_or(if client.is_some() {
        AuthMode::Kubernetes
    } else {
        AuthMode::None
    });
    match (mode, client) {
        (AuthMode::Kubernetes, Some(client)) => Ok(Auth::kubernetes(client, metrics)),
        (AuthMode::Kubernetes, None) => anyhow::bail!(
            "--auth kubernetes needs the Kubernetes API: run the agent in a cluster or give --kubeconfig"
        ),
        (AuthMode::None, _) if listen.ip().is_loopback() => {
            warn!(
                grpc = %listen,
                "--auth none: every caller may steal or mirror anything on this node; only use it on a machine of your own"
            );
            Ok(Auth::none(metrics))
        }
        (AuthMode::None, _) => anyhow::bail!(
            "--auth none is only allowed when --grpc-listen is a loopback address (it is {listen}): anyone who can reach it could steal any pod's traffic; use --auth kubernetes"
        ),
    }
}

async fn terminated() {
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    tokio::select! {
        _ = term.recv() => {},
        _ = int.recv() => {},
    }
}

/// Every stolen connection costs the agent a socket; the default soft limit
/// of 1024 would cap a session far below what a node handles.
fn raise_fd_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    if let Ok((_, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
    }
}

fn capture_buffer(value: &str) -> Result<u32, String> {
    let bytes: u32 = value
        .parse()
        .map_err(|_| format!("{value} is not a number of bytes"))?;
    if bytes < 4096 || !bytes.is_power_of_two() {
        return Err(format!(
            "{bytes} must be a power of two of at least 4096 (e.g. 16777216)"
        ));
    }
    Ok(bytes)
}
