// SPDX-License-Identifier: GPL-2.0 OR MIT
//! Header parsing for the TC programs. Every read goes through `TcContext::load`
//! (`bpf_skb_load_bytes`), which checks the offset and length against the packet and fails
//! instead of reading past its end, so no raw packet pointer is ever dereferenced here and a
//! truncated header surfaces as `Err(Malformed)`.
//!
//! Scope, on purpose:
//! - Ethernet II only; ARP and anything that is neither IPv4 nor IPv6 are reported as such and
//!   the caller decides (VLAN tags are *not* walked: a tagged frame is "not IP").
//! - IPv4 with options (IHL honoured). Non-first fragments carry no L4 header; they are
//!   classified with ports 0.
//! - IPv6: the fixed header, then at most one Hop-by-Hop Options header (MLD reports carry
//!   one). Other extension headers are not walked: a packet whose (next) Next Header is, say,
//!   Routing (43), Fragment (44) or Destination Options (60) is classified with that protocol
//!   number and ports 0, so under enforcement only a protocol-any rule lets it through.
//! - TCP/UDP: source and destination port. ICMP/ICMPv6: type and code (as the "port"
//!   `type << 8 | code`), plus the echo identifier for echo request/reply.

use aya_ebpf::bindings::__sk_buff;
use aya_ebpf::programs::TcContext;
use sluice_common::{FAMILY_V4, FAMILY_V6, PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP, PROTO_UDP};

/// Ethernet header length.
pub(crate) const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const ETH_P_ARP: u16 = 0x0806;
/// IPv6 Hop-by-Hop Options extension header.
const IPPROTO_HOPOPTS: u8 = 0;

/// A parsed IP packet, addresses as 16 bytes (IPv4 v4-mapped).
pub(crate) struct Packet {
    pub(crate) family: u8,
    pub(crate) proto: u8,
    pub(crate) src: [u8; 16],
    pub(crate) dst: [u8; 16],
    /// Host order; 0 when the protocol has none or the packet is a non-first fragment.
    pub(crate) sport: u16,
    /// Host order; ICMP: `type << 8 | code`.
    pub(crate) dport: u16,
    /// ICMP echo identifier (host order) for echo request/reply, else 0.
    pub(crate) echo_id: u16,
    /// An IPv4 fragment (first or not; IPv6 fragments show as protocol 44). The same-host
    /// fast path leaves fragments to the bridge.
    pub(crate) fragment: bool,
}

impl Packet {
    pub(crate) const EMPTY: Self = Self {
        family: 0,
        proto: 0,
        src: [0; 16],
        dst: [0; 16],
        sport: 0,
        dport: 0,
        echo_id: 0,
        fragment: false,
    };
}

/// What the frame is.
pub(crate) enum Frame {
    /// IPv4 or IPv6, parsed into the caller's [`Packet`].
    Ip,
    /// ARP, IPv6 neighbour discovery (ICMPv6 133–136) or MLD (ICMPv6 130–132, 143):
    /// link-local control traffic that always passes.
    Neighbour,
    /// Another ethertype.
    NotIp,
}

/// A header the verdict needs is missing, truncated or inconsistent.
pub(crate) struct Malformed;

#[inline(always)]
fn load<T>(ctx: &TcContext, offset: usize) -> Result<T, Malformed> {
    ctx.load::<T>(offset).map_err(|_| Malformed)
}

/// Parses the frame of `skb` that starts `base` bytes in (0, or past the outer headers of a
/// VXLAN packet) into `pkt`. Not inlined: a BPF function of its own keeps the header buffers
/// in their own stack frame (the verifier allows 512 bytes per call chain).
#[inline(never)]
pub(crate) fn parse(
    skb: *mut __sk_buff,
    base: usize,
    pkt: &mut Packet,
) -> Result<Frame, Malformed> {
    let ctx = TcContext::new(skb);
    let ethertype: [u8; 2] = load(&ctx, base + 12)?;
    match u16::from_be_bytes(ethertype) {
        ETH_P_IP => parse_v4(&ctx, base + ETH_HLEN, pkt),
        ETH_P_IPV6 => parse_v6(&ctx, base + ETH_HLEN, pkt),
        ETH_P_ARP => Ok(Frame::Neighbour),
        _ => Ok(Frame::NotIp),
    }
}

#[inline(always)]
fn parse_v4(ctx: &TcContext, l3: usize, pkt: &mut Packet) -> Result<Frame, Malformed> {
    let h: [u8; 20] = load(ctx, l3)?;
    if h[0] >> 4 != 4 {
        return Err(Malformed);
    }
    let ihl = usize::from(h[0] & 0x0f) * 4;
    if ihl < 20 {
        return Err(Malformed);
    }
    pkt.family = FAMILY_V4;
    pkt.proto = h[9];
    pkt.src[10] = 0xff;
    pkt.src[11] = 0xff;
    pkt.src[12..16].copy_from_slice(&h[12..16]);
    pkt.dst[10] = 0xff;
    pkt.dst[11] = 0xff;
    pkt.dst[12..16].copy_from_slice(&h[16..20]);
    let flags_offset = u16::from_be_bytes([h[6], h[7]]);
    let fragment_offset = flags_offset & 0x1fff;
    // More Fragments, or an offset: part of a fragmented datagram.
    pkt.fragment = flags_offset & 0x2000 != 0 || fragment_offset != 0;
    if fragment_offset != 0 {
        return Ok(Frame::Ip);
    }
    parse_l4(ctx, l3 + ihl, pkt)
}

#[inline(always)]
fn parse_v6(ctx: &TcContext, l3: usize, pkt: &mut Packet) -> Result<Frame, Malformed> {
    // Version/class/flow (4), payload length (2), next header, hop limit; then the addresses.
    let h: [u8; 8] = load(ctx, l3)?;
    if h[0] >> 4 != 6 {
        return Err(Malformed);
    }
    pkt.family = FAMILY_V6;
    pkt.src = load(ctx, l3 + 8)?;
    pkt.dst = load(ctx, l3 + 24)?;
    let mut proto = h[6];
    let mut offset = l3 + 40;
    if proto == IPPROTO_HOPOPTS {
        // Next Header, and the length in 8-octet units not counting the first 8.
        let ext: [u8; 2] = load(ctx, offset)?;
        proto = ext[0];
        offset += (usize::from(ext[1]) + 1) * 8;
    }
    pkt.proto = proto;
    parse_l4(ctx, offset, pkt)
}

#[inline(always)]
fn parse_l4(ctx: &TcContext, offset: usize, pkt: &mut Packet) -> Result<Frame, Malformed> {
    match pkt.proto {
        PROTO_TCP | PROTO_UDP => {
            let ports: [u8; 4] = load(ctx, offset)?;
            pkt.sport = u16::from_be_bytes([ports[0], ports[1]]);
            pkt.dport = u16::from_be_bytes([ports[2], ports[3]]);
        }
        PROTO_ICMP | PROTO_ICMPV6 => {
            // type, code, checksum, and the echo identifier.
            let icmp: [u8; 6] = load(ctx, offset)?;
            let (ty, code) = (icmp[0], icmp[1]);
            let v6 = pkt.proto == PROTO_ICMPV6;
            if v6 && matches!(ty, 130..=136 | 143) {
                return Ok(Frame::Neighbour);
            }
            let echo = if v6 {
                ty == 128 || ty == 129
            } else {
                ty == 0 || ty == 8
            };
            pkt.dport = u16::from_be_bytes([ty, code]);
            if echo {
                pkt.echo_id = u16::from_be_bytes([icmp[4], icmp[5]]);
            }
        }
        _ => {}
    }
    Ok(Frame::Ip)
}
