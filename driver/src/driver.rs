//! The [`Driver`]: one method per protocol call, each a short sequence of IPAM decisions,
//! kernel changes and one store transaction. Calls are serialised by one mutex, except for
//! their slow parts on the hot path: CreateEndpoint makes its links outside it (its endpoint
//! ID and identity reserved), and CreateEndpoint, Join and container identities queue their
//! store write under it but wait for durability outside it (the store coalesces concurrent
//! writes, see [`crate::store`]). A call that fails part-way undoes what it did, so Docker's
//! retry or rollback finds a clean slate.

use std::collections::BTreeMap;
use std::net::IpAddr;

use ipnetwork::IpNetwork;
use tokio::sync::Mutex;
use tracing::{debug, info, warn};

use crate::datapath::layout::{
    EP_EGRESS_ENFORCED, EP_IDENTITY_PENDING, EP_INGRESS_ENFORCED, EP_ISOLATE, EP_SOURCE_CHECK,
    IDENTITY_FIRST_ENDPOINT,
};
use crate::ipam::{Ipam, IpamConfig, IpamError, LeaseKind, Pool, PoolRequest};
use crate::kernel::{
    BridgeSpec, EndpointDatapath, Kernel, KernelError, PoolLink, PoolLinkSpec, VethSpec,
};
use crate::macvlan::{MacvlanConfig, MacvlanSpec, OPT_MACVLAN_MODE, OPT_PARENT, ParentSpec};
use crate::model::{
    ContainerIdentity, Endpoint, EndpointCreated, EndpointRequest, JoinInfo, Mode, Network,
    NetworkRequest, OPT_INGRESS, OPT_IPV6_NAT, OPT_ISOLATE, OPT_MASQUERADE, OPT_MODE, OPT_MTU,
    derive_mac,
};
use crate::names;
use crate::nat::{NatRuleset, NetworkNat, PortRequest, PublishedPort};
use crate::policy::{
    Applied, EndpointView, NetworkView, PolicyDoc, PolicyEngine, PolicyError, Resolution,
    SubjectIds,
};
use crate::store::{Change, Store, StoreError};

/// Options sluice understands in `docker network create -o`.
pub const SUPPORTED_OPTIONS: &[&str] = &[
    OPT_MODE,
    OPT_MTU,
    OPT_ISOLATE,
    OPT_INGRESS,
    OPT_MASQUERADE,
    OPT_IPV6_NAT,
    OPT_PARENT,
    OPT_MACVLAN_MODE,
    crate::vxlan::OPT_VNI,
    crate::vxlan::OPT_VXLAN_PORT,
    crate::vxlan::OPT_CLUSTER_NETWORK,
];

/// Errors of the driver. [`DriverError::is_client_error`] tells the plugin which are the
/// caller's fault (HTTP 400) and which are sluice's or the kernel's (HTTP 500).
#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    /// IPAM refused.
    #[error(transparent)]
    Ipam(#[from] IpamError),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The kernel refused.
    #[error(transparent)]
    Kernel(#[from] KernelError),
    /// No such network.
    #[error("unknown network {0}")]
    UnknownNetwork(String),
    /// No such endpoint.
    #[error("unknown endpoint {0}")]
    UnknownEndpoint(String),
    /// A bad option value or combination.
    #[error("{0}")]
    InvalidOption(String),
    /// The same ID with different settings.
    #[error("{0}")]
    Conflict(String),
    /// A policy was refused, or the stored ones are inconsistent.
    #[error(transparent)]
    Policy(#[from] PolicyError),
    /// The cluster store (`--cluster`) refused or failed.
    #[error(transparent)]
    Cluster(#[from] crate::cluster::ClusterError),
}

impl DriverError {
    /// True when the request was at fault rather than sluice or the kernel.
    #[must_use]
    pub fn is_client_error(&self) -> bool {
        match self {
            Self::Ipam(_)
            | Self::UnknownNetwork(_)
            | Self::UnknownEndpoint(_)
            | Self::InvalidOption(_)
            | Self::Conflict(_) => true,
            Self::Policy(e) => e.is_client_error(),
            Self::Cluster(e) => matches!(e, crate::cluster::ClusterError::Conflict(_)),
            Self::Store(_) | Self::Kernel(_) => false,
        }
    }
}

/// What start-up reconciliation did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ReconcileReport {
    /// Networks whose bridge was (re)configured.
    pub networks: usize,
    /// Endpoints whose veth pair was re-created because it was missing.
    pub endpoints_repaired: usize,
    /// Links that belonged to nobody and were removed.
    pub removed_links: Vec<String>,
    /// Errors met on the way (reconciliation carries on past them).
    pub errors: Vec<String>,
}

#[derive(Debug)]
struct State {
    ipam: Ipam,
    networks: BTreeMap<String, Network>,
    endpoints: BTreeMap<String, Endpoint>,
    /// The policy documents.
    policies: PolicyEngine,
    /// The policies resolved against the current endpoints: rules, enforced directions,
    /// pending identities, policy subjects.
    resolution: Resolution,
    /// Policy subjects, stable across resolutions (see [`SubjectIds`]).
    subjects: SubjectIds,
    /// A resync failed after it began: `resolution` may not be what is in the datapath, so
    /// the next change resyncs in full.
    unsynced: bool,
    /// Endpoints of other hosts on this host's `mode=vxlan` networks, by endpoint ID.
    remote: BTreeMap<String, crate::cluster::EndpointLocation>,
    /// Endpoints whose links are being made outside the lock (CreateEndpoint), with the
    /// identity reserved for them.
    creating: BTreeMap<String, u32>,
}

impl State {
    /// Copies of a network and of one of its endpoints, or which of the two is unknown.
    fn network_and_endpoint(
        &self,
        network_id: &str,
        endpoint_id: &str,
    ) -> Result<(Network, Endpoint), DriverError> {
        let net = self
            .networks
            .get(network_id)
            .cloned()
            .ok_or_else(|| DriverError::UnknownNetwork(network_id.to_owned()))?;
        let ep = self
            .endpoints
            .get(endpoint_id)
            .filter(|e| e.network_id == network_id)
            .cloned()
            .ok_or_else(|| DriverError::UnknownEndpoint(endpoint_id.to_owned()))?;
        Ok((net, ep))
    }

    fn next_network_number(&self) -> u32 {
        self.networks.values().map(|n| n.number).max().unwrap_or(0) + 1
    }

    fn next_identity(&self) -> u32 {
        self.endpoints
            .values()
            .map(|e| e.identity)
            .chain(self.creating.values().copied())
            .max()
            .unwrap_or(0)
            .max(IDENTITY_FIRST_ENDPOINT - 1)
            + 1
    }

    /// Resolves the policies against the endpoints that exist now.
    fn resolve(&mut self) -> Resolution {
        let (endpoints, networks) = (self.endpoint_views(), self.network_views());
        self.policies
            .resolve_with(&endpoints, &networks, &mut self.subjects)
    }

    /// True when no policy exists and none is in force: resolving would find nothing, and
    /// an endpoint change cannot change any other endpoint's rules or flags.
    fn policy_free(&self) -> bool {
        // Rules exist only for subjects: no subject, no rule in force.
        self.policies.is_empty()
            && self.resolution.enforced.is_empty()
            && self.resolution.pending.is_empty()
            && self.resolution.subject_of.is_empty()
    }

    /// Whether a change of an endpoint, seen as `views` (before and/or after it), can be
    /// left out of the policy resolution: no subject or peer selector matches any of them,
    /// and (when the addresses change, `addressed`) no CIDR peer covers their addresses.
    /// Then no rule, subject or enforced direction changes, only the endpoint's pending
    /// flag ([`State::set_pending`]). Identities, addresses and the ipcache are the
    /// endpoint's own datapath entry, written either way.
    fn unseen_by_policy(&self, views: &[EndpointView], addressed: bool) -> bool {
        let networks = self.network_views();
        let seen = |v: &EndpointView| {
            self.policies.could_select(v, &networks)
                || (addressed && self.policies.cidr_covers(&v.addresses))
        };
        !self.unsynced && !views.iter().any(seen)
    }

    /// Sets the pending flag of `view` as a resolution would: nameless on a network some
    /// selector covers.
    fn set_pending(&mut self, view: &EndpointView) {
        let networks = self.network_views();
        if view.name.is_none() && self.policies.covers_network(view, &networks) {
            self.resolution.pending.insert(view.identity);
        } else {
            self.resolution.pending.remove(&view.identity);
        }
    }

    /// Keeps what the driver reads between resolutions (enforcement, pending, subjects) and
    /// lets the rules go: once compiled into the datapath they are the largest part of a
    /// resolution (one per CIDR of a 100k-CIDR policy) and are recomputed at the next one.
    fn keep_resolution(&mut self, mut resolution: Resolution) {
        resolution.rules = Vec::new();
        resolution.cidr_identities = BTreeMap::new();
        self.resolution = resolution;
    }

    /// What the datapath keys on for `ep` besides its addresses: `(flags, subject)`.
    fn datapath_flags(&self, ep: &Endpoint) -> (u32, u32) {
        let net = self.networks.get(&ep.network_id);
        let enforced = self.resolution.enforced(ep.identity);
        // A container may only send from its own addresses: otherwise it could borrow another
        // endpoint's identity at the receiver's policy.
        let mut flags = EP_SOURCE_CHECK;
        if net.is_none_or(|n| n.isolate) {
            flags |= EP_ISOLATE;
        }
        if enforced.ingress || net.is_some_and(|n| n.ingress_deny) {
            flags |= EP_INGRESS_ENFORCED;
        }
        if enforced.egress {
            flags |= EP_EGRESS_ENFORCED;
        }
        // Fail closed: while the container behind an endpoint is unknown, a policy that may
        // select it by name or label cannot be decided.
        if self.resolution.pending.contains(&ep.identity) {
            flags |= EP_IDENTITY_PENDING;
        }
        (flags, self.resolution.subject(ep.identity))
    }

    fn endpoint_views(&self) -> Vec<EndpointView> {
        self.endpoints
            .values()
            .map(|e| EndpointView::new(e, e.identity, e.container.as_ref()))
            .chain(self.remote_views())
            .collect()
    }

    fn network_views(&self) -> Vec<NetworkView> {
        self.networks
            .values()
            .map(|n| NetworkView {
                id: n.id.clone(),
                name: n.name.clone(),
            })
            .collect()
    }

    /// What sluice's nftables table must hold for the networks and published ports now.
    fn nat_ruleset(&self) -> NatRuleset {
        let networks = self
            .networks
            .values()
            // macvlan endpoints are on the LAN itself: no bridge, nothing to NAT.
            .filter(|n| n.mode != Mode::Macvlan)
            .map(|n| NetworkNat {
                bridge: n.bridge.clone(),
                internal: n.internal,
                masquerade: if n.internal {
                    Vec::new()
                } else {
                    n.ipv4
                        .iter()
                        .filter(|_| n.masquerade)
                        .chain(n.ipv6.iter().filter(|_| n.ipv6_nat))
                        .map(|d| d.pool)
                        .collect()
                },
                subnets: n.ipv4.iter().chain(&n.ipv6).map(|d| d.pool).collect(),
                gateways: n.gateway_addresses().map(|g| g.ip()).collect(),
            })
            .collect();
        let ports = self
            .endpoints
            .values()
            .filter(|e| {
                self.networks
                    .get(&e.network_id)
                    .is_some_and(|n| !n.internal && n.mode != Mode::Macvlan)
            })
            .flat_map(|e| {
                let ip = e.address.map(|a| a.ip());
                e.published.iter().filter_map(move |b| {
                    ip.map(|container_ip| PublishedPort {
                        binding: *b,
                        container_ip,
                    })
                })
            })
            .collect();
        NatRuleset { networks, ports }
    }

    /// The datapath's view of `ep`: flags from the network's options, the policies that
    /// select it (and their subject), and whether its identity is still unknown while policy
    /// applies.
    fn datapath_view(&self, ep: &Endpoint) -> EndpointDatapath {
        let net = self.networks.get(&ep.network_id);
        let (flags, subject) = self.datapath_flags(ep);
        EndpointDatapath {
            host_veth: ep.host_veth.clone(),
            ifindex: ep.ifindex,
            identity: ep.identity,
            subject,
            network: net.map_or(0, |n| n.number),
            flags,
            addresses: ep.address.into_iter().chain(ep.address_v6).collect(),
            sandboxed: net.is_some_and(|n| n.mode == Mode::Macvlan),
        }
    }
}

/// The warm link pool ([`Driver::with_link_pool`]): per bridge-backed network, spare veth
/// pairs whose programs are attached already, so CreateEndpoint pays no TCX attach.
#[derive(Debug, Default)]
struct LinkPool {
    /// Spare links kept per network; 0: no pool.
    size: usize,
    /// The spare links, by network ID. Pushed to under the state lock (so a network being
    /// deleted never gains one), taken from without it.
    links: std::sync::Mutex<BTreeMap<String, Vec<PoolLink>>>,
    /// Wakes the refill task ([`Driver::run_link_pool`]).
    wanted: tokio::sync::Notify,
    /// Pool links made by this process, part of their names.
    made: std::sync::atomic::AtomicU64,
    /// CreateEndpoints that asked for a pool link (found or not): refilling waits until
    /// this stops moving ([`REFILL_QUIET`]).
    asked: std::sync::atomic::AtomicU64,
    /// Cap of the adaptive size ([`Driver::with_link_pool_max`]); at most `size`: fixed.
    max: usize,
    /// Spare links kept per network now: `size`, grown towards the last burst up to `max`.
    target: std::sync::atomic::AtomicUsize,
    /// `asked` when the pool was last adapted ([`Driver::adapt_link_pool`]).
    adapted_at: std::sync::atomic::AtomicU64,
}

/// How long no CreateEndpoint must have asked for a pool link before the pool is refilled.
/// Making a spare link costs the same rtnl time as making an endpoint's pair inline, and
/// rtnl is global: refilling during a burst only slows the burst down (the pool is sized
/// to the burst instead, `--link-pool`).
pub const REFILL_QUIET: std::time::Duration = std::time::Duration::from_millis(50);

impl LinkPool {
    fn with_links<T>(&self, f: impl FnOnce(&mut BTreeMap<String, Vec<PoolLink>>) -> T) -> T {
        match self.links.lock() {
            Ok(mut l) => f(&mut l),
            Err(poisoned) => f(&mut poisoned.into_inner()),
        }
    }

    fn asked(&self) -> u64 {
        self.asked.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn target(&self) -> usize {
        self.size
            .max(self.target.load(std::sync::atomic::Ordering::Relaxed))
    }

    fn len(&self, network_id: &str) -> usize {
        self.with_links(|l| l.get(network_id).map_or(0, Vec::len))
    }

    /// A unique tag for a new pool link's names (11 hex digits: process, time, counter).
    fn tag(&self) -> String {
        let n = self.made.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let mixed = (u64::from(std::process::id()) << 28) ^ (u64::from(nanos) << 8) ^ n;
        format!("{:011x}", mixed & 0xfff_ffff_ffff)
    }
}

/// The network and IPAM driver.
#[derive(Debug)]
pub struct Driver<K: Kernel> {
    /// Spare, pre-attached veth pairs per bridge-backed network.
    pool: LinkPool,
    kernel: K,
    store: Store,
    state: Mutex<State>,
    /// The multi-host control plane (`--cluster`); `None`: single host.
    cluster: Option<std::sync::Arc<dyn crate::cluster::Cluster>>,
    /// `--docker-host none`: endpoints are identified from their options at once.
    identify_from_options: bool,
}

#[path = "cluster/driver_hooks.rs"]
mod cluster_hooks;

impl<K: Kernel> Driver<K> {
    /// Loads the state from `store`.
    ///
    /// # Errors
    /// When the store cannot be read.
    pub fn open(kernel: K, store: Store, ipam: IpamConfig) -> Result<Self, DriverError> {
        let snap = store.load()?;
        info!(
            networks = snap.networks.len(),
            endpoints = snap.endpoints.len(),
            pools = snap.pools.len(),
            store = %store.path().display(),
            "state loaded"
        );
        let mut state = State {
            ipam: Ipam::new(ipam, snap.pools),
            networks: snap
                .networks
                .into_iter()
                .map(|n| (n.id.clone(), n))
                .collect(),
            endpoints: snap
                .endpoints
                .into_iter()
                .map(|e| (e.id.clone(), e))
                .collect(),
            policies: PolicyEngine::load(snap.policies)?,
            resolution: Resolution::default(),
            subjects: SubjectIds::default(),
            unsynced: false,
            remote: BTreeMap::new(),
            creating: BTreeMap::new(),
        };
        // Records written before the datapath existed get their numbers now.
        let mut upgraded = Vec::new();
        let unnumbered: Vec<String> = state
            .networks
            .values()
            .filter(|n| n.number == 0)
            .map(|n| n.id.clone())
            .collect();
        for id in unnumbered {
            let number = state.next_network_number();
            if let Some(n) = state.networks.get_mut(&id) {
                n.number = number;
                upgraded.push(Change::PutNetwork(n.clone()));
            }
        }
        let unidentified: Vec<String> = state
            .endpoints
            .values()
            .filter(|e| e.identity == 0)
            .map(|e| e.id.clone())
            .collect();
        for id in unidentified {
            let identity = state.next_identity();
            if let Some(e) = state.endpoints.get_mut(&id) {
                e.identity = identity;
                upgraded.push(Change::PutEndpoint(e.clone()));
            }
        }
        store.apply(&upgraded)?;
        let resolution = state.resolve();
        state.keep_resolution(resolution);
        Ok(Self {
            kernel,
            store,
            state: Mutex::new(state),
            cluster: None,
            identify_from_options: false,
            pool: LinkPool::default(),
        })
    }

    /// Re-resolves the policies, writes the compiled rules to the datapath and updates the
    /// flags and subjects of the endpoints whose flags or subject changed (all but `skip`,
    /// which the caller attaches itself). Called whenever policies, endpoints or identities
    /// change. Carries on past endpoint errors and returns the first.
    ///
    /// Without any policy there is nothing to resolve and no other endpoint can change: it
    /// returns at once. Otherwise the datapath writes only the `POLICY` entries that differ
    /// from what it holds (it keeps a mirror), so an endpoint joining an existing rule set
    /// writes no entry as a subject, and one per rule naming it as a peer.
    async fn resync(&self, state: &mut State, skip: Option<&str>) -> Result<(), DriverError> {
        if state.policy_free() {
            return Ok(());
        }
        let before: BTreeMap<String, (u32, u32)> = state
            .endpoints
            .values()
            .map(|e| (e.id.clone(), state.datapath_flags(e)))
            .collect();
        state.unsynced = true;
        let mut resolution = state.resolve();
        for w in &resolution.warnings {
            warn!(warning = %w, "policy");
        }
        let compiled = resolution
            .take_compiled()
            .map_err(|e| DriverError::InvalidOption(format!("policy: {e}")))?;
        // Rules first, then flags: an endpoint becomes enforced only once its allow rules
        // are in place. (An endpoint moving to a new subject whose old one is gone may see
        // default deny for new flows in between: fail closed, never open.)
        self.kernel.apply_policy(&compiled).await?;
        drop(compiled);
        state.keep_resolution(resolution);
        state.unsynced = false;
        let mut first = None;
        for ep in state.endpoints.values() {
            if Some(ep.id.as_str()) == skip || before.get(&ep.id) == Some(&state.datapath_flags(ep))
            {
                continue;
            }
            if let Err(e) = self.kernel.update_endpoint(&state.datapath_view(ep)).await {
                warn!(endpoint = %ep.id, error = %e, "updating datapath flags");
                first.get_or_insert(e);
            }
        }
        // The resolution and its compilation were transient (tens of MB with a 100k-entry
        // policy), and a resync also follows endpoint and identity changes, not only applies.
        crate::memory::release_free_memory();
        first.map_or(Ok(()), |e| Err(e.into()))
    }

    /// [`Driver::resync`] after the container identity of endpoint `id` changed from
    /// `previous`, without resolving when the compiled rules cannot change: each peer
    /// selector matches the endpoint under both its old and its new identity or under neither
    /// (rules name it by its identity number, which stays; its addresses, hence the CIDR
    /// peers it is in, did not change either), and the policy subjects in use stay the same (its new
    /// set of selecting policies is another endpoint's already, and its old one remains
    /// another endpoint's or was none). Then only its own subject, enforced directions and
    /// pending flag change, written as one endpoint update.
    async fn resync_identity(
        &self,
        state: &mut State,
        id: &str,
        previous: Option<&ContainerIdentity>,
    ) -> Result<(), DriverError> {
        if state.policy_free() {
            return Ok(());
        }
        let Some(ep) = state.endpoints.get(id).cloned() else {
            return self.resync(state, None).await;
        };
        let old = EndpointView::new(&ep, ep.identity, previous);
        let new = EndpointView::new(&ep, ep.identity, ep.container.as_ref());
        let networks = state.network_views();
        let (old_set, _) = state.policies.selection(&old, &networks);
        let (new_set, enforcement) = state.policies.selection(&new, &networks);
        let old_subject = state.resolution.subject(ep.identity);
        let new_subject = if new_set.is_empty() {
            Some(0)
        } else {
            state.subjects.get(&new_set)
        };
        let subjects_stay = |state: &State| {
            // The subject this endpoint had must be the one of its old set ...
            let held = if old_set.is_empty() {
                0
            } else {
                state.subjects.get(&old_set).unwrap_or(u32::MAX)
            };
            held == old_subject
                && (old_set == new_set
                    // ... and, if it moves, its old one must stay in use by another endpoint.
                    || old_subject == 0
                    || state
                        .resolution
                        .subject_of
                        .iter()
                        .any(|(other, s)| *s == old_subject && *other != ep.identity))
        };
        let Some(new_subject) = new_subject.filter(|_| {
            !state.unsynced
                && subjects_stay(state)
                && state.policies.same_peer_matches(&old, &new, &networks)
        }) else {
            return self.resync(state, None).await;
        };
        debug!(endpoint = %id, subject = new_subject, "rules unchanged; no resolution");
        let flags = state.datapath_flags(&ep);
        if new_subject == 0 {
            state.resolution.subject_of.remove(&ep.identity);
            state.resolution.enforced.remove(&ep.identity);
        } else {
            state.resolution.subject_of.insert(ep.identity, new_subject);
            state.resolution.enforced.insert(ep.identity, enforcement);
        }
        state.set_pending(&new);
        if state.datapath_flags(&ep) != flags {
            self.kernel
                .update_endpoint(&state.datapath_view(&ep))
                .await?;
        }
        Ok(())
    }

    /// [`Driver::resync`] after endpoint `ep` was added to or removed from `state.endpoints`
    /// (the caller writes its own datapath entry), without resolving when no policy sees it
    /// ([`State::unseen_by_policy`]).
    async fn resync_added_or_removed(
        &self,
        state: &mut State,
        ep: &Endpoint,
    ) -> Result<(), DriverError> {
        if state.policy_free() {
            return Ok(());
        }
        let view = EndpointView::new(ep, ep.identity, ep.container.as_ref());
        if !state.unseen_by_policy(std::slice::from_ref(&view), true) {
            return self.resync(state, Some(&ep.id)).await;
        }
        debug!(endpoint = %ep.id, "no policy sees the endpoint; no resolution");
        if state.endpoints.contains_key(&ep.id) {
            state.set_pending(&view);
        } else {
            state.resolution.pending.remove(&ep.identity);
        }
        Ok(())
    }

    /// Applies policy documents (all or nothing), persists them and updates the datapath.
    ///
    /// # Errors
    /// Invalid documents (nothing changes), store or datapath failures.
    pub async fn apply_policies(&self, docs: Vec<PolicyDoc>) -> Result<Vec<Applied>, DriverError> {
        let mut state = self.state.lock().await;
        let published = self.cluster.is_some().then(|| docs.clone());
        let plan = state.policies.plan_apply(docs)?;
        self.store.apply(plan.changes())?;
        let applied = state.policies.commit(plan);
        info!(policies = applied.len(), "policies applied");
        self.resync(&mut state, None).await?;
        if let (Some(cluster), Some(docs)) = (&self.cluster, published) {
            cluster.publish_policies(&docs).await?;
        }
        drop(state);
        // The documents, the plan and the resolution were transient: give their pages back.
        crate::memory::release_free_memory();
        Ok(applied)
    }

    /// Removes a policy and updates the datapath.
    ///
    /// # Errors
    /// Unknown name, store or datapath failures.
    pub async fn remove_policy(&self, name: &str) -> Result<(), DriverError> {
        let mut state = self.state.lock().await;
        let plan = state.policies.plan_remove(name)?;
        self.store.apply(plan.changes())?;
        state.policies.commit(plan);
        info!(policy = %name, "policy removed");
        if let Some(cluster) = &self.cluster {
            cluster.withdraw_policy(name).await?;
        }
        self.resync(&mut state, None).await?;
        drop(state);
        crate::memory::release_free_memory();
        Ok(())
    }

    /// The applied policy documents, sorted by name (from the store: the engine keeps none).
    ///
    /// # Errors
    /// Store failures.
    pub async fn policies(&self) -> Result<Vec<PolicyDoc>, DriverError> {
        // Under the lock: an apply writes the store, then adopts the plan.
        let _state = self.state.lock().await;
        Ok(self.store.policies()?.into_iter().map(|p| p.doc).collect())
    }

    /// Records Docker's names of the networks (ID → name; from the Engine API, as Docker
    /// never sends them to plugins), persisted with the networks so that policy selectors
    /// naming a network keep matching across restarts. Re-resolves the policies when a name
    /// changed.
    ///
    /// # Errors
    /// Store or datapath failures.
    pub async fn set_network_names(
        &self,
        names: BTreeMap<String, String>,
    ) -> Result<(), DriverError> {
        let mut state = self.state.lock().await;
        let mut changes = Vec::new();
        for net in state.networks.values() {
            let name = names.get(&net.id);
            if name.is_some() && net.name.as_ref() != name {
                let mut renamed = net.clone();
                renamed.name = name.cloned();
                changes.push(Change::PutNetwork(renamed));
            }
        }
        if changes.is_empty() {
            return Ok(());
        }
        self.store.apply(&changes)?;
        for change in changes {
            if let Change::PutNetwork(net) = change {
                info!(network = %net.id, name = ?net.name, "network name known");
                state.networks.insert(net.id.clone(), net);
            }
        }
        // Only a selector's `network` reference looks at names.
        if state.policies.is_empty() || !state.policies.names_networks() {
            return Ok(());
        }
        self.resync(&mut state, None).await
    }

    /// Records who an endpoint belongs to (from the Docker Engine API) and updates its flags.
    /// Unknown endpoints are ignored (the container may already be gone).
    ///
    /// # Errors
    /// Store or datapath failures.
    pub async fn set_container(&self, identity: ContainerIdentity) -> Result<(), DriverError> {
        let mut state = self.state.lock().await;
        let Some(ep) = state.endpoints.get_mut(&identity.endpoint_id) else {
            debug!(endpoint = %identity.endpoint_id, "identity for an unknown endpoint; ignored");
            return Ok(());
        };
        if ep.container.as_ref() == Some(&identity) {
            return Ok(());
        }
        let previous = ep.container.replace(identity);
        let ep = ep.clone();
        // Queued in order under the lock, awaited outside it (group commit).
        let commit = self.store.submit(vec![Change::PutEndpoint(ep.clone())]);
        info!(endpoint = %ep.id, container = ?ep.container.as_ref().map(|c| &c.name), "container identity known");
        self.republish(&state, &ep.id).await;
        let synced = self
            .resync_identity(&mut state, &ep.id, previous.as_ref())
            .await;
        drop(state);
        if let Err(e) = commit.durable().await {
            let mut state = self.state.lock().await;
            if let Some(cur) = state.endpoints.get_mut(&ep.id)
                && cur.container == ep.container
            {
                cur.container = previous;
                if let Err(undo) = self.resync(&mut state, None).await {
                    warn!(error = %undo, "rollback of policy after a failed store write");
                }
            }
            return Err(e.into());
        }
        synced
    }

    /// The kernel handle (tests inspect the fake through it).
    pub fn kernel(&self) -> &K {
        &self.kernel
    }

    /// Keeps `size` spare veth pairs per bridge-backed network, made in the background by
    /// [`Driver::run_link_pool`] (0, the default: none; every CreateEndpoint makes its pair
    /// and attaches its programs inline).
    #[must_use]
    pub fn with_link_pool(mut self, size: usize) -> Self {
        self.pool.size = size;
        self
    }

    /// Lets the pool grow: after a burst of CreateEndpoints larger than the pool, it is
    /// refilled to the burst's size, up to `max` spare links per network
    /// ([`Driver::adapt_link_pool`]). `max` at most the pool's size: fixed size (the default).
    #[must_use]
    pub fn with_link_pool_max(mut self, max: usize) -> Self {
        self.pool.max = max;
        self
    }

    /// Grows the pool's size towards the number of CreateEndpoints that asked for a pool
    /// link since the last call (the last burst, as [`Driver::run_link_pool`] calls this once
    /// they pause), capped by [`Driver::with_link_pool_max`]. Never shrinks it. Returns the
    /// size now.
    pub fn adapt_link_pool(&self) -> usize {
        use std::sync::atomic::Ordering::Relaxed;
        let asked = self.pool.asked();
        let burst = asked.saturating_sub(self.pool.adapted_at.swap(asked, Relaxed));
        let burst = usize::try_from(burst).unwrap_or(usize::MAX);
        if self.pool.size > 0 && burst > self.pool.target() && self.pool.max > self.pool.size {
            let grown = burst.min(self.pool.max);
            self.pool.target.fetch_max(grown, Relaxed);
            info!(
                burst,
                size = grown,
                "link pool grown towards the last burst"
            );
        }
        self.pool.target()
    }

    /// Spare links in the pool of `network_id` now.
    #[must_use]
    pub fn link_pool_len(&self, network_id: &str) -> usize {
        self.pool.len(network_id)
    }

    /// Fills the pool of every bridge-backed network up to its size, one link at a time
    /// (one at a time leaves rtnl to the request path). Stops at the first failure (retried
    /// at the next wake-up), and as soon as a CreateEndpoint asks for a pool link (resumed
    /// by [`Driver::run_link_pool`] once they pause). Returns the links made.
    pub async fn refill_link_pools(&self) -> usize {
        let mut made = 0;
        if self.pool.size == 0 {
            return made;
        }
        let asked = self.pool.asked();
        loop {
            if self.pool.asked() != asked {
                debug!(made, "link pool refill paused: endpoints are being created");
                break;
            }
            let wanted = {
                let state = self.state.lock().await;
                state
                    .networks
                    .values()
                    .filter(|n| n.macvlan.is_none() && self.pool.len(&n.id) < self.pool.target())
                    .map(|n| (n.id.clone(), n.bridge.clone(), n.mtu))
                    .next()
            };
            let Some((network_id, bridge, mtu)) = wanted else {
                break;
            };
            let tag = self.pool.tag();
            let spec = PoolLinkSpec {
                host: names::pool_host(&tag),
                peer: names::pool_peer(&tag),
                bridge,
                mtu,
            };
            let link = match self.kernel.make_pool_link(&spec).await {
                Ok(link) => link,
                Err(e) => {
                    warn!(network = %network_id, error = %e, "link pool: making a spare link failed");
                    break;
                }
            };
            let state = self.state.lock().await;
            if state.networks.contains_key(&network_id) {
                self.pool
                    .with_links(|l| l.entry(network_id).or_default().push(link));
                made += 1;
            } else {
                drop(state);
                if let Err(e) = self.kernel.delete_pool_link(&link).await {
                    warn!(link = %link.host, error = %e, "link pool: removing a spare link of a deleted network failed");
                }
            }
        }
        if made > 0 {
            debug!(made, "link pool refilled");
        }
        made
    }

    /// The refill task: fills the pools, then again whenever a link is taken or a network
    /// created, once no CreateEndpoint has asked for a link for [`REFILL_QUIET`]. Runs until
    /// dropped (spawn it after [`Driver::reconcile`]).
    pub async fn run_link_pool(&self) {
        if self.pool.size == 0 {
            return;
        }
        loop {
            self.refill_link_pools().await;
            self.pool.wanted.notified().await;
            loop {
                let asked = self.pool.asked();
                tokio::time::sleep(REFILL_QUIET).await;
                if self.pool.asked() == asked {
                    break;
                }
            }
            self.adapt_link_pool();
        }
    }

    /// Takes a spare link of `network_id`, if any, and asks for a replacement.
    fn take_pool_link(&self, network_id: &str) -> Option<PoolLink> {
        if self.pool.size == 0 {
            return None;
        }
        self.pool
            .asked
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let link = self
            .pool
            .with_links(|l| l.get_mut(network_id).and_then(Vec::pop));
        self.pool.wanted.notify_one();
        link
    }

    /// Removes every spare link (daemon shutdown: nothing is left behind if the daemon does
    /// not come back); carries on past errors and returns them.
    pub async fn drain_link_pools(&self) -> Vec<KernelError> {
        let networks: Vec<(String, String)> = {
            let state = self.state.lock().await;
            self.pool.with_links(|l| {
                l.keys()
                    .map(|id| {
                        let bridge = state.networks.get(id).map(|n| n.bridge.clone());
                        (id.clone(), bridge.unwrap_or_default())
                    })
                    .collect()
            })
        };
        let mut errors = Vec::new();
        for (network_id, bridge) in networks {
            self.drain_link_pool(&network_id, &bridge, &mut errors)
                .await;
        }
        errors
    }

    /// Removes the spare links of `network_id`, whose bridge is `bridge` (network delete),
    /// in bulk ([`Kernel::delete_pool_links`]); carries on past errors.
    async fn drain_link_pool(&self, network_id: &str, bridge: &str, errors: &mut Vec<KernelError>) {
        let links = self
            .pool
            .with_links(|l| l.remove(network_id))
            .unwrap_or_default();
        if links.is_empty() {
            return;
        }
        let bridges: Vec<String> = [bridge.to_owned()]
            .into_iter()
            .filter(|b| !b.is_empty())
            .collect();
        let n = links.len();
        match self.kernel.delete_pool_links(&bridges, &links).await {
            Ok(()) => debug!(network = %network_id, links = n, "link pool drained"),
            Err(e) => errors.push(e),
        }
    }

    /// Brings the kernel in line with the store: every network's bridge exists and is
    /// configured, every endpoint that is not inside a container has its veth pair, the
    /// published ports of running containers hold their host ports again, sluice's nftables
    /// table is rebuilt, and sluice links that belong to no network or endpoint are removed.
    pub async fn reconcile(&self) -> ReconcileReport {
        let mut state = self.state.lock().await;
        let mut report = ReconcileReport::default();
        for net in state.networks.values() {
            if let Some(mv) = &net.macvlan {
                // A VLAN parent sluice made comes back if it went away.
                match self.kernel.ensure_parent(&ParentSpec::from(mv)).await {
                    Ok(_) => report.networks += 1,
                    Err(e) => report.errors.push(format!("network {}: {e}", net.id)),
                }
                continue;
            }
            match self.kernel.ensure_bridge(&bridge_spec(net)).await {
                Ok(()) => report.networks += 1,
                Err(e) => report.errors.push(format!("network {}: {e}", net.id)),
            }
            if let Some(spec) = cluster_hooks::vxlan_spec(net)
                && let Err(e) = self.kernel.ensure_vxlan(&spec).await
            {
                report.errors.push(format!("network {} vxlan: {e}", net.id));
            }
        }
        let existing = match self.kernel.sluice_links().await {
            Ok(l) => l,
            Err(e) => {
                report.errors.push(format!("listing links: {e}"));
                return report;
            }
        };
        for ep in state.endpoints.values() {
            // A joined endpoint's peer lives in the container; only its host end is visible.
            if existing.contains(&ep.host_veth) {
                continue;
            }
            if ep.sandbox_key.is_some() {
                warn!(endpoint = %ep.id, "host veth of a joined endpoint is gone; the container lost this network");
                continue;
            }
            let Some(net) = state.networks.get(&ep.network_id) else {
                continue;
            };
            let repaired = match &net.macvlan {
                Some(mv) => self.kernel.ensure_macvlan(&macvlan_spec(net, mv, ep)).await,
                None => self.kernel.ensure_veth(&veth_spec(net, ep)).await,
            };
            match repaired {
                Ok(()) => report.endpoints_repaired += 1,
                Err(e) => report.errors.push(format!("endpoint {}: {e}", ep.id)),
            }
        }
        let owned: std::collections::BTreeSet<String> = state
            .networks
            .values()
            .map(|n| n.bridge.clone())
            .chain(
                state
                    .networks
                    .values()
                    .filter_map(|n| n.vxlan.as_ref().map(|v| v.device.clone())),
            )
            .chain(
                state
                    .endpoints
                    .values()
                    .flat_map(|e| [e.host_veth.clone(), e.peer_veth.clone()]),
            )
            .collect();
        let present = match self.kernel.sluice_links().await {
            Ok(l) => l,
            Err(e) => {
                report.errors.push(format!("listing links: {e}"));
                existing.clone()
            }
        };
        let mut resolution = state.resolve();
        match resolution.take_compiled() {
            Ok(compiled) => {
                if let Err(e) = self.kernel.apply_policy(&compiled).await {
                    report.errors.push(format!("policy: {e}"));
                }
            }
            Err(e) => report.errors.push(format!("policy: {e}")),
        }
        state.keep_resolution(resolution);
        for ep in state.endpoints.values() {
            let view = state.datapath_view(ep);
            // A macvlan link inside its container is not visible here, but its map entries
            // are updated all the same (by ifindex).
            let in_sandbox = view.sandboxed && ep.sandbox_key.is_some() && ep.ifindex != 0;
            if !present.contains(&ep.host_veth) && !in_sandbox {
                continue;
            }
            if let Err(e) = self.kernel.attach_endpoint(&view).await {
                report
                    .errors
                    .push(format!("endpoint {} datapath: {e}", ep.id));
            }
        }
        // Published ports of the containers still running: their host ports are reserved
        // again; those of containers that went away while sluice was down are forgotten.
        let mut gone = Vec::new();
        for ep in state.endpoints.values() {
            if ep.published.is_empty() {
                continue;
            }
            if ep.sandbox_key.is_none() || !present.contains(&ep.host_veth) {
                gone.push(ep.id.clone());
                continue;
            }
            let requests: Vec<PortRequest> = ep
                .published
                .iter()
                .map(crate::nat::PortBinding::as_request)
                .collect();
            if let Err(e) = self.kernel.reserve_ports(&ep.id, &requests).await {
                report
                    .errors
                    .push(format!("endpoint {} published ports: {e}", ep.id));
            }
        }
        for id in gone {
            if let Some(ep) = state.endpoints.get_mut(&id) {
                ep.published.clear();
                if let Err(e) = self.store.apply(&[Change::PutEndpoint(ep.clone())]) {
                    report.errors.push(format!("endpoint {id}: {e}"));
                }
            }
        }
        // sluice's nftables table, rebuilt whole from the state.
        if let Err(e) = self.kernel.apply_nat(&state.nat_ruleset()).await {
            report.errors.push(format!("nft: {e}"));
        }
        // Spare links of an earlier run (claimed ones belong to an endpoint record, and a
        // claim that never reached the store left one unowned too): their pinned programs go
        // with them, all in one request per bridge.
        let spares: Vec<PoolLink> = existing
            .iter()
            .filter(|name| names::is_pool_host(name) && !owned.contains(*name))
            .map(|name| PoolLink {
                host: name.clone(),
                peer: String::new(),
                ifindex: 0,
            })
            .collect();
        if !spares.is_empty() {
            let bridges: Vec<String> = state
                .networks
                .values()
                .filter(|n| n.macvlan.is_none())
                .map(|n| n.bridge.clone())
                .collect();
            match self.kernel.delete_pool_links(&bridges, &spares).await {
                Ok(()) => report
                    .removed_links
                    .extend(spares.iter().map(|l| l.host.clone())),
                Err(e) => report.errors.push(format!("removing spare links: {e}")),
            }
        }
        for name in existing {
            if owned.contains(&name) || names::is_pool_host(&name) {
                continue;
            }
            let result = if name.starts_with(names::BRIDGE_PREFIX) {
                self.kernel.delete_bridge(&name).await
            } else {
                self.kernel.delete_link(&name).await
            };
            match result {
                Ok(()) => report.removed_links.push(name),
                Err(e) => report.errors.push(format!("removing {name}: {e}")),
            }
        }
        report
    }

    // ---- IPAM ----------------------------------------------------------------------

    /// `IpamDriver.RequestPool`.
    ///
    /// # Errors
    /// IPAM refusals (overlap, exhausted range, bad sub-pool) and store failures.
    pub async fn request_pool(&self, req: &PoolRequest) -> Result<Pool, DriverError> {
        let mut state = self.state.lock().await;
        let pool = state.ipam.request_pool(req)?;
        if let Err(e) = self.store.apply(&[Change::PutPool(pool.clone())]) {
            state.ipam.release_pool(&pool.id);
            return Err(e.into());
        }
        info!(pool = %pool.id, auto = pool.auto, "pool allocated");
        Ok(pool)
    }

    /// `IpamDriver.ReleasePool`. Unknown pools are fine.
    ///
    /// # Errors
    /// Store failures.
    pub async fn release_pool(&self, pool_id: &str) -> Result<(), DriverError> {
        let mut state = self.state.lock().await;
        if state.ipam.release_pool(pool_id).is_some() {
            self.store
                .apply(&[Change::DeletePool(pool_id.to_owned())])?;
            info!(pool = %pool_id, "pool released");
        }
        Ok(())
    }

    /// `IpamDriver.RequestAddress`.
    ///
    /// # Errors
    /// IPAM refusals (unknown pool, address in use or outside the pool, exhausted).
    pub async fn request_address(
        &self,
        pool_id: &str,
        preferred: Option<IpAddr>,
        kind: LeaseKind,
    ) -> Result<IpNetwork, DriverError> {
        let mut state = self.state.lock().await;
        let addr = match &self.cluster {
            Some(cluster) if kind != LeaseKind::Gateway => {
                cluster_hooks::claim_address(
                    cluster.as_ref(),
                    &mut state.ipam,
                    pool_id,
                    preferred,
                    kind,
                )
                .await?
            }
            _ => state.ipam.request_address(pool_id, preferred, kind)?,
        };
        let pool = state.ipam.pool(pool_id).cloned();
        if let Some(pool) = pool
            && let Err(e) = self.store.apply(&[Change::PutPool(pool)])
        {
            // Best effort: forget the lease again so memory matches the store.
            let _released = state.ipam.release_address(pool_id, addr.ip());
            return Err(e.into());
        }
        debug!(pool = %pool_id, address = %addr, ?kind, "address allocated");
        Ok(addr)
    }

    /// `IpamDriver.ReleaseAddress`. Unknown pools and addresses are fine.
    ///
    /// # Errors
    /// Store failures.
    pub async fn release_address(&self, pool_id: &str, addr: IpAddr) -> Result<(), DriverError> {
        let mut state = self.state.lock().await;
        if let (Some(cluster), Some(pool)) = (&self.cluster, state.ipam.pool(pool_id)) {
            let is_gateway = pool.leases.get(&addr) == Some(&LeaseKind::Gateway);
            if !is_gateway {
                cluster.release_address(pool.subnet, addr).await?;
            }
        }
        if state.ipam.release_address(pool_id, addr)? {
            if let Some(pool) = state.ipam.pool(pool_id).cloned() {
                self.store.apply(&[Change::PutPool(pool)])?;
            }
            debug!(pool = %pool_id, address = %addr, "address released");
        }
        Ok(())
    }

    // ---- networks ------------------------------------------------------------------

    /// `NetworkDriver.CreateNetwork`: validates the options, builds the bridge, persists.
    /// Repeating the same request is a no-op; the same ID with other settings is refused.
    ///
    /// # Errors
    /// Bad options, kernel failures (after rollback) and store failures (after rollback).
    pub async fn create_network(&self, req: NetworkRequest) -> Result<(), DriverError> {
        let mut net = network_from_request(req)?;
        let mut state = self.state.lock().await;
        if let Some(existing) = state.networks.get(&net.id) {
            net.number = existing.number;
            net.name.clone_from(&existing.name);
            if let (Some(mv), Some(old)) = (net.macvlan.as_mut(), existing.macvlan.as_ref()) {
                mv.vlan_owned = old.vlan_owned;
            }
            if existing.vxlan.is_some() && !net.options.contains_key(OPT_MTU) {
                net.mtu = existing.mtu;
            }
            net.vxlan.clone_from(&existing.vxlan);
            if *existing == net {
                return Ok(());
            }
            return Err(DriverError::Conflict(format!(
                "network {} already exists with different settings",
                net.id
            )));
        }
        net.number = state.next_network_number();
        if let Some(mv) = net.macvlan.as_mut() {
            // Owned if sluice creates the VLAN now, or did for a network that still uses it.
            let owned = self.kernel.ensure_parent(&ParentSpec::from(&*mv)).await?;
            mv.vlan_owned = mv.vlan.is_some()
                && (owned || uses_parent(&state, &mv.parent).any(|m| m.vlan_owned));
        } else {
            if net.mode == Mode::Vxlan {
                self.prepare_vxlan(&mut net).await?;
            }
            self.kernel.ensure_bridge(&bridge_spec(&net)).await?;
            if let Some(spec) = cluster_hooks::vxlan_spec(&net)
                && let Err(e) = self.kernel.ensure_vxlan(&spec).await
            {
                if let Err(undo) = self.kernel.delete_bridge(&net.bridge).await {
                    warn!(error = %undo, bridge = %net.bridge, "rollback of bridge failed");
                }
                return Err(e.into());
            }
        }
        state.networks.insert(net.id.clone(), net.clone());
        // Outbound NAT and the internal fences exist before any container can send.
        if let Err(e) = self
            .write_nat_then_store(&state, Change::PutNetwork(net.clone()))
            .await
        {
            state.networks.remove(&net.id);
            if let Err(undo) = self.kernel.apply_nat(&state.nat_ruleset()).await {
                warn!(error = %undo, "rollback of nft table failed");
            }
            if let Err(undo) = self.remove_network_links(&state, &net).await {
                warn!(error = %undo, "rollback of network links failed");
            }
            if let Some(v) = &net.vxlan
                && let Err(undo) = self.kernel.delete_link(&v.device).await
            {
                warn!(error = %undo, device = %v.device, "rollback of vxlan device failed");
            }
            return Err(e);
        }
        if net.vxlan.is_some() {
            self.program_remotes_of(&mut state, &net.id).await;
        }
        if net.macvlan.is_none() {
            self.pool.wanted.notify_one();
        }
        info!(
            bridge = %net.bridge,
            mtu = ?net.mtu,
            internal = net.internal,
            masquerade = net.masquerade && !net.internal,
            ipv6_nat = net.ipv6_nat && !net.internal,
            "network created"
        );
        Ok(())
    }

    /// `NetworkDriver.DeleteNetwork`: removes the bridge and anything left on it. Unknown IDs
    /// are fine. The network is forgotten even if the kernel refuses; reconciliation at the
    /// next start removes what was left.
    ///
    /// # Errors
    /// Kernel errors (all steps were attempted) and store failures.
    pub async fn delete_network(&self, network_id: &str) -> Result<(), DriverError> {
        let mut state = self.state.lock().await;
        let Some(net) = state.networks.get(network_id).cloned() else {
            debug!("delete of unknown network: nothing to do");
            return Ok(());
        };
        let leftovers: Vec<Endpoint> = state
            .endpoints
            .values()
            .filter(|e| e.network_id == network_id)
            .cloned()
            .collect();
        let mut errors = Vec::new();
        let mut changes = Vec::new();
        for ep in &leftovers {
            warn!(endpoint = %ep.id, "endpoint still present at network delete; removing it");
            if let Err(e) = self.kernel.release_ports(&ep.id).await {
                errors.push(e);
            }
            if let Err(e) = self.kernel.detach_endpoint(&state.datapath_view(ep)).await {
                errors.push(e);
            }
            if let Err(e) = self.kernel.delete_link(&ep.host_veth).await {
                errors.push(e);
            }
            changes.push(Change::DeleteEndpoint(ep.id.clone()));
        }
        if let Some(v) = &net.vxlan {
            for ep in &leftovers {
                self.withdraw(&v.cluster_network, &ep.id).await;
            }
            if let Err(e) = self.kernel.delete_link(&v.device).await {
                errors.push(e);
            }
            self.forget_remotes_of(&mut state, &net).await;
        }
        self.drain_link_pool(network_id, &net.bridge, &mut errors)
            .await;
        changes.push(Change::DeleteNetwork(net.id.clone()));
        self.store.apply(&changes)?;
        for ep in &leftovers {
            state.endpoints.remove(&ep.id);
        }
        state.networks.remove(network_id);
        if let Err(e) = self.remove_network_links(&state, &net).await {
            errors.push(e);
        }
        // The network's rules go with it (the last network takes the table along).
        if let Err(e) = self.kernel.apply_nat(&state.nat_ruleset()).await {
            errors.push(e);
        }
        self.leave_cluster_network(&state, &net).await;
        info!(bridge = %net.bridge, "network deleted");
        match errors.len() {
            0 => Ok(()),
            1 => Err(errors.remove(0).into()),
            _ => Err(KernelError::Many(errors).into()),
        }
    }

    // ---- endpoints -----------------------------------------------------------------

    /// `NetworkDriver.CreateEndpoint`: creates the veth pair on the network's bridge.
    /// Returns only what Docker did not set (the MAC, when it gave none).
    ///
    /// Concurrent calls for different endpoints overlap: the links are made outside the
    /// driver's lock (the endpoint ID and identity are reserved meanwhile), and the store
    /// write is awaited outside it too (group commit); only the policy and datapath update
    /// runs under the lock.
    ///
    /// # Errors
    /// Unknown network, kernel failures (after rollback), store failures (after rollback).
    pub async fn create_endpoint(
        &self,
        req: EndpointRequest,
    ) -> Result<EndpointCreated, DriverError> {
        let chosen_mac = req.mac.is_none();
        let (net, mut ep) = {
            let mut state = self.state.lock().await;
            let net = state
                .networks
                .get(&req.network_id)
                .cloned()
                .ok_or_else(|| DriverError::UnknownNetwork(req.network_id.clone()))?;
            let ep = new_endpoint(req, &net, state.next_identity());
            if let Some(existing) = state.endpoints.get(&ep.id) {
                if existing.network_id == ep.network_id
                    && existing.address == ep.address
                    && existing.address_v6 == ep.address_v6
                {
                    return Ok(EndpointCreated {
                        mac: chosen_mac.then_some(existing.mac),
                    });
                }
                return Err(DriverError::Conflict(format!(
                    "endpoint {} already exists with different settings",
                    ep.id
                )));
            }
            if state.creating.contains_key(&ep.id) {
                return Err(DriverError::Conflict(format!(
                    "endpoint {} is being created by another call",
                    ep.id
                )));
            }
            state.creating.insert(ep.id.clone(), ep.identity);
            (net, ep)
        };
        if self.identify_from_options {
            ep.container = Some(cluster_hooks::identity_from_options(&ep));
        }
        // The links, outside the lock: netlink work for distinct endpoints overlaps.
        let made = self.make_endpoint_links(&net, &mut ep).await;
        let mut state = self.state.lock().await;
        state.creating.remove(&ep.id);
        let made = made?;
        if !state.networks.contains_key(&net.id) {
            // The network was deleted meanwhile (its bridge took the veth's host end along).
            let undo = if made == Made::Pooled {
                self.kernel.delete_pool_link(&claimed(&ep)).await
            } else {
                self.kernel.delete_link(&ep.host_veth).await
            };
            if let Err(undo) = undo {
                warn!(error = %undo, veth = %ep.host_veth, "rollback of veth failed");
            }
            return Err(DriverError::UnknownNetwork(net.id));
        }
        // The new identity may be selected by policies, or be a peer in other endpoints'
        // rules: resolve with it before its programs see a packet.
        state.endpoints.insert(ep.id.clone(), ep.clone());
        let mut commit = None;
        let mut result = self.resync_added_or_removed(&mut state, &ep).await;
        if result.is_ok() {
            // An endpoint never carries traffic without its programs: no attach, no endpoint.
            // A pool link has them already, and so has a pair made inline (both attached
            // outside the lock): only their map entries are written here.
            let view = state.datapath_view(&ep);
            let attached = match made {
                Made::Pooled => self.kernel.activate_endpoint(&view).await,
                Made::Attached => self
                    .kernel
                    .update_endpoint(&view)
                    .await
                    .map(|()| view.ifindex),
                Made::Bare => self.kernel.attach_endpoint(&view).await,
            };
            result = match attached {
                Ok(ifindex) => {
                    ep.ifindex = ifindex;
                    state.endpoints.insert(ep.id.clone(), ep.clone());
                    commit = Some(self.store.submit(vec![Change::PutEndpoint(ep.clone())]));
                    Ok(())
                }
                Err(e) => Err(e.into()),
            };
        }
        if result.is_ok()
            && let Some(location) = cluster_hooks::location(self.cluster.as_deref(), &net, &ep)
            && let Some(cluster) = &self.cluster
        {
            // Published only once durable here: other hosts must not learn of an endpoint
            // this one may forget.
            result = match commit.take() {
                Some(c) => c.durable().await.map_err(DriverError::from),
                None => Ok(()),
            };
            if result.is_ok() {
                result = cluster
                    .publish_endpoint(&location)
                    .await
                    .map_err(DriverError::from);
                if result.is_err() {
                    let _ = self.store.apply(&[Change::DeleteEndpoint(ep.id.clone())]);
                }
            }
        }
        if let Err(e) = result {
            self.undo_create(&mut state, &ep).await;
            return Err(e);
        }
        drop(state);
        if let Some(commit) = commit
            && let Err(e) = commit.durable().await
        {
            let mut state = self.state.lock().await;
            self.undo_create(&mut state, &ep).await;
            return Err(e.into());
        }
        info!(host_veth = %ep.host_veth, identity = ep.identity, address = ?ep.address, address_v6 = ?ep.address_v6, "endpoint created");
        Ok(EndpointCreated {
            mac: chosen_mac.then_some(ep.mac),
        })
    }

    /// The links of a new endpoint (veth pair or macvlan link), and its cluster-wide
    /// identity in cluster mode. No lock held. A veth pair comes from the network's link
    /// pool when it has one (then `ep.ifindex` is set and this returns [`Made::Pooled`]: the
    /// programs are attached, no endpoint entry yet), else it is made here, and its
    /// programs attached here too when the kernel can ([`Made::Attached`]): the attach then
    /// does not hold the driver's lock.
    async fn make_endpoint_links(
        &self,
        net: &Network,
        ep: &mut Endpoint,
    ) -> Result<Made, DriverError> {
        if let Some(cluster) = &self.cluster {
            // Identities are cluster-wide: remote hosts' policies name this one too.
            ep.identity = cluster.allocate_identity().await?;
        }
        match &net.macvlan {
            Some(mv) => {
                self.kernel
                    .ensure_macvlan(&macvlan_spec(net, mv, ep))
                    .await?
            }
            None => {
                if let Some(link) = self.take_pool_link(&net.id) {
                    // The endpoint takes the pool link's names (recorded with it, so
                    // reconcile, delete and status find it): a rename would cost two rtnl
                    // requests on the request path.
                    let derived = (
                        std::mem::replace(&mut ep.host_veth, link.host.clone()),
                        std::mem::replace(&mut ep.peer_veth, link.peer.clone()),
                    );
                    match self
                        .kernel
                        .claim_pool_link(&link, &veth_spec(net, ep))
                        .await
                    {
                        Ok(()) => {
                            ep.ifindex = link.ifindex;
                            return Ok(Made::Pooled);
                        }
                        // The kernel removed that link; the endpoint is made inline.
                        Err(e) => {
                            warn!(pool = %link.host, error = %e, "link pool: claim failed");
                            (ep.host_veth, ep.peer_veth) = derived;
                        }
                    }
                }
                let spec = veth_spec(net, ep);
                self.kernel.ensure_veth(&spec).await?;
                match self.kernel.attach_programs(&spec.host).await {
                    Ok(Some(ifindex)) => {
                        ep.ifindex = ifindex;
                        return Ok(Made::Attached);
                    }
                    Ok(None) => {}
                    Err(e) => {
                        if let Err(undo) = self.kernel.delete_link(&spec.host).await {
                            warn!(error = %undo, veth = %spec.host, "rollback of veth failed");
                        }
                        return Err(e.into());
                    }
                }
            }
        }
        Ok(Made::Bare)
    }

    /// Undoes a CreateEndpoint whose later step failed: programs, state, policy, links.
    async fn undo_create(&self, state: &mut State, ep: &Endpoint) {
        if let Err(undo) = self.kernel.detach_endpoint(&state.datapath_view(ep)).await {
            warn!(error = %undo, veth = %ep.host_veth, "rollback of datapath failed");
        }
        state.endpoints.remove(&ep.id);
        if let Err(undo) = self.resync(state, None).await {
            warn!(error = %undo, "rollback of policy failed");
        }
        if let Err(undo) = self.kernel.delete_link(&ep.host_veth).await {
            warn!(error = %undo, veth = %ep.host_veth, "rollback of veth failed");
        }
    }

    /// `NetworkDriver.Join`: records the sandbox and tells Docker which link to move and
    /// which gateways to route through (none on internal networks). The store write is
    /// awaited outside the lock (group commit).
    ///
    /// # Errors
    /// Unknown network or endpoint, store failures.
    pub async fn join(
        &self,
        network_id: &str,
        endpoint_id: &str,
        sandbox_key: &str,
    ) -> Result<JoinInfo, DriverError> {
        let mut state = self.state.lock().await;
        let (net, mut ep) = state.network_and_endpoint(network_id, endpoint_id)?;
        let previous = ep.sandbox_key.replace(sandbox_key.to_owned());
        let commit = self.store.submit(vec![Change::PutEndpoint(ep.clone())]);
        state.endpoints.insert(ep.id.clone(), ep.clone());
        drop(state);
        if net.macvlan.is_none() {
            // A veth endpoint's sandbox key is written in the next group commit (a few ms;
            // it is ordered before any later write of the endpoint, ProgramExternalConnectivity's
            // included) but not awaited: the endpoint itself is durable since CreateEndpoint,
            // and a crash in between loses only the key, which reconcile needs for nothing
            // while the host veth exists (and without it, re-makes a pair of a container that
            // went away, which DeleteEndpoint removes). A macvlan link is inside the
            // container: reconcile must know that, so its Join waits.
            let endpoint = ep.id.clone();
            tokio::spawn(async move {
                if let Err(e) = commit.durable().await {
                    warn!(%endpoint, error = %e, "storing the sandbox key failed; it is lost at the next restart");
                }
            });
        } else if let Err(e) = commit.durable().await {
            let mut state = self.state.lock().await;
            if let Some(cur) = state.endpoints.get_mut(endpoint_id)
                && cur.sandbox_key.as_deref() == Some(sandbox_key)
            {
                cur.sandbox_key = previous;
            }
            return Err(e.into());
        }
        let gateway = |data: &[crate::model::IpData], has_addr: bool| {
            (!net.internal && has_addr)
                .then(|| data.iter().find_map(|d| d.gateway.map(|g| g.ip())))
                .flatten()
        };
        let info = JoinInfo {
            src_name: ep.peer_veth.clone(),
            dst_prefix: "eth".to_owned(),
            gateway: gateway(&net.ipv4, ep.address.is_some()),
            gateway_v6: gateway(&net.ipv6, ep.address_v6.is_some()),
        };
        info!(sandbox = %sandbox_key, src = %info.src_name, gateway = ?info.gateway, gateway_v6 = ?info.gateway_v6, "joined");
        Ok(info)
    }

    /// `NetworkDriver.Leave`. Unknown IDs are fine. The link is still in the container now;
    /// Docker moves it back afterwards and DeleteEndpoint removes it.
    ///
    /// # Errors
    /// Store failures.
    pub async fn leave(&self, network_id: &str, endpoint_id: &str) -> Result<(), DriverError> {
        let mut state = self.state.lock().await;
        let Some(ep) = state
            .endpoints
            .get_mut(endpoint_id)
            .filter(|e| e.network_id == network_id)
        else {
            debug!("leave of unknown endpoint: nothing to do");
            return Ok(());
        };
        if ep.sandbox_key.take().is_some() {
            let ep = ep.clone();
            self.store.apply(&[Change::PutEndpoint(ep)])?;
        }
        info!("left");
        Ok(())
    }

    /// `NetworkDriver.ProgramExternalConnectivity`: publishes the container's ports
    /// (`docker run -p`): reserves each host port (a taken one is an error naming it) and
    /// DNATs it to the container. Repeating the call replaces what was published. On an
    /// internal network nothing is published (as with Docker's bridge driver).
    ///
    /// # Errors
    /// Unknown network or endpoint, a taken host port, an unsupported binding, kernel or
    /// store failures; in every case nothing stays published.
    pub async fn program_external(
        &self,
        network_id: &str,
        endpoint_id: &str,
        requests: Vec<PortRequest>,
    ) -> Result<(), DriverError> {
        let mut state = self.state.lock().await;
        let (net, mut ep) = state.network_and_endpoint(network_id, endpoint_id)?;
        if net.internal || net.mode == Mode::Macvlan {
            if !requests.is_empty() {
                // As Docker's own macvlan driver: the container is on the LAN, reachable on
                // its own address; there is nothing to publish.
                warn!(mode = ?net.mode, "published ports on an internal or macvlan network are not published");
            }
            return Ok(());
        }
        if requests.is_empty() && ep.published.is_empty() {
            return Ok(());
        }
        if !requests.is_empty() && ep.address.is_none() {
            return Err(DriverError::InvalidOption(
                "published ports need an IPv4 address on the network (sluice publishes IPv4 only)"
                    .into(),
            ));
        }
        if let Some(r) = requests
            .iter()
            .find(|r| r.host_ip.is_some_and(|ip| ip.is_ipv6()))
        {
            return Err(DriverError::InvalidOption(format!(
                "publishing on an IPv6 host address ({}) is not supported by sluice; publish on an IPv4 address or on all addresses",
                r.host_ip.map(|ip| ip.to_string()).unwrap_or_default()
            )));
        }
        let bindings = self.kernel.reserve_ports(&ep.id, &requests).await?;
        ep.published = bindings;
        state.endpoints.insert(ep.id.clone(), ep.clone());
        if let Err(e) = self
            .write_nat_then_store(&state, Change::PutEndpoint(ep.clone()))
            .await
        {
            if let Some(stored) = state.endpoints.get_mut(&ep.id) {
                stored.published.clear();
            }
            if let Err(undo) = self.kernel.apply_nat(&state.nat_ruleset()).await {
                warn!(error = %undo, "rollback of published ports failed");
            }
            if let Err(undo) = self.kernel.release_ports(&ep.id).await {
                warn!(error = %undo, "rollback of host ports failed");
            }
            return Err(e);
        }
        let shown: Vec<String> = ep.published.iter().map(ToString::to_string).collect();
        info!(ports = ?shown, "external connectivity programmed");
        Ok(())
    }

    /// `NetworkDriver.RevokeExternalConnectivity`: unpublishes the container's ports and
    /// frees the host ports. Unknown IDs are fine.
    ///
    /// # Errors
    /// Kernel or store failures (the ports are forgotten anyway).
    pub async fn revoke_external(
        &self,
        network_id: &str,
        endpoint_id: &str,
    ) -> Result<(), DriverError> {
        let mut state = self.state.lock().await;
        let Some(ep) = state
            .endpoints
            .get_mut(endpoint_id)
            .filter(|e| e.network_id == network_id)
        else {
            debug!("revoke for an unknown endpoint: nothing to do");
            return Ok(());
        };
        if ep.published.is_empty() {
            return Ok(());
        }
        ep.published.clear();
        let ep = ep.clone();
        let nat = self.kernel.apply_nat(&state.nat_ruleset()).await;
        let released = self.kernel.release_ports(&ep.id).await;
        self.store.apply(&[Change::PutEndpoint(ep)])?;
        info!("external connectivity revoked");
        match (nat, released) {
            (Ok(()), Ok(())) => Ok(()),
            (Err(e), Ok(())) | (Ok(()), Err(e)) => Err(e.into()),
            (Err(a), Err(b)) => Err(KernelError::Many(vec![a, b]).into()),
        }
    }

    /// `NetworkDriver.DeleteEndpoint`: removes the veth pair. Unknown IDs are fine.
    ///
    /// # Errors
    /// Kernel failures (the endpoint is forgotten anyway) and store failures.
    pub async fn delete_endpoint(
        &self,
        network_id: &str,
        endpoint_id: &str,
    ) -> Result<(), DriverError> {
        let mut state = self.state.lock().await;
        let Some(ep) = state
            .endpoints
            .get(endpoint_id)
            .filter(|e| e.network_id == network_id)
            .cloned()
        else {
            debug!("delete of unknown endpoint: nothing to do");
            return Ok(());
        };
        if let Some(v) = state
            .networks
            .get(network_id)
            .and_then(|n| n.vxlan.as_ref())
        {
            self.withdraw(&v.cluster_network, &ep.id).await;
        }
        let detached = self.kernel.detach_endpoint(&state.datapath_view(&ep)).await;
        let deleted = self.kernel.delete_link(&ep.host_veth).await;
        self.store.apply(&[Change::DeleteEndpoint(ep.id.clone())])?;
        state.endpoints.remove(endpoint_id);
        if !ep.published.is_empty() {
            // Docker revokes before it deletes; this is for the paths where it does not.
            if let Err(e) = self.kernel.apply_nat(&state.nat_ruleset()).await {
                warn!(error = %e, "removing the published ports of a deleted endpoint");
            }
        }
        if let Err(e) = self.kernel.release_ports(&ep.id).await {
            warn!(error = %e, "releasing the host ports of a deleted endpoint");
        }
        info!(host_veth = %ep.host_veth, "endpoint deleted");
        if !state.policies.is_empty()
            && let Err(e) = self.resync_added_or_removed(&mut state, &ep).await
        {
            warn!(error = %e, "updating policy after endpoint removal");
        }
        match (detached, deleted) {
            (Ok(()), Ok(())) => Ok(()),
            (Err(e), Ok(())) | (Ok(()), Err(e)) => Err(e.into()),
            (Err(a), Err(b)) => Err(KernelError::Many(vec![a, b]).into()),
        }
    }

    /// `NetworkDriver.EndpointOperInfo`: operational data for `docker inspect`. Never fails,
    /// even for unknown endpoints (Docker calls it while listing containers).
    pub async fn endpoint_info(&self, endpoint_id: &str) -> BTreeMap<String, String> {
        let state = self.state.lock().await;
        state
            .endpoints
            .get(endpoint_id)
            .map(|ep| {
                let mut info = BTreeMap::from([
                    ("sluice.host_veth".to_owned(), ep.host_veth.clone()),
                    ("sluice.mac".to_owned(), crate::model::format_mac(&ep.mac)),
                ]);
                if !ep.published.is_empty() {
                    // Docker cannot read a remote driver's port map here (it arrives as
                    // plain JSON), so the published ports are shown as text.
                    let ports: Vec<String> = ep.published.iter().map(ToString::to_string).collect();
                    info.insert("sluice.ports".to_owned(), ports.join(", "));
                }
                info
            })
            .unwrap_or_default()
    }

    /// A copy of the known networks (for status output and tests).
    pub async fn networks(&self) -> Vec<Network> {
        self.state.lock().await.networks.values().cloned().collect()
    }

    /// A copy of the known endpoints.
    pub async fn endpoints(&self) -> Vec<Endpoint> {
        self.state
            .lock()
            .await
            .endpoints
            .values()
            .cloned()
            .collect()
    }

    /// A copy of the IPAM pools.
    pub async fn pools(&self) -> Vec<Pool> {
        self.state.lock().await.ipam.pools().cloned().collect()
    }

    /// Removes what `net` (no longer in `state`) had in the kernel: its bridge, or, for
    /// macvlan, the VLAN sub-interface sluice created for it once no network uses it.
    /// Writes the nft table for `state`, then persists `change`: the kernel first, so a
    /// stored record never claims rules that are not there. The caller rolls back on error.
    async fn write_nat_then_store(&self, state: &State, change: Change) -> Result<(), DriverError> {
        self.kernel.apply_nat(&state.nat_ruleset()).await?;
        self.store.apply(&[change])?;
        Ok(())
    }

    async fn remove_network_links(&self, state: &State, net: &Network) -> Result<(), KernelError> {
        match &net.macvlan {
            None => self.kernel.delete_bridge(&net.bridge).await,
            Some(mv) if mv.vlan_owned && uses_parent(state, &mv.parent).next().is_none() => {
                self.kernel.delete_parent_vlan(&mv.parent).await
            }
            Some(_) => Ok(()),
        }
    }
}

/// The record of a new endpoint on `net` (links not made yet).
fn new_endpoint(req: EndpointRequest, net: &Network, identity: u32) -> Endpoint {
    // macvlan: one link, the container's own; it stands in for both veth ends.
    let (host_veth, peer_veth) = if net.macvlan.is_some() {
        let name = names::macvlan(&req.endpoint_id);
        (name.clone(), name)
    } else {
        (
            names::host_veth(&req.endpoint_id),
            names::peer_veth(&req.endpoint_id),
        )
    };
    Endpoint {
        mac: req
            .mac
            .unwrap_or_else(|| derive_mac(req.address, &req.endpoint_id)),
        id: req.endpoint_id,
        network_id: req.network_id,
        host_veth,
        peer_veth,
        address: req.address,
        address_v6: req.address_v6,
        options: req.options,
        sandbox_key: None,
        identity,
        ifindex: 0,
        container: None,
        published: Vec::new(),
    }
}

/// How [`Driver::make_endpoint_links`] left a new endpoint's links.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Made {
    /// A claimed pool link: programs attached, no map entries yet.
    Pooled,
    /// A pair made here, programs attached, no map entries yet.
    Attached,
    /// Links without programs (macvlan, or a kernel that attaches only with the entries).
    Bare,
}

/// The pool link `ep` was made from, under its endpoint names.
fn claimed(ep: &Endpoint) -> PoolLink {
    PoolLink {
        host: ep.host_veth.clone(),
        peer: ep.peer_veth.clone(),
        ifindex: ep.ifindex,
    }
}

fn bridge_spec(net: &Network) -> BridgeSpec {
    BridgeSpec {
        name: net.bridge.clone(),
        mtu: net.mtu,
        addresses: net.gateway_addresses().collect(),
        internal: net.internal,
    }
}

fn macvlan_spec(net: &Network, mv: &MacvlanConfig, ep: &Endpoint) -> MacvlanSpec {
    MacvlanSpec {
        name: ep.host_veth.clone(),
        parent: mv.parent.clone(),
        mode: mv.mode.clone(),
        mac: ep.mac,
        mtu: net.mtu,
    }
}

/// The macvlan settings of the networks in `state` whose parent is `parent`.
fn uses_parent<'a>(state: &'a State, parent: &'a str) -> impl Iterator<Item = &'a MacvlanConfig> {
    state
        .networks
        .values()
        .filter_map(|n| n.macvlan.as_ref())
        .filter(move |m| m.parent == parent)
}

fn veth_spec(net: &Network, ep: &Endpoint) -> VethSpec {
    VethSpec {
        host: ep.host_veth.clone(),
        peer: ep.peer_veth.clone(),
        bridge: net.bridge.clone(),
        mtu: net.mtu,
        peer_mac: ep.mac,
    }
}

/// Validates `-o` options and builds the network record.
fn network_from_request(req: NetworkRequest) -> Result<Network, DriverError> {
    let mut mode = Mode::Bridge;
    let mut mtu = None;
    let mut isolate = true;
    let mut ingress_deny = false;
    let mut masquerade = true;
    let mut ipv6_nat = false;
    for (key, value) in &req.options {
        match key.as_str() {
            OPT_MODE => mode = value.parse().map_err(DriverError::InvalidOption)?,
            OPT_MTU => mtu = Some(parse_mtu(value)?),
            OPT_ISOLATE => {
                isolate = value.parse().map_err(|_| {
                    DriverError::InvalidOption(format!(
                        "{OPT_ISOLATE} must be true or false, got {value:?}"
                    ))
                })?;
            }
            OPT_INGRESS => {
                ingress_deny = match value.as_str() {
                    "deny" => true,
                    "allow" => false,
                    _ => {
                        return Err(DriverError::InvalidOption(format!(
                            "{OPT_INGRESS} must be allow or deny, got {value:?}"
                        )));
                    }
                };
            }
            OPT_MASQUERADE => masquerade = parse_bool(OPT_MASQUERADE, value)?,
            OPT_IPV6_NAT => ipv6_nat = parse_bool(OPT_IPV6_NAT, value)?,
            // Read below, with the mode.
            OPT_PARENT | OPT_MACVLAN_MODE => {}
            // Checked with the mode below and parsed when the network joins the cluster.
            crate::vxlan::OPT_VNI
            | crate::vxlan::OPT_VXLAN_PORT
            | crate::vxlan::OPT_CLUSTER_NETWORK => {}
            k if k.starts_with("com.docker.network.") => {
                warn!(option = %k, "Docker option not used by sluice; ignored");
            }
            k => {
                return Err(DriverError::InvalidOption(format!(
                    "unknown option {k:?}; sluice supports: {}",
                    SUPPORTED_OPTIONS.join(", ")
                )));
            }
        }
    }
    let macvlan = match mode {
        Mode::Macvlan => {
            if req.internal {
                return Err(DriverError::InvalidOption(
                    "mode=macvlan networks cannot be --internal: their endpoints are on the parent's LAN".into(),
                ));
            }
            Some(MacvlanConfig::from_options(&req.options).map_err(DriverError::InvalidOption)?)
        }
        _ => {
            if let Some(k) = [OPT_PARENT, OPT_MACVLAN_MODE]
                .into_iter()
                .find(|k| req.options.contains_key(*k))
            {
                return Err(DriverError::InvalidOption(format!(
                    "option {k:?} is only for -o mode=macvlan"
                )));
            }
            None
        }
    };
    if mode != Mode::Vxlan
        && let Some(k) = [
            crate::vxlan::OPT_VNI,
            crate::vxlan::OPT_VXLAN_PORT,
            crate::vxlan::OPT_CLUSTER_NETWORK,
        ]
        .iter()
        .find(|k| req.options.contains_key(**k))
    {
        return Err(DriverError::InvalidOption(format!(
            "option {k} is only for mode=vxlan"
        )));
    }
    if req.ipv4.is_empty() && req.ipv6_data.is_empty() {
        return Err(DriverError::InvalidOption(
            "the network has no IPv4 or IPv6 pool; give --subnet or use --ipam-driver sluice"
                .into(),
        ));
    }
    for data in req.ipv4.iter().chain(&req.ipv6_data) {
        if let Some(gw) = data.gateway
            && !data.pool.contains(gw.ip())
        {
            return Err(DriverError::InvalidOption(format!(
                "gateway {} is outside subnet {}",
                gw.ip(),
                data.pool
            )));
        }
    }
    Ok(Network {
        bridge: names::bridge(&req.id),
        id: req.id,
        mode,
        mtu,
        internal: req.internal,
        ipv4: req.ipv4,
        ipv6: req.ipv6_data,
        options: req.options,
        number: 0,
        name: None,
        isolate,
        ingress_deny,
        masquerade,
        ipv6_nat,
        macvlan,
        vxlan: None,
    })
}

fn parse_bool(key: &str, value: &str) -> Result<bool, DriverError> {
    value.trim().parse().map_err(|_| {
        DriverError::InvalidOption(format!("{key} must be true or false, got {value:?}"))
    })
}

fn parse_mtu(value: &str) -> Result<u32, DriverError> {
    let mtu: u32 = value.trim().parse().map_err(|_| {
        DriverError::InvalidOption(format!(
            "{OPT_MTU} must be a number between 68 and 65535, got {value:?}"
        ))
    })?;
    if !(68..=65535).contains(&mtu) {
        return Err(DriverError::InvalidOption(format!(
            "{OPT_MTU} must be between 68 and 65535, got {mtu}"
        )));
    }
    Ok(mtu)
}

/// Observability: status and counters of endpoints, and drop events named after what they hit.
impl<K: Kernel> Driver<K> {
    /// Every endpoint with its flags and counters (read through [`Kernel::endpoint_counters`]
    /// after the state lock is released), and the number of applied policies. An endpoint
    /// whose counters cannot be read shows zeros and `counters_error`.
    pub async fn status(&self) -> crate::status::Status {
        let (mut endpoints, policies) = {
            let state = self.state.lock().await;
            let endpoints: Vec<crate::status::EndpointStatus> = state
                .endpoints
                .values()
                .map(|ep| {
                    let view = state.datapath_view(ep);
                    crate::status::EndpointStatus {
                        id: ep.id.clone(),
                        network_id: ep.network_id.clone(),
                        container: ep.container.as_ref().map(|c| c.name.clone()),
                        container_id: ep.container.as_ref().map(|c| c.container_id.clone()),
                        host_veth: ep.host_veth.clone(),
                        ifindex: ep.ifindex,
                        addresses: view.addresses,
                        identity: ep.identity,
                        flags: crate::status::flag_names(view.flags),
                        joined: ep.sandbox_key.is_some(),
                        ingress: crate::status::DirectionStatus::default(),
                        egress: crate::status::DirectionStatus::default(),
                        counters_error: None,
                        ports: ep.published.iter().map(ToString::to_string).collect(),
                    }
                })
                .collect();
            (endpoints, state.policies.len())
        };
        for ep in &mut endpoints {
            // A macvlan link inside its container cannot be found by name here.
            let counters = if ep.host_veth.starts_with(names::MACVLAN_PREFIX) && ep.ifindex != 0 {
                self.kernel.endpoint_counters_at(ep.ifindex).await
            } else {
                self.kernel.endpoint_counters(&ep.host_veth).await
            };
            match counters {
                Ok(c) => ep.set_counters(&c),
                Err(e) => ep.counters_error = Some(e.to_string()),
            }
        }
        crate::status::Status {
            endpoints,
            policies,
        }
    }

    /// Every endpoint with its flags and counters ([`Driver::status`] without the policies).
    pub async fn endpoint_status(&self) -> Vec<crate::status::EndpointStatus> {
        self.status().await.endpoints
    }

    /// A drop event received at `received`, with the endpoint and container it happened at
    /// (by ifindex) and, for a policy deny, the rule (`web-to-db ingress[0]`).
    pub async fn describe_drop(
        &self,
        event: &crate::datapath::DropEvent,
        received: std::time::SystemTime,
    ) -> crate::status::FlowRecord {
        let mut record = crate::status::FlowRecord::from_event(event, received);
        let state = self.state.lock().await;
        if event.ifindex != 0
            && let Some(ep) = state
                .endpoints
                .values()
                .find(|e| e.ifindex == event.ifindex)
        {
            record.endpoint = Some(ep.id.clone());
            record.container = ep.container.as_ref().map(|c| c.name.clone());
        }
        if event.rule_id != 0 {
            record.rule = Some(
                state
                    .policies
                    .rule_ref(event.rule_id)
                    .map_or_else(|| format!("rule {}", event.rule_id), |r| r.to_string()),
            );
        }
        record
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernel::fake::{FakeKernel, FakeLink};
    use crate::model::IpData;

    const NID: &str = "5cdf432b9218efa3a4cdb1c360f5d3859f2c76d21ec9701c194cb39579b6a3fc";
    const EID: &str = "0f987eed597ecf3c9843814cfa7aa94478a534ffdc9850a75ed7a99f8135266e";

    fn driver(dir: &std::path::Path) -> Driver<FakeKernel> {
        let store = Store::open(dir).unwrap();
        Driver::open(FakeKernel::default(), store, IpamConfig::default()).unwrap()
    }

    fn net_request(id: &str, subnet: &str) -> NetworkRequest {
        let pool: IpNetwork = subnet.parse().unwrap();
        let gw = IpNetwork::new(
            match pool {
                IpNetwork::V4(p) => IpAddr::V4(p.nth(1).unwrap()),
                IpNetwork::V6(_) => panic!("v4 only"),
            },
            pool.prefix(),
        )
        .unwrap();
        NetworkRequest {
            id: id.into(),
            options: BTreeMap::new(),
            internal: false,
            ipv6: false,
            ipv4: vec![IpData {
                pool,
                gateway: Some(gw),
                aux: BTreeMap::new(),
            }],
            ipv6_data: vec![],
        }
    }

    fn ep_request(nid: &str, eid: &str, addr: &str) -> EndpointRequest {
        EndpointRequest {
            network_id: nid.into(),
            endpoint_id: eid.into(),
            address: Some(addr.parse().unwrap()),
            address_v6: None,
            mac: None,
            options: BTreeMap::new(),
        }
    }

    #[tokio::test]
    async fn join_sandbox_key_reaches_the_store_without_being_awaited() {
        let dir = tempfile::tempdir().unwrap();
        let d = driver(dir.path());
        d.create_network(net_request(NID, "10.20.0.0/24"))
            .await
            .unwrap();
        d.create_endpoint(ep_request(NID, EID, "10.20.0.5/24"))
            .await
            .unwrap();
        d.join(NID, EID, "/var/run/docker/netns/abc").await.unwrap();
        // Closing the store writes what was queued: the restarted daemon knows the sandbox.
        drop(d);
        let d = driver(dir.path());
        let ep = d.endpoints().await.into_iter().next().unwrap();
        assert_eq!(ep.sandbox_key.as_deref(), Some("/var/run/docker/netns/abc"));
    }

    #[tokio::test]
    async fn lifecycle_builds_and_removes_links() {
        let dir = tempfile::tempdir().unwrap();
        let d = driver(dir.path());
        d.create_network(net_request(NID, "10.20.0.0/24"))
            .await
            .unwrap();
        let created = d
            .create_endpoint(ep_request(NID, EID, "10.20.0.5/24"))
            .await
            .unwrap();
        assert_eq!(created.mac, Some([2, 0x42, 10, 20, 0, 5]));
        let links = d.kernel().links();
        assert!(
            matches!(links.get(&names::bridge(NID)), Some(FakeLink::Bridge(b)) if b.addresses == vec!["10.20.0.1/24".parse::<IpNetwork>().unwrap()])
        );
        assert!(links.contains_key(&names::host_veth(EID)));

        let join = d.join(NID, EID, "/var/run/docker/netns/abc").await.unwrap();
        assert_eq!(join.src_name, names::peer_veth(EID));
        assert_eq!(join.gateway, Some("10.20.0.1".parse().unwrap()));
        assert_eq!(join.gateway_v6, None);

        d.leave(NID, EID).await.unwrap();
        d.delete_endpoint(NID, EID).await.unwrap();
        assert!(!d.kernel().links().contains_key(&names::host_veth(EID)));
        d.delete_network(NID).await.unwrap();
        assert!(d.kernel().links().is_empty());
    }

    #[tokio::test]
    async fn deletes_and_leave_are_idempotent() {
        let dir = tempfile::tempdir().unwrap();
        let d = driver(dir.path());
        d.delete_network("nope").await.unwrap();
        d.delete_endpoint("nope", "nope").await.unwrap();
        d.leave("nope", "nope").await.unwrap();
        d.release_pool("nope").await.unwrap();
        d.release_address("nope", "10.0.0.1".parse().unwrap())
            .await
            .unwrap();
        d.create_network(net_request(NID, "10.20.0.0/24"))
            .await
            .unwrap();
        d.delete_network(NID).await.unwrap();
        d.delete_network(NID).await.unwrap();
    }

    #[tokio::test]
    async fn internal_network_has_no_gateway_route() {
        let dir = tempfile::tempdir().unwrap();
        let d = driver(dir.path());
        let mut req = net_request(NID, "10.20.0.0/24");
        req.internal = true;
        d.create_network(req).await.unwrap();
        d.create_endpoint(ep_request(NID, EID, "10.20.0.5/24"))
            .await
            .unwrap();
        let join = d.join(NID, EID, "/x").await.unwrap();
        assert_eq!(join.gateway, None);
        let links = d.kernel().links();
        assert!(matches!(links.get(&names::bridge(NID)), Some(FakeLink::Bridge(b)) if b.internal));
    }

    #[tokio::test]
    async fn bad_options_are_refused_without_side_effects() {
        let dir = tempfile::tempdir().unwrap();
        let d = driver(dir.path());
        for (k, v, msg) in [
            (OPT_MTU, "abc", "must be a number"),
            (OPT_MTU, "20", "between 68 and 65535"),
            (OPT_MODE, "vxlan", "needs the multi-host control plane"),
            ("colour", "blue", "unknown option"),
        ] {
            let mut req = net_request(NID, "10.20.0.0/24");
            req.options.insert(k.into(), v.into());
            let err = d.create_network(req).await.unwrap_err();
            assert!(err.is_client_error());
            assert!(err.to_string().contains(msg), "{err}");
        }
        assert!(d.kernel().links().is_empty());
        assert!(d.networks().await.is_empty());
    }

    #[tokio::test]
    async fn kernel_failure_leaves_no_state() {
        let dir = tempfile::tempdir().unwrap();
        let d = driver(dir.path());
        d.kernel().fail_next("boom");
        let err = d
            .create_network(net_request(NID, "10.20.0.0/24"))
            .await
            .unwrap_err();
        assert!(!err.is_client_error());
        assert!(d.networks().await.is_empty());
        // Retrying works.
        d.create_network(net_request(NID, "10.20.0.0/24"))
            .await
            .unwrap();
        d.kernel().fail_next("boom");
        d.create_endpoint(ep_request(NID, EID, "10.20.0.5/24"))
            .await
            .unwrap_err();
        assert!(d.endpoints().await.is_empty());
    }

    #[tokio::test]
    async fn join_of_unknown_endpoint_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let d = driver(dir.path());
        let err = d.join(NID, EID, "/x").await.unwrap_err();
        assert!(matches!(err, DriverError::UnknownNetwork(_)));
        d.create_network(net_request(NID, "10.20.0.0/24"))
            .await
            .unwrap();
        let err = d.join(NID, EID, "/x").await.unwrap_err();
        assert!(matches!(err, DriverError::UnknownEndpoint(_)));
        let err = d
            .create_endpoint(ep_request("other", EID, "10.20.0.5/24"))
            .await
            .unwrap_err();
        assert!(matches!(err, DriverError::UnknownNetwork(_)));
    }

    #[tokio::test]
    async fn state_survives_restart_and_reconcile_repairs_and_cleans() {
        let dir = tempfile::tempdir().unwrap();
        {
            let d = driver(dir.path());
            let pool = d
                .request_pool(&PoolRequest {
                    pool: Some("10.20.0.0/24".parse().unwrap()),
                    ..PoolRequest::default()
                })
                .await
                .unwrap();
            d.request_address(&pool.id, None, LeaseKind::Gateway)
                .await
                .unwrap();
            d.request_address(&pool.id, None, LeaseKind::Endpoint)
                .await
                .unwrap();
            d.create_network(net_request(NID, "10.20.0.0/24"))
                .await
                .unwrap();
            d.create_endpoint(ep_request(NID, EID, "10.20.0.2/24"))
                .await
                .unwrap();
        }
        // A new process: the kernel lost the links (reboot) and has a stray one.
        let d = driver(dir.path());
        assert_eq!(d.networks().await.len(), 1);
        assert_eq!(d.endpoints().await.len(), 1);
        let pools = d.pools().await;
        assert_eq!(pools.len(), 1);
        assert_eq!(pools[0].leases.len(), 2);
        d.kernel()
            .insert("slbrdeadbeef000", FakeLink::VethPeer(String::new()));
        d.kernel().insert("eth0", FakeLink::VethPeer(String::new()));
        let report = d.reconcile().await;
        assert_eq!(report.networks, 1);
        assert_eq!(report.endpoints_repaired, 1);
        assert_eq!(report.removed_links, vec!["slbrdeadbeef000".to_owned()]);
        assert!(report.errors.is_empty());
        let links = d.kernel().links();
        assert!(links.contains_key(&names::bridge(NID)));
        assert!(links.contains_key(&names::host_veth(EID)));
        assert!(links.contains_key("eth0"), "never touches foreign links");
        // The next address does not collide with the restored lease.
        let next = d
            .request_address(&pools[0].id, None, LeaseKind::Endpoint)
            .await
            .unwrap();
        assert_eq!(next, "10.20.0.3/24".parse::<IpNetwork>().unwrap());
    }

    #[tokio::test]
    async fn endpoints_get_the_datapath_with_isolation_and_policy_flags() {
        use crate::datapath::layout::{
            EP_IDENTITY_PENDING, EP_INGRESS_ENFORCED, EP_ISOLATE, IDENTITY_FIRST_ENDPOINT,
        };
        const EID2: &str = "1f987eed597ecf3c9843814cfa7aa94478a534ffdc9850a75ed7a99f8135266e";
        let dir = tempfile::tempdir().unwrap();
        let d = driver(dir.path());
        d.create_network(net_request(NID, "10.20.0.0/24"))
            .await
            .unwrap();
        d.create_endpoint(ep_request(NID, EID, "10.20.0.5/24"))
            .await
            .unwrap();
        d.create_endpoint(ep_request(NID, EID2, "10.20.0.6/24"))
            .await
            .unwrap();
        let attached = d.kernel().attached();
        let db = &attached[&names::host_veth(EID)];
        assert_eq!(db.identity, IDENTITY_FIRST_ENDPOINT);
        assert_eq!(
            attached[&names::host_veth(EID2)].identity,
            IDENTITY_FIRST_ENDPOINT + 1
        );
        assert_eq!(db.network, 1);
        assert_eq!(db.flags & EP_ISOLATE, EP_ISOLATE, "isolated by default");
        assert_eq!(db.flags & (EP_INGRESS_ENFORCED | EP_IDENTITY_PENDING), 0);

        let docs = crate::policy::parse_documents(
            "name: db\nselector: {labels: {role: db}}\ningress:\n  - action: allow\n    from: [{selector: {labels: {role: web}}}]\n    ports: [{protocol: tcp, port: 5432}]\n",
        )
        .unwrap();
        d.apply_policies(docs).await.unwrap();
        // Nobody is known yet: a policy covers the network, so both fail closed.
        for eid in [EID, EID2] {
            let flags = d.kernel().attached()[&names::host_veth(eid)].flags;
            assert_eq!(flags & EP_IDENTITY_PENDING, EP_IDENTITY_PENDING, "{eid}");
        }
        for (eid, role) in [(EID, "db"), (EID2, "web")] {
            d.set_container(ContainerIdentity {
                endpoint_id: eid.into(),
                container_id: format!("c-{role}"),
                name: role.into(),
                labels: BTreeMap::from([("role".to_owned(), role.to_owned())]),
            })
            .await
            .unwrap();
        }
        let attached = d.kernel().attached();
        let db = &attached[&names::host_veth(EID)];
        let web = &attached[&names::host_veth(EID2)];
        assert_eq!(db.flags & EP_IDENTITY_PENDING, 0);
        assert_eq!(db.flags & EP_INGRESS_ENFORCED, EP_INGRESS_ENFORCED);
        assert_eq!(web.flags & EP_INGRESS_ENFORCED, 0, "web is not selected");
        let compiled = d.kernel().policy().unwrap();
        assert!(!compiled.entries.is_empty(), "allow web -> db compiled");

        d.remove_policy("db").await.unwrap();
        let db = &d.kernel().attached()[&names::host_veth(EID)];
        assert_eq!(db.flags & EP_INGRESS_ENFORCED, 0, "removal restores access");
        assert!(d.kernel().policy().unwrap().entries.is_empty());

        d.delete_endpoint(NID, EID).await.unwrap();
        assert!(!d.kernel().attached().contains_key(&names::host_veth(EID)));
    }

    /// Runs `change`; whether it resolved the policies (applied them to the datapath). The
    /// datapath must then be what a full resync (re-applying `yaml`) makes of it.
    async fn resolves<T>(
        d: &Driver<FakeKernel>,
        yaml: &str,
        change: impl Future<Output = T>,
    ) -> bool {
        let applies = d.kernel().policy_applies();
        let _ = change.await;
        let resolved = d.kernel().policy_applies() > applies;
        let (attached, policy) = (d.kernel().attached(), d.kernel().policy());
        let docs = crate::policy::parse_documents(yaml).unwrap();
        d.apply_policies(docs).await.unwrap();
        assert_eq!(
            d.kernel().attached(),
            attached,
            "endpoints as a full resync has them"
        );
        assert_eq!(
            d.kernel().policy(),
            policy,
            "policy as a full resync has it"
        );
        resolved
    }

    /// Endpoint changes no policy can see (no selector matches the endpoint before or after,
    /// no CIDR peer covers its addresses), identities that keep the endpoint a peer of the
    /// same rules, and identities that only move the endpoint between subjects that stay in
    /// use, are made without a full resolution; others resolve. In
    /// both cases the datapath ends as a full resync leaves it.
    #[tokio::test]
    async fn changes_no_policy_sees_skip_the_resolution() {
        use crate::datapath::layout::{EP_IDENTITY_PENDING, EP_INGRESS_ENFORCED};
        let dir = tempfile::tempdir().unwrap();
        let d = driver(dir.path());
        d.create_network(net_request(NID, "10.20.0.0/24"))
            .await
            .unwrap();
        let eid = |n: u32| format!("{n:06x}{}", "0".repeat(58));
        let create =
            |n: u32| d.create_endpoint(ep_request(NID, &eid(n), &format!("10.20.0.{}/24", 10 + n)));
        for n in 0..3 {
            create(n).await.unwrap();
        }
        let yaml = "name: db\nselector: {name: db-*}\ningress:\n  - action: allow\n    from:\n      - selector: {labels: {role: web}}\n      - cidr: 10.20.0.128/25\n";
        d.apply_policies(crate::policy::parse_documents(yaml).unwrap())
            .await
            .unwrap();
        let identify = |n: u32, name: &str, labels: &[(&str, &str)]| {
            let identity = ContainerIdentity {
                endpoint_id: eid(n),
                container_id: format!("c{n}"),
                name: name.to_owned(),
                labels: labels
                    .iter()
                    .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                    .collect(),
            };
            resolves(&d, yaml, async { d.set_container(identity).await.unwrap() })
        };
        let flags = |n: u32| d.kernel().attached()[&names::host_veth(&eid(n))].flags;
        let entries = || d.kernel().policy().unwrap().entries.len();
        assert!((0..3).all(|n| flags(n) & EP_IDENTITY_PENDING != 0));

        assert!(identify(0, "db-1", &[]).await, "a subject resolves");
        assert_eq!(
            flags(0) & (EP_INGRESS_ENFORCED | EP_IDENTITY_PENDING),
            EP_INGRESS_ENFORCED
        );
        let rules = entries();

        assert!(
            !identify(1, "other", &[("role", "db")]).await,
            "nobody sees it"
        );
        assert_eq!(
            flags(1) & (EP_INGRESS_ENFORCED | EP_IDENTITY_PENDING),
            0,
            "known now"
        );
        assert!(!identify(1, "other-2", &[]).await, "renamed, still unseen");
        assert_eq!(entries(), rules);
        // Joining and leaving a subject that stays in use changes no rule.
        let subject = |n: u32| d.kernel().attached()[&names::host_veth(&eid(n))].subject;
        assert!(!identify(1, "db-2", &[]).await, "joins db-1's subject");
        assert_eq!(flags(1) & EP_INGRESS_ENFORCED, EP_INGRESS_ENFORCED);
        assert_eq!(subject(1), subject(0));
        assert!(
            !identify(1, "other-3", &[]).await,
            "leaves it; db-1 keeps it"
        );
        assert_eq!((flags(1) & EP_INGRESS_ENFORCED, subject(1)), (0, 0));
        assert_eq!(entries(), rules);

        assert!(
            identify(2, "web-1", &[("role", "web")]).await,
            "a peer (new) resolves"
        );
        assert_eq!(entries(), rules + 1);
        assert!(
            !identify(2, "web-2", &[("role", "web")]).await,
            "renamed, a peer of the same rules still"
        );
        assert_eq!(entries(), rules + 1);
        assert!(identify(2, "web-1", &[]).await, "a peer (old) resolves");
        assert_eq!(entries(), rules);

        // Endpoints: 10.20.0.13 is outside the CIDR peer, 10.20.0.140 inside it.
        assert!(!resolves(&d, yaml, async { create(3).await.unwrap() }).await);
        assert_eq!(
            flags(3) & EP_IDENTITY_PENDING,
            EP_IDENTITY_PENDING,
            "nameless"
        );
        assert!(resolves(&d, yaml, async { create(130).await.unwrap() }).await);
        assert_eq!(entries(), rules + 1, "a peer through the CIDR");
        let delete = |n: u32| {
            let (d, id) = (&d, eid(n));
            async move { d.delete_endpoint(NID, &id).await.unwrap() }
        };
        assert!(!resolves(&d, yaml, delete(3)).await);
        assert!(resolves(&d, yaml, delete(130)).await);
        assert_eq!(entries(), rules);
        assert!(identify(0, "web-2", &[]).await, "a subject (old) resolves");
        assert_eq!(flags(0) & EP_INGRESS_ENFORCED, 0);
        assert!(!resolves(&d, yaml, delete(0)).await, "no longer selected");

        // Network names matter only to selectors with a `network` reference.
        let rename = |name: &str| {
            let names = BTreeMap::from([(NID.to_owned(), name.to_owned())]);
            async { d.set_network_names(names).await.unwrap() }
        };
        assert!(!resolves(&d, yaml, rename("appnet")).await);
        let by_network =
            format!("{yaml}---\nname: net\nselector: {{network: appnet}}\ningress: []\n");
        d.apply_policies(crate::policy::parse_documents(&by_network).unwrap())
            .await
            .unwrap();
        assert_eq!(flags(1) & EP_INGRESS_ENFORCED, EP_INGRESS_ENFORCED);
        assert!(resolves(&d, &by_network, rename("appnet2")).await);
        assert_eq!(flags(1) & EP_INGRESS_ENFORCED, 0, "appnet2 is not selected");
    }

    #[tokio::test]
    async fn isolation_and_default_deny_options() {
        use crate::datapath::layout::{EP_INGRESS_ENFORCED, EP_ISOLATE};
        let dir = tempfile::tempdir().unwrap();
        let d = driver(dir.path());
        let mut req = net_request(NID, "10.20.0.0/24");
        req.options.insert(OPT_ISOLATE.into(), "false".into());
        req.options.insert(OPT_INGRESS.into(), "deny".into());
        d.create_network(req).await.unwrap();
        d.create_endpoint(ep_request(NID, EID, "10.20.0.5/24"))
            .await
            .unwrap();
        let flags = d.kernel().attached()[&names::host_veth(EID)].flags;
        assert_eq!(flags & EP_ISOLATE, 0);
        assert_eq!(flags & EP_INGRESS_ENFORCED, EP_INGRESS_ENFORCED);
        let mut bad = net_request("other", "10.21.0.0/24");
        bad.options.insert(OPT_INGRESS.into(), "maybe".into());
        assert!(d.create_network(bad).await.unwrap_err().is_client_error());
    }

    #[tokio::test]
    async fn failed_attach_leaves_no_endpoint() {
        let dir = tempfile::tempdir().unwrap();
        let d = driver(dir.path());
        d.create_network(net_request(NID, "10.20.0.0/24"))
            .await
            .unwrap();
        // ensure_veth succeeds, attach fails: the endpoint must not exist half-made.
        d.kernel().fail_after("attach_endpoint", "no BPF");
        let err = d
            .create_endpoint(ep_request(NID, EID, "10.20.0.5/24"))
            .await
            .unwrap_err();
        assert!(err.to_string().contains("no BPF"), "{err}");
        assert!(d.endpoints().await.is_empty());
        assert!(!d.kernel().links().contains_key(&names::host_veth(EID)));
    }

    #[tokio::test]
    async fn published_ports_survive_a_restart_and_go_with_the_endpoint() {
        use crate::nat::{PortRequest, Proto};
        let dir = tempfile::tempdir().unwrap();
        let request = PortRequest {
            proto: Proto::Tcp,
            container_port: 80,
            host_ip: None,
            host_port: 8080,
            host_port_end: 8080,
        };
        {
            let d = driver(dir.path());
            d.create_network(net_request(NID, "10.20.0.0/24"))
                .await
                .unwrap();
            d.create_endpoint(ep_request(NID, EID, "10.20.0.5/24"))
                .await
                .unwrap();
            d.join(NID, EID, "/var/run/docker/netns/x").await.unwrap();
            d.program_external(NID, EID, vec![request]).await.unwrap();
            assert_eq!(d.kernel().nat().unwrap().ports.len(), 1);
        }
        // A new process (the kernel lost the table, the sockets are gone): reconcile
        // reserves the same host port again and rewrites the table.
        let d = driver(dir.path());
        d.kernel()
            .insert(&names::host_veth(EID), FakeLink::VethPeer(String::new()));
        let report = d.reconcile().await;
        assert!(report.errors.is_empty(), "{report:?}");
        let nat = d.kernel().nat().unwrap();
        assert_eq!(nat.ports.len(), 1);
        assert_eq!(nat.ports[0].binding.host_port, 8080);
        assert_eq!(nat.ports[0].container_ip.to_string(), "10.20.0.5");
        assert_eq!(d.kernel().reserved_ports()[EID][0].host_port, 8080);
        assert_eq!(
            nat.networks[0].masquerade,
            vec!["10.20.0.0/24".parse::<IpNetwork>().unwrap()]
        );
        // DeleteEndpoint without Revoke (a crash path): rules and port go.
        d.delete_endpoint(NID, EID).await.unwrap();
        assert!(d.kernel().nat().unwrap().ports.is_empty());
        assert!(d.kernel().reserved_ports().is_empty());
        d.delete_network(NID).await.unwrap();
        assert!(
            d.kernel().nat().unwrap().is_empty(),
            "no table without networks"
        );
    }

    #[tokio::test]
    async fn nat_failure_at_create_leaves_no_network() {
        let dir = tempfile::tempdir().unwrap();
        let d = driver(dir.path());
        d.kernel().fail_after("apply_nat", "no nft");
        let err = d
            .create_network(net_request(NID, "10.20.0.0/24"))
            .await
            .unwrap_err();
        assert!(err.to_string().contains("no nft"), "{err}");
        assert!(d.networks().await.is_empty());
        assert!(d.kernel().links().is_empty(), "bridge rolled back");
        let mut bad = net_request(NID, "10.20.0.0/24");
        bad.options.insert(OPT_MASQUERADE.into(), "perhaps".into());
        let err = d.create_network(bad).await.unwrap_err();
        assert!(
            err.is_client_error() && err.to_string().contains("true or false"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn same_network_twice_is_idempotent_but_different_is_conflict() {
        let dir = tempfile::tempdir().unwrap();
        let d = driver(dir.path());
        d.create_network(net_request(NID, "10.20.0.0/24"))
            .await
            .unwrap();
        d.create_network(net_request(NID, "10.20.0.0/24"))
            .await
            .unwrap();
        let err = d
            .create_network(net_request(NID, "10.21.0.0/24"))
            .await
            .unwrap_err();
        assert!(matches!(err, DriverError::Conflict(_)));
    }

    /// Endpoints selected by the same policies share one policy subject: the `POLICY` map
    /// holds the rules once, an endpoint joining the rule set writes no entry, and one that
    /// is a peer of the rules writes one per rule (diffed, not rewritten).
    #[tokio::test]
    async fn endpoints_selected_alike_share_a_subject_and_joining_writes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let d = driver(dir.path());
        d.create_network(net_request(NID, "10.20.0.0/24"))
            .await
            .unwrap();
        let mut yaml = "name: web\nselector: {labels: {role: web}}\ningress:\n  - action: allow\n    from:\n      - selector: {labels: {role: client}}\n".to_owned();
        for i in 0..40 {
            yaml.push_str(&format!("      - cidr: 192.0.2.{i}/32\n"));
        }
        d.apply_policies(crate::policy::parse_documents(&yaml).unwrap())
            .await
            .unwrap();
        let eid = |n: u32| format!("{n:06x}{}", "0".repeat(58));
        let add = |n: u32, role: &'static str| {
            let d = &d;
            async move {
                d.create_endpoint(ep_request(NID, &eid(n), &format!("10.20.0.{}/24", 10 + n)))
                    .await
                    .unwrap();
                d.set_container(ContainerIdentity {
                    endpoint_id: eid(n),
                    container_id: format!("c{n}"),
                    name: format!("{role}-{n}"),
                    labels: BTreeMap::from([("role".to_owned(), role.to_owned())]),
                })
                .await
                .unwrap();
            }
        };
        for n in 0..10 {
            add(n, "web").await;
        }
        let subject_of = |n: u32| d.kernel().attached()[&names::host_veth(&eid(n))].subject;
        let subject = subject_of(0);
        assert_ne!(subject, 0, "selected endpoints have a subject");
        assert!(
            (1..10).all(|n| subject_of(n) == subject),
            "one subject for all"
        );
        let entries = || d.kernel().policy().unwrap().entries;
        assert_eq!(
            entries().len(),
            40,
            "one entry per CIDR, not per CIDR and endpoint"
        );
        assert!(entries().keys().all(|e| e.key.subject == subject));

        let before = d.kernel().policy_writes();
        add(10, "web").await;
        assert_eq!(subject_of(10), subject);
        assert_eq!(
            d.kernel().policy_writes(),
            before,
            "joining the rule set writes nothing"
        );

        add(11, "client").await;
        assert_eq!(subject_of(11), 0, "no policy selects the client");
        assert_eq!(entries().len(), 41);
        let after = d.kernel().policy_writes();
        assert_eq!(
            (after.0 - before.0, after.1 - before.1),
            (1, 0),
            "the client as a peer"
        );

        // A second policy on one web endpoint gives it a subject of its own (both rule sets).
        let docs = crate::policy::parse_documents(
            "name: one\nselector: {name: web-3}\negress:\n  - action: deny\n    to: [{cidr: 172.16.0.0/12}]\n",
        )
        .unwrap();
        d.apply_policies(docs).await.unwrap();
        let own = subject_of(3);
        assert!(own != 0 && own != subject);
        assert_eq!(subject_of(4), subject);
        assert_eq!(entries().len(), 41 + 41 + 1);
        d.remove_policy("one").await.unwrap();
        assert_eq!(subject_of(3), subject, "back to the shared rule set");
        assert_eq!(entries().len(), 41);

        let before = d.kernel().policy_writes();
        d.delete_endpoint(NID, &eid(5)).await.unwrap();
        assert_eq!(
            d.kernel().policy_writes(),
            before,
            "a subject's member leaving"
        );
    }

    fn pool_links(d: &Driver<FakeKernel>) -> Vec<String> {
        d.kernel()
            .links()
            .into_keys()
            .filter(|n| {
                n.starts_with(names::POOL_HOST_PREFIX) || n.starts_with(names::POOL_PEER_PREFIX)
            })
            .collect()
    }

    fn eid(n: u8) -> String {
        format!("{n:02x}{}", &EID[2..])
    }

    #[tokio::test]
    async fn link_pool_is_taken_refilled_and_falls_back_when_empty() {
        let dir = tempfile::tempdir().unwrap();
        let d = driver(dir.path()).with_link_pool(2);
        d.create_network(net_request(NID, "10.20.0.0/24"))
            .await
            .unwrap();
        assert_eq!(d.refill_link_pools().await, 2);
        assert_eq!(d.link_pool_len(NID), 2);
        // Spare links: on the bridge, programs attached, no endpoint entry.
        assert_eq!(d.kernel().pooled().len(), 2);
        assert_eq!(pool_links(&d).len(), 4, "two pairs");
        assert!(d.kernel().attached().is_empty());
        assert_eq!(d.refill_link_pools().await, 0, "full");

        let spares: Vec<String> = d.kernel().pooled().into_keys().collect();
        for n in 1..=3u8 {
            d.create_endpoint(ep_request(NID, &eid(n), &format!("10.20.0.{}/24", n + 1)))
                .await
                .unwrap();
        }
        // Two came from the pool (activated without a new attach, under the pool link's
        // names, recorded in the endpoint), one inline under the names derived from its ID.
        let activated = d.kernel().activated();
        assert_eq!(activated.len(), 2);
        let mut from_pool = activated.clone();
        from_pool.sort();
        let mut expected = spares.clone();
        expected.sort();
        assert_eq!(
            from_pool, expected,
            "the spare links were claimed, not renamed"
        );
        let attached = d.kernel().attached();
        assert_eq!(attached.len(), 3);
        let endpoints = d.endpoints().await;
        for ep in &endpoints {
            assert!(
                attached.contains_key(&ep.host_veth),
                "{} registered",
                ep.host_veth
            );
            assert!(d.kernel().links().contains_key(&ep.peer_veth));
        }
        let inline: Vec<&Endpoint> = endpoints
            .iter()
            .filter(|e| !activated.contains(&e.host_veth))
            .collect();
        assert_eq!(inline.len(), 1, "the third endpoint was made inline");
        assert_eq!(inline[0].host_veth, names::host_veth(&inline[0].id));
        // A pool endpoint keeps the container MAC Docker sees, and Join names its peer.
        let ep = endpoints
            .iter()
            .find(|e| e.host_veth == activated[0])
            .unwrap();
        assert!(names::is_pool_host(&ep.host_veth));
        assert!(matches!(
            d.kernel().links().get(&ep.host_veth),
            Some(FakeLink::VethHost(v)) if v.peer_mac == ep.mac && v.peer == ep.peer_veth
        ));
        let join = d
            .join(NID, &ep.id, "/var/run/docker/netns/x")
            .await
            .unwrap();
        assert_eq!(join.src_name, ep.peer_veth);
        assert!(d.kernel().pooled().is_empty());
        assert_eq!(d.refill_link_pools().await, 2, "refilled");
        assert_eq!(d.link_pool_len(NID), 2);
        // Shutdown removes the spare links in one bulk call (not the claimed ones); the next
        // refill makes them again.
        assert!(d.drain_link_pools().await.is_empty());
        assert_eq!(d.kernel().pool_deletes(), vec![2]);
        assert!(d.kernel().pooled().is_empty());
        for ep in &endpoints {
            assert!(
                d.kernel().links().contains_key(&ep.host_veth),
                "{} kept",
                ep.host_veth
            );
        }
        assert_eq!(d.refill_link_pools().await, 2);

        // Network delete takes the spare links (and their programs) along.
        for n in 1..=3u8 {
            d.delete_endpoint(NID, &eid(n)).await.unwrap();
        }
        d.delete_network(NID).await.unwrap();
        assert_eq!(d.kernel().pool_deletes(), vec![2, 2], "one bulk delete");
        assert!(pool_links(&d).is_empty());
        assert!(d.kernel().pooled().is_empty());
        assert!(d.kernel().links().is_empty());
        assert_eq!(d.link_pool_len(NID), 0);
        assert_eq!(d.refill_link_pools().await, 0, "no network, no spare links");
    }

    #[tokio::test]
    async fn link_pool_grows_towards_the_last_burst_up_to_its_cap() {
        let dir = tempfile::tempdir().unwrap();
        let d = driver(dir.path()).with_link_pool(1).with_link_pool_max(3);
        d.create_network(net_request(NID, "10.20.0.0/24"))
            .await
            .unwrap();
        assert_eq!(d.refill_link_pools().await, 1);
        assert_eq!(d.adapt_link_pool(), 1, "no burst yet");
        // A burst of 2: the pool grows to 2.
        for n in 1..=2u8 {
            d.create_endpoint(ep_request(NID, &eid(n), &format!("10.20.0.{}/24", n + 1)))
                .await
                .unwrap();
        }
        assert_eq!(d.adapt_link_pool(), 2);
        assert_eq!(d.refill_link_pools().await, 2);
        assert_eq!(d.link_pool_len(NID), 2);
        // A burst of 4: capped at 3; a smaller burst later does not shrink it.
        for n in 3..=6u8 {
            d.create_endpoint(ep_request(NID, &eid(n), &format!("10.20.0.{}/24", n + 1)))
                .await
                .unwrap();
        }
        assert_eq!(d.adapt_link_pool(), 3);
        assert_eq!(d.refill_link_pools().await, 3);
        d.create_endpoint(ep_request(NID, &eid(7), "10.20.0.8/24"))
            .await
            .unwrap();
        assert_eq!(d.adapt_link_pool(), 3);

        // Without a cap above the size, the size is fixed.
        let dir = tempfile::tempdir().unwrap();
        let d = driver(dir.path()).with_link_pool(1);
        d.create_network(net_request(NID, "10.20.0.0/24"))
            .await
            .unwrap();
        for n in 1..=3u8 {
            d.create_endpoint(ep_request(NID, &eid(n), &format!("10.20.0.{}/24", n + 1)))
                .await
                .unwrap();
        }
        assert_eq!(d.adapt_link_pool(), 1);
        assert_eq!(d.refill_link_pools().await, 1);
    }

    #[tokio::test]
    async fn link_pool_failures_roll_back() {
        let dir = tempfile::tempdir().unwrap();
        let d = driver(dir.path()).with_link_pool(1);
        d.create_network(net_request(NID, "10.20.0.0/24"))
            .await
            .unwrap();
        // A failed refill leaves nothing behind.
        d.kernel().fail_after("make_pool_link", "ENOMEM");
        assert_eq!(d.refill_link_pools().await, 0);
        assert!(pool_links(&d).is_empty());
        assert_eq!(d.refill_link_pools().await, 1);

        // A failed claim: the spare link goes, the endpoint is made inline.
        d.kernel().fail_after("claim_pool_link", "EEXIST");
        d.create_endpoint(ep_request(NID, &eid(1), "10.20.0.2/24"))
            .await
            .unwrap();
        assert!(pool_links(&d).is_empty());
        assert!(d.kernel().pooled().is_empty());
        assert!(d.kernel().activated().is_empty());
        assert!(
            d.kernel()
                .attached()
                .contains_key(&names::host_veth(&eid(1)))
        );

        // A failed activation: no endpoint, no links, no programs.
        assert_eq!(d.refill_link_pools().await, 1);
        d.kernel().fail_after("activate_endpoint", "EPERM");
        let err = d
            .create_endpoint(ep_request(NID, &eid(2), "10.20.0.3/24"))
            .await
            .unwrap_err();
        assert!(err.to_string().contains("EPERM"), "{err}");
        assert_eq!(d.endpoints().await.len(), 1);
        let host = names::host_veth(&eid(2));
        assert!(!d.kernel().links().contains_key(&host));
        assert!(!d.kernel().attached().contains_key(&host));
        assert!(pool_links(&d).is_empty());
    }

    #[tokio::test]
    async fn link_pool_off_and_restart_leaves_no_spare_links() {
        let dir = tempfile::tempdir().unwrap();
        {
            let d = driver(dir.path());
            d.create_network(net_request(NID, "10.20.0.0/24"))
                .await
                .unwrap();
            assert_eq!(d.refill_link_pools().await, 0, "pool off by default");
            d.create_endpoint(ep_request(NID, EID, "10.20.0.2/24"))
                .await
                .unwrap();
            assert!(d.kernel().activated().is_empty());
        }
        // A new process finds the spare links of the last one (down, programs attached).
        let d = driver(dir.path()).with_link_pool(1);
        let net = d.networks().await.remove(0);
        d.kernel().ensure_bridge(&bridge_spec(&net)).await.unwrap();
        let spec = PoolLinkSpec {
            host: names::pool_host("00000000abc"),
            peer: names::pool_peer("00000000abc"),
            bridge: net.bridge.clone(),
            mtu: None,
        };
        d.kernel().make_pool_link(&spec).await.unwrap();
        let report = d.reconcile().await;
        assert!(report.removed_links.contains(&spec.host), "{report:?}");
        assert!(pool_links(&d).is_empty());
        assert!(d.kernel().pooled().is_empty(), "programs detached too");
    }
}
