//! Splitting a TUN super-packet (TSO/USO, up to 64 KiB behind a `virtio_net_hdr`) into
//! wire-sized segments, without copying the payload.
//!
//! Each segment is described as a header built in an [`Arena`] (`prefix` bytes left for
//! the caller's encapsulation, then the segment's own IPv4 and TCP/UDP headers) plus a
//! range of the original packet's payload. The I/O layer hands both to one scatter-gather
//! `sendmsg` (UDP GSO), so the only pass user space makes over the payload is the
//! checksum. Segmentation follows what the kernel's TSO would have put on the wire:
//! IPv4 ids incremented per segment, TCP sequence numbers advanced, FIN/PSH only on the
//! last segment and CWR only on the first, full transport checksums.

use super::csum;
use super::virtio::{self, VnetHdr};
use std::ops::Range;

/// Largest IPv4 + TCP header pair (60 + 60 bytes).
pub(crate) const MAX_HEADERS: usize = 120;

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub(crate) enum GsoError {
    #[error("packet shorter than its headers")]
    Truncated,
    #[error("super-packet is not IPv4")]
    NotIpv4,
    #[error("offload header inconsistent with the packet")]
    BadOffloadHeader,
    #[error("segmentation type {0:#x} not supported")]
    Unsupported(u8),
    #[error("no room left in the segment arena")]
    NoRoom,
}

/// One segment: `hdr` indexes the arena, `payload` the original packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Segment {
    pub hdr: Range<usize>,
    pub payload: Range<usize>,
}

impl Segment {
    /// Bytes on the wire (encapsulation prefix included).
    pub fn len(&self) -> usize {
        self.hdr.len() + self.payload.len()
    }
}

/// A bump allocator for segment headers, reset once per batch.
#[derive(Debug)]
pub(crate) struct Arena {
    buf: Box<[u8]>,
    used: usize,
}

impl Arena {
    pub fn new(bytes: usize) -> Arena {
        Arena {
            buf: vec![0u8; bytes].into_boxed_slice(),
            used: 0,
        }
    }

    pub fn reset(&mut self) {
        self.used = 0;
    }

    pub fn used(&self) -> usize {
        self.used
    }

    /// Frees everything allocated after `mark` (a value of [`Arena::used`]).
    pub(crate) fn rewind(&mut self, mark: usize) {
        self.used = self.used.min(mark);
    }

    pub fn remaining(&self) -> usize {
        self.buf.len() - self.used
    }

    fn alloc(&mut self, n: usize) -> Option<Range<usize>> {
        let end = self.used.checked_add(n).filter(|&e| e <= self.buf.len())?;
        let r = self.used..end;
        self.used = end;
        Some(r)
    }

    pub fn get(&self, r: Range<usize>) -> &[u8] {
        &self.buf[r]
    }

    pub fn get_mut(&mut self, r: Range<usize>) -> &mut [u8] {
        &mut self.buf[r]
    }
}

/// The result of splitting one TUN read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Split {
    /// Segments appended to the output.
    pub segments: usize,
    /// IPv4 length of the largest segment: what has to fit the path MTU.
    pub max_ip_len: usize,
}

const TCP_FIN: u8 = 0x01;
const TCP_PSH: u8 = 0x08;
const TCP_CWR: u8 = 0x80;

/// Splits `packet` (the bytes after the `virtio_net_hdr`) into segments appended to
/// `out`, headers in `arena` behind `prefix` reserved bytes each. A packet without
/// segmentation becomes one segment whose payload is the whole packet (its pending
/// checksum, if any, completed in place). On error nothing is appended and the arena is
/// unchanged; [`GsoError::NoRoom`] means the caller should flush and retry with empty
/// buffers.
pub fn split(
    vnet: &VnetHdr,
    packet: &mut [u8],
    arena: &mut Arena,
    prefix: usize,
    out: &mut Vec<Segment>,
    max_segments: usize,
) -> Result<Split, GsoError> {
    let gso_type = vnet.gso_type & !virtio::GSO_ECN;
    if gso_type == virtio::GSO_NONE {
        if vnet.flags & virtio::F_NEEDS_CSUM != 0 {
            complete_checksum(packet, vnet.csum_start.into(), vnet.csum_offset.into())?;
        }
        if out.len() >= max_segments {
            return Err(GsoError::NoRoom);
        }
        let hdr = arena.alloc(prefix).ok_or(GsoError::NoRoom)?;
        out.push(Segment {
            hdr,
            payload: 0..packet.len(),
        });
        return Ok(Split {
            segments: 1,
            max_ip_len: packet.len(),
        });
    }
    let is_tcp = match gso_type {
        virtio::GSO_TCPV4 => true,
        virtio::GSO_UDP_L4 => false,
        other => return Err(GsoError::Unsupported(other)),
    };
    let first = *packet.first().ok_or(GsoError::Truncated)?;
    if first >> 4 != 4 {
        return Err(GsoError::NotIpv4);
    }
    let iph = usize::from(first & 0x0f) * 4;
    // The kernel's hdr_len may cover a whole first segment on forwarded packets, so the
    // header lengths come from the packet itself (as in wireguard-go).
    if iph < 20 || usize::from(vnet.csum_start) != iph {
        return Err(GsoError::BadOffloadHeader);
    }
    let l4h = if is_tcp {
        let off = *packet.get(iph + 12).ok_or(GsoError::Truncated)?;
        let l = usize::from(off >> 4) * 4;
        if l < 20 {
            return Err(GsoError::BadOffloadHeader);
        }
        l
    } else {
        8
    };
    let hdr_len = iph + l4h;
    if packet.len() < hdr_len {
        return Err(GsoError::Truncated);
    }
    let gso = usize::from(vnet.gso_size);
    if gso == 0 {
        return Err(GsoError::BadOffloadHeader);
    }
    let payload_len = packet.len() - hdr_len;
    let n = payload_len.div_ceil(gso).max(1);
    if out.len() + n > max_segments || arena.remaining() < n * (prefix + hdr_len) {
        return Err(GsoError::NoRoom);
    }
    let (headers, _) = packet.split_at(hdr_len);
    let mut src = [0u8; 4];
    let mut dst = [0u8; 4];
    src.copy_from_slice(&headers[12..16]);
    dst.copy_from_slice(&headers[16..20]);
    let id0 = u16::from_be_bytes([headers[4], headers[5]]);
    let seq0 = if is_tcp {
        u32::from_be_bytes([
            headers[iph + 4],
            headers[iph + 5],
            headers[iph + 6],
            headers[iph + 7],
        ])
    } else {
        0
    };
    let proto = if is_tcp { 6 } else { 17 };
    let mut max_ip_len = 0;
    for i in 0..n {
        let start = hdr_len + i * gso;
        let end = (start + gso).min(packet.len());
        let seg_len = end - start;
        let l4_len = l4h + seg_len;
        let ip_len = hdr_len + seg_len;
        max_ip_len = max_ip_len.max(ip_len);
        // Capacity was checked above, so this cannot fail.
        let r = arena.alloc(prefix + hdr_len).ok_or(GsoError::NoRoom)?;
        let h = &mut arena.buf[r.start + prefix..r.end];
        h.copy_from_slice(headers);
        h[2..4].copy_from_slice(&(ip_len as u16).to_be_bytes());
        h[4..6].copy_from_slice(&id0.wrapping_add(i as u16).to_be_bytes());
        h[10..12].copy_from_slice(&[0, 0]);
        let ip_sum = csum::finish(csum::sum(&h[..iph], 0));
        h[10..12].copy_from_slice(&ip_sum.to_be_bytes());
        let l4 = &mut h[iph..];
        let csum_at = if is_tcp {
            l4[4..8].copy_from_slice(&seq0.wrapping_add((i * gso) as u32).to_be_bytes());
            if i + 1 != n {
                l4[13] &= !(TCP_FIN | TCP_PSH);
            }
            if i != 0 {
                l4[13] &= !TCP_CWR;
            }
            16
        } else {
            l4[4..6].copy_from_slice(&(l4_len as u16).to_be_bytes());
            6
        };
        l4[csum_at..csum_at + 2].copy_from_slice(&[0, 0]);
        let s = csum::sum(
            &packet[start..end],
            csum::sum(l4, csum::pseudo_v4(src, dst, proto, l4_len as u16)),
        );
        let mut c = csum::finish(s);
        if c == 0 && !is_tcp {
            c = 0xffff;
        }
        l4[csum_at..csum_at + 2].copy_from_slice(&c.to_be_bytes());
        out.push(Segment {
            hdr: r,
            payload: start..end,
        });
    }
    Ok(Split {
        segments: n,
        max_ip_len,
    })
}

/// Completes a `CHECKSUM_PARTIAL` packet: the field at `start + offset` holds the
/// pseudo-header sum; the sum over `start..` goes in its place.
pub(crate) fn complete_checksum(
    packet: &mut [u8],
    start: usize,
    offset: usize,
) -> Result<(), GsoError> {
    let at = start
        .checked_add(offset)
        .filter(|&at| at + 2 <= packet.len())
        .ok_or(GsoError::BadOffloadHeader)?;
    let mut c = csum::finish(csum::sum(&packet[start..], 0));
    // As the kernel does (CSUM_MANGLED_0): zero means "no checksum" to UDP.
    if c == 0 {
        c = 0xffff;
    }
    packet[at..at + 2].copy_from_slice(&c.to_be_bytes());
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::core::wire::ipv4;

    /// A TCP/IPv4 packet with timestamps-sized options, checksum left partial (pseudo
    /// header only) as the kernel hands TSO packets over.
    pub(crate) fn tcp_packet(payload: &[u8], seq: u32, flags: u8) -> Vec<u8> {
        let tcp_hl = 32;
        let total = 20 + tcp_hl + payload.len();
        let mut p = vec![0u8; total];
        let repr = ipv4::Repr {
            src: "192.168.0.5".parse().unwrap(),
            dst: "192.168.128.7".parse().unwrap(),
            protocol: ipv4::PROTO_TCP,
            ttl: 64,
            dont_frag: true,
            payload_len: tcp_hl + payload.len(),
        };
        // Emit with a length that may exceed 16 bits' worth of payload only in tests that
        // do not care about the IP length field.
        let _ = repr.emit(&mut p);
        p[4..6].copy_from_slice(&0x1234u16.to_be_bytes());
        ipv4::Packet::new_unchecked(&mut p[..]).fill_checksum();
        let t = &mut p[20..];
        t[0..2].copy_from_slice(&40000u16.to_be_bytes());
        t[2..4].copy_from_slice(&5201u16.to_be_bytes());
        t[4..8].copy_from_slice(&seq.to_be_bytes());
        t[8..12].copy_from_slice(&77u32.to_be_bytes());
        t[12] = ((tcp_hl / 4) as u8) << 4;
        t[13] = flags;
        t[14..16].copy_from_slice(&512u16.to_be_bytes());
        // NOP NOP TS
        t[20..32].copy_from_slice(&[1, 1, 8, 10, 0, 0, 0, 9, 0, 0, 0, 3]);
        t[32..].copy_from_slice(payload);
        p
    }

    pub(crate) fn l4_checksum_ok(ip: &[u8]) -> bool {
        let p = ipv4::Packet::new_checked(ip).unwrap();
        let mut src = [0u8; 4];
        let mut dst = [0u8; 4];
        src.copy_from_slice(&ip[12..16]);
        dst.copy_from_slice(&ip[16..20]);
        let l4 = p.payload();
        csum::fold(csum::sum(
            l4,
            csum::pseudo_v4(src, dst, p.protocol(), l4.len() as u16),
        )) == 0xffff
    }

    fn payload(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 13 + i / 256) as u8).collect()
    }

    fn segments_as_packets(
        arena: &Arena,
        packet: &[u8],
        out: &[Segment],
        prefix: usize,
    ) -> Vec<Vec<u8>> {
        out.iter()
            .map(|s| {
                let mut v = arena.get(s.hdr.clone())[prefix..].to_vec();
                v.extend_from_slice(&packet[s.payload.clone()]);
                v
            })
            .collect()
    }

    #[test]
    fn tcp_super_packet_splits_into_valid_segments() {
        let data = payload(5000);
        let mut pkt = tcp_packet(&data, 1000, 0x18 | TCP_FIN | TCP_CWR);
        let vnet = VnetHdr {
            flags: virtio::F_NEEDS_CSUM,
            gso_type: virtio::GSO_TCPV4 | virtio::GSO_ECN,
            hdr_len: 52,
            gso_size: 1398,
            csum_start: 20,
            csum_offset: 16,
        };
        let mut arena = Arena::new(4096);
        let mut out = Vec::new();
        let split = split(&vnet, &mut pkt, &mut arena, 22, &mut out, 64).unwrap();
        assert_eq!(split.segments, 4);
        assert_eq!(split.max_ip_len, 52 + 1398);
        let segs = segments_as_packets(&arena, &pkt, &out, 22);
        let mut joined = Vec::new();
        for (i, s) in segs.iter().enumerate() {
            let ip = ipv4::Packet::new_checked(&s[..]).unwrap();
            assert!(ip.verify_checksum());
            assert_eq!(ip.total_len(), s.len());
            assert_eq!(ip.ident(), 0x1234 + i as u16);
            assert!(l4_checksum_ok(s), "segment {i}");
            let seq = u32::from_be_bytes([s[24], s[25], s[26], s[27]]);
            assert_eq!(seq, 1000 + (i * 1398) as u32);
            let flags = s[33];
            assert_eq!(flags & TCP_CWR != 0, i == 0);
            assert_eq!(flags & (TCP_FIN | TCP_PSH) != 0, i == 3);
            assert_eq!(flags & 0x10, 0x10);
            joined.extend_from_slice(&s[52..]);
        }
        assert_eq!(segs[3].len(), 52 + 5000 - 3 * 1398);
        assert_eq!(joined, data);
        for s in &out {
            assert_eq!(s.hdr.len(), 22 + 52);
        }
    }

    #[test]
    fn udp_super_packet_splits_with_lengths_and_checksums() {
        let data = payload(3000);
        let mut pkt = vec![0u8; 28 + data.len()];
        ipv4::Repr {
            src: "192.168.0.5".parse().unwrap(),
            dst: "192.168.128.7".parse().unwrap(),
            protocol: ipv4::PROTO_UDP,
            ttl: 64,
            dont_frag: false,
            payload_len: 8 + data.len(),
        }
        .emit(&mut pkt)
        .unwrap();
        pkt[20..22].copy_from_slice(&1111u16.to_be_bytes());
        pkt[22..24].copy_from_slice(&2222u16.to_be_bytes());
        pkt[28..].copy_from_slice(&data);
        let vnet = VnetHdr {
            flags: virtio::F_NEEDS_CSUM,
            gso_type: virtio::GSO_UDP_L4,
            hdr_len: 28,
            gso_size: 1200,
            csum_start: 20,
            csum_offset: 6,
        };
        let mut arena = Arena::new(4096);
        let mut out = Vec::new();
        let s = split(&vnet, &mut pkt, &mut arena, 0, &mut out, 64).unwrap();
        assert_eq!(s.segments, 3);
        for (i, seg) in segments_as_packets(&arena, &pkt, &out, 0)
            .iter()
            .enumerate()
        {
            assert!(l4_checksum_ok(seg));
            let udp_len = u16::from_be_bytes([seg[24], seg[25]]) as usize;
            assert_eq!(udp_len, seg.len() - 20);
            assert_eq!(udp_len - 8, if i < 2 { 1200 } else { 600 });
        }
    }

    #[test]
    fn plain_packet_gets_its_checksum_completed() {
        let data = payload(100);
        let mut pkt = tcp_packet(&data, 5, 0x18);
        // Partial checksum: the folded pseudo-header sum, as the kernel leaves it.
        let partial = csum::fold(csum::pseudo_v4(
            [192, 168, 0, 5],
            [192, 168, 128, 7],
            6,
            (pkt.len() - 20) as u16,
        ));
        pkt[36..38].copy_from_slice(&partial.to_be_bytes());
        assert!(!l4_checksum_ok(&pkt));
        let vnet = VnetHdr {
            flags: virtio::F_NEEDS_CSUM,
            csum_start: 20,
            csum_offset: 16,
            ..VnetHdr::default()
        };
        let mut arena = Arena::new(64);
        let mut out = Vec::new();
        let s = split(&vnet, &mut pkt, &mut arena, 22, &mut out, 64).unwrap();
        assert_eq!(s.segments, 1);
        assert_eq!(out[0].payload, 0..pkt.len());
        assert_eq!(out[0].hdr.len(), 22);
        assert!(l4_checksum_ok(&pkt));
    }

    #[test]
    fn rejects_inconsistent_offload_headers_without_side_effects() {
        let mut pkt = tcp_packet(&payload(3000), 0, 0x10);
        let good = VnetHdr {
            flags: virtio::F_NEEDS_CSUM,
            gso_type: virtio::GSO_TCPV4,
            hdr_len: 52,
            gso_size: 1000,
            csum_start: 20,
            csum_offset: 16,
        };
        let mut arena = Arena::new(4096);
        let mut out = Vec::new();
        let mut try_with = |v: VnetHdr, p: &mut [u8], arena: &mut Arena, cap: usize| {
            split(&v, p, arena, 22, &mut out, cap).map(|s| s.segments)
        };
        assert_eq!(
            try_with(
                VnetHdr {
                    gso_size: 0,
                    ..good
                },
                &mut pkt,
                &mut arena,
                64
            ),
            Err(GsoError::BadOffloadHeader)
        );
        assert_eq!(
            try_with(
                VnetHdr {
                    csum_start: 24,
                    ..good
                },
                &mut pkt,
                &mut arena,
                64
            ),
            Err(GsoError::BadOffloadHeader)
        );
        assert_eq!(
            try_with(
                VnetHdr {
                    gso_type: virtio::GSO_TCPV6,
                    ..good
                },
                &mut pkt,
                &mut arena,
                64
            ),
            Err(GsoError::Unsupported(virtio::GSO_TCPV6))
        );
        assert_eq!(
            try_with(good, &mut pkt, &mut arena, 2),
            Err(GsoError::NoRoom)
        );
        assert_eq!(
            try_with(good, &mut pkt[..30], &mut arena, 64),
            Err(GsoError::Truncated)
        );
        assert_eq!(arena.used(), 0);
        let mut small = Arena::new(100);
        assert_eq!(
            try_with(good, &mut pkt, &mut small, 64),
            Err(GsoError::NoRoom)
        );
        let mut v6 = pkt.clone();
        v6[0] = 0x60;
        assert_eq!(
            try_with(good, &mut v6, &mut arena, 64),
            Err(GsoError::NotIpv4)
        );
        assert_eq!(try_with(good, &mut pkt, &mut arena, 64), Ok(3));
        assert!(out.len() == 3);
    }
}
