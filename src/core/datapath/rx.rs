//! Planning the delivery of received datagrams.
//!
//! One `recvmmsg` returns several messages, each holding many datagrams of one sender
//! back to back (UDP GRO, `stride` bytes apart). [`RxPlan::ingest`] checks the sender is a
//! known peer, opens each datagram through the transform, decapsulates it, checks the
//! inner destination is in one of this node's ranges, and offers the inner packet to the
//! [`Gro`] table, which coalesces consecutive segments of a TCP flow. After
//! [`RxPlan::finish`], each output is one header plus payload slices of the receive
//! buffers, written to the TUN device with one `writev`.

use super::{DropCounts, DropReason, OpenError, Transform};
use crate::core::route::RouteTable;
use crate::core::wire::gro::{Gro, Parts};
use crate::core::wire::virtio;
use crate::core::wire::{self};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::atomic::Ordering;

/// Where an inner packet lies: receive buffer index and offset in it.
pub(crate) type InnerRef = (usize, usize);

pub struct RxPlan {
    gro: Gro<InnerRef>,
    vnet: bool,
    vni: u32,
    counts: DropCounts,
}

impl RxPlan {
    /// `packets` inner packets per batch are handled without allocating; `vnet`: the TUN
    /// device takes a `virtio_net_hdr` before each packet.
    pub fn new(packets: usize, vnet: bool, vni: u32) -> RxPlan {
        RxPlan {
            gro: Gro::with_capacity(packets),
            vnet,
            vni,
            counts: DropCounts::default(),
        }
    }

    /// The TUN device's MTU: inner TCP packets longer than it (a kernel VXLAN sender's
    /// segmentation-offload units) are handed over to be segmented to it.
    pub fn set_mtu(&mut self, mtu: usize) {
        self.gro.set_mtu(mtu);
    }

    /// Starts a batch.
    pub fn clear(&mut self) {
        self.gro.clear();
    }

    /// Takes in one received message: buffer `index`, holding `buf.len()` bytes of
    /// datagrams `stride` bytes apart (the last may be shorter), from `src`. The peer's
    /// receive counters are updated here, once per message.
    pub fn ingest<T: Transform>(
        &mut self,
        table: &RouteTable,
        transform: &mut T,
        index: usize,
        src: Option<SocketAddr>,
        stride: usize,
        buf: &mut [u8],
    ) {
        let stride = stride.max(1);
        let datagrams = buf.len().div_ceil(stride).max(1) as u64;
        let peer = src.and_then(|src| match src {
            SocketAddr::V4(a) => table.peer_by_endpoint(a),
            SocketAddr::V6(a) => a
                .ip()
                .to_ipv4_mapped()
                .and_then(|ip| table.peer_by_endpoint(SocketAddrV4::new(ip, a.port()))),
        });
        let Some(peer) = peer else {
            self.counts.add(DropReason::UnknownPeer, datagrams);
            return;
        };
        let (mut packets, mut bytes) = (0u64, 0u64);
        let mut at = 0;
        // Datagrams of one message mostly share a destination: one lookup for them.
        let mut local_cache: Option<(Ipv4Addr, bool)> = None;
        // `loop`, not `while`: an empty datagram is a datagram too (and malformed).
        loop {
            let end = (at + stride).min(buf.len());
            let d = &mut buf[at..end];
            let vxlan = if T::PASSTHROUGH {
                0..d.len()
            } else {
                match transform.open(peer, d) {
                    Ok(r) => r,
                    Err(e) => {
                        self.counts.add(
                            match e {
                                OpenError::Replayed => DropReason::Replayed,
                                OpenError::Unauthenticated | OpenError::Truncated => {
                                    DropReason::Unauthenticated
                                }
                            },
                            1,
                        );
                        at = end;
                        if at >= buf.len() {
                            break;
                        }
                        continue;
                    }
                }
            };
            let d = &d[vxlan.clone()];
            match wire::decapsulate(d, self.vni) {
                Ok(dec) => {
                    let local = match local_cache {
                        Some((dst, l)) if dst == dec.dst => l,
                        _ => {
                            let l = table.is_local(dec.dst);
                            local_cache = Some((dec.dst, l));
                            l
                        }
                    };
                    if local {
                        let inner = &d[dec.inner_ip.clone()];
                        packets += 1;
                        bytes += inner.len() as u64;
                        self.gro
                            .push((index, at + vxlan.start + dec.inner_ip.start), inner);
                    } else {
                        self.counts.add(DropReason::NotLocal, 1);
                    }
                }
                Err(e) => self.counts.malformed(e),
            }
            at = end;
            if at >= buf.len() {
                break;
            }
        }
        if packets > 0 {
            peer.counters
                .rx_packets
                .fetch_add(packets, Ordering::Relaxed);
            peer.counters.rx_bytes.fetch_add(bytes, Ordering::Relaxed);
        }
    }

    /// Completes the batch's coalesced headers; call once after the last `ingest`.
    pub fn finish(&mut self) {
        self.gro.finish();
    }

    /// Packets to write to the TUN device.
    pub fn len(&self) -> usize {
        self.gro.len()
    }

    pub fn is_empty(&self) -> bool {
        self.gro.is_empty()
    }

    /// The header of output `j` as the TUN device takes it (with or without the
    /// `virtio_net_hdr`).
    pub fn header(&self, j: usize) -> &[u8] {
        let h = self.gro.header(j);
        if self.vnet {
            h
        } else {
            &h[virtio::LEN..]
        }
    }

    /// The payload slices of output `j`: (buffer index, offset) and a range after it.
    pub fn parts(&self, j: usize) -> Parts<'_, InnerRef> {
        self.gro.parts(j)
    }

    /// Inner packets in output `j` (what a failed write drops).
    pub fn segments(&self, j: usize) -> usize {
        self.gro.segments(j)
    }

    pub fn counts_mut(&mut self) -> &mut DropCounts {
        &mut self.counts
    }

    pub fn take_counts(&mut self) -> DropCounts {
        self.counts.take()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::datapath::tx::tests::{name, table};
    use crate::core::datapath::{Identity, TxOutcome, TxPlan};
    use crate::core::route::PeerRoute;
    use crate::core::wire::{icmp, ipv4, DecapError, WEFT_VNI};

    /// A datagram from node 1 to an address of node 2, as node 1's planner builds it.
    fn datagram(dst: &str, payload: usize) -> Vec<u8> {
        datagram_from(1, dst, payload)
    }

    /// A datagram as node `sender`'s planner builds it for `dst`.
    fn datagram_from(sender: u8, dst: &str, payload: usize) -> Vec<u8> {
        let t = table(sender);
        let mut p: TxPlan<Identity> = TxPlan::new(64, false, 1450, WEFT_VNI);
        let mut pkt = vec![0u8; 20 + payload];
        ipv4::Repr {
            src: "192.168.0.5".parse().unwrap(),
            dst: dst.parse().unwrap(),
            protocol: 17,
            ttl: 64,
            dont_frag: true,
            payload_len: payload,
        }
        .emit(&mut pkt)
        .unwrap();
        let mut icmp = [0u8; icmp::MAX_LEN];
        assert_eq!(p.push(&t, 0, &mut pkt, &mut icmp), TxOutcome::Queued(1));
        let (_, r) = p.payload(0);
        [p.header(0), &pkt[r]].concat()
    }

    fn from(s: &str) -> Option<SocketAddr> {
        Some(s.parse().unwrap())
    }

    fn written(p: &RxPlan, bufs: &[&[u8]]) -> Vec<Vec<u8>> {
        (0..p.len())
            .map(|j| {
                let mut out = p.header(j).to_vec();
                for ((b, off), r) in p.parts(j) {
                    out.extend_from_slice(&bufs[b][off + r.start..off + r.end]);
                }
                out
            })
            .collect()
    }

    #[test]
    fn accepts_local_traffic_from_known_peers_and_counts_it() {
        let receiver = table(2);
        let mut p = RxPlan::new(64, false, WEFT_VNI);
        let mut d = datagram("192.168.200.1", 40);
        let inner = d[22..].to_vec();
        p.ingest(
            &receiver,
            &mut Identity,
            0,
            from("10.77.0.1:6784"),
            d.len(),
            &mut d,
        );
        // IPv4-mapped IPv6 sources are the same peer.
        let mut d2 = datagram("192.168.200.1", 40);
        p.ingest(
            &receiver,
            &mut Identity,
            1,
            from("[::ffff:10.77.0.1]:6784"),
            d2.len(),
            &mut d2,
        );
        p.finish();
        let out = written(&p, &[&d, &d2]);
        assert_eq!(out, vec![inner.clone(), inner]);
        let peer: &PeerRoute = receiver
            .peer_by_endpoint("10.77.0.1:6784".parse().unwrap())
            .unwrap();
        assert_eq!(peer.name, name(1));
        assert_eq!(peer.counters.rx_packets.load(Ordering::Relaxed), 2);
        assert_eq!(peer.counters.rx_bytes.load(Ordering::Relaxed), 2 * 60);
        assert!(p.take_counts().is_zero());
    }

    #[test]
    fn drops_are_counted_by_reason_and_kind() {
        let receiver = table(2);
        let mut p = RxPlan::new(64, true, WEFT_VNI);
        let mut d = datagram("192.168.200.1", 40);
        p.ingest(
            &receiver,
            &mut Identity,
            0,
            from("10.77.0.9:6784"),
            d.len(),
            &mut d,
        );
        p.ingest(&receiver, &mut Identity, 0, None, d.len(), &mut d);
        // Addressed to node 1's range: not ours.
        let mut other = datagram_from(2, "192.168.1.1", 40);
        p.ingest(
            &receiver,
            &mut Identity,
            0,
            from("10.77.0.1:6784"),
            other.len(),
            &mut other,
        );
        let mut short = d[..30].to_vec();
        p.ingest(
            &receiver,
            &mut Identity,
            0,
            from("10.77.0.1:6784"),
            30,
            &mut short,
        );
        let mut wrong_vni = d.clone();
        wrong_vni[4..7].copy_from_slice(&[0, 0x12, 0x34]);
        p.ingest(
            &receiver,
            &mut Identity,
            0,
            from("10.77.0.1:6784"),
            d.len(),
            &mut wrong_vni,
        );
        p.finish();
        assert!(p.is_empty());
        let c = p.take_counts();
        assert_eq!(c.get(DropReason::UnknownPeer), 2);
        assert_eq!(c.get(DropReason::NotLocal), 1);
        assert_eq!(c.get(DropReason::Malformed), 2);
        assert_eq!(c.malformed[DecapError::Truncated.index()], 1);
        assert_eq!(c.malformed[DecapError::WrongVni { got: 0x1234 }.index()], 1);
    }

    #[test]
    fn a_gro_message_of_several_datagrams_is_split_by_stride() {
        let receiver = table(2);
        let mut p = RxPlan::new(64, true, WEFT_VNI);
        let one = datagram("192.168.200.1", 100);
        let stride = one.len();
        // Three equal datagrams and a shorter last one, as UDP GRO delivers them.
        let last = datagram("192.168.200.2", 10);
        let mut msg = [one.clone(), one.clone(), one.clone(), last].concat();
        p.ingest(
            &receiver,
            &mut Identity,
            0,
            from("10.77.0.1:6784"),
            stride,
            &mut msg,
        );
        p.finish();
        // UDP is not coalesced: four packets, each with an empty virtio header.
        assert_eq!(p.len(), 4);
        assert_eq!(p.header(0), &[0u8; virtio::LEN][..]);
        let peer = receiver
            .peer_by_endpoint("10.77.0.1:6784".parse().unwrap())
            .unwrap();
        assert_eq!(peer.counters.rx_packets.load(Ordering::Relaxed), 4);
    }

    /// Refuses everything: the datagrams never reach decapsulation.
    struct Refuse;
    impl Transform for Refuse {
        const HEADROOM: usize = 0;
        const TAILROOM: usize = 0;
        const PASSTHROUGH: bool = false;
        fn seal(&mut self, _: &PeerRoute, _: &mut [u8], _: &[u8]) -> crate::core::datapath::Sealed {
            crate::core::datapath::Sealed::AsPlanned
        }
        fn output(&self) -> &[u8] {
            &[]
        }
        fn reset(&mut self) {}
        fn open(
            &mut self,
            _: &PeerRoute,
            _: &mut [u8],
        ) -> Result<std::ops::Range<usize>, OpenError> {
            Err(OpenError::Unauthenticated)
        }
    }

    #[test]
    fn the_transform_stage_can_refuse_datagrams() {
        let receiver = table(2);
        let mut p = RxPlan::new(64, true, WEFT_VNI);
        let mut d = datagram("192.168.200.1", 40);
        let n = d.len();
        p.ingest(&receiver, &mut Refuse, 0, from("10.77.0.1:6784"), n, &mut d);
        p.finish();
        assert!(p.is_empty());
        assert_eq!(p.take_counts().get(DropReason::Unauthenticated), 1);
    }
}
