//! The bpf(2) commands the agent issues itself, for the one program aya
//! 0.14 cannot load: a socket iterator that calls a kfunc (its loader has no
//! kfunc relocation). Every object is an [`OwnedFd`], closed on drop, and
//! nothing is pinned: if the agent dies, the kernel frees it all.
use std::{
    io::{self, Read as _},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
};

// Commands, map and program types from linux/bpf.h (stable ABI).
const BPF_MAP_CREATE: libc::c_long = 0;
const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_MAP_DELETE_ELEM: libc::c_long = 3;
const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_ITER_CREATE: libc::c_long = 33;
const BPF_MAP_TYPE_HASH: u32 = 1;
const BPF_PROG_TYPE_TRACING: u32 = 26;
const BPF_TRACE_ITER: u32 = 28;

/// What the verifier said about a program it refused: enough to see why.
const LOG_SIZE: usize = 64 * 1024;

/// One BPF instruction, as the kernel reads it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Insn {
    pub code: u8,
    /// Destination register in the low nibble, source in the high one.
    pub regs: u8,
    pub off: i16,
    pub imm: i32,
}

/// A signal during a command (the verifier can take a while) makes it fail
/// with EINTR or EAGAIN; it is tried again, as libbpf does.
const ATTEMPTS: usize = 5;

fn bpf<T>(command: libc::c_long, attr: &mut T) -> io::Result<libc::c_long> {
    let mut attempts = 0;
    loop {
        // SAFETY: `attr` is a live, initialized `#[repr(C)]` attribute struct
        // of the command, its pointers point at buffers of the sizes it
        // gives (see the callers), and its size is passed, so the kernel
        // reads no further.
        let result = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                command,
                std::ptr::from_mut(attr),
                size_of::<T>(),
            )
        };
        if result >= 0 {
            return Ok(result);
        }
        let err = io::Error::last_os_error();
        attempts += 1;
        if attempts >= ATTEMPTS || !matches!(err.raw_os_error(), Some(libc::EINTR | libc::EAGAIN)) {
            return Err(err);
        }
    }
}

fn new_fd(command: libc::c_long, attr: &mut impl Sized) -> io::Result<OwnedFd> {
    let fd = bpf(command, attr)?;
    let fd = i32::try_from(fd).map_err(|_| io::Error::other("bpf(2) returned no fd"))?;
    // SAFETY: the command returned a new file descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn raw(fd: &OwnedFd) -> u32 {
    u32::try_from(fd.as_raw_fd()).expect("file descriptors are not negative")
}

#[repr(C)]
#[derive(Default)]
struct MapCreate {
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
    map_flags: u32,
}

/// A hash map of fixed-size keys and values. Its accessors check the sizes:
/// the kernel reads and writes exactly the map's sizes through the pointers.
pub struct HashMap {
    fd: OwnedFd,
    key_size: usize,
    value_size: usize,
}

impl HashMap {
    pub fn create(key_size: usize, value_size: usize, max_entries: u32) -> io::Result<Self> {
        let size = |size: usize| u32::try_from(size).map_err(|_| io::Error::other("too large"));
        let fd = new_fd(
            BPF_MAP_CREATE,
            &mut MapCreate {
                map_type: BPF_MAP_TYPE_HASH,
                key_size: size(key_size)?,
                value_size: size(value_size)?,
                max_entries,
                map_flags: 0,
            },
        )?;
        Ok(Self {
            fd,
            key_size,
            value_size,
        })
    }

    pub fn fd(&self) -> &OwnedFd {
        &self.fd
    }

    fn element(&self, key: &[u8], value: *const u8) -> MapElement {
        assert_eq!(key.len(), self.key_size, "a key of the map's size");
        MapElement {
            map_fd: raw(&self.fd),
            _pad: 0,
            key: key.as_ptr() as u64,
            value: value as u64,
            flags: 0,
        }
    }

    /// Sets `key` to `value`.
    pub fn update(&self, key: &[u8], value: &[u8]) -> io::Result<()> {
        assert_eq!(value.len(), self.value_size, "a value of the map's size");
        bpf(BPF_MAP_UPDATE_ELEM, &mut self.element(key, value.as_ptr())).map(drop)
    }

    /// The value of `key` into `value`; false when there is none.
    pub fn lookup(&self, key: &[u8], value: &mut [u8]) -> io::Result<bool> {
        assert_eq!(value.len(), self.value_size, "room for the map's value");
        match bpf(
            BPF_MAP_LOOKUP_ELEM,
            &mut self.element(key, value.as_mut_ptr()),
        ) {
            Ok(_) => Ok(true),
            Err(err) if err.raw_os_error() == Some(libc::ENOENT) => Ok(false),
            Err(err) => Err(err),
        }
    }

    pub fn delete(&self, key: &[u8]) -> io::Result<()> {
        match bpf(
            BPF_MAP_DELETE_ELEM,
            &mut self.element(key, std::ptr::null()),
        ) {
            Ok(_) => Ok(()),
            Err(err) if err.raw_os_error() == Some(libc::ENOENT) => Ok(()),
            Err(err) => Err(err),
        }
    }
}

#[repr(C)]
struct MapElement {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

/// union bpf_attr for BPF_PROG_LOAD, up to the fields an iterator needs.
#[repr(C)]
#[derive(Default)]
struct ProgLoad {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
    prog_ifindex: u32,
    expected_attach_type: u32,
    prog_btf_fd: u32,
    func_info_rec_size: u32,
    func_info: u64,
    func_info_cnt: u32,
    line_info_rec_size: u32,
    line_info: u64,
    line_info_cnt: u32,
    attach_btf_id: u32,
}

#[derive(Debug, thiserror::Error)]
#[error("the kernel refused the program ({errno}){}", verifier_tail(log))]
pub struct LoadError {
    pub errno: io::Error,
    /// The verifier's log, when it said anything.
    pub log: String,
}

/// The end of a verifier log: the reason is on its last lines.
fn verifier_tail(log: &str) -> String {
    let lines: Vec<&str> = log.lines().rev().take(3).collect();
    if lines.is_empty() {
        return String::new();
    }
    let shown: Vec<&str> = lines.into_iter().rev().collect();
    format!(": {}", shown.join(" / "))
}

/// Loads a GPL iterator program attached to kernel function
/// `attach_btf_id` (a `bpf_iter_*` of vmlinux).
pub fn load_iterator(name: &str, insns: &[Insn], attach_btf_id: u32) -> Result<OwnedFd, LoadError> {
    let license = c"GPL";
    let mut log = vec![0u8; LOG_SIZE];
    let mut prog_name = [0u8; 16];
    for (slot, byte) in prog_name.iter_mut().zip(name.bytes().take(15)) {
        *slot = byte;
    }
    let mut attr = ProgLoad {
        prog_type: BPF_PROG_TYPE_TRACING,
        insn_cnt: u32::try_from(insns.len()).expect("a short program"),
        insns: insns.as_ptr() as u64,
        license: license.as_ptr() as u64,
        log_level: 1,
        log_size: u32::try_from(log.len()).expect("64 KiB"),
        log_buf: log.as_mut_ptr() as u64,
        prog_name,
        expected_attach_type: BPF_TRACE_ITER,
        attach_btf_id,
        ..ProgLoad::default()
    };
    new_fd(BPF_PROG_LOAD, &mut attr).map_err(|errno| {
        let end = log.iter().position(|b| *b == 0).unwrap_or(log.len());
        LoadError {
            errno,
            log: String::from_utf8_lossy(&log[..end]).into_owned(),
        }
    })
}

#[repr(C)]
#[derive(Default)]
struct LinkCreate {
    prog_fd: u32,
    target_fd: u32,
    attach_type: u32,
    flags: u32,
    iter_info: u64,
    iter_info_len: u32,
    _pad: u32,
}

/// The iterator's link: each [`run_iterator`] on it walks once.
pub fn attach_iterator(program: &OwnedFd) -> io::Result<OwnedFd> {
    new_fd(
        BPF_LINK_CREATE,
        &mut LinkCreate {
            prog_fd: raw(program),
            attach_type: BPF_TRACE_ITER,
            ..LinkCreate::default()
        },
    )
}

#[repr(C)]
struct IterCreate {
    link_fd: u32,
    flags: u32,
}

/// One walk of the iterator, in the calling thread's network namespace (a
/// socket iterator walks the sockets of the namespace it was opened in).
pub fn run_iterator(link: &OwnedFd) -> io::Result<()> {
    let fd = new_fd(
        BPF_ITER_CREATE,
        &mut IterCreate {
            link_fd: raw(link),
            flags: 0,
        },
    )?;
    let mut file = std::fs::File::from(fd);
    // The program prints nothing; reading to the end runs it on every socket.
    let mut sink = [0u8; 256];
    loop {
        match file.read(&mut sink) {
            Ok(0) => return Ok(()),
            Ok(_) => {}
            Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
            Err(err) => return Err(err),
        }
    }
}
