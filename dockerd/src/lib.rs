//! A private dockerd, beside (never instead of) any Docker Engine of the machine: its own
//! data-root, exec-root, pidfile, unix socket and containerd namespaces, all under one
//! directory; no `docker0` (`--bridge=none`), iptables on as Docker defaults.
//!
//! Shared by the Docker end-to-end tests (`sluice-tests`, `tests/src/docker.rs`, which adds a
//! sluice daemon) and `cargo xtask bench docker`. It depends on nothing of sluice: xtask uses
//! it, and xtask must build on a fresh machine before the eBPF toolchain and the rest exist.
//!
//! Only processes that a [`Dockerd`] spawned itself are ever signalled (and the containerd of
//! its own exec-root, when dockerd had to be SIGKILLed).

use std::ffi::OsStr;
use std::fs::{self, OpenOptions};
use std::io::Read as _;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// How long dockerd gets to answer after a start.
pub const START_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a stopped daemon gets before SIGKILL.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(20);
/// How long one docker command may take during clean-up.
pub const CLEANUP_COMMAND_TIMEOUT: Duration = Duration::from_secs(60);
/// Serialises dockerd start-ups across processes.
const DOCKERD_START_LOCK: &str = "/run/sluice-e2e-dockerd-start.lock";
/// Lines of the log shown when dockerd does not come up.
const LOG_TAIL_LINES: usize = 50;

/// A private dockerd. Not stopped on drop: the owner decides when (tests stop it in their
/// own clean-up, after removing containers and networks).
#[derive(Debug)]
pub struct Dockerd {
    dir: PathBuf,
    docker_host: String,
    containerd_namespace: String,
    /// Network namespace file dockerd runs in (`None`: the caller's).
    netns: Option<PathBuf>,
    child: Mutex<Option<Child>>,
}

impl Dockerd {
    /// A dockerd keeping everything under `dir` (socket `dir/docker.sock`, log
    /// `dir/dockerd.log`), with containerd namespaces `<containerd_namespace>` and
    /// `<containerd_namespace>-plugins`, run in the network namespace file `netns` (e.g.
    /// `/run/netns/x` or `/proc/<pid>/ns/net`) when given. Nothing starts before [`Dockerd::start`].
    #[must_use]
    pub fn new(dir: &Path, containerd_namespace: &str, netns: Option<PathBuf>) -> Self {
        Self {
            // Short paths matter: unix socket paths are limited to 107 bytes, and dockerd and
            // containerd put theirs under the exec-root.
            docker_host: format!("unix://{}", dir.join("docker.sock").display()),
            dir: dir.to_path_buf(),
            containerd_namespace: containerd_namespace.to_owned(),
            netns,
            child: Mutex::new(None),
        }
    }

    /// `DOCKER_HOST` of this dockerd (`unix://<dir>/docker.sock`).
    #[must_use]
    pub fn docker_host(&self) -> &str {
        &self.docker_host
    }

    /// The directory holding everything of this dockerd.
    #[must_use]
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// dockerd's log so far (all its runs).
    #[must_use]
    pub fn log(&self) -> String {
        read_lossy(&self.dir.join("dockerd.log"))
    }

    /// Starts dockerd and waits until it answers. Starts are serialised, within this process
    /// and across processes (a lock file): concurrent dockerds race creating their iptables
    /// chains and one dies with "Chain already exists". A dockerd that exits during start-up
    /// anyway is started again, twice at most.
    ///
    /// # Errors
    /// When dockerd is not installed, exits, or does not answer within [`START_TIMEOUT`].
    pub fn start(&self) -> Result<()> {
        static IN_PROCESS: Mutex<()> = Mutex::new(());
        let _in_process = lock(&IN_PROCESS);
        let lock_file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(DOCKERD_START_LOCK)
            .with_context(|| format!("open {DOCKERD_START_LOCK}"))?;
        let _across_processes =
            nix::fcntl::Flock::lock(lock_file, nix::fcntl::FlockArg::LockExclusive)
                .map_err(|(_, e)| e)
                .with_context(|| format!("lock {DOCKERD_START_LOCK}"))?;
        let mut attempt = 1;
        loop {
            self.spawn()?;
            match self.wait() {
                Ok(()) => return Ok(()),
                Err(e) if attempt < 3 && self.exited().is_some() => {
                    eprintln!("private dockerd: start attempt {attempt} failed, retrying: {e:#}");
                    attempt += 1;
                    std::thread::sleep(Duration::from_secs(1));
                }
                Err(e) => return Err(e),
            }
        }
    }

    fn spawn(&self) -> Result<()> {
        let dockerd =
            find_tool("dockerd").context("dockerd not found (apt-get install docker.io)")?;
        fs::create_dir_all(&self.dir).with_context(|| format!("create {}", self.dir.display()))?;
        let config = self.dir.join("daemon.json");
        // An empty config file, so /etc/docker/daemon.json of the machine does not apply.
        fs::write(&config, "{}\n")?;
        let log = open_log(&self.dir.join("dockerd.log"))?;
        // nsenter execs dockerd: the child is still dockerd itself.
        let mut command = match &self.netns {
            Some(netns) => {
                let mut c = Command::new("nsenter");
                c.arg(format!("--net={}", netns.display())).arg(dockerd);
                c
            }
            None => Command::new(dockerd),
        };
        let child = command
            .arg("--config-file")
            .arg(&config)
            .arg("--data-root")
            .arg(self.dir.join("data"))
            .arg("--exec-root")
            .arg(self.dir.join("exec"))
            .arg("--pidfile")
            .arg(self.dir.join("dockerd.pid"))
            .arg("-H")
            .arg(&self.docker_host)
            .arg("--bridge=none")
            .arg("--containerd-namespace")
            .arg(&self.containerd_namespace)
            .arg("--containerd-plugins-namespace")
            .arg(format!("{}-plugins", self.containerd_namespace))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("start dockerd")?;
        *lock(&self.child) = Some(child);
        Ok(())
    }

    fn wait(&self) -> Result<()> {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            let answered = self
                .docker(
                    &["info", "--format", "{{.ServerVersion}}"],
                    Duration::from_secs(20),
                )
                .is_ok_and(|out| out.status.success());
            if answered {
                return Ok(());
            }
            if let Some(status) = self.exited() {
                bail!(
                    "dockerd exited ({status}) before answering; its log:\n{}",
                    tail(&self.log(), LOG_TAIL_LINES)
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "dockerd did not answer on {} within {START_TIMEOUT:?}; its log:\n{}",
                    self.docker_host,
                    tail(&self.log(), LOG_TAIL_LINES)
                );
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// How dockerd exited, once it has.
    pub fn exited(&self) -> Option<ExitStatus> {
        lock(&self.child)
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    /// True while the dockerd process runs.
    pub fn running(&self) -> bool {
        lock(&self.child)
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// Stops dockerd (SIGTERM, waits for it; SIGKILL after [`STOP_TIMEOUT`]). Idempotent.
    pub fn stop(&self) {
        let mut guard = lock(&self.child);
        if let Some(child) = guard.as_mut()
            && !stop_child(child, Signal::SIGTERM, STOP_TIMEOUT)
        {
            // dockerd was SIGKILLed: its managed containerd outlives it. Stop that too, but
            // only when its pid file is ours and the process still names our exec-root.
            self.stop_orphaned_containerd();
        }
        *guard = None;
    }

    fn stop_orphaned_containerd(&self) {
        let pid_file = self.dir.join("exec/containerd/containerd.pid");
        let Ok(pid) = fs::read_to_string(&pid_file) else {
            return;
        };
        let Ok(pid) = pid.trim().parse::<i32>() else {
            return;
        };
        let cmdline = read_lossy(Path::new(&format!("/proc/{pid}/cmdline")));
        if cmdline.contains(&*self.dir.to_string_lossy()) {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
    }

    /// Runs `docker -H <this dockerd> ARGS…`, killing the CLI after `timeout`.
    ///
    /// # Errors
    /// When the CLI cannot start or runs longer than `timeout` (the message says which).
    pub fn docker<S: AsRef<OsStr>>(&self, args: &[S], timeout: Duration) -> Result<Output, String> {
        let mut cmd = Command::new("docker");
        cmd.arg("-H").arg(&self.docker_host).args(args);
        let shown = || {
            args.iter()
                .map(|a| a.as_ref().to_string_lossy().into_owned())
                .collect::<Vec<_>>()
                .join(" ")
        };
        match output_with_timeout(&mut cmd, timeout) {
            Ok(Some(out)) => Ok(out),
            Ok(None) => Err(format!(
                "`docker {}` did not finish within {timeout:?}",
                shown()
            )),
            Err(e) => Err(format!("cannot run the docker CLI: {e}")),
        }
    }

    /// Runs the docker CLI for clean-up: failures are reported on stderr and give `None`.
    pub fn docker_quiet<S: AsRef<OsStr>>(&self, args: &[S]) -> Option<Output> {
        self.docker(args, CLEANUP_COMMAND_TIMEOUT)
            .map_err(|e| eprintln!("private dockerd: cleanup: {e}"))
            .ok()
    }

    /// `docker rm -f` every container of this dockerd; failures are reported, not returned.
    pub fn remove_all_containers(&self) {
        let Some(ids) = self.docker_quiet(&["ps", "-aq"]) else {
            return;
        };
        let ids: Vec<String> = String::from_utf8_lossy(&ids.stdout)
            .split_whitespace()
            .map(str::to_owned)
            .collect();
        // In batches: one `docker rm -f` of hundreds of IDs would outrun the clean-up timeout.
        for batch in ids.chunks(100) {
            let mut args = vec!["rm".to_owned(), "-f".to_owned()];
            args.extend(batch.iter().cloned());
            let Some(out) = self.docker_quiet(&args) else {
                return;
            };
            if !out.status.success() {
                eprintln!(
                    "private dockerd: docker rm -f failed: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                );
            }
        }
    }

    /// Imports `image` (`docker import`) made of the host's static busybox with its applets:
    /// no registry needed.
    ///
    /// # Errors
    /// When busybox is missing or dynamically linked, or tar or `docker import` fails.
    pub fn build_busybox_image(&self, image: &str) -> Result<()> {
        let busybox =
            find_tool("busybox").context("busybox not found (apt-get install busybox-static)")?;
        if is_dynamically_linked(&busybox)? {
            bail!(
                "{} is dynamically linked; the test image needs Debian's busybox-static",
                busybox.display()
            );
        }
        let root = self.dir.join("image");
        for sub in ["bin", "etc", "tmp", "root", "proc", "sys", "dev", "var"] {
            fs::create_dir_all(root.join(sub))?;
        }
        fs::set_permissions(root.join("tmp"), fs::Permissions::from_mode(0o1777))?;
        fs::copy(&busybox, root.join("bin/busybox"))
            .with_context(|| format!("copy {}", busybox.display()))?;
        fs::set_permissions(root.join("bin/busybox"), fs::Permissions::from_mode(0o755))?;
        let list = Command::new(&busybox)
            .arg("--list")
            .output()
            .context("busybox --list")?;
        for applet in String::from_utf8_lossy(&list.stdout).lines() {
            let applet = applet.trim();
            if applet.is_empty() || applet == "busybox" || applet.contains('/') {
                continue;
            }
            std::os::unix::fs::symlink("busybox", root.join("bin").join(applet))
                .with_context(|| format!("symlink applet {applet}"))?;
        }
        fs::write(
            root.join("etc/passwd"),
            "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n",
        )?;
        fs::write(root.join("etc/group"), "root:x:0:\nnogroup:x:65534:\n")?;
        let tarball = self.dir.join("image.tar");
        let status = Command::new("tar")
            .arg("-C")
            .arg(&root)
            .args(["--numeric-owner", "--owner=0", "--group=0", "-cf"])
            .arg(&tarball)
            .arg(".")
            .status()
            .context("run tar")?;
        if !status.success() {
            bail!("tar of the test image failed ({status})");
        }
        let out = self
            .docker(
                &[
                    OsStr::new("import"),
                    OsStr::new("--change"),
                    OsStr::new("CMD [\"sh\"]"),
                    tarball.as_os_str(),
                    OsStr::new(image),
                ],
                Duration::from_secs(180),
            )
            .map_err(anyhow::Error::msg)?;
        if !out.status.success() {
            bail!(
                "docker import of the test image failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }
}

/// An executable named `tool` on `PATH` or in the sbin directories.
#[must_use]
pub fn find_tool(tool: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/local/sbin", "/usr/sbin", "/sbin"].map(PathBuf::from))
        .map(|dir| dir.join(tool))
        .find(|p| {
            p.metadata()
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}

/// True when the ELF file has a `PT_INTERP` program header (needs a dynamic loader).
fn is_dynamically_linked(path: &Path) -> Result<bool> {
    const PT_INTERP: u32 = 3;
    let data = fs::read(path).with_context(|| format!("read {}", path.display()))?;
    let u16_at = |o: usize| data.get(o..o + 2).map(|b| u16::from_le_bytes([b[0], b[1]]));
    let u32_at = |o: usize| {
        data.get(o..o + 4)
            .and_then(|b| <[u8; 4]>::try_from(b).ok())
            .map(u32::from_le_bytes)
    };
    let u64_at = |o: usize| {
        data.get(o..o + 8)
            .and_then(|b| <[u8; 8]>::try_from(b).ok())
            .map(u64::from_le_bytes)
    };
    // 64-bit little-endian ELF only (x86_64 / aarch64 Debian).
    if data.get(..6) != Some(&[0x7f, b'E', b'L', b'F', 2, 1][..]) {
        bail!("{} is not a 64-bit little-endian ELF file", path.display());
    }
    let (Some(phoff), Some(phentsize), Some(phnum)) = (u64_at(0x20), u16_at(0x36), u16_at(0x38))
    else {
        bail!("{}: truncated ELF header", path.display());
    };
    let phoff = usize::try_from(phoff)?;
    Ok((0..usize::from(phnum))
        .any(|i| u32_at(phoff + i * usize::from(phentsize)) == Some(PT_INTERP)))
}

/// Runs `cmd` (stdin from /dev/null) and collects its output; kills it (it is our own child)
/// and returns `None` when it runs longer than `timeout`.
///
/// # Errors
/// When it cannot start.
pub fn output_with_timeout(
    cmd: &mut Command,
    timeout: Duration,
) -> std::io::Result<Option<Output>> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let drain = |pipe: Option<Box<dyn std::io::Read + Send>>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut pipe) = pipe {
                let _ = pipe.read_to_end(&mut buf);
            }
            buf
        })
    };
    let stdout = drain(child.stdout.take().map(|p| Box::new(p) as _));
    let stderr = drain(child.stderr.take().map(|p| Box::new(p) as _));
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break Some(status);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(2));
    };
    let stdout = stdout.join().unwrap_or_default();
    let stderr = stderr.join().unwrap_or_default();
    Ok(status.map(|status| Output {
        status,
        stdout,
        stderr,
    }))
}

/// Runs `cmd` (stdin from /dev/null) and collects its output; kills it after `timeout`.
///
/// # Errors
/// When it cannot start, or runs longer than `timeout`.
pub fn run_with_timeout(cmd: &mut Command, timeout: Duration) -> Result<Output> {
    output_with_timeout(cmd, timeout)?.with_context(|| format!("did not finish within {timeout:?}"))
}

/// Sends `signal`, waits up to `timeout`, then SIGKILLs. True when it exited before SIGKILL.
pub fn stop_child(child: &mut Child, signal: Signal, timeout: Duration) -> bool {
    if matches!(child.try_wait(), Ok(Some(_))) {
        return true;
    }
    let Ok(pid) = i32::try_from(child.id()) else {
        return false;
    };
    let _ = kill(Pid::from_raw(pid), signal);
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        match child.try_wait() {
            Ok(Some(_)) | Err(_) => return true,
            Ok(None) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
    eprintln!("private dockerd: pid {pid} ignored {signal} for {timeout:?}; sending SIGKILL");
    let _ = child.kill();
    let _ = child.wait();
    false
}

/// Lazily unmounts everything mounted under `dir`, deepest first.
pub fn unmount_under(dir: &Path) {
    let Ok(info) = fs::read_to_string("/proc/self/mountinfo") else {
        return;
    };
    let prefix = dir.to_string_lossy().into_owned();
    let mut points: Vec<String> = info
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(unescape_mount_path)
        .filter(|p| p == &prefix || p.starts_with(&format!("{prefix}/")))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.len()));
    points.dedup();
    for p in points {
        let _ = Command::new("umount")
            .args(["-l", &p])
            .stderr(Stdio::null())
            .status();
    }
}

/// Decodes mountinfo's octal escapes (`\040` for a space, …).
fn unescape_mount_path(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && let Some(Ok(digits)) = bytes.get(i + 1..i + 4).map(std::str::from_utf8)
            && let Ok(v) = u8::from_str_radix(digits, 8)
        {
            out.push(v);
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Opens `path` for appending (created when missing), for a daemon's stdout and stderr.
///
/// # Errors
/// When it cannot be opened.
pub fn open_log(path: &Path) -> Result<fs::File> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("open {}", path.display()))
}

/// The file's text (lossy UTF-8); empty when it cannot be read.
#[must_use]
pub fn read_lossy(path: &Path) -> String {
    fs::read(path)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default()
}

/// The last `n` lines of `text`.
#[must_use]
pub fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Locks `m`, also when a panicking holder poisoned it.
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mount_paths_are_unescaped() {
        assert_eq!(unescape_mount_path(r"/tmp/a\040b"), "/tmp/a b");
        assert_eq!(unescape_mount_path(r"/x\\y"), r"/x\\y");
        assert_eq!(unescape_mount_path("/plain"), "/plain");
    }

    #[test]
    fn tail_keeps_the_last_lines() {
        assert_eq!(tail("a\nb\nc\n", 2), "b\nc");
        assert_eq!(tail("a", 5), "a");
    }

    #[test]
    fn docker_host_is_under_the_directory() {
        let d = Dockerd::new(Path::new("/tmp/x"), "ns", None);
        assert_eq!(d.docker_host(), "unix:///tmp/x/docker.sock");
        assert!(!d.running());
    }
}
