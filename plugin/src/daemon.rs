//! `sluice daemon`: opens the state, reconciles the kernel with it, serves the plugin
//! socket and the admin API (policies) until SIGTERM/SIGINT, and removes both sockets on the
//! way out.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context as _;
use ipnetwork::IpNetwork;
use sluice_driver::Driver;
use sluice_driver::bridge::LinuxKernel;
use sluice_driver::datapath::{Datapath, DatapathConfig};
use sluice_driver::ipam::IpamConfig;
use sluice_driver::store::Store;
use tracing::{debug, error, info, warn};

use crate::admin;
use crate::engine::{Availability, EngineClient, IdentityResolver, ResolverConfig};
use crate::swarm::Scope;

/// Parent of every daemon's pin directory.
const DEFAULT_BPF_ROOT: &str = "/sys/fs/bpf/sluice";

/// Settings of the daemon (the CLI flags).
#[derive(Debug, Clone, clap::Args)]
pub struct DaemonArgs {
    /// Unix socket Docker finds the plugin on; its file name (without `.sock`) is the
    /// driver name users give to `docker network create -d`.
    #[arg(
        long,
        env = "SLUICE_PLUGIN_SOCKET",
        default_value = "/run/docker/plugins/sluice.sock"
    )]
    pub plugin_socket: PathBuf,
    /// Directory of the state database.
    #[arg(long, env = "SLUICE_STATE_DIR", default_value = "/var/lib/sluice")]
    pub state_dir: PathBuf,
    /// Docker Engine API, for the names and labels of the containers behind endpoints
    /// (Docker does not send them to plugins).
    #[arg(
        long,
        env = "SLUICE_DOCKER_HOST",
        default_value = "unix:///var/run/docker.sock"
    )]
    pub docker_host: String,
    /// Where programs, maps and links are pinned, so policy keeps being enforced while the
    /// daemon restarts; default `/sys/fs/bpf/sluice/<plugin name>`.
    #[arg(long, env = "SLUICE_BPF_DIR")]
    pub bpf_dir: Option<PathBuf>,
    /// IPv4 range automatic subnets are taken from.
    #[arg(
        long,
        env = "SLUICE_DEFAULT_ADDRESS_POOL",
        default_value = "10.200.0.0/14"
    )]
    pub default_address_pool: IpNetwork,
    /// Prefix length of each automatic IPv4 subnet.
    #[arg(long, env = "SLUICE_DEFAULT_POOL_SIZE", default_value_t = 24)]
    pub default_pool_size: u8,
    /// IPv6 (ULA) range automatic IPv6 subnets are taken from.
    #[arg(
        long,
        env = "SLUICE_DEFAULT_IPV6_POOL",
        default_value = "fd53:6c75:6963::/48"
    )]
    pub default_ipv6_pool: IpNetwork,
    /// Prefix length of each automatic IPv6 subnet.
    #[arg(long, env = "SLUICE_DEFAULT_IPV6_POOL_SIZE", default_value_t = 64)]
    pub default_ipv6_pool_size: u8,
    /// The admin API's socket (the CLI's global `--admin-socket`); `None`:
    /// `/run/sluice/<plugin name>.sock`.
    #[arg(skip)]
    pub admin_socket: Option<PathBuf>,
    /// `GetCapabilities` scope: `global` for swarm-scoped networks (swarm nodes only: Docker
    /// refuses global-scope drivers outside swarm), `local` otherwise.
    #[arg(long, env = "SLUICE_SCOPE", value_enum, default_value_t = Scope::Local)]
    pub scope: Scope,
    /// Name that marks this daemon's links (`sluice:<name>`) and names its pin directory and
    /// admin socket; default: the plugin socket's file name without `.sock`.
    #[arg(long, env = "SLUICE_NAME")]
    pub name: Option<String>,
    /// This node's address for multi-host networking; validated and logged, reserved for the
    /// multi-host modes (docs/managed-plugin.md).
    /// (Empty means none: a managed plugin's settable value cannot be unset.)
    #[arg(long, env = "SLUICE_CLUSTER_ADDRESS", value_parser = crate::swarm::parse_cluster_address)]
    pub cluster_address: Option<crate::swarm::ClusterAddress>,
    /// Where the host's `/proc/sys` is (its `net/` is what sluice writes): a managed plugin's
    /// own `/proc/sys` is read-only, so the plugin mounts the host's `net/` elsewhere.
    #[arg(long, env = "SLUICE_PROC_SYS", default_value = "/proc/sys")]
    pub proc_sys: PathBuf,
    /// Multi-host control plane (docs/multi-host.md).
    #[command(flatten)]
    pub cluster: crate::cluster::ClusterArgs,
    /// The same-host fast path: traffic between endpoints of one network on this host (and
    /// from the VXLAN device to them) skips the bridge, both policies still applied
    /// (docs/options.md). On by default; `--fast-path=false` turns it off.
    #[arg(
        long,
        env = "SLUICE_FAST_PATH",
        default_value_t = true,
        num_args = 0..=1,
        require_equals = true,
        default_missing_value = "true",
        action = clap::ArgAction::Set,
        value_parser = clap::builder::BoolishValueParser::new()
    )]
    pub fast_path: bool,
    /// Warm link pool: spare veth pairs kept per bridge-backed network, on the bridge,
    /// programs attached, so CreateEndpoint pays no netlink but one request; size it to the
    /// expected burst of container starts (docs/options.md). 0 turns it off.
    #[arg(long, env = "SLUICE_LINK_POOL", default_value_t = 8)]
    pub link_pool: usize,
    /// Adaptive warm link pool: after a burst of container starts larger than the pool, it
    /// is refilled to the burst's size, up to this many spare pairs per network
    /// (docs/options.md). 0 (or at most --link-pool): fixed size.
    #[arg(long, env = "SLUICE_LINK_POOL_MAX", default_value_t = 0)]
    pub link_pool_max: usize,
}

/// Runs the daemon until a signal arrives.
///
/// # Errors
/// When the state, the kernel connection or the socket cannot be set up.
pub async fn run(args: DaemonArgs) -> anyhow::Result<()> {
    // Before anything is created: a missing capability is named here, not found later as a
    // half-built network.
    crate::privileges::check()?;
    sluice_driver::link::set_proc_sys(args.proc_sys.clone());
    let ipam = IpamConfig::new(
        args.default_address_pool,
        args.default_pool_size,
        args.default_ipv6_pool,
        args.default_ipv6_pool_size,
    )
    .context("invalid default address pools")?;
    let store = Store::open(&args.state_dir).context("opening the state store")?;
    let name = match &args.name {
        Some(name) if !name.is_empty() => name.clone(),
        _ => plugin_name(&args.plugin_socket)?,
    };
    info!(name, scope = args.scope.as_str(), cluster_address = ?args.cluster_address.and_then(|a| a.0), "starting");
    let bpf_dir = args
        .bpf_dir
        .clone()
        .unwrap_or_else(|| PathBuf::from(DEFAULT_BPF_ROOT).join(&name));
    let datapath = Datapath::load(&DatapathConfig {
        fast_path: args.fast_path,
        ..DatapathConfig::pinned(&bpf_dir)
    })
    .with_context(|| {
        format!(
            "loading the eBPF datapath (pins under {}); sluice needs a kernel with BPF, BTF \
             and TCX (6.6 or later) and CAP_BPF + CAP_NET_ADMIN",
            bpf_dir.display()
        )
    })?;
    info!(pins = %bpf_dir.display(), "eBPF datapath ready");
    let kernel = LinuxKernel::new()
        .context("connecting to the kernel (netlink)")?
        .owned_by(&name)
        .with_datapath(datapath);
    // The drop-event reader is the kernel's until the kernel moves into the driver.
    let drop_events = kernel.drop_events().unwrap_or_else(|e| {
        warn!(error = %e, "drop events unavailable: `sluice flows` shows nothing");
        None
    });
    let mut driver = Driver::open(kernel, store, ipam)?
        .identify_from_options(args.docker_host == crate::cluster::NO_DOCKER_HOST)
        .with_link_pool(args.link_pool)
        .with_link_pool_max(args.link_pool_max);
    let cluster =
        crate::cluster::connect(&args.cluster, args.cluster_address, &args.state_dir).await?;
    if let Some(c) = &cluster {
        driver = driver.with_cluster(c.cluster());
    }
    let driver = Arc::new(driver);
    let flows = Arc::new(crate::observe::FlowLog::default());
    if let Some(events) = drop_events {
        crate::observe::spawn_drop_reader(events, driver.clone(), flows.clone());
    }

    let report = driver.reconcile().await;
    info!(
        networks = report.networks,
        repaired = report.endpoints_repaired,
        removed = ?report.removed_links,
        "reconciled kernel with state"
    );
    for e in &report.errors {
        warn!(error = %e, "reconciliation");
    }
    // After reconciliation, which removed the spare links of an earlier run.
    let driver_for_pool = driver.clone();
    let link_pool = tokio::spawn({
        let driver = driver.clone();
        async move { driver.run_link_pool().await }
    });
    let discovery = match cluster {
        Some(c) => c.start(driver.clone()).await,
        None => None,
    };

    let admin_socket = args
        .admin_socket
        .clone()
        .unwrap_or_else(|| admin::default_socket_for(&name));
    let admin_listener = admin::bind(&admin_socket)
        .await
        .context("binding the admin socket (--admin-socket)")?;
    let listener = match crate::server::bind(&args.plugin_socket).await {
        Ok(l) => l,
        Err(e) => {
            remove_socket(&admin_socket).await;
            return Err(e.into());
        }
    };
    info!(socket = %args.plugin_socket.display(), "serving Docker plugin API");
    info!(socket = %admin_socket.display(), "serving admin API");

    let resolver = if args.docker_host == crate::cluster::NO_DOCKER_HOST {
        info!(
            "--docker-host none: endpoints are identified by their options (sluice.name, sluice.label.*)"
        );
        None
    } else {
        start_resolver(&args.docker_host, driver.clone()).await
    };

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let signals = tokio::spawn(async move {
        shutdown_signal().await;
        let _ = stop_tx.send(true);
    });
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|stop| *stop).await;
    };
    tokio::spawn({
        let (flows, stop) = (flows.clone(), stopped(stop_rx.clone()));
        async move {
            stop.await;
            flows.close();
        }
    });
    let router = crate::swarm::with_scope(
        crate::server::router_with_discovery(driver.clone(), resolver, discovery),
        args.scope,
    );
    let plugin = axum::serve(listener, router).with_graceful_shutdown(stopped(stop_rx.clone()));
    let admin_api = axum::serve(admin_listener, admin::router_with_flows(driver, flows))
        .with_graceful_shutdown(stopped(stop_rx));
    let (served, admin_served) = tokio::join!(plugin.into_future(), admin_api.into_future());
    signals.abort();
    link_pool.abort();
    // Cancelled: it pushes no spare link after this (one it was making is removed by the
    // next start's reconciliation).
    let _cancelled = link_pool.await;
    for e in driver_for_pool.drain_link_pools().await {
        warn!(error = %e, "removing a spare link at shutdown");
    }
    remove_socket(&args.plugin_socket).await;
    remove_socket(&admin_socket).await;
    served.context("serving the plugin socket")?;
    admin_served.context("serving the admin socket")?;
    info!("stopped");
    Ok(())
}

/// Starts the identity resolver (after the sockets are bound: dockerd may need the plugin
/// while it starts) and feeds what it learns to the driver.
async fn start_resolver<K: sluice_driver::Kernel>(
    docker_host: &str,
    driver: Arc<Driver<K>>,
) -> Option<IdentityResolver> {
    let client = match EngineClient::from_docker_host(docker_host) {
        Ok(c) => c,
        Err(e) => {
            warn!(error = %e, "--docker-host: container names and labels cannot be resolved; driver-option labels (sluice.label.*) and CIDR rules still work");
            return None;
        }
    };
    let client_for_names = client.clone();
    let (resolver, mut identities) =
        IdentityResolver::start(client, ResolverConfig::default()).await;
    match resolver.availability() {
        Availability::Available => info!(
            docker_host,
            "Docker Engine API reachable: container identities resolved"
        ),
        Availability::Connecting => info!(docker_host, "connecting to the Docker Engine API"),
        Availability::Unavailable(reason) => warn!(
            docker_host,
            %reason,
            "Docker Engine API unreachable (retrying): container names and labels cannot be resolved; driver-option labels (sluice.label.*) and CIDR rules still work"
        ),
    }
    let names_client = client_for_names;
    tokio::spawn(async move {
        // Names of networks created while the daemon was away (or before names were kept).
        match names_client.network_names().await {
            Ok(names) => {
                if let Err(e) = driver.set_network_names(names).await {
                    warn!(error = %e, "applying network names");
                }
            }
            Err(e) => debug!(error = %e, "listing network names"),
        }
        while let Some(identity) = identities.recv().await {
            // A new container may be on a network created since the last lookup; names
            // must be current before its identity is resolved against `network:` selectors.
            match names_client.network_names().await {
                Ok(names) => {
                    if let Err(e) = driver.set_network_names(names).await {
                        warn!(error = %e, "applying network names");
                    }
                }
                Err(e) => debug!(error = %e, "listing network names"),
            }
            if let Err(e) = driver.set_container(identity).await {
                warn!(error = %e, "applying a container identity");
            }
        }
    });
    Some(resolver)
}

async fn remove_socket(path: &std::path::Path) {
    if let Err(e) = tokio::fs::remove_file(path).await {
        warn!(error = %e, socket = %path.display(), "removing socket");
    }
}

/// The driver name Docker knows the plugin by: the socket's file name without `.sock`.
fn plugin_name(socket: &std::path::Path) -> anyhow::Result<String> {
    socket
        .file_stem()
        .and_then(|s| s.to_str())
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .with_context(|| format!("cannot derive a plugin name from {}", socket.display()))
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (mut term, mut int) = match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(t), Ok(i)) => (t, i),
        (Err(e), _) | (_, Err(e)) => {
            error!(error = %e, "cannot listen for signals; stop with SIGKILL");
            return std::future::pending().await;
        }
    };
    tokio::select! {
        _ = term.recv() => info!("SIGTERM: shutting down"),
        _ = int.recv() => info!("SIGINT: shutting down"),
    }
}
