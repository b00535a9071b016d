//! The daemon: wires the pure core to its adapters.
//!
//! - `startup`: loads the state, chooses the name, brings up the data path, binds the
//!   ports and starts the tasks below.
//! - `effects`: the one place where the node's [`Effects`] are carried out, in order:
//!   the save (off the async workers, without the node lock), then what does not depend
//!   on it, then what does.
//! - `mesh`: control connections: the accept loop, dialers per target (an enum state,
//!   cancellable), one task per connection, the tick.
//! - `peers`: where dial targets come from ([`PeerSource`]): the command line today, the
//!   Kubernetes API next.
//! - `control`: the HTTP API's view of the router (allocations, rmpeer, the report).
//!
//! Control-plane state lives in one `Node` behind a mutex held only while the node
//! computes; the data path never touches it and reads routes the backend publishes.

mod control;
mod effects;
mod kube;
mod mesh;
mod peers;
mod startup;
#[cfg(test)]
mod tests;

pub use effects::{SaveFailed, StateStore};
pub use peers::{PeerSource, StaticPeers};
pub use startup::{run, RouterError};

use crate::config::RouterConfig;
use crate::core::mesh::{Effects, Node, PeerName};
use crate::datapath::Backend;
use ipnet::Ipv4Net;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use tokio::sync::{mpsc, oneshot, watch, Notify};

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding one of these locks is a bug already reported by the panic
    // itself; the data stays usable, so keep serving rather than cascade.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Effect jobs queued beyond which connection readers stop reading.
const MAX_QUEUED_JOBS: usize = 256;

/// What every task of the router shares.
pub(crate) struct Shared {
    cfg: RouterConfig,
    name: PeerName,
    mtu: u32,
    node: Mutex<Node>,
    /// The effect interpreter's queue: effects are queued under the node lock, so they
    /// are carried out in the order the node produced them.
    jobs: mpsc::UnboundedSender<effects::Job>,
    /// Jobs queued and not yet carried out; connection readers wait while it is over
    /// [`MAX_QUEUED_JOBS`], so a peer sending faster than its effects are carried out is
    /// slowed by TCP instead of growing the queue.
    queued_jobs: std::sync::atomic::AtomicUsize,
    jobs_drained: Notify,
    backend: Arc<dyn Backend>,
    mesh: mesh::Mesh,
    ready: watch::Sender<bool>,
    overlay: Mutex<Option<Ipv4Net>>,
    overlay_wanted: Notify,
    /// Container ids of allocations waiting for IPAM (the report's `PendingAllocates`).
    pending_allocates: Mutex<Vec<String>>,
    /// Event metrics: heartbeat RTTs, CNI durations, IPAM operations.
    pub(crate) telemetry: crate::api::telemetry::Telemetry,
    bad_requests: AtomicU64,
    /// The node's static key (its identity in every control handshake).
    identity: crate::core::mesh::secure::StaticKey,
    /// NetworkPolicy enforcement, when on.
    policy: Option<Arc<crate::policy::PolicyEngine>>,
}

/// Resolves when the save of one event's effects is durable, or failed (then nothing that
/// depended on it was carried out).
pub(crate) struct Saved(oneshot::Receiver<Result<(), SaveFailed>>);

impl Saved {
    pub(crate) async fn wait(self) -> Result<(), SaveFailed> {
        self.0
            .await
            .unwrap_or_else(|_| Err(SaveFailed("the router is shutting down".into())))
    }
}

impl Shared {
    /// Runs one event on the node and queues its effects.
    fn event(&self, f: impl FnOnce(&mut Node) -> Effects) {
        let mut node = lock(&self.node);
        let fx = f(&mut node);
        self.queue(fx, None);
    }

    /// Runs a request on the node and queues its effects; the caller may answer only once
    /// [`Saved::wait`] says they are durable.
    fn request<R>(&self, f: impl FnOnce(&mut Node) -> (R, Effects)) -> (R, Saved) {
        let (tx, rx) = oneshot::channel();
        let mut node = lock(&self.node);
        let (r, fx) = f(&mut node);
        self.queue(fx, Some(tx));
        (r, Saved(rx))
    }

    /// Reads the node.
    fn with_node<R>(&self, f: impl FnOnce(&Node) -> R) -> R {
        f(&lock(&self.node))
    }

    fn queue(&self, fx: Effects, done: Option<oneshot::Sender<Result<(), SaveFailed>>>) {
        let empty = fx.save.is_none() && fx.now.is_empty() && fx.after_save.is_empty();
        if empty {
            if let Some(d) = done {
                let _ = d.send(Ok(()));
            }
            return;
        }
        // Fails only when the interpreter is gone, i.e. the router is shutting down.
        self.queued_jobs.fetch_add(1, Ordering::Relaxed);
        if self.jobs.send(effects::Job { fx, done }).is_err() {
            self.queued_jobs.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// Waits until the effect queue has room for what one more message may cause.
    async fn room_for_effects(&self) {
        loop {
            let drained = self.jobs_drained.notified();
            if self.queued_jobs.load(Ordering::Relaxed) < MAX_QUEUED_JOBS {
                return;
            }
            drained.await;
        }
    }

    /// The interpreter finished a job.
    fn job_done(&self) {
        self.queued_jobs.fetch_sub(1, Ordering::Relaxed);
        self.jobs_drained.notify_waiters();
    }
}
