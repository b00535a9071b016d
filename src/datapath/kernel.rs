//! The kernel backend (`--datapath kernel`, Weave's fastdp counterpart): the Linux VXLAN
//! device `weave` forwards, and weft only programs it. Each route change becomes a
//! [`KernelPlan`]; a task diffs it against what is installed and carries out the netlink
//! changes, retrying what failed. Datagrams are the user-space path's (VNI, port, inner
//! MACs), so kernel and user-space nodes interoperate.
//!
//! There is no per-peer traffic count (the kernel keeps none per forwarding entry: the
//! device's own counters are in `ip -s link show weave`), and nothing can seal datagrams:
//! the encrypted mode needs the user-space path.

use super::{Backend, DatapathView};
use crate::core::datapath::kernel::KernelPlan;
use crate::core::datapath::DropReason;
use crate::core::mesh::{KeyChange, PeerEndpoint, PeerName};
use crate::core::route::{PeerRoute, RouteTable};
use crate::io::netlink::Netlink;
use arc_swap::ArcSwap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tracing::{debug, info, warn};

/// Wait before carrying out changes that failed again.
const RETRY: Duration = Duration::from_secs(1);

pub struct KernelBackend {
    local: PeerName,
    table: ArcSwap<RouteTable>,
    wanted: watch::Sender<Arc<KernelPlan>>,
}

impl std::fmt::Debug for KernelBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KernelBackend")
            .field("local", &self.local)
            .finish()
    }
}

impl KernelBackend {
    /// Starts programming the VXLAN device with index `index` (on the caller's tokio
    /// runtime), with no routes until [`Backend::set_routes`].
    pub fn start(netlink: Arc<Netlink>, index: u32, local: PeerName) -> KernelBackend {
        let (wanted, rx) = watch::channel(Arc::new(KernelPlan::default()));
        tokio::spawn(reconcile(netlink, index, rx));
        KernelBackend {
            table: ArcSwap::from_pointee(RouteTable::empty(local.clone(), local.mac())),
            local,
            wanted,
        }
    }
}

impl Backend for KernelBackend {
    fn set_routes(&self, ranges: &[(u32, u32, PeerName)], peers: Vec<PeerEndpoint>) {
        let peers = peers
            .into_iter()
            .map(|p| PeerRoute {
                mac: p.name.mac(),
                counters: Default::default(),
                name: p.name,
                nickname: p.nickname,
                data_addr: p.data_addr,
            })
            .collect();
        let table = RouteTable::new(self.local.clone(), self.local.mac(), ranges, peers);
        let plan = KernelPlan::from_routes(&table.routes());
        self.table.store(Arc::new(table));
        self.wanted.send_replace(Arc::new(plan));
    }

    fn view(&self) -> DatapathView {
        DatapathView {
            routes: self.table.load().routes(),
            peers: Vec::new(),
            // Nothing is dropped in user space: the kernel's drops are the device's.
            drops: DropReason::ALL.iter().map(|r| (*r, 0)).collect(),
        }
    }

    fn set_data_key(&self, peer: &PeerName, _change: &KeyChange) {
        // The configuration refuses a password with the kernel path, so no key exchange
        // starts; a key that arrives anyway has nothing to seal.
        debug!("data key for {peer} ignored: the kernel path does not seal datagrams");
    }
}

async fn reconcile(
    netlink: Arc<Netlink>,
    index: u32,
    mut wanted: watch::Receiver<Arc<KernelPlan>>,
) {
    let mut installed = KernelPlan::default();
    let mut failing = false;
    loop {
        let plan = wanted.borrow_and_update().clone();
        let changes = installed.diff(&plan);
        let mut failed = 0usize;
        let mut first_error = None;
        for c in &changes {
            match netlink.apply_vxlan_change(index, c).await {
                Ok(()) => installed.apply(c),
                Err(e) => {
                    failed += 1;
                    first_error.get_or_insert_with(|| format!("{c:?}: {e}"));
                }
            }
        }
        if !changes.is_empty() {
            debug!(
                "kernel datapath: {} changes, {failed} failed; {} routes, {} peers",
                changes.len(),
                installed.routes.len(),
                installed.fdb.len()
            );
        }
        if let Some(e) = first_error {
            // Once per failing spell, not once per retry.
            if !failing {
                warn!("kernel datapath: {failed} of {} changes failed (first: {e}); retrying every {RETRY:?}", changes.len());
            }
            failing = true;
            tokio::select! {
                _ = tokio::time::sleep(RETRY) => {}
                r = wanted.changed() => if r.is_err() { return },
            }
            continue;
        }
        if failing {
            info!("kernel datapath: all changes carried out");
            failing = false;
        }
        if wanted.changed().await.is_err() {
            return;
        }
    }
}
