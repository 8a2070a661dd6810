//! Tests of the policy layer as a whole: the examples of `docs/policy.md` (fixtures),
//! parsing, applying, persistence and resolution semantics.

use std::collections::BTreeMap;
use std::net::IpAddr;

use super::*;
use crate::store::Store;

const DOCS: &str = include_str!("../../../docs/policy.md");

const PROTO_ICMP: u8 = 1;
const PROTO_TCP: u8 = 6;
const PROTO_UDP: u8 = 17;
const PROTO_GRE: u8 = 47;

/// The ```yaml blocks of docs/policy.md.
fn doc_examples() -> Vec<String> {
    let mut out = Vec::new();
    let mut current: Option<String> = None;
    for line in DOCS.lines() {
        match &mut current {
            None if line.trim_end() == "```yaml" => current = Some(String::new()),
            None => {}
            Some(block) if line.trim_end() == "```" => {
                out.push(std::mem::take(block));
                current = None;
            }
            Some(block) => {
                block.push_str(line);
                block.push('\n');
            }
        }
    }
    assert!(
        current.is_none(),
        "unterminated yaml block in docs/policy.md"
    );
    out
}

/// The documents of the valid examples.
fn valid_examples() -> Vec<PolicyDoc> {
    doc_examples()
        .iter()
        .filter(|b| !b.starts_with("# error:"))
        .flat_map(|b| parse_documents(b).unwrap())
        .collect()
}

fn example(name: &str) -> PolicyDoc {
    valid_examples()
        .into_iter()
        .find(|d| d.name == name)
        .unwrap_or_else(|| panic!("docs/policy.md has no example {name:?}"))
}

/// Parses and plans `text` on `engine`: the error text, if any.
fn apply_error(engine: &PolicyEngine, text: &str) -> Option<String> {
    match parse_documents(text).and_then(|docs| engine.plan_apply(docs)) {
        Ok(_) => None,
        Err(e) => Some(e.to_string()),
    }
}

#[test]
fn docs_examples_are_valid_or_fail_as_documented() {
    let blocks = doc_examples();
    assert!(blocks.len() >= 10, "found only {} examples", blocks.len());
    let engine = PolicyEngine::new();
    for block in &blocks {
        match block.strip_prefix("# error: ") {
            Some(rest) => {
                let expected = rest.lines().next().unwrap_or_default();
                let err = apply_error(&engine, block)
                    .unwrap_or_else(|| panic!("example should fail:\n{block}"));
                assert!(
                    err.contains(expected),
                    "example fails differently:\n{block}\nexpected: {expected}\ngot: {err}"
                );
            }
            None => {
                assert_eq!(apply_error(&engine, block), None, "example:\n{block}");
            }
        }
    }
    // The valid ones also apply together (their names are distinct).
    let mut engine = PolicyEngine::new();
    let plan = engine.plan_apply(valid_examples()).unwrap();
    engine.commit(plan);
    assert_eq!(engine.len(), valid_examples().len());
}

#[test]
fn docs_ls_example_matches_the_examples() {
    // The `sluice policy ls` sample shows the selectors of real examples.
    assert_eq!(
        example("web-to-db").selector.to_string(),
        "network=appnet name=db-* role=db"
    );
    assert_eq!(
        example("appnet-default-deny").selector.to_string(),
        "network=appnet"
    );
    assert_eq!(
        example("no-metadata").selector.to_string(),
        "(all endpoints)"
    );
}

#[test]
fn parsing_several_documents_and_empty_ones() {
    let docs = parse_documents(
        "---\n# comment only\n---\nname: a\nselector: {}\n---\n---\nname: b\nselector: {}\ningress:\n...\n",
    )
    .unwrap();
    assert_eq!(docs.len(), 2);
    assert_eq!(docs[0].ingress, None);
    // `ingress:` without a value is present and empty: deny all.
    assert_eq!(docs[1].ingress, Some(vec![]));

    for (text, expected) in [
        ("", "input: no policy documents found"),
        ("# nothing\n", "input: no policy documents found"),
        (
            "- a\n- b\n",
            "document 1: a policy document must be a mapping",
        ),
        ("name: [unclosed\n", "document 1: "),
        (
            "name: x\nselector: {}\ningress: [{action: permit}]\n",
            "policy \"x\": ingress[0].action: unknown variant `permit`, expected `allow` or `deny`",
        ),
        (
            "name: x\nselector: {lables: {a: b}}\n",
            "policy \"x\": selector: unknown field `lables`, expected one of `network`, `name`, `labels`",
        ),
        (
            "name: x\nselector: {}\negress: [{action: allow, from: []}]\n",
            "policy \"x\": egress[0]: unknown field `from`, expected one of `action`, `to`, `ports`",
        ),
        (
            "name: x\nselector: {labels: {v: 1.5}}\n",
            "policy \"x\": selector.labels.v: invalid type: floating point `1.5`",
        ),
        (
            "name: ok\nselector: {}\n---\nselector: {}\n",
            "document 2: missing field `name`",
        ),
    ] {
        let err = parse_documents(text).unwrap_err().to_string();
        assert!(
            err.starts_with(expected),
            "{text:?}:\n  got {err}\n  want {expected}"
        );
    }

    let docs =
        parse_documents("name: x\nselector: {labels: {tier: 1, public: true, s: \"1.10\"}}\n")
            .unwrap();
    assert_eq!(
        docs[0].selector.labels,
        BTreeMap::from([
            ("public".to_owned(), "true".to_owned()),
            ("s".to_owned(), "1.10".to_owned()),
            ("tier".to_owned(), "1".to_owned()),
        ])
    );
}

#[test]
fn documents_round_trip_through_json_and_yaml() {
    for doc in valid_examples() {
        let json = serde_json::to_string(&doc).unwrap();
        assert_eq!(serde_json::from_str::<PolicyDoc>(&json).unwrap(), doc);
        let yaml = serde_norway::to_string(&doc).unwrap();
        assert_eq!(parse_documents(&yaml).unwrap(), vec![doc]);
    }
}

#[test]
fn a_bad_file_changes_nothing() {
    let mut engine = PolicyEngine::new();
    let plan = engine.plan_apply(vec![example("web-to-db")]).unwrap();
    engine.commit(plan);
    let state = |e: &PolicyEngine| {
        let numbers: Vec<(String, u32)> = e.numbers().map(|(n, x)| (n.to_owned(), x)).collect();
        (numbers, e.cidr_identities().collect::<Vec<_>>())
    };
    let before = state(&engine);
    // The first document is fine, the second is not: neither applies; every error is told.
    let err = apply_error(
        &engine,
        "name: web-to-db\nselector: {}\n---\nname: other\nselector: {}\ningress:\n  - action: allow\n    ports: [{protocol: tcp, port: 0}, {protocol: udp, port: 99999}]\n",
    )
    .unwrap();
    assert_eq!(
        err,
        "policy \"other\": ingress[0].ports[0]: port 0 is out of range 1-65535 (line 8)\n\
         policy \"other\": ingress[0].ports[1]: port 99999 is out of range 1-65535 (line 8)"
    );
    assert_eq!(state(&engine), before);
}

#[test]
fn apply_replaces_by_name_and_keeps_rule_ids() {
    let mut engine = PolicyEngine::new();
    let a = parse_documents("name: a\nselector: {}\ningress: [{action: allow}]\n").unwrap();
    let b = parse_documents("name: b\nselector: {}\negress: []\n").unwrap();
    let plan = engine.plan_apply([a.clone(), b].concat()).unwrap();
    assert_eq!(plan.changes().len(), 2);
    let applied = engine.commit(plan);
    assert!(applied.iter().all(|x| x.outcome == ApplyOutcome::Created));
    let number_a = engine.number("a").unwrap();
    let number_b = engine.number("b").unwrap();
    assert_ne!(number_a, number_b);

    // Same document again: unchanged, nothing to write.
    let plan = engine.plan_apply(a).unwrap();
    assert!(plan.changes().is_empty());
    assert_eq!(plan.applied()[0].outcome, ApplyOutcome::Unchanged);
    engine.commit(plan);

    // Changed: updated, same number, so ingress[0] keeps its rule ID.
    let a2 = parse_documents(
        "name: a\nselector: {labels: {x: y}}\ningress: [{action: deny}, {action: allow}]\n",
    )
    .unwrap();
    let plan = engine.plan_apply(a2).unwrap();
    assert_eq!(plan.applied()[0].outcome, ApplyOutcome::Updated);
    engine.commit(plan);
    assert_eq!(engine.number("a").unwrap(), number_a);
    let id = rule_id(number_a, Direction::Ingress, 1);
    assert_eq!(engine.rule_ref(id).unwrap().to_string(), "a ingress[1]");
    assert_eq!(
        engine.rule_ref(rule_id(number_a, Direction::Ingress, 2)),
        None
    );
    assert_eq!(
        engine.rule_ref(rule_id(number_b, Direction::Ingress, 0)),
        None
    );
    assert_eq!(engine.rule_ref(0), None);

    // Removing: gone; unknown: NotFound; a new policy does not take the freed number.
    let plan = engine.plan_remove("b").unwrap();
    assert!(matches!(plan.changes(), [crate::store::Change::DeletePolicy(n)] if n == "b"));
    engine.commit(plan);
    assert!(matches!(
        engine.plan_remove("b"),
        Err(PolicyError::NotFound(n)) if n == "b"
    ));
    let c = parse_documents("name: c\nselector: {}\n").unwrap();
    let plan = engine.plan_apply(c).unwrap();
    engine.commit(plan);
    assert!(engine.number("c").unwrap() > number_a);
}

#[test]
fn cidr_identities_are_shared_and_stable_while_referenced() {
    let mut engine = PolicyEngine::new();
    let apply = |engine: &mut PolicyEngine, text: &str| {
        let plan = engine.plan_apply(parse_documents(text).unwrap()).unwrap();
        engine.commit(plan);
    };
    let ids = |engine: &PolicyEngine| -> BTreeMap<String, u32> {
        engine
            .cidr_identities()
            .map(|(n, id)| (n.to_string(), id))
            .collect()
    };
    apply(
        &mut engine,
        "name: a\nselector: {}\negress: [{action: deny, to: [{cidr: 10.0.0.0/8}]}]\n",
    );
    let first = ids(&engine)["10.0.0.0/8"];
    assert_eq!(first, IDENTITY_FIRST_CIDR);
    apply(
        &mut engine,
        "name: b\nselector: {}\negress: [{action: deny, to: [{cidr: 10.0.0.0/8}, {cidr: 192.168.0.0/16}]}]\n",
    );
    assert_eq!(ids(&engine)["10.0.0.0/8"], first);
    let second = ids(&engine)["192.168.0.0/16"];
    // a stops mentioning 10/8; b still does: the identity stays.
    apply(
        &mut engine,
        "name: a\nselector: {}\negress: [{action: deny, to: [{cidr: 172.16.0.0/12}]}]\n",
    );
    assert_eq!(ids(&engine)["10.0.0.0/8"], first);
    assert_eq!(engine.cidr_identities_of("a").unwrap().len(), 1);
    let third = ids(&engine)["172.16.0.0/12"];
    assert!(third > second);
    // Nobody mentions 10/8 any more: freed; mentioned again, it gets a new identity (not
    // reused at once).
    let plan = engine.plan_remove("b").unwrap();
    engine.commit(plan);
    assert!(!ids(&engine).contains_key("10.0.0.0/8"));
    apply(
        &mut engine,
        "name: d\nselector: {}\negress: [{action: deny, to: [{cidr: 10.0.0.0/8}]}]\n",
    );
    assert!(ids(&engine)["10.0.0.0/8"] > third);
    // Several documents of one apply share new identities too.
    apply(
        &mut engine,
        "name: e\nselector: {}\negress: [{action: deny, to: [{cidr: 198.51.100.0/24}]}]\n---\nname: f\nselector: {}\ningress: [{action: deny, from: [{cidr: 198.51.100.0/24}]}]\n",
    );
    assert_eq!(
        engine.cidr_identities_of("e").unwrap(),
        engine.cidr_identities_of("f").unwrap()
    );
}

#[test]
fn policies_persist_in_the_store() {
    let dir = tempfile::tempdir().unwrap();
    let (numbers, cidrs) = {
        let store = Store::open(dir.path()).unwrap();
        let mut engine = PolicyEngine::load(store.load().unwrap().policies).unwrap();
        assert!(engine.is_empty());
        let applied = engine.apply(&store, valid_examples()).unwrap();
        assert_eq!(applied.len(), valid_examples().len());
        engine.remove(&store, "no-metadata").unwrap();
        assert!(matches!(
            engine.remove(&store, "no-metadata"),
            Err(PolicyError::NotFound(_))
        ));
        let numbers: Vec<(String, u32)> = engine
            .numbers()
            .map(|(name, number)| (name.to_owned(), number))
            .collect();
        (numbers, engine.cidr_identities().collect::<Vec<_>>())
    };
    let store = Store::open(dir.path()).unwrap();
    let engine = PolicyEngine::load(store.load().unwrap().policies).unwrap();
    let reloaded: Vec<(String, u32)> = engine
        .numbers()
        .map(|(name, number)| (name.to_owned(), number))
        .collect();
    assert_eq!(reloaded, numbers);
    assert!(engine.number("no-metadata").is_none());
    // The documents are read back from the store (the engine keeps none).
    let docs = store.policies().unwrap();
    assert_eq!(docs.len(), reloaded.len());
    let doc = docs
        .into_iter()
        .find(|p| p.doc.name == "web-to-db")
        .unwrap();
    assert_eq!(doc.doc, example("web-to-db"));
    assert_eq!(Some(doc.number), engine.number("web-to-db"));
    // A reloaded engine still tells an unchanged document (by its digest) from a new one.
    let plan = engine.plan_apply(vec![example("web-to-db")]).unwrap();
    assert_eq!(plan.applied()[0].outcome, ApplyOutcome::Unchanged);
    let mut changed = example("web-to-db");
    changed.description = Some("changed".into());
    let plan = engine.plan_apply(vec![changed]).unwrap();
    assert_eq!(plan.applied()[0].outcome, ApplyOutcome::Updated);
    assert_eq!(engine.cidr_identities().collect::<Vec<_>>(), cidrs);
}

#[test]
fn stored_cidr_identities_are_parsed_prefixes_kept_as_text_in_the_store() {
    // Overlapping IPv4 prefixes, a single address and IPv6: each its own identity.
    let yaml = "name: a\nselector: {}\negress: [{action: deny, to: [{cidr: 10.0.0.0/8}, {cidr: 10.1.0.0/16}, {cidr: 10.1.2.3}, {cidr: 2001:db8::/32}, {cidr: 2001:db8:1::/48}]}]\n";
    let mut engine = PolicyEngine::new();
    let plan = engine.plan_apply(parse_documents(yaml).unwrap()).unwrap();
    let stored = stored_of(&plan).remove(0);
    engine.commit(plan);
    assert_eq!(
        engine.cidr_identities_of("a"),
        Some(stored.cidr_identities.clone())
    );
    let nets: Vec<String> = stored
        .cidr_identities
        .keys()
        .map(ToString::to_string)
        .collect();
    assert_eq!(
        nets,
        [
            "10.0.0.0/8",
            "10.1.0.0/16",
            "10.1.2.3/32",
            "2001:db8::/32",
            "2001:db8:1::/48"
        ]
    );
    let ids: std::collections::BTreeSet<u32> = stored.cidr_identities.values().copied().collect();
    assert_eq!(ids.len(), 5);
    // The store's JSON keys are the canonical texts (as before: old records still load).
    let json = serde_json::to_value(&stored).unwrap();
    let keys: Vec<&str> = json["cidr_identities"]
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(keys.len(), 5);
    assert!(keys.contains(&"10.1.2.3/32") && keys.contains(&"2001:db8:1::/48"));
    let back: StoredPolicy = serde_json::from_value(json).unwrap();
    assert_eq!(back, stored);
    let reloaded = PolicyEngine::load(vec![back]).unwrap();
    assert_eq!(
        reloaded.cidr_identities().collect::<Vec<_>>(),
        engine.cidr_identities().collect::<Vec<_>>()
    );
    // A key that is not a prefix is refused, not dropped.
    let mut bad = serde_json::to_value(&stored).unwrap();
    bad["cidr_identities"]["not a cidr"] = serde_json::json!(IDENTITY_FIRST_CIDR);
    assert!(serde_json::from_value::<StoredPolicy>(bad).is_err());
}

#[test]
fn inconsistent_stored_policies_are_refused() {
    let mut engine = PolicyEngine::new();
    let plan = engine
        .plan_apply(
            parse_documents(
                "name: a\nselector: {}\negress: [{action: deny, to: [{cidr: 10.0.0.0/8}]}]\n---\nname: b\nselector: {}\negress: [{action: deny, to: [{cidr: 10.0.0.0/8}]}]\n",
            )
            .unwrap(),
        )
        .unwrap();
    let good = stored_of(&plan);
    engine.commit(plan);
    PolicyEngine::load(good.clone()).unwrap();

    let mut same_number = good.clone();
    same_number[1].number = same_number[0].number;
    let err = PolicyEngine::load(same_number).unwrap_err().to_string();
    assert!(err.contains("used twice"), "{err}");

    let mut other_identity = good.clone();
    other_identity[1]
        .cidr_identities
        .insert("10.0.0.0/8".parse().unwrap(), IDENTITY_FIRST_CIDR + 7);
    let err = PolicyEngine::load(other_identity).unwrap_err().to_string();
    assert!(err.contains("another policy has"), "{err}");

    let mut missing = good.clone();
    missing[0].cidr_identities.clear();
    let err = PolicyEngine::load(missing).unwrap_err().to_string();
    assert!(err.contains("no valid identity"), "{err}");

    let mut invalid = good;
    invalid[0].doc.name = "not valid!".into();
    let err = PolicyEngine::load(invalid).unwrap_err().to_string();
    assert!(err.contains("stored policy \"not valid!\": name:"), "{err}");
}

// ---- resolution --------------------------------------------------------------------------

const APPNET: &str = "3f2a9c81d04e55aa";
const OTHERNET: &str = "77bb00aa11cc22dd";
const DB: u32 = 300;
const WEB: u32 = 301;
const OTHER: u32 = 302;
const INSIDE: u32 = 303;
const CARVED: u32 = 304;
const REMOTE_DB: u32 = 305;

fn ep(
    identity: u32,
    network: &str,
    name: &str,
    labels: &[(&str, &str)],
    addrs: &[&str],
) -> EndpointView {
    EndpointView {
        endpoint_id: format!("ep{identity}"),
        identity,
        network_id: network.into(),
        name: (!name.is_empty()).then(|| name.to_owned()),
        labels: labels
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect(),
        addresses: addrs.iter().map(|a| a.parse().unwrap()).collect(),
    }
}

fn networks() -> Vec<NetworkView> {
    vec![
        NetworkView {
            id: APPNET.into(),
            name: Some("appnet".into()),
        },
        NetworkView {
            id: OTHERNET.into(),
            name: Some("othernet".into()),
        },
    ]
}

fn endpoints() -> Vec<EndpointView> {
    vec![
        ep(
            DB,
            APPNET,
            "db-1",
            &[("role", "db")],
            &["10.40.0.2", "fd00:40::2"],
        ),
        ep(WEB, APPNET, "web-1", &[("role", "web")], &["10.40.0.3"]),
        ep(OTHER, APPNET, "cache", &[], &["10.40.0.4"]),
        // Not labelled web, but its address is in the allowed 10.0.0.0/8.
        ep(INSIDE, OTHERNET, "batch", &[], &["10.2.0.5"]),
        // In the carved-out 10.1.0.0/16.
        ep(CARVED, OTHERNET, "legacy", &[], &["10.1.0.5"]),
        // A db on another network: not selected by `network: appnet`.
        ep(
            REMOTE_DB,
            OTHERNET,
            "db-2",
            &[("role", "db")],
            &["10.50.0.2"],
        ),
    ]
}

fn engine_with(docs: Vec<PolicyDoc>) -> PolicyEngine {
    let mut engine = PolicyEngine::new();
    let plan = engine.plan_apply(docs).unwrap();
    engine.commit(plan);
    engine
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

#[test]
fn the_first_example_means_what_the_docs_say() {
    let engine = engine_with(vec![example("web-to-db")]);
    let n = engine.number("web-to-db").unwrap();
    let res = engine.resolve(&endpoints(), &networks());
    assert!(res.warnings.is_empty(), "{:?}", res.warnings);
    assert!(res.pending.is_empty());

    // Only db-1 is selected, in both directions.
    assert_eq!(
        res.enforced(DB),
        Enforcement {
            ingress: true,
            egress: true
        }
    );
    for other in [WEB, OTHER, INSIDE, CARVED, REMOTE_DB] {
        assert_eq!(res.enforced(other), Enforcement::default(), "{other}");
        assert_eq!(
            res.evaluate(other, Direction::Ingress, WEB, PROTO_TCP, 1),
            Verdict::NotEnforced
        );
    }
    assert!(res.rules.iter().all(|r| r.subjects == [res.subject(DB)]));

    let allow0 = Verdict::Allow {
        rule_id: rule_id(n, Direction::Ingress, 0),
    };
    let ingress = |peer: &str, proto: u8, port: u16| {
        res.evaluate_addresses(ip("10.40.0.2"), Direction::Ingress, ip(peer), proto, port)
            .unwrap()
    };
    // From web: the listed ports only.
    assert_eq!(ingress("10.40.0.3", PROTO_TCP, 5432), allow0);
    assert_eq!(ingress("10.40.0.3", PROTO_UDP, 1000), allow0);
    assert_eq!(ingress("10.40.0.3", PROTO_UDP, 2000), allow0);
    assert_eq!(ingress("10.40.0.3", PROTO_ICMP, 0), allow0);
    assert_eq!(ingress("10.40.0.3", PROTO_TCP, 5433), Verdict::DefaultDeny);
    assert_eq!(ingress("10.40.0.3", PROTO_UDP, 2001), Verdict::DefaultDeny);
    assert_eq!(ingress("10.40.0.3", PROTO_GRE, 0), Verdict::DefaultDeny);
    // An unlabelled container of the same network: its address is in 10.0.0.0/8, and a
    // cidr covers containers too.
    assert_eq!(ingress("10.40.0.4", PROTO_TCP, 5432), allow0);
    // Outside addresses in 10/8 but not in 10.1/16.
    assert_eq!(ingress("10.200.1.1", PROTO_TCP, 5432), allow0);
    assert_eq!(ingress("10.1.2.3", PROTO_TCP, 5432), Verdict::DefaultDeny);
    assert_eq!(
        ingress("192.168.1.1", PROTO_TCP, 5432),
        Verdict::DefaultDeny
    );
    assert_eq!(
        ingress("2001:db8::1", PROTO_TCP, 5432),
        Verdict::DefaultDeny
    );
    // Containers inside the cidr are covered, those in the carve-out are not.
    assert_eq!(ingress("10.2.0.5", PROTO_TCP, 5432), allow0);
    assert_eq!(ingress("10.1.0.5", PROTO_TCP, 5432), Verdict::DefaultDeny);

    // Egress: any IPv4 address is denied by egress[0]; IPv6 by default.
    let deny = Verdict::Deny {
        rule_id: rule_id(n, Direction::Egress, 0),
    };
    let egress = |peer: &str| {
        res.evaluate_addresses(ip("10.40.0.2"), Direction::Egress, ip(peer), PROTO_TCP, 443)
            .unwrap()
    };
    assert_eq!(egress("8.8.8.8"), deny);
    assert_eq!(egress("10.40.0.3"), deny);
    assert_eq!(egress("2001:db8::1"), Verdict::DefaultDeny);
    // The v6 address of db-1 is the same subject.
    assert_eq!(
        res.evaluate_addresses(
            ip("fd00:40::2"),
            Direction::Egress,
            ip("8.8.8.8"),
            PROTO_TCP,
            1
        ),
        Some(deny)
    );
}

#[test]
fn deny_wins_across_rules_and_policies() {
    let mut docs = vec![example("web-to-db")];
    docs.extend(
        parse_documents(
            r#"
name: no-web-on-5432
selector: {labels: {role: db}}
ingress:
  - action: deny
    from: [{selector: {name: "web-*"}}]
    ports: [{protocol: tcp, port: "5000-6000"}]
"#,
        )
        .unwrap(),
    );
    let engine = engine_with(docs);
    let deny_id = rule_id(
        engine.number("no-web-on-5432").unwrap(),
        Direction::Ingress,
        0,
    );
    let res = engine.resolve(&endpoints(), &networks());
    assert_eq!(
        res.evaluate(DB, Direction::Ingress, WEB, PROTO_TCP, 5432),
        Verdict::Deny { rule_id: deny_id }
    );
    // Other ports and peers are untouched by the deny.
    assert!(
        res.evaluate(DB, Direction::Ingress, WEB, PROTO_UDP, 1500)
            .is_allowed()
    );
    assert!(
        res.evaluate(DB, Direction::Ingress, OTHER, PROTO_TCP, 5432)
            .is_allowed()
    );
    // The second policy selects db-2 on the other network too: ingress only.
    assert_eq!(
        res.enforced(REMOTE_DB),
        Enforcement {
            ingress: true,
            egress: false
        }
    );
    assert_eq!(
        res.evaluate(REMOTE_DB, Direction::Ingress, OTHER, PROTO_TCP, 80),
        Verdict::DefaultDeny
    );

    // Within one policy the order of rules does not matter either.
    let engine = engine_with(
        parse_documents(
            "name: p\nselector: {}\negress:\n  - action: deny\n    ports: [{protocol: udp}]\n  - action: allow\n",
        )
        .unwrap(),
    );
    let res = engine.resolve(&endpoints(), &networks());
    assert!(matches!(
        res.evaluate(WEB, Direction::Egress, DB, PROTO_UDP, 53),
        Verdict::Deny { .. }
    ));
    assert!(
        res.evaluate(WEB, Direction::Egress, DB, PROTO_TCP, 53)
            .is_allowed()
    );
    assert_eq!(
        res.evaluate(WEB, Direction::Ingress, DB, PROTO_TCP, 53),
        Verdict::NotEnforced
    );
}

#[test]
fn empty_sections_deny_everything_and_absent_ones_nothing() {
    let engine = engine_with(
        parse_documents("name: lockdown\nselector: {network: othernet}\ningress:\n").unwrap(),
    );
    let res = engine.resolve(&endpoints(), &networks());
    assert!(res.rules.is_empty());
    for id in [INSIDE, CARVED, REMOTE_DB] {
        assert_eq!(
            res.enforced(id),
            Enforcement {
                ingress: true,
                egress: false
            }
        );
        assert_eq!(
            res.evaluate(id, Direction::Ingress, WEB, PROTO_TCP, 80),
            Verdict::DefaultDeny
        );
    }
    assert_eq!(res.enforced(DB), Enforcement::default());
    // The single-endpoint shortcut agrees with the full resolution.
    for e in endpoints() {
        assert_eq!(engine.enforced(&e, &networks()), res.enforced(e.identity));
    }
}

#[test]
fn except_carves_out_and_the_carve_out_is_judged_by_other_rules() {
    let engine = engine_with(vec![
        example("internet-only"),
        parse_documents(
            "name: dmz-to-lan-dns\nselector: {labels: {zone: dmz}}\negress:\n  - action: allow\n    to: [{cidr: 10.1.0.53}]\n    ports: [{protocol: udp, port: 53}]\n",
        )
        .unwrap()
        .remove(0),
    ]);
    let dmz = ep(400, APPNET, "proxy", &[("zone", "dmz")], &["10.40.0.9"]);
    let mut eps = endpoints();
    eps.push(dmz);
    let res = engine.resolve(&eps, &networks());
    let out = |to: &str, proto: u8, port: u16| {
        res.evaluate_addresses(ip("10.40.0.9"), Direction::Egress, ip(to), proto, port)
            .unwrap()
    };
    assert!(out("8.8.8.8", PROTO_TCP, 443).is_allowed());
    assert!(out("2001:db8::1", PROTO_TCP, 443).is_allowed());
    for private in [
        "10.9.9.9",
        "172.16.0.1",
        "172.31.255.255",
        "192.168.1.1",
        "fd00::1",
    ] {
        assert_eq!(
            out(private, PROTO_TCP, 443),
            Verdict::DefaultDeny,
            "{private}"
        );
    }
    assert!(out("172.32.0.1", PROTO_TCP, 443).is_allowed());
    // A more specific allow from another policy reaches into the carve-out.
    assert!(out("10.1.0.53", PROTO_UDP, 53).is_allowed());
    assert_eq!(out("10.1.0.53", PROTO_TCP, 53), Verdict::DefaultDeny);
    // Containers are addresses too: the dmz may not reach 10.x containers.
    assert_eq!(out("10.40.0.3", PROTO_TCP, 80), Verdict::DefaultDeny);

    // The CIDRs handed to the datapath are the pieces, with their identities.
    let holes: Vec<ipnetwork::IpNetwork> =
        ["10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "fc00::/7"]
            .iter()
            .map(|h| h.parse().unwrap())
            .collect();
    for piece in res.cidr_identities.keys() {
        let overlaps = holes
            .iter()
            .any(|h| h.contains(piece.network()) || piece.contains(h.network()));
        assert_eq!(overlaps, piece.to_string() == "10.1.0.53/32", "{piece}");
    }
    assert!(res.cidr_identities.len() > 20);
}

#[test]
fn network_references_by_name_id_and_prefix() {
    let eps = endpoints();
    let select = |network: &str| -> Vec<u32> {
        let engine = engine_with(
            parse_documents(&format!(
                "name: n\nselector: {{network: {network:?}}}\ningress: []\n"
            ))
            .unwrap(),
        );
        let res = engine.resolve(&eps, &networks());
        res.enforced.keys().copied().collect()
    };
    assert_eq!(select("appnet"), [DB, WEB, OTHER]);
    assert_eq!(select(APPNET), [DB, WEB, OTHER]);
    assert_eq!(select("3f2a9c"), [DB, WEB, OTHER]);
    assert_eq!(select("othernet"), [INSIDE, CARVED, REMOTE_DB]);
    assert!(select("nosuchnet").is_empty());

    // Without names (the Engine API has not answered) IDs and prefixes still work.
    let engine = engine_with(
        parse_documents("name: n\nselector: {network: appnet}\ningress: []\n---\nname: m\nselector: {network: 77bb}\negress: []\n").unwrap(),
    );
    let res = engine.resolve(&eps, &[]);
    assert_eq!(
        res.enforced.keys().copied().collect::<Vec<_>>(),
        [INSIDE, CARVED, REMOTE_DB]
    );

    // An ambiguous prefix selects nothing and says so.
    let nets = [
        NetworkView {
            id: "abc1".into(),
            name: None,
        },
        NetworkView {
            id: "abc2".into(),
            name: None,
        },
    ];
    let engine = engine_with(
        parse_documents("name: amb\nselector: {}\ningress:\n  - action: allow\n    from: [{selector: {network: abc}}]\n").unwrap(),
    );
    let res = engine.resolve(&eps, &nets);
    assert!(res.rules.is_empty());
    assert_eq!(
        res.warnings,
        [
            "policy \"amb\": ingress[0].from[0].selector: network \"abc\" is an ambiguous ID prefix (2 networks); it selects nothing"
        ]
    );
}

#[test]
fn endpoints_without_identity_are_pending_where_policy_could_apply() {
    let mut eps = endpoints();
    eps.push(ep(500, APPNET, "", &[], &["10.40.0.50"]));
    eps.push(ep(501, OTHERNET, "", &[("role", "db")], &["10.50.0.51"]));
    let engine = engine_with(vec![example("web-to-db")]);
    let res = engine.resolve(&eps, &networks());
    // The subject selector covers appnet, its peer selector (no network) every network.
    assert_eq!(res.pending.iter().copied().collect::<Vec<_>>(), [500, 501]);
    // A name glob never matches a pending endpoint, even with the right labels.
    assert_eq!(res.enforced(500), Enforcement::default());

    let engine = engine_with(
        parse_documents("name: n\nselector: {network: othernet}\ningress: [{action: allow, from: [{cidr: 10.0.0.0/8}]}]\n")
            .unwrap(),
    );
    let res = engine.resolve(&eps, &networks());
    assert_eq!(res.pending.iter().copied().collect::<Vec<_>>(), [501]);
    assert!(
        engine_with(vec![])
            .resolve(&eps, &networks())
            .pending
            .is_empty()
    );
}

#[test]
fn resolved_rules_are_grouped_by_subjects_and_deduplicated() {
    let engine = engine_with(
        parse_documents(
            r#"
name: g
selector: {network: appnet}
ingress:
  - action: allow
    from:
      - selector: {labels: {role: web}}
      - selector: {name: "web-?"}
      - cidr: 192.0.2.0/24
    ports: [{protocol: tcp, port: 80}, {protocol: tcp, port: "80"}]
"#,
        )
        .unwrap(),
    );
    let n = engine.number("g").unwrap();
    let res = engine.resolve(&endpoints(), &networks());
    let range = Some(PortRange {
        first: 80,
        last: 80,
    });
    // The three endpoints the policy selects share one policy subject.
    let subject = res.subject(DB);
    assert_ne!(subject, 0);
    assert_eq!(res.subject(WEB), subject);
    assert_eq!(res.subject(OTHER), subject);
    let common = ResolvedRule {
        rule_id: rule_id(n, Direction::Ingress, 0),
        direction: Direction::Ingress,
        subjects: vec![subject],
        peer: ResolvedPeer::Any,
        protocol: Protocol::Tcp,
        ports: range,
        action: Action::Allow,
    };
    let net: ipnetwork::IpNetwork = "192.0.2.0/24".parse().unwrap();
    assert_eq!(
        res.rules,
        [
            ResolvedRule {
                peer: ResolvedPeer::Identity(WEB),
                ..common.clone()
            },
            ResolvedRule {
                peer: ResolvedPeer::Cidr(net),
                ..common
            },
        ]
    );
    assert_eq!(
        res.cidr_identities,
        BTreeMap::from([(net, engine.cidr_identities().next().unwrap().1)])
    );
    // A CIDR identity is what the ipcache gives an address in it.
    assert_eq!(res.identity_of(ip("192.0.2.9")), res.cidr_identities[&net]);
    assert_eq!(res.identity_of(ip("192.0.3.9")), IDENTITY_WORLD);
    assert_eq!(res.identity_of(ip("10.40.0.3")), WEB);
}

#[test]
fn identity_constants_match_the_datapath() {
    // Mirrored from `sluice_common` (ebpf/common); compared by text so that this crate does
    // not need that one to build its tests.
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../ebpf/common/src/lib.rs");
    let Ok(src) = std::fs::read_to_string(path) else {
        return;
    };
    for (name, value) in [
        ("IDENTITY_ANY", IDENTITY_ANY),
        ("IDENTITY_WORLD", IDENTITY_WORLD),
        ("IDENTITY_FIRST_ENDPOINT", IDENTITY_FIRST_ENDPOINT),
        ("IDENTITY_FIRST_CIDR", IDENTITY_FIRST_CIDR),
        ("IDENTITY_LAST_CIDR", IDENTITY_LAST_CIDR),
    ] {
        let decl = format!("pub const {name}: u32 = ");
        let line = src
            .lines()
            .find_map(|l| l.trim().strip_prefix(&decl))
            .unwrap_or_else(|| panic!("{name} not in {path}"));
        let expr = line.trim_end_matches(';');
        let parsed = match expr {
            "1 << 24" => 1 << 24,
            "(1 << 25) - 1" => (1 << 25) - 1,
            n => n
                .parse::<u32>()
                .unwrap_or_else(|_| panic!("{name} = {expr}: update this test")),
        };
        assert_eq!(parsed, value, "{name}");
    }
}

/// Live heap bytes (glibc's `mallinfo2`), for [`memory_of_a_100k_entry_policy`].
#[cfg(target_env = "gnu")]
fn heap_in_use() -> usize {
    // SAFETY: mallinfo2(3) takes no arguments and only reads the allocator's counters.
    unsafe { libc::mallinfo2() }.uordblks
}

/// What the policy layer keeps for the benchmark's 100k-entry policy (`cargo xtask bench
/// control`: 40k + 40k + 20k CIDR peers) and 1,000 endpoints, stage by stage. A measurement,
/// not a check: run it with
/// `cargo test -p sluice-driver --lib memory_of_a_100k -- --ignored --nocapture --test-threads 1`.
#[cfg(target_env = "gnu")]
#[test]
#[ignore = "a measurement: prints heap bytes per stage"]
fn memory_of_a_100k_entry_policy() {
    use std::fmt::Write as _;
    let mut texts = Vec::new();
    for (d, (first, end)) in [(0, 40_000), (40_000, 80_000), (80_000, 100_000)]
        .into_iter()
        .enumerate()
    {
        let mut s =
            format!("name: bench-{d}\nselector: {{}}\ningress:\n  - action: allow\n    from:\n");
        for n in first..end {
            if n == 0 {
                s.push_str("      - selector: {}\n");
            } else {
                let _ = writeln!(
                    s,
                    "      - cidr: 172.{}.{}.{}/32",
                    16 + ((n >> 16) & 0x0f),
                    (n >> 8) & 0xff,
                    n & 0xff
                );
            }
        }
        texts.push(s);
    }
    let endpoints: Vec<EndpointView> = (0..1000u32)
        .map(|i| EndpointView {
            endpoint_id: format!("{i:064x}"),
            identity: IDENTITY_FIRST_ENDPOINT + i,
            network_id: "n".repeat(64),
            name: Some(format!("c{i}")),
            labels: BTreeMap::new(),
            addresses: vec![IpAddr::from([10, 96, (i >> 8) as u8, i as u8])],
        })
        .collect();
    let networks = [NetworkView {
        id: "n".repeat(64),
        name: Some("bench".into()),
    }];
    let mut engine = PolicyEngine::new();
    let mut subjects = SubjectIds::default();
    let base = heap_in_use();
    let mb = |b: usize| b.saturating_sub(base) as f64 / 1e6;
    for text in &texts {
        let docs = parse_documents(text).unwrap();
        let plan = engine.plan_apply(docs).unwrap();
        println!("planned: {:.1} MB (engine + plan)", mb(heap_in_use()));
        engine.commit(plan);
    }
    let engine_bytes = heap_in_use();
    println!("engine: {:.1} MB", mb(engine_bytes));
    let mut res = engine.resolve_with(&endpoints, &networks, &mut subjects);
    println!("+ resolution: {:.1} MB", mb(heap_in_use()));
    let compiled = res.take_compiled().unwrap();
    println!(
        "+ compiled: {:.1} MB ({} entries)",
        mb(heap_in_use()),
        compiled.entries.len()
    );
    drop(res);
    println!("engine + compiled: {:.1} MB", mb(heap_in_use()));
    drop(compiled);
    let mut next = engine.clone();
    println!("engine cloned: {:.1} MB", mb(heap_in_use()));
    next.commit(next.plan_remove("bench-1").unwrap());
    drop(next);
    assert_eq!(engine.len(), 3);
}

/// The policies a plan writes to the store.
fn stored_of(plan: &super::engine::Plan) -> Vec<StoredPolicy> {
    plan.changes()
        .iter()
        .filter_map(|c| match c {
            crate::store::Change::PutPolicy(p) => Some(p.clone()),
            _ => None,
        })
        .collect()
}
