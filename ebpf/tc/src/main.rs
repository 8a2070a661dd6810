// SPDX-License-Identifier: GPL-2.0 OR MIT
//! sluice's TC programs, attached through TCX to the **host** end of each endpoint's veth:
//!
//! | program | TCX hook on the host veth | sees what the container | applies its |
//! | --- | --- | --- | --- |
//! | [`sluice_egress`] | ingress | sends | egress policy |
//! | [`sluice_ingress`] | egress | receives | ingress policy |
//!
//! `mode=vxlan`: [`sluice_overlay`] on the TCX ingress hook of the network's VXLAN device
//! delivers frames from remote endpoints straight to local ones (the fast path, below). With
//! an IPv4 underlay the programs skip the device too: the sender's program encapsulates
//! ([`encapsulate`]) and sends out of the underlay, and [`sluice_underlay`] on the
//! underlay's TCX ingress hook decapsulates for local endpoints.
//!
//! macvlan endpoints have no host-side peer: [`sluice_sandbox_egress`] (TCX egress) and
//! [`sluice_sandbox_ingress`] (TCX ingress) run the same checks on the container's own
//! interface, and drop everything on an interface missing from `ENDPOINTS` (fail closed).
//!
//! Per packet, in order (the map layouts are in `sluice-common`):
//! 1. `ENDPOINTS[skb->ifindex]` (hash). Missing: not a sluice endpoint, pass uncounted.
//! 2. Parse. ARP, IPv6 ND and MLD pass. Other non-IP frames pass unless the direction is enforced
//!    or the identity is pending. A truncated or malformed IP header is dropped.
//! 3. Identity pending: drop. Sent from an address that is not the endpoint's (with
//!    `EP_SOURCE_CHECK`): drop. No isolation and no policy on this endpoint: pass.
//! 4. `IPCACHE[peer address]` (LPM trie; miss = WORLD, network 0). Isolation on and the peer
//!    is an endpoint of another network: drop.
//! 5. No policy on this endpoint in either direction (isolation only): pass, no conntrack.
//! 6. `CONNTRACK[flow as seen by this endpoint]` (LRU hash). Hit: pass (replies and
//!    established flows).
//! 7. Direction not enforced: create the conntrack entry (so the replies pass the other
//!    direction's enforcement) and pass.
//! 8. `POLICY[policy subject, peer identity, dir, proto, port]` (LPM trie), and unless that said
//!    deny, `POLICY[subject, ANY, dir, proto, port]`. Deny from either wins; else allow from
//!    either allows (and creates the conntrack entry); else default deny.
//!
//! 9. Allowed, on a host veth, sent by the container (fast path): to an endpoint of the same
//!    network on this host (`LOCAL`), unless the flow's request came through the host
//!    (`BRIDGED`), the receiver's ingress policy is step 3–8 here and the packet is
//!    `bpf_redirect_peer`ed into the receiver's namespace. Received through the bridge from
//!    such an endpoint: the flow goes into `BRIDGED`.
//!
//! Every verdict bumps `COUNTERS[counter_index(endpoint's slot, dir, verdict)]` (per-CPU
//! array); every drop emits a `DropEvent` to `EVENTS` if the per-CPU token bucket
//! (`EVENT_RATE`, `SETTINGS`) allows.
//! So a packet costs at most: `ENDPOINTS` (hash), `IPCACHE` (LPM), `CONNTRACK` (LRU hash),
//! two `POLICY` lookups (LPM), one `CONNTRACK` insert and one `COUNTERS` update, plus
//! `SETTINGS`, `EVENT_RATE` and a ring-buffer reserve on drops, whatever the number of rules:
//! rules are never iterated here. Under `BPF_PROG_TEST_RUN` that is ~30 ns for a
//! non-endpoint, ~110 ns without policy, ~170 ns for an established flow and ~270–330 ns for a
//! policy drop, the same with 1k, 10k or 100k `POLICY` entries
//! (tests/tests/datapath_privileged.rs, bench).
//!
//! Stack: the verifier allows 512 bytes per call chain and LLVM's BPF backend reuses stack
//! slots poorly, so parsing, deciding and event reporting are separate BPF functions
//! (`#[inline(never)]`), each with its own frame (entry ~88 B + at most ~160 B).

#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

#[cfg(target_arch = "bpf")]
mod packet;

#[cfg(target_arch = "bpf")]
mod programs {
    use aya_ebpf::bindings::{
        BPF_ANY, BPF_CSUM_LEVEL_QUERY, BPF_F_ADJ_ROOM_ENCAP_L2_ETH, BPF_F_ADJ_ROOM_ENCAP_L3_IPV4,
        BPF_F_ADJ_ROOM_ENCAP_L4_UDP, BPF_FIB_LKUP_RET_SUCCESS, BPF_FIB_LOOKUP_OUTPUT, TC_ACT_OK,
        TC_ACT_SHOT, bpf_adj_room_mode::BPF_ADJ_ROOM_MAC, bpf_fib_lookup as FibLookup,
    };
    use aya_ebpf::helpers::{
        bpf_csum_level, bpf_fib_lookup, bpf_get_hash_recalc, bpf_get_prandom_u32, bpf_ktime_get_ns,
        bpf_redirect, bpf_redirect_peer, bpf_skb_load_bytes, bpf_skb_store_bytes,
    };
    use aya_ebpf::macros::{classifier, map};
    use aya_ebpf::maps::lpm_trie::Key;
    use aya_ebpf::maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, RingBuf};
    use aya_ebpf::programs::TcContext;
    use sluice_common::{
        CounterValue, CtKey, CtValue, DEFAULT_EVENTS_BURST, DEFAULT_EVENTS_BYTES,
        DEFAULT_EVENTS_PER_SEC, DEFAULT_MAX_BRIDGED, DEFAULT_MAX_CONNTRACK, DEFAULT_MAX_COUNTERS,
        DEFAULT_MAX_ENDPOINTS, DEFAULT_MAX_IPCACHE, DEFAULT_MAX_NEIGH, DEFAULT_MAX_OVERLAY,
        DEFAULT_MAX_POLICY, DEFAULT_MAX_VTEPS, DIR_EGRESS, DIR_INGRESS, Decap, DropEvent,
        EP_EGRESS_ENFORCED, EP_IDENTITY_PENDING, EP_INGRESS_ENFORCED, EP_ISOLATE, EP_SOURCE_CHECK,
        EndpointInfo, FAMILY_V4, IDENTITY_ANY, IDENTITY_WORLD, IpInfo, IpKey, NEIGH_TTL_NS, Neigh,
        POLICY_PREFIX_FULL, PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP, PROTO_UDP, PolicyKey, PolicyValue,
        REASON_DEFAULT_DENY, REASON_IDENTITY_PENDING, REASON_ISOLATION, REASON_MALFORMED,
        REASON_NOT_IP, REASON_POLICY_DENY, REASON_SPOOFED, RateState, Settings, Tunnel,
        VERDICT_ALLOW, VERDICT_DENY, Vtep, counter_index, decap_key, neigh_key,
    };

    use core::mem::MaybeUninit;

    use crate::packet::{ETH_HLEN, Frame, Packet, parse};

    #[map]
    static ENDPOINTS: HashMap<u32, EndpointInfo> =
        HashMap::with_max_entries(DEFAULT_MAX_ENDPOINTS, 0);

    #[map]
    static IPCACHE: LpmTrie<IpKey, IpInfo> = LpmTrie::with_max_entries(DEFAULT_MAX_IPCACHE, 0);

    #[map]
    static POLICY: LpmTrie<PolicyKey, PolicyValue> =
        LpmTrie::with_max_entries(DEFAULT_MAX_POLICY, 0);

    #[map]
    static CONNTRACK: LruHashMap<CtKey, CtValue> =
        LruHashMap::with_max_entries(DEFAULT_MAX_CONNTRACK, 0);

    #[map]
    static COUNTERS: PerCpuArray<CounterValue> =
        PerCpuArray::with_max_entries(DEFAULT_MAX_COUNTERS, 0);

    /// Endpoint address on this host → its host veth's ifindex (the fast path; empty = off).
    #[map]
    static LOCAL: HashMap<IpKey, u32> = HashMap::with_max_entries(2 * DEFAULT_MAX_ENDPOINTS, 0);

    // --- fast path (issue 6): see `sluice_common::MAP_BRIDGED` / `MAP_OVERLAY` ---
    /// Flows (as the replying endpoint sees them) whose requests came through the host.
    #[map]
    static BRIDGED: LruHashMap<CtKey, u64> = LruHashMap::with_max_entries(DEFAULT_MAX_BRIDGED, 0);

    /// VXLAN device ifindex → its network's number.
    #[map]
    static OVERLAY: HashMap<u32, u32> = HashMap::with_max_entries(DEFAULT_MAX_OVERLAY, 0);

    /// Network number → its tunnel (VXLAN device, VNI, port, underlay).
    #[map]
    static TUNNELS: HashMap<u32, Tunnel> = HashMap::with_max_entries(DEFAULT_MAX_OVERLAY, 0);

    /// Remote endpoint address → its network and host's tunnel address.
    #[map]
    static VTEPS: HashMap<IpKey, Vtep> = HashMap::with_max_entries(DEFAULT_MAX_VTEPS, 0);

    /// `neigh_key(underlay, VTEP)` → the underlay's next hop, cached for `encapsulate`.
    #[map]
    static NEIGH: LruHashMap<u64, Neigh> = LruHashMap::with_max_entries(DEFAULT_MAX_NEIGH, 0);

    /// `decap_key(port, VNI)` → network number and local tunnel address: the tunnels
    /// `sluice_underlay` decapsulates.
    #[map]
    static DECAP: HashMap<u64, Decap> = HashMap::with_max_entries(DEFAULT_MAX_OVERLAY, 0);
    // --- end fast path ---

    #[map]
    static EVENTS: RingBuf = RingBuf::with_byte_size(DEFAULT_EVENTS_BYTES, 0);

    #[map]
    static SETTINGS: Array<Settings> = Array::with_max_entries(1, 0);

    #[map]
    static EVENT_RATE: PerCpuArray<RateState> = PerCpuArray::with_max_entries(1, 0);

    /// [`fast_path`]'s "not for me": the packet takes the bridge (`TC_ACT_UNSPEC`).
    const NOT_FAST: i32 = -1;

    const NS_PER_SEC: u64 = 1_000_000_000;
    /// Refill at most this much idle time, so `elapsed * rate` cannot overflow.
    const MAX_REFILL_NS: u64 = 10 * NS_PER_SEC;

    /// Attach to the host veth's TCX **ingress**: what the container sends.
    #[classifier]
    fn sluice_egress(ctx: TcContext) -> i32 {
        match classify(&ctx, DIR_EGRESS, true) {
            Ok(action) => action,
            Err(action) => action,
        }
    }

    /// Attach to the host veth's TCX **egress**: what the container receives.
    #[classifier]
    fn sluice_ingress(ctx: TcContext) -> i32 {
        match classify(&ctx, DIR_INGRESS, true) {
            Ok(action) => action,
            Err(action) => action,
        }
    }

    /// macvlan: attach to the TCX **egress** hook of the container's own interface (there is
    /// no host-side peer), which sees what the container sends. Unlike [`sluice_egress`], an
    /// interface missing from `ENDPOINTS` drops (fail closed): these programs only ever sit on
    /// sluice endpoints, and a miss means the entry is not (or no longer) there.
    #[classifier]
    fn sluice_sandbox_egress(ctx: TcContext) -> i32 {
        classify_sandboxed(&ctx, DIR_EGRESS)
    }

    /// macvlan: attach to the TCX **ingress** hook of the container's own interface: what
    /// the container receives. Fails closed like [`sluice_sandbox_egress`].
    #[classifier]
    fn sluice_sandbox_ingress(ctx: TcContext) -> i32 {
        classify_sandboxed(&ctx, DIR_INGRESS)
    }

    #[inline(always)]
    fn classify_sandboxed(ctx: &TcContext, dir: u8) -> i32 {
        // SAFETY: as in `classify`: a plain context read the verifier permits.
        let ifindex = unsafe { (*ctx.skb.skb).ifindex };
        if endpoint(ifindex).is_none() {
            return TC_ACT_SHOT;
        }
        // No fast path here: bpf_redirect_peer needs a veth and the TC ingress hook.
        match classify(ctx, dir, false) {
            Ok(action) => action,
            Err(action) => action,
        }
    }

    /// Why a packet is dropped, for counters and events.
    struct Denied {
        reason: u8,
        rule_id: u32,
    }

    const fn drop(reason: u8) -> Denied {
        Denied { reason, rule_id: 0 }
    }

    /// `Ok(TC_ACT_OK)` or `Err(TC_ACT_SHOT)`, with the counter bumped and the event sent;
    /// `Ok(TC_ACT_REDIRECT)` when the fast path took the packet. `veth`: the program sits on
    /// an endpoint's host-side veth (the fast path applies).
    #[inline(always)]
    fn classify(ctx: &TcContext, dir: u8, veth: bool) -> Result<i32, i32> {
        // SAFETY: `ctx.skb.skb` is the `__sk_buff` context pointer the kernel passed to this
        // program; reading `ifindex` from it is a plain context access the verifier permits
        // for SCHED_CLS programs.
        let ifindex = unsafe { (*ctx.skb.skb).ifindex };
        let Some(ep) = endpoint(ifindex) else {
            return Ok(TC_ACT_OK);
        };
        let len = u64::from(ctx.len());
        let mut slot = MaybeUninit::<Packet>::uninit();
        let frame = parse(ctx.skb.skb, 0, &mut slot);
        let pkt = match frame {
            // SAFETY: `parse` returns `Frame::Ip` only after writing the packet.
            Ok(Frame::Ip) => Some(unsafe { slot.assume_init_ref() }),
            _ => None,
        };
        let verdict = match (frame, pkt) {
            (Ok(Frame::Ip), Some(pkt)) => decide(ep, ifindex, dir, pkt),
            (Ok(Frame::Neighbour), _) => Ok(()),
            (Ok(Frame::NotIp), _) => {
                let strict = enforced_flag(dir) | EP_IDENTITY_PENDING;
                if ep.flags & strict == 0 {
                    Ok(())
                } else {
                    Err(drop(REASON_NOT_IP))
                }
            }
            (Ok(Frame::Ip), None) | (Err(_), _) => Err(drop(REASON_MALFORMED)),
        };
        match verdict {
            Ok(()) => {
                count(ep, dir, VERDICT_ALLOW, len);
                if veth && let Some(pkt) = pkt {
                    if dir == DIR_EGRESS {
                        let action = fast_path(ctx.skb.skb, ep, ifindex, pkt);
                        if action != NOT_FAST {
                            return Ok(action);
                        }
                    } else {
                        note_bridged(ep, ifindex, pkt);
                    }
                }
                Ok(TC_ACT_OK)
            }
            Err(why) => {
                count(ep, dir, VERDICT_DENY, len);
                emit_drop(ifindex, dir, &why, pkt);
                Err(TC_ACT_SHOT)
            }
        }
    }

    // --- fast path (issue 6) ---

    /// The same-host fast path, for an IP packet the sender's egress policy allowed: when its
    /// destination is an endpoint on the same network of this host (`LOCAL`), [`deliver`]
    /// judges it with the receiver's ingress policy and hands it straight to the receiver's
    /// namespace, skipping the bridge and the receiver's host veth. Left to the bridge
    /// ([`NOT_FAST`]): ARP, broadcast, multicast, fragments, ICMP errors and protocols other
    /// than TCP, UDP and ICMP echo, other networks (routed through the gateway), the gateway,
    /// the host and the world, and replies of flows whose requests came through the host
    /// (`BRIDGED`: a DNAT the host must undo). (At most five arguments and no `Option`
    /// return: BPF functions take no stack arguments.)
    #[inline(never)]
    fn fast_path(
        skb: *mut aya_ebpf::bindings::__sk_buff,
        ep: &EndpointInfo,
        ifindex: u32,
        pkt: &Packet,
    ) -> i32 {
        if !fast_eligible(pkt) {
            return NOT_FAST;
        }
        let Some((peer_ifindex, peer)) = local_endpoint(&pkt.dst, ep.network) else {
            return to_tunnel(skb, ep.network, pkt);
        };
        if peer_ifindex == ifindex {
            return NOT_FAST;
        }
        if BRIDGED.get_ptr(&ct_key(ifindex, DIR_EGRESS, pkt)).is_some() {
            return NOT_FAST;
        }
        deliver(skb, peer_ifindex, peer, pkt, None)
    }

    /// `mode=vxlan`: a packet to an endpoint of the same network on another host (`VTEPS`)
    /// skips the bridge: [`encapsulate`]d here and sent out of the underlay when it can be,
    /// else handed to the network's VXLAN device (`TUNNELS`), which encapsulates it. The
    /// receiver's ingress policy is applied on its own host.
    #[inline(never)]
    fn to_tunnel(skb: *mut aya_ebpf::bindings::__sk_buff, network: u32, pkt: &Packet) -> i32 {
        // SAFETY: reads of this program's own maps; the values stay valid for the run (RCU).
        let (Some(tunnel), Some(vtep)) = (unsafe { TUNNELS.get(&network) }, unsafe {
            VTEPS.get(&IpKey { addr: pkt.dst })
        }) else {
            return NOT_FAST;
        };
        if vtep.network != network {
            return NOT_FAST;
        }
        if !pkt.unicast {
            return NOT_FAST;
        }
        if tunnel.underlay != 0 && vtep.ipv4 != [0; 4] && pkt.family == FAMILY_V4 {
            let action = encapsulate(skb, tunnel, vtep.ipv4);
            if action != NOT_FAST {
                return action;
            }
        }
        // SAFETY: bpf_redirect only records the target device; the kernel transmits there.
        let action = unsafe { bpf_redirect(tunnel.device, 0) };
        i32::try_from(action).unwrap_or(TC_ACT_SHOT)
    }

    /// Outer IPv4 + UDP + VXLAN header, and the inner Ethernet header they precede.
    const VXLAN_ROOM: usize = 20 + 8 + 8 + ETH_HLEN;
    const ETH_P_IP: u16 = 0x0800;
    const IPPROTO_UDP: u8 = 17;
    const AF_INET: u8 = 2;
    /// VXLAN flags word: the I flag (a valid VNI), nothing else.
    const VXLAN_FLAGS: [u8; 4] = [0x08, 0, 0, 0];
    /// The kernel's default local port range, from which a VXLAN device picks source ports.
    const SPORT_MIN: u64 = 32_768;
    const SPORT_MAX: u64 = 60_999;

    /// The headers [`encapsulate`] writes in front of the inner frame ([`OUTER_WRITTEN`]
    /// bytes), built in place field by field: this toolchain turns a zero-filled buffer into
    /// a call to an out-of-line, byte-at-a-time `memset`, and a struct literal of this size
    /// into a spill of every byte (issue 6: both showed in the VXLAN profile).
    #[repr(C)]
    struct Outer {
        dmac: [u8; 6],
        smac: [u8; 6],
        ethertype: [u8; 2],
        ver_tos: [u8; 2],
        ip_len: [u8; 2],
        id: [u8; 2],
        frag: [u8; 2],
        ttl_proto: [u8; 2],
        ip_csum: [u8; 2],
        saddr: [u8; 4],
        daddr: [u8; 4],
        sport: [u8; 2],
        dport: [u8; 2],
        udp_len: [u8; 2],
        udp_csum: [u8; 2],
        vxlan_flags: [u8; 4],
        vni: [u8; 4],
        /// The inner Ethernet header, loaded in place, and the inner IPv4 header's version
        /// and TOS bytes (read for the outer TOS, not written back).
        inner: [u8; ETH_HLEN + 2],
    }
    /// Bytes of [`Outer`] written to the packet: all but the inner IPv4 header's two.
    const OUTER_WRITTEN: usize = ETH_HLEN + VXLAN_ROOM;
    const _: () = assert!(core::mem::size_of::<Outer>() == OUTER_WRITTEN + 2);

    /// Encapsulates an IPv4 frame as the network's VXLAN device would (same VNI, port,
    /// TTL 64, no DF, ECN copied, source port from the flow hash in the kernel's default
    /// range), except for the UDP checksum: 0, as RFC 7348 recommends and every receiver
    /// accepts (the kernel device computes one by default) and redirects it to the underlay's
    /// egress. [`NOT_FAST`] with the packet untouched when the route to the VTEP does not
    /// leave through the underlay, its neighbour is not resolved yet, the packet is GSO or
    /// would exceed the underlay's MTU: the VXLAN device handles those (and resolves the
    /// neighbour).
    #[inline(never)]
    fn encapsulate(skb: *mut aya_ebpf::bindings::__sk_buff, tunnel: &Tunnel, vtep: [u8; 4]) -> i32 {
        let ctx = TcContext::new(skb);
        // SAFETY: plain context reads the verifier permits for SCHED_CLS programs.
        let gso_size = unsafe { (*skb).gso_size };
        if gso_size != 0 {
            return NOT_FAST;
        }
        // Outer IP total length: IP 20 + UDP 8 + VXLAN 8 + the whole inner frame.
        let ip_len = 36 + ctx.len() as usize;
        if ip_len > tunnel.mtu as usize || ip_len > 0xffff {
            return NOT_FAST;
        }
        let Some(hop) = next_hop(skb, tunnel, vtep) else {
            return NOT_FAST;
        };
        // SAFETY: no preconditions; the hash is the skb's flow hash.
        let mut hash = unsafe { bpf_get_hash_recalc(skb) };
        hash ^= hash << 16;
        let sport = ((u64::from(hash) * (SPORT_MAX - SPORT_MIN)) >> 32) + SPORT_MIN;
        // SAFETY: no preconditions.
        let id = unsafe { bpf_get_prandom_u32() } as u16;

        let mut outer = MaybeUninit::<Outer>::uninit();
        let h = outer.as_mut_ptr();
        // SAFETY: `h` points at this frame's `outer`, `inner` is in it; the helper writes at
        // most the given length there, and fails on a frame shorter than that.
        let loaded = unsafe {
            bpf_skb_load_bytes(
                skb.cast(),
                0,
                core::ptr::addr_of_mut!((*h).inner).cast(),
                (ETH_HLEN + 2) as u32,
            )
        };
        if loaded != 0 {
            return NOT_FAST;
        }
        // SAFETY: just loaded.
        let inner_tos = unsafe { (*h).inner[ETH_HLEN + 1] };
        // ECN as `INET_ECN_encapsulate`: copied, but CE becomes ECT(0).
        let ecn = inner_tos & 3;
        let tos = if ecn == 3 { 2 } else { ecn };
        let ver_tos = 0x4500 | u16::from(tos);
        let ttl_proto = 64 << 8 | u16::from(IPPROTO_UDP);
        let local = tunnel.local;
        let csum = !fold(
            u32::from(ver_tos)
                + ip_len as u32
                + u32::from(id)
                + u32::from(ttl_proto)
                + u32::from(u16::from_be_bytes([local[0], local[1]]))
                + u32::from(u16::from_be_bytes([local[2], local[3]]))
                + u32::from(u16::from_be_bytes([vtep[0], vtep[1]]))
                + u32::from(u16::from_be_bytes([vtep[2], vtep[3]])),
        );
        // SAFETY: plain writes of byte arrays into this frame's `outer`: with `inner` above,
        // every field is written before the store reads them.
        unsafe {
            (*h).dmac = hop.dmac;
            (*h).smac = hop.smac;
            (*h).ethertype = ETH_P_IP.to_be_bytes();
            (*h).ver_tos = ver_tos.to_be_bytes();
            (*h).ip_len = (ip_len as u16).to_be_bytes();
            (*h).id = id.to_be_bytes();
            (*h).frag = [0; 2];
            (*h).ttl_proto = ttl_proto.to_be_bytes();
            (*h).ip_csum = csum.to_be_bytes();
            (*h).saddr = local;
            (*h).daddr = vtep;
            (*h).sport = (sport as u16).to_be_bytes();
            (*h).dport = tunnel.port.to_be_bytes();
            (*h).udp_len = ((ip_len - 20) as u16).to_be_bytes();
            (*h).udp_csum = [0; 2];
            (*h).vxlan_flags = VXLAN_FLAGS;
            (*h).vni = (tunnel.vni << 8).to_be_bytes();
        }

        let flags = u64::from(
            BPF_F_ADJ_ROOM_ENCAP_L3_IPV4
                | BPF_F_ADJ_ROOM_ENCAP_L4_UDP
                | BPF_F_ADJ_ROOM_ENCAP_L2_ETH,
        ) | ((ETH_HLEN as u64) << 56);
        if ctx
            .adjust_room(VXLAN_ROOM as i32, BPF_ADJ_ROOM_MAC, flags)
            .is_err()
        {
            return NOT_FAST;
        }
        // The frame has grown: from here on a failure cannot give it back to the device.
        // SAFETY: `h` points at `outer`, whose first OUTER_WRITTEN bytes are written.
        let stored =
            unsafe { bpf_skb_store_bytes(skb.cast(), 0, h.cast(), OUTER_WRITTEN as u32, 0) };
        if stored != 0 {
            return TC_ACT_SHOT;
        }
        // SAFETY: bpf_redirect only records the target device; the kernel transmits there.
        let action = unsafe { bpf_redirect(tunnel.underlay, 0) };
        i32::try_from(action).unwrap_or(TC_ACT_SHOT)
    }

    /// The next hop towards `vtep` out of the tunnel's underlay: from `NEIGH` while
    /// the entry is younger than [`NEIGH_TTL_NS`], else from `bpf_fib_lookup` (a route and a
    /// resolved neighbour), which refreshes the entry. `None` when the route does not leave
    /// through the underlay or the neighbour is not resolved. Not inlined: the lookup's
    /// struct gets a stack frame of its own.
    #[inline(never)]
    fn next_hop(
        skb: *mut aya_ebpf::bindings::__sk_buff,
        tunnel: &Tunnel,
        vtep: [u8; 4],
    ) -> Option<Neigh> {
        let key = neigh_key(tunnel.underlay, vtep);
        // SAFETY: bpf_ktime_get_ns has no preconditions.
        let now = unsafe { bpf_ktime_get_ns() };
        // SAFETY: a read of this program's own map; the value stays valid for the run (RCU)
        // and is copied out at once.
        if let Some(cached) = unsafe { NEIGH.get(&key) }
            && now.saturating_sub(cached.checked_ns) < NEIGH_TTL_NS
        {
            return Some(*cached);
        }
        // SAFETY: an all-zero `bpf_fib_lookup` is a valid value of this plain C struct.
        let mut fib: FibLookup = unsafe { core::mem::zeroed() };
        fib.family = AF_INET;
        fib.l4_protocol = IPPROTO_UDP;
        fib.dport = tunnel.port.to_be();
        fib.ifindex = tunnel.underlay;
        fib.__bindgen_anon_3.ipv4_src = u32::from_ne_bytes(tunnel.local);
        fib.__bindgen_anon_4.ipv4_dst = u32::from_ne_bytes(vtep);
        // SAFETY: `fib` is a live, correctly sized `bpf_fib_lookup`; `skb` is the context.
        let rc = unsafe {
            bpf_fib_lookup(
                skb.cast(),
                &mut fib,
                core::mem::size_of::<FibLookup>() as i32,
                BPF_FIB_LOOKUP_OUTPUT,
            )
        };
        if rc != i64::from(BPF_FIB_LKUP_RET_SUCCESS) || fib.ifindex != tunnel.underlay {
            return None;
        }
        let hop = Neigh {
            checked_ns: now,
            ifindex: fib.ifindex,
            dmac: fib.dmac,
            smac: fib.smac,
        };
        // An LRU map evicts instead of failing; a lost entry only costs the next lookup.
        let _ignored = NEIGH.insert(&key, &hop, u64::from(BPF_ANY));
        Some(hop)
    }

    /// A 32-bit sum of 16-bit words folded into their ones' complement sum.
    #[inline(always)]
    const fn fold(mut sum: u32) -> u16 {
        sum = (sum & 0xffff) + (sum >> 16);
        sum = (sum & 0xffff) + (sum >> 16);
        sum as u16
    }

    /// The ones' complement sum of the 20-byte IPv4 header at `h[at..]`: its checksum is the
    /// complement (with the field zero), and a valid header sums to 0xffff.
    #[inline(always)]
    fn ipv4_sum<const N: usize>(h: &[u8; N], at: usize) -> u16 {
        let mut sum: u32 = 0;
        let mut i = 0;
        while i < 20 {
            sum += u32::from(u16::from_be_bytes([h[at + i], h[at + i + 1]]));
            i += 2;
        }
        fold(sum)
    }

    /// On a host veth's egress hook (the bridge delivered it): a packet from a local endpoint
    /// of the same network did not take the fast path, so it went through the host (a DNAT to
    /// this endpoint, a route). Remember the flow so that this endpoint's replies take the
    /// bridge too and meet the host's conntrack (de-NAT) on the way back.
    #[inline(never)]
    fn note_bridged(ep: &EndpointInfo, ifindex: u32, pkt: &Packet) {
        if !fast_eligible(pkt) {
            return;
        }
        let Some((sender, _)) = local_endpoint(&pkt.src, ep.network) else {
            return;
        };
        if sender == ifindex {
            return;
        }
        let key = ct_key(ifindex, DIR_INGRESS, pkt);
        if BRIDGED.get_ptr(&key).is_none() {
            // SAFETY: bpf_ktime_get_ns has no preconditions.
            let now = unsafe { bpf_ktime_get_ns() };
            // An LRU map evicts instead of failing; a lost entry only costs one reply.
            let _ignored = BRIDGED.insert(&key, now, u64::from(BPF_ANY));
        }
    }

    /// Attach to the TCX **ingress** hook of a VXLAN device (`OVERLAY` names its network):
    /// a decapsulated frame from a remote endpoint to a local endpoint of that network is
    /// judged by the receiver's ingress policy and redirected straight into its namespace;
    /// everything else goes on to the bridge untouched.
    #[classifier]
    fn sluice_overlay(ctx: TcContext) -> i32 {
        // SAFETY: as in `classify`: a plain context read the verifier permits.
        let ifindex = unsafe { (*ctx.skb.skb).ifindex };
        // SAFETY: a read of this program's own map; the value is a plain u32 copied out.
        let Some(&network) = (unsafe { OVERLAY.get(&ifindex) }) else {
            return TC_ACT_OK;
        };
        let action = from_overlay(ctx.skb.skb, network);
        if action == NOT_FAST {
            TC_ACT_OK
        } else {
            action
        }
    }

    #[inline(never)]
    fn from_overlay(skb: *mut aya_ebpf::bindings::__sk_buff, network: u32) -> i32 {
        let mut pkt = MaybeUninit::<Packet>::uninit();
        let Ok(Frame::Ip) = parse(skb, 0, &mut pkt) else {
            return NOT_FAST;
        };
        // SAFETY: `parse` returns `Frame::Ip` only after writing the packet.
        let pkt = unsafe { pkt.assume_init_ref() };
        if !fast_eligible(pkt) {
            return NOT_FAST;
        }
        let Some((peer_ifindex, peer)) = local_endpoint(&pkt.dst, network) else {
            return NOT_FAST;
        };
        deliver(skb, peer_ifindex, peer, pkt, None)
    }

    /// Attach to the TCX **ingress** hook of the underlay (the device holding the tunnel
    /// address): a VXLAN packet of a tunnel in `DECAP`, to this host's tunnel address, from
    /// the VTEP of the remote endpoint that sent its IPv4 frame (`VTEPS`), for a local
    /// endpoint of that network, is judged by the receiver's
    /// ingress policy, stripped of its outer headers and redirected into the endpoint's
    /// namespace: no UDP socket, VXLAN device, GRO cell or bridge on the way. Everything else
    /// passes untouched, to the host's stack and the VXLAN device.
    #[classifier]
    fn sluice_underlay(ctx: TcContext) -> i32 {
        let action = from_underlay(ctx.skb.skb);
        if action == NOT_FAST {
            TC_ACT_OK
        } else {
            action
        }
    }

    /// Bytes of the outer Ethernet, IPv4 (no options), UDP and VXLAN headers.
    const OUTER_LEN: usize = ETH_HLEN + 20 + 8 + 8;
    const PACKET_HOST: u32 = 0;

    #[inline(never)]
    fn from_underlay(skb: *mut aya_ebpf::bindings::__sk_buff) -> i32 {
        let ctx = TcContext::new(skb);
        // SAFETY: plain context reads the verifier permits for SCHED_CLS programs.
        let (pkt_type, gso_size) = unsafe { ((*skb).pkt_type, (*skb).gso_size) };
        if pkt_type != PACKET_HOST || gso_size != 0 {
            return NOT_FAST;
        }
        // Read in place (direct packet access), not copied out with bpf_skb_load_bytes: the
        // outer headers of a packet the underlay received are in its linear part; when they
        // are not, the kernel's VXLAN device takes the packet.
        let (data, data_end) = (ctx.data(), ctx.data_end());
        if data + OUTER_LEN + ETH_HLEN > data_end {
            return NOT_FAST;
        }
        // SAFETY: `data..data + OUTER_LEN + ETH_HLEN` lies within the packet's linear data
        // (checked against `data_end` just above, which the verifier checks too); nothing
        // changes the packet while `h` is in use (`deliver` adjusts it, after its last use).
        let h = unsafe { &*(data as *const [u8; OUTER_LEN + ETH_HLEN]) };
        let ip = ETH_HLEN;
        let udp = ip + 20;
        let vx = udp + 8;
        // What the kernel's input path would check, else left to it: IPv4 without options,
        // not a fragment, a consistent length (no padding), a valid header checksum; VXLAN
        // with only the I flag.
        if u16::from_be_bytes([h[12], h[13]]) != ETH_P_IP
            || h[ip] != 0x45
            || h[ip + 9] != IPPROTO_UDP
            || u16::from_be_bytes([h[ip + 6], h[ip + 7]]) & 0x3fff != 0
            || usize::from(u16::from_be_bytes([h[ip + 2], h[ip + 3]])) + ETH_HLEN
                != ctx.len() as usize
            || h[vx..vx + 4] != VXLAN_FLAGS
            || h[vx + 7] != 0
            || ipv4_sum(h, ip) != 0xffff
        {
            return NOT_FAST;
        }
        // A UDP checksum (the kernel's VXLAN sends one by default) counts only if it has been
        // verified already (CHECKSUM_UNNECESSARY, e.g. by the NIC); the kernel checks the
        // rest.
        // SAFETY: bpf_csum_level with QUERY only reads the skb's checksum state.
        if h[udp + 6..udp + 8] != [0, 0]
            && unsafe { bpf_csum_level(skb, u64::from(BPF_CSUM_LEVEL_QUERY)) } < 0
        {
            return NOT_FAST;
        }
        let port = u16::from_be_bytes([h[udp + 2], h[udp + 3]]);
        let vni = u32::from_be_bytes([0, h[vx + 4], h[vx + 5], h[vx + 6]]);
        // SAFETY: reads of this program's own maps; the values stay valid for the run (RCU).
        let Some(&Decap { network, local }) = (unsafe { DECAP.get(&decap_key(port, vni)) }) else {
            return NOT_FAST;
        };
        if h[ip + 16..ip + 20] != local {
            return NOT_FAST;
        }
        let mut pkt = MaybeUninit::<Packet>::uninit();
        let Ok(Frame::Ip) = parse(skb, OUTER_LEN, &mut pkt) else {
            return NOT_FAST;
        };
        // SAFETY: `parse` returns `Frame::Ip` only after writing the packet.
        let pkt = unsafe { pkt.assume_init_ref() };
        if pkt.family != FAMILY_V4 || !fast_eligible(pkt) {
            return NOT_FAST;
        }
        // From a known remote: the inner source is a remote endpoint of this network behind
        // the VTEP that sent the packet. Anything else is the kernel's (and the host
        // firewall's) to judge.
        // SAFETY: a read of this program's own map; the value stays valid for the run (RCU).
        let Some(sender) = (unsafe { VTEPS.get(&IpKey { addr: pkt.src }) }) else {
            return NOT_FAST;
        };
        if sender.network != network || h[ip + 12..ip + 16] != sender.ipv4 {
            return NOT_FAST;
        }
        let Some((peer_ifindex, peer)) = local_endpoint(&pkt.dst, network) else {
            return NOT_FAST;
        };
        // Copied out: the packet pointers do not survive `decapsulate`'s adjust_room.
        let inner_eth: [u8; ETH_HLEN] = core::array::from_fn(|i| h[OUTER_LEN + i]);
        deliver(skb, peer_ifindex, peer, pkt, Some(&inner_eth))
    }

    /// Removes the [`OUTER_LEN`] bytes of VXLAN encapsulation in front of the inner frame,
    /// whose Ethernet header `inner_eth` takes the outer one's place.
    #[inline(always)]
    fn decapsulate(ctx: &TcContext, inner_eth: &[u8; ETH_HLEN]) -> bool {
        // BPF_ADJ_ROOM_MAC removes the bytes after the outer Ethernet header: the outer IP,
        // UDP and VXLAN headers and the inner Ethernet header, which is then written over
        // the outer one.
        ctx.adjust_room(-(OUTER_LEN as i32), BPF_ADJ_ROOM_MAC, 0)
            .is_ok()
            && ctx.store(0, inner_eth, 0).is_ok()
    }

    /// TCP, UDP and ICMP echo, unfragmented: what the fast path may carry. An ICMP error
    /// quotes a flow the host may have NATed, and a fragment's siblings may not all be
    /// recognisable: they take the bridge.
    #[inline(always)]
    fn fast_eligible(pkt: &Packet) -> bool {
        if pkt.fragment {
            return false;
        }
        let icmp_type = (pkt.dport >> 8) as u8;
        match pkt.proto {
            PROTO_TCP | PROTO_UDP => true,
            PROTO_ICMP => icmp_type == 0 || icmp_type == 8,
            PROTO_ICMPV6 => icmp_type == 128 || icmp_type == 129,
            _ => false,
        }
    }

    /// The local endpoint (host veth ifindex and entry) holding `addr` on network `network`.
    #[inline(always)]
    fn local_endpoint(addr: &[u8; 16], network: u32) -> Option<(u32, &'static EndpointInfo)> {
        // SAFETY: a read of this program's own map; the value is a plain u32 copied out.
        let peer_ifindex = *unsafe { LOCAL.get(&IpKey { addr: *addr }) }?;
        let peer = endpoint(peer_ifindex)?;
        (peer.network == network).then_some((peer_ifindex, peer))
    }

    /// Judges a unicast IP packet with the receiver's **ingress** policy (the same
    /// [`decide`], the receiver's counters and drop events) and, if it passes, hands it into
    /// the receiver's namespace with `bpf_redirect_peer`, first stripping the `outer` bytes
    /// of VXLAN encapsulation if there are any. A broadcast or multicast destination MAC:
    /// [`NOT_FAST`].
    #[inline(always)]
    fn deliver(
        skb: *mut aya_ebpf::bindings::__sk_buff,
        peer_ifindex: u32,
        peer: &EndpointInfo,
        pkt: &Packet,
        inner_eth: Option<&[u8; ETH_HLEN]>,
    ) -> i32 {
        let ctx = TcContext::new(skb);
        // Broadcast and multicast: the bridge floods them.
        if !pkt.unicast {
            return NOT_FAST;
        }
        let outer = if inner_eth.is_some() { OUTER_LEN } else { 0 };
        let len = u64::from(ctx.len()).saturating_sub(outer as u64);
        match decide(peer, peer_ifindex, DIR_INGRESS, pkt) {
            Ok(()) => {
                count(peer, DIR_INGRESS, VERDICT_ALLOW, len);
                if let Some(inner_eth) = inner_eth
                    && !decapsulate(&ctx, inner_eth)
                {
                    return TC_ACT_SHOT;
                }
                // SAFETY: bpf_redirect_peer only records the target; the kernel checks that
                // it is a veth whose peer is up in another namespace, else drops.
                let action = unsafe { bpf_redirect_peer(peer_ifindex, 0) };
                i32::try_from(action).unwrap_or(TC_ACT_SHOT)
            }
            Err(why) => {
                count(peer, DIR_INGRESS, VERDICT_DENY, len);
                emit_drop(peer_ifindex, DIR_INGRESS, &why, Some(pkt));
                TC_ACT_SHOT
            }
        }
    }

    // --- end fast path ---

    #[inline(always)]
    const fn enforced_flag(dir: u8) -> u32 {
        if dir == DIR_INGRESS {
            EP_INGRESS_ENFORCED
        } else {
            EP_EGRESS_ENFORCED
        }
    }

    #[inline(always)]
    fn endpoint(ifindex: u32) -> Option<&'static EndpointInfo> {
        // SAFETY: the reference points into the map's value storage, which the kernel keeps
        // valid for the whole program run (RCU). A concurrent update from user space can at
        // worst make this one packet see a torn (old/new mix) entry, never memory outside the
        // value. Not copied out: the program's 512-byte stack is tight.
        unsafe { ENDPOINTS.get(ifindex) }
    }

    /// The verdict for an IP packet of endpoint `ep`. Not inlined, like [`emit_drop`]: the
    /// verifier adds up the frames of a call chain against the 512-byte limit, so parsing,
    /// deciding and reporting each get their own.
    #[inline(never)]
    fn decide(ep: &EndpointInfo, ifindex: u32, dir: u8, pkt: &Packet) -> Result<(), Denied> {
        if ep.flags & EP_IDENTITY_PENDING != 0 {
            return Err(drop(REASON_IDENTITY_PENDING));
        }
        if dir == DIR_EGRESS && ep.flags & EP_SOURCE_CHECK != 0 && !own_source(ep, pkt) {
            return Err(drop(REASON_SPOOFED));
        }
        // Nothing to check: skip even the ipcache lookup.
        if ep.flags & (EP_ISOLATE | EP_INGRESS_ENFORCED | EP_EGRESS_ENFORCED) == 0 {
            return Ok(());
        }
        let remote = if dir == DIR_EGRESS {
            &pkt.dst
        } else {
            &pkt.src
        };

        let peer = IPCACHE
            .get(Key::new(128, IpKey { addr: *remote }))
            .copied()
            .unwrap_or(IpInfo {
                identity: IDENTITY_WORLD,
                network: 0,
            });
        if ep.flags & EP_ISOLATE != 0 && peer.network != 0 && peer.network != ep.network {
            return Err(drop(REASON_ISOLATION));
        }
        if ep.flags & (EP_INGRESS_ENFORCED | EP_EGRESS_ENFORCED) == 0 {
            return Ok(());
        }

        let ct_key = ct_key(ifindex, dir, pkt);
        if CONNTRACK.get_ptr(ct_key).is_some() {
            return Ok(());
        }

        if ep.flags & enforced_flag(dir) == 0 {
            track(&ct_key, dir);
            return Ok(());
        }

        // issue 6: rules are keyed by the endpoint's policy subject (shared by every endpoint
        // the same policies select), not by its identity.
        let exact = policy(ep.subject, peer.identity, dir, pkt);
        if let Some(v) = exact
            && v.verdict != u32::from(VERDICT_ALLOW)
        {
            return Err(Denied {
                reason: REASON_POLICY_DENY,
                rule_id: v.rule_id,
            });
        }
        let any = policy(ep.subject, IDENTITY_ANY, dir, pkt);
        if let Some(v) = any
            && v.verdict != u32::from(VERDICT_ALLOW)
        {
            return Err(Denied {
                reason: REASON_POLICY_DENY,
                rule_id: v.rule_id,
            });
        }
        if exact.is_some() || any.is_some() {
            track(&ct_key, dir);
            Ok(())
        } else {
            Err(drop(REASON_DEFAULT_DENY))
        }
    }

    /// The flow of `pkt` as endpoint `ifindex` sees it (`dir`: which way the packet goes for
    /// it), the key of `CONNTRACK` and `BRIDGED`. ICMP: the echo identifier stands in for the
    /// port on the container's side, so an echo request and its reply share the entry; other
    /// ICMP types use 0/0.
    #[inline(always)]
    fn ct_key(ifindex: u32, dir: u8, pkt: &Packet) -> CtKey {
        let (local, remote, local_port, remote_port) = if dir == DIR_EGRESS {
            (&pkt.src, &pkt.dst, pkt.sport, pkt.dport)
        } else {
            (&pkt.dst, &pkt.src, pkt.dport, pkt.sport)
        };
        let (local_port, remote_port) = if pkt.proto == PROTO_ICMP || pkt.proto == PROTO_ICMPV6 {
            (pkt.echo_id, 0)
        } else {
            (local_port, remote_port)
        };
        CtKey {
            ifindex,
            local_port,
            remote_port,
            proto: pkt.proto,
            family: pkt.family,
            _pad: [0; 2],
            local_addr: *local,
            remote_addr: *remote,
        }
    }

    /// Whether a packet the container sends carries one of its own source addresses (IPv6
    /// link-local counts: the kernel uses it before any global address exists).
    #[inline(always)]
    fn own_source(ep: &EndpointInfo, pkt: &Packet) -> bool {
        let src = &pkt.src;
        if pkt.family == FAMILY_V4 {
            src[12..16] == ep.ipv4
        } else {
            *src == ep.ipv6 || (src[0] == 0xfe && src[1] & 0xc0 == 0x80)
        }
    }

    /// One POLICY lookup (the trie returns the longest matching prefix, which the compiler
    /// has made carry the deny-wins verdict).
    #[inline(always)]
    fn policy(subject: u32, peer: u32, dir: u8, pkt: &Packet) -> Option<PolicyValue> {
        let key = Key::new(
            POLICY_PREFIX_FULL,
            PolicyKey::new(subject, peer, dir, pkt.proto, pkt.dport),
        );
        POLICY.get(key).copied()
    }

    #[inline(always)]
    fn track(key: &CtKey, dir: u8) {
        let value = CtValue {
            // SAFETY: bpf_ktime_get_ns has no preconditions.
            created_ns: unsafe { bpf_ktime_get_ns() },
            origin: dir,
            _pad: [0; 7],
        };
        // An LRU map evicts instead of failing when full; a failed insert only means the
        // reply will be judged as a new flow.
        let _ignored = CONNTRACK.insert(key, value, u64::from(BPF_ANY));
    }

    /// Bumps `ep`'s counter for `dir` and `verdict` (its slot in `COUNTERS`).
    #[inline(always)]
    fn count(ep: &EndpointInfo, dir: u8, verdict: u8, len: u64) {
        if let Some(value) = COUNTERS.get_ptr_mut(counter_index(ep.slot, dir, verdict)) {
            // SAFETY: the pointer is this CPU's slot of a per-CPU map value, valid for the
            // program's run; TC programs run with migration disabled, so no other writer
            // touches this slot concurrently.
            unsafe {
                (*value).packets += 1;
                (*value).bytes += len;
            }
        }
    }

    /// Not inlined (see [`decide`]).
    #[inline(never)]
    fn emit_drop(ifindex: u32, dir: u8, why: &Denied, pkt: Option<&Packet>) {
        let Some(state) = EVENT_RATE.get_ptr_mut(0) else {
            return;
        };
        let (rate, burst) = match SETTINGS.get(0) {
            Some(s) => (s.drop_events_per_sec, s.drop_events_burst),
            None => (0, 0),
        };
        let rate = u64::from(if rate == 0 {
            DEFAULT_EVENTS_PER_SEC
        } else {
            rate
        });
        let burst = u64::from(if burst == 0 {
            DEFAULT_EVENTS_BURST
        } else {
            burst
        });
        // SAFETY: bpf_ktime_get_ns has no preconditions.
        let now = unsafe { bpf_ktime_get_ns() };
        // SAFETY: `state` is this CPU's slot of EVENT_RATE (index 0 exists in an array map),
        // valid for the program's run; migration is disabled, so no concurrent writer.
        let st = unsafe { &mut *state };
        let elapsed = now.saturating_sub(st.last_ns);
        let elapsed = if elapsed > MAX_REFILL_NS {
            MAX_REFILL_NS
        } else {
            elapsed
        };
        let cap = burst * NS_PER_SEC;
        let tokens = st.tokens + elapsed * rate;
        st.tokens = if tokens > cap { cap } else { tokens };
        st.last_ns = now;
        if st.tokens < NS_PER_SEC {
            st.suppressed = st.suppressed.saturating_add(1);
            return;
        }
        let Some(mut entry) = EVENTS.reserve::<DropEvent>(0) else {
            st.suppressed = st.suppressed.saturating_add(1);
            return;
        };
        st.tokens -= NS_PER_SEC;
        let (src_addr, dst_addr, src_port, dst_port, proto, family) = match pkt {
            Some(p) => (p.src, p.dst, p.sport, p.dport, p.proto, p.family),
            None => ([0; 16], [0; 16], 0, 0, 0, 0),
        };
        entry.write(DropEvent {
            timestamp_ns: now,
            src_addr,
            dst_addr,
            ifindex,
            rule_id: why.rule_id,
            src_port,
            dst_port,
            proto,
            direction: dir,
            reason: why.reason,
            family,
            suppressed: st.suppressed,
            _pad: 0,
        });
        entry.submit(0);
        st.suppressed = 0;
    }

    #[cfg(not(test))]
    #[panic_handler]
    fn panic(_info: &core::panic::PanicInfo<'_>) -> ! {
        loop {}
    }

    /// License string the kernel reads (GPL-compatible, for GPL-only helpers).
    #[unsafe(link_section = "license")]
    #[unsafe(no_mangle)]
    static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
}

/// Host builds (`cargo test --workspace`, clippy): the programs exist only for the BPF target.
#[cfg(not(target_arch = "bpf"))]
fn main() {}
