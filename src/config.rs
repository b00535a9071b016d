//! Command-line flags and Weave's environment variables, validated into one
//! [`RouterConfig`]. A flag wins over its environment variable.

use crate::core::ipam::init::IpallocInit;
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
    /// Human-readable name shown next to the peer name (default: the hostname).
    #[arg(long, env = "HOSTNAME")]
    pub nickname: Option<String>,
    /// The address range pods get addresses from, split among the nodes.
    #[arg(long, env = "IPALLOC_RANGE", default_value = DEFAULT_RANGE)]
    pub ipalloc_range: Ipv4Net,
    /// Control port (tcp); the data port (udp, VXLAN format) is this plus one.
    #[arg(long, default_value_t = DEFAULT_CONTROL_PORT)]
    pub port: u16,
    /// HTTP API address. Keep it on loopback: it can allocate and free addresses.
    #[arg(long, env = "WEAVE_HTTP_ADDR", default_value = DEFAULT_HTTP_ADDR)]
    pub http_addr: SocketAddr,
    /// Prometheus metrics address.
    #[arg(long, env = "WEAVE_METRICS_ADDR", default_value = DEFAULT_METRICS_ADDR)]
    pub metrics_addr: SocketAddr,
    /// MTU of the overlay (TUN and pods). Default: underlay MTU minus 50 bytes of VXLAN
    /// encapsulation.
    #[arg(long, env = "WEAVE_MTU")]
    pub mtu: Option<u32>,
    /// Where the ring, allocations and peer name are kept across restarts.
    #[arg(long, default_value = DEFAULT_DB_DIR)]
    pub db_dir: PathBuf,
    /// How the range is first divided: `consensus=N` (the default, N = number of PEERs
    /// plus one; allocation waits until a quorum of N/2+1 agrees), `seed=NAME,NAME,...`
    /// (exactly these peers), or `observer` (no space until it asks for some).
    #[arg(long, env = "IPALLOC_INIT")]
    pub ipalloc_init: Option<String>,
    /// Other nodes' control addresses: `host` or `host:port`.
    #[arg(value_name = "PEER")]
    pub peers: Vec<String>,
}

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
    pub peers: Vec<PeerTarget>,
}

impl RouterArgs {
    pub fn validate(self, hostname: &str) -> Result<RouterConfig, ConfigError> {
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
        let nickname = self
            .nickname
            .filter(|n| !n.is_empty())
            .unwrap_or_else(|| hostname.to_string());
        if nickname.len() > 64 || nickname.chars().any(|c| c.is_control()) {
            return Err(ConfigError::Nickname(nickname));
        }
        let mut peers = Vec::new();
        for p in &self.peers {
            // KUBE_PEERS arrives as one space-separated argument in some launch scripts.
            for one in p.split_whitespace() {
                let t = parse_peer(one, self.port)?;
                if !peers.contains(&t) {
                    peers.push(t);
                }
            }
        }
        let init = match self.ipalloc_init.as_deref().map(str::trim) {
            Some(s) if !s.is_empty() => IpallocInit::parse(s)?,
            _ => IpallocInit::Consensus(peers.len() + 1),
        };
        Ok(RouterConfig {
            name: self.name,
            nickname,
            range,
            port: self.port,
            data_port: self.port + 1,
            http_addr: self.http_addr,
            metrics_addr: self.metrics_addr,
            mtu: self.mtu,
            db_dir: self.db_dir,
            init,
            peers,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

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

    #[test]
    fn defaults_and_peers() {
        let c = parse(&["--nickname", "n1", "10.0.0.2", "10.0.0.3:7000", "10.0.0.2"])
            .validate("host")
            .unwrap();
        assert_eq!(c.range.to_string(), "192.168.0.0/16");
        assert_eq!(c.port, 6783);
        assert_eq!(c.data_port, 6784);
        assert_eq!(c.http_addr.to_string(), "127.0.0.1:6784");
        assert_eq!(c.peers.len(), 2);
        assert_eq!(c.peers[1].port, 7000);
        assert_eq!(c.init, IpallocInit::Consensus(3));
        let seeded = parse(&["--ipalloc-init", "seed=02:77:66:00:00:01", "10.0.0.2"])
            .validate("h")
            .unwrap();
        assert!(matches!(seeded.init, IpallocInit::Seed(ref s) if s.len() == 1));
        assert_eq!(c.nickname, "n1");
    }

    #[test]
    fn rejects_bad_values() {
        assert!(parse(&["--mtu", "100"]).validate("h").is_err());
        assert!(parse(&["--ipalloc-range", "192.168.1.0/31"])
            .validate("h")
            .is_err());
        assert!(parse(&["--ipalloc-range", "192.168.1.5/16"])
            .validate("h")
            .is_err());
        assert!(parse(&["a:b:c"]).validate("h").is_err());
        assert!(parse(&["host:notaport"]).validate("h").is_err());
        assert!(parse(&["--ipalloc-init", "consensus=zero"])
            .validate("h")
            .is_err());
        assert!(parse(&["--ipalloc-init", "seed=n1,n2"])
            .validate("h")
            .is_err());
    }
}
