//! Zero-copy packet views and emitters (smoltcp style): parsing never panics, every
//! accessor checks length, nothing allocates.
//!
//! Each header module has a `Packet<T: AsRef<[u8]>>` view whose `new_checked` validates
//! lengths once, after which the accessors index without further checks, and setters on
//! `T: AsMut<[u8]>` for writing headers into caller buffers. `encap` combines them into
//! the two per-packet operations of the data plane, so a batching I/O layer (recvmmsg,
//! GSO/GRO) only has to loop over them.

pub mod csum;
pub mod encap;
pub(crate) mod ethernet;
pub(crate) mod gro;
pub(crate) mod gso;
pub mod icmp;
pub mod ipv4;
pub mod virtio;
pub mod vxlan;

pub use encap::{
    decapsulate, encapsulate, DecapError, Decapsulated, EncapError, ENCAP_OVERHEAD_IPV4,
    VXLAN_OVERHEAD_INNER, WEFT_VNI,
};

/// Why a header view could not be built over a buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("buffer shorter than the header")]
    Truncated,
    #[error("IP version is not 4")]
    NotIpv4,
    #[error("IPv4 header length (IHL) is below 5 words or beyond the buffer")]
    BadHeaderLen,
    #[error("IPv4 total length is below the header length or beyond the buffer")]
    BadTotalLen,
}
