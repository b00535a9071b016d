//! `--datapath kernel` (Weave's fastdp counterpart): weft programs a Linux VXLAN device,
//! and nodes of both kinds share one cluster. Real routers in node namespaces, pods
//! attached by executing `weft-cni`; needs root (weft-testbed's harness).

use std::net::{IpAddr, SocketAddrV4};
use std::time::Duration;
use weft_testbed::{self as testbed, harness, Binaries, Cluster, ClusterSpec, Pod};

const READY: Duration = Duration::from_secs(60);
const KERNEL: &[&str] = &["--datapath", "kernel"];

fn ok<T, E: std::fmt::Display>(r: Result<T, E>, what: &str) -> T {
    r.unwrap_or_else(|e| panic!("{what}: {e}"))
}

/// `InCsumErrors` of TCP and UDP in namespace `ns`.
fn csum_errors(ns: &str) -> (u64, u64) {
    ok(testbed::csum_errors(ns), &format!("InCsumErrors in {ns}"))
}

/// n1 and n3 run the kernel path, n2 the user-space one: pods on every pair of nodes
/// reach each other both ways, bulk transfers arrive intact with no checksum errors
/// anywhere, and a restarted kernel node programs its device afresh.
fn kernel_and_user_space_nodes_interoperate() {
    let binaries = Binaries::beside(env!("CARGO_BIN_EXE_weft")).unwrap_or_else(|e| panic!("{e}"));
    let mut c = ok(
        Cluster::create(ClusterSpec::new(3, binaries)),
        "building namespaces",
    );
    for i in 0..3 {
        let args: &[&str] = if i == 1 { &[] } else { KERNEL };
        ok(
            c.start_router_with(i, args),
            &format!("starting n{}", i + 1),
        );
    }
    ok(c.wait_all_ready(READY), "waiting for readiness");

    let ns1 = c.nodes[0].ns.clone();
    let link = ok(
        testbed::ip_in(&ns1, &["-d", "link", "show", "weave"]),
        "ip link",
    );
    assert!(
        link.contains("vxlan id 30566") && link.contains("dstport 6784"),
        "n1's weave is a VXLAN device with weft's VNI and port: {link}"
    );
    assert!(link.contains("nolearning"), "{link}");
    assert!(
        link.contains(&c.nodes[0].name),
        "its MAC is the peer name: {link}"
    );
    let link2 = ok(
        testbed::ip_in(&c.nodes[1].ns, &["-d", "link", "show", "weave"]),
        "ip link n2",
    );
    assert!(link2.contains("tun"), "n2's weave is a TUN device: {link2}");

    let pods: Vec<Pod> = (0..3)
        .map(|i| ok(c.add_pod(i, &format!("p{}", i + 1)), "ADD"))
        .collect();
    let namespaces: Vec<String> = c
        .nodes
        .iter()
        .map(|n| n.ns.clone())
        .chain(pods.iter().map(|p| p.ns.clone()))
        .collect();
    let before: Vec<(u64, u64)> = namespaces.iter().map(|ns| csum_errors(ns)).collect();

    for a in &pods {
        for b in &pods {
            if a.node == b.node {
                continue;
            }
            let out = ok(
                c.tcp_pod_to_pod(a, b),
                &format!(
                    "TCP {} (n{}) -> {} (n{})",
                    a.name,
                    a.node + 1,
                    b.name,
                    b.node + 1
                ),
            );
            assert_eq!(
                out.client_seen_as.ip(),
                IpAddr::V4(a.addr),
                "no NAT inside the overlay"
            );
        }
    }
    // Bulk both ways between the kernel node n1 and the user-space node n2: the kernel
    // sends 64 KiB GSO units, the user-space side sends its own UDP GSO batches.
    for (from, to) in [
        (&pods[0], &pods[1]),
        (&pods[1], &pods[0]),
        (&pods[0], &pods[2]),
    ] {
        let port = testbed::next_test_port();
        ok(
            testbed::tcp_bulk(
                &from.ns,
                &to.ns,
                SocketAddrV4::new(to.addr, port),
                64 << 20,
                Duration::from_secs(60),
            ),
            &format!("64 MiB {} -> {}", from.name, to.name),
        );
    }
    let after: Vec<(u64, u64)> = namespaces.iter().map(|ns| csum_errors(ns)).collect();
    assert_eq!(
        before, after,
        "InCsumErrors (tcp, udp) per namespace {namespaces:?}"
    );

    // The kernel node's routes are weft's (protocol 119), one per block of each peer's
    // ranges, and the report lists the ranges as the user-space path does.
    let routes = ok(
        testbed::ip_in(&ns1, &["route", "show", "proto", "119"]),
        "ip route",
    );
    assert!(
        routes.contains("dev weave") && routes.contains("onlink"),
        "{routes}"
    );
    let report: serde_json::Value = ok(c.report(0), "report n1");
    let ranges = report["Dataplane"]["Routes"]
        .as_array()
        .map(|a| a.len())
        .unwrap_or(0);
    assert!(ranges >= 3, "{}", report["Dataplane"]);
    // Weave printed its data path in connection lines; scripts grep for "fastdp".
    let conns = report["Router"]["Connections"].to_string();
    assert!(conns.contains("fastdp 02:77:66"), "{conns}");
    let conns2 =
        ok(c.report::<serde_json::Value>(1), "report n2")["Router"]["Connections"].to_string();
    assert!(conns2.contains("vxlan 02:77:66"), "{conns2}");

    // A restart re-creates the device and its entries from scratch; a restart in the
    // other mode replaces the device with the user-space TUN.
    for (args, what) in [(KERNEL, "kernel again"), (&[][..], "user space")] {
        ok(c.stop_router(0, Duration::from_secs(15)), "stopping n1");
        ok(c.start_router_with(0, args), "restarting n1");
        ok(c.wait_ready(0, READY), "n1 ready again");
        for (from, to) in [(&pods[1], &pods[0]), (&pods[0], &pods[2])] {
            let mut last = None;
            for _ in 0..50 {
                match c.tcp_pod_to_pod(from, to) {
                    Ok(_) => {
                        last = None;
                        break;
                    }
                    Err(e) => last = Some(e),
                }
                std::thread::sleep(Duration::from_millis(200));
            }
            assert!(
                last.is_none(),
                "n1 restarted ({what}): {} -> {}: {last:?}",
                from.name,
                to.name
            );
        }
    }
    let link = ok(
        testbed::ip_in(&ns1, &["-d", "link", "show", "weave"]),
        "ip link",
    );
    assert!(
        link.contains("tun"),
        "n1's weave is a TUN device again: {link}"
    );
    let routes = ok(
        testbed::ip_in(&ns1, &["route", "show", "proto", "119"]),
        "ip route",
    );
    assert!(
        routes.trim().is_empty(),
        "no kernel-mode routes left: {routes}"
    );
}

/// The configuration refuses what the kernel path cannot do, before touching anything.
fn kernel_path_refuses_a_password() {
    let binaries = Binaries::beside(env!("CARGO_BIN_EXE_weft")).unwrap_or_else(|e| panic!("{e}"));
    let out = std::process::Command::new(&binaries.weft)
        .args(["router", "--datapath", "kernel", "--no-kube"])
        .env("WEAVE_PASSWORD", "secret")
        .output()
        .expect("run weft");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cannot encrypt"), "{err}");
}

fn main() {
    harness::run(vec![
        harness::root(
            "kernel_and_user_space_nodes_interoperate",
            kernel_and_user_space_nodes_interoperate,
        ),
        harness::plain(
            "kernel_path_refuses_a_password",
            kernel_path_refuses_a_password,
        ),
    ])
}
