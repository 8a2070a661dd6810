//! Docker end-to-end: sluice and dockerd restarts while containers run. Each test has its own
//! environment (it restarts daemons); subnets under 10.32.0.0/16.
//!
//! The two tests run in parallel on purpose: each restarts its sluice daemon, which reconciles
//! the kernel at start; that must leave the links of the other daemon alone.

use std::collections::HashSet;
use std::time::Duration;

use nix::sys::signal::Signal;
use sluice_tests::docker::{
    self, Env, assert_subnet_free, present_links, sl_links_for, wait_until,
};

/// Asserts that no host link belongs to the network and none of the endpoints' links
/// (`Env::container_links`) is left.
fn assert_no_links(env: &Env, network_id: &str, links: &[String]) {
    let ok = wait_until(Duration::from_secs(10), || {
        sl_links_for(network_id).is_empty() && present_links(links).is_empty()
    });
    assert!(
        ok,
        "links remain after docker network rm: network {:?}, endpoints {:?}\n{}",
        sl_links_for(network_id),
        present_links(links),
        env.logs_tail()
    );
}

#[test]
fn sluice_restart_keeps_containers_connected_and_state_intact() {
    if docker::skip_unless_root() {
        return;
    }
    let env = Env::start();
    assert_subnet_free("10.32.1.0/24");
    let net = "r-net";
    let id = env.create_network(net, &["--subnet", "10.32.1.0/24"]);
    env.run_container(net, "r1", &[]);
    env.run_container(net, "r2", &[]);
    let r1 = env.container_ip("r1", net);
    let r2 = env.container_ip("r2", net);
    env.assert_ping("r1", &r2);
    let mut endpoints = [
        env.container_links("r1", net),
        env.container_links("r2", net),
    ]
    .concat();

    // kill -9: nothing is cleaned up, state must survive as it was.
    env.kill_sluice(Signal::SIGKILL);
    assert!(!env.sluice_running());
    // The datapath lives in the kernel: traffic flows while sluice is down.
    env.assert_ping("r1", &r2);
    env.start_sluice();
    env.assert_ping("r2", &r1);
    env.assert_ping("r1", "r2");

    // A new container gets an address not already leased, and reaches the others.
    env.run_container(net, "r3", &[]);
    let r3 = env.container_ip("r3", net);
    assert!(
        r3 != r1 && r3 != r2 && r3 != "10.32.1.1",
        "after the restart r3 got {r3}, already in use (r1 {r1}, r2 {r2}, gateway 10.32.1.1): \
         leases were lost"
    );
    env.assert_ping("r3", &r1);
    env.assert_ping("r3", "r2");
    endpoints.extend(env.container_links("r3", net));

    // A graceful stop: exit status 0, socket removed; then the same checks once more.
    let status = env.kill_sluice(Signal::SIGTERM);
    assert!(
        status.is_some_and(|s| s.success()),
        "sluice should exit 0 on SIGTERM, exited {status:?}\n{}",
        env.logs_tail()
    );
    assert!(
        !env.plugin_socket().exists(),
        "sluice left its socket {} behind on SIGTERM",
        env.plugin_socket().display()
    );
    env.start_sluice();
    env.run_container(net, "r4", &[]);
    let r4 = env.container_ip("r4", net);
    let all: HashSet<&String> = [&r1, &r2, &r3, &r4].into_iter().collect();
    assert_eq!(all.len(), 4, "duplicate addresses: {r1} {r2} {r3} {r4}");
    env.assert_ping("r4", "r1");
    endpoints.extend(env.container_links("r4", net));

    // Removing everything works and leaves nothing behind.
    env.docker_ok(["rm", "-f", "r1", "r2", "r3", "r4"]);
    env.docker_ok(["network", "rm", net]);
    assert_no_links(&env, &id, &endpoints);
    let listed = env.docker_ok(["network", "ls", "--format", "{{.Name}}"]);
    assert!(!listed.lines().any(|l| l == net), "{net} still listed");
}

#[test]
fn dockerd_restart_brings_restart_always_containers_back_connected() {
    if docker::skip_unless_root() {
        return;
    }
    let env = Env::start();
    assert_subnet_free("10.32.2.0/24");
    let net = "d-net";
    let id = env.create_network(net, &["--subnet", "10.32.2.0/24"]);
    env.run_container(net, "d1", &["--restart", "always"]);
    env.run_container(net, "d2", &["--restart", "always"]);
    env.assert_ping("d1", "d2");
    let mut endpoints = [
        env.container_links("d1", net),
        env.container_links("d2", net),
    ]
    .concat();

    env.restart_dockerd();

    let running = |c: &str| {
        env.docker(["inspect", "-f", "{{.State.Running}}", c])
            .stdout
            .starts_with(b"true")
    };
    assert!(
        wait_until(Duration::from_secs(60), || running("d1") && running("d2")),
        "the --restart always containers did not come back\n{}",
        env.logs_tail()
    );
    let d1 = env.container_ip("d1", net);
    let d2 = env.container_ip("d2", net);
    assert!(
        !d1.is_empty() && !d2.is_empty() && d1 != d2,
        "after the restart: d1 {d1:?}, d2 {d2:?}"
    );
    env.assert_ping("d1", &d2);
    env.assert_ping("d2", "d1");
    endpoints.extend(env.container_links("d1", net));
    endpoints.extend(env.container_links("d2", net));

    // A new container joins the network (which dockerd never re-created) and reaches them.
    env.run_container(net, "d3", &[]);
    let d3 = env.container_ip("d3", net);
    assert!(d3 != d1 && d3 != d2, "d3 got {d3}, already used by d1/d2");
    env.assert_ping("d3", "d1");
    env.assert_ping("d3", &d2);
    endpoints.extend(env.container_links("d3", net));

    env.docker_ok(["rm", "-f", "d1", "d2", "d3"]);
    env.docker_ok(["network", "rm", net]);
    assert_no_links(&env, &id, &endpoints);
}
