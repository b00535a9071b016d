//! Data-plane keys (with `WEAVE_PASSWORD`): each node chooses the key it seals its
//! datagrams to a peer with, and gives it to that peer over their established control
//! connection, which the Noise handshake authenticated and encrypts. The peer installs it
//! for receiving and acknowledges; only then does the sender seal with it, so no datagram
//! goes out under a key its receiver does not have yet.
//!
//! Keys are replaced every [`REKEY_TICKS`] while the connection lasts (a new id; the
//! receiver keeps the previous key too, so datagrams in flight still open), and offered
//! again on every new connection, since the peer may have restarted without them. With
//! no connection to a peer its keys are dropped after [`EXPIRE_TICKS`]: a node that left
//! cannot be reached under an old key forever.
//!
//! Keys come from a ratchet over a seed the I/O layer draws from the OS (so the core
//! stays deterministic under test): each key is a keyed hash of the current state, which
//! then moves on one-way, so a key handed out cannot be recomputed from a later state.

use super::effects::{Action, ConnId, Outbox};
use super::message::Message;
use super::node::Node;
use super::secure::{hex, unhex};
use super::PeerName;
use crate::core::datapath::aead::{DataKey, KEY_LEN};
use std::collections::BTreeMap;

/// Ticks (of 5 s) between key changes on a connection: two minutes.
pub const REKEY_TICKS: u64 = 24;
/// An offered key not acknowledged within this many ticks is offered anew.
const OFFER_TICKS: u64 = 2;
/// Ticks without any connection to a peer after which its keys are dropped (with a
/// connection they are replaced every [`REKEY_TICKS`]).
pub const EXPIRE_TICKS: u64 = 3 * REKEY_TICKS;

/// The secret the key ratchet starts from.
#[derive(Clone, PartialEq, Eq)]
pub struct KeySeed(pub [u8; KEY_LEN]);

impl std::fmt::Debug for KeySeed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("KeySeed(<redacted>)")
    }
}

/// What the data path must do with a peer's keys.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KeyChange {
    /// Seal datagrams to the peer with this key from now on.
    Send(DataKey),
    /// The peer seals with this key (its previous one stays valid until the next).
    Receive(DataKey),
    /// Drop every key of the peer: nothing is sent to it, nothing from it accepted.
    Forget,
}

fn mac(key: &[u8; KEY_LEN], label: &[u8]) -> [u8; KEY_LEN] {
    use blake2::digest::{Mac, Update};
    let mut m = blake2::Blake2sMac256::new_from_slice(key).expect("32-byte BLAKE2s key");
    Update::update(&mut m, label);
    let mut out = [0u8; KEY_LEN];
    out.copy_from_slice(&m.finalize().into_bytes());
    out
}

#[derive(Debug, Default)]
struct PeerKeys {
    next_id: u8,
    /// Offered and not yet acknowledged: the key, and the tick it was offered at.
    offered: Option<(DataKey, u64)>,
    /// Tick at which the key in use was acknowledged.
    sending_since: Option<u64>,
    /// Tick at which the peer's newest key arrived.
    received_at: Option<u64>,
    /// The connection the peer's newest key came over, and its id: on one connection ids
    /// only grow (mod 256), so an offer overtaken by a newer one is not installed over it.
    newest: Option<(ConnId, u8)>,
}

impl PeerKeys {
    fn last_activity(&self) -> u64 {
        self.sending_since
            .unwrap_or(0)
            .max(self.received_at.unwrap_or(0))
            .max(self.offered.as_ref().map_or(0, |o| o.1))
    }
}

pub(super) struct DataKeys {
    ratchet: [u8; KEY_LEN],
    peers: BTreeMap<PeerName, PeerKeys>,
}

impl std::fmt::Debug for DataKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DataKeys")
            .field("peers", &self.peers)
            .finish_non_exhaustive()
    }
}

impl DataKeys {
    pub(super) fn new(seed: &KeySeed) -> DataKeys {
        DataKeys {
            ratchet: mac(&seed.0, b"weft data key ratchet v1"),
            peers: BTreeMap::new(),
        }
    }

    fn next_secret(&mut self) -> [u8; KEY_LEN] {
        let key = mac(&self.ratchet, b"key");
        self.ratchet = mac(&self.ratchet, b"next");
        key
    }
}

impl Node {
    /// Whether datagrams are sealed (the node was given a key seed: `WEAVE_PASSWORD`).
    pub fn encrypts(&self) -> bool {
        self.data_keys.is_some()
    }

    /// Offers `peer` a new key for what this node sends it, on connection `id`.
    pub(super) fn offer_data_key(&mut self, id: ConnId, peer: &PeerName, out: &mut Outbox) {
        let ticks = self.ticks;
        let Some(keys) = self.data_keys.as_mut() else {
            return;
        };
        let secret = keys.next_secret();
        let p = keys.peers.entry(peer.clone()).or_default();
        let key = DataKey {
            id: p.next_id,
            secret,
        };
        p.next_id = p.next_id.wrapping_add(1);
        out.send(
            id,
            Message::DataKey {
                id: key.id,
                key: hex(&key.secret),
            },
        );
        p.offered = Some((key, ticks));
    }

    pub(super) fn on_data_key(
        &mut self,
        id: ConnId,
        from: &PeerName,
        key_id: u8,
        key: &str,
        out: &mut Outbox,
    ) {
        let ticks = self.ticks;
        let Some(keys) = self.data_keys.as_mut() else {
            // Both sides share the password or the handshake failed: cannot happen.
            return out.close(
                id,
                "protocol error: a data key, but this node does not encrypt",
            );
        };
        let Some(secret) = unhex(key).and_then(|k| <[u8; KEY_LEN]>::try_from(k).ok()) else {
            return out.close(id, "protocol error: malformed data key");
        };
        let p = keys.peers.entry(from.clone()).or_default();
        if let Some((conn, newest)) = p.newest {
            if conn == id && (key_id.wrapping_sub(newest) as i8) <= 0 {
                return;
            }
        }
        p.newest = Some((id, key_id));
        p.received_at = Some(ticks);
        // Installed before the acknowledgement leaves (actions run in order).
        out.push(Action::DataKey(
            from.clone(),
            KeyChange::Receive(DataKey { id: key_id, secret }),
        ));
        out.send(id, Message::DataKeyAck { id: key_id });
    }

    pub(super) fn on_data_key_ack(&mut self, from: &PeerName, key_id: u8, out: &mut Outbox) {
        let ticks = self.ticks;
        let Some(p) = self.data_keys.as_mut().and_then(|k| k.peers.get_mut(from)) else {
            return;
        };
        match p.offered.take() {
            Some((key, _)) if key.id == key_id => {
                p.sending_since = Some(ticks);
                out.push(Action::DataKey(from.clone(), KeyChange::Send(key)));
            }
            // An acknowledgement of an older offer: the newer one is still awaited.
            other => p.offered = other,
        }
    }

    /// Rekeys connections whose key is due, offers again what went unanswered, and drops
    /// the keys of peers without a connection for [`EXPIRE_TICKS`].
    pub(super) fn data_keys_tick(&mut self, out: &mut Outbox) {
        let ticks = self.ticks;
        let Some(keys) = self.data_keys.as_ref() else {
            return;
        };
        let mut offer = Vec::new();
        let mut expired = Vec::new();
        for (name, p) in &keys.peers {
            match self.conn_to(name) {
                Some(id) => {
                    let due = p.sending_since.is_none_or(|t| ticks >= t + REKEY_TICKS);
                    let unanswered = p.offered.as_ref().map(|o| ticks >= o.1 + OFFER_TICKS);
                    if unanswered.unwrap_or(due) {
                        offer.push((id, name.clone()));
                    }
                }
                None if ticks >= p.last_activity() + EXPIRE_TICKS => expired.push(name.clone()),
                None => {}
            }
        }
        for (id, name) in offer {
            self.offer_data_key(id, &name, out);
        }
        for name in expired {
            self.forget_data_keys(&name, out);
            out.info(format!(
                "data keys with {name} dropped: no connection for {} s",
                EXPIRE_TICKS * 5
            ));
        }
    }

    /// Drops every key shared with `peer` (it left, or was removed).
    pub(super) fn forget_data_keys(&mut self, peer: &PeerName, out: &mut Outbox) {
        if let Some(keys) = self.data_keys.as_mut() {
            if keys.peers.remove(peer).is_some() {
                out.push(Action::DataKey(peer.clone(), KeyChange::Forget));
            }
        }
    }

    /// Key ids per peer: the one sealed with, and whether an offer is pending (report).
    pub fn data_key_view(&self) -> Vec<(PeerName, Option<u64>)> {
        self.data_keys.as_ref().map_or_else(Vec::new, |k| {
            k.peers
                .iter()
                .map(|(n, p)| (n.clone(), p.sending_since))
                .collect()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ratchet_never_repeats_and_hides_its_past() {
        let mut k = DataKeys::new(&KeySeed([1; KEY_LEN]));
        let a = k.next_secret();
        let b = k.next_secret();
        assert_ne!(a, b);
        let mut again = DataKeys::new(&KeySeed([1; KEY_LEN]));
        assert_eq!(again.next_secret(), a, "deterministic from its seed");
        let mut other = DataKeys::new(&KeySeed([2; KEY_LEN]));
        assert_ne!(other.next_secret(), a);
        assert!(!format!("{:?}", KeySeed([1; KEY_LEN])).contains('1'));
    }
}
