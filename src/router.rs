//! The daemon: wires the pure core (IPAM, mesh, routes) to its adapters (TUN, UDP, TCP,
//! netlink, store, HTTP). Control-plane state lives in one `Node` behind a mutex; the data
//! plane never touches it and reads an immutable route table published with `ArcSwap`.

use crate::api::report::{
    Control, DataplaneReport, IpApiError, PeerTrafficReport, Report, RouterReport,
};
use crate::config::{PeerTarget, RouterConfig, TUN_NAME};
use crate::core::ipam::{Ipam, IpamError};
use crate::core::mesh::message::{Message, PROTOCOL, PROTOCOL_VERSION};
use crate::core::mesh::state::{ConnId, Node, NodeConfig, Output};
use crate::core::mesh::PeerName;
use crate::core::route::{PeerCounters, PeerRoute, RouteTable};
use crate::core::wire::ENCAP_OVERHEAD_IPV4;
use crate::dataplane::{Dataplane, DataplaneCounters};
use crate::io::control::{tune, FrameReader, FrameWriter};
use crate::io::netlink::Netlink;
use crate::io::store::{PersistedState, Store, StoreError};
use arc_swap::ArcSwap;
use ipnet::Ipv4Net;
use std::collections::{BTreeMap, HashMap};
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tracing::{error, info, warn};
use weft_contract::ContainerId;

pub use weft_contract::EXPOSE_ID;
const TICK: Duration = Duration::from_secs(5);
const DIAL_TIMEOUT: Duration = Duration::from_secs(5);
const MAX_BACKOFF: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum RouterError {
    #[error("state store: {0}")]
    Store(#[from] StoreError),
    #[error("{0}")]
    Identity(String),
    #[error("IPAM state: {0}")]
    Ipam(#[from] IpamError),
    #[error("cannot create TUN device {TUN_NAME}: {0}")]
    Tun(String),
    #[error("netlink: {0}")]
    Netlink(#[from] crate::io::netlink::NetlinkError),
    #[error("{0}")]
    Sysctl(#[from] crate::io::sysctl::SysctlError),
    #[error("cannot bind {what} on {addr}: {source}")]
    Bind {
        what: &'static str,
        addr: String,
        source: std::io::Error,
    },
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

enum ConnCmd {
    Send(Message),
    Close(String),
}

#[derive(Clone, Debug)]
struct DialState {
    state: &'static str,
    info: String,
}

struct Shared {
    cfg: RouterConfig,
    name: PeerName,
    mtu: u32,
    node: Mutex<Node>,
    store: Store,
    routes: Arc<ArcSwap<RouteTable>>,
    peer_counters: Mutex<HashMap<PeerName, Arc<PeerCounters>>>,
    dp_counters: Arc<DataplaneCounters>,
    conns: Mutex<HashMap<ConnId, mpsc::UnboundedSender<ConnCmd>>>,
    /// Outbound connection id -> the target it dialled, to stop dialling a target that is
    /// this node itself.
    conn_targets: Mutex<HashMap<ConnId, String>>,
    dialers: Mutex<BTreeMap<String, DialState>>,
    self_targets: Mutex<Vec<String>>,
    next_conn: AtomicU64,
    ready: watch::Sender<bool>,
    overlay: Mutex<Option<Ipv4Net>>,
    overlay_wanted: tokio::sync::Notify,
    pending_allocates: AtomicU64,
    bad_requests: AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding one of these locks is a bug already reported by the panic
    // itself; the data stays usable, so keep serving rather than cascade.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Runs the router until SIGTERM or SIGINT.
pub fn run(cfg: RouterConfig) -> Result<(), RouterError> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .thread_name("weft-control")
        .build()?;
    rt.block_on(run_async(cfg))
}

fn choose_name(
    cfg: &RouterConfig,
    persisted: Option<&PersistedState>,
) -> Result<PeerName, RouterError> {
    let stored = persisted.and_then(|p| p.peer_name.clone());
    let holds_state = persisted
        .map(|p| p.ipam.ring.is_some() || !p.ipam.allocations.is_empty())
        .unwrap_or(false);
    if let Some(given) = &cfg.name {
        let name = PeerName::parse(given).map_err(|e| RouterError::Identity(e.to_string()))?;
        if let (Some(old), true) = (&stored, holds_state) {
            if old != &name {
                return Err(RouterError::Identity(format!(
                    "the state in {} belongs to peer {old}, but --name is {name}: addresses recorded there would be lost; start with --name {old}, or move the state away if this is a new node",
                    cfg.db_dir.display()
                )));
            }
        }
        return Ok(name);
    }
    if let Some(old) = stored {
        return Ok(old);
    }
    if let Ok(id) = std::fs::read_to_string("/etc/machine-id") {
        if !id.trim().is_empty() {
            return Ok(PeerName::from_machine_id(&id));
        }
    }
    Ok(PeerName::from_bytes(rand::random()))
}

async fn run_async(cfg: RouterConfig) -> Result<(), RouterError> {
    let store = Store::open(&cfg.db_dir)?;
    let persisted = store.load()?;
    let name = choose_name(&cfg, persisted.as_ref())?;
    let name_is_stored = persisted.as_ref().and_then(|p| p.peer_name.as_ref()) == Some(&name);
    let ipam = match persisted {
        Some(p) => {
            let ipam = Ipam::restore(name.clone(), cfg.range, p.ipam)?;
            info!(
                "restored state from {}: {} allocations",
                cfg.db_dir.display(),
                ipam.active_count()
            );
            ipam
        }
        None => Ipam::new(name.clone(), cfg.range),
    };
    if !name_is_stored {
        // A random name (no machine id) must survive the next restart even if nothing
        // else was stored yet.
        store.save(&PersistedState::new(Some(name.clone()), ipam.state()))?;
    }
    info!(
        "weft {} starting: name {name}({}), range {}, peers {:?}",
        env!("CARGO_PKG_VERSION"),
        cfg.nickname,
        cfg.range,
        cfg.peers.iter().map(|p| p.to_string()).collect::<Vec<_>>()
    );

    let netlink = Netlink::open()?;
    let peer_ips: Vec<Ipv4Addr> = cfg
        .peers
        .iter()
        .filter_map(|p| p.host.parse().ok())
        .collect();
    let mtu = match cfg.mtu {
        Some(m) => m,
        None => {
            let underlay = netlink.underlay_mtu(&peer_ips).await?.unwrap_or(1500);
            underlay.saturating_sub(ENCAP_OVERHEAD_IPV4).max(576)
        }
    };
    crate::io::sysctl::enable_ip_forward()?;
    let tun = crate::io::tun::create(TUN_NAME, mtu).map_err(|e| RouterError::Tun(e.to_string()))?;
    crate::io::sysctl::configure_overlay_link(TUN_NAME)?;
    netlink.set_link_up_mtu(TUN_NAME, mtu).await?;
    info!("overlay interface {TUN_NAME} up, mtu {mtu}");

    let data_addr = SocketAddr::from((Ipv4Addr::UNSPECIFIED, cfg.data_port));
    let socket = crate::io::udp::bind(data_addr).map_err(|source| RouterError::Bind {
        what: "data port (udp)",
        addr: data_addr.to_string(),
        source,
    })?;
    let routes = Arc::new(ArcSwap::from_pointee(RouteTable::empty(
        name.clone(),
        name.mac(),
    )));
    let dp_counters = Arc::new(DataplaneCounters::default());
    let _dataplane: Dataplane = crate::dataplane::start(
        tun,
        socket,
        routes.clone(),
        crate::core::wire::WEFT_VNI,
        dp_counters.clone(),
    )?;

    let node = Node::new(
        NodeConfig {
            name: name.clone(),
            nickname: cfg.nickname.clone(),
            uid: rand::random(),
            control_port: cfg.port,
            data_port: cfg.data_port,
            range: cfg.range,
            init: cfg.init.clone(),
        },
        ipam,
    );
    let (ready, _) = watch::channel(false);
    let shared = Arc::new(Shared {
        cfg: cfg.clone(),
        name,
        mtu,
        node: Mutex::new(node),
        store,
        routes,
        peer_counters: Mutex::new(HashMap::new()),
        dp_counters,
        conns: Mutex::new(HashMap::new()),
        conn_targets: Mutex::new(HashMap::new()),
        dialers: Mutex::new(BTreeMap::new()),
        self_targets: Mutex::new(Vec::new()),
        next_conn: AtomicU64::new(1),
        ready,
        overlay: Mutex::new(None),
        overlay_wanted: tokio::sync::Notify::new(),
        pending_allocates: AtomicU64::new(0),
        bad_requests: AtomicU64::new(0),
    });

    let control_addr = SocketAddr::from((Ipv4Addr::UNSPECIFIED, cfg.port));
    let listener = TcpListener::bind(control_addr)
        .await
        .map_err(|source| RouterError::Bind {
            what: "control port (tcp)",
            addr: control_addr.to_string(),
            source,
        })?;
    let api_listener =
        TcpListener::bind(cfg.http_addr)
            .await
            .map_err(|source| RouterError::Bind {
                what: "HTTP API",
                addr: cfg.http_addr.to_string(),
                source,
            })?;
    let metrics_listener = TcpListener::bind(cfg.metrics_addr)
        .await
        .map_err(|source| RouterError::Bind {
            what: "metrics",
            addr: cfg.metrics_addr.to_string(),
            source,
        })?;

    // Before anything can allocate: addresses that running pods hold are not free.
    reclaim_pod_addresses(&shared, &netlink).await;
    let outs = shared.with_node(|n| ((), n.start())).1;
    shared.apply(outs);

    tokio::spawn(overlay_address_task(shared.clone(), netlink));
    tokio::spawn(accept_loop(shared.clone(), listener));
    for target in cfg.peers.clone() {
        tokio::spawn(dial_loop(shared.clone(), target));
    }
    tokio::spawn(tick_loop(shared.clone()));

    let (stop_tx, stop_rx) = watch::channel(false);
    let api = crate::api::http::api_router(Arc::new(RouterControl(shared.clone())));
    let metrics = crate::api::http::metrics_router(Arc::new(RouterControl(shared.clone())));
    let mut s1 = stop_rx.clone();
    let mut s2 = stop_rx;
    let api_task = tokio::spawn(crate::api::http::serve(api_listener, api, async move {
        let _ = s1.changed().await;
    }));
    let metrics_task = tokio::spawn(crate::api::http::serve(
        metrics_listener,
        metrics,
        async move {
            let _ = s2.changed().await;
        },
    ));
    info!(
        "listening: control tcp {control_addr}, data udp {data_addr}, http {}, metrics {}",
        cfg.http_addr, cfg.metrics_addr
    );

    wait_for_signal().await;
    info!("shutting down");
    let _ = stop_tx.send(true);
    for tx in lock(&shared.conns).values() {
        let _ = tx.send(ConnCmd::Close("router shutting down".into()));
    }
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        let _ = api_task.await;
        let _ = metrics_task.await;
    })
    .await;
    Ok(())
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            error!("cannot watch SIGTERM: {e}");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

impl Shared {
    /// Runs `f` on the node; persists the state and rebuilds routes before the lock is
    /// released when the node asks for it, so that what is on disk never lags behind what
    /// was acknowledged. Returns the outputs still to be carried out.
    fn with_node<R>(
        &self,
        f: impl FnOnce(&mut Node) -> (R, Vec<Output>),
    ) -> (R, Vec<Output>, Result<(), StoreError>) {
        let mut node = lock(&self.node);
        let (r, outs) = f(&mut node);
        let mut saved = Ok(());
        if outs.iter().any(|o| matches!(o, Output::Persist)) {
            saved = self.store.save(&PersistedState::new(
                Some(self.name.clone()),
                node.ipam().state(),
            ));
            if let Err(e) = &saved {
                error!("cannot persist IPAM state: {e}");
            }
        }
        if outs.iter().any(|o| matches!(o, Output::RoutesChanged)) {
            self.rebuild_routes(&node);
        }
        (r, outs, saved)
    }

    fn rebuild_routes(&self, node: &Node) {
        let (ranges, endpoints) = node.route_inputs();
        let mut counters = lock(&self.peer_counters);
        let peers = endpoints
            .into_iter()
            .map(|p| PeerRoute {
                mac: p.name.mac(),
                counters: counters.entry(p.name.clone()).or_default().clone(),
                name: p.name,
                nickname: p.nickname,
                data_addr: p.data_addr,
            })
            .collect();
        let table = RouteTable::new(self.name.clone(), self.name.mac(), &ranges, peers);
        self.routes.store(Arc::new(table));
    }

    fn apply(self: &Arc<Self>, outs: Vec<Output>) {
        for o in outs {
            match o {
                Output::Send(id, msg) => {
                    if let Some(tx) = lock(&self.conns).get(&id) {
                        let _ = tx.send(ConnCmd::Send(msg));
                    }
                }
                Output::Close(id, why) => {
                    if let Some(tx) = lock(&self.conns).get(&id) {
                        let _ = tx.send(ConnCmd::Close(why));
                    }
                }
                Output::Connect(addr) => {
                    let target = PeerTarget {
                        host: addr.ip().to_string(),
                        port: addr.port(),
                    };
                    let known = lock(&self.dialers).contains_key(&target.to_string());
                    if !known {
                        info!("discovered peer at {target}: connecting");
                        tokio::spawn(dial_loop(self.clone(), target));
                    }
                }
                Output::ConnectedToSelf(id) => {
                    if let Some(t) = lock(&self.conn_targets).get(&id).cloned() {
                        info!("target {t} is this node itself: not dialling it again");
                        lock(&self.self_targets).push(t);
                        let (_, more, _) = self.with_node(|n| ((), n.target_is_self()));
                        self.apply(more);
                    }
                }
                Output::Persist | Output::RoutesChanged => {}
                Output::Ready => {
                    // send_replace: the value must stick even while nobody is subscribed.
                    self.ready.send_replace(true);
                    self.overlay_wanted.notify_one();
                }
                Output::Warn(w) => warn!("{w}"),
                Output::Info(i) => info!("{i}"),
            }
        }
    }

    fn connected_to(&self, ip: Ipv4Addr) -> bool {
        lock(&self.node).is_connected_to_ip(ip)
    }
}

/// Allocates the node's own overlay address once IPAM is ready and puts it on the TUN, so
/// that `ip route` shows `192.168.0.0/16 dev weave ... src <it>` and pods have a gateway.
async fn overlay_address_task(shared: Arc<Shared>, netlink: Netlink) {
    let mut ready = shared.ready.subscribe();
    loop {
        if !*ready.borrow() {
            if ready.changed().await.is_err() {
                return;
            }
            continue;
        }
        let (r, outs, saved) = shared.with_node(|n| n.allocate(EXPOSE_ID));
        shared.apply(outs);
        match (r, saved) {
            (Ok(addr), Ok(())) => {
                let net = Ipv4Net::new(addr, shared.cfg.range.prefix_len())
                    .expect("prefix length comes from a valid network");
                match netlink.set_only_address(TUN_NAME, net).await {
                    Ok(()) => {
                        info!("overlay address {net} on {TUN_NAME}");
                        *lock(&shared.overlay) = Some(net);
                        return;
                    }
                    Err(e) => error!("cannot put {net} on {TUN_NAME}: {e}; retrying"),
                }
            }
            (Err(e), _) => warn!("no overlay address for this node yet: {e}; retrying"),
            (_, Err(e)) => error!("cannot persist the overlay address: {e}; retrying"),
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(3)) => {}
            _ = shared.overlay_wanted.notified() => {}
        }
    }
}

/// Re-claims the addresses that local pods still hold (found on their veths) for their
/// containers: after a restart from lost or older state, none of them may be handed out
/// again. Without a ring yet they stay pending (and are never handed out) until it comes.
async fn reclaim_pod_addresses(shared: &Arc<Shared>, netlink: &Netlink) {
    let found = match netlink.pod_addresses().await {
        Ok(f) => f,
        Err(e) => {
            error!("cannot list local pod interfaces to re-claim their addresses: {e}");
            return;
        }
    };
    if found.is_empty() {
        return;
    }
    let n = found.len();
    let (r, outs, saved) = shared.with_node(|node| node.reclaim(found));
    shared.apply(outs);
    info!(
        "local pods hold {n} addresses: {} confirmed or re-claimed, {} pending until the ring arrives, {} conflicting",
        r.claimed.len(),
        r.pending,
        r.conflicts.len()
    );
    if let Err(e) = saved {
        error!("re-claimed pod addresses but cannot persist them: {e}");
    }
}

async fn tick_loop(shared: Arc<Shared>) {
    let mut interval = tokio::time::interval(TICK);
    loop {
        interval.tick().await;
        let (_, outs, _) = shared.with_node(|n| ((), n.on_tick()));
        shared.apply(outs);
    }
}

async fn accept_loop(shared: Arc<Shared>, listener: TcpListener) {
    loop {
        match listener.accept().await {
            Ok((stream, remote)) => {
                tokio::spawn(run_connection(shared.clone(), stream, remote, false, None));
            }
            Err(e) => {
                warn!("accepting control connection failed: {e}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}

fn set_dial_state(shared: &Shared, target: &str, state: &'static str, info: String) {
    lock(&shared.dialers).insert(target.to_string(), DialState { state, info });
}

/// Keeps one outbound connection to `target` alive: dials, and after a failure or a
/// dropped connection dials again with exponential backoff (1 s doubling to 30 s, with
/// jitter so that a whole cluster restarting does not dial in lockstep).
async fn dial_loop(shared: Arc<Shared>, target: PeerTarget) {
    let key = target.to_string();
    if lock(&shared.dialers).contains_key(&key) {
        return;
    }
    set_dial_state(&shared, &key, "connecting", String::new());
    let mut backoff = Duration::from_secs(1);
    loop {
        if lock(&shared.self_targets).contains(&key) {
            lock(&shared.dialers).remove(&key);
            return;
        }
        let resolved = tokio::net::lookup_host((target.host.as_str(), target.port))
            .await
            .ok()
            .and_then(|mut it| it.find(|a| a.is_ipv4()));
        let Some(addr) = resolved else {
            set_dial_state(
                &shared,
                &key,
                "retrying",
                format!("cannot resolve {}", target.host),
            );
            sleep_backoff(&mut backoff).await;
            continue;
        };
        if let SocketAddr::V4(v4) = addr {
            lock(&shared.node).note_target(v4);
            // The peer dialled us first (or we reached it through another target): one
            // connection per pair is enough.
            if shared.connected_to(*v4.ip()) {
                set_dial_state(
                    &shared,
                    &key,
                    "established",
                    "via inbound connection".into(),
                );
                tokio::time::sleep(Duration::from_secs(2)).await;
                continue;
            }
        }
        set_dial_state(&shared, &key, "connecting", String::new());
        match tokio::time::timeout(DIAL_TIMEOUT, TcpStream::connect(addr)).await {
            Ok(Ok(stream)) => {
                let established =
                    run_connection(shared.clone(), stream, addr, true, Some(key.clone())).await;
                if established {
                    backoff = Duration::from_secs(1);
                }
                if let SocketAddr::V4(v4) = addr {
                    // Closed as the duplicate of the peer's own connection to us: not a
                    // failure, nothing to retry.
                    if shared.connected_to(*v4.ip()) {
                        continue;
                    }
                }
                set_dial_state(&shared, &key, "retrying", "connection closed".into());
                sleep_backoff(&mut backoff).await;
            }
            Ok(Err(e)) => {
                set_dial_state(&shared, &key, "retrying", e.to_string());
                sleep_backoff(&mut backoff).await;
            }
            Err(_) => {
                set_dial_state(
                    &shared,
                    &key,
                    "retrying",
                    format!("no answer within {DIAL_TIMEOUT:?}"),
                );
                sleep_backoff(&mut backoff).await;
            }
        }
    }
}

async fn sleep_backoff(backoff: &mut Duration) {
    let jitter = Duration::from_millis(rand::random::<u64>() % 500);
    tokio::time::sleep(*backoff + jitter).await;
    *backoff = (*backoff * 2).min(MAX_BACKOFF);
}

/// Drives one control connection until it closes. Returns whether it got past the
/// handshake.
async fn run_connection(
    shared: Arc<Shared>,
    stream: TcpStream,
    remote: SocketAddr,
    outbound: bool,
    target: Option<String>,
) -> bool {
    if let Err(e) = tune(&stream) {
        warn!("control connection {remote}: cannot set socket options: {e}");
    }
    let id = shared.next_conn.fetch_add(1, Ordering::Relaxed);
    let (tx, mut rx) = mpsc::unbounded_channel();
    lock(&shared.conns).insert(id, tx);
    if let Some(t) = &target {
        lock(&shared.conn_targets).insert(id, t.clone());
    }
    let (read_half, write_half) = stream.into_split();
    let mut reader = FrameReader::new(read_half);
    let mut writer = FrameWriter::new(write_half);
    let writer_task = tokio::spawn(async move {
        while let Some(cmd) = rx.recv().await {
            match cmd {
                ConnCmd::Send(m) => {
                    if let Err(e) = writer.send(&m).await {
                        return format!("write failed: {e}");
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
    let (_, outs, _) = shared.with_node(|n| ((), n.on_connected(id, remote, outbound)));
    shared.apply(outs);

    let mut established = false;
    let mut writer_task = writer_task;
    let reason = loop {
        tokio::select! {
            msg = reader.next() => match msg {
                Ok(m) => {
                    let (_, outs, _) = shared.with_node(|n| ((), n.on_message(id, m)));
                    shared.apply(outs);
                    if !established && lock(&shared.node).is_established(id) {
                        established = true;
                    }
                }
                Err(e) => break e.to_string(),
            },
            why = &mut writer_task => {
                break why.unwrap_or_else(|e| format!("writer failed: {e}"));
            }
        }
    };
    writer_task.abort();
    lock(&shared.conns).remove(&id);
    lock(&shared.conn_targets).remove(&id);
    let (_, outs, _) = shared.with_node(|n| ((), n.on_closed(id, &reason)));
    shared.apply(outs);
    established
}

/// The router as seen by the HTTP API.
struct RouterControl(Arc<Shared>);

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
    /// Runs an IPAM operation, waiting up to `wait` for IPAM readiness, and persists the
    /// result before answering; if it cannot be persisted the allocation is undone.
    async fn ipam_op(
        &self,
        id: &str,
        wait: Duration,
        op: impl Fn(&mut Node) -> (Result<Ipv4Addr, IpamError>, Vec<Output>),
    ) -> Result<Ipv4Net, IpApiError> {
        let s = &self.0;
        let deadline = tokio::time::Instant::now() + wait;
        let mut ready = s.ready.subscribe();
        s.pending_allocates.fetch_add(1, Ordering::Relaxed);
        let result = loop {
            let (r, outs, saved) = s.with_node(|n| op(n));
            s.apply(outs);
            match (r, saved) {
                (Ok(addr), Ok(())) => {
                    break Ok(Ipv4Net::new(addr, s.cfg.range.prefix_len()).expect("valid prefix"));
                }
                (Ok(_), Err(e)) => {
                    let (_, outs, _) = s.with_node(|n| {
                        let (_, o) = n.free(id);
                        ((), o)
                    });
                    s.apply(outs);
                    break Err(IpApiError::Internal(format!(
                        "allocation not persisted, so not granted: {e}"
                    )));
                }
                (Err(IpamError::NotReady), _) => {
                    let now = tokio::time::Instant::now();
                    if now >= deadline {
                        let status = lock(&s.node).ipam_status();
                        break Err(IpApiError::NotReady(format!(
                            "IPAM is not ready after {wait:?}: {status}"
                        )));
                    }
                    let _ = tokio::time::timeout(deadline - now, ready.changed()).await;
                }
                (Err(e), _) => break Err(map_ipam_error(e)),
            }
        };
        s.pending_allocates.fetch_sub(1, Ordering::Relaxed);
        result
    }
}

impl Control for RouterControl {
    fn report(&self) -> Report {
        let s = &self.0;
        let node = lock(&s.node);
        let mut connections = node.connections_report(s.mtu);
        for (target, d) in lock(&s.dialers).iter() {
            if d.state != "established" && !connections.iter().any(|c| &c.address == target) {
                connections.push(crate::api::report::ConnectionReport {
                    address: target.clone(),
                    outbound: true,
                    state: d.state.to_string(),
                    info: d.info.clone(),
                    peer_name: None,
                    peer_nick_name: None,
                    mtu: s.mtu,
                });
            }
        }
        let mut ipam = node.ipam_report();
        ipam.pending_allocates = s.pending_allocates.load(Ordering::Relaxed);
        ipam.bad_requests = s.bad_requests.load(Ordering::Relaxed);
        let routes = s.routes.load();
        let peers = routes
            .peers()
            .iter()
            .map(|p| PeerTrafficReport {
                name: p.name.to_string(),
                nick_name: p.nickname.clone(),
                tx_packets: p.counters.tx_packets.load(Ordering::Relaxed),
                tx_bytes: p.counters.tx_bytes.load(Ordering::Relaxed),
                rx_packets: p.counters.rx_packets.load(Ordering::Relaxed),
                rx_bytes: p.counters.rx_bytes.load(Ordering::Relaxed),
            })
            .collect();
        Report {
            ready: node.ipam().is_ready(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            router: RouterReport {
                protocol: PROTOCOL.to_string(),
                protocol_min_version: PROTOCOL_VERSION,
                protocol_max_version: PROTOCOL_VERSION,
                encryption: false,
                peer_discovery: true,
                name: s.name.to_string(),
                nick_name: s.cfg.nickname.clone(),
                port: s.cfg.port,
                data_port: s.cfg.data_port,
                interface: TUN_NAME.to_string(),
                mtu: s.mtu,
                overlay_address: lock(&s.overlay).map(|n| n.to_string()),
                targets: s.cfg.peers.iter().map(|p| p.to_string()).collect(),
                peers: node.peers_report(),
                connections,
                termination_count: node.terminations(),
            },
            ipam,
            dataplane: DataplaneReport {
                routes: routes.routes(),
                peers,
                drops: s.dp_counters.drops(),
            },
        }
    }

    async fn allocate(
        &self,
        container_id: ContainerId,
        wait: Duration,
    ) -> Result<Ipv4Net, IpApiError> {
        let id = container_id.as_str();
        self.ipam_op(id, wait, |n| n.allocate(id)).await
    }

    async fn allocate_in(
        &self,
        container_id: ContainerId,
        subnet: Ipv4Net,
        wait: Duration,
    ) -> Result<Ipv4Net, IpApiError> {
        let id = container_id.as_str();
        self.ipam_op(id, wait, |n| n.allocate_in(id, subnet)).await
    }

    async fn claim(
        &self,
        container_id: ContainerId,
        addr: Ipv4Addr,
        wait: Duration,
    ) -> Result<Ipv4Net, IpApiError> {
        let id = container_id.as_str();
        self.ipam_op(id, wait, |n| {
            let (r, o) = n.claim(id, addr);
            (r.map(|()| addr), o)
        })
        .await
    }

    fn lookup(&self, container_id: &ContainerId) -> Result<Option<Ipv4Net>, IpApiError> {
        let prefix = self.0.cfg.range.prefix_len();
        Ok(lock(&self.0.node)
            .ipam()
            .lookup(container_id.as_str())
            .map(|a| Ipv4Net::new(a, prefix).expect("valid prefix")))
    }

    fn count_bad_request(&self) {
        self.0.bad_requests.fetch_add(1, Ordering::Relaxed);
    }

    fn rmpeer(&self, peer_name: &str) -> Result<u64, IpApiError> {
        let name = PeerName::parse(peer_name).map_err(|e| IpApiError::BadRequest(e.to_string()))?;
        let (r, outs, saved) = self.0.with_node(|n| n.rmpeer(&name));
        self.0.apply(outs);
        let taken = r.map_err(|e| match e {
            IpamError::RemoveSelf(_) | IpamError::RemoveConnected(_) => {
                IpApiError::Conflict(e.to_string())
            }
            other => map_ipam_error(other),
        })?;
        saved.map_err(|e| IpApiError::Internal(format!("took over, but not persisted: {e}")))?;
        Ok(taken)
    }

    fn free(&self, container_id: &ContainerId) -> Result<Option<Ipv4Addr>, IpApiError> {
        let (r, outs, saved) = self.0.with_node(|n| n.free(container_id.as_str()));
        self.0.apply(outs);
        saved.map_err(|e| IpApiError::Internal(format!("freed, but not persisted: {e}")))?;
        Ok(r)
    }
}
