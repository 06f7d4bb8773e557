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

/// A throwaway namespace with a server's listener on loopback, its
/// iterator and a sock_diag socket there.
struct Loopback {
    // Drop order: the sockets and the iterator, then the namespace.
    iterator: DestroyIterator,
    diag: SockDiag,
    listener: TcpListener,
    netns: Netns,
    _ns: TestNs,
}

impl Loopback {
    fn new() -> Self {
        let ns = TestNs::new();
        let netns = ns.netns();
        Self {
            iterator: DestroyIterator::load(&netns).expect("this kernel has bpf_sock_destroy"),
            diag: netns.run_in(SockDiag::open_here).unwrap().unwrap(),
            listener: netns
                .run_in(|| TcpListener::bind("127.0.0.1:0"))
                .unwrap()
                .unwrap(),
            netns,
            _ns: ns,
        }
    }

    /// A new connection (the client's socket made in the namespace too).
    fn exchanged(&mut self) -> Exchanged {
        let addr = self.listener.local_addr().unwrap();
        let mut client = self
            .netns
            .run_in(|| TcpStream::connect(addr))
            .unwrap()
            .unwrap();
        let (mut served, _) = self.listener.accept().unwrap();
        client.write_all(b"ping").unwrap();
        served.read_exact(&mut [0; 4]).unwrap();
        served.write_all(b"pong!").unwrap();
        client.read_exact(&mut [0; 5]).unwrap();
        let socket = self
            .diag
            .find(served.local_addr().unwrap(), served.peer_addr().unwrap())
            .unwrap();
        Exchanged {
            client,
            served,
            socket,
        }
    }
}

fn judged(socket: &TcpSocket) -> (&TcpSocket, Proof) {
    (socket, Proof::Judged)
}

#[test]
fn ends_only_connections_still_as_judged() {
    let mut pod = Loopback::new();

    let mut idle = pod.exchanged();
    // A request that came in after the look, even one the pod already read.
    let mut spoken = pod.exchanged();
    spoken.client.write_all(b"again").unwrap();
    spoken.served.read_exact(&mut [0; 5]).unwrap();
    // One whose bytes wait unread (delivered: loopback may defer it).
    let mut unread = pod.exchanged();
    unread.client.write_all(b"unread").unwrap();
    wait_for("the unread bytes delivered", || {
        pod.diag
            .find(unread.socket.local, unread.socket.remote)
            .is_ok_and(|now| now.unread == 6)
    });
    // One the pod wrote more to that is not sent yet: the client's window
    // is shut (it reads nothing), so the pod's next bytes stay queued.
    let mut queued = pod.exchanged();
    fill_the_window(&mut queued, &mut pod.diag);
    // One the pod answered more to since the look.
    let mut answering = pod.exchanged();
    answering.served.write_all(b"more").unwrap();
    answering.client.read_exact(&mut [0; 4]).unwrap();
    // One closed since the look, and gone.
    let closed = pod.exchanged();
    let closed_socket = closed.socket.clone();
    drop(closed);
    // (A lookup by its addresses then finds the listener.)
    wait_for("the closed socket gone", || {
        !pod.diag
            .find(closed_socket.local, closed_socket.remote)
            .is_ok_and(|now| now.cookie == closed_socket.cookie)
    });

    let outcomes = pod
        .iterator
        .end(&[
            judged(&idle.socket),
            judged(&spoken.socket),
            judged(&unread.socket),
            judged(&answering.socket),
            judged(&queued.socket),
            judged(&closed_socket),
        ])
        .unwrap();
    assert_eq!(
        outcomes,
        [
            Outcome::Ended,
            Outcome::Busy,
            Outcome::Busy,
            Outcome::Busy,
            Outcome::Busy,
            Outcome::Unreached
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
    let spoken_now = pod
        .diag
        .find(spoken.socket.local, spoken.socket.remote)
        .unwrap();
    assert_eq!(
        pod.iterator.end(&[judged(&spoken_now)]).unwrap(),
        [Outcome::Ended]
    );
    let err = spoken.client.read(&mut [0; 8]).unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::ConnectionReset, "{err}");
}

/// Where the look cannot order request and answer, the socket decides: a
/// connection whose client acknowledged the answer after its request ends,
/// one whose request was read and not answered stays, however quiet.
#[test]
fn an_answer_the_look_could_not_see_is_proven_by_the_socket() {
    let mut pod = Loopback::new();

    let mut answered = pod.exchanged();
    // The client's acknowledgement of the answer may be delayed.
    wait_for("the answer acknowledged", || {
        pod.diag
            .find(answered.socket.local, answered.socket.remote)
            .is_ok_and(|now| now.unacknowledged == 0)
    });
    answered.socket = pod
        .diag
        .find(answered.socket.local, answered.socket.remote)
        .unwrap();
    let mut asked = pod.exchanged();
    asked.client.write_all(b"a request").unwrap();
    asked.served.read_exact(&mut [0; 9]).unwrap();
    asked.socket = pod
        .diag
        .find(asked.socket.local, asked.socket.remote)
        .unwrap();

    let proof = Proof::KernelMustShowAnswer;
    let outcomes = pod
        .iterator
        .end(&[(&answered.socket, proof), (&asked.socket, proof)])
        .unwrap();
    assert_eq!(outcomes, [Outcome::Ended, Outcome::Busy]);
    let err = answered.client.read(&mut [0; 8]).unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::ConnectionReset, "{err}");
    // The request in progress is answered over its connection.
    asked.served.write_all(b"the answer").unwrap();
    asked.client.read_exact(&mut [0; 10]).unwrap();
}

#[test]
fn the_program_is_what_the_layout_says() {
    let btf = KernelBtf::load().unwrap();
    let layout = Layout::of(&btf).unwrap();
    let map = bpf_syscall::HashMap::create(8, size_of::<Expectation>(), 1).unwrap();
    let insns = program(&layout, map.fd());
    assert_eq!(insns.len(), 46);
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

/// Polls `condition` for up to 5 s: loopback delivery and closing finish
/// soon, later on a loaded machine.
fn wait_for(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while !condition() {
        assert!(
            std::time::Instant::now() < deadline,
            "{what}: not within 5 s"
        );
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
}

/// Makes the pod's side of `connection` hold written bytes it cannot send
/// (the client reads nothing, its receive window closes), and takes its
/// look again: the byte counts match it, so only the check of what waits
/// unsent keeps the connection from being ended.
fn fill_the_window(connection: &mut Exchanged, diag: &mut SockDiag) {
    let socket = socket2::SockRef::from(&connection.served);
    socket.set_nonblocking(true).unwrap();
    let chunk = [0u8; 64 * 1024];
    // Until the send buffer is full and nothing more is accepted.
    loop {
        match connection.served.write(&chunk) {
            Ok(_) => {}
            Err(err) if err.kind() == io::ErrorKind::WouldBlock => break,
            Err(err) => panic!("{err}"),
        }
    }
    connection.socket = diag
        .find(connection.socket.local, connection.socket.remote)
        .unwrap();
    assert!(
        connection
            .socket
            .activity
            .is_some_and(|seen| seen.unsent > 0),
        "bytes wait unsent: {:?}",
        connection.socket
    );
}
