//! `cargo xtask bench`: sluice side by side with the bare veth limit, Docker's bridge as Docker
//! programs it, and a plain kernel VXLAN pair, in one run, interleaved; plus the control plane
//! of a real `sluice daemon` and the policy program's micro benchmark.
//!
//! - [`topo`]: the topologies, each in its own `sbn-*` namespaces, removed afterwards;
//! - [`measure`]: iperf3 / sockperf, client on CPU 0 and server on CPU 1;
//! - [`api`]: the daemon's plugin and admin sockets, called as Docker and `sluice policy` do;
//! - [`dockerd`]: `docker run` / `docker network connect` with a real private dockerd, sluice
//!   vs Docker's bridge driver;
//! - [`stats`], [`report`]: medians, paired ratios, slow samples, targets, JSON, docs, chart.

mod api;
mod dockerd;
mod engine;
mod measure;
mod report;
mod stats;
mod topo;

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, Result, bail};

use measure::Metric;
use report::{Control, Machine, Run, Status, TopologyResult};
use topo::{Lab, Topology};

/// The name of this run's directories: `/run/<tag>` (sockets, state, logs) and
/// `/sys/fs/bpf/<tag>` (pins). `SLUICE_BENCH_TAG` lets two runs (two worktrees) share the
/// machine without removing each other's files; the numbers of two runs at once are noise.
pub(crate) fn tag() -> String {
    std::env::var("SLUICE_BENCH_TAG")
        .ok()
        .filter(|t| !t.is_empty() && !t.contains('/') && t != "..")
        .unwrap_or_else(|| "sluice-bench".to_owned())
}

/// Parent of the benchmark daemons' pin directories.
pub(crate) fn bpf_root() -> std::path::PathBuf {
    std::path::Path::new("/sys/fs/bpf").join(tag())
}

#[derive(Debug, Clone, clap::Args)]
pub(crate) struct BenchArgs {
    /// `all` (datapath, control plane, docker, micro), `datapath`, `control` (plugin socket),
    /// `docker` (`docker run` / `network connect` with a private dockerd) or `micro`.
    #[arg(value_parser = ["all", "datapath", "control", "docker", "micro"], default_value = "all")]
    pub(crate) suite: String,
    /// A smoke run of about two minutes: fewer topologies, 2 repetitions of 1 s.
    #[arg(long)]
    quick: bool,
    /// Repetitions (default 5; 2 with --quick).
    #[arg(long)]
    reps: Option<usize>,
    /// Seconds per sample (default 3; 1 with --quick).
    #[arg(long)]
    seconds: Option<u32>,
    /// Do not rewrite docs/benchmarks.md and its chart (the JSON is still written).
    #[arg(long)]
    no_docs: bool,
    /// Datapath suite: only these topologies (ids as in the table, comma-separated), e.g.
    /// `--only kernel-vxlan,sluice-vxlan`.
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
}

pub(crate) fn bench(args: &BenchArgs, root: &Path, sluice: Option<PathBuf>) -> Result<ExitCode> {
    if args.suite == "micro" {
        return Ok(ExitCode::SUCCESS);
    }
    install_tools()?;
    let sluice = sluice.context("the sluice binary was not built")?;
    let reps = args.reps.unwrap_or(if args.quick { 2 } else { 5 }).max(1);
    let seconds = args
        .seconds
        .unwrap_or(if args.quick { 1 } else { 3 })
        .max(1);
    let mut command = String::from("cargo xtask bench");
    if args.suite != "all" {
        command += &format!(" {}", args.suite);
    }
    if args.quick {
        command += " --quick";
    }
    if let Some(r) = args.reps {
        command += &format!(" --reps {r}");
    }
    if let Some(s) = args.seconds {
        command += &format!(" --seconds {s}");
    }
    if !args.only.is_empty() {
        command += &format!(" --only {}", args.only.join(","));
    }
    let machine_before = read_trim("/proc/loadavg");
    let started = now_utc();
    topo::remove_leftovers();
    let run_dir = topo::run_dir()?;
    let mut topologies = Vec::new();
    let mut not_measured = Vec::new();
    let runs = |suite: &str| args.suite == "all" || args.suite == suite;
    if runs("datapath") {
        let mut list = topology_list(args.quick);
        if !args.only.is_empty() {
            let unknown: Vec<&String> = args
                .only
                .iter()
                .filter(|id| !list.iter().any(|t| t.id() == **id))
                .collect();
            if !unknown.is_empty() {
                bail!("--only: no topology {unknown:?} in this suite");
            }
            list.retain(|t| args.only.contains(&t.id()));
            not_measured.push(format!("topologies other than {}", args.only.join(", ")));
        }
        topologies = datapath(list, reps, seconds, &sluice, &run_dir)?;
    }
    let control = runs("control").then(|| control_plane(&sluice, &run_dir, args.quick));
    let docker = runs("docker").then(|| dockerd::bench(&sluice, &run_dir, args.quick, args.reps));
    if args.suite != "all" {
        not_measured.push(format!("suites other than `{}`", args.suite));
    }
    let machine = Machine {
        cpu_model: cpu_model(),
        cores: std::thread::available_parallelism().map_or(0, std::num::NonZero::get),
        kernel: read_trim("/proc/sys/kernel/osrelease"),
        loadavg_before: machine_before,
        loadavg_after: read_trim("/proc/loadavg"),
        iperf3: first_line("iperf3", &["--version"]),
        sockperf: first_line("sockperf", &["--version"]).replace("sockperf: ", ""),
        git_commit: first_line("git", &["rev-parse", "--short", "HEAD"]),
    };
    let mut run = Run {
        command,
        started,
        quick: args.quick,
        repetitions: reps,
        seconds_per_sample: seconds,
        machine,
        topologies,
        control,
        docker,
        not_measured,
        targets: Vec::new(),
    };
    run.targets = report::targets(&run);
    let dir = root.join("bench-results");
    std::fs::create_dir_all(&dir)?;
    let file = dir.join(format!("{}.json", run.started.replace(':', "")));
    std::fs::write(&file, serde_json::to_string_pretty(&run)?)?;
    println!("bench: results in {}", file.display());
    println!(
        "\nbench: targets (load average before {}, after {}):",
        run.machine.loadavg_before, run.machine.loadavg_after
    );
    for t in &run.targets {
        println!(
            "  {:<12} {}: {} (want {}){}",
            t.status.as_str(),
            t.name,
            t.measured.map_or("–".into(), |v| format!("{v:.3}")),
            t.want,
            t.note
        );
    }
    if !args.no_docs {
        let chart = "benchmarks-datapath.svg";
        if run.topologies.iter().any(|t| t.unavailable.is_none()) {
            std::fs::write(root.join("docs").join(chart), report::chart_svg(&run)?)?;
        }
        let doc_path = root.join("docs/benchmarks.md");
        let doc = std::fs::read_to_string(&doc_path).unwrap_or_default();
        std::fs::write(
            &doc_path,
            report::splice(&doc, &report::markdown(&run, chart)),
        )?;
        println!("bench: docs/benchmarks.md and docs/{chart} updated");
    }
    let missed = run
        .targets
        .iter()
        .filter(|t| t.status == Status::Miss)
        .count();
    if missed > 0 {
        println!("bench: {missed} target(s) MISSED (see above; docs/benchmarks.md says why)");
    }
    Ok(ExitCode::SUCCESS)
}

/// Values and errors of one metric of one topology, by repetition.
type RawSeries = (Vec<Option<f64>>, Vec<Option<String>>);

fn topology_list(quick: bool) -> Vec<Topology> {
    let mut list = vec![
        Topology::BareVeth,
        Topology::DockerBridge { rules: 0 },
        Topology::DockerBridge { rules: 1000 },
    ];
    if !quick {
        list.push(Topology::DockerBridge { rules: 10_000 });
    }
    let entries: &[usize] = if quick {
        &[1000, 10_000, 100_000]
    } else {
        &[0, 1000, 10_000, 100_000]
    };
    for &entries in entries {
        list.push(Topology::SluiceBridge {
            entries,
            fast_path: true,
        });
    }
    list.push(Topology::SluiceBridge {
        entries: 10_000,
        fast_path: false,
    });
    list.extend([
        Topology::KernelVxlan,
        Topology::SluiceVxlan,
        Topology::SluiceMacvlan,
    ]);
    list
}

fn datapath(
    list: Vec<Topology>,
    reps: usize,
    seconds: u32,
    sluice: &Path,
    run_dir: &Path,
) -> Result<Vec<TopologyResult>> {
    let mut lab = Lab::new(sluice.to_path_buf(), run_dir.to_path_buf());
    let mut built = Vec::new();
    let mut results: Vec<TopologyResult> = Vec::new();
    for (i, t) in list.iter().enumerate() {
        let unavailable = match t.unavailable() {
            Some(why) => Some(why.to_owned()),
            None => {
                let started = Instant::now();
                match lab.build(*t, u8::try_from(i + 1).unwrap_or(200)) {
                    Ok(b) => {
                        println!(
                            "bench: built {} in {:.1} s",
                            t.id(),
                            started.elapsed().as_secs_f64()
                        );
                        built.push((results.len(), b));
                        None
                    }
                    Err(e) => {
                        println!("bench: could not build {}: {e:#}", t.id());
                        Some(format!("set-up failed: {e:#}"))
                    }
                }
            }
        };
        if let Some(why) = &unavailable {
            println!("bench: {} not run: {why}", t.id());
        }
        results.push(TopologyResult {
            id: t.id(),
            description: t.describe(),
            unavailable,
            series: Vec::new(),
        });
    }
    // raw[topology][metric] = (values, errors) by repetition.
    let mut raw: Vec<Vec<RawSeries>> =
        vec![vec![(Vec::new(), Vec::new()); Metric::ALL.len()]; results.len()];
    for rep in 0..reps {
        // Round-robin, starting one further each repetition, so no topology always runs first.
        let n = built.len();
        for k in 0..n {
            let (idx, b) = &built[(k + rep) % n];
            let samples = measure::measure(&b.client, &b.server, b.server_ip, seconds);
            let mut line = format!("bench: rep {}/{reps} {:<26}", rep + 1, b.topology.id());
            for (m, v, e) in samples {
                let mi = Metric::ALL.iter().position(|x| *x == m).unwrap_or(0);
                raw[*idx][mi].0.push(v);
                raw[*idx][mi].1.push(e.clone());
                line += &match (v, e) {
                    (Some(v), _) => format!(" {} {:.1}", m.label(), v * m.display_scale()),
                    (None, Some(e)) => format!(" {} FAILED ({e})", m.label()),
                    (None, None) => String::new(),
                };
            }
            println!("{line}");
        }
    }
    let bare_idx = results.iter().position(|t| t.id == "bare-veth");
    for (mi, m) in Metric::ALL.iter().enumerate() {
        let bare = bare_idx.map(|b| raw[b][mi].0.clone());
        for (ti, t) in results.iter_mut().enumerate() {
            if t.unavailable.is_some() {
                continue;
            }
            let (v, e) = raw[ti][mi].clone();
            t.series.push(report::series(*m, v, e, bare.as_deref()));
        }
    }
    drop(lab);
    Ok(results)
}

/// CreateEndpoint + Join latency under concurrent callers, then RSS with those endpoints and
/// a 100k-entry policy.
fn control_plane(sluice: &Path, run_dir: &Path, quick: bool) -> Control {
    let mut c = Control {
        callers: 50,
        endpoints: if quick { 200 } else { 1000 },
        policy_entries: 100_000,
        ..Control::default()
    };
    if let Err(e) = control_inner(sluice, run_dir, &mut c) {
        c.errors.push(format!("{e:#}"));
        println!("bench: control plane: {e:#}");
    }
    c
}

fn control_inner(sluice: &Path, run_dir: &Path, c: &mut Control) -> Result<()> {
    let mut lab = Lab::new(sluice.to_path_buf(), run_dir.to_path_buf());
    let h = lab.netns("cp-h")?;
    // One endpoint has a container name (the policy's subject); the others stay nameless.
    let engine = engine::FakeEngine::start(&run_dir.join("docker-cp.sock"))?;
    let docker_host = format!("unix://{}", engine.socket.display());
    // The default pool, named explicitly so that SLUICE_LINK_POOL in the environment does
    // not change what the row says.
    let default_pool = report::DEFAULT_LINK_POOL.to_string();
    let daemon = Arc::new(api::Daemon::start(
        sluice,
        &h,
        "sbn-cp",
        run_dir,
        &docker_host,
        &["--link-pool", &default_pool],
    )?);
    let net = format!("{:0<64}", "c0ffee");
    engine.add(
        "cp-server",
        "/proc/self/ns/net",
        &net,
        &format!("{:06x}{:0<58}", 0, ""),
    );
    daemon.create_network(&net, "10.96.0.0/20", "10.96.0.1/20")?;
    c.spares = wait_link_pool(&h);
    let (lat, errors) = burst(&daemon, &net, c.endpoints, c.callers);
    (c.create_join_ms, c.errors) = (lat, errors);
    (c.create_join_p50_ms, c.create_join_p99_ms) = report::p50_p99(&c.create_join_ms);
    println!(
        "bench: control plane: default --link-pool {}: CreateEndpoint+Join p50 {:.2} ms, p99 {:.2} ms",
        report::DEFAULT_LINK_POOL,
        c.create_join_p50_ms.unwrap_or(f64::NAN),
        c.create_join_p99_ms.unwrap_or(f64::NAN)
    );
    #[expect(clippy::cast_precision_loss, reason = "KiB count far below 2^52")]
    let before = daemon.rss_kib()? as f64 / 1024.0;
    println!(
        "bench: control plane: RSS before the policy {before:.1} MiB ({})",
        daemon.rss_breakdown()?
    );
    let t = Instant::now();
    for doc in topo::policy_docs(c.policy_entries, "{name: cp-server}") {
        daemon.apply_policy(&doc)?;
    }
    c.policy_apply_s = Some(t.elapsed().as_secs_f64());
    std::thread::sleep(Duration::from_secs(1));
    #[expect(clippy::cast_precision_loss, reason = "KiB count far below 2^52")]
    let mib = daemon.rss_kib()? as f64 / 1024.0;
    c.rss_mib = Some(mib);
    println!(
        "bench: control plane: policy of {} entries applied in {:.1} s; RSS {mib:.1} MiB ({})",
        c.policy_entries,
        c.policy_apply_s.unwrap_or(f64::NAN),
        daemon.rss_breakdown()?
    );
    if let Ok(d) = Arc::try_unwrap(daemon) {
        lab.daemons.push(d);
    }
    // The same burst on a daemon whose pool is sized to it (its own namespace and state).
    let mut sized = report::SizedPool {
        link_pool: c.endpoints,
        ..report::SizedPool::default()
    };
    let h2 = lab.netns("cp-h2")?;
    let pool_arg = c.endpoints.to_string();
    let daemon = api::Daemon::start(
        sluice,
        &h2,
        "sbn-cp2",
        run_dir,
        &docker_host,
        &["--link-pool", &pool_arg],
    )?;
    daemon.create_network(&net, "10.96.0.0/20", "10.96.0.1/20")?;
    sized.spares = wait_link_pool(&h2);
    (sized.create_join_ms, sized.errors) = burst(&daemon, &net, c.endpoints, c.callers);
    (sized.create_join_p50_ms, sized.create_join_p99_ms) = report::p50_p99(&sized.create_join_ms);
    println!(
        "bench: control plane: --link-pool {}: CreateEndpoint+Join p50 {:.2} ms, p99 {:.2} ms",
        sized.link_pool,
        sized.create_join_p50_ms.unwrap_or(f64::NAN),
        sized.create_join_p99_ms.unwrap_or(f64::NAN)
    );
    c.sized_pool = Some(sized);
    lab.daemons.push(daemon);
    Ok(())
}

/// Waits for the warm link pool (`--link-pool`, SLUICE_LINK_POOL) to fill, as it is on a
/// daemon that has been up a moment, then makes `endpoints` endpoints on `net`: `callers`
/// threads in closed loop, each CreateEndpoint then Join. Returns the latency of each pair
/// (ms) and the failures.
fn burst(
    daemon: &api::Daemon,
    net: &str,
    endpoints: usize,
    callers: usize,
) -> (Vec<f64>, Vec<String>) {
    let per = endpoints.div_ceil(callers);
    let lat = Mutex::new(Vec::new());
    let errors = Mutex::new(Vec::new());
    println!("bench: control plane: {endpoints} endpoints by {callers} concurrent callers");
    std::thread::scope(|s| {
        for caller in 0..callers {
            let (lat, errors) = (&lat, &errors);
            s.spawn(move || {
                for j in 0..per {
                    let n = caller * per + j;
                    if n >= endpoints {
                        break;
                    }
                    let addr = format!("10.96.{}.{}/20", 1 + n / 250, 2 + n % 250);
                    let ep = format!("{n:06x}{:0<58}", "");
                    let t = Instant::now();
                    let r = daemon.create_and_join(
                        net,
                        &ep,
                        &addr,
                        "/proc/self/ns/net",
                        &[("role", "x")],
                    );
                    let ms = t.elapsed().as_secs_f64() * 1e3;
                    match r {
                        Ok(_) => lat.lock().map(|mut l| l.push(ms)).unwrap_or(()),
                        Err(e) => errors
                            .lock()
                            .map(|mut l| l.push(format!("{e:#}")))
                            .unwrap_or(()),
                    }
                }
            });
        }
    });
    let lat = lat.into_inner().unwrap_or_default();
    let errors = errors.into_inner().unwrap_or_default();
    let errors = match errors.first() {
        Some(first) => vec![format!("{} calls failed, first: {first}", errors.len())],
        None => Vec::new(),
    };
    (lat, errors)
}

/// Waits (at most 60 s) until the spare links (`slvp…`) in namespace `ns` stop growing for
/// a second; returns how many there are.
fn wait_link_pool(ns: &str) -> usize {
    let count = || {
        Command::new("nsenter")
            .arg(format!("--net=/proc/{ns}/ns/net"))
            .args(["ip", "-br", "link"])
            .output()
            .map(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .lines()
                    .filter(|l| l.starts_with("slvp"))
                    .count()
            })
            .unwrap_or(0)
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    let (mut last, mut since) = (count(), Instant::now());
    while Instant::now() < deadline && since.elapsed() < Duration::from_secs(1) {
        std::thread::sleep(Duration::from_millis(100));
        let now = count();
        if now != last {
            (last, since) = (now, Instant::now());
        }
    }
    last
}

/// Installs iperf3 and sockperf from Debian when missing (idempotent).
fn install_tools() -> Result<()> {
    let missing: Vec<&str> = ["iperf3", "sockperf"]
        .into_iter()
        .filter(|t| {
            Command::new("sh")
                .args(["-c", &format!("command -v {t}")])
                .stdout(Stdio::null())
                .status()
                .map_or(true, |s| !s.success())
        })
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    println!("bench: installing {}", missing.join(" "));
    let ok = Command::new("apt-get")
        .args(["install", "-y"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .status()?
        .success()
        || (Command::new("apt-get").arg("update").status()?.success()
            && Command::new("apt-get")
                .args(["install", "-y"])
                .args(&missing)
                .env("DEBIAN_FRONTEND", "noninteractive")
                .status()?
                .success());
    if !ok {
        bail!("could not install {}", missing.join(" "));
    }
    Ok(())
}

fn read_trim(path: &str) -> String {
    std::fs::read_to_string(path)
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

fn cpu_model() -> String {
    read_trim("/proc/cpuinfo")
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|l| l.trim_start_matches([' ', '\t', ':']).to_owned())
        .unwrap_or_default()
}

fn first_line(program: &str, args: &[&str]) -> String {
    Command::new(program)
        .args(args)
        .output()
        .map(|o| {
            let text = if o.stdout.is_empty() {
                o.stderr
            } else {
                o.stdout
            };
            String::from_utf8_lossy(&text)
                .lines()
                .next()
                .unwrap_or_default()
                .trim()
                .to_owned()
        })
        .unwrap_or_default()
}

/// Current UTC time as `YYYY-MM-DDTHH:MM:SSZ`.
fn now_utc() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    utc(secs)
}

fn utc(secs: u64) -> String {
    let days = secs / 86_400;
    let rem = secs % 86_400;
    // Civil-from-days (Howard Hinnant), for days since 1970-01-01.
    #[expect(clippy::cast_possible_wrap, reason = "days since 1970 fit in i64")]
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_formatting() {
        assert_eq!(utc(0), "1970-01-01T00:00:00Z");
        assert_eq!(utc(1_795_000_000), "2026-11-18T11:06:40Z");
        assert_eq!(utc(951_782_400), "2000-02-29T00:00:00Z");
    }

    #[test]
    fn full_list_has_every_topology_of_the_issue() {
        let ids: Vec<String> = topology_list(false).iter().map(Topology::id).collect();
        for id in [
            "bare-veth",
            "docker-bridge-0",
            "docker-bridge-1k",
            "docker-bridge-10k",
            "sluice-bridge-0",
            "sluice-bridge-1k",
            "sluice-bridge-10k",
            "sluice-bridge-100k",
            "kernel-vxlan",
            "sluice-vxlan",
            "sluice-macvlan",
        ] {
            assert!(ids.iter().any(|i| i == id), "{id} missing");
        }
    }
}
