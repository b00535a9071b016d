//! The stage between the planners and the wire. Every datagram weft sends passes
//! [`Transform::seal`] and every datagram it receives [`Transform::open`] before
//! decapsulation, so a cipher (authenticated encryption per datagram, per peer) plugs in
//! here without touching the forwarding workers or the planners.
//!
//! Sizes: a transform adds `HEADROOM` bytes before the VXLAN header and `TAILROOM` bytes
//! after the inner packet; the planner reserves the headroom in each segment's header and
//! counts both in the segment size it groups GSO messages by, so segments of one message
//! stay equal-sized on the wire.

use crate::core::route::PeerRoute;
use std::ops::Range;

/// How a sealed segment goes on the wire.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sealed {
    /// As planned: the segment's header, then its payload (two slices, nothing copied).
    AsPlanned,
    /// Instead, bytes `range` of the transform's own output buffer ([`Transform::output`]).
    Replaced(Range<usize>),
    /// Not sent: there is no key for the peer (yet), so it must not go out in the clear.
    Refused,
}

/// Why a received datagram was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum OpenError {
    #[error("datagram failed authentication")]
    Unauthenticated,
    #[error("datagram too short for the transform")]
    Truncated,
    #[error("datagram already received (a replay)")]
    Replayed,
}

pub trait Transform {
    /// Bytes reserved before the VXLAN header of every segment.
    const HEADROOM: usize;
    /// Bytes added after the inner packet of every segment.
    const TAILROOM: usize;
    /// True when `seal` and `open` change nothing: the workers then skip the stage.
    const PASSTHROUGH: bool;

    /// Prepares one segment to `peer`: `header` is the segment's header (headroom, VXLAN,
    /// Ethernet, inner IPv4 and transport headers), `payload` the rest of its inner packet.
    fn seal(&mut self, peer: &PeerRoute, header: &mut [u8], payload: &[u8]) -> Sealed;

    /// The transform's own output buffer, for [`Sealed::Replaced`] ranges.
    fn output(&self) -> &[u8];

    /// Forgets the output of the previous batch.
    fn reset(&mut self);

    /// Checks and opens a datagram from `peer` in place; returns where the VXLAN datagram
    /// lies within it.
    fn open(&mut self, peer: &PeerRoute, datagram: &mut [u8]) -> Result<Range<usize>, OpenError>;
}

/// Datagrams go out and come in as they are (plain VXLAN).
#[derive(Debug, Default, Clone, Copy)]
pub struct Identity;

impl Transform for Identity {
    const HEADROOM: usize = 0;
    const TAILROOM: usize = 0;
    const PASSTHROUGH: bool = true;

    fn seal(&mut self, _peer: &PeerRoute, _header: &mut [u8], _payload: &[u8]) -> Sealed {
        Sealed::AsPlanned
    }

    fn output(&self) -> &[u8] {
        &[]
    }

    fn reset(&mut self) {}

    fn open(&mut self, _peer: &PeerRoute, datagram: &mut [u8]) -> Result<Range<usize>, OpenError> {
        Ok(0..datagram.len())
    }
}
