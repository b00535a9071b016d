//! NetworkPolicy at scale: 1,000 NetworkPolicies and 10,000 pods in a real Kubernetes
//! 1.20 API server (`cluster.sh control-plane`), 30 real pods on node 1 (attached through
//! weft-cni) and one on node 2, two routers in Kubernetes mode. Printed, in one run:
//! - time from a policy change to enforcement (a change that opens, or closes, the path
//!   between two real pods, observed by connecting every 5 ms), p50 and p99;
//! - a full compile and write of node 1's table, the router's first complete sync after a
//!   start, and the table's size;
//! - the router's RSS, the TCP connect time of new connections (each one judged by the
//!   table), ping RTT and single-stream iperf3 between node 1 and node 2, with 0 and with
//!   1,000 policies.
//!
//!   cargo build --release --workspace && cargo bench --bench policy      (root; iperf3)

use k8s_openapi::api::core::v1::{Namespace, Pod};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::api::{Api, Patch, PatchParams, PostParams};
use std::net::{SocketAddr, SocketAddrV4, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use weft_testbed::local::ApiCluster;
use weft_testbed::{in_netns, spawn_in_netns, Binaries, ClusterSpec, Pod as BedPod};

const POLICIES: usize = 1000;
const API_PODS: usize = 10_000;
const NAMESPACES: usize = 50;
const REAL_PODS: usize = 30;
const CHANGES: usize = 20;

mod common;
use common::status_kib;

fn pct(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

/// Runs `f` against the API server with the admin's credentials, from the control plane's
/// namespace (where the API server is reachable).
fn with_api<T: Send + 'static>(
    k: &ApiCluster,
    f: impl FnOnce(kube::Client) -> std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send>>
        + Send
        + 'static,
) -> T {
    let kubeconfig = k.api.state_dir().join("admin.kubeconfig");
    in_netns(&k.api_ns, move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        Ok(rt.block_on(async move {
            let kc = kube::config::Kubeconfig::read_from(&kubeconfig).unwrap();
            let cfg = kube::Config::from_custom_kubeconfig(kc, &Default::default())
                .await
                .unwrap();
            let client = kube::Client::try_from(cfg).unwrap();
            f(client).await
        }))
    })
    .unwrap()
}

fn pod_json(ns: &str, name: &str, app: &str, tier: &str, node: &str) -> serde_json::Value {
    serde_json::json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, "labels": {"app": app, "tier": tier}},
        "spec": {"nodeName": node, "automountServiceAccountToken": false,
                 "containers": [{"name": "c", "image": "bench",
                                 "ports": [{"name": "http", "containerPort": 8080}]}]}
    })
}

/// 1,000 policies over the 50 namespaces: each selects one app and lets in the front tier
/// of namespaces of a team, on its named port and 443, plus a CIDR.
fn policy_json(i: usize) -> serde_json::Value {
    let ns = format!("ns{}", i % NAMESPACES);
    serde_json::json!({
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": format!("np{i}"), "namespace": ns},
        "spec": {
            "podSelector": {"matchLabels": {"app": format!("app{}", i % 40)}},
            "ingress": [{
                "from": [
                    {"namespaceSelector": {"matchLabels": {"team": format!("t{}", i % 5)}},
                     "podSelector": {"matchLabels": {"tier": "front"}}},
                    {"ipBlock": {"cidr": format!("10.{}.0.0/16", i % 250), "except": [format!("10.{}.1.0/24", i % 250)]}}
                ],
                "ports": [{"port": "http"}, {"port": 443}]
            }]
        }
    })
}

fn main() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("policy: needs root (network namespaces); skipped");
        return;
    }
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().and_then(|d| d.parent()).unwrap().to_path_buf();
    let binaries = Binaries::beside(dir.join("weft"))
        .unwrap_or_else(|e| panic!("{e}: build them first (cargo build --release --workspace)"));
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let mut spec = ClusterSpec::new(2, binaries);
    spec.log_filter = "warn,weft::policy=info".into();
    let mut k = ApiCluster::new(&repo, spec).expect("control plane");
    for i in 0..2 {
        k.register_node(i).unwrap();
    }
    // The API's objects: namespaces with teams, 10,000 pods (on other machines: API
    // objects only, with addresses), made fast through the API.
    let t = Instant::now();
    with_api(&k, |client| {
        Box::pin(async move {
            let nss: Api<Namespace> = Api::all(client.clone());
            for n in 0..NAMESPACES {
                let ns: Namespace = serde_json::from_value(serde_json::json!({
                    "metadata": {"name": format!("ns{n}"), "labels": {"team": format!("t{}", n % 5)}}
                })).unwrap();
                nss.create(&PostParams::default(), &ns).await.unwrap();
            }
            let jobs: Vec<_> = (0..API_PODS).collect();
            for chunk in jobs.chunks(64) {
                let futs = chunk.iter().map(|&i| {
                    let client = client.clone();
                    async move {
                        let ns = format!("ns{}", i % NAMESPACES);
                        let pods: Api<Pod> = Api::namespaced(client, &ns);
                        let p: Pod = serde_json::from_value(pod_json(
                            &ns, &format!("ghost{i}"), &format!("app{}", i % 40),
                            if i % 3 == 0 { "front" } else { "back" }, "elsewhere")).unwrap();
                        pods.create(&PostParams::default(), &p).await.unwrap();
                        let ip = format!("100.{}.{}.{}", 64 + i / 65536, (i / 256) % 256, i % 256);
                        let st = serde_json::json!({"status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]}});
                        pods.patch_status(&format!("ghost{i}"), &PatchParams::default(), &Patch::Merge(&st)).await.unwrap();
                    }
                });
                futures::future::join_all(futs).await;
            }
        })
    });
    eprintln!(
        "{API_PODS} pods in {NAMESPACES} namespaces created in {:.0} s",
        t.elapsed().as_secs_f64()
    );

    for i in 0..2 {
        k.start_router(i, &[]).unwrap();
    }
    for i in 0..2 {
        k.c.wait_ready(i, Duration::from_secs(120)).unwrap();
        k.c.wait_overlay_address(i, Duration::from_secs(60))
            .unwrap();
    }
    // 30 real pods on node 1 (ns0, apps app0..app29, so 1,000 policies select them), one on
    // node 2 as the client.
    let mut real: Vec<BedPod> = Vec::new();
    for r in 0..REAL_PODS {
        let name = format!("real{r}");
        let yaml = serde_json::to_string(&pod_json(
            "ns0",
            &name,
            &format!("app{r}"),
            "back",
            &k.c.nodes[0].nickname,
        ))
        .unwrap();
        real.push(k.add_pod(0, &yaml, "ns0", &name).expect("real pod"));
    }
    let client_yaml = serde_json::to_string(&pod_json(
        "ns1",
        "client",
        "client",
        "back",
        &k.c.nodes[1].nickname,
    ))
    .unwrap();
    let client = k
        .add_pod(1, &client_yaml, "ns1", "client")
        .expect("client pod");
    let pid = k.c.router_pid(0).unwrap();
    std::thread::sleep(Duration::from_secs(3));

    let stop = Arc::new(AtomicBool::new(false));
    // Servers on every real pod: TCP 8080 (accept and close), iperf3 on the first.
    for p in &real {
        let (ip, s) = (p.addr, stop.clone());
        spawn_in_netns(&p.ns, move || {
            let l = TcpListener::bind(SocketAddrV4::new(ip, 8080)).unwrap();
            l.set_nonblocking(true).unwrap();
            while !s.load(Ordering::Relaxed) {
                match l.accept() {
                    Ok((c, _)) => drop(c),
                    Err(_) => std::thread::sleep(Duration::from_millis(1)),
                }
            }
            Ok(())
        })
        .unwrap();
    }
    let iperf_server = Command::new("ip")
        .args(["netns", "exec", &real[0].ns, "iperf3", "-s", "-1", "-D"])
        .status();
    let _ = iperf_server;

    let measure = |label: &str| {
        let target = SocketAddr::V4(SocketAddrV4::new(real[0].addr, 8080));
        let mut connects: Vec<f64> = in_netns(&client.ns, move || {
            Ok((0..200)
                .map(|_| {
                    let t = Instant::now();
                    let ok = TcpStream::connect_timeout(&target, Duration::from_secs(1)).is_ok();
                    assert!(ok, "connect");
                    t.elapsed().as_secs_f64() * 1e6
                })
                .collect())
        })
        .unwrap();
        let ping = Command::new("ip")
            .args([
                "netns",
                "exec",
                &client.ns,
                "busybox",
                "ping",
                "-c",
                "20",
                "-i",
                "0.05",
                "-q",
                &real[0].addr.to_string(),
            ])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        let rtt = ping
            .rsplit('=')
            .next()
            .and_then(|s| s.split('/').nth(1))
            .unwrap_or("?")
            .trim()
            .to_string();
        let _ = Command::new("ip")
            .args(["netns", "exec", &real[0].ns, "iperf3", "-s", "-1", "-D"])
            .status();
        std::thread::sleep(Duration::from_millis(300));
        let iperf = Command::new("ip")
            .args([
                "netns",
                "exec",
                &client.ns,
                "iperf3",
                "-c",
                &real[0].addr.to_string(),
                "-t",
                "5",
                "-J",
            ])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        let gbps = serde_json::from_str::<serde_json::Value>(&iperf)
            .ok()
            .and_then(|v| v["end"]["sum_received"]["bits_per_second"].as_f64())
            .map(|b| b / 1e9)
            .unwrap_or(f64::NAN);
        let rss = status_kib(pid, "VmRSS:") as f64 / 1024.0;
        println!(
            "| {label} | {:.0} / {:.0} | {rtt} | {gbps:.2} | {rss:.1} |",
            pct(&mut connects, 0.5),
            pct(&mut connects, 0.99)
        );
    };
    println!("\n| policies in the API | TCP connect us p50 / p99 (new connections, node 2 -> node 1) | ping RTT ms | iperf3 1 stream Gbit/s | router RSS MiB (node 1) |");
    println!("|---|---|---|---|---|");
    measure("0 (10,000 pods)");

    // 1,000 policies; then one that lets the client in on the measured pod.
    let t = Instant::now();
    with_api(&k, |client| {
        Box::pin(async move {
            for chunk in (0..POLICIES).collect::<Vec<_>>().chunks(32) {
                let futs = chunk.iter().map(|&i| {
                    let client = client.clone();
                    async move {
                        let ns = format!("ns{}", i % NAMESPACES);
                        let api: Api<NetworkPolicy> = Api::namespaced(client, &ns);
                        let np: NetworkPolicy = serde_json::from_value(policy_json(i)).unwrap();
                        api.create(&PostParams::default(), &np).await.unwrap();
                    }
                });
                futures::future::join_all(futs).await;
            }
            let api: Api<NetworkPolicy> = Api::namespaced(client, "ns0");
            let np: NetworkPolicy = serde_json::from_value(serde_json::json!({
                "metadata": {"name": "let-client-in", "namespace": "ns0"},
                "spec": {"podSelector": {}, "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ns1"}}}]}]}
            })).unwrap();
            api.create(&PostParams::default(), &np).await.unwrap();
        })
    });
    eprintln!(
        "{} policies created in {:.0} s",
        POLICIES + 1,
        t.elapsed().as_secs_f64()
    );
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let r: serde_json::Value = k.c.http_get(0, "/report").unwrap().json().unwrap();
        if r["NetworkPolicy"]["Policies"].as_u64() == Some(POLICIES as u64 + 1) {
            println!(
                "node 1 enforces {} policies: {} table elements, {} of its {} pods isolated",
                POLICIES + 1,
                r["NetworkPolicy"]["TableElements"],
                r["NetworkPolicy"]["Pods"]
                    .as_array()
                    .map(|p| p.iter().filter(|x| x["IngressIsolated"] == true).count())
                    .unwrap_or(0),
                REAL_PODS
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "policies not applied: {}",
            r["NetworkPolicy"]
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    std::thread::sleep(Duration::from_secs(2));
    measure("1,001 (10,000 pods)");

    // Change to enforcement: toggle a policy that closes the measured path (ingress of
    // real1 from nowhere but ns2), observed by a connect every 5 ms from node 2.
    let target = SocketAddr::V4(SocketAddrV4::new(real[1].addr, 8080));
    let mut lat = Vec::new();
    for n in 0..CHANGES {
        let close = n % 2 == 0;
        let t0 = Instant::now();
        with_api(&k, move |client| {
            Box::pin(async move {
                let api: Api<NetworkPolicy> = Api::namespaced(client, "ns0");
                if close {
                    let np: NetworkPolicy = serde_json::from_value(serde_json::json!({
                        "metadata": {"name": "close-real1", "namespace": "ns0"},
                        "spec": {"podSelector": {"matchLabels": {"app": "app1"}}, "ingress": []}
                    }))
                    .unwrap();
                    // The let-client-in policy also selects real1: drop it for this pod
                    // by narrowing it, then restore it below.
                    let narrowed: NetworkPolicy = serde_json::from_value(serde_json::json!({
                        "metadata": {"name": "let-client-in", "namespace": "ns0"},
                        "spec": {"podSelector": {"matchExpressions": [{"key": "app", "operator": "NotIn", "values": ["app1"]}]},
                                 "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ns1"}}}]}]}
                    })).unwrap();
                    api.replace("let-client-in", &PostParams::default(), &{
                        let mut x = narrowed;
                        x.metadata.resource_version = api
                            .get("let-client-in")
                            .await
                            .unwrap()
                            .metadata
                            .resource_version;
                        x
                    })
                    .await
                    .unwrap();
                    api.create(&PostParams::default(), &np).await.unwrap();
                } else {
                    api.delete("close-real1", &Default::default())
                        .await
                        .unwrap();
                    let wide: NetworkPolicy = serde_json::from_value(serde_json::json!({
                        "metadata": {"name": "let-client-in", "namespace": "ns0"},
                        "spec": {"podSelector": {}, "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ns1"}}}]}]}
                    })).unwrap();
                    api.replace("let-client-in", &PostParams::default(), &{
                        let mut x = wide;
                        x.metadata.resource_version = api
                            .get("let-client-in")
                            .await
                            .unwrap()
                            .metadata
                            .resource_version;
                        x
                    })
                    .await
                    .unwrap();
                }
            })
        });
        let api_done = t0.elapsed();
        let flipped = in_netns(&client.ns, move || {
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                let open = TcpStream::connect_timeout(&target, Duration::from_millis(20)).is_ok();
                if open != close {
                    return Ok(Some(Instant::now()));
                }
                if Instant::now() > deadline {
                    return Ok(None);
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        })
        .unwrap()
        .expect("enforced within 10 s");
        lat.push(
            flipped.duration_since(t0).as_secs_f64() * 1000.0 - api_done.as_secs_f64() * 1000.0,
        );
    }
    println!(
        "\npolicy change -> enforcement on node 1 (from the API's answer to the first connection going as it should; {CHANGES} changes): p50 {:.0} ms, p99 {:.0} ms",
        pct(&mut lat.clone(), 0.5),
        pct(&mut lat, 0.99)
    );

    // A full compile-and-write, and a start: the router restarted with everything there.
    let r: serde_json::Value = k.c.http_get(0, "/report").unwrap().json().unwrap();
    let elements = r["NetworkPolicy"]["TableElements"].clone();
    let _ = Command::new("ip")
        .args([
            "netns",
            "exec",
            &k.c.nodes[0].ns,
            "nft",
            "delete",
            "table",
            "ip",
            "weft_policy",
        ])
        .status();
    let t = Instant::now();
    let restored = loop {
        let out = Command::new("ip")
            .args(["netns", "exec", &k.c.nodes[0].ns, "nft", "list", "tables"])
            .output()
            .unwrap();
        if String::from_utf8_lossy(&out.stdout).contains("weft_policy") {
            break t.elapsed();
        }
        std::thread::sleep(Duration::from_millis(20));
        assert!(t.elapsed() < Duration::from_secs(30), "table not restored");
    };
    println!("table removed behind the router's back: written again after {:.1} s (resync every 10 s), {elements} elements", restored.as_secs_f64());
    k.c.stop_router(0, Duration::from_secs(10)).unwrap();
    let t = Instant::now();
    k.start_router(0, &[]).unwrap();
    let pid = k.c.router_pid(0).unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if let Ok(r) = k.c.http_get(0, "/report") {
            if let Ok(v) = r.json() {
                if v["NetworkPolicy"]["Synced"] == true
                    && v["NetworkPolicy"]["Policies"].as_u64() == Some(POLICIES as u64 + 1)
                {
                    break;
                }
            }
        }
        assert!(Instant::now() < deadline, "no sync after restart");
        std::thread::sleep(Duration::from_millis(50));
    }
    println!(
        "router restarted: {} policies and {API_PODS} pods listed, compiled and written {:.1} s after its start; RSS {:.1} MiB",
        POLICIES + 1,
        t.elapsed().as_secs_f64(),
        status_kib(pid, "VmRSS:") as f64 / 1024.0
    );
    stop.store(true, Ordering::Relaxed);
}
