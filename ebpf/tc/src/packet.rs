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

use core::mem::MaybeUninit;

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

/// A parsed IP packet, addresses as 16 bytes (IPv4 v4-mapped). [`parse`] writes it whole
/// into the caller's uninitialised slot, never zero-filled first: this toolchain turns any
/// zero-fill of a struct into a call to an out-of-line, byte-at-a-time `memset` (issue 6:
/// one per parse showed in the VXLAN profile).
#[repr(C, align(8))]
pub(crate) struct Packet {
    pub(crate) src: [u8; 16],
    pub(crate) dst: [u8; 16],
    /// Host order; 0 when the protocol has none or the packet is a non-first fragment.
    pub(crate) sport: u16,
    /// Host order; ICMP: `type << 8 | code`.
    pub(crate) dport: u16,
    /// ICMP echo identifier (host order) for echo request/reply, else 0.
    pub(crate) echo_id: u16,
    pub(crate) family: u8,
    pub(crate) proto: u8,
    /// An IPv4 fragment (first or not; IPv6 fragments show as protocol 44). The same-host
    /// fast path leaves fragments to the bridge.
    pub(crate) fragment: bool,
    /// The destination MAC is unicast (group bit clear): broadcast and multicast frames
    /// take the bridge, which floods them.
    pub(crate) unicast: bool,
}

/// What the frame is. (Fieldless: a non-inlined BPF function's signature must have BTF the
/// kernel accepts, which a Rust enum with data does not.)
pub(crate) enum Frame {
    /// IPv4 or IPv6, parsed into the caller's [`Packet`].
    Ip,
    /// ARP, IPv6 neighbour discovery (ICMPv6 133–136) or MLD (ICMPv6 130–132, 143):
    /// link-local control traffic that always passes.
    Neighbour,
    /// Another ethertype.
    NotIp,
}

/// The ports of [`Packet`], or a neighbour-discovery frame.
enum L4 {
    Ports {
        sport: u16,
        dport: u16,
        echo_id: u16,
    },
    Neighbour,
}

/// A header the verdict needs is missing, truncated or inconsistent.
pub(crate) struct Malformed;

#[inline(always)]
fn load<T>(ctx: &TcContext, offset: usize) -> Result<T, Malformed> {
    ctx.load::<T>(offset).map_err(|_| Malformed)
}

/// Ethernet, an IPv4 header without options and the 8 bytes after it (TCP/UDP ports, ICMP
/// type, code, checksum and echo identifier): the common frame, which [`parse`] reads with
/// one `bpf_skb_load_bytes` instead of three.
const V4_COMMON: usize = ETH_HLEN + 20 + 8;

/// Parses the frame of `skb` that starts `base` bytes in (0, or past the outer headers of a
/// VXLAN packet); `Ok(Frame::Ip)` has written `pkt`, nothing else does. Not inlined: a BPF
/// function of its own keeps the header buffers in their own stack frame (the verifier
/// allows 512 bytes per call chain).
#[inline(never)]
pub(crate) fn parse(
    skb: *mut __sk_buff,
    base: usize,
    pkt: &mut MaybeUninit<Packet>,
) -> Result<Frame, Malformed> {
    let ctx = TcContext::new(skb);
    if let Ok(h) = ctx.load::<[u8; V4_COMMON]>(base)
        && u16::from_be_bytes([h[12], h[13]]) == ETH_P_IP
        && h[ETH_HLEN] == 0x45
    {
        let ip = ETH_HLEN;
        let l4 = [
            h[ip + 20],
            h[ip + 21],
            h[ip + 22],
            h[ip + 23],
            h[ip + 24],
            h[ip + 25],
        ];
        return v4_packet(&h, ip, h[0] & 1 == 0, pkt, |proto| Ok(decode_l4(proto, l4)));
    }
    // Anything else (IPv6, IPv4 options, a short frame): header by header.
    let eth: [u8; ETH_HLEN] = load(&ctx, base)?;
    let unicast = eth[0] & 1 == 0;
    match u16::from_be_bytes([eth[12], eth[13]]) {
        ETH_P_IP => parse_v4(&ctx, base + ETH_HLEN, unicast, pkt),
        ETH_P_IPV6 => parse_v6(&ctx, base + ETH_HLEN, unicast, pkt),
        ETH_P_ARP => Ok(Frame::Neighbour),
        _ => Ok(Frame::NotIp),
    }
}

/// `::ffff:a.b.c.d`, written as two words (no zero-filled temporary, see [`Packet`]).
#[inline(always)]
fn v4_mapped(addr: [u8; 4]) -> [u8; 16] {
    (0xffff_u128 << 32 | u128::from(u32::from_be_bytes(addr))).to_be_bytes()
}

#[inline(always)]
fn parse_v4(
    ctx: &TcContext,
    l3: usize,
    unicast: bool,
    pkt: &mut MaybeUninit<Packet>,
) -> Result<Frame, Malformed> {
    let h: [u8; 20] = load(ctx, l3)?;
    if h[0] >> 4 != 4 {
        return Err(Malformed);
    }
    let ihl = usize::from(h[0] & 0x0f) * 4;
    if ihl < 20 {
        return Err(Malformed);
    }
    v4_packet(&h, 0, unicast, pkt, |proto| parse_l4(ctx, l3 + ihl, proto))
}

/// Writes the [`Packet`] of the IPv4 header at `h[ip..ip + 20]` (checked: version 4, a valid
/// IHL) to `pkt`; `l4` reads what follows it, unless the packet is a non-first fragment
/// (ports 0).
#[inline(always)]
fn v4_packet<const N: usize>(
    h: &[u8; N],
    ip: usize,
    unicast: bool,
    pkt: &mut MaybeUninit<Packet>,
    l4: impl FnOnce(u8) -> Result<L4, Malformed>,
) -> Result<Frame, Malformed> {
    let proto = h[ip + 9];
    let flags_offset = u16::from_be_bytes([h[ip + 6], h[ip + 7]]);
    let fragment_offset = flags_offset & 0x1fff;
    // More Fragments, or an offset: part of a fragmented datagram.
    let fragment = flags_offset & 0x2000 != 0 || fragment_offset != 0;
    let l4 = if fragment_offset != 0 {
        L4::Ports {
            sport: 0,
            dport: 0,
            echo_id: 0,
        }
    } else {
        l4(proto)?
    };
    let L4::Ports {
        sport,
        dport,
        echo_id,
    } = l4
    else {
        return Ok(Frame::Neighbour);
    };
    pkt.write(Packet {
        src: v4_mapped([h[ip + 12], h[ip + 13], h[ip + 14], h[ip + 15]]),
        dst: v4_mapped([h[ip + 16], h[ip + 17], h[ip + 18], h[ip + 19]]),
        sport,
        dport,
        echo_id,
        family: FAMILY_V4,
        proto,
        fragment,
        unicast,
    });
    Ok(Frame::Ip)
}

#[inline(always)]
fn parse_v6(
    ctx: &TcContext,
    l3: usize,
    unicast: bool,
    pkt: &mut MaybeUninit<Packet>,
) -> Result<Frame, Malformed> {
    // Version/class/flow (4), payload length (2), next header, hop limit; then the addresses.
    let h: [u8; 8] = load(ctx, l3)?;
    if h[0] >> 4 != 6 {
        return Err(Malformed);
    }
    let src = load(ctx, l3 + 8)?;
    let dst = load(ctx, l3 + 24)?;
    let mut proto = h[6];
    let mut offset = l3 + 40;
    if proto == IPPROTO_HOPOPTS {
        // Next Header, and the length in 8-octet units not counting the first 8.
        let ext: [u8; 2] = load(ctx, offset)?;
        proto = ext[0];
        offset += (usize::from(ext[1]) + 1) * 8;
    }
    let L4::Ports {
        sport,
        dport,
        echo_id,
    } = parse_l4(ctx, offset, proto)?
    else {
        return Ok(Frame::Neighbour);
    };
    pkt.write(Packet {
        src,
        dst,
        sport,
        dport,
        echo_id,
        family: FAMILY_V6,
        proto,
        fragment: false,
        unicast,
    });
    Ok(Frame::Ip)
}

#[inline(always)]
fn parse_l4(ctx: &TcContext, offset: usize, proto: u8) -> Result<L4, Malformed> {
    match proto {
        PROTO_TCP | PROTO_UDP => {
            let p: [u8; 4] = load(ctx, offset)?;
            Ok(decode_l4(proto, [p[0], p[1], p[2], p[3], 0, 0]))
        }
        // type, code, checksum, and the echo identifier.
        PROTO_ICMP | PROTO_ICMPV6 => Ok(decode_l4(proto, load(ctx, offset)?)),
        _ => Ok(decode_l4(proto, [0; 6])),
    }
}

/// The ports (TCP, UDP), or type, code and echo identifier (ICMP), in the first 6 bytes of
/// the L4 header `l4`; zeros for other protocols.
#[inline(always)]
fn decode_l4(proto: u8, l4: [u8; 6]) -> L4 {
    match proto {
        PROTO_TCP | PROTO_UDP => L4::Ports {
            sport: u16::from_be_bytes([l4[0], l4[1]]),
            dport: u16::from_be_bytes([l4[2], l4[3]]),
            echo_id: 0,
        },
        PROTO_ICMP | PROTO_ICMPV6 => {
            let (ty, code) = (l4[0], l4[1]);
            let v6 = proto == PROTO_ICMPV6;
            if v6 && matches!(ty, 130..=136 | 143) {
                return L4::Neighbour;
            }
            let echo = if v6 {
                ty == 128 || ty == 129
            } else {
                ty == 0 || ty == 8
            };
            L4::Ports {
                sport: 0,
                dport: u16::from_be_bytes([ty, code]),
                echo_id: if echo {
                    u16::from_be_bytes([l4[4], l4[5]])
                } else {
                    0
                },
            }
        }
        _ => L4::Ports {
            sport: 0,
            dport: 0,
            echo_id: 0,
        },
    }
}
