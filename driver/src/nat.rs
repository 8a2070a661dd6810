//! North-south traffic in sluice's own nftables table: outbound masquerade, published ports
//! (DNAT), and the fences of `--internal` networks.
//!
//! The table, `inet sluice_<plugin name>`, belongs to one daemon (so parallel daemons with
//! different plugin names never touch each other's rules) and is always written whole: every
//! change renders the complete [`NatRuleset`] and replaces the table in ONE `nft -j -f -`
//! transaction (add, delete, add: atomic, and it works whether or not the table existed).
//! With nothing to hold, the table is deleted, so `docker network rm` of the last network
//! leaves no sluice rule behind. Rendering is pure ([`render`]) and unit-tested; applying is
//! [`Nat::apply`].
//!
//! What the table holds, per network, next to Docker's own bridge driver:
//! - `postrouting` (nat, srcnat): `ip saddr SUBNET oifname != BRIDGE masquerade` (Docker's
//!   `-s SUBNET ! -o docker0 -j MASQUERADE`; here not towards any sluice bridge, whose
//!   policies must see the container's own address), unless masquerade is off; IPv6 only with
//!   `sluice.ipv6-nat=true`. Also `oifname BRIDGE ip saddr 127.0.0.0/8 masquerade` (the host's
//!   `curl localhost:PORT`, which needs `route_localnet` on the bridge, as Docker does without
//!   its userland proxy) and hairpin masquerade for a container reaching a published port of
//!   its own network through a host address.
//! - `prerouting` and `output` (nat, dstnat): to local addresses (`fib daddr type local`),
//!   jump to `published`, which DNATs each published port to its container.
//! - `raw` (filter, prerouting, raw priority): packets from a bridge to 127.0.0.0/8 are
//!   dropped: `route_localnet` must not let containers reach the host's loopback services.
//! - `forward` and `input` (filter) for `--internal` networks: nothing is routed into or out
//!   of the bridge, and the host's addresses other than the gateway's are out of reach.

use std::net::IpAddr;
use std::path::PathBuf;

use ipnetwork::IpNetwork;
use nftables::batch::Batch;
use nftables::expr::{
    Expression, Fib, FibFlag, FibResult, Meta, MetaKey, NamedExpression, Payload, PayloadField,
    Prefix, SetItem,
};
use nftables::schema::{Chain, NfListObject, Nftables, Rule, Table};
use nftables::stmt::{Match, NAT, NATFamily, Operator, Statement};
use nftables::types::{NfChainPolicy, NfChainType, NfFamily, NfHook};
use serde::{Deserialize, Serialize};
use tracing::{debug, info};

use crate::kernel::KernelError;
use crate::names;

/// A transport protocol of a published port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Proto {
    /// TCP (Docker's 6).
    Tcp,
    /// UDP (17).
    Udp,
    /// SCTP (132).
    Sctp,
}

impl Proto {
    /// From the IP protocol number Docker sends (`Proto` of a port binding).
    #[must_use]
    pub fn from_number(n: u64) -> Option<Self> {
        match n {
            6 => Some(Self::Tcp),
            17 => Some(Self::Udp),
            132 => Some(Self::Sctp),
            _ => None,
        }
    }

    /// The name nftables and Docker users know it by.
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            Self::Tcp => "tcp",
            Self::Udp => "udp",
            Self::Sctp => "sctp",
        }
    }
}

impl std::fmt::Display for Proto {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// One `-p` binding as Docker asks for it (`com.docker.network.portmap`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortRequest {
    /// Protocol.
    pub proto: Proto,
    /// Port in the container.
    pub container_port: u16,
    /// Host address to listen on; `None` = all of the host's IPv4 addresses.
    pub host_ip: Option<IpAddr>,
    /// First acceptable host port; 0 = any free port.
    pub host_port: u16,
    /// Last acceptable host port (equal to `host_port` for a single port).
    pub host_port_end: u16,
}

/// A published port as sluice set it up: the host port is the one it reserved.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct PortBinding {
    /// Protocol.
    pub proto: Proto,
    /// Host address; `None` = every local IPv4 address.
    pub host_ip: Option<IpAddr>,
    /// Host port, reserved by sluice.
    pub host_port: u16,
    /// Port in the container.
    pub container_port: u16,
}

impl PortBinding {
    /// The binding as a request for exactly its host port (restoring it after a restart).
    #[must_use]
    pub fn as_request(&self) -> PortRequest {
        PortRequest {
            proto: self.proto,
            container_port: self.container_port,
            host_ip: self.host_ip,
            host_port: self.host_port,
            host_port_end: self.host_port,
        }
    }
}

impl std::fmt::Display for PortBinding {
    /// `0.0.0.0:8080->80/tcp`, as `docker ps` shows ports.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ip = self
            .host_ip
            .map_or_else(|| "0.0.0.0".to_owned(), |ip| ip.to_string());
        write!(
            f,
            "{ip}:{}->{}/{}",
            self.host_port, self.container_port, self.proto
        )
    }
}

/// A network as the NAT table sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkNat {
    /// The bridge.
    pub bridge: String,
    /// `--internal`: fenced in, nothing masqueraded or published.
    pub internal: bool,
    /// Subnets masqueraded on the way out (empty with masquerade off).
    pub masquerade: Vec<IpNetwork>,
    /// All subnets of the network (hairpin masquerade of published ports).
    pub subnets: Vec<IpNetwork>,
    /// The gateway addresses (on an internal network the only host addresses reachable).
    pub gateways: Vec<IpAddr>,
}

/// One published port of one container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublishedPort {
    /// The binding.
    pub binding: PortBinding,
    /// The container's address it is forwarded to.
    pub container_ip: IpAddr,
}

/// Everything sluice's table must hold.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct NatRuleset {
    /// Bridge-mode networks.
    pub networks: Vec<NetworkNat>,
    /// Published ports of running containers.
    pub ports: Vec<PublishedPort>,
}

impl NatRuleset {
    /// True when the table has nothing to hold (it is then deleted).
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.networks.is_empty() && self.ports.is_empty()
    }
}

/// Name of the table of the daemon serving plugin `plugin`: `sluice_<plugin>`, with every
/// character other than ASCII letters, digits and `_` replaced by `_`.
#[must_use]
pub fn table_name(plugin: &str) -> String {
    let safe: String = plugin
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    format!("sluice_{safe}")
}

const FAMILY: NfFamily = NfFamily::INet;
/// Chain names inside the table.
const PREROUTING: &str = "prerouting";
const OUTPUT: &str = "output";
const POSTROUTING: &str = "postrouting";
const PUBLISHED: &str = "published";
const RAW: &str = "raw";
const FORWARD: &str = "forward";
const INPUT: &str = "input";
/// Priorities: `dstnat`, `srcnat`, `raw`, `filter`.
const PRIO_DSTNAT: i32 = -100;
const PRIO_SRCNAT: i32 = 100;
const PRIO_RAW: i32 = -300;
const PRIO_FILTER: i32 = 0;

fn s(v: impl Into<String>) -> Expression<'static> {
    Expression::String(v.into().into())
}

fn meta(key: MetaKey) -> Expression<'static> {
    Expression::Named(NamedExpression::Meta(Meta { key }))
}

fn field(protocol: &'static str, name: &'static str) -> Expression<'static> {
    Expression::Named(NamedExpression::Payload(Payload::PayloadField(
        PayloadField {
            protocol: protocol.into(),
            field: name.into(),
        },
    )))
}

fn matches(
    left: Expression<'static>,
    op: Operator,
    right: Expression<'static>,
) -> Statement<'static> {
    Statement::Match(Match { left, right, op })
}

fn eq(left: Expression<'static>, right: Expression<'static>) -> Statement<'static> {
    matches(left, Operator::EQ, right)
}

fn ne(left: Expression<'static>, right: Expression<'static>) -> Statement<'static> {
    matches(left, Operator::NEQ, right)
}

fn prefix(net: IpNetwork) -> Expression<'static> {
    Expression::Named(NamedExpression::Prefix(Prefix {
        addr: Box::new(s(net.network().to_string())),
        len: u32::from(net.prefix()),
    }))
}

fn addr_set(items: Vec<Expression<'static>>) -> Expression<'static> {
    Expression::Named(NamedExpression::Set(
        items.into_iter().map(SetItem::Element).collect(),
    ))
}

/// `fib daddr type local`.
fn daddr_is_local() -> Statement<'static> {
    eq(
        Expression::Named(NamedExpression::Fib(Fib {
            result: FibResult::Type,
            flags: [FibFlag::Daddr].into_iter().collect(),
        })),
        s("local"),
    )
}

fn family_of(ip: IpAddr) -> (&'static str, NATFamily) {
    match ip {
        IpAddr::V4(_) => ("ip", NATFamily::IP),
        IpAddr::V6(_) => ("ip6", NATFamily::IP6),
    }
}

fn net_family(net: IpNetwork) -> &'static str {
    if net.is_ipv4() { "ip" } else { "ip6" }
}

fn masquerade() -> Statement<'static> {
    Statement::Masquerade(None)
}

fn drop() -> Statement<'static> {
    Statement::Drop(None)
}

/// The complete batch that makes the table exactly `rules` (or removes it when empty).
#[must_use]
pub fn render(table: &str, rules: &NatRuleset) -> Nftables<'static> {
    let mut batch = Batch::new();
    let tbl = || Table {
        family: FAMILY,
        name: table.to_owned().into(),
        handle: None,
    };
    // add + delete: removes the table whether or not it existed, in the same transaction.
    batch.add(NfListObject::Table(tbl()));
    batch.delete(NfListObject::Table(tbl()));
    if rules.is_empty() {
        return batch.to_nftables();
    }
    batch.add(NfListObject::Table(tbl()));
    let base = |name: &'static str, kind: NfChainType, hook: NfHook, prio: i32| Chain {
        family: FAMILY,
        table: table.to_owned().into(),
        name: name.into(),
        _type: Some(kind),
        hook: Some(hook),
        prio: Some(prio),
        policy: Some(NfChainPolicy::Accept),
        ..Chain::default()
    };
    for chain in [
        base(
            PREROUTING,
            NfChainType::NAT,
            NfHook::Prerouting,
            PRIO_DSTNAT,
        ),
        base(OUTPUT, NfChainType::NAT, NfHook::Output, PRIO_DSTNAT),
        base(
            POSTROUTING,
            NfChainType::NAT,
            NfHook::Postrouting,
            PRIO_SRCNAT,
        ),
        base(RAW, NfChainType::Filter, NfHook::Prerouting, PRIO_RAW),
        base(FORWARD, NfChainType::Filter, NfHook::Forward, PRIO_FILTER),
        base(INPUT, NfChainType::Filter, NfHook::Input, PRIO_FILTER),
    ] {
        batch.add(NfListObject::Chain(chain));
    }
    batch.add(NfListObject::Chain(Chain {
        family: FAMILY,
        table: table.to_owned().into(),
        name: PUBLISHED.into(),
        ..Chain::default()
    }));
    let jumps = [
        NatRule::new(
            PREROUTING,
            vec![daddr_is_local(), jump(PUBLISHED)],
            "published ports".into(),
        ),
        NatRule::new(
            OUTPUT,
            vec![daddr_is_local(), jump(PUBLISHED)],
            "published ports, from the host".into(),
        ),
    ];
    let network_rules = rules.networks.iter().flat_map(|net| {
        if net.internal {
            internal_rules(net)
        } else {
            outbound_rules(net)
        }
    });
    let port_rules = rules.ports.iter().map(published_rule);
    for r in jumps.into_iter().chain(network_rules).chain(port_rules) {
        batch.add(NfListObject::Rule(Rule {
            family: FAMILY,
            table: table.to_owned().into(),
            chain: r.chain.into(),
            expr: r.expr.into(),
            handle: None,
            index: None,
            comment: Some(r.comment.into()),
        }));
    }
    batch.to_nftables()
}

/// One rule of the table, before it is put in the batch.
struct NatRule {
    chain: &'static str,
    expr: Vec<Statement<'static>>,
    comment: String,
}

impl NatRule {
    fn new(chain: &'static str, expr: Vec<Statement<'static>>, comment: String) -> Self {
        Self {
            chain,
            expr,
            comment,
        }
    }
}

fn jump(chain: &'static str) -> Statement<'static> {
    Statement::Jump(nftables::stmt::JumpTarget {
        target: chain.into(),
    })
}

/// The fences of an `--internal` network: nothing routed in or out of its bridge, no host
/// address but the gateway's (and IPv6 link-local, for neighbour discovery).
fn internal_rules(net: &NetworkNat) -> Vec<NatRule> {
    let br = || s(net.bridge.clone());
    let mut rules = vec![
        NatRule::new(
            FORWARD,
            vec![
                eq(meta(MetaKey::Iifname), br()),
                ne(meta(MetaKey::Oifname), br()),
                drop(),
            ],
            format!("{}: internal, nothing routed out", net.bridge),
        ),
        NatRule::new(
            FORWARD,
            vec![
                eq(meta(MetaKey::Oifname), br()),
                ne(meta(MetaKey::Iifname), br()),
                drop(),
            ],
            format!("{}: internal, nothing routed in", net.bridge),
        ),
    ];
    for (family, nfproto) in [("ip", "ipv4"), ("ip6", "ipv6")] {
        let mut allowed: Vec<Expression<'static>> = net
            .gateways
            .iter()
            .filter(|g| family_of(**g).0 == family)
            .map(|g| s(g.to_string()))
            .collect();
        if family == "ip6" {
            allowed.push(raw_prefix("fe80::", 10));
        }
        let mut expr = vec![
            eq(meta(MetaKey::Iifname), br()),
            eq(meta(MetaKey::Nfproto), s(nfproto)),
            daddr_is_local(),
        ];
        if !allowed.is_empty() {
            expr.push(ne(field(family, "daddr"), addr_set(allowed)));
        }
        expr.push(drop());
        rules.push(NatRule::new(
            INPUT,
            expr,
            format!("{}: internal, no host address but the gateway", net.bridge),
        ));
    }
    rules
}

/// A network with a way out: masquerade of its listed subnets, the loopback fence that
/// `route_localnet` needs, masquerade of the host's loopback and of hairpin traffic to
/// published ports.
fn outbound_rules(net: &NetworkNat) -> Vec<NatRule> {
    let br = || s(net.bridge.clone());
    let mut rules = vec![NatRule::new(
        RAW,
        vec![
            eq(meta(MetaKey::Iifname), br()),
            eq(field("ip", "daddr"), loopback_v4()),
            drop(),
        ],
        format!(
            "{}: no loopback from containers (route_localnet)",
            net.bridge
        ),
    )];
    for subnet in &net.masquerade {
        rules.push(NatRule::new(
            POSTROUTING,
            vec![
                eq(field(net_family(*subnet), "saddr"), prefix(*subnet)),
                // Not towards sluice bridges (this one or another network's): containers
                // keep their addresses, hence their identities at the peer's policy.
                ne(
                    meta(MetaKey::Oifname),
                    s(format!("{}*", names::BRIDGE_PREFIX)),
                ),
                masquerade(),
            ],
            format!("{}: outbound masquerade", net.bridge),
        ));
    }
    rules.push(NatRule::new(
        POSTROUTING,
        vec![
            eq(meta(MetaKey::Oifname), br()),
            eq(field("ip", "saddr"), loopback_v4()),
            masquerade(),
        ],
        format!("{}: published ports from the host's loopback", net.bridge),
    ));
    for subnet in &net.subnets {
        rules.push(NatRule::new(
            POSTROUTING,
            vec![
                eq(meta(MetaKey::Oifname), br()),
                eq(field(net_family(*subnet), "saddr"), prefix(*subnet)),
                eq(
                    Expression::Named(NamedExpression::CT(nftables::expr::CT {
                        key: "status".into(),
                        family: None,
                        dir: None,
                    })),
                    s("dnat"),
                ),
                masquerade(),
            ],
            format!("{}: hairpin to published ports", net.bridge),
        ));
    }
    rules
}

/// The DNAT of one published port (to local destination addresses, see the jumps).
fn published_rule(port: &PublishedPort) -> NatRule {
    let b = port.binding;
    let (family, nat_family) = family_of(port.container_ip);
    let mut expr = Vec::new();
    if let Some(ip) = b.host_ip {
        expr.push(eq(field(family_of(ip).0, "daddr"), s(ip.to_string())));
    } else {
        let nfproto = if family == "ip" { "ipv4" } else { "ipv6" };
        expr.push(eq(meta(MetaKey::Nfproto), s(nfproto)));
    }
    expr.push(eq(meta(MetaKey::L4proto), s(b.proto.name())));
    expr.push(eq(
        field("th", "dport"),
        Expression::Number(u32::from(b.host_port)),
    ));
    expr.push(Statement::DNAT(Some(NAT {
        addr: Some(s(port.container_ip.to_string())),
        family: Some(nat_family),
        port: Some(Expression::Number(u32::from(b.container_port))),
        flags: None,
    })));
    NatRule::new(PUBLISHED, expr, format!("{b} ({})", port.container_ip))
}

fn loopback_v4() -> Expression<'static> {
    raw_prefix("127.0.0.0", 8)
}

fn raw_prefix(addr: &'static str, len: u32) -> Expression<'static> {
    Expression::Named(NamedExpression::Prefix(Prefix {
        addr: Box::new(s(addr)),
        len,
    }))
}

/// Applies [`NatRuleset`]s to the table of one daemon through `nft -j -f -`.
#[derive(Debug, Clone)]
pub struct Nat {
    table: String,
    nft: Option<PathBuf>,
}

impl Nat {
    /// The table of the daemon serving plugin `plugin`, applied with the `nft` found in
    /// `$PATH` or the usual sbin directories.
    #[must_use]
    pub fn new(plugin: &str) -> Self {
        Self {
            table: table_name(plugin),
            nft: crate::firewall::find_tool("nft"),
        }
    }

    /// The table's name (`sluice_<plugin>`).
    #[must_use]
    pub fn table(&self) -> &str {
        &self.table
    }

    /// Makes the table hold exactly `rules`, in one transaction.
    ///
    /// # Errors
    /// [`KernelError::Os`] with nft's message when `nft` is missing or refuses the batch
    /// (the table is then as it was).
    pub async fn apply(&self, rules: &NatRuleset) -> Result<(), KernelError> {
        let op = format!("nft: write table inet {}", self.table);
        let nft = self.nft.as_ref().ok_or_else(|| KernelError::Os {
            op: op.clone(),
            message: "nft not found (apt-get install nftables)".into(),
        })?;
        let batch = render(&self.table, rules);
        let no_args: [&str; 0] = [];
        match nftables::helper::apply_ruleset_with_args_async(&batch, Some(nft), no_args).await {
            Ok(()) => {
                if rules.is_empty() {
                    debug!(table = %self.table, "nft: table removed (nothing to hold)");
                } else {
                    info!(
                        table = %self.table,
                        networks = rules.networks.len(),
                        ports = rules.ports.len(),
                        "nft: table written"
                    );
                }
                Ok(())
            }
            Err(nftables::helper::NftablesError::NftFailed { stderr, hint, .. }) => {
                Err(KernelError::Os {
                    op,
                    message: format!("{hint}: {}", stderr.trim()),
                })
            }
            Err(e) => Err(KernelError::Os {
                op,
                message: e.to_string(),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ruleset() -> NatRuleset {
        NatRuleset {
            networks: vec![
                NetworkNat {
                    bridge: "slbrout".into(),
                    internal: false,
                    masquerade: vec!["10.34.1.0/24".parse().unwrap()],
                    subnets: vec!["10.34.1.0/24".parse().unwrap()],
                    gateways: vec!["10.34.1.1".parse().unwrap()],
                },
                NetworkNat {
                    bridge: "slbrint".into(),
                    internal: true,
                    masquerade: vec![],
                    subnets: vec!["10.34.2.0/24".parse().unwrap()],
                    gateways: vec!["10.34.2.1".parse().unwrap()],
                },
            ],
            ports: vec![PublishedPort {
                binding: PortBinding {
                    proto: Proto::Tcp,
                    host_ip: None,
                    host_port: 8080,
                    container_port: 80,
                },
                container_ip: "10.34.1.2".parse().unwrap(),
            }],
        }
    }

    fn rules_of(batch: &Nftables<'_>) -> Vec<serde_json::Value> {
        let json = serde_json::to_value(batch).unwrap();
        json["nftables"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|o| o.get("add").and_then(|a| a.get("rule")).cloned())
            .collect()
    }

    #[test]
    fn table_names_are_per_plugin_and_safe() {
        assert_eq!(table_name("sluice"), "sluice_sluice");
        assert_eq!(table_name("slt12n0"), "sluice_slt12n0");
        assert_eq!(table_name("my-plugin.v2"), "sluice_my_plugin_v2");
    }

    #[test]
    fn empty_ruleset_only_removes_the_table() {
        let json = serde_json::to_value(render("sluice_t", &NatRuleset::default())).unwrap();
        let cmds = json["nftables"].as_array().unwrap();
        assert_eq!(cmds.len(), 2, "{json}");
        assert!(cmds[0]["add"]["table"]["name"] == "sluice_t");
        assert!(cmds[1]["delete"]["table"]["name"] == "sluice_t");
    }

    #[test]
    fn masquerade_dnat_and_internal_fences_are_rendered() {
        let batch = render("sluice_t", &ruleset());
        let rules = rules_of(&batch);
        let text = serde_json::to_string(&rules).unwrap();
        let in_chain = |chain: &str| {
            rules
                .iter()
                .filter(|r| r["chain"] == chain)
                .map(|r| r["expr"].to_string())
                .collect::<Vec<_>>()
        };
        let post = in_chain(POSTROUTING);
        assert!(
            post.iter()
                .any(|r| r.contains("10.34.1.0") && r.contains("masquerade") && r.contains("!=")),
            "{post:?}"
        );
        assert!(
            !post
                .iter()
                .any(|r| r.contains("10.34.2.0") && !r.contains("dnat")),
            "internal never masqueraded: {post:?}"
        );
        let published = in_chain(PUBLISHED);
        assert_eq!(published.len(), 1);
        assert!(
            published[0].contains("\"dnat\"")
                && published[0].contains("10.34.1.2")
                && published[0].contains("8080")
        );
        let forward = in_chain(FORWARD);
        assert_eq!(forward.len(), 2, "{forward:?}");
        assert!(forward.iter().all(|r| r.contains("slbrint")));
        let input = in_chain(INPUT);
        assert!(
            input
                .iter()
                .any(|r| r.contains("10.34.2.1") && r.contains("drop")),
            "{input:?}"
        );
        assert!(
            text.contains("127.0.0.0"),
            "loopback fence and host masquerade"
        );
    }

    #[test]
    fn masquerade_off_leaves_no_masquerade_for_the_subnet() {
        let mut rules = ruleset();
        rules.networks[0].masquerade.clear();
        let post: Vec<String> = rules_of(&render("sluice_t", &rules))
            .iter()
            .filter(|r| r["chain"] == POSTROUTING)
            .map(|r| r["expr"].to_string())
            .collect();
        assert!(
            !post
                .iter()
                .any(|r| r.contains("10.34.1.0") && r.contains("!=")),
            "{post:?}"
        );
    }

    #[test]
    fn ipv6_subnets_are_masqueraded_only_when_listed() {
        let v6: IpNetwork = "fd38:8::/64".parse().unwrap();
        let mut rules = ruleset();
        rules.networks[0].subnets.push(v6);
        let post = |rules: &NatRuleset| -> Vec<String> {
            rules_of(&render("sluice_t", rules))
                .iter()
                .filter(|r| r["chain"] == POSTROUTING && r.to_string().contains("slbr*"))
                .map(|r| r["expr"].to_string())
                .collect()
        };
        assert!(
            !post(&rules).iter().any(|r| r.contains("fd38:8::")),
            "routed by default"
        );
        rules.networks[0].masquerade.push(v6);
        let with_nat = post(&rules);
        assert!(
            with_nat
                .iter()
                .any(|r| r.contains("fd38:8::") && r.contains("\"ip6\"")),
            "{with_nat:?}"
        );
    }

    #[test]
    fn bindings_print_like_docker_ps() {
        let b = PortBinding {
            proto: Proto::Udp,
            host_ip: Some("127.0.0.1".parse().unwrap()),
            host_port: 5353,
            container_port: 53,
        };
        assert_eq!(b.to_string(), "127.0.0.1:5353->53/udp");
        assert_eq!(Proto::from_number(6), Some(Proto::Tcp));
        assert_eq!(Proto::from_number(1), None);
    }
}
