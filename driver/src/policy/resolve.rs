//! Resolution: the policies applied to the endpoints that exist right now, as flat
//! [`ResolvedRule`]s between identities, plus which directions are enforced for whom and the
//! CIDR identities the ipcache needs. [`Resolution::evaluate`] is the reference semantics:
//! a slow, obvious verdict function the datapath compiler can be tested against.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::IpAddr;

use ipnetwork::IpNetwork;
use serde::Serialize;

use super::IDENTITY_WORLD;
use super::document::{Action, Protocol};
use super::validate::{PortRange, net_contains};
use crate::model::{ContainerIdentity, Endpoint};

/// Endpoint driver options with this prefix are labels: `--driver-opt sluice.label.role=db`
/// gives the endpoint the label `role=db`.
pub const LABEL_OPTION_PREFIX: &str = "sluice.label.";

/// What resolution needs to know about one endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointView {
    /// Docker's endpoint ID.
    pub endpoint_id: String,
    /// The endpoint's security identity (`IDENTITY_FIRST_ENDPOINT..IDENTITY_FIRST_CIDR`).
    pub identity: u32,
    /// Docker's network ID.
    pub network_id: String,
    /// Container name; `None` while the Docker Engine API has not told it yet.
    pub name: Option<String>,
    /// Container labels merged with `sluice.label.*` endpoint options ([`merge_labels`]).
    pub labels: BTreeMap<String, String>,
    /// The endpoint's addresses (IPv4 and IPv6), without prefix length.
    pub addresses: Vec<IpAddr>,
}

impl EndpointView {
    /// The view of a stored endpoint, with the container identity when it is known.
    #[must_use]
    pub fn new(ep: &Endpoint, identity: u32, container: Option<&ContainerIdentity>) -> Self {
        Self {
            endpoint_id: ep.id.clone(),
            identity,
            network_id: ep.network_id.clone(),
            name: container.map(|c| c.name.clone()),
            labels: merge_labels(container.map(|c| &c.labels), &ep.options),
            addresses: ep
                .address
                .iter()
                .chain(ep.address_v6.iter())
                .map(IpNetwork::ip)
                .collect(),
        }
    }
}

/// The labels policy selectors see: the container's labels, then every endpoint option
/// `sluice.label.<key>=<value>` as label `<key>`. **An endpoint option wins** over a container
/// label of the same key: it is the more specific setting (one network attachment rather
/// than the whole container).
#[must_use]
pub fn merge_labels(
    container: Option<&BTreeMap<String, String>>,
    endpoint_options: &BTreeMap<String, String>,
) -> BTreeMap<String, String> {
    let mut labels = container.cloned().unwrap_or_default();
    for (k, v) in endpoint_options {
        if let Some(key) = k.strip_prefix(LABEL_OPTION_PREFIX)
            && !key.is_empty()
        {
            labels.insert(key.to_owned(), v.clone());
        }
    }
    labels
}

/// A Docker network, for `selector.network` references by name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkView {
    /// Full network ID.
    pub id: String,
    /// The network's name, when known (from the Docker Engine API).
    pub name: Option<String>,
}

/// Which way traffic goes, from the selected endpoint's point of view.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    /// To the endpoint.
    Ingress,
    /// From the endpoint.
    Egress,
}

impl fmt::Display for Direction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Ingress => "ingress",
            Self::Egress => "egress",
        })
    }
}

/// The other side of a [`ResolvedRule`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ResolvedPeer {
    /// Every peer.
    Any,
    /// An endpoint's identity.
    Identity(u32),
    /// Addresses in this prefix that are not sluice endpoints (the datapath gives the prefix
    /// an identity; a rule on it also covers every more specific policy prefix inside it).
    Cidr(IpNetwork),
}

/// One rule with its subjects and peer resolved: the input of the datapath's policy
/// compiler (`datapath::compile::Rule`, field for field; see [`Resolution::datapath_rules`]).
///
/// Field order is the sort order of [`Resolution::rules`].
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct ResolvedRule {
    /// Non-zero; names the policy, direction and rule index ([`super::RuleRef`]).
    pub rule_id: u32,
    /// Ingress (peer → subject) or egress (subject → peer).
    pub direction: Direction,
    /// Policy subjects of the selected endpoints (sorted, not empty): one per distinct set
    /// of policies selecting them ([`Resolution::subject_of`], `super::SubjectIds`).
    pub subjects: Vec<u32>,
    /// The other side.
    pub peer: ResolvedPeer,
    /// `Any` matches every IP protocol; `Icmp` matches ICMP and ICMPv6.
    pub protocol: Protocol,
    /// Destination ports; `None` for every port (always `None` for `Icmp` and `Any`).
    pub ports: Option<PortRange>,
    /// Allow or deny; deny wins over allow wherever both match.
    pub action: Action,
}

/// Which directions are default-deny for an endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct Enforcement {
    /// Some policy with an `ingress` section selects the endpoint.
    pub ingress: bool,
    /// Some policy with an `egress` section selects the endpoint.
    pub egress: bool,
}

impl Enforcement {
    /// Whether `direction` is enforced.
    #[must_use]
    pub fn get(&self, direction: Direction) -> bool {
        match direction {
            Direction::Ingress => self.ingress,
            Direction::Egress => self.egress,
        }
    }
}

/// What policy says about a new flow ([`Resolution::evaluate`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// No policy selects the endpoint in this direction: allowed.
    NotEnforced,
    /// An allow rule matched and no deny rule did.
    Allow {
        /// The lowest matching allow rule.
        rule_id: u32,
    },
    /// A deny rule matched.
    Deny {
        /// The lowest matching deny rule.
        rule_id: u32,
    },
    /// Enforced, and no rule matched.
    DefaultDeny,
}

impl Verdict {
    /// True for [`Verdict::NotEnforced`] and [`Verdict::Allow`].
    #[must_use]
    pub fn is_allowed(&self) -> bool {
        matches!(self, Self::NotEnforced | Self::Allow { .. })
    }
}

/// IP protocol numbers [`Resolution::evaluate`] knows.
const PROTO_ICMP: u8 = 1;
const PROTO_TCP: u8 = 6;
const PROTO_UDP: u8 = 17;
const PROTO_ICMPV6: u8 = 58;

/// The result of [`super::PolicyEngine::resolve`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Resolution {
    /// Every rule, sorted, without duplicates.
    pub rules: Vec<ResolvedRule>,
    /// Endpoints with at least one enforced direction (others are absent: not enforced).
    pub enforced: BTreeMap<u32, Enforcement>,
    /// Identity of every prefix in [`ResolvedRule::peer`]s (CIDR peers minus their
    /// `except`s): the ipcache entries besides the endpoints' own addresses. Allocated by
    /// the [`super::PolicyEngine`], stable while a policy mentions the prefix.
    pub cidr_identities: BTreeMap<IpNetwork, u32>,
    /// Endpoints whose container is not known yet (no name) although some policy's
    /// selector covers their network: their identity is pending, fail closed.
    pub pending: BTreeSet<u32>,
    /// Problems that do not stop resolution (e.g. an ambiguous network ID prefix).
    pub warnings: Vec<String>,
    /// Endpoint addresses → identity, for [`Resolution::identity_of`].
    pub(crate) endpoint_addresses: BTreeMap<IpAddr, u32>,
    /// Endpoint identity → policy subject, for every endpoint some policy selects (the
    /// datapath's `EndpointInfo::subject`; [`ResolvedRule::subjects`] are these).
    pub subject_of: BTreeMap<u32, u32>,
}

impl Resolution {
    /// Enforced directions of the endpoint with `identity`.
    #[must_use]
    pub fn enforced(&self, identity: u32) -> Enforcement {
        self.enforced.get(&identity).copied().unwrap_or_default()
    }

    /// Policy subject of the endpoint with `identity` (0, `SUBJECT_NONE`, when no policy
    /// selects it).
    #[must_use]
    pub fn subject(&self, identity: u32) -> u32 {
        self.subject_of.get(&identity).copied().unwrap_or(0)
    }

    /// The identity the datapath's ipcache gives `addr`: an endpoint's own address, else the
    /// longest CIDR prefix containing it, else `IDENTITY_WORLD`.
    #[must_use]
    pub fn identity_of(&self, addr: IpAddr) -> u32 {
        if let Some(id) = self.endpoint_addresses.get(&addr) {
            return *id;
        }
        self.cidr_identities
            .iter()
            .filter(|(net, _)| net.contains(addr))
            .max_by_key(|(net, _)| net.prefix())
            .map_or(IDENTITY_WORLD, |(_, id)| *id)
    }

    /// The verdict for the first packet of a flow: `subject` sends (`Egress`) to or receives
    /// (`Ingress`) from `peer` (an identity, see [`Resolution::identity_of`]), IP protocol
    /// `proto`, destination port `port` (ignored unless TCP or UDP). Deny wins over allow;
    /// an enforced direction with no matching rule denies. Replies of an allowed flow are
    /// the datapath's conntrack's business, not policy's.
    #[must_use]
    pub fn evaluate(
        &self,
        subject: u32,
        direction: Direction,
        peer: u32,
        proto: u8,
        port: u16,
    ) -> Verdict {
        if !self.enforced(subject).get(direction) {
            return Verdict::NotEnforced;
        }
        let peer_prefix = self
            .cidr_identities
            .iter()
            .find(|(_, id)| **id == peer)
            .map(|(net, _)| *net);
        let matching = self.rules.iter().filter(|r| {
            r.direction == direction
                && r.subjects.binary_search(&self.subject(subject)).is_ok()
                && match r.peer {
                    ResolvedPeer::Any => true,
                    ResolvedPeer::Identity(id) => id == peer,
                    // The ipcache's longest match gives an address inside `net` the identity
                    // of `net` or of a more specific policy prefix.
                    ResolvedPeer::Cidr(net) => peer_prefix.is_some_and(|p| net_contains(net, p)),
                }
                && match r.protocol {
                    Protocol::Any => true,
                    Protocol::Icmp => proto == PROTO_ICMP || proto == PROTO_ICMPV6,
                    Protocol::Tcp => proto == PROTO_TCP,
                    Protocol::Udp => proto == PROTO_UDP,
                }
                && r.ports.is_none_or(|range| range.contains(port))
        });
        let (mut allow, mut deny) = (None::<u32>, None::<u32>);
        for r in matching {
            let slot = match r.action {
                Action::Allow => &mut allow,
                Action::Deny => &mut deny,
            };
            *slot = Some(slot.map_or(r.rule_id, |v| v.min(r.rule_id)));
        }
        match (deny, allow) {
            (Some(rule_id), _) => Verdict::Deny { rule_id },
            (None, Some(rule_id)) => Verdict::Allow { rule_id },
            (None, None) => Verdict::DefaultDeny,
        }
    }

    /// [`Resolution::evaluate`] by addresses: `local` must be an endpoint's address.
    #[must_use]
    pub fn evaluate_addresses(
        &self,
        local: IpAddr,
        direction: Direction,
        remote: IpAddr,
        proto: u8,
        port: u16,
    ) -> Option<Verdict> {
        let subject = *self.endpoint_addresses.get(&local)?;
        Some(self.evaluate(subject, direction, self.identity_of(remote), proto, port))
    }
}

/// The endpoints a CIDR peer covers: a `cidr` matches every address in it, sluice
/// endpoints included (the datapath's ipcache gives an endpoint's address the endpoint's
/// identity, never a CIDR's, so they are listed as identities). An endpoint is covered when
/// one of its addresses is in `net` and in no `except` prefix.
pub(crate) fn cidr_endpoints(
    net: IpNetwork,
    except: &[IpNetwork],
    endpoint_addresses: &BTreeMap<IpAddr, u32>,
) -> BTreeSet<u32> {
    // A range query, not a scan: resolution calls this once per CIDR peer (100k of them).
    endpoint_addresses
        .range(net.network()..=net.broadcast())
        .filter(|(addr, _)| net.contains(**addr) && !except.iter().any(|e| e.contains(**addr)))
        .map(|(_, id)| *id)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_options_win_over_container_labels() {
        let container = BTreeMap::from([
            ("role".to_owned(), "web".to_owned()),
            ("team".to_owned(), "a".to_owned()),
        ]);
        let options = BTreeMap::from([
            ("sluice.label.role".to_owned(), "db".to_owned()),
            ("sluice.label.".to_owned(), "ignored".to_owned()),
            (
                "com.docker.network.endpoint.exposedports".to_owned(),
                "x".to_owned(),
            ),
        ]);
        let merged = merge_labels(Some(&container), &options);
        assert_eq!(
            merged,
            BTreeMap::from([
                ("role".to_owned(), "db".to_owned()),
                ("team".to_owned(), "a".to_owned()),
            ])
        );
        assert_eq!(merge_labels(None, &options).len(), 1);
    }

    #[test]
    fn view_of_an_endpoint() {
        let ep = Endpoint {
            id: "e1".into(),
            network_id: "n1".into(),
            host_veth: "h".into(),
            peer_veth: "p".into(),
            address: Some("10.0.0.5/24".parse().unwrap()),
            address_v6: Some("fd00::5/64".parse().unwrap()),
            mac: [0; 6],
            options: BTreeMap::from([("sluice.label.tier".into(), "1".into())]),
            sandbox_key: None,
            identity: 300,
            ifindex: 0,
            container: None,
            published: Vec::new(),
        };
        let v = EndpointView::new(&ep, 300, None);
        assert_eq!(v.name, None);
        assert_eq!(
            v.addresses,
            vec![
                "10.0.0.5".parse::<IpAddr>().unwrap(),
                "fd00::5".parse().unwrap()
            ]
        );
        assert_eq!(v.labels.get("tier").map(String::as_str), Some("1"));
        let c = ContainerIdentity {
            endpoint_id: "e1".into(),
            container_id: "c".into(),
            name: "db-1".into(),
            labels: BTreeMap::from([("tier".into(), "2".into()), ("x".into(), "y".into())]),
        };
        let v = EndpointView::new(&ep, 300, Some(&c));
        assert_eq!(v.name.as_deref(), Some("db-1"));
        assert_eq!(v.labels.get("tier").map(String::as_str), Some("1"));
        assert_eq!(v.labels.len(), 2);
    }
}
