//! Network namespaces for tests on the real kernel: created with
//! `ip netns add` under a name unique to the test process, `lo` up, and
//! deleted on drop, even when the test fails. Nothing of the machine's own
//! namespace is touched.
use std::{
    process::Command,
    sync::atomic::{AtomicUsize, Ordering},
};

use super::{Netns, TargetSpec};

pub struct TestNs {
    pub name: String,
}

impl TestNs {
    pub fn new() -> Self {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let name = format!(
            "rp-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        run("ip", &["netns", "add", &name]);
        let ns = Self { name };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    pub fn netns(&self) -> Netns {
        Netns::open(&TargetSpec::Path(format!("/var/run/netns/{}", self.name)))
            .expect("open the test namespace")
    }

    /// `ip -n NAME ARGS`, its output.
    pub fn ip(&self, args: &[&str]) -> String {
        let mut all = vec!["-n", &self.name];
        all.extend_from_slice(args);
        run("ip", &all)
    }

    /// ARGS run inside the namespace, its output.
    pub fn exec(&self, args: &[&str]) -> String {
        let mut all = vec!["netns", "exec", &self.name];
        all.extend_from_slice(args);
        run("ip", &all)
    }
}

impl Drop for TestNs {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

fn run(program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .output()
        .expect("run ip (tests need root and iproute2)");
    assert!(
        out.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}
