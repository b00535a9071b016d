//! NetworkPolicy, the cases of Kubernetes' own e2e suite (`test/e2e/network/netpol/`),
//! written for weft's harness: a real Kubernetes 1.20.2 API server
//! (`cluster.sh control-plane`) with deploy/weft.yaml applied, three routers that
//! authenticate as its ServiceAccount, namespaces x, y, z with pods a, b, c spread over
//! the three nodes (so every case crosses nodes and stays on one), each pod an API object
//! that the test, standing in for the kubelet, runs through weft-cni and reports the
//! address of. Each pod serves TCP and UDP on 80 and 81 (container ports named
//! serve-80-tcp, serve-81-tcp, serve-80-udp, serve-81-udp), and SCTP on 80 and 81.
//!
//! Probes go from every pod to every other pod's address (the e2e suite probes through
//! each pod's Service; the Service case is in tests/local_cluster.rs, with kube-proxy);
//! a case passes when the whole 9 x 8 matrix matches the expected one, retried for up to
//! 10 s as the e2e suite does. TCP: a connection; UDP: an answer; SCTP: the kernels here
//! have no SCTP stack, so an SCTP INIT chunk is sent from a raw socket and must (or must
//! not) arrive in the destination pod — the first packet is what policy judges.
//!
//! Kubernetes 1.20 has no `endPort` (the API drops it): port ranges are covered by the
//! compiler's property test and by tests/policy_table.rs in the kernel.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::net::{SocketAddr, SocketAddrV4, TcpListener, TcpStream, UdpSocket};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use weft_testbed::local::ApiCluster;
use weft_testbed::{harness, spawn_in_netns, Binaries, ClusterSpec, Pod};

fn ok<T, E: std::fmt::Display>(r: Result<T, E>, what: &str) -> T {
    r.unwrap_or_else(|e| panic!("{what}: {e}"))
}

const NAMESPACES: [&str; 3] = ["x", "y", "z"];
const PODS: [&str; 3] = ["a", "b", "c"];
const PROBE_TIMEOUT: Duration = Duration::from_millis(1000);

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum P {
    Tcp,
    Udp,
    Sctp,
}

struct Bed {
    k: ApiCluster,
    /// "x/a" -> the pod
    pods: BTreeMap<String, Pod>,
    /// SCTP INIT chunks that arrived: (destination pod, port, tag).
    sctp_seen: Arc<Mutex<HashSet<(String, u16, u32)>>>,
    stop: Arc<AtomicBool>,
}

impl Drop for Bed {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn pod_yaml(ns: &str, name: &str, node: &str) -> String {
    format!(
        r#"apiVersion: v1
kind: Pod
metadata:
  name: {name}
  namespace: "{ns}"
  labels: {{pod: {name}}}
spec:
  nodeName: {node}
  automountServiceAccountToken: false
  containers:
  - name: cont-80-tcp
    image: agnhost
    ports: [{{containerPort: 80, name: serve-80-tcp}}, {{containerPort: 80, protocol: UDP, name: serve-80-udp}}]
  - name: cont-81-tcp
    image: agnhost
    ports: [{{containerPort: 81, name: serve-81-tcp}}, {{containerPort: 81, protocol: UDP, name: serve-81-udp}}]
"#
    )
}

/// Servers for every port and protocol in the pod's namespace, until `stop`.
fn serve(
    pod: &Pod,
    key: String,
    seen: Arc<Mutex<HashSet<(String, u16, u32)>>>,
    stop: Arc<AtomicBool>,
) {
    let ip = pod.addr;
    for port in [80u16, 81] {
        let stop1 = stop.clone();
        ok(
            spawn_in_netns(&pod.ns, move || {
                let l = TcpListener::bind(SocketAddrV4::new(ip, port)).map_err(|e| {
                    weft_testbed::TestbedError::Failed(format!("tcp {ip}:{port}: {e}"))
                })?;
                l.set_nonblocking(true).ok();
                while !stop1.load(Ordering::Relaxed) {
                    match l.accept() {
                        Ok((s, _)) => drop(s),
                        Err(_) => std::thread::sleep(Duration::from_millis(5)),
                    }
                }
                Ok(())
            }),
            "tcp server",
        );
        let stop2 = stop.clone();
        ok(
            spawn_in_netns(&pod.ns, move || {
                let s = UdpSocket::bind(SocketAddrV4::new(ip, port)).map_err(|e| {
                    weft_testbed::TestbedError::Failed(format!("udp {ip}:{port}: {e}"))
                })?;
                s.set_read_timeout(Some(Duration::from_millis(100))).ok();
                let mut buf = [0u8; 64];
                while !stop2.load(Ordering::Relaxed) {
                    if let Ok((n, peer)) = s.recv_from(&mut buf) {
                        let _ = s.send_to(&buf[..n], peer);
                    }
                }
                Ok(())
            }),
            "udp server",
        );
    }
    // One raw socket takes every SCTP packet addressed to the pod.
    let stop3 = stop;
    ok(
        spawn_in_netns(&pod.ns, move || {
            let s = socket2::Socket::new(
                socket2::Domain::IPV4,
                socket2::Type::RAW,
                Some(socket2::Protocol::from(132)),
            )
            .map_err(|e| weft_testbed::TestbedError::Failed(format!("raw sctp: {e}")))?;
            s.set_read_timeout(Some(Duration::from_millis(100))).ok();
            let mut buf = [std::mem::MaybeUninit::<u8>::uninit(); 256];
            while !stop3.load(Ordering::Relaxed) {
                let Ok(n) = s.recv(&mut buf) else { continue };
                // SAFETY: recv initialised the first n bytes.
                let b: Vec<u8> = buf[..n]
                    .iter()
                    .map(|x| unsafe { x.assume_init() })
                    .collect();
                let ihl = usize::from(b.first().copied().unwrap_or(0) & 0xf) * 4;
                if b.len() >= ihl + 20 && b[16..20] == ip.octets() {
                    let dport = u16::from_be_bytes([b[ihl + 2], b[ihl + 3]]);
                    let tag = u32::from_be_bytes([b[ihl + 4], b[ihl + 5], b[ihl + 6], b[ihl + 7]]);
                    seen.lock().unwrap().insert((key.clone(), dport, tag));
                }
            }
            Ok(())
        }),
        "sctp receiver",
    );
}

fn bed() -> Bed {
    let weft = PathBuf::from(env!("CARGO_BIN_EXE_weft"));
    let spec = ClusterSpec::new(3, ok(Binaries::beside(weft), "binaries"));
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let mut k = ok(ApiCluster::new(&repo, spec), "control plane");
    for i in 0..3 {
        ok(k.register_node(i), "Node");
    }
    for ns in NAMESPACES {
        // Kubernetes 1.21+ labels a namespace with its name; 1.20 does not, weft adds it
        // itself, so the test labels nothing.
        ok(k.api.kubectl(&["create", "namespace", ns]), "namespace");
    }
    // Node 1 ran Weave Net with weave-npc: its FORWARD rules, chains and an ipset are
    // still there (iptables-nft, as Debian and Amazon Linux 2023 have it). Left in place,
    // `-o weave -j DROP` would drop weft's traffic into the overlay.
    plant_weave_npc_leftovers(&k.c.nodes[0].ns);
    for i in 0..3 {
        ok(k.start_router(i, &[]), "router");
    }
    for i in 0..3 {
        ok(k.c.wait_ready(i, Duration::from_secs(60)), "router ready");
        ok(
            k.c.wait_overlay_address(i, Duration::from_secs(60)),
            "overlay",
        );
    }
    let seen = Arc::new(Mutex::new(HashSet::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let mut pods = BTreeMap::new();
    for (ni, ns) in NAMESPACES.iter().enumerate() {
        for (pi, name) in PODS.iter().enumerate() {
            let node = (ni + pi) % 3;
            let nick = k.c.nodes[node].nickname.clone();
            let pod = ok(
                k.add_pod(node, &pod_yaml(ns, name, &nick), ns, name),
                &format!("pod {ns}/{name}"),
            );
            let key = format!("{ns}/{name}");
            serve(&pod, key.clone(), seen.clone(), stop.clone());
            pods.insert(key, pod);
        }
    }
    std::thread::sleep(Duration::from_millis(300));
    Bed {
        k,
        pods,
        sctp_seen: seen,
        stop,
    }
}

const WEAVE_NPC_RULES: &[&[&str]] = &[
    &["-N", "WEAVE-NPC"],
    &["-N", "WEAVE-NPC-EGRESS"],
    &["-A", "FORWARD", "-i", "weave", "-j", "WEAVE-NPC-EGRESS"],
    &["-A", "FORWARD", "-o", "weave", "-j", "WEAVE-NPC"],
    &[
        "-A",
        "FORWARD",
        "-o",
        "weave",
        "-m",
        "state",
        "--state",
        "NEW",
        "-j",
        "NFLOG",
        "--nflog-group",
        "86",
    ],
    &["-A", "FORWARD", "-o", "weave", "-j", "DROP"],
    &[
        "-A",
        "WEAVE-NPC",
        "-m",
        "state",
        "--state",
        "RELATED,ESTABLISHED",
        "-j",
        "ACCEPT",
    ],
    &[
        "-A",
        "WEAVE-NPC",
        "-m",
        "set",
        "--match-set",
        "weave-k?Z;25^M}|1s7P3|H9i;*;MhG",
        "dst",
        "-j",
        "ACCEPT",
    ],
    &[
        "-A",
        "WEAVE-NPC-EGRESS",
        "-m",
        "state",
        "--state",
        "RELATED,ESTABLISHED",
        "-j",
        "ACCEPT",
    ],
];

fn run_in(ns: &str, program: &str, args: &[&str]) -> String {
    let out = ok(
        std::process::Command::new("ip")
            .args(["netns", "exec", ns, program])
            .args(args)
            .output(),
        program,
    );
    assert!(
        out.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn plant_weave_npc_leftovers(ns: &str) {
    run_in(
        ns,
        "ipset",
        &["create", "weave-k?Z;25^M}|1s7P3|H9i;*;MhG", "hash:ip"],
    );
    for rule in WEAVE_NPC_RULES {
        run_in(ns, "iptables", rule);
    }
}

fn weave_npc_leftovers(ns: &str) -> Vec<String> {
    let mut left: Vec<String> = run_in(ns, "iptables-save", &[])
        .lines()
        .filter(|l| l.contains("weave") || l.contains("WEAVE"))
        .map(String::from)
        .collect();
    left.extend(
        run_in(ns, "ipset", &["list", "-name"])
            .lines()
            .filter(|l| l.starts_with("weave-"))
            .map(String::from),
    );
    left
}

/// Whether `from` reaches `to` on `port`/`proto` (from inside `from`'s namespace).
fn probe(bed: &Bed, from: &str, to: &str, proto: P, port: u16, tag: u32) -> bool {
    let src = bed.pods[from].clone();
    let dst = bed.pods[to].addr;
    let addr = SocketAddrV4::new(dst, port);
    let r = weft_testbed::in_netns(&src.ns, move || {
        Ok(match proto {
            P::Tcp => TcpStream::connect_timeout(&SocketAddr::V4(addr), PROBE_TIMEOUT).is_ok(),
            P::Udp => {
                let s = UdpSocket::bind("0.0.0.0:0")
                    .map_err(|e| weft_testbed::TestbedError::Failed(e.to_string()))?;
                s.set_read_timeout(Some(PROBE_TIMEOUT)).ok();
                let _ = s.send_to(b"hostname\n", addr);
                let mut buf = [0u8; 64];
                s.recv(&mut buf).is_ok()
            }
            P::Sctp => {
                let s = socket2::Socket::new(
                    socket2::Domain::IPV4,
                    socket2::Type::RAW,
                    Some(socket2::Protocol::from(132)),
                )
                .map_err(|e| weft_testbed::TestbedError::Failed(e.to_string()))?;
                // Common header (ports, verification tag 0, checksum 0) and an INIT chunk
                // whose initiate tag identifies the probe.
                let mut pkt = Vec::new();
                pkt.extend(40000u16.to_be_bytes());
                pkt.extend(port.to_be_bytes());
                pkt.extend(tag.to_be_bytes());
                pkt.extend([0u8; 4]);
                pkt.extend([1u8, 0, 0, 20]);
                pkt.extend(tag.to_be_bytes());
                pkt.extend(65535u32.to_be_bytes());
                pkt.extend(1u16.to_be_bytes());
                pkt.extend(1u16.to_be_bytes());
                pkt.extend(1u32.to_be_bytes());
                let _ = s.send_to(&pkt, &SocketAddr::V4(SocketAddrV4::new(dst, 0)).into());
                false
            }
        })
    })
    .unwrap_or(false);
    if proto != P::Sctp {
        return r;
    }
    let deadline = Instant::now() + PROBE_TIMEOUT;
    while Instant::now() < deadline {
        if bed
            .sctp_seen
            .lock()
            .unwrap()
            .contains(&(to.to_string(), port, tag))
        {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

/// The reachability matrix: from -> to -> reachable.
#[derive(Clone, PartialEq, Eq)]
struct Reach(BTreeMap<(String, String), bool>);

impl Reach {
    fn all(v: bool) -> Reach {
        let mut m = BTreeMap::new();
        for f in all_pods() {
            for t in all_pods() {
                if f != t {
                    m.insert((f.clone(), t.clone()), v);
                }
            }
        }
        Reach(m)
    }

    /// Sets every cell whose source matches `from` and destination `to` (`"x/*"`, `"*"`,
    /// `"x/a"`, `"*/b"`).
    fn set(mut self, from: &str, to: &str, v: bool) -> Reach {
        for ((f, t), cell) in self.0.iter_mut() {
            if matches(from, f) && matches(to, t) {
                *cell = v;
            }
        }
        self
    }

    fn diff(&self, other: &Reach) -> Vec<String> {
        self.0
            .iter()
            .filter(|(k, v)| other.0.get(k) != Some(v))
            .map(|((f, t), v)| format!("{f} -> {t}: expected {v}"))
            .collect()
    }
}

fn matches(pattern: &str, pod: &str) -> bool {
    if pattern == "*" {
        return true;
    }
    let (pn, pp) = pattern.split_once('/').unwrap_or((pattern, "*"));
    let (n, p) = pod.split_once('/').unwrap();
    (pn == "*" || pn == n) && (pp == "*" || pp == p)
}

fn all_pods() -> Vec<String> {
    NAMESPACES
        .iter()
        .flat_map(|n| PODS.iter().map(move |p| format!("{n}/{p}")))
        .collect()
}

static TAG: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(1);

fn observe(bed: &Bed, proto: P, port: u16) -> Reach {
    let pairs: Vec<(String, String)> = Reach::all(true).0.keys().cloned().collect();
    let results: Vec<((String, String), bool)> = std::thread::scope(|s| {
        let handles: Vec<_> = pairs
            .iter()
            .map(|(f, t)| {
                let tag = TAG.fetch_add(1, Ordering::Relaxed);
                s.spawn(move || ((f.clone(), t.clone()), probe(bed, f, t, proto, port, tag)))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    Reach(results.into_iter().collect())
}

/// Probes until the matrix is the expected one (10 s at most, as the e2e suite retries).
fn expect(bed: &Bed, case: &str, proto: P, port: u16, want: &Reach) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let got = observe(bed, proto, port);
        let diff = want.diff(&got);
        if diff.is_empty() {
            eprintln!("PASS {case} ({proto:?}/{port})");
            return;
        }
        if Instant::now() > deadline {
            panic!(
                "{case} ({proto:?}/{port}): {} of 72 wrong:\n{}",
                diff.len(),
                diff.join("\n")
            );
        }
        std::thread::sleep(Duration::from_millis(300));
    }
}

fn apply(bed: &Bed, yaml: &str) {
    ok(bed.k.api.apply(yaml), "kubectl apply");
    applied_everywhere(bed);
}

fn clean(bed: &Bed) {
    for ns in NAMESPACES {
        ok(
            bed.k
                .api
                .kubectl(&["-n", ns, "delete", "networkpolicy", "--all"]),
            "deleting policies",
        );
    }
    applied_everywhere(bed);
}

/// Waits until every router enforces as many policies as the API holds: an expected
/// matrix equal to the one before a change must not pass before the change is applied.
fn applied_everywhere(bed: &Bed) {
    let want = ok(
        bed.k
            .api
            .kubectl(&["get", "networkpolicies", "-A", "-o", "name"]),
        "listing policies",
    )
    .lines()
    .count() as u64;
    let deadline = Instant::now() + Duration::from_secs(10);
    for i in 0..3 {
        loop {
            let r: serde_json::Value = ok(bed.k.c.http_get(i, "/report"), "report")
                .json()
                .unwrap_or_default();
            if r["NetworkPolicy"]["Policies"].as_u64() == Some(want) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "node {i} applies {want} policies: {}",
                r["NetworkPolicy"]
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

fn np(ns: &str, name: &str, spec: &str) -> String {
    format!("apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: {name}, namespace: \"{ns}\"}}\nspec:\n{spec}")
}

fn the_kubernetes_e2e_netpol_cases_on_three_nodes() {
    let bed = bed();
    let open = Reach::all(true);
    expect(&bed, "no policy: everything open", P::Tcp, 80, &open);

    let mut cases: BTreeSet<&str> = BTreeSet::new();
    let mut case = |name: &'static str, policies: &[String], checks: &[(P, u16, Reach)]| {
        for p in policies {
            apply(&bed, p);
        }
        for (proto, port, want) in checks {
            expect(&bed, name, *proto, *port, want);
        }
        clean(&bed);
        cases.insert(name);
    };

    case(
        "should support a 'default-deny-ingress' policy",
        &[np(
            "x",
            "deny-ingress",
            "  podSelector: {}\n  policyTypes: [Ingress]\n",
        )],
        &[(P::Tcp, 80, Reach::all(true).set("*", "x/*", false))],
    );
    case(
        "should support a 'default-deny-all' policy",
        &[np(
            "x",
            "deny-all",
            "  podSelector: {}\n  policyTypes: [Ingress, Egress]\n",
        )],
        &[(
            P::Tcp,
            80,
            Reach::all(true)
                .set("*", "x/*", false)
                .set("x/*", "*", false),
        )],
    );
    case(
        "should enforce policy to allow traffic from pods within server namespace based on PodSelector",
        &[np("x", "x-a-allows-x-b", "  podSelector: {matchLabels: {pod: a}}\n  ingress:\n  - from: [{podSelector: {matchLabels: {pod: b}}}]\n")],
        &[(P::Tcp, 80, Reach::all(true).set("*", "x/a", false).set("x/b", "x/a", true))],
    );
    case(
        "should enforce policy to allow ingress traffic for a target",
        &[
            np("x", "deny-all", "  podSelector: {}\n  ingress: []\n"),
            np("x", "allow-all-to-a", "  podSelector: {matchLabels: {pod: a}}\n  ingress:\n  - from: [{podSelector: {}, namespaceSelector: {}}]\n"),
        ],
        &[(P::Tcp, 80, Reach::all(true).set("*", "x/b", false).set("*", "x/c", false))],
    );
    case(
        "should enforce policy to allow traffic only from a different namespace, based on NamespaceSelector",
        &[np("x", "allow-y", "  podSelector: {matchLabels: {pod: a}}\n  ingress:\n  - from: [{namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: \"y\"}}}]\n")],
        &[(P::Tcp, 80, Reach::all(true).set("x/*", "x/a", false).set("z/*", "x/a", false))],
    );
    case(
        "should enforce policy based on PodSelector with MatchExpressions",
        &[np("x", "x-a-allows-x-b", "  podSelector: {matchLabels: {pod: a}}\n  ingress:\n  - from: [{podSelector: {matchExpressions: [{key: pod, operator: In, values: [b]}]}}]\n")],
        &[(P::Tcp, 80, Reach::all(true).set("*", "x/a", false).set("x/b", "x/a", true))],
    );
    case(
        "should enforce policy based on PodSelector or NamespaceSelector",
        &[np("x", "or", "  podSelector: {matchLabels: {pod: a}}\n  ingress:\n  - from:\n    - namespaceSelector: {matchExpressions: [{key: kubernetes.io/metadata.name, operator: NotIn, values: [\"x\"]}]}\n    - podSelector: {matchLabels: {pod: b}}\n")],
        &[(P::Tcp, 80, Reach::all(true).set("x/c", "x/a", false))],
    );
    case(
        "should enforce policy based on PodSelector and NamespaceSelector",
        &[np("x", "and", "  podSelector: {matchLabels: {pod: a}}\n  ingress:\n  - from:\n    - namespaceSelector: {matchExpressions: [{key: kubernetes.io/metadata.name, operator: NotIn, values: [\"x\"]}]}\n      podSelector: {matchLabels: {pod: b}}\n")],
        &[(P::Tcp, 80, Reach::all(true).set("*", "x/a", false).set("y/b", "x/a", true).set("z/b", "x/a", true))],
    );
    case(
        "should enforce policy based on Ports",
        &[np("x", "allow-81-from-y", "  podSelector: {matchLabels: {pod: a}}\n  ingress:\n  - from: [{namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: \"y\"}}}]\n    ports: [{port: 81, protocol: TCP}]\n")],
        &[
            (P::Tcp, 81, Reach::all(true).set("x/*", "x/a", false).set("z/*", "x/a", false)),
            (P::Tcp, 80, Reach::all(true).set("*", "x/a", false)),
        ],
    );
    case(
        "should allow ingress access on one named port",
        &[np(
            "x",
            "allow-81-named",
            "  podSelector: {}\n  ingress:\n  - ports: [{port: serve-81-tcp}]\n",
        )],
        &[
            (P::Tcp, 81, Reach::all(true)),
            (P::Tcp, 80, Reach::all(true).set("*", "x/*", false)),
        ],
    );
    case(
        "should allow egress access on one named port",
        &[np("x", "allow-egress-80-named", "  podSelector: {}\n  policyTypes: [Egress]\n  egress:\n  - ports: [{port: serve-80-tcp}]\n")],
        &[
            (P::Tcp, 80, Reach::all(true)),
            (P::Tcp, 81, Reach::all(true).set("x/*", "*", false)),
        ],
    );
    case(
        "should work with Ingress, Egress specified together",
        &[np("x", "both", "  podSelector: {matchLabels: {pod: a}}\n  policyTypes: [Ingress, Egress]\n  ingress:\n  - from: [{podSelector: {matchLabels: {pod: b}}}]\n  egress:\n  - ports: [{port: 80}]\n")],
        &[
            (P::Tcp, 80, Reach::all(true).set("*", "x/a", false).set("x/b", "x/a", true)),
            (P::Tcp, 81, Reach::all(true).set("*", "x/a", false).set("x/a", "*", false).set("x/b", "x/a", true)),
        ],
    );
    case(
        "should support denying of egress traffic on the client side (even if the server explicitly allows this traffic)",
        &[
            np("x", "x-a-egress-to-y-a", "  podSelector: {matchLabels: {pod: a}}\n  policyTypes: [Egress]\n  egress:\n  - to: [{namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: \"y\"}}, podSelector: {matchLabels: {pod: a}}}]\n"),
            np("y", "y-a-from-x-a", "  podSelector: {matchLabels: {pod: a}}\n  ingress:\n  - from: [{namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: \"x\"}}, podSelector: {matchLabels: {pod: a}}}]\n"),
            np("y", "y-b-from-x-a", "  podSelector: {matchLabels: {pod: b}}\n  ingress:\n  - from: [{namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: \"x\"}}, podSelector: {matchLabels: {pod: a}}}]\n"),
        ],
        &[(P::Tcp, 80, Reach::all(true)
            .set("x/a", "*", false).set("x/a", "y/a", true)
            .set("*", "y/a", false).set("x/a", "y/a", true)
            .set("*", "y/b", false))],
    );
    case(
        "should deny egress from all pods in a namespace",
        &[np(
            "x",
            "deny-egress",
            "  podSelector: {}\n  policyTypes: [Egress]\n",
        )],
        &[(P::Tcp, 80, Reach::all(true).set("x/*", "*", false))],
    );
    let yb = bed.pods["y/b"].addr;
    case(
        "should allow egress access to server in CIDR block",
        &[np("x", "to-y-b", &format!("  podSelector: {{matchLabels: {{pod: a}}}}\n  policyTypes: [Egress]\n  egress:\n  - to: [{{ipBlock: {{cidr: {yb}/32}}}}]\n"))],
        &[(P::Tcp, 80, Reach::all(true).set("x/a", "*", false).set("x/a", "y/b", true))],
    );
    let xb = bed.pods["x/b"].addr;
    case(
        "should enforce except clause while egress access to server in CIDR block",
        &[np("x", "except-x-b", &format!("  podSelector: {{matchLabels: {{pod: a}}}}\n  policyTypes: [Egress]\n  egress:\n  - to: [{{ipBlock: {{cidr: 192.0.0.0/4, except: [{xb}/32]}}}}]\n"))],
        &[(P::Tcp, 80, Reach::all(true).set("x/a", "x/b", false))],
    );
    case(
        "should ensure an IP overlapping both IPBlock.CIDR and IPBlock.Except is allowed",
        &[
            np("x", "except-x-b", &format!("  podSelector: {{matchLabels: {{pod: a}}}}\n  policyTypes: [Egress]\n  egress:\n  - to: [{{ipBlock: {{cidr: 192.0.0.0/4, except: [{xb}/32]}}}}]\n")),
            np("x", "allow-x-b", &format!("  podSelector: {{matchLabels: {{pod: a}}}}\n  policyTypes: [Egress]\n  egress:\n  - to: [{{ipBlock: {{cidr: {xb}/32}}}}]\n")),
        ],
        &[(P::Tcp, 80, Reach::all(true))],
    );
    case(
        "should enforce multiple, stacked policies with overlapping podSelectors",
        &[
            np("x", "allow-81", "  podSelector: {matchLabels: {pod: a}}\n  ingress:\n  - from: [{namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: \"y\"}}}]\n    ports: [{port: 81}]\n"),
            np("x", "allow-80", "  podSelector: {matchLabels: {pod: a}}\n  ingress:\n  - from: [{namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: \"y\"}}}]\n    ports: [{port: 80}]\n"),
        ],
        &[
            (P::Tcp, 80, Reach::all(true).set("x/*", "x/a", false).set("z/*", "x/a", false)),
            (P::Tcp, 81, Reach::all(true).set("x/*", "x/a", false).set("z/*", "x/a", false)),
        ],
    );
    case(
        "should support an 'allow-all' policy",
        &[np(
            "x",
            "allow-all",
            "  podSelector: {}\n  ingress:\n  - {}\n",
        )],
        &[
            (P::Tcp, 80, Reach::all(true)),
            (P::Tcp, 81, Reach::all(true)),
        ],
    );
    case(
        "should enforce ingress policy allowing any port traffic to a server on a specific protocol",
        &[np("x", "tcp-only", "  podSelector: {matchLabels: {pod: a}}\n  ingress:\n  - ports: [{protocol: TCP}]\n")],
        &[
            (P::Tcp, 80, Reach::all(true)),
            (P::Udp, 80, Reach::all(true).set("*", "x/a", false)),
        ],
    );
    case(
        "should not mistakenly treat 'protocol: SCTP' as 'protocol: TCP', even if the plugin doesn't support SCTP",
        &[
            np("x", "deny-ingress", "  podSelector: {}\n  ingress: []\n"),
            np("x", "sctp-81", "  podSelector: {matchLabels: {pod: a}}\n  ingress:\n  - ports: [{port: 81, protocol: SCTP}]\n"),
        ],
        &[(P::Tcp, 81, Reach::all(true).set("*", "x/*", false))],
    );
    case(
        "should not allow access by TCP when a policy specifies only UDP",
        &[np("x", "udp-81", "  podSelector: {matchLabels: {pod: a}}\n  ingress:\n  - ports: [{port: 81, protocol: UDP}]\n")],
        &[
            (P::Tcp, 81, Reach::all(true).set("*", "x/a", false)),
            (P::Udp, 81, Reach::all(true)),
        ],
    );
    case(
        "UDP: should support a 'default-deny-ingress' policy",
        &[np(
            "x",
            "deny-ingress",
            "  podSelector: {}\n  ingress: []\n",
        )],
        &[(P::Udp, 80, Reach::all(true).set("*", "x/*", false))],
    );
    case(
        "UDP: should enforce policy based on Ports",
        &[np("x", "udp-81-from-y", "  podSelector: {matchLabels: {pod: a}}\n  ingress:\n  - from: [{namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: \"y\"}}}]\n    ports: [{port: 81, protocol: UDP}]\n")],
        &[(P::Udp, 81, Reach::all(true).set("x/*", "x/a", false).set("z/*", "x/a", false))],
    );
    case(
        "SCTP: should support a 'default-deny-ingress' policy",
        &[np(
            "x",
            "deny-ingress",
            "  podSelector: {}\n  ingress: []\n",
        )],
        &[(P::Sctp, 80, Reach::all(true).set("*", "x/*", false))],
    );
    case(
        "SCTP: should enforce policy based on Ports",
        &[np("x", "sctp-81-from-y", "  podSelector: {matchLabels: {pod: a}}\n  ingress:\n  - from: [{namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: \"y\"}}}]\n    ports: [{port: 81, protocol: SCTP}]\n")],
        &[
            (P::Sctp, 81, Reach::all(true).set("x/*", "x/a", false).set("z/*", "x/a", false)),
            (P::Tcp, 81, Reach::all(true).set("*", "x/a", false)),
        ],
    );

    // Updates: the same policy changed, a pod relabelled, a namespace relabelled, a policy
    // deleted.
    apply(
        &bed,
        &np("x", "allow-all", "  podSelector: {}\n  ingress:\n  - {}\n"),
    );
    expect(
        &bed,
        "should enforce updated policy (before)",
        P::Tcp,
        81,
        &Reach::all(true),
    );
    apply(
        &bed,
        &np("x", "allow-all", "  podSelector: {}\n  ingress: []\n"),
    );
    expect(
        &bed,
        "should enforce updated policy",
        P::Tcp,
        81,
        &Reach::all(true).set("*", "x/*", false),
    );
    clean(&bed);
    cases.insert("should enforce updated policy");

    apply(&bed, &np("x", "from-updated-pod", "  podSelector: {matchLabels: {pod: a}}\n  ingress:\n  - from: [{podSelector: {matchLabels: {pod: b, pod2: updated}}}]\n"));
    expect(
        &bed,
        "should allow ingress access from updated pod (before)",
        P::Tcp,
        80,
        &Reach::all(true).set("*", "x/a", false),
    );
    ok(
        bed.k
            .api
            .kubectl(&["-n", "x", "label", "pod", "b", "pod2=updated"]),
        "label",
    );
    expect(
        &bed,
        "should allow ingress access from updated pod",
        P::Tcp,
        80,
        &Reach::all(true)
            .set("*", "x/a", false)
            .set("x/b", "x/a", true),
    );
    ok(
        bed.k
            .api
            .kubectl(&["-n", "x", "label", "pod", "b", "pod2-"]),
        "unlabel",
    );
    clean(&bed);
    cases.insert("should allow ingress access from updated pod");

    apply(&bed, &np("x", "from-updated-ns", "  podSelector: {matchLabels: {pod: a}}\n  ingress:\n  - from: [{namespaceSelector: {matchLabels: {ns2: updated}}}]\n"));
    expect(
        &bed,
        "should allow ingress access from updated namespace (before)",
        P::Tcp,
        80,
        &Reach::all(true).set("*", "x/a", false),
    );
    ok(
        bed.k
            .api
            .kubectl(&["label", "namespace", "y", "ns2=updated"]),
        "label ns",
    );
    expect(
        &bed,
        "should allow ingress access from updated namespace",
        P::Tcp,
        80,
        &Reach::all(true)
            .set("*", "x/a", false)
            .set("y/*", "x/a", true),
    );
    ok(
        bed.k.api.kubectl(&["label", "namespace", "y", "ns2-"]),
        "unlabel ns",
    );
    clean(&bed);
    cases.insert("should allow ingress access from updated namespace");

    apply(
        &bed,
        &np(
            "x",
            "isolate-target",
            "  podSelector: {matchLabels: {target: isolated}}\n  ingress: []\n",
        ),
    );
    expect(
        &bed,
        "should deny ingress access to updated pod (before)",
        P::Tcp,
        80,
        &Reach::all(true),
    );
    ok(
        bed.k
            .api
            .kubectl(&["-n", "x", "label", "pod", "a", "target=isolated"]),
        "label",
    );
    expect(
        &bed,
        "should deny ingress access to updated pod",
        P::Tcp,
        80,
        &Reach::all(true).set("*", "x/a", false),
    );
    ok(
        bed.k
            .api
            .kubectl(&["-n", "x", "label", "pod", "a", "target-"]),
        "unlabel",
    );
    clean(&bed);
    cases.insert("should deny ingress access to updated pod");

    apply(
        &bed,
        &np(
            "x",
            "deny-all",
            "  podSelector: {}\n  policyTypes: [Ingress, Egress]\n",
        ),
    );
    expect(
        &bed,
        "should stop enforcing policies after they are deleted (before)",
        P::Tcp,
        80,
        &Reach::all(true)
            .set("*", "x/*", false)
            .set("x/*", "*", false),
    );
    clean(&bed);
    expect(
        &bed,
        "should stop enforcing policies after they are deleted",
        P::Tcp,
        80,
        &Reach::all(true),
    );
    cases.insert("should stop enforcing policies after they are deleted");

    // A policy weft can apply only in part (an IPv6 ipBlock in an IPv4 overlay): the rest
    // of it is enforced, and the API carries a Warning Event saying what was not.
    apply(&bed, &np("x", "half-v6", "  podSelector: {matchLabels: {pod: a}}\n  ingress:\n  - from: [{ipBlock: {cidr: \"fd00::/8\"}}, {podSelector: {matchLabels: {pod: b}}}]\n"));
    expect(
        &bed,
        "a policy with an IPv6 ipBlock: the rest enforced",
        P::Tcp,
        80,
        &Reach::all(true)
            .set("*", "x/a", false)
            .set("x/b", "x/a", true),
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    let event = loop {
        let ev: serde_json::Value = ok(
            bed.k.api.kubectl_json(&["-n", "x", "get", "events"]),
            "events",
        );
        let found = ev["items"].as_array().into_iter().flatten().find(|e| {
            e["reason"] == "PolicyNotFullyApplied" && e["involvedObject"]["name"] == "half-v6"
        });
        if let Some(e) = found {
            break e.clone();
        }
        assert!(
            Instant::now() < deadline,
            "no Event on NetworkPolicy x/half-v6: {ev}"
        );
        std::thread::sleep(Duration::from_millis(300));
    };
    eprintln!(
        "Event on x/half-v6: {} {}: {}",
        event["type"],
        event["reason"],
        event["message"]
            .as_str()
            .or(event["note"].as_str())
            .unwrap_or("")
    );
    let r: serde_json::Value = ok(bed.k.c.http_get(0, "/report"), "report")
        .json()
        .unwrap_or_default();
    assert!(
        r["NetworkPolicy"]["Errors"].as_u64().unwrap_or(0) >= 1,
        "{}",
        r["NetworkPolicy"]
    );
    clean(&bed);
    cases.insert(
        "a policy weft enforces in part: the rest enforced, a Warning Event, an error counted",
    );

    let left = weave_npc_leftovers(&bed.k.c.nodes[0].ns);
    assert!(left.is_empty(), "weave-npc's leftovers on n1: {left:?}");
    eprintln!("n1's weave-npc leftovers ({} iptables rules and chains, 1 ipset) were removed at take-over; every case passed across it", WEAVE_NPC_RULES.len());
    eprintln!("{} cases passed on 3 nodes:", cases.len());
    for c in &cases {
        eprintln!("  PASS {c}");
    }
}

fn main() {
    harness::run(vec![harness::root_with(
        "the_kubernetes_e2e_netpol_cases_on_three_nodes",
        &["etcd", "kubectl", "openssl", "iptables", "ipset"],
        the_kubernetes_e2e_netpol_cases_on_three_nodes,
    )]);
}
