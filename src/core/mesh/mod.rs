//! The control mesh: peer identity, control messages and the state machine deciding what
//! to tell whom, plus a deterministic simulation of a cluster of nodes.

pub mod message;
pub mod peer;
pub mod sim;
pub mod state;

pub use peer::PeerName;
