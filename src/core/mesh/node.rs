//! The node's control state machine, driven by events (start, connection up, message in,
//! connection closed, tick, a local IPAM request) and answering each with one [`Effects`]
//! value. No sockets, no clock: time is the tick count, randomness a generator seeded
//! from the configuration.
//!
//! As quinn-proto hands its connection's concerns to submodules, the node hands its jobs
//! to its own: `handshake` (Hello and who may connect), `gossip` (rings and peer
//! summaries), `consensus` (Paxos over the first division of the range: proposer and
//! acceptor), `donation` (space on demand), `local` (this node's own IPAM requests) and
//! `view` (what the API shows). This file holds the state they share, dispatches events
//! and turns each event's actions into [`Effects`], with a save whenever persisted state
//! changed and is not yet acknowledged.

use super::consensus::Consensus;
use super::donation::Donation;
use super::effects::{Action, ConnId, Effects, Outbox, Save};
use super::gossip::{Gossip, RingFlags};
use super::message::Message;
use super::secure::PublicKey;
use super::PeerName;
use crate::core::ipam::paxos::Acceptor;
use crate::core::ipam::{IpallocInit, Ipam, SignKey};
use crate::core::persist::PersistedState;
use crate::core::rng::SplitMix64;
use ipnet::Ipv4Net;
use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};

/// Every `PEERS_EVERY` ticks the peer summaries go to the anti-entropy neighbour.
pub(crate) const PEERS_EVERY: u64 = 6;
/// Neighbours an ownership change is pushed to at once.
pub(crate) const FANOUT: usize = 3;
/// Ticks before a space request is sent to another donor.
pub(crate) const SPACE_RETRY: u64 = 2;
/// A restarted node that has heard only other restarted nodes' rings allocates again
/// after this many ticks (a whole cluster restarting must not wait forever).
pub(crate) const GATE_TICKS: u64 = 6;
/// Ticks before an unfinished Paxos round is abandoned.
pub(crate) const PAXOS_TIMEOUT: u64 = 4;
/// Ticks (of 5 s) a tentative allocation waits for its confirmation by default: twice the
/// plugin's 60 s request timeout, so only a requester that gave up (or died) loses it.
pub const TENTATIVE_TICKS: u64 = 24;

#[derive(Clone, Debug)]
pub struct NodeConfig {
    pub name: PeerName,
    pub nickname: String,
    /// Random per process start; also seeds the node's random choices.
    pub uid: u64,
    pub control_port: u16,
    pub data_port: u16,
    pub range: Ipv4Net,
    /// How the range is first divided (`--ipalloc-init`).
    pub init: IpallocInit,
    /// Ticks a tentative allocation waits for its confirmation.
    pub tentative_ticks: u64,
    /// With `WEAVE_PASSWORD`: the secret data keys are drawn from (the data plane is then
    /// sealed); `None` sends plain VXLAN.
    pub data_key_seed: Option<super::datakeys::KeySeed>,
    /// Signs this node's ring records (tombstones it writes, its comebacks); its public
    /// half goes out in the Hello. Derived from the static key (`Signer::seed_from_static`).
    pub signer: crate::core::ipam::Signer,
}

/// Event counts for the report and metrics.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeCounters {
    /// Received rings that were malformed or could not be merged (connection closed).
    pub bad_gossip: u64,
    /// Whole rings sent (anti-entropy answers, pushes, Hello answers).
    pub rings_sent: u64,
    pub digests_sent: u64,
    pub paxos_rounds: u64,
    pub space_requests_sent: u64,
    pub donations_given: u64,
    /// Times this peer found itself removed and came back as a new incarnation.
    pub comebacks: u64,
    /// Hellos refused because the name is bound to another key (impersonation, or a node
    /// that lost its --db-dir), and gossiped keys that contradicted a binding.
    pub key_mismatches: u64,
    /// Gossiped peers ignored because the message or the peer list was over its bound.
    pub peers_over_bound: u64,
    /// Rings refused because they removed a peer known to be alive (see gossip).
    pub refused_tombstones: u64,
    /// Rings refused because a tombstone or comeback record in them was not signed by
    /// the peer whose word it is (a forgery, or a key this node knows to be wrong).
    pub forged_records: u64,
}

/// One control connection as the node sees it.
#[derive(Clone, Debug)]
pub(super) struct Conn {
    pub(super) remote: SocketAddr,
    pub(super) outbound: bool,
    /// The static key the peer proved it holds in the connection's handshake.
    pub(super) key: PublicKey,
    /// Set once the peer's Hello was accepted: its name and per-start uid.
    pub(super) peer: Option<(PeerName, u64)>,
    /// The tick at which a Digest on this connection was last answered with the ring.
    pub(super) digest_answered: Option<u64>,
    /// The peer's latest word (Hello, gossip) on whether it is in its restart gate.
    pub(super) peer_gated: bool,
}

pub struct Node {
    pub(super) cfg: NodeConfig,
    pub(super) ipam: Ipam,
    pub(super) conns: BTreeMap<ConnId, Conn>,
    pub(super) gossip: Gossip,
    pub(super) consensus: Consensus,
    pub(super) donation: Donation,
    pub(super) terminations: u64,
    pub(super) ticks: u64,
    pub(super) rng: SplitMix64,
    pub(super) counters: NodeCounters,
    /// Tentative allocations (container id -> tick at which they expire).
    pub(super) tentative: BTreeMap<String, u64>,
    pub(super) data_keys: Option<super::datakeys::DataKeys>,
    /// Bumped by every change of the persisted state ([`Node::touch`]).
    generation: u64,
    /// The newest generation the I/O layer acknowledged as durable.
    saved_generation: u64,
}

impl Node {
    /// `ipam` and `acceptor` may come from persisted state; if the ring already exists the
    /// node is ready at once (but allocates only once it has heard from a peer, if the
    /// ring names others). Call [`Node::start`] next.
    pub fn new(cfg: NodeConfig, mut ipam: Ipam, acceptor: Acceptor) -> Node {
        ipam.set_signer(cfg.signer.clone());
        let gated = ipam.ring().is_some_and(|r| {
            r.seeds.iter().any(|s| s != &cfg.name) || r.entries.iter().any(|e| e.owner != cfg.name)
        });
        let rng = SplitMix64::new(cfg.uid ^ 0x9e37_79b9_7f4a_7c15);
        let data_keys = cfg
            .data_key_seed
            .as_ref()
            .map(super::datakeys::DataKeys::new);
        Node {
            gossip: Gossip::new(gated),
            consensus: Consensus::new(acceptor),
            donation: Donation::default(),
            cfg,
            ipam,
            conns: BTreeMap::new(),
            terminations: 0,
            ticks: 0,
            rng,
            counters: NodeCounters::default(),
            tentative: BTreeMap::new(),
            data_keys,
            generation: 0,
            saved_generation: 0,
        }
    }

    pub fn config(&self) -> &NodeConfig {
        &self.cfg
    }

    pub fn ipam(&self) -> &Ipam {
        &self.ipam
    }

    pub fn acceptor(&self) -> &Acceptor {
        &self.consensus.acceptor
    }

    pub fn counters(&self) -> &NodeCounters {
        &self.counters
    }

    pub fn terminations(&self) -> u64 {
        self.terminations
    }

    /// True while a restarted node waits to hear a peer's ring before allocating.
    pub fn is_gated(&self) -> bool {
        self.gossip.gated
    }

    /// Whether allocation can proceed now (a ring exists and no restart gate).
    pub fn can_allocate(&self) -> bool {
        self.ipam.is_ready() && !self.gossip.gated
    }

    /// Everything that is persisted, as it is now.
    pub fn snapshot(&self) -> PersistedState {
        PersistedState::new(
            Some(self.cfg.name.clone()),
            self.ipam.state(),
            self.consensus.acceptor.clone(),
        )
        .with_nicknames(self.gossip.nicknames.clone())
        .with_keys(self.gossip.keys.clone())
        .with_sign_keys(self.gossip.sign_keys.clone())
        .with_tentative(self.tentative.keys().cloned().collect())
    }

    /// Restores tentative allocations (from [`PersistedState`]): each gets the full wait
    /// again, since the requester may still be waiting for this restarted node.
    pub fn remember_tentative(&mut self, ids: std::collections::BTreeSet<String>) {
        let expiry = self.ticks + self.cfg.tentative_ticks;
        self.tentative = ids
            .into_iter()
            .filter(|id| self.ipam.lookup(id).is_some())
            .map(|id| (id, expiry))
            .collect();
    }

    /// Restores the peers' key bindings (from [`PersistedState`]).
    pub fn remember_keys(&mut self, keys: BTreeMap<PeerName, PublicKey>) {
        self.gossip.keys = keys;
        self.gossip.keys.remove(&self.cfg.name);
    }

    /// The key `name` is bound to, if any.
    pub fn bound_key(&self, name: &PeerName) -> Option<PublicKey> {
        self.gossip.keys.get(name).copied()
    }

    /// Restores the peers' record-signing keys (from [`PersistedState`]).
    pub fn remember_sign_keys(&mut self, keys: BTreeMap<PeerName, SignKey>) {
        self.gossip.sign_keys = keys;
        self.gossip.sign_keys.remove(&self.cfg.name);
    }

    /// The record-signing key `name` is bound to, if any.
    pub fn bound_sign_key(&self, name: &PeerName) -> Option<SignKey> {
        self.gossip.sign_keys.get(name).copied()
    }

    /// Restores the nicknames of peers met before a restart (from [`PersistedState`]).
    pub fn remember_nicknames(&mut self, nicknames: BTreeMap<PeerName, String>) {
        self.gossip.nicknames = nicknames;
        self.gossip.nicknames.remove(&self.cfg.name);
    }

    /// The peers known under `nickname` (a Kubernetes Node name), newest knowledge first:
    /// connected ones, then the rest.
    pub fn peers_named(&self, nickname: &str) -> Vec<PeerName> {
        let mut v: Vec<PeerName> = self
            .gossip
            .nicknames
            .iter()
            .filter(|(_, n)| n.as_str() == nickname)
            .map(|(p, _)| p.clone())
            .collect();
        v.sort_by_key(|p| !self.is_reachable(p));
        v
    }

    /// Peers that own part of the ring (this node and removed peers excluded).
    pub fn ring_members(&self) -> Vec<PeerName> {
        let Some(ring) = self.ipam.ring() else {
            return Vec::new();
        };
        let mut v: Vec<PeerName> = ring
            .entries
            .iter()
            .map(|e| e.owner.clone())
            .filter(|o| o != &self.cfg.name && !ring.is_removed(o))
            .collect();
        v.sort();
        v.dedup();
        v
    }

    /// The nickname this node knows for `name` (empty if none).
    pub fn nickname(&self, name: &PeerName) -> String {
        self.nickname_of(name)
    }

    /// The I/O layer wrote the state of `generation` durably.
    pub fn saved(&mut self, generation: u64) {
        self.saved_generation = self.saved_generation.max(generation.min(self.generation));
    }

    /// Whether some change of the persisted state is not yet acknowledged as saved.
    pub fn has_unsaved_state(&self) -> bool {
        self.generation > self.saved_generation
    }

    /// Records that the persisted state changed: the effects of this event will carry a
    /// save, and what depends on it waits for that save.
    pub(super) fn touch(&mut self) {
        self.generation += 1;
    }

    /// Turns one event's actions into effects, with the save if anything is unsaved.
    pub(super) fn finish(&self, out: Outbox) -> Effects {
        let save = self.has_unsaved_state().then(|| Save {
            generation: self.generation,
            state: self.snapshot(),
        });
        out.finish(save)
    }

    pub(super) fn next_rand(&mut self) -> u64 {
        self.rng.next_u64()
    }

    /// Effects due at start-up: a seed list or a lone consensus node seeds at once.
    pub fn start(&mut self) -> Effects {
        let mut out = Outbox::default();
        if self.ipam.is_ready() {
            out.push(Action::RoutesChanged);
            out.push(Action::Ready);
            return self.finish(out);
        }
        if let IpallocInit::Seed(seeds) = self.cfg.init.clone() {
            match self.ipam.seed_any(&seeds) {
                Ok(_) => {
                    out.info(format!(
                        "IP range {} seeded with {} peers (ipalloc-init {})",
                        self.cfg.range,
                        seeds.len(),
                        self.cfg.init
                    ));
                    self.touch();
                    out.push(Action::RoutesChanged);
                    out.push(Action::Ready);
                }
                Err(e) => out.warn(format!("cannot seed IP ring: {e}")),
            }
        }
        self.maybe_propose(&mut out);
        self.finish(out)
    }

    /// A connection finished its secure handshake: the peer holds the private half of
    /// `key`. The node sends its Hello and expects the peer's.
    pub fn on_connected(
        &mut self,
        id: ConnId,
        remote: SocketAddr,
        outbound: bool,
        key: PublicKey,
    ) -> Effects {
        self.conns.insert(
            id,
            Conn {
                remote,
                outbound,
                key,
                peer: None,
                digest_answered: None,
                peer_gated: false,
            },
        );
        let mut out = Outbox::default();
        out.send(id, self.hello());
        self.finish(out)
    }

    pub fn on_message(&mut self, id: ConnId, msg: Message) -> Effects {
        let mut out = Outbox::default();
        self.dispatch(id, msg, &mut out);
        self.finish(out)
    }

    fn dispatch(&mut self, id: ConnId, msg: Message, out: &mut Outbox) {
        let Some(conn) = self.conns.get(&id).cloned() else {
            return;
        };
        let from = match (&msg, &conn.peer) {
            (Message::Hello(h), None) => return self.on_hello(id, &conn, h.clone(), out),
            (Message::Hello(_), Some(_)) => {
                return out.close(id, "protocol error: second Hello on one connection")
            }
            (_, None) => return out.close(id, "protocol error: message before Hello"),
            (_, Some((from, _))) => from.clone(),
        };
        match msg {
            Message::Hello(_) => {}
            Message::Heartbeat { probe, .. } => {
                if let Some(n) = probe {
                    out.send(
                        id,
                        Message::Heartbeat {
                            probe: None,
                            echo: Some(n),
                        },
                    );
                }
            }
            Message::Gossip {
                peers,
                ring,
                gated,
                answer,
            } => {
                if let Some(c) = self.conns.get_mut(&id) {
                    c.peer_gated = gated;
                }
                self.on_gossip(id, &from, peers, ring, RingFlags { gated, answer }, out)
            }
            Message::Digest { ring } => self.on_digest(id, ring, out),
            Message::SpaceRequest {
                subnet,
                incarnation,
                signed,
            } => self.on_space_request(id, &from, incarnation, signed, subnet, out),
            Message::Prepare { ballot } => self.on_prepare(id, ballot, out),
            Message::Promise { ballot, accepted } => self.on_promise(from, ballot, accepted, out),
            Message::Accept { ballot, value } => self.on_accept(id, ballot, value, out),
            Message::Accepted { ballot } => self.on_accepted(from, ballot, out),
            Message::Nack { ballot, promised } => self.on_nack(ballot, promised),
            Message::DataKey { id: key_id, key } => self.on_data_key(id, &from, key_id, &key, out),
            Message::DataKeyAck { id: key_id } => self.on_data_key_ack(&from, key_id, out),
        }
    }

    pub fn on_closed(&mut self, id: ConnId, reason: &str) -> Effects {
        let mut out = Outbox::default();
        if let Some(conn) = self.conns.remove(&id) {
            if let Some((name, _)) = conn.peer {
                self.terminations += 1;
                let nick = self.nickname_of(&name);
                out.info(format!(
                    "connection to {name}({nick}) at {} closed: {reason}",
                    conn.remote
                ));
                // The peer stays known: its address still routes data, since the data
                // plane does not depend on the control connection.
                self.announce_links(None, &mut out);
            }
        }
        self.finish(out)
    }

    /// Called periodically by the I/O layer (every few seconds).
    pub fn on_tick(&mut self) -> Effects {
        self.ticks += 1;
        let mut out = Outbox::default();
        self.gossip_tick(&mut out);
        self.expire_tentative(&mut out);
        self.data_keys_tick(&mut out);
        self.maybe_propose(&mut out);
        self.retry_space(&mut out);
        self.finish(out)
    }

    // ---- what the submodules share ----

    pub(super) fn established_ids(&self) -> Vec<ConnId> {
        self.conns
            .iter()
            .filter(|(_, c)| c.peer.is_some())
            .map(|(id, _)| *id)
            .collect()
    }

    /// Established peers with their latest word on being in their restart gate.
    pub(super) fn established_gated(&self) -> Vec<(PeerName, bool)> {
        self.conns
            .values()
            .filter_map(|c| c.peer.as_ref().map(|p| (p.0.clone(), c.peer_gated)))
            .collect()
    }

    pub(super) fn established_peers(&self) -> Vec<PeerName> {
        self.conns
            .values()
            .filter_map(|c| c.peer.as_ref().map(|p| p.0.clone()))
            .collect()
    }

    /// The established connection to `name`, if any.
    pub(super) fn conn_to(&self, name: &PeerName) -> Option<ConnId> {
        self.conns
            .iter()
            .find(|(_, c)| c.peer.as_ref().map(|p| &p.0) == Some(name))
            .map(|(id, _)| *id)
    }

    pub(super) fn nickname_of(&self, name: &PeerName) -> String {
        if name == &self.cfg.name {
            return self.cfg.nickname.clone();
        }
        self.gossip
            .peers
            .get(name)
            .map(|k| k.nickname.clone())
            .or_else(|| self.gossip.nicknames.get(name).cloned())
            .unwrap_or_default()
    }

    /// Whether an established connection leads to a peer at this underlay address.
    pub(crate) fn is_connected_to_ip(&self, ip: Ipv4Addr) -> bool {
        self.conns.values().any(|c| {
            c.peer.is_some()
                && match c.remote {
                    SocketAddr::V4(a) => *a.ip() == ip,
                    SocketAddr::V6(a) => a.ip().to_ipv4_mapped() == Some(ip),
                }
        })
    }

    pub fn is_established(&self, id: ConnId) -> bool {
        self.conns.get(&id).is_some_and(|c| c.peer.is_some())
    }

    pub fn is_reachable(&self, name: &PeerName) -> bool {
        name == &self.cfg.name || self.established_peers().contains(name)
    }
}
