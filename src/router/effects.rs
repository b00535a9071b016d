//! The effect interpreter: the one place where the node's effects are carried out.
//!
//! Jobs arrive in the order the node produced them and are handled one at a time:
//! 1. the save, if any, on the blocking pool (never on an async worker, never under the
//!    node lock); a generation already durable is not written again;
//! 2. the actions that do not depend on it (heartbeats, closes, logs, route updates);
//! 3. only if the save succeeded, the actions that depend on it (Paxos answers, rings,
//!    space requests); otherwise they are dropped, counted in one rate-limited log line,
//!    and the caller waiting for the save gets the error.
//!
//! A failed save leaves the node's state unacknowledged, so every later event carries the
//! save again and nothing that depends on the state leaves until a save succeeds.

use super::{lock, Shared};
use crate::core::mesh::{Action, Effects, Level};
use crate::core::persist::PersistedState;
use crate::io::store::{Store, StoreError};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};
use tracing::{error, info, warn};

/// Where the node's state is saved. The daemon's is [`Store`] (an atomic file write);
/// tests use stores that fail on demand.
pub trait StateStore: Send + Sync + 'static {
    fn save(&self, state: &PersistedState) -> Result<(), StoreError>;
}

impl StateStore for Store {
    fn save(&self, state: &PersistedState) -> Result<(), StoreError> {
        Store::save(self, state)
    }
}

/// The node's state could not be saved: nothing that depends on it was done.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("state not saved: {0}")]
pub struct SaveFailed(pub String);

pub(crate) struct Job {
    pub(crate) fx: Effects,
    pub(crate) done: Option<oneshot::Sender<Result<(), SaveFailed>>>,
}

/// Spacing of the log line about held-back messages while saves keep failing.
const FAILURE_LOG_INTERVAL: Duration = Duration::from_secs(10);

pub(crate) async fn interpret(
    shared: Arc<Shared>,
    store: Arc<dyn StateStore>,
    mut jobs: mpsc::UnboundedReceiver<Job>,
) {
    let mut durable = 0u64;
    let mut held_back = 0u64;
    let mut next_log: Option<Instant> = None;
    while let Some(Job { fx, done }) = jobs.recv().await {
        let saved = match fx.save {
            Some(save) if save.generation > durable => {
                let store = store.clone();
                let state = save.state;
                let r = tokio::task::spawn_blocking(move || store.save(&state))
                    .await
                    .map_err(|e| SaveFailed(format!("save task failed: {e}")))
                    .and_then(|r| r.map_err(|e| SaveFailed(e.to_string())));
                if r.is_ok() {
                    durable = save.generation;
                    lock(&shared.node).saved(save.generation);
                }
                r
            }
            _ => Ok(()),
        };
        for a in fx.now {
            carry_out(&shared, a);
        }
        match &saved {
            Ok(()) => {
                for a in fx.after_save {
                    carry_out(&shared, a);
                }
            }
            Err(e) => {
                held_back += fx.after_save.len() as u64;
                let now = Instant::now();
                if next_log.is_none_or(|t| now >= t) {
                    error!(
                        "cannot save the IPAM state: {e}; {held_back} messages that depend on it held back, allocations refused until a save succeeds"
                    );
                    held_back = 0;
                    next_log = Some(now + FAILURE_LOG_INTERVAL);
                }
            }
        }
        if let Some(d) = done {
            let _ = d.send(saved);
        }
        shared.job_done();
    }
}

fn carry_out(shared: &Arc<Shared>, action: Action) {
    match action {
        Action::Send(id, msg) => shared.mesh.send(id, msg),
        Action::Close(id, why) => shared.mesh.close(id, why),
        Action::Dial(target) => super::mesh::dial_discovered(shared, target),
        Action::TargetIsSelf(id) => {
            if shared.mesh.target_is_self(id) {
                shared.event(|n| n.target_is_self());
            }
        }
        Action::RoutesChanged => {
            let (ranges, peers) = shared.with_node(|n| n.route_inputs());
            shared.backend.set_routes(&ranges, peers);
        }
        Action::Ready => {
            // send_replace: the value must stick even while nobody is subscribed.
            shared.ready.send_replace(true);
            shared.overlay_wanted.notify_one();
        }
        Action::DataKey(peer, change) => shared.backend.set_data_key(&peer, &change),
        Action::Log(Level::Info, msg) => info!("{msg}"),
        Action::Log(Level::Warn, msg) => warn!("{msg}"),
    }
}
