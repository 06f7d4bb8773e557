//! Which ports of which namespaces this agent has open for pass-through, so
//! a port's rule stays while any of its `Passthrough`s lives and a
//! namespace's shared route while any of its ports is open.
//!
//! One lock for the whole agent, held across the netlink requests that add
//! or remove rules: an open and a drop in the same namespace can never
//! interleave (a drop removing the route an open just counted on). The
//! requests take microseconds, and nothing on a connection's path takes it.
use std::{
    collections::HashMap,
    os::fd::AsFd,
    sync::{Mutex, MutexGuard, PoisonError},
};

/// A namespace's identity: (device, inode) of its nsfs file.
pub type NsKey = (u64, u64);

pub fn ns_key(fd: impl AsFd) -> std::io::Result<NsKey> {
    let stat = nix::sys::stat::fstat(fd).map_err(std::io::Error::from)?;
    Ok((stat.st_dev, stat.st_ino))
}

#[derive(Default)]
pub struct Open(HashMap<NsKey, HashMap<u16, usize>>);

static OPEN: Mutex<Option<Open>> = Mutex::new(None);

/// What a release leaves without holders.
pub struct Released {
    pub rule: bool,
    pub route: bool,
}

pub struct Guard(MutexGuard<'static, Option<Open>>);

/// The registry, locked; a panic while it was held leaves counts that are
/// still the best knowledge there is, so poisoning is ignored.
pub fn lock() -> Guard {
    Guard(OPEN.lock().unwrap_or_else(PoisonError::into_inner))
}

impl Guard {
    fn open(&mut self) -> &mut Open {
        self.0.get_or_insert_with(Open::default)
    }

    pub fn add(&mut self, ns: NsKey, port: u16) {
        *self
            .open()
            .0
            .entry(ns)
            .or_default()
            .entry(port)
            .or_default() += 1;
    }

    pub fn release(&mut self, ns: NsKey, port: u16) -> Released {
        let open = self.open();
        let Some(ports) = open.0.get_mut(&ns) else {
            return Released {
                rule: false,
                route: false,
            };
        };
        let rule = match ports.get_mut(&port) {
            Some(holders) if *holders > 1 => {
                *holders -= 1;
                false
            }
            Some(_) => {
                ports.remove(&port);
                true
            }
            None => false,
        };
        let route = ports.is_empty();
        if route {
            open.0.remove(&ns);
        }
        Released { rule, route }
    }

    pub fn has(&mut self, ns: NsKey) -> bool {
        self.open().0.contains_key(&ns)
    }
}
