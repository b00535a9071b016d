//! ICMP "fragmentation needed" (RFC 792 type 3 code 4, next-hop MTU per RFC 1191),
//! written back into the TUN device for packets too big for the overlay that must not be
//! fragmented, so the sender's path MTU discovery learns the overlay MTU.
//!
//! Like the kernel's own tunnels (`iptunnel_pmtud_build_icmp`), the error claims to come
//! from the original destination: weft has no address of its own on the overlay.

use super::csum;
use super::ipv4;

pub const TYPE_DEST_UNREACHABLE: u8 = 3;
pub(crate) const CODE_FRAG_NEEDED: u8 = 4;
/// RFC 1812 4.3.2.3: an ICMP error should not exceed 576 bytes.
pub const MAX_LEN: usize = 576;
const HEADER_LEN: usize = 8;

/// Writes into `out` the ICMP error for `orig` (an IPv4 packet) and returns its length,
/// or `None` when no error may be sent: `orig` is malformed, a non-first fragment, an
/// ICMP error itself, or from an unspecified, broadcast or multicast source (RFC 1122
/// 3.2.2), or `out` is too small.
pub(crate) fn frag_needed(orig: &[u8], mtu: u16, out: &mut [u8]) -> Option<usize> {
    let ip = ipv4::Packet::new_checked(orig).ok()?;
    if ip.frag_offset() != 0 {
        return None;
    }
    let src = ip.src_addr();
    if src.is_unspecified() || src.is_broadcast() || src.is_multicast() {
        return None;
    }
    if ip.protocol() == ipv4::PROTO_ICMP {
        match ip.payload().first() {
            // Errors: destination unreachable, source quench, redirect, time exceeded,
            // parameter problem.
            Some(3 | 4 | 5 | 11 | 12) | None => return None,
            _ => {}
        }
    }
    let quoted = ip
        .total_len()
        .min(MAX_LEN - ipv4::MIN_HEADER_LEN - HEADER_LEN);
    let repr = ipv4::Repr {
        src: ip.dst_addr(),
        dst: src,
        protocol: ipv4::PROTO_ICMP,
        ttl: 64,
        dont_frag: false,
        payload_len: HEADER_LEN + quoted,
    };
    let total = repr.total_len();
    let out = out.get_mut(..total)?;
    repr.emit(out).ok()?;
    let icmp = &mut out[ipv4::MIN_HEADER_LEN..];
    icmp[0] = TYPE_DEST_UNREACHABLE;
    icmp[1] = CODE_FRAG_NEEDED;
    icmp[2..6].copy_from_slice(&[0, 0, 0, 0]);
    icmp[6..8].copy_from_slice(&mtu.to_be_bytes());
    icmp[HEADER_LEN..].copy_from_slice(&orig[..quoted]);
    let c = csum::finish(csum::sum(icmp, 0));
    icmp[2..4].copy_from_slice(&c.to_be_bytes());
    Some(total)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    fn packet(protocol: u8, len: usize, first_payload_byte: u8) -> Vec<u8> {
        let mut p = vec![0xabu8; len];
        ipv4::Repr {
            src: Ipv4Addr::new(192, 168, 0, 5),
            dst: Ipv4Addr::new(192, 168, 128, 7),
            protocol,
            ttl: 63,
            dont_frag: true,
            payload_len: len - 20,
        }
        .emit(&mut p)
        .unwrap();
        p[20] = first_payload_byte;
        p
    }

    #[test]
    fn builds_a_valid_frag_needed_error() {
        let orig = packet(ipv4::PROTO_TCP, 1500, 0x9c);
        let mut out = [0u8; MAX_LEN];
        let n = frag_needed(&orig, 1450, &mut out).unwrap();
        assert_eq!(n, MAX_LEN);
        let ip = ipv4::Packet::new_checked(&out[..n]).unwrap();
        assert!(ip.verify_checksum());
        assert_eq!(ip.protocol(), ipv4::PROTO_ICMP);
        assert_eq!(ip.src_addr(), Ipv4Addr::new(192, 168, 128, 7));
        assert_eq!(ip.dst_addr(), Ipv4Addr::new(192, 168, 0, 5));
        assert!(!ip.dont_frag());
        let icmp = ip.payload();
        assert_eq!(csum::fold(csum::sum(icmp, 0)), 0xffff);
        assert_eq!((icmp[0], icmp[1]), (3, 4));
        assert_eq!(u16::from_be_bytes([icmp[6], icmp[7]]), 1450);
        assert_eq!(&icmp[8..], &orig[..MAX_LEN - 28]);

        // A short original is quoted whole.
        let small = packet(ipv4::PROTO_UDP, 100, 0);
        let n = frag_needed(&small, 1000, &mut out).unwrap();
        assert_eq!(n, 28 + 100);
        assert_eq!(&out[28..n], &small[..]);
    }

    #[test]
    fn never_answers_errors_fragments_or_garbage() {
        let mut out = [0u8; MAX_LEN];
        assert_eq!(
            frag_needed(&packet(ipv4::PROTO_ICMP, 600, 3), 1400, &mut out),
            None
        );
        assert!(frag_needed(&packet(ipv4::PROTO_ICMP, 600, 8), 1400, &mut out).is_some());
        let mut frag = packet(ipv4::PROTO_UDP, 600, 0);
        frag[6] = 0x00;
        frag[7] = 0x10;
        assert_eq!(frag_needed(&frag, 1400, &mut out), None);
        let mut bcast = packet(ipv4::PROTO_UDP, 600, 0);
        bcast[12..16].copy_from_slice(&[255, 255, 255, 255]);
        assert_eq!(frag_needed(&bcast, 1400, &mut out), None);
        assert_eq!(frag_needed(&[0x45, 0, 0], 1400, &mut out), None);
        assert_eq!(
            frag_needed(&packet(ipv4::PROTO_TCP, 600, 0), 1400, &mut [0u8; 100]),
            None
        );
    }
}
