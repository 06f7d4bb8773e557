//! Named network namespaces that belong to one test, and sockets created inside them.
//!
//! Sockets keep the namespace they were created in, so a socket made on a short-lived
//! thread that joined a namespace can then be used from any thread or tokio task. That
//! lets one test process play the pod's server, the node's clients and the developer's
//! local server at once without spawning helper processes.

use std::fs::File;
use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;
use std::sync::Once;
use std::sync::atomic::{AtomicU32, Ordering};

use nix::sched::{CloneFlags, setns};
use socket2::{Domain, Protocol, Socket, Type};

/// Every namespace this harness creates starts with this, followed by the test process's
/// PID, so leftovers of a test process that was killed can be recognised and removed.
const PREFIX: &str = "rmt-";
const NETNS_DIR: &str = "/var/run/netns";

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A network namespace that is deleted (with its interfaces) when dropped, also when the
/// test panics.
#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates a namespace with a name unique to this process and call, with `lo` up.
    pub fn create(role: &str) -> Netns {
        prepare_process();
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let name = format!("{PREFIX}{}-{n}-{role}", std::process::id());
        run_ip(&["netns", "add", &name]);
        let netns = Netns { name };
        netns.ip(&["link", "set", "lo", "up"]);
        netns
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The bind-mount that `ip netns` keeps; this is what `remocal steal --netns` takes.
    pub fn path(&self) -> PathBuf {
        PathBuf::from(NETNS_DIR).join(&self.name)
    }

    /// Runs `ip -n <ns> ARGS`, panicking with ip's message if it fails.
    pub fn ip(&self, args: &[&str]) {
        let mut full = vec!["-n", self.name.as_str()];
        full.extend_from_slice(args);
        run_ip(&full);
    }

    /// A command that runs `program` inside this namespace (`ip netns exec`).
    pub fn command(&self, program: &str) -> Command {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", &self.name, program]);
        command
    }

    /// Same as [`Netns::command`], for async callers.
    pub fn tokio_command(&self, program: &str) -> tokio::process::Command {
        tokio::process::Command::from(self.command(program))
    }

    /// Runs `f` on a fresh thread that has joined this namespace, so that whatever
    /// sockets or queries it makes happen there. The calling thread is not moved.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let path = self.path();
        std::thread::scope(|scope| {
            scope
                .spawn(move || {
                    let file = File::open(&path)
                        .unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
                    setns(file, CloneFlags::CLONE_NEWNET)
                        .unwrap_or_else(|e| panic!("setns into {}: {e}", path.display()));
                    f()
                })
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })
    }

    /// A listening socket in this namespace. An IPv6 wildcard address also accepts IPv4,
    /// so one listener serves the pod over both families like a typical pod server.
    pub fn listen(&self, addr: SocketAddr) -> std::net::TcpListener {
        self.run(|| listen_in_current_namespace(addr))
            .unwrap_or_else(|e| panic!("listen on {addr} in {}: {e}", self.name))
    }

    /// `count` unconnected TCP sockets living in this namespace, ready for tokio. They are
    /// made in one batch because joining a namespace costs a thread.
    pub fn tcp_sockets(&self, count: usize, ipv6: bool) -> Vec<tokio::net::TcpSocket> {
        let domain = if ipv6 { Domain::IPV6 } else { Domain::IPV4 };
        let sockets = self.run(|| {
            (0..count)
                .map(|_| {
                    let socket = Socket::new(domain, Type::STREAM, Some(Protocol::TCP))?;
                    socket.set_nonblocking(true)?;
                    Ok(socket)
                })
                .collect::<io::Result<Vec<_>>>()
        });
        sockets
            .unwrap_or_else(|e| panic!("create sockets in {}: {e}", self.name))
            .into_iter()
            .map(|socket| tokio::net::TcpSocket::from_std_stream(socket.into()))
            .collect()
    }

    /// Opens a TCP connection from inside this namespace.
    pub async fn connect(&self, addr: SocketAddr) -> io::Result<tokio::net::TcpStream> {
        let socket = self
            .tcp_sockets(1, addr.is_ipv6())
            .pop()
            .expect("one socket");
        socket.connect(addr).await
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        match Command::new("ip")
            .args(["netns", "del", &self.name])
            .output()
        {
            Ok(out) if out.status.success() => {}
            Ok(out) => eprintln!(
                "warning: ip netns del {} failed: {}",
                self.name,
                String::from_utf8_lossy(&out.stderr).trim()
            ),
            Err(e) => eprintln!("warning: ip netns del {}: {e}", self.name),
        }
    }
}

/// A listener with a backlog deep enough for a thousand simultaneous connections (std's
/// default of 128 would drop SYNs and add second-long retransmission delays).
pub fn listen_in_current_namespace(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    if addr.is_ipv6() {
        socket.set_only_v6(false)?;
    }
    socket.set_reuse_address(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    socket.set_nonblocking(true)?;
    Ok(socket.into())
}

/// Runs `ip ARGS`, panicking with its stderr on failure.
pub fn run_ip(args: &[&str]) {
    let out = Command::new("ip")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run ip (is iproute2 installed?): {e}"));
    assert!(
        out.status.success(),
        "ip {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
}

/// Whether a namespace with this name is still registered with `ip netns`.
pub fn exists(name: &str) -> bool {
    PathBuf::from(NETNS_DIR).join(name).exists()
}

/// Once per test process: lift the open-files limit (a thousand connections need three
/// thousand descriptors here: remote end, local server end, and more) and remove the
/// namespaces of earlier test processes that died before they could clean up.
fn prepare_process() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // SAFETY: geteuid has no preconditions and cannot fail.
        let euid = unsafe { libc::geteuid() };
        assert!(
            euid == 0,
            "the end-to-end tests create network namespaces and attach eBPF: run them as root"
        );
        use nix::sys::resource::{Resource, getrlimit, setrlimit};
        if let Ok((_, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
            let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
        }
        remove_namespaces_of_dead_test_processes();
    });
}

fn remove_namespaces_of_dead_test_processes() {
    let Ok(entries) = std::fs::read_dir(NETNS_DIR) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix(PREFIX)
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if !PathBuf::from(format!("/proc/{pid}")).exists() {
            let _ = Command::new("ip").args(["netns", "del", &name]).output();
        }
    }
}
