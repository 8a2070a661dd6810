//! `sluice daemon --cluster etcd://…`: the flags of the multi-host control plane, the
//! connection to etcd and the tasks that follow it (docs/multi-host.md).

use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context as _;
use sluice_driver::cluster::Cluster;
use sluice_driver::cluster::etcd::{EtcdCluster, EtcdConfig};
use sluice_driver::{Driver, Kernel};
use tracing::info;

use crate::swarm::ClusterAddress;

/// `--docker-host none`: no Docker Engine API; endpoints are identified by their options.
pub const NO_DOCKER_HOST: &str = "none";

/// The flags.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ClusterArgs {
    /// etcd endpoints (`etcd://HOST:PORT[,HOST:PORT…]`, v3 API): networks, leases, endpoint
    /// locations and policies are shared with the other hosts there. Without it sluice is
    /// single-host.
    #[arg(long = "cluster", env = "SLUICE_CLUSTER")]
    pub url: Option<String>,
    /// This host's underlay address (VXLAN tunnel endpoint); default: `--cluster-address`.
    #[arg(long, env = "SLUICE_ADVERTISE_ADDR")]
    pub advertise_addr: Option<IpAddr>,
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

/// Connects to etcd when `--cluster` is given.
///
/// # Errors
/// Missing advertise address, unreadable password or certificate files, etcd unreachable.
pub async fn connect(
    args: &ClusterArgs,
    swarm_address: Option<ClusterAddress>,
) -> anyhow::Result<Option<Arc<EtcdCluster>>> {
    let Some(url) = &args.url else {
        return Ok(None);
    };
    let vtep = args
        .advertise_addr
        .or(swarm_address.and_then(|a| a.0))
        .context("--cluster needs --advertise-addr (this host's underlay address)")?;
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
    let config = EtcdConfig {
        url: url.clone(),
        user,
        ca: args.cluster_ca.clone(),
        cert: args.cluster_cert.clone().zip(args.cluster_key.clone()),
        lease_ttl: args.cluster_lease_ttl,
        host: vtep.to_string(),
        vtep,
    };
    let cluster = EtcdCluster::connect(&config)
        .await
        .with_context(|| format!("joining the cluster at {url}"))?;
    info!(url, host = cluster.host(), "cluster store connected");
    Ok(Some(Arc::new(cluster)))
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
