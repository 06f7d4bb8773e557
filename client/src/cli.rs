//! Command line. Errors come out as one line each, so scripts and people both
//! get what is wrong without scrolling past usage text.
use std::{ffi::OsString, path::PathBuf, sync::OnceLock};

use clap::{Args, CommandFactory as _, FromArgMatches as _, Parser, Subcommand, error::ErrorKind};

use crate::exit::{Failure, Status};

#[derive(Parser)]
#[command(
    name = "remocal",
    version,
    about = "Receive a pod's real traffic in the process on your machine",
    long_about = "remocal redirects TCP connections addressed to a port of a pod (a network namespace on a node) \
                  to a process on your machine, through the remocal agent running on that node."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Take over new connections to a port of the target: they reach your
    /// local process instead of the pod's until you stop (Ctrl-C).
    ///
    /// With --header, --path or --method the steal is filtered: only the HTTP
    /// requests (HTTP/1.x, h2c, gRPC) matching all of them reach your
    /// process, the pod serves every other request, and colleagues may steal
    /// the same port with other filters. A request matching several sessions
    /// goes to the one started first. Patterns are regular expressions (Rust
    /// `regex` syntax) matching anywhere in the text unless anchored with ^
    /// or $.
    Steal(StealArgs),
    /// Get a read-only copy of every new connection to a port of the target:
    /// the pod keeps serving them; your local process receives what the
    /// remote clients send, and its answers are discarded.
    Mirror(SessionArgs),
    /// List the remocal agents of the cluster, one per node, with their health
    /// and version. Exits with 3 when an agent is not healthy.
    Agents(AgentsArgs),
    /// List who intercepts what: the sessions on every agent of the cluster
    /// (or on --agent), with target, port, mode, filter, user, age and
    /// connections served.
    ///
    /// You see your own sessions, those on pods you may `get`, and those on
    /// namespaces or processes of a node only as its admin (with -A, a line
    /// says how many more there are). Sessions on a node's namespace or
    /// process belong to no namespace and are listed whatever -n says.
    /// Exits with 3 when an agent did not answer.
    Sessions(SessionsArgs),
    /// Print a shell completion script: `remocal completions bash >
    /// /etc/bash_completion.d/remocal`, or `source <(remocal completions
    /// zsh)` in ~/.zshrc, or `remocal completions fish >
    /// ~/.config/fish/completions/remocal.fish`.
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

#[derive(Args)]
pub struct AgentsArgs {
    #[command(flatten)]
    pub cluster: ClusterArgs,
    /// Output format of stdout lines.
    #[arg(long, value_enum, default_value_t = OutputFormat::Text)]
    pub output: OutputFormat,
}

#[derive(Args)]
pub struct SessionsArgs {
    #[command(flatten)]
    pub cluster: ClusterArgs,
    /// Sessions on pods of every namespace.
    #[arg(short = 'A', long, conflicts_with = "namespace")]
    pub all_namespaces: bool,
    /// URL of one agent's gRPC endpoint to ask, instead of every agent of
    /// the cluster through the port-forward API.
    #[arg(long, env = "REMOCAL_AGENT")]
    pub agent: Option<String>,
    /// Output format of stdout lines.
    #[arg(long, value_enum, default_value_t = OutputFormat::Text)]
    pub output: OutputFormat,
}

#[derive(Args)]
pub struct StealArgs {
    #[command(flatten)]
    pub session: SessionArgs,
    #[command(flatten)]
    pub filter: FilterArgs,
    #[command(flatten)]
    pub reset: ResetArgs,
}

/// Taking over clients already connected to the pod. Not on `mirror`: a
/// mirror is read-only and never ends anything.
#[derive(Args, Default)]
#[command(next_help_heading = "Clients already connected")]
pub struct ResetArgs {
    /// End the pod's existing connections to the port while they are idle,
    /// so that their clients (keep-alive pools, proxies, gRPC channels)
    /// reconnect into the steal. Without it they keep going to the pod, and
    /// remocal says how many.
    ///
    /// A connection is ended only between requests: nothing unread or
    /// undelivered, the pod answered last, and no traffic for 20 ms (TCP
    /// shows the last request, not several in flight on one HTTP/2 or
    /// pipelined connection). A busy one is retried until --reset-deadline,
    /// then left alone. Its client sees a reset and reconnects, as it does
    /// when a server restarts.
    #[arg(long)]
    pub reset_existing: bool,
    /// How long busy connections are retried before they are left to the
    /// pod, in seconds (at most 120) [default: 10]. Only with
    /// --reset-existing.
    #[arg(
        long,
        value_name = "SECONDS",
        value_parser = clap::value_parser!(u32).range(1..=120)
    )]
    pub reset_deadline: Option<u32>,
}

/// Which HTTP requests a filtered steal takes. Not on `mirror`: a mirror is
/// a copy of whole connections, never of some requests.
#[derive(Args, Default)]
#[command(next_help_heading = "Filtered steal (HTTP requests only)")]
pub struct FilterArgs {
    /// Only requests with header NAME (any case) whose value matches REGEX;
    /// repeatable, all must match. E.g. --header 'x-dev: alice'.
    ///
    /// Split at the first ':'. REGEX matches anywhere in the value unless
    /// anchored ('x-dev: ^alice$'); for a header sent several times, one
    /// matching value is enough.
    #[arg(long = "header", value_name = "NAME: REGEX")]
    pub headers: Vec<String>,
    /// Only requests whose path and query (/a/b?c=d) match REGEX, e.g. '^/api/'.
    ///
    /// REGEX matches anywhere unless anchored: 'api' matches /v1/api and
    /// /?q=api, '^/api/' only paths under /api/.
    #[arg(long, value_name = "REGEX")]
    pub path: Option<String>,
    /// Only requests with this method (GET, POST...; any case).
    #[arg(long, value_name = "METHOD")]
    pub method: Option<String>,
}

#[derive(Args)]
pub struct SessionArgs {
    #[command(flatten)]
    pub target: TargetArgs,
    /// The target's TCP port whose new connections are stolen or mirrored.
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..))]
    pub port: u16,
    #[command(flatten)]
    pub local: LocalArgs,
    #[command(flatten)]
    pub cluster: ClusterArgs,
    #[command(flatten)]
    pub link: LinkArgs,
    /// With a COMMAND: how long it may take to listen on --local-host and
    /// --local-port, in seconds.
    #[arg(
        long,
        value_name = "SECONDS",
        default_value_t = 30,
        value_parser = clap::value_parser!(u64).range(1..=3600)
    )]
    pub listen_timeout: u64,
    /// Your local process, started by remocal (after `--`): the session
    /// opens once it listens on --local-host:--local-port, Ctrl-C ends the
    /// session and then the command, and the command's exit ends the
    /// session (remocal exits with its status). It finds REMOCAL_TARGET,
    /// REMOCAL_PORT and REMOCAL_MODE in its environment.
    #[arg(last = true, value_name = "COMMAND")]
    pub command: Vec<std::ffi::OsString>,
}

/// Where the traffic comes from: a pod, or a network namespace on the
/// agent's node.
#[derive(Args)]
#[group(required = true, multiple = false)]
pub struct TargetArgs {
    /// `pod/NAME`, `deploy/NAME` (one ready pod of the deployment) or a pod's NAME.
    #[arg(value_name = "TARGET")]
    pub resource: Option<String>,
    /// A pod by name (the same as `pod/NAME`).
    #[arg(long, value_name = "NAME")]
    pub pod: Option<String>,
    /// Network namespace file on the node: /var/run/netns/NAME or /proc/PID/ns/net.
    #[arg(long, value_name = "PATH")]
    pub netns: Option<String>,
    /// A process on the node whose network namespace is the target.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    pub pid: Option<u32>,
}

/// Where the traffic goes: your local process.
#[derive(Args)]
pub struct LocalArgs {
    /// Local port your process listens on [default: the same as --port].
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..))]
    pub local_port: Option<u16>,
    /// Local host your process listens on.
    #[arg(long, default_value = "127.0.0.1")]
    pub local_host: String,
}

/// Which cluster, like kubectl: KUBECONFIG or ~/.kube/config and its current
/// context, or the pod's service account inside a cluster.
#[derive(Args)]
pub struct ClusterArgs {
    /// Namespace of the pod or deployment [default: the context's, else `default`].
    #[arg(short = 'n', long)]
    pub namespace: Option<String>,
    /// Kubeconfig context to use [default: the current context].
    #[arg(long)]
    pub context: Option<String>,
    /// Kubeconfig file [default: $KUBECONFIG, else ~/.kube/config].
    #[arg(long, value_name = "PATH")]
    pub kubeconfig: Option<PathBuf>,
    /// Namespace the remocal agents run in.
    #[arg(long, default_value = "remocal")]
    pub agent_namespace: String,
}

/// How to reach the agent and what to print.
#[derive(Args)]
pub struct LinkArgs {
    /// URL of the remocal agent's gRPC endpoint [default: for a pod, the agent
    /// on the pod's node through the Kubernetes port-forward API; otherwise
    /// http://127.0.0.1:7420].
    #[arg(long, env = "REMOCAL_AGENT")]
    pub agent: Option<String>,
    /// Print a line per stolen connection, and one when it closes.
    #[arg(short, long)]
    pub verbose: bool,
    /// Output format of stdout lines.
    #[arg(long, value_enum, default_value_t = OutputFormat::Text)]
    pub output: OutputFormat,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum OutputFormat {
    Text,
    Json,
}

/// How the user runs remocal: `remocal`, or `kubectl remocal` when it is
/// installed as the kubectl plugin `kubectl-remocal`. Help, usage and
/// errors name it that way.
pub fn program() -> &'static str {
    PROGRAM.get().map_or("remocal", String::as_str)
}

static PROGRAM: OnceLock<String> = OnceLock::new();

/// The name for an executable file called `file`: kubectl runs plugins as
/// `kubectl-NAME` (dashes in NAME stand for spaces, underscores for dashes).
fn program_for(file: &str) -> String {
    match file.strip_prefix("kubectl-") {
        Some(plugin) => format!("kubectl {}", plugin.replace('-', " ").replace('_', "-")),
        None => "remocal".into(),
    }
}

pub fn parse() -> Result<Cli, Failure> {
    parse_from(std::env::args_os())
}

fn parse_from(args: impl IntoIterator<Item = impl Into<OsString> + Clone>) -> Result<Cli, Failure> {
    let args: Vec<OsString> = args.into_iter().map(Into::into).collect();
    let file = args
        .first()
        .and_then(|arg0| std::path::Path::new(arg0).file_name())
        .map(|name| name.to_string_lossy().into_owned())
        .unwrap_or_default();
    let program = PROGRAM.get_or_init(|| program_for(&file));
    let command = Cli::command()
        .bin_name(program.as_str())
        .name(program.as_str());
    command
        .try_get_matches_from(args)
        .and_then(|matches| Cli::from_arg_matches(&matches))
        .map_err(usage_failure)
}

/// Writes the completion script for `shell`.
pub fn completions(shell: clap_complete::Shell) {
    let mut command = Cli::command();
    clap_complete::generate(shell, &mut command, program(), &mut std::io::stdout());
}

fn usage_failure(err: clap::Error) -> Failure {
    if let Some(flag) = steal_only_flag(&err) {
        let why = if flag.starts_with("--reset") {
            "it ends the pod's connections, and a mirror is read-only"
        } else {
            "it picks the HTTP requests a steal takes (a mirror copies whole connections)"
        };
        return Failure::new(
            Status::Usage,
            format!(
                "{flag} is for `{} steal` only: {why}; drop {flag}",
                program()
            ),
        );
    }
    match err.kind() {
        ErrorKind::DisplayHelp
        | ErrorKind::DisplayVersion
        | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
            let _ = err.print();
            Failure::new(
                if err.use_stderr() {
                    Status::Usage
                } else {
                    Status::Ok
                },
                String::new(),
            )
        }
        _ => {
            // clap lists missing arguments on the lines after the first:
            // keep them, drop the usage text.
            let rendered = err.to_string();
            let summary: Vec<&str> = rendered
                .lines()
                .take_while(|line| !line.starts_with("Usage:"))
                .map(str::trim)
                .filter(|line| !line.is_empty() && !line.starts_with("For more information"))
                .collect();
            let summary = summary.join(" ");
            let summary = summary.strip_prefix("error: ").unwrap_or(&summary);
            Failure::new(
                Status::Usage,
                format!("{summary} (see `{} --help`)", program()),
            )
        }
    }
}

/// The flag clap did not expect that only `steal` has.
fn steal_only_flag(err: &clap::Error) -> Option<&'static str> {
    use clap::error::{ContextKind, ContextValue};
    if err.kind() != ErrorKind::UnknownArgument {
        return None;
    }
    let Some(ContextValue::String(arg)) = err.get(ContextKind::InvalidArg) else {
        return None;
    };
    let name = arg.split_once('=').map_or(arg.as_str(), |(name, _)| name);
    [
        "--header",
        "--path",
        "--method",
        "--reset-existing",
        "--reset-deadline",
    ]
    .into_iter()
    .find(|flag| *flag == name)
}

#[cfg(test)]
mod tests;
