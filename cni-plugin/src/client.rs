//! The weft router's IPAM HTTP API, as the plugin uses it.

use std::net::SocketAddr;
use std::time::Duration;

use weft_contract::{paths, Client, ClientError, ContainerId, IpStatus, Method};

use crate::spec::{Cidr, CniError, ErrorCode};

/// POST blocks in the daemon until IPAM is ready (it bounds that at ~30 s), so the
/// plugin waits longer than the daemon does and sees its 503 rather than a timeout.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

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
    fn excerpt_caps_length() {
        assert_eq!(excerpt(" hi \n"), "hi");
        assert_eq!(excerpt(&"x".repeat(400)).len(), 303);
    }
}
