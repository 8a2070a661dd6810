//! A private dockerd plus a sluice daemon for end-to-end tests.
//!
//! [`Env`] starts a dockerd of its own (own data-root, exec-root, pidfile, socket and
//! containerd namespace under `/tmp/sle2e-<pid>-<n>`, no `docker0`, iptables on as in
//! production) and a sluice daemon under a unique plugin name (`slt<pid>n<n>`, socket
//! `/run/docker/plugins/slt<pid>n<n>.sock`) with its own state dir, default pools and log. So
//! several environments, and a Docker Engine that already runs on the machine, never collide.
//!
//! Everything an [`Env`] started is stopped and removed when it drops and, for the shared
//! per-binary [`Env`] (a static, which Rust never drops), by an `atexit` hook. Only processes
//! that an [`Env`] spawned itself are ever signalled.
//!
//! The test image [`IMAGE`] is made with `docker import` from the host's static busybox.
//!
//! The dockerd half (launch, stop, docker CLI with a timeout, image) is the `sluice-dockerd`
//! crate, which `cargo xtask bench docker` uses too; this module adds sluice to it.

use std::ffi::OsStr;
use std::fs;
use std::io::{Read as _, Write as _};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, Once, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use nix::sys::signal::Signal;
use sluice_dockerd::{
    Dockerd, START_TIMEOUT, STOP_TIMEOUT, lock, open_log, output_with_timeout, read_lossy,
    stop_child, unmount_under,
};
pub use sluice_dockerd::{run_with_timeout, tail};

/// The image every test container runs: Debian's static busybox with its applets.
pub const IMAGE: &str = "sluice-test/busybox:latest";

/// How long one docker / docker-compose command may take (dockerd retries a plugin that does
/// not answer for 30 s per call).
const COMMAND_TIMEOUT: Duration = Duration::from_secs(180);
/// Lines of each log shown when a command fails.
const LOG_TAIL_LINES: usize = 50;

static NEXT_ENV: AtomicU32 = AtomicU32::new(0);
/// Environments not cleaned up yet, for the `atexit` hook.
static LIVE: Mutex<Vec<Arc<Inner>>> = Mutex::new(Vec::new());
static ATEXIT: Once = Once::new();
static SHARED: OnceLock<Result<Env, String>> = OnceLock::new();

/// True when the tests run as root (the Docker tier needs it).
#[must_use]
pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// Prints "skipped: needs root" and returns true when not root; tests then return early.
#[must_use]
pub fn skip_unless_root() -> bool {
    if is_root() {
        false
    } else {
        eprintln!("skipped: needs root");
        true
    }
}

/// The environment shared by every test of one test binary, started on first use.
///
/// # Panics
/// When the environment could not be started (every test using it then fails with the reason).
pub fn shared() -> &'static Env {
    match SHARED.get_or_init(|| Env::try_new().map_err(|e| format!("{e:#}"))) {
        Ok(env) => env,
        Err(e) => panic!("the shared Docker test environment failed to start: {e}"),
    }
}

/// A private dockerd and a sluice daemon registered with it under a unique plugin name.
#[derive(Debug)]
pub struct Env {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    dir: PathBuf,
    dockerd: Dockerd,
    driver: String,
    plugin_socket: PathBuf,
    pool_v4: String,
    pool_v6: String,
    sluice: Mutex<Option<Child>>,
    cleaned: AtomicBool,
    /// Network namespace dockerd (and sluice) run in (`None`: the host's).
    netns: Option<String>,
    /// Extra `sluice daemon` flags.
    sluice_args: Vec<String>,
}

impl Env {
    /// Starts dockerd and sluice, and imports the test image.
    ///
    /// # Panics
    /// When either daemon does not come up; the message holds both logs' tails.
    #[must_use]
    pub fn start() -> Env {
        match Env::try_new() {
            Ok(env) => env,
            Err(e) => panic!("the Docker test environment failed to start: {e:#}"),
        }
    }

    /// Like [`Env::start`], with the failure as an error.
    ///
    /// # Errors
    /// When a daemon does not come up, or the test image cannot be built.
    pub fn try_new() -> Result<Env> {
        Env::try_new_with(true, None)
    }

    /// A private dockerd (and the test image) without a sluice daemon: for tests that
    /// install sluice as a managed plugin (`crate::managed`). [`Env::driver`] then only names
    /// things (links' owner alias, pin directory, admin socket) that the plugin is told to use.
    ///
    /// # Errors
    /// When dockerd does not come up, or the test image cannot be built.
    pub fn try_new_dockerd_only() -> Result<Env> {
        Env::try_new_with(false, None)
    }

    /// Like [`Env::try_new_dockerd_only`], with dockerd (and so its containerd, containers
    /// and host-network plugins) in the named network namespace `/run/netns/NETNS`: one node
    /// of a multi-node swarm on one machine.
    ///
    /// # Errors
    /// When dockerd does not come up, or the test image cannot be built.
    pub fn try_new_dockerd_only_in(netns: &str) -> Result<Env> {
        Env::try_new_with(false, Some(netns.to_owned()))
    }

    /// A private dockerd and a sluice daemon (legacy socket plugin, started with the extra
    /// `sluice_args`), both in the named network namespace `/run/netns/NETNS`: one "host" of
    /// a multi-host (`mode=vxlan`) test on one machine.
    ///
    /// # Errors
    /// When a daemon does not come up, or the test image cannot be built.
    pub fn try_new_in(netns: &str, sluice_args: &[String]) -> Result<Env> {
        Env::try_new_full(true, Some(netns.to_owned()), sluice_args.to_vec())
    }

    fn try_new_with(legacy_sluice: bool, netns: Option<String>) -> Result<Env> {
        Env::try_new_full(legacy_sluice, netns, Vec::new())
    }

    fn try_new_full(
        legacy_sluice: bool,
        netns: Option<String>,
        sluice_args: Vec<String>,
    ) -> Result<Env> {
        static SWEEP: Once = Once::new();
        SWEEP.call_once(sweep_leftovers);
        let n = NEXT_ENV.fetch_add(1, Ordering::SeqCst);
        let pid = std::process::id();
        // Short: unix socket paths are limited to 107 bytes, and dockerd and containerd put
        // theirs under the exec-root.
        let dir = PathBuf::from(format!("/tmp/sle2e-{pid}-{n}"));
        if dir.exists() {
            fs::remove_dir_all(&dir).with_context(|| format!("remove stale {}", dir.display()))?;
        }
        fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
        let plugin_dir = Path::new("/run/docker/plugins");
        fs::create_dir_all(plugin_dir)
            .with_context(|| format!("create {}", plugin_dir.display()))?;
        let driver = format!("slt{pid}n{n}");
        let inner = Arc::new(Inner {
            dockerd: Dockerd::new(
                &dir,
                &format!("sle2e-{pid}-{n}"),
                netns
                    .as_ref()
                    .map(|ns| PathBuf::from(format!("/run/netns/{ns}"))),
            ),
            plugin_socket: plugin_dir.join(format!("{driver}.sock")),
            driver,
            // One /16 per environment, split into /24s; 10.100-199 stays clear of the
            // explicit test subnets (10.3x.*) and of sluice's own default (10.200.0.0/14).
            pool_v4: format!("10.{}.0.0/16", 100 + n % 100),
            // Inside sluice's default ULA /48, one /56 per environment.
            pool_v6: format!("fd53:6c75:6963:{:x}00::/56", n % 256),
            dir,
            sluice: Mutex::new(None),
            cleaned: AtomicBool::new(false),
            netns,
            sluice_args,
        });
        register_for_exit(&inner);
        let env = Env { inner };
        if legacy_sluice {
            env.inner.spawn_sluice()?;
            env.inner.wait_sluice()?;
        }
        env.inner.dockerd.start()?;
        env.inner.dockerd.build_busybox_image(IMAGE)?;
        Ok(env)
    }

    /// The plugin name to use as `-d` and `--ipam-driver`.
    #[must_use]
    pub fn driver(&self) -> &str {
        &self.inner.driver
    }

    /// The sluice daemon's socket (`/run/docker/plugins/<driver>.sock`).
    #[must_use]
    pub fn plugin_socket(&self) -> &Path {
        &self.inner.plugin_socket
    }

    /// The IPv4 range that automatic subnets of this environment come from (split into /24s).
    #[must_use]
    pub fn default_pool(&self) -> &str {
        &self.inner.pool_v4
    }

    /// The IPv6 range that automatic IPv6 subnets come from (split into /64s).
    #[must_use]
    pub fn default_pool_v6(&self) -> &str {
        &self.inner.pool_v6
    }

    /// The temporary directory holding everything of this environment.
    #[must_use]
    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    /// `DOCKER_HOST` of the private dockerd (`unix:///tmp/sle2e-…/docker.sock`).
    #[must_use]
    pub fn docker_host(&self) -> &str {
        self.inner.dockerd.docker_host()
    }

    /// Runs `docker -H <private socket> ARGS…`.
    ///
    /// # Panics
    /// When the docker CLI cannot be started, or does not finish within 3 minutes (a hung
    /// plugin call): the message holds the tails of both logs.
    pub fn docker<I, S>(&self, args: I) -> Output
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let args: Vec<_> = args.into_iter().map(|a| a.as_ref().to_owned()).collect();
        self.inner
            .dockerd
            .docker(&args, COMMAND_TIMEOUT)
            .unwrap_or_else(|e| panic!("{e}\n{}", self.logs_tail()))
    }

    /// Runs docker and returns its trimmed stdout.
    ///
    /// # Panics
    /// When the command fails: the message holds its stderr and the tails of both logs.
    pub fn docker_ok<I, S>(&self, args: I) -> String
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let args: Vec<_> = args.into_iter().map(|a| a.as_ref().to_owned()).collect();
        let out = self.docker(&args);
        self.check(&out, "docker", &args)
    }

    /// Runs docker, expecting it to fail; returns its stderr.
    ///
    /// # Panics
    /// When the command succeeds.
    pub fn docker_fails<I, S>(&self, args: I) -> String
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let args: Vec<_> = args.into_iter().map(|a| a.as_ref().to_owned()).collect();
        let out = self.docker(&args);
        assert!(
            !out.status.success(),
            "expected `docker {}` to fail, but it succeeded:\nstdout: {}\n{}",
            join(&args),
            String::from_utf8_lossy(&out.stdout),
            self.logs_tail()
        );
        String::from_utf8_lossy(&out.stderr).into_owned()
    }

    /// Runs `docker-compose ARGS…` in `project_dir` against the private dockerd.
    ///
    /// # Panics
    /// When docker-compose cannot be started or does not finish within 3 minutes.
    pub fn compose<I, S>(&self, project_dir: &Path, args: I) -> Output
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let args: Vec<_> = args.into_iter().map(|a| a.as_ref().to_owned()).collect();
        let mut cmd = Command::new("docker-compose");
        cmd.args(&args)
            .current_dir(project_dir)
            .env("DOCKER_HOST", self.inner.dockerd.docker_host());
        match output_with_timeout(&mut cmd, COMMAND_TIMEOUT) {
            Ok(Some(out)) => out,
            Ok(None) => panic!(
                "`docker-compose {}` did not finish within {COMMAND_TIMEOUT:?}\n{}",
                join(&args),
                self.logs_tail()
            ),
            Err(e) => panic!("cannot run docker-compose: {e}"),
        }
    }

    /// Runs docker-compose and returns its trimmed stdout.
    ///
    /// # Panics
    /// When the command fails: the message holds its output and the tails of both logs.
    pub fn compose_ok<I, S>(&self, project_dir: &Path, args: I) -> String
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let args: Vec<_> = args.into_iter().map(|a| a.as_ref().to_owned()).collect();
        let out = self.compose(project_dir, &args);
        self.check(&out, "docker-compose", &args)
    }

    fn check(&self, out: &Output, program: &str, args: &[std::ffi::OsString]) -> String {
        assert!(
            out.status.success(),
            "`{program} {}` failed ({}):\nstdout: {}\nstderr: {}\n{}",
            join(args),
            out.status,
            String::from_utf8_lossy(&out.stdout).trim(),
            String::from_utf8_lossy(&out.stderr).trim(),
            self.logs_tail()
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    /// `docker network create -d <driver> --ipam-driver <driver> EXTRA… NAME`; returns the ID.
    pub fn create_network(&self, name: &str, extra: &[&str]) -> String {
        let driver = self.driver().to_owned();
        let mut args = vec!["network", "create", "-d", &driver, "--ipam-driver", &driver];
        args.extend_from_slice(extra);
        args.push(name);
        self.docker_ok(args)
    }

    /// `docker network inspect NAME`, the network's object.
    pub fn network_inspect(&self, name: &str) -> serde_json::Value {
        let out = self.docker_ok(["network", "inspect", name]);
        let mut all: serde_json::Value = serde_json::from_str(&out)
            .unwrap_or_else(|e| panic!("docker network inspect {name}: bad JSON ({e}): {out}"));
        all.get_mut(0)
            .map(serde_json::Value::take)
            .unwrap_or_else(|| panic!("docker network inspect {name}: empty answer"))
    }

    /// The network's full ID.
    pub fn network_id(&self, name: &str) -> String {
        self.docker_ok(["network", "inspect", "-f", "{{.Id}}", name])
    }

    /// Starts a detached container (`sleep 3600`, stops at once on SIGTERM) on `net`.
    /// Returns the container ID.
    pub fn run_container(&self, net: &str, name: &str, extra: &[&str]) -> String {
        self.run_container_cmd(
            net,
            name,
            extra,
            &["sh", "-c", "trap 'exit 0' TERM; sleep 3600 & wait"],
        )
    }

    /// Starts a detached container running `cmd` on `net`. Returns the container ID.
    pub fn run_container_cmd(&self, net: &str, name: &str, extra: &[&str], cmd: &[&str]) -> String {
        let mut args = vec![
            "run",
            "-d",
            "--name",
            name,
            "--hostname",
            name,
            "--network",
            net,
            "--stop-timeout",
            "3",
        ];
        args.extend_from_slice(extra);
        args.push(IMAGE);
        args.extend_from_slice(cmd);
        self.docker_ok(args)
    }

    /// `docker exec CONTAINER CMD…`.
    pub fn exec(&self, container: &str, cmd: &[&str]) -> Output {
        let mut args = vec!["exec", container];
        args.extend_from_slice(cmd);
        self.docker(args)
    }

    /// `docker exec` that must succeed; returns trimmed stdout.
    pub fn exec_ok(&self, container: &str, cmd: &[&str]) -> String {
        let mut args = vec!["exec", container];
        args.extend_from_slice(cmd);
        self.docker_ok(args)
    }

    /// True when `ping -c1 -W2 TARGET` from `container` gets an answer (retried for up to
    /// `within`, so a neighbour or DAD still settling does not count as failure).
    pub fn can_ping(&self, container: &str, target: &str, within: Duration) -> bool {
        wait_until(within, || {
            self.exec(container, &["ping", "-c1", "-W2", target])
                .status
                .success()
        })
    }

    /// Like [`Env::can_ping`], over IPv6 (`ping -6`).
    pub fn can_ping6(&self, container: &str, target: &str, within: Duration) -> bool {
        wait_until(within, || {
            self.exec(container, &["ping", "-6", "-c1", "-W2", target])
                .status
                .success()
        })
    }

    /// Asserts that `from` reaches `target` by ping within 15 s.
    ///
    /// # Panics
    /// When it does not: with the last ping's output and both logs' tails.
    pub fn assert_ping(&self, from: &str, target: &str) {
        if !self.can_ping(from, target, Duration::from_secs(15)) {
            let out = self.exec(from, &["ping", "-c1", "-W2", target]);
            panic!(
                "{from} cannot ping {target}:\n{}{}\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr),
                self.logs_tail()
            );
        }
    }

    /// The container's IPv4 address on `net` (without prefix length), from `docker inspect`.
    pub fn container_ip(&self, container: &str, net: &str) -> String {
        self.docker_ok([
            "inspect",
            "-f",
            &format!("{{{{(index .NetworkSettings.Networks \"{net}\").IPAddress}}}}"),
            container,
        ])
    }

    /// The container's IPv6 address on `net` (without prefix length), from `docker inspect`.
    pub fn container_ip6(&self, container: &str, net: &str) -> String {
        self.docker_ok([
            "inspect",
            "-f",
            &format!("{{{{(index .NetworkSettings.Networks \"{net}\").GlobalIPv6Address}}}}"),
            container,
        ])
    }

    /// The container's endpoint ID on `net`, from `docker inspect`.
    pub fn endpoint_id(&self, container: &str, net: &str) -> String {
        self.docker_ok([
            "inspect",
            "-f",
            &format!("{{{{(index .NetworkSettings.Networks \"{net}\").EndpointID}}}}"),
            container,
        ])
    }

    /// `docker rm -f` every container of this environment.
    pub fn remove_all_containers(&self) {
        self.inner.dockerd.remove_all_containers();
    }

    /// Sends `signal` to the sluice daemon and waits for it to exit (SIGKILL after 20 s).
    /// Returns how it exited (`None` when it was not running).
    pub fn kill_sluice(&self, signal: Signal) -> Option<std::process::ExitStatus> {
        let mut guard = lock(&self.inner.sluice);
        let status = guard.as_mut().and_then(|child| {
            stop_child(child, signal, STOP_TIMEOUT);
            child.try_wait().ok().flatten()
        });
        *guard = None;
        status
    }

    /// Starts the sluice daemon again (same socket, state dir and pools) and waits for it.
    ///
    /// # Panics
    /// When it does not come up.
    pub fn start_sluice(&self) {
        if let Err(e) = self
            .inner
            .spawn_sluice()
            .and_then(|()| self.inner.wait_sluice())
        {
            panic!("sluice did not start again: {e:#}\n{}", self.logs_tail());
        }
    }

    /// True while the sluice daemon process runs.
    pub fn sluice_running(&self) -> bool {
        lock(&self.inner.sluice)
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// Stops dockerd (SIGTERM, waits for it; SIGKILL after 20 s), starts it again with the
    /// same directories, and waits until it answers.
    ///
    /// # Panics
    /// When it does not come back.
    pub fn restart_dockerd(&self) {
        self.inner.dockerd.stop();
        if let Err(e) = self.inner.dockerd.start() {
            panic!("dockerd did not start again: {e:#}\n{}", self.logs_tail());
        }
    }

    /// The sluice daemon's log so far (all its runs).
    #[must_use]
    pub fn sluice_log(&self) -> String {
        read_lossy(&self.inner.dir.join("sluice.log"))
    }

    /// The private dockerd's log so far (all its runs).
    #[must_use]
    pub fn dockerd_log(&self) -> String {
        self.inner.dockerd.log()
    }

    /// The last lines of both logs, for failure messages.
    #[must_use]
    pub fn logs_tail(&self) -> String {
        self.inner.logs_tail()
    }

    /// Sends one HTTP/1.1 request to the sluice socket as dockerd does (POST, no Content-Type)
    /// and returns the status code and body.
    ///
    /// # Panics
    /// When the socket does not answer with an HTTP response.
    pub fn plugin_call(&self, method: &str, body: &[u8]) -> (u16, String) {
        plugin_call(self.plugin_socket(), method, body)
            .unwrap_or_else(|e| panic!("POST /{method}: {e:#}\n{}", self.logs_tail()))
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        self.inner.cleanup();
        lock(&LIVE).retain(|i| !Arc::ptr_eq(i, &self.inner));
    }
}

impl Inner {
    fn logs_tail(&self) -> String {
        format!(
            "--- sluice log (last {LOG_TAIL_LINES} lines) ---\n{}\n--- dockerd log (last {LOG_TAIL_LINES} lines) ---\n{}",
            tail(&read_lossy(&self.dir.join("sluice.log")), LOG_TAIL_LINES),
            tail(&self.dockerd.log(), LOG_TAIL_LINES)
        )
    }

    /// `program` in this environment's network namespace, if it has one. nsenter execs the
    /// program: the child is still the program itself.
    fn command_in_netns(&self, program: &Path) -> Command {
        match &self.netns {
            Some(netns) => {
                let mut c = Command::new("nsenter");
                c.arg(format!("--net=/run/netns/{netns}")).arg(program);
                c
            }
            None => Command::new(program),
        }
    }

    fn spawn_sluice(&self) -> Result<()> {
        let bin = sluice_bin();
        if !bin.is_file() {
            bail!(
                "sluice binary {} not found: build it (`cargo build -p sluice-plugin`), set \
                 SLUICE_BIN, or run `cargo xtask test`",
                bin.display()
            );
        }
        let log = open_log(&self.dir.join("sluice.log"))?;
        let child = self
            .command_in_netns(&bin)
            .arg("daemon")
            .arg("--plugin-socket")
            .arg(&self.plugin_socket)
            .arg("--state-dir")
            .arg(self.dir.join("state"))
            .args(["--default-address-pool", &self.pool_v4])
            .args(["--default-pool-size", "24"])
            .args(["--default-ipv6-pool", &self.pool_v6])
            .args(["--default-ipv6-pool-size", "64"])
            .args(["--log-level", "debug"])
            .args(["--docker-host", self.dockerd.docker_host()])
            .arg("--admin-socket")
            .arg(admin_socket_of(&self.driver))
            .arg("--bpf-dir")
            .arg(bpf_dir_of(&self.driver))
            .args(&self.sluice_args)
            .env("RUST_BACKTRACE", "1")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("start {}", bin.display()))?;
        *lock(&self.sluice) = Some(child);
        Ok(())
    }

    fn wait_sluice(&self) -> Result<()> {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if UnixStream::connect(&self.plugin_socket).is_ok() {
                return Ok(());
            }
            if let Some(status) = exited(&self.sluice) {
                bail!(
                    "sluice exited ({status}) before serving {}; its log:\n{}",
                    self.plugin_socket.display(),
                    tail(&read_lossy(&self.dir.join("sluice.log")), LOG_TAIL_LINES)
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "sluice did not serve {} within {START_TIMEOUT:?}; its log:\n{}",
                    self.plugin_socket.display(),
                    tail(&read_lossy(&self.dir.join("sluice.log")), LOG_TAIL_LINES)
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn sluice_running(&self) -> bool {
        lock(&self.sluice)
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// With `SLUICE_TEST_KEEP_LOGS` set, copies both logs to `/tmp/sle2e-logs/` before the
    /// temporary directory goes.
    fn keep_logs(&self) {
        if std::env::var_os("SLUICE_TEST_KEEP_LOGS").is_none() {
            return;
        }
        let keep = Path::new("/tmp/sle2e-logs");
        let _ = fs::create_dir_all(keep);
        let name = self
            .dir
            .file_name()
            .map_or_else(|| "env".to_owned(), |n| n.to_string_lossy().into_owned());
        for log in ["sluice.log", "dockerd.log"] {
            let to = keep.join(format!("{name}-{log}"));
            if fs::copy(self.dir.join(log), &to).is_ok() {
                eprintln!("sluice tests: kept {}", to.display());
            }
        }
    }

    /// Stops and removes everything this environment started. Idempotent; never panics on
    /// purpose (it runs in `Drop` during unwinding and in the `atexit` hook).
    fn cleanup(&self) {
        if self.cleaned.swap(true, Ordering::SeqCst) {
            return;
        }
        let mut network_ids = Vec::new();
        if self.dockerd.running() {
            self.dockerd.remove_all_containers();
            let filter = format!("driver={}", self.driver);
            if let Some(out) = self.dockerd.docker_quiet(&[
                "network",
                "ls",
                "-q",
                "--no-trunc",
                "--filter",
                &filter,
            ]) {
                network_ids = String::from_utf8_lossy(&out.stdout)
                    .split_whitespace()
                    .map(str::to_owned)
                    .collect();
            }
            // Without sluice, Docker would retry its calls for a while: skip then.
            if self.sluice_running() {
                for id in &network_ids {
                    let Some(out) = self.dockerd.docker_quiet(&["network", "rm", id]) else {
                        continue;
                    };
                    if !out.status.success() {
                        eprintln!(
                            "sluice tests: cleanup: docker network rm {id} failed: {}",
                            String::from_utf8_lossy(&out.stderr).trim()
                        );
                    }
                }
            }
        }
        self.dockerd.stop();
        {
            let mut guard = lock(&self.sluice);
            if let Some(child) = guard.as_mut() {
                stop_child(child, Signal::SIGTERM, STOP_TIMEOUT);
            }
            *guard = None;
        }
        // Links that sluice did not remove would outlive its state dir: remove those marked
        // as this daemon's (alias `sluice:<driver>`), and the bridges of its networks.
        let owner = format!("sluice:{}", self.driver);
        let links = try_ip_json(&["link", "show"]).unwrap_or_default();
        for link in links.as_array().into_iter().flatten() {
            let Some(name) = link["ifname"].as_str() else {
                continue;
            };
            let ours = link["ifalias"].as_str() == Some(owner.as_str())
                || network_ids
                    .iter()
                    .any(|id| name == format!("slbr{}", &id[..id.len().min(11)]));
            if name.starts_with("sl") && ours {
                eprintln!("sluice tests: cleanup: removing leftover link {name}");
                let _ = Command::new("ip").args(["link", "del", name]).status();
            }
        }
        // The daemon's pinned datapath (links first: a pinned link keeps its programs
        // attached) and its admin socket.
        remove_bpf_pins(&bpf_dir_of(&self.driver));
        let _ = fs::remove_file(admin_socket_of(&self.driver));
        self.keep_logs();
        unmount_under(&self.dir);
        let _ = fs::remove_file(&self.plugin_socket);
        if let Err(e) = fs::remove_dir_all(&self.dir) {
            eprintln!(
                "sluice tests: cleanup: cannot remove {}: {e}",
                self.dir.display()
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// process exit

fn register_for_exit(inner: &Arc<Inner>) {
    lock(&LIVE).push(Arc::clone(inner));
    ATEXIT.call_once(|| {
        // SAFETY: `cleanup_at_exit` is a plain `extern "C" fn()` with no arguments, as
        // atexit(3) requires; it catches every panic, so none unwinds into libc, and it only
        // touches statics, which stay valid until the process ends.
        let rc = unsafe { libc::atexit(cleanup_at_exit) };
        if rc != 0 {
            eprintln!("sluice tests: atexit failed; a shared environment may outlive the tests");
        }
    });
}

/// Cleans up every environment still alive (Rust never drops statics such as [`shared`]).
extern "C" fn cleanup_at_exit() {
    let _ = std::panic::catch_unwind(|| {
        let live = std::mem::take(&mut *lock(&LIVE));
        for inner in live {
            inner.cleanup();
        }
    });
}

// ---------------------------------------------------------------------------------------------
// leftovers of earlier runs

/// Removes what earlier test processes that died without cleaning up (Ctrl-C, SIGKILL) left
/// behind: their temporary directories, plugin sockets, and the links their sluice daemons
/// marked as theirs (alias `sluice:slt<pid>n<n>`). Only leftovers of processes that no longer
/// exist are touched, and no process is signalled: a directory whose dockerd still runs is
/// left alone.
fn sweep_leftovers() {
    let alive = |pid: u32| Path::new(&format!("/proc/{pid}")).exists();
    let me = std::process::id();
    let dead = |pid: u32| pid != me && !alive(pid);

    let links = try_ip_json(&["link", "show"]).unwrap_or_default();
    for link in links.as_array().into_iter().flatten() {
        let (Some(name), Some(alias)) = (link["ifname"].as_str(), link["ifalias"].as_str()) else {
            continue;
        };
        if name.starts_with("sl")
            && let Some(pid) = alias
                .strip_prefix("sluice:slt")
                .and_then(|rest| rest.split('n').next())
                .and_then(|pid| pid.parse().ok())
            && dead(pid)
        {
            eprintln!("sluice tests: removing link {name} left by dead test process {pid}");
            let _ = Command::new("ip").args(["link", "del", name]).status();
        }
    }

    // Pinned datapaths and admin sockets of dead runs' daemons.
    for (dir, suffix) in [(BPF_ROOT, ""), (ADMIN_SOCKET_DIR, ".sock")] {
        let Ok(entries) = fs::read_dir(dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(pid) = name
                .strip_suffix(suffix)
                .and_then(|n| n.strip_prefix("slt"))
                .and_then(|rest| rest.split('n').next())
                .and_then(|pid| pid.parse().ok())
            else {
                continue;
            };
            if dead(pid) {
                if suffix.is_empty() {
                    eprintln!("sluice tests: removing bpffs pins of dead test process {pid}");
                    remove_bpf_pins(&entry.path());
                } else {
                    let _ = fs::remove_file(entry.path());
                }
            }
        }
    }

    if let Ok(entries) = fs::read_dir("/run/docker/plugins") {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if let Some(pid) = name
                .strip_prefix("slt")
                .and_then(|rest| rest.split('n').next())
                .and_then(|pid| pid.parse().ok())
                && name.ends_with(".sock")
                && dead(pid)
            {
                let _ = fs::remove_file(entry.path());
            }
        }
    }

    if let Ok(entries) = fs::read_dir("/tmp") {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(pid) = name
                .strip_prefix("sle2e-")
                .and_then(|rest| rest.split('-').next())
                .and_then(|pid| pid.parse().ok())
            else {
                continue;
            };
            if !dead(pid) {
                continue;
            }
            let dir = entry.path();
            let dockerd_alive = fs::read_to_string(dir.join("dockerd.pid"))
                .ok()
                .and_then(|p| p.trim().parse().ok())
                .is_some_and(alive);
            if dockerd_alive {
                eprintln!(
                    "sluice tests: {} belongs to a dead test process but its dockerd still runs; \
                     left alone",
                    dir.display()
                );
                continue;
            }
            eprintln!(
                "sluice tests: removing {} left by dead test process {pid}",
                dir.display()
            );
            unmount_under(&dir);
            let _ = fs::remove_dir_all(&dir);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// helpers

/// Polls `f` every 250 ms until it returns true (then true) or `timeout` passes (then false).
pub fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if f() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// Runs `ip -j ARGS…` on the host and parses its JSON.
///
/// # Panics
/// When `ip` fails or prints no JSON.
pub fn ip_json(args: &[&str]) -> serde_json::Value {
    try_ip_json(args).unwrap_or_else(|e| panic!("{e}"))
}

/// Like [`ip_json`], with the failure as an error.
///
/// # Errors
/// When `ip` cannot run, fails, or prints something that is not JSON.
pub fn try_ip_json(args: &[&str]) -> Result<serde_json::Value, String> {
    let out = Command::new("ip")
        .arg("-j")
        .args(args)
        .output()
        .map_err(|e| format!("cannot run ip: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "ip -j {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    if text.trim().is_empty() {
        return Ok(serde_json::Value::Array(Vec::new()));
    }
    serde_json::from_str(&text).map_err(|e| format!("ip -j {}: bad JSON ({e})", args.join(" ")))
}

/// Names of every link in the host's network namespace.
///
/// # Panics
/// When `ip` fails.
#[must_use]
pub fn host_links() -> Vec<String> {
    ip_json(&["link", "show"])
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|l| l.get("ifname").and_then(serde_json::Value::as_str))
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default()
}

/// Host links whose name ties them to `id` (a network or endpoint ID): `sl????<id prefix>`.
#[must_use]
pub fn sl_links_for(id: &str) -> Vec<String> {
    host_links()
        .into_iter()
        .filter(|name| {
            name.starts_with("sl")
                && name.len() > 4
                && name.is_char_boundary(4)
                && id.starts_with(&name[4..])
        })
        .collect()
}

/// Which of the links `names` exist on the host now.
#[must_use]
pub fn present_links(names: &[String]) -> Vec<String> {
    let host = host_links();
    names.iter().filter(|n| host.contains(n)).cloned().collect()
}

/// IPv4/IPv6 addresses (`addr/prefix`) the host has on link `name`.
#[must_use]
pub fn host_addresses(name: &str) -> Vec<String> {
    let v = ip_json(&["addr", "show", "dev", name]);
    v.as_array()
        .into_iter()
        .flatten()
        .flat_map(|l| {
            l.get("addr_info")
                .and_then(serde_json::Value::as_array)
                .cloned()
                .unwrap_or_default()
        })
        .filter_map(|a| {
            let local = a.get("local")?.as_str()?;
            let len = a.get("prefixlen")?.as_u64()?;
            Some(format!("{local}/{len}"))
        })
        .collect()
}

/// Panics when the host already routes anything overlapping `cidr` (a leftover of an earlier
/// run, or a clash with the machine's own networks), so tests fail with the reason up front.
///
/// # Panics
/// When `cidr` is in use on the host.
pub fn assert_subnet_free(cidr: &str) {
    let net: ipnetwork::IpNetwork = cidr.parse().unwrap_or_else(|e| panic!("{cidr}: {e}"));
    let family = if net.is_ipv4() { "-4" } else { "-6" };
    let routes = ip_json(&[family, "route", "show", "table", "all"]);
    for r in routes.as_array().into_iter().flatten() {
        let Some(dst) = r.get("dst").and_then(serde_json::Value::as_str) else {
            continue;
        };
        if dst == "default" {
            continue;
        }
        let Ok(other) = dst.parse::<ipnetwork::IpNetwork>() else {
            continue;
        };
        // Host routes of a local table and multicast do not matter; real subnets do.
        if other.prefix() == if net.is_ipv4() { 32 } else { 128 }
            || dst.starts_with("ff")
            || dst.starts_with("fe80")
        {
            continue;
        }
        let overlaps = other.contains(net.network()) || net.contains(other.network());
        assert!(
            !overlaps,
            "test subnet {cidr} overlaps host route {r} (leftover from an earlier run?)"
        );
    }
}

/// Sends one HTTP/1.1 POST to a plugin socket the way dockerd does (no Content-Type).
///
/// # Errors
/// When the socket does not answer with an HTTP response.
pub fn plugin_call(socket: &Path, method: &str, body: &[u8]) -> Result<(u16, String)> {
    let mut stream =
        UnixStream::connect(socket).with_context(|| format!("connect {}", socket.display()))?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    let head = format!(
        "POST /{method} HTTP/1.1\r\nHost: plugin.moby.localhost\r\n\
         Accept: application/vnd.docker.plugins.v1.2+json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    // One write, as Go's client does for small bodies; a failed write still reads the
    // answer, since a server may reply (and close) before taking the whole body.
    let mut request = head.into_bytes();
    request.extend_from_slice(body);
    let written = stream.write_all(&request);
    let mut raw = Vec::new();
    if let Err(e) = stream.read_to_end(&mut raw) {
        written.context("send the request")?;
        return Err(e).context("read the response");
    }
    if raw.is_empty() {
        written.context("send the request")?;
    }
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text
        .split_once("\r\n\r\n")
        .with_context(|| format!("no HTTP header end in {text:?}"))?;
    let status: u16 = head
        .lines()
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("no HTTP status line in {head:?}"))?;
    let chunked = head.lines().any(|l| {
        let l = l.to_ascii_lowercase();
        l.starts_with("transfer-encoding:") && l.contains("chunked")
    });
    let body = if chunked {
        dechunk(body)
    } else {
        body.to_owned()
    };
    Ok((status, body))
}

fn dechunk(mut rest: &str) -> String {
    let mut out = String::new();
    while let Some((size, after)) = rest.split_once("\r\n") {
        let Ok(size) = usize::from_str_radix(size.split(';').next().unwrap_or("").trim(), 16)
        else {
            break;
        };
        if size == 0 || after.len() < size {
            break;
        }
        out.push_str(&after[..size]);
        rest = after[size..].trim_start_matches("\r\n");
    }
    out
}

/// The sluice binary: `SLUICE_BIN`, else `<target dir>/debug/sluice`.
#[must_use]
pub fn sluice_bin() -> PathBuf {
    if let Some(bin) = std::env::var_os("SLUICE_BIN") {
        return PathBuf::from(bin);
    }
    let target = std::env::var_os("CARGO_TARGET_DIR").map_or_else(
        || Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"),
        PathBuf::from,
    );
    target.join("debug/sluice")
}

fn exited(child: &Mutex<Option<Child>>) -> Option<std::process::ExitStatus> {
    lock(child)
        .as_mut()
        .and_then(|c| c.try_wait().ok().flatten())
}

fn join(args: &[std::ffi::OsString]) -> String {
    args.iter()
        .map(|a| a.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

// ---------------------------------------------------------------------------------------------
// datapath pins, admin socket, sluice CLI

/// Where the test daemons pin their datapaths (`--bpf-dir <root>/<plugin name>`).
const BPF_ROOT: &str = "/sys/fs/bpf/sluice";
/// Where the test daemons serve their admin API (`<dir>/<plugin name>.sock`).
const ADMIN_SOCKET_DIR: &str = "/run/sluice";

fn bpf_dir_of(driver: &str) -> PathBuf {
    Path::new(BPF_ROOT).join(driver)
}

fn admin_socket_of(driver: &str) -> PathBuf {
    Path::new(ADMIN_SOCKET_DIR).join(format!("{driver}.sock"))
}

/// Removes a daemon's bpffs pin directory: the link pins first (`links/`, so nothing stays
/// attached through a pin), then the rest (`Datapath::remove_pins`).
fn remove_bpf_pins(dir: &Path) {
    if !dir.exists() {
        return;
    }
    let _ = fs::remove_dir_all(dir.join("links"));
    if let Err(e) = sluice_driver::datapath::Datapath::remove_pins(dir) {
        eprintln!(
            "sluice tests: cleanup: cannot remove pins {}: {e}",
            dir.display()
        );
    }
}

impl Env {
    /// The sluice daemon's admin socket (`/run/sluice/<driver>.sock`).
    #[must_use]
    pub fn admin_socket(&self) -> PathBuf {
        admin_socket_of(&self.inner.driver)
    }

    /// The sluice daemon's bpffs pin directory (`/sys/fs/bpf/sluice/<driver>`).
    #[must_use]
    pub fn bpf_dir(&self) -> PathBuf {
        bpf_dir_of(&self.inner.driver)
    }

    /// Runs `sluice --admin-socket <this daemon's> ARGS…`.
    ///
    /// # Panics
    /// When the CLI cannot be started or does not finish within 3 minutes.
    pub fn sluice_cli(&self, args: &[&str]) -> Output {
        let mut cmd = Command::new(sluice_bin());
        cmd.arg("--admin-socket")
            .arg(self.admin_socket())
            .args(args);
        match output_with_timeout(&mut cmd, COMMAND_TIMEOUT) {
            Ok(Some(out)) => out,
            Ok(None) => panic!(
                "`sluice {}` did not finish within {COMMAND_TIMEOUT:?}",
                args.join(" ")
            ),
            Err(e) => panic!("cannot run sluice: {e}"),
        }
    }

    /// The host links of endpoint `endpoint_id` now: its host veth as sluice records it (an
    /// endpoint made from the warm link pool keeps the pool link's `slvp…` name) and any
    /// link named after its ID.
    ///
    /// # Panics
    /// When the CLI cannot be started.
    #[must_use]
    pub fn endpoint_links(&self, endpoint_id: &str) -> Vec<String> {
        let mut links = sl_links_for(endpoint_id);
        let out = self.sluice_cli(&["endpoints", "--json"]);
        let listed: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        let host = listed
            .get("endpoints")
            .and_then(serde_json::Value::as_array)
            .or_else(|| listed.as_array())
            .into_iter()
            .flatten()
            .find(|e| e["id"].as_str() == Some(endpoint_id))
            .and_then(|e| e["host_veth"].as_str())
            .map(str::to_owned);
        if let Some(host) = host
            && !links.contains(&host)
            && host_links().contains(&host)
        {
            links.push(host);
        }
        links
    }

    /// The host links of `container`'s endpoint on `net` ([`Env::endpoint_links`]), which
    /// must have at least one (so that a later "all gone" cannot pass vacuously).
    ///
    /// # Panics
    /// When it has none.
    #[must_use]
    pub fn container_links(&self, container: &str, net: &str) -> Vec<String> {
        let endpoint = self.endpoint_id(container, net);
        let links = self.endpoint_links(&endpoint);
        assert!(
            !links.is_empty(),
            "endpoint {endpoint} of {container} on {net} has no host link\n{}",
            self.logs_tail()
        );
        links
    }

    /// Runs the sluice CLI, which must succeed; returns its trimmed stdout.
    ///
    /// # Panics
    /// When it fails: the message holds its output and the tails of both logs.
    pub fn sluice_cli_ok(&self, args: &[&str]) -> String {
        let out = self.sluice_cli(args);
        assert!(
            out.status.success(),
            "`sluice {}` failed ({}):\nstdout: {}\nstderr: {}\n{}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stdout).trim(),
            String::from_utf8_lossy(&out.stderr).trim(),
            self.logs_tail()
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }
}

/// Leaves the swarm and removes what joining it created on the host (`docker_gwbridge`),
/// also when the test fails.
#[derive(Debug)]
pub struct SwarmGuard<'a>(pub &'a Env);

impl Drop for SwarmGuard<'_> {
    fn drop(&mut self) {
        let _ = self.0.docker(["swarm", "leave", "-f"]);
        let _ = self.0.docker(["network", "rm", "docker_gwbridge"]);
    }
}

/// Makes `manager` (reachable at `manager_ip`) a swarm manager and `worker` (at `worker_ip`)
/// its worker, and checks both nodes are ready. The guards (worker first) leave the swarm
/// when dropped.
///
/// # Panics
/// When a step fails.
pub fn two_node_swarm<'a>(
    manager: &'a Env,
    manager_ip: &str,
    worker: &'a Env,
    worker_ip: &str,
) -> (SwarmGuard<'a>, SwarmGuard<'a>) {
    let guards = (SwarmGuard(worker), SwarmGuard(manager));
    let manager_addr = format!("{manager_ip}:2377");
    manager.docker_ok([
        "swarm",
        "init",
        "--advertise-addr",
        &manager_addr,
        "--listen-addr",
        &manager_addr,
    ]);
    let token = manager.docker_ok(["swarm", "join-token", "-q", "worker"]);
    worker.docker_ok([
        "swarm",
        "join",
        "--token",
        &token,
        "--advertise-addr",
        worker_ip,
        "--listen-addr",
        &format!("{worker_ip}:2377"),
        &manager_addr,
    ]);
    let nodes = manager.docker_ok(["node", "ls", "--format", "{{.Status}}"]);
    assert_eq!(
        nodes.lines().filter(|s| *s == "Ready").count(),
        2,
        "{nodes}"
    );
    guards
}
