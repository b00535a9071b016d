//! The schema of the node's persisted state (`<db-dir>/weft.json`) and its decoding.
//!
//! Pure: the I/O layer (`io::store`) writes the bytes atomically and moves corrupt files
//! aside; what the bytes mean, which versions are understood and what counts as corrupt is
//! decided here, so it is tested (and fuzzed) without a disk.

use crate::core::ipam::paxos::Acceptor;
use crate::core::ipam::{IpamState, Ring, SignKey};
use crate::core::mesh::secure::PublicKey;
use crate::core::mesh::PeerName;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::net::Ipv4Addr;

/// Current format version written by [`encode`]. Version 2 added the ring's peer records
/// (tombstones, incarnations), entry eras, this peer's incarnation and its Paxos acceptor
/// state; all default when absent, so version 1 files load unchanged.
pub(crate) const FORMAT_VERSION: u32 = 2;

/// Everything a node must find again after a restart.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PersistedState {
    /// File format version.
    pub version: u32,
    pub peer_name: Option<PeerName>,
    pub ipam: PersistedIpam,
    /// Nicknames (Kubernetes Node names) of the peers this node has met, so that a Node
    /// deleted while this node was down can still be matched to its ring member.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub nicknames: BTreeMap<PeerName, String>,
    /// The static key each peer name is bound to since first contact: a Hello under a
    /// known name with another key is refused (`rmpeer` releases a binding).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub keys: BTreeMap<PeerName, PublicKey>,
    /// The key each peer's ring records are signed with, bound with its static key.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub sign_keys: BTreeMap<PeerName, SignKey>,
    /// Allocations whose requester (the CNI plugin's ADD) has not confirmed them yet; they
    /// are freed if no confirmation comes in time, also after a restart.
    #[serde(default, skip_serializing_if = "std::collections::BTreeSet::is_empty")]
    pub tentative: std::collections::BTreeSet<String>,
}

/// The IPAM part, laid out as format 2 has it on disk: the acceptor of the consensus that
/// seeds the ring is kept next to the ring it decided.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct PersistedIpam {
    pub ring: Option<Ring>,
    /// Container id -> address.
    pub allocations: BTreeMap<String, Ipv4Addr>,
    #[serde(default)]
    pub incarnation: u32,
    /// Paxos acceptor state: a restart must not forget a promise.
    #[serde(default)]
    pub paxos: Acceptor,
}

impl PersistedState {
    pub fn new(peer_name: Option<PeerName>, ipam: IpamState, acceptor: Acceptor) -> Self {
        PersistedState {
            version: FORMAT_VERSION,
            peer_name,
            ipam: PersistedIpam {
                ring: ipam.ring,
                allocations: ipam.allocations,
                incarnation: ipam.incarnation,
                paxos: acceptor,
            },
            nicknames: BTreeMap::new(),
            keys: BTreeMap::new(),
            sign_keys: BTreeMap::new(),
            tentative: Default::default(),
        }
    }

    pub fn with_nicknames(mut self, nicknames: BTreeMap<PeerName, String>) -> Self {
        self.nicknames = nicknames;
        self
    }

    pub fn with_keys(mut self, keys: BTreeMap<PeerName, PublicKey>) -> Self {
        self.keys = keys;
        self
    }

    pub fn with_sign_keys(mut self, keys: BTreeMap<PeerName, SignKey>) -> Self {
        self.sign_keys = keys;
        self
    }

    pub fn with_tentative(mut self, ids: std::collections::BTreeSet<String>) -> Self {
        self.tentative = ids;
        self
    }

    /// The allocator's part.
    pub fn ipam_state(&self) -> IpamState {
        IpamState {
            ring: self.ipam.ring.clone(),
            allocations: self.ipam.allocations.clone(),
            incarnation: self.ipam.incarnation,
        }
    }

    pub fn acceptor(&self) -> &Acceptor {
        &self.ipam.paxos
    }

    /// Whether the file records a ring or allocations (losing it would lose addresses).
    pub(crate) fn holds_addresses(&self) -> bool {
        self.ipam.ring.is_some() || !self.ipam.allocations.is_empty()
    }
}

/// Why bytes are not a state this weft can use.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// Written by a newer weft: leave it alone, do not treat it as corrupt.
    #[error("format version {found}; this weft understands up to {FORMAT_VERSION}")]
    NewerVersion { found: u32 },
    #[error("{0}")]
    Corrupt(String),
}

/// Decodes a state file's bytes.
pub fn decode(bytes: &[u8]) -> Result<PersistedState, DecodeError> {
    // The version first, so that a newer format is reported as such, not as corrupt.
    #[derive(Deserialize)]
    struct VersionOnly {
        version: u32,
    }
    match serde_json::from_slice::<VersionOnly>(bytes) {
        Ok(v) if v.version == 0 => return Err(DecodeError::Corrupt("format version 0".into())),
        Ok(v) if v.version > FORMAT_VERSION => {
            return Err(DecodeError::NewerVersion { found: v.version })
        }
        _ => {}
    }
    serde_json::from_slice::<PersistedState>(bytes).map_err(|e| {
        DecodeError::Corrupt(if bytes.is_empty() {
            format!("empty file ({e})")
        } else {
            e.to_string()
        })
    })
}

/// Encodes a state as it is written to disk (pretty JSON, for operators reading it).
pub fn encode(state: &PersistedState) -> Vec<u8> {
    // Serialising these types cannot fail: no maps with non-string keys, no failing
    // Serialize impls.
    let mut bytes = serde_json::to_vec_pretty(state).expect("persisted state serialises");
    bytes.push(b'\n');
    bytes
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::ipam::paxos::Ballot;
    use crate::core::ipam::Ipam;

    fn sample() -> PersistedState {
        let me = PeerName::parse("02:77:76:00:00:01").unwrap();
        let other = PeerName::parse("02:77:76:00:00:02").unwrap();
        let mut ipam = Ipam::new(me.clone(), "192.168.0.0/16".parse().unwrap());
        ipam.seed(&[me.clone(), other]).unwrap();
        ipam.allocate("weave:expose").unwrap();
        ipam.allocate("abc123").unwrap();
        let acceptor = Acceptor {
            promised: Some(Ballot {
                round: 3,
                proposer: me.clone(),
            }),
            accepted: None,
        };
        PersistedState::new(Some(me), ipam.state(), acceptor)
    }

    #[test]
    fn round_trips_and_restores_into_a_working_allocator() {
        let st = sample();
        let back = decode(&encode(&st)).unwrap();
        assert_eq!(back, st);
        assert_eq!(back.acceptor().max_round(), 3);
        let me = back.peer_name.clone().unwrap();
        let ipam = Ipam::restore(me, "192.168.0.0/16".parse().unwrap(), back.ipam_state()).unwrap();
        assert_eq!(ipam.active_count(), 2);
        assert!(back.holds_addresses());
    }

    #[test]
    fn the_acceptor_stays_where_format_2_keeps_it() {
        let v: serde_json::Value = serde_json::from_slice(&encode(&sample())).unwrap();
        assert_eq!(v["version"], 2);
        assert_eq!(v["ipam"]["paxos"]["promised"]["round"], 3);
    }

    #[test]
    fn version_1_files_still_load() {
        let v1 = br#"{
  "version": 1,
  "peer_name": "02:77:76:00:00:01",
  "ipam": {
    "ring": {
      "range": "10.32.0.0/24",
      "seeds": ["02:77:76:00:00:01", "02:77:76:00:00:02"],
      "entries": [
        {"start": 169869312, "owner": "02:77:76:00:00:01", "version": 1, "free": 126},
        {"start": 169869440, "owner": "02:77:76:00:00:02", "version": 0, "free": 127}
      ]
    },
    "allocations": {"weave:expose": "10.32.0.1"}
  }
}"#;
        let st = decode(v1).unwrap();
        assert_eq!(st.version, 1);
        assert_eq!(st.ipam.incarnation, 0);
        assert_eq!(st.acceptor(), &Acceptor::default());
        let ring = st.ipam.ring.as_ref().unwrap();
        assert!(ring.peers.is_empty());
        assert_eq!(ring.entries[0].era, 0);
        let me = st.peer_name.clone().unwrap();
        let ipam = Ipam::restore(me, "10.32.0.0/24".parse().unwrap(), st.ipam_state()).unwrap();
        assert_eq!(
            ipam.lookup("weave:expose"),
            Some("10.32.0.1".parse().unwrap())
        );
    }

    #[test]
    fn corrupt_and_newer_are_told_apart() {
        for junk in [&b"{ not json"[..], b"", b"{\"version\":1}", b"[1,2"] {
            assert!(
                matches!(decode(junk), Err(DecodeError::Corrupt(_))),
                "{junk:?}"
            );
        }
        assert!(matches!(
            decode(br#"{"version": 0}"#),
            Err(DecodeError::Corrupt(_))
        ));
        assert_eq!(
            decode(br#"{"version": 7, "whatever": true}"#),
            Err(DecodeError::NewerVersion { found: 7 })
        );
        let mut v = serde_json::to_value(sample()).unwrap();
        v["peer_name"] = serde_json::json!("not-a-mac");
        assert!(matches!(
            decode(&serde_json::to_vec(&v).unwrap()),
            Err(DecodeError::Corrupt(_))
        ));
    }
}
