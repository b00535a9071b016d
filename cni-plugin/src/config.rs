//! The network configuration (stdin) and the CNI_* environment, validated.
//!
//! `hairpinMode` is accepted but changes nothing: weft routes pod traffic at L3 through
//! the host, so a pod reaching itself through a service address already comes back
//! over its own veth (the host routes it); there is no bridge port to set hairpin on.
//!
//! `ipam.subnet` (Weave's `ipam: {"subnet": "10.32.0.0/24"}`) makes ADD allocate inside
//! that subnet of the daemon's range; `ipam.type` is not looked at (weft's daemon is the
//! IPAM). `dns` is handed back in the ADD result unchanged.

use std::net::SocketAddr;

use serde::Deserialize;
use serde_json::Value;

use crate::spec::{Cidr, CniError, Dns, ErrorCode, Version};

use weft_contract::ContainerId;
pub use weft_contract::DEFAULT_HTTP_ADDR as DEFAULT_DAEMON_ADDRESS;

/// `type` values this binary answers to: its own and Weave's conflist entry.
const ACCEPTED_TYPES: [&str; 2] = ["weft", "weave-net"];

/// Linux accepts MTUs from 68 (IPv4 minimum) to 65535 on veth.
const MTU_RANGE: std::ops::RangeInclusive<u64> = 68..=65535;

/// The smallest subnet with an address for a pod: the allocator never hands out a
/// subnet's network and broadcast addresses, so a /31 or /32 holds none.
const MAX_SUBNET_PREFIX: u8 = 30;

#[derive(Debug, Clone, PartialEq)]
pub struct NetConf {
    pub version: Version,
    pub name: String,
    pub mtu: Option<u32>,
    pub daemon_address: SocketAddr,
    pub prev_result: Option<Value>,
    /// `ipam.subnet`: allocate inside it (its network address, prefix <= 30).
    pub subnet: Option<Cidr>,
    /// `dns`, for the ADD result.
    pub dns: Dns,
    /// GC's `cni.dev/valid-attachments`; `None` when the key is absent.
    pub valid_attachments: Option<Vec<Attachment>>,
}

/// One entry of GC's list of attachments still in use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attachment {
    pub container_id: String,
    pub ifname: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawConf {
    cni_version: Option<String>,
    name: Option<String>,
    #[serde(rename = "type")]
    kind: Option<String>,
    mtu: Option<Value>,
    hairpin_mode: Option<Value>,
    daemon_address: Option<Value>,
    prev_result: Option<Value>,
    ipam: Option<Value>,
    dns: Option<Value>,
    #[serde(rename = "cni.dev/valid-attachments")]
    valid_attachments: Option<Value>,
    /// The key's name in a draft of the spec; libcni sends both (containernetworking/cni#1101).
    #[serde(rename = "cni.dev/attachments")]
    attachments: Option<Value>,
}

/// Whether `id` could be a `CNI_CONTAINERID`: the spec's rule, "must start with an
/// alphanumeric character, optionally followed by any combination of one or more
/// alphanumeric characters, underscore (_), dot (.) or hyphen (-)". The plugin allocates
/// under the container id, so every daemon allocation of this form is taken for the
/// plugin's; Weave's own reserved ids (`weave:expose`) have a `:` and never are.
pub fn is_plugin_container_id(id: &str) -> bool {
    let mut bytes = id.bytes();
    bytes.next().is_some_and(|b| b.is_ascii_alphanumeric())
        && bytes.all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

fn parse_subnet(raw: Option<Value>) -> Result<Option<Cidr>, CniError> {
    let ipam = match raw {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::Object(map)) => map,
        Some(other) => {
            return Err(invalid(
                "ipam must be an object",
                format!("ipam is {other}; for example {{\"subnet\": \"10.32.0.0/24\"}}"),
            ))
        }
    };
    let text = match ipam.get("subnet") {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::String(s)) => s.clone(),
        Some(other) => {
            return Err(invalid(
                "ipam.subnet must be a string",
                format!("ipam.subnet is {other}; for example \"10.32.0.0/24\""),
            ))
        }
    };
    let subnet = Cidr::parse(&text).ok_or_else(|| {
        invalid(
            "ipam.subnet is not an IPv4 subnet",
            format!(
                "ipam.subnet is {text:?}; give address/prefix-length, for example \"10.32.0.0/24\""
            ),
        )
    })?;
    if subnet.addr != subnet.network() {
        return Err(invalid(
            "ipam.subnet has bits set after its prefix",
            format!(
                "ipam.subnet is {subnet}; did you mean {}/{}?",
                subnet.network(),
                subnet.prefix
            ),
        ));
    }
    if subnet.prefix > MAX_SUBNET_PREFIX {
        return Err(invalid(
            "ipam.subnet is too small",
            format!("ipam.subnet is {subnet}; a subnet needs a prefix of /{MAX_SUBNET_PREFIX} or shorter to hold an address besides its network and broadcast addresses"),
        ));
    }
    Ok(Some(subnet))
}

fn parse_dns(raw: Option<Value>) -> Result<Dns, CniError> {
    #[derive(Deserialize)]
    struct RawDns {
        nameservers: Option<Vec<String>>,
        domain: Option<String>,
        search: Option<Vec<String>>,
        options: Option<Vec<String>>,
    }
    match raw {
        None | Some(Value::Null) => Ok(Dns::default()),
        Some(v @ Value::Object(_)) => {
            let text = v.to_string();
            let d: RawDns = serde_json::from_value(v).map_err(|e| {
                invalid(
                    "dns is not a CNI DNS object",
                    format!("{e} in {text}; expected {{\"nameservers\": [..], \"domain\": \"..\", \"search\": [..], \"options\": [..]}}"),
                )
            })?;
            Ok(Dns {
                nameservers: d.nameservers.unwrap_or_default(),
                domain: d.domain.unwrap_or_default(),
                search: d.search.unwrap_or_default(),
                options: d.options.unwrap_or_default(),
            })
        }
        Some(other) => Err(invalid("dns must be an object", format!("dns is {other}"))),
    }
}

fn parse_attachments(raw: Option<Value>) -> Result<Option<Vec<Attachment>>, CniError> {
    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct RawAttachment {
        #[serde(rename = "containerID")]
        container_id: String,
        #[serde(default)]
        ifname: String,
    }
    match raw {
        None | Some(Value::Null) => Ok(None),
        Some(v) => {
            let list: Vec<RawAttachment> = serde_json::from_value(v).map_err(|e| {
                invalid(
                    "cni.dev/valid-attachments is not a list of attachments",
                    format!(
                        "{e}; expected [{{\"containerID\": \"...\", \"ifname\": \"eth0\"}}, ...]"
                    ),
                )
            })?;
            Ok(Some(
                list.into_iter()
                    .map(|a| Attachment {
                        container_id: a.container_id,
                        ifname: a.ifname,
                    })
                    .collect(),
            ))
        }
    }
}

/// Reads only `cniVersion`, so that errors about the rest of the config can still
/// be answered in the version the runtime asked for.
pub fn declared_version(stdin: &[u8]) -> Option<Version> {
    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct OnlyVersion {
        cni_version: Option<String>,
    }
    let v: OnlyVersion = serde_json::from_slice(stdin).ok()?;
    Version::parse(v.cni_version.as_deref()?)
}

/// Where the daemon listens according to `stdin`, read leniently (for reporting a
/// command's outcome even when the config was refused): its `daemonAddress` if that is
/// an address, else the default.
pub fn daemon_address_of(stdin: &[u8]) -> SocketAddr {
    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct OnlyAddress {
        daemon_address: Option<Value>,
    }
    serde_json::from_slice::<OnlyAddress>(stdin)
        .ok()
        .and_then(|c| match c.daemon_address {
            Some(Value::String(s)) => s.parse().ok(),
            _ => None,
        })
        .unwrap_or_else(default_daemon_address)
}

fn default_daemon_address() -> SocketAddr {
    DEFAULT_DAEMON_ADDRESS
        .parse()
        .unwrap_or(SocketAddr::from(([127, 0, 0, 1], 6784)))
}

fn invalid(msg: impl Into<String>, details: impl Into<String>) -> CniError {
    CniError::new(ErrorCode::InvalidConfig, msg, details)
}

impl NetConf {
    pub fn parse(stdin: &[u8]) -> Result<NetConf, CniError> {
        let raw: RawConf = serde_json::from_slice(stdin).map_err(|e| {
            CniError::new(
                ErrorCode::Decode,
                "network configuration on stdin is not valid JSON",
                format!("{e}; the runtime must pass the network config as a JSON object"),
            )
        })?;
        let version_str = raw.cni_version.ok_or_else(|| {
            invalid(
                "network configuration has no cniVersion",
                "add \"cniVersion\": \"1.0.0\" to the config",
            )
        })?;
        let version = Version::parse(&version_str).ok_or_else(|| {
            CniError::new(
                ErrorCode::IncompatibleVersion,
                "incompatible CNI version",
                format!(
                    "config declares cniVersion {version_str:?}; weft-cni supports {}",
                    Version::ALL.map(|v| v.as_str()).join(", ")
                ),
            )
        })?;
        let name = raw.name.unwrap_or_default();
        if name.is_empty() {
            return Err(invalid(
                "network configuration has no name",
                "set \"name\" (for example \"weave\")",
            ));
        }
        match raw.kind.as_deref() {
            Some(t) if ACCEPTED_TYPES.contains(&t) => {}
            other => {
                return Err(invalid(
                    "network configuration has an unexpected type",
                    format!(
                        "type is {:?}; this plugin answers to \"weft\" or \"weave-net\"",
                        other.unwrap_or("")
                    ),
                ))
            }
        }
        let mtu = match raw.mtu {
            None | Some(Value::Null) => None,
            Some(Value::Number(n)) => match n.as_u64() {
                Some(m) if MTU_RANGE.contains(&m) => Some(m as u32),
                _ => {
                    return Err(invalid(
                        "mtu is out of range",
                        format!("mtu is {n}; use a whole number from 68 to 65535, or leave it out to use the weave interface's MTU"),
                    ))
                }
            },
            Some(other) => {
                return Err(invalid(
                    "mtu must be a number",
                    format!("mtu is {other}"),
                ))
            }
        };
        // Validated for the operator's sake, otherwise without effect (see module doc).
        match raw.hairpin_mode {
            None | Some(Value::Null) | Some(Value::Bool(_)) => {}
            Some(other) => {
                return Err(invalid(
                    "hairpinMode must be true or false",
                    format!("hairpinMode is {other}"),
                ))
            }
        }
        let daemon_address = match raw.daemon_address {
            None | Some(Value::Null) => DEFAULT_DAEMON_ADDRESS
                .parse()
                .map_err(|_| invalid("internal default daemon address is invalid", ""))?,
            Some(Value::String(s)) => s.parse::<SocketAddr>().map_err(|_| {
                invalid(
                    "daemonAddress is not an address:port",
                    format!("daemonAddress is {s:?}; use for example \"127.0.0.1:6784\""),
                )
            })?,
            Some(other) => {
                return Err(invalid(
                    "daemonAddress must be a string",
                    format!("daemonAddress is {other}"),
                ))
            }
        };
        Ok(NetConf {
            version,
            name,
            mtu,
            daemon_address,
            prev_result: raw.prev_result.filter(|v| !v.is_null()),
            subnet: parse_subnet(raw.ipam)?,
            dns: parse_dns(raw.dns)?,
            valid_attachments: parse_attachments(raw.valid_attachments.or(raw.attachments))?,
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Add,
    Del,
    Check,
    Gc,
    Status,
    Version,
}

impl Command {
    pub fn from_env(lookup: &dyn Fn(&str) -> Option<String>) -> Result<Command, CniError> {
        match lookup("CNI_COMMAND").as_deref() {
            Some("ADD") => Ok(Command::Add),
            Some("DEL") => Ok(Command::Del),
            Some("CHECK") => Ok(Command::Check),
            Some("GC") => Ok(Command::Gc),
            Some("STATUS") => Ok(Command::Status),
            Some("VERSION") => Ok(Command::Version),
            None | Some("") => Err(CniError::new(
                ErrorCode::InvalidEnv,
                "CNI_COMMAND is not set",
                "weft-cni is a CNI plugin: it is run by a container runtime with CNI_COMMAND=ADD, DEL, CHECK, GC, STATUS or VERSION",
            )),
            Some(other) => Err(CniError::new(
                ErrorCode::InvalidEnv,
                "unknown CNI_COMMAND",
                format!("CNI_COMMAND is {other:?}; weft-cni understands ADD, DEL, CHECK, GC, STATUS and VERSION"),
            )),
        }
    }

    /// The name a runtime gives the command (`CNI_COMMAND`).
    pub fn as_str(self) -> &'static str {
        match self {
            Command::Add => "ADD",
            Command::Del => "DEL",
            Command::Check => "CHECK",
            Command::Gc => "GC",
            Command::Status => "STATUS",
            Command::Version => "VERSION",
        }
    }
}

/// The CNI_* variables of one invocation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Env {
    pub container_id: ContainerId,
    /// Empty when the runtime no longer has the sandbox (a second DEL).
    pub netns: String,
    pub ifname: String,
    /// The pod's namespace and name, from `CNI_ARGS` (`K8S_POD_NAMESPACE`,
    /// `K8S_POD_NAME`, which Kubernetes runtimes pass): NetworkPolicy is put in place for
    /// it before the ADD returns.
    pub pod: Option<(String, String)>,
}

/// `K8S_POD_NAMESPACE` and `K8S_POD_NAME` from `CNI_ARGS` (`K=V;K=V`).
pub fn pod_from_args(args: &str) -> Option<(String, String)> {
    let mut ns = None;
    let mut name = None;
    for kv in args.split(';') {
        match kv.split_once('=') {
            Some(("K8S_POD_NAMESPACE", v)) if !v.is_empty() => ns = Some(v.to_string()),
            Some(("K8S_POD_NAME", v)) if !v.is_empty() => name = Some(v.to_string()),
            _ => {}
        }
    }
    Some((ns?, name?))
}

fn env_error(msg: impl Into<String>, details: impl Into<String>) -> CniError {
    CniError::new(ErrorCode::InvalidEnv, msg, details)
}

/// The kernel's dev_valid_name(): 1..=15 bytes, not "." or "..", no '/', ':' or space.
pub fn valid_ifname(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 15
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b > b' ' && b != b'/' && b != b':' && b != 0x7f)
}

impl Env {
    /// ADD and CHECK need the full environment.
    pub fn for_add(lookup: &dyn Fn(&str) -> Option<String>) -> Result<Env, CniError> {
        let container_id = container_id(lookup)?;
        let netns = lookup("CNI_NETNS").unwrap_or_default();
        if netns.is_empty() {
            return Err(env_error(
                "CNI_NETNS is not set",
                "the runtime must pass the path of the container's network namespace",
            ));
        }
        let ifname = ifname(lookup)?;
        if lookup("CNI_PATH").is_none() {
            return Err(env_error(
                "CNI_PATH is not set",
                "the runtime must pass the plugin search path",
            ));
        }
        let pod = lookup("CNI_ARGS").as_deref().and_then(pod_from_args);
        Ok(Env {
            container_id,
            netns,
            ifname,
            pod,
        })
    }

    /// DEL must succeed on whatever is left, so only the container id is required.
    pub fn for_del(lookup: &dyn Fn(&str) -> Option<String>) -> Result<Env, CniError> {
        let container_id = container_id(lookup)?;
        let netns = lookup("CNI_NETNS").unwrap_or_default();
        let ifname = match lookup("CNI_IFNAME") {
            Some(n) if !n.is_empty() => {
                if !valid_ifname(&n) {
                    return Err(ifname_error(&n));
                }
                n
            }
            _ => String::new(),
        };
        Ok(Env {
            container_id,
            netns,
            ifname,
            pod: None,
        })
    }
}

fn container_id(lookup: &dyn Fn(&str) -> Option<String>) -> Result<ContainerId, CniError> {
    let id = lookup("CNI_CONTAINERID").unwrap_or_default();
    if id.is_empty() {
        return Err(env_error(
            "CNI_CONTAINERID is not set",
            "the runtime must pass the container id",
        ));
    }
    ContainerId::parse(&id).map_err(|e| env_error("invalid env var CNI_CONTAINERID", e.to_string()))
}

fn ifname_error(name: &str) -> CniError {
    env_error(
        "invalid env var CNI_IFNAME",
        format!(
            "{name:?} is not a valid interface name: 1 to 15 characters, no '/', ':' or whitespace"
        ),
    )
}

fn ifname(lookup: &dyn Fn(&str) -> Option<String>) -> Result<String, CniError> {
    let name = lookup("CNI_IFNAME").unwrap_or_default();
    if name.is_empty() {
        return Err(env_error(
            "CNI_IFNAME is not set",
            "the runtime must pass the interface name to create inside the container (e.g. eth0)",
        ));
    }
    if !valid_ifname(&name) {
        return Err(ifname_error(&name));
    }
    Ok(name)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn parse(s: &str) -> Result<NetConf, CniError> {
        NetConf::parse(s.as_bytes())
    }

    #[test]
    fn weave_conflist_entry_parses() {
        let c =
            parse(r#"{"cniVersion":"0.3.0","name":"weave","type":"weave-net","hairpinMode":true}"#)
                .unwrap();
        assert_eq!(c.version, Version::V0_3_0);
        assert_eq!(c.mtu, None);
        assert_eq!(c.daemon_address, "127.0.0.1:6784".parse().unwrap());
        assert_eq!(c.prev_result, None);
    }

    #[test]
    fn full_config_parses_and_ignores_unknown_keys() {
        let c = parse(
            r#"{"cniVersion":"1.0.0","name":"n","type":"weft","mtu":1400,"daemonAddress":"127.0.0.1:7000",
                "prevResult":{"ips":[]},"runtimeConfig":{"x":1},"args":{},"ipam":{"type":"x"},"dns":{},"whatever":[1]}"#,
        )
        .unwrap();
        assert_eq!(c.mtu, Some(1400));
        assert_eq!(c.daemon_address, "127.0.0.1:7000".parse().unwrap());
        assert!(c.prev_result.is_some());
    }

    #[test]
    fn bad_configs_get_the_right_codes() {
        let cases: &[(&str, ErrorCode)] = &[
            ("not json", ErrorCode::Decode),
            ("[1,2]", ErrorCode::Decode),
            (r#"{"cniVersion":1}"#, ErrorCode::Decode),
            (r#"{"name":"n","type":"weft"}"#, ErrorCode::InvalidConfig),
            (
                r#"{"cniVersion":"0.5.0","name":"n","type":"weft"}"#,
                ErrorCode::IncompatibleVersion,
            ),
            (
                r#"{"cniVersion":"1.2.0","name":"n","type":"weft"}"#,
                ErrorCode::IncompatibleVersion,
            ),
            (
                r#"{"cniVersion":"1.0.0","type":"weft"}"#,
                ErrorCode::InvalidConfig,
            ),
            (
                r#"{"cniVersion":"1.0.0","name":"n","type":"bridge"}"#,
                ErrorCode::InvalidConfig,
            ),
            (
                r#"{"cniVersion":"1.0.0","name":"n"}"#,
                ErrorCode::InvalidConfig,
            ),
            (
                r#"{"cniVersion":"1.0.0","name":"n","type":"weft","mtu":"1400"}"#,
                ErrorCode::InvalidConfig,
            ),
            (
                r#"{"cniVersion":"1.0.0","name":"n","type":"weft","mtu":10}"#,
                ErrorCode::InvalidConfig,
            ),
            (
                r#"{"cniVersion":"1.0.0","name":"n","type":"weft","mtu":1400.5}"#,
                ErrorCode::InvalidConfig,
            ),
            (
                r#"{"cniVersion":"1.0.0","name":"n","type":"weft","mtu":-1}"#,
                ErrorCode::InvalidConfig,
            ),
            (
                r#"{"cniVersion":"1.0.0","name":"n","type":"weft","mtu":70000}"#,
                ErrorCode::InvalidConfig,
            ),
            (
                r#"{"cniVersion":"1.0.0","name":"n","type":"weft","hairpinMode":"yes"}"#,
                ErrorCode::InvalidConfig,
            ),
            (
                r#"{"cniVersion":"1.0.0","name":"n","type":"weft","daemonAddress":"localhost"}"#,
                ErrorCode::InvalidConfig,
            ),
            (
                r#"{"cniVersion":"1.0.0","name":"n","type":"weft","daemonAddress":6784}"#,
                ErrorCode::InvalidConfig,
            ),
        ];
        for (input, code) in cases {
            assert_eq!(parse(input).unwrap_err().code, *code, "{input}");
        }
    }

    #[test]
    fn daemon_address_is_read_leniently() {
        assert_eq!(
            daemon_address_of(br#"{"daemonAddress":"127.0.0.1:7000","mtu":"bad"}"#),
            "127.0.0.1:7000".parse().unwrap()
        );
        for other in [
            &b"{"[..],
            b"{}",
            br#"{"daemonAddress":"x"}"#,
            br#"{"daemonAddress":1}"#,
        ] {
            assert_eq!(daemon_address_of(other), "127.0.0.1:6784".parse().unwrap());
        }
    }

    #[test]
    fn declared_version_reads_only_the_version() {
        assert_eq!(
            declared_version(br#"{"cniVersion":"0.3.1","mtu":"x"}"#),
            Some(Version::V0_3_1)
        );
        assert_eq!(declared_version(br#"{"cniVersion":"9.9.9"}"#), None);
        assert_eq!(declared_version(b"{"), None);
    }

    fn lookup_from(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| map.get(k).cloned()
    }

    #[test]
    fn command_parsing() {
        assert_eq!(
            Command::from_env(&lookup_from(&[("CNI_COMMAND", "ADD")])),
            Ok(Command::Add)
        );
        assert_eq!(
            Command::from_env(&lookup_from(&[("CNI_COMMAND", "VERSION")])),
            Ok(Command::Version)
        );
        assert_eq!(
            Command::from_env(&lookup_from(&[])).unwrap_err().code,
            ErrorCode::InvalidEnv
        );
        assert_eq!(
            Command::from_env(&lookup_from(&[("CNI_COMMAND", "GC")])),
            Ok(Command::Gc)
        );
        assert_eq!(
            Command::from_env(&lookup_from(&[("CNI_COMMAND", "STATUS")])),
            Ok(Command::Status)
        );
        assert_eq!(
            Command::from_env(&lookup_from(&[("CNI_COMMAND", "gc")]))
                .unwrap_err()
                .code,
            ErrorCode::InvalidEnv
        );
        for c in [
            Command::Add,
            Command::Del,
            Command::Check,
            Command::Gc,
            Command::Status,
            Command::Version,
        ] {
            assert_eq!(
                Command::from_env(&lookup_from(&[("CNI_COMMAND", c.as_str())])),
                Ok(c)
            );
        }
    }

    #[test]
    fn every_version_is_accepted() {
        for v in Version::ALL {
            let c = parse(&format!(
                r#"{{"cniVersion":"{v}","name":"n","type":"weft"}}"#
            ))
            .unwrap();
            assert_eq!(c.version, v);
        }
        // 1.1.0's list of versions is the runtime's business: cniVersion is what counts.
        let c = parse(
            r#"{"cniVersion":"1.1.0","cniVersions":["1.0.0","1.1.0"],"name":"n","type":"weft"}"#,
        )
        .unwrap();
        assert_eq!(c.version, Version::V1_1_0);
    }

    fn with(extra: &str) -> Result<NetConf, CniError> {
        parse(&format!(
            r#"{{"cniVersion":"1.1.0","name":"n","type":"weave-net",{extra}}}"#
        ))
    }

    #[test]
    fn ipam_subnet() {
        let c = with(r#""ipam":{"subnet":"10.32.0.0/24"}"#).unwrap();
        assert_eq!(c.subnet, Cidr::parse("10.32.0.0/24"));
        for none in [
            r#""ipam":{}"#,
            r#""ipam":null"#,
            r#""ipam":{"type":"weave-ipam"}"#,
            r#""ipam":{"subnet":null}"#,
        ] {
            assert_eq!(with(none).unwrap().subnet, None, "{none}");
        }
        assert_eq!(
            with(r#""ipam":{"subnet":"10.0.0.0/30"}"#).unwrap().subnet,
            Cidr::parse("10.0.0.0/30")
        );
        for bad in [
            r#""ipam":"10.32.0.0/24""#,
            r#""ipam":{"subnet":24}"#,
            r#""ipam":{"subnet":"10.32.0.0"}"#,
            r#""ipam":{"subnet":"10.32.0/24"}"#,
            r#""ipam":{"subnet":"fd00::/64"}"#,
            r#""ipam":{"subnet":"10.32.0.0/33"}"#,
            r#""ipam":{"subnet":"10.32.0.0/31"}"#,
            r#""ipam":{"subnet":"10.32.0.0/32"}"#,
        ] {
            let e = with(bad).unwrap_err();
            assert_eq!(e.code, ErrorCode::InvalidConfig, "{bad}");
            assert!(e.msg.contains("ipam"), "{bad}: {e}");
        }
        let e = with(r#""ipam":{"subnet":"10.32.0.5/24"}"#).unwrap_err();
        assert_eq!(e.code, ErrorCode::InvalidConfig);
        assert!(e.details.contains("did you mean 10.32.0.0/24"), "{e}");
    }

    #[test]
    fn dns_is_read() {
        let c = with(
            r#""dns":{"nameservers":["10.96.0.10"],"domain":"cluster.local","search":["a.b"],"options":["ndots:5"],"x":1}"#,
        )
        .unwrap();
        assert_eq!(
            c.dns,
            Dns {
                nameservers: vec!["10.96.0.10".into()],
                domain: "cluster.local".into(),
                search: vec!["a.b".into()],
                options: vec!["ndots:5".into()],
            }
        );
        assert_eq!(with(r#""dns":{}"#).unwrap().dns, Dns::default());
        assert_eq!(with(r#""dns":null"#).unwrap().dns, Dns::default());
        assert_eq!(
            with(r#""dns":{"domain":null,"search":["s"]}"#).unwrap().dns,
            Dns {
                search: vec!["s".into()],
                ..Dns::default()
            }
        );
        for bad in [
            r#""dns":[]"#,
            r#""dns":{"nameservers":"10.0.0.1"}"#,
            r#""dns":{"domain":5}"#,
            r#""dns":{"search":[1]}"#,
        ] {
            assert_eq!(
                with(bad).unwrap_err().code,
                ErrorCode::InvalidConfig,
                "{bad}"
            );
        }
    }

    #[test]
    fn valid_attachments() {
        let c = with(
            r#""cni.dev/valid-attachments":[{"containerID":"a1","ifname":"eth0"},{"containerID":"b2","ifname":"net1"}]"#,
        )
        .unwrap();
        assert_eq!(
            c.valid_attachments,
            Some(vec![
                Attachment {
                    container_id: "a1".into(),
                    ifname: "eth0".into()
                },
                Attachment {
                    container_id: "b2".into(),
                    ifname: "net1".into()
                },
            ])
        );
        assert_eq!(with(r#""x":1"#).unwrap().valid_attachments, None);
        assert_eq!(
            with(r#""cni.dev/valid-attachments":[]"#)
                .unwrap()
                .valid_attachments,
            Some(vec![])
        );
        // The draft's name, as libcni also sends it.
        let c = with(r#""cni.dev/attachments":[{"containerID":"z","ifname":"eth0"}]"#).unwrap();
        assert_eq!(c.valid_attachments.unwrap()[0].container_id, "z");
        for bad in [
            r#""cni.dev/valid-attachments":{}"#,
            r#""cni.dev/valid-attachments":[{"ifname":"eth0"}]"#,
            r#""cni.dev/valid-attachments":[{"containerID":7}]"#,
        ] {
            assert_eq!(
                with(bad).unwrap_err().code,
                ErrorCode::InvalidConfig,
                "{bad}"
            );
        }
    }

    #[test]
    fn plugin_container_ids() {
        for id in ["a", "abc-1.2_3", "0123abcdef", "Z.z"] {
            assert!(is_plugin_container_id(id), "{id}");
        }
        for id in ["", "weave:expose", "_x", "-x", ".x", "a:b", "a b", "a/b"] {
            assert!(!is_plugin_container_id(id), "{id}");
        }
    }

    #[test]
    fn add_env_validation() {
        let good = [
            ("CNI_CONTAINERID", "abc-1.2_3"),
            ("CNI_NETNS", "/var/run/netns/x"),
            ("CNI_IFNAME", "eth0"),
            ("CNI_PATH", "/opt/cni/bin"),
        ];
        let env = Env::for_add(&lookup_from(&good)).unwrap();
        assert_eq!(env.container_id.as_str(), "abc-1.2_3");
        assert_eq!(env.ifname, "eth0");
        for skip in 0..good.len() {
            let partial: Vec<_> = good
                .iter()
                .enumerate()
                .filter(|(i, _)| *i != skip)
                .map(|(_, p)| *p)
                .collect();
            assert_eq!(
                Env::for_add(&lookup_from(&partial)).unwrap_err().code,
                ErrorCode::InvalidEnv,
                "without {}",
                good[skip].0
            );
        }
        for (key, bad) in [
            ("CNI_CONTAINERID", "a/b"),
            ("CNI_CONTAINERID", "a b"),
            ("CNI_IFNAME", "this-name-is-too-long"),
            ("CNI_IFNAME", "a:b"),
            ("CNI_IFNAME", ".."),
            ("CNI_NETNS", ""),
        ] {
            let mut pairs = good.to_vec();
            pairs.retain(|(k, _)| *k != key);
            pairs.push((key, bad));
            assert_eq!(
                Env::for_add(&lookup_from(&pairs)).unwrap_err().code,
                ErrorCode::InvalidEnv,
                "{key}={bad}"
            );
        }
    }

    #[test]
    fn del_env_is_lenient() {
        let env = Env::for_del(&lookup_from(&[
            ("CNI_CONTAINERID", "abc"),
            ("CNI_NETNS", ""),
        ]))
        .unwrap();
        assert_eq!(env.netns, "");
        assert_eq!(env.ifname, "");
        assert!(Env::for_del(&lookup_from(&[("CNI_NETNS", "/x")])).is_err());
        assert!(Env::for_del(&lookup_from(&[
            ("CNI_CONTAINERID", "abc"),
            ("CNI_IFNAME", "a/b")
        ]))
        .is_err());
    }

    #[test]
    fn ifname_rules() {
        assert!(valid_ifname("eth0"));
        assert!(valid_ifname("123456789012345"));
        assert!(!valid_ifname("1234567890123456"));
        assert!(!valid_ifname(""));
        assert!(!valid_ifname("."));
        assert!(!valid_ifname("a\tb"));
    }
}
