//! The policy table as the kernel runs it: `io::nft_policy` writes the table
//! `core::policy::ruleset` plans into a node namespace with pods behind veths named as
//! weft-cni names them, and real connections are let through or dropped as the policy
//! says — by port, protocol, peer and named port, with replies passing and the node's own
//! traffic untouched — and `nft list` reads back what was written. Then the table is
//! replaced (a policy changed) and removed.
//!
//! Needs root and nft (to read the table back; weft itself never runs it).

use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::time::Duration;
use weft::core::policy::model::*;
use weft::core::policy::ruleset::{build, Options};
use weft::core::policy::{compile, Cluster as PolicyCluster};
use weft_testbed::{
    harness, in_netns, ip_in, spawn_in_netns, tcp_check, Binaries, Cluster, ClusterSpec,
};

fn ok<T, E: std::fmt::Display>(r: Result<T, E>, what: &str) -> T {
    r.unwrap_or_else(|e| panic!("{what}: {e}"))
}

const NODE_ADDR: Ipv4Addr = Ipv4Addr::new(192, 168, 0, 1);

/// A node namespace with three pods wired as weft-cni wires them (host veth
/// `vethwepl...`, a /32 route, proxy ARP, the pod's default route via the node).
struct Bed {
    c: Cluster,
    node: String,
    pods: Vec<(String, Ipv4Addr)>,
}

fn bed() -> Bed {
    let weft = std::path::PathBuf::from(env!("CARGO_BIN_EXE_weft"));
    let mut spec = ClusterSpec::new(1, ok(Binaries::beside(weft), "binaries"));
    spec.rp_filter = 0;
    let mut c = ok(Cluster::create(spec), "namespaces");
    let node = c.nodes[0].ns.clone();
    ok(
        in_netns(&node, || {
            std::fs::write("/proc/sys/net/ipv4/ip_forward", "1")
                .map_err(|e| weft_testbed::TestbedError::Failed(e.to_string()))
        }),
        "forwarding",
    );
    // The node's own address (weft's is on its `weave` link); on lo here.
    ok(
        ip_in(
            &node,
            &["addr", "add", &format!("{NODE_ADDR}/32"), "dev", "lo"],
        ),
        "addr",
    );
    let mut pods = Vec::new();
    for (i, addr) in [[192, 168, 0, 5], [192, 168, 0, 6], [192, 168, 0, 7]]
        .into_iter()
        .enumerate()
    {
        let addr = Ipv4Addr::from(addr);
        let ns = ok(c.add_netns(&format!("p{i}")), "pod namespace");
        let host = format!("vethwepl000000{i}");
        ok(
            ip_in(
                &node,
                &[
                    "link", "add", &host, "type", "veth", "peer", "name", "eth0", "netns", &ns,
                ],
            ),
            "veth",
        );
        ok(ip_in(&node, &["link", "set", &host, "up"]), "up");
        ok(
            in_netns(&node, {
                let host = host.clone();
                move || {
                    std::fs::write(format!("/proc/sys/net/ipv4/conf/{host}/proxy_arp"), "1")
                        .map_err(|e| weft_testbed::TestbedError::Failed(e.to_string()))
                }
            }),
            "proxy arp",
        );
        ok(
            ip_in(
                &node,
                &["route", "add", &format!("{addr}/32"), "dev", &host],
            ),
            "route",
        );
        ok(
            ip_in(&ns, &["addr", "add", &format!("{addr}/32"), "dev", "eth0"]),
            "pod addr",
        );
        ok(ip_in(&ns, &["link", "set", "eth0", "up"]), "pod up");
        ok(
            ip_in(
                &ns,
                &["route", "add", &format!("{NODE_ADDR}/32"), "dev", "eth0"],
            ),
            "pod route",
        );
        ok(
            ip_in(
                &ns,
                &[
                    "route",
                    "add",
                    "default",
                    "via",
                    &NODE_ADDR.to_string(),
                    "dev",
                    "eth0",
                    "onlink",
                ],
            ),
            "pod default",
        );
        pods.push((ns, addr));
    }
    Bed { c, node, pods }
}

fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn policy_cluster(bed: &Bed, allow_port: u16) -> PolicyCluster {
    let mut c = PolicyCluster::default();
    for (i, (_, ip)) in bed.pods.iter().enumerate() {
        let mut p = Pod {
            key: Key::new("x", format!("p{i}")),
            labels: labels(&[("pod", &format!("p{i}"))]),
            ip: Some(*ip),
            node: Some("n1".into()),
            host_network: false,
            finished: false,
            named_ports: Vec::new(),
        };
        if i == 0 {
            p.named_ports.push(NamedPort {
                name: "dns".into(),
                proto: Proto::Udp,
                port: 5353,
            });
        }
        c.pods.insert(p.key.clone(), p);
    }
    // p0 takes TCP `allow_port` and its named UDP port "dns" from p1 only; p2 may send
    // nothing but to p0's TCP `allow_port`.
    let port = |proto, p: PortRef| PortSpec {
        proto,
        port: Some(p),
        end_port: None,
    };
    c.policies.insert(
        Key::new("x", "p0-in"),
        Policy {
            key: Key::new("x", "p0-in"),
            pod_selector: Selector {
                match_labels: labels(&[("pod", "p0")]),
                match_expressions: Vec::new(),
            },
            ingress: Some(vec![Rule {
                peers: vec![Peer::Pods {
                    pods: Some(Selector {
                        match_labels: labels(&[("pod", "p1")]),
                        match_expressions: Vec::new(),
                    }),
                    namespaces: None,
                }],
                ports: vec![
                    port(Proto::Tcp, PortRef::Number(allow_port)),
                    port(Proto::Udp, PortRef::Name("dns".into())),
                    // endPort: TCP 7000-7010.
                    PortSpec {
                        proto: Proto::Tcp,
                        port: Some(PortRef::Number(7000)),
                        end_port: Some(7010),
                    },
                ],
            }]),
            egress: None,
        },
    );
    c.policies.insert(
        Key::new("x", "p2-out"),
        Policy {
            key: Key::new("x", "p2-out"),
            pod_selector: Selector {
                match_labels: labels(&[("pod", "p2")]),
                match_expressions: Vec::new(),
            },
            ingress: None,
            egress: Some(vec![Rule {
                peers: vec![Peer::IpBlock {
                    cidr: "192.168.0.5/32".parse().unwrap(),
                    except: Vec::new(),
                }],
                ports: vec![port(Proto::Tcp, PortRef::Number(allow_port))],
            }]),
        },
    );
    c
}

fn install(bed: &Bed, allow_port: u16) -> String {
    let compiled = compile(&policy_cluster(bed, allow_port), "n1");
    let table = build(
        &compiled,
        &Options {
            allow_mcast: true,
            pod_link_prefix: "vethwepl".into(),
        },
    );
    ok(
        in_netns(&bed.node, move || {
            weft::io::nft_policy::install(&table, "test")
                .map_err(|e| weft_testbed::TestbedError::Failed(e.to_string()))
        }),
        "installing the policy table",
    );
    let out = std::process::Command::new("ip")
        .args([
            "netns",
            "exec",
            &bed.node,
            "nft",
            "list",
            "table",
            "ip",
            "weft_policy",
        ])
        .output()
        .expect("nft");
    assert!(
        out.status.success(),
        "nft list: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn tcp(bed: &Bed, from: usize, to: usize, port: u16) -> bool {
    let (from_ns, _) = &bed.pods[from];
    let (to_ns, to_ip) = &bed.pods[to];
    tcp_check(
        from_ns,
        to_ns,
        SocketAddrV4::new(*to_ip, port),
        Duration::from_millis(700),
    )
    .is_ok()
}

fn udp(bed: &Bed, from: usize, to: usize, port: u16) -> bool {
    let (from_ns, _) = bed.pods[from].clone();
    let (to_ns, to_ip) = bed.pods[to].clone();
    let server = ok(
        spawn_in_netns(&to_ns, move || {
            let s = UdpSocket::bind(SocketAddrV4::new(to_ip, port))
                .map_err(|e| weft_testbed::TestbedError::Failed(e.to_string()))?;
            s.set_read_timeout(Some(Duration::from_millis(1500))).ok();
            let mut buf = [0u8; 64];
            if let Ok((n, peer)) = s.recv_from(&mut buf) {
                let _ = s.send_to(&buf[..n], peer);
            }
            Ok(())
        }),
        "udp server",
    );
    std::thread::sleep(Duration::from_millis(100));
    let got = ok(
        in_netns(&from_ns, move || {
            let s = UdpSocket::bind("0.0.0.0:0")
                .map_err(|e| weft_testbed::TestbedError::Failed(e.to_string()))?;
            s.set_read_timeout(Some(Duration::from_millis(700))).ok();
            let _ = s.send_to(b"ping", SocketAddrV4::new(to_ip, port));
            let mut buf = [0u8; 64];
            Ok(s.recv(&mut buf).is_ok())
        }),
        "udp client",
    );
    let _ = server.join();
    got
}

fn the_kernel_enforces_the_planned_table() {
    let bed = bed();
    assert!(tcp(&bed, 1, 0, 80), "p1 -> p0 before any policy");
    let listed = install(&bed, 80);
    eprintln!("{listed}");
    assert!(
        listed.contains("iifname \"vethwepl*\" ip saddr vmap @egress"),
        "{listed}"
    );
    assert!(
        listed.contains("log prefix \"weft-policy in \" group 86"),
        "{listed}"
    );

    assert!(tcp(&bed, 1, 0, 80), "p1 -> p0 TCP 80 is allowed");
    assert!(!tcp(&bed, 1, 0, 81), "p1 -> p0 TCP 81 is not");
    assert!(!tcp(&bed, 2, 1, 80), "p2 may send only to p0");
    assert!(!tcp(&bed, 2, 0, 80), "p2 -> p0: p0 takes only p1");
    assert!(
        udp(&bed, 1, 0, 5353),
        "p1 -> p0's named port dns (UDP 5353)"
    );
    assert!(
        tcp(&bed, 1, 0, 7005),
        "p1 -> p0 TCP 7005, inside 7000-7010 (endPort)"
    );
    assert!(!tcp(&bed, 1, 0, 7011), "p1 -> p0 TCP 7011, past endPort");
    assert!(!udp(&bed, 1, 0, 5354), "p1 -> p0 UDP 5354 is not allowed");
    assert!(
        tcp(&bed, 0, 1, 9000),
        "p0 is not isolated for egress, p1 not for ingress"
    );
    // The node reaches its pods and they reach it, whatever the policy (input, output).
    let node_to_p0 = tcp_check(
        &bed.node,
        &bed.pods[0].0,
        SocketAddrV4::new(bed.pods[0].1, 7777),
        Duration::from_millis(700),
    );
    assert!(node_to_p0.is_ok(), "node -> p0: {node_to_p0:?}");

    // A policy change replaces the table whole: port 81 instead of 80.
    let listed = install(&bed, 81);
    assert!(!tcp(&bed, 1, 0, 80), "after the change, 80 is closed");
    assert!(tcp(&bed, 1, 0, 81), "and 81 open");
    assert_eq!(
        listed.matches("table ip weft_policy").count(),
        1,
        "one table, replaced"
    );
    let (tag, rules) = ok(
        in_netns(&bed.node, || {
            weft::io::nft_policy::installed()
                .map_err(|e| weft_testbed::TestbedError::Failed(e.to_string()))
        }),
        "reading the table back",
    )
    .expect("the table is there");
    assert_eq!(tag, "test");
    assert_eq!(rules, 4, "forward: established, multicast, egress, ingress");

    ok(
        in_netns(&bed.node, || {
            weft::io::nft_policy::remove()
                .map_err(|e| weft_testbed::TestbedError::Failed(e.to_string()))
        }),
        "removing",
    );
    assert!(tcp(&bed, 1, 0, 80), "no table, no policy");
    drop(bed.c);
}

fn main() {
    harness::run(vec![harness::root_with(
        "the_kernel_enforces_the_planned_table",
        &["nft"],
        the_kernel_enforces_the_planned_table,
    )]);
}
