//! From policies, pods and namespaces to what one node enforces: for each pod on the node
//! and each direction it is isolated in, the set of (address, protocol, port) it lets
//! through, in a shape whose lookup costs the same however many policies and pods there
//! are — disjoint address ranges, disjoint port ranges per protocol, exact tuples — which
//! `ruleset` turns into nftables sets and verdict maps.

use super::eval::Flow;
use super::model::{Cluster, Key, Peer, Pod, PortRef, Proto, Rule};
use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

/// Sorted, disjoint, non-adjacent inclusive ranges of IPv4 addresses.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct RangeSet(Vec<(u32, u32)>);

impl RangeSet {
    pub fn full() -> RangeSet {
        RangeSet(vec![(0, u32::MAX)])
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn ranges(&self) -> &[(u32, u32)] {
        &self.0
    }

    pub fn contains(&self, a: Ipv4Addr) -> bool {
        let a = u32::from(a);
        let i = self.0.partition_point(|&(_, hi)| hi < a);
        self.0.get(i).is_some_and(|&(lo, _)| lo <= a)
    }

    pub fn insert(&mut self, lo: u32, hi: u32) {
        let mut lo = lo;
        let mut hi = hi;
        // Every range touching or overlapping [lo, hi] merges into it.
        let start = self.0.partition_point(|&(_, h)| h.saturating_add(1) < lo);
        let mut end = start;
        while end < self.0.len() && self.0[end].0 <= hi.saturating_add(1) {
            lo = lo.min(self.0[end].0);
            hi = hi.max(self.0[end].1);
            end += 1;
        }
        self.0.splice(start..end, [(lo, hi)]);
    }

    pub fn insert_net(&mut self, net: ipnet::Ipv4Net) {
        self.insert(u32::from(net.network()), u32::from(net.broadcast()));
    }

    pub fn union(&mut self, other: &RangeSet) {
        for &(lo, hi) in &other.0 {
            self.insert(lo, hi);
        }
    }

    /// Removes every address of [lo, hi].
    pub fn remove(&mut self, lo: u32, hi: u32) {
        let mut out = Vec::with_capacity(self.0.len() + 1);
        for &(a, b) in &self.0 {
            if b < lo || a > hi {
                out.push((a, b));
                continue;
            }
            if a < lo {
                out.push((a, lo - 1));
            }
            if b > hi {
                out.push((hi + 1, b));
            }
        }
        self.0 = out;
    }

    pub fn count(&self) -> u64 {
        self.0.iter().map(|&(a, b)| u64::from(b - a) + 1).sum()
    }
}

/// What one isolated direction of one pod lets through.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Allow {
    /// Peers allowed on every protocol and port (rules without ports).
    pub any: RangeSet,
    /// Per protocol, disjoint port ranges with the peers allowed on them.
    pub ports: BTreeMap<Proto, Vec<(u16, u16, RangeSet)>>,
    /// Exact (peer, protocol, port): named ports resolved against each destination pod
    /// (egress).
    pub exact: BTreeSet<(Ipv4Addr, Proto, u16)>,
}

impl Allow {
    /// Whether a new connection whose other end is `peer` passes.
    pub fn allows(&self, peer: Ipv4Addr, proto: Option<Proto>, port: u16) -> bool {
        if self.any.contains(peer) {
            return true;
        }
        let Some(proto) = proto else { return false };
        if self.exact.contains(&(peer, proto, port)) {
            return true;
        }
        self.ports.get(&proto).is_some_and(|ranges| {
            let i = ranges.partition_point(|&(_, hi, _)| hi < port);
            ranges
                .get(i)
                .is_some_and(|(lo, _, set)| *lo <= port && set.contains(peer))
        })
    }

    /// The number of set elements this takes in the kernel (for the benchmark and the
    /// report).
    pub fn elements(&self) -> usize {
        self.any.ranges().len()
            + self
                .ports
                .values()
                .flatten()
                .map(|(_, _, s)| 1 + s.ranges().len())
                .sum::<usize>()
            + self.exact.len()
    }
}

/// One pod of this node, as policy treats it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodRules {
    pub key: Key,
    pub ip: Ipv4Addr,
    /// `Some` when isolated for ingress.
    pub ingress: Option<Allow>,
    pub egress: Option<Allow>,
    pub ingress_policies: Vec<Key>,
    pub egress_policies: Vec<Key>,
}

/// A problem with one policy that does not stop the others.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Problem {
    pub policy: Key,
    pub what: String,
}

/// What this node enforces.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Compiled {
    /// The node's pods that policy sees, by address.
    pub pods: BTreeMap<Ipv4Addr, PodRules>,
    pub problems: Vec<Problem>,
}

/// Per protocol, port ranges with peers, not yet disjoint.
#[derive(Default)]
struct PortEntries(BTreeMap<Proto, Vec<(u16, u16, RangeSet)>>);

impl PortEntries {
    fn add(&mut self, proto: Proto, lo: u16, hi: u16, peers: &RangeSet) {
        if !peers.is_empty() && lo <= hi {
            self.0
                .entry(proto)
                .or_default()
                .push((lo, hi, peers.clone()));
        }
    }

    /// Disjoint port ranges, each with the union of the peers of the entries covering it;
    /// neighbours with the same peers merged.
    fn normalise(self) -> BTreeMap<Proto, Vec<(u16, u16, RangeSet)>> {
        let mut out = BTreeMap::new();
        for (proto, entries) in self.0 {
            let mut cuts: BTreeSet<u32> = BTreeSet::new();
            for (lo, hi, _) in &entries {
                cuts.insert(u32::from(*lo));
                cuts.insert(u32::from(*hi) + 1);
            }
            let cuts: Vec<u32> = cuts.into_iter().collect();
            let mut ranges: Vec<(u16, u16, RangeSet)> = Vec::new();
            for w in cuts.windows(2) {
                let (lo, hi) = (w[0], w[1] - 1);
                let mut set = RangeSet::default();
                for (elo, ehi, peers) in &entries {
                    if u32::from(*elo) <= lo && hi <= u32::from(*ehi) {
                        set.union(peers);
                    }
                }
                if set.is_empty() {
                    continue;
                }
                let (lo, hi) = (lo as u16, hi as u16);
                match ranges.last_mut() {
                    Some(last) if u32::from(last.1) + 1 == u32::from(lo) && last.2 == set => {
                        last.1 = hi;
                    }
                    _ => ranges.push((lo, hi, set)),
                }
            }
            if !ranges.is_empty() {
                out.insert(proto, ranges);
            }
        }
        out
    }
}

fn block(cidr: &ipnet::Ipv4Net, except: &[ipnet::Ipv4Net]) -> RangeSet {
    let mut s = RangeSet::default();
    s.insert_net(*cidr);
    for e in except {
        s.remove(u32::from(e.network()), u32::from(e.broadcast()));
    }
    s
}

/// The addresses of the pods `peer` selects.
fn pod_peer_addresses(cluster: &Cluster, peer: &Peer, policy_ns: &str) -> RangeSet {
    let mut s = RangeSet::default();
    for pod in cluster.pods.values() {
        if let Some(ip) = pod.policy_address() {
            if cluster.peer_selects_pod(peer, policy_ns, pod) {
                s.insert(u32::from(ip), u32::from(ip));
            }
        }
    }
    s
}

/// The addresses a rule's peers cover (all of them for a rule without peers).
fn peer_addresses(cluster: &Cluster, rule: &Rule, policy_ns: &str) -> RangeSet {
    if rule.peers.is_empty() {
        return RangeSet::full();
    }
    let mut s = RangeSet::default();
    for p in &rule.peers {
        match p {
            Peer::Pods { .. } => s.union(&pod_peer_addresses(cluster, p, policy_ns)),
            Peer::IpBlock { cidr, except } => s.union(&block(cidr, except)),
            Peer::Unsupported(_) => {}
        }
    }
    s
}

/// Pods a rule's peers take in whose named port `name` exists: (address, port).
fn named_port_targets(
    cluster: &Cluster,
    rule: &Rule,
    policy_ns: &str,
    name: &str,
    proto: Proto,
) -> Vec<(Ipv4Addr, u16)> {
    cluster
        .pods
        .values()
        .filter_map(|pod| {
            let ip = pod.policy_address()?;
            let port = pod.named_port(name, proto)?;
            let taken = rule.peers.is_empty()
                || rule.peers.iter().any(|p| match p {
                    Peer::Pods { .. } => cluster.peer_selects_pod(p, policy_ns, pod),
                    Peer::IpBlock { cidr, except } => {
                        cidr.contains(&ip) && !except.iter().any(|e| e.contains(&ip))
                    }
                    Peer::Unsupported(_) => false,
                });
            taken.then_some((ip, port))
        })
        .collect()
}

fn allow_for(cluster: &Cluster, pod: &Pod, ingress: bool) -> (Option<Allow>, Vec<Key>) {
    let policies = cluster.selecting(pod, ingress);
    if policies.is_empty() {
        return (None, Vec::new());
    }
    let mut any = RangeSet::default();
    let mut ports = PortEntries::default();
    let mut exact = BTreeSet::new();
    for p in &policies {
        let rules = if ingress { &p.ingress } else { &p.egress };
        for rule in rules.iter().flatten() {
            let peers = peer_addresses(cluster, rule, &p.key.namespace);
            if rule.ports.is_empty() {
                any.union(&peers);
                continue;
            }
            for ps in &rule.ports {
                match &ps.port {
                    None => ports.add(ps.proto, 0, u16::MAX, &peers),
                    Some(PortRef::Number(n)) => {
                        ports.add(ps.proto, *n, ps.end_port.unwrap_or(*n).max(*n), &peers)
                    }
                    // Ingress: the name is one of this pod's own ports.
                    Some(PortRef::Name(name)) if ingress => {
                        if let Some(n) = pod.named_port(name, ps.proto) {
                            ports.add(ps.proto, n, n, &peers);
                        }
                    }
                    // Egress: each destination pod's own port of that name.
                    Some(PortRef::Name(name)) => {
                        for (ip, n) in
                            named_port_targets(cluster, rule, &p.key.namespace, name, ps.proto)
                        {
                            exact.insert((ip, ps.proto, n));
                        }
                    }
                }
            }
        }
    }
    let allow = Allow {
        any,
        ports: ports.normalise(),
        exact,
    };
    (
        Some(allow),
        policies.iter().map(|p| p.key.clone()).collect(),
    )
}

/// The rules of one pod, wherever it runs (the direct compilation the node-wide one is
/// made of; `explain` uses it too).
pub fn pod_rules(cluster: &Cluster, pod: &Pod) -> Option<PodRules> {
    let ip = pod.policy_address()?;
    let (ingress, ingress_policies) = allow_for(cluster, pod, true);
    let (egress, egress_policies) = allow_for(cluster, pod, false);
    Some(PodRules {
        key: pod.key.clone(),
        ip,
        ingress,
        egress,
        ingress_policies,
        egress_policies,
    })
}

/// What node `node` enforces: the rules of each of its pods.
pub fn compile(cluster: &Cluster, node: &str) -> Compiled {
    let mut pods = BTreeMap::new();
    for pod in cluster.pods.values() {
        if pod.node.as_deref() != Some(node) {
            continue;
        }
        if let Some(r) = pod_rules(cluster, pod) {
            // Two pods claiming one address (a stale one not yet gone from the API): the
            // one seen last by key order would be arbitrary, so the stricter wins — the
            // address is isolated if either is.
            pods.entry(r.ip)
                .and_modify(|old: &mut PodRules| {
                    if old.ingress.is_none() && old.egress.is_none() {
                        *old = r.clone();
                    }
                })
                .or_insert(r);
        }
    }
    let mut problems = Vec::new();
    for p in cluster.policies.values() {
        for what in p.unsupported() {
            problems.push(Problem {
                policy: p.key.clone(),
                what,
            });
        }
    }
    Compiled { pods, problems }
}

impl Compiled {
    /// What the node does with a new connection between `flow.src` and `flow.dst`, one of
    /// which may be its pod: the source's egress, then the destination's ingress.
    pub fn allows(&self, flow: &Flow) -> bool {
        let out = self
            .pods
            .get(&flow.src)
            .and_then(|p| p.egress.as_ref())
            .is_none_or(|a| a.allows(flow.dst, flow.proto, flow.port));
        let inn = self
            .pods
            .get(&flow.dst)
            .and_then(|p| p.ingress.as_ref())
            .is_none_or(|a| a.allows(flow.src, flow.proto, flow.port));
        out && inn
    }
}
