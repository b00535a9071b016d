//! The `virtio_net_hdr` that a TUN device opened with `IFF_VNET_HDR` puts in front of
//! every packet (Linux `include/uapi/linux/virtio_net.h`, legacy layout: 10 bytes in the
//! host's byte order).
//!
//! On reads it tells whether the packet is a segmentation-offload super-packet
//! (`gso_type`, `gso_size`) and whether its transport checksum is still to be computed
//! (`NEEDS_CSUM` with `csum_start`/`csum_offset`). On writes it lets weft hand the
//! kernel one coalesced packet instead of many.

pub const LEN: usize = 10;

/// `VIRTIO_NET_HDR_F_NEEDS_CSUM`: the checksum field holds the pseudo-header sum; the
/// sum over `csum_start..` is still to be added (the kernel's `CHECKSUM_PARTIAL`).
pub const F_NEEDS_CSUM: u8 = 1;
/// `VIRTIO_NET_HDR_F_DATA_VALID`: the checksum was verified (`CHECKSUM_UNNECESSARY`).
pub(crate) const F_DATA_VALID: u8 = 2;

pub const GSO_NONE: u8 = 0;
pub const GSO_TCPV4: u8 = 1;
#[cfg(test)]
pub(crate) const GSO_TCPV6: u8 = 4;
pub(crate) const GSO_UDP_L4: u8 = 5;
/// Flag bit of `gso_type`: the super-packet had ECN CWR set (TCP's segmentation keeps
/// CWR on the first segment only, which splitting does anyway).
pub(crate) const GSO_ECN: u8 = 0x80;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VnetHdr {
    pub flags: u8,
    pub gso_type: u8,
    pub hdr_len: u16,
    pub gso_size: u16,
    pub csum_start: u16,
    pub csum_offset: u16,
}

impl VnetHdr {
    /// Parses the first [`LEN`] bytes; `None` if `b` is shorter.
    pub fn parse(b: &[u8]) -> Option<VnetHdr> {
        let b = b.get(..LEN)?;
        let u = |i: usize| u16::from_ne_bytes([b[i], b[i + 1]]);
        Some(VnetHdr {
            flags: b[0],
            gso_type: b[1],
            hdr_len: u(2),
            gso_size: u(4),
            csum_start: u(6),
            csum_offset: u(8),
        })
    }

    /// Writes the header into `out`.
    pub fn emit(&self, out: &mut [u8; LEN]) {
        out[0] = self.flags;
        out[1] = self.gso_type;
        out[2..4].copy_from_slice(&self.hdr_len.to_ne_bytes());
        out[4..6].copy_from_slice(&self.gso_size.to_ne_bytes());
        out[6..8].copy_from_slice(&self.csum_start.to_ne_bytes());
        out[8..10].copy_from_slice(&self.csum_offset.to_ne_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let h = VnetHdr {
            flags: F_NEEDS_CSUM,
            gso_type: GSO_TCPV4,
            hdr_len: 52,
            gso_size: 1398,
            csum_start: 20,
            csum_offset: 16,
        };
        let mut b = [0u8; LEN];
        h.emit(&mut b);
        assert_eq!(VnetHdr::parse(&b), Some(h));
        assert_eq!(VnetHdr::parse(&b[..9]), None);
    }
}
