//! Developer tasks for sluice: `cargo xtask setup | run | test`.
//!
//! - `setup` installs what a fresh Debian machine lacks (Docker Engine, compose, busybox, …);
//! - `run` builds the daemon, makes sure a local Docker Engine answers, and runs `sluice daemon`;
//! - `test` runs the whole suite (unit, privileged, Docker end-to-end) as root.

#![forbid(unsafe_code)]
#![expect(
    clippy::print_stdout,
    reason = "xtask is a developer tool whose output is meant for the terminal"
)]

use std::ffi::OsString;
use std::fs::OpenOptions;
use std::io::{BufRead as _, BufReader};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use clap::{Parser, Subcommand};

mod bench;
mod plugin;

/// Tools the daemon, the test suite and `cargo xtask run` need on the host.
const REQUIRED_TOOLS: &[&str] = &[
    "dockerd",
    "docker",
    "docker-compose",
    "busybox",
    "ip",
    "iptables",
    "jq",
    // The multi-host tests (tests/tests/cluster_privileged.rs) and etcd-client's build script.
    "etcd",
    "etcdctl",
    "protoc",
    "openssl",
    "curl",
    "nsenter",
    // etcd-client's TLS (ring) has C code: the managed plugin's musl build needs a musl cc.
    "x86_64-linux-musl-gcc",
];

/// Debian packages that provide [`REQUIRED_TOOLS`] (plus nftables, which the firewall code uses).
const APT_PACKAGES: &[&str] = &[
    "docker.io",
    "docker-compose",
    "busybox-static",
    "iproute2",
    "iptables",
    "nftables",
    "jq",
    "etcd-server",
    "etcd-client",
    "protobuf-compiler",
    "openssl",
    "curl",
    "util-linux",
    "musl-tools",
];

/// The local Docker Engine socket that `cargo xtask run` talks to.
const DOCKER_SOCKET: &str = "/var/run/docker.sock";
/// Where `cargo xtask run` sends the log of a dockerd it had to start itself.
const DOCKERD_LOG: &str = "/var/log/sluice-dockerd.log";

#[derive(Debug, Parser)]
#[command(name = "cargo xtask", about = "sluice developer tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Debug, Subcommand)]
enum Task {
    /// Install what this machine lacks (idempotent; does nothing when all is present).
    Setup,
    /// Build sluice (release), make sure a local Docker Engine runs, then run `sluice daemon`.
    Run {
        /// Extra arguments for `sluice daemon`, after `--` (e.g. `-- --log-level debug`).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<OsString>,
    },
    /// Benchmarks side by side with Docker's bridge (not tests: they measure and check the
    /// targets; docs/benchmarks.md).
    Bench(bench::BenchArgs),
    /// Build the managed plugin bundle (static binary, rootfs, config.json) and run
    /// `docker plugin create` (docs/managed-plugin.md).
    Plugin(plugin::PluginArgs),
    /// Run the whole test suite (needs root for the privileged and Docker tiers).
    Test {
        /// Run only the unit tests (`cargo test --workspace --lib`), which need no root.
        #[arg(long)]
        unprivileged: bool,
        /// Extra arguments for `cargo test` (e.g. `-- --nocapture`, or a test-name filter).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<OsString>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.task {
        Task::Setup => setup(),
        Task::Run { args } => run(&args).map(|()| ExitCode::SUCCESS),
        Task::Test { unprivileged, args } => test(unprivileged, &args),
        Task::Bench(args) => bench(&args),
        Task::Plugin(args) => plugin::plugin(&args).map(|()| ExitCode::SUCCESS),
    };
    match result {
        Ok(code) => code,
        Err(err) => {
            eprintln!("xtask: error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

// ---------------------------------------------------------------------------------------------
// setup

fn setup() -> Result<ExitCode> {
    install_system_packages()?;
    install_ebpf_toolchain()?;
    plugin::install_musl_target()?;
    Ok(ExitCode::SUCCESS)
}

/// Installs Debian's Docker Engine, compose, busybox-static, iproute2, iptables, nftables and jq
/// when any required tool is missing; does nothing (no `apt-get update`) when all are present.
fn install_system_packages() -> Result<()> {
    let missing = missing_tools();
    if missing.is_empty() {
        println!(
            "setup: all required tools present ({})",
            REQUIRED_TOOLS.join(", ")
        );
        return Ok(());
    }
    println!(
        "setup: missing {}; installing Debian packages: {}",
        missing.join(", "),
        APT_PACKAGES.join(" ")
    );
    if !is_root() {
        bail!(
            "installing packages needs root; run as root, or install them yourself: \
             apt-get install {}",
            APT_PACKAGES.join(" ")
        );
    }
    run_checked(Command::new("apt-get").arg("update"))?;
    run_checked(
        Command::new("apt-get")
            .args(["install", "-y"])
            .args(APT_PACKAGES)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )?;
    let still_missing = missing_tools();
    if !still_missing.is_empty() {
        bail!(
            "still missing after apt-get install: {}",
            still_missing.join(", ")
        );
    }
    Ok(())
}

/// The nightly whose LLVM (22) matches bpf-linker's; `driver/build.rs` names the same one.
const EBPF_NIGHTLY: &str = "nightly-2026-05-20";
/// bpf-linker release built against Debian's LLVM 22.
const BPF_LINKER_VERSION: &str = "0.13.0";
/// Debian's LLVM 22, which bpf-linker links against.
const LLVM_PREFIX: &str = "/usr/lib/llvm-22";

/// The eBPF toolchain: the pinned nightly (with `rust-src`) and `bpf-linker` (built against
/// Debian's `llvm-22-dev`). Idempotent: checks first, installs only what is missing. Recipe
/// and pitfalls: `ebpf/README.md`.
fn install_ebpf_toolchain() -> Result<()> {
    let toolchains = Command::new("rustup")
        .args(["toolchain", "list"])
        .output()
        .context("run rustup (needed for the eBPF nightly)")?;
    let listed = String::from_utf8_lossy(&toolchains.stdout);
    if listed.lines().any(|l| l.starts_with(EBPF_NIGHTLY)) {
        println!("setup: {EBPF_NIGHTLY} present");
    } else {
        println!("setup: installing {EBPF_NIGHTLY} (eBPF programs)");
        run_checked(Command::new("rustup").args([
            "toolchain",
            "install",
            EBPF_NIGHTLY,
            "--profile",
            "minimal",
            "--component",
            "rust-src",
        ]))?;
    }
    // A nightly installed without rust-src (by hand, say) gets it here; a no-op otherwise.
    run_checked(Command::new("rustup").args([
        "component",
        "add",
        "rust-src",
        "--toolchain",
        EBPF_NIGHTLY,
    ]))?;

    let linker_ok = find_tool("bpf-linker").is_some_and(|path| {
        Command::new(path)
            .arg("--version")
            .output()
            .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains(BPF_LINKER_VERSION))
    });
    if linker_ok {
        println!("setup: bpf-linker {BPF_LINKER_VERSION} present");
        return Ok(());
    }
    if !Path::new(LLVM_PREFIX).join("lib").is_dir() {
        if !is_root() {
            bail!(
                "bpf-linker needs Debian's llvm-22-dev; run as root or `apt-get install llvm-22-dev`"
            );
        }
        println!("setup: installing llvm-22-dev (for bpf-linker)");
        run_checked(Command::new("apt-get").arg("update"))?;
        run_checked(
            Command::new("apt-get")
                .args(["install", "-y", "llvm-22-dev"])
                .env("DEBIAN_FRONTEND", "noninteractive"),
        )?;
    }
    println!("setup: building bpf-linker {BPF_LINKER_VERSION} against LLVM 22 (about a minute)");
    run_checked(
        Command::new(cargo())
            .args([
                "install",
                "bpf-linker",
                "--version",
                BPF_LINKER_VERSION,
                "--locked",
                "--no-default-features",
                "--features",
                "llvm-22",
            ])
            // bpf-linker's build script takes the first llvm-config on PATH (LLVM 14 on
            // bookworm) unless told where LLVM 22 is.
            .env("LLVM_PREFIX", LLVM_PREFIX),
    )
}

/// Required tools that are not installed. A dynamically linked busybox (Debian's `busybox`)
/// counts as missing: the test image is made from the static one (`busybox-static`).
fn missing_tools() -> Vec<&'static str> {
    REQUIRED_TOOLS
        .iter()
        .copied()
        .filter(|tool| match find_tool(tool) {
            None => true,
            Some(path) => *tool == "busybox" && !is_static_elf(&path),
        })
        .collect()
}

/// True when `path` is an ELF executable without a `PT_INTERP` header (needs no loader).
fn is_static_elf(path: &Path) -> bool {
    const PT_INTERP: u32 = 3;
    let Ok(data) = std::fs::read(path) else {
        return false;
    };
    let bytes = |o: usize, n: usize| data.get(o..o + n);
    let u16_at = |o: usize| bytes(o, 2).map(|b| u16::from_le_bytes([b[0], b[1]]));
    let u32_at = |o: usize| bytes(o, 4).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]));
    let u64_at = |o: usize| {
        bytes(o, 8)
            .and_then(|b| <[u8; 8]>::try_from(b).ok())
            .map(u64::from_le_bytes)
    };
    // 64-bit little-endian ELF (Debian on x86_64 / arm64).
    if data.get(..6) != Some(&[0x7f, b'E', b'L', b'F', 2, 1][..]) {
        return false;
    }
    let (Some(phoff), Some(phentsize), Some(phnum)) = (u64_at(0x20), u16_at(0x36), u16_at(0x38))
    else {
        return false;
    };
    let Ok(phoff) = usize::try_from(phoff) else {
        return false;
    };
    !(0..usize::from(phnum)).any(|i| u32_at(phoff + i * usize::from(phentsize)) == Some(PT_INTERP))
}

/// Looks `tool` up on `PATH`, plus the sbin directories that a non-login root shell may lack.
fn find_tool(tool: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/local/sbin", "/usr/sbin", "/sbin"].map(PathBuf::from))
        .map(|dir| dir.join(tool))
        .find(|candidate| {
            candidate.metadata().is_ok_and(|m| {
                m.is_file()
                    && std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o111 != 0
            })
        })
}

// ---------------------------------------------------------------------------------------------
// run

fn run(args: &[OsString]) -> Result<()> {
    if !is_root() {
        bail!("`cargo xtask run` needs root: sluice creates bridges and veths, and serves Docker");
    }
    install_system_packages()?;
    install_ebpf_toolchain()?;
    let root = workspace_root();
    run_checked(
        Command::new(cargo())
            .current_dir(&root)
            .args(["build", "--release", "-p", "sluice-plugin"])
            .env("SLUICE_EBPF_REQUIRED", "1"),
    )?;
    ensure_docker_engine()?;

    let sluice = target_dir(&root)?.join("release").join("sluice");
    println!();
    println!("sluice is starting; in another terminal:");
    println!("  docker network create -d sluice --ipam-driver sluice mynet");
    println!("  docker run --rm -it --network mynet busybox sh");
    println!();
    let err = Command::new(&sluice).arg("daemon").args(args).exec();
    Err(err).with_context(|| format!("exec {}", sluice.display()))
}

/// Makes sure a Docker Engine answers on [`DOCKER_SOCKET`]; starts Debian's dockerd otherwise.
fn ensure_docker_engine() -> Result<()> {
    if docker_answers() {
        println!("run: a Docker Engine answers on {DOCKER_SOCKET}");
        return Ok(());
    }
    let dockerd = find_tool("dockerd").context("dockerd not found (see `cargo xtask setup`)")?;
    // systemd is not PID 1 in the containers this runs in, so start dockerd directly.
    println!(
        "run: no Docker Engine answers on {DOCKER_SOCKET}; starting {} in the background \
         (log: {DOCKERD_LOG})",
        dockerd.display()
    );
    let log = OpenOptions::new()
        .create(true)
        .append(true)
        .open(DOCKERD_LOG)
        .with_context(|| format!("open {DOCKERD_LOG}"))?;
    let child = Command::new(&dockerd)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        // Own process group: Ctrl-C on `cargo xtask run` stops sluice, not the engine.
        .process_group(0)
        .spawn()
        .with_context(|| format!("start {}", dockerd.display()))?;
    println!(
        "run: dockerd started (pid {}); waiting for it to answer",
        child.id()
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        if docker_answers() {
            println!("run: Docker Engine is up");
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    bail!("dockerd did not answer within 60 s; see {DOCKERD_LOG}")
}

fn docker_answers() -> bool {
    Command::new("docker")
        .args(["-H", &format!("unix://{DOCKER_SOCKET}"), "info"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

// ---------------------------------------------------------------------------------------------
// bench

/// Runs the benchmarks: `micro` loads the eBPF programs with policy maps of several sizes and
/// times them with `BPF_PROG_TEST_RUN`; the rest is in [`bench`].
fn bench(args: &bench::BenchArgs) -> Result<ExitCode> {
    if !is_root() {
        bail!("`cargo xtask bench` needs root: it loads eBPF programs and creates namespaces");
    }
    install_ebpf_toolchain()?;
    let root = workspace_root();
    let mut ok = true;
    if args.suite == "all" || args.suite == "micro" {
        println!("bench micro: ns per packet by policy size (BPF_PROG_TEST_RUN, median of rounds)");
        ok &= Command::new(cargo())
            .current_dir(&root)
            .args([
                "test",
                "--release",
                "-p",
                "sluice-tests",
                "--test",
                "datapath_privileged",
                "bench_ns_per_packet_by_policy_size",
                "--",
                "--ignored",
                "--nocapture",
            ])
            .env("SLUICE_EBPF_REQUIRED", "1")
            .status()
            .context("run the micro benchmark")?
            .success();
    }
    let mut sluice = None;
    if args.suite != "micro" {
        run_checked(
            Command::new(cargo())
                .current_dir(&root)
                .args(["build", "--release", "-p", "sluice-plugin"])
                .env("SLUICE_EBPF_REQUIRED", "1"),
        )?;
        // `SLUICE_BENCH_BIN`: another build of the daemon (a before/after pair in one minute).
        sluice = Some(
            match std::env::var_os("SLUICE_BENCH_BIN").filter(|b| !b.is_empty()) {
                Some(bin) => PathBuf::from(bin),
                None => target_dir(&root)?.join("release").join("sluice"),
            },
        );
    }
    let code = bench::bench(args, &root, sluice)?;
    Ok(if ok { code } else { ExitCode::FAILURE })
}

// ---------------------------------------------------------------------------------------------
// test

fn test(unprivileged: bool, args: &[OsString]) -> Result<ExitCode> {
    let root = workspace_root();
    let mut cmd = Command::new(cargo());
    cmd.current_dir(&root).args(["test", "--workspace"]);
    if unprivileged {
        println!("test: --unprivileged: unit tests only (cargo test --workspace --lib)");
        cmd.arg("--lib");
    } else {
        if !is_root() {
            bail!(
                "`cargo xtask test` needs root: the privileged tier creates network namespaces \
                 and links, and the Docker tier runs its own dockerd. Run it as root (e.g. \
                 `sudo -E cargo xtask test`), or run `cargo xtask test --unprivileged` for the \
                 unit tests only"
            );
        }
        install_system_packages()?;
        install_ebpf_toolchain()?;
        run_checked(
            Command::new(cargo())
                .current_dir(&root)
                .args(["build", "-p", "sluice-plugin"])
                .env("SLUICE_EBPF_REQUIRED", "1"),
        )?;
        let sluice = target_dir(&root)?.join("debug").join("sluice");
        if !sluice.is_file() {
            bail!("{} was not built", sluice.display());
        }
        println!("test: SLUICE_BIN={}", sluice.display());
        // The managed-plugin tests run `cargo xtask plugin --debug`: build its static binary
        // once here, outside their time limits.
        plugin::build(&root, true)?;
        cmd.env("SLUICE_BIN", &sluice)
            .env("SLUICE_EBPF_REQUIRED", "1");
    }
    cmd.args(args);
    println!("test: {}", describe(&cmd));
    // cargo test's stdout passes through line by line; its per-binary summaries are added up
    // into one closing line, so the last line says what the whole run did (cargo's own last
    // summary is that of a doc-test binary, often "0 passed").
    let mut child = cmd
        .stdout(Stdio::piped())
        .spawn()
        .context("run cargo test")?;
    let mut totals = Totals::default();
    if let Some(stdout) = child.stdout.take() {
        for line in BufReader::new(stdout).lines() {
            let line = line.context("read cargo test output")?;
            println!("{line}");
            totals.add(&line);
        }
    }
    let status = child.wait().context("wait for cargo test")?;
    println!(
        "total: {} passed, {} failed, {} skipped",
        totals.passed, totals.failed, totals.ignored
    );
    Ok(match status.code() {
        Some(0) => ExitCode::SUCCESS,
        Some(code) => ExitCode::from(u8::try_from(code).unwrap_or(1)),
        None => {
            eprintln!("xtask: cargo test was killed by a signal ({status})");
            ExitCode::FAILURE
        }
    })
}

/// Counts added up from libtest's `test result: ok. 3 passed; 0 failed; 1 ignored; …` lines.
#[derive(Debug, Default)]
struct Totals {
    passed: u64,
    failed: u64,
    ignored: u64,
}

impl Totals {
    fn add(&mut self, line: &str) {
        let Some(rest) = line.trim().strip_prefix("test result:") else {
            return;
        };
        for part in rest.split(['.', ';']) {
            let mut words = part.split_whitespace();
            let (Some(n), Some(what)) = (words.next(), words.next()) else {
                continue;
            };
            let Ok(n) = n.parse::<u64>() else {
                continue;
            };
            match what {
                "passed" => self.passed += n,
                "failed" => self.failed += n,
                "ignored" => self.ignored += n,
                _ => {}
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// helpers

fn is_root() -> bool {
    // `id -u` keeps this crate free of unsafe and of a libc dependency.
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|out| out.status.success() && String::from_utf8_lossy(&out.stdout).trim() == "0")
}

/// The cargo that runs xtask (cargo sets `CARGO`), else `cargo` on `PATH`.
fn cargo() -> OsString {
    std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into())
}

fn workspace_root() -> PathBuf {
    let manifest_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest_dir.parent().unwrap_or(manifest_dir).to_path_buf()
}

/// The target directory, honouring `CARGO_TARGET_DIR` and `build.target-dir`.
fn target_dir(root: &Path) -> Result<PathBuf> {
    let out = Command::new(cargo())
        .current_dir(root)
        .args(["metadata", "--format-version", "1", "--no-deps"])
        .stderr(Stdio::inherit())
        .output()
        .context("run cargo metadata")?;
    if !out.status.success() {
        bail!("cargo metadata failed ({})", out.status);
    }
    let meta: serde_json::Value =
        serde_json::from_slice(&out.stdout).context("parse cargo metadata output")?;
    let dir = meta
        .get("target_directory")
        .and_then(serde_json::Value::as_str)
        .context("cargo metadata has no target_directory")?;
    Ok(PathBuf::from(dir))
}

fn run_checked(cmd: &mut Command) -> Result<()> {
    println!("+ {}", describe(cmd));
    let status = cmd
        .status()
        .with_context(|| format!("start {}", describe(cmd)))?;
    if !status.success() {
        bail!("{} failed ({status})", describe(cmd));
    }
    Ok(())
}

fn describe(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|s| s.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::Totals;

    #[test]
    fn static_and_dynamic_binaries_are_told_apart() {
        // The test binary itself is dynamically linked (glibc).
        let me = std::env::current_exe().unwrap();
        assert!(!super::is_static_elf(&me));
        assert!(!super::is_static_elf(std::path::Path::new("/nonexistent")));
    }

    #[test]
    fn totals_add_up_libtest_summaries() {
        let mut t = Totals::default();
        t.add("test result: ok. 62 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out; finished in 1.99s");
        t.add("test result: FAILED. 9 passed; 1 failed; 2 ignored; 0 measured; 0 filtered out; finished in 15.11s");
        t.add("test something ... ok");
        t.add("running 10 tests");
        assert_eq!((t.passed, t.failed, t.ignored), (71, 1, 2));
    }
}
