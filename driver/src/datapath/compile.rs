//! The policy compiler: rules in, the exact `POLICY` and `IPCACHE` entries out. Pure (no I/O,
//! no kernel), so it is unit-tested without root.
//!
//! The datapath does a fixed number of lookups per packet (see `sluice-ebpf`): one `POLICY`
//! lookup with the peer's identity and one with [`IDENTITY_ANY`], each an LPM-trie lookup
//! that returns the *longest* matching prefix over `(proto, port)`. Deny wins *between* the
//! two lookups in the kernel; *within* one `(subject, peer, direction)` key space this
//! compiler makes the longest match carry the deny-wins answer:
//!
//! - prefixes nest or are disjoint, so for a packet the matching entries form a chain;
//! - an allow entry inside (or equal to) a deny entry is dropped, so the longest match is a
//!   deny whenever any deny covers the packet;
//! - an entry whose nearest surviving ancestor has the same verdict is dropped as redundant.
//!
//! CIDR peers get identities from a reserved range ([`CidrIdentities`]); the ipcache holds
//! one entry per CIDR and the kernel's LPM lookup returns the most specific one, so a rule on
//! a CIDR is also written for every more specific CIDR that policy mentions (same family).
//! Endpoint addresses (/32, /128) carry endpoint identities and are always more specific than
//! any CIDR: CIDR rules apply to addresses that are not sluice endpoints (as in Cilium).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;

use ipnetwork::IpNetwork;
use sluice_common::{
    DIR_EGRESS, DIR_INGRESS, IDENTITY_ANY, IDENTITY_FIRST_CIDR, IDENTITY_LAST_CIDR, IDENTITY_WORLD,
    IPV4_MAPPED_PREFIX, IpInfo, IpKey, POLICY_PREFIX_ANY_PROTO, PROTO_ICMP, PROTO_ICMPV6,
    PROTO_TCP, PROTO_UDP, PolicyKey, PolicyValue, SUBJECT_NONE, VERDICT_ALLOW, VERDICT_DENY,
};

/// Which way a rule applies, from the subject endpoint's point of view.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Direction {
    /// Traffic the subject receives.
    Ingress,
    /// Traffic the subject sends.
    Egress,
}

impl Direction {
    /// The datapath's encoding (`DIR_*`).
    #[must_use]
    pub const fn code(self) -> u8 {
        match self {
            Self::Ingress => DIR_INGRESS,
            Self::Egress => DIR_EGRESS,
        }
    }
}

/// The other side of a rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Peer {
    /// An endpoint identity, or a reserved one ([`IDENTITY_WORLD`], `IDENTITY_HOST`).
    Identity(u32),
    /// Addresses in a CIDR that are not sluice endpoints.
    Cidr(IpNetwork),
    /// Everything.
    Any,
}

/// Transport protocol of a rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Protocol {
    /// Every protocol, every port.
    Any,
    /// TCP, optionally limited to a destination port range.
    Tcp,
    /// UDP, optionally limited to a destination port range.
    Udp,
    /// ICMP and ICMPv6, every type.
    Icmp,
}

/// An inclusive destination port range.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PortRange {
    /// First port.
    pub first: u16,
    /// Last port (≥ `first`).
    pub last: u16,
}

impl PortRange {
    /// One port.
    #[must_use]
    pub const fn single(port: u16) -> Self {
        Self {
            first: port,
            last: port,
        }
    }
}

/// What a rule does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Action {
    /// Let it through (and its replies, via conntrack).
    Allow,
    /// Drop it, whatever else allows it.
    Deny,
}

/// One rule, with its subjects already resolved to identities.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    /// Reported in drop events; non-zero.
    pub id: u32,
    /// Policy subjects of the endpoints the rule is for (`EndpointInfo::subject`; in tests
    /// often simply endpoint identities, as `EndpointInfo::new` defaults to that).
    pub subjects: Vec<u32>,
    /// Ingress or egress.
    pub direction: Direction,
    /// The other side.
    pub peer: Peer,
    /// Protocol.
    pub protocol: Protocol,
    /// Destination ports (TCP/UDP only); `None` = all.
    pub ports: Option<PortRange>,
    /// Allow or deny.
    pub action: Action,
}

/// A full `POLICY` key: the trie's prefix length and the data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PolicyEntry {
    /// Bits of `key` that must match (72..=96).
    pub prefix_len: u32,
    /// Subject, peer, direction, protocol, port (bits past `prefix_len` are zero).
    pub key: PolicyKey,
}

/// The compiler's output: exactly what the maps should hold.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CompiledPolicy {
    /// `POLICY` entries.
    pub entries: BTreeMap<PolicyEntry, PolicyValue>,
    /// Identity of every CIDR policy mentions (normalised: host bits cleared).
    pub cidrs: BTreeMap<IpNetwork, u32>,
}

impl CompiledPolicy {
    /// The `IPCACHE` entries policy owns: one per CIDR, plus `::ffff:0:0/96 → WORLD` (unless
    /// `0.0.0.0/0` is itself a policy CIDR) so that an IPv4 address can never fall into an
    /// IPv6 CIDR such as `::/0`. Sorted by key, in one vector (one allocation for 100k
    /// CIDRs; the datapath keeps it as its mirror of what it wrote).
    #[must_use]
    pub fn ipcache_entries(&self) -> Vec<((u32, IpKey), IpInfo)> {
        let mut out: Vec<((u32, IpKey), IpInfo)> = self
            .cidrs
            .iter()
            .map(|(net, &identity)| {
                (
                    ip_key(*net),
                    IpInfo {
                        identity,
                        network: 0,
                    },
                )
            })
            .collect();
        if !out.iter().any(|(k, _)| *k == v4_mapped_range()) {
            out.push((
                v4_mapped_range(),
                IpInfo {
                    identity: IDENTITY_WORLD,
                    network: 0,
                },
            ));
        }
        // Distinct CIDRs have distinct keys (host bits cleared, no v4-mapped IPv6).
        out.sort_unstable_by_key(|(k, _)| *k);
        out
    }
}

/// The ipcache key of the whole IPv4 space (`::ffff:0:0/96`).
#[must_use]
pub fn v4_mapped_range() -> (u32, IpKey) {
    (IPV4_MAPPED_PREFIX, IpKey::v4([0; 4]))
}

/// The ipcache key (prefix length, data) of a network; IPv4 becomes v4-mapped and host bits
/// are cleared.
#[must_use]
pub fn ip_key(net: IpNetwork) -> (u32, IpKey) {
    match net.network() {
        IpAddr::V4(a) => (
            IPV4_MAPPED_PREFIX + u32::from(net.prefix()),
            IpKey::v4(a.octets()),
        ),
        IpAddr::V6(a) => (u32::from(net.prefix()), IpKey::v6(a.octets())),
    }
}

/// Why a rule set does not compile.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CompileError {
    /// Rule ids must be non-zero (0 means "default deny" in drop events).
    #[error("rule id 0 is reserved for default deny")]
    ZeroRuleId,
    /// Subject 0 (`SUBJECT_NONE`: no policy selects the endpoint).
    #[error("rule {rule}: subject {identity} is reserved for endpoints without policy")]
    BadSubject {
        /// Rule id.
        rule: u32,
        /// The identity.
        identity: u32,
    },
    /// `Peer::Identity(0)` (that is the wildcard) or a CIDR-range identity.
    #[error("rule {rule}: peer identity {identity} is reserved (use Peer::Any or Peer::Cidr)")]
    BadPeer {
        /// Rule id.
        rule: u32,
        /// The identity.
        identity: u32,
    },
    /// Ports on a protocol without ports, or `first > last`.
    #[error("rule {rule}: {reason}")]
    BadPorts {
        /// Rule id.
        rule: u32,
        /// What is wrong.
        reason: &'static str,
    },
    /// An IPv6 CIDR inside `::ffff:0:0/96`; write it as IPv4.
    #[error("rule {rule}: CIDR {cidr} is IPv4-mapped; write it as IPv4")]
    MappedCidr {
        /// Rule id.
        rule: u32,
        /// The CIDR.
        cidr: IpNetwork,
    },
    /// More CIDRs than the reserved identity range holds.
    #[error("out of CIDR identities")]
    CidrIdentitiesExhausted,
}

/// Stable CIDR → identity assignments across compilations, so that a policy change does not
/// renumber (and briefly mismatch) CIDRs that stay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CidrIdentities {
    assigned: BTreeMap<IpNetwork, u32>,
    free: BTreeSet<u32>,
    next: u32,
}

impl Default for CidrIdentities {
    fn default() -> Self {
        Self {
            assigned: BTreeMap::new(),
            free: BTreeSet::new(),
            next: IDENTITY_FIRST_CIDR,
        }
    }
}

impl CidrIdentities {
    /// Restores assignments (e.g. from the store).
    #[must_use]
    pub fn from_assignments(assigned: BTreeMap<IpNetwork, u32>) -> Self {
        let next = assigned
            .values()
            .copied()
            .max()
            .map_or(IDENTITY_FIRST_CIDR, |m| m + 1);
        let used: BTreeSet<u32> = assigned.values().copied().collect();
        let free = (IDENTITY_FIRST_CIDR..next)
            .filter(|i| !used.contains(i))
            .collect();
        Self {
            assigned,
            free,
            next,
        }
    }

    /// Current assignments.
    #[must_use]
    pub fn assignments(&self) -> &BTreeMap<IpNetwork, u32> {
        &self.assigned
    }

    /// Keeps the identities of `cidrs` already assigned, frees the others, assigns new ones.
    /// `cidrs` sorted, without duplicates.
    fn retain_and_assign(&mut self, cidrs: &[IpNetwork]) -> Result<(), CompileError> {
        let gone: Vec<IpNetwork> = self
            .assigned
            .keys()
            .filter(|c| cidrs.binary_search(c).is_err())
            .copied()
            .collect();
        for c in gone {
            if let Some(id) = self.assigned.remove(&c) {
                self.free.insert(id);
            }
        }
        for c in cidrs {
            if self.assigned.contains_key(c) {
                continue;
            }
            let id = if let Some(id) = self.free.pop_first() {
                id
            } else if self.next <= IDENTITY_LAST_CIDR {
                self.next += 1;
                self.next - 1
            } else {
                return Err(CompileError::CidrIdentitiesExhausted);
            };
            self.assigned.insert(*c, id);
        }
        Ok(())
    }
}

/// `net` with host bits cleared.
fn normalise(net: IpNetwork) -> IpNetwork {
    IpNetwork::new(net.network(), net.prefix()).unwrap_or(net)
}

fn is_v4_mapped(net: &IpNetwork) -> bool {
    match net {
        IpNetwork::V6(n) => n.prefix() >= 96 && n.network().to_ipv4_mapped().is_some(),
        IpNetwork::V4(_) => false,
    }
}

/// `net` shortened to `prefix` bits (same family), host bits cleared.
fn truncate(net: IpNetwork, prefix: u8) -> Option<IpNetwork> {
    IpNetwork::new(net.network(), prefix).ok().map(normalise)
}

/// The CIDR-range identities a `Peer::Cidr(n)` rule covers besides `n`'s own: every policy
/// CIDR of the same family strictly inside it. Only CIDRs that contain another have an entry
/// (100k disjoint host prefixes make an empty map).
fn cidr_cover(assigned: &BTreeMap<IpNetwork, u32>) -> HashMap<IpNetwork, Vec<u32>> {
    let mut cover: HashMap<IpNetwork, Vec<u32>> = HashMap::new();
    for (&net, &id) in assigned {
        for len in 0..net.prefix() {
            if let Some(ancestor) = truncate(net, len)
                && assigned.contains_key(&ancestor)
            {
                cover.entry(ancestor).or_default().push(id);
            }
        }
    }
    cover
}

/// Splits `[first, last]` into aligned power-of-two blocks: `(start, fixed_bits)`, at most
/// 30 of them for 16-bit ports, 1 for 0–65535.
#[must_use]
pub fn port_prefixes(first: u16, last: u16) -> Vec<(u16, u8)> {
    let mut out = Vec::new();
    let mut start = u32::from(first);
    let end = u32::from(last);
    while start <= end {
        let mut size = start.trailing_zeros().min(16);
        while start + (1 << size) - 1 > end {
            size -= 1;
        }
        // `start` < 65536 and size ≤ 16 by construction.
        out.push((u16::try_from(start).unwrap_or(u16::MAX), 16 - size as u8));
        start += 1 << size;
    }
    out
}

/// A prefix over the 24-bit `(proto, port)` tail of a [`PolicyKey`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct Tail {
    /// Fixed bits (0 = any protocol, 8 = protocol, 8 + k = protocol and k port bits).
    len: u8,
    /// `proto << 16 | port`, bits past `len` zero.
    bits: u32,
}

impl Tail {
    fn mask(len: u8) -> u32 {
        if len == 0 {
            0
        } else {
            (0x00ff_ffff_u32 << (24 - u32::from(len))) & 0x00ff_ffff
        }
    }

    fn ancestor(self, len: u8) -> Self {
        Self {
            len,
            bits: self.bits & Self::mask(len),
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Verdict {
    deny: bool,
    rule_id: u32,
}

/// The tails a rule's protocol and ports expand to.
fn tails(rule: &Rule) -> Result<Vec<Tail>, CompileError> {
    let bad = |reason| CompileError::BadPorts {
        rule: rule.id,
        reason,
    };
    let proto_tail = |proto: u8| Tail {
        len: 8,
        bits: u32::from(proto) << 16,
    };
    match (rule.protocol, rule.ports) {
        (Protocol::Any, None) => Ok(vec![Tail { len: 0, bits: 0 }]),
        (Protocol::Any, Some(_)) => Err(bad("ports need protocol tcp or udp")),
        (Protocol::Icmp, None) => Ok(vec![proto_tail(PROTO_ICMP), proto_tail(PROTO_ICMPV6)]),
        (Protocol::Icmp, Some(_)) => Err(bad("icmp has no ports")),
        (Protocol::Tcp | Protocol::Udp, ports) => {
            let proto = if rule.protocol == Protocol::Tcp {
                PROTO_TCP
            } else {
                PROTO_UDP
            };
            let Some(PortRange { first, last }) = ports else {
                return Ok(vec![proto_tail(proto)]);
            };
            if first > last {
                return Err(bad("port range first > last"));
            }
            Ok(port_prefixes(first, last)
                .into_iter()
                .map(|(start, fixed)| Tail {
                    len: 8 + fixed,
                    bits: u32::from(proto) << 16 | u32::from(start),
                })
                .collect())
        }
    }
}

/// Compiles `rules` into map entries, assigning CIDR identities through `cidrs` (which keeps
/// them stable across calls).
///
/// # Errors
/// [`CompileError`] for an invalid rule; nothing is assigned then.
pub fn compile(rules: &[Rule], cidrs: &mut CidrIdentities) -> Result<CompiledPolicy, CompileError> {
    let mut next = cidrs.clone();
    let entries = compile_entries(rules, &mut next)?;
    *cidrs = next;
    Ok(CompiledPolicy {
        entries,
        cidrs: cidrs.assignments().clone(),
    })
}

/// [`compile`] for a caller that does not keep `cidrs` (they become the output's): no copy
/// of the assignments, which have an entry per CIDR.
///
/// # Errors
/// [`CompileError`] for an invalid rule.
pub fn compile_owned(
    rules: &[Rule],
    mut cidrs: CidrIdentities,
) -> Result<CompiledPolicy, CompileError> {
    let entries = compile_entries(rules, &mut cidrs)?;
    Ok(CompiledPolicy {
        entries,
        cidrs: cidrs.assigned,
    })
}

/// The `POLICY` entries of `rules`, assigning CIDR identities in `next` (left half-updated
/// on error: callers pass a copy or drop it).
fn compile_entries(
    rules: &[Rule],
    next: &mut CidrIdentities,
) -> Result<BTreeMap<PolicyEntry, PolicyValue>, CompileError> {
    // Validate, and collect CIDRs.
    // A sorted vector rather than a set: one allocation for 100k CIDRs.
    let mut policy_cidrs = Vec::new();
    for rule in rules {
        if rule.id == 0 {
            return Err(CompileError::ZeroRuleId);
        }
        if let Some(&identity) = rule.subjects.iter().find(|&&s| s == SUBJECT_NONE) {
            return Err(CompileError::BadSubject {
                rule: rule.id,
                identity,
            });
        }
        match rule.peer {
            Peer::Identity(identity)
                if identity == IDENTITY_ANY || identity >= IDENTITY_FIRST_CIDR =>
            {
                return Err(CompileError::BadPeer {
                    rule: rule.id,
                    identity,
                });
            }
            Peer::Cidr(net) if is_v4_mapped(&net) => {
                return Err(CompileError::MappedCidr {
                    rule: rule.id,
                    cidr: net,
                });
            }
            Peer::Cidr(net) => {
                policy_cidrs.push(normalise(net));
            }
            Peer::Identity(_) | Peer::Any => {}
        }
        tails(rule)?;
    }
    policy_cidrs.sort_unstable();
    policy_cidrs.dedup();
    next.retain_and_assign(&policy_cidrs)?;
    drop(policy_cidrs);
    let cover = cidr_cover(next.assignments());

    // Atoms: (key space (subject, peer, direction), tail, verdict), in one flat vector rather
    // than a map per key space (a 100k-CIDR policy has 100k key spaces of one atom each).
    let mut atoms: Vec<((u32, u32, u8), Tail, Verdict)> = Vec::new();
    for rule in rules {
        let deny = rule.action == Action::Deny;
        let rule_tails = tails(rule)?;
        let verdict = Verdict {
            deny,
            rule_id: rule.id,
        };
        let mut push = |peer: u32| {
            for &subject in &rule.subjects {
                for &tail in &rule_tails {
                    atoms.push(((subject, peer, rule.direction.code()), tail, verdict));
                }
            }
        };
        match rule.peer {
            Peer::Identity(id) => push(id),
            Peer::Any => push(IDENTITY_ANY),
            Peer::Cidr(net) => {
                let net = normalise(net);
                if let Some(&id) = next.assignments().get(&net) {
                    push(id);
                }
                for &id in cover.get(&net).into_iter().flatten() {
                    push(id);
                }
            }
        }
    }
    // Duplicates merged: deny wins, then the lowest rule id (sorted first within an atom).
    atoms
        .sort_unstable_by_key(|(space, tail, v)| (*space, tail.len, tail.bits, !v.deny, v.rule_id));
    atoms.dedup_by_key(|(space, tail, _)| (*space, *tail));

    let mut entries = BTreeMap::new();
    let mut kept = Vec::new();
    for space_atoms in atoms.chunk_by(|a, b| a.0 == b.0) {
        let (subject, peer, direction) = space_atoms[0].0;
        kept.clear();
        resolve(space_atoms, &mut kept);
        for &(tail, verdict) in &kept {
            let proto = u8::try_from(tail.bits >> 16).unwrap_or(0);
            let port = u16::try_from(tail.bits & 0xffff).unwrap_or(0);
            entries.insert(
                PolicyEntry {
                    prefix_len: POLICY_PREFIX_ANY_PROTO + u32::from(tail.len),
                    key: PolicyKey::new(subject, peer, direction, proto, port),
                },
                PolicyValue {
                    verdict: u32::from(if verdict.deny {
                        VERDICT_DENY
                    } else {
                        VERDICT_ALLOW
                    }),
                    rule_id: verdict.rule_id,
                },
            );
        }
    }
    Ok(entries)
}

/// Makes the longest match carry the deny-wins verdict (see the module docs). `atoms` are
/// one key space's, sorted by tail length, without duplicate tails; the entries to write are
/// appended to `out`.
fn resolve(atoms: &[((u32, u32, u8), Tail, Verdict)], out: &mut Vec<(Tail, Verdict)>) {
    let mut kept: HashMap<Tail, Verdict> = HashMap::new();
    for &(_, tail, verdict) in atoms {
        let mut nearest: Option<Verdict> = None;
        let mut under_deny = false;
        for len in (0..tail.len).rev() {
            if let Some(v) = kept.get(&tail.ancestor(len)) {
                if nearest.is_none() {
                    nearest = Some(*v);
                }
                under_deny |= v.deny;
            }
        }
        let redundant = nearest.is_some_and(|n| n.deny == verdict.deny);
        if (under_deny && !verdict.deny) || redundant {
            continue;
        }
        if atoms.len() > 1 {
            kept.insert(tail, verdict);
        }
        out.push((tail, verdict));
    }
}

#[cfg(test)]
mod tests {
    use sluice_common::{POLICY_PREFIX_FULL, POLICY_PREFIX_PROTO};

    use super::*;

    const WEB: u32 = 300;
    const DB: u32 = 301;
    const CLIENT: u32 = 302;

    fn rule(
        id: u32,
        peer: Peer,
        protocol: Protocol,
        ports: Option<(u16, u16)>,
        action: Action,
    ) -> Rule {
        Rule {
            id,
            subjects: vec![DB],
            direction: Direction::Ingress,
            peer,
            protocol,
            ports: ports.map(|(first, last)| PortRange { first, last }),
            action,
        }
    }

    fn net(s: &str) -> IpNetwork {
        s.parse().unwrap()
    }

    /// What the kernel does: the longest matching entry of one key space.
    fn lpm(
        c: &CompiledPolicy,
        subject: u32,
        peer: u32,
        dir: u8,
        proto: u8,
        port: u16,
    ) -> Option<PolicyValue> {
        let probe = PolicyKey::new(subject, peer, dir, proto, port);
        let bits = u128::from_be_bytes({
            let mut b = [0u8; 16];
            b[4..8].copy_from_slice(&probe.subject.to_ne_bytes());
            b[8..12].copy_from_slice(&probe.peer.to_ne_bytes());
            b[12] = probe.direction;
            b[13] = probe.proto;
            b[14..16].copy_from_slice(&probe.dport);
            b
        });
        c.entries
            .iter()
            .filter(|(e, _)| {
                let mut b = [0u8; 16];
                b[4..8].copy_from_slice(&e.key.subject.to_ne_bytes());
                b[8..12].copy_from_slice(&e.key.peer.to_ne_bytes());
                b[12] = e.key.direction;
                b[13] = e.key.proto;
                b[14..16].copy_from_slice(&e.key.dport);
                let entry = u128::from_be_bytes(b);
                // Compare the first 32 + prefix_len bits (the leading 32 are padding here).
                let mask = u128::MAX << (128 - 32 - e.prefix_len);
                entry & mask == bits & mask
            })
            .max_by_key(|(e, _)| e.prefix_len)
            .map(|(_, v)| *v)
    }

    /// The verdict the kernel reaches: exact peer, then ANY; deny from either wins.
    fn verdict(c: &CompiledPolicy, peer: u32, proto: u8, port: u16) -> Option<u8> {
        let a = lpm(c, DB, peer, DIR_INGRESS, proto, port);
        let b = lpm(c, DB, IDENTITY_ANY, DIR_INGRESS, proto, port);
        let deny = u32::from(VERDICT_DENY);
        if a.is_some_and(|v| v.verdict == deny) || b.is_some_and(|v| v.verdict == deny) {
            Some(VERDICT_DENY)
        } else if a.is_some() || b.is_some() {
            Some(VERDICT_ALLOW)
        } else {
            None
        }
    }

    #[test]
    fn allow_by_identity_and_port() {
        let rules = [rule(
            1,
            Peer::Identity(WEB),
            Protocol::Tcp,
            Some((5432, 5432)),
            Action::Allow,
        )];
        let c = compile(&rules, &mut CidrIdentities::default()).unwrap();
        assert_eq!(c.entries.len(), 1);
        let (e, v) = c.entries.iter().next().unwrap();
        assert_eq!(e.prefix_len, POLICY_PREFIX_FULL);
        assert_eq!(e.key, PolicyKey::new(DB, WEB, DIR_INGRESS, PROTO_TCP, 5432));
        assert_eq!(
            *v,
            PolicyValue {
                verdict: VERDICT_ALLOW.into(),
                rule_id: 1
            }
        );
        assert_eq!(verdict(&c, WEB, PROTO_TCP, 5432), Some(VERDICT_ALLOW));
        assert_eq!(verdict(&c, WEB, PROTO_TCP, 5433), None);
        assert_eq!(verdict(&c, WEB, PROTO_UDP, 5432), None);
        assert_eq!(verdict(&c, CLIENT, PROTO_TCP, 5432), None);
    }

    #[test]
    fn full_port_range_is_one_entry_and_ranges_stay_small() {
        let all = [rule(
            1,
            Peer::Any,
            Protocol::Tcp,
            Some((0, 65535)),
            Action::Allow,
        )];
        let c = compile(&all, &mut CidrIdentities::default()).unwrap();
        assert_eq!(c.entries.len(), 1);
        assert_eq!(
            c.entries.keys().next().unwrap().prefix_len,
            POLICY_PREFIX_PROTO
        );

        assert_eq!(port_prefixes(0, 65535), vec![(0, 0)]);
        assert_eq!(port_prefixes(1, 65535).len(), 16);
        assert_eq!(port_prefixes(1, 65534).len(), 30);
        assert_eq!(port_prefixes(80, 80), vec![(80, 16)]);
        // 8000-8063, 8064-8095, 8096-8099.
        assert_eq!(port_prefixes(8000, 8099).len(), 3);
        // Worst case over a sweep of ranges.
        let worst = (0..=65535u16)
            .step_by(997)
            .flat_map(|a| {
                (a..=65535)
                    .step_by(1009)
                    .map(move |b| port_prefixes(a, b).len())
            })
            .max()
            .unwrap();
        assert!(worst <= 30, "{worst}");
    }

    #[test]
    fn port_prefixes_cover_exactly_the_range() {
        for (first, last) in [
            (0, 0),
            (1, 1023),
            (1024, 49151),
            (443, 8443),
            (65535, 65535),
            (7, 12),
        ] {
            let mut covered = Vec::new();
            for (start, fixed) in port_prefixes(first, last) {
                let size = 1u32 << (16 - fixed);
                assert_eq!(u32::from(start) % size, 0, "aligned");
                covered.extend(u32::from(start)..u32::from(start) + size);
            }
            let want: Vec<u32> = (u32::from(first)..=u32::from(last)).collect();
            assert_eq!(covered, want, "{first}-{last}");
        }
    }

    #[test]
    fn deny_wins_within_a_key_space() {
        // Allow tcp 1-1000 from WEB, deny tcp 500-600 from WEB.
        let rules = [
            rule(
                1,
                Peer::Identity(WEB),
                Protocol::Tcp,
                Some((1, 1000)),
                Action::Allow,
            ),
            rule(
                2,
                Peer::Identity(WEB),
                Protocol::Tcp,
                Some((500, 600)),
                Action::Deny,
            ),
        ];
        let c = compile(&rules, &mut CidrIdentities::default()).unwrap();
        for port in [1, 499, 601, 1000] {
            assert_eq!(
                verdict(&c, WEB, PROTO_TCP, port),
                Some(VERDICT_ALLOW),
                "{port}"
            );
        }
        for port in [500, 512, 550, 600] {
            assert_eq!(
                verdict(&c, WEB, PROTO_TCP, port),
                Some(VERDICT_DENY),
                "{port}"
            );
        }
        assert_eq!(verdict(&c, WEB, PROTO_TCP, 1001), None);

        // A broad deny swallows a narrower allow: the allow entry is not written at all.
        let rules = [
            rule(
                1,
                Peer::Identity(WEB),
                Protocol::Tcp,
                Some((80, 80)),
                Action::Allow,
            ),
            rule(2, Peer::Identity(WEB), Protocol::Any, None, Action::Deny),
        ];
        let c = compile(&rules, &mut CidrIdentities::default()).unwrap();
        assert_eq!(c.entries.len(), 1);
        assert_eq!(verdict(&c, WEB, PROTO_TCP, 80), Some(VERDICT_DENY));
        let v = lpm(&c, DB, WEB, DIR_INGRESS, PROTO_TCP, 80).unwrap();
        assert_eq!(v.rule_id, 2);

        // Same key allowed and denied: deny.
        let rules = [
            rule(
                7,
                Peer::Identity(WEB),
                Protocol::Udp,
                Some((53, 53)),
                Action::Allow,
            ),
            rule(
                9,
                Peer::Identity(WEB),
                Protocol::Udp,
                Some((53, 53)),
                Action::Deny,
            ),
        ];
        let c = compile(&rules, &mut CidrIdentities::default()).unwrap();
        assert_eq!(c.entries.len(), 1);
        assert_eq!(c.entries.values().next().unwrap().rule_id, 9);
    }

    #[test]
    fn deny_wins_across_peer_and_any() {
        // Allow WEB on 5432, deny everyone on 5432: the kernel's two lookups give deny.
        let rules = [
            rule(
                1,
                Peer::Identity(WEB),
                Protocol::Tcp,
                Some((5432, 5432)),
                Action::Allow,
            ),
            rule(
                2,
                Peer::Any,
                Protocol::Tcp,
                Some((5432, 5432)),
                Action::Deny,
            ),
        ];
        let c = compile(&rules, &mut CidrIdentities::default()).unwrap();
        assert_eq!(verdict(&c, WEB, PROTO_TCP, 5432), Some(VERDICT_DENY));
        // Deny WEB, allow any: WEB denied, others allowed.
        let rules = [
            rule(1, Peer::Any, Protocol::Any, None, Action::Allow),
            rule(2, Peer::Identity(WEB), Protocol::Any, None, Action::Deny),
        ];
        let c = compile(&rules, &mut CidrIdentities::default()).unwrap();
        assert_eq!(verdict(&c, WEB, PROTO_UDP, 9), Some(VERDICT_DENY));
        assert_eq!(verdict(&c, CLIENT, PROTO_UDP, 9), Some(VERDICT_ALLOW));
    }

    #[test]
    fn redundant_entries_are_dropped() {
        let rules = [
            rule(1, Peer::Identity(WEB), Protocol::Any, None, Action::Allow),
            rule(
                2,
                Peer::Identity(WEB),
                Protocol::Tcp,
                Some((80, 80)),
                Action::Allow,
            ),
            rule(3, Peer::Identity(WEB), Protocol::Icmp, None, Action::Allow),
        ];
        let c = compile(&rules, &mut CidrIdentities::default()).unwrap();
        assert_eq!(c.entries.len(), 1);
    }

    #[test]
    fn icmp_means_both_families() {
        let rules = [rule(1, Peer::Any, Protocol::Icmp, None, Action::Allow)];
        let c = compile(&rules, &mut CidrIdentities::default()).unwrap();
        assert_eq!(c.entries.len(), 2);
        assert_eq!(verdict(&c, WEB, PROTO_ICMP, 0x0800), Some(VERDICT_ALLOW));
        assert_eq!(verdict(&c, WEB, PROTO_ICMPV6, 0x8000), Some(VERDICT_ALLOW));
        assert_eq!(verdict(&c, WEB, PROTO_TCP, 1), None);
    }

    #[test]
    fn cidr_rules_apply_to_nested_cidrs() {
        let rules = [
            rule(
                1,
                Peer::Cidr(net("10.0.0.0/8")),
                Protocol::Any,
                None,
                Action::Deny,
            ),
            rule(
                2,
                Peer::Cidr(net("10.1.0.0/16")),
                Protocol::Tcp,
                Some((443, 443)),
                Action::Allow,
            ),
            rule(
                3,
                Peer::Cidr(net("192.168.0.0/16")),
                Protocol::Tcp,
                None,
                Action::Allow,
            ),
            rule(
                4,
                Peer::Cidr(net("2001:db8::/32")),
                Protocol::Any,
                None,
                Action::Deny,
            ),
        ];
        let mut ids = CidrIdentities::default();
        let c = compile(&rules, &mut ids).unwrap();
        assert_eq!(c.cidrs.len(), 4);
        let id8 = c.cidrs[&net("10.0.0.0/8")];
        let id16 = c.cidrs[&net("10.1.0.0/16")];
        let id192 = c.cidrs[&net("192.168.0.0/16")];
        assert!((IDENTITY_FIRST_CIDR..=IDENTITY_LAST_CIDR).contains(&id8));
        // 10.1.x.x resolves to the /16 identity, which inherits the /8 deny: deny wins.
        assert_eq!(verdict(&c, id16, PROTO_TCP, 443), Some(VERDICT_DENY));
        assert_eq!(verdict(&c, id8, PROTO_TCP, 443), Some(VERDICT_DENY));
        assert_eq!(verdict(&c, id192, PROTO_TCP, 22), Some(VERDICT_ALLOW));
        assert_eq!(verdict(&c, IDENTITY_WORLD, PROTO_TCP, 22), None);

        // The ipcache gets the CIDRs (v4-mapped) and the v4 sentinel.
        let ipc: HashMap<_, _> = c.ipcache_entries().into_iter().collect();
        assert_eq!(ipc.len(), 5);
        assert_eq!(ipc[&(96 + 8, IpKey::v4([10, 0, 0, 0]))].identity, id8);
        assert_eq!(ipc[&v4_mapped_range()].identity, IDENTITY_WORLD);
    }

    #[test]
    fn cidr_identities_are_stable() {
        let mut ids = CidrIdentities::default();
        let a = rule(
            1,
            Peer::Cidr(net("10.0.0.0/8")),
            Protocol::Any,
            None,
            Action::Deny,
        );
        let b = rule(
            2,
            Peer::Cidr(net("172.16.0.0/12")),
            Protocol::Any,
            None,
            Action::Deny,
        );
        let c1 = compile(&[a.clone(), b.clone()], &mut ids).unwrap();
        let c2 = compile(std::slice::from_ref(&b), &mut ids).unwrap();
        assert_eq!(
            c1.cidrs[&net("172.16.0.0/12")],
            c2.cidrs[&net("172.16.0.0/12")]
        );
        assert_eq!(c2.cidrs.len(), 1);
        // The freed identity is reused; the kept one does not move.
        let c3 = compile(
            &[
                b,
                rule(
                    3,
                    Peer::Cidr(net("10.9.0.0/16")),
                    Protocol::Any,
                    None,
                    Action::Deny,
                ),
            ],
            &mut ids,
        )
        .unwrap();
        assert_eq!(c3.cidrs[&net("10.9.0.0/16")], c1.cidrs[&net("10.0.0.0/8")]);
        let restored = CidrIdentities::from_assignments(ids.assignments().clone());
        assert_eq!(restored, ids);
        // Host bits are cleared.
        let c4 = compile(
            &[rule(
                4,
                Peer::Cidr(net("10.1.2.3/8")),
                Protocol::Any,
                None,
                Action::Deny,
            )],
            &mut ids,
        )
        .unwrap();
        assert!(c4.cidrs.contains_key(&net("10.0.0.0/8")));
    }

    #[test]
    fn invalid_rules_are_rejected_and_assign_nothing() {
        let mut ids = CidrIdentities::default();
        let bad = [
            rule(0, Peer::Any, Protocol::Any, None, Action::Allow),
            rule(
                1,
                Peer::Identity(IDENTITY_ANY),
                Protocol::Any,
                None,
                Action::Allow,
            ),
            rule(1, Peer::Any, Protocol::Any, Some((1, 2)), Action::Allow),
            rule(1, Peer::Any, Protocol::Icmp, Some((1, 2)), Action::Allow),
            rule(1, Peer::Any, Protocol::Tcp, Some((9, 2)), Action::Allow),
            rule(
                1,
                Peer::Cidr(net("::ffff:10.0.0.0/104")),
                Protocol::Any,
                None,
                Action::Allow,
            ),
        ];
        for r in bad {
            assert!(
                compile(std::slice::from_ref(&r), &mut ids).is_err(),
                "{r:?}"
            );
        }
        let mut subject = rule(1, Peer::Any, Protocol::Any, None, Action::Allow);
        subject.subjects = vec![SUBJECT_NONE];
        assert!(compile(&[subject], &mut ids).is_err());
        assert!(ids.assignments().is_empty());
        // Reserved peers are fine.
        compile(
            &[rule(
                1,
                Peer::Identity(IDENTITY_WORLD),
                Protocol::Any,
                None,
                Action::Allow,
            )],
            &mut ids,
        )
        .unwrap();
    }

    #[test]
    fn many_rules_compile_to_proportional_entries() {
        // 1000 peers × a 100-port range each: entries grow with rules, never per packet.
        let rules: Vec<Rule> = (0..1000)
            .map(|i| Rule {
                id: i + 1,
                subjects: vec![DB],
                direction: Direction::Ingress,
                peer: Peer::Identity(1000 + i),
                protocol: Protocol::Tcp,
                ports: Some(PortRange {
                    first: 8000,
                    last: 8099,
                }),
                action: Action::Allow,
            })
            .collect();
        let c = compile(&rules, &mut CidrIdentities::default()).unwrap();
        assert_eq!(c.entries.len(), 1000 * port_prefixes(8000, 8099).len());
    }
}
