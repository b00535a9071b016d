//! Deterministic simulation of a cluster of weft [`Node`]s: the proof that IPAM never
//! loses or duplicates an address. Pure like weft's core: time is a step counter,
//! randomness a seeded generator, the network an in-memory queue that drops, delays,
//! reorders, duplicates and partitions messages, the disk a store whose saves may fail.
//! Used by weft's `tests/ipam_sim.rs` and `benches/ipam.rs`; not part of the daemon.
//!
//! Connections are modelled as in the daemon: a handshake (Hello both ways) happens when
//! two live nodes are linked; afterwards every message goes through the faulty network.
//! Effects are carried out as the daemon's interpreter does: the save first; messages that
//! depend on it only if it succeeded. Persisted state is the last save that succeeded; a
//! restart decodes it with the daemon's own decoder.

use ipnet::Ipv4Net;
use std::collections::{BTreeMap, BTreeSet};
use std::net::{Ipv4Addr, SocketAddr};
use weft::core::datapath::aead::DataKey;
use weft::core::ipam::{IpallocInit, Ipam, IpamError, Ring, Signer};
use weft::core::mesh::message::{encode, Message};
use weft::core::mesh::{Action, ConnId, Effects, KeyChange, KeySeed, Node, NodeConfig, PeerName};
use weft::core::persist::{self, PersistedState};

/// Steps between two ticks of a node.
pub const TICK: u64 = 8;

/// The simulation's random source (splitmix64, as the node's).
pub type Rng = weft::core::rng::SplitMix64;

#[derive(Clone, Debug)]
pub struct Faults {
    /// Per-mille probabilities of dropping and duplicating a message.
    pub drop: u64,
    pub dup: u64,
    /// Per-mille probability that a save fails (disk full, I/O error).
    pub save_fail: u64,
    /// Delivery delay is uniform in `1..=max_delay` steps (so messages reorder).
    pub max_delay: u64,
}

impl Faults {
    pub fn none() -> Faults {
        Faults {
            drop: 0,
            dup: 0,
            save_fail: 0,
            max_delay: 1,
        }
    }
}

/// Lifecycle of a simulated machine.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Life {
    Up,
    /// The daemon is down; its pods keep running (their addresses stay in the model).
    Down,
    /// The machine died with its pods; may be removed (rmpeer) and may come back.
    Dead,
}

pub struct SimNode {
    pub name: PeerName,
    pub init: IpallocInit,
    pub node: Option<Node>,
    pub life: Life,
    /// The last state whose save succeeded.
    pub saved: Option<PersistedState>,
    /// Removed with rmpeer while dead.
    pub removed: bool,
    pub group: u32,
    tick_offset: u64,
}

struct Flight {
    to: usize,
    conn: ConnId,
    msg: Message,
}

pub struct Sim {
    pub range: Ipv4Net,
    pub nodes: Vec<SimNode>,
    pub faults: Faults,
    pub rng: Rng,
    pub now: u64,
    links: BTreeMap<ConnId, (usize, usize)>,
    next_conn: ConnId,
    flights: BTreeMap<(u64, u64), Flight>,
    seq: u64,
    /// Model of the pods: container id -> (node, address), and its reverse.
    pub containers: BTreeMap<String, (usize, Ipv4Addr)>,
    pub holders: BTreeMap<Ipv4Addr, String>,
    next_container: u64,
    /// When set, bytes each node sends (framed as on the wire) are counted.
    pub measure_bytes: bool,
    pub bytes_sent: Vec<u64>,
    pub stats: SimStats,
    /// Nodes that handled an event since the last check: only they can break an invariant.
    dirty: BTreeSet<usize>,
    /// Per node, the spans it owns in its own view (empty when down or gated).
    owned_cache: Vec<Vec<(u64, u64)>>,
    pods_by_node: Vec<BTreeSet<String>>,
    /// Why each node's last connection was closed (for failure messages).
    last_close: BTreeMap<usize, String>,
    /// Per node, its data path's keys per peer, as the node's `DataKey` actions set them
    /// (cleared when it crashes, as a restarted daemon's are).
    pub data_keys: Vec<BTreeMap<PeerName, SimKeys>>,
}

/// A model of one peer's data keys in a node's data path.
#[derive(Clone, Debug, Default)]
pub struct SimKeys {
    pub tx: Option<DataKey>,
    pub rx: [Option<DataKey>; 2],
}

#[derive(Clone, Debug, Default)]
pub struct SimStats {
    pub allocated: u64,
    pub freed: u64,
    pub not_ready: u64,
    pub exhausted: u64,
    pub delivered: u64,
    pub dropped: u64,
    pub restarts: u64,
    pub deaths: u64,
    pub removals: u64,
    pub comebacks: u64,
    pub joins: u64,
    pub partitions: u64,
    /// Saves that failed (their dependent messages were held back).
    pub failed_saves: u64,
    /// Forged rings injected by the Byzantine participant, and refusals by receivers.
    pub forged: u64,
    pub forged_refused: u64,
    /// Messages sent, by kind.
    pub sent: BTreeMap<&'static str, u64>,
}

impl Sim {
    pub fn new(seed: u64, range: Ipv4Net, faults: Faults) -> Sim {
        Sim {
            range,
            nodes: Vec::new(),
            faults,
            rng: Rng::new(seed),
            now: 0,
            links: BTreeMap::new(),
            data_keys: Vec::new(),
            next_conn: 1,
            flights: BTreeMap::new(),
            seq: 0,
            containers: BTreeMap::new(),
            holders: BTreeMap::new(),
            next_container: 0,
            measure_bytes: false,
            bytes_sent: Vec::new(),
            stats: SimStats::default(),
            dirty: BTreeSet::new(),
            owned_cache: Vec::new(),
            pods_by_node: Vec::new(),
            last_close: BTreeMap::new(),
        }
    }

    pub fn name_of(i: usize) -> PeerName {
        PeerName::from_bytes([2, 0x5e, 0, 0, (i >> 8) as u8, i as u8])
    }

    /// Machine `i`'s static key: kept with its disk, so the same across restarts.
    fn key_of(i: usize) -> weft::core::mesh::secure::PublicKey {
        let mut k = [0u8; 32];
        k[..8].copy_from_slice(&(i as u64 + 1).to_le_bytes());
        weft::core::mesh::secure::PublicKey(k)
    }

    /// Machine `i`'s record-signing key, derived from its static key as the router does.
    pub fn signer_of(i: usize) -> Signer {
        Signer::from_seed(&Signer::seed_from_static(&Self::key_of(i).0))
    }

    fn addr_of(i: usize) -> SocketAddr {
        SocketAddr::from(([10, 9, (i >> 8) as u8, i as u8], 6783))
    }

    /// Adds a machine and starts its daemon, linked to every live node.
    pub fn add_node(&mut self, init: IpallocInit) -> usize {
        self.add_node_linked(init, usize::MAX)
    }

    /// Adds a machine linked to at most `degree` random live nodes.
    pub fn add_node_linked(&mut self, init: IpallocInit, degree: usize) -> usize {
        let i = self.nodes.len();
        let tick_offset = self.rng.below(TICK);
        self.nodes.push(SimNode {
            name: Self::name_of(i),
            init,
            node: None,
            life: Life::Down,
            saved: None,
            removed: false,
            group: 0,
            tick_offset,
        });
        self.bytes_sent.push(0);
        self.owned_cache.push(Vec::new());
        self.pods_by_node.push(BTreeSet::new());
        self.boot(i, None, degree);
        i
    }

    /// Starts the daemon of machine `i` from `state` (None: a fresh disk), linked to at
    /// most `degree` random live nodes.
    fn boot(&mut self, i: usize, state: Option<PersistedState>, degree: usize) {
        let name = self.nodes[i].name.clone();
        let (ipam, acceptor, nicknames) = match state {
            Some(st) => {
                // Through the bytes, as the daemon's store does.
                let back = persist::decode(&persist::encode(&st)).expect("state decodes");
                let ipam = Ipam::restore(name.clone(), self.range, back.ipam_state())
                    .expect("saved state restores");
                (ipam, back.acceptor().clone(), back.nicknames)
            }
            None => (
                Ipam::new(name.clone(), self.range),
                Default::default(),
                Default::default(),
            ),
        };
        let cfg = NodeConfig {
            name,
            nickname: format!("sim{i}"),
            uid: self.rng.next_u64(),
            control_port: 6783,
            data_port: 6784,
            range: self.range,
            init: self.nodes[i].init.clone(),
            tentative_ticks: weft::core::mesh::TENTATIVE_TICKS,
            data_key_seed: Some(KeySeed(std::array::from_fn(|_| self.rng.next_u64() as u8))),
            signer: Self::signer_of(i),
        };
        if self.data_keys.len() <= i {
            self.data_keys.resize_with(i + 1, Default::default);
        }
        self.data_keys[i].clear();
        let mut node = Node::new(cfg, ipam, acceptor);
        node.remember_nicknames(nicknames);
        let fx = node.start();
        self.nodes[i].node = Some(node);
        self.nodes[i].life = Life::Up;
        self.absorb(i, fx);
        let mut peers: Vec<usize> = (0..self.nodes.len())
            .filter(|&j| j != i && self.nodes[j].life == Life::Up)
            .collect();
        while peers.len() > degree {
            let k = self.rng.below(peers.len() as u64) as usize;
            peers.swap_remove(k);
        }
        for j in peers {
            self.link(i, j);
        }
        // Pods still running here are re-claimed from their interfaces.
        let claims: Vec<(String, Ipv4Addr)> = self.pods_by_node[i]
            .iter()
            .map(|id| (id.clone(), self.containers[id].1))
            .collect();
        if !claims.is_empty() {
            let (_, fx) = self.node_mut(i).reclaim(claims);
            self.absorb(i, fx);
        }
    }

    pub fn node(&self, i: usize) -> &Node {
        self.nodes[i].node.as_ref().expect("node is up")
    }

    fn node_mut(&mut self, i: usize) -> &mut Node {
        self.nodes[i].node.as_mut().expect("node is up")
    }

    pub fn up(&self) -> Vec<usize> {
        (0..self.nodes.len())
            .filter(|&i| self.nodes[i].life == Life::Up)
            .collect()
    }

    /// Connects two live nodes: both Hellos are exchanged at once (a TCP handshake does
    /// not lose them); everything after goes through the faulty network.
    pub fn link(&mut self, a: usize, b: usize) {
        if self.nodes[a].group != self.nodes[b].group {
            return;
        }
        let id = self.next_conn;
        self.next_conn += 1;
        self.links.insert(id, (a, b));
        let oa = self
            .node_mut(a)
            .on_connected(id, Self::addr_of(b), true, Self::key_of(b));
        let ob = self
            .node_mut(b)
            .on_connected(id, Self::addr_of(a), false, Self::key_of(a));
        let (ha, rest_a) = split_hello(oa);
        let (hb, rest_b) = split_hello(ob);
        self.absorb(a, rest_a);
        self.absorb(b, rest_b);
        for (from, to, h) in [(a, b, ha), (b, a, hb)] {
            if let Some(h) = h {
                if self.links.contains_key(&id) {
                    self.count_bytes(from, &h);
                    let fx = self.node_mut(to).on_message(id, h);
                    self.absorb(to, fx);
                }
            }
        }
    }

    fn count_bytes(&mut self, from: usize, msg: &Message) {
        if self.measure_bytes {
            let mut buf = Vec::new();
            encode(msg, &mut buf);
            self.bytes_sent[from] += buf.len() as u64;
        }
    }

    /// Carries out one event's effects as the daemon's interpreter does: the save (which
    /// may fail), then what does not depend on it, then, if it succeeded, what does.
    fn absorb(&mut self, from: usize, fx: Effects) -> bool {
        self.dirty.insert(from);
        let saved = match fx.save {
            None => true,
            Some(save) => {
                if self.rng.chance(self.faults.save_fail) {
                    self.stats.failed_saves += 1;
                    false
                } else {
                    self.nodes[from].saved = Some(save.state);
                    if let Some(n) = self.nodes[from].node.as_mut() {
                        n.saved(save.generation);
                    }
                    true
                }
            }
        };
        let mut actions = fx.now;
        if saved {
            actions.extend(fx.after_save);
        }
        for a in actions {
            match a {
                Action::Send(id, msg) => self.send(from, id, msg),
                Action::Close(id, why) => self.close(id, &why),
                Action::Log(weft::core::mesh::Level::Warn, line)
                    if std::env::var("SIM_TRACE").is_ok() =>
                {
                    eprintln!("t={} node {from} warns: {line}", self.now);
                }
                Action::DataKey(peer, change) => {
                    if std::env::var("SIM_TRACE_KEYS").is_ok() {
                        eprintln!("t={} node {from} {:?}: {change:?}", self.now, peer);
                    }
                    let k = self.data_keys[from].entry(peer).or_default();
                    match change {
                        KeyChange::Send(key) => k.tx = Some(key),
                        KeyChange::Receive(key) => {
                            let slot = usize::from(key.id & 1);
                            k.rx[slot] = Some(key);
                        }
                        KeyChange::Forget => *k = SimKeys::default(),
                    }
                }
                _ => {}
            }
        }
        saved
    }

    fn send(&mut self, from: usize, id: ConnId, msg: Message) {
        let Some(&(a, b)) = self.links.get(&id) else {
            return;
        };
        self.count_bytes(from, &msg);
        *self.stats.sent.entry(kind(&msg)).or_insert(0) += 1;
        // Heartbeats only keep TCP connections alive; they carry no state.
        if matches!(msg, Message::Heartbeat { .. }) {
            return;
        }
        let to = if from == a { b } else { a };
        if self.rng.chance(self.faults.drop) {
            self.stats.dropped += 1;
            return;
        }
        let copies = if self.rng.chance(self.faults.dup) {
            2
        } else {
            1
        };
        for _ in 0..copies {
            let at = self.now + 1 + self.rng.below(self.faults.max_delay);
            self.seq += 1;
            self.flights.insert(
                (at, self.seq),
                Flight {
                    to,
                    conn: id,
                    msg: msg.clone(),
                },
            );
        }
    }

    fn close(&mut self, id: ConnId, why: &str) {
        if let Some((a, b)) = self.links.remove(&id) {
            self.last_close.insert(a, why.to_string());
            self.last_close.insert(b, why.to_string());
            for (x, reason) in [(a, why), (b, "closed by peer")] {
                if self.nodes[x].life == Life::Up {
                    let fx = self.node_mut(x).on_closed(id, reason);
                    self.absorb(x, fx);
                }
            }
        }
    }

    /// A Byzantine participant forges a ring removing live node `victim` in favour of
    /// `heir` (a record it can sign only with its own key), and sends it to every live node over one of its connections (as a member
    /// relaying gossip would). Returns how many receivers refused it.
    pub fn inject_forged_tombstone(&mut self, victim: usize, heir: usize) -> u64 {
        let Ok(mut forger) = Ipam::restore(
            Self::name_of(heir),
            self.range,
            self.node(heir).ipam().state(),
        ) else {
            return 0;
        };
        // It has no member's signing key: it signs in the heir's name with its own.
        forger.set_signer(Signer::from_seed(&[0xee; 32]));
        if forger
            .rmpeer(
                &Self::name_of(victim),
                Some(Self::signer_of(victim).public()),
            )
            .is_err()
        {
            return 0;
        }
        let Some(forged) = forger.ring().cloned() else {
            return 0;
        };
        self.stats.forged += 1;
        let mut refused = 0;
        let trace = std::env::var("SIM_TRACE").is_ok();
        for x in self.up() {
            let Some((&id, _)) = self.links.iter().find(|(_, &(a, b))| a == x || b == x) else {
                continue;
            };
            let refusals = |n: &Node| n.counters().refused_tombstones + n.counters().forged_records;
            let before = refusals(self.node(x));
            let fx = self.node_mut(x).on_message(
                id,
                Message::Gossip {
                    peers: Vec::new(),
                    ring: Some(forged.clone()),
                    gated: false,
                    answer: false,
                },
            );
            self.absorb(x, fx);
            if refusals(self.node(x)) > before {
                refused += 1;
            } else if trace {
                eprintln!(
                    "t={} forged tombstone of {victim} (heir {heir}) accepted by {x}",
                    self.now
                );
            }
        }
        self.stats.forged_refused += refused;
        refused
    }

    /// One step of time: due messages are delivered, due nodes tick.
    pub fn step(&mut self) {
        self.now += 1;
        while let Some((&(at, seq), _)) = self.flights.iter().next() {
            if at > self.now {
                break;
            }
            let f = self.flights.remove(&(at, seq)).expect("present");
            let Some(&(a, b)) = self.links.get(&f.conn) else {
                continue;
            };
            let from = if f.to == a { b } else { a };
            if self.nodes[from].group != self.nodes[f.to].group {
                self.stats.dropped += 1;
                continue;
            }
            self.stats.delivered += 1;
            let fx = self.node_mut(f.to).on_message(f.conn, f.msg);
            self.absorb(f.to, fx);
        }
        for i in 0..self.nodes.len() {
            if self.nodes[i].life == Life::Up
                && (self.now + self.nodes[i].tick_offset).is_multiple_of(TICK)
            {
                let fx = self.node_mut(i).on_tick();
                self.absorb(i, fx);
            }
        }
    }

    pub fn run(&mut self, steps: u64) {
        for _ in 0..steps {
            self.step();
        }
    }

    /// Allocates for a new container on node `i`.
    pub fn allocate(&mut self, i: usize) -> Result<Ipv4Addr, String> {
        let id = format!("c{}", self.next_container);
        self.next_container += 1;
        let (r, fx) = self.node_mut(i).allocate(&id);
        if !self.absorb(i, fx) {
            // Not saved, so not granted: the daemon gives the address back.
            if r.is_ok() {
                let (_, fx) = self.node_mut(i).free(&id);
                self.absorb(i, fx);
            }
            return Ok(Ipv4Addr::UNSPECIFIED);
        }
        match r {
            Ok(addr) => {
                if let Some(other) = self.holders.get(&addr) {
                    return Err(format!(
                        "address {addr} handed to {id} on node {i} is held by {other} on node {}",
                        self.containers[other].0
                    ));
                }
                self.holders.insert(addr, id.clone());
                self.pods_by_node[i].insert(id.clone());
                self.containers.insert(id, (i, addr));
                self.stats.allocated += 1;
                Ok(addr)
            }
            Err(IpamError::NotReady) => {
                self.stats.not_ready += 1;
                Ok(Ipv4Addr::UNSPECIFIED)
            }
            Err(IpamError::Exhausted { .. }) => {
                self.stats.exhausted += 1;
                Ok(Ipv4Addr::UNSPECIFIED)
            }
            Err(e) => Err(format!("allocate on node {i}: {e}")),
        }
    }

    /// Frees a container whose node is up.
    pub fn free(&mut self, id: &str) -> Result<(), String> {
        let Some(&(i, addr)) = self.containers.get(id) else {
            return Ok(());
        };
        let (r, fx) = self.node_mut(i).free(id);
        // A free whose save fails is still a free in memory; the daemon answers 500 and
        // the runtime retries the DEL, which then finds nothing to free.
        self.absorb(i, fx);
        if r != Some(addr) {
            return Err(format!(
                "free {id} on node {i}: got {r:?}, model has {addr}"
            ));
        }
        self.containers.remove(id);
        self.holders.remove(&addr);
        self.pods_by_node[i].remove(id);
        self.stats.freed += 1;
        Ok(())
    }

    fn drop_links_of(&mut self, i: usize) {
        let ids: Vec<ConnId> = self
            .links
            .iter()
            .filter(|(_, &(a, b))| a == i || b == i)
            .map(|(&id, _)| id)
            .collect();
        for id in ids {
            if let Some((a, b)) = self.links.remove(&id) {
                let other = if a == i { b } else { a };
                if self.nodes[other].life == Life::Up {
                    let fx = self.node_mut(other).on_closed(id, "connection reset");
                    self.absorb(other, fx);
                }
            }
        }
        self.flights.retain(|_, f| f.to != i);
    }

    /// The daemon of `i` stops; with `pods_die` the machine dies with its pods.
    /// Checks that everything the node would need after a restart was persisted.
    pub fn kill(&mut self, i: usize, pods_die: bool) -> Result<(), String> {
        let node = self.nodes[i].node.take().expect("node is up");
        // With every change acknowledged as saved, the last save must be the state: else
        // the node changed something without asking to save it.
        if !node.has_unsaved_state() {
            let saved = self.nodes[i].saved.as_ref();
            let now = node.snapshot();
            let same = saved.is_some_and(|s| s.ipam == now.ipam);
            if !same && (now.ipam.ring.is_some() || saved.is_some()) {
                return Err(format!(
                    "node {i} changed its IPAM state without asking to save it"
                ));
            }
        }
        self.nodes[i].life = if pods_die { Life::Dead } else { Life::Down };
        self.dirty.insert(i);
        self.drop_links_of(i);
        if pods_die {
            self.stats.deaths += 1;
            let gone = std::mem::take(&mut self.pods_by_node[i]);
            for id in gone {
                if let Some((_, a)) = self.containers.remove(&id) {
                    self.holders.remove(&a);
                }
            }
        }
        Ok(())
    }

    /// Restarts the daemon of `i` from its persisted state (a dead machine comes back with
    /// its old disk; after rmpeer it must rejoin as a fresh member).
    pub fn restart(&mut self, i: usize) {
        if std::env::var("SIM_TRACE").is_ok() {
            eprintln!("t={} restart {i}", self.now);
        }
        self.stats.restarts += 1;
        if self.nodes[i].removed {
            // It will find its tombstone and rejoin as a new incarnation.
            self.stats.comebacks += 1;
            self.nodes[i].removed = false;
        }
        let saved = self.nodes[i].saved.clone();
        self.boot(i, saved, usize::MAX);
    }

    /// `by` removes dead machine `dead`.
    pub fn rmpeer(&mut self, by: usize, dead: usize) -> Result<u64, String> {
        if std::env::var("SIM_TRACE").is_ok() {
            eprintln!("t={} rmpeer {dead} by {by}", self.now);
        }
        let name = self.nodes[dead].name.clone();
        let (r, fx) = self.node_mut(by).rmpeer(&name);
        let mut saved = self.absorb(by, fx);
        // Not saved: the operator sees an error and runs rmpeer again (idempotent).
        while r.is_ok() && !saved {
            let (_, fx) = self.node_mut(by).rmpeer(&name);
            saved = self.absorb(by, fx);
        }
        match r {
            Ok(n) => {
                self.nodes[dead].removed = true;
                self.stats.removals += 1;
                Ok(n)
            }
            Err(e) => Err(format!("rmpeer {dead} by {by}: {e}")),
        }
    }

    /// Splits live nodes into two groups; messages between groups are lost.
    pub fn partition(&mut self) {
        self.stats.partitions += 1;
        for i in 0..self.nodes.len() {
            self.nodes[i].group = u32::from(self.rng.chance(400));
        }
    }

    pub fn heal(&mut self) {
        for n in &mut self.nodes {
            n.group = 0;
        }
        self.relink();
    }

    /// Re-links live nodes whose connection was closed (as the daemon's diallers do).
    pub fn relink(&mut self) {
        let up = self.up();
        let linked: BTreeSet<(usize, usize)> = self
            .links
            .values()
            .map(|&(a, b)| (a.min(b), a.max(b)))
            .collect();
        for (k, &a) in up.iter().enumerate() {
            for &b in &up[k + 1..] {
                if !linked.contains(&(a.min(b), a.max(b))) {
                    self.link(a, b);
                }
            }
        }
    }

    /// Data keys between connected nodes: runs `steps` more without faults (offers that
    /// were lost are made again), then checks that over every connection established at
    /// both ends each side seals with a key the other opens.
    pub fn check_data_keys(&mut self, steps: u64) -> Result<(), String> {
        let saved = std::mem::replace(&mut self.faults, Faults::none());
        self.run(steps);
        self.faults = saved;
        for (&id, &(a, b)) in &self.links {
            let up = |i: usize| self.nodes[i].life == Life::Up;
            if !(up(a)
                && up(b)
                && self.node(a).is_established(id)
                && self.node(b).is_established(id))
            {
                continue;
            }
            for (x, y) in [(a, b), (b, a)] {
                let (nx, ny) = (&self.nodes[x].name, &self.nodes[y].name);
                let Some(tx) = self.data_keys[x].get(ny).and_then(|k| k.tx.clone()) else {
                    return Err(format!("node {x} has no key to seal to {y} with"));
                };
                let opens = self.data_keys[y]
                    .get(nx)
                    .is_some_and(|k| k.rx.iter().flatten().any(|r| r == &tx));
                if !opens {
                    return Err(format!(
                        "node {x} seals to {y} with key {}, which {y} does not have (it has {:?}; link {id}; {x} sees {:?}, {y} sees {:?})",
                        tx.id,
                        self.data_keys[y].get(nx).map(|k| k.rx.iter().flatten().map(|k| k.id).collect::<Vec<_>>()),
                        self.node(x).data_key_view(),
                        self.node(y).data_key_view(),
                    ));
                }
            }
        }
        Ok(())
    }

    /// Delivers everything in flight without faults until the network is quiet and every
    /// live ring is identical; returns the steps it took.
    pub fn quiesce(&mut self, max_steps: u64) -> Result<u64, String> {
        let saved = std::mem::replace(&mut self.faults, Faults::none());
        self.heal();
        let mut steps = 0;
        let result = loop {
            self.step();
            steps += 1;
            if steps % TICK == 0 && self.converged() {
                break Ok(steps);
            }
            if steps >= max_steps {
                break Err(format!(
                    "rings did not converge within {max_steps} steps: {} distinct digests: {}",
                    self.digests().len(),
                    self.describe_rings()
                ));
            }
        };
        self.faults = saved;
        result
    }

    /// Which node holds which ring (for a failure message): digest, gating, unsaved
    /// state and connections of each live node.
    fn describe_rings(&self) -> String {
        let mut by: BTreeMap<Option<u64>, Vec<String>> = BTreeMap::new();
        for i in self.up() {
            let n = self.node(i);
            let links = self
                .links
                .values()
                .filter(|&&(a, b)| a == i || b == i)
                .count();
            by.entry(n.ipam().ring().map(Ring::digest))
                .or_default()
                .push(format!(
                    "{i}{}{} ({links} links{})",
                    if n.is_gated() { " gated" } else { "" },
                    if n.has_unsaved_state() {
                        " unsaved"
                    } else {
                        ""
                    },
                    match (links, self.last_close.get(&i)) {
                        (0, Some(why)) => format!(", last closed: {why}"),
                        _ => String::new(),
                    }
                ));
        }
        by.into_iter()
            .map(|(d, nodes)| format!("{d:x?}: [{}]", nodes.join(", ")))
            .collect::<Vec<_>>()
            .join("; ")
    }

    fn digests(&self) -> BTreeSet<Option<u64>> {
        self.up()
            .into_iter()
            .map(|i| self.node(i).ipam().ring().map(Ring::digest))
            .collect()
    }

    /// Every live node holds the same ring.
    pub fn converged(&self) -> bool {
        let d = self.digests();
        d.len() == 1 && d.iter().all(Option::is_some)
    }

    /// All invariants: `check_cheap` and, over the union of the live rings (each token at
    /// its greatest version), that the rings merge without conflict, tile the range, and
    /// give every held address to the node holding it.
    pub fn check(&mut self) -> Result<(), String> {
        self.check_with(true)
    }

    /// Invariants cheap enough for after every operation: no address is owned by two live
    /// nodes (each in its own view); each ring is valid (exactly covers the range); every
    /// allocation lies in its node's own space; every live pod's address is held by its
    /// node (or pending re-claim). Uniqueness of pod addresses across nodes is checked by
    /// `allocate` as each address is handed out.
    pub fn check_cheap(&mut self) -> Result<(), String> {
        self.check_with(false)
    }

    fn check_with(&mut self, full: bool) -> Result<(), String> {
        let up = self.up();
        let dirty: Vec<usize> = if full {
            (0..self.nodes.len()).collect()
        } else {
            std::mem::take(&mut self.dirty).into_iter().collect()
        };
        if full {
            self.dirty.clear();
        }
        for &i in &dirty {
            self.owned_cache[i].clear();
            if self.nodes[i].life != Life::Up {
                continue;
            }
            let node = self.node(i);
            let me = &self.nodes[i].name;
            let Some(ring) = node.ipam().ring() else {
                if node.ipam().active_count() > 0 {
                    return Err(format!("node {i} holds allocations without a ring"));
                }
                continue;
            };
            if full {
                ring.validate()
                    .map_err(|e| format!("node {i} ring invalid: {e}"))?;
            }
            // A restarted node that has not heard a live peer yet may hold a stale ring
            // (e.g. it was removed while away); it allocates nothing meanwhile.
            if node.is_gated() {
                continue;
            }
            let owned: Vec<(u64, u64)> = ring
                .owned_by(me)
                .into_iter()
                .map(|(f, l)| (u64::from(f), u64::from(l)))
                .collect();
            for (id, a) in node.ipam().allocations() {
                let own = ring.owner_of(u32::from(a));
                if own != Some(me) {
                    return Err(format!(
                        "node {i} holds {a} for {id} outside its own space (owner {own:?})"
                    ));
                }
            }
            // Every live pod's address is still held by its node (or pending re-claim).
            for id in &self.pods_by_node[i] {
                let a = self.containers[id].1;
                let held = node.ipam().lookup(id);
                let pending = node
                    .ipam()
                    .pending_claims()
                    .any(|(p, pa)| p == id && pa == a);
                if held != Some(a) && !pending {
                    return Err(format!(
                        "pod {id} on node {i} has {a}, but the node holds {held:?} for it"
                    ));
                }
            }
            self.owned_cache[i] = owned;
        }
        // No address is owned by two live nodes, each in its own view.
        let mut claims: Vec<(u64, u64, usize)> = Vec::new();
        for (i, spans) in self.owned_cache.iter().enumerate() {
            claims.extend(spans.iter().map(|&(f, l)| (f, l, i)));
        }
        claims.sort_unstable();
        let mut reach: Option<(u64, usize)> = None;
        for &(first, last, i) in &claims {
            if let Some((end, j)) = reach {
                if first <= end && j != i {
                    let show = |k: usize| {
                        let n = self.node(k);
                        let r = n.ipam().ring().expect("has a ring");
                        let e = r.entry_of(first as u32).map(|(_, e)| e.clone());
                        format!(
                            "node {k} ({}) inc {} entry {e:?} records {:?}",
                            self.nodes[k].name,
                            n.ipam().incarnation(),
                            r.peers
                        )
                    };
                    return Err(format!(
                        "nodes {j} and {i} both believe they own {}: {}; {}",
                        Ipv4Addr::from(first as u32),
                        show(j),
                        show(i)
                    ));
                }
            }
            if reach.is_none_or(|(end, _)| last > end) {
                reach = Some((last, i));
            }
        }
        if !full {
            return Ok(());
        }
        // The union of the live rings, each token at its greatest version: the rings merge
        // without conflict, tile the range, and give each held address to its holder.
        let mut merged: Option<Ring> = None;
        for &i in &up {
            let node = self.node(i);
            let Some(ring) = node.ipam().ring() else {
                continue;
            };
            if node.is_gated() {
                continue;
            }
            match &mut merged {
                None => merged = Some(ring.clone()),
                Some(m) => {
                    m.merge(ring)
                        .map_err(|e| format!("rings of live nodes do not merge (node {i}): {e}"))?;
                }
            }
        }
        let Some(m) = merged else {
            return Ok(());
        };
        m.validate()
            .map_err(|e| format!("merged ring invalid: {e}"))?;
        for &i in &up {
            let node = self.node(i);
            if node.is_gated() {
                continue;
            }
            let me = &self.nodes[i].name;
            for (id, a) in node.ipam().allocations() {
                let x = u32::from(a);
                if m.owner_of(x) != Some(me) {
                    let views: Vec<String> = up
                        .iter()
                        .filter_map(|&k| {
                            let r = self.node(k).ipam().ring()?;
                            let (span, e) = r.entry_of(x)?;
                            (k == i || &e.owner != me).then(|| {
                                format!(
                                    "node {k} (gated {}): {}-{} {e:?}",
                                    self.node(k).is_gated(),
                                    Ipv4Addr::from(span.start),
                                    span.end
                                )
                            })
                        })
                        .collect();
                    return Err(format!(
                        "node {i} ({me}) holds {a} for {id}, but the merged ring gives it \
                         to {:?}; views: {}",
                        m.owner_of(x),
                        views.join("; ")
                    ));
                }
            }
        }
        Ok(())
    }

    /// Address count owned by each live node, for reports.
    pub fn ownership(&self) -> Vec<(usize, u64)> {
        self.up()
            .into_iter()
            .filter_map(|i| {
                let r = self.node(i).ipam().ring()?;
                Some((i, r.total_owned(&self.nodes[i].name)))
            })
            .collect()
    }
}

fn kind(m: &Message) -> &'static str {
    match m {
        Message::Hello(_) => "hello",
        Message::Gossip { ring: Some(_), .. } => "ring",
        Message::Gossip { .. } => "peers",
        Message::Heartbeat { .. } => "heartbeat",
        Message::Digest { .. } => "digest",
        Message::SpaceRequest { .. } => "space-request",
        Message::Prepare { .. } => "prepare",
        Message::Promise { .. } => "promise",
        Message::Accept { .. } => "accept",
        Message::Accepted { .. } => "accepted",
        Message::Nack { .. } => "nack",
        Message::DataKey { .. } => "data-key",
        Message::DataKeyAck { .. } => "data-key-ack",
    }
}

/// Takes the Hello out of a connection's first effects (it is delivered at once, as a
/// TCP handshake does not lose it).
fn split_hello(mut fx: Effects) -> (Option<Message>, Effects) {
    let at = fx
        .now
        .iter()
        .position(|a| matches!(a, Action::Send(_, Message::Hello(_))));
    let hello = at.map(|k| match fx.now.remove(k) {
        Action::Send(_, m) => m,
        _ => unreachable!("position matched a Send"),
    });
    (hello, fx)
}

/// Parameters of a random run.
#[derive(Clone, Debug)]
pub struct Scenario {
    pub seed: u64,
    pub range: Ipv4Net,
    /// Nodes started one at a time (all with `consensus=initial`), then joiners.
    pub initial: usize,
    pub max_nodes: usize,
    pub ops: u64,
    pub faults: Faults,
    /// Check the invariants every `check_every` operations (1 = after every step).
    pub check_every: u64,
    /// Also check the merged-ring invariants every `full_check_every` operations.
    pub full_check_every: u64,
    /// A Byzantine participant now and then sends every node a ring of its making that
    /// removes a live peer (a forged tombstone, heir: another node).
    pub byzantine: bool,
}

/// Runs a random scenario; Err carries the failing invariant with the step.
pub fn run_scenario(sc: &Scenario) -> Result<Sim, String> {
    let mut sim = Sim::new(sc.seed, sc.range, sc.faults.clone());
    let init = IpallocInit::Consensus(sc.initial);
    // Start one at a time with pauses: they must agree on one ring.
    for _ in 0..sc.initial {
        sim.add_node(init.clone());
        let pause = sim.rng.below(3 * TICK);
        sim.run(pause);
        sim.check().map_err(|e| format!("at start-up: {e}"))?;
    }
    let mut steps = 0;
    while !sim.up().iter().all(|&i| sim.node(i).can_allocate()) {
        sim.step();
        steps += 1;
        if steps > 2000 * TICK {
            return Err("consensus not reached".into());
        }
        if steps % (4 * TICK) == 0 {
            sim.relink();
        }
    }
    let seeds = sim.node(0).ipam().ring().map(|r| r.seeds.clone());
    for i in sim.up() {
        if sim.node(i).ipam().ring().map(|r| r.seeds.clone()) != seeds {
            return Err("nodes seeded different rings".into());
        }
    }
    let mut partitioned = false;
    let mut dead_since: BTreeMap<usize, u64> = BTreeMap::new();
    for op in 0..sc.ops {
        let now = sim.now;
        let fail = |e: String| format!("op {op} (step {now}): {e}");
        let up = sim.up();
        let r = sim.rng.below(1000);
        if r < 480 && !up.is_empty() {
            let i = up[sim.rng.below(up.len() as u64) as usize];
            sim.allocate(i).map_err(fail)?;
        } else if r < 900 {
            if !sim.containers.is_empty() {
                let k = sim.rng.below(sim.containers.len() as u64) as usize;
                let (id, &(i, _)) = sim.containers.iter().nth(k).expect("k < len");
                let id = id.clone();
                if sim.nodes[i].life == Life::Up {
                    sim.free(&id).map_err(fail)?;
                }
            }
        } else if r < 960 {
            sim.step();
        } else if r < 990 {
            // A lookup: the node answers for a pod exactly what the model says.
            if !sim.containers.is_empty() {
                let k = sim.rng.below(sim.containers.len() as u64) as usize;
                let (id, &(i, a)) = sim.containers.iter().nth(k).expect("k < len");
                if sim.nodes[i].life == Life::Up && !sim.node(i).is_gated() {
                    let got = sim.node(i).ipam().lookup(id);
                    if got != Some(a) {
                        return Err(fail(format!("lookup {id} on node {i}: {got:?}, want {a}")));
                    }
                }
            }
        } else {
            // Rare events.
            let e = sim.rng.below(100);
            let dead: Vec<usize> = (0..sim.nodes.len())
                .filter(|&i| sim.nodes[i].life != Life::Up)
                .collect();
            if e < 8 && !partitioned {
                sim.partition();
                partitioned = true;
            } else if e < 30 && partitioned {
                sim.heal();
                partitioned = false;
            } else if e < 36 && up.len() > (sc.initial * 4 / 5).max(3) {
                let i = up[sim.rng.below(up.len() as u64) as usize];
                let pods_die = sim.rng.chance(500);
                sim.kill(i, pods_die).map_err(fail)?;
                dead_since.insert(i, sim.now);
            } else if e < 60 && !dead.is_empty() {
                let i = dead[sim.rng.below(dead.len() as u64) as usize];
                let long_dead = dead_since.get(&i).is_some_and(|&t| sim.now > t + 20 * TICK);
                if sim.nodes[i].life == Life::Dead && !sim.nodes[i].removed && long_dead {
                    // Kubernetes deleted the Node: one live node reclaims (the
                    // reclaim daemon's lock makes it one), once the dead node's
                    // last gossip has spread.
                    sim.quiesce(4000 * TICK).map_err(fail)?;
                    partitioned = false;
                    let up = sim.up();
                    let by = up[sim.rng.below(up.len() as u64) as usize];
                    sim.rmpeer(by, i).map_err(fail)?;
                    // The machine is re-created (if ever) minutes later: the tombstone
                    // has reached everyone by then.
                    sim.quiesce(4000 * TICK).map_err(fail)?;
                } else if sim.nodes[i].life == Life::Down || sim.rng.chance(300) {
                    sim.restart(i);
                    dead_since.remove(&i);
                }
            } else if e < 64 && sim.nodes.len() < sc.max_nodes {
                sim.add_node(init.clone());
                sim.stats.joins += 1;
            } else if e < 80 {
                sim.relink();
            } else if e < 88 && sc.byzantine && !partitioned && up.len() >= 3 {
                // Every live node is connected to every other (no partition): each must
                // refuse a ring that removes one of them. A node in its restart gate
                // would take its own removal for a real one (it may have been removed
                // while it was down), so the victim is one that is past its gate.
                let victims: Vec<usize> = up
                    .iter()
                    .copied()
                    .filter(|&v| !sim.node(v).is_gated())
                    .collect();
                // The forger works from a copy of a current ring (a node past its gate):
                // relaying a restarted node's stale ring as a live member's word would
                // open the gates of other restarted nodes, a power of members that
                // the forger does not have.
                let heirs: Vec<usize> = victims.clone();
                if victims.len() >= 2 {
                    let v = victims[sim.rng.below(victims.len() as u64) as usize];
                    let h = *heirs.iter().find(|&&h| h != v).expect("2 past their gates");
                    sim.inject_forged_tombstone(v, h);
                }
            }
        }
        if op % sc.full_check_every == 0 {
            sim.check().map_err(fail)?;
        } else if op % sc.check_every == 0 {
            sim.check_cheap().map_err(fail)?;
        }
    }
    sim.quiesce(4000 * TICK)
        .map_err(|e| format!("after the run: {e}"))?;
    sim.check().map_err(|e| format!("after healing: {e}"))?;
    sim.check_data_keys(4 * TICK)
        .map_err(|e| format!("data keys after healing: {e}"))?;
    for i in sim.up() {
        let n = sim.node(i);
        if n.counters().bad_gossip > 0 {
            return Err(format!(
                "node {i} refused {} rings",
                n.counters().bad_gossip
            ));
        }
        if n.is_gated() {
            return Err(format!("node {i} still waits to hear a peer"));
        }
        if n.ipam().pending_count() > 0 {
            return Err(format!("node {i} has unsettled pending claims"));
        }
    }
    Ok(sim)
}
