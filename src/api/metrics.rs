//! Prometheus metrics, rendered from a [`Report`] snapshot.
//!
//! Metric names and help texts are Weave's, so existing dashboards and alerts keep
//! working; weft's own data-plane counters use the `weft_` prefix. A fresh registry is
//! built per scrape: scrapes are rare, and it keeps the daemon free of metric handles that
//! would have to be kept in step with its state.

use super::report::Report;
use super::telemetry::Telemetry;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::TypedMetric;
use prometheus_client::registry::Registry;
use std::fmt;

/// The content type of [`render_metrics`]' output.
pub const METRICS_CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Connection states reported as `weave_connections{state=...}`, always all of them so that
/// every series exists from the first scrape.
const CONNECTION_STATES: [&str; 5] = ["established", "pending", "retrying", "failed", "connecting"];

type Labels = Vec<(&'static str, String)>;

fn int(v: u64) -> ConstGauge<i64> {
    ConstGauge::new(i64::try_from(v).unwrap_or(i64::MAX))
}

/// Unreachable owners of IP space: (distinct peers, percentage of the range they hold).
fn unreachable_space(r: &Report) -> (u64, f64) {
    let mut peers: Vec<&str> = Vec::new();
    let mut ips = 0u64;
    for e in r.ipam.entries.iter().filter(|e| !e.reachable && e.size > 0) {
        ips = ips.saturating_add(e.size);
        if !peers.contains(&e.peer.as_str()) {
            peers.push(&e.peer);
        }
    }
    let pct = if r.ipam.range_num_ips == 0 {
        0.0
    } else {
        ips as f64 * 100.0 / r.ipam.range_num_ips as f64
    };
    (peers.len() as u64, pct)
}

fn single<M: EncodeMetric + TypedMetric>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    metric: M,
) -> fmt::Result {
    metric.encode(enc.encode_descriptor(name, help, None, M::TYPE)?)
}

fn family<S: EncodeLabelSet, M: EncodeMetric + TypedMetric>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    series: impl IntoIterator<Item = (S, M)>,
) -> fmt::Result {
    let mut family = enc.encode_descriptor(name, help, None, M::TYPE)?;
    for (labels, metric) in series {
        metric.encode(family.encode_family(&labels)?)?;
    }
    Ok(())
}

/// One scrape's worth of metrics. Written as a collector rather than registered metric
/// families so that series come out in a fixed order (families iterate a hash map), which
/// keeps successive scrapes diffable.
#[derive(Debug)]
struct Snapshot(Report, Option<ProcessStats>);

/// What Prometheus' Go client exported as `process_*` for Weave, read from /proc at
/// scrape time.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ProcessStats {
    pub cpu_seconds: f64,
    pub resident_bytes: u64,
    pub virtual_bytes: u64,
    pub open_fds: u64,
    /// `None`: unlimited.
    pub max_fds: Option<u64>,
    /// Unix time the process started.
    pub start_time_seconds: f64,
    pub threads: u64,
}

impl ProcessStats {
    /// This process's figures; `None` where /proc cannot be read (they are then left out,
    /// not reported as zero).
    pub fn read() -> Option<ProcessStats> {
        use procfs::process::{LimitValue, Process};
        let me = Process::myself().ok()?;
        let stat = me.stat().ok()?;
        let ticks = procfs::ticks_per_second() as f64;
        let boot = procfs::boot_time_secs().ok()? as f64;
        let max_fds = match me.limits().ok()?.max_open_files.soft_limit {
            LimitValue::Value(v) => Some(v),
            LimitValue::Unlimited => None,
        };
        Some(ProcessStats {
            cpu_seconds: (stat.utime + stat.stime) as f64 / ticks,
            resident_bytes: stat.rss.saturating_mul(procfs::page_size()),
            virtual_bytes: stat.vsize,
            open_fds: me.fd_count().ok()? as u64,
            max_fds,
            start_time_seconds: boot + stat.starttime as f64 / ticks,
            threads: u64::try_from(stat.num_threads).unwrap_or(0),
        })
    }
}

fn encode_process(enc: &mut DescriptorEncoder, p: &ProcessStats) -> fmt::Result {
    single(
        enc,
        "process_cpu_seconds",
        "Total user and system CPU time spent in seconds.",
        ConstCounter::new(p.cpu_seconds),
    )?;
    single(
        enc,
        "process_resident_memory_bytes",
        "Resident memory size in bytes.",
        int(p.resident_bytes),
    )?;
    single(
        enc,
        "process_virtual_memory_bytes",
        "Virtual memory size in bytes.",
        int(p.virtual_bytes),
    )?;
    single(
        enc,
        "process_open_fds",
        "Number of open file descriptors.",
        int(p.open_fds),
    )?;
    if let Some(max) = p.max_fds {
        single(
            enc,
            "process_max_fds",
            "Maximum number of open file descriptors.",
            int(max),
        )?;
    }
    single(
        enc,
        "process_start_time_seconds",
        "Start time of the process since unix epoch in seconds.",
        ConstGauge::new(p.start_time_seconds),
    )?;
    single(
        enc,
        "process_threads",
        "Number of OS threads in the process.",
        int(p.threads),
    )
}

impl Collector for Snapshot {
    fn encode(&self, mut enc: DescriptorEncoder) -> fmt::Result {
        let r = &self.0;
        let enc = &mut enc;
        if let Some(p) = &self.1 {
            encode_process(enc, p)?;
        }
        // Weave counted its kernel datapath's flow entries. weft keeps no per-flow state
        // (it forwards by the owner of the destination address), so its equivalent is the
        // peer tunnels that carried traffic: the series dashboards graph keeps a meaning.
        single(
            enc,
            "weave_flows",
            "Number of peer tunnels that carried overlay traffic (weft has no per-flow state).",
            int(r
                .dataplane
                .peers
                .iter()
                .filter(|p| p.tx_packets + p.rx_packets > 0)
                .count() as u64),
        )?;
        // Counter names are given without `_total`: the encoder appends it to samples.
        family(
            enc,
            "weave_connections",
            "Number of peer-to-peer connections.",
            // As Weave: both encryption values for every state, so the series are stable;
            // a node's connections are all encrypted (WEAVE_PASSWORD) or none is.
            CONNECTION_STATES.into_iter().flat_map(|state| {
                let n = r
                    .router
                    .connections
                    .iter()
                    .filter(|c| c.state == state)
                    .count() as u64;
                let encrypted = r.router.encryption;
                [("", !encrypted), ("yes", encrypted)].map(|(label, counted)| {
                    let labels: Labels = vec![
                        ("encryption", label.to_string()),
                        ("state", state.to_string()),
                        ("type", "vxlan".to_string()),
                    ];
                    (labels, int(if counted { n } else { 0 }))
                })
            }),
        )?;
        single(
            enc,
            "weave_connection_terminations",
            "Number of peer-to-peer connections terminated.",
            ConstCounter::new(r.router.termination_count),
        )?;
        family(
            enc,
            "weave_ips",
            "Number of IP addresses.",
            [(
                vec![("state", "local-used".to_string())] as Labels,
                int(r.ipam.active_ips),
            )],
        )?;
        single(
            enc,
            "weave_max_ips",
            "Size of IP address space used by allocator.",
            int(r.ipam.range_num_ips),
        )?;
        let (unreachable_peers, unreachable_pct) = unreachable_space(r);
        single(
            enc,
            "weave_ipam_unreachable_count",
            "Number of unreachable peers.",
            int(unreachable_peers),
        )?;
        // Weave's help text had a double space here; nothing parses help texts.
        single(
            enc,
            "weave_ipam_unreachable_percentage",
            "Percentage of IP addresses owned by unreachable peers.",
            ConstGauge::new(unreachable_pct),
        )?;
        single(
            enc,
            "weave_ipam_pending_allocates",
            "Number of pending allocates.",
            int(r
                .ipam
                .pending_allocates
                .as_ref()
                .map_or(0, |v| v.len() as u64)),
        )?;
        single(
            enc,
            "weave_ipam_pending_claims",
            "Number of pending claims.",
            int(r.ipam.pending_claims.as_ref().map_or(0, |v| v.len() as u64)),
        )?;
        family(
            enc,
            "weft_control_refused",
            "What the control mesh refused since start, by reason.",
            [
                ("handshake", r.router.refused.handshakes),
                ("key_mismatch", r.router.refused.key_mismatches),
                ("tombstone_of_live_peer", r.router.refused.tombstones),
                ("forged_record", r.router.refused.forged_records),
                ("peers_over_bound", r.router.refused.peers_over_bound),
                ("send_overflow", r.router.refused.send_overflows),
            ]
            .map(|(reason, n)| {
                let labels: Labels = vec![("reason", reason.to_string())];
                (labels, ConstCounter::new(n))
            }),
        )?;
        single(
            enc,
            "weft_ipam_bad_gossip",
            "Gossiped rings refused as malformed or conflicting.",
            ConstCounter::new(r.ipam.bad_gossip),
        )?;
        single(
            enc,
            "weft_api_bad_requests",
            "HTTP requests refused for a malformed container id, address or prefix.",
            ConstCounter::new(r.ipam.bad_requests),
        )?;
        single(
            enc,
            "weft_ipam_ready",
            "Whether IP allocation is ready (1) or not (0).",
            int(u64::from(r.ipam.status == "ready")),
        )?;

        type PeerCounter = fn(&super::report::PeerTrafficReport) -> u64;
        let per_peer: [(&str, &str, PeerCounter); 4] = [
            (
                "weft_peer_tx_packets",
                "Packets sent to a peer over the overlay.",
                |p| p.tx_packets,
            ),
            (
                "weft_peer_tx_bytes",
                "Bytes of inner packets sent to a peer over the overlay.",
                |p| p.tx_bytes,
            ),
            (
                "weft_peer_rx_packets",
                "Packets received from a peer over the overlay.",
                |p| p.rx_packets,
            ),
            (
                "weft_peer_rx_bytes",
                "Bytes of inner packets received from a peer over the overlay.",
                |p| p.rx_bytes,
            ),
        ];
        for (name, help, value) in per_peer {
            family(
                enc,
                name,
                help,
                r.dataplane.peers.iter().map(|p| {
                    let labels: Labels =
                        vec![("peer", p.name.clone()), ("nickname", p.nick_name.clone())];
                    (labels, ConstCounter::new(value(p)))
                }),
            )?;
        }
        family(
            enc,
            "weft_dropped_packets",
            "Packets dropped by the data plane, by reason.",
            r.dataplane.drops.iter().map(|d| {
                let labels: Labels = vec![("reason", d.reason.clone())];
                (labels, ConstCounter::new(d.packets))
            }),
        )
    }
}

/// The `/metrics` page in the OpenMetrics text format ([`METRICS_CONTENT_TYPE`]).
pub fn render_metrics(r: &Report, t: &Telemetry, process: Option<ProcessStats>) -> String {
    let mut reg = Registry::default();
    reg.register_collector(Box::new(Snapshot(r.clone(), process)));
    t.register(&mut reg);
    let mut out = String::new();
    // Writing into a String cannot fail, and every metric here encodes infallibly.
    let _ = encode(&mut out, &reg);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::status::tests::sample_report;
    use std::collections::HashMap;

    /// Sample lines as `series -> value`, e.g. `weave_max_ips -> 65536`.
    fn samples(text: &str) -> HashMap<String, f64> {
        text.lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
            .map(|l| {
                let (series, value) = l.rsplit_once(' ').expect("sample line has a value");
                (series.to_string(), value.parse().expect("numeric value"))
            })
            .collect()
    }

    #[test]
    fn values_come_from_the_report() {
        let mut report = sample_report();
        report.ipam.bad_gossip = 4;
        report.router.refused.handshakes = 6;
        report.router.refused.key_mismatches = 1;
        report.router.refused.tombstones = 2;
        report.router.refused.forged_records = 3;
        report.ipam.bad_requests = 5;
        let text = render_metrics(&report, &Telemetry::default(), None);
        assert!(text.ends_with("# EOF\n"), "{text}");
        let s = samples(&text);
        let expect = [
            (
                "weave_connections{encryption=\"\",state=\"established\",type=\"vxlan\"}",
                1.0,
            ),
            (
                "weave_connections{encryption=\"\",state=\"retrying\",type=\"vxlan\"}",
                1.0,
            ),
            (
                "weave_connections{encryption=\"\",state=\"failed\",type=\"vxlan\"}",
                0.0,
            ),
            (
                "weave_connections{encryption=\"\",state=\"pending\",type=\"vxlan\"}",
                0.0,
            ),
            (
                "weave_connections{encryption=\"\",state=\"connecting\",type=\"vxlan\"}",
                0.0,
            ),
            (
                "weave_connections{encryption=\"yes\",state=\"established\",type=\"vxlan\"}",
                0.0,
            ),
            (
                "weave_connections{encryption=\"yes\",state=\"retrying\",type=\"vxlan\"}",
                0.0,
            ),
            (
                "weave_connections{encryption=\"yes\",state=\"failed\",type=\"vxlan\"}",
                0.0,
            ),
            (
                "weave_connections{encryption=\"yes\",state=\"pending\",type=\"vxlan\"}",
                0.0,
            ),
            (
                "weave_connections{encryption=\"yes\",state=\"connecting\",type=\"vxlan\"}",
                0.0,
            ),
            ("weave_connection_terminations_total", 3.0),
            ("weave_ips{state=\"local-used\"}", 2.0),
            ("weave_max_ips", 65536.0),
            ("weave_ipam_unreachable_count", 1.0),
            ("weave_ipam_pending_allocates", 1.0),
            ("weave_ipam_pending_claims", 0.0),
            ("weft_ipam_bad_gossip_total", 4.0),
            ("weft_api_bad_requests_total", 5.0),
            ("weft_control_refused_total{reason=\"handshake\"}", 6.0),
            ("weft_control_refused_total{reason=\"key_mismatch\"}", 1.0),
            (
                "weft_control_refused_total{reason=\"tombstone_of_live_peer\"}",
                2.0,
            ),
            ("weft_control_refused_total{reason=\"forged_record\"}", 3.0),
            (
                "weft_control_refused_total{reason=\"peers_over_bound\"}",
                0.0,
            ),
            ("weft_control_refused_total{reason=\"send_overflow\"}", 0.0),
            ("weft_ipam_ready", 1.0),
            (
                "weft_peer_tx_packets_total{peer=\"02:77:76:00:00:02\",nickname=\"n2\"}",
                10.0,
            ),
            (
                "weft_peer_tx_bytes_total{peer=\"02:77:76:00:00:02\",nickname=\"n2\"}",
                1400.0,
            ),
            (
                "weft_peer_rx_packets_total{peer=\"02:77:76:00:00:02\",nickname=\"n2\"}",
                7.0,
            ),
            (
                "weft_peer_rx_bytes_total{peer=\"02:77:76:00:00:02\",nickname=\"n2\"}",
                980.0,
            ),
            ("weft_dropped_packets_total{reason=\"no_route\"}", 4.0),
            ("weft_dropped_packets_total{reason=\"malformed\"}", 1.0),
            ("weave_flows", 1.0),
        ];
        for (series, value) in expect {
            assert_eq!(s.get(series), Some(&value), "{series} in\n{text}");
        }
        let pct = s["weave_ipam_unreachable_percentage"];
        assert!((pct - 21846.0 * 100.0 / 65536.0).abs() < 1e-9, "{pct}");
        assert_eq!(
            s.len(),
            expect.len() + 1,
            "unexpected extra series in\n{text}"
        );
    }

    #[test]
    fn an_encrypting_router_counts_its_connections_as_encrypted() {
        let mut r = sample_report();
        r.router.encryption = true;
        let s = samples(&render_metrics(&r, &Telemetry::default(), None));
        let key = |e: &str| {
            format!("weave_connections{{encryption=\"{e}\",state=\"established\",type=\"vxlan\"}}")
        };
        assert_eq!(s[&key("yes")], 1.0);
        assert_eq!(s[&key("")], 0.0);
    }

    #[test]
    fn series_come_out_in_a_fixed_order() {
        let r = sample_report();
        let text = render_metrics(&r, &Telemetry::default(), None);
        assert_eq!(text, render_metrics(&r, &Telemetry::default(), None));
        let states: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("weave_connections{"))
            .filter_map(|l| l.split("state=\"").nth(1)?.split('"').next())
            .collect();
        let twice: Vec<&str> = CONNECTION_STATES.iter().flat_map(|s| [*s, *s]).collect();
        assert_eq!(states, twice, "each state with encryption \"\" and \"yes\"");
        let reasons: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("weft_dropped_packets_total{"))
            .filter_map(|l| l.split("reason=\"").nth(1)?.split('"').next())
            .collect();
        assert_eq!(reasons, ["no_route", "malformed"]);
    }

    #[test]
    fn help_and_type_lines_match_weave() {
        let text = render_metrics(&sample_report(), &Telemetry::default(), None);
        for l in [
            "# HELP weave_connections Number of peer-to-peer connections.",
            "# TYPE weave_connections gauge",
            "# HELP weave_connection_terminations Number of peer-to-peer connections terminated.",
            "# TYPE weave_connection_terminations counter",
            "# HELP weave_ips Number of IP addresses.",
            "# HELP weave_max_ips Size of IP address space used by allocator.",
            "# HELP weave_ipam_unreachable_count Number of unreachable peers.",
            "# HELP weave_ipam_pending_allocates Number of pending allocates.",
            "# HELP weave_ipam_pending_claims Number of pending claims.",
            "# TYPE weft_dropped_packets counter",
        ] {
            assert!(text.lines().any(|x| x == l), "missing {l:?} in\n{text}");
        }
    }

    #[test]
    fn empty_report_has_every_weave_series_and_no_nan() {
        let text = render_metrics(&Report::default(), &Telemetry::default(), None);
        let s = samples(&text);
        assert_eq!(s["weave_ipam_unreachable_percentage"], 0.0);
        assert_eq!(s["weave_max_ips"], 0.0);
        assert_eq!(s["weft_ipam_ready"], 0.0);
        assert_eq!(
            s["weave_connections{encryption=\"\",state=\"established\",type=\"vxlan\"}"],
            0.0
        );
        assert!(!s.keys().any(|k| k.starts_with("weft_peer_")), "{text}");
    }

    #[test]
    fn label_values_are_escaped() {
        let mut r = sample_report();
        r.dataplane.drops[0].reason = "bad\"reason\nx".into();
        let s = samples(&render_metrics(&r, &Telemetry::default(), None));
        assert_eq!(
            s.get("weft_dropped_packets_total{reason=\"bad\\\"reason\\nx\"}"),
            Some(&4.0)
        );
    }

    /// A scrape with every kind of series present: the sample report, one observation of
    /// each event metric, and this process's figures.
    fn full_scrape() -> String {
        let t = Telemetry::default();
        t.observe_rtt("02:77:76:00:00:02", "n2", 0.000_4);
        t.observe_rtt("02:77:76:00:00:02", "n2", 0.002);
        t.observe_cni("ADD", "ok", 0.03);
        t.observe_cni("DEL", "error_11", 0.5);
        t.count_ipam_op("allocate", "ok");
        t.count_ipam_op("allocate", "ok");
        t.count_ipam_op("free", "not_found");
        let p = ProcessStats::read().expect("/proc is readable");
        render_metrics(&sample_report(), &t, Some(p))
    }

    type Exposition = openmetrics_parser::MetricsExposition<
        openmetrics_parser::OpenMetricsType,
        openmetrics_parser::OpenMetricsValue,
    >;

    /// A label of a parsed sample.
    fn label(
        s: &openmetrics_parser::Sample<openmetrics_parser::OpenMetricsValue>,
        name: &str,
    ) -> Option<String> {
        s.get_labelset()
            .ok()?
            .get_label_value(name)
            .map(str::to_string)
    }

    fn parsed(text: &str) -> Exposition {
        openmetrics_parser::openmetrics::parse_openmetrics(text)
            .unwrap_or_else(|e| panic!("not valid OpenMetrics: {e:?}\n{text}"))
    }

    /// The names a query may use for a family: Prometheus' series names per type.
    fn series_names(x: &Exposition) -> Vec<String> {
        use openmetrics_parser::OpenMetricsType as T;
        let mut v = Vec::new();
        for (name, f) in &x.families {
            let suffixes: &[&str] = match f.family_type {
                T::Counter => &["_total", "_created"],
                T::Histogram | T::GaugeHistogram => &["_bucket", "_sum", "_count", "_created"],
                T::Summary => &["", "_sum", "_count", "_created"],
                _ => &[""],
            };
            v.extend(suffixes.iter().map(|s| format!("{name}{s}")));
        }
        v
    }

    #[test]
    fn a_real_parser_reads_every_family_with_its_type_and_values() {
        use openmetrics_parser::{OpenMetricsType as T, OpenMetricsValue as V};
        let x = parsed(&full_scrape());
        let ty = |n: &str| {
            x.families
                .get(n)
                .unwrap_or_else(|| panic!("no family {n}"))
                .family_type
        };
        for (name, want) in [
            ("weave_connections", T::Gauge),
            ("weave_connection_terminations", T::Counter),
            ("weave_flows", T::Gauge),
            ("weave_ips", T::Gauge),
            ("weave_max_ips", T::Gauge),
            ("process_cpu_seconds", T::Counter),
            ("process_resident_memory_bytes", T::Gauge),
            ("process_open_fds", T::Gauge),
            ("process_start_time_seconds", T::Gauge),
            ("weft_peer_rtt_seconds", T::Histogram),
            ("weft_cni_request_duration_seconds", T::Histogram),
            ("weft_ipam_operations", T::Counter),
        ] {
            assert_eq!(ty(name), want, "{name}");
        }
        let rtt = x.families["weft_peer_rtt_seconds"]
            .iter_samples()
            .find(|s| label(s, "nickname").as_deref() == Some("n2"))
            .expect("n2's histogram");
        match &rtt.value {
            V::Histogram(h) => {
                assert_eq!(h.count, Some(2));
                // 0.4 ms falls in the 0.5 ms bucket, 2 ms in the 2.5 ms one.
                let le = |b: f64| {
                    h.buckets
                        .iter()
                        .find(|x| x.upper_bound == b)
                        .map(|x| x.count.as_f64())
                };
                assert_eq!(le(0.000_25), Some(0.0));
                assert_eq!(le(0.000_5), Some(1.0));
                assert_eq!(le(0.002_5), Some(2.0));
            }
            other => panic!("{other:?}"),
        }
        let cni_err = x.families["weft_cni_request_duration_seconds"]
            .iter_samples()
            .find(|s| {
                label(s, "command").as_deref() == Some("DEL")
                    && label(s, "result").as_deref() == Some("error_11")
            })
            .expect("DEL error_11");
        assert!(matches!(&cni_err.value, V::Histogram(h) if h.count == Some(1)));
        let allocs = x.families["weft_ipam_operations"]
            .iter_samples()
            .find(|s| {
                label(s, "op").as_deref() == Some("allocate")
                    && label(s, "result").as_deref() == Some("ok")
            })
            .expect("allocate ok");
        assert!(matches!(&allocs.value, V::Counter(c) if c.value.as_f64() == 2.0));
        let rss = x.families["process_resident_memory_bytes"]
            .iter_samples()
            .next()
            .unwrap();
        assert!(
            matches!(&rss.value, V::Gauge(g) if g.as_f64() > 1e6),
            "{rss:?}"
        );
    }

    /// Every series a real Weave 2.8.1 router exported (weave-samples) is exported by weft.
    #[test]
    fn every_weave_metric_is_there() {
        let weave = include_str!("testdata/weave-2.8.1-metrics.txt");
        let names = series_names(&parsed(&full_scrape()));
        for line in weave.lines().filter(|l| l.starts_with("weave_")) {
            let name = line.split(['{', ' ']).next().unwrap();
            assert!(names.iter().any(|n| n == name), "{name} missing");
        }
    }

    /// The Grafana dashboard in deploy/ names only metrics weft exports: every expression
    /// mentions at least one, and each one it mentions exists.
    #[test]
    fn the_grafana_dashboard_queries_only_metrics_that_exist() {
        let dash: serde_json::Value =
            serde_json::from_str(include_str!("../../deploy/grafana-dashboard.json")).unwrap();
        let names = series_names(&parsed(&full_scrape()));
        let mut exprs = Vec::new();
        for panel in dash["panels"].as_array().unwrap() {
            for t in panel["targets"].as_array().unwrap() {
                exprs.push(t["expr"].as_str().unwrap().to_string());
            }
        }
        assert!(exprs.len() >= 10, "{exprs:?}");
        for e in &exprs {
            let used: Vec<&str> = e
                .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
                .filter(|w| {
                    w.starts_with("weave_") || w.starts_with("weft_") || w.starts_with("process_")
                })
                .collect();
            assert!(!used.is_empty(), "{e} names no weft metric");
            for m in used {
                assert!(names.iter().any(|n| n == m), "{e}: {m} does not exist");
            }
        }
    }
}
