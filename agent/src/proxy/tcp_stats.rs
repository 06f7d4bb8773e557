//! The kernel's TCP statistics of a stolen connection, read from the socket
//! the agent owns (`TCP_INFO`) when the connection ends. Stolen connections
//! need no sock_ops callbacks for this: those ran on every ACK and cost the
//! data path a map update per segment.
use std::{mem, os::fd::AsRawFd as _};

use remocal_agent_common::FlowStats;
use tokio::net::TcpStream;

pub fn read(stream: &TcpStream) -> Option<FlowStats> {
    // SAFETY: tcp_info is plain old data, and the kernel writes at most
    // `length` bytes of it.
    let mut info: libc::tcp_info = unsafe { mem::zeroed() };
    let mut length = mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: a valid socket descriptor and a buffer of `length` bytes.
    let result = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&raw mut info).cast(),
            &mut length,
        )
    };
    (result == 0).then_some(FlowStats {
        srtt_us: info.tcpi_rtt,
        total_retrans: info.tcpi_total_retrans,
        bytes_acked: info.tcpi_bytes_acked,
        bytes_received: info.tcpi_bytes_received,
    })
}
