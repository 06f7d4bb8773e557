//! Finds a pod's network namespace from its UID without a container runtime:
//! every process of a pod lives in a cgroup whose path carries the pod UID,
//! in one of the layouts kubelet writes (cgroupfs or systemd driver, cgroup
//! v1 or v2; the systemd driver writes the UID with `_` instead of `-`).
use std::{
    fs,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PodNetnsError {
    #[error(
        "no process of pod {0} runs on this node: check that the pod is Running and scheduled on this node"
    )]
    NotOnThisNode(String),
    #[error(
        "pod {0} uses the node's network (hostNetwork): stealing its port would take the node's; refusing"
    )]
    HostNetwork(String),
}

impl PodNetnsError {
    /// The same error about the pod as the user named it rather than by UID.
    pub fn naming(self, pod: String) -> Self {
        match self {
            Self::NotOnThisNode(_) => Self::NotOnThisNode(pod),
            Self::HostNetwork(_) => Self::HostNetwork(pod),
        }
    }
}

/// The namespace file of a process of the pod whose namespace is not the
/// node's (`host_netns` is the node's namespace file, normally
/// /proc/self/ns/net of the agent).
pub fn find_pod_netns(
    proc_root: &Path,
    uid: &str,
    host_netns: &Path,
) -> Result<PathBuf, PodNetnsError> {
    let host = fs::metadata(host_netns)
        .map(|meta| (meta.dev(), meta.ino()))
        .ok();
    let mut found_in_host = false;
    let entries =
        fs::read_dir(proc_root).map_err(|_| PodNetnsError::NotOnThisNode(uid.to_string()))?;
    for entry in entries.flatten() {
        let name = entry.file_name();
        if !name.to_string_lossy().bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let Ok(cgroups) = fs::read_to_string(entry.path().join("cgroup")) else {
            continue;
        };
        if !cgroups.lines().any(|line| belongs_to_pod(line, uid)) {
            continue;
        }
        let netns = entry.path().join("ns/net");
        match fs::metadata(&netns).map(|meta| (meta.dev(), meta.ino())) {
            Ok(id) if Some(id) != host => return Ok(netns),
            Ok(_) => found_in_host = true,
            Err(_) => continue, // the process just exited
        }
    }
    Err(if found_in_host {
        PodNetnsError::HostNetwork(uid.to_string())
    } else {
        PodNetnsError::NotOnThisNode(uid.to_string())
    })
}

/// Whether one line of /proc/PID/cgroup ("hierarchy:controllers:path")
/// puts the process in the pod's cgroup.
fn belongs_to_pod(line: &str, uid: &str) -> bool {
    let Some(path) = line.splitn(3, ':').nth(2) else {
        return false;
    };
    let dashed = format!("pod{uid}");
    let underscored = format!("pod{}.slice", uid.replace('-', "_"));
    path.split('/').any(|component| {
        component == dashed
            || component.ends_with(&format!("-{underscored}"))
            || component == underscored
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const UID: &str = "5c1e4c8a-2f5e-4b8e-9d3a-0a1b2c3d4e5f";

    #[test]
    fn every_kubelet_layout_is_recognized() {
        let lines = [
            // cgroupfs driver, cgroup v1 and v2
            "12:memory:/kubepods/burstable/pod5c1e4c8a-2f5e-4b8e-9d3a-0a1b2c3d4e5f/0123abcd",
            "0::/kubepods/besteffort/pod5c1e4c8a-2f5e-4b8e-9d3a-0a1b2c3d4e5f/0123abcd",
            "0::/kubepods/pod5c1e4c8a-2f5e-4b8e-9d3a-0a1b2c3d4e5f/0123abcd",
            // systemd driver (UID with underscores), v2 and v1, and the Guaranteed class
            "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod5c1e4c8a_2f5e_4b8e_9d3a_0a1b2c3d4e5f.slice/cri-containerd-0123.scope",
            "4:pids:/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod5c1e4c8a_2f5e_4b8e_9d3a_0a1b2c3d4e5f.slice/docker-0123.scope",
            "0::/kubepods.slice/kubepods-pod5c1e4c8a_2f5e_4b8e_9d3a_0a1b2c3d4e5f.slice/crio-0123.scope",
        ];
        for line in lines {
            assert!(belongs_to_pod(line, UID), "{line}");
        }
    }

    #[test]
    fn other_pods_and_processes_are_not_matched() {
        for line in [
            "0::/kubepods/burstable/pod5c1e4c8a-2f5e-4b8e-9d3a-0a1b2c3d4e50/0123",
            "0::/kubepods.slice/kubepods-pod5c1e4c8a_2f5e_4b8e_9d3a_0a1b2c3d4e50.slice/x.scope",
            "0::/system.slice/kubelet.service",
            "0::/",
            "garbage",
        ] {
            assert!(!belongs_to_pod(line, UID), "{line}");
        }
    }

    /// A real cgroup named the way kubelet's systemd driver names it, holding
    /// a process inside a network namespace of its own.
    #[test]
    fn a_process_in_a_kubelet_named_cgroup_gives_the_pods_namespace() {
        let root = cgroup2_root().expect("a cgroup v2 hierarchy (remocal needs one)");
        let uid = format!(
            "{:08x}-0000-4000-8000-{:012x}",
            std::process::id(),
            0xabcdef
        );
        let slice = root.join(format!("kubepods-test-{}.slice", std::process::id()));
        let pod = slice.join(format!(
            "kubepods-besteffort-pod{}.slice",
            uid.replace('-', "_")
        ));
        let container = pod.join("cri-containerd-test.scope");
        let _cgroups = Cgroups(vec![container.clone(), pod.clone(), slice.clone()]);
        fs::create_dir_all(&container).unwrap();
        let mut child = std::process::Command::new("unshare")
            .args(["--net", "sleep", "60"])
            .spawn()
            .expect("unshare (run the tests as root)");
        let _child = Kill(&mut child);
        let pid = _child.0.id();
        fs::write(container.join("cgroup.procs"), pid.to_string()).unwrap();
        let own = fs::read_link("/proc/self/ns/net").unwrap();
        while fs::read_link(format!("/proc/{pid}/ns/net")).map_or(true, |link| link == own) {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }

        let found =
            find_pod_netns(Path::new("/proc"), &uid, Path::new("/proc/self/ns/net")).unwrap();
        assert_eq!(
            fs::read_link(&found).unwrap(),
            fs::read_link(format!("/proc/{pid}/ns/net")).unwrap()
        );
        assert_eq!(
            find_pod_netns(Path::new("/proc"), &uid, &found),
            Err(PodNetnsError::HostNetwork(uid.clone())),
            "a pod in the node's namespace is refused"
        );
        let absent = "00000000-0000-4000-8000-000000000000";
        assert_eq!(
            find_pod_netns(Path::new("/proc"), absent, Path::new("/proc/self/ns/net")),
            Err(PodNetnsError::NotOnThisNode(absent.to_string()))
        );
    }

    fn cgroup2_root() -> Option<PathBuf> {
        let mountinfo = fs::read_to_string("/proc/self/mountinfo").ok()?;
        mountinfo.lines().find_map(|line| {
            let (mount, fs) = line.split_once(" - ")?;
            fs.starts_with("cgroup2 ")
                .then(|| mount.split(' ').nth(4).map(PathBuf::from))?
        })
    }

    /// Removes the test's cgroups (innermost first) even when the test fails.
    struct Cgroups(Vec<PathBuf>);

    impl Drop for Cgroups {
        fn drop(&mut self) {
            for cgroup in &self.0 {
                // A cgroup can only go once its processes have left.
                for _ in 0..100 {
                    if fs::remove_dir(cgroup).is_ok() || !cgroup.exists() {
                        break;
                    }
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
            }
        }
    }

    struct Kill<'a>(&'a mut std::process::Child);

    impl Drop for Kill<'_> {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}
