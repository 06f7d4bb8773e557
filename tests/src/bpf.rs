//! Which eBPF programs are attached to a namespace: with tcx to its interfaces, and
//! as socket-lookup programs to the namespace itself.
//!
//! This asks the kernel directly (`BPF_PROG_QUERY` on `BPF_TCX_INGRESS`/`EGRESS`, as
//! `bpftool net show` does from bpftool 7.3 on) because the bpftool of the distribution
//! this runs on (7.1) predates tcx and lists no tcx attachment at all, which would make
//! "nothing stays attached" pass vacuously.

use std::ffi::CStr;
use std::io;
use std::os::fd::{FromRawFd, OwnedFd};

use crate::netns::Netns;

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_PROG_GET_FD_BY_ID: libc::c_long = 13;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_PROG_QUERY: libc::c_long = 16;
const BPF_LINK_CREATE: libc::c_long = 28;

const BPF_PROG_TYPE_SCHED_CLS: u32 = 3;
const BPF_TCX_INGRESS: u32 = 46;
const BPF_TCX_EGRESS: u32 = 47;
const BPF_SK_LOOKUP: u32 = 36;

/// One program attached to one interface (or, for sk_lookup, to the namespace:
/// `interface` is then "netns").
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TcxProgram {
    pub interface: String,
    pub direction: &'static str,
    pub name: String,
}

/// Every tcx attachment (ingress and egress) on every interface of `netns`, and
/// every sk_lookup program attached to `netns`.
pub fn tcx_programs(netns: &Netns) -> Vec<TcxProgram> {
    netns
        .run(query_here)
        .unwrap_or_else(|e| panic!("query tcx programs in {}: {e}", netns.name()))
}

/// Human-readable list for failure messages.
pub fn describe(programs: &[TcxProgram]) -> String {
    if programs.is_empty() {
        return "none".to_string();
    }
    programs
        .iter()
        .map(|p| format!("{} on {} {}", p.name, p.interface, p.direction))
        .collect::<Vec<_>>()
        .join(", ")
}

fn query_here() -> io::Result<Vec<TcxProgram>> {
    let mut found = Vec::new();
    for (ifindex, interface) in interfaces()? {
        for (attach_type, direction) in [(BPF_TCX_INGRESS, "ingress"), (BPF_TCX_EGRESS, "egress")] {
            for id in attached_ids(ifindex, attach_type)? {
                found.push(TcxProgram {
                    interface: interface.clone(),
                    direction,
                    name: program_name(id)?,
                });
            }
        }
    }
    let netns = std::fs::File::open("/proc/thread-self/ns/net")?;
    let netns_fd = std::os::fd::AsRawFd::as_raw_fd(&netns) as u32;
    for id in attached_ids(netns_fd, BPF_SK_LOOKUP)? {
        found.push(TcxProgram {
            interface: "netns".into(),
            direction: "sk_lookup",
            name: program_name(id)?,
        });
    }
    Ok(found)
}

fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<libc::c_long> {
    // SAFETY: attr is a #[repr(C)] prefix of the kernel's union bpf_attr for `cmd`; the
    // kernel reads and writes at most size_of::<T>() bytes of it.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut T as *mut libc::c_void,
            std::mem::size_of::<T>() as libc::c_uint,
        )
    };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

fn interfaces() -> io::Result<Vec<(u32, String)>> {
    // SAFETY: if_nameindex returns an array terminated by a zero entry, freed below.
    unsafe {
        let list = libc::if_nameindex();
        if list.is_null() {
            return Err(io::Error::last_os_error());
        }
        let mut result = Vec::new();
        let mut entry = list;
        while (*entry).if_index != 0 {
            let name = CStr::from_ptr((*entry).if_name)
                .to_string_lossy()
                .into_owned();
            result.push(((*entry).if_index, name));
            entry = entry.add(1);
        }
        libc::if_freenameindex(list);
        Ok(result)
    }
}

#[repr(C)]
#[derive(Default)]
struct QueryAttr {
    target_ifindex: u32,
    attach_type: u32,
    query_flags: u32,
    attach_flags: u32,
    prog_ids: u64,
    prog_cnt: u32,
    _pad: u32,
    prog_attach_flags: u64,
    link_ids: u64,
    link_attach_flags: u64,
    revision: u64,
}

/// `target` is an ifindex for tcx, a namespace fd for sk_lookup (the kernel's
/// attr field is a union of both).
fn attached_ids(target: u32, attach_type: u32) -> io::Result<Vec<u32>> {
    let mut ids = [0u32; 64];
    let mut attr = QueryAttr {
        target_ifindex: target,
        attach_type,
        prog_ids: ids.as_mut_ptr() as u64,
        prog_cnt: ids.len() as u32,
        ..Default::default()
    };
    bpf(BPF_PROG_QUERY, &mut attr)?;
    Ok(ids[..attr.prog_cnt as usize].to_vec())
}

#[repr(C)]
#[derive(Default)]
struct GetFdByIdAttr {
    id: u32,
    next_id: u32,
    open_flags: u32,
}

#[repr(C)]
#[derive(Default)]
struct InfoAttr {
    bpf_fd: u32,
    info_len: u32,
    info: u64,
}

fn program_name(id: u32) -> io::Result<String> {
    let mut attr = GetFdByIdAttr {
        id,
        ..Default::default()
    };
    // SAFETY: a successful BPF_PROG_GET_FD_BY_ID returns a new descriptor we own.
    let fd = unsafe { OwnedFd::from_raw_fd(bpf(BPF_PROG_GET_FD_BY_ID, &mut attr)? as i32) };
    // struct bpf_prog_info up to and including `name[16]` at offset 64.
    let mut info = [0u8; 80];
    let mut attr = InfoAttr {
        bpf_fd: std::os::fd::AsRawFd::as_raw_fd(&fd) as u32,
        info_len: info.len() as u32,
        info: info.as_mut_ptr() as u64,
    };
    bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr)?;
    let name = &info[64..80];
    let end = name.iter().position(|&b| b == 0).unwrap_or(name.len());
    Ok(String::from_utf8_lossy(&name[..end]).into_owned())
}

#[repr(C)]
#[derive(Default)]
struct ProgLoadAttr {
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
}

#[repr(C)]
#[derive(Default)]
struct LinkCreateAttr {
    prog_fd: u32,
    target_ifindex: u32,
    attach_type: u32,
    flags: u32,
    relative_fd: u32,
    _pad: u32,
    expected_revision: u64,
}

/// Attaches a do-nothing program (it returns TCX_NEXT) named `name` to `interface`'s
/// ingress in `netns`, for as long as the returned link lives. It exists so the
/// harness can prove that [`tcx_programs`] does see attachments.
pub fn attach_pass_through(netns: &Netns, interface: &str, name: &str) -> OwnedFd {
    assert!(name.len() < 16, "bpf program names are at most 15 bytes");
    netns
        .run(|| -> io::Result<OwnedFd> {
            // r0 = -1 (TCX_NEXT); exit
            let insns: [u64; 2] = [
                u64::from_le_bytes([0xb7, 0x00, 0, 0, 0xff, 0xff, 0xff, 0xff]),
                u64::from_le_bytes([0x95, 0, 0, 0, 0, 0, 0, 0]),
            ];
            let license = c"GPL";
            let mut prog_name = [0u8; 16];
            prog_name[..name.len()].copy_from_slice(name.as_bytes());
            let mut load = ProgLoadAttr {
                prog_type: BPF_PROG_TYPE_SCHED_CLS,
                insn_cnt: insns.len() as u32,
                insns: insns.as_ptr() as u64,
                license: license.as_ptr() as u64,
                prog_name,
                ..Default::default()
            };
            // SAFETY: BPF_PROG_LOAD returns a new descriptor we own.
            let prog = unsafe { OwnedFd::from_raw_fd(bpf(BPF_PROG_LOAD, &mut load)? as i32) };
            let ifindex = interfaces()?
                .into_iter()
                .find(|(_, n)| n == interface)
                .map(|(index, _)| index)
                .ok_or_else(|| io::Error::other(format!("no interface {interface}")))?;
            let mut link = LinkCreateAttr {
                prog_fd: std::os::fd::AsRawFd::as_raw_fd(&prog) as u32,
                target_ifindex: ifindex,
                attach_type: BPF_TCX_INGRESS,
                ..Default::default()
            };
            // SAFETY: BPF_LINK_CREATE returns a new descriptor we own.
            Ok(unsafe { OwnedFd::from_raw_fd(bpf(BPF_LINK_CREATE, &mut link)? as i32) })
        })
        .unwrap_or_else(|e| panic!("attach test program in {}: {e}", netns.name()))
}
