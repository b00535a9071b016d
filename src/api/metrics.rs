//! Prometheus metrics, rendered from a [`Report`] snapshot.
//!
//! Metric names and help texts are Weave's, so existing dashboards and alerts keep
//! working; weft's own data-plane counters use the `weft_` prefix. A fresh registry is
//! built per scrape: scrapes are rare, and it keeps the daemon free of metric handles that
//! would have to be kept in step with its state.

use super::report::Report;
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
struct Snapshot(Report);

impl Collector for Snapshot {
    fn encode(&self, mut enc: DescriptorEncoder) -> fmt::Result {
        let r = &self.0;
        let enc = &mut enc;
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
            int(r.ipam.pending_allocates),
        )?;
        single(
            enc,
            "weave_ipam_pending_claims",
            "Number of pending claims.",
            int(r.ipam.pending_claims),
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
pub fn render_metrics(r: &Report) -> String {
    let mut reg = Registry::default();
    reg.register_collector(Box::new(Snapshot(r.clone())));
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
        let text = render_metrics(&report);
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
        let s = samples(&render_metrics(&r));
        let key = |e: &str| {
            format!("weave_connections{{encryption=\"{e}\",state=\"established\",type=\"vxlan\"}}")
        };
        assert_eq!(s[&key("yes")], 1.0);
        assert_eq!(s[&key("")], 0.0);
    }

    #[test]
    fn series_come_out_in_a_fixed_order() {
        let r = sample_report();
        let text = render_metrics(&r);
        assert_eq!(text, render_metrics(&r));
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
        let text = render_metrics(&sample_report());
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
        let text = render_metrics(&Report::default());
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
        let s = samples(&render_metrics(&r));
        assert_eq!(
            s.get("weft_dropped_packets_total{reason=\"bad\\\"reason\\nx\"}"),
            Some(&4.0)
        );
    }
}
