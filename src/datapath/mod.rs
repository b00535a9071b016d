//! Data path backends: what moves packets between the overlay interface and the underlay.
//! The router gives a backend routes (ring ranges and peer endpoints, whenever they change)
//! and asks it for a [`DatapathView`] (routes, traffic, drops) for the report; it does not
//! know how packets move. [`userspace::UserspaceBackend`] is weft's own forwarding (a TUN
//! device, VXLAN-format UDP, the planners of `core::datapath`); a kernel VXLAN backend can
//! sit beside it without changes to the router.

pub mod kernel;
pub mod userspace;

use crate::core::datapath::{BatchStats, DropCounts, DropReason};
use crate::core::mesh::{KeyChange, PeerEndpoint, PeerName};
use crate::core::route::RouteView;
use crate::core::wire::DecapError;
use std::sync::atomic::{AtomicU64, Ordering};

pub trait Backend: Send + Sync + 'static {
    /// Installs the routes: ring ranges (`first..=last`, owner) and where each known peer's
    /// data plane is reached.
    fn set_routes(&self, ranges: &[(u32, u32, PeerName)], peers: Vec<PeerEndpoint>);

    /// Routes, per-peer traffic and drops, for the report and the metrics.
    fn view(&self) -> DatapathView;

    /// Installs or drops data keys with a peer (with `WEAVE_PASSWORD`).
    fn set_data_key(&self, peer: &PeerName, change: &KeyChange);
}

/// Traffic with one peer: inner (overlay) packets and bytes, so that one node's tx matches
/// its peer's rx.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerTraffic {
    pub name: PeerName,
    pub nickname: String,
    pub tx_packets: u64,
    pub tx_bytes: u64,
    pub rx_packets: u64,
    pub rx_bytes: u64,
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct DatapathView {
    pub routes: Vec<RouteView>,
    pub peers: Vec<PeerTraffic>,
    /// Every reason, in a fixed order, zero counts included (stable metric series).
    pub drops: Vec<(DropReason, u64)>,
}

/// Drop and batch counters shared between the workers (which add a batch's counts at
/// once) and the reporting side.
#[derive(Debug, Default)]
pub struct SharedCounters {
    drops: [AtomicU64; DropReason::COUNT],
    malformed: [AtomicU64; DecapError::KINDS],
    tun_reads: AtomicU64,
    tun_writes: AtomicU64,
    udp_sends: AtomicU64,
    udp_recvs: AtomicU64,
}

impl SharedCounters {
    /// Moves one worker's counts here (touching only the atomics that change).
    pub fn drain(&self, c: &mut DropCounts) {
        c.drain(
            |i, n| {
                self.drops[i].fetch_add(n, Ordering::Relaxed);
            },
            |i, n| {
                self.malformed[i].fetch_add(n, Ordering::Relaxed);
            },
            |b| {
                for (n, to) in [
                    (b.tun_reads, &self.tun_reads),
                    (b.tun_writes, &self.tun_writes),
                    (b.udp_sends, &self.udp_sends),
                    (b.udp_recvs, &self.udp_recvs),
                ] {
                    if n != 0 {
                        to.fetch_add(n, Ordering::Relaxed);
                    }
                }
            },
        );
    }

    pub fn get(&self, reason: DropReason) -> u64 {
        self.drops[reason.index()].load(Ordering::Relaxed)
    }

    pub fn drops(&self) -> Vec<(DropReason, u64)> {
        DropReason::ALL.iter().map(|r| (*r, self.get(*r))).collect()
    }

    /// Received datagrams counted as `malformed`, by decapsulation failure ("truncated",
    /// "wrong_vni", ...). They add up to the received part of `malformed`.
    pub fn malformed_kinds(&self) -> Vec<(&'static str, u64)> {
        self.malformed
            .iter()
            .enumerate()
            .map(|(i, c)| {
                (
                    DecapError::kind_name(i).unwrap_or("unknown"),
                    c.load(Ordering::Relaxed),
                )
            })
            .collect()
    }

    pub fn batches(&self) -> BatchStats {
        BatchStats {
            tun_reads: self.tun_reads.load(Ordering::Relaxed),
            tun_writes: self.tun_writes.load(Ordering::Relaxed),
            udp_sends: self.udp_sends.load(Ordering::Relaxed),
            udp_recvs: self.udp_recvs.load(Ordering::Relaxed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_from_workers_add_up_and_every_reason_is_reported() {
        let shared = SharedCounters::default();
        let mut c = DropCounts::default();
        c.add(DropReason::NoRoute, 2);
        c.malformed(DecapError::WrongVni { got: 1 });
        c.batches.tun_reads = 3;
        let mut again = c.clone();
        shared.drain(&mut c);
        assert!(c.is_zero(), "drained counts start afresh");
        shared.drain(&mut again);
        let drops = shared.drops();
        assert_eq!(drops.len(), DropReason::ALL.len());
        assert!(drops.contains(&(DropReason::NoRoute, 4)));
        assert!(drops.contains(&(DropReason::Malformed, 2)));
        assert!(drops.contains(&(DropReason::UdpSend, 0)));
        assert!(shared.malformed_kinds().contains(&("wrong_vni", 2)));
        assert_eq!(shared.batches().tun_reads, 6);
    }
}
