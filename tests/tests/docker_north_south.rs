//! Docker end-to-end: north-south traffic. An "outside host" (a network namespace joined to
//! the host by a veth, `10.77.4x.0/30`, see [`Outside`]) runs TCP and UDP services that answer
//! with the source address they saw. The private dockerd manages iptables as in production
//! (its `FORWARD` policy is `DROP`).
//!
//! Subnets `10.38.0.0/16` and outside links `10.77.41-49.0/30` are this file's; host ports
//! 8080, 18081-18083 and 18089 too. Tests on the shared environment use networks of their own and
//! run in parallel; the restart test has its own environment.

#![allow(
    clippy::unwrap_used,
    reason = "test helpers outside #[test] fns panic on failure, like the tests"
)]

use std::net::TcpListener;
use std::process::Command;
use std::time::Duration;

use nix::sys::signal::Signal;
use serde_json::Value;
use sluice_driver::names;
use sluice_tests::docker::{self, Env, assert_subnet_free, wait_until};
use sluice_tests::outside::{Outside, http_get};

fn env() -> &'static Env {
    docker::shared()
}

/// sluice's nftables table of this environment's daemon.
fn table(env: &Env) -> String {
    sluice_driver::nat::table_name(env.driver())
}

/// Every rule in the host's ruleset (`nft -j list ruleset`) whose JSON contains `needle`.
fn nft_rules_with(needle: &str) -> Vec<Value> {
    let out = Command::new("nft")
        .args(["-j", "list", "ruleset"])
        .output()
        .unwrap();
    assert!(out.status.success(), "nft -j list ruleset failed");
    let json: Value = serde_json::from_slice(&out.stdout).unwrap();
    json["nftables"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|o| o.get("rule"))
        .filter(|r| r.to_string().contains(needle))
        .cloned()
        .collect()
}

/// True when the host's ruleset has a table `inet NAME`.
fn nft_table_exists(name: &str) -> bool {
    Command::new("nft")
        .args(["-j", "list", "table", "inet", name])
        .output()
        .unwrap()
        .status
        .success()
}

/// `iptables -S` (all chains of `filter`) lines that mention `word`.
fn iptables_lines_with(tool: &str, word: &str) -> Vec<String> {
    let out = Command::new(tool).args(["-w", "-S"]).output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains(word))
        .map(str::to_owned)
        .collect()
}

/// The private dockerd manages iptables: `FORWARD` drops by default and jumps to
/// `DOCKER-USER` first. sluice's rules for `bridge` are all in `DOCKER-USER`, so nothing of
/// Docker's own chains was changed.
fn assert_docker_firewall_and_our_rules_only_in_docker_user(env: &Env, bridge: &str) {
    let forward = Command::new("iptables")
        .args(["-w", "-S", "FORWARD"])
        .output()
        .unwrap();
    let forward = String::from_utf8_lossy(&forward.stdout);
    assert!(
        forward.contains("-P FORWARD DROP"),
        "dockerd should have set FORWARD to DROP: {forward}"
    );
    assert!(
        forward.contains("-A FORWARD -j DOCKER-USER"),
        "dockerd jumps to DOCKER-USER: {forward}"
    );
    let ours = iptables_lines_with("iptables", bridge);
    assert!(
        ours.iter().any(|l| l.contains("! -o")),
        "outbound rule missing for {bridge}: {ours:?}\n{}",
        env.logs_tail()
    );
    assert!(
        ours.iter().all(|l| l.starts_with("-A DOCKER-USER ")),
        "sluice rules outside DOCKER-USER: {ours:?}"
    );
}

/// After `docker network rm`: no nft rule and no iptables rule mentions the bridge or the
/// subnet.
fn assert_no_rules_left(env: &Env, bridge: &str, subnet_prefix: &str) {
    let ok = wait_until(Duration::from_secs(10), || {
        nft_rules_with(bridge).is_empty()
            && nft_rules_with(subnet_prefix).is_empty()
            && iptables_lines_with("iptables", bridge).is_empty()
            && iptables_lines_with("ip6tables", bridge).is_empty()
    });
    assert!(
        ok,
        "rules left after docker network rm: nft {:?} {:?}, iptables {:?}\n{}",
        nft_rules_with(bridge),
        nft_rules_with(subnet_prefix),
        iptables_lines_with("iptables", bridge),
        env.logs_tail()
    );
}

/// What the outside TCP service on `ip:port` says the container's source address is.
fn tcp_source(env: &Env, container: &str, ip: &str, port: u16) -> Option<String> {
    let out = env.exec(container, &["nc", "-w", "3", ip, &port.to_string()]);
    let text = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    (out.status.success() && !text.is_empty()).then_some(text)
}

/// Same over UDP (the outside service speaks just enough TFTP, see [`Outside::serve_udp`]).
fn udp_source(env: &Env, container: &str, ip: &str, port: u16) -> Option<String> {
    let out = env.exec(
        container,
        &[
            "tftp",
            "-g",
            "-r",
            "ip",
            "-l",
            "/dev/stdout",
            ip,
            &port.to_string(),
        ],
    );
    let text = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    (!text.is_empty()).then_some(text)
}

fn wait_tcp_source(env: &Env, container: &str, ip: &str, port: u16) -> String {
    let mut last = None;
    wait_until(Duration::from_secs(20), || {
        last = tcp_source(env, container, ip, port);
        last.is_some()
    });
    last.unwrap_or_else(|| {
        panic!(
            "{container} cannot reach the outside TCP service {ip}:{port}\n{}",
            env.logs_tail()
        )
    })
}

fn wait_udp_source(env: &Env, container: &str, ip: &str, port: u16) -> String {
    let mut last = None;
    wait_until(Duration::from_secs(20), || {
        last = udp_source(env, container, ip, port);
        last.is_some()
    });
    last.unwrap_or_else(|| {
        panic!(
            "{container} cannot reach the outside UDP service {ip}:{port}\n{}",
            env.logs_tail()
        )
    })
}

/// A busybox httpd on port 80 serving `hello-sluice` at `/` and, at `/cgi-bin/ip`, the
/// address the client connected from.
const WEB: &[&str] = &[
    "sh",
    "-c",
    "mkdir -p /www/cgi-bin && echo hello-sluice > /www/index.html && \
     printf '#!/bin/sh\\necho Content-Type: text/plain\\necho\\necho $REMOTE_ADDR\\n' > /www/cgi-bin/ip && \
     chmod +x /www/cgi-bin/ip && exec httpd -f -p 80 -h /www",
];

/// `GET http://addr/path` from the outside namespace (or the host with `None`).
fn wget(outside: Option<&Outside>, addr: &str, path: &str) -> Option<String> {
    match outside {
        Some(o) => o.http_get(addr, path),
        None => http_get(addr, path),
    }
}

fn wait_wget(env: &Env, outside: Option<&Outside>, addr: &str, path: &str) -> String {
    let mut last = None;
    wait_until(Duration::from_secs(20), || {
        last = wget(outside, addr, path);
        last.is_some()
    });
    last.unwrap_or_else(|| {
        panic!(
            "GET http://{addr}{path} from {} failed\n{}\n{}",
            outside.map_or("the host", |_| "the outside namespace"),
            diagnose(env),
            env.logs_tail()
        )
    })
}

/// sluice's table, `DOCKER-USER` and the containers' logs, for failure messages.
fn diagnose(env: &Env) -> String {
    let run = |program: &str, args: &[&str]| {
        let out = Command::new(program).args(args).output().unwrap();
        format!(
            "$ {program} {}\n{}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    };
    let mut text = run("nft", &["list", "table", "inet", &table(env)]);
    text += &run("iptables", &["-w", "-S", "DOCKER-USER"]);
    text += &run("iptables", &["-w", "-S", "FORWARD"]);
    let ps = env.docker(["ps", "-a", "--format", "{{.Names}} {{.Status}}"]);
    text += &String::from_utf8_lossy(&ps.stdout);
    for name in String::from_utf8_lossy(&ps.stdout)
        .lines()
        .filter_map(|l| l.split(' ').next())
    {
        let logs = env.docker(["logs", "--tail", "5", name]);
        text += &format!(
            "--- {name}:\n{}{}",
            String::from_utf8_lossy(&logs.stdout),
            String::from_utf8_lossy(&logs.stderr)
        );
    }
    text
}

#[test]
fn outbound_tcp_and_udp_are_masqueraded_to_the_host_address_unless_turned_off() {
    if docker::skip_unless_root() {
        return;
    }
    let env = env();
    assert_subnet_free("10.38.1.0/24");
    assert_subnet_free("10.38.2.0/24");
    let mut outside = Outside::new(41).unwrap();
    outside.serve_tcp(7000).unwrap();
    outside.serve_udp(7001).unwrap();

    let id = env.create_network("ns-out", &["--subnet", "10.38.1.0/24"]);
    let bridge = names::bridge(&id);
    env.run_container("ns-out", "ns-out-c", &[]);
    assert_eq!(
        wait_tcp_source(env, "ns-out-c", &outside.ip, 7000),
        outside.host_ip,
        "TCP: the outside must see the host's address"
    );
    assert_eq!(
        wait_udp_source(env, "ns-out-c", &outside.ip, 7001),
        outside.host_ip,
        "UDP: the outside must see the host's address"
    );
    assert_docker_firewall_and_our_rules_only_in_docker_user(env, &bridge);
    let masq: Vec<Value> = nft_rules_with("10.38.1.0")
        .into_iter()
        .filter(|r| r["table"] == table(env) && r.to_string().contains("masquerade"))
        .collect();
    assert!(!masq.is_empty(), "no masquerade rule in {}", table(env));

    // Masquerade off: the outside sees the container's own address (and routes back to it).
    let id2 = env.create_network(
        "ns-nomasq",
        &[
            "--subnet",
            "10.38.2.0/24",
            "-o",
            "com.docker.network.bridge.enable_ip_masquerade=false",
        ],
    );
    outside.route_to("10.38.2.0/24").unwrap();
    env.run_container("ns-nomasq", "ns-nomasq-c", &[]);
    let own = env.container_ip("ns-nomasq-c", "ns-nomasq");
    assert_eq!(wait_tcp_source(env, "ns-nomasq-c", &outside.ip, 7000), own);
    assert_eq!(wait_udp_source(env, "ns-nomasq-c", &outside.ip, 7001), own);
    assert!(
        !nft_rules_with("10.38.2.0")
            .iter()
            .any(|r| r.to_string().contains("slbr*")),
        "outbound masquerade rule for a network with masquerade off"
    );

    env.docker_ok(["rm", "-f", "ns-out-c", "ns-nomasq-c"]);
    env.docker_ok(["network", "rm", "ns-out", "ns-nomasq"]);
    assert_no_rules_left(env, &bridge, "10.38.1.");
    assert_no_rules_left(env, &names::bridge(&id2), "10.38.2.");
}

#[test]
fn ipv6_is_routed_and_masqueraded_only_when_asked() {
    if docker::skip_unless_root() {
        return;
    }
    let env = env();
    assert_subnet_free("10.38.7.0/24");
    assert_subnet_free("10.38.8.0/24");
    let mut outside = Outside::new(46).unwrap();
    outside.serve_tcp6(7000).unwrap();

    // Routed: the outside sees the container's own address (and routes back to it).
    let id = env.create_network(
        "ns-v6",
        &[
            "--ipv6",
            "--subnet",
            "10.38.7.0/24",
            "--subnet",
            "fd38:7::/64",
        ],
    );
    outside.route_to("fd38:7::/64").unwrap();
    env.run_container("ns-v6", "ns-v6-c", &[]);
    let own = env.container_ip6("ns-v6-c", "ns-v6");
    assert_eq!(wait_tcp_source(env, "ns-v6-c", &outside.ip6, 7000), own);

    // `-o sluice.ipv6-nat=true`: masqueraded to the host's address.
    let id2 = env.create_network(
        "ns-v6nat",
        &[
            "--ipv6",
            "--subnet",
            "10.38.8.0/24",
            "--subnet",
            "fd38:8::/64",
            "-o",
            "sluice.ipv6-nat=true",
        ],
    );
    env.run_container("ns-v6nat", "ns-v6nat-c", &[]);
    assert_eq!(
        wait_tcp_source(env, "ns-v6nat-c", &outside.ip6, 7000),
        outside.host_ip6
    );

    env.docker_ok(["rm", "-f", "ns-v6-c", "ns-v6nat-c"]);
    env.docker_ok(["network", "rm", "ns-v6", "ns-v6nat"]);
    assert_no_rules_left(env, &names::bridge(&id), "fd38:7::");
    assert_no_rules_left(env, &names::bridge(&id2), "fd38:8::");
}

#[test]
fn published_port_answers_outside_and_host_sees_the_client_and_closes_on_stop() {
    if docker::skip_unless_root() {
        return;
    }
    let env = env();
    assert_subnet_free("10.38.3.0/24");
    let outside = Outside::new(42).unwrap();
    let id = env.create_network("ns-pub", &["--subnet", "10.38.3.0/24"]);
    let bridge = names::bridge(&id);
    env.run_container_cmd("ns-pub", "ns-web", &["-p", "8080:80"], WEB);
    let web_ip = env.container_ip("ns-web", "ns-pub");

    // From another host (the outside namespace), to the host's address.
    let url = format!("{}:8080", outside.host_ip);
    assert_eq!(wait_wget(env, Some(&outside), &url, "/"), "hello-sluice");
    // The container sees the real client (DNAT only, no masquerade); busybox httpd shows it
    // IPv4-mapped (`[::ffff:10.77.42.2]`).
    let seen = wait_wget(env, Some(&outside), &url, "/cgi-bin/ip");
    assert!(
        seen == outside.ip
            || seen
                .trim_end_matches(']')
                .ends_with(&format!(":{}", outside.ip)),
        "the container must see the client's address {}, saw {seen}",
        outside.ip
    );
    // From the host itself: loopback and the host's own address.
    assert_eq!(wait_wget(env, None, "127.0.0.1:8080", "/"), "hello-sluice");
    assert_eq!(wait_wget(env, None, &url, "/"), "hello-sluice");
    let dnat: Vec<Value> = nft_rules_with(&web_ip)
        .into_iter()
        .filter(|r| r["table"] == table(env) && r.to_string().contains("8080"))
        .collect();
    assert_eq!(dnat.len(), 1, "one DNAT rule for 8080: {dnat:?}");
    assert_docker_firewall_and_our_rules_only_in_docker_user(env, &bridge);

    // Hairpin: a container of the same network through the host's address.
    env.run_container("ns-pub", "ns-hairpin", &[]);
    let hairpin = || {
        let out = env.exec(
            "ns-hairpin",
            &[
                "sh",
                "-c",
                &format!(
                    "printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 3 {} 8080",
                    outside.host_ip
                ),
            ],
        );
        String::from_utf8_lossy(&out.stdout).contains("hello-sluice")
    };
    assert!(
        wait_until(Duration::from_secs(10), hairpin),
        "a container cannot reach its network's published port through the host's address\n{}",
        diagnose(env)
    );
    env.docker_ok(["rm", "-f", "ns-hairpin"]);

    // `sluice endpoints` shows what Docker cannot (`docker port` is empty for a remote
    // driver).
    let ep = env.endpoint_id("ns-web", "ns-pub");
    let status = env.sluice_cli_ok(&["endpoints", "--json"]);
    assert!(
        status.contains(&ep) && status.contains("0.0.0.0:8080->80/tcp"),
        "published port not in sluice endpoints: {status}"
    );

    // An address, a range, a random port, UDP.
    env.run_container_cmd(
        "ns-pub",
        "ns-web-r",
        &[
            "-p",
            "127.0.0.1:18085:80",
            "-p",
            "18086-18087:80-81",
            "-p",
            "80",
            "-p",
            "18088:80/udp",
        ],
        WEB,
    );
    assert_eq!(wait_wget(env, None, "127.0.0.1:18085", "/"), "hello-sluice");
    assert!(
        wget(Some(&outside), &format!("{}:18085", outside.host_ip), "/").is_none(),
        "a port published on 127.0.0.1 answers on another address"
    );
    let range = format!("{}:18086", outside.host_ip);
    assert_eq!(wait_wget(env, Some(&outside), &range, "/"), "hello-sluice");
    let r_ip = env.container_ip("ns-web-r", "ns-pub");
    let rules: Vec<String> = nft_rules_with(&r_ip).iter().map(Value::to_string).collect();
    assert_eq!(rules.len(), 5, "one DNAT rule per binding: {rules:?}");
    assert!(
        rules
            .iter()
            .any(|r| r.contains("18087") && r.contains("81")),
        "{rules:?}"
    );
    assert!(
        rules
            .iter()
            .any(|r| r.contains("udp") && r.contains("18088")),
        "{rules:?}"
    );
    env.docker_ok(["rm", "-f", "ns-web-r"]);
    assert!(
        nft_rules_with(&r_ip).is_empty(),
        "rules left after docker rm"
    );

    // The port is taken: by this container for another one, by a host process for any.
    let err = env.docker_fails([
        "run",
        "-d",
        "--name",
        "ns-web2",
        "--network",
        "ns-pub",
        "-p",
        "8080:80",
        docker::IMAGE,
        "sleep",
        "60",
    ]);
    assert!(
        err.contains("8080") && err.contains("port is already allocated"),
        "unclear error for a taken port: {err}"
    );
    let squatter = TcpListener::bind("0.0.0.0:18081").unwrap();
    let err = env.docker_fails([
        "run",
        "-d",
        "--name",
        "ns-web3",
        "--network",
        "ns-pub",
        "-p",
        "18081:80",
        docker::IMAGE,
        "sleep",
        "60",
    ]);
    assert!(
        err.contains("18081") && err.contains("port is already allocated"),
        "unclear error for a port a host process holds: {err}"
    );
    drop(squatter);
    env.docker(["rm", "-f", "ns-web2", "ns-web3"]);

    // Stopped: the port is closed and the rules are gone.
    env.docker_ok(["stop", "ns-web"]);
    assert!(
        nft_rules_with(&web_ip).is_empty(),
        "DNAT rules left after docker stop: {:?}",
        nft_rules_with(&web_ip)
    );
    assert!(
        wget(Some(&outside), &url, "/").is_none(),
        "8080 still answers"
    );
    assert!(
        wget(None, "127.0.0.1:8080", "/").is_none(),
        "8080 still answers on the host"
    );
    // ...and free for others.
    drop(TcpListener::bind("0.0.0.0:8080").expect("8080 must be free after docker stop"));

    env.docker_ok(["rm", "-f", "ns-web"]);
    env.docker_ok(["network", "rm", "ns-pub"]);
    assert_no_rules_left(env, &bridge, "10.38.3.");
}

#[test]
fn internal_network_reaches_nothing_outside_and_no_host_address_but_its_gateway() {
    if docker::skip_unless_root() {
        return;
    }
    let env = env();
    assert_subnet_free("10.38.4.0/24");
    let mut outside = Outside::new(43).unwrap();
    outside.serve_tcp(7000).unwrap();
    // A service of the host on another of its addresses.
    let host_service = TcpListener::bind(format!("{}:7100", outside.host_ip)).unwrap();
    let id = env.create_network("ns-int", &["--internal", "--subnet", "10.38.4.0/24"]);
    let bridge = names::bridge(&id);
    // NET_ADMIN: the container tries its own default route via the gateway.
    env.run_container(
        "ns-int",
        "ns-int-c",
        &["--cap-add", "NET_ADMIN", "-p", "18084:80"],
    );
    let routes = env.exec_ok("ns-int-c", &["ip", "route"]);
    assert!(
        !routes.contains("default"),
        "internal: no default route: {routes}"
    );
    assert!(tcp_source(env, "ns-int-c", &outside.ip, 7000).is_none());
    env.exec_ok(
        "ns-int-c",
        &["ip", "route", "add", "default", "via", "10.38.4.1"],
    );
    // Without the fences the gateway would route this out (and the host answer on 7100).
    for _ in 0..3 {
        assert!(
            tcp_source(env, "ns-int-c", &outside.ip, 7000).is_none(),
            "an internal network reached the outside"
        );
        let host = env.exec("ns-int-c", &["nc", "-w", "2", &outside.host_ip, "7100"]);
        assert!(
            !host.status.success(),
            "an internal network reached the host's address {}",
            outside.host_ip
        );
    }
    // The gateway itself stays reachable (as on Docker's internal bridges).
    env.assert_ping("ns-int-c", "10.38.4.1");
    // Nothing masqueraded, nothing published.
    let ours: Vec<Value> = nft_rules_with(&bridge);
    assert!(
        ours.iter().any(|r| r["chain"] == "forward") && ours.iter().any(|r| r["chain"] == "input"),
        "internal fences missing: {ours:?}"
    );
    assert!(
        !nft_rules_with("10.38.4.")
            .iter()
            .any(|r| r.to_string().contains("slbr*")),
        "internal network masqueraded"
    );
    assert!(
        nft_rules_with("18084").is_empty(),
        "port published on an internal network"
    );
    drop(host_service);

    env.docker_ok(["rm", "-f", "ns-int-c"]);
    env.docker_ok(["network", "rm", "ns-int"]);
    assert_no_rules_left(env, &bridge, "10.38.4.");
}

#[test]
fn egress_cidr_policy_blocks_the_outside_live_and_ingress_policy_sees_the_client() {
    if docker::skip_unless_root() {
        return;
    }
    let env = env();
    assert_subnet_free("10.38.5.0/24");
    let mut outside = Outside::new(44).unwrap();
    outside.serve_tcp(7000).unwrap();
    let id = env.create_network("ns-pol", &["--subnet", "10.38.5.0/24"]);
    let bridge = names::bridge(&id);
    env.run_container("ns-pol", "ns-pol-c", &[]);
    env.run_container_cmd("ns-pol", "ns-pol-web", &["-p", "18082:80"], WEB);
    assert_eq!(
        wait_tcp_source(env, "ns-pol-c", &outside.ip, 7000),
        outside.host_ip
    );
    let url = format!("{}:18082", outside.host_ip);
    assert_eq!(wait_wget(env, Some(&outside), &url, "/"), "hello-sluice");

    // Egress: everything but the outside host's link (as "deny 0.0.0.0/0 except …").
    let egress = format!(
        "name: ns-no-outside\nselector: {{network: ns-pol, name: ns-pol-c}}\negress:\n  - action: allow\n  - action: deny\n    to: [{{cidr: {}}}]\n",
        outside.cidr
    );
    let file = env.dir().join("ns-no-outside.yaml");
    std::fs::write(&file, egress).unwrap();
    env.sluice_cli_ok(&["policy", "apply", "-f", file.to_str().unwrap()]);
    assert!(
        wait_until(Duration::from_secs(10), || tcp_source(
            env,
            "ns-pol-c",
            &outside.ip,
            7000
        )
        .is_none()),
        "the egress policy did not block the outside\n{}",
        env.logs_tail()
    );
    let c_ip = env.container_ip("ns-pol-c", "ns-pol");
    let seen = wait_until(Duration::from_secs(10), || {
        env.sluice_cli_ok(&["flows", "--json"]).lines().any(|l| {
            let r: Value = serde_json::from_str(l).unwrap_or_default();
            r["src"].as_str() == Some(c_ip.as_str())
                && r["dst"].as_str() == Some(outside.ip.as_str())
                && r["dst_port"].as_u64() == Some(7000)
                && r["reason"] == "policy_deny"
        })
    });
    assert!(
        seen,
        "no policy drop {c_ip} -> {}:7000 in sluice flows:\n{}",
        outside.ip,
        env.sluice_cli_ok(&["flows"])
    );
    // The web container is not selected: the published port still answers.
    assert_eq!(wait_wget(env, Some(&outside), &url, "/"), "hello-sluice");

    // Ingress through the published port: the policy sees the outside client's address.
    let deny_outside = "name: ns-web-in\nselector: {network: ns-pol, name: ns-pol-web}\ningress:\n  - action: allow\n    from: [{cidr: 10.38.5.0/24}]\n";
    std::fs::write(&file, deny_outside).unwrap();
    env.sluice_cli_ok(&["policy", "apply", "-f", file.to_str().unwrap()]);
    assert!(
        wait_until(Duration::from_secs(10), || wget(Some(&outside), &url, "/")
            .is_none()),
        "ingress policy without the client's address still let it in"
    );
    let allow_client = format!(
        "name: ns-web-in\nselector: {{network: ns-pol, name: ns-pol-web}}\ningress:\n  - action: allow\n    from: [{{cidr: {}}}]\n",
        outside.ip
    );
    std::fs::write(&file, allow_client).unwrap();
    env.sluice_cli_ok(&["policy", "apply", "-f", file.to_str().unwrap()]);
    assert_eq!(wait_wget(env, Some(&outside), &url, "/"), "hello-sluice");

    // Removal restores the way out, live.
    env.sluice_cli_ok(&["policy", "rm", "ns-no-outside"]);
    env.sluice_cli_ok(&["policy", "rm", "ns-web-in"]);
    assert_eq!(
        wait_tcp_source(env, "ns-pol-c", &outside.ip, 7000),
        outside.host_ip
    );

    env.docker_ok(["rm", "-f", "ns-pol-c", "ns-pol-web"]);
    env.docker_ok(["network", "rm", "ns-pol"]);
    assert_no_rules_left(env, &bridge, "10.38.5.");
}

#[test]
fn north_south_survives_dockerd_and_sluice_restarts_and_rm_leaves_no_table() {
    if docker::skip_unless_root() {
        return;
    }
    let env = Env::start();
    assert_subnet_free("10.38.6.0/24");
    let mut outside = Outside::new(45).unwrap();
    outside.serve_tcp(7000).unwrap();
    outside.serve_udp(7001).unwrap();
    let id = env.create_network("ns-rst", &["--subnet", "10.38.6.0/24"]);
    let bridge = names::bridge(&id);
    env.run_container_cmd(
        "ns-rst",
        "ns-rst-web",
        &["--restart", "always", "-p", "18083:80"],
        WEB,
    );
    env.run_container("ns-rst", "ns-rst-c", &["--restart", "always"]);
    let url = format!("{}:18083", outside.host_ip);
    let check = |when: &str| {
        assert_eq!(
            wait_tcp_source(&env, "ns-rst-c", &outside.ip, 7000),
            outside.host_ip,
            "outbound {when}"
        );
        assert_eq!(
            wait_udp_source(&env, "ns-rst-c", &outside.ip, 7001),
            outside.host_ip,
            "outbound UDP {when}"
        );
        assert_eq!(
            wait_wget(&env, Some(&outside), &url, "/"),
            "hello-sluice",
            "published port {when}"
        );
        assert_docker_firewall_and_our_rules_only_in_docker_user(&env, &bridge);
    };
    check("at first");

    // dockerd restarts: it re-creates its chains, keeps DOCKER-USER; the containers come back
    // with new endpoints and their ports are published again.
    env.restart_dockerd();
    let running = |c: &str| {
        env.docker(["inspect", "-f", "{{.State.Running}}", c])
            .stdout
            .starts_with(b"true")
    };
    assert!(
        wait_until(Duration::from_secs(60), || running("ns-rst-web")
            && running("ns-rst-c")),
        "the --restart always containers did not come back\n{}",
        env.logs_tail()
    );
    check("after a dockerd restart");

    // sluice dies and its table is lost meanwhile: the restarted daemon rebuilds it.
    env.kill_sluice(Signal::SIGKILL);
    let del = Command::new("nft")
        .args(["delete", "table", "inet", &table(&env)])
        .status()
        .unwrap();
    assert!(del.success());
    env.start_sluice();
    assert!(
        wait_until(Duration::from_secs(20), || nft_table_exists(&table(&env))),
        "sluice did not restore its table at start\n{}",
        env.logs_tail()
    );
    check("after a sluice restart");

    env.docker_ok(["rm", "-f", "ns-rst-web", "ns-rst-c"]);
    env.docker_ok(["network", "rm", "ns-rst"]);
    assert_no_rules_left(&env, &bridge, "10.38.6.");
    assert!(
        wait_until(Duration::from_secs(10), || !nft_table_exists(&table(&env))),
        "the table outlived the last network"
    );
}

/// Frames the host-side veth `veth` transmitted: what the bridge delivered to its container.
fn veth_tx_packets(veth: &str) -> u64 {
    let out = Command::new("ip")
        .args(["-s", "-j", "link", "show", "dev", veth])
        .output()
        .unwrap();
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    v[0]["stats64"]["tx"]["packets"].as_u64().unwrap()
}

/// With the daemon's defaults (fast path on): container-to-container traffic reaches the
/// receiver without crossing the bridge (its host veth transmits nothing while sluice counts
/// the packets as its ingress), and a container still reaches a published port of its own
/// network through a host address (hairpin: DNAT, masquerade, the replies back through the
/// host). Subnet 10.38.9.0/24, host port 18089.
#[test]
fn fast_path_skips_the_bridge_between_containers_and_hairpin_still_answers() {
    if docker::skip_unless_root() {
        return;
    }
    let env = env();
    assert_subnet_free("10.38.9.0/24");
    env.create_network(
        "ns-fast",
        &["--subnet", "10.38.9.0/24", "--gateway", "10.38.9.1"],
    );
    env.run_container_cmd("ns-fast", "ns-fast-web", &["-p", "18089:80"], WEB);
    env.run_container("ns-fast", "ns-fast-client", &[]);
    let web_ip = env.container_ip("ns-fast-web", "ns-fast");
    // `target` is nc's arguments: `IP PORT`.
    let get = |target: &str| {
        let out = env.exec(
            "ns-fast-client",
            &[
                "sh",
                "-c",
                &format!("printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 3 {target}"),
            ],
        );
        String::from_utf8_lossy(&out.stdout).contains("hello-sluice")
    };
    let direct = format!("{web_ip} 80");
    assert!(
        wait_until(Duration::from_secs(20), || get(&direct)),
        "the client cannot reach web directly\n{}",
        diagnose(env)
    );

    let ep = env.endpoint_id("ns-fast-web", "ns-fast");
    let status: Value = serde_json::from_str(&env.sluice_cli_ok(&["endpoints", "--json"])).unwrap();
    let web = status
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["id"] == ep.as_str())
        .unwrap_or_else(|| panic!("web not in sluice endpoints: {status}"))
        .clone();
    let veth = web["host_veth"].as_str().unwrap().to_owned();
    let ingress = || -> u64 {
        let status: Value =
            serde_json::from_str(&env.sluice_cli_ok(&["endpoints", "--json"])).unwrap();
        status
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["id"] == ep.as_str())
            .map_or(0, |e| e["ingress"]["allowed"]["packets"].as_u64().unwrap())
    };
    let (tx, counted) = (veth_tx_packets(&veth), ingress());
    for _ in 0..10 {
        assert!(get(&direct), "a direct GET failed");
    }
    let bridged = veth_tx_packets(&veth) - tx;
    let received = ingress() - counted;
    assert!(received >= 30, "sluice counted {received} packets into web");
    assert!(
        bridged < 10,
        "{bridged} of {received} packets into web crossed the bridge"
    );

    // Hairpin through the gateway (a host address): works with the fast path on.
    assert!(
        wait_until(Duration::from_secs(10), || get("10.38.9.1 18089")),
        "hairpin to the published port fails with the fast path on\n{}",
        diagnose(env)
    );

    env.docker_ok(["rm", "-f", "ns-fast-web", "ns-fast-client"]);
    env.docker_ok(["network", "rm", "ns-fast"]);
}
