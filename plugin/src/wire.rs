//! Wire types of Docker's libnetwork remote-driver and IPAM plugin protocol, exactly as the
//! daemon sends and expects them (PascalCase fields, Go's JSON quirks), and their
//! conversion into the driver's domain types. Nothing here touches state.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;

use base64::Engine as _;
use ipnetwork::IpNetwork;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sluice_driver::ipam::{LeaseKind, PoolRequest};
use sluice_driver::model::{EndpointRequest, IpData, NetworkRequest, parse_mac};
use sluice_driver::nat::{PortRequest, Proto};

/// Docker's option keys.
pub mod keys {
    /// The user's `-o` options.
    pub const GENERIC: &str = "com.docker.network.generic";
    /// `--ipv6`.
    pub const ENABLE_IPV6: &str = "com.docker.network.enable_ipv6";
    /// `--internal`.
    pub const INTERNAL: &str = "com.docker.network.internal";
    /// `--mac-address`, base64 of the bytes.
    pub const MAC: &str = "com.docker.network.endpoint.macaddress";
    /// Gateway reservation in RequestAddress.
    pub const REQUEST_ADDRESS_TYPE: &str = "RequestAddressType";
    /// Its value for the gateway.
    pub const GATEWAY: &str = "com.docker.network.gateway";
    /// Published ports (`docker run -p`) in Join / ProgramExternalConnectivity options.
    pub const PORTMAP: &str = "com.docker.network.portmap";
}

/// A request the plugin could not decode into something sensible.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct BadRequest(pub String);

fn bad(msg: impl Into<String>) -> BadRequest {
    BadRequest(msg.into())
}

/// `/Plugin.Activate` response.
#[derive(Debug, Serialize)]
pub struct ActivateResponse {
    /// Subsystems this socket serves.
    #[serde(rename = "Implements")]
    pub implements: Vec<&'static str>,
}

/// `/NetworkDriver.GetCapabilities` response.
#[derive(Debug, Serialize)]
pub struct CapabilitiesResponse {
    /// `local` or `global`.
    #[serde(rename = "Scope")]
    pub scope: &'static str,
    /// `local` or `global`.
    #[serde(rename = "ConnectivityScope")]
    pub connectivity_scope: &'static str,
}

/// `/IpamDriver.GetCapabilities` response.
#[derive(Debug, Serialize)]
pub struct IpamCapabilitiesResponse {
    /// sluice never needs the daemon to invent MACs.
    #[serde(rename = "RequiresMACAddress")]
    pub requires_mac_address: bool,
    /// sluice persists its leases, so no replay is needed.
    #[serde(rename = "RequiresRequestReplay")]
    pub requires_request_replay: bool,
}

/// `/IpamDriver.GetDefaultAddressSpaces` response.
#[derive(Debug, Serialize)]
pub struct AddressSpacesResponse {
    /// For local-scope networks.
    #[serde(rename = "LocalDefaultAddressSpace")]
    pub local: &'static str,
    /// For global-scope networks.
    #[serde(rename = "GlobalDefaultAddressSpace")]
    pub global: &'static str,
}

/// One `IPv4Data`/`IPv6Data` element of CreateNetwork.
#[derive(Debug, Deserialize)]
pub struct IpamData {
    /// Address space (informational).
    #[serde(rename = "AddressSpace", default)]
    pub address_space: String,
    /// The subnet.
    #[serde(rename = "Pool")]
    pub pool: String,
    /// Gateway as CIDR (`10.20.0.1/24`), possibly absent.
    #[serde(rename = "Gateway", default)]
    pub gateway: Option<String>,
    /// Aux addresses as CIDR strings.
    #[serde(rename = "AuxAddresses", default)]
    pub aux_addresses: Option<BTreeMap<String, String>>,
}

/// `/NetworkDriver.CreateNetwork` request.
#[derive(Debug, Deserialize)]
pub struct CreateNetworkRequest {
    /// Network ID.
    #[serde(rename = "NetworkID")]
    pub network_id: String,
    /// libnetwork's generic options (values of mixed types).
    #[serde(rename = "Options", default)]
    pub options: Option<HashMap<String, Value>>,
    /// IPv4 pools.
    #[serde(rename = "IPv4Data", default)]
    pub ipv4_data: Option<Vec<IpamData>>,
    /// IPv6 pools.
    #[serde(rename = "IPv6Data", default)]
    pub ipv6_data: Option<Vec<IpamData>>,
}

/// Requests that carry only a network ID.
#[derive(Debug, Deserialize)]
pub struct NetworkIdRequest {
    /// Network ID.
    #[serde(rename = "NetworkID")]
    pub network_id: String,
}

/// `/NetworkDriver.AllocateNetwork` request (swarm managers).
#[derive(Debug, Deserialize)]
pub struct AllocateNetworkRequest {
    /// Network ID.
    #[serde(rename = "NetworkID")]
    pub network_id: String,
    /// Driver options (strings).
    #[serde(rename = "Options", default)]
    pub options: Option<BTreeMap<String, String>>,
}

/// `/NetworkDriver.AllocateNetwork` response: the options workers will receive.
#[derive(Debug, Serialize)]
pub struct AllocateNetworkResponse {
    /// Echoed options.
    #[serde(rename = "Options")]
    pub options: BTreeMap<String, String>,
}

/// The `Interface` of CreateEndpoint.
#[derive(Debug, Deserialize, Default)]
pub struct EndpointInterface {
    /// IPv4 CIDR or empty.
    #[serde(rename = "Address", default)]
    pub address: String,
    /// IPv6 CIDR or empty.
    #[serde(rename = "AddressIPv6", default)]
    pub address_ipv6: String,
    /// MAC or empty.
    #[serde(rename = "MacAddress", default)]
    pub mac_address: String,
}

/// `/NetworkDriver.CreateEndpoint` request.
#[derive(Debug, Deserialize)]
pub struct CreateEndpointRequest {
    /// Network ID.
    #[serde(rename = "NetworkID")]
    pub network_id: String,
    /// Endpoint ID.
    #[serde(rename = "EndpointID")]
    pub endpoint_id: String,
    /// What the daemon already allocated.
    #[serde(rename = "Interface", default)]
    pub interface: Option<EndpointInterface>,
    /// Endpoint options of mixed types.
    #[serde(rename = "Options", default)]
    pub options: Option<HashMap<String, Value>>,
}

/// The `Interface` of a CreateEndpoint response: only fields the daemon left empty.
#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct EndpointInterfaceResponse {
    /// MAC chosen by sluice.
    #[serde(rename = "MacAddress", skip_serializing_if = "String::is_empty")]
    pub mac_address: String,
}

/// `/NetworkDriver.CreateEndpoint` response.
#[derive(Debug, Serialize)]
pub struct CreateEndpointResponse {
    /// `null` when there is nothing to add.
    #[serde(rename = "Interface")]
    pub interface: Option<EndpointInterfaceResponse>,
}

/// Requests that carry a network and an endpoint ID.
#[derive(Debug, Deserialize)]
pub struct EndpointIdRequest {
    /// Network ID.
    #[serde(rename = "NetworkID")]
    pub network_id: String,
    /// Endpoint ID.
    #[serde(rename = "EndpointID")]
    pub endpoint_id: String,
}

/// `/NetworkDriver.EndpointOperInfo` response.
#[derive(Debug, Serialize)]
pub struct EndpointInfoResponse {
    /// Operational data.
    #[serde(rename = "Value")]
    pub value: BTreeMap<String, String>,
}

/// `/NetworkDriver.Join` request.
#[derive(Debug, Deserialize)]
pub struct JoinRequest {
    /// Network ID.
    #[serde(rename = "NetworkID")]
    pub network_id: String,
    /// Endpoint ID.
    #[serde(rename = "EndpointID")]
    pub endpoint_id: String,
    /// Path of the container's netns.
    #[serde(rename = "SandboxKey")]
    pub sandbox_key: String,
}

/// Join's `InterfaceName`.
#[derive(Debug, Serialize)]
pub struct InterfaceName {
    /// Link in the host netns that Docker moves.
    #[serde(rename = "SrcName")]
    pub src_name: String,
    /// Docker names it `<prefix><n>`.
    #[serde(rename = "DstPrefix")]
    pub dst_prefix: String,
}

/// `/NetworkDriver.Join` response.
#[derive(Debug, Serialize)]
pub struct JoinResponse {
    /// The link.
    #[serde(rename = "InterfaceName")]
    pub interface_name: InterfaceName,
    /// IPv4 gateway (plain IP).
    #[serde(rename = "Gateway", skip_serializing_if = "String::is_empty")]
    pub gateway: String,
    /// IPv6 gateway (plain IP).
    #[serde(rename = "GatewayIPv6", skip_serializing_if = "String::is_empty")]
    pub gateway_ipv6: String,
    /// sluice provides its own way out; never attach docker_gwbridge.
    #[serde(rename = "DisableGatewayService")]
    pub disable_gateway_service: bool,
}

/// `/NetworkDriver.ProgramExternalConnectivity` request.
#[derive(Debug, Deserialize)]
pub struct ProgramExternalRequest {
    /// Network ID.
    #[serde(rename = "NetworkID")]
    pub network_id: String,
    /// Endpoint ID.
    #[serde(rename = "EndpointID")]
    pub endpoint_id: String,
    /// The sandbox's options: `com.docker.network.portmap` and exposed ports.
    #[serde(rename = "Options", default)]
    pub options: Option<HashMap<String, Value>>,
}

/// One element of `com.docker.network.portmap` (Go's `types.PortBinding`).
#[derive(Debug, Deserialize)]
pub struct PortBindingWire {
    /// IP protocol number: 6 tcp, 17 udp, 132 sctp.
    #[serde(rename = "Proto")]
    pub proto: u64,
    /// Container address (unused: sluice knows the endpoint's).
    #[serde(rename = "IP", default)]
    pub ip: String,
    /// Port in the container.
    #[serde(rename = "Port")]
    pub port: u16,
    /// Host address, `""` for all.
    #[serde(rename = "HostIP", default)]
    pub host_ip: String,
    /// First host port, 0 for any.
    #[serde(rename = "HostPort", default)]
    pub host_port: u16,
    /// Last host port of a range (0 or equal to `HostPort` for one port).
    #[serde(rename = "HostPortEnd", default)]
    pub host_port_end: u16,
}

/// `/NetworkDriver.DiscoverNew` / `DiscoverDelete` request.
#[derive(Debug, Deserialize)]
pub struct DiscoveryRequest {
    /// 1 = node discovery.
    #[serde(rename = "DiscoveryType")]
    pub discovery_type: i64,
    /// Type-specific data.
    #[serde(rename = "DiscoveryData", default)]
    pub discovery_data: Value,
}

impl DiscoveryRequest {
    /// This node's own address, when the event is a node discovery (type 1) about itself
    /// (`"Self": true`) with a valid `Address`.
    #[must_use]
    pub fn self_address(&self) -> Option<IpAddr> {
        let data = &self.discovery_data;
        (self.discovery_type == 1 && data["Self"].as_bool() == Some(true))
            .then(|| data["Address"].as_str()?.parse().ok())
            .flatten()
    }
}

/// `/IpamDriver.RequestPool` request.
#[derive(Debug, Deserialize)]
pub struct RequestPoolRequest {
    /// Address space.
    #[serde(rename = "AddressSpace", default)]
    pub address_space: String,
    /// `--subnet` or empty.
    #[serde(rename = "Pool", default)]
    pub pool: String,
    /// `--ip-range` or empty.
    #[serde(rename = "SubPool", default)]
    pub sub_pool: String,
    /// `--ipam-opt`.
    #[serde(rename = "Options", default)]
    pub options: Option<BTreeMap<String, String>>,
    /// IPv6 family.
    #[serde(rename = "V6", default)]
    pub v6: bool,
}

/// `/IpamDriver.RequestPool` response.
#[derive(Debug, Serialize)]
pub struct RequestPoolResponse {
    /// Pool ID for later calls.
    #[serde(rename = "PoolID")]
    pub pool_id: String,
    /// The subnet, canonical CIDR.
    #[serde(rename = "Pool")]
    pub pool: String,
    /// Extra data (none).
    #[serde(rename = "Data")]
    pub data: BTreeMap<String, String>,
}

/// `/IpamDriver.ReleasePool` request.
#[derive(Debug, Deserialize)]
pub struct ReleasePoolRequest {
    /// Pool ID.
    #[serde(rename = "PoolID")]
    pub pool_id: String,
}

/// `/IpamDriver.RequestAddress` request.
#[derive(Debug, Deserialize)]
pub struct RequestAddressRequest {
    /// Pool ID.
    #[serde(rename = "PoolID")]
    pub pool_id: String,
    /// Preferred address (bare IP) or empty.
    #[serde(rename = "Address", default)]
    pub address: String,
    /// `RequestAddressType` marks the gateway; `null` for endpoints on 20.10.
    #[serde(rename = "Options", default)]
    pub options: Option<BTreeMap<String, String>>,
}

/// `/IpamDriver.RequestAddress` response.
#[derive(Debug, Serialize)]
pub struct RequestAddressResponse {
    /// CIDR with the pool's prefix.
    #[serde(rename = "Address")]
    pub address: String,
    /// Extra data (none).
    #[serde(rename = "Data")]
    pub data: BTreeMap<String, String>,
}

/// `/IpamDriver.ReleaseAddress` request.
#[derive(Debug, Deserialize)]
pub struct ReleaseAddressRequest {
    /// Pool ID.
    #[serde(rename = "PoolID")]
    pub pool_id: String,
    /// Bare IP.
    #[serde(rename = "Address")]
    pub address: String,
}

/// An error body. Both names are sent: the network driver reads `Err`, the IPAM proxy
/// `Error`.
#[derive(Debug, Serialize)]
pub struct ErrorResponse {
    /// For the network driver.
    #[serde(rename = "Err")]
    pub err: String,
    /// For the IPAM driver.
    #[serde(rename = "Error")]
    pub error: String,
}

// ---- conversions into the domain ----------------------------------------------------

/// Parses `a.b.c.d` or `a.b.c.d/nn` (Docker sends both forms in different places).
///
/// # Errors
/// When the string is neither.
pub fn parse_ip_or_cidr(s: &str) -> Result<IpAddr, BadRequest> {
    let ip = s.split('/').next().unwrap_or(s);
    ip.parse()
        .map_err(|_| bad(format!("invalid IP address {s:?}")))
}

fn parse_cidr(field: &str, s: &str) -> Result<IpNetwork, BadRequest> {
    s.parse()
        .map_err(|_| bad(format!("{field}: invalid CIDR {s:?}")))
}

fn opt_cidr(field: &str, s: &str) -> Result<Option<IpNetwork>, BadRequest> {
    if s.is_empty() {
        Ok(None)
    } else {
        parse_cidr(field, s).map(Some)
    }
}

fn bool_option(options: &HashMap<String, Value>, key: &str) -> Result<bool, BadRequest> {
    match options.get(key) {
        None | Some(Value::Null) => Ok(false),
        Some(Value::Bool(b)) => Ok(*b),
        Some(Value::String(s)) => s
            .parse()
            .map_err(|_| bad(format!("option {key} must be a boolean, got {s:?}"))),
        Some(other) => Err(bad(format!("option {key} must be a boolean, got {other}"))),
    }
}

impl IpamData {
    fn into_domain(self, family: &str) -> Result<IpData, BadRequest> {
        let pool = parse_cidr(&format!("{family}Data.Pool"), &self.pool)?;
        let gateway = match self.gateway.as_deref() {
            None | Some("") => None,
            Some(g) => {
                let ip = parse_ip_or_cidr(g)?;
                Some(
                    IpNetwork::new(ip, pool.prefix())
                        .map_err(|e| bad(format!("gateway {g:?}: {e}")))?,
                )
            }
        };
        let aux = self
            .aux_addresses
            .unwrap_or_default()
            .into_iter()
            .map(|(k, v)| parse_ip_or_cidr(&v).map(|ip| (k, ip)))
            .collect::<Result<_, _>>()?;
        Ok(IpData { pool, gateway, aux })
    }
}

impl CreateNetworkRequest {
    /// Decodes the options and IPAM data.
    ///
    /// # Errors
    /// Wrongly typed options or unparsable addresses.
    pub fn into_domain(self) -> Result<NetworkRequest, BadRequest> {
        let options = self.options.unwrap_or_default();
        let generic = match options.get(keys::GENERIC) {
            None | Some(Value::Null) => BTreeMap::new(),
            Some(Value::Object(map)) => map
                .iter()
                .map(|(k, v)| match v {
                    Value::String(s) => Ok((k.clone(), s.clone())),
                    Value::Number(n) => Ok((k.clone(), n.to_string())),
                    Value::Bool(b) => Ok((k.clone(), b.to_string())),
                    other => Err(bad(format!("option {k} must be a string, got {other}"))),
                })
                .collect::<Result<_, _>>()?,
            Some(other) => {
                return Err(bad(format!(
                    "{} must be an object, got {other}",
                    keys::GENERIC
                )));
            }
        };
        let convert = |data: Option<Vec<IpamData>>, family: &str| {
            data.unwrap_or_default()
                .into_iter()
                .map(|d| d.into_domain(family))
                .collect::<Result<Vec<_>, _>>()
        };
        Ok(NetworkRequest {
            internal: bool_option(&options, keys::INTERNAL)?,
            ipv6: bool_option(&options, keys::ENABLE_IPV6)?,
            id: non_empty("NetworkID", self.network_id)?,
            options: generic,
            ipv4: convert(self.ipv4_data, "IPv4")?,
            ipv6_data: convert(self.ipv6_data, "IPv6")?,
        })
    }
}

fn non_empty(field: &str, value: String) -> Result<String, BadRequest> {
    if value.is_empty() {
        Err(bad(format!("{field} is empty")))
    } else {
        Ok(value)
    }
}

impl CreateEndpointRequest {
    /// Decodes addresses, the MAC (from `Interface` or base64 in the options) and the
    /// string-valued endpoint options.
    ///
    /// # Errors
    /// Unparsable addresses or MAC.
    pub fn into_domain(self) -> Result<EndpointRequest, BadRequest> {
        let iface = self.interface.unwrap_or_default();
        let options = self.options.unwrap_or_default();
        let mut mac = if iface.mac_address.is_empty() {
            None
        } else {
            Some(parse_mac(&iface.mac_address).map_err(bad)?)
        };
        if mac.is_none()
            && let Some(v) = options.get(keys::MAC)
        {
            mac = Some(decode_base64_mac(v)?);
        }
        let strings = options
            .into_iter()
            .filter_map(|(k, v)| match v {
                Value::String(s) if k != keys::MAC => Some((k, s)),
                _ => None,
            })
            .collect();
        Ok(EndpointRequest {
            network_id: non_empty("NetworkID", self.network_id)?,
            endpoint_id: non_empty("EndpointID", self.endpoint_id)?,
            address: opt_cidr("Interface.Address", &iface.address)?,
            address_v6: opt_cidr("Interface.AddressIPv6", &iface.address_ipv6)?,
            mac,
            options: strings,
        })
    }
}

/// Go marshals `net.HardwareAddr` as base64 of its bytes (`"AkIKFAAF"`).
fn decode_base64_mac(v: &Value) -> Result<[u8; 6], BadRequest> {
    let Value::String(s) = v else {
        return Err(bad(format!("{} must be a base64 string", keys::MAC)));
    };
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(s)
        .map_err(|e| bad(format!("{}: invalid base64 {s:?}: {e}", keys::MAC)))?;
    bytes
        .try_into()
        .map_err(|b: Vec<u8>| bad(format!("{}: expected 6 bytes, got {}", keys::MAC, b.len())))
}

impl ProgramExternalRequest {
    /// The published ports (`com.docker.network.portmap`; absent or `null` = none).
    ///
    /// # Errors
    /// A port map that is not a list of port bindings, an unknown protocol, a bad host
    /// address or an inverted range.
    pub fn port_requests(&self) -> Result<Vec<PortRequest>, BadRequest> {
        let Some(value) = self.options.as_ref().and_then(|o| o.get(keys::PORTMAP)) else {
            return Ok(Vec::new());
        };
        if value.is_null() {
            return Ok(Vec::new());
        }
        let wire: Vec<PortBindingWire> = serde_json::from_value(value.clone())
            .map_err(|e| bad(format!("{}: {e}", keys::PORTMAP)))?;
        wire.into_iter()
            .map(|b| {
                let proto = Proto::from_number(b.proto).ok_or_else(|| {
                    bad(format!(
                        "{}: unknown protocol number {} (tcp, udp and sctp are supported)",
                        keys::PORTMAP,
                        b.proto
                    ))
                })?;
                let host_ip = if b.host_ip.is_empty() {
                    None
                } else {
                    Some(parse_ip_or_cidr(&b.host_ip)?).filter(|ip| !ip.is_unspecified())
                };
                let end = if b.host_port_end == 0 {
                    b.host_port
                } else {
                    b.host_port_end
                };
                if end < b.host_port {
                    return Err(bad(format!(
                        "{}: host port range {}-{end} is inverted",
                        keys::PORTMAP,
                        b.host_port
                    )));
                }
                Ok(PortRequest {
                    proto,
                    container_port: b.port,
                    host_ip,
                    host_port: b.host_port,
                    host_port_end: end,
                })
            })
            .collect()
    }
}

impl RequestPoolRequest {
    /// Decodes the subnet and range.
    ///
    /// # Errors
    /// Unparsable CIDRs.
    pub fn into_domain(self) -> Result<PoolRequest, BadRequest> {
        Ok(PoolRequest {
            pool: opt_cidr("Pool", &self.pool)?,
            sub_pool: opt_cidr("SubPool", &self.sub_pool)?,
            v6: self.v6,
            global: self.address_space == "sluice-global",
        })
    }
}

impl RequestAddressRequest {
    /// Decodes the preferred address and the kind of lease.
    ///
    /// # Errors
    /// An unparsable address.
    pub fn preferred(&self) -> Result<Option<IpAddr>, BadRequest> {
        if self.address.is_empty() {
            Ok(None)
        } else {
            parse_ip_or_cidr(&self.address).map(Some)
        }
    }

    /// Gateway when the daemon says so; otherwise an endpoint (or aux) address.
    #[must_use]
    pub fn kind(&self) -> LeaseKind {
        let gateway = self
            .options
            .as_ref()
            .and_then(|o| o.get(keys::REQUEST_ADDRESS_TYPE))
            .is_some_and(|t| t == keys::GATEWAY);
        if gateway {
            LeaseKind::Gateway
        } else {
            LeaseKind::Endpoint
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Bodies below are verbatim from dockerd 20.10.24 (see shared/reference capture).
    const CREATE_NETWORK: &str = r#"{"NetworkID":"eba7e5a80c901ef4ca316371a0c21c18cd8adf030a7aee85d14502a454caf7f3","Options":{"com.docker.network.enable_ipv6":false,"com.docker.network.generic":{"com.docker.network.driver.mtu":"1400","mode":"bridge"}},"IPv4Data":[{"AddressSpace":"caplocal","AuxAddresses":{"r":"10.251.0.2/24"},"Gateway":"10.251.0.1/24","Pool":"10.251.0.0/24"}],"IPv6Data":[]}"#;
    const CREATE_NETWORK_INTERNAL_V6: &str = r#"{"NetworkID":"968c0ae968a0d57c00b00c85724b40e9d5132a825b8734bf3816591ed0e4e334","Options":{"com.docker.network.enable_ipv6":true,"com.docker.network.generic":{},"com.docker.network.internal":true},"IPv4Data":[{"AddressSpace":"caplocal","Gateway":"10.252.0.1/24","Pool":"10.252.0.0/24"}],"IPv6Data":[{"AddressSpace":"caplocal","Gateway":"fd00:252::1/64","Pool":"fd00:252::/64"}]}"#;
    const CREATE_ENDPOINT: &str = r#"{"NetworkID":"73b453fcc0706ee175be1ab056b20ce2fcce2ed232f3de91297f36db5a52af9a","EndpointID":"48d59672a45ec84247601f88ce9cd59dfd5415b57118a098800352578d71c28f","Interface":{"Address":"10.250.1.2/24","AddressIPv6":"","MacAddress":""},"Options":{"com.docker.network.endpoint.exposedports":[{"Proto":6,"Port":80}],"com.docker.network.portmap":[{"Proto":6,"IP":"","Port":80,"HostIP":"","HostPort":8080,"HostPortEnd":8080}],"sluice.label.role":"web"}}"#;

    #[test]
    fn create_network_from_docker_json() {
        let req: CreateNetworkRequest = serde_json::from_str(CREATE_NETWORK).unwrap();
        let n = req.into_domain().unwrap();
        assert_eq!(n.options["com.docker.network.driver.mtu"], "1400");
        assert_eq!(n.options["mode"], "bridge");
        assert!(!n.internal && !n.ipv6);
        assert_eq!(
            n.ipv4[0].pool,
            "10.251.0.0/24".parse::<IpNetwork>().unwrap()
        );
        // Gateway and aux arrive as CIDR.
        assert_eq!(n.ipv4[0].gateway, Some("10.251.0.1/24".parse().unwrap()));
        assert_eq!(n.ipv4[0].aux["r"], "10.251.0.2".parse::<IpAddr>().unwrap());
        assert!(n.ipv6_data.is_empty());
    }

    #[test]
    fn internal_dual_stack() {
        let req: CreateNetworkRequest = serde_json::from_str(CREATE_NETWORK_INTERNAL_V6).unwrap();
        let n = req.into_domain().unwrap();
        assert!(n.internal && n.ipv6);
        assert_eq!(
            n.ipv6_data[0].gateway,
            Some("fd00:252::1/64".parse().unwrap())
        );
    }

    #[test]
    fn endpoint_options_keep_strings_only_and_no_mac() {
        let req: CreateEndpointRequest = serde_json::from_str(CREATE_ENDPOINT).unwrap();
        let ep = req.into_domain().unwrap();
        assert_eq!(ep.address, Some("10.250.1.2/24".parse().unwrap()));
        assert_eq!(ep.address_v6, None);
        assert_eq!(ep.mac, None);
        assert_eq!(ep.options.len(), 1);
        assert_eq!(ep.options["sluice.label.role"], "web");
    }

    #[test]
    fn mac_in_options_is_base64() {
        let body = r#"{"NetworkID":"n","EndpointID":"e","Interface":{"Address":"10.20.0.5/24","AddressIPv6":"","MacAddress":""},"Options":{"com.docker.network.endpoint.macaddress":"AkIKFAAF"}}"#;
        let req: CreateEndpointRequest = serde_json::from_str(body).unwrap();
        assert_eq!(
            req.into_domain().unwrap().mac,
            Some([2, 0x42, 10, 20, 0, 5])
        );
        let body = r#"{"NetworkID":"n","EndpointID":"e","Interface":{},"Options":{"com.docker.network.endpoint.macaddress":"!!"}}"#;
        let req: CreateEndpointRequest = serde_json::from_str(body).unwrap();
        assert!(req.into_domain().unwrap_err().0.contains("base64"));
    }

    #[test]
    fn mac_in_interface_wins() {
        let body = r#"{"NetworkID":"n","EndpointID":"e","Interface":{"Address":"","AddressIPv6":"fd00::5/64","MacAddress":"02:42:0a:14:00:09"}}"#;
        let req: CreateEndpointRequest = serde_json::from_str(body).unwrap();
        let ep = req.into_domain().unwrap();
        assert_eq!(ep.mac, Some([2, 0x42, 10, 20, 0, 9]));
        assert_eq!(ep.address, None);
    }

    #[test]
    fn create_endpoint_response_never_echoes() {
        let none = CreateEndpointResponse { interface: None };
        assert_eq!(
            serde_json::to_string(&none).unwrap(),
            r#"{"Interface":null}"#
        );
        let mac = CreateEndpointResponse {
            interface: Some(EndpointInterfaceResponse {
                mac_address: "02:42:0a:14:00:05".into(),
            }),
        };
        assert_eq!(
            serde_json::to_string(&mac).unwrap(),
            r#"{"Interface":{"MacAddress":"02:42:0a:14:00:05"}}"#
        );
    }

    #[test]
    fn request_address_kinds() {
        let gw: RequestAddressRequest = serde_json::from_str(r#"{"PoolID":"cap/10.250.0.0/24","Address":"","Options":{"RequestAddressType":"com.docker.network.gateway"}}"#).unwrap();
        assert_eq!(gw.kind(), LeaseKind::Gateway);
        assert_eq!(gw.preferred().unwrap(), None);
        let ep: RequestAddressRequest = serde_json::from_str(
            r#"{"PoolID":"cap/10.251.0.0/24","Address":"10.251.0.200","Options":null}"#,
        )
        .unwrap();
        assert_eq!(ep.kind(), LeaseKind::Endpoint);
        assert_eq!(
            ep.preferred().unwrap(),
            Some("10.251.0.200".parse().unwrap())
        );
    }

    #[test]
    fn request_pool_with_range() {
        let req: RequestPoolRequest = serde_json::from_str(r#"{"AddressSpace":"caplocal","Pool":"10.251.0.0/24","SubPool":"10.251.0.128/25","Options":{},"V6":false}"#).unwrap();
        let p = req.into_domain().unwrap();
        assert_eq!(p.sub_pool, Some("10.251.0.128/25".parse().unwrap()));
        let auto: RequestPoolRequest = serde_json::from_str(
            r#"{"AddressSpace":"caplocal","Pool":"","SubPool":"","Options":{},"V6":true}"#,
        )
        .unwrap();
        let p = auto.into_domain().unwrap();
        assert_eq!(p.pool, None);
        assert!(p.v6);
    }

    #[test]
    fn wrong_types_are_errors() {
        assert!(serde_json::from_str::<NetworkIdRequest>(r#"{"NetworkID":5}"#).is_err());
        let req: CreateNetworkRequest = serde_json::from_str(
            r#"{"NetworkID":"n","Options":{"com.docker.network.internal":"maybe"}}"#,
        )
        .unwrap();
        assert!(req.into_domain().is_err());
        let req: CreateNetworkRequest =
            serde_json::from_str(r#"{"NetworkID":"n","IPv4Data":[{"Pool":"10.0.0.0/33"}]}"#)
                .unwrap();
        assert!(req.into_domain().unwrap_err().0.contains("invalid CIDR"));
    }

    #[test]
    fn join_response_shape() {
        let r = JoinResponse {
            interface_name: InterfaceName {
                src_name: "slvc0f987eed597".into(),
                dst_prefix: "eth".into(),
            },
            gateway: "10.20.0.1".into(),
            gateway_ipv6: String::new(),
            disable_gateway_service: true,
        };
        assert_eq!(
            serde_json::to_string(&r).unwrap(),
            r#"{"InterfaceName":{"SrcName":"slvc0f987eed597","DstPrefix":"eth"},"Gateway":"10.20.0.1","DisableGatewayService":true}"#
        );
    }
}
