//! [`Cluster`] on etcd (v3 API). The keyspace, all under `/sluice/v1/`:
//!
//! | key | value | lifetime |
//! | --- | --- | --- |
//! | `networks/<name>` | [`ClusterNetwork`] (JSON) | until its last member leaves |
//! | `vnis/<vni>` | the network name owning the VNI | with the network |
//! | `members/<name>/<host>` | empty: the host has the network | until it deletes it |
//! | `leases/<subnet>/<ip>` | the host holding the address | `ReleaseAddress`, or the host's etcd lease |
//! | `identity` | last identity handed out | forever |
//! | `endpoints/<network>/<endpoint>` | [`EndpointLocation`] (JSON) | the host's etcd lease |
//! | `policies/<name>` | [`PolicyDoc`] (JSON) | until removed |
//!
//! Every allocation is one transaction (`create_revision == 0` or `mod_revision == seen`),
//! so two hosts never get the same address, VNI or identity. Endpoint locations and address
//! claims are bound to the host's lease: when a host dies its lease expires and etcd deletes
//! them, which every other host's [`watch`] sees; a daemon that restarts within the TTL
//! binds them to its new lease before the old one expires.

use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use etcd_client::{
    Certificate, Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, Identity,
    PutOptions, TlsOptions, Txn, TxnOp, WatchOptions,
};
use ipnetwork::IpNetwork;
use tracing::{debug, info, warn};

use super::{Cluster, ClusterError, ClusterFuture, ClusterNetwork, EndpointLocation};
use crate::driver::Driver;
use crate::kernel::Kernel;
use crate::policy::PolicyDoc;

const ROOT: &str = "/sluice/v1/";

/// How to reach etcd and who this host is.
#[derive(Debug, Clone)]
pub struct EtcdConfig {
    /// `etcd://HOST:PORT[,HOST:PORT...]`.
    pub url: String,
    /// User name and password (etcd authentication).
    pub user: Option<(String, String)>,
    /// CA certificate (PEM) to verify etcd with; turns TLS on.
    pub ca: Option<PathBuf>,
    /// Client certificate and key (PEM) for `--client-cert-auth`.
    pub cert: Option<(PathBuf, PathBuf)>,
    /// TTL in seconds of this host's lease (its endpoints vanish this long after it dies).
    pub lease_ttl: i64,
    /// This host's name in the cluster.
    pub host: String,
    /// This host's tunnel address.
    pub vtep: IpAddr,
}

/// Splits `etcd://h:p,h2:p2` into endpoint URLs (`http://` or, with TLS, `https://`).
///
/// # Errors
/// Another scheme, or no endpoint.
pub fn parse_url(url: &str, tls: bool) -> Result<Vec<String>, ClusterError> {
    let rest = url.strip_prefix("etcd://").ok_or_else(|| {
        ClusterError::Conflict(format!(
            "--cluster must look like etcd://HOST:PORT[,HOST:PORT…], got {url:?}"
        ))
    })?;
    let scheme = if tls { "https" } else { "http" };
    let endpoints: Vec<String> = rest
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|hp| format!("{scheme}://{}", hp.trim_end_matches('/')))
        .collect();
    if endpoints.is_empty() {
        return Err(ClusterError::Conflict(format!(
            "--cluster {url:?} names no etcd endpoint"
        )));
    }
    Ok(endpoints)
}

/// This host's connection to etcd.
pub struct EtcdCluster {
    client: Client,
    host: String,
    vtep: IpAddr,
    ttl: i64,
    lease: AtomicI64,
}

impl std::fmt::Debug for EtcdCluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdCluster")
            .field("host", &self.host)
            .field("vtep", &self.vtep)
            .field("lease", &self.lease)
            .finish_non_exhaustive()
    }
}

fn store_err(op: &str) -> impl FnOnce(etcd_client::Error) -> ClusterError + '_ {
    move |e| {
        // tonic's transport errors say little at the top ("transport error"): keep the causes.
        let mut message = format!("{op}: {e}");
        if matches!(e, etcd_client::Error::TransportError(_)) {
            message = format!("{op}: {e:?}");
        }
        let mut source = std::error::Error::source(&e);
        while let Some(cause) = source {
            message.push_str(&format!(": {cause}"));
            source = cause.source();
        }
        ClusterError::Store(message)
    }
}

fn read_file(path: &PathBuf) -> Result<Vec<u8>, ClusterError> {
    std::fs::read(path).map_err(|e| ClusterError::Store(format!("reading {}: {e}", path.display())))
}

impl EtcdCluster {
    /// Connects and takes this host's lease.
    ///
    /// # Errors
    /// Bad URL or files, etcd unreachable or refusing the credentials.
    pub async fn connect(config: &EtcdConfig) -> Result<Self, ClusterError> {
        let tls = config.ca.is_some() || config.cert.is_some();
        let endpoints = parse_url(&config.url, tls)?;
        let mut options = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(5))
            .with_timeout(Duration::from_secs(10));
        if let Some((user, password)) = &config.user {
            options = options.with_user(user.clone(), password.clone());
        }
        if tls {
            let mut t = TlsOptions::new();
            if let Some(ca) = &config.ca {
                t = t.ca_certificate(Certificate::from_pem(read_file(ca)?));
            }
            if let Some((cert, key)) = &config.cert {
                t = t.identity(Identity::from_pem(read_file(cert)?, read_file(key)?));
            }
            options = options.with_tls(t);
        }
        let client = Client::connect(endpoints, Some(options))
            .await
            .map_err(store_err("connecting to etcd"))?;
        let cluster = Self {
            client,
            host: config.host.clone(),
            vtep: config.vtep,
            ttl: config.lease_ttl.max(2),
            lease: AtomicI64::new(0),
        };
        cluster.grant_lease().await?;
        Ok(cluster)
    }

    async fn grant_lease(&self) -> Result<i64, ClusterError> {
        let lease = self
            .client
            .clone()
            .lease_grant(self.ttl, None)
            .await
            .map_err(store_err("granting this host's lease"))?;
        self.lease.store(lease.id(), Ordering::SeqCst);
        info!(lease = lease.id(), ttl = self.ttl, "etcd lease granted");
        Ok(lease.id())
    }

    /// Keeps the lease alive until the process ends; when it was lost (etcd down longer
    /// than the TTL), takes a new one and has the driver publish its endpoints again.
    pub async fn keep_alive<K: Kernel>(self: Arc<Self>, driver: Arc<Driver<K>>) {
        let period = Duration::from_secs(u64::try_from(self.ttl / 3).unwrap_or(1).max(1));
        loop {
            let id = self.lease.load(Ordering::SeqCst);
            let alive: Result<(), ClusterError> = async {
                let (mut keeper, mut stream) = self
                    .client
                    .clone()
                    .lease_keep_alive(id)
                    .await
                    .map_err(store_err("keep-alive"))?;
                loop {
                    keeper.keep_alive().await.map_err(store_err("keep-alive"))?;
                    match stream.message().await.map_err(store_err("keep-alive"))? {
                        Some(r) if r.ttl() > 0 => {}
                        _ => return Err(ClusterError::Store("lease expired".into())),
                    }
                    tokio::time::sleep(period).await;
                }
            }
            .await;
            if let Err(e) = alive {
                warn!(error = %e, lease = id, "etcd lease lost; taking a new one");
            }
            tokio::time::sleep(period).await;
            if self.grant_lease().await.is_ok() {
                driver.publish_local_endpoints().await;
            }
        }
    }

    async fn get_json<T: serde::de::DeserializeOwned>(
        &self,
        key: &str,
    ) -> Result<Option<T>, ClusterError> {
        let resp = self
            .client
            .clone()
            .get(key, None)
            .await
            .map_err(store_err("get"))?;
        resp.kvs()
            .first()
            .map(|kv| decode(key, kv.value()))
            .transpose()
    }

    async fn try_register(&self, request: &ClusterNetwork) -> Result<ClusterNetwork, ClusterError> {
        let key = format!("{ROOT}networks/{}", request.name);
        let member = member_key(&request.name, &self.host);
        let explicit = request.vni != 0;
        let mut vni = if explicit { request.vni } else { 1 };
        loop {
            let resp = self
                .client
                .clone()
                .get(key.clone(), None)
                .await
                .map_err(store_err("register network"))?;
            if let Some(kv) = resp.kvs().first() {
                let existing: ClusterNetwork = decode(&key, kv.value())?;
                if let Some(m) = existing.mismatch(request) {
                    return Err(ClusterError::Conflict(m));
                }
                // Membership only if the record is still the one compared (the last member
                // may be deleting it right now: then start over and create it).
                let txn = Txn::new()
                    .when([Compare::mod_revision(
                        key.clone(),
                        CompareOp::Equal,
                        kv.mod_revision(),
                    )])
                    .and_then([TxnOp::put(member.clone(), "", None)]);
                if self
                    .client
                    .clone()
                    .txn(txn)
                    .await
                    .map_err(store_err("register network"))?
                    .succeeded()
                {
                    return Ok(existing);
                }
                continue;
            }
            let mut net = request.clone();
            net.vni = vni;
            let vni_key = format!("{ROOT}vnis/{vni}");
            let value = serde_json::to_vec(&net).map_err(|e| ClusterError::Store(e.to_string()))?;
            let txn = Txn::new()
                .when([
                    Compare::create_revision(key.clone(), CompareOp::Equal, 0),
                    Compare::create_revision(vni_key.clone(), CompareOp::Equal, 0),
                ])
                .and_then([
                    TxnOp::put(key.clone(), value, None),
                    TxnOp::put(vni_key.clone(), net.name.clone(), None),
                    TxnOp::put(member.clone(), "", None),
                ]);
            let resp = self
                .client
                .clone()
                .txn(txn)
                .await
                .map_err(store_err("register network"))?;
            if resp.succeeded() {
                info!(network = %net.name, vni, "cluster network registered");
                return Ok(net);
            }
            // Either someone registered the name meanwhile (the next round compares), or
            // the VNI is taken.
            if self.get_json::<ClusterNetwork>(&key).await?.is_none() {
                if explicit {
                    return Err(ClusterError::Conflict(format!(
                        "vni {vni} is already used by another cluster network"
                    )));
                }
                vni += 1;
                if vni > crate::vxlan::MAX_VNI {
                    return Err(ClusterError::Conflict("no free VNI left".into()));
                }
            }
        }
    }

    async fn try_leave(&self, name: &str) -> Result<(), ClusterError> {
        let key = format!("{ROOT}networks/{name}");
        self.client
            .clone()
            .delete(member_key(name, &self.host), None)
            .await
            .map_err(store_err("leave network"))?;
        let resp = self
            .client
            .clone()
            .get(key.clone(), None)
            .await
            .map_err(store_err("leave network"))?;
        let Some(kv) = resp.kvs().first() else {
            return Ok(());
        };
        let net: ClusterNetwork = decode(&key, kv.value())?;
        // Removed only while nobody is a member and the record is the one read: a host
        // registering at the same time either made itself a member first (this fails) or
        // finds the record gone and creates it again.
        let txn = Txn::new()
            .when([
                Compare::create_revision(member_key(name, ""), CompareOp::Equal, 0).with_prefix(),
                Compare::mod_revision(key.clone(), CompareOp::Equal, kv.mod_revision()),
            ])
            .and_then([
                TxnOp::delete(key, None),
                TxnOp::delete(format!("{ROOT}vnis/{}", net.vni), None),
            ]);
        if self
            .client
            .clone()
            .txn(txn)
            .await
            .map_err(store_err("leave network"))?
            .succeeded()
        {
            info!(network = %name, vni = net.vni, "last member left: cluster network removed");
        }
        Ok(())
    }
}

fn member_key(network: &str, host: &str) -> String {
    format!("{ROOT}members/{network}/{host}")
}

fn decode<T: serde::de::DeserializeOwned>(key: &str, value: &[u8]) -> Result<T, ClusterError> {
    serde_json::from_slice(value).map_err(|e| ClusterError::BadRecord {
        key: key.to_owned(),
        message: e.to_string(),
    })
}

fn lease_key(subnet: IpNetwork, ip: IpAddr) -> String {
    format!("{ROOT}leases/{subnet}/{ip}")
}

impl Cluster for EtcdCluster {
    fn host(&self) -> &str {
        &self.host
    }

    fn vtep(&self) -> IpAddr {
        self.vtep
    }

    fn register_network(&self, request: &ClusterNetwork) -> ClusterFuture<'_, ClusterNetwork> {
        let request = request.clone();
        Box::pin(async move { self.try_register(&request).await })
    }

    fn leave_network(&self, name: &str) -> ClusterFuture<'_, ()> {
        let name = name.to_owned();
        Box::pin(async move { self.try_leave(&name).await })
    }

    fn claim_address(&self, subnet: IpNetwork, ip: IpAddr) -> ClusterFuture<'_, bool> {
        Box::pin(async move {
            let key = lease_key(subnet, ip);
            let lease = self.lease.load(Ordering::SeqCst);
            let put = || {
                TxnOp::put(
                    key.clone(),
                    self.host.clone(),
                    Some(PutOptions::new().with_lease(lease)),
                )
            };
            let free = Txn::new()
                .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
                .and_then([put()]);
            let client = self.client.clone();
            if client
                .clone()
                .txn(free)
                .await
                .map_err(store_err("claim address"))?
                .succeeded()
            {
                return Ok(true);
            }
            // Ours already (a repeated request, or a restart): bound to the current lease.
            let ours = Txn::new()
                .when([Compare::value(
                    key.clone(),
                    CompareOp::Equal,
                    self.host.clone(),
                )])
                .and_then([put()]);
            Ok(client
                .clone()
                .txn(ours)
                .await
                .map_err(store_err("claim address"))?
                .succeeded())
        })
    }

    fn release_address(&self, subnet: IpNetwork, ip: IpAddr) -> ClusterFuture<'_, ()> {
        Box::pin(async move {
            let key = lease_key(subnet, ip);
            let txn = Txn::new()
                .when([Compare::value(
                    key.clone(),
                    CompareOp::Equal,
                    self.host.clone(),
                )])
                .and_then([TxnOp::delete(key, None)]);
            self.client
                .clone()
                .txn(txn)
                .await
                .map_err(store_err("release address"))?;
            Ok(())
        })
    }

    fn allocate_identity(&self) -> ClusterFuture<'_, u32> {
        Box::pin(async move {
            let key = format!("{ROOT}identity");
            loop {
                let resp = self
                    .client
                    .clone()
                    .get(key.clone(), None)
                    .await
                    .map_err(store_err("identity"))?;
                let (last, compare) = match resp.kvs().first() {
                    Some(kv) => (
                        std::str::from_utf8(kv.value())
                            .ok()
                            .and_then(|v| v.parse::<u32>().ok())
                            .unwrap_or(0),
                        Compare::mod_revision(key.clone(), CompareOp::Equal, kv.mod_revision()),
                    ),
                    None => (
                        0,
                        Compare::create_revision(key.clone(), CompareOp::Equal, 0),
                    ),
                };
                let next = last.max(crate::datapath::layout::IDENTITY_FIRST_ENDPOINT - 1) + 1;
                let txn = Txn::new().when([compare]).and_then([TxnOp::put(
                    key.clone(),
                    next.to_string(),
                    None,
                )]);
                if self
                    .client
                    .clone()
                    .txn(txn)
                    .await
                    .map_err(store_err("identity"))?
                    .succeeded()
                {
                    return Ok(next);
                }
            }
        })
    }

    fn publish_endpoint(&self, location: &EndpointLocation) -> ClusterFuture<'_, ()> {
        let location = location.clone();
        Box::pin(async move {
            let key = format!(
                "{ROOT}endpoints/{}/{}",
                location.network, location.endpoint_id
            );
            let value =
                serde_json::to_vec(&location).map_err(|e| ClusterError::Store(e.to_string()))?;
            let lease = self.lease.load(Ordering::SeqCst);
            self.client
                .clone()
                .put(key, value, Some(PutOptions::new().with_lease(lease)))
                .await
                .map_err(store_err("publish endpoint"))?;
            Ok(())
        })
    }

    fn withdraw_endpoint(&self, network: &str, endpoint_id: &str) -> ClusterFuture<'_, ()> {
        let key = format!("{ROOT}endpoints/{network}/{endpoint_id}");
        Box::pin(async move {
            self.client
                .clone()
                .delete(key, None)
                .await
                .map_err(store_err("withdraw endpoint"))?;
            Ok(())
        })
    }

    fn publish_policies(&self, docs: &[PolicyDoc]) -> ClusterFuture<'_, ()> {
        let docs = docs.to_vec();
        Box::pin(async move {
            let mut ops = Vec::new();
            for d in &docs {
                let value =
                    serde_json::to_vec(d).map_err(|e| ClusterError::Store(e.to_string()))?;
                ops.push(TxnOp::put(
                    format!("{ROOT}policies/{}", d.name),
                    value,
                    None,
                ));
            }
            self.client
                .clone()
                .txn(Txn::new().and_then(ops))
                .await
                .map_err(store_err("publish policies"))?;
            Ok(())
        })
    }

    fn withdraw_policy(&self, name: &str) -> ClusterFuture<'_, ()> {
        let key = format!("{ROOT}policies/{name}");
        Box::pin(async move {
            self.client
                .clone()
                .delete(key, None)
                .await
                .map_err(store_err("withdraw policy"))?;
            Ok(())
        })
    }
}

/// Follows the cluster: the remote endpoints and the policies, first as a whole, then
/// change by change; starts over (whole state again) after any error. Runs forever.
pub async fn watch<K: Kernel>(cluster: Arc<EtcdCluster>, driver: Arc<Driver<K>>) {
    loop {
        if let Err(e) = watch_once(&cluster, &driver).await {
            warn!(error = %e, "following the cluster store; resynchronising");
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

async fn load_policies(cluster: &EtcdCluster) -> Result<(Vec<PolicyDoc>, i64), ClusterError> {
    let resp = cluster
        .client
        .clone()
        .get(
            format!("{ROOT}policies/"),
            Some(GetOptions::new().with_prefix()),
        )
        .await
        .map_err(store_err("list policies"))?;
    let revision = resp
        .header()
        .map_or(0, etcd_client::ResponseHeader::revision);
    let mut docs = Vec::new();
    for kv in resp.kvs() {
        docs.push(decode(&String::from_utf8_lossy(kv.key()), kv.value())?);
    }
    Ok((docs, revision))
}

async fn watch_once<K: Kernel>(
    cluster: &EtcdCluster,
    driver: &Driver<K>,
) -> Result<(), ClusterError> {
    let endpoints_prefix = format!("{ROOT}endpoints/");
    let resp = cluster
        .client
        .clone()
        .get(
            endpoints_prefix.clone(),
            Some(GetOptions::new().with_prefix()),
        )
        .await
        .map_err(store_err("list endpoints"))?;
    let mut remote = Vec::new();
    for kv in resp.kvs() {
        let loc: EndpointLocation = decode(&String::from_utf8_lossy(kv.key()), kv.value())?;
        if loc.host != cluster.host {
            remote.push(loc);
        }
    }
    let revision = resp
        .header()
        .map_or(0, etcd_client::ResponseHeader::revision);
    driver.replace_remotes(remote).await;
    let (docs, _) = load_policies(cluster).await?;
    driver.sync_cluster_policies(docs).await;
    let mut stream = cluster
        .client
        .clone()
        .watch(
            ROOT,
            Some(
                WatchOptions::new()
                    .with_prefix()
                    .with_start_revision(revision + 1),
            ),
        )
        .await
        .map_err(store_err("watch"))?;
    info!(revision, "following the cluster store");
    while let Some(resp) = stream.message().await.map_err(store_err("watch"))? {
        if resp.canceled() {
            return Err(ClusterError::Store(format!(
                "watch cancelled: {}",
                resp.cancel_reason()
            )));
        }
        let mut policies_changed = false;
        for event in resp.events() {
            let Some(kv) = event.kv() else { continue };
            let key = String::from_utf8_lossy(kv.key()).into_owned();
            if let Some(rest) = key.strip_prefix(&endpoints_prefix) {
                match event.event_type() {
                    EventType::Put => {
                        let loc: EndpointLocation = decode(&key, kv.value())?;
                        if loc.host != cluster.host {
                            driver.upsert_remote(loc).await;
                        }
                    }
                    EventType::Delete => {
                        if let Some((_, endpoint)) = rest.rsplit_once('/') {
                            driver.remove_remote(endpoint).await;
                        }
                    }
                }
            } else if key.starts_with(&format!("{ROOT}policies/")) {
                policies_changed = true;
            }
        }
        if policies_changed {
            let (docs, _) = load_policies(cluster).await?;
            debug!(policies = docs.len(), "cluster policies changed");
            driver.sync_cluster_policies(docs).await;
        }
    }
    Err(ClusterError::Store("watch ended".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        assert_eq!(
            parse_url("etcd://10.0.0.1:2379,10.0.0.2:2379", false).unwrap(),
            vec!["http://10.0.0.1:2379", "http://10.0.0.2:2379"]
        );
        assert_eq!(parse_url("etcd://h:1", true).unwrap(), vec!["https://h:1"]);
        assert!(parse_url("http://h:1", false).is_err());
        assert!(parse_url("etcd://", false).is_err());
    }
}
