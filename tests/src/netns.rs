//! Throwaway network namespaces for privileged tests.
//!
//! [`NetNs`] moves the **current thread** (not the process) into a fresh network namespace
//! and back on drop, so tests on parallel libtest threads never see each other's links and
//! never touch the host's. Everything a test creates after entering lives in that namespace:
//! netlink sockets (build the tokio runtime *after* entering, with
//! [`current_thread_runtime`], so the socket and its task stay on this thread), `/proc/sys/net`
//! reads, and child processes ([`ip_json`], [`run`]), because a child inherits the namespaces
//! of the thread that spawns it. [`PeerNs`] is a second namespace held by a child process,
//! standing in for a container sandbox.

use std::fs::File;
use std::marker::PhantomData;
use std::os::fd::OwnedFd;
use std::os::unix::fs::MetadataExt;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use nix::sched::{CloneFlags, setns, unshare};

/// The network namespace of the current thread.
const THREAD_NETNS: &str = "/proc/thread-self/ns/net";

/// Guard for a fresh network namespace entered by the current thread; restores the previous
/// one on drop. `!Send`: it must be dropped on the thread that created it.
#[derive(Debug)]
pub struct NetNs {
    previous: OwnedFd,
    inode: u64,
    _thread_bound: PhantomData<*const ()>,
}

impl NetNs {
    /// Unshares a new network namespace for the current thread and brings `lo` up in it.
    ///
    /// # Errors
    /// If the current namespace cannot be saved, `unshare(CLONE_NEWNET)` fails (not root) or
    /// `ip link set lo up` fails. On a failure after unsharing, the thread is moved back.
    pub fn enter() -> anyhow::Result<Self> {
        let previous: OwnedFd = File::open(THREAD_NETNS)
            .with_context(|| format!("open {THREAD_NETNS}"))?
            .into();
        unshare(CloneFlags::CLONE_NEWNET).context("unshare(CLONE_NEWNET)")?;
        let guard = Self {
            previous,
            inode: current_netns_inode()?,
            _thread_bound: PhantomData,
        };
        // On error the guard drops here and restores the previous namespace.
        run("ip", &["link", "set", "lo", "up"])?;
        Ok(guard)
    }

    /// Inode of this namespace (what `/proc/thread-self/ns/net` points to inside it).
    #[must_use]
    pub fn inode(&self) -> u64 {
        self.inode
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        if let Err(e) = setns(&self.previous, CloneFlags::CLONE_NEWNET) {
            // Panicking in drop could abort an unwinding test; the thread is a libtest
            // thread that ends with the test anyway.
            eprintln!("NetNs: could not return to the previous network namespace: {e}");
        }
    }
}

/// `true` when running as root; otherwise prints "skipped: needs root" and returns `false`.
#[must_use]
pub fn require_root() -> bool {
    if nix::unistd::geteuid().is_root() {
        true
    } else {
        eprintln!("skipped: needs root");
        false
    }
}

/// Inode of the namespace file at `path` (e.g. `/proc/1/ns/net`).
///
/// # Errors
/// If the file cannot be read.
pub fn netns_inode(path: &str) -> anyhow::Result<u64> {
    Ok(std::fs::metadata(path)
        .with_context(|| format!("stat {path}"))?
        .ino())
}

/// Inode of the current thread's network namespace.
///
/// # Errors
/// If `/proc/thread-self/ns/net` cannot be read.
pub fn current_netns_inode() -> anyhow::Result<u64> {
    netns_inode(THREAD_NETNS)
}

/// A single-threaded tokio runtime on the current thread: build it after [`NetNs::enter`]
/// so every socket and child process it creates belongs to the test's namespace.
///
/// # Panics
/// If the runtime cannot be built.
#[must_use]
pub fn current_thread_runtime() -> tokio::runtime::Runtime {
    match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => panic!("building a tokio runtime: {e}"),
    }
}

/// Runs `program args…` in the current thread's namespace and returns its stdout.
///
/// # Errors
/// If it cannot be started or exits non-zero (the message carries stderr).
pub fn run(program: &str, args: &[&str]) -> anyhow::Result<String> {
    let output = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("spawn {program}"))?;
    if !output.status.success() {
        bail!(
            "{program} {}: {}: {}",
            args.join(" "),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// `ip -j ARGS…` in the current thread's namespace, parsed.
///
/// # Errors
/// If `ip` fails or prints something that is not JSON.
pub fn try_ip_json(args: &[&str]) -> anyhow::Result<serde_json::Value> {
    let mut full = vec!["-j"];
    full.extend_from_slice(args);
    let out = run("ip", &full)?;
    serde_json::from_str(&out)
        .with_context(|| format!("parse `ip {}` output: {out}", full.join(" ")))
}

/// `ip -j ARGS…` in the current thread's namespace, parsed (e.g.
/// `ip_json(&["-d", "link", "show", "dev", "slbr1"])`).
///
/// # Panics
/// If `ip` fails or prints something that is not JSON.
#[must_use]
#[track_caller]
pub fn ip_json(args: &[&str]) -> serde_json::Value {
    match try_ip_json(args) {
        Ok(v) => v,
        Err(e) => panic!("{e:#}"),
    }
}

/// Names of all links in the current thread's namespace, per `ip -j link show`.
///
/// # Panics
/// If `ip` fails.
#[must_use]
#[track_caller]
pub fn link_names() -> Vec<String> {
    ip_json(&["link", "show"])
        .as_array()
        .map(|links| {
            links
                .iter()
                .filter_map(|l| l["ifname"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

/// Another network namespace, held by a `sleep` child (`unshare -n sleep …`) so it needs no
/// name under `/run/netns`; a stand-in for a container sandbox. Killed on drop, which frees
/// the namespace and any links inside.
#[derive(Debug)]
pub struct PeerNs {
    child: Child,
}

impl PeerNs {
    /// Starts the holder process from the current thread and waits until it has its own
    /// namespace.
    ///
    /// # Errors
    /// If `unshare` cannot be started or does not switch namespace within 5 s.
    pub fn spawn() -> anyhow::Result<Self> {
        let here = current_netns_inode()?;
        let child = Command::new("unshare")
            .args(["--net", "sleep", "600"])
            .stdin(Stdio::null())
            .spawn()
            .context("spawn unshare --net sleep")?;
        let ns = Self { child };
        let path = format!("/proc/{}/ns/net", ns.pid());
        let deadline = Instant::now() + Duration::from_secs(5);
        // `unshare` execs `sleep` in the same process after unsharing; until then the child
        // still shares our namespace.
        while netns_inode(&path)? == here {
            if Instant::now() > deadline {
                bail!("unshare child {} never left our namespace", ns.pid());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(ns)
    }

    /// PID of the holder (`ip link set DEV netns PID` moves a link in).
    #[must_use]
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Runs `program args…` inside this namespace (`nsenter -t PID -n …`), returning stdout.
    ///
    /// # Errors
    /// If the command fails.
    pub fn run(&self, program: &str, args: &[&str]) -> anyhow::Result<String> {
        let pid = self.pid().to_string();
        let mut full = vec!["-t", pid.as_str(), "-n", program];
        full.extend_from_slice(args);
        run("nsenter", &full)
    }
}

impl Drop for PeerNs {
    fn drop(&mut self) {
        // Errors mean it is already gone.
        let _killed = self.child.kill();
        let _reaped = self.child.wait();
    }
}
