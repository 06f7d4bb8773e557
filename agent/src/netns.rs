//! Network namespaces as targets. The agent lives in the node's namespace; it
//! reaches into a target's namespace only on short-lived threads that call
//! setns(2), because a socket or tcx link created there stays bound to that
//! namespace after the thread is gone, and the rest of the process never moves.
use std::{
    fmt,
    fs::{File, OpenOptions},
    io,
    os::{
        fd::{AsFd, AsRawFd, BorrowedFd},
        unix::fs::{MetadataExt, OpenOptionsExt},
    },
    path::Path,
};

use nix::sched::{CloneFlags, setns};

use crate::kube::{PodNetnsError, ScheduledPod, find_pod_netns};

/// What a client asks for: the namespace file, or a process living in it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TargetSpec {
    Path(String),
    Pid(u32),
    PodUid(String),
    /// A pod the API confirmed is Running on this node.
    Pod(ScheduledPod),
}

impl fmt::Display for TargetSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TargetSpec::Path(path) => write!(f, "netns={path}"),
            TargetSpec::Pid(pid) => write!(f, "pid={pid}"),
            TargetSpec::PodUid(uid) => write!(f, "pod-uid={uid}"),
            TargetSpec::Pod(pod) => pod.fmt(f),
        }
    }
}

/// Identity of a namespace: two paths naming the same namespace (a bind mount
/// under /var/run/netns and /proc/PID/ns/net) give the same id.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct NsId {
    dev: u64,
    ino: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum TargetError {
    #[error(
        "network namespace {0} does not exist: check the path (`ip netns list` shows named namespaces)"
    )]
    NoSuchNamespace(String),
    #[error("no process with PID {0} (it may have exited): check the PID on the node")]
    NoSuchProcess(u32),
    #[error("{0} is not a network namespace: pass /var/run/netns/NAME or /proc/PID/ns/net")]
    NotANamespace(String),
    #[error(
        "{0:?} is not a namespace path remocal accepts: pass /var/run/netns/NAME (a plain name) or /proc/PID/ns/net"
    )]
    UnsupportedPath(String),
    #[error("opening {0} took too long; check the node")]
    Timeout(String),
    #[error(
        "{0} is the agent's own (the node's) network namespace: stealing there would take the node's port, so target a pod's namespace instead"
    )]
    HostNamespace(String),
    #[error("the agent may not open {what}: {source}; run remocal-agent as root")]
    PermissionDenied { what: String, source: io::Error },
    #[error("cannot open {what}: {source}")]
    Io { what: String, source: io::Error },
    #[error(transparent)]
    Pod(#[from] PodNetnsError),
}

/// An open handle on a target namespace; holding it keeps the namespace alive.
pub struct Netns {
    file: File,
    id: NsId,
    spec: TargetSpec,
}

impl Netns {
    pub fn open(spec: &TargetSpec) -> Result<Self, TargetError> {
        let path = match spec {
            TargetSpec::Path(path) => accepted_path(path)?,
            TargetSpec::Pid(pid) => format!("/proc/{pid}/ns/net"),
            TargetSpec::PodUid(uid) => {
                find_pod_netns(Path::new("/proc"), uid, Path::new(OWN_NAMESPACE))?
                    .to_string_lossy()
                    .into_owned()
            }
            TargetSpec::Pod(pod) => {
                find_pod_netns(Path::new("/proc"), &pod.uid, Path::new(OWN_NAMESPACE))
                    .map_err(|err| err.naming(format!("{}/{}", pod.namespace, pod.name)))?
                    .to_string_lossy()
                    .into_owned()
            }
        };
        // Non-blocking, and no symbolic link at the end of a named
        // namespace's path: nothing a caller names can make this open wait
        // (a FIFO would) or lead elsewhere.
        let no_follow = if path.starts_with(NAMED_NAMESPACES) {
            libc::O_NOFOLLOW
        } else {
            0
        };
        let file = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC | no_follow)
            .open(&path)
            .map_err(|source| match source.kind() {
                io::ErrorKind::NotFound => match spec {
                    TargetSpec::Path(path) => TargetError::NoSuchNamespace(path.clone()),
                    TargetSpec::Pid(pid) => TargetError::NoSuchProcess(*pid),
                    TargetSpec::PodUid(uid) => PodNetnsError::NotOnThisNode(uid.clone()).into(),
                    TargetSpec::Pod(pod) => {
                        PodNetnsError::NotOnThisNode(format!("{}/{}", pod.namespace, pod.name))
                            .into()
                    }
                },
                io::ErrorKind::PermissionDenied => TargetError::PermissionDenied {
                    what: path.clone(),
                    source,
                },
                _ => TargetError::Io {
                    what: path.clone(),
                    source,
                },
            })?;
        if !is_network_namespace(&file) {
            return Err(TargetError::NotANamespace(path));
        }
        let id = ns_id(&file).map_err(|source| TargetError::Io {
            what: path.clone(),
            source,
        })?;
        if Some(id) == own_namespace() {
            return Err(TargetError::HostNamespace(spec.to_string()));
        }
        Ok(Self {
            file,
            id,
            spec: spec.clone(),
        })
    }

    pub fn id(&self) -> NsId {
        self.id
    }

    /// A second handle on the same namespace, for what outlives the first
    /// (a port shared by several sessions).
    pub fn try_clone(&self) -> io::Result<Self> {
        Ok(Self {
            file: self.file.try_clone()?,
            id: self.id,
            spec: self.spec.clone(),
        })
    }

    /// Runs `work` on a thread that has entered this namespace.
    pub fn run_in<T: Send>(&self, work: impl FnOnce() -> T + Send) -> io::Result<T> {
        std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    setns(&self.file, CloneFlags::CLONE_NEWNET).map_err(io::Error::from)?;
                    Ok(work())
                })
                .join()
                .unwrap_or_else(|_| Err(io::Error::other("namespace worker thread panicked")))
        })
    }
}

impl AsFd for Netns {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }
}

impl fmt::Display for Netns {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.spec.fmt(f)
    }
}

fn ns_id(file: &File) -> io::Result<NsId> {
    let meta = file.metadata()?;
    Ok(NsId {
        dev: meta.dev(),
        ino: meta.ino(),
    })
}

const OWN_NAMESPACE: &str = "/proc/thread-self/ns/net";
const NAMED_NAMESPACES: &str = "/var/run/netns/";

/// The two shapes of namespace path a client may name; anything else (other
/// files, `..`, /proc/1/root/...) is refused before the file system is
/// touched, so a refusal says nothing about what exists on the node.
fn accepted_path(path: &str) -> Result<String, TargetError> {
    let unsupported = || TargetError::UnsupportedPath(path.chars().take(256).collect());
    if let Some(name) = path.strip_prefix(NAMED_NAMESPACES) {
        let plain = !name.is_empty()
            && name.len() <= 255
            && name != "."
            && name != ".."
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
        return if plain {
            Ok(path.to_string())
        } else {
            Err(unsupported())
        };
    }
    let pid = path
        .strip_prefix("/proc/")
        .and_then(|rest| rest.strip_suffix("/ns/net"))
        .filter(|pid| !pid.is_empty() && pid.len() <= 10 && pid.bytes().all(|b| b.is_ascii_digit()))
        .ok_or_else(unsupported)?;
    Ok(format!("/proc/{pid}/ns/net"))
}

fn own_namespace() -> Option<NsId> {
    File::open(Path::new(OWN_NAMESPACE))
        .and_then(|file| ns_id(&file))
        .ok()
}

/// Asks nsfs what kind of namespace this is, so a wrong file is refused with a
/// clear message instead of failing later inside setns.
fn is_network_namespace(file: &File) -> bool {
    const NS_GET_NSTYPE: libc::c_ulong = 0xb703;
    // SAFETY: NS_GET_NSTYPE takes no argument and only reads the fd.
    let kind = unsafe { libc::ioctl(file.as_raw_fd(), NS_GET_NSTYPE as _) };
    kind == libc::CLONE_NEWNET
}

#[cfg(test)]
pub mod throwaway;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_targets_are_named() {
        let err = Netns::open(&TargetSpec::Path("/var/run/netns/surely-absent".into()))
            .err()
            .unwrap();
        assert!(
            err.to_string()
                .contains("/var/run/netns/surely-absent does not exist")
        );
        let err = Netns::open(&TargetSpec::Pid(u32::MAX - 1)).err().unwrap();
        assert!(err.to_string().contains(&format!("PID {}", u32::MAX - 1)));
    }

    #[test]
    fn only_the_two_namespace_path_shapes_are_accepted() {
        for accepted in ["/var/run/netns/pod-a_1.x", "/proc/42/ns/net"] {
            assert_eq!(accepted_path(accepted).unwrap(), accepted);
        }
        for refused in [
            "/proc/1/root/etc/shadow",
            "/proc/self/ns/net",
            "/proc/1/ns/../root/x",
            "/var/run/netns/../../etc/passwd",
            "/var/run/netns/a/b",
            "/var/run/netns/..",
            "/var/run/netns/",
            "/tmp/fifo",
            "var/run/netns/x",
            "/proc/12345678901/ns/net",
        ] {
            let err = Netns::open(&TargetSpec::Path(refused.into()))
                .err()
                .unwrap();
            assert!(
                matches!(err, TargetError::UnsupportedPath(_)),
                "{refused}: {err}"
            );
        }
    }

    #[test]
    fn own_namespace_and_non_namespaces_are_refused() {
        let own = TargetSpec::Pid(std::process::id());
        assert!(matches!(
            Netns::open(&own),
            Err(TargetError::HostNamespace(_))
        ));
        let file = TargetSpec::Path("/proc/self/status".into());
        assert!(matches!(
            Netns::open(&file),
            Err(TargetError::UnsupportedPath(_))
        ));
    }
}
