//! The eBPF datapath, user side: loads sluice's TC programs (`ebpf/tc`, embedded at build
//! time), pins them and their maps, attaches them to endpoints' host-side veths as
//! `cls_bpf` filters (to macvlan interfaces and VXLAN devices through TCX), and writes the
//! maps (endpoints, ipcache, policy) in the layouts of `sluice-common`.
//! [`compile`] turns policy rules into `POLICY` entries; it is pure.
//!
//! Owns no decisions about *which* endpoint gets which identity or flags (that is the
//! driver's), and never touches links other than through its attachments.
//!
//! # Per-packet cost
//! Fixed, whatever the number of rules: `ENDPOINTS` (hash) → `IPCACHE` (LPM) →
//! `CONNTRACK` (LRU hash) → at most two `POLICY` LPM lookups (peer identity, then
//! [`IDENTITY_ANY`](sluice_common::IDENTITY_ANY)) → one conntrack insert for a new allowed
//! flow → one per-CPU counter update. See `ebpf/tc/src/main.rs` for the order.
//!
//! # Pins
//! Under the pin directory (default [`DEFAULT_PIN_DIR`], which must be on a bpffs; when it
//! does not exist and `/sys/fs/bpf` is not a bpffs, loading mounts one there, see
//! [`DatapathConfig::mount_bpffs`]):
//! ```text
//! maps/v<LAYOUT_VERSION>/<MAP>       every map; an existing pin is adopted at load
//! progs/sluice_egress, progs/sluice_ingress
//!                                    the programs of the latest load (replaced each load)
//! links/<ifindex>_<program>          TCX link of a macvlan interface or VXLAN device
//! ```
//! Host veths carry no pins: their filters (`clsact`, [`TC_PRIORITY`] / [`TC_HANDLE`])
//! belong to the device and keep it enforced while the daemon is down. Pinned links do the
//! same for TCX. A restarted daemon loads the object again (new program instances sharing
//! the pinned maps, so policy is not reset) and [`Datapath::attach`] replaces each filter in
//! place, as [`Datapath::attach_sandboxed`] swaps the new program into an existing link
//! (`BPF_LINK_UPDATE`): atomically either way. A link whose device is gone is replaced. Link
//! names carry ifindexes of the daemon's (host) network namespace. The map layout version is
//! part of the path, so a build with different layouts starts from empty maps instead of
//! misreading old ones (the driver re-applies state from its store).

pub mod compile;
mod events;

use std::collections::HashMap as StdHashMap;
use std::io;
use std::net::IpAddr;
use std::os::fd::AsFd as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use aya::maps::lpm_trie::Key;
use aya::maps::{
    Array, HashMap, LpmTrie, Map, MapData, MapType, PerCpuArray, PerCpuValues, RingBuf,
};
use aya::programs::links::{FdLink, LinkError, PinnedLink};
use aya::programs::tc::{SchedClassifierLink, SchedClassifierLinkId, TcAttachOptions};
use aya::programs::{
    LinkOrder, ProgramError, SchedClassifier, TcAttachType, TestRun as _, TestRunOptions,
};
use aya::{Ebpf, EbpfLoader};
use ipnetwork::IpNetwork;
use sluice_common::{
    CounterValue, CtKey, CtValue, DIR_EGRESS, DIR_INGRESS, Decap, EndpointInfo,
    IDENTITY_FIRST_CIDR, IDENTITY_LAST_CIDR, IpInfo, IpKey, MAP_BRIDGED, MAP_CONNTRACK,
    MAP_COUNTERS, MAP_DECAP, MAP_ENDPOINTS, MAP_EVENT_RATE, MAP_EVENTS, MAP_IPCACHE, MAP_LOCAL,
    MAP_NAMES, MAP_NEIGH, MAP_OVERLAY, MAP_POLICY, MAP_SETTINGS, MAP_TUNNELS, MAP_VTEPS, Neigh,
    PROG_EGRESS, PROG_INGRESS, PROG_OVERLAY, PROG_SANDBOX_EGRESS, PROG_SANDBOX_INGRESS,
    PROG_UNDERLAY, PolicyKey, PolicyValue, Settings, Tunnel, VERDICT_ALLOW, VERDICT_DENY, Vtep,
    counter_index, decap_key,
};
use tracing::{debug, info, warn};

use crate::link::{self, BpfFilter, TcHook, TcSlot};

pub use compile::{CompiledPolicy, Direction};
pub use events::{DropEvents, decode as decode_drop_event, event_addr};
pub use sluice_common::{self as layout, DropEvent};

/// The programs, built by `driver/build.rs` (empty when it could not build them).
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/sluice-ebpf"));

/// Default pin directory (on the host's bpffs).
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/sluice";
/// Version of the map layouts in `sluice-common`; bump on any layout change.
pub const LAYOUT_VERSION: u32 = 5;
/// `statfs` magic of bpffs (`BPF_FS_MAGIC`, include/uapi/linux/magic.h).
const BPF_FS_MAGIC: u64 = 0xcafe_4a11;

/// Offset of `ifindex` in `struct __sk_buff` (include/uapi/linux/bpf.h: len, pkt_type, mark,
/// queue_mapping, protocol, vlan_present, vlan_tci, vlan_proto, priority, ingress_ifindex,
/// ifindex: eleven `__u32`s).
const SKB_IFINDEX_OFFSET: usize = 40;

/// Errors of the datapath.
#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    /// The build had no eBPF toolchain and embedded an empty object.
    #[error(
        "this sluice was built without its eBPF programs (driver/build.rs found no \
         nightly-2026-05-20 toolchain or no bpf-linker); see ebpf/README.md, or build with \
         SLUICE_EBPF_OBJ=/path/to/sluice-ebpf"
    )]
    NoObject,
    /// Loading the object (creating or adopting maps) failed.
    #[error("load eBPF object: {0}")]
    Load(#[source] aya::EbpfError),
    /// The object lacks a map or program this code expects.
    #[error("the eBPF object has no {0}")]
    Missing(&'static str),
    /// A program operation failed.
    #[error("{op} {program}: {source}")]
    Program {
        /// What was being done.
        op: String,
        /// Program name.
        program: &'static str,
        /// The cause.
        #[source]
        source: ProgramError,
    },
    /// A map operation failed (with the kernel's errno, which aya keeps one level down).
    #[error("{op} ({map}): {source}{}", os_error(source))]
    Map {
        /// What was being done.
        op: String,
        /// Map name.
        map: &'static str,
        /// The cause.
        #[source]
        source: aya::maps::MapError,
    },
    /// A pinned map does not have the layout this build expects.
    #[error("pinned map {map} has {found}, this build expects {expected}; remove {dir}")]
    IncompatiblePin {
        /// Map name.
        map: &'static str,
        /// What the pin has.
        found: String,
        /// What the object wants.
        expected: String,
        /// The directory to remove.
        dir: PathBuf,
    },
    /// A file operation under the pin directory failed.
    #[error("{op} {}: {source}", path.display())]
    Pin {
        /// What was being done.
        op: &'static str,
        /// Where.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The pin directory is not on a bpffs (and mounting one was not asked for).
    #[error("{} is not on a bpffs (mount -t bpf bpf <dir>)", .0.display())]
    NotBpffs(PathBuf),
    /// No interface has that index (in the calling thread's network namespace).
    #[error("no interface with ifindex {0}")]
    NoSuchInterface(u32),
    /// A traffic-control request (qdisc or `cls_bpf` filter) failed.
    #[error("{op} on ifindex {ifindex}: {source}")]
    Tc {
        /// What was being done.
        op: &'static str,
        /// The device.
        ifindex: u32,
        /// The kernel's answer.
        #[source]
        source: io::Error,
    },
    /// The drop-event reader was already handed out, or needs a tokio runtime.
    #[error("drop events: {0}")]
    Events(String),
}

type Result<T, E = DatapathError> = std::result::Result<T, E>;

fn tc_error(op: &'static str, ifindex: u32) -> impl FnOnce(io::Error) -> DatapathError {
    move |source| {
        if source.raw_os_error() == Some(libc::ENODEV) {
            DatapathError::NoSuchInterface(ifindex)
        } else {
            DatapathError::Tc {
                op,
                ifindex,
                source,
            }
        }
    }
}

/// `": <errno text>"` of a failed map syscall (e.g. ENOSPC when a map is full), else nothing.
fn os_error(e: &aya::maps::MapError) -> String {
    match e {
        aya::maps::MapError::SyscallError(s) => format!(": {}", s.io_error),
        _ => String::new(),
    }
}

/// How to load the datapath.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DatapathConfig {
    /// Where to pin maps, programs and links; `None` pins nothing (tests, benchmarks): the
    /// maps are fresh and everything is detached when the [`Datapath`] is dropped.
    pub pin_dir: Option<PathBuf>,
    /// `max_entries` overrides by map name (see `sluice_common::DEFAULT_MAX_*`); ignored for
    /// maps adopted from pins.
    pub max_entries: Vec<(&'static str, u32)>,
    /// Drop-event rate limit (per CPU); zeros mean the kernel-side defaults.
    pub settings: Settings,
    /// When the pin directory does not exist and its parent is not on a bpffs, mount one on
    /// the parent (for the default, on `/sys/fs/bpf`) instead of failing.
    pub mount_bpffs: bool,
    /// The same-host fast path (`LOCAL`, `OVERLAY` maps): traffic between two endpoints on one
    /// network of this host, and from a VXLAN device to a local endpoint, skips the bridge
    /// (`bpf_redirect_peer`), both policies still applied; replies of flows whose requests
    /// came through the host (DNAT) take the bridge (`BRIDGED`). On by default
    /// (`sluice daemon --fast-path=false` turns it off).
    pub fast_path: bool,
}

impl Default for DatapathConfig {
    fn default() -> Self {
        Self::pinned(DEFAULT_PIN_DIR)
    }
}

impl DatapathConfig {
    /// Pinned under `dir`.
    #[must_use]
    pub fn pinned(dir: impl Into<PathBuf>) -> Self {
        Self {
            pin_dir: Some(dir.into()),
            max_entries: Vec::new(),
            settings: Settings::default(),
            mount_bpffs: true,
            fast_path: true,
        }
    }

    /// Nothing pinned.
    #[must_use]
    pub fn unpinned() -> Self {
        Self {
            pin_dir: None,
            max_entries: Vec::new(),
            settings: Settings::default(),
            mount_bpffs: false,
            fast_path: true,
        }
    }
}

/// Allowed and denied traffic of one direction.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DirectionCounters {
    /// Packets and bytes let through.
    pub allowed: CounterValue,
    /// Packets and bytes dropped.
    pub denied: CounterValue,
}

/// An endpoint's counters, summed over CPUs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EndpointCounters {
    /// What the container received.
    pub ingress: DirectionCounters,
    /// What the container sent.
    pub egress: DirectionCounters,
}

/// What [`Datapath::apply_policy`] changed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PolicyUpdate {
    /// `POLICY` entries written (new or overwritten).
    pub written: usize,
    /// `POLICY` entries removed.
    pub removed: usize,
    /// `IPCACHE` CIDR entries written.
    pub cidrs_written: usize,
    /// `IPCACHE` CIDR entries removed.
    pub cidrs_removed: usize,
}

/// Result of one `BPF_PROG_TEST_RUN`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TestRunOutcome {
    /// The program's return value (`TC_ACT_OK` 0, `TC_ACT_SHOT` 2).
    pub action: u32,
    /// Average time per run, as the kernel measured it.
    pub duration: Duration,
}

/// `TC_ACT_OK`: the packet passes.
pub const TC_ACT_OK: u32 = 0;
/// `TC_ACT_SHOT`: the packet is dropped.
pub const TC_ACT_SHOT: u32 = 2;

/// The paths under the pin directory.
#[derive(Debug, Clone)]
struct Pins {
    root: PathBuf,
}

impl Pins {
    fn maps(&self) -> PathBuf {
        self.root.join("maps").join(format!("v{LAYOUT_VERSION}"))
    }
    fn progs(&self) -> PathBuf {
        self.root.join("progs")
    }
    fn links(&self) -> PathBuf {
        self.root.join("links")
    }
    fn link(&self, ifindex: u32, program: &str) -> PathBuf {
        // No dots: bpffs reserves names with a dot (EPERM, kernel/bpf/inode.c bpf_lookup).
        self.links().join(format!("{ifindex}_{program}"))
    }
}

/// Removes every entry of `map` (best effort: an entry that cannot be removed stays).
fn clear_map<K: aya::Pod, V: aya::Pod>(map: &mut HashMap<MapData, K, V>) {
    let keys: Vec<K> = map.keys().filter_map(Result::ok).collect();
    for key in keys {
        let _ = map.remove(&key);
    }
}

/// Unpins the maps of other layout versions (`maps/v<N>`) a daemon of another build left.
/// Their pins are only references: programs still attached keep their maps until this
/// daemon's programs replace them, then the kernel frees them. Best effort (logged).
fn remove_old_layouts(maps: &Path) {
    let current = format!("v{LAYOUT_VERSION}");
    let Ok(dirs) = std::fs::read_dir(maps) else {
        return;
    };
    for dir in dirs.flatten() {
        let name = dir.file_name();
        let name = name.to_string_lossy();
        if name == current || !name.starts_with('v') {
            continue;
        }
        match std::fs::remove_dir_all(dir.path()) {
            Ok(()) => info!(layout = %name, "unpinned the maps of an older layout"),
            Err(e) => {
                warn!(layout = %name, error = %e, "could not unpin the maps of another layout")
            }
        }
    }
}

fn mkdir(path: &Path) -> Result<()> {
    std::fs::create_dir_all(path).map_err(|source| DatapathError::Pin {
        op: "create",
        path: path.to_owned(),
        source,
    })
}

fn is_bpffs(path: &Path) -> Result<bool> {
    let stat = nix::sys::statfs::statfs(path).map_err(|e| DatapathError::Pin {
        op: "statfs",
        path: path.to_owned(),
        source: e.into(),
    })?;
    // The field is an i64 with glibc and a u64 with musl (the managed plugin's static build).
    Ok(u64::try_from(stat.filesystem_type().0).ok() == Some(BPF_FS_MAGIC))
}

/// Makes sure `root` is a directory on a bpffs. If it does not exist and its parent is not on
/// a bpffs (e.g. `/sys/fs/bpf` never got mounted, as on hosts without systemd's mount), mounts
/// one on the parent when `mount` is set: `mount -t bpf bpf <parent>`.
fn prepare_pin_root(root: &Path, mount: bool) -> Result<()> {
    if root.exists() {
        return if is_bpffs(root)? {
            Ok(())
        } else {
            Err(DatapathError::NotBpffs(root.to_owned()))
        };
    }
    // The nearest directory that exists: `/sys/fs/bpf` for `/sys/fs/bpf/sluice/<name>` on a
    // fresh host.
    let parent = root
        .ancestors()
        .skip(1)
        .find(|p| !p.as_os_str().is_empty() && p.exists())
        .unwrap_or(Path::new("."));
    if !is_bpffs(parent)? {
        if !mount {
            return Err(DatapathError::NotBpffs(parent.to_owned()));
        }
        nix::mount::mount(
            Some("bpf"),
            parent,
            Some("bpf"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        )
        .map_err(|e| DatapathError::Pin {
            op: "mount bpffs on",
            path: parent.to_owned(),
            source: e.into(),
        })?;
        info!(path = %parent.display(), "mounted bpffs (mount -t bpf bpf {})", parent.display());
    }
    mkdir(root)
}

fn remove_if_present(path: &Path) -> Result<()> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(DatapathError::Pin {
            op: "remove",
            path: path.to_owned(),
            source,
        }),
    }
}

/// `true` for a syscall error that means "no such element / file".
/// `Ok` for a removal whose key was not there (idempotent deletes).
fn ignore_not_found(
    result: std::result::Result<(), aya::maps::MapError>,
    op: String,
    map: &'static str,
) -> Result<()> {
    match result {
        Err(e) if !is_not_found(&e) => Err(map_err(op, map)(e)),
        _ => Ok(()),
    }
}

/// The map key of one address (IPv4 v4-mapped).
fn ip_addr_key(addr: IpAddr) -> IpKey {
    match addr {
        IpAddr::V4(a) => IpKey::v4(a.octets()),
        IpAddr::V6(a) => IpKey::v6(a.octets()),
    }
}

fn is_not_found(e: &aya::maps::MapError) -> bool {
    match e {
        aya::maps::MapError::KeyNotFound | aya::maps::MapError::ElementNotFound => true,
        aya::maps::MapError::SyscallError(s) => s.io_error.kind() == io::ErrorKind::NotFound,
        _ => false,
    }
}

/// The hook each program goes on, on the host-side veth (a `cls_bpf` filter, see
/// [`HOST_FILTERS`]; older builds used TCX links on the same hooks).
const HOOKS: [(&str, TcAttachType); 2] = [
    (PROG_EGRESS, TcAttachType::Ingress),
    (PROG_INGRESS, TcAttachType::Egress),
];

/// Priority of sluice's filters on a host veth's `clsact` hooks (first to run).
pub const TC_PRIORITY: u16 = 1;
/// Handle of sluice's filters within [`TC_PRIORITY`].
pub const TC_HANDLE: u32 = 1;

/// Where each host-veth program sits: fixed slots, so attaching again (a restarted daemon's
/// programs) replaces the filter in place. Host veths use legacy TC rather than TCX: a TCX
/// attach waits for an RCU grace period under rtnl (`tcx_entry_sync`, 12-15 ms here), a
/// `cls_bpf` filter does not, and a host veth never changes namespace (which would destroy
/// its qdisc).
const HOST_FILTERS: [(&str, TcSlot); 2] = [
    (
        PROG_EGRESS,
        TcSlot {
            hook: TcHook::Ingress,
            priority: TC_PRIORITY,
            handle: TC_HANDLE,
        },
    ),
    (
        PROG_INGRESS,
        TcSlot {
            hook: TcHook::Egress,
            priority: TC_PRIORITY,
            handle: TC_HANDLE,
        },
    ),
];

/// Where the macvlan programs go on the container's own interface: the directions are the
/// other way round from a host-side veth (TCX egress is what the container sends).
const SANDBOX_HOOKS: [(&str, TcAttachType); 2] = [
    (PROG_SANDBOX_EGRESS, TcAttachType::Egress),
    (PROG_SANDBOX_INGRESS, TcAttachType::Ingress),
];

/// The fast path's program on a VXLAN device: what arrives from remote endpoints.
const OVERLAY_HOOKS: [(&str, TcAttachType); 1] = [(PROG_OVERLAY, TcAttachType::Ingress)];

/// The fast path's program on the underlay of VXLAN devices: it decapsulates for them.
const UNDERLAY_HOOKS: [(&str, TcAttachType); 1] = [(PROG_UNDERLAY, TcAttachType::Ingress)];

/// Every program and its hook: loaded, pinned and detached alike.
const ALL_HOOKS: [(&str, TcAttachType); 6] = [
    HOOKS[0],
    HOOKS[1],
    SANDBOX_HOOKS[0],
    SANDBOX_HOOKS[1],
    OVERLAY_HOOKS[0],
    UNDERLAY_HOOKS[0],
];

/// Expected kernel map type, key size and value size of each map.
/// The `LOCAL` keys of an endpoint: its non-zero addresses.
fn local_keys(info: &EndpointInfo) -> Vec<IpKey> {
    let mut keys = Vec::new();
    if info.ipv4 != [0; 4] {
        keys.push(IpKey::v4(info.ipv4));
    }
    if info.ipv6 != [0; 16] {
        keys.push(IpKey::v6(info.ipv6));
    }
    keys
}

fn expected_layout(name: &str) -> Option<(MapType, u32, u32)> {
    let size = |n: usize| u32::try_from(n).unwrap_or(u32::MAX);
    Some(match name {
        MAP_ENDPOINTS => (MapType::Hash, 4, size(size_of::<EndpointInfo>())),
        MAP_IPCACHE => (
            MapType::LpmTrie,
            4 + size(size_of::<IpKey>()),
            size(size_of::<IpInfo>()),
        ),
        MAP_POLICY => (
            MapType::LpmTrie,
            4 + size(size_of::<PolicyKey>()),
            size(size_of::<PolicyValue>()),
        ),
        MAP_CONNTRACK => (
            MapType::LruHash,
            size(size_of::<CtKey>()),
            size(size_of::<CtValue>()),
        ),
        MAP_COUNTERS => (MapType::PerCpuArray, 4, size(size_of::<CounterValue>())),
        MAP_EVENTS => (MapType::RingBuf, 0, 0),
        MAP_LOCAL => (MapType::Hash, size(size_of::<IpKey>()), 4),
        MAP_BRIDGED => (MapType::LruHash, size(size_of::<CtKey>()), 8),
        MAP_OVERLAY => (MapType::Hash, 4, 4),
        MAP_TUNNELS => (MapType::Hash, 4, size(size_of::<Tunnel>())),
        MAP_VTEPS => (
            MapType::Hash,
            size(size_of::<IpKey>()),
            size(size_of::<Vtep>()),
        ),
        MAP_DECAP => (MapType::Hash, 8, size(size_of::<Decap>())),
        MAP_NEIGH => (MapType::LruHash, 8, size(size_of::<Neigh>())),
        MAP_SETTINGS => (MapType::Array, 4, size(size_of::<Settings>())),
        MAP_EVENT_RATE => (
            MapType::PerCpuArray,
            4,
            size(size_of::<sluice_common::RateState>()),
        ),
        _ => return None,
    })
}

/// The loaded datapath: programs, maps, and (unless pinned) the links it made.
pub struct Datapath {
    ebpf: Ebpf,
    endpoints: HashMap<MapData, u32, EndpointInfo>,
    local: HashMap<MapData, IpKey, u32>,
    bridged: HashMap<MapData, CtKey, u64>,
    overlay: HashMap<MapData, u32, u32>,
    tunnels: HashMap<MapData, u32, Tunnel>,
    vteps: HashMap<MapData, IpKey, Vtep>,
    decap: HashMap<MapData, u64, Decap>,
    fast_path: bool,
    ipcache: LpmTrie<MapData, IpKey, IpInfo>,
    policy: LpmTrie<MapData, PolicyKey, PolicyValue>,
    conntrack: HashMap<MapData, CtKey, CtValue>,
    counters: PerCpuArray<MapData, CounterValue>,
    /// Each registered endpoint's slot in `COUNTERS` (mirrors `ENDPOINTS`' `slot` fields).
    slots: CounterSlots,
    settings: Array<MapData, Settings>,
    events: Option<RingBuf<MapData>>,
    pins: Option<Pins>,
    /// Links held by this process (unpinned mode only).
    links: StdHashMap<(u32, &'static str), SchedClassifierLinkId>,
    /// What `POLICY` holds, as this process last wrote it (`None`: not known yet, e.g. maps
    /// adopted from pins; read once from the kernel at the next apply). Applying a policy
    /// diffs against this instead of dumping the map, so an endpoint change costs the map
    /// writes of the entries that change, not a pass over every entry.
    /// Sorted by key, in one vector: the smallest form of 100k fixed-size entries.
    policy_mirror: Option<Mirror<compile::PolicyEntry, PolicyValue>>,
    /// The `IPCACHE` entries policy owns (CIDRs and the v4 sentinel), likewise.
    cidr_mirror: Option<Mirror<(u32, IpKey), IpInfo>>,
}

impl std::fmt::Debug for Datapath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Datapath")
            .field("pins", &self.pins)
            .field("links", &self.links.len())
            .finish_non_exhaustive()
    }
}

/// Map entries as this process last wrote them, sorted by key (see `policy_mirror`).
type Mirror<K, V> = Vec<(K, V)>;

/// The value of `key` in a [`Mirror`].
fn mirrored<'a, K: Ord, V>(mirror: &'a Mirror<K, V>, key: &K) -> Option<&'a V> {
    let i = mirror.binary_search_by(|(k, _)| k.cmp(key)).ok()?;
    mirror.get(i).map(|(_, v)| v)
}

/// `entries` as a [`Mirror`].
fn mirror_of<K: Ord, V>(entries: impl IntoIterator<Item = (K, V)>) -> Mirror<K, V> {
    let mut m: Mirror<K, V> = entries.into_iter().collect();
    m.sort_unstable_by(|a, b| a.0.cmp(&b.0));
    m.shrink_to_fit();
    m
}

/// Which `COUNTERS` slot each endpoint holds ([`EndpointInfo::slot`]), and which are free:
/// the programs index a per-CPU array by slot instead of looking a per-CPU hash up.
#[derive(Debug)]
struct CounterSlots {
    /// Slots `COUNTERS` has room for (four counters each).
    capacity: u32,
    of: StdHashMap<u32, u32>,
    /// Released slots, reused first.
    free: Vec<u32>,
    /// Slots `next..capacity` were never handed out.
    next: u32,
}

impl CounterSlots {
    /// `held`: (ifindex, slot) of the endpoints already registered (adopted pins).
    fn new(capacity: u32, held: impl IntoIterator<Item = (u32, u32)>) -> Self {
        let of: StdHashMap<u32, u32> = held
            .into_iter()
            .filter(|&(_, slot)| slot < capacity)
            .collect();
        let next = of.values().max().map_or(0, |m| m + 1);
        let taken: std::collections::HashSet<u32> = of.values().copied().collect();
        let free = (0..next).rev().filter(|s| !taken.contains(s)).collect();
        Self {
            capacity,
            of,
            free,
            next,
        }
    }

    fn of(&self, ifindex: u32) -> Option<u32> {
        self.of.get(&ifindex).copied()
    }

    /// A free slot for `ifindex`; `None` when all are taken.
    fn take(&mut self, ifindex: u32) -> Option<u32> {
        let slot = match self.free.pop() {
            Some(slot) => slot,
            None if self.next < self.capacity => {
                self.next += 1;
                self.next - 1
            }
            None => return None,
        };
        self.of.insert(ifindex, slot);
        Some(slot)
    }

    fn release(&mut self, ifindex: u32) {
        if let Some(slot) = self.of.remove(&ifindex) {
            self.free.push(slot);
        }
    }
}

fn take_map(ebpf: &mut Ebpf, name: &'static str) -> Result<Map> {
    ebpf.take_map(name).ok_or(DatapathError::Missing(name))
}

fn map_err(
    op: impl Into<String>,
    map: &'static str,
) -> impl FnOnce(aya::maps::MapError) -> DatapathError {
    let op = op.into();
    move |source| DatapathError::Map { op, map, source }
}

impl Datapath {
    /// Loads the embedded programs with `config`: creates (or, when pinned, adopts) the maps,
    /// loads both programs into the kernel and pins them.
    ///
    /// # Errors
    /// [`DatapathError::NoObject`] if the build embedded no object; load, verifier, pin and
    /// layout errors otherwise.
    pub fn load(config: &DatapathConfig) -> Result<Self> {
        Self::load_object(EBPF_OBJECT, config)
    }

    /// As [`Datapath::load`], with another object (e.g. read from a file).
    ///
    /// # Errors
    /// As [`Datapath::load`].
    pub fn load_object(object: &[u8], config: &DatapathConfig) -> Result<Self> {
        if object.is_empty() {
            return Err(DatapathError::NoObject);
        }
        let pins = config
            .pin_dir
            .as_ref()
            .map(|root| Pins { root: root.clone() });
        let mut loader = EbpfLoader::new();
        if let Some(p) = &pins {
            prepare_pin_root(&p.root, config.mount_bpffs)?;
            for dir in [p.maps(), p.progs(), p.links()] {
                mkdir(&dir)?;
            }
            remove_old_layouts(&p.root.join("maps"));
            for name in MAP_NAMES {
                loader.map_pin_path(name, p.maps().join(name));
            }
        }
        for &(name, entries) in &config.max_entries {
            loader.map_max_entries(name, entries);
        }
        let mut ebpf = loader.load(object).map_err(DatapathError::Load)?;

        // aya adopts a pinned map without comparing it with the object: check here.
        for (name, map) in ebpf.maps() {
            let Some(&name) = MAP_NAMES.iter().find(|n| **n == name) else {
                continue;
            };
            let Some((map_type, key, value)) = expected_layout(name) else {
                continue;
            };
            let info = map_data(map)
                .ok_or(DatapathError::Missing(name))?
                .info()
                .map_err(map_err("map info", name))?;
            let found_type = info.map_type().map_err(map_err("map type", name))?;
            if found_type != map_type || info.key_size() != key || info.value_size() != value {
                return Err(DatapathError::IncompatiblePin {
                    map: name,
                    found: format!(
                        "{found_type:?} key {} value {}",
                        info.key_size(),
                        info.value_size()
                    ),
                    expected: format!("{map_type:?} key {key} value {value}"),
                    dir: pins.as_ref().map(Pins::maps).unwrap_or_default(),
                });
            }
        }

        for (program, _) in ALL_HOOKS {
            let prog = classifier_mut(&mut ebpf, program)?;
            prog.load().map_err(|source| DatapathError::Program {
                op: "load".into(),
                program,
                source,
            })?;
            if let Some(p) = &pins {
                let path = p.progs().join(program);
                remove_if_present(&path)?;
                prog.pin(&path).map_err(|e| DatapathError::Pin {
                    op: "pin",
                    path: path.clone(),
                    source: io::Error::other(e),
                })?;
            }
        }

        let endpoints: HashMap<MapData, u32, EndpointInfo> =
            HashMap::try_from(take_map(&mut ebpf, MAP_ENDPOINTS)?)
                .map_err(map_err("open", MAP_ENDPOINTS))?;
        let local = HashMap::try_from(take_map(&mut ebpf, MAP_LOCAL)?)
            .map_err(map_err("open", MAP_LOCAL))?;
        let bridged = HashMap::try_from(take_map(&mut ebpf, MAP_BRIDGED)?)
            .map_err(map_err("open", MAP_BRIDGED))?;
        let overlay = HashMap::try_from(take_map(&mut ebpf, MAP_OVERLAY)?)
            .map_err(map_err("open", MAP_OVERLAY))?;
        let tunnels = HashMap::try_from(take_map(&mut ebpf, MAP_TUNNELS)?)
            .map_err(map_err("open", MAP_TUNNELS))?;
        let vteps = HashMap::try_from(take_map(&mut ebpf, MAP_VTEPS)?)
            .map_err(map_err("open", MAP_VTEPS))?;
        let decap = HashMap::try_from(take_map(&mut ebpf, MAP_DECAP)?)
            .map_err(map_err("open", MAP_DECAP))?;
        let ipcache = LpmTrie::try_from(take_map(&mut ebpf, MAP_IPCACHE)?)
            .map_err(map_err("open", MAP_IPCACHE))?;
        let policy = LpmTrie::try_from(take_map(&mut ebpf, MAP_POLICY)?)
            .map_err(map_err("open", MAP_POLICY))?;
        let conntrack = HashMap::try_from(take_map(&mut ebpf, MAP_CONNTRACK)?)
            .map_err(map_err("open", MAP_CONNTRACK))?;
        let counters = PerCpuArray::try_from(take_map(&mut ebpf, MAP_COUNTERS)?)
            .map_err(map_err("open", MAP_COUNTERS))?;
        // Adopted pins: the slots their endpoints hold stay theirs.
        let slots = CounterSlots::new(
            counters.len() / 4,
            endpoints
                .iter()
                .filter_map(std::result::Result::ok)
                .map(|(ifindex, info)| (ifindex, info.slot)),
        );
        let settings = Array::try_from(take_map(&mut ebpf, MAP_SETTINGS)?)
            .map_err(map_err("open", MAP_SETTINGS))?;
        let events = RingBuf::try_from(take_map(&mut ebpf, MAP_EVENTS)?)
            .map_err(map_err("open", MAP_EVENTS))?;

        let mut datapath = Self {
            ebpf,
            endpoints,
            local,
            bridged,
            overlay,
            tunnels,
            vteps,
            decap,
            fast_path: config.fast_path,
            ipcache,
            policy,
            conntrack,
            counters,
            slots,
            settings,
            events: Some(events),
            pins,
            links: StdHashMap::new(),
            policy_mirror: None,
            cidr_mirror: None,
        };
        datapath.set_settings(config.settings)?;
        if !datapath.fast_path {
            // Adopted pins may hold entries of a run with the fast path on.
            clear_map(&mut datapath.local);
            clear_map(&mut datapath.overlay);
            clear_map(&mut datapath.tunnels);
            clear_map(&mut datapath.vteps);
            clear_map(&mut datapath.decap);
        }
        info!(
            fast_path = config.fast_path,
            pin_dir = ?config.pin_dir,
            "eBPF datapath loaded (programs {PROG_EGRESS}, {PROG_INGRESS})"
        );
        Ok(datapath)
    }

    /// The pin directory, if pinned.
    #[must_use]
    pub fn pin_dir(&self) -> Option<&Path> {
        self.pins.as_ref().map(|p| p.root.as_path())
    }

    /// Writes the drop-event rate limit.
    ///
    /// # Errors
    /// If the map write fails.
    pub fn set_settings(&mut self, settings: Settings) -> Result<()> {
        self.settings
            .set(0, settings, 0)
            .map_err(map_err("write settings", MAP_SETTINGS))
    }

    // -----------------------------------------------------------------------------------------
    // Attach / detach

    /// Attaches both programs to the host-side veth `ifindex` as direct-action `cls_bpf`
    /// filters on its `clsact` qdisc (`sluice_egress` on its ingress hook, `sluice_ingress` on
    /// its egress hook, both at [`TC_PRIORITY`] / [`TC_HANDLE`]), like `tc filter replace dev
    /// IF {ingress,egress} pref 1 handle 1 bpf da …`. The filters belong to the device: they
    /// outlive this process, and attaching again swaps this load's program in atomically.
    /// Idempotent. Register the endpoint ([`Datapath::set_endpoint`]) first: packets of an
    /// unregistered ifindex pass. A TCX link an older build pinned for the same hook is
    /// removed once the filter is in place.
    ///
    /// The ifindex is resolved in the calling thread's network namespace.
    ///
    /// # Errors
    /// [`DatapathError::NoSuchInterface`], attach and pin errors. On error, a hook attached
    /// by this call may remain attached; call [`Datapath::detach`] to clean up.
    pub fn attach(&mut self, ifindex: u32) -> Result<()> {
        let mut filters = Vec::with_capacity(HOST_FILTERS.len());
        for (name, slot) in HOST_FILTERS {
            let program = classifier(&self.ebpf, name)?
                .fd()
                .map_err(|source| DatapathError::Program {
                    op: "attach (no fd)".into(),
                    program: name,
                    source,
                })?
                .as_fd();
            filters.push(BpfFilter {
                slot,
                name,
                program,
            });
        }
        link::tc_attach_bpf(ifindex, &filters).map_err(tc_error("attach filters", ifindex))?;
        if let Some(pins) = &self.pins {
            for (program, _) in HOOKS {
                remove_if_present(&pins.link(ifindex, program))?;
            }
        }
        info!(
            ifindex,
            "attached datapath (tc ingress {PROG_EGRESS}, tc egress {PROG_INGRESS})"
        );
        Ok(())
    }

    /// The fast path for a `mode=vxlan` network: attaches `sluice_overlay` to the TCX ingress
    /// hook of its VXLAN device `tunnel.device` and records the device's network, so frames
    /// from remote endpoints to local endpoints of `network` skip the bridge (after the
    /// receiver's ingress policy). With an IPv4 underlay (`tunnel.underlay` not 0) the
    /// programs also encapsulate towards remote endpoints ([`Datapath::set_vtep`]) and
    /// `sluice_underlay` on the underlay's TCX ingress decapsulates for local ones, so
    /// neither direction crosses the VXLAN device. With the fast path off, `sluice_overlay`
    /// is attached but idle (no `OVERLAY` entry) and the underlay has no program. Pinned as
    /// [`Datapath::attach`]. Idempotent.
    ///
    /// # Errors
    /// As [`Datapath::attach`]; a failed map write.
    pub fn attach_overlay(&mut self, network: u32, tunnel: Tunnel) -> Result<()> {
        let ifindex = tunnel.device;
        let ifname = interface_name(ifindex)?;
        if self.fast_path {
            self.overlay
                .insert(ifindex, network, 0)
                .map_err(map_err(format!("set overlay {ifindex}"), MAP_OVERLAY))?;
            self.tunnels
                .insert(network, tunnel, 0)
                .map_err(map_err(format!("set tunnel of {network}"), MAP_TUNNELS))?;
            if tunnel.underlay != 0 {
                let underlay = interface_name(tunnel.underlay)?;
                self.decap
                    .insert(
                        decap_key(tunnel.port, tunnel.vni),
                        Decap {
                            network,
                            local: tunnel.local,
                        },
                        0,
                    )
                    .map_err(map_err(format!("set decap of {network}"), MAP_DECAP))?;
                self.attach_hooks(tunnel.underlay, Some(&underlay), &UNDERLAY_HOOKS)?;
            }
        } else {
            self.forget_overlay(ifindex)?;
            if tunnel.underlay != 0 {
                // A run with the fast path on may have left the underlay's program pinned.
                self.detach_links(tunnel.underlay)?;
            }
        }
        self.attach_hooks(ifindex, Some(&ifname), &OVERLAY_HOOKS)?;
        info!(
            ifindex,
            network,
            underlay = tunnel.underlay,
            fast_path = self.fast_path,
            "attached {PROG_OVERLAY}"
        );
        Ok(())
    }

    /// Undoes [`Datapath::attach_overlay`] (the underlay's program goes with the last tunnel
    /// over it). Idempotent; works after the device is gone.
    ///
    /// # Errors
    /// As [`Datapath::detach`].
    pub fn detach_overlay(&mut self, ifindex: u32) -> Result<()> {
        // Overlay and underlay programs are TCX links (not the host veths' tc filters).
        let underlay = self.forget_overlay(ifindex)?;
        if let Some(underlay) = underlay
            && !self
                .tunnels
                .iter()
                .filter_map(Result::ok)
                .any(|(_, t)| t.underlay == underlay)
        {
            self.detach_links(underlay)?;
        }
        self.detach_links(ifindex)
    }

    /// Removes the map entries of VXLAN device `ifindex`; returns its underlay, if it had
    /// one.
    fn forget_overlay(&mut self, ifindex: u32) -> Result<Option<u32>> {
        let mut underlay = None;
        if let Some(network) = self.overlay_network(ifindex)?
            && let Ok(tunnel) = self.tunnels.get(&network, 0)
            && tunnel.device == ifindex
        {
            if tunnel.underlay != 0 {
                underlay = Some(tunnel.underlay);
                ignore_not_found(
                    self.decap.remove(&decap_key(tunnel.port, tunnel.vni)),
                    format!("remove decap of {network}"),
                    MAP_DECAP,
                )?;
            }
            ignore_not_found(
                self.tunnels.remove(&network),
                format!("remove tunnel of {network}"),
                MAP_TUNNELS,
            )?;
        }
        ignore_not_found(
            self.overlay.remove(&ifindex),
            format!("remove overlay {ifindex}"),
            MAP_OVERLAY,
        )?;
        Ok(underlay)
    }

    /// Records remote endpoint address `address` of network `network` behind the host with
    /// tunnel address `vtep` (what the VXLAN device's forwarding database says), so the
    /// fast path sends to it without the bridge. A no-op with the fast path off.
    ///
    /// # Errors
    /// A failed map write.
    pub fn set_vtep(&mut self, address: IpAddr, network: u32, vtep: IpAddr) -> Result<()> {
        if !self.fast_path {
            return Ok(());
        }
        let ipv4 = match vtep {
            IpAddr::V4(v4) => v4.octets(),
            // The VXLAN device encapsulates for an IPv6 underlay.
            IpAddr::V6(_) => [0; 4],
        };
        self.vteps
            .insert(ip_addr_key(address), Vtep { network, ipv4 }, 0)
            .map_err(map_err(format!("set vtep of {address}"), MAP_VTEPS))
    }

    /// Undoes [`Datapath::set_vtep`]. Idempotent.
    ///
    /// # Errors
    /// A failed map write.
    pub fn remove_vtep(&mut self, address: IpAddr) -> Result<()> {
        ignore_not_found(
            self.vteps.remove(&ip_addr_key(address)),
            format!("remove vtep of {address}"),
            MAP_VTEPS,
        )
    }

    /// The network number `OVERLAY` holds for VXLAN device `ifindex`.
    ///
    /// # Errors
    /// If the map read fails.
    pub fn overlay_network(&self, ifindex: u32) -> Result<Option<u32>> {
        match self.overlay.get(&ifindex, 0) {
            Ok(v) => Ok(Some(v)),
            Err(e) if is_not_found(&e) => Ok(None),
            Err(e) => Err(map_err(format!("get overlay {ifindex}"), MAP_OVERLAY)(e)),
        }
    }

    /// Flows the fast path leaves to the bridge because their requests came through the host
    /// (`BRIDGED`), as the replying endpoint sees them.
    ///
    /// # Errors
    /// If the map read fails.
    pub fn bridged_flows(&self) -> Result<Vec<CtKey>> {
        self.bridged
            .keys()
            .collect::<std::result::Result<_, _>>()
            .map_err(map_err("read bridged flows", MAP_BRIDGED))
    }

    /// Attaches the macvlan programs to the endpoint's **own** interface `ifindex` (there is
    /// no host-side peer): `sluice_sandbox_egress` on its TCX egress hook and
    /// `sluice_sandbox_ingress` on its TCX ingress hook. Attach while the interface is still
    /// in the host namespace, before Docker moves it into the container: TCX links stay on
    /// the device across the move and the rename (checked on 6.18), so the interface never
    /// passes a packet unfiltered; and these programs drop when the interface is not
    /// registered ([`Datapath::set_endpoint`]). Pinned as [`Datapath::attach`]. Idempotent.
    ///
    /// # Errors
    /// As [`Datapath::attach`].
    pub fn attach_sandboxed(&mut self, ifindex: u32) -> Result<()> {
        let ifname = interface_name(ifindex)?;
        self.attach_hooks(ifindex, Some(&ifname), &SANDBOX_HOOKS)?;
        info!(
            ifindex,
            "attached datapath (tcx egress {PROG_SANDBOX_EGRESS}, tcx ingress {PROG_SANDBOX_INGRESS})"
        );
        Ok(())
    }

    /// For a macvlan link already moved into its container (not visible by name here): puts
    /// this load's programs into its pinned links (after an upgrade, say), found by
    /// `ifindex` alone. Idempotent.
    ///
    /// # Errors
    /// [`DatapathError::NoSuchInterface`] when the link has no programs to update (they can
    /// only be attached before the move); update and pin errors.
    pub fn refresh_sandboxed(&mut self, ifindex: u32) -> Result<()> {
        self.attach_hooks(ifindex, None, &SANDBOX_HOOKS)
    }

    /// `ifname`: the device's name in this namespace, `None` when it is not here (then only
    /// existing links are updated).
    fn attach_hooks(
        &mut self,
        ifindex: u32,
        ifname: Option<&str>,
        hooks: &[(&'static str, TcAttachType)],
    ) -> Result<()> {
        for &(program, hook) in hooks {
            if let Some(pins) = self.pins.clone() {
                self.attach_pinned(&pins, ifindex, ifname, program, hook)?;
            } else if !self.links.contains_key(&(ifindex, program)) {
                let ifname = ifname.ok_or(DatapathError::NoSuchInterface(ifindex))?;
                let prog = classifier_mut(&mut self.ebpf, program)?;
                let id = prog
                    .attach_with_options(
                        ifname,
                        hook,
                        TcAttachOptions::TcxOrder(LinkOrder::default()),
                    )
                    .map_err(|source| DatapathError::Program {
                        op: format!("attach to {ifname} ({hook:?}) of"),
                        program,
                        source,
                    })?;
                self.links.insert((ifindex, program), id);
            }
        }
        debug!(ifindex, ?ifname, "programs attached");
        Ok(())
    }

    fn attach_pinned(
        &mut self,
        pins: &Pins,
        ifindex: u32,
        ifname: Option<&str>,
        program: &'static str,
        hook: TcAttachType,
    ) -> Result<()> {
        let path = pins.link(ifindex, program);
        let prog = classifier_mut(&mut self.ebpf, program)?;
        let prog_err = |op: String| {
            move |source| DatapathError::Program {
                op,
                program,
                source,
            }
        };
        match PinnedLink::from_pin(&path) {
            Ok(pinned) => {
                // Keep the pin; only swap the program inside the link.
                let link = SchedClassifierLink::try_from(FdLink::from(pinned)).map_err(|e| {
                    DatapathError::Pin {
                        op: "adopt link",
                        path: path.clone(),
                        source: io::Error::other(e),
                    }
                })?;
                match prog.attach_to_link(link) {
                    Ok(id) => {
                        // Dropping our handle closes the fd; the pin keeps the link.
                        let _handle = prog
                            .take_link(id)
                            .map_err(prog_err(format!("release link {} of", path.display())))?;
                        debug!(ifindex, program, "updated pinned link");
                        return Ok(());
                    }
                    Err(ProgramError::SyscallError(e))
                        if e.io_error.raw_os_error() == Some(libc::ENOLINK) =>
                    {
                        // The device this link was on is gone (ifindex reused): replace it.
                        debug!(ifindex, program, "pinned link is defunct; replacing");
                        remove_if_present(&path)?;
                    }
                    Err(source) => {
                        return Err(DatapathError::Program {
                            op: format!("update link {} with", path.display()),
                            program,
                            source,
                        });
                    }
                }
            }
            Err(LinkError::SyscallError(e)) if e.io_error.kind() == io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(DatapathError::Pin {
                    op: "open link",
                    path,
                    source: io::Error::other(e),
                });
            }
        }
        let ifname = ifname.ok_or(DatapathError::NoSuchInterface(ifindex))?;
        let id = prog
            .attach_with_options(
                ifname,
                hook,
                TcAttachOptions::TcxOrder(LinkOrder::default()),
            )
            .map_err(prog_err(format!("attach to {ifname} ({hook:?}) of")))?;
        let link = prog
            .take_link(id)
            .map_err(prog_err(format!("take link on {ifname} of")))?;
        let fd_link = FdLink::try_from(link).map_err(|e| DatapathError::Pin {
            op: "take link fd",
            path: path.clone(),
            source: io::Error::other(e),
        })?;
        // If pinning fails the link is dropped here, which detaches it.
        fd_link.pin(&path).map_err(|e| DatapathError::Pin {
            op: "pin link",
            path: path.clone(),
            source: io::Error::other(e),
        })?;
        Ok(())
    }

    /// Detaches the programs from host veth `ifindex` (deletes sluice's filters, and any TCX
    /// link pinned for it). Idempotent; works after the device is gone.
    ///
    /// # Errors
    /// If a filter cannot be deleted, a pin cannot be removed or a held link cannot be
    /// detached.
    pub fn detach(&mut self, ifindex: u32) -> Result<()> {
        let slots = HOST_FILTERS.map(|(_, slot)| slot);
        link::tc_detach_bpf(ifindex, &slots).map_err(tc_error("delete filters", ifindex))?;
        self.detach_links(ifindex)
    }

    /// Detaches the TCX programs of a macvlan endpoint's own interface `ifindex` (which may
    /// be in its container by now, so nothing is asked of a device here by that ifindex).
    /// Idempotent.
    ///
    /// # Errors
    /// As [`Datapath::detach`].
    pub fn detach_sandboxed(&mut self, ifindex: u32) -> Result<()> {
        self.detach_links(ifindex)
    }

    /// Removes the pinned TCX links of `ifindex`, or drops the links this process holds.
    fn detach_links(&mut self, ifindex: u32) -> Result<()> {
        for (program, _) in ALL_HOOKS {
            if let Some(pins) = &self.pins {
                let path = pins.link(ifindex, program);
                match PinnedLink::from_pin(&path) {
                    Ok(link) => {
                        // Removing the pin and closing the last fd destroys the link.
                        let _fd_link = link.unpin().map_err(|source| DatapathError::Pin {
                            op: "unpin link",
                            path: path.clone(),
                            source,
                        })?;
                    }
                    Err(LinkError::SyscallError(e))
                        if e.io_error.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => {
                        return Err(DatapathError::Pin {
                            op: "open link",
                            path,
                            source: io::Error::other(e),
                        });
                    }
                }
            }
            if let Some(id) = self.links.remove(&(ifindex, program)) {
                classifier_mut(&mut self.ebpf, program)?
                    .detach(id)
                    .map_err(|source| DatapathError::Program {
                        op: format!("detach from ifindex {ifindex}"),
                        program,
                        source,
                    })?;
            }
        }
        info!(ifindex, "detached datapath");
        Ok(())
    }

    /// Whether host veth `ifindex` has both of sluice's filters, as the kernel reports them
    /// (calling thread's network namespace).
    #[must_use]
    pub fn is_attached(&self, ifindex: u32) -> bool {
        HOST_FILTERS.iter().all(|(program, slot)| {
            link::tc_bpf_programs(ifindex, slot.hook)
                .is_ok_and(|names| names.iter().any(|n| n == program))
        })
    }

    /// Removes everything pinned under `dir` (links first, so traffic is released, then
    /// programs and maps). For uninstalling and tests. Idempotent.
    ///
    /// # Errors
    /// If a pin cannot be removed.
    pub fn remove_pins(dir: &Path) -> Result<()> {
        match std::fs::remove_dir_all(dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(DatapathError::Pin {
                op: "remove",
                path: dir.to_owned(),
                source,
            }),
        }
    }

    // -----------------------------------------------------------------------------------------
    // Maps

    /// Registers (or updates) the endpoint whose host-side veth is `ifindex`. Give it its
    /// addresses ([`EndpointInfo::with_addresses`]) and `EP_SOURCE_CHECK` so that it cannot
    /// send from another endpoint's address.
    ///
    /// # Errors
    /// If the map write fails (e.g. full).
    pub fn set_endpoint(&mut self, ifindex: u32, info: EndpointInfo) -> Result<()> {
        self.set_endpoint_with(ifindex, info, self.fast_path)
    }

    /// [`Datapath::set_endpoint`] for a macvlan endpoint (programs on the container's own
    /// interface): never a fast-path target, `bpf_redirect_peer` needs a veth.
    ///
    /// # Errors
    /// If a map write fails.
    pub fn set_sandboxed_endpoint(&mut self, ifindex: u32, info: EndpointInfo) -> Result<()> {
        self.set_endpoint_with(ifindex, info, false)
    }

    fn set_endpoint_with(&mut self, ifindex: u32, info: EndpointInfo, fast: bool) -> Result<()> {
        let (slot, new) = match self.slots.of(ifindex) {
            Some(slot) => (slot, false),
            None => (self.new_slot(ifindex)?, true),
        };
        let info = EndpointInfo { slot, ..info };
        if let Err(e) = self.endpoints.insert(ifindex, info, 0) {
            if new {
                self.slots.release(ifindex);
            }
            return Err(map_err(format!("set endpoint {ifindex}"), MAP_ENDPOINTS)(e));
        }
        for key in local_keys(&info) {
            if fast {
                self.local
                    .insert(key, ifindex, 0)
                    .map_err(map_err(format!("set fast path to {ifindex}"), MAP_LOCAL))?;
            } else {
                self.remove_local(key, ifindex)?;
            }
        }
        Ok(())
    }

    /// A free `COUNTERS` slot for `ifindex`, its counters zeroed (a previous holder's, or
    /// an older run's, must not show up as this endpoint's).
    fn new_slot(&mut self, ifindex: u32) -> Result<u32> {
        let capacity = self.slots.capacity;
        let slot = self.slots.take(ifindex).ok_or_else(|| DatapathError::Map {
            op: format!("counters of endpoint {ifindex}: all {capacity} slots taken"),
            map: MAP_COUNTERS,
            source: aya::maps::MapError::OutOfBounds {
                index: capacity * 4,
                max_entries: capacity * 4,
            },
        })?;
        let result = self.zero_counters(slot);
        if let Err(e) = result {
            self.slots.release(ifindex);
            return Err(e);
        }
        Ok(slot)
    }

    /// Zeroes the four counters of `slot` on every CPU.
    fn zero_counters(&mut self, slot: u32) -> Result<()> {
        let cpus = aya::util::nr_cpus().map_err(|(_, e)| e);
        for dir in [DIR_INGRESS, DIR_EGRESS] {
            for verdict in [VERDICT_ALLOW, VERDICT_DENY] {
                let zeroed = cpus
                    .as_ref()
                    .map_err(|e| io::Error::new(e.kind(), e.to_string()))
                    .and_then(|&n| PerCpuValues::try_from(vec![CounterValue::default(); n]))
                    .map_err(|io_error| DatapathError::Map {
                        op: "zero counters".into(),
                        map: MAP_COUNTERS,
                        source: aya::maps::MapError::SyscallError(aya::sys::SyscallError {
                            call: "nr_cpus",
                            io_error,
                        }),
                    })?;
                self.counters
                    .set(counter_index(slot, dir, verdict), zeroed, 0)
                    .map_err(map_err("zero counters", MAP_COUNTERS))?;
            }
        }
        Ok(())
    }

    /// Whether the same-host fast path is on ([`DatapathConfig::fast_path`]).
    #[must_use]
    pub fn fast_path(&self) -> bool {
        self.fast_path
    }

    /// The host veth ifindex the fast path delivers `addr` to, if any.
    ///
    /// # Errors
    /// If the map read fails.
    pub fn local_endpoint(&self, addr: IpAddr) -> Result<Option<u32>> {
        match self.local.get(&ip_addr_key(addr), 0) {
            Ok(v) => Ok(Some(v)),
            Err(e) if is_not_found(&e) => Ok(None),
            Err(e) => Err(map_err(format!("get fast path of {addr}"), MAP_LOCAL)(e)),
        }
    }

    /// Removes `LOCAL[key]` if it still points at `ifindex` (another endpoint may have taken
    /// the address since). Idempotent.
    fn remove_local(&mut self, key: IpKey, ifindex: u32) -> Result<()> {
        match self.local.get(&key, 0) {
            Ok(v) if v == ifindex => match self.local.remove(&key) {
                Ok(()) => Ok(()),
                Err(e) if is_not_found(&e) => Ok(()),
                Err(e) => Err(map_err("remove fast path", MAP_LOCAL)(e)),
            },
            Ok(_) => Ok(()),
            Err(e) if is_not_found(&e) => Ok(()),
            Err(e) => Err(map_err("get fast path", MAP_LOCAL)(e)),
        }
    }

    /// The endpoint registered at `ifindex`.
    ///
    /// # Errors
    /// If the map read fails.
    pub fn endpoint(&self, ifindex: u32) -> Result<Option<EndpointInfo>> {
        match self.endpoints.get(&ifindex, 0) {
            Ok(v) => Ok(Some(v)),
            Err(e) if is_not_found(&e) => Ok(None),
            Err(e) => Err(map_err(format!("get endpoint {ifindex}"), MAP_ENDPOINTS)(e)),
        }
    }

    /// Unregisters an endpoint and forgets its counters and conntrack entries (so a later
    /// endpoint reusing the ifindex starts clean). Idempotent. Costs one pass over
    /// `CONNTRACK`.
    ///
    /// # Errors
    /// If a map operation fails.
    pub fn remove_endpoint(&mut self, ifindex: u32) -> Result<()> {
        if let Some(info) = self.endpoint(ifindex)? {
            for key in local_keys(&info) {
                self.remove_local(key, ifindex)?;
            }
        }
        match self.endpoints.remove(&ifindex) {
            Ok(()) => {}
            Err(e) if is_not_found(&e) => {}
            Err(e) => return Err(map_err(format!("remove endpoint {ifindex}"), MAP_ENDPOINTS)(e)),
        }
        // The slot's counters are zeroed when it is handed out again.
        self.slots.release(ifindex);
        self.flush_conntrack(Some(ifindex))?;
        let bridged: Vec<CtKey> = self
            .bridged
            .keys()
            .filter_map(std::result::Result::ok)
            .filter(|k| k.ifindex == ifindex)
            .collect();
        for key in bridged {
            match self.bridged.remove(&key) {
                Ok(()) => {}
                Err(e) if is_not_found(&e) => {}
                Err(e) => return Err(map_err("forget bridged flows", MAP_BRIDGED)(e)),
            }
        }
        Ok(())
    }

    /// Maps `net` (an endpoint address as /32 or /128, or a CIDR) to `info` in the ipcache.
    ///
    /// # Errors
    /// If the map write fails.
    pub fn set_ip(&mut self, net: IpNetwork, info: IpInfo) -> Result<()> {
        let (prefix, key) = compile::ip_key(net);
        self.forget_cidr(prefix, key);
        self.ipcache
            .insert(&Key::new(prefix, key), info, 0)
            .map_err(map_err(format!("set ip {net}"), MAP_IPCACHE))
    }

    /// Removes `net` from the ipcache. Idempotent.
    ///
    /// # Errors
    /// If the map operation fails.
    pub fn remove_ip(&mut self, net: IpNetwork) -> Result<()> {
        let (prefix, key) = compile::ip_key(net);
        self.forget_cidr(prefix, key);
        match self.ipcache.remove(&Key::new(prefix, key)) {
            Ok(()) => Ok(()),
            Err(e) if is_not_found(&e) => Ok(()),
            Err(e) => Err(map_err(format!("remove ip {net}"), MAP_IPCACHE)(e)),
        }
    }

    /// The ipcache entry the kernel would find for `addr` (longest prefix match).
    ///
    /// # Errors
    /// If the map read fails.
    pub fn lookup_ip(&self, addr: std::net::IpAddr) -> Result<Option<IpInfo>> {
        let (prefix, key) = compile::ip_key(IpNetwork::from(addr));
        match self.ipcache.get(&Key::new(prefix, key), 0) {
            Ok(v) => Ok(Some(v)),
            Err(e) if is_not_found(&e) => Ok(None),
            Err(e) => Err(map_err(format!("lookup {addr}"), MAP_IPCACHE)(e)),
        }
    }

    /// Makes `POLICY` and the ipcache's CIDR entries exactly `compiled`, writing only what
    /// differs from what this process last wrote (see `policy_mirror`). Order: stale allow
    /// entries are removed first, then every new or changed entry is written, then stale deny
    /// entries are removed, so a change never passes through a state with fewer denies than
    /// both the old and the new policy have.
    ///
    /// # Errors
    /// If a map operation fails (the maps may then hold a mix of old and new entries; apply
    /// again: the next apply reads the maps back from the kernel).
    pub fn apply_policy(&mut self, compiled: &CompiledPolicy) -> Result<PolicyUpdate> {
        let mut update = PolicyUpdate::default();
        // Taken out: an error below leaves `None`, so the next apply re-reads the kernel.
        let have_ip = match self.cidr_mirror.take() {
            Some(m) => m,
            None => self.read_policy_cidrs()?,
        };
        let have = match self.policy_mirror.take() {
            Some(m) => m,
            None => self.read_policy()?,
        };

        // CIDRs first, so new policy entries never see a CIDR without its identity.
        let want_ip = compiled.ipcache_entries();
        for &((prefix, key), ref info) in &want_ip {
            if mirrored(&have_ip, &(prefix, key)) == Some(info) {
                continue;
            }
            self.ipcache
                .insert(&Key::new(prefix, key), info, 0)
                .map_err(map_err("write cidr", MAP_IPCACHE))?;
            update.cidrs_written += 1;
        }

        let stale: Vec<(compile::PolicyEntry, PolicyValue)> = have
            .iter()
            .filter(|(e, _)| !compiled.entries.contains_key(e))
            .copied()
            .collect();
        let allow = u32::from(VERDICT_ALLOW);
        for (entry, _) in stale.iter().filter(|(_, v)| v.verdict == allow) {
            self.remove_policy_key(&Key::new(entry.prefix_len, entry.key))?;
            update.removed += 1;
        }
        for (entry, value) in &compiled.entries {
            if mirrored(&have, entry) == Some(value) {
                continue;
            }
            self.policy
                .insert(&Key::new(entry.prefix_len, entry.key), value, 0)
                .map_err(map_err("write policy", MAP_POLICY))?;
            update.written += 1;
        }
        for (entry, _) in stale.iter().filter(|(_, v)| v.verdict != allow) {
            self.remove_policy_key(&Key::new(entry.prefix_len, entry.key))?;
            update.removed += 1;
        }
        drop(stale);
        drop(have);

        // Then CIDRs nobody references any more.
        for (k, _) in have_ip
            .iter()
            .filter(|(k, _)| mirrored(&want_ip, k).is_none())
        {
            match self.ipcache.remove(&Key::new(k.0, k.1)) {
                Ok(()) => update.cidrs_removed += 1,
                Err(e) if is_not_found(&e) => {}
                Err(e) => return Err(map_err("remove cidr", MAP_IPCACHE)(e)),
            }
        }
        drop(have_ip);
        // Every write succeeded: the maps hold exactly `compiled`.
        self.policy_mirror = Some(compiled.entries.iter().map(|(e, v)| (*e, *v)).collect());
        self.cidr_mirror = Some(want_ip);
        if update != PolicyUpdate::default() {
            info!(
                written = update.written,
                removed = update.removed,
                cidrs_written = update.cidrs_written,
                cidrs_removed = update.cidrs_removed,
                entries = compiled.entries.len(),
                "policy applied"
            );
        }
        Ok(update)
    }

    /// Every `POLICY` entry, read from the kernel (once per process, see `policy_mirror`).
    fn read_policy(&self) -> Result<Mirror<compile::PolicyEntry, PolicyValue>> {
        let entries: Vec<_> = self
            .policy
            .iter()
            .map(|r| {
                r.map(|(k, v)| {
                    (
                        compile::PolicyEntry {
                            prefix_len: k.prefix_len(),
                            key: k.data(),
                        },
                        v,
                    )
                })
            })
            .collect::<std::result::Result<_, _>>()
            .map_err(map_err("read policy", MAP_POLICY))?;
        Ok(mirror_of(entries))
    }

    /// The `IPCACHE` entries policy owns (CIDR identities and the v4 sentinel), read from the
    /// kernel.
    fn read_policy_cidrs(&self) -> Result<Mirror<(u32, IpKey), IpInfo>> {
        let sentinel = compile::v4_mapped_range();
        let all: Vec<(Key<IpKey>, IpInfo)> = self
            .ipcache
            .iter()
            .collect::<std::result::Result<_, _>>()
            .map_err(map_err("read ipcache", MAP_IPCACHE))?;
        Ok(mirror_of(
            all.into_iter()
                .map(|(key, info)| ((key.prefix_len(), key.data()), info))
                .filter(|(k, info)| {
                    (IDENTITY_FIRST_CIDR..=IDENTITY_LAST_CIDR).contains(&info.identity)
                        || *k == sentinel
                }),
        ))
    }

    /// An ipcache key written outside [`Datapath::apply_policy`] (an endpoint's address) is no
    /// longer what policy wrote there: forget it, so the next apply writes it again if policy
    /// still wants it.
    fn forget_cidr(&mut self, prefix: u32, key: IpKey) {
        if let Some(m) = self.cidr_mirror.as_mut()
            && let Ok(i) = m.binary_search_by(|(k, _)| k.cmp(&(prefix, key)))
        {
            m.remove(i);
        }
    }

    fn remove_policy_key(&mut self, key: &Key<PolicyKey>) -> Result<()> {
        match self.policy.remove(key) {
            Ok(()) => Ok(()),
            Err(e) if is_not_found(&e) => Ok(()),
            Err(e) => Err(map_err("remove policy", MAP_POLICY)(e)),
        }
    }

    /// Number of entries in `POLICY` (one pass over the map).
    ///
    /// # Errors
    /// If the map read fails.
    pub fn policy_len(&self) -> Result<usize> {
        let mut n = 0;
        for key in self.policy.keys() {
            key.map_err(map_err("read policy", MAP_POLICY))?;
            n += 1;
        }
        Ok(n)
    }

    /// Removes conntrack entries: those of one endpoint, or all. Returns how many.
    ///
    /// # Errors
    /// If the map operation fails.
    pub fn flush_conntrack(&mut self, ifindex: Option<u32>) -> Result<usize> {
        let keys: Vec<CtKey> = self
            .conntrack
            .keys()
            .filter_map(std::result::Result::ok)
            .filter(|k| ifindex.is_none_or(|i| k.ifindex == i))
            .collect();
        let mut removed = 0;
        for key in keys {
            match self.conntrack.remove(&key) {
                Ok(()) => removed += 1,
                Err(e) if is_not_found(&e) => {}
                Err(e) => return Err(map_err("flush conntrack", MAP_CONNTRACK)(e)),
            }
        }
        Ok(removed)
    }

    /// Conntrack entries of one endpoint (for status output and tests).
    ///
    /// # Errors
    /// If the map read fails.
    pub fn conntrack_entries(&self, ifindex: u32) -> Result<Vec<(CtKey, CtValue)>> {
        let mut out = Vec::new();
        for item in self.conntrack.iter() {
            let (k, v) = item.map_err(map_err("read conntrack", MAP_CONNTRACK))?;
            if k.ifindex == ifindex {
                out.push((k, v));
            }
        }
        Ok(out)
    }

    /// The endpoint's counters, summed over CPUs (zeros if it never saw a packet).
    ///
    /// # Errors
    /// If the map read fails.
    pub fn read_counters(&self, ifindex: u32) -> Result<EndpointCounters> {
        let slot = self.slots.of(ifindex);
        let read = |dir: u8, verdict: u8| -> Result<CounterValue> {
            let Some(slot) = slot else {
                return Ok(CounterValue::default());
            };
            match self.counters.get(&counter_index(slot, dir, verdict), 0) {
                Ok(per_cpu) => {
                    Ok(per_cpu
                        .iter()
                        .fold(CounterValue::default(), |acc, v| CounterValue {
                            packets: acc.packets + v.packets,
                            bytes: acc.bytes + v.bytes,
                        }))
                }
                Err(e) if is_not_found(&e) => Ok(CounterValue::default()),
                Err(e) => Err(map_err(format!("read counters {ifindex}"), MAP_COUNTERS)(e)),
            }
        };
        Ok(EndpointCounters {
            ingress: DirectionCounters {
                allowed: read(DIR_INGRESS, VERDICT_ALLOW)?,
                denied: read(DIR_INGRESS, VERDICT_DENY)?,
            },
            egress: DirectionCounters {
                allowed: read(DIR_EGRESS, VERDICT_ALLOW)?,
                denied: read(DIR_EGRESS, VERDICT_DENY)?,
            },
        })
    }

    /// The drop-event reader. Needs a tokio runtime with I/O enabled; handed out once.
    ///
    /// # Errors
    /// [`DatapathError::Events`] when called twice or outside a runtime.
    pub fn drop_events(&mut self) -> Result<DropEvents> {
        let ring = self
            .events
            .take()
            .ok_or_else(|| DatapathError::Events("the reader was already taken".into()))?;
        DropEvents::new(ring).map_err(|e| DatapathError::Events(e.to_string()))
    }

    // -----------------------------------------------------------------------------------------
    // BPF_PROG_TEST_RUN

    /// Runs one program on a crafted Ethernet frame through `BPF_PROG_TEST_RUN`, as if it
    /// arrived on interface `ifindex` (which must exist in the calling thread's network
    /// namespace; 1 is `lo`), `repeat` times. `Direction::Egress` runs `sluice_egress` (what
    /// a container sends), `Direction::Ingress` runs `sluice_ingress`. Maps are shared with
    /// the attached programs: counters, conntrack and events see these runs.
    ///
    /// # Errors
    /// If the kernel rejects the run (e.g. a frame shorter than 14 bytes, unknown ifindex).
    pub fn test_run(
        &self,
        direction: Direction,
        frame: &[u8],
        ifindex: u32,
        repeat: u32,
    ) -> Result<TestRunOutcome> {
        let program = match direction {
            Direction::Egress => PROG_EGRESS,
            Direction::Ingress => PROG_INGRESS,
        };
        let prog: &SchedClassifier = self
            .ebpf
            .program(program)
            .ok_or(DatapathError::Missing(program))?
            .try_into()
            .map_err(|source| DatapathError::Program {
                op: "open".into(),
                program,
                source,
            })?;
        let mut ctx = [0u8; SKB_IFINDEX_OFFSET + 4];
        ctx[SKB_IFINDEX_OFFSET..].copy_from_slice(&ifindex.to_ne_bytes());
        let result = prog
            .test_run(TestRunOptions {
                data_in: Some(frame),
                ctx_in: Some(&ctx),
                repeat: repeat.max(1),
                ..TestRunOptions::default()
            })
            .map_err(|source| DatapathError::Program {
                op: "test run".into(),
                program,
                source,
            })?;
        Ok(TestRunOutcome {
            action: result.return_value,
            duration: result.duration,
        })
    }
}

fn map_data(map: &Map) -> Option<&MapData> {
    Some(match map {
        Map::HashMap(m)
        | Map::LruHashMap(m)
        | Map::LpmTrie(m)
        | Map::PerCpuHashMap(m)
        | Map::RingBuf(m)
        | Map::Array(m)
        | Map::PerCpuArray(m) => m,
        _ => return None,
    })
}

fn classifier<'a>(ebpf: &'a Ebpf, program: &'static str) -> Result<&'a SchedClassifier> {
    ebpf.program(program)
        .ok_or(DatapathError::Missing(program))?
        .try_into()
        .map_err(|source| DatapathError::Program {
            op: "open".into(),
            program,
            source,
        })
}

fn classifier_mut<'a>(
    ebpf: &'a mut Ebpf,
    program: &'static str,
) -> Result<&'a mut SchedClassifier> {
    ebpf.program_mut(program)
        .ok_or(DatapathError::Missing(program))?
        .try_into()
        .map_err(|source| DatapathError::Program {
            op: "open".into(),
            program,
            source,
        })
}

/// Names of the programs attached to interface `ifindex` (calling thread's network
/// namespace), per hook, as the kernel reports them: TCX links first (they run first), then
/// `cls_bpf` filters of the `clsact` qdisc. What `bpftool net` shows. For reconciliation and
/// tests; sluice's own on a host veth are [`PROG_EGRESS`] on `ingress` and [`PROG_INGRESS`]
/// on `egress` (filters), on a macvlan interface the sandbox programs (TCX).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TcPrograms {
    /// The device's ingress hook (what the container sends, for a host veth).
    pub ingress: Vec<String>,
    /// The device's egress hook (what the container receives).
    pub egress: Vec<String>,
}

/// Queries the hooks of `ifindex` (`BPF_PROG_QUERY` for TCX, a filter dump for `clsact`).
///
/// # Errors
/// [`DatapathError::NoSuchInterface`] or a failed query.
pub fn tc_programs(ifindex: u32) -> Result<TcPrograms> {
    let ifname = interface_name(ifindex)?;
    let query = |hook: TcAttachType, tc: TcHook| -> Result<Vec<String>> {
        let (_revision, programs) =
            SchedClassifier::query_tcx(&ifname, hook).map_err(|source| DatapathError::Program {
                op: format!("query tcx {hook:?} of {ifname} for"),
                program: "any",
                source,
            })?;
        let mut names: Vec<String> = programs
            .iter()
            .map(|p| p.name_as_str().unwrap_or("?").to_owned())
            .collect();
        names
            .extend(link::tc_bpf_programs(ifindex, tc).map_err(tc_error("list filters", ifindex))?);
        Ok(names)
    };
    Ok(TcPrograms {
        ingress: query(TcAttachType::Ingress, TcHook::Ingress)?,
        egress: query(TcAttachType::Egress, TcHook::Egress)?,
    })
}

/// The name of interface `ifindex` in the calling thread's network namespace.
fn interface_name(ifindex: u32) -> Result<String> {
    let interfaces = nix::net::if_::if_nameindex().map_err(|e| DatapathError::Pin {
        op: "list interfaces",
        path: PathBuf::from("if_nameindex"),
        source: e.into(),
    })?;
    interfaces
        .iter()
        .find(|i| i.index() == ifindex)
        .map(|i| i.name().to_string_lossy().into_owned())
        .ok_or(DatapathError::NoSuchInterface(ifindex))
}

#[cfg(test)]
mod tests {
    use super::CounterSlots;

    #[test]
    fn counter_slots_are_unique_reused_and_bounded() {
        // Adopted: ifindex 7 holds slot 2, 9 holds 0; slot 1 is free.
        let mut slots = CounterSlots::new(4, [(7, 2), (9, 0)]);
        assert_eq!(slots.of(7), Some(2));
        assert_eq!(slots.take(10), Some(1));
        assert_eq!(slots.take(11), Some(3));
        assert_eq!(slots.take(12), None, "capacity 4");
        slots.release(7);
        slots.release(7);
        assert_eq!(slots.of(7), None);
        assert_eq!(slots.take(12), Some(2));
        assert_eq!(slots.take(13), None);
    }
}
