//! The control mesh: peer identity, control messages and the state machine deciding what
//! to tell whom.

pub mod message;
pub mod peer;
pub mod state;

pub use peer::PeerName;
