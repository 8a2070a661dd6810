//! The drop-event reader: the `EVENTS` ring buffer behind a tokio [`AsyncFd`].
//!
//! The kernel side rate-limits (per-CPU token bucket, `SETTINGS`), so a flood of drops cannot
//! swamp the reader; each delivered event says how many its CPU suppressed before it.

use std::io;
use std::net::{IpAddr, Ipv6Addr};

use aya::maps::{MapData, RingBuf};
use sluice_common::{DropEvent, FAMILY_V4};
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

/// Reads [`DropEvent`]s as the programs emit them. One reader per [`super::Datapath`]
/// ([`super::Datapath::drop_events`] hands it out once).
pub struct DropEvents {
    ring: AsyncFd<RingBuf<MapData>>,
}

impl std::fmt::Debug for DropEvents {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DropEvents").finish_non_exhaustive()
    }
}

impl DropEvents {
    /// Registers the ring buffer with the current tokio runtime's reactor.
    pub(crate) fn new(ring: RingBuf<MapData>) -> io::Result<Self> {
        // `register` panics without a reactor; report that as an error instead.
        tokio::runtime::Handle::try_current().map_err(io::Error::other)?;
        // SAFETY: `RingBuf<MapData>` owns the ring buffer map's file descriptor (inside
        // `MapData`) for as long as it lives, never replaces or closes it, and `as_raw_fd`
        // always returns that same descriptor; the `AsyncFd` owns the `RingBuf`, so the fd
        // stays open and unchanged for the `AsyncFd`'s whole lifetime.
        let ring = unsafe { AsyncFd::register_with_interest(ring, Interest::READABLE) }
            .map_err(io::Error::from)?;
        Ok(Self { ring })
    }

    /// Waits for the next drop event.
    ///
    /// # Errors
    /// If polling the ring buffer's file descriptor fails.
    pub async fn next(&mut self) -> io::Result<DropEvent> {
        loop {
            let mut guard = self.ring.readable_mut().await?;
            if let Some(event) = pop(guard.get_inner_mut()) {
                return Ok(event);
            }
            guard.clear_ready();
        }
    }

    /// The next event if one is queued, without waiting.
    pub fn try_next(&mut self) -> Option<DropEvent> {
        pop(self.ring.get_mut())
    }
}

fn pop(ring: &mut RingBuf<MapData>) -> Option<DropEvent> {
    while let Some(item) = ring.next() {
        if let Some(event) = decode(&item) {
            return Some(event);
        }
        // A record of the wrong size (another build of the programs?) is skipped.
    }
    None
}

fn field<const N: usize>(bytes: &[u8], offset: usize) -> Option<[u8; N]> {
    bytes.get(offset..offset + N)?.try_into().ok()
}

/// Decodes one ring-buffer record (the `#[repr(C)]` layout of [`DropEvent`], native endian).
#[must_use]
pub fn decode(bytes: &[u8]) -> Option<DropEvent> {
    if bytes.len() != size_of::<DropEvent>() {
        return None;
    }
    Some(DropEvent {
        timestamp_ns: u64::from_ne_bytes(field(bytes, 0)?),
        src_addr: field(bytes, 8)?,
        dst_addr: field(bytes, 24)?,
        ifindex: u32::from_ne_bytes(field(bytes, 40)?),
        rule_id: u32::from_ne_bytes(field(bytes, 44)?),
        src_port: u16::from_ne_bytes(field(bytes, 48)?),
        dst_port: u16::from_ne_bytes(field(bytes, 50)?),
        proto: bytes[52],
        direction: bytes[53],
        reason: bytes[54],
        family: bytes[55],
        suppressed: u32::from_ne_bytes(field(bytes, 56)?),
        _pad: 0,
    })
}

/// An address field of a [`DropEvent`] (or a conntrack key) as an [`IpAddr`].
#[must_use]
pub fn event_addr(addr: [u8; 16], family: u8) -> IpAddr {
    let v6 = Ipv6Addr::from(addr);
    match v6.to_ipv4_mapped() {
        Some(v4) if family == FAMILY_V4 => IpAddr::V4(v4),
        _ => IpAddr::V6(v6),
    }
}

#[cfg(test)]
mod tests {
    use std::mem::offset_of;

    use sluice_common::{DIR_INGRESS, REASON_POLICY_DENY};

    use super::*;

    #[test]
    fn decode_matches_the_repr_c_layout() {
        assert_eq!(offset_of!(DropEvent, rule_id), 44);
        assert_eq!(offset_of!(DropEvent, dst_port), 50);
        assert_eq!(offset_of!(DropEvent, family), 55);
        let mut b = vec![0u8; 64];
        b[0..8].copy_from_slice(&7u64.to_ne_bytes());
        b[8 + 10] = 0xff;
        b[8 + 11] = 0xff;
        b[8 + 12..8 + 16].copy_from_slice(&[10, 0, 0, 1]);
        b[40..44].copy_from_slice(&12u32.to_ne_bytes());
        b[44..48].copy_from_slice(&99u32.to_ne_bytes());
        b[50..52].copy_from_slice(&80u16.to_ne_bytes());
        b[52] = 6;
        b[53] = DIR_INGRESS;
        b[54] = REASON_POLICY_DENY;
        b[55] = FAMILY_V4;
        b[56..60].copy_from_slice(&3u32.to_ne_bytes());
        let e = decode(&b).unwrap();
        assert_eq!(e.timestamp_ns, 7);
        assert_eq!(e.ifindex, 12);
        assert_eq!(e.rule_id, 99);
        assert_eq!(e.dst_port, 80);
        assert_eq!(e.suppressed, 3);
        assert_eq!(
            event_addr(e.src_addr, e.family),
            "10.0.0.1".parse::<IpAddr>().unwrap()
        );
        assert!(decode(&b[..63]).is_none());
    }
}
