//! Privileged tests of sluice's nftables table ([`Nat`]) against the real kernel, each in its
//! own network namespace, checked with `nft -j list`, independently of the code under test.

#![allow(
    clippy::unwrap_used,
    reason = "test helpers outside #[test] fns panic on failure, like the tests"
)]

use serde_json::Value;
use sluice_driver::nat::{Nat, NatRuleset, NetworkNat, PortBinding, Proto, PublishedPort};
use sluice_tests::netns::{NetNs, current_thread_runtime, require_root, run};

fn ruleset(masquerade: bool) -> NatRuleset {
    let subnet = "10.34.200.0/24".parse().unwrap();
    NatRuleset {
        networks: vec![
            NetworkNat {
                bridge: "slbrnattest0001".into(),
                internal: false,
                masquerade: if masquerade { vec![subnet] } else { vec![] },
                subnets: vec![subnet],
                gateways: vec!["10.34.200.1".parse().unwrap()],
            },
            NetworkNat {
                bridge: "slbrnattest0002".into(),
                internal: true,
                masquerade: vec![],
                subnets: vec!["10.34.201.0/24".parse().unwrap()],
                gateways: vec![
                    "10.34.201.1".parse().unwrap(),
                    "fd00:34:201::1".parse().unwrap(),
                ],
            },
        ],
        ports: vec![PublishedPort {
            binding: PortBinding {
                proto: Proto::Udp,
                host_ip: Some("192.0.2.10".parse().unwrap()),
                host_port: 5353,
                container_port: 53,
            },
            container_ip: "10.34.200.2".parse().unwrap(),
        }],
    }
}

/// The rules of `table`, as `nft -j list table inet TABLE` shows them (None: no table).
fn listed_rules(table: &str) -> Option<Vec<Value>> {
    let out = run("nft", &["-j", "list", "table", "inet", table]).ok()?;
    let json: Value = serde_json::from_str(&out).unwrap();
    Some(
        json["nftables"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|o| o.get("rule").cloned())
            .collect(),
    )
}

#[test]
fn the_table_is_written_whole_replaced_and_removed() {
    if !require_root() {
        return;
    }
    let _ns = NetNs::enter().unwrap();
    let rt = current_thread_runtime();
    rt.block_on(async {
        let nat = Nat::new("nattest");
        assert_eq!(nat.table(), "sluice_nattest");
        // Removing a table that does not exist is fine.
        nat.apply(&NatRuleset::default()).await.unwrap();
        assert!(listed_rules(nat.table()).is_none());

        nat.apply(&ruleset(true)).await.unwrap();
        let rules = listed_rules(nat.table()).expect("table written");
        let text = serde_json::to_string(&rules).unwrap();
        let in_chain = |chain: &str| rules.iter().filter(|r| r["chain"] == chain).count();
        assert!(text.contains("masquerade"), "{text}");
        assert!(text.contains("\"dnat\""), "{text}");
        assert_eq!(in_chain("published"), 1, "{text}");
        assert_eq!(in_chain("forward"), 2, "internal fences: {text}");
        assert_eq!(in_chain("input"), 2, "one per family: {text}");

        // Written again without masquerade: replaced, not appended.
        nat.apply(&ruleset(false)).await.unwrap();
        let again = listed_rules(nat.table()).unwrap();
        assert_eq!(again.len(), rules.len() - 1, "{again:?}");
        nat.apply(&ruleset(false)).await.unwrap();
        assert_eq!(listed_rules(nat.table()).unwrap().len(), again.len());

        // Nothing to hold: no table.
        nat.apply(&NatRuleset::default()).await.unwrap();
        assert!(listed_rules(nat.table()).is_none());
    });
}

#[test]
fn tables_of_two_daemons_are_independent() {
    if !require_root() {
        return;
    }
    let _ns = NetNs::enter().unwrap();
    let rt = current_thread_runtime();
    rt.block_on(async {
        let a = Nat::new("nat-a");
        let b = Nat::new("nat-b");
        a.apply(&ruleset(true)).await.unwrap();
        b.apply(&ruleset(true)).await.unwrap();
        b.apply(&NatRuleset::default()).await.unwrap();
        assert!(listed_rules(b.table()).is_none());
        assert!(listed_rules(a.table()).is_some(), "a's table untouched");
    });
}
