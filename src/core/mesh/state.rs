//! The node's control state machine: connections, peers, gossip and IPAM, driven by
//! events (connection up, message in, connection closed, tick, local IPAM call) and
//! answering with outputs for the I/O layer to carry out. No sockets, no clock: time is
//! the tick count, randomness a generator seeded from the configuration.
//!
//! Gossip, linear per peer in the cluster size:
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

use crate::api::report::{
    ConnectionReport, IpamReport, OwnedReport, PeerConnectionReport, PeerReport, RingEntryReport,
};
use crate::core::ipam::paxos::{Accepted, Ballot, Phase, Proposal, Step};
use crate::core::ipam::{IpallocInit, Ipam, IpamError, ReclaimOutcome, Ring};
use crate::core::mesh::message::{Hello, Message, PeerSummary, PROTOCOL, PROTOCOL_VERSION};
use crate::core::mesh::PeerName;
use ipnet::Ipv4Net;
use std::collections::{BTreeMap, BTreeSet};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};

pub type ConnId = u64;

/// Every `PEERS_EVERY` ticks the peer summaries go to the anti-entropy neighbour.
pub const PEERS_EVERY: u64 = 6;
/// Neighbours an ownership change is pushed to at once.
pub const FANOUT: usize = 3;
/// Ticks before a space request is sent to another donor.
pub const SPACE_RETRY: u64 = 2;
/// A restarted node that has heard only other restarted nodes' rings allocates again
/// after this many ticks (a whole cluster restarting must not wait forever).
pub const GATE_TICKS: u64 = 6;
/// Ticks before an unfinished Paxos round is abandoned.
pub const PAXOS_TIMEOUT: u64 = 4;

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
}

#[derive(Clone, Debug, PartialEq)]
pub enum Output {
    Send(ConnId, Message),
    Close(ConnId, String),
    /// A peer learned through gossip that this node is not connected to: dial it.
    Connect(SocketAddrV4),
    /// The connection turned out to lead back to this very process (a PEER argument that
    /// names this node): stop dialling that target.
    ConnectedToSelf(ConnId),
    /// IPAM state changed: write it to stable storage before acknowledging anything.
    Persist,
    /// Ring or peer addresses changed: rebuild the data plane's route table.
    RoutesChanged,
    /// IPAM became ready (a ring exists), or space this node waited for arrived: retry
    /// waiting allocations.
    Ready,
    /// Something an operator must see in the log.
    Warn(String),
    Info(String),
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
}

#[derive(Clone, Debug)]
struct Conn {
    remote: SocketAddr,
    outbound: bool,
    /// Set once the peer's Hello was accepted.
    peer: Option<(PeerName, u64)>,
}

#[derive(Clone, Debug)]
struct KnownPeer {
    nickname: String,
    uid: u64,
    address: Option<Ipv4Addr>,
    control_port: u16,
    data_port: u16,
    /// The peers it is connected to, as it last told us (first-hand only).
    connections: Vec<PeerName>,
}

/// What a received ring's sender said about it (see `Message::Gossip`).
#[derive(Clone, Copy, Debug)]
struct RingFlags {
    gated: bool,
    answer: bool,
}

/// A space request in flight.
#[derive(Clone, Debug)]
struct Want {
    subnet: Ipv4Net,
    asked: Option<PeerName>,
    at: u64,
    tried: BTreeSet<PeerName>,
}

pub struct Node {
    cfg: NodeConfig,
    ipam: Ipam,
    conns: BTreeMap<ConnId, Conn>,
    peers: BTreeMap<PeerName, KnownPeer>,
    /// Targets that turned out to be this node: they do not count towards consensus.
    self_targets: usize,
    dialled: BTreeSet<SocketAddrV4>,
    ring_error: Option<String>,
    terminations: u64,
    ticks: u64,
    rng: u64,
    /// Restored with a ring naming other peers: no fresh allocation until a peer has
    /// told us its ring, in case this peer was removed while it was down.
    gated: bool,
    /// Tick at which a gated node first merged a (gated) peer's ring.
    gate_heard: Option<u64>,
    proposal: Option<Proposal>,
    next_proposal: u64,
    proposal_attempts: u64,
    max_round: u64,
    /// Tick since which a quorum is connected, and of the last Prepare/Accept heard from
    /// another proposer: higher-named peers wait longer before proposing, so that one
    /// proposer usually runs alone instead of all of them duelling.
    eligible_since: Option<u64>,
    last_foreign: u64,
    want: Option<Want>,
    counters: NodeCounters,
}

impl Node {
    /// `ipam` may come from persisted state; if it already has a ring the node is ready at
    /// once (but allocates only once it has heard from a peer, if the ring names others).
    /// Call [`Node::start`] next.
    pub fn new(cfg: NodeConfig, ipam: Ipam) -> Node {
        let gated = ipam.ring().is_some_and(|r| {
            r.seeds.iter().any(|s| s != &cfg.name) || r.entries.iter().any(|e| e.owner != cfg.name)
        });
        let rng = cfg.uid ^ 0x9e37_79b9_7f4a_7c15;
        let max_round = ipam.acceptor().max_round();
        Node {
            cfg,
            ipam,
            conns: BTreeMap::new(),
            peers: BTreeMap::new(),
            self_targets: 0,
            dialled: BTreeSet::new(),
            ring_error: None,
            terminations: 0,
            ticks: 0,
            rng,
            gated,
            gate_heard: None,
            proposal: None,
            next_proposal: 0,
            proposal_attempts: 0,
            max_round,
            eligible_since: None,
            last_foreign: 0,
            want: None,
            counters: NodeCounters::default(),
        }
    }

    pub fn config(&self) -> &NodeConfig {
        &self.cfg
    }

    pub fn ipam(&self) -> &Ipam {
        &self.ipam
    }

    pub fn counters(&self) -> &NodeCounters {
        &self.counters
    }

    pub fn ticks(&self) -> u64 {
        self.ticks
    }

    /// True while a restarted node waits to hear a peer's ring before allocating.
    pub fn is_gated(&self) -> bool {
        self.gated
    }

    /// Whether allocation can proceed now (a ring exists and no restart gate).
    pub fn can_allocate(&self) -> bool {
        self.ipam.is_ready() && !self.gated
    }

    /// splitmix64: deterministic for a given `uid`.
    fn next_rand(&mut self) -> u64 {
        self.rng = self.rng.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.rng;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Outputs due at start-up: a seed list or a lone consensus node seeds at once.
    pub fn start(&mut self) -> Vec<Output> {
        let mut out = Vec::new();
        if self.ipam.is_ready() {
            out.push(Output::RoutesChanged);
            out.push(Output::Ready);
            return out;
        }
        if let IpallocInit::Seed(seeds) = self.cfg.init.clone() {
            match self.ipam.seed_any(&seeds) {
                Ok(_) => {
                    out.push(Output::Info(format!(
                        "IP range {} seeded with {} peers (ipalloc-init {})",
                        self.cfg.range,
                        seeds.len(),
                        self.cfg.init
                    )));
                    out.push(Output::Persist);
                    out.push(Output::RoutesChanged);
                    out.push(Output::Ready);
                }
                Err(e) => out.push(Output::Warn(format!("cannot seed IP ring: {e}"))),
            }
        }
        self.maybe_propose(&mut out);
        out
    }

    fn hello(&self) -> Message {
        Message::Hello(Hello {
            protocol: PROTOCOL.to_string(),
            version: PROTOCOL_VERSION,
            name: self.cfg.name.clone(),
            nickname: self.cfg.nickname.clone(),
            uid: self.cfg.uid,
            control_port: self.cfg.control_port,
            data_port: self.cfg.data_port,
            range: self.cfg.range.to_string(),
            digest: self.ipam.ring_digest(),
            gated: self.gated,
        })
    }

    pub fn on_connected(&mut self, id: ConnId, remote: SocketAddr, outbound: bool) -> Vec<Output> {
        self.conns.insert(
            id,
            Conn {
                remote,
                outbound,
                peer: None,
            },
        );
        vec![Output::Send(id, self.hello())]
    }

    pub fn on_message(&mut self, id: ConnId, msg: Message) -> Vec<Output> {
        let mut out = Vec::new();
        let Some(conn) = self.conns.get(&id).cloned() else {
            return out;
        };
        let from = match (&msg, &conn.peer) {
            (Message::Hello(_), None) => None,
            (Message::Hello(_), Some(_)) => {
                self.close(
                    id,
                    "protocol error: second Hello on one connection",
                    &mut out,
                );
                return out;
            }
            (_, None) => {
                self.close(id, "protocol error: message before Hello", &mut out);
                return out;
            }
            (_, Some((from, _))) => Some(from.clone()),
        };
        match (msg, from) {
            (Message::Hello(h), _) => self.on_hello(id, &conn, h, &mut out),
            (_, None) => {}
            (Message::Heartbeat, Some(_)) => {}
            (
                Message::Gossip {
                    peers,
                    ring,
                    gated,
                    answer,
                },
                Some(from),
            ) => self.on_gossip(
                id,
                &from,
                peers,
                ring,
                RingFlags { gated, answer },
                &mut out,
            ),
            (Message::Digest { ring }, Some(_)) => {
                let mine = self.ipam.ring_digest();
                if ring != mine {
                    if mine.is_some() {
                        self.send_ring_as(id, true, &mut out);
                    } else {
                        out.push(Output::Send(id, Message::Digest { ring: None }));
                    }
                }
            }
            (
                Message::SpaceRequest {
                    subnet,
                    incarnation,
                },
                Some(from),
            ) => self.on_space_request(id, &from, incarnation, subnet, &mut out),
            (Message::Prepare { ballot }, Some(_)) => self.on_prepare(id, ballot, &mut out),
            (Message::Promise { ballot, accepted }, Some(from)) => {
                self.on_promise(from, ballot, accepted, &mut out)
            }
            (Message::Accept { ballot, value }, Some(_)) => {
                self.on_accept(id, ballot, value, &mut out)
            }
            (Message::Accepted { ballot }, Some(from)) => self.on_accepted(from, ballot, &mut out),
            (Message::Nack { ballot, promised }, Some(_)) => {
                self.max_round = self.max_round.max(promised.round);
                if self.proposal.as_ref().is_some_and(|p| p.ballot == ballot) {
                    self.abandon_proposal();
                }
            }
        }
        out
    }

    pub fn on_closed(&mut self, id: ConnId, reason: &str) -> Vec<Output> {
        let mut out = Vec::new();
        if let Some(conn) = self.conns.remove(&id) {
            if let Some((name, _)) = conn.peer {
                self.terminations += 1;
                let nick = self.nickname_of(&name);
                out.push(Output::Info(format!(
                    "connection to {name}({nick}) at {} closed: {reason}",
                    conn.remote
                )));
                // The peer stays known: its address still routes data, since the data
                // plane does not depend on the control connection.
            }
        }
        out
    }

    /// Called periodically by the I/O layer (every few seconds).
    pub fn on_tick(&mut self) -> Vec<Output> {
        self.ticks += 1;
        let mut out = Vec::new();
        let ids = self.established_ids();
        let target = if ids.is_empty() {
            None
        } else {
            Some(ids[(self.next_rand() % ids.len() as u64) as usize])
        };
        for &id in &ids {
            if Some(id) != target {
                out.push(Output::Send(id, Message::Heartbeat));
            }
        }
        if let Some(t) = target {
            self.counters.digests_sent += 1;
            out.push(Output::Send(
                t,
                Message::Digest {
                    ring: self.ipam.ring_digest(),
                },
            ));
            if self.ticks.is_multiple_of(PEERS_EVERY) {
                out.push(Output::Send(
                    t,
                    Message::Gossip {
                        peers: self.summaries(),
                        ring: None,
                        gated: self.gated,

                        answer: false,
                    },
                ));
            }
        }
        if self.gated
            && self
                .gate_heard
                .is_some_and(|t| self.ticks >= t + GATE_TICKS)
        {
            self.open_gate(&mut out);
        }
        self.maybe_propose(&mut out);
        self.retry_space(&mut out);
        out
    }

    fn close(&mut self, id: ConnId, why: &str, out: &mut Vec<Output>) {
        out.push(Output::Close(id, why.to_string()));
    }

    fn on_hello(&mut self, id: ConnId, conn: &Conn, h: Hello, out: &mut Vec<Output>) {
        if h.protocol != PROTOCOL || h.version != PROTOCOL_VERSION {
            let why = format!(
                "peer at {} speaks {} v{}, this node speaks {PROTOCOL} v{PROTOCOL_VERSION}",
                conn.remote, h.protocol, h.version
            );
            out.push(Output::Warn(why.clone()));
            return self.close(id, &why, out);
        }
        if h.range != self.cfg.range.to_string() {
            let why = format!(
                "peer {}({}) at {} uses IP range {}, this node uses {}: IPALLOC_RANGE must be the same on every node",
                h.name, h.nickname, conn.remote, h.range, self.cfg.range
            );
            out.push(Output::Warn(why.clone()));
            return self.close(id, &why, out);
        }
        if h.name == self.cfg.name {
            if h.uid == self.cfg.uid {
                out.push(Output::ConnectedToSelf(id));
                return self.close(id, "connection to self", out);
            }
            let why = format!(
                "refusing peer at {}: it presents this node's own name {} (nickname {}); two nodes must never share a name (cloned /etc/machine-id?): give one of them a different --name",
                conn.remote, h.name, h.nickname
            );
            out.push(Output::Warn(why.clone()));
            return self.close(id, &why, out);
        }
        if let Some((&other_id, other)) = self
            .conns
            .iter()
            .find(|(cid, c)| **cid != id && c.peer.as_ref().map(|p| &p.0) == Some(&h.name))
        {
            let other_uid = other.peer.as_ref().map(|p| p.1).unwrap_or_default();
            if other_uid == h.uid {
                // Both sides dialled each other. Keep, on both sides, the connection
                // initiated by the peer with the lower name.
                let initiator = |c: &Conn| if c.outbound { &self.cfg.name } else { &h.name };
                if initiator(conn) < initiator(other) {
                    out.push(Output::Close(other_id, "duplicate connection".into()));
                    self.conns.remove(&other_id);
                } else {
                    return self.close(id, "duplicate connection", out);
                }
            } else if other.remote.ip() == conn.remote.ip() {
                out.push(Output::Info(format!(
                    "peer {}({}) at {} restarted",
                    h.name, h.nickname, conn.remote
                )));
                out.push(Output::Close(other_id, "peer restarted".into()));
                self.conns.remove(&other_id);
                self.terminations += 1;
            } else {
                let why = format!(
                    "refusing peer {}({}) at {}: that name is already used by the peer at {}; two nodes must never share a name (cloned /etc/machine-id?): give one of them a different --name",
                    h.name,
                    h.nickname,
                    conn.remote.ip(),
                    other.remote.ip()
                );
                out.push(Output::Warn(why.clone()));
                return self.close(id, &why, out);
            }
        }
        if let Some(c) = self.conns.get_mut(&id) {
            c.peer = Some((h.name.clone(), h.uid));
        }
        let address = match conn.remote {
            SocketAddr::V4(a) => Some(*a.ip()),
            SocketAddr::V6(a) => a.ip().to_ipv4_mapped(),
        };
        self.peers.insert(
            h.name.clone(),
            KnownPeer {
                nickname: h.nickname.clone(),
                uid: h.uid,
                address,
                control_port: h.control_port,
                data_port: h.data_port,
                connections: Vec::new(),
            },
        );
        if let Some(a) = address {
            self.dialled.insert(SocketAddrV4::new(a, h.control_port));
        }
        out.push(Output::Info(format!(
            "connection established with {}({}) at {}",
            h.name, h.nickname, conn.remote
        )));
        out.push(Output::RoutesChanged);
        // The new neighbour learns whom we know at once, and our ring if it differs.
        out.push(Output::Send(
            id,
            Message::Gossip {
                peers: self.summaries(),
                ring: None,
                gated: self.gated,

                answer: false,
            },
        ));
        let mine = self.ipam.ring_digest();
        if h.digest != mine {
            if mine.is_some() {
                self.send_ring(id, out);
            }
        } else if mine.is_some() && !h.gated {
            self.open_gate(out);
        }
        // A proposal in flight may have gone out on a connection that was then closed as
        // the duplicate of this one: repeat its current phase here rather than wait for
        // the round to time out. Acceptors and the proposer treat repeats idempotently.
        if let Some(p) = &self.proposal {
            let msg = match &p.phase {
                Phase::Preparing => Some(Message::Prepare {
                    ballot: p.ballot.clone(),
                }),
                Phase::Accepting(value) => Some(Message::Accept {
                    ballot: p.ballot.clone(),
                    value: value.clone(),
                }),
                Phase::Decided(_) => None,
            };
            if let Some(m) = msg {
                out.push(Output::Send(id, m));
            }
        }
        self.maybe_propose(out);
    }

    fn send_ring(&mut self, id: ConnId, out: &mut Vec<Output>) {
        self.send_ring_as(id, false, out)
    }

    fn send_ring_as(&mut self, id: ConnId, answer: bool, out: &mut Vec<Output>) {
        if let Some(ring) = self.ipam.ring() {
            self.counters.rings_sent += 1;
            out.push(Output::Send(
                id,
                Message::Gossip {
                    peers: Vec::new(),
                    ring: Some(ring.clone()),
                    gated: self.gated,
                    answer,
                },
            ));
        }
    }

    /// Pushes the ring to `FANOUT` random neighbours (ownership changed here).
    fn push_ring(&mut self, out: &mut Vec<Output>, also: Option<ConnId>) {
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

    fn open_gate(&mut self, out: &mut Vec<Output>) {
        if self.gated {
            self.gated = false;
            out.push(Output::Info(
                "heard the ring from a peer after restart: allocating again".into(),
            ));
            out.push(Output::Ready);
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
        out: &mut Vec<Output>,
    ) -> bool {
        let RingFlags {
            gated: from_gated,
            answer,
        } = flags;
        let was_ready = self.ipam.is_ready();
        match self.ipam.merge_ring(ring) {
            Ok(o) => {
                if let Some((inc, dropped)) = &o.revived {
                    self.counters.comebacks += 1;
                    out.push(Output::Warn(format!(
                        "this peer ({}) was removed from the ring (rmpeer) while it was away: \
                         dropped {} stale allocations and rejoined as incarnation {inc}",
                        self.cfg.name,
                        dropped.len()
                    )));
                }
                if o.adopted > 0 {
                    out.push(Output::Info(format!(
                        "inherited {} addresses of removed peers",
                        o.adopted
                    )));
                }
                for c in &o.reclaim.conflicts {
                    out.push(Output::Warn(c.clone()));
                }
                if o.changed {
                    out.push(Output::Persist);
                    out.push(Output::RoutesChanged);
                    if !was_ready {
                        out.push(Output::Ready);
                    }
                    if self.ring_error.is_some() {
                        self.ring_error = None;
                    }
                }
                if !was_ready {
                    self.proposal = None;
                }
                if !from_gated {
                    self.open_gate(out);
                } else if self.gated {
                    self.gate_heard.get_or_insert(self.ticks);
                }
                if o.revived.is_some() || o.adopted > 0 {
                    self.push_ring(out, None);
                }
                // Push-pull: if the sender lacks something we have, tell it.
                if answer && self.ipam.ring() != Some(ring) {
                    self.send_ring(id, out);
                }
                self.check_want(out);
                true
            }
            Err(e) => {
                self.counters.bad_gossip += 1;
                let why = format!("cannot merge IP ring from {from}: {e}");
                self.ring_error = Some(why.clone());
                out.push(Output::Warn(why.clone()));
                self.close(id, &why, out);
                false
            }
        }
    }

    fn on_gossip(
        &mut self,
        id: ConnId,
        from: &PeerName,
        peers: Vec<PeerSummary>,
        ring: Option<Ring>,
        flags: RingFlags,
        out: &mut Vec<Output>,
    ) {
        if let Some(ring) = ring {
            if !self.merge_ring(id, &ring, from, flags, out) {
                return;
            }
        }
        if peers.is_empty() {
            return;
        }
        let direct: BTreeSet<PeerName> = self.established_peers().into_iter().collect();
        for p in peers {
            if p.name == self.cfg.name {
                continue;
            }
            if &p.name == from {
                if let Some(k) = self.peers.get_mut(from) {
                    k.connections = p.connections.clone();
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
            let changed = match self.peers.get(&p.name) {
                None => true,
                Some(k) => k.uid != p.uid || k.address != p.address || k.data_port != p.data_port,
            };
            if changed {
                self.peers.insert(
                    p.name.clone(),
                    KnownPeer {
                        nickname: p.nickname.clone(),
                        uid: p.uid,
                        address: p.address,
                        control_port: p.control_port,
                        data_port: p.data_port,
                        connections: Vec::new(),
                    },
                );
                out.push(Output::RoutesChanged);
            }
            if let Some(a) = p.address {
                let target = SocketAddrV4::new(a, p.control_port);
                if self.dialled.insert(target) {
                    out.push(Output::Connect(target));
                }
            }
        }
    }

    /// The I/O layer dials these targets itself (the PEER arguments); remembering them
    /// avoids asking for a second dialler when gossip names the same address.
    pub fn note_target(&mut self, target: SocketAddrV4) {
        self.dialled.insert(target);
    }

    // ---- consensus ----

    /// Acceptors needed: a majority of `consensus=N` (PEER targets that turned out to be
    /// this node do not count towards N).
    fn quorum(&self) -> usize {
        match self.cfg.init {
            IpallocInit::Consensus(n) => n.saturating_sub(self.self_targets).max(1) / 2 + 1,
            _ => 1,
        }
    }

    fn is_acceptor(&self) -> bool {
        matches!(self.cfg.init, IpallocInit::Consensus(_))
    }

    fn maybe_propose(&mut self, out: &mut Vec<Output>) {
        if self.ipam.is_ready() || !self.is_acceptor() {
            return;
        }
        if let Some(p) = &self.proposal {
            if self.ticks < p.started + PAXOS_TIMEOUT {
                return;
            }
            self.abandon_proposal();
        }
        let mut members = self.established_peers();
        if members.len() + 1 < self.quorum() {
            self.eligible_since = None;
            return;
        }
        let since = *self.eligible_since.get_or_insert(self.ticks);
        let rank = members.iter().filter(|p| **p < self.cfg.name).count() as u64;
        if rank > 0 && self.ticks < since.max(self.last_foreign) + rank * PAXOS_TIMEOUT {
            return;
        }
        if self.ticks < self.next_proposal {
            return;
        }
        members.push(self.cfg.name.clone());
        self.max_round = self.max_round.max(self.ipam.acceptor().max_round()) + 1;
        let ballot = Ballot {
            round: self.max_round,
            proposer: self.cfg.name.clone(),
        };
        self.counters.paxos_rounds += 1;
        self.proposal = Some(Proposal::new(
            ballot.clone(),
            self.quorum(),
            members,
            self.ticks,
        ));
        out.push(Output::Info(format!(
            "proposing the initial IP ring members (round {}, quorum {})",
            ballot.round,
            self.quorum()
        )));
        for id in self.established_ids() {
            out.push(Output::Send(
                id,
                Message::Prepare {
                    ballot: ballot.clone(),
                },
            ));
        }
        // This node is an acceptor too.
        let (r, changed) = self.ipam.acceptor_mut().prepare(&ballot);
        if changed {
            out.push(Output::Persist);
        }
        if let Ok(acc) = r {
            let me = self.cfg.name.clone();
            self.on_promise(me, ballot, acc, out);
        }
    }

    fn abandon_proposal(&mut self) {
        self.proposal = None;
        self.proposal_attempts += 1;
        // Deterministic per-peer backoff of 1 to 3 ticks breaks duelling proposers.
        let jitter = 1 + self.next_rand() % 3;
        self.next_proposal = self.ticks + jitter;
    }

    fn on_prepare(&mut self, id: ConnId, ballot: Ballot, out: &mut Vec<Output>) {
        self.max_round = self.max_round.max(ballot.round);
        self.last_foreign = self.ticks;
        if self.ipam.is_ready() {
            // Already decided: the ring is the answer.
            return self.send_ring(id, out);
        }
        if !self.is_acceptor() {
            return;
        }
        let (r, changed) = self.ipam.acceptor_mut().prepare(&ballot);
        if changed {
            out.push(Output::Persist);
        }
        let msg = match r {
            Ok(accepted) => Message::Promise { ballot, accepted },
            Err(promised) => Message::Nack { ballot, promised },
        };
        out.push(Output::Send(id, msg));
    }

    fn on_promise(
        &mut self,
        from: PeerName,
        ballot: Ballot,
        accepted: Option<Accepted>,
        out: &mut Vec<Output>,
    ) {
        let Some(p) = self.proposal.as_mut().filter(|p| p.ballot == ballot) else {
            return;
        };
        if let Step::SendAccept(value) = p.on_promise(from, accepted) {
            let promisers: Vec<PeerName> = p.promises.keys().cloned().collect();
            for id in self.established_ids() {
                let to = self
                    .conns
                    .get(&id)
                    .and_then(|c| c.peer.as_ref())
                    .map(|p| &p.0);
                if to.is_some_and(|n| promisers.contains(n)) {
                    out.push(Output::Send(
                        id,
                        Message::Accept {
                            ballot: ballot.clone(),
                            value: value.clone(),
                        },
                    ));
                }
            }
            let (r, changed) = self.ipam.acceptor_mut().accept(&ballot, &value);
            if changed {
                out.push(Output::Persist);
            }
            if r.is_ok() {
                let me = self.cfg.name.clone();
                self.on_accepted(me, ballot, out);
            }
        }
    }

    fn on_accept(
        &mut self,
        id: ConnId,
        ballot: Ballot,
        value: Vec<PeerName>,
        out: &mut Vec<Output>,
    ) {
        self.max_round = self.max_round.max(ballot.round);
        self.last_foreign = self.ticks;
        if self.ipam.is_ready() {
            return self.send_ring(id, out);
        }
        if !self.is_acceptor() {
            return;
        }
        let (r, changed) = self.ipam.acceptor_mut().accept(&ballot, &value);
        if changed {
            out.push(Output::Persist);
        }
        let msg = match r {
            Ok(()) => Message::Accepted { ballot },
            Err(promised) => Message::Nack { ballot, promised },
        };
        out.push(Output::Send(id, msg));
    }

    fn on_accepted(&mut self, from: PeerName, ballot: Ballot, out: &mut Vec<Output>) {
        let Some(p) = self.proposal.as_mut().filter(|p| p.ballot == ballot) else {
            return;
        };
        if let Step::Decided(value) = p.on_accepted(from) {
            self.proposal = None;
            if self.ipam.is_ready() {
                return;
            }
            match self.ipam.seed_any(&value) {
                Ok(_) => {
                    let names: Vec<&str> = value.iter().map(PeerName::as_str).collect();
                    out.push(Output::Info(format!(
                        "consensus reached: IP range {} split among [{}]",
                        self.cfg.range,
                        names.join(" ")
                    )));
                    out.push(Output::Persist);
                    out.push(Output::RoutesChanged);
                    out.push(Output::Ready);
                    // The decision goes to every neighbour once.
                    for id in self.established_ids() {
                        self.send_ring(id, out);
                    }
                }
                Err(e) => out.push(Output::Warn(format!("cannot seed IP ring: {e}"))),
            }
        }
    }

    /// A target turned out to be this node: it no longer counts towards consensus.
    pub fn target_is_self(&mut self) -> Vec<Output> {
        self.self_targets += 1;
        let mut out = Vec::new();
        self.maybe_propose(&mut out);
        out
    }

    // ---- space on demand ----

    /// Asks the connected peer with the most free space in the wanted subnet (skipping
    /// those already tried, until all were) to donate some.
    fn ask_space(&mut self, out: &mut Vec<Output>) {
        let Some(want) = &self.want else {
            return;
        };
        let Some(ring) = self.ipam.ring() else {
            return;
        };
        let window = self.ipam.window(want.subnet);
        let free = ring.free_by_owner(window);
        let connected: BTreeMap<PeerName, ConnId> = self
            .conns
            .iter()
            .filter_map(|(&id, c)| c.peer.as_ref().map(|p| (p.0.clone(), id)))
            .collect();
        let pick = |tried: &BTreeSet<PeerName>| {
            free.iter()
                .filter(|(o, f)| **f > 0 && connected.contains_key(**o) && !tried.contains(**o))
                .max_by(|a, b| a.1.cmp(b.1).then_with(|| b.0.cmp(a.0)))
                .map(|(o, _)| (*o).clone())
        };
        let mut donor = pick(&want.tried);
        if donor.is_none() && !want.tried.is_empty() {
            donor = pick(&BTreeSet::new());
            if let Some(w) = self.want.as_mut() {
                w.tried.clear();
            }
        }
        let Some(want) = self.want.as_mut() else {
            return;
        };
        want.at = self.ticks;
        want.asked = donor.clone();
        let Some(donor) = donor else {
            return;
        };
        want.tried.insert(donor.clone());
        let subnet = (want.subnet != self.cfg.range).then_some(want.subnet);
        self.counters.space_requests_sent += 1;
        out.push(Output::Send(
            connected[&donor],
            Message::SpaceRequest {
                subnet,
                incarnation: self.ipam.incarnation(),
            },
        ));
    }

    fn retry_space(&mut self, out: &mut Vec<Output>) {
        if self
            .want
            .as_ref()
            .is_some_and(|w| self.ticks >= w.at + SPACE_RETRY)
        {
            self.ask_space(out);
        }
    }

    /// Space arrived for a waiting allocation: wake the waiters.
    fn check_want(&mut self, out: &mut Vec<Output>) {
        let Some(want) = &self.want else {
            return;
        };
        let Some(ring) = self.ipam.ring() else {
            return;
        };
        let window = self.ipam.window(want.subnet);
        let mine = ring
            .free_by_owner(window)
            .get(&self.cfg.name)
            .copied()
            .unwrap_or(0);
        if mine > 0 {
            self.want = None;
            out.push(Output::Ready);
        }
    }

    fn on_space_request(
        &mut self,
        id: ConnId,
        from: &PeerName,
        incarnation: u32,
        subnet: Option<Ipv4Net>,
        out: &mut Vec<Output>,
    ) {
        match self.ipam.donate(from, incarnation, subnet) {
            Ok(Some(block)) => {
                self.counters.donations_given += 1;
                out.push(Output::Info(format!("gave {block} to {from}")));
                out.push(Output::Persist);
                out.push(Output::RoutesChanged);
                self.push_ring(out, Some(id));
            }
            // Nothing to give: our ring at least shows the requester who has space.
            Ok(None) => self.send_ring(id, out),
            Err(e) => {
                out.push(Output::Warn(format!("cannot give space to {from}: {e}")));
                self.send_ring(id, out);
            }
        }
    }

    // ---- helpers ----

    fn established_ids(&self) -> Vec<ConnId> {
        self.conns
            .iter()
            .filter(|(_, c)| c.peer.is_some())
            .map(|(id, _)| *id)
            .collect()
    }

    fn established_peers(&self) -> Vec<PeerName> {
        self.conns
            .values()
            .filter_map(|c| c.peer.as_ref().map(|p| p.0.clone()))
            .collect()
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
        }];
        for name in direct {
            if let Some(k) = self.peers.get(&name) {
                v.push(PeerSummary {
                    name: name.clone(),
                    nickname: k.nickname.clone(),
                    uid: k.uid,
                    address: k.address,
                    control_port: k.control_port,
                    data_port: k.data_port,
                    connections: Vec::new(),
                });
            }
        }
        v
    }

    fn nickname_of(&self, name: &PeerName) -> String {
        if name == &self.cfg.name {
            return self.cfg.nickname.clone();
        }
        self.peers
            .get(name)
            .map(|k| k.nickname.clone())
            .unwrap_or_default()
    }

    // ---- local IPAM calls ----

    /// Runs an allocation; on `NotReady` with a ring (no free space of ours) asks a donor.
    fn allocating(
        &mut self,
        id: &str,
        subnet: Ipv4Net,
    ) -> (Result<Ipv4Addr, IpamError>, Vec<Output>) {
        let mut out = Vec::new();
        if self.gated && self.ipam.lookup(id).is_none() {
            return (Err(IpamError::NotReady), out);
        }
        let before = self.ipam.lookup(id);
        let r = self.ipam.allocate_in(id, subnet);
        match &r {
            Ok(_) if before.is_none() => out.push(Output::Persist),
            Err(IpamError::NotReady) if self.ipam.is_ready() => {
                let subnet = subnet.trunc();
                let fresh = self.want.as_ref().is_none_or(|w| w.subnet != subnet);
                if fresh {
                    self.want = Some(Want {
                        subnet,
                        asked: None,
                        at: self.ticks,
                        tried: BTreeSet::new(),
                    });
                    self.ask_space(&mut out);
                }
            }
            _ => {}
        }
        (r, out)
    }

    pub fn allocate(&mut self, id: &str) -> (Result<Ipv4Addr, IpamError>, Vec<Output>) {
        self.allocating(id, self.cfg.range)
    }

    pub fn allocate_in(
        &mut self,
        id: &str,
        subnet: Ipv4Net,
    ) -> (Result<Ipv4Addr, IpamError>, Vec<Output>) {
        self.allocating(id, subnet)
    }

    pub fn claim(&mut self, id: &str, addr: Ipv4Addr) -> (Result<(), IpamError>, Vec<Output>) {
        let before = self.ipam.lookup(id);
        let r = self.ipam.claim(id, addr);
        let mut out = Vec::new();
        if r.is_ok() && before != Some(addr) {
            out.push(Output::Persist);
        }
        (r, out)
    }

    pub fn free(&mut self, id: &str) -> (Option<Ipv4Addr>, Vec<Output>) {
        let r = self.ipam.free(id);
        let mut out = Vec::new();
        if r.is_some() {
            out.push(Output::Persist);
        }
        (r, out)
    }

    /// `weft rmpeer NAME` / `DELETE /peer/{name}`, and what automatic reclaim in
    /// Kubernetes calls on a Node deletion: hands every range of the dead peer to this one
    /// and tombstones it so that it cannot resurrect them. Refused for this peer itself and
    /// for a peer currently connected. Idempotent; two nodes removing the same peer
    /// concurrently end with one owner (the lower name) once their rings merge.
    pub fn rmpeer(&mut self, name: &PeerName) -> (Result<u64, IpamError>, Vec<Output>) {
        let mut out = Vec::new();
        if name == &self.cfg.name {
            return (Err(IpamError::RemoveSelf(name.clone())), out);
        }
        if self.established_peers().contains(name) {
            return (Err(IpamError::RemoveConnected(name.clone())), out);
        }
        let r = self.ipam.rmpeer(name);
        if let Ok(n) = &r {
            out.push(Output::Info(format!(
                "removed peer {name}: took over {n} addresses"
            )));
            self.peers.remove(name);
            out.push(Output::Persist);
            out.push(Output::RoutesChanged);
            self.push_ring(&mut out, None);
            self.check_want(&mut out);
        }
        (r, out)
    }

    /// After a restart: re-claims `(container id, address)` pairs found on local pod
    /// interfaces. Addresses in our space are claimed now; without a ring they stay pending
    /// (never handed out meanwhile) until it arrives; one owned by another peer is reported
    /// as a conflict, never taken.
    pub fn reclaim(&mut self, claims: Vec<(String, Ipv4Addr)>) -> (ReclaimOutcome, Vec<Output>) {
        let mut out = Vec::new();
        let r = self.ipam.reclaim(claims);
        for c in &r.conflicts {
            out.push(Output::Warn(c.clone()));
        }
        if !r.claimed.is_empty() {
            out.push(Output::Persist);
        }
        (r, out)
    }

    /// Ring ranges with their owners and the data addresses of all known peers, for the
    /// route table.
    pub fn route_inputs(&self) -> (Vec<(u32, u32, PeerName)>, Vec<PeerEndpoint>) {
        let ranges = match self.ipam.ring() {
            Some(r) => r
                .ranges()
                .map(|(first, last, e)| (first, last, e.owner.clone()))
                .collect(),
            None => Vec::new(),
        };
        let peers = self
            .peers
            .iter()
            .map(|(name, k)| PeerEndpoint {
                name: name.clone(),
                nickname: k.nickname.clone(),
                data_addr: k.address.map(|a| SocketAddrV4::new(a, k.data_port)),
            })
            .collect();
        (ranges, peers)
    }

    /// Whether an established connection leads to a peer at this underlay address.
    pub fn is_connected_to_ip(&self, ip: Ipv4Addr) -> bool {
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

    pub fn ipam_status(&self) -> String {
        if let Some(e) = &self.ring_error {
            if !self.ipam.is_ready() {
                return e.clone();
            }
        }
        if !self.ipam.is_ready() {
            return match &self.cfg.init {
                IpallocInit::Observer => "observer: waiting for the ring from a peer".into(),
                IpallocInit::Seed(_) => "waiting for the ring".into(),
                IpallocInit::Consensus(_) => {
                    let known = self.established_peers().len() + 1;
                    format!(
                        "awaiting consensus (quorum: {}, known: {known})",
                        self.quorum()
                    )
                }
            };
        }
        if self.gated {
            return "restarted: waiting to hear the ring from a peer before allocating".into();
        }
        if self.want.is_some() {
            return "waiting for IP range grant from peers".into();
        }
        let Some(ring) = self.ipam.ring() else {
            return "idle".into();
        };
        if ring.total_owned(&self.cfg.name) == 0 {
            return "ready (this peer owns no addresses yet)".into();
        }
        "ready".into()
    }

    /// Peers and this node's own connections, for `/report`.
    pub fn peers_report(&self) -> Vec<PeerReport> {
        let mut v = Vec::new();
        let own_conns: Vec<PeerConnectionReport> = self
            .conns
            .values()
            .filter_map(|c| {
                let (name, _) = c.peer.as_ref()?;
                Some(PeerConnectionReport {
                    name: name.to_string(),
                    nick_name: self.nickname_of(name),
                    address: c.remote.to_string(),
                    outbound: c.outbound,
                    established: true,
                })
            })
            .collect();
        v.push(PeerReport {
            name: self.cfg.name.to_string(),
            nick_name: self.cfg.nickname.clone(),
            uid: self.cfg.uid,
            data_address: None,
            connections: own_conns,
        });
        for (name, k) in &self.peers {
            v.push(PeerReport {
                name: name.to_string(),
                nick_name: k.nickname.clone(),
                uid: k.uid,
                data_address: k
                    .address
                    .map(|a| SocketAddrV4::new(a, k.data_port).to_string()),
                connections: k
                    .connections
                    .iter()
                    .map(|n| PeerConnectionReport {
                        name: n.to_string(),
                        nick_name: self.nickname_of(n),
                        address: String::new(),
                        outbound: false,
                        established: true,
                    })
                    .collect(),
            });
        }
        v
    }

    /// Control connections past the handshake or in it.
    pub fn connections_report(&self, mtu: u32) -> Vec<ConnectionReport> {
        self.conns
            .values()
            .map(|c| match &c.peer {
                Some((name, _)) => ConnectionReport {
                    address: c.remote.to_string(),
                    outbound: c.outbound,
                    state: "established".into(),
                    info: format!("vxlan {name}({})", self.nickname_of(name)),
                    peer_name: Some(name.to_string()),
                    peer_nick_name: Some(self.nickname_of(name)),
                    mtu,
                },
                None => ConnectionReport {
                    address: c.remote.to_string(),
                    outbound: c.outbound,
                    state: "connecting".into(),
                    info: "handshake".into(),
                    peer_name: None,
                    peer_nick_name: None,
                    mtu,
                },
            })
            .collect()
    }

    pub fn terminations(&self) -> u64 {
        self.terminations
    }

    pub fn ipam_report(&self) -> IpamReport {
        let range = self.cfg.range;
        let mut entries = Vec::new();
        let mut seeds = Vec::new();
        if let Some(ring) = self.ipam.ring() {
            seeds = ring.seeds.iter().map(|s| s.to_string()).collect();
            for (first, last, e) in ring.ranges() {
                entries.push(RingEntryReport {
                    token: Ipv4Addr::from(first).to_string(),
                    size: u64::from(last - first) + 1,
                    peer: e.owner.to_string(),
                    nickname: self.nickname_of(&e.owner),
                    is_known_peer: e.owner == self.cfg.name || self.peers.contains_key(&e.owner),
                    reachable: self.is_reachable(&e.owner),
                    version: e.version,
                    free: u64::from(e.free),
                });
            }
        }
        let mut owned: Vec<OwnedReport> = self
            .ipam
            .allocations()
            .map(|(id, a)| OwnedReport {
                containerid: id.to_string(),
                addrs: vec![format!("{a}/{}", range.prefix_len())],
            })
            .collect();
        owned.sort_by(|a, b| a.containerid.cmp(&b.containerid));
        IpamReport {
            status: self.ipam_status(),
            range: range.to_string(),
            range_num_ips: self.ipam.max_ips(),
            active_ips: self.ipam.active_count(),
            default_subnet: range.to_string(),
            seeds,
            entries,
            owned,
            pending_allocates: 0,
            pending_claims: self.ipam.pending_count(),
            bad_gossip: self.counters.bad_gossip,
            bad_requests: 0,
        }
    }
}

/// A peer's data-plane endpoint as the control plane knows it.
#[derive(Clone, Debug, PartialEq)]
pub struct PeerEndpoint {
    pub name: PeerName,
    pub nickname: String,
    pub data_addr: Option<SocketAddrV4>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::VecDeque;

    fn name(i: u8) -> PeerName {
        PeerName::from_bytes([2, 0x77, 0x66, 0, 0, i])
    }

    fn range() -> Ipv4Net {
        "192.168.0.0/16".parse().unwrap()
    }

    fn node(i: u8, consensus: usize, uid: u64) -> Node {
        let cfg = NodeConfig {
            name: name(i),
            nickname: format!("n{i}"),
            uid,
            control_port: 6783,
            data_port: 6784,
            range: range(),
            init: IpallocInit::Consensus(consensus),
        };
        Node::new(cfg, Ipam::new(name(i), range()))
    }

    /// A lossless in-memory network: connection `c` joins node `a` (dialler) and `b`;
    /// messages sent on it by one side are delivered to the other.
    struct Net {
        nodes: Vec<Node>,
        /// conn id -> (dialler index, acceptor index); each side uses the same id.
        links: BTreeMap<ConnId, (usize, usize)>,
        queue: VecDeque<(usize, ConnId, Message)>,
        closed: Vec<(usize, ConnId, String)>,
        next: ConnId,
    }

    impl Net {
        fn new(nodes: Vec<Node>) -> Net {
            let mut n = Net {
                nodes,
                links: BTreeMap::new(),
                queue: VecDeque::new(),
                closed: Vec::new(),
                next: 1,
            };
            for i in 0..n.nodes.len() {
                let outs = n.nodes[i].start();
                n.absorb(i, outs);
            }
            n
        }

        fn addr(i: usize) -> SocketAddr {
            SocketAddr::from(([10, 0, 0, i as u8 + 1], 40000 + i as u16))
        }

        fn connect(&mut self, a: usize, b: usize) -> ConnId {
            let id = self.next;
            self.next += 1;
            self.links.insert(id, (a, b));
            let o = self.nodes[a].on_connected(id, Self::addr(b), true);
            self.absorb(a, o);
            let o = self.nodes[b].on_connected(id, Self::addr(a), false);
            self.absorb(b, o);
            id
        }

        fn absorb(&mut self, from: usize, outs: Vec<Output>) {
            for o in outs {
                match o {
                    Output::Send(id, m) => {
                        if let Some(&(a, b)) = self.links.get(&id) {
                            let to = if from == a { b } else { a };
                            self.queue.push_back((to, id, m));
                        }
                    }
                    Output::Close(id, why) => {
                        if let Some((a, b)) = self.links.remove(&id) {
                            self.closed.push((from, id, why.clone()));
                            let other = if from == a { b } else { a };
                            let o1 = self.nodes[from].on_closed(id, &why);
                            let o2 = self.nodes[other].on_closed(id, "closed by peer");
                            self.absorb(from, o1);
                            self.absorb(other, o2);
                        }
                    }
                    _ => {}
                }
            }
        }

        fn tick_all(&mut self) {
            for _ in 0..3 {
                for i in 0..self.nodes.len() {
                    let o = self.nodes[i].on_tick();
                    self.absorb(i, o);
                }
                self.run();
            }
        }

        fn run(&mut self) {
            let mut steps = 0;
            while let Some((to, id, m)) = self.queue.pop_front() {
                steps += 1;
                assert!(steps < 100_000, "gossip does not quiesce");
                if !self.links.contains_key(&id) {
                    continue;
                }
                let outs = self.nodes[to].on_message(id, m);
                self.absorb(to, outs);
            }
        }
    }

    #[test]
    fn three_nodes_agree_on_one_ring_in_any_connection_order() {
        for order in [[(0, 1), (1, 2), (0, 2)], [(2, 0), (0, 1), (2, 1)]] {
            let mut net = Net::new(vec![node(1, 3, 11), node(2, 3, 12), node(3, 3, 13)]);
            assert!(
                net.nodes.iter().all(|n| !n.ipam().is_ready()),
                "alone: no quorum"
            );
            for (a, b) in order {
                net.connect(a, b);
                net.run();
            }
            let rings: Vec<_> = net.nodes.iter().map(|n| n.ipam().ring().cloned()).collect();
            assert!(rings[0].is_some());
            assert!(rings.iter().all(|r| r == &rings[0]));
            // The first two connected decided (quorum 2 of 3); the third owns nothing yet.
            assert_eq!(rings[0].as_ref().unwrap().seeds.len(), 2);
            assert!(net.closed.is_empty(), "{:?}", net.closed);
        }
    }

    #[test]
    fn late_joiner_adopts_the_existing_ring_instead_of_seeding() {
        let mut net = Net::new(vec![node(1, 2, 11), node(2, 2, 12), node(3, 2, 13)]);
        net.connect(0, 1);
        net.run();
        let ring = net.nodes[0].ipam().ring().cloned().unwrap();
        // Node 3 only needs one more peer for its own consensus, but must not seed its
        // own ring: the Hello from node 1 carries the existing one.
        net.connect(2, 0);
        net.run();
        assert_eq!(net.nodes[2].ipam().ring(), Some(&ring));
        assert!(net.closed.is_empty(), "{:?}", net.closed);
    }

    #[test]
    fn a_second_node_with_the_same_name_is_refused() {
        let mut a = node(1, 2, 11);
        let mut impostor = node(2, 2, 99);
        impostor.cfg.name = name(1);
        let mut net = Net::new(vec![node(3, 2, 13)]);
        net.nodes.push(std::mem::replace(&mut a, node(9, 2, 0)));
        net.nodes.push(impostor);
        net.connect(0, 1);
        net.run();
        assert!(net.nodes[0].is_reachable(&name(1)));
        let c = net.connect(2, 0);
        net.run();
        assert!(net
            .closed
            .iter()
            .any(|(_, id, why)| *id == c && why.contains("already used")));
        // The genuine peer keeps its connection.
        assert!(net.nodes[0].is_reachable(&name(1)));
    }

    #[test]
    fn own_name_from_another_node_is_refused_but_self_connection_is_recognised() {
        let mut net = Net::new(vec![node(1, 1, 11), node(1, 1, 12)]);
        let c = net.connect(0, 1);
        net.run();
        assert!(net
            .closed
            .iter()
            .any(|(_, id, why)| *id == c && why.contains("own name")));

        let mut n = node(1, 2, 11);
        let outs = n.on_connected(1, Net::addr(0), true);
        let Output::Send(_, hello) = &outs[0] else {
            panic!()
        };
        let outs = n.on_message(1, hello.clone());
        assert!(outs.contains(&Output::ConnectedToSelf(1)));
        let outs = n.target_is_self();
        assert!(
            outs.contains(&Output::Ready),
            "consensus 2 minus the self target"
        );
    }

    #[test]
    fn messages_before_hello_close_the_connection() {
        let mut n = node(1, 2, 11);
        n.on_connected(7, Net::addr(1), false);
        let outs = n.on_message(7, Message::Heartbeat);
        assert!(matches!(&outs[0], Output::Close(7, _)));
    }

    #[test]
    fn allocation_is_persisted_and_gossiped() {
        let mut net = Net::new(vec![node(1, 2, 11), node(2, 2, 12)]);
        net.connect(0, 1);
        net.run();
        let (r, outs) = net.nodes[0].allocate("c1");
        let addr = r.unwrap();
        assert!(outs.contains(&Output::Persist));
        let (again, outs) = net.nodes[0].allocate("c1");
        assert_eq!(again.unwrap(), addr);
        assert!(outs.is_empty(), "repeating an allocation changes nothing");
        // Anti-entropy carries the new free count within a tick.
        assert_ne!(net.nodes[0].ipam().ring(), net.nodes[1].ipam().ring());
        net.tick_all();
        assert_eq!(net.nodes[0].ipam().ring(), net.nodes[1].ipam().ring());
        assert_eq!(
            net.nodes[1]
                .ipam()
                .ring()
                .unwrap()
                .owner_of(u32::from(addr)),
            Some(&name(1))
        );
    }

    #[test]
    fn rmpeer_rules() {
        let mut net = Net::new(vec![node(1, 3, 11), node(2, 3, 12), node(3, 3, 13)]);
        net.connect(0, 1);
        net.connect(1, 2);
        net.connect(0, 2);
        net.run();
        let (r, _) = net.nodes[0].rmpeer(&name(1));
        assert!(matches!(r, Err(IpamError::RemoveSelf(_))));
        let (r, _) = net.nodes[0].rmpeer(&name(2));
        assert!(matches!(r, Err(IpamError::RemoveConnected(_))));
        let owned = net.nodes[0].ipam().ring().unwrap().total_owned(&name(2));
        assert!(owned > 0);
        // Node 2 dies: its connections close; node 1 removes it and gets its space.
        let ids: Vec<ConnId> = net
            .links
            .iter()
            .filter(|(_, &(a, b))| a == 1 || b == 1)
            .map(|(&id, _)| id)
            .collect();
        for id in ids {
            let (a, b) = net.links.remove(&id).unwrap();
            let other = if a == 1 { b } else { a };
            let o = net.nodes[other].on_closed(id, "reset");
            net.absorb(other, o);
        }
        let (r, outs) = net.nodes[0].rmpeer(&name(2));
        assert_eq!(r.unwrap(), owned);
        assert!(outs.contains(&Output::Persist));
        let (again, _) = net.nodes[0].rmpeer(&name(2));
        assert_eq!(again.unwrap(), 0, "idempotent");
        net.run();
        net.tick_all();
        let ring = net.nodes[2].ipam().ring().unwrap();
        assert_eq!(ring.total_owned(&name(2)), 0);
        assert!(ring.is_removed(&name(2)));
    }

    #[test]
    fn reclaim_waits_for_the_ring_and_never_hands_out_pending_addresses() {
        let mut n = node(1, 2, 11);
        let mine: Ipv4Addr = "192.168.0.1".parse().unwrap();
        let theirs: Ipv4Addr = "192.168.200.1".parse().unwrap();
        let (r, _) = n.reclaim(vec![("pod-a".into(), mine), ("pod-b".into(), theirs)]);
        assert_eq!(r.pending, 2);
        assert_eq!(n.ipam_report().pending_claims, 2);
        let mut net = Net::new(vec![n, node(2, 2, 12)]);
        net.connect(0, 1);
        net.run();
        let ipam = net.nodes[0].ipam();
        assert_eq!(ipam.lookup("pod-a"), Some(mine));
        assert_eq!(
            ipam.lookup("pod-b"),
            None,
            "owned by the other peer: not stolen"
        );
        assert_eq!(ipam.pending_count(), 0);
        let (a, _) = net.nodes[0].allocate("new");
        assert_ne!(a.unwrap(), mine);
    }

    #[test]
    fn bad_gossip_is_counted_and_does_not_touch_the_ring() {
        let mut net = Net::new(vec![node(1, 2, 11), node(2, 2, 12)]);
        let c = net.connect(0, 1);
        net.run();
        let before = net.nodes[0].ipam().ring().cloned();
        let mut bad = before.clone().unwrap();
        bad.entries.swap(0, 1);
        let outs = net.nodes[0].on_message(
            c,
            Message::Gossip {
                peers: Vec::new(),
                ring: Some(bad),
                gated: false,

                answer: false,
            },
        );
        assert!(outs.iter().any(|o| matches!(o, Output::Close(..))));
        assert_eq!(net.nodes[0].counters().bad_gossip, 1);
        assert_eq!(net.nodes[0].ipam().ring().cloned(), before);
    }
}
