//! The routing rule (one per port and family) and local route (one per
//! family, shared by a namespace's ports) that deliver the pod's server's
//! answers to the agent's pass-through sockets, as netlink messages.
//!
//! Both carry remocal's protocol number, so they can be recognised and
//! removed in any namespace, and use a table of their own, so the route can
//! never shadow one of the pod's.
use crate::netlink::{
    Message, NLM_F_CREATE, NLM_F_EXCL, NLM_F_REPLACE, Netlink, NetlinkError, attributes,
};

/// Routing table of the local route: "REM", far from the ids pods and CNIs
/// use (main 254, local 255, small numbers for policy routing).
pub const TABLE: u32 = 0x52454d;
/// `protocol` of remocal's rules and routes: how they are recognised.
/// Unassigned in iproute2's rt_protos.
pub const PROTOCOL: u8 = 0x52;
/// Priority of the rules: after the local table's (0) and before the main
/// table's (32766), whose default route would otherwise be chosen and refused
/// for a loopback source; 0x524d ("RM") is far from the small priorities
/// policy-routing setups (Cilium, Istio) use.
pub const PRIORITY: u32 = 0x524d;

// From include/uapi/linux/rtnetlink.h and fib_rules.h.
const RTM_NEWROUTE: u16 = 24;
const RTM_DELROUTE: u16 = 25;
const RTM_GETROUTE: u16 = 26;
const RTM_NEWRULE: u16 = 32;
const RTM_DELRULE: u16 = 33;
const RTM_GETRULE: u16 = 34;
const RTA_OIF: u16 = 4;
const RTA_TABLE: u16 = 15;
const RT_SCOPE_HOST: u8 = 254;
const RTN_LOCAL: u8 = 2;
const FRA_SRC: u16 = 2;
const FRA_IIFNAME: u16 = 3;
const FRA_PRIORITY: u16 = 6;
const FRA_TABLE: u16 = 15;
const FRA_PROTOCOL: u16 = 21;
const FRA_IP_PROTO: u16 = 22;
const FRA_SPORT_RANGE: u16 = 23;
const FR_ACT_TO_TBL: u8 = 1;
/// Size of struct fib_rule_hdr and of struct rtmsg.
const HEADER_LEN: usize = 12;
/// The loopback device is always ifindex 1 in every network namespace
/// (LOOPBACK_IFINDEX): no lookup needed.
const LOOPBACK_IFINDEX: u32 = 1;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    pub const BOTH: [Family; 2] = [Family::V4, Family::V6];

    fn af(self) -> u8 {
        match self {
            Family::V4 => libc::AF_INET as u8,
            Family::V6 => libc::AF_INET6 as u8,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Family::V4 => "IPv4",
            Family::V6 => "IPv6",
        }
    }

    /// The server's answers come from a loopback address: 127.0.0.0/8 or
    /// ::1/128.
    fn loopback_source(self) -> (Vec<u8>, u8) {
        match self {
            Family::V4 => (vec![127, 0, 0, 0], 8),
            Family::V6 => (std::net::Ipv6Addr::LOCALHOST.octets().to_vec(), 128),
        }
    }
}

/// `from LOOPBACK iif lo ipproto tcp sport PORT lookup TABLE protocol 0x52`:
/// only the server's answers on `port` from loopback to a non-local address,
/// packets the kernel would otherwise refuse to route.
fn rule(family: Family, port: u16) -> Message {
    let (source, source_len) = family.loopback_source();
    // struct fib_rule_hdr: family, dst_len, src_len, tos, table (in an
    // attribute: it does not fit), res1, res2, action, flags.
    let mut header = [0; HEADER_LEN];
    header[0] = family.af();
    header[2] = source_len;
    header[7] = FR_ACT_TO_TBL;
    let ports = [port.to_ne_bytes(), port.to_ne_bytes()].concat();
    Message::new(&header)
        .attr(FRA_SRC, &source)
        .attr(FRA_IIFNAME, b"lo\0")
        .attr(FRA_PRIORITY, &PRIORITY.to_ne_bytes())
        .attr(FRA_TABLE, &TABLE.to_ne_bytes())
        .attr(FRA_PROTOCOL, &[PROTOCOL])
        .attr(FRA_IP_PROTO, &[libc::IPPROTO_TCP as u8])
        .attr(FRA_SPORT_RANGE, &ports)
}

/// `local default dev lo table TABLE proto 0x52`: everything looked up in
/// the table is delivered locally, to the pass-through socket bound to the
/// client's address.
fn route(family: Family) -> Message {
    // struct rtmsg: family, dst_len (0: default), src_len, tos, table (in
    // an attribute), protocol, scope, type, flags.
    let mut header = [0; HEADER_LEN];
    header[0] = family.af();
    header[5] = PROTOCOL;
    header[6] = RT_SCOPE_HOST;
    header[7] = RTN_LOCAL;
    Message::new(&header)
        .attr(RTA_TABLE, &TABLE.to_ne_bytes())
        .attr(RTA_OIF, &LOOPBACK_IFINDEX.to_ne_bytes())
}

/// Installs the shared route (replacing an identical leftover) and then the
/// port's rule (an identical leftover is kept: it is the same rule).
pub fn install(netlink: &mut Netlink, family: Family, port: u16) -> Result<(), NetlinkError> {
    netlink.request(RTM_NEWROUTE, NLM_F_CREATE | NLM_F_REPLACE, &route(family))?;
    match netlink.request(RTM_NEWRULE, NLM_F_CREATE | NLM_F_EXCL, &rule(family, port)) {
        Err(err) if err.errno() == Some(libc::EEXIST) => Ok(()),
        other => other,
    }
}

pub fn remove_rule(netlink: &mut Netlink, family: Family, port: u16) -> Result<(), NetlinkError> {
    netlink.request(RTM_DELRULE, 0, &rule(family, port))
}

pub fn remove_route(netlink: &mut Netlink, family: Family) -> Result<(), NetlinkError> {
    netlink.request(RTM_DELROUTE, 0, &route(family))
}

/// Removes every rule and route remocal tagged in the socket's namespace;
/// returns how many. A family the namespace does not have counts as empty.
pub fn remove_tagged(netlink: &mut Netlink) -> Result<usize, NetlinkError> {
    let mut removed = 0;
    for family in Family::BOTH {
        let mut header = [0; HEADER_LEN];
        header[0] = family.af();
        let mut found = Vec::new();
        let rules = netlink.dump(RTM_GETRULE, &header, |kind, body| {
            if kind == RTM_NEWRULE && rule_is_ours(body) {
                found.push((RTM_DELRULE, body.to_vec()));
            }
        });
        let routes = rules.and_then(|()| {
            netlink.dump(RTM_GETROUTE, &header, |kind, body| {
                if kind == RTM_NEWROUTE && route_is_ours(body) {
                    found.push((RTM_DELROUTE, body.to_vec()));
                }
            })
        });
        match routes {
            Err(err) if err.errno() == Some(libc::EAFNOSUPPORT) => continue,
            other => other?,
        }
        // What a dump returned is exactly what deletes it (as `ip rule
        // flush` and `ip route flush` do).
        for (kind, body) in found {
            match netlink.request(kind, 0, &Message::new(&body)) {
                // Gone meanwhile (rules say ENOENT, routes ESRCH).
                Err(err) if matches!(err.errno(), Some(libc::ENOENT | libc::ESRCH)) => {}
                other => {
                    other?;
                    removed += 1;
                }
            }
        }
    }
    Ok(removed)
}

/// Whether a dumped rule carries remocal's protocol and table (both in
/// attributes: the table does not fit the header's byte).
fn rule_is_ours(body: &[u8]) -> bool {
    let mut protocol = None;
    let mut table = None;
    for (kind, value) in attributes(body, HEADER_LEN) {
        match kind {
            FRA_PROTOCOL => protocol = value.first().copied(),
            FRA_TABLE => table = u32_of(value),
            _ => {}
        }
    }
    protocol == Some(PROTOCOL) && table == Some(TABLE)
}

/// Whether a dumped route carries remocal's protocol (header byte 5) and
/// table (an attribute).
fn route_is_ours(body: &[u8]) -> bool {
    body.get(5) == Some(&PROTOCOL)
        && attributes(body, HEADER_LEN)
            .any(|(kind, value)| kind == RTA_TABLE && u32_of(value) == Some(TABLE))
}

fn u32_of(value: &[u8]) -> Option<u32> {
    Some(u32::from_ne_bytes(value.try_into().ok()?))
}
