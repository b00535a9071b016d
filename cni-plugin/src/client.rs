//! The weft router's IPAM HTTP API, as the plugin uses it.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use serde::Deserialize;
use weft_contract::{paths, Client, ClientError, ContainerId, IpStatus, Method};

use crate::spec::{Cidr, CniError, ErrorCode};

/// POST blocks in the daemon until IPAM is ready (it bounds that at ~30 s), so the
/// plugin waits longer than the daemon does and sees its 503 rather than a timeout.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
/// STATUS asks a question the daemon answers from memory.
const STATUS_TIMEOUT: Duration = Duration::from_secs(10);
/// The observation is best effort: it must not make a command noticeably slower.
const OBSERVATION_TIMEOUT: Duration = Duration::from_millis(200);
/// Where the plugin reports each command's duration and outcome (weft's metrics).
pub const OBSERVATION_PATH: &str = "/cni/observation";

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("cannot reach the weft daemon at {addr}: {reason}")]
    Unreachable { addr: SocketAddr, reason: String },
    #[error("the weft daemon at {addr} is not ready: {body}")]
    NotReady { addr: SocketAddr, body: String },
    #[error("the weft daemon at {addr} has no free address: {body}")]
    Exhausted { addr: SocketAddr, body: String },
    #[error("the weft daemon at {addr} failed {what}: {body}")]
    Failed {
        addr: SocketAddr,
        what: String,
        body: String,
    },
    #[error("the weft daemon at {addr} answered {what} with status {status}: {body}")]
    Unexpected {
        addr: SocketAddr,
        what: String,
        status: u16,
        body: String,
    },
    #[error("the weft daemon at {addr} answered {what} with {body:?}, which is not an IPv4 address/prefix")]
    BadAddress {
        addr: SocketAddr,
        what: String,
        body: String,
    },
    /// 400 to an allocation in a subnet: the subnet is not one the daemon can serve
    /// (outside its range), so the network config is wrong.
    #[error("the weft daemon at {addr} refused {what}: {body}")]
    SubnetRefused {
        addr: SocketAddr,
        what: String,
        body: String,
    },
    /// 409 to an allocation in a subnet: the container holds an address elsewhere.
    #[error("the weft daemon at {addr} refused {what}: {body}")]
    HeldElsewhere {
        addr: SocketAddr,
        what: String,
        body: String,
    },
}

impl From<DaemonError> for CniError {
    fn from(e: DaemonError) -> CniError {
        match &e {
            DaemonError::Unreachable { addr, .. } | DaemonError::NotReady { addr, .. } => {
                CniError::new(
                    ErrorCode::TryAgainLater,
                    format!("weft daemon at {addr} is not available"),
                    format!("{e}; check that the weft router runs on this node (it serves HTTP on {addr}); the runtime will retry"),
                )
            }
            DaemonError::Exhausted { .. } => CniError::new(
                ErrorCode::AddressesExhausted,
                "no free address in the pod range",
                format!("{e}; remove unused pods, or give the cluster a larger IPALLOC_RANGE (a new cluster)"),
            ),
            DaemonError::Failed { .. } => CniError::new(
                ErrorCode::DaemonFailed,
                "the weft daemon could not complete the request",
                format!("{e}; nothing was granted: see the router's log (a full disk under --db-dir?)"),
            ),
            DaemonError::SubnetRefused { .. } => CniError::new(
                ErrorCode::InvalidConfig,
                "ipam.subnet cannot be served by the weft daemon",
                format!("{e}; ipam.subnet must lie inside the router's IPALLOC_RANGE (GET /ipinfo/defaultsubnet shows it)"),
            ),
            DaemonError::HeldElsewhere { .. } => CniError::new(
                ErrorCode::AlreadyAttached,
                "the container already holds a weft address outside ipam.subnet",
                format!("{e}; weft gives a container one address: DEL its other weft attachment first"),
            ),
            DaemonError::Unexpected { .. } | DaemonError::BadAddress { .. } => CniError::new(
                ErrorCode::DaemonProtocol,
                "unexpected answer from the weft daemon",
                format!("{e}; weft-cni and the weft router may be different versions"),
            ),
        }
    }
}

pub struct Daemon {
    client: Client,
    addr: SocketAddr,
}

/// Daemon error bodies are short texts; cap what we quote in messages.
fn excerpt(body: &str) -> String {
    let t = body.trim();
    match t.char_indices().nth(300) {
        Some((i, _)) => format!("{}...", &t[..i]),
        None => t.to_string(),
    }
}

impl Daemon {
    pub fn new(addr: SocketAddr) -> Daemon {
        Daemon {
            client: Client::with_timeout(&addr.to_string(), REQUEST_TIMEOUT),
            addr,
        }
    }

    /// Sends a request and returns (status, body).
    fn exchange(&self, method: Method, path: &str) -> Result<(u16, String), DaemonError> {
        let answer = self
            .client
            .call(method, path)
            .map_err(|e| DaemonError::Unreachable {
                addr: self.addr,
                reason: match e {
                    ClientError::Unreachable { reason, .. }
                    | ClientError::Transport { reason, .. } => reason,
                },
            })?;
        Ok((answer.status, answer.body))
    }

    fn parse_cidr(&self, what: &str, body: &str) -> Result<Cidr, DaemonError> {
        Cidr::parse(body).ok_or_else(|| DaemonError::BadAddress {
            addr: self.addr,
            what: what.to_string(),
            body: excerpt(body),
        })
    }

    fn unexpected(&self, what: &str, status: u16, body: &str) -> DaemonError {
        let addr = self.addr;
        let body = excerpt(body);
        match IpStatus::from_code(status) {
            Some(IpStatus::Unavailable) => DaemonError::NotReady { addr, body },
            Some(IpStatus::Exhausted) => DaemonError::Exhausted { addr, body },
            Some(IpStatus::Internal) => DaemonError::Failed {
                addr,
                what: what.to_string(),
                body,
            },
            _ => DaemonError::Unexpected {
                addr,
                what: what.to_string(),
                status,
                body,
            },
        }
    }

    /// `POST /ip/{id}?tentative`: the address for this container (the same one on
    /// repeat), freed by the daemon unless [`Daemon::confirm`] follows.
    pub fn allocate(&self, container_id: &ContainerId) -> Result<Cidr, DaemonError> {
        let path = paths::ip_tentative(container_id);
        let what = format!("POST {path}");
        let (status, body) = self.exchange(Method::Post, &path)?;
        match IpStatus::from_code(status) {
            Some(IpStatus::Granted) => self.parse_cidr(&what, &body),
            _ => Err(self.unexpected(&what, status, &body)),
        }
    }

    /// `POST /ip/{id}/{net}/{prefix}?tentative`: as [`Daemon::allocate`], inside
    /// `subnet`; the answer carries the subnet's prefix length.
    pub fn allocate_in(
        &self,
        container_id: &ContainerId,
        subnet: Cidr,
    ) -> Result<Cidr, DaemonError> {
        let path = format!(
            "{}/{}/{}?tentative",
            paths::ip(container_id),
            subnet.network(),
            subnet.prefix
        );
        let what = format!("POST {path}");
        let (status, body) = self.exchange(Method::Post, &path)?;
        let addr = self.addr;
        match IpStatus::from_code(status) {
            Some(IpStatus::Granted) => {
                let got = self.parse_cidr(&what, &body)?;
                if subnet.contains(got.addr) {
                    // An older daemon answers with the range's prefix: the pod's network
                    // is the subnet all the same.
                    Ok(Cidr {
                        addr: got.addr,
                        prefix: subnet.prefix,
                    })
                } else {
                    Err(DaemonError::BadAddress {
                        addr,
                        what: format!("{what} (an address inside {subnet})"),
                        body: excerpt(&body),
                    })
                }
            }
            Some(IpStatus::BadRequest) => Err(DaemonError::SubnetRefused {
                addr,
                what,
                body: excerpt(&body),
            }),
            Some(IpStatus::Conflict) => Err(DaemonError::HeldElsewhere {
                addr,
                what,
                body: excerpt(&body),
            }),
            _ => Err(self.unexpected(&what, status, &body)),
        }
    }

    /// `POST /ip/{id}?confirm`: the pod is plumbed, keep its address.
    pub fn confirm(&self, container_id: &ContainerId) -> Result<Cidr, DaemonError> {
        let path = paths::ip_confirm(container_id);
        let what = format!("POST {path}");
        let (status, body) = self.exchange(Method::Post, &path)?;
        match IpStatus::from_code(status) {
            Some(IpStatus::Granted) => self.parse_cidr(&what, &body),
            _ => Err(self.unexpected(&what, status, &body)),
        }
    }

    /// `POST /policy/admit/{namespace}/{name}/{ip}`: waits until the pod's NetworkPolicy
    /// rules are in place (before its containers start). A daemon that enforces no policy
    /// (404) is fine.
    pub fn admit_policy(
        &self,
        namespace: &str,
        name: &str,
        ip: Ipv4Addr,
    ) -> Result<(), DaemonError> {
        let path = format!("/policy/admit/{namespace}/{name}/{ip}");
        let what = format!("POST {path}");
        let (status, body) = self.exchange(Method::Post, &path)?;
        match status {
            200 | 404 => Ok(()),
            _ => Err(self.unexpected(&what, status, &body)),
        }
    }

    /// `GET /ip/{id}`: the address the daemon holds for this container, if any.
    pub fn lookup(&self, container_id: &ContainerId) -> Result<Option<Cidr>, DaemonError> {
        let path = paths::ip(container_id);
        let what = format!("GET {path}");
        let (status, body) = self.exchange(Method::Get, &path)?;
        match IpStatus::from_code(status) {
            Some(IpStatus::Granted) => self.parse_cidr(&what, &body).map(Some),
            Some(IpStatus::NotFound) => Ok(None),
            _ => Err(self.unexpected(&what, status, &body)),
        }
    }

    /// `DELETE /ip/{id}`: frees the address; an unknown id is not an error.
    pub fn release(&self, container_id: &ContainerId) -> Result<(), DaemonError> {
        let path = paths::ip(container_id);
        let what = format!("DELETE {path}");
        let (status, body) = self.exchange(Method::Delete, &path)?;
        match IpStatus::from_code(status) {
            Some(IpStatus::Granted | IpStatus::Done | IpStatus::NotFound) => Ok(()),
            _ => Err(self.unexpected(&what, status, &body)),
        }
    }
}

/// One entry of `GET /ip` (Weave's JSON: `{"owned": [{"containerid", "addrs"}]}`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Held {
    pub container_id: String,
    pub addrs: Vec<Cidr>,
    /// Allocated by an ADD that has not confirmed it yet (an ADD under way).
    pub tentative: bool,
}

/// Parses the body of `GET /ip`; addresses that are not IPv4 CIDRs are left out.
pub fn parse_held(body: &str) -> Option<Vec<Held>> {
    #[derive(Deserialize)]
    struct Owned {
        containerid: String,
        #[serde(default)]
        addrs: Option<Vec<String>>,
        #[serde(default)]
        tentative: bool,
    }
    #[derive(Deserialize)]
    struct All {
        #[serde(default)]
        owned: Option<Vec<Owned>>,
    }
    let all: All = serde_json::from_str(body).ok()?;
    Some(
        all.owned
            .unwrap_or_default()
            .into_iter()
            .map(|o| Held {
                container_id: o.containerid,
                addrs: o
                    .addrs
                    .unwrap_or_default()
                    .iter()
                    .filter_map(|a| Cidr::parse(a))
                    .collect(),
                tentative: o.tentative,
            })
            .collect(),
    )
}

impl Daemon {
    /// `GET /ip`: every allocation this node's daemon holds.
    pub fn held(&self) -> Result<Vec<Held>, DaemonError> {
        let what = format!("GET {}", paths::IP);
        let (status, body) = self.exchange(Method::Get, paths::IP)?;
        match IpStatus::from_code(status) {
            Some(IpStatus::Granted) => parse_held(&body).ok_or_else(|| DaemonError::Unexpected {
                addr: self.addr,
                what,
                status,
                body: excerpt(&body),
            }),
            _ => Err(self.unexpected(&what, status, &body)),
        }
    }
}

/// What `GET /status` says about the daemon's readiness to allocate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Readiness {
    Ready,
    /// Answered, but not ready (503), or answered something else: the reason.
    NotReady(String),
    /// Nothing answered.
    Unreachable(String),
}

/// `GET /status` at `addr`, with a short timeout.
pub fn readiness(addr: SocketAddr) -> Readiness {
    let client = Client::with_timeout(&addr.to_string(), STATUS_TIMEOUT);
    match client.call(Method::Get, paths::STATUS) {
        Ok(a) if a.status == 200 => Readiness::Ready,
        Ok(a) if a.status == 503 => Readiness::NotReady(format!(
            "GET {} answered 503 (not ready): {}",
            paths::STATUS,
            excerpt(&a.body)
        )),
        Ok(a) => Readiness::NotReady(format!(
            "GET {} answered {} instead of 200: {}",
            paths::STATUS,
            a.status,
            excerpt(&a.body)
        )),
        Err(e) => Readiness::Unreachable(e.to_string()),
    }
}

/// How a command ended, for the daemon's metrics.
#[derive(Debug, Clone, PartialEq)]
pub struct Observation {
    pub command: &'static str,
    /// `None` for success, else the CNI error code answered.
    pub code: Option<u32>,
    pub seconds: f64,
}

impl Observation {
    pub fn to_json(&self) -> serde_json::Value {
        let mut v = serde_json::json!({
            "command": self.command,
            "result": if self.code.is_some() { "error" } else { "ok" },
            "seconds": self.seconds,
        });
        if let Some(code) = self.code {
            v["code"] = code.into();
        }
        v
    }
}

/// `POST /cni/observation`, best effort: bounded by [`OBSERVATION_TIMEOUT`], every
/// failure (nothing listening, a daemon without the endpoint: 404) ignored.
pub fn observe(addr: SocketAddr, observation: &Observation) {
    let client = Client::with_timeout(&addr.to_string(), OBSERVATION_TIMEOUT);
    let body = observation.to_json().to_string();
    let _ = client.post(OBSERVATION_PATH, "application/json", body.as_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader, Read, Write};
    use std::net::TcpListener;

    fn id(s: &str) -> ContainerId {
        ContainerId::parse(s).unwrap()
    }

    /// Serves one canned HTTP answer per connection and returns the request lines.
    fn serve(
        answers: Vec<(u16, &'static str)>,
    ) -> (SocketAddr, std::thread::JoinHandle<Vec<String>>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let handle = std::thread::spawn(move || {
            let mut seen = Vec::new();
            for (status, body) in answers {
                let (stream, _) = listener.accept().unwrap();
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut line = String::new();
                reader.read_line(&mut line).unwrap();
                seen.push(line.trim().to_string());
                let mut len = 0usize;
                loop {
                    let mut h = String::new();
                    reader.read_line(&mut h).unwrap();
                    if h.trim().is_empty() {
                        break;
                    }
                    if let Some(v) = h.to_ascii_lowercase().strip_prefix("content-length:") {
                        len = v.trim().parse().unwrap();
                    }
                }
                let mut skip = vec![0; len];
                reader.read_exact(&mut skip).unwrap();
                let mut stream = stream;
                write!(
                    stream,
                    "HTTP/1.1 {status} X\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                )
                .unwrap();
            }
            seen
        });
        (addr, handle)
    }

    #[test]
    fn allocate_lookup_release() {
        let (addr, server) = serve(vec![
            (200, "192.168.3.4/16\n"),
            (200, "192.168.3.4/16"),
            (404, "not found"),
            (204, ""),
            (404, ""),
        ]);
        let d = Daemon::new(addr);
        let c = d.allocate(&id("abc")).unwrap();
        assert_eq!(c.to_string(), "192.168.3.4/16");
        assert_eq!(d.lookup(&id("abc")).unwrap(), Some(c));
        assert_eq!(d.lookup(&id("abc")).unwrap(), None);
        d.release(&id("abc")).unwrap();
        d.release(&id("abc")).unwrap();
        let seen = server.join().unwrap();
        assert_eq!(
            seen,
            [
                "POST /ip/abc?tentative HTTP/1.1",
                "GET /ip/abc HTTP/1.1",
                "GET /ip/abc HTTP/1.1",
                "DELETE /ip/abc HTTP/1.1",
                "DELETE /ip/abc HTTP/1.1"
            ]
        );
    }

    #[test]
    fn daemon_errors_map_to_cni_codes() {
        let (addr, server) = serve(vec![
            (503, "IPAM not ready"),
            (200, "garbage"),
            (
                500,
                "allocation not saved, so not granted: No space left on device",
            ),
            (507, "IP range 192.168.0.0/16 is exhausted"),
            (418, "a teapot"),
        ]);
        let d = Daemon::new(addr);
        let e: CniError = d.allocate(&id("a")).unwrap_err().into();
        assert_eq!(e.code, ErrorCode::TryAgainLater);
        assert!(e.details.contains("IPAM not ready"), "{e}");
        let e: CniError = d.allocate(&id("a")).unwrap_err().into();
        assert_eq!(e.code, ErrorCode::DaemonProtocol);
        let e: CniError = d.allocate(&id("a")).unwrap_err().into();
        assert_eq!(
            e.code,
            ErrorCode::DaemonFailed,
            "a full disk is not a protocol error"
        );
        assert!(e.details.contains("No space left"), "{e}");
        let e: CniError = d.allocate(&id("a")).unwrap_err().into();
        assert_eq!(
            e.code,
            ErrorCode::AddressesExhausted,
            "not 'daemon not available'"
        );
        assert!(!e.msg.contains("not available"), "{e}");
        let e: CniError = d.release(&id("a")).unwrap_err().into();
        assert_eq!(e.code, ErrorCode::DaemonProtocol);
        server.join().unwrap();
    }

    #[test]
    fn refused_connection_is_try_again() {
        // Bind then drop to get a local port with no listener.
        let addr = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let e: CniError = Daemon::new(addr).release(&id("a")).unwrap_err().into();
        assert_eq!(e.code, ErrorCode::TryAgainLater);
        assert!(e.msg.contains(&addr.to_string()), "{e}");
    }

    #[test]
    fn allocate_in_a_subnet() {
        let (addr, server) = serve(vec![
            (200, "10.32.0.1/24"),
            // An older daemon: the range's prefix.
            (200, "10.32.0.2/12"),
            (200, "10.99.0.1/24"),
            (
                400,
                "subnet 10.99.0.0/24 is not inside the allocation range 10.32.0.0/12",
            ),
            (409, "container b already has address 10.32.5.1"),
            (503, "not ready"),
        ]);
        let d = Daemon::new(addr);
        let subnet = Cidr::parse("10.32.0.0/24").unwrap();
        assert_eq!(
            d.allocate_in(&id("a"), subnet).unwrap().to_string(),
            "10.32.0.1/24"
        );
        assert_eq!(
            d.allocate_in(&id("a"), subnet).unwrap().to_string(),
            "10.32.0.2/24"
        );
        let e: CniError = d.allocate_in(&id("a"), subnet).unwrap_err().into();
        assert_eq!(e.code, ErrorCode::DaemonProtocol, "outside the subnet: {e}");
        let e: CniError = d
            .allocate_in(&id("a"), Cidr::parse("10.99.0.0/24").unwrap())
            .unwrap_err()
            .into();
        assert_eq!(e.code, ErrorCode::InvalidConfig);
        assert_eq!(e.code.code(), 7);
        assert!(e.details.contains("not inside the allocation range"), "{e}");
        let e: CniError = d.allocate_in(&id("b"), subnet).unwrap_err().into();
        assert_eq!(e.code, ErrorCode::AlreadyAttached);
        let e: CniError = d.allocate_in(&id("a"), subnet).unwrap_err().into();
        assert_eq!(e.code, ErrorCode::TryAgainLater);
        let seen = server.join().unwrap();
        assert_eq!(seen[0], "POST /ip/a/10.32.0.0/24?tentative HTTP/1.1");
        assert_eq!(seen[3], "POST /ip/a/10.99.0.0/24?tentative HTTP/1.1");
    }

    #[test]
    fn held_parses_weaves_json() {
        let h = parse_held(
            r#"{"owned":[{"containerid":"weave:expose","addrs":["10.32.0.1/12"]},{"containerid":"abc","addrs":["10.32.0.2/12","junk"]},{"containerid":"adding","addrs":["10.32.0.3/12"],"tentative":true}]}"#,
        )
        .unwrap();
        assert_eq!(h.len(), 3);
        assert!(!h[1].tentative && h[2].tentative);
        assert_eq!(h[0].container_id, "weave:expose");
        assert_eq!(h[1].addrs, vec![Cidr::parse("10.32.0.2/12").unwrap()]);
        assert_eq!(parse_held(r#"{"owned":null}"#), Some(vec![]));
        assert_eq!(parse_held("{}"), Some(vec![]));
        assert_eq!(parse_held("nope"), None);
    }

    #[test]
    fn readiness_from_status() {
        let (addr, server) = serve(vec![(200, "ok"), (503, "IPAM: waiting for consensus")]);
        assert_eq!(readiness(addr), Readiness::Ready);
        match readiness(addr) {
            Readiness::NotReady(why) => assert!(why.contains("waiting for consensus"), "{why}"),
            other => panic!("{other:?}"),
        }
        assert_eq!(server.join().unwrap(), ["GET /status HTTP/1.1"; 2]);
        let closed = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        assert!(matches!(readiness(closed), Readiness::Unreachable(_)));
    }

    #[test]
    fn observation_json() {
        let ok = Observation {
            command: "ADD",
            code: None,
            seconds: 0.25,
        };
        assert_eq!(
            ok.to_json(),
            serde_json::json!({"command":"ADD","result":"ok","seconds":0.25})
        );
        let err = Observation {
            command: "DEL",
            code: Some(11),
            seconds: 1.5,
        };
        assert_eq!(
            err.to_json(),
            serde_json::json!({"command":"DEL","result":"error","code":11,"seconds":1.5})
        );
    }

    #[test]
    fn observation_is_bounded_and_ignores_failure() {
        // A listener that never answers: the call gives up within its short timeout.
        let silent = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = silent.local_addr().unwrap();
        let obs = Observation {
            command: "ADD",
            code: None,
            seconds: 0.1,
        };
        let t = std::time::Instant::now();
        observe(addr, &obs);
        assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
        // 404 (a daemon without the endpoint) is fine too.
        let (addr, server) = serve(vec![(404, "404 page not found")]);
        observe(addr, &obs);
        assert_eq!(server.join().unwrap(), ["POST /cni/observation HTTP/1.1"]);
    }

    #[test]
    fn excerpt_caps_length() {
        assert_eq!(excerpt(" hi \n"), "hi");
        assert_eq!(excerpt(&"x".repeat(400)).len(), 303);
    }
}
