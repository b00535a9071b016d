//! The daemon's state as one serialisable snapshot. `/report` serves it as JSON (keys in
//! Weave's PascalCase, so scripts written against Weave's report keep working); the status
//! pages and the metrics are rendered from it by pure functions.

use serde::{Deserialize, Serialize};
use std::future::Future;
use std::net::Ipv4Addr;
use std::time::Duration;
use weft_contract::ContainerId;

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "PascalCase")]
pub struct Report {
    pub ready: bool,
    pub version: String,
    pub router: RouterReport,
    #[serde(rename = "IPAM")]
    pub ipam: IpamReport,
    pub dataplane: DataplaneReport,
}

/// Counts of what the control mesh refused, each a reason an operator can look up.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "PascalCase")]
pub struct RefusedReport {
    /// Connections that failed the secure handshake (no or another password, not weft,
    /// too slow, oversized records).
    pub handshakes: u64,
    /// Hellos or gossip presenting a known peer name with another key.
    pub key_mismatches: u64,
    /// Rings that removed a live peer.
    pub tombstones: u64,
    /// Rings with a tombstone or comeback not signed by the peer whose word it is.
    #[serde(default)]
    pub forged_records: u64,
    /// Gossiped peers over the bounds.
    pub peers_over_bound: u64,
    /// Connections dropped because their peer did not read.
    pub send_overflows: u64,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "PascalCase")]
pub struct RouterReport {
    /// "weft"
    pub protocol: String,
    pub protocol_min_version: u32,
    pub protocol_max_version: u32,
    /// Weave's meaning: traffic between nodes is encrypted (both planes): with
    /// WEAVE_PASSWORD. (Without it weft still encrypts control connections, but anyone may
    /// open one, and datagrams are plain VXLAN.)
    pub encryption: bool,
    /// weft's: control connections need WEAVE_PASSWORD ("password") or are open to any
    /// host that reaches the control port ("none"; still encrypted, keys bound to names).
    #[serde(default)]
    pub authentication: String,
    pub peer_discovery: bool,
    pub name: String,
    pub nick_name: String,
    /// Control port (tcp); the data port (udp) is `port + 1`.
    pub port: u16,
    pub data_port: u16,
    /// The TUN interface name ("weave") and its MTU.
    pub interface: String,
    pub mtu: u32,
    /// The node's own address on the overlay, once IPAM is ready.
    pub overlay_address: Option<String>,
    /// The PEER arguments this router was started with (`host` or `host:port`).
    pub targets: Vec<String>,
    pub peers: Vec<PeerReport>,
    pub connections: Vec<ConnectionReport>,
    pub termination_count: u64,
    /// What the control mesh refused since start, by reason (weft's).
    #[serde(default)]
    pub refused: RefusedReport,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "PascalCase")]
pub struct PeerReport {
    pub name: String,
    pub nick_name: String,
    /// Random per process start: a restarted peer keeps its name and gets a new UID.
    #[serde(rename = "UID")]
    pub uid: u64,
    /// Underlay address the peer's data plane is reached at (`ip:port`), if known.
    pub data_address: Option<String>,
    /// Connections of this peer as this router knows them (its own, and those gossiped).
    pub connections: Vec<PeerConnectionReport>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "PascalCase")]
pub struct PeerConnectionReport {
    pub name: String,
    pub nick_name: String,
    pub address: String,
    pub outbound: bool,
    pub established: bool,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "PascalCase")]
pub struct ConnectionReport {
    /// Remote `ip:port` of the TCP connection (or the target being dialled).
    pub address: String,
    pub outbound: bool,
    /// "established", "connecting", "retrying", "failed"
    pub state: String,
    /// Free text: for established connections `vxlan <name>(<nick>)`, otherwise the last
    /// error and when the next attempt happens.
    pub info: String,
    pub peer_name: Option<String>,
    pub peer_nick_name: Option<String>,
    pub mtu: u32,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "PascalCase")]
pub struct IpamReport {
    /// "ready", "awaiting consensus (quorum: 2, known: 1)", "waiting for IP range grant from peers", ...
    pub status: String,
    pub range: String,
    #[serde(rename = "RangeNumIPs")]
    pub range_num_ips: u64,
    #[serde(rename = "ActiveIPs")]
    pub active_ips: u64,
    pub default_subnet: String,
    /// The peers the ring was seeded with (empty until the ring exists).
    pub seeds: Vec<String>,
    pub entries: Vec<RingEntryReport>,
    /// This node's allocations: container id -> addresses (CIDR form).
    pub owned: Vec<OwnedReport>,
    pub pending_allocates: u64,
    pub pending_claims: u64,
    /// Gossiped rings refused as malformed or conflicting (the connection was closed and
    /// the ring left unchanged).
    #[serde(default)]
    pub bad_gossip: u64,
    /// HTTP requests refused for a malformed container id, address or prefix.
    #[serde(default)]
    pub bad_requests: u64,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "PascalCase")]
pub struct RingEntryReport {
    pub token: String,
    pub size: u64,
    pub peer: String,
    pub nickname: String,
    pub is_known_peer: bool,
    /// Whether the owner currently has an established connection (or is this peer).
    pub reachable: bool,
    pub version: u32,
    pub free: u64,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct OwnedReport {
    pub containerid: String,
    pub addrs: Vec<String>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "PascalCase")]
pub struct DataplaneReport {
    /// Destination ranges and where packets to them go.
    pub routes: Vec<RouteReport>,
    /// Per-peer traffic counters.
    pub peers: Vec<PeerTrafficReport>,
    /// Dropped packets by reason ("no_route", "malformed", "unknown_peer", ...).
    pub drops: Vec<DropReport>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "PascalCase")]
pub struct RouteReport {
    /// First and last address of the range, and its size.
    pub start: String,
    pub end: String,
    pub size: u64,
    pub peer: String,
    pub nick_name: String,
    /// "local" for this node's own ranges, else the peer's underlay `ip:port`, or
    /// "unreachable" when the owner's underlay address is unknown.
    pub via: String,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "PascalCase")]
pub struct PeerTrafficReport {
    pub name: String,
    pub nick_name: String,
    pub tx_packets: u64,
    pub tx_bytes: u64,
    pub rx_packets: u64,
    pub rx_bytes: u64,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "PascalCase")]
pub struct DropReport {
    pub reason: String,
    pub packets: u64,
}

/// Errors the IP endpoints map to HTTP status codes.
#[derive(Debug, thiserror::Error, Clone, PartialEq)]
pub enum IpApiError {
    /// 503: IPAM not ready within the wait bound (consensus not reached, no space yet).
    #[error("{0}")]
    NotReady(String),
    /// 503: this node's space is used up.
    #[error("{0}")]
    Exhausted(String),
    /// 400: bad container id, address or prefix.
    #[error("{0}")]
    BadRequest(String),
    /// 409: the address is held by another container, or owned by another peer.
    #[error("{0}")]
    Conflict(String),
    /// 404
    #[error("{0}")]
    NotFound(String),
    /// 500
    #[error("{0}")]
    Internal(String),
}

/// What the HTTP layer needs from the router. The router implements it; the API's own
/// tests use a fake.
pub trait Control: Send + Sync + 'static {
    fn report(&self) -> Report;
    /// Allocates (or returns the existing) address for `container_id`, waiting up to
    /// `wait` for IPAM to become ready. Returns the address with the range's prefix.
    fn allocate(
        &self,
        container_id: ContainerId,
        wait: Duration,
    ) -> impl Future<Output = Result<ipnet::Ipv4Net, IpApiError>> + Send;
    /// As `allocate`, but freed again unless [`Control::confirm`] follows in time (the
    /// CNI plugin's `POST /ip/{id}?tentative`).
    fn allocate_tentative(
        &self,
        container_id: ContainerId,
        wait: Duration,
    ) -> impl Future<Output = Result<ipnet::Ipv4Net, IpApiError>> + Send;
    /// The requester put the address to use (`POST /ip/{id}?confirm`): `None` if the
    /// container holds none (it expired, or was never allocated).
    fn confirm(
        &self,
        container_id: ContainerId,
    ) -> impl Future<Output = Result<Option<ipnet::Ipv4Net>, IpApiError>> + Send;
    /// Allocates inside `subnet` (Weave's `POST /ip/{id}/{ip}/{prefix}`).
    fn allocate_in(
        &self,
        container_id: ContainerId,
        subnet: ipnet::Ipv4Net,
        wait: Duration,
    ) -> impl Future<Output = Result<ipnet::Ipv4Net, IpApiError>> + Send;
    /// Claims a given address for `container_id` (Weave's `PUT /ip/{id}/{ip}/{prefix}`).
    fn claim(
        &self,
        container_id: ContainerId,
        addr: Ipv4Addr,
        wait: Duration,
    ) -> impl Future<Output = Result<ipnet::Ipv4Net, IpApiError>> + Send;
    fn lookup(&self, container_id: &ContainerId) -> Result<Option<ipnet::Ipv4Net>, IpApiError>;
    /// Frees the container's address; freeing an unknown id is not an error (`Ok(None)`).
    fn free(
        &self,
        container_id: &ContainerId,
    ) -> impl Future<Output = Result<Option<Ipv4Addr>, IpApiError>> + Send;
    /// Takes over the address ranges of a peer that is gone for good (Weave's `rmpeer`):
    /// returns how many addresses this node took over. Removing a peer that owns nothing
    /// (or was already removed) takes over 0 and is not an error.
    fn rmpeer(&self, peer_name: &str) -> impl Future<Output = Result<u64, IpApiError>> + Send;
    /// Drops the key binding of a peer (name or nickname) that is not connected, so that
    /// it may come back with a new key; returns how many bindings were dropped.
    fn forget_key(&self, name: &str) -> impl Future<Output = Result<u64, IpApiError>> + Send;
    /// Counts a request refused for malformed input (shown as `weft_api_bad_requests_total`).
    fn count_bad_request(&self);
}
