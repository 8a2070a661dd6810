// SPDX-License-Identifier: GPL-2.0 OR MIT
//! Rebuild the programs when the linker changes: rustc's BPF target links with `bpf-linker`,
//! which cargo does not track (the aya template does the same).

fn main() {
    match which::which("bpf-linker") {
        Ok(path) => println!("cargo:rerun-if-changed={}", path.display()),
        // Host builds (the stub) need no linker; the BPF build then fails with rustc's own
        // "linker `bpf-linker` not found".
        Err(_) => println!("cargo:rerun-if-env-changed=PATH"),
    }
}
