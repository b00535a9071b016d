//! Peer identity. A peer name looks like a MAC address (`02:77:66:12:34:56`), as in
//! Weave, so that operators recognise it; the nickname is the node's hostname.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::sync::Arc;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PeerNameError {
    #[error("peer name {0:?} is not six colon-separated hex octets like 02:77:66:00:00:01")]
    Malformed(String),
}

/// A peer's stable name: six hex octets, lower case, colon separated. Shared (`Arc`):
/// rings hold one per entry and are cloned on every gossip exchange.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct PeerName(Arc<str>);

impl PeerName {
    /// Parses `02:77:66:00:00:01` (case-insensitive); anything else is an error.
    pub fn parse(s: &str) -> Result<Self, PeerNameError> {
        let octets: Vec<&str> = s.split(':').collect();
        let well_formed = octets.len() == 6
            && octets
                .iter()
                .all(|o| o.len() == 2 && o.bytes().all(|b| b.is_ascii_hexdigit()));
        if well_formed {
            Ok(PeerName(s.to_ascii_lowercase().into()))
        } else {
            Err(PeerNameError::Malformed(s.to_string()))
        }
    }

    /// A name from six bytes; the locally-administered bit is set and the multicast bit
    /// cleared so the name is also a valid unicast MAC address for the inner Ethernet
    /// header.
    pub fn from_bytes(mut b: [u8; 6]) -> Self {
        b[0] = (b[0] | 0x02) & !0x01;
        PeerName(
            format!(
                "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
                b[0], b[1], b[2], b[3], b[4], b[5]
            )
            .into(),
        )
    }

    /// A stable name derived from a machine id (the contents of /etc/machine-id): the same
    /// machine always gets the same name, different machines practically never share one.
    pub(crate) fn from_machine_id(machine_id: &str) -> Self {
        // FNV-1a 64: stable across Rust versions, unlike `DefaultHasher`.
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in b"weft-peer-name:"
            .iter()
            .chain(machine_id.trim().as_bytes())
        {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        let x = h.to_be_bytes();
        PeerName::from_bytes([x[0], x[1], x[2], x[3], x[4], x[5]])
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The name as a MAC address, used as the inner Ethernet address of this peer.
    pub fn mac(&self) -> [u8; 6] {
        let mut mac = [0u8; 6];
        for (i, o) in self.0.split(':').enumerate() {
            // A PeerName is validated on construction, so every octet parses.
            mac[i] = u8::from_str_radix(o, 16).unwrap_or(0);
        }
        mac
    }
}

impl TryFrom<String> for PeerName {
    type Error = PeerNameError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        PeerName::parse(&s)
    }
}

impl From<PeerName> for String {
    fn from(p: PeerName) -> String {
        p.0.to_string()
    }
}

impl fmt::Display for PeerName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::str::FromStr for PeerName {
    type Err = PeerNameError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        PeerName::parse(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_normalises() {
        let p = PeerName::parse("02:77:66:AB:00:01").unwrap();
        assert_eq!(p.as_str(), "02:77:66:ab:00:01");
        assert_eq!(p.mac(), [0x02, 0x77, 0x66, 0xab, 0x00, 0x01]);
    }

    #[test]
    fn rejects_malformed() {
        for bad in [
            "",
            "02:77:66:00:00",
            "02:77:66:00:00:0g",
            "0277:66:00:00:01:02",
            "n1",
        ] {
            assert!(PeerName::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn machine_id_names_are_stable_unicast_and_distinct() {
        let a = PeerName::from_machine_id("0123456789abcdef0123456789abcdef\n");
        let b = PeerName::from_machine_id("0123456789abcdef0123456789abcdef");
        let c = PeerName::from_machine_id("fedcba9876543210fedcba9876543210");
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert_eq!(a.mac()[0] & 0x03, 0x02);
    }
}
