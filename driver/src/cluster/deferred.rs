//! A [`Cluster`] whose connection comes later: `sluice daemon --cluster …` without
//! `--advertise-addr` learns this host's underlay address from Docker's `DiscoverNew` (swarm
//! mode), and only then can it join the cluster (its address is its name there). Before the
//! address is known every operation fails with [`NO_ADDRESS`]; once it is known, operations
//! wait for the connection under way (Docker sends `DiscoverNew` and at once the call that
//! needs the cluster).

use std::net::{IpAddr, Ipv4Addr};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use ipnetwork::IpNetwork;
use tokio::sync::watch;

use super::{Cluster, ClusterError, ClusterFuture, ClusterNetwork, EndpointLocation};
use crate::policy::PolicyDoc;

/// What a `mode=vxlan` request gets while the underlay address is unknown.
pub const NO_ADDRESS: &str = "no underlay address: pass --advertise-addr or join a swarm (sluice takes the address Docker's DiscoverNew gives)";

/// How long an operation waits for the connection once the address is known.
const JOIN_WAIT: Duration = Duration::from_secs(20);

/// The cluster, once connected.
#[derive(Debug)]
pub struct Deferred {
    address: watch::Sender<Option<IpAddr>>,
    cluster: OnceLock<Arc<dyn Cluster>>,
    connected: watch::Sender<bool>,
}

impl Default for Deferred {
    fn default() -> Self {
        Self {
            address: watch::Sender::new(None),
            cluster: OnceLock::new(),
            connected: watch::Sender::new(false),
        }
    }
}

impl Deferred {
    /// Not connected yet.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// Docker named this host's address (the first one counts): from now on operations
    /// wait for the connection instead of failing.
    pub fn discovered(&self, address: IpAddr) {
        self.address.send_if_modified(|a| {
            let first = a.is_none();
            if first {
                *a = Some(address);
            }
            first
        });
    }

    /// The address, once discovered (for the task that connects).
    #[must_use]
    pub fn address(&self) -> watch::Receiver<Option<IpAddr>> {
        self.address.subscribe()
    }

    /// Connected (the first call wins); `false` when it already was.
    pub fn set(&self, cluster: Arc<dyn Cluster>) -> bool {
        let first = self.cluster.set(cluster).is_ok();
        self.connected.send_replace(true);
        first
    }

    /// The connected cluster, if any.
    #[must_use]
    pub fn get(&self) -> Option<&Arc<dyn Cluster>> {
        self.cluster.get()
    }

    /// The cluster: now, or once the connection under way is made.
    async fn connected(&self) -> Result<&dyn Cluster, ClusterError> {
        if let Some(c) = self.cluster.get() {
            return Ok(c.as_ref());
        }
        let Some(address) = *self.address.borrow() else {
            return Err(ClusterError::Conflict(NO_ADDRESS.to_owned()));
        };
        let mut rx = self.connected.subscribe();
        let _ = tokio::time::timeout(JOIN_WAIT, rx.wait_for(|c| *c)).await;
        self.cluster.get().map(AsRef::as_ref).ok_or_else(|| {
            ClusterError::Store(format!(
                "still joining the cluster as {address} (see the daemon's log)"
            ))
        })
    }
}

/// `$op` (a future using `$c: &dyn Cluster`) on the connected cluster.
macro_rules! when_connected {
    ($self:ident, |$c:ident| $op:expr) => {
        Box::pin(async move {
            let $c = $self.connected().await?;
            $op.await
        })
    };
}

impl Cluster for Deferred {
    fn host(&self) -> &str {
        // Only asked once a network has joined the cluster, i.e. when connected.
        self.cluster.get().map_or("", |c| c.host())
    }

    fn vtep(&self) -> IpAddr {
        self.cluster
            .get()
            .map_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED), |c| c.vtep())
    }

    fn register_network(&self, request: &ClusterNetwork) -> ClusterFuture<'_, ClusterNetwork> {
        let request = request.clone();
        when_connected!(self, |c| c.register_network(&request))
    }

    fn leave_network(&self, name: &str) -> ClusterFuture<'_, ()> {
        let name = name.to_owned();
        when_connected!(self, |c| c.leave_network(&name))
    }

    fn claim_address(&self, subnet: IpNetwork, ip: IpAddr) -> ClusterFuture<'_, bool> {
        when_connected!(self, |c| c.claim_address(subnet, ip))
    }

    fn release_address(&self, subnet: IpNetwork, ip: IpAddr) -> ClusterFuture<'_, ()> {
        when_connected!(self, |c| c.release_address(subnet, ip))
    }

    fn allocate_identity(&self) -> ClusterFuture<'_, u32> {
        when_connected!(self, |c| c.allocate_identity())
    }

    fn publish_endpoint(&self, location: &EndpointLocation) -> ClusterFuture<'_, ()> {
        let location = location.clone();
        when_connected!(self, |c| c.publish_endpoint(&location))
    }

    fn withdraw_endpoint(&self, network: &str, endpoint_id: &str) -> ClusterFuture<'_, ()> {
        let (network, endpoint_id) = (network.to_owned(), endpoint_id.to_owned());
        when_connected!(self, |c| c.withdraw_endpoint(&network, &endpoint_id))
    }

    fn publish_policies(&self, docs: &[PolicyDoc]) -> ClusterFuture<'_, ()> {
        let docs = docs.to_vec();
        when_connected!(self, |c| c.publish_policies(&docs))
    }

    fn withdraw_policy(&self, name: &str) -> ClusterFuture<'_, ()> {
        let name = name.to_owned();
        when_connected!(self, |c| c.withdraw_policy(&name))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;
    use crate::cluster::fake::{FakeCluster, FakeStore};

    fn request() -> ClusterNetwork {
        ClusterNetwork {
            name: "n".into(),
            subnets: vec!["10.81.6.0/24".parse().unwrap()],
            vni: 0,
            port: 4789,
            internal: false,
            isolate: false,
            ingress_deny: false,
        }
    }

    #[tokio::test]
    async fn refuses_until_discovered_then_waits_for_the_connection() {
        let deferred = Arc::new(Deferred::new());
        let err = deferred.register_network(&request()).await.unwrap_err();
        assert!(err.to_string().contains("no underlay address"), "{err}");
        deferred.discovered("192.0.2.5".parse().unwrap());
        // A request made now waits for the join that the address started.
        let waiting = tokio::spawn({
            let d = deferred.clone();
            async move { d.register_network(&request()).await }
        });
        tokio::task::yield_now().await;
        assert!(deferred.set(Arc::new(FakeCluster {
            store: Arc::new(Mutex::new(FakeStore::default())),
            host: "192.0.2.5".into(),
            vtep: "192.0.2.5".parse().unwrap(),
        })));
        assert_eq!(waiting.await.unwrap().unwrap().vni, 1);
        assert_eq!(deferred.host(), "192.0.2.5");
    }
}
