//! Builds the [`Report`] (Weave's JSON keys and strings) from the typed views the core and
//! the data path give. The status pages and the metrics are rendered from the report, so
//! this is the one place where the daemon's state becomes text for operators.

use super::report::{
    BroadcastRouteReport, ClaimReport, ConnectionAttrs, ConnectionReport, DataplaneReport,
    DropReport, IpamReport, OverlayDiagnostics, OwnedReport, PaxosReport, PeerConnectionReport,
    PeerReport, PeerTrafficReport, RefusedReport, Report, RingEntryReport, RouteReport,
    RouterReport, UnicastRouteReport, VersionCheckReport,
};
use crate::core::mesh::message::{PROTOCOL, PROTOCOL_VERSION};
use crate::core::mesh::view::{ConnState, ConnectionView, IpamStatus, IpamView, PeerView};
use crate::core::mesh::PeerName;
use crate::core::route::Via;
use crate::datapath::DatapathView;
use ipnet::Ipv4Net;

/// What the router knows of itself beyond the node's views.
#[derive(Clone, Debug)]
pub struct RouterFacts {
    pub name: PeerName,
    pub nickname: String,
    pub port: u16,
    pub data_port: u16,
    pub interface: String,
    pub mtu: u32,
    pub overlay_address: Option<Ipv4Net>,
    /// The targets the router dials (from its peer sources), as `host:port`.
    pub targets: Vec<String>,
    /// WEAVE_PASSWORD is set.
    pub password: bool,
    /// The data plane seals every datagram (with the password, always).
    pub encrypted: bool,
    /// The data path's name in connection lines, as Weave named its own: `vxlan` (weft's
    /// user-space path) or `fastdp` (the kernel's VXLAN device, `--datapath kernel`).
    pub datapath: &'static str,
}

/// A dial target that has no established connection of its own.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PendingTarget {
    /// `host:port`.
    pub target: String,
    pub state: PendingState,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PendingState {
    Connecting,
    /// The last attempt failed for this reason; another follows after a backoff.
    Retrying(String),
}

/// Everything a report is made from.
#[derive(Clone, Debug)]
pub struct Sources {
    pub ready: bool,
    pub router: RouterFacts,
    pub peers: Vec<PeerView>,
    pub connections: Vec<ConnectionView>,
    pub pending_targets: Vec<PendingTarget>,
    pub terminations: u64,
    pub refused: RefusedReport,
    pub ipam: IpamView,
    /// Container ids of allocation requests waiting for IPAM right now.
    pub pending_allocates: Vec<String>,
    pub bad_requests: u64,
    pub datapath: DatapathView,
}

/// The status line of `weft status ipam` and the report's `IPAM.Status`.
pub fn ipam_status_text(s: &IpamStatus) -> String {
    match s {
        IpamStatus::Ready => "ready".into(),
        IpamStatus::ReadyOwningNothing => "ready (this peer owns no addresses yet)".into(),
        IpamStatus::AwaitingConsensus { quorum, known } => {
            format!("awaiting consensus (quorum: {quorum}, known: {known})")
        }
        IpamStatus::AwaitingRing => "waiting for the ring".into(),
        IpamStatus::Observer => "observer: waiting for the ring from a peer".into(),
        IpamStatus::RingRefused(why) => why.clone(),
        IpamStatus::RestartGate => {
            "restarted: waiting to hear the ring from a peer before allocating".into()
        }
        IpamStatus::AwaitingSpace => "waiting for IP range grant from peers".into(),
    }
}

/// Weave's `UnicastRoutes` and `BroadcastRoutes` over the control mesh: the next hop to
/// every peer on a shortest path of established connections (breadth first, neighbours in
/// name order, so the answer is stable), and this node's broadcast fan-out (its direct
/// neighbours: gossip goes to each of them).
fn control_routes(
    me: &PeerName,
    peers: &[PeerView],
) -> (Vec<UnicastRouteReport>, Vec<BroadcastRouteReport>) {
    use std::collections::{BTreeMap, BTreeSet, VecDeque};
    let mut adj: BTreeMap<&PeerName, BTreeSet<&PeerName>> = BTreeMap::new();
    for p in peers {
        for l in &p.links {
            // A connection counts once either end reports it: the other end's summary may
            // not have arrived yet.
            adj.entry(&p.name).or_default().insert(&l.name);
            adj.entry(&l.name).or_default().insert(&p.name);
        }
    }
    let mut via: BTreeMap<&PeerName, Option<&PeerName>> = BTreeMap::new();
    via.insert(me, None);
    let mut queue = VecDeque::from([me]);
    while let Some(at) = queue.pop_front() {
        let first_hop = via[at];
        for &next in adj.get(at).into_iter().flatten() {
            if via.contains_key(next) {
                continue;
            }
            via.insert(next, Some(first_hop.unwrap_or(next)));
            queue.push_back(next);
        }
    }
    let unicast = via
        .iter()
        .map(|(dest, hop)| UnicastRouteReport {
            dest: dest.to_string(),
            via: hop.map_or_else(|| "00:00:00:00:00:00".to_string(), |h| h.to_string()),
        })
        .collect();
    let neighbours: Vec<String> = peers
        .iter()
        .find(|p| &p.name == me)
        .map(|p| {
            let mut v: Vec<String> = p.links.iter().map(|l| l.name.to_string()).collect();
            v.sort();
            v.dedup();
            v
        })
        .unwrap_or_default();
    let broadcast = if neighbours.is_empty() {
        Vec::new()
    } else {
        vec![BroadcastRouteReport {
            source: me.to_string(),
            via: neighbours,
        }]
    };
    (unicast, broadcast)
}

pub fn report(s: Sources) -> Report {
    let mtu = s.router.mtu;
    let mut connections: Vec<ConnectionReport> = s
        .connections
        .iter()
        .map(|c| match &c.state {
            ConnState::Established { peer, nickname } => ConnectionReport {
                address: c.remote.to_string(),
                outbound: c.outbound,
                state: "established".into(),
                info: format!("{} {peer}({nickname})", s.router.datapath),
                peer_name: Some(peer.to_string()),
                peer_nick_name: Some(nickname.clone()),
                mtu,
                attrs: Some(ConnectionAttrs {
                    mtu,
                    name: s.router.datapath.into(),
                    encrypted: s.router.encrypted,
                }),
            },
            ConnState::Handshake => ConnectionReport {
                address: c.remote.to_string(),
                outbound: c.outbound,
                state: "connecting".into(),
                info: "handshake".into(),
                peer_name: None,
                peer_nick_name: None,
                mtu,
                attrs: None,
            },
        })
        .collect();
    for t in &s.pending_targets {
        if connections.iter().any(|c| c.address == t.target) {
            continue;
        }
        let (state, info) = match &t.state {
            PendingState::Connecting => ("connecting", String::new()),
            PendingState::Retrying(why) => ("retrying", why.clone()),
        };
        connections.push(ConnectionReport {
            address: t.target.clone(),
            outbound: true,
            state: state.into(),
            info,
            peer_name: None,
            peer_nick_name: None,
            mtu,
            attrs: None,
        });
    }
    let peers = s
        .peers
        .iter()
        .map(|p| PeerReport {
            name: p.name.to_string(),
            nick_name: p.nickname.clone(),
            uid: p.uid,
            short_id: 0,
            version: 0,
            data_address: p.data_addr.map(|a| a.to_string()),
            connections: p
                .links
                .iter()
                .map(|l| PeerConnectionReport {
                    name: l.name.to_string(),
                    nick_name: l.nickname.clone(),
                    // A peer that did not say (an older weft) leaves it empty.
                    address: l.remote.map(|r| r.to_string()).unwrap_or_default(),
                    outbound: l.outbound,
                    established: true,
                })
                .collect(),
        })
        .collect();
    let prefix = s.ipam.range.prefix_len();
    let paxos = match s.ipam.status {
        IpamStatus::AwaitingConsensus { quorum, known } => Some(PaxosReport {
            elector: true,
            known_nodes: known as u64,
            quorum: quorum as u64,
        }),
        _ => None,
    };
    let ipam = IpamReport {
        paxos,
        status: ipam_status_text(&s.ipam.status),
        range: s.ipam.range.to_string(),
        range_num_ips: s.ipam.max_ips,
        active_ips: s.ipam.active,
        default_subnet: s.ipam.range.to_string(),
        seeds: s.ipam.seeds.iter().map(|n| n.to_string()).collect(),
        entries: s
            .ipam
            .entries
            .iter()
            .map(|e| RingEntryReport {
                token: e.first.to_string(),
                size: e.size,
                peer: e.owner.to_string(),
                nickname: e.nickname.clone(),
                is_known_peer: e.known,
                reachable: e.reachable,
                version: e.version,
                free: e.free,
            })
            .collect(),
        owned: s
            .ipam
            .owned
            .iter()
            .map(|(id, a)| OwnedReport {
                containerid: id.clone(),
                addrs: vec![format!("{a}/{prefix}")],
                tentative: s.ipam.tentative.contains(id),
            })
            .collect(),
        // Weave's `null` for none: `{{len .IPAM.PendingAllocates}}` behaves the same.
        pending_allocates: Some(s.pending_allocates.clone()).filter(|v| !v.is_empty()),
        pending_claims: Some(
            s.ipam
                .pending_claims
                .iter()
                .map(|(id, a)| ClaimReport {
                    ident: id.clone(),
                    cidr: format!("{a}/32"),
                })
                .collect::<Vec<_>>(),
        )
        .filter(|v| !v.is_empty()),
        bad_gossip: s.ipam.bad_gossip,
        bad_requests: s.bad_requests,
    };
    let dataplane = DataplaneReport {
        routes: s
            .datapath
            .routes
            .iter()
            .map(|r| RouteReport {
                start: r.first.to_string(),
                end: r.last.to_string(),
                size: r.size(),
                peer: r.owner.to_string(),
                // The data path knows other peers' nicknames; this node's own is here.
                nick_name: if r.nickname.is_empty() && r.owner == s.router.name {
                    s.router.nickname.clone()
                } else {
                    r.nickname.clone()
                },
                via: match r.via {
                    Via::Local => "local".into(),
                    Via::Peer(a) => a.to_string(),
                    Via::Unreachable => "unreachable".into(),
                },
            })
            .collect(),
        peers: s
            .datapath
            .peers
            .iter()
            .map(|p| PeerTrafficReport {
                name: p.name.to_string(),
                nick_name: p.nickname.clone(),
                tx_packets: p.tx_packets,
                tx_bytes: p.tx_bytes,
                rx_packets: p.rx_packets,
                rx_bytes: p.rx_bytes,
            })
            .collect(),
        drops: s
            .datapath
            .drops
            .iter()
            .map(|(reason, packets)| DropReport {
                reason: reason.as_str().to_string(),
                packets: *packets,
            })
            .collect(),
    };
    let (unicast_routes, broadcast_routes) = control_routes(&s.router.name, &s.peers);
    let mut overlay_diagnostics = std::collections::BTreeMap::new();
    overlay_diagnostics.insert(
        "vxlan".to_string(),
        Some(OverlayDiagnostics {
            interface: s.router.interface.clone(),
            mtu,
            data_port: s.router.data_port,
            seal: if s.router.encrypted {
                "aes-256-gcm"
            } else {
                "none"
            }
            .into(),
        }),
    );
    Report {
        ready: s.ready,
        version: env!("CARGO_PKG_VERSION").to_string(),
        version_check: VersionCheckReport::default(),
        router: RouterReport {
            protocol: PROTOCOL.to_string(),
            protocol_min_version: PROTOCOL_VERSION,
            protocol_max_version: PROTOCOL_VERSION,
            encryption: s.router.encrypted,
            authentication: if s.router.password {
                "password"
            } else {
                "none"
            }
            .to_string(),
            peer_discovery: true,
            name: s.router.name.to_string(),
            nick_name: s.router.nickname,
            port: s.router.port,
            data_port: s.router.data_port,
            interface: s.router.interface,
            mtu,
            overlay_address: s.router.overlay_address.map(|n| n.to_string()),
            targets: s.router.targets,
            peers,
            unicast_routes,
            broadcast_routes,
            connections,
            termination_count: s.terminations,
            overlay_diagnostics,
            trusted_subnets: Vec::new(),
            // Weave's pcap counters of its capture interface; weft's counterpart is its TUN
            // reader: packets taken into the overlay, and what the data plane dropped (the
            // kernel's own TUN queue drops are not read: 0).
            capture_stats: [
                (
                    "PacketsReceived".to_string(),
                    s.datapath.peers.iter().map(|p| p.tx_packets).sum(),
                ),
                (
                    "PacketsDropped".to_string(),
                    s.datapath.drops.iter().map(|(_, n)| *n).sum(),
                ),
                ("PacketsIfDropped".to_string(), 0),
            ]
            .into_iter()
            .collect(),
            macs: Vec::new(),
            refused: s.refused.clone(),
        },
        ipam,
        dataplane,
        network_policy: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::datapath::DropReason;
    use crate::core::mesh::view::{PeerLink, RingEntryView};
    use crate::core::route::RouteView;
    use crate::datapath::PeerTraffic;

    fn name(i: u8) -> PeerName {
        PeerName::from_bytes([2, 0x77, 0x66, 0, 0, i])
    }

    fn sources() -> Sources {
        Sources {
            ready: true,
            router: RouterFacts {
                name: name(1),
                nickname: "n1".into(),
                port: 6783,
                data_port: 6784,
                interface: "weave".into(),
                mtu: 1450,
                overlay_address: Some("192.168.0.1/16".parse().unwrap()),
                targets: vec!["10.0.0.2:6783".into(), "10.0.0.3:6783".into()],
                password: false,
                encrypted: false,
                datapath: "vxlan",
            },
            peers: vec![
                PeerView {
                    name: name(1),
                    nickname: "n1".into(),
                    uid: 1,
                    data_addr: None,
                    links: vec![PeerLink {
                        name: name(2),
                        nickname: "n2".into(),
                        remote: Some("10.0.0.2:6783".parse().unwrap()),
                        outbound: true,
                    }],
                },
                PeerView {
                    name: name(2),
                    nickname: "n2".into(),
                    uid: 2,
                    data_addr: Some("10.0.0.2:6784".parse().unwrap()),
                    links: vec![],
                },
            ],
            connections: vec![ConnectionView {
                id: 1,
                remote: "10.0.0.2:6783".parse().unwrap(),
                outbound: true,
                state: ConnState::Established {
                    peer: name(2),
                    nickname: "n2".into(),
                },
            }],
            pending_targets: vec![
                PendingTarget {
                    target: "10.0.0.2:6783".into(),
                    state: PendingState::Connecting,
                },
                PendingTarget {
                    target: "10.0.0.3:6783".into(),
                    state: PendingState::Retrying("connection refused".into()),
                },
            ],
            terminations: 4,
            refused: RefusedReport::default(),
            ipam: IpamView {
                status: IpamStatus::AwaitingConsensus {
                    quorum: 2,
                    known: 1,
                },
                range: "192.168.0.0/16".parse().unwrap(),
                max_ips: 65536,
                active: 1,
                seeds: vec![name(1), name(2)],
                entries: vec![RingEntryView {
                    first: "192.168.0.0".parse().unwrap(),
                    size: 32768,
                    owner: name(1),
                    nickname: "n1".into(),
                    known: true,
                    reachable: true,
                    version: 3,
                    free: 32767,
                }],
                owned: vec![("weave:expose".into(), "192.168.0.1".parse().unwrap())],
                tentative: vec![],
                pending_claims: vec![("c9".into(), "192.168.7.7".parse().unwrap())],
                bad_gossip: 2,
            },
            pending_allocates: vec!["c8".into()],
            bad_requests: 5,
            datapath: DatapathView {
                routes: vec![RouteView {
                    first: "192.168.128.0".parse().unwrap(),
                    last: "192.168.255.255".parse().unwrap(),
                    owner: name(2),
                    nickname: "n2".into(),
                    via: Via::Peer("10.0.0.2:6784".parse().unwrap()),
                }],
                peers: vec![PeerTraffic {
                    name: name(2),
                    nickname: "n2".into(),
                    tx_packets: 10,
                    tx_bytes: 1000,
                    rx_packets: 9,
                    rx_bytes: 900,
                }],
                drops: vec![(DropReason::NoRoute, 3)],
            },
        }
    }

    #[test]
    fn views_become_weaves_keys_and_strings() {
        let r = report(sources());
        assert_eq!(r.ipam.status, "awaiting consensus (quorum: 2, known: 1)");
        assert_eq!(r.ipam.owned[0].addrs, vec!["192.168.0.1/16".to_string()]);
        assert_eq!(r.ipam.seeds.len(), 2);
        assert_eq!((r.ipam.bad_gossip, r.ipam.bad_requests), (2, 5));
        assert_eq!(r.ipam.pending_allocates, Some(vec!["c8".to_string()]));
        let claims = r.ipam.pending_claims.as_ref().unwrap();
        assert_eq!(
            (claims[0].ident.as_str(), claims[0].cidr.as_str()),
            ("c9", "192.168.7.7/32")
        );
        let paxos = r.ipam.paxos.as_ref().unwrap();
        assert_eq!((paxos.quorum, paxos.known_nodes), (2, 1));
        assert_eq!(
            r.router.connections.len(),
            2,
            "the connecting target has a connection"
        );
        let c = &r.router.connections[0];
        assert_eq!(
            (c.state.as_str(), c.info.as_str()),
            ("established", "vxlan 02:77:66:00:00:02(n2)")
        );
        let t = &r.router.connections[1];
        assert_eq!(
            (t.address.as_str(), t.state.as_str(), t.info.as_str()),
            ("10.0.0.3:6783", "retrying", "connection refused")
        );
        assert_eq!(r.router.peers[0].connections[0].address, "10.0.0.2:6783");
        assert_eq!(
            r.router.peers[1].data_address.as_deref(),
            Some("10.0.0.2:6784")
        );
        assert_eq!(r.router.overlay_address.as_deref(), Some("192.168.0.1/16"));
        assert_eq!(r.router.termination_count, 4);
        let route = &r.dataplane.routes[0];
        assert_eq!(
            (route.start.as_str(), route.size, route.via.as_str()),
            ("192.168.128.0", 32768, "10.0.0.2:6784")
        );
        assert_eq!(r.dataplane.drops[0].reason, "no_route");
        assert_eq!(r.dataplane.peers[0].rx_bytes, 900);
    }

    #[test]
    fn control_routes_follow_shortest_paths_over_gossiped_links() {
        // n1 - n2 - n3, and n4 connected to n3 only: n1 reaches n3 and n4 through n2.
        let link = |i: u8| PeerLink {
            name: name(i),
            nickname: format!("n{i}"),
            remote: None,
            outbound: false,
        };
        let peer = |i: u8, links: Vec<PeerLink>| PeerView {
            name: name(i),
            nickname: format!("n{i}"),
            uid: u64::from(i),
            data_addr: None,
            links,
        };
        let peers = vec![
            peer(1, vec![link(2)]),
            peer(2, vec![link(1), link(3)]),
            peer(3, vec![link(4)]),
            peer(4, vec![]),
        ];
        let (uni, bc) = control_routes(&name(1), &peers);
        let hops: Vec<(String, String)> = uni.into_iter().map(|u| (u.dest, u.via)).collect();
        assert_eq!(
            hops,
            vec![
                (name(1).to_string(), "00:00:00:00:00:00".to_string()),
                (name(2).to_string(), name(2).to_string()),
                (name(3).to_string(), name(2).to_string()),
                (name(4).to_string(), name(2).to_string()),
            ]
        );
        assert_eq!(bc.len(), 1);
        assert_eq!(bc[0].via, vec![name(2).to_string()]);
    }

    /// Every key of the report a real Weave 2.8.1 router served
    /// (`weave-samples/n1-report-after-traffic.json`, copied in `testdata/`) is in weft's,
    /// with the same JSON type (`null` matches anything: Weave's empty values).
    #[test]
    fn the_report_has_every_key_of_weaves_with_its_type() {
        let weave: serde_json::Value =
            serde_json::from_str(include_str!("testdata/weave-2.8.1-report.json")).unwrap();
        let mut r = report(sources());
        r.ipam.paxos = None;
        let weft = serde_json::to_value(&r).unwrap();
        let mut missing = Vec::new();
        compare_keys("", &weave, &weft, &mut missing);
        assert!(missing.is_empty(), "missing or mistyped: {missing:#?}");
    }

    fn compare_keys(
        path: &str,
        weave: &serde_json::Value,
        weft: &serde_json::Value,
        out: &mut Vec<String>,
    ) {
        use serde_json::Value as V;
        // Weave's things weft does not have (see the README's report section): the key is
        // there with an empty value. OverlayDiagnostics is keyed by overlay name.
        const EMPTY_IN_WEFT: [&str; 3] = [
            ".Router.MACs",
            ".Router.TrustedSubnets",
            ".Router.OverlayDiagnostics",
        ];
        if EMPTY_IN_WEFT.contains(&path) {
            if path == ".Router.OverlayDiagnostics" {
                assert!(weft.get("vxlan").is_some(), "{weft}");
            }
            return;
        }
        match (weave, weft) {
            (V::Null, _) => {}
            (V::Object(w), V::Object(f)) => {
                for (k, wv) in w {
                    match f.get(k) {
                        Some(fv) => compare_keys(&format!("{path}.{k}"), wv, fv, out),
                        None => out.push(format!("{path}.{k}")),
                    }
                }
            }
            (V::Array(w), V::Array(f)) => {
                // Element shapes are compared where both sides have one.
                if let (Some(we), Some(fe)) = (w.first(), f.first()) {
                    compare_keys(&format!("{path}[]"), we, fe, out);
                }
            }
            (V::Bool(_), V::Bool(_))
            | (V::Number(_), V::Number(_))
            | (V::String(_), V::String(_)) => {}
            (w, f) => out.push(format!("{path}: weave {w} vs weft {f}")),
        }
    }

    #[test]
    fn every_ipam_status_has_its_text() {
        for (s, want) in [
            (IpamStatus::Ready, "ready"),
            (
                IpamStatus::ReadyOwningNothing,
                "ready (this peer owns no addresses yet)",
            ),
            (IpamStatus::AwaitingRing, "waiting for the ring"),
            (
                IpamStatus::Observer,
                "observer: waiting for the ring from a peer",
            ),
            (
                IpamStatus::RingRefused("cannot merge".into()),
                "cannot merge",
            ),
            (
                IpamStatus::RestartGate,
                "restarted: waiting to hear the ring from a peer before allocating",
            ),
            (
                IpamStatus::AwaitingSpace,
                "waiting for IP range grant from peers",
            ),
        ] {
            assert_eq!(ipam_status_text(&s), want);
        }
    }
}
