//! Kubernetes mode: the Nodes as a peer source, `NetworkUnavailable=False` once the router
//! is ready, and reclaiming a deleted Node's addresses by exactly one surviving node.
//!
//! Reclaim: when the Node list (complete, not a failed call) no longer has a Node, or at
//! start-up a ring member's Node is gone, the nodes race for a Lease named after that Node;
//! the one that gets it removes the dead peer (rmpeer: its ranges become the winner's),
//! writes what it did onto the Lease and logs it. The others see the peer gone from the
//! ring and stop; if the winner dies midway, the Lease expires and another takes over.
//! Nothing is reclaimed because the API is unreachable: only a list that succeeded can
//! show a Node gone, and a peer still connected is never removed.

use super::peers::PeerSource;
use super::Shared;
use crate::config::PeerTarget;
use crate::core::cluster::{self, Member, NodeSet};
use crate::core::mesh::PeerName;
use crate::k8s::{self, Leases};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{debug, info, warn};

/// How long a reclaim Lease is held: another node may take over a reclaim that did not
/// finish within it.
pub(crate) const LEASE_DURATION: Duration = Duration::from_secs(60);
/// After start-up, how long to hear the cluster (nicknames, the ring) before judging which
/// ring members lost their Node.
const STARTUP_GRACE: Duration = Duration::from_secs(15);
/// How often pending reclaims are looked at.
const RECLAIM_POLL: Duration = Duration::from_secs(5);

/// The other Nodes' addresses, as dial targets (plus the PEER arguments, if any).
pub(crate) struct KubePeers {
    nodes: watch::Receiver<NodeSet>,
    me: String,
    port: u16,
    extra: Vec<PeerTarget>,
    last: Option<Vec<PeerTarget>>,
}

impl KubePeers {
    pub(crate) fn new(
        nodes: watch::Receiver<NodeSet>,
        me: &str,
        port: u16,
        extra: Vec<PeerTarget>,
    ) -> KubePeers {
        KubePeers {
            nodes,
            me: me.to_string(),
            port,
            extra,
            last: None,
        }
    }
}

impl PeerSource for KubePeers {
    async fn next(&mut self) -> Option<Vec<PeerTarget>> {
        loop {
            let set = self.nodes.borrow_and_update().clone();
            if set.synced {
                let mut targets: Vec<PeerTarget> = set
                    .dial_targets(&self.me)
                    .into_iter()
                    .map(|a| PeerTarget {
                        host: a.to_string(),
                        port: self.port,
                    })
                    .collect();
                for t in &self.extra {
                    if !targets.contains(t) {
                        targets.push(t.clone());
                    }
                }
                if self.last.as_ref() != Some(&targets) {
                    self.last = Some(targets.clone());
                    return Some(targets);
                }
            }
            if self.nodes.changed().await.is_err() {
                return None;
            }
        }
    }
}

/// Waits for the first complete Node list, saying so every few seconds.
pub(crate) async fn first_list(nodes: &mut watch::Receiver<NodeSet>) -> NodeSet {
    let mut waited = 0u64;
    loop {
        if nodes.borrow().synced {
            return nodes.borrow().clone();
        }
        match tokio::time::timeout(Duration::from_secs(10), nodes.changed()).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => return nodes.borrow().clone(),
            Err(_) => {
                waited += 10;
                warn!(
                    "waiting {waited} s for the Kubernetes API to list the Nodes: the first division of the range needs their number"
                );
            }
        }
    }
}

/// Sets `NetworkUnavailable=False` on this Node once the router is ready, retrying with
/// backoff while the API cannot be reached.
pub(crate) async fn report_network_up(shared: Arc<Shared>, client: kube::Client, node: String) {
    let mut ready = shared.ready.subscribe();
    if ready.wait_for(|r| *r).await.is_err() {
        return;
    }
    let mut backoff = Duration::from_secs(1);
    loop {
        match k8s::set_network_available(client.clone(), &node).await {
            Ok(()) => {
                info!("Node {node}: condition NetworkUnavailable=False (WeftIsUp)");
                return;
            }
            Err(e) => {
                warn!("cannot set Node {node}'s NetworkUnavailable condition: {e}; retrying in {backoff:?}");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(60));
            }
        }
    }
}

/// What the reclaim of one deleted Node is waiting for.
struct Pending {
    next_try: Instant,
    backoff: Duration,
}

/// Follows Node deletions (and, once after start-up, ring members without a Node) and
/// reclaims their addresses under a Lease.
pub(crate) async fn reclaim_loop(
    shared: Arc<Shared>,
    leases: Leases,
    mut nodes: watch::Receiver<NodeSet>,
    me: String,
) {
    let started = Instant::now();
    let mut pending: BTreeMap<String, Pending> = BTreeMap::new();
    let mut previous = nodes.borrow_and_update().clone();
    let mut startup_checked = false;
    let mut poll = tokio::time::interval(RECLAIM_POLL);
    loop {
        tokio::select! {
            changed = nodes.changed() => {
                if changed.is_err() {
                    return;
                }
                let current = nodes.borrow_and_update().clone();
                for name in current.deleted_since(&previous) {
                    if name != me {
                        info!("Node {name} was deleted: its addresses are to be reclaimed");
                        pending.entry(name).or_insert(Pending { next_try: Instant::now(), backoff: RECLAIM_POLL });
                    }
                }
                if current.synced {
                    previous = current;
                }
            }
            _ = poll.tick() => {}
        }
        if !startup_checked && started.elapsed() >= STARTUP_GRACE && previous.synced {
            startup_checked = true;
            for (peer, name) in orphans(&shared, &previous, &me) {
                info!("ring member {peer} belonged to Node {name}, which no longer exists: its addresses are to be reclaimed");
                pending.entry(name).or_insert(Pending {
                    next_try: Instant::now(),
                    backoff: RECLAIM_POLL,
                });
            }
        }
        let due: Vec<String> = pending
            .iter()
            .filter(|(_, p)| p.next_try <= Instant::now())
            .map(|(n, _)| n.clone())
            .collect();
        for name in due {
            // A Node re-created under the same name is a new member: nothing to reclaim
            // while it is listed again and connected.
            match reclaim_one(&shared, &leases, &name, &me).await {
                Outcome::Done => {
                    pending.remove(&name);
                }
                Outcome::WhileConnected => {
                    if let Some(p) = pending.get_mut(&name) {
                        p.next_try = Instant::now() + RECLAIM_POLL;
                    }
                }
                Outcome::Later(after) => {
                    if let Some(p) = pending.get_mut(&name) {
                        p.next_try = Instant::now() + after.max(p.backoff);
                        p.backoff = (p.backoff * 2).min(LEASE_DURATION);
                    }
                }
            }
        }
    }
}

/// Ring members whose Node is gone, with that Node's name.
fn orphans(shared: &Shared, nodes: &NodeSet, me: &str) -> Vec<(PeerName, String)> {
    let members: Vec<Member> = shared.with_node(|n| {
        n.ring_members()
            .into_iter()
            .map(|p| Member {
                nickname: Some(n.nickname(&p)).filter(|s| !s.is_empty()),
                connected: n.is_reachable(&p),
                peer: p,
            })
            .collect()
    });
    let (gone, unknown) = cluster::orphaned_members(&members, nodes);
    for p in unknown {
        warn!("ring member {p} cannot be matched to a Node (its name was never heard): if its machine is gone for good, run `weft rmpeer {p}`");
    }
    gone.into_iter().filter(|(_, n)| n != me).collect()
}

enum Outcome {
    Done,
    Later(Duration),
    /// The peer is still connected: look again at the next poll, without backing off (a
    /// dead machine is noticed when its heartbeats time out).
    WhileConnected,
}

async fn reclaim_one(shared: &Arc<Shared>, leases: &Leases, node: &str, me: &str) -> Outcome {
    let (members, live): (Vec<PeerName>, Vec<PeerName>) = shared.with_node(|n| {
        let members: BTreeSet<PeerName> = n.ring_members().into_iter().collect();
        n.peers_named(node)
            .into_iter()
            .filter(|p| members.contains(p))
            .partition(|p| !n.is_reachable(p))
    });
    if members.is_empty() {
        if live.is_empty() {
            info!("Node {node}: no ring member of that name left (never joined, or reclaimed already)");
            return Outcome::Done;
        }
        // A connected peer is never reclaimed; a machine that died stays "connected" until
        // its heartbeats time out, so look again rather than give up.
        debug!(
            "Node {node}: its peer {} is connected; reclaimed only once it is not",
            live[0]
        );
        return Outcome::WhileConnected;
    }
    let lease = cluster::reclaim_lease_name(node);
    match leases.try_acquire(&lease).await {
        Ok(None) => {}
        Ok(Some(holder)) => {
            info!("Node {node}: {holder} holds lease {lease} and reclaims; checking again later");
            return Outcome::Later(LEASE_DURATION);
        }
        Err(e) => {
            warn!("Node {node}: cannot take lease {lease}: {e}; retrying");
            return Outcome::Later(RECLAIM_POLL);
        }
    }
    let mut taken = 0u64;
    let mut removed = Vec::new();
    for peer in &members {
        let (r, saved) = shared.request(|n| n.rmpeer(peer));
        match r {
            Ok(n) => {
                if let Err(e) = saved.wait().await {
                    warn!("Node {node}: took over peer {peer}'s ranges but cannot save it: {e}; retrying");
                    return Outcome::Later(RECLAIM_POLL);
                }
                taken += n;
                removed.push(peer.to_string());
            }
            Err(e) => {
                warn!("Node {node}: cannot remove peer {peer}: {e}");
            }
        }
    }
    if removed.is_empty() {
        return Outcome::Later(RECLAIM_POLL);
    }
    info!(
        "reclaimed deleted Node {node} (peer {}): {taken} IPs taken over by {me}",
        removed.join(", ")
    );
    let record: BTreeMap<String, String> = [
        ("weft.works/reclaimed-node", node.to_string()),
        ("weft.works/reclaimed-peers", removed.join(",")),
        ("weft.works/addresses-taken-over", taken.to_string()),
        ("weft.works/reclaimed-by", me.to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    if let Err(e) = leases.record(&lease, record).await {
        warn!("Node {node}: reclaimed, but cannot record it on lease {lease}: {e}");
    }
    Outcome::Done
}
