//! A [`Cluster`] whose connection comes later: `sluice daemon --cluster …` without
//! `--advertise-addr` learns this host's underlay address from Docker's `DiscoverNew` (swarm
//! mode), and only then can it join the cluster (its address is its name there). Until then
//! every operation fails with [`NO_ADDRESS`].

use std::net::{IpAddr, Ipv4Addr};
use std::sync::{Arc, OnceLock};

use ipnetwork::IpNetwork;

use super::{Cluster, ClusterError, ClusterFuture, ClusterNetwork, EndpointLocation};
use crate::policy::PolicyDoc;

/// What a `mode=vxlan` request gets while the underlay address is unknown.
pub const NO_ADDRESS: &str = "no underlay address: pass --advertise-addr or join a swarm (sluice takes the address Docker's DiscoverNew gives)";

/// The cluster, once connected.
#[derive(Debug, Default)]
pub struct Deferred {
    inner: OnceLock<Arc<dyn Cluster>>,
}

impl Deferred {
    /// Not connected yet.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// Connects (the first call wins); `false` when it already was.
    pub fn set(&self, cluster: Arc<dyn Cluster>) -> bool {
        self.inner.set(cluster).is_ok()
    }

    /// The connected cluster, if any.
    #[must_use]
    pub fn get(&self) -> Option<&Arc<dyn Cluster>> {
        self.inner.get()
    }

    fn or_fail<'a, T: Send + 'a>(
        &'a self,
        f: impl FnOnce(&'a dyn Cluster) -> ClusterFuture<'a, T>,
    ) -> ClusterFuture<'a, T> {
        match self.inner.get() {
            Some(c) => f(c.as_ref()),
            None => Box::pin(async { Err(ClusterError::Conflict(NO_ADDRESS.to_owned())) }),
        }
    }
}

impl Cluster for Deferred {
    fn host(&self) -> &str {
        self.inner.get().map_or("", |c| c.host())
    }

    fn vtep(&self) -> IpAddr {
        self.inner
            .get()
            .map_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED), |c| c.vtep())
    }

    fn register_network(&self, request: &ClusterNetwork) -> ClusterFuture<'_, ClusterNetwork> {
        self.or_fail(|c| c.register_network(request))
    }

    fn leave_network(&self, name: &str) -> ClusterFuture<'_, ()> {
        self.or_fail(|c| c.leave_network(name))
    }

    fn claim_address(&self, subnet: IpNetwork, ip: IpAddr) -> ClusterFuture<'_, bool> {
        self.or_fail(|c| c.claim_address(subnet, ip))
    }

    fn release_address(&self, subnet: IpNetwork, ip: IpAddr) -> ClusterFuture<'_, ()> {
        self.or_fail(|c| c.release_address(subnet, ip))
    }

    fn allocate_identity(&self) -> ClusterFuture<'_, u32> {
        self.or_fail(|c| c.allocate_identity())
    }

    fn publish_endpoint(&self, location: &EndpointLocation) -> ClusterFuture<'_, ()> {
        self.or_fail(|c| c.publish_endpoint(location))
    }

    fn withdraw_endpoint(&self, network: &str, endpoint_id: &str) -> ClusterFuture<'_, ()> {
        self.or_fail(|c| c.withdraw_endpoint(network, endpoint_id))
    }

    fn publish_policies(&self, docs: &[PolicyDoc]) -> ClusterFuture<'_, ()> {
        self.or_fail(|c| c.publish_policies(docs))
    }

    fn withdraw_policy(&self, name: &str) -> ClusterFuture<'_, ()> {
        self.or_fail(|c| c.withdraw_policy(name))
    }
}
