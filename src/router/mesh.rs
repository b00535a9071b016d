//! Control connections: accepting, dialling, one task per connection, and the tick.
//!
//! Every target (from a peer source, or discovered through gossip) has one dialer: a task
//! that keeps one outbound connection to it alive, dialling again after a failure with
//! jittered exponential backoff, in a state the report shows. Removing a target (a peer
//! source dropped it) cancels its dialer, which closes its connection.

use super::{lock, Shared};
use crate::api::assemble::{PendingState, PendingTarget};
use crate::config::PeerTarget;
use crate::core::mesh::message::Message;
use crate::core::mesh::ConnId;
use crate::io::control::{handshake, tune, HANDSHAKE_TIMEOUT};
use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr, SocketAddrV4};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch, Notify};
use tracing::{info, warn};

pub(crate) const TICK: Duration = Duration::from_secs(5);
const DIAL_TIMEOUT: Duration = Duration::from_secs(5);
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// While a target is reached through the peer's own connection to us, how often the
/// dialer checks that this is still so.
const INBOUND_RECHECK: Duration = Duration::from_secs(2);
/// Messages queued for one connection's writer. Gossip is a few messages per tick, so a
/// full queue means the peer stopped reading: it is disconnected, not buffered for.
const SEND_QUEUE: usize = 1024;
/// Connections from one address that may be in their handshake at once: one host cannot
/// take the whole `CONN_LIMIT` with connections that never finish.
const PENDING_PER_SOURCE: usize = 4;
/// A gossip-discovered target that failed this many dials in a row is forgotten (until
/// gossip names it again), so invented peers are not dialled forever.
const GOSSIP_DIAL_ATTEMPTS: u32 = 8;

pub(crate) enum ConnCmd {
    Send(Message),
    Close(String),
}

/// Where a target came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Origin {
    /// A peer source (the command line, the Kubernetes API): it may remove the target.
    Source,
    /// Named in a peer's gossip.
    Gossip,
    /// Added by an operator (`weft connect`, Weave's `POST /connect`): stays until
    /// forgotten or replaced.
    Admin,
}

/// What a dialer is doing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum DialState {
    Connecting,
    /// The last attempt failed for this reason; the next follows after a backoff.
    Retrying(String),
    /// Our own connection to it is up.
    Established(ConnId),
    /// The peer's connection to us serves; no second one is needed.
    ViaInbound,
    /// The target turned out to be this node: never dialled again.
    IsSelf,
}

struct Dialer {
    origin: Origin,
    state: DialState,
    cancel: watch::Sender<bool>,
}

pub(crate) struct ConnHandle {
    tx: mpsc::Sender<ConnCmd>,
    /// Woken when the queue overflowed: the connection task closes the connection.
    overflow: Arc<Notify>,
    /// The target an outbound connection was dialled for.
    target: Option<String>,
}

#[derive(Default)]
pub(crate) struct Mesh {
    conns: Mutex<HashMap<ConnId, ConnHandle>>,
    dialers: Mutex<BTreeMap<String, Dialer>>,
    next_conn: AtomicU64,
    /// Inbound connections still in their handshake, by source address.
    pending: Mutex<HashMap<IpAddr, usize>>,
    /// Handshakes that failed (wrong or no password, not weft, too slow, too large).
    pub(crate) handshake_failures: AtomicU64,
    /// Connections closed because their peer did not read.
    pub(crate) send_overflows: AtomicU64,
    /// Kubernetes mode without a password: inbound connections only from these addresses
    /// (the Nodes', or KUBE_PEERS); `None` accepts any source.
    allowed_sources: Mutex<Option<std::collections::HashSet<IpAddr>>>,
}

impl ConnHandle {
    fn command(&self, cmd: ConnCmd, counter: &AtomicU64) {
        match self.tx.try_send(cmd) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) => {
                counter.fetch_add(1, Ordering::Relaxed);
                self.overflow.notify_one();
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {}
        }
    }
}

impl Mesh {
    pub(crate) fn send(&self, id: ConnId, msg: Message) {
        if let Some(c) = lock(&self.conns).get(&id) {
            c.command(ConnCmd::Send(msg), &self.send_overflows);
        }
    }

    pub(crate) fn close(&self, id: ConnId, why: String) {
        if let Some(c) = lock(&self.conns).get(&id) {
            c.command(ConnCmd::Close(why), &self.send_overflows);
        }
    }

    pub(crate) fn close_all(&self, why: &str) {
        for c in lock(&self.conns).values() {
            c.command(ConnCmd::Close(why.to_string()), &self.send_overflows);
        }
    }

    /// From now on, inbound connections are accepted only from the addresses of the
    /// source targets (set by [`set_targets`], and as dialling resolves them).
    pub(crate) fn restrict_inbound_to_targets(&self) {
        lock(&self.allowed_sources).get_or_insert_with(Default::default);
    }

    fn allows(&self, ip: IpAddr) -> bool {
        lock(&self.allowed_sources)
            .as_ref()
            .is_none_or(|set| set.contains(&ip))
    }

    /// Control connections open or in their handshake, for `CONN_LIMIT`.
    fn open_count(&self) -> usize {
        lock(&self.conns).len() + lock(&self.pending).values().sum::<usize>()
    }

    /// Connection `id` leads back to this process: its target is never dialled again.
    /// Returns whether a target was marked (the node then stops counting it).
    pub(crate) fn target_is_self(&self, id: ConnId) -> bool {
        let Some(target) = lock(&self.conns).get(&id).and_then(|c| c.target.clone()) else {
            return false;
        };
        let mut dialers = lock(&self.dialers);
        match dialers.get_mut(&target) {
            Some(d) if d.state != DialState::IsSelf => {
                info!("target {target} is this node itself: not dialling it again");
                d.state = DialState::IsSelf;
                true
            }
            _ => false,
        }
    }

    fn set_state(&self, target: &str, state: DialState) {
        if let Some(d) = lock(&self.dialers).get_mut(target) {
            if d.state != DialState::IsSelf {
                d.state = state;
            }
        }
    }

    /// Removes the dialer of `target` if gossip (not a peer source) asked for it.
    fn forget_gossiped(&self, target: &str) -> bool {
        let mut dialers = lock(&self.dialers);
        if dialers
            .get(target)
            .is_some_and(|d| d.origin == Origin::Gossip)
        {
            dialers.remove(target);
            true
        } else {
            false
        }
    }

    fn state(&self, target: &str) -> Option<DialState> {
        lock(&self.dialers).get(target).map(|d| d.state.clone())
    }

    /// The targets from peer sources, for the report.
    pub(crate) fn source_targets(&self) -> Vec<String> {
        lock(&self.dialers)
            .iter()
            .filter(|(_, d)| matches!(d.origin, Origin::Source | Origin::Admin))
            .map(|(t, _)| t.clone())
            .collect()
    }

    /// Targets without an established connection of their own, for the report.
    pub(crate) fn pending_targets(&self) -> Vec<PendingTarget> {
        lock(&self.dialers)
            .iter()
            .filter_map(|(t, d)| {
                let state = match &d.state {
                    DialState::Connecting => PendingState::Connecting,
                    DialState::Retrying(why) => PendingState::Retrying(why.clone()),
                    _ => return None,
                };
                Some(PendingTarget {
                    target: t.clone(),
                    state,
                })
            })
            .collect()
    }

    #[cfg(test)]
    pub(crate) fn conns_for_test(&self) -> &Mutex<HashMap<ConnId, ConnHandle>> {
        &self.conns
    }

    /// A connection whose commands the test reads, as a connection task would.
    #[cfg(test)]
    pub(crate) fn register_for_test(&self, id: ConnId) -> mpsc::Receiver<ConnCmd> {
        let (tx, rx) = mpsc::channel(SEND_QUEUE);
        lock(&self.conns).insert(
            id,
            ConnHandle {
                tx,
                overflow: Arc::new(Notify::new()),
                target: None,
            },
        );
        rx
    }

    fn next_id(&self) -> ConnId {
        self.next_conn.fetch_add(1, Ordering::Relaxed) + 1
    }
}

/// Makes the source targets exactly `targets`: dials the new ones, cancels the dialers
/// of those no longer listed. Targets discovered through gossip are left alone.
pub(crate) fn set_targets(shared: &Arc<Shared>, targets: Vec<PeerTarget>) {
    let wanted: BTreeMap<String, PeerTarget> =
        targets.into_iter().map(|t| (t.to_string(), t)).collect();
    let mut removed = Vec::new();
    {
        let mut dialers = lock(&shared.mesh.dialers);
        dialers.retain(|key, d| {
            let keep = d.origin != Origin::Source || wanted.contains_key(key);
            if !keep {
                let _ = d.cancel.send(true);
                removed.push(key.clone());
            }
            keep
        });
        // A gossiped target that a source now names belongs to the source.
        for key in wanted.keys() {
            if let Some(d) = dialers.get_mut(key) {
                d.origin = Origin::Source;
            }
        }
    }
    if let Some(set) = lock(&shared.mesh.allowed_sources).as_mut() {
        set.clear();
        set.extend(
            wanted
                .values()
                .filter_map(|t| t.host.parse::<IpAddr>().ok()),
        );
    }
    for key in removed {
        info!("peer {key} removed: no longer dialling it");
    }
    for (_, t) in wanted {
        spawn_dialer(shared, t, Origin::Source);
    }
}

/// Weave's `connect`: dials `targets` as an operator's; with `replace`, the operator's
/// earlier targets not listed are dropped (the peer sources' stay: they own theirs).
pub(crate) fn connect_targets(shared: &Arc<Shared>, targets: Vec<PeerTarget>, replace: bool) {
    let wanted: BTreeMap<String, PeerTarget> =
        targets.into_iter().map(|t| (t.to_string(), t)).collect();
    if replace {
        lock(&shared.mesh.dialers).retain(|key, d| {
            let keep = d.origin != Origin::Admin || wanted.contains_key(key);
            if !keep {
                let _ = d.cancel.send(true);
                info!("peer {key} replaced by `connect --replace`: no longer dialling it");
            }
            keep
        });
    }
    for (key, t) in wanted {
        if let Some(d) = lock(&shared.mesh.dialers).get_mut(&key) {
            // Dialled already: a gossiped target becomes the operator's, so that it is
            // retried for good rather than given up after a few attempts.
            if d.origin == Origin::Gossip {
                d.origin = Origin::Admin;
            }
            continue;
        }
        info!("connecting to {key} (asked through the API)");
        spawn_dialer(shared, t, Origin::Admin);
    }
}

/// Weave's `forget`: stops dialling `targets`, whoever asked for them, closing the
/// connections dialled for them. Returns how many were being dialled.
pub(crate) fn forget_targets(shared: &Arc<Shared>, targets: Vec<PeerTarget>) -> usize {
    let mut n = 0;
    let mut dialers = lock(&shared.mesh.dialers);
    for t in targets {
        if let Some(d) = dialers.remove(&t.to_string()) {
            let _ = d.cancel.send(true);
            info!("peer {t} forgotten (asked through the API): no longer dialling it");
            n += 1;
        }
    }
    n
}

/// Gossip named a peer we are not connected to.
pub(crate) fn dial_discovered(shared: &Arc<Shared>, addr: SocketAddrV4) {
    let target = PeerTarget {
        host: addr.ip().to_string(),
        port: addr.port(),
    };
    if !lock(&shared.mesh.dialers).contains_key(&target.to_string()) {
        info!("discovered peer at {target}: connecting");
        spawn_dialer(shared, target, Origin::Gossip);
    }
}

fn spawn_dialer(shared: &Arc<Shared>, target: PeerTarget, origin: Origin) {
    let key = target.to_string();
    let (cancel, cancelled) = watch::channel(false);
    {
        let mut dialers = lock(&shared.mesh.dialers);
        if dialers.contains_key(&key) {
            return;
        }
        dialers.insert(
            key,
            Dialer {
                origin,
                state: DialState::Connecting,
                cancel,
            },
        );
    }
    tokio::spawn(dial_loop(shared.clone(), target, cancelled));
}

/// Counts an inbound connection as pending until dropped (handshake done or failed).
struct PendingGuard {
    shared: Arc<Shared>,
    ip: IpAddr,
}

impl Drop for PendingGuard {
    fn drop(&mut self) {
        let mut pending = lock(&self.shared.mesh.pending);
        if let Some(n) = pending.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                pending.remove(&self.ip);
            }
        }
    }
}

/// A warning at most every 10 s, with how many times it happened meanwhile: nothing a
/// stranger sends can flood the log.
struct Throttled {
    count: u64,
    next: tokio::time::Instant,
}

impl Throttled {
    fn new() -> Self {
        Throttled {
            count: 0,
            next: tokio::time::Instant::now(),
        }
    }

    fn warn(&mut self, line: impl FnOnce(u64) -> String) {
        self.count += 1;
        let now = tokio::time::Instant::now();
        if now >= self.next {
            warn!("{}", line(self.count));
            self.count = 0;
            self.next = now + Duration::from_secs(10);
        }
    }
}

static INBOUND_FAILURES: Mutex<Option<Throttled>> = Mutex::new(None);

pub(crate) async fn accept_loop(shared: Arc<Shared>, listener: TcpListener) {
    let mut refused = Throttled::new();
    loop {
        let (stream, remote) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                warn!("accepting control connection failed: {e}");
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        let limit = shared.cfg.conn_limit;
        if shared.mesh.open_count() >= limit {
            // Over CONN_LIMIT: refuse at once (a member redials with backoff).
            drop(stream);
            refused.warn(|n| {
                format!("refused {n} control connection(s), the last from {remote}: already {limit} connections (CONN_LIMIT)")
            });
            continue;
        }
        let ip = remote.ip();
        if !shared.mesh.allows(ip) {
            drop(stream);
            refused.warn(|n| {
                format!("refused {n} control connection(s), the last from {remote}: not the address of a Kubernetes Node or of KUBE_PEERS (without WEAVE_PASSWORD only they may connect)")
            });
            continue;
        }
        {
            let mut pending = lock(&shared.mesh.pending);
            let n = pending.entry(ip).or_default();
            if *n >= PENDING_PER_SOURCE {
                drop(pending);
                drop(stream);
                refused.warn(|n| {
                    format!("refused {n} control connection(s), the last from {remote}: {PENDING_PER_SOURCE} from that address are already in their handshake")
                });
                continue;
            }
            *n += 1;
        }
        let guard = PendingGuard {
            shared: shared.clone(),
            ip,
        };
        if let Err(e) = tune(&stream) {
            warn!("control connection {remote}: cannot set socket options: {e}");
        }
        tokio::spawn(run_connection(
            shared.clone(),
            stream,
            remote,
            None,
            None,
            Some(guard),
        ));
    }
}

async fn cancelled(rx: &mut watch::Receiver<bool>) {
    // An error means the sender is gone: the dialer was removed, which also cancels.
    let _ = rx.wait_for(|c| *c).await;
}

/// Like [`cancelled`]; never completes without a dialer (inbound connections).
async fn until_cancelled(cancel: &mut Option<watch::Receiver<bool>>) {
    match cancel {
        Some(rx) => cancelled(rx).await,
        None => std::future::pending().await,
    }
}

/// Keeps one outbound connection to `target` alive until cancelled: dials, and after a
/// failure or a dropped connection dials again with exponential backoff (1 s doubling to
/// 30 s, with jitter so that a whole cluster restarting does not dial in lockstep).
async fn dial_loop(shared: Arc<Shared>, target: PeerTarget, mut cancel: watch::Receiver<bool>) {
    let key = target.to_string();
    let mut backoff = Duration::from_secs(1);
    let mut failures = 0u32;
    loop {
        if *cancel.borrow()
            || shared
                .mesh
                .state(&key)
                .is_none_or(|s| s == DialState::IsSelf)
        {
            return;
        }
        let resolved = tokio::select! {
            r = tokio::net::lookup_host((target.host.as_str(), target.port)) => r.ok(),
            _ = cancelled(&mut cancel) => return,
        }
        .and_then(|mut it| it.find(|a| a.is_ipv4()));
        let Some(addr) = resolved else {
            shared.mesh.set_state(
                &key,
                DialState::Retrying(format!("cannot resolve {}", target.host)),
            );
            if !sleep_backoff(&mut backoff, &mut cancel).await {
                return;
            }
            continue;
        };
        let from_source = lock(&shared.mesh.dialers)
            .get(&key)
            .is_some_and(|d| d.origin == Origin::Source);
        if from_source {
            if let Some(set) = lock(&shared.mesh.allowed_sources).as_mut() {
                set.insert(addr.ip());
            }
        }
        if let SocketAddr::V4(v4) = addr {
            lock(&shared.node).note_target(v4);
            // The peer dialled us first (or we reached it through another target): one
            // connection per pair is enough.
            if shared.with_node(|n| n.is_connected_to_ip(*v4.ip())) {
                shared.mesh.set_state(&key, DialState::ViaInbound);
                tokio::select! {
                    _ = tokio::time::sleep(INBOUND_RECHECK) => {}
                    _ = cancelled(&mut cancel) => return,
                }
                continue;
            }
        }
        shared.mesh.set_state(&key, DialState::Connecting);
        let connect = tokio::select! {
            r = tokio::time::timeout(DIAL_TIMEOUT, TcpStream::connect(addr)) => r,
            _ = cancelled(&mut cancel) => return,
        };
        let why = match connect {
            Ok(Ok(stream)) => {
                if let Err(e) = tune(&stream) {
                    warn!("control connection {addr}: cannot set socket options: {e}");
                }
                let established = run_connection(
                    shared.clone(),
                    stream,
                    addr,
                    Some(key.clone()),
                    Some(cancel.clone()),
                    None,
                )
                .await;
                if *cancel.borrow() {
                    return;
                }
                if established {
                    backoff = Duration::from_secs(1);
                    failures = 0;
                }
                if let SocketAddr::V4(v4) = addr {
                    // Closed as the duplicate of the peer's own connection to us: not a
                    // failure, nothing to retry.
                    if shared.with_node(|n| n.is_connected_to_ip(*v4.ip())) {
                        continue;
                    }
                }
                match shared.mesh.state(&key) {
                    // The handshake's own reason (say, a wrong password) says more.
                    Some(DialState::Retrying(r)) if !established => r,
                    _ => "connection closed".to_string(),
                }
            }
            Ok(Err(e)) => e.to_string(),
            Err(_) => format!("no answer within {DIAL_TIMEOUT:?}"),
        };
        shared
            .mesh
            .set_state(&key, DialState::Retrying(why.clone()));
        failures += 1;
        if failures >= GOSSIP_DIAL_ATTEMPTS && shared.mesh.forget_gossiped(&key) {
            info!("forgetting peer {key} learnt from gossip: {failures} dials failed, the last: {why}");
            if let SocketAddr::V4(v4) = addr {
                lock(&shared.node).forget_target(v4);
            }
            return;
        }
        if !sleep_backoff(&mut backoff, &mut cancel).await {
            return;
        }
    }
}

/// Sleeps for the backoff (plus jitter) and doubles it; false if cancelled meanwhile.
async fn sleep_backoff(backoff: &mut Duration, cancel: &mut watch::Receiver<bool>) -> bool {
    let jitter = Duration::from_millis(rand::random::<u64>() % 500);
    let wait = *backoff + jitter;
    *backoff = (*backoff * 2).min(MAX_BACKOFF);
    tokio::select! {
        _ = tokio::time::sleep(wait) => true,
        _ = cancelled(cancel) => false,
    }
}

/// Drives one control connection until it closes (or its dialer is cancelled). Returns
/// whether it got past the Hello. The peer first has [`HANDSHAKE_TIMEOUT`] for the secure
/// handshake and its Hello; until the handshake authenticated it, nothing it sends reaches
/// the node. Generic over the byte stream (tests use in-memory pipes).
async fn run_connection<S>(
    shared: Arc<Shared>,
    stream: S,
    remote: SocketAddr,
    target: Option<String>,
    cancel: Option<watch::Receiver<bool>>,
    pending: Option<PendingGuard>,
) -> bool
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let outbound = target.is_some();
    let deadline = tokio::time::Instant::now() + HANDSHAKE_TIMEOUT;
    let mut cancel = cancel;
    let secured = tokio::select! {
        r = tokio::time::timeout_at(
            deadline,
            handshake(stream, &shared.identity, &shared.cfg.secure, outbound),
        ) => r,
        _ = until_cancelled(&mut cancel) => return false,
    };
    let (mut reader, mut writer, key) = match secured {
        Ok(Ok(x)) => x,
        failed => {
            shared
                .mesh
                .handshake_failures
                .fetch_add(1, Ordering::Relaxed);
            let why = match failed {
                Ok(Err(e)) => e.to_string(),
                _ => format!("no handshake within {HANDSHAKE_TIMEOUT:?}"),
            };
            match &target {
                Some(t) => {
                    warn!("control connection to {t} ({remote}): {why}");
                    shared.mesh.set_state(t, DialState::Retrying(why));
                }
                None => {
                    let mut log = lock(&INBOUND_FAILURES);
                    log.get_or_insert_with(Throttled::new).warn(|n| {
                        format!("refused {n} control connection(s) in their handshake, the last from {remote}: {why}")
                    });
                }
            }
            return false;
        }
    };
    drop(pending);
    let id = shared.mesh.next_id();
    let (tx, mut rx) = mpsc::channel(SEND_QUEUE);
    let overflow = Arc::new(Notify::new());
    lock(&shared.mesh.conns).insert(
        id,
        ConnHandle {
            tx,
            overflow: overflow.clone(),
            target: target.clone(),
        },
    );
    // The probe in flight and when it was written: the round trip is timed from the write,
    // not from the tick, so that queueing behind a large ring is not counted as latency.
    let probe_sent: Arc<Mutex<Option<(u64, std::time::Instant)>>> = Arc::default();
    let probe_slot = probe_sent.clone();
    let mut writer_task = tokio::spawn(async move {
        while let Some(cmd) = rx.recv().await {
            match cmd {
                ConnCmd::Send(m) => {
                    if let Err(e) = writer.send(&m).await {
                        return format!("write failed: {e}");
                    }
                    if let Message::Heartbeat { probe: Some(n), .. } = m {
                        *lock(&probe_slot) = Some((n, std::time::Instant::now()));
                    }
                }
                ConnCmd::Close(why) => {
                    writer.shutdown().await;
                    return why;
                }
            }
        }
        "closed".to_string()
    });
    shared.event(|n| n.on_connected(id, remote, outbound, key));

    let mut established = false;
    let mut rtt_peer: Option<(String, String)> = None;
    let reason = loop {
        tokio::select! {
            _ = shared.room_for_effects() => {}
            _ = until_cancelled(&mut cancel) => break "peer removed".to_string(),
        }
        tokio::select! {
            msg = reader.next() => match msg {
                Ok(m) => {
                    if let Message::Heartbeat { echo: Some(n), .. } = m {
                        observe_rtt(&shared, id, n, &probe_sent, &mut rtt_peer);
                    }
                    shared.event(|n| n.on_message(id, m));
                    if !established && shared.with_node(|n| n.is_established(id)) {
                        established = true;
                        reader.accept_large_frames();
                        if let Some(t) = &target {
                            shared.mesh.set_state(t, DialState::Established(id));
                        }
                    }
                }
                Err(e) if !established && shared.cfg.secure.is_password() => {
                    // With XXpsk3 the responder is the first to find a wrong password, and
                    // it can only hang up.
                    break format!("{e} before its Hello: does it have the same WEAVE_PASSWORD?");
                }
                Err(e) => break e.to_string(),
            },
            why = &mut writer_task => {
                break why.unwrap_or_else(|e| format!("writer failed: {e}"));
            }
            _ = overflow.notified() => {
                break format!("the peer does not read: {SEND_QUEUE} messages queued");
            }
            _ = tokio::time::sleep_until(deadline), if !established => {
                break format!("no Hello within {HANDSHAKE_TIMEOUT:?}");
            }
            _ = until_cancelled(&mut cancel) => break "peer removed".to_string(),
        }
    };
    writer_task.abort();
    if !established {
        if let Some(t) = &target {
            info!("control connection to {t} ({remote}) ended before the Hello: {reason}");
            shared
                .mesh
                .set_state(t, DialState::Retrying(reason.clone()));
        }
    }
    lock(&shared.mesh.conns).remove(&id);
    if let Some((name, nick)) = &rtt_peer {
        shared.telemetry.forget_peer(name, nick);
    }
    shared.event(|n| n.on_closed(id, &reason));
    established
}

/// An echo of probe `n` arrived on connection `id`: the round trip since that probe was
/// written goes into the peer's histogram. An echo of an older probe (one overtaken by a
/// newer write) is not timed.
fn observe_rtt(
    shared: &Shared,
    id: ConnId,
    n: u64,
    probe_sent: &Mutex<Option<(u64, std::time::Instant)>>,
    peer: &mut Option<(String, String)>,
) {
    let Some((_, at)) = lock(probe_sent).take_if(|(sent, _)| *sent == n) else {
        return;
    };
    if peer.is_none() {
        *peer = shared.with_node(|node| node.peer_of_conn(id));
    }
    if let Some((name, nick)) = peer {
        shared
            .telemetry
            .observe_rtt(name, nick, at.elapsed().as_secs_f64());
    }
}

pub(crate) async fn tick_loop(shared: Arc<Shared>) {
    let mut interval = tokio::time::interval(TICK);
    loop {
        interval.tick().await;
        shared.event(|n| n.on_tick());
    }
}
