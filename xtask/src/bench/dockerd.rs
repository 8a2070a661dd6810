//! `docker run` and `docker network connect` timed against a real, private dockerd (Debian's
//! docker.io 20.10, launched by `sluice-dockerd`, the crate the Docker tests use), with the
//! real `sluice daemon` (release build) as its legacy plugin, and Docker's own bridge driver
//! in the same dockerd, measured interleaved at 0 / 100 / 500 existing endpoints.
//!
//! Everything runs in one network namespace of its own (dockerd, its containerd, sluice, the
//! bridges and the prober), so the host's routes and iptables are untouched and other work on
//! the machine cannot collide with its subnets.
//!
//! **"Answers"**, identically for both drivers: the clock starts when the docker CLI is
//! launched and stops when a TCP connection from the namespace dockerd runs in (where both
//! networks' gateways are) to the container's address on port 80 is accepted by the
//! container's `busybox httpd`. Probing starts once the CLI has returned (a probe sent
//! before the address exists would leave an unresolved neighbour entry whose retry timer,
//! not the driver, would decide the result) and repeats every 2 ms. Every probed address is
//! used once per run, so no neighbour entry of an earlier container is ever reused.

use std::fs::File;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use serde::Serialize;
use sluice_dockerd::Dockerd;

use super::api::{Daemon, DaemonPaths};
use super::stats::{Summary, paired_ratios, percentile};
use super::topo::Lab;

/// The image every container runs (built with `docker import` from busybox-static).
const IMAGE: &str = "sluice-bench/busybox:latest";
/// Prefix of the suite's scratch directories, `/tmp/sbdk-<pid>` (dockerd in `d/`, sluice in
/// `s/`; short, as unix socket paths are limited) and pin directories
/// (`/sys/fs/bpf/sbdk-<pid>`): per process, so that no other benchmark run's clean-up
/// touches them.
const SCRATCH_PREFIX: &str = "sbdk-";
/// How long one docker command may take.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(120);
/// How long a container gets to answer after its `docker run` / `network connect` returned.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(20);
/// Parallel docker CLIs creating the background endpoints.
const WORKERS: usize = 8;
/// The container command: a TCP responder on port 80.
const RESPONDER: [&str; 6] = ["httpd", "-f", "-p", "80", "-h", "/tmp"];

/// What "answers" means, for the JSON and the docs.
pub(crate) const ANSWERS: &str = "a TCP connection from dockerd's network namespace to the \
    container's address, port 80 (busybox httpd), is accepted; timed from the launch of the \
    docker CLI, probing every 2 ms once the CLI has returned";

/// The networks: (name, driver flag, subnet, ip-range for automatic addresses, first address
/// of the probed range). Subnets live only in the benchmark's own namespace.
const SLUICE_NET: Net = Net {
    name: "bench-sluice",
    subnet: "10.67.0.0/21",
    ip_range: "10.67.0.0/22",
    probe_base: [10, 67, 4, 0],
};
const BRIDGE_NET: Net = Net {
    name: "bench-bridge",
    subnet: "10.67.8.0/21",
    ip_range: "10.67.8.0/22",
    probe_base: [10, 67, 12, 0],
};
const HOME_NET: Net = Net {
    name: "bench-home",
    subnet: "10.67.16.0/22",
    ip_range: "10.67.16.0/22",
    probe_base: [10, 67, 19, 0],
};

#[derive(Debug, Clone, Copy)]
struct Net {
    name: &'static str,
    subnet: &'static str,
    ip_range: &'static str,
    probe_base: [u8; 4],
}

impl Net {
    /// The `k`th probed address: outside the ip-range, so no automatic address collides.
    fn probe_ip(&self, k: usize) -> Ipv4Addr {
        let [a, b, c, d] = self.probe_base;
        let n = u32::from_be_bytes([a, b, c, d]) + 2 + u32::try_from(k).unwrap_or(0);
        Ipv4Addr::from(n)
    }
}

/// One timed operation: (ms until the container answered, ms until the docker CLI returned).
type Sample = Result<(f64, f64)>;

/// Latencies of one operation with one driver at one endpoint count (index = repetition).
#[derive(Debug, Clone, Default, Serialize)]
pub(crate) struct Latency {
    pub(crate) ms: Vec<Option<f64>>,
    /// Time until the docker CLI returned (the rest, up to `ms`, is the wait for an answer).
    pub(crate) cli_ms: Vec<Option<f64>>,
    pub(crate) errors: Vec<Option<String>>,
    pub(crate) p50_ms: Option<f64>,
    pub(crate) p90_ms: Option<f64>,
    pub(crate) p99_ms: Option<f64>,
}

impl Latency {
    fn push(&mut self, r: Sample) {
        match r {
            Ok((ms, cli)) => {
                self.ms.push(Some(ms));
                self.cli_ms.push(Some(cli));
                self.errors.push(None);
            }
            Err(e) => {
                self.ms.push(None);
                self.cli_ms.push(None);
                self.errors.push(Some(format!("{e:#}")));
            }
        }
    }

    fn summarise(&mut self) {
        let v: Vec<f64> = self.ms.iter().flatten().copied().collect();
        self.p50_ms = percentile(&v, 50.0);
        self.p90_ms = percentile(&v, 90.0);
        self.p99_ms = percentile(&v, 99.0);
    }
}

/// `docker run` or `docker network connect`, both drivers, at one endpoint count.
#[derive(Debug, Clone, Default, Serialize)]
pub(crate) struct OpTiming {
    /// `run` or `connect`.
    pub(crate) op: String,
    pub(crate) sluice: Latency,
    pub(crate) bridge: Latency,
    /// sluice ÷ Docker bridge, paired by repetition.
    pub(crate) ratio: Option<Summary>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub(crate) struct Level {
    /// Endpoints already on each of the two networks.
    pub(crate) endpoints: usize,
    pub(crate) ops: Vec<OpTiming>,
}

/// How long sluice spent in one kind of plugin call over the whole suite (from its log's
/// span-close lines, `SLUICE_LOG_SPAN_TIMES=1`), or waiting for an Engine API lookup.
#[derive(Debug, Clone, Default, Serialize)]
pub(crate) struct CallTiming {
    pub(crate) call: String,
    pub(crate) count: usize,
    pub(crate) p50_ms: Option<f64>,
    pub(crate) p90_ms: Option<f64>,
    pub(crate) max_ms: Option<f64>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub(crate) struct DockerTimings {
    pub(crate) dockerd_version: String,
    pub(crate) repetitions: usize,
    pub(crate) answers: String,
    pub(crate) levels: Vec<Level>,
    /// sluice's own time per plugin call (busy + idle of its span), all calls of the suite.
    pub(crate) plugin_calls: Vec<CallTiming>,
    pub(crate) errors: Vec<String>,
}

impl DockerTimings {
    /// The largest median `docker run` ratio over the endpoint counts, with its count.
    pub(crate) fn worst_run_ratio(&self) -> Option<(f64, usize)> {
        self.levels
            .iter()
            .filter_map(|l| {
                l.ops
                    .iter()
                    .find(|o| o.op == "run")
                    .and_then(|o| o.ratio)
                    .map(|r| (r.median, l.endpoints))
            })
            .max_by(|a, b| a.0.total_cmp(&b.0))
    }
}

/// Runs the suite; errors end up in the result, never abort the benchmark.
pub(crate) fn bench(
    sluice: &Path,
    run_dir: &Path,
    quick: bool,
    reps: Option<usize>,
) -> DockerTimings {
    let mut t = DockerTimings {
        repetitions: reps.unwrap_or(if quick { 6 } else { 20 }).max(1),
        answers: ANSWERS.to_owned(),
        ..DockerTimings::default()
    };
    let levels: &[usize] = if quick { &[0, 50] } else { &[0, 100, 500] };
    if let Err(e) = run(sluice, run_dir, levels, &mut t) {
        println!("bench: docker: {e:#}");
        t.errors.push(format!("{e:#}"));
    }
    t
}

/// The private dockerd, stopped with everything it ran when dropped (also after an error).
struct Engine {
    dockerd: Dockerd,
    plugin_socket: PathBuf,
}

impl Engine {
    fn docker(&self, args: &[&str]) -> Result<String> {
        let out = self
            .dockerd
            .docker(args, COMMAND_TIMEOUT)
            .map_err(anyhow::Error::msg)?;
        if !out.status.success() {
            bail!(
                "`docker {}` failed: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        if self.dockerd.running() {
            self.dockerd.remove_all_containers();
            for net in [SLUICE_NET, BRIDGE_NET, HOME_NET] {
                let _ = self.dockerd.docker_quiet(&["network", "rm", net.name]);
            }
        }
        self.dockerd.stop();
        sluice_dockerd::unmount_under(self.dockerd.dir());
        let _ = std::fs::remove_dir_all(self.dockerd.dir());
        let _ = std::fs::remove_file(&self.plugin_socket);
    }
}

/// The suite's scratch and pin directories, removed when dropped (declared first, so dropped
/// after everything that uses them).
struct Scratch {
    base: PathBuf,
    pins: PathBuf,
}

impl Scratch {
    fn new() -> Result<Self> {
        remove_leftovers();
        let name = format!("{SCRATCH_PREFIX}{}", std::process::id());
        let s = Self {
            base: Path::new("/tmp").join(&name),
            pins: Path::new("/sys/fs/bpf").join(&name),
        };
        std::fs::create_dir_all(s.base.join("s"))?;
        Ok(s)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        sluice_dockerd::unmount_under(&self.base);
        let _ = std::fs::remove_dir_all(&self.base);
        let _ = std::fs::remove_dir_all(&self.pins);
    }
}

/// Removes what runs killed earlier left: `/tmp/sbdk-<pid>` of dead processes, with their
/// dockerd stopped by the PID in its pidfile (only when that process still names the
/// directory), and their pins.
fn remove_leftovers() {
    let Ok(entries) = std::fs::read_dir("/tmp") else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix(SCRATCH_PREFIX)
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        let dir = entry.path();
        if let Ok(d) = std::fs::read_to_string(dir.join("d/dockerd.pid"))
            && let Ok(d) = d.trim().parse::<u32>()
            && sluice_dockerd::read_lossy(Path::new(&format!("/proc/{d}/cmdline")))
                .contains(&*dir.to_string_lossy())
        {
            println!("bench: docker: stopping dockerd {d} left by an earlier run");
            let _ = std::process::Command::new("kill")
                .arg(d.to_string())
                .status();
            let deadline = Instant::now() + Duration::from_secs(20);
            while Path::new(&format!("/proc/{d}")).exists() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        sluice_dockerd::unmount_under(&dir);
        let _ = std::fs::remove_dir_all(&dir);
        let _ = std::fs::remove_dir_all(Path::new("/sys/fs/bpf").join(&name));
    }
}

fn run(sluice: &Path, run_dir: &Path, levels: &[usize], t: &mut DockerTimings) -> Result<()> {
    let scratch = Scratch::new()?;
    let mut lab = Lab::new(sluice.to_path_buf(), run_dir.to_path_buf());
    let ns = lab.netns("docker")?;
    let netns = PathBuf::from(format!("/proc/{ns}/ns/net"));
    let name = format!("sbndk{}", std::process::id());
    let plugin_dir = Path::new("/run/docker/plugins");
    std::fs::create_dir_all(plugin_dir)?;
    let plugin_socket = plugin_dir.join(format!("{name}.sock"));
    let dockerd = Dockerd::new(&scratch.base.join("d"), &name, Some(netns.clone()));
    let paths = DaemonPaths {
        run_dir: scratch.base.join("s"),
        plugin: plugin_socket.clone(),
        bpf_dir: scratch.pins.join(&name),
    };
    let daemon = Daemon::start_at(sluice, &ns, &name, &paths, dockerd.docker_host(), &[])?;
    // Declared after the daemon, so dropped before it: dockerd removes its containers and
    // networks while sluice still answers.
    let engine = Engine {
        dockerd,
        plugin_socket,
    };
    println!("bench: docker: starting a private dockerd in namespace {ns}");
    engine.dockerd.start()?;
    engine.dockerd.build_busybox_image(IMAGE)?;
    t.dockerd_version = engine.docker(&["version", "--format", "{{.Server.Version}}"])?;
    for (net, driver) in [
        (SLUICE_NET, name.as_str()),
        (BRIDGE_NET, "bridge"),
        (HOME_NET, "bridge"),
    ] {
        let mut args = vec!["network", "create", "-d", driver];
        if driver != "bridge" {
            args.extend(["--ipam-driver", driver]);
        }
        args.extend(["--subnet", net.subnet, "--ip-range", net.ip_range, net.name]);
        engine.docker(&args)?;
    }
    let prober = Prober::start(&netns)?;
    let mut existing = 0;
    let mut probe_index = 0;
    for &endpoints in levels {
        add_background(&engine, existing, endpoints)?;
        existing = endpoints;
        let mut run = OpTiming {
            op: "run".into(),
            ..OpTiming::default()
        };
        let mut connect = OpTiming {
            op: "connect".into(),
            ..OpTiming::default()
        };
        for rep in 0..t.repetitions {
            // Alternate which driver goes first, so neither always follows the other.
            let order = if rep % 2 == 0 {
                [SLUICE_NET, BRIDGE_NET]
            } else {
                [BRIDGE_NET, SLUICE_NET]
            };
            for net in order {
                let (r, c) = measure_pair(&engine, &prober, net, probe_index);
                let sluice_first = net.name == SLUICE_NET.name;
                let (rl, cl) = if sluice_first {
                    (&mut run.sluice, &mut connect.sluice)
                } else {
                    (&mut run.bridge, &mut connect.bridge)
                };
                rl.push(r);
                cl.push(c);
            }
            probe_index += 1;
            println!(
                "bench: docker: {endpoints} endpoints, rep {}/{}: run sluice {} bridge {}, \
                 connect sluice {} bridge {} (ms)",
                rep + 1,
                t.repetitions,
                last(&run.sluice),
                last(&run.bridge),
                last(&connect.sluice),
                last(&connect.bridge)
            );
        }
        for op in [&mut run, &mut connect] {
            op.sluice.summarise();
            op.bridge.summarise();
            op.ratio = Summary::of(&paired_ratios(&op.sluice.ms, &op.bridge.ms));
        }
        t.levels.push(Level {
            endpoints,
            ops: vec![run, connect],
        });
    }
    // dockerd first (it calls the plugin while removing), then sluice, then the namespace.
    drop(engine);
    drop(daemon);
    let log = sluice_dockerd::read_lossy(&paths.run_dir.join(format!("{name}.log")));
    let probed: Vec<String> = (0..2 * probe_index)
        .map(|k| SLUICE_NET.probe_ip(k).to_string())
        .collect();
    t.plugin_calls = call_timings(&log, &probed);
    Ok(())
}

/// Per plugin call (span name), the durations of the span-close lines of the timed
/// containers (endpoints whose container is a `probe-…`, IPAM calls for an address in
/// `probed`), plus their Engine API identity lookups (`resolved container identity
/// latency_ms=…`). Background containers, created 8 at a time, are left out.
fn call_timings(log: &str, probed: &[String]) -> Vec<CallTiming> {
    let field = |line: &str, key: &str| -> Option<String> {
        line.split([' ', '{', '}', ':'])
            .find_map(|w| w.strip_prefix(key))
            .map(str::to_owned)
    };
    let mut probe_endpoints = std::collections::BTreeSet::new();
    let mut by_call: std::collections::BTreeMap<String, Vec<f64>> =
        std::collections::BTreeMap::new();
    for line in log.lines() {
        if line.contains("resolved container identity")
            && field(line, "name=").is_some_and(|n| n.starts_with("probe-"))
            && let Some(ep) = field(line, "endpoint=")
        {
            probe_endpoints.insert(ep);
            if let Some(ms) = field(line, "latency_ms=").and_then(|v| v.parse::<f64>().ok()) {
                by_call
                    .entry("Engine API identity lookup (after Join)".into())
                    .or_default()
                    .push(ms);
            }
        }
    }
    for line in log.lines() {
        let ours = field(line, "endpoint=").is_some_and(|e| probe_endpoints.contains(&e))
            || field(line, "address=").is_some_and(|a| probed.contains(&a));
        if ours && let Some((call, ms)) = span_close(line) {
            by_call.entry(call).or_default().push(ms);
        }
    }
    by_call
        .into_iter()
        .map(|(call, ms)| CallTiming {
            count: ms.len(),
            p50_ms: percentile(&ms, 50.0),
            p90_ms: percentile(&ms, 90.0),
            max_ms: percentile(&ms, 100.0),
            call,
        })
        .collect()
}

/// `(span name, busy + idle in ms)` of a tracing span-close line such as
/// `… INFO Join{network=… endpoint=…}: sluice_plugin::server: close time.busy=1.2ms time.idle=30µs`.
fn span_close(line: &str) -> Option<(String, f64)> {
    let (head, times) = line.split_once(": close time.busy=")?;
    let (busy, idle) = times.split_once(" time.idle=")?;
    let span = head.split_whitespace().nth(2)?;
    let name = span.split(['{', ':']).next()?.to_owned();
    Some((name, duration_ms(busy)? + duration_ms(idle.trim())?))
}

/// tracing's `Debug` of a duration (`12ns`, `1.5µs`, `3.2ms`, `1.01s`) in ms.
fn duration_ms(s: &str) -> Option<f64> {
    let split = s.find(|c: char| !(c.is_ascii_digit() || c == '.'))?;
    let (v, unit) = s.split_at(split);
    let v: f64 = v.parse().ok()?;
    Some(match unit {
        "ns" => v / 1e6,
        "µs" | "us" => v / 1e3,
        "ms" => v,
        "s" => v * 1e3,
        _ => return None,
    })
}

fn last(l: &Latency) -> String {
    match (l.ms.last(), l.errors.last()) {
        (Some(Some(v)), _) => format!("{v:.0}"),
        (_, Some(Some(_))) => "FAILED".into(),
        _ => "–".into(),
    }
}

/// One `docker run` and one `docker network connect` on `net`, each timed to an answer;
/// removes both containers afterwards (not timed).
fn measure_pair(engine: &Engine, prober: &Prober, net: Net, k: usize) -> (Sample, Sample) {
    let run_ip = net.probe_ip(2 * k).to_string();
    let connect_ip = net.probe_ip(2 * k + 1).to_string();
    let run_name = format!("probe-run-{}-{k}", net.name);
    let conn_name = format!("probe-conn-{}-{k}", net.name);
    let mut args = vec![
        "run",
        "-d",
        "--name",
        &run_name,
        "--network",
        net.name,
        "--ip",
        &run_ip,
        IMAGE,
    ];
    args.extend(RESPONDER);
    let run = timed(engine, prober, &args, &run_ip);
    let mut home = vec![
        "run",
        "-d",
        "--name",
        &conn_name,
        "--network",
        HOME_NET.name,
        IMAGE,
    ];
    home.extend(RESPONDER);
    let connect = engine.docker(&home).and_then(|_| {
        timed(
            engine,
            prober,
            &[
                "network",
                "connect",
                "--ip",
                &connect_ip,
                net.name,
                &conn_name,
            ],
            &connect_ip,
        )
    });
    let _ = engine.docker(&["rm", "-f", &run_name, &conn_name]);
    (run, connect)
}

/// Runs docker `args`, then probes `ip`:80; returns (ms to the answer, ms to the CLI's exit).
fn timed(engine: &Engine, prober: &Prober, args: &[&str], ip: &str) -> Sample {
    let ip: Ipv4Addr = ip.parse()?;
    let t0 = Instant::now();
    engine.docker(args)?;
    let cli = t0.elapsed();
    let answered = prober.probe(SocketAddrV4::new(ip, 80).into())?;
    Ok((
        answered.duration_since(t0).as_secs_f64() * 1e3,
        cli.as_secs_f64() * 1e3,
    ))
}

/// Brings both networks from `from` to `to` endpoints: containers started on the bridge
/// network (`busybox sleep`) and connected to the sluice network, by parallel docker CLIs.
fn add_background(engine: &Engine, from: usize, to: usize) -> Result<()> {
    if to <= from {
        return Ok(());
    }
    println!(
        "bench: docker: adding {} background containers on both networks",
        to - from
    );
    let started = Instant::now();
    let next = AtomicUsize::new(from);
    let first_error = std::sync::Mutex::new(None);
    std::thread::scope(|s| {
        for _ in 0..WORKERS {
            s.spawn(|| {
                loop {
                    let i = next.fetch_add(1, Ordering::SeqCst);
                    if i >= to {
                        return;
                    }
                    let name = format!("bg-{i}");
                    let r = engine
                        .docker(&[
                            "run",
                            "-d",
                            "--name",
                            &name,
                            "--network",
                            BRIDGE_NET.name,
                            IMAGE,
                            "sleep",
                            "1000000",
                        ])
                        .and_then(|_| {
                            engine.docker(&["network", "connect", SLUICE_NET.name, &name])
                        });
                    if let Err(e) = r {
                        if let Ok(mut f) = first_error.lock() {
                            f.get_or_insert(e);
                        }
                        // Stop the others too: a level with fewer endpoints than it claims is
                        // not worth measuring.
                        next.store(to, Ordering::SeqCst);
                        return;
                    }
                }
            });
        }
    });
    if let Some(e) = first_error.into_inner().ok().flatten() {
        return Err(e.context(format!("creating background container towards {to}")));
    }
    println!(
        "bench: docker: {to} endpoints per network after {:.0} s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// A probe request: the address, and where to send when it first accepted a connection.
type ProbeRequest = (SocketAddr, mpsc::Sender<Result<Instant>>);

/// A thread inside dockerd's network namespace that answers "when did ADDR first accept a
/// TCP connection?".
struct Prober {
    requests: mpsc::Sender<ProbeRequest>,
}

impl Prober {
    fn start(netns: &Path) -> Result<Self> {
        let file = File::open(netns).with_context(|| format!("open {}", netns.display()))?;
        let (tx, rx) = mpsc::channel::<ProbeRequest>();
        let (ready_tx, ready_rx) = mpsc::channel();
        std::thread::spawn(move || {
            // setns changes only this thread's namespace.
            let entered = nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET);
            let _ = ready_tx.send(entered.map_err(|e| anyhow::anyhow!("setns: {e}")));
            for (addr, reply) in rx {
                let _ = reply.send(probe(addr));
            }
        });
        ready_rx
            .recv()
            .context("the prober thread ended before entering the namespace")??;
        Ok(Self { requests: tx })
    }

    fn probe(&self, addr: SocketAddr) -> Result<Instant> {
        let (tx, rx) = mpsc::channel();
        self.requests
            .send((addr, tx))
            .context("the prober thread has ended")?;
        rx.recv().context("the prober thread has ended")?
    }
}

fn probe(addr: SocketAddr) -> Result<Instant> {
    let deadline = Instant::now() + ANSWER_TIMEOUT;
    loop {
        match TcpStream::connect_timeout(&addr, Duration::from_millis(500)) {
            Ok(_) => return Ok(Instant::now()),
            Err(e) if Instant::now() > deadline => {
                bail!("{addr} did not answer within {ANSWER_TIMEOUT:?}: {e}")
            }
            Err(_) => std::thread::sleep(Duration::from_millis(2)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probed_addresses_stay_outside_the_automatic_range_and_in_the_subnet() {
        for net in [SLUICE_NET, BRIDGE_NET] {
            let subnet: (Ipv4Addr, u32) = split(net.subnet);
            let range = split(net.ip_range);
            for k in [0, 1, 499] {
                let ip = u32::from(net.probe_ip(k));
                assert!(in_net(ip, subnet), "{ip} outside {}", net.subnet);
                assert!(!in_net(ip, range), "{ip} inside {}", net.ip_range);
            }
        }
    }

    fn split(cidr: &str) -> (Ipv4Addr, u32) {
        let (a, l) = cidr.split_once('/').unwrap();
        (a.parse().unwrap(), l.parse().unwrap())
    }

    fn in_net(ip: u32, (net, len): (Ipv4Addr, u32)) -> bool {
        let mask = u32::MAX << (32 - len);
        ip & mask == u32::from(net) & mask
    }

    #[test]
    fn plugin_call_times_come_from_span_close_lines() {
        let log = "\
2026-11-28T10:03:50.46Z  INFO CreateEndpoint{network=3afb endpoint=d253}: sluice_driver::bridge: ip link add x
2026-11-28T10:03:50.48Z  INFO CreateEndpoint{network=3afb endpoint=d253}: sluice_plugin::server: close time.busy=25.5ms time.idle=500µs
2026-11-28T10:03:50.49Z  INFO Join{network=3afb endpoint=d253}: sluice_plugin::server: close time.busy=900µs time.idle=100µs
2026-11-28T10:03:50.50Z  INFO CreateEndpoint{network=3afb endpoint=e253}: sluice_plugin::server: close time.busy=1.5s time.idle=12ns
2026-11-28T10:03:50.51Z  INFO Join{network=3afb endpoint=f000}: sluice_plugin::server: close time.busy=9ms time.idle=1ms
2026-11-28T10:03:50.51Z  INFO RequestAddress{pool=10.67.0.0/21 address=10.67.4.2}: sluice_plugin::server: close time.busy=2ms time.idle=1ms
2026-11-28T10:03:50.51Z  INFO RequestAddress{pool=10.67.0.0/21 address=}: sluice_plugin::server: close time.busy=5ms time.idle=1ms
2026-11-28T10:03:51.10Z  INFO sluice_plugin::engine: resolved container identity latency_ms=609 endpoint=d253 container=f name=probe-run-x-0 labels=0
2026-11-28T10:03:51.10Z  INFO sluice_plugin::engine: resolved container identity latency_ms=600 endpoint=e253 container=f name=probe-conn-x-0 labels=0
2026-11-28T10:03:51.10Z  INFO sluice_plugin::engine: resolved container identity latency_ms=1 endpoint=f000 container=f name=bg-1 labels=0
";
        let t = call_timings(log, &["10.67.4.2".to_owned()]);
        let get = |c: &str| t.iter().find(|x| x.call == c).unwrap();
        assert_eq!(get("CreateEndpoint").count, 2);
        assert!((get("CreateEndpoint").max_ms.unwrap() - 1500.0).abs() < 0.01);
        // The background container's Join (10 ms) is left out.
        assert_eq!(get("Join").count, 1);
        assert!((get("Join").p50_ms.unwrap() - 1.0).abs() < 1e-9);
        assert_eq!(get("RequestAddress").count, 1);
        assert_eq!(get("RequestAddress").p50_ms, Some(3.0));
        let lookups = get("Engine API identity lookup (after Join)");
        assert_eq!((lookups.count, lookups.max_ms), (2, Some(609.0)));
        assert_eq!(t.len(), 4);
        assert_eq!(duration_ms("3"), None);
        assert_eq!(duration_ms("3h"), None);
    }

    #[test]
    fn worst_run_ratio_is_the_largest_median() {
        let op = |m: f64| OpTiming {
            op: "run".into(),
            ratio: Some(Summary {
                median: m,
                min: m,
                max: m,
                n: 1,
            }),
            ..OpTiming::default()
        };
        let t = DockerTimings {
            levels: vec![
                Level {
                    endpoints: 0,
                    ops: vec![op(1.02)],
                },
                Level {
                    endpoints: 500,
                    ops: vec![op(1.3)],
                },
            ],
            ..DockerTimings::default()
        };
        assert_eq!(t.worst_run_ratio(), Some((1.3, 500)));
        assert_eq!(DockerTimings::default().worst_run_ratio(), None);
    }
}
