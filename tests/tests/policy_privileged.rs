//! Privileged end-to-end tests of policies through sluice's own [`Driver`] with the real
//! [`LinuxKernel`] and eBPF datapath: real ICMP/TCP/UDP between endpoints whose peer veths sit
//! in [`PeerNs`] stand-ins for containers, each test in its own [`NetNs`].
//!
//! `cargo build -p sluice-plugin && cargo test -p sluice-tests --test policy_privileged`
//! (as root; without root every test prints "skipped: needs root").

#![allow(
    clippy::unwrap_used,
    reason = "test helpers outside #[test] fns panic on failure, like the tests"
)]

use std::collections::BTreeMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ipnetwork::IpNetwork;
use sluice_driver::bridge::LinuxKernel;
use sluice_driver::datapath::{Datapath, DatapathConfig, EndpointCounters};
use sluice_driver::ipam::IpamConfig;
use sluice_driver::model::{ContainerIdentity, EndpointRequest, IpData, NetworkRequest};
use sluice_driver::names;
use sluice_driver::policy::parse_documents;
use sluice_driver::store::Store;
use sluice_driver::{Driver, Kernel};
use sluice_tests::netns::{
    NetNs, PeerNs, current_thread_runtime, ip_json, link_names, require_root, run,
};

type TestDriver = Driver<LinuxKernel>;

fn net(s: &str) -> IpNetwork {
    s.parse().unwrap()
}

/// A 64-hex-digit Docker-style ID made of `tag` repeated.
fn id(tag: &str) -> String {
    tag.repeat(64 / tag.len())
}

/// Runs `test` in a fresh netns with IPv6 off for new links (exact counters: no
/// autoconfiguration chatter), on a current-thread runtime created inside it.
fn in_netns<F, Fut>(test: F)
where
    F: FnOnce() -> Fut,
    Fut: Future<Output = ()>,
{
    if !require_root() {
        return;
    }
    let _ns = NetNs::enter().unwrap();
    run("sysctl", &["-qw", "net.ipv6.conf.all.disable_ipv6=1"]).unwrap();
    run("sysctl", &["-qw", "net.ipv6.conf.default.disable_ipv6=1"]).unwrap();
    let rt = current_thread_runtime();
    rt.block_on(test());
}

fn open_driver(store_dir: &Path, config: &DatapathConfig) -> TestDriver {
    let datapath = Datapath::load(config).unwrap();
    let kernel = LinuxKernel::new()
        .unwrap()
        .owned_by("slpoltest")
        .with_datapath(datapath);
    Driver::open(
        kernel,
        Store::open(store_dir).unwrap(),
        IpamConfig::default(),
    )
    .unwrap()
}

/// `CreateNetwork` for `subnet` (`10.x.y.0/24`, gateway `.1`) with `-o` options.
async fn create_network(driver: &TestDriver, net_id: &str, subnet: &str, options: &[(&str, &str)]) {
    let gateway = subnet.replace(".0/", ".1/");
    driver
        .create_network(NetworkRequest {
            id: net_id.to_owned(),
            options: options
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            internal: false,
            ipv6: false,
            ipv4: vec![IpData {
                pool: net(subnet),
                gateway: Some(net(&gateway)),
                aux: BTreeMap::new(),
            }],
            ipv6_data: Vec::new(),
        })
        .await
        .unwrap();
}

/// A container stand-in: an endpoint of the driver whose peer veth lives in `ns` as `eth0`.
struct Container {
    ns: PeerNs,
    endpoint_id: String,
    host_veth: String,
    addr: String,
}

/// `CreateEndpoint` with `addr` (`10.x.y.z/24`), then what Docker does at Join: moves the peer
/// into a namespace, names it eth0, sets the address and a default route via the gateway.
async fn create_container(driver: &TestDriver, net_id: &str, ep_id: &str, addr: &str) -> Container {
    driver
        .create_endpoint(EndpointRequest {
            network_id: net_id.to_owned(),
            endpoint_id: ep_id.to_owned(),
            address: Some(net(addr)),
            address_v6: None,
            mac: None,
            options: BTreeMap::new(),
        })
        .await
        .unwrap();
    // The names the endpoint records (a pool link's, or derived from the ID), as Docker
    // learns the container end's from Join.
    let ep = driver
        .endpoints()
        .await
        .into_iter()
        .find(|e| e.id == ep_id)
        .unwrap();
    let ns = PeerNs::spawn().unwrap();
    ns.run("sysctl", &["-qw", "net.ipv6.conf.all.disable_ipv6=1"])
        .unwrap();
    ns.run("sysctl", &["-qw", "net.ipv6.conf.default.disable_ipv6=1"])
        .unwrap();
    let peer = ep.peer_veth;
    run(
        "ip",
        &["link", "set", &peer, "netns", &ns.pid().to_string()],
    )
    .unwrap();
    ns.run("ip", &["link", "set", &peer, "name", "eth0"])
        .unwrap();
    ns.run("ip", &["addr", "add", addr, "dev", "eth0"]).unwrap();
    ns.run("ip", &["link", "set", "eth0", "up"]).unwrap();
    ns.run("ip", &["link", "set", "lo", "up"]).unwrap();
    let gateway = addr.rsplit_once('.').unwrap().0.to_owned() + ".1";
    ns.run("ip", &["route", "add", "default", "via", &gateway])
        .unwrap();
    Container {
        ns,
        endpoint_id: ep_id.to_owned(),
        host_veth: ep.host_veth,
        addr: addr.split('/').next().unwrap().to_owned(),
    }
}

async fn label(driver: &TestDriver, c: &Container, name: &str, labels: &[(&str, &str)]) {
    driver
        .set_container(ContainerIdentity {
            endpoint_id: c.endpoint_id.clone(),
            container_id: id(&format!("{:x}", name.len() + 10)),
            name: name.to_owned(),
            labels: labels
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
        })
        .await
        .unwrap();
}

async fn apply(driver: &TestDriver, yaml: &str) {
    driver
        .apply_policies(parse_documents(yaml).unwrap())
        .await
        .unwrap();
}

async fn counters(driver: &TestDriver, c: &Container) -> EndpointCounters {
    driver
        .kernel()
        .endpoint_counters(&c.host_veth)
        .await
        .unwrap()
}

/// Waits until the counters of `eps` stop moving for 1.5 s (at most 15 s), so that
/// stragglers of earlier traffic or of link set-up (IGMP reports after a link comes up)
/// do not land inside an exact count.
async fn settle(driver: &TestDriver, eps: &[&Container]) {
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut last = Vec::new();
    for c in eps {
        last.push(counters(driver, c).await);
    }
    let mut quiet_since = Instant::now();
    while quiet_since.elapsed() < Duration::from_millis(1500) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let mut now = Vec::new();
        for c in eps {
            now.push(counters(driver, c).await);
        }
        if now != last {
            quiet_since = Instant::now();
            last = now;
        }
    }
}

/// `count` pings at 0.2 s intervals; true when all were answered.
fn pings(from: &Container, to: &str, count: u32) -> bool {
    from.ns
        .run(
            "ping",
            &["-c", &count.to_string(), "-i", "0.2", "-W", "1", "-q", to],
        )
        .is_ok()
}

/// True when a single ping gets answered within `within` (retried).
fn reaches(from: &Container, to: &str, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    loop {
        if pings(from, to, 1) {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn wait_listening(ns: &PeerNs, proto: &str, port: u16) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !ns
        .run(
            "ss",
            &[&format!("-Hl{proto}n"), &format!("sport = :{port}")],
        )
        .unwrap()
        .contains(&port.to_string())
    {
        assert!(
            Instant::now() < deadline,
            "nc never listened on {proto} {port}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn nc_server(ns: &PeerNs, args: &[&str]) -> Child {
    let pid = ns.pid().to_string();
    Command::new("nsenter")
        .args(["-t", &pid, "-n", "nc"])
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

/// `echo hi | nc -N -w 2 ADDR PORT` from `client` to `server`; true if the server got "hi".
fn tcp_hello(client: &Container, server: &Container, port: u16) -> bool {
    let mut srv = nc_server(&server.ns, &["-l", &port.to_string()]);
    wait_listening(&server.ns, "t", port);
    let sent = client
        .ns
        .run(
            "bash",
            &[
                "-c",
                &format!("echo hi | nc -N -w 2 {} {port}", server.addr),
            ],
        )
        .is_ok();
    let _killed = srv.kill();
    let out = srv.wait_with_output().unwrap();
    sent && String::from_utf8_lossy(&out.stdout).contains("hi")
}

/// Sends `count` UDP datagrams from `client` to `server`; true if the server got any.
fn udp_delivered(client: &Container, server: &Container, port: u16, count: u32) -> bool {
    let mut srv = nc_server(&server.ns, &["-u", "-l", &port.to_string()]);
    wait_listening(&server.ns, "u", port);
    let script = format!(
        "for i in $(seq {count}); do echo udp-hello > /dev/udp/{}/{port}; done",
        server.addr
    );
    client.ns.run("bash", &["-c", &script]).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let _killed = srv.kill();
    let out = srv.wait_with_output().unwrap();
    String::from_utf8_lossy(&out.stdout).contains("udp-hello")
}

/// Two labelled endpoints on one network: a (`role=a`, 10.91.1.2) and b (`role=b`, .3).
async fn two_on_one_network(driver: &TestDriver, net_id: &str) -> (Container, Container) {
    create_network(driver, net_id, "10.91.1.0/24", &[]).await;
    let a = create_container(driver, net_id, &id("a1"), "10.91.1.2/24").await;
    let b = create_container(driver, net_id, &id("b1"), "10.91.1.3/24").await;
    label(driver, &a, "ctr-a", &[("role", "a")]).await;
    label(driver, &b, "ctr-b", &[("role", "b")]).await;
    (a, b)
}

const DENY_A_TO_B: &str = "\
name: a-not-to-b
selector: {labels: {role: a}}
egress:
  - action: allow
  - action: deny
    to: [{selector: {labels: {role: b}}}]
";

#[test]
fn deny_blocks_icmp_tcp_udp_with_exact_drop_counts_and_removal_restores() {
    in_netns(|| async {
        let store = tempfile::tempdir().unwrap();
        let driver = open_driver(store.path(), &DatapathConfig::unpinned());
        let (a, b) = two_on_one_network(&driver, &id("11")).await;

        assert!(
            reaches(&a, &b.addr, Duration::from_secs(5)),
            "no ping before policy"
        );
        assert!(tcp_hello(&a, &b, 7001), "no TCP before policy");
        assert!(udp_delivered(&a, &b, 7002, 3), "no UDP before policy");

        apply(&driver, DENY_A_TO_B).await;
        settle(&driver, &[&a, &b]).await;
        let before = counters(&driver, &a).await;
        assert!(!pings(&a, &b.addr, 3), "ping passed the deny");
        let after_ping = counters(&driver, &a).await;
        assert_eq!(
            after_ping.egress.denied.packets - before.egress.denied.packets,
            3,
            "egress drops for 3 denied echo requests: {before:?} -> {after_ping:?}"
        );
        settle(&driver, &[&a, &b]).await;
        let after_ping = counters(&driver, &a).await;
        assert!(!udp_delivered(&a, &b, 7002, 5), "UDP passed the deny");
        let after_udp = counters(&driver, &a).await;
        assert_eq!(
            after_udp.egress.denied.packets - after_ping.egress.denied.packets,
            5,
            "egress drops for 5 denied datagrams: {after_ping:?} -> {after_udp:?}"
        );
        assert!(!tcp_hello(&a, &b, 7001), "TCP passed the deny");
        let after_tcp = counters(&driver, &a).await;
        assert!(after_tcp.egress.denied.packets > after_udp.egress.denied.packets);
        // b never sent anything that was dropped, and the other direction is untouched.
        assert_eq!(counters(&driver, &b).await.egress.denied.packets, 0);

        driver.remove_policy("a-not-to-b").await.unwrap();
        assert!(
            pings(&a, &b.addr, 2),
            "ping still blocked after the policy was removed"
        );
        assert!(tcp_hello(&a, &b, 7001), "TCP still blocked after removal");
        assert!(
            udp_delivered(&a, &b, 7002, 3),
            "UDP still blocked after removal"
        );
        assert_eq!(
            counters(&driver, &a).await.egress.denied.packets,
            after_tcp.egress.denied.packets,
            "drops after removal"
        );
    });
}

#[test]
fn replies_to_allowed_egress_pass_ingress_default_deny() {
    in_netns(|| async {
        let store = tempfile::tempdir().unwrap();
        let driver = open_driver(store.path(), &DatapathConfig::unpinned());
        let (a, b) = two_on_one_network(&driver, &id("22")).await;
        assert!(
            reaches(&b, &a.addr, Duration::from_secs(5)),
            "no ping before policy"
        );

        apply(
            &driver,
            "name: a-closed\nselector: {labels: {role: a}}\ningress: []\n",
        )
        .await;
        // a's own connections: the replies come back through the closed ingress.
        assert!(pings(&a, &b.addr, 3), "replies to a's pings were dropped");
        // Connections to a are refused, and each dropped request is counted once. (Before
        // any TCP: segments of a closed connection arriving late would count too.)
        let before = counters(&driver, &a).await;
        assert!(
            !pings(&b, &a.addr, 4),
            "b reached a through ingress default-deny"
        );
        let after = counters(&driver, &a).await;
        // Each echo request is dropped and counted once (98 bytes each). On a loaded machine
        // one stray packet of b's (a late segment from the set-up traffic) can also arrive
        // during the window and is dropped too, so allow exactly that much noise.
        let dropped = after.ingress.denied.packets - before.ingress.denied.packets;
        let bytes = after.ingress.denied.bytes - before.ingress.denied.bytes;
        assert!(
            (4..=5).contains(&dropped) && bytes >= 4 * 98,
            "ingress drops for 4 echo requests: {before:?} -> {after:?}"
        );
        assert!(tcp_hello(&a, &b, 7101), "a's TCP connection got no replies");
        assert!(!tcp_hello(&b, &a, 7102), "b opened TCP to a");

        driver.remove_policy("a-closed").await.unwrap();
        assert!(pings(&b, &a.addr, 2), "ingress still closed after removal");
    });
}

#[test]
fn networks_are_isolated_unless_isolate_false_even_with_forwarding() {
    in_netns(|| async {
        let store = tempfile::tempdir().unwrap();
        let driver = open_driver(store.path(), &DatapathConfig::unpinned());
        // The host routes between the bridges: only the datapath can keep them apart.
        run("sysctl", &["-qw", "net.ipv4.ip_forward=1"]).unwrap();
        create_network(&driver, &id("31"), "10.92.1.0/24", &[]).await;
        create_network(&driver, &id("32"), "10.92.2.0/24", &[]).await;
        create_network(
            &driver,
            &id("33"),
            "10.92.3.0/24",
            &[("sluice.isolate", "false")],
        )
        .await;
        create_network(
            &driver,
            &id("34"),
            "10.92.4.0/24",
            &[("sluice.isolate", "false")],
        )
        .await;
        let c1 = create_container(&driver, &id("31"), &id("e1"), "10.92.1.2/24").await;
        let c2 = create_container(&driver, &id("32"), &id("e2"), "10.92.2.2/24").await;
        let c3 = create_container(&driver, &id("33"), &id("e3"), "10.92.3.2/24").await;
        let c4 = create_container(&driver, &id("34"), &id("e4"), "10.92.4.2/24").await;

        // Control: the routed path works when isolation is off.
        assert!(
            reaches(&c3, &c4.addr, Duration::from_secs(5)),
            "isolate=false networks not routed"
        );
        assert!(
            tcp_hello(&c3, &c4, 7201),
            "no TCP between isolate=false networks"
        );

        settle(&driver, &[&c1, &c2]).await;
        let before = [counters(&driver, &c1).await, counters(&driver, &c2).await];
        assert!(
            !pings(&c1, &c2.addr, 3),
            "isolated networks reached each other"
        );
        let after = [counters(&driver, &c1).await, counters(&driver, &c2).await];
        let dropped: u64 = before
            .iter()
            .zip(&after)
            .map(|(b, a)| {
                (a.egress.denied.packets - b.egress.denied.packets)
                    + (a.ingress.denied.packets - b.ingress.denied.packets)
            })
            .sum();
        assert_eq!(
            dropped, 3,
            "drops for 3 cross-network pings: {before:?} -> {after:?}"
        );
        assert!(!tcp_hello(&c2, &c1, 7202), "TCP crossed isolated networks");
        // Each isolated network still reaches its own gateway (the host).
        assert!(pings(&c1, "10.92.1.1", 1), "gateway unreachable");
    });
}

#[test]
fn pending_identity_blocks_until_set_container() {
    in_netns(|| async {
        let store = tempfile::tempdir().unwrap();
        let driver = open_driver(store.path(), &DatapathConfig::unpinned());
        let net_id = id("41");
        create_network(&driver, &net_id, "10.93.1.0/24", &[]).await;
        apply(
            &driver,
            &format!(
                "name: db-in\nselector: {{network: {net_id}, labels: {{role: db}}}}\n\
                 ingress:\n  - action: allow\n    from: [{{selector: {{labels: {{role: web}}}}}}]\n"
            ),
        )
        .await;
        let web = create_container(&driver, &net_id, &id("f1"), "10.93.1.2/24").await;
        let db = create_container(&driver, &net_id, &id("f2"), "10.93.1.3/24").await;

        // Names and labels unknown: both fail closed.
        settle(&driver, &[&web, &db]).await;
        let before = counters(&driver, &web).await;
        assert!(!pings(&web, &db.addr, 2), "pending endpoints talked");
        let after = counters(&driver, &web).await;
        assert_eq!(
            after.egress.denied.packets - before.egress.denied.packets,
            2,
            "pending web's drops for 2 echo requests: {before:?} -> {after:?}"
        );

        label(&driver, &web, "web-1", &[("role", "web")]).await;
        assert!(!pings(&web, &db.addr, 2), "db still pending but reachable");
        label(&driver, &db, "db-1", &[("role", "db")]).await;
        assert!(
            pings(&web, &db.addr, 2),
            "resolved identities: web cannot reach db"
        );
    });
}

/// A private bpffs on a temp dir; unmounted on drop.
struct Bpffs {
    dir: tempfile::TempDir,
}

impl Bpffs {
    fn mount() -> Self {
        let dir = tempfile::tempdir().unwrap();
        run("mount", &["-t", "bpf", "bpf", dir.path().to_str().unwrap()]).unwrap();
        Self { dir }
    }

    fn path(&self) -> PathBuf {
        self.dir.path().join("sluice")
    }
}

impl Drop for Bpffs {
    fn drop(&mut self) {
        let _removed = Datapath::remove_pins(&self.path());
        if let Err(e) = run("umount", &[self.dir.path().to_str().unwrap()]) {
            eprintln!("Bpffs: {e:#}");
        }
    }
}

#[test]
fn policy_survives_a_daemon_restart_with_traffic_checked_while_down() {
    in_netns(|| async {
        let bpffs = Bpffs::mount();
        let config = DatapathConfig::pinned(bpffs.path());
        let store = tempfile::tempdir().unwrap();
        let driver = open_driver(store.path(), &config);
        let (a, b) = two_on_one_network(&driver, &id("51")).await;
        assert!(
            reaches(&a, &b.addr, Duration::from_secs(5)),
            "no ping before policy"
        );
        apply(&driver, DENY_A_TO_B).await;
        assert!(!pings(&a, &b.addr, 1), "deny not enforced");
        drop(driver);

        // No daemon: the pinned programs and maps keep enforcing.
        assert!(
            !pings(&a, &b.addr, 2),
            "deny lost while the daemon was down"
        );
        assert!(
            pings(&b, &a.addr, 2),
            "allowed direction broken while the daemon was down"
        );

        let driver = open_driver(store.path(), &config);
        let report = driver.reconcile().await;
        assert!(report.errors.is_empty(), "reconcile: {:?}", report.errors);
        assert_eq!(driver.policies().await.unwrap().len(), 1);
        assert!(!pings(&a, &b.addr, 2), "deny lost after the restart");
        assert!(
            pings(&b, &a.addr, 1),
            "allowed direction broken after the restart"
        );
        driver.remove_policy("a-not-to-b").await.unwrap();
        assert!(
            pings(&a, &b.addr, 2),
            "removal after the restart did not restore traffic"
        );
        drop(driver);
    });
}

/// A `network: <name>` selector, names known through `set_network_names`, then a
/// "restart": network names are persisted, so `Driver::open` + `reconcile` keep the policy
/// (this failed open before they were).
#[test]
fn network_name_policy_survives_a_restart() {
    in_netns(|| async {
        let bpffs = Bpffs::mount();
        let config = DatapathConfig::pinned(bpffs.path());
        let store = tempfile::tempdir().unwrap();
        let driver = open_driver(store.path(), &config);
        let net_id = id("61");
        let (a, b) = two_on_one_network(&driver, &net_id).await;
        driver
            .set_network_names(BTreeMap::from([(net_id.clone(), "appnet".to_owned())]))
            .await
            .unwrap();
        apply(
            &driver,
            "name: b-closed\nselector: {network: appnet, labels: {role: b}}\ningress: []\n",
        )
        .await;
        assert!(
            !pings(&a, &b.addr, 1),
            "policy by network name not enforced"
        );
        drop(driver);
        assert!(
            !pings(&a, &b.addr, 1),
            "deny lost while the daemon was down"
        );

        let driver = open_driver(store.path(), &config);
        let report = driver.reconcile().await;
        assert!(report.errors.is_empty(), "reconcile: {:?}", report.errors);
        assert!(
            !pings(&a, &b.addr, 2),
            "deny lost after the restart (fail open)"
        );
    });
}

/// Policy subjects, checked in the maps: a policy selecting 30 endpoints, with 200 CIDRs and
/// a peer selector, puts each rule in `POLICY` once (not once per endpoint), every selected
/// endpoint's `ENDPOINTS` entry carries the same subject, and an endpoint selected by one
/// more policy gets a subject of its own until that policy goes. (Subnet 10.67.0.0/24.)
#[test]
fn a_policy_over_many_endpoints_costs_its_rules_once_in_the_map() {
    in_netns(|| async {
        let store = tempfile::tempdir().unwrap();
        let driver = open_driver(store.path(), &DatapathConfig::unpinned());
        let net_id = id("67");
        create_network(&driver, &net_id, "10.67.0.0/24", &[]).await;
        let ep_id = |n: u32| id(&format!("67{n:02x}"));
        for n in 0..31 {
            driver
                .create_endpoint(EndpointRequest {
                    network_id: net_id.clone(),
                    endpoint_id: ep_id(n),
                    address: Some(net(&format!("10.67.0.{}/24", 10 + n))),
                    address_v6: None,
                    mac: None,
                    options: BTreeMap::new(),
                })
                .await
                .unwrap();
            // 30 web endpoints and one client.
            let role = if n == 30 { "client" } else { "web" };
            driver
                .set_container(ContainerIdentity {
                    endpoint_id: ep_id(n),
                    container_id: id(&format!("c67{n:02x}")),
                    name: format!("{role}-{n}"),
                    labels: BTreeMap::from([("role".to_owned(), role.to_owned())]),
                })
                .await
                .unwrap();
        }
        let mut yaml = "name: web\nselector: {labels: {role: web}}\ningress:\n  - action: allow\n    from:\n      - selector: {labels: {role: client}}\n".to_owned();
        for i in 0..200 {
            yaml.push_str(&format!(
                "      - cidr: 198.18.{}.{}/32\n",
                i / 250,
                i % 250
            ));
        }
        apply(&driver, &yaml).await;
        let policy_len = || {
            driver
                .kernel()
                .inspect_datapath(|dp| dp.policy_len().ok())
                .unwrap()
                .unwrap()
        };
        let subjects = || async {
            let mut out = BTreeMap::new();
            for ep in driver.endpoints().await {
                let info = driver
                    .kernel()
                    .inspect_datapath(|dp| dp.endpoint(ep.ifindex).ok().flatten())
                    .unwrap()
                    .unwrap();
                out.insert(ep.id, info.subject);
            }
            out
        };
        // 200 CIDRs + the client, for one subject; per endpoint it would be 30 × 201.
        assert_eq!(policy_len(), 201);
        let s = subjects().await;
        let web = s[&ep_id(0)];
        assert_ne!(web, 0);
        assert!((0..30).all(|n| s[&ep_id(n)] == web), "{s:?}");
        assert_eq!(s[&ep_id(30)], 0, "no policy selects the client");

        apply(
            &driver,
            "name: one\nselector: {name: web-3}\negress:\n  - action: deny\n    to: [{cidr: 172.16.0.0/12}]\n",
        )
        .await;
        let s = subjects().await;
        let own = s[&ep_id(3)];
        assert!(own != 0 && own != web && s[&ep_id(4)] == web, "{s:?}");
        // The shared set, plus web-3's own: the same 201 and the deny.
        assert_eq!(policy_len(), 201 + 201 + 1);

        driver.remove_policy("one").await.unwrap();
        assert_eq!(subjects().await[&ep_id(3)], web);
        assert_eq!(policy_len(), 201);
        driver.remove_policy("web").await.unwrap();
        assert_eq!(policy_len(), 0);
        assert!(subjects().await.values().all(|s| *s == 0));
    });
}

/// The spare links of the warm link pool in this namespace: (host end, ifindex, up, master).
/// A spare's container end is in its pool's link group; a claimed one's is not.
fn spare_links() -> Vec<(String, u32, bool, String)> {
    let links = ip_json(&["link", "show"]);
    let links = links.as_array().unwrap();
    links
        .iter()
        .filter(|l| {
            l["ifname"]
                .as_str()
                .unwrap()
                .starts_with(names::POOL_PEER_PREFIX)
                && l["group"].as_str() != Some("default")
        })
        .map(|peer| {
            let host = links
                .iter()
                .find(|l| l["ifname"] == peer["link"])
                .unwrap_or_else(|| panic!("no host end for {peer}"));
            let up = host["flags"]
                .as_array()
                .unwrap()
                .iter()
                .any(|f| f.as_str() == Some("UP"));
            (
                host["ifname"].as_str().unwrap().to_owned(),
                u32::try_from(host["ifindex"].as_u64().unwrap()).unwrap(),
                up,
                host["master"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect()
}

/// The ifindex of link `name` in this namespace.
fn link_index(name: &str) -> u64 {
    ip_json(&["link", "show", "dev", name])[0]["ifindex"]
        .as_u64()
        .unwrap()
}

/// Pinned TCX links left under `bpffs` (one file per program and interface).
fn pinned_links(bpffs: &Bpffs) -> Vec<String> {
    std::fs::read_dir(bpffs.path().join("links"))
        .map(|d| {
            d.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// The warm link pool (`Driver::with_link_pool`): spare pairs sit on the bridge, host end up,
/// with the programs attached (tc filters) but no endpoint entry and their container ends in
/// the pool's link group; endpoints claim them under their pool names, carry traffic and
/// enforce a deny; shutdown and a restart remove the spare links (of the last run) but keep
/// the claimed ones, and deleting everything leaves no link and no pin.
/// (Subnet 10.81.1.0/24.)
#[test]
fn link_pool_endpoints_enforce_policy_and_nothing_leaks() {
    in_netns(|| async {
        let bpffs = Bpffs::mount();
        let config = DatapathConfig::pinned(bpffs.path());
        let store = tempfile::tempdir().unwrap();
        let driver = open_driver(store.path(), &config).with_link_pool(2);
        let net_id = id("81");
        create_network(&driver, &net_id, "10.81.1.0/24", &[]).await;
        assert_eq!(driver.refill_link_pools().await, 2);
        let spares = spare_links();
        assert_eq!(spares.len(), 2, "{spares:?}");
        for (name, ifindex, up, master) in &spares {
            assert!(up, "spare link {name} is down");
            assert_eq!(*master, names::bridge(&net_id), "{name} not on the bridge");
            let (attached, registered) = driver
                .kernel()
                .inspect_datapath(|dp| (dp.is_attached(*ifindex), dp.endpoint(*ifindex).unwrap()))
                .unwrap();
            assert!(attached, "{name} has no programs");
            assert!(
                registered.is_none(),
                "{name} is registered: it would pass traffic"
            );
        }
        let spare_ifindexes: Vec<u32> = spares.iter().map(|s| s.1).collect();

        let a = create_container(&driver, &net_id, &id("a8"), "10.81.1.2/24").await;
        let b = create_container(&driver, &net_id, &id("b8"), "10.81.1.3/24").await;
        // Both came from the pool and kept its names; their container ends left its group.
        assert!(spare_links().is_empty());
        for c in [&a, &b] {
            assert!(names::is_pool_host(&c.host_veth), "{}", c.host_veth);
            let link = &ip_json(&["link", "show", "dev", &c.host_veth])[0];
            let ifindex = u32::try_from(link["ifindex"].as_u64().unwrap()).unwrap();
            assert!(
                spare_ifindexes.contains(&ifindex),
                "{} not from the pool",
                c.host_veth
            );
            assert_eq!(link["master"], names::bridge(&net_id));
        }
        label(&driver, &a, "ctr-a", &[("role", "a")]).await;
        label(&driver, &b, "ctr-b", &[("role", "b")]).await;
        assert!(
            reaches(&a, &b.addr, Duration::from_secs(5)),
            "no ping between pool endpoints"
        );
        apply(&driver, DENY_A_TO_B).await;
        assert!(
            !pings(&a, &b.addr, 2),
            "deny not enforced on pool endpoints"
        );
        assert!(pings(&b, &a.addr, 1), "allowed direction broken");

        // Shutdown removes the spare links (in one request), not the claimed ones.
        let claimed: Vec<u64> = [&a, &b].iter().map(|c| link_index(&c.host_veth)).collect();
        assert_eq!(driver.refill_link_pools().await, 2);
        assert!(driver.drain_link_pools().await.is_empty());
        assert!(spare_links().is_empty(), "spare links survived the drain");
        assert!(pings(&b, &a.addr, 1), "claimed links broken by the drain");
        // Spare links of this run are removed by the next one (programs and pins too); the
        // claimed ones, recorded under their pool names, are kept.
        assert_eq!(driver.refill_link_pools().await, 2);
        let left: Vec<u32> = spare_links().iter().map(|s| s.1).collect();
        assert_eq!(left.len(), 2);
        drop(driver);
        let driver = open_driver(store.path(), &config).with_link_pool(2);
        let report = driver.reconcile().await;
        assert!(report.errors.is_empty(), "reconcile: {:?}", report.errors);
        assert!(spare_links().is_empty(), "spare links survived a restart");
        let kept: Vec<u64> = [&a, &b].iter().map(|c| link_index(&c.host_veth)).collect();
        assert_eq!(
            kept, claimed,
            "claimed pool links did not survive the restart"
        );
        let pins = pinned_links(&bpffs);
        for ifindex in left {
            assert!(
                !pins.iter().any(|p| p.starts_with(&format!("{ifindex}_"))),
                "pins of spare link #{ifindex} survived a restart: {pins:?}"
            );
        }
        assert!(!pings(&a, &b.addr, 1), "deny lost after the restart");

        // Network delete with a full pool: no sluice link and no pin left.
        assert_eq!(driver.refill_link_pools().await, 2);
        for c in [&a, &b] {
            driver
                .delete_endpoint(&net_id, &c.endpoint_id)
                .await
                .unwrap();
        }
        driver.delete_network(&net_id).await.unwrap();
        let leftovers: Vec<String> = link_names()
            .into_iter()
            .filter(|n| names::is_sluice_link(n))
            .collect();
        assert!(leftovers.is_empty(), "links left: {leftovers:?}");
        assert!(
            pinned_links(&bpffs).is_empty(),
            "pins left: {:?}",
            pinned_links(&bpffs)
        );
        drop(driver);
    });
}
