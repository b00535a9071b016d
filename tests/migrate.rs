//! A node that ran Weave Net: its `weave` bridge, datapath links and attached pods are
//! still there when weft's router starts (as after `kubectl delete -f weave-daemonset` and
//! applying weft). Built with `ip` exactly as Weave's plugin left them.
//!
//! Needs root (network namespaces): ignored without it, failed under CI without it.

use std::time::{Duration, Instant};
use weft_testbed::{harness, ip_in, Binaries, Cluster, ClusterSpec};

const READY: Duration = Duration::from_secs(60);

fn ok<T, E: std::fmt::Display>(r: Result<T, E>, what: &str) -> T {
    r.unwrap_or_else(|e| panic!("{what}: {e}"))
}

/// A pod as Weave's plugin attached it: `vethwepl<id>` on the node, enslaved to the
/// `weave` bridge, `eth0` with `addr` in the pod.
fn weave_pod(c: &mut Cluster, node_ns: &str, name: &str, veth: &str, addr: &str) -> String {
    let pod = ok(c.add_netns(name), "pod namespace");
    ok(
        ip_in(
            node_ns,
            &[
                "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", &pod,
            ],
        ),
        "veth",
    );
    ok(
        ip_in(node_ns, &["link", "set", veth, "master", "weave", "up"]),
        "enslave",
    );
    ok(
        ip_in(&pod, &["addr", "add", addr, "dev", "eth0"]),
        "pod address",
    );
    ok(ip_in(&pod, &["link", "set", "eth0", "up"]), "pod link up");
    pod
}

fn owned(c: &Cluster) -> serde_json::Value {
    ok(ok(c.http_get(0, "/ip"), "GET /ip").json(), "json")["owned"].clone()
}

fn holds(c: &Cluster, id: &str) -> Option<String> {
    owned(c)
        .as_array()?
        .iter()
        .find(|o| o["id"] == id || o[0] == id)
        .map(|o| o.to_string())
}

fn weave_s_leftovers_are_replaced_and_its_pods_addresses_never_handed_out() {
    let weft = std::path::PathBuf::from(env!("CARGO_BIN_EXE_weft"));
    let binaries = ok(Binaries::beside(weft), "binaries");
    let mut c = ok(Cluster::create(ClusterSpec::new(1, binaries)), "namespaces");
    let ns = c.nodes[0].ns.clone();
    // Weave's bridge with its address in the range, and its fast-datapath veth pair.
    ok(
        ip_in(&ns, &["link", "add", "weave", "type", "bridge"]),
        "bridge",
    );
    ok(
        ip_in(&ns, &["addr", "add", "192.168.0.1/16", "dev", "weave"]),
        "bridge address",
    );
    ok(ip_in(&ns, &["link", "set", "weave", "up"]), "bridge up");
    ok(
        ip_in(
            &ns,
            &[
                "link",
                "add",
                "vethwe-bridge",
                "type",
                "veth",
                "peer",
                "name",
                "vethwe-datapath",
            ],
        ),
        "datapath veths",
    );
    weave_pod(&mut c, &ns, "wa", "vethwepl1111111", "192.168.77.7/16");
    weave_pod(&mut c, &ns, "wb", "vethwepl2222222", "192.168.88.8/16");
    // A pod of Weave's default range (10.32.0.0/12): not in weft's, nothing to protect.
    weave_pod(&mut c, &ns, "wc", "vethwepl3333333", "10.32.0.5/12");

    ok(c.start_router(0), "router");
    ok(
        c.wait_ready(0, READY),
        "router ready (the TUN device got the bridge's name)",
    );
    let log = std::fs::read_to_string(&c.nodes[0].log).unwrap();
    let lines: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("taking over from Weave Net"))
        .collect();
    assert_eq!(lines.len(), 1, "one log line: {log}");
    eprintln!("{}", lines[0]);
    assert!(
        lines[0].contains("removed weave, vethwe-bridge, vethwe-datapath")
            && lines[0].contains("3 pods were attached to its bridge; 2 of their addresses"),
        "{}",
        lines[0]
    );
    let link = ok(ip_in(&ns, &["-d", "link", "show", "weave"]), "weave link");
    assert!(
        link.contains("tun"),
        "weave is weft's TUN device now: {link}"
    );
    assert!(ip_in(&ns, &["link", "show", "vethwe-bridge"]).is_err());

    // The pods' addresses are held before anything is allocated.
    let all = owned(&c).to_string();
    assert!(
        all.contains("weave-migrated:vethwepl1111111") && all.contains("192.168.77.7"),
        "{all}"
    );
    assert!(
        all.contains("weave-migrated:vethwepl2222222") && all.contains("192.168.88.8"),
        "{all}"
    );
    assert!(!all.contains("10.32.0.5"), "{all}");
    let claim = ok(c.http(0, "PUT", "/ip/probe/192.168.77.7/16"), "claim");
    assert_eq!(claim.status, 409, "{}", claim.body);
    assert!(
        claim.body.contains("weave-migrated:vethwepl1111111"),
        "{}",
        claim.body
    );

    // The pod is deleted (its veth goes): the address is free again, the other stays held.
    ok(
        ip_in(&ns, &["link", "del", "vethwepl1111111"]),
        "delete pod veth",
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while holds(&c, "weave-migrated:vethwepl1111111").is_some()
        || owned(&c).to_string().contains("192.168.77.7")
    {
        assert!(Instant::now() < deadline, "not released: {}", owned(&c));
        std::thread::sleep(Duration::from_millis(500));
    }
    assert!(owned(&c).to_string().contains("192.168.88.8"));
    let claim = ok(c.http(0, "PUT", "/ip/probe/192.168.77.7/16"), "claim");
    assert_eq!(claim.status, 204, "{}", claim.body);

    // A restart keeps what is held (state, and the veth still there), takes nothing down.
    ok(c.restart_router(0, Duration::from_secs(20)), "restart");
    ok(c.wait_ready(0, READY), "ready again");
    let all = owned(&c).to_string();
    assert!(
        all.contains("192.168.88.8") && all.contains("192.168.77.7"),
        "{all}"
    );
}

fn main() {
    harness::run(vec![harness::root(
        "weave_s_leftovers_are_replaced_and_its_pods_addresses_never_handed_out",
        weave_s_leftovers_are_replaced_and_its_pods_addresses_never_handed_out,
    )])
}
