//! The Kubernetes side of the client: which cluster (read like kubectl reads
//! it), which pod, which agent, and the port-forward that reaches it.
mod agents;
mod api_call;
mod pods;
mod port_forward;

use kube::{
    Client, Config,
    config::{KubeConfigOptions, Kubeconfig, KubeconfigError},
};

pub use agents::{AgentPod, agent_on_node, list_agents, no_agents};
pub use pods::{Workload, find_pod};
pub use port_forward::PortForward;

use crate::{
    cli::ClusterArgs,
    credentials::Credentials,
    exit::{Failure, Status},
};

/// A cluster connection plus what error messages need to name it.
#[derive(Clone)]
pub struct Cluster {
    pub client: Client,
    /// What the client was made from: its credential is also ours to the agent.
    pub config: Config,
    /// The kubeconfig context (or `in-cluster`), so errors say where we looked.
    pub context: String,
    /// The namespace for names given without `-n`.
    pub default_namespace: String,
}

impl Cluster {
    /// `--kubeconfig`, else KUBECONFIG, else ~/.kube/config; with no
    /// kubeconfig at all, the service account of the pod we run in.
    pub async fn connect(args: &ClusterArgs) -> Result<Self, Failure> {
        let kubeconfig = match &args.kubeconfig {
            Some(path) => Some(Kubeconfig::read_from(path).map_err(|err| {
                usage(format!(
                    "cannot read the kubeconfig {}: {err}",
                    path.display()
                ))
            })?),
            None => match Kubeconfig::read() {
                Ok(kubeconfig) => Some(kubeconfig),
                Err(KubeconfigError::FindPath) => None,
                Err(KubeconfigError::ReadConfig(err, _))
                    if err.kind() == std::io::ErrorKind::NotFound =>
                {
                    None
                }
                Err(err) => return Err(usage(format!("cannot read your kubeconfig: {err}"))),
            },
        };
        let (config, context) = match kubeconfig {
            Some(kubeconfig) => from_kubeconfig(kubeconfig, args.context.as_deref()).await?,
            None if args.context.is_some() => {
                return Err(usage(
                    "--context needs a kubeconfig, and none was found: set KUBECONFIG or pass --kubeconfig",
                ));
            }
            None => {
                let config = Config::incluster().map_err(|_| {
                    usage(
                        "no Kubernetes configuration found: set KUBECONFIG, pass --kubeconfig, or create ~/.kube/config (what kubectl uses)",
                    )
                })?;
                (config, "in-cluster".to_string())
            }
        };
        let default_namespace = args
            .namespace
            .clone()
            .unwrap_or_else(|| config.default_namespace.clone());
        let client = Client::try_from(config.clone()).map_err(|err| {
            Failure::unexpected(format!(
                "cannot set up a client for context {context}: {err}"
            ))
        })?;
        Ok(Self {
            client,
            config,
            context,
            default_namespace,
        })
    }

    /// Our credential to an agent: the kubeconfig user's.
    pub fn credentials(&self) -> Result<Credentials, Failure> {
        Credentials::from_config(&self.config, &self.context)
            .map_err(|message| Failure::new(Status::PermissionDenied, message))
    }
}

/// The credential of the cluster the flags name, when there is one: a
/// session on a namespace or process of a node may need it too, while an
/// agent running with `--auth none` needs none.
pub async fn credentials(args: &ClusterArgs) -> Result<Credentials, Failure> {
    match Cluster::connect(args).await {
        Ok(cluster) => cluster.credentials(),
        Err(failure) => Ok(Credentials::None {
            why: failure.message().to_string(),
        }),
    }
}

async fn from_kubeconfig(
    kubeconfig: Kubeconfig,
    context: Option<&str>,
) -> Result<(Config, String), Failure> {
    let context = match context.or(kubeconfig.current_context.as_deref()) {
        Some(context) => context.to_string(),
        None => {
            return Err(usage(
                "your kubeconfig has no current context: pass --context (see `kubectl config get-contexts`)",
            ));
        }
    };
    if !kubeconfig
        .contexts
        .iter()
        .any(|named| named.name == context)
    {
        let known: Vec<&str> = kubeconfig
            .contexts
            .iter()
            .map(|named| named.name.as_str())
            .collect();
        return Err(usage(format!(
            "context {context} is not in your kubeconfig (it has: {}); see `kubectl config get-contexts`",
            known.join(", ")
        )));
    }
    let options = KubeConfigOptions {
        context: Some(context.clone()),
        ..Default::default()
    };
    let config = Config::from_custom_kubeconfig(kubeconfig, &options)
        .await
        .map_err(|err| {
            usage(format!(
                "cannot use context {context} of your kubeconfig: {err}"
            ))
        })?;
    Ok((config, context))
}

fn usage(message: impl Into<String>) -> Failure {
    Failure::new(Status::Usage, message)
}
