// SPDX-License-Identifier: GPL-2.0 OR MIT
//! Intentionally empty: the programs are the `sluice-ebpf` binary (`src/main.rs`). This target
//! exists so that `sluice-driver` can build-depend on the package for rebuild tracking.

#![no_std]
