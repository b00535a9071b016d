//! The control mesh: peer identity, control messages, and the node state machine deciding
//! what to tell whom, split by job (see `node`).

mod consensus;
pub mod datakeys;
mod donation;
pub mod effects;
mod gossip;
mod handshake;
mod local;
pub mod message;
mod node;
pub mod peer;
mod provenance;
pub mod secure;
pub mod view;

pub use datakeys::{KeyChange, KeySeed};
pub use effects::{Action, ConnId, Effects, Level, Save};
pub use local::PeerEndpoint;
pub use node::{Node, NodeConfig, NodeCounters, TENTATIVE_TICKS};
pub use peer::PeerName;

#[cfg(test)]
mod tests;
