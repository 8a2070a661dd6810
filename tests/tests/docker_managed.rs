//! Docker end-to-end: sluice as a managed (v2) plugin (`cargo xtask plugin`, `docker plugin
//! create/enable/disable/set/rm`), its capabilities, and swarm-scoped networks.
//!
//! Each test has a private dockerd without a legacy sluice daemon ([`Env::try_new_dockerd_only`];
//! the two-node swarm test has two, each in a network namespace of its own, joined by a veth
//! pair on 10.64.0.0/24); the plugin is built from this checkout. Default pools: 10.60.0.0/16
//! (lifecycle), 10.61.0.0/16 (swarm), 10.62.0.0/16 (capabilities), 10.66.0.0/16 (two-node
//! swarm, inside its namespaces); explicit subnets under 10.63.0.0/16.

use std::time::Duration;

use sluice_tests::docker::{self, Env, assert_subnet_free, wait_until};
use sluice_tests::managed::{Plugin, bundle_dir, bundle_without, granted_capabilities};

fn env() -> Env {
    match Env::try_new_dockerd_only() {
        Ok(env) => env,
        Err(e) => panic!("the private dockerd did not start: {e:#}"),
    }
}

/// `docker run -d --restart always` of a container that sleeps (and stops on SIGTERM).
fn run_restarting(env: &Env, net: &str, name: &str) {
    env.run_container(net, name, &["--restart", "always"]);
}

/// The plugin processes' lines of dockerd's log (dockerd logs a plugin's stderr with
/// `plugin=<id>`).
fn plugin_log(env: &Env, id: &str) -> String {
    env.dockerd_log()
        .lines()
        .filter(|l| l.contains(&format!("plugin={id}")))
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn managed_plugin_lifecycle_create_enable_upgrade_restart_disable_rm() {
    if docker::skip_unless_root() {
        return;
    }
    let env = env();
    assert_subnet_free("10.60.0.0/16");
    assert_subnet_free("10.63.1.0/24");
    let tag1 = format!("sluicetest/{}:1", env.driver());
    let tag2 = format!("sluicetest/{}:2", env.driver());

    // The bundle from the checkout: `cargo xtask plugin` builds and creates it.
    let plugin = Plugin::create(&env, &tag1, "10.60.0.0/16");
    assert_eq!(plugin.inspect("{{.Enabled}}"), "false");
    assert!(
        plugin
            .inspect("{{.Config.Description}}")
            .contains(&format!("built as {tag1}")),
        "{}",
        plugin.inspect("{{json .Config}}")
    );
    let caps = plugin.inspect("{{json .Config.Linux.Capabilities}}");
    assert_eq!(caps, r#"["CAP_NET_ADMIN","CAP_BPF","CAP_PERFMON"]"#);
    plugin.configure(&[]);
    plugin.enable();
    let id1 = plugin.inspect("{{.Id}}");

    // A network and two containers that talk (by name: Docker's DNS; and only once sluice
    // resolved their identities through the mounted engine socket, else fail-closed).
    let net = "m-net";
    plugin.create_network(net, &[]);
    run_restarting(&env, net, "m1");
    run_restarting(&env, net, "m2");
    let m2 = env.container_ip("m2", net);
    assert!(m2.starts_with("10.60."), "m2 got {m2}, not from the pool");
    env.assert_ping("m1", "m2");
    env.assert_ping("m2", "m1");
    // The admin socket is on the host (the `admin` mount): the CLI sees both containers.
    let endpoints = env.sluice_cli_ok(&["endpoints"]);
    assert!(
        endpoints.contains("m1") && endpoints.contains("m2"),
        "sluice endpoints through the plugin's admin socket:\n{endpoints}"
    );

    // A local network from a config-only network (--config-only / --config-from).
    env.docker_ok([
        "network",
        "create",
        "--config-only",
        "--subnet",
        "10.63.1.0/24",
        "--ip-range",
        "10.63.1.128/25",
        "m-cfg",
    ]);
    env.docker_ok([
        "network",
        "create",
        "-d",
        &tag1,
        "--config-from",
        "m-cfg",
        "m-fromcfg",
    ]);
    env.run_container("m-fromcfg", "m3", &[]);
    env.run_container("m-fromcfg", "m4", &[]);
    let m4 = env.container_ip("m4", "m-fromcfg");
    assert!(
        m4.starts_with("10.63.1.1"),
        "m4 got {m4}, not from the config's --ip-range"
    );
    env.assert_ping("m3", &m4);
    env.docker_ok(["rm", "-f", "m3", "m4"]);
    env.docker_ok(["network", "rm", "m-fromcfg", "m-cfg"]);

    // Docker's rules: no disable or rm while a network uses the plugin.
    let refused = env.docker_fails(["plugin", "disable", &tag1]);
    assert!(refused.contains("in use"), "{refused}");
    let refused = env.docker_fails(["plugin", "rm", &tag1]);
    assert!(
        refused.contains("in use") || refused.contains("enabled"),
        "{refused}"
    );

    // Upgrade to a second build while m1 and m2 run. `docker plugin upgrade` always pulls
    // from a registry, so without one the plugin is replaced under its name (what networks
    // refer to): disable -f, rm -f, create from the new bundle, set, enable.
    let out2 = bundle_dir(&env, &tag2);
    if let Err(e) = sluice_tests::managed::cargo_xtask_plugin(&[
        "--name",
        &tag2,
        "--no-create",
        "--out",
        &out2.to_string_lossy(),
    ]) {
        panic!("{e:#}");
    }
    env.docker_ok(["plugin", "disable", "-f", &tag1]);
    // The datapath is in the kernel: traffic keeps flowing while no sluice runs.
    env.assert_ping("m1", &m2);
    let refused = env.docker_fails(["plugin", "rm", &tag1]);
    assert!(refused.contains("in use"), "{refused}");
    env.docker_ok(["plugin", "rm", "-f", &tag1]);
    env.assert_ping("m1", &m2);
    let plugin = Plugin::create_from(&env, &tag1, &out2, "10.60.0.0/16");
    plugin.configure(&[]);
    plugin.enable();
    let id2 = plugin.inspect("{{.Id}}");
    assert_ne!(id1, id2, "the plugin was not replaced");
    assert!(
        plugin
            .inspect("{{.Config.Description}}")
            .contains(&format!("built as {tag2}"))
    );
    env.assert_ping("m1", "m2");
    env.assert_ping("m2", "m1");
    // The new plugin serves the network it found in the state dir: a new container joins.
    env.run_container(net, "m5", &[]);
    let m5 = env.container_ip("m5", net);
    assert!(
        m5.starts_with("10.60.") && m5 != m2 && m5 != env.container_ip("m1", net),
        "m5 got {m5}"
    );
    env.assert_ping("m5", "m1");
    env.docker_ok(["rm", "-f", "m5"]);

    // dockerd restarts with the plugin enabled: it starts the plugin again, the network is
    // there, and the containers (restart policy `always`) come back and talk.
    env.restart_dockerd();
    assert_eq!(plugin.inspect("{{.Enabled}}"), "true");
    let back = wait_until(Duration::from_secs(60), || {
        env.docker_ok(["ps", "-q", "--filter", "status=running"])
            .lines()
            .count()
            == 2
    });
    assert!(back, "m1 and m2 did not come back\n{}", env.logs_tail());
    env.assert_ping("m1", "m2");
    env.assert_ping("m2", "m1");

    // Removal as Docker documents it: containers, network, then disable and rm.
    env.docker_ok(["rm", "-f", "m1", "m2"]);
    env.docker_ok(["network", "rm", net]);
    env.docker_ok(["plugin", "disable", &tag1]);
    env.docker_ok(["plugin", "rm", &tag1]);
    assert_eq!(env.docker_ok(["plugin", "ls", "-q"]), "");
    // The network's bridge went with it.
    let left: Vec<_> = docker::host_links()
        .into_iter()
        .filter(|l| l.starts_with("slbr"))
        .filter(|l| {
            docker::try_ip_json(&["link", "show", "dev", l])
                .ok()
                .and_then(|v| v[0]["ifalias"].as_str().map(str::to_owned))
                .as_deref()
                == Some(&format!("sluice:{}", env.driver()))
        })
        .collect();
    assert!(left.is_empty(), "links left behind: {left:?}");
}

#[test]
fn managed_plugin_fails_clearly_without_each_capability() {
    if docker::skip_unless_root() {
        return;
    }
    let env = env();
    let full = format!("sluicetest/{}:full", env.driver());
    let plugin = Plugin::create(&env, &full, "10.62.0.0/16");
    let bundle = bundle_dir(&env, &full);
    let caps = granted_capabilities();
    assert_eq!(caps, ["CAP_NET_ADMIN", "CAP_BPF", "CAP_PERFMON"]);
    for cap in &caps {
        let variant = env.dir().join(format!("bundle-no-{cap}"));
        bundle_without(&bundle, cap, &variant).expect("bundle variant");
        let name = format!("sluicetest/{}:no-{}", env.driver(), cap.to_lowercase());
        let without = Plugin::create_from(&env, &name, &variant, "10.62.0.0/16");
        without.configure(&[]);
        let id = without.inspect("{{.Id}}");
        // The plugin exits at start: dockerd never sees its socket, enable fails.
        let out = env.docker(["plugin", "enable", &name]);
        assert!(
            !out.status.success(),
            "enable without {cap} succeeded\n{}",
            env.logs_tail()
        );
        let log = plugin_log(&env, &id);
        assert!(
            log.contains("sluice lacks the Linux capability")
                && log.contains(&format!("{cap} is needed to")),
            "without {cap}, the plugin's log does not name it:\n{}",
            docker::tail(&log, 20)
        );
        assert_eq!(without.inspect("{{.Enabled}}"), "false");
        env.docker_ok(["plugin", "rm", "-f", &name]);
    }
    // With all three it starts and serves.
    plugin.configure(&[]);
    plugin.enable();
    let id = plugin.inspect("{{.Id}}");
    assert!(
        wait_until(Duration::from_secs(30), || plugin_log(&env, &id)
            .contains("serving Docker plugin API")),
        "{}",
        env.logs_tail()
    );
    env.docker_ok(["plugin", "disable", &full]);
    env.docker_ok(["plugin", "rm", &full]);
}

/// A TCP port on 127.0.0.1 that nothing listens on now.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or_else(|e| panic!("no free port: {e}"))
}

#[test]
fn swarm_service_on_a_sluice_swarm_network() {
    if docker::skip_unless_root() {
        return;
    }
    let env = env();
    assert_subnet_free("10.61.0.0/16");
    let tag = format!("sluicetest/{}:swarm", env.driver());
    let plugin = Plugin::create(&env, &tag, "10.61.0.0/16");
    plugin.configure(&["SLUICE_SCOPE=global"]);
    plugin.enable();
    assert_eq!(
        plugin
            .inspect("{{range .Settings.Env}}{{println .}}{{end}}")
            .lines()
            .find(|l| l.starts_with("SLUICE_SCOPE="))
            .unwrap_or_default(),
        "SLUICE_SCOPE=global"
    );

    // Outside swarm Docker refuses a global-scope driver's networks.
    let refused = env.docker_fails(["network", "create", "-d", &tag, "outside"]);
    assert!(refused.contains("not a swarm manager"), "{refused}");

    let _guard = docker::SwarmGuard(&env);
    let addr = format!("127.0.0.1:{}", free_port());
    env.docker_ok([
        "swarm",
        "init",
        "--advertise-addr",
        &addr,
        "--listen-addr",
        &addr,
    ]);
    let net = "s-net";
    env.docker_ok([
        "network",
        "create",
        "--scope",
        "swarm",
        "--attachable",
        "-d",
        &tag,
        "--ipam-driver",
        &tag,
        // Reaches the node's CreateNetwork only through what AllocateNetwork returned.
        "-o",
        "com.docker.network.driver.mtu=1400",
        net,
    ]);
    let inspect = env.network_inspect(net);
    assert_eq!(inspect["Scope"], "swarm");
    // A typo in an option: Docker allocates swarm networks after `docker network create`
    // returned, so it shows where the network is used: each task is rejected with sluice's
    // message. (Refusing it in AllocateNetwork would be worse: the network then stays
    // unallocated and tasks sit in "New" with no error shown.)
    env.docker_ok([
        "network",
        "create",
        "--scope",
        "swarm",
        "-d",
        &tag,
        "--ipam-driver",
        &tag,
        "-o",
        "colour=blue",
        "s-bad",
    ]);
    env.docker_ok([
        "service",
        "create",
        "--detach",
        "--no-resolve-image",
        "--name",
        "bad",
        "--network",
        "s-bad",
        docker::IMAGE,
        "sleep",
        "60",
    ]);
    let rejected = wait_until(Duration::from_secs(60), || {
        env.docker_ok(["service", "ps", "--no-trunc", "bad"])
            .contains("unknown option \"colour\"")
    });
    assert!(
        rejected,
        "{}",
        env.docker_ok(["service", "ps", "--no-trunc", "bad"])
    );
    env.docker_ok(["service", "rm", "bad"]);
    // The manager's allocation (AllocateNetwork, IPAM in the global space) is in the pool.
    // Inspected again: the manager allocates after `docker network create` returned, so the
    // first inspect may not show it yet (seen once under a loaded full run).
    let subnet = env.network_inspect(net)["IPAM"]["Config"][0]["Subnet"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(
        subnet.starts_with("10.61."),
        "swarm network subnet {subnet}"
    );

    // dnsrr: VIP mode needs IPVS, which this kernel lacks (no /proc/net/ip_vs).
    env.docker_ok([
        "service",
        "create",
        "--detach",
        "--no-resolve-image",
        "--name",
        "web",
        "--replicas",
        "3",
        "--network",
        net,
        "--endpoint-mode",
        "dnsrr",
        docker::IMAGE,
        "sh",
        "-c",
        "trap 'exit 0' TERM; sleep 3600 & wait",
    ]);
    let tasks = || {
        env.docker_ok([
            "ps",
            "-q",
            "--filter",
            "label=com.docker.swarm.service.name=web",
            "--filter",
            "status=running",
        ])
        .lines()
        .map(str::to_owned)
        .collect::<Vec<_>>()
    };
    let running = wait_until(Duration::from_secs(120), || tasks().len() == 3);
    assert!(
        running,
        "3 tasks did not start:\n{}\n{}",
        env.docker_ok(["service", "ps", "--no-trunc", "web"]),
        env.logs_tail()
    );
    let tasks = tasks();
    let ips: Vec<String> = tasks.iter().map(|t| env.container_ip(t, net)).collect();
    for ip in &ips {
        let net: ipnetwork::IpNetwork = subnet.parse().expect("subnet");
        assert!(
            net.contains(ip.parse().expect("task IP")),
            "task address {ip} not in {subnet}"
        );
    }
    // The driver option went manager -> AllocateNetwork -> the node's CreateNetwork.
    for task in &tasks {
        let mtu = env.exec_ok(task, &["cat", "/sys/class/net/eth0/mtu"]);
        assert_eq!(mtu, "1400", "{task}: eth0 MTU");
    }
    // Every task resolves the service name to all three tasks (Docker's embedded DNS) and
    // reaches each of them, and the service name itself.
    for task in &tasks {
        let resolved = wait_until(Duration::from_secs(30), || {
            let out = env.exec(task, &["nslookup", "web", "127.0.0.11"]);
            let text = String::from_utf8_lossy(&out.stdout).into_owned();
            ips.iter().all(|ip| text.contains(ip.as_str()))
        });
        assert!(
            resolved,
            "{task}: `web` does not resolve to all of {ips:?}:\n{}",
            String::from_utf8_lossy(&env.exec(task, &["nslookup", "web", "127.0.0.11"]).stdout)
        );
        for ip in &ips {
            env.assert_ping(task, ip);
        }
        env.assert_ping(task, "web");
        env.assert_ping(task, "tasks.web");
    }
    // An attachable swarm network takes plain containers too.
    env.run_container(net, "s-attached", &[]);
    env.assert_ping("s-attached", "web");

    env.docker_ok(["rm", "-f", "s-attached"]);
    env.docker_ok(["service", "rm", "web"]);
    let gone = wait_until(Duration::from_secs(60), || {
        env.docker_ok([
            "ps",
            "-aq",
            "--filter",
            "label=com.docker.swarm.service.name=web",
        ])
        .is_empty()
    });
    assert!(gone, "the service's tasks did not go");
    // FreeNetwork on the manager; the network goes on the node.
    let removed = wait_until(Duration::from_secs(30), || {
        env.docker(["network", "rm", net]).status.success()
            || !env.docker(["network", "inspect", net]).status.success()
    });
    assert!(removed, "{}", env.logs_tail());
    let id = plugin.inspect("{{.Id}}");
    assert!(
        wait_until(Duration::from_secs(30), || plugin_log(&env, &id)
            .contains("FreeNetwork")),
        "no FreeNetwork reached the plugin\n{}",
        env.logs_tail()
    );
    assert!(plugin_log(&env, &id).contains("AllocateNetwork"));
}

/// Two named network namespaces joined by a veth pair (`10.64.0.1/24` and `10.64.0.2/24`):
/// two "machines" for a two-node swarm. Deleted on drop (after the dockerds in them stopped).
struct TwoHosts {
    names: [String; 2],
}

impl TwoHosts {
    fn new() -> TwoHosts {
        let pid = std::process::id();
        // Namespaces of earlier runs that were killed before their clean-up.
        let listed = std::process::Command::new("ip")
            .args(["netns", "list"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        for name in listed.lines().filter_map(|l| l.split_whitespace().next()) {
            let owner = name
                .strip_prefix("slsw")
                .map(|rest| rest.trim_end_matches(['a', 'b']))
                .and_then(|p| p.parse::<u32>().ok());
            if let Some(owner) = owner
                && owner != pid
                && !std::path::Path::new(&format!("/proc/{owner}")).exists()
            {
                let _ = std::process::Command::new("ip")
                    .args(["netns", "del", name])
                    .status();
            }
        }
        let names = [format!("slsw{pid}a"), format!("slsw{pid}b")];
        let hosts = TwoHosts { names };
        let [a, b] = &hosts.names;
        let (va, vb) = (format!("slsw{pid}va"), format!("slsw{pid}vb"));
        for args in [
            vec!["netns", "add", a.as_str()],
            vec!["netns", "add", b.as_str()],
            vec!["link", "add", &va, "type", "veth", "peer", "name", &vb],
            vec!["link", "set", &va, "netns", a],
            vec!["link", "set", &vb, "netns", b],
            vec!["-n", a, "addr", "add", "10.64.0.1/24", "dev", &va],
            vec!["-n", b, "addr", "add", "10.64.0.2/24", "dev", &vb],
            vec!["-n", a, "link", "set", "lo", "up"],
            vec!["-n", b, "link", "set", "lo", "up"],
            vec!["-n", a, "link", "set", &va, "up"],
            vec!["-n", b, "link", "set", &vb, "up"],
        ] {
            let status = std::process::Command::new("ip").args(&args).status();
            assert!(
                status.is_ok_and(|s| s.success()),
                "ip {} failed",
                args.join(" ")
            );
        }
        hosts
    }
}

impl Drop for TwoHosts {
    fn drop(&mut self) {
        for name in &self.names {
            let _ = std::process::Command::new("ip")
                .args(["netns", "del", name])
                .status();
        }
    }
}

#[test]
fn two_node_swarm_service_spans_both_nodes() {
    if docker::skip_unless_root() {
        return;
    }
    // Declared first: dropped last, after both dockerds stopped.
    let hosts = TwoHosts::new();
    let start = |netns: &str| match Env::try_new_dockerd_only_in(netns) {
        Ok(env) => env,
        Err(e) => panic!("the private dockerd in {netns} did not start: {e:#}"),
    };
    let manager = start(&hosts.names[0]);
    let worker = start(&hosts.names[1]);
    // One plugin name on every node; built once, created on both.
    let tag = format!("sluicetest/{}:swarm2", manager.driver());
    let on_manager = Plugin::create(&manager, &tag, "10.66.0.0/16");
    let on_worker = Plugin::create_from(&worker, &tag, &bundle_dir(&manager, &tag), "10.66.0.0/16");
    for plugin in [&on_manager, &on_worker] {
        plugin.configure(&["SLUICE_SCOPE=global"]);
        plugin.enable();
    }

    let _guards = docker::two_node_swarm(&manager, "10.64.0.1", &worker, "10.64.0.2");

    let net = "s2-net";
    manager.docker_ok([
        "network",
        "create",
        "--scope",
        "swarm",
        "--attachable",
        "-d",
        &tag,
        "--ipam-driver",
        &tag,
        "-o",
        "com.docker.network.driver.mtu=1400",
        net,
    ]);
    manager.docker_ok([
        "service",
        "create",
        "--detach",
        "--no-resolve-image",
        "--name",
        "web",
        "--replicas",
        "4",
        "--replicas-max-per-node",
        "2",
        "--network",
        net,
        "--endpoint-mode",
        "dnsrr",
        docker::IMAGE,
        "sh",
        "-c",
        "trap 'exit 0' TERM; sleep 3600 & wait",
    ]);
    let tasks_on = |env: &Env| {
        env.docker_ok([
            "ps",
            "-q",
            "--filter",
            "label=com.docker.swarm.service.name=web",
            "--filter",
            "status=running",
        ])
        .lines()
        .map(str::to_owned)
        .collect::<Vec<_>>()
    };
    let spread = wait_until(Duration::from_secs(120), || {
        tasks_on(&manager).len() == 2 && tasks_on(&worker).len() == 2
    });
    assert!(
        spread,
        "the service does not run 2 tasks on each node:\n{}\n{}\n{}",
        manager.docker_ok(["service", "ps", "--no-trunc", "web"]),
        manager.logs_tail(),
        worker.logs_tail()
    );

    // The worker's network is the manager's allocation (subnet, gateway, options).
    let config = |env: &Env| {
        let v = env.network_inspect(net);
        (v["IPAM"]["Config"].clone(), v["Options"].clone())
    };
    assert_eq!(config(&manager), config(&worker));
    let mut all_ips = Vec::new();
    for env in [&manager, &worker] {
        let tasks = tasks_on(env);
        let ips: Vec<String> = tasks.iter().map(|t| env.container_ip(t, net)).collect();
        for task in &tasks {
            assert_eq!(
                env.exec_ok(task, &["cat", "/sys/class/net/eth0/mtu"]),
                "1400"
            );
        }
        // Tasks on one node reach each other.
        env.assert_ping(&tasks[0], &ips[1]);
        env.assert_ping(&tasks[1], &ips[0]);
        all_ips.extend(ips);
    }
    // The manager allocated every task address: four distinct ones.
    let mut distinct = all_ips.clone();
    distinct.sort();
    distinct.dedup();
    assert_eq!(distinct.len(), 4, "task addresses {all_ips:?}");
    // Service records are shared across the swarm: on each node, `web` resolves to all four.
    for env in [&manager, &worker] {
        let task = tasks_on(env).remove(0);
        let resolved = wait_until(Duration::from_secs(30), || {
            let out = env.exec(&task, &["nslookup", "web", "127.0.0.11"]);
            let text = String::from_utf8_lossy(&out.stdout).into_owned();
            all_ips.iter().all(|ip| text.contains(ip.as_str()))
        });
        assert!(
            resolved,
            "`web` does not resolve to all of {all_ips:?}:\n{}",
            String::from_utf8_lossy(&env.exec(&task, &["nslookup", "web", "127.0.0.11"]).stdout)
        );
    }
    manager.docker_ok(["service", "rm", "web"]);
}
