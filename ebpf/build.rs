//! Rebuild the eBPF object when bpf-linker changes (e.g. after `cargo xtask setup`
//! installs a new one), since cargo cannot see the linker otherwise.
fn main() {
    if let Ok(linker) = which::which("bpf-linker") {
        println!("cargo:rerun-if-changed={}", linker.display());
    }
}
