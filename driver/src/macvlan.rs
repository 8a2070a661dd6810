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
        let e = MacvlanConfig::from_options(&opts(&[("parent", "averyveryverylongname")]))
            .unwrap_err();
        assert!(e.contains("not a valid interface name"), "{e}");
        let e = MacvlanConfig::from_options(&opts(&[("parent", "eth0"), ("macvlan_mode", "x")]))
            .unwrap_err();
        assert!(e.contains("bridge, private, vepa, passthru"), "{e}");
    }
}
