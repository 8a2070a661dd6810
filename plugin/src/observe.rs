//! Observability in the daemon and the CLI: the [`FlowLog`] of recent drop events (a bounded
//! ring plus a broadcast for `sluice flows --follow`), the task that fills it from the
//! datapath ([`spawn_drop_reader`]), and the text the CLI and `GET /metrics` print
//! ([`format_endpoints`], [`format_flow`], [`render_metrics`]).

use std::collections::{BTreeMap, VecDeque};
use std::fmt::Write as _;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::SystemTime;

use sluice_driver::datapath::DropEvents;
use sluice_driver::status::{DropReason, EndpointStatus, FlowRecord, Status, format_time_ms};
use sluice_driver::{Driver, Kernel};
use tokio::sync::broadcast;
use tracing::{debug, warn};

/// How many recent drop events the daemon keeps for `sluice flows`.
pub const FLOW_RING: usize = 1000;

#[derive(Debug, Default)]
struct Ring {
    recent: VecDeque<FlowRecord>,
    next_seq: u64,
    by_reason: BTreeMap<DropReason, u64>,
    suppressed: u64,
}

/// The recent drop events, their totals by reason, and a broadcast of new ones.
#[derive(Debug)]
pub struct FlowLog {
    ring: Mutex<Ring>,
    capacity: usize,
    tx: broadcast::Sender<FlowRecord>,
    closed: tokio::sync::watch::Sender<bool>,
}

impl Default for FlowLog {
    fn default() -> Self {
        Self::new(FLOW_RING)
    }
}

impl FlowLog {
    /// A log keeping the last `capacity` events.
    #[must_use]
    pub fn new(capacity: usize) -> Self {
        let (tx, _) = broadcast::channel(1024);
        Self {
            ring: Mutex::new(Ring::default()),
            capacity: capacity.max(1),
            tx,
            closed: tokio::sync::watch::Sender::new(false),
        }
    }

    /// Ends every follower's stream (the daemon is stopping: graceful shutdown waits for
    /// open connections).
    pub fn close(&self) {
        self.closed.send_replace(true);
    }

    /// Resolves once [`FlowLog::close`] was called.
    pub fn closed(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let mut rx = self.closed.subscribe();
        async move {
            let _ = rx.wait_for(|c| *c).await;
        }
    }

    fn ring(&self) -> std::sync::MutexGuard<'_, Ring> {
        self.ring.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Numbers `record`, keeps it and sends it to the followers.
    pub fn push(&self, mut record: FlowRecord) {
        let mut ring = self.ring();
        ring.next_seq += 1;
        record.seq = ring.next_seq;
        *ring.by_reason.entry(record.reason).or_default() += 1;
        ring.suppressed += u64::from(record.suppressed);
        if ring.recent.len() == self.capacity {
            ring.recent.pop_front();
        }
        ring.recent.push_back(record.clone());
        // Sent under the lock, so a follower that subscribed under it sees every later event.
        let _ = self.tx.send(record);
    }

    /// The kept events, oldest first.
    #[must_use]
    pub fn recent(&self) -> Vec<FlowRecord> {
        self.ring().recent.iter().cloned().collect()
    }

    /// The kept events and a receiver of every later one (no gap, no duplicate).
    #[must_use]
    pub fn follow(&self) -> (Vec<FlowRecord>, broadcast::Receiver<FlowRecord>) {
        let ring = self.ring();
        let rx = self.tx.subscribe();
        (ring.recent.iter().cloned().collect(), rx)
    }

    /// Events received by reason (every reason present, zeros included), and the total the
    /// kernel suppressed.
    #[must_use]
    pub fn totals(&self) -> (BTreeMap<DropReason, u64>, u64) {
        let ring = self.ring();
        let mut totals: BTreeMap<DropReason, u64> =
            DropReason::ALL.iter().map(|r| (*r, 0)).collect();
        for (r, n) in &ring.by_reason {
            totals.insert(*r, *n);
        }
        (totals, ring.suppressed)
    }
}

/// Reads drop events from the datapath until it fails, describes each through the driver
/// and adds it to `log`.
pub fn spawn_drop_reader<K: Kernel>(
    mut events: DropEvents,
    driver: Arc<Driver<K>>,
    log: Arc<FlowLog>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            match events.next().await {
                Ok(event) => {
                    let record = driver.describe_drop(&event, SystemTime::now()).await;
                    debug!(?record, "drop");
                    log.push(record);
                }
                Err(e) => {
                    warn!(error = %e, "reading drop events stopped; `sluice flows` shows no new events");
                    return;
                }
            }
        }
    })
}

// ---- text ------------------------------------------------------------------------------

fn short(id: &str) -> String {
    id.chars().take(12).collect()
}

/// Left-aligned columns, two spaces apart, no trailing blanks.
fn table(rows: &[Vec<String>]) -> String {
    let cols = rows.iter().map(Vec::len).max().unwrap_or(0);
    let mut widths = vec![0usize; cols];
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for row in rows {
        let mut line = String::new();
        for (cell, w) in row.iter().zip(&widths) {
            let _ = write!(line, "{cell:<w$}  ");
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// The `sluice endpoints` table.
#[must_use]
pub fn format_endpoints(endpoints: &[EndpointStatus]) -> String {
    let mut rows = vec![
        [
            "ENDPOINT",
            "CONTAINER",
            "NETWORK",
            "ADDRESSES",
            "IDENTITY",
            "FLAGS",
            "IN ALLOWED/DROPPED",
            "OUT ALLOWED/DROPPED",
        ]
        .map(str::to_owned)
        .to_vec(),
    ];
    for ep in endpoints {
        let addresses: Vec<String> = ep.addresses.iter().map(ToString::to_string).collect();
        let or_dash = |s: String| if s.is_empty() { "-".to_owned() } else { s };
        let counts = |d: &sluice_driver::status::DirectionStatus| {
            if ep.counters_error.is_some() {
                "?".to_owned()
            } else {
                format!("{}/{}", d.allowed.packets, d.dropped.packets)
            }
        };
        rows.push(vec![
            short(&ep.id),
            ep.container.clone().unwrap_or_else(|| "-".into()),
            short(&ep.network_id),
            or_dash(addresses.join(",")),
            ep.identity.to_string(),
            or_dash(ep.flags.join(",")),
            counts(&ep.ingress),
            counts(&ep.egress),
        ]);
    }
    table(&rows)
}

fn proto_name(proto: u8) -> String {
    match proto {
        0 => "-".into(),
        1 => "icmp".into(),
        6 => "tcp".into(),
        17 => "udp".into(),
        58 => "icmpv6".into(),
        132 => "sctp".into(),
        n => format!("proto {n}"),
    }
}

fn host_port(addr: Option<IpAddr>, port: u16, with_port: bool) -> String {
    match (addr, with_port) {
        (None, _) => "-".into(),
        (Some(a), false) => a.to_string(),
        (Some(IpAddr::V4(a)), true) => format!("{a}:{port}"),
        (Some(IpAddr::V6(a)), true) => format!("[{a}]:{port}"),
    }
}

/// One `sluice flows` line:
/// `2026-11-28T05:14:32.123Z ingress 10.200.0.3:40000 -> 10.200.0.2:5432 tcp db (3f2a9c1b7e4d) policy deny: web-to-db ingress[0]`.
#[must_use]
pub fn format_flow(r: &FlowRecord) -> String {
    let ports = matches!(r.proto, 6 | 17 | 132);
    let mut what = format!(
        "{} -> {} {}",
        host_port(r.src, r.src_port, ports),
        host_port(r.dst, r.dst_port, ports),
        proto_name(r.proto)
    );
    if matches!(r.proto, 1 | 58) {
        let _ = write!(what, " {}/{}", r.dst_port >> 8, r.dst_port & 0xff);
    }
    let at = match (&r.container, &r.endpoint) {
        (Some(c), Some(e)) => format!("{c} ({})", short(e)),
        (None, Some(e)) => format!("- ({})", short(e)),
        _ => format!("ifindex {}", r.ifindex),
    };
    let mut line = format!(
        "{} {:<7} {what} {at} {}",
        format_time_ms(r.time_ms),
        r.direction,
        r.reason.describe()
    );
    if let Some(rule) = &r.rule {
        let _ = write!(line, ": {rule}");
    }
    if r.suppressed > 0 {
        let _ = write!(line, " (+{} suppressed)", r.suppressed);
    }
    line
}

/// A Prometheus label value with `\`, `"` and newlines escaped.
fn escape(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

/// `GET /metrics` in the Prometheus text exposition format (0.0.4).
#[must_use]
pub fn render_metrics(status: &Status, log: &FlowLog) -> String {
    let mut out = String::new();
    for (name, help, bytes) in [
        (
            "sluice_endpoint_packets_total",
            "Packets the datapath saw at an endpoint, by direction (ingress: to the container) and verdict.",
            false,
        ),
        (
            "sluice_endpoint_bytes_total",
            "Bytes (including the Ethernet header) the datapath saw at an endpoint, by direction and verdict.",
            true,
        ),
    ] {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} counter");
        for ep in status
            .endpoints
            .iter()
            .filter(|e| e.counters_error.is_none())
        {
            for (direction, d) in [("ingress", &ep.ingress), ("egress", &ep.egress)] {
                for (verdict, c) in [("allowed", d.allowed), ("dropped", d.dropped)] {
                    let _ = writeln!(
                        out,
                        "{name}{{endpoint=\"{}\",container=\"{}\",network=\"{}\",direction=\"{direction}\",verdict=\"{verdict}\"}} {}",
                        escape(&ep.id),
                        escape(ep.container.as_deref().unwrap_or("")),
                        escape(&ep.network_id),
                        if bytes { c.bytes } else { c.packets }
                    );
                }
            }
        }
    }
    let (totals, suppressed) = log.totals();
    let _ = writeln!(
        out,
        "# HELP sluice_drop_events_total Drop events the daemon received from the datapath, by reason."
    );
    let _ = writeln!(out, "# TYPE sluice_drop_events_total counter");
    for (reason, n) in totals {
        let _ = writeln!(
            out,
            "sluice_drop_events_total{{reason=\"{}\"}} {n}",
            reason.as_str()
        );
    }
    let _ = writeln!(
        out,
        "# HELP sluice_drop_events_suppressed_total Drop events the datapath did not deliver (rate limit)."
    );
    let _ = writeln!(out, "# TYPE sluice_drop_events_suppressed_total counter");
    let _ = writeln!(out, "sluice_drop_events_suppressed_total {suppressed}");
    let _ = writeln!(out, "# HELP sluice_policies Applied policies.");
    let _ = writeln!(out, "# TYPE sluice_policies gauge");
    let _ = writeln!(out, "sluice_policies {}", status.policies);
    out
}

/// Fixtures shared with the admin API's tests.
#[cfg(test)]
pub(crate) mod tests_support {
    pub(crate) use super::tests::record;
}

#[cfg(test)]
mod tests {
    use sluice_driver::status::{Count, DirectionStatus};

    use super::*;

    fn endpoint() -> EndpointStatus {
        EndpointStatus {
            id: "3f2a9c1b7e4d5a6b7c8d".into(),
            network_id: "9e8d7c6b5a4f3e2d1c0b".into(),
            container: Some("db\"1".into()),
            container_id: Some("c0ffee".into()),
            host_veth: "slv3f2a9c1b".into(),
            ifindex: 7,
            addresses: vec!["10.200.0.2/24".parse().unwrap()],
            identity: 257,
            flags: vec!["isolate".into(), "ingress-enforced".into()],
            joined: true,
            ingress: DirectionStatus {
                allowed: Count {
                    packets: 10,
                    bytes: 1000,
                },
                dropped: Count {
                    packets: 3,
                    bytes: 222,
                },
            },
            egress: DirectionStatus {
                allowed: Count {
                    packets: 12,
                    bytes: 1300,
                },
                dropped: Count::default(),
            },
            counters_error: None,
            ports: Vec::new(),
        }
    }

    pub(crate) fn record() -> FlowRecord {
        FlowRecord {
            seq: 0,
            time_ms: 1_795_843_272_123,
            direction: "ingress".into(),
            src: Some("10.200.0.3".parse().unwrap()),
            src_port: 40000,
            dst: Some("10.200.0.2".parse().unwrap()),
            dst_port: 5432,
            proto: 6,
            ifindex: 7,
            endpoint: Some("3f2a9c1b7e4d5a6b7c8d".into()),
            container: Some("db".into()),
            reason: DropReason::PolicyDeny,
            rule: Some("web-to-db ingress[0]".into()),
            suppressed: 0,
        }
    }

    #[test]
    fn endpoints_table() {
        let mut pending = endpoint();
        pending.id = "aaaa".into();
        pending.container = None;
        pending.flags = vec!["pending".into()];
        pending.addresses = vec![];
        pending.counters_error = Some("no such link".into());
        assert_eq!(
            format_endpoints(&[endpoint(), pending]),
            "ENDPOINT      CONTAINER  NETWORK       ADDRESSES      IDENTITY  FLAGS                     IN ALLOWED/DROPPED  OUT ALLOWED/DROPPED\n\
             3f2a9c1b7e4d  db\"1       9e8d7c6b5a4f  10.200.0.2/24  257       isolate,ingress-enforced  10/3                12/0\n\
             aaaa          -          9e8d7c6b5a4f  -              257       pending                   ?                   ?\n"
        );
    }

    /// The table in docs/usage.md is what `format_endpoints` prints for its rows.
    #[test]
    fn docs_show_the_real_endpoints_table() {
        let row = |id: &str,
                   c: Option<&str>,
                   addr: &str,
                   identity: u32,
                   flags: &[&str],
                   counts: [u64; 3]| {
            let mut ep = endpoint();
            ep.id = id.into();
            ep.network_id = "a45eeb163d5f42cc".into();
            ep.container = c.map(str::to_owned);
            ep.addresses = vec![addr.parse().unwrap()];
            ep.identity = identity;
            ep.flags = flags.iter().map(|f| (*f).to_owned()).collect();
            ep.ingress.allowed.packets = counts[0];
            ep.ingress.dropped.packets = counts[1];
            ep.egress.allowed.packets = counts[2];
            ep.egress.dropped.packets = if c.is_none() { 5 } else { 0 };
            ep
        };
        let table = format_endpoints(&[
            row(
                "0f987eed597ecf",
                Some("db"),
                "10.251.0.2/24",
                256,
                &["isolate", "ingress-enforced"],
                [1204, 17, 1180],
            ),
            row(
                "5d1c20ab4f8e99",
                Some("web"),
                "10.251.0.3/24",
                257,
                &["isolate"],
                [1180, 0, 1221],
            ),
            row(
                "9b3e77c01d2a00",
                None,
                "10.251.0.4/24",
                258,
                &["isolate", "pending"],
                [0, 3, 0],
            ),
        ]);
        let docs = include_str!("../../docs/usage.md");
        assert!(
            docs.contains(&format!("$ sudo sluice endpoints\n{table}```")),
            "docs/usage.md should show:\n{table}"
        );
    }

    #[test]
    fn flow_lines() {
        assert_eq!(
            format_flow(&record()),
            "2026-11-28T05:21:12.123Z ingress 10.200.0.3:40000 -> 10.200.0.2:5432 tcp db (3f2a9c1b7e4d) policy deny: web-to-db ingress[0]"
        );
        let mut r = record();
        r.direction = "egress".into();
        r.src = Some("fd00::2".parse().unwrap());
        r.dst = Some("fd00::3".parse().unwrap());
        r.proto = 58;
        r.dst_port = 128 << 8;
        r.container = None;
        r.reason = DropReason::IdentityPending;
        r.rule = None;
        r.suppressed = 41;
        assert_eq!(
            format_flow(&r),
            "2026-11-28T05:21:12.123Z egress  fd00::2 -> fd00::3 icmpv6 128/0 - (3f2a9c1b7e4d) identity pending (+41 suppressed)"
        );
        r.src = None;
        r.dst = None;
        r.proto = 0;
        r.endpoint = None;
        r.reason = DropReason::NotIp;
        r.suppressed = 0;
        assert_eq!(
            format_flow(&r),
            "2026-11-28T05:21:12.123Z egress  - -> - - ifindex 7 not ip"
        );
        r.src = Some("fd00::2".parse().unwrap());
        r.dst = Some("fd00::3".parse().unwrap());
        r.proto = 17;
        r.src_port = 53;
        assert!(format_flow(&r).contains("[fd00::2]:53 -> [fd00::3]:32768 udp"));
    }

    #[test]
    fn ring_is_bounded_and_numbered() {
        let log = FlowLog::new(3);
        let (_, mut rx) = log.follow();
        for _ in 0..5 {
            let mut r = record();
            r.suppressed = 2;
            log.push(r);
        }
        let recent = log.recent();
        assert_eq!(recent.iter().map(|r| r.seq).collect::<Vec<_>>(), [3, 4, 5]);
        assert_eq!(rx.try_recv().unwrap().seq, 1);
        let (totals, suppressed) = log.totals();
        assert_eq!(totals[&DropReason::PolicyDeny], 5);
        assert_eq!(totals[&DropReason::Isolation], 0);
        assert_eq!(suppressed, 10);
    }

    #[test]
    fn metrics_text() {
        let log = FlowLog::new(10);
        log.push(record());
        let status = Status {
            endpoints: vec![endpoint()],
            policies: 2,
        };
        let text = render_metrics(&status, &log);
        let labels = "endpoint=\"3f2a9c1b7e4d5a6b7c8d\",container=\"db\\\"1\",network=\"9e8d7c6b5a4f3e2d1c0b\"";
        for line in [
            "# TYPE sluice_endpoint_packets_total counter".to_owned(),
            format!(
                "sluice_endpoint_packets_total{{{labels},direction=\"ingress\",verdict=\"allowed\"}} 10"
            ),
            format!(
                "sluice_endpoint_packets_total{{{labels},direction=\"ingress\",verdict=\"dropped\"}} 3"
            ),
            format!(
                "sluice_endpoint_bytes_total{{{labels},direction=\"egress\",verdict=\"allowed\"}} 1300"
            ),
            "sluice_drop_events_total{reason=\"policy_deny\"} 1".to_owned(),
            "sluice_drop_events_total{reason=\"isolation\"} 0".to_owned(),
            "# TYPE sluice_policies gauge".to_owned(),
            "sluice_policies 2".to_owned(),
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in\n{text}"
            );
        }
        // Every sample line belongs to a declared family; HELP precedes TYPE once each.
        let mut declared = Vec::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                declared.push(rest.split(' ').next().unwrap().to_owned());
            } else if !line.starts_with('#') {
                let name = line.split(['{', ' ']).next().unwrap();
                assert_eq!(declared.last().map(String::as_str), Some(name), "{line}");
            }
        }
        assert_eq!(escape("a\\b\"c\nd"), "a\\\\b\\\"c\\nd");
    }
}
