//! IPv4 header (RFC 791) and the Internet checksum (RFC 1071).

use super::WireError;
use std::net::Ipv4Addr;

pub const MIN_HEADER_LEN: usize = 20;

pub const PROTO_ICMP: u8 = 1;
pub const PROTO_TCP: u8 = 6;
#[cfg(test)]
pub(crate) const PROTO_UDP: u8 = 17;

const FLAG_DF: u8 = 0x40;
#[cfg(test)]
const FLAG_MF: u8 = 0x20;

mod field {
    use std::ops::Range;
    pub(crate) const VER_IHL: usize = 0;
    pub(crate) const DSCP_ECN: usize = 1;
    pub(crate) const LENGTH: Range<usize> = 2..4;
    pub(crate) const IDENT: Range<usize> = 4..6;
    pub(crate) const FLG_OFF: Range<usize> = 6..8;
    pub(crate) const TTL: usize = 8;
    pub(crate) const PROTOCOL: usize = 9;
    pub(crate) const CHECKSUM: Range<usize> = 10..12;
    pub(crate) const SRC: Range<usize> = 12..16;
    pub(crate) const DST: Range<usize> = 16..20;
}

/// A view of an IPv4 packet. Once built with [`Packet::new_checked`], the header length
/// and total length are known to lie within the buffer, so the accessors never panic.
#[derive(Debug, Clone)]
pub(crate) struct Packet<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> Packet<T> {
    /// Wraps a buffer without checks; accessors may panic on a short or inconsistent
    /// buffer, so external input goes through [`Packet::new_checked`].
    pub(crate) fn new_unchecked(buffer: T) -> Self {
        Packet { buffer }
    }

    /// Validates version 4, IHL >= 5, header within the buffer and
    /// `header_len <= total_len <= buffer.len()` (trailing bytes, e.g. Ethernet padding,
    /// are allowed and excluded from [`Packet::payload`]).
    pub(crate) fn new_checked(buffer: T) -> Result<Self, WireError> {
        let b = buffer.as_ref();
        if b.len() < MIN_HEADER_LEN {
            return Err(WireError::Truncated);
        }
        if b[field::VER_IHL] >> 4 != 4 {
            return Err(WireError::NotIpv4);
        }
        let header_len = usize::from(b[field::VER_IHL] & 0x0f) * 4;
        if header_len < MIN_HEADER_LEN || header_len > b.len() {
            return Err(WireError::BadHeaderLen);
        }
        let total_len = usize::from(u16::from_be_bytes([b[2], b[3]]));
        if total_len < header_len || total_len > b.len() {
            return Err(WireError::BadTotalLen);
        }
        Ok(Packet { buffer })
    }

    #[cfg(test)]
    pub fn version(&self) -> u8 {
        self.buffer.as_ref()[field::VER_IHL] >> 4
    }

    /// Header length in bytes (IHL * 4).
    pub(crate) fn header_len(&self) -> usize {
        usize::from(self.buffer.as_ref()[field::VER_IHL] & 0x0f) * 4
    }

    pub fn total_len(&self) -> usize {
        usize::from(self.be16(field::LENGTH.start))
    }

    #[cfg(test)]
    pub fn ident(&self) -> u16 {
        self.be16(field::IDENT.start)
    }

    #[cfg(test)]
    pub fn dont_frag(&self) -> bool {
        self.buffer.as_ref()[field::FLG_OFF.start] & FLAG_DF != 0
    }

    #[cfg(test)]
    pub fn more_frags(&self) -> bool {
        self.buffer.as_ref()[field::FLG_OFF.start] & FLAG_MF != 0
    }

    /// Fragment offset in bytes.
    pub(crate) fn frag_offset(&self) -> usize {
        usize::from(self.be16(field::FLG_OFF.start) & 0x1fff) * 8
    }

    #[cfg(test)]
    pub fn ttl(&self) -> u8 {
        self.buffer.as_ref()[field::TTL]
    }

    pub fn protocol(&self) -> u8 {
        self.buffer.as_ref()[field::PROTOCOL]
    }

    #[cfg(test)]
    pub fn checksum(&self) -> u16 {
        self.be16(field::CHECKSUM.start)
    }

    pub fn src_addr(&self) -> Ipv4Addr {
        let b = &self.buffer.as_ref()[field::SRC];
        Ipv4Addr::new(b[0], b[1], b[2], b[3])
    }

    pub fn dst_addr(&self) -> Ipv4Addr {
        let b = &self.buffer.as_ref()[field::DST];
        Ipv4Addr::new(b[0], b[1], b[2], b[3])
    }

    /// Whether the header checksum is valid (a valid header sums to zero).
    #[cfg(test)]
    pub(crate) fn verify_checksum(&self) -> bool {
        checksum(&self.buffer.as_ref()[..self.header_len()]) == 0
    }

    /// The bytes after the header, up to the total length.
    pub fn payload(&self) -> &[u8] {
        &self.buffer.as_ref()[self.header_len()..self.total_len()]
    }

    fn be16(&self, at: usize) -> u16 {
        let b = self.buffer.as_ref();
        u16::from_be_bytes([b[at], b[at + 1]])
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> Packet<T> {
    pub(crate) fn set_version_and_header_len(&mut self, header_len: usize) {
        self.buffer.as_mut()[field::VER_IHL] = 0x40 | ((header_len / 4) as u8 & 0x0f);
    }

    pub fn set_dscp_ecn(&mut self, v: u8) {
        self.buffer.as_mut()[field::DSCP_ECN] = v;
    }

    pub fn set_total_len(&mut self, len: u16) {
        self.buffer.as_mut()[field::LENGTH].copy_from_slice(&len.to_be_bytes());
    }

    pub fn set_ident(&mut self, ident: u16) {
        self.buffer.as_mut()[field::IDENT].copy_from_slice(&ident.to_be_bytes());
    }

    /// Sets DF and clears MF and the fragment offset (weft only emits whole packets).
    pub(crate) fn set_flags_unfragmented(&mut self, dont_frag: bool) {
        let v: u16 = if dont_frag {
            u16::from(FLAG_DF) << 8
        } else {
            0
        };
        self.buffer.as_mut()[field::FLG_OFF].copy_from_slice(&v.to_be_bytes());
    }

    pub fn set_ttl(&mut self, ttl: u8) {
        self.buffer.as_mut()[field::TTL] = ttl;
    }

    pub fn set_protocol(&mut self, protocol: u8) {
        self.buffer.as_mut()[field::PROTOCOL] = protocol;
    }

    pub fn set_src_addr(&mut self, addr: Ipv4Addr) {
        self.buffer.as_mut()[field::SRC].copy_from_slice(&addr.octets());
    }

    pub fn set_dst_addr(&mut self, addr: Ipv4Addr) {
        self.buffer.as_mut()[field::DST].copy_from_slice(&addr.octets());
    }

    /// Computes the header checksum and stores it.
    pub(crate) fn fill_checksum(&mut self) {
        let header_len = self.header_len();
        let b = self.buffer.as_mut();
        b[field::CHECKSUM].copy_from_slice(&[0, 0]);
        let sum = checksum(&b[..header_len]);
        b[field::CHECKSUM].copy_from_slice(&sum.to_be_bytes());
    }
}

/// The fields of an option-less IPv4 header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Repr {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub protocol: u8,
    pub ttl: u8,
    pub dont_frag: bool,
    pub payload_len: usize,
}

impl Repr {
    /// Length of the packet this repr emits.
    pub(crate) fn total_len(&self) -> usize {
        MIN_HEADER_LEN + self.payload_len
    }

    /// Writes a 20-byte header with a valid checksum into the front of `buf`; the payload
    /// itself is the caller's. Fails if `buf` cannot hold the whole packet or the packet
    /// would exceed 65535 bytes.
    pub fn emit(&self, buf: &mut [u8]) -> Result<(), WireError> {
        let total = self.total_len();
        if buf.len() < total {
            return Err(WireError::Truncated);
        }
        let total16 = u16::try_from(total).map_err(|_| WireError::BadTotalLen)?;
        let mut p = Packet::new_unchecked(&mut buf[..total]);
        p.set_version_and_header_len(MIN_HEADER_LEN);
        p.set_dscp_ecn(0);
        p.set_total_len(total16);
        p.set_ident(0);
        p.set_flags_unfragmented(self.dont_frag);
        p.set_ttl(self.ttl);
        p.set_protocol(self.protocol);
        p.set_src_addr(self.src);
        p.set_dst_addr(self.dst);
        p.fill_checksum();
        Ok(())
    }
}

/// The Internet checksum (RFC 1071): the one's complement of the one's complement sum of
/// the data as big-endian 16-bit words, an odd last byte padded with zero. Over a header
/// that contains its own valid checksum, the result is 0.
pub fn checksum(data: &[u8]) -> u16 {
    let mut sum: u64 = 0;
    let mut words = data.chunks_exact(2);
    for w in &mut words {
        sum += u64::from(u16::from_be_bytes([w[0], w[1]]));
    }
    if let [last] = words.remainder() {
        sum += u64::from(u16::from_be_bytes([*last, 0]));
    }
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The header commonly used to illustrate the IPv4 checksum: 192.168.0.1 ->
    /// 192.168.0.199, UDP, TTL 64, DF, total length 0x73, checksum 0xb861.
    const HEADER: [u8; 20] = [
        0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0xb8, 0x61, 0xc0, 0xa8, 0x00,
        0x01, 0xc0, 0xa8, 0x00, 0xc7,
    ];

    fn packet_with_header() -> Vec<u8> {
        let mut v = HEADER.to_vec();
        v.resize(0x73, 0xee);
        v
    }

    #[test]
    fn checksum_known_vectors() {
        // RFC 1071 section 3 example: the sum of these words is 0xddf2.
        assert_eq!(
            checksum(&[0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7]),
            !0xddf2
        );
        let mut h = HEADER;
        h[10] = 0;
        h[11] = 0;
        assert_eq!(checksum(&h), 0xb861);
        assert_eq!(checksum(&HEADER), 0);
        assert_eq!(checksum(&[]), 0xffff);
        // Odd length: the last byte is the high half of a zero-padded word.
        assert_eq!(checksum(&[0x12]), !0x1200);
        // Carries fold back in: 0xffff + 0x0001 = 0x1_0000 -> 0x0001.
        assert_eq!(checksum(&[0xff, 0xff, 0x00, 0x01]), !0x0001);
    }

    #[test]
    fn parses_fields() {
        let buf = packet_with_header();
        let p = Packet::new_checked(&buf[..]).unwrap();
        assert_eq!(p.version(), 4);
        assert_eq!(p.header_len(), 20);
        assert_eq!(p.total_len(), 0x73);
        assert!(p.dont_frag());
        assert!(!p.more_frags());
        assert_eq!(p.frag_offset(), 0);
        assert_eq!(p.ttl(), 64);
        assert_eq!(p.protocol(), PROTO_UDP);
        assert_eq!(p.checksum(), 0xb861);
        assert_eq!(p.src_addr(), Ipv4Addr::new(192, 168, 0, 1));
        assert_eq!(p.dst_addr(), Ipv4Addr::new(192, 168, 0, 199));
        assert!(p.verify_checksum());
        assert_eq!(p.payload().len(), 0x73 - 20);
    }

    #[test]
    fn trailing_padding_is_excluded_from_payload() {
        let mut buf = packet_with_header();
        buf.extend_from_slice(&[0; 6]);
        let p = Packet::new_checked(&buf[..]).unwrap();
        assert_eq!(p.payload().len(), 0x73 - 20);
    }

    #[test]
    fn rejects_malformed() {
        let good = packet_with_header();
        assert_eq!(
            Packet::new_checked(&good[..19]).err(),
            Some(WireError::Truncated)
        );
        let mut v6 = good.clone();
        v6[0] = 0x60;
        assert_eq!(Packet::new_checked(&v6[..]).err(), Some(WireError::NotIpv4));
        let mut short_ihl = good.clone();
        short_ihl[0] = 0x44;
        assert_eq!(
            Packet::new_checked(&short_ihl[..]).err(),
            Some(WireError::BadHeaderLen)
        );
        // IHL 15 = 60 bytes, beyond a 30-byte buffer.
        let mut long_ihl = good[..30].to_vec();
        long_ihl[0] = 0x4f;
        long_ihl[3] = 30;
        assert_eq!(
            Packet::new_checked(&long_ihl[..]).err(),
            Some(WireError::BadHeaderLen)
        );
        let mut too_long = good.clone();
        too_long[3] = 0x74;
        assert_eq!(
            Packet::new_checked(&too_long[..]).err(),
            Some(WireError::BadTotalLen)
        );
        let mut below_header = good.clone();
        below_header[2] = 0;
        below_header[3] = 19;
        assert_eq!(
            Packet::new_checked(&below_header[..]).err(),
            Some(WireError::BadTotalLen)
        );
    }

    #[test]
    fn verify_detects_corruption() {
        let mut buf = packet_with_header();
        buf[8] = 63;
        assert!(!Packet::new_checked(&buf[..]).unwrap().verify_checksum());
    }

    #[test]
    fn repr_emit_reproduces_known_header() {
        let repr = Repr {
            src: Ipv4Addr::new(192, 168, 0, 1),
            dst: Ipv4Addr::new(192, 168, 0, 199),
            protocol: PROTO_UDP,
            ttl: 64,
            dont_frag: true,
            payload_len: 0x73 - 20,
        };
        let mut buf = vec![0u8; 0x73];
        repr.emit(&mut buf).unwrap();
        assert_eq!(&buf[..20], &HEADER);
        assert_eq!(repr.emit(&mut buf[..0x72]), Err(WireError::Truncated));
    }

    #[test]
    fn options_count_towards_header_len() {
        let mut buf = [0u8; 28];
        let mut p = Packet::new_unchecked(&mut buf[..]);
        p.set_version_and_header_len(24);
        p.set_total_len(28);
        p.fill_checksum();
        let p = Packet::new_checked(&buf[..]).unwrap();
        assert_eq!(p.header_len(), 24);
        assert_eq!(p.payload().len(), 4);
        assert!(p.verify_checksum());
    }
}
