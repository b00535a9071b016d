//! Taking a node over from Weave Net: which of Weave's links go, which addresses its pods
//! still hold. Pure: the netlink adapter (`io::migrate`) gathers the links of the node and
//! of every network namespace it can see, and acts on what these functions decide.
//!
//! Weave attached a pod with a veth pair: `vethwepl<id>` on the node, enslaved to the
//! `weave` bridge, and `eth0` in the pod with an address from the range. The pair is
//! recognised from both ends (each end's peer index names the other), so an unrelated
//! veth in some other namespace that happens to share an index never matches.

use ipnet::Ipv4Net;
use std::collections::BTreeSet;
use std::net::Ipv4Addr;

/// The bridge Weave attached pods to; weft's TUN device takes its name.
pub const WEAVE_BRIDGE: &str = "weave";
/// Weave's other links on a node: the bridge's ports to its fast datapath (an Open vSwitch
/// datapath named `datapath`) and its VXLAN device. Left behind, they hold port 6784.
pub const WEAVE_LINKS: [&str; 4] = ["vethwe-bridge", "vethwe-datapath", "datapath", "vxlan-6784"];
/// The owner id under which an address held by a Weave-attached pod is re-claimed: the
/// node-side veth names the pod while it exists (Weave's plugin used the container id, which
/// cannot be read back from the node).
pub const MIGRATED_ID_PREFIX: &str = "weave-migrated:";

/// A port of Weave's bridge on the node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BridgePort {
    pub name: String,
    pub index: u32,
    /// The index of the other end, in the pod's namespace (IFLA_LINK).
    pub peer_index: Option<u32>,
}

/// A link in some network namespace, with its IPv4 addresses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NamespaceLink {
    pub index: u32,
    /// The index of the other end of a veth (IFLA_LINK), in the node's namespace for a pod's
    /// end.
    pub peer_index: Option<u32>,
    pub addrs: Vec<Ipv4Addr>,
}

/// The `(owner id, address)` pairs to re-claim: addresses in `range` on the pod end of a
/// veth whose node end is a port of Weave's bridge. `namespaces` holds the links of each
/// namespace seen (the node's own among them is harmless: its ends do not point at each
/// other).
pub fn weave_pod_addresses(
    ports: &[BridgePort],
    namespaces: &[Vec<NamespaceLink>],
    range: Ipv4Net,
) -> Vec<(String, Ipv4Addr)> {
    let mut found = BTreeSet::new();
    for port in ports {
        let Some(pod_index) = port.peer_index else {
            continue;
        };
        for links in namespaces {
            for link in links {
                if link.index != pod_index || link.peer_index != Some(port.index) {
                    continue;
                }
                for a in &link.addrs {
                    if range.contains(a) {
                        found.insert((migrated_id(&port.name), *a));
                    }
                }
            }
        }
    }
    found.into_iter().collect()
}

pub fn migrated_id(host_veth: &str) -> String {
    format!("{MIGRATED_ID_PREFIX}{host_veth}")
}

/// Of the ids the IPAM holds, the migrated ones whose node-side veth is gone (the pod was
/// deleted): their addresses can be freed.
pub fn released_migrations<'a>(
    owned_ids: impl IntoIterator<Item = &'a str>,
    links: &BTreeSet<String>,
) -> Vec<String> {
    owned_ids
        .into_iter()
        .filter_map(|id| {
            let veth = id.strip_prefix(MIGRATED_ID_PREFIX)?;
            (!links.contains(veth)).then(|| id.to_string())
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn range() -> Ipv4Net {
        "192.168.0.0/16".parse().unwrap()
    }

    fn port(name: &str, index: u32, peer: u32) -> BridgePort {
        BridgePort {
            name: name.into(),
            index,
            peer_index: Some(peer),
        }
    }

    fn link(index: u32, peer: Option<u32>, addrs: &[&str]) -> NamespaceLink {
        NamespaceLink {
            index,
            peer_index: peer,
            addrs: addrs.iter().map(|a| a.parse().unwrap()).collect(),
        }
    }

    #[test]
    fn a_pod_is_recognised_from_both_ends_of_its_veth() {
        let ports = [
            port("vethwepl1111111", 10, 2),
            port("vethwepl2222222", 11, 2),
        ];
        let namespaces = vec![
            // Pod A: lo and eth0 (index 2, peer 10).
            vec![
                link(1, None, &["127.0.0.1"]),
                link(2, Some(10), &["192.168.3.4"]),
            ],
            // Pod B: eth0 also has index 2 in its own namespace, peer 11.
            vec![link(2, Some(11), &["192.168.9.9", "10.1.1.1"])],
            // Some other namespace with a veth of index 2 whose peer is not a port.
            vec![link(2, Some(99), &["192.168.7.7"])],
        ];
        assert_eq!(
            weave_pod_addresses(&ports, &namespaces, range()),
            vec![
                (
                    "weave-migrated:vethwepl1111111".to_string(),
                    "192.168.3.4".parse().unwrap()
                ),
                (
                    "weave-migrated:vethwepl2222222".to_string(),
                    "192.168.9.9".parse().unwrap()
                ),
            ]
        );
    }

    #[test]
    fn addresses_outside_the_range_are_not_weft_s_concern() {
        let ports = [port("vethwepl1111111", 10, 2)];
        let namespaces = vec![vec![link(2, Some(10), &["10.32.0.5"])]];
        assert!(weave_pod_addresses(&ports, &namespaces, range()).is_empty());
    }

    #[test]
    fn the_same_namespace_seen_twice_counts_once() {
        let ports = [port("vethwepl1111111", 10, 2)];
        let ns = vec![link(2, Some(10), &["192.168.3.4"])];
        assert_eq!(
            weave_pod_addresses(&ports, &[ns.clone(), ns], range()).len(),
            1
        );
    }

    #[test]
    fn migrated_addresses_are_released_once_their_veth_is_gone() {
        let links: BTreeSet<String> = ["eth0", "vethwepl1111111"].map(String::from).into();
        let owned = [
            "weave-migrated:vethwepl1111111",
            "weave-migrated:vethwepl2222222",
            "3f1c0ffee",
            "weave:expose",
        ];
        assert_eq!(
            released_migrations(owned, &links),
            vec!["weave-migrated:vethwepl2222222".to_string()]
        );
    }

    #[test]
    fn migrated_ids_are_valid_container_ids() {
        let id = migrated_id("vethwepl1234567");
        assert!(weft_contract::ContainerId::parse(&id).is_ok(), "{id}");
    }
}
