//! weft on a Kubernetes cluster of real parts (`deploy/local/cluster.sh`): Kubernetes
//! 1.20.2 built from Debian's source package — kube-apiserver with RBAC, controller-manager
//! and scheduler in a control-plane namespace, and three worker nodes, each a network and
//! mount namespace with its own containerd, kubelet and kube-proxy (iptables mode). weft
//! is installed by `kubectl apply -f deploy/weft.yaml`: the DaemonSet controller makes its
//! pods, the kubelets run the init container that installs the plugin into each node's
//! own /opt/cni/bin, probe the router, and call weft-cni through containerd for every pod.
//!
//! Kubernetes 1.20 is old (EKS runs 1.31+); what is tested here did not change since: the
//! kubelet -> containerd -> CNI contract, the DaemonSet controller and rolling updates,
//! probes, hostPaths, RBAC, Services through kube-proxy's iptables, Node deletion.
//!
//! The tests share one cluster and run in order (later ones build on earlier ones' pods and
//! end with a node failure); the encrypted data path gets a cluster of its own at the end.
//! Needs root and what `.ci/run` installs; builds the Kubernetes parts on first use
//! (`deploy/local/build-k8s.sh`, cached under /var/cache/weft/k8s).

use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddrV4, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant};
use weft_testbed::local::LocalCluster;
use weft_testbed::{harness, http_in_netns, spawn_in_netns};

const NODES: usize = 3;
const NAME: &str = "lc";
const ENCRYPTED_NAME: &str = "lcenc";
const PROGRAMS: &[&str] = &[
    "containerd",
    "runc",
    "buildah",
    "nsenter",
    "iptables",
    "conntrack",
    "etcd",
    "kubectl",
    "jq",
];

fn ok<T, E: std::fmt::Display>(r: Result<T, E>, what: &str) -> T {
    r.unwrap_or_else(|e| panic!("{what}: {e}"))
}

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

// ---------------------------------------------------------------------------------------
// The shared cluster, brought up by the first test that needs it.

static SHARED: Mutex<Option<Result<LocalCluster, String>>> = Mutex::new(None);

fn with_cluster<T>(f: impl FnOnce(&mut LocalCluster) -> T) -> T {
    let mut guard = SHARED.lock().unwrap_or_else(|e| e.into_inner());
    if guard.is_none() {
        *guard = Some(LocalCluster::up(&repo(), NAME, NODES, &[]).map_err(|e| e.to_string()));
    }
    match guard.as_mut().expect("set above") {
        Ok(c) => {
            // A failed assertion shows the cluster's state before the next test runs.
            let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(c)));
            match outcome {
                Ok(v) => v,
                Err(p) => {
                    eprintln!("{}", c.diagnostics());
                    std::panic::resume_unwind(p)
                }
            }
        }
        Err(e) => panic!("the local cluster did not come up: {e}"),
    }
}

fn teardown_shared() {
    let taken = SHARED.lock().unwrap_or_else(|e| e.into_inner()).take();
    if let Some(Ok(c)) = taken {
        if let Err(e) = c.down() {
            eprintln!("taking the local cluster down: {e}");
        }
    }
}

// ---------------------------------------------------------------------------------------
// Pods and what they see.

#[derive(Debug, Clone)]
struct PodInfo {
    name: String,
    node: String,
    ip: Ipv4Addr,
}

fn pods(c: &LocalCluster, selector: &str) -> Vec<PodInfo> {
    let v = ok(
        c.kubectl_json(&["get", "pods", "-l", selector]),
        "kubectl get pods",
    );
    v["items"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .filter(|p| p["metadata"]["deletionTimestamp"].is_null())
        .map(|p| PodInfo {
            name: p["metadata"]["name"].as_str().unwrap_or("").to_string(),
            node: p["spec"]["nodeName"].as_str().unwrap_or("").to_string(),
            ip: p["status"]["podIP"]
                .as_str()
                .and_then(|s| s.parse().ok())
                .unwrap_or(Ipv4Addr::UNSPECIFIED),
        })
        .collect()
}

fn node_index(node: &str) -> usize {
    ok(
        node.trim_start_matches("node").parse::<usize>(),
        "node name nodeN",
    )
}

fn wait_ready(c: &LocalCluster, selector: &str, count: usize, timeout: Duration) -> Vec<PodInfo> {
    ok(
        c.wait(&format!("{count} pods {selector} Ready"), timeout, || {
            let v = c.kubectl_json(&["get", "pods", "-l", selector])?;
            let items = v["items"].as_array().cloned().unwrap_or_default();
            let ready = items
                .iter()
                .filter(|p| {
                    p["metadata"]["deletionTimestamp"].is_null()
                        && p["status"]["conditions"].as_array().is_some_and(|cs| {
                            cs.iter()
                                .any(|c| c["type"] == "Ready" && c["status"] == "True")
                        })
                })
                .count();
            Ok((ready == count && items.len() == count).then_some(()))
        }),
        "pods ready",
    );
    pods(c, selector)
}

/// A pod serving HTTP on 8080 (`/cgi-bin/who` answers "<pod> <client address>").
fn web_pod(name: &str, node: &str, labels: &[(&str, &str)]) -> String {
    let labels: String = labels
        .iter()
        .map(|(k, v)| format!("    {k}: \"{v}\"\n"))
        .collect();
    format!(
        r#"apiVersion: v1
kind: Pod
metadata:
  name: {name}
  labels:
{labels}spec:
  nodeSelector: {{kubernetes.io/hostname: {node}}}
  terminationGracePeriodSeconds: 1
  containers:
  - name: web
    image: localhost/busybox:test
    imagePullPolicy: Never
    command: ["httpd", "-f", "-p", "8080", "-h", "/www"]
    ports: [{{containerPort: 8080, name: http}}]
"#
    )
}

/// Strips what busybox's httpd puts around an IPv4 client address (`[::ffff:a.b.c.d]`).
fn plain_addr(s: &str) -> String {
    s.trim_matches(|c| c == '[' || c == ']')
        .trim_start_matches("::ffff:")
        .to_string()
}

/// From `pod`, GET /cgi-bin/who of each target (`ip:port`): per target, the answering
/// pod's name and the client address it saw, or `None` when nothing answered.
fn who_from(
    c: &LocalCluster,
    pod: &str,
    targets: &[String],
) -> BTreeMap<String, Option<(String, String)>> {
    let script = format!(
        r#"for t in {}; do
  a=$(printf 'GET /cgi-bin/who HTTP/1.0\r\n\r\n' | nc -w 3 ${{t%:*}} ${{t#*:}} 2>/dev/null | tail -n 1)
  echo "$t $a"
done"#,
        targets.join(" ")
    );
    let out = ok(c.exec(pod, &["sh", "-c", &script]), "exec who loop");
    let mut seen = BTreeMap::new();
    for line in out.lines() {
        let mut f = line.split_whitespace();
        let Some(t) = f.next() else { continue };
        let answer = match (f.next(), f.next()) {
            (Some(name), Some(addr)) => Some((name.to_string(), plain_addr(addr))),
            _ => None,
        };
        seen.insert(t.to_string(), answer);
    }
    for t in targets {
        seen.entry(t.clone()).or_insert(None);
    }
    seen
}

/// Addresses a node's weft holds (`GET /ip` on the node's loopback), with their ids.
fn allocations(c: &LocalCluster, node: usize) -> BTreeMap<Ipv4Addr, String> {
    let r = ok(
        http_in_netns(
            &c.node_netns(node),
            "GET",
            weft_testbed::HTTP_ADDR,
            "/ip",
            Duration::from_secs(5),
        ),
        "GET /ip",
    );
    let v = ok(r.json(), "GET /ip JSON");
    let mut out = BTreeMap::new();
    for o in v["owned"].as_array().cloned().unwrap_or_default() {
        for a in o["addrs"].as_array().cloned().unwrap_or_default() {
            if let Some(ip) = a.as_str().and_then(|s| s.split('/').next()?.parse().ok()) {
                out.insert(ip, o["containerid"].as_str().unwrap_or("").to_string());
            }
        }
    }
    out
}

/// Pod addresses on `node` the API knows (not host-network pods), and what weft holds
/// there besides the node's own `weave:expose`: they must be the same set.
fn api_and_weft_addresses(
    c: &LocalCluster,
    node: usize,
) -> (BTreeSet<Ipv4Addr>, BTreeSet<Ipv4Addr>) {
    let v = ok(
        c.kubectl_json(&[
            "get",
            "pods",
            "-A",
            "--field-selector",
            &format!("spec.nodeName=node{node}"),
        ]),
        "pods on node",
    );
    let api: BTreeSet<Ipv4Addr> = v["items"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .filter(|p| p["spec"]["hostNetwork"] != true)
        .filter_map(|p| p["status"]["podIP"].as_str()?.parse().ok())
        .collect();
    let weft: BTreeSet<Ipv4Addr> = allocations(c, node)
        .into_iter()
        .filter(|(_, id)| id != "weave:expose")
        .map(|(ip, _)| ip)
        .collect();
    (api, weft)
}

/// Listens on the outside host; answers each connection with "outside <peer address>"
/// and returns the peers it saw.
fn outside_listener(
    c: &LocalCluster,
    port: u16,
    window: Duration,
) -> std::thread::JoinHandle<weft_testbed::Result<Vec<Ipv4Addr>>> {
    let (ns, ip) = c.outside();
    ok(
        spawn_in_netns(&ns, move || {
            let l = TcpListener::bind(SocketAddrV4::new(ip, port))
                .map_err(|e| weft_testbed::TestbedError::Failed(format!("bind: {e}")))?;
            l.set_nonblocking(true).ok();
            let end = Instant::now() + window;
            let mut peers = Vec::new();
            while Instant::now() < end {
                match l.accept() {
                    Ok((mut s, peer)) => {
                        s.set_nonblocking(false).ok();
                        s.set_read_timeout(Some(Duration::from_secs(2))).ok();
                        let mut line = String::new();
                        let _ = BufReader::new(&s).read_line(&mut line);
                        let _ = writeln!(s, "outside {}", peer.ip());
                        if let std::net::IpAddr::V4(a) = peer.ip() {
                            peers.push(a);
                        }
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
            Ok(peers)
        }),
        "outside listener",
    )
}

/// From the outside host, GET /cgi-bin/who at `addr`: the answer's last line.
fn who_from_outside(c: &LocalCluster, addr: SocketAddrV4) -> String {
    let (ns, _) = c.outside();
    ok(who_from_netns(&ns, addr), "HTTP from the outside host")
}

/// From a namespace of the machine (a node's, the outside host's), GET /cgi-bin/who.
fn who_from_netns(ns: &str, addr: SocketAddrV4) -> weft_testbed::Result<String> {
    let body = weft_testbed::in_netns(ns, move || {
        let mut s = TcpStream::connect_timeout(&addr.into(), Duration::from_secs(5))
            .map_err(|e| weft_testbed::TestbedError::Failed(format!("connect {addr}: {e}")))?;
        s.set_read_timeout(Some(Duration::from_secs(5))).ok();
        s.write_all(b"GET /cgi-bin/who HTTP/1.0\r\n\r\n").ok();
        let mut body = String::new();
        let _ = s.read_to_string(&mut body);
        Ok(body)
    })?;
    let last = body.lines().last().unwrap_or("").trim();
    Ok(match last.split_once(' ') {
        Some((name, addr)) => format!("{name} {}", plain_addr(addr)),
        None => last.to_string(),
    })
}

// ---------------------------------------------------------------------------------------
// The checks every data path must pass.

/// Every ordered pair of `web` pods talks over TCP, each seeing the other's own address.
fn every_pair_talks(c: &LocalCluster, what: &str) {
    let web = pods(c, "app=web");
    assert!(web.len() >= 6, "web pods: {web:?}");
    let targets: Vec<String> = web.iter().map(|p| format!("{}:8080", p.ip)).collect();
    let mut failures = Vec::new();
    let mut pairs = 0;
    for from in &web {
        let seen = who_from(c, &from.name, &targets);
        for to in web.iter().filter(|t| t.name != from.name) {
            pairs += 1;
            match &seen[&format!("{}:8080", to.ip)] {
                Some((name, addr)) if *name == to.name && *addr == from.ip.to_string() => {}
                other => failures.push(format!(
                    "{} ({}, {}) -> {} ({}, {}): {other:?}",
                    from.name, from.node, from.ip, to.name, to.node, to.ip
                )),
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{what}: {} of {pairs} pairs failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
    eprintln!("{what}: all {pairs} ordered pairs of web pods talk over TCP, no NAT between them");
}

/// A ClusterIP Service with endpoints on node1 and node2 reached from a pod on node3; a
/// NodePort from the outside host; a pod reaching itself through its Service.
fn services_work(c: &LocalCluster, what: &str) {
    let svc_ip = service_ip(c, "svc");
    let client = pods(c, "app=client").pop().expect("the client pod");
    let targets: Vec<String> = (0..20).map(|_| format!("{svc_ip}:80")).collect();
    // One target repeated: who_from keys by target, so ask one at a time.
    let mut answered = BTreeMap::<String, usize>::new();
    for t in targets.iter() {
        let seen = who_from(c, &client.name, std::slice::from_ref(t));
        match seen.into_values().next().flatten() {
            Some((name, addr)) => {
                assert_eq!(
                    addr,
                    client.ip.to_string(),
                    "{what}: {name} saw the client as {addr}, not its own address"
                );
                *answered.entry(name).or_default() += 1;
            }
            None => panic!("{what}: ClusterIP {svc_ip} did not answer {}", client.name),
        }
        if answered.len() == 2 {
            break;
        }
    }
    assert_eq!(
        answered.keys().cloned().collect::<Vec<_>>(),
        vec!["svc-a".to_string(), "svc-b".to_string()],
        "{what}: endpoints on node1 and node2 both answer through ClusterIP {svc_ip}"
    );
    eprintln!(
        "{what}: ClusterIP {svc_ip}:80 from {} on {}: answered by {answered:?}, source kept",
        client.name, client.node
    );

    let node_port = ok(
        c.kubectl(&[
            "get",
            "svc",
            "svc-np",
            "-o",
            "jsonpath={.spec.ports[0].nodePort}",
        ]),
        "nodePort",
    );
    let node_port: u16 = ok(node_port.trim().parse(), "nodePort number");
    // svc-np's one endpoint is svc-a on node1: node3 forwards it across the overlay.
    for node in [3usize, 1] {
        let addr = SocketAddrV4::new(c.node_ip(node), node_port);
        let answer = who_from_outside(c, addr);
        assert!(
            answer.starts_with("svc-a "),
            "{what}: NodePort {addr} from outside answered {answer:?}"
        );
        eprintln!("{what}: NodePort {addr} from the outside host: {answer}");
    }

    // A hostPort on node2 from outside: portmap's DNAT on the node, and the pod sees the
    // client's own address (nothing masquerades traffic to a pod on the same node).
    let (_, outside_ip) = c.outside();
    let addr = SocketAddrV4::new(c.node_ip(2), 30500);
    let answer = who_from_outside(c, addr);
    assert_eq!(
        answer,
        format!("hp {outside_ip}"),
        "{what}: hostPort {addr} from outside"
    );
    eprintln!("{what}: hostPort {addr} from the outside host: {answer}");

    let self_ip = service_ip(c, "self");
    let seen = who_from(c, "svc-a", &[format!("{self_ip}:80")]);
    let answer = seen.into_values().next().flatten();
    assert!(
        matches!(&answer, Some((name, _)) if name == "svc-a"),
        "{what}: svc-a through its own Service {self_ip}: {answer:?}"
    );
    eprintln!("{what}: svc-a reached itself through Service {self_ip}: {answer:?}");
}

fn service_ip(c: &LocalCluster, name: &str) -> String {
    ok(
        c.kubectl(&["get", "svc", name, "-o", "jsonpath={.spec.clusterIP}"]),
        "clusterIP",
    )
    .trim()
    .to_string()
}

const WEB_DEPLOYMENT: &str = r#"apiVersion: apps/v1
kind: Deployment
metadata: {name: web}
spec:
  replicas: 6
  selector: {matchLabels: {app: web}}
  template:
    metadata: {labels: {app: web}}
    spec:
      terminationGracePeriodSeconds: 1
      topologySpreadConstraints:
      - maxSkew: 1
        topologyKey: kubernetes.io/hostname
        whenUnsatisfiable: DoNotSchedule
        labelSelector: {matchLabels: {app: web}}
      containers:
      - name: web
        image: localhost/busybox:test
        imagePullPolicy: Never
        command: ["httpd", "-f", "-p", "8080", "-h", "/www"]
        ports: [{containerPort: 8080, name: http}]
"#;

fn services_yaml() -> String {
    let mut y = String::new();
    y.push_str(&web_pod("svc-a", "node1", &[("app", "svc"), ("self", "a")]));
    y.push_str("---\n");
    y.push_str(&web_pod("svc-b", "node2", &[("app", "svc")]));
    y.push_str("---\n");
    y.push_str(&web_pod("client", "node3", &[("app", "client")]));
    y.push_str("---\n");
    // A hostPort: containerd hands the mapping to portmap, chained after weft.
    y.push_str(
        &web_pod("hp", "node2", &[("app", "hp")])
            .replace("name: http}", "name: http, hostPort: 30500}"),
    );
    y.push_str(
        r#"---
apiVersion: v1
kind: Service
metadata: {name: svc}
spec:
  selector: {app: svc}
  ports: [{port: 80, targetPort: 8080}]
---
apiVersion: v1
kind: Service
metadata: {name: svc-np}
spec:
  type: NodePort
  selector: {self: a}
  ports: [{port: 80, targetPort: 8080}]
---
apiVersion: v1
kind: Service
metadata: {name: self}
spec:
  selector: {self: a}
  ports: [{port: 80, targetPort: 8080}]
"#,
    );
    y
}

/// The web Deployment, the Service pods and their Services, as the tests use them (each
/// test that uses them calls this, so any one runs alone; applying again changes nothing).
fn deploy_workloads(c: &LocalCluster) {
    // No policy left by a test that failed half-way changes what the next one sees.
    ok(
        c.kubectl(&["delete", "networkpolicy", "--all"]),
        "removing policies",
    );
    let _ = c.kubectl(&["label", "pod", "client", "role-"]);
    ok(c.apply(WEB_DEPLOYMENT), "applying the web Deployment");
    ok(c.apply(&services_yaml()), "applying the Service pods");
    wait_ready(c, "app=web", 6, Duration::from_secs(120));
    wait_ready(c, "app=svc", 2, Duration::from_secs(60));
    wait_ready(c, "app=client", 1, Duration::from_secs(60));
    wait_ready(c, "app=hp", 1, Duration::from_secs(60));
    // kube-proxy writes a Service's rules once its endpoints exist.
    ok(
        c.wait("Service endpoints", Duration::from_secs(30), || {
            let e = c.kubectl_json(&["get", "endpoints", "svc"])?;
            let n = e["subsets"][0]["addresses"]
                .as_array()
                .map(|a| a.len())
                .unwrap_or(0);
            Ok((n == 2).then_some(()))
        }),
        "endpoints",
    );
}

// ---------------------------------------------------------------------------------------
// The tests.

fn the_daemonset_runs_weft_on_every_node() {
    with_cluster(|c| {
        let ds = ok(
            c.kubectl_json(&["-n", "kube-system", "get", "daemonset", "weft"]),
            "the DaemonSet",
        );
        assert_eq!(ds["status"]["desiredNumberScheduled"], NODES, "{ds}");
        assert_eq!(ds["status"]["numberReady"], NODES, "{ds}");

        let v = ok(
            c.kubectl_json(&[
                "-n",
                "kube-system",
                "get",
                "pods",
                "-l",
                "app.kubernetes.io/name=weft",
            ]),
            "weft pods",
        );
        let items = v["items"].as_array().cloned().unwrap_or_default();
        let mut on: BTreeSet<String> = BTreeSet::new();
        for p in &items {
            let node = p["spec"]["nodeName"].as_str().unwrap_or("").to_string();
            assert_eq!(p["status"]["phase"], "Running", "{node}: {}", p["status"]);
            let init = &p["status"]["initContainerStatuses"][0];
            assert_eq!(init["name"], "install-cni");
            assert_eq!(
                init["state"]["terminated"]["exitCode"], 0,
                "{node}: install-cni {init}"
            );
            assert!(
                p["status"]["conditions"].as_array().is_some_and(|cs| cs
                    .iter()
                    .any(|c| c["type"] == "Ready" && c["status"] == "True")),
                "{node}: weft's pod not Ready"
            );
            on.insert(node);
        }
        assert_eq!(
            on,
            (1..=NODES).map(|i| format!("node{i}")).collect(),
            "one weft pod per node"
        );

        // The init container wrote into each node's own directories, through the hostPaths.
        let plugin = repo().join("target/x86_64-unknown-linux-gnu/release/weft-cni");
        let want = ok(std::fs::read(&plugin), "the image's weft-cni");
        for i in 1..=NODES {
            for name in ["weft", "weave-net"] {
                let path = c.node_dir(i).join("opt-cni-bin").join(name);
                let got = ok(std::fs::read(&path), &format!("node{i}'s {name}"));
                assert!(
                    got == want,
                    "node{i}: {} is not the image's weft-cni",
                    path.display()
                );
            }
            let conflist = ok(
                c.on_node(i, &["cat", "/etc/cni/net.d/10-weft.conflist"]),
                "the conflist, as the node sees it",
            );
            let conf: Value = ok(serde_json::from_str(&conflist), "conflist JSON");
            assert_eq!(conf["plugins"][0]["type"], "weft", "node{i}: {conf}");
            assert_eq!(conf["plugins"][1]["type"], "portmap", "node{i}: {conf}");
            // The router's state is the node's too, under the node's own /var/lib/weft.
            assert!(
                c.node_dir(i).join("var-lib-weft/weft.key").is_file(),
                "node{i}: no weft.key in its /var/lib/weft"
            );
        }

        let nodes = ok(c.kubectl_json(&["get", "nodes"]), "nodes");
        for n in nodes["items"].as_array().cloned().unwrap_or_default() {
            let name = n["metadata"]["name"].as_str().unwrap_or("").to_string();
            let conds = n["status"]["conditions"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            let cond = |t: &str| {
                conds
                    .iter()
                    .find(|c| c["type"] == t)
                    .cloned()
                    .unwrap_or(Value::Null)
            };
            assert_eq!(cond("Ready")["status"], "True", "{name}");
            assert_eq!(cond("NetworkUnavailable")["status"], "False", "{name}");
            assert_eq!(cond("NetworkUnavailable")["reason"], "WeftIsUp", "{name}");
        }

        // Three machines, three peer names (each from its own /etc/machine-id).
        let weft_pod = weft_pod_on(c, 1);
        let peers = ok(
            c.exec(
                &format!("kube-system/{weft_pod}"),
                &["/usr/bin/weft", "status", "peers"],
            ),
            "weft status peers",
        );
        let names: BTreeSet<&str> = peers
            .lines()
            .filter_map(|l| l.trim_start_matches(['-', '>', ' ']).split('(').next())
            .filter(|s| s.len() == 17)
            .collect();
        assert_eq!(names.len(), NODES, "peers as node1 sees them:\n{peers}");
        eprintln!(
            "{}",
            ok(c.kubectl(&["get", "pods", "-A", "-o", "wide"]), "pods")
        );
    })
}

fn weft_pod_on(c: &LocalCluster, node: usize) -> String {
    let v = ok(
        c.kubectl_json(&[
            "-n",
            "kube-system",
            "get",
            "pods",
            "-l",
            "app.kubernetes.io/name=weft",
            "--field-selector",
            &format!("spec.nodeName=node{node}"),
        ]),
        "weft pod",
    );
    v["items"][0]["metadata"]["name"]
        .as_str()
        .unwrap_or_else(|| panic!("no weft pod on node{node}"))
        .to_string()
}

fn kubelet_made_pods_get_unique_addresses_and_every_pair_talks() {
    with_cluster(|c| {
        deploy_workloads(c);
        let web = pods(c, "app=web");
        let range: ipnet::Ipv4Net = "192.168.0.0/16".parse().unwrap();
        let mut per_node = BTreeMap::<String, usize>::new();
        let ips: BTreeSet<Ipv4Addr> = web.iter().map(|p| p.ip).collect();
        assert_eq!(ips.len(), web.len(), "addresses unique: {web:?}");
        for p in &web {
            assert!(range.contains(&p.ip), "{p:?} outside 192.168.0.0/16");
            *per_node.entry(p.node.clone()).or_default() += 1;
            // What the kubelet reported is what the node's weft allocated.
            let held = allocations(c, node_index(&p.node));
            assert!(
                held.contains_key(&p.ip),
                "{p:?}: not held by {}'s weft: {held:?}",
                p.node
            );
        }
        assert_eq!(
            per_node.len(),
            NODES,
            "spread over every node: {per_node:?}"
        );
        eprintln!(
            "{}",
            ok(
                c.kubectl(&["get", "pods", "-o", "wide"]),
                "kubectl get pods -o wide"
            )
        );

        every_pair_talks(c, "user space");

        // Each pod reaches its own node (weft's metrics port, on the node's address).
        for p in &web {
            let node_ip = c.node_ip(node_index(&p.node));
            let fetch = || {
                c.exec(
                    &p.name,
                    &[
                        "sh",
                        "-c",
                        &format!(
                            "printf 'GET /metrics HTTP/1.0\\r\\n\\r\\n' | nc -w 3 {node_ip} 6782"
                        ),
                    ],
                )
            };
            // Retried for a while: a scrape can be slow on a loaded machine.
            let out = ok(
                c.wait("the node's metrics", Duration::from_secs(15), || {
                    Ok(fetch().ok().filter(|o| o.contains("weave_ips")))
                }),
                "pod to its node",
            );
            assert!(
                out.contains("weave_ips"),
                "{} to its node {node_ip}: {out:.200}",
                p.name
            );
        }

        // And a host outside the cluster, which has no route to the pod range: only the
        // node's masquerade brings the answer back.
        let (_, outside_ip) = c.outside();
        let listener = outside_listener(c, 7000, Duration::from_secs(20));
        std::thread::sleep(Duration::from_millis(300));
        let mut sources = BTreeMap::new();
        for p in &web {
            let out = ok(
                c.exec(
                    &p.name,
                    &["sh", "-c", &format!("echo hi | nc -w 3 {outside_ip} 7000")],
                ),
                "pod to outside",
            );
            let seen = out
                .trim()
                .strip_prefix("outside ")
                .unwrap_or("")
                .to_string();
            let node_ip = c.node_ip(node_index(&p.node)).to_string();
            assert_eq!(
                seen, node_ip,
                "{} -> outside seen as {out:?}, not as its node",
                p.name
            );
            sources.insert(p.name.clone(), seen);
        }
        drop(listener);
        eprintln!("pods to the outside host {outside_ip}, masqueraded: {sources:?}");
    })
}

fn services_through_kube_proxy() {
    with_cluster(|c| {
        deploy_workloads(c);
        services_work(c, "user space")
    })
}

// ---------------------------------------------------------------------------------------
// NetworkPolicy on kubelet-made pods (the full matrix of Kubernetes' e2e cases runs in
// tests/policy_e2e.rs against the real API server; here: policy as a cluster runs it).

const SVC_FROM_CLIENTS: &str = r#"apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: svc-from-clients}
spec:
  podSelector: {matchLabels: {app: svc}}
  ingress:
  - from: [{podSelector: {matchLabels: {role: client}}}]
    ports: [{port: http}]
"#;

/// The host's uptime: the clock /proc/uptime gives every pod too (one kernel).
fn uptime() -> f64 {
    std::fs::read_to_string("/proc/uptime")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(0.0)
}

/// Starts, in `pod`, a connection attempt to `target` every 100 ms for `secs` seconds,
/// each logged in /tmp/probe as "<uptime at its start> ok|fail".
fn start_probe(c: &LocalCluster, pod: &str, target: &str, expect: &str, secs: u32) {
    let (ip, port) = target.split_once(':').expect("ip:port");
    let n = secs * 10;
    let script = format!(
        "rm -f /tmp/probe; i=0; while [ $i -lt {n} ]; do read up _ </proc/uptime; \
         if printf 'GET /cgi-bin/who HTTP/1.0\\r\\n\\r\\n' | nc -w 1 {ip} {port} 2>/dev/null | grep -q {expect}; \
         then echo \"$up ok\"; else echo \"$up fail\"; fi >>/tmp/probe; usleep 100000; i=$((i+1)); done"
    );
    ok(
        c.exec(
            pod,
            &[
                "sh",
                "-c",
                &format!("({script}) </dev/null >/dev/null 2>&1 &"),
            ],
        ),
        "starting a probe",
    );
}

fn probe_log(c: &LocalCluster, pod: &str) -> Vec<(f64, bool)> {
    c.exec(pod, &["cat", "/tmp/probe"])
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let (t, r) = l.split_once(' ')?;
            Some((t.parse().ok()?, r == "ok"))
        })
        .collect()
}

fn label(c: &LocalCluster, pod: &str, kv: &str) {
    ok(
        c.kubectl(&["label", "--overwrite", "pod", pod, kv]),
        "labelling",
    );
}

/// One TCP attempt from `pod` to `target`: the answering pod's name, if any.
fn answered(c: &LocalCluster, pod: &str, target: &str) -> Option<String> {
    who_from(c, pod, &[target.to_string()])
        .into_values()
        .next()
        .flatten()
        .map(|(name, _)| name)
}

/// Policy in front of a Service: only pods labelled role=client reach the svc pods,
/// through the ClusterIP as directly, and a NodePort from outside is refused.
fn policy_basics(c: &LocalCluster, what: &str) {
    let svc_ip = service_ip(c, "svc");
    let svc_a = pods(c, "self=a").pop().expect("svc-a");
    ok(c.kubectl(&["label", "pod", "client", "role-"]), "unlabel");
    ok(c.apply(SVC_FROM_CLIENTS), "the policy");
    ok(
        c.wait("the policy enforced", Duration::from_secs(10), || {
            Ok(answered(c, "client", &format!("{}:8080", svc_a.ip))
                .is_none()
                .then_some(()))
        }),
        "enforced",
    );
    assert_eq!(
        answered(c, "client", &format!("{svc_ip}:80")),
        None,
        "{what}: ClusterIP"
    );
    label(c, "client", "role=client");
    let t0 = Instant::now();
    let name = ok(
        c.wait(
            "the relabelled client allowed",
            Duration::from_secs(10),
            || Ok(answered(c, "client", &format!("{svc_ip}:80"))),
        ),
        "allowed",
    );
    eprintln!(
        "{what}: svc-from-clients: client refused, then (labelled role=client) answered by {name} through the ClusterIP after {:.1} s",
        t0.elapsed().as_secs_f64()
    );
    ok(
        c.kubectl(&["delete", "networkpolicy", "svc-from-clients"]),
        "delete",
    );
    ok(c.kubectl(&["label", "pod", "client", "role-"]), "unlabel");
}

fn network_policy_on_kubelet_made_pods() {
    with_cluster(|c| {
        deploy_workloads(c);
        let svc_a = pods(c, "self=a").pop().expect("svc-a");
        let svc_ip = service_ip(c, "svc");
        let direct = format!("{}:8080", svc_a.ip);
        ok(c.kubectl(&["label", "pod", "client", "role-"]), "unlabel");
        assert!(answered(c, "client", &direct).is_some(), "no policy: open");

        // Created while traffic flows: enforced within a second.
        start_probe(c, "client", &direct, "svc-a", 4);
        std::thread::sleep(Duration::from_millis(1200));
        ok(c.apply(SVC_FROM_CLIENTS), "the policy");
        let t0 = uptime();
        std::thread::sleep(Duration::from_secs(4));
        let log = probe_log(c, "client");
        let last_ok = log
            .iter()
            .filter(|(_, ok)| *ok)
            .map(|(t, _)| *t)
            .fold(f64::MIN, f64::max);
        let after: Vec<_> = log.iter().filter(|(t, _)| *t > t0 + 1.0).collect();
        let first_refused = log
            .iter()
            .filter(|(t, ok)| !ok && *t > last_ok)
            .map(|(t, _)| *t)
            .next()
            .unwrap_or(f64::NAN);
        assert!(
            log.iter().any(|(t, ok)| *ok && *t < t0),
            "traffic flowed before: {log:?}"
        );
        assert!(
            !after.is_empty() && after.iter().all(|(_, ok)| !ok),
            "{log:?}"
        );
        assert!(
            last_ok < t0 + 1.0,
            "let through 1 s after the policy: {log:?}"
        );
        eprintln!(
            "policy created while a pod connects every 100 ms: the last connection let through started {:+.2} s from `kubectl apply` returning, the first refused {:+.2} s; all {} from 1 s on refused",
            last_ok - t0,
            first_refused - t0,
            after.len()
        );

        // A Service in front changes nothing: policy sees the pod behind the ClusterIP.
        assert_eq!(
            answered(c, "client", &format!("{svc_ip}:80")),
            None,
            "ClusterIP refused too"
        );
        let node_port: u16 = ok(
            ok(
                c.kubectl(&[
                    "get",
                    "svc",
                    "svc-np",
                    "-o",
                    "jsonpath={.spec.ports[0].nodePort}",
                ]),
                "np",
            )
            .trim()
            .parse(),
            "nodePort",
        );
        let (out_ns, _) = c.outside();
        let np = who_from_netns(&out_ns, SocketAddrV4::new(c.node_ip(3), node_port));
        assert!(
            np.map(|a| a.is_empty()).unwrap_or(true),
            "NodePort from outside refused"
        );

        // Why: Weave's line, the reason, the counter.
        let logs = ok(
            c.kubectl(&["-n", "kube-system", "logs", &weft_pod_on(c, 1)]),
            "weft logs",
        );
        let line = logs
            .lines()
            .find(|l| l.contains("blocked by Weave NPC.") && l.contains("svc-a"))
            .unwrap_or_else(|| panic!("no blocked-connection line:\n{logs}"));
        assert!(
            line.contains("isolated by default/svc-from-clients"),
            "{line}"
        );
        eprintln!("{line}");
        let m = ok(
            http_in_netns(
                &c.node_netns(1),
                "GET",
                "127.0.0.1:6781",
                "/metrics",
                Duration::from_secs(5),
            ),
            "npc metrics",
        );
        assert!(
            weft_testbed::metric_sum(
                &m.body,
                "weavenpc_blocked_connections_total",
                &[("protocol", "tcp"), ("dport", "8080")]
            ) > 0.0,
            "{}",
            m.body
        );
        let weft1 = format!("kube-system/{}", weft_pod_on(c, 1));
        let explain = ok(
            c.exec(
                &weft1,
                &[
                    "/usr/bin/weft",
                    "policy",
                    "explain",
                    "default/client",
                    "default/svc-a",
                    "8080/TCP",
                ],
            ),
            "explain",
        );
        assert!(
            explain.contains("DENIED") && explain.contains("default/svc-from-clients"),
            "{explain}"
        );
        eprintln!("weft policy explain default/client default/svc-a 8080/TCP:\n{explain}");

        // Relabelled, allowed within a second, through the Service as well.
        label(c, "client", "role=client");
        let t1 = Instant::now();
        ok(
            c.wait("allowed after relabelling", Duration::from_secs(5), || {
                Ok(answered(c, "client", &direct))
            }),
            "relabel",
        );
        eprintln!(
            "client labelled role=client: allowed after {:.2} s",
            t1.elapsed().as_secs_f64()
        );
        assert!(answered(c, "client", &format!("{svc_ip}:80")).is_some());
        let explain = ok(
            c.exec(
                &weft1,
                &[
                    "/usr/bin/weft",
                    "policy",
                    "explain",
                    "default/client",
                    "default/svc-a",
                    "8080/TCP",
                ],
            ),
            "explain",
        );
        assert!(explain.contains("ALLOWED"), "{explain}");
        eprintln!("after relabelling:\n{explain}");

        // Egress: the client may reach only the outside host's port 7000 (masqueraded on
        // the way out: policy sees the real destination first).
        ok(
            c.apply(
                r#"apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: client-egress}
spec:
  podSelector: {matchLabels: {app: client}}
  policyTypes: [Egress]
  egress:
  - to: [{ipBlock: {cidr: 172.31.250.0/24}}]
    ports: [{port: 7000}]
"#,
            ),
            "egress policy",
        );
        let (_, outside_ip) = c.outside();
        ok(
            c.wait("egress policy enforced", Duration::from_secs(10), || {
                Ok(answered(c, "client", &direct).is_none().then_some(()))
            }),
            "egress enforced",
        );
        let listener = outside_listener(c, 7000, Duration::from_secs(10));
        std::thread::sleep(Duration::from_millis(300));
        let out = ok(
            c.exec(
                "client",
                &["sh", "-c", &format!("echo hi | nc -w 3 {outside_ip} 7000")],
            ),
            "to outside",
        );
        assert!(
            out.starts_with("outside "),
            "client -> outside:7000 allowed: {out:?}"
        );
        drop(listener);
        ok(
            c.kubectl(&["delete", "networkpolicy", "client-egress"]),
            "delete egress",
        );

        // The router restarted (its pod deleted, the DaemonSet makes another): the table
        // stays, so a refused pod is refused throughout.
        ok(c.kubectl(&["label", "pod", "client", "role-"]), "unlabel");
        ok(
            c.wait("refused again", Duration::from_secs(10), || {
                Ok(answered(c, "client", &direct).is_none().then_some(()))
            }),
            "refused",
        );
        start_probe(c, "client", &direct, "svc-a", 25);
        let old = weft_pod_on(c, 1);
        ok(
            c.kubectl(&["-n", "kube-system", "delete", "pod", &old, "--wait=true"]),
            "restart",
        );
        ok(
            c.wait("weft back on node1", Duration::from_secs(90), || {
                let p = weft_pod_on(c, 1);
                Ok((p != old).then_some(()))
            }),
            "new pod",
        );
        ok(
            c.kubectl(&[
                "-n",
                "kube-system",
                "rollout",
                "status",
                "daemonset/weft",
                "--timeout=90s",
            ]),
            "ready",
        );
        let log = probe_log(c, "client");
        // A refused attempt takes its 1 s timeout: about one a second.
        assert!(log.len() >= 5, "{log:?}");
        assert!(
            log.iter().all(|(_, ok)| !ok),
            "a refused connection got through during the restart: {log:?}"
        );
        eprintln!("router on node1 restarted while client probed svc-a every 100 ms: {} attempts, all refused", log.len());
        label(c, "client", "role=client");
        ok(
            c.wait("allowed after the restart", Duration::from_secs(10), || {
                Ok(answered(c, "client", &direct))
            }),
            "after restart",
        );
        let table = ok(
            c.on_node(1, &["nft", "list", "table", "ip", "weft_policy"]),
            "nft list",
        );
        eprintln!("the policy table on node1:\n{table}");

        // Isolated before its containers start: a pod whose egress a policy denies tries to
        // connect the moment its container starts, and cannot.
        ok(
            c.apply(
                r#"apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: early-no-egress}
spec:
  podSelector: {matchLabels: {app: early}}
  policyTypes: [Egress]
"#,
            ),
            "deny-all egress",
        );
        std::thread::sleep(Duration::from_secs(1));
        let early = format!(
            r#"apiVersion: v1
kind: Pod
metadata: {{name: early, labels: {{app: early}}}}
spec:
  nodeSelector: {{kubernetes.io/hostname: node2}}
  terminationGracePeriodSeconds: 1
  containers:
  - name: c
    image: localhost/busybox:test
    imagePullPolicy: Never
    command: ["sh", "-c", "if printf 'GET /cgi-bin/who HTTP/1.0\r\n\r\n' | nc -w 2 {} 8080 2>/dev/null | grep -q svc-a; then echo LEAKED; else echo ISOLATED; fi; sleep 3600"]
"#,
            svc_a.ip
        );
        ok(c.apply(&early), "the early pod");
        wait_ready(c, "app=early", 1, Duration::from_secs(60));
        let said = ok(
            c.wait(
                "the early pod's first attempt",
                Duration::from_secs(20),
                || {
                    let l = c.kubectl(&["logs", "early"])?;
                    Ok((!l.trim().is_empty()).then_some(l))
                },
            ),
            "early logs",
        );
        assert!(
            said.lines().any(|l| l.trim() == "ISOLATED") && !said.contains("LEAKED"),
            "the first connection at container start: {said}"
        );
        eprintln!(
            "a pod whose egress is denied, connecting as its container starts: {}",
            said.trim()
        );
        ok(
            c.kubectl(&["delete", "pod", "early", "--wait=false"]),
            "delete early",
        );
        ok(
            c.kubectl(&["delete", "networkpolicy", "early-no-egress"]),
            "delete policy",
        );
        ok(
            c.kubectl(&["delete", "networkpolicy", "svc-from-clients"]),
            "delete",
        );
        ok(c.kubectl(&["label", "pod", "client", "role-"]), "unlabel");
    })
}

fn deleting_pods_frees_their_addresses() {
    with_cluster(|c| {
        deploy_workloads(c);
        let web = pods(c, "app=web");
        let victim = web
            .iter()
            .find(|p| p.node == "node1")
            .expect("a web pod on node1")
            .clone();
        ok(
            c.kubectl(&["delete", "pod", &victim.name, "--wait=true"]),
            "deleting a pod",
        );
        ok(
            c.wait(
                "the deleted pod's address freed",
                Duration::from_secs(30),
                || Ok((!allocations(c, 1).contains_key(&victim.ip)).then_some(())),
            ),
            "address freed",
        );
        eprintln!(
            "deleted {} ({}): its address is free again on node1",
            victim.name, victim.ip
        );
        wait_ready(c, "app=web", 6, Duration::from_secs(60));

        // 100 pods made and removed by the kubelets leave nothing held.
        let churn = r#"apiVersion: apps/v1
kind: Deployment
metadata: {name: churn}
spec:
  replicas: 100
  selector: {matchLabels: {app: churn}}
  template:
    metadata: {labels: {app: churn}}
    spec:
      terminationGracePeriodSeconds: 1
      topologySpreadConstraints:
      - maxSkew: 1
        topologyKey: kubernetes.io/hostname
        whenUnsatisfiable: DoNotSchedule
        labelSelector: {matchLabels: {app: churn}}
      containers:
      - name: sleep
        image: localhost/busybox:test
        imagePullPolicy: Never
        command: ["sleep", "3600"]
"#;
        let t0 = Instant::now();
        ok(c.apply(churn), "100 pods");
        let made = wait_ready(c, "app=churn", 100, Duration::from_secs(400));
        let up = t0.elapsed();
        let ips: BTreeSet<Ipv4Addr> = made.iter().map(|p| p.ip).collect();
        assert_eq!(ips.len(), 100, "100 pods, 100 addresses");
        let t1 = Instant::now();
        ok(
            c.kubectl(&["delete", "deployment", "churn", "--wait=true"]),
            "deleting them",
        );
        ok(
            c.wait("the 100 pods gone", Duration::from_secs(400), || {
                Ok(pods(c, "app=churn").is_empty().then_some(()))
            }),
            "pods gone",
        );
        // Terminating pods are gone from the list once the kubelet has torn them down.
        ok(
            c.wait("no churn pod left at all", Duration::from_secs(120), || {
                let v = c.kubectl_json(&["get", "pods", "-l", "app=churn"])?;
                Ok(v["items"]
                    .as_array()
                    .is_some_and(|a| a.is_empty())
                    .then_some(()))
            }),
            "pods gone",
        );
        let down = t1.elapsed();
        for i in 1..=NODES {
            let (api, weft) = api_and_weft_addresses(c, i);
            assert_eq!(
                api, weft,
                "node{i}: weft holds exactly the addresses of the pods the API has there"
            );
            assert!(
                weft.is_disjoint(&ips),
                "node{i} still holds churn addresses"
            );
        }
        eprintln!(
            "100 pods: Ready in {:.1} s, deleted and torn down in {:.1} s; no address left held on any node",
            up.as_secs_f64(),
            down.as_secs_f64()
        );
    })
}

/// The stream: a pod on node1 sends a numbered line every 100 ms to a pod on node2, which
/// stamps each with its arrival time (/proc/uptime, 10 ms resolution).
fn start_stream(c: &LocalCluster) -> Ipv4Addr {
    let server = r#"apiVersion: v1
kind: Pod
metadata: {name: stream-server, labels: {app: stream}}
spec:
  nodeSelector: {kubernetes.io/hostname: node2}
  terminationGracePeriodSeconds: 1
  containers:
  - name: server
    image: localhost/busybox:test
    imagePullPolicy: Never
    command: ["sh", "-c", "sleep 100000 | nc -l -p 9000 | while read l; do read up _ </proc/uptime; echo \"$up $l\"; done >/tmp/recv"]
"#;
    ok(c.apply(server), "stream server");
    let server_ip = wait_ready(c, "app=stream", 1, Duration::from_secs(60))[0].ip;
    std::thread::sleep(Duration::from_secs(1));
    let client = format!(
        r#"apiVersion: v1
kind: Pod
metadata: {{name: stream-client, labels: {{app: stream-client}}}}
spec:
  nodeSelector: {{kubernetes.io/hostname: node1}}
  restartPolicy: Never
  terminationGracePeriodSeconds: 1
  containers:
  - name: client
    image: localhost/busybox:test
    imagePullPolicy: Never
    command: ["sh", "-c", "i=0; while :; do echo $i; i=$((i+1)); usleep 100000; done | nc {server_ip} 9000"]
"#
    );
    ok(c.apply(&client), "stream client");
    wait_ready(c, "app=stream-client", 1, Duration::from_secs(60));
    ok(
        c.wait("the stream flowing", Duration::from_secs(30), || {
            Ok((stream_lines(c).len() > 10).then_some(()))
        }),
        "stream",
    );
    server_ip
}

/// (arrival, sequence number) of every line the server got.
fn stream_lines(c: &LocalCluster) -> Vec<(f64, u64)> {
    c.exec("stream-server", &["cat", "/tmp/recv"])
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            Some((f.next()?.parse().ok()?, f.next()?.parse().ok()?))
        })
        .collect()
}

fn a_rolling_update_keeps_addresses_and_the_stream() {
    with_cluster(|c| {
        deploy_workloads(c);
        start_stream(c);
        let before: BTreeMap<String, Ipv4Addr> =
            pods(c, "app").into_iter().map(|p| (p.name, p.ip)).collect();
        let held_before: Vec<_> = (1..=NODES).map(|i| allocations(c, i)).collect();
        let weft_before: BTreeSet<String> = (1..=NODES).map(|i| weft_pod_on(c, i)).collect();

        // The upgrade: an env change in the DaemonSet, rolled node by node
        // (maxUnavailable: 1). It switches every node to the kernel data path, which the
        // next test checks.
        let t0 = Instant::now();
        ok(
            c.kubectl(&[
                "-n",
                "kube-system",
                "set",
                "env",
                "daemonset/weft",
                "WEFT_DATAPATH=kernel",
            ]),
            "kubectl set env",
        );
        ok(
            c.kubectl(&[
                "-n",
                "kube-system",
                "rollout",
                "status",
                "daemonset/weft",
                "--timeout=300s",
            ]),
            "the rollout",
        );
        let rollout = t0.elapsed();
        let weft_after: BTreeSet<String> = (1..=NODES).map(|i| weft_pod_on(c, i)).collect();
        assert!(
            weft_before.is_disjoint(&weft_after),
            "every weft pod replaced: {weft_before:?} -> {weft_after:?}"
        );
        // Lines keep coming after the last node's router is back.
        let n_after_rollout = stream_lines(c).len();
        ok(
            c.wait(
                "the stream flowing after the rollout",
                Duration::from_secs(60),
                || Ok((stream_lines(c).len() > n_after_rollout + 20).then_some(())),
            ),
            "stream after rollout",
        );
        let lines = stream_lines(c);
        // The same connection throughout: the numbers run on from 0 without a restart.
        for (k, (_, seq)) in lines.iter().enumerate() {
            assert_eq!(
                *seq, k as u64,
                "line {k} of the stream is {seq}: the connection restarted"
            );
        }
        let client_phase = ok(
            c.kubectl(&[
                "get",
                "pod",
                "stream-client",
                "-o",
                "jsonpath={.status.phase}",
            ]),
            "client phase",
        );
        assert_eq!(client_phase.trim(), "Running", "the stream's client exited");
        let gap = lines
            .windows(2)
            .map(|w| w[1].0 - w[0].0)
            .fold(0.0f64, f64::max);

        let after: BTreeMap<String, Ipv4Addr> =
            pods(c, "app").into_iter().map(|p| (p.name, p.ip)).collect();
        assert_eq!(
            before, after,
            "every pod keeps its address through the rollout"
        );
        for i in 1..=NODES {
            assert_eq!(
                held_before[i - 1],
                allocations(c, i),
                "node{i}'s allocations through the rollout"
            );
            let link = ok(
                c.on_node(i, &["ip", "-d", "link", "show", "weave"]),
                "ip link",
            );
            assert!(
                link.contains("vxlan id 30566"),
                "node{i} runs the kernel path: {link}"
            );
        }
        eprintln!(
            "rolling update (WEFT_DATAPATH userspace -> kernel, 3 nodes, maxUnavailable 1): {:.1} s; \
             the TCP stream node1 -> node2 survived on one connection ({} lines), longest gap between lines {:.2} s; \
             {} pods kept their addresses",
            rollout.as_secs_f64(),
            lines.len(),
            gap,
            after.len()
        );
    })
}

fn the_kernel_data_path_passes_pods_and_services() {
    with_cluster(|c| {
        deploy_workloads(c);
        every_pair_talks(c, "kernel data path");
        services_work(c, "kernel data path");
        policy_basics(c, "kernel data path");
    })
}

fn an_api_server_stopped_or_frozen_loses_nothing() {
    with_cluster(|c| {
        deploy_workloads(c);
        let web = pods(c, "app=web");
        let held: Vec<_> = (1..=NODES).map(|i| allocations(c, i)).collect();
        // Traffic checked from the nodes themselves: kubectl exec needs the API server.
        let reach_all = |what: &str| {
            for i in 1..=NODES {
                for p in web.iter().filter(|p| node_index(&p.node) != i) {
                    let addr = SocketAddrV4::new(p.ip, 8080);
                    let answer = ok(who_from_netns(&c.node_netns(i), addr), "node to pod");
                    assert!(
                        answer.starts_with(&format!("{} ", p.name)),
                        "{what}: node{i} -> {} ({}): {answer:?}",
                        p.name,
                        p.ip
                    );
                }
            }
        };
        for (stop, resume, what) in [("freeze", "thaw", "frozen"), ("stop", "start", "stopped")] {
            ok(c.apiserver(stop), "apiserver");
            std::thread::sleep(Duration::from_secs(15));
            reach_all(&format!("API server {what}"));
            for i in 1..=NODES {
                assert_eq!(
                    held[i - 1],
                    allocations(c, i),
                    "node{i} with the API server {what}"
                );
                let r = ok(
                    http_in_netns(
                        &c.node_netns(i),
                        "GET",
                        weft_testbed::HTTP_ADDR,
                        "/status/ipam",
                        Duration::from_secs(5),
                    ),
                    "ipam",
                );
                assert_eq!(r.status, 200, "node{i} ready with the API server {what}");
            }
            ok(c.apiserver(resume), "apiserver back");
            eprintln!("API server {what} for 15 s: forwarding and allocations unchanged");
        }
        ok(
            c.wait("the API server answering", Duration::from_secs(60), || {
                Ok(c.kubectl(&["get", "nodes"]).is_ok().then_some(()))
            }),
            "API back",
        );
        for i in 1..=NODES {
            let logs = ok(
                c.kubectl(&["-n", "kube-system", "logs", &weft_pod_on(c, i)]),
                "weft logs",
            );
            assert!(
                !logs.contains("reclaimed"),
                "node{i} reclaimed something:\n{logs}"
            );
        }
    })
}

fn a_dead_node_is_reclaimed_and_a_new_node_joins() {
    with_cluster(|c| {
        deploy_workloads(c);
        let survivors = [weft_pod_on(c, 1), weft_pod_on(c, 2)];
        ok(c.stop_node(3), "stopping node3");
        let t0 = Instant::now();
        ok(
            c.kubectl(&["delete", "node", "node3"]),
            "deleting Node node3",
        );
        let (who, line) = ok(
            c.wait(
                "one survivor reclaiming node3",
                Duration::from_secs(120),
                || {
                    for p in &survivors {
                        let logs = c.kubectl(&["-n", "kube-system", "logs", p])?;
                        if let Some(l) = logs
                            .lines()
                            .find(|l| l.contains("reclaimed deleted Node node3"))
                        {
                            return Ok(Some((p.clone(), l.to_string())));
                        }
                    }
                    Ok(None)
                },
            ),
            "reclaim",
        );
        let took = t0.elapsed();
        eprintln!(
            "reclaim after {:.1} s, by {who}: {line}",
            took.as_secs_f64()
        );
        std::thread::sleep(Duration::from_secs(3));
        let claimers = survivors
            .iter()
            .filter(|p| {
                c.kubectl(&["-n", "kube-system", "logs", p])
                    .is_ok_and(|l| l.contains("reclaimed deleted Node node3"))
            })
            .count();
        assert_eq!(claimers, 1, "exactly one survivor reclaims node3");
        let lease = ok(
            c.kubectl_json(&["-n", "kube-system", "get", "lease", "weft-reclaim-node3"]),
            "the reclaim Lease",
        );
        let by = lease["metadata"]["annotations"]["weft.works/reclaimed-by"]
            .as_str()
            .unwrap_or("")
            .to_string();
        assert!(by == "node1" || by == "node2", "Lease: {lease}");
        // Gossip carries the takeover to the other survivor.
        for i in 1..=2 {
            ok(
                c.wait(
                    "node3 gone from every ring",
                    Duration::from_secs(30),
                    || {
                        let r = http_in_netns(
                            &c.node_netns(i),
                            "GET",
                            weft_testbed::HTTP_ADDR,
                            "/status/ipam",
                            Duration::from_secs(5),
                        )?;
                        Ok((!r.body.contains("(node3)")).then_some(()))
                    },
                ),
                "ring",
            );
        }

        // A node added later joins, gets space and runs pods that talk to the others.
        let added = ok(c.add_node(), "add-node");
        assert_eq!(added, "node4");
        ok(
            c.apply(&web_pod("late", "node4", &[("app", "late")])),
            "a pod on node4",
        );
        let late = wait_ready(c, "app=late", 1, Duration::from_secs(90)).remove(0);
        let web1 = pods(c, "app=web")
            .into_iter()
            .find(|p| p.node == "node1")
            .expect("a web pod on node1");
        for (from, to) in [(&late, &web1), (&web1, &late)] {
            let seen = who_from(c, &from.name, &[format!("{}:8080", to.ip)]);
            let answer = seen.into_values().next().flatten();
            assert_eq!(
                answer,
                Some((to.name.clone(), from.ip.to_string())),
                "{} ({}) -> {} ({})",
                from.name,
                from.node,
                to.name,
                to.node
            );
        }
        eprintln!(
            "node4 joined: {} got {} and talks to {} on node1",
            late.name, late.ip, web1.name
        );
    })
}

fn the_encrypted_data_path_passes_pods_and_services() {
    // Its own cluster: a password is set before the routers first start.
    teardown_shared();
    let c = ok(
        LocalCluster::up(&repo(), ENCRYPTED_NAME, NODES, &["--password"]),
        "the encrypted cluster",
    );
    let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let status = ok(
            c.exec(
                &format!("kube-system/{}", weft_pod_on(&c, 1)),
                &["/usr/bin/weft", "status"],
            ),
            "weft status",
        );
        assert!(status.contains("Encryption: enabled"), "{status}");
        deploy_workloads(&c);
        every_pair_talks(&c, "encrypted");
        services_work(&c, "encrypted");
        policy_basics(&c, "encrypted");
    }));
    if let Err(p) = run {
        eprintln!("{}", c.diagnostics());
        std::panic::resume_unwind(p);
    }
    ok(c.down(), "taking the encrypted cluster down");
}

fn main() {
    let t = |name: &str, f: fn()| harness::root_with(name, PROGRAMS, f);
    harness::run_in_order(
        vec![
            t(
                "the_daemonset_runs_weft_on_every_node",
                the_daemonset_runs_weft_on_every_node,
            ),
            t(
                "kubelet_made_pods_get_unique_addresses_and_every_pair_talks",
                kubelet_made_pods_get_unique_addresses_and_every_pair_talks,
            ),
            t("services_through_kube_proxy", services_through_kube_proxy),
            t(
                "network_policy_on_kubelet_made_pods",
                network_policy_on_kubelet_made_pods,
            ),
            t(
                "deleting_pods_frees_their_addresses",
                deleting_pods_frees_their_addresses,
            ),
            t(
                "a_rolling_update_keeps_addresses_and_the_stream",
                a_rolling_update_keeps_addresses_and_the_stream,
            ),
            t(
                "the_kernel_data_path_passes_pods_and_services",
                the_kernel_data_path_passes_pods_and_services,
            ),
            t(
                "an_api_server_stopped_or_frozen_loses_nothing",
                an_api_server_stopped_or_frozen_loses_nothing,
            ),
            t(
                "a_dead_node_is_reclaimed_and_a_new_node_joins",
                a_dead_node_is_reclaimed_and_a_new_node_joins,
            ),
            t(
                "the_encrypted_data_path_passes_pods_and_services",
                the_encrypted_data_path_passes_pods_and_services,
            ),
        ],
        teardown_shared,
    )
}
