//! A small blocking netlink client: enough for the pass-through's few routing
//! rules and routes, and for listing and ending a pod's TCP sockets
//! (sock_diag). Hand-rolled over libc because the messages are few and fixed,
//! and a netlink crate would bring a runtime and a large type surface for a
//! handful of message kinds.
//!
//! A netlink socket talks to the network namespace of the thread that created
//! it, for its whole life: callers create it on a thread that entered the
//! target namespace and may use it from any thread afterwards.
use std::{
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    time::Duration,
};

// From include/uapi/linux/netlink.h (libc does not carry all of them).
const NLMSG_HDRLEN: usize = 16;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
pub const NLM_F_REQUEST: u16 = 0x1;
pub const NLM_F_ACK: u16 = 0x4;
pub const NLM_F_DUMP: u16 = 0x300;
pub const NLM_F_REPLACE: u16 = 0x100;
pub const NLM_F_EXCL: u16 = 0x200;
pub const NLM_F_CREATE: u16 = 0x400;
/// In an error message: the original request was not echoed back.
const NLM_F_CAPPED: u16 = 0x100;
/// In an error message: extended-ack attributes follow.
const NLM_F_ACK_TLVS: u16 = 0x200;
const NLMSGERR_ATTR_MSG: u16 = 1;
const SOL_NETLINK: libc::c_int = 270;
const NETLINK_EXT_ACK: libc::c_int = 11;

/// How long one request may wait for the kernel's answer; it answers in
/// microseconds, so this only bounds a case that should never happen.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(2);
/// Room for one receive: the kernel fills dump answers up to about a page
/// per message batch, well below this.
const RECEIVE_BUFFER: usize = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    /// The kernel refused the request; `detail` is its extended-ack text.
    #[error("{}{}", io::Error::from_raw_os_error(*errno), detail.as_deref().map(|d| format!(": {d}")).unwrap_or_default())]
    Refused { errno: i32, detail: Option<String> },
    #[error("netlink: {0}")]
    Io(#[from] io::Error),
}

impl NetlinkError {
    pub fn errno(&self) -> Option<i32> {
        match self {
            NetlinkError::Refused { errno, .. } => Some(*errno),
            NetlinkError::Io(err) => err.raw_os_error(),
        }
    }
}

/// A request's body: the family header followed by attributes.
pub struct Message(Vec<u8>);

impl Message {
    pub fn new(header: &[u8]) -> Self {
        let mut bytes = header.to_vec();
        pad(&mut bytes);
        Self(bytes)
    }

    pub fn attr(mut self, kind: u16, value: &[u8]) -> Self {
        let len = u16::try_from(4 + value.len()).expect("netlink attribute fits in u16");
        self.0.extend_from_slice(&len.to_ne_bytes());
        self.0.extend_from_slice(&kind.to_ne_bytes());
        self.0.extend_from_slice(value);
        pad(&mut self.0);
        self
    }

    pub fn bytes(&self) -> &[u8] {
        &self.0
    }
}

fn pad(bytes: &mut Vec<u8>) {
    bytes.resize(bytes.len().next_multiple_of(4), 0);
}

/// The attributes after a family header of `header_len` bytes.
pub fn attributes(body: &[u8], header_len: usize) -> impl Iterator<Item = (u16, &[u8])> {
    let mut rest = body
        .get(header_len.next_multiple_of(4)..)
        .unwrap_or_default();
    std::iter::from_fn(move || {
        if rest.len() < 4 {
            return None;
        }
        let len = usize::from(u16::from_ne_bytes([rest[0], rest[1]]));
        let kind = u16::from_ne_bytes([rest[2], rest[3]]) & 0x3fff;
        if len < 4 || len > rest.len() {
            return None;
        }
        let value = &rest[4..len];
        rest = rest.get(len.next_multiple_of(4)..).unwrap_or_default();
        Some((kind, value))
    })
}

pub struct Netlink {
    fd: OwnedFd,
    seq: u32,
    buffer: Vec<u8>,
}

impl Netlink {
    /// A netlink socket of `protocol` (NETLINK_ROUTE, NETLINK_SOCK_DIAG) in
    /// the calling thread's network namespace.
    pub fn open(protocol: libc::c_int) -> io::Result<Self> {
        // SAFETY: plain socket(2); the result is checked before use.
        let raw = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                protocol,
            )
        };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `raw` is a fresh descriptor nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // The kernel's own words for a refusal ("FIB rule already exists"),
        // when it has them; an older kernel without them still works.
        let _ = set_int(&fd, SOL_NETLINK, NETLINK_EXT_ACK, 1);
        let timeout = libc::timeval {
            tv_sec: ANSWER_TIMEOUT.as_secs() as libc::time_t,
            tv_usec: 0,
        };
        set_option(&fd, libc::SOL_SOCKET, libc::SO_RCVTIMEO, &timeout)?;
        Ok(Self {
            fd,
            seq: 0,
            buffer: vec![0; RECEIVE_BUFFER],
        })
    }

    /// Sends one request and waits for the kernel's acknowledgement.
    pub fn request(&mut self, kind: u16, flags: u16, body: &Message) -> Result<(), NetlinkError> {
        let seq = self.send(kind, NLM_F_REQUEST | NLM_F_ACK | flags, body.bytes())?;
        self.receive(seq, |_, _| {})
    }

    /// Sends one request whose answer is a single message before the
    /// acknowledgement (an exact sock_diag lookup), and returns its body.
    pub fn query(&mut self, kind: u16, body: &Message) -> Result<Vec<u8>, NetlinkError> {
        let seq = self.send(kind, NLM_F_REQUEST | NLM_F_ACK, body.bytes())?;
        let mut answer = None;
        self.receive(seq, |_, body| {
            answer.get_or_insert_with(|| body.to_vec());
        })?;
        answer.ok_or_else(|| io::Error::other("the kernel acknowledged without answering").into())
    }

    /// Asks for a dump and hands every answer (message type, body) to `each`.
    pub fn dump(
        &mut self,
        kind: u16,
        header: &[u8],
        each: impl FnMut(u16, &[u8]),
    ) -> Result<(), NetlinkError> {
        let seq = self.send(
            kind,
            NLM_F_REQUEST | NLM_F_DUMP,
            Message::new(header).bytes(),
        )?;
        self.receive(seq, each)
    }

    fn send(&mut self, kind: u16, flags: u16, body: &[u8]) -> io::Result<u32> {
        self.seq = self.seq.wrapping_add(1);
        let len = u32::try_from(NLMSG_HDRLEN + body.len()).expect("netlink request fits in u32");
        let mut message = Vec::with_capacity(len as usize);
        message.extend_from_slice(&len.to_ne_bytes());
        message.extend_from_slice(&kind.to_ne_bytes());
        message.extend_from_slice(&flags.to_ne_bytes());
        message.extend_from_slice(&self.seq.to_ne_bytes());
        message.extend_from_slice(&0u32.to_ne_bytes());
        message.extend_from_slice(body);
        // The kernel's address (pid 0), so no connect or bind is needed.
        // SAFETY: an all-zero sockaddr_nl is valid; the family is set below.
        let mut kernel: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        kernel.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        loop {
            // SAFETY: the buffer and address are valid for the given lengths.
            let sent = unsafe {
                libc::sendto(
                    self.fd.as_raw_fd(),
                    message.as_ptr().cast(),
                    message.len(),
                    0,
                    (&raw const kernel).cast(),
                    size_of::<libc::sockaddr_nl>() as libc::socklen_t,
                )
            };
            if sent >= 0 {
                return Ok(self.seq);
            }
            let err = io::Error::last_os_error();
            if err.kind() != io::ErrorKind::Interrupted {
                return Err(err);
            }
        }
    }

    /// Reads answers to request `seq` until its acknowledgement or the end
    /// of its dump; answers to earlier requests (one that timed out) are
    /// skipped.
    fn receive(&mut self, seq: u32, mut each: impl FnMut(u16, &[u8])) -> Result<(), NetlinkError> {
        loop {
            // SAFETY: the buffer is valid for its length.
            let received = unsafe {
                libc::recv(
                    self.fd.as_raw_fd(),
                    self.buffer.as_mut_ptr().cast(),
                    self.buffer.len(),
                    0,
                )
            };
            if received < 0 {
                let err = io::Error::last_os_error();
                if err.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(err.into());
            }
            let mut rest = &self.buffer[..received as usize];
            while rest.len() >= NLMSG_HDRLEN {
                let len = u32::from_ne_bytes(rest[0..4].try_into().unwrap()) as usize;
                let kind = u16::from_ne_bytes([rest[4], rest[5]]);
                let flags = u16::from_ne_bytes([rest[6], rest[7]]);
                let answer_seq = u32::from_ne_bytes(rest[8..12].try_into().unwrap());
                if len < NLMSG_HDRLEN || len > rest.len() {
                    return Err(io::Error::other("truncated netlink answer").into());
                }
                let body = &rest[NLMSG_HDRLEN..len];
                rest = rest.get(len.next_multiple_of(4)..).unwrap_or_default();
                if answer_seq != seq {
                    continue;
                }
                match kind {
                    NLMSG_DONE => return done_status(body),
                    NLMSG_ERROR => return error_status(body, flags),
                    _ => each(kind, body),
                }
            }
        }
    }
}

fn done_status(body: &[u8]) -> Result<(), NetlinkError> {
    match body
        .get(..4)
        .map(|b| i32::from_ne_bytes(b.try_into().unwrap()))
    {
        Some(err) if err < 0 => Err(NetlinkError::Refused {
            errno: -err,
            detail: None,
        }),
        _ => Ok(()),
    }
}

/// An NLMSG_ERROR answer: error 0 is the acknowledgement.
fn error_status(body: &[u8], flags: u16) -> Result<(), NetlinkError> {
    let Some(code) = body.get(..4) else {
        return Err(io::Error::other("truncated netlink error").into());
    };
    let err = i32::from_ne_bytes(code.try_into().unwrap());
    if err == 0 {
        return Ok(());
    }
    let detail = (flags & NLM_F_ACK_TLVS != 0)
        .then(|| {
            // After the code comes the request's header, and its body unless
            // the kernel capped it.
            let echoed = if flags & NLM_F_CAPPED != 0 {
                NLMSG_HDRLEN
            } else {
                body.get(4..8).map_or(NLMSG_HDRLEN, |l| {
                    u32::from_ne_bytes(l.try_into().unwrap()) as usize
                })
            };
            attributes(body, 4 + echoed)
                .find(|(kind, _)| *kind == NLMSGERR_ATTR_MSG)
                .map(|(_, text)| {
                    String::from_utf8_lossy(text.split(|b| *b == 0).next().unwrap_or_default())
                        .into_owned()
                })
        })
        .flatten();
    Err(NetlinkError::Refused {
        errno: -err,
        detail,
    })
}

fn set_int(
    fd: &OwnedFd,
    level: libc::c_int,
    name: libc::c_int,
    value: libc::c_int,
) -> io::Result<()> {
    set_option(fd, level, name, &value)
}

fn set_option<T>(fd: &OwnedFd, level: libc::c_int, name: libc::c_int, value: &T) -> io::Result<()> {
    // SAFETY: `value` is valid for size_of::<T>() bytes.
    let result = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (value as *const T).cast(),
            size_of::<T>() as libc::socklen_t,
        )
    };
    if result < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}
