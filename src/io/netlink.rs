//! Netlink plumbing for the daemon's own node: the overlay address on the TUN device and
//! the underlay MTU. Uses rtnetlink on the caller's tokio runtime; nothing shells out.

use futures::TryStreamExt;
use ipnet::Ipv4Net;
use netlink_packet_route::address::{AddressAttribute, AddressMessage};
use netlink_packet_route::link::{LinkAttribute, LinkFlags, LinkMessage};
use netlink_packet_route::route::{RouteAddress, RouteAttribute, RouteMessage};
use netlink_packet_route::AddressFamily;
use rtnetlink::{Handle, LinkUnspec, RouteMessageBuilder};
use std::net::{IpAddr, Ipv4Addr};

#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    #[error("cannot open a netlink socket: {0}")]
    Socket(#[from] std::io::Error),
    #[error("netlink request failed: {0}")]
    Request(#[from] rtnetlink::Error),
    #[error("no network interface named {0:?}")]
    NoSuchLink(String),
}

pub struct Netlink {
    handle: Handle,
}

impl Netlink {
    /// Opens a connection in the current network namespace; must run inside a tokio
    /// runtime.
    pub fn open() -> Result<Netlink, NetlinkError> {
        let (conn, handle, _) = rtnetlink::new_connection()?;
        tokio::spawn(conn);
        Ok(Netlink { handle })
    }

    pub(crate) fn handle(&self) -> &Handle {
        &self.handle
    }

    pub(crate) async fn links(&self) -> Result<Vec<LinkMessage>, NetlinkError> {
        Ok(self.handle.link().get().execute().try_collect().await?)
    }

    /// The MAC of the far end of veth `name` (a pod's interface, in the pod's namespace),
    /// asked of the kernel by the namespace id it gives the peer (IFLA_TARGET_NETNSID), so
    /// the pod's namespace is never entered. `None` if there is no such veth.
    pub async fn veth_peer_mac(&self, name: &str) -> Result<Option<Vec<u8>>, NetlinkError> {
        let Ok(msgs) = self
            .handle
            .link()
            .get()
            .match_name(name.to_string())
            .execute()
            .try_collect::<Vec<LinkMessage>>()
            .await
        else {
            return Ok(None);
        };
        let Some(m) = msgs.first() else {
            return Ok(None);
        };
        let peer = m.attributes.iter().find_map(|a| match a {
            LinkAttribute::Link(i) => Some(*i),
            _ => None,
        });
        let nsid = m.attributes.iter().find_map(|a| match a {
            LinkAttribute::LinkNetNsId(i) => Some(*i),
            _ => None,
        });
        let (Some(peer), Some(nsid)) = (peer, nsid) else {
            return Ok(None);
        };
        let mut req = self.handle.link().get().match_index(peer);
        req.message_mut()
            .attributes
            .push(LinkAttribute::IfNetnsId(nsid));
        let msgs: Vec<LinkMessage> = req.execute().try_collect().await?;
        Ok(msgs.first().and_then(|m| {
            m.attributes.iter().find_map(|a| match a {
                LinkAttribute::Address(mac) => Some(mac.clone()),
                _ => None,
            })
        }))
    }

    pub(crate) async fn ipv4_addresses(&self) -> Result<Vec<(u32, Ipv4Net)>, NetlinkError> {
        let msgs: Vec<AddressMessage> = self.handle.address().get().execute().try_collect().await?;
        Ok(msgs
            .iter()
            .filter(|m| m.header.family == AddressFamily::Inet)
            .filter_map(|m| {
                m.attributes.iter().find_map(|a| match a {
                    AddressAttribute::Local(IpAddr::V4(ip)) => {
                        Ipv4Net::new(*ip, m.header.prefix_len)
                            .ok()
                            .map(|n| (m.header.index, n))
                    }
                    _ => None,
                })
            })
            .collect())
    }

    async fn ipv4_routes(&self) -> Result<Vec<RouteMessage>, NetlinkError> {
        Ok(self
            .handle
            .route()
            .get(RouteMessageBuilder::<Ipv4Addr>::new().build())
            .execute()
            .try_collect()
            .await?)
    }

    pub async fn link_index(&self, name: &str) -> Result<u32, NetlinkError> {
        self.links()
            .await?
            .iter()
            .find(|l| link_name(l) == Some(name))
            .map(|l| l.header.index)
            .ok_or_else(|| NetlinkError::NoSuchLink(name.to_string()))
    }

    /// Makes `addr` the only IPv4 address of the link: a restart that got the same address
    /// changes nothing; a stale different address is removed.
    pub async fn set_only_address(&self, link: &str, addr: Ipv4Net) -> Result<(), NetlinkError> {
        let index = self.link_index(link).await?;
        let msgs: Vec<AddressMessage> = self
            .handle
            .address()
            .get()
            .set_link_index_filter(index)
            .execute()
            .try_collect()
            .await?;
        let mut present = false;
        for m in msgs
            .into_iter()
            .filter(|m| m.header.family == AddressFamily::Inet)
        {
            let local = m.attributes.iter().find_map(|a| match a {
                AddressAttribute::Local(IpAddr::V4(ip)) => Some(*ip),
                _ => None,
            });
            if local == Some(addr.addr()) && m.header.prefix_len == addr.prefix_len() {
                present = true;
            } else {
                self.handle.address().del(m).execute().await?;
            }
        }
        if !present {
            self.handle
                .address()
                .add(index, IpAddr::V4(addr.addr()), addr.prefix_len())
                .execute()
                .await?;
        }
        Ok(())
    }

    pub async fn set_link_up_mtu(&self, link: &str, mtu: u32) -> Result<(), NetlinkError> {
        let index = self.link_index(link).await?;
        let msg = LinkUnspec::new_with_index(index).mtu(mtu).up().build();
        self.handle.link().set(msg).execute().await?;
        Ok(())
    }

    /// The MTU of the interface packets to the peers leave by: the one whose subnet holds a
    /// peer's address, else the one carrying the default route.
    pub async fn underlay_mtu(&self, peers: &[Ipv4Addr]) -> Result<Option<u32>, NetlinkError> {
        let links = self.links().await?;
        let mtu_of = |index: u32| {
            links
                .iter()
                .find(|l| l.header.index == index)
                .and_then(link_mtu)
        };
        let addrs = self.ipv4_addresses().await?;
        for peer in peers {
            if let Some((index, _)) = addrs.iter().find(|(_, net)| net.contains(peer)) {
                if let Some(m) = mtu_of(*index) {
                    return Ok(Some(m));
                }
            }
        }
        let routes = self.ipv4_routes().await?;
        for r in routes {
            if r.header.destination_prefix_length != 0 {
                continue;
            }
            let is_default = !r.attributes.iter().any(|a| {
                matches!(a, RouteAttribute::Destination(RouteAddress::Inet(d)) if !d.is_unspecified())
            });
            let oif = r.attributes.iter().find_map(|a| match a {
                RouteAttribute::Oif(i) => Some(*i),
                _ => None,
            });
            if let (true, Some(i)) = (is_default, oif) {
                if let Some(m) = mtu_of(i) {
                    return Ok(Some(m));
                }
            }
        }
        // No peer subnet and no default route: take the smallest MTU of the other
        // interfaces that are up, so encapsulated packets fit wherever they leave.
        Ok(links
            .iter()
            .filter(|l| l.header.flags.contains(LinkFlags::Up))
            .filter(|l| !l.header.flags.contains(LinkFlags::Loopback))
            .filter(|l| link_name(l) != Some(crate::config::TUN_NAME))
            .filter(|l| addrs.iter().any(|(i, _)| *i == l.header.index))
            .filter_map(link_mtu)
            .min())
    }
}

impl Netlink {
    /// Addresses held by local pods, as weft-cni left them: a host veth named
    /// `vethwepl...` whose alias is the container id, and a /32 route to the pod through
    /// it. After a restart that lost or predates some state, these are re-claimed so that
    /// no running pod's address is handed out again.
    pub async fn pod_addresses(&self) -> Result<Vec<(String, Ipv4Addr)>, NetlinkError> {
        let links = self.links().await?;
        let pods: Vec<(u32, String)> = links
            .iter()
            .filter(|l| link_name(l).is_some_and(|n| n.starts_with(POD_VETH_PREFIX)))
            .filter_map(|l| {
                let alias = l.attributes.iter().find_map(|a| match a {
                    LinkAttribute::IfAlias(s) if !s.is_empty() => Some(s.clone()),
                    _ => None,
                })?;
                Some((l.header.index, alias))
            })
            .collect();
        if pods.is_empty() {
            return Ok(Vec::new());
        }
        let routes = self.ipv4_routes().await?;
        let mut found = Vec::new();
        for r in routes {
            if r.header.destination_prefix_length != 32 {
                continue;
            }
            let dst = r.attributes.iter().find_map(|a| match a {
                RouteAttribute::Destination(RouteAddress::Inet(d)) => Some(*d),
                _ => None,
            });
            let oif = r.attributes.iter().find_map(|a| match a {
                RouteAttribute::Oif(i) => Some(*i),
                _ => None,
            });
            if let (Some(dst), Some(oif)) = (dst, oif) {
                if let Some((_, id)) = pods.iter().find(|(i, _)| *i == oif) {
                    found.push((id.clone(), dst));
                }
            }
        }
        found.sort();
        Ok(found)
    }
}

use weft_contract::HOST_VETH_PREFIX as POD_VETH_PREFIX;

pub(crate) fn link_name(l: &LinkMessage) -> Option<&str> {
    l.attributes.iter().find_map(|a| match a {
        LinkAttribute::IfName(n) => Some(n.as_str()),
        _ => None,
    })
}

fn link_mtu(l: &LinkMessage) -> Option<u32> {
    l.attributes.iter().find_map(|a| match a {
        LinkAttribute::Mtu(m) => Some(*m),
        _ => None,
    })
}
