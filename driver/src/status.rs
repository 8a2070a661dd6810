//! What sluice can tell about itself: per-endpoint status and counters ([`EndpointStatus`],
//! from [`crate::Driver::status`]) and dropped packets as the datapath reports them
//! ([`FlowRecord`], from [`crate::Driver::describe_drop`]). Plain data, serialisable, so the
//! plugin's admin API can hand it out as JSON and the CLI can format it.

use std::net::IpAddr;
use std::time::{SystemTime, UNIX_EPOCH};

use ipnetwork::IpNetwork;
use serde::{Deserialize, Serialize};
use sluice_common::{
    DIR_EGRESS, DIR_INGRESS, DropEvent, EP_EGRESS_ENFORCED, EP_IDENTITY_PENDING,
    EP_INGRESS_ENFORCED, EP_ISOLATE, FAMILY_V4, FAMILY_V6, REASON_DEFAULT_DENY,
    REASON_IDENTITY_PENDING, REASON_ISOLATION, REASON_MALFORMED, REASON_NOT_IP, REASON_POLICY_DENY,
    REASON_SPOOFED,
};

use crate::datapath::EndpointCounters;
use crate::datapath::event_addr;

/// Packets and bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Count {
    /// Packets.
    pub packets: u64,
    /// Bytes (including the Ethernet header).
    pub bytes: u64,
}

/// One direction of an endpoint's traffic.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirectionStatus {
    /// Let through.
    pub allowed: Count,
    /// Dropped.
    pub dropped: Count,
}

/// An endpoint as `sluice endpoints` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointStatus {
    /// Docker's endpoint ID.
    pub id: String,
    /// Docker's network ID.
    pub network_id: String,
    /// Container name, once resolved from the Docker Engine API.
    pub container: Option<String>,
    /// Container ID, once resolved.
    pub container_id: Option<String>,
    /// Host end of the veth pair.
    pub host_veth: String,
    /// Its ifindex (0 when unknown).
    pub ifindex: u32,
    /// Addresses with prefix.
    pub addresses: Vec<IpNetwork>,
    /// Security identity.
    pub identity: u32,
    /// Datapath flags by name ([`flag_names`]).
    pub flags: Vec<String>,
    /// Whether a container has joined (sandbox known).
    pub joined: bool,
    /// What the container received.
    pub ingress: DirectionStatus,
    /// What the container sent.
    pub egress: DirectionStatus,
    /// Why the counters could not be read (they are zero then).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub counters_error: Option<String>,
    /// Published ports (`0.0.0.0:8080->80/tcp`), with the host ports sluice chose: Docker
    /// cannot show a remote driver's ports in `docker port` / `docker ps`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<String>,
}

impl EndpointStatus {
    /// Fills in the counters.
    pub fn set_counters(&mut self, c: &EndpointCounters) {
        let count = |v: sluice_common::CounterValue| Count {
            packets: v.packets,
            bytes: v.bytes,
        };
        self.ingress = DirectionStatus {
            allowed: count(c.ingress.allowed),
            dropped: count(c.ingress.denied),
        };
        self.egress = DirectionStatus {
            allowed: count(c.egress.allowed),
            dropped: count(c.egress.denied),
        };
    }
}

/// Everything `GET /v1/endpoints` and `GET /metrics` need from the driver, read at once.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    /// Every endpoint, sorted by ID.
    pub endpoints: Vec<EndpointStatus>,
    /// Number of applied policies.
    pub policies: usize,
}

/// The names of the `EP_*` flags that matter to users, in a fixed order: `isolate`,
/// `ingress-enforced`, `egress-enforced`, `pending` (the source check is always on and not
/// listed).
#[must_use]
pub fn flag_names(flags: u32) -> Vec<String> {
    [
        (EP_ISOLATE, "isolate"),
        (EP_INGRESS_ENFORCED, "ingress-enforced"),
        (EP_EGRESS_ENFORCED, "egress-enforced"),
        (EP_IDENTITY_PENDING, "pending"),
    ]
    .iter()
    .filter(|(bit, _)| flags & bit != 0)
    .map(|(_, name)| (*name).to_owned())
    .collect()
}

/// Why the datapath dropped a packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DropReason {
    /// A deny rule matched.
    PolicyDeny,
    /// The direction is enforced and no rule allowed it.
    DefaultDeny,
    /// The peer is on another network and isolation is on.
    Isolation,
    /// The endpoint's container is not known yet and a policy may select it.
    IdentityPending,
    /// A truncated or malformed header.
    Malformed,
    /// Neither IP nor ARP.
    NotIp,
    /// Sent from an address that is not the endpoint's.
    Spoofed,
    /// A reason code this build does not know.
    Unknown,
}

impl DropReason {
    /// Every reason, in code order.
    pub const ALL: [Self; 8] = [
        Self::PolicyDeny,
        Self::DefaultDeny,
        Self::Isolation,
        Self::IdentityPending,
        Self::Malformed,
        Self::NotIp,
        Self::Spoofed,
        Self::Unknown,
    ];

    /// From a `REASON_*` code.
    #[must_use]
    pub fn from_code(code: u8) -> Self {
        match code {
            REASON_POLICY_DENY => Self::PolicyDeny,
            REASON_DEFAULT_DENY => Self::DefaultDeny,
            REASON_ISOLATION => Self::Isolation,
            REASON_IDENTITY_PENDING => Self::IdentityPending,
            REASON_MALFORMED => Self::Malformed,
            REASON_NOT_IP => Self::NotIp,
            REASON_SPOOFED => Self::Spoofed,
            _ => Self::Unknown,
        }
    }

    /// `policy_deny`, … (the JSON and metrics label value).
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::PolicyDeny => "policy_deny",
            Self::DefaultDeny => "default_deny",
            Self::Isolation => "isolation",
            Self::IdentityPending => "identity_pending",
            Self::Malformed => "malformed",
            Self::NotIp => "not_ip",
            Self::Spoofed => "spoofed",
            Self::Unknown => "unknown",
        }
    }

    /// For humans: `policy deny`, `default deny`, `identity pending`, …
    #[must_use]
    pub fn describe(self) -> &'static str {
        match self {
            Self::PolicyDeny => "policy deny",
            Self::DefaultDeny => "default deny",
            Self::Isolation => "isolation",
            Self::IdentityPending => "identity pending",
            Self::Malformed => "malformed",
            Self::NotIp => "not ip",
            Self::Spoofed => "spoofed source",
            Self::Unknown => "unknown reason",
        }
    }
}

/// A dropped packet, as `sluice flows` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowRecord {
    /// Position in the daemon's event sequence (from 1; 0 until the daemon numbers it).
    #[serde(default)]
    pub seq: u64,
    /// When the daemon received it, milliseconds since the Unix epoch.
    pub time_ms: u64,
    /// `ingress` (to the container) or `egress` (from it).
    pub direction: String,
    /// Source address; `None` when the packet was not parsed as IP.
    pub src: Option<IpAddr>,
    /// Source port (0 for port-less protocols).
    pub src_port: u16,
    /// Destination address.
    pub dst: Option<IpAddr>,
    /// Destination port (ICMP: `type << 8 | code`).
    pub dst_port: u16,
    /// IP protocol number (0 when not parsed).
    pub proto: u8,
    /// Host veth ifindex the event came from.
    pub ifindex: u32,
    /// Endpoint ID, when the ifindex is a known endpoint's.
    pub endpoint: Option<String>,
    /// Container name, when known.
    pub container: Option<String>,
    /// Why.
    pub reason: DropReason,
    /// The rule that denied it (`web-to-db ingress[0]`) for [`DropReason::PolicyDeny`].
    pub rule: Option<String>,
    /// Drops not reported (rate limit) on this CPU since its previous event.
    pub suppressed: u32,
}

impl FlowRecord {
    /// The event's own fields, received at `received`; endpoint, container and rule are
    /// left for the driver to fill in.
    #[must_use]
    pub fn from_event(ev: &DropEvent, received: SystemTime) -> Self {
        let time_ms = received
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        let parsed = ev.family == FAMILY_V4 || ev.family == FAMILY_V6;
        let addr = |a: [u8; 16]| parsed.then(|| event_addr(a, ev.family));
        Self {
            seq: 0,
            time_ms,
            direction: match ev.direction {
                DIR_INGRESS => "ingress".into(),
                DIR_EGRESS => "egress".into(),
                other => format!("direction {other}"),
            },
            src: addr(ev.src_addr),
            src_port: ev.src_port,
            dst: addr(ev.dst_addr),
            dst_port: ev.dst_port,
            proto: ev.proto,
            ifindex: ev.ifindex,
            endpoint: None,
            container: None,
            reason: DropReason::from_code(ev.reason),
            rule: None,
            suppressed: ev.suppressed,
        }
    }
}

/// `2026-11-28T05:14:32.123Z` for milliseconds since the Unix epoch.
#[must_use]
pub fn format_time_ms(ms: u64) -> String {
    let secs = ms / 1000;
    let days = i64::try_from(secs / 86_400).unwrap_or(0);
    let rem = secs % 86_400;
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        ms % 1000
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_and_flags() {
        assert_eq!(format_time_ms(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(format_time_ms(951_782_400_001), "2000-02-29T00:00:00.001Z");
        assert_eq!(
            format_time_ms(1_795_843_272_123),
            "2026-11-28T05:21:12.123Z"
        );
        assert_eq!(
            flag_names(EP_ISOLATE | EP_INGRESS_ENFORCED | EP_IDENTITY_PENDING | 1 << 4),
            ["isolate", "ingress-enforced", "pending"]
        );
        assert!(flag_names(0).is_empty());
    }

    #[test]
    fn events_become_records() {
        let mut ev = DropEvent {
            ifindex: 7,
            src_port: 40000,
            dst_port: 5432,
            proto: 6,
            direction: DIR_INGRESS,
            reason: REASON_POLICY_DENY,
            family: FAMILY_V4,
            suppressed: 2,
            ..DropEvent::default()
        };
        ev.src_addr[10..].copy_from_slice(&[0xff, 0xff, 10, 0, 0, 3]);
        ev.dst_addr[10..].copy_from_slice(&[0xff, 0xff, 10, 0, 0, 2]);
        let r = FlowRecord::from_event(&ev, UNIX_EPOCH + std::time::Duration::from_millis(5));
        assert_eq!(r.time_ms, 5);
        assert_eq!(r.direction, "ingress");
        assert_eq!(r.src, Some("10.0.0.3".parse().unwrap()));
        assert_eq!(r.dst, Some("10.0.0.2".parse().unwrap()));
        assert_eq!(r.reason, DropReason::PolicyDeny);
        assert_eq!(
            serde_json::to_value(r.reason).unwrap(),
            serde_json::json!("policy_deny")
        );
        ev.family = 0;
        ev.reason = 99;
        let r = FlowRecord::from_event(&ev, UNIX_EPOCH);
        assert_eq!((r.src, r.reason), (None, DropReason::Unknown));
    }
}
