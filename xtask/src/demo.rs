//! `cargo xtask demo`: a steal end to end on this machine's kernel. A "node"
//! and a "pod" are network namespaces joined by a veth pair; the pod runs an
//! HTTP server; the agent runs on the host like a hostNetwork DaemonSet pod;
//! a "local" server stands for the developer's process. The same curl from
//! the node is answered by the pod, then by the local process while
//! `remocal steal` runs, then by the pod again.
use std::{
    io::{BufRead as _, BufReader},
    net::{TcpListener, TcpStream},
    path::Path,
    process::{Child, Command, ExitStatus, Stdio},
    sync::{
        Mutex,
        atomic::{AtomicBool, Ordering},
        mpsc,
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use crate::{run, setup};

const NODE: &str = "remocal-demo-node";
const POD: &str = "remocal-demo-pod";
const POD_V4: &str = "198.18.0.2";
const POD_V6: &str = "fd72:656d::2";
/// remocal's default `--agent` port: the demo shows the command a user types.
const DEFAULT_AGENT_PORT: u16 = 7420;
const POD_BODY: &str = "hello from the pod";
const LOCAL_BODY: &str = "hello from your laptop (the local process)";

#[derive(clap::Args)]
pub struct Options {
    /// gRPC port of the demo's agent.
    #[arg(long, default_value_t = DEFAULT_AGENT_PORT)]
    agent_port: u16,
    /// Port the demo's "local process" listens on.
    #[arg(long, default_value_t = 18080)]
    local_port: u16,
    /// Port of the demo agent's metrics server (on 127.0.0.1).
    #[arg(long, default_value_t = 9420)]
    metrics_port: u16,
}

impl Options {
    /// Free ports, so the smoke run in `cargo xtask test` never collides with
    /// an agent a developer runs on the default port.
    fn smoke() -> Self {
        Self {
            agent_port: free_port(),
            local_port: free_port(),
            metrics_port: free_port(),
        }
    }
}

pub fn run(options: &Options) -> anyhow::Result<()> {
    run::require_root("cargo xtask demo", "network namespaces and eBPF")?;
    setup::ensure()?;
    step("building remocal");
    run::build_binaries()?;
    show(options)
}

/// The demo on free ports, for `cargo xtask test`, which has built already.
pub fn smoke() -> anyhow::Result<()> {
    show(&Options::smoke())
}

/// Runs the demo and removes what it created, however it ends.
fn show(options: &Options) -> anyhow::Result<()> {
    let me = run::xtask_exe()?;
    let bin = run::workspace_root().join("target/debug");
    ctrlc::set_handler(|| {
        INTERRUPTED.store(true, Ordering::SeqCst);
        eprintln!("\ninterrupted: cleaning up");
        cleanup();
        std::process::exit(130);
    })
    .context("cannot install the Ctrl-C handler")?;
    let result = {
        let _cleanup = Cleanup;
        steps(options, &bin, me)
    };
    if INTERRUPTED.load(Ordering::SeqCst) {
        // The handler cleans up and exits 130; the errors the interruption
        // caused here are not the user's news.
        loop {
            std::thread::park();
        }
    }
    if result.is_ok() {
        step("done: the pod answered before and after, your local process while stolen");
    }
    result
}

fn steps(options: &Options, bin: &Path, me: &Path) -> anyhow::Result<()> {
    let agent = format!("127.0.0.1:{}", options.agent_port);
    let metrics = format!("127.0.0.1:{}", options.metrics_port);
    let local = format!("127.0.0.1:{}", options.local_port);
    require_free(
        &agent,
        "is a remocal-agent already running? Stop it, or pass --agent-port",
    )?;
    require_free(
        &metrics,
        "is a remocal-agent already running? Stop it, or pass --metrics-port",
    )?;
    require_free(&local, "pass another --local-port")?;

    step(&format!(
        "creating a node ({NODE}) and a pod ({POD}) in network namespaces, joined by a veth pair"
    ));
    create_topology()?;

    step(&format!(
        "the pod runs its own HTTP server on {POD_V4}:80 and [{POD_V6}]:80"
    ));
    spawn(
        Command::new("ip")
            .args(["netns", "exec", POD])
            .arg(me)
            .args(["demo-http", "--bind", "[::]:80", "--body", POD_BODY]),
    )?;

    let agent_log = run::workspace_root().join("target/demo-agent.log");
    step(&format!(
        "starting remocal-agent on the node (gRPC {agent}, metrics {metrics}, log {})",
        agent_log.display()
    ));
    let log = std::fs::File::create(&agent_log)
        .with_context(|| format!("cannot create {}", agent_log.display()))?;
    let mut agent_process = spawn(
        Command::new(bin.join("remocal-agent"))
            .args(["--grpc-listen", &agent, "--metrics-listen", &metrics])
            .stderr(log),
    )?;
    wait_for_port(&agent, &mut agent_process).with_context(|| {
        format!(
            "the agent did not start; the end of {}:\n{}",
            agent_log.display(),
            tail(&agent_log)
        )
    })?;

    step(&format!("your local process: an HTTP server on {local}"));
    let mut local_process =
        spawn(Command::new(me).args(["demo-http", "--bind", &local, "--body", LOCAL_BODY]))?;
    wait_for_port(&local, &mut local_process)?;

    let v4 = format!("http://{POD_V4}/");
    let v6 = format!("http://[{POD_V6}]/");
    // The pod's server may still be starting: the first answer may take a moment.
    expect_within("before the steal", &v4, POD_BODY, Duration::from_secs(10))?;

    step("remocal steal: new connections to the pod's port 80 go to your local process");
    let mut steal = Command::new(bin.join("remocal"));
    steal
        .args(["steal", "--netns", &format!("/var/run/netns/{POD}")])
        .args([
            "--port",
            "80",
            "--local-port",
            &options.local_port.to_string(),
        ]);
    if options.agent_port != DEFAULT_AGENT_PORT {
        steal.args(["--agent", &format!("http://{agent}")]);
    }
    steal.arg("-v");
    let mut remocal = spawn(steal.stdout(Stdio::piped()))?;
    wait_for_ready(&mut remocal)?;

    expect("while stolen", &v4, LOCAL_BODY)?;
    expect("while stolen", &v6, LOCAL_BODY)?;

    step("remocal sessions: who intercepts what on the node");
    let listed = Command::new(bin.join("remocal"))
        .args(["sessions", "-A", "--agent", &format!("http://{agent}")])
        .output()
        .context("cannot run remocal sessions")?;
    let table = String::from_utf8_lossy(&listed.stdout);
    print!("{table}");
    if !listed.status.success() || !table.contains(&format!("netns=/var/run/netns/{POD}")) {
        bail!(
            "remocal sessions should list the steal ({}): {}",
            listed.status,
            String::from_utf8_lossy(&listed.stderr)
        );
    }

    step("Ctrl-C to remocal: the session ends, the redirection goes");
    interrupt(remocal.id());
    let status = wait_with_timeout(&mut remocal, Duration::from_secs(10))?;
    println!("    remocal exited with {status}");
    if !status.success() {
        bail!("remocal should exit 0 after Ctrl-C");
    }
    expect("after the steal", &v4, POD_BODY)?;
    expect("after the steal", &v6, POD_BODY)
}

fn require_free(addr: &str, hint: &str) -> anyhow::Result<()> {
    TcpListener::bind(addr)
        .map(drop)
        .with_context(|| format!("cannot use {addr}: {hint}"))
}

/// The last lines of a log, to say why a child failed.
fn tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(10)..].join("\n")
}

fn create_topology() -> anyhow::Result<()> {
    delete_namespaces();
    for ns in [NODE, POD] {
        ip(&format!("netns add {ns}"))?;
        ip(&format!("-n {ns} link set lo up"))?;
    }
    ip(&format!(
        "link add veth-pod netns {NODE} type veth peer name eth0 netns {POD}"
    ))?;
    ip(&format!("-n {NODE} addr add 198.18.0.1/24 dev veth-pod"))?;
    ip(&format!(
        "-n {NODE} addr add fd72:656d::1/64 dev veth-pod nodad"
    ))?;
    ip(&format!("-n {POD} addr add {POD_V4}/24 dev eth0"))?;
    ip(&format!("-n {POD} addr add {POD_V6}/64 dev eth0 nodad"))?;
    ip(&format!("-n {NODE} link set veth-pod up"))?;
    ip(&format!("-n {POD} link set eth0 up"))
}

fn ip(args: &str) -> anyhow::Result<()> {
    eprintln!("  $ ip {args}");
    let output = Command::new("ip")
        .args(args.split_whitespace())
        .output()
        .context("cannot run ip (cargo xtask setup installs iproute2)")?;
    if !output.status.success() {
        bail!(
            "ip {args} failed: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(())
}

/// Children to stop when the demo ends, however it ends. None once cleanup
/// has begun, so that nothing starts after it and it runs once.
static CHILDREN: Mutex<Option<Vec<u32>>> = Mutex::new(Some(Vec::new()));
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

fn spawn(command: &mut Command) -> anyhow::Result<Child> {
    let mut children = children();
    let Some(children) = children.as_mut() else {
        bail!("interrupted");
    };
    eprintln!("  $ {} &", shown(command));
    let child = command
        .stdin(Stdio::null())
        .spawn()
        .with_context(|| format!("cannot start {}", run::describe(command)))?;
    children.push(child.id());
    Ok(child)
}

/// A command as the user would type it from the workspace root.
fn shown(command: &Command) -> String {
    let root = format!("{}/", run::workspace_root().display());
    run::describe(command).replace(&root, "")
}

fn children() -> std::sync::MutexGuard<'static, Option<Vec<u32>>> {
    CHILDREN
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

struct Cleanup;

impl Drop for Cleanup {
    fn drop(&mut self) {
        cleanup();
    }
}

/// SIGTERM lets the agent and remocal end their sessions; what is still
/// there after 5 s gets SIGKILL. Holds the lock throughout, so that a second
/// caller (Ctrl-C during the normal end) returns only once all is gone.
fn cleanup() {
    let mut guard = children();
    let Some(pids) = guard.take() else {
        return;
    };
    for &pid in pids.iter().rev() {
        signal(pid, libc::SIGTERM);
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while pids.iter().any(|&pid| alive(pid)) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    for &pid in &pids {
        if alive(pid) {
            signal(pid, libc::SIGKILL);
            // SAFETY: waits for our own child, which SIGKILL ends at once.
            unsafe { libc::waitpid(pid as libc::pid_t, std::ptr::null_mut(), 0) };
        }
    }
    delete_namespaces();
    drop(guard);
}

/// Reaps the child if it exited, so that it does not linger as a zombie.
fn alive(pid: u32) -> bool {
    // SAFETY: WNOHANG on our own child never blocks.
    let reaped = unsafe { libc::waitpid(pid as libc::pid_t, std::ptr::null_mut(), libc::WNOHANG) };
    // 0: still running. The pid (exited, now reaped) or -1 (already reaped
    // by its Child handle): gone.
    reaped == 0
}

fn signal(pid: u32, signal: libc::c_int) {
    // SAFETY: plain kill(2) on a pid we started and have not reaped yet.
    unsafe { libc::kill(pid as libc::pid_t, signal) };
}

fn delete_namespaces() {
    for ns in [NODE, POD] {
        if Path::new("/var/run/netns").join(ns).exists() {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

fn interrupt(pid: u32) {
    signal(pid, libc::SIGINT);
}

/// Prints remocal's stdout as it comes and returns once its `ready` line is there.
fn wait_for_ready(remocal: &mut Child) -> anyhow::Result<()> {
    let stdout = remocal.stdout.take().context("remocal's stdout")?;
    let (ready, ready_seen) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            println!("    remocal: {line}");
            if line.starts_with("ready") {
                let _ = ready.send(());
            }
        }
    });
    match ready_seen.recv_timeout(Duration::from_secs(20)) {
        Ok(()) => Ok(()),
        Err(mpsc::RecvTimeoutError::Timeout) => {
            bail!("remocal did not become ready within 20 s (its errors are above)")
        }
        // Its stdout closed: it exited; its `error:` line is above.
        Err(mpsc::RecvTimeoutError::Disconnected) => {
            let status = wait_with_timeout(remocal, Duration::from_secs(5))?;
            bail!("remocal exited ({status}) before it was ready (its error is above)")
        }
    }
}

fn expect(when: &str, url: &str, body: &str) -> anyhow::Result<()> {
    expect_within(when, url, body, Duration::ZERO)
}

/// Asks again until `limit` for a server that may still be starting.
fn expect_within(when: &str, url: &str, body: &str, limit: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + limit;
    let mut answer = curl(url);
    while answer != body && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
        answer = curl(url);
    }
    if INTERRUPTED.load(Ordering::SeqCst) {
        bail!("interrupted");
    }
    println!("--> {when}: ip netns exec {NODE} curl -s {url}  =>  {answer}");
    if answer != body {
        bail!("{when}, {url} should have answered {body:?}");
    }
    Ok(())
}

fn curl(url: &str) -> String {
    let output = Command::new("ip")
        .args([
            "netns",
            "exec",
            NODE,
            "curl",
            "--silent",
            "--show-error",
            "--max-time",
            "5",
            "--globoff",
            url,
        ])
        .output();
    match output {
        Ok(output) if output.status.success() => {
            String::from_utf8_lossy(&output.stdout).trim().to_string()
        }
        Ok(output) => format!(
            "(no answer: {})",
            String::from_utf8_lossy(&output.stderr).trim()
        ),
        Err(err) => format!("(cannot run curl: {err})"),
    }
}

/// Until `process` accepts connections on `addr`; stops early if it exits.
fn wait_for_port(addr: &str, process: &mut Child) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if TcpStream::connect(addr).is_ok() {
            return Ok(());
        }
        if let Some(status) = try_wait(process)? {
            bail!("it exited ({status}) before listening on {addr}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!("nothing listens on {addr} after 20 s")
}

fn wait_with_timeout(child: &mut Child, limit: Duration) -> anyhow::Result<ExitStatus> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = try_wait(child)? {
            return Ok(status);
        }
        if Instant::now() > deadline {
            bail!("process {} did not exit within {limit:?}", child.id());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Reaps under the lock and forgets the pid at once, so that cleanup never
/// signals a pid the kernel may have given to another process since.
fn try_wait(child: &mut Child) -> anyhow::Result<Option<ExitStatus>> {
    let mut children = children();
    let Some(pids) = children.as_mut() else {
        bail!("interrupted");
    };
    let status = child.try_wait().context("cannot wait for a child")?;
    if status.is_some() {
        pids.retain(|&pid| pid != child.id());
    }
    Ok(status)
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map_or(0, |addr| addr.port())
}

fn step(message: &str) {
    println!("==> {message}");
}
