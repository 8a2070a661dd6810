//! The Linux capabilities sluice needs, checked once at start so a daemon (or a managed
//! plugin whose `config.json` lost one) stops with a message naming what is missing, instead
//! of starting and failing on the first network or container.
//!
//! The set is the least that works (measured by dropping each one, see
//! `docs/managed-plugin.md`): `CAP_NET_ADMIN` (links, addresses, routes, TCX attachment,
//! iptables), `CAP_BPF` (maps and programs) and `CAP_PERFMON` (the verifier refuses the
//! datapath's pointer arithmetic without it). `CAP_SYS_ADMIN` implies the last two in the
//! kernel, so a fully privileged root passes too.

use std::fmt;

/// One capability sluice needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Needed {
    /// The name as `config.json` and capabilities(7) spell it.
    pub name: &'static str,
    /// Its bit in `CapEff`.
    pub bit: u32,
    /// Capabilities the kernel accepts in its place (`CAP_SYS_ADMIN` for the BPF ones).
    pub or: &'static [u32],
    /// Why sluice needs it.
    pub why: &'static str,
}

const CAP_NET_ADMIN: u32 = 12;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;

/// What sluice needs, in the order `config.json` lists them.
pub const NEEDED: &[Needed] = &[
    Needed {
        name: "CAP_NET_ADMIN",
        bit: CAP_NET_ADMIN,
        or: &[],
        why: "create bridges and veths, set addresses and routes, attach the eBPF programs \
              (TCX) and add the DOCKER-USER rules",
    },
    Needed {
        name: "CAP_BPF",
        bit: CAP_BPF,
        or: &[CAP_SYS_ADMIN],
        why: "create the eBPF maps and load the datapath programs",
    },
    Needed {
        name: "CAP_PERFMON",
        bit: CAP_PERFMON,
        or: &[CAP_SYS_ADMIN],
        why: "have the kernel's verifier accept the datapath programs' pointer arithmetic \
              (without it BPF_PROG_LOAD fails with EACCES)",
    },
];

/// Capabilities that are missing from the effective set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Missing(pub Vec<Needed>);

impl fmt::Display for Missing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<_> = self.0.iter().map(|n| n.name).collect();
        write!(
            f,
            "sluice lacks the Linux capabilit{} {}:",
            if names.len() == 1 { "y" } else { "ies" },
            names.join(", ")
        )?;
        for n in &self.0 {
            write!(f, " {} is needed to {};", n.name, n.why)?;
        }
        write!(
            f,
            " run it as root, or give the managed plugin these capabilities (plugin/config.json \
             lists them; see docs/managed-plugin.md)"
        )
    }
}

impl std::error::Error for Missing {}

/// Checks the effective capabilities of this process against [`NEEDED`].
///
/// # Errors
/// [`Missing`] naming each missing capability and why it is needed; an I/O error text when
/// `/proc/self/status` cannot be read (then nothing is claimed missing).
pub fn check() -> Result<(), Missing> {
    let Ok(status) = std::fs::read_to_string("/proc/self/status") else {
        return Ok(());
    };
    let Some(effective) = cap_eff(&status) else {
        return Ok(());
    };
    check_mask(effective)
}

/// Checks a `CapEff` mask against [`NEEDED`].
///
/// # Errors
/// [`Missing`] with what the mask lacks.
pub fn check_mask(effective: u64) -> Result<(), Missing> {
    let has = |bit: u32| effective & (1u64 << bit) != 0;
    let missing: Vec<Needed> = NEEDED
        .iter()
        .filter(|n| !has(n.bit) && !n.or.iter().copied().any(has))
        .copied()
        .collect();
    if missing.is_empty() {
        Ok(())
    } else {
        Err(Missing(missing))
    }
}

/// The `CapEff:` mask of a `/proc/<pid>/status` text.
#[must_use]
pub fn cap_eff(status: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: u64 = 0x0000_01ff_ffff_ffff;

    #[test]
    fn full_root_passes() {
        assert_eq!(check_mask(ALL), Ok(()));
    }

    #[test]
    fn the_three_capabilities_suffice() {
        let mask = (1 << CAP_NET_ADMIN) | (1 << CAP_BPF) | (1 << CAP_PERFMON);
        assert_eq!(check_mask(mask), Ok(()));
    }

    #[test]
    fn sys_admin_stands_in_for_bpf_and_perfmon_but_not_net_admin() {
        assert_eq!(check_mask(1 << CAP_SYS_ADMIN | 1 << CAP_NET_ADMIN), Ok(()));
        let err = check_mask(1 << CAP_SYS_ADMIN).unwrap_err();
        assert_eq!(err.0.len(), 1);
        assert_eq!(err.0[0].name, "CAP_NET_ADMIN");
    }

    #[test]
    fn each_missing_capability_is_named_with_its_reason() {
        for n in NEEDED {
            let mask = ALL & !(1 << n.bit) & !(1 << CAP_SYS_ADMIN);
            let err = check_mask(mask).unwrap_err();
            assert_eq!(err.0, vec![*n]);
            let text = err.to_string();
            assert!(text.contains(n.name) && text.contains(n.why), "{text}");
        }
        let text = check_mask(0).unwrap_err().to_string();
        assert!(
            text.contains("capabilities CAP_NET_ADMIN, CAP_BPF, CAP_PERFMON"),
            "{text}"
        );
    }

    #[test]
    fn cap_eff_is_read_from_proc_status() {
        let status = "Name:\tsluice\nCapInh:\t0000000000000000\nCapEff:\t000000c000001000\n";
        assert_eq!(
            cap_eff(status),
            Some((1 << CAP_NET_ADMIN) | (1 << CAP_BPF) | (1 << CAP_PERFMON))
        );
        assert_eq!(cap_eff("Name: x\n"), None);
    }
}
