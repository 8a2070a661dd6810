//! `sluice daemon --cluster etcd://…`: the flags of the multi-host control plane, the
//! connection to etcd and the tasks that follow it (docs/multi-host.md).

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context as _;
use sluice_driver::cluster::Cluster;
use sluice_driver::cluster::deferred::Deferred;
use sluice_driver::cluster::etcd::{EtcdCluster, EtcdConfig};
use sluice_driver::{Driver, Kernel};
use tracing::{info, warn};

use crate::server::Discovery;
use crate::swarm::ClusterAddress;

/// `--docker-host none`: no Docker Engine API; endpoints are identified by their options.
pub const NO_DOCKER_HOST: &str = "none";

/// The flags.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ClusterArgs {
    /// etcd endpoints (`etcd://HOST:PORT[,HOST:PORT…]`, v3 API): networks, leases, endpoint
    /// locations and policies are shared with the other hosts there. Without it (or empty)
    /// sluice is single-host.
    #[arg(long = "cluster", env = "SLUICE_CLUSTER")]
    pub url: Option<String>,
    /// This host's underlay address (VXLAN tunnel endpoint); default: `--cluster-address`,
    /// else the address Docker's `DiscoverNew` gives in swarm mode. (Empty means none: a
    /// managed plugin's settable value cannot be unset.)
    #[arg(long, env = "SLUICE_ADVERTISE_ADDR", value_parser = crate::swarm::parse_cluster_address)]
    pub advertise_addr: Option<ClusterAddress>,
    /// etcd user (with `--cluster-password` or `--cluster-password-file`).
    #[arg(long, env = "SLUICE_CLUSTER_USER")]
    pub cluster_user: Option<String>,
    /// etcd password.
    #[arg(long, env = "SLUICE_CLUSTER_PASSWORD", hide_env_values = true)]
    pub cluster_password: Option<String>,
    /// File holding the etcd password (first line).
    #[arg(long, env = "SLUICE_CLUSTER_PASSWORD_FILE")]
    pub cluster_password_file: Option<PathBuf>,
    /// CA certificate (PEM) etcd's certificate is checked against; turns TLS on.
    #[arg(long, env = "SLUICE_CLUSTER_CA")]
    pub cluster_ca: Option<PathBuf>,
    /// Client certificate (PEM) for etcd's `--client-cert-auth`.
    #[arg(long, env = "SLUICE_CLUSTER_CERT", requires = "cluster_key")]
    pub cluster_cert: Option<PathBuf>,
    /// Key (PEM) of `--cluster-cert`.
    #[arg(long, env = "SLUICE_CLUSTER_KEY", requires = "cluster_cert")]
    pub cluster_key: Option<PathBuf>,
    /// Seconds after this host's death at which the others drop its endpoints.
    #[arg(long, env = "SLUICE_CLUSTER_LEASE_TTL", default_value_t = 15)]
    pub cluster_lease_ttl: i64,
}

/// Where the address learnt from `DiscoverNew` is kept (Docker does not send it again when
/// only sluice restarts).
const REMEMBERED_ADDRESS: &str = "advertise-addr";

/// What `--cluster` became at start.
#[derive(Debug)]
pub enum Joined {
    /// Connected: the underlay address was given (or remembered).
    Now(Arc<EtcdCluster>),
    /// Waiting for Docker's `DiscoverNew` to say this host's address.
    Later {
        /// What the driver uses meanwhile (refusing with a clear error).
        deferred: Arc<Deferred>,
        /// The connection settings; host and VTEP are filled in from the discovery.
        config: Box<EtcdConfig>,
        /// The state directory, where the address is remembered.
        state_dir: PathBuf,
    },
}

/// Connects to etcd when `--cluster` is given and this host's underlay address is known
/// (`--advertise-addr`, `--cluster-address`, or the one `DiscoverNew` gave before); else
/// defers the connection until `DiscoverNew`.
///
/// # Errors
/// Unreadable password or certificate files, inconsistent flags, etcd unreachable.
pub async fn connect(
    args: &ClusterArgs,
    swarm_address: Option<ClusterAddress>,
    state_dir: &Path,
) -> anyhow::Result<Option<Joined>> {
    // An empty `SLUICE_CLUSTER` (the managed plugin's default) means single-host.
    let Some(url) = args.url.as_ref().filter(|u| !u.trim().is_empty()) else {
        return Ok(None);
    };
    let password = match (&args.cluster_password, &args.cluster_password_file) {
        (Some(p), _) => Some(p.clone()),
        (None, Some(f)) => Some(
            std::fs::read_to_string(f)
                .with_context(|| format!("reading --cluster-password-file {}", f.display()))?
                .lines()
                .next()
                .unwrap_or_default()
                .to_owned(),
        ),
        (None, None) => None,
    };
    let user = match (&args.cluster_user, password) {
        (Some(u), Some(p)) => Some((u.clone(), p)),
        (Some(_), None) => {
            anyhow::bail!("--cluster-user needs --cluster-password or --cluster-password-file")
        }
        (None, Some(_)) => anyhow::bail!("--cluster-password needs --cluster-user"),
        (None, None) => None,
    };
    let mut config = EtcdConfig {
        url: url.clone(),
        user,
        ca: args.cluster_ca.clone(),
        cert: args.cluster_cert.clone().zip(args.cluster_key.clone()),
        lease_ttl: args.cluster_lease_ttl,
        host: String::new(),
        vtep: IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED),
    };
    let remembered = std::fs::read_to_string(state_dir.join(REMEMBERED_ADDRESS))
        .ok()
        .and_then(|s| s.trim().parse::<IpAddr>().ok());
    let Some(vtep) = args
        .advertise_addr
        .and_then(|a| a.0)
        .or(swarm_address.and_then(|a| a.0))
        .or(remembered)
    else {
        info!(
            url,
            "no --advertise-addr: joining the cluster once Docker's DiscoverNew names this host's address"
        );
        return Ok(Some(Joined::Later {
            deferred: Arc::new(Deferred::new()),
            config: Box::new(config),
            state_dir: state_dir.to_owned(),
        }));
    };
    config.host = vtep.to_string();
    config.vtep = vtep;
    let cluster = EtcdCluster::connect(&config)
        .await
        .with_context(|| format!("joining the cluster at {url}"))?;
    info!(url, host = cluster.host(), "cluster store connected");
    Ok(Some(Joined::Now(Arc::new(cluster))))
}

impl Joined {
    /// What the driver is given.
    #[must_use]
    pub fn cluster(&self) -> Arc<dyn Cluster> {
        match self {
            Joined::Now(c) => c.clone(),
            Joined::Later { deferred, .. } => deferred.clone(),
        }
    }

    /// Starts following the cluster now, or once `DiscoverNew` gives the address: then the
    /// returned sender is the plugin router's discovery sink.
    pub async fn start<K: Kernel>(self, driver: Arc<Driver<K>>) -> Option<Discovery> {
        match self {
            Joined::Now(c) => {
                start(c, driver).await;
                None
            }
            Joined::Later {
                deferred,
                config,
                state_dir,
            } => {
                tokio::spawn(join_when_discovered(
                    deferred.clone(),
                    *config,
                    state_dir,
                    driver,
                ));
                Some(deferred)
            }
        }
    }
}

async fn join_when_discovered<K: Kernel>(
    deferred: Arc<Deferred>,
    mut config: EtcdConfig,
    state_dir: PathBuf,
    driver: Arc<Driver<K>>,
) {
    let mut discovered = deferred.address();
    let vtep = match discovered.wait_for(Option::is_some).await {
        Ok(addr) => match *addr {
            Some(a) => a,
            None => return,
        },
        Err(_) => return,
    };
    info!(address = %vtep, "underlay address from DiscoverNew");
    if let Err(e) = std::fs::write(state_dir.join(REMEMBERED_ADDRESS), format!("{vtep}\n")) {
        warn!(error = %e, "remembering the underlay address");
    }
    config.host = vtep.to_string();
    config.vtep = vtep;
    let cluster = loop {
        match EtcdCluster::connect(&config).await {
            Ok(c) => break Arc::new(c),
            Err(e) => {
                warn!(error = %e, url = %config.url, "joining the cluster; retrying");
                tokio::time::sleep(std::time::Duration::from_secs(2)).await;
            }
        }
    };
    info!(url = %config.url, host = cluster.host(), "cluster store connected");
    deferred.set(cluster.clone());
    start(cluster, driver).await;
}

/// Publishes this host's endpoints, then follows the cluster and keeps the lease alive.
pub async fn start<K: Kernel>(cluster: Arc<EtcdCluster>, driver: Arc<Driver<K>>) {
    driver.publish_local_endpoints().await;
    tokio::spawn(sluice_driver::cluster::etcd::watch(
        cluster.clone(),
        driver.clone(),
    ));
    tokio::spawn(cluster.keep_alive(driver));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(url: &str) -> ClusterArgs {
        ClusterArgs {
            url: Some(url.to_owned()),
            cluster_lease_ttl: 15,
            ..ClusterArgs::default()
        }
    }

    #[tokio::test]
    async fn empty_cluster_url_is_single_host() {
        let dir = tempfile::tempdir().unwrap();
        assert!(
            connect(&args(""), None, dir.path())
                .await
                .unwrap()
                .is_none()
        );
        assert!(
            connect(&args("  "), None, dir.path())
                .await
                .unwrap()
                .is_none()
        );
    }

    #[tokio::test]
    async fn without_an_address_the_join_waits_for_discovery_unless_one_is_remembered() {
        let dir = tempfile::tempdir().unwrap();
        let empty = Some(ClusterAddress(None));
        let mut a = args("etcd://192.0.2.1:2379");
        a.advertise_addr = empty;
        let joined = connect(&a, empty, dir.path()).await.unwrap();
        let Some(Joined::Later { deferred, .. }) = joined else {
            panic!("joined without an address: {joined:?}");
        };
        assert!(deferred.get().is_none());
        // A remembered address is used at once: connecting is tried (and fails here, with
        // the etcd URL in the message, since nothing listens on TEST-NET).
        std::fs::write(dir.path().join(REMEMBERED_ADDRESS), "192.0.2.9\n").unwrap();
        a.url = Some("etcd://127.0.0.1:9".into());
        let err = connect(&a, None, dir.path()).await.unwrap_err();
        assert!(
            format!("{err:#}").contains("joining the cluster at etcd://127.0.0.1:9"),
            "{err:#}"
        );
    }
}
