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
        network: net.number,
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
        // The documents are in the store (the engine keeps none).
        let current: BTreeMap<String, PolicyDoc> = match self.store.policies() {
            Ok(stored) => stored
                .into_iter()
                .map(|p| (p.doc.name.clone(), p.doc))
                .collect(),
            Err(e) => {
                warn!(error = %e, "reading the local policies");
                return;
            }
        };
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

    /// Publishes every local endpoint of a `mode=vxlan` network again and claims this host's
    /// addresses again (at start, and after this host's lease was lost and renewed): both
    /// are bound to the current lease from then on.
    pub async fn publish_local_endpoints(&self) {
        let Some(cluster) = &self.cluster else {
            return;
        };
        let state = self.state.lock().await;
        for pool in state.ipam.pools() {
            for (ip, kind) in &pool.leases {
                if *kind == LeaseKind::Gateway {
                    continue;
                }
                match cluster.claim_address(pool.subnet, *ip).await {
                    Ok(true) => {}
                    Ok(false) => {
                        warn!(address = %ip, subnet = %pool.subnet, "address now held by another host (this host was away longer than its lease)")
                    }
                    Err(e) => warn!(error = %e, address = %ip, "claiming an address again"),
                }
            }
        }
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

    /// Publishes a local endpoint again after its container's name and labels became known
    /// (other hosts' policies select it by them).
    pub(super) async fn republish(&self, state: &State, endpoint_id: &str) {
        let Some(cluster) = &self.cluster else {
            return;
        };
        let Some(ep) = state.endpoints.get(endpoint_id) else {
            return;
        };
        if let Some(net) = state.networks.get(&ep.network_id)
            && let Some(loc) = location(Some(cluster.as_ref()), net, ep)
            && let Err(e) = cluster.publish_endpoint(&loc).await
        {
            warn!(error = %e, endpoint = %ep.id, "publishing an endpoint's identity");
        }
    }

    /// This host deleted a `mode=vxlan` network: it leaves the cluster network (whose record
    /// goes with the last member), unless another local network still is that one.
    pub(super) async fn leave_cluster_network(&self, state: &State, net: &Network) {
        let (Some(cluster), Some(v)) = (&self.cluster, &net.vxlan) else {
            return;
        };
        let still_used = state.networks.values().any(|n| {
            n.id != net.id
                && n.vxlan
                    .as_ref()
                    .is_some_and(|o| o.cluster_network == v.cluster_network)
        });
        if !still_used && let Err(e) = cluster.leave_network(&v.cluster_network).await {
            warn!(error = %e, network = %v.cluster_network, "leaving the cluster network");
        }
    }

    /// The endpoints of other hosts this host knows (for `sluice endpoints` and tests).
    pub async fn remote_endpoints(&self) -> Vec<EndpointLocation> {
        self.state.lock().await.remote.values().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;
    use crate::cluster::fake::{FakeCluster, FakeStore};
    use crate::ipam::{IpamConfig, PoolRequest};
    use crate::kernel::fake::FakeKernel;
    use crate::model::{EndpointRequest, IpData, NetworkRequest};
    use crate::store::Store;

    const SUBNET: &str = "10.80.0.0/24";

    fn host(
        dir: &std::path::Path,
        store: &Arc<Mutex<FakeStore>>,
        vtep: &str,
    ) -> Driver<FakeKernel> {
        let cluster = FakeCluster {
            store: store.clone(),
            host: vtep.to_owned(),
            vtep: vtep.parse().unwrap(),
        };
        Driver::open(
            FakeKernel::default(),
            Store::open(dir).unwrap(),
            IpamConfig::default(),
        )
        .unwrap()
        .with_cluster(Arc::new(cluster))
        .identify_from_options(true)
    }

    fn vxlan_request(id: &str, extra: &[(&str, &str)]) -> NetworkRequest {
        let mut options: BTreeMap<String, String> =
            BTreeMap::from([("mode".to_owned(), "vxlan".to_owned())]);
        for (k, v) in extra {
            options.insert((*k).to_owned(), (*v).to_owned());
        }
        NetworkRequest {
            id: id.into(),
            options,
            internal: false,
            ipv6: false,
            ipv4: vec![IpData {
                pool: SUBNET.parse().unwrap(),
                gateway: Some("10.80.0.1/24".parse().unwrap()),
                aux: BTreeMap::new(),
            }],
            ipv6_data: vec![],
        }
    }

    async fn endpoint(d: &Driver<FakeKernel>, net: &str, id: &str, pool: &str) -> Endpoint {
        let address = d
            .request_address(pool, None, LeaseKind::Endpoint)
            .await
            .unwrap();
        d.create_endpoint(EndpointRequest {
            network_id: net.into(),
            endpoint_id: id.into(),
            address: Some(address),
            address_v6: None,
            mac: None,
            options: BTreeMap::from([("sluice.label.role".to_owned(), "db".to_owned())]),
        })
        .await
        .unwrap();
        d.endpoints()
            .await
            .into_iter()
            .find(|e| e.id == id)
            .unwrap()
    }

    async fn pool(d: &Driver<FakeKernel>) -> String {
        d.request_pool(&PoolRequest {
            pool: Some(SUBNET.parse().unwrap()),
            ..PoolRequest::default()
        })
        .await
        .unwrap()
        .id
    }

    #[tokio::test]
    async fn two_hosts_share_network_addresses_identities_and_endpoints() {
        let store = Arc::new(Mutex::new(FakeStore::default()));
        let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let (a, b) = (
            host(da.path(), &store, "192.0.2.1"),
            host(db.path(), &store, "192.0.2.2"),
        );
        a.create_network(vxlan_request("neta", &[])).await.unwrap();
        b.create_network(vxlan_request("netb", &[])).await.unwrap();
        let (va, vb) = (
            a.networks().await[0].vxlan.clone().unwrap(),
            b.networks().await[0].vxlan.clone().unwrap(),
        );
        assert_eq!(va.vni, vb.vni, "one VNI for the cluster network");
        assert_eq!(va.cluster_network, SUBNET);
        assert_eq!(
            a.networks().await[0].mtu,
            Some(1450),
            "underlay MTU minus 50"
        );

        let (pa, pb) = (pool(&a).await, pool(&b).await);
        let ea = endpoint(&a, "neta", "ea", &pa).await;
        let eb = endpoint(&b, "netb", "eb", &pb).await;
        assert_ne!(ea.address, eb.address, "addresses are unique across hosts");
        assert_ne!(ea.identity, eb.identity, "identities are cluster-wide");
        assert_eq!(ea.container.as_ref().map(|c| c.name.as_str()), Some("ea"));

        // What b published reaches a as a remote endpoint: kernel entries with b's VTEP and
        // the identity, on a's network number.
        let published = store
            .lock()
            .unwrap()
            .endpoints
            .values()
            .find(|l| l.endpoint_id == "eb")
            .cloned()
            .unwrap();
        assert_eq!(published.labels.get("role").map(String::as_str), Some("db"));
        a.upsert_remote(published.clone()).await;
        let remotes = a.kernel().remotes();
        let peer = remotes.values().next().unwrap();
        assert_eq!(peer.vtep, "192.0.2.2".parse::<IpAddr>().unwrap());
        assert_eq!(peer.identity, eb.identity);
        assert_eq!(peer.device, va.device);
        assert_eq!(peer.network, a.networks().await[0].number);

        a.remove_remote("eb").await;
        assert!(a.kernel().remotes().is_empty());

        // Deleting the endpoint withdraws it from the cluster and frees its address there.
        b.delete_endpoint("netb", "eb").await.unwrap();
        b.release_address(&pb, eb.address.unwrap().ip())
            .await
            .unwrap();
        let s = store.lock().unwrap();
        assert!(!s.endpoints.values().any(|l| l.endpoint_id == "eb"));
        assert!(
            !s.leases
                .keys()
                .any(|(_, ip)| Some(*ip) == eb.address.map(|a| a.ip()))
        );
    }

    #[tokio::test]
    async fn conflicting_settings_and_missing_cluster_are_clear_errors() {
        let store = Arc::new(Mutex::new(FakeStore::default()));
        let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let a = host(da.path(), &store, "192.0.2.1");
        a.create_network(vxlan_request("neta", &[("vni", "77")]))
            .await
            .unwrap();
        let b = host(db.path(), &store, "192.0.2.2");
        let err = b
            .create_network(vxlan_request("netb", &[("vni", "78")]))
            .await
            .unwrap_err();
        assert!(err.is_client_error());
        assert!(err.to_string().contains("different settings"), "{err}");
        assert!(b.networks().await.is_empty(), "nothing half-created");
        assert!(b.kernel().links().is_empty());

        let single = Driver::open(
            FakeKernel::default(),
            Store::open(tempfile::tempdir().unwrap().path()).unwrap(),
            IpamConfig::default(),
        )
        .unwrap();
        let err = single
            .create_network(vxlan_request("n", &[]))
            .await
            .unwrap_err();
        assert!(err.to_string().contains("--cluster"), "{err}");
        let err = single
            .create_network({
                let mut r = vxlan_request("n", &[("vni", "5")]);
                r.options.remove("mode");
                r
            })
            .await
            .unwrap_err();
        assert!(err.to_string().contains("only for mode=vxlan"), "{err}");
    }

    #[tokio::test]
    async fn the_last_host_deleting_the_network_removes_the_cluster_record() {
        let store = Arc::new(Mutex::new(FakeStore::default()));
        let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let (a, b) = (
            host(da.path(), &store, "192.0.2.1"),
            host(db.path(), &store, "192.0.2.2"),
        );
        a.create_network(vxlan_request("neta", &[])).await.unwrap();
        b.create_network(vxlan_request("netb", &[])).await.unwrap();
        a.delete_network("neta").await.unwrap();
        assert!(store.lock().unwrap().networks.contains_key(SUBNET));
        b.delete_network("netb").await.unwrap();
        let s = store.lock().unwrap();
        assert!(s.networks.is_empty(), "{:?}", s.networks);
        assert!(s.members.is_empty(), "{:?}", s.members);
    }

    #[tokio::test]
    async fn an_address_held_by_another_host_is_skipped() {
        let store = Arc::new(Mutex::new(FakeStore::default()));
        let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let (a, b) = (
            host(da.path(), &store, "192.0.2.1"),
            host(db.path(), &store, "192.0.2.2"),
        );
        let (pa, pb) = (pool(&a).await, pool(&b).await);
        let first = a
            .request_address(&pa, None, LeaseKind::Endpoint)
            .await
            .unwrap();
        let second = b
            .request_address(&pb, None, LeaseKind::Endpoint)
            .await
            .unwrap();
        assert_ne!(first, second);
        // b only keeps the lease it got, not the one it skipped.
        let leases = &b.pools().await[0].leases;
        assert!(!leases.contains_key(&first.ip()), "{leases:?}");
        let err = b
            .request_address(&pb, Some(first.ip()), LeaseKind::Endpoint)
            .await
            .unwrap_err();
        assert!(err.to_string().contains("in use on another host"), "{err}");
    }
}
