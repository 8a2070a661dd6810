//! Validation: a [`PolicyDoc`] that parsed is checked for meaning and compiled into the form
//! resolution works on. Every problem is reported (not just the first), each as
//! `policy "NAME": PATH: MESSAGE`, where PATH names the field (`ingress[0].ports[1]`).

use std::collections::BTreeSet;
use std::fmt::Write as _;

use ipnetwork::IpNetwork;

use super::document::{Action, Peer, PolicyDoc, PortSpec, PortValue, Protocol, Selector};

/// Most rules one direction of one policy may have (rule IDs give the index 11 bits).
pub const MAX_RULES_PER_DIRECTION: usize = 2048;
/// Longest policy name.
pub const MAX_NAME_LEN: usize = 63;

/// An inclusive destination port range.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub struct PortRange {
    /// First port.
    pub first: u16,
    /// Last port (≥ `first`).
    pub last: u16,
}

impl PortRange {
    /// True when `port` is in the range.
    #[must_use]
    pub fn contains(&self, port: u16) -> bool {
        (self.first..=self.last).contains(&port)
    }
}

impl std::fmt::Display for PortRange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.first == self.last {
            write!(f, "{}", self.first)
        } else {
            write!(f, "{}-{}", self.first, self.last)
        }
    }
}

/// A protocol with an optional port range (`None`: every port, and always `None` for
/// ICMP and any).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct PortMatch {
    pub(crate) protocol: Protocol,
    pub(crate) ports: Option<PortRange>,
}

/// A peer after validation. Small on purpose (40 bytes, no allocation for a CIDR without
/// `except`): a policy may hold 100k of them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum CompiledPeer {
    /// Endpoints matching the selector.
    Selector(Box<Selector>),
    /// Addresses in `net` outside every `except` prefix (all inside `net`, canonical).
    Cidr {
        net: IpNetwork,
        except: Box<[IpNetwork]>,
    },
}

/// `net` minus the `except` prefixes, as prefixes: what the datapath gets for a CIDR peer.
/// Computed when needed rather than kept (without `except` it is `net` alone).
pub(crate) fn cidr_pieces(net: IpNetwork, except: &[IpNetwork]) -> impl Iterator<Item = IpNetwork> {
    let split = if except.is_empty() {
        Vec::new()
    } else {
        subtract(net, except)
    };
    except.is_empty().then_some(net).into_iter().chain(split)
}

/// One rule after validation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct CompiledRule {
    pub(crate) action: Action,
    /// `None`: any peer.
    pub(crate) peers: Option<Vec<CompiledPeer>>,
    /// `None`: every protocol and port.
    pub(crate) ports: Option<Vec<PortMatch>>,
}

/// A policy after validation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct CompiledPolicy {
    pub(crate) ingress: Option<Vec<CompiledRule>>,
    pub(crate) egress: Option<Vec<CompiledRule>>,
}

impl CompiledPolicy {
    /// Every prefix the datapath needs an identity for: the CIDR peers minus their
    /// `except` prefixes ([`cidr_pieces`]); a prefix mentioned twice comes twice.
    pub(crate) fn cidr_pieces(&self) -> impl Iterator<Item = IpNetwork> + '_ {
        [&self.ingress, &self.egress]
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|rule| rule.peers.as_ref())
            .flatten()
            .flat_map(|peer| match peer {
                CompiledPeer::Cidr { net, except } => Some(cidr_pieces(*net, except)),
                CompiledPeer::Selector(_) => None,
            })
            .flatten()
    }

    /// [`CompiledPolicy::cidr_pieces`], each once.
    pub(crate) fn cidrs(&self) -> BTreeSet<IpNetwork> {
        self.cidr_pieces().collect()
    }
}

/// Checks `doc` and compiles it.
///
/// # Errors
/// Every problem found, one message each.
pub(crate) fn compile(doc: &PolicyDoc) -> Result<CompiledPolicy, Vec<String>> {
    let mut v = Validator {
        policy: doc.name.clone(),
        source: &doc.source,
        errors: Vec::new(),
    };
    v.name(&doc.name);
    v.selector("selector", &doc.selector);
    let ingress = doc.ingress.as_ref().map(|rules| {
        v.rule_count("ingress", rules.len());
        rules
            .iter()
            .enumerate()
            .map(|(i, r)| {
                v.rule(
                    &format!("ingress[{i}]"),
                    "from",
                    r.action,
                    r.from.as_deref(),
                    r.ports.as_deref(),
                )
            })
            .collect()
    });
    let egress = doc.egress.as_ref().map(|rules| {
        v.rule_count("egress", rules.len());
        rules
            .iter()
            .enumerate()
            .map(|(i, r)| {
                v.rule(
                    &format!("egress[{i}]"),
                    "to",
                    r.action,
                    r.to.as_deref(),
                    r.ports.as_deref(),
                )
            })
            .collect()
    });
    if v.errors.is_empty() {
        Ok(CompiledPolicy { ingress, egress })
    } else {
        Err(v.errors)
    }
}

struct Validator<'a> {
    policy: String,
    source: &'a super::lines::SourceLines,
    errors: Vec<String>,
}

impl Validator<'_> {
    fn error(&mut self, path: &str, message: impl std::fmt::Display) {
        let mut line = format!("policy {:?}: ", self.policy);
        if !path.is_empty() {
            let _ = write!(line, "{path}: ");
        }
        let _ = write!(line, "{message}");
        if let Some(n) = self.source.line(path).filter(|_| !path.is_empty()) {
            let _ = write!(line, " (line {n})");
        }
        self.errors.push(line);
    }

    fn name(&mut self, name: &str) {
        let ok_char = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.');
        if name.is_empty() {
            self.error("name", "must not be empty");
        } else if name.len() > MAX_NAME_LEN {
            self.error("name", format!("longer than {MAX_NAME_LEN} characters"));
        } else if !name.starts_with(|c: char| c.is_ascii_alphanumeric())
            || !name.chars().all(ok_char)
        {
            self.error(
                "name",
                "use letters, digits, '-', '_' and '.', starting with a letter or digit",
            );
        }
    }

    fn selector(&mut self, path: &str, s: &Selector) {
        if s.network.as_deref().is_some_and(str::is_empty) {
            self.error(&format!("{path}.network"), "must not be empty");
        }
        if s.name.as_deref().is_some_and(str::is_empty) {
            self.error(
                &format!("{path}.name"),
                "must not be empty (use \"*\" for any name)",
            );
        }
        if s.labels.keys().any(String::is_empty) {
            self.error(&format!("{path}.labels"), "a label key must not be empty");
        }
    }

    fn rule_count(&mut self, direction: &str, n: usize) {
        if n > MAX_RULES_PER_DIRECTION {
            self.error(
                direction,
                format!("{n} rules; at most {MAX_RULES_PER_DIRECTION} per direction"),
            );
        }
    }

    fn rule(
        &mut self,
        path: &str,
        peer_field: &str,
        action: Action,
        peers: Option<&[Peer]>,
        ports: Option<&[PortSpec]>,
    ) -> CompiledRule {
        let peers = peers.map(|list| {
            if list.is_empty() {
                self.error(
                    &format!("{path}.{peer_field}"),
                    format!("empty list; omit `{peer_field}` to match any peer"),
                );
            }
            let mut peers: Vec<CompiledPeer> = list
                .iter()
                .enumerate()
                .filter_map(|(i, p)| self.peer(&format!("{path}.{peer_field}[{i}]"), p))
                .collect();
            // Kept for as long as the policy is applied: no spare capacity (up to half).
            peers.shrink_to_fit();
            peers
        });
        let ports = ports.map(|list| {
            if list.is_empty() {
                self.error(
                    &format!("{path}.ports"),
                    "empty list; omit `ports` to match every protocol and port",
                );
            }
            list.iter()
                .enumerate()
                .filter_map(|(i, p)| self.port(&format!("{path}.ports[{i}]"), p))
                .collect()
        });
        CompiledRule {
            action,
            peers,
            ports,
        }
    }

    fn peer(&mut self, path: &str, p: &Peer) -> Option<CompiledPeer> {
        match (&p.selector, &p.cidr) {
            (Some(_), Some(_)) => {
                self.error(path, "give either `selector` or `cidr`, not both");
                None
            }
            (None, None) => {
                self.error(path, "a peer needs `selector` or `cidr`");
                None
            }
            (Some(s), None) => {
                if !p.except.is_empty() {
                    self.error(&format!("{path}.except"), "`except` needs `cidr`");
                }
                self.selector(&format!("{path}.selector"), s);
                Some(CompiledPeer::Selector(Box::new(s.clone())))
            }
            (None, Some(c)) => {
                let net = self.cidr(&format!("{path}.cidr"), c)?;
                let mut except = Vec::new();
                for (i, e) in p.except.iter().enumerate() {
                    let epath = format!("{path}.except[{i}]");
                    let Some(hole) = self.cidr(&epath, e) else {
                        continue;
                    };
                    if hole == net {
                        self.error(
                            &epath,
                            format!("{hole} is the whole cidr, so the peer would match nothing"),
                        );
                    } else if !net_contains(net, hole) {
                        self.error(&epath, format!("{hole} is not inside {net}"));
                    } else if !except.contains(&hole) {
                        except.push(hole);
                    }
                }
                except.sort();
                Some(CompiledPeer::Cidr {
                    net,
                    except: except.into_boxed_slice(),
                })
            }
        }
    }

    fn cidr(&mut self, path: &str, text: &str) -> Option<IpNetwork> {
        let net: IpNetwork = match text.trim().parse() {
            Ok(n) => n,
            Err(_) => {
                self.error(
                    path,
                    format!(
                        "invalid CIDR {text:?} (expected e.g. 10.0.0.0/8, 2001:db8::/32 or an address)"
                    ),
                );
                return None;
            }
        };
        if let IpNetwork::V6(v6) = net
            && v6.prefix() >= 96
            && v6.network().to_ipv4_mapped().is_some()
        {
            self.error(
                path,
                format!("{text} is an IPv4-mapped IPv6 range; write it as IPv4"),
            );
            return None;
        }
        if net.network() != net.ip() {
            self.error(
                path,
                format!(
                    "{text} has host bits set; the network is {}/{}",
                    net.network(),
                    net.prefix()
                ),
            );
            return None;
        }
        Some(net)
    }

    fn port(&mut self, path: &str, spec: &PortSpec) -> Option<PortMatch> {
        let ports = match (&spec.port, spec.protocol) {
            (None, protocol) => {
                return Some(PortMatch {
                    protocol,
                    ports: None,
                });
            }
            (Some(_), Protocol::Icmp) => {
                self.error(path, "icmp has no ports; remove `port`");
                return None;
            }
            (Some(_), Protocol::Any) => {
                self.error(
                    path,
                    "protocol any cannot have a port; list tcp and udp separately",
                );
                return None;
            }
            (Some(value), _) => parse_port(value),
        };
        match ports {
            Ok(range) => Some(PortMatch {
                protocol: spec.protocol,
                ports: Some(range),
            }),
            Err(message) => {
                self.error(path, message);
                None
            }
        }
    }
}

/// True when `inner` lies inside `outer` (same family, at least as long a prefix).
pub(crate) fn net_contains(outer: IpNetwork, inner: IpNetwork) -> bool {
    outer.is_ipv4() == inner.is_ipv4()
        && inner.prefix() >= outer.prefix()
        && outer.contains(inner.network())
}

/// `net` minus the `holes` (each inside `net`), as the fewest prefixes: halve `net` until
/// each half is either clear of every hole (kept) or inside one (dropped). At most
/// `(hole prefix − net prefix)` pieces per hole.
pub(crate) fn subtract(net: IpNetwork, holes: &[IpNetwork]) -> Vec<IpNetwork> {
    if holes.iter().any(|h| net_contains(*h, net)) {
        return Vec::new();
    }
    if !holes.iter().any(|h| net_contains(net, *h)) {
        return vec![net];
    }
    let len = net.prefix() + 1;
    let low = IpNetwork::new(net.network(), len);
    let high = match net.network() {
        std::net::IpAddr::V4(a) => {
            let bit = 1u32 << (32 - u32::from(len));
            IpNetwork::new(std::net::Ipv4Addr::from(u32::from(a) | bit).into(), len)
        }
        std::net::IpAddr::V6(a) => {
            let bit = 1u128 << (128 - u32::from(len));
            IpNetwork::new(std::net::Ipv6Addr::from(u128::from(a) | bit).into(), len)
        }
    };
    // A hole strictly inside `net` means `net` is not a host route, so both halves exist.
    [low, high]
        .into_iter()
        .flatten()
        .flat_map(|half| subtract(half, holes))
        .collect()
}

fn parse_port(value: &PortValue) -> Result<PortRange, String> {
    fn one(n: i64) -> Result<u16, String> {
        u16::try_from(n)
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| format!("port {n} is out of range 1-65535"))
    }
    let bad = |t: &str| {
        format!("invalid port {t:?} (expected a number 1-65535 or a range like \"1000-2000\")")
    };
    let (first, last) = match value {
        PortValue::Number(n) => {
            let p = one(*n)?;
            (p, p)
        }
        PortValue::Text(t) => {
            let num = |s: &str| s.trim().parse::<i64>().map_err(|_| bad(t));
            match t.split_once('-') {
                None => {
                    let p = one(num(t)?)?;
                    (p, p)
                }
                Some((a, b)) => (one(num(a)?)?, one(num(b)?)?),
            }
        }
    };
    if first > last {
        return Err(format!("port range {first}-{last} is reversed"));
    }
    Ok(PortRange { first, last })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::document::parse_documents;

    fn errors(yaml: &str) -> Vec<String> {
        let docs = parse_documents(yaml).unwrap();
        compile(&docs[0]).unwrap_err()
    }

    #[test]
    fn ports() {
        let ok = |v: PortValue| parse_port(&v).unwrap();
        assert_eq!(
            ok(PortValue::Number(80)),
            PortRange {
                first: 80,
                last: 80
            }
        );
        assert_eq!(
            ok(PortValue::Text(" 1000 - 2000 ".into())),
            PortRange {
                first: 1000,
                last: 2000
            }
        );
        assert_eq!(
            ok(PortValue::Text("65535".into())),
            PortRange {
                first: 65535,
                last: 65535
            }
        );
        let err = |v: PortValue| parse_port(&v).unwrap_err();
        assert_eq!(err(PortValue::Number(0)), "port 0 is out of range 1-65535");
        assert_eq!(
            err(PortValue::Number(70000)),
            "port 70000 is out of range 1-65535"
        );
        assert_eq!(
            err(PortValue::Text("2000-1000".into())),
            "port range 2000-1000 is reversed"
        );
        assert!(err(PortValue::Text("http".into())).contains("invalid port \"http\""));
        assert!(err(PortValue::Text("1-2-3".into())).contains("invalid port"));
    }

    #[test]
    fn every_error_is_reported_with_its_path() {
        let errs = errors(
            r#"
name: web-to-db
selector: {name: ""}
ingress:
  - action: allow
    from:
      - selector: {labels: {role: web}}
        cidr: 10.0.0.0/8
      - cidr: 10.1.2.3/8
      - cidr: 10.0.0.0/8
        except: [192.168.0.0/16, 10.0.0.0/8, nonsense]
      - {}
    ports:
      - {protocol: tcp, port: 5432}
      - {protocol: udp, port: "2000-1000"}
      - {protocol: icmp, port: 8}
      - {protocol: any, port: 1}
      - {protocol: tcp, port: 0}
egress:
  - action: deny
    to: []
    ports: []
  - action: allow
    to: [{selector: {}, except: [10.0.0.0/8]}]
"#,
        );
        let expected = [
            r#"policy "web-to-db": selector.name: must not be empty (use "*" for any name) (line 3)"#,
            r#"policy "web-to-db": ingress[0].from[0]: give either `selector` or `cidr`, not both (line 7)"#,
            r#"policy "web-to-db": ingress[0].from[1].cidr: 10.1.2.3/8 has host bits set; the network is 10.0.0.0/8 (line 9)"#,
            r#"policy "web-to-db": ingress[0].from[2].except[0]: 192.168.0.0/16 is not inside 10.0.0.0/8 (line 11)"#,
            r#"policy "web-to-db": ingress[0].from[2].except[1]: 10.0.0.0/8 is the whole cidr, so the peer would match nothing (line 11)"#,
            r#"policy "web-to-db": ingress[0].from[2].except[2]: invalid CIDR "nonsense" (expected e.g. 10.0.0.0/8, 2001:db8::/32 or an address) (line 11)"#,
            r#"policy "web-to-db": ingress[0].from[3]: a peer needs `selector` or `cidr` (line 12)"#,
            r#"policy "web-to-db": ingress[0].ports[1]: port range 2000-1000 is reversed (line 15)"#,
            r#"policy "web-to-db": ingress[0].ports[2]: icmp has no ports; remove `port` (line 16)"#,
            r#"policy "web-to-db": ingress[0].ports[3]: protocol any cannot have a port; list tcp and udp separately (line 17)"#,
            r#"policy "web-to-db": ingress[0].ports[4]: port 0 is out of range 1-65535 (line 18)"#,
            r#"policy "web-to-db": egress[0].to: empty list; omit `to` to match any peer (line 21)"#,
            r#"policy "web-to-db": egress[0].ports: empty list; omit `ports` to match every protocol and port (line 22)"#,
            r#"policy "web-to-db": egress[1].to[0].except: `except` needs `cidr` (line 24)"#,
        ];
        assert_eq!(errs, expected);
    }

    #[test]
    fn subtraction() {
        let net = |s: &str| s.parse::<IpNetwork>().unwrap();
        let text = |v: Vec<IpNetwork>| v.iter().map(ToString::to_string).collect::<Vec<_>>();
        assert_eq!(text(subtract(net("10.0.0.0/8"), &[])), ["10.0.0.0/8"]);
        assert_eq!(
            text(subtract(net("10.0.0.0/30"), &[net("10.0.0.1/32")])),
            ["10.0.0.0/32", "10.0.0.2/31"]
        );
        assert_eq!(
            subtract(net("0.0.0.0/0"), &[net("10.0.0.0/8")]).len(),
            8,
            "one piece per bit between the prefixes"
        );
        assert_eq!(subtract(net("::/0"), &[net("::1/128")]).len(), 128);
        // Nested holes: the outer one decides.
        assert_eq!(
            text(subtract(
                net("10.0.0.0/23"),
                &[net("10.0.0.0/24"), net("10.0.0.0/25")]
            )),
            ["10.0.1.0/24"]
        );
        // Every address is in exactly one of: a piece, a hole.
        let holes = [net("10.0.0.64/26"), net("10.0.0.5/32")];
        let pieces = subtract(net("10.0.0.0/24"), &holes);
        for last in 0..=255u8 {
            let a = std::net::IpAddr::from([10, 0, 0, last]);
            let in_piece = pieces.iter().filter(|p| p.contains(a)).count();
            let in_hole = holes.iter().any(|h| h.contains(a));
            assert_eq!(in_piece, usize::from(!in_hole), "{a}");
        }
    }

    #[test]
    fn ipv4_mapped_ranges_are_refused() {
        let errs = errors(
            "name: m\nselector: {}\negress: [{action: allow, to: [{cidr: \"::ffff:10.0.0.0/104\"}, {cidr: \"::/0\"}]}]\n",
        );
        assert_eq!(
            errs,
            [
                "policy \"m\": egress[0].to[0].cidr: ::ffff:10.0.0.0/104 is an IPv4-mapped IPv6 range; write it as IPv4 (line 3)"
            ]
        );
    }

    #[test]
    fn names() {
        for bad in ["", "-x", "a b", "a/b", &"x".repeat(64)] {
            let yaml = format!("name: {bad:?}\nselector: {{}}\n");
            let errs = errors(&yaml);
            assert!(errs[0].contains(": name: "), "{bad:?}: {errs:?}");
        }
        let docs = parse_documents("name: Web_db.v2-1\nselector: {}\n").unwrap();
        compile(&docs[0]).unwrap();
    }

    #[test]
    fn compiled_form() {
        let docs = parse_documents(
            r#"
name: p
selector: {}
ingress:
  - action: allow
    from:
      - cidr: 10.0.0.0/8
        except: [10.2.0.0/16, 10.1.0.0/16, 10.1.0.0/16]
      - cidr: 192.0.2.7
      - cidr: "2001:db8::/32"
    ports:
      - {protocol: tcp, port: "80"}
      - {protocol: udp}
"#,
        )
        .unwrap();
        let c = compile(&docs[0]).unwrap();
        assert!(c.egress.is_none());
        let rule = &c.ingress.as_ref().unwrap()[0];
        let net = |s: &str| s.parse::<IpNetwork>().unwrap();
        let CompiledPeer::Cidr { net: n, except } = &rule.peers.as_ref().unwrap()[0] else {
            panic!("not a cidr peer")
        };
        assert_eq!(*n, net("10.0.0.0/8"));
        assert_eq!(**except, [net("10.1.0.0/16"), net("10.2.0.0/16")]);
        let text =
            |v: &mut dyn Iterator<Item = IpNetwork>| v.map(|n| n.to_string()).collect::<Vec<_>>();
        assert_eq!(
            text(&mut cidr_pieces(*n, except)),
            [
                "10.0.0.0/16",
                "10.3.0.0/16",
                "10.4.0.0/14",
                "10.8.0.0/13",
                "10.16.0.0/12",
                "10.32.0.0/11",
                "10.64.0.0/10",
                "10.128.0.0/9"
            ]
        );
        // The datapath gets the pieces, the single address and the IPv6 range.
        let cidrs = c.cidrs();
        assert_eq!(cidrs.len(), 10);
        assert!(cidrs.contains(&net("192.0.2.7/32")));
        assert!(cidrs.contains(&net("2001:db8::/32")));
        assert_eq!(
            rule.ports.as_ref().unwrap(),
            &[
                PortMatch {
                    protocol: Protocol::Tcp,
                    ports: Some(PortRange {
                        first: 80,
                        last: 80
                    })
                },
                PortMatch {
                    protocol: Protocol::Udp,
                    ports: None
                },
            ]
        );
    }
}
