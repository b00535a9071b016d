//! Planning the transmission of TUN reads.
//!
//! The TUN device runs with offloads, so one read returns a TCP or UDP super-packet of up
//! to 64 KiB behind a `virtio_net_hdr`. For each read, [`TxPlan::push`] finds the owner of
//! the destination, cuts the packet into MTU-sized segments ([`gso::split`]: own headers
//! and checksums built in the plan's arena behind room for the encapsulation, payload left
//! in the caller's buffer) and appends them to UDP GSO messages keyed by (peer, segment
//! size): at most 64 datagrams and 65,507 bytes each, all but the last of equal size.
//! Packets over the MTU with DF set are answered with ICMP "fragmentation needed".
//!
//! The caller owns the read buffers: the plan records, per segment, which buffer (by
//! index) and which byte range of it is the payload, and the caller must keep those
//! buffers unchanged until it has sent the plan and called [`TxPlan::clear`].

use super::{DropCounts, DropReason, Transform};
use crate::core::route::{Lookup, PeerRoute, PeerState, RouteTable};
use crate::core::wire::gso::{self, GsoError};
use crate::core::wire::virtio::{self, VnetHdr};
use crate::core::wire::{encap, icmp, ipv4, VXLAN_OVERHEAD_INNER};
use std::marker::PhantomData;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::ops::Range;
use std::sync::Arc;

/// Datagrams per GSO message (the kernel's `UDP_MAX_SEGMENTS` on older kernels).
pub const MAX_GSO_SEGMENTS: usize = 64;
/// UDP payload bytes per GSO message: 65535 minus the IPv4 and UDP headers.
pub const MAX_GSO_BYTES: usize = 65_535 - 20 - 8;

/// One UDP GSO message: segments `segments` of the plan, `seg_size` bytes each on the wire
/// (the last may be shorter), to `to`.
#[derive(Debug, Clone)]
pub struct TxMessage {
    pub to: SocketAddrV4,
    pub seg_size: usize,
    pub segments: Range<usize>,
    /// Bytes on the wire (UDP payload).
    pub bytes: usize,
    /// Inner IP bytes, for the peer's traffic counters.
    pub inner_bytes: usize,
    /// The route's counters (shared with the route table, kept across table rebuilds).
    pub peer: Arc<PeerState>,
    /// Index into the route table's peers at planning time.
    pub peer_index: usize,
    /// A shorter segment ended it, or its segment cannot be batched: nothing more fits.
    closed: bool,
}

/// What became of one TUN read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TxOutcome {
    /// Planned as this many segments.
    Queued(usize),
    Dropped(DropReason),
    /// Over the MTU with DF set: dropped, and the first `n` bytes of the `icmp` buffer
    /// given to [`TxPlan::push`] hold the ICMP "fragmentation needed" to write back into
    /// the TUN device.
    FragNeeded(usize),
    /// The plan has no room left for this packet: send and clear the plan, then offer the
    /// same read again (nothing of it was taken).
    Full,
}

/// The sizes of one planned segment.
#[derive(Clone, Copy)]
struct SegmentSize {
    /// Bytes on the wire (encapsulated, with the transform's room).
    wire: usize,
    /// Bytes of the inner packet.
    inner: usize,
    /// Over the path's MTU (no DF: the kernel fragments it), so it cannot be part of a GSO
    /// message.
    oversize: bool,
}

/// A batch of planned segments and messages; allocated once, reused per batch.
pub struct TxPlan<T: Transform> {
    arena: gso::Arena,
    segs: Vec<gso::Segment>,
    /// Read buffer index of each segment.
    seg_buf: Vec<usize>,
    msgs: Vec<TxMessage>,
    max_segments: usize,
    vnet: bool,
    mtu: usize,
    vni: u32,
    /// Datagrams per message: [`MAX_GSO_SEGMENTS`], or 1 once GSO is off.
    per_message: usize,
    counts: DropCounts,
    _transform: PhantomData<T>,
}

/// Bytes of segment header the arena holds: transform headroom, encapsulation, and IPv4 +
/// TCP headers with options.
const fn header_bytes<T: Transform>() -> usize {
    T::HEADROOM + VXLAN_OVERHEAD_INNER + gso::MAX_HEADERS
}

/// The most a segment adds on the wire to the payload it carries (headers and the
/// transform's room): what a transform that copies segments reserves per segment.
pub const fn segment_overhead<T: Transform>() -> usize {
    header_bytes::<T>() + T::TAILROOM
}

impl<T: Transform> TxPlan<T> {
    /// A plan for up to `max_segments` segments per batch, for reads with a
    /// `virtio_net_hdr` if `vnet`, an overlay MTU of `mtu` and VXLAN network `vni`.
    pub fn new(max_segments: usize, vnet: bool, mtu: usize, vni: u32) -> Self {
        TxPlan {
            arena: gso::Arena::new(max_segments * header_bytes::<T>()),
            segs: Vec::with_capacity(max_segments),
            seg_buf: Vec::with_capacity(max_segments),
            msgs: Vec::with_capacity(max_segments),
            max_segments,
            vnet,
            mtu,
            vni,
            per_message: MAX_GSO_SEGMENTS,
            counts: DropCounts::default(),
            _transform: PhantomData,
        }
    }

    /// From now on every datagram is its own message (the underlay refused a GSO send).
    pub(crate) fn disable_gso(&mut self) {
        self.per_message = 1;
    }

    pub fn gso_enabled(&self) -> bool {
        self.per_message > 1
    }

    /// Plans the packet read into buffer `buf` (`read`: what the read returned, with the
    /// `virtio_net_hdr` if the device has one).
    pub fn push(
        &mut self,
        table: &RouteTable,
        buf: usize,
        read: &mut [u8],
        icmp: &mut [u8; icmp::MAX_LEN],
    ) -> TxOutcome {
        match self.plan(table, buf, read, icmp) {
            Ok(o) => o,
            Err(reason) => {
                self.counts.add(reason, 1);
                TxOutcome::Dropped(reason)
            }
        }
    }

    fn plan(
        &mut self,
        table: &RouteTable,
        buf: usize,
        read: &mut [u8],
        icmp_out: &mut [u8; icmp::MAX_LEN],
    ) -> Result<TxOutcome, DropReason> {
        let off = if self.vnet { virtio::LEN } else { 0 };
        let vnet = if self.vnet {
            match VnetHdr::parse(read) {
                Some(h) if read.len() > off => h,
                _ => return Err(DropReason::Malformed),
            }
        } else {
            VnetHdr::default()
        };
        let packet = &mut read[off..];
        let (peer_index, peer, dont_frag) = route(table, packet)?;
        let to = peer.data_addr.ok_or(DropReason::Unreachable)?;
        let template = encap::header(self.vni, table.local_mac(), peer.mac)
            .map_err(|_| DropReason::Malformed)?;
        let (arena_mark, seg_mark) = (self.arena.used(), self.segs.len());
        let split = match gso::split(
            &vnet,
            packet,
            &mut self.arena,
            T::HEADROOM + VXLAN_OVERHEAD_INNER,
            &mut self.segs,
            self.max_segments,
        ) {
            Ok(s) => s,
            // With something planned already, the packet may fit an empty plan.
            Err(GsoError::NoRoom) if seg_mark > 0 => return Ok(TxOutcome::Full),
            Err(GsoError::NotIpv4) => return Err(DropReason::NotIpv4),
            Err(_) => return Err(DropReason::Malformed),
        };
        // The path to this peer may carry less than the overlay MTU (learnt from the
        // underlay's ICMP): the sender is told, as a router on the way would tell it.
        // Without DF an oversize packet is sent anyway: the kernel fragments the outer
        // datagram, as Linux's VXLAN does.
        let mtu = peer.counters.mtu(self.mtu);
        if split.max_ip_len > mtu && dont_frag {
            self.arena.rewind(arena_mark);
            self.segs.truncate(seg_mark);
            self.counts.add(DropReason::TooBig, 1);
            let mtu = u16::try_from(mtu).unwrap_or(u16::MAX);
            return Ok(match icmp::frag_needed(packet, mtu, icmp_out) {
                Some(n) => TxOutcome::FragNeeded(n),
                None => TxOutcome::Dropped(DropReason::TooBig),
            });
        }
        let counters = &peer.counters;
        for k in seg_mark..self.segs.len() {
            let hdr = self.segs[k].hdr.start + T::HEADROOM;
            self.arena
                .get_mut(hdr..hdr + VXLAN_OVERHEAD_INNER)
                .copy_from_slice(&template);
            self.seg_buf.push(buf);
            let wire = self.segs[k].len() + T::TAILROOM;
            let inner = self.segs[k].len() - T::HEADROOM - VXLAN_OVERHEAD_INNER;
            let seg = SegmentSize {
                wire,
                inner,
                oversize: inner > mtu,
            };
            self.add_to_message(to, peer_index, counters, k, seg);
        }
        Ok(TxOutcome::Queued(split.segments))
    }

    /// Appends segment `k` to the open message for `to`, or opens a new one.
    fn add_to_message(
        &mut self,
        to: SocketAddrV4,
        peer_index: usize,
        counters: &Arc<PeerState>,
        k: usize,
        seg: SegmentSize,
    ) {
        let SegmentSize {
            wire,
            inner,
            oversize,
        } = seg;
        let per_message = self.per_message;
        if let Some(m) = self.msgs.last_mut() {
            let fits = m.to == to
                && !m.closed
                && !oversize
                && wire <= m.seg_size
                && m.segments.len() < per_message
                && m.bytes + wire <= MAX_GSO_BYTES;
            if fits {
                m.segments.end = k + 1;
                m.bytes += wire;
                m.inner_bytes += inner;
                m.closed = wire < m.seg_size;
                return;
            }
        }
        self.msgs.push(TxMessage {
            to,
            seg_size: wire,
            segments: k..k + 1,
            bytes: wire,
            inner_bytes: inner,
            peer: counters.clone(),
            peer_index,
            closed: oversize,
        });
    }

    pub fn messages(&self) -> &[TxMessage] {
        &self.msgs
    }

    pub fn is_empty(&self) -> bool {
        self.msgs.is_empty()
    }

    /// Planned segments so far.
    pub fn segments(&self) -> usize {
        self.segs.len()
    }

    /// Segment `k`'s header bytes (transform headroom, VXLAN, Ethernet, inner headers).
    pub fn header(&self, k: usize) -> &[u8] {
        self.arena.get(self.segs[k].hdr.clone())
    }

    pub fn header_mut(&mut self, k: usize) -> &mut [u8] {
        self.arena.get_mut(self.segs[k].hdr.clone())
    }

    /// Segment `k`'s payload: which read buffer, and the range within it (offsets count
    /// from the start of the read, `virtio_net_hdr` included).
    pub fn payload(&self, k: usize) -> (usize, Range<usize>) {
        let off = if self.vnet { virtio::LEN } else { 0 };
        let p = &self.segs[k].payload;
        (self.seg_buf[k], off + p.start..off + p.end)
    }

    /// Forgets the batch; the read buffers may be reused.
    pub fn clear(&mut self) {
        self.msgs.clear();
        self.segs.clear();
        self.seg_buf.clear();
        self.arena.reset();
    }

    /// The drops counted since the last call.
    #[cfg(test)]
    pub(crate) fn take_counts(&mut self) -> DropCounts {
        self.counts.take()
    }

    pub fn counts_mut(&mut self) -> &mut DropCounts {
        &mut self.counts
    }
}

/// Finds the peer for a packet: its index in the table, its route and the DF bit.
fn route<'t>(
    table: &'t RouteTable,
    packet: &[u8],
) -> Result<(usize, &'t PeerRoute, bool), DropReason> {
    let first = *packet.first().ok_or(DropReason::Malformed)?;
    if first >> 4 != 4 {
        return Err(DropReason::NotIpv4);
    }
    if packet.len() < ipv4::MIN_HEADER_LEN {
        return Err(DropReason::Malformed);
    }
    let dst = Ipv4Addr::new(packet[16], packet[17], packet[18], packet[19]);
    let dont_frag = packet[6] & 0x40 != 0;
    match table.lookup_indexed(dst) {
        (Some(i), Lookup::Remote(p)) => Ok((i, p, dont_frag)),
        (_, Lookup::Remote(_)) | (_, Lookup::Unreachable(_)) => Err(DropReason::Unreachable),
        (_, Lookup::Local | Lookup::NoRoute) => Err(DropReason::NoRoute),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::core::datapath::Identity;
    use crate::core::mesh::PeerName;
    use crate::core::wire::{self, csum, WEFT_VNI};
    use std::sync::atomic::Ordering;

    pub(crate) fn name(i: u8) -> PeerName {
        PeerName::from_bytes([0x02, 0x77, 0x66, 0, 0, i])
    }

    fn ip(s: &str) -> u32 {
        u32::from(s.parse::<Ipv4Addr>().unwrap())
    }

    /// Node 1 owns 192.168.0.0/17 and node 2 192.168.128.0/17 (at 10.77.0.2:6784);
    /// node 3 owns 10.1.0.0/24 with no known address.
    pub(crate) fn table(local: u8) -> RouteTable {
        let peer = |i: u8, a: Option<&str>| PeerRoute {
            name: name(i),
            nickname: format!("n{i}"),
            data_addr: a.map(|a| a.parse().unwrap()),
            mac: name(i).mac(),
            counters: Arc::new(PeerState::default()),
        };
        RouteTable::new(
            name(local),
            name(local).mac(),
            &[
                (ip("192.168.0.0"), ip("192.168.127.255"), name(1)),
                (ip("192.168.128.0"), ip("192.168.255.255"), name(2)),
                (ip("10.1.0.0"), ip("10.1.0.255"), name(3)),
            ],
            vec![
                peer(1, Some("10.77.0.1:6784")),
                peer(2, Some("10.77.0.2:6784")),
                peer(3, None),
            ],
        )
    }

    /// An IPv4/TCP packet behind a `virtio_net_hdr`, with `gso` segmentation if nonzero.
    fn read(dst: &str, payload: usize, df: bool, gso: u16) -> Vec<u8> {
        let mut p = vec![0u8; virtio::LEN + 40 + payload];
        ipv4::Repr {
            src: "192.168.0.5".parse().unwrap(),
            dst: dst.parse().unwrap(),
            protocol: ipv4::PROTO_TCP,
            ttl: 64,
            dont_frag: df,
            payload_len: 20 + payload,
        }
        .emit(&mut p[virtio::LEN..])
        .unwrap();
        let tcp = &mut p[virtio::LEN + 20..];
        tcp[12] = 5 << 4;
        tcp[13] = 0x18;
        for (i, b) in tcp[20..].iter_mut().enumerate() {
            *b = i as u8;
        }
        let vnet = if gso > 0 {
            VnetHdr {
                flags: virtio::F_NEEDS_CSUM,
                gso_type: virtio::GSO_TCPV4,
                hdr_len: 40,
                gso_size: gso,
                csum_start: 20,
                csum_offset: 16,
            }
        } else {
            // A finished packet: fill in the TCP checksum.
            let ipb = &p[virtio::LEN..];
            let src = [ipb[12], ipb[13], ipb[14], ipb[15]];
            let dst = [ipb[16], ipb[17], ipb[18], ipb[19]];
            let l4 = &p[virtio::LEN + 20..];
            let c = csum::finish(csum::sum(l4, csum::pseudo_v4(src, dst, 6, l4.len() as u16)));
            p[virtio::LEN + 36..virtio::LEN + 38].copy_from_slice(&c.to_be_bytes());
            VnetHdr::default()
        };
        let mut h = [0u8; virtio::LEN];
        vnet.emit(&mut h);
        p[..virtio::LEN].copy_from_slice(&h);
        p
    }

    fn plan() -> TxPlan<Identity> {
        TxPlan::new(1024, true, 1450, WEFT_VNI)
    }

    /// The datagram of segment `k` as it goes on the wire.
    fn datagram(p: &TxPlan<Identity>, bufs: &[&[u8]], k: usize) -> Vec<u8> {
        let (b, r) = p.payload(k);
        [p.header(k), &bufs[b][r]].concat()
    }

    #[test]
    fn a_packet_is_routed_and_encapsulated_for_its_owner() {
        let t = table(1);
        let mut p = plan();
        let mut icmp = [0u8; icmp::MAX_LEN];
        let mut r = read("192.168.200.1", 100, true, 0);
        assert_eq!(p.push(&t, 0, &mut r, &mut icmp), TxOutcome::Queued(1));
        let m = &p.messages()[0];
        assert_eq!(m.to, "10.77.0.2:6784".parse().unwrap());
        assert_eq!(m.peer_index, 1);
        assert_eq!((m.segments.clone(), m.inner_bytes), (0..1, 140));
        assert_eq!(m.bytes, 140 + VXLAN_OVERHEAD_INNER);
        let d = datagram(&p, &[&r], 0);
        let dec = wire::decapsulate(&d, WEFT_VNI).unwrap();
        assert_eq!(dec.dst, "192.168.200.1".parse::<Ipv4Addr>().unwrap());
        // Inner Ethernet: dst = peer's MAC, src = ours.
        assert_eq!(&d[8..14], &name(2).mac());
        assert_eq!(&d[14..20], &name(1).mac());
        assert_eq!(&d[22..], &r[virtio::LEN..]);
    }

    #[test]
    fn drop_reasons() {
        let t = table(1);
        let mut icmp = [0u8; icmp::MAX_LEN];
        let mut outcome = |dst: &str, payload: usize, df: bool| {
            let mut p = plan();
            let mut r = read(dst, payload, df, 0);
            p.push(&t, 0, &mut r, &mut icmp)
        };
        assert_eq!(
            outcome("192.168.0.9", 10, true),
            TxOutcome::Dropped(DropReason::NoRoute)
        );
        assert_eq!(
            outcome("172.16.0.1", 10, true),
            TxOutcome::Dropped(DropReason::NoRoute)
        );
        assert_eq!(
            outcome("10.1.0.1", 10, true),
            TxOutcome::Dropped(DropReason::Unreachable)
        );
        assert_eq!(outcome("192.168.200.1", 1410, true), TxOutcome::Queued(1));
        assert!(matches!(outcome("192.168.200.1", 1411, true), TxOutcome::FragNeeded(n) if n > 28));
        assert_eq!(outcome("192.168.200.1", 1411, false), TxOutcome::Queued(1));

        let mut p = plan();
        let mut r = read("192.168.200.1", 10, true, 0);
        r[virtio::LEN] = 0x60;
        assert_eq!(
            p.push(&t, 0, &mut r, &mut icmp),
            TxOutcome::Dropped(DropReason::NotIpv4)
        );
        let mut short = r[..virtio::LEN + 10].to_vec();
        short[virtio::LEN] = 0x45;
        assert_eq!(
            p.push(&t, 0, &mut short, &mut icmp),
            TxOutcome::Dropped(DropReason::Malformed)
        );
        let mut no_vnet = vec![0u8; 4];
        assert_eq!(
            p.push(&t, 0, &mut no_vnet, &mut icmp),
            TxOutcome::Dropped(DropReason::Malformed)
        );
        let counts = p.take_counts();
        assert_eq!(counts.get(DropReason::NotIpv4), 1);
        assert_eq!(counts.get(DropReason::Malformed), 2);
        assert!(p.is_empty());
    }

    #[test]
    fn frag_needed_carries_the_mtu_for_the_sender() {
        let t = table(1);
        let mut p = plan();
        let mut icmp = [0u8; icmp::MAX_LEN];
        let mut r = read("192.168.200.1", 1500, true, 0);
        let TxOutcome::FragNeeded(n) = p.push(&t, 0, &mut r, &mut icmp) else {
            panic!("oversize DF packet must be refused")
        };
        let reply = &icmp[..n];
        assert_eq!(reply[9], 1, "ICMP");
        assert_eq!(
            &reply[16..20],
            &r[virtio::LEN + 12..virtio::LEN + 16],
            "back to the sender"
        );
        assert_eq!((reply[20], reply[21]), (3, 4), "fragmentation needed");
        assert_eq!(u16::from_be_bytes([reply[26], reply[27]]), 1450);
        assert_eq!(p.take_counts().get(DropReason::TooBig), 1);
        assert!(p.is_empty(), "nothing of it is planned");
    }

    #[test]
    fn a_smaller_path_mtu_to_one_peer_is_what_its_senders_are_told() {
        let t = table(1);
        let node2 = t.peers().iter().find(|p| p.name == name(2)).unwrap();
        node2.counters.path_mtu.store(1200, Ordering::Relaxed);
        let mut p = plan();
        let mut icmp = [0u8; icmp::MAX_LEN];
        // 1400 bytes fit the overlay (1450) but not the path to node 2.
        let mut r = read("192.168.200.1", 1360, true, 0);
        let TxOutcome::FragNeeded(n) = p.push(&t, 0, &mut r, &mut icmp) else {
            panic!("a DF packet over the path MTU must be refused")
        };
        assert_eq!(u16::from_be_bytes([icmp[26], icmp[27]]), 1200);
        assert!(n > 28);
        // A super-packet whose segments are over it too.
        let mut big = read("192.168.200.1", 20_000, true, 1398);
        assert!(matches!(
            p.push(&t, 0, &mut big, &mut icmp),
            TxOutcome::FragNeeded(_)
        ));
        // Without DF it leaves as a datagram of its own, for the kernel to fragment.
        let mut nodf = read("192.168.200.1", 1360, false, 0);
        assert_eq!(p.push(&t, 0, &mut nodf, &mut icmp), TxOutcome::Queued(1));
        // Small packets are not affected; the path MTU is forgotten when reset to 0.
        let mut small = read("192.168.200.1", 1000, true, 0);
        assert_eq!(p.push(&t, 0, &mut small, &mut icmp), TxOutcome::Queued(1));
        assert_eq!(
            p.messages().len(),
            2,
            "the oversize datagram is not part of a GSO message"
        );
        node2.counters.path_mtu.store(0, Ordering::Relaxed);
        let mut again = read("192.168.200.1", 1360, true, 0);
        assert_eq!(p.push(&t, 0, &mut again, &mut icmp), TxOutcome::Queued(1));
    }

    #[test]
    fn super_packets_become_gso_messages_of_equal_segments_per_peer() {
        let t = table(1);
        let mut p = plan();
        let mut icmp = [0u8; icmp::MAX_LEN];
        // 64 KB in 1398-byte segments to node 2, then a small packet to node 2, then one
        // to node 1's... node 1 is local: use node 2 and another super-packet.
        let mut a = read("192.168.200.1", 65_000, true, 1398);
        let mut b = read("192.168.200.1", 100, true, 0);
        assert_eq!(p.push(&t, 0, &mut a, &mut icmp), TxOutcome::Queued(47));
        assert_eq!(p.push(&t, 1, &mut b, &mut icmp), TxOutcome::Queued(1));
        let msgs = p.messages();
        let wire = VXLAN_OVERHEAD_INNER + 40 + 1398;
        // 46 full segments (46 * 1460 = 67,160 > 65,507): the first message takes 44.
        assert_eq!(msgs[0].seg_size, wire);
        assert_eq!(msgs[0].segments, 0..44);
        assert_eq!(msgs[0].bytes, 44 * wire);
        // The rest of the super-packet: 2 full and the short last, which closes it.
        assert_eq!(msgs[1].segments, 44..47);
        // The small packet cannot join a closed message.
        assert_eq!(msgs[2].segments, 47..48);
        assert_eq!(msgs.len(), 3);
        // Every datagram decapsulates, sequence numbers advance by the segment size.
        let bufs: [&[u8]; 2] = [&a, &b];
        let mut seq = None;
        for k in 0..47 {
            let d = datagram(&p, &bufs, k);
            let dec = wire::decapsulate(&d, WEFT_VNI).unwrap();
            let inner = &d[dec.inner_ip];
            let s = u32::from_be_bytes([inner[24], inner[25], inner[26], inner[27]]);
            if let Some(prev) = seq {
                assert_eq!(s, prev + 1398);
            }
            seq = Some(s);
        }
        let inner_total: usize = msgs.iter().map(|m| m.inner_bytes).sum();
        assert_eq!(inner_total, 47 * 40 + 65_000 + 140);
    }

    #[test]
    fn without_gso_every_datagram_is_its_own_message() {
        let t = table(1);
        let mut p = plan();
        p.disable_gso();
        assert!(!p.gso_enabled());
        let mut icmp = [0u8; icmp::MAX_LEN];
        let mut a = read("192.168.200.1", 5000, true, 1398);
        assert_eq!(p.push(&t, 0, &mut a, &mut icmp), TxOutcome::Queued(4));
        assert_eq!(p.messages().len(), 4);
    }

    #[test]
    fn a_full_plan_asks_to_be_sent_and_takes_nothing() {
        let t = table(1);
        let mut p: TxPlan<Identity> = TxPlan::new(50, true, 1450, WEFT_VNI);
        let mut icmp = [0u8; icmp::MAX_LEN];
        let mut a = read("192.168.200.1", 65_000, true, 1398);
        let mut b = read("192.168.200.1", 65_000, true, 1398);
        assert_eq!(p.push(&t, 0, &mut a, &mut icmp), TxOutcome::Queued(47));
        assert_eq!(p.push(&t, 1, &mut b, &mut icmp), TxOutcome::Full);
        assert_eq!(p.segments(), 47);
        p.clear();
        assert_eq!(p.push(&t, 0, &mut b, &mut icmp), TxOutcome::Queued(47));
        // Bigger than an empty plan can ever hold: malformed, not "full" forever.
        let mut tiny: TxPlan<Identity> = TxPlan::new(10, true, 1450, WEFT_VNI);
        assert_eq!(
            tiny.push(&t, 0, &mut a, &mut icmp),
            TxOutcome::Dropped(DropReason::Malformed)
        );
    }

    /// A transform that adds 8 bytes in front and 16 behind: the planner reserves the
    /// headroom in the header and groups messages by the size on the wire.
    struct Framed;
    impl Transform for Framed {
        const HEADROOM: usize = 8;
        const TAILROOM: usize = 16;
        const PASSTHROUGH: bool = false;
        fn seal(&mut self, _: &PeerRoute, _: &mut [u8], _: &[u8]) -> super::super::Sealed {
            super::super::Sealed::AsPlanned
        }
        fn output(&self) -> &[u8] {
            &[]
        }
        fn reset(&mut self) {}
        fn open(
            &mut self,
            _: &PeerRoute,
            d: &mut [u8],
        ) -> Result<Range<usize>, super::super::OpenError> {
            Ok(8..d.len() - 16)
        }
    }

    #[test]
    fn transform_room_is_reserved_and_counted() {
        let t = table(1);
        let mut p: TxPlan<Framed> = TxPlan::new(1024, true, 1450, WEFT_VNI);
        let mut icmp = [0u8; icmp::MAX_LEN];
        let mut a = read("192.168.200.1", 3000, true, 1398);
        assert_eq!(p.push(&t, 0, &mut a, &mut icmp), TxOutcome::Queued(3));
        let m = &p.messages()[0];
        assert_eq!(m.seg_size, 8 + VXLAN_OVERHEAD_INNER + 40 + 1398 + 16);
        assert_eq!(m.inner_bytes, 3 * 40 + 3000);
        let h = p.header(0);
        assert_eq!(h.len(), 8 + VXLAN_OVERHEAD_INNER + 40);
        assert!(wire::decapsulate(&[&h[8..], &a[..0]].concat(), WEFT_VNI).is_err());
        assert_eq!(h[8] & 0x08, 0x08, "VXLAN header behind the headroom");
    }
}
