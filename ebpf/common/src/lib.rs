// SPDX-License-Identifier: GPL-2.0 OR MIT
//! Map keys, map values and constants shared by sluice's TC programs (`sluice-ebpf`) and the
//! loader in `sluice-driver` (`datapath`).
//!
//! Every type is `#[repr(C)]` with explicit padding fields (always written as zero, so hash
//! keys compare byte-for-byte) and a compile-time size check below each definition: a struct
//! whose size equals the sum of its fields has no implicit padding. With the `user` feature
//! the types implement `aya::Pod`.
//!
//! Nothing here allocates or needs `std`; it builds for `bpfel-unknown-none` and for the host.

#![cfg_attr(not(test), no_std)]

use core::mem::size_of;

// ---------------------------------------------------------------------------------------------
// Names

/// Map: endpoint ifindex (`u32`) → [`EndpointInfo`]. Hash.
pub const MAP_ENDPOINTS: &str = "ENDPOINTS";
/// Map: address → [`IpInfo`]. LPM trie keyed by `{prefix_len: u32, IpKey}`.
pub const MAP_IPCACHE: &str = "IPCACHE";
/// Map: rule table → [`PolicyValue`]. LPM trie keyed by `{prefix_len: u32, PolicyKey}`.
pub const MAP_POLICY: &str = "POLICY";
/// Map: [`CtKey`] → [`CtValue`]. LRU hash.
pub const MAP_CONNTRACK: &str = "CONNTRACK";
/// Map: [`counter_index`] (the endpoint's [`EndpointInfo::slot`], direction, verdict) →
/// [`CounterValue`]. Per-CPU array: the programs bump a counter without a hash lookup.
pub const MAP_COUNTERS: &str = "COUNTERS";
/// Map: ring buffer of [`DropEvent`]s.
pub const MAP_EVENTS: &str = "EVENTS";
/// Map: index 0 → [`Settings`]. Array.
pub const MAP_SETTINGS: &str = "SETTINGS";
/// Map: index 0 → [`RateState`]. Per-CPU array, kernel-only state of the event rate limiter.
pub const MAP_EVENT_RATE: &str = "EVENT_RATE";
/// Map: address ([`IpKey`], 16 bytes, IPv4 v4-mapped) of an endpoint on this host → ifindex
/// (`u32`) of its host-side veth. Hash. The same-host fast path: the sender's program, after
/// the sender's egress and the receiver's ingress policy, `bpf_redirect_peer`s to it.
/// Empty when the fast path is off.
pub const MAP_LOCAL: &str = "LOCAL";

// --- fast path (issue 6) ---
/// Map: [`CtKey`] of a flow, from the point of view of the endpoint that will *reply* →
/// `bpf_ktime_get_ns()` when its last request was seen (`u64`). LRU hash. Requests that
/// reached a local endpoint through the bridge although their sender is a local endpoint of
/// the same network went through the host (a DNAT, a route): the replies must go back the
/// same way to be de-NATed, so the fast path leaves these flows to the bridge.
pub const MAP_BRIDGED: &str = "BRIDGED";
/// Map: ifindex of a `mode=vxlan` network's VXLAN device (`u32`) → the network's number
/// (`u32`). Hash. [`PROG_OVERLAY`] on that device delivers decapsulated frames for local
/// endpoints of that network straight to them. Empty when the fast path is off.
pub const MAP_OVERLAY: &str = "OVERLAY";
/// Program for the **TCX ingress** hook of a VXLAN device: what remote endpoints send; a
/// frame for a local endpoint of the device's network is judged by the receiver's
/// **ingress** policy and redirected into its namespace (the rest takes the bridge).
pub const PROG_OVERLAY: &str = "sluice_overlay";
/// Map: a `mode=vxlan` network's number (`u32`) → its [`Tunnel`] (VXLAN device, VNI, port,
/// underlay). Hash. The fast path towards other hosts: an endpoint's packet to a remote
/// endpoint of its network ([`MAP_VTEPS`]) is encapsulated by the program and sent out of the
/// underlay, or else handed straight to the VXLAN device; either way not through the bridge.
/// Empty when the fast path is off.
pub const MAP_TUNNELS: &str = "TUNNELS";
/// Map: address ([`IpKey`]) of a remote endpoint of a `mode=vxlan` network → its [`Vtep`]
/// (network, host's tunnel address). Hash. What the VXLAN device's forwarding database says,
/// keyed by address for the fast path.
pub const MAP_VTEPS: &str = "VTEPS";
/// Map: [`decap_key`] (UDP port, VNI) → [`Decap`] (the network's number and this host's
/// tunnel address, so the underlay's program needs one lookup, not two). Hash.
/// [`PROG_UNDERLAY`] on the underlay strips VXLAN packets of these tunnels itself.
pub const MAP_DECAP: &str = "DECAP";
/// Program for the **TCX ingress** hook of the underlay device of `mode=vxlan` networks: a
/// VXLAN packet of a tunnel in [`MAP_DECAP`] addressed to this host, carrying an IPv4 frame
/// for a local endpoint, is judged by the receiver's **ingress** policy, decapsulated and
/// redirected into the endpoint's namespace; everything else passes untouched (the VXLAN
/// device takes it).
pub const PROG_UNDERLAY: &str = "sluice_underlay";

/// Value of [`MAP_TUNNELS`].
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Tunnel {
    /// Ifindex of the network's VXLAN device.
    pub device: u32,
    /// Ifindex of the underlay device (the one holding `local`); 0: no encapsulation in the
    /// program (an IPv6 underlay), packets go to the VXLAN device.
    pub underlay: u32,
    /// VNI.
    pub vni: u32,
    /// This host's tunnel address (IPv4, network order).
    pub local: [u8; 4],
    /// MTU of the underlay: larger encapsulated packets go to the VXLAN device.
    pub mtu: u32,
    /// UDP destination port.
    pub port: u16,
    /// Zero.
    pub _pad: [u8; 2],
}
const _: () = assert!(size_of::<Tunnel>() == 24);

/// Value of [`MAP_VTEPS`].
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Vtep {
    /// The remote endpoint's network (local number).
    pub network: u32,
    /// Its host's tunnel address (IPv4, network order); zero for an IPv6 tunnel address
    /// (the VXLAN device encapsulates those).
    pub ipv4: [u8; 4],
}
const _: () = assert!(size_of::<Vtep>() == 8);

/// Value of [`MAP_DECAP`].
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Decap {
    /// The network's number (local).
    pub network: u32,
    /// This host's tunnel address (IPv4, network order): [`Tunnel::local`].
    pub local: [u8; 4],
}
const _: () = assert!(size_of::<Decap>() == 8);

/// Key of [`MAP_DECAP`].
#[must_use]
pub const fn decap_key(port: u16, vni: u32) -> u64 {
    ((port as u64) << 32) | (vni as u64)
}
/// Map: [`neigh_key`] (underlay ifindex, VTEP address) → [`Neigh`]. LRU hash, kernel-only: the
/// sender's program caches the underlay route's next hop (MACs, device) that `bpf_fib_lookup`
/// returned, so that a packet of a busy tunnel does not pay for a FIB and a neighbour lookup;
/// an entry older than [`NEIGH_TTL_NS`] is looked up again (a route or neighbour change is
/// seen within that time).
pub const MAP_NEIGH: &str = "NEIGH";

/// Value of [`MAP_NEIGH`].
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Neigh {
    /// `bpf_ktime_get_ns()` of the FIB lookup that filled the entry.
    pub checked_ns: u64,
    /// Device the route leaves through.
    pub ifindex: u32,
    /// Next hop's MAC.
    pub dmac: [u8; 6],
    /// The device's MAC.
    pub smac: [u8; 6],
}
const _: () = assert!(size_of::<Neigh>() == 24);

/// Key of [`MAP_NEIGH`].
#[must_use]
pub const fn neigh_key(underlay: u32, vtep: [u8; 4]) -> u64 {
    ((underlay as u64) << 32) | (u32::from_be_bytes(vtep) as u64)
}
/// How long a [`MAP_NEIGH`] entry is trusted (100 ms).
pub const NEIGH_TTL_NS: u64 = 100_000_000;
/// Default `max_entries` of [`MAP_NEIGH`] (VTEPs, not endpoints).
pub const DEFAULT_MAX_NEIGH: u32 = 4_096;

/// Default `max_entries` of [`MAP_BRIDGED`].
pub const DEFAULT_MAX_BRIDGED: u32 = 16_384;
/// Default `max_entries` of [`MAP_OVERLAY`], [`MAP_TUNNELS`] and [`MAP_DECAP`].
pub const DEFAULT_MAX_OVERLAY: u32 = 1_024;
/// Default `max_entries` of [`MAP_VTEPS`] (remote endpoint addresses).
pub const DEFAULT_MAX_VTEPS: u32 = 65_536;
// --- end fast path ---

/// Every map the object defines, in a fixed order.
pub const MAP_NAMES: [&str; 15] = [
    MAP_ENDPOINTS,
    MAP_IPCACHE,
    MAP_POLICY,
    MAP_CONNTRACK,
    MAP_COUNTERS,
    MAP_EVENTS,
    MAP_SETTINGS,
    MAP_EVENT_RATE,
    MAP_LOCAL,
    MAP_BRIDGED,
    MAP_OVERLAY,
    MAP_TUNNELS,
    MAP_VTEPS,
    MAP_DECAP,
    MAP_NEIGH,
];

/// Program for the **ingress** hook (`clsact`, a `cls_bpf` filter) of an endpoint's host-side
/// veth: it sees what the container *sends*, so it applies the endpoint's **egress** policy.
pub const PROG_EGRESS: &str = "sluice_egress";
/// Program for the **egress** hook (`clsact`, a `cls_bpf` filter) of an endpoint's host-side
/// veth: it sees what the container *receives*, so it applies the endpoint's **ingress**
/// policy.
pub const PROG_INGRESS: &str = "sluice_ingress";

/// Program for the **TCX egress** hook of a macvlan endpoint's own interface (inside the
/// container, no host-side peer): what the container *sends*, so its **egress** policy. An
/// unregistered interface drops.
pub const PROG_SANDBOX_EGRESS: &str = "sluice_sandbox_egress";
/// Program for the **TCX ingress** hook of a macvlan endpoint's own interface: what the
/// container *receives*, so its **ingress** policy. An unregistered interface drops.
pub const PROG_SANDBOX_INGRESS: &str = "sluice_sandbox_ingress";

/// Default `max_entries` of [`MAP_ENDPOINTS`].
pub const DEFAULT_MAX_ENDPOINTS: u32 = 16_384;
/// Default `max_entries` of [`MAP_IPCACHE`].
pub const DEFAULT_MAX_IPCACHE: u32 = 262_144;
/// Default `max_entries` of [`MAP_POLICY`].
pub const DEFAULT_MAX_POLICY: u32 = 1_048_576;
/// Default `max_entries` of [`MAP_CONNTRACK`].
pub const DEFAULT_MAX_CONNTRACK: u32 = 65_536;
/// Default `max_entries` of [`MAP_COUNTERS`] (endpoints × 2 directions × 2 verdicts).
pub const DEFAULT_MAX_COUNTERS: u32 = 4 * DEFAULT_MAX_ENDPOINTS;
/// Default size of [`MAP_EVENTS`] in bytes (a power of two, a multiple of the page size).
pub const DEFAULT_EVENTS_BYTES: u32 = 256 * 1024;

// ---------------------------------------------------------------------------------------------
// Directions, verdicts, identities, flags, reasons

/// Traffic the endpoint receives (seen on the host veth's TCX egress hook).
pub const DIR_INGRESS: u8 = 1;
/// Traffic the endpoint sends (seen on the host veth's TCX ingress hook).
pub const DIR_EGRESS: u8 = 2;

/// Policy verdict and counter class: let through.
pub const VERDICT_ALLOW: u8 = 1;
/// Policy verdict and counter class: dropped.
pub const VERDICT_DENY: u8 = 2;

/// Wildcard peer in [`PolicyKey`]: the rule applies to every peer. Never a real identity.
pub const IDENTITY_ANY: u32 = 0;
/// Reserved: the host itself (not used by the datapath yet).
pub const IDENTITY_HOST: u32 = 1;
/// Reserved: any address the ipcache does not know (an ipcache miss).
pub const IDENTITY_WORLD: u32 = 2;
/// First identity for endpoints (`IDENTITY_FIRST_ENDPOINT..IDENTITY_FIRST_CIDR`).
pub const IDENTITY_FIRST_ENDPOINT: u32 = 256;
/// First identity of the range reserved for CIDRs that policy mentions.
pub const IDENTITY_FIRST_CIDR: u32 = 1 << 24;
/// Last identity of the CIDR range (inclusive).
pub const IDENTITY_LAST_CIDR: u32 = (1 << 25) - 1;

/// [`EndpointInfo::flags`]: a policy selects this endpoint for ingress, so ingress is
/// default-deny (only what the POLICY map allows, and replies of allowed flows, pass).
pub const EP_INGRESS_ENFORCED: u32 = 1 << 0;
/// [`EndpointInfo::flags`]: as [`EP_INGRESS_ENFORCED`], for egress.
pub const EP_EGRESS_ENFORCED: u32 = 1 << 1;
/// [`EndpointInfo::flags`]: network isolation is on; traffic with an endpoint of *another*
/// sluice network (ipcache `network` non-zero and different) is dropped both ways.
pub const EP_ISOLATE: u32 = 1 << 2;
/// [`EndpointInfo::flags`]: the endpoint's identity is not known yet while policy applies on
/// its network; every IP packet is dropped both ways (fail closed). ARP, IPv6 neighbour
/// discovery and MLD still pass.
pub const EP_IDENTITY_PENDING: u32 = 1 << 3;
/// [`EndpointInfo::flags`]: anti-spoofing. An IP packet the container *sends* must come from
/// [`EndpointInfo::ipv4`] / [`EndpointInfo::ipv6`] (IPv6 link-local `fe80::/10` too);
/// anything else is dropped, so no container can borrow another's identity at a receiver's
/// ingress policy. Set it on every endpoint once its addresses are known.
pub const EP_SOURCE_CHECK: u32 = 1 << 4;

/// [`DropEvent::reason`]: a deny rule matched ([`DropEvent::rule_id`] names it).
pub const REASON_POLICY_DENY: u8 = 1;
/// [`DropEvent::reason`]: enforced direction and no rule allowed it (`rule_id` 0).
pub const REASON_DEFAULT_DENY: u8 = 2;
/// [`DropEvent::reason`]: peer is an endpoint of another network and isolation is on.
pub const REASON_ISOLATION: u8 = 3;
/// [`DropEvent::reason`]: the endpoint's identity is pending ([`EP_IDENTITY_PENDING`]).
pub const REASON_IDENTITY_PENDING: u8 = 4;
/// [`DropEvent::reason`]: a header the verdict needs is truncated or malformed.
pub const REASON_MALFORMED: u8 = 5;
/// [`DropEvent::reason`]: neither IP nor ARP (e.g. a VLAN-tagged frame) in a direction that
/// is enforced, or from/to an endpoint whose identity is pending.
pub const REASON_NOT_IP: u8 = 6;
/// [`DropEvent::reason`]: sent from an address that is not the endpoint's
/// ([`EP_SOURCE_CHECK`]).
pub const REASON_SPOOFED: u8 = 7;

/// IP protocol numbers the datapath knows.
pub const PROTO_ICMP: u8 = 1;
/// TCP.
pub const PROTO_TCP: u8 = 6;
/// UDP.
pub const PROTO_UDP: u8 = 17;
/// ICMPv6.
pub const PROTO_ICMPV6: u8 = 58;

/// Address family tag in [`CtKey`] and [`DropEvent`].
pub const FAMILY_V4: u8 = 4;
/// Address family tag for IPv6.
pub const FAMILY_V6: u8 = 6;

// ---------------------------------------------------------------------------------------------
// ENDPOINTS

/// Value of [`MAP_ENDPOINTS`], keyed by the ifindex of the endpoint's host-side veth.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct EndpointInfo {
    /// Security identity (`IDENTITY_FIRST_ENDPOINT..IDENTITY_FIRST_CIDR`).
    pub identity: u32,
    /// Network number (non-zero; the same number as in the ipcache entries of its addresses).
    pub network: u32,
    /// `EP_*` flags.
    pub flags: u32,
    /// The endpoint's IPv4 address (network order), all zero if it has none; checked with
    /// [`EP_SOURCE_CHECK`].
    pub ipv4: [u8; 4],
    /// The endpoint's IPv6 address, all zero if it has none; checked with
    /// [`EP_SOURCE_CHECK`].
    pub ipv6: [u8; 16],
    // issue 6 (policy subjects): the `subject` field and `with_subject`.
    /// Policy subject: the [`PolicyKey::subject`] of this endpoint's rules. Endpoints that the
    /// same set of policies selects share one subject, so `POLICY` holds rules × distinct
    /// rule sets, not rules × endpoints. [`SUBJECT_NONE`] when no policy selects it.
    pub subject: u32,
    /// The endpoint's slot in [`MAP_COUNTERS`] (see [`counter_index`]), unique among the
    /// registered endpoints; the loader assigns it, whatever the caller passes.
    pub slot: u32,
}
const _: () = assert!(size_of::<EndpointInfo>() == 40);

/// [`EndpointInfo::subject`] of an endpoint no policy selects (no `POLICY` entry has it).
pub const SUBJECT_NONE: u32 = 0;

impl EndpointInfo {
    /// An entry without addresses, whose policy subject is its identity (one rule set per
    /// endpoint; the driver shares subjects with [`EndpointInfo::with_subject`]).
    #[must_use]
    pub const fn new(identity: u32, network: u32, flags: u32) -> Self {
        Self {
            identity,
            network,
            flags,
            ipv4: [0; 4],
            ipv6: [0; 16],
            subject: identity,
            slot: 0,
        }
    }

    /// The same entry with policy subject `subject`.
    #[must_use]
    pub const fn with_subject(mut self, subject: u32) -> Self {
        self.subject = subject;
        self
    }

    /// The same entry with the endpoint's addresses (for [`EP_SOURCE_CHECK`]).
    #[must_use]
    pub const fn with_addresses(mut self, ipv4: Option<[u8; 4]>, ipv6: Option<[u8; 16]>) -> Self {
        if let Some(a) = ipv4 {
            self.ipv4 = a;
        }
        if let Some(a) = ipv6 {
            self.ipv6 = a;
        }
        self
    }
}

// ---------------------------------------------------------------------------------------------
// IPCACHE

/// Data part of the [`MAP_IPCACHE`] LPM key: an IPv6 address, or an IPv4 address as
/// v4-mapped `::ffff:a.b.c.d` (so an IPv4 `/n` is stored with prefix length `96 + n`).
/// The full kernel key is `{ prefix_len: u32, addr: [u8; 16] }` (20 bytes).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct IpKey {
    /// Address bytes in network order.
    pub addr: [u8; 16],
}
const _: () = assert!(size_of::<IpKey>() == 16);

/// Prefix length of the v4-mapped range: an IPv4 `/n` is an ipcache `/96+n`.
pub const IPV4_MAPPED_PREFIX: u32 = 96;

impl IpKey {
    /// `::ffff:a.b.c.d` for an IPv4 address given in network order.
    #[must_use]
    pub const fn v4(octets: [u8; 4]) -> Self {
        Self {
            addr: [
                0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, octets[0], octets[1], octets[2],
                octets[3],
            ],
        }
    }

    /// An IPv6 address given in network order.
    #[must_use]
    pub const fn v6(octets: [u8; 16]) -> Self {
        Self { addr: octets }
    }
}

/// Value of [`MAP_IPCACHE`].
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct IpInfo {
    /// Identity of the endpoint or CIDR.
    pub identity: u32,
    /// Network of the endpoint; 0 for CIDRs and anything outside sluice.
    pub network: u32,
}
const _: () = assert!(size_of::<IpInfo>() == 8);

// ---------------------------------------------------------------------------------------------
// POLICY

/// Data part of the [`MAP_POLICY`] LPM key (full kernel key: `{prefix_len: u32, PolicyKey}`,
/// 16 bytes). The trie matches bits in memory order, so the fields that are always matched
/// exactly come first and the maskable tail is `proto` then `dport` (big-endian):
///
/// | prefix_len | matches |
/// | --- | --- |
/// | [`POLICY_PREFIX_ANY_PROTO`] (72) | subject, peer, direction; any protocol and port |
/// | [`POLICY_PREFIX_PROTO`] (80) | … and protocol; any port |
/// | 80 + k | … and the top k bits of the port (a port range is ≤ 30 such prefixes) |
/// | [`POLICY_PREFIX_FULL`] (96) | … and one port |
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct PolicyKey {
    /// Policy subject of the endpoints the rule is for ([`EndpointInfo::subject`]).
    pub subject: u32,
    /// Identity of the other side, or [`IDENTITY_ANY`].
    pub peer: u32,
    /// [`DIR_INGRESS`] or [`DIR_EGRESS`].
    pub direction: u8,
    /// IP protocol number.
    pub proto: u8,
    /// Destination port in network byte order (for ICMP: `[type, code]`).
    pub dport: [u8; 2],
}
const _: () = assert!(size_of::<PolicyKey>() == 12);

/// Prefix length that matches subject, peer and direction only.
pub const POLICY_PREFIX_ANY_PROTO: u32 = 72;
/// Prefix length that adds the protocol.
pub const POLICY_PREFIX_PROTO: u32 = 80;
/// Prefix length of a fully specified key.
pub const POLICY_PREFIX_FULL: u32 = 96;

impl PolicyKey {
    /// A key with the port in host order (stored big-endian).
    #[must_use]
    pub const fn new(subject: u32, peer: u32, direction: u8, proto: u8, dport: u16) -> Self {
        Self {
            subject,
            peer,
            direction,
            proto,
            dport: dport.to_be_bytes(),
        }
    }
}

/// Value of [`MAP_POLICY`].
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct PolicyValue {
    /// [`VERDICT_ALLOW`] or [`VERDICT_DENY`] (as `u32`).
    pub verdict: u32,
    /// The rule this entry came from (reported in drop events); non-zero.
    pub rule_id: u32,
}
const _: () = assert!(size_of::<PolicyValue>() == 8);

// ---------------------------------------------------------------------------------------------
// CONNTRACK

/// Key of [`MAP_CONNTRACK`]: a flow as seen by one endpoint. It is normalised to the
/// endpoint's point of view (`local` = the container's side, whichever way the packet goes),
/// so a flow and its replies share one key, and it carries the ifindex so that each endpoint
/// tracks its own flows: A's egress allowing a flow must not let it skip B's ingress policy.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct CtKey {
    /// Host-side veth of the endpoint.
    pub ifindex: u32,
    /// The container's port, host order (ICMP echo: the identifier; other ICMP: 0).
    pub local_port: u16,
    /// The peer's port, host order (ICMP: 0).
    pub remote_port: u16,
    /// IP protocol number.
    pub proto: u8,
    /// [`FAMILY_V4`] or [`FAMILY_V6`].
    pub family: u8,
    /// Zero.
    pub _pad: [u8; 2],
    /// The container's address (IPv4 v4-mapped).
    pub local_addr: [u8; 16],
    /// The peer's address (IPv4 v4-mapped).
    pub remote_addr: [u8; 16],
}
const _: () = assert!(size_of::<CtKey>() == 44);

/// Value of [`MAP_CONNTRACK`].
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct CtValue {
    /// `bpf_ktime_get_ns()` when the flow was allowed.
    pub created_ns: u64,
    /// Direction of the packet that opened the flow ([`DIR_INGRESS`] / [`DIR_EGRESS`]).
    pub origin: u8,
    /// Zero.
    pub _pad: [u8; 7],
}
const _: () = assert!(size_of::<CtValue>() == 16);

// ---------------------------------------------------------------------------------------------
// COUNTERS

/// Index in [`MAP_COUNTERS`] of the counter of the endpoint in slot `slot`
/// ([`EndpointInfo::slot`]) for direction `direction` and verdict `verdict`: four per slot.
#[must_use]
pub const fn counter_index(slot: u32, direction: u8, verdict: u8) -> u32 {
    slot * 4 + ((direction as u32 & 1) << 1) + (verdict as u32 & 1)
}

/// Value of [`MAP_COUNTERS`] (per CPU; the loader sums them).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct CounterValue {
    /// Packets.
    pub packets: u64,
    /// Bytes (`skb->len`, including the Ethernet header).
    pub bytes: u64,
}
const _: () = assert!(size_of::<CounterValue>() == 16);

// ---------------------------------------------------------------------------------------------
// EVENTS

/// One record in [`MAP_EVENTS`]: a dropped packet.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct DropEvent {
    /// `bpf_ktime_get_ns()` (CLOCK_MONOTONIC).
    pub timestamp_ns: u64,
    /// Source address (IPv4 v4-mapped).
    pub src_addr: [u8; 16],
    /// Destination address (IPv4 v4-mapped).
    pub dst_addr: [u8; 16],
    /// Host-side veth of the endpoint.
    pub ifindex: u32,
    /// Rule that denied it; 0 for default deny, isolation, pending identity, malformed.
    pub rule_id: u32,
    /// Source port, host order (0 for ICMP and port-less protocols).
    pub src_port: u16,
    /// Destination port, host order (ICMP: `type << 8 | code`).
    pub dst_port: u16,
    /// IP protocol number (0 when not parsed).
    pub proto: u8,
    /// [`DIR_INGRESS`] or [`DIR_EGRESS`], from the endpoint's point of view.
    pub direction: u8,
    /// `REASON_*`.
    pub reason: u8,
    /// [`FAMILY_V4`], [`FAMILY_V6`] or 0 when not parsed.
    pub family: u8,
    /// Events this CPU suppressed (rate limit) since the previous one it delivered.
    pub suppressed: u32,
    /// Zero.
    pub _pad: u32,
}
const _: () = assert!(size_of::<DropEvent>() == 64);

// ---------------------------------------------------------------------------------------------
// SETTINGS / EVENT_RATE

/// Value of [`MAP_SETTINGS`] at index 0. Zero fields mean the built-in defaults.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Settings {
    /// Drop events each CPU may emit per second ([`DEFAULT_EVENTS_PER_SEC`] when 0).
    pub drop_events_per_sec: u32,
    /// Burst of drop events per CPU ([`DEFAULT_EVENTS_BURST`] when 0).
    pub drop_events_burst: u32,
}
const _: () = assert!(size_of::<Settings>() == 8);

/// Default sustained drop-event rate per CPU.
pub const DEFAULT_EVENTS_PER_SEC: u32 = 100;
/// Default drop-event burst per CPU.
pub const DEFAULT_EVENTS_BURST: u32 = 100;

/// Value of [`MAP_EVENT_RATE`]: a per-CPU token bucket. Tokens are counted in
/// event-nanoseconds: one event costs 1e9, and each elapsed nanosecond adds `rate`.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct RateState {
    /// Available tokens (event-nanoseconds).
    pub tokens: u64,
    /// Time of the last refill.
    pub last_ns: u64,
    /// Events suppressed since the last one emitted.
    pub suppressed: u32,
    /// Zero.
    pub _pad: u32,
}
const _: () = assert!(size_of::<RateState>() == 24);

// ---------------------------------------------------------------------------------------------
// aya::Pod

#[cfg(feature = "user")]
mod pod {
    use super::{
        CounterValue, CtKey, CtValue, Decap, DropEvent, EndpointInfo, IpInfo, IpKey, Neigh,
        PolicyKey, PolicyValue, RateState, Settings, Tunnel, Vtep,
    };

    // SAFETY: `aya::Pod` requires a `Copy + 'static` type that is valid for every bit pattern
    // and has no uninitialised bytes. Each type below is `#[repr(C)]`, holds only integers
    // and integer arrays (valid for any bits), and has a compile-time assertion in this crate
    // that its size equals the sum of its fields, so it has no implicit padding. Here:
    // EndpointInfo = three u32s + [u8; 4] + [u8; 16] + two u32s = 40 bytes.
    unsafe impl aya::Pod for EndpointInfo {}
    // SAFETY: as above (16 bytes of u8s; asserted).
    unsafe impl aya::Pod for IpKey {}
    // SAFETY: as above (two u32s; asserted).
    unsafe impl aya::Pod for IpInfo {}
    // SAFETY: as above.
    unsafe impl aya::Pod for Tunnel {}
    // SAFETY: as above.
    unsafe impl aya::Pod for Vtep {}
    // SAFETY: as above (u32, [u8; 4]; asserted).
    unsafe impl aya::Pod for Decap {}
    // SAFETY: as above (u64, u32, [u8; 6], [u8; 6]; asserted 24 bytes).
    unsafe impl aya::Pod for Neigh {}
    // SAFETY: as above (u32, u32, u8, u8, [u8; 2]; asserted 12 bytes).
    unsafe impl aya::Pod for PolicyKey {}
    // SAFETY: as above (two u32s; asserted).
    unsafe impl aya::Pod for PolicyValue {}
    // SAFETY: as above (44 bytes, explicit `_pad`; asserted).
    unsafe impl aya::Pod for CtKey {}
    // SAFETY: as above (u64 + u8 + [u8; 7]; asserted).
    unsafe impl aya::Pod for CtValue {}
    // SAFETY: as above (two u64s; asserted).
    unsafe impl aya::Pod for CounterValue {}
    // SAFETY: as above (64 bytes, explicit `_pad`; asserted).
    unsafe impl aya::Pod for DropEvent {}
    // SAFETY: as above (two u32s; asserted).
    unsafe impl aya::Pod for Settings {}
    // SAFETY: as above (u64, u64, u32, u32; asserted).
    unsafe impl aya::Pod for RateState {}
}

#[cfg(test)]
mod tests {
    use core::mem::{align_of, offset_of};

    use super::*;

    #[test]
    fn lpm_key_layouts_match_the_kernel_view() {
        // Kernel LPM keys are `{u32 prefixlen; u8 data[]}`; the data follows at offset 4.
        assert_eq!(size_of::<IpKey>(), 16);
        assert_eq!(align_of::<IpKey>(), 1);
        assert_eq!(size_of::<PolicyKey>(), 12);
        assert_eq!(offset_of!(PolicyKey, subject), 0);
        assert_eq!(offset_of!(PolicyKey, peer), 4);
        assert_eq!(offset_of!(PolicyKey, direction), 8);
        assert_eq!(offset_of!(PolicyKey, proto), 9);
        assert_eq!(offset_of!(PolicyKey, dport), 10);
        assert_eq!(POLICY_PREFIX_ANY_PROTO, 8 * 9);
        assert_eq!(POLICY_PREFIX_PROTO, 8 * 10);
        assert_eq!(POLICY_PREFIX_FULL as usize, 8 * size_of::<PolicyKey>());
    }

    #[test]
    fn endpoint_addresses_follow_the_u32s() {
        assert_eq!(offset_of!(EndpointInfo, ipv4), 12);
        assert_eq!(offset_of!(EndpointInfo, ipv6), 16);
        assert_eq!(offset_of!(EndpointInfo, subject), 32);
        assert_eq!(offset_of!(EndpointInfo, slot), 36);
        let e =
            EndpointInfo::new(300, 1, EP_SOURCE_CHECK).with_addresses(Some([10, 0, 0, 1]), None);
        assert_eq!(e.ipv4, [10, 0, 0, 1]);
        assert_eq!(e.ipv6, [0; 16]);
    }

    #[test]
    fn each_slot_has_four_counters_of_its_own() {
        let mut seen = std::collections::BTreeSet::new();
        for slot in [0, 1, DEFAULT_MAX_ENDPOINTS - 1] {
            for dir in [DIR_INGRESS, DIR_EGRESS] {
                for verdict in [VERDICT_ALLOW, VERDICT_DENY] {
                    let i = counter_index(slot, dir, verdict);
                    assert!(
                        i / 4 == slot && i < DEFAULT_MAX_COUNTERS,
                        "{slot} {dir} {verdict}"
                    );
                    assert!(seen.insert(i));
                }
            }
        }
    }

    #[test]
    fn conntrack_and_event_offsets() {
        assert_eq!(offset_of!(CtKey, local_addr), 12);
        assert_eq!(offset_of!(CtKey, remote_addr), 28);
        assert_eq!(offset_of!(CtValue, origin), 8);
        assert_eq!(offset_of!(DropEvent, src_addr), 8);
        assert_eq!(offset_of!(DropEvent, ifindex), 40);
        assert_eq!(offset_of!(DropEvent, src_port), 48);
        assert_eq!(offset_of!(DropEvent, suppressed), 56);
    }

    #[test]
    fn port_is_big_endian_and_v4_is_mapped() {
        let k = PolicyKey::new(300, 2, DIR_INGRESS, PROTO_TCP, 0x1234);
        assert_eq!(k.dport, [0x12, 0x34]);
        assert_eq!(
            IpKey::v4([10, 0, 0, 1]).addr,
            [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 10, 0, 0, 1]
        );
    }

    #[test]
    fn identity_ranges_do_not_overlap() {
        const {
            assert!(IDENTITY_WORLD < IDENTITY_FIRST_ENDPOINT);
            assert!(IDENTITY_FIRST_ENDPOINT < IDENTITY_FIRST_CIDR);
            assert!(IDENTITY_FIRST_CIDR < IDENTITY_LAST_CIDR);
        }
    }
}
