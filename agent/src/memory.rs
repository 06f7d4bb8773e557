//! Giving freed memory back to the system. The agent is long-lived and mostly
//! idle between bursts (parsing the kernel's BTF, a mirror session's
//! reassembly) that glibc would otherwise keep resident: with its default
//! dynamic thresholds, freeing one large block raises the trim threshold to
//! twice its size, and the top of a thread's arena is never trimmed by
//! `malloc_trim`.

/// Returns the free pages of every malloc arena to the kernel.
pub fn release_free() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases memory that no allocation uses.
    unsafe {
        libc::malloc_trim(0);
    }
}
