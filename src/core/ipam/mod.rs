//! IP address management: Weave's ring model. The range is a ring of entries, each owned
//! by one peer; only the owner changes its entries; rings merge as a CRDT.

pub mod allocator;
pub mod init;
pub(crate) mod paxos;
pub mod ring;
pub mod sign;
pub mod space;

pub use allocator::{Ipam, IpamError, IpamState, MergeOutcome, ReclaimOutcome};
pub use init::{IpallocInit, IpallocInitError};
pub use ring::{Entry, PeerRecord, Ring, RingError};
pub use sign::{SignKey, Signed, Signer};
