//! `docker network create -d sluice --ipam-driver sluice -o mode=vxlan --subnet S`, run on
//! two "hosts" against real private dockerds: each host is a network namespace on an
//! underlay bridge with one etcd (tests/src/cluster.rs), and runs its own dockerd and sluice
//! daemon (legacy socket plugin, own state dir and pins, `--cluster`, `--advertise-addr`;
//! tests/src/docker.rs). What a user sees is asserted: containers on different hosts reach
//! each other, addresses are unique, a mismatching network is refused with a clear error, a
//! policy applied once is enforced on both hosts, `docker network rm` everywhere cleans the
//! kernel and etcd.
//!
//! A second test forms a two-node swarm of the two dockerds and gives the daemons no
//! `--advertise-addr`: the address comes from Docker's `DiscoverNew`.
//!
//! Test resources: underlays 10.80.1.0/24 and 10.80.2.0/24, overlays 10.81.0.0/24 to
//! 10.81.3.0/24, all inside the labs' own network namespaces.

use std::collections::BTreeSet;
use std::time::Duration;

use serde_json::Value;
use sluice_tests::cluster::Lab;
use sluice_tests::docker::{Env, skip_unless_root, two_node_swarm, wait_until};

const UNDERLAY: &str = "10.80.1";
const OVERLAY: &str = "10.81.0.0/24";
/// How long cluster state may take to reach the other host (etcd watch, Engine API lookup).
const SETTLE: Duration = Duration::from_secs(30);

const POLICY: &str = "name: db-from-web\nselector: {labels: {role: db}}\ningress:\n  - action: allow\n    from: [{selector: {labels: {role: web}}}]\n";

/// One private dockerd and sluice daemon per lab host, joined to the lab's etcd (with
/// `--advertise-addr` when `advertise`).
fn docker_hosts(lab: &Lab, advertise: bool) -> Vec<Env> {
    lab.hosts
        .iter()
        .map(|h| {
            let mut flags = ["--cluster", &lab.url, "--cluster-lease-ttl", "5"]
                .map(str::to_owned)
                .to_vec();
            if advertise {
                flags.extend(["--advertise-addr".to_owned(), h.addr.clone()]);
            }
            Env::try_new_in(&h.ns, &flags)
                .unwrap_or_else(|e| panic!("docker host in {}: {e:#}", h.ns))
        })
        .collect()
}

/// `docker network create -d <sluice> --ipam-driver <sluice> -o mode=vxlan EXTRA… NAME`.
fn vxlan_args<'a>(env: &'a Env, name: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec![
        "network",
        "create",
        "-d",
        env.driver(),
        "--ipam-driver",
        env.driver(),
        "-o",
        "mode=vxlan",
    ];
    args.extend_from_slice(extra);
    args.push(name);
    args
}

/// The VXLAN devices of lab host `h` (`ip -d -j link show type vxlan`).
fn vxlan_devices(lab: &Lab, h: usize) -> Vec<Value> {
    lab.json_in(h, "ip", &["-d", "-j", "link", "show", "type", "vxlan"])
        .as_array()
        .cloned()
        .unwrap_or_default()
}

/// Names of sluice's bridges on lab host `h`.
fn sluice_bridges(lab: &Lab, h: usize) -> Vec<String> {
    lab.json_in(h, "ip", &["-j", "link", "show", "type", "bridge"])
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|l| l["ifname"].as_str())
        .filter(|n| n.starts_with("slbr"))
        .map(str::to_owned)
        .collect()
}

/// Every key sluice holds in etcd.
fn etcd_keys(lab: &Lab) -> Vec<String> {
    lab.etcd_get("/sluice/v1/")
        .into_iter()
        .map(|(k, _)| k)
        .collect()
}

/// One ping, no retries: for "still denied" checks.
fn pings(env: &Env, from: &str, to: &str) -> bool {
    env.exec(from, &["ping", "-c1", "-W1", to]).status.success()
}

#[test]
fn vxlan_network_across_two_docker_hosts() {
    if skip_unless_root() {
        return;
    }
    let lab = Lab::on_underlay("d", 2, None, UNDERLAY).unwrap();
    // Dropped before the lab: dockerds and daemons stop before their namespaces go.
    let hosts = docker_hosts(&lab, true);

    // The same `docker network create` on each host makes one cluster network.
    for env in &hosts {
        env.docker_ok(vxlan_args(env, "overlay", &["--subnet", OVERLAY]));
    }
    let devices: Vec<Vec<Value>> = (0..2).map(|h| vxlan_devices(&lab, h)).collect();
    for d in &devices {
        assert_eq!(d.len(), 1, "one VXLAN device per host: {d:?}");
        assert_eq!(d[0]["mtu"], 1450, "underlay MTU minus 50: {d:?}");
        assert_eq!(d[0]["linkinfo"]["info_data"]["port"], 4789, "{d:?}");
    }
    assert_eq!(
        devices[0][0]["linkinfo"]["info_data"]["id"], devices[1][0]["linkinfo"]["info_data"]["id"],
        "one VNI on both hosts"
    );
    assert!(
        etcd_keys(&lab)
            .iter()
            .any(|k| k == &format!("/sluice/v1/networks/{OVERLAY}")),
        "{:?}",
        etcd_keys(&lab)
    );

    // The same cluster network name with other settings: a clear error, nothing created.
    hosts[0].docker_ok(vxlan_args(
        &hosts[0],
        "named",
        &[
            "-o",
            "sluice.cluster-network=shared",
            "--subnet",
            "10.81.1.0/24",
        ],
    ));
    let err = hosts[1].docker_fails(vxlan_args(
        &hosts[1],
        "named",
        &[
            "-o",
            "sluice.cluster-network=shared",
            "--subnet",
            "10.81.2.0/24",
        ],
    ));
    assert!(
        err.contains(
            "cluster network \"shared\" already exists with different settings: subnets 10.81.1.0/24 (asked 10.81.2.0/24)"
        ),
        "{err}"
    );
    assert!(
        !hosts[1]
            .docker(["network", "inspect", "named"])
            .status
            .success(),
        "refused network exists in Docker"
    );
    assert_eq!(
        vxlan_devices(&lab, 1).len(),
        1,
        "refused network in the kernel"
    );
    // Its only member deletes it: the cluster forgets it (and another host may reuse the name).
    hosts[0].docker_ok(["network", "rm", "named"]);
    assert!(
        !etcd_keys(&lab).iter().any(|k| k.contains("shared")),
        "{:?}",
        etcd_keys(&lab)
    );

    // Containers on both hosts, found by Docker labels.
    for (h, env) in hosts.iter().enumerate() {
        for role in ["web", "db", "other"] {
            env.run_container(
                "overlay",
                &format!("{role}{h}"),
                &["--label", &format!("role={role}")],
            );
        }
    }
    let ip = |h: usize, role: &str| hosts[h].container_ip(&format!("{role}{h}"), "overlay");
    let addresses: BTreeSet<String> = (0..2)
        .flat_map(|h| ["web", "db", "other"].map(|r| ip(h, r)))
        .collect();
    assert_eq!(
        addresses.len(),
        6,
        "addresses unique across hosts: {addresses:?}"
    );
    assert!(
        addresses.iter().all(|a| a.starts_with("10.81.0.")),
        "{addresses:?}"
    );
    let (db0, db1, web1) = (ip(0, "db"), ip(1, "db"), ip(1, "web"));

    // Across hosts, both ways.
    for (h, from, to) in [(0, "other0", &db1), (1, "other1", &db0), (0, "web0", &web1)] {
        assert!(
            hosts[h].can_ping(from, to, SETTLE),
            "{from} (host {h}) cannot reach {to}:\n{}",
            hosts[h].logs_tail()
        );
    }

    // A policy applied once, on host 0, reaches host 1 and is enforced on both: `db` takes
    // only `web`, local or remote.
    let file = lab.dir.path().join("db-from-web.yaml");
    std::fs::write(&file, POLICY).unwrap();
    hosts[0].sluice_cli_ok(&["policy", "apply", "-f", &file.to_string_lossy()]);
    assert!(
        wait_until(SETTLE, || hosts[1]
            .sluice_cli_ok(&["policy", "ls"])
            .contains("db-from-web")),
        "policy not replicated to host 1"
    );
    // Remote peers not allowed are dropped by the receiving host (host 1 for other0, host 0
    // for other1) …
    assert!(
        wait_until(SETTLE, || !pings(&hosts[0], "other0", &db1)),
        "host 1 does not enforce the policy on a remote peer"
    );
    assert!(
        wait_until(SETTLE, || !pings(&hosts[1], "other1", &db0)),
        "host 0 does not enforce the policy on a remote peer"
    );
    // … remote peers allowed by their Docker labels pass, …
    assert!(
        hosts[0].can_ping("web0", &db1, SETTLE),
        "remote web0 blocked: its labels did not reach host 1\n{}",
        hosts[1].logs_tail()
    );
    assert!(
        hosts[1].can_ping("web1", &db0, SETTLE),
        "remote web1 blocked: its labels did not reach host 0\n{}",
        hosts[0].logs_tail()
    );
    // … unselected endpoints are untouched, and the denial holds.
    assert!(hosts[0].can_ping("other0", &web1, SETTLE));
    assert!(!pings(&hosts[0], "other0", &db1));
    assert!(!pings(&hosts[1], "other1", &db0));

    // Everything removed on every host: no VXLAN device or bridge left, nothing in etcd
    // but the identity counter.
    hosts[1].sluice_cli_ok(&["policy", "rm", "db-from-web"]);
    for env in &hosts {
        env.remove_all_containers();
        env.docker_ok(["network", "rm", "overlay"]);
    }
    for h in 0..2 {
        assert!(
            vxlan_devices(&lab, h).is_empty(),
            "{:?}",
            vxlan_devices(&lab, h)
        );
        assert!(
            sluice_bridges(&lab, h).is_empty(),
            "{:?}",
            sluice_bridges(&lab, h)
        );
    }
    assert_eq!(etcd_keys(&lab), vec!["/sluice/v1/identity".to_owned()]);
}

/// On swarm nodes the daemons need no `--advertise-addr`: Docker's `DiscoverNew` names each
/// node's data-path address when the plugin is first used, and the vxlan network created
/// right after tunnels from it.
#[test]
fn vxlan_address_from_swarm_discover_new() {
    if skip_unless_root() {
        return;
    }
    let lab = Lab::on_underlay("w", 2, None, "10.80.2").unwrap();
    let hosts = docker_hosts(&lab, false);
    let _swarm = two_node_swarm(&hosts[0], &lab.hosts[0].addr, &hosts[1], &lab.hosts[1].addr);
    for env in &hosts {
        env.docker_ok(vxlan_args(env, "swarmed", &["--subnet", "10.81.3.0/24"]));
    }
    for h in 0..2 {
        let d = vxlan_devices(&lab, h);
        assert_eq!(
            d[0]["linkinfo"]["info_data"]["local"],
            lab.hosts[h].addr.as_str(),
            "host {h} tunnels from its swarm address: {d:?}"
        );
    }
    for (h, env) in hosts.iter().enumerate() {
        env.run_container("swarmed", &format!("s{h}"), &[]);
    }
    let s1 = hosts[1].container_ip("s1", "swarmed");
    assert!(
        hosts[0].can_ping("s0", &s1, SETTLE),
        "no path between the swarm nodes:\n{}",
        hosts[0].logs_tail()
    );
    for env in &hosts {
        env.remove_all_containers();
        env.docker_ok(["network", "rm", "swarmed"]);
    }
}
