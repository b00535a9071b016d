//! NetworkPolicy's meaning, evaluated directly for one connection: the reference the
//! compiler is tested against, and what `weft policy explain` prints.
//!
//! A new connection from `src` to `dst` passes if the source side lets it out and the
//! destination side lets it in. A side that is a pod (not on the host's network, not
//! finished) is isolated in a direction when a policy in its namespace selects it and
//! lists that direction; an isolated side lets through what any rule of any of those
//! policies allows. A rule allows a connection when one of its peers is the other end
//! (or it has none) and one of its ports is the destination port (or it has none).
//! Named ports are looked up in the destination pod's container ports.

use super::model::{Cluster, Key, Peer, Pod, PortRef, Proto, Rule};
use std::net::Ipv4Addr;

/// One new connection (or, for protocols without ports, a first packet).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Flow {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    /// `None`: a protocol that policy ports cannot name (ICMP, ...).
    pub proto: Option<Proto>,
    pub port: u16,
}

/// What one end of a connection decides.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Side {
    /// The pod at this end, if the address is one policy sees.
    pub pod: Option<Key>,
    /// The policies that select the pod and isolate it in this direction.
    pub isolating: Vec<Key>,
    /// Those of them with a rule that allows this connection.
    pub allowing: Vec<Key>,
}

impl Side {
    pub fn isolated(&self) -> bool {
        !self.isolating.is_empty()
    }

    pub fn allows(&self) -> bool {
        !self.isolated() || !self.allowing.is_empty()
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verdict {
    /// The source's egress.
    pub egress: Side,
    /// The destination's ingress.
    pub ingress: Side,
}

impl Verdict {
    pub fn allowed(&self) -> bool {
        self.egress.allows() && self.ingress.allows()
    }
}

/// The far end of a connection as one side's rules see it.
pub struct FarEnd<'a> {
    pub ip: Ipv4Addr,
    /// The pod at that address, if it is one policy sees.
    pub pod: Option<&'a Pod>,
    /// The destination pod, whose container ports name the named ports.
    pub port_pod: Option<&'a Pod>,
    pub proto: Option<Proto>,
    pub port: u16,
}

/// Whether `rule` of a policy in `policy_ns` matches a connection with `far`.
pub fn rule_matches(cluster: &Cluster, policy_ns: &str, rule: &Rule, far: &FarEnd<'_>) -> bool {
    let peer_ok = rule.peers.is_empty()
        || rule.peers.iter().any(|p| match p {
            Peer::Pods { .. } => far
                .pod
                .is_some_and(|pp| cluster.peer_selects_pod(p, policy_ns, pp)),
            Peer::IpBlock { cidr, except } => {
                cidr.contains(&far.ip) && !except.iter().any(|e| e.contains(&far.ip))
            }
            Peer::Unsupported(_) => false,
        });
    let port_ok = rule.ports.is_empty()
        || far.proto.is_some_and(|proto| {
            rule.ports.iter().any(|ps| {
                ps.proto == proto
                    && match &ps.port {
                        None => true,
                        Some(PortRef::Number(n)) => {
                            far.port >= *n && far.port <= ps.end_port.unwrap_or(*n).max(*n)
                        }
                        Some(PortRef::Name(name)) => {
                            far.port_pod.and_then(|p| p.named_port(name, proto)) == Some(far.port)
                        }
                    }
            })
        });
    peer_ok && port_ok
}

fn side(cluster: &Cluster, flow: &Flow, ingress: bool) -> Side {
    let (me_ip, other_ip) = if ingress {
        (flow.dst, flow.src)
    } else {
        (flow.src, flow.dst)
    };
    let me = cluster.pod_by_ip(me_ip);
    let other = cluster.pod_by_ip(other_ip);
    let dst_pod = if ingress { me } else { other };
    let Some(me) = me else {
        return Side {
            pod: None,
            isolating: Vec::new(),
            allowing: Vec::new(),
        };
    };
    let isolating = cluster.selecting(me, ingress);
    let allowing = isolating
        .iter()
        .filter(|p| {
            let rules = if ingress { &p.ingress } else { &p.egress };
            let far = FarEnd {
                ip: other_ip,
                pod: other,
                port_pod: dst_pod,
                proto: flow.proto,
                port: flow.port,
            };
            rules
                .iter()
                .flatten()
                .any(|r| rule_matches(cluster, &p.key.namespace, r, &far))
        })
        .map(|p| p.key.clone())
        .collect();
    Side {
        pod: Some(me.key.clone()),
        isolating: isolating.iter().map(|p| p.key.clone()).collect(),
        allowing,
    }
}

/// The verdict of NetworkPolicy on `flow`, with the policies behind it.
pub fn evaluate(cluster: &Cluster, flow: &Flow) -> Verdict {
    Verdict {
        egress: side(cluster, flow, false),
        ingress: side(cluster, flow, true),
    }
}
