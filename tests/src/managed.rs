//! sluice as a managed (v2) Docker plugin on a private dockerd ([`Env::try_new_dockerd_only`]):
//! the bundle built from this checkout with `cargo xtask plugin`, created, configured for the
//! test environment (state dir, engine socket, pool, name) and enabled.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use anyhow::{Context as _, Result, bail};

use crate::docker::{Env, tail};

/// How long `cargo xtask plugin` may take (the static binary is normally built already by
/// `cargo xtask test`; run alone, the test builds it).
const BUILD_TIMEOUT: Duration = Duration::from_secs(1200);

/// Where the admin sockets live (the plugin's `admin` mount source).
const ADMIN_DIR: &str = "/run/sluice";

/// The workspace root.
#[must_use]
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map_or_else(|| PathBuf::from("."), Path::to_path_buf)
}

/// Runs `cargo xtask plugin --debug ARGS…` in the workspace (as a user would, from the
/// checkout).
///
/// # Errors
/// When it fails or times out: with its output.
pub fn cargo_xtask_plugin(args: &[&str]) -> Result<String> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(workspace_root())
        .args(["run", "--quiet", "-p", "xtask", "--", "plugin", "--debug"])
        .args(args);
    let out = crate::docker::run_with_timeout(&mut cmd, BUILD_TIMEOUT)
        .with_context(|| format!("cargo xtask plugin {}", args.join(" ")))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if !out.status.success() {
        bail!(
            "cargo xtask plugin {} failed ({}):\n{}",
            args.join(" "),
            out.status,
            tail(&text, 40)
        );
    }
    Ok(text)
}

/// A managed sluice plugin on an [`Env`]'s dockerd.
#[derive(Debug)]
pub struct Plugin<'a> {
    env: &'a Env,
    /// `NAME:TAG`.
    pub name: String,
    /// Default IPv4 range (`SLUICE_DEFAULT_ADDRESS_POOL`).
    pub pool: String,
}

impl<'a> Plugin<'a> {
    /// Builds the bundle with `cargo xtask plugin --name NAME --docker-host <env> --out
    /// <env dir>/bundle-<tag>` (which runs `docker plugin create`).
    ///
    /// # Panics
    /// When the build or the create fails.
    pub fn create(env: &'a Env, name: &str, pool: &str) -> Plugin<'a> {
        let out = bundle_dir(env, name);
        if let Err(e) = cargo_xtask_plugin(&[
            "--name",
            name,
            "--docker-host",
            env.docker_host(),
            "--out",
            &out.to_string_lossy(),
        ]) {
            panic!("{e:#}\n{}", env.logs_tail());
        }
        Plugin {
            env,
            name: name.to_owned(),
            pool: pool.to_owned(),
        }
    }

    /// The plugin as created from an existing bundle directory (`docker plugin create NAME
    /// DIR`).
    pub fn create_from(env: &'a Env, name: &str, bundle: &Path, pool: &str) -> Plugin<'a> {
        env.docker_ok(["plugin", "create", name, &bundle.to_string_lossy()]);
        Plugin {
            env,
            name: name.to_owned(),
            pool: pool.to_owned(),
        }
    }

    /// `docker plugin set` of what the test environment needs, plus `extra` (`KEY=VALUE`).
    pub fn configure(&self, extra: &[&str]) {
        let state = self.env.dir().join("plugin-state");
        for dir in [state.as_path(), Path::new(ADMIN_DIR)] {
            std::fs::create_dir_all(dir)
                .unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));
        }
        let socket = self
            .env
            .docker_host()
            .strip_prefix("unix://")
            .unwrap_or_else(|| panic!("DOCKER_HOST is not unix://"))
            .to_owned();
        let mut args = vec![
            "plugin".to_owned(),
            "set".to_owned(),
            self.name.clone(),
            format!("state.source={}", state.display()),
            format!("admin.source={ADMIN_DIR}"),
            format!("docker-socket.source={socket}"),
            format!("SLUICE_NAME={}", self.env.driver()),
            "SLUICE_LOG_LEVEL=debug".to_owned(),
            format!("SLUICE_DEFAULT_ADDRESS_POOL={}", self.pool),
        ];
        args.extend(extra.iter().map(|s| (*s).to_owned()));
        self.env.docker_ok(args);
    }

    /// `docker plugin enable`.
    pub fn enable(&self) {
        self.env.docker_ok(["plugin", "enable", &self.name]);
    }

    /// `docker plugin inspect -f FORMAT`.
    pub fn inspect(&self, format: &str) -> String {
        self.env
            .docker_ok(["plugin", "inspect", "-f", format, &self.name])
    }

    /// `docker network create -d NAME --ipam-driver NAME EXTRA… NET`.
    pub fn create_network(&self, net: &str, extra: &[&str]) -> String {
        let mut args = vec![
            "network",
            "create",
            "-d",
            &self.name,
            "--ipam-driver",
            &self.name,
        ];
        args.extend_from_slice(extra);
        args.push(net);
        self.env.docker_ok(args)
    }
}

/// `<env dir>/bundle-<tag>`.
#[must_use]
pub fn bundle_dir(env: &Env, name: &str) -> PathBuf {
    let tag = name.rsplit(':').next().unwrap_or("latest");
    env.dir().join(format!("bundle-{tag}"))
}

/// Copies a bundle with one capability removed from its `config.json` and a marker file in
/// its rootfs (dockerd 20.10 refuses to create a plugin whose rootfs content another plugin
/// already has). Returns the new bundle's directory.
///
/// # Errors
/// When copying or editing fails.
pub fn bundle_without(bundle: &Path, capability: &str, into: &Path) -> Result<()> {
    let status = Command::new("cp")
        .arg("-a")
        .arg(bundle)
        .arg(into)
        .status()
        .context("cp -a")?;
    if !status.success() {
        bail!("cp -a {} {} failed", bundle.display(), into.display());
    }
    let config_path = into.join("config.json");
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&config_path).context("read config.json")?)?;
    let caps = config["linux"]["capabilities"]
        .as_array_mut()
        .context("config.json has no linux.capabilities")?;
    let before = caps.len();
    caps.retain(|c| c.as_str() != Some(capability));
    if caps.len() == before {
        bail!("config.json does not grant {capability}");
    }
    std::fs::write(&config_path, serde_json::to_vec_pretty(&config)?)?;
    std::fs::write(into.join("rootfs/etc/sluice-variant"), capability)?;
    Ok(())
}

/// The capabilities `config.json` of the checkout grants.
///
/// # Panics
/// When plugin/config.json cannot be read.
#[must_use]
pub fn granted_capabilities() -> Vec<String> {
    let text = std::fs::read_to_string(workspace_root().join("plugin/config.json"))
        .unwrap_or_else(|e| panic!("read plugin/config.json: {e}"));
    let config: serde_json::Value = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("plugin/config.json is not JSON: {e}"));
    config["linux"]["capabilities"]
        .as_array()
        .unwrap_or_else(|| panic!("plugin/config.json has no linux.capabilities"))
        .iter()
        .filter_map(|c| c.as_str().map(str::to_owned))
        .collect()
}

/// Output of a command as one string (stdout then stderr).
#[must_use]
pub fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}
