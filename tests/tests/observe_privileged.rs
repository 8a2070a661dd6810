//! Privileged end-to-end test of observability through sluice's own [`Driver`] with the real
//! [`LinuxKernel`] and eBPF datapath: drop events read from the ring buffer, described with
//! the container and the policy rule, kept in the daemon's flow log, and the endpoint status
//! and metrics with the datapath's counters.
//!
//! `cargo test -p sluice-tests --test observe_privileged` (as root; without root the test
//! prints "skipped: needs root").

#![allow(
    clippy::unwrap_used,
    reason = "test helpers outside #[test] fns panic on failure, like the tests"
)]

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use ipnetwork::IpNetwork;
use sluice_driver::Driver;
use sluice_driver::bridge::LinuxKernel;
use sluice_driver::datapath::{Datapath, DatapathConfig};
use sluice_driver::ipam::IpamConfig;
use sluice_driver::model::{ContainerIdentity, EndpointRequest, IpData, NetworkRequest};
use sluice_driver::names;
use sluice_driver::policy::parse_documents;
use sluice_driver::status::DropReason;
use sluice_driver::store::Store;
use sluice_plugin::observe::{
    FlowLog, format_endpoints, format_flow, render_metrics, spawn_drop_reader,
};
use sluice_tests::netns::{NetNs, PeerNs, current_thread_runtime, require_root, run};

type TestDriver = Driver<LinuxKernel>;

fn net(s: &str) -> IpNetwork {
    s.parse().unwrap()
}

fn id(tag: &str) -> String {
    tag.repeat(64 / tag.len())
}

/// `CreateEndpoint`, then what Docker does at Join (peer into a namespace as eth0, address,
/// default route), then the container's identity.
async fn container(
    driver: &TestDriver,
    net_id: &str,
    ep_id: &str,
    addr: &str,
    name: &str,
    role: &str,
) -> PeerNs {
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
    let ns = PeerNs::spawn().unwrap();
    ns.run("sysctl", &["-qw", "net.ipv6.conf.all.disable_ipv6=1"])
        .unwrap();
    let peer = names::peer_veth(ep_id);
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
    driver
        .set_container(ContainerIdentity {
            endpoint_id: ep_id.to_owned(),
            container_id: id("c"),
            name: name.to_owned(),
            labels: [("role".to_owned(), role.to_owned())].into(),
        })
        .await
        .unwrap();
    ns
}

#[test]
fn drops_become_flows_with_rule_names_and_counters_reach_status_and_metrics() {
    if !require_root() {
        return;
    }
    let _ns = NetNs::enter().unwrap();
    run("sysctl", &["-qw", "net.ipv6.conf.all.disable_ipv6=1"]).unwrap();
    run("sysctl", &["-qw", "net.ipv6.conf.default.disable_ipv6=1"]).unwrap();
    let rt = current_thread_runtime();
    rt.block_on(async {
        let store = tempfile::tempdir().unwrap();
        let kernel = LinuxKernel::new()
            .unwrap()
            .owned_by("slobstest")
            .with_datapath(Datapath::load(&DatapathConfig::unpinned()).unwrap());
        let events = kernel.drop_events().unwrap().expect("a datapath has events");
        assert!(kernel.drop_events().is_err(), "the reader is handed out once");
        let driver = Arc::new(
            Driver::open(kernel, Store::open(store.path()).unwrap(), IpamConfig::default())
                .unwrap(),
        );
        let log = Arc::new(FlowLog::new(100));
        let reader = spawn_drop_reader(events, driver.clone(), log.clone());

        let net_id = id("0b");
        driver
            .create_network(NetworkRequest {
                id: net_id.clone(),
                options: BTreeMap::new(),
                internal: false,
                ipv6: false,
                ipv4: vec![IpData {
                    pool: net("10.93.1.0/24"),
                    gateway: Some(net("10.93.1.1/24")),
                    aux: BTreeMap::new(),
                }],
                ipv6_data: Vec::new(),
            })
            .await
            .unwrap();
        let a = container(&driver, &net_id, &id("a7"), "10.93.1.2/24", "ctr-a", "a").await;
        let _b = container(&driver, &net_id, &id("b7"), "10.93.1.3/24", "ctr-b", "b").await;
        driver
            .apply_policies(
                parse_documents(
                    "name: a-not-to-b\nselector: {labels: {role: a}}\negress:\n  - action: deny\n    to: [{selector: {labels: {role: b}}}]\n  - action: allow\n",
                )
                .unwrap(),
            )
            .await
            .unwrap();

        assert!(
            a.run("ping", &["-c", "3", "-i", "0.2", "-W", "1", "-q", "10.93.1.3"])
                .is_err(),
            "ping passed the deny"
        );
        // The reader runs on this runtime: give it the events.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while log.recent().iter().filter(|r| r.proto == 1).count() < 3
            && std::time::Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let flows: Vec<_> = log.recent().into_iter().filter(|r| r.proto == 1).collect();
        assert!(flows.len() + flows.iter().map(|r| r.suppressed as usize).sum::<usize>() >= 3, "{flows:?}");
        let f = &flows[0];
        assert_eq!(f.reason, DropReason::PolicyDeny, "{f:?}");
        assert_eq!(f.rule.as_deref(), Some("a-not-to-b egress[0]"));
        assert_eq!(f.container.as_deref(), Some("ctr-a"));
        assert_eq!(f.endpoint.as_deref(), Some(id("a7").as_str()));
        let line = format_flow(f);
        assert!(
            line.contains(" egress  10.93.1.2 -> 10.93.1.3 icmp 8/0 ctr-a (a7a7a7a7a7a7) policy deny: a-not-to-b egress[0]"),
            "{line}"
        );

        let status = driver.status().await;
        assert_eq!(status.policies, 1);
        let ep = status.endpoints.iter().find(|e| e.id == id("a7")).unwrap();
        assert!(ep.egress.dropped.packets >= 3, "{ep:?}");
        assert!(ep.egress.dropped.bytes >= 3 * 98, "{ep:?}");
        assert!(ep.flags.contains(&"egress-enforced".to_owned()), "{ep:?}");
        assert_eq!(ep.counters_error, None);
        let table = format_endpoints(&status.endpoints);
        assert!(table.lines().any(|l| l.starts_with("a7a7a7a7a7a7  ctr-a")), "{table}");
        let metrics = render_metrics(&status, &log);
        let dropped = format!(
            "sluice_endpoint_packets_total{{endpoint=\"{}\",container=\"ctr-a\",network=\"{net_id}\",direction=\"egress\",verdict=\"dropped\"}} {}",
            id("a7"),
            ep.egress.dropped.packets
        );
        assert!(metrics.lines().any(|l| l == dropped), "{metrics}");
        assert!(metrics.contains("sluice_drop_events_total{reason=\"policy_deny\"} "));
        reader.abort();
    });
}
