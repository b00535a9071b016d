//! Builds the [`Report`] (Weave's JSON keys and strings) from the typed views the core and
//! the data path give. The status pages and the metrics are rendered from the report, so
//! this is the one place where the daemon's state becomes text for operators.

use super::report::{
    ConnectionReport, DataplaneReport, DropReport, IpamReport, OwnedReport, PeerConnectionReport,
    PeerReport, PeerTrafficReport, RefusedReport, Report, RingEntryReport, RouteReport,
    RouterReport,
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
    /// Allocation requests waiting for IPAM right now.
    pub pending_allocates: u64,
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
                info: format!("vxlan {peer}({nickname})"),
                peer_name: Some(peer.to_string()),
                peer_nick_name: Some(nickname.clone()),
                mtu,
            },
            ConnState::Handshake => ConnectionReport {
                address: c.remote.to_string(),
                outbound: c.outbound,
                state: "connecting".into(),
                info: "handshake".into(),
                peer_name: None,
                peer_nick_name: None,
                mtu,
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
        });
    }
    let peers = s
        .peers
        .iter()
        .map(|p| PeerReport {
            name: p.name.to_string(),
            nick_name: p.nickname.clone(),
            uid: p.uid,
            data_address: p.data_addr.map(|a| a.to_string()),
            connections: p
                .links
                .iter()
                .map(|l| PeerConnectionReport {
                    name: l.name.to_string(),
                    nick_name: l.nickname.clone(),
                    address: l.remote.map(|r| r.to_string()).unwrap_or_default(),
                    outbound: l.outbound,
                    established: true,
                })
                .collect(),
        })
        .collect();
    let prefix = s.ipam.range.prefix_len();
    let ipam = IpamReport {
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
            })
            .collect(),
        pending_allocates: s.pending_allocates,
        pending_claims: s.ipam.pending_claims,
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
                nick_name: r.nickname.clone(),
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
    Report {
        ready: s.ready,
        version: env!("CARGO_PKG_VERSION").to_string(),
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
            connections,
            termination_count: s.terminations,
            refused: s.refused.clone(),
        },
        ipam,
        dataplane,
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
                pending_claims: 0,
                bad_gossip: 2,
            },
            pending_allocates: 1,
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
        assert_eq!(r.ipam.pending_allocates, 1);
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
