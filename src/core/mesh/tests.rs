//! The node's protocol on a lossless in-memory network, and the ordering of its effects.

use super::effects::Action;
use super::message::{Message, PeerSummary, MAX_SUMMARIES};
use super::secure::PublicKey;
use super::*;
use crate::core::datapath::aead::DataKey;
use crate::core::ipam::paxos::Ballot;
use crate::core::ipam::{IpallocInit, Ipam, IpamError, Ring, Signer};
use ipnet::Ipv4Net;
use std::collections::{BTreeMap, VecDeque};
use std::net::{Ipv4Addr, SocketAddr};

/// The static key of node index `i` in a `Net` (the handshake is not run here: only
/// which key a connection proved matters to the node).
fn key_of(i: usize) -> PublicKey {
    PublicKey([i as u8 + 1; 32])
}

fn name(i: u8) -> PeerName {
    PeerName::from_bytes([2, 0x77, 0x66, 0, 0, i])
}

fn range() -> Ipv4Net {
    "192.168.0.0/16".parse().unwrap()
}

/// Node `i`'s record-signing key.
fn signer(i: u8) -> Signer {
    Signer::from_seed(&[i; 32])
}

fn node(i: u8, consensus: usize, uid: u64) -> Node {
    node_with(i, IpallocInit::Consensus(consensus), uid)
}

fn node_with(i: u8, init: IpallocInit, uid: u64) -> Node {
    let cfg = NodeConfig {
        name: name(i),
        nickname: format!("n{i}"),
        uid,
        control_port: 6783,
        data_port: 6784,
        range: range(),
        init,
        tentative_ticks: crate::core::mesh::TENTATIVE_TICKS,
        data_key_seed: Some(crate::core::mesh::KeySeed([i; 32])),
        signer: signer(i),
    };
    Node::new(cfg, Ipam::new(name(i), range()), Default::default())
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
    /// Every data key change, in order: (node, peer, change).
    keys: Vec<(usize, PeerName, crate::core::mesh::KeyChange)>,
}

impl Net {
    fn new(nodes: Vec<Node>) -> Net {
        let mut n = Net {
            nodes,
            links: BTreeMap::new(),
            queue: VecDeque::new(),
            closed: Vec::new(),
            next: 1,
            keys: Vec::new(),
        };
        for i in 0..n.nodes.len() {
            let fx = n.nodes[i].start();
            n.absorb(i, fx);
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
        let o = self.nodes[a].on_connected(id, Self::addr(b), true, key_of(b));
        self.absorb(a, o);
        let o = self.nodes[b].on_connected(id, Self::addr(a), false, key_of(a));
        self.absorb(b, o);
        id
    }

    /// Saves succeed at once here; then the actions run in their order.
    fn absorb(&mut self, from: usize, fx: Effects) {
        if let Some(s) = &fx.save {
            self.nodes[from].saved(s.generation);
        }
        let actions: Vec<Action> = fx.actions().cloned().collect();
        for o in actions {
            match o {
                Action::Send(id, m) => {
                    if let Some(&(a, b)) = self.links.get(&id) {
                        let to = if from == a { b } else { a };
                        self.queue.push_back((to, id, m));
                    }
                }
                Action::Close(id, why) => {
                    if let Some((a, b)) = self.links.remove(&id) {
                        self.closed.push((from, id, why.clone()));
                        let other = if from == a { b } else { a };
                        let o1 = self.nodes[from].on_closed(id, &why);
                        let o2 = self.nodes[other].on_closed(id, "closed by peer");
                        self.absorb(from, o1);
                        self.absorb(other, o2);
                    }
                }
                Action::DataKey(peer, change) => self.keys.push((from, peer, change)),
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
            let fx = self.nodes[to].on_message(id, m);
            self.absorb(to, fx);
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
        assert!(rings.iter().all(|r| r == &rings[0]), "{rings:#?}");
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
    // It cannot show node 1's key: refused for that before anything else.
    assert!(
        net.closed
            .iter()
            .any(|(_, id, why)| *id == c && why.contains("bound to key")),
        "{:?}",
        net.closed
    );
    assert_eq!(net.nodes[0].counters().key_mismatches, 1);
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
    let fx = n.on_connected(1, Net::addr(0), true, key_of(0));
    let Action::Send(_, hello) = &fx.now[0] else {
        panic!()
    };
    let fx = n.on_message(1, hello.clone());
    assert!(fx.contains(&Action::TargetIsSelf(1)));
    let fx = n.target_is_self();
    assert!(
        fx.contains(&Action::Ready),
        "consensus 2 minus the self target"
    );
}

#[test]
fn messages_before_hello_close_the_connection() {
    let mut n = node(1, 2, 11);
    let _ = n.on_connected(7, Net::addr(1), false, key_of(1));
    let fx = n.on_message(7, Message::HEARTBEAT);
    assert!(matches!(&fx.now[0], Action::Close(7, _)));
}

#[test]
fn allocation_is_persisted_and_gossiped() {
    let mut net = Net::new(vec![node(1, 2, 11), node(2, 2, 12)]);
    net.connect(0, 1);
    net.run();
    let (r, fx) = net.nodes[0].allocate("c1");
    let addr = r.unwrap();
    assert!(
        fx.save.is_some(),
        "an allocation is saved before it is answered"
    );
    net.absorb(0, fx);
    let (again, fx) = net.nodes[0].allocate("c1");
    assert_eq!(again.unwrap(), addr);
    assert_eq!(
        fx,
        Effects::default(),
        "repeating an allocation changes nothing"
    );
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
    let (r, fx) = net.nodes[0].rmpeer(&name(2));
    assert_eq!(r.unwrap(), owned);
    assert!(fx.save.is_some());
    assert!(
        fx.after_save
            .iter()
            .all(|a| matches!(a, Action::Send(_, Message::Gossip { ring: Some(_), .. }))),
        "the ring that takes the dead peer's space over leaves only once saved: {fx:?}"
    );
    net.absorb(0, fx);
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
    assert_eq!(n.ipam_view().pending_claims.len(), 2);
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
    let fx = net.nodes[0].on_message(
        c,
        Message::Gossip {
            peers: Vec::new(),
            ring: Some(bad),
            gated: false,

            answer: false,
        },
    );
    assert!(fx.actions().any(|o| matches!(o, Action::Close(..))));
    assert_eq!(net.nodes[0].counters().bad_gossip, 1);
    assert_eq!(net.nodes[0].ipam().ring().cloned(), before);
}

fn prepare(round: u64, by: u8) -> Message {
    Message::Prepare {
        ballot: Ballot {
            round,
            proposer: name(by),
        },
    }
}

/// A node with one established connection (id 1) to peer `other`, everything saved.
fn connected(me: u8, other: u8, consensus: usize) -> Node {
    let mut n = node(me, consensus, u64::from(me));
    let fx = n.start();
    if let Some(s) = fx.save {
        n.saved(s.generation);
    }
    let _ = n.on_connected(1, Net::addr(1), true, key_of(1));
    let mut peer = node(other, consensus, u64::from(other));
    let fx = peer.on_connected(1, Net::addr(0), false, key_of(0));
    let Action::Send(_, hello) = &fx.now[0] else {
        panic!("hello first")
    };
    let fx = n.on_message(1, hello.clone());
    if let Some(s) = fx.save {
        n.saved(s.generation);
    }
    assert!(n.is_established(1));
    n
}

#[test]
fn a_promise_leaves_only_after_the_promised_state_is_saved() {
    let mut n = connected(1, 2, 3);
    let fx = n.on_message(1, prepare(5, 2));
    let save = fx.save.as_ref().expect("the promise changed the acceptor");
    assert_eq!(save.state.acceptor().max_round(), 5);
    assert!(matches!(
        fx.after_save[..],
        [Action::Send(1, Message::Promise { .. })]
    ));
    assert!(fx.now.iter().all(|a| !matches!(a, Action::Send(..))));
}

#[test]
fn an_unacknowledged_save_is_repeated_and_still_holds_back_what_depends_on_it() {
    let mut n = connected(1, 2, 3);
    // The save of this promise fails (never acknowledged)...
    let first = n.on_message(1, prepare(5, 2));
    let generation = first.save.unwrap().generation;
    assert!(n.has_unsaved_state());
    // ...so a repeated Prepare, which changes nothing, still carries the save: the
    // promise it answers must not leave before the state it states is durable.
    let again = n.on_message(1, prepare(5, 2));
    let save = again.save.expect("unsaved state is saved again");
    assert_eq!(save.generation, generation);
    assert!(matches!(
        again.after_save[..],
        [Action::Send(1, Message::Promise { .. })]
    ));
    // Even a tick carries it, so a disk that recovers catches up without new events.
    assert!(n.on_tick().save.is_some());
    n.saved(generation);
    assert!(!n.has_unsaved_state());
    let fx = n.on_message(1, prepare(5, 2));
    assert!(fx.save.is_none());
    assert!(matches!(
        fx.after_save[..],
        [Action::Send(1, Message::Promise { .. })]
    ));
    // Acknowledging a generation the node never produced changes nothing.
    n.saved(generation + 100);
    let _ = n.on_message(1, prepare(6, 2));
    assert!(n.has_unsaved_state());
}

#[test]
fn an_acceptance_and_a_nack_wait_for_the_save_too() {
    let mut n = connected(1, 2, 3);
    let b = Ballot {
        round: 7,
        proposer: name(2),
    };
    let fx = n.on_message(
        1,
        Message::Accept {
            ballot: b.clone(),
            value: vec![name(1), name(2)],
        },
    );
    assert!(fx.save.is_some());
    assert!(matches!(
        fx.after_save[..],
        [Action::Send(1, Message::Accepted { .. })]
    ));
    let fx = n.on_message(1, prepare(3, 2));
    assert!(matches!(
        fx.after_save[..],
        [Action::Send(1, Message::Nack { .. })]
    ));
}

#[test]
fn a_donation_leaves_only_after_the_donor_saved_it() {
    let mut net = Net::new(vec![
        node(1, 1, 11),
        node_with(2, IpallocInit::Observer, 12),
    ]);
    // Node 1 seeds alone (consensus=1); node 2, an observer, joins and owns nothing.
    let c = net.connect(0, 1);
    net.run();
    assert!(net.nodes[1].ipam().ring().is_some());
    let fx = net.nodes[0].on_message(
        c,
        Message::SpaceRequest {
            subnet: None,
            incarnation: 0,
            signed: None,
        },
    );
    assert!(fx.save.is_some(), "{fx:?}");
    let to_requester: Vec<&Action> = fx
        .after_save
        .iter()
        .filter(
            |a| matches!(a, Action::Send(id, Message::Gossip { ring: Some(_), .. }) if *id == c),
        )
        .collect();
    assert_eq!(to_requester.len(), 1, "{fx:?}");
    assert!(fx.now.iter().all(|a| !matches!(a, Action::Send(..))));
}

#[test]
fn heartbeats_digests_and_hellos_do_not_wait_for_a_save() {
    let mut n = connected(1, 2, 3);
    let _ = n.on_message(1, prepare(5, 2)); // unsaved from here on
    let fx = n.on_tick();
    assert!(fx.save.is_some());
    assert!(fx.now.iter().any(|a| matches!(
        a,
        Action::Send(1, Message::Digest { .. } | Message::Heartbeat { .. })
    )));
    let fx = n.on_connected(2, Net::addr(2), true, key_of(2));
    assert!(matches!(fx.now[..], [Action::Send(2, Message::Hello(_))]));
    assert!(fx.after_save.is_empty());
}

#[test]
fn allocation_answers_wait_for_the_save_and_reclaims_are_saved() {
    let mut n = node(1, 1, 11);
    let fx = n.start();
    n.saved(fx.save.expect("seeded alone").generation);
    let (r, fx) = n.allocate("pod");
    assert!(r.is_ok());
    let save = fx.save.expect("saved before answering");
    assert!(save.state.ipam.allocations.contains_key("pod"));
    n.saved(save.generation);
    let (r, fx) = n.free("pod");
    assert!(r.is_some());
    assert!(fx.save.is_some());
    let ip: Ipv4Addr = "192.168.0.9".parse().unwrap();
    let (r, fx) = n.reclaim(vec![("running".into(), ip)]);
    assert_eq!(r.claimed.len(), 1);
    assert!(fx
        .save
        .unwrap()
        .state
        .ipam
        .allocations
        .contains_key("running"));
}

#[test]
fn nicknames_are_remembered_persisted_and_name_ring_members() {
    let mut net = Net::new(vec![node(1, 2, 11), node(2, 2, 12)]);
    net.connect(0, 1);
    net.run();
    let n = &net.nodes[0];
    assert_eq!(n.peers_named("n2"), vec![name(2)]);
    assert!(n.peers_named("n9").is_empty());
    assert_eq!(n.ring_members(), vec![name(2)]);
    let snap = n.snapshot();
    assert_eq!(snap.nicknames.get(&name(2)).map(String::as_str), Some("n2"));
    assert!(!snap.nicknames.contains_key(&name(1)), "not its own");
    // After a restart the nickname is known before the peer is met again.
    let mut back = node(1, 2, 99);
    back.remember_nicknames(snap.nicknames.clone());
    assert_eq!(back.peers_named("n2"), vec![name(2)]);
    assert_eq!(back.nickname(&name(2)), "n2");
}

#[test]
fn a_stopped_node_cannot_be_impersonated_until_rmpeer_releases_its_name() {
    let mut net = Net::new(vec![node(1, 2, 11), node(2, 2, 12)]);
    let c = net.connect(0, 1);
    net.run();
    assert_eq!(net.nodes[0].bound_key(&name(2)), Some(key_of(1)));
    assert_eq!(
        net.nodes[0].snapshot().keys.get(&name(2)),
        Some(&key_of(1)),
        "the binding is persisted"
    );
    // Node 2 stops.
    net.links.remove(&c);
    let o = net.nodes[0].on_closed(c, "reset");
    net.absorb(0, o);
    // A stranger with node 2's name (and its nickname, uid, everything but its key).
    let mut impostor = node(2, 2, 12);
    impostor.cfg.name = name(2);
    net.nodes.push(impostor);
    let c2 = net.connect(2, 0);
    net.run();
    assert!(
        net.closed
            .iter()
            .any(|(at, id, why)| *at == 0 && *id == c2 && why.contains("bound to key")),
        "{:?}",
        net.closed
    );
    assert!(!net.nodes[0].is_reachable(&name(2)));
    // The operator removes node 2 for good: a reinstalled node 2 (new key) may join.
    let (r, fx) = net.nodes[0].rmpeer(&name(2));
    assert!(r.is_ok(), "{r:?}");
    net.absorb(0, fx);
    assert_eq!(net.nodes[0].bound_key(&name(2)), None);
    let c3 = net.connect(2, 0);
    net.run();
    assert!(
        !net.closed.iter().any(|(_, id, _)| *id == c3),
        "{:?}",
        net.closed
    );
    assert_eq!(net.nodes[0].bound_key(&name(2)), Some(key_of(2)));
}

#[test]
fn gossip_naming_too_many_peers_is_ignored_and_counted() {
    let mut net = Net::new(vec![node(1, 2, 11), node(2, 2, 12)]);
    let c = net.connect(0, 1);
    net.run();
    let peers: Vec<PeerSummary> = (0..MAX_SUMMARIES as u32 + 1)
        .map(|i| PeerSummary {
            name: PeerName::from_bytes([0x0a, 0, (i >> 16) as u8, (i >> 8) as u8, i as u8, 1]),
            nickname: format!("fake{i}"),
            uid: i as u64,
            address: Some(Ipv4Addr::new(10, 200, (i >> 8) as u8, i as u8)),
            control_port: 6783,
            data_port: 6784,
            connections: Vec::new(),
            links: Vec::new(),
            key: None,
        })
        .collect();
    let fx = net.nodes[0].on_message(
        c,
        Message::Gossip {
            peers,
            ring: None,
            gated: false,
            answer: false,
        },
    );
    assert!(
        !fx.actions().any(|a| matches!(a, Action::Dial(_))),
        "nothing dialled"
    );
    assert_eq!(
        net.nodes[0].counters().peers_over_bound,
        MAX_SUMMARIES as u64 + 1
    );
    assert_eq!(net.nodes[0].peers_view().len(), 2, "only the real peers");
}

#[test]
fn a_tentative_allocation_is_freed_unless_confirmed_even_across_a_restart() {
    let mut n = node_with(1, IpallocInit::Seed(vec![name(1)]), 11);
    let _ = n.start();
    let (a, fx) = n.allocate_tentative("abandoned", None);
    let a = a.unwrap();
    assert!(
        fx.save.is_some(),
        "the tentative mark is persisted with the allocation"
    );
    let (b, _) = n.allocate_tentative("finished", None);
    let b = b.unwrap();
    let (confirmed, fx) = n.confirm("finished");
    assert_eq!(confirmed, Some(b));
    assert!(fx.save.is_some());
    let (c, _) = n.allocate("weave-api-user");
    let c = c.unwrap();
    for _ in 0..TENTATIVE_TICKS - 1 {
        let _ = n.on_tick();
    }
    assert_eq!(n.ipam().lookup("abandoned"), Some(a), "not before its time");
    // A restart in between re-arms the wait (the requester may be waiting for us).
    let snap = n.snapshot();
    assert!(snap.tentative.contains("abandoned") && !snap.tentative.contains("finished"));
    let mut back = Node::new(
        n.config().clone(),
        Ipam::restore(name(1), range(), snap.ipam_state()).unwrap(),
        snap.acceptor().clone(),
    );
    back.remember_tentative(snap.tentative.clone());
    for _ in 0..TENTATIVE_TICKS - 1 {
        let _ = back.on_tick();
    }
    assert_eq!(back.ipam().lookup("abandoned"), Some(a));
    let fx = back.on_tick();
    assert_eq!(back.ipam().lookup("abandoned"), None, "expired unconfirmed");
    assert!(fx.save.is_some(), "the free is saved");
    assert_eq!(back.ipam().lookup("finished"), Some(b), "confirmed: kept");
    assert_eq!(
        back.ipam().lookup("weave-api-user"),
        Some(c),
        "Weave's API: kept"
    );
    assert!(back.snapshot().tentative.is_empty());
    // The freed address goes to the next pod.
    let (d, _) = back.allocate_tentative("next", None);
    assert_eq!(d.unwrap(), a);
}

#[test]
fn a_ring_removing_a_live_peer_is_refused_and_counted() {
    let mut net = Net::new(vec![node(1, 3, 11), node(2, 3, 12), node(3, 3, 13)]);
    net.connect(0, 1);
    let c_32 = net.connect(2, 1);
    let c_31 = net.connect(2, 0);
    net.run();
    let (a, fx) = net.nodes[0].allocate("pod-on-n1");
    let a = a.unwrap();
    net.absorb(0, fx);
    net.run();
    // Node 3 turns hostile: it removes node 1 (heir: itself) in a ring of its own making.
    let mut forger = Ipam::restore(name(3), range(), net.nodes[2].ipam().state()).unwrap();
    forger.set_signer(signer(3));
    forger.rmpeer(&name(1), Some(signer(1).public())).unwrap();
    let forged = forger.ring().unwrap().clone();
    assert!(forged.is_removed(&name(1)));
    let ring_before = net.nodes[1].ipam().ring().cloned();
    for (at, conn) in [(1usize, c_32), (0, c_31)] {
        let fx = net.nodes[at].on_message(
            conn,
            Message::Gossip {
                peers: Vec::new(),
                ring: Some(forged.clone()),
                gated: false,
                answer: false,
            },
        );
        assert!(fx.save.is_none(), "node {at} saved something: {fx:?}");
        assert_eq!(net.nodes[at].counters().refused_tombstones, 1, "node {at}");
    }
    assert_eq!(
        net.nodes[1].ipam().ring().cloned(),
        ring_before,
        "node 2's ring unchanged"
    );
    assert!(!net.nodes[0].ipam().ring().unwrap().is_removed(&name(1)));
    assert_eq!(
        net.nodes[0].ipam().lookup("pod-on-n1"),
        Some(a),
        "node 1 keeps its pods"
    );
}

/// The data path's keys of node `i` for `peer` after every change so far: the key it seals
/// with, and the peer's keys it opens with (by slot).
fn data_keys(net: &Net, i: usize, peer: &PeerName) -> (Option<DataKey>, [Option<DataKey>; 2]) {
    use crate::core::mesh::KeyChange;
    let (mut tx, mut rx) = (None, [None, None]);
    for (n, p, c) in &net.keys {
        if *n != i || p != peer {
            continue;
        }
        match c {
            KeyChange::Send(k) => tx = Some(k.clone()),
            KeyChange::Receive(k) => rx[usize::from(k.id & 1)] = Some(k.clone()),
            KeyChange::Forget => (tx, rx) = (None, [None, None]),
        }
    }
    (tx, rx)
}

fn opens(net: &Net, from: usize, to: usize) -> bool {
    let (tx, _) = data_keys(net, from, &name(to as u8));
    let (_, rx) = data_keys(net, to, &name(from as u8));
    tx.is_some_and(|k| rx.contains(&Some(k)))
}

#[test]
fn data_keys_are_exchanged_confirmed_renewed_and_dropped() {
    let mut net = Net::new(vec![node(0, 2, 1), node(1, 2, 2)]);
    let c = net.connect(0, 1);
    net.run();
    assert!(opens(&net, 0, 1) && opens(&net, 1, 0), "{:?}", net.keys);
    // Each side chose its own key; the two directions differ.
    let (k01, _) = data_keys(&net, 0, &name(1));
    let (k10, _) = data_keys(&net, 1, &name(0));
    assert_ne!(k01.as_ref().unwrap().secret, k10.as_ref().unwrap().secret);
    // The receiver installs a key before the sender uses it: in the log, every Send of
    // a key comes after the peer's Receive of it.
    for (at, (n, p, ch)) in net.keys.iter().enumerate() {
        if let crate::core::mesh::KeyChange::Send(k) = ch {
            let peer = net
                .nodes
                .iter()
                .position(|x| &x.config().name == p)
                .unwrap();
            let received = net.keys[..at].iter().any(|(m, q, c)| {
                *m == peer
                    && q == &net.nodes[*n].config().name
                    && c == &crate::core::mesh::KeyChange::Receive(k.clone())
            });
            assert!(received, "key {} used before its receiver had it", k.id);
        }
    }

    // Renewed every REKEY_TICKS, the previous key still opening what is in flight.
    let before = k01.unwrap();
    for _ in 0..super::datakeys::REKEY_TICKS {
        let o = net.nodes[0].on_tick();
        net.absorb(0, o);
        let o = net.nodes[1].on_tick();
        net.absorb(1, o);
        net.run();
    }
    let (after, _) = data_keys(&net, 0, &name(1));
    let after = after.unwrap();
    assert_eq!(after.id, before.id.wrapping_add(1));
    assert_ne!(after.secret, before.secret);
    let (_, peer_rx) = data_keys(&net, 1, &name(0));
    assert!(
        peer_rx.contains(&Some(before.clone())),
        "old key still opens"
    );
    assert!(opens(&net, 0, 1) && opens(&net, 1, 0));

    // A key for another connection's peer cannot be forged: a DataKey is handled only on
    // an established connection, and only for the peer it came from.
    let fx = net.nodes[1].on_message(
        99,
        Message::DataKey {
            id: 7,
            key: "00".repeat(32),
        },
    );
    assert!(!fx.actions().any(|a| matches!(a, Action::DataKey(..))));

    // Malformed: the connection is closed, nothing installed.
    let fx = net.nodes[1].on_message(
        c,
        Message::DataKey {
            id: 9,
            key: "zz".into(),
        },
    );
    assert!(fx.actions().any(|a| matches!(a, Action::Close(..))));
    assert!(!fx.actions().any(|a| matches!(a, Action::DataKey(..))));
    net.absorb(1, fx);
    net.run();

    // Without a connection, the keys go after EXPIRE_TICKS.
    for _ in 0..=super::datakeys::EXPIRE_TICKS {
        let o = net.nodes[0].on_tick();
        net.absorb(0, o);
    }
    assert_eq!(data_keys(&net, 0, &name(1)), (None, [None, None]));
}

#[test]
fn without_a_seed_no_data_keys() {
    let plain = |i: u8| {
        let mut n = node(i, 2, u64::from(i) + 1);
        n.data_keys = None;
        n
    };
    let mut net = Net::new(vec![plain(0), plain(1)]);
    net.connect(0, 1);
    net.run();
    net.tick_all();
    assert!(net.keys.is_empty());
}

#[test]
fn a_digest_flood_gets_one_ring_per_tick() {
    let mut net = Net::new(vec![node(0, 2, 1), node(1, 2, 2)]);
    let c = net.connect(0, 1);
    net.run();
    net.tick_all();
    assert!(net.nodes[0].ipam().ring().is_some());
    let rings = |fx: &Effects| {
        fx.sends()
            .filter(|(_, m)| matches!(m, Message::Gossip { ring: Some(_), .. }))
            .count()
    };
    let flood = |n: &mut Node| -> usize {
        (0..1000)
            .map(|i| rings(&n.on_message(c, Message::Digest { ring: Some(i) })))
            .sum()
    };
    assert_eq!(flood(&mut net.nodes[0]), 1, "one answer in this tick");
    let _ = net.nodes[0].on_tick();
    assert_eq!(flood(&mut net.nodes[0]), 1, "and one in the next");
}

/// A removal is believed only as its remover's word: a ring removing a peer that is not
/// connected to the receiver (the live-peer rule cannot tell) in the name of another
/// member is refused, whether unsigned or signed with the forger's own key, and changes
/// nothing; the same removal signed by that member is taken.
#[test]
fn a_removal_not_signed_by_its_remover_is_refused_and_counted() {
    let mut net = Net::new(vec![node(1, 3, 11), node(2, 3, 12), node(3, 3, 13)]);
    net.connect(0, 1);
    let c_32 = net.connect(2, 1);
    net.connect(2, 0);
    net.run();
    // Node 1 goes away (its connections close); node 2 no longer sees it alive.
    let gone: Vec<ConnId> = net
        .links
        .iter()
        .filter(|(_, &(a, b))| a == 0 || b == 0)
        .map(|(&id, _)| id)
        .collect();
    for id in gone {
        let (a, b) = net.links.remove(&id).unwrap();
        for x in [a, b] {
            let fx = net.nodes[x].on_closed(id, "gone");
            net.absorb(x, fx);
        }
    }
    net.run();
    let state = net.nodes[1].ipam().state();
    let removal_by = |by: u8, key: Option<Signer>| {
        let mut r = Ipam::restore(name(by), range(), state.clone()).unwrap();
        if let Some(k) = key {
            r.set_signer(k);
        }
        r.rmpeer(&name(1), Some(signer(1).public())).unwrap();
        r.ring().unwrap().clone()
    };
    let gossip = |ring: Ring| Message::Gossip {
        peers: Vec::new(),
        ring: Some(ring),
        gated: false,
        answer: false,
    };
    let before = net.nodes[1].ipam().ring().cloned();
    // Removals of node 1 in node 3's name that node 3 did not sign: unsigned, and signed
    // with a stranger's key (node 2 has node 3's key from its Hello).
    for forged in [removal_by(3, None), removal_by(3, Some(signer(9)))] {
        let fx = net.nodes[1].on_message(c_32, gossip(forged));
        assert!(fx.save.is_none(), "a forged removal was merged: {fx:?}");
    }
    assert_eq!(net.nodes[1].counters().forged_records, 2);
    assert_eq!(
        net.nodes[1].ipam().ring().cloned(),
        before,
        "nothing changed"
    );
    let fx = net.nodes[1].on_message(c_32, gossip(removal_by(3, Some(signer(3)))));
    assert!(
        fx.save.is_some(),
        "node 3's own removal was not taken: {fx:?}"
    );
    assert!(net.nodes[1].ipam().ring().unwrap().is_removed(&name(1)));
    assert_eq!(net.nodes[1].counters().forged_records, 2);
}

/// Entries change only by their owners' word: a member that gives itself another
/// member's entry (as a gift in the owner's name, or as a takeover without a removal),
/// or rewrites another member's entry state, sends a ring that is refused and counted,
/// and nothing changes.
#[test]
fn a_ring_changing_another_members_entry_is_refused_and_counted() {
    use crate::core::ipam::ring::Deed;
    let mut net = Net::new(vec![node(1, 3, 11), node(2, 3, 12), node(3, 3, 13)]);
    net.connect(0, 1);
    let c_31 = net.connect(2, 0);
    net.connect(2, 1);
    net.run();
    let honest = net.nodes[2].ipam().ring().unwrap().clone();
    let range = honest.range;
    let victim = honest
        .entries
        .iter()
        .position(|e| e.owner == name(2))
        .expect("node 2 owns an entry");
    let end = honest
        .entries
        .get(victim + 1)
        .map_or(u64::from(u32::from(range.broadcast())) + 1, |e| {
            u64::from(e.start)
        });
    let hostile = signer(3);
    let forge = |takeover: bool, sign_as_owner: bool| {
        let mut r = honest.clone();
        let e = &mut r.entries[victim];
        let mut d = Deed {
            n: e.deeds.len() as u32,
            era: e.era + if takeover { 2 } else { 1 },
            to: name(3),
            inc: 0,
            takeover,
            start: e.start,
            end,
            signed: None,
        };
        d.signed = Some(hostile.sign(&d.message(range)));
        let mut deeds = e.deeds.to_vec();
        deeds.push(d);
        e.deeds = deeds.into();
        e.era += if takeover { 2 } else { 1 };
        e.owner = name(3);
        e.version = 1;
        if sign_as_owner {
            e.signed = Some(hostile.sign(&e.message(range)));
        }
        r
    };
    let mut rewritten = honest.clone();
    let e = &mut rewritten.entries[victim];
    e.version += 7;
    e.free = 0;
    e.signed = Some(hostile.sign(&e.message(range)));
    let before = net.nodes[0].ipam().ring().cloned();
    for (k, forged) in [forge(false, true), forge(true, true), rewritten]
        .into_iter()
        .enumerate()
    {
        let fx = net.nodes[0].on_message(
            c_31,
            Message::Gossip {
                peers: Vec::new(),
                ring: Some(forged),
                gated: false,
                answer: false,
            },
        );
        assert!(fx.save.is_none(), "forgery {k} was merged: {fx:?}");
        assert_eq!(net.nodes[0].counters().forged_records, k as u64 + 1);
    }
    assert_eq!(
        net.nodes[0].ipam().ring().cloned(),
        before,
        "nothing changed"
    );
    // The same gift signed by its owner is a real one, and is taken.
    let mut gift = forge(false, true);
    let e = &mut gift.entries[victim];
    let mut deeds = e.deeds.to_vec();
    let d = deeds.last_mut().unwrap();
    d.signed = Some(signer(2).sign(&d.message(range)));
    e.deeds = deeds.into();
    let fx = net.nodes[0].on_message(
        c_31,
        Message::Gossip {
            peers: Vec::new(),
            ring: Some(gift),
            gated: false,
            answer: false,
        },
    );
    assert!(fx.save.is_some(), "the owner's gift was not taken: {fx:?}");
    assert_eq!(net.nodes[0].counters().forged_records, 3);
    assert_eq!(
        net.nodes[0].ipam().ring().unwrap().entries[victim].owner,
        name(3)
    );
}

#[test]
fn two_nodes_in_their_restart_gates_do_not_vouch_for_each_other() {
    let mut net = Net::new(vec![node(1, 3, 11), node(2, 3, 12), node(3, 3, 13)]);
    net.connect(0, 1);
    let c_32 = net.connect(2, 1);
    net.connect(2, 0);
    net.run();
    let mut remover = Ipam::restore(name(3), range(), net.nodes[2].ipam().state()).unwrap();
    remover.set_signer(signer(3));
    remover.rmpeer(&name(1), Some(signer(1).public())).unwrap();
    let removal = remover.ring().unwrap().clone();
    let gossip = |ring: Ring| Message::Gossip {
        peers: Vec::new(),
        ring: Some(ring),
        gated: false,
        answer: false,
    };
    // Past its gate, node 2 refuses the removal of node 1, which is connected to it.
    let _ = net.nodes[1].on_message(c_32, gossip(removal.clone()));
    assert_eq!(net.nodes[1].counters().refused_tombstones, 1);
    // Both just restarted (node 1 says so in its gossip): they may both have been
    // removed while they were down, so node 2 takes the removal.
    net.nodes[1].gossip.gated = true;
    let c_21 = *net
        .links
        .iter()
        .find(|(_, &(a, b))| (a, b) == (0, 1))
        .unwrap()
        .0;
    let _ = net.nodes[1].on_message(
        c_21,
        Message::Gossip {
            peers: Vec::new(),
            ring: None,
            gated: true,
            answer: false,
        },
    );
    let fx = net.nodes[1].on_message(c_32, gossip(removal));
    assert_eq!(net.nodes[1].counters().refused_tombstones, 1);
    assert!(fx.save.is_some(), "the removal was merged");
    assert!(net.nodes[1].ipam().ring().unwrap().is_removed(&name(1)));
}

#[test]
fn a_heartbeat_probe_is_echoed_at_once_and_every_neighbour_is_probed() {
    let mut n = connected(1, 2, 3);
    let fx = n.on_message(
        1,
        Message::Heartbeat {
            probe: Some(7),
            echo: None,
        },
    );
    assert!(fx.now.iter().any(|a| matches!(
        a,
        Action::Send(
            1,
            Message::Heartbeat {
                probe: None,
                echo: Some(7)
            }
        )
    )));
    // An echo asks for nothing back (no ping-pong).
    let fx = n.on_message(
        1,
        Message::Heartbeat {
            probe: None,
            echo: Some(7),
        },
    );
    assert!(!fx
        .now
        .iter()
        .any(|a| matches!(a, Action::Send(_, Message::Heartbeat { .. }))));
    // The only neighbour is also the digest's target, and is probed all the same.
    let fx = n.on_tick();
    assert!(fx.now.iter().any(|a| matches!(
        a,
        Action::Send(1, Message::Heartbeat { probe: Some(_), .. })
    )));
}

#[test]
fn gossiped_peers_show_their_connections_address_and_direction() {
    // n1 - n2 - n3: n1 learns n3's link to n2 only from n3's summary, relayed by n2.
    let mut net = Net::new(vec![node(1, 3, 11), node(2, 3, 12), node(3, 3, 13)]);
    net.connect(0, 1);
    net.connect(2, 1);
    net.run();
    // No tick has passed: n2 announced its new connection to n1 when it was made.
    let view = net.nodes[0].peers_view();
    let n2 = view.iter().find(|p| p.name == name(2)).expect("n2 known");
    let to_n3 = n2
        .links
        .iter()
        .find(|l| l.name == name(3))
        .expect("n2's link to n3");
    // n3 dialled n2, so n2 sees it inbound, at n3's address.
    assert_eq!(to_n3.remote, Some(Net::addr(2)));
    assert!(!to_n3.outbound);
    let to_n1 = n2.links.iter().find(|l| l.name == name(1)).unwrap();
    assert_eq!(to_n1.remote, Some(Net::addr(0)));
    assert!(!to_n1.outbound);
}
