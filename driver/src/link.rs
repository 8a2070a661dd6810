//! The one netlink wrapper of the driver (netavark style): every `RTM_*` request sluice sends
//! is built here, so drivers speak in terms of "create a bridge" or "attach to a bridge" and
//! never touch rtnetlink messages. Also owns the small `/proc/sys` helper ([`write_sysctl`]).
//!
//! A [`Netlink`] talks to the network namespace its socket was **created** in (the calling
//! thread's at [`Netlink::connect`]); moving threads or tasks afterwards does not change that.
//!
//! Errors keep the operation in their message (`create bridge slbr123: …`) and the raw
//! rtnetlink error as their source; [`errno`] extracts the kernel's errno for callers that
//! must tell "already there" or "already gone" apart from real failures.

use std::io;
use std::net::IpAddr;
use std::os::fd::AsRawFd as _;
use std::pin::pin;

use futures::TryStreamExt;
use ipnetwork::IpNetwork;
use netlink_packet_route::AddressFamily;
use netlink_packet_route::RouteNetlinkMessage;
use netlink_packet_route::address::{AddressAttribute, AddressFlags, AddressHeaderFlags};
use netlink_packet_route::link::{InfoData, InfoVeth, LinkAttribute};
use netlink_packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage, NeighbourState,
};
use netlink_packet_route::tc::{
    TcAttribute, TcBpfFlags, TcFilterBpf, TcFilterBpfOption, TcHandle, TcMessage, TcOption,
};
use rtnetlink::packet_core::{
    NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_EXCL, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage,
    NetlinkPayload,
};
use rtnetlink::sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};
use rtnetlink::{LinkBridge, LinkMessageBuilder, LinkUnspec, LinkVeth};
use tracing::debug;

use crate::kernel::KernelError;

/// A route-netlink connection (the `ip` tool in library form), bound to one network
/// namespace.
#[derive(Debug, Clone)]
pub struct Netlink {
    handle: rtnetlink::Handle,
}

/// The kernel's errno behind a netlink failure (positive, e.g. `libc::EEXIST`), if the
/// error came from the kernel at all.
#[must_use]
pub fn errno(err: &KernelError) -> Option<i32> {
    match err {
        KernelError::Netlink { source, .. } => rtnetlink_errno(source),
        _ => None,
    }
}

fn rtnetlink_errno(err: &rtnetlink::Error) -> Option<i32> {
    match err {
        // The kernel reports `-errno` in NLMSG_ERROR.
        rtnetlink::Error::NetlinkError(msg) => msg.code.map(|c| c.get().saturating_neg()),
        _ => None,
    }
}

fn nl_error(op: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> KernelError {
    move |source| KernelError::Netlink {
        op: op.into(),
        source,
    }
}

pub use crate::model::format_mac;

impl Netlink {
    /// Opens a route-netlink socket in the **calling thread's** network namespace and spawns
    /// its connection task on the current tokio runtime.
    ///
    /// # Errors
    /// [`KernelError::Os`] when called outside a tokio runtime or when the socket cannot be
    /// opened.
    pub fn connect() -> Result<Self, KernelError> {
        let op = "open route netlink socket";
        let runtime = tokio::runtime::Handle::try_current().map_err(|e| KernelError::Os {
            op: op.to_owned(),
            message: format!("needs a tokio runtime: {e}"),
        })?;
        let (connection, handle, _messages) =
            rtnetlink::new_connection().map_err(|e| KernelError::Os {
                op: op.to_owned(),
                message: e.to_string(),
            })?;
        runtime.spawn(connection);
        Ok(Self { handle })
    }

    /// Index of the link called `name`, or `None` if there is none
    /// (`ip link show dev NAME`).
    ///
    /// # Errors
    /// [`KernelError::Netlink`] for failures other than "no such device".
    pub async fn link_index(&self, name: &str) -> Result<Option<u32>, KernelError> {
        let mut links = pin!(
            self.handle
                .link()
                .get()
                .match_name(name.to_owned())
                .execute()
        );
        match links.try_next().await {
            Ok(link) => Ok(link.map(|l| l.header.index)),
            Err(e) if rtnetlink_errno(&e) == Some(libc::ENODEV) => Ok(None),
            Err(e) => Err(nl_error(format!("look up link {name}"))(e)),
        }
    }

    /// Names of all links in the namespace (`ip link show`).
    ///
    /// # Errors
    /// [`KernelError::Netlink`] if the dump fails.
    pub async fn link_names(&self) -> Result<Vec<String>, KernelError> {
        Ok(self
            .link_aliases()
            .await?
            .into_iter()
            .map(|(name, _)| name)
            .collect())
    }

    /// Creates a bridge, down, with a fixed MAC if given
    /// (`ip link add NAME [address MAC] type bridge`).
    ///
    /// There is deliberately no MTU parameter: an MTU sent with `RTM_NEWLINK` is not marked
    /// "set by user" by the bridge code, so the bridge re-tunes itself to the smallest port
    /// MTU as soon as a port joins (a 1400 bridge becomes 1500 when a 1500 veth is attached;
    /// found with `ip link add br mtu 1400 type bridge` + `ip link set veth master br` on
    /// 6.18). Use [`Netlink::set_mtu`] after creation, which goes through `ndo_change_mtu`
    /// and pins the value. Likewise a bridge without an explicit MAC takes the lowest MAC of
    /// its ports and changes it as ports come and go, so callers should pass one.
    ///
    /// # Errors
    /// [`KernelError::Netlink`], with errno `EEXIST` if the name is taken.
    pub async fn create_bridge(&self, name: &str, mac: Option<[u8; 6]>) -> Result<(), KernelError> {
        let mut builder = LinkMessageBuilder::<LinkBridge>::new(name);
        if let Some(mac) = mac {
            builder = builder.address(mac.to_vec());
        }
        self.handle
            .link()
            .add(builder.build())
            .execute()
            .await
            .map_err(nl_error(format!("create bridge {name}")))?;
        debug!(
            "ip link add {name}{} type bridge",
            mac.map(|m| format!(" address {}", format_mac(&m)))
                .unwrap_or_default()
        );
        Ok(())
    }

    /// Creates a macvlan link on `parent`, down, with its MAC and MTU if given
    /// (`ip link add NAME link PARENT [address MAC] [mtu MTU] type macvlan mode MODE`).
    /// `mode` is `bridge`, `private`, `vepa` or `passthru`.
    ///
    /// # Errors
    /// [`KernelError::Netlink`], with errno `EEXIST` if the name is taken; [`KernelError::Os`]
    /// for an unknown mode.
    pub async fn create_macvlan(
        &self,
        name: &str,
        parent: u32,
        mode: &str,
        mac: Option<[u8; 6]>,
        mtu: Option<u32>,
    ) -> Result<(), KernelError> {
        use netlink_packet_route::link::MacVlanMode;
        let kernel_mode = match mode {
            "bridge" => MacVlanMode::Bridge,
            "private" => MacVlanMode::Private,
            "vepa" => MacVlanMode::Vepa,
            "passthru" => MacVlanMode::Passthrough,
            other => {
                return Err(KernelError::Os {
                    op: format!("create macvlan {name}"),
                    message: format!("unknown macvlan mode {other:?}"),
                });
            }
        };
        let mut builder = rtnetlink::LinkMacVlan::new(name, parent, kernel_mode);
        if let Some(mac) = mac {
            builder = builder.address(mac.to_vec());
        }
        if let Some(mtu) = mtu {
            builder = builder.mtu(mtu);
        }
        self.handle
            .link()
            .add(builder.build())
            .execute()
            .await
            .map_err(nl_error(format!("create macvlan {name} on #{parent}")))?;
        debug!("ip link add {name} link #{parent} type macvlan mode {mode}");
        Ok(())
    }

    /// Creates an 802.1Q sub-interface of `parent`, down, with an alias
    /// (`ip link add NAME link PARENT type vlan id ID; ip link set NAME alias ALIAS`).
    ///
    /// # Errors
    /// [`KernelError::Netlink`], with errno `EEXIST` if the name is taken.
    pub async fn create_vlan(
        &self,
        name: &str,
        parent: u32,
        id: u16,
        alias: &str,
    ) -> Result<(), KernelError> {
        let message = rtnetlink::LinkVlan::new(name, parent, id)
            .alias(alias)
            .build();
        self.handle
            .link()
            .add(message)
            .execute()
            .await
            .map_err(nl_error(format!(
                "create vlan {name} (id {id}) on #{parent}"
            )))?;
        debug!("ip link add {name} link #{parent} type vlan id {id}; alias {alias}");
        Ok(())
    }

    /// The alias of link `name` (`ip link show NAME`, `alias`), `Ok(None)` when it has none,
    /// and an outer `None` when there is no such link.
    ///
    /// # Errors
    /// [`KernelError::Netlink`] for failures other than "no such device".
    pub async fn link_alias(&self, name: &str) -> Result<Option<Option<String>>, KernelError> {
        let mut links = pin!(
            self.handle
                .link()
                .get()
                .match_name(name.to_owned())
                .execute()
        );
        match links.try_next().await {
            Ok(Some(link)) => Ok(Some(link.attributes.into_iter().find_map(|a| match a {
                LinkAttribute::IfAlias(alias) => Some(alias),
                _ => None,
            }))),
            Ok(None) => Ok(None),
            Err(e) if rtnetlink_errno(&e) == Some(libc::ENODEV) => Ok(None),
            Err(e) => Err(nl_error(format!("look up link {name}"))(e)),
        }
    }

    /// Creates a veth pair, both ends down, with the MTU on both ends if given
    /// (`ip link add HOST [mtu MTU] type veth peer name PEER [mtu MTU]`).
    ///
    /// # Errors
    /// [`KernelError::Netlink`], with errno `EEXIST` if either name is taken.
    pub async fn create_veth(
        &self,
        host: &str,
        peer: &str,
        mtu: Option<u32>,
    ) -> Result<(), KernelError> {
        let mut peer_msg = LinkUnspec::new_with_name(peer);
        let mut builder = LinkVeth::new(host, peer);
        if let Some(mtu) = mtu {
            peer_msg = peer_msg.mtu(mtu);
            builder = builder.mtu(mtu);
        }
        let message = builder
            .set_info_data(InfoData::Veth(InfoVeth::Peer(peer_msg.build())))
            .build();
        self.handle
            .link()
            .add(message)
            .execute()
            .await
            .map_err(nl_error(format!("create veth {host} peer {peer}")))?;
        debug!(
            "ip link add {host}{m} type veth peer name {peer}{m}",
            m = mtu.map(|m| format!(" mtu {m}")).unwrap_or_default()
        );
        Ok(())
    }

    /// Creates a veth pair ready for use in one request: host end on `bridge_index` and up,
    /// peer with `peer_mac`, both with `mtu` (`ip link add HOST mtu M master BR up type veth
    /// peer name PEER mtu M address MAC`). One rtnl round trip instead of five: creation is
    /// what concurrent CreateEndpoints queue for in the kernel.
    ///
    /// # Errors
    /// [`KernelError::Netlink`], e.g. `EEXIST`.
    pub async fn create_veth_ready(
        &self,
        host: &str,
        peer: &str,
        mtu: Option<u32>,
        peer_mac: [u8; 6],
        bridge_index: u32,
    ) -> Result<(), KernelError> {
        self.create_veth_on(host, peer, mtu, Some(peer_mac), bridge_index, None)
            .await
    }

    /// Like [`Netlink::create_veth_ready`] (host end on the bridge and up) but the container
    /// end keeps the kernel's MAC and is put in link group `peer_group`: a warm pool link
    /// ([`crate::kernel::PoolLink`]), deleted with the rest of its group by
    /// [`Netlink::delete_group`] (`ip link add HOST [mtu M] master #BR up type veth peer name
    /// PEER [mtu M] group G`).
    ///
    /// # Errors
    /// [`KernelError::Netlink`], e.g. `EEXIST`.
    pub async fn create_pool_veth(
        &self,
        host: &str,
        peer: &str,
        mtu: Option<u32>,
        bridge_index: u32,
        peer_group: u32,
    ) -> Result<(), KernelError> {
        self.create_veth_on(host, peer, mtu, None, bridge_index, Some(peer_group))
            .await
    }

    async fn create_veth_on(
        &self,
        host: &str,
        peer: &str,
        mtu: Option<u32>,
        peer_mac: Option<[u8; 6]>,
        bridge_index: u32,
        peer_group: Option<u32>,
    ) -> Result<(), KernelError> {
        let mut peer_msg = LinkUnspec::new_with_name(peer);
        if let Some(mac) = peer_mac {
            peer_msg = peer_msg.address(mac.to_vec());
        }
        if let Some(group) = peer_group {
            peer_msg = peer_msg.link_group(group);
        }
        let mut builder = LinkVeth::new(host, peer).controller(bridge_index).up();
        if let Some(mtu) = mtu {
            peer_msg = peer_msg.mtu(mtu);
            builder = builder.mtu(mtu);
        }
        let message = builder
            .set_info_data(InfoData::Veth(InfoVeth::Peer(peer_msg.build())))
            .build();
        self.handle
            .link()
            .add(message)
            .execute()
            .await
            .map_err(nl_error(format!(
                "create veth {host} peer {peer} with master #{bridge_index}"
            )))?;
        debug!(
            "ip link add {host}{m} master #{bridge_index} up type veth peer name {peer}{m}{}{}",
            peer_mac
                .map(|mac| format!(" address {}", format_mac(&mac)))
                .unwrap_or_default(),
            peer_group
                .map(|g| format!(" group {g}"))
                .unwrap_or_default(),
            m = mtu.map(|m| format!(" mtu {m}")).unwrap_or_default()
        );
        Ok(())
    }

    /// Takes a pool link's container end out of its pool group and gives it its endpoint's
    /// MAC, in one request (`ip link set dev PEER group default address MAC`).
    ///
    /// # Errors
    /// [`KernelError::Netlink`], e.g. `ENODEV`.
    pub async fn claim_pool_peer(&self, peer: &str, mac: [u8; 6]) -> Result<(), KernelError> {
        self.set_link(
            format!(
                "ip link set dev {peer} group default address {}",
                format_mac(&mac)
            ),
            LinkUnspec::new_with_name(peer)
                .link_group(0)
                .address(mac.to_vec()),
        )
        .await
    }

    /// Deletes every link in link group `group` in one request (`ip link del group G`): the
    /// kernel unregisters them together, with one RCU grace period for all instead of one
    /// per link. Returns `false` if the group was empty.
    ///
    /// # Errors
    /// [`KernelError::Netlink`] for failures other than "no such device".
    pub async fn delete_group(&self, group: u32) -> Result<bool, KernelError> {
        match self
            .handle
            .link()
            .del_with_message(LinkUnspec::new_with_index(0).link_group(group).build())
            .execute()
            .await
        {
            Ok(()) => {
                debug!("ip link del group {group}");
                Ok(true)
            }
            Err(e) if rtnetlink_errno(&e) == Some(libc::ENODEV) => Ok(false),
            Err(e) => Err(nl_error(format!("delete link group {group}"))(e)),
        }
    }

    /// Sets a link's alias by name (`ip link set dev NAME alias ALIAS`).
    ///
    /// # Errors
    /// [`KernelError::Netlink`], `ENODEV` when there is no such link.
    pub async fn set_alias_by_name(&self, name: &str, alias: &str) -> Result<(), KernelError> {
        self.set_link(
            format!("ip link set dev {name} alias {alias}"),
            LinkUnspec::new_with_name(name).alias(alias),
        )
        .await
    }

    async fn set_link(
        &self,
        op: String,
        message: rtnetlink::LinkMessageBuilder<LinkUnspec>,
    ) -> Result<(), KernelError> {
        self.handle
            .link()
            .set(message.build())
            .execute()
            .await
            .map_err(nl_error(op.clone()))?;
        debug!("{op}");
        Ok(())
    }

    /// Sets the hardware address (`ip link set dev IDX address MAC`).
    ///
    /// # Errors
    /// [`KernelError::Netlink`].
    pub async fn set_mac(&self, index: u32, mac: [u8; 6]) -> Result<(), KernelError> {
        self.set_link(
            format!("ip link set dev #{index} address {}", format_mac(&mac)),
            LinkUnspec::new_with_index(index).address(mac.to_vec()),
        )
        .await
    }

    /// Attaches a link to a bridge (`ip link set dev IDX master BRIDGE`).
    ///
    /// # Errors
    /// [`KernelError::Netlink`], e.g. `EOPNOTSUPP` if `bridge_index` is not a bridge.
    pub async fn set_controller(&self, index: u32, bridge_index: u32) -> Result<(), KernelError> {
        self.set_link(
            format!("ip link set dev #{index} master #{bridge_index}"),
            LinkUnspec::new_with_index(index).controller(bridge_index),
        )
        .await
    }

    /// Sets the MTU (`ip link set dev IDX mtu MTU`).
    ///
    /// # Errors
    /// [`KernelError::Netlink`], `EINVAL` when the MTU is outside the device's range.
    pub async fn set_mtu(&self, index: u32, mtu: u32) -> Result<(), KernelError> {
        self.set_link(
            format!("ip link set dev #{index} mtu {mtu}"),
            LinkUnspec::new_with_index(index).mtu(mtu),
        )
        .await
    }

    /// Sets the link's alias (`ip link set dev IDX alias ALIAS`); sluice marks the links it
    /// owns this way.
    ///
    /// # Errors
    /// [`KernelError::Netlink`].
    pub async fn set_alias(&self, index: u32, alias: &str) -> Result<(), KernelError> {
        self.set_link(
            format!("ip link set dev #{index} alias {alias}"),
            LinkUnspec::new_with_index(index).alias(alias),
        )
        .await
    }

    /// Names and aliases of all links in the namespace (`ip link show`).
    ///
    /// # Errors
    /// [`KernelError::Netlink`] if the dump fails.
    pub async fn link_aliases(&self) -> Result<Vec<(String, Option<String>)>, KernelError> {
        let links: Vec<_> = self
            .handle
            .link()
            .get()
            .execute()
            .try_collect()
            .await
            .map_err(nl_error("dump links"))?;
        Ok(links
            .into_iter()
            .filter_map(|l| {
                let mut name = None;
                let mut alias = None;
                for a in l.attributes {
                    match a {
                        LinkAttribute::IfName(n) => name = Some(n),
                        LinkAttribute::IfAlias(a) => alias = Some(a),
                        _ => {}
                    }
                }
                name.map(|n| (n, alias))
            })
            .collect())
    }

    /// Brings a link up (`ip link set dev IDX up`).
    ///
    /// # Errors
    /// [`KernelError::Netlink`].
    pub async fn set_up(&self, index: u32) -> Result<(), KernelError> {
        self.set_link(
            format!("ip link set dev #{index} up"),
            LinkUnspec::new_with_index(index).up(),
        )
        .await
    }

    /// Adds an address with its prefix (`ip addr add ADDR/PREFIX dev IDX`, plus `nodad` for
    /// IPv6 so a gateway address is usable at once instead of staying tentative). An address
    /// that is already there is fine.
    ///
    /// # Errors
    /// [`KernelError::Netlink`] for anything but `EEXIST`.
    pub async fn add_address(&self, index: u32, address: IpNetwork) -> Result<(), KernelError> {
        let mut request = self
            .handle
            .address()
            .add(index, address.ip(), address.prefix());
        if address.is_ipv6() {
            let message = request.message_mut();
            message.header.flags |= AddressHeaderFlags::Nodad;
            message
                .attributes
                .push(AddressAttribute::Flags(AddressFlags::Nodad));
        }
        match request.execute().await {
            Ok(()) => {
                debug!(
                    "ip addr add {address} dev #{index}{}",
                    if address.is_ipv6() { " nodad" } else { "" }
                );
                Ok(())
            }
            Err(e) if rtnetlink_errno(&e) == Some(libc::EEXIST) => {
                debug!(%address, index, "address already present");
                Ok(())
            }
            Err(e) => Err(nl_error(format!("add address {address} to link #{index}"))(
                e,
            )),
        }
    }

    /// Addresses of a link (`ip addr show dev IDX`).
    ///
    /// # Errors
    /// [`KernelError::Netlink`] if the dump fails.
    pub async fn addresses(&self, index: u32) -> Result<Vec<IpNetwork>, KernelError> {
        let op = || format!("list addresses of link #{index}");
        let messages: Vec<_> = self
            .handle
            .address()
            .get()
            .set_link_index_filter(index)
            .execute()
            .try_collect()
            .await
            .map_err(nl_error(op()))?;
        let mut out = Vec::with_capacity(messages.len());
        for m in messages {
            // IFA_LOCAL is the interface's own address; IFA_ADDRESS is the peer's on
            // point-to-point links and equal to IFA_LOCAL otherwise. IPv6 sends only
            // IFA_ADDRESS.
            let mut local: Option<IpAddr> = None;
            let mut addr: Option<IpAddr> = None;
            for a in &m.attributes {
                match a {
                    AddressAttribute::Local(ip) => local = Some(*ip),
                    AddressAttribute::Address(ip) => addr = Some(*ip),
                    _ => {}
                }
            }
            if let Some(ip) = local.or(addr) {
                let net = IpNetwork::new(ip, m.header.prefix_len).map_err(|e| KernelError::Os {
                    op: op(),
                    message: e.to_string(),
                })?;
                out.push(net);
            }
        }
        Ok(out)
    }

    /// Deletes a link by name (`ip link del NAME`); deleting either end of a veth pair removes
    /// both. Returns `false` if there was no such link.
    ///
    /// # Errors
    /// [`KernelError::Netlink`] for failures other than "no such device".
    pub async fn delete_link(&self, name: &str) -> Result<bool, KernelError> {
        match self
            .handle
            .link()
            .del_with_message(LinkUnspec::new_with_name(name).build())
            .execute()
            .await
        {
            Ok(()) => {
                debug!("ip link del {name}");
                Ok(true)
            }
            Err(e) if rtnetlink_errno(&e) == Some(libc::ENODEV) => Ok(false),
            Err(e) => Err(nl_error(format!("delete link {name}"))(e)),
        }
    }
}

/// VXLAN devices, forwarding-database and neighbour entries (`mode=vxlan`,
/// [`crate::vxlan`]).
impl Netlink {
    /// The link holding `address` and its MTU (the VXLAN underlay), if any
    /// (`ip -j addr show to ADDR`).
    ///
    /// # Errors
    /// [`KernelError::Netlink`] if a dump fails.
    pub async fn link_of_address(
        &self,
        address: IpAddr,
    ) -> Result<Option<(u32, u32)>, KernelError> {
        let messages: Vec<_> = self
            .handle
            .address()
            .get()
            .execute()
            .try_collect()
            .await
            .map_err(nl_error("dump addresses"))?;
        let Some(index) = messages.iter().find_map(|m| {
            m.attributes
                .iter()
                .any(|a| matches!(a, AddressAttribute::Local(ip) | AddressAttribute::Address(ip) if *ip == address))
                .then_some(m.header.index)
        }) else {
            return Ok(None);
        };
        let mut links = pin!(self.handle.link().get().match_index(index).execute());
        let link = links
            .try_next()
            .await
            .map_err(nl_error(format!("look up link #{index}")))?;
        let mtu = link
            .and_then(|l| {
                l.attributes.into_iter().find_map(|a| match a {
                    LinkAttribute::Mtu(m) => Some(m),
                    _ => None,
                })
            })
            .unwrap_or(1500);
        Ok(Some((index, mtu)))
    }

    /// Creates a VXLAN device, down, without learning and with ARP/ND proxying from its
    /// neighbour table (`ip link add NAME type vxlan id VNI local LOCAL dstport PORT dev
    /// UNDERLAY nolearning proxy`).
    ///
    /// # Errors
    /// [`KernelError::Netlink`], with errno `EEXIST` if the name is taken.
    pub async fn create_vxlan(
        &self,
        name: &str,
        vni: u32,
        local: IpAddr,
        port: u16,
        underlay: Option<u32>,
    ) -> Result<(), KernelError> {
        let mut builder = rtnetlink::LinkVxlan::new(name, vni)
            .port(port)
            .learning(false)
            .proxy(true);
        builder = match local {
            IpAddr::V4(v4) => builder.local(v4),
            IpAddr::V6(v6) => builder.local6(v6),
        };
        if let Some(index) = underlay {
            builder = builder.dev(index);
        }
        self.handle
            .link()
            .add(builder.build())
            .execute()
            .await
            .map_err(nl_error(format!("create vxlan {name} id {vni}")))?;
        debug!(
            "ip link add {name} type vxlan id {vni} local {local} dstport {port} nolearning proxy"
        );
        Ok(())
    }

    /// Points `mac` at a remote VTEP in the VXLAN device's forwarding database, replacing
    /// what was there (`bridge fdb replace MAC dev IDX dst VTEP self permanent`).
    ///
    /// # Errors
    /// [`KernelError::Netlink`].
    pub async fn replace_fdb(
        &self,
        index: u32,
        mac: [u8; 6],
        dst: IpAddr,
    ) -> Result<(), KernelError> {
        self.handle
            .neighbours()
            .add_bridge(index, &mac)
            .flags(NeighbourFlags::Own)
            .destination(dst)
            .replace()
            .execute()
            .await
            .map_err(nl_error(format!(
                "bridge fdb replace {} dev #{index} dst {dst}",
                crate::model::format_mac(&mac)
            )))?;
        Ok(())
    }

    /// Removes `mac` from the VXLAN device's forwarding database (`bridge fdb del MAC dev
    /// IDX self`). Idempotent.
    ///
    /// # Errors
    /// [`KernelError::Netlink`] for anything but "not there".
    pub async fn delete_fdb(&self, index: u32, mac: [u8; 6]) -> Result<(), KernelError> {
        self.delete_bridge_fdb(index, mac, NeighbourFlags::Own, "")
            .await
    }

    /// A static entry in the forwarding database of the bridge that `index` is a port of
    /// (`bridge fdb replace MAC dev IDX master static`): frames to `mac` go to that port
    /// without the bridge having to learn it (the overlay fast path hands frames *from* it to
    /// endpoints directly, so the bridge would never learn it and would flood).
    ///
    /// # Errors
    /// [`KernelError::Netlink`].
    pub async fn replace_port_fdb(&self, index: u32, mac: [u8; 6]) -> Result<(), KernelError> {
        self.handle
            .neighbours()
            .add_bridge(index, &mac)
            .flags(NeighbourFlags::Controller)
            .state(NeighbourState::Noarp)
            .replace()
            .execute()
            .await
            .map_err(nl_error(format!(
                "bridge fdb replace {} dev #{index} master static",
                crate::model::format_mac(&mac)
            )))
    }

    /// Removes what [`Netlink::replace_port_fdb`] added. Idempotent.
    ///
    /// # Errors
    /// [`KernelError::Netlink`] for anything but "not there".
    pub async fn delete_port_fdb(&self, index: u32, mac: [u8; 6]) -> Result<(), KernelError> {
        self.delete_bridge_fdb(index, mac, NeighbourFlags::Controller, " master")
            .await
    }

    /// `bridge fdb del MAC dev IDX [master]`: `flags` say whose table (the device's own or
    /// its bridge's), `shown` is that for the error message. Idempotent.
    async fn delete_bridge_fdb(
        &self,
        index: u32,
        mac: [u8; 6],
        flags: NeighbourFlags,
        shown: &str,
    ) -> Result<(), KernelError> {
        let mut message = NeighbourMessage::default();
        message.header.family = AddressFamily::Bridge;
        message.header.ifindex = index;
        message.header.flags = flags;
        message
            .attributes
            .push(NeighbourAttribute::LinkLayerAddress(mac.to_vec()));
        ignore_missing(
            self.handle.neighbours().del(message).execute().await,
            format!(
                "bridge fdb del {} dev #{index}{shown}",
                crate::model::format_mac(&mac)
            ),
        )
    }

    /// A permanent neighbour entry (`ip neigh replace IP lladdr MAC dev IDX nud permanent`):
    /// on a VXLAN device with `proxy`, the device answers ARP and ND for it.
    ///
    /// # Errors
    /// [`KernelError::Netlink`].
    pub async fn replace_neighbour(
        &self,
        index: u32,
        ip: IpAddr,
        mac: [u8; 6],
    ) -> Result<(), KernelError> {
        self.handle
            .neighbours()
            .add(index, ip)
            .link_layer_address(&mac)
            .replace()
            .execute()
            .await
            .map_err(nl_error(format!(
                "ip neigh replace {ip} lladdr {} dev #{index}",
                crate::model::format_mac(&mac)
            )))?;
        Ok(())
    }

    /// Removes a neighbour entry (`ip neigh del IP dev IDX`). Idempotent.
    ///
    /// # Errors
    /// [`KernelError::Netlink`] for anything but "not there".
    pub async fn delete_neighbour(&self, index: u32, ip: IpAddr) -> Result<(), KernelError> {
        let mut message = NeighbourMessage::default();
        message.header.family = match ip {
            IpAddr::V4(_) => AddressFamily::Inet,
            IpAddr::V6(_) => AddressFamily::Inet6,
        };
        message.header.ifindex = index;
        message
            .attributes
            .push(NeighbourAttribute::Destination(match ip {
                IpAddr::V4(v4) => NeighbourAddress::Inet(v4),
                IpAddr::V6(v6) => NeighbourAddress::Inet6(v6),
            }));
        ignore_missing(
            self.handle.neighbours().del(message).execute().await,
            format!("ip neigh del {ip} dev #{index}"),
        )
    }
}

// ---------------------------------------------------------------------------------------------
// Traffic control (synchronous)
//
// The eBPF datapath attaches its programs while holding its own (blocking) lock, so these
// requests go over a short-lived blocking socket in the calling thread's network namespace,
// not through the async [`Netlink`] handle.

/// A hook of a device's `clsact` qdisc.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TcHook {
    /// What the device receives (for a host veth: what the container sends).
    Ingress,
    /// What the device transmits.
    Egress,
}

impl TcHook {
    fn parent(self) -> TcHandle {
        let minor = match self {
            Self::Ingress => TcHandle::MIN_INGRESS,
            Self::Egress => TcHandle::MIN_EGRESS,
        };
        TcHandle {
            major: TcHandle::CLSACT.major,
            minor,
        }
    }
}

/// Where a `cls_bpf` filter sits on a device: hook, priority and handle (`tc filter … pref
/// PRIORITY handle HANDLE bpf`). Fixed positions make attaching again a replace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TcSlot {
    /// The hook.
    pub hook: TcHook,
    /// The filter's priority (lower runs first).
    pub priority: u16,
    /// The filter's handle within its priority.
    pub handle: u32,
}

/// A direct-action `cls_bpf` filter to install: its slot and program.
#[derive(Debug, Clone, Copy)]
pub struct BpfFilter<'a> {
    /// Where it goes.
    pub slot: TcSlot,
    /// The program's name (shown by `tc filter show`).
    pub name: &'a str,
    /// The loaded program.
    pub program: std::os::fd::BorrowedFd<'a>,
}

/// `ETH_P_ALL` in network byte order, as `tc` puts it in `tcm_info`.
const TC_PROTOCOL_ALL: u16 = (libc::ETH_P_ALL as u16).to_be();

fn tc_filter_message(ifindex: u32, slot: TcSlot) -> io::Result<TcMessage> {
    let mut msg = TcMessage::default();
    msg.header.index = i32::try_from(ifindex).map_err(io::Error::other)?;
    msg.header.parent = slot.hook.parent();
    msg.header.handle = TcHandle::from(slot.handle);
    msg.header.info = (u32::from(slot.priority) << 16) | u32::from(TC_PROTOCOL_ALL);
    msg.attributes
        .push(TcAttribute::Kind(TcFilterBpf::KIND.to_owned()));
    Ok(msg)
}

/// Adds a `clsact` qdisc to `ifindex` if it has none and installs (or replaces in place, so
/// there is no moment without a program) each filter, like `tc qdisc add dev IF clsact; tc
/// filter replace dev IF {ingress,egress} pref P handle H bpf da fd …`, all in one send.
///
/// # Errors
/// The kernel's refusal (its errno) of any request other than "the qdisc exists".
pub fn tc_attach_bpf(ifindex: u32, filters: &[BpfFilter<'_>]) -> io::Result<()> {
    let mut qdisc = TcMessage::default();
    qdisc.header.index = i32::try_from(ifindex).map_err(io::Error::other)?;
    qdisc.header.parent = TcHandle::CLSACT;
    qdisc.header.handle = TcHandle {
        major: TcHandle::CLSACT.major,
        minor: 0,
    };
    qdisc
        .attributes
        .push(TcAttribute::Kind("clsact".to_owned()));
    let mut requests = vec![(
        RouteNetlinkMessage::NewQueueDiscipline(qdisc),
        NLM_F_CREATE | NLM_F_EXCL,
    )];
    for filter in filters {
        let mut msg = tc_filter_message(ifindex, filter.slot)?;
        msg.attributes.push(TcAttribute::Options(vec![
            TcOption::Bpf(TcFilterBpfOption::ProgFd(
                u32::try_from(filter.program.as_raw_fd()).map_err(io::Error::other)?,
            )),
            TcOption::Bpf(TcFilterBpfOption::ProgName(filter.name.to_owned())),
            TcOption::Bpf(TcFilterBpfOption::Flags(TcBpfFlags::DirectAction)),
        ]));
        // CREATE without EXCL: replace the filter at this slot if there is one.
        requests.push((RouteNetlinkMessage::NewTrafficFilter(msg), NLM_F_CREATE));
    }
    let results = tc_transact(requests)?;
    for (i, result) in results.into_iter().enumerate() {
        match result {
            Err(e) if i == 0 && e.raw_os_error() == Some(libc::EEXIST) => {}
            Err(e) => return Err(e),
            Ok(()) => {}
        }
    }
    debug!(ifindex, filters = filters.len(), "tc bpf filters replaced");
    Ok(())
}

/// Deletes the filters at `slots` of `ifindex` (`tc filter del dev IF … pref P handle H bpf`).
/// Idempotent: a missing device, qdisc or filter is not an error.
///
/// # Errors
/// The kernel's refusal for any other reason.
pub fn tc_detach_bpf(ifindex: u32, slots: &[TcSlot]) -> io::Result<()> {
    let requests = slots
        .iter()
        .map(|slot| {
            tc_filter_message(ifindex, *slot).map(|m| (RouteNetlinkMessage::DelTrafficFilter(m), 0))
        })
        .collect::<io::Result<Vec<_>>>()?;
    for result in tc_transact(requests)? {
        match result {
            // EINVAL: no clsact qdisc (so no filter) on the device.
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::ENOENT | libc::ENODEV | libc::EINVAL)
                ) => {}
            Err(e) => return Err(e),
            Ok(()) => {}
        }
    }
    Ok(())
}

/// The names of the `cls_bpf` programs on `hook` of `ifindex`, in the kernel's order (what
/// `tc filter show dev IF ingress|egress` lists). Empty without a `clsact` qdisc.
///
/// # Errors
/// A failed dump.
pub fn tc_bpf_programs(ifindex: u32, hook: TcHook) -> io::Result<Vec<String>> {
    let mut msg = TcMessage::default();
    msg.header.index = i32::try_from(ifindex).map_err(io::Error::other)?;
    msg.header.parent = hook.parent();
    let socket = tc_socket()?;
    tc_send(
        &socket,
        vec![(RouteNetlinkMessage::GetTrafficFilter(msg), NLM_F_DUMP)],
    )?;
    let mut names = Vec::new();
    loop {
        let (buf, _) = socket.recv_from_full()?;
        for message in tc_parse(&buf)? {
            match message.payload {
                NetlinkPayload::Done(_) => return Ok(names),
                NetlinkPayload::Error(e) => match e.code {
                    None => return Ok(names),
                    Some(c) if matches!(c.get().saturating_neg(), libc::EINVAL | libc::ENOENT) => {
                        return Ok(names);
                    }
                    Some(_) => return Err(e.to_io()),
                },
                NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewTrafficFilter(m)) => {
                    names.extend(m.attributes.iter().flat_map(|a| {
                        match a {
                            TcAttribute::Options(options) => options
                                .iter()
                                .filter_map(|o| match o {
                                    TcOption::Bpf(TcFilterBpfOption::ProgName(n)) => {
                                        Some(n.clone())
                                    }
                                    _ => None,
                                })
                                .collect(),
                            _ => Vec::new(),
                        }
                    }));
                }
                _ => {}
            }
        }
    }
}

fn tc_socket() -> io::Result<Socket> {
    let mut socket = Socket::new(NETLINK_ROUTE)?;
    socket.bind_auto()?;
    socket.connect(&SocketAddr::new(0, 0))?;
    Ok(socket)
}

/// Sends `requests` in one datagram, numbered from 1.
fn tc_send(socket: &Socket, requests: Vec<(RouteNetlinkMessage, u16)>) -> io::Result<()> {
    let mut buf = Vec::new();
    for (seq, (message, flags)) in (1..).zip(requests) {
        let mut msg = NetlinkMessage::new(
            NetlinkHeader::default(),
            NetlinkPayload::InnerMessage(message),
        );
        msg.header.flags = NLM_F_REQUEST | flags;
        msg.header.sequence_number = seq;
        msg.finalize();
        let start = buf.len();
        buf.resize(start + msg.buffer_len(), 0);
        msg.serialize(&mut buf[start..]);
    }
    socket.send(&buf, 0)?;
    Ok(())
}

fn tc_parse(buf: &[u8]) -> io::Result<Vec<NetlinkMessage<RouteNetlinkMessage>>> {
    let mut messages = Vec::new();
    let mut offset = 0;
    while offset < buf.len() {
        let message = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&buf[offset..])
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
        let len = usize::try_from(message.header.length).map_err(io::Error::other)?;
        if len == 0 {
            break;
        }
        offset += (len + 3) & !3;
        messages.push(message);
    }
    Ok(messages)
}

/// Sends `requests` (each acknowledged) in one datagram and returns each one's outcome.
fn tc_transact(requests: Vec<(RouteNetlinkMessage, u16)>) -> io::Result<Vec<io::Result<()>>> {
    let count = requests.len();
    let requests = requests
        .into_iter()
        .map(|(m, flags)| (m, flags | NLM_F_ACK))
        .collect();
    let socket = tc_socket()?;
    tc_send(&socket, requests)?;
    let mut results: Vec<Option<io::Result<()>>> = (0..count).map(|_| None).collect();
    while results.iter().any(Option::is_none) {
        let (buf, _) = socket.recv_from_full()?;
        for message in tc_parse(&buf)? {
            let NetlinkPayload::Error(e) = message.payload else {
                continue;
            };
            let slot = usize::try_from(message.header.sequence_number)
                .ok()
                .and_then(|seq| seq.checked_sub(1))
                .and_then(|i| results.get_mut(i));
            if let Some(slot) = slot {
                *slot = Some(match e.code {
                    None => Ok(()),
                    Some(_) => Err(e.to_io()),
                });
            }
        }
    }
    Ok(results.into_iter().flatten().collect())
}

fn ignore_missing(result: Result<(), rtnetlink::Error>, op: String) -> Result<(), KernelError> {
    match result {
        Ok(()) => {
            debug!("{op}");
            Ok(())
        }
        Err(e) if matches!(rtnetlink_errno(&e), Some(libc::ENOENT | libc::ENODEV)) => Ok(()),
        Err(e) => Err(nl_error(op)(e)),
    }
}

/// Where sysctls are written: `/proc/sys`, or the host's `/proc/sys/net` bind-mounted
/// elsewhere (a managed plugin's own `/proc/sys` is read-only, see docs/managed-plugin.md).
static PROC_SYS: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();

/// Sets the directory [`write_sysctl`] writes under (once, at start; later calls are ignored).
pub fn set_proc_sys(root: std::path::PathBuf) {
    let _ = PROC_SYS.set(root);
}

/// `<proc sys root>/<path>`.
#[must_use]
pub fn proc_sys_path(path: &str) -> std::path::PathBuf {
    PROC_SYS
        .get()
        .map_or_else(|| std::path::Path::new("/proc/sys"), |p| p.as_path())
        .join(path.trim_start_matches('/'))
}

/// Writes `value` to `/proc/sys/<path>` (`sysctl -w`, with `/` separators:
/// `net/ipv4/conf/slbr123/forwarding`).
///
/// `/proc/sys/net` resolves against the network namespace of the thread that opens the file,
/// so this writes synchronously on the calling thread (the write is a few bytes to procfs)
/// instead of going through tokio's blocking pool, whose threads may sit in another netns.
///
/// # Errors
/// [`KernelError::Os`] if the file cannot be written (e.g. no such interface or no IPv6).
pub fn write_sysctl(path: &str, value: &str) -> Result<(), KernelError> {
    let full = proc_sys_path(path);
    std::fs::write(&full, value).map_err(|e| KernelError::Os {
        op: format!("write {value} to {}", full.display()),
        message: e.to_string(),
    })?;
    debug!("sysctl -w {}={value}", path.replace('/', "."));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mac_is_formatted_like_ip() {
        assert_eq!(
            format_mac(&[0x02, 0, 0xab, 1, 2, 0xff]),
            "02:00:ab:01:02:ff"
        );
    }

    #[test]
    fn errno_is_positive_and_only_for_kernel_errors() {
        let os = KernelError::Os {
            op: "x".into(),
            message: "y".into(),
        };
        assert_eq!(errno(&os), None);
        let failed = KernelError::Netlink {
            op: "x".into(),
            source: rtnetlink::Error::RequestFailed,
        };
        assert_eq!(errno(&failed), None);
    }

    #[test]
    fn connect_outside_a_runtime_is_an_error() {
        let err = Netlink::connect().unwrap_err();
        assert!(err.to_string().contains("tokio runtime"), "{err}");
    }
}
