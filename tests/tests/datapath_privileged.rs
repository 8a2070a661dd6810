//! Privileged tests of the eBPF datapath (`sluice_driver::datapath`) against the real kernel.
//!
//! - `run_*`: verdicts of the TC programs on crafted IPv4/IPv6 frames through
//!   `BPF_PROG_TEST_RUN`, with unpinned maps, in a throwaway network namespace (the run's
//!   `skb->dev` must exist there: `lo` and a veth stand in for two endpoints' host veths).
//! - `traffic_*`: two "containers" ([`PeerNs`]) on a bridge through veth pairs, host ends on
//!   the bridge as sluice builds them, programs attached through TCX and pinned in a private
//!   bpffs; real `ping`, `nc` and UDP traffic, counters, drop events, detach, and a
//!   "daemon restart" that adopts pinned maps and links.
//! - `bench_*` (ignored): ns/packet under `BPF_PROG_TEST_RUN` with 1k/10k/100k policy
//!   entries (`cargo test -p sluice-tests --test datapath_privileged -- --ignored --nocapture`).
//!
//! Without root they skip; CI runs them as root.

#![allow(
    clippy::unwrap_used,
    reason = "test helpers outside #[test] fns panic on failure, like the tests"
)]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ipnetwork::IpNetwork;
use sluice_driver::datapath::compile::{
    Action, CidrIdentities, Direction, Peer, PortRange, Protocol, Rule, compile,
};
use sluice_driver::datapath::layout::{
    DIR_EGRESS, DIR_INGRESS, DropEvent, EP_EGRESS_ENFORCED, EP_IDENTITY_PENDING,
    EP_INGRESS_ENFORCED, EP_ISOLATE, EP_SOURCE_CHECK, EndpointInfo, IpInfo, REASON_DEFAULT_DENY,
    REASON_IDENTITY_PENDING, REASON_ISOLATION, REASON_MALFORMED, REASON_NOT_IP, REASON_POLICY_DENY,
    REASON_SPOOFED, Settings,
};
use sluice_driver::datapath::{
    Datapath, DatapathConfig, DatapathError, LAYOUT_VERSION, TC_ACT_OK, TC_ACT_SHOT, event_addr,
    tc_programs,
};
use sluice_tests::netns::{NetNs, PeerNs, current_thread_runtime, ip_json, require_root, run};

// ---------------------------------------------------------------------------------------------
// Frames

const TCP_SYN: u8 = 0x02;
const TCP_SYN_ACK: u8 = 0x12;
const TCP_ACK: u8 = 0x10;

fn ethernet(ethertype: u16) -> Vec<u8> {
    let mut f = vec![0x02, 0, 0, 0, 0, 0x02, 0x02, 0, 0, 0, 0, 0x01];
    f.extend_from_slice(&ethertype.to_be_bytes());
    f
}

fn tcp(sport: u16, dport: u16, flags: u8) -> Vec<u8> {
    let mut h = vec![0u8; 20];
    h[0..2].copy_from_slice(&sport.to_be_bytes());
    h[2..4].copy_from_slice(&dport.to_be_bytes());
    h[12] = 5 << 4;
    h[13] = flags;
    h[14..16].copy_from_slice(&64240u16.to_be_bytes());
    h
}

fn udp(sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let mut h = vec![0u8; 8];
    h[0..2].copy_from_slice(&sport.to_be_bytes());
    h[2..4].copy_from_slice(&dport.to_be_bytes());
    let len = u16::try_from(8 + payload.len()).unwrap();
    h[4..6].copy_from_slice(&len.to_be_bytes());
    h.extend_from_slice(payload);
    h
}

/// ICMP or ICMPv6 header: type, code, checksum 0, then `id`/`seq` (echo) or zeros.
fn icmp(ty: u8, code: u8, id: u16, seq: u16) -> Vec<u8> {
    let mut h = vec![ty, code, 0, 0];
    h.extend_from_slice(&id.to_be_bytes());
    h.extend_from_slice(&seq.to_be_bytes());
    h.extend_from_slice(&[0u8; 16]);
    h
}

fn ipv4(src: &str, dst: &str, proto: u8, l4: &[u8]) -> Vec<u8> {
    let src: Ipv4Addr = src.parse().unwrap();
    let dst: Ipv4Addr = dst.parse().unwrap();
    let mut f = ethernet(0x0800);
    let total = u16::try_from(20 + l4.len()).unwrap();
    let mut h = vec![0x45, 0];
    h.extend_from_slice(&total.to_be_bytes());
    h.extend_from_slice(&[0, 1, 0x40, 0, 64, proto, 0, 0]);
    h.extend_from_slice(&src.octets());
    h.extend_from_slice(&dst.octets());
    f.extend_from_slice(&h);
    f.extend_from_slice(l4);
    f
}

fn ipv6(src: &str, dst: &str, next: u8, l4: &[u8]) -> Vec<u8> {
    let src: Ipv6Addr = src.parse().unwrap();
    let dst: Ipv6Addr = dst.parse().unwrap();
    let mut f = ethernet(0x86dd);
    let mut h = vec![0x60, 0, 0, 0];
    h.extend_from_slice(&u16::try_from(l4.len()).unwrap().to_be_bytes());
    h.extend_from_slice(&[next, 64]);
    h.extend_from_slice(&src.octets());
    h.extend_from_slice(&dst.octets());
    f.extend_from_slice(&h);
    f.extend_from_slice(l4);
    f
}

/// A Hop-by-Hop Options header (Router Alert, as MLD uses) followed by `next`'s payload.
fn hop_by_hop(next: u8, l4: &[u8]) -> Vec<u8> {
    let mut h = vec![next, 0, 5, 2, 0, 0, 1, 0];
    h.extend_from_slice(l4);
    h
}

fn arp_request() -> Vec<u8> {
    let mut f = ethernet(0x0806);
    f.extend_from_slice(&[0, 1, 0x08, 0, 6, 4, 0, 1]);
    f.extend_from_slice(&[0x02, 0, 0, 0, 0, 1, 10, 0, 0, 1]);
    f.extend_from_slice(&[0, 0, 0, 0, 0, 0, 10, 0, 0, 2]);
    f
}

// ---------------------------------------------------------------------------------------------
// BPF_PROG_TEST_RUN lab

const A_ID: u32 = 300;
const B_ID: u32 = 301;
const C_ID: u32 = 302;
const NET1: u32 = 1;
const NET2: u32 = 2;
const A4: &str = "10.0.0.1";
const B4: &str = "10.0.0.2";
const C4: &str = "10.1.0.3";
const A6: &str = "fd00::1";
const B6: &str = "fd00::2";

fn net(s: &str) -> IpNetwork {
    s.parse().unwrap()
}

fn host(s: &str) -> IpNetwork {
    IpNetwork::from(s.parse::<IpAddr>().unwrap())
}

fn ifindex(name: &str) -> u32 {
    let v = ip_json(&["link", "show", "dev", name]);
    u32::try_from(v[0]["ifindex"].as_u64().unwrap()).unwrap()
}

/// A datapath with unpinned maps in a fresh netns. Endpoint A is `lo` (ifindex 1), endpoint B
/// a veth end; C is an endpoint of another network known only to the ipcache.
struct Lab {
    dp: Datapath,
    a: u32,
    b: u32,
    _ns: NetNs,
}

impl Lab {
    fn new() -> Option<Self> {
        if !require_root() {
            return None;
        }
        let ns = NetNs::enter().unwrap();
        run(
            "ip",
            &["link", "add", "tb", "type", "veth", "peer", "name", "tbp"],
        )
        .unwrap();
        let b = ifindex("tb");
        let mut dp = Datapath::load(&DatapathConfig::unpinned()).unwrap();
        for (addr, identity, network) in [
            (A4, A_ID, NET1),
            (A6, A_ID, NET1),
            (B4, B_ID, NET1),
            (B6, B_ID, NET1),
            (C4, C_ID, NET2),
        ] {
            dp.set_ip(host(addr), IpInfo { identity, network }).unwrap();
        }
        dp.set_endpoint(1, EndpointInfo::new(A_ID, NET1, 0))
            .unwrap();
        dp.set_endpoint(b, EndpointInfo::new(B_ID, NET1, 0))
            .unwrap();
        Some(Self {
            dp,
            a: 1,
            b,
            _ns: ns,
        })
    }

    fn flags(&mut self, ifindex: u32, flags: u32) {
        let ep = self.dp.endpoint(ifindex).unwrap().unwrap();
        self.dp
            .set_endpoint(ifindex, EndpointInfo::new(ep.identity, ep.network, flags))
            .unwrap();
    }

    fn policy(&mut self, rules: &[Rule]) {
        let compiled = compile(rules, &mut CidrIdentities::default()).unwrap();
        self.dp.apply_policy(&compiled).unwrap();
    }

    /// What endpoint `ifindex` *sends* (its egress program).
    #[track_caller]
    fn sends(&self, ifindex: u32, frame: &[u8]) -> u32 {
        self.dp
            .test_run(Direction::Egress, frame, ifindex, 1)
            .unwrap()
            .action
    }

    /// What endpoint `ifindex` *receives* (its ingress program).
    #[track_caller]
    fn receives(&self, ifindex: u32, frame: &[u8]) -> u32 {
        self.dp
            .test_run(Direction::Ingress, frame, ifindex, 1)
            .unwrap()
            .action
    }
}

fn rule(id: u32, subject: u32, direction: Direction, peer: Peer, protocol: Protocol) -> Rule {
    Rule {
        id,
        subjects: vec![subject],
        direction,
        peer,
        protocol,
        ports: None,
        action: Action::Allow,
    }
}

fn ports(mut r: Rule, first: u16, last: u16) -> Rule {
    r.ports = Some(PortRange { first, last });
    r
}

fn deny(mut r: Rule) -> Rule {
    r.action = Action::Deny;
    r
}

/// Every event queued now (needs a tokio runtime: `rt.block_on`).
fn drain(events: &mut sluice_driver::datapath::DropEvents) -> Vec<DropEvent> {
    std::iter::from_fn(|| events.try_next()).collect()
}

#[test]
fn run_no_policy_passes_everything_and_unknown_ifindex_passes() {
    let Some(lab) = Lab::new() else { return };
    let syn = ipv4(A4, B4, 6, &tcp(40000, 80, TCP_SYN));
    assert_eq!(lab.sends(lab.a, &syn), TC_ACT_OK);
    assert_eq!(lab.receives(lab.b, &syn), TC_ACT_OK);
    assert_eq!(
        lab.receives(lab.b, &ipv6(A6, B6, 17, &udp(1, 53, b"q"))),
        TC_ACT_OK
    );
    // No conntrack entries without enforcement.
    assert!(lab.dp.conntrack_entries(lab.a).unwrap().is_empty());
    // An interface that is not an endpoint: untouched and uncounted.
    run(
        "ip",
        &[
            "link", "add", "tunk", "type", "veth", "peer", "name", "tunkp",
        ],
    )
    .unwrap();
    let x = ifindex("tunk");
    assert_eq!(lab.receives(x, &syn), TC_ACT_OK);
    assert_eq!(lab.dp.read_counters(x).unwrap(), Default::default());
    let c = lab.dp.read_counters(lab.a).unwrap();
    assert_eq!(c.egress.allowed.packets, 1);
    assert_eq!(c.egress.allowed.bytes, syn.len() as u64);
}

#[test]
fn run_allow_by_identity_and_default_deny_when_enforced() {
    let Some(mut lab) = Lab::new() else { return };
    lab.policy(&[ports(
        rule(
            1,
            B_ID,
            Direction::Ingress,
            Peer::Identity(A_ID),
            Protocol::Tcp,
        ),
        80,
        80,
    )]);
    // Not enforced yet: everything passes.
    let to_81 = ipv4(A4, B4, 6, &tcp(40001, 81, TCP_SYN));
    assert_eq!(lab.receives(lab.b, &to_81), TC_ACT_OK);

    lab.flags(lab.b, EP_INGRESS_ENFORCED);
    assert_eq!(
        lab.receives(lab.b, &ipv4(A4, B4, 6, &tcp(40002, 80, TCP_SYN))),
        TC_ACT_OK
    );
    assert_eq!(
        lab.receives(lab.b, &ipv4(A4, B4, 6, &tcp(40003, 81, TCP_SYN))),
        TC_ACT_SHOT
    );
    assert_eq!(
        lab.receives(lab.b, &ipv4(A4, B4, 17, &udp(40004, 80, b"x"))),
        TC_ACT_SHOT
    );
    // Same port from WORLD (not in the ipcache) and from C: default deny.
    assert_eq!(
        lab.receives(lab.b, &ipv4("192.0.2.9", B4, 6, &tcp(40005, 80, TCP_SYN))),
        TC_ACT_SHOT
    );
    assert_eq!(
        lab.receives(lab.b, &ipv4(C4, B4, 6, &tcp(40006, 80, TCP_SYN))),
        TC_ACT_SHOT
    );
    // IPv6 from A is A's identity too.
    assert_eq!(
        lab.receives(lab.b, &ipv6(A6, B6, 6, &tcp(40007, 80, TCP_SYN))),
        TC_ACT_OK
    );
    assert_eq!(
        lab.receives(lab.b, &ipv6(A6, B6, 6, &tcp(40008, 443, TCP_SYN))),
        TC_ACT_SHOT
    );
    // Egress is not enforced: B may send anything.
    assert_eq!(
        lab.sends(lab.b, &ipv4(B4, "192.0.2.9", 17, &udp(5000, 53, b"q"))),
        TC_ACT_OK
    );

    let c = lab.dp.read_counters(lab.b).unwrap();
    assert_eq!(c.ingress.allowed.packets, 3, "{c:?}");
    assert_eq!(c.ingress.denied.packets, 5, "{c:?}");
    assert_eq!(c.egress.allowed.packets, 1, "{c:?}");
}

#[test]
fn run_deny_by_cidr_v4_and_v6() {
    let Some(mut lab) = Lab::new() else { return };
    lab.flags(lab.a, EP_EGRESS_ENFORCED);
    lab.policy(&[
        rule(1, A_ID, Direction::Egress, Peer::Any, Protocol::Any),
        deny(rule(
            7,
            A_ID,
            Direction::Egress,
            Peer::Cidr(net("192.0.2.0/24")),
            Protocol::Any,
        )),
        deny(rule(
            8,
            A_ID,
            Direction::Egress,
            Peer::Cidr(net("2001:db8::/32")),
            Protocol::Any,
        )),
    ]);
    let rt = current_thread_runtime();
    let mut events = rt.block_on(async { lab.dp.drop_events() }).unwrap();

    assert_eq!(
        lab.sends(lab.a, &ipv4(A4, "192.0.2.7", 6, &tcp(40000, 443, TCP_SYN))),
        TC_ACT_SHOT
    );
    assert_eq!(
        lab.sends(
            lab.a,
            &ipv4(A4, "198.51.100.1", 6, &tcp(40000, 443, TCP_SYN))
        ),
        TC_ACT_OK
    );
    assert_eq!(
        lab.sends(lab.a, &ipv6(A6, "2001:db8::1", 17, &udp(1, 53, b"q"))),
        TC_ACT_SHOT
    );
    assert_eq!(
        lab.sends(lab.a, &ipv6(A6, "2001:db9::1", 17, &udp(1, 53, b"q"))),
        TC_ACT_OK
    );
    // Endpoints keep their own identity even inside a denied CIDR (CIDR rules are for
    // addresses outside sluice).
    assert_eq!(
        lab.sends(lab.a, &ipv4(A4, B4, 17, &udp(1, 53, b"q"))),
        TC_ACT_OK
    );

    let got = rt.block_on(async { drain(&mut events) });
    assert_eq!(got.len(), 2, "{got:?}");
    assert_eq!(got[0].rule_id, 7);
    assert_eq!(got[0].reason, REASON_POLICY_DENY);
    assert_eq!(got[0].direction, DIR_EGRESS);
    assert_eq!(got[0].ifindex, lab.a);
    assert_eq!(
        event_addr(got[0].dst_addr, got[0].family),
        "192.0.2.7".parse::<IpAddr>().unwrap()
    );
    assert_eq!(got[0].dst_port, 443);
    assert_eq!(got[1].rule_id, 8);
    assert_eq!(
        event_addr(got[1].dst_addr, got[1].family),
        "2001:db8::1".parse::<IpAddr>().unwrap()
    );
}

#[test]
fn run_deny_wins() {
    let Some(mut lab) = Lab::new() else { return };
    lab.flags(lab.b, EP_INGRESS_ENFORCED);
    lab.policy(&[
        // Allow A everything over TCP; deny port 22 from anyone; deny A's UDP 5000-5999.
        rule(
            1,
            B_ID,
            Direction::Ingress,
            Peer::Identity(A_ID),
            Protocol::Tcp,
        ),
        deny(ports(
            rule(2, B_ID, Direction::Ingress, Peer::Any, Protocol::Tcp),
            22,
            22,
        )),
        ports(
            rule(
                3,
                B_ID,
                Direction::Ingress,
                Peer::Identity(A_ID),
                Protocol::Udp,
            ),
            1,
            65535,
        ),
        deny(ports(
            rule(
                4,
                B_ID,
                Direction::Ingress,
                Peer::Identity(A_ID),
                Protocol::Udp,
            ),
            5000,
            5999,
        )),
    ]);
    let rt = current_thread_runtime();
    let mut events = rt.block_on(async { lab.dp.drop_events() }).unwrap();
    assert_eq!(
        lab.receives(lab.b, &ipv4(A4, B4, 6, &tcp(40000, 80, TCP_SYN))),
        TC_ACT_OK
    );
    assert_eq!(
        lab.receives(lab.b, &ipv4(A4, B4, 6, &tcp(40001, 22, TCP_SYN))),
        TC_ACT_SHOT
    );
    assert_eq!(
        lab.receives(lab.b, &ipv4(A4, B4, 17, &udp(40002, 4999, b"x"))),
        TC_ACT_OK
    );
    assert_eq!(
        lab.receives(lab.b, &ipv4(A4, B4, 17, &udp(40003, 5000, b"x"))),
        TC_ACT_SHOT
    );
    assert_eq!(
        lab.receives(lab.b, &ipv4(A4, B4, 17, &udp(40004, 5999, b"x"))),
        TC_ACT_SHOT
    );
    assert_eq!(
        lab.receives(lab.b, &ipv4(A4, B4, 17, &udp(40005, 6000, b"x"))),
        TC_ACT_OK
    );
    // A Hop-by-Hop header in front of TCP does not hide the port.
    let hbh = ipv6(A6, B6, 0, &hop_by_hop(6, &tcp(40006, 22, TCP_SYN)));
    assert_eq!(lab.receives(lab.b, &hbh), TC_ACT_SHOT);
    let hbh = ipv6(A6, B6, 0, &hop_by_hop(6, &tcp(40007, 23, TCP_SYN)));
    assert_eq!(lab.receives(lab.b, &hbh), TC_ACT_OK);
    let ids: Vec<u32> = rt
        .block_on(async { drain(&mut events) })
        .iter()
        .map(|e| e.rule_id)
        .collect();
    assert_eq!(ids, vec![2, 4, 4, 2]);
}

#[test]
fn run_conntrack_lets_replies_through_both_ways() {
    let Some(mut lab) = Lab::new() else { return };
    // A: ingress default-deny with no rules. B: ingress allows A on 5432 only.
    lab.flags(lab.a, EP_INGRESS_ENFORCED);
    lab.flags(lab.b, EP_INGRESS_ENFORCED);
    lab.policy(&[ports(
        rule(
            1,
            B_ID,
            Direction::Ingress,
            Peer::Identity(A_ID),
            Protocol::Tcp,
        ),
        5432,
        5432,
    )]);

    let syn = ipv4(A4, B4, 6, &tcp(41000, 5432, TCP_SYN));
    let syn_ack = ipv4(B4, A4, 6, &tcp(5432, 41000, TCP_SYN_ACK));
    let ack = ipv4(A4, B4, 6, &tcp(41000, 5432, TCP_ACK));
    // Before the flow exists, B's "reply" is a new flow into A: denied.
    assert_eq!(lab.receives(lab.a, &syn_ack), TC_ACT_SHOT);
    // A sends (egress not enforced: tracked), B receives (allowed: tracked).
    assert_eq!(lab.sends(lab.a, &syn), TC_ACT_OK);
    assert_eq!(lab.receives(lab.b, &syn), TC_ACT_OK);
    // B answers (egress not enforced), A receives the reply: conntrack.
    assert_eq!(lab.sends(lab.b, &syn_ack), TC_ACT_OK);
    assert_eq!(lab.receives(lab.a, &syn_ack), TC_ACT_OK);
    assert_eq!(lab.receives(lab.b, &ack), TC_ACT_OK);
    // A different source port is another flow: denied into A.
    assert_eq!(
        lab.receives(lab.a, &ipv4(B4, A4, 6, &tcp(5432, 41001, TCP_SYN_ACK))),
        TC_ACT_SHOT
    );
    // B starting its own flow to A is denied, but not B→A replies on 5432.
    assert_eq!(
        lab.receives(lab.a, &ipv4(B4, A4, 6, &tcp(41002, 22, TCP_SYN))),
        TC_ACT_SHOT
    );

    let a_ct = lab.dp.conntrack_entries(lab.a).unwrap();
    assert_eq!(a_ct.len(), 1, "{a_ct:?}");
    assert_eq!(a_ct[0].1.origin, DIR_EGRESS);
    assert_eq!(a_ct[0].0.local_port, 41000);
    assert_eq!(a_ct[0].0.remote_port, 5432);
    let b_ct = lab.dp.conntrack_entries(lab.b).unwrap();
    assert_eq!(b_ct.len(), 1);
    assert_eq!(b_ct[0].1.origin, DIR_INGRESS);

    // ICMP echo out to the world from A, and the reply back in (A's ingress is default-deny).
    let v4_req = ipv4(A4, "192.0.2.1", 1, &icmp(8, 0, 77, 1));
    let v4_rep = ipv4("192.0.2.1", A4, 1, &icmp(0, 0, 77, 1));
    assert_eq!(lab.receives(lab.a, &v4_rep), TC_ACT_SHOT);
    assert_eq!(lab.sends(lab.a, &v4_req), TC_ACT_OK);
    assert_eq!(lab.receives(lab.a, &v4_rep), TC_ACT_OK);
    let v6_req = ipv6(A6, "2001:db8::1", 58, &icmp(128, 0, 78, 1));
    let v6_rep = ipv6("2001:db8::1", A6, 58, &icmp(129, 0, 78, 1));
    assert_eq!(lab.sends(lab.a, &v6_req), TC_ACT_OK);
    assert_eq!(lab.receives(lab.a, &v6_rep), TC_ACT_OK);

    // Removing the endpoint forgets its flows.
    let slot = lab.dp.endpoint(lab.a).unwrap().unwrap().slot;
    lab.dp.remove_endpoint(lab.a).unwrap();
    assert!(lab.dp.conntrack_entries(lab.a).unwrap().is_empty());
    assert_eq!(lab.dp.read_counters(lab.a).unwrap(), Default::default());
    // The next endpoint gets its counter slot, counting from zero.
    lab.dp
        .set_endpoint(lab.a, EndpointInfo::new(A_ID, NET1, 0))
        .unwrap();
    assert_eq!(lab.dp.endpoint(lab.a).unwrap().unwrap().slot, slot);
    assert_eq!(lab.dp.read_counters(lab.a).unwrap(), Default::default());
    assert_eq!(lab.sends(lab.a, &v4_req), TC_ACT_OK);
    let c = lab.dp.read_counters(lab.a).unwrap();
    assert_eq!(
        (c.egress.allowed.packets, c.ingress.allowed.packets),
        (1, 0)
    );
}

#[test]
fn run_arp_and_neighbour_discovery_always_pass() {
    let Some(mut lab) = Lab::new() else { return };
    lab.flags(
        lab.a,
        EP_INGRESS_ENFORCED | EP_EGRESS_ENFORCED | EP_ISOLATE | EP_IDENTITY_PENDING,
    );
    assert_eq!(lab.sends(lab.a, &arp_request()), TC_ACT_OK);
    assert_eq!(lab.receives(lab.a, &arp_request()), TC_ACT_OK);
    for ty in 133..=136 {
        let nd = ipv6("fe80::1", "ff02::1", 58, &icmp(ty, 0, 0, 0));
        assert_eq!(lab.sends(lab.a, &nd), TC_ACT_OK, "type {ty}");
        assert_eq!(lab.receives(lab.a, &nd), TC_ACT_OK, "type {ty}");
    }
    // MLD (behind a Hop-by-Hop header, as the kernel sends it) passes too.
    for ty in [130, 131, 132, 143] {
        let mld = ipv6(
            "fe80::1",
            "ff02::16",
            0,
            &hop_by_hop(58, &icmp(ty, 0, 0, 0)),
        );
        assert_eq!(lab.receives(lab.a, &mld), TC_ACT_OK, "MLD type {ty}");
    }
    // ICMPv6 echo is not neighbour discovery.
    assert_eq!(
        lab.sends(lab.a, &ipv6(A6, B6, 58, &icmp(128, 0, 1, 1))),
        TC_ACT_SHOT
    );
    let c = lab.dp.read_counters(lab.a).unwrap();
    assert_eq!(c.egress.allowed.packets, 5);
    assert_eq!(c.ingress.allowed.packets, 9);
}

#[test]
fn run_isolation_and_pending_identity() {
    let Some(mut lab) = Lab::new() else { return };
    let rt = current_thread_runtime();
    let mut events = rt.block_on(async { lab.dp.drop_events() }).unwrap();
    let to_c = ipv4(A4, C4, 6, &tcp(40000, 80, TCP_SYN));
    // Isolation off: another network's endpoint is reachable.
    assert_eq!(lab.sends(lab.a, &to_c), TC_ACT_OK);
    lab.flags(lab.a, EP_ISOLATE);
    assert_eq!(lab.sends(lab.a, &to_c), TC_ACT_SHOT);
    assert_eq!(
        lab.receives(lab.a, &ipv4(C4, A4, 6, &tcp(80, 40000, TCP_SYN_ACK))),
        TC_ACT_SHOT
    );
    // Own network, the gateway and the world pass (no policy selects A).
    assert_eq!(
        lab.sends(lab.a, &ipv4(A4, B4, 6, &tcp(40000, 80, TCP_SYN))),
        TC_ACT_OK
    );
    assert_eq!(
        lab.sends(lab.a, &ipv4(A4, "10.0.0.254", 17, &udp(1, 53, b"q"))),
        TC_ACT_OK
    );
    assert_eq!(
        lab.sends(lab.a, &ipv4(A4, "8.8.8.8", 17, &udp(1, 53, b"q"))),
        TC_ACT_OK
    );

    lab.flags(lab.a, EP_ISOLATE | EP_IDENTITY_PENDING);
    assert_eq!(
        lab.sends(lab.a, &ipv4(A4, B4, 6, &tcp(40000, 80, TCP_SYN))),
        TC_ACT_SHOT
    );
    assert_eq!(
        lab.receives(lab.a, &ipv6(B6, A6, 17, &udp(1, 53, b"q"))),
        TC_ACT_SHOT
    );

    let got = rt.block_on(async { drain(&mut events) });
    let reasons: Vec<u8> = got.iter().map(|e| e.reason).collect();
    assert_eq!(
        reasons,
        vec![
            REASON_ISOLATION,
            REASON_ISOLATION,
            REASON_IDENTITY_PENDING,
            REASON_IDENTITY_PENDING
        ]
    );
    assert!(got.iter().all(|e| e.rule_id == 0));
    assert_eq!(got[1].direction, DIR_INGRESS);
}

#[test]
fn run_source_check_drops_spoofed_senders() {
    let Some(mut lab) = Lab::new() else { return };
    let v4: Ipv4Addr = A4.parse().unwrap();
    let v6: Ipv6Addr = A6.parse().unwrap();
    let spoof = ipv4(B4, C4, 17, &udp(1, 53, b"q"));
    // Without the check, A can send as B.
    assert_eq!(lab.sends(lab.a, &spoof), TC_ACT_OK);
    lab.dp
        .set_endpoint(
            lab.a,
            EndpointInfo::new(A_ID, NET1, EP_SOURCE_CHECK)
                .with_addresses(Some(v4.octets()), Some(v6.octets())),
        )
        .unwrap();
    let rt = current_thread_runtime();
    let mut events = rt.block_on(async { lab.dp.drop_events() }).unwrap();
    assert_eq!(lab.sends(lab.a, &spoof), TC_ACT_SHOT);
    assert_eq!(
        lab.sends(lab.a, &ipv6(B6, "2001:db8::1", 17, &udp(1, 53, b"q"))),
        TC_ACT_SHOT
    );
    assert_eq!(
        lab.sends(lab.a, &ipv4(A4, C4, 17, &udp(1, 53, b"q"))),
        TC_ACT_OK
    );
    assert_eq!(
        lab.sends(lab.a, &ipv6(A6, "2001:db8::1", 17, &udp(1, 53, b"q"))),
        TC_ACT_OK
    );
    assert_eq!(
        lab.sends(lab.a, &ipv6("fe80::1", "fe80::2", 17, &udp(1, 53, b"q"))),
        TC_ACT_OK
    );
    assert_eq!(lab.sends(lab.a, &arp_request()), TC_ACT_OK);
    // It checks what A sends, not what it receives.
    assert_eq!(lab.receives(lab.a, &spoof), TC_ACT_OK);
    let got = rt.block_on(async { drain(&mut events) });
    assert_eq!(got.len(), 2);
    assert!(
        got.iter()
            .all(|e| e.reason == REASON_SPOOFED && e.direction == DIR_EGRESS)
    );
}

#[test]
fn run_truncated_and_non_ip_frames() {
    let Some(mut lab) = Lab::new() else { return };
    let rt = current_thread_runtime();
    let mut events = rt.block_on(async { lab.dp.drop_events() }).unwrap();
    let full = ipv4(A4, B4, 6, &tcp(40000, 80, TCP_SYN));
    // Cut-short L4 headers (TCP, UDP over IPv6, ICMP), an IHL that points past the end, a
    // bad IHL, a bad version: all dropped as malformed, even without any policy.
    let mut long_ihl = full[..40].to_vec();
    long_ihl[14] = 0x4f;
    let mut bad_ihl = full.clone();
    bad_ihl[14] = 0x44;
    let mut bad_version = full.clone();
    bad_version[14] = 0x65;
    let v6 = ipv6(A6, B6, 17, &udp(1, 53, b"q"));
    let icmp4 = ipv4(A4, B4, 1, &icmp(8, 0, 1, 1));
    for frame in [
        &full[..36],
        &v6[..56],
        &icmp4[..36],
        &long_ihl[..],
        &bad_ihl[..],
        &bad_version[..],
    ] {
        assert_eq!(
            lab.sends(lab.a, frame),
            TC_ACT_SHOT,
            "{} bytes",
            frame.len()
        );
    }
    // Frames whose IPv4/IPv6 header itself is cut short never reach the program under
    // BPF_PROG_TEST_RUN: the kernel's harness refuses them (EINVAL). From a raw socket they
    // would, and take the same path as above (a failed bpf_skb_load_bytes).
    for frame in [&full[..24], &v6[..40]] {
        match lab.dp.test_run(Direction::Egress, frame, lab.a, 1) {
            Ok(out) => assert_eq!(out.action, TC_ACT_SHOT, "{} bytes", frame.len()),
            Err(DatapathError::Program { .. }) => {}
            Err(e) => panic!("{e}"),
        }
    }
    // A frame shorter than an Ethernet header never reaches the program.
    assert!(matches!(
        lab.dp.test_run(Direction::Egress, &full[..10], lab.a, 1),
        Err(DatapathError::Program { .. })
    ));
    // A UDP packet that ends right after its header is complete.
    assert_eq!(
        lab.sends(lab.a, &ipv4(A4, B4, 17, &udp(1, 53, b""))),
        TC_ACT_OK
    );

    // Non-IP (LLDP, 802.1Q): pass unless the direction is enforced.
    let mut lldp = ethernet(0x88cc);
    lldp.extend_from_slice(&[0u8; 32]);
    let mut vlan = ethernet(0x8100);
    vlan.extend_from_slice(&[0, 10, 0x08, 0]);
    vlan.extend_from_slice(&full[14..]);
    assert_eq!(lab.sends(lab.a, &lldp), TC_ACT_OK);
    assert_eq!(lab.sends(lab.a, &vlan), TC_ACT_OK);
    lab.flags(lab.a, EP_EGRESS_ENFORCED);
    assert_eq!(lab.sends(lab.a, &lldp), TC_ACT_SHOT);
    assert_eq!(lab.sends(lab.a, &vlan), TC_ACT_SHOT);
    assert_eq!(lab.receives(lab.a, &lldp), TC_ACT_OK);

    let reasons: Vec<u8> = rt
        .block_on(async { drain(&mut events) })
        .iter()
        .map(|e| e.reason)
        .collect();
    assert_eq!(reasons[..6], [REASON_MALFORMED; 6]);
    assert_eq!(reasons[reasons.len() - 2..], [REASON_NOT_IP, REASON_NOT_IP]);
}

#[test]
fn run_drop_events_are_rate_limited_in_the_kernel() {
    let Some(mut lab) = Lab::new() else { return };
    // The token bucket is per CPU: keep every run on one.
    let mut cpu = nix::sched::CpuSet::new();
    cpu.set(0).unwrap();
    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &cpu).unwrap();
    lab.dp
        .set_settings(Settings {
            drop_events_per_sec: 1,
            drop_events_burst: 3,
        })
        .unwrap();
    lab.flags(lab.a, EP_EGRESS_ENFORCED);
    let rt = current_thread_runtime();
    let mut events = rt.block_on(async { lab.dp.drop_events() }).unwrap();
    let frame = ipv4(A4, B4, 17, &udp(1, 53, b"q"));
    // 1000 drops on one CPU in one run: 3 events (the burst), the rest suppressed.
    let out = lab
        .dp
        .test_run(Direction::Egress, &frame, lab.a, 1000)
        .unwrap();
    assert_eq!(out.action, TC_ACT_SHOT);
    assert_eq!(
        lab.dp.read_counters(lab.a).unwrap().egress.denied.packets,
        1000
    );
    let got = rt.block_on(async { drain(&mut events) });
    assert_eq!(got.len(), 3, "{got:?}");
    assert!(
        got.iter()
            .all(|e| e.suppressed == 0 && e.reason == REASON_DEFAULT_DENY)
    );
    // After a second a token is back, and the event reports what was suppressed.
    std::thread::sleep(Duration::from_millis(1100));
    assert_eq!(lab.sends(lab.a, &frame), TC_ACT_SHOT);
    let got =
        rt.block_on(async { tokio::time::timeout(Duration::from_secs(2), events.next()).await });
    let event = got.unwrap().unwrap();
    assert_eq!(event.suppressed, 997);
}

#[test]
fn run_policy_updates_replace_the_rule_table() {
    let Some(mut lab) = Lab::new() else { return };
    lab.flags(lab.b, EP_INGRESS_ENFORCED);
    let mut ids = CidrIdentities::default();
    let v1 = compile(
        &[
            ports(
                rule(
                    1,
                    B_ID,
                    Direction::Ingress,
                    Peer::Identity(A_ID),
                    Protocol::Tcp,
                ),
                1,
                65534,
            ),
            rule(
                2,
                B_ID,
                Direction::Ingress,
                Peer::Cidr(net("192.0.2.0/24")),
                Protocol::Any,
            ),
        ],
        &mut ids,
    )
    .unwrap();
    let u = lab.dp.apply_policy(&v1).unwrap();
    assert_eq!(u.written, 31);
    assert_eq!(lab.dp.policy_len().unwrap(), 31);
    assert_eq!(
        lab.receives(lab.b, &ipv4("192.0.2.5", B4, 17, &udp(1, 53, b"q"))),
        TC_ACT_OK
    );
    assert!(
        lab.dp
            .lookup_ip("192.0.2.5".parse().unwrap())
            .unwrap()
            .is_some()
    );

    let v2 = compile(
        &[ports(
            rule(
                3,
                B_ID,
                Direction::Ingress,
                Peer::Identity(A_ID),
                Protocol::Tcp,
            ),
            80,
            80,
        )],
        &mut ids,
    )
    .unwrap();
    let u = lab.dp.apply_policy(&v2).unwrap();
    assert_eq!(u.removed, 31);
    assert_eq!(lab.dp.policy_len().unwrap(), 1);
    assert_eq!(u.cidrs_removed, 1);
    assert!(
        lab.dp
            .lookup_ip("192.0.2.5".parse().unwrap())
            .unwrap()
            .is_none_or(|i| i.identity == 2)
    );
    assert_eq!(
        lab.receives(lab.b, &ipv4("192.0.2.5", B4, 17, &udp(2, 53, b"q"))),
        TC_ACT_SHOT
    );
    assert_eq!(
        lab.receives(lab.b, &ipv4(A4, B4, 6, &tcp(40000, 443, TCP_SYN))),
        TC_ACT_SHOT
    );
    assert_eq!(
        lab.receives(lab.b, &ipv4(A4, B4, 6, &tcp(40000, 80, TCP_SYN))),
        TC_ACT_OK
    );
    // Endpoint addresses are not policy's to remove.
    assert_eq!(
        lab.dp
            .lookup_ip(A4.parse().unwrap())
            .unwrap()
            .unwrap()
            .identity,
        A_ID
    );
}

// ---------------------------------------------------------------------------------------------
// Real traffic

/// A private bpffs mounted on a temp dir (pitfall: `ip netns exec` remounts /sys, and tests
/// must not touch the host's /sys/fs/bpf/sluice). Unmounted on drop.
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
        if let Err(e) = run("umount", &[self.dir.path().to_str().unwrap()]) {
            eprintln!("Bpffs: {e:#}");
        }
    }
}

/// Unmounts whatever got mounted on the path, on drop (errors ignored: maybe nothing was).
struct UnmountOnDrop(PathBuf);

impl Drop for UnmountOnDrop {
    fn drop(&mut self) {
        let _unmounted = run("umount", &[self.0.to_str().unwrap()]);
    }
}

#[test]
fn pins_without_a_bpffs_mount_one_or_are_refused() {
    if !require_root() {
        return;
    }
    let _ns = NetNs::enter().unwrap();
    // A temp dir is not on a bpffs, like /sys/fs/bpf on a host where nobody mounted it.
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("sluice");
    let mut refuse = DatapathConfig::pinned(&root);
    refuse.mount_bpffs = false;
    assert!(matches!(
        Datapath::load(&refuse),
        Err(DatapathError::NotBpffs(p)) if p == dir.path()
    ));
    let _unmount = UnmountOnDrop(dir.path().to_owned());
    let dp = Datapath::load(&DatapathConfig::pinned(&root)).unwrap();
    assert!(root.join(format!("maps/v{LAYOUT_VERSION}/POLICY")).exists());
    assert!(root.join("progs/sluice_ingress").exists());
    drop(dp);
    // Loading again adopts the mount and the pins.
    let dp = Datapath::load(&DatapathConfig::pinned(&root)).unwrap();
    assert_eq!(dp.pin_dir(), Some(root.as_path()));
}

/// The bridge layout sluice builds: `brdp` in this namespace; per container a veth pair,
/// host end on the bridge, the other end moved into a [`PeerNs`] as `eth0`.
struct Topology {
    c1: PeerNs,
    c2: PeerNs,
    h1: u32,
    h2: u32,
}

const C1: &str = "10.99.0.1";
const C2: &str = "10.99.0.2";

impl Topology {
    fn build() -> Self {
        run("ip", &["link", "add", "brdp", "type", "bridge"]).unwrap();
        run("ip", &["link", "set", "brdp", "up"]).unwrap();
        let c1 = Self::container("slvhdp1", "slvcdp1", C1);
        let c2 = Self::container("slvhdp2", "slvcdp2", C2);
        Self {
            h1: ifindex("slvhdp1"),
            h2: ifindex("slvhdp2"),
            c1,
            c2,
        }
    }

    fn container(host: &str, peer: &str, addr: &str) -> PeerNs {
        let ns = PeerNs::spawn().unwrap();
        let pid = ns.pid().to_string();
        run(
            "ip",
            &["link", "add", host, "type", "veth", "peer", "name", peer],
        )
        .unwrap();
        run("ip", &["link", "set", host, "master", "brdp", "up"]).unwrap();
        run("ip", &["link", "set", peer, "netns", &pid]).unwrap();
        // Keep the counters exact: no IPv6 autoconfiguration chatter inside the container.
        ns.run("sysctl", &["-qw", "net.ipv6.conf.all.disable_ipv6=1"])
            .unwrap();
        ns.run("ip", &["link", "set", peer, "name", "eth0"])
            .unwrap();
        ns.run("ip", &["addr", "add", &format!("{addr}/24"), "dev", "eth0"])
            .unwrap();
        ns.run("ip", &["link", "set", "eth0", "up"]).unwrap();
        ns.run("ip", &["link", "set", "lo", "up"]).unwrap();
        ns
    }
}

fn pings(from: &PeerNs, to: &str, count: u32) -> bool {
    from.run(
        "ping",
        &["-c", &count.to_string(), "-i", "0.2", "-W", "1", "-q", to],
    )
    .is_ok()
}

/// Sends `count` one-byte-payload UDP datagrams (each 14 + 20 + 8 + 2 = 44 bytes on the wire).
fn udp_burst(from: &PeerNs, to: &str, port: u16, count: u32) {
    let script = format!("for i in $(seq {count}); do echo x > /dev/udp/{to}/{port}; done");
    from.run("bash", &["-c", &script]).unwrap();
}

/// Starts `nc -l PORT` in `ns`, waits until it listens.
fn tcp_server(ns: &PeerNs, port: u16) -> Child {
    let pid = ns.pid().to_string();
    let child = Command::new("nsenter")
        .args(["-t", &pid, "-n", "nc", "-l", &port.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while !ns
        .run("ss", &["-Hltn", &format!("sport = :{port}")])
        .unwrap()
        .contains(&port.to_string())
    {
        assert!(Instant::now() < deadline, "nc never listened on {port}");
        std::thread::sleep(Duration::from_millis(20));
    }
    child
}

/// `echo hi | nc -N -w 2 TO PORT` from `ns`; true if the server received "hi".
fn tcp_hello(client: &PeerNs, server: &PeerNs, to: &str, port: u16) -> bool {
    let mut srv = tcp_server(server, port);
    let sent = client
        .run(
            "bash",
            &["-c", &format!("echo hi | nc -N -w 2 {to} {port}")],
        )
        .is_ok();
    let _killed = srv.kill();
    let out = srv.wait_with_output().unwrap();
    sent && String::from_utf8_lossy(&out.stdout).contains("hi")
}

/// The entry of container c1 (identity A_ID) or c2 (B_ID) on network 1, with its address and
/// the anti-spoofing check on, plus `flags`.
fn endpoint_info(identity: u32, flags: u32) -> EndpointInfo {
    let addr: Ipv4Addr = if identity == A_ID { C1 } else { C2 }.parse().unwrap();
    EndpointInfo::new(identity, NET1, EP_SOURCE_CHECK | flags)
        .with_addresses(Some(addr.octets()), None)
}

/// Endpoints c1 (identity A_ID) and c2 (B_ID) on network 1.
fn register(dp: &mut Datapath, t: &Topology) {
    for (addr, identity) in [(C1, A_ID), (C2, B_ID)] {
        let info = IpInfo {
            identity,
            network: NET1,
        };
        dp.set_ip(host(addr), info).unwrap();
    }
    dp.set_endpoint(t.h1, endpoint_info(A_ID, 0)).unwrap();
    dp.set_endpoint(t.h2, endpoint_info(B_ID, 0)).unwrap();
}

#[test]
fn traffic_policy_counters_events_and_detach() {
    if !require_root() {
        return;
    }
    let _ns = NetNs::enter().unwrap();
    let bpffs = Bpffs::mount();
    let t = Topology::build();
    assert!(pings(&t.c1, C2, 1), "no connectivity before the datapath");

    // What a daemon of an older layout left pinned is unpinned at load.
    let old_layout = bpffs.path().join(format!("maps/v{}", LAYOUT_VERSION - 1));
    std::fs::create_dir_all(&old_layout).unwrap();
    let rt = current_thread_runtime();
    let mut dp = Datapath::load(&DatapathConfig::pinned(bpffs.path())).unwrap();
    assert!(
        !old_layout.exists(),
        "{} still pinned",
        old_layout.display()
    );
    let mut events = rt.block_on(async { dp.drop_events() }).unwrap();
    register(&mut dp, &t);
    dp.attach(t.h1).unwrap();
    dp.attach(t.h2).unwrap();
    dp.attach(t.h2).unwrap(); // idempotent
    assert!(dp.is_attached(t.h1) && dp.is_attached(t.h2));
    for name in [
        "progs/sluice_egress",
        &format!("maps/v{LAYOUT_VERSION}/POLICY"),
    ] {
        assert!(bpffs.path().join(name).exists(), "{name} not pinned");
    }
    // The programs are cls_bpf filters on the host veth's clsact hooks, once each.
    let attached = tc_programs(t.h2).unwrap();
    assert_eq!(attached.ingress, vec!["sluice_egress".to_owned()]);
    assert_eq!(attached.egress, vec!["sluice_ingress".to_owned()]);

    // No policy: everything flows and is counted as allowed.
    assert!(pings(&t.c1, C2, 3));
    let c = dp.read_counters(t.h2).unwrap();
    assert!(c.ingress.allowed.packets >= 3, "{c:?}");
    assert!(c.egress.allowed.packets >= 3, "{c:?}");
    assert_eq!(c.ingress.denied.packets, 0);

    // c2 accepts TCP 8080 from c1 only; c1 accepts nothing new (replies still pass).
    let rules = [ports(
        rule(
            1,
            B_ID,
            Direction::Ingress,
            Peer::Identity(A_ID),
            Protocol::Tcp,
        ),
        8080,
        8080,
    )];
    dp.apply_policy(&compile(&rules, &mut CidrIdentities::default()).unwrap())
        .unwrap();
    dp.set_endpoint(t.h1, endpoint_info(A_ID, EP_INGRESS_ENFORCED))
        .unwrap();
    dp.set_endpoint(t.h2, endpoint_info(B_ID, EP_INGRESS_ENFORCED))
        .unwrap();
    rt.block_on(async { drain(&mut events) });

    assert!(
        tcp_hello(&t.c1, &t.c2, C2, 8080),
        "allowed TCP (and its replies via conntrack)"
    );
    assert!(
        !tcp_hello(&t.c1, &t.c2, C2, 8081),
        "TCP to another port must be denied"
    );
    assert!(
        !tcp_hello(&t.c2, &t.c1, C1, 8080),
        "c1's ingress is default-deny"
    );

    rt.block_on(async { drain(&mut events) });
    let before = dp.read_counters(t.h2).unwrap();
    assert!(!pings(&t.c1, C2, 3), "ICMP is not allowed into c2");
    udp_burst(&t.c1, C2, 9999, 5);
    let after = dp.read_counters(t.h2).unwrap();
    assert_eq!(
        after.ingress.denied.packets - before.ingress.denied.packets,
        3 + 5
    );
    // 3 echo requests of 98 bytes (ping's 56-byte payload) + 5 × 44-byte datagrams.
    assert_eq!(
        after.ingress.denied.bytes - before.ingress.denied.bytes,
        3 * 98 + 5 * 44
    );

    // Everything that arrives until a second of silence.
    let got = rt.block_on(async {
        let mut got = Vec::new();
        while let Ok(e) = tokio::time::timeout(Duration::from_secs(1), events.next()).await {
            got.push(e.unwrap());
        }
        got
    });
    let icmp_drops: Vec<&DropEvent> = got.iter().filter(|e| e.proto == 1).collect();
    assert_eq!(icmp_drops.len(), 3, "{got:?}");
    let e = icmp_drops[0];
    assert_eq!(
        (e.reason, e.rule_id, e.direction, e.ifindex),
        (REASON_DEFAULT_DENY, 0, DIR_INGRESS, t.h2)
    );
    assert_eq!(
        event_addr(e.src_addr, e.family),
        C1.parse::<IpAddr>().unwrap()
    );
    assert_eq!(
        got.iter()
            .filter(|e| e.proto == 17 && e.dst_port == 9999)
            .count(),
        5
    );

    // An explicit deny on top of the allow wins; its id shows up in the event.
    let rules = [
        ports(
            rule(
                1,
                B_ID,
                Direction::Ingress,
                Peer::Identity(A_ID),
                Protocol::Tcp,
            ),
            8080,
            8080,
        ),
        deny(rule(2, B_ID, Direction::Ingress, Peer::Any, Protocol::Tcp)),
    ];
    dp.apply_policy(&compile(&rules, &mut CidrIdentities::default()).unwrap())
        .unwrap();
    dp.flush_conntrack(None).unwrap();
    assert!(!tcp_hello(&t.c1, &t.c2, C2, 8080));
    let e = rt
        .block_on(async { tokio::time::timeout(Duration::from_secs(2), events.next()).await })
        .unwrap()
        .unwrap();
    assert_eq!(
        (e.reason, e.rule_id, e.dst_port),
        (REASON_POLICY_DENY, 2, 8080)
    );

    // Detach: traffic is back to normal, the filters are gone, detach again is a no-op.
    dp.detach(t.h1).unwrap();
    dp.detach(t.h2).unwrap();
    dp.detach(t.h2).unwrap();
    assert!(!dp.is_attached(t.h2));
    assert_eq!(tc_programs(t.h2).unwrap(), Default::default());
    assert!(pings(&t.c1, C2, 1));
    assert!(tcp_hello(&t.c2, &t.c1, C1, 8080));
}

#[test]
fn traffic_pinned_state_survives_a_daemon_restart() {
    if !require_root() {
        return;
    }
    let _ns = NetNs::enter().unwrap();
    let bpffs = Bpffs::mount();
    let t = Topology::build();
    let config = DatapathConfig::pinned(bpffs.path());
    {
        let mut dp = Datapath::load(&config).unwrap();
        register(&mut dp, &t);
        dp.set_endpoint(t.h2, endpoint_info(B_ID, EP_INGRESS_ENFORCED))
            .unwrap();
        dp.attach(t.h1).unwrap();
        dp.attach(t.h2).unwrap();
        assert!(!pings(&t.c1, C2, 1));
        // The "daemon" exits here; the pinned links and maps stay.
    }
    assert!(!pings(&t.c1, C2, 1), "still enforced while no daemon runs");
    assert!(
        pings(&t.c2, C1, 1) || pings(&t.c2, C1, 1),
        "c1 is not enforced"
    );

    // A new daemon adopts the maps (the endpoint and its flags are still there) and swaps its
    // programs into the existing links.
    let mut dp = Datapath::load(&config).unwrap();
    let adopted = dp.endpoint(t.h2).unwrap().unwrap();
    assert_eq!(
        adopted,
        EndpointInfo {
            slot: adopted.slot,
            ..endpoint_info(B_ID, EP_INGRESS_ENFORCED)
        }
    );
    let denied_before = dp.read_counters(t.h2).unwrap().ingress.denied.packets;
    assert!(denied_before >= 2);
    dp.attach(t.h1).unwrap();
    dp.attach(t.h2).unwrap();
    assert!(!pings(&t.c1, C2, 1));
    // Exactly one program per hook (the link was updated, not duplicated).
    let attached = tc_programs(t.h2).unwrap();
    assert_eq!(attached.ingress, vec!["sluice_egress".to_owned()]);
    assert_eq!(attached.egress, vec!["sluice_ingress".to_owned()]);
    // Allow ICMP now, through the adopted POLICY map.
    let rules = [rule(
        1,
        B_ID,
        Direction::Ingress,
        Peer::Identity(A_ID),
        Protocol::Icmp,
    )];
    dp.apply_policy(&compile(&rules, &mut CidrIdentities::default()).unwrap())
        .unwrap();
    assert!(pings(&t.c1, C2, 2));

    // Filters go with their device; a new device that reuses the ifindex starts without
    // programs and gets its own.
    run("ip", &["link", "del", "slvhdp1"]).unwrap();
    assert!(matches!(
        dp.attach(t.h1),
        Err(DatapathError::NoSuchInterface(_))
    ));
    let index = t.h1.to_string();
    run(
        "ip",
        &[
            "link", "add", "slvhdp9", "index", &index, "type", "veth", "peer", "name", "slvcdp9",
        ],
    )
    .unwrap();
    assert_eq!(ifindex("slvhdp9"), t.h1);
    assert_eq!(tc_programs(t.h1).unwrap(), Default::default());
    dp.attach(t.h1).unwrap();
    let attached = tc_programs(t.h1).unwrap();
    assert_eq!(attached.ingress, vec!["sluice_egress".to_owned()]);
    assert_eq!(attached.egress, vec!["sluice_ingress".to_owned()]);
    dp.detach(t.h1).unwrap();
    dp.detach(t.h2).unwrap();
    assert_eq!(tc_programs(t.h2).unwrap(), Default::default());
    Datapath::remove_pins(&bpffs.path()).unwrap();
    assert!(!Path::new(&bpffs.path()).exists());
}

// ---------------------------------------------------------------------------------------------
// ns/packet

/// Builds a policy of about `n` entries spread over 100 subjects and `n` peers.
fn big_policy(n: u32) -> Vec<Rule> {
    (0..n)
        .map(|i| Rule {
            id: i + 1,
            subjects: vec![A_ID + 1000 + (i % 100)],
            direction: if i % 2 == 0 {
                Direction::Ingress
            } else {
                Direction::Egress
            },
            peer: Peer::Identity(100_000 + i),
            protocol: Protocol::Tcp,
            ports: Some(PortRange::single(1000 + u16::try_from(i % 50).unwrap())),
            action: if i % 3 == 0 {
                Action::Deny
            } else {
                Action::Allow
            },
        })
        .collect()
}

#[test]
#[ignore = "benchmark: run with --ignored --nocapture"]
fn bench_ns_per_packet_by_policy_size() {
    if !require_root() {
        return;
    }
    let _ns = NetNs::enter().unwrap();
    run(
        "ip",
        &["link", "add", "tb", "type", "veth", "peer", "name", "tbp"],
    )
    .unwrap();
    let (ep, other) = (ifindex("tb"), ifindex("tbp"));
    const REPEAT: u32 = 100_000;
    const ROUNDS: usize = 7;
    let sizes = [1_000u32, 10_000, 100_000, 1_000_000];
    // One datapath (own programs, own maps) per policy size, measured interleaved so that the
    // machine's slow and fast stretches hit every size alike.
    let mut labs: Vec<(usize, Datapath)> = sizes
        .iter()
        .map(|&n| {
            let mut dp = Datapath::load(&DatapathConfig::unpinned()).unwrap();
            dp.set_ip(
                host(A4),
                IpInfo {
                    identity: A_ID,
                    network: NET1,
                },
            )
            .unwrap();
            dp.set_ip(
                host(B4),
                IpInfo {
                    identity: B_ID,
                    network: NET1,
                },
            )
            .unwrap();
            let mut rules = big_policy(n);
            rules.push(ports(
                rule(
                    n + 1,
                    B_ID,
                    Direction::Ingress,
                    Peer::Identity(A_ID),
                    Protocol::Tcp,
                ),
                80,
                80,
            ));
            rules.push(deny(ports(
                rule(
                    n + 2,
                    B_ID,
                    Direction::Ingress,
                    Peer::Identity(A_ID),
                    Protocol::Tcp,
                ),
                22,
                22,
            )));
            dp.apply_policy(&compile(&rules, &mut CidrIdentities::default()).unwrap())
                .unwrap();
            dp.set_endpoint(ep, EndpointInfo::new(B_ID, NET1, EP_INGRESS_ENFORCED))
                .unwrap();
            // Open the established flow once.
            let syn = ipv4(A4, B4, 6, &tcp(40000, 80, TCP_SYN));
            assert_eq!(
                dp.test_run(Direction::Ingress, &syn, ep, 1).unwrap().action,
                TC_ACT_OK
            );
            (dp.policy_len().unwrap(), dp)
        })
        .collect();
    let cases: [(&str, u32, Vec<u8>); 5] = [
        (
            "not an endpoint",
            other,
            ipv4(A4, B4, 6, &tcp(1, 2, TCP_SYN)),
        ),
        (
            "established (conntrack hit)",
            ep,
            ipv4(A4, B4, 6, &tcp(40000, 80, TCP_ACK)),
        ),
        (
            "denied by rule (1 POLICY lookup)",
            ep,
            ipv4(A4, B4, 6, &tcp(40001, 22, TCP_SYN)),
        ),
        (
            "default deny (2 POLICY lookups)",
            ep,
            ipv4(A4, B4, 6, &tcp(40002, 443, TCP_SYN)),
        ),
        (
            "no policy (flags 0)",
            ep,
            ipv4(A4, B4, 6, &tcp(40003, 443, TCP_SYN)),
        ),
    ];
    let mut samples = vec![vec![Vec::with_capacity(ROUNDS); cases.len()]; labs.len()];
    for _ in 0..ROUNDS {
        for (l, (_, dp)) in labs.iter_mut().enumerate() {
            for (c, (name, ifindex, frame)) in cases.iter().enumerate() {
                let flags = if name.starts_with("no policy") {
                    0
                } else {
                    EP_INGRESS_ENFORCED
                };
                dp.set_endpoint(ep, EndpointInfo::new(B_ID, NET1, flags))
                    .unwrap();
                let run = dp
                    .test_run(Direction::Ingress, frame, *ifindex, REPEAT)
                    .unwrap();
                samples[l][c].push(run.duration.as_nanos());
            }
        }
    }
    println!(
        "ns/packet under BPF_PROG_TEST_RUN, median of {ROUNDS} interleaved rounds × {REPEAT} runs"
    );
    print!("{:<34}", "case \\ POLICY entries");
    for (entries, _) in &labs {
        print!("{entries:>10}");
    }
    println!();
    for (c, (name, _, _)) in cases.iter().enumerate() {
        print!("{name:<34}");
        for per_lab in &samples {
            let mut v = per_lab[c].clone();
            v.sort_unstable();
            print!("{:>10}", v[ROUNDS / 2]);
        }
        println!();
    }
    println!(
        "loadavg: {}",
        std::fs::read_to_string("/proc/loadavg").unwrap().trim()
    );
}

#[test]
fn run_port_range_edges_and_cidr_longest_match() {
    let Some(mut lab) = Lab::new() else { return };
    lab.policy(&[
        // tcp 1000-2000 from A: both ends in, both neighbours out.
        ports(
            rule(
                1,
                B_ID,
                Direction::Ingress,
                Peer::Identity(A_ID),
                Protocol::Tcp,
            ),
            1000,
            2000,
        ),
        // udp from 198.51.100.0/24, except the /28 carved out by a deny inside it.
        rule(
            2,
            B_ID,
            Direction::Ingress,
            Peer::Cidr(net("198.51.100.0/24")),
            Protocol::Udp,
        ),
        deny(rule(
            3,
            B_ID,
            Direction::Ingress,
            Peer::Cidr(net("198.51.100.16/28")),
            Protocol::Any,
        )),
    ]);
    lab.flags(lab.b, EP_INGRESS_ENFORCED);
    for (port, want) in [
        (999, TC_ACT_SHOT),
        (1000, TC_ACT_OK),
        (1500, TC_ACT_OK),
        (2000, TC_ACT_OK),
        (2001, TC_ACT_SHOT),
    ] {
        let frame = ipv4(A4, B4, 6, &tcp(41000 + port, port, TCP_SYN));
        assert_eq!(lab.receives(lab.b, &frame), want, "tcp port {port}");
    }
    for (src, want) in [
        ("198.51.100.1", TC_ACT_OK),    // the /24 allows
        ("198.51.100.17", TC_ACT_SHOT), // the longer /28 denies
        ("198.51.100.31", TC_ACT_SHOT), // last address of the /28
        ("198.51.100.32", TC_ACT_OK),   // just past it: back in the /24
        ("198.51.101.1", TC_ACT_SHOT),  // outside both: default deny
    ] {
        let frame = ipv4(src, B4, 17, &udp(5353, 53, b"q"));
        assert_eq!(lab.receives(lab.b, &frame), want, "udp from {src}");
    }
}

/// Packets the host-side veth `name` transmitted (into its container): what the bridge
/// forwarded there.
fn tx_packets(name: &str) -> u64 {
    ip_json(&["-s", "link", "show", "dev", name])[0]["stats64"]["tx"]["packets"]
        .as_u64()
        .unwrap()
}

#[test]
fn traffic_fast_path_skips_the_bridge_and_keeps_ingress_policy() {
    if !require_root() {
        return;
    }
    let _ns = NetNs::enter().unwrap();
    let t = Topology::build();
    assert!(pings(&t.c1, C2, 1), "no connectivity before the datapath");

    let mut dp = Datapath::load(&DatapathConfig {
        fast_path: true,
        ..DatapathConfig::unpinned()
    })
    .unwrap();
    assert!(dp.fast_path());
    register(&mut dp, &t);
    dp.attach(t.h1).unwrap();
    dp.attach(t.h2).unwrap();
    assert_eq!(dp.local_endpoint(C2.parse().unwrap()).unwrap(), Some(t.h2));
    assert_eq!(
        dp.local_endpoint("10.99.0.77".parse().unwrap()).unwrap(),
        None
    );
    assert!(
        pings(&t.c1, C2, 1),
        "neighbours resolved through the bridge"
    );

    // 20 datagrams c1 -> c2: they reach c2, count as c2's ingress, and never leave the
    // bridge through c2's host veth.
    let tx = tx_packets("slvhdp2");
    let before = dp.read_counters(t.h2).unwrap();
    udp_burst(&t.c1, C2, 9999, 20);
    let after = dp.read_counters(t.h2).unwrap();
    assert!(
        after.ingress.allowed.packets - before.ingress.allowed.packets >= 20,
        "{before:?} -> {after:?}"
    );
    let bridged = tx_packets("slvhdp2") - tx;
    assert!(
        bridged < 20,
        "{bridged} packets went through the bridge to c2's host veth"
    );

    // The receiver's ingress policy still applies on the fast path: TCP 8080 from c1 only.
    let rules = [ports(
        rule(
            1,
            B_ID,
            Direction::Ingress,
            Peer::Identity(A_ID),
            Protocol::Tcp,
        ),
        8080,
        8080,
    )];
    dp.apply_policy(&compile(&rules, &mut CidrIdentities::default()).unwrap())
        .unwrap();
    dp.set_endpoint(t.h2, endpoint_info(B_ID, EP_INGRESS_ENFORCED))
        .unwrap();
    assert!(tcp_hello(&t.c1, &t.c2, C2, 8080), "allowed TCP and replies");
    assert!(!tcp_hello(&t.c1, &t.c2, C2, 8081), "other port denied");
    let before = dp.read_counters(t.h2).unwrap();
    udp_burst(&t.c1, C2, 9999, 5);
    let after = dp.read_counters(t.h2).unwrap();
    assert_eq!(
        after.ingress.denied.packets - before.ingress.denied.packets,
        5
    );

    // Detached endpoint: its address leaves the fast path.
    dp.remove_endpoint(t.h2).unwrap();
    assert_eq!(dp.local_endpoint(C2.parse().unwrap()).unwrap(), None);
    drop(dp);

    // Fast path off: the same datagrams go through the bridge.
    let mut dp = Datapath::load(&DatapathConfig {
        fast_path: false,
        ..DatapathConfig::unpinned()
    })
    .unwrap();
    register(&mut dp, &t);
    dp.attach(t.h1).unwrap();
    dp.attach(t.h2).unwrap();
    assert_eq!(dp.local_endpoint(C2.parse().unwrap()).unwrap(), None);
    let tx = tx_packets("slvhdp2");
    let before = dp.read_counters(t.h2).unwrap();
    udp_burst(&t.c1, C2, 9999, 20);
    let after = dp.read_counters(t.h2).unwrap();
    assert!(after.ingress.allowed.packets - before.ingress.allowed.packets >= 20);
    assert!(
        tx_packets("slvhdp2") - tx >= 20,
        "bridged when the fast path is off"
    );
}

/// `TC_ACT_REDIRECT`: what `bpf_redirect_peer` returns.
const TC_ACT_REDIRECT: u32 = 7;

#[test]
fn run_fast_path_decision_redirects_only_unicast_same_network_allowed_packets() {
    let Some(mut lab) = Lab::new() else { return };
    lab.dp = Datapath::load(&DatapathConfig {
        fast_path: true,
        ..DatapathConfig::unpinned()
    })
    .unwrap();
    lab.dp
        .set_endpoint(1, EndpointInfo::new(A_ID, NET1, 0))
        .unwrap();
    for (addr, identity, network) in [(A4, A_ID, NET1), (B4, B_ID, NET1), (C4, C_ID, NET2)] {
        lab.dp
            .set_ip(host(addr), IpInfo { identity, network })
            .unwrap();
    }
    let b4: Ipv4Addr = B4.parse().unwrap();
    let c4: Ipv4Addr = C4.parse().unwrap();
    lab.dp
        .set_endpoint(
            lab.b,
            EndpointInfo::new(B_ID, NET1, 0).with_addresses(Some(b4.octets()), None),
        )
        .unwrap();
    run(
        "ip",
        &["link", "add", "tc", "type", "veth", "peer", "name", "tcp"],
    )
    .unwrap();
    let c = ifindex("tc");
    lab.dp
        .set_endpoint(
            c,
            EndpointInfo::new(C_ID, NET2, 0).with_addresses(Some(c4.octets()), None),
        )
        .unwrap();
    assert_eq!(lab.dp.local_endpoint(IpAddr::V4(b4)).unwrap(), Some(lab.b));

    // Same network, unicast: straight to the receiver, counted as its ingress.
    let syn = ipv4(A4, B4, 6, &tcp(40000, 80, TCP_SYN));
    assert_eq!(lab.sends(lab.a, &syn), TC_ACT_REDIRECT);
    assert_eq!(
        lab.dp.read_counters(lab.b).unwrap().ingress.allowed.packets,
        1
    );
    // Broadcast/multicast destination MAC, another network, an unknown address: the bridge.
    let mut broadcast = syn.clone();
    broadcast[..6].copy_from_slice(&[0xff; 6]);
    assert_eq!(lab.sends(lab.a, &broadcast), TC_ACT_OK);
    assert_eq!(
        lab.sends(lab.a, &ipv4(A4, C4, 6, &tcp(40000, 80, TCP_SYN))),
        TC_ACT_OK
    );
    assert_eq!(
        lab.sends(lab.a, &ipv4(A4, "10.0.0.99", 6, &tcp(40000, 80, TCP_SYN))),
        TC_ACT_OK
    );
    assert_eq!(lab.sends(lab.a, &arp_request()), TC_ACT_OK);

    // The receiver's ingress policy decides on the fast path: default deny drops here.
    lab.dp
        .set_endpoint(
            lab.b,
            EndpointInfo::new(B_ID, NET1, EP_INGRESS_ENFORCED)
                .with_addresses(Some(b4.octets()), None),
        )
        .unwrap();
    let syn2 = ipv4(A4, B4, 6, &tcp(40001, 81, TCP_SYN));
    assert_eq!(lab.sends(lab.a, &syn2), TC_ACT_SHOT);
    assert_eq!(
        lab.dp.read_counters(lab.b).unwrap().ingress.denied.packets,
        1
    );
    // ... and an allow rule lets it through.
    lab.policy(&[ports(
        rule(
            1,
            B_ID,
            Direction::Ingress,
            Peer::Identity(A_ID),
            Protocol::Tcp,
        ),
        81,
        81,
    )]);
    assert_eq!(lab.sends(lab.a, &syn2), TC_ACT_REDIRECT);

    // Fast path off: nothing in LOCAL, the bridge again.
    let mut off = Datapath::load(&DatapathConfig {
        fast_path: false,
        ..DatapathConfig::unpinned()
    })
    .unwrap();
    off.set_endpoint(1, EndpointInfo::new(A_ID, NET1, 0))
        .unwrap();
    off.set_endpoint(
        lab.b,
        EndpointInfo::new(B_ID, NET1, 0).with_addresses(Some(b4.octets()), None),
    )
    .unwrap();
    assert_eq!(off.local_endpoint(IpAddr::V4(b4)).unwrap(), None);
    assert_eq!(
        off.test_run(Direction::Egress, &syn, 1, 1).unwrap().action,
        TC_ACT_OK
    );
}

/// A request that reached B through the host (a DNAT: it crossed the bridge although A is a
/// local endpoint of the same network) makes B's replies of that flow take the bridge, so
/// the host can undo its NAT; other flows, and the same flow in a fresh lab, are redirected.
/// Fragments, ICMP errors and macvlan endpoints never take the fast path.
#[test]
fn run_fast_path_leaves_natted_replies_fragments_and_icmp_errors_to_the_bridge() {
    let Some(mut lab) = Lab::new() else { return };
    assert!(lab.dp.fast_path(), "the fast path is on by default");
    let a4: Ipv4Addr = A4.parse().unwrap();
    let b4: Ipv4Addr = B4.parse().unwrap();
    lab.dp
        .set_endpoint(
            lab.a,
            EndpointInfo::new(A_ID, NET1, 0).with_addresses(Some(a4.octets()), None),
        )
        .unwrap();
    lab.dp
        .set_endpoint(
            lab.b,
            EndpointInfo::new(B_ID, NET1, 0).with_addresses(Some(b4.octets()), None),
        )
        .unwrap();
    let reply = ipv4(B4, A4, 17, &udp(80, 41000, b"r"));
    assert_eq!(lab.sends(lab.b, &reply), TC_ACT_REDIRECT, "a plain reply");
    assert!(lab.dp.bridged_flows().unwrap().is_empty());

    // A's datagram to B:80 arrives on B's host veth: it came through the bridge.
    assert_eq!(
        lab.receives(lab.b, &ipv4(A4, B4, 17, &udp(41000, 80, b"q"))),
        TC_ACT_OK
    );
    let bridged = lab.dp.bridged_flows().unwrap();
    assert_eq!(bridged.len(), 1, "{bridged:?}");
    let flow = bridged[0];
    assert_eq!(
        (flow.ifindex, flow.local_port, flow.remote_port, flow.proto),
        (lab.b, 80, 41000, 17)
    );
    assert_eq!(
        lab.sends(lab.b, &reply),
        TC_ACT_OK,
        "the reply takes the bridge"
    );
    assert_eq!(
        lab.sends(lab.b, &ipv4(B4, A4, 17, &udp(80, 41001, b"r"))),
        TC_ACT_REDIRECT,
        "another flow still takes the fast path"
    );
    // From a sender that is not a local endpoint (the gateway after masquerade): nothing.
    assert_eq!(
        lab.receives(lab.b, &ipv4("10.0.0.254", B4, 17, &udp(41002, 80, b"q"))),
        TC_ACT_OK
    );
    assert_eq!(lab.dp.bridged_flows().unwrap().len(), 1);

    // A fragment (More Fragments set), an ICMP error, an echo request.
    let mut fragment = ipv4(B4, A4, 17, &udp(80, 41003, b"f"));
    fragment[14 + 6] = 0x20;
    assert_eq!(lab.sends(lab.b, &fragment), TC_ACT_OK, "fragment");
    assert_eq!(
        lab.sends(lab.b, &ipv4(B4, A4, 1, &icmp(3, 3, 0, 0))),
        TC_ACT_OK,
        "ICMP port unreachable"
    );
    assert_eq!(
        lab.sends(lab.b, &ipv4(B4, A4, 1, &icmp(8, 0, 7, 1))),
        TC_ACT_REDIRECT,
        "echo request"
    );

    // Removing B forgets its bridged flows.
    lab.dp.remove_endpoint(lab.b).unwrap();
    assert!(lab.dp.bridged_flows().unwrap().is_empty());

    // A macvlan endpoint is never a fast-path target (bpf_redirect_peer needs a veth).
    lab.dp
        .set_sandboxed_endpoint(
            lab.b,
            EndpointInfo::new(B_ID, NET1, 0).with_addresses(Some(b4.octets()), None),
        )
        .unwrap();
    assert_eq!(lab.dp.local_endpoint(IpAddr::V4(b4)).unwrap(), None);
    assert_eq!(
        lab.sends(lab.a, &ipv4(A4, B4, 17, &udp(41000, 80, b"q"))),
        TC_ACT_OK
    );
}

/// Real traffic with the fast path on: c1 reaches c2 through a DNAT on the host (an address
/// that is not c2's, rewritten to c2 without masquerade, with br_netfilter as Docker sets
/// it), so c2's reply must go back through the host's conntrack to get the address c1 asked
/// for. The request crossed the bridge, so the reply does too; a direct connection between
/// the two still skips the bridge.
#[test]
fn traffic_fast_path_leaves_replies_of_dnat_flows_to_the_host() {
    if !require_root() {
        return;
    }
    let _ns = NetNs::enter().unwrap();
    let t = Topology::build();
    run("ip", &["addr", "add", "10.99.0.254/24", "dev", "brdp"]).unwrap();
    for c in [&t.c1, &t.c2] {
        c.run("ip", &["route", "add", "default", "via", "10.99.0.254"])
            .unwrap();
    }
    run("sysctl", &["-qw", "net.ipv4.ip_forward=1"]).unwrap();
    run("sysctl", &["-qw", "net.bridge.bridge-nf-call-iptables=1"]).unwrap();
    let mut nft = Command::new("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(
        nft.stdin.as_mut().unwrap(),
        b"table ip fpdnat {\n\
          chain pre { type nat hook prerouting priority dstnat; ip daddr 10.98.0.100 tcp dport 8080 dnat to 10.99.0.2:8080; }\n\
          chain post { type nat hook postrouting priority srcnat; }\n}\n",
    )
    .unwrap();
    assert!(nft.wait().unwrap().success());
    assert!(
        tcp_hello(&t.c1, &t.c2, "10.98.0.100", 8080),
        "no DNAT before the datapath"
    );

    let mut dp = Datapath::load(&DatapathConfig::unpinned()).unwrap();
    register(&mut dp, &t);
    dp.attach(t.h1).unwrap();
    dp.attach(t.h2).unwrap();
    assert!(pings(&t.c1, C2, 1));
    assert!(
        tcp_hello(&t.c1, &t.c2, "10.98.0.100", 8080),
        "the DNATed connection fails with the fast path on"
    );
    let bridged = dp.bridged_flows().unwrap();
    assert!(
        bridged
            .iter()
            .any(|f| f.ifindex == t.h2 && f.local_port == 8080 && f.proto == 6),
        "{bridged:?}"
    );
    // Direct: still the fast path (c2's host veth transmits almost nothing).
    let tx = tx_packets("slvhdp2");
    assert!(tcp_hello(&t.c1, &t.c2, C2, 8081));
    assert!(
        tx_packets("slvhdp2") - tx < 3,
        "a direct connection went through the bridge"
    );
}
