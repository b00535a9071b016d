//! Links, addresses and routes via rtnetlink, in the namespace of the calling thread.
//!
//! A [`Netlink`] owns a current-thread tokio runtime and a netlink socket. The socket
//! belongs to the namespace the thread was in when it was created, so build one per
//! namespace on the thread that works there (see `netns.rs`).

use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::RawFd;

use futures::TryStreamExt;
use netlink_packet_route::address::AddressAttribute;
use netlink_packet_route::link::{InfoData, InfoVeth, LinkAttribute, LinkFlags, LinkMessage};
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteScope,
};
use rtnetlink::{Handle, LinkUnspec, LinkVeth, RouteMessageBuilder};

use crate::spec::Cidr;

pub use weft_contract::host_veth_name;

const ENODEV: i32 = 19;
const EEXIST: i32 = 17;
const ESRCH: i32 = 3;

#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("cannot start netlink runtime: {0}")]
    Runtime(std::io::Error),
    #[error("cannot open netlink socket: {0}")]
    Socket(std::io::Error),
    #[error("{op}: {source}")]
    Netlink {
        op: String,
        source: rtnetlink::Error,
    },
    #[error("cannot write {path}: {source}")]
    Sysctl {
        path: String,
        source: std::io::Error,
    },
}

impl LinkError {
    /// The errno the kernel answered, if this is a netlink error.
    pub fn errno(&self) -> Option<i32> {
        match self {
            LinkError::Netlink {
                source: rtnetlink::Error::NetlinkError(m),
                ..
            } => m.code.map(|c| -c.get()),
            _ => None,
        }
    }

    pub fn already_exists(&self) -> bool {
        self.errno() == Some(EEXIST)
    }
}

fn nl(op: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> LinkError {
    let op = op.into();
    move |source| LinkError::Netlink { op, source }
}

/// What the plugin needs to know about an interface.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkState {
    pub index: u32,
    pub name: String,
    pub mac: Vec<u8>,
    pub up: bool,
    pub mtu: Option<u32>,
    pub alias: Option<String>,
    /// A veth's peer: its interface index in the peer's namespace (IFLA_LINK).
    pub peer_index: Option<u32>,
}

impl LinkState {
    fn from_message(msg: &LinkMessage) -> LinkState {
        let mut state = LinkState {
            index: msg.header.index,
            name: String::new(),
            mac: Vec::new(),
            up: msg.header.flags.contains(LinkFlags::Up),
            mtu: None,
            alias: None,
            peer_index: None,
        };
        for attr in &msg.attributes {
            match attr {
                LinkAttribute::IfName(n) => state.name = n.clone(),
                LinkAttribute::Address(a) => state.mac = a.clone(),
                LinkAttribute::Mtu(m) => state.mtu = Some(*m),
                LinkAttribute::IfAlias(a) => state.alias = Some(a.clone()),
                LinkAttribute::Link(i) => state.peer_index = Some(*i),
                _ => {}
            }
        }
        state
    }
}

pub struct Netlink {
    rt: tokio::runtime::Runtime,
    handle: Handle,
}

impl Netlink {
    /// Opens a netlink connection in the calling thread's network namespace.
    pub fn new() -> Result<Netlink, LinkError> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .build()
            .map_err(LinkError::Runtime)?;
        let handle = {
            let _guard = rt.enter();
            let (conn, handle, _) = rtnetlink::new_connection().map_err(LinkError::Socket)?;
            rt.spawn(conn);
            handle
        };
        Ok(Netlink { rt, handle })
    }

    pub fn link(&self, name: &str) -> Result<Option<LinkState>, LinkError> {
        let res = self.rt.block_on(
            self.handle
                .link()
                .get()
                .match_name(name.to_string())
                .execute()
                .try_next(),
        );
        match res {
            Ok(msg) => Ok(msg.as_ref().map(LinkState::from_message)),
            Err(e) => {
                let err = nl(format!("looking up interface {name}"))(e);
                if err.errno() == Some(ENODEV) {
                    Ok(None)
                } else {
                    Err(err)
                }
            }
        }
    }

    /// Every interface of the namespace.
    pub fn links(&self) -> Result<Vec<LinkState>, LinkError> {
        let msgs: Vec<LinkMessage> = self
            .rt
            .block_on(self.handle.link().get().execute().try_collect())
            .map_err(nl("listing interfaces"))?;
        Ok(msgs.iter().map(LinkState::from_message).collect())
    }

    /// The interface with this index, if any.
    pub fn link_by_index(&self, index: u32) -> Result<Option<LinkState>, LinkError> {
        let res = self.rt.block_on(
            self.handle
                .link()
                .get()
                .match_index(index)
                .execute()
                .try_next(),
        );
        match res {
            Ok(msg) => Ok(msg.as_ref().map(LinkState::from_message)),
            Err(e) => {
                let err = nl(format!("looking up interface {index}"))(e);
                if err.errno() == Some(ENODEV) {
                    Ok(None)
                } else {
                    Err(err)
                }
            }
        }
    }

    /// IPv4 addresses on the interface, with their prefix lengths.
    pub fn ipv4_addrs(&self, index: u32) -> Result<Vec<Cidr>, LinkError> {
        let msgs: Vec<_> = self
            .rt
            .block_on(
                self.handle
                    .address()
                    .get()
                    .set_link_index_filter(index)
                    .execute()
                    .try_collect(),
            )
            .map_err(nl(format!("listing addresses of interface {index}")))?;
        let mut out = Vec::new();
        for msg in msgs {
            // On point-to-point links (TUN) IFA_ADDRESS may be the peer; IFA_LOCAL is ours.
            let local = msg.attributes.iter().find_map(|a| match a {
                AddressAttribute::Local(IpAddr::V4(ip)) => Some(*ip),
                _ => None,
            });
            let address = msg.attributes.iter().find_map(|a| match a {
                AddressAttribute::Address(IpAddr::V4(ip)) => Some(*ip),
                _ => None,
            });
            if let Some(addr) = local.or(address) {
                out.push(Cidr {
                    addr,
                    prefix: msg.header.prefix_len,
                });
            }
        }
        Ok(out)
    }

    /// Creates the veth pair with the peer born directly inside the container's
    /// namespace under its final name: one atomic request, so no temporary name ever
    /// appears on the node and a crash cannot leave half a pair behind.
    pub fn create_veth(
        &self,
        host: &str,
        peer: &str,
        peer_netns: RawFd,
        mtu: u32,
    ) -> Result<(), LinkError> {
        let peer_msg = LinkUnspec::new_with_name(peer)
            .mtu(mtu)
            .setns_by_fd(peer_netns)
            .build();
        let msg = LinkVeth::new(host, peer)
            .mtu(mtu)
            .set_info_data(InfoData::Veth(InfoVeth::Peer(peer_msg)))
            .build();
        self.rt
            .block_on(self.handle.link().add(msg).execute())
            .map_err(nl(format!(
                "creating veth pair {host} (node) / {peer} (container)"
            )))
    }

    /// Brings the link up, optionally tagging it with an alias.
    pub fn set_up(&self, index: u32, alias: Option<&str>) -> Result<(), LinkError> {
        let mut b = LinkUnspec::new_with_index(index).up();
        if let Some(a) = alias {
            b = b.alias(a);
        }
        self.rt
            .block_on(self.handle.link().set(b.build()).execute())
            .map_err(nl(format!("bringing up interface {index}")))
    }

    pub fn add_address(&self, index: u32, cidr: Cidr) -> Result<(), LinkError> {
        self.rt
            .block_on(
                self.handle
                    .address()
                    .add(index, IpAddr::V4(cidr.addr), cidr.prefix)
                    .execute(),
            )
            .map_err(nl(format!("adding address {cidr} to interface {index}")))
    }

    /// `dst/32 dev <index> scope link`. No preferred source: the kernel deletes every
    /// route whose `src` address disappears, and the node's overlay address disappears
    /// with the TUN device whenever the daemon restarts, which would cut the node off
    /// from its own pods (and hide them from the daemon's re-claim scan).
    pub fn add_host_route(&self, index: u32, dst: Ipv4Addr) -> Result<(), LinkError> {
        let msg = RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(dst, 32)
            .output_interface(index)
            .scope(RouteScope::Link)
            .build();
        self.rt
            .block_on(self.handle.route().add(msg).execute())
            .map_err(nl(format!("adding route {dst}/32 via interface {index}")))
    }

    /// `default via <gw> dev <index> [onlink]`
    pub fn add_default_route(
        &self,
        index: u32,
        gw: Ipv4Addr,
        onlink: bool,
    ) -> Result<(), LinkError> {
        let mut b = RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(Ipv4Addr::UNSPECIFIED, 0)
            .gateway(gw)
            .output_interface(index);
        if onlink {
            b = b.onlink();
        }
        self.rt
            .block_on(self.handle.route().add(b.build()).execute())
            .map_err(nl(format!("adding default route via {gw}")))
    }

    /// IPv4 routes of the main table.
    pub fn main_routes(&self) -> Result<Vec<RouteMessage>, LinkError> {
        let msgs: Vec<RouteMessage> = self
            .rt
            .block_on(
                self.handle
                    .route()
                    .get(RouteMessageBuilder::<Ipv4Addr>::new().build())
                    .execute()
                    .try_collect(),
            )
            .map_err(nl("listing routes"))?;
        Ok(msgs
            .into_iter()
            .filter(|m| route_table(m) == u32::from(RouteHeader::RT_TABLE_MAIN))
            .collect())
    }

    /// Deletes a link; true if it existed.
    pub fn delete(&self, index: u32) -> Result<bool, LinkError> {
        match self
            .rt
            .block_on(self.handle.link().del(index).execute())
            .map_err(nl(format!("deleting interface {index}")))
        {
            Ok(()) => Ok(true),
            Err(e) if matches!(e.errno(), Some(ENODEV) | Some(ESRCH)) => Ok(false),
            Err(e) => Err(e),
        }
    }
}

fn route_table(m: &RouteMessage) -> u32 {
    m.attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Table(t) => Some(*t),
            _ => None,
        })
        .unwrap_or(u32::from(m.header.table))
}

/// True if `routes` holds a default route via `gw` out of interface `index`.
pub fn has_default_route(routes: &[RouteMessage], index: u32, gw: Ipv4Addr) -> bool {
    routes.iter().any(|m| {
        m.header.destination_prefix_length == 0
            && m.attributes
                .iter()
                .any(|a| matches!(a, RouteAttribute::Gateway(RouteAddress::Inet(g)) if *g == gw))
            && m.attributes
                .iter()
                .any(|a| matches!(a, RouteAttribute::Oif(i) if *i == index))
    })
}

/// True if `routes` holds `dst/32` out of interface `index`.
pub fn has_host_route(routes: &[RouteMessage], index: u32, dst: Ipv4Addr) -> bool {
    routes.iter().any(|m| {
        m.header.destination_prefix_length == 32
            && m.attributes.iter().any(
                |a| matches!(a, RouteAttribute::Destination(RouteAddress::Inet(d)) if *d == dst),
            )
            && m.attributes
                .iter()
                .any(|a| matches!(a, RouteAttribute::Oif(i) if *i == index))
    })
}

/// Writes a /proc/sys value. /proc/sys/net resolves against the writing thread's
/// network namespace, so call this on the thread that is in the right one.
pub fn write_sysctl(path: &str, value: &str) -> Result<(), LinkError> {
    std::fs::write(path, value).map_err(|source| LinkError::Sysctl {
        path: path.to_string(),
        source,
    })
}

/// Turns IPv6 off on an interface so it neither sends router/neighbour solicitations
/// nor accepts router advertisements (CVE-2020-11091 class). Best effort: a kernel
/// without IPv6 has no such files, which is the state we want anyway.
pub fn disable_ipv6(ifname: &str) {
    for (key, value) in [("accept_ra", "0"), ("disable_ipv6", "1")] {
        let path = format!("/proc/sys/net/ipv6/conf/{ifname}/{key}");
        if let Err(e) = write_sysctl(&path, value) {
            if !matches!(&e, LinkError::Sysctl { source, .. } if source.kind() == std::io::ErrorKind::NotFound)
            {
                eprintln!("weft-cni: {e} (ignored)");
            }
        }
    }
}

/// Whether `gw` lies inside the pod's subnet, i.e. a plain (not onlink) route works.
pub fn in_subnet(cidr: Cidr, gw: Ipv4Addr) -> bool {
    if cidr.prefix == 0 {
        return true;
    }
    let mask = u32::MAX << (32 - u32::from(cidr.prefix.min(32)));
    (u32::from(cidr.addr) & mask) == (u32::from(gw) & mask)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_veth_names_are_valid_interface_names() {
        assert!(crate::config::valid_ifname(&host_veth_name("abc")));
    }

    #[test]
    fn subnet_membership() {
        let c = Cidr {
            addr: Ipv4Addr::new(192, 168, 3, 4),
            prefix: 16,
        };
        assert!(in_subnet(c, Ipv4Addr::new(192, 168, 0, 1)));
        assert!(!in_subnet(c, Ipv4Addr::new(192, 169, 0, 1)));
        let host = Cidr { prefix: 32, ..c };
        assert!(!in_subnet(host, Ipv4Addr::new(192, 168, 0, 1)));
        assert!(in_subnet(host, c.addr));
        assert!(in_subnet(
            Cidr { prefix: 0, ..c },
            Ipv4Addr::new(1, 2, 3, 4)
        ));
    }

    #[test]
    fn default_route_detection() {
        let gw = Ipv4Addr::new(192, 168, 0, 1);
        let route = RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(Ipv4Addr::UNSPECIFIED, 0)
            .gateway(gw)
            .output_interface(5)
            .build();
        assert!(has_default_route(std::slice::from_ref(&route), 5, gw));
        assert!(!has_default_route(std::slice::from_ref(&route), 6, gw));
        assert!(!has_default_route(
            &[route],
            5,
            Ipv4Addr::new(192, 168, 0, 2)
        ));
        let not_default = RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(Ipv4Addr::new(10, 0, 0, 0), 8)
            .gateway(gw)
            .output_interface(5)
            .build();
        assert!(!has_default_route(
            std::slice::from_ref(&not_default),
            5,
            gw
        ));
        assert!(!has_host_route(
            &[not_default],
            5,
            Ipv4Addr::new(10, 0, 0, 0)
        ));
        let host = RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(Ipv4Addr::new(192, 168, 0, 5), 32)
            .output_interface(7)
            .build();
        assert!(has_host_route(
            std::slice::from_ref(&host),
            7,
            Ipv4Addr::new(192, 168, 0, 5)
        ));
        assert!(!has_host_route(
            std::slice::from_ref(&host),
            8,
            Ipv4Addr::new(192, 168, 0, 5)
        ));
        assert!(!has_host_route(&[host], 7, Ipv4Addr::new(192, 168, 0, 6)));
    }
}
