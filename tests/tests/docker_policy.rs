//! Docker end-to-end tests of the eBPF datapath: network isolation and live policies applied
//! with `sluice policy`, against the harness's private dockerd and sluice daemon (which
//! resolves container labels from that dockerd through `--docker-host`).
//!
//! Both tests use automatic subnets from the environment's pool and network names of their
//! own, so they run in parallel on the shared environment.

#![allow(
    clippy::unwrap_used,
    reason = "test helpers outside #[test] fns panic on failure, like the tests"
)]

use std::collections::BTreeMap;
use std::process::Command;
use std::time::Duration;

use serde_json::Value;
use sluice_driver::names;
use sluice_tests::docker::{self, Env, wait_until};

fn env() -> &'static Env {
    docker::shared()
}

/// `sluice endpoints --json`, as endpoint ID → status object.
fn endpoints(env: &Env) -> BTreeMap<String, Value> {
    let out = env.sluice_cli_ok(&["endpoints", "--json"]);
    let v: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("bad JSON ({e}): {out}"));
    let list = v
        .get("endpoints")
        .and_then(Value::as_array)
        .or_else(|| v.as_array())
        .unwrap_or_else(|| panic!("no endpoint list in: {out}"))
        .clone();
    list.into_iter()
        .map(|e| (e["id"].as_str().unwrap_or_default().to_owned(), e))
        .collect()
}

/// Packets dropped both ways on the endpoint `id`.
fn dropped(all: &BTreeMap<String, Value>, id: &str) -> u64 {
    let ep = all
        .get(id)
        .unwrap_or_else(|| panic!("endpoint {id} not in `sluice endpoints`: {all:?}"));
    ["ingress", "egress"]
        .iter()
        .map(|d| {
            ep[d]["dropped"]["packets"]
                .as_u64()
                .unwrap_or_else(|| panic!("{ep}"))
        })
        .sum()
}

/// `sluice flows --json`: the recent drop records.
fn flows(env: &Env) -> Vec<Value> {
    env.sluice_cli_ok(&["flows", "--json"])
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad flow line ({e}): {l}")))
        .collect()
}

/// Temporary `DOCKER-USER` rules letting the host forward between two bridges (dockerd's
/// `FORWARD` policy is `DROP` and sluice only accepts traffic within a bridge), so that only
/// the datapath can keep the networks apart. Removed on drop.
struct ForwardBetween(Vec<Vec<String>>);

impl ForwardBetween {
    fn allow(pairs: &[(&str, &str)]) -> Self {
        let mut rules = Vec::new();
        for (a, b) in pairs {
            for (i, o) in [(a, b), (b, a)] {
                let rule: Vec<String> = ["DOCKER-USER", "-i", i, "-o", o, "-j", "ACCEPT"]
                    .iter()
                    .map(|s| (*s).to_owned())
                    .collect();
                let status = Command::new("iptables")
                    .args(["-w", "-I"])
                    .args(&rule)
                    .status()
                    .unwrap_or_else(|e| panic!("cannot run iptables: {e}"));
                assert!(status.success(), "iptables -I {rule:?}");
                rules.push(rule);
            }
        }
        Self(rules)
    }
}

impl Drop for ForwardBetween {
    fn drop(&mut self) {
        for rule in &self.0 {
            let _ = Command::new("iptables")
                .args(["-w", "-D"])
                .args(rule)
                .status();
        }
    }
}

fn sysctl(path: &str) -> String {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .trim()
        .to_owned()
}

#[test]
fn sluice_networks_are_isolated_even_when_the_host_routes_between_them() {
    if docker::skip_unless_root() {
        return;
    }
    let env = env();
    assert_eq!(
        sysctl("/proc/sys/net/ipv4/ip_forward"),
        "1",
        "dockerd turns forwarding on"
    );
    for n in ["isoa", "isob"] {
        env.create_network(n, &[]);
    }
    for n in ["opena", "openb"] {
        env.create_network(n, &["-o", "sluice.isolate=false"]);
    }
    let bridge = |n: &str| names::bridge(&env.network_id(n));
    let _forward = ForwardBetween::allow(&[
        (&bridge("isoa"), &bridge("isob")),
        (&bridge("opena"), &bridge("openb")),
    ]);
    for (c, n) in [
        ("iso-a", "isoa"),
        ("iso-b", "isob"),
        ("open-a", "opena"),
        ("open-b", "openb"),
    ] {
        env.run_container(n, c, &[]);
    }
    let ip = |c: &str, n: &str| env.container_ip(c, n);

    // Control: the same routed path carries traffic between networks without isolation.
    env.assert_ping("open-a", &ip("open-b", "openb"));
    env.assert_ping("open-b", &ip("open-a", "opena"));

    // Isolated networks: every cross-network packet is dropped, and counted.
    let (ea, eb) = (
        env.endpoint_id("iso-a", "isoa"),
        env.endpoint_id("iso-b", "isob"),
    );
    let b_ip = ip("iso-b", "isob");
    let a_ip = ip("iso-a", "isoa");
    let before = endpoints(env);
    let out = env.exec("iso-a", &["ping", "-c3", "-W1", "-i0.3", &b_ip]);
    assert!(
        !out.status.success(),
        "iso-a reached iso-b across isolated networks:\n{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let after = endpoints(env);
    let delta =
        dropped(&after, &ea) + dropped(&after, &eb) - dropped(&before, &ea) - dropped(&before, &eb);
    assert!(
        delta == 3,
        "3 echo requests, {delta} drops:\n{before:?}\n{after:?}"
    );
    assert!(
        !env.can_ping("iso-b", &a_ip, Duration::from_secs(3)),
        "iso-b reached iso-a"
    );

    // The drops are reported as isolation in `sluice flows`.
    let records = flows(env);
    assert!(
        records.iter().any(|r| r["src"].as_str() == Some(&a_ip)
            && r["dst"].as_str() == Some(&b_ip)
            && r["reason"].to_string().to_lowercase().contains("isolation")),
        "no isolation drop {a_ip} -> {b_ip} in sluice flows: {records:?}"
    );
    for (c, n) in [
        ("iso-a", "isoa"),
        ("iso-b", "isob"),
        ("open-a", "opena"),
        ("open-b", "openb"),
    ] {
        env.docker_ok(["rm", "-f", c]);
        env.docker_ok(["network", "rm", n]);
    }
}

const WEB_TO_DB: &str = "\
name: web-to-db
selector: {network: polapp, labels: {sluice.role: db}}
ingress:
  - action: allow
    from: [{selector: {labels: {sluice.role: web}}}]
    ports: [{protocol: tcp, port: 5432}]
";

/// `echo MSG | nc -w 2 IP 5432` from `client`; true when it connected (the TCP handshake
/// passed the datapath). The payload is only used to prove that blocked clients sent nothing
/// through: the busybox listener may drop a payload of a completed connection (its stdin is
/// at EOF), so its presence is not asserted.
fn connects(env: &Env, client: &str, db_ip: &str, msg: &str) -> bool {
    env.exec(
        client,
        &["sh", "-c", &format!("echo {msg} | nc -w 2 {db_ip} 5432")],
    )
    .status
    .success()
}

#[test]
fn policy_allows_only_web_to_db_on_5432_and_removal_restores_access_live() {
    if docker::skip_unless_root() {
        return;
    }
    let env = env();
    env.create_network("polapp", &[]);
    let file = env.dir().join("web-to-db.yaml");
    std::fs::write(&file, WEB_TO_DB).unwrap();
    let applied = env.sluice_cli_ok(&["policy", "apply", "-f", file.to_str().unwrap()]);
    assert!(applied.contains("web-to-db"), "apply said: {applied}");
    assert!(env.sluice_cli_ok(&["policy", "ls"]).contains("web-to-db"));

    env.run_container_cmd(
        "polapp",
        "pol-db",
        &["--label", "sluice.role=db"],
        &["sh", "-c", "while true; do nc -l -p 5432 >> /tmp/got; done"],
    );
    env.run_container("polapp", "pol-web", &["--label", "sluice.role=web"]);
    env.run_container("polapp", "pol-other", &["--label", "sluice.role=other"]);
    let db_ip = env.container_ip("pol-db", "polapp");
    let other_ip = env.container_ip("pol-other", "polapp");

    // web is allowed (retried: the identities resolve and the listener starts).
    assert!(
        wait_until(Duration::from_secs(20), || connects(
            env, "pol-web", &db_ip, "from-web"
        )),
        "pol-web cannot reach pol-db:5432 under the policy\n{}",
        env.sluice_log()
    );
    // other is not: TCP to 5432 and ping both blocked.
    let db_ep = env.endpoint_id("pol-db", "polapp");
    let before = endpoints(env);
    assert!(
        !connects(env, "pol-other", &db_ip, "from-other"),
        "pol-other reached pol-db:5432"
    );
    assert!(
        !env.can_ping("pol-other", &db_ip, Duration::from_secs(2)),
        "pol-other pinged pol-db"
    );
    assert!(
        !env.can_ping("pol-web", &db_ip, Duration::from_secs(2)),
        "web may only use tcp/5432"
    );
    let after = endpoints(env);
    assert!(
        dropped(&after, &db_ep) > dropped(&before, &db_ep),
        "no drops counted on pol-db: {before:?} -> {after:?}"
    );
    let got = env.exec_ok("pol-db", &["cat", "/tmp/got"]);
    assert!(!got.contains("from-other"), "db received: {got}");
    let records = flows(env);
    assert!(
        records
            .iter()
            .any(|r| r["src"].as_str() == Some(other_ip.as_str())
                && r["dst"].as_str() == Some(db_ip.as_str())
                && r["dst_port"].as_u64() == Some(5432)),
        "no drop {other_ip} -> {db_ip}:5432 in sluice flows: {records:?}"
    );

    // Removing the policy opens db to everyone, without restarting anything.
    env.sluice_cli_ok(&["policy", "rm", "web-to-db"]);
    assert!(!env.sluice_cli_ok(&["policy", "ls"]).contains("web-to-db"));
    assert!(
        wait_until(Duration::from_secs(5), || connects(
            env,
            "pol-other",
            &db_ip,
            "from-other"
        )),
        "pol-other still blocked after the policy was removed"
    );
    env.assert_ping("pol-other", &db_ip);

    for c in ["pol-db", "pol-web", "pol-other"] {
        env.docker_ok(["rm", "-f", c]);
    }
    env.docker_ok(["network", "rm", "polapp"]);
}

/// Applies `policy` (web -> db tcp/5432), kills sluice (SIGKILL), checks enforcement while it
/// is down and after it is back, then removes the policy.
fn restart_keeps_policy(policy: &str) {
    // Its own environment: the daemon gets killed.
    let env = &Env::start();
    env.create_network("polapp", &[]);
    let file = env.dir().join("web-to-db.yaml");
    std::fs::write(&file, policy).unwrap();
    env.sluice_cli_ok(&["policy", "apply", "-f", file.to_str().unwrap()]);
    env.run_container_cmd(
        "polapp",
        "rs-db",
        &["--label", "sluice.role=db"],
        &["sh", "-c", "while true; do nc -l -p 5432 >> /tmp/got; done"],
    );
    env.run_container("polapp", "rs-web", &["--label", "sluice.role=web"]);
    env.run_container("polapp", "rs-other", &["--label", "sluice.role=other"]);
    let db_ip = env.container_ip("rs-db", "polapp");
    assert!(
        wait_until(Duration::from_secs(20), || connects(
            env, "rs-web", &db_ip, "web-1"
        )),
        "rs-web cannot reach rs-db:5432 under the policy"
    );
    assert!(
        !connects(env, "rs-other", &db_ip, "other-1"),
        "rs-other reached rs-db"
    );

    env.kill_sluice(nix::sys::signal::Signal::SIGKILL);
    assert!(!env.sluice_running());
    // No daemon: the pinned programs, links and maps go on enforcing.
    assert!(
        connects(env, "rs-web", &db_ip, "web-2"),
        "web blocked while sluice was down"
    );
    assert!(
        !connects(env, "rs-other", &db_ip, "other-2"),
        "policy lost while sluice was down"
    );

    env.start_sluice();
    assert!(env.sluice_cli_ok(&["policy", "ls"]).contains("web-to-db"));
    assert!(
        connects(env, "rs-web", &db_ip, "web-3"),
        "web blocked after the restart"
    );
    assert!(
        !connects(env, "rs-other", &db_ip, "other-3"),
        "policy lost after the restart"
    );
    env.sluice_cli_ok(&["policy", "rm", "web-to-db"]);
    assert!(
        wait_until(Duration::from_secs(5), || connects(
            env, "rs-other", &db_ip, "other-4"
        )),
        "removal after the restart did not restore access"
    );
    // What db received: never a message of rs-other while the policy stood.
    let got = env.exec_ok("rs-db", &["cat", "/tmp/got"]);
    for msg in ["other-1", "other-2", "other-3"] {
        assert!(!got.contains(msg), "{msg} reached db: {got}");
    }
}

#[test]
fn label_policy_keeps_being_enforced_while_the_daemon_is_down_and_after_its_restart() {
    if docker::skip_unless_root() {
        return;
    }
    restart_keeps_policy(&WEB_TO_DB.replace("network: polapp, ", ""));
}

/// The same with the policy's `network: polapp` condition (a network *name*, which sluice
/// learns from the Docker Engine API and keeps in its store, so the selector still matches
/// right after a restart; it failed open before names were persisted).
#[test]
fn network_policy_keeps_being_enforced_while_the_daemon_is_down_and_after_its_restart() {
    if docker::skip_unless_root() {
        return;
    }
    restart_keeps_policy(WEB_TO_DB);
}
