//! What the node shows of itself, as typed values. The API turns them into Weave's JSON
//! report, the status pages and the metrics; the core never formats for an audience.

use super::effects::ConnId;
use super::node::Node;
use super::PeerName;
use crate::core::ipam::IpallocInit;
use ipnet::Ipv4Net;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};

/// A peer (this node first) and its connections as this node knows them.
#[derive(Clone, Debug, PartialEq)]
pub struct PeerView {
    pub name: PeerName,
    pub nickname: String,
    /// Random per process start: a restarted peer keeps its name and gets a new uid.
    pub uid: u64,
    /// Where its data plane is reached; `None` for this node itself and for peers whose
    /// address is not known.
    pub data_addr: Option<SocketAddrV4>,
    pub links: Vec<PeerLink>,
}

/// One connection of a peer. For other peers' connections the remote address and the
/// direction are what that peer told (absent if it did not).
#[derive(Clone, Debug, PartialEq)]
pub struct PeerLink {
    pub name: PeerName,
    pub nickname: String,
    pub remote: Option<SocketAddr>,
    pub outbound: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ConnState {
    /// Connected, Hellos not yet exchanged.
    Handshake,
    Established {
        peer: PeerName,
        nickname: String,
    },
}

/// A control connection of this node.
#[derive(Clone, Debug, PartialEq)]
pub struct ConnectionView {
    pub id: ConnId,
    pub remote: SocketAddr,
    pub outbound: bool,
    pub state: ConnState,
}

/// Why allocation can or cannot proceed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum IpamStatus {
    Ready,
    /// Ready, but every address belongs to other peers so far (space comes on demand).
    ReadyOwningNothing,
    /// `consensus=N`: waiting until `quorum` peers agree; `known` are connected (with
    /// this node).
    AwaitingConsensus {
        quorum: usize,
        known: usize,
    },
    /// `seed=...` given, the ring has not been computed or received yet.
    AwaitingRing,
    /// `observer`: no space until a peer's ring arrives.
    Observer,
    /// The last ring received could not be merged (and this node has none).
    RingRefused(String),
    /// Restarted: waits to hear a peer's ring before allocating.
    RestartGate,
    /// Out of space in the wanted subnet; asked peers for some.
    AwaitingSpace,
}

/// One ring entry (a range and its owner).
#[derive(Clone, Debug, PartialEq)]
pub struct RingEntryView {
    pub first: Ipv4Addr,
    pub size: u64,
    pub owner: PeerName,
    pub nickname: String,
    /// The owner is this node or a peer it knows.
    pub known: bool,
    /// The owner is this node or connected to it.
    pub reachable: bool,
    pub version: u32,
    pub free: u64,
}

#[derive(Clone, Debug, PartialEq)]
pub struct IpamView {
    pub status: IpamStatus,
    pub range: Ipv4Net,
    pub max_ips: u64,
    pub active: u64,
    /// The peers the ring was seeded with (empty until the ring exists).
    pub seeds: Vec<PeerName>,
    pub entries: Vec<RingEntryView>,
    /// This node's allocations, by container id.
    pub owned: Vec<(String, Ipv4Addr)>,
    /// The ids among them whose ADD has not confirmed yet.
    pub tentative: Vec<String>,
    /// Claims (container id, address) kept until a ring exists.
    pub pending_claims: Vec<(String, Ipv4Addr)>,
    /// Received rings refused as malformed or conflicting.
    pub bad_gossip: u64,
}

impl Node {
    pub(crate) fn ipam_status(&self) -> IpamStatus {
        if !self.ipam.is_ready() {
            if let Some(e) = &self.gossip.ring_error {
                return IpamStatus::RingRefused(e.clone());
            }
            return match &self.cfg.init {
                IpallocInit::Observer => IpamStatus::Observer,
                IpallocInit::Seed(_) => IpamStatus::AwaitingRing,
                IpallocInit::Consensus(_) => IpamStatus::AwaitingConsensus {
                    quorum: self.quorum(),
                    known: self.established_peers().len() + 1,
                },
            };
        }
        if self.gossip.gated {
            return IpamStatus::RestartGate;
        }
        if self.donation.want.is_some() {
            return IpamStatus::AwaitingSpace;
        }
        match self.ipam.ring() {
            Some(r) if r.total_owned(&self.cfg.name) == 0 => IpamStatus::ReadyOwningNothing,
            _ => IpamStatus::Ready,
        }
    }

    pub fn ipam_view(&self) -> IpamView {
        let mut entries = Vec::new();
        let mut seeds = Vec::new();
        if let Some(ring) = self.ipam.ring() {
            seeds = ring.seeds.clone();
            for (first, last, e) in ring.ranges() {
                entries.push(RingEntryView {
                    first: Ipv4Addr::from(first),
                    size: u64::from(last - first) + 1,
                    owner: e.owner.clone(),
                    nickname: self.nickname_of(&e.owner),
                    known: e.owner == self.cfg.name || self.gossip.peers.contains_key(&e.owner),
                    reachable: self.is_reachable(&e.owner),
                    version: e.version,
                    free: u64::from(e.free),
                });
            }
        }
        let mut owned: Vec<(String, Ipv4Addr)> = self
            .ipam
            .allocations()
            .map(|(id, a)| (id.to_string(), a))
            .collect();
        owned.sort();
        IpamView {
            status: self.ipam_status(),
            range: self.cfg.range,
            max_ips: self.ipam.max_ips(),
            active: self.ipam.active_count(),
            seeds,
            entries,
            owned,
            tentative: self.tentative.keys().cloned().collect(),
            pending_claims: self
                .ipam
                .pending_claims()
                .map(|(id, a)| (id.to_string(), a))
                .collect(),
            bad_gossip: self.counters.bad_gossip,
        }
    }

    /// This node (first) with its own connections, then every peer it knows.
    pub(crate) fn peers_view(&self) -> Vec<PeerView> {
        let own_links = self
            .conns
            .values()
            .filter_map(|c| {
                let (name, _) = c.peer.as_ref()?;
                Some(PeerLink {
                    name: name.clone(),
                    nickname: self.nickname_of(name),
                    remote: Some(c.remote),
                    outbound: c.outbound,
                })
            })
            .collect();
        let mut v = vec![PeerView {
            name: self.cfg.name.clone(),
            nickname: self.cfg.nickname.clone(),
            uid: self.cfg.uid,
            data_addr: None,
            links: own_links,
        }];
        for (name, k) in &self.gossip.peers {
            v.push(PeerView {
                name: name.clone(),
                nickname: k.nickname.clone(),
                uid: k.uid,
                data_addr: k.address.map(|a| SocketAddrV4::new(a, k.data_port)),
                links: k
                    .connections
                    .iter()
                    .map(|n| {
                        let told = k.links.iter().find(|l| &l.name == n);
                        PeerLink {
                            name: n.clone(),
                            nickname: self.nickname_of(n),
                            remote: told.map(|l| l.remote),
                            outbound: told.is_some_and(|l| l.outbound),
                        }
                    })
                    .collect(),
            });
        }
        v
    }

    /// The peer (name, nickname) of an established connection.
    pub fn peer_of_conn(&self, id: ConnId) -> Option<(String, String)> {
        let (name, _) = self.conns.get(&id)?.peer.as_ref()?;
        Some((name.to_string(), self.nickname_of(name)))
    }

    /// Control connections past the handshake or in it.
    pub(crate) fn connections_view(&self) -> Vec<ConnectionView> {
        self.conns
            .iter()
            .map(|(&id, c)| ConnectionView {
                id,
                remote: c.remote,
                outbound: c.outbound,
                state: match &c.peer {
                    Some((name, _)) => ConnState::Established {
                        peer: name.clone(),
                        nickname: self.nickname_of(name),
                    },
                    None => ConnState::Handshake,
                },
            })
            .collect()
    }
}
