//! What a Linux VXLAN device needs so that the kernel forwards exactly as the user-space
//! path does (`--datapath kernel`, Weave's fastdp counterpart): the same ranges to the
//! same peers, the same VNI and port, and the same inner MAC scheme (a frame to a peer
//! carries the peer's name as destination MAC), so that kernel and user-space nodes
//! exchange datagrams in one cluster.
//!
//! The kernel routes IP, then resolves a next hop to a MAC, then the VXLAN device looks
//! the MAC up in its forwarding database to find the underlay destination. So for every
//! peer range this plans:
//! - routes for the range, split into CIDR blocks, each `via <gateway> dev weave onlink`;
//! - a permanent neighbour entry `<gateway> lladdr <peer's MAC>`, where the gateway is the
//!   block's own first address: it belongs to the same peer, so even a packet to that very
//!   address goes where it must, and no address outside the ring is needed (as flannel
//!   does);
//! - a forwarding entry `<peer's MAC> dst <peer's underlay IP> port <its data port>`.
//!
//! Ranges whose owner's underlay address is not known, and this node's own ranges (its
//! pods have /32 routes through their veths, which are more specific), get `unreachable`
//! routes: the sender gets an ICMP error at once, as from the user-space path's drop,
//! instead of an ARP query into the overlay that nobody answers.
//!
//! [`KernelPlan::diff`] turns the installed plan and the wanted one into the netlink
//! changes, ordered so that a route never points at a neighbour that is not there yet.

use crate::core::route::{RouteView, Via};
use ipnet::{Ipv4Net, Ipv4Subnets};
use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddrV4};

/// Where the kernel sends packets to one CIDR block.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum KernelRoute {
    /// `via gateway dev weave onlink`: the gateway's neighbour entry holds the owner's MAC.
    Peer { gateway: Ipv4Addr },
    /// `unreachable`: not to be forwarded into the overlay.
    Unreachable,
}

/// The VXLAN device's wanted state: forwarding database, neighbours and routes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KernelPlan {
    /// Peer MAC -> its data endpoint (underlay IP and UDP port).
    pub fdb: BTreeMap<[u8; 6], SocketAddrV4>,
    /// Gateway address -> peer MAC.
    pub neighbours: BTreeMap<Ipv4Addr, [u8; 6]>,
    pub routes: BTreeMap<Ipv4Net, KernelRoute>,
}

/// One netlink change, in the order [`KernelPlan::diff`] gives it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelChange {
    SetFdb([u8; 6], SocketAddrV4),
    SetNeighbour(Ipv4Addr, [u8; 6]),
    SetRoute(Ipv4Net, KernelRoute),
    DelRoute(Ipv4Net, KernelRoute),
    DelNeighbour(Ipv4Addr, [u8; 6]),
    DelFdb([u8; 6], SocketAddrV4),
}

impl KernelPlan {
    /// The plan for a route table's ranges (as [`crate::core::route::RouteTable::routes`]
    /// gives them, with the owner's data endpoint where known).
    pub fn from_routes(routes: &[RouteView]) -> KernelPlan {
        let mut plan = KernelPlan::default();
        for r in routes {
            let blocks = Ipv4Subnets::new(r.first, r.last, 0);
            match r.via {
                Via::Peer(endpoint) => {
                    let mac = r.owner.mac();
                    plan.fdb.insert(mac, endpoint);
                    for block in blocks {
                        let gateway = block.network();
                        plan.neighbours.insert(gateway, mac);
                        plan.routes.insert(block, KernelRoute::Peer { gateway });
                    }
                }
                Via::Local | Via::Unreachable => {
                    for block in blocks {
                        plan.routes.insert(block, KernelRoute::Unreachable);
                    }
                }
            }
        }
        plan
    }

    /// The changes that turn `self` (installed) into `wanted`: additions and
    /// replacements first (forwarding entries, then neighbours, then routes), then
    /// removals in the reverse order, so no route is ever left pointing at a missing
    /// neighbour or MAC.
    pub fn diff(&self, wanted: &KernelPlan) -> Vec<KernelChange> {
        let mut out = Vec::new();
        for (mac, ep) in &wanted.fdb {
            if self.fdb.get(mac) != Some(ep) {
                out.push(KernelChange::SetFdb(*mac, *ep));
            }
        }
        for (gw, mac) in &wanted.neighbours {
            if self.neighbours.get(gw) != Some(mac) {
                out.push(KernelChange::SetNeighbour(*gw, *mac));
            }
        }
        for (net, route) in &wanted.routes {
            if self.routes.get(net) != Some(route) {
                out.push(KernelChange::SetRoute(*net, *route));
            }
        }
        for (net, route) in &self.routes {
            if !wanted.routes.contains_key(net) {
                out.push(KernelChange::DelRoute(*net, *route));
            }
        }
        for (gw, mac) in &self.neighbours {
            if !wanted.neighbours.contains_key(gw) {
                out.push(KernelChange::DelNeighbour(*gw, *mac));
            }
        }
        for (mac, ep) in &self.fdb {
            if !wanted.fdb.contains_key(mac) {
                out.push(KernelChange::DelFdb(*mac, *ep));
            }
        }
        out
    }

    /// Records one change as done.
    pub fn apply(&mut self, change: &KernelChange) {
        match *change {
            KernelChange::SetFdb(mac, ep) => {
                self.fdb.insert(mac, ep);
            }
            KernelChange::SetNeighbour(gw, mac) => {
                self.neighbours.insert(gw, mac);
            }
            KernelChange::SetRoute(net, route) => {
                self.routes.insert(net, route);
            }
            KernelChange::DelRoute(net, _) => {
                self.routes.remove(&net);
            }
            KernelChange::DelNeighbour(gw, _) => {
                self.neighbours.remove(&gw);
            }
            KernelChange::DelFdb(mac, _) => {
                self.fdb.remove(&mac);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::mesh::PeerName;
    use proptest::prelude::*;

    fn name(i: u8) -> PeerName {
        PeerName::from_bytes([2, 0x77, 0x66, 0, 0, i])
    }

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    fn view(first: &str, last: &str, owner: u8, via: Via) -> RouteView {
        RouteView {
            first: ip(first),
            last: ip(last),
            owner: name(owner),
            nickname: String::new(),
            via,
        }
    }

    fn ep(s: &str) -> SocketAddrV4 {
        s.parse().unwrap()
    }

    #[test]
    fn a_peer_range_becomes_blocks_via_its_first_address_and_one_mac_entry() {
        // 10.32.0.0..=10.32.0.191 is a /25 and a /26.
        let plan = KernelPlan::from_routes(&[
            view(
                "10.32.0.0",
                "10.32.0.191",
                2,
                Via::Peer(ep("10.99.0.2:6784")),
            ),
            view("10.32.0.192", "10.32.0.255", 1, Via::Local),
            view("10.32.1.0", "10.32.1.0", 3, Via::Unreachable),
        ]);
        assert_eq!(plan.fdb.len(), 1);
        assert_eq!(plan.fdb[&name(2).mac()], ep("10.99.0.2:6784"));
        let routes: Vec<(String, KernelRoute)> = plan
            .routes
            .iter()
            .map(|(n, r)| (n.to_string(), *r))
            .collect();
        assert_eq!(
            routes,
            vec![
                (
                    "10.32.0.0/25".into(),
                    KernelRoute::Peer {
                        gateway: ip("10.32.0.0")
                    }
                ),
                (
                    "10.32.0.128/26".into(),
                    KernelRoute::Peer {
                        gateway: ip("10.32.0.128")
                    }
                ),
                ("10.32.0.192/26".into(), KernelRoute::Unreachable),
                ("10.32.1.0/32".into(), KernelRoute::Unreachable),
            ]
        );
        assert_eq!(plan.neighbours[&ip("10.32.0.0")], name(2).mac());
        assert_eq!(plan.neighbours[&ip("10.32.0.128")], name(2).mac());
        assert_eq!(plan.neighbours.len(), 2);
    }

    #[test]
    fn diff_adds_before_it_routes_and_removes_routes_before_their_neighbours() {
        let before = KernelPlan::from_routes(&[view(
            "10.32.0.0",
            "10.32.0.255",
            2,
            Via::Peer(ep("10.99.0.2:6784")),
        )]);
        // Peer 2 left; its range went to peer 3.
        let after = KernelPlan::from_routes(&[view(
            "10.32.0.0",
            "10.32.0.255",
            3,
            Via::Peer(ep("10.99.0.3:6784")),
        )]);
        let changes = before.diff(&after);
        assert_eq!(
            changes,
            vec![
                KernelChange::SetFdb(name(3).mac(), ep("10.99.0.3:6784")),
                KernelChange::SetNeighbour(ip("10.32.0.0"), name(3).mac()),
                KernelChange::DelFdb(name(2).mac(), ep("10.99.0.2:6784")),
            ],
            "the route itself is unchanged: its gateway's MAC is replaced"
        );
        assert!(after.diff(&after).is_empty());
    }

    fn arb_ranges() -> impl Strategy<Value = Vec<RouteView>> {
        // Disjoint ranges over 10.32.0.0/16, as a ring gives them.
        prop::collection::vec((1u32..300, 0u8..4, 0u8..3), 1..12).prop_map(|parts| {
            let mut at = u32::from(ip("10.32.0.0"));
            parts
                .into_iter()
                .map(|(len, owner, via)| {
                    let first = at;
                    at += len;
                    let via = match via {
                        0 => Via::Local,
                        1 => Via::Unreachable,
                        _ => Via::Peer(SocketAddrV4::new(Ipv4Addr::new(10, 99, 0, owner), 6784)),
                    };
                    RouteView {
                        first: first.into(),
                        last: (at - 1).into(),
                        owner: name(owner),
                        nickname: String::new(),
                        via,
                    }
                })
                .collect()
        })
    }

    proptest! {
        /// Every address of every range is covered by exactly one block, which sends it
        /// where the range says; applying a diff gives exactly the wanted plan.
        #[test]
        fn blocks_cover_each_range_exactly_and_diffs_converge(
            a in arb_ranges(),
            b in arb_ranges(),
        ) {
            let plan = KernelPlan::from_routes(&a);
            for r in &a {
                for addr in [u32::from(r.first), (u32::from(r.first) + u32::from(r.last)) / 2, u32::from(r.last)] {
                    let addr = Ipv4Addr::from(addr);
                    let hits: Vec<_> = plan.routes.iter().filter(|(n, _)| n.contains(&addr)).collect();
                    prop_assert_eq!(hits.len(), 1);
                    let (_, route) = hits[0];
                    match (r.via, route) {
                        (Via::Peer(e), KernelRoute::Peer { gateway }) => {
                            let mac = plan.neighbours[gateway];
                            prop_assert_eq!(mac, r.owner.mac());
                            prop_assert_eq!(plan.fdb[&mac], e);
                        }
                        (Via::Local | Via::Unreachable, KernelRoute::Unreachable) => {}
                        other => prop_assert!(false, "{:?}", other),
                    }
                }
            }
            let wanted = KernelPlan::from_routes(&b);
            let mut installed = plan.clone();
            for c in plan.diff(&wanted) {
                installed.apply(&c);
            }
            prop_assert_eq!(installed, wanted);
        }
    }
}
