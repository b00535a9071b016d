//! Thin adapters between the pure core and the operating system.

pub mod control;
pub mod migrate;
pub mod netlink;
pub mod nflog;
pub mod nft;
pub mod nft_policy;
pub mod store;
pub mod sysctl;
pub mod tun;
pub mod udp;
pub mod vxlan;
pub mod weave_npc;
