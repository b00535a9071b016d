//! Signatures on the ring's peer records (tombstones and comebacks), so that a removal
//! is believed only as its remover's word, and a comeback only as the peer's own.
//!
//! Ed25519 through `ring` (already weft's AEAD): the Noise static key is X25519, which
//! cannot sign, so each node also has an Ed25519 key. It is derived from the static
//! private key (one secret in `--db-dir`, not two files that could get out of step) and
//! bound to the node's name like the static key: from the Hello on first contact, or from
//! the first record a member vouches for.
//!
//! Pure code: signing takes a seed from the caller, no randomness and no clock.

use crate::core::mesh::secure::{hex, unhex};
use crate::core::mesh::PeerName;
use ipnet::Ipv4Net;
use ring::signature::{Ed25519KeyPair, KeyPair, UnparsedPublicKey, ED25519};
use std::sync::Arc;

pub const SIGN_KEY_LEN: usize = 32;
pub const SIGNATURE_LEN: usize = 64;

/// A node's Ed25519 public key: what signatures on its records are checked against.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SignKey(pub [u8; SIGN_KEY_LEN]);

#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Signature(pub [u8; SIGNATURE_LEN]);

/// A signature and the key that made it. The key travels with the record so that a node
/// that never met the signer (it left the cluster before this node joined) can still
/// check it; a node that has the signer's key bound checks against that instead.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Signed {
    pub key: SignKey,
    pub sig: Signature,
}

/// The secret half, held by the node's IPAM.
#[derive(Clone)]
pub struct Signer {
    pair: Arc<Ed25519KeyPair>,
    public: SignKey,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Signer({})", self.public)
    }
}

impl Signer {
    /// The key pair for a 32-byte seed (the caller keeps the seed secret and stable).
    pub fn from_seed(seed: &[u8; 32]) -> Signer {
        let pair = Ed25519KeyPair::from_seed_unchecked(seed)
            .expect("every 32-byte string is an Ed25519 seed");
        let mut public = [0u8; SIGN_KEY_LEN];
        public.copy_from_slice(pair.public_key().as_ref());
        Signer {
            pair: Arc::new(pair),
            public: SignKey(public),
        }
    }

    /// The seed for a node's signing key: a BLAKE2s derivation of its static private key,
    /// so the key survives restarts with `--db-dir` and changes when the node is re-keyed.
    pub fn seed_from_static(private: &[u8; 32]) -> [u8; 32] {
        use blake2::{Blake2s256, Digest};
        let mut h = Blake2s256::new();
        h.update(b"weft ring record signing key v1");
        h.update(private);
        h.finalize().into()
    }

    pub fn public(&self) -> SignKey {
        self.public
    }

    pub fn sign(&self, msg: &[u8]) -> Signed {
        let mut sig = [0u8; SIGNATURE_LEN];
        sig.copy_from_slice(self.pair.sign(msg).as_ref());
        Signed {
            key: self.public,
            sig: Signature(sig),
        }
    }
}

impl Signed {
    /// True if `sig` is `key`'s signature of `msg`.
    pub fn verifies(&self, msg: &[u8]) -> bool {
        let id = self.digest(msg);
        if verified().lock().is_ok_and(|v| v.contains(&id)) {
            return true;
        }
        let ok = UnparsedPublicKey::new(&ED25519, self.key.0)
            .verify(msg, &self.sig.0)
            .is_ok();
        if ok {
            if let Ok(mut v) = verified().lock() {
                if v.len() >= VERIFIED_CAP {
                    v.clear();
                }
                v.insert(id);
            }
        }
        ok
    }

    /// A collision-resistant name of (key, signature, message).
    fn digest(&self, msg: &[u8]) -> [u8; 32] {
        use blake2::{Blake2s256, Digest};
        let mut h = Blake2s256::new();
        h.update(self.key.0);
        h.update(self.sig.0);
        h.update(msg);
        h.finalize().into()
    }
}

/// Signatures already found valid, by `Signed::digest`: verifying Ed25519 costs ~50 us
/// and a signed entry state reaches a node once per gossip path (and the IPAM simulation
/// runs a whole cluster in one process, where this makes it ~50x faster). Only successes
/// are kept, named by a hash of everything verified, so a hit is as good as a check.
/// Bounded: cleared when full.
fn verified() -> &'static std::sync::Mutex<std::collections::HashSet<[u8; 32]>> {
    static VERIFIED: std::sync::OnceLock<std::sync::Mutex<std::collections::HashSet<[u8; 32]>>> =
        std::sync::OnceLock::new();
    VERIFIED.get_or_init(Default::default)
}

const VERIFIED_CAP: usize = 1 << 16;

/// The bytes a peer record's signature covers: the cluster's range (a record from another
/// cluster is not valid here), the peer, its incarnation, its remover and the peer's key
/// as the writer knew it, length-prefixed so that no two records share an encoding.
pub fn record_message(
    range: Ipv4Net,
    peer: &PeerName,
    incarnation: u32,
    removed_by: Option<&PeerName>,
    key: Option<&SignKey>,
) -> Vec<u8> {
    let mut m = Vec::with_capacity(64);
    m.extend_from_slice(b"weft ring record v1\0");
    m.extend_from_slice(&range.network().octets());
    m.push(range.prefix_len());
    put_name(&mut m, peer);
    match removed_by {
        Some(by) => {
            m.push(1);
            put_name(&mut m, by);
        }
        None => m.push(0),
    }
    m.extend_from_slice(&incarnation.to_be_bytes());
    match key {
        Some(k) => {
            m.push(1);
            m.extend_from_slice(&k.0);
        }
        None => m.push(0),
    }
    m
}

/// A peer name, length-prefixed, into a message to sign.
pub fn put_name(m: &mut Vec<u8>, name: &PeerName) {
    let b = name.as_str().as_bytes();
    m.extend_from_slice(&(b.len() as u32).to_be_bytes());
    m.extend_from_slice(b);
}

macro_rules! hex_bytes {
    ($t:ident, $len:expr) => {
        impl std::fmt::Display for $t {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(&hex(&self.0))
            }
        }
        impl std::fmt::Debug for $t {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                write!(f, "{self}")
            }
        }
        impl std::str::FromStr for $t {
            type Err = String;
            fn from_str(s: &str) -> Result<Self, String> {
                let bytes = unhex(s).ok_or_else(|| format!("not hex: {s:?}"))?;
                let a: [u8; $len] = bytes
                    .try_into()
                    .map_err(|_| format!("{s:?} is not {} bytes", $len))?;
                Ok($t(a))
            }
        }
        impl serde::Serialize for $t {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_str(self)
            }
        }
        impl<'de> serde::Deserialize<'de> for $t {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
                s.parse().map_err(serde::de::Error::custom)
            }
        }
    };
}
hex_bytes!(SignKey, SIGN_KEY_LEN);
hex_bytes!(Signature, SIGNATURE_LEN);

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(inc: u32, by: Option<&str>) -> Vec<u8> {
        let by = by.map(|b| b.parse::<PeerName>().unwrap());
        record_message(
            "10.32.0.0/12".parse().unwrap(),
            &"00:00:00:00:00:01".parse().unwrap(),
            inc,
            by.as_ref(),
            None,
        )
    }

    #[test]
    fn a_signature_covers_every_field_and_only_its_key_verifies_it() {
        let s = Signer::from_seed(&[1; 32]);
        let m = msg(2, Some("00:00:00:00:00:02"));
        let signed = s.sign(&m);
        assert!(signed.verifies(&m));
        for other in [
            msg(3, Some("00:00:00:00:00:02")),
            msg(2, Some("00:00:00:00:00:03")),
            msg(2, None),
            record_message(
                "10.32.0.0/12".parse().unwrap(),
                &"00:00:00:00:00:01".parse().unwrap(),
                2,
                Some(&"00:00:00:00:00:02".parse().unwrap()),
                Some(&SignKey([9; 32])),
            ),
        ] {
            assert!(!signed.verifies(&other));
        }
        let other_key = Signed {
            key: Signer::from_seed(&[2; 32]).public(),
            ..signed
        };
        assert!(!other_key.verifies(&m));
        let back: Signed = serde_json::from_str(&serde_json::to_string(&signed).unwrap()).unwrap();
        assert_eq!(back, signed);
        // Deterministic: the same record signed twice is the same signature.
        assert_eq!(s.sign(&m), signed);
    }

    #[test]
    fn the_signing_seed_depends_on_the_static_key() {
        assert_ne!(
            Signer::seed_from_static(&[1; 32]),
            Signer::seed_from_static(&[2; 32])
        );
    }
}
