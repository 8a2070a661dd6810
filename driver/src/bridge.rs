//! Bridge mode on a real kernel: [`LinuxKernel`] implements [`Kernel`] with one Linux bridge
//! per network and one veth pair per endpoint, using [`Netlink`] for links and addresses,
//! `/proc/sys` for per-bridge forwarding, and [`Firewall`] for the `DOCKER-USER` rule.
//!
//! Owns the *order* of kernel steps and their rollback; owns no netlink message building
//! (that is [`crate::link`]) and no state (that is the driver's store).

use ipnetwork::IpNetwork;
use tracing::{debug, info, warn};

use std::sync::{Arc, Mutex};

use crate::datapath::layout::{EndpointInfo, IpInfo};
use crate::datapath::{CompiledPolicy, Datapath, DatapathError, EndpointCounters};
use crate::firewall::Firewall;
use crate::kernel::{
    BridgeSpec, EndpointDatapath, Kernel, KernelError, PoolLink, PoolLinkSpec, VethSpec,
};
use crate::link::{self, Netlink, format_mac, write_sysctl};
use crate::macvlan::{MacvlanSpec, ParentSpec};
use crate::names;
use crate::nat::{Nat, NatRuleset, PortBinding, PortRequest};
use crate::ports::PortReservations;

/// The [`Kernel`] of bridge mode, acting on the network namespace it was created in.
#[derive(Debug, Clone)]
pub struct LinuxKernel {
    nl: Netlink,
    firewall: Firewall,
    /// Alias put on every link this kernel creates or adopts; only links carrying it are
    /// listed by [`Kernel::sluice_links`], so two sluice daemons (with different plugin
    /// names) on one host never remove each other's links.
    owner: String,
    /// The loaded eBPF programs and maps; `None` until [`LinuxKernel::with_datapath`].
    datapath: Option<Arc<Mutex<Datapath>>>,
    /// sluice's nftables table (named after the plugin, like `owner`).
    nat: Nat,
    /// Sockets holding the host ports of published ports.
    ports: Arc<PortReservations>,
    /// Taken (asynchronously) around attaching programs outside the driver's lock: an
    /// attach blocks its thread in netlink requests while holding the datapath's mutex,
    /// so concurrent attaches queue here instead of blocking the runtime's workers there.
    attaching: Arc<tokio::sync::Mutex<()>>,
}

/// Alias of links owned by the daemon serving plugin `name`.
#[must_use]
pub fn owner_alias(name: &str) -> String {
    format!("sluice:{name}")
}

/// A stable, locally administered unicast MAC for a bridge, derived from its name (FNV-1a).
///
/// A bridge without an explicitly set MAC takes the lowest MAC among its ports and changes
/// it whenever ports join or leave (kernel `br_stp_recalculate_bridge_id`, seen with
/// `ip link add br0 type bridge; ip link set v1 master br0` on 6.18), which would leave
/// containers with a stale ARP entry for their gateway. Deriving it from the name keeps it
/// the same across re-creation, too.
#[must_use]
pub fn bridge_mac(name: &str) -> [u8; 6] {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in name.bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    let b = hash.to_be_bytes();
    // 0x02: locally administered, unicast.
    [0x02, b[3], b[4], b[5], b[6], b[7]]
}

/// The link group of the spare links of the pool of the bridge with ifindex `bridge_index`
/// (their container ends): unique per bridge in a namespace, so one `ip link del group G`
/// removes one network's spares and nothing else. `0x5100_0000` keeps clear of small,
/// hand-made group numbers.
#[must_use]
pub fn pool_group(bridge_index: u32) -> u32 {
    0x5100_0000 | (bridge_index & 0x00ff_ffff)
}

/// Merges the results of teardown steps that all ran: `Ok` if none failed, the error itself
/// if one did, [`KernelError::Many`] otherwise.
fn collect(results: impl IntoIterator<Item = Result<(), KernelError>>) -> Result<(), KernelError> {
    let mut errors: Vec<KernelError> = results.into_iter().filter_map(Result::err).collect();
    match errors.len() {
        0 => Ok(()),
        1 => Err(errors.remove(0)),
        _ => Err(KernelError::Many(errors)),
    }
}

/// The `ENDPOINTS` value of `ep`.
fn endpoint_info(ep: &EndpointDatapath) -> EndpointInfo {
    let v4 = ep.addresses.iter().find_map(|a| match a.ip() {
        std::net::IpAddr::V4(v4) => Some(v4.octets()),
        std::net::IpAddr::V6(_) => None,
    });
    let v6 = ep.addresses.iter().find_map(|a| match a.ip() {
        std::net::IpAddr::V6(v6) => Some(v6.octets()),
        std::net::IpAddr::V4(_) => None,
    });
    EndpointInfo::new(ep.identity, ep.network, ep.flags)
        .with_addresses(v4, v6)
        .with_subject(ep.subject)
}

/// The host route (`/32`, `/128`) of an endpoint address, for the ipcache.
fn host_route(address: IpNetwork) -> IpNetwork {
    let ip = address.ip();
    let prefix = if ip.is_ipv4() { 32 } else { 128 };
    IpNetwork::new(ip, prefix).unwrap_or(address)
}

/// Puts the host route of each of `addresses` into the ipcache with `identity` and `network`.
fn set_host_ips(
    dp: &mut Datapath,
    addresses: &[IpNetwork],
    identity: u32,
    network: u32,
) -> Result<(), DatapathError> {
    for address in addresses {
        dp.set_ip(host_route(*address), IpInfo { identity, network })?;
    }
    Ok(())
}

/// Writes `value` to `/proc/sys/<key>` unless it already holds it.
fn ensure_sysctl(key: &str, value: &str) -> Result<(), KernelError> {
    let current = std::fs::read_to_string(format!("/proc/sys/{key}")).unwrap_or_default();
    if current.trim() == value {
        return Ok(());
    }
    write_sysctl(key, value)?;
    info!("sysctl {}={value}", key.replace('/', "."));
    Ok(())
}

fn missing(op: String, what: &str) -> KernelError {
    KernelError::Os {
        op,
        message: format!("{what} does not exist"),
    }
}

impl LinuxKernel {
    /// Connects to the kernel of the calling thread's network namespace (see
    /// [`Netlink::connect`]) and finds the iptables tools ([`Firewall::new`]).
    ///
    /// # Errors
    /// [`KernelError::Os`] outside a tokio runtime or if netlink is unavailable.
    pub fn new() -> Result<Self, KernelError> {
        Ok(Self::with_parts(Netlink::connect()?, Firewall::new()))
    }

    /// Assembles a kernel from its parts (e.g. a [`Firewall`] with chosen tools).
    #[must_use]
    pub fn with_parts(nl: Netlink, firewall: Firewall) -> Self {
        Self {
            nl,
            firewall,
            owner: owner_alias("sluice"),
            datapath: None,
            nat: Nat::new("sluice"),
            ports: Arc::new(PortReservations::default()),
            attaching: Arc::default(),
        }
    }

    /// Gives the kernel its eBPF datapath; without one, attaching an endpoint fails (an
    /// endpoint never runs without its programs).
    #[must_use]
    pub fn with_datapath(mut self, datapath: Datapath) -> Self {
        self.datapath = Some(Arc::new(Mutex::new(datapath)));
        self
    }

    /// Reads the datapath (tests and tools inspect its maps through this).
    ///
    /// # Errors
    /// Without a datapath.
    pub fn inspect_datapath<T>(&self, f: impl FnOnce(&Datapath) -> T) -> Result<T, KernelError> {
        self.with_dp("inspect datapath", |dp| Ok(f(dp)))
    }

    /// Runs `f` on the datapath. Map and attach operations are short syscalls, so a
    /// blocking mutex is fine; it is never held across an `.await`.
    fn with_dp<T>(
        &self,
        op: &str,
        f: impl FnOnce(&mut Datapath) -> Result<T, DatapathError>,
    ) -> Result<T, KernelError> {
        let dp = self.datapath.as_ref().ok_or_else(|| KernelError::Os {
            op: op.to_owned(),
            message: "the eBPF datapath is not loaded".into(),
        })?;
        let mut guard = dp.lock().map_err(|_| KernelError::Os {
            op: op.to_owned(),
            message: "datapath lock poisoned by an earlier panic".into(),
        })?;
        f(&mut guard).map_err(|source| KernelError::Datapath {
            op: op.to_owned(),
            source: Box::new(source),
        })
    }

    /// Takes the datapath's drop-event reader (once; needs a tokio runtime). `None` without
    /// a datapath.
    ///
    /// # Errors
    /// When the reader was already taken or cannot be registered with the runtime.
    pub fn drop_events(&self) -> Result<Option<crate::datapath::DropEvents>, KernelError> {
        if self.datapath.is_none() {
            return Ok(None);
        }
        self.with_dp("take the drop-event reader", Datapath::drop_events)
            .map(Some)
    }

    /// Marks links as owned by the daemon serving plugin `name` (default `sluice`).
    #[must_use]
    pub fn owned_by(mut self, name: &str) -> Self {
        self.owner = owner_alias(name);
        self.nat = Nat::new(name);
        self
    }

    /// The name of this kernel's nftables table (`sluice_<plugin name>`).
    #[must_use]
    pub fn nat_table(&self) -> &str {
        self.nat.table()
    }

    /// The netlink connection, for callers that need lower-level queries.
    #[must_use]
    pub fn netlink(&self) -> &Netlink {
        &self.nl
    }

    /// The index of `name`, or an error naming it and the operation if it is missing.
    async fn require_index(&self, name: &str, op: &str) -> Result<u32, KernelError> {
        self.nl
            .link_index(name)
            .await?
            .ok_or_else(|| missing(op.to_owned(), &format!("link {name}")))
    }

    /// Attaches the endpoint programs to host veth `host` with no endpoint entry (a reused
    /// ifindex may have left one): it stays unregistered until its endpoint's entries are
    /// written. Returns its ifindex.
    async fn attach_unregistered(&self, host: &str, op: &str) -> Result<u32, KernelError> {
        let ifindex = self.require_index(host, op).await?;
        let _attaching = self.attaching.lock().await;
        self.with_dp(op, |dp| {
            dp.remove_endpoint(ifindex)?;
            dp.attach(ifindex)
        })?;
        Ok(ifindex)
    }

    /// Everything after creation; on failure the caller rolls back what it created.
    async fn configure_bridge(&self, spec: &BridgeSpec) -> Result<(), KernelError> {
        let name = spec.name.as_str();
        let index = self
            .require_index(name, &format!("configure bridge {name}"))
            .await?;
        self.nl.set_alias(index, &self.owner).await?;
        if let Some(mtu) = spec.mtu {
            self.nl.set_mtu(index, mtu).await?;
        }
        if spec.addresses.iter().any(IpNetwork::is_ipv6) {
            // New interfaces inherit `default.disable_ipv6`; with it set, adding an IPv6
            // address fails with EACCES.
            write_sysctl(&format!("net/ipv6/conf/{name}/disable_ipv6"), "0")?;
        }
        for address in &spec.addresses {
            self.nl.add_address(index, *address).await?;
        }
        if spec.internal {
            write_sysctl(&format!("net/ipv4/conf/{name}/forwarding"), "0")?;
            // Without IPv6 in the kernel there is nothing to forward.
            if link::proc_sys_path("net/ipv6/conf").exists() {
                write_sysctl(&format!("net/ipv6/conf/{name}/forwarding"), "0")?;
            }
        } else {
            // A way out needs routing, as Docker's bridge driver sets it (`--ip-forward`).
            // Written only when off: a write that changes it resets every interface's
            // forwarding flag, internal bridges' included (their nft fences still hold).
            ensure_sysctl("net/ipv4/ip_forward", "1")?;
            if spec.addresses.iter().any(IpNetwork::is_ipv6) {
                ensure_sysctl("net/ipv6/conf/all/forwarding", "1")?;
            }
            // The host's `curl localhost:PORT` to a published port is DNATed to the bridge
            // with its loopback source (then masqueraded): only routable with this. The nft
            // `raw` chain drops what containers send to 127.0.0.0/8 in return.
            write_sysctl(&format!("net/ipv4/conf/{name}/route_localnet"), "1")?;
        }
        self.nl.set_up(index).await?;
        self.firewall.allow_bridge(name, !spec.internal).await
    }

    async fn configure_veth(&self, spec: &VethSpec) -> Result<(), KernelError> {
        let VethSpec {
            host, peer, bridge, ..
        } = spec;
        let bridge_index = self.nl.link_index(bridge).await?.ok_or_else(|| {
            missing(
                format!("attach {host} to bridge {bridge}"),
                &format!("bridge {bridge}"),
            )
        })?;
        let host_index = self
            .require_index(host, &format!("configure veth {host}"))
            .await?;
        self.nl.set_alias(host_index, &self.owner).await?;
        match self.nl.link_index(peer).await? {
            Some(peer_index) => {
                self.nl.set_alias(peer_index, &self.owner).await?;
                if let Some(mtu) = spec.mtu {
                    self.nl.set_mtu(peer_index, mtu).await?;
                }
                self.nl.set_mac(peer_index, spec.peer_mac).await?;
            }
            // Adopting a pair whose container end Docker already moved into a sandbox:
            // that end is Docker's now.
            None => debug!(%peer, "veth peer not in this namespace; leaving it alone"),
        }
        if let Some(mtu) = spec.mtu {
            self.nl.set_mtu(host_index, mtu).await?;
        }
        self.nl.set_controller(host_index, bridge_index).await?;
        self.nl.set_up(host_index).await
    }

    /// Undo of a creation, after a later step failed: logs, never masks the original error.
    async fn roll_back(&self, name: &str, also_firewall: bool, cause: &KernelError) {
        warn!(%cause, link = name, "rolling back");
        if also_firewall && let Err(e) = self.firewall.remove_bridge(name).await {
            warn!(error = %e, bridge = name, "rollback: removing firewall rule failed");
        }
        match self.nl.delete_link(name).await {
            Ok(_) => info!("rollback: ip link del {name}"),
            Err(e) => warn!(error = %e, link = name, "rollback: deleting link failed"),
        }
    }
}

impl Kernel for LinuxKernel {
    async fn ensure_bridge(&self, spec: &BridgeSpec) -> Result<(), KernelError> {
        let name = spec.name.as_str();
        let created = if self.nl.link_index(name).await?.is_some() {
            debug!(bridge = name, "bridge exists; adopting");
            false
        } else {
            let mac = bridge_mac(name);
            match self.nl.create_bridge(name, Some(mac)).await {
                Ok(()) => {
                    info!(
                        "ip link add {name} address {} type bridge",
                        format_mac(&mac)
                    );
                    true
                }
                // Created concurrently since the lookup: adopt it.
                Err(e) if link::errno(&e) == Some(libc::EEXIST) => false,
                Err(e) => return Err(e),
            }
        };
        match self.configure_bridge(spec).await {
            Ok(()) => {
                info!(
                    bridge = name,
                    mtu = ?spec.mtu,
                    addresses = ?spec.addresses,
                    internal = spec.internal,
                    created,
                    "bridge ready"
                );
                Ok(())
            }
            Err(e) => {
                if created {
                    self.roll_back(name, true, &e).await;
                }
                Err(e)
            }
        }
    }

    async fn delete_bridge(&self, name: &str) -> Result<(), KernelError> {
        let firewall = self.firewall.remove_bridge(name).await;
        let link = match self.nl.delete_link(name).await {
            Ok(true) => {
                info!("ip link del {name}");
                Ok(())
            }
            Ok(false) => {
                debug!(bridge = name, "bridge already gone");
                Ok(())
            }
            Err(e) => Err(e),
        };
        collect([firewall, link])
    }

    async fn ensure_veth(&self, spec: &VethSpec) -> Result<(), KernelError> {
        let VethSpec { host, peer, .. } = spec;
        let bridge = &spec.bridge;
        let bridge_index = self.nl.link_index(bridge).await?.ok_or_else(|| {
            missing(
                format!("attach {host} to bridge {bridge}"),
                &format!("bridge {bridge}"),
            )
        })?;
        // Created configured (one request) unless a name is taken: the usual case costs no
        // look-ups first.
        let created = match self
            .nl
            .create_veth_ready(host, peer, spec.mtu, spec.peer_mac, bridge_index)
            .await
        {
            Ok(()) => true,
            Err(e) if link::errno(&e) == Some(libc::EEXIST) => false,
            Err(e) => return Err(e),
        };
        let created = created || {
            if self.nl.link_index(host).await?.is_none() {
                // A leftover container end without its host end cannot be adopted (the pair
                // is gone) and made creation fail with EEXIST; it is ours by name.
                if self.nl.delete_link(peer).await? {
                    warn!(%peer, "deleted a stale veth end before re-creating the pair");
                }
                self.nl
                    .create_veth_ready(host, peer, spec.mtu, spec.peer_mac, bridge_index)
                    .await?;
                true
            } else {
                false
            }
        };
        if created {
            // Only the ownership marks follow.
            let marked = async {
                self.nl.set_alias_by_name(host, &self.owner).await?;
                self.nl.set_alias_by_name(peer, &self.owner).await
            };
            if let Err(e) = marked.await {
                self.roll_back(host, false, &e).await;
                return Err(e);
            }
            info!(
                %host, %peer, bridge = %spec.bridge, mac = %format_mac(&spec.peer_mac),
                "veth ready: ip link add {host}{m} master {bridge} up type veth peer name {peer}{m} address {}",
                format_mac(&spec.peer_mac),
                m = spec.mtu.map(|m| format!(" mtu {m}")).unwrap_or_default()
            );
            return Ok(());
        }
        debug!(%host, "veth exists; adopting");
        self.configure_veth(spec).await?;
        info!(
            %host, %peer, bridge = %spec.bridge, mac = %format_mac(&spec.peer_mac),
            "veth adopted: ip link set {host} master {} up", spec.bridge
        );
        Ok(())
    }

    async fn delete_link(&self, name: &str) -> Result<(), KernelError> {
        // A VXLAN device carries the overlay fast path: its pinned link and map entry go too.
        if name.starts_with(crate::vxlan::DEVICE_PREFIX)
            && self.datapath.is_some()
            && let Some(index) = self.nl.link_index(name).await?
        {
            self.with_dp(&format!("detach the overlay fast path from {name}"), |dp| {
                dp.detach_overlay(index)
            })?;
        }
        if self.nl.delete_link(name).await? {
            info!("ip link del {name}");
        } else {
            debug!(link = name, "link already gone");
        }
        Ok(())
    }

    async fn attach_endpoint(&self, ep: &EndpointDatapath) -> Result<u32, KernelError> {
        let op = format!("attach datapath to {}", ep.host_veth);
        // A macvlan link that Docker has moved into the sandbox is no longer visible here; its
        // programs went with it, and it keeps its ifindex (see `crate::macvlan`): only its map
        // entries are updated.
        let moved = if ep.sandboxed && ep.ifindex != 0 {
            self.nl.link_index(&ep.host_veth).await? != Some(ep.ifindex)
        } else {
            false
        };
        let ifindex = if moved {
            ep.ifindex
        } else {
            self.require_index(&ep.host_veth, &op).await?
        };
        let info = endpoint_info(ep);
        self.with_dp(&op, |dp| {
            // Map entries first: the programs must find the endpoint from their first packet.
            if ep.sandboxed {
                dp.set_sandboxed_endpoint(ifindex, info)?;
            } else {
                dp.set_endpoint(ifindex, info)?;
            }
            set_host_ips(dp, &ep.addresses, ep.identity, ep.network)?;
            if moved {
                dp.refresh_sandboxed(ifindex)
            } else if ep.sandboxed {
                dp.attach_sandboxed(ifindex)
            } else {
                dp.attach(ifindex)
            }
        })?;
        debug!(veth = %ep.host_veth, ifindex, identity = ep.identity, flags = ep.flags, "datapath attached");
        Ok(ifindex)
    }

    async fn update_endpoint(&self, ep: &EndpointDatapath) -> Result<(), KernelError> {
        if ep.ifindex == 0 || ep.sandboxed {
            return self.attach_endpoint(ep).await.map(drop);
        }
        let op = format!("update datapath of {}", ep.host_veth);
        let info = endpoint_info(ep);
        self.with_dp(&op, |dp| {
            dp.set_endpoint(ep.ifindex, info)?;
            set_host_ips(dp, &ep.addresses, ep.identity, ep.network)?;
            Ok(())
        })?;
        debug!(veth = %ep.host_veth, ifindex = ep.ifindex, flags = ep.flags, subject = ep.subject, "datapath entries updated");
        Ok(())
    }

    async fn detach_endpoint(&self, ep: &EndpointDatapath) -> Result<(), KernelError> {
        let op = format!("detach datapath from {}", ep.host_veth);
        let ifindex = match ep.ifindex {
            0 => self.nl.link_index(&ep.host_veth).await?.unwrap_or(0),
            i => i,
        };
        self.with_dp(&op, |dp| {
            let mut first_error = None;
            for address in &ep.addresses {
                if let Err(e) = dp.remove_ip(host_route(*address)) {
                    first_error.get_or_insert(e);
                }
            }
            if ifindex != 0 {
                let detached = if ep.sandboxed {
                    dp.detach_sandboxed(ifindex)
                } else {
                    dp.detach(ifindex)
                };
                if let Err(e) = detached {
                    first_error.get_or_insert(e);
                }
                if let Err(e) = dp.remove_endpoint(ifindex) {
                    first_error.get_or_insert(e);
                }
            }
            first_error.map_or(Ok(()), Err)
        })
    }

    async fn attach_programs(&self, host: &str) -> Result<Option<u32>, KernelError> {
        if self.datapath.is_none() {
            return Ok(None);
        }
        let op = format!("attach datapath to {host}");
        self.attach_unregistered(host, &op).await.map(Some)
    }

    async fn make_pool_link(&self, spec: &PoolLinkSpec) -> Result<PoolLink, KernelError> {
        let PoolLinkSpec {
            host, peer, bridge, ..
        } = spec;
        let op = format!("create pool link {host}");
        let bridge_index = self.nl.link_index(bridge).await?.ok_or_else(|| {
            missing(
                format!("attach {host} to bridge {bridge}"),
                &format!("bridge {bridge}"),
            )
        })?;
        self.nl
            .create_pool_veth(host, peer, spec.mtu, bridge_index, pool_group(bridge_index))
            .await?;
        let made = async {
            self.nl.set_alias_by_name(host, &self.owner).await?;
            self.nl.set_alias_by_name(peer, &self.owner).await?;
            self.attach_unregistered(host, &op).await
        };
        match made.await {
            Ok(ifindex) => {
                debug!(%host, %peer, %bridge, ifindex, "pool link ready (up on the bridge, peer down, programs attached)");
                Ok(PoolLink {
                    host: host.clone(),
                    peer: peer.clone(),
                    ifindex,
                })
            }
            Err(e) => {
                let link = PoolLink {
                    host: host.clone(),
                    peer: peer.clone(),
                    ifindex: 0,
                };
                if let Err(undo) = self.delete_pool_link(&link).await {
                    warn!(error = %undo, %host, "rollback of pool link failed");
                }
                Err(e)
            }
        }
    }

    async fn claim_pool_link(&self, link: &PoolLink, spec: &VethSpec) -> Result<(), KernelError> {
        // The host end is up on the bridge already and keeps its name; only the container
        // end changes: out of the pool group (a bulk delete must not take it along) and to
        // the MAC Docker was told.
        if let Err(e) = self.nl.claim_pool_peer(&link.peer, spec.peer_mac).await {
            warn!(error = %e, pool = %link.host, "claiming a pool link failed; removing it");
            if let Err(undo) = self.delete_pool_link(link).await {
                warn!(error = %undo, link = %link.host, "removing a pool link failed");
            }
            return Err(e);
        }
        debug!(host = %link.host, peer = %link.peer, "pool link claimed");
        Ok(())
    }

    async fn activate_endpoint(&self, ep: &EndpointDatapath) -> Result<u32, KernelError> {
        if ep.ifindex == 0 || ep.sandboxed {
            return self.attach_endpoint(ep).await;
        }
        // The programs are attached and the link is up already (claim_pool_link): the
        // endpoint entry makes them enforce from the container's first packet.
        self.update_endpoint(ep).await?;
        debug!(veth = %ep.host_veth, ifindex = ep.ifindex, "endpoint from the link pool registered");
        Ok(ep.ifindex)
    }

    async fn delete_pool_link(&self, link: &PoolLink) -> Result<(), KernelError> {
        let ifindex = match link.ifindex {
            0 => self.nl.link_index(&link.host).await?.unwrap_or(0),
            i => i,
        };
        let detached = if ifindex == 0 || self.datapath.is_none() {
            Ok(())
        } else {
            self.with_dp(&format!("detach pool link {}", link.host), |dp| {
                dp.detach(ifindex)
            })
        };
        let deleted = self.nl.delete_link(&link.host).await.map(|gone| {
            if gone {
                debug!("ip link del {}", link.host);
            }
        });
        collect([detached, deleted])
    }

    async fn delete_pool_links(
        &self,
        bridges: &[String],
        links: &[PoolLink],
    ) -> Result<(), KernelError> {
        let mut results = Vec::new();
        // Programs first (tc filter deletes and unpins: no RCU grace period each).
        if self.datapath.is_some() {
            for link in links {
                let ifindex = match link.ifindex {
                    0 => self
                        .nl
                        .link_index(&link.host)
                        .await
                        .ok()
                        .flatten()
                        .unwrap_or(0),
                    i => i,
                };
                if ifindex != 0 {
                    results.push(
                        self.with_dp(&format!("detach pool link {}", link.host), |dp| {
                            dp.detach(ifindex)
                        }),
                    );
                }
            }
        }
        for bridge in bridges {
            match self.nl.link_index(bridge).await {
                Ok(Some(index)) => {
                    let group = pool_group(index);
                    match self.nl.delete_group(group).await {
                        Ok(true) => info!(%bridge, "ip link del group {group} (spare links)"),
                        Ok(false) => {}
                        Err(e) => results.push(Err(e)),
                    }
                }
                Ok(None) => {}
                Err(e) => results.push(Err(e)),
            }
        }
        // Whatever the groups did not hold (a bridge gone, a link of another group).
        for link in links {
            results.push(self.nl.delete_link(&link.host).await.map(drop));
        }
        collect(results)
    }

    async fn apply_policy(&self, compiled: &CompiledPolicy) -> Result<(), KernelError> {
        let update = self.with_dp("apply policy", |dp| dp.apply_policy(compiled))?;
        debug!(?update, "policy applied");
        Ok(())
    }

    async fn endpoint_counters(&self, host_veth: &str) -> Result<EndpointCounters, KernelError> {
        let op = format!("read counters of {host_veth}");
        let ifindex = self.require_index(host_veth, &op).await?;
        self.with_dp(&op, |dp| dp.read_counters(ifindex))
    }

    async fn apply_nat(&self, rules: &NatRuleset) -> Result<(), KernelError> {
        self.nat.apply(rules).await
    }

    async fn reserve_ports(
        &self,
        endpoint: &str,
        requests: &[PortRequest],
    ) -> Result<Vec<PortBinding>, KernelError> {
        self.ports.reserve(endpoint, requests)
    }

    async fn release_ports(&self, endpoint: &str) -> Result<(), KernelError> {
        self.ports.release(endpoint);
        Ok(())
    }

    async fn endpoint_counters_at(&self, ifindex: u32) -> Result<EndpointCounters, KernelError> {
        self.with_dp(&format!("read counters of ifindex {ifindex}"), |dp| {
            dp.read_counters(ifindex)
        })
    }

    async fn ensure_parent(&self, spec: &ParentSpec) -> Result<bool, KernelError> {
        let op = format!("macvlan parent {}", spec.name);
        let alias = crate::macvlan::vlan_alias(&self.owner);
        if let Some(existing) = self.nl.link_alias(&spec.name).await? {
            // Ours only if sluice marked it when it created it.
            return Ok(spec.vlan.is_some() && existing.as_deref() == Some(alias.as_str()));
        }
        let Some((base, id)) = &spec.vlan else {
            return Err(missing(op, &format!("parent interface {}", spec.name)));
        };
        let base_index = self
            .nl
            .link_index(base)
            .await?
            .ok_or_else(|| missing(op.clone(), &format!("parent interface {base}")))?;
        if let Err(e) = self
            .nl
            .create_vlan(&spec.name, base_index, *id, &alias)
            .await
        {
            if link::errno(&e) == Some(libc::EOPNOTSUPP) {
                return Err(KernelError::Os {
                    op,
                    message: format!(
                        "cannot create VLAN interface {name}: this kernel has no 802.1Q support \
                         (CONFIG_VLAN_8021Q, module 8021q); create {name} yourself, or use a \
                         parent without .VLAN",
                        name = spec.name
                    ),
                });
            }
            return Err(e);
        }
        info!("ip link add {} link {base} type vlan id {id}", spec.name);
        let up = match self.nl.link_index(&spec.name).await? {
            Some(index) => self.nl.set_up(index).await,
            None => Err(missing(op, &format!("link {}", spec.name))),
        };
        if let Err(e) = up {
            if let Err(undo) = self.nl.delete_link(&spec.name).await {
                warn!(error = %undo, vlan = %spec.name, "rollback of vlan failed");
            }
            return Err(e);
        }
        Ok(true)
    }

    async fn delete_parent_vlan(&self, name: &str) -> Result<(), KernelError> {
        let alias = crate::macvlan::vlan_alias(&self.owner);
        match self.nl.link_alias(name).await? {
            Some(Some(a)) if a == alias => {
                self.nl.delete_link(name).await?;
                info!("ip link del {name}");
            }
            Some(_) => info!(vlan = name, "VLAN interface not created by sluice; kept"),
            None => debug!(vlan = name, "VLAN interface already gone"),
        }
        Ok(())
    }

    async fn ensure_macvlan(&self, spec: &MacvlanSpec) -> Result<(), KernelError> {
        let op = format!("create macvlan {} on {}", spec.name, spec.parent);
        if self.nl.link_index(&spec.name).await?.is_some() {
            debug!(link = %spec.name, "macvlan exists; adopted");
            return Ok(());
        }
        let parent = self.require_index(&spec.parent, &op).await?;
        // passthru takes over the parent's MAC; the others get the endpoint's own.
        let mac = (spec.mode != "passthru").then_some(spec.mac);
        self.nl
            .create_macvlan(&spec.name, parent, &spec.mode, mac, spec.mtu)
            .await?;
        let index = self.require_index(&spec.name, &op).await?;
        if let Err(e) = self.nl.set_alias(index, &self.owner).await {
            if let Err(undo) = self.nl.delete_link(&spec.name).await {
                warn!(error = %undo, link = %spec.name, "rollback of macvlan failed");
            }
            return Err(e);
        }
        info!(
            "ip link add {} link {} type macvlan mode {}",
            spec.name, spec.parent, spec.mode
        );
        Ok(())
    }

    async fn sluice_links(&self) -> Result<Vec<String>, KernelError> {
        let mut links: Vec<String> = self
            .nl
            .link_aliases()
            .await?
            .into_iter()
            .filter(|(n, alias)| {
                names::is_sluice_link(n) && alias.as_deref() == Some(self.owner.as_str())
            })
            .map(|(n, _)| n)
            .collect();
        links.sort();
        Ok(links)
    }

    async fn vxlan_mtu(&self, local: std::net::IpAddr) -> Result<u32, KernelError> {
        crate::vxlan::underlay_mtu(&self.nl, local).await
    }

    async fn ensure_vxlan(&self, spec: &crate::vxlan::VxlanSpec) -> Result<(), KernelError> {
        crate::vxlan::ensure_device(&self.nl, spec).await?;
        let op = format!("mark {}", spec.device);
        let index = self.require_index(&spec.device, &op).await?;
        self.nl.set_alias(index, &self.owner).await?;
        // The fast path: frames for local endpoints skip the bridge, and with an IPv4
        // underlay the programs encapsulate and decapsulate themselves.
        let mut tunnel = sluice_common::Tunnel {
            device: index,
            vni: spec.vni,
            port: spec.port,
            ..sluice_common::Tunnel::default()
        };
        if let std::net::IpAddr::V4(local) = spec.local
            && let Some((underlay, mtu)) = self.nl.link_of_address(spec.local).await?
        {
            tunnel.underlay = underlay;
            tunnel.mtu = mtu;
            tunnel.local = local.octets();
        }
        self.with_dp(
            &format!("attach the overlay fast path to {}", spec.device),
            |dp| dp.attach_overlay(spec.network, tunnel),
        )
    }

    async fn program_remote(&self, peer: &crate::vxlan::RemotePeer) -> Result<(), KernelError> {
        crate::vxlan::program_peer(&self.nl, peer).await?;
        // Traffic from the remote endpoint meets policy and isolation with its identity.
        self.with_dp("ipcache of a remote endpoint", |dp| {
            set_host_ips(dp, &peer.addresses, peer.identity, peer.network)?;
            for a in &peer.addresses {
                dp.set_vtep(a.ip(), peer.network, peer.vtep)?;
            }
            Ok(())
        })
    }

    async fn remove_remote(&self, peer: &crate::vxlan::RemotePeer) -> Result<(), KernelError> {
        let ipcache = self.with_dp("ipcache of a remote endpoint", |dp| {
            let mut first = None;
            for a in &peer.addresses {
                if let Err(e) = dp.remove_vtep(a.ip()) {
                    first.get_or_insert(e);
                }
                if let Err(e) = dp.remove_ip(host_route(*a)) {
                    first.get_or_insert(e);
                }
            }
            first.map_or(Ok(()), Err)
        });
        let links = crate::vxlan::remove_peer(&self.nl, peer).await;
        collect([ipcache, links])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bridge_mac_is_stable_local_unicast_and_distinct() {
        let a = bridge_mac("slbr5cdf432b921");
        assert_eq!(a, bridge_mac("slbr5cdf432b921"));
        assert_ne!(a, bridge_mac("slbr5cdf432b922"));
        assert_eq!(a[0] & 0b11, 0b10, "locally administered, unicast");
    }

    fn os(op: &str) -> KernelError {
        KernelError::Os {
            op: op.into(),
            message: "boom".into(),
        }
    }

    #[test]
    fn collect_keeps_every_error() {
        assert!(collect([Ok(()), Ok(())]).is_ok());
        let one = collect([Ok(()), Err(os("a"))]).unwrap_err();
        assert_eq!(one.to_string(), "a: boom");
        let many = collect([Err(os("a")), Err(os("b"))]).unwrap_err();
        assert!(matches!(&many, KernelError::Many(v) if v.len() == 2));
        assert_eq!(many.to_string(), "a: boom; b: boom");
    }
}
