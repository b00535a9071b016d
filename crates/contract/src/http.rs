//! The daemon's HTTP API as its clients see it: where it listens, its paths, and what each
//! status of an IP call means.

/// Where the daemon's API listens unless `WEAVE_HTTP_ADDR` says otherwise (Weave's).
pub const DEFAULT_HTTP_ADDR: &str = "127.0.0.1:6784";
/// Where the Prometheus metrics are served (Weave's `:6782`).
pub const DEFAULT_METRICS_ADDR: &str = "0.0.0.0:6782";

/// Request paths. Ids and names are put in paths unescaped: a [`crate::ContainerId`]
/// never needs escaping, and peer names are MAC-style (`02:..`), which Weave also sent as
/// they are.
pub mod paths {
    pub const STATUS: &str = "/status";
    pub const REPORT: &str = "/report";
    pub const IP: &str = "/ip";
    pub const DEFAULT_SUBNET: &str = "/ipinfo/defaultsubnet";
    pub const METRICS: &str = "/metrics";

    /// `/status/{page}`.
    pub fn status_page(page: &str) -> String {
        format!("{STATUS}/{page}")
    }

    /// `/ip/{id}`: POST allocates, GET looks up, DELETE frees.
    pub fn ip(container_id: &crate::ContainerId) -> String {
        format!("{IP}/{container_id}")
    }

    /// `/ip/{id}?tentative`: POST allocates an address that is freed again unless
    /// [`ip_confirm`] follows in time (the CNI plugin, so that an ADD given up or killed
    /// halfway holds nothing).
    pub fn ip_tentative(container_id: &crate::ContainerId) -> String {
        format!("{IP}/{container_id}?tentative")
    }

    /// `/ip/{id}?confirm`: POST keeps a tentative address for good.
    pub fn ip_confirm(container_id: &crate::ContainerId) -> String {
        format!("{IP}/{container_id}?confirm")
    }

    /// `/peer/{name}/key`: DELETE forgets the key the name is bound to.
    pub fn peer_key(name: &str) -> String {
        format!("{}/key", peer(name))
    }

    /// `/peer/{name}`: DELETE takes over a dead peer's ranges (rmpeer).
    pub fn peer(name: &str) -> String {
        let mut out = String::from("/peer/");
        for b in name.bytes() {
            if b.is_ascii_alphanumeric() || b"-._~:".contains(&b) {
                out.push(b as char);
            } else {
                out.push_str(&format!("%{b:02X}"));
            }
        }
        out
    }
}

/// What the status of an answer to an IP call (`/ip/...`, `/peer/...`) means. The daemon
/// picks the status from this; the plugin and the CLI read it back with
/// [`IpStatus::from_code`], so both ends agree on, for example, which failures a runtime
/// should retry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IpStatus {
    /// 200: the body is the address with the range's prefix, `192.168.0.5/16` (Weave
    /// answered without a newline).
    Granted,
    /// 204: a claim or a free took effect (freeing an unknown id is not an error).
    Done,
    /// 400: malformed container id, address or prefix; repeating will not help.
    BadRequest,
    /// 404: no address is allocated to that container.
    NotFound,
    /// 409: the address is held by another container or owned by another node.
    Conflict,
    /// 500: the daemon failed, e.g. it could not persist the change (nothing was granted).
    Internal,
    /// 503: not ready yet (no ring, waiting for space from peers): the runtime should
    /// try again later.
    Unavailable,
    /// 507: no free address in the range (or the subnet) and no peer could donate one:
    /// retrying will not help until pods are removed or the range grows.
    Exhausted,
}

impl IpStatus {
    pub fn code(self) -> u16 {
        match self {
            IpStatus::Granted => 200,
            IpStatus::Done => 204,
            IpStatus::BadRequest => 400,
            IpStatus::NotFound => 404,
            IpStatus::Conflict => 409,
            IpStatus::Internal => 500,
            IpStatus::Unavailable => 503,
            IpStatus::Exhausted => 507,
        }
    }

    /// `None` for a status the daemon never sends (a proxy, or another program on the
    /// port).
    pub fn from_code(code: u16) -> Option<IpStatus> {
        Some(match code {
            200 => IpStatus::Granted,
            204 => IpStatus::Done,
            400 => IpStatus::BadRequest,
            404 => IpStatus::NotFound,
            409 => IpStatus::Conflict,
            500 => IpStatus::Internal,
            503 => IpStatus::Unavailable,
            507 => IpStatus::Exhausted,
            _ => return None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_codes_round_trip() {
        for s in [
            IpStatus::Granted,
            IpStatus::Done,
            IpStatus::BadRequest,
            IpStatus::NotFound,
            IpStatus::Conflict,
            IpStatus::Internal,
            IpStatus::Unavailable,
            IpStatus::Exhausted,
        ] {
            assert_eq!(IpStatus::from_code(s.code()), Some(s));
        }
        assert_eq!(IpStatus::from_code(302), None);
    }

    #[test]
    fn peer_paths_escape_what_is_not_a_name() {
        assert_eq!(paths::peer("02:77:66:00:00:01"), "/peer/02:77:66:00:00:01");
        assert_eq!(paths::peer("node a/b"), "/peer/node%20a%2Fb");
        let id = crate::ContainerId::parse("weave:expose").unwrap();
        assert_eq!(paths::ip(&id), "/ip/weave:expose");
    }
}
