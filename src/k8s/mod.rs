//! Thin adapters for the Kubernetes API (kube-rs and k8s-openapi; no hand-written HTTP):
//! the client, the Node list and watch, this Node's `NetworkUnavailable` condition, and
//! the Leases that make one node reclaim a deleted Node's addresses. What to do with the
//! answers is decided in `core::cluster` and the router.

pub mod policy;

use crate::config::KubeSettings;
use crate::core::cluster::{self, LeaseState, NodeSet};
use futures::TryStreamExt;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Client, Config};
use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::watch;
use tracing::{info, warn};

/// Bounds every single API call but the watch: a slow API server must not hold a task
/// forever.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the server keeps a watch open before the watcher renews it.
const WATCH_TIMEOUT_SECS: u32 = 240;

#[derive(Debug, thiserror::Error)]
pub enum KubeError {
    #[error("cannot read the kubeconfig {path}: {source}")]
    Kubeconfig {
        path: String,
        source: kube::config::KubeconfigError,
    },
    #[error("not in a pod with a service account: {0}")]
    InCluster(#[from] kube::config::InClusterError),
    #[error("Kubernetes API: {0}")]
    Api(#[from] kube::Error),
    #[error("Kubernetes API: no answer within {0:?}")]
    Timeout(Duration),
}

impl KubeError {
    /// The API answered 409: the object changed (or exists) under us.
    pub fn is_conflict(&self) -> bool {
        matches!(self, KubeError::Api(kube::Error::Api(s)) if s.is_conflict() || s.is_already_exists())
    }
}

async fn bounded<T>(
    f: impl std::future::Future<Output = Result<T, kube::Error>>,
) -> Result<T, KubeError> {
    tokio::time::timeout(CALL_TIMEOUT, f)
        .await
        .map_err(|_| KubeError::Timeout(CALL_TIMEOUT))?
        .map_err(KubeError::from)
}

/// A client from the kubeconfig given, else the pod's service account.
pub async fn connect(settings: &KubeSettings) -> Result<Client, KubeError> {
    let mut config = match &settings.kubeconfig {
        Some(path) => {
            let kc = kube::config::Kubeconfig::read_from(path).map_err(|source| {
                KubeError::Kubeconfig {
                    path: path.display().to_string(),
                    source,
                }
            })?;
            Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
                .await
                .map_err(|source| KubeError::Kubeconfig {
                    path: path.display().to_string(),
                    source,
                })?
        }
        None => Config::incluster()?,
    };
    config.connect_timeout = Some(Duration::from_secs(10));
    Ok(Client::try_from(config)?)
}

fn node_entry(n: &Node) -> Option<(String, Option<std::net::Ipv4Addr>)> {
    let name = n.metadata.name.clone()?;
    let addresses = n
        .status
        .as_ref()
        .and_then(|s| s.addresses.as_ref())
        .map(|a| {
            a.iter()
                .map(|x| (x.type_.as_str(), x.address.as_str()))
                .collect::<Vec<_>>()
        })
        .unwrap_or_default();
    Some((name, cluster::node_address(addresses)))
}

/// Lists and watches the Nodes forever, publishing every change of the set. A complete
/// list (at start, and after the watch had to start over) replaces the set at once and
/// marks it synced; until then, and whenever the API cannot be reached, the last set stays
/// as it is: an unreachable API never makes a Node look deleted.
pub async fn watch_nodes(client: Client, tx: watch::Sender<NodeSet>) {
    let api: Api<Node> = Api::all(client);
    let config = watcher::Config::default().timeout(WATCH_TIMEOUT_SECS);
    let mut stream = std::pin::pin!(watcher(api, config).default_backoff());
    let mut building: BTreeMap<String, Option<std::net::Ipv4Addr>> = BTreeMap::new();
    let mut failures = 0u32;
    loop {
        match stream.try_next().await {
            Ok(Some(event)) => {
                if failures > 0 {
                    info!("Kubernetes API reachable again: following Nodes");
                    failures = 0;
                }
                match event {
                    watcher::Event::Init => building.clear(),
                    watcher::Event::InitApply(n) => {
                        if let Some((name, a)) = node_entry(&n) {
                            building.insert(name, a);
                        }
                    }
                    watcher::Event::InitDone => {
                        let nodes = std::mem::take(&mut building);
                        tx.send_modify(|s| {
                            s.nodes = nodes;
                            s.synced = true;
                        });
                    }
                    watcher::Event::Apply(n) => {
                        if let Some((name, a)) = node_entry(&n) {
                            tx.send_if_modified(|s| s.nodes.insert(name, a) != Some(a));
                        }
                    }
                    watcher::Event::Delete(n) => {
                        if let Some(name) = n.metadata.name {
                            tx.send_if_modified(|s| s.nodes.remove(&name).is_some());
                        }
                    }
                }
            }
            Ok(None) => return,
            Err(e) => {
                // The watcher backs off and retries by itself; say it once, then rarely.
                failures += 1;
                if failures == 1 || failures.is_multiple_of(30) {
                    warn!(
                        "cannot follow Nodes in the Kubernetes API ({failures} failures): {e}; keeping the last known peers"
                    );
                }
            }
        }
    }
}

/// Sets `NetworkUnavailable=False` on Node `node` (reason `WeftIsUp`), as Weave, flannel
/// and Calico do once pod networking works. A strategic merge patch of `conditions`
/// (merge key `type`), so the kubelet's own conditions stay untouched.
pub async fn set_network_available(client: Client, node: &str) -> Result<(), KubeError> {
    let now = now_rfc3339();
    let patch = serde_json::json!({
        "status": {
            "conditions": [{
                "type": "NetworkUnavailable",
                "status": "False",
                "reason": "WeftIsUp",
                "message": "weft is running on this node",
                "lastTransitionTime": now,
                "lastHeartbeatTime": now,
            }]
        }
    });
    let api: Api<Node> = Api::all(client);
    bounded(api.patch_status(node, &PatchParams::default(), &Patch::Strategic(patch))).await?;
    Ok(())
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

fn now_rfc3339() -> String {
    k8s_openapi::jiff::Timestamp::from_second(unix_now())
        .map(|t| t.to_string())
        .unwrap_or_default()
}

fn micro_now() -> Option<MicroTime> {
    k8s_openapi::jiff::Timestamp::from_second(unix_now())
        .ok()
        .map(MicroTime)
}

fn lease_state(l: &Lease) -> LeaseState {
    let spec = l.spec.clone().unwrap_or_default();
    LeaseState {
        holder: spec.holder_identity,
        renewed_at: spec
            .renew_time
            .or(spec.acquire_time)
            .map(|t| t.0.as_second()),
        duration: i64::from(spec.lease_duration_seconds.unwrap_or(0)),
    }
}

/// Leases in one namespace, held as `holder` (this node's name).
pub struct Leases {
    api: Api<Lease>,
    holder: String,
    duration: i32,
}

impl Leases {
    pub fn new(client: Client, namespace: &str, holder: &str, duration: Duration) -> Leases {
        Leases {
            api: Api::namespaced(client, namespace),
            holder: holder.to_string(),
            duration: i32::try_from(duration.as_secs()).unwrap_or(i32::MAX),
        }
    }

    /// Takes lease `name` if nobody holds it (creating it), it is ours, or its holder let
    /// it expire. Optimistic concurrency: the update carries the resourceVersion read, so
    /// of two nodes trying at once exactly one succeeds. `Ok(None)` when taken; otherwise
    /// the current holder.
    pub async fn try_acquire(&self, name: &str) -> Result<Option<String>, KubeError> {
        let now = unix_now();
        let current = bounded(self.api.get_opt(name)).await?;
        let spec = |transitions: i32| LeaseSpec {
            holder_identity: Some(self.holder.clone()),
            lease_duration_seconds: Some(self.duration),
            acquire_time: micro_now(),
            renew_time: micro_now(),
            lease_transitions: Some(transitions),
            ..LeaseSpec::default()
        };
        let Some(mut lease) = current else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(name.to_string()),
                    ..ObjectMeta::default()
                },
                spec: Some(spec(0)),
            };
            return match bounded(self.api.create(&PostParams::default(), &lease)).await {
                Ok(_) => Ok(None),
                Err(e) if e.is_conflict() => Ok(Some("another node".into())),
                Err(e) => Err(e),
            };
        };
        match cluster::lease_decision(&lease_state(&lease), &self.holder, now) {
            cluster::LeaseDecision::HeldBy { holder, .. } => Ok(Some(holder)),
            cluster::LeaseDecision::Take => {
                let old = lease.spec.clone().unwrap_or_default();
                let changed = old.holder_identity.as_deref() != Some(self.holder.as_str());
                let transitions = old.lease_transitions.unwrap_or(0) + i32::from(changed);
                lease.spec = Some(spec(transitions));
                match bounded(self.api.replace(name, &PostParams::default(), &lease)).await {
                    Ok(_) => Ok(None),
                    Err(e) if e.is_conflict() => Ok(Some("another node".into())),
                    Err(e) => Err(e),
                }
            }
        }
    }

    /// Writes `annotations` onto lease `name` (which this node holds): the record of
    /// what it did.
    pub async fn record(
        &self,
        name: &str,
        annotations: BTreeMap<String, String>,
    ) -> Result<(), KubeError> {
        let patch = serde_json::json!({ "metadata": { "annotations": annotations } });
        bounded(
            self.api
                .patch(name, &PatchParams::default(), &Patch::Merge(patch)),
        )
        .await?;
        Ok(())
    }
}
