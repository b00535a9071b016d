//! What NetworkPolicy enforcement reads from the API: Namespaces, Pods and
//! `networking.k8s.io/v1` NetworkPolicies, listed and watched cluster-wide and turned into
//! `core::policy::model` (only the fields a decision needs, so 10,000 pods cost little),
//! and Events on policies weft cannot apply in full.

use crate::core::policy::model::{
    self as m, Cluster, Key, Labels, NamedPort, Peer, PortRef, PortSpec, Proto, Requirement, Rule,
    Selector,
};
use futures::TryStreamExt;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use k8s_openapi::api::networking::v1::{
    NetworkPolicy, NetworkPolicyIngressRule, NetworkPolicyPeer, NetworkPolicyPort,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::api::Api;
use kube::runtime::{watcher, WatchStreamExt};
use kube::Client;
use std::collections::BTreeMap;
use tokio::sync::watch;
use tracing::{info, warn};

/// The cluster as policy sees it, and whether every list has completed (before that,
/// nothing is enforced anew: the table in place stays).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PolicyInput {
    pub cluster: Cluster,
    pub namespaces_synced: bool,
    pub pods_synced: bool,
    pub policies_synced: bool,
}

impl PolicyInput {
    pub fn synced(&self) -> bool {
        self.namespaces_synced && self.pods_synced && self.policies_synced
    }
}

fn labels(l: &Option<BTreeMap<String, String>>) -> Labels {
    l.clone().unwrap_or_default()
}

pub fn selector(s: &LabelSelector) -> Selector {
    Selector {
        match_labels: labels(&s.match_labels),
        match_expressions: s
            .match_expressions
            .iter()
            .flatten()
            .filter_map(|e| {
                let operator = match e.operator.as_str() {
                    "In" => m::Operator::In,
                    "NotIn" => m::Operator::NotIn,
                    "Exists" => m::Operator::Exists,
                    "DoesNotExist" => m::Operator::DoesNotExist,
                    // The API server validates operators; an unknown one selects nothing.
                    _ => return None,
                };
                Some(Requirement {
                    key: e.key.clone(),
                    operator,
                    values: e.values.clone().unwrap_or_default(),
                })
            })
            .collect(),
    }
}

pub fn namespace(n: &Namespace) -> Option<m::Namespace> {
    Some(m::Namespace {
        name: n.metadata.name.clone()?,
        labels: labels(&n.metadata.labels),
    })
}

pub fn pod(p: &Pod) -> Option<m::Pod> {
    let spec = p.spec.as_ref();
    let status = p.status.as_ref();
    let phase = status.and_then(|s| s.phase.as_deref()).unwrap_or("");
    let named_ports = spec
        .map(|s| {
            s.containers
                .iter()
                .flat_map(|c| c.ports.iter().flatten())
                .filter_map(|cp| {
                    Some(NamedPort {
                        name: cp.name.clone()?,
                        proto: Proto::parse(cp.protocol.as_deref().unwrap_or("TCP"))?,
                        port: u16::try_from(cp.container_port).ok()?,
                    })
                })
                .collect()
        })
        .unwrap_or_default();
    Some(m::Pod {
        key: Key::new(p.metadata.namespace.clone()?, p.metadata.name.clone()?),
        labels: labels(&p.metadata.labels),
        ip: status
            .and_then(|s| s.pod_ip.as_deref())
            .and_then(|ip| ip.parse().ok()),
        node: spec.and_then(|s| s.node_name.clone()),
        host_network: spec.and_then(|s| s.host_network).unwrap_or(false),
        finished: matches!(phase, "Succeeded" | "Failed"),
        named_ports,
    })
}

fn peer(p: &NetworkPolicyPeer) -> Peer {
    if let Some(b) = &p.ip_block {
        return match b.cidr.parse::<ipnet::Ipv4Net>() {
            Ok(cidr) => Peer::IpBlock {
                cidr: cidr.trunc(),
                except: b
                    .except
                    .iter()
                    .flatten()
                    .filter_map(|e| e.parse::<ipnet::Ipv4Net>().ok().map(|n| n.trunc()))
                    .collect(),
            },
            Err(_) => Peer::Unsupported(format!(
                "ipBlock {}: not an IPv4 network (weft's overlay is IPv4 only); this peer matches nothing",
                b.cidr
            )),
        };
    }
    Peer::Pods {
        pods: p.pod_selector.as_ref().map(selector),
        namespaces: p.namespace_selector.as_ref().map(selector),
    }
}

fn port(p: &NetworkPolicyPort) -> Option<PortSpec> {
    let proto = Proto::parse(p.protocol.as_deref().unwrap_or("TCP"))?;
    let port = match &p.port {
        None => None,
        Some(IntOrString::Int(n)) => Some(PortRef::Number(u16::try_from(*n).ok()?)),
        Some(IntOrString::String(s)) => match s.parse::<u16>() {
            Ok(n) => Some(PortRef::Number(n)),
            Err(_) => Some(PortRef::Name(s.clone())),
        },
    };
    let end_port = match (&port, p.end_port) {
        (Some(PortRef::Number(_)), Some(e)) => u16::try_from(e).ok(),
        _ => None,
    };
    Some(PortSpec {
        proto,
        port,
        end_port,
    })
}

fn rule(peers: &Option<Vec<NetworkPolicyPeer>>, ports: &Option<Vec<NetworkPolicyPort>>) -> Rule {
    Rule {
        peers: peers.iter().flatten().map(peer).collect(),
        ports: ports.iter().flatten().filter_map(port).collect(),
    }
}

pub fn policy(np: &NetworkPolicy) -> Option<m::Policy> {
    let key = Key::new(np.metadata.namespace.clone()?, np.metadata.name.clone()?);
    let spec = np.spec.clone().unwrap_or_default();
    let types: Vec<String> = spec.policy_types.clone().unwrap_or_default();
    // Kubernetes' defaults: Ingress always; Egress when the policy has egress rules.
    let (isolate_in, isolate_out) = if types.is_empty() {
        (true, spec.egress.as_ref().is_some_and(|e| !e.is_empty()))
    } else {
        (
            types.iter().any(|t| t == "Ingress"),
            types.iter().any(|t| t == "Egress"),
        )
    };
    let ingress = isolate_in.then(|| {
        spec.ingress
            .iter()
            .flatten()
            .map(|r: &NetworkPolicyIngressRule| rule(&r.from, &r.ports))
            .collect()
    });
    let egress = isolate_out.then(|| {
        spec.egress
            .iter()
            .flatten()
            .map(|r| rule(&r.to, &r.ports))
            .collect()
    });
    Some(m::Policy {
        key,
        pod_selector: spec.pod_selector.as_ref().map(selector).unwrap_or_default(),
        ingress,
        egress,
    })
}

/// How one kind of object enters [`PolicyInput`]: its key, its model (only what a
/// decision needs: the full object is dropped as soon as it is read, so 10,000 pods cost
/// their labels and addresses, not their specs), and its place.
struct Kind<K, Q, T> {
    what: &'static str,
    key: fn(&K) -> Option<Q>,
    model: fn(&K) -> Option<T>,
    slot: fn(&mut PolicyInput) -> &mut BTreeMap<Q, T>,
    synced: fn(&mut PolicyInput) -> &mut bool,
}

/// Lists and watches one kind into `tx`, forever. A complete list replaces the kind's
/// map at once and marks it synced; until then, and while the API cannot be reached, the
/// last one stays.
async fn follow<K, Q, T>(api: Api<K>, kind: Kind<K, Q, T>, tx: watch::Sender<PolicyInput>)
where
    K: kube::Resource + Clone + std::fmt::Debug + serde::de::DeserializeOwned + Send + 'static,
    K::DynamicType: Default,
    Q: Ord + Clone,
    T: PartialEq,
{
    let config = watcher::Config::default().timeout(240);
    let mut stream = std::pin::pin!(watcher(api, config).default_backoff());
    let mut failures = 0u32;
    let mut building: BTreeMap<Q, T> = BTreeMap::new();
    loop {
        match stream.try_next().await {
            Ok(Some(event)) => {
                if failures > 0 {
                    info!("Kubernetes API reachable again: following {}", kind.what);
                    failures = 0;
                }
                match event {
                    watcher::Event::Init => building.clear(),
                    watcher::Event::InitApply(o) => {
                        if let (Some(k), Some(t)) = ((kind.key)(&o), (kind.model)(&o)) {
                            building.insert(k, t);
                        }
                    }
                    watcher::Event::InitDone => {
                        let all = std::mem::take(&mut building);
                        tx.send_modify(|s| {
                            *(kind.slot)(s) = all;
                            *(kind.synced)(s) = true;
                        });
                    }
                    watcher::Event::Apply(o) => {
                        let Some(k) = (kind.key)(&o) else { continue };
                        let t = (kind.model)(&o);
                        drop(o);
                        tx.send_if_modified(|s| {
                            let map = (kind.slot)(s);
                            match t {
                                Some(t) if map.get(&k) != Some(&t) => {
                                    map.insert(k, t);
                                    true
                                }
                                Some(_) => false,
                                None => map.remove(&k).is_some(),
                            }
                        });
                    }
                    watcher::Event::Delete(o) => {
                        if let Some(k) = (kind.key)(&o) {
                            tx.send_if_modified(|s| (kind.slot)(s).remove(&k).is_some());
                        }
                    }
                }
            }
            Ok(None) => return,
            Err(e) => {
                failures += 1;
                if failures == 1 || failures.is_multiple_of(30) {
                    warn!("cannot follow {} in the Kubernetes API ({failures} failures): {e}; enforcing the last known policies", kind.what);
                }
            }
        }
    }
}

fn namespaced_key<K: kube::Resource>(o: &K) -> Option<Key> {
    Some(Key::new(
        o.meta().namespace.clone()?,
        o.meta().name.clone()?,
    ))
}

/// Follows Namespaces, Pods and NetworkPolicies into `tx`, forever.
pub async fn watch_policy_inputs(client: Client, tx: watch::Sender<PolicyInput>) {
    let namespaces = follow(
        Api::<Namespace>::all(client.clone()),
        Kind {
            what: "Namespaces",
            key: |n| n.metadata.name.clone(),
            model: namespace,
            slot: |s| &mut s.cluster.namespaces,
            synced: |s| &mut s.namespaces_synced,
        },
        tx.clone(),
    );
    let pods = follow(
        Api::<Pod>::all(client.clone()),
        Kind {
            what: "Pods",
            key: namespaced_key,
            model: pod,
            slot: |s| &mut s.cluster.pods,
            synced: |s| &mut s.pods_synced,
        },
        tx.clone(),
    );
    let policies = follow(
        Api::<NetworkPolicy>::all(client),
        Kind {
            what: "NetworkPolicies",
            key: namespaced_key,
            model: policy,
            slot: |s| &mut s.cluster.policies,
            synced: |s| &mut s.policies_synced,
        },
        tx,
    );
    tokio::join!(namespaces, pods, policies);
}

/// A Warning Event on a NetworkPolicy that weft enforces only in part.
pub async fn warn_policy(client: Client, policy: &Key, what: &str, node: &str) {
    use kube::runtime::events::{Event, EventType, Recorder, Reporter};
    let reporter = Reporter {
        controller: "weft".into(),
        instance: Some(node.to_string()),
    };
    let recorder = Recorder::new(client, reporter);
    let reference = k8s_openapi::api::core::v1::ObjectReference {
        api_version: Some("networking.k8s.io/v1".into()),
        kind: Some("NetworkPolicy".into()),
        namespace: Some(policy.namespace.clone()),
        name: Some(policy.name.clone()),
        ..Default::default()
    };
    let event = Event {
        type_: EventType::Warning,
        reason: "PolicyNotFullyApplied".into(),
        note: Some(what.chars().take(1000).collect()),
        action: "Enforce".into(),
        secondary: None,
    };
    if let Err(e) = recorder.publish(&event, &reference).await {
        warn!("cannot record an Event on NetworkPolicy {policy}: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn np(json: serde_json::Value) -> m::Policy {
        let np: NetworkPolicy = serde_json::from_value(json).unwrap();
        policy(&np).unwrap()
    }

    #[test]
    fn policy_types_default_as_kubernetes_defaults_them() {
        let only_ingress = np(serde_json::json!({
            "metadata": {"namespace": "x", "name": "a"},
            "spec": {"podSelector": {}}
        }));
        assert_eq!(only_ingress.ingress, Some(Vec::new()), "deny all ingress");
        assert_eq!(only_ingress.egress, None);
        let with_egress = np(serde_json::json!({
            "metadata": {"namespace": "x", "name": "b"},
            "spec": {"podSelector": {}, "egress": [{"ports": [{"port": 53, "protocol": "UDP"}]}]}
        }));
        assert!(with_egress.ingress.is_some() && with_egress.egress.is_some());
        let egress_only = np(serde_json::json!({
            "metadata": {"namespace": "x", "name": "c"},
            "spec": {"podSelector": {}, "policyTypes": ["Egress"]}
        }));
        assert_eq!(egress_only.ingress, None);
        assert_eq!(egress_only.egress, Some(Vec::new()), "deny all egress");
    }

    #[test]
    fn peers_and_ports() {
        let p = np(serde_json::json!({
            "metadata": {"namespace": "x", "name": "a"},
            "spec": {
                "podSelector": {"matchLabels": {"app": "db"}},
                "ingress": [{
                    "from": [
                        {"podSelector": {"matchExpressions": [{"key": "tier", "operator": "In", "values": ["web"]}]},
                         "namespaceSelector": {"matchLabels": {"team": "a"}}},
                        {"ipBlock": {"cidr": "10.0.0.0/8", "except": ["10.1.0.0/16"]}},
                        {"ipBlock": {"cidr": "fd00::/8"}}
                    ],
                    "ports": [
                        {"port": 5432},
                        {"port": "metrics", "protocol": "TCP"},
                        {"protocol": "SCTP", "port": 3000, "endPort": 3010},
                        {"protocol": "UDP"}
                    ]
                }]
            }
        }));
        let r = &p.ingress.unwrap()[0];
        assert!(
            matches!(&r.peers[0], Peer::Pods { pods: Some(s), namespaces: Some(n) }
            if s.match_expressions[0].operator == m::Operator::In && n.match_labels["team"] == "a")
        );
        assert!(matches!(&r.peers[1], Peer::IpBlock { except, .. } if except.len() == 1));
        assert!(matches!(&r.peers[2], Peer::Unsupported(_)));
        assert_eq!(
            r.ports[0],
            PortSpec {
                proto: Proto::Tcp,
                port: Some(PortRef::Number(5432)),
                end_port: None
            }
        );
        assert_eq!(r.ports[1].port, Some(PortRef::Name("metrics".into())));
        assert_eq!(
            r.ports[2],
            PortSpec {
                proto: Proto::Sctp,
                port: Some(PortRef::Number(3000)),
                end_port: Some(3010)
            }
        );
        assert_eq!(
            r.ports[3],
            PortSpec {
                proto: Proto::Udp,
                port: None,
                end_port: None
            }
        );
    }

    #[test]
    fn pods_keep_what_policy_needs() {
        let p: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"namespace": "x", "name": "a", "labels": {"app": "web"}},
            "spec": {"nodeName": "n1", "containers": [{"name": "c", "ports": [
                {"name": "http", "containerPort": 8080},
                {"name": "dns", "containerPort": 53, "protocol": "UDP"},
                {"containerPort": 9000}
            ]}]},
            "status": {"phase": "Running", "podIP": "192.168.0.5"}
        }))
        .unwrap();
        let p = pod(&p).unwrap();
        assert_eq!(p.ip, Some("192.168.0.5".parse().unwrap()));
        assert_eq!(p.node.as_deref(), Some("n1"));
        assert_eq!(p.named_port("http", Proto::Tcp), Some(8080));
        assert_eq!(p.named_port("dns", Proto::Udp), Some(53));
        assert_eq!(p.named_ports.len(), 2);
        assert!(!p.finished && !p.host_network);
    }
}
