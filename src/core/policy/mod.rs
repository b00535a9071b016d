//! NetworkPolicy, decided without I/O: the model of what the API says (`model`), the
//! meaning of NetworkPolicy v1 for one connection (`eval`, the reference and `explain`),
//! what one node enforces for its pods (`compile`), and the nftables table that enforces
//! it (`ruleset`, data that `io::nft_policy` writes in one netlink batch).

pub mod compile;
pub mod denied;
pub mod eval;
pub mod model;
pub mod ruleset;

#[cfg(test)]
mod tests;

pub use compile::{compile, Allow, Compiled, PodRules, RangeSet};
pub use eval::{evaluate, Flow, Verdict};
pub use model::{
    Cluster, Key, Labels, Namespace, Peer, Pod, Policy, PortRef, PortSpec, Proto, Rule, Selector,
};
