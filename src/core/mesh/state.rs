//! The node's control state machine: connections, peers, gossip and IPAM, driven by
//! events (connection up, message in, connection closed, tick, local IPAM call) and
//! answering with outputs for the I/O layer to carry out. No sockets, no clock.

use crate::api::report::{
    ConnectionReport, IpamReport, OwnedReport, PeerConnectionReport, PeerReport, RingEntryReport,
};
use crate::core::ipam::{Ipam, IpamError};
use crate::core::mesh::message::{Hello, Message, PeerSummary, PROTOCOL, PROTOCOL_VERSION};
use crate::core::mesh::PeerName;
use ipnet::Ipv4Net;
use std::collections::{BTreeMap, BTreeSet};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};

pub type ConnId = u64;

/// Every `GOSSIP_EVERY` ticks the full state is resent to every neighbour, so a peer that
/// missed an update (or was partitioned) converges without waiting for the next change.
pub const GOSSIP_EVERY: u64 = 6;

#[derive(Clone, Debug)]
pub struct NodeConfig {
    pub name: PeerName,
    pub nickname: String,
    pub uid: u64,
    pub control_port: u16,
    pub data_port: u16,
    pub range: Ipv4Net,
    /// How many peers (this one included) must be connected before the range is split
    /// among them when no ring exists yet.
    pub consensus: usize,
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
    /// IPAM just became ready (a ring exists).
    Ready,
    /// Something an operator must see in the log.
    Warn(String),
    Info(String),
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
}

impl Node {
    /// `ipam` may come from persisted state; if it already has a ring the node is ready at
    /// once. Call [`Node::start`] next.
    pub fn new(cfg: NodeConfig, ipam: Ipam) -> Node {
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
        }
    }

    pub fn config(&self) -> &NodeConfig {
        &self.cfg
    }

    pub fn ipam(&self) -> &Ipam {
        &self.ipam
    }

    /// Outputs due at start-up: a lone node (consensus 1) seeds at once.
    pub fn start(&mut self) -> Vec<Output> {
        let mut out = Vec::new();
        if self.ipam.is_ready() {
            out.push(Output::RoutesChanged);
            out.push(Output::Ready);
        }
        self.maybe_seed(&mut out);
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
            ring: self.ipam.ring().cloned(),
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
        match (msg, &conn.peer) {
            (Message::Hello(h), None) => self.on_hello(id, &conn, h, &mut out),
            (Message::Hello(_), Some(_)) => self.close(
                id,
                "protocol error: second Hello on one connection",
                &mut out,
            ),
            (_, None) => self.close(id, "protocol error: message before Hello", &mut out),
            (Message::Heartbeat, Some(_)) => {}
            (Message::Gossip { peers, ring }, Some((from, _))) => {
                let from = from.clone();
                self.on_gossip(id, &from, peers, ring, &mut out)
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
                self.broadcast_gossip(&mut out);
            }
        }
        out
    }

    /// Called periodically by the I/O layer (every few seconds).
    pub fn on_tick(&mut self) -> Vec<Output> {
        self.ticks += 1;
        let mut out = Vec::new();
        if self.ticks.is_multiple_of(GOSSIP_EVERY) {
            self.broadcast_gossip(&mut out);
        } else {
            for id in self.established_ids() {
                out.push(Output::Send(id, Message::Heartbeat));
            }
        }
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
        if let Some(ring) = &h.ring {
            if !self.merge_ring(id, ring, &h.name, out) {
                return;
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
        self.maybe_seed(out);
        // Our own connection set changed: everyone (the new peer included) hears of it.
        self.broadcast_gossip(out);
    }

    /// Merges a ring received from `from`; on a conflict the connection is closed and the
    /// error kept for `/status`. Returns whether the connection may continue.
    fn merge_ring(
        &mut self,
        id: ConnId,
        ring: &crate::core::ipam::Ring,
        from: &PeerName,
        out: &mut Vec<Output>,
    ) -> bool {
        let was_ready = self.ipam.is_ready();
        match self.ipam.merge_ring(ring) {
            Ok(changed) => {
                if changed {
                    out.push(Output::Persist);
                    out.push(Output::RoutesChanged);
                    if !was_ready {
                        out.push(Output::Ready);
                    }
                    self.broadcast_gossip(out);
                }
                true
            }
            Err(e) => {
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
        ring: Option<crate::core::ipam::Ring>,
        out: &mut Vec<Output>,
    ) {
        if let Some(ring) = ring {
            if !self.merge_ring(id, &ring, from, out) {
                return;
            }
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
                        connections: p.connections.clone(),
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

    /// Splits the range among the connected peers once enough of them are here. Every node
    /// of a fully connected set computes the same split, so their rings are identical.
    fn maybe_seed(&mut self, out: &mut Vec<Output>) {
        if self.ipam.is_ready() {
            return;
        }
        let mut members = self.established_peers();
        members.push(self.cfg.name.clone());
        members.sort();
        members.dedup();
        if members.len() < self.quorum() {
            return;
        }
        match self.ipam.seed(&members) {
            Ok(true) => {
                out.push(Output::Info(format!(
                    "IP range {} split among {} peers",
                    self.cfg.range,
                    members.len()
                )));
                out.push(Output::Persist);
                out.push(Output::RoutesChanged);
                out.push(Output::Ready);
                self.broadcast_gossip(out);
            }
            Ok(false) => {}
            Err(e) => out.push(Output::Warn(format!("cannot seed IP ring: {e}"))),
        }
    }

    fn quorum(&self) -> usize {
        self.cfg.consensus.saturating_sub(self.self_targets).max(1)
    }

    /// A target turned out to be this node: it no longer counts towards consensus.
    pub fn target_is_self(&mut self) -> Vec<Output> {
        self.self_targets += 1;
        let mut out = Vec::new();
        self.maybe_seed(&mut out);
        out
    }

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
                    connections: k.connections.clone(),
                });
            }
        }
        v
    }

    fn broadcast_gossip(&self, out: &mut Vec<Output>) {
        let msg = Message::Gossip {
            peers: self.summaries(),
            ring: self.ipam.ring().cloned(),
        };
        for id in self.established_ids() {
            out.push(Output::Send(id, msg.clone()));
        }
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

    fn after_ipam_change(&self, out: &mut Vec<Output>) {
        out.push(Output::Persist);
        self.broadcast_gossip(out);
    }

    pub fn allocate(&mut self, id: &str) -> (Result<Ipv4Addr, IpamError>, Vec<Output>) {
        let before = self.ipam.lookup(id);
        let r = self.ipam.allocate(id);
        let mut out = Vec::new();
        if r.is_ok() && before.is_none() {
            self.after_ipam_change(&mut out);
        }
        (r, out)
    }

    pub fn allocate_in(
        &mut self,
        id: &str,
        subnet: Ipv4Net,
    ) -> (Result<Ipv4Addr, IpamError>, Vec<Output>) {
        let before = self.ipam.lookup(id);
        let r = self.ipam.allocate_in(id, subnet);
        let mut out = Vec::new();
        if r.is_ok() && before.is_none() {
            self.after_ipam_change(&mut out);
        }
        (r, out)
    }

    pub fn claim(&mut self, id: &str, addr: Ipv4Addr) -> (Result<(), IpamError>, Vec<Output>) {
        let before = self.ipam.lookup(id);
        let r = self.ipam.claim(id, addr);
        let mut out = Vec::new();
        if r.is_ok() && before != Some(addr) {
            self.after_ipam_change(&mut out);
        }
        (r, out)
    }

    pub fn free(&mut self, id: &str) -> (Option<Ipv4Addr>, Vec<Output>) {
        let r = self.ipam.free(id);
        let mut out = Vec::new();
        if r.is_some() {
            self.after_ipam_change(&mut out);
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
            let known = self.established_peers().len() + 1;
            return format!(
                "awaiting consensus (quorum: {}, known: {known})",
                self.quorum()
            );
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
            pending_claims: 0,
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
            consensus,
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
            for (step, (a, b)) in order.into_iter().enumerate() {
                net.connect(a, b);
                net.run();
                if step == 0 {
                    // Two of three: no quorum for consensus=3 yet.
                    assert!(net.nodes.iter().all(|n| !n.ipam().is_ready()));
                }
            }
            let rings: Vec<_> = net.nodes.iter().map(|n| n.ipam().ring().cloned()).collect();
            assert!(rings[0].is_some());
            assert!(rings.iter().all(|r| r == &rings[0]));
            for n in &net.nodes {
                assert!(n.ipam().ring().unwrap().total_owned(&n.config().name) > 0);
            }
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
        let mut a = node(1, 1, 11);
        let mut impostor = node(2, 1, 99);
        impostor.cfg.name = name(1);
        let mut net = Net::new(vec![node(3, 1, 13)]);
        net.nodes.push(std::mem::replace(&mut a, node(9, 1, 0)));
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
        assert!(outs
            .iter()
            .any(|o| matches!(o, Output::Send(_, Message::Gossip { .. }))));
        let (again, outs) = net.nodes[0].allocate("c1");
        assert_eq!(again.unwrap(), addr);
        assert!(outs.is_empty(), "repeating an allocation changes nothing");
        assert_eq!(
            net.nodes[1]
                .ipam()
                .ring()
                .unwrap()
                .owner_of(u32::from(addr)),
            Some(&name(1))
        );
    }
}
