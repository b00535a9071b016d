//! Coalescing received TCP/IPv4 segments of one flow into super-packets for a TUN device
//! opened with `IFF_VNET_HDR` (generic receive offload in user space).
//!
//! The table does not copy payloads. For every packet pushed it records where the bytes
//! are (an opaque caller reference plus a range); [`Gro::finish`] then builds one header
//! per output packet: the `virtio_net_hdr`, and for coalesced packets the first
//! segment's IPv4 and TCP headers with the total length, IPv4 checksum and the
//! `CHECKSUM_PARTIAL` pseudo-header sum rewritten. The I/O layer writes each output as
//! one `writev` of that header followed by the payload ranges.
//!
//! Merging follows the kernel's own TCP GRO rules: same addresses, ports, TOS, TTL, DF,
//! TCP options and ACK number, consecutive sequence numbers, only ACK (and PSH on the
//! last segment) set, segments of equal size with at most a shorter last one. A segment
//! is only merged if its checksum verifies, so coalescing never hides corruption; one
//! that fails is written on its own, unflagged, for the kernel to count and drop. A
//! checksum that is not computed at all is not a failure: a Linux sender whose packets
//! crossed no NIC (a kernel VXLAN node over veth, or on the same host) leaves
//! `CHECKSUM_PARTIAL` packets with only the pseudo-header sum in the TCP or UDP checksum
//! field. Such packets (the field equals that sum) are handed on as `NEEDS_CSUM`, as the
//! kernel itself would: the outer UDP checksum, which the receiving kernel verified
//! unless the sender is local, covers the inner bytes. Such a sender also hands over TCP
//! super-packets larger than the MTU (its VXLAN device's segmentation offload, which a
//! veth carries unsegmented into this node's socket): they are written with `GSO_TCPV4`
//! and a segment size that fits the MTU, for the kernel to segment. A
//! packet of a flow that cannot be merged closes that flow's open super-packet, so
//! packets of one flow keep their order.

use super::csum;
use super::virtio::{self, VnetHdr};
use std::ops::Range;

/// Flows coalescing at the same time; older ones are closed when more arrive.
pub(crate) const MAX_OPEN: usize = 8;
/// Segments per super-packet (bounds the `writev` iovec count).
pub(crate) const MAX_SEGMENTS: usize = 64;
const MAX_IP_LEN: usize = 65_535;
/// `virtio_net_hdr` + IPv4 (20, options are not coalesced) + TCP (up to 60).
const ITEM_HDR: usize = virtio::LEN + 20 + 60;

const TCP_PSH: u8 = 0x08;
const TCP_ACK: u8 = 0x10;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FlowKey {
    addrs: [u8; 8],
    ports: [u8; 4],
}

#[derive(Debug, Clone)]
struct Item {
    hdr: [u8; ITEM_HDR],
    hdr_len: usize,
    /// Only for coalescable TCP items: the flow and the state needed to append.
    key: Option<FlowKey>,
    next_seq: u32,
    gso_size: usize,
    ip_len: usize,
    segments: usize,
    first: u32,
    last: u32,
    /// The head's checksum is the pseudo-header sum only (a lone segment is then
    /// written with `NEEDS_CSUM`, not `DATA_VALID`).
    partial: bool,
    /// One TCP packet longer than the MTU: written as a super-packet of `gso_size`
    /// segments.
    oversize: bool,
}

#[derive(Debug, Clone)]
struct Member<R> {
    at: R,
    range: Range<usize>,
    next: u32,
}

const NONE: u32 = u32::MAX;

/// Per-batch coalescing state; allocate once, reuse with [`Gro::clear`].
#[derive(Debug)]
pub(crate) struct Gro<R: Copy> {
    items: Vec<Item>,
    members: Vec<Member<R>>,
    /// Indexes of items still accepting segments, oldest first.
    open: Vec<u32>,
    merged: u64,
    /// The largest IPv4 packet the TUN device's side takes unsegmented (its MTU).
    mtu: usize,
}

/// Parsed facts about a packet offered for coalescing.
struct Tcp {
    key: FlowKey,
    seq: u32,
    flags: u8,
    tcp_hl: usize,
    payload: usize,
    total: usize,
    /// The checksum field holds the pseudo-header sum, not a checksum.
    partial: bool,
}

impl<R: Copy> Gro<R> {
    /// `capacity` packets per batch are handled without allocating.
    pub fn with_capacity(capacity: usize) -> Gro<R> {
        Gro {
            items: Vec::with_capacity(capacity),
            members: Vec::with_capacity(capacity),
            open: Vec::with_capacity(MAX_OPEN),
            merged: 0,
            mtu: MAX_IP_LEN,
        }
    }

    /// Sets the MTU: TCP packets longer than it are written as segmentation-offload
    /// super-packets with segments that fit it.
    pub fn set_mtu(&mut self, mtu: usize) {
        self.mtu = mtu.clamp(68, MAX_IP_LEN);
    }

    pub fn clear(&mut self) {
        self.items.clear();
        self.members.clear();
        self.open.clear();
    }

    /// Output packets so far.
    pub fn len(&self) -> usize {
        self.items.len()
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// Packets that were appended to another one (since creation).
    #[cfg(test)]
    pub fn merged(&self) -> u64 {
        self.merged
    }

    /// Offers the IPv4 packet `pkt`, which the caller can find again through `at`.
    pub fn push(&mut self, at: R, pkt: &[u8]) {
        let Some(t) = parse_tcp(pkt) else {
            let vnet = match partial_udp(pkt) {
                Some(csum_start) => VnetHdr {
                    flags: virtio::F_NEEDS_CSUM,
                    csum_start,
                    csum_offset: 6,
                    ..VnetHdr::default()
                },
                None => VnetHdr::default(),
            };
            self.push_single(at, pkt.len(), vnet);
            return;
        };
        let slot = self
            .open
            .iter()
            .position(|&i| self.items[i as usize].key == Some(t.key));
        if t.total > self.mtu {
            // One packet longer than the MTU, written as a super-packet of MTU-sized
            // segments; it closes its flow's open super-packet, so the flow stays in order.
            if let Some(pos) = slot {
                self.open.remove(pos);
            }
            // At least one byte per segment: an MTU below the headers cannot be met.
            let mss = self.mtu.saturating_sub(20 + t.tcp_hl).max(1);
            self.push_head(at, pkt, &t, mss, true);
            return;
        }
        let mergeable = t.payload > 0 && t.flags & !TCP_PSH == TCP_ACK;
        if let Some(pos) = slot {
            let idx = self.open[pos] as usize;
            if mergeable && self.can_append(idx, pkt, &t) {
                self.append(idx, at, pkt, &t);
                let item = &mut self.items[idx];
                if t.flags & TCP_PSH != 0 || t.payload < item.gso_size {
                    if t.flags & TCP_PSH != 0 {
                        item.hdr[virtio::LEN + 20 + 13] |= TCP_PSH;
                    }
                    self.open.remove(pos);
                }
                self.merged += 1;
                return;
            }
            self.open.remove(pos);
        }
        if !mergeable {
            self.push_single(at, pkt.len(), lone_tcp(t.partial));
            return;
        }
        // A new coalescing head.
        let idx = self.push_head(at, pkt, &t, t.payload, false);
        if t.flags & TCP_PSH == 0 {
            if self.open.len() == MAX_OPEN {
                self.open.remove(0);
            }
            self.open.push(idx);
        }
    }

    /// Adds an output whose headers are `pkt`'s own (rewritten by [`Gro::finish`] if more
    /// segments join it, or if it is `oversize`), to be segmented at `gso_size`.
    fn push_head(&mut self, at: R, pkt: &[u8], t: &Tcp, gso_size: usize, oversize: bool) -> u32 {
        let idx = self.items.len() as u32;
        let hdr_len = virtio::LEN + 20 + t.tcp_hl;
        let mut hdr = [0u8; ITEM_HDR];
        hdr[virtio::LEN..hdr_len].copy_from_slice(&pkt[..20 + t.tcp_hl]);
        let m = self.members.len() as u32;
        self.members.push(Member {
            at,
            range: 20 + t.tcp_hl..t.total,
            next: NONE,
        });
        self.items.push(Item {
            hdr,
            hdr_len,
            key: Some(t.key),
            next_seq: t.seq.wrapping_add(t.payload as u32),
            gso_size,
            ip_len: t.total,
            segments: 1,
            first: m,
            last: m,
            partial: t.partial,
            oversize,
        });
        idx
    }

    /// A packet written as it is, behind `vnet`.
    fn push_single(&mut self, at: R, len: usize, vnet: VnetHdr) {
        let m = self.members.len() as u32;
        self.members.push(Member {
            at,
            range: 0..len,
            next: NONE,
        });
        let mut hdr = [0u8; ITEM_HDR];
        let mut v = [0u8; virtio::LEN];
        vnet.emit(&mut v);
        hdr[..virtio::LEN].copy_from_slice(&v);
        self.items.push(Item {
            hdr,
            hdr_len: virtio::LEN,
            key: None,
            next_seq: 0,
            gso_size: 0,
            ip_len: len,
            segments: 1,
            first: m,
            last: m,
            partial: false,
            oversize: false,
        });
    }

    fn can_append(&self, idx: usize, pkt: &[u8], t: &Tcp) -> bool {
        let item = &self.items[idx];
        let head = &item.hdr[virtio::LEN..item.hdr_len];
        // TOS, DF/MF, TTL must match; so must the TCP header length, ACK number and
        // options (timestamps included), as in the kernel's tcp_gro_receive.
        item.hdr_len == virtio::LEN + 20 + t.tcp_hl
            && head[1] == pkt[1]
            && head[6] == pkt[6]
            && head[8] == pkt[8]
            && head[28..32] == pkt[28..32]
            && head[40..] == pkt[40..20 + t.tcp_hl]
            && t.seq == item.next_seq
            && t.payload <= item.gso_size
            && item.segments < MAX_SEGMENTS
            && item.ip_len + t.payload <= MAX_IP_LEN
    }

    fn append(&mut self, idx: usize, at: R, pkt: &[u8], t: &Tcp) {
        let m = self.members.len() as u32;
        self.members.push(Member {
            at,
            range: 20 + t.tcp_hl..t.total,
            next: NONE,
        });
        let last = self.items[idx].last as usize;
        self.members[last].next = m;
        let item = &mut self.items[idx];
        item.last = m;
        item.segments += 1;
        item.ip_len += t.payload;
        item.next_seq = t.seq.wrapping_add(t.payload as u32);
        // The latest window advertisement is the one to deliver.
        let w = virtio::LEN + 20 + 14;
        item.hdr[w..w + 2].copy_from_slice(&pkt[34..36]);
    }

    /// Writes the final headers. Call once after the last [`Gro::push`] of a batch.
    pub fn finish(&mut self) {
        for item in &mut self.items {
            if item.key.is_none() {
                continue;
            }
            let vnet = if item.segments == 1 && !item.oversize {
                lone_tcp(item.partial)
            } else {
                let ip = &mut item.hdr[virtio::LEN..item.hdr_len];
                ip[2..4].copy_from_slice(&(item.ip_len as u16).to_be_bytes());
                ip[10..12].copy_from_slice(&[0, 0]);
                let c = csum::finish(csum::sum(&ip[..20], 0));
                ip[10..12].copy_from_slice(&c.to_be_bytes());
                let mut src = [0u8; 4];
                let mut dst = [0u8; 4];
                src.copy_from_slice(&ip[12..16]);
                dst.copy_from_slice(&ip[16..20]);
                let partial = csum::fold(csum::pseudo_v4(src, dst, 6, (item.ip_len - 20) as u16));
                ip[36..38].copy_from_slice(&partial.to_be_bytes());
                VnetHdr {
                    flags: virtio::F_NEEDS_CSUM,
                    gso_type: virtio::GSO_TCPV4,
                    hdr_len: (item.hdr_len - virtio::LEN) as u16,
                    gso_size: item.gso_size as u16,
                    csum_start: 20,
                    csum_offset: 16,
                }
            };
            let mut v = [0u8; virtio::LEN];
            vnet.emit(&mut v);
            item.hdr[..virtio::LEN].copy_from_slice(&v);
        }
    }

    /// The header (virtio + possibly IPv4/TCP) of output `i`.
    pub fn header(&self, i: usize) -> &[u8] {
        let item = &self.items[i];
        &item.hdr[..item.hdr_len]
    }

    /// Number of input packets in output `i`.
    pub fn segments(&self, i: usize) -> usize {
        self.items[i].segments
    }

    /// IPv4 length of output `i`.
    #[cfg(test)]
    pub(crate) fn ip_len(&self, i: usize) -> usize {
        self.items[i].ip_len
    }

    /// The byte ranges that follow the header of output `i`, in order.
    pub fn parts(&self, i: usize) -> Parts<'_, R> {
        Parts {
            members: &self.members,
            next: self.items[i].first,
        }
    }
}

/// Iterator over `(reference, range)` pairs of one output packet.
pub struct Parts<'a, R> {
    members: &'a [Member<R>],
    next: u32,
}

impl<R: Copy> Iterator for Parts<'_, R> {
    type Item = (R, Range<usize>);
    fn next(&mut self) -> Option<Self::Item> {
        let m = self.members.get(self.next as usize)?;
        self.next = m.next;
        Some((m.at, m.range.clone()))
    }
}

/// Recognises a well-formed, option-less IPv4 header with a valid checksum, carrying an
/// unfragmented TCP segment whose checksum verifies. Anything else is not coalesced.
fn parse_tcp(pkt: &[u8]) -> Option<Tcp> {
    if pkt.len() < 40 || pkt[0] != 0x45 || pkt[9] != 6 {
        return None;
    }
    let total = usize::from(u16::from_be_bytes([pkt[2], pkt[3]]));
    // No MF, offset zero.
    if total < 40 || total > pkt.len() || (u16::from_be_bytes([pkt[6], pkt[7]]) & 0x3fff) != 0 {
        return None;
    }
    if csum::fold(csum::sum(&pkt[..20], 0)) != 0xffff {
        return None;
    }
    let tcp_hl = usize::from(pkt[32] >> 4) * 4;
    if tcp_hl < 20 || 20 + tcp_hl > total {
        return None;
    }
    let flags = pkt[33];
    let mut src = [0u8; 4];
    let mut dst = [0u8; 4];
    src.copy_from_slice(&pkt[12..16]);
    dst.copy_from_slice(&pkt[16..20]);
    let l4 = &pkt[20..total];
    let pseudo = csum::pseudo_v4(src, dst, 6, l4.len() as u16);
    let mut partial = false;
    if csum::fold(csum::sum(l4, pseudo)) != 0xffff {
        if u16::from_be_bytes([l4[16], l4[17]]) != csum::fold(pseudo) {
            return None;
        }
        partial = true;
    }
    let mut addrs = [0u8; 8];
    addrs.copy_from_slice(&pkt[12..20]);
    let mut ports = [0u8; 4];
    ports.copy_from_slice(&pkt[20..24]);
    Some(Tcp {
        key: FlowKey { addrs, ports },
        seq: u32::from_be_bytes([pkt[24], pkt[25], pkt[26], pkt[27]]),
        flags,
        tcp_hl,
        payload: total - 20 - tcp_hl,
        total,
        partial,
    })
}

/// The header for a TCP segment written on its own.
fn lone_tcp(partial: bool) -> VnetHdr {
    if partial {
        VnetHdr {
            flags: virtio::F_NEEDS_CSUM,
            csum_start: 20,
            csum_offset: 16,
            ..VnetHdr::default()
        }
    } else {
        VnetHdr {
            flags: virtio::F_DATA_VALID,
            ..VnetHdr::default()
        }
    }
}

/// For an unfragmented UDP/IPv4 packet whose checksum field holds just the
/// pseudo-header sum (and so does not verify): where the checksummed part starts.
/// Every other packet goes to the kernel as it is, to be verified there.
fn partial_udp(pkt: &[u8]) -> Option<u16> {
    if pkt.len() < 28 || pkt[0] >> 4 != 4 || pkt[9] != 17 {
        return None;
    }
    let ihl = usize::from(pkt[0] & 0x0f) * 4;
    let total = usize::from(u16::from_be_bytes([pkt[2], pkt[3]]));
    if ihl < 20
        || total > pkt.len()
        || total < ihl + 8
        || (u16::from_be_bytes([pkt[6], pkt[7]]) & 0x3fff) != 0
    {
        return None;
    }
    let udp = &pkt[ihl..total];
    let field = u16::from_be_bytes([udp[6], udp[7]]);
    if field == 0 {
        return None; // no checksum: nothing to complete
    }
    let mut src = [0u8; 4];
    let mut dst = [0u8; 4];
    src.copy_from_slice(&pkt[12..16]);
    dst.copy_from_slice(&pkt[16..20]);
    let pseudo = csum::pseudo_v4(src, dst, 17, udp.len() as u16);
    if field != csum::fold(pseudo) || csum::fold(csum::sum(udp, pseudo)) == 0xffff {
        return None;
    }
    Some(ihl as u16)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::wire::gso::tests::{l4_checksum_ok, tcp_packet};

    /// A fully checksummed segment.
    fn seg(payload: &[u8], seq: u32, flags: u8) -> Vec<u8> {
        let mut p = tcp_packet(payload, seq, flags);
        p[36..38].copy_from_slice(&[0, 0]);
        let l4_len = (p.len() - 20) as u16;
        let c = csum::finish(csum::sum(
            &p[20..],
            csum::pseudo_v4([192, 168, 0, 5], [192, 168, 128, 7], 6, l4_len),
        ));
        p[36..38].copy_from_slice(&c.to_be_bytes());
        assert!(l4_checksum_ok(&p));
        p
    }

    /// Reassembles output `i` the way the kernel sees it after `writev`.
    fn output(g: &Gro<usize>, pkts: &[Vec<u8>], i: usize) -> (VnetHdr, Vec<u8>) {
        let h = g.header(i);
        let vnet = VnetHdr::parse(h).unwrap();
        let mut bytes = h[virtio::LEN..].to_vec();
        for (at, r) in g.parts(i) {
            bytes.extend_from_slice(&pkts[at][r]);
        }
        (vnet, bytes)
    }

    /// Emulates the kernel's handling of a `CHECKSUM_PARTIAL` super-packet: completing
    /// the checksum must give a valid packet.
    fn completed(mut bytes: Vec<u8>) -> Vec<u8> {
        let c = csum::finish(csum::sum(&bytes[20..], 0));
        bytes[36..38].copy_from_slice(&c.to_be_bytes());
        bytes
    }

    fn data(n: usize, salt: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 31 + salt) as u8).collect()
    }

    /// A segment as a Linux sender leaves it in `CHECKSUM_PARTIAL`: the checksum field
    /// holds the pseudo-header sum only.
    fn partial_seg(payload: &[u8], seq: u32, flags: u8) -> Vec<u8> {
        let mut p = tcp_packet(payload, seq, flags);
        let l4_len = (p.len() - 20) as u16;
        let pseudo = csum::pseudo_v4([192, 168, 0, 5], [192, 168, 128, 7], 6, l4_len);
        p[36..38].copy_from_slice(&csum::fold(pseudo).to_be_bytes());
        assert!(!l4_checksum_ok(&p));
        p
    }

    #[test]
    fn segments_with_only_the_pseudo_header_sum_are_handed_on_to_be_completed() {
        let mss = 1398;
        let mut pkts: Vec<Vec<u8>> = (0..3)
            .map(|i| partial_seg(&data(mss, i), 1000 + (i * mss) as u32, 0x10))
            .collect();
        // A lone SYN (not mergeable), partial too.
        pkts.push(partial_seg(&[], 7, 0x02));
        // A corrupted segment: neither a checksum nor the pseudo-header sum.
        let mut bad = partial_seg(&data(100, 9), 50_000, 0x18);
        bad[36] ^= 0x40;
        pkts.push(bad);
        let mut g = Gro::with_capacity(16);
        for (i, p) in pkts.iter().enumerate() {
            g.push(i, p);
        }
        g.finish();
        assert_eq!(g.len(), 3);
        let (vnet, bytes) = output(&g, &pkts, 0);
        assert_eq!(
            (vnet.flags, vnet.gso_type),
            (virtio::F_NEEDS_CSUM, virtio::GSO_TCPV4)
        );
        assert_eq!(g.segments(0), 3);
        assert!(l4_checksum_ok(&completed(bytes)));
        let (vnet, bytes) = output(&g, &pkts, 1);
        assert_eq!(
            (vnet.flags, vnet.gso_type, vnet.csum_start, vnet.csum_offset),
            (virtio::F_NEEDS_CSUM, virtio::GSO_NONE, 20, 16)
        );
        assert!(l4_checksum_ok(&completed(bytes)));
        let (vnet, _) = output(&g, &pkts, 2);
        assert_eq!(
            vnet,
            VnetHdr::default(),
            "left to the kernel to count and drop"
        );
    }

    #[test]
    fn tcp_packets_over_the_mtu_are_handed_on_to_be_segmented_in_order() {
        let mss = 1398;
        // Two segments, then a 3-segment offload unit of the same flow, then a segment.
        let pkts = vec![
            partial_seg(&data(mss, 0), 1000, 0x10),
            partial_seg(&data(mss, 1), 1000 + mss as u32, 0x10),
            partial_seg(&data(3 * mss, 2), 1000 + 2 * mss as u32, 0x10),
            seg(&data(mss, 3), 1000 + 5 * mss as u32, 0x10),
        ];
        let mut g = Gro::with_capacity(16);
        g.set_mtu(1450);
        for (i, p) in pkts.iter().enumerate() {
            g.push(i, p);
        }
        g.finish();
        assert_eq!(g.len(), 3, "the big packet closes the open super-packet");
        let (vnet, bytes) = output(&g, &pkts, 1);
        assert_eq!(
            (vnet.flags, vnet.gso_type, vnet.gso_size, vnet.hdr_len),
            (virtio::F_NEEDS_CSUM, virtio::GSO_TCPV4, 1450 - 52, 52)
        );
        assert_eq!(bytes.len(), 52 + 3 * mss);
        assert!(l4_checksum_ok(&completed(bytes.clone())));
        assert_eq!(&bytes[52..], &data(3 * mss, 2)[..]);
        let (_, first) = output(&g, &pkts, 0);
        assert_eq!(first.len(), 52 + 2 * mss);
        let (vnet, _) = output(&g, &pkts, 2);
        assert_eq!(vnet.flags, virtio::F_DATA_VALID);
        // Without an MTU (no virtio header to segment with) nothing changes.
        let mut g = Gro::with_capacity(4);
        g.push(2, &pkts[2]);
        g.finish();
        assert_eq!(output(&g, &pkts, 0).0.gso_type, virtio::GSO_NONE);
    }

    #[test]
    fn udp_with_only_the_pseudo_header_sum_is_handed_on_to_be_completed() {
        let payload = data(300, 3);
        let mut p = vec![0u8; 28 + payload.len()];
        let repr = crate::core::wire::ipv4::Repr {
            src: "192.168.0.5".parse().unwrap(),
            dst: "192.168.128.7".parse().unwrap(),
            protocol: 17,
            ttl: 64,
            dont_frag: true,
            payload_len: 8 + payload.len(),
        };
        let _ = repr.emit(&mut p);
        crate::core::wire::ipv4::Packet::new_unchecked(&mut p[..]).fill_checksum();
        p[20..22].copy_from_slice(&5353u16.to_be_bytes());
        p[22..24].copy_from_slice(&53u16.to_be_bytes());
        p[24..26].copy_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
        p[28..].copy_from_slice(&payload);
        let udp_len = (p.len() - 20) as u16;
        let mut src = [0u8; 4];
        let mut dst = [0u8; 4];
        src.copy_from_slice(&p[12..16]);
        dst.copy_from_slice(&p[16..20]);
        let pseudo = csum::pseudo_v4(src, dst, 17, udp_len);
        p[26..28].copy_from_slice(&csum::fold(pseudo).to_be_bytes());
        let mut complete = p.clone();
        complete[26..28].copy_from_slice(&[0, 0]);
        let c = csum::finish(csum::sum(&complete[20..], pseudo));
        complete[26..28].copy_from_slice(&c.to_be_bytes());
        let mut g = Gro::with_capacity(4);
        g.push(0, &p);
        g.push(1, &complete);
        g.finish();
        let pkts = [p, complete];
        let (vnet, bytes) = output(&g, &pkts, 0);
        assert_eq!(
            (vnet.flags, vnet.csum_start, vnet.csum_offset),
            (virtio::F_NEEDS_CSUM, 20, 6)
        );
        // The kernel adds the sum from csum_start on to the field's pseudo-header sum.
        let mut done = bytes.clone();
        let c = csum::finish(csum::sum(&done[20..], 0));
        done[26..28].copy_from_slice(&c.to_be_bytes());
        assert_eq!(done, pkts[1]);
        let (vnet, _) = output(&g, &pkts, 1);
        assert_eq!(
            vnet,
            VnetHdr::default(),
            "a complete checksum is the kernel's to verify"
        );
    }

    #[test]
    fn consecutive_segments_coalesce_into_a_valid_super_packet() {
        let mss = 1398;
        let d: Vec<Vec<u8>> = (0..4)
            .map(|i| data(if i == 3 { 500 } else { mss }, i))
            .collect();
        let pkts: Vec<Vec<u8>> = (0..4)
            .map(|i| {
                seg(
                    &d[i],
                    1000 + (i * mss) as u32,
                    if i == 3 { 0x18 } else { 0x10 },
                )
            })
            .collect();
        let mut g = Gro::with_capacity(16);
        for (i, p) in pkts.iter().enumerate() {
            g.push(i, p);
        }
        g.finish();
        assert_eq!(g.len(), 1);
        assert_eq!(g.segments(0), 4);
        let (vnet, bytes) = output(&g, &pkts, 0);
        assert_eq!(vnet.gso_type, virtio::GSO_TCPV4);
        assert_eq!(vnet.flags, virtio::F_NEEDS_CSUM);
        assert_eq!(usize::from(vnet.gso_size), mss);
        assert_eq!(
            (vnet.hdr_len, vnet.csum_start, vnet.csum_offset),
            (52, 20, 16)
        );
        assert_eq!(bytes.len(), 52 + 3 * mss + 500);
        assert_eq!(g.ip_len(0), bytes.len());
        let ip = crate::core::wire::ipv4::Packet::new_checked(&bytes[..]).unwrap();
        assert!(ip.verify_checksum());
        assert_eq!(ip.total_len(), bytes.len());
        assert_eq!(bytes[33] & TCP_PSH, TCP_PSH);
        let full = completed(bytes);
        assert!(l4_checksum_ok(&full));
        assert_eq!(full[52..], d.concat()[..]);
    }

    #[test]
    fn gaps_flags_and_bad_checksums_break_coalescing_without_reordering() {
        let mss = 1000;
        let mut pkts = vec![
            seg(&data(mss, 0), 0, 0x10),
            seg(&data(mss, 1), 1000, 0x10),
            // A gap in sequence space: starts a new output.
            seg(&data(mss, 2), 3000, 0x10),
            // A pure ACK of the same flow: its own output, closes the open one.
            seg(&[], 4000, 0x10),
            seg(&data(mss, 3), 4000, 0x10),
        ];
        let mut bad = seg(&data(mss, 4), 5000, 0x10);
        bad[60] ^= 0xff;
        pkts.push(bad);
        pkts.push(seg(&data(mss, 5), 6000, 0x11)); // FIN: never merged
        let mut other = seg(&data(mss, 6), 1000, 0x10);
        other[20..22].copy_from_slice(&40001u16.to_be_bytes());
        other[36..38].copy_from_slice(&[0, 0]);
        let c = csum::finish(csum::sum(
            &other[20..],
            csum::pseudo_v4(
                [192, 168, 0, 5],
                [192, 168, 128, 7],
                6,
                (other.len() - 20) as u16,
            ),
        ));
        other[36..38].copy_from_slice(&c.to_be_bytes());
        pkts.push(other);
        let mut g = Gro::with_capacity(16);
        for (i, p) in pkts.iter().enumerate() {
            g.push(i, p);
        }
        g.finish();
        let shape: Vec<(usize, u8)> = (0..g.len())
            .map(|i| (g.segments(i), VnetHdr::parse(g.header(i)).unwrap().flags))
            .collect();
        assert_eq!(
            shape,
            vec![
                (2, virtio::F_NEEDS_CSUM),
                (1, virtio::F_DATA_VALID),
                (1, virtio::F_DATA_VALID),
                (1, virtio::F_DATA_VALID),
                (1, 0),
                (1, virtio::F_DATA_VALID),
                (1, virtio::F_DATA_VALID),
            ]
        );
        // Singles go out unchanged.
        for i in 1..g.len() {
            let (_, bytes) = output(&g, &pkts, i);
            let src = g.parts(i).next().unwrap().0;
            assert_eq!(bytes, pkts[src]);
        }
        assert_eq!(g.merged(), 1);
    }

    #[test]
    fn size_limits_close_a_super_packet() {
        let mss = 1400;
        let pkts: Vec<Vec<u8>> = (0..50)
            .map(|i| seg(&data(mss, i), (i * mss) as u32, 0x10))
            .collect();
        let mut g = Gro::with_capacity(64);
        for (i, p) in pkts.iter().enumerate() {
            g.push(i, p);
        }
        g.finish();
        assert_eq!(g.len(), 2);
        assert!(g.ip_len(0) <= 65_535);
        assert_eq!(g.segments(0) + g.segments(1), 50);
        for i in 0..2 {
            let (_, bytes) = output(&g, &pkts, i);
            assert!(l4_checksum_ok(&completed(bytes)));
        }
    }

    #[test]
    fn non_tcp_and_garbage_pass_through() {
        let pkts = vec![vec![0x45u8; 10], vec![0x60; 60], vec![]];
        let mut g = Gro::with_capacity(4);
        for (i, p) in pkts.iter().enumerate() {
            g.push(i, p);
        }
        g.finish();
        assert_eq!(g.len(), 3);
        for i in 0..3 {
            assert_eq!(g.header(i), &[0u8; 10]);
            assert_eq!(output(&g, &pkts, i).1, pkts[i]);
        }
        g.clear();
        assert!(g.is_empty());
    }
}
