//! The driver's side of the multi-host control plane: what its protocol calls ask of the
//! [`Cluster`] (a child module of `driver`, so it works on the driver's state directly),
//! and what the cluster's watch loop tells it (remote endpoints, policies).

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;

use ipnetwork::IpNetwork;
use tracing::{info, warn};

use super::{Driver, DriverError, State};
use crate::cluster::{Cluster, ClusterNetwork, EndpointLocation, OPT_ENDPOINT_NAME};
use crate::ipam::{Ipam, IpamError, LeaseKind};
use crate::kernel::Kernel;
use crate::model::{ContainerIdentity, Endpoint, Network, OPT_MTU};
use crate::policy::{EndpointView, PolicyDoc};
use crate::vxlan::{RemotePeer, VxlanConfig, VxlanSpec};

/// How many addresses one `RequestAddress` tries before giving up (others hold them).
const CLAIM_ATTEMPTS: usize = 4096;

/// The kernel's view of a `mode=vxlan` network's device.
pub(super) fn vxlan_spec(net: &Network) -> Option<VxlanSpec> {
    net.vxlan.as_ref().map(|v| VxlanSpec {
        device: v.device.clone(),
        bridge: net.bridge.clone(),
        vni: v.vni,
        local: v.local,
        port: v.port,
        mtu: net.mtu.unwrap_or(1450),
    })
}

/// `--docker-host none`: the endpoint is who its options say (`sluice.name`, else its ID;
/// labels come from `sluice.label.*` as always).
pub(super) fn identity_from_options(ep: &Endpoint) -> ContainerIdentity {
    ContainerIdentity {
        endpoint_id: ep.id.clone(),
        container_id: String::new(),
        name: ep
            .options
            .get(OPT_ENDPOINT_NAME)
            .cloned()
            .unwrap_or_else(|| ep.id.clone()),
        labels: BTreeMap::new(),
    }
}

/// What other hosts need to know about a local endpoint of a `mode=vxlan` network.
pub(super) fn location(
    cluster: Option<&dyn Cluster>,
    net: &Network,
    ep: &Endpoint,
) -> Option<EndpointLocation> {
    let cluster = cluster?;
    let v = net.vxlan.as_ref()?;
    let view = EndpointView::new(ep, ep.identity, ep.container.as_ref());
    Some(EndpointLocation {
        network: v.cluster_network.clone(),
        endpoint_id: ep.id.clone(),
        host: cluster.host().to_owned(),
        vtep: cluster.vtep(),
        mac: ep.mac,
        addresses: ep.address.into_iter().chain(ep.address_v6).collect(),
        identity: ep.identity,
        name: view.name,
        labels: view.labels,
    })
}

/// Allocates an address that no other host holds: the local allocator proposes, the
/// cluster decides; addresses others hold are skipped (and not kept locally).
pub(super) async fn claim_address(
    cluster: &dyn Cluster,
    ipam: &mut Ipam,
    pool_id: &str,
    preferred: Option<IpAddr>,
    kind: LeaseKind,
) -> Result<IpNetwork, DriverError> {
    let subnet = ipam
        .pool(pool_id)
        .map(|p| p.subnet)
        .ok_or_else(|| IpamError::UnknownPool(pool_id.to_owned()))?;
    let mut skipped = Vec::new();
    let mut result = Err(DriverError::Conflict(format!(
        "no address of {subnet} is free across the cluster"
    )));
    for _ in 0..CLAIM_ATTEMPTS {
        let addr = match ipam.request_address(pool_id, preferred, kind) {
            Ok(a) => a,
            Err(e) => {
                result = Err(e.into());
                break;
            }
        };
        match cluster.claim_address(subnet, addr.ip()).await {
            Ok(true) => {
                result = Ok(addr);
                break;
            }
            Ok(false) if preferred.is_some() => {
                skipped.push(addr.ip());
                result = Err(DriverError::Conflict(format!(
                    "address {} is in use on another host",
                    addr.ip()
                )));
                break;
            }
            Ok(false) => skipped.push(addr.ip()),
            Err(e) => {
                skipped.push(addr.ip());
                result = Err(e.into());
                break;
            }
        }
    }
    // The cursor has moved past them; their leases here were only placeholders.
    for ip in skipped {
        let _ = ipam.release_address(pool_id, ip);
    }
    result
}

impl State {
    /// The local network a remote endpoint belongs to, with its VXLAN settings.
    fn network_of_remote(&self, loc: &EndpointLocation) -> Option<(&Network, &VxlanConfig)> {
        self.networks.values().find_map(|n| {
            n.vxlan
                .as_ref()
                .filter(|v| v.cluster_network == loc.network)
                .map(|v| (n, v))
        })
    }

    /// What the kernel needs for a remote endpoint (`None` while its network is not here).
    fn remote_peer(&self, loc: &EndpointLocation) -> Option<RemotePeer> {
        let (net, v) = self.network_of_remote(loc)?;
        Some(RemotePeer {
            device: v.device.clone(),
            mac: loc.mac,
            vtep: loc.vtep,
            addresses: loc.addresses.clone(),
            identity: loc.identity,
            network: net.number,
        })
    }

    /// Remote endpoints as policy sees them: peers like local ones, on the local network.
    pub(super) fn remote_views(&self) -> Vec<EndpointView> {
        self.remote
            .values()
            .filter_map(|loc| {
                let (net, _) = self.network_of_remote(loc)?;
                Some(EndpointView {
                    endpoint_id: loc.endpoint_id.clone(),
                    identity: loc.identity,
                    network_id: net.id.clone(),
                    name: loc.name.clone(),
                    labels: loc.labels.clone(),
                    addresses: loc.addresses.iter().map(IpNetwork::ip).collect(),
                })
            })
            .collect()
    }
}

impl<K: Kernel> Driver<K> {
    /// Makes this driver one host of a cluster (`sluice daemon --cluster`).
    #[must_use]
    pub fn with_cluster(mut self, cluster: Arc<dyn Cluster>) -> Self {
        self.cluster = Some(cluster);
        self
    }

    /// Identifies endpoints from their options at creation instead of waiting for the
    /// Docker Engine API (`--docker-host none`).
    #[must_use]
    pub fn identify_from_options(mut self, yes: bool) -> Self {
        self.identify_from_options = yes;
        self
    }

    /// `mode=vxlan` at `CreateNetwork`: joins (or creates) the cluster network and fills in
    /// the VXLAN settings and the MTU.
    pub(super) async fn prepare_vxlan(&self, net: &mut Network) -> Result<(), DriverError> {
        let Some(cluster) = &self.cluster else {
            return Err(DriverError::InvalidOption(
                "mode=vxlan needs the multi-host control plane: start sluice with --cluster etcd://HOST:PORT --advertise-addr ADDR (docs/multi-host.md)".into(),
            ));
        };
        let subnets: Vec<IpNetwork> = net.ipv4.iter().chain(&net.ipv6).map(|d| d.pool).collect();
        let options = crate::vxlan::parse_options(&net.options, &subnets)
            .map_err(DriverError::InvalidOption)?;
        let request = ClusterNetwork {
            name: options.cluster_network.clone(),
            subnets,
            vni: options.vni.unwrap_or(0),
            port: options.port,
            internal: net.internal,
            isolate: net.isolate,
            ingress_deny: net.ingress_deny,
        };
        let registered = cluster.register_network(&request).await?;
        if !net.options.contains_key(OPT_MTU) {
            net.mtu = Some(self.kernel.vxlan_mtu(cluster.vtep()).await?);
        }
        net.vxlan = Some(VxlanConfig {
            cluster_network: registered.name,
            vni: registered.vni,
            port: registered.port,
            device: crate::vxlan::device_name(&net.id),
            local: cluster.vtep(),
        });
        Ok(())
    }

    /// Withdraws a local endpoint from the cluster (errors logged: its location goes with
    /// this host's lease at the latest).
    pub(super) async fn withdraw(&self, network: &str, endpoint_id: &str) {
        if let Some(cluster) = &self.cluster
            && let Err(e) = cluster.withdraw_endpoint(network, endpoint_id).await
        {
            warn!(error = %e, endpoint = %endpoint_id, "withdrawing an endpoint from the cluster");
        }
    }

    /// Programs the known remote endpoints of a network that was just created here.
    pub(super) async fn program_remotes_of(&self, state: &mut State, network_id: &str) {
        let peers: Vec<RemotePeer> = state
            .remote
            .values()
            .filter(|loc| {
                state
                    .network_of_remote(loc)
                    .is_some_and(|(n, _)| n.id == network_id)
            })
            .filter_map(|loc| state.remote_peer(loc))
            .collect();
        for peer in &peers {
            if let Err(e) = self.kernel.program_remote(peer).await {
                warn!(error = %e, "programming a remote endpoint");
            }
        }
        if !peers.is_empty()
            && !state.policies.is_empty()
            && let Err(e) = self.resync(state, None).await
        {
            warn!(error = %e, "updating policy for remote endpoints");
        }
    }

    /// Unprograms the remote endpoints of a network about to be deleted here (they stay
    /// known, for when it is created again).
    pub(super) async fn forget_remotes_of(&self, state: &mut State, net: &Network) {
        let peers: Vec<RemotePeer> = state
            .remote
            .values()
            .filter(|loc| {
                state
                    .network_of_remote(loc)
                    .is_some_and(|(n, _)| n.id == net.id)
            })
            .filter_map(|loc| state.remote_peer(loc))
            .collect();
        for peer in &peers {
            if let Err(e) = self.kernel.remove_remote(peer).await {
                warn!(error = %e, "removing a remote endpoint");
            }
        }
    }

    /// Another host published (or changed) an endpoint: program it here.
    pub async fn upsert_remote(&self, loc: EndpointLocation) {
        let mut state = self.state.lock().await;
        self.upsert_remote_locked(&mut state, loc).await;
        if !state.policies.is_empty()
            && let Err(e) = self.resync(&mut state, None).await
        {
            warn!(error = %e, "updating policy for a remote endpoint");
        }
    }

    async fn upsert_remote_locked(&self, state: &mut State, loc: EndpointLocation) {
        if state.remote.get(&loc.endpoint_id) == Some(&loc) {
            return;
        }
        if let Some(old) = state.remote.get(&loc.endpoint_id)
            && let Some(peer) = state.remote_peer(old)
            && let Err(e) = self.kernel.remove_remote(&peer).await
        {
            warn!(error = %e, "replacing a remote endpoint");
        }
        if let Some(peer) = state.remote_peer(&loc) {
            match self.kernel.program_remote(&peer).await {
                Ok(()) => {
                    info!(endpoint = %loc.endpoint_id, host = %loc.host, addresses = ?loc.addresses, identity = loc.identity, "remote endpoint programmed")
                }
                Err(e) => {
                    warn!(error = %e, endpoint = %loc.endpoint_id, "programming a remote endpoint")
                }
            }
        }
        state.remote.insert(loc.endpoint_id.clone(), loc);
    }

    /// Another host's endpoint is gone (deleted, or its host's lease expired).
    pub async fn remove_remote(&self, endpoint_id: &str) {
        let mut state = self.state.lock().await;
        self.remove_remote_locked(&mut state, endpoint_id).await;
        if !state.policies.is_empty()
            && let Err(e) = self.resync(&mut state, None).await
        {
            warn!(error = %e, "updating policy after a remote endpoint left");
        }
    }

    async fn remove_remote_locked(&self, state: &mut State, endpoint_id: &str) {
        let Some(loc) = state.remote.remove(endpoint_id) else {
            return;
        };
        if let Some(peer) = state.remote_peer(&loc)
            && let Err(e) = self.kernel.remove_remote(&peer).await
        {
            warn!(error = %e, endpoint = %endpoint_id, "removing a remote endpoint");
        }
        info!(endpoint = %endpoint_id, host = %loc.host, "remote endpoint removed");
    }

    /// The whole set of remote endpoints (at start and after a lost watch): programs the
    /// new ones, removes those that are gone.
    pub async fn replace_remotes(&self, locations: Vec<EndpointLocation>) {
        let mut state = self.state.lock().await;
        let keep: std::collections::BTreeSet<String> =
            locations.iter().map(|l| l.endpoint_id.clone()).collect();
        let gone: Vec<String> = state
            .remote
            .keys()
            .filter(|k| !keep.contains(*k))
            .cloned()
            .collect();
        for id in gone {
            self.remove_remote_locked(&mut state, &id).await;
        }
        for loc in locations {
            self.upsert_remote_locked(&mut state, loc).await;
        }
        if let Err(e) = self.resync(&mut state, None).await {
            warn!(error = %e, "updating policy for remote endpoints");
        }
    }

    /// Makes the local policies exactly the cluster's `docs` (without publishing them
    /// again). Invalid documents are logged and skipped as a whole set.
    pub async fn sync_cluster_policies(&self, docs: Vec<PolicyDoc>) {
        let mut state = self.state.lock().await;
        let current: BTreeMap<String, PolicyDoc> = state
            .policies
            .list()
            .map(|p| (p.doc.name.clone(), p.doc.clone()))
            .collect();
        let wanted: BTreeMap<String, PolicyDoc> =
            docs.into_iter().map(|d| (d.name.clone(), d)).collect();
        if current == wanted {
            return;
        }
        let changed: Vec<PolicyDoc> = wanted
            .values()
            .filter(|d| current.get(&d.name) != Some(*d))
            .cloned()
            .collect();
        let result: Result<(), DriverError> = async {
            if !changed.is_empty() {
                let plan = state.policies.plan_apply(changed)?;
                self.store.apply(plan.changes())?;
                state.policies.commit(plan);
            }
            for name in current.keys().filter(|n| !wanted.contains_key(*n)) {
                let plan = state.policies.plan_remove(name)?;
                self.store.apply(plan.changes())?;
                state.policies.commit(plan);
            }
            Ok(())
        }
        .await;
        if let Err(e) = result {
            warn!(error = %e, "applying the cluster's policies");
        }
        info!(policies = state.policies.len(), "cluster policies applied");
        if let Err(e) = self.resync(&mut state, None).await {
            warn!(error = %e, "updating the datapath for the cluster's policies");
        }
    }

    /// Publishes every local endpoint of a `mode=vxlan` network again (at start, and after
    /// this host's lease was lost and renewed).
    pub async fn publish_local_endpoints(&self) {
        let Some(cluster) = &self.cluster else {
            return;
        };
        let state = self.state.lock().await;
        for ep in state.endpoints.values() {
            let Some(net) = state.networks.get(&ep.network_id) else {
                continue;
            };
            if let Some(loc) = location(Some(cluster.as_ref()), net, ep)
                && let Err(e) = cluster.publish_endpoint(&loc).await
            {
                warn!(error = %e, endpoint = %ep.id, "publishing an endpoint");
            }
        }
    }

    /// The endpoints of other hosts this host knows (for `sluice endpoints` and tests).
    pub async fn remote_endpoints(&self) -> Vec<EndpointLocation> {
        self.state.lock().await.remote.values().cloned().collect()
    }
}
