//! The router's effect interpreter with a store that fails: nothing that depends on a
//! failed save leaves the node (no Promise, no Accepted, no donated ring), and no
//! allocation is answered as granted; once saves succeed again, all of it flows.

use super::control::RouterControl;
use super::effects::{interpret, StateStore};
use super::mesh::Mesh;
use super::*;
use crate::api::report::{Control, IpApiError};
use crate::config::RouterArgs;
use crate::core::datapath::DropReason;
use crate::core::ipam::paxos::Ballot;
use crate::core::ipam::{IpallocInit, Ipam};
use crate::core::mesh::message::Message;
use crate::core::mesh::{Action, Level, NodeConfig, PeerEndpoint};
use crate::core::persist::PersistedState;
use crate::datapath::DatapathView;
use crate::io::store::StoreError;
use clap::Parser;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use weft_contract::ContainerId;

/// A store that fails while `failing` is set, like a full or broken disk.
#[derive(Default)]
struct FlakyStore {
    failing: AtomicBool,
    saved: Mutex<Vec<PersistedState>>,
}

impl StateStore for FlakyStore {
    fn save(&self, state: &PersistedState) -> Result<(), StoreError> {
        if self.failing.load(Ordering::SeqCst) {
            return Err(StoreError::Io {
                op: "writing",
                path: "/var/lib/weft/weft.json".into(),
                source: std::io::Error::from_raw_os_error(libc::ENOSPC),
            });
        }
        lock(&self.saved).push(state.clone());
        Ok(())
    }
}

/// Records the routes it is given.
#[derive(Default)]
struct NullBackend;

impl Backend for NullBackend {
    fn set_routes(&self, _ranges: &[(u32, u32, PeerName)], _peers: Vec<PeerEndpoint>) {}
    fn set_data_key(&self, _peer: &PeerName, _change: &crate::core::mesh::KeyChange) {}
    fn view(&self) -> DatapathView {
        DatapathView {
            drops: DropReason::ALL.iter().map(|r| (*r, 0)).collect(),
            ..DatapathView::default()
        }
    }
}

fn name(i: u8) -> PeerName {
    PeerName::from_bytes([2, 0x77, 0x66, 0, 0, i])
}

fn key(i: u8) -> crate::core::mesh::secure::PublicKey {
    crate::core::mesh::secure::PublicKey([i; 32])
}

fn node_cfg(i: u8, init: IpallocInit) -> NodeConfig {
    NodeConfig {
        name: name(i),
        nickname: format!("n{i}"),
        uid: u64::from(i),
        control_port: 6783,
        data_port: 6784,
        range: "192.168.0.0/16".parse().unwrap(),
        init,
        tentative_ticks: crate::core::mesh::TENTATIVE_TICKS,
        data_key_seed: None,
        signer: crate::core::ipam::Signer::from_seed(&[i; 32]),
    }
}

struct Harness {
    shared: Arc<Shared>,
    store: Arc<FlakyStore>,
    /// What node 1 sends on connection 1 (to node 2).
    wire: mpsc::Receiver<mesh::ConnCmd>,
}

/// Node 1 (`init`) with its interpreter running and node 2 (`peer_init`) connected on
/// connection 1; everything saved.
async fn harness(init: IpallocInit, peer_init: IpallocInit) -> Harness {
    harness_with(init, peer_init, &[]).await
}

async fn harness_with(init: IpallocInit, peer_init: IpallocInit, args: &[&str]) -> Harness {
    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        r: RouterArgs,
    }
    let mut argv = vec!["weft", "--nickname", "n1"];
    argv.extend_from_slice(args);
    let cfg = Cli::parse_from(argv).r.validate("n1").unwrap();
    let node = Node::new(
        node_cfg(1, init),
        Ipam::new(name(1), cfg.range),
        Default::default(),
    );
    let (jobs, queue) = mpsc::unbounded_channel();
    let (ready, _) = watch::channel(false);
    let shared = Arc::new(Shared {
        cfg,
        name: name(1),
        mtu: 1450,
        node: Mutex::new(node),
        jobs,
        queued_jobs: std::sync::atomic::AtomicUsize::new(0),
        jobs_drained: tokio::sync::Notify::new(),
        backend: Arc::new(NullBackend),
        mesh: Mesh::default(),
        ready,
        overlay: Mutex::new(None),
        overlay_wanted: Notify::new(),
        pending_allocates: Mutex::new(Vec::new()),
        telemetry: Default::default(),
        bad_requests: AtomicU64::new(0),
        identity: crate::core::mesh::secure::StaticKey::from_private(&[1; 32]).unwrap(),
        policy: None,
    });
    let store = Arc::new(FlakyStore::default());
    tokio::spawn(interpret(shared.clone(), store.clone(), queue));
    shared.event(|n| n.start());
    let wire = shared.mesh.register_for_test(1);
    shared.event(|n| n.on_connected(1, "10.0.0.2:6783".parse().unwrap(), true, key(2)));
    let mut peer = Node::new(
        node_cfg(2, peer_init),
        Ipam::new(name(2), "192.168.0.0/16".parse().unwrap()),
        Default::default(),
    );
    let fx = peer.on_connected(1, "10.0.0.1:40000".parse().unwrap(), false, key(1));
    let hello = fx
        .sends()
        .find(|(_, m)| matches!(m, Message::Hello(_)))
        .map(|(_, m)| m.clone())
        .unwrap();
    shared.event(|n| n.on_message(1, hello));
    let mut h = Harness {
        shared,
        store,
        wire,
    };
    h.settle().await;
    assert!(h.shared.with_node(|n| n.is_established(1)));
    assert!(!h.shared.with_node(|n| n.has_unsaved_state()));
    h.sent();
    h
}

impl Harness {
    /// Waits until every queued effect has been carried out.
    async fn settle(&mut self) {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let barrier = Effects {
            now: vec![Action::Log(Level::Info, "test barrier".into())],
            ..Effects::default()
        };
        self.shared.queue(barrier, Some(tx));
        rx.await.unwrap().unwrap();
    }

    /// The messages sent to node 2 since the last call.
    fn sent(&mut self) -> Vec<Message> {
        let mut v = Vec::new();
        while let Ok(cmd) = self.wire.try_recv() {
            if let mesh::ConnCmd::Send(m) = cmd {
                v.push(m);
            }
        }
        v
    }

    fn fail_saves(&self, failing: bool) {
        self.store.failing.store(failing, Ordering::SeqCst);
    }

    async fn peer_says(&mut self, msg: Message) -> Vec<Message> {
        self.shared.event(|n| n.on_message(1, msg));
        self.settle().await;
        self.sent()
    }
}

fn ballot(round: u64) -> Ballot {
    Ballot {
        round,
        proposer: name(2),
    }
}

fn is_commitment(m: &Message) -> bool {
    matches!(
        m,
        Message::Promise { .. }
            | Message::Accepted { .. }
            | Message::Nack { .. }
            | Message::Gossip { ring: Some(_), .. }
    )
}

#[tokio::test]
async fn no_promise_or_acceptance_leaves_after_a_failed_save() {
    let mut h = harness(IpallocInit::Consensus(3), IpallocInit::Consensus(3)).await;
    h.fail_saves(true);
    let out = h.peer_says(Message::Prepare { ballot: ballot(5) }).await;
    assert!(!out.iter().any(is_commitment), "{out:?}");
    let out = h
        .peer_says(Message::Accept {
            ballot: ballot(5),
            value: vec![name(1), name(2)],
        })
        .await;
    assert!(!out.iter().any(is_commitment), "{out:?}");
    // A repeat changes nothing in the acceptor, yet it still waits for the save.
    let out = h.peer_says(Message::Prepare { ballot: ballot(5) }).await;
    assert!(!out.iter().any(is_commitment), "{out:?}");
    assert!(h.shared.with_node(|n| n.has_unsaved_state()));
    assert!(lock(&h.store.saved)
        .iter()
        .all(|s| s.acceptor().max_round() < 5));

    // The disk recovers: the next event saves the state first, then answers.
    h.fail_saves(false);
    let out = h.peer_says(Message::Prepare { ballot: ballot(6) }).await;
    assert!(
        out.iter()
            .any(|m| matches!(m, Message::Promise { ballot, .. } if ballot.round == 6)),
        "{out:?}"
    );
    let last = lock(&h.store.saved).last().cloned().unwrap();
    assert_eq!(
        last.acceptor().max_round(),
        6,
        "saved before it was promised"
    );
    assert!(!h.shared.with_node(|n| n.has_unsaved_state()));
}

#[tokio::test]
async fn no_donation_and_no_granted_allocation_after_a_failed_save() {
    let mut h = harness(IpallocInit::Seed(vec![name(1)]), IpallocInit::Observer).await;
    assert!(h.shared.with_node(|n| n.can_allocate()));
    let control = RouterControl(h.shared.clone());
    let id = ContainerId::parse("pod-a").unwrap();
    let wait = Duration::from_millis(200);

    h.fail_saves(true);
    let out = h
        .peer_says(Message::SpaceRequest {
            subnet: None,
            incarnation: 0,
            signed: None,
        })
        .await;
    assert!(
        !out.iter().any(is_commitment),
        "the donated ring left: {out:?}"
    );
    match control.allocate(id.clone(), wait).await {
        Err(IpApiError::Internal(msg)) => assert!(msg.contains("not saved"), "{msg}"),
        other => panic!("an allocation that was not saved was answered: {other:?}"),
    }
    assert_eq!(
        control.lookup(&id).unwrap(),
        None,
        "the address was given back"
    );
    assert!(matches!(
        control.free(&id).await,
        Err(IpApiError::Internal(_))
    ));
    assert!(lock(&h.store.saved)
        .iter()
        .all(|s| !s.ipam.allocations.contains_key("pod-a")));

    h.fail_saves(false);
    let net = control.allocate(id.clone(), wait).await.unwrap();
    assert_eq!(control.lookup(&id).unwrap(), Some(net));
    let last = lock(&h.store.saved).last().cloned().unwrap();
    assert!(
        last.ipam.allocations.contains_key("pod-a"),
        "saved before it was granted"
    );
    let out = h
        .peer_says(Message::SpaceRequest {
            subnet: None,
            incarnation: 0,
            signed: None,
        })
        .await;
    assert!(
        out.iter()
            .any(|m| matches!(m, Message::Gossip { ring: Some(_), .. })),
        "{out:?}"
    );
}

#[tokio::test]
async fn peer_sources_add_and_remove_targets_at_run_time() {
    use tokio::io::AsyncReadExt;
    let h = harness(IpallocInit::Consensus(3), IpallocInit::Consensus(3)).await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let target = crate::config::PeerTarget {
        host: "127.0.0.1".into(),
        port,
    };
    mesh::set_targets(&h.shared, vec![target.clone()]);
    let (mut conn, _) = tokio::time::timeout(Duration::from_secs(5), listener.accept())
        .await
        .expect("the new target is dialled")
        .unwrap();
    assert_eq!(h.shared.mesh.source_targets(), vec![target.to_string()]);
    // The router opens with its secure channel's preamble.
    let mut preamble = [0u8; 8];
    conn.read_exact(&mut preamble).await.unwrap();
    assert_eq!(&preamble[..4], b"weft");

    // The source drops it: the dialer is cancelled and its connection closed.
    mesh::set_targets(&h.shared, Vec::new());
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(5), conn.read_to_end(&mut rest)).await;
    assert!(
        closed.is_ok(),
        "the connection of a removed target is closed"
    );
    assert!(h.shared.mesh.source_targets().is_empty());
    assert!(h.shared.mesh.pending_targets().is_empty());
    // Nothing dials it again.
    let again = tokio::time::timeout(Duration::from_secs(3), listener.accept()).await;
    assert!(again.is_err(), "a removed target was dialled again");
}

#[tokio::test]
async fn connections_beyond_conn_limit_are_refused() {
    use tokio::io::AsyncReadExt;
    // Node 2 is connected (connection 1): with CONN_LIMIT 1 there is no room for another.
    let h = harness_with(
        IpallocInit::Consensus(3),
        IpallocInit::Consensus(3),
        &["--conn-limit", "1"],
    )
    .await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(mesh::accept_loop(h.shared.clone(), listener));
    let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut buf = Vec::new();
    let n = tokio::time::timeout(Duration::from_secs(5), c.read_to_end(&mut buf))
        .await
        .expect("refused at once")
        .unwrap_or(0);
    assert_eq!(n, 0, "no Hello for a connection over the limit");
    assert_eq!(lock(h.shared.mesh.conns_for_test()).len(), 1);
}

#[tokio::test]
async fn a_peer_that_does_not_read_is_dropped_not_buffered_for() {
    // Connection 1's commands are never taken (its writer is stuck on a peer that does
    // not read): past the queue's bound, the connection is marked to be closed and
    // nothing more is queued.
    let h = harness(IpallocInit::Consensus(3), IpallocInit::Consensus(3)).await;
    let before = h.shared.mesh.send_overflows.load(Ordering::Relaxed);
    for _ in 0..5_000 {
        h.shared.mesh.send(1, Message::Digest { ring: Some(1) });
    }
    let overflows = h.shared.mesh.send_overflows.load(Ordering::Relaxed) - before;
    assert!(overflows > 0, "the bound was never reached");
    assert!(
        h.wire.len() <= 1024 + 16,
        "{} messages queued for one connection",
        h.wire.len()
    );
}
