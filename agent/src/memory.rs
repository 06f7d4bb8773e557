//! Giving freed memory back to the system. The agent is long-lived and mostly
//! idle between bursts (parsing the kernel's BTF, a mirror session's
//! reassembly) that glibc would otherwise keep resident: with its default
//! dynamic thresholds, freeing one large block raises the trim threshold to
//! twice its size, and the top of a thread's arena is never trimmed by
//! `malloc_trim`.

/// Fixed thresholds: blocks above 256 KiB get their own mapping (returned on
/// free), and an arena's free top is returned beyond 1 MiB (room for a few
/// 64 KiB read buffers, so the data path does not trim on every free).
pub fn configure() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes tunables, before other threads exist.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 256 << 10);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 20);
    }
}

/// Returns the free pages of every malloc arena to the kernel.
pub fn release_free() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases memory that no allocation uses.
    unsafe {
        libc::malloc_trim(0);
    }
}
