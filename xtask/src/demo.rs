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
    process::{Child, Command, Stdio},
    sync::{Mutex, mpsc},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use crate::{run, setup};

const NODE: &str = "remocal-demo-node";
const POD: &str = "remocal-demo-pod";
const POD_V4: &str = "198.18.0.2";
const POD_V6: &str = "fd72:656d::2";
const POD_BODY: &str = "hello from the pod";
const LOCAL_BODY: &str = "hello from your laptop (the local process)";

#[derive(clap::Args)]
pub struct Options {
    /// gRPC port of the demo's agent.
    #[arg(long, default_value_t = 7420)]
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
    pub fn smoke() -> Self {
        Self {
            agent_port: free_port(),
            local_port: free_port(),
            metrics_port: free_port(),
        }
    }
}

pub fn run(options: &Options) -> anyhow::Result<()> {
    run::require_root("cargo xtask demo")?;
    setup::ensure()?;
    step("building remocal");
    run::build_binaries()?;
    let bin = run::workspace_root().join("target/debug");
    let me = std::env::current_exe().context("cannot find the xtask binary")?;
    ctrlc::set_handler(|| {
        eprintln!("\ninterrupted: cleaning up");
        cleanup();
        std::process::exit(130);
    })
    .context("cannot install the Ctrl-C handler")?;
    let _cleanup = Cleanup;
    let result = show(options, &bin, &me);
    if result.is_ok() {
        step("done: the pod answered before and after, your local process while stolen");
    }
    result
}

fn show(options: &Options, bin: &Path, me: &Path) -> anyhow::Result<()> {
    step(&format!(
        "creating a node ({NODE}) and a pod ({POD}) in network namespaces"
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

    let agent = format!("127.0.0.1:{}", options.agent_port);
    if TcpListener::bind(&agent).is_err() {
        bail!(
            "{agent} is taken: is a remocal-agent already running? Stop it, or pass --agent-port"
        );
    }
    let agent_log = run::workspace_root().join("target/demo-agent.log");
    step(&format!(
        "starting remocal-agent on the node (gRPC {agent}, log {})",
        agent_log.display()
    ));
    let log = std::fs::File::create(&agent_log).context("cannot create the agent log")?;
    let metrics = format!("127.0.0.1:{}", options.metrics_port);
    spawn(
        Command::new(bin.join("remocal-agent"))
            .args(["--grpc-listen", &agent, "--metrics-listen", &metrics])
            .stderr(log),
    )?;
    wait_for_port(&agent)
        .with_context(|| format!("the agent did not start: see {}", agent_log.display()))?;

    let local = format!("127.0.0.1:{}", options.local_port);
    step(&format!("your local process: an HTTP server on {local}"));
    spawn(Command::new(me).args(["demo-http", "--bind", &local, "--body", LOCAL_BODY]))?;
    wait_for_port(&local)?;

    let v4 = format!("http://{POD_V4}/");
    let v6 = format!("http://[{POD_V6}]/");
    expect("before the steal", &v4, POD_BODY)?;

    let agent_url = format!("http://{agent}");
    let mut steal = Command::new(bin.join("remocal"));
    steal.args([
        "steal",
        "--netns",
        &format!("/var/run/netns/{POD}"),
        "--port",
        "80",
    ]);
    steal.args([
        "--local-port",
        &options.local_port.to_string(),
        "--agent",
        &agent_url,
        "-v",
    ]);
    let shown = run::describe(&steal);
    step(
        shown
            .strip_prefix(&format!("{}/", bin.display()))
            .unwrap_or(&shown),
    );
    let mut remocal = spawn(steal.stdout(Stdio::piped()))?;
    wait_for_ready(&mut remocal)?;

    expect("while stolen", &v4, LOCAL_BODY)?;
    expect("while stolen", &v6, LOCAL_BODY)?;

    step("Ctrl-C to remocal: the session ends");
    interrupt(remocal.id());
    let status = wait_with_timeout(&mut remocal, Duration::from_secs(10))?;
    println!("    remocal exited with {status}");
    if !status.success() {
        bail!("remocal should exit 0 after Ctrl-C");
    }
    expect("after the steal", &v4, POD_BODY)
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
    let output = Command::new("ip")
        .args(args.split_whitespace())
        .output()
        .context("cannot run ip (install iproute2)")?;
    if !output.status.success() {
        bail!(
            "ip {args} failed: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(())
}

/// Children to stop when the demo ends, however it ends.
static CHILDREN: Mutex<Vec<u32>> = Mutex::new(Vec::new());

fn spawn(command: &mut Command) -> anyhow::Result<Child> {
    let child = command
        .stdin(Stdio::null())
        .spawn()
        .with_context(|| format!("cannot start {}", run::describe(command)))?;
    CHILDREN.lock().expect("children lock").push(child.id());
    Ok(child)
}

struct Cleanup;

impl Drop for Cleanup {
    fn drop(&mut self) {
        cleanup();
    }
}

fn cleanup() {
    let children = std::mem::take(
        &mut *CHILDREN
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()),
    );
    for pid in children.iter().rev() {
        // SAFETY: plain kill(2) on a pid we started.
        unsafe { libc::kill(*pid as libc::pid_t, libc::SIGTERM) };
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    for pid in children {
        while Path::new(&format!("/proc/{pid}")).exists() && Instant::now() < deadline {
            // SAFETY: reaps our own child if it exited; WNOHANG never blocks.
            unsafe { libc::waitpid(pid as libc::pid_t, std::ptr::null_mut(), libc::WNOHANG) };
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    delete_namespaces();
}

fn delete_namespaces() {
    for ns in [NODE, POD] {
        if Path::new("/var/run/netns").join(ns).exists() {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

fn interrupt(pid: u32) {
    // SAFETY: plain kill(2) on a pid we started.
    unsafe { libc::kill(pid as libc::pid_t, libc::SIGINT) };
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
    ready_seen
        .recv_timeout(Duration::from_secs(20))
        .map_err(|_| {
            anyhow::anyhow!("remocal did not become ready within 20 s (its errors are above)")
        })
}

fn expect(when: &str, url: &str, body: &str) -> anyhow::Result<()> {
    let answer = curl(url);
    println!("--> {when}: curl {url}  =>  {answer}");
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

fn wait_for_port(addr: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if TcpStream::connect(addr).is_ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!("nothing listens on {addr} after 20 s")
}

fn wait_with_timeout(
    child: &mut Child,
    limit: Duration,
) -> anyhow::Result<std::process::ExitStatus> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(status);
        }
        if Instant::now() > deadline {
            bail!("remocal did not exit within {limit:?} of Ctrl-C");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map_or(0, |addr| addr.port())
}

fn step(message: &str) {
    println!("==> {message}");
}
