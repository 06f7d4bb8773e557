//! The program on the real kernel, over loopback sockets of a throwaway
//! namespace: the verifier accepts it, it walks that namespace, ends what is
//! as judged, and leaves alone what changed since the look or is gone.
use std::{
    io::{self, Read as _, Write as _},
    net::{TcpListener, TcpStream},
};

use super::*;
use crate::{
    netns::throwaway::TestNs,
    sock_diag::{SockDiag, TcpSocket},
};

/// A connection that carried one request and its answer, and the server's
/// side of it as a look sees it.
struct Exchanged {
    client: TcpStream,
    served: TcpStream,
    socket: TcpSocket,
}

/// The client's socket is made in `netns`, like the listener.
fn exchanged(netns: &Netns, listener: &TcpListener, diag: &mut SockDiag) -> Exchanged {
    let addr = listener.local_addr().unwrap();
    let mut client = netns.run_in(|| TcpStream::connect(addr)).unwrap().unwrap();
    let (mut served, _) = listener.accept().unwrap();
    client.write_all(b"ping").unwrap();
    served.read_exact(&mut [0; 4]).unwrap();
    served.write_all(b"pong!").unwrap();
    client.read_exact(&mut [0; 5]).unwrap();
    let socket = diag
        .find(served.local_addr().unwrap(), served.peer_addr().unwrap())
        .unwrap();
    Exchanged {
        client,
        served,
        socket,
    }
}

#[test]
fn ends_only_connections_still_as_judged() {
    let ns = TestNs::new();
    let netns = ns.netns();
    let iterator = DestroyIterator::load(&netns).expect("this kernel has bpf_sock_destroy");
    let mut diag = netns.run_in(SockDiag::open_here).unwrap().unwrap();
    let listener = netns
        .run_in(|| TcpListener::bind("127.0.0.1:0"))
        .unwrap()
        .unwrap();

    let mut idle = exchanged(&netns, &listener, &mut diag);
    // A request that came in after the look, even one the pod already read.
    let mut spoken = exchanged(&netns, &listener, &mut diag);
    spoken.client.write_all(b"again").unwrap();
    spoken.served.read_exact(&mut [0; 5]).unwrap();
    // One whose bytes wait unread.
    let mut unread = exchanged(&netns, &listener, &mut diag);
    unread.client.write_all(b"unread").unwrap();
    // One the pod answered more to since the look.
    let mut answering = exchanged(&netns, &listener, &mut diag);
    answering.served.write_all(b"more").unwrap();
    answering.client.read_exact(&mut [0; 4]).unwrap();
    // One closed since the look.
    let closed = exchanged(&netns, &listener, &mut diag);
    let closed_socket = closed.socket.clone();
    drop(closed);

    let outcomes = iterator
        .end(&[
            &idle.socket,
            &spoken.socket,
            &unread.socket,
            &answering.socket,
            &closed_socket,
        ])
        .unwrap();
    assert_eq!(
        outcomes,
        [
            Outcome::Ended,
            Outcome::Busy,
            Outcome::Busy,
            Outcome::Busy,
            Outcome::Gone
        ]
    );
    let err = idle.client.read(&mut [0; 8]).unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::ConnectionReset, "{err}");
    // The busy ones still carry their traffic.
    for survivor in [&mut spoken, &mut answering] {
        survivor.served.write_all(b"ok").unwrap();
        survivor.client.read_exact(&mut [0; 2]).unwrap();
    }
    unread.served.read_exact(&mut [0; 6]).unwrap();

    // Judged again now that they are quiet, they end.
    let spoken_now = diag
        .find(spoken.socket.local, spoken.socket.remote)
        .unwrap();
    assert_eq!(iterator.end(&[&spoken_now]).unwrap(), [Outcome::Ended]);
    let err = spoken.client.read(&mut [0; 8]).unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::ConnectionReset, "{err}");
}

#[test]
fn the_program_is_what_the_layout_says() {
    let btf = KernelBtf::load().unwrap();
    let layout = Layout::of(&btf).unwrap();
    let map = bpf_syscall::hash_map(8, size_of::<Expectation>(), 1).unwrap();
    let insns = program(&layout, &map);
    assert_eq!(insns.len(), 35);
    assert_eq!(insns.last().unwrap().code, EXIT);
    // Every jump lands inside the program, forward.
    for (index, insn) in insns.iter().enumerate() {
        if matches!(insn.code, JEQ_K | JNE_K | JNE_X | JA) {
            let target = index as isize + 1 + insn.off as isize;
            assert!(
                insn.off > 0 && (target as usize) < insns.len(),
                "{index}: {insn:?}"
            );
        }
    }
    let kfunc = insns
        .iter()
        .find(|insn| insn.code == CALL && insn.regs >> 4 == PSEUDO_KFUNC_CALL)
        .expect("one kfunc call");
    assert_eq!(kfunc.imm as u32, layout.sock_destroy);
}
