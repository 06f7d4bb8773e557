//! The steal listeners, shared by the classifier and the socket-lookup
//! program: the agent keeps one listener per stolen port in this namespace.
use core::{ffi::c_void, ptr};

use aya_ebpf::{
    bindings::bpf_sock,
    helpers::{bpf_map_lookup_elem, bpf_sk_release},
    macros::map,
    maps::SockHash,
};
use remocal_agent_common::{MAX_STOLEN_PORTS, PortKey};

/// Stolen port → the agent's listener socket inside this namespace. The
/// agent inserts the listener when a session starts and removes it when the
/// session ends; membership is the whole configuration.
#[map(name = "STEAL_LISTENERS")]
pub static STEAL_LISTENERS: SockHash<PortKey> = SockHash::with_max_entries(MAX_STOLEN_PORTS, 0);

/// Looks the port up in the sock hash; a hit is a referenced socket the
/// caller must release.
#[inline(always)]
pub fn lookup_listener(key: &PortKey) -> Option<*mut bpf_sock> {
    let map = ptr::addr_of!(STEAL_LISTENERS).cast_mut().cast::<c_void>();
    // SAFETY: `SockHash` is a transparent wrapper around its map definition,
    // so its address is the map pointer the helper expects.
    let sk = unsafe { bpf_map_lookup_elem(map, ptr::from_ref(key).cast()) };
    (!sk.is_null()).then_some(sk.cast())
}

#[inline(always)]
pub fn release(sk: *mut bpf_sock) {
    // SAFETY: every caller owns a reference obtained from a lookup helper.
    unsafe { bpf_sk_release(sk.cast()) };
}
