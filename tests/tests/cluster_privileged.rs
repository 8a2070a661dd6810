//! `mode=vxlan` across three hosts on one machine (tests/src/cluster.rs): three host
//! namespaces on an underlay bridge, one etcd, one sluice daemon per host driven through its
//! plugin API like dockerd, containers as namespaces.

use std::collections::BTreeSet;
use std::time::Duration;

use serde_json::{Value, json};
use sluice_driver::datapath::LAYOUT_VERSION;
use sluice_driver::datapath::layout::MAP_NEIGH;
use sluice_tests::cluster::{Container, Lab, Tls, eventually, hex_id, ping};
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

/// How many address claims in etcd `host` (its underlay address) holds.
fn claims_of(lab: &Lab, host: &str) -> usize {
    lab.etcd_get("/sluice/v1/leases/")
        .iter()
        .filter(|(_, holder)| holder == host)
        .count()
}

/// How many etcd leases are alive (one per running daemon, plus a dead one's until it
/// expires).
fn etcd_leases(lab: &Lab) -> usize {
    let out = lab.etcdctl(&["lease", "list"], &[]);
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .skip(1)
        .filter(|l| !l.trim().is_empty())
        .count()
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
    lab.apply_policy(0, POLICY);
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
    let host2 = lab.hosts[2].addr.clone();
    let claims2 = claims_of(&lab, &host2);
    assert!(claims2 > 1, "host 2 holds its addresses: {claims2}");
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
    // Its address claims went with its lease: none stays reserved forever.
    assert!(
        eventually(SETTLE, || claims_of(&lab, &host2) == 0),
        "dead host's addresses still claimed: {}",
        claims_of(&lab, &host2)
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
    assert!(
        eventually(SETTLE, || claims_of(&lab, &host2) == claims2),
        "restarted host did not claim its addresses again: {} of {claims2}",
        claims_of(&lab, &host2)
    );

    // Host 1's daemon restarts at once: its claims and its endpoints survive the expiry of
    // its old lease (bound to the new one).
    let host1 = lab.hosts[1].addr.clone();
    let claims1 = claims_of(&lab, &host1);
    lab.kill_daemon(1);
    lab.start_daemon(1).unwrap();
    assert!(
        eventually(SETTLE, || etcd_leases(&lab) == 3),
        "the killed daemon's lease never expired: {} leases",
        etcd_leases(&lab)
    );
    assert_eq!(
        claims_of(&lab, &host1),
        claims1,
        "addresses lost on restart"
    );
    assert!(
        fdb_macs(&lab, 0).contains(&db.mac),
        "restarted host's endpoint lost"
    );
    assert!(ping(&web, &db), "restarted host unreachable");
}

/// The cluster network record lives while some host has the network: it goes with the last
/// member, in a transaction that a host creating the network at the same time never loses.
#[test]
fn cluster_network_record_goes_with_its_last_member() {
    if !require_root() {
        return;
    }
    let mut lab = Lab::new("n", 2, None).unwrap();
    for h in 0..2 {
        lab.start_daemon(h).unwrap();
    }
    const RACE: &str = "10.81.9.0/24";
    let options = json!({"sluice.cluster-network": "race"});
    let create = |h: usize, id: &str| {
        let (ok, v) = lab.try_create_network(h, &hex_id(id), RACE, "10.81.9.1/24", &options);
        assert!(ok, "CreateNetwork {id} on host {h}: {v}");
    };
    let delete = |h: usize, id: &str| {
        lab.call_ok(
            h,
            "NetworkDriver.DeleteNetwork",
            &json!({"NetworkID": hex_id(id)}),
        );
    };
    let record = || lab.etcd_get("/sluice/v1/networks/race");
    let members = || -> BTreeSet<String> {
        lab.etcd_get("/sluice/v1/members/race/")
            .into_iter()
            .filter_map(|(k, _)| k.rsplit('/').next().map(str::to_owned))
            .collect()
    };
    let (a, b) = (lab.hosts[0].addr.clone(), lab.hosts[1].addr.clone());

    create(0, "a");
    create(1, "b");
    assert_eq!(members(), BTreeSet::from([a.clone(), b.clone()]));
    delete(0, "a");
    assert_eq!(record().len(), 1, "removed while host 1 still has it");
    assert_eq!(members(), BTreeSet::from([b.clone()]));
    delete(1, "b");
    assert!(record().is_empty(), "{:?}", record());
    assert!(members().is_empty());
    assert!(lab.etcd_get("/sluice/v1/vnis/").is_empty(), "VNI kept");
    delete(1, "b");

    // Host 0 (the only member) deletes while host 1 creates: afterwards the record exists
    // exactly when a member does, with the VNI host 1 tunnels with.
    for round in 0..5 {
        let (ida, idb) = (format!("a{round}"), format!("b{round}"));
        create(0, &ida);
        std::thread::scope(|s| {
            s.spawn(|| delete(0, &ida));
            s.spawn(|| create(1, &idb));
        });
        assert_eq!(members(), BTreeSet::from([b.clone()]), "round {round}");
        let rec = record();
        assert_eq!(rec.len(), 1, "round {round}: member without a record");
        let vni = serde_json::from_str::<Value>(&rec[0].1).unwrap()["vni"].clone();
        let dev = lab.json_in(1, "ip", &["-d", "-j", "link", "show", "type", "vxlan"]);
        assert_eq!(
            dev[0]["linkinfo"]["info_data"]["id"], vni,
            "round {round}: {dev}"
        );
        delete(1, &idb);
        assert!(record().is_empty(), "round {round}: {:?}", record());
    }
}

/// `--cluster` without `--advertise-addr`: the daemon starts, refuses `mode=vxlan` with a
/// clear error until Docker's `DiscoverNew` (swarm mode) names this node, then joins the
/// cluster with that address, and remembers it across a restart.
#[test]
fn underlay_address_from_discover_new() {
    if !require_root() {
        return;
    }
    let mut lab = Lab::new("v", 1, None).unwrap();
    lab.hosts[0].advertise = false;
    lab.start_daemon(0).unwrap();
    let addr = lab.hosts[0].addr.clone();
    let try_create = |lab: &Lab, id: &str, subnet: &str, gateway: &str| {
        lab.try_create_network(0, &hex_id(id), subnet, gateway, &json!({}))
    };
    let (ok, err) = try_create(&lab, "v1", "10.81.8.0/24", "10.81.8.1/24");
    assert!(!ok, "vxlan network without an underlay address: {err}");
    assert!(
        err.to_string()
            .contains("no underlay address: pass --advertise-addr or join a swarm"),
        "{err}"
    );
    // Another node's event is not this host's address.
    lab.call_ok(
        0,
        "NetworkDriver.DiscoverNew",
        &json!({"DiscoveryType": 1, "DiscoveryData": {"Address": "10.79.0.77", "Self": false}}),
    );
    assert!(!try_create(&lab, "v1", "10.81.8.0/24", "10.81.8.1/24").0);
    lab.call_ok(
        0,
        "NetworkDriver.DiscoverNew",
        &json!({"DiscoveryType": 1, "DiscoveryData": {"Address": addr, "BindAddress": "0.0.0.0", "Self": true}}),
    );
    // As Docker does, the call that needs the cluster follows at once: it waits for the
    // join the address started.
    let (ok, v) = try_create(&lab, "v1", "10.81.8.0/24", "10.81.8.1/24");
    assert!(ok, "no cluster after DiscoverNew: {v}\n{}", lab.host_log(0));
    let dev = lab.json_in(0, "ip", &["-d", "-j", "link", "show", "type", "vxlan"]);
    assert_eq!(
        dev[0]["linkinfo"]["info_data"]["local"],
        addr.as_str(),
        "{dev}"
    );
    assert_eq!(
        lab.etcd_get("/sluice/v1/members/10.81.8.0/24/"),
        vec![(
            format!("/sluice/v1/members/10.81.8.0/24/{addr}"),
            String::new()
        )]
    );

    // Docker does not send it again when only sluice restarts: the daemon remembers it.
    lab.kill_daemon(0);
    lab.start_daemon(0).unwrap();
    let (ok, v) = try_create(&lab, "v2", "10.81.7.0/24", "10.81.7.1/24");
    assert!(ok, "after a restart: {v}\n{}", lab.host_log(0));
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
/// Two hosts (lab `tag`), the same overlay network on both (`options`), `web` and `other`
/// on host 0 and `db` on host 1; returns once `web` reaches `db`.
fn web_other_db(tag: &str, options: &Value) -> (Lab, Container, Container, Container) {
    let mut lab = Lab::new(tag, 2, None).unwrap_or_else(|e| panic!("lab: {e:#}"));
    for h in 0..2 {
        lab.start_daemon(h)
            .unwrap_or_else(|e| panic!("host {h} did not start: {e:#}"));
    }
    let nets: Vec<(String, String)> = (0..2)
        .map(|h| lab.create_network(h, SUBNET, options))
        .collect();
    let mut container = |h: usize, name: &str| {
        lab.container(h, &nets[h].0, &nets[h].1, name, &[("role", name)])
            .unwrap_or_else(|e| panic!("container {name}: {e:#}"))
    };
    let (web, other, db) = (
        container(0, "web"),
        container(0, "other"),
        container(1, "db"),
    );
    assert!(
        eventually(SETTLE, || ping(&web, &db)),
        "{}",
        lab.host_log(1)
    );
    (lab, web, other, db)
}

/// Applies [`POLICY`] on host 0 and waits until `db` refuses `other` (`refused`: what a
/// failure means) while still answering `web`.
fn apply_db_policy(lab: &Lab, web: &Container, db: &Container, other: &Container, refused: &str) {
    lab.apply_policy(0, POLICY);
    assert!(eventually(SETTLE, || !ping(other, db)), "{refused}");
    assert!(ping(web, db), "allowed remote peer blocked");
}

/// Restarts host `h`'s daemon with `--fast-path=false` and waits until `web` reaches `db`.
fn restart_without_fast_path(lab: &mut Lab, h: usize, web: &Container, db: &Container) {
    lab.kill_daemon(h);
    lab.hosts[h].flags = vec!["--fast-path=false".into()];
    lab.start_daemon(h)
        .unwrap_or_else(|e| panic!("host {h} did not start again: {e:#}"));
    assert!(eventually(SETTLE, || ping(web, db)));
}

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
    let (mut lab, web, other, db) = web_other_db("f", &json!({}));
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
    apply_db_policy(
        &lab,
        &web,
        &db,
        &other,
        "policy not enforced for a remote peer on the fast path",
    );

    // Fast path off on host 1: the same traffic crosses the bridge.
    restart_without_fast_path(&mut lab, 1, &web, &db);
    let tx = tx_packets(&lab, 1, &veth);
    assert!(ping_burst(&web, &db, 50));
    assert!(
        tx_packets(&lab, 1, &veth) - tx >= 50,
        "with --fast-path=false the bridge should deliver"
    );
    assert!(!ping(&other, &db), "policy lost with the fast path off");
}

/// Packets host `h`'s VXLAN device has (transmitted, received).
fn vxlan_packets(lab: &Lab, h: usize) -> (u64, u64) {
    let links = lab.json_in(h, "ip", &["-s", "-j", "link", "show", "type", "vxlan"]);
    let dev = links
        .as_array()
        .into_iter()
        .flatten()
        .find(|l| l["ifname"].as_str().is_some_and(|n| n.starts_with("slvx")))
        .unwrap_or_else(|| panic!("no VXLAN device on host {h}: {links}"));
    let count = |dir: &str| dev["stats64"][dir]["packets"].as_u64().unwrap_or(0);
    (count("tx"), count("rx"))
}

/// Host `h`'s cached underlay next hops (`NEIGH`, `sluice_common::Neigh`): (VTEP address,
/// next hop's MAC) pairs, both as `ip` prints them.
fn cached_next_hops(lab: &Lab, h: usize) -> Vec<(String, String)> {
    let map = lab.hosts[h]
        .bpf
        .join(format!("maps/v{LAYOUT_VERSION}/{MAP_NEIGH}"));
    let dump = lab.json_in(
        h,
        "bpftool",
        &["-j", "map", "dump", "pinned", &map.to_string_lossy()],
    );
    let bytes = |v: &Value| -> Vec<u8> {
        v.as_array()
            .into_iter()
            .flatten()
            .filter_map(|b| u8::from_str_radix(b.as_str()?.trim_start_matches("0x"), 16).ok())
            .collect()
    };
    dump.as_array()
        .unwrap_or_else(|| panic!("no {map:?}: {dump}"))
        .iter()
        .map(|e| {
            // Key: `neigh_key` (u64, host order = little endian): the VTEP in the low half.
            let (k, v) = (bytes(&e["key"]), bytes(&e["value"]));
            let vtep = format!("{}.{}.{}.{}", k[3], k[2], k[1], k[0]);
            // Value: checked_ns (8), ifindex (4), dmac (6).
            let mac = v[12..18]
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect::<Vec<_>>()
                .join(":");
            (vtep, mac)
        })
        .collect()
}

/// With the fast path the programs encapsulate and decapsulate VXLAN themselves: a ping
/// between containers on two hosts crosses neither VXLAN device, in either direction, and
/// the receiver's ingress policy and counters still apply. What they put on the wire is what
/// the kernel's VXLAN would: with the fast path off on the other host (a plain kernel VXLAN
/// device decoding and answering), the same pings still work, the kernel device receives
/// what the program encapsulated and the program decapsulates what the kernel sent.
#[test]
fn vxlan_fast_path_encapsulates_in_the_program_and_interoperates_with_kernel_vxlan() {
    if !require_root() {
        return;
    }
    let (mut lab, web, other, db) =
        web_other_db("x", &json!({"vni": "4242", "vxlan_port": "8472"}));
    let db_ip = ip_of(&db);
    let allowed = |lab: &Lab| {
        endpoint_status(lab, 1, &db_ip)["ingress"]["allowed"]["packets"]
            .as_u64()
            .unwrap()
    };

    // Both ways in the programs: the devices see (almost) nothing of 50 echoes.
    let (before, counted) = (
        [vxlan_packets(&lab, 0), vxlan_packets(&lab, 1)],
        allowed(&lab),
    );
    assert!(ping_burst(&web, &db, 50));
    let after = [vxlan_packets(&lab, 0), vxlan_packets(&lab, 1)];
    for h in 0..2 {
        let (tx, rx) = (after[h].0 - before[h].0, after[h].1 - before[h].1);
        assert!(
            tx < 10 && rx < 10,
            "host {h}: the VXLAN device sent {tx} and received {rx} packets of 50 echoes"
        );
    }
    assert!(allowed(&lab) - counted >= 50, "not counted as db's ingress");
    // The sender's program keeps the next hop towards host 1 (its underlay MAC) instead of
    // asking the FIB for every packet.
    let mac = lab.json_in(1, "ip", &["-j", "link", "show", "eth0"])[0]["address"]
        .as_str()
        .unwrap()
        .to_owned();
    let hops = cached_next_hops(&lab, 0);
    assert!(
        hops.contains(&(lab.hosts[1].addr.clone(), mac.clone())),
        "host 0's NEIGH {hops:?} lacks host 1 ({}, {mac})",
        lab.hosts[1].addr
    );

    // Ingress policy where the program decapsulates.
    apply_db_policy(
        &lab,
        &web,
        &db,
        &other,
        "policy not enforced on decapsulation",
    );

    // Host 1 without the fast path: its kernel VXLAN device decodes host 0's packets and
    // encapsulates the replies, which host 0's program decapsulates.
    restart_without_fast_path(&mut lab, 1, &web, &db);
    let before = [vxlan_packets(&lab, 0), vxlan_packets(&lab, 1)];
    assert!(ping_burst(&web, &db, 50));
    let after = [vxlan_packets(&lab, 0), vxlan_packets(&lab, 1)];
    let delta = |h: usize| (after[h].0 - before[h].0, after[h].1 - before[h].1);
    let ((tx0, rx0), (tx1, rx1)) = (delta(0), delta(1));
    // (The kernel's packets carry a UDP checksum the program cannot trust over a veth: host
    // 0's device decodes those.)
    assert!(
        tx0 < 10,
        "host 0 (fast path): its VXLAN device sent {tx0} (received {rx0})"
    );
    assert!(
        tx1 >= 50 && rx1 >= 50,
        "host 1 (kernel VXLAN): its device sent {tx1} and received {rx1} of 50 echoes"
    );
    assert!(!ping(&other, &db), "policy lost with the fast path off");
}
