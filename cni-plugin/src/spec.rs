//! CNI specification types: versions, error codes and replies, results per version.
//!
//! Everything here is pure (no I/O) so it can be tested without root.

use std::fmt;
use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

/// The spec versions this plugin speaks. The newest one answers VERSION and error
/// replies for configs whose version could not be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Version {
    V0_1_0,
    V0_2_0,
    V0_3_0,
    V0_3_1,
    V0_4_0,
    V1_0_0,
    V1_1_0,
}

impl Version {
    pub const ALL: [Version; 7] = [
        Version::V0_1_0,
        Version::V0_2_0,
        Version::V0_3_0,
        Version::V0_3_1,
        Version::V0_4_0,
        Version::V1_0_0,
        Version::V1_1_0,
    ];
    pub const NEWEST: Version = Version::V1_1_0;

    pub fn parse(s: &str) -> Option<Version> {
        Version::ALL.into_iter().find(|v| v.as_str() == s)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Version::V0_1_0 => "0.1.0",
            Version::V0_2_0 => "0.2.0",
            Version::V0_3_0 => "0.3.0",
            Version::V0_3_1 => "0.3.1",
            Version::V0_4_0 => "0.4.0",
            Version::V1_0_0 => "1.0.0",
            Version::V1_1_0 => "1.1.0",
        }
    }

    /// Before 0.3.0 a result is `{"ip4": {...}, "dns": {...}}` (libcni's `types/020`),
    /// without interfaces.
    pub fn legacy_result(self) -> bool {
        self < Version::V0_3_0
    }

    /// Before 1.0.0 every `ips` entry names its IP version ("4"/"6").
    pub fn ips_carry_version(self) -> bool {
        self < Version::V1_0_0
    }

    /// CHECK exists since 0.4.0; libcni refuses it for older configs and so do we.
    pub fn supports_check(self) -> bool {
        self >= Version::V0_4_0
    }

    /// GC and STATUS exist since 1.1.0; libcni sends them to nothing older.
    pub fn supports_gc_and_status(self) -> bool {
        self >= Version::V1_1_0
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The answer to `CNI_COMMAND=VERSION`.
pub fn version_reply() -> Value {
    json!({
        "cniVersion": Version::NEWEST.as_str(),
        "supportedVersions": Version::ALL.iter().map(|v| v.as_str()).collect::<Vec<_>>(),
    })
}

/// Error codes from the CNI spec ("Error codes 0-99 are reserved") plus ours (100+).
/// Spec codes 2 (unsupported field) and 3 (unknown container) have no use here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    IncompatibleVersion,
    /// 4: "Invalid necessary environment variables, like CNI_COMMAND, CNI_CONTAINERID".
    InvalidEnv,
    Io,
    Decode,
    /// 7: "Invalid network config".
    InvalidConfig,
    TryAgainLater,
    /// 50 (STATUS): "The plugin is not available (i.e. cannot service ADD requests)".
    Unavailable,
    /// The daemon answered something the plugin does not understand.
    DaemonProtocol,
    /// No free address: the range (or the requested subnet) is exhausted.
    AddressesExhausted,
    /// The daemon understood but failed (for example, it could not save the allocation:
    /// disk full); nothing was granted.
    DaemonFailed,
    /// The container is already attached under another interface name.
    AlreadyAttached,
    /// The host-side veth name (a hash of the id) is held by another container.
    NameCollision,
    /// CHECK found the container's network differing from what ADD set up.
    CheckMismatch,
}

impl ErrorCode {
    pub fn code(self) -> u32 {
        match self {
            ErrorCode::IncompatibleVersion => 1,
            ErrorCode::InvalidEnv => 4,
            ErrorCode::Io => 5,
            ErrorCode::Decode => 6,
            ErrorCode::InvalidConfig => 7,
            ErrorCode::TryAgainLater => 11,
            ErrorCode::Unavailable => 50,
            ErrorCode::DaemonProtocol => 100,
            ErrorCode::NameCollision => 101,
            ErrorCode::AddressesExhausted => 102,
            ErrorCode::DaemonFailed => 103,
            ErrorCode::AlreadyAttached => 104,
            ErrorCode::CheckMismatch => 999,
        }
    }
}

/// A failure that becomes the plugin's error reply. `msg` says what went wrong in
/// terms of the operation, `details` carries the underlying cause and what to do.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{msg} (code {}): {details}", code.code())]
pub struct CniError {
    pub code: ErrorCode,
    pub msg: String,
    pub details: String,
}

impl CniError {
    pub fn new(code: ErrorCode, msg: impl Into<String>, details: impl Into<String>) -> Self {
        CniError {
            code,
            msg: msg.into(),
            details: details.into(),
        }
    }

    /// The JSON error object the spec asks for on stdout.
    pub fn to_json(&self, version: Version) -> Value {
        json!({
            "cniVersion": version.as_str(),
            "code": self.code.code(),
            "msg": self.msg,
            "details": self.details,
        })
    }
}

/// An IPv4 address with the prefix length of the range it came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    pub addr: Ipv4Addr,
    pub prefix: u8,
}

impl Cidr {
    /// Parses `a.b.c.d/nn`. Surrounding whitespace (the daemon ends lines with `\n`)
    /// is ignored; a missing prefix is an error because the pod needs its range.
    pub fn parse(s: &str) -> Option<Cidr> {
        let (addr, prefix) = s.trim().split_once('/')?;
        let addr: Ipv4Addr = addr.parse().ok()?;
        if prefix.is_empty() || prefix.len() > 2 || !prefix.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        let prefix: u8 = prefix.parse().ok()?;
        (prefix <= 32).then_some(Cidr { addr, prefix })
    }

    fn mask(self) -> u32 {
        match self.prefix {
            0 => 0,
            p => u32::MAX << (32 - u32::from(p.min(32))),
        }
    }

    /// The first address of the network (`10.32.0.5/24` -> `10.32.0.0`).
    pub fn network(self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.addr) & self.mask())
    }

    /// Whether `addr` lies inside this network.
    pub fn contains(self, addr: Ipv4Addr) -> bool {
        u32::from(addr) & self.mask() == u32::from(self.network())
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// Formats a hardware address the way the spec's examples and runtimes expect.
pub fn format_mac(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// The spec's DNS type: passed from the network config's `dns` to the ADD result, as
/// the reference plugins do. Empty fields are left out (libcni's `omitempty`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Dns {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nameservers: Vec<String>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub domain: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub search: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub options: Vec<String>,
}

/// What ADD set up, independent of the result version it is rendered in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AddOutcome {
    pub host_ifname: String,
    pub host_mac: String,
    pub pod_ifname: String,
    pub pod_mac: String,
    pub sandbox: String,
    /// The pod's address with the prefix length of its network (the range, or the
    /// config's `ipam.subnet`).
    pub address: Cidr,
    pub gateway: Ipv4Addr,
    pub dns: Dns,
}

#[derive(Serialize)]
struct InterfaceOut<'a> {
    name: &'a str,
    mac: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    sandbox: Option<&'a str>,
}

#[derive(Serialize)]
struct IpOut<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    version: Option<&'a str>,
    address: String,
    gateway: String,
    interface: usize,
}

#[derive(Serialize)]
struct RouteOut {
    dst: &'static str,
    gw: String,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct AddResultOut<'a> {
    cni_version: &'a str,
    interfaces: Vec<InterfaceOut<'a>>,
    ips: Vec<IpOut<'a>>,
    routes: Vec<RouteOut>,
    dns: &'a Dns,
}

/// 0.1.0 and 0.2.0: one `ip4` object with its own routes, no interfaces.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct LegacyResultOut<'a> {
    cni_version: &'a str,
    ip4: LegacyIpOut,
    dns: &'a Dns,
}

#[derive(Serialize)]
struct LegacyIpOut {
    ip: String,
    gateway: String,
    routes: Vec<RouteOut>,
}

/// Index of the pod interface within `interfaces` (the host veth comes first).
const POD_INTERFACE_INDEX: usize = 1;

fn default_route(outcome: &AddOutcome) -> RouteOut {
    RouteOut {
        dst: "0.0.0.0/0",
        gw: outcome.gateway.to_string(),
    }
}

/// Renders the ADD result in the version the config declared.
pub fn render_add_result(outcome: &AddOutcome, version: Version) -> Value {
    if version.legacy_result() {
        let result = LegacyResultOut {
            cni_version: version.as_str(),
            ip4: LegacyIpOut {
                ip: outcome.address.to_string(),
                gateway: outcome.gateway.to_string(),
                routes: vec![default_route(outcome)],
            },
            dns: &outcome.dns,
        };
        return serde_json::to_value(result).unwrap_or(Value::Null);
    }
    let result = AddResultOut {
        cni_version: version.as_str(),
        interfaces: vec![
            InterfaceOut {
                name: &outcome.host_ifname,
                mac: &outcome.host_mac,
                sandbox: None,
            },
            InterfaceOut {
                name: &outcome.pod_ifname,
                mac: &outcome.pod_mac,
                sandbox: Some(&outcome.sandbox),
            },
        ],
        ips: vec![IpOut {
            version: version.ips_carry_version().then_some("4"),
            address: outcome.address.to_string(),
            gateway: outcome.gateway.to_string(),
            interface: POD_INTERFACE_INDEX,
        }],
        routes: vec![default_route(outcome)],
        dns: &outcome.dns,
    };
    serde_json::to_value(result).unwrap_or(Value::Null)
}

#[derive(Deserialize)]
struct PrevIp {
    address: String,
    #[serde(default)]
    gateway: Option<String>,
    #[serde(default)]
    version: Option<String>,
}

#[derive(Deserialize)]
struct PrevResultIn {
    #[serde(default)]
    ips: Vec<PrevIp>,
}

/// The part of a previous ADD result that CHECK verifies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Expected {
    pub address: Cidr,
    pub gateway: Option<Ipv4Addr>,
}

/// Extracts the pod's IPv4 address and gateway from `prevResult` (any version).
pub fn expected_from_prev_result(prev: &Value) -> Result<Expected, CniError> {
    let parsed: PrevResultIn = serde_json::from_value(prev.clone()).map_err(|e| {
        CniError::new(
            ErrorCode::Decode,
            "prevResult could not be decoded",
            format!("{e}; the runtime must pass the result of ADD unchanged"),
        )
    })?;
    let ip = parsed
        .ips
        .iter()
        .find(|ip| ip.version.as_deref() != Some("6") && Cidr::parse(&ip.address).is_some())
        .ok_or_else(|| {
            CniError::new(
                ErrorCode::InvalidConfig,
                "prevResult has no IPv4 address",
                "CHECK needs the ips entry that ADD returned",
            )
        })?;
    let address = Cidr::parse(&ip.address).ok_or_else(|| {
        CniError::new(
            ErrorCode::InvalidConfig,
            "prevResult address is not an IPv4 CIDR",
            ip.address.clone(),
        )
    })?;
    let gateway = match &ip.gateway {
        None => None,
        Some(g) => Some(g.parse::<Ipv4Addr>().map_err(|_| {
            CniError::new(
                ErrorCode::InvalidConfig,
                "prevResult gateway is not an IPv4 address",
                g.clone(),
            )
        })?),
    };
    Ok(Expected { address, gateway })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outcome() -> AddOutcome {
        AddOutcome {
            host_ifname: "vethwepl1234567".into(),
            host_mac: "aa:bb:cc:dd:ee:01".into(),
            pod_ifname: "eth0".into(),
            pod_mac: "aa:bb:cc:dd:ee:02".into(),
            sandbox: "/var/run/netns/x".into(),
            address: Cidr {
                addr: Ipv4Addr::new(192, 168, 0, 5),
                prefix: 16,
            },
            gateway: Ipv4Addr::new(192, 168, 0, 1),
            dns: Dns::default(),
        }
    }

    fn with_dns() -> AddOutcome {
        AddOutcome {
            dns: Dns {
                nameservers: vec!["10.96.0.10".into()],
                domain: "cluster.local".into(),
                search: vec!["default.svc.cluster.local".into(), "cluster.local".into()],
                options: vec!["ndots:5".into()],
            },
            ..outcome()
        }
    }

    #[test]
    fn versions_parse_and_order() {
        for v in Version::ALL {
            assert_eq!(Version::parse(v.as_str()), Some(v));
        }
        assert!(Version::ALL.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(Version::parse("0.5.0"), None);
        assert_eq!(Version::parse("1.2.0"), None);
        assert_eq!(Version::parse("1.1"), None);
        assert_eq!(Version::parse(""), None);
        assert!(Version::V0_4_0.supports_check());
        assert!(Version::V1_1_0.supports_check());
        assert!(!Version::V0_3_1.supports_check());
        assert!(!Version::V0_2_0.supports_check());
        assert!(Version::V0_3_0.ips_carry_version());
        assert!(!Version::V1_0_0.ips_carry_version());
        assert!(!Version::V1_1_0.ips_carry_version());
        assert!(Version::V0_1_0.legacy_result() && Version::V0_2_0.legacy_result());
        assert!(!Version::V0_3_0.legacy_result());
        assert!(Version::V1_1_0.supports_gc_and_status());
        assert!(!Version::V1_0_0.supports_gc_and_status());
    }

    #[test]
    fn version_reply_lists_all() {
        assert_eq!(
            version_reply(),
            json!({"cniVersion":"1.1.0","supportedVersions":
                ["0.1.0","0.2.0","0.3.0","0.3.1","0.4.0","1.0.0","1.1.0"]})
        );
    }

    #[test]
    fn spec_error_codes() {
        for (code, n) in [
            (ErrorCode::IncompatibleVersion, 1),
            (ErrorCode::InvalidEnv, 4),
            (ErrorCode::Io, 5),
            (ErrorCode::Decode, 6),
            (ErrorCode::InvalidConfig, 7),
            (ErrorCode::TryAgainLater, 11),
            (ErrorCode::Unavailable, 50),
        ] {
            assert_eq!(code.code(), n, "{code:?}");
        }
    }

    #[test]
    fn cidr_network_and_membership() {
        let c = Cidr::parse("10.32.0.77/24").unwrap();
        assert_eq!(c.network(), Ipv4Addr::new(10, 32, 0, 0));
        assert!(c.contains(Ipv4Addr::new(10, 32, 0, 1)));
        assert!(c.contains(Ipv4Addr::new(10, 32, 0, 255)));
        assert!(!c.contains(Ipv4Addr::new(10, 32, 1, 0)));
        let all = Cidr::parse("0.0.0.0/0").unwrap();
        assert!(all.contains(Ipv4Addr::new(1, 2, 3, 4)));
        let host = Cidr::parse("10.0.0.1/32").unwrap();
        assert!(host.contains(host.addr) && !host.contains(Ipv4Addr::new(10, 0, 0, 2)));
    }

    #[test]
    fn error_json_has_spec_fields() {
        let e = CniError::new(ErrorCode::TryAgainLater, "daemon down", "start it");
        assert_eq!(
            e.to_json(Version::V0_3_1),
            json!({"cniVersion":"0.3.1","code":11,"msg":"daemon down","details":"start it"})
        );
        assert_eq!(ErrorCode::CheckMismatch.code(), 999);
        assert!(ErrorCode::DaemonProtocol.code() > 99);
    }

    #[test]
    fn cidr_parsing() {
        let c = Cidr::parse("192.168.3.4/16\n").unwrap();
        assert_eq!(c.addr, Ipv4Addr::new(192, 168, 3, 4));
        assert_eq!(c.prefix, 16);
        assert_eq!(c.to_string(), "192.168.3.4/16");
        for bad in [
            "",
            "192.168.3.4",
            "192.168.3.4/",
            "192.168.3.4/33",
            "192.168.3.4/+1",
            "192.168.3.4/016",
            "fe80::1/64",
            "x/16",
            "192.168.3.4/16/1",
        ] {
            assert_eq!(Cidr::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn mac_format() {
        assert_eq!(format_mac(&[0x0a, 0xff, 0, 1, 2, 3]), "0a:ff:00:01:02:03");
    }

    #[test]
    fn result_1_0_0_has_no_ip_version() {
        let v = render_add_result(&outcome(), Version::V1_0_0);
        assert_eq!(
            v,
            json!({
                "cniVersion":"1.0.0",
                "interfaces":[
                    {"name":"vethwepl1234567","mac":"aa:bb:cc:dd:ee:01"},
                    {"name":"eth0","mac":"aa:bb:cc:dd:ee:02","sandbox":"/var/run/netns/x"}
                ],
                "ips":[{"address":"192.168.0.5/16","gateway":"192.168.0.1","interface":1}],
                "routes":[{"dst":"0.0.0.0/0","gw":"192.168.0.1"}],
                "dns":{}
            })
        );
    }

    #[test]
    fn result_1_1_0_is_like_1_0_0() {
        let mut v = render_add_result(&outcome(), Version::V1_1_0);
        assert_eq!(v["cniVersion"], "1.1.0");
        v["cniVersion"] = json!("1.0.0");
        assert_eq!(v, render_add_result(&outcome(), Version::V1_0_0));
    }

    #[test]
    fn legacy_results_have_ip4() {
        for version in [Version::V0_1_0, Version::V0_2_0] {
            assert_eq!(
                render_add_result(&outcome(), version),
                json!({
                    "cniVersion": version.as_str(),
                    "ip4": {
                        "ip": "192.168.0.5/16",
                        "gateway": "192.168.0.1",
                        "routes": [{"dst":"0.0.0.0/0","gw":"192.168.0.1"}]
                    },
                    "dns": {}
                })
            );
        }
    }

    #[test]
    fn dns_is_passed_through_in_every_version() {
        let expected = json!({
            "nameservers": ["10.96.0.10"],
            "domain": "cluster.local",
            "search": ["default.svc.cluster.local", "cluster.local"],
            "options": ["ndots:5"]
        });
        for version in Version::ALL {
            assert_eq!(
                render_add_result(&with_dns(), version)["dns"],
                expected,
                "{version}"
            );
        }
        let partial = AddOutcome {
            dns: Dns {
                nameservers: vec!["1.1.1.1".into()],
                ..Dns::default()
            },
            ..outcome()
        };
        assert_eq!(
            render_add_result(&partial, Version::V0_3_1)["dns"],
            json!({"nameservers": ["1.1.1.1"]})
        );
    }

    #[test]
    fn subnet_prefix_is_rendered() {
        let o = AddOutcome {
            address: Cidr::parse("10.32.0.3/24").unwrap(),
            ..outcome()
        };
        assert_eq!(
            render_add_result(&o, Version::V1_1_0)["ips"][0]["address"],
            "10.32.0.3/24"
        );
        assert_eq!(
            render_add_result(&o, Version::V0_2_0)["ip4"]["ip"],
            "10.32.0.3/24"
        );
    }

    #[test]
    fn result_old_versions_carry_ip_version() {
        for version in [Version::V0_3_0, Version::V0_3_1, Version::V0_4_0] {
            let v = render_add_result(&outcome(), version);
            assert_eq!(v["cniVersion"], version.as_str());
            assert_eq!(v["ips"][0]["version"], "4");
            assert_eq!(v["ips"][0]["interface"], 1);
            assert_eq!(v["interfaces"][1]["sandbox"], "/var/run/netns/x");
        }
    }

    #[test]
    fn prev_result_round_trip() {
        for version in Version::ALL.into_iter().filter(|v| v.supports_check()) {
            let v = render_add_result(&outcome(), version);
            let e = expected_from_prev_result(&v).unwrap();
            assert_eq!(e.address, outcome().address);
            assert_eq!(e.gateway, Some(outcome().gateway));
        }
    }

    #[test]
    fn prev_result_errors() {
        let e = expected_from_prev_result(&json!({"ips": []})).unwrap_err();
        assert_eq!(e.code, ErrorCode::InvalidConfig);
        let e = expected_from_prev_result(&json!({"ips": "x"})).unwrap_err();
        assert_eq!(e.code, ErrorCode::Decode);
        let e =
            expected_from_prev_result(&json!({"ips": [{"address":"10.0.0.1/8","gateway":"nope"}]}))
                .unwrap_err();
        assert_eq!(e.code, ErrorCode::InvalidConfig);
        let only_v6 = json!({"ips": [{"version":"6","address":"fd00::1/64"}]});
        assert!(expected_from_prev_result(&only_v6).is_err());
        let no_gw = expected_from_prev_result(&json!({"ips": [{"address":"10.0.0.1/8"}]}));
        assert_eq!(no_gw.unwrap().gateway, None);
    }
}
