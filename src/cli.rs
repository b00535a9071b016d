//! The client side of `weft status`, `weft report` and `weft rmpeer`: small blocking HTTP
//! calls to the router's local API, returning the text to print.

use std::time::Duration;
use weft_contract::{paths, Client, ClientError, Method};

/// The status sub-pages the router serves.
pub const STATUS_PAGES: [&str; 5] = ["peers", "connections", "ipam", "targets", "routes"];

/// The router answers from memory; anything slower than this means it is wedged.
const QUERY_TIMEOUT: Duration = Duration::from_secs(10);
/// rmpeer changes the ring and gossips it, which may take a little longer.
const RMPEER_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("weft router is not running (cannot reach {addr}): {reason}")]
    NotRunning { addr: String, reason: String },
    /// `/status` answered 503: the body is the full status page explaining why.
    #[error("{0}")]
    NotReady(String),
    #[error("router at {addr} answered {code}: {body}")]
    Server {
        addr: String,
        code: u16,
        body: String,
    },
    #[error(
        "unknown status page {0:?} (expected one of: peers, connections, ipam, targets, routes)"
    )]
    UnknownPage(String),
    #[error("invalid peer name {0:?}")]
    BadPeerName(String),
    #[error("{0}")]
    BadArgument(String),
    #[error("request to router at {addr} failed: {reason}")]
    Transport { addr: String, reason: String },
}

/// `weft status [page]`: the text of `/status` or `/status/<page>`.
pub fn status(addr: &str, sub: Option<&str>) -> Result<String, CliError> {
    let path = match sub {
        None => paths::STATUS.to_string(),
        Some(p) if STATUS_PAGES.contains(&p) => paths::status_page(p),
        Some(p) => return Err(CliError::UnknownPage(p.to_string())),
    };
    let (code, body) = request(addr, Method::Get, &path, QUERY_TIMEOUT)?;
    match code {
        200 => Ok(body),
        503 if sub.is_none() => Err(CliError::NotReady(body)),
        _ => Err(server_error(addr, code, body)),
    }
}

/// `weft report`: the router's full state as pretty JSON.
pub fn report(addr: &str) -> Result<String, CliError> {
    match request(addr, Method::Get, paths::REPORT, QUERY_TIMEOUT)? {
        (200, body) => Ok(body),
        (code, body) => Err(server_error(addr, code, body)),
    }
}

/// `weft rmpeer NAME`: hands the IP ranges of a dead peer to this router; answers with the
/// router's message (e.g. `65536 IPs taken over from 02:...`).
pub fn rmpeer(addr: &str, name: &str) -> Result<String, CliError> {
    if name.is_empty() || name.chars().any(|c| c.is_control()) {
        return Err(CliError::BadPeerName(name.to_string()));
    }
    match request(addr, Method::Delete, &paths::peer(name), RMPEER_TIMEOUT)? {
        (200 | 204, body) => Ok(body),
        (code, body) => Err(server_error(addr, code, body)),
    }
}

/// `weft forget-key NAME`: the router forgets the key NAME is bound to.
pub fn forget_key(addr: &str, name: &str) -> Result<String, CliError> {
    if name.is_empty() || name.chars().any(|c| c.is_control()) {
        return Err(CliError::BadPeerName(name.to_string()));
    }
    match request(addr, Method::Delete, &paths::peer_key(name), QUERY_TIMEOUT)? {
        (200 | 204, body) => Ok(body),
        (code, body) => Err(server_error(addr, code, body)),
    }
}

/// `weft report -f TEMPLATE`: the report through a Go text/template, rendered by the
/// router (`/report?format=`), as `weave report -f` did.
pub fn report_format(addr: &str, template: &str) -> Result<String, CliError> {
    let q: String = form_urlencoded::Serializer::new(String::new())
        .append_pair("format", template)
        .finish();
    match request(
        addr,
        Method::Get,
        &format!("{}?{q}", paths::REPORT),
        QUERY_TIMEOUT,
    )? {
        (200, body) => Ok(body),
        (code, body) => Err(server_error(addr, code, body)),
    }
}

fn peer_form(peers: &[String], replace: bool) -> String {
    let mut f = form_urlencoded::Serializer::new(String::new());
    for p in peers {
        f.append_pair("peer", p);
    }
    if replace {
        f.append_pair("replace", "true");
    }
    f.finish()
}

fn post_form(addr: &str, path: &str, form: &str) -> Result<String, CliError> {
    let answer = Client::with_timeout(addr, QUERY_TIMEOUT)
        .post(path, "application/x-www-form-urlencoded", form.as_bytes())
        .map_err(client_error)?;
    match answer.status {
        200 | 204 => Ok(answer.body),
        code => Err(server_error(addr, code, answer.body)),
    }
}

/// `weft connect [--replace] PEER...`: the router dials these peers too.
pub fn connect(addr: &str, peers: &[String], replace: bool) -> Result<String, CliError> {
    post_form(addr, "/connect", &peer_form(peers, replace))
}

/// `weft forget PEER...`: the router stops dialling these peers.
pub fn forget(addr: &str, peers: &[String]) -> Result<String, CliError> {
    post_form(addr, "/forget", &peer_form(peers, false))
}

/// `weft policy explain SRC DST PORT/PROTO`.
pub fn policy_explain(addr: &str, src: &str, dst: &str, port: &str) -> Result<String, CliError> {
    let (port, proto) = match port.split_once('/') {
        Some((p, proto)) => (p, proto),
        None if port.eq_ignore_ascii_case("icmp") => ("0", "ICMP"),
        None => (port, "TCP"),
    };
    let port: u16 = port.parse().map_err(|_| {
        CliError::BadArgument(format!("{port:?}: expected PORT/PROTO, e.g. 80/TCP"))
    })?;
    let query: String = form_urlencoded::Serializer::new(String::new())
        .append_pair("src", src)
        .append_pair("dst", dst)
        .append_pair("port", &port.to_string())
        .append_pair("proto", proto)
        .finish();
    match request(
        addr,
        Method::Get,
        &format!("/policy/explain?{query}"),
        QUERY_TIMEOUT,
    )? {
        (200, body) => Ok(body),
        (code, body) => Err(server_error(addr, code, body)),
    }
}

/// `weft policy table`: the policy table the router wrote.
pub fn policy_table(addr: &str) -> Result<String, CliError> {
    match request(addr, Method::Get, "/policy/table", QUERY_TIMEOUT)? {
        (200, body) => Ok(body),
        (code, body) => Err(server_error(addr, code, body)),
    }
}

/// `weft expose`: this node's own overlay address (allocated if it has none yet).
pub fn expose(addr: &str) -> Result<String, CliError> {
    match request(addr, Method::Post, "/expose", RMPEER_TIMEOUT)? {
        (200, body) => Ok(body),
        (code, body) => Err(server_error(addr, code, body)),
    }
}

/// What `weft status dns` answers: Weave had weaveDNS; weft has none.
pub const NO_DNS: &str = "weft has no DNS service. Weave's weaveDNS is not part of weft: in Kubernetes, pods resolve names through the cluster's DNS (CoreDNS), which works over weft unchanged.\n";

/// One pod attachment on this node, for `weft ps`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Attachment {
    pub container_id: String,
    /// The node-side interface (`weave` for the node's own address).
    pub interface: String,
    /// The pod interface's MAC (`-` if the kernel does not say: the veth is gone).
    pub mac: String,
    pub address: String,
}

/// The node's attachments as the router holds them (`GET /ip`), in container-id order;
/// interfaces follow from the ids (the plugin names host veths after them).
pub fn attachments(addr: &str) -> Result<Vec<Attachment>, CliError> {
    #[derive(serde::Deserialize)]
    struct Owned {
        owned: Vec<crate::api::report::OwnedReport>,
    }
    let (code, body) = request(addr, Method::Get, "/ip", QUERY_TIMEOUT)?;
    if code != 200 {
        return Err(server_error(addr, code, body));
    }
    let owned: Owned = serde_json::from_str(&body).map_err(|e| CliError::Transport {
        addr: addr.to_string(),
        reason: format!("unexpected answer to GET /ip: {e}"),
    })?;
    let mut v: Vec<Attachment> = owned
        .owned
        .into_iter()
        .flat_map(|o| {
            let interface = if o.containerid == weft_contract::EXPOSE_ID {
                weft_contract::TUN_NAME.to_string()
            } else {
                weft_contract::host_veth_name(&o.containerid)
            };
            o.addrs.into_iter().map(move |a| Attachment {
                container_id: o.containerid.clone(),
                interface: interface.clone(),
                mac: "-".into(),
                address: a,
            })
        })
        .collect();
    v.sort_by(|a, b| a.container_id.cmp(&b.container_id));
    Ok(v)
}

/// `weft ps` lines: Weave's `CONTAINER MAC ADDRESS` with the interface after the id.
pub fn render_ps(list: &[Attachment]) -> String {
    let mut out = String::new();
    for a in list {
        out.push_str(&format!(
            "{} {} {} {}\n",
            a.container_id, a.interface, a.mac, a.address
        ));
    }
    out
}

fn client_error(e: ClientError) -> CliError {
    match e {
        ClientError::Unreachable { addr, reason } => CliError::NotRunning { addr, reason },
        ClientError::Transport { addr, reason } => CliError::Transport { addr, reason },
    }
}

fn server_error(addr: &str, code: u16, body: String) -> CliError {
    CliError::Server {
        addr: addr.to_string(),
        code,
        body: body.trim_end().to_string(),
    }
}

/// Sends one request; any HTTP status is returned to the caller together with the body.
fn request(
    addr: &str,
    method: Method,
    path: &str,
    timeout: Duration,
) -> Result<(u16, String), CliError> {
    let answer = Client::with_timeout(addr, timeout)
        .call(method, path)
        .map_err(client_error)?;
    Ok((answer.status, answer.body))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::http::{api_router, fake::FakeControl, serve};
    use crate::api::report::Control;
    use crate::api::status::{self as pages, tests::sample_report};
    use axum::extract::Path;
    use axum::routing::delete;
    use std::sync::Arc;

    /// A router serving `router` on 127.0.0.1:<ephemeral> from a background runtime.
    struct Server {
        addr: String,
        stop: Option<tokio::sync::oneshot::Sender<()>>,
        _rt: tokio::runtime::Runtime,
    }

    impl Server {
        fn start(router: axum::Router) -> Server {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .unwrap();
            let listener = rt
                .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
                .unwrap();
            let addr = listener.local_addr().unwrap().to_string();
            let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
            rt.spawn(serve(listener, router, async {
                let _ = stopped.await;
            }));
            Server {
                addr,
                stop: Some(stop),
                _rt: rt,
            }
        }
    }

    impl Drop for Server {
        fn drop(&mut self) {
            if let Some(stop) = self.stop.take() {
                let _ = stop.send(());
            }
        }
    }

    fn fake(ready: bool) -> (Arc<FakeControl>, Server) {
        let mut r = sample_report();
        r.ready = ready;
        let ctl = Arc::new(FakeControl::new(r));
        let server = Server::start(api_router(ctl.clone()));
        (ctl, server)
    }

    #[test]
    fn status_and_its_pages_print_the_servers_text() {
        let (ctl, server) = fake(true);
        let r = ctl.report();
        assert_eq!(
            status(&server.addr, None).unwrap(),
            pages::render_status(&r)
        );
        assert_eq!(
            status(&server.addr, Some("ipam")).unwrap(),
            pages::render_ipam(&r)
        );
        assert_eq!(
            status(&server.addr, Some("routes")).unwrap(),
            pages::render_routes(&r)
        );
        for p in STATUS_PAGES {
            assert!(!status(&server.addr, Some(p)).unwrap().is_empty(), "{p}");
        }
        // The address may also be given as a URL.
        let url = format!("http://{}/", server.addr);
        assert_eq!(
            status(&url, Some("targets")).unwrap(),
            "10.200.0.2\n10.200.0.3\n"
        );
    }

    #[test]
    fn unknown_page_is_refused_before_any_request() {
        let e = status("127.0.0.1:1", Some("dns")).unwrap_err();
        assert!(
            matches!(e, CliError::UnknownPage(ref p) if p == "dns"),
            "{e}"
        );
    }

    #[test]
    fn unready_status_is_an_error_carrying_the_page() {
        let (ctl, server) = fake(false);
        match status(&server.addr, None) {
            Err(CliError::NotReady(body)) => {
                assert_eq!(body, pages::render_status(&ctl.report()))
            }
            other => panic!("expected NotReady, got {other:?}"),
        }
    }

    #[test]
    fn report_is_the_json_snapshot() {
        let (ctl, server) = fake(true);
        let text = report(&server.addr).unwrap();
        let back: crate::api::report::Report = serde_json::from_str(&text).unwrap();
        assert_eq!(back, ctl.report());
    }

    #[test]
    fn refused_connection_says_the_router_is_not_running() {
        // A socket bound but not listening holds the port for the whole test (a dropped
        // listener's port can be taken by a test running beside this one): connecting
        // to it is refused.
        let held =
            socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        held.bind(&std::net::SocketAddr::from(([127, 0, 0, 1], 0)).into())
            .unwrap();
        let port = held.local_addr().unwrap().as_socket().unwrap().port();
        let addr = format!("127.0.0.1:{port}");
        let e = status(&addr, None).unwrap_err();
        assert!(matches!(e, CliError::NotRunning { .. }), "{e:?}");
        assert_eq!(
            e.to_string(),
            format!("weft router is not running (cannot reach {addr}): connection refused")
        );
        assert!(matches!(report(&addr), Err(CliError::NotRunning { .. })));
        assert!(matches!(
            rmpeer(&addr, "02:00:00:00:00:01"),
            Err(CliError::NotRunning { .. })
        ));
    }

    #[test]
    fn rmpeer_sends_delete_with_the_encoded_name() {
        let router = axum::Router::new().route(
            "/peer/{name}",
            delete(|Path(name): Path<String>| async move {
                format!("21845 IPs taken over from {name}\n")
            }),
        );
        let server = Server::start(router);
        assert_eq!(
            rmpeer(&server.addr, "02:77:76:00:00:03").unwrap(),
            "21845 IPs taken over from 02:77:76:00:00:03\n"
        );
        assert_eq!(
            rmpeer(&server.addr, "node a/b").unwrap(),
            "21845 IPs taken over from node a/b\n"
        );
        assert!(matches!(
            rmpeer(&server.addr, ""),
            Err(CliError::BadPeerName(_))
        ));
    }

    #[test]
    fn server_errors_carry_code_and_message() {
        // An unknown name: the server's 404 and its reason reach the user.
        let (_ctl, server) = fake(true);
        match rmpeer(&server.addr, "gone") {
            Err(CliError::Server { code, body, .. }) => {
                assert_eq!(code, 404);
                assert!(body.contains("no peer named"), "{body}");
            }
            other => panic!("expected a 404, got {other:?}"),
        }
        assert_eq!(
            rmpeer(&server.addr, "n3").unwrap(),
            "16 IPs taken over from n3\n"
        );
    }

    #[test]
    fn report_format_connect_forget_expose_and_ps_reach_the_router() {
        let (ctl, server) = fake(true);
        assert_eq!(
            report_format(&server.addr, "{{.Router.Name}} {{len .Router.Peers}}").unwrap(),
            "02:77:76:00:00:01 2"
        );
        assert!(matches!(
            report_format(&server.addr, "{{.Router"),
            Err(CliError::Server { code: 400, .. })
        ));
        connect(
            &server.addr,
            &["10.0.0.7".to_string(), "10.0.0.8:7000".to_string()],
            false,
        )
        .unwrap();
        assert_eq!(
            *ctl.targets.lock().unwrap(),
            ["10.0.0.7:6783", "10.0.0.8:7000"]
        );
        assert_eq!(
            forget(&server.addr, &["10.0.0.8:7000".to_string()]).unwrap(),
            "1 target(s) forgotten\n"
        );
        assert_eq!(expose(&server.addr).unwrap(), "192.168.0.1/16");
        let ps = attachments(&server.addr).unwrap();
        // The fake's report lists pod-a; the expose above gave weave:expose its address.
        let ids: Vec<&str> = ps.iter().map(|a| a.container_id.as_str()).collect();
        assert!(ids.contains(&"weave:expose"), "{ps:?}");
        let expose_line = ps
            .iter()
            .find(|a| a.container_id == "weave:expose")
            .unwrap();
        assert_eq!(expose_line.interface, "weave");
        let text = render_ps(&ps);
        assert!(
            text.contains("weave:expose weave - 192.168.0.1/16\n"),
            "{text}"
        );
    }
}
