//! The one HTTP client of the daemon's local API: blocking (the plugin and the CLI are
//! short-lived processes, the harness calls from namespace threads), never through a
//! proxy from the environment, every status handed back to the caller.

use std::io::ErrorKind;
use std::time::Duration;

/// Connecting to a daemon on this node takes microseconds; longer means it is wedged.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// The daemon answers queries from memory.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    Get,
    Post,
    Put,
    Delete,
}

impl Method {
    pub fn as_str(self) -> &'static str {
        match self {
            Method::Get => "GET",
            Method::Post => "POST",
            Method::Put => "PUT",
            Method::Delete => "DELETE",
        }
    }
}

/// Any HTTP answer, whatever its status.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Answer {
    pub status: u16,
    pub body: String,
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Nothing listens (refused, reset, no such host): the daemon is not running.
    #[error("cannot reach the weft daemon at {addr}: {reason}")]
    Unreachable { addr: String, reason: String },
    /// Connected, but the exchange failed (timeout, broken answer).
    #[error("request to the weft daemon at {addr} failed: {reason}")]
    Transport { addr: String, reason: String },
}

#[derive(Clone, Debug)]
pub struct Client {
    agent: ureq::Agent,
    base: String,
    addr: String,
}

impl Client {
    /// A client of the API at `addr` (`host:port`, or a URL), with [`DEFAULT_TIMEOUT`].
    pub fn new(addr: &str) -> Client {
        Client::with_timeout(addr, DEFAULT_TIMEOUT)
    }

    /// `timeout` bounds a whole exchange: an allocation may wait in the daemon for IPAM
    /// to become ready, so its callers give more than a query needs.
    pub fn with_timeout(addr: &str, timeout: Duration) -> Client {
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            // The API is local: a proxy from the environment must never see these calls.
            .proxy(None)
            .timeout_global(Some(timeout))
            .timeout_connect(Some(CONNECT_TIMEOUT.min(timeout)))
            .build()
            .into();
        let trimmed = addr.trim_end_matches('/');
        let base = if trimmed.starts_with("http://") || trimmed.starts_with("https://") {
            trimmed.to_string()
        } else {
            format!("http://{trimmed}")
        };
        Client {
            agent,
            base,
            addr: addr.to_string(),
        }
    }

    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// One request with an empty body; `path` starts with `/` (see [`crate::paths`]).
    pub fn call(&self, method: Method, path: &str) -> Result<Answer, ClientError> {
        let url = format!("{}{path}", self.base);
        let sent = match method {
            Method::Get => self.agent.get(&url).call(),
            Method::Delete => self.agent.delete(&url).call(),
            Method::Post => self.agent.post(&url).send_empty(),
            Method::Put => self.agent.put(&url).send_empty(),
        };
        self.answer(sent)
    }

    /// A POST with a body of type `content_type` (e.g. `application/json`).
    pub fn post(&self, path: &str, content_type: &str, body: &[u8]) -> Result<Answer, ClientError> {
        let url = format!("{}{path}", self.base);
        let sent = self
            .agent
            .post(&url)
            .header("Content-Type", content_type)
            .send(body);
        self.answer(sent)
    }

    fn answer(
        &self,
        sent: Result<ureq::http::Response<ureq::Body>, ureq::Error>,
    ) -> Result<Answer, ClientError> {
        let mut response = sent.map_err(|e| self.error(e))?;
        let status = response.status().as_u16();
        let body = response
            .body_mut()
            .read_to_string()
            .map_err(|e| ClientError::Transport {
                addr: self.addr.clone(),
                reason: e.to_string(),
            })?;
        Ok(Answer { status, body })
    }

    fn error(&self, e: ureq::Error) -> ClientError {
        let reason = match &e {
            ureq::Error::Io(io) if io.kind() == ErrorKind::ConnectionRefused => {
                "connection refused".to_string()
            }
            _ => e.to_string(),
        };
        let unreachable = match &e {
            ureq::Error::Io(io) => matches!(
                io.kind(),
                ErrorKind::ConnectionRefused | ErrorKind::ConnectionReset | ErrorKind::NotFound
            ),
            ureq::Error::ConnectionFailed | ureq::Error::HostNotFound => true,
            _ => false,
        };
        let addr = self.addr.clone();
        if unreachable {
            ClientError::Unreachable { addr, reason }
        } else {
            ClientError::Transport { addr, reason }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader, Read, Write};
    use std::net::TcpListener;

    /// Serves one canned answer per connection; returns the request lines seen.
    fn serve(answers: Vec<(u16, &'static str)>) -> (String, std::thread::JoinHandle<Vec<String>>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
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
    fn every_method_and_status_comes_back() {
        let (addr, server) = serve(vec![
            (200, "10.0.0.1/8"),
            (503, "later"),
            (204, ""),
            (404, "no"),
        ]);
        let c = Client::new(&addr);
        assert_eq!(
            c.call(Method::Post, "/ip/a").unwrap(),
            Answer {
                status: 200,
                body: "10.0.0.1/8".into()
            }
        );
        assert_eq!(c.call(Method::Put, "/ip/a/10.0.0.1/8").unwrap().status, 503);
        assert_eq!(c.call(Method::Delete, "/ip/a").unwrap().status, 204);
        assert_eq!(c.call(Method::Get, "/ip/a").unwrap().body, "no");
        assert_eq!(
            server.join().unwrap(),
            [
                "POST /ip/a HTTP/1.1",
                "PUT /ip/a/10.0.0.1/8 HTTP/1.1",
                "DELETE /ip/a HTTP/1.1",
                "GET /ip/a HTTP/1.1"
            ]
        );
    }

    #[test]
    fn a_post_carries_its_body() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let server = std::thread::spawn(move || {
            let (stream, _) = listener.accept().unwrap();
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut head = Vec::new();
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
                head.push(h.trim().to_string());
            }
            let mut body = vec![0; len];
            reader.read_exact(&mut body).unwrap();
            let mut stream = stream;
            write!(
                stream,
                "HTTP/1.1 404 X\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            )
            .unwrap();
            (head, String::from_utf8(body).unwrap())
        });
        let a = Client::new(&addr)
            .post("/x", "application/json", br#"{"a":1}"#)
            .unwrap();
        assert_eq!(a.status, 404);
        let (head, body) = server.join().unwrap();
        assert_eq!(head[0], "POST /x HTTP/1.1");
        assert!(
            head.iter()
                .any(|h| h.eq_ignore_ascii_case("content-type: application/json")),
            "{head:?}"
        );
        assert_eq!(body, r#"{"a":1}"#);
    }

    #[test]
    fn nothing_listening_is_unreachable_and_a_url_works_too() {
        let addr = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let e = Client::new(&format!("http://{addr}/"))
            .call(Method::Get, "/status")
            .unwrap_err();
        assert!(matches!(e, ClientError::Unreachable { .. }), "{e}");
        assert!(e.to_string().contains("connection refused"), "{e}");
    }

    #[test]
    fn a_silent_server_is_a_transport_error_within_the_timeout() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let t = std::time::Instant::now();
        let e = Client::with_timeout(&addr, Duration::from_millis(300))
            .call(Method::Get, "/status")
            .unwrap_err();
        assert!(matches!(e, ClientError::Transport { .. }), "{e}");
        assert!(t.elapsed() < Duration::from_secs(5));
        drop(listener);
    }
}
