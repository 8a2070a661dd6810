//! Docker end-to-end: networks and containers on one private dockerd with sluice as network
//! and IPAM driver, checked the way a user would (`docker network inspect`, `ping`, `ip`).
//!
//! The tests share one environment and run in parallel; each uses its own subnets under
//! 10.31.0.0/16 (and fd00:31::/32) and its own names.

use std::collections::HashSet;
use std::net::IpAddr;
use std::time::Duration;

use ipnetwork::IpNetwork;
use sluice_tests::docker::{
    self, Env, assert_subnet_free, host_addresses, ip_json, present_links, sl_links_for, wait_until,
};

fn env() -> &'static Env {
    docker::shared()
}

fn net(cidr: &str) -> IpNetwork {
    cidr.parse()
        .unwrap_or_else(|e| panic!("not a CIDR: {cidr:?}: {e}"))
}

fn ip(addr: &str) -> IpAddr {
    addr.parse()
        .unwrap_or_else(|e| panic!("not an IP address: {addr:?}: {e}"))
}

/// The IPAM config entries of a network from `docker network inspect`.
fn ipam_configs(env: &Env, name: &str) -> Vec<serde_json::Value> {
    env.network_inspect(name)["IPAM"]["Config"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

fn bridge_of(network_id: &str) -> String {
    format!("slbr{}", &network_id[..11])
}

/// The host link's JSON from `ip -j link show NAME`, if it exists.
fn host_link(name: &str) -> Option<serde_json::Value> {
    let all = ip_json(&["link", "show"]);
    all.as_array()?
        .iter()
        .find(|l| l["ifname"] == name)
        .cloned()
}

#[test]
fn automatic_subnet_comes_from_the_default_pool() {
    if docker::skip_unless_root() {
        return;
    }
    let env = env();
    let id = env.create_network("n-auto", &[]);
    let configs = ipam_configs(env, "n-auto");
    assert_eq!(configs.len(), 1, "one IPv4 config expected: {configs:?}");
    let subnet = net(configs[0]["Subnet"].as_str().unwrap_or_default());
    let pool = net(env.default_pool());
    assert!(
        pool.contains(subnet.network()) && subnet.prefix() == 24,
        "automatic subnet {subnet} should be a /24 inside {pool}"
    );
    let gateway = ip(configs[0]["Gateway"].as_str().unwrap_or_default());
    assert!(
        subnet.contains(gateway),
        "gateway {gateway} outside {subnet}"
    );

    // The host's bridge for the network holds the gateway address.
    let bridge = bridge_of(&id);
    let addrs = host_addresses(&bridge);
    assert!(
        addrs.contains(&format!("{gateway}/{}", subnet.prefix())),
        "bridge {bridge} should carry {gateway}/{}: {addrs:?}",
        subnet.prefix()
    );

    // A container gets an address from the automatic subnet.
    env.run_container("n-auto", "auto-a", &[]);
    let a = ip(&env.container_ip("auto-a", "n-auto"));
    assert!(subnet.contains(a), "{a} outside {subnet}");
    assert_ne!(a, gateway);

    // A second automatic network gets a different subnet.
    env.create_network("n-auto2", &[]);
    let subnet2 = net(ipam_configs(env, "n-auto2")[0]["Subnet"]
        .as_str()
        .unwrap_or_default());
    assert!(pool.contains(subnet2.network()), "{subnet2} outside {pool}");
    assert_ne!(
        subnet, subnet2,
        "two automatic networks got the same subnet"
    );
}

#[test]
fn explicit_subnet_ip_range_and_gateway_are_honoured() {
    if docker::skip_unless_root() {
        return;
    }
    let env = env();
    assert_subnet_free("10.31.1.0/24");
    let id = env.create_network(
        "n-explicit",
        &[
            "--subnet",
            "10.31.1.0/24",
            "--ip-range",
            "10.31.1.128/25",
            "--gateway",
            "10.31.1.1",
        ],
    );
    let configs = ipam_configs(env, "n-explicit");
    assert_eq!(configs.len(), 1, "{configs:?}");
    assert_eq!(configs[0]["Subnet"], "10.31.1.0/24");
    assert_eq!(configs[0]["IPRange"], "10.31.1.128/25");
    assert_eq!(configs[0]["Gateway"], "10.31.1.1");

    let bridge = bridge_of(&id);
    let addrs = host_addresses(&bridge);
    assert!(
        addrs.contains(&"10.31.1.1/24".to_owned()),
        "bridge {bridge} should carry 10.31.1.1/24: {addrs:?}"
    );

    for name in ["explicit-a", "explicit-b"] {
        env.run_container("n-explicit", name, &[]);
        let a = ip(&env.container_ip(name, "n-explicit"));
        assert!(
            net("10.31.1.128/25").contains(a),
            "{name} got {a}, outside the ip-range 10.31.1.128/25"
        );
    }
}

#[test]
fn containers_reach_each_other_by_ip_and_name_and_reach_the_gateway() {
    if docker::skip_unless_root() {
        return;
    }
    let env = env();
    assert_subnet_free("10.31.2.0/24");
    env.create_network("n-ping", &["--subnet", "10.31.2.0/24"]);
    env.run_container("n-ping", "ping-a", &[]);
    env.run_container("n-ping", "ping-b", &["--ip", "10.31.2.50"]);

    // --ip gives exactly that address, seen inside the container.
    assert_eq!(env.container_ip("ping-b", "n-ping"), "10.31.2.50");
    let inside = env.exec_ok("ping-b", &["ip", "-o", "-4", "addr", "show", "dev", "eth0"]);
    assert!(
        inside.contains("inet 10.31.2.50/24"),
        "ping-b's eth0 should hold 10.31.2.50/24: {inside}"
    );

    let a = env.container_ip("ping-a", "n-ping");
    env.assert_ping("ping-a", "10.31.2.50");
    env.assert_ping("ping-b", &a);
    // By name, through Docker's embedded DNS.
    env.assert_ping("ping-a", "ping-b");
    env.assert_ping("ping-b", "ping-a");
    // The gateway (the bridge on the host).
    env.assert_ping("ping-a", "10.31.2.1");

    // A non-internal network gives the container a default route via its gateway.
    let routes = env.exec_ok("ping-a", &["ip", "-4", "route"]);
    assert!(
        routes
            .lines()
            .any(|l| l.starts_with("default via 10.31.2.1")),
        "ping-a should have a default route via 10.31.2.1: {routes}"
    );
}

#[test]
fn ipv6_subnet_gives_containers_v6_addresses_that_reach_each_other() {
    if docker::skip_unless_root() {
        return;
    }
    let env = env();
    assert_subnet_free("10.31.3.0/24");
    assert_subnet_free("fd00:31:3::/64");
    env.create_network(
        "n-v6",
        &[
            "--ipv6",
            "--subnet",
            "10.31.3.0/24",
            "--subnet",
            "fd00:31:3::/64",
        ],
    );
    env.run_container("n-v6", "v6-a", &[]);
    env.run_container("n-v6", "v6-b", &[]);
    let subnet = net("fd00:31:3::/64");
    let a6 = env.container_ip6("v6-a", "n-v6");
    let b6 = env.container_ip6("v6-b", "n-v6");
    for (name, addr) in [("v6-a", &a6), ("v6-b", &b6)] {
        assert!(
            !addr.is_empty() && subnet.contains(ip(addr)),
            "{name} should have an IPv6 address in {subnet}, has {addr:?}"
        );
        let inside = env.exec_ok(name, &["ip", "-o", "-6", "addr", "show", "dev", "eth0"]);
        assert!(
            inside.contains(&format!("inet6 {addr}/64")),
            "{name}'s eth0 should hold {addr}/64: {inside}"
        );
    }
    assert_ne!(a6, b6);
    assert!(
        env.can_ping6("v6-a", &b6, Duration::from_secs(20)),
        "v6-a cannot ping6 {b6}\n{}",
        env.logs_tail()
    );
    assert!(
        env.can_ping6("v6-b", &a6, Duration::from_secs(20)),
        "v6-b cannot ping6 {a6}\n{}",
        env.logs_tail()
    );
    // IPv4 works on the same network.
    let a4 = env.container_ip("v6-a", "n-v6");
    env.assert_ping("v6-b", &a4);
}

#[test]
fn ipv6_without_subnet_gets_an_automatic_ula_64() {
    if docker::skip_unless_root() {
        return;
    }
    let env = env();
    env.create_network("n-v6auto", &["--ipv6"]);
    let configs = ipam_configs(env, "n-v6auto");
    let v6: Vec<IpNetwork> = configs
        .iter()
        .filter_map(|c| c["Subnet"].as_str())
        .map(net)
        .filter(IpNetwork::is_ipv6)
        .collect();
    assert_eq!(v6.len(), 1, "one IPv6 subnet expected: {configs:?}");
    let subnet = v6[0];
    let ula = net("fd53:6c75:6963::/48");
    let pool = net(env.default_pool_v6());
    assert!(
        subnet.prefix() == 64 && ula.contains(subnet.network()) && pool.contains(subnet.network()),
        "automatic IPv6 subnet {subnet} should be a /64 from {pool} (inside {ula})"
    );
    env.run_container("n-v6auto", "v6auto-a", &[]);
    env.run_container("n-v6auto", "v6auto-b", &[]);
    let a6 = env.container_ip6("v6auto-a", "n-v6auto");
    let b6 = env.container_ip6("v6auto-b", "n-v6auto");
    assert!(
        !a6.is_empty() && subnet.contains(ip(&a6)),
        "v6auto-a: {a6:?} not in {subnet}"
    );
    assert!(
        env.can_ping6("v6auto-b", &a6, Duration::from_secs(20)),
        "v6auto-b cannot ping6 {a6} (b has {b6})\n{}",
        env.logs_tail()
    );
}

#[test]
fn connect_and_disconnect_a_running_container() {
    if docker::skip_unless_root() {
        return;
    }
    let env = env();
    assert_subnet_free("10.31.5.0/24");
    assert_subnet_free("10.31.6.0/24");
    env.create_network("n-conn-a", &["--subnet", "10.31.5.0/24"]);
    env.create_network("n-conn-b", &["--subnet", "10.31.6.0/24"]);
    env.run_container("n-conn-a", "conn-x", &[]);
    env.run_container("n-conn-b", "conn-y", &[]);
    let y = env.container_ip("conn-y", "n-conn-b");

    // Not connected yet: conn-x has no eth1 and cannot reach n-conn-b.
    assert!(
        !env.exec("conn-x", &["ip", "link", "show", "eth1"])
            .status
            .success()
    );

    env.docker_ok(["network", "connect", "n-conn-b", "conn-x"]);
    let eth1 = env.exec_ok("conn-x", &["ip", "-o", "-4", "addr", "show", "dev", "eth1"]);
    let x_b = env.container_ip("conn-x", "n-conn-b");
    assert!(
        net("10.31.6.0/24").contains(ip(&x_b)) && eth1.contains(&format!("inet {x_b}/24")),
        "conn-x's eth1 should hold its n-conn-b address {x_b}/24: {eth1}"
    );
    env.assert_ping("conn-x", &y);
    env.assert_ping("conn-y", "conn-x");

    let links = env.container_links("conn-x", "n-conn-b");
    env.docker_ok(["network", "disconnect", "n-conn-b", "conn-x"]);
    assert!(
        !env.exec("conn-x", &["ip", "link", "show", "eth1"])
            .status
            .success(),
        "eth1 should be gone from conn-x after disconnect"
    );
    assert!(
        wait_until(Duration::from_secs(10), || present_links(&links).is_empty()),
        "host links of the disconnected endpoint remain: {:?}",
        present_links(&links)
    );
    // Still on its first network.
    env.assert_ping("conn-x", "10.31.5.1");
}

#[test]
fn twenty_containers_in_parallel_get_distinct_addresses_and_reach_each_other() {
    if docker::skip_unless_root() {
        return;
    }
    let env = env();
    assert_subnet_free("10.31.7.0/24");
    env.create_network("n-many", &["--subnet", "10.31.7.0/24"]);
    let names: Vec<String> = (0..20).map(|i| format!("many-{i:02}")).collect();
    std::thread::scope(|s| {
        for name in &names {
            s.spawn(move || env.run_container("n-many", name, &[]));
        }
    });
    let ips: Vec<String> = names
        .iter()
        .map(|n| env.container_ip(n, "n-many"))
        .collect();
    let distinct: HashSet<&String> = ips.iter().collect();
    assert_eq!(distinct.len(), 20, "addresses are not distinct: {ips:?}");
    for a in &ips {
        assert!(
            net("10.31.7.0/24").contains(ip(a)),
            "{a} outside 10.31.7.0/24"
        );
    }
    // One container reaches all the others, and each reaches its neighbour (in parallel).
    for target in &ips[1..] {
        env.assert_ping(&names[0], target);
    }
    std::thread::scope(|s| {
        for i in 0..20 {
            let (from, to) = (&names[i], &ips[(i + 1) % 20]);
            s.spawn(move || env.assert_ping(from, to));
        }
    });
}

#[test]
fn network_rm_leaves_no_links_and_releases_the_subnet() {
    if docker::skip_unless_root() {
        return;
    }
    let env = env();
    assert_subnet_free("10.31.8.0/24");
    let id = env.create_network("n-rm", &["--subnet", "10.31.8.0/24"]);
    env.run_container("n-rm", "rm-a", &[]);
    let links = env.container_links("rm-a", "n-rm");
    assert!(!sl_links_for(&id).is_empty(), "no bridge for network {id}");

    env.docker_ok(["rm", "-f", "rm-a"]);
    env.docker_ok(["network", "rm", "n-rm"]);
    assert!(
        sl_links_for(&id).is_empty() && present_links(&links).is_empty(),
        "links remain after docker network rm: {:?} {:?}",
        sl_links_for(&id),
        present_links(&links)
    );
    assert!(
        host_addresses_with("10.31.8.1").is_empty(),
        "the gateway address 10.31.8.1 is still on the host"
    );

    // The same subnet can be created again, and works.
    let id2 = env.create_network("n-rm", &["--subnet", "10.31.8.0/24"]);
    env.run_container("n-rm", "rm-b", &[]);
    env.assert_ping("rm-b", "10.31.8.1");
    env.docker_ok(["rm", "-f", "rm-b"]);
    env.docker_ok(["network", "rm", "n-rm"]);
    assert!(
        sl_links_for(&id2).is_empty(),
        "links remain: {:?}",
        sl_links_for(&id2)
    );
}

/// Host links holding address `addr` (any prefix length), from one `ip -j addr` dump.
fn host_addresses_with(addr: &str) -> Vec<String> {
    let all = ip_json(&["addr", "show"]);
    all.as_array()
        .into_iter()
        .flatten()
        .filter(|l| {
            l["addr_info"]
                .as_array()
                .is_some_and(|a| a.iter().any(|i| i["local"] == addr))
        })
        .filter_map(|l| l["ifname"].as_str().map(str::to_owned))
        .collect()
}

#[test]
fn internal_network_has_no_default_route_and_no_way_out() {
    if docker::skip_unless_root() {
        return;
    }
    let env = env();
    assert_subnet_free("10.31.9.0/24");
    assert_subnet_free("10.31.11.0/24");
    env.create_network("n-internal", &["--internal", "--subnet", "10.31.9.0/24"]);
    // A container on another (normal) sluice network: "outside" for the internal one.
    env.create_network("n-outside", &["--subnet", "10.31.11.0/24"]);
    env.run_container("n-outside", "outside-a", &[]);
    let outside = env.container_ip("outside-a", "n-outside");

    env.run_container("n-internal", "internal-a", &[]);
    env.run_container("n-internal", "internal-b", &[]);
    let routes = env.exec_ok("internal-a", &["ip", "route"]);
    assert!(
        !routes.lines().any(|l| l.starts_with("default")),
        "a container on an --internal network must have no default route: {routes}"
    );
    // Inside the network all is well.
    env.assert_ping("internal-a", "internal-b");
    // Outside it is unreachable.
    let out = env.exec("internal-a", &["ping", "-c1", "-W2", &outside]);
    assert!(
        !out.status.success(),
        "internal-a reached {outside} outside its --internal network"
    );
}

#[test]
fn mtu_option_sets_container_and_bridge_mtu() {
    if docker::skip_unless_root() {
        return;
    }
    let env = env();
    assert_subnet_free("10.31.10.0/24");
    let id = env.create_network(
        "n-mtu",
        &[
            "--subnet",
            "10.31.10.0/24",
            "-o",
            "com.docker.network.driver.mtu=1400",
        ],
    );
    env.run_container("n-mtu", "mtu-a", &[]);
    let mtu = env.exec_ok("mtu-a", &["cat", "/sys/class/net/eth0/mtu"]);
    assert_eq!(mtu, "1400", "container eth0 MTU");
    let bridge = bridge_of(&id);
    let link = host_link(&bridge).unwrap_or_else(|| panic!("no bridge {bridge} on the host"));
    assert_eq!(link["mtu"], 1400, "bridge {bridge} MTU: {link}");
}
