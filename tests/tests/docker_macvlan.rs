//! Docker end-to-end tests of macvlan mode (`-o mode=macvlan -o parent=…`): the parent is the
//! host end of a veth pair whose other end sits in a "LAN" network namespace holding a LAN
//! host; containers get addresses on that LAN, reach the LAN host and each other, and sluice's
//! policy applies to them through the programs on their own interface. A VLAN parent
//! (`<veth>.10`) is created by sluice and removed with its network; one that existed is kept.
//!
//! Each test has its own LAN namespace, parent and subnet (`10.78.<n>.0/24`), so they run in
//! parallel on the shared environment.

#![allow(
    clippy::unwrap_used,
    reason = "test helpers outside #[test] fns panic on failure, like the tests"
)]

use std::process::{Command, Output};
use std::time::Duration;

use serde_json::Value;
use sluice_driver::names;
use sluice_tests::docker::{self, Env, host_links, sl_links_for, wait_until};

fn env() -> &'static Env {
    docker::shared()
}

fn ip(args: &[&str]) -> Output {
    Command::new("ip").args(args).output().unwrap()
}

fn ip_ok(args: &[&str]) {
    let out = ip(args);
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The LAN: a namespace with the far end of the parent veth, holding `10.78.<n>.1/24` (the
/// LAN host, also the containers' gateway). Removed on drop.
struct Lan {
    ns: String,
    /// The parent interface (host end of the veth, up, no address).
    parent: String,
    /// The LAN host's end, inside `ns`.
    lan_if: String,
    /// `10.78.<n>.1`.
    host_ip: String,
    /// `10.78.<n>.0/24`.
    subnet: String,
}

impl Lan {
    fn new(n: u8) -> Self {
        let pid = std::process::id() % 100_000;
        let lan = Self {
            ns: format!("slmvlan-{pid}-{n}"),
            parent: format!("mvp{n}x{pid}"),
            lan_if: format!("mvl{n}x{pid}"),
            host_ip: format!("10.78.{n}.1"),
            subnet: format!("10.78.{n}.0/24"),
        };
        // Leftovers of an earlier run with the same pid.
        let _ = ip(&["netns", "del", &lan.ns]);
        let _ = ip(&["link", "del", &lan.parent]);
        ip_ok(&["netns", "add", &lan.ns]);
        ip_ok(&[
            "link",
            "add",
            &lan.parent,
            "type",
            "veth",
            "peer",
            "name",
            &lan.lan_if,
        ]);
        ip_ok(&["link", "set", &lan.lan_if, "netns", &lan.ns]);
        ip_ok(&["link", "set", &lan.parent, "up"]);
        lan.in_ns(&[
            "addr",
            "add",
            &format!("{}/24", lan.host_ip),
            "dev",
            &lan.lan_if,
        ]);
        lan.in_ns(&["link", "set", &lan.lan_if, "up"]);
        lan.in_ns(&["link", "set", "lo", "up"]);
        lan
    }

    fn in_ns(&self, args: &[&str]) {
        let mut full = vec!["-n", self.ns.as_str()];
        full.extend_from_slice(args);
        ip_ok(&full);
    }

    /// A VLAN on the LAN side too, with `10.78.<m>.1/24` on it.
    fn add_lan_vlan(&self, id: u16, address: &str) {
        let name = format!("{}.{id}", self.lan_if);
        self.in_ns(&[
            "link",
            "add",
            "link",
            &self.lan_if,
            "name",
            &name,
            "type",
            "vlan",
            "id",
            &id.to_string(),
        ]);
        self.in_ns(&["addr", "add", address, "dev", &name]);
        self.in_ns(&["link", "set", &name, "up"]);
    }

    /// True when the LAN host gets an answer to `ping -c1 -W2 TARGET`.
    fn pings(&self, target: &str) -> bool {
        ip(&["netns", "exec", &self.ns, "ping", "-c1", "-W2", target])
            .status
            .success()
    }
}

impl Drop for Lan {
    fn drop(&mut self) {
        let _ = ip(&["netns", "del", &self.ns]);
        let _ = ip(&["link", "del", &self.parent]);
    }
}

fn macvlan_network(env: &Env, name: &str, parent: &str, subnet: &str, gw: &str) {
    env.create_network(
        name,
        &[
            "--subnet",
            subnet,
            "--gateway",
            gw,
            "-o",
            "mode=macvlan",
            "-o",
            &format!("parent={parent}"),
        ],
    );
}

/// `ip -j -d link show dev eth0` inside `container`'s network namespace, via its PID.
fn container_link(env: &Env, container: &str) -> Value {
    let pid = env.docker_ok(["inspect", "-f", "{{.State.Pid}}", container]);
    let out = Command::new("nsenter")
        .args([
            "-t", &pid, "-n", "ip", "-j", "-d", "link", "show", "dev", "eth0",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    v[0].clone()
}

/// `sluice flows --json`: the recent drop records.
fn flows(env: &Env) -> Vec<Value> {
    env.sluice_cli_ok(&["flows", "--json"])
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad flow line ({e}): {l}")))
        .collect()
}

const GUARD: &str = "\
name: mv-guard
selector: {labels: {sluice.role: mvguard}}
ingress:
  - action: deny
    from: [{cidr: LANHOST}]
  - action: allow
    from: [{cidr: 0.0.0.0/0}]
";

#[test]
fn containers_are_on_the_lan_reach_its_host_and_each_other_and_policy_applies() {
    if docker::skip_unless_root() {
        return;
    }
    let env = env();
    let lan = Lan::new(1);
    macvlan_network(env, "mvnet", &lan.parent, &lan.subnet, &lan.host_ip);
    let net_id = env.network_id("mvnet");
    // No bridge: the containers are on the LAN itself.
    assert!(
        sl_links_for(&net_id).is_empty(),
        "{:?}",
        sl_links_for(&net_id)
    );

    env.run_container("mvnet", "mv-a", &[]);
    env.run_container("mvnet", "mv-b", &["--label", "sluice.role=mvguard"]);
    let a = env.container_ip("mv-a", "mvnet");
    let b = env.container_ip("mv-b", "mvnet");
    for addr in [&a, &b] {
        assert!(addr.starts_with("10.78.1."), "{addr} is not on the LAN");
    }
    // The container's interface is a macvlan on the parent, with the programs on it.
    let link = container_link(env, "mv-a");
    assert_eq!(link["linkinfo"]["info_kind"], "macvlan", "{link}");
    assert_eq!(link["linkinfo"]["info_data"]["mode"], "bridge", "{link}");
    let ep = env.endpoint_id("mv-a", "mvnet");
    assert!(
        !host_links().contains(&names::macvlan(&ep)),
        "the link should be in the container"
    );

    // The LAN host and each other, both ways.
    env.assert_ping("mv-a", &lan.host_ip);
    env.assert_ping("mv-a", &b);
    env.assert_ping("mv-b", &a);
    assert!(
        wait_until(Duration::from_secs(10), || lan.pings(&a)),
        "the LAN host cannot reach mv-a"
    );
    assert!(lan.pings(&b), "the LAN host cannot reach mv-b");

    // A policy: mv-b refuses what the LAN host sends it, accepts the rest.
    let file = env.dir().join("mv-guard.yaml");
    std::fs::write(&file, GUARD.replace("LANHOST", &lan.host_ip)).unwrap();
    env.sluice_cli_ok(&["policy", "apply", "-f", file.to_str().unwrap()]);
    assert!(
        wait_until(Duration::from_secs(10), || !lan.pings(&b)),
        "the LAN host still reaches mv-b under the policy"
    );
    env.assert_ping("mv-a", &b);
    assert!(lan.pings(&a), "the policy must not touch mv-a");
    // mv-b's own pings to the LAN host go out, and their replies come back (conntrack).
    env.assert_ping("mv-b", &lan.host_ip);
    let records = flows(env);
    assert!(
        records
            .iter()
            .any(|r| r["src"].as_str() == Some(lan.host_ip.as_str())
                && r["dst"].as_str() == Some(b.as_str())),
        "no drop {} -> {b} in sluice flows: {records:?}",
        lan.host_ip
    );
    env.sluice_cli_ok(&["policy", "rm", "mv-guard"]);
    assert!(
        wait_until(Duration::from_secs(10), || lan.pings(&b)),
        "removing the policy did not restore access"
    );

    for c in ["mv-a", "mv-b"] {
        env.docker_ok(["rm", "-f", c]);
    }
    env.docker_ok(["network", "rm", "mvnet"]);
    // The parent is the user's: it stays.
    assert!(host_links().contains(&lan.parent));
    assert!(
        !host_links().contains(&names::macvlan(&ep)),
        "macvlan link left behind"
    );
}

/// Whether this kernel can make 802.1Q interfaces (`CONFIG_VLAN_8021Q`); probed in the LAN
/// namespace, so nothing is left on the host.
fn kernel_has_vlan(lan: &Lan) -> bool {
    let probe = ip(&[
        "-n",
        &lan.ns,
        "link",
        "add",
        "link",
        &lan.lan_if,
        "name",
        "mvprobe",
        "type",
        "vlan",
        "id",
        "99",
    ]);
    let _ = ip(&["-n", &lan.ns, "link", "del", "mvprobe"]);
    probe.status.success()
}

#[test]
fn vlan_parent_is_created_by_sluice_and_removed_with_its_last_network_but_a_users_is_kept() {
    if docker::skip_unless_root() {
        return;
    }
    let env = env();
    let lan = Lan::new(2);
    let vlan = format!("{}.10", lan.parent);
    assert!(!host_links().contains(&vlan));
    if kernel_has_vlan(&lan) {
        lan.add_lan_vlan(10, "10.78.3.1/24");
        macvlan_network(env, "mvvlan", &vlan, "10.78.3.0/24", "10.78.3.1");
        let link = docker::ip_json(&["-d", "link", "show", "dev", &vlan]);
        assert_eq!(link[0]["linkinfo"]["info_kind"], "vlan", "{link}");
        assert_eq!(link[0]["linkinfo"]["info_data"]["id"], 10, "{link}");
        let alias = link[0]["ifalias"].as_str().unwrap_or_default();
        assert!(
            alias.starts_with("sluice:") && alias.ends_with("/vlan"),
            "{link}"
        );
        env.run_container("mvvlan", "mv-v", &[]);
        let v = env.container_ip("mv-v", "mvvlan");
        assert!(v.starts_with("10.78.3."), "{v}");
        // Tagged traffic reaches the LAN host on VLAN 10.
        env.assert_ping("mv-v", "10.78.3.1");
        assert!(lan.pings(&v), "the LAN host cannot reach mv-v over VLAN 10");
        // A second network on the same VLAN keeps it alive when the first goes.
        macvlan_network(env, "mvvlan2", &vlan, "10.78.4.0/24", "10.78.4.1");
        env.docker_ok(["rm", "-f", "mv-v"]);
        env.docker_ok(["network", "rm", "mvvlan"]);
        assert!(host_links().contains(&vlan), "removed while still in use");
        env.docker_ok(["network", "rm", "mvvlan2"]);
        assert!(
            !host_links().contains(&vlan),
            "the VLAN sluice created is still there"
        );
    } else {
        // This kernel cannot make one (CONFIG_VLAN_8021Q unset): a clear error, nothing left.
        // The create / share / remove logic is covered against the fake kernel
        // (driver/src/macvlan.rs, driver_tests).
        eprintln!("docker_macvlan: kernel without 802.1Q; checking the refusal only");
        let err = env.docker_fails([
            "network",
            "create",
            "-d",
            env.driver(),
            "--ipam-driver",
            env.driver(),
            "--subnet",
            "10.78.3.0/24",
            "-o",
            "mode=macvlan",
            "-o",
            &format!("parent={vlan}"),
            "mvvlan",
        ]);
        assert!(err.contains("no 802.1Q support"), "{err}");
        assert!(!host_links().contains(&vlan));
    }
    assert!(host_links().contains(&lan.parent));

    // A parent named IFACE.VLAN that the user made is used as it is and never removed (a
    // veth here, so that this part runs on any kernel).
    let own = format!("mvq2x{}.20", std::process::id() % 100_000);
    let own_peer = format!("mvr2x{}", std::process::id() % 100_000);
    let _ = ip(&["link", "del", &own]);
    ip_ok(&[
        "link", "add", &own, "type", "veth", "peer", "name", &own_peer,
    ]);
    ip_ok(&["link", "set", &own_peer, "netns", &lan.ns]);
    ip_ok(&["link", "set", &own, "up"]);
    lan.in_ns(&["addr", "add", "10.78.5.1/24", "dev", &own_peer]);
    lan.in_ns(&["link", "set", &own_peer, "up"]);
    macvlan_network(env, "mvvlan3", &own, "10.78.5.0/24", "10.78.5.1");
    env.run_container("mvvlan3", "mv-own", &[]);
    env.assert_ping("mv-own", "10.78.5.1");
    env.docker_ok(["rm", "-f", "mv-own"]);
    env.docker_ok(["network", "rm", "mvvlan3"]);
    assert!(
        host_links().contains(&own),
        "sluice removed the user's parent"
    );
    ip_ok(&["link", "del", &own]);
}

#[test]
fn macvlan_without_a_usable_parent_is_refused_clearly() {
    if docker::skip_unless_root() {
        return;
    }
    let env = env();
    let driver = env.driver().to_owned();
    let base = [
        "network",
        "create",
        "-d",
        &driver,
        "--ipam-driver",
        &driver,
        "--subnet",
        "10.78.6.0/24",
        "-o",
        "mode=macvlan",
    ];
    let mut args = base.to_vec();
    args.push("mvbad");
    let err = env.docker_fails(args);
    assert!(err.contains("needs -o parent"), "{err}");
    let mut args = base.to_vec();
    args.extend(["-o", "parent=nosuch0", "mvbad"]);
    let err = env.docker_fails(args);
    assert!(
        err.contains("parent interface nosuch0 does not exist"),
        "{err}"
    );
    let mut args = base.to_vec();
    args.extend(["-o", "parent=nosuch0.7", "mvbad"]);
    let err = env.docker_fails(args);
    assert!(
        err.contains("parent interface nosuch0 does not exist"),
        "{err}"
    );
    assert!(!host_links().iter().any(|l| l == "nosuch0.7"));
    let mut args = base.to_vec();
    args.extend(["-o", "parent=lo", "-o", "macvlan_mode=sideways", "mvbad"]);
    let err = env.docker_fails(args);
    assert!(err.contains("macvlan_mode must be one of"), "{err}");
    // Nothing was left behind: the name is free.
    assert!(
        !env.docker_ok(["network", "ls", "--format", "{{.Name}}"])
            .lines()
            .any(|l| l == "mvbad")
    );
}

/// sluice killed and started again: the macvlan links inside the containers are not in the
/// host namespace, so reconciliation must neither "repair" nor remove them; the policy keeps
/// being enforced while the daemon is down (pinned programs) and is updated by ifindex after
/// the restart; `sluice endpoints` reads their counters.
#[test]
fn restart_keeps_macvlan_endpoints_and_their_policy() {
    if docker::skip_unless_root() {
        return;
    }
    // Its own environment: the daemon gets killed.
    let env = &Env::start();
    let lan = Lan::new(7);
    macvlan_network(env, "mvrs", &lan.parent, &lan.subnet, &lan.host_ip);
    env.run_container("mvrs", "mvrs-a", &["--label", "sluice.role=mvguard"]);
    let a = env.container_ip("mvrs-a", "mvrs");
    let ep = env.endpoint_id("mvrs-a", "mvrs");
    assert!(
        wait_until(Duration::from_secs(10), || lan.pings(&a)),
        "the LAN host cannot reach mvrs-a"
    );
    let file = env.dir().join("mv-guard.yaml");
    std::fs::write(&file, GUARD.replace("LANHOST", &lan.host_ip)).unwrap();
    env.sluice_cli_ok(&["policy", "apply", "-f", file.to_str().unwrap()]);
    assert!(
        wait_until(Duration::from_secs(10), || !lan.pings(&a)),
        "policy not enforced"
    );

    env.kill_sluice(nix::sys::signal::Signal::SIGKILL);
    assert!(!lan.pings(&a), "policy lost while sluice was down");
    env.assert_ping("mvrs-a", &lan.host_ip);
    env.start_sluice();
    assert!(!lan.pings(&a), "policy lost after the restart");
    env.assert_ping("mvrs-a", &lan.host_ip);
    let status: Value = serde_json::from_str(&env.sluice_cli_ok(&["endpoints", "--json"])).unwrap();
    let list = status
        .get("endpoints")
        .and_then(Value::as_array)
        .or_else(|| status.as_array())
        .cloned()
        .unwrap_or_default();
    let mine = list
        .iter()
        .find(|e| e["id"].as_str() == Some(ep.as_str()))
        .unwrap_or_else(|| panic!("{ep} not in sluice endpoints: {status}"));
    assert!(mine["counters_error"].is_null(), "{mine}");
    assert!(
        mine["ingress"]["dropped"]["packets"].as_u64().unwrap_or(0) > 0,
        "{mine}"
    );

    // Removing the policy after the restart reaches the link inside the container.
    env.sluice_cli_ok(&["policy", "rm", "mv-guard"]);
    assert!(
        wait_until(Duration::from_secs(10), || lan.pings(&a)),
        "removing the policy after the restart did not restore access\n{}",
        env.sluice_log()
    );
    env.docker_ok(["rm", "-f", "mvrs-a"]);
    env.docker_ok(["network", "rm", "mvrs"]);
    assert!(!host_links().contains(&names::macvlan(&ep)));
}
