//! VXLAN header (RFC 7348 section 5):
//!
//! ```text
//! byte 0     flags: 0x08 = I (VNI valid); the other bits are reserved
//! bytes 1-3  reserved
//! bytes 4-6  VNI (24 bits, big-endian)
//! byte 7     reserved
//! ```
//!
//! Senders write reserved fields as zero; receivers ignore them (RFC 7348), so a view
//! only exposes the I flag and the VNI.

#[cfg(test)]
use super::WireError;

pub const HEADER_LEN: usize = 8;
/// The I flag: the VNI field is valid. Required on receipt.
pub(crate) const FLAG_I: u8 = 0x08;
/// VNIs are 24 bits wide.
pub(crate) const MAX_VNI: u32 = 0x00ff_ffff;

mod field {
    use std::ops::Range;
    pub(crate) const FLAGS: usize = 0;
    pub(crate) const RESERVED1: Range<usize> = 1..4;
    pub const VNI: Range<usize> = 4..7;
    pub(crate) const RESERVED2: usize = 7;
}

#[derive(Debug, Clone)]
pub(crate) struct Packet<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> Packet<T> {
    /// Wraps a buffer known to hold at least [`HEADER_LEN`] bytes; external input goes
    /// through [`Packet::new_checked`].
    pub(crate) fn new_unchecked(buffer: T) -> Self {
        Packet { buffer }
    }

    #[cfg(test)]
    pub fn new_checked(buffer: T) -> Result<Self, WireError> {
        if buffer.as_ref().len() < HEADER_LEN {
            return Err(WireError::Truncated);
        }
        Ok(Packet { buffer })
    }

    pub fn flags(&self) -> u8 {
        self.buffer.as_ref()[field::FLAGS]
    }

    /// Whether the I flag is set (reserved flag bits are ignored).
    pub(crate) fn vni_valid(&self) -> bool {
        self.flags() & FLAG_I != 0
    }

    pub fn vni(&self) -> u32 {
        let b = &self.buffer.as_ref()[field::VNI];
        u32::from_be_bytes([0, b[0], b[1], b[2]])
    }

    pub fn payload(&self) -> &[u8] {
        &self.buffer.as_ref()[HEADER_LEN..]
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> Packet<T> {
    /// Writes the I flag, the VNI (its low 24 bits) and zeroes every reserved field.
    pub(crate) fn set_header(&mut self, vni: u32) {
        let b = self.buffer.as_mut();
        b[field::FLAGS] = FLAG_I;
        b[field::RESERVED1].fill(0);
        b[field::VNI].copy_from_slice(&vni.to_be_bytes()[1..]);
        b[field::RESERVED2] = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn emits_rfc_layout() {
        let mut buf = [0xffu8; 9];
        Packet::new_checked(&mut buf[..])
            .unwrap()
            .set_header(0x12_3456);
        assert_eq!(buf, [0x08, 0, 0, 0, 0x12, 0x34, 0x56, 0, 0xff]);
    }

    #[test]
    fn parses_and_ignores_reserved_bits() {
        let buf = [0x08 | 0xf7, 0xaa, 0xbb, 0xcc, 0x00, 0x77, 0x66, 0xdd];
        let p = Packet::new_checked(&buf[..]).unwrap();
        assert!(p.vni_valid());
        assert_eq!(p.vni(), 0x7766);
        assert!(p.payload().is_empty());
        let no_i = [0xf7, 0, 0, 0, 0, 0x77, 0x66, 0];
        assert!(!Packet::new_checked(&no_i[..]).unwrap().vni_valid());
    }

    #[test]
    fn rejects_short() {
        for len in 0..HEADER_LEN {
            assert_eq!(
                Packet::new_checked(&[0u8; 8][..len]).err(),
                Some(WireError::Truncated)
            );
        }
    }
}
