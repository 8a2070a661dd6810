//! The multi-host control plane (`sluice daemon --cluster etcd://…`, docs/multi-host.md).
//!
//! What several hosts must agree on lives in a distributed store behind [`Cluster`]:
//! cluster networks (name → subnets, VNI, port), address leases, identities, endpoint
//! locations (address, MAC, VTEP, identity, labels) and policies. The driver calls the trait
//! from its protocol calls; a watch loop ([`etcd::watch`]) feeds what other hosts publish
//! back into the driver (`Driver::upsert_remote`, `Driver::remove_remote`,
//! `Driver::sync_cluster_policies`). Without `--cluster` the driver has no [`Cluster`] and
//! stays single-host on its embedded store.

pub mod deferred;
pub mod etcd;

use std::collections::BTreeMap;
use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;

use ipnetwork::IpNetwork;
use serde::{Deserialize, Serialize};

use crate::policy::PolicyDoc;

/// Endpoint option naming the "container" when sluice runs without the Docker Engine API
/// (`--docker-host none`): policies select it by this name.
pub const OPT_ENDPOINT_NAME: &str = "sluice.name";

/// A boxed future of a cluster operation (the trait is used as `dyn`).
pub type ClusterFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, ClusterError>> + Send + 'a>>;

/// Errors of the cluster store.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// The store could not be reached or refused the request.
    #[error("cluster store: {0}")]
    Store(String),
    /// The request conflicts with what the cluster holds (the user's fault).
    #[error("{0}")]
    Conflict(String),
    /// A stored record cannot be read.
    #[error("cluster store: bad record {key}: {message}")]
    BadRecord {
        /// Its key.
        key: String,
        /// Why.
        message: String,
    },
}

/// A network as the cluster knows it: what every host creating it must agree on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterNetwork {
    /// Cluster-wide name (`-o sluice.cluster-network`, or the subnets).
    pub name: String,
    /// The subnets.
    pub subnets: Vec<IpNetwork>,
    /// VNI; 0 in a request means "allocate one".
    pub vni: u32,
    /// UDP port.
    pub port: u16,
    /// `--internal`.
    pub internal: bool,
    /// `-o sluice.isolate`.
    pub isolate: bool,
    /// `-o sluice.ingress=deny`.
    pub ingress_deny: bool,
}

impl ClusterNetwork {
    /// Why `other` (another host's request) does not match this record, if it does not.
    #[must_use]
    pub fn mismatch(&self, other: &Self) -> Option<String> {
        let mut diffs = Vec::new();
        if self.subnets != other.subnets {
            let list = |s: &[IpNetwork]| {
                s.iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(" ")
            };
            diffs.push(format!(
                "subnets {} (asked {})",
                list(&self.subnets),
                list(&other.subnets)
            ));
        }
        if other.vni != 0 && self.vni != other.vni {
            diffs.push(format!("vni {} (asked {})", self.vni, other.vni));
        }
        if self.port != other.port {
            diffs.push(format!("vxlan_port {} (asked {})", self.port, other.port));
        }
        if self.internal != other.internal {
            diffs.push(format!(
                "internal {} (asked {})",
                self.internal, other.internal
            ));
        }
        if self.isolate != other.isolate {
            diffs.push(format!(
                "sluice.isolate {} (asked {})",
                self.isolate, other.isolate
            ));
        }
        if self.ingress_deny != other.ingress_deny {
            diffs.push(format!(
                "sluice.ingress deny={} (asked deny={})",
                self.ingress_deny, other.ingress_deny
            ));
        }
        (!diffs.is_empty()).then(|| {
            format!(
                "cluster network {:?} already exists with different settings: {}",
                self.name,
                diffs.join(", ")
            )
        })
    }
}

/// Where an endpoint lives and who it is: what other hosts need to reach it and to apply
/// policy to its traffic.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointLocation {
    /// Cluster network name.
    pub network: String,
    /// Docker's endpoint ID.
    pub endpoint_id: String,
    /// The host's name in the cluster (its advertise address).
    pub host: String,
    /// The host's tunnel address.
    pub vtep: IpAddr,
    /// MAC of the container's interface.
    pub mac: [u8; 6],
    /// The endpoint's addresses.
    pub addresses: Vec<IpNetwork>,
    /// Cluster-wide identity.
    pub identity: u32,
    /// Container name, when known.
    #[serde(default)]
    pub name: Option<String>,
    /// Labels (container labels and `sluice.label.*` options).
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

/// The distributed store, as the driver uses it. Every method is safe to repeat.
pub trait Cluster: Send + Sync + std::fmt::Debug + 'static {
    /// This host's name in the cluster.
    fn host(&self) -> &str;

    /// This host's tunnel address.
    fn vtep(&self) -> IpAddr;

    /// Creates the cluster network or checks that `request` matches it, and records this
    /// host as one of its members; returns the record (with its VNI, allocated uniquely when
    /// the request has none).
    fn register_network(&self, request: &ClusterNetwork) -> ClusterFuture<'_, ClusterNetwork>;

    /// This host no longer has the network; the record (and its VNI) goes with the last
    /// member. Idempotent.
    fn leave_network(&self, name: &str) -> ClusterFuture<'_, ()>;

    /// Claims `ip` in `subnet` for this host, bound to its lease (a dead host's claims go
    /// with it); `false` if another holder has it. Claiming an address this host holds
    /// again binds it to the current lease (after a restart or a lost lease).
    fn claim_address(&self, subnet: IpNetwork, ip: IpAddr) -> ClusterFuture<'_, bool>;

    /// Gives up this host's claim on `ip`. Idempotent.
    fn release_address(&self, subnet: IpNetwork, ip: IpAddr) -> ClusterFuture<'_, ()>;

    /// A new identity, unique across the cluster.
    fn allocate_identity(&self) -> ClusterFuture<'_, u32>;

    /// Publishes (or replaces) a local endpoint's location, bound to this host's lease.
    fn publish_endpoint(&self, location: &EndpointLocation) -> ClusterFuture<'_, ()>;

    /// Withdraws a local endpoint. Idempotent.
    fn withdraw_endpoint(&self, network: &str, endpoint_id: &str) -> ClusterFuture<'_, ()>;

    /// Publishes policy documents (replacing those of the same name).
    fn publish_policies(&self, docs: &[PolicyDoc]) -> ClusterFuture<'_, ()>;

    /// Removes a policy cluster-wide. Idempotent.
    fn withdraw_policy(&self, name: &str) -> ClusterFuture<'_, ()>;
}

/// An in-memory [`Cluster`] shared by several drivers in one process, for tests.
#[cfg(any(test, feature = "fake-kernel"))]
pub mod fake {
    use std::sync::{Arc, Mutex, PoisonError};

    use super::*;

    /// What the fake holds.
    #[derive(Debug, Default)]
    pub struct FakeStore {
        /// Networks by name.
        pub networks: BTreeMap<String, ClusterNetwork>,
        /// Hosts having each network.
        pub members: BTreeMap<String, std::collections::BTreeSet<String>>,
        /// Leases: (subnet, ip) → host.
        pub leases: BTreeMap<(IpNetwork, IpAddr), String>,
        /// Last identity handed out.
        pub identity: u32,
        /// Endpoints by (network, endpoint).
        pub endpoints: BTreeMap<(String, String), EndpointLocation>,
        /// Policies by name.
        pub policies: BTreeMap<String, PolicyDoc>,
    }

    /// One host's view of a [`FakeStore`].
    #[derive(Debug, Clone)]
    pub struct FakeCluster {
        /// The shared store.
        pub store: Arc<Mutex<FakeStore>>,
        /// Host name.
        pub host: String,
        /// Tunnel address.
        pub vtep: IpAddr,
    }

    impl FakeCluster {
        fn with<T>(&self, f: impl FnOnce(&mut FakeStore) -> T) -> T {
            f(&mut self.store.lock().unwrap_or_else(PoisonError::into_inner))
        }
    }

    impl Cluster for FakeCluster {
        fn host(&self) -> &str {
            &self.host
        }
        fn vtep(&self) -> IpAddr {
            self.vtep
        }
        fn register_network(&self, request: &ClusterNetwork) -> ClusterFuture<'_, ClusterNetwork> {
            let request = request.clone();
            Box::pin(async move {
                self.with(|s| {
                    let net = match s.networks.get(&request.name) {
                        Some(existing) => match existing.mismatch(&request) {
                            Some(m) => return Err(ClusterError::Conflict(m)),
                            None => existing.clone(),
                        },
                        None => {
                            let mut net = request.clone();
                            if net.vni == 0 {
                                net.vni = (1..)
                                    .find(|v| s.networks.values().all(|n| n.vni != *v))
                                    .unwrap_or(1);
                            }
                            s.networks.insert(net.name.clone(), net.clone());
                            net
                        }
                    };
                    s.members
                        .entry(net.name.clone())
                        .or_default()
                        .insert(self.host.clone());
                    Ok(net)
                })
            })
        }
        fn leave_network(&self, name: &str) -> ClusterFuture<'_, ()> {
            let name = name.to_owned();
            Box::pin(async move {
                self.with(|s| {
                    let members = s.members.entry(name.clone()).or_default();
                    members.remove(&self.host);
                    if members.is_empty() {
                        s.members.remove(&name);
                        s.networks.remove(&name);
                    }
                });
                Ok(())
            })
        }
        fn claim_address(&self, subnet: IpNetwork, ip: IpAddr) -> ClusterFuture<'_, bool> {
            Box::pin(async move {
                Ok(self.with(|s| {
                    let holder = s
                        .leases
                        .entry((subnet, ip))
                        .or_insert_with(|| self.host.clone());
                    *holder == self.host
                }))
            })
        }
        fn release_address(&self, subnet: IpNetwork, ip: IpAddr) -> ClusterFuture<'_, ()> {
            Box::pin(async move {
                self.with(|s| {
                    if s.leases.get(&(subnet, ip)) == Some(&self.host) {
                        s.leases.remove(&(subnet, ip));
                    }
                });
                Ok(())
            })
        }
        fn allocate_identity(&self) -> ClusterFuture<'_, u32> {
            Box::pin(async move {
                Ok(self.with(|s| {
                    s.identity = s
                        .identity
                        .max(crate::datapath::layout::IDENTITY_FIRST_ENDPOINT - 1)
                        + 1;
                    s.identity
                }))
            })
        }
        fn publish_endpoint(&self, location: &EndpointLocation) -> ClusterFuture<'_, ()> {
            let location = location.clone();
            Box::pin(async move {
                self.with(|s| {
                    s.endpoints.insert(
                        (location.network.clone(), location.endpoint_id.clone()),
                        location,
                    )
                });
                Ok(())
            })
        }
        fn withdraw_endpoint(&self, network: &str, endpoint_id: &str) -> ClusterFuture<'_, ()> {
            let key = (network.to_owned(), endpoint_id.to_owned());
            Box::pin(async move {
                self.with(|s| s.endpoints.remove(&key));
                Ok(())
            })
        }
        fn publish_policies(&self, docs: &[PolicyDoc]) -> ClusterFuture<'_, ()> {
            let docs = docs.to_vec();
            Box::pin(async move {
                self.with(|s| {
                    for d in docs {
                        s.policies.insert(d.name.clone(), d);
                    }
                });
                Ok(())
            })
        }
        fn withdraw_policy(&self, name: &str) -> ClusterFuture<'_, ()> {
            let name = name.to_owned();
            Box::pin(async move {
                self.with(|s| s.policies.remove(&name));
                Ok(())
            })
        }
    }
}
