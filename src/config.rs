//! Command-line flags and Weave's environment variables, validated into one
//! [`RouterConfig`]. A flag wins over its environment variable.

use crate::core::ipam::init::IpallocInit;
use crate::core::mesh::secure::Mode;
use clap::Args;
use ipnet::Ipv4Net;
use std::net::SocketAddr;
use std::path::PathBuf;

pub const DEFAULT_RANGE: &str = "192.168.0.0/16";
pub const DEFAULT_CONTROL_PORT: u16 = 6783;
pub use weft_contract::{DEFAULT_HTTP_ADDR, DEFAULT_METRICS_ADDR, TUN_NAME};
pub const DEFAULT_DB_DIR: &str = "/var/lib/weft";

#[derive(Args, Debug, Clone)]
pub struct RouterArgs {
    /// Peer name: six hex octets like 02:77:66:00:00:01. Default: derived from
    /// /etc/machine-id, else a random name kept in --db-dir.
    #[arg(long)]
    pub name: Option<String>,
    /// Human-readable name shown next to the peer name, and the node's name in
    /// Kubernetes (default: `NODE_NAME`, else `HOSTNAME`, else the hostname).
    #[arg(long)]
    pub nickname: Option<String>,
    /// The address range pods get addresses from, split among the nodes.
    #[arg(long, env = "IPALLOC_RANGE", default_value = DEFAULT_RANGE)]
    pub ipalloc_range: Ipv4Net,
    /// Control port (tcp); the data port (udp, VXLAN format) is this plus one.
    #[arg(long, default_value_t = DEFAULT_CONTROL_PORT)]
    pub port: u16,
    /// HTTP API address (`host:port`, or `:port` for all addresses). Keep it on
    /// loopback: it can allocate and free addresses.
    #[arg(long, env = "WEAVE_HTTP_ADDR", default_value = DEFAULT_HTTP_ADDR)]
    pub http_addr: String,
    /// Prometheus metrics address (`host:port`, or Weave's `:6782` for all addresses).
    #[arg(long, env = "WEAVE_METRICS_ADDR", default_value = DEFAULT_METRICS_ADDR)]
    pub metrics_addr: String,
    /// MTU of the overlay (TUN and pods). Default: underlay MTU minus 50 bytes of VXLAN
    /// encapsulation.
    #[arg(long, env = "WEAVE_MTU")]
    pub mtu: Option<u32>,
    /// Where the ring, allocations and peer name are kept across restarts.
    #[arg(long, default_value = DEFAULT_DB_DIR)]
    pub db_dir: PathBuf,
    /// How the range is first divided: `consensus=N` (the default, N = the number of
    /// nodes known at start: PEERs plus one, or the Kubernetes Nodes; allocation waits
    /// until a quorum of N/2+1 agrees), `seed=NAME,NAME,...` (exactly these peers), or
    /// `observer` (no space until it asks for some).
    #[arg(long, env = "IPALLOC_INIT")]
    pub ipalloc_init: Option<String>,
    /// Most control connections at once (Weave's CONN_LIMIT); further ones are refused.
    #[arg(long, env = "CONN_LIMIT", default_value_t = DEFAULT_CONN_LIMIT)]
    pub conn_limit: usize,
    /// Space-separated peers (Weave's KUBE_PEERS). In Kubernetes mode they replace the
    /// Nodes listed by the API.
    #[arg(long, env = "KUBE_PEERS")]
    pub kube_peers: Option<String>,
    /// Kubernetes API access from a kubeconfig file (also `KUBECONFIG`); inside a pod the
    /// service account is used without it.
    #[arg(long, env = "KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,
    /// Namespace of the Leases that make one node reclaim a deleted Node's addresses.
    #[arg(long, env = "POD_NAMESPACE", default_value = "kube-system")]
    pub kube_namespace: String,
    /// Never use the Kubernetes API, even inside a pod.
    #[arg(long)]
    pub no_kube: bool,
    /// Weave's NO_MASQ_LOCAL: traffic from outside the cluster to a pod on this node keeps
    /// its source address (`1`, the default); `0` masquerades it too.
    #[arg(long, env = "NO_MASQ_LOCAL", default_value = "1", value_parser = parse_switch, action = clap::ArgAction::Set)]
    pub no_masq_local: bool,
    /// Weave's WEAVE_PASSWORD: only nodes with the same password join, and control
    /// connections are authenticated and encrypted with it. Prefer --password-file (the
    /// command line is visible to every user of the machine).
    #[arg(long, env = "WEAVE_PASSWORD", hide_env_values = true)]
    pub password: Option<String>,
    /// A file holding the password (a mounted Kubernetes Secret); trailing newlines are
    /// ignored.
    #[arg(long, env = "WEAVE_PASSWORD_FILE")]
    pub password_file: Option<PathBuf>,
    /// Seconds an address allocated for the CNI plugin waits for the plugin's confirmation
    /// before it is freed again (the plugin gave up or was killed mid-ADD).
    #[arg(long, default_value_t = 120, hide = true)]
    pub confirm_wait: u64,
    /// What forwards the overlay's packets: `userspace`, weft's own path (a TUN device and
    /// a UDP socket; the only one that can encrypt), or `kernel`, a Linux VXLAN device that
    /// weft programs (Weave's fastdp). Both speak the same datagrams, so a cluster may mix
    /// them. Weave's `WEAVE_NO_FASTDP` (set) forbids `kernel`.
    #[arg(long, env = "WEFT_DATAPATH", value_enum, default_value_t = DatapathKind::Userspace)]
    pub datapath: DatapathKind,
    /// Weave's EXPECT_NPC: enforce Kubernetes NetworkPolicy on this node's pods (as
    /// weave-npc did; Kubernetes mode only). `0` turns enforcement off and removes weft's
    /// policy table.
    #[arg(long, env = "EXPECT_NPC", default_value = "1", value_parser = parse_switch, action = clap::ArgAction::Set)]
    pub expect_npc: bool,
    /// weave-npc's --allow-mcast: multicast (224.0.0.0/4) passes whatever the policies.
    #[arg(long, default_value = "true", value_parser = parse_switch, action = clap::ArgAction::Set)]
    pub allow_mcast: bool,
    /// weave-npc's metrics address (`weavenpc_*` metrics; weave-npc's --metrics-addr).
    #[arg(long, default_value = ":6781")]
    pub npc_metrics_addr: String,
    /// Other nodes' control addresses: `host` or `host:port`.
    #[arg(value_name = "PEER")]
    pub peers: Vec<String>,
}

/// NetworkPolicy enforcement (weave-npc's job, done by the router).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyConfig {
    pub allow_mcast: bool,
    pub metrics_addr: SocketAddr,
}

/// weave-npc's flags, as its `EXTRA_ARGS` held them (weft reads them from
/// `WEAVE_NPC_EXTRA_ARGS`), applied over `cfg`; the flags weft has no use for are named.
pub fn apply_npc_args(args: &str, cfg: &mut PolicyConfig) -> Result<Vec<String>, ConfigError> {
    let mut notes = Vec::new();
    let mut words = args.split_whitespace();
    let bad = |w: &str| ConfigError::NpcArgs(w.to_string());
    while let Some(w) = words.next() {
        let (flag, inline) = match w.split_once('=') {
            Some((f, v)) => (f, Some(v.to_string())),
            None => (w, None),
        };
        let flag = flag.trim_start_matches('-');
        match flag {
            "allow-mcast" => {
                cfg.allow_mcast = match inline.as_deref() {
                    Some(v) => parse_switch(v).map_err(|_| bad(w))?,
                    None => true,
                };
            }
            "metrics-addr" | "log-level" | "node-name" | "max-list-size" | "bridge-port-name" => {
                let value = match inline {
                    Some(v) => v,
                    None => words.next().ok_or_else(|| bad(w))?.to_string(),
                };
                match flag {
                    "metrics-addr" => {
                        cfg.metrics_addr = parse_listen("weave-npc metrics", &value)?;
                    }
                    "log-level" => notes.push(format!(
                        "weave-npc's --log-level {value}: weft's logging follows RUST_LOG"
                    )),
                    "node-name" => notes.push(format!(
                        "weave-npc's --node-name {value}: weft uses the node's name it runs under"
                    )),
                    "max-list-size" => notes.push(format!(
                        "weave-npc's --max-list-size {value}: weft's sets have no such limit"
                    )),
                    _ => notes.push(format!(
                        "weave-npc's --bridge-port-name {value}: weft has no bridge"
                    )),
                }
            }
            _ => return Err(bad(w)),
        }
    }
    Ok(notes)
}

/// Which backend forwards the overlay's packets.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DatapathKind {
    /// weft's own forwarding: TUN device, VXLAN-format UDP, optional encryption.
    #[default]
    Userspace,
    /// A Linux VXLAN device, programmed over netlink.
    Kernel,
}

impl DatapathKind {
    pub fn as_str(self) -> &'static str {
        match self {
            DatapathKind::Userspace => "userspace",
            DatapathKind::Kernel => "kernel",
        }
    }
}

/// Weave's default `CONN_LIMIT`.
pub const DEFAULT_CONN_LIMIT: usize = 200;

/// Where the Kubernetes service account's token is mounted in a pod.
pub const SERVICE_ACCOUNT_TOKEN: &str = "/var/run/secrets/kubernetes.io/serviceaccount/token";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("--mtu {0} is outside 576..=65000")]
    Mtu(u32),
    #[error("IP range {0} is too small: it needs at least 4 addresses (/30)")]
    RangeTooSmall(Ipv4Net),
    #[error("IP range {given} is not a network address; did you mean {suggested}?")]
    RangeNotNetwork { given: Ipv4Net, suggested: Ipv4Net },
    #[error("peer {0:?}: expected host or host:port")]
    Peer(String),
    #[error("--port {0}: the data port is the control port plus one, so it must be below 65535")]
    Port(u16),
    #[error("--nickname {0:?}: use at most 64 printable characters")]
    Nickname(String),
    #[error("{0}")]
    Init(#[from] crate::core::ipam::init::IpallocInitError),
    #[error("{what} address {given:?}: expected host:port or :port")]
    Addr { what: &'static str, given: String },
    #[error("--conn-limit (CONN_LIMIT) must be at least 1")]
    ConnLimit,
    #[error("password file {path}: {reason}")]
    PasswordFile { path: PathBuf, reason: String },
    #[error("give the password once: WEAVE_PASSWORD (--password) or WEAVE_PASSWORD_FILE (--password-file), not both")]
    TwoPasswords,
    #[error("--datapath kernel cannot encrypt: the kernel's VXLAN device sends datagrams as they are; with WEAVE_PASSWORD use the user-space data path (leave --datapath/WEFT_DATAPATH unset)")]
    KernelEncrypted,
    #[error("WEAVE_NO_FASTDP is set, which forbids the kernel data path, and --datapath kernel (WEFT_DATAPATH) asks for it: unset one of them")]
    NoFastdp,
    #[error("WEAVE_NPC_EXTRA_ARGS: {0:?} is not a weave-npc flag weft knows (--metrics-addr, --allow-mcast, --log-level, --node-name, --max-list-size, --bridge-port-name)")]
    NpcArgs(String),
}

/// A PEER argument split into host and control port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerTarget {
    pub host: String,
    pub port: u16,
}

impl std::fmt::Display for PeerTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.host, self.port)
    }
}

pub fn parse_peer(s: &str, default_port: u16) -> Result<PeerTarget, ConfigError> {
    let bad = || ConfigError::Peer(s.to_string());
    if s.is_empty() || s.chars().any(|c| c.is_whitespace() || c == '/') {
        return Err(bad());
    }
    match s.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() && !host.contains(':') => Ok(PeerTarget {
            host: host.to_string(),
            port: port.parse().map_err(|_| bad())?,
        }),
        Some(_) => Err(bad()),
        None => Ok(PeerTarget {
            host: s.to_string(),
            port: default_port,
        }),
    }
}

/// How the router reaches the Kubernetes API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KubeSettings {
    /// This node's Node name (the router's nickname).
    pub node_name: String,
    /// Namespace of weft's Leases.
    pub namespace: String,
    /// A kubeconfig file; `None` inside a pod (service account).
    pub kubeconfig: Option<PathBuf>,
}

/// Validated router configuration.
#[derive(Debug, Clone)]
pub struct RouterConfig {
    pub name: Option<String>,
    pub nickname: String,
    pub range: Ipv4Net,
    pub port: u16,
    pub data_port: u16,
    pub http_addr: SocketAddr,
    pub metrics_addr: SocketAddr,
    pub mtu: Option<u32>,
    pub db_dir: PathBuf,
    pub init: IpallocInit,
    /// `init` was given (`--ipalloc-init`, `IPALLOC_INIT`), not derived from the peers.
    pub init_given: bool,
    /// PEER arguments and KUBE_PEERS.
    pub peers: Vec<PeerTarget>,
    /// KUBE_PEERS was given: the Kubernetes API's Node list is not used for peers.
    pub kube_peers_given: bool,
    pub conn_limit: usize,
    /// Kubernetes mode: in a pod with a service account, or with a kubeconfig.
    pub kube: Option<KubeSettings>,
    pub no_masq_local: bool,
    /// Open, or the pre-shared key from the password.
    pub secure: Mode,
    pub confirm_wait: std::time::Duration,
    pub datapath: DatapathKind,
    /// NetworkPolicy enforcement: on in Kubernetes mode unless EXPECT_NPC=0.
    pub policy: Option<PolicyConfig>,
    /// EXPECT_NPC is on but there is no Kubernetes API to read policies from.
    pub policy_without_api: bool,
    /// What of WEAVE_NPC_EXTRA_ARGS weft does not use, to be logged.
    pub npc_notes: Vec<String>,
}

/// A switch as Weave's launch script read it: set to anything but a "no" word is on.
fn parse_switch(s: &str) -> Result<bool, String> {
    match s.trim().to_ascii_lowercase().as_str() {
        "0" | "false" | "no" | "off" => Ok(false),
        _ => Ok(true),
    }
}

/// `host:port`, or `:port` meaning every address (Weave's `WEAVE_METRICS_ADDR=:6782`).
fn parse_listen(what: &'static str, s: &str) -> Result<SocketAddr, ConfigError> {
    let full = match s.strip_prefix(':') {
        Some(port) => format!("0.0.0.0:{port}"),
        None => s.to_string(),
    };
    full.parse().map_err(|_| ConfigError::Addr {
        what,
        given: s.to_string(),
    })
}

/// What the environment holds that clap does not parse itself.
pub struct Environment<'a> {
    /// Looks up an environment variable.
    pub var: &'a dyn Fn(&str) -> Option<String>,
    /// The machine's hostname.
    pub hostname: String,
    /// A service-account token is mounted (running in a pod).
    pub service_account: bool,
}

impl Environment<'_> {
    fn get(&self, key: &str) -> Option<String> {
        (self.var)(key).filter(|v| !v.trim().is_empty())
    }
}

impl RouterArgs {
    /// Validates with the process environment.
    pub fn validate(self, hostname: &str) -> Result<RouterConfig, ConfigError> {
        let var = |k: &str| std::env::var(k).ok();
        self.validate_in(&Environment {
            var: &var,
            hostname: hostname.to_string(),
            service_account: std::path::Path::new(SERVICE_ACCOUNT_TOKEN).exists(),
        })
    }

    pub fn validate_in(self, env: &Environment<'_>) -> Result<RouterConfig, ConfigError> {
        if let Some(m) = self.mtu {
            if !(576..=65000).contains(&m) {
                return Err(ConfigError::Mtu(m));
            }
        }
        let range = self.ipalloc_range;
        if range.prefix_len() > 30 {
            return Err(ConfigError::RangeTooSmall(range));
        }
        if range.addr() != range.network() {
            return Err(ConfigError::RangeNotNetwork {
                given: range,
                suggested: range.trunc(),
            });
        }
        if self.port == u16::MAX {
            return Err(ConfigError::Port(self.port));
        }
        if self.conn_limit == 0 {
            return Err(ConfigError::ConnLimit);
        }
        let nickname = self
            .nickname
            .filter(|n| !n.is_empty())
            .or_else(|| env.get("NODE_NAME"))
            .or_else(|| env.get("HOSTNAME"))
            .unwrap_or_else(|| env.hostname.clone());
        if nickname.len() > 64 || nickname.chars().any(|c| c.is_control()) {
            return Err(ConfigError::Nickname(nickname));
        }
        let kube_peers = self.kube_peers.filter(|p| !p.trim().is_empty());
        let kube_peers_given = kube_peers.is_some();
        let mut peers = Vec::new();
        for p in self.peers.iter().chain(kube_peers.iter()) {
            // KUBE_PEERS arrives as one space-separated argument in launch scripts.
            for one in p.split_whitespace() {
                let t = parse_peer(one, self.port)?;
                if !peers.contains(&t) {
                    peers.push(t);
                }
            }
        }
        let given = self
            .ipalloc_init
            .as_deref()
            .map(str::trim)
            .filter(|s| !s.is_empty());
        let init = match given {
            Some(s) => IpallocInit::parse(s)?,
            None => IpallocInit::Consensus(peers.len() + 1),
        };
        let password = self.password.filter(|p| !p.is_empty());
        let password_file = self.password_file.filter(|p| !p.as_os_str().is_empty());
        let password: Option<Vec<u8>> = match (password, password_file) {
            (Some(_), Some(_)) => return Err(ConfigError::TwoPasswords),
            (Some(p), None) => Some(p.into_bytes()),
            (None, Some(path)) => {
                let mut bytes = std::fs::read(&path).map_err(|e| ConfigError::PasswordFile {
                    path: path.clone(),
                    reason: e.to_string(),
                })?;
                while bytes.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
                    bytes.pop();
                }
                if bytes.is_empty() {
                    return Err(ConfigError::PasswordFile {
                        path,
                        reason: "empty".into(),
                    });
                }
                Some(bytes)
            }
            (None, None) => None,
        };
        // Weave's launch script tested WEAVE_NO_FASTDP for being non-empty.
        let no_fastdp = env.get("WEAVE_NO_FASTDP").is_some();
        if self.datapath == DatapathKind::Kernel {
            if no_fastdp {
                return Err(ConfigError::NoFastdp);
            }
            if password.is_some() {
                return Err(ConfigError::KernelEncrypted);
            }
        }
        let in_pod = env.service_account && env.get("KUBERNETES_SERVICE_HOST").is_some();
        let kubeconfig = self.kubeconfig.filter(|p| !p.as_os_str().is_empty());
        let kube = (!self.no_kube && (kubeconfig.is_some() || in_pod)).then(|| KubeSettings {
            node_name: nickname.clone(),
            namespace: self.kube_namespace.clone(),
            kubeconfig: kubeconfig.clone(),
        });
        let mut policy_cfg = PolicyConfig {
            allow_mcast: self.allow_mcast,
            metrics_addr: parse_listen("weave-npc metrics", &self.npc_metrics_addr)?,
        };
        let npc_notes = match env.get("WEAVE_NPC_EXTRA_ARGS") {
            Some(args) => apply_npc_args(&args, &mut policy_cfg)?,
            None => Vec::new(),
        };
        let policy = (self.expect_npc && kube.is_some()).then_some(policy_cfg);
        let policy_without_api = self.expect_npc && kube.is_none();
        Ok(RouterConfig {
            name: self.name,
            nickname,
            range,
            port: self.port,
            data_port: self.port + 1,
            http_addr: parse_listen("HTTP API", &self.http_addr)?,
            metrics_addr: parse_listen("metrics", &self.metrics_addr)?,
            mtu: self.mtu,
            db_dir: self.db_dir,
            init,
            init_given: given.is_some(),
            peers,
            kube_peers_given,
            conn_limit: self.conn_limit,
            kube,
            no_masq_local: self.no_masq_local,
            secure: Mode::from_password(password.as_deref()),
            confirm_wait: std::time::Duration::from_secs(self.confirm_wait),
            datapath: self.datapath,
            policy,
            policy_without_api,
            npc_notes,
        })
    }
}

/// Weave's variables weft does not implement, each with what to know about it; the router
/// logs one line for every one that is set, so nothing is silently ignored.
const NOT_IMPLEMENTED: &[(&str, &str)] = &[
    ("CHECKPOINT_DISABLE", "weft never checks for updates"),
    (
        "HAIRPIN_MODE",
        "pods are routed, not bridged: a pod reaches itself through a Service without it",
    ),
    (
        "WEAVE_EXPOSE_IP",
        "the node's overlay address is allocated by IPAM (weave:expose)",
    ),
    (
        "WEAVE_STATUS_ADDR",
        "status pages are served on WEAVE_HTTP_ADDR",
    ),
    ("IPTABLES_BACKEND", "weft writes no iptables rules"),
    ("DB_PREFIX", "weft keeps its state in --db-dir"),
    ("WEAVE_DEBUG", "use RUST_LOG=debug"),
];

/// One line per Weave variable that is set but not implemented by weft.
pub fn unimplemented_settings(var: &dyn Fn(&str) -> Option<String>, all: &[String]) -> Vec<String> {
    let mut out = Vec::new();
    for (name, why) in NOT_IMPLEMENTED {
        let set: Vec<&String> = if name.ends_with('_') {
            all.iter().filter(|k| k.starts_with(name)).collect()
        } else {
            all.iter().filter(|k| k.as_str() == *name).collect()
        };
        for k in set {
            if var(k).is_some() {
                out.push(format!("{k} is set but not used: {why}"));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;
    use std::collections::BTreeMap;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        r: RouterArgs,
    }

    fn parse(args: &[&str]) -> RouterArgs {
        let mut v = vec!["weft"];
        v.extend_from_slice(args);
        Cli::try_parse_from(v).unwrap().r
    }

    /// Validates with exactly `vars` as the environment.
    fn validate(args: RouterArgs, vars: &[(&str, &str)], service_account: bool) -> RouterConfig {
        try_validate(args, vars, service_account).unwrap()
    }

    fn try_validate(
        args: RouterArgs,
        vars: &[(&str, &str)],
        service_account: bool,
    ) -> Result<RouterConfig, ConfigError> {
        let map: BTreeMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let var = move |k: &str| map.get(k).cloned();
        args.validate_in(&Environment {
            var: &var,
            hostname: "host".into(),
            service_account,
        })
    }

    #[test]
    fn defaults_and_peers() {
        let c = validate(
            parse(&["--nickname", "n1", "10.0.0.2", "10.0.0.3:7000", "10.0.0.2"]),
            &[],
            false,
        );
        assert_eq!(c.range.to_string(), "192.168.0.0/16");
        assert_eq!(c.port, 6783);
        assert_eq!(c.data_port, 6784);
        assert_eq!(c.http_addr.to_string(), "127.0.0.1:6784");
        assert_eq!(c.metrics_addr.to_string(), "0.0.0.0:6782");
        assert_eq!(c.peers.len(), 2);
        assert_eq!(c.peers[1].port, 7000);
        assert_eq!(c.init, IpallocInit::Consensus(3));
        assert!(!c.init_given);
        assert_eq!(c.conn_limit, DEFAULT_CONN_LIMIT);
        assert_eq!(c.kube, None, "no service account, no kubeconfig");
        let seeded = validate(
            parse(&["--ipalloc-init", "seed=02:77:66:00:00:01", "10.0.0.2"]),
            &[],
            false,
        );
        assert!(matches!(seeded.init, IpallocInit::Seed(ref s) if s.len() == 1));
        assert!(seeded.init_given);
        assert_eq!(c.nickname, "n1");
    }

    #[test]
    fn nickname_comes_from_the_flag_then_node_name_then_hostname() {
        let env = [("NODE_NAME", "ip-10-0-1-5"), ("HOSTNAME", "weft-abcde")];
        assert_eq!(
            validate(parse(&["--nickname", "n1"]), &env, false).nickname,
            "n1"
        );
        assert_eq!(validate(parse(&[]), &env, false).nickname, "ip-10-0-1-5");
        assert_eq!(
            validate(parse(&[]), &env[1..], false).nickname,
            "weft-abcde"
        );
        assert_eq!(validate(parse(&[]), &[], false).nickname, "host");
    }

    #[test]
    fn kube_peers_join_the_peers_and_count_for_consensus() {
        let c = validate(
            parse(&[
                "--kube-peers",
                "10.0.0.2 10.0.0.3  10.0.0.4:7000",
                "10.0.0.2",
            ]),
            &[],
            false,
        );
        let targets: Vec<String> = c.peers.iter().map(|p| p.to_string()).collect();
        assert_eq!(targets, ["10.0.0.2:6783", "10.0.0.3:6783", "10.0.0.4:7000"]);
        assert!(c.kube_peers_given);
        assert_eq!(c.init, IpallocInit::Consensus(4));
        assert!(!validate(parse(&["--kube-peers", "  "]), &[], false).kube_peers_given);
    }

    #[test]
    fn kubernetes_mode_in_a_pod_or_with_a_kubeconfig() {
        let pod = [
            ("KUBERNETES_SERVICE_HOST", "10.100.0.1"),
            ("NODE_NAME", "node-a"),
        ];
        let c = validate(parse(&[]), &pod, true);
        assert_eq!(
            c.kube,
            Some(KubeSettings {
                node_name: "node-a".into(),
                namespace: "kube-system".into(),
                kubeconfig: None,
            })
        );
        // A token without the service's address is not a pod of this cluster.
        assert_eq!(validate(parse(&[]), &pod[1..], true).kube, None);
        assert_eq!(validate(parse(&[]), &pod, false).kube, None);
        let c = validate(
            parse(&[
                "--kubeconfig",
                "/etc/weft/kubeconfig",
                "--kube-namespace",
                "weft",
            ]),
            &[],
            false,
        );
        let k = c.kube.unwrap();
        assert_eq!(k.kubeconfig, Some(PathBuf::from("/etc/weft/kubeconfig")));
        assert_eq!(k.namespace, "weft");
        assert_eq!(validate(parse(&["--no-kube"]), &pod, true).kube, None);
    }

    #[test]
    fn weaves_listen_addresses_are_accepted() {
        let c = validate(
            parse(&["--metrics-addr", ":6782", "--http-addr", "127.0.0.1:7784"]),
            &[],
            false,
        );
        assert_eq!(c.metrics_addr.to_string(), "0.0.0.0:6782");
        assert_eq!(c.http_addr.to_string(), "127.0.0.1:7784");
        assert!(try_validate(parse(&["--metrics-addr", "6782"]), &[], false).is_err());
    }

    #[test]
    fn rejects_bad_values() {
        for args in [
            &["--mtu", "100"][..],
            &["--ipalloc-range", "192.168.1.0/31"],
            &["--ipalloc-range", "192.168.1.5/16"],
            &["a:b:c"],
            &["host:notaport"],
            &["--ipalloc-init", "consensus=zero"],
            &["--ipalloc-init", "seed=n1,n2"],
            &["--conn-limit", "0"],
            &["--kube-peers", "a:b:c"],
            &["--password", "a", "--password-file", "/etc/hostname"],
            &["--password-file", "/nonexistent/weft-password"],
        ] {
            assert!(try_validate(parse(args), &[], false).is_err(), "{args:?}");
        }
    }

    #[test]
    fn the_password_comes_from_the_environment_or_a_file_and_is_never_printed() {
        let c = try_validate(parse(&[]), &[], false).unwrap();
        assert!(!c.secure.is_password());
        let c = try_validate(parse(&["--password", "hunter2"]), &[], false).unwrap();
        assert!(c.secure.is_password());
        assert!(!format!("{c:?}").contains("hunter2"));
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("pw");
        std::fs::write(&f, "hunter2\n").unwrap();
        let from_file =
            try_validate(parse(&["--password-file", f.to_str().unwrap()]), &[], false).unwrap();
        match (&c.secure, &from_file.secure) {
            (Mode::Password(a), Mode::Password(b)) => assert_eq!(a, b, "newline ignored"),
            _ => panic!("password expected"),
        }
        std::fs::write(&f, "\n").unwrap();
        assert!(
            try_validate(parse(&["--password-file", f.to_str().unwrap()]), &[], false).is_err()
        );
    }

    #[test]
    fn unimplemented_weave_variables_are_named_not_ignored() {
        let vars: BTreeMap<&str, &str> = [
            ("WEAVE_PASSWORD", "secret"),
            ("WEAVE_NPC_EXTRA_ARGS", "--log-level=debug"),
            ("WEAVE_STATUS_ADDR", "127.0.0.1:6782"),
            ("CHECKPOINT_DISABLE", "1"),
            ("IPALLOC_RANGE", "10.32.0.0/12"),
        ]
        .into_iter()
        .collect();
        let names: Vec<String> = vars.keys().map(|k| k.to_string()).collect();
        let lines = unimplemented_settings(&|k| vars.get(k).map(|v| v.to_string()), &names);
        assert_eq!(lines.len(), 2, "{lines:?}");
        assert!(
            !lines.iter().any(|l| l.contains("WEAVE_PASSWORD")),
            "implemented"
        );
        assert!(lines.iter().any(|l| l.starts_with("WEAVE_STATUS_ADDR")));
        assert!(
            !lines.iter().any(|l| l.contains("WEAVE_NPC")),
            "weft enforces policy"
        );
        assert!(!lines.iter().any(|l| l.contains("IPALLOC_RANGE")));
    }

    #[test]
    fn policy_is_on_in_kubernetes_mode_and_takes_weave_npc_s_flags() {
        let kube = [("KUBECONFIG", "/kc")];
        let c = validate(parse(&["--kubeconfig", "/kc"]), &kube, false);
        let p = c.policy.expect("on by default in Kubernetes mode");
        assert!(p.allow_mcast);
        assert_eq!(p.metrics_addr, "0.0.0.0:6781".parse().unwrap());
        assert!(validate(parse(&[]), &[], false).policy.is_none());
        assert!(validate(parse(&[]), &[], false).policy_without_api);
        // clap reads EXPECT_NPC itself; the flag is the same switch.
        let off = validate(
            parse(&["--kubeconfig", "/kc", "--expect-npc", "0"]),
            &[],
            false,
        );
        assert!(off.policy.is_none() && !off.policy_without_api);
        let c = validate(
            parse(&["--kubeconfig", "/kc"]),
            &[(
                "WEAVE_NPC_EXTRA_ARGS",
                "--allow-mcast=false --metrics-addr 127.0.0.1:9781 --log-level=debug",
            )],
            false,
        );
        let p = c.policy.unwrap();
        assert!(!p.allow_mcast);
        assert_eq!(p.metrics_addr, "127.0.0.1:9781".parse().unwrap());
        assert_eq!(c.npc_notes.len(), 1, "{:?}", c.npc_notes);
        assert!(matches!(
            try_validate(
                parse(&["--kubeconfig", "/kc"]),
                &[("WEAVE_NPC_EXTRA_ARGS", "--no-such-flag")],
                false
            ),
            Err(ConfigError::NpcArgs(_))
        ));
    }

    #[test]
    fn the_kernel_datapath_is_chosen_by_flag_and_refused_with_a_password_or_no_fastdp() {
        assert_eq!(
            validate(parse(&[]), &[], false).datapath,
            DatapathKind::Userspace
        );
        let c = validate(parse(&["--datapath", "kernel"]), &[], false);
        assert_eq!(c.datapath, DatapathKind::Kernel);
        // Weave's WEAVE_NO_FASTDP alone: the user-space path, which is the default anyway.
        let c = validate(parse(&[]), &[("WEAVE_NO_FASTDP", "1")], false);
        assert_eq!(c.datapath, DatapathKind::Userspace);
        assert!(matches!(
            try_validate(
                parse(&["--datapath", "kernel"]),
                &[("WEAVE_NO_FASTDP", "1")],
                false
            ),
            Err(ConfigError::NoFastdp)
        ));
        assert!(matches!(
            try_validate(
                parse(&["--datapath", "kernel", "--password", "secret"]),
                &[],
                false
            ),
            Err(ConfigError::KernelEncrypted)
        ));
        let names = vec!["WEAVE_NO_FASTDP".to_string()];
        assert!(
            unimplemented_settings(&|_| Some("1".into()), &names).is_empty(),
            "WEAVE_NO_FASTDP is implemented"
        );
    }
}
