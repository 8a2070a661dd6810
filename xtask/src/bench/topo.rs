//! The topologies under test, each in namespaces of its own (all named `sbn-…`, so a run that
//! was killed is cleaned up by the next one). Adding a topology is one variant and one
//! `build_*` function.

use std::fmt::Write as _;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use anyhow::{Context as _, Result, bail};
use serde::Serialize;

use super::api::Daemon;
use super::engine::FakeEngine;
use super::measure::in_ns;

/// Prefix of every namespace the benchmark creates.
pub(crate) const NS_PREFIX: &str = "sbn-";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub(crate) enum Topology {
    /// The limit: a veth pair between two namespaces.
    BareVeth,
    /// Docker's bridge as Docker programs it: Linux bridge + br_netfilter + iptables with
    /// `rules` extra rules every forwarded packet traverses.
    DockerBridge { rules: usize },
    /// sluice's bridge mode built by a real `sluice daemon` over its plugin API, with a
    /// policy of `entries` CIDR entries, with or without `--fast-path`.
    SluiceBridge { entries: usize, fast_path: bool },
    /// Two host namespaces joined by a plain kernel VXLAN pair over a veth underlay.
    KernelVxlan,
    /// sluice's VXLAN mode between two host namespaces (an underlay veth, etcd, a real
    /// daemon on each), one endpoint on each, a policy of [`OVERLAY_ENTRIES`] entries.
    SluiceVxlan,
    /// sluice's macvlan mode (a real daemon, the parent a veth into a LAN namespace), two
    /// endpoints on the parent, a policy of [`OVERLAY_ENTRIES`] entries.
    SluiceMacvlan,
}

/// Policy entries of the sluice VXLAN and macvlan topologies (as the bridge target's 10k).
pub(crate) const OVERLAY_ENTRIES: usize = 10_000;

fn short(n: usize) -> String {
    match n {
        0 => "0".into(),
        n if n % 1_000_000 == 0 => format!("{}M", n / 1_000_000),
        n if n % 1000 == 0 => format!("{}k", n / 1000),
        n => n.to_string(),
    }
}

impl Topology {
    /// Stable identifier used in JSON and tables.
    pub(crate) fn id(&self) -> String {
        match self {
            Self::BareVeth => "bare-veth".into(),
            Self::DockerBridge { rules } => format!("docker-bridge-{}", short(*rules)),
            Self::SluiceBridge {
                entries,
                fast_path: true,
            } => format!("sluice-bridge-{}", short(*entries)),
            Self::SluiceBridge {
                entries,
                fast_path: false,
            } => format!("sluice-bridge-{}-nofast", short(*entries)),
            Self::KernelVxlan => "kernel-vxlan".into(),
            Self::SluiceVxlan => "sluice-vxlan".into(),
            Self::SluiceMacvlan => "sluice-macvlan".into(),
        }
    }

    pub(crate) fn describe(&self) -> String {
        match self {
            Self::BareVeth => "bare veth pair (the limit)".into(),
            Self::DockerBridge { rules } => format!(
                "Docker bridge: Linux bridge + br_netfilter + iptables, {} rules in FORWARD",
                short(*rules)
            ),
            Self::SluiceBridge { entries, fast_path } => format!(
                "sluice bridge mode (real daemon), {} policy entries{}",
                short(*entries),
                if *fast_path { "" } else { ", fast path off" }
            ),
            Self::KernelVxlan => "plain kernel VXLAN pair, no policy (baseline)".into(),
            Self::SluiceVxlan => format!(
                "sluice VXLAN (two hosts, etcd, real daemons), {} policy entries",
                short(OVERLAY_ENTRIES)
            ),
            Self::SluiceMacvlan => format!(
                "sluice macvlan (real daemon, veth parent), {} policy entries",
                short(OVERLAY_ENTRIES)
            ),
        }
    }

    /// Why this build cannot run the topology, if it cannot.
    pub(crate) fn unavailable(&self) -> Option<&'static str> {
        match self {
            Self::SluiceVxlan if !on_path("etcd") => {
                Some("etcd is not installed (`cargo xtask setup` installs it)")
            }
            _ => None,
        }
    }
}

/// A built topology: traffic goes from `client` to `server_ip` in `server`.
#[derive(Debug, Clone)]
pub(crate) struct Built {
    pub(crate) topology: Topology,
    pub(crate) client: String,
    pub(crate) server: String,
    pub(crate) server_ip: Ipv4Addr,
}

/// Everything the benchmark created; dropping it removes all of it, even after an error.
#[derive(Debug)]
pub(crate) struct Lab {
    /// Holder processes, one per namespace (`unshare -n cat`): a namespace is named by its
    /// holder's PID and lives as long as the holder, whatever happens to /run/netns.
    holders: Vec<std::process::Child>,
    pub(crate) daemons: Vec<Daemon>,
    pub(crate) run_dir: PathBuf,
    pub(crate) sluice: PathBuf,
    engine: Option<FakeEngine>,
    /// Other processes (etcd), ended by PID when dropped.
    children: Vec<Child>,
}

pub(crate) fn sh(program: &str, args: &[&str]) -> Result<()> {
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("run {program}"))?;
    if !out.status.success() {
        bail!(
            "{program} {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

fn ip(args: &[&str]) -> Result<()> {
    sh("ip", args)
}

/// Removes what a previous (killed) run left: `sbn-*` namespaces and pins.
pub(crate) fn remove_leftovers() {
    if let Ok(out) = Command::new("ip").args(["netns", "list"]).output() {
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            if let Some(name) = line.split_whitespace().next()
                && name.starts_with(NS_PREFIX)
            {
                let _ = ip(&["netns", "del", name]);
            }
        }
    }
    let _ = std::fs::remove_dir_all(super::bpf_root());
}

impl Lab {
    pub(crate) fn new(sluice: PathBuf, run_dir: PathBuf) -> Self {
        Self {
            holders: Vec::new(),
            daemons: Vec::new(),
            run_dir,
            sluice,
            engine: None,
            children: Vec::new(),
        }
    }

    /// A new network namespace, named by the PID of the process holding it (`_name` is
    /// for the reader). Held by a process rather than bind-mounted under /run/netns, so that
    /// other tools sweeping /run/netns cannot pull it away mid-run.
    pub(crate) fn netns(&mut self, _name: &str) -> Result<String> {
        // `cat` on a pipe from us: if the benchmark dies, the pipe closes and the holder (and
        // with it the namespace) goes too.
        let child = Command::new("unshare")
            .args(["--net", "--", "cat"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .context("start a namespace holder (unshare)")?;
        let pid = child.id().to_string();
        self.holders.push(child);
        let ours = std::fs::read_link("/proc/self/ns/net")?;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while std::fs::read_link(format!("/proc/{pid}/ns/net"))
            .ok()
            .as_ref()
            == Some(&ours)
            || std::fs::read_link(format!("/proc/{pid}/ns/net")).is_err()
        {
            if std::time::Instant::now() > deadline {
                bail!("namespace holder {pid} never entered its namespace");
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        ipn(&pid, &["link", "set", "lo", "up"])?;
        Ok(pid)
    }

    pub(crate) fn build(&mut self, t: Topology, index: u8) -> Result<Built> {
        match t {
            Topology::BareVeth => self.bare(t),
            Topology::DockerBridge { rules } => self.docker_bridge(t, rules, index),
            Topology::SluiceBridge { entries, .. } => self.sluice_bridge(t, entries, index),
            Topology::KernelVxlan => self.kernel_vxlan(t, index),
            Topology::SluiceVxlan => self.sluice_vxlan(t, index),
            Topology::SluiceMacvlan => self.sluice_macvlan(t, index),
        }
    }

    fn bare(&mut self, topology: Topology) -> Result<Built> {
        let c = self.netns("bare-c")?;
        let s = self.netns("bare-s")?;
        veth(&c, "eth0", &s, "eth0")?;
        addr_up(&c, "eth0", "10.250.0.1/30")?;
        addr_up(&s, "eth0", "10.250.0.2/30")?;
        Ok(Built {
            topology,
            client: c,
            server: s,
            server_ip: Ipv4Addr::new(10, 250, 0, 2),
        })
    }

    fn docker_bridge(&mut self, topology: Topology, rules: usize, k: u8) -> Result<Built> {
        let tag = format!("d{}", short(rules));
        let h = self.netns(&format!("{tag}-h"))?;
        let c = self.netns(&format!("{tag}-c"))?;
        let s = self.netns(&format!("{tag}-s"))?;
        ipn(&h, &["link", "add", "br0", "type", "bridge"])?;
        addr_up(&h, "br0", &format!("10.251.{k}.1/24"))?;
        for (ns, host) in [(&c, 2), (&s, 3)] {
            let port = format!("v{host}");
            veth(ns, "eth0", &h, &port)?;
            ipn(&h, &["link", "set", &port, "master", "br0", "up"])?;
            addr_up(ns, "eth0", &format!("10.251.{k}.{host}/24"))?;
            ipn(
                ns,
                &["route", "add", "default", "via", &format!("10.251.{k}.1")],
            )?;
        }
        if !Path::new("/proc/sys/net/bridge").exists() {
            // Docker loads br_netfilter the same way; without kmod, say so.
            sh("modprobe", &["br_netfilter"]).context("br_netfilter is not loaded")?;
        }
        run_in(
            &h,
            "sysctl",
            &["-qw", "net.bridge.bridge-nf-call-iptables=1"],
        )?;
        run_in(&h, "sysctl", &["-qw", "net.ipv4.ip_forward=1"])?;
        let rules_text = docker_iptables("br0", rules);
        let mut child = in_ns(&h, None, "iptables-restore")
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .context("run iptables-restore")?;
        if let Some(mut stdin) = child.stdin.take() {
            std::io::Write::write_all(&mut stdin, rules_text.as_bytes())?;
        }
        if !child.wait()?.success() {
            bail!("iptables-restore failed in {h}");
        }
        Ok(Built {
            topology,
            client: c,
            server: s,
            server_ip: Ipv4Addr::new(10, 251, k, 3),
        })
    }

    fn sluice_bridge(&mut self, topology: Topology, entries: usize, k: u8) -> Result<Built> {
        let fast = matches!(
            topology,
            Topology::SluiceBridge {
                fast_path: true,
                ..
            }
        );
        let tag = format!("s{}{}", short(entries), if fast { "" } else { "n" });
        let h = self.netns(&format!("{tag}-h"))?;
        let c = self.netns(&format!("{tag}-c"))?;
        let s = self.netns(&format!("{tag}-s"))?;
        let name = format!("{NS_PREFIX}{tag}");
        let extra: &[&str] = if fast { &[] } else { &["--fast-path=false"] };
        if self.engine.is_none() {
            self.engine = Some(FakeEngine::start(&self.run_dir.join("docker.sock"))?);
        }
        let engine = self.engine.clone().context("no engine")?;
        let docker_host = format!("unix://{}", engine.socket.display());
        let daemon = Daemon::start(&self.sluice, &h, &name, &self.run_dir, &docker_host, extra)?;
        let net = format!("{:0<64}", format!("be9c{k:02x}"));
        daemon.create_network(
            &net,
            &format!("10.252.{k}.0/24"),
            &format!("10.252.{k}.1/24"),
        )?;
        for (ns, host, role) in [(&c, 2u8, "client"), (&s, 3, "server")] {
            let ep = format!("{:0<64}", format!("e{k:02x}{host}"));
            let address = format!("10.252.{k}.{host}/24");
            let sandbox = format!("/proc/{ns}/ns/net");
            engine.add(&format!("{tag}-{role}"), &sandbox, &net, &ep);
            let (src, mac) =
                daemon.create_and_join(&net, &ep, &address, &sandbox, &[("role", role)])?;
            plumb(
                &h,
                ns,
                &src,
                mac.as_deref(),
                &address,
                &format!("10.252.{k}.1"),
            )?;
        }
        wait_named(&daemon)?;
        apply_policy(&daemon, entries)?;
        self.daemons.push(daemon);
        Ok(Built {
            topology,
            client: c,
            server: s,
            server_ip: Ipv4Addr::new(10, 252, k, 3),
        })
    }

    /// Two "hosts" joined by an underlay veth (10.249.k.0/24), etcd on the first, a sluice
    /// daemon with `--cluster` on each, one `mode=vxlan` network (10.248.k.0/24, through
    /// sluice's IPAM as dockerd would ask), the client on host a and the server on host b.
    fn sluice_vxlan(&mut self, topology: Topology, k: u8) -> Result<Built> {
        let ha = self.netns("svx-ha")?;
        let hb = self.netns("svx-hb")?;
        let c = self.netns("svx-c")?;
        let s = self.netns("svx-s")?;
        veth(&ha, "u0", &hb, "u0")?;
        let (ua, ub) = (format!("10.249.{k}.1"), format!("10.249.{k}.2"));
        addr_up(&ha, "u0", &format!("{ua}/24"))?;
        addr_up(&hb, "u0", &format!("{ub}/24"))?;
        let url = self.start_etcd(&ha, &ua, k)?;
        let subnet = format!("10.248.{k}.0/24");
        let mut daemons = Vec::new();
        for (host, addr, tag) in [(&ha, &ua, "a"), (&hb, &ub, "b")] {
            let name = format!("{NS_PREFIX}vx{k}{tag}");
            let cluster = ["--cluster", url.as_str(), "--advertise-addr", addr.as_str()];
            let daemon = Daemon::start(&self.sluice, host, &name, &self.run_dir, "none", &cluster)?;
            // Each host's dockerd names its network differently; the subnet joins them.
            let net = format!("{:0<64}", format!("5c{k:02x}{tag}"));
            let (pool, gateway) =
                daemon.create_ipam_network(&net, &subnet, &serde_json::json!({"mode": "vxlan"}))?;
            daemons.push((daemon, host, net, pool, gateway));
        }
        for ((daemon, host, net, pool, gateway), (ns, role)) in
            daemons.iter().zip([(&c, "client"), (&s, "server")])
        {
            let address = daemon.request_address(pool)?;
            let ep = format!("{:0<64}", format!("5e{k:02x}{role}"));
            let sandbox = format!("/proc/{ns}/ns/net");
            let (src, mac) =
                daemon.create_and_join(net, &ep, &address, &sandbox, &[("role", role)])?;
            plumb(host, ns, &src, mac.as_deref(), &address, gateway)?;
        }
        let server_ip = server_address(&s)?;
        // One cluster-wide policy, applied on host a; wait until host b enforces it too.
        apply_policy(&daemons[0].0, OVERLAY_ENTRIES)?;
        wait_policies(&daemons[1].0, policy_docs(OVERLAY_ENTRIES, "{}").len())?;
        self.daemons
            .extend(daemons.into_iter().map(|(daemon, ..)| daemon));
        Ok(Built {
            topology,
            client: c,
            server: s,
            server_ip,
        })
    }

    /// etcd in `ns`, listening on `addr`; returns the `--cluster` URL.
    fn start_etcd(&mut self, ns: &str, addr: &str, k: u8) -> Result<String> {
        let client = format!("http://{addr}:2379");
        let data = self.run_dir.join(format!("etcd{k}"));
        let log = std::fs::File::create(self.run_dir.join(format!("etcd{k}.log")))?;
        let child = in_ns(ns, None, "etcd")
            .arg("--data-dir")
            .arg(&data)
            .args([
                "--listen-client-urls",
                &client,
                "--advertise-client-urls",
                &client,
            ])
            .args(["--listen-peer-urls", "http://127.0.0.1:2380"])
            .args(["--initial-advertise-peer-urls", "http://127.0.0.1:2380"])
            .args(["--initial-cluster", "default=http://127.0.0.1:2380"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("start etcd")?;
        self.children.push(child);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while !in_ns(ns, None, "etcdctl")
            .args(["--endpoints", &client, "endpoint", "health"])
            .env("ETCDCTL_API", "3")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
        {
            if std::time::Instant::now() > deadline {
                bail!("etcd did not become healthy in 30 s");
            }
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
        Ok(format!("etcd://{addr}:2379"))
    }

    /// A host namespace whose parent `lan0` is a veth into a LAN namespace (10.247.k.254),
    /// one `mode=macvlan` network on it (10.247.k.0/24), client and server as macvlan
    /// endpoints on the same parent (macvlan bridge mode: they talk without the LAN).
    fn sluice_macvlan(&mut self, topology: Topology, k: u8) -> Result<Built> {
        let h = self.netns("smv-h")?;
        let lan = self.netns("smv-lan")?;
        let c = self.netns("smv-c")?;
        let s = self.netns("smv-s")?;
        veth(&h, "lan0", &lan, "eth0")?;
        ipn(&h, &["link", "set", "lan0", "up"])?;
        let gateway = format!("10.247.{k}.254");
        addr_up(&lan, "eth0", &format!("{gateway}/24"))?;
        let name = format!("{NS_PREFIX}mv{k}");
        let daemon = Daemon::start(&self.sluice, &h, &name, &self.run_dir, "none", &[])?;
        let net = format!("{:0<64}", format!("3a{k:02x}"));
        let generic = serde_json::json!({"mode": "macvlan", "parent": "lan0"});
        let (pool, gateway) =
            daemon.create_ipam_network(&net, &format!("10.247.{k}.0/24"), &generic)?;
        for (ns, role) in [(&c, "client"), (&s, "server")] {
            let address = daemon.request_address(&pool)?;
            let ep = format!("{:0<64}", format!("3e{k:02x}{role}"));
            let sandbox = format!("/proc/{ns}/ns/net");
            let (src, mac) =
                daemon.create_and_join(&net, &ep, &address, &sandbox, &[("role", role)])?;
            plumb(&h, ns, &src, mac.as_deref(), &address, &gateway)?;
        }
        let server_ip = server_address(&s)?;
        apply_policy(&daemon, OVERLAY_ENTRIES)?;
        self.daemons.push(daemon);
        Ok(Built {
            topology,
            client: c,
            server: s,
            server_ip,
        })
    }

    fn kernel_vxlan(&mut self, topology: Topology, k: u8) -> Result<Built> {
        let a = self.netns("kvx-a")?;
        let b = self.netns("kvx-b")?;
        veth(&a, "u0", &b, "u0")?;
        let (ua, ub) = (format!("10.253.{k}.1"), format!("10.253.{k}.2"));
        addr_up(&a, "u0", &format!("{ua}/24"))?;
        addr_up(&b, "u0", &format!("{ub}/24"))?;
        for (ns, local, remote, overlay) in [(&a, &ua, &ub, 1), (&b, &ub, &ua, 2)] {
            ipn(
                ns,
                &[
                    "link", "add", "vx0", "type", "vxlan", "id", "42", "local", local, "remote",
                    remote, "dstport", "4789", "dev", "u0",
                ],
            )?;
            addr_up(ns, "vx0", &format!("10.254.{k}.{overlay}/24"))?;
        }
        Ok(Built {
            topology,
            client: a,
            server: b,
            server_ip: Ipv4Addr::new(10, 254, k, 2),
        })
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        // Daemons first (they hold the plugin sockets), then etcd, then the namespaces and
        // their links.
        self.daemons.clear();
        for mut child in self.children.drain(..) {
            let _ = child.kill();
            let _ = child.wait();
        }
        for mut holder in self.holders.drain(..).rev() {
            let _ = holder.kill();
            let _ = holder.wait();
        }
        let _ = std::fs::remove_dir_all(super::bpf_root());
    }
}

fn veth(ns_a: &str, a: &str, ns_b: &str, b: &str) -> Result<()> {
    ip(&[
        "link", "add", a, "netns", ns_a, "type", "veth", "peer", "name", b, "netns", ns_b,
    ])
}

/// What libnetwork does after Join: moves the link `src` from `host` into the sandbox `ns`,
/// renames it `eth0`, gives it the endpoint's MAC and address, routes through `gateway`.
fn plumb(
    host: &str,
    ns: &str,
    src: &str,
    mac: Option<&str>,
    address: &str,
    gateway: &str,
) -> Result<()> {
    ipn(host, &["link", "set", src, "netns", ns])?;
    ipn(ns, &["link", "set", src, "name", "eth0"])?;
    if let Some(mac) = mac {
        ipn(ns, &["link", "set", "eth0", "address", mac])?;
    }
    addr_up(ns, "eth0", address)?;
    ipn(ns, &["route", "add", "default", "via", gateway])
}

/// The IPv4 address of `eth0` in `ns`.
fn server_address(ns: &str) -> Result<Ipv4Addr> {
    let out = in_ns(ns, None, "ip")
        .args(["-4", "-o", "addr", "show", "dev", "eth0"])
        .output()
        .context("ip addr show")?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.split_whitespace()
        .skip_while(|w| *w != "inet")
        .nth(1)
        .and_then(|a| a.split('/').next())
        .and_then(|a| a.parse().ok())
        .with_context(|| format!("no IPv4 address on eth0 in {ns}: {text}"))
}

/// Until the resolver has named the endpoints, they are "pending" and dropped.
fn wait_named(daemon: &Daemon) -> Result<()> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let (_, body) =
            super::api::request(&daemon.admin, "GET", "/v1/endpoints", "text/plain", "")?;
        if !body.contains("\"pending\"") {
            return Ok(());
        }
        if std::time::Instant::now() > deadline {
            bail!("the endpoints' identities stayed pending for 20 s");
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

/// The benchmark's policy of `entries` entries (none for 0), document by document.
fn apply_policy(daemon: &Daemon, entries: usize) -> Result<()> {
    if entries > 0 {
        for doc in policy_docs(entries, "{}") {
            daemon
                .apply_policy(&doc)
                .with_context(|| format!("apply a policy of {entries} entries"))?;
        }
    }
    Ok(())
}

/// Waits until `daemon` lists the `docs` benchmark policies (applied on another host, they
/// arrive through etcd), then until its endpoints' entries are in place.
fn wait_policies(daemon: &Daemon, docs: usize) -> Result<()> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    let last = format!("bench-{}", docs.saturating_sub(1));
    loop {
        let (_, body) =
            super::api::request(&daemon.admin, "GET", "/v1/policies", "text/plain", "")?;
        if body.contains(&last) {
            return Ok(());
        }
        if std::time::Instant::now() > deadline {
            bail!("the policy did not reach the second host within 120 s");
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}

fn on_path(tool: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
}

fn addr_up(ns: &str, dev: &str, cidr: &str) -> Result<()> {
    ipn(ns, &["addr", "add", cidr, "dev", dev])?;
    ipn(ns, &["link", "set", dev, "up"])
}

/// `ip ARGS` inside namespace `ns` (a holder PID).
fn ipn(ns: &str, args: &[&str]) -> Result<()> {
    let net = format!("--net=/proc/{ns}/ns/net");
    let mut full = vec![net.as_str(), "ip"];
    full.extend_from_slice(args);
    sh("nsenter", &full)
}

fn run_in(ns: &str, program: &str, args: &[&str]) -> Result<()> {
    let status = in_ns(ns, None, program)
        .args(args)
        .stdout(Stdio::null())
        .status()
        .with_context(|| format!("run {program} in {ns}"))?;
    if !status.success() {
        bail!("{program} {} failed in {ns}", args.join(" "));
    }
    Ok(())
}

/// Docker 20.10's filter table for one bridge network, plus `extra` non-matching rules at the
/// top of FORWARD (what many networks' isolation rules or DOCKER-USER rules amount to: rules
/// every forwarded packet walks before the ESTABLISHED accept).
pub(crate) fn docker_iptables(bridge: &str, extra: usize) -> String {
    let mut s = String::from(
        "*filter\n:INPUT ACCEPT [0:0]\n:FORWARD DROP [0:0]\n:OUTPUT ACCEPT [0:0]\n\
         :DOCKER - [0:0]\n:DOCKER-ISOLATION-STAGE-1 - [0:0]\n:DOCKER-ISOLATION-STAGE-2 - [0:0]\n\
         :DOCKER-USER - [0:0]\n",
    );
    for i in 0..extra {
        let (hi, lo) = ((i >> 8) & 0xff, i & 0xff);
        let _ = writeln!(
            s,
            "-A FORWARD -s 198.18.{hi}.{lo}/32 -d 198.19.{hi}.{lo}/32 -p tcp --dport 9 -j DROP"
        );
    }
    let _ = write!(
        s,
        "-A FORWARD -j DOCKER-USER\n-A FORWARD -j DOCKER-ISOLATION-STAGE-1\n\
         -A FORWARD -o {bridge} -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT\n\
         -A FORWARD -o {bridge} -j DOCKER\n-A FORWARD -i {bridge} ! -o {bridge} -j ACCEPT\n\
         -A FORWARD -i {bridge} -o {bridge} -j ACCEPT\n\
         -A DOCKER-ISOLATION-STAGE-1 -i {bridge} ! -o {bridge} -j DOCKER-ISOLATION-STAGE-2\n\
         -A DOCKER-ISOLATION-STAGE-1 -j RETURN\n-A DOCKER-ISOLATION-STAGE-2 -o {bridge} -j DROP\n\
         -A DOCKER-ISOLATION-STAGE-2 -j RETURN\n-A DOCKER-USER -j RETURN\nCOMMIT\n"
    );
    s
}

/// Largest number of entries per policy document: the admin API takes bodies up to 2 MiB.
const ENTRIES_PER_DOC: usize = 40_000;

/// Policies for every endpoint with `entries` peer entries in all: every sluice endpoint (so
/// the benchmark's traffic is allowed) and `entries - 1` distinct /32s it never matches, in
/// documents of at most [`ENTRIES_PER_DOC`] entries (applied one by one).
///
/// `selector` (YAML flow map) picks the endpoints the policies are for: the `POLICY` map holds
/// one entry per selected endpoint and peer.
pub(crate) fn policy_docs(entries: usize, selector: &str) -> Vec<String> {
    let mut docs = Vec::new();
    let mut i = 0;
    while i < entries.max(1) {
        let mut s = format!(
            "name: bench-{}\nselector: {selector}\ningress:\n  - action: allow\n    from:\n",
            docs.len()
        );
        let end = (i + ENTRIES_PER_DOC).min(entries.max(1));
        for n in i..end {
            if n == 0 {
                s.push_str("      - selector: {}\n");
            } else {
                let _ = writeln!(
                    s,
                    "      - cidr: 172.{}.{}.{}/32",
                    16 + ((n >> 16) & 0x0f),
                    (n >> 8) & 0xff,
                    n & 0xff
                );
            }
        }
        docs.push(s);
        i = end;
    }
    docs
}

/// Where benchmark daemons keep sockets, state and logs.
pub(crate) fn run_dir() -> Result<PathBuf> {
    let dir = Path::new("/run").join(super::tag());
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_stable_and_unique() {
        let ids: Vec<String> = [
            Topology::BareVeth,
            Topology::DockerBridge { rules: 1000 },
            Topology::SluiceBridge {
                entries: 100_000,
                fast_path: true,
            },
            Topology::SluiceBridge {
                entries: 100_000,
                fast_path: false,
            },
            Topology::KernelVxlan,
            Topology::SluiceVxlan,
            Topology::SluiceMacvlan,
        ]
        .iter()
        .map(Topology::id)
        .collect();
        assert_eq!(
            ids,
            [
                "bare-veth",
                "docker-bridge-1k",
                "sluice-bridge-100k",
                "sluice-bridge-100k-nofast",
                "kernel-vxlan",
                "sluice-vxlan",
                "sluice-macvlan"
            ]
        );
        assert!(Topology::SluiceMacvlan.unavailable().is_none());
        assert!(Topology::BareVeth.unavailable().is_none());
    }

    #[test]
    fn docker_rules_count_and_shape() {
        let text = docker_iptables("br0", 1000);
        let extra = text.lines().filter(|l| l.contains("198.18.")).count();
        assert_eq!(extra, 1000);
        assert!(text.ends_with("COMMIT\n"));
        assert!(text.contains("--ctstate RELATED,ESTABLISHED -j ACCEPT"));
        // Distinct rules.
        let mut lines: Vec<&str> = text.lines().filter(|l| l.contains("198.18.")).collect();
        lines.sort_unstable();
        lines.dedup();
        assert_eq!(lines.len(), 1000);
    }

    #[test]
    fn policy_has_the_asked_number_of_distinct_entries() {
        let docs = policy_docs(100_000, "{}");
        assert_eq!(docs.len(), 3);
        assert!(docs.iter().all(|d| d.len() < 2 << 20));
        let y = docs.concat();
        let mut cidrs: Vec<&str> = y.lines().filter(|l| l.contains("cidr:")).collect();
        assert_eq!(cidrs.len(), 99_999);
        cidrs.sort_unstable();
        cidrs.dedup();
        assert_eq!(cidrs.len(), 99_999);
        assert_eq!(y.matches("      - selector: {}\n").count(), 1);
        assert!(docs[2].starts_with("name: bench-2\n"));
    }
}
