//! The real redirection: remocal's tc classifiers attached with tcx to every
//! interface of a target namespace, steering new connections of a stolen port
//! to our listener through a sock hash, and copying connections of a mirrored
//! port into a ring buffer.
//!
//! One copy of the programs and maps is loaded per target namespace (an
//! [`Attachment`]), shared by that namespace's sessions and dropped with the
//! last one. tcx links are plain file descriptors of this process: when the
//! agent exits, even by SIGKILL, the kernel detaches everything at once.
use std::{
    collections::HashMap,
    net::SocketAddr,
    os::fd::{AsFd as _, AsRawFd as _, OwnedFd},
    sync::{Arc, Mutex, Weak},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{HashMap as BpfHashMap, Map, MapData, PerCpuArray, RingBuf, SockHash},
    programs::{Program, ProgramError, SchedClassifier, SkLookup, SockOps},
};
use aya_log::EbpfLogger;
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric as _},
    metrics::{MetricType, counter::ConstCounter},
};
use remocal_agent_common::{
    COUNTERS_MAP, Counter, FLOW_PORTS_MAP, FLOW_PROGRAM, FLOW_STATS_MAP, FlowKey, FlowStats,
    MIRROR_EVENTS_MAP, MIRROR_PORTS_MAP, MIRROR_PROGRAM, MIRROR_RESET_PROGRAM, PortKey,
    STEAL_LISTENERS_MAP, STEAL_LOOKUP_PROGRAM, STEAL_PROGRAM, TARGET_NETNS_COOKIE,
};
use tokio::{io::unix::AsyncFd, runtime::Handle, task::JoinHandle};
use tracing::{info, warn};

use super::{
    ActiveRedirection, RedirectError, Redirection, Redirector,
    flow_ports::FlowPorts,
    listener::steal_listener,
    session_links::{SessionKind, SessionLinks},
};
use crate::{
    bpf_counters::total,
    live_session::FlowStatsSource,
    mirror::{
        Tap,
        capture_ring::{self, Taps},
    },
    netns::{Netns, NsId},
    reset_existing::{EndWith, PodConnections, PodSockets, ResetError},
};

static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/remocal"));

pub(super) const PRIVILEGE_HINT: &str = "run remocal-agent as root (it needs CAP_BPF, CAP_NET_ADMIN and CAP_SYS_ADMIN) on Linux 6.6 or newer";

pub struct EbpfRedirector {
    runtime: Handle,
    /// Bytes of each namespace's capture ring buffer.
    capture_buffer: u32,
    shared: Arc<Shared>,
    /// Held while a namespace's programs load (the verifier takes tens of
    /// milliseconds), and only on the blocking threads sessions start on:
    /// the map in [`Shared`] is locked just to look up and insert, so a
    /// metrics scrape on the async runtime never waits for a load.
    loading: Mutex<()>,
}

/// What the metrics collector reads too.
#[derive(Default)]
struct Shared {
    attachments: Mutex<HashMap<NsId, Weak<Attachment>>>,
    /// Counter totals of attachments already gone, so that the exported
    /// counters never go down when a namespace is detached.
    retired: Mutex<[u64; Counter::ALL.len()]>,
}

impl EbpfRedirector {
    /// Loads the programs once through the verifier, so a missing capability
    /// or an unsuitable kernel is reported when the agent starts rather than
    /// at a developer's first session.
    pub fn new(runtime: Handle, capture_buffer: u32) -> Result<Self, RedirectError> {
        {
            let (mut ebpf, _logger) = load(capture_buffer, 0)?;
            load_programs(&mut ebpf)?;
        }
        // Parsing the kernel's BTF took tens of MiB that are free now.
        crate::memory::release_free();
        Ok(Self {
            runtime,
            capture_buffer,
            shared: Arc::default(),
            loading: Mutex::default(),
        })
    }

    /// The kernel's per-CPU counters, summed over CPUs and namespaces, for
    /// the metrics endpoint.
    pub fn kernel_counters(&self) -> KernelCounters {
        KernelCounters(self.shared.clone())
    }

    fn attachment_for(&self, target: &Netns) -> Result<Arc<Attachment>, RedirectError> {
        let _loading = self.loading.lock().expect("loading lock");
        {
            let mut attachments = self.shared.attachments.lock().expect("attachments lock");
            attachments.retain(|_, attachment| attachment.strong_count() > 0);
            if let Some(existing) = attachments.get(&target.id()).and_then(Weak::upgrade) {
                return Ok(existing);
            }
        }
        let attachment = Arc::new(Attachment::new(
            target,
            &self.runtime,
            self.capture_buffer,
            self.shared.clone(),
        )?);
        self.shared
            .attachments
            .lock()
            .expect("attachments lock")
            .insert(target.id(), Arc::downgrade(&attachment));
        crate::memory::release_free();
        Ok(attachment)
    }
}

impl FlowStatsSource for EbpfRedirector {
    fn flow_stats(&self, target: NsId, local: SocketAddr, remote: SocketAddr) -> Option<FlowStats> {
        let attachment = self
            .shared
            .attachments
            .lock()
            .expect("attachments lock")
            .get(&target)
            .and_then(Weak::upgrade)?;
        // A dual-stack socket sees an IPv4 peer as ::ffff:a.b.c.d.
        [(local, remote), (mapped(local), mapped(remote))]
            .into_iter()
            .find_map(|(local, remote)| attachment.flows.get(&flow_key(local, remote), 0).ok())
    }
}

impl Redirector for EbpfRedirector {
    fn steal(&self, target: &Netns, port: u16) -> Result<Redirection, RedirectError> {
        let attachment = self.attachment_for(target)?;
        let links = LinkUse::acquire(&attachment, target, SessionKind::Steal)?;
        let listener = target
            .run_in(steal_listener)
            .and_then(|created| created)
            .map_err(|source| RedirectError::Listener {
                target: target.to_string(),
                source,
            })
            .and_then(|listener| {
                attachment
                    .listeners
                    .lock()
                    .expect("listeners lock")
                    .insert(PortKey { port }, listener.as_raw_fd(), 0)
                    .map_err(|err| {
                        RedirectError::kernel("registering the steal listener failed", err)
                    })?;
                Ok(listener)
            })?;
        Ok(Redirection {
            listener,
            active: ActiveRedirection::new(StolenPort {
                attachment,
                port,
                _links: links,
            }),
        })
    }

    fn pod_connections(
        &self,
        target: &Netns,
        port: u16,
        ending: Option<EndWith>,
    ) -> Result<Box<dyn PodConnections>, ResetError> {
        Ok(Box::new(PodSockets::open(target, port, ending)?))
    }

    fn mirror(&self, target: &Netns, port: u16) -> Result<Tap, RedirectError> {
        let attachment = self.attachment_for(target)?;
        let links = LinkUse::acquire(&attachment, target, SessionKind::Mirror)?;
        attachment.flow_ports.add(port)?;
        let (id, captures, queued, lost) = attachment.taps.add(port);
        let mirrored = MirroredPort {
            attachment,
            id,
            port,
            _links: links,
        };
        mirrored.attachment.start_capture()?;
        mirrored
            .attachment
            .mirror_ports
            .lock()
            .expect("mirror ports lock")
            .insert(PortKey { port }, 1, 0)
            .map_err(|err| RedirectError::kernel("registering the mirrored port failed", err))?;
        Ok(Tap::new(
            captures,
            queued,
            lost,
            ActiveRedirection::new(mirrored),
        ))
    }
}

/// The programs and maps serving one target namespace.
struct Attachment {
    target: String,
    listeners: Mutex<SockHash<MapData, PortKey>>,
    mirror_ports: Mutex<BpfHashMap<MapData, PortKey, u8>>,
    flows: BpfHashMap<MapData, FlowKey, FlowStats>,
    flow_ports: FlowPorts,
    taps: Arc<Taps>,
    counters: Arc<PerCpuArray<MapData, u64>>,
    /// The capture ring, mapped into our memory (twice its size of resident
    /// pages) only while a mirror session reads it.
    ring: OwnedFd,
    capture_reader: Mutex<Option<capture_ring::Reader>>,
    /// Owns the programs and, through them, every link.
    links: Mutex<SessionLinks>,
    log_drain: JoinHandle<()>,
    shared: Arc<Shared>,
}

impl Attachment {
    fn new(
        target: &Netns,
        runtime: &Handle,
        capture_buffer: u32,
        shared: Arc<Shared>,
    ) -> Result<Self, RedirectError> {
        let cookie = target
            .run_in(netns_cookie)
            .and_then(|cookie| cookie)
            .map_err(|err| {
                RedirectError::kernel(
                    format!("reading the namespace cookie of {target} failed"),
                    err,
                )
            })?;
        let (mut ebpf, logger) = load(capture_buffer, cookie)?;
        let log_drain = runtime.spawn(drain_logs(logger));
        load_programs(&mut ebpf)?;
        let interfaces = target
            .run_in(interfaces)
            .map_err(|err| RedirectError::kernel(format!("entering {target} failed"), err))??;
        program::<SkLookup>(&mut ebpf, STEAL_LOOKUP_PROGRAM)?
            .attach(target)
            .map_err(|err| {
                RedirectError::kernel(
                    format!("attaching the socket lookup program to {target} failed"),
                    err,
                )
            })?;
        info!(%target, interfaces = %interfaces.join(","), "programs loaded (sk_lookup attached; the classifiers and sock_ops attach with the sessions that need them)");
        let flows = BpfHashMap::try_from(take_map(&mut ebpf, FLOW_STATS_MAP)?).map_err(|err| {
            RedirectError::kernel("the flow statistics map has the wrong type", err)
        })?;
        let flow_ports = BpfHashMap::try_from(take_map(&mut ebpf, FLOW_PORTS_MAP)?)
            .map_err(|err| RedirectError::kernel("the flow port map has the wrong type", err))?;
        let listeners = SockHash::try_from(take_map(&mut ebpf, STEAL_LISTENERS_MAP)?)
            .map_err(|err| RedirectError::kernel("the listener map has the wrong type", err))?;
        let mirror_ports = BpfHashMap::try_from(take_map(&mut ebpf, MIRROR_PORTS_MAP)?)
            .map_err(|err| RedirectError::kernel("the mirror port map has the wrong type", err))?;
        let ring = match take_map(&mut ebpf, MIRROR_EVENTS_MAP)? {
            Map::RingBuf(ring) => ring.fd().as_fd().try_clone_to_owned().map_err(|err| {
                RedirectError::kernel("duplicating the capture ring's descriptor failed", err)
            })?,
            _ => {
                return Err(RedirectError::kernel(
                    "the capture ring has the wrong type",
                    MIRROR_EVENTS_MAP,
                ));
            }
        };
        let counters = Arc::new(
            PerCpuArray::try_from(take_map(&mut ebpf, COUNTERS_MAP)?)
                .map_err(|err| RedirectError::kernel("the counter map has the wrong type", err))?,
        );
        let taps = Arc::new(Taps::default());
        Ok(Self {
            target: target.to_string(),
            listeners: Mutex::new(listeners),
            mirror_ports: Mutex::new(mirror_ports),
            flows,
            flow_ports: FlowPorts::new(flow_ports),
            taps,
            counters,
            ring,
            capture_reader: Mutex::default(),
            links: Mutex::new(SessionLinks::new(ebpf, interfaces)),
            log_drain,
            shared,
        })
    }

    fn total(&self, counter: Counter) -> u64 {
        total(&self.counters, counter)
    }

    /// Maps the capture ring and starts reading it, unless that is running.
    /// Records still in the ring predate every current tap and are skipped.
    fn start_capture(&self) -> Result<(), RedirectError> {
        let mut reader = self.capture_reader.lock().expect("capture reader lock");
        if reader.is_some() {
            return Ok(());
        }
        let mapped = self
            .ring
            .try_clone()
            .map_err(|err| {
                RedirectError::kernel("duplicating the capture ring's descriptor failed", err)
            })
            .and_then(|fd| {
                MapData::from_fd(fd)
                    .map_err(|err| RedirectError::kernel("opening the capture ring failed", err))
            })
            .and_then(|ring| {
                RingBuf::try_from(Map::RingBuf(ring))
                    .map_err(|err| RedirectError::kernel("mapping the capture ring failed", err))
            });
        let mut ring = mapped?;
        while ring.next().is_some() {}
        let started = capture_ring::spawn_reader(ring, self.counters.clone(), self.taps.clone())
            .map_err(|err| RedirectError::kernel("starting the capture reader failed", err))?;
        *reader = Some(started);
        Ok(())
    }

    /// Stops reading (and unmaps) the capture ring once no tap is left.
    fn stop_capture_if_unused(&self) {
        let mut reader = self.capture_reader.lock().expect("capture reader lock");
        if self.taps.is_empty() {
            drop(reader.take());
        }
    }
}

fn mapped(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V4(v4) => SocketAddr::new(v4.ip().to_ipv6_mapped().into(), v4.port()),
        v6 => v6,
    }
}

/// The key a socket with these addresses has in the flow statistics.
fn flow_key(local: SocketAddr, remote: SocketAddr) -> FlowKey {
    fn words(addr: SocketAddr) -> [u32; 4] {
        match addr {
            SocketAddr::V4(v4) => [u32::from_ne_bytes(v4.ip().octets()), 0, 0, 0],
            SocketAddr::V6(v6) => {
                let octets = v6.ip().octets();
                std::array::from_fn(|i| {
                    u32::from_ne_bytes(octets[i * 4..i * 4 + 4].try_into().expect("4 bytes"))
                })
            }
        }
    }
    FlowKey {
        local_ip: words(local),
        remote_ip: words(remote),
        local_port: local.port(),
        remote_port: remote.port(),
    }
}

impl Drop for Attachment {
    fn drop(&mut self) {
        self.log_drain.abort();
        drop(
            self.capture_reader
                .get_mut()
                .expect("capture reader lock")
                .take(),
        );
        let mut retired = self.shared.retired.lock().expect("retired lock");
        for (total, counter) in retired.iter_mut().zip(Counter::ALL) {
            *total += self.total(counter);
        }
        drop(retired);
        info!(
            target = %self.target,
            packets = self.total(Counter::PacketsSeen),
            redirected = self.total(Counter::ConnectionsRedirected),
            lookups_failed = self.total(Counter::LookupsFailed),
            lookups_answered = self.total(Counter::LookupsAnswered),
            captures_dropped = self.total(Counter::CaptureDropped),
            "programs detached"
        );
    }
}

/// Removes the port from the sock hash: from then on new connections go to
/// the pod again.
struct StolenPort {
    attachment: Arc<Attachment>,
    port: u16,
    /// Dropped after the port is removed (fields drop after `drop`).
    _links: LinkUse,
}

impl Drop for StolenPort {
    fn drop(&mut self) {
        let removed = self
            .attachment
            .listeners
            .lock()
            .expect("listeners lock")
            .remove(&PortKey { port: self.port });
        if let Err(err) = removed {
            // The kernel drops a closed socket from the map by itself.
            warn!(target = %self.attachment.target, port = self.port, %err, "removing the steal listener failed");
        }
    }
}

/// Exports the kernel's counters as `remocal_ebpf_packets_total{program,verdict}`.
pub struct KernelCounters(Arc<Shared>);

impl std::fmt::Debug for KernelCounters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("KernelCounters")
    }
}

impl KernelCounters {
    fn totals(&self) -> [u64; Counter::ALL.len()] {
        let mut totals = *self.0.retired.lock().expect("retired lock");
        let live: Vec<Arc<Attachment>> = self
            .0
            .attachments
            .lock()
            .expect("attachments lock")
            .values()
            .filter_map(Weak::upgrade)
            .collect();
        for attachment in live {
            for (total, counter) in totals.iter_mut().zip(Counter::ALL) {
                *total += attachment.total(counter);
            }
        }
        totals
    }
}

impl Collector for KernelCounters {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let totals = self.totals();
        let mut family = encoder.encode_descriptor(
            "ebpf_packets",
            "What the eBPF programs did, by program and verdict",
            None,
            MetricType::Counter,
        )?;
        for (counter, total) in Counter::ALL.into_iter().zip(totals) {
            let (program, verdict) = match counter {
                Counter::PacketsSeen => (STEAL_PROGRAM, "seen"),
                Counter::ConnectionsRedirected => (STEAL_PROGRAM, "redirected"),
                Counter::LookupsFailed => (STEAL_PROGRAM, "lookup_failed"),
                Counter::LookupsAnswered => (STEAL_LOOKUP_PROGRAM, "redirected"),
                Counter::CaptureDropped => (MIRROR_PROGRAM, "dropped"),
            };
            let labels = [("program", program), ("verdict", verdict)];
            ConstCounter::new(total).encode(family.encode_family(&labels)?)?;
        }
        Ok(())
    }
}

/// Stops the copies for one mirror session; the port stays in the kernel's
/// set while other sessions mirror it.
struct MirroredPort {
    attachment: Arc<Attachment>,
    id: u64,
    port: u16,
    /// Dropped after the port is removed (fields drop after `drop`).
    _links: LinkUse,
}

/// One session's use of the programs of its kind: the first use attaches
/// them, the last one dropped detaches them.
struct LinkUse {
    attachment: Arc<Attachment>,
    kind: SessionKind,
}

impl LinkUse {
    fn acquire(
        attachment: &Arc<Attachment>,
        target: &Netns,
        kind: SessionKind,
    ) -> Result<Self, RedirectError> {
        attachment
            .links
            .lock()
            .expect("links lock")
            .acquire(kind, target)?;
        Ok(Self {
            attachment: attachment.clone(),
            kind,
        })
    }
}

impl Drop for LinkUse {
    fn drop(&mut self) {
        self.attachment
            .links
            .lock()
            .expect("links lock")
            .release(self.kind);
    }
}

impl Drop for MirroredPort {
    fn drop(&mut self) {
        if self.attachment.taps.remove(self.id) {
            let removed = self
                .attachment
                .mirror_ports
                .lock()
                .expect("mirror ports lock")
                .remove(&PortKey { port: self.port });
            if let Err(err) = removed {
                warn!(target = %self.attachment.target, port = self.port, %err, "removing the mirrored port failed");
            }
        }
        self.attachment.stop_capture_if_unused();
        self.attachment.flow_ports.remove(self.port);
    }
}

/// The logger must exist before the programs load (it owns the log map they
/// reference) and must be drained for as long as they run.
fn load(
    capture_buffer: u32,
    netns_cookie: u64,
) -> Result<(Ebpf, EbpfLogger<&'static dyn log::Log>), RedirectError> {
    let mut ebpf = EbpfLoader::new()
        .map_max_entries(MIRROR_EVENTS_MAP, capture_buffer)
        .override_global(TARGET_NETNS_COOKIE, &netns_cookie, true)
        .load(EBPF_OBJECT)
        .map_err(|err| {
            RedirectError::kernel(
                format!("loading the eBPF object failed ({PRIVILEGE_HINT})"),
                err,
            )
        })?;
    let logger = EbpfLogger::init(&mut ebpf)
        .map_err(|err| RedirectError::kernel("setting up eBPF logging failed", err))?;
    Ok((ebpf, logger))
}

fn load_programs(ebpf: &mut Ebpf) -> Result<(), RedirectError> {
    for name in [STEAL_PROGRAM, MIRROR_PROGRAM, MIRROR_RESET_PROGRAM] {
        program::<SchedClassifier>(ebpf, name)?
            .load()
            .map_err(|err| refused(name, err))?;
    }
    program::<SkLookup>(ebpf, STEAL_LOOKUP_PROGRAM)?
        .load()
        .map_err(|err| refused(STEAL_LOOKUP_PROGRAM, err))?;
    program::<SockOps>(ebpf, FLOW_PROGRAM)?
        .load()
        .map_err(|err| refused(FLOW_PROGRAM, err))
}

/// The namespace's cookie, as `bpf_get_netns_cookie` reports it; runs inside it.
fn netns_cookie() -> std::io::Result<u64> {
    const SO_NETNS_COOKIE: libc::c_int = 71;
    let socket = std::net::UdpSocket::bind("127.0.0.1:0")
        .or_else(|_| std::net::UdpSocket::bind("[::1]:0"))?;
    let mut cookie = 0u64;
    let mut len = size_of::<u64>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `cookie`.
    let result = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&raw mut cookie).cast(),
            &mut len,
        )
    };
    if result != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(cookie)
}

/// The root of the cgroup v2 hierarchy, where the flow statistics program
/// sees every socket of the node.
pub(super) fn cgroup_root() -> Result<std::fs::File, RedirectError> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")
        .map_err(|err| RedirectError::kernel("reading /proc/self/mountinfo failed", err))?;
    let root = mountinfo
        .lines()
        .find_map(|line| {
            let (mount, fs) = line.split_once(" - ")?;
            fs.starts_with("cgroup2 ")
                .then(|| mount.split(' ').nth(4).map(str::to_string))?
        })
        .ok_or_else(|| {
            RedirectError::kernel(
                "no cgroup v2 hierarchy is mounted",
                "mount cgroup2 (the agent needs it for flow statistics)",
            )
        })?;
    std::fs::File::open(&root)
        .map_err(|err| RedirectError::kernel(format!("opening the cgroup root {root} failed"), err))
}

fn take_map(ebpf: &mut Ebpf, name: &str) -> Result<Map, RedirectError> {
    ebpf.take_map(name)
        .ok_or_else(|| RedirectError::kernel("the eBPF object lacks a map", name))
}

pub(super) fn program<'e, P>(ebpf: &'e mut Ebpf, name: &str) -> Result<&'e mut P, RedirectError>
where
    &'e mut P: TryFrom<&'e mut Program, Error = ProgramError>,
{
    ebpf.program_mut(name)
        .ok_or_else(|| RedirectError::kernel("the eBPF object lacks a program", name))?
        .try_into()
        .map_err(|err| RedirectError::kernel(format!("the program {name} has the wrong type"), err))
}

fn refused(name: &str, err: ProgramError) -> RedirectError {
    RedirectError::kernel(
        format!("the kernel refused the program {name} ({PRIVILEGE_HINT})"),
        err,
    )
}

/// Runs inside the target namespace: interface names resolve there. The
/// mirror comes first so that it sees every packet the steal program sees.
/// The target's interfaces but loopback: the classifiers go on each.
fn interfaces() -> Result<Vec<String>, RedirectError> {
    let interfaces: Vec<String> = nix::net::if_::if_nameindex()
        .map_err(|err| RedirectError::kernel("listing the target's interfaces failed", err))?
        .iter()
        .map(|interface| interface.name().to_string_lossy().into_owned())
        .filter(|name| name != "lo")
        .collect();
    if interfaces.is_empty() {
        return Err(RedirectError::NoInterfaces {
            target: "the target namespace".into(),
        });
    }
    Ok(interfaces)
}

async fn drain_logs(logger: EbpfLogger<&'static dyn log::Log>) {
    // SAFETY: the logger owns its ring buffer fd, which stays open for as long
    // as the AsyncFd owns the logger.
    let registered =
        unsafe { AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE) };
    let mut logger = match registered {
        Ok(logger) => logger,
        Err(err) => return warn!(%err, "eBPF log messages will not be shown"),
    };
    loop {
        let Ok(mut ready) = logger.readable_mut().await else {
            return;
        };
        ready.get_inner_mut().flush();
        ready.clear_ready();
    }
}
