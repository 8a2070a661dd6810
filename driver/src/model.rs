//! Domain types: what sluice knows about networks and endpoints. These are what the store
//! persists; the plugin's wire types are separate and convert into the request types here.

use std::collections::BTreeMap;
use std::net::IpAddr;

use ipnetwork::IpNetwork;
use serde::{Deserialize, Serialize};

/// Option key for the MTU, Docker's own name.
pub const OPT_MTU: &str = "com.docker.network.driver.mtu";
/// Option key for the mode.
pub const OPT_MODE: &str = "mode";
/// Option key for network isolation (`true` by default).
pub const OPT_ISOLATE: &str = "sluice.isolate";
/// Option key for the network's default ingress verdict (`allow` by default, or `deny`).
pub const OPT_INGRESS: &str = "sluice.ingress";
/// Option key turning outbound IPv4 masquerade off (`false`), Docker's own name.
pub const OPT_MASQUERADE: &str = "com.docker.network.bridge.enable_ip_masquerade";
/// Option key turning outbound IPv6 masquerade on (`true`; IPv6 is routed, not NATed, by
/// default).
pub const OPT_IPV6_NAT: &str = "sluice.ipv6-nat";

/// How a network connects its endpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// A Linux bridge per network and a veth pair per endpoint.
    #[default]
    Bridge,
    /// A macvlan link per endpoint on a parent interface (see [`crate::macvlan`]).
    Macvlan,
    /// Bridge mode plus a VXLAN port on the bridge: one network across hosts
    /// (`sluice daemon --cluster`, docs/multi-host.md).
    Vxlan,
}

impl std::str::FromStr for Mode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "bridge" | "" => Ok(Self::Bridge),
            "macvlan" => Ok(Self::Macvlan),
            "vxlan" => Ok(Self::Vxlan),
            other => Err(format!(
                "unknown mode {other:?} (supported: bridge, macvlan, vxlan)"
            )),
        }
    }
}

/// One address family's IPAM data for a network, as Docker hands it over.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IpData {
    /// The pool (subnet).
    pub pool: IpNetwork,
    /// Gateway address with the pool's prefix length, if one was reserved.
    pub gateway: Option<IpNetwork>,
    /// Auxiliary addresses (`--aux-address name=ip`).
    #[serde(default)]
    pub aux: BTreeMap<String, IpAddr>,
}

/// What `CreateNetwork` asks for, decoded and validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkRequest {
    /// Docker's network ID.
    pub id: String,
    /// `com.docker.network.generic`: the user's `-o` options.
    pub options: BTreeMap<String, String>,
    /// `--internal`.
    pub internal: bool,
    /// `--ipv6`.
    pub ipv6: bool,
    /// IPv4 pools.
    pub ipv4: Vec<IpData>,
    /// IPv6 pools.
    pub ipv6_data: Vec<IpData>,
}

/// A network sluice owns.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Network {
    /// Docker's network ID.
    pub id: String,
    /// Mode (`-o mode=`).
    pub mode: Mode,
    /// Name of the Linux bridge.
    pub bridge: String,
    /// MTU for the bridge and the veths, if the user set one.
    pub mtu: Option<u32>,
    /// `--internal`: no default route, no forwarding out of the network.
    pub internal: bool,
    /// IPv4 pools.
    pub ipv4: Vec<IpData>,
    /// IPv6 pools.
    pub ipv6: Vec<IpData>,
    /// The user's options as given, for `sluice` status output and later modes.
    pub options: BTreeMap<String, String>,
    /// Small number the datapath knows the network by (non-zero, unique on this host).
    #[serde(default)]
    pub number: u32,
    /// Docker's name of the network, once learnt from the Engine API (Docker never sends
    /// it to plugins); kept so that policies naming the network survive restarts.
    #[serde(default)]
    pub name: Option<String>,
    /// Endpoints cannot talk to endpoints of other sluice networks (`-o sluice.isolate`).
    #[serde(default = "default_true")]
    pub isolate: bool,
    /// Ingress is default-deny for every endpoint (`-o sluice.ingress=deny`).
    #[serde(default)]
    pub ingress_deny: bool,
    /// Outbound IPv4 is masqueraded to the host's address (`-o
    /// com.docker.network.bridge.enable_ip_masquerade`, on by default; never on internal
    /// networks).
    #[serde(default = "default_true")]
    pub masquerade: bool,
    /// Outbound IPv6 is masqueraded too (`-o sluice.ipv6-nat=true`).
    #[serde(default)]
    pub ipv6_nat: bool,
    /// macvlan mode's parent interface and mode (`None` in other modes).
    #[serde(default)]
    pub macvlan: Option<crate::macvlan::MacvlanConfig>,
    /// `mode=vxlan`: the VXLAN port and the cluster-wide name (docs/multi-host.md).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vxlan: Option<crate::vxlan::VxlanConfig>,
}

fn default_true() -> bool {
    true
}

impl Network {
    /// Gateway addresses (with prefix) to put on the bridge.
    pub fn gateway_addresses(&self) -> impl Iterator<Item = IpNetwork> + '_ {
        self.ipv4
            .iter()
            .chain(self.ipv6.iter())
            .filter_map(|d| d.gateway)
    }
}

/// What `CreateEndpoint` asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointRequest {
    /// Docker's network ID.
    pub network_id: String,
    /// Docker's endpoint ID.
    pub endpoint_id: String,
    /// IPv4 address with prefix, allocated by IPAM before the call.
    pub address: Option<IpNetwork>,
    /// IPv6 address with prefix.
    pub address_v6: Option<IpNetwork>,
    /// MAC from `Interface.MacAddress` or the endpoint options; `None` lets sluice choose.
    pub mac: Option<[u8; 6]>,
    /// Endpoint driver options that are strings (`--driver-opt k=v`).
    pub options: BTreeMap<String, String>,
}

/// What sluice answers to `CreateEndpoint`: only what Docker did not already set.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct EndpointCreated {
    /// The MAC sluice chose, when Docker gave none.
    pub mac: Option<[u8; 6]>,
}

/// An endpoint sluice owns.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Endpoint {
    /// Docker's endpoint ID.
    pub id: String,
    /// Network it belongs to.
    pub network_id: String,
    /// Host end of the veth pair (on the bridge).
    pub host_veth: String,
    /// Container end, moved by Docker into the sandbox at Join.
    pub peer_veth: String,
    /// IPv4 address with prefix.
    pub address: Option<IpNetwork>,
    /// IPv6 address with prefix.
    pub address_v6: Option<IpNetwork>,
    /// MAC of the container end.
    pub mac: [u8; 6],
    /// Endpoint driver options.
    #[serde(default)]
    pub options: BTreeMap<String, String>,
    /// The sandbox (netns path) once joined.
    pub sandbox_key: Option<String>,
    /// Security identity in the datapath (unique on this host, from 256).
    #[serde(default)]
    pub identity: u32,
    /// Index of the host veth, for detaching after the link is gone.
    #[serde(default)]
    pub ifindex: u32,
    /// The container, once resolved from the Docker Engine API.
    #[serde(default)]
    pub container: Option<ContainerIdentity>,
    /// Published ports (`docker run -p`), with the host ports sluice reserved; set by
    /// ProgramExternalConnectivity, cleared by RevokeExternalConnectivity.
    #[serde(default)]
    pub published: Vec<crate::nat::PortBinding>,
}

/// What `Join` answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JoinInfo {
    /// The link Docker moves into the sandbox.
    pub src_name: String,
    /// Docker renames it to this prefix plus an index.
    pub dst_prefix: String,
    /// IPv4 default gateway (none on internal networks).
    pub gateway: Option<IpAddr>,
    /// IPv6 default gateway.
    pub gateway_v6: Option<IpAddr>,
}

/// Formats a MAC the usual way (`02:42:0a:00:00:02`).
#[must_use]
pub fn format_mac(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Parses `aa:bb:cc:dd:ee:ff`.
///
/// # Errors
/// A message naming the bad input.
pub fn parse_mac(s: &str) -> Result<[u8; 6], String> {
    let parts: Vec<&str> = s.split([':', '-']).collect();
    if parts.len() != 6 {
        return Err(format!("invalid MAC address {s:?}"));
    }
    let mut mac = [0u8; 6];
    for (byte, part) in mac.iter_mut().zip(parts) {
        *byte = u8::from_str_radix(part, 16).map_err(|_| format!("invalid MAC address {s:?}"))?;
    }
    Ok(mac)
}

/// Docker's convention for a locally administered MAC: `02:42` and the IPv4 address; without
/// one, bytes of the endpoint ID.
#[must_use]
pub fn derive_mac(address: Option<IpNetwork>, endpoint_id: &str) -> [u8; 6] {
    if let Some(IpNetwork::V4(v4)) = address {
        let o = v4.ip().octets();
        return [0x02, 0x42, o[0], o[1], o[2], o[3]];
    }
    let mut mac = [0x02, 0x42, 0, 0, 0, 0];
    let hex: Vec<u8> = endpoint_id
        .as_bytes()
        .chunks(2)
        .filter_map(|c| std::str::from_utf8(c).ok())
        .filter_map(|c| u8::from_str_radix(c, 16).ok())
        .take(4)
        .collect();
    for (slot, b) in mac[2..].iter_mut().zip(hex) {
        *slot = b;
    }
    mac
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mac_round_trip_and_derivation() {
        let mac = parse_mac("02:42:0a:14:00:05").unwrap();
        assert_eq!(format_mac(&mac), "02:42:0a:14:00:05");
        assert!(parse_mac("02:42:0a").is_err());
        assert!(parse_mac("zz:42:0a:14:00:05").is_err());
        let a: IpNetwork = "10.20.0.5/24".parse().unwrap();
        assert_eq!(derive_mac(Some(a), "x"), mac);
        assert_eq!(
            derive_mac(None, "0f987eed59"),
            [2, 0x42, 0x0f, 0x98, 0x7e, 0xed]
        );
    }

    #[test]
    fn modes() {
        assert_eq!("bridge".parse::<Mode>(), Ok(Mode::Bridge));
        assert_eq!("macvlan".parse::<Mode>(), Ok(Mode::Macvlan));
        assert_eq!("vxlan".parse::<Mode>(), Ok(Mode::Vxlan));
        assert!(
            "bogus"
                .parse::<Mode>()
                .unwrap_err()
                .contains("unknown mode")
        );
    }
}

/// Who an endpoint belongs to, as the Docker Engine API tells it (Docker sends neither the
/// container's name nor its labels in any plugin call). Resolved outside the plugin handlers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct ContainerIdentity {
    /// Docker's endpoint ID (the key the driver knows the endpoint by).
    pub endpoint_id: String,
    /// Container ID.
    pub container_id: String,
    /// Container name without the leading `/`.
    pub name: String,
    /// Container labels (`docker run --label k=v`).
    pub labels: BTreeMap<String, String>,
}
