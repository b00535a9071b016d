//! Start-up: the state from disk and the peer name first (before any task exists), then
//! the overlay interface and the data path, the ports, the re-claim of running pods'
//! addresses, and the tasks that run until a signal stops the router.

use super::control::RouterControl;
use super::effects::{self, StateStore};
use super::kube::KubePeers;
use super::mesh::{self, Mesh};
use super::peers::{self, StaticPeers};
use super::{lock, Shared};
use crate::config::{DatapathKind, RouterConfig, TUN_NAME};
use crate::core::cluster::NodeSet;
use crate::core::datapath::aead;
use crate::core::ipam::paxos::Acceptor;
use crate::core::ipam::{Ipam, IpamError, SignKey, Signer};
use crate::core::mesh::secure::{PublicKey, StaticKey};
use crate::core::mesh::KeySeed;
use crate::core::mesh::{Node, NodeConfig, PeerName};
use crate::core::persist::PersistedState;
use crate::core::wire::ENCAP_OVERHEAD_IPV4;
use crate::datapath::kernel::KernelBackend;
use crate::datapath::userspace::{UserspaceBackend, WorkerConfig};
use crate::datapath::Backend;
use crate::io::netlink::Netlink;
use crate::io::store::{Store, StoreError};
use crate::io::vxlan::VxlanDevice;
use ipnet::Ipv4Net;
use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch, Notify};
use tracing::{error, info, warn};
use weft_contract::EXPOSE_ID;

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
    #[error("{0}")]
    Kube(#[from] crate::k8s::KubeError),
    #[error("NAT rules: {0}")]
    Nat(#[from] crate::io::nft::NftError),
}

/// Runs the router until SIGTERM or SIGINT.
pub fn run(cfg: RouterConfig) -> Result<(), RouterError> {
    // The state and the name come first, synchronously: nothing else may start on a state
    // that cannot be read, and the name must be on disk before it is used anywhere.
    let store = Store::open(&cfg.db_dir)?;
    let persisted = store.load()?;
    let name = choose_name(&cfg, persisted.as_ref())?;
    let name_is_stored = persisted.as_ref().and_then(|p| p.peer_name.as_ref()) == Some(&name);
    let identity = store.load_or_create_key()?;
    info!(
        "static key {} (in {}); control connections {}",
        identity.public(),
        cfg.db_dir.display(),
        if cfg.secure.is_password() {
            "need WEAVE_PASSWORD"
        } else {
            "are encrypted but open to any host that reaches the control port"
        }
    );
    let (ipam, acceptor, nicknames, keys, sign_keys, tentative) = match persisted {
        Some(p) => {
            let ipam = Ipam::restore(name.clone(), cfg.range, p.ipam_state())?;
            info!(
                "restored state from {}: {} allocations",
                cfg.db_dir.display(),
                ipam.active_count()
            );
            (
                ipam,
                p.acceptor().clone(),
                p.nicknames,
                p.keys,
                p.sign_keys,
                p.tentative,
            )
        }
        None => (
            Ipam::new(name.clone(), cfg.range),
            Acceptor::default(),
            Default::default(),
            Default::default(),
            Default::default(),
            Default::default(),
        ),
    };
    if !name_is_stored {
        // A random name (no machine id) must survive the next restart even if nothing
        // else was stored yet.
        store.save(&PersistedState::new(
            Some(name.clone()),
            ipam.state(),
            acceptor.clone(),
        ))?;
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .thread_name("weft-control")
        .build()?;
    rt.block_on(run_async(
        cfg,
        store,
        Restored {
            name,
            ipam,
            acceptor,
            nicknames,
            keys,
            sign_keys,
            tentative,
            identity,
        },
    ))
}

fn choose_name(
    cfg: &RouterConfig,
    persisted: Option<&PersistedState>,
) -> Result<PeerName, RouterError> {
    let stored = persisted.and_then(|p| p.peer_name.clone());
    let holds_state = persisted.is_some_and(PersistedState::holds_addresses);
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

async fn bind(what: &'static str, addr: SocketAddr) -> Result<TcpListener, RouterError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| RouterError::Bind {
            what,
            addr: addr.to_string(),
            source,
        })
}

/// What the router found on disk (or made on first start).
struct Restored {
    name: PeerName,
    ipam: Ipam,
    acceptor: Acceptor,
    nicknames: BTreeMap<PeerName, String>,
    keys: BTreeMap<PeerName, PublicKey>,
    sign_keys: BTreeMap<PeerName, SignKey>,
    tentative: std::collections::BTreeSet<String>,
    identity: StaticKey,
}

async fn run_async(cfg: RouterConfig, store: Store, restored: Restored) -> Result<(), RouterError> {
    let Restored {
        name,
        ipam,
        acceptor,
        nicknames,
        keys,
        sign_keys,
        tentative,
        identity,
    } = restored;
    if !cfg.secure.is_password() {
        warn!(
            "no WEAVE_PASSWORD: any host that reaches tcp port {} can join this cluster and read its ring; set WEAVE_PASSWORD (or WEAVE_PASSWORD_FILE) on every node",
            cfg.port
        );
    }
    info!(
        "weft {} starting: name {name}({}), range {}, peers {:?}",
        env!("CARGO_PKG_VERSION"),
        cfg.nickname,
        cfg.range,
        cfg.peers.iter().map(|p| p.to_string()).collect::<Vec<_>>()
    );

    let names: Vec<String> = std::env::vars_os()
        .filter_map(|(k, _)| k.into_string().ok())
        .collect();
    for line in crate::config::unimplemented_settings(&|k| std::env::var(k).ok(), &names) {
        warn!("{line}");
    }

    // Kubernetes mode: follow the Nodes from the start; without a ring yet, their number
    // decides the first division of the range (as Weave's launch did with KUBE_PEERS).
    let mut cfg = cfg;
    let kube = match cfg.kube.clone() {
        Some(settings) => {
            let client = crate::k8s::connect(&settings).await?;
            let (tx, mut rx) = watch::channel(NodeSet::default());
            tokio::spawn(crate::k8s::watch_nodes(client.clone(), tx));
            info!(
                "Kubernetes mode: Node {}, leases in namespace {}",
                settings.node_name, settings.namespace
            );
            if !cfg.init_given && !cfg.kube_peers_given && !ipam.is_ready() {
                let set = super::kube::first_list(&mut rx).await;
                let n = set.consensus_size(&settings.node_name);
                cfg.init = crate::core::ipam::IpallocInit::Consensus(n);
                info!("{n} Nodes in the cluster: ipalloc-init {}", cfg.init);
            }
            Some((settings, client, rx))
        }
        None => None,
    };

    // NetworkPolicy (weave-npc's job): on in Kubernetes mode unless EXPECT_NPC=0.
    for note in &cfg.npc_notes {
        info!("{note}");
    }
    let policy = match (&kube, cfg.policy.clone()) {
        (Some((settings, client, _)), Some(pcfg)) => {
            let (tx, rx) = watch::channel(crate::k8s::policy::PolicyInput::default());
            tokio::spawn(crate::k8s::policy::watch_policy_inputs(client.clone(), tx));
            info!(
                "network policy: enforced on this node's pods (multicast {}; weave-npc's metrics on {})",
                if pcfg.allow_mcast { "allowed" } else { "subject to policy" },
                pcfg.metrics_addr
            );
            Some(crate::policy::PolicyEngine::new(
                &settings.node_name,
                pcfg,
                weft_contract::HOST_VETH_PREFIX,
                rx,
                Some(client.clone()),
            ))
        }
        _ => {
            if cfg.policy_without_api {
                info!("network policy: not enforced (it needs the Kubernetes API; EXPECT_NPC has no effect without it)");
            } else if cfg.kube.is_some() {
                info!("network policy: off (EXPECT_NPC=0)");
            }
            // A table left by an earlier run with enforcement on would go on dropping.
            if let Err(e) = tokio::task::spawn_blocking(crate::io::nft_policy::remove)
                .await
                .map_err(|e| e.to_string())
                .and_then(|r| r.map_err(|e| e.to_string()))
            {
                warn!("cannot remove a policy table left from before: {e}");
            }
            None
        }
    };

    let netlink = Netlink::open()?;
    let mut peer_ips: Vec<Ipv4Addr> = cfg
        .peers
        .iter()
        .filter_map(|p| p.host.parse().ok())
        .collect();
    if let Some((settings, _, rx)) = &kube {
        peer_ips.extend(rx.borrow().dial_targets(&settings.node_name));
    }
    let encrypted = cfg.secure.is_password();
    let seal_overhead = if encrypted { aead::OVERHEAD as u32 } else { 0 };
    let mtu = match cfg.mtu {
        Some(m) => m,
        None => {
            let underlay = netlink.underlay_mtu(&peer_ips).await?.unwrap_or(1500);
            underlay
                .saturating_sub(ENCAP_OVERHEAD_IPV4 + seal_overhead)
                .max(576)
        }
    };
    // Weave's bridge holds the name weft's TUN device takes, and its pods' addresses.
    let weave_pods = take_over_from_weave(&netlink, cfg.range).await;
    remove_weave_firewall().await;
    crate::io::sysctl::enable_ip_forward()?;
    let netlink = Arc::new(netlink);
    let backend: Arc<dyn Backend> = match cfg.datapath {
        DatapathKind::Userspace => {
            if netlink.remove_vxlan(TUN_NAME).await? {
                info!("removed the kernel data path's VXLAN device {TUN_NAME}: switching to the user-space data path");
            }
            let tun = crate::io::tun::create(TUN_NAME, mtu)
                .map_err(|e| RouterError::Tun(e.to_string()))?;
            netlink.set_link_up_mtu(TUN_NAME, mtu).await?;
            info!("overlay interface {TUN_NAME} up, mtu {mtu}");
            let data_addr = SocketAddr::from((Ipv4Addr::UNSPECIFIED, cfg.data_port));
            let socket = crate::io::udp::bind(data_addr).map_err(|source| RouterError::Bind {
                what: "data port (udp)",
                addr: data_addr.to_string(),
                source,
            })?;
            Arc::new(UserspaceBackend::start(
                tun,
                socket,
                name.clone(),
                crate::core::wire::WEFT_VNI,
                &WorkerConfig {
                    encrypted,
                    ..WorkerConfig::from_env()
                },
            )?)
        }
        DatapathKind::Kernel => {
            let index = netlink
                .create_vxlan(&VxlanDevice {
                    name: TUN_NAME,
                    vni: crate::core::wire::WEFT_VNI,
                    port: cfg.data_port,
                    mac: name.mac(),
                    mtu,
                })
                .await?;
            info!(
                "overlay interface {TUN_NAME} up: kernel VXLAN device, vni {:#x}, udp port {}, mtu {mtu}",
                crate::core::wire::WEFT_VNI,
                cfg.data_port
            );
            Arc::new(KernelBackend::start(netlink.clone(), index, name.clone()))
        }
    };
    crate::io::sysctl::configure_overlay_link(TUN_NAME)?;
    install_nat(&cfg)?;

    let mut node = Node::new(
        NodeConfig {
            name: name.clone(),
            nickname: cfg.nickname.clone(),
            uid: rand::random(),
            control_port: cfg.port,
            data_port: cfg.data_port,
            range: cfg.range,
            init: cfg.init.clone(),
            tentative_ticks: cfg
                .confirm_wait
                .as_secs()
                .div_ceil(super::mesh::TICK.as_secs())
                .max(1),
            // Drawn from the OS (rand's thread generator is ChaCha12 seeded by getrandom).
            data_key_seed: encrypted.then(|| KeySeed(rand::random())),
            signer: Signer::from_seed(&Signer::seed_from_static(identity.private())),
        },
        ipam,
        acceptor,
    );
    node.remember_nicknames(nicknames);
    node.remember_keys(keys);
    node.remember_sign_keys(sign_keys);
    node.remember_tentative(tentative);
    let control_addr = SocketAddr::from((Ipv4Addr::UNSPECIFIED, cfg.port));
    let listener = bind("control port (tcp)", control_addr).await?;
    let api_listener = bind("HTTP API", cfg.http_addr).await?;
    let metrics_listener = bind("metrics", cfg.metrics_addr).await?;

    let (jobs, job_queue) = mpsc::unbounded_channel();
    let (ready, _) = watch::channel(false);
    let shared = Arc::new(Shared {
        cfg: cfg.clone(),
        name,
        mtu,
        node: Mutex::new(node),
        jobs,
        queued_jobs: std::sync::atomic::AtomicUsize::new(0),
        jobs_drained: tokio::sync::Notify::new(),
        backend,
        mesh: Mesh::default(),
        ready,
        overlay: Mutex::new(None),
        overlay_wanted: Notify::new(),
        pending_allocates: Mutex::new(Vec::new()),
        telemetry: Default::default(),
        bad_requests: AtomicU64::new(0),
        identity,
        policy: policy.clone(),
    });
    if shared.cfg.kube.is_some() && !shared.cfg.secure.is_password() {
        // Without a password, being a Node of the cluster is the only credential there is.
        shared.mesh.restrict_inbound_to_targets();
    }
    let store: Arc<dyn StateStore> = Arc::new(store);
    tokio::spawn(effects::interpret(shared.clone(), store, job_queue));

    // Before anything can allocate: addresses that running pods hold are not free.
    reclaim_pod_addresses(&shared, &netlink, weave_pods).await;
    shared.event(|n| n.start());

    tokio::spawn(release_migrated_addresses(shared.clone(), netlink.clone()));
    tokio::spawn(overlay_address_task(shared.clone(), netlink));
    tokio::spawn(mesh::accept_loop(shared.clone(), listener));
    match &kube {
        Some((settings, client, rx)) => {
            if cfg.kube_peers_given {
                tokio::spawn(peers::follow(
                    shared.clone(),
                    StaticPeers::new(cfg.peers.clone()),
                ));
            } else {
                tokio::spawn(peers::follow(
                    shared.clone(),
                    KubePeers::new(rx.clone(), &settings.node_name, cfg.port, cfg.peers.clone()),
                ));
            }
            tokio::spawn(super::kube::report_network_up(
                shared.clone(),
                client.clone(),
                settings.node_name.clone(),
            ));
            let leases = crate::k8s::Leases::new(
                client.clone(),
                &settings.namespace,
                &settings.node_name,
                super::kube::LEASE_DURATION,
            );
            tokio::spawn(super::kube::reclaim_loop(
                shared.clone(),
                leases,
                rx.clone(),
                settings.node_name.clone(),
            ));
        }
        None => {
            tokio::spawn(peers::follow(
                shared.clone(),
                StaticPeers::new(cfg.peers.clone()),
            ));
        }
    }
    tokio::spawn(mesh::tick_loop(shared.clone()));
    let npc_metrics_task = match &policy {
        Some(engine) => Some(start_policy(engine.clone()).await?),
        None => None,
    };

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
        "listening: control tcp {control_addr}, data udp :{} ({} data path), http {}, metrics {}",
        cfg.data_port,
        cfg.datapath.as_str(),
        cfg.http_addr,
        cfg.metrics_addr
    );

    wait_for_signal().await;
    info!("shutting down");
    let _ = stop_tx.send(true);
    shared.mesh.close_all("router shutting down");
    if let Some(t) = npc_metrics_task {
        t.abort();
    }
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        let _ = api_task.await;
        let _ = metrics_task.await;
    })
    .await;
    Ok(())
}

/// Starts what enforces NetworkPolicy: the engine, the NFLOG reader of refused
/// connections, and weave-npc's metrics listener. Returns the listener's task.
async fn start_policy(
    engine: Arc<crate::policy::PolicyEngine>,
) -> Result<tokio::task::JoinHandle<std::io::Result<()>>, RouterError> {
    tokio::spawn(engine.clone().run());
    let (tx, mut rx) = tokio::sync::mpsc::channel::<crate::core::policy::denied::Denied>(4096);
    match crate::io::nflog::open(crate::core::policy::ruleset::NFLOG_GROUP) {
        Ok(socket) => {
            let lost = engine.lost_logs.clone();
            std::thread::Builder::new()
                .name("weft-nflog".into())
                .spawn(move || {
                    crate::io::nflog::read_loop(socket, |d| tx.try_send(d).is_ok(), lost)
                })
                .map_err(RouterError::Io)?;
        }
        Err(e) => warn!(
            "cannot read refused connections (NFLOG group {}): {e}; they are dropped and counted by the table, not logged",
            crate::core::policy::ruleset::NFLOG_GROUP
        ),
    }
    let e2 = engine.clone();
    tokio::spawn(async move {
        while let Some(d) = rx.recv().await {
            e2.denied(&d);
        }
    });
    let addr = engine.config().metrics_addr;
    let listener = bind("weave-npc metrics", addr).await?;
    let router = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let engine = engine.clone();
            async move {
                (
                    [(
                        axum::http::header::CONTENT_TYPE,
                        "text/plain; version=0.0.4",
                    )],
                    engine.metrics_text(),
                )
            }
        }),
    );
    Ok(tokio::spawn(crate::api::http::serve(
        listener,
        router,
        std::future::pending(),
    )))
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

/// Allocates the node's own overlay address once IPAM is ready and puts it on the TUN, so
/// that `ip route` shows `192.168.0.0/16 dev weave ... src <it>` and pods have a gateway.
async fn overlay_address_task(shared: Arc<Shared>, netlink: Arc<Netlink>) {
    let mut ready = shared.ready.subscribe();
    loop {
        if !*ready.borrow() {
            if ready.changed().await.is_err() {
                return;
            }
            continue;
        }
        let (r, saved) = shared.request(|n| n.allocate(EXPOSE_ID));
        match (r, saved.wait().await) {
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
            (_, Err(e)) => error!("cannot save the overlay address: {e}; retrying"),
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
async fn reclaim_pod_addresses(
    shared: &Arc<Shared>,
    netlink: &Netlink,
    weave_pods: Vec<(String, Ipv4Addr)>,
) {
    let mut found = match netlink.pod_addresses().await {
        Ok(f) => f,
        Err(e) => {
            error!("cannot list local pod interfaces to re-claim their addresses: {e}");
            Vec::new()
        }
    };
    found.extend(weave_pods);
    if found.is_empty() {
        return;
    }
    let n = found.len();
    let (r, saved) = shared.request(|node| node.reclaim(found));
    info!(
        "local pods hold {n} addresses: {} confirmed or re-claimed, {} pending until the ring arrives, {} conflicting",
        r.claimed.len(),
        r.pending,
        r.conflicts.len()
    );
    if let Err(e) = saved.wait().await {
        error!("re-claimed pod addresses but cannot save them: {e}");
    }
}

/// Removes what Weave Net left on this node (its bridge, datapath and VXLAN links) and
/// returns the addresses its pods still hold in `range`, to be re-claimed before anything
/// is allocated. Weave's pods lose their network with the bridge: the README says to
/// drain a node before switching it.
async fn take_over_from_weave(netlink: &Netlink, range: Ipv4Net) -> Vec<(String, Ipv4Addr)> {
    let leftovers = match netlink.weave_leftovers().await {
        Ok(l) => l,
        Err(e) => {
            warn!("cannot look for Weave Net's links: {e}");
            return Vec::new();
        }
    };
    if leftovers.is_empty() {
        return Vec::new();
    }
    let pods = if leftovers.ports.is_empty() {
        Vec::new()
    } else {
        let namespaces = tokio::task::spawn_blocking(crate::io::migrate::scan_namespaces)
            .await
            .unwrap_or_default();
        crate::core::migrate::weave_pod_addresses(&leftovers.ports, &namespaces, range)
    };
    let mut removed = Vec::new();
    let targets = leftovers
        .bridge
        .map(|b| (crate::core::migrate::WEAVE_BRIDGE.to_string(), b))
        .into_iter()
        .chain(leftovers.others);
    for (name, index) in targets {
        // Removing one end of a veth pair removes the other: gone is as good as removed.
        let gone = match netlink.delete_link(index).await {
            Ok(()) => true,
            Err(e) => {
                let gone = netlink
                    .link_names()
                    .await
                    .is_ok_and(|names| !names.contains(&name));
                if !gone {
                    warn!("cannot remove Weave Net's link {name}: {e}");
                }
                gone
            }
        };
        if gone {
            removed.push(name);
        }
    }
    info!(
        "taking over from Weave Net: removed {} ({} pods were attached to its bridge; {} of their addresses are in {range} and are re-claimed)",
        if removed.is_empty() { "nothing".to_string() } else { removed.join(", ") },
        leftovers.ports.len(),
        pods.len()
    );
    pods
}

/// Removes what Weave's router and weave-npc left in the firewall (their FORWARD rules end
/// in `-o weave -j DROP`, and weft's overlay interface is `weave` too), and weave-npc's
/// ipsets, so that they neither drop weft's traffic nor enforce stale policy.
async fn remove_weave_firewall() {
    match tokio::task::spawn_blocking(crate::io::weave_npc::remove_leftovers).await {
        Ok(Ok(r)) => {
            if !r.is_empty() {
                info!(
                    "taking over from Weave Net's policy controller: removed {} iptables rules, chains [{}], ipsets [{}]",
                    r.rules,
                    r.chains.join(", "),
                    r.ipsets.join(", ")
                );
            }
            if !r.still_referenced.is_empty() {
                warn!(
                    "Weave Net's ipsets [{}] are still used by iptables-legacy rules, which weft cannot reach: remove them (`iptables-legacy -F WEAVE-NPC...`) or replace the node; until then they may drop traffic on the weave interface",
                    r.still_referenced.join(", ")
                );
            }
        }
        Ok(Err(e)) => warn!("cannot look for Weave Net's firewall rules: {e}"),
        Err(e) => warn!("cannot look for Weave Net's firewall rules: {e}"),
    }
}

/// Frees the addresses re-claimed for Weave-attached pods once their veth is gone (the
/// pod was deleted; Weave's plugin is no longer there to free them).
async fn release_migrated_addresses(shared: Arc<Shared>, netlink: Arc<Netlink>) {
    let mut tick = tokio::time::interval(Duration::from_secs(10));
    loop {
        tick.tick().await;
        let owned: Vec<String> = shared.with_node(|n| {
            n.ipam_view()
                .owned
                .into_iter()
                .map(|(id, _)| id)
                .filter(|id| id.starts_with(crate::core::migrate::MIGRATED_ID_PREFIX))
                .collect()
        });
        if owned.is_empty() {
            continue;
        }
        let links = match netlink.link_names().await {
            Ok(l) => l,
            Err(e) => {
                warn!("cannot list links to release Weave pods' addresses: {e}");
                continue;
            }
        };
        for id in
            crate::core::migrate::released_migrations(owned.iter().map(String::as_str), &links)
        {
            let (freed, saved) = shared.request(|n| n.free(&id));
            if let Err(e) = saved.wait().await {
                warn!("freed {id} but cannot save it: {e}");
            }
            if let Some(a) = freed {
                info!("Weave-attached pod {id} is gone: {a} is free again");
            }
        }
    }
}

/// weft's NAT rules (masquerade out of and into the overlay), replacing any earlier copy.
fn install_nat(cfg: &RouterConfig) -> Result<(), RouterError> {
    let rules = crate::core::nat::postrouting_rules(&crate::core::nat::NatConfig {
        range: cfg.range,
        overlay_link: TUN_NAME.to_string(),
        pod_link_prefix: weft_contract::HOST_VETH_PREFIX.to_string(),
        no_masq_local: cfg.no_masq_local,
    });
    crate::io::nft::install(&rules)?;
    info!(
        "nftables table ip {}: {} NAT rules (pods masqueraded leaving {}; NO_MASQ_LOCAL {})",
        crate::core::nat::TABLE,
        rules.len(),
        cfg.range,
        if cfg.no_masq_local { "on" } else { "off" }
    );
    Ok(())
}
