//! Privileged tests of macvlan mode's datapath against the real kernel, in throwaway network
//! namespaces: a "host" namespace (this thread's), a LAN host and a container sandbox
//! ([`PeerNs`]). The macvlan link is made on a veth parent, the programs are attached with
//! [`Datapath::attach_sandboxed`] while the link is still in the host namespace, and then the
//! link is moved into the sandbox and renamed, as Docker does after Join.
//!
//! What they show: the TCX programs go with the link across the move and the rename; they find
//! the endpoint by the ifindex recorded before the move; the directions are right on the
//! container's own interface (what it sends is counted and checked as egress, with the source
//! check); and an interface whose endpoint entry is missing passes nothing (fail closed).

#![allow(
    clippy::unwrap_used,
    reason = "test helpers outside #[test] fns panic on failure, like the tests"
)]

use ipnetwork::IpNetwork;
use sluice_driver::datapath::layout::{EP_SOURCE_CHECK, EndpointInfo, IpInfo};
use sluice_driver::datapath::{Datapath, DatapathConfig};
use sluice_tests::netns::{NetNs, PeerNs, ip_json, require_root, run};

fn ifindex(name: &str) -> u32 {
    let v = ip_json(&["link", "show", "dev", name]);
    u32::try_from(v[0]["ifindex"].as_u64().unwrap()).unwrap()
}

fn pings(ns: &PeerNs, target: &str) -> bool {
    ns.run("ping", &["-c1", "-W2", target]).is_ok()
}

#[test]
fn programs_follow_the_link_into_the_sandbox_and_fail_closed_without_an_entry() {
    if !require_root() {
        return;
    }
    let _host = NetNs::enter().unwrap();
    let lan = PeerNs::spawn().unwrap();
    let sandbox = PeerNs::spawn().unwrap();
    // The parent: a veth whose other end is the LAN host (10.78.9.1).
    run(
        "ip",
        &[
            "link", "add", "par", "type", "veth", "peer", "name", "lanif",
        ],
    )
    .unwrap();
    run(
        "ip",
        &["link", "set", "lanif", "netns", &lan.pid().to_string()],
    )
    .unwrap();
    run("ip", &["link", "set", "par", "up"]).unwrap();
    lan.run("ip", &["addr", "add", "10.78.9.1/24", "dev", "lanif"])
        .unwrap();
    lan.run("ip", &["link", "set", "lanif", "up"]).unwrap();

    // The endpoint's link, made in the host namespace with its programs on, as CreateEndpoint
    // does; not registered in the endpoints map yet.
    run(
        "ip",
        &[
            "link", "add", "slmvtest", "link", "par", "type", "macvlan", "mode", "bridge",
        ],
    )
    .unwrap();
    let index = ifindex("slmvtest");
    let mut dp = Datapath::load(&DatapathConfig::unpinned()).unwrap();
    dp.attach_sandboxed(index).unwrap();

    // Docker moves it into the sandbox and renames it.
    run(
        "ip",
        &[
            "link",
            "set",
            "slmvtest",
            "netns",
            &sandbox.pid().to_string(),
        ],
    )
    .unwrap();
    sandbox
        .run("ip", &["link", "set", "slmvtest", "name", "eth0"])
        .unwrap();
    sandbox
        .run("ip", &["addr", "add", "10.78.9.2/24", "dev", "eth0"])
        .unwrap();
    sandbox.run("ip", &["link", "set", "eth0", "up"]).unwrap();
    let moved = sandbox
        .run("ip", &["-j", "link", "show", "dev", "eth0"])
        .unwrap();
    let moved: serde_json::Value = serde_json::from_str(&moved).unwrap();
    assert_eq!(
        moved[0]["ifindex"].as_u64(),
        Some(u64::from(index)),
        "the link kept its ifindex across the move"
    );

    // Fail closed: programs on, no entry.
    assert!(
        !pings(&sandbox, "10.78.9.1"),
        "an unregistered macvlan passed traffic"
    );

    // Registered under the ifindex it had in the host namespace: traffic flows, and the
    // source check (egress only) proves the directions: were the hooks swapped, the replies
    // it receives would be checked as if it had sent them, and dropped.
    let info =
        EndpointInfo::new(300, 1, EP_SOURCE_CHECK).with_addresses(Some([10, 78, 9, 2]), None);
    dp.set_endpoint(index, info).unwrap();
    let me: IpNetwork = "10.78.9.2/32".parse().unwrap();
    dp.set_ip(
        me,
        IpInfo {
            identity: 300,
            network: 1,
        },
    )
    .unwrap();
    // The refused ping left an unresolved neighbour entry whose retries run on their own
    // clock: start the resolution afresh so the next ping does not wait behind them.
    sandbox
        .run("ip", &["neigh", "flush", "dev", "eth0"])
        .unwrap();
    assert!(
        pings(&sandbox, "10.78.9.1"),
        "the registered macvlan does not pass traffic"
    );
    let counters = dp.read_counters(index).unwrap();
    assert!(counters.egress.allowed.packets > 0, "{counters:?}");
    assert!(counters.ingress.allowed.packets > 0, "{counters:?}");
    assert_eq!(counters.egress.denied.packets, 0, "{counters:?}");

    // A spoofed source is dropped on the way out.
    sandbox
        .run("ip", &["addr", "add", "10.78.9.3/24", "dev", "eth0"])
        .unwrap();
    let spoofed = sandbox.run("ping", &["-c1", "-W1", "-I", "10.78.9.3", "10.78.9.1"]);
    assert!(spoofed.is_err(), "a spoofed source got through");
    assert!(
        dp.read_counters(index).unwrap().egress.denied.packets > 0,
        "the spoofed packet was not counted as an egress drop"
    );

    // Entry gone (endpoint being deleted): closed again.
    dp.remove_endpoint(index).unwrap();
    assert!(
        !pings(&sandbox, "10.78.9.1"),
        "traffic passed after the entry was removed"
    );
    dp.detach(index).unwrap();
    assert!(
        pings(&sandbox, "10.78.9.1"),
        "detaching did not remove the programs"
    );
}
