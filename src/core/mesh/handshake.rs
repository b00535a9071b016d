//! The handshake: every connection starts with a Hello both ways, and the node decides
//! here whether the peer may join: the same protocol and range, a name that is not this
//! node's own, and not a second live node under a name already connected. Two connections
//! between the same pair (both sides dialled) keep one, the same one on both sides.

use super::effects::{Action, ConnId, Outbox};
use super::gossip::KnownPeer;
use super::message::{Hello, Message, PROTOCOL, PROTOCOL_VERSION};
use super::node::{Conn, Node};
use std::net::{SocketAddr, SocketAddrV4};

impl Node {
    pub(super) fn hello(&self) -> Message {
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
            gated: self.gossip.gated,
            sign_key: Some(self.cfg.signer.public()),
        })
    }

    /// Refuses the connection with a warning an operator can act on.
    fn refuse(&mut self, id: ConnId, why: String, out: &mut Outbox) {
        out.warn(why.clone());
        out.close(id, why);
    }

    pub(super) fn on_hello(&mut self, id: ConnId, conn: &Conn, h: Hello, out: &mut Outbox) {
        if h.protocol != PROTOCOL || h.version != PROTOCOL_VERSION {
            let why = format!(
                "peer at {} speaks {} v{}, this node speaks {PROTOCOL} v{PROTOCOL_VERSION}",
                conn.remote, h.protocol, h.version
            );
            return self.refuse(id, why, out);
        }
        if h.range != self.cfg.range.to_string() {
            let why = format!(
                "peer {}({}) at {} uses IP range {}, this node uses {}: IPALLOC_RANGE must be the same on every node",
                h.name, h.nickname, conn.remote, h.range, self.cfg.range
            );
            return self.refuse(id, why, out);
        }
        if h.name == self.cfg.name {
            if h.uid == self.cfg.uid {
                out.push(Action::TargetIsSelf(id));
                return out.close(id, "connection to self");
            }
            let why = format!(
                "refusing peer at {}: it presents this node's own name {} (nickname {}); two nodes must never share a name (cloned /etc/machine-id?): give one of them a different --name",
                conn.remote, h.name, h.nickname
            );
            return self.refuse(id, why, out);
        }
        if !self.check_key(id, conn, &h, out) {
            return;
        }
        if !self.settle_duplicate(id, conn, &h, out) {
            return;
        }
        self.admit(id, conn, h, out);
    }

    /// A name is bound to the key its node proved first; a Hello under that name with
    /// another key is refused, so a stopped node cannot be impersonated. A peer removed
    /// from the ring (rmpeer) may come back with a new key. Returns whether `id` may go on.
    fn check_key(&mut self, id: ConnId, conn: &Conn, h: &Hello, out: &mut Outbox) -> bool {
        let removed = self.ipam.ring().is_some_and(|r| r.is_removed(&h.name));
        match self.gossip.keys.get(&h.name) {
            Some(bound) if *bound != conn.key && !removed => {
                self.counters.key_mismatches += 1;
                let why = format!(
                    "refusing peer at {}: it presents the name {}({}) with key {}, but that name is bound to key {} since first contact. If {} lost its --db-dir (a reinstall), remove it with `weft rmpeer {}` on a member first",
                    conn.remote, h.name, h.nickname, conn.key, bound, h.name, h.name
                );
                self.refuse(id, why, out);
                false
            }
            Some(bound) if *bound == conn.key => {
                self.bind_sign_key(h);
                true
            }
            _ => {
                self.gossip.keys.insert(h.name.clone(), conn.key);
                self.bind_sign_key(h);
                self.touch();
                true
            }
        }
    }

    /// The record-signing key a peer presents in its Hello is its word over the channel
    /// its static key authenticated: it replaces a binding learnt second-hand (from a
    /// record a member relayed), which may have been wrong.
    fn bind_sign_key(&mut self, h: &Hello) {
        if let Some(k) = h.sign_key {
            if self.gossip.sign_keys.get(&h.name) != Some(&k) {
                self.gossip.sign_keys.insert(h.name.clone(), k);
                self.touch();
            }
        }
    }

    /// Another connection already carries this name: decides which one stays. Returns
    /// whether the new connection `id` may continue.
    fn settle_duplicate(&mut self, id: ConnId, conn: &Conn, h: &Hello, out: &mut Outbox) -> bool {
        let Some((&other_id, other)) = self
            .conns
            .iter()
            .find(|(cid, c)| **cid != id && c.peer.as_ref().map(|p| &p.0) == Some(&h.name))
        else {
            return true;
        };
        let other = other.clone();
        let other_uid = other.peer.as_ref().map(|p| p.1).unwrap_or_default();
        if other_uid == h.uid {
            // Both sides dialled each other. Keep, on both sides, the connection initiated
            // by the peer with the lower name.
            let initiator = |c: &Conn| if c.outbound { &self.cfg.name } else { &h.name };
            if initiator(conn) < initiator(&other) {
                out.close(other_id, "duplicate connection");
                self.conns.remove(&other_id);
                true
            } else {
                out.close(id, "duplicate connection");
                false
            }
        } else if other.remote.ip() == conn.remote.ip() {
            out.info(format!(
                "peer {}({}) at {} restarted",
                h.name, h.nickname, conn.remote
            ));
            out.close(other_id, "peer restarted");
            self.conns.remove(&other_id);
            self.terminations += 1;
            true
        } else {
            let why = format!(
                "refusing peer {}({}) at {}: that name is already used by the peer at {}; two nodes must never share a name (cloned /etc/machine-id?): give one of them a different --name",
                h.name,
                h.nickname,
                conn.remote.ip(),
                other.remote.ip()
            );
            self.refuse(id, why, out);
            false
        }
    }

    /// The peer is in: record it, tell it whom we know and our ring if it differs, and
    /// repeat a consensus phase it may have missed.
    fn admit(&mut self, id: ConnId, conn: &Conn, h: Hello, out: &mut Outbox) {
        if let Some(c) = self.conns.get_mut(&id) {
            c.peer = Some((h.name.clone(), h.uid));
            c.peer_gated = h.gated;
        }
        self.learn_nickname(&h.name, &h.nickname);
        let address = match conn.remote {
            SocketAddr::V4(a) => Some(*a.ip()),
            SocketAddr::V6(a) => a.ip().to_ipv4_mapped(),
        };
        self.gossip.peers.insert(
            h.name.clone(),
            KnownPeer {
                nickname: h.nickname.clone(),
                uid: h.uid,
                address,
                control_port: h.control_port,
                data_port: h.data_port,
                connections: Vec::new(),
                links: Vec::new(),
                key: Some(conn.key),
            },
        );
        if let Some(a) = address {
            self.gossip
                .dialled
                .insert(SocketAddrV4::new(a, h.control_port));
        }
        out.info(format!(
            "connection established with {}({}) at {}",
            h.name, h.nickname, conn.remote
        ));
        out.push(Action::RoutesChanged);
        // A new connection may mean a restarted peer, which lost the keys it had.
        self.offer_data_key(id, &h.name, out);
        self.greet(id, h.digest, h.gated, out);
        self.repeat_phase(id, out);
        self.maybe_propose(out);
    }
}
