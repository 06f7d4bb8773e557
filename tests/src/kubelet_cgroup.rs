//! A cgroup laid out the way kubelet's systemd driver lays out a BestEffort
//! pod's container, so that the agent's "which processes belong to pod UID"
//! lookup can be tested against a real kernel without kubelet:
//!
//! ```text
//! kubepods-remocal-test-<pid>-<n>.slice/kubepods-besteffort.slice/
//!     kubepods-besteffort-pod<UID, '-' as '_'>.slice/cri-containerd-<64 hex>.scope
//! ```
//!
//! The top slice is unique per guard (kubelet's is `kubepods.slice`), so tests can
//! run in parallel and a leak check can look for `kubepods*` directories.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::kube_api::container_id;

/// The cgroup of one pod's container; dropping it moves any process still in it
/// back to the root cgroup and removes every directory it created.
pub struct KubeletCgroup {
    root: PathBuf,
    /// Innermost last.
    dirs: Vec<PathBuf>,
    container_id: String,
}

impl KubeletCgroup {
    /// Panics (test setup) when there is no writable cgroup v2 hierarchy.
    pub fn create(uid: &str) -> KubeletCgroup {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let root = cgroup2_root().expect("a cgroup v2 hierarchy in /proc/self/mountinfo");
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let container_id = container_id(uid);
        let top = root.join(format!(
            "kubepods-remocal-test-{}-{n}.slice",
            std::process::id()
        ));
        let qos = top.join("kubepods-besteffort.slice");
        let pod = qos.join(format!(
            "kubepods-besteffort-pod{}.slice",
            uid.replace('-', "_")
        ));
        let container = pod.join(format!("cri-containerd-{container_id}.scope"));
        let mut cgroup = KubeletCgroup {
            root,
            dirs: Vec::new(),
            container_id,
        };
        // Recorded one by one so that a failure halfway still cleans up on drop.
        for dir in [top, qos, pod, container] {
            fs::create_dir(&dir)
                .unwrap_or_else(|e| panic!("create cgroup {} (run as root): {e}", dir.display()));
            cgroup.dirs.push(dir);
        }
        cgroup
    }

    /// Moves process `pid` (all its threads) into the container's cgroup.
    pub fn add(&self, pid: u32) {
        let procs = self.dir().join("cgroup.procs");
        fs::write(&procs, pid.to_string())
            .unwrap_or_else(|e| panic!("move pid {pid} into {}: {e}", procs.display()));
    }

    /// The container's cgroup directory.
    pub fn dir(&self) -> &Path {
        self.dirs.last().expect("create made the directories")
    }

    /// The path as `/proc/PID/cgroup` shows it (`0::<path>`), relative to the
    /// hierarchy's root.
    pub fn path(&self) -> String {
        let relative = self.dir().strip_prefix(&self.root).unwrap_or(self.dir());
        format!("/{}", relative.display())
    }

    /// The 64-hex container ID in the scope's name (the same as
    /// `kube_api::container_id(uid)`, which pods built by `kube_api` report).
    pub fn container_id(&self) -> &str {
        &self.container_id
    }
}

impl Drop for KubeletCgroup {
    fn drop(&mut self) {
        let root_procs = self.root.join("cgroup.procs");
        for dir in self.dirs.iter().rev() {
            // rmdir fails while a process is inside (or one is still leaving, or
            // was just forked into it): move them out and retry briefly.
            for _ in 0..200 {
                if let Ok(procs) = fs::read_to_string(dir.join("cgroup.procs")) {
                    for pid in procs.split_whitespace() {
                        let _ = fs::write(&root_procs, pid);
                    }
                }
                if fs::remove_dir(dir).is_ok() || !dir.exists() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            if dir.exists() {
                eprintln!("KubeletCgroup: could not remove {}", dir.display());
            }
        }
    }
}

/// Where the cgroup2 filesystem is mounted (`/sys/fs/cgroup` on a unified
/// system, `/sys/fs/cgroup/unified` on a hybrid one).
pub fn cgroup2_root() -> Option<PathBuf> {
    let mountinfo = fs::read_to_string("/proc/self/mountinfo").ok()?;
    mountinfo.lines().find_map(|line| {
        let (mount, fs_type) = line.split_once(" - ")?;
        if !fs_type.starts_with("cgroup2 ") {
            return None;
        }
        mount.split(' ').nth(4).map(PathBuf::from)
    })
}
