use super::compile::{compile, RangeSet};
use super::eval::{evaluate, Flow};
use super::model::*;
use super::ruleset::{build, Options, Packet};
use ipnet::Ipv4Net;
use proptest::prelude::*;
use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn sel(pairs: &[(&str, &str)]) -> Selector {
    Selector {
        match_labels: labels(pairs),
        match_expressions: Vec::new(),
    }
}

fn pod(ns: &str, name: &str, ip: [u8; 4], node: &str, l: &[(&str, &str)]) -> Pod {
    Pod {
        key: Key::new(ns, name),
        labels: labels(l),
        ip: Some(Ipv4Addr::from(ip)),
        node: Some(node.into()),
        host_network: false,
        finished: false,
        named_ports: Vec::new(),
    }
}

fn tcp(src: Ipv4Addr, dst: Ipv4Addr, port: u16) -> Flow {
    Flow {
        src,
        dst,
        proto: Some(Proto::Tcp),
        port,
    }
}

const OPTS: fn() -> Options = || Options {
    allow_mcast: true,
    pod_link_prefix: "vethwepl".into(),
};

#[test]
fn selectors_match_labels_and_expressions() {
    let l = labels(&[("app", "web"), ("tier", "front")]);
    assert!(Selector::default().matches(&l));
    assert!(sel(&[("app", "web")]).matches(&l));
    assert!(!sel(&[("app", "db")]).matches(&l));
    let expr = |op, vals: &[&str]| Selector {
        match_labels: Labels::new(),
        match_expressions: vec![Requirement {
            key: "app".into(),
            operator: op,
            values: vals.iter().map(|s| s.to_string()).collect(),
        }],
    };
    assert!(expr(Operator::In, &["web", "api"]).matches(&l));
    assert!(!expr(Operator::NotIn, &["web"]).matches(&l));
    assert!(expr(Operator::NotIn, &["web"]).matches(&labels(&[])));
    assert!(expr(Operator::Exists, &[]).matches(&l));
    assert!(expr(Operator::DoesNotExist, &[]).matches(&labels(&[("x", "y")])));
}

#[test]
fn range_sets_merge_and_subtract() {
    let mut s = RangeSet::default();
    s.insert(10, 20);
    s.insert(21, 30);
    s.insert(5, 7);
    assert_eq!(s.ranges(), &[(5, 7), (10, 30)]);
    s.insert(8, 9);
    assert_eq!(s.ranges(), &[(5, 30)]);
    s.remove(12, 14);
    assert_eq!(s.ranges(), &[(5, 11), (15, 30)]);
    assert!(s.contains(Ipv4Addr::from(11)));
    assert!(!s.contains(Ipv4Addr::from(13)));
    s.insert(0, u32::MAX);
    assert_eq!(s.ranges(), &[(0, u32::MAX)]);
}

/// A namespace x whose pod a (node n1) only x/b may reach on TCP 80: the compiled rules,
/// the table and the direct evaluation agree, and the table reads as expected.
#[test]
fn allow_from_one_pod_on_one_port() {
    let mut c = Cluster::default();
    for ns in ["x", "y"] {
        c.namespaces.insert(
            ns.into(),
            Namespace {
                name: ns.into(),
                labels: Labels::new(),
            },
        );
    }
    let a = pod("x", "a", [192, 168, 0, 5], "n1", &[("pod", "a")]);
    let b = pod("x", "b", [192, 168, 1, 6], "n2", &[("pod", "b")]);
    let ya = pod("y", "a", [192, 168, 0, 7], "n1", &[("pod", "a")]);
    for p in [&a, &b, &ya] {
        c.pods.insert(p.key.clone(), p.clone());
    }
    c.policies.insert(
        Key::new("x", "allow-b"),
        Policy {
            key: Key::new("x", "allow-b"),
            pod_selector: sel(&[("pod", "a")]),
            ingress: Some(vec![Rule {
                peers: vec![Peer::Pods {
                    pods: Some(sel(&[("pod", "b")])),
                    namespaces: None,
                }],
                ports: vec![PortSpec {
                    proto: Proto::Tcp,
                    port: Some(PortRef::Number(80)),
                    end_port: None,
                }],
            }]),
            egress: None,
        },
    );
    let (ia, ib, iya) = (a.ip.unwrap(), b.ip.unwrap(), ya.ip.unwrap());
    assert!(evaluate(&c, &tcp(ib, ia, 80)).allowed());
    assert!(!evaluate(&c, &tcp(ib, ia, 81)).allowed());
    assert!(!evaluate(&c, &tcp(iya, ia, 80)).allowed());
    assert!(
        evaluate(&c, &tcp(ia, ib, 81)).allowed(),
        "a is not isolated for egress"
    );
    let v = evaluate(&c, &tcp(iya, ia, 80));
    assert_eq!(v.ingress.isolating, vec![Key::new("x", "allow-b")]);
    assert!(v.ingress.allowing.is_empty());

    let n1 = compile(&c, "n1");
    assert!(n1.pods[&ia].ingress.is_some());
    assert!(n1.pods[&iya].ingress.is_none());
    let table = build(&n1, &OPTS());
    let text = table.to_string();
    assert!(
        text.contains("oifname \"vethwepl*\" ip daddr vmap @ingress"),
        "{text}"
    );
    assert!(
        text.contains("elements = { 192.168.0.5 : jump in_c0a80005 }"),
        "{text}"
    );
    assert!(text.contains("elements = { 192.168.1.6 }"), "{text}");
    let pkt = |src: Ipv4Addr, port, iif: &str| Packet {
        src,
        dst: ia,
        proto: 6,
        dport: port,
        iif: iif.into(),
        oif: "vethwepl1234567".into(),
        established: false,
    };
    assert!(table.judge(&pkt(ib, 80, "weave")));
    assert!(!table.judge(&pkt(ib, 81, "weave")));
    assert!(!table.judge(&pkt(iya, 80, "vethwepl7654321")));
    assert!(
        table.judge(&Packet {
            established: true,
            ..pkt(iya, 81, "weave")
        }),
        "replies and established connections pass"
    );
}

#[test]
fn named_ports_resolve_against_the_destination_pod() {
    let mut c = Cluster::default();
    let mut srv1 = pod("x", "s1", [192, 168, 0, 10], "n1", &[("app", "srv")]);
    srv1.named_ports = vec![NamedPort {
        name: "http".into(),
        proto: Proto::Tcp,
        port: 8080,
    }];
    let mut srv2 = pod("x", "s2", [192, 168, 1, 10], "n2", &[("app", "srv")]);
    srv2.named_ports = vec![NamedPort {
        name: "http".into(),
        proto: Proto::Tcp,
        port: 9090,
    }];
    let cl = pod("x", "cl", [192, 168, 0, 20], "n1", &[("app", "client")]);
    for p in [&srv1, &srv2, &cl] {
        c.pods.insert(p.key.clone(), p.clone());
    }
    let named = |ingress: bool| Rule {
        peers: if ingress {
            Vec::new()
        } else {
            vec![Peer::Pods {
                pods: Some(sel(&[("app", "srv")])),
                namespaces: None,
            }]
        },
        ports: vec![PortSpec {
            proto: Proto::Tcp,
            port: Some(PortRef::Name("http".into())),
            end_port: None,
        }],
    };
    c.policies.insert(
        Key::new("x", "in"),
        Policy {
            key: Key::new("x", "in"),
            pod_selector: sel(&[("app", "srv")]),
            ingress: Some(vec![named(true)]),
            egress: None,
        },
    );
    c.policies.insert(
        Key::new("x", "out"),
        Policy {
            key: Key::new("x", "out"),
            pod_selector: sel(&[("app", "client")]),
            ingress: None,
            egress: Some(vec![named(false)]),
        },
    );
    let (s1, s2, ci) = (srv1.ip.unwrap(), srv2.ip.unwrap(), cl.ip.unwrap());
    for (dst, port, want) in [
        (s1, 8080, true),
        (s1, 9090, false),
        (s2, 9090, true),
        (s2, 8080, false),
    ] {
        assert_eq!(
            evaluate(&c, &tcp(ci, dst, port)).allowed(),
            want,
            "{dst}:{port}"
        );
        let src_node = compile(&c, "n1");
        let dst_node = compile(&c, if dst == s1 { "n1" } else { "n2" });
        let f = tcp(ci, dst, port);
        let got = src_node.pods[&ci]
            .egress
            .as_ref()
            .unwrap()
            .allows(dst, f.proto, port)
            && dst_node.pods[&dst]
                .ingress
                .as_ref()
                .unwrap()
                .allows(ci, f.proto, port);
        assert_eq!(got, want, "compiled {dst}:{port}");
    }
}

#[test]
fn an_address_in_both_cidr_and_except_may_be_allowed_by_another_peer() {
    let mut c = Cluster::default();
    let a = pod("x", "a", [192, 168, 0, 5], "n1", &[("pod", "a")]);
    c.pods.insert(a.key.clone(), a.clone());
    let block = |cidr: &str, except: &[&str]| Peer::IpBlock {
        cidr: cidr.parse().unwrap(),
        except: except.iter().map(|e| e.parse().unwrap()).collect(),
    };
    c.policies.insert(
        Key::new("x", "p"),
        Policy {
            key: Key::new("x", "p"),
            pod_selector: Selector::default(),
            ingress: Some(vec![Rule {
                peers: vec![
                    block("10.0.0.0/8", &["10.1.0.0/16"]),
                    block("10.1.2.0/24", &[]),
                ],
                ports: Vec::new(),
            }]),
            egress: None,
        },
    );
    let ia = a.ip.unwrap();
    let ok = |s: [u8; 4]| evaluate(&c, &tcp(Ipv4Addr::from(s), ia, 80)).allowed();
    assert!(ok([10, 2, 3, 4]));
    assert!(!ok([10, 1, 3, 4]));
    assert!(
        ok([10, 1, 2, 3]),
        "excepted by one peer, allowed by the other"
    );
    let n1 = compile(&c, "n1");
    let any = &n1.pods[&ia].ingress.as_ref().unwrap().any;
    assert!(any.contains(Ipv4Addr::new(10, 1, 2, 3)));
    assert!(!any.contains(Ipv4Addr::new(10, 1, 3, 3)));
}

// ---------------------------------------------------------------------------------------
// The compiled table against the direct evaluation, for random clusters.

const NODES: [&str; 3] = ["n1", "n2", "n3"];
const NAMESPACES: [&str; 3] = ["x", "y", "z"];
const EXTERNAL: [Ipv4Addr; 2] = [Ipv4Addr::new(10, 9, 9, 9), Ipv4Addr::new(172, 31, 1, 2)];
const PORTS: [u16; 5] = [53, 80, 81, 5000, 8080];

fn arb_labels() -> impl Strategy<Value = Labels> {
    (
        prop::option::of(prop::sample::select(vec!["a", "b", "c"])),
        prop::option::of(prop::sample::select(vec!["front", "back"])),
    )
        .prop_map(|(app, tier)| {
            let mut l = Labels::new();
            if let Some(a) = app {
                l.insert("app".into(), a.into());
            }
            if let Some(t) = tier {
                l.insert("tier".into(), t.into());
            }
            l
        })
}

fn arb_selector() -> impl Strategy<Value = Selector> {
    prop_oneof![
        Just(Selector::default()),
        arb_labels().prop_map(|l| Selector {
            match_labels: l,
            match_expressions: Vec::new(),
        }),
        (
            prop::sample::select(vec!["app", "tier", "team"]),
            prop::sample::select(vec![
                Operator::In,
                Operator::NotIn,
                Operator::Exists,
                Operator::DoesNotExist
            ]),
            prop::sample::subsequence(vec!["a", "b", "front", "x", "y"], 1..3),
        )
            .prop_map(|(k, op, vals)| Selector {
                match_labels: Labels::new(),
                match_expressions: vec![Requirement {
                    key: k.into(),
                    operator: op,
                    values: vals.iter().map(|v| v.to_string()).collect(),
                }],
            }),
    ]
}

fn arb_named_ports() -> impl Strategy<Value = Vec<NamedPort>> {
    prop::sample::subsequence(
        vec![
            ("http", Proto::Tcp, 80u16),
            ("http", Proto::Tcp, 8080),
            ("alt", Proto::Tcp, 81),
            ("dns", Proto::Udp, 53),
            ("dns", Proto::Tcp, 53),
            ("sig", Proto::Sctp, 5000),
        ],
        0..3,
    )
    .prop_map(|v| {
        let mut seen = BTreeSet::new();
        v.into_iter()
            .filter(|(n, p, _)| seen.insert((*n, *p)))
            .map(|(n, p, port)| NamedPort {
                name: n.into(),
                proto: p,
                port,
            })
            .collect()
    })
}

fn arb_peer() -> impl Strategy<Value = Peer> {
    prop_oneof![
        3 => (prop::option::of(arb_selector()), prop::option::of(arb_selector()))
            .prop_map(|(pods, namespaces)| Peer::Pods { pods, namespaces }),
        1 => (
            prop::sample::select(vec!["192.168.0.0/16", "192.168.0.0/24", "10.0.0.0/8", "0.0.0.0/0", "192.168.1.3/32"]),
            prop::sample::subsequence(vec!["192.168.0.4/30", "10.9.0.0/16", "192.168.1.0/25"], 0..2),
        )
            .prop_map(|(cidr, except)| {
                let cidr: Ipv4Net = cidr.parse().unwrap();
                Peer::IpBlock {
                    cidr,
                    except: except
                        .iter()
                        .map(|e| e.parse::<Ipv4Net>().unwrap())
                        .filter(|e| cidr.contains(e))
                        .collect(),
                }
            }),
    ]
}

fn arb_port() -> impl Strategy<Value = PortSpec> {
    (
        prop::sample::select(Proto::ALL.to_vec()),
        prop_oneof![
            Just((None, None)),
            (
                prop::sample::select(vec![53u16, 80, 81, 5000]),
                prop::option::of(prop::sample::select(vec![81u16, 6000]))
            )
                .prop_map(|(p, e)| (Some(PortRef::Number(p)), e.filter(|e| *e >= p))),
            prop::sample::select(vec!["http", "alt", "dns", "sig"])
                .prop_map(|n| (Some(PortRef::Name(n.into())), None)),
        ],
    )
        .prop_map(|(proto, (port, end_port))| PortSpec {
            proto,
            port,
            end_port,
        })
}

fn arb_rules() -> impl Strategy<Value = Option<Vec<Rule>>> {
    prop::option::of(prop::collection::vec(
        (
            prop::collection::vec(arb_peer(), 0..3),
            prop::collection::vec(arb_port(), 0..3),
        )
            .prop_map(|(peers, ports)| Rule { peers, ports }),
        0..3,
    ))
}

fn arb_cluster() -> impl Strategy<Value = Cluster> {
    let pods = prop::collection::vec(
        (
            prop::sample::select(NAMESPACES.to_vec()),
            prop::sample::select(NODES.to_vec()),
            arb_labels(),
            arb_named_ports(),
            prop::bool::weighted(0.1),
            prop::bool::weighted(0.1),
        ),
        1..9,
    );
    let policies = prop::collection::vec(
        (
            prop::sample::select(NAMESPACES.to_vec()),
            arb_selector(),
            arb_rules(),
            arb_rules(),
        ),
        0..5,
    );
    let ns_labels =
        prop::collection::vec(prop::option::of(prop::sample::select(vec!["x", "y"])), 3);
    (pods, policies, ns_labels).prop_map(|(pods, policies, ns_labels)| {
        let mut c = Cluster::default();
        for (ns, team) in NAMESPACES.iter().zip(ns_labels) {
            let mut labels = Labels::new();
            if let Some(t) = team {
                labels.insert("team".into(), t.into());
            }
            c.namespaces.insert(
                ns.to_string(),
                Namespace {
                    name: ns.to_string(),
                    labels,
                },
            );
        }
        for (i, (ns, node, labels, named_ports, host_network, finished)) in
            pods.into_iter().enumerate()
        {
            let p = Pod {
                key: Key::new(ns, format!("p{i}")),
                labels,
                ip: Some(Ipv4Addr::new(192, 168, (i % 2) as u8, i as u8 + 1)),
                node: Some(node.into()),
                host_network,
                finished,
                named_ports,
            };
            c.pods.insert(p.key.clone(), p);
        }
        for (i, (ns, pod_selector, ingress, egress)) in policies.into_iter().enumerate() {
            // A policy isolates in at least one direction (policyTypes is never empty).
            let ingress = if ingress.is_none() && egress.is_none() {
                Some(Vec::new())
            } else {
                ingress
            };
            let key = Key::new(ns, format!("np{i}"));
            c.policies.insert(
                key.clone(),
                Policy {
                    key,
                    pod_selector,
                    ingress,
                    egress,
                },
            );
        }
        c
    })
}

/// What the nodes' tables do with one connection: the forward hook of the source's node
/// and, if it is another, of the destination's.
fn through_tables(c: &Cluster, tables: &BTreeMap<&str, super::ruleset::Table>, f: &Flow) -> bool {
    let local = |ip: Ipv4Addr| {
        c.pods
            .values()
            .find(|p| p.policy_address() == Some(ip))
            .and_then(|p| p.node.clone())
    };
    let (sn, dn) = (local(f.src), local(f.dst));
    let proto = f.proto.map(Proto::number).unwrap_or(1);
    let pass = |node: &str, iif: &str, oif: &str| {
        tables[node].judge(&Packet {
            src: f.src,
            dst: f.dst,
            proto,
            dport: f.port,
            iif: iif.into(),
            oif: oif.into(),
            established: false,
        })
    };
    match (sn.as_deref(), dn.as_deref()) {
        (Some(a), Some(b)) if a == b => pass(a, "vethweplsrc", "vethwepldst"),
        (Some(a), Some(b)) => pass(a, "vethweplsrc", "weave") && pass(b, "weave", "vethwepldst"),
        (Some(a), None) => pass(a, "vethweplsrc", "eth0"),
        (None, Some(b)) => pass(b, "eth0", "vethwepldst"),
        (None, None) => true,
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    /// For random namespaces, pods and policies, every node's compiled rules — and the
    /// nftables tables built from them, read as the kernel reads them — let through
    /// exactly the connections NetworkPolicy allows, for every pair of addresses, protocol
    /// and port.
    #[test]
    fn compiled_tables_agree_with_the_direct_evaluation(c in arb_cluster()) {
        let compiled: BTreeMap<&str, _> = NODES.iter().map(|n| (*n, compile(&c, n))).collect();
        let opts = Options { allow_mcast: false, pod_link_prefix: "vethwepl".into() };
        let tables: BTreeMap<&str, _> = compiled.iter().map(|(n, cp)| (*n, build(cp, &opts))).collect();
        let mut addrs: Vec<Ipv4Addr> = c.pods.values().filter_map(|p| p.ip).collect();
        addrs.extend(EXTERNAL);
        addrs.sort();
        addrs.dedup();
        for &src in &addrs {
            for &dst in &addrs {
                if src == dst {
                    continue;
                }
                for proto in [Some(Proto::Tcp), Some(Proto::Udp), Some(Proto::Sctp), None] {
                    for port in PORTS {
                        let f = Flow { src, dst, proto, port };
                        let want = evaluate(&c, &f).allowed();
                        let src_ok = compiled.values().all(|cp| {
                            cp.pods.get(&src).and_then(|p| p.egress.as_ref())
                                .is_none_or(|a| a.allows(dst, proto, port))
                        });
                        let dst_ok = compiled.values().all(|cp| {
                            cp.pods.get(&dst).and_then(|p| p.ingress.as_ref())
                                .is_none_or(|a| a.allows(src, proto, port))
                        });
                        prop_assert_eq!(src_ok && dst_ok, want, "compiled: {:?}", f);
                        prop_assert_eq!(through_tables(&c, &tables, &f), want, "tables: {:?}", f);
                    }
                }
            }
        }
    }

    /// Range sets hold exactly the union of what was inserted minus what was removed.
    #[test]
    fn range_sets_are_sets(ops in prop::collection::vec((any::<bool>(), 0u32..64, 0u32..8), 0..40)) {
        let mut s = RangeSet::default();
        let mut model = BTreeSet::new();
        for (add, lo, len) in ops {
            let hi = lo + len;
            if add { s.insert(lo, hi); model.extend(lo..=hi); }
            else { s.remove(lo, hi); for a in lo..=hi { model.remove(&a); } }
        }
        for a in 0u32..80 {
            prop_assert_eq!(s.contains(Ipv4Addr::from(a)), model.contains(&a));
        }
        for w in s.ranges().windows(2) {
            prop_assert!(w[0].1 + 1 < w[1].0, "disjoint and not adjacent: {:?}", s);
        }
    }
}
