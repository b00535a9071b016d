//! Ethernet II header: destination, source, ethertype (no 802.1Q tags: weft never emits
//! them, and a tagged inner frame is rejected by its ethertype).

#[cfg(test)]
use super::WireError;

pub const HEADER_LEN: usize = 14;
pub(crate) const ETHERTYPE_IPV4: u16 = 0x0800;

mod field {
    use std::ops::Range;
    pub(crate) const DST: Range<usize> = 0..6;
    pub(crate) const SRC: Range<usize> = 6..12;
    pub(crate) const ETHERTYPE: Range<usize> = 12..14;
}

/// A view of an Ethernet frame over `buffer`.
#[derive(Debug, Clone)]
pub(crate) struct Frame<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> Frame<T> {
    /// Wraps a buffer already known to hold at least [`HEADER_LEN`] bytes; accessors on a
    /// shorter buffer panic, so external input goes through [`Frame::new_checked`].
    pub(crate) fn new_unchecked(buffer: T) -> Self {
        Frame { buffer }
    }

    #[cfg(test)]
    pub fn new_checked(buffer: T) -> Result<Self, WireError> {
        if buffer.as_ref().len() < HEADER_LEN {
            return Err(WireError::Truncated);
        }
        Ok(Frame { buffer })
    }

    #[cfg(test)]
    pub fn dst_addr(&self) -> [u8; 6] {
        mac(&self.buffer.as_ref()[field::DST])
    }

    #[cfg(test)]
    pub fn src_addr(&self) -> [u8; 6] {
        mac(&self.buffer.as_ref()[field::SRC])
    }

    pub fn ethertype(&self) -> u16 {
        let b = &self.buffer.as_ref()[field::ETHERTYPE];
        u16::from_be_bytes([b[0], b[1]])
    }

    pub fn payload(&self) -> &[u8] {
        &self.buffer.as_ref()[HEADER_LEN..]
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> Frame<T> {
    pub(crate) fn set_dst_addr(&mut self, addr: [u8; 6]) {
        self.buffer.as_mut()[field::DST].copy_from_slice(&addr);
    }

    pub fn set_src_addr(&mut self, addr: [u8; 6]) {
        self.buffer.as_mut()[field::SRC].copy_from_slice(&addr);
    }

    pub fn set_ethertype(&mut self, ethertype: u16) {
        self.buffer.as_mut()[field::ETHERTYPE].copy_from_slice(&ethertype.to_be_bytes());
    }
}

#[cfg(test)]
fn mac(b: &[u8]) -> [u8; 6] {
    let mut m = [0u8; 6];
    m.copy_from_slice(b);
    m
}

/// The header's fields, for parsing and emitting in one step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg(test)]
pub struct Repr {
    pub dst: [u8; 6],
    pub src: [u8; 6],
    pub ethertype: u16,
}

#[cfg(test)]
impl Repr {
    #[cfg(test)]
    pub fn parse<T: AsRef<[u8]>>(frame: &Frame<T>) -> Repr {
        Repr {
            dst: frame.dst_addr(),
            src: frame.src_addr(),
            ethertype: frame.ethertype(),
        }
    }

    /// Writes the header into the first [`HEADER_LEN`] bytes of `buf`.
    #[cfg(test)]
    pub fn emit(&self, buf: &mut [u8]) -> Result<(), WireError> {
        let mut frame = Frame::new_checked(buf)?;
        frame.set_dst_addr(self.dst);
        frame.set_src_addr(self.src);
        frame.set_ethertype(self.ethertype);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FRAME: [u8; 16] = [
        0x02, 0x77, 0x66, 0x00, 0x00, 0x02, // dst
        0x02, 0x77, 0x66, 0x00, 0x00, 0x01, // src
        0x08, 0x00, // ethertype
        0xaa, 0xbb, // payload
    ];

    #[test]
    fn parses_fields() {
        let f = Frame::new_checked(&FRAME[..]).unwrap();
        assert_eq!(f.dst_addr(), [0x02, 0x77, 0x66, 0, 0, 2]);
        assert_eq!(f.src_addr(), [0x02, 0x77, 0x66, 0, 0, 1]);
        assert_eq!(f.ethertype(), ETHERTYPE_IPV4);
        assert_eq!(f.payload(), &[0xaa, 0xbb]);
    }

    #[test]
    fn rejects_short_buffers() {
        for len in 0..HEADER_LEN {
            assert_eq!(
                Frame::new_checked(&FRAME[..len]).err(),
                Some(WireError::Truncated)
            );
        }
        assert!(Frame::new_checked(&FRAME[..HEADER_LEN]).is_ok());
    }

    #[test]
    fn emit_matches_bytes_and_round_trips() {
        let repr = Repr::parse(&Frame::new_checked(&FRAME[..]).unwrap());
        let mut buf = [0u8; 16];
        repr.emit(&mut buf).unwrap();
        assert_eq!(&buf[..HEADER_LEN], &FRAME[..HEADER_LEN]);
        assert_eq!(repr.emit(&mut [0u8; 13]), Err(WireError::Truncated));
    }
}
