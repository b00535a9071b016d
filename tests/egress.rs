//! Pods reaching the world and the world reaching pods, on a routed underlay: each node
//! in a subnet of its own behind a router namespace (EC2 subnets across zones), and an
//! "outside" host behind the router that has no route back to the overlay range — only
//! weft's NAT can bring answers back to pods.
//!
//! kube-proxy's rules are built as kube-proxy writes them (DNAT in nat prerouting and
//! output, masquerade of marked hairpin traffic), with `nft` in the node namespaces; weft
//! itself writes its table over netlink.
//!
//! Needs root (network namespaces): ignored without it, failed under CI without it.

use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4};
use std::process::Command;
use std::time::Duration;
use weft_testbed::{
    harness, next_test_port, tcp_check, tcp_check_via, udp_exchange, Binaries, Cluster,
    ClusterSpec, Pod, Underlay,
};

const READY: Duration = Duration::from_secs(60);
const T: Duration = Duration::from_secs(10);

fn ok<T, E: std::fmt::Display>(r: Result<T, E>, what: &str) -> T {
    r.unwrap_or_else(|e| panic!("{what}: {e}"))
}

fn routed(nodes: usize, mtu: u32) -> Cluster {
    let weft = std::path::PathBuf::from(env!("CARGO_BIN_EXE_weft"));
    let binaries = ok(Binaries::beside(weft), "binaries");
    let mut spec = ClusterSpec::new(nodes, binaries);
    spec.underlay = Underlay::Routed;
    spec.underlay_mtu = mtu;
    ok(Cluster::create(spec), "namespaces")
}

fn nft(ns: &str, ruleset: &str) {
    let mut child = ok(
        Command::new("ip")
            .args(["netns", "exec", ns, "nft", "-f", "-"])
            .stdin(std::process::Stdio::piped())
            .spawn(),
        "nft",
    );
    use std::io::Write;
    ok(
        child.stdin.take().unwrap().write_all(ruleset.as_bytes()),
        "nft stdin",
    );
    let st = ok(child.wait(), "nft");
    assert!(st.success(), "nft -f failed for:\n{ruleset}");
}

fn nft_list(ns: &str, what: &[&str]) -> String {
    let out = ok(
        Command::new("ip")
            .args(["netns", "exec", ns, "nft", "list"])
            .args(what)
            .output(),
        "nft list",
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn v4(a: SocketAddr) -> Ipv4Addr {
    match a.ip() {
        IpAddr::V4(v) => v,
        IpAddr::V6(_) => panic!("IPv6 {a}"),
    }
}

fn pod_addr(p: &Pod, port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(p.addr, port)
}

fn start(c: &mut Cluster) {
    ok(c.start_all(), "routers");
    ok(c.wait_all_ready(READY), "ready");
}

fn pods_reach_the_outside_masqueraded_and_nothing_else_is() {
    let mut c = routed(3, 1500);
    let (out_ns, out_ip) = ok(c.add_underlay_host("out"), "outside host");
    start(&mut c);
    let a = ok(c.add_pod(0, "a"), "pod a");
    let b = ok(c.add_pod(1, "b"), "pod b");
    let d = ok(c.add_pod(2, "d"), "pod d");

    for (p, node) in [(&a, 0usize), (&b, 1)] {
        let node_ip = c.nodes[node].underlay_ip;
        let port = next_test_port();
        let seen = ok(
            tcp_check(&p.ns, &out_ns, SocketAddrV4::new(out_ip, port), T),
            &format!("TCP {} -> outside", p.name),
        )
        .client_seen_as;
        assert_eq!(v4(seen), node_ip, "the outside sees the node's address");
        let port = next_test_port();
        let to = SocketAddrV4::new(out_ip, port);
        let seen = ok(
            udp_exchange(&p.ns, to, &out_ns, to, T),
            &format!("UDP {} -> outside", p.name),
        );
        assert_eq!(v4(seen), node_ip, "UDP too");
        eprintln!(
            "pod {} ({}) on n{} -> outside {out_ip}: TCP and UDP answered, seen as {node_ip}",
            p.name,
            p.addr,
            node + 1
        );
    }
    // Between pods nothing is translated, on one node or across nodes.
    let seen = ok(c.tcp_pod_to_pod(&a, &d), "a -> d").client_seen_as;
    assert_eq!(v4(seen), a.addr);

    let table = nft_list(&c.nodes[0].ns, &["table", "ip", "weft"]);
    eprintln!("n1: nft list table ip weft\n{table}");
    assert!(table.contains("masquerade"), "{table}");

    // A restart replaces the table: still exactly one copy, same rules.
    ok(c.restart_router(0, Duration::from_secs(20)), "restart n1");
    ok(c.wait_ready(0, READY), "n1 ready");
    let tables = nft_list(&c.nodes[0].ns, &["tables"]);
    assert_eq!(tables.matches("table ip weft").count(), 1, "{tables}");
    let again = nft_list(&c.nodes[0].ns, &["table", "ip", "weft"]);
    let rules = |t: &str| t.lines().filter(|l| l.contains("comment \"weft:")).count();
    assert_eq!(rules(&again), rules(&table), "{again}");
    assert_eq!(rules(&again), 3);
    ok(
        tcp_check(
            &a.ns,
            &out_ns,
            SocketAddrV4::new(out_ip, next_test_port()),
            T,
        ),
        "TCP after the restart",
    );

    // `weft reset` removes it.
    let (done, out, err) = ok(c.weft_cli(0, &["reset"]), "weft reset");
    assert!(done, "{out}{err}");
    assert!(!nft_list(&c.nodes[0].ns, &["tables"]).contains("table ip weft"));
}

/// kube-proxy's nat rules for a ClusterIP Service with one endpoint (nft syntax of what
/// iptables-nft writes for KUBE-SERVICES / KUBE-SEP / KUBE-MARK-MASQ / KUBE-POSTROUTING).
fn kube_proxy_rules(vip: Ipv4Addr, port: u16, endpoint: SocketAddrV4) -> String {
    let ep_ip = endpoint.ip();
    format!(
        "table ip kube-proxy-test {{
  chain prerouting {{
    type nat hook prerouting priority dstnat; policy accept;
    ip saddr {ep_ip} ip daddr {vip} tcp dport {port} meta mark set 0x4000
    ip daddr {vip} tcp dport {port} dnat to {endpoint}
  }}
  chain output {{
    type nat hook output priority -100; policy accept;
    ip daddr {vip} tcp dport {port} dnat to {endpoint}
  }}
  chain postrouting {{
    type nat hook postrouting priority srcnat; policy accept;
    meta mark 0x4000 masquerade
  }}
}}
"
    )
}

fn services_node_ports_and_the_control_plane_s_way_in() {
    let mut c = routed(3, 1500);
    let (out_ns, out_ip) = ok(c.add_underlay_host("out"), "outside host");
    start(&mut c);
    let a = ok(c.add_pod(0, "a"), "pod a");
    let b = ok(c.add_pod(1, "b"), "pod b");
    let d = ok(c.add_pod(2, "d"), "pod d");

    // ClusterIP: pod a on n1 -> 10.96.0.10:80 -> pod d on n3, and back; d sees a itself.
    let ep = pod_addr(&d, next_test_port());
    let vip: Ipv4Addr = "10.96.0.10".parse().unwrap();
    nft(&c.nodes[0].ns, &kube_proxy_rules(vip, 80, ep));
    let seen = ok(
        tcp_check_via(&a.ns, SocketAddrV4::new(vip, 80), &d.ns, ep, T),
        "pod a -> Service -> pod d",
    )
    .client_seen_as;
    assert_eq!(v4(seen), a.addr, "no NAT between pods through a Service");
    eprintln!(
        "Service {vip}:80 on n1 -> endpoint {ep} on n3: answered, seen as {}",
        a.addr
    );

    // Hairpin: pod a reaches itself through a Service (kube-proxy masquerades it).
    let self_ep = pod_addr(&a, next_test_port());
    let vip2: Ipv4Addr = "10.96.0.11".parse().unwrap();
    nft(
        &c.nodes[0].ns,
        &kube_proxy_rules(vip2, 80, self_ep).replace("kube-proxy-test", "kube-proxy-hairpin"),
    );
    let seen = ok(
        tcp_check_via(&a.ns, SocketAddrV4::new(vip2, 80), &a.ns, self_ep, T),
        "hairpin",
    )
    .client_seen_as;
    eprintln!("hairpin: pod a -> {vip2}:80 -> itself, seen as {seen}");

    // NodePort on n2 from the outside: to a local pod the client's address is kept
    // (NO_MASQ_LOCAL); to a pod on another node, answered through n2.
    let n2 = c.nodes[1].underlay_ip;
    let local_ep = pod_addr(&b, next_test_port());
    let remote_ep = pod_addr(&d, next_test_port());
    nft(
        &c.nodes[1].ns,
        &format!(
            "table ip kube-nodeport-test {{
  chain prerouting {{
    type nat hook prerouting priority dstnat; policy accept;
    tcp dport 30080 dnat to {local_ep}
    tcp dport 30081 dnat to {remote_ep}
  }}
}}
"
        ),
    );
    let seen = ok(
        tcp_check_via(&out_ns, SocketAddrV4::new(n2, 30080), &b.ns, local_ep, T),
        "outside -> NodePort n2 -> local pod",
    )
    .client_seen_as;
    assert_eq!(v4(seen), out_ip, "the local pod sees the outside client");
    eprintln!("NodePort {n2}:30080 -> pod b on n2: seen as {seen} (the outside host)");
    let seen = ok(
        tcp_check_via(&out_ns, SocketAddrV4::new(n2, 30081), &d.ns, remote_ep, T),
        "outside -> NodePort n2 -> pod on n3",
    )
    .client_seen_as;
    eprintln!("NodePort {n2}:30081 -> pod d on n3: seen as {seen} (n2's overlay address)");

    // The control plane's way in: the underlay routes the range to n1 (a VPC route table
    // entry); the outside host reaches pods on every node.
    let n1 = c.nodes[0].underlay_ip;
    ok(
        weft_testbed::ip_in(
            &c.underlay_ns,
            &["route", "add", "192.168.0.0/16", "via", &n1.to_string()],
        ),
        "route the range to n1",
    );
    for p in [&a, &b, &d] {
        let seen = ok(
            tcp_check(&out_ns, &p.ns, pod_addr(p, next_test_port()), T),
            &format!("outside -> pod {} on n{}", p.name, p.node + 1),
        )
        .client_seen_as;
        eprintln!(
            "outside {out_ip} -> pod {} ({}) on n{} via n1: answered, seen as {seen}",
            p.name,
            p.addr,
            p.node + 1
        );
        if p.node == 0 {
            assert_eq!(v4(seen), out_ip, "a pod on n1 sees the outside host");
        }
    }
}

fn a_jumbo_underlay_gives_pods_jumbo_frames_and_a_smaller_path_is_learnt() {
    let mut c = routed(3, 9001);
    start(&mut c);
    let a = ok(c.add_pod(0, "a"), "pod a");
    let d = ok(c.add_pod(2, "d"), "pod d");
    let link = ok(
        weft_testbed::ip_in(&a.ns, &["link", "show", "eth0"]),
        "pod link",
    );
    assert!(
        link.contains("mtu 8951"),
        "pod MTU from a 9001 underlay: {link}"
    );
    eprintln!("pod eth0: {}", link.lines().next().unwrap_or("").trim());
    let took = ok(
        weft_testbed::tcp_bulk(
            &a.ns,
            &d.ns,
            pod_addr(&d, next_test_port()),
            100 << 20,
            Duration::from_secs(60),
        ),
        "100 MB pod a -> pod d",
    );
    eprintln!(
        "100 MB pod a (n1) -> pod d (n3), DF set, MTU 8951: intact in {:.2} s",
        took.as_secs_f64()
    );

    // Mid-transfer, the path to n3 shrinks to 1500 (the router's link to n3): the router
    // answers n1 with ICMP fragmentation needed, weft on n1 learns it and tells pod a's
    // TCP, which goes on with smaller segments.
    let to = pod_addr(&d, next_test_port());
    let (a_ns, d_ns) = (a.ns.clone(), d.ns.clone());
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = done.clone();
    let transfer = std::thread::spawn(move || {
        let r = weft_testbed::tcp_bulk(&a_ns, &d_ns, to, 1 << 30, Duration::from_secs(60));
        flag.store(true, std::sync::atomic::Ordering::SeqCst);
        r
    });
    std::thread::sleep(Duration::from_millis(300));
    ok(
        weft_testbed::ip_in(&c.underlay_ns, &["link", "set", "n3", "mtu", "1500"]),
        "shrink the path to n3",
    );
    ok(
        weft_testbed::ip_in(&c.nodes[2].ns, &["link", "set", "eth0", "mtu", "1500"]),
        "shrink n3's own link",
    );
    assert!(
        !done.load(std::sync::atomic::Ordering::SeqCst),
        "the transfer must still be running when the path shrinks"
    );
    let took = ok(transfer.join().unwrap(), "1 GiB across the shrinking path");
    eprintln!(
        "1 GiB pod a -> pod d, path to n3 cut to 1500 mid-transfer: intact in {:.2} s",
        took.as_secs_f64()
    );
    let route = ok(
        weft_testbed::ip_in(&a.ns, &["route", "get", &d.addr.to_string()]),
        "pod a's route to d",
    );
    assert!(
        route.contains("mtu 1450"),
        "pod a learnt the path MTU: {route}"
    );
    eprintln!(
        "pod a: ip route get {}: {}",
        d.addr,
        route.split_whitespace().collect::<Vec<_>>().join(" ")
    );
    let log = std::fs::read_to_string(&c.nodes[0].log).unwrap_or_default();
    let line = log
        .lines()
        .find(|l| l.contains("path MTU to n3"))
        .unwrap_or_else(|| panic!("n1 logs the path MTU: {log}"));
    eprintln!("n1: {line}");
}

fn main() {
    harness::run(vec![
        harness::root_with(
            "pods_reach_the_outside_masqueraded_and_nothing_else_is",
            &["nft"],
            pods_reach_the_outside_masqueraded_and_nothing_else_is,
        ),
        harness::root_with(
            "services_node_ports_and_the_control_plane_s_way_in",
            &["nft"],
            services_node_ports_and_the_control_plane_s_way_in,
        ),
        harness::root(
            "a_jumbo_underlay_gives_pods_jumbo_frames_and_a_smaller_path_is_learnt",
            a_jumbo_underlay_gives_pods_jumbo_frames_and_a_smaller_path_is_learnt,
        ),
    ])
}
