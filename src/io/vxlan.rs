//! The kernel VXLAN device of `--datapath kernel`, over netlink: the link itself, and the
//! forwarding entries, neighbours and routes that `core::datapath::kernel` plans. Every
//! add is a replace, so carrying out a change twice is harmless; a delete of something
//! already gone counts as done.

use super::netlink::{link_name, Netlink, NetlinkError};
use crate::core::datapath::kernel::{KernelChange, KernelRoute};
use futures::TryStreamExt;
use ipnet::Ipv4Net;
use netlink_packet_route::link::{InfoKind, LinkAttribute, LinkInfo, VxlanDf};
use netlink_packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage, NeighbourState,
};
use netlink_packet_route::route::{RouteMessage, RouteProtocol, RouteType};
use netlink_packet_route::AddressFamily;
use rtnetlink::{LinkVxlan, RouteMessageBuilder};
use std::net::{IpAddr, Ipv4Addr};

/// The protocol number on every route weft installs, so that its own routes are told
/// apart from everyone else's (`ip route show proto 119`) and found again after a crash.
pub const ROUTE_PROTOCOL: u8 = 0x77;

/// ENOENT/ESRCH as netlink returns them for a delete of something not there.
fn is_gone(e: &rtnetlink::Error) -> bool {
    matches!(e, rtnetlink::Error::NetlinkError(m)
        if m.code.map(|c| c.get()) == Some(-libc::ENOENT) || m.code.map(|c| c.get()) == Some(-libc::ESRCH))
}

/// What the device is created with.
#[derive(Debug, Clone)]
pub struct VxlanDevice<'a> {
    pub name: &'a str,
    pub vni: u32,
    pub port: u16,
    /// The device's own MAC: the node's peer name, the inner destination every peer
    /// (kernel or user-space) puts on frames to this node.
    pub mac: [u8; 6],
    pub mtu: u32,
}

impl Netlink {
    /// Creates the VXLAN device afresh: a link of that name left by an earlier run (or a
    /// TUN device of the user-space mode) is deleted with everything routed through it,
    /// and so are the `unreachable` routes weft left (they hang on no device).
    /// Learning and the miss notifications are off (every entry is programmed), UDP
    /// checksums are on (as the user-space path sends them) and DF is copied from the
    /// inner packet, so that path MTU discovery works through the overlay.
    pub async fn create_vxlan(&self, dev: &VxlanDevice<'_>) -> Result<u32, NetlinkError> {
        if let Some(old) = self
            .links()
            .await?
            .iter()
            .find(|l| link_name(l) == Some(dev.name))
        {
            match self.handle().link().del(old.header.index).execute().await {
                Ok(()) => {}
                Err(e) if is_gone(&e) => {}
                Err(e) => return Err(e.into()),
            }
        }
        self.delete_own_routes().await?;
        let msg = LinkVxlan::new(dev.name, dev.vni)
            .port(dev.port)
            .learning(false)
            .l2miss(false)
            .l3miss(false)
            .udp_csum(true)
            .df(VxlanDf::Inherit)
            .address(dev.mac.to_vec())
            .mtu(dev.mtu)
            .up()
            .build();
        self.handle().link().add(msg).execute().await?;
        self.link_index(dev.name).await
    }

    /// Removes a VXLAN device `name` that the kernel mode left (the user-space mode is
    /// starting in its place), with weft's routes; `false` if there was none.
    pub async fn remove_vxlan(&self, name: &str) -> Result<bool, NetlinkError> {
        let Some(index) = self
            .links()
            .await?
            .iter()
            .find(|l| {
                link_name(l) == Some(name)
                    && l.attributes.iter().any(|a| {
                        matches!(a, LinkAttribute::LinkInfo(infos)
                        if infos.iter().any(|i| matches!(i, LinkInfo::Kind(InfoKind::Vxlan))))
                    })
            })
            .map(|l| l.header.index)
        else {
            return Ok(false);
        };
        match self.handle().link().del(index).execute().await {
            Ok(()) => {}
            Err(e) if is_gone(&e) => {}
            Err(e) => return Err(e.into()),
        }
        self.delete_own_routes().await?;
        Ok(true)
    }

    async fn delete_own_routes(&self) -> Result<(), NetlinkError> {
        let routes: Vec<RouteMessage> = self
            .handle()
            .route()
            .get(RouteMessageBuilder::<Ipv4Addr>::new().build())
            .execute()
            .try_collect()
            .await?;
        for r in routes
            .into_iter()
            .filter(|r| r.header.protocol == RouteProtocol::Other(ROUTE_PROTOCOL))
        {
            match self.handle().route().del(r).execute().await {
                Ok(()) => {}
                Err(e) if is_gone(&e) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    /// Carries out one planned change on the device with index `index`.
    pub async fn apply_vxlan_change(
        &self,
        index: u32,
        change: &KernelChange,
    ) -> Result<(), NetlinkError> {
        let h = self.handle();
        let r = match *change {
            KernelChange::SetFdb(mac, ep) => {
                let mut req = h
                    .neighbours()
                    .add_bridge(index, &mac)
                    .flags(NeighbourFlags::Own)
                    .destination(IpAddr::V4(*ep.ip()))
                    .replace();
                req.message_mut()
                    .attributes
                    .push(NeighbourAttribute::Port(ep.port()));
                req.execute().await
            }
            KernelChange::DelFdb(mac, ep) => {
                let mut m = NeighbourMessage::default();
                m.header.family = AddressFamily::Bridge;
                m.header.ifindex = index;
                m.header.flags = NeighbourFlags::Own;
                m.header.state = NeighbourState::Permanent;
                m.attributes = vec![
                    NeighbourAttribute::LinkLayerAddress(mac.to_vec()),
                    NeighbourAttribute::Destination(NeighbourAddress::Inet(*ep.ip())),
                ];
                h.neighbours().del(m).execute().await
            }
            KernelChange::SetNeighbour(gw, mac) => {
                h.neighbours()
                    .add(index, IpAddr::V4(gw))
                    .link_layer_address(&mac)
                    .replace()
                    .execute()
                    .await
            }
            KernelChange::DelNeighbour(gw, _) => {
                let mut m = NeighbourMessage::default();
                m.header.family = AddressFamily::Inet;
                m.header.ifindex = index;
                m.attributes = vec![NeighbourAttribute::Destination(NeighbourAddress::Inet(gw))];
                h.neighbours().del(m).execute().await
            }
            KernelChange::SetRoute(net, route) => {
                h.route()
                    .add(route_message(index, net, route))
                    .replace()
                    .execute()
                    .await
            }
            KernelChange::DelRoute(net, route) => {
                h.route()
                    .del(route_message(index, net, route))
                    .execute()
                    .await
            }
        };
        match r {
            Ok(()) => Ok(()),
            Err(e) if is_gone(&e) && is_delete(change) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }
}

fn is_delete(c: &KernelChange) -> bool {
    matches!(
        c,
        KernelChange::DelFdb(..) | KernelChange::DelNeighbour(..) | KernelChange::DelRoute(..)
    )
}

fn route_message(index: u32, net: Ipv4Net, route: KernelRoute) -> RouteMessage {
    let b = RouteMessageBuilder::<Ipv4Addr>::new()
        .destination_prefix(net.network(), net.prefix_len())
        .protocol(RouteProtocol::Other(ROUTE_PROTOCOL));
    match route {
        KernelRoute::Peer { gateway } => {
            b.gateway(gateway).output_interface(index).onlink().build()
        }
        KernelRoute::Unreachable => b.kind(RouteType::Unreachable).build(),
    }
}
