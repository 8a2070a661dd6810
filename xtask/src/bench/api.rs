//! Talking to a real `sluice daemon` the way Docker does: HTTP/1.1 POSTs of libnetwork JSON
//! on its plugin socket, and policy YAML on its admin socket. A tiny client on a std
//! `UnixStream` (one connection per call, `Connection: close`), so xtask needs no HTTP stack.

use std::io::{Read as _, Write as _};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use serde_json::{Value, json};

/// One HTTP request; returns the status and body.
pub(crate) fn request(
    socket: &Path,
    method: &str,
    path: &str,
    content_type: &str,
    body: &str,
) -> Result<(u16, String)> {
    let mut s =
        UnixStream::connect(socket).with_context(|| format!("connect to {}", socket.display()))?;
    s.set_read_timeout(Some(Duration::from_secs(600)))?;
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: sluice\r\nContent-Type: {content_type}\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    parse_response(&String::from_utf8_lossy(&raw))
}

/// Status and body of an HTTP/1.1 response (content-length or chunked).
pub(crate) fn parse_response(raw: &str) -> Result<(u16, String)> {
    let (head, body) = raw.split_once("\r\n\r\n").context("no HTTP header end")?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse::<u16>().ok())
        .context("no HTTP status")?;
    let chunked = head.lines().any(|l| {
        l.to_ascii_lowercase()
            .starts_with("transfer-encoding: chunked")
    });
    if !chunked {
        return Ok((status, body.to_owned()));
    }
    let mut out = String::new();
    let mut rest = body;
    while let Some((size, after)) = rest.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).context("bad chunk size")?;
        if n == 0 || after.len() < n {
            break;
        }
        out.push_str(&after[..n]);
        rest = after[n..].trim_start_matches("\r\n");
    }
    Ok((status, out))
}

/// Where a [`Daemon`] keeps things: admin socket, state and log in `run_dir`.
#[derive(Debug, Clone)]
pub(crate) struct DaemonPaths {
    pub(crate) run_dir: PathBuf,
    pub(crate) plugin: PathBuf,
    pub(crate) bpf_dir: PathBuf,
}

/// A `sluice daemon` started by the benchmark inside a namespace, stopped (SIGTERM by PID)
/// when dropped.
#[derive(Debug)]
pub(crate) struct Daemon {
    child: Child,
    pub(crate) plugin: PathBuf,
    pub(crate) admin: PathBuf,
}

impl Daemon {
    /// Starts `sluice daemon` in network namespace `ns`, with its own name, sockets, state and
    /// pin directory under `run_dir`, asking `docker_host` for container names (`none`: no
    /// Docker Engine at all).
    pub(crate) fn start(
        sluice: &Path,
        ns: &str,
        name: &str,
        run_dir: &Path,
        docker_host: &str,
        extra: &[&str],
    ) -> Result<Self> {
        let paths = DaemonPaths {
            run_dir: run_dir.to_path_buf(),
            plugin: run_dir.join(format!("{name}.sock")),
            bpf_dir: super::bpf_root().join(name),
        };
        Self::start_at(sluice, ns, name, &paths, docker_host, extra)
    }

    /// Like [`Daemon::start`], with the plugin socket (e.g. `/run/docker/plugins/<name>.sock`,
    /// where a dockerd finds it), the pin directory and the directory of the rest chosen.
    pub(crate) fn start_at(
        sluice: &Path,
        ns: &str,
        name: &str,
        paths: &DaemonPaths,
        docker_host: &str,
        extra: &[&str],
    ) -> Result<Self> {
        let run_dir = paths.run_dir.as_path();
        let plugin = paths.plugin.clone();
        let admin = run_dir.join(format!("{name}.admin.sock"));
        let state = run_dir.join(format!("{name}.state"));
        let log = std::fs::File::create(run_dir.join(format!("{name}.log")))?;
        let child = Command::new("nsenter")
            .arg(format!("--net=/proc/{ns}/ns/net"))
            .arg(sluice)
            .arg("--admin-socket")
            .arg(&admin)
            .arg("daemon")
            .arg("--plugin-socket")
            .arg(&plugin)
            .arg("--state-dir")
            .arg(&state)
            .arg("--docker-host")
            .arg(docker_host)
            .arg("--bpf-dir")
            .arg(&paths.bpf_dir)
            .arg("--name")
            .arg(name)
            .args(extra)
            // One log line per plugin call with its duration (read by the docker suite).
            .env("SLUICE_LOG_SPAN_TIMES", "1")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("start sluice daemon")?;
        let mut d = Self {
            child,
            plugin,
            admin,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !(d.plugin.exists() && d.admin.exists()) {
            if let Some(status) = d.child.try_wait()? {
                bail!(
                    "sluice daemon {name} exited ({status}); see {}",
                    run_dir.join(format!("{name}.log")).display()
                );
            }
            if Instant::now() > deadline {
                bail!("sluice daemon {name} did not open its sockets within 30 s");
            }
            sleep(Duration::from_millis(50));
        }
        Ok(d)
    }

    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    /// A libnetwork call; fails on a non-200 answer or an `Err` field.
    pub(crate) fn call(&self, method: &str, body: &Value) -> Result<Value> {
        let (status, text) = request(
            &self.plugin,
            "POST",
            &format!("/{method}"),
            "application/json",
            &body.to_string(),
        )?;
        let v: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
        if status != 200 || v["Err"].as_str().is_some_and(|e| !e.is_empty()) {
            bail!("{method}: HTTP {status}: {text}");
        }
        Ok(v)
    }

    /// `sluice policy apply` over the admin socket.
    pub(crate) fn apply_policy(&self, yaml: &str) -> Result<()> {
        let (status, text) = request(
            &self.admin,
            "POST",
            "/v1/policies",
            "application/yaml",
            yaml,
        )?;
        if status != 200 {
            bail!(
                "policy apply: HTTP {status}: {}",
                text.chars().take(300).collect::<String>()
            );
        }
        Ok(())
    }

    /// Creates a network with subnet `pool` (a /N, gateway `.1`) the way Docker calls it.
    pub(crate) fn create_network(&self, id: &str, pool: &str, gateway: &str) -> Result<()> {
        self.call(
            "NetworkDriver.CreateNetwork",
            &json!({
                "NetworkID": id,
                "Options": {"com.docker.network.enable_ipv6": false, "com.docker.network.generic": {}},
                "IPv4Data": [{"AddressSpace": "", "Pool": pool, "Gateway": gateway}],
                "IPv6Data": [],
            }),
        )
        .map(drop)
    }

    /// A network through sluice's IPAM, as dockerd creates one with `--ipam-driver sluice`
    /// (RequestPool, the gateway's RequestAddress, CreateNetwork with `generic` options);
    /// returns the pool ID and the gateway (without prefix).
    pub(crate) fn create_ipam_network(
        &self,
        id: &str,
        subnet: &str,
        generic: &Value,
    ) -> Result<(String, String)> {
        let pool = self.call(
            "IpamDriver.RequestPool",
            &json!({"AddressSpace": "LocalDefault", "Pool": subnet, "SubPool": "", "Options": {}, "V6": false}),
        )?;
        let pool_id = pool["PoolID"].as_str().context("no PoolID")?.to_owned();
        let gateway = self.call(
            "IpamDriver.RequestAddress",
            &json!({"PoolID": pool_id, "Address": "", "Options": {"RequestAddressType": "com.docker.network.gateway"}}),
        )?;
        let gateway = gateway["Address"]
            .as_str()
            .context("no gateway")?
            .to_owned();
        self.call(
            "NetworkDriver.CreateNetwork",
            &json!({
                "NetworkID": id,
                "Options": {"com.docker.network.generic": generic},
                "IPv4Data": [{"AddressSpace": "LocalDefault", "Pool": subnet, "Gateway": gateway, "AuxAddresses": {}}],
                "IPv6Data": [],
            }),
        )?;
        let bare = gateway.split('/').next().unwrap_or_default().to_owned();
        Ok((pool_id, bare))
    }

    /// An endpoint address from sluice's IPAM (with prefix).
    pub(crate) fn request_address(&self, pool: &str) -> Result<String> {
        let v = self.call(
            "IpamDriver.RequestAddress",
            &json!({"PoolID": pool, "Address": "", "Options": null}),
        )?;
        Ok(v["Address"].as_str().context("no Address")?.to_owned())
    }

    /// CreateEndpoint + Join; returns the host-side name of the link Docker would move into
    /// the sandbox, and the MAC the driver chose (if any).
    pub(crate) fn create_and_join(
        &self,
        network: &str,
        endpoint: &str,
        address: &str,
        sandbox: &str,
        labels: &[(&str, &str)],
    ) -> Result<(String, Option<String>)> {
        let options: serde_json::Map<String, Value> = labels
            .iter()
            .map(|(k, v)| (format!("sluice.label.{k}"), Value::from(*v)))
            .collect();
        let created = self.call(
            "NetworkDriver.CreateEndpoint",
            &json!({
                "NetworkID": network, "EndpointID": endpoint,
                "Interface": {"Address": address, "AddressIPv6": "", "MacAddress": ""},
                "Options": options,
            }),
        )?;
        let joined = self.call(
            "NetworkDriver.Join",
            &json!({"NetworkID": network, "EndpointID": endpoint, "SandboxKey": sandbox, "Options": {}}),
        )?;
        let src = joined["InterfaceName"]["SrcName"]
            .as_str()
            .context("Join answered no InterfaceName.SrcName")?
            .to_owned();
        let mac = created["Interface"]["MacAddress"]
            .as_str()
            .filter(|m| !m.is_empty())
            .map(str::to_owned);
        Ok((src, mac))
    }

    /// Resident set size of the daemon, in KiB (`VmRSS` of /proc/<pid>/status).
    pub(crate) fn rss_kib(&self) -> Result<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()))?;
        vm_rss_kib(&status).context("no VmRSS line")
    }

    /// [`smaps_breakdown`] of the daemon, as `heap 12.0 MiB, anon 3.1 MiB, ...`.
    pub(crate) fn rss_breakdown(&self) -> Result<String> {
        let smaps = std::fs::read_to_string(format!("/proc/{}/smaps", self.pid()))?;
        #[expect(clippy::cast_precision_loss, reason = "KiB count far below 2^52")]
        let parts: Vec<String> = smaps_breakdown(&smaps)
            .into_iter()
            .map(|(k, kib)| format!("{k} {:.1} MiB", kib as f64 / 1024.0))
            .collect();
        Ok(parts.join(", "))
    }
}

/// Where the resident memory of a /proc/<pid>/smaps text lies, in KiB per kind of mapping:
/// `heap` (glibc's main arena), `anon` (other arenas, large allocations, stacks of threads),
/// `file` (the binary and libraries), `other` (`[stack]`, `[vdso]`...), sorted by size.
pub(crate) fn smaps_breakdown(smaps: &str) -> Vec<(&'static str, u64)> {
    let mut sums = [("heap", 0), ("anon", 0), ("file", 0), ("other", 0)];
    let mut kind = 3;
    for line in smaps.lines() {
        let mut words = line.split_whitespace();
        let Some(first) = words.next() else { continue };
        if first.contains('-') && first.chars().all(|c| c.is_ascii_hexdigit() || c == '-') {
            // A mapping's header: range perms offset dev inode [path].
            kind = match words.nth(4) {
                None => 1,
                Some("[heap]") => 0,
                Some(p) if p.starts_with('[') => 3,
                Some(_) => 2,
            };
        } else if first == "Rss:" {
            sums[kind].1 += words.next().and_then(|v| v.parse().ok()).unwrap_or(0);
        }
    }
    let mut v = sums.to_vec();
    v.sort_by_key(|k| std::cmp::Reverse(k.1));
    v
}

/// The `VmRSS:` value of a /proc/<pid>/status text, in KiB.
pub(crate) fn vm_rss_kib(status: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

impl Drop for Daemon {
    fn drop(&mut self) {
        // SIGTERM so the daemon shuts down as it does under systemd; SIGKILL if it lingers.
        let _ = Command::new("kill")
            .arg(self.child.id().to_string())
            .status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn response_with_length_and_chunked() {
        let (s, b) = parse_response("HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}").unwrap();
        assert_eq!((s, b.as_str()), (200, "{}"));
        let raw = "HTTP/1.1 400 Bad Request\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n";
        let (s, b) = parse_response(raw).unwrap();
        assert_eq!((s, b.as_str()), (400, "abcde"));
        assert!(parse_response("garbage").is_err());
    }

    #[test]
    fn vm_rss_is_read_in_kib() {
        let status = "Name:\tsluice\nVmPeak:\t  99999 kB\nVmRSS:\t   23456 kB\nThreads:\t4\n";
        assert_eq!(vm_rss_kib(status), Some(23456));
        assert_eq!(vm_rss_kib("Name: x\n"), None);
    }

    #[test]
    fn smaps_rss_is_summed_per_kind_of_mapping() {
        let smaps = "\
55d0c0000000-55d0c0100000 r-xp 00000000 08:01 1234 /usr/bin/sluice
Rss:                 800 kB
55d0c1000000-55d0c2000000 rw-p 00000000 00:00 0 [heap]
Rss:                4000 kB
7f0000000000-7f0004000000 rw-p 00000000 00:00 0
Rss:                3000 kB
7f0004000000-7f0008000000 rw-p 00000000 00:00 0
Rss:                  24 kB
7ffd00000000-7ffd00021000 rw-p 00000000 00:00 0 [stack]
Rss:                  12 kB
";
        assert_eq!(
            smaps_breakdown(smaps),
            vec![("heap", 4000), ("anon", 3024), ("file", 800), ("other", 12)]
        );
    }
}
