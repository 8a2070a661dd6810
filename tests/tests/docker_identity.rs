//! Docker end-to-end: container names and labels, which Docker 20.10 sends in no plugin call,
//! resolved from the private dockerd's Engine API by `sluice_plugin::engine::IdentityResolver`
//! (run in the test process against the harness's dockerd socket). Subnets under 10.36.0.0/16.
//!
//! To ask the way the daemon will (right after `Join`, before dockerd's `start` event), the
//! tests watch the private dockerd's netns directory (`<exec-root>/netns`) while `docker run`
//! runs: the sandbox file appears just before `Join`, and the request goes out at once. The
//! latency is measured from the container's `State.StartedAt` to the identity's arrival.
//!
//! The two tests on the shared environment hold [`SERIAL`]: a second container starting
//! meanwhile would put a second new file into the netns directory.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use sluice_driver::model::ContainerIdentity;
use sluice_plugin::engine::{EngineClient, IdentityResolver, ResolverConfig, ResolverStats};
use sluice_tests::docker::{self, Env, assert_subnet_free};
use tokio::sync::mpsc;

/// The identity must arrive within this long after the container started.
const WITHIN: Duration = Duration::from_secs(1);

static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A resolver running on its own runtime while the test thread drives the docker CLI.
struct Resolver {
    resolver: IdentityResolver,
    rx: mpsc::Receiver<ContainerIdentity>,
    /// Identities received while waiting for another one.
    seen: Vec<ContainerIdentity>,
    // Last: dropped after the resolver.
    rt: tokio::runtime::Runtime,
}

impl Resolver {
    fn start(env: &Env, config: ResolverConfig) -> Self {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap_or_else(|e| panic!("cannot build a tokio runtime: {e}"));
        let client =
            EngineClient::from_docker_host(env.docker_host()).unwrap_or_else(|e| panic!("{e}"));
        let (resolver, rx) = rt.block_on(IdentityResolver::start(client, config));
        assert!(
            resolver.available(),
            "the resolver cannot reach the private dockerd at {}: {:?}",
            env.docker_host(),
            resolver.availability()
        );
        Self {
            resolver,
            rx,
            seen: Vec::new(),
            rt,
        }
    }

    fn stats(&self) -> ResolverStats {
        self.rt
            .block_on(self.resolver.stats())
            .unwrap_or_else(|| panic!("the resolver task has stopped"))
    }

    /// Waits for the first identity `f` accepts; returns it with its wall-clock arrival.
    fn wait_for(
        &mut self,
        timeout: Duration,
        f: impl Fn(&ContainerIdentity) -> bool,
    ) -> Option<(ContainerIdentity, SystemTime)> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let rx = &mut self.rx;
            let next = self
                .rt
                .block_on(async { tokio::time::timeout_at(deadline, rx.recv()).await });
            let arrived = SystemTime::now();
            match next {
                Ok(Some(identity)) if f(&identity) => return Some((identity, arrived)),
                Ok(Some(other)) => self.seen.push(other),
                Ok(None) => panic!("the resolver's output channel closed"),
                Err(_) => return None,
            }
        }
    }
}

/// What [`run_and_probe`] saw.
struct Probed {
    container_id: String,
    endpoint_id: String,
    sandbox_key: String,
    started_at: SystemTime,
    /// The probe went out before `docker run` returned (so before the `start` event's
    /// inspection could have answered it from the cache).
    asked_before_run_returned: bool,
    /// From the request to the answer.
    waited: Duration,
    probe: ContainerIdentity,
    probe_arrived: SystemTime,
}

/// `docker run`s `name` on `net` with `labels`; as soon as its sandbox appears, asks for the
/// identity of endpoint `probe_endpoint` in that sandbox (the daemon will ask right after
/// `Join` the same way), then waits for the answer.
fn run_and_probe(
    env: &Env,
    r: &mut Resolver,
    net: &str,
    name: &str,
    labels: &[&str],
    probe_endpoint: &str,
) -> Probed {
    let netns_dir = env.dir().join("exec/netns");
    let before = dir_entries(&netns_dir);
    let mut extra = Vec::new();
    for l in labels {
        extra.extend(["--label", *l]);
    }
    let (container_id, asked_before_run_returned, sandbox, asked_at) = std::thread::scope(|s| {
        let run = s.spawn(|| env.run_container(net, name, &extra));
        let deadline = Instant::now() + Duration::from_secs(120);
        let mut sandbox = None;
        let mut asked_before_return = false;
        let mut asked_at = Instant::now();
        while Instant::now() < deadline {
            let finished = run.is_finished();
            let new: Vec<PathBuf> = dir_entries(&netns_dir)
                .difference(&before)
                .cloned()
                .collect();
            if let Some(path) = new.first() {
                assert_eq!(new.len(), 1, "more than one new sandbox: {new:?}");
                let key = path.to_string_lossy().into_owned();
                r.resolver.request(probe_endpoint, key.clone());
                asked_at = Instant::now();
                sandbox = Some(key);
                asked_before_return = !finished;
                break;
            }
            if finished {
                break;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        let id = run.join().unwrap_or_else(|e| std::panic::resume_unwind(e));
        (id, asked_before_return, sandbox, asked_at)
    });
    let sandbox =
        sandbox.unwrap_or_else(|| panic!("no new sandbox appeared in {}", netns_dir.display()));

    let (probe, probe_arrived) = r
        .wait_for(Duration::from_secs(10), |i| i.endpoint_id == probe_endpoint)
        .unwrap_or_else(|| {
            panic!(
                "no identity for the request made right after {name}'s sandbox appeared \
                 (resolver stats {:?})\n{}",
                r.stats(),
                env.logs_tail()
            )
        });
    let waited = asked_at.elapsed();

    let inspect = env.docker_ok([
        "inspect",
        "-f",
        &format!(
            "{{{{.NetworkSettings.SandboxKey}}}}|{{{{(index .NetworkSettings.Networks \"{net}\").EndpointID}}}}|{{{{.State.StartedAt}}}}"
        ),
        name,
    ]);
    let parts: Vec<&str> = inspect.split('|').collect();
    let [sandbox_key, endpoint_id, started_at] = parts[..] else {
        panic!("unexpected docker inspect output {inspect:?}");
    };
    assert_eq!(
        sandbox, sandbox_key,
        "the sandbox file that appeared is not {name}'s SandboxKey"
    );
    Probed {
        container_id,
        endpoint_id: endpoint_id.to_owned(),
        sandbox_key: sandbox_key.to_owned(),
        started_at: parse_utc(started_at),
        asked_before_run_returned,
        waited,
        probe,
        probe_arrived,
    }
}

fn dir_entries(dir: &Path) -> BTreeSet<PathBuf> {
    std::fs::read_dir(dir)
        .map(|rd| rd.flatten().map(|e| e.path()).collect())
        .unwrap_or_default()
}

/// Milliseconds from `from` to `to`, negative when `to` is earlier.
fn signed_ms(from: SystemTime, to: SystemTime) -> i128 {
    match to.duration_since(from) {
        Ok(d) => i128::try_from(d.as_millis()).unwrap_or(i128::MAX),
        Err(e) => -i128::try_from(e.duration().as_millis()).unwrap_or(i128::MAX),
    }
}

/// Parses Docker's UTC timestamps (`2026-11-28T04:35:02.480822976Z`).
fn parse_utc(s: &str) -> SystemTime {
    let bad = || -> ! { panic!("not a UTC timestamp: {s:?}") };
    let (date, time) = s
        .trim()
        .strip_suffix('Z')
        .and_then(|t| t.split_once('T'))
        .unwrap_or_else(|| bad());
    let ymd: Vec<i64> = date
        .split('-')
        .map(|x| x.parse().unwrap_or_else(|_| bad()))
        .collect();
    let (hms, frac) = time.split_once('.').unwrap_or((time, "0"));
    let hms: Vec<u64> = hms
        .split(':')
        .map(|x| x.parse().unwrap_or_else(|_| bad()))
        .collect();
    let (&[y, m, d], &[hh, mm, ss]) = (&ymd[..], &hms[..]) else {
        bad()
    };
    // Days since 1970-01-01 (Howard Hinnant's days_from_civil).
    let y = if m <= 2 { y - 1 } else { y };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = y - era * 400;
    let doy = (153 * ((m + 9) % 12) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = u64::try_from(era * 146_097 + doe - 719_468).unwrap_or_else(|_| bad());
    let nanos: u32 = format!("{frac:0<9}")
        .get(..9)
        .and_then(|f| f.parse().ok())
        .unwrap_or_else(|| bad());
    UNIX_EPOCH + Duration::new(days * 86_400 + hh * 3600 + mm * 60 + ss, nanos)
}

fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

#[test]
fn timestamps_parse() {
    assert_eq!(
        parse_utc("1970-01-02T00:00:01.5Z"),
        UNIX_EPOCH + Duration::from_millis(86_401_500)
    );
    assert_eq!(
        parse_utc("2026-11-28T04:35:02.480822976Z"),
        UNIX_EPOCH + Duration::new(1_795_840_502, 480_822_976)
    );
}

#[test]
fn identity_arrives_within_a_second_of_start_and_follows_a_rename() {
    if docker::skip_unless_root() {
        return;
    }
    let _serial = serial();
    let env = docker::shared();
    assert_subnet_free("10.36.1.0/24");
    let mut r = Resolver::start(env, ResolverConfig::default());
    env.create_network("id-net", &["--subnet", "10.36.1.0/24"]);

    let p = run_and_probe(
        env,
        &mut r,
        "id-net",
        "web-1",
        &["sluice.role=web", "com.example.tier=front end"],
        "probe-web-1",
    );
    let want_labels = labels(&[("sluice.role", "web"), ("com.example.tier", "front end")]);
    assert_eq!(p.probe.container_id, p.container_id);
    assert_eq!(p.probe.name, "web-1");
    assert_eq!(p.probe.labels, want_labels);
    let latency = signed_ms(p.started_at, p.probe_arrived);
    eprintln!(
        "identity of web-1 arrived {latency} ms after the container started; the request, \
         made right after the sandbox appeared, waited {} ms (made before `docker run` \
         returned: {})",
        p.waited.as_millis(),
        p.asked_before_run_returned
    );
    assert!(
        latency < i128::try_from(WITHIN.as_millis()).unwrap(),
        "identity arrived {latency} ms after the container started; want < {WITHIN:?}"
    );

    // The real endpoint ID, as the daemon will ask: answered from the cache.
    let asked = Instant::now();
    r.resolver.request(&p.endpoint_id, &p.sandbox_key);
    let (identity, _) = r
        .wait_for(WITHIN, |i| i.endpoint_id == p.endpoint_id)
        .unwrap_or_else(|| panic!("no identity for web-1's endpoint within {WITHIN:?}"));
    eprintln!(
        "identity of a known container answered in {} ms",
        asked.elapsed().as_millis()
    );
    assert_eq!(
        identity,
        ContainerIdentity {
            endpoint_id: p.endpoint_id.clone(),
            container_id: p.container_id.clone(),
            name: "web-1".to_owned(),
            labels: want_labels.clone(),
        }
    );

    // docker rename: the identity comes again with the new name.
    let renamed_at = Instant::now();
    env.docker_ok(["rename", "web-1", "web-renamed"]);
    let (renamed, _) = r
        .wait_for(Duration::from_secs(5), |i| {
            i.endpoint_id == p.endpoint_id && i.name == "web-renamed"
        })
        .unwrap_or_else(|| {
            panic!(
                "no updated identity after docker rename (got {:?}, stats {:?})",
                r.seen,
                r.stats()
            )
        });
    eprintln!(
        "renamed identity arrived {} ms after `docker rename` started",
        renamed_at.elapsed().as_millis()
    );
    assert_eq!(renamed.labels, want_labels);
    assert_eq!(renamed.container_id, p.container_id);
    let stats = r.stats();
    assert!(stats.updated >= 1, "{stats:?}");
    assert_eq!(stats.timed_out, 0, "{stats:?}");

    // A removed container is dropped (die, destroy).
    env.docker_ok(["rm", "-f", "web-renamed"]);
    let deadline = Instant::now() + Duration::from_secs(5);
    while r.stats().containers != 0 || r.stats().watched != 0 {
        assert!(
            Instant::now() < deadline,
            "web-renamed is still known after docker rm: {:?}",
            r.stats()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    env.docker_ok(["network", "rm", "id-net"]);
}

#[test]
fn a_request_for_a_sandbox_that_never_appears_times_out() {
    if docker::skip_unless_root() {
        return;
    }
    let _serial = serial();
    let env = docker::shared();
    assert_subnet_free("10.36.2.0/24");
    let timeout = Duration::from_secs(2);
    let mut r = Resolver::start(
        env,
        ResolverConfig {
            request_timeout: timeout,
            ..ResolverConfig::default()
        },
    );
    let ghost = env.dir().join("exec/netns/000000000000");
    let asked = Instant::now();
    r.resolver
        .request("ghost-endpoint", ghost.to_string_lossy().into_owned());
    assert_eq!(r.stats().pending, 1);
    let got = r.wait_for(timeout + Duration::from_secs(1), |_| true);
    assert!(
        got.is_none(),
        "an identity for a sandbox that never existed: {got:?}"
    );
    let stats = r.stats();
    assert_eq!(
        (stats.timed_out, stats.pending, stats.resolved),
        (1, 0, 0),
        "after {:?}: {stats:?}",
        asked.elapsed()
    );
    assert!(r.resolver.available());

    // The resolver goes on working.
    env.create_network("id-net2", &["--subnet", "10.36.2.0/24"]);
    let p = run_and_probe(env, &mut r, "id-net2", "after-timeout", &["k=v"], "probe-2");
    assert_eq!(p.probe.name, "after-timeout");
    assert_eq!(p.probe.labels, labels(&[("k", "v")]));
    env.docker_ok(["rm", "-f", "after-timeout"]);
    env.docker_ok(["network", "rm", "id-net2"]);
}

#[test]
fn the_resolver_survives_a_dockerd_restart() {
    if docker::skip_unless_root() {
        return;
    }
    // Its own environment: it restarts dockerd.
    let env = Env::start();
    assert_subnet_free("10.36.3.0/24");
    let mut r = Resolver::start(&env, ResolverConfig::default());
    env.create_network("id-restart", &["--subnet", "10.36.3.0/24"]);
    let before = run_and_probe(
        &env,
        &mut r,
        "id-restart",
        "before-restart",
        &["sluice.role=old"],
        "probe-before",
    );
    assert_eq!(before.probe.name, "before-restart");
    assert_eq!(r.stats().connections, 1);

    env.restart_dockerd();
    let deadline = Instant::now() + Duration::from_secs(30);
    let reconnected = loop {
        let stats = r.stats();
        if stats.connections >= 2 && stats.available {
            break stats;
        }
        assert!(
            Instant::now() < deadline,
            "the resolver did not reconnect within 30 s of dockerd's restart: {stats:?}, {:?}",
            r.resolver.availability()
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    // before-restart (no restart policy) was stopped with dockerd: it is gone from the cache.
    assert_eq!(reconnected.containers, 0, "{reconnected:?}");

    let after = run_and_probe(
        &env,
        &mut r,
        "id-restart",
        "after-restart",
        &["sluice.role=db"],
        "probe-after",
    );
    assert_eq!(after.probe.name, "after-restart");
    assert_eq!(after.probe.labels, labels(&[("sluice.role", "db")]));
    let latency = signed_ms(after.started_at, after.probe_arrived);
    eprintln!(
        "after the dockerd restart: identity arrived {latency} ms after the container started; \
         the request waited {} ms (made before `docker run` returned: {})",
        after.waited.as_millis(),
        after.asked_before_run_returned
    );
    assert!(
        latency < i128::try_from(WITHIN.as_millis()).unwrap(),
        "identity arrived {latency} ms after the container started; want < {WITHIN:?}"
    );
    r.resolver.request(&after.endpoint_id, &after.sandbox_key);
    let (identity, _) = r
        .wait_for(WITHIN, |i| i.endpoint_id == after.endpoint_id)
        .expect("no identity for after-restart's endpoint");
    assert_eq!(identity.container_id, after.container_id);
}
