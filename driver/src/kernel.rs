//! The kernel side of the driver, as a trait, so the protocol and state logic can be tested
//! without root against a fake, and the real implementation ([`crate::bridge::LinuxKernel`])
//! can be tested on its own in a throwaway network namespace.

use std::future::Future;

use ipnetwork::IpNetwork;

use crate::datapath::{CompiledPolicy, DatapathError, EndpointCounters};
use crate::macvlan::{MacvlanSpec, ParentSpec};
use crate::nat::{NatRuleset, PortBinding, PortRequest};
use crate::vxlan::{RemotePeer, VxlanSpec};
use std::net::IpAddr;

/// A bridge-mode network as the kernel should see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BridgeSpec {
    /// Bridge name (≤ 15 bytes).
    pub name: String,
    /// MTU of the bridge, if set.
    pub mtu: Option<u32>,
    /// Gateway addresses to assign, with prefix.
    pub addresses: Vec<IpNetwork>,
    /// `--internal`: forwarding off on the bridge.
    pub internal: bool,
}

/// One endpoint's veth pair.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VethSpec {
    /// Host end, attached to `bridge`.
    pub host: String,
    /// Container end, left in the host namespace for Docker to move.
    pub peer: String,
    /// The bridge the host end joins.
    pub bridge: String,
    /// MTU for both ends.
    pub mtu: Option<u32>,
    /// MAC of the container end.
    pub peer_mac: [u8; 6],
}

/// A spare veth pair of a network's warm link pool ([`Kernel::make_pool_link`]): host end on
/// the bridge and up, programs attached, no endpoint entry, container end down (so no
/// carrier) and in the pool's link group. An endpoint that claims it keeps its names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolLink {
    /// Host end (on the bridge).
    pub host: String,
    /// Container end.
    pub peer: String,
    /// Ifindex of the host end (where the programs and their pins are); 0 when unknown.
    pub ifindex: u32,
}

/// What a pool link is made for: its names, its network's bridge and MTU.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolLinkSpec {
    /// Host end name ([`crate::names::pool_host`]).
    pub host: String,
    /// Container end name ([`crate::names::pool_peer`]).
    pub peer: String,
    /// The bridge the host end joins.
    pub bridge: String,
    /// MTU for both ends.
    pub mtu: Option<u32>,
}

/// An endpoint as the eBPF datapath sees it: the programs on its host veth, its entry in
/// the endpoints map and its addresses in the ipcache.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointDatapath {
    /// Host end of the veth pair, where the programs attach.
    pub host_veth: String,
    /// Its ifindex when known (0 otherwise): detaching works after the link is gone.
    pub ifindex: u32,
    /// Security identity.
    pub identity: u32,
    /// Policy subject (`EndpointInfo::subject`): shared by the endpoints the same policies
    /// select; 0 when none does.
    pub subject: u32,
    /// Network number (non-zero).
    pub network: u32,
    /// `EP_*` flags of `sluice_common`.
    pub flags: u32,
    /// The endpoint's addresses (host routes in the ipcache).
    pub addresses: Vec<IpNetwork>,
    /// macvlan: `host_veth` is the container's own interface (no host-side peer); the
    /// programs go on it with the directions swapped, and once Docker has moved it into the
    /// sandbox only the map entries are updated (found by `ifindex`, not by name).
    pub sandboxed: bool,
}

/// Errors from the kernel side.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    /// A netlink request failed.
    #[error("{op}: {source}")]
    Netlink {
        /// What was being done, e.g. `create bridge slbr123`.
        op: String,
        /// The underlying error.
        #[source]
        source: rtnetlink::Error,
    },
    /// A file (sysctl) or command failed.
    #[error("{op}: {message}")]
    Os {
        /// What was being done.
        op: String,
        /// Why it failed.
        message: String,
    },
    /// The eBPF datapath refused.
    #[error("{op}: {source}")]
    Datapath {
        /// What was being done.
        op: String,
        /// The datapath error (boxed: it is large, and errors travel by value).
        #[source]
        source: Box<DatapathError>,
    },
    /// Several teardown steps failed; all were attempted.
    #[error("{}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
    Many(Vec<KernelError>),
}

/// What the driver needs from the kernel. Every method is idempotent: creating what exists
/// adopts and reconfigures it, deleting what is gone succeeds. Creation rolls back what it
/// made when a later step fails.
pub trait Kernel: Send + Sync + 'static {
    /// Creates (or adopts) the bridge, sets MTU, addresses, forwarding and brings it up.
    /// Also lets traffic between the bridge's ports through the host firewall and, unless
    /// the network is internal, traffic out of the bridge and back (`DOCKER-USER`), with
    /// IP forwarding on and `route_localnet` on the bridge.
    fn ensure_bridge(
        &self,
        spec: &BridgeSpec,
    ) -> impl Future<Output = Result<(), KernelError>> + Send;

    /// Deletes the bridge and its firewall rule. Idempotent.
    fn delete_bridge(&self, name: &str) -> impl Future<Output = Result<(), KernelError>> + Send;

    /// Creates (or adopts) the veth pair, host end on the bridge and up, peer with its MAC.
    fn ensure_veth(&self, spec: &VethSpec) -> impl Future<Output = Result<(), KernelError>> + Send;

    /// Deletes a link by name (deleting one veth end removes both). Idempotent.
    fn delete_link(&self, name: &str) -> impl Future<Output = Result<(), KernelError>> + Send;

    /// Names of all links in the host namespace that sluice could have created
    /// ([`crate::names::is_sluice_link`]).
    fn sluice_links(&self) -> impl Future<Output = Result<Vec<String>, KernelError>> + Send;

    /// Registers the endpoint with the datapath (endpoints map, ipcache) and attaches the
    /// programs to its host veth; returns the veth's ifindex. Idempotent; also how flags are
    /// updated. An endpoint whose programs cannot be attached must not be used: the caller
    /// rolls back.
    fn attach_endpoint(
        &self,
        ep: &EndpointDatapath,
    ) -> impl Future<Output = Result<u32, KernelError>> + Send;

    /// Attaches the endpoint programs to the new host veth `host` before the endpoint is
    /// registered (as for a pool link: no endpoint entry yet; the container end is not in a
    /// container before Join, so nothing flows), so that the attach is not done under the
    /// driver's lock. Returns its ifindex; then [`Kernel::update_endpoint`] registers it.
    /// `None`: this kernel attaches in [`Kernel::attach_endpoint`] only (the default).
    fn attach_programs(
        &self,
        host: &str,
    ) -> impl Future<Output = Result<Option<u32>, KernelError>> + Send {
        let _unused = host;
        async { Ok(None) }
    }

    /// Rewrites the map entries of an endpoint whose programs are attached already (new
    /// flags or policy subject), without touching its programs: attaching costs RCU grace
    /// periods in the kernel, a map write does not. By default the same as
    /// [`Kernel::attach_endpoint`].
    fn update_endpoint(
        &self,
        ep: &EndpointDatapath,
    ) -> impl Future<Output = Result<(), KernelError>> + Send {
        async move { self.attach_endpoint(ep).await.map(drop) }
    }

    /// Detaches the programs and removes the endpoint's map entries. Idempotent; carries on
    /// past errors.
    fn detach_endpoint(
        &self,
        ep: &EndpointDatapath,
    ) -> impl Future<Output = Result<(), KernelError>> + Send;

    /// Warm link pool: creates a veth pair with its host end on `spec.bridge` and up, the MTU
    /// set, the container end down in the bridge's pool link group (see
    /// [`Kernel::delete_pool_links`]) and the endpoint programs attached (and pinned)
    /// without an endpoint entry: it passes nothing until [`Kernel::activate_endpoint`] (and
    /// has no carrier before its container end is up in a container). Everything a claim
    /// would otherwise pay in rtnl time is paid here, off the request path. Rolls back on
    /// failure.
    fn make_pool_link(
        &self,
        spec: &PoolLinkSpec,
    ) -> impl Future<Output = Result<PoolLink, KernelError>> + Send {
        let op = format!("create pool link {}", spec.host);
        async move { Err(unsupported(&op)) }
    }

    /// Warm link pool: turns pool link `link` into the endpoint pair `spec`, whose names are
    /// the link's own (no rename: an endpoint records its pool names): takes the container
    /// end out of the pool group and gives it `spec.peer_mac`, one rtnl request. On failure
    /// the link is removed (programs and pins too).
    fn claim_pool_link(
        &self,
        link: &PoolLink,
        spec: &VethSpec,
    ) -> impl Future<Output = Result<(), KernelError>> + Send {
        let op = format!("claim pool link {} as {}", link.host, spec.host);
        async move { Err(unsupported(&op)) }
    }

    /// Registers an endpoint made from a claimed pool link (programs attached already,
    /// `ep.ifindex` known): writes its map entries. Returns the ifindex. By default the
    /// same as [`Kernel::attach_endpoint`].
    fn activate_endpoint(
        &self,
        ep: &EndpointDatapath,
    ) -> impl Future<Output = Result<u32, KernelError>> + Send {
        self.attach_endpoint(ep)
    }

    /// Removes an unclaimed pool link: its programs and pins, then the pair. Idempotent
    /// (`ifindex` 0: looked up by name).
    fn delete_pool_link(
        &self,
        link: &PoolLink,
    ) -> impl Future<Output = Result<(), KernelError>> + Send {
        self.delete_link(&link.host)
    }

    /// Removes unclaimed pool links in bulk (network delete, shutdown, restart): the
    /// programs and pins of `links`, then every spare link in the pool group of each of
    /// `bridges` in one request per bridge (the kernel unregisters a group together: one RCU
    /// grace period, not one per link), then whichever of `links` is left. Idempotent;
    /// carries on past errors. By default one [`Kernel::delete_pool_link`] per link.
    fn delete_pool_links(
        &self,
        bridges: &[String],
        links: &[PoolLink],
    ) -> impl Future<Output = Result<(), KernelError>> + Send {
        let _ = bridges;
        async move {
            let mut errors = Vec::new();
            for link in links {
                if let Err(e) = self.delete_pool_link(link).await {
                    errors.push(e);
                }
            }
            match errors.len() {
                0 => Ok(()),
                1 => Err(errors.remove(0)),
                _ => Err(KernelError::Many(errors)),
            }
        }
    }

    /// Makes the policy map exactly `compiled`.
    fn apply_policy(
        &self,
        compiled: &CompiledPolicy,
    ) -> impl Future<Output = Result<(), KernelError>> + Send;

    /// Packets and bytes allowed and dropped, per direction, for the endpoint on `host_veth`.
    fn endpoint_counters(
        &self,
        host_veth: &str,
    ) -> impl Future<Output = Result<EndpointCounters, KernelError>> + Send;

    /// Makes sluice's own nftables table hold exactly `rules` (outbound masquerade,
    /// published ports, internal fences; see [`crate::nat`]), in one transaction; an empty
    /// ruleset removes the table.
    fn apply_nat(&self, rules: &NatRuleset)
    -> impl Future<Output = Result<(), KernelError>> + Send;

    /// Reserves a host port for each request on behalf of `endpoint` (replacing what it
    /// held), all or nothing; returns the ports chosen.
    fn reserve_ports(
        &self,
        endpoint: &str,
        requests: &[PortRequest],
    ) -> impl Future<Output = Result<Vec<PortBinding>, KernelError>> + Send;

    /// Gives up the host ports of `endpoint`. Idempotent.
    fn release_ports(&self, endpoint: &str)
    -> impl Future<Output = Result<(), KernelError>> + Send;

    /// Like [`Kernel::endpoint_counters`], for the endpoint whose programs sit on `ifindex`
    /// (a macvlan link inside its container, not visible by name in the host namespace).
    fn endpoint_counters_at(
        &self,
        ifindex: u32,
    ) -> impl Future<Output = Result<EndpointCounters, KernelError>> + Send;

    /// macvlan: checks that the parent interface exists; a missing VLAN sub-interface is
    /// created (marked [`crate::macvlan::vlan_alias`]) on an existing base and brought up.
    /// Returns whether sluice owns the VLAN sub-interface (created it now or before).
    fn ensure_parent(
        &self,
        spec: &ParentSpec,
    ) -> impl Future<Output = Result<bool, KernelError>> + Send;

    /// macvlan: removes the VLAN sub-interface `name` if sluice created it (its alias says
    /// so); one that sluice did not create is left alone. Idempotent.
    fn delete_parent_vlan(
        &self,
        name: &str,
    ) -> impl Future<Output = Result<(), KernelError>> + Send;

    /// macvlan: creates (or adopts) an endpoint's macvlan link in the host namespace, down.
    fn ensure_macvlan(
        &self,
        spec: &MacvlanSpec,
    ) -> impl Future<Output = Result<(), KernelError>> + Send;
    /// `mode=vxlan`: the MTU networks get by default (the MTU of the link holding `local`,
    /// the tunnel address, minus [`crate::vxlan::OVERHEAD`]).
    fn vxlan_mtu(&self, local: IpAddr) -> impl Future<Output = Result<u32, KernelError>> + Send {
        async move { Err(unsupported(&format!("vxlan underlay of {local}"))) }
    }

    /// `mode=vxlan`: creates (or adopts) the network's VXLAN device as a port of its bridge.
    fn ensure_vxlan(
        &self,
        spec: &VxlanSpec,
    ) -> impl Future<Output = Result<(), KernelError>> + Send {
        let op = format!("create vxlan {}", spec.device);
        async move { Err(unsupported(&op)) }
    }

    /// `mode=vxlan`: programs an endpoint of another host: forwarding and neighbour entries
    /// on the VXLAN device, its addresses with its identity and network in the ipcache.
    /// Idempotent (replaces).
    fn program_remote(
        &self,
        peer: &RemotePeer,
    ) -> impl Future<Output = Result<(), KernelError>> + Send {
        let op = format!("program remote {:?}", peer.addresses);
        async move { Err(unsupported(&op)) }
    }

    /// Removes what [`Kernel::program_remote`] added. Idempotent.
    fn remove_remote(
        &self,
        peer: &RemotePeer,
    ) -> impl Future<Output = Result<(), KernelError>> + Send {
        let op = format!("remove remote {:?}", peer.addresses);
        async move { Err(unsupported(&op)) }
    }
}

fn unsupported(op: &str) -> KernelError {
    KernelError::Os {
        op: op.to_owned(),
        message: "not supported by this kernel implementation".into(),
    }
}

/// An in-memory [`Kernel`] for tests of the protocol and state logic without root. It
/// records the links that exist and can be told to fail the next operation.
#[cfg(any(test, feature = "fake-kernel"))]
pub mod fake {
    use std::collections::BTreeMap;
    use std::sync::Mutex;

    use super::{
        BridgeSpec, EndpointDatapath, Kernel, KernelError, PoolLink, PoolLinkSpec, VethSpec,
    };
    use crate::datapath::{CompiledPolicy, EndpointCounters};
    use crate::macvlan::{MacvlanSpec, ParentSpec};
    use crate::nat::{NatRuleset, PortBinding, PortRequest, Proto};

    /// A link the fake kernel holds.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub enum FakeLink {
        /// A bridge.
        Bridge(BridgeSpec),
        /// The host end of a veth pair.
        VethHost(VethSpec),
        /// The container end of a veth pair.
        VethPeer(String),
        /// A VLAN sub-interface; `true` when sluice created it.
        Vlan(bool),
        /// An interface sluice did not create (a LAN interface, say).
        Foreign,
        /// An endpoint's macvlan link.
        Macvlan(MacvlanSpec),
    }

    /// The fake.
    #[derive(Debug, Default)]
    pub struct FakeKernel {
        links: Mutex<BTreeMap<String, FakeLink>>,
        fail_next: Mutex<Option<String>>,
        fail_op: Mutex<Option<(String, String)>>,
        attached: Mutex<BTreeMap<String, EndpointDatapath>>,
        policy: Mutex<Option<CompiledPolicy>>,
        /// `POLICY` entries written and removed so far, as a real kernel's diff would.
        policy_writes: Mutex<(usize, usize)>,
        /// Calls of [`Kernel::apply_policy`] so far.
        policy_applies: std::sync::atomic::AtomicUsize,
        nat: Mutex<Option<NatRuleset>>,
        ports: Mutex<BTreeMap<String, Vec<PortBinding>>>,
        taken: Mutex<Vec<(Proto, u16)>>,
        remotes: Mutex<BTreeMap<String, crate::vxlan::RemotePeer>>,
        /// Pool links with programs attached but no endpoint, by host end.
        pooled: Mutex<BTreeMap<String, PoolLink>>,
        /// Host ends brought up by [`Kernel::activate_endpoint`].
        activated: Mutex<Vec<String>>,
        /// Calls of [`Kernel::delete_pool_links`]: how many links each removed.
        pool_deletes: Mutex<Vec<usize>>,
    }

    impl FakeKernel {
        /// Makes the next operation fail with `message`.
        pub fn fail_next(&self, message: &str) {
            if let Ok(mut f) = self.fail_next.lock() {
                *f = Some(message.to_owned());
            }
        }

        /// Makes the next call of operation `op` (e.g. `attach_endpoint`) fail with `message`.
        pub fn fail_after(&self, op: &str, message: &str) {
            if let Ok(mut f) = self.fail_op.lock() {
                *f = Some((op.to_owned(), message.to_owned()));
            }
        }

        /// The links that exist now.
        #[must_use]
        pub fn links(&self) -> BTreeMap<String, FakeLink> {
            self.links.lock().map(|l| l.clone()).unwrap_or_default()
        }

        /// Remote endpoints programmed (`mode=vxlan`), by MAC.
        #[must_use]
        pub fn remotes(&self) -> BTreeMap<String, crate::vxlan::RemotePeer> {
            self.remotes.lock().map(|r| r.clone()).unwrap_or_default()
        }

        /// Endpoints with programs attached, by host veth.
        #[must_use]
        pub fn attached(&self) -> BTreeMap<String, EndpointDatapath> {
            self.attached.lock().map(|a| a.clone()).unwrap_or_default()
        }

        /// Pool links with programs attached and no endpoint, by host end.
        #[must_use]
        pub fn pooled(&self) -> BTreeMap<String, PoolLink> {
            self.pooled.lock().map(|p| p.clone()).unwrap_or_default()
        }

        /// Calls of [`Kernel::delete_pool_links`] so far: the links each was given.
        #[must_use]
        pub fn pool_deletes(&self) -> Vec<usize> {
            self.pool_deletes
                .lock()
                .map(|p| p.clone())
                .unwrap_or_default()
        }

        /// Host ends of endpoints made from pool links, in activation order.
        #[must_use]
        pub fn activated(&self) -> Vec<String> {
            self.activated.lock().map(|a| a.clone()).unwrap_or_default()
        }

        /// The last policy written.
        #[must_use]
        pub fn policy(&self) -> Option<CompiledPolicy> {
            self.policy.lock().ok().and_then(|p| p.clone())
        }

        /// Calls of [`Kernel::apply_policy`] so far (each follows a full resolution).
        #[must_use]
        pub fn policy_applies(&self) -> usize {
            self.policy_applies
                .load(std::sync::atomic::Ordering::Relaxed)
        }

        /// `POLICY` entries written (new or changed) and removed by every apply so far:
        /// what the datapath's diff against its mirror would write.
        #[must_use]
        pub fn policy_writes(&self) -> (usize, usize) {
            self.policy_writes.lock().map(|w| *w).unwrap_or_default()
        }

        /// The last NAT ruleset written (`None`: never written).
        #[must_use]
        pub fn nat(&self) -> Option<NatRuleset> {
            self.nat.lock().ok().and_then(|n| n.clone())
        }

        /// Host ports reserved, per endpoint.
        #[must_use]
        pub fn reserved_ports(&self) -> BTreeMap<String, Vec<PortBinding>> {
            self.ports.lock().map(|p| p.clone()).unwrap_or_default()
        }

        /// Marks a host port as used by some other process.
        pub fn take_port(&self, proto: Proto, port: u16) {
            if let Ok(mut t) = self.taken.lock() {
                t.push((proto, port));
            }
        }

        /// Adds a link behind sluice's back (a leftover from a crash, say).
        pub fn insert(&self, name: &str, link: FakeLink) {
            if let Ok(mut l) = self.links.lock() {
                l.insert(name.to_owned(), link);
            }
        }

        fn check(&self, op: &str) -> Result<(), KernelError> {
            let targeted = self.fail_op.lock().ok().and_then(|mut f| {
                if f.as_ref().is_some_and(|(o, _)| o == op) {
                    f.take().map(|(_, m)| m)
                } else {
                    None
                }
            });
            let failure =
                targeted.or_else(|| self.fail_next.lock().ok().and_then(|mut f| f.take()));
            match failure {
                Some(message) => Err(KernelError::Os {
                    op: op.to_owned(),
                    message,
                }),
                None => Ok(()),
            }
        }

        fn with_links<T>(&self, f: impl FnOnce(&mut BTreeMap<String, FakeLink>) -> T) -> T {
            match self.links.lock() {
                Ok(mut l) => f(&mut l),
                Err(poisoned) => f(&mut poisoned.into_inner()),
            }
        }
    }

    impl Kernel for FakeKernel {
        async fn ensure_bridge(&self, spec: &BridgeSpec) -> Result<(), KernelError> {
            self.check("ensure_bridge")?;
            self.with_links(|l| l.insert(spec.name.clone(), FakeLink::Bridge(spec.clone())));
            Ok(())
        }

        async fn delete_bridge(&self, name: &str) -> Result<(), KernelError> {
            self.check("delete_bridge")?;
            self.with_links(|l| l.remove(name));
            Ok(())
        }

        async fn ensure_veth(&self, spec: &VethSpec) -> Result<(), KernelError> {
            self.check("ensure_veth")?;
            self.with_links(|l| {
                if !l.contains_key(&spec.bridge) {
                    return Err(KernelError::Os {
                        op: format!("attach {} to {}", spec.host, spec.bridge),
                        message: "no such bridge".into(),
                    });
                }
                l.insert(spec.host.clone(), FakeLink::VethHost(spec.clone()));
                l.insert(spec.peer.clone(), FakeLink::VethPeer(spec.host.clone()));
                Ok(())
            })
        }

        async fn delete_link(&self, name: &str) -> Result<(), KernelError> {
            self.check("delete_link")?;
            self.with_links(|l| {
                if let Some(FakeLink::VethHost(spec)) = l.remove(name) {
                    l.remove(&spec.peer);
                }
                l.retain(|_, v| !matches!(v, FakeLink::VethPeer(host) if host == name));
            });
            Ok(())
        }

        async fn sluice_links(&self) -> Result<Vec<String>, KernelError> {
            self.check("sluice_links")?;
            Ok(self.with_links(|l| {
                l.keys()
                    .filter(|n| crate::names::is_sluice_link(n))
                    .cloned()
                    .collect()
            }))
        }

        async fn attach_endpoint(&self, ep: &EndpointDatapath) -> Result<u32, KernelError> {
            self.check("attach_endpoint")?;
            let index = self.with_links(|l| {
                l.keys()
                    .position(|k| *k == ep.host_veth)
                    .and_then(|i| u32::try_from(i + 1).ok())
            });
            // A macvlan link moved into its container: known by its ifindex.
            let index = index.or((ep.sandboxed && ep.ifindex != 0).then_some(ep.ifindex));
            let Some(index) = index else {
                return Err(KernelError::Os {
                    op: format!("attach programs to {}", ep.host_veth),
                    message: "no such link".into(),
                });
            };
            if let Ok(mut a) = self.attached.lock() {
                a.insert(ep.host_veth.clone(), ep.clone());
            }
            Ok(index)
        }

        async fn detach_endpoint(&self, ep: &EndpointDatapath) -> Result<(), KernelError> {
            self.check("detach_endpoint")?;
            if let Ok(mut a) = self.attached.lock() {
                a.remove(&ep.host_veth);
            }
            Ok(())
        }

        async fn apply_policy(&self, compiled: &CompiledPolicy) -> Result<(), KernelError> {
            self.check("apply_policy")?;
            self.policy_applies
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            if let Ok(mut p) = self.policy.lock() {
                let old = p.take().unwrap_or_default();
                let written = compiled
                    .entries
                    .iter()
                    .filter(|(e, v)| old.entries.get(e) != Some(v))
                    .count();
                let removed = old
                    .entries
                    .keys()
                    .filter(|e| !compiled.entries.contains_key(e))
                    .count();
                if let Ok(mut w) = self.policy_writes.lock() {
                    w.0 += written;
                    w.1 += removed;
                }
                *p = Some(compiled.clone());
            }
            Ok(())
        }

        async fn endpoint_counters(
            &self,
            _host_veth: &str,
        ) -> Result<EndpointCounters, KernelError> {
            self.check("endpoint_counters")?;
            Ok(EndpointCounters::default())
        }

        async fn apply_nat(&self, rules: &NatRuleset) -> Result<(), KernelError> {
            self.check("apply_nat")?;
            if let Ok(mut n) = self.nat.lock() {
                *n = Some(rules.clone());
            }
            Ok(())
        }

        async fn reserve_ports(
            &self,
            endpoint: &str,
            requests: &[PortRequest],
        ) -> Result<Vec<PortBinding>, KernelError> {
            self.check("reserve_ports")?;
            let taken = self.taken.lock().map(|t| t.clone()).unwrap_or_default();
            let mut ports = match self.ports.lock() {
                Ok(p) => p,
                Err(poisoned) => poisoned.into_inner(),
            };
            ports.remove(endpoint);
            let in_use = |proto: Proto, port: u16, got: &[PortBinding]| {
                taken.contains(&(proto, port))
                    || got.iter().any(|b| b.proto == proto && b.host_port == port)
                    || ports
                        .values()
                        .flatten()
                        .any(|b| b.proto == proto && b.host_port == port)
            };
            let mut got = Vec::new();
            for req in requests {
                let (first, last) = if req.host_port == 0 {
                    (49153, 65535)
                } else {
                    (req.host_port, req.host_port_end.max(req.host_port))
                };
                let Some(port) = (first..=last).find(|p| !in_use(req.proto, *p, &got)) else {
                    return Err(KernelError::Os {
                        op: format!("publish port {}/{}", req.host_port, req.proto),
                        message: format!(
                            "Bind for 0.0.0.0:{} failed: port is already allocated",
                            req.host_port
                        ),
                    });
                };
                got.push(PortBinding {
                    proto: req.proto,
                    host_ip: req.host_ip,
                    host_port: port,
                    container_port: req.container_port,
                });
            }
            if !got.is_empty() {
                ports.insert(endpoint.to_owned(), got.clone());
            }
            Ok(got)
        }

        async fn release_ports(&self, endpoint: &str) -> Result<(), KernelError> {
            self.check("release_ports")?;
            if let Ok(mut p) = self.ports.lock() {
                p.remove(endpoint);
            }
            Ok(())
        }

        async fn endpoint_counters_at(
            &self,
            _ifindex: u32,
        ) -> Result<EndpointCounters, KernelError> {
            self.check("endpoint_counters")?;
            Ok(EndpointCounters::default())
        }

        async fn ensure_parent(&self, spec: &ParentSpec) -> Result<bool, KernelError> {
            self.check("ensure_parent")?;
            self.with_links(|l| {
                let missing = |name: &str| KernelError::Os {
                    op: format!("macvlan parent {}", spec.name),
                    message: format!("parent interface {name} does not exist"),
                };
                match (l.get(&spec.name), &spec.vlan) {
                    (Some(FakeLink::Vlan(owned)), _) => Ok(*owned),
                    (Some(_), _) => Ok(false),
                    (None, None) => Err(missing(&spec.name)),
                    (None, Some((base, _))) => {
                        if !l.contains_key(base) {
                            return Err(missing(base));
                        }
                        l.insert(spec.name.clone(), FakeLink::Vlan(true));
                        Ok(true)
                    }
                }
            })
        }

        async fn delete_parent_vlan(&self, name: &str) -> Result<(), KernelError> {
            self.check("delete_parent_vlan")?;
            self.with_links(|l| {
                if matches!(l.get(name), Some(FakeLink::Vlan(true))) {
                    l.remove(name);
                }
            });
            Ok(())
        }

        async fn ensure_macvlan(&self, spec: &MacvlanSpec) -> Result<(), KernelError> {
            self.check("ensure_macvlan")?;
            self.with_links(|l| {
                if !l.contains_key(&spec.parent) {
                    return Err(KernelError::Os {
                        op: format!("create macvlan {} on {}", spec.name, spec.parent),
                        message: "no such parent".into(),
                    });
                }
                l.insert(spec.name.clone(), FakeLink::Macvlan(spec.clone()));
                Ok(())
            })
        }

        async fn vxlan_mtu(&self, _local: std::net::IpAddr) -> Result<u32, KernelError> {
            self.check("vxlan_mtu")?;
            Ok(1450)
        }

        async fn ensure_vxlan(&self, spec: &crate::vxlan::VxlanSpec) -> Result<(), KernelError> {
            self.check("ensure_vxlan")?;
            self.with_links(|l| {
                l.insert(spec.device.clone(), FakeLink::VethPeer(spec.bridge.clone()))
            });
            Ok(())
        }

        async fn program_remote(&self, peer: &crate::vxlan::RemotePeer) -> Result<(), KernelError> {
            self.check("program_remote")?;
            if let Ok(mut r) = self.remotes.lock() {
                r.insert(crate::model::format_mac(&peer.mac), peer.clone());
            }
            Ok(())
        }

        async fn remove_remote(&self, peer: &crate::vxlan::RemotePeer) -> Result<(), KernelError> {
            self.check("remove_remote")?;
            if let Ok(mut r) = self.remotes.lock() {
                r.remove(&crate::model::format_mac(&peer.mac));
            }
            Ok(())
        }

        async fn make_pool_link(&self, spec: &PoolLinkSpec) -> Result<PoolLink, KernelError> {
            self.check("make_pool_link")?;
            self.ensure_veth(&VethSpec {
                host: spec.host.clone(),
                peer: spec.peer.clone(),
                bridge: spec.bridge.clone(),
                mtu: spec.mtu,
                peer_mac: [0; 6],
            })
            .await?;
            let ifindex = self.with_links(|l| {
                l.keys()
                    .position(|k| *k == spec.host)
                    .and_then(|i| u32::try_from(i + 1).ok())
                    .unwrap_or(0)
            });
            let link = PoolLink {
                host: spec.host.clone(),
                peer: spec.peer.clone(),
                ifindex,
            };
            if let Ok(mut p) = self.pooled.lock() {
                p.insert(link.host.clone(), link.clone());
            }
            Ok(link)
        }

        async fn claim_pool_link(
            &self,
            link: &PoolLink,
            spec: &VethSpec,
        ) -> Result<(), KernelError> {
            if let Err(e) = self.check("claim_pool_link") {
                self.delete_pool_link(link).await?;
                return Err(e);
            }
            if let Ok(mut p) = self.pooled.lock() {
                p.remove(&link.host);
            }
            self.with_links(|l| {
                l.remove(&link.host);
                l.remove(&link.peer);
                l.insert(spec.host.clone(), FakeLink::VethHost(spec.clone()));
                l.insert(spec.peer.clone(), FakeLink::VethPeer(spec.host.clone()));
            });
            Ok(())
        }

        async fn activate_endpoint(&self, ep: &EndpointDatapath) -> Result<u32, KernelError> {
            self.check("activate_endpoint")?;
            if let Ok(mut a) = self.attached.lock() {
                a.insert(ep.host_veth.clone(), ep.clone());
            }
            if let Ok(mut a) = self.activated.lock() {
                a.push(ep.host_veth.clone());
            }
            Ok(ep.ifindex)
        }

        async fn delete_pool_link(&self, link: &PoolLink) -> Result<(), KernelError> {
            self.check("delete_pool_link")?;
            if let Ok(mut p) = self.pooled.lock() {
                p.remove(&link.host);
            }
            self.delete_link(&link.host).await
        }

        async fn delete_pool_links(
            &self,
            _bridges: &[String],
            links: &[PoolLink],
        ) -> Result<(), KernelError> {
            self.check("delete_pool_links")?;
            if let Ok(mut d) = self.pool_deletes.lock() {
                d.push(links.len());
            }
            for link in links {
                if let Ok(mut p) = self.pooled.lock() {
                    p.remove(&link.host);
                }
                self.delete_link(&link.host).await?;
            }
            Ok(())
        }
    }
}
