//! Destination address -> owning peer -> underlay endpoint.
//!
//! A [`RouteTable`] is an immutable snapshot: the control plane builds a new one whenever
//! the IPAM ring or a peer's address changes and publishes it through an
//! `arc_swap::ArcSwap`, so the data plane reads it without locks. Lookups are binary
//! searches over sorted vectors: O(log n), no allocation, no hashing.

use crate::core::mesh::peer::PeerName;
use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;

/// What the datapath learns about the traffic to one peer: counters, and the path MTU.
/// It lives in an `Arc` outside the table so that it survives table rebuilds: the control
/// plane hands the same `Arc` to every new table. Bytes count the inner (overlay) IP
/// packets, so one node's tx matches its peer's rx.
#[derive(Debug, Default)]
pub struct PeerState {
    pub tx_packets: AtomicU64,
    pub tx_bytes: AtomicU64,
    pub rx_packets: AtomicU64,
    pub rx_bytes: AtomicU64,
    /// The largest inner packet the underlay path to this peer carries without
    /// fragmentation, when the underlay said it is less than the overlay MTU (an ICMP
    /// "fragmentation needed" from a hop); 0 while nothing smaller is known.
    pub path_mtu: AtomicU32,
    /// The data keys with this peer (with `WEAVE_PASSWORD`; empty otherwise).
    pub crypto: crate::core::datapath::aead::PeerCrypto,
}

impl PeerState {
    /// The MTU for packets to this peer: the overlay's, or the path's if smaller.
    pub fn mtu(&self, overlay_mtu: usize) -> usize {
        match self.path_mtu.load(Ordering::Relaxed) as usize {
            0 => overlay_mtu,
            path => path.min(overlay_mtu),
        }
    }
}

impl PeerState {
    #[cfg(test)]
    pub(crate) fn count_tx(&self, bytes: usize) {
        self.tx_packets.fetch_add(1, Ordering::Relaxed);
        self.tx_bytes.fetch_add(bytes as u64, Ordering::Relaxed);
    }

    pub fn count_rx(&self, bytes: usize) {
        self.rx_packets.fetch_add(1, Ordering::Relaxed);
        self.rx_bytes.fetch_add(bytes as u64, Ordering::Relaxed);
    }
}

/// Where a peer's data plane is reached.
#[derive(Debug, Clone)]
pub struct PeerRoute {
    pub name: PeerName,
    pub nickname: String,
    /// Underlay `ip:port` of the peer's data socket; `None` until it is known.
    pub data_addr: Option<SocketAddrV4>,
    /// Inner Ethernet address of the peer (its name as a MAC).
    pub mac: [u8; 6],
    pub counters: Arc<PeerState>,
}

/// Where packets to a range go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Via {
    /// One of this node's own ranges.
    Local,
    /// The owner's data endpoint.
    Peer(SocketAddrV4),
    /// The owner's underlay address is not known.
    Unreachable,
}

/// One range of the table, for reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteView {
    pub first: Ipv4Addr,
    pub last: Ipv4Addr,
    pub owner: PeerName,
    /// Empty if the owner is not a known peer.
    pub nickname: String,
    pub via: Via,
}

impl RouteView {
    pub fn size(&self) -> u64 {
        u64::from(u32::from(self.last) - u32::from(self.first)) + 1
    }
}

/// The result of routing one destination address.
#[derive(Debug, Clone, Copy)]
pub enum Lookup<'a> {
    /// In one of this node's own ranges.
    Local,
    /// Owned by a peer whose data address is known.
    Remote(&'a PeerRoute),
    /// Owned by the named peer, which is unknown or whose data address is not known yet.
    Unreachable(&'a PeerName),
    /// Not in any range.
    NoRoute,
}

#[derive(Debug, Clone)]
struct RangeEntry {
    first: u32,
    last: u32,
    owner: PeerName,
    /// Index into `peers`, if the owner is listed there.
    peer: Option<usize>,
}

/// An immutable routing snapshot. See the module documentation.
#[derive(Debug, Clone)]
pub struct RouteTable {
    local: PeerName,
    local_mac: [u8; 6],
    /// Disjoint ranges sorted by `first`.
    ranges: Vec<RangeEntry>,
    peers: Vec<PeerRoute>,
    /// (underlay ip, port, index into `peers`), sorted, for source validation.
    by_source: Vec<(u32, u16, usize)>,
}

impl RouteTable {
    /// Builds a table from IPAM ranges (`first..=last`, owner) and the known peers.
    ///
    /// Ranges may come in any order. Adjacent ranges of the same owner are merged (the
    /// ring splits space into many small entries; fewer, larger ranges make lookups and
    /// reports smaller). Overlaps, which a consistent ring never produces, are resolved
    /// deterministically: the range sorted first keeps the shared addresses. A range with
    /// `first > last` is ignored. `peers` may include the local peer (its nickname is then
    /// used in reports); if a name appears twice, the first entry wins.
    pub fn new(
        local: PeerName,
        local_mac: [u8; 6],
        ranges: &[(u32, u32, PeerName)],
        peers: Vec<PeerRoute>,
    ) -> RouteTable {
        let mut index: HashMap<&PeerName, usize> = HashMap::with_capacity(peers.len());
        for (i, p) in peers.iter().enumerate() {
            index.entry(&p.name).or_insert(i);
        }

        let mut sorted: Vec<&(u32, u32, PeerName)> =
            ranges.iter().filter(|(f, l, _)| f <= l).collect();
        sorted.sort_by(|a, b| (a.0, a.1, &a.2).cmp(&(b.0, b.1, &b.2)));

        let mut out: Vec<RangeEntry> = Vec::with_capacity(sorted.len());
        for (first, last, owner) in sorted {
            let mut first = *first;
            if let Some(prev) = out.last_mut() {
                if first <= prev.last {
                    if *last <= prev.last {
                        continue;
                    }
                    first = prev.last + 1;
                }
                if prev.owner == *owner && prev.last.checked_add(1) == Some(first) {
                    prev.last = *last;
                    continue;
                }
            }
            out.push(RangeEntry {
                first,
                last: *last,
                owner: owner.clone(),
                peer: index.get(owner).copied(),
            });
        }

        let mut by_source: Vec<(u32, u16, usize)> = peers
            .iter()
            .enumerate()
            .filter(|(i, p)| index.get(&p.name) == Some(i))
            .filter_map(|(i, p)| p.data_addr.map(|a| (u32::from(*a.ip()), a.port(), i)))
            .collect();
        by_source.sort_unstable();

        RouteTable {
            local,
            local_mac,
            ranges: out,
            peers,
            by_source,
        }
    }

    /// A table with no ranges and no peers: everything is `NoRoute`.
    pub fn empty(local: PeerName, local_mac: [u8; 6]) -> RouteTable {
        RouteTable::new(local, local_mac, &[], Vec::new())
    }

    pub fn local(&self) -> &PeerName {
        &self.local
    }

    /// The inner Ethernet source address of datagrams this node sends.
    pub(crate) fn local_mac(&self) -> [u8; 6] {
        self.local_mac
    }

    pub fn lookup(&self, dst: Ipv4Addr) -> Lookup<'_> {
        self.lookup_indexed(dst).1
    }

    /// Like [`RouteTable::lookup`], with the index of the owner in [`RouteTable::peers`]
    /// when it is listed there.
    pub(crate) fn lookup_indexed(&self, dst: Ipv4Addr) -> (Option<usize>, Lookup<'_>) {
        let a = u32::from(dst);
        // Index of the first range starting after `a`; the candidate is the one before.
        let i = self.ranges.partition_point(|r| r.first <= a);
        let Some(r) = i.checked_sub(1).and_then(|i| self.ranges.get(i)) else {
            return (None, Lookup::NoRoute);
        };
        if a > r.last {
            return (None, Lookup::NoRoute);
        }
        if r.owner == self.local {
            return (r.peer, Lookup::Local);
        }
        match r.peer.and_then(|i| self.peers.get(i).map(|p| (i, p))) {
            Some((i, p)) if p.data_addr.is_some() => (Some(i), Lookup::Remote(p)),
            other => (other.map(|(i, _)| i), Lookup::Unreachable(&r.owner)),
        }
    }

    /// Whether `dst` lies in one of this node's own ranges.
    pub(crate) fn is_local(&self, dst: Ipv4Addr) -> bool {
        matches!(self.lookup(dst), Lookup::Local)
    }

    /// The peer whose data address has this underlay IP (the first by port if several
    /// share it). Datagrams from any other source are not accepted.
    pub(crate) fn peer_by_source(&self, src: Ipv4Addr) -> Option<&PeerRoute> {
        let ip = u32::from(src);
        let i = self.by_source.partition_point(|e| e.0 < ip);
        self.by_source
            .get(i)
            .filter(|e| e.0 == ip)
            .and_then(|e| self.peers.get(e.2))
    }

    /// Like [`RouteTable::peer_by_source`], but prefers the peer whose data address is
    /// exactly `src`, so that peers sharing one IP (several nodes on one host, each with
    /// its own port) are told apart.
    pub(crate) fn peer_by_endpoint(&self, src: SocketAddrV4) -> Option<&PeerRoute> {
        let key = (u32::from(*src.ip()), src.port());
        let i = self.by_source.partition_point(|e| (e.0, e.1) < key);
        match self.by_source.get(i) {
            Some(e) if (e.0, e.1) == key => self.peers.get(e.2),
            _ => self.peer_by_source(*src.ip()),
        }
    }

    pub fn peers(&self) -> &[PeerRoute] {
        &self.peers
    }

    /// The ranges for `/report` and `weft status routes`, in address order.
    pub fn routes(&self) -> Vec<RouteView> {
        self.ranges
            .iter()
            .map(|r| {
                let peer = r.peer.and_then(|i| self.peers.get(i));
                let via = if r.owner == self.local {
                    Via::Local
                } else {
                    match peer.and_then(|p| p.data_addr) {
                        Some(a) => Via::Peer(a),
                        None => Via::Unreachable,
                    }
                };
                RouteView {
                    first: Ipv4Addr::from(r.first),
                    last: Ipv4Addr::from(r.last),
                    owner: r.owner.clone(),
                    nickname: peer.map(|p| p.nickname.clone()).unwrap_or_default(),
                    via,
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(i: u32) -> PeerName {
        let b = i.to_be_bytes();
        PeerName::from_bytes([0x02, 0x77, b[0], b[1], b[2], b[3]])
    }

    fn ip(s: &str) -> u32 {
        u32::from(s.parse::<Ipv4Addr>().unwrap())
    }

    fn peer(i: u32, addr: Option<&str>) -> PeerRoute {
        let n = name(i);
        PeerRoute {
            mac: n.mac(),
            name: n,
            nickname: format!("node{i}"),
            data_addr: addr.map(|a| a.parse().unwrap()),
            counters: Arc::default(),
        }
    }

    fn addr(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    /// local (1) owns 10.32.0.0/13 low half, peer 2 the high half, peer 3 a /24 with no
    /// data address, peer 4 (unknown) a /24.
    fn table() -> RouteTable {
        let ranges = vec![
            (ip("10.36.0.0"), ip("10.39.255.255"), name(2)),
            (ip("10.32.0.0"), ip("10.35.255.255"), name(1)),
            (ip("10.40.0.0"), ip("10.40.0.255"), name(3)),
            (ip("10.41.0.0"), ip("10.41.0.255"), name(4)),
        ];
        let peers = vec![
            peer(1, None),
            peer(2, Some("10.77.0.2:6784")),
            peer(3, None),
        ];
        RouteTable::new(name(1), name(1).mac(), &ranges, peers)
    }

    #[test]
    fn lookup_classifies_destinations() {
        let t = table();
        assert!(matches!(t.lookup(addr("10.32.0.1")), Lookup::Local));
        assert!(matches!(t.lookup(addr("10.35.255.255")), Lookup::Local));
        match t.lookup(addr("10.36.0.0")) {
            Lookup::Remote(p) => {
                assert_eq!(p.name, name(2));
                assert_eq!(p.data_addr, Some("10.77.0.2:6784".parse().unwrap()));
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(t.lookup(addr("10.39.255.255")), Lookup::Remote(_)));
        assert!(matches!(t.lookup(addr("10.40.0.9")), Lookup::Unreachable(n) if *n == name(3)));
        assert!(matches!(t.lookup(addr("10.41.0.9")), Lookup::Unreachable(n) if *n == name(4)));
        for a in [
            "10.31.255.255",
            "10.40.1.0",
            "10.42.0.0",
            "0.0.0.0",
            "255.255.255.255",
        ] {
            assert!(matches!(t.lookup(addr(a)), Lookup::NoRoute), "{a}");
        }
        assert!(t.is_local(addr("10.33.1.1")));
        assert!(!t.is_local(addr("10.37.1.1")));
    }

    #[test]
    fn empty_table_routes_nothing() {
        let t = RouteTable::empty(name(1), name(1).mac());
        assert!(matches!(t.lookup(addr("10.32.0.1")), Lookup::NoRoute));
        assert!(t.peer_by_source(addr("10.77.0.2")).is_none());
        assert!(t.routes().is_empty());
        assert_eq!(t.local_mac(), name(1).mac());
    }

    #[test]
    fn extreme_addresses() {
        let t = RouteTable::new(
            name(1),
            name(1).mac(),
            &[(0, 0, name(1)), (u32::MAX, u32::MAX, name(2))],
            vec![peer(2, Some("10.77.0.2:6784"))],
        );
        assert!(matches!(t.lookup(Ipv4Addr::from(0)), Lookup::Local));
        assert!(matches!(t.lookup(Ipv4Addr::from(1)), Lookup::NoRoute));
        assert!(matches!(t.lookup(Ipv4Addr::BROADCAST), Lookup::Remote(_)));
        assert_eq!(t.routes()[1].size(), 1);
    }

    #[test]
    fn source_validation_by_underlay_ip() {
        let t = table();
        assert_eq!(t.peer_by_source(addr("10.77.0.2")).unwrap().name, name(2));
        assert!(t.peer_by_source(addr("10.77.0.3")).is_none());
        assert!(t.peer_by_source(addr("10.77.0.1")).is_none());
    }

    #[test]
    fn endpoint_match_prefers_exact_port() {
        let t = RouteTable::new(
            name(1),
            name(1).mac(),
            &[],
            vec![
                peer(2, Some("127.0.0.1:7001")),
                peer(3, Some("127.0.0.1:7002")),
            ],
        );
        let by = |s: &str| {
            t.peer_by_endpoint(s.parse().unwrap())
                .map(|p| p.name.clone())
        };
        assert_eq!(by("127.0.0.1:7002"), Some(name(3)));
        assert_eq!(by("127.0.0.1:7001"), Some(name(2)));
        assert_eq!(by("127.0.0.1:9999"), Some(name(2)));
        assert_eq!(by("127.0.0.2:7001"), None);
    }

    #[test]
    fn adjacent_ranges_of_one_owner_merge() {
        let ranges = vec![
            (ip("10.32.0.0"), ip("10.32.0.127"), name(2)),
            (ip("10.32.0.128"), ip("10.32.0.255"), name(2)),
            (ip("10.32.1.0"), ip("10.32.1.255"), name(3)),
            (ip("10.32.2.0"), ip("10.32.2.255"), name(2)),
        ];
        let t = RouteTable::new(name(1), name(1).mac(), &ranges, vec![peer(2, None)]);
        let r = t.routes();
        assert_eq!(r.len(), 3);
        assert_eq!(
            (r[0].first, r[0].last),
            (addr("10.32.0.0"), addr("10.32.0.255"))
        );
        assert_eq!(r[0].size(), 256);
    }

    #[test]
    fn overlaps_and_inverted_ranges_are_resolved() {
        let ranges = vec![
            (ip("10.0.0.0"), ip("10.0.0.255"), name(2)),
            (ip("10.0.0.128"), ip("10.0.1.127"), name(3)),
            (ip("10.0.0.10"), ip("10.0.0.20"), name(3)),
            (ip("10.9.0.0"), ip("10.8.0.0"), name(3)),
        ];
        let t = RouteTable::new(
            name(1),
            name(1).mac(),
            &ranges,
            vec![peer(2, Some("10.77.0.2:1")), peer(3, Some("10.77.0.3:1"))],
        );
        let owner = |a: &str| match t.lookup(addr(a)) {
            Lookup::Remote(p) => Some(p.name.clone()),
            _ => None,
        };
        assert_eq!(owner("10.0.0.15"), Some(name(2)));
        assert_eq!(owner("10.0.0.200"), Some(name(2)));
        assert_eq!(owner("10.0.1.0"), Some(name(3)));
        assert_eq!(owner("10.8.5.5"), None);
        let r = t.routes();
        assert_eq!(r.len(), 2);
        assert_eq!(r[1].first, addr("10.0.1.0"));
    }

    #[test]
    fn routes_report_via_and_nicknames() {
        let r = table().routes();
        let via: Vec<(Ipv4Addr, Via, &str)> = r
            .iter()
            .map(|x| (x.first, x.via, x.nickname.as_str()))
            .collect();
        assert_eq!(
            via,
            vec![
                (addr("10.32.0.0"), Via::Local, "node1"),
                (
                    addr("10.36.0.0"),
                    Via::Peer("10.77.0.2:6784".parse().unwrap()),
                    "node2"
                ),
                (addr("10.40.0.0"), Via::Unreachable, "node3"),
                (addr("10.41.0.0"), Via::Unreachable, ""),
            ]
        );
        assert_eq!(r[0].size(), 1 << 18);
        assert_eq!(r[1].owner, name(2));
    }

    #[test]
    fn duplicate_peer_names_first_wins() {
        let mut second = peer(2, Some("10.77.0.9:1"));
        second.nickname = "dup".into();
        let t = RouteTable::new(
            name(1),
            name(1).mac(),
            &[(ip("10.1.0.0"), ip("10.1.0.255"), name(2))],
            vec![peer(2, Some("10.77.0.2:1")), second],
        );
        match t.lookup(addr("10.1.0.1")) {
            Lookup::Remote(p) => assert_eq!(p.nickname, "node2"),
            other => panic!("{other:?}"),
        }
        assert!(t.peer_by_source(addr("10.77.0.9")).is_none());
    }

    #[test]
    fn thousand_peers() {
        // 1000 peers, each owning 4 interleaved /26-sized ranges of 10.32.0.0/12.
        let n = 1000u32;
        let base = ip("10.32.0.0");
        let mut ranges = Vec::new();
        for k in 0..4 {
            for i in 0..n {
                let first = base + (k * n + i) * 64;
                ranges.push((first, first + 63, name(i + 1)));
            }
        }
        ranges.reverse();
        let peers: Vec<PeerRoute> = (1..=n)
            .map(|i| {
                let a = format!("10.78.{}.{}:6784", i / 256, i % 256);
                peer(i, Some(&a))
            })
            .collect();
        let t = RouteTable::new(name(1), name(1).mac(), &ranges, peers);
        assert_eq!(t.routes().len(), 4 * n as usize);
        for k in 0..4 {
            for i in 0..n {
                let first = base + (k * n + i) * 64;
                for a in [first, first + 17, first + 63] {
                    let got = t.lookup(Ipv4Addr::from(a));
                    if i == 0 {
                        assert!(matches!(got, Lookup::Local));
                    } else {
                        match got {
                            Lookup::Remote(p) => assert_eq!(p.name, name(i + 1)),
                            other => panic!("{a:#x}: {other:?}"),
                        }
                    }
                }
            }
        }
        assert!(matches!(
            t.lookup(Ipv4Addr::from(base + 4 * n * 64)),
            Lookup::NoRoute
        ));
        for i in 1..=n {
            let src = Ipv4Addr::new(10, 78, (i / 256) as u8, (i % 256) as u8);
            assert_eq!(t.peer_by_source(src).unwrap().name, name(i));
        }
    }

    #[test]
    fn counters_accumulate() {
        let c = PeerState::default();
        c.count_tx(100);
        c.count_tx(50);
        c.count_rx(7);
        assert_eq!(c.tx_packets.load(Ordering::Relaxed), 2);
        assert_eq!(c.tx_bytes.load(Ordering::Relaxed), 150);
        assert_eq!(c.rx_packets.load(Ordering::Relaxed), 1);
        assert_eq!(c.rx_bytes.load(Ordering::Relaxed), 7);
    }
}
