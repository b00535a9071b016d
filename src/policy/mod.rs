//! NetworkPolicy enforcement in the router (weave-npc's job): follows the API's
//! Namespaces, Pods and NetworkPolicies (`k8s::policy`), compiles what this node enforces
//! and keeps the kernel's table equal to it (`core::policy`, `io::nft_policy`), repairs
//! the table when someone removes it, reads refused connections from NFLOG and tells why.
//!
//! It lives in the router rather than in a second container, as weave-npc did, because a
//! pod must be isolated before its containers start: the CNI ADD asks the router for the
//! address, and then for the pod's rules (`admit`), in one place that knows both the
//! address it just handed out and the policies; and `/report`, the live page and
//! `weft policy explain` read the same state. The table outlives the router, so a restart
//! never lapses enforcement.

use crate::config::PolicyConfig;
use crate::core::policy::compile::{compile, Compiled, Problem};
use crate::core::policy::denied::Denied;
use crate::core::policy::eval::{evaluate, Flow, Side};
use crate::core::policy::model::{Key, Proto};
use crate::core::policy::ruleset::{build, Options, Table};
use crate::k8s::policy::PolicyInput;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};
use tokio::sync::{watch, Notify};
use tracing::{info, warn};

/// How long an ADD waits for its pod's rules before it fails (the runtime retries).
pub const ADMIT_WAIT: Duration = Duration::from_secs(10);
/// How often the kernel's table is compared with what was written.
pub const RESYNC_EVERY: Duration = Duration::from_secs(10);
/// Changes arriving together are applied together.
const COALESCE: Duration = Duration::from_millis(20);
/// Refused connections kept for the report.
const RECENT_DENIES: usize = 50;
/// Log lines about refused connections per second, at most.
const DENY_LOGS_PER_SEC: u32 = 10;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// What the last pass put in place.
#[derive(Clone, Debug, Default)]
pub struct Applied {
    /// Every list (Namespaces, Pods, NetworkPolicies) completed at least once.
    pub synced: bool,
    /// Tables written since start.
    pub generation: u64,
    pub compiled: Arc<Compiled>,
    pub table: Arc<Table>,
    /// CNI registrations the installed table reflects.
    pub included: BTreeSet<(Ipv4Addr, Key)>,
    /// The last write failed with this (it is retried).
    pub error: Option<String>,
    pub problems: Vec<Problem>,
    /// How long the last compile-and-write took.
    pub last_pass: Duration,
    /// NetworkPolicies the installed table was compiled from.
    pub policies: usize,
}

/// One refused connection, as the report shows it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "PascalCase")]
pub struct DenyReport {
    /// Seconds since the epoch.
    pub at: u64,
    pub protocol: String,
    pub src: String,
    pub dst: String,
    pub direction: String,
    pub pod: String,
    pub reason: String,
}

/// One pod of this node, as policy treats it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "PascalCase")]
pub struct PodPolicyReport {
    pub pod: String,
    pub address: String,
    pub ingress_isolated: bool,
    pub egress_isolated: bool,
    pub ingress_policies: Vec<String>,
    pub egress_policies: Vec<String>,
}

/// `/report`'s `NetworkPolicy` (weft's; Weave's report had none).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "PascalCase")]
pub struct PolicyReport {
    pub synced: bool,
    /// NetworkPolicies in the API that the installed table enforces.
    pub policies: usize,
    pub pods: Vec<PodPolicyReport>,
    pub generation: u64,
    pub table_elements: usize,
    pub denied_total: u64,
    pub recent_denies: Vec<DenyReport>,
    pub problems: Vec<String>,
    pub errors: u64,
    pub resyncs: u64,
    pub last_error: Option<String>,
    pub lost_logs: u64,
    pub allow_mcast: bool,
}

#[derive(Default)]
struct Denies {
    by_port: BTreeMap<(String, u16), u64>,
    total: u64,
    recent: VecDeque<DenyReport>,
    /// Log lines allowed in the current second, and lines held back since the last
    /// summary.
    window: Option<Instant>,
    logged_in_window: u32,
    suppressed: u64,
}

/// The engine's shared half: what the router's API calls.
pub struct PolicyEngine {
    node: String,
    cfg: PolicyConfig,
    opts: Options,
    input: watch::Receiver<PolicyInput>,
    /// Addresses the CNI plugin handed to pods on this node, before the API may know them.
    local: Mutex<BTreeMap<Ipv4Addr, Key>>,
    kick: Notify,
    applied: watch::Sender<Applied>,
    denies: Mutex<Denies>,
    /// weave-npc's `weavenpc_policy_enforcement_errors`.
    errors: AtomicU64,
    resyncs: AtomicU64,
    /// Refused connections the log could not take (a flood).
    pub lost_logs: Arc<AtomicU64>,
    events: Option<kube::Client>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ExplainError {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    NotFound(String),
}

impl PolicyEngine {
    pub fn new(
        node: &str,
        cfg: PolicyConfig,
        pod_link_prefix: &str,
        input: watch::Receiver<PolicyInput>,
        events: Option<kube::Client>,
    ) -> Arc<PolicyEngine> {
        let opts = Options {
            allow_mcast: cfg.allow_mcast,
            pod_link_prefix: pod_link_prefix.to_string(),
        };
        Arc::new(PolicyEngine {
            node: node.to_string(),
            cfg,
            opts,
            input,
            local: Mutex::new(BTreeMap::new()),
            kick: Notify::new(),
            applied: watch::channel(Applied::default()).0,
            denies: Mutex::new(Denies::default()),
            errors: AtomicU64::new(0),
            resyncs: AtomicU64::new(0),
            lost_logs: Arc::new(AtomicU64::new(0)),
            events,
        })
    }

    pub fn config(&self) -> &PolicyConfig {
        &self.cfg
    }

    /// The pod `key` got `ip` on this node (its CNI ADD): returns once the installed table
    /// treats it as its policies say, or why not within [`ADMIT_WAIT`].
    pub async fn admit(&self, key: Key, ip: Ipv4Addr) -> Result<(), String> {
        lock(&self.local).insert(ip, key.clone());
        self.kick.notify_one();
        let mut rx = self.applied.subscribe();
        let wanted = (ip, key.clone());
        let waited = tokio::time::timeout(ADMIT_WAIT, async {
            loop {
                if rx.borrow_and_update().included.contains(&wanted) {
                    return;
                }
                if rx.changed().await.is_err() {
                    return;
                }
            }
        })
        .await;
        if waited.is_ok() && self.applied.borrow().included.contains(&wanted) {
            return Ok(());
        }
        let a = self.applied.borrow().clone();
        let input = self.input.borrow();
        Err(if !input.synced() {
            "weft has not yet listed Namespaces, Pods and NetworkPolicies from the Kubernetes API"
                .to_string()
        } else if !input.cluster.pods.contains_key(&key) {
            format!("pod {key} is not in the Kubernetes API (yet)")
        } else if let Some(e) = a.error {
            format!("weft cannot write its policy table: {e}")
        } else {
            format!("the rules of pod {key} are not in place yet")
        })
    }

    /// The address is free again (its pod is gone).
    pub fn forget(&self, ip: Ipv4Addr) {
        if lock(&self.local).remove(&ip).is_some() {
            self.kick.notify_one();
        }
    }

    pub fn applied(&self) -> Applied {
        self.applied.borrow().clone()
    }

    /// The cluster as the table sees it: the API's, with this node's pods the CNI plugin
    /// registered (the API learns their addresses only after the ADD).
    fn current_cluster(
        &self,
    ) -> (
        bool,
        crate::core::policy::model::Cluster,
        Vec<(Ipv4Addr, Key)>,
    ) {
        let input = self.input.borrow().clone();
        let locals: Vec<(Ipv4Addr, Key)> = lock(&self.local)
            .iter()
            .map(|(ip, k)| (*ip, k.clone()))
            .collect();
        let synced = input.synced();
        let mut cluster = input.cluster;
        for (ip, key) in &locals {
            if let Some(p) = cluster.pods.get_mut(key) {
                if p.ip.is_none() {
                    p.ip = Some(*ip);
                }
                if p.node.is_none() {
                    p.node = Some(self.node.clone());
                }
            }
        }
        (synced, cluster, locals)
    }

    /// Keeps the kernel's table equal to what the API says, forever.
    pub async fn run(self: Arc<Self>) {
        let mut input = self.input.clone();
        let mut resync = tokio::time::interval(RESYNC_EVERY);
        resync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut written: Option<(Arc<Table>, String)> = None;
        let mut warned: BTreeSet<Problem> = BTreeSet::new();
        let mut retry_after: Option<Instant> = None;
        loop {
            let mut check = false;
            tokio::select! {
                r = input.changed() => if r.is_err() { return },
                _ = self.kick.notified() => {}
                _ = resync.tick() => check = true,
                _ = tokio::time::sleep(Duration::from_secs(1)), if retry_after.is_some() => {}
            }
            tokio::time::sleep(COALESCE).await;
            let started = Instant::now();
            let (synced, cluster, locals) = self.current_cluster();
            if !synced {
                // Until everything is listed the table in place stays: it is the last
                // complete view (from before a restart), better than a partial one.
                self.applied.send_modify(|a| a.synced = false);
                continue;
            }
            let compiled = compile(&cluster, &self.node);
            let table = build(&compiled, &self.opts);
            for p in &compiled.problems {
                if warned.insert(p.clone()) {
                    warn!("NetworkPolicy {}: {}", p.policy, p.what);
                    self.errors.fetch_add(1, Ordering::Relaxed);
                    if let Some(client) = self.events.clone() {
                        let (key, what, node) =
                            (p.policy.clone(), p.what.clone(), self.node.clone());
                        tokio::spawn(async move {
                            crate::k8s::policy::warn_policy(client, &key, &what, &node).await;
                        });
                    }
                }
            }
            // A problem is reported while its policy has it: fixed or deleted, it goes.
            warned.retain(|p| compiled.problems.contains(p));
            let mut rewrite = written.as_ref().is_none_or(|(t, _)| **t != table);
            if check && !rewrite {
                if let Some((t, tag)) = written.clone() {
                    let expect_rules = t.chains.first().map(|c| c.rules.len()).unwrap_or(0);
                    let found = tokio::task::spawn_blocking(crate::io::nft_policy::installed)
                        .await
                        .ok()
                        .and_then(|r| r.ok());
                    match found {
                        Some(Some((found_tag, rules)))
                            if found_tag == tag && rules == expect_rules => {}
                        Some(other) => {
                            warn!(
                                "the policy table was {} (a firewall reload?): writing it again",
                                if other.is_none() {
                                    "removed"
                                } else {
                                    "changed"
                                }
                            );
                            self.resyncs.fetch_add(1, Ordering::Relaxed);
                            rewrite = true;
                        }
                        None => {}
                    }
                }
            }
            let generation = self.applied.borrow().generation + u64::from(rewrite);
            let mut error = None;
            let table = Arc::new(table);
            if rewrite {
                let tag = format!("weft {} generation {generation}", self.node);
                let (t, g) = (table.clone(), tag.clone());
                let result =
                    tokio::task::spawn_blocking(move || crate::io::nft_policy::install(&t, &g))
                        .await
                        .map_err(|e| e.to_string())
                        .and_then(|r| r.map_err(|e| e.to_string()));
                match result {
                    Ok(()) => {
                        written = Some((table.clone(), tag));
                        retry_after = None;
                    }
                    Err(e) => {
                        warn!("cannot write the policy table: {e}; retrying");
                        self.errors.fetch_add(1, Ordering::Relaxed);
                        error = Some(e);
                        retry_after = Some(Instant::now() + Duration::from_secs(1));
                    }
                }
            }
            if error.is_some() {
                self.applied.send_modify(|a| {
                    a.error = error;
                    a.synced = true;
                });
                continue;
            }
            let included = locals
                .into_iter()
                .filter(|(ip, key)| {
                    compiled.pods.get(ip).is_some_and(|p| &p.key == key)
                        // A pod policy never sees (host network, finished) needs no rule.
                        || cluster.pods.get(key).is_some_and(|p| p.policy_address().is_none())
                })
                .collect();
            let last_pass = started.elapsed();
            let first = !self.applied.borrow().synced;
            self.applied.send_modify(|a| {
                a.synced = true;
                a.generation = generation;
                a.compiled = Arc::new(compiled);
                a.table = table.clone();
                a.included = included;
                a.error = None;
                a.problems = warned.iter().cloned().collect();
                a.last_pass = last_pass;
                a.policies = cluster.policies.len();
            });
            if first {
                info!(
                    "network policy: {} policies, {} pods here enforced ({} table elements, {} ms)",
                    cluster.policies.len(),
                    self.applied.borrow().compiled.pods.len(),
                    table.elements(),
                    last_pass.as_millis()
                );
            }
        }
    }

    /// A refused connection from NFLOG: counted, kept, and logged (rate-limited) with why.
    pub fn denied(&self, d: &Denied) {
        let compiled = self.applied.borrow().compiled.clone();
        let reason = d.reason(&compiled);
        let now = Instant::now();
        let mut log = None;
        {
            let mut s = lock(&self.denies);
            s.total += 1;
            *s.by_port.entry((d.protocol(), d.dport)).or_default() += 1;
            s.recent.push_back(DenyReport {
                at: SystemTime::now()
                    .duration_since(SystemTime::UNIX_EPOCH)
                    .map(|d| d.as_secs())
                    .unwrap_or(0),
                protocol: d.protocol(),
                src: format!("{}:{}", d.src, d.sport),
                dst: format!("{}:{}", d.dst, d.dport),
                direction: if d.ingress { "ingress" } else { "egress" }.into(),
                pod: reason
                    .pod
                    .as_ref()
                    .map(|k| k.to_string())
                    .unwrap_or_default(),
                reason: reason.to_string(),
            });
            while s.recent.len() > RECENT_DENIES {
                s.recent.pop_front();
            }
            if s.window
                .is_none_or(|w| now.duration_since(w) >= Duration::from_secs(1))
            {
                if s.suppressed > 0 {
                    warn!("{} more blocked connections not logged", s.suppressed);
                    s.suppressed = 0;
                }
                s.window = Some(now);
                s.logged_in_window = 0;
            }
            if s.logged_in_window < DENY_LOGS_PER_SEC {
                s.logged_in_window += 1;
                log = Some(format!("{d} ({reason})"));
            } else {
                s.suppressed += 1;
            }
        }
        if let Some(line) = log {
            warn!("{line}");
        }
    }

    pub fn report(&self) -> PolicyReport {
        let a = self.applied();
        let denies = lock(&self.denies);
        PolicyReport {
            synced: a.synced,
            policies: a.policies,
            pods: a
                .compiled
                .pods
                .values()
                .map(|p| PodPolicyReport {
                    pod: p.key.to_string(),
                    address: p.ip.to_string(),
                    ingress_isolated: p.ingress.is_some(),
                    egress_isolated: p.egress.is_some(),
                    ingress_policies: p.ingress_policies.iter().map(|k| k.to_string()).collect(),
                    egress_policies: p.egress_policies.iter().map(|k| k.to_string()).collect(),
                })
                .collect(),
            generation: a.generation,
            table_elements: a.table.elements(),
            denied_total: denies.total,
            recent_denies: denies.recent.iter().rev().cloned().collect(),
            problems: a
                .problems
                .iter()
                .map(|p| format!("{}: {}", p.policy, p.what))
                .collect(),
            errors: self.errors.load(Ordering::Relaxed),
            resyncs: self.resyncs.load(Ordering::Relaxed),
            last_error: a.error.clone(),
            lost_logs: self.lost_logs.load(Ordering::Relaxed),
            allow_mcast: self.cfg.allow_mcast,
        }
    }

    /// weave-npc's metrics, and weft's about the table, in Prometheus' text format.
    pub fn metrics_text(&self) -> String {
        use std::fmt::Write;
        let r = self.report();
        let denies = lock(&self.denies);
        let mut s = String::new();
        let _ = writeln!(s, "# HELP weavenpc_blocked_connections_total Connection attempts blocked by policy controller.");
        let _ = writeln!(s, "# TYPE weavenpc_blocked_connections_total counter");
        for ((proto, dport), n) in &denies.by_port {
            let _ = writeln!(
                s,
                "weavenpc_blocked_connections_total{{protocol=\"{proto}\",dport=\"{dport}\"}} {n}"
            );
        }
        let _ = writeln!(s, "# HELP weavenpc_policy_enforcement_errors Errors occured in enforcing the network policies.");
        let _ = writeln!(s, "# TYPE weavenpc_policy_enforcement_errors counter");
        let _ = writeln!(s, "weavenpc_policy_enforcement_errors {}", r.errors);
        for (name, help, v) in [
            (
                "weft_policy_resyncs_total",
                "Times the policy table was found removed or changed and written again.",
                r.resyncs,
            ),
            (
                "weft_policy_table_writes_total",
                "Policy tables written (one transaction each).",
                r.generation,
            ),
            (
                "weft_policy_lost_logs_total",
                "Refused connections not logged (the NFLOG reader could not keep up).",
                r.lost_logs,
            ),
        ] {
            let _ = writeln!(s, "# HELP {name} {help}");
            let _ = writeln!(s, "# TYPE {name} counter");
            let _ = writeln!(s, "{name} {v}");
        }
        for (name, help, v) in [
            (
                "weft_policy_table_elements",
                "Elements in the policy table's sets and maps.",
                r.table_elements as u64,
            ),
            (
                "weft_policy_pods_isolated",
                "Pods on this node isolated in at least one direction.",
                r.pods
                    .iter()
                    .filter(|p| p.ingress_isolated || p.egress_isolated)
                    .count() as u64,
            ),
            (
                "weft_policy_synced",
                "1 once Namespaces, Pods and NetworkPolicies are listed.",
                u64::from(r.synced),
            ),
        ] {
            let _ = writeln!(s, "# HELP {name} {help}");
            let _ = writeln!(s, "# TYPE {name} gauge");
            let _ = writeln!(s, "{name} {v}");
        }
        s
    }

    /// `weft policy explain`: the verdict on a new connection from `src` to `dst` (each
    /// `namespace/name` or an address) on `port`/`proto`, with the policies behind it.
    pub fn explain(
        &self,
        src: &str,
        dst: &str,
        proto: &str,
        port: u16,
    ) -> Result<String, ExplainError> {
        let (_, cluster, _) = self.current_cluster();
        let resolve = |s: &str| -> Result<(Ipv4Addr, String), ExplainError> {
            if let Ok(ip) = s.parse::<Ipv4Addr>() {
                let who = cluster
                    .pod_by_ip(ip)
                    .map(|p| format!("{} ({ip})", p.key))
                    .unwrap_or_else(|| format!("{ip} (not a pod policy sees)"));
                return Ok((ip, who));
            }
            let (ns, name) = s.split_once('/').ok_or_else(|| {
                ExplainError::BadRequest(format!(
                    "{s:?}: expected namespace/name or an IPv4 address"
                ))
            })?;
            let pod = cluster
                .pods
                .get(&Key::new(ns, name))
                .ok_or_else(|| ExplainError::NotFound(format!("no pod {s} in the API")))?;
            let ip = pod.policy_address().ok_or_else(|| {
                ExplainError::NotFound(format!(
                    "pod {s} has no address policy applies to (not started, finished, or on the host's network)"
                ))
            })?;
            Ok((ip, format!("{s} ({ip})")))
        };
        let (src_ip, src_name) = resolve(src)?;
        let (dst_ip, dst_name) = resolve(dst)?;
        let proto_v = match proto.to_ascii_uppercase().as_str() {
            "TCP" => Some(Proto::Tcp),
            "UDP" => Some(Proto::Udp),
            "SCTP" => Some(Proto::Sctp),
            "ICMP" | "" => None,
            other => {
                return Err(ExplainError::BadRequest(format!(
                    "protocol {other:?}: expected TCP, UDP, SCTP or ICMP"
                )))
            }
        };
        let v = evaluate(
            &cluster,
            &Flow {
                src: src_ip,
                dst: dst_ip,
                proto: proto_v,
                port,
            },
        );
        let side = |s: &Side, dir: &str| -> String {
            match &s.pod {
                None => format!("  {dir}: not a pod policy applies to: nothing to check"),
                Some(pod) if !s.isolated() => {
                    format!("  {dir} of {pod}: not isolated (no policy selects it for {dir})")
                }
                Some(pod) => {
                    let iso: Vec<String> = s.isolating.iter().map(|k| k.to_string()).collect();
                    if s.allowing.is_empty() {
                        format!(
                            "  {dir} of {pod}: isolated by {}; no rule allows it: DENIED",
                            iso.join(", ")
                        )
                    } else {
                        let by: Vec<String> = s.allowing.iter().map(|k| k.to_string()).collect();
                        format!(
                            "  {dir} of {pod}: isolated by {}; allowed by {}",
                            iso.join(", "),
                            by.join(", ")
                        )
                    }
                }
            }
        };
        let what = if proto_v.is_some() {
            format!("{}/{port}", proto.to_ascii_uppercase())
        } else {
            "ICMP".to_string()
        };
        Ok(format!(
            "{src_name} -> {dst_name} {what}: {}\n{}\n{}\n",
            if v.allowed() { "ALLOWED" } else { "DENIED" },
            side(&v.egress, "egress"),
            side(&v.ingress, "ingress"),
        ))
    }
}
