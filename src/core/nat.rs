//! Which traffic weft NATs, as data: the rules of weft's own nftables table (`ip weft`),
//! decided here and written to the kernel by `io::nft`.
//!
//! - Between pods (and a node's own overlay address), never: both ends are in the range.
//! - From a pod to anything outside the range: masqueraded to the node's address on the
//!   way out, so that the outside (a VPC resolver, AWS APIs, the internet), which has no
//!   route to the range, can answer.
//! - From outside the range into the overlay towards another node (a NodePort or a host
//!   routed to this node, such as the EKS control plane): masqueraded to this node's
//!   overlay address, so that the answer comes back through this node and its conntrack.
//! - From outside the range to a pod on this node: kept as it is when `NO_MASQ_LOCAL` is
//!   on (the default, as in Weave), so the pod sees the client's real address; the answer
//!   leaves through this node anyway (the pod's default route). Masqueraded when it is off.

use ipnet::Ipv4Net;
use std::fmt;

/// weft's nftables table (family `ip`): created at start, replaced whole on restart,
/// removed by `weft reset`.
pub const TABLE: &str = "weft";
/// Its one chain: NAT at postrouting, at the priority of iptables' nat POSTROUTING
/// (srcnat, 100), beside kube-proxy's rules.
pub const POSTROUTING_CHAIN: &str = "postrouting";
pub const POSTROUTING_PRIORITY: i32 = 100;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NatConfig {
    pub range: Ipv4Net,
    /// The overlay's TUN device.
    pub overlay_link: String,
    /// The prefix of pods' host-side veths.
    pub pod_link_prefix: String,
    /// `NO_MASQ_LOCAL`: keep the source of outside traffic to local pods.
    pub no_masq_local: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Field {
    Saddr,
    Daddr,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cond {
    /// The IPv4 source or destination is (or, negated, is not) in `net`.
    Net {
        field: Field,
        net: Ipv4Net,
        negate: bool,
    },
    /// The packet leaves by the link `name`, or by any link whose name starts with it.
    OutLink { name: String, prefix: bool },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Leave the packet alone (no NAT by this table).
    Return,
    /// SNAT to the address of the link it leaves by.
    Masquerade,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NatRule {
    pub conds: Vec<Cond>,
    pub action: Action,
    /// Kept with the rule in the kernel (as its comment) and shown by `nft list`.
    pub why: &'static str,
}

/// The postrouting chain's rules, in order.
pub fn postrouting_rules(cfg: &NatConfig) -> Vec<NatRule> {
    let net = |field, negate| Cond::Net {
        field,
        net: cfg.range,
        negate,
    };
    let mut rules = vec![
        NatRule {
            conds: vec![net(Field::Saddr, false), net(Field::Daddr, false)],
            action: Action::Return,
            why: "weft: pod to pod, never NATed",
        },
        NatRule {
            conds: vec![net(Field::Saddr, false)],
            action: Action::Masquerade,
            why: "weft: pod to outside the range",
        },
        NatRule {
            conds: vec![
                net(Field::Saddr, true),
                Cond::OutLink {
                    name: cfg.overlay_link.clone(),
                    prefix: false,
                },
            ],
            action: Action::Masquerade,
            why: "weft: outside into the overlay, answered through this node",
        },
    ];
    if !cfg.no_masq_local {
        rules.push(NatRule {
            conds: vec![
                net(Field::Saddr, true),
                Cond::OutLink {
                    name: cfg.pod_link_prefix.clone(),
                    prefix: true,
                },
            ],
            action: Action::Masquerade,
            why: "weft: outside to a local pod (NO_MASQ_LOCAL off)",
        });
    }
    rules
}

impl fmt::Display for Cond {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Cond::Net { field, net, negate } => {
                let field = match field {
                    Field::Saddr => "saddr",
                    Field::Daddr => "daddr",
                };
                let op = if *negate { "!= " } else { "" };
                write!(f, "ip {field} {op}{net}")
            }
            Cond::OutLink { name, prefix } => {
                write!(f, "oifname \"{name}{}\"", if *prefix { "*" } else { "" })
            }
        }
    }
}

/// In `nft` syntax, as `nft list table ip weft` shows it.
impl fmt::Display for NatRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for c in &self.conds {
            write!(f, "{c} ")?;
        }
        let action = match self.action {
            Action::Return => "return",
            Action::Masquerade => "masquerade",
        };
        write!(f, "counter {action} comment \"{}\"", self.why)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(no_masq_local: bool) -> NatConfig {
        NatConfig {
            range: "192.168.0.0/16".parse().unwrap(),
            overlay_link: "weave".into(),
            pod_link_prefix: "vethwepl".into(),
            no_masq_local,
        }
    }

    /// What the rules do to one packet: the first rule all of whose conditions hold.
    fn verdict(rules: &[NatRule], src: &str, dst: &str, out: &str) -> Action {
        let (src, dst): (std::net::Ipv4Addr, std::net::Ipv4Addr) =
            (src.parse().unwrap(), dst.parse().unwrap());
        for r in rules {
            let all = r.conds.iter().all(|c| match c {
                Cond::Net { field, net, negate } => {
                    let a = if *field == Field::Saddr { src } else { dst };
                    net.contains(&a) != *negate
                }
                Cond::OutLink { name, prefix } => {
                    if *prefix {
                        out.starts_with(name.as_str())
                    } else {
                        out == name
                    }
                }
            });
            if all {
                return r.action;
            }
        }
        Action::Return
    }

    #[test]
    fn who_is_masqueraded() {
        let r = postrouting_rules(&cfg(true));
        // Pod to pod, on this node or another: never.
        assert_eq!(
            verdict(&r, "192.168.1.2", "192.168.9.9", "weave"),
            Action::Return
        );
        assert_eq!(
            verdict(&r, "192.168.1.2", "192.168.1.3", "vethwepl1"),
            Action::Return
        );
        // Pod to the world or to another node's underlay address: the node's address.
        assert_eq!(
            verdict(&r, "192.168.1.2", "8.8.8.8", "eth0"),
            Action::Masquerade
        );
        assert_eq!(
            verdict(&r, "192.168.1.2", "10.0.1.5", "eth0"),
            Action::Masquerade
        );
        // The outside into the overlay towards another node: this node's overlay address.
        assert_eq!(
            verdict(&r, "10.0.9.9", "192.168.64.3", "weave"),
            Action::Masquerade
        );
        // The outside to a local pod: the pod sees the client (NO_MASQ_LOCAL).
        assert_eq!(
            verdict(&r, "10.0.9.9", "192.168.1.2", "vethwepl1"),
            Action::Return
        );
        // The node's own traffic elsewhere: not this table's business.
        assert_eq!(verdict(&r, "10.0.1.5", "10.0.9.9", "eth0"), Action::Return);
    }

    #[test]
    fn no_masq_local_off_masquerades_outside_traffic_to_local_pods_too() {
        let r = postrouting_rules(&cfg(false));
        assert_eq!(
            verdict(&r, "10.0.9.9", "192.168.1.2", "vethwepl1"),
            Action::Masquerade
        );
        assert_eq!(
            verdict(&r, "192.168.1.2", "192.168.1.3", "vethwepl1"),
            Action::Return
        );
    }

    #[test]
    fn rules_read_as_nft_writes_them() {
        let text: Vec<String> = postrouting_rules(&cfg(true))
            .iter()
            .map(|r| r.to_string())
            .collect();
        assert_eq!(
            text[0],
            "ip saddr 192.168.0.0/16 ip daddr 192.168.0.0/16 counter return comment \"weft: pod to pod, never NATed\""
        );
        assert_eq!(
            text[2],
            "ip saddr != 192.168.0.0/16 oifname \"weave\" counter masquerade comment \"weft: outside into the overlay, answered through this node\""
        );
    }
}
