//! Interface names derived from Docker's IDs. Linux allows 15 bytes (IFNAMSIZ - 1), so each
//! name is a 4-byte prefix plus the first 11 hex digits of the ID. Every link sluice creates
//! starts with [`PREFIX`], which is how reconciliation recognises its own links.

/// Every link sluice creates starts with this.
pub const PREFIX: &str = "sl";
/// Bridge of a bridge-mode network.
pub const BRIDGE_PREFIX: &str = "slbr";
/// Host end of an endpoint's veth pair (stays on the bridge).
pub const HOST_VETH_PREFIX: &str = "slvh";
/// Container end of an endpoint's veth pair (Docker moves it into the sandbox).
pub const PEER_VETH_PREFIX: &str = "slvc";
/// Longest interface name the kernel accepts.
pub const MAX_IFNAME_LEN: usize = 15;

const ID_CHARS: usize = MAX_IFNAME_LEN - 4;

fn derive(prefix: &str, id: &str) -> String {
    let short: String = id
        .chars()
        .filter(char::is_ascii_alphanumeric)
        .take(ID_CHARS)
        .collect();
    format!("{prefix}{short}")
}

/// Name of the bridge of network `network_id`.
#[must_use]
pub fn bridge(network_id: &str) -> String {
    derive(BRIDGE_PREFIX, network_id)
}

/// Host-side veth name of endpoint `endpoint_id`.
#[must_use]
pub fn host_veth(endpoint_id: &str) -> String {
    derive(HOST_VETH_PREFIX, endpoint_id)
}

/// Container-side veth name of endpoint `endpoint_id` (Join's `SrcName`).
#[must_use]
pub fn peer_veth(endpoint_id: &str) -> String {
    derive(PEER_VETH_PREFIX, endpoint_id)
}

/// Host end of a warm pool link (renamed to [`host_veth`] when an endpoint takes it).
pub const POOL_HOST_PREFIX: &str = "slvp";
/// Container end of a warm pool link (renamed to [`peer_veth`] when an endpoint takes it).
pub const POOL_PEER_PREFIX: &str = "slvq";

/// Host end of the pool link tagged `tag` (hex digits).
#[must_use]
pub fn pool_host(tag: &str) -> String {
    derive(POOL_HOST_PREFIX, tag)
}

/// Container end of the pool link tagged `tag`.
#[must_use]
pub fn pool_peer(tag: &str) -> String {
    derive(POOL_PEER_PREFIX, tag)
}

/// True for the host end of a pool link.
#[must_use]
pub fn is_pool_host(name: &str) -> bool {
    name.starts_with(POOL_HOST_PREFIX)
}

/// Prefix of an endpoint's macvlan link (macvlan mode).
pub const MACVLAN_PREFIX: &str = "slmv";

/// Name of the macvlan link of endpoint `endpoint_id` (Join's `SrcName` in macvlan mode).
#[must_use]
pub fn macvlan(endpoint_id: &str) -> String {
    derive(MACVLAN_PREFIX, endpoint_id)
}

/// True for names sluice may have created.
#[must_use]
pub fn is_sluice_link(name: &str) -> bool {
    [
        BRIDGE_PREFIX,
        HOST_VETH_PREFIX,
        PEER_VETH_PREFIX,
        MACVLAN_PREFIX,
        POOL_HOST_PREFIX,
        POOL_PEER_PREFIX,
        crate::vxlan::DEVICE_PREFIX,
    ]
    .iter()
    .any(|p| name.starts_with(p))
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "5cdf432b9218efa3a4cdb1c360f5d3859f2c76d21ec9701c194cb39579b6a3fc";

    #[test]
    fn names_fit_ifnamsiz_and_are_distinct() {
        let names = [bridge(ID), host_veth(ID), peer_veth(ID)];
        for n in &names {
            assert_eq!(n.len(), MAX_IFNAME_LEN, "{n}");
            assert!(is_sluice_link(n));
        }
        assert_eq!(names[0], "slbr5cdf432b921");
        assert_ne!(names[1], names[2]);
    }

    #[test]
    fn short_or_odd_ids_stay_valid() {
        assert_eq!(bridge("ab/c"), "slbrabc");
        assert!(!is_sluice_link("eth0"));
        assert!(!is_sluice_link("docker0"));
    }
}
