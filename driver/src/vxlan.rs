//! `mode=vxlan`: a bridge-mode network plus one VXLAN port on its bridge, so endpoints on
//! other hosts are one L2 hop away. Nothing is learnt by flooding: the device is created with
//! `nolearning proxy`, and every remote endpoint is programmed from the cluster store
//! (`crate::cluster`) as a forwarding-database entry (its MAC → its host's VTEP) and a
//! permanent neighbour entry (so the device answers ARP/ND for it locally).

use std::collections::BTreeMap;
use std::net::IpAddr;

use ipnetwork::IpNetwork;
use serde::{Deserialize, Serialize};

use crate::kernel::KernelError;
use crate::link::Netlink;

/// `-o vni=`: the VXLAN network identifier (1..=16777215); allocated when absent.
pub const OPT_VNI: &str = "vni";
/// `-o vxlan_port=`: the UDP port of the tunnel (4789 by default; the same on every host).
pub const OPT_VXLAN_PORT: &str = "vxlan_port";
/// `-o sluice.cluster-network=`: the network's cluster-wide name (default: its subnets).
pub const OPT_CLUSTER_NETWORK: &str = "sluice.cluster-network";
/// IANA's VXLAN port.
pub const DEFAULT_PORT: u16 = 4789;
/// Bytes the VXLAN encapsulation adds over IPv4 (outer IP 20 + UDP 8 + VXLAN 8 + Ethernet 14).
pub const OVERHEAD: u32 = 50;
/// Highest VNI (24 bits).
pub const MAX_VNI: u32 = (1 << 24) - 1;
/// Prefix of VXLAN device names (a sluice link: reconciliation knows it).
pub const DEVICE_PREFIX: &str = "slvx";

/// What a `mode=vxlan` network adds to a bridge network (stored with it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VxlanConfig {
    /// The network's cluster-wide name.
    pub cluster_network: String,
    /// The VNI (given or allocated cluster-wide).
    pub vni: u32,
    /// UDP port.
    pub port: u16,
    /// Name of the VXLAN device.
    pub device: String,
    /// This host's tunnel address (`--advertise-addr`).
    pub local: IpAddr,
}

/// The options of a `mode=vxlan` network, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VxlanOptions {
    /// `-o vni=`.
    pub vni: Option<u32>,
    /// `-o vxlan_port=`.
    pub port: u16,
    /// `-o sluice.cluster-network=`, or the subnets joined with `,`.
    pub cluster_network: String,
}

/// Parses the VXLAN options of a network (`options` are the `-o` options; `subnets` name the
/// network cluster-wide when no explicit name is given).
///
/// # Errors
/// A bad VNI, port or name, as a message for the user.
pub fn parse_options(
    options: &BTreeMap<String, String>,
    subnets: &[IpNetwork],
) -> Result<VxlanOptions, String> {
    let vni = options
        .get(OPT_VNI)
        .map(|v| match v.trim().parse::<u32>() {
            Ok(n) if (1..=MAX_VNI).contains(&n) => Ok(n),
            _ => Err(format!(
                "{OPT_VNI} must be a number between 1 and {MAX_VNI}, got {v:?}"
            )),
        })
        .transpose()?;
    let port = options
        .get(OPT_VXLAN_PORT)
        .map(|v| match v.trim().parse::<u16>() {
            Ok(n) if n != 0 => Ok(n),
            _ => Err(format!(
                "{OPT_VXLAN_PORT} must be a UDP port (1-65535), got {v:?}"
            )),
        })
        .transpose()?
        .unwrap_or(DEFAULT_PORT);
    let cluster_network = match options.get(OPT_CLUSTER_NETWORK) {
        Some(name) => {
            let ok = !name.is_empty()
                && name.len() <= 128
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
            if !ok {
                return Err(format!(
                    "{OPT_CLUSTER_NETWORK} must be 1-128 characters of letters, digits, '-', '_' or '.', got {name:?}"
                ));
            }
            name.clone()
        }
        None if subnets.is_empty() => {
            return Err(
                "mode=vxlan needs a --subnet (or -o sluice.cluster-network=NAME) to name the network across hosts"
                    .into(),
            );
        }
        None => subnets
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(","),
    };
    Ok(VxlanOptions {
        vni,
        port,
        cluster_network,
    })
}

/// Name of a network's VXLAN device (`slvx` + the start of its ID, like its bridge).
#[must_use]
pub fn device_name(network_id: &str) -> String {
    let room = crate::names::MAX_IFNAME_LEN - DEVICE_PREFIX.len();
    let id: String = network_id.chars().take(room).collect();
    format!("{DEVICE_PREFIX}{id}")
}

/// A VXLAN device as the kernel should have it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VxlanSpec {
    /// Device name.
    pub device: String,
    /// The bridge it is a port of.
    pub bridge: String,
    /// VNI.
    pub vni: u32,
    /// Local tunnel address.
    pub local: IpAddr,
    /// UDP port.
    pub port: u16,
    /// MTU (the network's).
    pub mtu: u32,
    /// The network's number (the fast path from the overlay delivers to its endpoints).
    pub network: u32,
}

/// A remote endpoint as one host's kernel needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemotePeer {
    /// The local VXLAN device of the network.
    pub device: String,
    /// The endpoint's MAC.
    pub mac: [u8; 6],
    /// Its host's tunnel address.
    pub vtep: IpAddr,
    /// Its addresses.
    pub addresses: Vec<IpNetwork>,
    /// Its cluster-wide identity.
    pub identity: u32,
    /// The local number of its network (for isolation).
    pub network: u32,
}

/// The MTU of the underlay link holding `local`, minus [`OVERHEAD`].
///
/// # Errors
/// No link holds `local`, or netlink failed.
pub async fn underlay_mtu(nl: &Netlink, local: IpAddr) -> Result<u32, KernelError> {
    match nl.link_of_address(local).await? {
        Some((_, mtu)) => Ok(mtu.saturating_sub(OVERHEAD)),
        None => Err(KernelError::Os {
            op: format!("find the underlay of {local}"),
            message: "no interface has this address (--advertise-addr)".into(),
        }),
    }
}

/// Creates (or adopts) the VXLAN device, puts it on the bridge and brings it up.
///
/// # Errors
/// Netlink failures; a device made here is removed again.
pub async fn ensure_device(nl: &Netlink, spec: &VxlanSpec) -> Result<(), KernelError> {
    let bridge = nl
        .link_index(&spec.bridge)
        .await?
        .ok_or_else(|| KernelError::Os {
            op: format!("attach {} to {}", spec.device, spec.bridge),
            message: "bridge missing".into(),
        })?;
    let created = if nl.link_index(&spec.device).await?.is_none() {
        let underlay = nl.link_of_address(spec.local).await?.map(|(i, _)| i);
        nl.create_vxlan(&spec.device, spec.vni, spec.local, spec.port, underlay)
            .await?;
        true
    } else {
        false
    };
    let result = async {
        let index = nl
            .link_index(&spec.device)
            .await?
            .ok_or_else(|| KernelError::Os {
                op: format!("configure {}", spec.device),
                message: "device vanished".into(),
            })?;
        nl.set_mtu(index, spec.mtu).await?;
        nl.set_controller(index, bridge).await?;
        nl.set_up(index).await
    }
    .await;
    if result.is_err() && created {
        let _ = nl.delete_link(&spec.device).await;
    }
    result
}

/// Programs a remote endpoint: FDB entry to its VTEP and a neighbour entry per address.
///
/// # Errors
/// Netlink failures (the device missing included).
pub async fn program_peer(nl: &Netlink, peer: &RemotePeer) -> Result<(), KernelError> {
    let index = device_index(nl, &peer.device).await?;
    nl.replace_fdb(index, peer.mac, peer.vtep).await?;
    // The bridge's own entry: it never learns remote MACs from frames the overlay fast path
    // delivers past it.
    nl.replace_port_fdb(index, peer.mac).await?;
    for a in &peer.addresses {
        nl.replace_neighbour(index, a.ip(), peer.mac).await?;
    }
    Ok(())
}

/// Removes what [`program_peer`] added. Idempotent; a missing device is fine.
///
/// # Errors
/// Netlink failures.
pub async fn remove_peer(nl: &Netlink, peer: &RemotePeer) -> Result<(), KernelError> {
    let Some(index) = nl.link_index(&peer.device).await? else {
        return Ok(());
    };
    let mut first = None;
    for a in &peer.addresses {
        if let Err(e) = nl.delete_neighbour(index, a.ip()).await {
            first.get_or_insert(e);
        }
    }
    if let Err(e) = nl.delete_fdb(index, peer.mac).await {
        first.get_or_insert(e);
    }
    if let Err(e) = nl.delete_port_fdb(index, peer.mac).await {
        first.get_or_insert(e);
    }
    first.map_or(Ok(()), Err)
}

async fn device_index(nl: &Netlink, device: &str) -> Result<u32, KernelError> {
    nl.link_index(device).await?.ok_or_else(|| KernelError::Os {
        op: format!("program {device}"),
        message: "VXLAN device missing".into(),
    })
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
    fn options_default_and_validate() {
        let subnet: IpNetwork = "10.80.0.0/24".parse().unwrap();
        let o = parse_options(&opts(&[]), &[subnet]).unwrap();
        assert_eq!(o.port, DEFAULT_PORT);
        assert_eq!(o.vni, None);
        assert_eq!(o.cluster_network, "10.80.0.0/24");
        let o = parse_options(
            &opts(&[
                ("vni", "42"),
                ("vxlan_port", "8472"),
                (OPT_CLUSTER_NETWORK, "blue"),
            ]),
            &[subnet],
        )
        .unwrap();
        assert_eq!(
            (o.vni, o.port, o.cluster_network.as_str()),
            (Some(42), 8472, "blue")
        );
        assert!(
            parse_options(&opts(&[("vni", "0")]), &[subnet])
                .unwrap_err()
                .contains("vni")
        );
        assert!(parse_options(&opts(&[("vni", "16777216")]), &[subnet]).is_err());
        assert!(parse_options(&opts(&[("vxlan_port", "x")]), &[subnet]).is_err());
        assert!(parse_options(&opts(&[(OPT_CLUSTER_NETWORK, "a/b")]), &[subnet]).is_err());
        assert!(
            parse_options(&opts(&[]), &[])
                .unwrap_err()
                .contains("--subnet")
        );
    }

    #[test]
    fn device_names_fit() {
        let name = device_name("5cdf432b9218efa3a4cdb1c360f5d385");
        assert_eq!(name, "slvx5cdf432b921");
        assert!(name.len() <= crate::names::MAX_IFNAME_LEN);
    }
}
