//! `mode=vxlan` across three hosts on one machine (tests/src/cluster.rs): three host
//! namespaces on an underlay bridge, one etcd, one sluice daemon per host driven through its
//! plugin API like dockerd, containers as namespaces.

use std::collections::BTreeSet;
use std::time::Duration;

use serde_json::{Value, json};
use sluice_tests::cluster::{Container, Lab, Tls, eventually, ping};
use sluice_tests::netns::require_root;

const SUBNET: &str = "10.80.0.0/24";
const SETTLE: Duration = Duration::from_secs(20);

/// The MACs in the forwarding database of host `h`'s VXLAN device that point at a VTEP.
fn fdb_macs(lab: &Lab, h: usize) -> BTreeSet<String> {
    let fdb = lab.json_in(h, "bridge", &["-j", "fdb", "show"]);
    fdb.as_array()
        .into_iter()
        .flatten()
        .filter(|e| {
            e["ifname"].as_str().is_some_and(|n| n.starts_with("slvx")) && e.get("dst").is_some()
        })
        .filter_map(|e| e["mac"].as_str().map(str::to_owned))
        .collect()
}

/// The permanent neighbour entries (IP → MAC) on host `h`'s VXLAN device.
fn neigh_ips(lab: &Lab, h: usize) -> BTreeSet<String> {
    let neigh = lab.json_in(h, "ip", &["-j", "neigh", "show", "nud", "permanent"]);
    neigh
        .as_array()
        .into_iter()
        .flatten()
        .filter(|e| e["dev"].as_str().is_some_and(|n| n.starts_with("slvx")))
        .filter_map(|e| e["dst"].as_str().map(str::to_owned))
        .collect()
}

fn ip_of(c: &Container) -> String {
    c.address.split('/').next().unwrap_or_default().to_owned()
}

const POLICY: &str = "name: db-from-web\nselector: {labels: {role: db}}\ningress:\n  - action: allow\n    from: [{selector: {labels: {role: web}}}]\n";

#[test]
fn vxlan_across_three_hosts() {
    if !require_root() {
        return;
    }
    let mut lab = Lab::new("h", 3, None).unwrap();
    for h in 0..3 {
        lab.start_daemon(h).unwrap();
    }
    // The same `docker network create` on each host: one cluster network.
    let nets: Vec<(String, String)> = (0..3)
        .map(|h| lab.create_network(h, SUBNET, &json!({})))
        .collect();
    let devices: Vec<Value> = (0..3)
        .map(|h| lab.json_in(h, "ip", &["-d", "-j", "link", "show", "type", "vxlan"]))
        .collect();
    let vnis: BTreeSet<u64> = devices
        .iter()
        .map(|d| {
            d[0]["linkinfo"]["info_data"]["id"]
                .as_u64()
                .unwrap_or_else(|| panic!("no vxlan device: {d}"))
        })
        .collect();
    assert_eq!(vnis.len(), 1, "one VNI cluster-wide: {devices:?}");
    for d in &devices {
        let info = &d[0]["linkinfo"]["info_data"];
        assert_eq!(info["port"], 4789, "{d}");
        assert_eq!(info["learning"], false, "{d}");
        assert_eq!(info["proxy"], true, "{d}");
        // Underlay 1500 minus the encapsulation.
        assert_eq!(d[0]["mtu"], 1450, "{d}");
    }

    // Another host asking for the same cluster network with other settings is refused.
    let (ok, err) = lab.try_create_network(
        1,
        &sluice_tests::cluster::hex_id("other"),
        SUBNET,
        "10.80.0.1/24",
        &json!({"vni": "4242"}),
    );
    assert!(!ok, "conflicting network accepted: {err}");
    assert!(err.to_string().contains("different settings"), "{err}");

    // Containers on each host reach each other across hosts.
    let web = lab
        .container(0, &nets[0].0, &nets[0].1, "web", &[("role", "web")])
        .unwrap();
    let db = lab
        .container(1, &nets[1].0, &nets[1].1, "db", &[("role", "db")])
        .unwrap();
    let other = lab
        .container(2, &nets[2].0, &nets[2].1, "other", &[("role", "other")])
        .unwrap();
    let all = [&web, &db, &other];
    let addrs: BTreeSet<&str> = all.iter().map(|c| c.address.as_str()).collect();
    assert_eq!(addrs.len(), 3, "unique addresses: {addrs:?}");
    for a in all {
        for b in all {
            if a.ns != b.ns {
                assert!(
                    eventually(SETTLE, || ping(a, b)),
                    "{} cannot reach {} ({}); logs:\n{}",
                    a.ns,
                    b.ns,
                    ip_of(b),
                    lab.host_log(a.host)
                );
            }
        }
    }
    // Remote endpoints are programmed, not learnt: FDB entry and proxy neighbour entry.
    assert!(
        fdb_macs(&lab, 0).contains(&db.mac),
        "{:?}",
        fdb_macs(&lab, 0)
    );
    assert!(
        neigh_ips(&lab, 0).contains(&ip_of(&db)),
        "{:?}",
        neigh_ips(&lab, 0)
    );

    // 50 endpoints created at once across the three hosts get 50 distinct addresses.
    let results: Vec<String> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..50)
            .map(|i| {
                let (lab, nets) = (&lab, &nets);
                s.spawn(move || {
                    let h = i % 3;
                    lab.create_endpoint(h, &nets[h].0, &nets[h].1, &format!("bulk-{i}"), &[])
                        .0
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let unique: BTreeSet<&String> = results
        .iter()
        .chain(all.iter().map(|c| &c.address))
        .collect();
    assert_eq!(
        unique.len(),
        53,
        "duplicate addresses under concurrent allocation: {results:?}"
    );
    let leases = lab.etcdctl(
        &[
            "get",
            "--prefix",
            "--keys-only",
            "/sluice/v1/leases/10.80.0.0/24/",
        ],
        &[],
    );
    let leased = String::from_utf8_lossy(&leases.stdout)
        .lines()
        .filter(|l| !l.is_empty())
        .count();
    assert_eq!(leased, 53, "one etcd lease per endpoint address");

    // A policy applied once (on host 0) is enforced on every host: db (host 1) accepts web
    // (host 0) and no longer `other` (host 2).
    let file = lab.dir.path().join("db.yaml");
    std::fs::write(&file, POLICY).unwrap();
    let applied = lab.cli(0, &["policy", "apply", "-f", &file.to_string_lossy()]);
    assert!(
        applied.status.success(),
        "{}",
        String::from_utf8_lossy(&applied.stderr)
    );
    assert!(
        eventually(SETTLE, || String::from_utf8_lossy(
            &lab.cli(2, &["policy", "ls"]).stdout
        )
        .contains("db-from-web")),
        "policy not replicated to host 2"
    );
    assert!(
        eventually(SETTLE, || !ping(&other, &db)),
        "policy not enforced on host 1 for a remote peer"
    );
    assert!(ping(&web, &db), "allowed remote peer blocked");
    assert!(ping(&other, &web), "policy leaked to unselected endpoints");

    // Host 2 dies: once its lease expires the others forget its endpoints.
    lab.kill_daemon(2);
    assert!(
        eventually(SETTLE, || !fdb_macs(&lab, 0).contains(&other.mac)
            && !neigh_ips(&lab, 0).contains(&ip_of(&other))),
        "dead host's endpoint still programmed on host 0: {:?} {:?}",
        fdb_macs(&lab, 0),
        neigh_ips(&lab, 0)
    );
    assert!(!fdb_macs(&lab, 1).contains(&other.mac));
    assert!(
        fdb_macs(&lab, 0).contains(&db.mac),
        "live host's endpoint removed too"
    );

    // Restarted, it publishes its endpoints again and picks up everyone else's.
    lab.start_daemon(2).unwrap();
    assert!(
        eventually(SETTLE, || fdb_macs(&lab, 0).contains(&other.mac)),
        "restarted host not republished"
    );
    assert!(
        eventually(SETTLE, || fdb_macs(&lab, 2).contains(&web.mac)),
        "restarted host not resynchronised"
    );
    assert!(
        eventually(SETTLE, || ping(&other, &web)),
        "restarted host unreachable"
    );
    assert!(!ping(&other, &db), "policy lost on restart");
}

#[test]
fn vxlan_cluster_over_tls_with_client_certificates_and_password() {
    if !require_root() {
        return;
    }
    let certs = tempfile::tempdir().unwrap();
    let tls = Tls::generate(certs.path()).unwrap();
    let mut lab = Lab::new("t", 2, Some(&tls)).unwrap();
    for h in 0..2 {
        lab.hosts[h].flags = vec![
            "--cluster-ca".into(),
            tls.ca.to_string_lossy().into_owned(),
            "--cluster-cert".into(),
            tls.client.0.to_string_lossy().into_owned(),
            "--cluster-key".into(),
            tls.client.1.to_string_lossy().into_owned(),
        ];
        lab.start_daemon(h).unwrap();
    }
    let nets: Vec<(String, String)> = (0..2)
        .map(|h| lab.create_network(h, SUBNET, &json!({"sluice.cluster-network": "secure"})))
        .collect();
    let a = lab.container(0, &nets[0].0, &nets[0].1, "a", &[]).unwrap();
    let b = lab.container(1, &nets[1].0, &nets[1].1, "b", &[]).unwrap();
    assert!(
        eventually(SETTLE, || ping(&a, &b)),
        "no connectivity over a TLS-backed cluster"
    );

    // etcd authentication on: a daemon logs in with --cluster-user and a password file
    // (the TLS client certificate's CN is the user for the others).
    for args in [&["user", "add", "root:s3cret"][..], &["auth", "enable"][..]] {
        let out = lab.etcdctl(args, &[]);
        assert!(
            out.status.success(),
            "etcdctl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let password = lab.dir.path().join("password");
    std::fs::write(&password, "s3cret\n").unwrap();
    let tls_flags = lab.hosts[1].flags.clone();
    lab.kill_daemon(1);
    lab.hosts[1].flags = [
        tls_flags.clone(),
        vec![
            "--cluster-user".into(),
            "root".into(),
            "--cluster-password-file".into(),
            password.to_string_lossy().into_owned(),
        ],
    ]
    .concat();
    lab.start_daemon(1).unwrap();
    assert!(
        eventually(SETTLE, || ping(&b, &a)),
        "no connectivity after logging in with a password"
    );

    // A wrong password is refused, and the daemon says so.
    lab.kill_daemon(1);
    lab.hosts[1].flags = [
        tls_flags,
        vec![
            "--cluster-user".into(),
            "root".into(),
            "--cluster-password".into(),
            "wrong".into(),
        ],
    ]
    .concat();
    let err = lab.start_daemon(1).unwrap_err().to_string();
    assert!(err.contains("joining the cluster"), "{err}");

    // Without a client certificate etcd refuses the daemon.
    lab.hosts[1].flags.truncate(2);
    let err = lab.start_daemon(1).unwrap_err().to_string();
    assert!(err.contains("joining the cluster"), "{err}");
}

/// The endpoint of host `h` with address `address` in `sluice endpoints --json`.
fn endpoint_status(lab: &Lab, h: usize, address: &str) -> Value {
    let out = lab.cli(h, &["endpoints", "--json"]);
    let status: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    status
        .as_array()
        .into_iter()
        .flatten()
        .find(|e| e["addresses"].to_string().contains(address))
        .cloned()
        .unwrap_or_else(|| panic!("no endpoint {address} on host {h}: {status}"))
}

/// Frames the host-side veth `veth` of host `h` transmitted (what the bridge delivered to its
/// container).
fn tx_packets(lab: &Lab, h: usize, veth: &str) -> u64 {
    lab.json_in(h, "ip", &["-s", "-j", "link", "show", "dev", veth])[0]["stats64"]["tx"]["packets"]
        .as_u64()
        .unwrap_or_else(|| panic!("no counters for {veth} on host {h}"))
}

/// `ping -c COUNT` from `from` to `to`, fast.
fn ping_burst(from: &Container, to: &Container, count: u32) -> bool {
    let ip = ip_of(to);
    let count = count.to_string();
    sluice_tests::cluster::in_ns(
        &from.ns,
        "ping",
        &["-q", "-c", &count, "-i", "0.01", "-W", "1", &ip],
    )
    .output()
    .is_ok_and(|o| o.status.success())
}

/// Frames from a remote endpoint arrive on the VXLAN device and go straight into the local
/// receiver's namespace (`sluice_overlay`, `bpf_redirect_peer`): the receiver's host veth
/// does not transmit them, its ingress counters count them, and its ingress policy still
/// decides. The bridge knows remote MACs without learning them. With `--fast-path=false`
/// they cross the bridge again.
#[test]
fn vxlan_overlay_fast_path_skips_the_bridge_and_keeps_ingress_policy() {
    if !require_root() {
        return;
    }
    let mut lab = Lab::new("f", 2, None).unwrap();
    for h in 0..2 {
        lab.start_daemon(h).unwrap();
    }
    let nets: Vec<(String, String)> = (0..2)
        .map(|h| lab.create_network(h, SUBNET, &json!({})))
        .collect();
    let web = lab
        .container(0, &nets[0].0, &nets[0].1, "web", &[("role", "web")])
        .unwrap();
    let other = lab
        .container(0, &nets[0].0, &nets[0].1, "other", &[("role", "other")])
        .unwrap();
    let db = lab
        .container(1, &nets[1].0, &nets[1].1, "db", &[("role", "db")])
        .unwrap();
    assert!(
        eventually(SETTLE, || ping(&web, &db)),
        "{}",
        lab.host_log(1)
    );
    assert!(eventually(SETTLE, || ping(&other, &db)));

    // The bridge of host 1 has a static entry for web's MAC on its VXLAN port.
    let fdb = lab.json_in(1, "bridge", &["-j", "fdb", "show"]);
    assert!(
        fdb.as_array()
            .into_iter()
            .flatten()
            .any(|e| e["mac"] == web.mac.as_str()
                && e["ifname"].as_str().is_some_and(|n| n.starts_with("slvx"))
                && e["master"].as_str().is_some_and(|m| m.starts_with("slbr"))
                && e["state"] == "static"),
        "{fdb}"
    );

    let db_ip = ip_of(&db);
    let veth = endpoint_status(&lab, 1, &db_ip)["host_veth"]
        .as_str()
        .unwrap()
        .to_owned();
    let allowed = |lab: &Lab| {
        endpoint_status(lab, 1, &db_ip)["ingress"]["allowed"]["packets"]
            .as_u64()
            .unwrap()
    };
    let (tx, counted) = (tx_packets(&lab, 1, &veth), allowed(&lab));
    assert!(ping_burst(&web, &db, 50));
    let bridged = tx_packets(&lab, 1, &veth) - tx;
    assert!(
        bridged < 10,
        "{bridged} of 50 echo requests from the overlay crossed the bridge"
    );
    assert!(allowed(&lab) - counted >= 50, "not counted as db's ingress");

    // The receiver's ingress policy decides on the fast path.
    let file = lab.dir.path().join("db.yaml");
    std::fs::write(&file, POLICY).unwrap();
    let applied = lab.cli(0, &["policy", "apply", "-f", &file.to_string_lossy()]);
    assert!(
        applied.status.success(),
        "{}",
        String::from_utf8_lossy(&applied.stderr)
    );
    assert!(
        eventually(SETTLE, || !ping(&other, &db)),
        "policy not enforced for a remote peer on the fast path"
    );
    assert!(ping(&web, &db), "allowed remote peer blocked");

    // Fast path off on host 1: the same traffic crosses the bridge.
    lab.kill_daemon(1);
    lab.hosts[1].flags = vec!["--fast-path=false".into()];
    lab.start_daemon(1).unwrap();
    assert!(eventually(SETTLE, || ping(&web, &db)));
    let tx = tx_packets(&lab, 1, &veth);
    assert!(ping_burst(&web, &db, 50));
    assert!(
        tx_packets(&lab, 1, &veth) - tx >= 50,
        "with --fast-path=false the bridge should deliver"
    );
    assert!(!ping(&other, &db), "policy lost with the fast path off");
}
