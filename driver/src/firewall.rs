//! The host-firewall side of bridge mode: `ACCEPT` rules per sluice bridge in Docker's
//! `DOCKER-USER` chain, for `iptables` and `ip6tables` (traffic within the bridge; for
//! networks with a way out, also outbound, replies and published ports). Owns nothing else in the firewall:
//! it never flushes, reorders or deletes chains, and removes only its own exact rule.
//!
//! Why: dockerd (with iptables on) sets the `FORWARD` policy to `DROP`, and with
//! `br_netfilter` (`net.bridge.bridge-nf-call-iptables=1`) frames *bridged* between two ports
//! of a sluice bridge traverse `FORWARD` too, so container-to-container traffic would be
//! dropped. `DOCKER-USER` is the chain Docker leaves to users (`FORWARD` jumps there first,
//! dockerd never flushes it), so the rule survives dockerd restarts.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tracing::{debug, info};

use crate::kernel::KernelError;

/// The chain Docker reserves for user rules.
pub const CHAIN: &str = "DOCKER-USER";

/// The tools sluice drives, in order.
const TOOLS: [&str; 2] = ["iptables", "ip6tables"];

/// Where to look for the tools besides `$PATH` (daemons often run with a PATH without sbin).
const FALLBACK_DIRS: [&str; 4] = ["/usr/sbin", "/sbin", "/usr/bin", "/bin"];

/// Upper bound for one iptables invocation (`-w` waits for the xtables lock).
const COMMAND_TIMEOUT: Duration = Duration::from_secs(60);

/// Upper bound on deleting duplicates of our rule, so a tool that claims success without
/// removing anything cannot loop us forever.
const MAX_DELETES: usize = 64;

/// Adds and removes the per-bridge `ACCEPT` rules in `DOCKER-USER` (see the module docs).
///
/// Commands run in the network namespace of the thread that spawns them.
#[derive(Debug, Clone)]
pub struct Firewall {
    tools: Vec<PathBuf>,
}

impl Default for Firewall {
    fn default() -> Self {
        Self::new()
    }
}

/// Outcome of one command.
struct Run {
    code: Option<i32>,
    stderr: String,
}

impl Run {
    fn success(&self) -> bool {
        self.code == Some(0)
    }
}

pub(crate) fn find_tool(name: &str) -> Option<PathBuf> {
    let path_dirs = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default();
    path_dirs
        .into_iter()
        .chain(FALLBACK_DIRS.iter().map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|candidate| is_executable(candidate))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// The `DOCKER-USER` rules of a bridge: traffic between its ports always; for a network
/// with a way out (not `--internal`) also what its containers send out, and what comes back
/// or was DNATed to them (published ports), as Docker's own `FORWARD` rules do for its
/// bridges.
fn rules(bridge: &str, outbound: bool) -> Vec<Vec<&str>> {
    let mut rules = vec![vec!["-i", bridge, "-o", bridge, "-j", "ACCEPT"]];
    if outbound {
        rules.push(vec!["-i", bridge, "!", "-o", bridge, "-j", "ACCEPT"]);
        rules.push(vec![
            "-o",
            bridge,
            "-m",
            "conntrack",
            "--ctstate",
            "RELATED,ESTABLISHED,DNAT",
            "-j",
            "ACCEPT",
        ]);
    }
    rules
}

impl Firewall {
    /// Finds `iptables` and `ip6tables` (each optional) in `$PATH` and the usual sbin
    /// directories. With neither, the firewall methods do nothing.
    #[must_use]
    pub fn new() -> Self {
        let tools: Vec<PathBuf> = TOOLS.iter().filter_map(|t| find_tool(t)).collect();
        if tools.is_empty() {
            debug!("no iptables/ip6tables found: bridge firewall rules are skipped");
        }
        Self { tools }
    }

    /// A firewall driving exactly these tools (paths to iptables-compatible binaries).
    #[must_use]
    pub fn with_tools(tools: Vec<PathBuf>) -> Self {
        Self { tools }
    }

    /// The tools this firewall runs.
    #[must_use]
    pub fn tools(&self) -> &[PathBuf] {
        &self.tools
    }

    /// Lets the traffic of `bridge` through `FORWARD` ([`rules`]; with `outbound` also what
    /// leaves the network and comes back):
    /// `iptables -w -N DOCKER-USER` (if missing) and
    /// `iptables -w -I DOCKER-USER 1 -i BRIDGE -o BRIDGE -j ACCEPT` (each rule, if not already
    /// there), likewise with `ip6tables`. Idempotent.
    ///
    /// # Errors
    /// [`KernelError::Os`] with the tool's stderr when a command fails.
    pub async fn allow_bridge(&self, bridge: &str, outbound: bool) -> Result<(), KernelError> {
        if self.tools.is_empty() {
            debug!(bridge, "no iptables: not adding DOCKER-USER rules");
        }
        for tool in &self.tools {
            self.ensure_chain(tool).await?;
            for rule in rules(bridge, outbound) {
                if self.rule_present(tool, &rule).await? {
                    debug!(tool = %tool.display(), bridge, "DOCKER-USER rule already present");
                    continue;
                }
                let mut args = vec!["-w", "-t", "filter", "-I", CHAIN, "1"];
                args.extend(&rule);
                let run = self.run(tool, &args).await?;
                if !run.success() {
                    return Err(failure(tool, &args, &run));
                }
                info!("{} {}", tool.display(), args.join(" "));
            }
        }
        Ok(())
    }

    /// Removes every copy of every rule [`Firewall::allow_bridge`] may have added for
    /// `bridge`, for both tools; a missing rule or chain is fine. Touches nothing else.
    /// (`iptables -w -D DOCKER-USER -i BRIDGE -o BRIDGE -j ACCEPT` until it is gone, etc.)
    ///
    /// # Errors
    /// [`KernelError::Os`] with the tool's stderr when a command fails.
    pub async fn remove_bridge(&self, bridge: &str) -> Result<(), KernelError> {
        for tool in &self.tools {
            for rule in rules(bridge, true) {
                let mut deleted = 0;
                while self.rule_present(tool, &rule).await? {
                    if deleted >= MAX_DELETES {
                        return Err(KernelError::Os {
                            op: format!("{} -D {CHAIN} {}", tool.display(), rule.join(" ")),
                            message: format!("rule still present after {MAX_DELETES} deletions"),
                        });
                    }
                    let mut args = vec!["-w", "-t", "filter", "-D", CHAIN];
                    args.extend(&rule);
                    let run = self.run(tool, &args).await?;
                    if !run.success() {
                        return Err(failure(tool, &args, &run));
                    }
                    info!("{} {}", tool.display(), args.join(" "));
                    deleted += 1;
                }
            }
        }
        Ok(())
    }

    /// `-C`: exit 0 means present; exit 1 means absent (also when the chain is missing:
    /// "Bad rule (does a matching rule exist in that chain?)"); anything else is an error.
    async fn rule_present(&self, tool: &Path, rule: &[&str]) -> Result<bool, KernelError> {
        let mut args = vec!["-w", "-t", "filter", "-C", CHAIN];
        args.extend(rule);
        let run = self.run(tool, &args).await?;
        match run.code {
            Some(0) => Ok(true),
            Some(1) => Ok(false),
            _ => Err(failure(tool, &args, &run)),
        }
    }

    async fn chain_exists(&self, tool: &Path) -> Result<bool, KernelError> {
        // iptables-nft 1.8.9 answers a missing chain with exit 1 and "chain `DOCKER-USER'
        // in table `filter' is incompatible, use 'nft' tool."; any exit 1 means "no".
        let args = ["-w", "-t", "filter", "-S", CHAIN];
        let run = self.run(tool, &args).await?;
        match run.code {
            Some(0) => Ok(true),
            Some(1) => Ok(false),
            _ => Err(failure(tool, &args, &run)),
        }
    }

    /// Creates `DOCKER-USER` if missing. dockerd adopts an existing chain and adds its
    /// `FORWARD -j DOCKER-USER` jump when it starts.
    async fn ensure_chain(&self, tool: &Path) -> Result<(), KernelError> {
        if self.chain_exists(tool).await? {
            return Ok(());
        }
        let args = ["-w", "-t", "filter", "-N", CHAIN];
        let run = self.run(tool, &args).await?;
        if run.success() {
            info!("{} {}", tool.display(), args.join(" "));
            return Ok(());
        }
        // Lost a race with dockerd or another call: fine if the chain is there now.
        if self.chain_exists(tool).await? {
            return Ok(());
        }
        Err(failure(tool, &args, &run))
    }

    async fn run(&self, tool: &Path, args: &[&str]) -> Result<Run, KernelError> {
        let op = || format!("{} {}", tool.display(), args.join(" "));
        // tokio spawns the child synchronously on the calling thread, so it inherits that
        // thread's network namespace.
        let child = tokio::process::Command::new(tool)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .output();
        let output = tokio::time::timeout(COMMAND_TIMEOUT, child)
            .await
            .map_err(|_| KernelError::Os {
                op: op(),
                message: format!("timed out after {}s", COMMAND_TIMEOUT.as_secs()),
            })?
            .map_err(|e| KernelError::Os {
                op: op(),
                message: e.to_string(),
            })?;
        Ok(Run {
            code: output.status.code(),
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        })
    }
}

fn failure(tool: &Path, args: &[&str], run: &Run) -> KernelError {
    KernelError::Os {
        op: format!("{} {}", tool.display(), args.join(" ")),
        message: match run.code {
            Some(code) => format!("exit status {code}: {}", run.stderr),
            None => format!("killed by a signal: {}", run.stderr),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn without_tools_everything_is_a_no_op() {
        let fw = Firewall::with_tools(Vec::new());
        fw.allow_bridge("slbrtest", true).await.unwrap();
        fw.remove_bridge("slbrtest").await.unwrap();
    }

    #[tokio::test]
    async fn a_failing_tool_reports_command_and_stderr() {
        // `false` exits 1 for everything: -S says "no chain", -N fails, -S again "no".
        let Some(tool) = find_tool("false") else {
            return;
        };
        let fw = Firewall::with_tools(vec![tool]);
        let err = fw.allow_bridge("slbrtest", false).await.unwrap_err();
        let text = err.to_string();
        assert!(text.contains("-N DOCKER-USER"), "{text}");
        assert!(text.contains("exit status 1"), "{text}");
        // For removal, exit 1 from -C means "absent", so it succeeds.
        fw.remove_bridge("slbrtest").await.unwrap();
    }

    #[test]
    fn rules_match_traffic_within_and_out_of_one_bridge() {
        assert_eq!(
            rules("slbr1", false),
            vec![vec!["-i", "slbr1", "-o", "slbr1", "-j", "ACCEPT"]]
        );
        let out = rules("slbr1", true);
        assert_eq!(out.len(), 3);
        assert_eq!(out[1], ["-i", "slbr1", "!", "-o", "slbr1", "-j", "ACCEPT"]);
        assert!(out[2].contains(&"RELATED,ESTABLISHED,DNAT"));
        assert!(out.iter().all(|r| r.contains(&"slbr1")));
    }
}
