//! Measurements that are events rather than state: round-trip times of the control
//! heartbeats, CNI request durations, IPAM operations by outcome. They cannot be rebuilt
//! from a [`Report`](super::report::Report) snapshot, so they live in metric families kept
//! for the daemon's life and are added to each scrape's registry.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use serde::Deserialize;

/// Round trips on a LAN or in one AWS region are 0.1–2 ms; across regions up to ~300 ms.
const RTT_BUCKETS: [f64; 14] = [
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0,
];
/// A CNI ADD is tens of milliseconds; one waiting for IPAM can take the plugin's whole
/// timeout (30 s and more).
const CNI_BUCKETS: [f64; 12] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PeerLabels {
    pub peer: String,
    pub nickname: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CniLabels {
    pub command: String,
    pub result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct IpamOpLabels {
    pub op: String,
    pub result: String,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

/// The daemon's event metrics. Cloning shares the same series.
#[derive(Clone, Debug)]
pub struct Telemetry {
    peer_rtt: HistogramFamily<PeerLabels>,
    cni_duration: HistogramFamily<CniLabels>,
    ipam_ops: Family<IpamOpLabels, Counter>,
}

impl Default for Telemetry {
    fn default() -> Self {
        Telemetry {
            peer_rtt: Family::new_with_constructor(|| Histogram::new(RTT_BUCKETS)),
            cni_duration: Family::new_with_constructor(|| Histogram::new(CNI_BUCKETS)),
            ipam_ops: Family::default(),
        }
    }
}

/// The commands a CNI plugin reports (spec 1.1); anything else is refused so that a
/// local caller cannot create unbounded series.
pub const CNI_COMMANDS: [&str; 5] = ["ADD", "DEL", "CHECK", "GC", "STATUS"];

/// What the plugin sends to `POST /cni/observation` after each command.
#[derive(Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CniObservation {
    pub command: String,
    /// "ok" or "error".
    pub result: String,
    /// The CNI error code when `result` is "error".
    #[serde(default)]
    pub code: Option<u32>,
    pub seconds: f64,
}

impl CniObservation {
    /// The result label: `ok`, or `error_<code>` (codes are few and fixed by the spec).
    pub fn result_label(&self) -> Result<String, String> {
        if !CNI_COMMANDS.contains(&self.command.as_str()) {
            return Err(format!(
                "unknown CNI command {:?}: expected one of {CNI_COMMANDS:?}",
                self.command
            ));
        }
        if !self.seconds.is_finite() || self.seconds < 0.0 || self.seconds > 86_400.0 {
            return Err(format!("implausible duration {}s", self.seconds));
        }
        match (self.result.as_str(), self.code) {
            ("ok", None) => Ok("ok".into()),
            ("error", Some(code)) if code <= 999 => Ok(format!("error_{code}")),
            ("error", None) => Ok("error".into()),
            _ => Err(format!(
                "result must be \"ok\", or \"error\" with a code up to 999; got {:?} {:?}",
                self.result, self.code
            )),
        }
    }
}

impl Telemetry {
    /// One heartbeat round trip to `peer`.
    pub fn observe_rtt(&self, peer: &str, nickname: &str, seconds: f64) {
        self.peer_rtt
            .get_or_create(&PeerLabels {
                peer: peer.to_string(),
                nickname: nickname.to_string(),
            })
            .observe(seconds);
    }

    /// The connection to `peer` closed: its series goes, so that a cluster with churn does
    /// not keep a histogram per peer it ever saw.
    pub fn forget_peer(&self, peer: &str, nickname: &str) {
        self.peer_rtt.remove(&PeerLabels {
            peer: peer.to_string(),
            nickname: nickname.to_string(),
        });
    }

    pub fn observe_cni(&self, command: &str, result: &str, seconds: f64) {
        self.cni_duration
            .get_or_create(&CniLabels {
                command: command.to_string(),
                result: result.to_string(),
            })
            .observe(seconds);
    }

    /// One IPAM operation of the HTTP API (`allocate`, `claim`, `free`, ...) and how it
    /// ended (`ok`, `not_ready`, `exhausted`, `conflict`, ...).
    pub fn count_ipam_op(&self, op: &'static str, result: &'static str) {
        self.ipam_ops
            .get_or_create(&IpamOpLabels {
                op: op.to_string(),
                result: result.to_string(),
            })
            .inc();
    }

    /// Adds the families to one scrape's registry (they share their series).
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "weft_peer_rtt_seconds",
            "Round-trip time of control heartbeats to each connected peer.",
            self.peer_rtt.clone(),
        );
        registry.register(
            "weft_cni_request_duration_seconds",
            "Duration of CNI plugin commands on this node, by command and result.",
            self.cni_duration.clone(),
        );
        // Without `_total`: the encoder appends it to counters.
        registry.register(
            "weft_ipam_operations",
            "IPAM operations of the HTTP API, by operation and result.",
            self.ipam_ops.clone(),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obs(command: &str, result: &str, code: Option<u32>, seconds: f64) -> CniObservation {
        CniObservation {
            command: command.into(),
            result: result.into(),
            code,
            seconds,
        }
    }

    #[test]
    fn observations_become_bounded_labels_or_errors() {
        assert_eq!(obs("ADD", "ok", None, 0.1).result_label().unwrap(), "ok");
        assert_eq!(
            obs("DEL", "error", Some(11), 0.1).result_label().unwrap(),
            "error_11"
        );
        assert!(obs("RM", "ok", None, 0.1).result_label().is_err());
        assert!(obs("ADD", "maybe", None, 0.1).result_label().is_err());
        assert!(obs("ADD", "ok", Some(3), 0.1).result_label().is_err());
        assert!(obs("ADD", "error", Some(100_000), 0.1)
            .result_label()
            .is_err());
        assert!(obs("ADD", "ok", None, f64::NAN).result_label().is_err());
        assert!(obs("ADD", "ok", None, -1.0).result_label().is_err());
    }

    #[test]
    fn a_forgotten_peer_has_no_series() {
        let t = Telemetry::default();
        t.observe_rtt("02:00:00:00:00:01", "n1", 0.001);
        t.observe_rtt("02:00:00:00:00:02", "n2", 0.001);
        t.forget_peer("02:00:00:00:00:01", "n1");
        let mut reg = Registry::default();
        t.register(&mut reg);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &reg).unwrap();
        assert!(!text.contains("nickname=\"n1\""), "{text}");
        assert!(text.contains("nickname=\"n2\""), "{text}");
    }
}
