//! Kubernetes mode with routers run by hand in node namespaces (`KUBECONFIG`, `NODE_NAME`,
//! no PEER arguments: every peer comes from the API), where a test controls what a
//! cluster never lets it: the order and timing of start-ups, Nodes that exist without a
//! kubelet, a Node deleted while its machine runs on.
//!
//! - Against a **real** Kubernetes 1.20.2 API server (`deploy/local/cluster.sh
//!   control-plane`: etcd, kube-apiserver with RBAC, controller-manager, scheduler, and
//!   deploy/weft.yaml applied), each router authenticated as the manifest's
//!   ServiceAccount with a token from the TokenRequest API: Nodes started in random order
//!   agree on one ring, a fourth joins, a deleted Node is reclaimed under a Lease.
//! - Against the stand-in (`weft_testbed::kube_api`), only what a real server does not
//!   do on demand: answer 503 to every call while its contents change behind it, then come
//!   back with its watch history compacted (410 Gone), so the routers must relist.
//!   (An API server stopped or frozen for a while, on a real cluster: tests/local_cluster.rs.)
//!
//! Needs root (network namespaces): ignored without it, failed under CI without it.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};
use weft::api::report::Report;
use weft_testbed::kube_api::FakeKube;
use weft_testbed::local::{register_node, ApiCluster, LocalCluster};
use weft_testbed::{harness, Binaries, Cluster, ClusterSpec};

const READY: Duration = Duration::from_secs(60);

fn ok<T, E: std::fmt::Display>(r: Result<T, E>, what: &str) -> T {
    r.unwrap_or_else(|e| panic!("{what}: {e}"))
}

fn eventually(what: &str, timeout: Duration, mut cond: impl FnMut() -> Result<(), String>) {
    let deadline = Instant::now() + timeout;
    loop {
        match cond() {
            Ok(()) => return,
            Err(e) if Instant::now() > deadline => panic!("timed out waiting for {what}: {e}"),
            Err(_) => std::thread::sleep(Duration::from_millis(250)),
        }
    }
}

/// splitmix64, seeded from the clock unless WEFT_TEST_SEED is set; the seed is printed.
struct Rng(u64);
impl Rng {
    fn new() -> Rng {
        let seed = std::env::var("WEFT_TEST_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_nanos() as u64
            });
        eprintln!("random order and delays from WEFT_TEST_SEED={seed}");
        Rng(seed)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        (z ^ (z >> 31)) % n.max(1)
    }
}

/// The API server a test runs against.
enum Api {
    Real(LocalCluster),
    StandIn(FakeKube),
}

struct KubeCluster {
    c: Cluster,
    api: Api,
    kubeconfig: String,
    /// The API server's namespace: a host on the underlay that is not a Node.
    api_ns: String,
}

impl KubeCluster {
    fn new(nodes: usize, real: bool) -> KubeCluster {
        let weft = std::path::PathBuf::from(env!("CARGO_BIN_EXE_weft"));
        let binaries = ok(Binaries::beside(weft), "binaries");
        let mut spec = ClusterSpec::new(nodes, binaries);
        spec.static_peers = false;
        if real {
            // The real control plane on a subnet of its own, as it would be in a VPC.
            let repo = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"));
            let ApiCluster {
                c,
                api,
                kubeconfig,
                api_ns,
                ..
            } = ok(ApiCluster::new(&repo, spec), "the real control plane");
            return KubeCluster {
                c,
                api: Api::Real(api),
                kubeconfig: kubeconfig.display().to_string(),
                api_ns,
            };
        }
        // The stand-in stays on the nodes' link, where its test was written.
        let mut c = ok(Cluster::create(spec), "building namespaces");
        let (ns, ip) = ok(c.add_underlay_host("api"), "API host");
        let kubeconfig = c.workdir().join("kubeconfig");
        let api = ok(FakeKube::start(&ns, ip, 6443), "fake API server");
        ok(std::fs::write(&kubeconfig, api.kubeconfig()), "kubeconfig");
        KubeCluster {
            c,
            api: Api::StandIn(api),
            kubeconfig: kubeconfig.display().to_string(),
            api_ns: ns,
        }
    }

    fn stand_in(&self) -> &FakeKube {
        match &self.api {
            Api::StandIn(f) => f,
            Api::Real(_) => panic!("this step needs the stand-in API server"),
        }
    }

    /// A Node for node `i`, as a kubelet registers it.
    fn register(&self, i: usize) {
        let n = &self.c.nodes[i];
        match &self.api {
            Api::StandIn(f) => f.add_node(&n.nickname, n.underlay_ip),
            Api::Real(k) => ok(register_node(k, n), "registering a Node"),
        }
    }

    fn delete_node(&self, name: &str) {
        match &self.api {
            Api::StandIn(f) => f.delete_node(name),
            Api::Real(k) => {
                ok(k.kubectl(&["delete", "node", name]), "deleting a Node");
            }
        }
    }

    fn node(&self, name: &str) -> Option<serde_json::Value> {
        match &self.api {
            Api::StandIn(f) => f.node(name),
            Api::Real(k) => k.kubectl_json(&["get", "node", name]).ok(),
        }
    }

    fn lease(&self, namespace: &str, name: &str) -> Option<serde_json::Value> {
        match &self.api {
            Api::StandIn(f) => f.lease(namespace, name),
            Api::Real(k) => k
                .kubectl_json(&["-n", namespace, "get", "lease", name])
                .ok(),
        }
    }

    fn start(&mut self, i: usize) {
        let nick = self.c.nodes[i].nickname.clone();
        let kc = self.kubeconfig.clone();
        ok(
            self.c.start_router_env(
                i,
                &[],
                &[("KUBECONFIG", kc.as_str()), ("NODE_NAME", nick.as_str())],
            ),
            "starting router",
        );
    }

    fn report(&self, i: usize) -> Report {
        ok(self.c.report(i), "GET /report")
    }

    fn logs(&self, i: usize) -> String {
        std::fs::read_to_string(&self.c.nodes[i].log).unwrap_or_default()
    }
}

/// Ring entries as (token, owner), from a report.
fn ring(r: &Report) -> BTreeMap<String, String> {
    r.ipam
        .entries
        .iter()
        .map(|e| (e.token.clone(), e.peer.clone()))
        .collect()
}

fn owned_by(r: &Report, peer: &str) -> u64 {
    r.ipam
        .entries
        .iter()
        .filter(|e| e.peer == peer)
        .map(|e| e.size)
        .sum()
}

fn targets(r: &Report) -> Vec<String> {
    r.router.targets.clone()
}

fn nodes_start_in_random_order_agree_on_one_ring_and_reclaim_deleted_nodes() {
    let mut rng = Rng::new();
    let mut k = KubeCluster::new(4, true);
    // The cluster has three Nodes; their routers start in a random order, with random
    // pauses (up to 4 s) between them.
    for i in 0..3 {
        k.register(i);
    }
    let mut order = vec![0usize, 1, 2];
    for j in (1..order.len()).rev() {
        order.swap(j, rng.below(j as u64 + 1) as usize);
    }
    for &i in &order {
        k.start(i);
        std::thread::sleep(Duration::from_millis(rng.below(4000)));
    }
    for i in 0..3 {
        ok(k.c.wait_ready(i, READY), "router ready");
    }
    eventually("one ring on every node", Duration::from_secs(30), || {
        let r0 = ring(&k.report(0));
        for i in 1..3 {
            if ring(&k.report(i)) != r0 {
                return Err(format!("n{} differs", i + 1));
            }
        }
        Ok(())
    });
    let r = k.report(0);
    assert!(
        r.ipam.seeds.len() >= 2,
        "a quorum of the 3 Nodes decided: {:?}",
        r.ipam.seeds
    );
    for i in 0..3 {
        let log = k.logs(i);
        assert!(
            log.contains("3 Nodes in the cluster: ipalloc-init consensus=3"),
            "n{}: {log}",
            i + 1
        );
        // Each router dials the other Nodes' InternalIPs, learnt from the API.
        let mut want: Vec<String> = (0..3)
            .filter(|&j| j != i)
            .map(|j| format!("{}:6783", k.c.nodes[j].underlay_ip))
            .collect();
        want.sort();
        let mut got = targets(&k.report(i));
        got.sort();
        assert_eq!(got, want, "n{} targets", i + 1);
    }
    // Once ready, each Node says its network is up.
    eventually(
        "NetworkUnavailable=False on every Node",
        Duration::from_secs(20),
        || {
            for i in 0..3 {
                let node = k.node(&k.c.nodes[i].nickname).ok_or("node gone")?;
                let conds = node["status"]["conditions"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default();
                let up = conds.iter().any(|c| {
                    c["type"] == "NetworkUnavailable"
                        && c["status"] == "False"
                        && c["reason"] == "WeftIsUp"
                });
                let kubelet = conds.iter().any(|c| c["type"] == "Ready");
                if !(up && kubelet) {
                    return Err(format!("n{}: {conds:?}", i + 1));
                }
            }
            Ok(())
        },
    );

    // A fourth Node joins the running cluster: it adopts the ring (never seeds its own)
    // and gets space when its first pod needs an address.
    k.register(3);
    k.start(3);
    ok(k.c.wait_ready(3, READY), "n4 ready");
    // Ready answers before the first space arrives; a runtime retries an ADD until the
    // overlay has its address, the test waits for it.
    ok(k.c.wait_overlay_address(3, READY), "n4's overlay address");
    let pod = ok(k.c.add_pod(3, "late"), "pod on n4");
    eventually("n4 known everywhere", Duration::from_secs(30), || {
        for i in 0..3 {
            let t = targets(&k.report(i));
            let want = format!("{}:6783", k.c.nodes[3].underlay_ip);
            if !t.contains(&want) {
                return Err(format!("n{} targets {t:?}", i + 1));
            }
        }
        Ok(())
    });
    let r4 = k.report(3);
    assert_eq!(r4.ipam.seeds, r.ipam.seeds, "n4 adopted the existing ring");
    assert!(owned_by(&r4, &k.c.nodes[3].name) > 0, "n4 got space");
    assert!(r4
        .ipam
        .owned
        .iter()
        .any(|o| o.addrs[0].starts_with(&pod.addr.to_string())));

    // Node n2 is deleted (its machine is gone): exactly one survivor takes its ranges over
    // under the Lease, records it, and logs it.
    let n2 = k.c.nodes[1].name.clone();
    let before = owned_by(&k.report(0), &n2);
    assert!(before > 0, "n2 owned space");
    ok(k.c.kill_router(1), "kill n2");
    k.delete_node("n2");
    eventually("n2's ranges taken over", Duration::from_secs(60), || {
        for i in [0usize, 2, 3] {
            let r = k.report(i);
            if owned_by(&r, &n2) != 0 {
                return Err(format!(
                    "n{} still sees n2 owning {}",
                    i + 1,
                    owned_by(&r, &n2)
                ));
            }
        }
        Ok(())
    });
    let reclaimers: Vec<usize> = [0usize, 2, 3]
        .into_iter()
        .filter(|&i| k.logs(i).contains("reclaimed deleted Node n2"))
        .collect();
    assert_eq!(
        reclaimers.len(),
        1,
        "exactly one node reclaims: {reclaimers:?}"
    );
    let winner = reclaimers[0];
    let line = k
        .logs(winner)
        .lines()
        .find(|l| l.contains("reclaimed deleted Node n2"))
        .unwrap()
        .to_string();
    eprintln!("reclaim by n{}: {line}", winner + 1);
    let lease = k
        .lease("kube-system", "weft-reclaim-n2")
        .expect("the reclaim lease exists");
    let ann = &lease["metadata"]["annotations"];
    assert_eq!(ann["weft.works/reclaimed-node"], "n2");
    assert_eq!(ann["weft.works/reclaimed-peers"], n2.as_str());
    assert_eq!(
        ann["weft.works/reclaimed-by"],
        k.c.nodes[winner].nickname.as_str()
    );
    assert_eq!(
        lease["spec"]["holderIdentity"],
        k.c.nodes[winner].nickname.as_str()
    );
    // Everyone dropped n2 from its targets.
    eventually("n2 no longer dialled", Duration::from_secs(20), || {
        let gone = format!("{}:6783", k.c.nodes[1].underlay_ip);
        for i in [0usize, 2, 3] {
            if targets(&k.report(i)).contains(&gone) {
                return Err(format!("n{} still dials n2", i + 1));
            }
        }
        Ok(())
    });
}

fn an_unreachable_api_loses_nothing_and_a_relist_catches_up() {
    let mut k = KubeCluster::new(3, false);
    for i in 0..3 {
        k.register(i);
    }
    for i in 0..3 {
        k.start(i);
    }
    for i in 0..3 {
        ok(k.c.wait_ready(i, READY), "router ready");
    }
    let a = ok(k.c.add_pod(0, "a"), "pod a");
    let ring_before = ring(&k.report(0));

    // Without WEAVE_PASSWORD, only Nodes may connect: a host that is not one (here the
    // API server's) is hung up on before the handshake, without a byte.
    let node0 = std::net::SocketAddr::from((k.c.nodes[0].underlay_ip, 6783));
    let got = ok(
        weft_testbed::in_netns(&k.api_ns, move || {
            use std::io::Read;
            let mut s = std::net::TcpStream::connect_timeout(&node0, Duration::from_secs(2))
                .map_err(|e| weft_testbed::TestbedError::Io {
                    what: "connect".into(),
                    source: e,
                })?;
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let mut buf = [0u8; 64];
            Ok(s.read(&mut buf)
                .map(|n| n.to_string())
                .unwrap_or_else(|e| e.to_string()))
        }),
        "a non-Node host connects",
    );
    assert!(
        got == "0" || got.contains("reset"),
        "a non-Node got {got} instead of a hang-up"
    );
    eventually("the refusal is logged", Duration::from_secs(5), || {
        if k.logs(0).contains("not the address of a Kubernetes Node") {
            Ok(())
        } else {
            Err(k.c.log_tail(0, 5))
        }
    });

    // The API goes away for a while (every call 503, watches cut): forwarding and
    // allocation go on with the last known peers, nobody is reclaimed.
    k.stand_in().set_down(true);
    k.stand_in().delete_node("n3"); // Not visible while the API is down.
    std::thread::sleep(Duration::from_secs(5));
    let b = ok(k.c.add_pod(1, "b"), "pod b while the API is down");
    let out = ok(
        k.c.tcp_pod_to_pod(&a, &b),
        "TCP a -> b while the API is down",
    );
    assert_eq!(out.client_seen_as.ip(), std::net::IpAddr::V4(a.addr));
    for i in 0..3 {
        let r = k.report(i);
        assert_eq!(
            r.router.targets.len(),
            2,
            "n{}: last known peers kept",
            i + 1
        );
        assert!(
            !k.logs(i).contains("reclaimed deleted Node"),
            "nothing reclaimed"
        );
    }
    assert_eq!(ring(&k.report(0)).keys().len(), ring_before.keys().len());

    // Back, with its watch history compacted: the routers get 410 Gone, relist, and only
    // then see n3 gone and n4 new.
    k.stand_in().compact();
    let n4: Ipv4Addr = "10.254.254.4".parse().unwrap();
    k.stand_in().add_node("n4", n4);
    k.stand_in().set_down(false);
    eventually(
        "targets follow the relisted Nodes",
        Duration::from_secs(60),
        || {
            // n3's router runs on; its own Node is never among its targets either way.
            for i in 0..3 {
                let mut t = targets(&k.report(i));
                t.sort();
                let mut want: Vec<String> = (0..2)
                    .filter(|&j| j != i)
                    .map(|j| format!("{}:6783", k.c.nodes[j].underlay_ip))
                    .collect();
                want.push("10.254.254.4:6783".to_string());
                want.sort();
                if t != want {
                    return Err(format!("n{} targets {t:?}", i + 1));
                }
            }
            Ok(())
        },
    );
    let watched = k
        .stand_in()
        .requests()
        .iter()
        .filter(|r| r.starts_with("GET /api/v1/nodes?") && !r.contains("watch=true"))
        .count();
    assert!(
        watched >= 6,
        "every router listed again after 410 ({watched} lists)"
    );
    // n3's router still runs (its Node object was deleted, the machine was not). Whether
    // its connections outlive the deletion depends on who dialled whom (a deleted Node's
    // dialer is cancelled, and it may not connect anew), but while n1 sees it connected,
    // n3 keeps its ranges: a connected peer is never reclaimed.
    assert!(k.logs(0).contains("Node n3 was deleted"));
    let n3 = k.c.nodes[2].name.clone();
    let deadline = Instant::now() + Duration::from_secs(3);
    while Instant::now() < deadline {
        let r = k.report(0);
        let connected = r
            .router
            .connections
            .iter()
            .any(|c| c.peer_name.as_deref() == Some(n3.as_str()) && c.state == "established");
        if connected {
            assert!(
                owned_by(&r, &n3) > 0,
                "n3 is connected to n1 and yet reclaimed"
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn main() {
    harness::run(vec![
        harness::root(
            "nodes_start_in_random_order_agree_on_one_ring_and_reclaim_deleted_nodes",
            nodes_start_in_random_order_agree_on_one_ring_and_reclaim_deleted_nodes,
        ),
        harness::root(
            "an_unreachable_api_loses_nothing_and_a_relist_catches_up",
            an_unreachable_api_loses_nothing_and_a_relist_catches_up,
        ),
    ])
}
