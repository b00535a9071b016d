//! The pure core: every decision weft makes, with no I/O, no clock and no syscalls, so
//! that it can be tested deterministically without root. No `unsafe` either, except the
//! one measured exception: the AVX2 build of the checksum loop (`wire::csum`), about twice
//! the bytes per cycle of the baseline build on 64 KiB payloads.
#![deny(unsafe_code)]

pub mod cluster;
pub mod datapath;
pub mod ipam;
pub mod mesh;
pub mod migrate;
pub mod nat;
pub mod persist;
pub mod policy;
pub mod rng;
pub mod route;
pub mod wire;
