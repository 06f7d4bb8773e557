//! The remocal agents running on this node, found through /proc (the agent
//! runs with hostPID). Two agents share a node during a DaemonSet update
//! with surge, and in the end-to-end tests: neither may take the other's
//! kernel state or sockets for a pod's.
use std::{collections::HashSet, fs};

const PROC: &str = "/proc";
/// The agent's process name as the kernel keeps it (`comm`).
const AGENT_COMM: &str = "remocal-agent";

/// PIDs of the other live agent processes.
pub fn others() -> Vec<u32> {
    let me = std::process::id();
    fs::read_dir(PROC)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| *pid != me)
        .filter(|pid| {
            fs::read_to_string(format!("{PROC}/{pid}/comm"))
                .is_ok_and(|comm| comm.trim_end() == AGENT_COMM)
        })
        .collect()
}

/// The inodes of the sockets a process holds (`socket:[N]` links in its fd
/// table); empty for a process that is gone.
pub fn socket_inodes(pid: u32) -> HashSet<u32> {
    fs::read_dir(format!("{PROC}/{pid}/fd"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|fd| {
            let target = fs::read_link(fd.path()).ok()?;
            target
                .to_str()?
                .strip_prefix("socket:[")?
                .strip_suffix(']')?
                .parse()
                .ok()
        })
        .collect()
}

/// Where an agent process's threads are: its tasks' directories.
pub fn tasks(pid: u32) -> impl Iterator<Item = std::path::PathBuf> {
    fs::read_dir(format!("{PROC}/{pid}/task"))
        .into_iter()
        .flatten()
        .flatten()
        .map(|task| task.path())
}
