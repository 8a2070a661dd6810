//! Builds sluice's eBPF programs (`ebpf/tc`, crate `sluice-ebpf`) for `bpfel-unknown-none`
//! with aya-build and the pinned nightly, and leaves the object at `$OUT_DIR/sluice-ebpf`,
//! where `datapath` embeds it.
//!
//! - `SLUICE_EBPF_OBJ=/path/to/sluice-ebpf`: copy that prebuilt object instead (no nightly, no
//!   bpf-linker needed).
//! - Without the toolchain (`rustup` + `nightly-2026-05-20` with rust-src, and `bpf-linker` on
//!   PATH) the build does not fail: it warns and embeds an empty object, and
//!   `Datapath::load` then returns `DatapathError::NoObject`. `SLUICE_EBPF_REQUIRED=1` turns
//!   that into a build error (for CI and releases).
//! - `AYA_BUILD_SKIP=1` (aya-build's switch) also embeds an empty object.
//!
//! See `ebpf/README.md` for the setup commands.

use std::env;
use std::fs;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use aya_build::{Package, Toolchain};

/// The nightly whose LLVM (22) matches bpf-linker's (see ebpf/README.md).
const TOOLCHAIN: &str = "nightly-2026-05-20";
const OBJECT: &str = "sluice-ebpf";

fn main() -> aya_build::Result<()> {
    for var in ["SLUICE_EBPF_OBJ", "SLUICE_EBPF_REQUIRED", "PATH"] {
        println!("cargo:rerun-if-env-changed={var}");
    }
    let out_dir =
        PathBuf::from(env::var_os("OUT_DIR").ok_or_else(|| anyhow::anyhow!("OUT_DIR not set"))?);
    let dst = out_dir.join(OBJECT);

    if let Some(prebuilt) = env::var_os("SLUICE_EBPF_OBJ") {
        let prebuilt = PathBuf::from(prebuilt);
        println!("cargo:rerun-if-changed={}", prebuilt.display());
        fs::copy(&prebuilt, &dst)
            .map_err(|e| anyhow::anyhow!("SLUICE_EBPF_OBJ={}: {e}", prebuilt.display()))?;
        return Ok(());
    }

    let manifest_dir = PathBuf::from(
        env::var_os("CARGO_MANIFEST_DIR")
            .ok_or_else(|| anyhow::anyhow!("CARGO_MANIFEST_DIR not set"))?,
    );
    let workspace = manifest_dir
        .parent()
        .ok_or_else(|| anyhow::anyhow!("no parent of {}", manifest_dir.display()))?;
    let ebpf_dir = workspace.join("ebpf").join("tc");
    let common_dir = workspace.join("ebpf").join("common");
    println!("cargo:rerun-if-changed={}", common_dir.display());

    if let Some(missing) = missing_prerequisite() {
        if env::var_os("SLUICE_EBPF_REQUIRED").is_some_and(|v| v == "1") {
            return Err(anyhow::anyhow!(
                "cannot build the eBPF programs: {missing} (see ebpf/README.md)"
            ));
        }
        println!(
            "cargo:warning=sluice: {missing}; embedding NO eBPF programs (the datapath will \
             refuse to load). See ebpf/README.md."
        );
        fs::write(&dst, [])?;
        // A path that never exists: cargo then reruns this script on every build, so the
        // programs get built as soon as the toolchain is installed.
        println!(
            "cargo:rerun-if-changed={}",
            out_dir.join("retry-when-toolchain-installed").display()
        );
        return Ok(());
    }

    let root_dir = ebpf_dir
        .to_str()
        .ok_or_else(|| anyhow::anyhow!("non-UTF-8 path {}", ebpf_dir.display()))?;
    aya_build::build_ebpf(
        [Package {
            name: OBJECT,
            root_dir,
            ..Package::default()
        }],
        Toolchain::Custom(TOOLCHAIN),
    )?;
    if !dst.exists() {
        // AYA_BUILD_SKIP=1.
        fs::write(&dst, [])?;
    }
    Ok(())
}

/// What is missing to build the programs, if anything.
fn missing_prerequisite() -> Option<String> {
    if which::which("bpf-linker").is_err() {
        return Some("bpf-linker is not on PATH".into());
    }
    let nightly = Command::new("rustup")
        .args(["run", TOOLCHAIN, "rustc", "--version"])
        .env("RUSTUP_AUTO_INSTALL", "0")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    match nightly {
        Ok(status) if status.success() => None,
        _ => Some(format!("the {TOOLCHAIN} toolchain is not installed")),
    }
}
