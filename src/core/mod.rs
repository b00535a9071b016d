//! The pure core: every decision weft makes, with no I/O, no clock and no syscalls, so
//! that it can be tested deterministically without root.

pub mod ipam;
pub mod mesh;
pub mod route;
pub mod wire;
