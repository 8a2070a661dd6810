//! macvlan mode (`-o mode=macvlan -o parent=IFACE[.VLAN] [-o macvlan_mode=bridge]`): each
//! endpoint is a macvlan link on the parent, so containers get addresses on the parent's LAN.
//! No Linux bridge, no gateway address on the host, no NAT: the LAN's router (the IPAM
//! gateway) is the way out.
//!
//! The parent may name an 802.1Q sub-interface (`eth0.10`): sluice creates it when missing,
//! marks it with the alias [`vlan_alias`] and records that on the networks using it, and removes
//! it with the last network that uses it; one it did not create is never removed.
//!
//! Policy: there is no host-side peer, so the eBPF programs go on the macvlan link itself
//! ([`crate::datapath::Datapath::attach_sandboxed`]), attached at CreateEndpoint while the link
//! is still in the host namespace. TCX links stay on a device across Docker's move into the
//! sandbox and its rename to `ethN` (checked on 6.18), so the link never carries a packet without
//! its programs, and Docker's create-then-move name race does not matter: sluice never looks the
//! link up by name after the move, only by the ifindex it recorded.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::names::MAX_IFNAME_LEN;

/// Option key naming the parent interface (`eth0`, or `eth0.10` for VLAN 10), Docker's name.
pub const OPT_PARENT: &str = "parent";
/// Option key for the macvlan mode (`bridge` by default), Docker's name.
pub const OPT_MACVLAN_MODE: &str = "macvlan_mode";
/// Alias sluice gives the VLAN sub-interfaces it creates (`ip link show` shows it, e.g.
/// `sluice:sluice/vlan` for the plugin called `sluice`): the mark that it may remove them.
#[must_use]
pub fn vlan_alias(owner: &str) -> String {
    format!("{owner}/vlan")
}
/// The macvlan modes sluice accepts (the kernel's, with Docker's spelling of passthrough).
pub const MODES: &[&str] = &["bridge", "private", "vepa", "passthru"];

/// A macvlan network's settings, persisted with the network.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MacvlanConfig {
    /// The interface the endpoints' macvlan links sit on (`eth0` or `eth0.10`).
    pub parent: String,
    /// For a VLAN parent: the underlying interface and the VLAN ID.
    pub vlan: Option<(String, u16)>,
    /// `bridge`, `private`, `vepa` or `passthru`.
    pub mode: String,
    /// sluice created the VLAN sub-interface (so it removes it with the last network using
    /// it). Filled in by [`crate::kernel::Kernel::ensure_parent`], not by the user.
    #[serde(default)]
    pub vlan_owned: bool,
}

impl MacvlanConfig {
    /// Reads `parent` and `macvlan_mode` from the network's options.
    ///
    /// # Errors
    /// A message for the user: no parent, a bad name or VLAN ID, an unknown mode.
    pub fn from_options(options: &BTreeMap<String, String>) -> Result<Self, String> {
        let parent = options
            .get(OPT_PARENT)
            .map(|p| p.trim().to_owned())
            .filter(|p| !p.is_empty())
            .ok_or_else(|| {
                "mode=macvlan needs -o parent=IFACE (an interface on the LAN, e.g. eth0) or \
                 -o parent=IFACE.VLAN (an 802.1Q sub-interface, created when missing)"
                    .to_owned()
            })?;
        if parent.len() > MAX_IFNAME_LEN || parent.contains(['/', ' ']) {
            return Err(format!(
                "parent {parent:?} is not a valid interface name (at most {MAX_IFNAME_LEN} bytes, no '/' or spaces)"
            ));
        }
        let vlan = match parent.rsplit_once('.') {
            Some((base, id)) if !base.is_empty() && id.chars().all(|c| c.is_ascii_digit()) => {
                let id: u16 = id
                    .parse()
                    .ok()
                    .filter(|id| (1..=4094).contains(id))
                    .ok_or_else(|| {
                        format!("parent {parent:?}: the VLAN ID must be between 1 and 4094")
                    })?;
                Some((base.to_owned(), id))
            }
            _ => None,
        };
        let mode = options
            .get(OPT_MACVLAN_MODE)
            .map_or("bridge", |m| m.trim())
            .to_owned();
        if !MODES.contains(&mode.as_str()) {
            return Err(format!(
                "{OPT_MACVLAN_MODE} must be one of {}, got {mode:?}",
                MODES.join(", ")
            ));
        }
        Ok(Self {
            parent,
            vlan,
            mode,
            vlan_owned: false,
        })
    }
}

/// The parent interface as the kernel should see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParentSpec {
    /// The interface the macvlan links go on.
    pub name: String,
    /// For a VLAN parent: the underlying interface and the VLAN ID (created when missing).
    pub vlan: Option<(String, u16)>,
}

impl From<&MacvlanConfig> for ParentSpec {
    fn from(c: &MacvlanConfig) -> Self {
        Self {
            name: c.parent.clone(),
            vlan: c.vlan.clone(),
        }
    }
}

/// One endpoint's macvlan link, created in the host namespace for Docker to move.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MacvlanSpec {
    /// Link name (Join's `SrcName`).
    pub name: String,
    /// The parent interface.
    pub parent: String,
    /// `bridge`, `private`, `vepa` or `passthru`.
    pub mode: String,
    /// The endpoint's MAC (`passthru` keeps the parent's).
    pub mac: [u8; 6],
    /// MTU, if the user set one.
    pub mtu: Option<u32>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn parent_and_mode_are_parsed() {
        let c = MacvlanConfig::from_options(&opts(&[("parent", "eth0")])).unwrap();
        assert_eq!(c.parent, "eth0");
        assert_eq!(c.vlan, None);
        assert_eq!(c.mode, "bridge");
        let c = MacvlanConfig::from_options(&opts(&[
            ("parent", "veth1.10"),
            ("macvlan_mode", "private"),
        ]))
        .unwrap();
        assert_eq!(c.vlan, Some(("veth1".to_owned(), 10)));
        assert_eq!(c.mode, "private");
        // A dot that is not a VLAN suffix is part of the name.
        let c = MacvlanConfig::from_options(&opts(&[("parent", "br.lan")])).unwrap();
        assert_eq!(c.vlan, None);
    }

    #[test]
    fn bad_input_gets_a_clear_error() {
        let e = MacvlanConfig::from_options(&opts(&[])).unwrap_err();
        assert!(e.contains("needs -o parent"), "{e}");
        let e = MacvlanConfig::from_options(&opts(&[("parent", "eth0.4095")])).unwrap_err();
        assert!(e.contains("between 1 and 4094"), "{e}");
        let e = MacvlanConfig::from_options(&opts(&[("parent", "eth0.0")])).unwrap_err();
        assert!(e.contains("between 1 and 4094"), "{e}");
        let e =
            MacvlanConfig::from_options(&opts(&[("parent", "averyveryverylongname")])).unwrap_err();
        assert!(e.contains("not a valid interface name"), "{e}");
        let e = MacvlanConfig::from_options(&opts(&[("parent", "eth0"), ("macvlan_mode", "x")]))
            .unwrap_err();
        assert!(e.contains("bridge, private, vepa, passthru"), "{e}");
    }
}

/// The driver's macvlan lifecycle against the fake kernel.
#[cfg(test)]
mod driver_tests {
    use std::collections::BTreeMap;

    use crate::datapath::layout::EP_INGRESS_ENFORCED;
    use crate::ipam::IpamConfig;
    use crate::kernel::fake::{FakeKernel, FakeLink};
    use crate::model::{EndpointRequest, IpData, Mode, NetworkRequest};
    use crate::store::Store;
    use crate::{Driver, DriverError, Kernel as _, names};

    const N1: &str = "aa11432b9218efa3a4cdb1c360f5d3859f2c76d21ec9701c194cb39579b6a3fc";
    const N2: &str = "bb22432b9218efa3a4cdb1c360f5d3859f2c76d21ec9701c194cb39579b6a3fc";
    const E1: &str = "0f987eed597ecf3c9843814cfa7aa94478a534ffdc9850a75ed7a99f8135266e";

    fn driver(dir: &std::path::Path) -> Driver<FakeKernel> {
        let store = Store::open(dir).unwrap();
        let kernel = FakeKernel::default();
        kernel.insert("lan0", FakeLink::Foreign);
        Driver::open(kernel, store, IpamConfig::default()).unwrap()
    }

    fn request(id: &str, opts: &[(&str, &str)]) -> NetworkRequest {
        NetworkRequest {
            id: id.into(),
            options: opts
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            internal: false,
            ipv6: false,
            ipv4: vec![IpData {
                pool: "10.78.0.0/24".parse().unwrap(),
                gateway: Some("10.78.0.1/24".parse().unwrap()),
                aux: BTreeMap::new(),
            }],
            ipv6_data: vec![],
        }
    }

    fn endpoint(nid: &str, eid: &str, addr: &str) -> EndpointRequest {
        EndpointRequest {
            network_id: nid.into(),
            endpoint_id: eid.into(),
            address: Some(addr.parse().unwrap()),
            address_v6: None,
            mac: None,
            options: BTreeMap::new(),
        }
    }

    #[tokio::test]
    async fn endpoint_is_a_macvlan_on_the_parent_with_sandbox_programs_and_no_nat() {
        let dir = tempfile::tempdir().unwrap();
        let d = driver(dir.path());
        d.create_network(request(N1, &[("mode", "macvlan"), ("parent", "lan0")]))
            .await
            .unwrap();
        let net = &d.networks().await[0];
        assert_eq!(net.mode, Mode::Macvlan);
        // No bridge, and nothing in sluice's nft table for it.
        assert!(!d.kernel().links().contains_key(&names::bridge(N1)));
        assert!(d.kernel().nat().unwrap().networks.is_empty());

        d.create_endpoint(endpoint(N1, E1, "10.78.0.5/24"))
            .await
            .unwrap();
        let link = names::macvlan(E1);
        assert!(
            matches!(d.kernel().links().get(&link), Some(FakeLink::Macvlan(m)) if m.parent == "lan0" && m.mode == "bridge" && m.mac == [2, 0x42, 10, 78, 0, 5])
        );
        let attached = d.kernel().attached();
        assert!(
            attached[&link].sandboxed,
            "programs go on the container's own link"
        );

        let join = d.join(N1, E1, "/var/run/docker/netns/abc").await.unwrap();
        assert_eq!(join.src_name, link);
        assert_eq!(join.gateway, Some("10.78.0.1".parse().unwrap()));

        // Published ports are not published (the container is on the LAN).
        d.program_external(
            N1,
            E1,
            vec![crate::nat::PortRequest {
                proto: crate::nat::Proto::Tcp,
                host_ip: None,
                host_port: 8080,
                host_port_end: 0,
                container_port: 80,
            }],
        )
        .await
        .unwrap();
        assert!(d.kernel().reserved_ports().is_empty());

        d.leave(N1, E1).await.unwrap();
        d.delete_endpoint(N1, E1).await.unwrap();
        assert!(!d.kernel().links().contains_key(&link));
        d.delete_network(N1).await.unwrap();
        // The parent is the user's: never removed.
        assert!(d.kernel().links().contains_key("lan0"));
    }

    #[tokio::test]
    async fn policy_flags_reach_a_macvlan_endpoint() {
        let dir = tempfile::tempdir().unwrap();
        let d = driver(dir.path());
        d.create_network(request(
            N1,
            &[
                ("mode", "macvlan"),
                ("parent", "lan0"),
                ("sluice.ingress", "deny"),
            ],
        ))
        .await
        .unwrap();
        d.create_endpoint(endpoint(N1, E1, "10.78.0.5/24"))
            .await
            .unwrap();
        let view = &d.kernel().attached()[&names::macvlan(E1)];
        assert!(view.sandboxed);
        assert_ne!(view.flags & EP_INGRESS_ENFORCED, 0);
    }

    #[tokio::test]
    async fn vlan_parent_is_created_shared_and_removed_with_the_last_network() {
        let dir = tempfile::tempdir().unwrap();
        let d = driver(dir.path());
        let opts = [("mode", "macvlan"), ("parent", "lan0.10")];
        d.create_network(request(N1, &opts)).await.unwrap();
        assert!(matches!(
            d.kernel().links().get("lan0.10"),
            Some(FakeLink::Vlan(true))
        ));
        // The same request again is a no-op, not a conflict.
        d.create_network(request(N1, &opts)).await.unwrap();
        let mut second = request(N2, &opts);
        second.ipv4[0].pool = "10.78.1.0/24".parse().unwrap();
        second.ipv4[0].gateway = Some("10.78.1.1/24".parse().unwrap());
        d.create_network(second).await.unwrap();
        assert!(
            d.networks()
                .await
                .iter()
                .all(|n| n.macvlan.as_ref().is_some_and(|m| m.vlan_owned))
        );

        d.delete_network(N1).await.unwrap();
        assert!(
            d.kernel().links().contains_key("lan0.10"),
            "still used by the second network"
        );
        // The ownership survives a restart (it is in the store).
        let kernel_links = d.kernel().links();
        drop(d);
        let store = Store::open(dir.path()).unwrap();
        let kernel = FakeKernel::default();
        for (name, link) in kernel_links {
            kernel.insert(&name, link);
        }
        let d = Driver::open(kernel, store, IpamConfig::default()).unwrap();
        d.delete_network(N2).await.unwrap();
        assert!(!d.kernel().links().contains_key("lan0.10"));
        assert!(d.kernel().links().contains_key("lan0"));
    }

    #[tokio::test]
    async fn vlan_parent_that_existed_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        let d = driver(dir.path());
        d.kernel().insert("lan0.20", FakeLink::Vlan(false));
        d.create_network(request(N1, &[("mode", "macvlan"), ("parent", "lan0.20")]))
            .await
            .unwrap();
        d.delete_network(N1).await.unwrap();
        assert!(d.kernel().links().contains_key("lan0.20"));
    }

    #[tokio::test]
    async fn missing_or_bad_parent_is_a_clear_error_and_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let d = driver(dir.path());
        let e = d
            .create_network(request(N1, &[("mode", "macvlan")]))
            .await
            .unwrap_err();
        assert!(e.is_client_error());
        assert!(e.to_string().contains("needs -o parent"), "{e}");
        let e = d
            .create_network(request(N1, &[("mode", "macvlan"), ("parent", "nope0")]))
            .await
            .unwrap_err();
        assert!(
            e.to_string()
                .contains("parent interface nope0 does not exist"),
            "{e}"
        );
        let e = d
            .create_network(request(N1, &[("mode", "macvlan"), ("parent", "nope0.5")]))
            .await
            .unwrap_err();
        assert!(
            e.to_string()
                .contains("parent interface nope0 does not exist"),
            "{e}"
        );
        let e = d
            .create_network(request(N1, &[("parent", "lan0")]))
            .await
            .unwrap_err();
        assert!(matches!(e, DriverError::InvalidOption(_)), "{e}");
        assert!(d.networks().await.is_empty());
        assert_eq!(d.kernel().links().len(), 1);
    }

    #[tokio::test]
    async fn failed_store_write_removes_the_vlan_sluice_made() {
        let dir = tempfile::tempdir().unwrap();
        let d = driver(dir.path());
        d.kernel().fail_after("apply_nat", "nft is broken");
        let e = d
            .create_network(request(N1, &[("mode", "macvlan"), ("parent", "lan0.30")]))
            .await
            .unwrap_err();
        assert!(e.to_string().contains("nft is broken"), "{e}");
        assert!(!d.kernel().links().contains_key("lan0.30"));
        assert!(d.networks().await.is_empty());
    }

    #[tokio::test]
    async fn reconcile_recreates_a_lost_vlan_and_keeps_macvlan_endpoints() {
        let dir = tempfile::tempdir().unwrap();
        let d = driver(dir.path());
        d.create_network(request(N1, &[("mode", "macvlan"), ("parent", "lan0.40")]))
            .await
            .unwrap();
        d.create_endpoint(endpoint(N1, E1, "10.78.0.5/24"))
            .await
            .unwrap();
        d.join(N1, E1, "/var/run/docker/netns/abc").await.unwrap();
        // Docker moved the link into the container: the host no longer sees it.
        d.kernel().delete_link(&names::macvlan(E1)).await.unwrap();
        d.kernel().delete_parent_vlan("lan0.40").await.unwrap();
        let report = d.reconcile().await;
        assert!(report.errors.is_empty(), "{:?}", report.errors);
        assert!(d.kernel().links().contains_key("lan0.40"));
        assert_eq!(report.endpoints_repaired, 0);
        assert!(report.removed_links.is_empty());
        assert!(d.kernel().attached()[&names::macvlan(E1)].sandboxed);
    }
}
