//! `cargo xtask plugin`: builds the managed (v2) plugin bundle and creates it on a Docker
//! Engine (`docker plugin create NAME:TAG DIR`).
//!
//! The bundle is `DIR/config.json` (from `plugin/config.json`) and `DIR/rootfs/`: the static
//! (musl) `sluice` binary at `/sluice`, plus the host tools sluice runs (`iptables`,
//! `ip6tables`; `nft` when the host has it) with their shared libraries and the xtables
//! extensions, so the rootfs needs no distribution image.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context as _, Result, bail};

use crate::{cargo, find_tool, run_checked, target_dir, workspace_root};

/// The Rust target of the plugin's static binary.
pub(crate) const MUSL_TARGET: &str = "x86_64-unknown-linux-musl";
/// Tools the rootfs must carry (the DOCKER-USER rules, `driver/src/firewall.rs`).
const REQUIRED_TOOLS: &[&str] = &["iptables", "ip6tables"];
/// Tools carried when the host has them (nftables rules).
const OPTIONAL_TOOLS: &[&str] = &["nft"];
/// Where Debian keeps the iptables extensions that iptables loads at run time.
const XTABLES_DIR: &str = "/usr/lib/x86_64-linux-gnu/xtables";

/// Options of `cargo xtask plugin`.
#[derive(Debug, clap::Args)]
pub(crate) struct PluginArgs {
    /// Plugin reference to create (`NAME:TAG`); default `sluice/sluice:<crate version>`.
    #[arg(long)]
    pub(crate) name: Option<String>,
    /// Docker Engine to create the plugin on (also `DOCKER_HOST`).
    #[arg(
        long,
        env = "DOCKER_HOST",
        default_value = "unix:///var/run/docker.sock"
    )]
    pub(crate) docker_host: String,
    /// Bundle directory; default `target/plugin/bundle`. Its `rootfs/` is replaced.
    #[arg(long)]
    pub(crate) out: Option<PathBuf>,
    /// Build the debug profile (quicker to build; the tests use it) instead of release.
    #[arg(long)]
    pub(crate) debug: bool,
    /// Only build and lay out the bundle; do not run `docker plugin create`.
    #[arg(long)]
    pub(crate) no_create: bool,
}

/// Runs `cargo xtask plugin`.
///
/// # Errors
/// When the build, the layout or `docker plugin create` fails.
pub(crate) fn plugin(args: &PluginArgs) -> Result<()> {
    let root = workspace_root();
    let name = args.name.clone().unwrap_or_else(default_name);
    let dir = match &args.out {
        Some(dir) => dir.clone(),
        None => target_dir(&root)?.join("plugin").join("bundle"),
    };
    let binary = build(&root, args.debug)?;
    lay_out(&root, &binary, &dir, &name)?;
    println!("plugin: bundle laid out in {}", dir.display());
    if args.no_create {
        return Ok(());
    }
    let docker = find_tool("docker").context("docker CLI not found (cargo xtask setup)")?;
    run_checked(
        Command::new(docker)
            .args(["-H", &args.docker_host, "plugin", "create", &name])
            .arg(&dir),
    )?;
    println!(
        "plugin: created {name}; enable it with `docker plugin enable {name}` \
         (docs/managed-plugin.md)"
    );
    Ok(())
}

/// `sluice/sluice:<version of the workspace>`.
fn default_name() -> String {
    format!("sluice/sluice:{}", env!("CARGO_PKG_VERSION"))
}

/// Adds the musl target to the active toolchain (idempotent: rustup does nothing when present).
///
/// # Errors
/// When rustup fails.
pub(crate) fn install_musl_target() -> Result<()> {
    let installed = Command::new("rustup")
        .args(["target", "list", "--installed"])
        .output()
        .context("run rustup (needed for the musl target of the managed plugin)")?;
    if String::from_utf8_lossy(&installed.stdout)
        .lines()
        .any(|l| l.trim() == MUSL_TARGET)
    {
        println!("setup: Rust target {MUSL_TARGET} present");
        return Ok(());
    }
    run_checked(Command::new("rustup").args(["target", "add", MUSL_TARGET]))
}

/// Builds the static `sluice` binary; returns its path.
///
/// # Errors
/// When the build fails or the binary is not static.
pub(crate) fn build(root: &Path, debug: bool) -> Result<PathBuf> {
    install_musl_target()?;
    let mut cmd = Command::new(cargo());
    cmd.current_dir(root)
        .args(["build", "-p", "sluice-plugin", "--target", MUSL_TARGET])
        .env("SLUICE_EBPF_REQUIRED", "1");
    if !debug {
        cmd.arg("--release");
    }
    run_checked(&mut cmd)?;
    let binary = target_dir(root)?
        .join(MUSL_TARGET)
        .join(if debug { "debug" } else { "release" })
        .join("sluice");
    if !crate::is_static_elf(&binary) {
        bail!("{} is not a static binary", binary.display());
    }
    Ok(binary)
}

/// Writes `dir/config.json` and `dir/rootfs/` (replacing an earlier rootfs).
fn lay_out(root: &Path, binary: &Path, dir: &Path, name: &str) -> Result<()> {
    let rootfs = dir.join("rootfs");
    if rootfs.exists() {
        std::fs::remove_dir_all(&rootfs)
            .with_context(|| format!("remove the old {}", rootfs.display()))?;
    }
    for sub in [
        "etc", "tmp", "run", "proc", "sys", "dev", "usr/sbin", "var/lib",
    ] {
        std::fs::create_dir_all(rootfs.join(sub))
            .with_context(|| format!("create {}", rootfs.join(sub).display()))?;
    }
    write_config(root, dir, name)?;
    std::fs::write(
        rootfs.join("etc/sluice-plugin"),
        format!("{name}\nsluice {}\n", env!("CARGO_PKG_VERSION")),
    )?;
    let target = rootfs.join("sluice");
    std::fs::copy(binary, &target).with_context(|| format!("copy {}", binary.display()))?;
    // Debug info is most of a debug binary's size; the plugin store keeps a copy per tag.
    if let Some(strip) = find_tool("strip") {
        run_checked(Command::new(strip).arg("--strip-debug").arg(&target))?;
    }

    let mut libraries = BTreeSet::new();
    for tool in REQUIRED_TOOLS {
        let path = find_tool(tool).with_context(|| {
            format!("{tool} not found: the plugin rootfs carries it (cargo xtask setup)")
        })?;
        copy_tool(&rootfs, tool, &path, &mut libraries)?;
    }
    for tool in OPTIONAL_TOOLS {
        match find_tool(tool) {
            Some(path) => copy_tool(&rootfs, tool, &path, &mut libraries)?,
            None => println!("plugin: {tool} not on this host: not in the rootfs"),
        }
    }
    let xtables = Path::new(XTABLES_DIR);
    if xtables.is_dir() {
        let into = rootfs.join(XTABLES_DIR.trim_start_matches('/'));
        std::fs::create_dir_all(&into)?;
        for entry in std::fs::read_dir(xtables)? {
            let path = entry?.path();
            if path.extension().is_some_and(|e| e == "so") {
                let file = path.file_name().context("xtables entry without a name")?;
                std::fs::copy(&path, into.join(file))
                    .with_context(|| format!("copy {}", path.display()))?;
                libraries.extend(shared_libraries(&path)?);
            }
        }
    }
    for lib in &libraries {
        copy_to_rootfs(&rootfs, lib)?;
    }
    Ok(())
}

/// `plugin/config.json` with the name the bundle was built as in its description: `docker
/// plugin inspect` then tells which build runs, and two tags of one build differ in content
/// (dockerd 20.10 refuses to create a plugin whose content another plugin already has:
/// "content sha256:…: already exists").
fn write_config(root: &Path, dir: &Path, name: &str) -> Result<()> {
    let text = std::fs::read_to_string(root.join("plugin/config.json"))
        .context("read plugin/config.json")?;
    let mut config: serde_json::Value =
        serde_json::from_str(&text).context("plugin/config.json is not JSON")?;
    let description = config["description"]
        .as_str()
        .unwrap_or("sluice")
        .to_owned();
    config["description"] = format!(
        "{description} (sluice {}, built as {name})",
        env!("CARGO_PKG_VERSION")
    )
    .into();
    std::fs::create_dir_all(dir)?;
    std::fs::write(
        dir.join("config.json"),
        serde_json::to_string_pretty(&config)?,
    )
    .context("write config.json")
}

/// Copies `path` to `/usr/sbin/` of the rootfs, under its real name with `tool` as a symlink
/// (iptables and ip6tables are one multi-call binary that looks at its name).
fn copy_tool(
    rootfs: &Path,
    tool: &str,
    path: &Path,
    libraries: &mut BTreeSet<PathBuf>,
) -> Result<()> {
    let real =
        std::fs::canonicalize(path).with_context(|| format!("resolve {}", path.display()))?;
    let real_name = real.file_name().context("tool without a file name")?;
    let sbin = rootfs.join("usr/sbin");
    if !sbin.join(real_name).exists() {
        std::fs::copy(&real, sbin.join(real_name))
            .with_context(|| format!("copy {}", real.display()))?;
    }
    if real_name != tool {
        std::os::unix::fs::symlink(real_name, sbin.join(tool))
            .with_context(|| format!("symlink {tool}"))?;
    }
    libraries.extend(shared_libraries(&real)?);
    Ok(())
}

/// Copies a host file to the same path inside the rootfs (its content, not a symlink).
fn copy_to_rootfs(rootfs: &Path, file: &Path) -> Result<()> {
    let to = rootfs.join(file.strip_prefix("/").unwrap_or(file));
    if let Some(parent) = to.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::copy(file, &to).with_context(|| format!("copy {}", file.display()))?;
    Ok(())
}

/// The shared libraries (and the loader) `ldd` lists for `binary`; none for a static one.
fn shared_libraries(binary: &Path) -> Result<Vec<PathBuf>> {
    let out = Command::new("ldd")
        .arg(binary)
        .output()
        .with_context(|| format!("run ldd {}", binary.display()))?;
    let text = String::from_utf8_lossy(&out.stdout);
    // `\tlibx.so.1 => /lib/x/libx.so.1 (0x…)` or `\t/lib64/ld-linux-x86-64.so.2 (0x…)`.
    Ok(text
        .lines()
        .filter_map(|l| {
            let l = l.trim();
            let path = l.split_once("=>").map_or(l, |(_, p)| p.trim());
            let path = path.split_whitespace().next()?;
            path.starts_with('/').then(|| PathBuf::from(path))
        })
        .collect())
}
