//! weft's data-plane encapsulation: an inner IPv4 packet carried in an RFC 7348 VXLAN
//! datagram (VXLAN header + inner Ethernet header + IPv4 packet) over UDP.
//!
//! Encapsulation is in place: the loop reads a TUN packet at offset
//! [`VXLAN_OVERHEAD_INNER`] of its buffer and [`encapsulate`] fills the 22 bytes in front,
//! so the datagram is sent from the same buffer without a copy.

use super::{ethernet, ipv4, vxlan, WireError};
use std::net::Ipv4Addr;
use std::ops::Range;

/// VXLAN header (8) + inner Ethernet header (14): where the inner IP packet starts in a
/// datagram, and where the transmit loop places TUN reads.
pub const VXLAN_OVERHEAD_INNER: usize = vxlan::HEADER_LEN + ethernet::HEADER_LEN;

/// Outer IPv4 (20) + UDP (8) + [`VXLAN_OVERHEAD_INNER`] (22). The overlay MTU rule:
/// default MTU = underlay MTU - 50, so an encapsulated full-size packet fits the underlay
/// without fragmentation (the same overhead as Linux's kernel VXLAN over IPv4).
pub const ENCAP_OVERHEAD_IPV4: u32 = 20 + 8 + VXLAN_OVERHEAD_INNER as u32;

/// The VNI every weft datagram carries. weft runs one flat overlay per cluster, so the VNI
/// only has to identify weft traffic: 0x7766 is ASCII "wf", and rejecting other VNIs keeps
/// stray VXLAN traffic sent to the data port (another overlay, a kernel VXLAN device with
/// a different id) out of the TUN device.
pub const WEFT_VNI: u32 = 0x7766;

// The MTU rule and the wire layout depend on these; checked at compile time.
const _: () = assert!(VXLAN_OVERHEAD_INNER == 22);
const _: () = assert!(ENCAP_OVERHEAD_IPV4 == 50);
const _: () = assert!(WEFT_VNI <= vxlan::MAX_VNI);

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum EncapError {
    #[error("buffer cannot hold the VXLAN and Ethernet headers in front of the packet")]
    BufferTooSmall,
    #[error("VNI {0:#x} does not fit in 24 bits")]
    BadVni(u32),
    #[error("inner packet: {0}")]
    Inner(WireError),
}

/// Why a received datagram was not accepted; each maps to a "malformed" drop sub-reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DecapError {
    #[error("datagram shorter than VXLAN + Ethernet + IPv4 headers")]
    Truncated,
    #[error("VXLAN I flag not set")]
    NoVniFlag,
    #[error("VNI {got:#x} is not ours")]
    WrongVni { got: u32 },
    #[error("inner ethertype {ethertype:#06x} is not IPv4")]
    NotIpv4Ethertype { ethertype: u16 },
    #[error("inner packet is not IP version 4")]
    InnerNotIpv4,
    #[error("inner IPv4 header length invalid")]
    InnerBadHeaderLen,
    #[error("inner IPv4 total length invalid")]
    InnerBadTotalLen,
}

impl DecapError {
    /// Number of distinct kinds, for per-kind counter arrays.
    pub(crate) const KINDS: usize = 7;

    /// Stable index in `0..KINDS`.
    pub fn index(&self) -> usize {
        match self {
            DecapError::Truncated => 0,
            DecapError::NoVniFlag => 1,
            DecapError::WrongVni { .. } => 2,
            DecapError::NotIpv4Ethertype { .. } => 3,
            DecapError::InnerNotIpv4 => 4,
            DecapError::InnerBadHeaderLen => 5,
            DecapError::InnerBadTotalLen => 6,
        }
    }

    /// Metric-friendly name of the kind with index `i` (`None` past the end).
    pub(crate) fn kind_name(i: usize) -> Option<&'static str> {
        [
            "truncated",
            "no_vni_flag",
            "wrong_vni",
            "not_ipv4_ethertype",
            "inner_not_ipv4",
            "inner_bad_header_len",
            "inner_bad_total_len",
        ]
        .get(i)
        .copied()
    }

    pub fn as_str(&self) -> &'static str {
        Self::kind_name(self.index()).unwrap_or("unknown")
    }
}

/// Where the inner packet lies in an accepted datagram, and its addresses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decapsulated {
    /// Byte range of the inner IPv4 packet (header + payload up to its total length;
    /// trailing padding excluded) within the datagram.
    pub inner_ip: Range<usize>,
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
}

/// Writes the VXLAN and Ethernet headers in front of the IPv4 packet that occupies
/// `buf[VXLAN_OVERHEAD_INNER..VXLAN_OVERHEAD_INNER + ip_len]`, after checking that it is a
/// well-formed IPv4 packet. Returns the datagram length: the datagram is
/// `buf[..len]`. Bytes past the packet's total length (if `ip_len` is larger) are left
/// out.
pub fn encapsulate(
    buf: &mut [u8],
    ip_len: usize,
    vni: u32,
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
) -> Result<usize, EncapError> {
    if vni > vxlan::MAX_VNI {
        return Err(EncapError::BadVni(vni));
    }
    let end = VXLAN_OVERHEAD_INNER
        .checked_add(ip_len)
        .filter(|&end| end <= buf.len())
        .ok_or(EncapError::BufferTooSmall)?;
    let (headers, rest) = buf.split_at_mut(VXLAN_OVERHEAD_INNER);
    let ip = ipv4::Packet::new_checked(&rest[..end - VXLAN_OVERHEAD_INNER])
        .map_err(EncapError::Inner)?;
    let datagram_len = VXLAN_OVERHEAD_INNER + ip.total_len();
    let (vx, eth) = headers.split_at_mut(vxlan::HEADER_LEN);
    vxlan::Packet::new_unchecked(vx).set_header(vni);
    let mut frame = ethernet::Frame::new_unchecked(eth);
    frame.set_dst_addr(dst_mac);
    frame.set_src_addr(src_mac);
    frame.set_ethertype(ethernet::ETHERTYPE_IPV4);
    Ok(datagram_len)
}

/// The 22 bytes (VXLAN + inner Ethernet header) that precede every inner packet sent to
/// one peer: built once per peer and batch, then copied in front of each segment.
pub fn header(
    vni: u32,
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
) -> Result<[u8; VXLAN_OVERHEAD_INNER], EncapError> {
    if vni > vxlan::MAX_VNI {
        return Err(EncapError::BadVni(vni));
    }
    let mut h = [0u8; VXLAN_OVERHEAD_INNER];
    let (vx, eth) = h.split_at_mut(vxlan::HEADER_LEN);
    vxlan::Packet::new_unchecked(vx).set_header(vni);
    let mut frame = ethernet::Frame::new_unchecked(eth);
    frame.set_dst_addr(dst_mac);
    frame.set_src_addr(src_mac);
    frame.set_ethertype(ethernet::ETHERTYPE_IPV4);
    Ok(h)
}

/// Validates a received datagram and locates its inner IPv4 packet. Reserved VXLAN bits
/// and the inner MAC addresses are ignored (RFC 7348: receivers ignore reserved fields;
/// the inner frame is point-to-point, so its MACs carry no routing information).
pub fn decapsulate(datagram: &[u8], expected_vni: u32) -> Result<Decapsulated, DecapError> {
    if datagram.len() < VXLAN_OVERHEAD_INNER + ipv4::MIN_HEADER_LEN {
        return Err(DecapError::Truncated);
    }
    let vx = vxlan::Packet::new_unchecked(datagram);
    if !vx.vni_valid() {
        return Err(DecapError::NoVniFlag);
    }
    if vx.vni() != expected_vni {
        return Err(DecapError::WrongVni { got: vx.vni() });
    }
    let frame = ethernet::Frame::new_unchecked(vx.payload());
    if frame.ethertype() != ethernet::ETHERTYPE_IPV4 {
        return Err(DecapError::NotIpv4Ethertype {
            ethertype: frame.ethertype(),
        });
    }
    let ip = ipv4::Packet::new_checked(frame.payload()).map_err(|e| match e {
        WireError::NotIpv4 => DecapError::InnerNotIpv4,
        WireError::BadHeaderLen => DecapError::InnerBadHeaderLen,
        WireError::BadTotalLen => DecapError::InnerBadTotalLen,
        // Unreachable given the length check above; mapped rather than panicking.
        WireError::Truncated => DecapError::Truncated,
    })?;
    Ok(Decapsulated {
        inner_ip: VXLAN_OVERHEAD_INNER..VXLAN_OVERHEAD_INNER + ip.total_len(),
        src: ip.src_addr(),
        dst: ip.dst_addr(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const SRC_MAC: [u8; 6] = [0x02, 0x77, 0x66, 0x00, 0x00, 0x01];
    const DST_MAC: [u8; 6] = [0x02, 0x77, 0x66, 0x00, 0x00, 0x02];

    /// Builds a buffer holding `payload` in an IPv4 packet at the TUN read offset.
    fn tun_buffer(src: Ipv4Addr, dst: Ipv4Addr, payload: &[u8], slack: usize) -> (Vec<u8>, usize) {
        let repr = ipv4::Repr {
            src,
            dst,
            protocol: ipv4::PROTO_UDP,
            ttl: 64,
            dont_frag: true,
            payload_len: payload.len(),
        };
        let ip_len = repr.total_len();
        let mut buf = vec![0u8; VXLAN_OVERHEAD_INNER + ip_len + slack];
        let ip = &mut buf[VXLAN_OVERHEAD_INNER..VXLAN_OVERHEAD_INNER + ip_len];
        repr.emit(ip).unwrap();
        ip[ipv4::MIN_HEADER_LEN..].copy_from_slice(payload);
        (buf, ip_len)
    }

    fn valid_datagram() -> Vec<u8> {
        let (mut buf, ip_len) = tun_buffer(
            Ipv4Addr::new(192, 168, 1, 2),
            Ipv4Addr::new(192, 168, 200, 3),
            b"abcd",
            0,
        );
        let n = encapsulate(&mut buf, ip_len, WEFT_VNI, SRC_MAC, DST_MAC).unwrap();
        buf.truncate(n);
        buf
    }

    #[test]
    fn byte_exact_datagram() {
        let expected: Vec<u8> = [
            // VXLAN: I flag, reserved, VNI 0x007766, reserved
            &[0x08, 0, 0, 0, 0x00, 0x77, 0x66, 0][..],
            // Ethernet: dst, src, IPv4
            &[0x02, 0x77, 0x66, 0x00, 0x00, 0x02],
            &[0x02, 0x77, 0x66, 0x00, 0x00, 0x01],
            &[0x08, 0x00],
            // IPv4: 45 00, len 24, id 0, DF, ttl 64, udp, checksum, src, dst
            &[0x45, 0x00, 0x00, 0x18, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11],
            &[0xf0, 0x7e],
            &[192, 168, 1, 2, 192, 168, 200, 3],
            b"abcd",
        ]
        .concat();
        assert_eq!(valid_datagram(), expected);
        // The checksum above was computed by hand; confirm it with the checksum function.
        assert_eq!(ipv4::checksum(&expected[22..42]), 0);
    }

    #[test]
    fn header_matches_encapsulate() {
        let d = valid_datagram();
        assert_eq!(header(WEFT_VNI, SRC_MAC, DST_MAC).unwrap()[..], d[..22]);
        assert_eq!(
            header(0x100_0000, SRC_MAC, DST_MAC),
            Err(EncapError::BadVni(0x100_0000))
        );
    }

    #[test]
    fn round_trip() {
        let d = valid_datagram();
        let out = decapsulate(&d, WEFT_VNI).unwrap();
        assert_eq!(out.inner_ip, 22..d.len());
        assert_eq!(out.src, Ipv4Addr::new(192, 168, 1, 2));
        assert_eq!(out.dst, Ipv4Addr::new(192, 168, 200, 3));
        assert_eq!(&d[out.inner_ip][20..], b"abcd");
    }

    #[test]
    fn trailing_padding_is_excluded() {
        let mut d = valid_datagram();
        let len = d.len();
        d.extend_from_slice(&[0; 10]);
        assert_eq!(decapsulate(&d, WEFT_VNI).unwrap().inner_ip, 22..len);
    }

    #[test]
    fn reserved_bits_are_ignored_on_receipt() {
        let mut d = valid_datagram();
        d[0] |= 0xf7;
        d[1..4].copy_from_slice(&[1, 2, 3]);
        d[7] = 9;
        assert!(decapsulate(&d, WEFT_VNI).is_ok());
    }

    #[test]
    fn malformed_datagrams_are_rejected() {
        let good = valid_datagram();
        let with = |f: &dyn Fn(&mut Vec<u8>)| {
            let mut d = good.clone();
            f(&mut d);
            decapsulate(&d, WEFT_VNI)
        };
        for len in 0..42 {
            assert_eq!(
                decapsulate(&good[..len], WEFT_VNI),
                Err(DecapError::Truncated)
            );
        }
        assert_eq!(with(&|d| d[0] = 0), Err(DecapError::NoVniFlag));
        assert_eq!(
            with(&|d| d[6] = 0x67),
            Err(DecapError::WrongVni { got: 0x7767 })
        );
        assert_eq!(
            decapsulate(&good, 0x1234),
            Err(DecapError::WrongVni { got: WEFT_VNI })
        );
        assert_eq!(
            with(&|d| d[20..22].copy_from_slice(&[0x86, 0xdd])),
            Err(DecapError::NotIpv4Ethertype { ethertype: 0x86dd })
        );
        assert_eq!(with(&|d| d[22] = 0x65), Err(DecapError::InnerNotIpv4));
        assert_eq!(with(&|d| d[22] = 0x44), Err(DecapError::InnerBadHeaderLen));
        assert_eq!(with(&|d| d[22] = 0x4f), Err(DecapError::InnerBadHeaderLen));
        assert_eq!(with(&|d| d[25] = 0x19), Err(DecapError::InnerBadTotalLen));
        assert_eq!(
            with(&|d| d[24..26].copy_from_slice(&[0, 19])),
            Err(DecapError::InnerBadTotalLen)
        );
        assert_eq!(
            with(&|d| d.truncate(d.len() - 1)),
            Err(DecapError::InnerBadTotalLen)
        );
    }

    #[test]
    fn decap_error_kinds_are_distinct() {
        let names: std::collections::BTreeSet<_> = (0..DecapError::KINDS)
            .map(|i| DecapError::kind_name(i).unwrap())
            .collect();
        assert_eq!(names.len(), DecapError::KINDS);
        assert_eq!(DecapError::kind_name(DecapError::KINDS), None);
        assert_eq!(DecapError::WrongVni { got: 1 }.as_str(), "wrong_vni");
    }

    #[test]
    fn encapsulate_rejects_bad_input() {
        let (mut buf, ip_len) = tun_buffer(
            Ipv4Addr::new(10, 0, 0, 1),
            Ipv4Addr::new(10, 0, 0, 2),
            b"x",
            0,
        );
        assert_eq!(
            encapsulate(&mut buf, ip_len + 1, WEFT_VNI, SRC_MAC, DST_MAC),
            Err(EncapError::BufferTooSmall)
        );
        assert_eq!(
            encapsulate(&mut buf, usize::MAX, WEFT_VNI, SRC_MAC, DST_MAC),
            Err(EncapError::BufferTooSmall)
        );
        assert_eq!(
            encapsulate(&mut buf, ip_len, 0x100_0000, SRC_MAC, DST_MAC),
            Err(EncapError::BadVni(0x100_0000))
        );
        assert_eq!(
            encapsulate(&mut buf, 19, WEFT_VNI, SRC_MAC, DST_MAC),
            Err(EncapError::Inner(WireError::Truncated))
        );
        buf[22] = 0x60;
        assert_eq!(
            encapsulate(&mut buf, ip_len, WEFT_VNI, SRC_MAC, DST_MAC),
            Err(EncapError::Inner(WireError::NotIpv4))
        );
        buf[22] = 0x45;
        buf[25] += 1;
        assert_eq!(
            encapsulate(&mut buf, ip_len, WEFT_VNI, SRC_MAC, DST_MAC),
            Err(EncapError::Inner(WireError::BadTotalLen))
        );
    }

    #[test]
    fn encapsulate_uses_total_length_not_read_length() {
        let (mut buf, ip_len) = tun_buffer(
            Ipv4Addr::new(10, 0, 0, 1),
            Ipv4Addr::new(10, 0, 0, 2),
            b"xyz",
            5,
        );
        let n = encapsulate(&mut buf, ip_len + 5, WEFT_VNI, SRC_MAC, DST_MAC).unwrap();
        assert_eq!(n, 22 + ip_len);
    }

    proptest! {
        #[test]
        fn decapsulate_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200),
                                    vni in any::<u32>()) {
            if let Ok(d) = decapsulate(&bytes, vni) {
                prop_assert!(d.inner_ip.end <= bytes.len());
                prop_assert!(d.inner_ip.len() >= ipv4::MIN_HEADER_LEN);
            }
        }

        #[test]
        fn decapsulate_never_panics_on_mutated_datagrams(
            edits in proptest::collection::vec((0usize..64, any::<u8>()), 0..8),
            cut in 0usize..64,
        ) {
            let mut d = valid_datagram();
            for (at, v) in edits {
                if let Some(b) = d.get_mut(at) { *b = v; }
            }
            d.truncate(d.len().saturating_sub(cut));
            let _ = decapsulate(&d, WEFT_VNI);
        }

        #[test]
        fn encap_then_decap_is_identity(
            src in any::<u32>(), dst in any::<u32>(),
            payload in proptest::collection::vec(any::<u8>(), 0..1500),
            vni in 0u32..=vxlan::MAX_VNI,
            src_mac in any::<[u8; 6]>(), dst_mac in any::<[u8; 6]>(),
            slack in 0usize..16,
        ) {
            let (src, dst) = (Ipv4Addr::from(src), Ipv4Addr::from(dst));
            let (mut buf, ip_len) = tun_buffer(src, dst, &payload, slack);
            let inner = buf[22..22 + ip_len].to_vec();
            let n = encapsulate(&mut buf, ip_len, vni, src_mac, dst_mac).unwrap();
            prop_assert_eq!(n, 22 + ip_len);
            let out = decapsulate(&buf[..n], vni).unwrap();
            prop_assert_eq!(&buf[out.inner_ip.clone()], &inner[..]);
            prop_assert_eq!(out.src, src);
            prop_assert_eq!(out.dst, dst);
            let frame = ethernet::Frame::new_checked(&buf[8..22]).unwrap();
            prop_assert_eq!(frame.src_addr(), src_mac);
            prop_assert_eq!(frame.dst_addr(), dst_mac);
        }
    }
}
