//! Gossip: how rings and peer addresses spread, linear per peer in the cluster size.
//!
//! - Anti-entropy: every tick, one random neighbour gets a `Digest` of the ring; a
//!   neighbour whose ring differs answers with its whole ring, and a receiver whose merged
//!   ring still differs from what it received answers back (push-pull), so two rings
//!   converge in one exchange and a change reaches everyone in O(log N) ticks.
//! - Ownership changes made here (seeding, donation, rmpeer, comeback) are pushed at once
//!   to `FANOUT` random neighbours (and a donation to its recipient); free-count changes
//!   ride on anti-entropy only.
//! - Peer summaries are first-hand: this node's own connections, and the address it
//!   observes for each neighbour. A new neighbour gets them at once; otherwise every
//!   `PEERS_EVERY` ticks they go to the anti-entropy neighbour.
//!
//! Per tick a node thus sends one digest, at most one ring per digest received, and
//! heartbeats: O(N) bytes, where Weave sent every topology change to every neighbour.
//!
//! The restart gate lives here too: a node restored with a ring naming others allocates
//! only once a peer that is not itself restarting has told it its ring, in case this node
//! was removed while it was down.

use super::effects::{Action, ConnId, Outbox};
use super::message::{LinkSummary, Message, PeerSummary, MAX_SUMMARIES};
use super::node::{Node, FANOUT, GATE_TICKS, PEERS_EVERY};
use super::secure::PublicKey;
use super::PeerName;
use crate::core::ipam::{Ring, SignKey};
use std::collections::{BTreeMap, BTreeSet};
use std::net::{Ipv4Addr, SocketAddrV4};

/// Most peers a node keeps track of; gossip naming more is ignored (and counted), so a
/// member cannot make the node dial, route to or report an unbounded number of peers.
pub(crate) const MAX_PEERS: usize = 4096;

/// What this node knows of another peer.
#[derive(Clone, Debug)]
pub(super) struct KnownPeer {
    pub(super) nickname: String,
    pub(super) uid: u64,
    pub(super) address: Option<Ipv4Addr>,
    pub(super) control_port: u16,
    pub(super) data_port: u16,
    /// The peers it is connected to, as it last told us (first-hand only).
    pub(super) connections: Vec<PeerName>,
    /// Address and direction of those connections, where it told them.
    pub(super) links: Vec<LinkSummary>,
    pub(super) key: Option<PublicKey>,
}

/// What a received ring's sender said about it (see `Message::Gossip`).
#[derive(Clone, Copy, Debug)]
pub(super) struct RingFlags {
    pub(super) gated: bool,
    pub(super) answer: bool,
}

#[derive(Debug)]
pub(super) struct Gossip {
    pub(super) peers: BTreeMap<PeerName, KnownPeer>,
    /// Control addresses dialled (by the I/O layer's targets or on our request), so that
    /// gossip naming one again does not ask for a second dialler.
    pub(super) dialled: BTreeSet<SocketAddrV4>,
    /// Why the last received ring could not be merged, for `/status`.
    pub(super) ring_error: Option<String>,
    /// Restored with a ring naming other peers: no fresh allocation until a peer has told
    /// us its ring.
    pub(super) gated: bool,
    /// Tick at which a gated node first merged a (gated) peer's ring.
    gate_heard: Option<u64>,
    /// Every peer's nickname this node has heard (persisted): a ring member whose
    /// Kubernetes Node is gone is found by it even after a restart.
    pub(super) nicknames: BTreeMap<PeerName, String>,
    /// Every peer's static key, bound on first contact (direct, or first-hand gossip from
    /// a member) and persisted.
    pub(super) keys: BTreeMap<PeerName, PublicKey>,
    /// Every peer's record-signing key: from its Hello (over the channel its static key
    /// authenticated), else from the first signed record a member relays (persisted).
    pub(super) sign_keys: BTreeMap<PeerName, SignKey>,
}

impl Gossip {
    pub(super) fn new(gated: bool) -> Gossip {
        Gossip {
            peers: BTreeMap::new(),
            dialled: BTreeSet::new(),
            ring_error: None,
            gated,
            gate_heard: None,
            nicknames: BTreeMap::new(),
            keys: BTreeMap::new(),
            sign_keys: BTreeMap::new(),
        }
    }
}

impl Node {
    /// Remembers `name`'s nickname; a change is persisted.
    pub(super) fn learn_nickname(&mut self, name: &PeerName, nickname: &str) {
        if nickname.is_empty() || name == &self.cfg.name {
            return;
        }
        if self.gossip.nicknames.get(name).map(String::as_str) != Some(nickname) {
            self.gossip
                .nicknames
                .insert(name.clone(), nickname.to_string());
            self.touch();
        }
    }

    /// Per tick: heartbeats to all but one neighbour, a digest (and every `PEERS_EVERY`
    /// ticks the peer summaries) to that one, and the restart gate's timer.
    pub(super) fn gossip_tick(&mut self, out: &mut Outbox) {
        let ids = self.established_ids();
        let target = if ids.is_empty() {
            None
        } else {
            Some(ids[(self.next_rand() % ids.len() as u64) as usize])
        };
        // Every neighbour gets a probe each tick (the digest's target too), so that the
        // round-trip time of every connection is measured, even a node's only one.
        for &id in &ids {
            out.send(
                id,
                Message::Heartbeat {
                    probe: Some(self.ticks),
                    echo: None,
                },
            );
        }
        if let Some(t) = target {
            self.counters.digests_sent += 1;
            out.send(
                t,
                Message::Digest {
                    ring: self.ipam.ring_digest(),
                },
            );
            if self.ticks.is_multiple_of(PEERS_EVERY) {
                out.send(
                    t,
                    Message::Gossip {
                        peers: self.summaries(),
                        ring: None,
                        gated: self.gossip.gated,
                        answer: false,
                    },
                );
            }
        }
        if self.gossip.gated
            && self
                .gossip
                .gate_heard
                .is_some_and(|t| self.ticks >= t + GATE_TICKS)
        {
            self.open_gate(out);
        }
    }

    /// A new neighbour learns whom we know at once, and our ring if its digest differs.
    pub(super) fn greet(
        &mut self,
        id: ConnId,
        their_digest: Option<u64>,
        they_are_gated: bool,
        out: &mut Outbox,
    ) {
        out.send(
            id,
            Message::Gossip {
                peers: self.summaries(),
                ring: None,
                gated: self.gossip.gated,
                answer: false,
            },
        );
        self.announce_links(Some(id), out);
        let mine = self.ipam.ring_digest();
        if their_digest != mine {
            if mine.is_some() {
                self.send_ring(id, out);
            }
        } else if mine.is_some() && !they_are_gated {
            self.open_gate(out);
        }
    }

    pub(super) fn on_digest(&mut self, id: ConnId, theirs: Option<u64>, out: &mut Outbox) {
        let mine = self.ipam.ring_digest();
        if theirs != mine {
            // One answer per connection per tick: a peer probes once per tick, and a whole
            // ring for every Digest a flood sends would be memory on demand.
            let ticks = self.ticks;
            match self.conns.get_mut(&id) {
                Some(c) if c.digest_answered == Some(ticks) => return,
                Some(c) => c.digest_answered = Some(ticks),
                None => return,
            }
            if mine.is_some() {
                self.send_ring_as(id, true, out);
            } else {
                out.send(id, Message::Digest { ring: None });
            }
        }
    }

    pub(super) fn send_ring(&mut self, id: ConnId, out: &mut Outbox) {
        self.send_ring_as(id, false, out)
    }

    fn send_ring_as(&mut self, id: ConnId, answer: bool, out: &mut Outbox) {
        if let Some(ring) = self.ipam.ring() {
            self.counters.rings_sent += 1;
            out.send(
                id,
                Message::Gossip {
                    peers: Vec::new(),
                    ring: Some(ring.clone()),
                    gated: self.gossip.gated,
                    answer,
                },
            );
        }
    }

    /// Pushes the ring to `FANOUT` random neighbours (ownership changed here), and to
    /// `also` first.
    pub(super) fn push_ring(&mut self, out: &mut Outbox, also: Option<ConnId>) {
        let mut ids = self.established_ids();
        let mut chosen = Vec::new();
        if let Some(a) = also {
            chosen.push(a);
            ids.retain(|&i| i != a);
        }
        while chosen.len() < FANOUT + usize::from(also.is_some()) && !ids.is_empty() {
            let k = (self.next_rand() % ids.len() as u64) as usize;
            chosen.push(ids.swap_remove(k));
        }
        for id in chosen {
            self.send_ring(id, out);
        }
    }

    pub(super) fn open_gate(&mut self, out: &mut Outbox) {
        if self.gossip.gated {
            self.gossip.gated = false;
            out.info("heard the ring from a peer after restart: allocating again");
            out.push(Action::Ready);
            // Peers in their own gate take this node's word on its gate (see
            // `forged_tombstone`): tell them it is past it.
            for id in self.established_ids() {
                out.send(
                    id,
                    Message::Gossip {
                        peers: Vec::new(),
                        ring: None,
                        gated: false,
                        answer: false,
                    },
                );
            }
        }
    }

    /// Merges a ring received from `from`; on a failure the connection is closed and the
    /// error kept for `/status`. Returns whether the connection may continue.
    fn merge_ring(
        &mut self,
        id: ConnId,
        ring: &Ring,
        from: &PeerName,
        flags: RingFlags,
        out: &mut Outbox,
    ) -> bool {
        let tofu = match self.check_provenance(ring) {
            Ok(tofu) => tofu,
            Err(why) => {
                self.counters.forged_records += 1;
                let why = format!("refused the IP ring from {from}: {why}");
                if self.gossip.ring_error.as_deref() != Some(why.as_str()) {
                    out.warn(why.clone());
                    self.gossip.ring_error = Some(why);
                }
                return true;
            }
        };
        if let Some(alive) = self.forged_tombstone(ring) {
            self.counters.refused_tombstones += 1;
            let why = format!(
                "refused the IP ring from {from}: it removes {alive}, which is alive (this node, or connected to it now); a removal comes only from rmpeer of a peer that is gone"
            );
            if self.gossip.ring_error.as_deref() != Some(why.as_str()) {
                out.warn(why.clone());
                self.gossip.ring_error = Some(why);
            }
            return true;
        }
        let was_ready = self.ipam.is_ready();
        let o = match self.ipam.merge_ring(ring) {
            Ok(o) => {
                self.bind_keys(tofu);
                o
            }
            Err(e) => {
                self.counters.bad_gossip += 1;
                let why = format!("cannot merge IP ring from {from}: {e}");
                self.gossip.ring_error = Some(why.clone());
                out.warn(why.clone());
                out.close(id, why);
                return false;
            }
        };
        if let Some((inc, dropped)) = &o.revived {
            self.counters.comebacks += 1;
            out.warn(format!(
                "this peer ({}) was removed from the ring (rmpeer) while it was away: \
                 dropped {} stale allocations and rejoined as incarnation {inc}",
                self.cfg.name,
                dropped.len()
            ));
        }
        if o.adopted > 0 {
            out.info(format!(
                "inherited {} addresses of removed peers",
                o.adopted
            ));
        }
        for c in &o.reclaim.conflicts {
            out.warn(c.clone());
        }
        if o.changed {
            self.touch();
            out.push(Action::RoutesChanged);
            if !was_ready {
                out.push(Action::Ready);
            }
            self.gossip.ring_error = None;
        }
        if !was_ready {
            self.consensus.proposal = None;
        }
        if !flags.gated {
            self.open_gate(out);
        } else if self.gossip.gated {
            self.gossip.gate_heard.get_or_insert(self.ticks);
        }
        if o.revived.is_some() || o.adopted > 0 {
            self.push_ring(out, None);
        }
        // Push-pull: if the sender lacks something we have, tell it.
        if flags.answer && self.ipam.ring() != Some(ring) {
            self.send_ring(id, out);
        }
        self.check_want(out);
        true
    }

    /// A tombstone in `ring` that this node knows to be false: it removes this node while
    /// it runs, or a peer connected to it right now (unless both this node and that peer
    /// are in their restart gates: two nodes removed while they were down that come back
    /// together would otherwise each refuse the other's removal, and never learn of their
    /// own), or it names this node as the remover
    /// of a peer that this node's own (persisted) ring does not show it removed. rmpeer
    /// refuses the first two (a connected peer is alive) and saves its own ring before
    /// anything leaves, so such a ring was forged or made by mistake; merging it would
    /// hand the peer's addresses, its pods' among them, to the heir.
    fn forged_tombstone(&self, ring: &Ring) -> Option<PeerName> {
        let ours = self.ipam.ring();
        let connected: Vec<PeerName> = self
            .established_gated()
            .into_iter()
            .filter(|(_, gated)| !(self.gossip.gated && *gated))
            .map(|(p, _)| p)
            .collect();
        ring.peers.iter().find_map(|(peer, rec)| {
            rec.removed_by.as_ref()?;
            let known = ours.and_then(|r| r.peers.get(peer));
            let known_inc = known.map_or(0, |k| k.incarnation);
            let already =
                known.is_some_and(|k| k.removed_by.is_some() && k.incarnation >= rec.incarnation);
            if already || rec.incarnation < known_inc {
                return None;
            }
            if rec.removed_by.as_ref() == Some(&self.cfg.name) && ours.is_some() {
                return Some(peer.clone());
            }
            // Without a ring this node knows nothing of an earlier life of its name: a
            // tombstone of it is news (it comes back as a new incarnation), not a forgery.
            let alive = if peer == &self.cfg.name {
                ours.is_some() && !self.gossip.gated && rec.incarnation >= self.ipam.incarnation()
            } else {
                connected.contains(peer)
            };
            alive.then(|| peer.clone())
        })
    }

    pub(super) fn on_gossip(
        &mut self,
        id: ConnId,
        from: &PeerName,
        peers: Vec<PeerSummary>,
        ring: Option<Ring>,
        flags: RingFlags,
        out: &mut Outbox,
    ) {
        if let Some(ring) = ring {
            if !self.merge_ring(id, &ring, from, flags, out) {
                return;
            }
        }
        if peers.is_empty() {
            return;
        }
        if peers.len() > MAX_SUMMARIES {
            self.counters.peers_over_bound += peers.len() as u64;
            out.warn(format!(
                "gossip from {from} names {} peers, over the bound of {MAX_SUMMARIES}: ignored",
                peers.len()
            ));
            return;
        }
        let direct: BTreeSet<PeerName> = self.established_peers().into_iter().collect();
        for p in peers {
            if p.name == self.cfg.name {
                continue;
            }
            if &p.name == from {
                if let Some(k) = self.gossip.peers.get_mut(from) {
                    k.connections = p.connections.clone();
                    // Only links that describe a connection it names, at most one each:
                    // the list cannot outgrow what the frame bound already allows.
                    k.links = p
                        .links
                        .iter()
                        .filter(|l| p.connections.contains(&l.name))
                        .take(p.connections.len())
                        .cloned()
                        .collect();
                }
                continue;
            }
            // First-hand knowledge wins: what we observe ourselves is never overwritten.
            if direct.contains(&p.name) {
                continue;
            }
            // A peer removed from the ring stays forgotten until it connects again.
            if self.ipam.ring().is_some_and(|r| r.is_removed(&p.name)) {
                continue;
            }
            if let Some(key) = p.key {
                match self.gossip.keys.get(&p.name) {
                    Some(bound) if *bound != key => {
                        // A member vouches for a key we know to be wrong: believe the
                        // binding, not the gossip.
                        self.counters.key_mismatches += 1;
                        continue;
                    }
                    Some(_) => {}
                    None => {
                        self.gossip.keys.insert(p.name.clone(), key);
                        self.touch();
                    }
                }
            }
            if !self.gossip.peers.contains_key(&p.name) && self.gossip.peers.len() >= MAX_PEERS {
                self.counters.peers_over_bound += 1;
                continue;
            }
            self.learn_nickname(&p.name, &p.nickname);
            let changed = match self.gossip.peers.get(&p.name) {
                None => true,
                Some(k) => k.uid != p.uid || k.address != p.address || k.data_port != p.data_port,
            };
            if changed {
                self.gossip.peers.insert(
                    p.name.clone(),
                    KnownPeer {
                        nickname: p.nickname.clone(),
                        uid: p.uid,
                        address: p.address,
                        control_port: p.control_port,
                        data_port: p.data_port,
                        connections: Vec::new(),
                        links: Vec::new(),
                        key: p.key,
                    },
                );
                out.push(Action::RoutesChanged);
            }
            if let Some(a) = p.address {
                let target = SocketAddrV4::new(a, p.control_port);
                if self.gossip.dialled.insert(target) {
                    out.push(Action::Dial(target));
                }
            }
        }
    }

    /// The I/O layer dials these targets itself (its peer sources); remembering them
    /// avoids asking for a second dialler when gossip names the same address.
    pub(crate) fn note_target(&mut self, target: SocketAddrV4) {
        self.gossip.dialled.insert(target);
    }

    /// The I/O layer gave up on a target gossip named: if gossip names it again, it is
    /// dialled again.
    pub fn forget_target(&mut self, target: SocketAddrV4) {
        self.gossip.dialled.remove(&target);
    }

    /// Our set of connections changed: every other neighbour hears our own summary now,
    /// rather than at the next periodic round (a minute on average), so that each node's
    /// peer list shows who is connected to whom within a round trip. One small message per
    /// neighbour per local connection change.
    pub(super) fn announce_links(&mut self, except: Option<ConnId>, out: &mut Outbox) {
        let mine: Vec<PeerSummary> = self.summaries().into_iter().take(1).collect();
        for other in self.established_ids() {
            if Some(other) == except {
                continue;
            }
            out.send(
                other,
                Message::Gossip {
                    peers: mine.clone(),
                    ring: None,
                    gated: self.gossip.gated,
                    answer: false,
                },
            );
        }
    }

    /// First-hand: this node with its connections, and each neighbour at the address this
    /// node observes (without the neighbour's own connections, which would be hearsay).
    fn summaries(&self) -> Vec<PeerSummary> {
        let direct = self.established_peers();
        let mut v = vec![PeerSummary {
            name: self.cfg.name.clone(),
            nickname: self.cfg.nickname.clone(),
            uid: self.cfg.uid,
            address: None,
            control_port: self.cfg.control_port,
            data_port: self.cfg.data_port,
            connections: direct.clone(),
            links: self
                .conns
                .values()
                .filter_map(|c| {
                    Some(LinkSummary {
                        name: c.peer.as_ref()?.0.clone(),
                        remote: c.remote,
                        outbound: c.outbound,
                    })
                })
                .collect(),
            key: None,
        }];
        for name in direct {
            if let Some(k) = self.gossip.peers.get(&name) {
                v.push(PeerSummary {
                    name: name.clone(),
                    nickname: k.nickname.clone(),
                    uid: k.uid,
                    address: k.address,
                    control_port: k.control_port,
                    data_port: k.data_port,
                    connections: Vec::new(),
                    links: Vec::new(),
                    key: k.key,
                });
            }
        }
        v
    }
}
