//! Docker end-to-end: a docker-compose (1.29) project on a sluice network; subnet 10.33.1.0/24.

use std::fs;
use std::time::Duration;

use sluice_tests::docker::{self, assert_subnet_free, present_links, sl_links_for, wait_until};

const PROJECT: &str = "sleproj";

fn compose_file(driver: &str) -> String {
    format!(
        r#"version: "2.4"
services:
  web:
    image: sluice-test/busybox:latest
    command: ["sh", "-c", "trap 'exit 0' TERM; sleep 3600 & wait"]
    networks:
      appnet:
        ipv4_address: 10.33.1.10
  client:
    image: sluice-test/busybox:latest
    command: ["sh", "-c", "trap 'exit 0' TERM; sleep 3600 & wait"]
    networks:
      - appnet
networks:
  appnet:
    driver: {driver}
    ipam:
      driver: {driver}
      config:
        - subnet: 10.33.1.0/24
"#
    )
}

#[test]
fn compose_up_connects_services_and_down_removes_the_network() {
    if docker::skip_unless_root() {
        return;
    }
    let env = docker::shared();
    assert_subnet_free("10.33.1.0/24");
    let dir = env.dir().join("compose");
    fs::create_dir_all(&dir).unwrap();
    fs::write(dir.join("docker-compose.yml"), compose_file(env.driver())).unwrap();

    env.compose_ok(&dir, ["-p", PROJECT, "up", "-d"]);
    let network = format!("{PROJECT}_appnet");
    let web = format!("{PROJECT}_web_1");
    let client = format!("{PROJECT}_client_1");
    let inspect = env.network_inspect(&network);
    assert_eq!(inspect["Driver"], env.driver(), "{inspect}");
    assert_eq!(inspect["IPAM"]["Driver"], env.driver(), "{inspect}");
    assert_eq!(
        inspect["IPAM"]["Config"][0]["Subnet"], "10.33.1.0/24",
        "{inspect}"
    );
    let network_id = inspect["Id"].as_str().unwrap_or_default().to_owned();

    // The static address, as Docker reports it and as the container has it.
    assert_eq!(env.container_ip(&web, &network), "10.33.1.10");
    let inside = env.exec_ok(&web, &["ip", "-o", "-4", "addr", "show", "dev", "eth0"]);
    assert!(
        inside.contains("inet 10.33.1.10/24"),
        "web's eth0 should hold 10.33.1.10/24: {inside}"
    );
    // By service name, through Docker's embedded DNS.
    env.assert_ping(&client, "web");
    env.assert_ping(&web, "client");

    let links = [
        env.container_links(&web, &network),
        env.container_links(&client, &network),
    ]
    .concat();
    env.compose_ok(&dir, ["-p", PROJECT, "down"]);
    let listed = env.docker_ok(["network", "ls", "--format", "{{.Name}}"]);
    assert!(
        !listed.lines().any(|l| l == network),
        "{network} is still listed after docker-compose down: {listed}"
    );
    let gone = wait_until(Duration::from_secs(10), || {
        sl_links_for(&network_id).is_empty() && present_links(&links).is_empty()
    });
    assert!(
        gone,
        "links remain after docker-compose down: {:?} {:?}",
        sl_links_for(&network_id),
        present_links(&links)
    );
}
