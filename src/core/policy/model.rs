//! NetworkPolicy v1 as the engine sees it: what the Kubernetes adapter extracts from
//! Namespaces, Pods and NetworkPolicies (no more than the decision needs), and label
//! selectors with their matching rules.

use ipnet::Ipv4Net;
use std::collections::BTreeMap;
use std::fmt;
use std::net::Ipv4Addr;

pub type Labels = BTreeMap<String, String>;

/// `namespace/name`
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Key {
    pub namespace: String,
    pub name: String,
}

impl Key {
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Key {
        Key {
            namespace: namespace.into(),
            name: name.into(),
        }
    }
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// The protocols a NetworkPolicy port names.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Proto {
    Tcp,
    Udp,
    Sctp,
}

impl Proto {
    /// The IP protocol number.
    pub fn number(self) -> u8 {
        match self {
            Proto::Tcp => 6,
            Proto::Udp => 17,
            Proto::Sctp => 132,
        }
    }

    pub fn from_number(n: u8) -> Option<Proto> {
        match n {
            6 => Some(Proto::Tcp),
            17 => Some(Proto::Udp),
            132 => Some(Proto::Sctp),
            _ => None,
        }
    }

    /// Kubernetes' spelling (`TCP`); anything else is not a protocol policy can name.
    pub fn parse(s: &str) -> Option<Proto> {
        match s {
            "TCP" => Some(Proto::Tcp),
            "UDP" => Some(Proto::Udp),
            "SCTP" => Some(Proto::Sctp),
            _ => None,
        }
    }

    pub const ALL: [Proto; 3] = [Proto::Tcp, Proto::Udp, Proto::Sctp];
}

impl fmt::Display for Proto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Proto::Tcp => "TCP",
            Proto::Udp => "UDP",
            Proto::Sctp => "SCTP",
        })
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Operator {
    In,
    NotIn,
    Exists,
    DoesNotExist,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Requirement {
    pub key: String,
    pub operator: Operator,
    pub values: Vec<String>,
}

/// A label selector. The empty selector selects everything.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Selector {
    pub match_labels: Labels,
    pub match_expressions: Vec<Requirement>,
}

impl Selector {
    pub fn matches(&self, labels: &Labels) -> bool {
        self.match_labels
            .iter()
            .all(|(k, v)| labels.get(k) == Some(v))
            && self.match_expressions.iter().all(|r| {
                let value = labels.get(&r.key);
                match r.operator {
                    Operator::In => value.is_some_and(|v| r.values.contains(v)),
                    Operator::NotIn => !value.is_some_and(|v| r.values.contains(v)),
                    Operator::Exists => value.is_some(),
                    Operator::DoesNotExist => value.is_none(),
                }
            })
    }

    pub fn is_empty(&self) -> bool {
        self.match_labels.is_empty() && self.match_expressions.is_empty()
    }
}

impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_empty() {
            return f.write_str("(all)");
        }
        let mut parts: Vec<String> = self
            .match_labels
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        for r in &self.match_expressions {
            parts.push(match r.operator {
                Operator::In => format!("{} in ({})", r.key, r.values.join(",")),
                Operator::NotIn => format!("{} notin ({})", r.key, r.values.join(",")),
                Operator::Exists => r.key.clone(),
                Operator::DoesNotExist => format!("!{}", r.key),
            });
        }
        f.write_str(&parts.join(","))
    }
}

/// A container port with a name, as a named port in a policy refers to it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NamedPort {
    pub name: String,
    pub proto: Proto,
    pub port: u16,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Namespace {
    pub name: String,
    pub labels: Labels,
}

impl Namespace {
    /// Its labels, with `kubernetes.io/metadata.name` as Kubernetes 1.21+ sets it (so a
    /// policy selecting a namespace by name works on an older API server too).
    pub fn effective_labels(&self) -> Labels {
        let mut l = self.labels.clone();
        l.entry("kubernetes.io/metadata.name".into())
            .or_insert_with(|| self.name.clone());
        l
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pod {
    pub key: Key,
    pub labels: Labels,
    pub ip: Option<Ipv4Addr>,
    /// `spec.nodeName`
    pub node: Option<String>,
    pub host_network: bool,
    /// Phase Succeeded or Failed: its address may already be someone else's.
    pub finished: bool,
    pub named_ports: Vec<NamedPort>,
}

impl Pod {
    /// Whether policy sees this pod at all: weave-npc's rule and Kubernetes' — pods on the
    /// host's network are never selected, finished pods hold no address.
    pub fn policy_address(&self) -> Option<Ipv4Addr> {
        if self.host_network || self.finished {
            return None;
        }
        self.ip
    }

    pub fn named_port(&self, name: &str, proto: Proto) -> Option<u16> {
        self.named_ports
            .iter()
            .find(|p| p.name == name && p.proto == proto)
            .map(|p| p.port)
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PortRef {
    Number(u16),
    Name(String),
}

/// One entry of a rule's `ports`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PortSpec {
    pub proto: Proto,
    /// `None`: every port of the protocol.
    pub port: Option<PortRef>,
    /// `endPort` (with a numeric `port` only): the range port..=end_port.
    pub end_port: Option<u16>,
}

/// One entry of a rule's `from` / `to`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Peer {
    /// `podSelector` and/or `namespaceSelector`: pods selected by the first (all pods if
    /// absent) in the namespaces selected by the second (the policy's own namespace if
    /// absent).
    Pods {
        pods: Option<Selector>,
        namespaces: Option<Selector>,
    },
    /// `ipBlock`: addresses in `cidr` but in none of `except`.
    IpBlock { cidr: Ipv4Net, except: Vec<Ipv4Net> },
    /// A peer weft cannot apply (an IPv6 `ipBlock` in an IPv4 overlay): it matches nothing,
    /// and the engine says so.
    Unsupported(String),
}

/// One ingress or egress rule: traffic is allowed if it comes from (goes to) any of
/// `peers` and to any of `ports`. An empty (or absent) list matches everything.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Rule {
    pub peers: Vec<Peer>,
    pub ports: Vec<PortSpec>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Policy {
    pub key: Key,
    pub pod_selector: Selector,
    /// `Some` when the policy isolates selected pods for ingress (its `policyTypes`, or
    /// by default always), with the rules that allow traffic in.
    pub ingress: Option<Vec<Rule>>,
    /// `Some` when it isolates for egress (`policyTypes`, or by default when it has
    /// egress rules).
    pub egress: Option<Vec<Rule>>,
}

impl Policy {
    pub fn selects(&self, pod: &Pod) -> bool {
        pod.key.namespace == self.key.namespace
            && pod.policy_address().is_some()
            && self.pod_selector.matches(&pod.labels)
    }

    /// Peers of this policy that weft cannot apply, described.
    pub fn unsupported(&self) -> Vec<String> {
        self.ingress
            .iter()
            .chain(self.egress.iter())
            .flatten()
            .flat_map(|r| r.peers.iter())
            .filter_map(|p| match p {
                Peer::Unsupported(why) => Some(why.clone()),
                _ => None,
            })
            .collect()
    }
}

/// Everything the API says that policy depends on.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Cluster {
    pub namespaces: BTreeMap<String, Namespace>,
    pub pods: BTreeMap<Key, Pod>,
    pub policies: BTreeMap<Key, Policy>,
}

impl Cluster {
    /// The pod that holds `ip` (for policy: not on the host's network, not finished).
    pub fn pod_by_ip(&self, ip: Ipv4Addr) -> Option<&Pod> {
        self.pods.values().find(|p| p.policy_address() == Some(ip))
    }

    pub fn namespace_labels(&self, ns: &str) -> Labels {
        self.namespaces
            .get(ns)
            .map(Namespace::effective_labels)
            .unwrap_or_else(|| {
                Namespace {
                    name: ns.to_string(),
                    labels: Labels::new(),
                }
                .effective_labels()
            })
    }

    /// Whether `peer` of a policy in namespace `policy_ns` is the pod `pod`.
    pub fn peer_selects_pod(&self, peer: &Peer, policy_ns: &str, pod: &Pod) -> bool {
        match peer {
            Peer::Pods { pods, namespaces } => {
                if pod.policy_address().is_none() {
                    return false;
                }
                let ns_ok = match namespaces {
                    None => pod.key.namespace == policy_ns,
                    Some(sel) => sel.matches(&self.namespace_labels(&pod.key.namespace)),
                };
                ns_ok && pods.as_ref().is_none_or(|s| s.matches(&pod.labels))
            }
            _ => false,
        }
    }

    /// The policies selecting `pod` that isolate it for ingress (`true`) or egress.
    pub fn selecting(&self, pod: &Pod, ingress: bool) -> Vec<&Policy> {
        self.policies
            .values()
            .filter(|p| p.selects(pod))
            .filter(|p| {
                if ingress {
                    p.ingress.is_some()
                } else {
                    p.egress.is_some()
                }
            })
            .collect()
    }
}
