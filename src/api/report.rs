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
    /// Weave's update check; weft never calls home, so it is always disabled.
    #[serde(default)]
    pub version_check: VersionCheckReport,
    pub router: RouterReport,
    #[serde(rename = "IPAM")]
    pub ipam: IpamReport,
    pub dataplane: DataplaneReport,
    /// weft's NetworkPolicy enforcement on this node (absent when it is off).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network_policy: Option<crate::policy::PolicyReport>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "PascalCase")]
pub struct VersionCheckReport {
    pub enabled: bool,
    pub success: bool,
    pub new_version: String,
    /// Go's zero time, as Weave printed it when the check was disabled.
    pub next_check_at: String,
}

impl Report {
    /// With the node's NetworkPolicy section.
    pub fn with_policy(mut self, p: Option<crate::policy::PolicyReport>) -> Report {
        self.network_policy = p;
        self
    }
}

impl Default for VersionCheckReport {
    fn default() -> Self {
        VersionCheckReport {
            enabled: false,
            success: false,
            new_version: String::new(),
            next_check_at: "0001-01-01T00:00:00Z".into(),
        }
    }
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
    /// How this router reaches each peer's control plane: `Via` is the neighbour the
    /// messages go through (this peer itself is `00:00:00:00:00:00`), shortest paths over
    /// the established connections all peers gossip.
    #[serde(default)]
    pub unicast_routes: Vec<UnicastRouteReport>,
    /// Where this router's broadcasts (gossip) go: its direct neighbours.
    #[serde(default)]
    pub broadcast_routes: Vec<BroadcastRouteReport>,
    pub connections: Vec<ConnectionReport>,
    pub termination_count: u64,
    /// Weave's per-overlay diagnostics: weft has one overlay, `vxlan`.
    #[serde(default)]
    pub overlay_diagnostics: std::collections::BTreeMap<String, Option<OverlayDiagnostics>>,
    /// Weave's unencrypted subnets under encryption; weft has none (with WEAVE_PASSWORD
    /// every datagram is sealed).
    #[serde(default)]
    pub trusted_subnets: Vec<String>,
    /// Weave's pcap capture statistics, from weft's TUN reader: `PacketsReceived` (taken
    /// into the overlay), `PacketsDropped` (by the data plane), `PacketsIfDropped` (0).
    #[serde(default)]
    pub capture_stats: std::collections::BTreeMap<String, u64>,
    /// Weave's learnt MAC addresses; weft routes at layer 3 and learns none.
    #[serde(default, rename = "MACs")]
    pub macs: Vec<MacReport>,
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
    /// Weave's 12-bit id for its kernel datapath; weft's data plane names peers by their
    /// full name, so it is 0.
    #[serde(rename = "ShortID", default)]
    pub short_id: u16,
    /// Weave's gossip version of the peer's connection set; weft gossips summaries
    /// without versions, so it is 0.
    #[serde(default)]
    pub version: u64,
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
    /// Weave's attributes of an established connection (`null` otherwise).
    #[serde(default)]
    pub attrs: Option<ConnectionAttrs>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct ConnectionAttrs {
    pub mtu: u32,
    /// The overlay: always "vxlan".
    pub name: String,
    /// Datagrams to this peer are sealed (WEAVE_PASSWORD).
    pub encrypted: bool,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "PascalCase")]
pub struct UnicastRouteReport {
    pub dest: String,
    pub via: String,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "PascalCase")]
pub struct BroadcastRouteReport {
    pub source: String,
    pub via: Vec<String>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "PascalCase")]
pub struct OverlayDiagnostics {
    pub interface: String,
    #[serde(rename = "MTU")]
    pub mtu: u32,
    pub data_port: u16,
    /// "aes-256-gcm" with WEAVE_PASSWORD, else "none".
    pub seal: String,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "PascalCase")]
pub struct MacReport {
    pub mac: String,
    pub name: String,
    pub nick_name: String,
    pub last_seen: String,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "PascalCase")]
pub struct ClaimReport {
    pub ident: String,
    #[serde(rename = "CIDR")]
    pub cidr: String,
}

/// Weave's consensus state while the ring is being agreed (`null` once it exists).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "PascalCase")]
pub struct PaxosReport {
    /// This node takes part in the vote (`consensus=N`; observers and seeds do not).
    pub elector: bool,
    pub known_nodes: u64,
    pub quorum: u64,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "PascalCase")]
pub struct IpamReport {
    #[serde(default)]
    pub paxos: Option<PaxosReport>,
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
    /// Container ids of allocation requests waiting for IPAM (`null` when none, as Weave).
    #[serde(default)]
    pub pending_allocates: Option<Vec<String>>,
    /// Claims of addresses waiting for a ring (`null` when none, as Weave).
    #[serde(default)]
    pub pending_claims: Option<Vec<ClaimReport>>,
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
    /// weft's: allocated by an ADD that has not confirmed it yet (CNI GC leaves it be).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub tentative: bool,
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
    /// NetworkPolicy: returns once the pod `key` at `ip` (its CNI ADD) is treated as its
    /// policies say; `Ok(false)` when this node enforces no policy.
    fn policy_admit(
        &self,
        _key: crate::core::policy::Key,
        _ip: Ipv4Addr,
    ) -> impl Future<Output = Result<bool, String>> + Send {
        async { Ok(false) }
    }
    /// `weft policy explain`; `None` when this node enforces no policy.
    fn policy_explain(
        &self,
        _src: &str,
        _dst: &str,
        _proto: &str,
        _port: u16,
    ) -> Option<Result<String, crate::policy::ExplainError>> {
        None
    }
    /// The policy table as planned, in nft's syntax; `None` when policy is off.
    fn policy_table(&self) -> Option<String> {
        None
    }
    /// The daemon's event metrics (heartbeat RTTs, CNI durations, IPAM operations).
    fn telemetry(&self) -> &super::telemetry::Telemetry;
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
    /// Allocates inside `subnet` (Weave's `POST /ip/{id}/{ip}/{prefix}`); returns the
    /// address with the subnet's prefix. `tentative` (`?tentative`, the CNI plugin's):
    /// freed again unless [`Control::confirm`] follows in time, as
    /// [`Control::allocate_tentative`].
    fn allocate_in(
        &self,
        container_id: ContainerId,
        subnet: ipnet::Ipv4Net,
        tentative: bool,
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
    /// Weave's `connect`: dial `targets` (`host` or `host:port`) besides the peer sources';
    /// with `replace`, the targets added this way before and not listed are dropped.
    fn connect(&self, targets: Vec<crate::config::PeerTarget>, replace: bool);
    /// Weave's `forget`: stop dialling `targets` (closing the connections dialled for
    /// them); returns how many were being dialled.
    fn forget(&self, targets: Vec<crate::config::PeerTarget>) -> usize;
    /// This node's own overlay address (`weave:expose`): the address the node's traffic
    /// into the overlay (and masqueraded outside traffic) carries; allocated if the node
    /// has none yet.
    fn expose(
        &self,
        wait: Duration,
    ) -> impl Future<Output = Result<ipnet::Ipv4Net, IpApiError>> + Send;
}
