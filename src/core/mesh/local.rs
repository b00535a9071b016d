//! Requests from this node's own API: allocate, claim and free addresses, remove a dead
//! peer (rmpeer), re-claim running pods' addresses after a restart. Each answers with its
//! result and the effects: an answer that reports a change may be given only after the
//! effects' save succeeded (the router's interpreter tells).

use super::effects::{Action, Effects, Outbox};
use super::node::Node;
use super::PeerName;
use crate::core::ipam::{IpamError, ReclaimOutcome};
use ipnet::Ipv4Net;
use std::net::{Ipv4Addr, SocketAddrV4};

/// A peer's data-plane endpoint as the control plane knows it.
#[derive(Clone, Debug, PartialEq)]
pub struct PeerEndpoint {
    pub name: PeerName,
    pub nickname: String,
    pub data_addr: Option<SocketAddrV4>,
}

impl Node {
    /// Runs an allocation; on `NotReady` with a ring (no free space of ours) asks a donor.
    fn allocating(
        &mut self,
        id: &str,
        subnet: Ipv4Net,
        tentative: bool,
    ) -> (Result<Ipv4Addr, IpamError>, Effects) {
        let mut out = Outbox::default();
        if self.gossip.gated && self.ipam.lookup(id).is_none() {
            return (Err(IpamError::NotReady), self.finish(out));
        }
        let before = self.ipam.lookup(id);
        let r = self.ipam.allocate_in(id, subnet);
        if r.is_ok() && tentative && (before.is_none() || self.tentative.contains_key(id)) {
            // A repeated ADD while still tentative restarts the wait.
            let expiry = self.ticks + self.cfg.tentative_ticks;
            if self.tentative.insert(id.to_string(), expiry).is_none() {
                self.touch();
            }
        }
        match &r {
            Ok(_) if before.is_none() => self.touch(),
            Err(IpamError::NotReady) if self.ipam.is_ready() => self.want_space(subnet, &mut out),
            _ => {}
        }
        (r, self.finish(out))
    }

    pub fn allocate(&mut self, id: &str) -> (Result<Ipv4Addr, IpamError>, Effects) {
        self.allocating(id, self.cfg.range, false)
    }

    /// An allocation for a requester that confirms it once it has put the address to use
    /// (the CNI plugin, after plumbing the pod): if no [`Node::confirm`] comes within
    /// `TENTATIVE_TICKS`, the address is freed. A requester that gave up (timeout) or was
    /// killed mid-ADD thus leaves nothing held: runtimes never send a DEL for an ADD that
    /// failed on their side. An address already confirmed stays confirmed.
    pub fn allocate_tentative(
        &mut self,
        id: &str,
        subnet: Option<Ipv4Net>,
    ) -> (Result<Ipv4Addr, IpamError>, Effects) {
        self.allocating(id, subnet.unwrap_or(self.cfg.range), true)
    }

    /// The requester finished with the address: it is held until freed.
    pub fn confirm(&mut self, id: &str) -> (Option<Ipv4Addr>, Effects) {
        let addr = self.ipam.lookup(id);
        if self.tentative.remove(id).is_some() {
            self.touch();
        }
        (addr, self.finish(Outbox::default()))
    }

    pub(super) fn expire_tentative(&mut self, out: &mut Outbox) {
        let now = self.ticks;
        let expired: Vec<String> = self
            .tentative
            .iter()
            .filter(|(_, at)| **at <= now)
            .map(|(id, _)| id.clone())
            .collect();
        for id in expired {
            self.tentative.remove(&id);
            if let Some(addr) = self.ipam.free(&id) {
                out.info(format!(
                    "freed {addr} of container {id}: its ADD never confirmed the address (the plugin gave up or was killed)"
                ));
            }
            self.touch();
        }
    }

    pub fn allocate_in(
        &mut self,
        id: &str,
        subnet: Ipv4Net,
    ) -> (Result<Ipv4Addr, IpamError>, Effects) {
        self.allocating(id, subnet, false)
    }

    pub fn claim(&mut self, id: &str, addr: Ipv4Addr) -> (Result<(), IpamError>, Effects) {
        let before = self.ipam.lookup(id);
        let r = self.ipam.claim(id, addr);
        if r.is_ok() && before != Some(addr) {
            self.touch();
        }
        (r, self.finish(Outbox::default()))
    }

    pub fn free(&mut self, id: &str) -> (Option<Ipv4Addr>, Effects) {
        let r = self.ipam.free(id);
        if r.is_some() | self.tentative.remove(id).is_some() {
            self.touch();
        }
        (r, self.finish(Outbox::default()))
    }

    /// `weft rmpeer NAME` / `DELETE /peer/{name}`, and what automatic reclaim in
    /// Kubernetes calls on a Node deletion: hands every range of the dead peer to this one
    /// and tombstones it so that it cannot resurrect them. Refused for this peer itself and
    /// for a peer currently connected. Idempotent; two nodes removing the same peer
    /// concurrently end with one owner (the lower name) once their rings merge.
    pub fn rmpeer(&mut self, name: &PeerName) -> (Result<u64, IpamError>, Effects) {
        let mut out = Outbox::default();
        if name == &self.cfg.name {
            return (Err(IpamError::RemoveSelf(name.clone())), self.finish(out));
        }
        if self.established_peers().contains(name) {
            return (
                Err(IpamError::RemoveConnected(name.clone())),
                self.finish(out),
            );
        }
        let key = self.gossip.sign_keys.get(name).copied();
        let r = self.ipam.rmpeer(name, key);
        if let Ok(n) = &r {
            out.info(format!("removed peer {name}: took over {n} addresses"));
            self.gossip.peers.remove(name);
            // Its key binding goes too: the node may come back reinstalled, with a new key.
            self.gossip.keys.remove(name);
            self.gossip.sign_keys.remove(name);
            self.forget_data_keys(name, &mut out);
            self.touch();
            out.push(Action::RoutesChanged);
            self.push_ring(&mut out, None);
            self.check_want(&mut out);
        }
        (r, self.finish(out))
    }

    /// `weft forget-key NAME`: drops the key `name` is bound to, so that the node with that
    /// name may come back with a new key (it lost its --db-dir) without losing its address
    /// ranges, as rmpeer would make it. Refused while it is connected (its key is proven).
    /// Returns whether a binding was dropped.
    pub fn forget_key(&mut self, name: &PeerName) -> (Result<bool, IpamError>, Effects) {
        let mut out = Outbox::default();
        if self.established_peers().contains(name) {
            return (
                Err(IpamError::RemoveConnected(name.clone())),
                self.finish(out),
            );
        }
        let dropped = self.gossip.keys.remove(name);
        self.gossip.sign_keys.remove(name);
        if let Some(k) = dropped {
            out.info(format!(
                "forgot key {k} of {name}: the next node presenting that name is bound to its key"
            ));
            self.touch();
        }
        (Ok(dropped.is_some()), self.finish(out))
    }

    /// After a restart: re-claims `(container id, address)` pairs found on local pod
    /// interfaces. Addresses in our space are claimed now; without a ring they stay pending
    /// (never handed out meanwhile) until it arrives; one owned by another peer is reported
    /// as a conflict, never taken.
    pub fn reclaim(&mut self, claims: Vec<(String, Ipv4Addr)>) -> (ReclaimOutcome, Effects) {
        let mut out = Outbox::default();
        let r = self.ipam.reclaim(claims);
        for c in &r.conflicts {
            out.warn(c.clone());
        }
        if !r.claimed.is_empty() {
            self.touch();
        }
        (r, self.finish(out))
    }

    /// Ring ranges with their owners and the data addresses of all known peers, for the
    /// route table.
    pub(crate) fn route_inputs(&self) -> (Vec<(u32, u32, PeerName)>, Vec<PeerEndpoint>) {
        let ranges = match self.ipam.ring() {
            Some(r) => r
                .ranges()
                .map(|(first, last, e)| (first, last, e.owner.clone()))
                .collect(),
            None => Vec::new(),
        };
        let peers = self
            .gossip
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
}
