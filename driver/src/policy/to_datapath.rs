//! From a [`Resolution`] to the datapath's policy compiler (`crate::datapath::compile`):
//! [`ResolvedRule`] maps onto `compile::Rule` field for field, and the CIDR identities the
//! policy engine allocated are handed to the compiler, which then assigns none of its own.

use crate::datapath::compile::{self, CidrIdentities, CompileError, CompiledPolicy};

use super::document::{Action, Protocol};
use super::resolve::{Direction, Resolution, ResolvedPeer, ResolvedRule};

impl ResolvedRule {
    /// The compiler's form of this rule.
    #[must_use]
    pub fn to_datapath(&self) -> compile::Rule {
        self.clone().into_datapath()
    }

    /// [`ResolvedRule::to_datapath`], moving the subjects instead of copying them.
    #[must_use]
    pub fn into_datapath(self) -> compile::Rule {
        compile::Rule {
            id: self.rule_id,
            subjects: self.subjects,
            direction: match self.direction {
                Direction::Ingress => compile::Direction::Ingress,
                Direction::Egress => compile::Direction::Egress,
            },
            peer: match self.peer {
                ResolvedPeer::Any => compile::Peer::Any,
                ResolvedPeer::Identity(id) => compile::Peer::Identity(id),
                ResolvedPeer::Cidr(net) => compile::Peer::Cidr(net),
            },
            protocol: match self.protocol {
                Protocol::Any => compile::Protocol::Any,
                Protocol::Tcp => compile::Protocol::Tcp,
                Protocol::Udp => compile::Protocol::Udp,
                Protocol::Icmp => compile::Protocol::Icmp,
            },
            ports: self.ports.map(|p| compile::PortRange {
                first: p.first,
                last: p.last,
            }),
            action: match self.action {
                Action::Allow => compile::Action::Allow,
                Action::Deny => compile::Action::Deny,
            },
        }
    }
}

impl Resolution {
    /// Every rule in the compiler's form.
    #[must_use]
    pub fn datapath_rules(&self) -> Vec<compile::Rule> {
        self.rules.iter().map(ResolvedRule::to_datapath).collect()
    }

    /// The CIDR identities of this resolution, for the compiler. Build it afresh for each
    /// compilation: it already holds every prefix the rules mention, so the compiler keeps
    /// the policy engine's (persisted, stable) identities instead of choosing its own.
    #[must_use]
    pub fn datapath_cidr_identities(&self) -> CidrIdentities {
        CidrIdentities::from_assignments(self.cidr_identities.clone())
    }

    /// Compiles this resolution into the `POLICY` and `IPCACHE` entries policy owns.
    ///
    /// # Errors
    /// The compiler's, which would be a bug here (validation and resolution produce only
    /// rules it accepts).
    pub fn compile(&self) -> Result<CompiledPolicy, CompileError> {
        let mut cidrs = self.datapath_cidr_identities();
        compile::compile(&self.datapath_rules(), &mut cidrs)
    }

    /// [`Resolution::compile`], taking the rules and CIDR identities out of the resolution
    /// (left empty) instead of copying them: with a 100k-CIDR policy the copies were the
    /// largest part of an apply's peak.
    ///
    /// # Errors
    /// As [`Resolution::compile`].
    pub fn take_compiled(&mut self) -> Result<CompiledPolicy, CompileError> {
        let rules: Vec<compile::Rule> = std::mem::take(&mut self.rules)
            .into_iter()
            .map(ResolvedRule::into_datapath)
            .collect();
        let cidrs = CidrIdentities::from_assignments(std::mem::take(&mut self.cidr_identities));
        compile::compile_owned(&rules, cidrs)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeSet, HashMap};

    use sluice_common::{
        DIR_EGRESS, DIR_INGRESS, IDENTITY_ANY, IDENTITY_WORLD, PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP,
        PROTO_UDP, PolicyKey, PolicyValue, VERDICT_DENY,
    };

    use super::*;
    use crate::policy::{EndpointView, NetworkView, PolicyEngine, Verdict, parse_documents};

    /// The `POLICY` entries by key space (subject, peer, direction), so that a lookup scans
    /// one key space as the kernel's trie effectively does.
    type Spaces = HashMap<(u32, u32, u8), Vec<(u32, PolicyKey, PolicyValue)>>;

    fn spaces(c: &CompiledPolicy) -> Spaces {
        let mut out = Spaces::new();
        for (e, v) in &c.entries {
            out.entry((e.key.subject, e.key.peer, e.key.direction))
                .or_default()
                .push((e.prefix_len, e.key, *v));
        }
        out
    }

    /// The kernel's view: the longest matching `POLICY` entry of one key space.
    fn lpm(
        c: &Spaces,
        subject: u32,
        peer: u32,
        dir: u8,
        proto: u8,
        port: u16,
    ) -> Option<PolicyValue> {
        let bits = |k: &PolicyKey| {
            let mut b = [0u8; 16];
            b[4..8].copy_from_slice(&k.subject.to_ne_bytes());
            b[8..12].copy_from_slice(&k.peer.to_ne_bytes());
            b[12] = k.direction;
            b[13] = k.proto;
            b[14..16].copy_from_slice(&k.dport);
            u128::from_be_bytes(b)
        };
        let probe = bits(&PolicyKey::new(subject, peer, dir, proto, port));
        c.get(&(subject, peer, dir))?
            .iter()
            .filter(|(len, key, _)| {
                let mask = u128::MAX << (128 - 32 - len);
                bits(key) & mask == probe & mask
            })
            .max_by_key(|(len, _, _)| *len)
            .map(|(_, _, v)| *v)
    }

    /// Allowed or not, as the kernel decides for an enforced direction: the peer's
    /// identity, then ANY; a deny from either wins; nothing found denies.
    fn kernel_allows(c: &Spaces, subject: u32, peer: u32, dir: u8, proto: u8, port: u16) -> bool {
        let found = [
            lpm(c, subject, peer, dir, proto, port),
            lpm(c, subject, IDENTITY_ANY, dir, proto, port),
        ];
        let deny = u32::from(VERDICT_DENY);
        !found.iter().flatten().any(|v| v.verdict == deny)
            && found.iter().flatten().next().is_some()
    }

    fn ep(
        identity: u32,
        network: &str,
        name: &str,
        labels: &[(&str, &str)],
        addr: &str,
    ) -> EndpointView {
        EndpointView {
            endpoint_id: format!("ep{identity}"),
            identity,
            network_id: network.into(),
            name: Some(name.into()),
            labels: labels
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            addresses: vec![addr.parse().unwrap()],
        }
    }

    /// The compiled map entries decide exactly as [`Resolution::evaluate`] does, for every
    /// example of docs/policy.md applied together, over a grid of peers, protocols, ports.
    #[test]
    fn compiled_entries_agree_with_the_reference_semantics() {
        let docs: Vec<_> = include_str!("../../../docs/policy.md")
            .split("```yaml\n")
            .skip(1)
            .filter_map(|b| b.split("```").next())
            .filter(|b| !b.starts_with("# error:"))
            .flat_map(|b| parse_documents(b).unwrap())
            .chain(
                parse_documents(
                    "name: extra\nselector: {labels: {role: web}}\ningress:\n  - action: allow\n    ports: [{protocol: tcp, port: \"1-1024\"}]\n  - action: deny\n    from: [{cidr: 10.40.0.0/24, except: [10.40.0.4/32]}]\n    ports: [{protocol: tcp, port: \"440-450\"}]\n",
                )
                .unwrap(),
            )
            .collect();
        let mut engine = PolicyEngine::new();
        let plan = engine.plan_apply(docs).unwrap();
        engine.commit(plan);
        let net = "3f2a9c81d04e55aa";
        let endpoints = vec![
            ep(300, net, "db-1", &[("role", "db")], "10.40.0.2"),
            ep(
                301,
                net,
                "web-1",
                &[("role", "web"), ("app", "web")],
                "10.40.0.3",
            ),
            ep(302, net, "api", &[("app", "api")], "10.40.0.4"),
            ep(303, net, "lb-1", &[("app", "shop")], "10.40.0.5"),
            ep(
                304,
                "othernet0000",
                "proxy",
                &[("zone", "dmz"), ("tier", "2")],
                "10.1.0.9",
            ),
            ep(305, "othernet0000", "t1", &[("tier", "1")], "fd00::5"),
        ];
        let networks = [
            NetworkView {
                id: net.into(),
                name: Some("appnet".into()),
            },
            NetworkView {
                id: "othernet0000".into(),
                name: Some("backnet".into()),
            },
        ];
        let res = engine.resolve(&endpoints, &networks);
        let compiled = res.compile().unwrap();
        // The compiler kept the engine's identities.
        assert_eq!(compiled.cidrs, res.cidr_identities);
        let kernel = spaces(&compiled);

        let mut peers: BTreeSet<u32> = endpoints.iter().map(|e| e.identity).collect();
        peers.extend(res.cidr_identities.values());
        peers.insert(IDENTITY_WORLD);
        let ports = [
            1, 52, 53, 54, 79, 80, 443, 445, 999, 1000, 1024, 1025, 1500, 2000, 2001, 5432, 7999,
            8000, 8050, 8099, 8100, 65535,
        ];
        let mut checked = 0;
        for subject in endpoints.iter().map(|e| e.identity) {
            for (direction, dir) in [
                (Direction::Ingress, DIR_INGRESS),
                (Direction::Egress, DIR_EGRESS),
            ] {
                if !res.enforced(subject).get(direction) {
                    continue;
                }
                for &peer in &peers {
                    for proto in [PROTO_TCP, PROTO_UDP, PROTO_ICMP, PROTO_ICMPV6, 47] {
                        for &port in &ports {
                            let reference = res.evaluate(subject, direction, peer, proto, port);
                            assert_ne!(reference, Verdict::NotEnforced);
                            assert_eq!(
                                kernel_allows(
                                    &kernel,
                                    res.subject(subject),
                                    peer,
                                    dir,
                                    proto,
                                    port
                                ),
                                reference.is_allowed(),
                                "subject {subject} {direction} peer {peer} proto {proto} port {port}: reference {reference:?}"
                            );
                            checked += 1;
                        }
                    }
                }
            }
        }
        assert!(checked > 10_000, "{checked}");
    }
}
