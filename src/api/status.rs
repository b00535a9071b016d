//! Human-readable status pages, rendered from a [`Report`] snapshot.
//!
//! The layout follows what Weave's router printed (labels right-aligned to 15 columns,
//! fixed-width address/name columns), so people and scripts used to `weave status` read
//! weft's pages the same way. Pages weft adds (`routes`, the dataplane section) use the
//! same conventions.

use super::report::{ConnectionReport, Report};
use std::fmt::Write;

/// Connection states in the order Weave listed their counts.
const CONNECTION_STATES: [&str; 5] = ["established", "pending", "retrying", "failed", "connecting"];

/// Width of a `name(nick)` column: a MAC-style name (17) plus a nickname of up to 18.
const NAME_WIDTH: usize = 37;
/// Width of an `ip:port` column (`255.255.255.255:65535` is 21 characters).
const ADDR_WIDTH: usize = 21;
/// Width of a `first-last` address range (`255.255.255.255-255.255.255.255`).
const RANGE_WIDTH: usize = 31;

fn display_name(name: &str, nick: &str) -> String {
    format!("{name}({nick})")
}

fn on_off(enabled: bool) -> &'static str {
    if enabled {
        "enabled"
    } else {
        "disabled"
    }
}

fn arrow(outbound: bool) -> &'static str {
    if outbound {
        "->"
    } else {
        "<-"
    }
}

/// `"2 established, 1 failed"` in the given key order, omitting zero counts.
fn join_counts<'a>(
    keys: impl IntoIterator<Item = &'a str>,
    count: impl Fn(&str) -> usize,
) -> String {
    keys.into_iter()
        .filter_map(|k| match count(k) {
            0 => None,
            n => Some(format!("{n} {k}")),
        })
        .collect::<Vec<_>>()
        .join(", ")
}

fn connection_counts(conns: &[ConnectionReport]) -> String {
    let known = join_counts(CONNECTION_STATES, |k| {
        conns.iter().filter(|c| c.state == k).count()
    });
    // A state the router invents later must still be counted, not silently dropped.
    let mut others: Vec<&str> = conns
        .iter()
        .map(|c| c.state.as_str())
        .filter(|s| !CONNECTION_STATES.contains(s))
        .collect();
    others.sort_unstable();
    others.dedup();
    let extra = join_counts(others, |k| conns.iter().filter(|c| c.state == k).count());
    match (known.is_empty(), extra.is_empty()) {
        (_, true) => known,
        (true, false) => extra,
        (false, false) => format!("{known}, {extra}"),
    }
}

fn line(out: &mut String, label: &str, value: impl std::fmt::Display) {
    let _ = writeln!(out, "{label:>15}: {value}");
}

/// The `/status` page.
pub fn render_status(r: &Report) -> String {
    let rt = &r.router;
    let mut out = String::new();
    // Weave's `{{.Version}} ({{.VersionCheck}})`; weft never checks for updates.
    line(
        &mut out,
        "Version",
        format_args!("{} (version check update disabled)", r.version),
    );
    out.push('\n');
    line(&mut out, "Service", "router");
    line(
        &mut out,
        "Protocol",
        // Weave printed a range only when it spoke more than one version.
        if rt.protocol_min_version < rt.protocol_max_version {
            format!(
                "{} {}..{}",
                rt.protocol, rt.protocol_min_version, rt.protocol_max_version
            )
        } else {
            format!("{} {}", rt.protocol, rt.protocol_max_version)
        },
    );
    line(&mut out, "Name", display_name(&rt.name, &rt.nick_name));
    line(&mut out, "Encryption", on_off(rt.encryption));
    line(&mut out, "PeerDiscovery", on_off(rt.peer_discovery));
    line(&mut out, "Targets", rt.targets.len());
    let counts = connection_counts(&rt.connections);
    if counts.is_empty() {
        line(&mut out, "Connections", rt.connections.len());
    } else {
        line(
            &mut out,
            "Connections",
            format_args!("{} ({counts})", rt.connections.len()),
        );
    }
    let peer_conns = rt.peers.iter().flat_map(|p| p.connections.iter());
    let established = peer_conns.clone().filter(|c| c.established).count();
    let pending = peer_conns.filter(|c| !c.established).count();
    let peer_counts = join_counts(["established", "pending"], |k| {
        if k == "established" {
            established
        } else {
            pending
        }
    });
    if peer_counts.is_empty() {
        line(&mut out, "Peers", rt.peers.len());
    } else {
        line(
            &mut out,
            "Peers",
            format_args!("{} (with {peer_counts} connections)", rt.peers.len()),
        );
    }
    line(&mut out, "TrustedSubnets", "none");

    out.push('\n');
    line(&mut out, "Service", "ipam");
    line(&mut out, "Status", &r.ipam.status);
    line(&mut out, "Range", &r.ipam.range);
    line(&mut out, "DefaultSubnet", &r.ipam.default_subnet);

    out.push('\n');
    line(&mut out, "Service", "dataplane");
    line(&mut out, "Interface", &rt.interface);
    line(&mut out, "MTU", rt.mtu);
    line(
        &mut out,
        "Encapsulation",
        format_args!("vxlan udp/{}", rt.data_port),
    );
    // What Weave's "Encryption: disabled" never said: without WEAVE_PASSWORD anyone who
    // reaches the control port may join.
    let authentication = if rt.authentication == "password" {
        "password (WEAVE_PASSWORD)"
    } else {
        "none (no WEAVE_PASSWORD: any host that reaches the control port may join)"
    };
    line(&mut out, "Authentication", authentication);
    line(
        &mut out,
        "OverlayAddress",
        rt.overlay_address.as_deref().unwrap_or("none"),
    );
    out
}

/// The `/status/peers` page: every known peer and its connections.
pub fn render_peers(r: &Report) -> String {
    let mut out = String::new();
    for p in &r.router.peers {
        let _ = writeln!(out, "{}", display_name(&p.name, &p.nick_name));
        for c in &p.connections {
            let _ = writeln!(
                out,
                "   {} {:<ADDR_WIDTH$} {:<NAME_WIDTH$} {}",
                arrow(c.outbound),
                c.address,
                display_name(&c.name, &c.nick_name),
                if c.established {
                    "established"
                } else {
                    "pending"
                },
            );
        }
    }
    out
}

/// The `/status/connections` page: this router's own connections and dial attempts.
pub fn render_connections(r: &Report) -> String {
    let mut out = String::new();
    for c in &r.router.connections {
        // Weave always put a space before the attributes, even when there were none;
        // kept so that column-splitting scripts see the same shape.
        let attrs = if c.mtu > 0 {
            format!("mtu={}", c.mtu)
        } else {
            String::new()
        };
        let _ = writeln!(
            out,
            "{} {:<ADDR_WIDTH$} {:<11} {} {}",
            arrow(c.outbound),
            c.address,
            c.state,
            c.info,
            attrs
        );
    }
    out
}

/// The `/status/ipam` page: how much of the range each peer owns. This peer comes first
/// with its count of allocated addresses; peers whose ranges cannot be reached are flagged,
/// since their space is stuck until they return or are removed with `rmpeer`.
pub fn render_ipam(r: &Report) -> String {
    struct Owner<'a> {
        name: &'a str,
        nick: &'a str,
        ips: u64,
        reachable: bool,
    }
    let mut owners: Vec<Owner> = Vec::new();
    for e in &r.ipam.entries {
        match owners.iter_mut().find(|o| o.name == e.peer) {
            Some(o) => {
                o.ips += e.size;
                o.reachable &= e.reachable;
            }
            None => owners.push(Owner {
                name: &e.peer,
                nick: &e.nickname,
                ips: e.size,
                reachable: e.reachable,
            }),
        }
    }
    let total = r.ipam.range_num_ips;
    let mut out = String::new();
    let mut print = |o: &Owner, info: &str| {
        let pct = if total == 0 {
            0.0
        } else {
            o.ips as f64 * 100.0 / total as f64
        };
        let _ = writeln!(
            out,
            "{:<NAME_WIDTH$} {:>8} IPs ({pct:04.1}% of total) {info}",
            display_name(o.name, o.nick),
            o.ips,
        );
    };
    let me = r.router.name.as_str();
    if let Some(o) = owners.iter().find(|o| o.name == me) {
        print(o, &format!("({} active)", r.ipam.active_ips));
    }
    for o in owners.iter().filter(|o| o.name != me) {
        print(o, if o.reachable { "" } else { "- unreachable!" });
    }
    out
}

/// The `/status/targets` page: the peer addresses this router was told to connect to.
pub fn render_targets(r: &Report) -> String {
    let mut out = String::new();
    for t in &r.router.targets {
        let _ = writeln!(out, "{t}");
    }
    out
}

/// The `/status/routes` page (weft only): which peer each address range is sent to, then
/// per-peer traffic and drop counters of the data plane.
pub fn render_routes(r: &Report) -> String {
    let dp = &r.dataplane;
    let mut out = String::new();
    for route in &dp.routes {
        let range = format!("{}-{}", route.start, route.end);
        let size = format!("({} IPs)", route.size);
        let dest = match route.via.as_str() {
            "local" => "local".to_string(),
            "unreachable" => format!(
                "-> {} unreachable",
                display_name(&route.peer, &route.nick_name)
            ),
            via => format!(
                "-> {} via {via}",
                display_name(&route.peer, &route.nick_name)
            ),
        };
        let _ = writeln!(out, "{range:<RANGE_WIDTH$} {size:>14}  {dest}");
    }
    if !dp.peers.is_empty() {
        out.push('\n');
        let _ = writeln!(
            out,
            "{:<NAME_WIDTH$} {:>12} {:>14} {:>12} {:>14}",
            "PEER", "TX-PACKETS", "TX-BYTES", "RX-PACKETS", "RX-BYTES"
        );
        for p in &dp.peers {
            let _ = writeln!(
                out,
                "{:<NAME_WIDTH$} {:>12} {:>14} {:>12} {:>14}",
                display_name(&p.name, &p.nick_name),
                p.tx_packets,
                p.tx_bytes,
                p.rx_packets,
                p.rx_bytes
            );
        }
    }
    if !dp.drops.is_empty() {
        out.push('\n');
        let _ = writeln!(out, "{:<NAME_WIDTH$} {:>12}", "DROPPED", "PACKETS");
        for d in &dp.drops {
            let _ = writeln!(out, "{:<NAME_WIDTH$} {:>12}", d.reason, d.packets);
        }
    }
    out
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::api::report::*;

    /// A two-node cluster seen from n1, shaped like weave-samples/n1-*.
    pub(crate) fn sample_report() -> Report {
        let n1 = "02:77:76:00:00:01";
        let n2 = "02:77:76:00:00:02";
        Report {
            ready: true,
            version: "0.1.0".into(),
            version_check: Default::default(),
            router: RouterReport {
                protocol: "weft".into(),
                protocol_min_version: 1,
                protocol_max_version: 1,
                encryption: false,
                authentication: "none".into(),
                peer_discovery: true,
                name: n1.into(),
                nick_name: "n1".into(),
                port: 6783,
                data_port: 6784,
                interface: "weave".into(),
                mtu: 1450,
                overlay_address: Some("192.168.0.1/16".into()),
                targets: vec!["10.200.0.2".into(), "10.200.0.3".into()],
                peers: vec![
                    PeerReport {
                        name: n1.into(),
                        nick_name: "n1".into(),
                        uid: 1,
                        short_id: 0,
                        version: 0,
                        data_address: None,
                        connections: vec![PeerConnectionReport {
                            name: n2.into(),
                            nick_name: "n2".into(),
                            address: "10.200.0.2:6783".into(),
                            outbound: true,
                            established: true,
                        }],
                    },
                    PeerReport {
                        name: n2.into(),
                        nick_name: "n2".into(),
                        uid: 2,
                        short_id: 0,
                        version: 0,
                        data_address: Some("10.200.0.2:6784".into()),
                        connections: vec![PeerConnectionReport {
                            name: n1.into(),
                            nick_name: "n1".into(),
                            address: "10.200.0.1:46557".into(),
                            outbound: false,
                            established: true,
                        }],
                    },
                ],
                connections: vec![
                    ConnectionReport {
                        address: "10.200.0.2:6783".into(),
                        outbound: true,
                        state: "established".into(),
                        info: format!("vxlan {n2}(n2)"),
                        peer_name: Some(n2.into()),
                        peer_nick_name: Some("n2".into()),
                        mtu: 1450,
                        attrs: Some(ConnectionAttrs {
                            mtu: 1450,
                            name: "vxlan".into(),
                            encrypted: false,
                        }),
                    },
                    ConnectionReport {
                        address: "10.200.0.3:6783".into(),
                        outbound: true,
                        state: "retrying".into(),
                        info: "dial tcp 10.200.0.3:6783: connection refused, retry: 2026-11-28 04:00:10"
                            .into(),
                        peer_name: None,
                        peer_nick_name: None,
                        mtu: 0,
                        attrs: None,
                    },
                ],
                termination_count: 3,
                refused: Default::default(),
                ..Default::default()
            },
            ipam: IpamReport {
                bad_gossip: 0,
                bad_requests: 0,
                status: "ready".into(),
                range: "192.168.0.0/16".into(),
                range_num_ips: 65536,
                active_ips: 2,
                default_subnet: "192.168.0.0/16".into(),
                seeds: vec![n1.into(), n2.into(), "02:77:76:00:00:03".into()],
                entries: vec![
                    RingEntryReport {
                        token: "192.168.0.0".into(),
                        size: 21845,
                        peer: n1.into(),
                        nickname: "n1".into(),
                        is_known_peer: true,
                        reachable: true,
                        version: 2,
                        free: 21843,
                    },
                    RingEntryReport {
                        token: "192.168.85.85".into(),
                        size: 21845,
                        peer: n2.into(),
                        nickname: "n2".into(),
                        is_known_peer: true,
                        reachable: true,
                        version: 0,
                        free: 21845,
                    },
                    RingEntryReport {
                        token: "192.168.170.170".into(),
                        size: 21846,
                        peer: "02:77:76:00:00:03".into(),
                        nickname: "n3".into(),
                        is_known_peer: false,
                        reachable: false,
                        version: 0,
                        free: 21846,
                    },
                ],
                owned: vec![
                    OwnedReport {
                        containerid: "weave:expose".into(),
                        addrs: vec!["192.168.0.1/16".into()],
                        tentative: false,
                    },
                    OwnedReport {
                        containerid: "pod-a".into(),
                        addrs: vec!["192.168.0.2/16".into()],
                        tentative: false,
                    },
                ],
                pending_allocates: Some(vec!["pod-b".into()]),
                pending_claims: None,
                paxos: None,
            },
            dataplane: DataplaneReport {
                routes: vec![
                    RouteReport {
                        start: "192.168.0.0".into(),
                        end: "192.168.85.84".into(),
                        size: 21845,
                        peer: n1.into(),
                        nick_name: "n1".into(),
                        via: "local".into(),
                    },
                    RouteReport {
                        start: "192.168.85.85".into(),
                        end: "192.168.170.169".into(),
                        size: 21845,
                        peer: n2.into(),
                        nick_name: "n2".into(),
                        via: "10.200.0.2:6784".into(),
                    },
                    RouteReport {
                        start: "192.168.170.170".into(),
                        end: "192.168.255.255".into(),
                        size: 21846,
                        peer: "02:77:76:00:00:03".into(),
                        nick_name: "n3".into(),
                        via: "unreachable".into(),
                    },
                ],
                peers: vec![PeerTrafficReport {
                    name: n2.into(),
                    nick_name: "n2".into(),
                    tx_packets: 10,
                    tx_bytes: 1400,
                    rx_packets: 7,
                    rx_bytes: 980,
                }],
                drops: vec![
                    DropReport {
                        reason: "no_route".into(),
                        packets: 4,
                    },
                    DropReport {
                        reason: "malformed".into(),
                        packets: 1,
                    },
                ],
            },
            network_policy: None,
        }
    }

    #[test]
    fn an_encrypting_router_says_so() {
        let mut r = sample_report();
        r.router.encryption = true;
        r.router.authentication = "password".into();
        let text = render_status(&r);
        assert!(text.contains("     Encryption: enabled\n"), "{text}");
    }

    #[test]
    fn status_matches_weave_layout() {
        let expected = "        Version: 0.1.0 (version check update disabled)

        Service: router
       Protocol: weft 1
           Name: 02:77:76:00:00:01(n1)
     Encryption: disabled
  PeerDiscovery: enabled
        Targets: 2
    Connections: 2 (1 established, 1 retrying)
          Peers: 2 (with 2 established connections)
 TrustedSubnets: none

        Service: ipam
         Status: ready
          Range: 192.168.0.0/16
  DefaultSubnet: 192.168.0.0/16

        Service: dataplane
      Interface: weave
            MTU: 1450
  Encapsulation: vxlan udp/6784
 Authentication: none (no WEAVE_PASSWORD: any host that reaches the control port may join)
 OverlayAddress: 192.168.0.1/16
";
        assert_eq!(render_status(&sample_report()), expected);
    }

    /// Weave's own page (weave-samples/n1-status.txt, a 2.8.1 router) and weft's page for
    /// the same facts agree byte for byte in Weave's sections.
    #[test]
    fn the_same_facts_give_weaves_page() {
        let sample = include_str!("testdata/weave-2.8.1-status.txt");
        let weave_body = sample.split_once("\r\n\r\n").unwrap().1;
        let mut r = sample_report();
        r.version = "2.8.1".into();
        r.router.protocol = "weave".into();
        r.router.protocol_max_version = 2;
        r.router.peer_discovery = false;
        r.router.targets.truncate(1);
        r.router.connections.truncate(1);
        let weft = render_status(&r);
        let weft_weaves_part = weft.split("\n\n        Service: dataplane").next().unwrap();
        assert_eq!(weft_weaves_part, weave_body.trim_end());
    }

    #[test]
    fn status_of_a_lone_unready_router() {
        let mut r = sample_report();
        r.router.connections.clear();
        r.router.peers.truncate(1);
        r.router.peers[0].connections[0].established = false;
        r.router.overlay_address = None;
        r.ipam.status = "awaiting consensus (quorum: 2, known: 1)".into();
        let s = render_status(&r);
        assert!(s.contains("\n    Connections: 0\n"), "{s}");
        assert!(
            s.contains("\n          Peers: 1 (with 1 pending connections)\n"),
            "{s}"
        );
        assert!(s.contains("\n         Status: awaiting consensus (quorum: 2, known: 1)\n"));
        assert!(s.contains("\n OverlayAddress: none\n"), "{s}");
    }

    #[test]
    fn connection_counts_follow_weave_order_and_keep_unknown_states() {
        let conn = |state: &str| ConnectionReport {
            state: state.into(),
            ..Default::default()
        };
        let conns = vec![
            conn("failed"),
            conn("established"),
            conn("bogus"),
            conn("established"),
            conn("connecting"),
        ];
        assert_eq!(
            connection_counts(&conns),
            "2 established, 1 failed, 1 connecting, 1 bogus"
        );
    }

    #[test]
    fn ipam_matches_weave_layout() {
        let expected = "\
02:77:76:00:00:01(n1)                    21845 IPs (33.3% of total) (2 active)
02:77:76:00:00:02(n2)                    21845 IPs (33.3% of total) \n\
02:77:76:00:00:03(n3)                    21846 IPs (33.3% of total) - unreachable!
";
        assert_eq!(render_ipam(&sample_report()), expected);
    }

    #[test]
    fn ipam_merges_entries_of_one_peer_and_pads_small_percentages() {
        let mut r = sample_report();
        r.ipam.entries[2].peer = r.ipam.entries[0].peer.clone();
        r.ipam.entries[2].reachable = true;
        r.ipam.entries[1].size = 3000;
        let s = render_ipam(&r);
        let lines: Vec<&str> = s.lines().collect();
        assert_eq!(lines.len(), 2, "{s}");
        assert!(
            lines[0].contains(" 43691 IPs (66.7% of total) (2 active)"),
            "{s}"
        );
        assert!(lines[1].contains("  3000 IPs (04.6% of total) "), "{s}");
    }

    #[test]
    fn ipam_with_empty_range_does_not_divide_by_zero() {
        let mut r = sample_report();
        r.ipam.range_num_ips = 0;
        assert!(render_ipam(&r).contains("(00.0% of total)"));
        r.ipam.entries.clear();
        assert_eq!(render_ipam(&r), "");
    }

    #[test]
    fn connections_page() {
        let expected = "\
-> 10.200.0.2:6783       established vxlan 02:77:76:00:00:02(n2) mtu=1450
-> 10.200.0.3:6783       retrying    dial tcp 10.200.0.3:6783: connection refused, retry: 2026-11-28 04:00:10 \n";
        assert_eq!(render_connections(&sample_report()), expected);
        let mut r = sample_report();
        r.router.connections[0].outbound = false;
        assert!(render_connections(&r).starts_with("<- 10.200.0.2:6783 "));
    }

    #[test]
    fn peers_page_matches_weave_layout() {
        let expected = "\
02:77:76:00:00:01(n1)
   -> 10.200.0.2:6783       02:77:76:00:00:02(n2)                 established
02:77:76:00:00:02(n2)
   <- 10.200.0.1:46557      02:77:76:00:00:01(n1)                 established
";
        assert_eq!(render_peers(&sample_report()), expected);
    }

    #[test]
    fn targets_page() {
        assert_eq!(render_targets(&sample_report()), "10.200.0.2\n10.200.0.3\n");
        assert_eq!(render_targets(&Report::default()), "");
    }

    #[test]
    fn routes_page() {
        let expected = "\
192.168.0.0-192.168.85.84          (21845 IPs)  local
192.168.85.85-192.168.170.169      (21845 IPs)  -> 02:77:76:00:00:02(n2) via 10.200.0.2:6784
192.168.170.170-192.168.255.255    (21846 IPs)  -> 02:77:76:00:00:03(n3) unreachable

PEER                                    TX-PACKETS       TX-BYTES   RX-PACKETS       RX-BYTES
02:77:76:00:00:02(n2)                           10           1400            7            980

DROPPED                                    PACKETS
no_route                                         4
malformed                                        1
";
        assert_eq!(render_routes(&sample_report()), expected);
        assert_eq!(render_routes(&Report::default()), "");
    }
}
