//! What a Weave operator types and reads, against real routers in node namespaces: the
//! report (every key, `-f` templates), the status pages (503 until ready, gossiped peers'
//! addresses and arrows), `weft ps/connect/forget/expose/version/status dns`, the metrics
//! read with a real OpenMetrics parser (heartbeat round trips, CNI durations, IPAM
//! operations, process figures), and JSON logs.
//!
//! Needs root (network namespaces); runs under weft-testbed's harness.

use openmetrics_parser::{OpenMetricsType, OpenMetricsValue};
use std::time::{Duration, Instant};
use weft::api::report::Report;
use weft_testbed::{harness, Binaries, Cluster, ClusterSpec};

const READY: Duration = Duration::from_secs(60);

fn binaries() -> Binaries {
    Binaries::beside(env!("CARGO_BIN_EXE_weft")).unwrap_or_else(|e| panic!("{e}"))
}

fn ok<T, E: std::fmt::Display>(r: Result<T, E>, what: &str) -> T {
    r.unwrap_or_else(|e| panic!("{what}: {e}"))
}

/// `weft ARGS` in node `i`'s namespace; its stdout, or a panic with its stderr.
fn cli(c: &Cluster, i: usize, args: &[&str]) -> String {
    let (success, out, err) = ok(c.weft_cli(i, args), &format!("weft {args:?}"));
    assert!(success, "weft {args:?} failed: {err}\n{out}");
    out
}

type Exposition = openmetrics_parser::MetricsExposition<OpenMetricsType, OpenMetricsValue>;

fn scrape(c: &Cluster, i: usize) -> Exposition {
    let text = ok(c.metrics(i), "GET /metrics");
    openmetrics_parser::openmetrics::parse_openmetrics(&text)
        .unwrap_or_else(|e| panic!("not valid OpenMetrics: {e:?}\n{text}"))
}

fn label(s: &openmetrics_parser::Sample<OpenMetricsValue>, name: &str) -> Option<String> {
    s.get_labelset()
        .ok()?
        .get_label_value(name)
        .map(str::to_string)
}

/// Histogram observations of `family` whose label `key` is `value`.
fn histogram_count(x: &Exposition, family: &str, key: &str, value: &str) -> u64 {
    x.families.get(family).map_or(0, |f| {
        f.iter_samples()
            .filter(|s| label(s, key).as_deref() == Some(value))
            .map(|s| match &s.value {
                OpenMetricsValue::Histogram(h) => h.count.unwrap_or(0),
                _ => 0,
            })
            .sum()
    })
}

fn operator_surface_on_a_live_cluster() {
    let mut spec = ClusterSpec::new(3, binaries());
    spec.log_filter = "info".into();
    let mut c = ok(Cluster::create(spec), "building namespaces");

    // Alone, node 1 waits for consensus: Weave's sub-pages say 503 until it is ready.
    ok(
        c.start_router_env(0, &[], &[("WEFT_LOG_FORMAT", "json")]),
        "starting n1",
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match c.http_get(0, "/status/ipam") {
            Ok(r) => {
                assert_eq!(r.status, 503, "/status/ipam before consensus: {}", r.body);
                break;
            }
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(200)),
            Err(e) => panic!("n1's API never came up: {e}"),
        }
    }
    ok(c.start_router(1), "starting n2");
    ok(c.start_router(2), "starting n3");
    ok(c.wait_all_ready(READY), "waiting for readiness");
    assert_eq!(ok(c.http_get(0, "/status/ipam"), "GET").status, 200);

    let pods: Vec<_> = (0..3)
        .map(|n| ok(c.add_pod(n, &format!("p{n}")), "ADD"))
        .collect();
    ok(c.tcp_pod_to_pod(&pods[0], &pods[1]), "TCP p0 -> p1");

    // The report: Weave's keys, and `-f` templates through the CLI.
    let report: Report = ok(c.report(0), "GET /report");
    let raw: serde_json::Value = ok(c.report(0), "GET /report");
    for key in ["VersionCheck", "Router", "IPAM"] {
        assert!(raw.get(key).is_some(), "report lacks {key}");
    }
    for key in [
        "UnicastRoutes",
        "BroadcastRoutes",
        "TrustedSubnets",
        "OverlayDiagnostics",
        "CaptureStats",
        "MACs",
    ] {
        assert!(
            raw["Router"].get(key).is_some(),
            "report lacks Router.{key}"
        );
    }
    assert_eq!(raw["Router"]["UnicastRoutes"].as_array().unwrap().len(), 3);
    assert!(raw["IPAM"].get("Paxos").is_some());
    let name = cli(&c, 0, &["report", "-f", "{{.Router.Name}}"]);
    assert_eq!(name, report.router.name);
    let nicks = cli(
        &c,
        0,
        &[
            "report",
            "-f",
            "{{range .Router.Peers}}{{.NickName}} {{end}}",
        ],
    );
    let mut nicks: Vec<&str> = nicks.split_whitespace().collect();
    nicks.sort();
    assert_eq!(nicks, ["n1", "n2", "n3"]);

    // Gossiped peers: every connection has an address, and the two ends' arrows agree.
    let peers = &report.router.peers;
    assert_eq!(peers.len(), 3, "{peers:?}");
    for p in peers {
        assert_eq!(
            p.connections.len(),
            2,
            "{} knows {:?}",
            p.nick_name,
            p.connections
        );
        for link in &p.connections {
            assert!(
                !link.address.is_empty(),
                "{} -> {}: no address",
                p.nick_name,
                link.nick_name
            );
            let back = peers
                .iter()
                .find(|q| q.name == link.name)
                .and_then(|q| q.connections.iter().find(|l| l.name == p.name))
                .unwrap_or_else(|| {
                    panic!("{} -> {}: other end unknown", p.nick_name, link.nick_name)
                });
            assert_ne!(
                link.outbound,
                back.outbound,
                "{} and {} both say {} about their connection",
                p.nick_name,
                link.nick_name,
                if link.outbound { "outbound" } else { "inbound" }
            );
            if link.outbound {
                assert!(link.address.ends_with(":6783"), "dialled {}", link.address);
            }
        }
    }
    let peers_page = cli(&c, 0, &["status", "peers"]);
    assert_eq!(peers_page.matches("->").count(), 3, "{peers_page}");
    assert_eq!(peers_page.matches("<-").count(), 3, "{peers_page}");

    // weft ps: the pod with its node-side veth, its own MAC and its address.
    let ps = cli(&c, 0, &["ps"]);
    let pod = &pods[0];
    let line = ps
        .lines()
        .find(|l| l.starts_with(&pod.container_id))
        .unwrap_or_else(|| panic!("{} not in\n{ps}", pod.container_id));
    let cols: Vec<&str> = line.split_whitespace().collect();
    let mac = pod.result["interfaces"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i.get("sandbox").is_some())
        .and_then(|i| i["mac"].as_str())
        .expect("the pod interface's MAC in the ADD result");
    assert_eq!(
        cols,
        [
            pod.container_id.as_str(),
            &weft_contract::host_veth_name(&pod.container_id),
            mac,
            &format!("{}/{}", pod.addr, pod.prefix_len),
        ],
        "{ps}"
    );
    assert!(ps.contains("weave:expose weave "), "{ps}");

    // expose, version, status dns.
    let exposed = cli(&c, 0, &["expose"]);
    assert_eq!(
        Some(exposed.trim()),
        report.router.overlay_address.as_deref()
    );
    let version = cli(&c, 0, &["version"]);
    assert!(
        version.contains(&format!("weft {}", report.version))
            && version.contains(&format!("router {}", report.version)),
        "{version}"
    );
    let dns = cli(&c, 0, &["status", "dns"]);
    assert!(dns.contains("no DNS service"), "{dns}");

    // connect / forget: an operator's target shows up in the report, then goes.
    let extra = format!("{}:7999", c.nodes[1].underlay_ip);
    cli(&c, 0, &["connect", &extra]);
    let r: Report = ok(c.report(0), "GET /report");
    assert!(r.router.targets.contains(&extra), "{:?}", r.router.targets);
    let forgot = cli(&c, 0, &["forget", &extra]);
    assert_eq!(forgot, "1 target(s) forgotten\n");
    let r: Report = ok(c.report(0), "GET /report");
    assert!(!r.router.targets.contains(&extra), "{:?}", r.router.targets);

    // Metrics through a real parser: heartbeat RTTs for both peers, CNI ADDs, IPAM
    // operations, process figures.
    let deadline = Instant::now() + Duration::from_secs(30);
    let x = loop {
        let x = scrape(&c, 0);
        let both = ["n2", "n3"]
            .iter()
            .all(|n| histogram_count(&x, "weft_peer_rtt_seconds", "nickname", n) > 0);
        if both || Instant::now() > deadline {
            break x;
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    for n in ["n2", "n3"] {
        assert!(
            histogram_count(&x, "weft_peer_rtt_seconds", "nickname", n) > 0,
            "no round trip measured to {n}"
        );
    }
    assert!(
        histogram_count(&x, "weft_cni_request_duration_seconds", "command", "ADD") >= 1,
        "the plugin's ADD was not observed"
    );
    let allocations: f64 = x.families["weft_ipam_operations"]
        .iter_samples()
        .filter(|s| label(s, "op").as_deref() == Some("allocate"))
        .map(|s| match &s.value {
            OpenMetricsValue::Counter(v) => v.value.as_f64(),
            _ => 0.0,
        })
        .sum();
    assert!(allocations >= 1.0, "no allocate counted");
    assert_eq!(
        x.families["process_resident_memory_bytes"].family_type,
        OpenMetricsType::Gauge
    );
    assert!(x.families.contains_key("weave_flows"));

    // n1 logs JSON: every line it wrote after the testbed's own header is an object.
    let log = std::fs::read_to_string(&c.nodes[0].log).unwrap();
    let lines: Vec<&str> = log
        .lines()
        .filter(|l| !l.starts_with("=== testbed"))
        .collect();
    assert!(!lines.is_empty());
    for l in lines {
        let v: serde_json::Value =
            serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}"));
        assert!(v.get("level").is_some() && v.get("fields").is_some(), "{l}");
    }
}

fn main() {
    harness::run(vec![harness::root(
        "operator_surface_on_a_live_cluster",
        operator_surface_on_a_live_cluster,
    )])
}
