//! The CLI as people install it: shell completions, and the same binary
//! run as the kubectl plugin `kubectl-remocal`.

use std::path::PathBuf;
use std::process::{Command, Output};

use remocal_tests::processes::binary;

fn run(program: &PathBuf, args: &[&str]) -> Output {
    Command::new(program)
        .args(args)
        .env_remove("REMOCAL_AGENT")
        .output()
        .unwrap_or_else(|e| panic!("run {}: {e}", program.display()))
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// The remocal binary linked as `kubectl-remocal` in a directory of its own,
/// as a plugin sits on PATH; removed with the returned guard.
struct Plugin {
    dir: PathBuf,
    path: PathBuf,
}

impl Plugin {
    fn link() -> Plugin {
        let dir = std::env::temp_dir().join(format!("remocal-plugin-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("kubectl-remocal");
        let _ = std::fs::remove_file(&path);
        std::os::unix::fs::symlink(binary("remocal"), &path).unwrap();
        Plugin { dir, path }
    }
}

impl Drop for Plugin {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[test]
fn completions_cover_the_commands_and_flags_for_each_shell() {
    for shell in ["bash", "zsh", "fish"] {
        let output = run(&binary("remocal"), &["completions", shell]);
        assert!(output.status.success(), "{shell}: {}", text(&output.stderr));
        let script = text(&output.stdout);
        for word in [
            "steal",
            "mirror",
            "agents",
            "sessions",
            "reset-existing",
            "header",
        ] {
            assert!(script.contains(word), "{shell} completions lack {word}");
        }
    }
    // bash parses what it would source.
    let output = run(&binary("remocal"), &["completions", "bash"]);
    let check = Command::new("bash")
        .args(["-n", "-c", &text(&output.stdout)])
        .output()
        .unwrap();
    assert!(check.status.success(), "{}", text(&check.stderr));
    let bad = run(&binary("remocal"), &["completions", "tcsh"]);
    assert_eq!(bad.status.code(), Some(2));
}

#[test]
fn as_a_kubectl_plugin_it_names_itself_kubectl_remocal() {
    let plugin = Plugin::link();
    let help = run(&plugin.path, &["--help"]);
    assert!(help.status.success());
    assert!(
        text(&help.stdout).contains("Usage: kubectl remocal <COMMAND>"),
        "{}",
        text(&help.stdout)
    );
    let steal_help = run(&plugin.path, &["steal", "--help"]);
    assert!(
        text(&steal_help.stdout).contains("Usage: kubectl remocal steal"),
        "{}",
        text(&steal_help.stdout)
    );
    let missing = run(&plugin.path, &["steal"]);
    assert_eq!(missing.status.code(), Some(2));
    let stderr = text(&missing.stderr);
    assert!(
        stderr.contains("(see `kubectl remocal --help`)"),
        "{stderr}"
    );
    let mirror = run(
        &plugin.path,
        &["mirror", "pod/web", "--port", "80", "--reset-existing"],
    );
    assert_eq!(mirror.status.code(), Some(2));
    assert!(
        text(&mirror.stderr).contains("is for `kubectl remocal steal` only"),
        "{}",
        text(&mirror.stderr)
    );
    // The same binary under its own name keeps its own.
    let own = run(&binary("remocal"), &["steal"]);
    assert!(text(&own.stderr).contains("(see `remocal --help`)"));
}
