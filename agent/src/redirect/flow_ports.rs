//! The ports whose connections the flow statistics program follows: every
//! mirrored port of a namespace, counted, because several sessions can
//! mirror one port. (Stolen connections are the agent's own sockets, whose
//! statistics it reads with TCP_INFO.)
use std::{collections::HashMap, sync::Mutex};

use aya::maps::{HashMap as BpfHashMap, MapData};
use remocal_agent_common::PortKey;
use tracing::warn;

use super::RedirectError;

pub struct FlowPorts {
    kernel: Mutex<Counted>,
}

/// The kernel's set, and how many steals and mirrors use each port in it.
type Counted = (BpfHashMap<MapData, PortKey, u8>, HashMap<u16, usize>);

impl FlowPorts {
    pub fn new(map: BpfHashMap<MapData, PortKey, u8>) -> Self {
        Self {
            kernel: Mutex::new((map, HashMap::new())),
        }
    }

    /// Before the port is stolen or mirrored, so its first connection is
    /// followed from its handshake on.
    pub fn add(&self, port: u16) -> Result<(), RedirectError> {
        let mut guard = self.kernel.lock().expect("flow ports lock");
        let (map, uses) = &mut *guard;
        let count = uses.entry(port).or_default();
        if *count == 0 {
            map.insert(PortKey { port }, 1, 0).map_err(|err| {
                RedirectError::kernel("registering the port for flow statistics failed", err)
            })?;
        }
        *count += 1;
        Ok(())
    }

    pub fn remove(&self, port: u16) {
        let mut guard = self.kernel.lock().expect("flow ports lock");
        let (map, uses) = &mut *guard;
        let Some(count) = uses.get_mut(&port) else {
            return;
        };
        *count -= 1;
        if *count == 0 {
            uses.remove(&port);
            if let Err(err) = map.remove(&PortKey { port }) {
                warn!(port, %err, "removing the port from flow statistics failed");
            }
        }
    }
}
