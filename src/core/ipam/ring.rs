//! The ring: Weave's CRDT describing who owns which part of the allocation range.
//!
//! The range is cut at sorted tokens; the entry at a token owns every address from its
//! token up to the next token (the last entry up to the end of the range). Tokens are never
//! removed. Two replicas of an entry are ordered by the key `(era, lower owner name,
//! version, free)` and a merge keeps the greater one per token, so merging is a per-token
//! join: commutative, associative and idempotent.
//!
//! - `version` is bumped by the owner on every change of its entry (free count, cut).
//! - `era` is bumped whenever the entry changes hands as a whole: by one when its owner
//!   gives it away or a removed peer surrenders it when it comes back, by two when a peer
//!   takes over the entries of a removed peer (`rmpeer`). A stale replica of the old
//!   owner, whatever its version, always loses to the new era, so a removed peer that
//!   restarts with old state cannot resurrect its ranges, nor make a gift it made just
//!   before dying (which nobody heard) win over the takeover. Two peers that take over the
//!   same entry concurrently both produce era+2; the lower owner name wins, the same
//!   tie-break as for the tombstone's heir below, so both decide the same owner.
//!
//! Rule that makes splits checkable: an owner that cuts a new token into one of its
//! entries bumps that entry's version in the same update. Any ring that knows the new
//! token therefore holds the covering entry at a strictly greater key than any ring that
//! does not; a merge where this fails means two peers cut the same addresses without
//! seeing each other, and is refused rather than resolved by guessing.
//!
//! Tombstones and incarnations: `peers` holds a record per peer that was ever removed or
//! came back: `(incarnation, removed_by)`. Records merge by the key `(incarnation,
//! removed, lower heir name)`. `rmpeer` marks the peer's current incarnation removed with
//! the caller as heir and hands its entries to the heir (era+1). Entries of a removed peer
//! that reach the heir later (gossip it had not seen) are taken over on merge; if the heir
//! is itself removed, its own heir inherits, transitively. A removed peer that sees its own
//! tombstone at its current incarnation drops its allocations, surrenders any entry still
//! in its name to its heir, and comes back as a fresh member at `incarnation + 1` (a record
//! that outranks the tombstone). So a node re-created with the same name (same
//! machine-id) rejoins as a new member owning nothing, and asks for space.

use super::sign::{self, SignKey, Signed, Signer};
use super::space::{self, Span};
use crate::core::mesh::PeerName;
use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};
use std::cmp::Reverse;
use std::collections::BTreeMap;
use std::net::Ipv4Addr;

/// Eras a takeover of a removed peer's entry jumps. A removed peer may have given the
/// entry away just before it died, and the gift (one era up) may reach the others only
/// later, e.g. from its disk when the machine returns: the takeover, two eras up, wins over
/// such an unseen gift instead of tying with it (a tie would go to the lower owner name,
/// an arbitrary winner that may be the peer that never received the gift).
pub const TAKEOVER_ERAS: u32 = 2;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// First address (the token) of the addresses this entry owns.
    pub start: u32,
    pub owner: PeerName,
    /// Bumped by the owner on every change of this entry.
    pub version: u32,
    /// Usable addresses of this entry that its owner has not handed out, as last reported.
    pub free: u32,
    /// Bumped when the entry changes hands as a whole (takeover or surrender).
    #[serde(default)]
    pub era: u32,
    /// The owner's incarnation when it got the entry: only entries of a tombstoned
    /// incarnation are orphans, not space given to the peer after it came back.
    #[serde(default)]
    pub inc: u32,
    /// How the addresses at this token came to their owner since the ring was seeded:
    /// every transfer, signed by the peer that made it (see `Deed`).
    #[serde(default, skip_serializing_if = "Deeds::is_empty")]
    pub deeds: Deeds,
    /// The owner's signature of this state of the entry (`entry_message`); None on a
    /// change until the owner signs it, and on the seeded entries nobody changed yet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signed: Option<Signed>,
}

/// An entry's deeds, shared between the replicas and cuts of one history: rings are
/// cloned and compared on every merge, and a history is written far less often.
#[derive(Clone, Debug, Default, Eq)]
pub struct Deeds(std::sync::Arc<Vec<Deed>>);

impl PartialEq for Deeds {
    fn eq(&self, other: &Self) -> bool {
        std::sync::Arc::ptr_eq(&self.0, &other.0) || self.0 == other.0
    }
}

impl std::ops::Deref for Deeds {
    type Target = Vec<Deed>;
    fn deref(&self) -> &Vec<Deed> {
        &self.0
    }
}

impl Deeds {
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn make_mut(&mut self) -> &mut Vec<Deed> {
        std::sync::Arc::make_mut(&mut self.0)
    }
}

impl From<Vec<Deed>> for Deeds {
    fn from(v: Vec<Deed>) -> Deeds {
        Deeds(std::sync::Arc::new(v))
    }
}

impl Serialize for Deeds {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.0.serialize(s)
    }
}

impl<'de> Deserialize<'de> for Deeds {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Vec::<Deed>::deserialize(d).map(Deeds::from)
    }
}

/// One transfer of the addresses at a token: a gift by their owner (a donation, a whole
/// entry given away or surrendered), signed by the giver, or a takeover of a removed
/// peer's addresses, signed by the heir taking them. A receiver replays an entry's deeds
/// from the seeded owner: each must be signed by the peer entitled to make it, so no
/// member can give itself (or anyone) addresses their owner did not give away.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Deed {
    /// Position in the entry's deeds (signed, so a deed cannot be replayed elsewhere).
    pub n: u32,
    /// The entry's era after the transfer.
    pub era: u32,
    pub to: PeerName,
    /// The incarnation of `to` that got the addresses.
    pub inc: u32,
    #[serde(default)]
    pub takeover: bool,
    /// The addresses transferred: `start` up to `end` (exclusive).
    pub start: u32,
    pub end: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signed: Option<Signed>,
}

impl Deed {
    pub fn message(&self, range: Ipv4Net) -> Vec<u8> {
        let mut m = Vec::with_capacity(64);
        m.extend_from_slice(b"weft ring deed v1\0");
        m.extend_from_slice(&range.network().octets());
        m.push(range.prefix_len());
        m.extend_from_slice(&self.n.to_be_bytes());
        m.extend_from_slice(&self.era.to_be_bytes());
        sign::put_name(&mut m, &self.to);
        m.extend_from_slice(&self.inc.to_be_bytes());
        m.push(u8::from(self.takeover));
        m.extend_from_slice(&self.start.to_be_bytes());
        m.extend_from_slice(&self.end.to_be_bytes());
        m
    }
}

impl Entry {
    /// Whether the owner's signature of the state is needed: not at version 0, as the
    /// ring was seeded or a transfer made it (owner, era and incarnation follow from the
    /// seeds and the signed deeds; the free count is the giver's estimate, which the
    /// owner's first report replaces). Leaving those unsigned also keeps replicas equal
    /// without a round of gossip.
    pub fn needs_owner_signature(&self) -> bool {
        self.version > 0
    }

    /// The bytes the owner's signature of this state covers (`range`: the ring's).
    pub fn message(&self, range: Ipv4Net) -> Vec<u8> {
        let mut m = Vec::with_capacity(64);
        m.extend_from_slice(b"weft ring entry v1\0");
        m.extend_from_slice(&range.network().octets());
        m.push(range.prefix_len());
        m.extend_from_slice(&self.start.to_be_bytes());
        sign::put_name(&mut m, &self.owner);
        for w in [self.version, self.free, self.era, self.inc] {
            m.extend_from_slice(&w.to_be_bytes());
        }
        m.extend_from_slice(&(self.deeds.len() as u32).to_be_bytes());
        m
    }

    /// The merge order of two replicas of the entry at one token (module comment).
    pub fn key(&self) -> (u32, Reverse<&PeerName>, u32, u32, u32) {
        (
            self.era,
            Reverse(&self.owner),
            self.version,
            self.free,
            self.inc,
        )
    }
}

/// What the ring knows about a peer that was removed or came back.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerRecord {
    pub incarnation: u32,
    /// Set when this incarnation was removed: the peer that inherits its entries.
    #[serde(default)]
    pub removed_by: Option<PeerName>,
    /// The signature of the peer that wrote the record: the remover for a tombstone, the
    /// peer itself for a comeback (see `sign`). Not part of the merge key: two valid
    /// signatures of one record are the same (Ed25519 is deterministic).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signed: Option<Signed>,
    /// The peer's own signing key as the writer knew it: a node that never met a removed
    /// peer checks that peer's records against the key its remover vouched for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<SignKey>,
}

impl PeerRecord {
    /// The peer whose word the record is: its remover, or the peer itself.
    pub fn writer<'a>(&'a self, peer: &'a PeerName) -> &'a PeerName {
        self.removed_by.as_ref().unwrap_or(peer)
    }

    /// The bytes the record's signature covers, in ring `range`.
    pub fn message(&self, range: Ipv4Net, peer: &PeerName) -> Vec<u8> {
        sign::record_message(
            range,
            peer,
            self.incarnation,
            self.removed_by.as_ref(),
            self.key.as_ref(),
        )
    }

    /// The merge order of two replicas of a peer's record (module comment).
    pub fn key(&self) -> (u32, bool, Reverse<Option<&PeerName>>) {
        (
            self.incarnation,
            self.removed_by.is_some(),
            Reverse(self.removed_by.as_ref()),
        )
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ring {
    pub range: Ipv4Net,
    /// The peers the ring was seeded with, sorted and without duplicates.
    pub seeds: Vec<PeerName>,
    /// Sorted by `start`; the first entry starts at the range's network address.
    pub entries: Vec<Entry>,
    /// Tombstones and incarnations (module comment). Absent peer: incarnation 0, alive.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub peers: BTreeMap<PeerName, PeerRecord>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RingError {
    #[error("cannot seed a ring without peers")]
    NoSeeds,
    #[error(
        "IP allocation was seeded by different peers (received: {}, ours: {})",
        fmt_peers(received),
        fmt_peers(ours)
    )]
    SeededByDifferentPeers {
        received: Vec<PeerName>,
        ours: Vec<PeerName>,
    },
    #[error("incompatible IP allocation ranges (received: {received}, ours: {ours})")]
    RangeMismatch { received: Ipv4Net, ours: Ipv4Net },
    #[error(
        "entry {token} (owner {owner}) cuts into the entry at {cover}, but a ring without it has \
         that entry at an equal or newer version: two peers claim the same addresses"
    )]
    InconsistentSplit {
        token: Ipv4Addr,
        owner: PeerName,
        cover: Ipv4Addr,
    },
    #[error("peer {owner} would take {first}-{last}, which I ({me}) own and hold allocations in")]
    ClaimsMyAddresses {
        me: PeerName,
        owner: PeerName,
        first: Ipv4Addr,
        last: Ipv4Addr,
    },
    #[error("invalid ring: {0}")]
    Invalid(String),
    #[error("no entry starts at {0}")]
    UnknownToken(Ipv4Addr),
    #[error("entry {token} is owned by {owner}, not by {me}")]
    NotOwner {
        token: Ipv4Addr,
        owner: PeerName,
        me: PeerName,
    },
    #[error("entry {token} has {capacity} usable addresses, cannot report {free} free")]
    FreeTooLarge {
        token: Ipv4Addr,
        free: u32,
        capacity: u64,
    },
    #[error("cannot split at {at}: {reason}")]
    BadSplit { at: Ipv4Addr, reason: &'static str },
    #[error("version of entry {0} is exhausted")]
    VersionExhausted(Ipv4Addr),
    #[error("a peer cannot remove itself ({0})")]
    RemoveSelf(PeerName),
}

/// Peers formatted as Weave prints them: `[a b c]`.
fn fmt_peers(peers: &[PeerName]) -> String {
    let names: Vec<&str> = peers.iter().map(PeerName::as_str).collect();
    format!("[{}]", names.join(" "))
}

impl Ring {
    /// Deterministic equal split among the seed peers (sorted by name), so every node that
    /// seeds with the same set gets an identical ring. A range of size S among n peers gets
    /// shares of S/n, the remainder spread one address at a time over the first peers; with
    /// n a power of two the shares are exactly CIDR-aligned. When n > S the last peers get
    /// no entry (they stay in `seeds`).
    pub fn seeded(range: Ipv4Net, seeds: &[PeerName]) -> Result<Ring, RingError> {
        let range = range.trunc();
        let mut seeds = seeds.to_vec();
        seeds.sort();
        seeds.dedup();
        if seeds.is_empty() {
            return Err(RingError::NoSeeds);
        }
        let all = Span::of_net(range);
        let n = seeds.len() as u64;
        let (share, extra) = (all.len() / n, all.len() % n);
        let mut entries = Vec::new();
        let mut cur = u64::from(all.start);
        for (i, peer) in seeds.iter().enumerate() {
            let size = share + u64::from((i as u64) < extra);
            if size == 0 {
                break;
            }
            let Ok(start) = u32::try_from(cur) else {
                break;
            };
            let span = Span::new(start, cur + size);
            entries.push(Entry {
                start,
                owner: peer.clone(),
                version: 0,
                free: capacity_u32(range, span),
                era: 0,
                inc: 0,
                deeds: Deeds::default(),
                signed: None,
            });
            cur += size;
        }
        let ring = Ring {
            range,
            seeds,
            entries,
            peers: BTreeMap::new(),
        };
        ring.validate()?;
        Ok(ring)
    }

    /// The addresses of entry `i`.
    pub(crate) fn span_of(&self, i: usize) -> Span {
        let end = match self.entries.get(i + 1) {
            Some(next) => u64::from(next.start),
            None => Span::of_net(self.range).end,
        };
        let start = self.entries.get(i).map_or(0, |e| e.start);
        Span::new(start, end)
    }

    /// Index of the entry owning `addr`: the one with the greatest start <= addr.
    fn index_of(&self, addr: u32) -> Option<usize> {
        if !Span::of_net(self.range).contains(addr) {
            return None;
        }
        let after = self.entries.partition_point(|e| e.start <= addr);
        after.checked_sub(1)
    }

    fn find_token(&self, token: u32) -> Option<usize> {
        self.entries.binary_search_by_key(&token, |e| e.start).ok()
    }

    pub fn owner_of(&self, addr: u32) -> Option<&PeerName> {
        self.index_of(addr).map(|i| &self.entries[i].owner)
    }

    /// The entry owning `addr` with its span.
    pub fn entry_of(&self, addr: u32) -> Option<(Span, &Entry)> {
        self.index_of(addr)
            .map(|i| (self.span_of(i), &self.entries[i]))
    }

    /// (first, last inclusive, &Entry) for every entry.
    pub fn ranges(&self) -> impl Iterator<Item = (u32, u32, &Entry)> {
        (0..self.entries.len()).filter_map(move |i| {
            let span = self.span_of(i);
            span.last().map(|last| (span.start, last, &self.entries[i]))
        })
    }

    /// (first, last inclusive) of every entry owned by `peer`, in address order.
    pub fn owned_by(&self, peer: &PeerName) -> Vec<(u32, u32)> {
        self.ranges()
            .filter(|(_, _, e)| &e.owner == peer)
            .map(|(first, last, _)| (first, last))
            .collect()
    }

    /// Number of addresses owned by `peer`, network and broadcast included (as Weave counts).
    pub fn total_owned(&self, peer: &PeerName) -> u64 {
        self.owned_by(peer)
            .iter()
            .map(|&(first, last)| Span::inclusive(first, last).len())
            .sum()
    }

    /// Owner-only update of free counts, given as `(entry start, free)`. Bumps the version of
    /// the entries whose count changes, and only those. All-or-nothing: on error nothing
    /// changes. Returns true if anything changed.
    pub fn report_free(&mut self, me: &PeerName, free: &[(u32, u32)]) -> Result<bool, RingError> {
        // Keyed by entry index so a token listed twice is applied (and bumped) once.
        let mut updates = std::collections::BTreeMap::new();
        for &(token, count) in free {
            let i = self.my_entry(me, token)?;
            let e = &self.entries[i];
            let capacity = space::usable_in(self.range, self.span_of(i));
            if u64::from(count) > capacity {
                return Err(RingError::FreeTooLarge {
                    token: space::addr(token),
                    free: count,
                    capacity,
                });
            }
            if e.free != count && e.version == u32::MAX {
                return Err(RingError::VersionExhausted(space::addr(token)));
            }
            updates.insert(i, count);
        }
        let mut changed = false;
        for (i, count) in updates {
            let e = &mut self.entries[i];
            if e.free != count {
                e.free = count;
                e.version += 1;
                e.signed = None;
                changed = true;
            }
        }
        Ok(changed)
    }

    /// Owner-only: cuts the entry of `me` containing `at` so that a new entry owned by
    /// `new_owner` starts at `at` (to keep both halves, pass `me`). The cut entry's version
    /// is bumped (see the module comment); the new entry starts at version 0. Free counts
    /// are capped to what each half can hold; the owner refreshes them with `report_free`.
    pub fn split(&mut self, me: &PeerName, at: u32, new_owner: &PeerName) -> Result<(), RingError> {
        let bad = |reason| RingError::BadSplit {
            at: space::addr(at),
            reason,
        };
        let i = self.index_of(at).ok_or_else(|| bad("outside the range"))?;
        let e = &self.entries[i];
        if e.start == at {
            return Err(bad("a token already starts there"));
        }
        if &e.owner != me {
            return Err(RingError::NotOwner {
                token: space::addr(e.start),
                owner: e.owner.clone(),
                me: me.clone(),
            });
        }
        if e.version == u32::MAX {
            return Err(RingError::VersionExhausted(space::addr(e.start)));
        }
        let whole = self.span_of(i);
        let left = Span::new(whole.start, u64::from(at));
        let right = Span::new(at, whole.end);
        let old_free = e.free;
        let inc = if new_owner == me {
            e.inc
        } else {
            self.record(new_owner).incarnation
        };
        let mut deeds = e.deeds.clone();
        if new_owner != me {
            let n = deeds.len() as u32;
            deeds.make_mut().push(Deed {
                n,
                era: e.era,
                to: new_owner.clone(),
                inc,
                takeover: false,
                start: at,
                end: right.end,
                signed: None,
            });
        }
        let new = Entry {
            start: at,
            owner: new_owner.clone(),
            version: 0,
            free: old_free.min(capacity_u32(self.range, right)),
            era: e.era,
            inc,
            deeds,
            signed: None,
        };
        let e = &mut self.entries[i];
        e.version += 1;
        e.free = old_free.min(capacity_u32(self.range, left));
        e.signed = None;
        self.entries.insert(i + 1, new);
        Ok(())
    }

    /// Structural checks: seeds sorted and unique, entries non-empty, sorted by start with
    /// unique tokens, inside the range, first token at the range start, and no entry
    /// reporting more free addresses than it has.
    pub fn validate(&self) -> Result<(), RingError> {
        let invalid = |m: String| Err(RingError::Invalid(m));
        if self.range.trunc() != self.range {
            return invalid(format!("range {} is not a network address", self.range));
        }
        if self.seeds.is_empty() {
            return invalid("no seeds".into());
        }
        if self.seeds.windows(2).any(|w| w[0] >= w[1]) {
            return invalid("seeds are not sorted and unique".into());
        }
        let all = Span::of_net(self.range);
        match self.entries.first() {
            None => return invalid("no entries".into()),
            Some(e) if e.start != all.start => {
                return invalid(format!(
                    "first token {} is not the range start {}",
                    space::addr(e.start),
                    space::addr(all.start)
                ))
            }
            Some(_) => {}
        }
        for w in self.entries.windows(2) {
            if w[0].start >= w[1].start {
                return invalid(format!(
                    "tokens not sorted and unique at {}",
                    space::addr(w[1].start)
                ));
            }
        }
        for (i, e) in self.entries.iter().enumerate() {
            if !all.contains(e.start) {
                return invalid(format!(
                    "token {} outside {}",
                    space::addr(e.start),
                    self.range
                ));
            }
            let capacity = space::usable_in(self.range, self.span_of(i));
            if u64::from(e.free) > capacity {
                return invalid(format!(
                    "entry {} reports {} free but has {} usable addresses",
                    space::addr(e.start),
                    e.free,
                    capacity
                ));
            }
        }
        Ok(())
    }

    /// CRDT merge of a gossiped ring into this one: commutative, associative, idempotent.
    /// Per token the greater entry key wins (module comment). A token known to one side
    /// only is accepted if the other side's covering entry is older there. Peer records
    /// merge per name by their key. On error `self` is unchanged. Returns true if `self`
    /// changed.
    pub fn merge(&mut self, other: &Ring) -> Result<bool, RingError> {
        if self == other {
            return Ok(false);
        }
        let merged = self.merged(other)?;
        Ok(self.commit(merged))
    }

    /// `merge` as seen by peer `me`: additionally refuses a result that would hand to another
    /// peer any address of mine for which `holds(first, last)` says I have allocations.
    /// (Space of mine without allocations may legitimately change hands, e.g. a range I gave
    /// away before a restart from an older saved state.)
    pub(crate) fn merge_as(
        &mut self,
        me: &PeerName,
        other: &Ring,
        holds: impl Fn(u32, u32) -> bool,
    ) -> Result<bool, RingError> {
        if self == other {
            return Ok(false);
        }
        let after = self.merged(other)?;
        if let Some(e) = self.loses_held(me, &after, holds) {
            return Err(e);
        }
        Ok(self.commit(after))
    }

    /// The first range held by `me` in `self` that `after` gives to someone else.
    fn loses_held(
        &self,
        me: &PeerName,
        after: &Ring,
        holds: impl Fn(u32, u32) -> bool,
    ) -> Option<RingError> {
        for (first, last) in self.owned_by(me) {
            let mine = Span::inclusive(first, last);
            let from = after.index_of(first).unwrap_or(0);
            for i in from..after.entries.len() {
                let span = after.span_of(i);
                if u64::from(span.start) > u64::from(last) {
                    break;
                }
                let e = &after.entries[i];
                if &e.owner == me {
                    continue;
                }
                let lost = mine.intersect(&span);
                if let Some(lost_last) = lost.last() {
                    if holds(lost.start, lost_last) {
                        return Some(RingError::ClaimsMyAddresses {
                            me: me.clone(),
                            owner: e.owner.clone(),
                            first: space::addr(lost.start),
                            last: space::addr(lost_last),
                        });
                    }
                }
            }
        }
        None
    }

    fn commit(&mut self, merged: Ring) -> bool {
        if merged.entries == self.entries && merged.peers == self.peers {
            false
        } else {
            self.entries = merged.entries;
            self.peers = merged.peers;
            true
        }
    }

    fn merged(&self, other: &Ring) -> Result<Ring, RingError> {
        if other.range != self.range {
            return Err(RingError::RangeMismatch {
                received: other.range,
                ours: self.range,
            });
        }
        if other.seeds != self.seeds {
            return Err(RingError::SeededByDifferentPeers {
                received: other.seeds.clone(),
                ours: self.seeds.clone(),
            });
        }
        other.validate()?;
        // `self` is valid: every constructor and update validates or preserves it.
        let (a, b) = (&self.entries, &other.entries);
        let mut out = Vec::with_capacity(a.len().max(b.len()));
        let (mut i, mut j) = (0, 0);
        while i < a.len() || j < b.len() {
            let ta = a.get(i).map(|e| e.start);
            let tb = b.get(j).map(|e| e.start);
            match (ta, tb) {
                (Some(x), Some(y)) if x == y => {
                    let (ea, eb) = (&a[i], &b[j]);
                    // Equal states differ at most in being signed yet (a seeded entry its
                    // owner signed): the signed copy wins, so replicas converge.
                    let wins = (eb.key(), eb.signed.is_some()) > (ea.key(), ea.signed.is_some());
                    out.push(if wins { eb } else { ea }.clone());
                    i += 1;
                    j += 1;
                }
                (Some(x), y) if y.is_none_or(|y| x < y) => {
                    // Both rings start at the range start, so j >= 1 here.
                    if check_split(&a[i], a, &b[j - 1])? {
                        out.push(a[i].clone());
                    }
                    i += 1;
                }
                _ => {
                    if check_split(&b[j], b, &a[i - 1])? {
                        out.push(b[j].clone());
                    }
                    j += 1;
                }
            }
        }
        let mut peers = self.peers.clone();
        for (name, rec) in &other.peers {
            match peers.get(name) {
                Some(have)
                    if (have.key(), have.signed.is_some()) >= (rec.key(), rec.signed.is_some()) => {
                }
                _ => {
                    peers.insert(name.clone(), rec.clone());
                }
            }
        }
        let result = Ring {
            range: self.range,
            seeds: self.seeds.clone(),
            entries: out,
            peers,
        };
        result.validate()?;
        Ok(result)
    }

    /// The record of `peer` (incarnation 0 and alive if the ring has none).
    pub(crate) fn record(&self, peer: &PeerName) -> PeerRecord {
        self.peers.get(peer).cloned().unwrap_or(PeerRecord {
            incarnation: 0,
            removed_by: None,
            signed: None,
            key: None,
        })
    }

    pub fn is_removed(&self, peer: &PeerName) -> bool {
        self.peers.get(peer).is_some_and(|r| r.removed_by.is_some())
    }

    /// The live peer that inherits the entries of `peer`: its heir, or the heir's heir if
    /// that one was removed too. None for a live peer or a cycle of removed peers.
    pub(crate) fn heir_of(&self, peer: &PeerName) -> Option<PeerName> {
        let mut cur = self.peers.get(peer)?.removed_by.clone()?;
        for _ in 0..=self.peers.len() {
            match self.peers.get(&cur).and_then(|r| r.removed_by.clone()) {
                Some(next) => cur = next,
                None => return Some(cur),
            }
        }
        None
    }

    /// Hands entry `i` as a whole to `to`: era+1, version 0, same free count. The same
    /// change made by the heir and by the surrendering peer gives the same entry.
    /// Hands entry `i` to `to` as a whole, `bump` eras up: 1 for a transfer its owner
    /// makes (a gift, a surrender), [`TAKEOVER_ERAS`] for a takeover of a removed peer's
    /// entry.
    fn hand_over(&mut self, i: usize, to: &PeerName, bump: u32) -> Result<u64, RingError> {
        let span = self.span_of(i);
        let inc = self.record(to).incarnation;
        let e = &mut self.entries[i];
        let Some(era) = e.era.checked_add(bump) else {
            return Err(RingError::VersionExhausted(space::addr(e.start)));
        };
        let n = e.deeds.len() as u32;
        e.deeds.make_mut().push(Deed {
            n,
            era,
            to: to.clone(),
            inc,
            takeover: bump == TAKEOVER_ERAS,
            start: span.start,
            end: span.end,
            signed: None,
        });
        e.era = era;
        e.version = 0;
        e.owner = to.clone();
        e.inc = inc;
        e.signed = None;
        Ok(span.len())
    }

    /// Owner-only: hands my entry at `token` as a whole to `to` (era+1).
    pub fn give(&mut self, me: &PeerName, token: u32, to: &PeerName) -> Result<(), RingError> {
        let i = self.my_entry(me, token)?;
        self.hand_over(i, to, 1).map(|_| ())
    }

    /// The index of the entry at `token`, which must be mine: only owners change entries.
    fn my_entry(&self, me: &PeerName, token: u32) -> Result<usize, RingError> {
        let i = self
            .find_token(token)
            .ok_or(RingError::UnknownToken(space::addr(token)))?;
        let owner = &self.entries[i].owner;
        if owner != me {
            return Err(RingError::NotOwner {
                token: space::addr(token),
                owner: owner.clone(),
                me: me.clone(),
            });
        }
        Ok(i)
    }

    /// `me` removes `dead`: its current incarnation is tombstoned with `me` as heir and
    /// `me` takes over its entries. Idempotent. Returns the number of addresses taken over.
    pub(crate) fn remove_peer(&mut self, me: &PeerName, dead: &PeerName) -> Result<u64, RingError> {
        if me == dead {
            return Err(RingError::RemoveSelf(me.clone()));
        }
        let rec = self.record(dead);
        let tomb = PeerRecord {
            incarnation: rec.incarnation,
            removed_by: Some(me.clone()),
            signed: None,
            key: None,
        };
        if rec.removed_by.is_none() || tomb.key() > rec.key() {
            self.peers.insert(dead.clone(), tomb);
        }
        self.adopt_orphans(me)
    }

    /// Takes over every entry whose owner is removed and whose heir resolves to `me`.
    /// Returns the number of addresses taken over.
    pub(crate) fn adopt_orphans(&mut self, me: &PeerName) -> Result<u64, RingError> {
        if self.peers.is_empty() {
            return Ok(0);
        }
        let mut heirs: BTreeMap<PeerName, Option<PeerName>> = BTreeMap::new();
        let mut total = 0;
        for i in 0..self.entries.len() {
            let owner = &self.entries[i].owner;
            let rec = self.record(owner);
            if rec.removed_by.is_none() || self.entries[i].inc > rec.incarnation {
                continue;
            }
            let heir = heirs
                .entry(owner.clone())
                .or_insert_with(|| self.heir_of(owner))
                .clone();
            if heir.as_ref() == Some(me) {
                total += self.hand_over(i, me, TAKEOVER_ERAS)?;
            }
        }
        Ok(total)
    }

    /// `me` saw itself removed: every entry still in its name goes to its heir, and it
    /// comes back as `incarnation`, which must exceed the tombstoned one.
    pub(crate) fn revive(&mut self, me: &PeerName, incarnation: u32) -> Result<(), RingError> {
        if let Some(heir) = self.heir_of(me) {
            for i in 0..self.entries.len() {
                if &self.entries[i].owner == me && self.entries[i].inc < incarnation {
                    self.hand_over(i, &heir, 1)?;
                }
            }
        }
        let rec = PeerRecord {
            incarnation,
            removed_by: None,
            signed: None,
            key: None,
        };
        if rec.key() > self.record(me).key() {
            self.peers.insert(me.clone(), rec);
        }
        Ok(())
    }

    /// Signs what is `me`'s word and not signed by `signer` yet: records (tombstones it
    /// wrote, its own comeback), deeds (its gifts, its takeovers) and the state of its
    /// entries. Every change of these clears the signature, so the unsigned ones are
    /// exactly those changed here. Returns true if anything changed.
    pub(crate) fn sign_own(&mut self, me: &PeerName, signer: &Signer) -> bool {
        let range = self.range;
        let mine = Some(signer.public());
        let mut changed = false;
        for (peer, rec) in self.peers.iter_mut() {
            if rec.writer(peer) != me || rec.signed.map(|s| s.key) == mine {
                continue;
            }
            if peer == me {
                rec.key = mine;
            }
            rec.signed = Some(signer.sign(&rec.message(range, peer)));
            changed = true;
        }
        let mut seeded: Option<Option<Ring>> = None;
        for i in 0..self.entries.len() {
            let start = self.entries[i].start;
            for k in 0..self.entries[i].deeds.len() {
                let d = &self.entries[i].deeds[k];
                if d.signed.is_some() {
                    continue;
                }
                let entitled = if d.takeover {
                    &d.to == me
                } else if k > 0 {
                    &self.entries[i].deeds[k - 1].to == me
                } else {
                    let seeds =
                        seeded.get_or_insert_with(|| Ring::seeded(self.range, &self.seeds).ok());
                    seeds.as_ref().and_then(|r| r.owner_of(start)) == Some(me)
                };
                if entitled {
                    let d = &mut self.entries[i].deeds.make_mut()[k];
                    d.signed = Some(signer.sign(&d.message(range)));
                    changed = true;
                }
            }
            let e = &mut self.entries[i];
            if &e.owner == me && e.needs_owner_signature() && e.signed.map(|s| s.key) != mine {
                e.signed = Some(signer.sign(&e.message(range)));
                changed = true;
            }
        }
        changed
    }

    /// The peer that owned the addresses at `addr` when the ring was seeded.
    pub fn seed_owner_of(&self, addr: u32) -> Option<PeerName> {
        Ring::seeded(self.range, &self.seeds)
            .ok()?
            .owner_of(addr)
            .cloned()
    }

    /// Notes that `peer` told us it lives as `incarnation`, with its signature of that
    /// record (it wrote the same record in its own ring when it came back), so that space
    /// given to it is its new incarnation's. The caller checks the signature.
    pub(crate) fn note_alive(&mut self, peer: &PeerName, incarnation: u32, signed: Signed) {
        let rec = PeerRecord {
            incarnation,
            removed_by: None,
            signed: Some(signed),
            key: Some(signed.key),
        };
        if rec.key() > self.record(peer).key() {
            self.peers.insert(peer.clone(), rec);
        }
    }

    /// Sum of the free counts of all entries overlapping `window`, by owner.
    pub(crate) fn free_by_owner(&self, window: Span) -> BTreeMap<&PeerName, u64> {
        let mut m = BTreeMap::new();
        for i in 0..self.entries.len() {
            let span = self.span_of(i);
            if span.intersect(&window).is_empty() {
                continue;
            }
            let e = &self.entries[i];
            if e.free > 0 {
                *m.entry(&e.owner).or_insert(0) += u64::from(e.free);
            }
        }
        m
    }

    /// A 64-bit digest of the whole ring (FNV-1a), for anti-entropy: equal rings have
    /// equal digests; different rings practically never do.
    pub fn digest(&self) -> u64 {
        let mut h = Fnv::new();
        h.word(
            u64::from(u32::from(self.range.network())) << 8 | u64::from(self.range.prefix_len()),
        );
        for p in &self.seeds {
            h.bytes(p.as_str().as_bytes());
        }
        for e in &self.entries {
            h.word(u64::from(e.start) << 32 | u64::from(e.version));
            h.word(u64::from(e.free) << 32 | u64::from(e.era));
            // Whether it is signed yet (a seeded entry its owner signed): replicas that
            // differ only there must still exchange rings to converge.
            h.word(
                u64::from(e.inc)
                    | u64::from(e.signed.is_some()) << 32
                    | (e.deeds.len() as u64) << 33,
            );
            h.bytes(e.owner.as_str().as_bytes());
        }
        for (name, r) in &self.peers {
            h.bytes(name.as_str().as_bytes());
            h.word(u64::from(r.incarnation) | u64::from(r.signed.is_some()) << 32);
            if let Some(by) = &r.removed_by {
                h.bytes(by.as_str().as_bytes());
            }
        }
        h.0
    }
}

/// FNV-1a style over 64-bit words (bytes in 8-byte chunks): cheap enough to run on
/// every anti-entropy message.
struct Fnv(u64);
impl Fnv {
    fn new() -> Fnv {
        Fnv(0xcbf2_9ce4_8422_2325)
    }
    fn word(&mut self, w: u64) {
        self.0 = (self.0 ^ w).wrapping_mul(0x0000_0100_0000_01b3);
        self.0 ^= self.0 >> 29;
    }
    fn bytes(&mut self, b: &[u8]) {
        let mut chunks = b.chunks_exact(8);
        for c in &mut chunks {
            let mut w = [0u8; 8];
            w.copy_from_slice(c);
            self.word(u64::from_le_bytes(w));
        }
        let rest = chunks.remainder();
        let mut w = [0u8; 8];
        w[..rest.len()].copy_from_slice(rest);
        self.word(u64::from_le_bytes(w) ^ ((b.len() as u64) << 56));
    }
}

/// `new` is in ring `with` only; `cover` is the entry of the other ring holding its address.
/// True: keep the cut (the covering entry is newer in `with`). False: drop it, because the
/// other ring's covering entry changed hands (era) after the era in which the cut was made,
/// by a takeover that never saw the cut; the takeover supersedes it. (A peer holding
/// addresses in a dropped cut refuses the merge through `merge_as`.) Anything else means
/// two peers cut the same addresses without seeing each other: an error.
fn check_split(new: &Entry, with: &[Entry], cover: &Entry) -> Result<bool, RingError> {
    // The entry of `with` that holds the cover's first address: the same token when both
    // rings know it; otherwise the cover's token is one `with` never saw (an older era's
    // cut that `with` superseded, or a newer cut), and the entry containing it stands for
    // it.
    let ours = match with.binary_search_by_key(&cover.start, |e| e.start) {
        Ok(k) => with.get(k),
        Err(k) => k.checked_sub(1).and_then(|k| with.get(k)),
    };
    match ours {
        Some(o) if o.key() > cover.key() => Ok(true),
        Some(o) if cover.era > o.era && new.era <= o.era => Ok(false),
        _ => Err(RingError::InconsistentSplit {
            token: space::addr(new.start),
            owner: new.owner.clone(),
            cover: space::addr(cover.start),
        }),
    }
}

fn capacity_u32(range: Ipv4Net, span: Span) -> u32 {
    // A span has at most 2^32 addresses and at most 2^32 - 2 usable ones.
    u32::try_from(space::usable_in(range, span)).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn p(i: u8) -> PeerName {
        PeerName::from_bytes([0x02, 0, 0, 0, 0, i])
    }
    fn peers(n: usize) -> Vec<PeerName> {
        (0..n)
            .map(|i| PeerName::from_bytes([0x02, 0, 0, 0, (i >> 8) as u8, i as u8]))
            .collect()
    }
    fn net(s: &str) -> Ipv4Net {
        s.parse().unwrap()
    }
    fn ip(s: &str) -> u32 {
        u32::from(s.parse::<Ipv4Addr>().unwrap())
    }

    /// Checks that the entries exactly tile the range with sizes differing by at most one.
    fn assert_covers(ring: &Ring, n_peers: usize) {
        ring.validate().unwrap();
        let all = Span::of_net(ring.range);
        let sizes: Vec<u64> = (0..ring.entries.len())
            .map(|i| ring.span_of(i).len())
            .collect();
        assert_eq!(sizes.iter().sum::<u64>(), all.len());
        assert_eq!(ring.entries.len() as u64, (n_peers as u64).min(all.len()));
        let (min, max) = (sizes.iter().min().unwrap(), sizes.iter().max().unwrap());
        assert!(max - min <= 1, "{sizes:?}");
        let owners: std::collections::BTreeSet<_> = ring.entries.iter().map(|e| &e.owner).collect();
        assert_eq!(owners.len(), ring.entries.len(), "one entry per peer");
        for (i, e) in ring.entries.iter().enumerate() {
            assert_eq!(e.version, 0);
            assert_eq!(
                u64::from(e.free),
                space::usable_in(ring.range, ring.span_of(i))
            );
        }
    }

    #[test]
    fn seeded_two_peers_on_16_matches_weave() {
        let r = Ring::seeded(net("192.168.0.0/16"), &[p(2), p(1)]).unwrap();
        assert_eq!(r.seeds, vec![p(1), p(2)]);
        let got: Vec<_> = r
            .ranges()
            .map(|(f, l, e)| (f, l, e.owner.clone()))
            .collect();
        assert_eq!(
            got,
            vec![
                (ip("192.168.0.0"), ip("192.168.127.255"), p(1)),
                (ip("192.168.128.0"), ip("192.168.255.255"), p(2)),
            ]
        );
        assert_eq!(r.entries[0].free, 32767);
        assert_eq!(r.entries[1].free, 32767);
        assert_eq!(r.total_owned(&p(1)), 32768);
    }

    #[test]
    fn seeded_power_of_two_is_cidr_aligned() {
        let r = Ring::seeded(net("10.0.0.0/16"), &peers(4)).unwrap();
        for (f, l, _) in r.ranges() {
            let cidrs = space::cidrs_of(Span::inclusive(f, l));
            assert_eq!(cidrs.len(), 1);
            assert_eq!(cidrs[0].prefix_len(), 18);
        }
    }

    #[test]
    fn seeded_various_sizes() {
        for n in [1, 2, 3, 50] {
            for range in [
                "192.168.0.0/16",
                "10.0.0.0/30",
                "10.0.0.0/31",
                "10.0.0.7/32",
                "10.0.0.0/24",
            ] {
                let r = Ring::seeded(net(range), &peers(n)).unwrap();
                assert_covers(&r, n);
                assert_eq!(r.seeds.len(), n);
            }
        }
        let r = Ring::seeded(net("192.168.0.0/16"), &peers(3)).unwrap();
        let sizes: Vec<u64> = (0..3).map(|i| r.span_of(i).len()).collect();
        assert_eq!(sizes, vec![21846, 21845, 21845]);
        // /30 among 3: the first peer gets two addresses (network + one usable), the others
        // one each, so the last peer's only address is the broadcast: nothing usable.
        let r = Ring::seeded(net("10.0.0.0/30"), &peers(3)).unwrap();
        let frees: Vec<u32> = r.entries.iter().map(|e| e.free).collect();
        assert_eq!(frees, vec![1, 1, 0]);
        let r = Ring::seeded(net("0.0.0.0/0"), &peers(1)).unwrap();
        assert_eq!(r.entries[0].free, u32::MAX - 1);
        assert_eq!(r.total_owned(&peers(1)[0]), 1 << 32);
    }

    #[test]
    fn seeded_rejects_no_peers_and_dedups() {
        assert_eq!(
            Ring::seeded(net("10.0.0.0/24"), &[]),
            Err(RingError::NoSeeds)
        );
        let r = Ring::seeded(net("10.0.0.5/24"), &[p(1), p(1)]).unwrap();
        assert_eq!(r.seeds, vec![p(1)]);
        assert_eq!(r.range, net("10.0.0.0/24"));
    }

    #[test]
    fn owner_lookup() {
        let r = Ring::seeded(net("10.0.0.0/24"), &[p(1), p(2)]).unwrap();
        assert_eq!(r.owner_of(ip("10.0.0.0")), Some(&p(1)));
        assert_eq!(r.owner_of(ip("10.0.0.127")), Some(&p(1)));
        assert_eq!(r.owner_of(ip("10.0.0.128")), Some(&p(2)));
        assert_eq!(r.owner_of(ip("10.0.0.255")), Some(&p(2)));
        assert_eq!(r.owner_of(ip("10.0.1.0")), None);
        assert_eq!(r.owner_of(ip("9.255.255.255")), None);
        assert_eq!(
            r.owned_by(&p(2)),
            vec![(ip("10.0.0.128"), ip("10.0.0.255"))]
        );
        assert!(r.owned_by(&p(3)).is_empty());
        assert_eq!(r.total_owned(&p(3)), 0);
    }

    #[test]
    fn report_free_bumps_only_changed_entries() {
        let mut r = Ring::seeded(net("10.0.0.0/24"), &[p(1), p(2)]).unwrap();
        let t1 = ip("10.0.0.0");
        assert!(r.report_free(&p(1), &[(t1, 120)]).unwrap());
        assert_eq!((r.entries[0].free, r.entries[0].version), (120, 1));
        assert_eq!(r.entries[1].version, 0);
        assert!(!r.report_free(&p(1), &[(t1, 120)]).unwrap());
        assert_eq!(r.entries[0].version, 1);
        assert!(r.report_free(&p(1), &[(t1, 7), (t1, 110)]).unwrap());
        assert_eq!((r.entries[0].free, r.entries[0].version), (110, 2));
        assert!(r.report_free(&p(1), &[(t1, 120)]).unwrap());
        let before = r.clone();
        assert!(matches!(
            r.report_free(&p(1), &[(t1, 100), (ip("10.0.0.128"), 5)]),
            Err(RingError::NotOwner { .. })
        ));
        assert!(matches!(
            r.report_free(&p(1), &[(ip("10.0.0.1"), 5)]),
            Err(RingError::UnknownToken(_))
        ));
        assert!(matches!(
            r.report_free(&p(1), &[(t1, 128)]),
            Err(RingError::FreeTooLarge { capacity: 127, .. })
        ));
        assert_eq!(r, before, "failed reports change nothing");
    }

    #[test]
    fn split_rules() {
        let mut r = Ring::seeded(net("10.0.0.0/24"), &[p(1), p(2)]).unwrap();
        r.split(&p(1), ip("10.0.0.64"), &p(3)).unwrap();
        r.validate().unwrap();
        assert_eq!(r.entries.len(), 3);
        assert_eq!((r.entries[0].version, r.entries[0].free), (1, 63));
        assert_eq!((r.entries[1].owner.clone(), r.entries[1].free), (p(3), 64));
        assert!(matches!(
            r.split(&p(1), ip("10.0.0.200"), &p(1)),
            Err(RingError::NotOwner { .. })
        ));
        assert!(matches!(
            r.split(&p(1), ip("10.0.0.64"), &p(1)),
            Err(RingError::BadSplit { .. })
        ));
        assert!(matches!(
            r.split(&p(1), ip("10.0.1.0"), &p(1)),
            Err(RingError::BadSplit { .. })
        ));
    }

    #[test]
    fn merge_accepts_splits_and_newer_versions() {
        let base = Ring::seeded(net("10.0.0.0/24"), &[p(1), p(2)]).unwrap();
        let mut a = base.clone();
        a.split(&p(1), ip("10.0.0.64"), &p(1)).unwrap();
        let mut b = base.clone();
        b.report_free(&p(2), &[(ip("10.0.0.128"), 100)]).unwrap();
        let mut ab = a.clone();
        assert!(ab.merge(&b).unwrap());
        assert!(!ab.merge(&b).unwrap());
        let mut ba = b.clone();
        assert!(ba.merge(&a).unwrap());
        assert_eq!(ab, ba);
        assert_eq!(ab.entries.len(), 3);
        let mut old = base.clone();
        assert!(old.merge(&ab).unwrap());
        assert_eq!(old, ab);
        assert!(!ab.merge(&base).unwrap());
    }

    #[test]
    fn merge_refuses_different_seeds_or_range() {
        let mut a = Ring::seeded(net("10.0.0.0/24"), &[p(1), p(2)]).unwrap();
        let b = Ring::seeded(net("10.0.0.0/24"), &[p(1), p(3)]).unwrap();
        let before = a.clone();
        let err = a.merge(&b).unwrap_err();
        assert_eq!(
            err.to_string(),
            "IP allocation was seeded by different peers (received: [02:00:00:00:00:01 \
             02:00:00:00:00:03], ours: [02:00:00:00:00:01 02:00:00:00:00:02])"
        );
        let c = Ring::seeded(net("10.0.1.0/24"), &[p(1), p(2)]).unwrap();
        assert!(matches!(a.merge(&c), Err(RingError::RangeMismatch { .. })));
        assert_eq!(a, before);
    }

    #[test]
    fn equal_versions_resolve_deterministically() {
        // Diverged free counts at one version (an owner that lost its latest state): the
        // order is total, both sides pick the same, and the owner re-reports later.
        let base = Ring::seeded(net("10.0.0.0/24"), &[p(1), p(2)]).unwrap();
        let mut a = base.clone();
        a.report_free(&p(1), &[(ip("10.0.0.0"), 10)]).unwrap();
        let mut b = base.clone();
        b.report_free(&p(1), &[(ip("10.0.0.0"), 11)]).unwrap();
        assert_eq!(merged(&a, &b), merged(&b, &a));
        assert_eq!(merged(&a, &b).entries[0].free, 11);
    }

    #[test]
    fn rmpeer_tombstones_and_stale_owner_cannot_resurrect() {
        let base = Ring::seeded(net("10.0.0.0/24"), &[p(1), p(2), p(3)]).unwrap();
        let mut y = base.clone();
        assert!(matches!(
            y.remove_peer(&p(2), &p(2)),
            Err(RingError::RemoveSelf(_))
        ));
        let n = y.remove_peer(&p(2), &p(3)).unwrap();
        assert_eq!(n, 85);
        assert_eq!(y.total_owned(&p(3)), 0);
        assert_eq!(y.remove_peer(&p(2), &p(3)).unwrap(), 0, "idempotent");
        assert!(y.is_removed(&p(3)));
        // The dead peer's stale replica kept changing its entry: it still loses.
        let mut zombie = base.clone();
        for f in 0..20 {
            zombie.report_free(&p(3), &[(ip("10.0.0.171"), f)]).unwrap();
        }
        let m = merged(&y, &zombie);
        assert_eq!(m, merged(&zombie, &y));
        assert_eq!(m.total_owned(&p(3)), 0);
        assert_eq!(m.owner_of(ip("10.0.0.200")), Some(&p(2)));
        // Concurrent rmpeer by p1: the lower name wins, for the entries and the heir.
        let mut x = base.clone();
        x.report_free(&p(1), &[(ip("10.0.0.0"), 5)]).unwrap();
        x.remove_peer(&p(1), &p(3)).unwrap();
        let m1 = merged(&m, &x);
        assert_eq!(m1, merged(&x, &m));
        assert_eq!(m1.owner_of(ip("10.0.0.200")), Some(&p(1)));
        assert_eq!(m1.heir_of(&p(3)), Some(p(1)));
        // p2 sees it lost: nothing of p3 is left for p2 to adopt.
        let mut after = m1.clone();
        assert_eq!(after.adopt_orphans(&p(2)).unwrap(), 0);
        // The removed peer comes back as incarnation 1 and owns nothing.
        let mut back = m1.clone();
        back.revive(&p(3), 1).unwrap();
        assert!(!back.is_removed(&p(3)));
        assert_eq!(back.total_owned(&p(3)), 0);
        let m2 = merged(&m1, &back);
        assert_eq!(m2.record(&p(3)).incarnation, 1);
        assert!(!m2.is_removed(&p(3)));
        // Removing the heir hands on what it inherited.
        let mut z = m2.clone();
        z.remove_peer(&p(2), &p(1)).unwrap();
        assert_eq!(z.total_owned(&p(1)), 0);
        assert_eq!(z.heir_of(&p(3)), None);
        assert_eq!(z.owner_of(ip("10.0.0.200")), Some(&p(2)));
        z.validate().unwrap();
        assert_ne!(z.digest(), m2.digest());
    }

    #[test]
    fn heir_inherits_late_entries_of_a_removed_peer() {
        let base = Ring::seeded(net("10.0.0.0/24"), &[p(1), p(2)]).unwrap();
        // p1 donated to p3 just before p3 died; p2 removed p3 without having seen it.
        let mut donor = base.clone();
        donor.split(&p(1), ip("10.0.0.64"), &p(3)).unwrap();
        let mut remover = base.clone();
        remover.remove_peer(&p(2), &p(3)).unwrap();
        let mut m = merged(&remover, &donor);
        assert_eq!(m.owner_of(ip("10.0.0.70")), Some(&p(3)));
        assert_eq!(m.adopt_orphans(&p(2)).unwrap(), 64);
        assert_eq!(m.owner_of(ip("10.0.0.70")), Some(&p(2)));
        // Any peer computing the takeover gets the same entry.
        let mut other = merged(&donor, &remover);
        assert_eq!(other.adopt_orphans(&p(1)).unwrap(), 0);
        assert_eq!(merged(&m, &other), m);
    }

    #[test]
    fn merge_refuses_concurrent_cuts_of_the_same_entry() {
        let base = Ring::seeded(net("10.0.0.0/24"), &[p(1), p(2)]).unwrap();
        // Two histories of p1 that never saw each other (e.g. p1 lost its state).
        let mut a = base.clone();
        a.split(&p(1), ip("10.0.0.64"), &p(3)).unwrap();
        let mut b = base.clone();
        b.split(&p(1), ip("10.0.0.32"), &p(4)).unwrap();
        b.report_free(&p(1), &[(ip("10.0.0.0"), 1)]).unwrap();
        let before = a.clone();
        assert!(a.merge(&b).is_err());
        assert_eq!(a, before);
        // A cut that did not bump the covering entry is not trusted either.
        let mut low = base.clone();
        low.report_free(&p(1), &[(ip("10.0.0.0"), 10)]).unwrap();
        let mut c = low.clone();
        c.entries.insert(
            1,
            Entry {
                start: ip("10.0.0.64"),
                owner: p(3),
                version: 0,
                free: 0,
                era: 0,
                inc: 0,
                deeds: Deeds::default(),
                signed: None,
            },
        );
        c.validate().unwrap();
        let mut d = low.clone();
        let err = d.merge(&c);
        assert!(
            matches!(err, Err(RingError::InconsistentSplit { .. })),
            "{err:?}"
        );
        // And a ring with the covering entry newer but lacking the cut is inconsistent.
        let mut e = base.clone();
        e.split(&p(1), ip("10.0.0.64"), &p(1)).unwrap();
        let mut f = base.clone();
        f.report_free(&p(1), &[(ip("10.0.0.0"), 3)]).unwrap();
        f.report_free(&p(1), &[(ip("10.0.0.0"), 4)]).unwrap();
        assert!(matches!(
            e.merge(&f),
            Err(RingError::InconsistentSplit { .. })
        ));
    }

    #[test]
    fn a_cut_superseded_by_a_takeover_is_dropped_in_either_merge_order() {
        let base = Ring::seeded(net("10.0.0.0/24"), &[p(1), p(2)]).unwrap();
        // A stale view: p1 cut its entry at .64 for p3, then died before the others heard.
        let mut stale = base.clone();
        stale.split(&p(1), ip("10.0.0.64"), &p(3)).unwrap();
        // The others: p2 took p1's entries over (rmpeer) and cut the entry at .32.
        let mut current = base.clone();
        current.remove_peer(&p(2), &p(1)).unwrap();
        current.split(&p(2), ip("10.0.0.32"), &p(4)).unwrap();
        let mut x = stale.clone();
        x.merge(&current).unwrap();
        let mut y = current.clone();
        y.merge(&stale).unwrap();
        assert_eq!(x, y);
        let tokens: Vec<u32> = x.entries.iter().map(|e| e.start).collect();
        assert_eq!(
            tokens,
            vec![ip("10.0.0.0"), ip("10.0.0.32"), ip("10.0.0.128")],
            "p1's old cut is gone with its era"
        );
        assert_eq!(x.owner_of(ip("10.0.0.10")), Some(&p(2)));
        assert_eq!(x.owner_of(ip("10.0.0.70")), Some(&p(4)), "not p3's");
    }

    #[test]
    fn a_takeover_wins_over_a_gift_the_dead_peer_made_unheard() {
        let base = Ring::seeded(net("10.0.0.0/24"), &[p(1), p(2)]).unwrap();
        // p1 gives its whole entry to p0 and dies before anyone hears of it; its disk
        // keeps the gift.
        let mut gift = base.clone();
        gift.give(&p(1), ip("10.0.0.0"), &p(0)).unwrap();
        // p2 removes p1 and takes its entry over, unaware of the gift.
        let mut takeover = base.clone();
        takeover.remove_peer(&p(2), &p(1)).unwrap();
        assert_eq!(takeover.owner_of(ip("10.0.0.1")), Some(&p(2)));
        // p1's disk comes back: whatever the merge order, the takeover stands (p0, the
        // lower name, would have won a tie).
        for (mut a, b) in [
            (takeover.clone(), gift.clone()),
            (gift.clone(), takeover.clone()),
        ] {
            a.merge(&b).unwrap();
            assert_eq!(a.owner_of(ip("10.0.0.1")), Some(&p(2)));
        }
        // Two heirs taking over at once still agree on the lower name.
        let mut h3 = base.clone();
        h3.remove_peer(&p(3), &p(1)).unwrap();
        let mut both = takeover.clone();
        both.merge(&h3).unwrap();
        assert_eq!(both.owner_of(ip("10.0.0.1")), Some(&p(2)));
    }

    #[test]
    fn merge_rejects_invalid_input() {
        let mut a = Ring::seeded(net("10.0.0.0/24"), &[p(1), p(2)]).unwrap();
        let mut bad = a.clone();
        bad.entries.swap(0, 1);
        assert!(matches!(a.merge(&bad), Err(RingError::Invalid(_))));
        let mut bad = a.clone();
        bad.entries[0].free = 200;
        assert!(matches!(a.merge(&bad), Err(RingError::Invalid(_))));
        let mut bad = a.clone();
        bad.entries.clear();
        assert!(matches!(a.merge(&bad), Err(RingError::Invalid(_))));
        let mut bad = a.clone();
        bad.entries.remove(0);
        assert!(matches!(a.merge(&bad), Err(RingError::Invalid(_))));
    }

    #[test]
    fn merge_as_protects_my_allocations() {
        let base = Ring::seeded(net("10.0.0.0/24"), &[p(1), p(2)]).unwrap();
        // p2 (wrongly) cuts into p1's entry and bumps it, taking 10.0.0.64/26.
        let mut rogue = base.clone();
        rogue.entries[0].version = 1;
        rogue.entries[0].free = 63;
        rogue.entries.insert(
            1,
            Entry {
                start: ip("10.0.0.64"),
                owner: p(2),
                version: 0,
                free: 64,
                era: 0,
                inc: 0,
                deeds: Deeds::default(),
                signed: None,
            },
        );
        rogue.validate().unwrap();
        let mut mine = base.clone();
        let holds = |f: u32, l: u32| (f..=l).contains(&ip("10.0.0.70"));
        let err = mine.merge_as(&p(1), &rogue, holds).unwrap_err();
        assert!(matches!(err, RingError::ClaimsMyAddresses { .. }), "{err}");
        assert_eq!(mine, base);
        // Without allocations there, the change is accepted (space given away earlier).
        assert!(mine.merge_as(&p(1), &rogue, |_, _| false).unwrap());
        assert_eq!(mine, rogue);
    }

    #[test]
    fn serde_roundtrip() {
        let mut r = Ring::seeded(net("10.0.0.0/24"), &[p(1), p(2)]).unwrap();
        r.split(&p(1), ip("10.0.0.9"), &p(7)).unwrap();
        let s = serde_json::to_string(&r).unwrap();
        assert!(s.contains("\"10.0.0.0/24\""));
        let back: Ring = serde_json::from_str(&s).unwrap();
        assert_eq!(back, r);
    }

    // ---- property tests ----

    #[derive(Clone, Debug)]
    enum Op {
        /// Replica `r` (owned by peer r) cuts one of its entries.
        Split {
            r: usize,
            pick: usize,
            off: u32,
            to: usize,
        },
        /// Replica `r` reports a new free count on one of its entries.
        Free { r: usize, pick: usize, free: u32 },
        /// Gossip: replica `to` merges replica `from`.
        Gossip { from: usize, to: usize },
    }

    const N: usize = 4;

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (0..N, any::<usize>(), any::<u32>(), 0..N + 1)
                .prop_map(|(r, pick, off, to)| Op::Split { r, pick, off, to }),
            (0..N, any::<usize>(), any::<u32>()).prop_map(|(r, pick, free)| Op::Free {
                r,
                pick,
                free
            }),
            (0..N, 0..N).prop_map(|(from, to)| Op::Gossip { from, to }),
        ]
    }

    /// Runs owner operations on per-peer replicas of one seeded ring and returns every
    /// ring state seen along the way.
    fn history(ops: &[Op]) -> Vec<Ring> {
        let names = peers(N + 1);
        let base = Ring::seeded(net("10.1.0.0/22"), &names[..N]).unwrap();
        let mut reps = vec![base.clone(); N];
        let mut seen = vec![base];
        for op in ops {
            match *op {
                Op::Split { r, pick, off, to } => {
                    let me = &names[r];
                    let mine: Vec<usize> = (0..reps[r].entries.len())
                        .filter(|&i| &reps[r].entries[i].owner == me)
                        .collect();
                    if mine.is_empty() {
                        continue;
                    }
                    let i = mine[pick % mine.len()];
                    let span = reps[r].span_of(i);
                    if span.len() < 2 {
                        continue;
                    }
                    let at = span.start + 1 + off % (span.len() as u32 - 1);
                    reps[r].split(me, at, &names[to]).unwrap();
                }
                Op::Free { r, pick, free } => {
                    let me = &names[r];
                    let mine: Vec<usize> = (0..reps[r].entries.len())
                        .filter(|&i| &reps[r].entries[i].owner == me)
                        .collect();
                    if mine.is_empty() {
                        continue;
                    }
                    let i = mine[pick % mine.len()];
                    let cap = space::usable_in(reps[r].range, reps[r].span_of(i)) as u32;
                    let start = reps[r].entries[i].start;
                    reps[r]
                        .report_free(me, &[(start, free % (cap + 1))])
                        .unwrap();
                }
                Op::Gossip { from, to } => {
                    let other = reps[from].clone();
                    reps[to].merge(&other).unwrap();
                }
            }
            reps.iter().for_each(|r| r.validate().unwrap());
            seen.extend(reps.iter().cloned());
        }
        seen
    }

    fn merged(a: &Ring, b: &Ring) -> Ring {
        let mut x = a.clone();
        x.merge(b).unwrap();
        x
    }

    proptest! {
        #[test]
        fn merge_is_a_crdt(ops in proptest::collection::vec(op(), 0..40),
                           picks in proptest::collection::vec(any::<(usize, usize, usize)>(), 1..12)) {
            let seen = history(&ops);
            for (i, j, k) in picks {
                let (a, b, c) = (&seen[i % seen.len()], &seen[j % seen.len()], &seen[k % seen.len()]);
                let ab = merged(a, b);
                prop_assert_eq!(&ab, &merged(b, a));
                prop_assert_eq!(&merged(a, a), a);
                prop_assert_eq!(merged(&ab, c), merged(a, &merged(b, c)));
                // Each address still has exactly one owner: the entries tile the range.
                ab.validate().unwrap();
                let mut changed = a.clone();
                prop_assert_eq!(changed.merge(b).unwrap(), &ab != a);
            }
        }

        #[test]
        fn seeding_is_order_independent(n in 1usize..60, prefix in 16u8..=32, seed in any::<u64>(),
                                        base in any::<u32>()) {
            let mut names = peers(n);
            let range = Ipv4Net::new(Ipv4Addr::from(base), prefix).unwrap().trunc();
            let sorted = Ring::seeded(range, &names).unwrap();
            // Deterministic Fisher-Yates shuffle driven by `seed`.
            let mut x = seed;
            for i in (1..names.len()).rev() {
                x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                names.swap(i, (x >> 33) as usize % (i + 1));
            }
            let shuffled = Ring::seeded(range, &names).unwrap();
            prop_assert_eq!(&sorted, &shuffled);
            assert_covers(&sorted, n);
        }
    }
}
