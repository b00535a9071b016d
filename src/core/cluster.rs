//! Decisions of Kubernetes mode that need no API: which Nodes to dial, which Nodes went
//! away, whether a Lease may be taken, which ring members have lost their Node. The
//! adapters in `k8s/` fetch the facts, the router acts on the answers.

use crate::core::mesh::PeerName;
use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

/// The cluster's Nodes as the API last listed them: name -> underlay address (InternalIP,
/// else ExternalIP; `None` while the Node has neither).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeSet {
    /// True once a complete list has arrived: before that, an absent Node proves nothing.
    pub synced: bool,
    pub nodes: BTreeMap<String, Option<Ipv4Addr>>,
}

impl NodeSet {
    /// The number of nodes taking part in the first division of the range: every Node,
    /// and this one even if its Node is not listed yet.
    pub fn consensus_size(&self, me: &str) -> usize {
        self.nodes.len() + usize::from(!self.nodes.contains_key(me))
    }

    /// The other Nodes' addresses, to dial on `port`, in name order.
    pub fn dial_targets(&self, me: &str) -> Vec<Ipv4Addr> {
        let mut seen = BTreeSet::new();
        self.nodes
            .iter()
            .filter(|(name, _)| name.as_str() != me)
            .filter_map(|(_, a)| *a)
            .filter(|a| seen.insert(*a))
            .collect()
    }

    /// Nodes of `before` that this (synced) list no longer has.
    pub fn deleted_since(&self, before: &NodeSet) -> Vec<String> {
        if !self.synced || !before.synced {
            return Vec::new();
        }
        before
            .nodes
            .keys()
            .filter(|n| !self.nodes.contains_key(*n))
            .cloned()
            .collect()
    }
}

/// The address weft dials a Node at: its first IPv4 InternalIP, else its first IPv4
/// ExternalIP. `addresses` are (type, address) pairs as the Node's status lists them.
pub fn node_address<'a>(
    addresses: impl IntoIterator<Item = (&'a str, &'a str)>,
) -> Option<Ipv4Addr> {
    let mut external = None;
    for (kind, addr) in addresses {
        let Ok(ip) = addr.parse::<Ipv4Addr>() else {
            continue;
        };
        match kind {
            "InternalIP" => return Some(ip),
            "ExternalIP" if external.is_none() => external = Some(ip),
            _ => {}
        }
    }
    external
}

/// A Lease as far as the lock needs it (times in seconds since the epoch).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeaseState {
    pub holder: Option<String>,
    pub renewed_at: Option<i64>,
    pub duration: i64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LeaseDecision {
    /// Nobody holds it, it is ours already, or its holder let it expire.
    Take,
    /// Someone else holds it until `until`.
    HeldBy { holder: String, until: i64 },
}

/// Whether `me` may take the lease at `now`.
pub fn lease_decision(lease: &LeaseState, me: &str, now: i64) -> LeaseDecision {
    let holder = match lease.holder.as_deref() {
        None | Some("") => return LeaseDecision::Take,
        Some(h) if h == me => return LeaseDecision::Take,
        Some(h) => h,
    };
    let until = lease
        .renewed_at
        .unwrap_or(0)
        .saturating_add(lease.duration.max(0));
    if now >= until {
        LeaseDecision::Take
    } else {
        LeaseDecision::HeldBy {
            holder: holder.to_string(),
            until,
        }
    }
}

/// A ring member as the node knows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Member {
    pub peer: PeerName,
    /// Its nickname (the Node name in Kubernetes), if this node ever heard it.
    pub nickname: Option<String>,
    pub connected: bool,
}

/// Ring members whose Node is gone from the (synced) list: (peer, Node name), to reclaim;
/// and members nobody can match to a Node (their nickname was never heard), which an
/// operator has to judge.
pub fn orphaned_members(
    members: &[Member],
    nodes: &NodeSet,
) -> (Vec<(PeerName, String)>, Vec<PeerName>) {
    let mut gone = Vec::new();
    let mut unknown = Vec::new();
    if !nodes.synced {
        return (gone, unknown);
    }
    for m in members.iter().filter(|m| !m.connected) {
        match &m.nickname {
            Some(n) if !nodes.nodes.contains_key(n) => gone.push((m.peer.clone(), n.clone())),
            Some(_) => {}
            None => unknown.push(m.peer.clone()),
        }
    }
    (gone, unknown)
}

/// A Lease name for reclaiming Node `node`: `weft-reclaim-` and the Node name when that
/// is a valid object name of at most 63 characters, else a stable hash of it (Node names
/// may be 253 characters long).
pub fn reclaim_lease_name(node: &str) -> String {
    let plain = format!("weft-reclaim-{node}");
    let valid = plain.len() <= 63
        && plain
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && !plain.ends_with(['-', '.']);
    if valid {
        return plain;
    }
    // FNV-1a: stable across versions and platforms, unlike the std hasher.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in node.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("weft-reclaim-{h:016x}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(synced: bool, nodes: &[(&str, Option<&str>)]) -> NodeSet {
        NodeSet {
            synced,
            nodes: nodes
                .iter()
                .map(|(n, a)| (n.to_string(), a.map(|a| a.parse().unwrap())))
                .collect(),
        }
    }

    fn name(i: u8) -> PeerName {
        PeerName::from_bytes([2, 0x77, 0x66, 0, 0, i])
    }

    #[test]
    fn dial_every_other_node_once_and_count_this_one() {
        let s = set(
            true,
            &[
                ("a", Some("10.0.0.1")),
                ("b", Some("10.0.0.2")),
                ("c", None),
                ("d", Some("10.0.0.2")),
            ],
        );
        assert_eq!(
            s.dial_targets("a"),
            vec!["10.0.0.2".parse::<Ipv4Addr>().unwrap()]
        );
        assert_eq!(s.consensus_size("a"), 4);
        assert_eq!(s.consensus_size("e"), 5, "not listed yet, still a member");
    }

    #[test]
    fn internal_address_first_ipv4_only() {
        let pick = |v: &[(&str, &str)]| node_address(v.iter().copied());
        assert_eq!(
            pick(&[
                ("Hostname", "ip-10-0-1-5"),
                ("ExternalIP", "203.0.113.5"),
                ("InternalIP", "fd00::5"),
                ("InternalIP", "10.0.1.5"),
            ]),
            Some("10.0.1.5".parse().unwrap())
        );
        assert_eq!(
            pick(&[("ExternalIP", "203.0.113.5"), ("ExternalIP", "203.0.113.6")]),
            Some("203.0.113.5".parse().unwrap())
        );
        assert_eq!(pick(&[("Hostname", "x"), ("InternalIP", "nope")]), None);
    }

    #[test]
    fn deletions_count_only_between_complete_lists() {
        let before = set(true, &[("a", None), ("b", None), ("c", None)]);
        let after = set(true, &[("a", None), ("c", None), ("d", None)]);
        assert_eq!(after.deleted_since(&before), vec!["b".to_string()]);
        let partial = set(false, &[("a", None)]);
        assert!(partial.deleted_since(&before).is_empty());
        assert!(after.deleted_since(&partial).is_empty());
    }

    #[test]
    fn a_lease_is_taken_when_free_ours_or_expired() {
        let lease = |holder: Option<&str>, renewed: Option<i64>| LeaseState {
            holder: holder.map(str::to_string),
            renewed_at: renewed,
            duration: 60,
        };
        assert_eq!(
            lease_decision(&lease(None, None), "a", 100),
            LeaseDecision::Take
        );
        assert_eq!(
            lease_decision(&lease(Some(""), None), "a", 100),
            LeaseDecision::Take
        );
        assert_eq!(
            lease_decision(&lease(Some("a"), Some(90)), "a", 100),
            LeaseDecision::Take
        );
        assert_eq!(
            lease_decision(&lease(Some("b"), Some(90)), "a", 100),
            LeaseDecision::HeldBy {
                holder: "b".into(),
                until: 150
            }
        );
        assert_eq!(
            lease_decision(&lease(Some("b"), Some(90)), "a", 150),
            LeaseDecision::Take
        );
        assert_eq!(
            lease_decision(&lease(Some("b"), None), "a", 100),
            LeaseDecision::Take
        );
    }

    #[test]
    fn orphans_are_unconnected_members_whose_node_is_gone() {
        let nodes = set(true, &[("a", None), ("b", None)]);
        let members = [
            Member {
                peer: name(2),
                nickname: Some("b".into()),
                connected: false,
            },
            Member {
                peer: name(3),
                nickname: Some("c".into()),
                connected: false,
            },
            Member {
                peer: name(4),
                nickname: Some("d".into()),
                connected: true,
            },
            Member {
                peer: name(5),
                nickname: None,
                connected: false,
            },
        ];
        let (gone, unknown) = orphaned_members(&members, &nodes);
        assert_eq!(gone, vec![(name(3), "c".to_string())]);
        assert_eq!(unknown, vec![name(5)]);
        let (gone, _) = orphaned_members(&members, &NodeSet::default());
        assert!(gone.is_empty(), "no list yet: nobody is gone");
    }

    #[test]
    fn lease_names_are_valid_object_names() {
        assert_eq!(
            reclaim_lease_name("ip-10-0-1-5.ec2.internal"),
            "weft-reclaim-ip-10-0-1-5.ec2.internal"
        );
        let long = "n".repeat(200);
        let a = reclaim_lease_name(&long);
        assert!(a.len() <= 63 && a.starts_with("weft-reclaim-"), "{a}");
        assert_eq!(a, reclaim_lease_name(&long));
        assert_ne!(a, reclaim_lease_name(&"m".repeat(200)));
        assert!(reclaim_lease_name("Node_A").starts_with("weft-reclaim-"));
        assert_ne!(reclaim_lease_name("Node_A"), "weft-reclaim-Node_A");
    }
}
