//! The router as the HTTP API sees it: allocations, claims, frees and rmpeer go to the
//! node, and are answered only once what they changed is saved; the report is assembled
//! from the node's, the mesh's and the data path's views.

use super::{lock, Shared};
use crate::api::assemble::{self, RouterFacts, Sources};
use crate::api::report::{Control, IpApiError, Report};
use crate::core::ipam::IpamError;
use crate::core::mesh::{Effects, Node, PeerName};
use ipnet::Ipv4Net;
use std::net::Ipv4Addr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use weft_contract::ContainerId;

pub(crate) struct RouterControl(pub(crate) Arc<Shared>);

fn map_ipam_error(e: IpamError) -> IpApiError {
    use IpamError as E;
    match e {
        E::NotReady => IpApiError::NotReady(e.to_string()),
        E::Exhausted { .. } => IpApiError::Exhausted(e.to_string()),
        E::InUse { .. } | E::NotOwned { .. } | E::RemoveSelf(_) | E::RemoveConnected(_) => {
            IpApiError::Conflict(e.to_string())
        }
        E::BadContainerId(_) | E::OutOfRange { .. } => IpApiError::BadRequest(e.to_string()),
        other => IpApiError::Internal(other.to_string()),
    }
}

impl RouterControl {
    /// Runs an IPAM operation, waiting up to `wait` for IPAM readiness, and answers only
    /// once its change is saved; if it cannot be saved the allocation is undone.
    async fn ipam_op(
        &self,
        id: &str,
        wait: Duration,
        op: impl Fn(&mut Node) -> (Result<Ipv4Addr, IpamError>, Effects),
    ) -> Result<Ipv4Net, IpApiError> {
        let s = &self.0;
        let deadline = tokio::time::Instant::now() + wait;
        let mut ready = s.ready.subscribe();
        let _pending = PendingAllocate::new(&s.pending_allocates, id);
        let result = loop {
            let (r, saved) = s.request(&op);
            match r {
                Ok(addr) => match saved.wait().await {
                    Ok(()) => {
                        break Ok(
                            Ipv4Net::new(addr, s.cfg.range.prefix_len()).expect("valid prefix")
                        );
                    }
                    Err(e) => {
                        // Not durable, so not granted: give the address back (the free is
                        // saved with the next successful save).
                        s.event(|n| n.free(id).1);
                        break Err(IpApiError::Internal(format!(
                            "allocation not saved, so not granted: {e}"
                        )));
                    }
                },
                Err(IpamError::NotReady) => {
                    let now = tokio::time::Instant::now();
                    if now >= deadline {
                        let status = s.with_node(|n| n.ipam_status());
                        break Err(IpApiError::NotReady(format!(
                            "IPAM is not ready after {wait:?}: {}",
                            assemble::ipam_status_text(&status)
                        )));
                    }
                    let _ = tokio::time::timeout(deadline - now, ready.changed()).await;
                }
                Err(e) => break Err(map_ipam_error(e)),
            }
        };
        result
    }
}

/// A request waiting in `ipam_op`, listed in the report's `PendingAllocates` until it
/// ends (however it ends: the guard also covers a cancelled request).
struct PendingAllocate<'a> {
    list: &'a std::sync::Mutex<Vec<String>>,
    id: String,
}

impl<'a> PendingAllocate<'a> {
    fn new(list: &'a std::sync::Mutex<Vec<String>>, id: &str) -> Self {
        lock(list).push(id.to_string());
        PendingAllocate {
            list,
            id: id.to_string(),
        }
    }
}

impl Drop for PendingAllocate<'_> {
    fn drop(&mut self) {
        let mut list = lock(self.list);
        if let Some(i) = list.iter().position(|x| *x == self.id) {
            list.remove(i);
        }
    }
}

impl Control for RouterControl {
    fn connect(&self, targets: Vec<crate::config::PeerTarget>, replace: bool) {
        super::mesh::connect_targets(&self.0, targets, replace);
    }

    fn forget(&self, targets: Vec<crate::config::PeerTarget>) -> usize {
        super::mesh::forget_targets(&self.0, targets)
    }

    async fn expose(&self, wait: Duration) -> Result<Ipv4Net, IpApiError> {
        if let Some(net) = *lock(&self.0.overlay) {
            return Ok(net);
        }
        let id = weft_contract::EXPOSE_ID;
        let net = self.ipam_op(id, wait, |n| n.allocate(id)).await?;
        // The overlay task puts it on the TUN (allocation is idempotent per id).
        self.0.overlay_wanted.notify_one();
        Ok(net)
    }

    fn telemetry(&self) -> &crate::api::telemetry::Telemetry {
        &self.0.telemetry
    }

    fn report(&self) -> Report {
        let s = &self.0;
        let (ready, peers, connections, ipam, terminations, counters) = s.with_node(|n| {
            (
                n.ipam().is_ready(),
                n.peers_view(),
                n.connections_view(),
                n.ipam_view(),
                n.terminations(),
                n.counters().clone(),
            )
        });
        let refused = crate::api::report::RefusedReport {
            handshakes: s.mesh.handshake_failures.load(Ordering::Relaxed),
            key_mismatches: counters.key_mismatches,
            tombstones: counters.refused_tombstones,
            forged_records: counters.forged_records,
            peers_over_bound: counters.peers_over_bound,
            send_overflows: s.mesh.send_overflows.load(Ordering::Relaxed),
        };
        assemble::report(Sources {
            ready,
            router: RouterFacts {
                name: s.name.clone(),
                nickname: s.cfg.nickname.clone(),
                port: s.cfg.port,
                data_port: s.cfg.data_port,
                interface: weft_contract::TUN_NAME.to_string(),
                mtu: s.mtu,
                overlay_address: *lock(&s.overlay),
                targets: s.mesh.source_targets(),
                password: s.cfg.secure.is_password(),
                encrypted: s.with_node(|n| n.encrypts()),
                datapath: match s.cfg.datapath {
                    crate::config::DatapathKind::Userspace => "vxlan",
                    crate::config::DatapathKind::Kernel => "fastdp",
                },
            },
            peers,
            connections,
            pending_targets: s.mesh.pending_targets(),
            terminations,
            refused,
            ipam,
            pending_allocates: lock(&s.pending_allocates).clone(),
            bad_requests: s.bad_requests.load(Ordering::Relaxed),
            datapath: s.backend.view(),
        })
        .with_policy(s.policy.as_ref().map(|p| p.report()))
    }

    async fn policy_admit(
        &self,
        key: crate::core::policy::Key,
        ip: Ipv4Addr,
    ) -> Result<bool, String> {
        match &self.0.policy {
            Some(p) => p.admit(key, ip).await.map(|()| true),
            None => Ok(false),
        }
    }

    fn policy_explain(
        &self,
        src: &str,
        dst: &str,
        proto: &str,
        port: u16,
    ) -> Option<Result<String, crate::policy::ExplainError>> {
        self.0
            .policy
            .as_ref()
            .map(|p| p.explain(src, dst, proto, port))
    }

    fn policy_table(&self) -> Option<String> {
        self.0
            .policy
            .as_ref()
            .map(|p| p.applied().table.to_string())
    }

    async fn allocate(
        &self,
        container_id: ContainerId,
        wait: Duration,
    ) -> Result<Ipv4Net, IpApiError> {
        let id = container_id.as_str();
        self.ipam_op(id, wait, |n| n.allocate(id)).await
    }

    async fn allocate_tentative(
        &self,
        container_id: ContainerId,
        wait: Duration,
    ) -> Result<Ipv4Net, IpApiError> {
        let id = container_id.as_str();
        self.ipam_op(id, wait, |n| n.allocate_tentative(id, None))
            .await
    }

    async fn confirm(&self, container_id: ContainerId) -> Result<Option<Ipv4Net>, IpApiError> {
        let prefix = self.0.cfg.range.prefix_len();
        let (r, saved) = self.0.request(|n| n.confirm(container_id.as_str()));
        saved
            .wait()
            .await
            .map_err(|e| IpApiError::Internal(format!("confirmed, but not saved: {e}")))?;
        Ok(r.map(|a| Ipv4Net::new(a, prefix).expect("valid prefix")))
    }

    async fn allocate_in(
        &self,
        container_id: ContainerId,
        subnet: Ipv4Net,
        tentative: bool,
        wait: Duration,
    ) -> Result<Ipv4Net, IpApiError> {
        let id = container_id.as_str();
        let subnet = subnet.trunc();
        // The requester's mistakes, told apart from the router's failures: a subnet the
        // range cannot serve is a bad request, an id holding an address elsewhere a
        // conflict (the IPAM refuses both as well).
        let range = self.0.cfg.range;
        if !range.contains(&subnet) {
            return Err(IpApiError::BadRequest(format!(
                "subnet {subnet} is not inside the allocation range {range}"
            )));
        }
        if let Some(held) = self.0.with_node(|n| n.ipam().lookup(id)) {
            if !subnet.contains(&held) {
                return Err(IpApiError::Conflict(format!(
                    "container {id} already has address {held}, outside {subnet}"
                )));
            }
        }
        let granted = if tentative {
            self.ipam_op(id, wait, |n| n.allocate_tentative(id, Some(subnet)))
                .await?
        } else {
            self.ipam_op(id, wait, |n| n.allocate_in(id, subnet))
                .await?
        };
        // The pod's network is the subnet, not the whole range.
        Ok(Ipv4Net::new(granted.addr(), subnet.prefix_len()).expect("valid prefix"))
    }

    async fn claim(
        &self,
        container_id: ContainerId,
        addr: Ipv4Addr,
        wait: Duration,
    ) -> Result<Ipv4Net, IpApiError> {
        let id = container_id.as_str();
        self.ipam_op(id, wait, |n| {
            let (r, fx) = n.claim(id, addr);
            (r.map(|()| addr), fx)
        })
        .await
    }

    fn lookup(&self, container_id: &ContainerId) -> Result<Option<Ipv4Net>, IpApiError> {
        let prefix = self.0.cfg.range.prefix_len();
        Ok(self
            .0
            .with_node(|n| n.ipam().lookup(container_id.as_str()))
            .map(|a| Ipv4Net::new(a, prefix).expect("valid prefix")))
    }

    fn count_bad_request(&self) {
        self.0.bad_requests.fetch_add(1, Ordering::Relaxed);
    }

    /// `name` is a peer name or a nickname (a Kubernetes Node name). A nickname may name
    /// several peers (a Node re-created under the same name is a new peer): each one not
    /// connected is removed, the connected one is left alone.
    async fn rmpeer(&self, name: &str) -> Result<u64, IpApiError> {
        let peers = match PeerName::parse(name) {
            Ok(p) => vec![p],
            Err(_) => {
                let v = self.0.with_node(|n| n.peers_named(name));
                if v.is_empty() {
                    return Err(IpApiError::NotFound(format!(
                        "no peer named {name:?}: give a peer name (like 02:77:66:00:00:01) or a nickname (the Node name) as `weft status peers` shows them"
                    )));
                }
                v
            }
        };
        let mut taken = 0;
        let mut first_error = None;
        let mut removed_any = false;
        for peer in peers {
            let (r, saved) = self.0.request(|n| n.rmpeer(&peer));
            match r {
                Ok(n) => {
                    saved.wait().await.map_err(|e| {
                        IpApiError::Internal(format!("took over, but not saved: {e}"))
                    })?;
                    taken += n;
                    removed_any = true;
                }
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        match (removed_any, first_error) {
            (false, Some(e)) => Err(map_ipam_error(e)),
            _ => Ok(taken),
        }
    }

    async fn forget_key(&self, name: &str) -> Result<u64, IpApiError> {
        let peers = match PeerName::parse(name) {
            Ok(p) => vec![p],
            Err(_) => self.0.with_node(|n| n.peers_named(name)),
        };
        let mut dropped = 0;
        for peer in peers {
            let (r, saved) = self.0.request(|n| n.forget_key(&peer));
            let r = r.map_err(map_ipam_error)?;
            saved
                .wait()
                .await
                .map_err(|e| IpApiError::Internal(format!("forgotten, but not saved: {e}")))?;
            dropped += u64::from(r);
        }
        Ok(dropped)
    }

    async fn free(&self, container_id: &ContainerId) -> Result<Option<Ipv4Addr>, IpApiError> {
        let (r, saved) = self.0.request(|n| n.free(container_id.as_str()));
        saved
            .wait()
            .await
            .map_err(|e| IpApiError::Internal(format!("freed, but not saved: {e}")))?;
        if let (Some(ip), Some(p)) = (r, &self.0.policy) {
            p.forget(ip);
        }
        Ok(r)
    }
}
