//! The data path's decisions, as pure planners the forwarding workers call (the same code
//! the unit tests drive):
//! - [`TxPlan`]: TUN reads in -> per packet a route, segments with their headers built
//!   (payload left where it was read), grouped into UDP GSO messages per (peer, segment
//!   size); or a drop reason, or an ICMP "fragmentation needed" to write back.
//! - [`RxPlan`]: received UDP messages in -> datagrams validated (known sender, well-formed
//!   VXLAN, inner destination local), inner packets coalesced into TUN super-packets; or
//!   drop reasons.
//! - [`Transform`]: the stage between planning and the wire, where a cipher seals outgoing
//!   and opens incoming datagrams: [`Identity`] (plain VXLAN) or [`aead::Aead`]
//!   (with `WEAVE_PASSWORD`).
//!
//! Nothing here does I/O, allocates per packet or takes a lock: counts go into plain
//! arrays ([`DropCounts`]) that the worker adds to shared atomics once per batch.

pub mod aead;
pub mod kernel;
mod rx;
mod transform;
mod tx;

pub use rx::RxPlan;
pub use transform::{Identity, OpenError, Sealed, Transform};
pub use tx::{segment_overhead, TxMessage, TxOutcome, TxPlan, MAX_GSO_BYTES, MAX_GSO_SEGMENTS};

use crate::core::wire::{DecapError, ENCAP_OVERHEAD_IPV4};

/// The smallest MTU an IPv4 path may have (RFC 791's 68 is of no use to anyone; below
/// 576 a hop's report is taken as a misconfiguration and clamped).
const MIN_PATH_MTU: u32 = 576;

/// The limit for inner packets to a peer whose underlay path MTU is `path` (as the kernel
/// knows it): 0 when the overlay MTU fits, else the path minus the encapsulation and the
/// transform's `sealed` bytes.
pub fn path_limit(path: u32, overlay_mtu: usize, sealed: u32) -> u32 {
    let inner = path.max(MIN_PATH_MTU) - ENCAP_OVERHEAD_IPV4 - sealed;
    if inner as usize >= overlay_mtu {
        0
    } else {
        inner
    }
}

#[cfg(test)]
mod path_tests {
    use super::*;

    #[test]
    fn the_path_limits_only_when_it_is_smaller_than_the_overlay() {
        assert_eq!(path_limit(9001, 8951, 0), 0);
        assert_eq!(path_limit(65535, 8951, 0), 0);
        assert_eq!(path_limit(1500, 8951, 0), 1450);
        assert_eq!(
            path_limit(1500, 8951, 24),
            1426,
            "sealed datagrams are 24 bytes longer"
        );
        assert_eq!(path_limit(1500, 1426, 24), 0);
        assert_eq!(path_limit(1500, 1450, 0), 0);
        assert_eq!(path_limit(1400, 1450, 0), 1350);
        assert_eq!(
            path_limit(100, 1450, 0),
            526,
            "a nonsense report is clamped"
        );
    }
}

/// Why a packet was not forwarded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    /// TUN packet to an address in no range, or in a local range: a local-range
    /// address that reached the TUN device has no pod behind it.
    NoRoute,
    /// TUN packet to a range whose owner has no known data address.
    Unreachable,
    /// TUN packet over the MTU with DF set.
    TooBig,
    /// TUN packet that is not IPv4 (e.g. IPv6 neighbour discovery).
    NotIpv4,
    /// Malformed IPv4 from the TUN, or a datagram that failed decapsulation (see
    /// [`DropCounts::malformed`] for the kinds).
    Malformed,
    /// Datagram from an underlay address that is no known peer's.
    UnknownPeer,
    /// Decapsulated packet to an address outside this node's ranges.
    NotLocal,
    TunWrite,
    UdpSend,
    TunRead,
    UdpRecv,
    /// The data socket's send buffer stayed full (after a short wait).
    SocketFull,
    /// The TUN device refused a write for lack of room.
    TunFull,
    /// Datagrams the kernel dropped because the data socket's receive buffer was full
    /// (`SO_RXQ_OVFL`).
    RxBufferFull,
    /// A datagram the transform stage refused: it failed authentication (no key of the
    /// peer's opens it), or is too short to carry a tag.
    Unauthenticated,
    /// An authentic datagram received before (or too far behind the newest to tell).
    Replayed,
    /// A packet to a peer with no data key yet (with `WEAVE_PASSWORD`, nothing leaves in
    /// the clear): the control connection has not exchanged keys, or they expired.
    NoKey,
}

impl DropReason {
    pub const ALL: [DropReason; 17] = [
        DropReason::NoRoute,
        DropReason::Unreachable,
        DropReason::TooBig,
        DropReason::NotIpv4,
        DropReason::Malformed,
        DropReason::UnknownPeer,
        DropReason::NotLocal,
        DropReason::TunWrite,
        DropReason::UdpSend,
        DropReason::TunRead,
        DropReason::UdpRecv,
        DropReason::SocketFull,
        DropReason::TunFull,
        DropReason::RxBufferFull,
        DropReason::Unauthenticated,
        DropReason::Replayed,
        DropReason::NoKey,
    ];
    pub(crate) const COUNT: usize = Self::ALL.len();

    pub fn as_str(self) -> &'static str {
        match self {
            DropReason::NoRoute => "no_route",
            DropReason::Unreachable => "unreachable",
            DropReason::TooBig => "too_big",
            DropReason::NotIpv4 => "not_ipv4",
            DropReason::Malformed => "malformed",
            DropReason::UnknownPeer => "unknown_peer",
            DropReason::NotLocal => "not_local",
            DropReason::TunWrite => "tun_write",
            DropReason::UdpSend => "udp_send",
            DropReason::TunRead => "tun_read",
            DropReason::UdpRecv => "udp_recv",
            DropReason::SocketFull => "udp_send_buffer_full",
            DropReason::TunFull => "tun_queue_full",
            DropReason::RxBufferFull => "udp_receive_buffer_full",
            DropReason::Unauthenticated => "unauthenticated",
            DropReason::Replayed => "replayed",
            DropReason::NoKey => "no_key",
        }
    }

    pub fn index(self) -> usize {
        self as usize
    }
}

/// How much batching the offloads achieved: compare with the per-peer packet counts
/// (one TUN read can carry 40+ packets, one UDP message 64 datagrams).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BatchStats {
    /// Reads from the TUN device (each a packet or a super-packet).
    pub tun_reads: u64,
    /// Writes to the TUN device (each a packet or a coalesced super-packet).
    pub tun_writes: u64,
    /// UDP messages sent (each up to 64 datagrams with GSO).
    pub udp_sends: u64,
    /// UDP messages received (each up to 64 datagrams with GRO).
    pub udp_recvs: u64,
}

/// Drop and batch counts of one worker since its last flush.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DropCounts {
    pub drops: [u64; DropReason::COUNT],
    /// Received datagrams counted as `malformed`, by decapsulation failure.
    pub malformed: [u64; DecapError::KINDS],
    pub batches: BatchStats,
    /// Some drop was counted since the last drain: the arrays need a look.
    touched: bool,
}

impl Default for DropCounts {
    fn default() -> Self {
        DropCounts {
            drops: [0; DropReason::COUNT],
            malformed: [0; DecapError::KINDS],
            batches: BatchStats::default(),
            touched: false,
        }
    }
}

impl DropCounts {
    pub fn add(&mut self, r: DropReason, n: u64) {
        self.drops[r.index()] += n;
        self.touched = true;
    }

    /// A datagram that failed decapsulation: `malformed`, and its kind.
    pub fn malformed(&mut self, e: DecapError) {
        self.drops[DropReason::Malformed.index()] += 1;
        if let Some(c) = self.malformed.get_mut(e.index()) {
            *c += 1;
        }
        self.touched = true;
    }

    pub fn get(&self, r: DropReason) -> u64 {
        self.drops[r.index()]
    }

    /// Hands the counts over (for adding to the shared counters) and starts afresh.
    pub fn take(&mut self) -> DropCounts {
        std::mem::take(self)
    }

    /// Passes every non-zero count to `add` (drops by reason index, then malformed kinds
    /// by index, then the batch counts) and zeroes it. Cheap when nothing was dropped: the
    /// workers call this once per batch.
    pub fn drain(
        &mut self,
        mut drop: impl FnMut(usize, u64),
        mut malformed: impl FnMut(usize, u64),
        mut batches: impl FnMut(BatchStats),
    ) {
        if self.touched {
            for (i, n) in self.drops.iter_mut().enumerate() {
                if *n != 0 {
                    drop(i, std::mem::take(n));
                }
            }
            for (i, n) in self.malformed.iter_mut().enumerate() {
                if *n != 0 {
                    malformed(i, std::mem::take(n));
                }
            }
            self.touched = false;
        }
        if self.batches != BatchStats::default() {
            batches(std::mem::take(&mut self.batches));
        }
    }

    pub fn is_zero(&self) -> bool {
        self == &DropCounts::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_reason_has_a_distinct_name_and_its_index() {
        let names: std::collections::BTreeSet<_> =
            DropReason::ALL.iter().map(|r| r.as_str()).collect();
        assert_eq!(names.len(), DropReason::ALL.len());
        for (i, r) in DropReason::ALL.iter().enumerate() {
            assert_eq!(r.index(), i);
        }
    }

    #[test]
    fn counts_add_up_and_hand_over() {
        let mut c = DropCounts::default();
        c.add(DropReason::NoRoute, 2);
        c.malformed(DecapError::WrongVni { got: 1 });
        assert_eq!(c.get(DropReason::NoRoute), 2);
        assert_eq!(c.get(DropReason::Malformed), 1);
        let taken = c.take();
        assert!(c.is_zero());
        assert_eq!(taken.malformed.iter().sum::<u64>(), 1);
    }
}
