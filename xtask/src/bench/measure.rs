//! The traffic tools: iperf3 (UDP 64 B packets per second, TCP throughput) and sockperf
//! (TCP ping-pong: transactions per second and p99 latency), run inside the namespaces of a
//! topology with the client pinned to CPU 0 and the server to CPU 1.

use std::net::Ipv4Addr;
use std::process::{Child, Command, Stdio};
use std::thread::sleep;
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use serde::Serialize;

/// The metrics, in the order they run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Metric {
    /// UDP 64-byte packets received per second (primary).
    UdpPps,
    /// TCP request/response transactions per second (sockperf ping-pong, 64 B).
    TcpRr,
    /// p99 one-way latency of the ping-pong, in microseconds (lower is better).
    TcpRrP99Us,
    /// TCP stream throughput, Gbit/s.
    TcpGbps,
}

impl Metric {
    pub(crate) const ALL: [Self; 4] = [Self::UdpPps, Self::TcpRr, Self::TcpRrP99Us, Self::TcpGbps];

    pub(crate) fn label(self) -> &'static str {
        match self {
            Self::UdpPps => "UDP 64 B kpps",
            Self::TcpRr => "TCP_RR k tx/s",
            Self::TcpRrP99Us => "TCP_RR p99 µs",
            Self::TcpGbps => "TCP Gbit/s",
        }
    }

    /// Scale from the stored unit to the one shown in tables.
    pub(crate) fn display_scale(self) -> f64 {
        match self {
            Self::UdpPps | Self::TcpRr => 1e-3,
            Self::TcpRrP99Us | Self::TcpGbps => 1.0,
        }
    }

    /// Whether a larger value is better (latency: smaller is better).
    pub(crate) fn higher_is_better(self) -> bool {
        !matches!(self, Self::TcpRrP99Us)
    }
}

/// A command run inside the network namespace held by process `ns` (`nsenter`, which unlike
/// `ip netns exec` leaves /sys and bpffs as they are), pinned to `cpu`.
pub(crate) fn in_ns(ns: &str, cpu: Option<u8>, program: &str) -> Command {
    let mut cmd = Command::new("nsenter");
    cmd.arg(format!("--net=/proc/{ns}/ns/net"));
    if let Some(cpu) = cpu {
        cmd.args(["taskset", "-c", &cpu.to_string()]);
    }
    cmd.arg(program);
    cmd
}

/// Longest a client may run (samples are at most a few seconds).
const CLIENT_TIMEOUT: &str = "30";

/// A server process that is killed (by its PID) when dropped.
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn_server(mut cmd: Command) -> Result<Server> {
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("start the benchmark server")?;
    // iperf3 and sockperf bind within a few ms; the client retries a refused connection once.
    sleep(Duration::from_millis(300));
    Ok(Server(child))
}

fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("run {cmd:?}"))?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}{}",
            String::from_utf8_lossy(&out.stderr).trim(),
            stdout.chars().take(400).collect::<String>()
        );
    }
    Ok(stdout)
}

/// One measurement of every metric between `client` and `server` (`server_ip` lives in
/// `server`). A metric whose tool failed is `None` (reported, not hidden).
pub(crate) fn measure(
    client: &str,
    server: &str,
    server_ip: Ipv4Addr,
    seconds: u32,
) -> Vec<(Metric, Option<f64>, Option<String>)> {
    let mut out = Vec::new();
    let ip = server_ip.to_string();
    let secs = seconds.to_string();
    let mut record = |m: Metric, r: Result<f64>| match r {
        Ok(v) => out.push((m, Some(v), None)),
        Err(e) => out.push((m, None, Some(format!("{e:#}")))),
    };
    record(
        Metric::UdpPps,
        iperf3(
            client,
            server,
            &ip,
            &["-u", "-l", "64", "-b", "0", "-t", &secs],
        )
        .and_then(|j| udp_pps(&j)),
    );
    match sockperf_pp(client, server, &ip, &secs) {
        Ok((tps, p99)) => {
            record(Metric::TcpRr, Ok(tps));
            record(Metric::TcpRrP99Us, Ok(p99));
        }
        Err(e) => {
            let msg = format!("{e:#}");
            record(Metric::TcpRr, Err(anyhow::anyhow!("{msg}")));
            record(Metric::TcpRrP99Us, Err(anyhow::anyhow!("{msg}")));
        }
    }
    record(
        Metric::TcpGbps,
        iperf3(client, server, &ip, &["-t", &secs]).and_then(|j| tcp_gbps(&j)),
    );
    out
}

fn iperf3(client: &str, server: &str, ip: &str, args: &[&str]) -> Result<serde_json::Value> {
    let _srv = spawn_server({
        let mut c = in_ns(server, Some(1), "iperf3");
        c.args(["-s", "-1", "-p", "5201"]);
        c
    })?;
    // A client that gets no answer (traffic dropped) must not hang the run.
    let mut cmd = in_ns(client, Some(0), "timeout");
    cmd.args([CLIENT_TIMEOUT, "iperf3", "-c", ip, "-p", "5201", "-J"])
        .args(args);
    let text = output(&mut cmd)?;
    serde_json::from_str(&text).context("parse iperf3 -J output")
}

/// Packets per second the receiver got, from `iperf3 -u -J` client output.
pub(crate) fn udp_pps(j: &serde_json::Value) -> Result<f64> {
    let sum = &j["end"]["sum"];
    let (Some(packets), Some(lost), Some(secs)) = (
        sum["packets"].as_f64(),
        sum["lost_packets"].as_f64(),
        sum["seconds"].as_f64(),
    ) else {
        bail!("iperf3 UDP output lacks end.sum.packets/lost_packets/seconds");
    };
    if secs <= 0.0 {
        bail!("iperf3 reported a zero-length run");
    }
    Ok((packets - lost).max(0.0) / secs)
}

/// Received TCP throughput in Gbit/s, from `iperf3 -J` client output.
pub(crate) fn tcp_gbps(j: &serde_json::Value) -> Result<f64> {
    j["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .map(|b| b / 1e9)
        .context("iperf3 TCP output lacks end.sum_received.bits_per_second")
}

fn sockperf_pp(client: &str, server: &str, ip: &str, secs: &str) -> Result<(f64, f64)> {
    let _srv = spawn_server({
        let mut c = in_ns(server, Some(1), "sockperf");
        c.args(["sr", "--tcp", "-i", ip, "-p", "11111"]);
        c
    })?;
    let mut cmd = in_ns(client, Some(0), "timeout");
    cmd.args([
        CLIENT_TIMEOUT,
        "sockperf",
        "pp",
        "--tcp",
        "-i",
        ip,
        "-p",
        "11111",
        "-m",
        "64",
        "-t",
        secs,
        "--mps=max",
    ]);
    parse_sockperf(&output(&mut cmd)?)
}

/// Transactions per second and p99 latency (µs) from `sockperf ping-pong` output.
pub(crate) fn parse_sockperf(text: &str) -> Result<(f64, f64)> {
    let mut runtime = None;
    let mut received = None;
    let mut p99 = None;
    for line in text.lines() {
        if line.contains("[Valid Duration]") {
            for part in line.split(|c: char| c == ';' || c.is_whitespace()) {
                if let Some(v) = part.strip_prefix("RunTime=") {
                    runtime = v.trim_end_matches("sec").parse::<f64>().ok();
                } else if let Some(v) = part.strip_prefix("ReceivedMessages=") {
                    received = v.parse::<f64>().ok();
                }
            }
        } else if line.contains("percentile 99.000") {
            p99 = line
                .rsplit('=')
                .next()
                .and_then(|v| v.trim().parse::<f64>().ok());
        }
    }
    match (runtime, received, p99) {
        (Some(t), Some(n), Some(p)) if t > 0.0 => Ok((n / t, p)),
        _ => bail!("sockperf output lacks RunTime/ReceivedMessages/percentile 99"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn udp_pps_counts_only_received_packets() {
        let j = serde_json::json!({"end": {"sum": {"packets": 300_000, "lost_packets": 100_000, "seconds": 2.0}}});
        assert_eq!(udp_pps(&j).unwrap(), 100_000.0);
        assert!(udp_pps(&serde_json::json!({})).is_err());
    }

    #[test]
    fn tcp_gbps_reads_the_receiver_side() {
        let j = serde_json::json!({"end": {"sum_received": {"bits_per_second": 1.5e10}, "sum_sent": {"bits_per_second": 9e10}}});
        assert_eq!(tcp_gbps(&j).unwrap(), 15.0);
    }

    #[test]
    fn sockperf_summary_is_parsed() {
        let text = "sockperf: == version #3.10-no.git == \n\
            sockperf: [Total Run] RunTime=3.000 sec; Warm up time=400 msec; SentMessages=50001; ReceivedMessages=50000\n\
            sockperf: ========= Printing statistics for Server No: 0\n\
            sockperf: [Valid Duration] RunTime=2.550 sec; SentMessages=45901; ReceivedMessages=45900\n\
            sockperf: ====> avg-latency=27.543 (std-dev=5.197, mean-ad=2.112, median-ad=1.542, siqr=1.175, cv=0.189, std-error=0.024, 99.0% ci=[27.480, 27.606])\n\
            sockperf: ---> <MAX> observation =  251.420\n\
            sockperf: ---> percentile 99.999 =  240.003\n\
            sockperf: ---> percentile 99.000 =   45.125\n\
            sockperf: ---> percentile 50.000 =   26.902\n";
        let (tps, p99) = parse_sockperf(text).unwrap();
        assert!((tps - 18_000.0).abs() < 1.0);
        assert_eq!(p99, 45.125);
        assert!(parse_sockperf("nothing").is_err());
    }
}
