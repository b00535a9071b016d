//! Whose word a received ring is: every change in it must be signed by the peer entitled
//! to make it, or the whole ring is refused (and counted) before anything merges.
//!
//! - A tombstone by its remover, a comeback by the peer itself (`PeerRecord`).
//! - An entry's state (free count, version, cuts) by its owner; at version 0 (as seeded,
//!   or as a transfer made it) none is needed, its owner follows from the deeds.
//! - How the entry's addresses came to their owner: its deeds, replayed from the seeded
//!   owner. A gift must be signed by the owner before it; a takeover by the member taking
//!   it, and only of an incarnation the (signed) records show removed.
//!
//! So a member (or, without a password, anyone who joins) can change nothing but its own
//! entries, give away nothing but its own, and take over only under its own signed
//! removal, which `forged_tombstone` then checks against what this node sees alive.
//!
//! Keys: this node's own for its own name (an heir is never fooled into taking over by a
//! record in its name it did not sign); the key a name is bound to here; for a removed
//! writer the key its remover vouched for in its tombstone; else the key the signature
//! carries, bound once the ring is merged (a node that never met a peer trusts the first
//! member that relays its signatures, as it does for static keys).

use super::node::Node;
use super::PeerName;
use crate::core::ipam::ring::Entry;
use crate::core::ipam::{PeerRecord, Ring, SignKey, Signed};

/// Keys taken from signatures for names this node had none for, bound once the ring
/// carrying them is merged.
pub(super) type NewKeys = Vec<(PeerName, SignKey)>;

impl Node {
    /// This node's signature of its comeback record, if it came back (incarnation > 0).
    pub(super) fn own_comeback_signature(&self) -> Option<Signed> {
        let inc = self.ipam.incarnation();
        let rec = self.ipam.ring()?.peers.get(&self.cfg.name)?;
        (inc > 0 && rec.incarnation == inc && rec.removed_by.is_none())
            .then_some(rec.signed)
            .flatten()
    }

    /// Checks every record and entry of `ring` that differs from ours (see the module
    /// comment). Returns the keys to bind if the ring is merged, or why it is refused.
    pub(super) fn check_provenance(&self, ring: &Ring) -> Result<NewKeys, String> {
        let mut new_keys = NewKeys::new();
        let ours = self.ipam.ring();
        for (peer, rec) in &ring.peers {
            // Only what would win the merge changes anything; the rest is not checked.
            if ours.and_then(|r| r.peers.get(peer)).is_some_and(|have| {
                (have.key(), have.signed.is_some()) >= (rec.key(), rec.signed.is_some())
            }) {
                continue;
            }
            self.check_record(ring, peer, rec, 0, &mut new_keys)
                .map_err(|e| {
                    format!("its record of {peer} is not that peer's or its remover's word: {e}")
                })?;
        }
        let seeded = Ring::seeded(ring.range, &ring.seeds)
            .map_err(|e| format!("its seeds make no ring: {e}"))?;
        for e in &ring.entries {
            let mine = ours.and_then(|r| {
                r.entries
                    .binary_search_by_key(&e.start, |x| x.start)
                    .ok()
                    .map(|i| &r.entries[i])
            });
            if mine.is_some_and(|m| (m.key(), m.signed.is_some()) >= (e.key(), e.signed.is_some()))
            {
                continue;
            }
            self.check_entry(ring, &seeded, e, mine, &mut new_keys)
                .map_err(|why| {
                    format!(
                        "its entry {} (owner {}) is not its owners' doing: {why}",
                        crate::core::ipam::space::addr(e.start),
                        e.owner
                    )
                })?;
        }
        Ok(new_keys)
    }

    /// Binds keys learnt from the signatures of a merged ring.
    pub(super) fn bind_keys(&mut self, new_keys: NewKeys) {
        let mut changed = false;
        for (name, key) in new_keys {
            if name == self.cfg.name {
                continue;
            }
            let bound = self.gossip.sign_keys.get(&name);
            if bound != Some(&key) {
                self.gossip.sign_keys.insert(name, key);
                changed = true;
            }
        }
        if changed {
            self.touch();
        }
    }

    /// The key `writer` signs with, as far as this node can tell (module comment); None:
    /// take the one its signature carries.
    fn key_of(
        &self,
        ring: &Ring,
        writer: &PeerName,
        depth: usize,
        new_keys: &mut NewKeys,
    ) -> Result<Option<SignKey>, String> {
        if writer == &self.cfg.name {
            return Ok(Some(self.cfg.signer.public()));
        }
        if let Some(k) = self.gossip.sign_keys.get(writer) {
            return Ok(Some(*k));
        }
        if let Some(k) = new_keys.iter().find(|(n, _)| n == writer).map(|(_, k)| *k) {
            return Ok(Some(k));
        }
        match ring.peers.get(writer) {
            Some(wrec) if wrec.removed_by.is_some() => {
                // A chain of removals is at most as long as the record list.
                if depth > ring.peers.len() {
                    return Err(format!("the removals of {writer} form a cycle"));
                }
                self.check_record(ring, writer, wrec, depth + 1, new_keys)
                    .map_err(|e| format!("the record of its writer {writer}: {e}"))?;
                Ok(wrec.key)
            }
            _ => Ok(None),
        }
    }

    /// Checks that `signed` is `writer`'s signature of `msg`.
    fn check_signature(
        &self,
        ring: &Ring,
        writer: &PeerName,
        signed: Option<Signed>,
        msg: &[u8],
        depth: usize,
        new_keys: &mut NewKeys,
    ) -> Result<(), String> {
        let Some(signed) = signed else {
            return Err(format!("it is not signed by {writer}"));
        };
        match self.key_of(ring, writer, depth, new_keys)? {
            Some(k) if k != signed.key => {
                return Err(format!(
                    "it is signed with key {}, but {writer} signs with {k}",
                    signed.key
                ))
            }
            Some(_) => {}
            None => new_keys.push((writer.clone(), signed.key)),
        }
        if signed.verifies(msg) {
            Ok(())
        } else {
            Err(format!("its signature by {writer} does not verify"))
        }
    }

    /// A tombstone must be its remover's word, a comeback the peer's own. A removed peer's
    /// comeback may carry a new key: rmpeer released its binding at the remover, and it
    /// may return reinstalled.
    fn check_record(
        &self,
        ring: &Ring,
        peer: &PeerName,
        rec: &PeerRecord,
        depth: usize,
        new_keys: &mut NewKeys,
    ) -> Result<(), String> {
        let writer = rec.writer(peer);
        let msg = rec.message(ring.range, peer);
        let comeback_after_removal = rec.removed_by.is_none()
            && writer != &self.cfg.name
            && self.ipam.ring().is_some_and(|r| {
                r.peers.get(peer).is_some_and(|old| {
                    old.removed_by.is_some() && old.incarnation < rec.incarnation
                })
            });
        if comeback_after_removal {
            let Some(signed) = rec.signed else {
                return Err(format!("it is not signed by {writer}"));
            };
            if !signed.verifies(&msg) {
                return Err(format!("its signature by {writer} does not verify"));
            }
            new_keys.push((writer.clone(), signed.key));
            return Ok(());
        }
        self.check_signature(ring, writer, rec.signed, &msg, depth, new_keys)
    }

    /// An entry's state must be its owner's word, and its deeds a chain of transfers from
    /// the seeded owner, each made by the peer entitled to it. `mine`: our entry at the
    /// same token, whose deeds were checked when we took them.
    fn check_entry(
        &self,
        ring: &Ring,
        seeded: &Ring,
        e: &Entry,
        mine: Option<&Entry>,
        new_keys: &mut NewKeys,
    ) -> Result<(), String> {
        let seed_owner = seeded
            .owner_of(e.start)
            .ok_or_else(|| "it lies outside the seeded range".to_string())?;
        if e.needs_owner_signature() {
            self.check_signature(
                ring,
                &e.owner,
                e.signed,
                &e.message(ring.range),
                0,
                new_keys,
            )?;
        }
        let known = mine
            .filter(|m| e.deeds.starts_with(&m.deeds))
            .map_or(0, |m| m.deeds.len());
        let (mut owner, mut inc, mut era) = (seed_owner.clone(), 0, 0);
        for (k, d) in e.deeds.iter().enumerate() {
            if d.n as usize != k || d.start > e.start || u64::from(e.start) >= d.end || d.era < era
            {
                return Err(format!("deed {k} does not belong to this entry"));
            }
            if k >= known {
                let giver = if d.takeover {
                    if !was_removed(ring, self.ipam.ring(), &owner, inc) {
                        return Err(format!(
                            "deed {k}: {} takes it over from {owner} (incarnation {inc}), which no record shows removed",
                            d.to
                        ));
                    }
                    &d.to
                } else {
                    if d.to == owner {
                        return Err(format!("deed {k}: {owner} gives it to itself"));
                    }
                    &owner
                };
                self.check_signature(ring, giver, d.signed, &d.message(ring.range), 0, new_keys)
                    .map_err(|why| format!("deed {k} (to {}): {why}", d.to))?;
            }
            (owner, inc, era) = (d.to.clone(), d.inc, d.era);
        }
        if e.owner != owner || e.inc != inc || e.era != era {
            return Err(format!(
                "its deeds give it to {owner} (incarnation {inc}, era {era}), not to {} (incarnation {}, era {})",
                e.owner, e.inc, e.era
            ));
        }
        Ok(())
    }
}

/// Whether `owner` at incarnation `inc` was removed, as the received ring or ours records
/// it (a peer that came back since was removed at every earlier incarnation). Any member
/// may take over a removed incarnation's entries: that is what its own `rmpeer` of the
/// same incarnation would do, and removals of one incarnation by several members are
/// legitimate (the tombstone keeps one remover, the lowest name, so it cannot tell who
/// else took over before it merged).
fn was_removed(ring: &Ring, ours: Option<&Ring>, owner: &PeerName, inc: u32) -> bool {
    std::iter::once(ring)
        .chain(ours)
        .filter_map(|r| r.peers.get(owner))
        .any(|rec| rec.incarnation > inc || (rec.incarnation == inc && rec.removed_by.is_some()))
}
