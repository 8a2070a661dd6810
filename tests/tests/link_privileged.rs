//! Privileged tests of bridge mode's kernel layer ([`LinuxKernel`], [`Netlink`], [`Firewall`])
//! against the real kernel. Each test runs in its own network namespace ([`NetNs`]) on its
//! own thread, and checks kernel state through `ip -j`, `/proc/sys` and `iptables -S`,
//! independently of the code under test. Without root they skip; CI runs them as root.

#![allow(
    clippy::unwrap_used,
    reason = "test helpers outside #[test] fns panic on failure, like the tests"
)]

use std::future::Future;

use ipnetwork::IpNetwork;
use serde_json::Value;
use sluice_driver::Kernel;
use sluice_driver::bridge::{LinuxKernel, bridge_mac};
use sluice_driver::firewall::Firewall;
use sluice_driver::kernel::{BridgeSpec, VethSpec};
use sluice_driver::link::{Netlink, format_mac};
use sluice_tests::netns::{
    NetNs, PeerNs, current_netns_inode, current_thread_runtime, ip_json, link_names, netns_inode,
    require_root, run, try_ip_json,
};

const BR: &str = "slbrtest0000001";
const HOST: &str = "slvhtest0000001";
const PEER: &str = "slvctest0000001";
const MAC: [u8; 6] = [0x02, 0x42, 0xac, 0x11, 0x00, 0x02];

/// Runs `test` with a [`LinuxKernel`] in a fresh network namespace on this thread.
fn in_netns<F, Fut>(test: F)
where
    F: FnOnce(LinuxKernel) -> Fut,
    Fut: Future<Output = ()>,
{
    if !require_root() {
        return;
    }
    let _ns = NetNs::enter().unwrap();
    // Dropped before `_ns`, so the netlink socket dies with the namespace.
    let rt = current_thread_runtime();
    rt.block_on(async {
        let kernel = LinuxKernel::new().unwrap();
        test(kernel).await;
    });
}

fn net(s: &str) -> IpNetwork {
    s.parse().unwrap()
}

fn bridge_spec(mtu: Option<u32>, internal: bool) -> BridgeSpec {
    BridgeSpec {
        name: BR.into(),
        mtu,
        addresses: vec![net("10.77.0.1/24"), net("fd00:77::1/64")],
        internal,
    }
}

fn veth_spec(bridge: &str, mtu: Option<u32>) -> VethSpec {
    VethSpec {
        host: HOST.into(),
        peer: PEER.into(),
        bridge: bridge.into(),
        mtu,
        peer_mac: MAC,
    }
}

/// `ip -j -d link show dev NAME`, the one link.
fn link(name: &str) -> Value {
    ip_json(&["-d", "link", "show", "dev", name])[0].clone()
}

fn flags(link: &Value) -> Vec<String> {
    link["flags"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f.as_str().unwrap().to_owned())
        .collect()
}

/// Global-scope addresses of `dev` as `addr/prefix`, with their `ip` JSON entries.
fn global_addresses(dev: &str) -> Vec<(String, Value)> {
    ip_json(&["addr", "show", "dev", dev])[0]["addr_info"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|a| a["scope"] == "global")
        .map(|a| {
            (
                format!("{}/{}", a["local"].as_str().unwrap(), a["prefixlen"]),
                a.clone(),
            )
        })
        .collect()
}

fn sysctl(path: &str) -> String {
    std::fs::read_to_string(format!("/proc/sys/{path}"))
        .unwrap()
        .trim()
        .to_owned()
}

/// Lines of `TOOL -S DOCKER-USER` that are our rule for `bridge`.
fn docker_user_rules(tool: &str, bridge: &str) -> usize {
    let rule = format!("-A DOCKER-USER -i {bridge} -o {bridge} -j ACCEPT");
    run(tool, &["-w", "-S", "DOCKER-USER"])
        .unwrap_or_default()
        .lines()
        .filter(|l| *l == rule)
        .count()
}

fn iptables_tools() -> Vec<&'static str> {
    ["iptables", "ip6tables"]
        .into_iter()
        .filter(|t| Firewall::new().tools().iter().any(|p| p.ends_with(t)))
        .collect()
}

#[test]
fn sentinel_test_thread_is_in_its_own_netns() {
    if !require_root() {
        return;
    }
    // PID 1 may be non-dumpable (e.g. a sandbox's init), hiding its namespace even from
    // root; the namespace the test process started in is then the "host" to compare with.
    let init = netns_inode("/proc/1/ns/net")
        .inspect_err(|e| eprintln!("note: {e:#}; comparing with the process netns only"))
        .ok();
    let before = current_netns_inode().unwrap();
    {
        let ns = NetNs::enter().unwrap();
        let inside = current_netns_inode().unwrap();
        if let Some(init) = init {
            assert_ne!(inside, init, "test thread is in the init netns");
        }
        assert_ne!(
            inside, before,
            "test thread is in the netns the process started in"
        );
        assert_eq!(inside, ns.inode());
        // The process (its main thread) stays where it was: only this thread moved.
        assert_eq!(netns_inode("/proc/self/ns/net").unwrap(), before);
        // A child spawned from this thread inherits the thread's namespace.
        let child = run("readlink", &["/proc/self/ns/net"]).unwrap();
        assert_eq!(child.trim(), format!("net:[{inside}]"));
        // A fresh namespace: only lo, and it is up.
        assert_eq!(link_names(), ["lo"]);
        assert!(flags(&link("lo")).contains(&"UP".to_owned()));
    }
    assert_eq!(
        current_netns_inode().unwrap(),
        before,
        "NetNs did not restore"
    );
}

#[test]
fn ensure_bridge_creates_bridge_with_addresses_mtu_mac_and_up() {
    in_netns(|k| async move {
        k.ensure_bridge(&bridge_spec(Some(1400), false))
            .await
            .unwrap();

        let l = link(BR);
        assert_eq!(l["linkinfo"]["info_kind"], "bridge");
        assert_eq!(l["mtu"], 1400);
        assert!(flags(&l).contains(&"UP".to_owned()), "{l}");
        assert_eq!(l["address"], format_mac(&bridge_mac(BR)));

        let addrs = global_addresses(BR);
        let names: Vec<&str> = addrs.iter().map(|(a, _)| a.as_str()).collect();
        assert_eq!(names, ["10.77.0.1/24", "fd00:77::1/64"]);
        let (_, v6) = &addrs[1];
        assert_eq!(v6["nodad"], true, "{v6}");
        assert!(
            v6.get("tentative").is_none(),
            "gateway must be usable at once: {v6}"
        );
        assert_eq!(sysctl(&format!("net/ipv6/conf/{BR}/disable_ipv6")), "0");

        // The wrapper reads the same back.
        let nl = k.netlink();
        let index = nl.link_index(BR).await.unwrap().unwrap();
        let mut got = nl.addresses(index).await.unwrap();
        got.retain(|a| !matches!(a, IpNetwork::V6(n) if n.ip().is_unicast_link_local()));
        got.sort();
        assert_eq!(got, [net("10.77.0.1/24"), net("fd00:77::1/64")]);
        assert_eq!(nl.link_index("slbrnothere").await.unwrap(), None);
    });
}

#[test]
fn ensure_bridge_enables_ipv6_even_when_new_links_default_to_disabled() {
    in_netns(|k| async move {
        std::fs::write("/proc/sys/net/ipv6/conf/default/disable_ipv6", "1").unwrap();
        k.ensure_bridge(&bridge_spec(None, false)).await.unwrap();
        assert_eq!(sysctl(&format!("net/ipv6/conf/{BR}/disable_ipv6")), "0");
        assert_eq!(global_addresses(BR).len(), 2);
    });
}

#[test]
fn ensure_bridge_twice_is_idempotent() {
    in_netns(|k| async move {
        let spec = bridge_spec(Some(1400), false);
        k.ensure_bridge(&spec).await.unwrap();
        let index = link(BR)["ifindex"].clone();
        k.ensure_bridge(&spec).await.unwrap();

        assert_eq!(link(BR)["ifindex"], index, "bridge was re-created");
        assert_eq!(global_addresses(BR).len(), 2, "duplicate addresses");
        assert_eq!(link_names().iter().filter(|n| *n == BR).count(), 1);
        for tool in iptables_tools() {
            assert_eq!(docker_user_rules(tool, BR), 1, "{tool}");
        }
    });
}

#[test]
fn ensure_bridge_adopts_an_existing_bridge_and_never_deletes_it() {
    in_netns(|k| async move {
        run("ip", &["link", "add", BR, "type", "bridge"]).unwrap();
        let index = link(BR)["ifindex"].clone();
        k.ensure_bridge(&bridge_spec(Some(1400), false))
            .await
            .unwrap();
        assert_eq!(link(BR)["ifindex"], index);
        assert_eq!(link(BR)["mtu"], 1400);

        // A failure while adopting leaves the bridge alone (not ours to roll back).
        let err = k
            .ensure_bridge(&bridge_spec(Some(10), false))
            .await
            .unwrap_err();
        assert!(err.to_string().contains("mtu 10"), "{err}");
        assert_eq!(link(BR)["ifindex"], index);
    });
}

#[test]
fn internal_bridge_has_forwarding_off() {
    in_netns(|k| async move {
        k.ensure_bridge(&bridge_spec(None, true)).await.unwrap();
        // /proc/sys/net is this thread's namespace's view.
        assert_eq!(sysctl(&format!("net/ipv4/conf/{BR}/forwarding")), "0");
        assert_eq!(sysctl(&format!("net/ipv6/conf/{BR}/forwarding")), "0");

        let spec = BridgeSpec {
            name: "slbrtest0000002".into(),
            ..bridge_spec(None, false)
        };
        let before = sysctl("net/ipv4/conf/default/forwarding");
        k.ensure_bridge(&spec).await.unwrap();
        assert_eq!(sysctl("net/ipv4/conf/slbrtest0000002/forwarding"), before);
    });
}

#[test]
fn ensure_veth_attaches_host_end_and_configures_peer() {
    in_netns(|k| async move {
        k.ensure_bridge(&bridge_spec(Some(1400), false))
            .await
            .unwrap();
        let spec = veth_spec(BR, Some(1400));
        k.ensure_veth(&spec).await.unwrap();

        let host = link(HOST);
        assert_eq!(host["master"], BR);
        assert_eq!(host["mtu"], 1400);
        assert_eq!(host["linkinfo"]["info_kind"], "veth");
        assert!(flags(&host).contains(&"UP".to_owned()), "{host}");
        assert_eq!(host["linkinfo"]["info_slave_kind"], "bridge");

        let peer = link(PEER);
        assert_eq!(peer["address"], format_mac(&MAC));
        assert_eq!(peer["mtu"], 1400);
        assert!(peer.get("master").is_none());
        assert!(
            !flags(&peer).contains(&"UP".to_owned()),
            "peer stays down: {peer}"
        );
        assert_eq!(host["link"], PEER, "the two are one pair");

        // Again: adopted, nothing new.
        let index = host["ifindex"].clone();
        k.ensure_veth(&spec).await.unwrap();
        assert_eq!(link(HOST)["ifindex"], index);
        assert_eq!(link_names().len(), 4, "lo, bridge, two veth ends");
    });
}

#[test]
fn bridge_mtu_and_mac_stay_put_when_ports_join() {
    // Kernel quirks this guards against: an MTU given at creation is re-tuned to the port
    // minimum, and a bridge without an explicit MAC takes its lowest port MAC.
    in_netns(|k| async move {
        k.ensure_bridge(&bridge_spec(Some(1400), false))
            .await
            .unwrap();
        k.ensure_veth(&veth_spec(BR, None)).await.unwrap();
        assert_eq!(link(HOST)["mtu"], 1500);
        let bridge = link(BR);
        assert_eq!(bridge["mtu"], 1400);
        assert_eq!(bridge["address"], format_mac(&bridge_mac(BR)));
    });
}

#[test]
fn traffic_crosses_the_bridge_between_two_namespaces_despite_forward_drop() {
    in_netns(|k| async move {
        // What dockerd does to FORWARD in the host namespace, here in ours.
        let tools = iptables_tools();
        for tool in &tools {
            run(tool, &["-w", "-N", "DOCKER-USER"]).unwrap();
            run(tool, &["-w", "-P", "FORWARD", "DROP"]).unwrap();
            run(tool, &["-w", "-I", "FORWARD", "-j", "DOCKER-USER"]).unwrap();
        }
        k.ensure_bridge(&bridge_spec(None, false)).await.unwrap();

        let sandboxes = [PeerNs::spawn().unwrap(), PeerNs::spawn().unwrap()];
        for (i, sandbox) in sandboxes.iter().enumerate() {
            let n = i + 1;
            let (host, peer) = (format!("slvhtest000000{n}"), format!("slvctest000000{n}"));
            k.ensure_veth(&VethSpec {
                host,
                peer: peer.clone(),
                bridge: BR.into(),
                mtu: None,
                peer_mac: [0x02, 0x42, 0xac, 0x11, 0x00, n as u8 + 1],
            })
            .await
            .unwrap();
            // What Docker does with the container end.
            let pid = sandbox.pid().to_string();
            run("ip", &["link", "set", &peer, "netns", &pid]).unwrap();
            let addr = format!("10.77.0.{}/24", n + 1);
            sandbox
                .run("ip", &["addr", "add", &addr, "dev", &peer])
                .unwrap();
            sandbox.run("ip", &["link", "set", &peer, "up"]).unwrap();
        }
        let ping = |to: &str| sandboxes[0].run("ping", &["-c", "1", "-W", "2", to]);

        ping("10.77.0.1").unwrap(); // the gateway
        ping("10.77.0.3").unwrap(); // bridged to the other sandbox, through FORWARD

        if !tools.contains(&"iptables") {
            return;
        }
        assert_eq!(sysctl("net/bridge/bridge-nf-call-iptables"), "1");
        // Without our rule, FORWARD's DROP policy stops bridged traffic: the rule is needed.
        Firewall::new().remove_bridge(BR).await.unwrap();
        assert!(
            ping("10.77.0.3").is_err(),
            "bridged ping passed without the rule"
        );
        ping("10.77.0.1").unwrap(); // INPUT is unaffected
    });
}

#[test]
fn delete_link_removes_both_ends_and_is_idempotent() {
    in_netns(|k| async move {
        k.ensure_bridge(&bridge_spec(None, false)).await.unwrap();
        k.ensure_veth(&veth_spec(BR, None)).await.unwrap();
        k.delete_link(HOST).await.unwrap();
        let names = link_names();
        assert!(!names.iter().any(|n| n == HOST || n == PEER), "{names:?}");
        k.delete_link(HOST).await.unwrap();
        k.delete_link(PEER).await.unwrap();
        assert!(names.iter().any(|n| n == BR), "bridge stays");
    });
}

#[test]
fn delete_bridge_removes_link_and_rule_and_is_idempotent() {
    in_netns(|k| async move {
        k.ensure_bridge(&bridge_spec(None, false)).await.unwrap();
        k.delete_bridge(BR).await.unwrap();
        assert!(try_ip_json(&["link", "show", "dev", BR]).is_err());
        assert!(!link_names().iter().any(|n| n == BR));
        for tool in iptables_tools() {
            assert_eq!(docker_user_rules(tool, BR), 0, "{tool}");
        }
        k.delete_bridge(BR).await.unwrap();
    });
}

#[test]
fn ensure_veth_without_bridge_fails_and_leaves_no_veth() {
    in_netns(|k| async move {
        let err = k
            .ensure_veth(&veth_spec("slbrmissing", None))
            .await
            .unwrap_err();
        assert!(
            err.to_string().contains("slbrmissing does not exist"),
            "{err}"
        );
        assert_eq!(link_names(), ["lo"]);
    });
}

#[test]
fn ensure_veth_rolls_back_when_attaching_fails() {
    in_netns(|k| async move {
        // `lo` exists but is no bridge: attaching fails (within the creating request, which
        // the kernel then undoes, or after it, which sluice undoes).
        let err = k.ensure_veth(&veth_spec("lo", None)).await.unwrap_err();
        assert!(err.to_string().contains("master"), "{err}");
        assert_eq!(link_names(), ["lo"]);
    });
}

#[test]
fn ensure_bridge_with_invalid_mtu_fails_and_leaves_no_bridge() {
    in_netns(|k| async move {
        let err = k
            .ensure_bridge(&bridge_spec(Some(10), false))
            .await
            .unwrap_err();
        assert!(err.to_string().contains("mtu 10"), "{err}");
        assert_eq!(link_names(), ["lo"]);
        for tool in iptables_tools() {
            assert_eq!(docker_user_rules(tool, BR), 0, "{tool}");
        }
    });
}

#[test]
fn ensure_bridge_rolls_back_when_the_firewall_fails() {
    if !require_root() {
        return;
    }
    let _ns = NetNs::enter().unwrap();
    let rt = current_thread_runtime();
    rt.block_on(async {
        // `false` as iptables: every command fails, after the bridge is fully configured.
        let k = LinuxKernel::with_parts(
            Netlink::connect().unwrap(),
            Firewall::with_tools(vec!["/bin/false".into()]),
        );
        let err = k
            .ensure_bridge(&bridge_spec(None, false))
            .await
            .unwrap_err();
        assert!(err.to_string().contains("DOCKER-USER"), "{err}");
        assert_eq!(link_names(), ["lo"]);
    });
}

#[test]
fn sluice_links_lists_only_sluice_links() {
    in_netns(|k| async move {
        k.ensure_bridge(&bridge_spec(None, false)).await.unwrap();
        k.ensure_veth(&veth_spec(BR, None)).await.unwrap();
        // "sl" alone is not a sluice prefix. (veth: dummy is not built into every kernel.)
        run(
            "ip",
            &[
                "link",
                "add",
                "notsluice",
                "type",
                "veth",
                "peer",
                "name",
                "slother",
            ],
        )
        .unwrap();
        // A sluice-named link of another sluice daemon (another plugin name) is not ours,
        // and neither is one without any mark.
        run(
            "ip",
            &[
                "link",
                "add",
                "slvhforeign0001",
                "type",
                "veth",
                "peer",
                "name",
                "slvcforeign0001",
            ],
        )
        .unwrap();
        run(
            "ip",
            &["link", "set", "slvhforeign0001", "alias", "sluice:other"],
        )
        .unwrap();
        assert_eq!(k.sluice_links().await.unwrap(), [BR, PEER, HOST]);
        let aliases = ip_json(&["link", "show", "dev", HOST]);
        assert_eq!(aliases[0]["ifalias"], "sluice:sluice");
    });
}

#[test]
fn firewall_rule_is_added_once_kept_first_and_removed_exactly() {
    in_netns(|_k| async move {
        let tools = iptables_tools();
        if tools.is_empty() {
            eprintln!("skipped: no iptables");
            return;
        }
        // Someone else's rule in DOCKER-USER (older dockerd adds a RETURN) must survive.
        for tool in &tools {
            run(tool, &["-w", "-N", "DOCKER-USER"]).unwrap();
            run(tool, &["-w", "-A", "DOCKER-USER", "-j", "RETURN"]).unwrap();
        }
        let fw = Firewall::new();
        fw.allow_bridge(BR, false).await.unwrap();
        fw.allow_bridge(BR, false).await.unwrap();
        for tool in &tools {
            assert_eq!(docker_user_rules(tool, BR), 1, "{tool}");
            let listing = run(tool, &["-w", "-S", "DOCKER-USER"]).unwrap();
            let lines: Vec<&str> = listing.lines().collect();
            assert_eq!(
                lines,
                [
                    "-N DOCKER-USER",
                    &format!("-A DOCKER-USER -i {BR} -o {BR} -j ACCEPT"),
                    "-A DOCKER-USER -j RETURN",
                ],
                "{tool}"
            );
            // A duplicate (e.g. from a race) is removed too.
            run(
                tool,
                &[
                    "-w",
                    "-I",
                    "DOCKER-USER",
                    "-i",
                    BR,
                    "-o",
                    BR,
                    "-j",
                    "ACCEPT",
                ],
            )
            .unwrap();
        }
        fw.remove_bridge(BR).await.unwrap();
        fw.remove_bridge(BR).await.unwrap();
        for tool in &tools {
            let listing = run(tool, &["-w", "-S", "DOCKER-USER"]).unwrap();
            assert_eq!(
                listing.lines().collect::<Vec<_>>(),
                ["-N DOCKER-USER", "-A DOCKER-USER -j RETURN"],
                "{tool}"
            );
        }
    });
}

#[test]
fn firewall_creates_a_missing_docker_user_chain() {
    in_netns(|_k| async move {
        let tools = iptables_tools();
        let fw = Firewall::new();
        fw.remove_bridge(BR).await.unwrap(); // no chain yet: nothing to do
        fw.allow_bridge(BR, true).await.unwrap();
        fw.allow_bridge(BR, true).await.unwrap();
        for tool in &tools {
            assert_eq!(docker_user_rules(tool, BR), 1, "{tool}");
            // With a way out: also out of the bridge, and back in (replies, DNAT), once each.
            let listing = run(tool, &["-w", "-S", "DOCKER-USER"]).unwrap();
            let ours: Vec<&str> = listing.lines().filter(|l| l.contains(BR)).collect();
            assert_eq!(ours.len(), 3, "{tool}: {ours:?}");
            assert!(
                ours.contains(&format!("-A DOCKER-USER -i {BR} ! -o {BR} -j ACCEPT").as_str()),
                "{tool}: {ours:?}"
            );
            assert!(
                ours.iter().any(
                    |l| l.starts_with(&format!("-A DOCKER-USER -o {BR} -m conntrack"))
                        && l.contains("DNAT")
                ),
                "{tool}: {ours:?}"
            );
        }
        fw.remove_bridge(BR).await.unwrap();
        for tool in &tools {
            assert_eq!(docker_user_rules(tool, BR), 0, "{tool}");
            let listing = run(tool, &["-w", "-S", "DOCKER-USER"]).unwrap(); // the chain stays
            assert!(!listing.contains(BR), "{tool}: {listing}");
        }
    });
}
