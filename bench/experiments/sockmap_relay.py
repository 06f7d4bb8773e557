#!/usr/bin/env python3
"""A one-off experiment, not part of the product or the benchmark: the best
any pass-through could do if its bytes never reached userspace. Each
accepted connection and its connection to the server go into a sockhash
whose sk_skb stream-verdict program sends every byte arriving on one socket
out of the other, in the kernel (keys: the client's port, tagged with bit
30, for accepted sockets; our own port for outgoing ones). Python and a hand-assembled
program, so it needs no toolchain. Measured against direct and against
`remocal-bench relay` with wrk, inside a throwaway network namespace; the
README's filtered-steal section has the figures.

Usage (as root, in a namespace of its own): sockmap_relay.py LISTEN_PORT TO_PORT
(both on 127.0.0.1). It relays keep-alive traffic; a FIN is not carried.
The measurement, in that namespace (`ip netns add X; ip netns exec X ...`,
with `ip link set lo up` first): a server on 127.0.0.1:TO_PORT
(`remocal-bench serve-http --listen 127.0.0.1:TO_PORT --body x`), this relay
and `remocal-bench relay --listen 127.0.0.1:P --to 127.0.0.1:TO_PORT` in
front of it, and `wrk -t2 -c8 -d5s` against each of the three in
turn, alternating the order between rounds."""
import ctypes, os, socket, struct, sys

libc = ctypes.CDLL(None, use_errno=True)
NR_BPF = 321
BPF_MAP_CREATE, BPF_MAP_UPDATE_ELEM, BPF_PROG_LOAD, BPF_PROG_ATTACH = 0, 2, 5, 8


def bpf(cmd, attr):
    buf = ctypes.create_string_buffer(attr, 128)
    r = libc.syscall(NR_BPF, cmd, buf, 128)
    if r < 0:
        e = ctypes.get_errno()
        raise OSError(e, f"bpf({cmd}): {os.strerror(e)}")
    return r


def map_create(mtype, ksize, vsize, n):
    return bpf(BPF_MAP_CREATE, struct.pack("IIII", mtype, ksize, vsize, n))


def map_update(fd, key, value):
    k = ctypes.create_string_buffer(key)
    v = ctypes.create_string_buffer(value)
    bpf(BPF_MAP_UPDATE_ELEM, struct.pack("IIQQQ", fd, 0, ctypes.addressof(k), ctypes.addressof(v), 0))


def insn(code, dst=0, src=0, off=0, imm=0):
    return struct.pack("<BBhi", code, (src << 4) | dst, off, imm)


def ld_map(dst, fd):
    return insn(0x18, dst, 1, 0, fd) + insn(0, 0, 0, 0, 0)


def program(listen_port, peers, sockhash):
    p = []
    p.append(insn(0xBF, 6, 1))                 # r6 = r1
    p.append(insn(0x61, 2, 6, 136))            # r2 = skb->local_port
    p.append(insn(0x55, 2, 0, 6, listen_port)) # if r2 != listen goto +6
    p.append(insn(0x61, 2, 6, 132))            # r2 = skb->remote_port (raw)
    p.append(insn(0xBF, 3, 2))                 # r3 = r2
    p.append(insn(0x77, 3, 0, 0, 16))          # r3 >>= 16
    p.append(insn(0x4F, 2, 3))                 # r2 |= r3
    p.append(insn(0x57, 2, 0, 0, 0xFFFF))      # r2 &= 0xffff
    p.append(insn(0x47, 2, 0, 0, 0x40000000))  # r2 |= inbound mark
    p.append(insn(0x63, 10, 2, -4))            # *(u32*)(r10-4) = r2
    p.append(ld_map(1, peers))                 # r1 = peers (2 slots)
    p.append(insn(0xBF, 2, 10))                # r2 = r10
    p.append(insn(0x07, 2, 0, 0, -4))          # r2 += -4
    p.append(insn(0x85, 0, 0, 0, 1))           # call map_lookup_elem
    p.append(insn(0x15, 0, 0, 10, 0))          # if r0 == 0 goto pass (+10)
    p.append(insn(0x61, 3, 0, 0))              # r3 = *(u32*)r0
    p.append(insn(0x63, 10, 3, -8))            # *(u32*)(r10-8) = r3
    p.append(insn(0xBF, 1, 6))                 # r1 = r6
    p.append(ld_map(2, sockhash))              # r2 = sockhash (2 slots)
    p.append(insn(0xBF, 3, 10))                # r3 = r10
    p.append(insn(0x07, 3, 0, 0, -8))          # r3 += -8
    p.append(insn(0xB7, 4, 0, 0, 0))           # r4 = 0 (egress)
    p.append(insn(0x85, 0, 0, 0, 72))          # call sk_redirect_hash
    p.append(insn(0x95))                       # exit
    p.append(insn(0xB7, 0, 0, 0, 1))           # pass: r0 = SK_PASS
    p.append(insn(0x95))                       # exit
    return b"".join(p)


def load(code):
    lic = ctypes.create_string_buffer(b"GPL")
    prog = ctypes.create_string_buffer(code)
    log = ctypes.create_string_buffer(65536)
    attr = struct.pack("IIQQIIQ", 14, len(code) // 8, ctypes.addressof(prog), ctypes.addressof(lic), 1, 65536, ctypes.addressof(log))
    try:
        return bpf(BPF_PROG_LOAD, attr)
    except OSError:
        print(log.value.decode(), file=sys.stderr)
        raise


def main():
    if len(sys.argv) != 3 or not all(arg.isdigit() for arg in sys.argv[1:]):
        sys.exit("usage: sockmap_relay.py LISTEN_PORT TO_PORT (as root, in a namespace of its own)")
    listen_port, to_port = int(sys.argv[1]), int(sys.argv[2])
    peers = map_create(1, 4, 4, 65536)
    sockhash = map_create(18, 4, 4, 65536)
    prog = load(program(listen_port, peers, sockhash))
    bpf(BPF_PROG_ATTACH, struct.pack("IIII", sockhash, prog, 5, 0))
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", listen_port))
    srv.listen(1024)
    keep = []
    print("ready", flush=True)
    while True:
        inbound, (_, cport) = srv.accept()
        outbound = socket.create_connection(("127.0.0.1", to_port))
        for s in (inbound, outbound):
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        kin = struct.unpack("<I", struct.pack("<HH", socket.htons(cport), 0))[0] | 0x40000000
        kout = outbound.getsockname()[1]
        map_update(peers, struct.pack("<I", kin), struct.pack("<I", kout))
        map_update(peers, struct.pack("<I", kout), struct.pack("<I", kin))
        try:
            map_update(sockhash, struct.pack("<I", kin), struct.pack("<I", inbound.fileno()))
            map_update(sockhash, struct.pack("<I", kout), struct.pack("<I", outbound.fileno()))
        except OSError as err:
            print("skipped a connection:", err, file=sys.stderr)
            inbound.close(); outbound.close()
            continue
        # Bytes that arrived before the sockets were in the map.
        inbound.setblocking(False)
        try:
            early = inbound.recv(65536)
            if early:
                outbound.sendall(early)
        except BlockingIOError:
            pass
        keep.append((inbound, outbound))


main()
