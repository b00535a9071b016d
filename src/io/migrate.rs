//! What `core::migrate` needs from the system: Weave's links on the node, and the links of
//! every network namespace the daemon can see (pinned under /var/run/netns, as containerd
//! and CRI-O pin pods' namespaces, and those of processes in /proc when it shares the
//! host's PID namespace).

use super::netlink::{link_name, Netlink, NetlinkError};
use crate::core::migrate::{BridgePort, NamespaceLink, WEAVE_BRIDGE, WEAVE_LINKS};
use futures::TryStreamExt;
use netlink_packet_route::address::{AddressAttribute, AddressMessage};
use netlink_packet_route::link::{InfoKind, LinkAttribute, LinkInfo, LinkMessage};
use netlink_packet_route::AddressFamily;
use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// Weave's links found on the node.
#[derive(Debug, Default)]
pub struct WeaveLeftovers {
    /// Weave's bridge, if `weave` is one (weft's own TUN device is never taken for it).
    pub bridge: Option<u32>,
    pub ports: Vec<BridgePort>,
    /// Weave's other links, by name and index.
    pub others: Vec<(String, u32)>,
}

impl WeaveLeftovers {
    pub fn is_empty(&self) -> bool {
        self.bridge.is_none() && self.others.is_empty()
    }
}

fn kind(l: &LinkMessage) -> Option<&InfoKind> {
    l.attributes.iter().find_map(|a| match a {
        LinkAttribute::LinkInfo(infos) => infos.iter().find_map(|i| match i {
            LinkInfo::Kind(k) => Some(k),
            _ => None,
        }),
        _ => None,
    })
}

fn peer_index(l: &LinkMessage) -> Option<u32> {
    l.attributes.iter().find_map(|a| match a {
        LinkAttribute::Link(i) => Some(*i),
        _ => None,
    })
}

fn controller(l: &LinkMessage) -> Option<u32> {
    l.attributes.iter().find_map(|a| match a {
        LinkAttribute::Controller(i) => Some(*i),
        _ => None,
    })
}

impl Netlink {
    pub async fn weave_leftovers(&self) -> Result<WeaveLeftovers, NetlinkError> {
        let links = self.links().await?;
        let bridge = links
            .iter()
            .find(|l| link_name(l) == Some(WEAVE_BRIDGE) && kind(l) == Some(&InfoKind::Bridge))
            .map(|l| l.header.index);
        let ports = match bridge {
            None => Vec::new(),
            Some(b) => links
                .iter()
                .filter(|l| controller(l) == Some(b))
                .filter_map(|l| {
                    let name = link_name(l)?;
                    name.starts_with(weft_contract::HOST_VETH_PREFIX)
                        .then(|| BridgePort {
                            name: name.to_string(),
                            index: l.header.index,
                            peer_index: peer_index(l),
                        })
                })
                .collect(),
        };
        let others = WEAVE_LINKS
            .iter()
            .filter_map(|name| {
                let l = links.iter().find(|l| link_name(l) == Some(name))?;
                Some((name.to_string(), l.header.index))
            })
            .collect();
        Ok(WeaveLeftovers {
            bridge,
            ports,
            others,
        })
    }

    pub async fn delete_link(&self, index: u32) -> Result<(), NetlinkError> {
        self.handle().link().del(index).execute().await?;
        Ok(())
    }

    pub async fn link_names(&self) -> Result<BTreeSet<String>, NetlinkError> {
        Ok(self
            .links()
            .await?
            .iter()
            .filter_map(|l| link_name(l).map(str::to_string))
            .collect())
    }
}

/// Network namespaces this process can see, one path per namespace (several paths may
/// name the same one), this process's own excluded.
fn namespace_paths() -> Vec<PathBuf> {
    let own = std::fs::metadata("/proc/self/ns/net")
        .ok()
        .map(|m| (m.dev(), m.ino()));
    let mut candidates: Vec<PathBuf> = Vec::new();
    for dir in ["/var/run/netns", "/run/netns"] {
        if let Ok(rd) = std::fs::read_dir(dir) {
            candidates.extend(rd.flatten().map(|e| e.path()));
        }
    }
    if let Ok(rd) = std::fs::read_dir("/proc") {
        candidates.extend(
            rd.flatten()
                .filter(|e| {
                    e.file_name()
                        .to_string_lossy()
                        .bytes()
                        .all(|b| b.is_ascii_digit())
                })
                .map(|e| e.path().join("ns/net")),
        );
    }
    let mut seen = BTreeSet::new();
    if let Some(o) = own {
        seen.insert(o);
    }
    candidates
        .into_iter()
        .filter(|p| {
            std::fs::metadata(p)
                .map(|m| seen.insert((m.dev(), m.ino())))
                .unwrap_or(false)
        })
        .collect()
}

/// The links, with IPv4 addresses, of every other network namespace. Runs on a thread of
/// its own: entering a namespace is per thread and must not touch the runtime's workers.
/// A namespace that cannot be entered (gone meanwhile, no permission) is skipped.
pub fn scan_namespaces() -> Vec<Vec<NamespaceLink>> {
    let paths = namespace_paths();
    if paths.is_empty() {
        return Vec::new();
    }
    std::thread::spawn(move || {
        let Ok(rt) = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        else {
            return Vec::new();
        };
        paths
            .iter()
            .filter_map(|p| rt.block_on(links_in(p)).ok())
            .collect()
    })
    .join()
    .unwrap_or_default()
}

async fn links_in(path: &Path) -> Result<Vec<NamespaceLink>, NetlinkError> {
    let f = std::fs::File::open(path)?;
    nix::sched::setns(&f, nix::sched::CloneFlags::CLONE_NEWNET)
        .map_err(|e| NetlinkError::Socket(e.into()))?;
    // The socket belongs to the namespace the thread is in when it is created.
    let (conn, handle, _) = rtnetlink::new_connection()?;
    let task = tokio::spawn(conn);
    let result = async {
        let links: Vec<LinkMessage> = handle.link().get().execute().try_collect().await?;
        let addrs: Vec<AddressMessage> = handle.address().get().execute().try_collect().await?;
        let mut by_index: BTreeMap<u32, Vec<Ipv4Addr>> = BTreeMap::new();
        for m in addrs
            .iter()
            .filter(|m| m.header.family == AddressFamily::Inet)
        {
            for a in &m.attributes {
                if let AddressAttribute::Local(IpAddr::V4(ip)) = a {
                    by_index.entry(m.header.index).or_default().push(*ip);
                }
            }
        }
        Ok::<_, NetlinkError>(
            links
                .iter()
                .map(|l| NamespaceLink {
                    index: l.header.index,
                    peer_index: peer_index(l),
                    addrs: by_index.remove(&l.header.index).unwrap_or_default(),
                })
                .collect(),
        )
    }
    .await;
    task.abort();
    result
}
