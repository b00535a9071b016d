//! The namespace harness on its own, without routers: topology, traffic helpers, cleanup.
//! Needs root (creates network namespaces): ignored without it, failed under CI without it.

use std::net::SocketAddrV4;
use std::path::PathBuf;
use std::time::Duration;
use weft_testbed::{self as testbed, harness, Binaries, Cluster, ClusterSpec};

/// Binaries are not run here, so they need not exist.
fn spec(nodes: usize) -> ClusterSpec {
    let weft = PathBuf::from("/nonexistent/weft");
    let weft_cni = weft.with_file_name("weft-cni");
    ClusterSpec::new(nodes, Binaries { weft, weft_cni })
}

fn sysctl_in(ns: &str, key: &'static str) -> String {
    testbed::in_netns(ns, move || {
        let path = format!("/proc/sys/{}", key.replace('.', "/"));
        std::fs::read_to_string(&path)
            .map(|s| s.trim().to_string())
            .map_err(|e| testbed::TestbedError::Failed(format!("{path}: {e}")))
    })
    .unwrap()
}

fn topology_carries_tcp_and_udp_and_is_removed_on_drop() {
    let mut cluster = Cluster::create(spec(2)).unwrap();
    let names: Vec<String> = cluster
        .nodes
        .iter()
        .map(|n| n.ns.clone())
        .chain([cluster.underlay_ns.clone()])
        .collect();
    for ns in &names {
        assert!(testbed::netns_path(ns).exists(), "{ns} missing");
    }
    let (n1, n2) = (&cluster.nodes[0], &cluster.nodes[1]);
    assert_ne!(n1.underlay_ip, n2.underlay_ip);

    // The harness leaves forwarding to the daemon, pins rp_filter and disables IPv6.
    assert_eq!(sysctl_in(&n1.ns, "net.ipv4.ip_forward"), "0");
    assert_eq!(sysctl_in(&n1.ns, "net.ipv4.conf.all.rp_filter"), "1");
    assert_eq!(sysctl_in(&n1.ns, "net.ipv4.conf.eth0.rp_filter"), "1");
    assert_eq!(sysctl_in(&n1.ns, "net.ipv6.conf.eth0.disable_ipv6"), "1");

    let to = SocketAddrV4::new(n2.underlay_ip, testbed::next_test_port());
    let out = testbed::tcp_check(&n1.ns, &n2.ns, to, Duration::from_secs(5)).unwrap();
    assert_eq!(
        out.client_seen_as.ip(),
        std::net::IpAddr::V4(n1.underlay_ip)
    );
    let back = SocketAddrV4::new(n1.underlay_ip, testbed::next_test_port());
    testbed::tcp_check(&n2.ns, &n1.ns, back, Duration::from_secs(5)).unwrap();

    // A listener address that is not assigned in the destination namespace must fail.
    let wrong = SocketAddrV4::new(n1.underlay_ip, testbed::next_test_port());
    assert!(testbed::tcp_check(&n1.ns, &n2.ns, wrong, Duration::from_secs(2)).is_err());

    let (host_ns, host_ip) = cluster.add_underlay_host("x").unwrap();
    let n1_ns = cluster.nodes[0].ns.clone();
    let sink_addr = SocketAddrV4::new(cluster.nodes[0].underlay_ip, 16784);
    let sink = testbed::spawn_udp_sink(&n1_ns, sink_addr, Duration::from_millis(800)).unwrap();
    sink.wait_bound();
    testbed::send_udp_from_ns(&host_ns, sink_addr, b"hello").unwrap();
    let got = sink.finish().unwrap();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].0, b"hello".to_vec());
    assert_eq!(got[0].1.ip(), std::net::IpAddr::V4(host_ip));

    // Raw sends choose their source port.
    let sink = testbed::spawn_udp_sink(&n1_ns, sink_addr, Duration::from_millis(800)).unwrap();
    sink.wait_bound();
    testbed::send_udp_raw_from_ns(&host_ns, 6784, sink_addr, b"raw").unwrap();
    let got = sink.finish().unwrap();
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0].0, b"raw".to_vec());
    assert_eq!(got[0].1, std::net::SocketAddr::from((host_ip, 6784)));

    let workdir = cluster.workdir().to_path_buf();
    drop(cluster);
    for ns in names.iter().chain([&host_ns]) {
        assert!(!testbed::netns_path(ns).exists(), "{ns} left behind");
    }
    assert!(!workdir.exists(), "{} left behind", workdir.display());
}

fn clusters_get_distinct_namespaces() {
    let a = Cluster::create(spec(1)).unwrap();
    let b = Cluster::create(spec(1)).unwrap();
    assert_ne!(a.prefix, b.prefix);
    assert_ne!(a.nodes[0].ns, b.nodes[0].ns);
    assert_ne!(a.underlay_net, b.underlay_net);
}

fn main() {
    harness::run(vec![
        harness::root(
            "topology_carries_tcp_and_udp_and_is_removed_on_drop",
            topology_carries_tcp_and_udp_and_is_removed_on_drop,
        ),
        harness::root(
            "clusters_get_distinct_namespaces",
            clusters_get_distinct_namespaces,
        ),
    ])
}
