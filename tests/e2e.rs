//! End-to-end tests: real `weft router` processes in node namespaces, pods attached by
//! executing the built `weft-cni` exactly as a runtime does, real TCP between them.
//!
//! Need root (network namespaces): they run under weft-testbed's harness, which reports
//! them as ignored without root and fails them under CI without root.
//! Need `weft-cni` next to the `weft` binary: `cargo build --workspace` first.
//! Every test builds its own cluster with unique namespace names, so they run in
//! parallel; a failing test prints the routers' log tails (the cluster's Drop does).

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, SocketAddrV4};
use std::time::{Duration, Instant};
use weft::api::report::Report;
use weft_testbed::craft::{ipv4_udp, vxlan};
use weft_testbed::{
    self as testbed, harness, Binaries, Cluster, ClusterSpec, CniCall, Pod, DATA_PORT,
};

const READY: Duration = Duration::from_secs(60);
const STOP: Duration = Duration::from_secs(15);

fn binaries() -> Binaries {
    Binaries::beside(env!("CARGO_BIN_EXE_weft")).unwrap_or_else(|e| panic!("{e}"))
}

/// A cluster of `nodes` routers, all ready.
fn ready_cluster(nodes: usize) -> Cluster {
    let mut c = Cluster::create(ClusterSpec::new(nodes, binaries()))
        .unwrap_or_else(|e| panic!("building namespaces: {e}"));
    ok(c.start_all(), "starting routers");
    ok(c.wait_all_ready(READY), "waiting for readiness");
    c
}

fn ok<T, E: std::fmt::Display>(r: Result<T, E>, what: &str) -> T {
    r.unwrap_or_else(|e| panic!("{what}: {e}"))
}

fn add_pod(c: &mut Cluster, node: usize, name: &str) -> Pod {
    ok(c.add_pod(node, name), &format!("ADD {name}"))
}

/// TCP both ways between two pods; the server must see the client's pod address (no NAT).
fn tcp_both_ways(c: &Cluster, a: &Pod, b: &Pod) {
    for (from, to) in [(a, b), (b, a)] {
        let out = ok(
            c.tcp_pod_to_pod(from, to),
            &format!(
                "TCP {} ({}, n{}) -> {} ({}, n{})",
                from.name,
                from.addr,
                from.node + 1,
                to.name,
                to.addr,
                to.node + 1
            ),
        );
        assert_eq!(
            out.client_seen_as.ip(),
            IpAddr::V4(from.addr),
            "{} -> {}: server saw a translated source",
            from.name,
            to.name
        );
    }
}

fn overlay_range() -> ipnet::Ipv4Net {
    "192.168.0.0/16".parse().unwrap()
}

/// `GET /ip/{id}` on `node`: the address, or `None` on 404.
fn lookup_ip(c: &Cluster, node: usize, id: &str) -> Option<Ipv4Addr> {
    let r = ok(c.http_get(node, &format!("/ip/{id}")), "GET /ip/{id}");
    match r.status {
        404 => None,
        200 => {
            let text = r.body.trim();
            let addr = text.split('/').next().unwrap_or(text);
            Some(
                addr.parse()
                    .unwrap_or_else(|e| panic!("GET /ip/{id} body {text:?}: {e}")),
            )
        }
        s => panic!("GET /ip/{id}: HTTP {s}: {}", r.body),
    }
}

fn report(c: &Cluster, node: usize) -> Report {
    ok(c.report(node), "GET /report")
}

fn drops(r: &Report, reason: &str) -> u64 {
    r.dataplane
        .drops
        .iter()
        .filter(|d| d.reason == reason)
        .map(|d| d.packets)
        .sum()
}

fn pods_on_three_nodes_reach_each_other_and_the_nodes() {
    let mut c = ready_cluster(3);
    let a1 = add_pod(&mut c, 0, "a1");
    let a2 = add_pod(&mut c, 0, "a2");
    let b = add_pod(&mut c, 1, "b");
    let d = add_pod(&mut c, 2, "d");
    let pods = [&a1, &a2, &b, &d];

    // The CNI result is what a CNI 1.0.0 runtime needs.
    for p in pods {
        let r = &p.result;
        assert_eq!(r["cniVersion"], "1.0.0", "{}: {r}", p.name);
        let ifaces = r["interfaces"].as_array().expect("interfaces");
        assert!(
            ifaces
                .iter()
                .all(|i| i["mac"].as_str().is_some_and(|m| !m.is_empty())),
            "{}: every interface needs a mac: {r}",
            p.name
        );
        let ip = &r["ips"][0];
        let idx = ip["interface"].as_u64().expect("ips[0].interface") as usize;
        let sandbox = testbed::netns_path(&p.ns);
        assert_eq!(
            ifaces[idx]["sandbox"].as_str(),
            Some(sandbox.to_str().unwrap()),
            "{}: ips[0].interface must be the pod's interface: {r}",
            p.name
        );
        assert_eq!(ifaces[idx]["name"], "eth0", "{}: {r}", p.name);
        let gw: Ipv4Addr = ip["gateway"].as_str().expect("gateway").parse().unwrap();
        assert!(overlay_range().contains(&gw), "{}: gateway {gw}", p.name);
        assert!(
            p.add_duration < Duration::from_secs(5),
            "{}: slow ADD",
            p.name
        );
    }

    // Addresses: unique, inside the default range, none a node's own overlay address.
    let mut seen = BTreeSet::new();
    for p in pods {
        assert!(
            overlay_range().contains(&p.addr),
            "{} got {} outside 192.168.0.0/16",
            p.name,
            p.addr
        );
        assert!(seen.insert(p.addr), "duplicate address {}", p.addr);
    }
    for i in 0..3 {
        let rep = report(&c, i);
        assert!(rep.ready, "n{} report not ready", i + 1);
        if let Some(overlay) = &rep.router.overlay_address {
            let own: Ipv4Addr = overlay
                .split('/')
                .next()
                .unwrap()
                .parse()
                .unwrap_or_else(|e| panic!("OverlayAddress {overlay:?}: {e}"));
            assert!(
                !seen.contains(&own),
                "pod got node n{}'s address {own}",
                i + 1
            );
        }
        let established = rep
            .router
            .connections
            .iter()
            .filter(|x| x.state == "established")
            .count();
        assert_eq!(established, 2, "n{}: {:?}", i + 1, rep.router.connections);
    }
    let rep1 = report(&c, 0);
    for p in [&a1, &a2] {
        let owned = rep1
            .ipam
            .owned
            .iter()
            .find(|o| o.containerid == p.container_id)
            .unwrap_or_else(|| panic!("{} missing from IPAM.Owned: {:?}", p.name, rep1.ipam.owned));
        assert!(
            owned
                .addrs
                .iter()
                .any(|a| a.starts_with(&format!("{}/", p.addr))),
            "{:?}",
            owned
        );
        assert_eq!(lookup_ip(&c, 0, &p.container_id), Some(p.addr));
    }

    // TCP between every ordered pair: same node (a1, a2) and across nodes.
    for (i, x) in pods.iter().enumerate() {
        for y in pods.iter().skip(i + 1) {
            tcp_both_ways(&c, x, y);
        }
    }

    // From node namespaces to local and remote pods.
    for (node, to) in [(0, &a1), (0, &b), (1, &d), (2, &a2), (2, &d)] {
        ok(
            c.tcp_node_to_pod(node, to),
            &format!("TCP node n{} -> {} ({})", node + 1, to.name, to.addr),
        );
    }

    let check = ok(c.check_pod(&a1), "CHECK");
    assert!(
        check.success,
        "CHECK failed: {} {}",
        check.stdout, check.stderr
    );

    // The CLI, run inside a node namespace, talks to that node's router.
    let (success, out, err) = ok(c.weft_cli(0, &["status"]), "weft status");
    assert!(success, "weft status failed: {out} {err}");
    assert!(out.contains("02:77:66:00:00:01(n1)"), "weft status: {out}");
    assert!(out.contains("ready"), "weft status: {out}");
    for page in ["peers", "connections", "ipam", "targets", "routes"] {
        let (success, out, err) = ok(c.weft_cli(0, &["status", page]), "weft status page");
        assert!(success, "weft status {page} failed: {out} {err}");
        assert!(!out.trim().is_empty(), "weft status {page} printed nothing");
    }
    let (success, out, err) = ok(c.weft_cli(0, &["status", "peers"]), "weft status peers");
    assert!(
        success && out.contains("n2") && out.contains("n3"),
        "{out} {err}"
    );
    let (success, out, err) = ok(c.weft_cli(0, &["report"]), "weft report");
    assert!(success, "weft report failed: {err}");
    let parsed: Report = serde_json::from_str(&out)
        .unwrap_or_else(|e| panic!("weft report is not a Report ({e}): {out}"));
    assert_eq!(parsed.router.nick_name, "n1");
}

fn cni_del_frees_the_address_and_is_idempotent() {
    let mut c = ready_cluster(2);
    let p1 = add_pod(&mut c, 0, "p1");
    let p2 = add_pod(&mut c, 0, "p2");
    let remote = add_pod(&mut c, 1, "r");
    assert_ne!(p1.addr, p2.addr);
    assert_eq!(lookup_ip(&c, 0, &p1.container_id), Some(p1.addr));
    let active_before = report(&c, 0).ipam.active_ips;

    let del = ok(c.del_pod(&p1), "DEL p1");
    assert!(del.success, "DEL failed: {} {}", del.stdout, del.stderr);
    assert_eq!(
        lookup_ip(&c, 0, &p1.container_id),
        None,
        "address kept after DEL"
    );
    let rep = report(&c, 0);
    assert!(
        rep.ipam
            .owned
            .iter()
            .all(|o| o.containerid != p1.container_id),
        "{:?}",
        rep.ipam.owned
    );
    assert_eq!(rep.ipam.active_ips + 1, active_before);

    // CRI's second DEL: empty CNI_NETNS, no prevResult. And DEL of an unknown container.
    let config = testbed::DEFAULT_CNI_CONFIG.to_string();
    for (id, label) in [
        (p1.container_id.as_str(), "second DEL"),
        ("feedc0de", "DEL of unknown id"),
    ] {
        let again = ok(
            c.cni(
                0,
                &CniCall {
                    command: "DEL",
                    container_id: id,
                    netns: None,
                    pod_name: "p1",
                    config: config.clone(),
                },
            ),
            label,
        );
        assert!(
            again.success,
            "{label} failed (exit {:?}): {} {}",
            again.exit_code, again.stdout, again.stderr
        );
    }

    // The allocator hands out the lowest free address (as Weave does), so the freed one
    // comes back on the next ADD on that node.
    let p3 = add_pod(&mut c, 0, "p3");
    assert_eq!(p3.addr, p1.addr, "freed address not reused");
    tcp_both_ways(&c, &p3, &p2);
    tcp_both_ways(&c, &p3, &remote);

    // A failing ADD reports a CNI error on stdout, exits 1 and leaks no address.
    let id = "badbadbadbad";
    let missing = format!("{}-absent", c.prefix);
    let failed = ok(
        c.cni(
            0,
            &CniCall {
                command: "ADD",
                container_id: id,
                netns: Some(&missing),
                pod_name: "absent",
                config,
            },
        ),
        "ADD into a missing netns",
    );
    assert!(!failed.success);
    assert_eq!(failed.exit_code, Some(1), "stderr: {}", failed.stderr);
    let err = ok(failed.json(), "error JSON");
    assert!(err["code"].as_u64().is_some(), "no numeric code: {err}");
    assert!(
        err["msg"].as_str().is_some_and(|m| !m.is_empty()),
        "no msg: {err}"
    );
    assert_eq!(lookup_ip(&c, 0, id), None, "failed ADD leaked an address");
}

/// What a restarted node must have put back before anything else can work: its overlay
/// address on `weave`, and a path to its own pods (their host routes).
fn after_restart(c: &Cluster, node: usize, local: &Pod) {
    let rep = report(c, node);
    assert!(
        rep.router.overlay_address.is_some(),
        "n{} has no overlay address after restart (Router.OverlayAddress is null)",
        node + 1
    );
    ok(
        c.tcp_node_to_pod(node, local),
        &format!(
            "TCP from restarted node n{} to its own pod {} ({})",
            node + 1,
            local.name,
            local.addr
        ),
    );
}

/// Restarts node n1 of a two-node cluster (SIGKILL if `crash`, else SIGTERM) and checks
/// that allocations, reachability and address uniqueness all survive.
fn restart_keeps_allocations(crash: bool) {
    let mut c = ready_cluster(2);
    let a = add_pod(&mut c, 0, "a");
    let b = add_pod(&mut c, 1, "b");
    tcp_both_ways(&c, &a, &b);

    if crash {
        ok(c.kill_router(0), "SIGKILL n1");
    } else {
        let status = ok(c.stop_router(0, STOP), "SIGTERM n1");
        assert!(status.success(), "n1 exited with {status} on SIGTERM");
    }
    // Same name, same db dir.
    ok(c.start_router(0), "restarting n1");
    ok(c.wait_ready(0, READY), "n1 ready after restart");
    assert_eq!(
        lookup_ip(&c, 0, &a.container_id),
        Some(a.addr),
        "n1 lost a's address"
    );
    after_restart(&c, 0, &a);
    tcp_both_ways(&c, &a, &b);

    // New allocations on both nodes do not collide with the surviving ones.
    let a2 = add_pod(&mut c, 0, "a2");
    let b2 = add_pod(&mut c, 1, "b2");
    let all: BTreeSet<_> = [a.addr, a2.addr, b.addr, b2.addr].into();
    assert_eq!(all.len(), 4, "duplicate address after restart: {all:?}");
    tcp_both_ways(&c, &a2, &b2);
    tcp_both_ways(&c, &a, &b2);

    for i in 0..2 {
        let rep = report(&c, i);
        assert!(rep.ready, "n{} not ready", i + 1);
        assert_eq!(rep.ipam.status, "ready", "n{}", i + 1);
    }
}

fn allocations_and_connectivity_survive_sigterm_restart() {
    restart_keeps_allocations(false);
}

fn allocations_and_connectivity_survive_sigkill_restart() {
    restart_keeps_allocations(true);
}

/// A fresh pod's first connection must not wait for anything: a delayed proxy-ARP answer
/// on the host veth (the kernel default `proxy_delay` is up to 0.8 s) costs a SYN
/// retransmission, about one second, on every new pod's first connection.
fn first_connections_of_new_pods_are_not_delayed() {
    let mut c = ready_cluster(2);
    let a = add_pod(&mut c, 0, "a");
    let a2 = add_pod(&mut c, 0, "a2");
    let b = add_pod(&mut c, 1, "b");
    let limit = Duration::from_millis(300);
    for (from, to) in [(&a, &a2), (&a, &b), (&b, &a2)] {
        let out = ok(
            c.tcp_pod_to_pod(from, to),
            &format!("TCP {} -> {}", from.name, to.name),
        );
        assert!(
            out.elapsed < limit,
            "first connection {} -> {} took {:?} (limit {limit:?})",
            from.name,
            to.name,
            out.elapsed
        );
    }
}

// --- malformed datagrams --------------------------------------------------------------

const VNI: u32 = 0x7766;

/// Datagrams every receiver must reject, one per way of being wrong.
fn malformed_set(inner: &[u8]) -> Vec<(&'static str, Vec<u8>)> {
    let mut bad_version = inner.to_vec();
    bad_version[0] = 0x65;
    let mut bad_ihl = inner.to_vec();
    bad_ihl[0] = 0x44;
    let mut bad_total = inner.to_vec();
    bad_total[2..4].copy_from_slice(&2000u16.to_be_bytes());
    let truncated = vxlan(0x08, VNI, 0x0800, &inner[..19]);
    vec![
        ("empty", Vec::new()),
        ("garbage 5 bytes", b"\x08\x00\x77\x66\x00".to_vec()),
        ("garbage 0xff", vec![0xff; 100]),
        ("no I flag", vxlan(0x00, VNI, 0x0800, inner)),
        ("wrong VNI", vxlan(0x08, 0x123456, 0x0800, inner)),
        ("IPv6 ethertype", vxlan(0x08, VNI, 0x86dd, inner)),
        ("inner version 6", vxlan(0x08, VNI, 0x0800, &bad_version)),
        ("inner IHL 4", vxlan(0x08, VNI, 0x0800, &bad_ihl)),
        (
            "inner total length 2000",
            vxlan(0x08, VNI, 0x0800, &bad_total),
        ),
        ("inner header cut", truncated),
    ]
}

/// Polls n1's report until `reason` has grown by at least `by` over `base`.
fn wait_drops(c: &Cluster, node: usize, reason: &str, base: u64, by: u64) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let now = drops(&report(c, node), reason);
        if now >= base + by || Instant::now() > deadline {
            return now;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn malformed_and_foreign_datagrams_are_dropped_counted_and_harmless() {
    let mut c = ready_cluster(2);
    let (stranger_ns, stranger_ip) = ok(c.add_underlay_host("x"), "stranger namespace");
    let a = add_pod(&mut c, 0, "a");
    let b = add_pod(&mut c, 1, "b");
    tcp_both_ways(&c, &a, &b);
    let n1_data = SocketAddrV4::new(c.nodes[0].underlay_ip, DATA_PORT);
    let n2_ns = c.nodes[1].ns.clone();

    // Positive control: a well-formed datagram from n2's data port, for pod a, arrives.
    // This shows the crafted datagrams below differ from accepted ones only in their flaw.
    let port = testbed::next_test_port();
    let valid_inner = ipv4_udp(b.addr, a.addr, port, b"injected");
    let valid = vxlan(0x08, VNI, 0x0800, &valid_inner);
    let sink_addr = SocketAddrV4::new(a.addr, port);
    let sink = ok(
        testbed::spawn_udp_sink(&a.ns, sink_addr, Duration::from_millis(1500)),
        "sink",
    );
    sink.wait_bound();
    ok(
        testbed::send_udp_raw_from_ns(&n2_ns, DATA_PORT, n1_data, &valid),
        "send valid",
    );
    let got = ok(sink.finish(), "sink");
    assert_eq!(
        got.iter().map(|(p, _)| p.as_slice()).collect::<Vec<_>>(),
        vec![&b"injected"[..]],
        "a well-formed datagram from a peer's data port was not delivered"
    );

    let before = report(&c, 0);
    let malformed0 = drops(&before, "malformed");
    let unknown0 = drops(&before, "unknown_peer");

    // From the known peer's data address: each is counted as malformed.
    let set = malformed_set(&valid_inner);
    for (what, d) in &set {
        ok(
            testbed::send_udp_raw_from_ns(&n2_ns, DATA_PORT, n1_data, d),
            &format!("send {what}"),
        );
    }
    let k = set.len() as u64;
    let malformed1 = wait_drops(&c, 0, "malformed", malformed0, k);
    assert_eq!(
        malformed1 - malformed0,
        k,
        "malformed datagrams from a peer: expected {k} counted as malformed"
    );

    // From the peer's address but another port: the data plane knows peers by underlay
    // address (a port may be rewritten on the way), so these are malformed too.
    for (what, d) in set.iter().take(4) {
        ok(
            testbed::send_udp_from_ns(&n2_ns, n1_data, d),
            &format!("send {what}"),
        );
    }
    let malformed2 = wait_drops(&c, 0, "malformed", malformed1, 4);
    assert_eq!(malformed2 - malformed1, 4, "from n2's ephemeral port");

    // From an address on the underlay that is no peer's (raw from port 6784 and from an
    // ephemeral port): unknown_peer, whatever the content. The well-formed datagram is
    // among them and must not reach pod a.
    let sink_port = testbed::next_test_port();
    let spoof = vxlan(
        0x08,
        VNI,
        0x0800,
        &ipv4_udp(b.addr, a.addr, sink_port, b"spoofed"),
    );
    let sink = ok(
        testbed::spawn_udp_sink(
            &a.ns,
            SocketAddrV4::new(a.addr, sink_port),
            Duration::from_millis(1500),
        ),
        "sink",
    );
    sink.wait_bound();
    let mut sent = 0u64;
    for d in set.iter().map(|(_, d)| d).take(4).chain([&spoof]) {
        ok(
            testbed::send_udp_raw_from_ns(&stranger_ns, DATA_PORT, n1_data, d),
            "send",
        );
        ok(testbed::send_udp_from_ns(&stranger_ns, n1_data, d), "send");
        sent += 2;
    }
    let unknown1 = wait_drops(&c, 0, "unknown_peer", unknown0, sent);
    assert_eq!(
        unknown1 - unknown0,
        sent,
        "datagrams from {stranger_ip}: expected {sent} unknown_peer drops"
    );
    let got = ok(sink.finish(), "sink");
    assert!(
        got.is_empty(),
        "a datagram from a non-peer was delivered: {got:?}"
    );

    let after = report(&c, 0);
    assert_eq!(drops(&after, "malformed"), malformed2, "malformed changed");
    let metrics = ok(c.metrics(0), "metrics");
    for (reason, value) in [("malformed", malformed2), ("unknown_peer", unknown1)] {
        let m = testbed::metric_sum(
            &metrics,
            "weft_dropped_packets_total",
            &[("reason", reason)],
        );
        assert_eq!(
            m as u64, value,
            "metric for {reason} disagrees with /report"
        );
    }

    // The routers survived and traffic still flows.
    assert!(c.router_running(0) && c.router_running(1));
    tcp_both_ways(&c, &a, &b);
}

fn weft_demo_connects_all_pods_and_cleans_up() {
    binaries();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_weft"))
        .args(["demo", "--nodes", "2", "--pods", "2"])
        .output()
        .expect("running weft demo");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "weft demo failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    assert!(
        stdout.contains("12/12 pod pairs connected"),
        "unexpected demo output:\n{stdout}"
    );
    assert!(
        stdout.contains("Service: ipam"),
        "no weft status:\n{stdout}"
    );
    // Its namespaces are gone afterwards.
    let underlay = stdout
        .split_whitespace()
        .skip_while(|w| *w != "namespace")
        .nth(1)
        .unwrap_or_else(|| panic!("no namespace name in:\n{stdout}"));
    let prefix = underlay.trim_end_matches("-u");
    assert!(prefix.starts_with("wt"), "{underlay}");
    let left: Vec<_> = std::fs::read_dir("/var/run/netns")
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with(&format!("{prefix}-")))
                .collect()
        })
        .unwrap_or_default();
    assert!(
        left.is_empty(),
        "weft demo left namespaces behind: {left:?}"
    );
}

fn main() {
    harness::run(vec![
        harness::root(
            "pods_on_three_nodes_reach_each_other_and_the_nodes",
            pods_on_three_nodes_reach_each_other_and_the_nodes,
        ),
        harness::root(
            "cni_del_frees_the_address_and_is_idempotent",
            cni_del_frees_the_address_and_is_idempotent,
        ),
        harness::root(
            "allocations_and_connectivity_survive_sigterm_restart",
            allocations_and_connectivity_survive_sigterm_restart,
        ),
        harness::root(
            "allocations_and_connectivity_survive_sigkill_restart",
            allocations_and_connectivity_survive_sigkill_restart,
        ),
        harness::root(
            "first_connections_of_new_pods_are_not_delayed",
            first_connections_of_new_pods_are_not_delayed,
        ),
        harness::root(
            "malformed_and_foreign_datagrams_are_dropped_counted_and_harmless",
            malformed_and_foreign_datagrams_are_dropped_counted_and_harmless,
        ),
        harness::root(
            "weft_demo_connects_all_pods_and_cleans_up",
            weft_demo_connects_all_pods_and_cleans_up,
        ),
    ])
}
