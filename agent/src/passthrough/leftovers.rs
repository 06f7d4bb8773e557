//! Removing what a killed agent left in pods' namespaces: rules and routes
//! tagged with remocal's protocol. They are inert (see the module above), so
//! this is tidiness, and nothing here may stop the agent from starting.
use std::{
    collections::{HashMap, HashSet},
    fs,
    os::unix::fs::OpenOptionsExt as _,
    path::PathBuf,
    time::Instant,
};

use nix::sched::{CloneFlags, setns};
use tracing::{debug, warn};

use super::{
    maker,
    registry::{self, NsKey},
    rules,
};
use crate::{
    agent_processes,
    netlink::{Netlink, NetlinkError},
};

/// Where namespaces are found: every process's (the agent runs with
/// hostPID) and those `ip netns` and CNI plugins keep as bind mounts.
const PROC: &str = "/proc";
const NAMED: &str = "/var/run/netns";

/// Removes what an earlier agent left in the node's namespaces (it was
/// killed before it could): returns how many namespaces had something
/// removed. Never fails: a namespace that cannot be cleaned is logged and
/// skipped. Namespaces where this agent has a `Passthrough` open are left
/// alone; another agent process on the same node (one per node is the
/// rule) would lose its rules.
///
/// Cost: one stat per process and named namespace, then per distinct
/// namespace a setns and four netlink dumps on one thread: 12 to 22 ms for
/// 300 namespaces (75 with leftovers) on the loaded 2-core test VM.
pub fn clean_leftovers() -> usize {
    let started = Instant::now();
    let own = nix::sys::stat::stat("/proc/thread-self/ns/net")
        .ok()
        .map(|stat| (stat.st_dev, stat.st_ino));
    let in_use = held_by_other_agents();
    let mut candidates = candidates(own);
    candidates.retain(|(key, _)| !in_use.contains_key(key));
    let found = candidates.len();
    // setns(2) moves the calling thread; a thread of its own does it, so no
    // caller is ever left in a pod's namespace.
    let cleaned = std::thread::Builder::new()
        .name("remocal-clean".into())
        .spawn(move || clean_all(candidates, own))
        .map(|worker| worker.join());
    let cleaned = match cleaned {
        Ok(Ok(cleaned)) => cleaned,
        Ok(Err(_)) => {
            warn!("the pass-through leftover cleaner panicked; leftovers stay (they are inert)");
            0
        }
        Err(err) => {
            warn!(error = %err, "cannot start the pass-through leftover cleaner; leftovers stay (they are inert)");
            0
        }
    };
    debug!(
        namespaces = found,
        cleaned,
        elapsed_ms = started.elapsed().as_millis() as u64,
        "looked for pass-through leftovers"
    );
    cleaned
}

/// The ports another live agent process of the node passes through in
/// namespace `ns`: rules and the route it still needs there.
pub fn ports_of_other_agents(ns: NsKey) -> HashSet<u16> {
    held_by_other_agents().remove(&ns).unwrap_or_default()
}

/// Namespaces where another live agent process has pass-through sockets,
/// with their ports: its socket makers (threads named `remocal-pt<PORT>`)
/// sit in them, so their rules are in use, not left over. Two agents share
/// a node during a DaemonSet update with surge, and in the end-to-end tests.
fn held_by_other_agents() -> HashMap<NsKey, HashSet<u16>> {
    let mut held: HashMap<NsKey, HashSet<u16>> = HashMap::new();
    for task in agent_processes::others()
        .into_iter()
        .flat_map(agent_processes::tasks)
    {
        let port = fs::read_to_string(task.join("comm")).ok().and_then(|comm| {
            comm.trim_end()
                .strip_prefix(maker::THREAD_PREFIX)?
                .parse::<u16>()
                .ok()
        });
        if let Some(port) = port
            && let Ok(stat) = nix::sys::stat::stat(&task.join("ns/net"))
        {
            held.entry((stat.st_dev, stat.st_ino))
                .or_default()
                .insert(port);
        }
    }
    held
}

/// Every network namespace on the node once, by identity, except `own`.
fn candidates(own: Option<NsKey>) -> Vec<(NsKey, PathBuf)> {
    let procs = fs::read_dir(PROC)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let name = entry.file_name();
            let pid = name.to_str()?;
            pid.bytes()
                .all(|b| b.is_ascii_digit())
                .then(|| PathBuf::from(format!("{PROC}/{pid}/ns/net")))
        });
    let named = fs::read_dir(NAMED)
        .into_iter()
        .flatten()
        .flatten()
        .map(|entry| entry.path());
    let mut unique = HashMap::new();
    for path in named.chain(procs) {
        // stat follows the nsfs link without opening anything; processes
        // that exit meanwhile are simply skipped.
        let Ok(stat) = nix::sys::stat::stat(&path) else {
            continue;
        };
        // A namespace file is a regular file of nsfs. Anything else under
        // /var/run/netns (a FIFO would block its open until a writer came)
        // is no namespace.
        if stat.st_mode & libc::S_IFMT != libc::S_IFREG {
            continue;
        }
        let key = (stat.st_dev, stat.st_ino);
        if Some(key) != own {
            unique.entry(key).or_insert(path);
        }
    }
    unique.into_iter().collect()
}

fn clean_all(candidates: Vec<(NsKey, PathBuf)>, own: Option<NsKey>) -> usize {
    let mut cleaned = 0;
    for (key, path) in candidates {
        // The path may now name another namespace (a reused PID): what is
        // opened is what is checked.
        // The file may have been replaced since the stat: nothing that
        // blocks, follows a link or takes a terminal.
        let Ok(file) = fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_NOFOLLOW | libc::O_NOCTTY)
            .open(&path)
        else {
            continue;
        };
        match registry::ns_key(&file) {
            Ok(opened) if opened == key && Some(opened) != own => {}
            _ => continue,
        }
        // Held while cleaning: a Passthrough opening in this namespace now
        // waits, and one already open keeps its rules.
        let mut open = registry::lock();
        if open.has(key) {
            continue;
        }
        // Not a namespace after all (a stray file under /var/run/netns):
        // nothing of remocal's can be there.
        if let Err(err) = setns(&file, CloneFlags::CLONE_NEWNET) {
            debug!(netns = %path.display(), error = %err, "cannot enter; skipped");
            continue;
        }
        let removed = Netlink::open(libc::NETLINK_ROUTE)
            .map_err(NetlinkError::from)
            .and_then(|mut netlink| rules::remove_tagged(&mut netlink));
        drop(open);
        match removed {
            Ok(0) => {}
            Ok(removed) => {
                debug!(netns = %path.display(), removed, "removed pass-through leftovers");
                cleaned += 1;
            }
            Err(err) => {
                warn!(netns = %path.display(), error = %err, "cannot remove pass-through leftovers (they are inert)");
            }
        }
    }
    cleaned
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A FIFO among the named namespaces (an agent starting beside a test
    /// that plants one hung in its open, before it logged anything).
    #[test]
    fn a_fifo_among_the_named_namespaces_is_no_candidate() {
        fs::create_dir_all(NAMED).unwrap();
        let fifo = PathBuf::from(NAMED).join(format!("remocal-unit-fifo-{}", std::process::id()));
        let _ = fs::remove_file(&fifo);
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        let listed = candidates(None);
        let _ = fs::remove_file(&fifo);
        assert!(listed.iter().all(|(_, path)| *path != fifo), "{listed:?}");
        assert!(
            listed.iter().any(|(_, path)| path.starts_with(PROC)),
            "processes' namespaces are candidates: {listed:?}"
        );
    }
}
