//! The router's memory, to size the DaemonSet's requests and limits (deploy/weft.yaml):
//! resident set size (VmRSS) and peak (VmHWM) of the `weft router` process of a node
//! - idle, with 100 pods attached to it through weft-cni;
//! - while an iperf3 TCP stream runs between a pod on it and a pod on another node
//!   (both directions of the datapath's buffers in use), sampled every 200 ms.
//!
//!   cargo bench --bench rss            (root; iperf3 for the second part)
//!
//! Goal: idle with 100 pods under 32 MiB. A benchmark, not a test: figures are printed.

use std::time::{Duration, Instant};
use weft_testbed::{Binaries, Cluster, ClusterSpec};

const PODS: usize = 100;

mod common;
use common::status_kib;

fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

fn main() {
    // `cargo bench` passes --bench; nothing to parse.
    if !nix::unistd::geteuid().is_root() {
        eprintln!("rss: needs root (network namespaces); skipped");
        return;
    }
    let exe = std::env::current_exe().unwrap();
    // target/release/deps/rss-HASH -> target/release/weft
    let dir = exe.parent().and_then(|d| d.parent()).unwrap().to_path_buf();
    let binaries = Binaries::beside(dir.join("weft"))
        .unwrap_or_else(|e| panic!("{e}: build them first (cargo build --release --workspace)"));
    let mut c = Cluster::create(ClusterSpec::new(2, binaries)).expect("namespaces");
    c.start_all().expect("routers");
    c.wait_all_ready(Duration::from_secs(60)).expect("ready");
    let pid = c.router_pid(0).expect("router pid");
    std::thread::sleep(Duration::from_secs(2));
    let start = status_kib(pid, "VmRSS:");

    let t = Instant::now();
    let mut pods = Vec::new();
    for k in 0..PODS {
        pods.push(c.add_pod(0, &format!("p{k}")).expect("pod"));
    }
    let attach = t.elapsed();
    let remote = c.add_pod(1, "remote").expect("remote pod");
    // Let allocation bookkeeping, gossip and the route table settle.
    std::thread::sleep(Duration::from_secs(10));
    let idle = status_kib(pid, "VmRSS:");
    println!(
        "router RSS: {} at start, {} idle with {PODS} pods attached ({:.0} ms per CNI ADD); peak so far {}",
        mib(start),
        mib(idle),
        attach.as_secs_f64() * 1000.0 / PODS as f64,
        mib(status_kib(pid, "VmHWM:"))
    );
    println!(
        "goal: idle with {PODS} pods under 32 MiB: {}",
        if idle < 32 * 1024 { "met" } else { "NOT met" }
    );

    if std::process::Command::new("iperf3")
        .arg("--version")
        .output()
        .is_err()
    {
        println!("iperf3 not installed: no figure under load");
        return;
    }
    let server = std::process::Command::new("ip")
        .args(["netns", "exec", &remote.ns, "iperf3", "-s", "-1", "-B"])
        .arg(remote.addr.to_string())
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("iperf3 server");
    std::thread::sleep(Duration::from_millis(500));
    let client = std::process::Command::new("ip")
        .args(["netns", "exec", &pods[0].ns, "iperf3", "-c"])
        .arg(remote.addr.to_string())
        .args(["-t", "10", "-f", "g"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("iperf3 client");
    let (mut max0, mut max1) = (0, 0);
    let pid1 = c.router_pid(1).expect("router pid");
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(11) {
        max0 = max0.max(status_kib(pid, "VmRSS:"));
        max1 = max1.max(status_kib(pid1, "VmRSS:"));
        std::thread::sleep(Duration::from_millis(200));
    }
    let out = client.wait_with_output().expect("iperf3");
    let text = String::from_utf8_lossy(&out.stdout);
    let rate = text
        .lines()
        .rfind(|l| l.contains("receiver"))
        .unwrap_or("")
        .to_string();
    let mut server = server;
    let _ = server.kill();
    let _ = server.wait();
    println!("under a TCP stream pod(n1) -> pod(n2): {}", rate.trim());
    println!(
        "router RSS under load: sender {} (peak {}), receiver {} (peak {})",
        mib(max0),
        mib(status_kib(pid, "VmHWM:")),
        mib(max1),
        mib(status_kib(pid1, "VmHWM:"))
    );
}
