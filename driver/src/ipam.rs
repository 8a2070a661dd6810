//! IPAM: pools and leases, pure logic with no I/O. The driver persists [`Pool`]s after each
//! change; this module only decides.
//!
//! This follows Docker's libnetwork IPAM protocol: Docker calls `RequestPool` (one pool per
//! subnet and family), then `RequestAddress` for the gateway ([`LeaseKind::Gateway`]), for each
//! `--aux-address` ([`LeaseKind::Aux`]) and once per container ([`LeaseKind::Endpoint`]).
//!
//! * Pool IDs are the canonical subnet string, e.g. `10.20.0.0/24` or `fd00:20::/64`.
//! * No two pools overlap, whatever their origin (explicit `--subnet` or automatic).
//! * Automatic pools are carved in order out of [`IpamConfig`]'s default ranges; pools already
//!   held are skipped, so repeated requests while holding earlier answers return different pools.
//! * Reserved addresses are never handed out: the network and broadcast addresses in IPv4, the
//!   subnet-router anycast address (all-zero host part) in IPv6.
//! * Dynamic allocation stays inside the `--ip-range` when one is set; a preferred (static)
//!   address only has to be inside the subnet.
//! * Endpoint and aux addresses are allocated next-free after the pool's cursor, wrapping
//!   around, so a just-released address is not handed straight back.
//!
//! All address arithmetic is done on integers (`u32` widened to `u128` for IPv4, `u128` for
//! IPv6); searches are bounded by the number of pools or leases, never by the size of a range.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnetwork::{IpNetwork, Ipv4Network, Ipv6Network};
use serde::{Deserialize, Serialize};

/// Longest prefix accepted for an IPv4 pool: a /30 still leaves two usable hosts.
const MAX_V4_POOL_PREFIX: u8 = 30;
/// Longest prefix accepted for an IPv6 pool: a /127 still leaves one usable host.
const MAX_V6_POOL_PREFIX: u8 = 127;
/// Longest prefix accepted for automatic IPv4 pools.
const MAX_V4_AUTO_PREFIX: u8 = 30;
/// Longest prefix accepted for automatic IPv6 pools.
const MAX_V6_AUTO_PREFIX: u8 = 124;

/// Default IPv4 range for automatic pools: 10.200.0.0/14.
const DEFAULT_V4_RANGE: Ipv4Network =
    match Ipv4Network::new_checked(Ipv4Addr::new(10, 200, 0, 0), 14) {
        Some(net) => net,
        None => panic!("invalid built-in IPv4 default range"),
    };
/// Default prefix of automatic IPv4 pools.
const DEFAULT_V4_PREFIX: u8 = 24;
/// Default IPv6 (ULA) range for automatic pools: fd53:6c75:6963::/48 ("Slu" "ic").
const DEFAULT_V6_RANGE: Ipv6Network =
    match Ipv6Network::new_checked(Ipv6Addr::new(0xfd53, 0x6c75, 0x6963, 0, 0, 0, 0, 0), 48) {
        Some(net) => net,
        None => panic!("invalid built-in IPv6 default range"),
    };
/// Default prefix of automatic IPv6 pools.
const DEFAULT_V6_PREFIX: u8 = 64;

/// Where automatic pools come from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IpamConfig {
    /// IPv4 range split into automatic pools, e.g. 10.200.0.0/14.
    pub default_v4: IpNetwork,
    /// Prefix length of each automatic IPv4 pool, e.g. 24.
    pub default_v4_prefix: u8,
    /// IPv6 (ULA) range for automatic pools.
    pub default_v6: IpNetwork,
    /// Prefix length of each automatic IPv6 pool, e.g. 64.
    pub default_v6_prefix: u8,
}

impl Default for IpamConfig {
    /// 10.200.0.0/14 split into /24s, and fd53:6c75:6963::/48 split into /64s.
    fn default() -> Self {
        Self {
            default_v4: IpNetwork::V4(DEFAULT_V4_RANGE),
            default_v4_prefix: DEFAULT_V4_PREFIX,
            default_v6: IpNetwork::V6(DEFAULT_V6_RANGE),
            default_v6_prefix: DEFAULT_V6_PREFIX,
        }
    }
}

impl IpamConfig {
    /// Builds a validated configuration.
    ///
    /// Host bits of the ranges are cleared (10.200.1.0/14 becomes 10.200.0.0/14). Checks that
    /// `default_v4` is IPv4 and `default_v6` is IPv6, that each pool prefix is at least the
    /// range's own prefix, and that it is at most /30 (IPv4) or /124 (IPv6).
    pub fn new(
        default_v4: IpNetwork,
        default_v4_prefix: u8,
        default_v6: IpNetwork,
        default_v6_prefix: u8,
    ) -> Result<Self, IpamError> {
        let config = Self {
            default_v4: normalise(default_v4),
            default_v4_prefix,
            default_v6: normalise(default_v6),
            default_v6_prefix,
        };
        config.validate_family(false)?;
        config.validate_family(true)?;
        Ok(config)
    }

    /// The default range and pool prefix for one family.
    fn family(&self, v6: bool) -> (IpNetwork, u8) {
        if v6 {
            (self.default_v6, self.default_v6_prefix)
        } else {
            (self.default_v4, self.default_v4_prefix)
        }
    }

    /// Checks one family's range and prefix (also used on configurations built field by
    /// field or deserialised, which bypass [`IpamConfig::new`]).
    fn validate_family(&self, v6: bool) -> Result<(), IpamError> {
        let (range, prefix) = self.family(v6);
        let name = family_name(v6);
        if range.is_ipv6() != v6 {
            return Err(IpamError::InvalidConfig(format!(
                "default {name} range {range} is not an {name} network"
            )));
        }
        let max = if v6 {
            MAX_V6_AUTO_PREFIX
        } else {
            MAX_V4_AUTO_PREFIX
        };
        if prefix < range.prefix() || prefix > max {
            return Err(IpamError::InvalidConfig(format!(
                "default {name} pool prefix /{prefix} must be between /{} (the prefix of range \
                 {range}) and /{max}",
                range.prefix()
            )));
        }
        Ok(())
    }
}

/// What a lease is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum LeaseKind {
    /// The network's gateway.
    Gateway,
    /// An `--aux-address`.
    Aux,
    /// A container's address.
    Endpoint,
}

/// One pool (a network's subnet in one family).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pool {
    /// Pool ID handed to Docker.
    pub id: String,
    /// The subnet.
    pub subnet: IpNetwork,
    /// `--ip-range`: dynamic allocation stays inside it.
    pub range: Option<IpNetwork>,
    /// Chosen by sluice from the default range.
    pub auto: bool,
    /// Addresses in use.
    pub leases: BTreeMap<IpAddr, LeaseKind>,
    /// Last dynamically allocated address; the next search starts after it.
    pub cursor: Option<IpAddr>,
    /// In the global address space: a swarm manager's allocation for a swarm-scoped network
    /// (docs/managed-plugin.md). Its ID starts with [`GLOBAL_POOL_PREFIX`].
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub global: bool,
}

/// Prefix of the IDs of global-space pools, which may share a subnet with a local one.
pub const GLOBAL_POOL_PREFIX: &str = "global:";

/// `RequestPool`, decoded.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PoolRequest {
    /// `--subnet`, or `None` for an automatic pool.
    pub pool: Option<IpNetwork>,
    /// `--ip-range`.
    pub sub_pool: Option<IpNetwork>,
    /// IPv6 family.
    pub v6: bool,
    /// Requested in the global address space (a swarm manager allocating a swarm-scoped
    /// network); the node that then creates the network asks for the same subnet in the
    /// local space, which is allowed: the two are one network.
    pub global: bool,
}

/// IPAM errors; each message says what to change.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IpamError {
    /// No pool has this ID (never requested, or already released).
    #[error("unknown pool ID {0}")]
    UnknownPool(String),
    /// The requested subnet overlaps a pool that is already held.
    #[error(
        "subnet {subnet} overlaps {existing}, already used by another sluice network; \
         choose a different --subnet"
    )]
    Overlap {
        /// The requested subnet (host bits cleared).
        subnet: IpNetwork,
        /// The subnet of the pool already held.
        existing: IpNetwork,
    },
    /// The subnet's family is not the one Docker asked for.
    #[error(
        "subnet {subnet} is {} but an {} pool was requested; give an {} --subnet",
        net_family(.subnet),
        family_name(*.requested_v6),
        family_name(*.requested_v6)
    )]
    FamilyMismatch {
        /// The requested subnet.
        subnet: IpNetwork,
        /// Whether Docker asked for an IPv6 pool.
        requested_v6: bool,
    },
    /// The `--ip-range` is unusable; `reason` says why.
    #[error("invalid --ip-range {range}: {reason}")]
    InvalidSubPool {
        /// The requested `--ip-range`.
        range: IpNetwork,
        /// Why it was rejected, and what to do instead.
        reason: String,
    },
    /// The subnet is too small to hold any usable address.
    #[error(
        "subnet {subnet} is too small to leave a usable host address; use a prefix of /{max} \
         or shorter"
    )]
    InvalidPrefix {
        /// The requested subnet.
        subnet: IpNetwork,
        /// The longest prefix accepted for this family.
        max: u8,
    },
    /// Every automatic pool of the default range is held.
    #[error("no free /{prefix} left in default range {range}; release a network or give --subnet")]
    DefaultRangeExhausted {
        /// The automatic pool prefix.
        prefix: u8,
        /// The default range.
        range: IpNetwork,
    },
    /// Every usable address of the pool (or of its `--ip-range`) is leased.
    #[error(
        "no free address left in pool {pool}{}; release an address or use a larger \
         --subnet/--ip-range",
        range_suffix(.range)
    )]
    PoolExhausted {
        /// The pool's subnet.
        pool: IpNetwork,
        /// The pool's `--ip-range`, if any.
        range: Option<IpNetwork>,
    },
    /// A preferred address is not inside the pool's subnet (or is of the other family).
    #[error("address {addr} is outside pool {pool}; pick an address inside the subnet")]
    OutOfPool {
        /// The requested address.
        addr: IpAddr,
        /// The pool's subnet.
        pool: IpNetwork,
    },
    /// A preferred address is reserved (network, broadcast or subnet-router anycast address).
    #[error("address {addr} is the {what} of {pool}; pick another address")]
    Reserved {
        /// The requested address.
        addr: IpAddr,
        /// The pool's subnet.
        pool: IpNetwork,
        /// Which reserved address it is, e.g. "broadcast address".
        what: &'static str,
    },
    /// A preferred address is already leased.
    #[error("address {addr} is already in use in pool {pool}; pick another address")]
    AddressInUse {
        /// The requested address.
        addr: IpAddr,
        /// The pool's subnet.
        pool: IpNetwork,
    },
    /// The IPAM configuration is inconsistent; the message says which part.
    #[error("invalid IPAM configuration: {0}")]
    InvalidConfig(String),
}

/// "IPv4" or "IPv6".
fn family_name(v6: bool) -> &'static str {
    if v6 { "IPv6" } else { "IPv4" }
}

/// "IPv4" or "IPv6", for a network.
fn net_family(net: &IpNetwork) -> &'static str {
    family_name(net.is_ipv6())
}

/// " (range X)" when an `--ip-range` is set.
fn range_suffix(range: &Option<IpNetwork>) -> String {
    range.map(|r| format!(" (range {r})")).unwrap_or_default()
}

/// The allocator.
#[derive(Debug, Clone)]
pub struct Ipam {
    config: IpamConfig,
    pools: BTreeMap<String, Pool>,
}

impl Ipam {
    /// Builds the allocator from its configuration and the pools restored from the store.
    ///
    /// Pools are keyed by their `id`; leases and cursors are honoured as stored.
    pub fn new(config: IpamConfig, pools: Vec<Pool>) -> Self {
        let pools = pools.into_iter().map(|p| (p.id.clone(), p)).collect();
        Self { config, pools }
    }

    /// The configuration automatic pools come from.
    pub fn config(&self) -> &IpamConfig {
        &self.config
    }

    /// All pools held, ordered by ID.
    pub fn pools(&self) -> impl Iterator<Item = &Pool> {
        self.pools.values()
    }

    /// The pool with this ID, if held.
    pub fn pool(&self, id: &str) -> Option<&Pool> {
        self.pools.get(id)
    }

    /// Handles `RequestPool`: reserves an explicit subnet (`req.pool`) or carves the next free
    /// automatic one out of the default range, and returns a clone of the new pool (persist it).
    ///
    /// Explicit subnets and `--ip-range`s have their host bits cleared. Fails if the subnet's
    /// family is not the requested one, if it overlaps any held pool, if it is too small
    /// (longer than /30 for IPv4, /127 for IPv6), if the `--ip-range` is not inside it, or if
    /// the default range has no free pool left.
    pub fn request_pool(&mut self, req: &PoolRequest) -> Result<Pool, IpamError> {
        let (subnet, range, auto) = match req.pool {
            Some(requested) => {
                let subnet = self.explicit_subnet(requested, req.v6, req.global)?;
                let range = req
                    .sub_pool
                    .map(|r| validate_sub_pool(subnet, r))
                    .transpose()?;
                (subnet, range, false)
            }
            None => {
                if let Some(range) = req.sub_pool {
                    return Err(IpamError::InvalidSubPool {
                        range,
                        reason: "an --ip-range needs an explicit --subnet that contains it"
                            .to_owned(),
                    });
                }
                (self.auto_subnet(req.v6)?, None, true)
            }
        };
        let id = if req.global {
            format!("{GLOBAL_POOL_PREFIX}{}", pool_id(subnet))
        } else {
            pool_id(subnet)
        };
        let pool = Pool {
            id,
            subnet,
            range,
            auto,
            leases: BTreeMap::new(),
            cursor: None,
            global: req.global,
        };
        self.pools.insert(pool.id.clone(), pool.clone());
        Ok(pool)
    }

    /// Handles `ReleasePool`: forgets the pool and all its leases. Idempotent: an unknown ID
    /// returns `None`.
    pub fn release_pool(&mut self, id: &str) -> Option<Pool> {
        self.pools.remove(id)
    }

    /// Handles `RequestAddress`. Returns the address with the pool subnet's prefix length,
    /// e.g. 10.20.0.5/24.
    ///
    /// With `preferred`, that address is leased if it is inside the subnet (it may be outside
    /// the `--ip-range`), not reserved and not already leased. Without, the address comes from
    /// the `--ip-range` if set, else the subnet: [`LeaseKind::Gateway`] takes the first free
    /// address; [`LeaseKind::Endpoint`] and [`LeaseKind::Aux`] take the next free address after
    /// the pool's cursor (wrapping around) and move the cursor to it.
    pub fn request_address(
        &mut self,
        pool_id: &str,
        preferred: Option<IpAddr>,
        kind: LeaseKind,
    ) -> Result<IpNetwork, IpamError> {
        let pool = self
            .pools
            .get_mut(pool_id)
            .ok_or_else(|| IpamError::UnknownPool(pool_id.to_owned()))?;
        let subnet = Span::of(pool.subnet);
        let addr = match preferred {
            Some(addr) => {
                check_preferred(pool, subnet, addr)?;
                addr
            }
            None => next_dynamic(pool, subnet, kind)?,
        };
        let net = IpNetwork::new(addr, pool.subnet.prefix()).map_err(|_| IpamError::OutOfPool {
            addr,
            pool: pool.subnet,
        })?;
        pool.leases.insert(addr, kind);
        if preferred.is_none() && kind != LeaseKind::Gateway {
            pool.cursor = Some(addr);
        }
        Ok(net)
    }

    /// Handles `ReleaseAddress`. Idempotent: an unknown pool or an address not leased returns
    /// `Ok(false)`; a released lease returns `Ok(true)`. The cursor does not move. Never fails
    /// today; the `Result` is kept for future checks.
    pub fn release_address(&mut self, pool_id: &str, addr: IpAddr) -> Result<bool, IpamError> {
        Ok(self
            .pools
            .get_mut(pool_id)
            .is_some_and(|pool| pool.leases.remove(&addr).is_some()))
    }

    /// Validates an explicit `--subnet` (host bits cleared) against the family and held pools.
    /// A pool of the other address space with exactly this subnet is no overlap: a swarm
    /// manager's allocation and the node's instance of that network.
    fn explicit_subnet(
        &self,
        requested: IpNetwork,
        v6: bool,
        global: bool,
    ) -> Result<IpNetwork, IpamError> {
        let subnet = normalise(requested);
        if subnet.is_ipv6() != v6 {
            return Err(IpamError::FamilyMismatch {
                subnet,
                requested_v6: v6,
            });
        }
        let max = if v6 {
            MAX_V6_POOL_PREFIX
        } else {
            MAX_V4_POOL_PREFIX
        };
        if subnet.prefix() > max {
            return Err(IpamError::InvalidPrefix { subnet, max });
        }
        let span = Span::of(subnet);
        if let Some(existing) = self.pools.values().find(|p| {
            Span::of(p.subnet).overlaps(span) && (p.global == global || p.subnet != subnet)
        }) {
            return Err(IpamError::Overlap {
                subnet,
                existing: existing.subnet,
            });
        }
        Ok(subnet)
    }

    /// The first automatic pool of the default range that overlaps no held pool.
    ///
    /// Jumps past each overlapping pool, so the walk takes at most (pools + 1) steps whatever
    /// the number of candidates.
    fn auto_subnet(&self, v6: bool) -> Result<IpNetwork, IpamError> {
        self.config.validate_family(v6)?;
        let (range, prefix) = self.config.family(v6);
        let range = normalise(range);
        let exhausted = IpamError::DefaultRangeExhausted { prefix, range };
        let whole = Span::of(range);
        let step = host_count(v6, prefix).ok_or_else(|| {
            IpamError::InvalidConfig(format!(
                "default {} pool prefix /{prefix} is too short",
                family_name(v6)
            ))
        })?;
        // Held pools of this family that touch the range, in address order.
        let mut held: Vec<Span> = self
            .pools
            .values()
            .map(|p| Span::of(p.subnet))
            .filter(|s| s.overlaps(whole))
            .collect();
        held.sort_unstable_by_key(|s| (s.first, s.last));
        let mut first = whole.first;
        let mut next_held = 0;
        // Each iteration either returns or moves `first` past the end of at least one held pool,
        // which then never overlaps again; the bound guards against that reasoning being wrong.
        for _ in 0..=held.len() {
            let Some(last) = first.checked_add(step - 1) else {
                return Err(exhausted);
            };
            if last > whole.last {
                return Err(exhausted);
            }
            let candidate = Span { v6, first, last };
            // Pools wholly before the candidate can never block it or a later one.
            while held.get(next_held).is_some_and(|s| s.last < first) {
                next_held += 1;
            }
            let blocking_end = held
                .get(next_held..)
                .unwrap_or_default()
                .iter()
                .take_while(|s| s.first <= last)
                .filter(|s| s.overlaps(candidate))
                .map(|s| s.last)
                .max();
            let Some(end) = blocking_end else {
                return IpNetwork::new(to_ip(v6, first), prefix).map_err(|_| {
                    IpamError::InvalidConfig(format!("invalid pool prefix /{prefix}"))
                });
            };
            // Next step-aligned candidate after the blocking pool.
            let next = end
                .checked_add(1)
                .and_then(|n| (n - whole.first).div_ceil(step).checked_mul(step))
                .and_then(|offset| whole.first.checked_add(offset));
            match next {
                Some(next) if next > first => first = next,
                _ => return Err(exhausted),
            }
        }
        Err(exhausted)
    }
}

/// Checks that `addr` may be leased as a preferred (static) address of `pool`.
fn check_preferred(pool: &Pool, subnet: Span, addr: IpAddr) -> Result<(), IpamError> {
    let (v6, n) = from_ip(addr);
    if !subnet.contains(v6, n) {
        return Err(IpamError::OutOfPool {
            addr,
            pool: pool.subnet,
        });
    }
    if let Some(what) = subnet.reserved(n) {
        return Err(IpamError::Reserved {
            addr,
            pool: pool.subnet,
            what,
        });
    }
    if pool.leases.contains_key(&addr) {
        return Err(IpamError::AddressInUse {
            addr,
            pool: pool.subnet,
        });
    }
    Ok(())
}

/// Picks the next dynamic address of `pool` for `kind` (without leasing it).
fn next_dynamic(pool: &Pool, subnet: Span, kind: LeaseKind) -> Result<IpAddr, IpamError> {
    let exhausted = || IpamError::PoolExhausted {
        pool: pool.subnet,
        range: pool.range,
    };
    // The range, clipped to the subnet (restored data could in theory disagree).
    let range = pool.range.map(Span::of).unwrap_or(subnet);
    if range.v6 != subnet.v6 {
        return Err(exhausted());
    }
    let lo = range.first.max(subnet.first);
    let hi = range.last.min(subnet.last);
    if lo > hi {
        return Err(exhausted());
    }
    let found = match kind {
        LeaseKind::Gateway => first_free(pool, subnet, lo, hi),
        LeaseKind::Endpoint | LeaseKind::Aux => {
            let start = pool
                .cursor
                .map(from_ip)
                .filter(|&(v6, c)| v6 == subnet.v6 && c >= lo && c < hi)
                .map_or(lo, |(_, c)| c + 1);
            first_free(pool, subnet, start, hi).or_else(|| {
                if start > lo {
                    first_free(pool, subnet, lo, start - 1)
                } else {
                    None
                }
            })
        }
    };
    found.map(|n| to_ip(subnet.v6, n)).ok_or_else(exhausted)
}

/// The lowest address in `[lo, hi]` that is neither reserved in `subnet` nor leased.
///
/// Walks the leases of that interval in order alongside the candidate, so the cost is bounded
/// by the leases and reserved addresses it skips, never by the size of the interval.
fn first_free(pool: &Pool, subnet: Span, lo: u128, hi: u128) -> Option<u128> {
    if lo > hi {
        return None;
    }
    let v6 = subnet.v6;
    let mut leased = pool
        .leases
        .range(to_ip(v6, lo)..=to_ip(v6, hi))
        .map(|(ip, _)| from_ip(*ip).1)
        .peekable();
    let mut candidate = lo;
    loop {
        if candidate > hi {
            return None;
        }
        if subnet.reserved(candidate).is_some() {
            candidate = candidate.checked_add(1)?;
            continue;
        }
        while leased.next_if(|&l| l < candidate).is_some() {}
        if leased.peek() == Some(&candidate) {
            candidate = candidate.checked_add(1)?;
            continue;
        }
        return Some(candidate);
    }
}

/// Validates an `--ip-range` against its (normalised) subnet; returns it normalised.
fn validate_sub_pool(subnet: IpNetwork, range: IpNetwork) -> Result<IpNetwork, IpamError> {
    let normalised = normalise(range);
    if range.is_ipv6() != subnet.is_ipv6() {
        return Err(IpamError::InvalidSubPool {
            range,
            reason: format!(
                "it is {} but the subnet {subnet} is {}; give an --ip-range inside the subnet",
                net_family(&range),
                net_family(&subnet)
            ),
        });
    }
    if !Span::of(subnet).contains_span(Span::of(normalised)) {
        return Err(IpamError::InvalidSubPool {
            range,
            reason: format!(
                "it is not inside the subnet {subnet}; give an --ip-range inside the subnet"
            ),
        });
    }
    Ok(normalised)
}

/// The canonical pool ID of a subnet: its network address and prefix, e.g. `10.20.0.0/24`.
fn pool_id(subnet: IpNetwork) -> String {
    format!("{}/{}", subnet.network(), subnet.prefix())
}

/// Clears the host bits: 10.1.2.3/24 becomes 10.1.2.0/24.
fn normalise(net: IpNetwork) -> IpNetwork {
    IpNetwork::new(net.network(), net.prefix()).unwrap_or(net)
}

/// Number of addresses in a network of this family and prefix, if it fits in a `u128`.
fn host_count(v6: bool, prefix: u8) -> Option<u128> {
    let bits: u32 = if v6 { 128 } else { 32 };
    1u128.checked_shl(bits.checked_sub(u32::from(prefix))?)
}

/// An address as (is IPv6, integer value).
fn from_ip(ip: IpAddr) -> (bool, u128) {
    match ip {
        IpAddr::V4(a) => (false, u128::from(u32::from(a))),
        IpAddr::V6(a) => (true, u128::from(a)),
    }
}

/// An integer back to an address of the given family (IPv4 values always fit in 32 bits).
fn to_ip(v6: bool, n: u128) -> IpAddr {
    if v6 {
        IpAddr::V6(Ipv6Addr::from(n))
    } else {
        IpAddr::V4(Ipv4Addr::from(u32::try_from(n).unwrap_or(u32::MAX)))
    }
}

/// A network as an inclusive interval of integer addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Span {
    /// IPv6 family.
    v6: bool,
    /// Network address.
    first: u128,
    /// Last address (broadcast in IPv4).
    last: u128,
}

impl Span {
    /// The interval a network covers (host bits of `net` are ignored).
    fn of(net: IpNetwork) -> Self {
        match net {
            IpNetwork::V4(n) => {
                let host = u32::MAX.checked_shr(u32::from(n.prefix())).unwrap_or(0);
                let first = u32::from(n.ip()) & !host;
                Self {
                    v6: false,
                    first: u128::from(first),
                    last: u128::from(first | host),
                }
            }
            IpNetwork::V6(n) => {
                let host = u128::MAX.checked_shr(u32::from(n.prefix())).unwrap_or(0);
                let first = u128::from(n.ip()) & !host;
                Self {
                    v6: true,
                    first,
                    last: first | host,
                }
            }
        }
    }

    /// Whether the two networks share any address.
    fn overlaps(self, other: Self) -> bool {
        self.v6 == other.v6 && self.first <= other.last && other.first <= self.last
    }

    /// Whether the address is inside.
    fn contains(self, v6: bool, n: u128) -> bool {
        self.v6 == v6 && self.first <= n && n <= self.last
    }

    /// Whether `other` lies entirely inside.
    fn contains_span(self, other: Self) -> bool {
        self.v6 == other.v6 && self.first <= other.first && other.last <= self.last
    }

    /// Which reserved address of this subnet `n` is, if any.
    fn reserved(self, n: u128) -> Option<&'static str> {
        if self.v6 {
            (n == self.first).then_some("subnet-router anycast address")
        } else if n == self.first {
            Some("network address")
        } else if n == self.last {
            Some("broadcast address")
        } else {
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> IpNetwork {
        s.parse().unwrap()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn ipam() -> Ipam {
        Ipam::new(IpamConfig::default(), Vec::new())
    }

    fn explicit(subnet: &str) -> PoolRequest {
        let subnet = net(subnet);
        PoolRequest {
            pool: Some(subnet),
            sub_pool: None,
            v6: subnet.is_ipv6(),
            global: false,
        }
    }

    fn with_range(subnet: &str, range: &str) -> PoolRequest {
        PoolRequest {
            sub_pool: Some(net(range)),
            ..explicit(subnet)
        }
    }

    fn auto(v6: bool) -> PoolRequest {
        PoolRequest {
            pool: None,
            sub_pool: None,
            v6,
            global: false,
        }
    }

    /// Requests a dynamic endpoint address and returns it as a string with its prefix.
    fn endpoint(ipam: &mut Ipam, id: &str) -> String {
        ipam.request_address(id, None, LeaseKind::Endpoint)
            .unwrap()
            .to_string()
    }

    // ---- configuration ----

    #[test]
    fn default_config_values() {
        let c = IpamConfig::default();
        assert_eq!(c.default_v4, net("10.200.0.0/14"));
        assert_eq!(c.default_v4_prefix, 24);
        assert_eq!(c.default_v6, net("fd53:6c75:6963::/48"));
        assert_eq!(c.default_v6_prefix, 64);
        let built = IpamConfig::new(c.default_v4, 24, c.default_v6, 64).unwrap();
        assert_eq!(built, c);
    }

    #[test]
    fn config_new_normalises_and_validates() {
        let c =
            IpamConfig::new(net("10.201.3.4/14"), 24, net("fd53:6c75:6963:1::/48"), 64).unwrap();
        assert_eq!(c.default_v4, net("10.200.0.0/14"));
        assert_eq!(c.default_v6, net("fd53:6c75:6963::/48"));

        let v6 = net("fd00::/48");
        let v4 = net("10.0.0.0/16");
        let bad = [
            IpamConfig::new(v6, 24, v6, 64),
            IpamConfig::new(v4, 24, v4, 64),
            IpamConfig::new(v4, 15, v6, 64),
            IpamConfig::new(v4, 31, v6, 64),
            IpamConfig::new(v4, 24, v6, 47),
            IpamConfig::new(v4, 24, v6, 125),
        ];
        for result in bad {
            let err = result.unwrap_err();
            assert!(matches!(err, IpamError::InvalidConfig(_)), "{err:?}");
        }
        let msg = IpamConfig::new(v4, 31, v6, 64).unwrap_err().to_string();
        assert_eq!(
            msg,
            "invalid IPAM configuration: default IPv4 pool prefix /31 must be between /16 (the \
             prefix of range 10.0.0.0/16) and /30"
        );
        assert!(IpamConfig::new(v4, 30, v6, 124).is_ok());
        assert!(IpamConfig::new(v4, 16, v6, 48).is_ok());
    }

    #[test]
    fn invalid_config_fields_error_instead_of_panicking() {
        let config = IpamConfig {
            default_v4: net("fd00::/48"),
            default_v4_prefix: 0,
            default_v6: net("10.0.0.0/8"),
            default_v6_prefix: 200,
        };
        let mut ipam = Ipam::new(config, Vec::new());
        for v6 in [false, true] {
            let err = ipam.request_pool(&auto(v6)).unwrap_err();
            assert!(matches!(err, IpamError::InvalidConfig(_)), "{err:?}");
        }
    }

    #[test]
    fn accessors() {
        let mut ipam = ipam();
        assert_eq!(ipam.config(), &IpamConfig::default());
        assert_eq!(ipam.pools().count(), 0);
        let p = ipam.request_pool(&explicit("10.20.0.0/24")).unwrap();
        assert_eq!(ipam.pool("10.20.0.0/24"), Some(&p));
        assert_eq!(ipam.pool("10.21.0.0/24"), None);
        assert_eq!(ipam.pools().collect::<Vec<_>>(), vec![&p]);
    }

    // ---- automatic pools ----

    #[test]
    fn auto_v4_pools_distinct_while_held_and_reused_after_release() {
        let mut ipam = ipam();
        let a = ipam.request_pool(&auto(false)).unwrap();
        let b = ipam.request_pool(&auto(false)).unwrap();
        let c = ipam.request_pool(&auto(false)).unwrap();
        assert_eq!(a.id, "10.200.0.0/24");
        assert_eq!(b.id, "10.200.1.0/24");
        assert_eq!(c.id, "10.200.2.0/24");
        assert!(a.auto && b.auto && c.auto);
        assert_eq!(a.subnet, net("10.200.0.0/24"));
        assert_eq!(a.range, None);
        assert!(a.leases.is_empty());
        assert_eq!(a.cursor, None);

        assert_eq!(ipam.release_pool(&b.id), Some(b.clone()));
        let again = ipam.request_pool(&auto(false)).unwrap();
        assert_eq!(again.id, b.id);
        assert_eq!(ipam.request_pool(&auto(false)).unwrap().id, "10.200.3.0/24");
    }

    #[test]
    fn auto_v4_many_distinct() {
        let mut ipam = ipam();
        let mut seen = std::collections::HashSet::new();
        for _ in 0..300 {
            let p = ipam.request_pool(&auto(false)).unwrap();
            assert!(seen.insert(p.id));
        }
        assert!(seen.contains("10.201.43.0/24"));
    }

    #[test]
    fn auto_v6_from_ula_range() {
        let mut ipam = ipam();
        let a = ipam.request_pool(&auto(true)).unwrap();
        let b = ipam.request_pool(&auto(true)).unwrap();
        assert_eq!(a.id, "fd53:6c75:6963::/64");
        assert_eq!(b.id, "fd53:6c75:6963:1::/64");
        assert!(a.auto && a.subnet.is_ipv6());
        // v4 and v6 auto pools are independent.
        assert_eq!(ipam.request_pool(&auto(false)).unwrap().id, "10.200.0.0/24");
    }

    #[test]
    fn auto_skips_explicit_pools_by_jumping() {
        let mut ipam = ipam();
        ipam.request_pool(&explicit("10.200.0.0/16")).unwrap();
        ipam.request_pool(&explicit("10.201.0.0/23")).unwrap();
        assert_eq!(ipam.request_pool(&auto(false)).unwrap().id, "10.201.2.0/24");

        ipam.request_pool(&explicit("fd53:6c75:6963::/56")).unwrap();
        assert_eq!(
            ipam.request_pool(&auto(true)).unwrap().id,
            "fd53:6c75:6963:100::/64"
        );
    }

    #[test]
    fn auto_skips_pool_smaller_than_step() {
        let mut ipam = ipam();
        ipam.request_pool(&explicit("10.200.0.128/25")).unwrap();
        assert_eq!(ipam.request_pool(&auto(false)).unwrap().id, "10.200.1.0/24");
    }

    #[test]
    fn auto_exhausted_error() {
        let config = IpamConfig::new(net("10.0.0.0/23"), 24, net("fd00::/63"), 64).unwrap();
        let mut ipam = Ipam::new(config, Vec::new());
        assert_eq!(ipam.request_pool(&auto(false)).unwrap().id, "10.0.0.0/24");
        assert_eq!(ipam.request_pool(&auto(false)).unwrap().id, "10.0.1.0/24");
        let err = ipam.request_pool(&auto(false)).unwrap_err();
        assert_eq!(
            err,
            IpamError::DefaultRangeExhausted {
                prefix: 24,
                range: net("10.0.0.0/23")
            }
        );
        assert_eq!(
            err.to_string(),
            "no free /24 left in default range 10.0.0.0/23; release a network or give --subnet"
        );
        ipam.request_pool(&auto(true)).unwrap();
        ipam.request_pool(&auto(true)).unwrap();
        assert!(matches!(
            ipam.request_pool(&auto(true)),
            Err(IpamError::DefaultRangeExhausted { prefix: 64, .. })
        ));
    }

    #[test]
    fn auto_exhausted_by_covering_explicit_pools_is_fast() {
        let mut ipam = ipam();
        // A supernet of the whole default v4 range.
        ipam.request_pool(&explicit("10.0.0.0/8")).unwrap();
        let err = ipam.request_pool(&auto(false)).unwrap_err();
        assert_eq!(
            err.to_string(),
            "no free /24 left in default range 10.200.0.0/14; release a network or give --subnet"
        );
        // Two halves of the v6 /48 (65536 candidates) are skipped in two jumps.
        ipam.request_pool(&explicit("fd53:6c75:6963::/49")).unwrap();
        assert_eq!(
            ipam.request_pool(&auto(true)).unwrap().id,
            "fd53:6c75:6963:8000::/64"
        );
        ipam.release_pool("fd53:6c75:6963:8000::/64").unwrap();
        ipam.request_pool(&explicit("fd53:6c75:6963:8000::/49"))
            .unwrap();
        assert!(matches!(
            ipam.request_pool(&auto(true)),
            Err(IpamError::DefaultRangeExhausted { prefix: 64, .. })
        ));
    }

    #[test]
    fn auto_v6_with_many_held_pools() {
        let mut ipam = ipam();
        for i in 0..1000u16 {
            let p = ipam.request_pool(&auto(true)).unwrap();
            let expected = Ipv6Addr::new(0xfd53, 0x6c75, 0x6963, i, 0, 0, 0, 0);
            assert_eq!(p.id, format!("{expected}/64"));
        }
    }

    #[test]
    fn ip_range_without_subnet_rejected() {
        let mut ipam = ipam();
        let req = PoolRequest {
            pool: None,
            sub_pool: Some(net("10.200.0.0/25")),
            v6: false,
            global: false,
        };
        assert!(matches!(
            ipam.request_pool(&req),
            Err(IpamError::InvalidSubPool { .. })
        ));
    }

    // ---- explicit pools ----

    #[test]
    fn explicit_subnet_normalised() {
        let mut ipam = ipam();
        let p = ipam
            .request_pool(&with_range("10.1.2.3/24", "10.1.2.130/25"))
            .unwrap();
        assert_eq!(p.id, "10.1.2.0/24");
        assert_eq!(p.subnet, net("10.1.2.0/24"));
        assert_eq!(p.subnet.ip(), ip("10.1.2.0"));
        assert_eq!(p.range, Some(net("10.1.2.128/25")));
        assert!(!p.auto);
        let v6 = ipam.request_pool(&explicit("fd00:20::1234/64")).unwrap();
        assert_eq!(v6.id, "fd00:20::/64");
        assert_eq!(v6.subnet, net("fd00:20::/64"));
    }

    #[test]
    fn a_swarm_networks_global_and_local_pools_share_their_subnet_only() {
        let mut ipam = ipam();
        let global = PoolRequest {
            global: true,
            ..explicit("10.50.0.0/24")
        };
        let manager = ipam.request_pool(&global).unwrap();
        assert_eq!(manager.id, "global:10.50.0.0/24");
        // The node's instance of the same network: same subnet, local space.
        let node = ipam.request_pool(&explicit("10.50.0.0/24")).unwrap();
        assert_eq!(node.id, "10.50.0.0/24");
        assert!(!node.global && manager.global);
        // Anything else overlapping is refused, in either space.
        for (subnet, global) in [
            ("10.50.0.0/24", true),
            ("10.50.0.0/25", false),
            ("10.50.0.0/16", true),
        ] {
            let req = PoolRequest {
                global,
                ..explicit(subnet)
            };
            assert!(
                matches!(ipam.request_pool(&req), Err(IpamError::Overlap { .. })),
                "{subnet} global={global}"
            );
        }
        // Automatic pools avoid both.
        let a = ipam
            .request_pool(&PoolRequest {
                pool: None,
                ..explicit("10.200.0.0/24")
            })
            .unwrap();
        assert_ne!(a.subnet, net("10.50.0.0/24"));
        assert!(ipam.release_pool("global:10.50.0.0/24").is_some());
        assert!(ipam.pool("10.50.0.0/24").is_some());
    }

    #[test]
    fn explicit_family_mismatch() {
        let mut ipam = ipam();
        let req = PoolRequest {
            v6: true,
            ..explicit("10.20.0.0/24")
        };
        let err = ipam.request_pool(&req).unwrap_err();
        assert!(matches!(err, IpamError::FamilyMismatch { .. }));
        assert_eq!(
            err.to_string(),
            "subnet 10.20.0.0/24 is IPv4 but an IPv6 pool was requested; give an IPv6 --subnet"
        );
        let req = PoolRequest {
            v6: false,
            ..explicit("fd00::/64")
        };
        assert!(matches!(
            ipam.request_pool(&req),
            Err(IpamError::FamilyMismatch { .. })
        ));
        assert_eq!(ipam.pools().count(), 0);
    }

    #[test]
    fn explicit_prefix_limits() {
        let mut ipam = ipam();
        for s in ["10.0.0.0/31", "10.0.0.1/32"] {
            let err = ipam.request_pool(&explicit(s)).unwrap_err();
            assert!(
                matches!(err, IpamError::InvalidPrefix { max: 30, .. }),
                "{err:?}"
            );
        }
        let err = ipam.request_pool(&explicit("fd00::1/128")).unwrap_err();
        assert!(matches!(err, IpamError::InvalidPrefix { max: 127, .. }));
        assert_eq!(
            err.to_string(),
            "subnet fd00::1/128 is too small to leave a usable host address; use a prefix of \
             /127 or shorter"
        );
        ipam.request_pool(&explicit("10.0.0.0/30")).unwrap();
        // A /127 has one usable address besides the subnet-router anycast address.
        let p = ipam.request_pool(&explicit("fd00::/127")).unwrap();
        let a = ipam
            .request_address(&p.id, None, LeaseKind::Gateway)
            .unwrap();
        assert_eq!(a, net("fd00::1/127"));
        assert!(matches!(
            ipam.request_address(&p.id, None, LeaseKind::Endpoint),
            Err(IpamError::PoolExhausted { .. })
        ));
    }

    #[test]
    fn overlap_errors() {
        let mut ipam = ipam();
        ipam.request_pool(&explicit("10.20.0.0/16")).unwrap();
        // Same subnet (even spelled with host bits).
        let err = ipam.request_pool(&explicit("10.20.5.5/16")).unwrap_err();
        assert_eq!(
            err,
            IpamError::Overlap {
                subnet: net("10.20.0.0/16"),
                existing: net("10.20.0.0/16")
            }
        );
        // Subset.
        let err = ipam.request_pool(&explicit("10.20.0.0/24")).unwrap_err();
        assert_eq!(
            err.to_string(),
            "subnet 10.20.0.0/24 overlaps 10.20.0.0/16, already used by another sluice network; \
             choose a different --subnet"
        );
        // Superset.
        let err = ipam.request_pool(&explicit("10.0.0.0/8")).unwrap_err();
        assert!(matches!(err, IpamError::Overlap { .. }));
        assert!(err.to_string().starts_with(
            "subnet 10.0.0.0/8 overlaps 10.20.0.0/16, already used by another sluice network"
        ));
        // Overlap with an auto pool.
        let a = ipam.request_pool(&auto(false)).unwrap();
        let err = ipam.request_pool(&explicit("10.200.0.0/16")).unwrap_err();
        assert_eq!(
            err,
            IpamError::Overlap {
                subnet: net("10.200.0.0/16"),
                existing: a.subnet
            }
        );
        // Neighbours are fine; v6 never overlaps v4.
        ipam.request_pool(&explicit("10.21.0.0/16")).unwrap();
        ipam.request_pool(&explicit("fd00::/64")).unwrap();
        let err = ipam.request_pool(&explicit("fd00::/48")).unwrap_err();
        assert!(matches!(err, IpamError::Overlap { .. }));
        assert_eq!(ipam.pools().count(), 4);
    }

    #[test]
    fn ip_range_errors() {
        let mut ipam = ipam();
        let err = ipam
            .request_pool(&with_range("10.20.0.0/24", "10.21.0.0/25"))
            .unwrap_err();
        assert!(matches!(err, IpamError::InvalidSubPool { .. }));
        assert_eq!(
            err.to_string(),
            "invalid --ip-range 10.21.0.0/25: it is not inside the subnet 10.20.0.0/24; give an \
             --ip-range inside the subnet"
        );
        // Larger than the subnet.
        assert!(matches!(
            ipam.request_pool(&with_range("10.20.0.0/24", "10.20.0.0/23")),
            Err(IpamError::InvalidSubPool { .. })
        ));
        // Wrong family.
        let err = ipam
            .request_pool(&with_range("10.20.0.0/24", "fd00::/64"))
            .unwrap_err();
        assert!(matches!(err, IpamError::InvalidSubPool { .. }));
        assert!(
            err.to_string()
                .contains("it is IPv6 but the subnet 10.20.0.0/24 is IPv4")
        );
        assert_eq!(ipam.pools().count(), 0);
        // Equal to the subnet is fine.
        let p = ipam
            .request_pool(&with_range("10.20.0.0/24", "10.20.0.0/24"))
            .unwrap();
        assert_eq!(p.range, Some(net("10.20.0.0/24")));
    }

    // ---- addresses ----

    #[test]
    fn gateway_then_endpoint_sequence() {
        let mut ipam = ipam();
        let p = ipam.request_pool(&explicit("10.20.0.0/24")).unwrap();
        let gw = ipam
            .request_address(&p.id, None, LeaseKind::Gateway)
            .unwrap();
        assert_eq!(gw, net("10.20.0.1/24"));
        assert_eq!(ipam.pool(&p.id).unwrap().cursor, None);
        assert_eq!(endpoint(&mut ipam, &p.id), "10.20.0.2/24");
        assert_eq!(endpoint(&mut ipam, &p.id), "10.20.0.3/24");
        let aux = ipam.request_address(&p.id, None, LeaseKind::Aux).unwrap();
        assert_eq!(aux, net("10.20.0.4/24"));
        assert_eq!(endpoint(&mut ipam, &p.id), "10.20.0.5/24");
        let pool = ipam.pool(&p.id).unwrap();
        assert_eq!(pool.cursor, Some(ip("10.20.0.5")));
        assert_eq!(pool.leases.get(&ip("10.20.0.1")), Some(&LeaseKind::Gateway));
        assert_eq!(pool.leases.get(&ip("10.20.0.4")), Some(&LeaseKind::Aux));
        assert_eq!(
            pool.leases.get(&ip("10.20.0.5")),
            Some(&LeaseKind::Endpoint)
        );
        assert_eq!(pool.leases.len(), 5);
    }

    #[test]
    fn endpoint_without_gateway_starts_at_first_usable() {
        let mut ipam = ipam();
        let p = ipam.request_pool(&explicit("10.20.0.0/24")).unwrap();
        assert_eq!(endpoint(&mut ipam, &p.id), "10.20.0.1/24");
        // The gateway then takes the first free one.
        let gw = ipam
            .request_address(&p.id, None, LeaseKind::Gateway)
            .unwrap();
        assert_eq!(gw, net("10.20.0.2/24"));
        assert_eq!(endpoint(&mut ipam, &p.id), "10.20.0.3/24");
    }

    #[test]
    fn released_address_not_handed_straight_back_then_wraps() {
        let mut ipam = ipam();
        let p = ipam.request_pool(&explicit("10.20.0.0/24")).unwrap();
        ipam.request_address(&p.id, None, LeaseKind::Gateway)
            .unwrap();
        assert_eq!(endpoint(&mut ipam, &p.id), "10.20.0.2/24");
        assert_eq!(endpoint(&mut ipam, &p.id), "10.20.0.3/24");
        assert_eq!(ipam.release_address(&p.id, ip("10.20.0.2")), Ok(true));
        assert_eq!(endpoint(&mut ipam, &p.id), "10.20.0.4/24");
        for i in 5..=254 {
            assert_eq!(endpoint(&mut ipam, &p.id), format!("10.20.0.{i}/24"));
        }
        // Past the end (.255 is broadcast): wraps, skipping .1 (gateway), reuses .2.
        assert_eq!(endpoint(&mut ipam, &p.id), "10.20.0.2/24");
        let err = ipam
            .request_address(&p.id, None, LeaseKind::Endpoint)
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "no free address left in pool 10.20.0.0/24; release an address or use a larger \
             --subnet/--ip-range"
        );
    }

    #[test]
    fn releasing_cursor_address_does_not_reuse_it_immediately() {
        let mut ipam = ipam();
        let p = ipam.request_pool(&explicit("10.9.0.0/29")).unwrap();
        assert_eq!(endpoint(&mut ipam, &p.id), "10.9.0.1/29");
        assert_eq!(endpoint(&mut ipam, &p.id), "10.9.0.2/29");
        assert!(ipam.release_address(&p.id, ip("10.9.0.2")).unwrap());
        assert_eq!(ipam.pool(&p.id).unwrap().cursor, Some(ip("10.9.0.2")));
        assert_eq!(endpoint(&mut ipam, &p.id), "10.9.0.3/29");
        assert!(ipam.release_address(&p.id, ip("10.9.0.3")).unwrap());
        for i in 4..=6 {
            assert_eq!(endpoint(&mut ipam, &p.id), format!("10.9.0.{i}/29"));
        }
        // Wraps: .1 held, .2 free.
        assert_eq!(endpoint(&mut ipam, &p.id), "10.9.0.2/29");
        // Then .3, the last free one.
        assert_eq!(endpoint(&mut ipam, &p.id), "10.9.0.3/29");
        assert!(matches!(
            ipam.request_address(&p.id, None, LeaseKind::Endpoint),
            Err(IpamError::PoolExhausted { .. })
        ));
    }

    #[test]
    fn gateway_reuses_first_free() {
        let mut ipam = ipam();
        let p = ipam.request_pool(&explicit("10.20.0.0/24")).unwrap();
        ipam.request_address(&p.id, None, LeaseKind::Gateway)
            .unwrap();
        endpoint(&mut ipam, &p.id);
        assert!(ipam.release_address(&p.id, ip("10.20.0.1")).unwrap());
        let gw = ipam
            .request_address(&p.id, None, LeaseKind::Gateway)
            .unwrap();
        assert_eq!(gw, net("10.20.0.1/24"));
    }

    #[test]
    fn small_pool_exhaustion() {
        let mut ipam = ipam();
        let p = ipam.request_pool(&explicit("10.9.0.0/30")).unwrap();
        let gw = ipam
            .request_address(&p.id, None, LeaseKind::Gateway)
            .unwrap();
        assert_eq!(gw, net("10.9.0.1/30"));
        assert_eq!(endpoint(&mut ipam, &p.id), "10.9.0.2/30");
        let err = ipam
            .request_address(&p.id, None, LeaseKind::Endpoint)
            .unwrap_err();
        assert_eq!(
            err,
            IpamError::PoolExhausted {
                pool: net("10.9.0.0/30"),
                range: None
            }
        );
        // Gateway and aux are refused the same way.
        assert!(matches!(
            ipam.request_address(&p.id, None, LeaseKind::Gateway),
            Err(IpamError::PoolExhausted { .. })
        ));
        // Releasing frees room again.
        assert!(ipam.release_address(&p.id, ip("10.9.0.2")).unwrap());
        assert_eq!(endpoint(&mut ipam, &p.id), "10.9.0.2/30");
    }

    #[test]
    fn dynamic_allocation_restricted_to_ip_range() {
        let mut ipam = ipam();
        let p = ipam
            .request_pool(&with_range("10.20.0.0/24", "10.20.0.252/30"))
            .unwrap();
        let gw = ipam
            .request_address(&p.id, None, LeaseKind::Gateway)
            .unwrap();
        // Range address, subnet prefix.
        assert_eq!(gw, net("10.20.0.252/24"));
        assert_eq!(endpoint(&mut ipam, &p.id), "10.20.0.253/24");
        assert_eq!(endpoint(&mut ipam, &p.id), "10.20.0.254/24");
        // .255 is the subnet's broadcast address even though it is inside the range.
        let err = ipam
            .request_address(&p.id, None, LeaseKind::Endpoint)
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "no free address left in pool 10.20.0.0/24 (range 10.20.0.252/30); release an \
             address or use a larger --subnet/--ip-range"
        );
        // Static addresses outside the range still work.
        let s = ipam
            .request_address(&p.id, Some(ip("10.20.0.5")), LeaseKind::Endpoint)
            .unwrap();
        assert_eq!(s, net("10.20.0.5/24"));
    }

    #[test]
    fn range_larger_than_pool_middle() {
        let mut ipam = ipam();
        let p = ipam
            .request_pool(&with_range("10.20.0.0/24", "10.20.0.128/25"))
            .unwrap();
        let gw = ipam
            .request_address(&p.id, None, LeaseKind::Gateway)
            .unwrap();
        assert_eq!(gw, net("10.20.0.128/24"));
        for i in 129..=254 {
            assert_eq!(endpoint(&mut ipam, &p.id), format!("10.20.0.{i}/24"));
        }
        let err = ipam
            .request_address(&p.id, None, LeaseKind::Aux)
            .unwrap_err();
        assert_eq!(
            err,
            IpamError::PoolExhausted {
                pool: net("10.20.0.0/24"),
                range: Some(net("10.20.0.128/25"))
            }
        );
    }

    #[test]
    fn static_address_outside_range_allowed_and_does_not_move_cursor() {
        let mut ipam = ipam();
        let p = ipam
            .request_pool(&with_range("10.20.0.0/24", "10.20.0.128/25"))
            .unwrap();
        let a = ipam
            .request_address(&p.id, Some(ip("10.20.0.10")), LeaseKind::Endpoint)
            .unwrap();
        assert_eq!(a, net("10.20.0.10/24"));
        assert_eq!(ipam.pool(&p.id).unwrap().cursor, None);
        // Static inside the range is skipped by dynamic allocation.
        ipam.request_address(&p.id, Some(ip("10.20.0.128")), LeaseKind::Gateway)
            .unwrap();
        ipam.request_address(&p.id, Some(ip("10.20.0.129")), LeaseKind::Aux)
            .unwrap();
        assert_eq!(endpoint(&mut ipam, &p.id), "10.20.0.130/24");
        let pool = ipam.pool(&p.id).unwrap();
        assert_eq!(pool.leases.get(&ip("10.20.0.129")), Some(&LeaseKind::Aux));
        assert_eq!(
            pool.leases.get(&ip("10.20.0.128")),
            Some(&LeaseKind::Gateway)
        );
    }

    #[test]
    fn static_address_errors() {
        let mut ipam = ipam();
        let p = ipam.request_pool(&explicit("10.20.0.0/24")).unwrap();
        ipam.request_address(&p.id, Some(ip("10.20.0.5")), LeaseKind::Endpoint)
            .unwrap();

        let err = ipam
            .request_address(&p.id, Some(ip("10.20.0.5")), LeaseKind::Endpoint)
            .unwrap_err();
        assert_eq!(
            err,
            IpamError::AddressInUse {
                addr: ip("10.20.0.5"),
                pool: net("10.20.0.0/24")
            }
        );
        assert!(
            err.to_string()
                .starts_with("address 10.20.0.5 is already in use in pool 10.20.0.0/24")
        );

        let err = ipam
            .request_address(&p.id, Some(ip("10.9.9.9")), LeaseKind::Endpoint)
            .unwrap_err();
        assert!(matches!(err, IpamError::OutOfPool { .. }));
        assert!(
            err.to_string()
                .starts_with("address 10.9.9.9 is outside pool 10.20.0.0/24")
        );

        let err = ipam
            .request_address(&p.id, Some(ip("fd00::5")), LeaseKind::Endpoint)
            .unwrap_err();
        assert!(matches!(err, IpamError::OutOfPool { .. }));

        let err = ipam
            .request_address(&p.id, Some(ip("10.20.0.255")), LeaseKind::Endpoint)
            .unwrap_err();
        assert!(matches!(err, IpamError::Reserved { .. }));
        assert!(
            err.to_string()
                .starts_with("address 10.20.0.255 is the broadcast address of 10.20.0.0/24")
        );

        let err = ipam
            .request_address(&p.id, Some(ip("10.20.0.0")), LeaseKind::Gateway)
            .unwrap_err();
        assert!(
            err.to_string()
                .starts_with("address 10.20.0.0 is the network address of 10.20.0.0/24")
        );

        let err = ipam
            .request_address("10.99.0.0/24", Some(ip("10.99.0.5")), LeaseKind::Endpoint)
            .unwrap_err();
        assert_eq!(err, IpamError::UnknownPool("10.99.0.0/24".to_owned()));
        assert_eq!(err.to_string(), "unknown pool ID 10.99.0.0/24");

        // Nothing was leased by the failures.
        assert_eq!(ipam.pool(&p.id).unwrap().leases.len(), 1);
    }

    #[test]
    fn v6_reserved_and_static() {
        let mut ipam = ipam();
        let p = ipam.request_pool(&explicit("fd00:20::/64")).unwrap();
        let err = ipam
            .request_address(&p.id, Some(ip("fd00:20::")), LeaseKind::Endpoint)
            .unwrap_err();
        assert!(
            err.to_string().starts_with(
                "address fd00:20:: is the subnet-router anycast address of fd00:20::/64"
            )
        );
        // The last address is usable in IPv6 (no broadcast).
        let last = ipam
            .request_address(
                &p.id,
                Some(ip("fd00:20::ffff:ffff:ffff:ffff")),
                LeaseKind::Endpoint,
            )
            .unwrap();
        assert_eq!(last, net("fd00:20::ffff:ffff:ffff:ffff/64"));
        assert!(matches!(
            ipam.request_address(&p.id, Some(ip("10.0.0.1")), LeaseKind::Endpoint),
            Err(IpamError::OutOfPool { .. })
        ));
        let gw = ipam
            .request_address(&p.id, None, LeaseKind::Gateway)
            .unwrap();
        assert_eq!(gw, net("fd00:20::1/64"));
        assert_eq!(endpoint(&mut ipam, &p.id), "fd00:20::2/64");
    }

    #[test]
    fn v6_wraps_at_end_of_address_space() {
        // A pool at the very top of the IPv6 space: no overflow at ffff:...:ffff.
        let mut ipam = ipam();
        let p = ipam
            .request_pool(&explicit("ffff:ffff:ffff:ffff:ffff:ffff:ffff:fff8/125"))
            .unwrap();
        for i in 9..=15 {
            assert_eq!(
                endpoint(&mut ipam, &p.id),
                format!("ffff:ffff:ffff:ffff:ffff:ffff:ffff:fff{i:x}/125")
            );
        }
        assert!(matches!(
            ipam.request_address(&p.id, None, LeaseKind::Endpoint),
            Err(IpamError::PoolExhausted { .. })
        ));
        assert!(
            ipam.release_address(&p.id, ip("ffff:ffff:ffff:ffff:ffff:ffff:ffff:fffb"))
                .unwrap()
        );
        assert_eq!(
            endpoint(&mut ipam, &p.id),
            "ffff:ffff:ffff:ffff:ffff:ffff:ffff:fffb/125"
        );
    }

    #[test]
    fn v6_64_fast_with_thousands_of_leases() {
        let mut ipam = ipam();
        let p = ipam.request_pool(&auto(true)).unwrap();
        ipam.request_address(&p.id, None, LeaseKind::Gateway)
            .unwrap();
        let n = 20_000u128;
        for i in 2..n + 2 {
            let a = ipam
                .request_address(&p.id, None, LeaseKind::Endpoint)
                .unwrap();
            assert_eq!(a.ip(), IpAddr::V6(Ipv6Addr::from(u128::from(ip_u(&p)) + i)));
        }
        // Release every other one: they are not reused while the cursor moves on.
        for i in (2..n + 2).step_by(2) {
            let a = IpAddr::V6(Ipv6Addr::from(u128::from(ip_u(&p)) + i));
            assert!(ipam.release_address(&p.id, a).unwrap());
        }
        let next = ipam
            .request_address(&p.id, None, LeaseKind::Endpoint)
            .unwrap();
        assert_eq!(
            next.ip(),
            IpAddr::V6(Ipv6Addr::from(u128::from(ip_u(&p)) + n + 2))
        );
        // Wrap-around over the thousands of leases near the start: put the cursor at the very
        // end of the /64 and take the last address, so the next search wraps.
        let last = IpAddr::V6(Ipv6Addr::from(u128::from(ip_u(&p)) + u128::from(u64::MAX)));
        ipam.pools.get_mut(&p.id).unwrap().cursor = Some(last);
        ipam.request_address(&p.id, Some(last), LeaseKind::Endpoint)
            .unwrap();
        let wrapped = ipam
            .request_address(&p.id, None, LeaseKind::Endpoint)
            .unwrap();
        assert_eq!(
            wrapped.ip(),
            IpAddr::V6(Ipv6Addr::from(u128::from(ip_u(&p)) + 2))
        );
        assert_eq!(wrapped.prefix(), 64);
        // The cursor now walks the released holes one by one.
        for _ in 0..5_000 {
            ipam.request_address(&p.id, None, LeaseKind::Aux).unwrap();
        }
    }

    fn ip_u(p: &Pool) -> Ipv6Addr {
        match p.subnet.network() {
            IpAddr::V6(a) => a,
            IpAddr::V4(_) => panic!("not v6"),
        }
    }

    #[test]
    fn exhausted_v4_16_detected() {
        let mut ipam = ipam();
        let p = ipam.request_pool(&explicit("10.50.0.0/16")).unwrap();
        for _ in 0..65_534 {
            ipam.request_address(&p.id, None, LeaseKind::Endpoint)
                .unwrap();
        }
        assert!(matches!(
            ipam.request_address(&p.id, None, LeaseKind::Endpoint),
            Err(IpamError::PoolExhausted { .. })
        ));
        assert!(matches!(
            ipam.request_address(&p.id, None, LeaseKind::Gateway),
            Err(IpamError::PoolExhausted { .. })
        ));
        assert!(ipam.release_address(&p.id, ip("10.50.128.7")).unwrap());
        assert_eq!(endpoint(&mut ipam, &p.id), "10.50.128.7/16");
    }

    // ---- release ----

    #[test]
    fn release_idempotence() {
        let mut ipam = ipam();
        assert_eq!(ipam.release_pool("10.20.0.0/24"), None);
        assert_eq!(
            ipam.release_address("10.20.0.0/24", ip("10.20.0.2")),
            Ok(false)
        );
        let p = ipam.request_pool(&explicit("10.20.0.0/24")).unwrap();
        assert_eq!(ipam.release_address(&p.id, ip("10.20.0.2")), Ok(false));
        assert_eq!(ipam.release_address(&p.id, ip("fd00::2")), Ok(false));
        endpoint(&mut ipam, &p.id);
        assert_eq!(ipam.release_address(&p.id, ip("10.20.0.1")), Ok(true));
        assert_eq!(ipam.release_address(&p.id, ip("10.20.0.1")), Ok(false));
        // Cursor stays after release.
        assert_eq!(ipam.pool(&p.id).unwrap().cursor, Some(ip("10.20.0.1")));

        endpoint(&mut ipam, &p.id);
        let released = ipam.release_pool(&p.id).unwrap();
        assert_eq!(released.leases.len(), 1);
        assert_eq!(ipam.release_pool(&p.id), None);
        assert!(matches!(
            ipam.request_address(&p.id, None, LeaseKind::Endpoint),
            Err(IpamError::UnknownPool(_))
        ));
        // The subnet is free again, with fresh leases.
        let again = ipam.request_pool(&explicit("10.20.0.0/24")).unwrap();
        assert!(again.leases.is_empty());
        assert_eq!(again.cursor, None);
    }

    // ---- persistence ----

    #[test]
    fn pool_serde_round_trip() {
        let mut ipam = ipam();
        let p = ipam
            .request_pool(&with_range("10.20.0.0/24", "10.20.0.128/25"))
            .unwrap();
        ipam.request_address(&p.id, None, LeaseKind::Gateway)
            .unwrap();
        ipam.request_address(&p.id, None, LeaseKind::Endpoint)
            .unwrap();
        ipam.request_address(&p.id, Some(ip("10.20.0.9")), LeaseKind::Aux)
            .unwrap();
        let v6 = ipam.request_pool(&auto(true)).unwrap();
        ipam.request_address(&v6.id, None, LeaseKind::Endpoint)
            .unwrap();
        for pool in ipam.pools() {
            let json = serde_json::to_string(pool).unwrap();
            let back: Pool = serde_json::from_str(&json).unwrap();
            assert_eq!(&back, pool);
        }
        let json = serde_json::to_value(ipam.pool(&p.id).unwrap()).unwrap();
        assert_eq!(json["id"], "10.20.0.0/24");
        assert_eq!(json["subnet"], "10.20.0.0/24");
        assert_eq!(json["range"], "10.20.0.128/25");
        assert_eq!(json["leases"]["10.20.0.128"], "Gateway");
        assert_eq!(json["leases"]["10.20.0.9"], "Aux");
        assert_eq!(json["cursor"], "10.20.0.129");
        // Config round-trips too.
        let c = serde_json::to_string(&IpamConfig::default()).unwrap();
        assert_eq!(
            serde_json::from_str::<IpamConfig>(&c).unwrap(),
            IpamConfig::default()
        );
    }

    #[test]
    fn restore_honours_leases_and_cursor() {
        let mut ipam = ipam();
        let p = ipam.request_pool(&explicit("10.20.0.0/24")).unwrap();
        let a = ipam.request_pool(&auto(false)).unwrap();
        ipam.request_address(&p.id, None, LeaseKind::Gateway)
            .unwrap();
        assert_eq!(endpoint(&mut ipam, &p.id), "10.20.0.2/24");
        assert_eq!(endpoint(&mut ipam, &p.id), "10.20.0.3/24");
        ipam.release_address(&p.id, ip("10.20.0.3")).unwrap();

        let stored: Vec<String> = ipam
            .pools()
            .map(|p| serde_json::to_string(p).unwrap())
            .collect();
        let pools: Vec<Pool> = stored
            .iter()
            .map(|s| serde_json::from_str(s).unwrap())
            .collect();
        let mut restored = Ipam::new(IpamConfig::default(), pools);
        assert_eq!(restored.pool(&p.id), ipam.pool(&p.id));
        assert_eq!(restored.pool(&a.id), ipam.pool(&a.id));
        // Cursor honoured: .3 was just released, the next is .4.
        assert_eq!(endpoint(&mut restored, &p.id), "10.20.0.4/24");
        // Leases honoured.
        assert!(matches!(
            restored.request_address(&p.id, Some(ip("10.20.0.2")), LeaseKind::Endpoint),
            Err(IpamError::AddressInUse { .. })
        ));
        // Held pools honoured by auto and explicit requests.
        assert_eq!(
            restored.request_pool(&auto(false)).unwrap().id,
            "10.200.1.0/24"
        );
        assert!(matches!(
            restored.request_pool(&explicit("10.20.0.0/25")),
            Err(IpamError::Overlap { .. })
        ));
    }

    #[test]
    fn stale_cursor_outside_range_starts_at_range_start() {
        let mut ipam = ipam();
        let p = ipam
            .request_pool(&with_range("10.20.0.0/24", "10.20.0.16/28"))
            .unwrap();
        ipam.pools.get_mut(&p.id).unwrap().cursor = Some(ip("10.20.0.200"));
        assert_eq!(endpoint(&mut ipam, &p.id), "10.20.0.16/24");
        ipam.pools.get_mut(&p.id).unwrap().cursor = Some(ip("fd00::1"));
        assert_eq!(endpoint(&mut ipam, &p.id), "10.20.0.17/24");
    }

    // ---- property-style ----

    /// Deterministic linear congruential generator (Knuth's MMIX constants).
    struct Lcg(u64);

    impl Lcg {
        fn next(&mut self) -> u64 {
            self.0 = self
                .0
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            self.0 >> 33
        }

        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    fn run_random(req: PoolRequest, seed: u64, steps: usize) {
        let mut ipam = ipam();
        let p = ipam.request_pool(&req).unwrap();
        let subnet = Span::of(p.subnet);
        let range = p.range.map(Span::of).unwrap_or(subnet);
        let capacity = (range.first..=range.last)
            .filter(|&n| subnet.reserved(n).is_none())
            .count();
        let mut model: std::collections::BTreeSet<IpAddr> = Default::default();
        let mut rng = Lcg(seed);
        let size = (subnet.last - subnet.first + 1) as u64;
        for _ in 0..steps {
            match rng.below(10) {
                0..=4 => {
                    let kind = [LeaseKind::Endpoint, LeaseKind::Aux, LeaseKind::Gateway]
                        [rng.below(3) as usize];
                    let in_range = model
                        .iter()
                        .filter(|a| range.contains(subnet.v6, from_ip(**a).1))
                        .count();
                    match ipam.request_address(&p.id, None, kind) {
                        Ok(a) => {
                            let n = from_ip(a.ip()).1;
                            assert_eq!(a.prefix(), p.subnet.prefix());
                            assert!(range.contains(subnet.v6, n), "{a} outside range");
                            assert!(subnet.reserved(n).is_none(), "{a} reserved");
                            assert!(model.insert(a.ip()), "{a} handed out twice");
                        }
                        Err(IpamError::PoolExhausted { .. }) => {
                            assert_eq!(in_range, capacity, "exhausted with room left");
                        }
                        Err(e) => panic!("unexpected {e}"),
                    }
                }
                5 | 6 => {
                    // Preferred address anywhere in or just around the subnet.
                    let offset = u128::from(rng.below(size + 4));
                    let n = (subnet.first + offset).saturating_sub(2);
                    let addr = to_ip(subnet.v6, n);
                    let result = ipam.request_address(&p.id, Some(addr), LeaseKind::Endpoint);
                    if !subnet.contains(subnet.v6, n) {
                        assert!(matches!(result, Err(IpamError::OutOfPool { .. })));
                    } else if subnet.reserved(n).is_some() {
                        assert!(matches!(result, Err(IpamError::Reserved { .. })));
                    } else if model.contains(&addr) {
                        assert!(matches!(result, Err(IpamError::AddressInUse { .. })));
                    } else {
                        assert_eq!(result.unwrap().ip(), addr);
                        model.insert(addr);
                    }
                }
                7 | 8 if !model.is_empty() => {
                    let i = rng.below(model.len() as u64) as usize;
                    let addr = *model.iter().nth(i).unwrap();
                    assert_eq!(ipam.release_address(&p.id, addr), Ok(true));
                    model.remove(&addr);
                }
                _ => {
                    let n = subnet.first + u128::from(rng.below(size));
                    let addr = to_ip(subnet.v6, n);
                    let expected = model.remove(&addr);
                    assert_eq!(ipam.release_address(&p.id, addr), Ok(expected));
                }
            }
            let held: std::collections::BTreeSet<IpAddr> =
                ipam.pool(&p.id).unwrap().leases.keys().copied().collect();
            assert_eq!(held, model);
        }
    }

    #[test]
    fn random_sequences_keep_invariants() {
        let shapes = [
            explicit("10.30.0.0/28"),
            explicit("10.30.0.0/30"),
            with_range("10.30.0.0/26", "10.30.0.16/28"),
            with_range("10.30.0.0/26", "10.30.0.32/27"),
            with_range("10.30.0.0/26", "10.30.0.0/29"),
            explicit("fd00:30::/124"),
            explicit("fd00:30::/127"),
            with_range("fd00:30::/120", "fd00:30::/125"),
            with_range("fd00:30::/120", "fd00:30::f0/124"),
        ];
        for (i, shape) in shapes.into_iter().enumerate() {
            for seed in 0..8u64 {
                run_random(shape.clone(), seed * 7919 + i as u64, 600);
            }
        }
    }

    #[test]
    fn random_pool_requests_never_overlap() {
        let config = IpamConfig::new(net("10.0.0.0/20"), 24, net("fd00::/60"), 64).unwrap();
        let mut ipam = Ipam::new(config, Vec::new());
        let mut rng = Lcg(42);
        for _ in 0..2000 {
            let v6 = rng.below(2) == 1;
            match rng.below(4) {
                0 => {
                    let ids: Vec<String> = ipam.pools().map(|p| p.id.clone()).collect();
                    if !ids.is_empty() {
                        let id = &ids[rng.below(ids.len() as u64) as usize];
                        assert!(ipam.release_pool(id).is_some());
                    }
                }
                1 => {
                    let s = if v6 {
                        let prefix = 60 + rng.below(8) as u8;
                        let hi = rng.below(16) as u16;
                        IpNetwork::new(
                            IpAddr::V6(Ipv6Addr::new(0xfd00, 0, 0, hi, 0, 0, 0, 0)),
                            prefix,
                        )
                        .unwrap()
                    } else {
                        let prefix = 20 + rng.below(11) as u8;
                        let third = rng.below(16) as u8;
                        let fourth = rng.below(256) as u8;
                        IpNetwork::new(IpAddr::V4(Ipv4Addr::new(10, 0, third, fourth)), prefix)
                            .unwrap()
                    };
                    let req = PoolRequest {
                        pool: Some(s),
                        sub_pool: None,
                        v6,
                        global: false,
                    };
                    let _ = ipam.request_pool(&req);
                }
                _ => match ipam.request_pool(&auto(v6)) {
                    Ok(p) => assert!(p.auto),
                    Err(IpamError::DefaultRangeExhausted { .. }) => {
                        // Every candidate really is taken.
                        let (range, prefix) = ipam.config().family(v6);
                        let whole = Span::of(range);
                        let step = host_count(v6, prefix).unwrap();
                        let mut first = whole.first;
                        while first < whole.last {
                            let c = Span {
                                v6,
                                first,
                                last: first + step - 1,
                            };
                            assert!(ipam.pools().any(|p| Span::of(p.subnet).overlaps(c)));
                            first += step;
                        }
                    }
                    Err(e) => panic!("unexpected {e}"),
                },
            }
            let spans: Vec<Span> = ipam.pools().map(|p| Span::of(p.subnet)).collect();
            for (i, a) in spans.iter().enumerate() {
                for b in &spans[i + 1..] {
                    assert!(!a.overlaps(*b), "{a:?} overlaps {b:?}");
                }
            }
            for p in ipam.pools() {
                assert_eq!(p.id, pool_id(p.subnet));
            }
        }
    }
}
