//! Ending the pod's idle connections in the kernel: an `iter/tcp` program
//! walks the sockets of the pod's namespace and calls the `bpf_sock_destroy`
//! kfunc (kernel 6.5+) on those userspace judged idle, while it holds each
//! socket's lock, and only if the socket is still exactly as judged:
//! nothing unread, nothing waiting in its backlog, nothing written and not
//! yet sent, and not one byte received or sent since the look. A request
//! that arrives between the look and the end (even one the pod already
//! read), or an answer the pod starts writing then, saves the connection,
//! which netlink's SOCK_DESTROY, ending whatever the socket is by then,
//! cannot promise.
//!
//! aya 0.14 cannot relocate kfunc calls, so the program is assembled here
//! (46 instructions) with the BTF ids and field offsets of the running
//! kernel, and loaded with bpf(2) directly (see [`crate::bpf_syscall`]).
use std::{io, os::fd::OwnedFd, sync::OnceLock};

use crate::{
    bpf_syscall::{self, Insn},
    kernel_btf::KernelBtf,
    netns::Netns,
    sock_diag::TcpSocket,
};

/// Connections one walk can end; more are ended in several walks.
const PER_WALK: usize = 256;

/// The map `expectations`: socket cookie → what the look saw of the
/// connection (filled in by userspace), and what the program did (filled
/// in by the program).
type Cookie = [u8; 8];

#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct Expectation {
    bytes_received: u64,
    bytes_sent: u64,
    /// [`NOT_WALKED`], [`ENDED`] or [`CHANGED`].
    outcome: u64,
    /// bpf_sock_destroy's answer when ENDED: 0, or a negative errno.
    error: i64,
    /// 1: end it only if the socket shows that the server answered.
    needs_proof: u64,
}

/// How sure userspace is that a connection it hands over is idle.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Proof {
    /// Its look showed the server answered the client's last data.
    Judged,
    /// The look could not order request and answer (one tick): the program
    /// ends it only if the client's last segment came after all its data
    /// and acknowledged everything the server sent.
    KernelMustShowAnswer,
}

const NOT_WALKED: u64 = 0;
const ENDED: u64 = 1;
const CHANGED: u64 = 2;

/// What became of a connection handed over to be ended (to
/// [`DestroyIterator::end`], or to netlink).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Ended,
    /// It was not as judged any more (traffic since the look), or the proof
    /// it needed was not there: left open.
    Busy,
    /// The walk did not reach it: closed meanwhile, or passed over (a walk
    /// is not guaranteed to see every socket of a busy table); the next
    /// look tells.
    Unreached,
    /// Netlink found no such socket: closed meanwhile.
    Gone,
}

pub struct DestroyIterator {
    netns: Netns,
    expectations: bpf_syscall::HashMap,
    link: OwnedFd,
    _program: OwnedFd,
}

/// Why the kernel path is unavailable (an older kernel, no BTF, a kernel
/// built without the kfunc): the netlink path serves instead.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Unavailable(String);

impl DestroyIterator {
    /// Loads the program for sockets of `netns`; the verifier checks the
    /// kfunc call here, so a kernel that cannot run it is known at once.
    pub fn load(netns: &Netns) -> Result<Self, Unavailable> {
        let unavailable =
            |what: &str, err: &dyn std::fmt::Display| Unavailable(format!("{what}: {err}"));
        // The kernel's BTF (5 MB here) is read once per agent: it does not
        // change while the kernel runs.
        static LAYOUT: OnceLock<Layout> = OnceLock::new();
        let layout = match LAYOUT.get() {
            Some(layout) => layout,
            // A failure is not kept: the next reset reads again.
            None => {
                let read = KernelBtf::load()
                    .and_then(|btf| Layout::of(&btf))
                    .map_err(|err| unavailable("kernel BTF", &err))?;
                LAYOUT.get_or_init(|| read)
            }
        };
        let expectations = bpf_syscall::HashMap::create(
            size_of::<Cookie>(),
            size_of::<Expectation>(),
            PER_WALK as u32,
        )
        .map_err(|err| unavailable("creating its map", &err))?;
        let insns = program(layout, expectations.fd());
        let program = bpf_syscall::load_iterator("remocal_end_idle", &insns, layout.iter_tcp)
            .map_err(|err| unavailable("loading the socket iterator", &err))?;
        let link = bpf_syscall::attach_iterator(&program)
            .map_err(|err| unavailable("attaching the socket iterator", &err))?;
        Ok(Self {
            netns: netns
                .try_clone()
                .map_err(|err| unavailable("the target's namespace", &err))?,
            expectations,
            link,
            _program: program,
        })
    }

    /// Ends each of `sockets` that is still as it was when looked at; one
    /// outcome per socket, in order.
    pub fn end(&self, sockets: &[(&TcpSocket, Proof)]) -> io::Result<Vec<Outcome>> {
        let mut outcomes = Vec::with_capacity(sockets.len());
        for walk in sockets.chunks(PER_WALK) {
            let found = self.walk(walk);
            // The map is left empty whatever happened.
            for (socket, _) in walk {
                self.expectations.delete(&key(socket))?;
            }
            outcomes.extend(found?);
        }
        Ok(outcomes)
    }

    fn walk(&self, sockets: &[(&TcpSocket, Proof)]) -> io::Result<Vec<Outcome>> {
        for (socket, proof) in sockets {
            // A socket without tcp_info is never judged idle; if one came
            // here, no byte count would match and it would stay open.
            let activity = socket.activity;
            let expected = Expectation {
                bytes_received: activity.map_or(u64::MAX, |seen| seen.bytes_received),
                bytes_sent: activity.map_or(u64::MAX, |seen| seen.bytes_sent),
                needs_proof: u64::from(*proof == Proof::KernelMustShowAnswer),
                ..Expectation::default()
            };
            self.expectations
                .update(&key(socket), bytes_of(&expected))?;
        }
        self.netns
            .run_in(|| bpf_syscall::run_iterator(&self.link))
            .and_then(|walked| walked)?;
        sockets
            .iter()
            .map(|(socket, _)| {
                let mut found = Expectation::default();
                let known = self
                    .expectations
                    .lookup(&key(socket), bytes_of_mut(&mut found))?;
                // bpf_sock_destroy returns an int: the register's upper
                // half is not its.
                let error = found.error as i32;
                Ok(match (known, found.outcome) {
                    (true, ENDED) if error != 0 => {
                        return Err(io::Error::from_raw_os_error(error.saturating_neg()));
                    }
                    (true, ENDED) => Outcome::Ended,
                    (true, CHANGED) => Outcome::Busy,
                    (false, _) | (true, NOT_WALKED) => Outcome::Unreached,
                    (true, other) => {
                        return Err(io::Error::other(format!("unknown outcome {other}")));
                    }
                })
            })
            .collect()
    }
}

/// The map's key for a socket: its cookie as the kernel's u64. sock_diag
/// gives it as two u32s, the low one first.
fn key(socket: &TcpSocket) -> Cookie {
    let half = |at: usize| {
        u64::from(u32::from_ne_bytes(
            socket.cookie[at..at + 4].try_into().expect("4 bytes"),
        ))
    };
    (half(4) << 32 | half(0)).to_ne_bytes()
}

fn bytes_of(value: &Expectation) -> &[u8] {
    // SAFETY: a `#[repr(C)]` struct of four 8-byte integers has no padding.
    unsafe {
        std::slice::from_raw_parts(std::ptr::from_ref(value).cast(), size_of::<Expectation>())
    }
}

fn bytes_of_mut(value: &mut Expectation) -> &mut [u8] {
    // SAFETY: as above, and every bit pattern is a valid Expectation.
    unsafe {
        std::slice::from_raw_parts_mut(std::ptr::from_mut(value).cast(), size_of::<Expectation>())
    }
}

/// What the program needs from the running kernel's BTF.
struct Layout {
    iter_tcp: u32,
    sock_destroy: u32,
    copied_seq: i16,
    rcv_nxt: i16,
    backlog_len: i16,
    write_seq: i16,
    snd_nxt: i16,
    snd_una: i16,
    snd_wl1: i16,
    bytes_received: i16,
    bytes_sent: i16,
}

impl Layout {
    fn of(btf: &KernelBtf) -> Result<Self, crate::kernel_btf::BtfError> {
        let field = |path: &[&str]| -> Result<i16, crate::kernel_btf::BtfError> {
            let offset = btf.offset_of("tcp_sock", path)?;
            i16::try_from(offset).map_err(|_| {
                crate::kernel_btf::BtfError::Missing(format!(
                    "tcp_sock.{} within reach of one instruction",
                    path.join(".")
                ))
            })
        };
        Ok(Self {
            iter_tcp: btf.function("bpf_iter_tcp")?,
            sock_destroy: btf.function("bpf_sock_destroy")?,
            copied_seq: field(&["copied_seq"])?,
            rcv_nxt: field(&["rcv_nxt"])?,
            backlog_len: field(&["inet_conn", "icsk_inet", "sk", "sk_backlog", "len"])?,
            write_seq: field(&["write_seq"])?,
            snd_nxt: field(&["snd_nxt"])?,
            snd_una: field(&["snd_una"])?,
            snd_wl1: field(&["snd_wl1"])?,
            bytes_received: field(&["bytes_received"])?,
            bytes_sent: field(&["bytes_sent"])?,
        })
    }
}

// Registers and the instruction encodings used (linux/bpf_common.h).
const R0: u8 = 0;
const R1: u8 = 1;
const R2: u8 = 2;
const R6: u8 = 6;
const R7: u8 = 7;
const R8: u8 = 8;
const R10: u8 = 10;
const LDX_W: u8 = 0x61;
const LDX_DW: u8 = 0x79;
const STX_DW: u8 = 0x7b;
const ST_DW: u8 = 0x7a;
const MOV_X: u8 = 0xbf;
const MOV_K: u8 = 0xb7;
const ADD_K: u8 = 0x07;
const JEQ_K: u8 = 0x15;
const JNE_K: u8 = 0x55;
const JNE_X: u8 = 0x5d;
const JA: u8 = 0x05;
const CALL: u8 = 0x85;
const EXIT: u8 = 0x95;
const LD_IMM64: u8 = 0x18;
const PSEUDO_MAP_FD: u8 = 1;
const PSEUDO_KFUNC_CALL: u8 = 2;
// Helpers (enum bpf_func_id). In a tracing program get_socket_cookie is
// bpf_get_socket_ptr_cookie, taking the iterator's sock_common.
const MAP_LOOKUP_ELEM: i32 = 1;
const GET_SOCKET_COOKIE: i32 = 46;
const SKC_TO_TCP_SOCK: i32 = 137;

fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> Insn {
    Insn {
        code,
        regs: dst | (src << 4),
        off,
        imm,
    }
}

/// Jump targets, resolved once the program is laid out.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Label {
    Changed,
    End,
    Out,
}

/// For each socket of the walk (ctx: struct bpf_iter__tcp):
///
/// ```text
/// sk = ctx->sk_common; if !sk: out
/// expected = expectations[bpf_get_socket_cookie(sk)]; if !expected: out
/// tp = bpf_skc_to_tcp_sock(sk); if !tp: out
/// if tp->copied_seq != tp->rcv_nxt || tp->sk_backlog.len != 0
///    || tp->write_seq != tp->snd_nxt
///    || tp->bytes_received != expected->bytes_received
///    || tp->bytes_sent != expected->bytes_sent
///    || expected->needs_proof
///       && (tp->snd_wl1 != tp->rcv_nxt || tp->snd_una != tp->snd_nxt):
///    expected->outcome = CHANGED; out
/// expected->error = bpf_sock_destroy(sk); expected->outcome = ENDED
/// out: return 0
/// ```
fn program(layout: &Layout, expectations: &OwnedFd) -> Vec<Insn> {
    use std::os::fd::AsRawFd as _;
    let mut program = Assembler::default();
    let p = &mut program;
    p.op(insn(LDX_DW, R6, R1, 8, 0)); // ctx->sk_common
    p.jump(insn(JEQ_K, R6, 0, 0, 0), Label::Out);
    p.op(insn(MOV_X, R1, R6, 0, 0));
    p.op(insn(CALL, 0, 0, 0, GET_SOCKET_COOKIE));
    p.op(insn(STX_DW, R10, R0, -8, 0));
    p.op(insn(
        LD_IMM64,
        R1,
        PSEUDO_MAP_FD,
        0,
        expectations.as_raw_fd(),
    ));
    p.op(Insn::default()); // the upper half of the 64-bit load
    p.op(insn(MOV_X, R2, R10, 0, 0));
    p.op(insn(ADD_K, R2, 0, 0, -8));
    p.op(insn(CALL, 0, 0, 0, MAP_LOOKUP_ELEM));
    p.jump(insn(JEQ_K, R0, 0, 0, 0), Label::Out);
    p.op(insn(MOV_X, R7, R0, 0, 0)); // expected
    p.op(insn(MOV_X, R1, R6, 0, 0));
    p.op(insn(CALL, 0, 0, 0, SKC_TO_TCP_SOCK));
    p.jump(insn(JEQ_K, R0, 0, 0, 0), Label::Out);
    p.op(insn(MOV_X, R8, R0, 0, 0)); // tp
    p.op(insn(LDX_W, R1, R8, layout.copied_seq, 0));
    p.op(insn(LDX_W, R2, R8, layout.rcv_nxt, 0));
    p.jump(insn(JNE_X, R1, R2, 0, 0), Label::Changed);
    p.op(insn(LDX_W, R1, R8, layout.backlog_len, 0));
    p.jump(insn(JNE_K, R1, 0, 0, 0), Label::Changed);
    p.op(insn(LDX_W, R1, R8, layout.write_seq, 0));
    p.op(insn(LDX_W, R2, R8, layout.snd_nxt, 0));
    p.jump(insn(JNE_X, R1, R2, 0, 0), Label::Changed);
    p.op(insn(LDX_DW, R1, R8, layout.bytes_received, 0));
    p.op(insn(LDX_DW, R2, R7, 0, 0));
    p.jump(insn(JNE_X, R1, R2, 0, 0), Label::Changed);
    p.op(insn(LDX_DW, R1, R8, layout.bytes_sent, 0));
    p.op(insn(LDX_DW, R2, R7, 8, 0));
    p.jump(insn(JNE_X, R1, R2, 0, 0), Label::Changed);
    p.op(insn(LDX_DW, R1, R7, 32, 0)); // expected->needs_proof
    p.jump(insn(JEQ_K, R1, 0, 0, 0), Label::End);
    p.op(insn(LDX_W, R1, R8, layout.snd_wl1, 0));
    p.op(insn(LDX_W, R2, R8, layout.rcv_nxt, 0));
    p.jump(insn(JNE_X, R1, R2, 0, 0), Label::Changed);
    p.op(insn(LDX_W, R1, R8, layout.snd_una, 0));
    p.op(insn(LDX_W, R2, R8, layout.snd_nxt, 0));
    p.jump(insn(JNE_X, R1, R2, 0, 0), Label::Changed);
    p.label(Label::End);
    p.op(insn(MOV_X, R1, R6, 0, 0));
    let kfunc = i32::try_from(layout.sock_destroy).expect("BTF ids fit in 31 bits");
    p.op(insn(CALL, 0, PSEUDO_KFUNC_CALL, 0, kfunc));
    p.op(insn(STX_DW, R7, R0, 24, 0)); // expected->error
    p.op(insn(ST_DW, R7, 0, 16, ENDED as i32)); // expected->outcome
    p.jump(insn(JA, 0, 0, 0, 0), Label::Out);
    p.label(Label::Changed);
    p.op(insn(ST_DW, R7, 0, 16, CHANGED as i32));
    p.label(Label::Out);
    p.op(insn(MOV_K, R0, 0, 0, 0));
    p.op(insn(EXIT, 0, 0, 0, 0));
    program.finish()
}

/// Instructions with forward jumps to labels, resolved at the end.
#[derive(Default)]
struct Assembler {
    code: Vec<(Insn, Option<Label>)>,
    labels: Vec<(Label, usize)>,
}

impl Assembler {
    fn op(&mut self, insn: Insn) {
        self.code.push((insn, None));
    }

    fn jump(&mut self, insn: Insn, to: Label) {
        self.code.push((insn, Some(to)));
    }

    fn label(&mut self, label: Label) {
        self.labels.push((label, self.code.len()));
    }

    fn finish(self) -> Vec<Insn> {
        let at = |label: Label| {
            self.labels
                .iter()
                .find(|(known, _)| *known == label)
                .map(|(_, at)| *at)
                .expect("every label is placed")
        };
        self.code
            .iter()
            .enumerate()
            .map(|(index, (insn, to))| match to {
                None => *insn,
                Some(label) => Insn {
                    off: i16::try_from(at(*label) as isize - index as isize - 1)
                        .expect("a short jump"),
                    ..*insn
                },
            })
            .collect()
    }
}

#[cfg(test)]
mod tests;
