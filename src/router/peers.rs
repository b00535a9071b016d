//! Where the router learns whom to dial. A source yields the whole set of its targets
//! each time it changes; the router dials the new ones and cancels the dialers of those
//! dropped (closing their connections). Targets named in gossip are dialled besides, and
//! stay until the peer is removed.

use super::Shared;
use crate::config::PeerTarget;
use std::future::Future;
use std::sync::Arc;

pub trait PeerSource: Send + 'static {
    /// The next set of targets; `None` when the source will never change again.
    fn next(&mut self) -> impl Future<Output = Option<Vec<PeerTarget>>> + Send;
}

/// The PEER arguments (and `KUBE_PEERS`): one set, never changing.
#[derive(Debug, Clone)]
pub struct StaticPeers(Option<Vec<PeerTarget>>);

impl StaticPeers {
    pub fn new(targets: Vec<PeerTarget>) -> StaticPeers {
        StaticPeers(Some(targets))
    }
}

impl PeerSource for StaticPeers {
    async fn next(&mut self) -> Option<Vec<PeerTarget>> {
        self.0.take()
    }
}

/// Applies every change of `source` until it ends.
pub(crate) async fn follow(shared: Arc<Shared>, mut source: impl PeerSource) {
    while let Some(targets) = source.next().await {
        super::mesh::set_targets(&shared, targets);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn static_peers_give_their_set_once() {
        let t = PeerTarget {
            host: "10.0.0.2".into(),
            port: 6783,
        };
        let mut s = StaticPeers::new(vec![t.clone()]);
        assert_eq!(s.next().await, Some(vec![t]));
        assert_eq!(s.next().await, None);
    }
}
