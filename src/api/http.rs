//! The HTTP servers: Weave's API paths on 127.0.0.1:6784 and Prometheus metrics on :6782.
//!
//! Handlers only translate between HTTP and the [`Control`] trait; every decision stays in
//! the router. Bodies and status codes follow Weave's (e.g. an allocation answers
//! `192.168.0.5/16` without a newline, a claim or free answers 204), because the CNI plugin
//! and users' scripts were written against them.

use super::metrics::{render_metrics, METRICS_CONTENT_TYPE};
use super::report::{Control, IpApiError, OwnedReport, Report};
use super::status;
use axum::extract::{Path, RawQuery, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::Router;
use serde::Serialize;
use std::future::Future;
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::Duration;
use weft_contract::{ContainerId, IpStatus};

/// How long an allocation or claim waits for IPAM to become ready (consensus, a range
/// grant from a peer) before answering 503. The CNI plugin's own timeout should be longer.
pub const DEFAULT_IP_WAIT: Duration = Duration::from_secs(30);

struct Api<C> {
    ctl: Arc<C>,
    wait: Duration,
}

type St<C> = State<Arc<Api<C>>>;

/// The API router for 127.0.0.1:6784, with allocations waiting up to [`DEFAULT_IP_WAIT`].
pub fn api_router<C: Control>(ctl: Arc<C>) -> Router {
    api_router_with_wait(ctl, DEFAULT_IP_WAIT)
}

/// The API router, with allocations and claims waiting up to `wait` for IPAM.
pub fn api_router_with_wait<C: Control>(ctl: Arc<C>, wait: Duration) -> Router {
    let api = Arc::new(Api { ctl, wait });
    Router::new()
        .route("/", get(live_page))
        .route("/status", get(status_page::<C>))
        .route("/status/{page}", get(status_subpage::<C>))
        .route("/report", get(report::<C>))
        .route("/ip", get(ip_all::<C>))
        .route(
            "/ip/{id}",
            post(ip_allocate::<C>)
                .get(ip_lookup::<C>)
                .delete(ip_free::<C>),
        )
        .route(
            "/ip/{id}/{ip}/{prefix}",
            post(ip_allocate_in::<C>)
                .put(ip_claim::<C>)
                .get(ip_lookup_in::<C>),
        )
        .route("/ipinfo/defaultsubnet", get(default_subnet::<C>))
        .route("/ip/{id}/{ip}", delete(ip_free_addr::<C>))
        .route("/connect", post(connect::<C>))
        .route("/forget", post(forget::<C>))
        .route(
            "/expose",
            get(expose::<C>).post(expose::<C>).delete(unexpose::<C>),
        )
        .route("/cni/observation", post(cni_observation::<C>))
        .route("/peer/{name}", delete(peer_remove::<C>))
        .route("/peer/{name}/key", delete(peer_forget_key::<C>))
        .route(
            "/policy/admit/{namespace}/{name}/{ip}",
            post(policy_admit::<C>),
        )
        .route("/policy/explain", get(policy_explain::<C>))
        .route("/policy/table", get(policy_table::<C>))
        .fallback(not_found)
        .with_state(api)
}

/// The metrics router for :6782.
pub fn metrics_router<C: Control>(ctl: Arc<C>) -> Router {
    Router::new()
        .route("/metrics", get(metrics::<C>))
        .fallback(not_found)
        .with_state(ctl)
}

/// Serves `router` on `listener` until `shutdown` completes, then lets requests in flight
/// finish.
pub async fn serve(
    listener: tokio::net::TcpListener,
    router: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router)
        .with_graceful_shutdown(shutdown)
        .await
}

/// A plain-text error answer; the trailing newline is what Go's `http.Error` sent.
fn text_error(code: StatusCode, msg: impl std::fmt::Display) -> Response {
    (code, format!("{msg}\n")).into_response()
}

fn ip_error(e: IpApiError) -> Response {
    let status = match &e {
        IpApiError::NotReady(_) => IpStatus::Unavailable,
        IpApiError::Exhausted(_) => IpStatus::Exhausted,
        IpApiError::BadRequest(_) => IpStatus::BadRequest,
        IpApiError::Conflict(_) => IpStatus::Conflict,
        IpApiError::NotFound(_) => IpStatus::NotFound,
        IpApiError::Internal(_) => IpStatus::Internal,
    };
    let code = StatusCode::from_u16(status.code()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    text_error(code, e)
}

async fn not_found() -> Response {
    text_error(StatusCode::NOT_FOUND, "404 page not found")
}

/// `GET /`: the live picture, one self-contained page (no external resources: clusters
/// are often offline) that polls `/report` and draws peers, the ring, routes and traffic.
const LIVE_PAGE: &str = include_str!("live.html");

async fn live_page() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            // The browser enforces what the page promises: nothing loaded from elsewhere,
            // no eval, only this origin's /report fetched.
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; \
                 img-src data:; connect-src 'self'; base-uri 'none'; form-action 'none'; \
                 frame-ancestors 'none'",
            ),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        LIVE_PAGE,
    )
        .into_response()
}

async fn status_page<C: Control>(State(api): St<C>) -> Response {
    let r = api.ctl.report();
    // Kubernetes' readiness probe hits this path: until the router is ready the same text
    // explains why, with a status that keeps the pod out of service.
    let code = if r.ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, status::render_status(&r)).into_response()
}

async fn status_subpage<C: Control>(State(api): St<C>, Path(page): Path<String>) -> Response {
    let render: fn(&Report) -> String = match page.as_str() {
        "peers" => status::render_peers,
        "connections" => status::render_connections,
        "ipam" => status::render_ipam,
        "targets" => status::render_targets,
        "routes" => status::render_routes,
        _ => return not_found().await,
    };
    let r = api.ctl.report();
    // As /status: a probe or script reading a sub-page before the node is ready gets a
    // status that says so, not a page of half-known facts with 200.
    let code = if r.ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, render(&r)).into_response()
}

/// The value of `key` in a query string or form body (the last one if repeated).
fn form_values(raw: &[u8], key: &str) -> Vec<String> {
    form_urlencoded::parse(raw)
        .filter(|(k, _)| k == key)
        .map(|(_, v)| v.into_owned())
        .collect()
}

async fn report<C: Control>(State(api): St<C>, RawQuery(query): RawQuery) -> Response {
    let format = query
        .as_deref()
        .and_then(|q| form_values(q.as_bytes(), "format").pop());
    if let Some(template) = format {
        // Weave's `/report?format=TEMPLATE`: the report through a Go text/template.
        let report = api.ctl.report();
        let rendered =
            tokio::task::spawn_blocking(move || super::template::render(&template, &report)).await;
        return match rendered {
            Ok(Ok(text)) => text.into_response(),
            Ok(Err(e)) => bad_request(&api, e.to_string()),
            Err(e) => text_error(StatusCode::INTERNAL_SERVER_ERROR, e),
        };
    }
    // Weave indented its report with four spaces; scripts diffing reports keep working.
    let mut body = Vec::new();
    let fmt = serde_json::ser::PrettyFormatter::with_indent(b"    ");
    let mut ser = serde_json::Serializer::with_formatter(&mut body, fmt);
    match api.ctl.report().serialize(&mut ser) {
        Ok(()) => {
            body.push(b'\n');
            ([(header::CONTENT_TYPE, "application/json")], body).into_response()
        }
        Err(e) => text_error(StatusCode::INTERNAL_SERVER_ERROR, e),
    }
}

#[derive(Serialize)]
struct Owned {
    owned: Vec<OwnedReport>,
}

async fn ip_all<C: Control>(State(api): St<C>) -> Response {
    let owned = Owned {
        owned: api.ctl.report().ipam.owned,
    };
    match serde_json::to_vec(&owned) {
        Ok(mut body) => {
            // Go's json.Encoder ends its output with a newline.
            body.push(b'\n');
            ([(header::CONTENT_TYPE, "application/json")], body).into_response()
        }
        Err(e) => text_error(StatusCode::INTERNAL_SERVER_ERROR, e),
    }
}

/// The CNI plugin's `POST /policy/admit/{namespace}/{name}/{ip}`: answered once the pod's
/// NetworkPolicy rules are in place (200), 404 when this node enforces no policy, 503 with
/// the reason when they cannot be in time (the ADD fails and the runtime retries).
async fn policy_admit<C: Control>(
    State(api): St<C>,
    Path((namespace, name, ip)): Path<(String, String, String)>,
) -> Response {
    let Ok(ip) = ip.parse::<Ipv4Addr>() else {
        return bad_request(&api, format!("{ip:?} is not an IPv4 address"));
    };
    if namespace.is_empty() || name.is_empty() || namespace.len() > 253 || name.len() > 253 {
        return bad_request(
            &api,
            "a pod's namespace and name, each 1 to 253 characters".into(),
        );
    }
    let key = crate::core::policy::Key::new(namespace, name);
    match api.ctl.policy_admit(key.clone(), ip).await {
        Ok(true) => format!("rules of pod {key} in place\n").into_response(),
        Ok(false) => text_error(
            StatusCode::NOT_FOUND,
            "this node enforces no network policy",
        ),
        Err(why) => text_error(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("network policy for pod {key} is not in place: {why}"),
        ),
    }
}

#[derive(serde::Deserialize)]
struct ExplainQuery {
    src: String,
    dst: String,
    #[serde(default)]
    port: u16,
    #[serde(default)]
    proto: String,
}

/// `GET /policy/explain?src=&dst=&port=&proto=`: `weft policy explain`.
async fn policy_explain<C: Control>(
    State(api): St<C>,
    axum::extract::Query(q): axum::extract::Query<ExplainQuery>,
) -> Response {
    let proto = if q.proto.is_empty() {
        "TCP"
    } else {
        q.proto.as_str()
    };
    match api.ctl.policy_explain(&q.src, &q.dst, proto, q.port) {
        None => text_error(
            StatusCode::NOT_FOUND,
            "this node enforces no network policy",
        ),
        Some(Ok(text)) => text.into_response(),
        Some(Err(crate::policy::ExplainError::BadRequest(m))) => bad_request(&api, m),
        Some(Err(crate::policy::ExplainError::NotFound(m))) => text_error(StatusCode::NOT_FOUND, m),
    }
}

/// `GET /policy/table`: the policy table this node wrote, in nft's syntax.
async fn policy_table<C: Control>(State(api): St<C>) -> Response {
    match api.ctl.policy_table() {
        Some(t) => t.into_response(),
        None => text_error(
            StatusCode::NOT_FOUND,
            "this node enforces no network policy",
        ),
    }
}

async fn default_subnet<C: Control>(State(api): St<C>) -> Response {
    api.ctl.report().ipam.default_subnet.into_response()
}

/// Checks a container id from the path; the error is the 400 message.
fn container_id(id: &str) -> Result<ContainerId, String> {
    ContainerId::parse(id).map_err(|e| e.to_string())
}

/// Parses `{ip}/{prefix}` path segments; the error is the 400 message.
fn ip_and_prefix(ip: &str, prefix: &str) -> Result<(Ipv4Addr, u8), String> {
    let addr: Ipv4Addr = ip
        .parse()
        .map_err(|_| format!("invalid IPv4 address {ip:?}"))?;
    let len = prefix
        .parse::<u8>()
        .ok()
        .filter(|l| *l <= 32)
        .ok_or_else(|| format!("invalid prefix length {prefix:?}: expected 0 to 32"))?;
    Ok((addr, len))
}

fn bad_request<C: Control>(api: &Api<C>, msg: String) -> Response {
    api.ctl.count_bad_request();
    text_error(StatusCode::BAD_REQUEST, msg)
}

/// Weave's answer to a successful allocation: `addr/prefix`, no newline.
fn allocated(r: Result<ipnet::Ipv4Net, IpApiError>) -> Response {
    match r {
        Ok(net) => net.to_string().into_response(),
        Err(e) => ip_error(e),
    }
}

/// `POST /ip/{id}` (Weave's), `?tentative` (weft's plugin: freed unless confirmed) and
/// `?confirm` (the plugin finished: keep it).
async fn ip_allocate<C: Control>(
    State(api): St<C>,
    Path(id): Path<String>,
    RawQuery(query): RawQuery,
) -> Response {
    let id = match container_id(&id) {
        Ok(id) => id,
        Err(msg) => return bad_request(&api, msg),
    };
    match query.as_deref() {
        None | Some("") => allocated(counted(
            &api,
            "allocate",
            api.ctl.allocate(id, api.wait).await,
        )),
        Some("tentative") => allocated(counted(
            &api,
            "allocate",
            api.ctl.allocate_tentative(id, api.wait).await,
        )),
        Some("confirm") => match api.ctl.confirm(id.clone()).await {
            Ok(Some(net)) => net.to_string().into_response(),
            Ok(None) => text_error(
                StatusCode::NOT_FOUND,
                format_args!("no address allocated to {id} (a tentative one expires unconfirmed)"),
            ),
            Err(e) => ip_error(e),
        },
        Some(other) => bad_request(
            &api,
            format!("unknown query {other:?}: expected none, `tentative` or `confirm`"),
        ),
    }
}

/// `POST /ip/{id}/{ip}/{prefix}` (Weave's), answered with the subnet's prefix;
/// `?tentative` as for `POST /ip/{id}` (confirmed with `POST /ip/{id}?confirm`).
async fn ip_allocate_in<C: Control>(
    State(api): St<C>,
    Path((id, ip, prefix)): Path<(String, String, String)>,
    RawQuery(query): RawQuery,
) -> Response {
    let tentative = match query.as_deref() {
        None | Some("") => false,
        Some("tentative") => true,
        Some(other) => {
            return bad_request(
                &api,
                format!("unknown query {other:?}: expected none or `tentative`"),
            )
        }
    };
    let (id, (addr, len)) = match (container_id(&id), ip_and_prefix(&ip, &prefix)) {
        (Ok(id), Ok(p)) => (id, p),
        (Err(msg), _) | (_, Err(msg)) => return bad_request(&api, msg),
    };
    let subnet = match ipnet::Ipv4Net::new(addr, len) {
        Ok(net) => net,
        Err(e) => return bad_request(&api, e.to_string()),
    };
    if subnet.network() != addr {
        return bad_request(
            &api,
            format!(
                "invalid subnet {subnet}: bits after the network prefix are not all zero (did you mean {}?)",
                subnet.trunc()
            ),
        );
    }
    allocated(counted(
        &api,
        "allocate",
        api.ctl.allocate_in(id, subnet, tentative, api.wait).await,
    ))
}

async fn ip_claim<C: Control>(
    State(api): St<C>,
    Path((id, ip, prefix)): Path<(String, String, String)>,
) -> Response {
    let (id, addr) = match (container_id(&id), ip_and_prefix(&ip, &prefix)) {
        (Ok(id), Ok((addr, _))) => (id, addr),
        (Err(msg), _) | (_, Err(msg)) => return bad_request(&api, msg),
    };
    match counted(&api, "claim", api.ctl.claim(id, addr, api.wait).await) {
        Ok(_) => StatusCode::NO_CONTENT.into_response(),
        Err(e) => ip_error(e),
    }
}

async fn ip_lookup<C: Control>(State(api): St<C>, Path(id): Path<String>) -> Response {
    let id = match container_id(&id) {
        Ok(id) => id,
        Err(msg) => return bad_request(&api, msg),
    };
    match api.ctl.lookup(&id) {
        Ok(Some(net)) => net.to_string().into_response(),
        Ok(None) => text_error(
            StatusCode::NOT_FOUND,
            format_args!("no address allocated to {id}"),
        ),
        Err(e) => ip_error(e),
    }
}

async fn ip_free<C: Control>(State(api): St<C>, Path(id): Path<String>) -> Response {
    let id = match container_id(&id) {
        Ok(id) => id,
        Err(msg) => return bad_request(&api, msg),
    };
    if id.as_str() == weft_contract::EXPOSE_ID {
        // The node's own overlay address (its gateway for local pods): freeing it would
        // hand it to the next pod while the node still uses it.
        return text_error(
            StatusCode::FORBIDDEN,
            format_args!(
                "{id} is this node's own overlay address and cannot be freed; `weft reset` releases everything the node holds"
            ),
        );
    }
    match counted(&api, "free", api.ctl.free(&id).await) {
        Ok(_) => StatusCode::NO_CONTENT.into_response(),
        Err(e) => ip_error(e),
    }
}

/// How an IPAM operation ended, as the `result` label of `weft_ipam_operations_total`.
fn op_result<T>(r: &Result<T, IpApiError>) -> &'static str {
    match r {
        Ok(_) => "ok",
        Err(IpApiError::NotReady(_)) => "not_ready",
        Err(IpApiError::Exhausted(_)) => "exhausted",
        Err(IpApiError::BadRequest(_)) => "bad_request",
        Err(IpApiError::Conflict(_)) => "conflict",
        Err(IpApiError::NotFound(_)) => "not_found",
        Err(IpApiError::Internal(_)) => "internal",
    }
}

/// Counts the operation, then passes its result on.
fn counted<C: Control, T>(
    api: &Api<C>,
    op: &'static str,
    r: Result<T, IpApiError>,
) -> Result<T, IpApiError> {
    api.ctl.telemetry().count_ipam_op(op, op_result(&r));
    r
}

/// Weave's `GET /ip/{id}/{ip}/{prefix}`: the container's address if it lies in that
/// subnet, with the subnet's prefix.
async fn ip_lookup_in<C: Control>(
    State(api): St<C>,
    Path((id, ip, prefix)): Path<(String, String, String)>,
) -> Response {
    let (id, (addr, len)) = match (container_id(&id), ip_and_prefix(&ip, &prefix)) {
        (Ok(id), Ok(p)) => (id, p),
        (Err(msg), _) | (_, Err(msg)) => return bad_request(&api, msg),
    };
    let subnet = match ipnet::Ipv4Net::new(addr, len) {
        Ok(net) => net.trunc(),
        Err(e) => return bad_request(&api, e.to_string()),
    };
    match api.ctl.lookup(&id) {
        Ok(Some(net)) if subnet.contains(&net.addr()) => ipnet::Ipv4Net::new(net.addr(), len)
            .expect("valid prefix")
            .to_string()
            .into_response(),
        Ok(_) => text_error(
            StatusCode::NOT_FOUND,
            format_args!("no address in {subnet} allocated to {id}"),
        ),
        Err(e) => ip_error(e),
    }
}

/// Weave's `DELETE /ip/{id}/{ip}`: frees that address of the container (a container
/// holds one address in weft, so it is the container's address or nothing).
async fn ip_free_addr<C: Control>(
    State(api): St<C>,
    Path((id, ip)): Path<(String, String)>,
) -> Response {
    let id = match container_id(&id) {
        Ok(id) => id,
        Err(msg) => return bad_request(&api, msg),
    };
    let addr: Ipv4Addr = match ip.parse() {
        Ok(a) => a,
        Err(_) => return bad_request(&api, format!("invalid IPv4 address {ip:?}")),
    };
    if id.as_str() == weft_contract::EXPOSE_ID {
        return text_error(
            StatusCode::FORBIDDEN,
            format_args!("{id} is this node's own overlay address and cannot be freed"),
        );
    }
    match api.ctl.lookup(&id) {
        Ok(Some(net)) if net.addr() == addr => {
            match counted(&api, "free", api.ctl.free(&id).await) {
                Ok(_) => StatusCode::NO_CONTENT.into_response(),
                Err(e) => ip_error(e),
            }
        }
        Ok(_) => text_error(
            StatusCode::NOT_FOUND,
            format_args!("{addr} is not allocated to {id}"),
        ),
        Err(e) => ip_error(e),
    }
}

/// The `peer` fields of a `/connect` or `/forget` form, parsed; the error is the 400.
fn peer_targets(body: &[u8]) -> Result<Vec<crate::config::PeerTarget>, String> {
    form_values(body, "peer")
        .iter()
        .map(|p| {
            crate::config::parse_peer(p, crate::config::DEFAULT_CONTROL_PORT)
                .map_err(|e| e.to_string())
        })
        .collect()
}

/// Weave's `POST /connect` (form: `peer=HOST[:PORT]`..., `replace=true`).
async fn connect<C: Control>(State(api): St<C>, body: axum::body::Bytes) -> Response {
    let targets = match peer_targets(&body) {
        Ok(t) => t,
        Err(msg) => return bad_request(&api, msg),
    };
    let replace = form_values(&body, "replace")
        .last()
        .is_some_and(|v| v == "true");
    api.ctl.connect(targets, replace);
    StatusCode::OK.into_response()
}

/// Weave's `POST /forget` (form: `peer=HOST[:PORT]`...).
async fn forget<C: Control>(State(api): St<C>, body: axum::body::Bytes) -> Response {
    let targets = match peer_targets(&body) {
        Ok(t) if !t.is_empty() => t,
        Ok(_) => return bad_request(&api, "no peer given: expected peer=HOST[:PORT]".into()),
        Err(msg) => return bad_request(&api, msg),
    };
    let n = api.ctl.forget(targets);
    (StatusCode::OK, format!("{n} target(s) forgotten\n")).into_response()
}

/// `GET`/`POST /expose`: the node's own overlay address, as Weave's `weave expose`
/// printed it (`192.168.0.1/16`).
async fn expose<C: Control>(State(api): St<C>) -> Response {
    allocated(counted(&api, "expose", api.ctl.expose(api.wait).await))
}

/// Weave's `weave hide`: refused, as the node's address carries its own traffic and the
/// masquerade of outside traffic into the overlay.
async fn unexpose<C: Control>(State(_api): St<C>) -> Response {
    text_error(
        StatusCode::FORBIDDEN,
        "weft keeps every node exposed: its overlay address carries the node's traffic to pods and the masquerade of outside traffic into the overlay; `weft reset` releases it",
    )
}

/// `POST /cni/observation`: the CNI plugin's report of one command (it cannot keep
/// metrics itself: it lives for one command).
async fn cni_observation<C: Control>(State(api): St<C>, body: axum::body::Bytes) -> Response {
    if body.len() > 1024 {
        return bad_request(&api, "observation over 1024 bytes".into());
    }
    let obs: super::telemetry::CniObservation = match serde_json::from_slice(&body) {
        Ok(o) => o,
        Err(e) => return bad_request(&api, format!("invalid observation: {e}")),
    };
    match obs.result_label() {
        Ok(result) => {
            api.ctl
                .telemetry()
                .observe_cni(&obs.command, &result, obs.seconds);
            StatusCode::NO_CONTENT.into_response()
        }
        Err(msg) => bad_request(&api, msg),
    }
}

/// weft's `DELETE /peer/{name}/key`: forget the key a peer name is bound to.
async fn peer_forget_key<C: Control>(State(api): St<C>, Path(name): Path<String>) -> Response {
    if name.is_empty() || name.len() > 253 || name.chars().any(|c| c.is_control()) {
        return bad_request(
            &api,
            format!("{name:?} is neither a peer name nor a Node name"),
        );
    }
    match api.ctl.forget_key(&name).await {
        Ok(n) => (
            StatusCode::OK,
            format!("{n} key binding(s) of {name} forgotten\n"),
        )
            .into_response(),
        Err(e) => ip_error(e),
    }
}

/// Weave's `DELETE /peer/{name}`: answers "N IPs taken over from NAME". `name` is a peer
/// name or a nickname (the Kubernetes Node name), as Weave's rmpeer took them.
async fn peer_remove<C: Control>(State(api): St<C>, Path(name): Path<String>) -> Response {
    if name.is_empty() || name.len() > 253 || name.chars().any(|c| c.is_control()) {
        return bad_request(
            &api,
            format!("{name:?} is neither a peer name nor a Node name"),
        );
    }
    match counted(&api, "rmpeer", api.ctl.rmpeer(&name).await) {
        Ok(n) => (StatusCode::OK, format!("{n} IPs taken over from {name}\n")).into_response(),
        Err(e) => ip_error(e),
    }
}

async fn metrics<C: Control>(State(ctl): State<Arc<C>>) -> Response {
    (
        [(header::CONTENT_TYPE, METRICS_CONTENT_TYPE)],
        render_metrics(
            &ctl.report(),
            ctl.telemetry(),
            super::metrics::ProcessStats::read(),
        ),
    )
        .into_response()
}

/// A scriptable [`Control`] for the API's and the CLI's tests.
#[cfg(test)]
pub(crate) mod fake {
    use crate::api::report::{Control, IpApiError, OwnedReport, Report};
    use ipnet::Ipv4Net;
    use std::collections::BTreeMap;
    use std::future::Future;
    use std::net::Ipv4Addr;
    use std::sync::Mutex;
    use std::time::Duration;
    use weft_contract::ContainerId;

    /// Hands out 192.168.0.1/16, .2, ... in order; ids starting with `fail-<kind>` fail with
    /// that error kind, so every error mapping can be driven from a test.
    pub(crate) struct FakeControl {
        pub report: Mutex<Report>,
        pub allocs: Mutex<BTreeMap<String, Ipv4Net>>,
        pub ready: Mutex<bool>,
        pub capacity: usize,
        pub last_wait: Mutex<Option<Duration>>,
        pub last_subnet: Mutex<Option<Ipv4Net>>,
        pub tentative: Mutex<std::collections::BTreeSet<String>>,
        pub bad_requests: std::sync::atomic::AtomicU64,
        pub telemetry: crate::api::telemetry::Telemetry,
        /// Targets added by `connect` (in order), as the router's operator targets.
        pub targets: Mutex<Vec<String>>,
    }

    impl FakeControl {
        pub(crate) fn new(report: Report) -> Self {
            FakeControl {
                ready: Mutex::new(report.ready),
                report: Mutex::new(report),
                allocs: Mutex::new(BTreeMap::new()),
                capacity: 3,
                last_wait: Mutex::new(None),
                last_subnet: Mutex::new(None),
                tentative: Mutex::new(Default::default()),
                bad_requests: Default::default(),
                telemetry: Default::default(),
                targets: Mutex::new(Vec::new()),
            }
        }

        fn scripted_error(id: &str) -> Option<IpApiError> {
            let kind = id.strip_prefix("fail-")?;
            let msg = format!("scripted {kind}");
            Some(match kind {
                "notready" => IpApiError::NotReady(msg),
                "exhausted" => IpApiError::Exhausted(msg),
                "bad" => IpApiError::BadRequest(msg),
                "conflict" => IpApiError::Conflict(msg),
                "notfound" => IpApiError::NotFound(msg),
                _ => IpApiError::Internal(msg),
            })
        }

        fn take(
            &self,
            id: ContainerId,
            wait: Duration,
            pick: impl FnOnce(&BTreeMap<String, Ipv4Net>) -> Result<Ipv4Net, IpApiError>,
        ) -> Result<Ipv4Net, IpApiError> {
            *self.last_wait.lock().unwrap() = Some(wait);
            let id = id.into_string();
            if let Some(e) = Self::scripted_error(&id) {
                return Err(e);
            }
            if !*self.ready.lock().unwrap() {
                return Err(IpApiError::NotReady(format!(
                    "IPAM not ready after {}s",
                    wait.as_secs()
                )));
            }
            let mut allocs = self.allocs.lock().unwrap();
            if let Some(net) = allocs.get(&id) {
                return Ok(*net);
            }
            let net = pick(&allocs)?;
            allocs.insert(id, net);
            Ok(net)
        }

        fn next_free(&self, allocs: &BTreeMap<String, Ipv4Net>) -> Result<Ipv4Net, IpApiError> {
            (1..=self.capacity as u32)
                .map(|i| Ipv4Net::new(Ipv4Addr::from(0xC0A8_0000 + i), 16).unwrap())
                .find(|n| !allocs.values().any(|a| a == n))
                .ok_or_else(|| IpApiError::Exhausted("no free addresses".into()))
        }
    }

    impl Control for FakeControl {
        fn telemetry(&self) -> &crate::api::telemetry::Telemetry {
            &self.telemetry
        }

        fn connect(&self, targets: Vec<crate::config::PeerTarget>, replace: bool) {
            let mut t = self.targets.lock().unwrap();
            if replace {
                t.clear();
            }
            for target in targets {
                let s = target.to_string();
                if !t.contains(&s) {
                    t.push(s);
                }
            }
        }

        fn forget(&self, targets: Vec<crate::config::PeerTarget>) -> usize {
            let mut t = self.targets.lock().unwrap();
            let before = t.len();
            t.retain(|x| !targets.iter().any(|f| f.to_string() == *x));
            before - t.len()
        }

        async fn expose(&self, wait: Duration) -> Result<Ipv4Net, IpApiError> {
            let id = ContainerId::parse(weft_contract::EXPOSE_ID).expect("valid id");
            self.take(id, wait, |a| self.next_free(a))
        }

        fn report(&self) -> Report {
            let mut r = self.report.lock().unwrap().clone();
            r.ipam.owned = self
                .allocs
                .lock()
                .unwrap()
                .iter()
                .map(|(id, net)| OwnedReport {
                    containerid: id.clone(),
                    addrs: vec![net.to_string()],
                    tentative: self.tentative.lock().unwrap().contains(id),
                })
                .collect();
            r
        }

        fn allocate(
            &self,
            container_id: ContainerId,
            wait: Duration,
        ) -> impl Future<Output = Result<Ipv4Net, IpApiError>> + Send {
            let r = self.take(container_id, wait, |a| self.next_free(a));
            async move { r }
        }

        fn allocate_tentative(
            &self,
            container_id: ContainerId,
            wait: Duration,
        ) -> impl Future<Output = Result<Ipv4Net, IpApiError>> + Send {
            self.tentative
                .lock()
                .unwrap()
                .insert(container_id.to_string());
            self.allocate(container_id, wait)
        }

        async fn forget_key(&self, _name: &str) -> Result<u64, IpApiError> {
            Ok(1)
        }

        async fn confirm(&self, container_id: ContainerId) -> Result<Option<Ipv4Net>, IpApiError> {
            self.tentative.lock().unwrap().remove(container_id.as_str());
            self.lookup(&container_id)
        }

        fn allocate_in(
            &self,
            container_id: ContainerId,
            subnet: Ipv4Net,
            tentative: bool,
            wait: Duration,
        ) -> impl Future<Output = Result<Ipv4Net, IpApiError>> + Send {
            *self.last_subnet.lock().unwrap() = Some(subnet);
            if tentative {
                self.tentative
                    .lock()
                    .unwrap()
                    .insert(container_id.to_string());
            }
            let r = self.take(container_id, wait, |a| {
                subnet
                    .hosts()
                    .map(|h| Ipv4Net::new(h, subnet.prefix_len()).unwrap())
                    .find(|n| !a.values().any(|x| x == n))
                    .ok_or_else(|| IpApiError::Exhausted(format!("{subnet} is full")))
            });
            async move { r }
        }

        fn claim(
            &self,
            container_id: ContainerId,
            addr: Ipv4Addr,
            wait: Duration,
        ) -> impl Future<Output = Result<Ipv4Net, IpApiError>> + Send {
            let id = container_id.to_string();
            let r = self.take(container_id, wait, |a| {
                let net = Ipv4Net::new(addr, 16).unwrap();
                match a.iter().find(|(_, n)| n.addr() == addr) {
                    Some((holder, _)) if *holder != id => Err(IpApiError::Conflict(format!(
                        "address {addr} is already owned by {holder}"
                    ))),
                    _ => Ok(net),
                }
            });
            async move { r }
        }

        fn lookup(&self, container_id: &ContainerId) -> Result<Option<Ipv4Net>, IpApiError> {
            if let Some(e) = Self::scripted_error(container_id.as_str()) {
                return Err(e);
            }
            Ok(self
                .allocs
                .lock()
                .unwrap()
                .get(container_id.as_str())
                .copied())
        }

        async fn free(&self, container_id: &ContainerId) -> Result<Option<Ipv4Addr>, IpApiError> {
            if let Some(e) = Self::scripted_error(container_id.as_str()) {
                return Err(e);
            }
            Ok(self
                .allocs
                .lock()
                .unwrap()
                .remove(container_id.as_str())
                .map(|n| n.addr()))
        }

        fn count_bad_request(&self) {
            self.bad_requests
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }

        async fn rmpeer(&self, peer_name: &str) -> Result<u64, IpApiError> {
            // The fake owns 16 addresses of every peer except 02:..:ff, which is "itself";
            // it knows the nicknames n1 to n3 only.
            if peer_name == "02:00:00:00:00:ff" {
                return Err(IpApiError::Conflict(
                    "cannot remove this peer itself".into(),
                ));
            }
            if !peer_name.starts_with("02:") && !["n1", "n2", "n3"].contains(&peer_name) {
                return Err(IpApiError::NotFound(format!("no peer named {peer_name:?}")));
            }
            Ok(16)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::fake::FakeControl;
    use super::*;
    use crate::api::status::tests::sample_report;
    use axum::body::Body;
    use axum::http::{Method, Request};
    use tower::ServiceExt;

    const WAIT: Duration = Duration::from_millis(1234);

    fn setup(ready: bool) -> (Arc<FakeControl>, Router) {
        let mut r = sample_report();
        r.ready = ready;
        let ctl = Arc::new(FakeControl::new(r));
        let router = api_router_with_wait(ctl.clone(), WAIT);
        (ctl, router)
    }

    struct Answer {
        code: StatusCode,
        content_type: Option<String>,
        body: String,
    }

    async fn call(router: &Router, method: Method, uri: &str) -> Answer {
        call_with(router, method, uri, "").await
    }

    async fn call_with(router: &Router, method: Method, uri: &str, body: &str) -> Answer {
        let req = Request::builder()
            .method(method)
            .uri(uri)
            .body(Body::from(body.to_string()))
            .unwrap();
        let resp = router.clone().oneshot(req).await.unwrap();
        let code = resp.status();
        let content_type = resp
            .headers()
            .get(header::CONTENT_TYPE)
            .map(|v| v.to_str().unwrap().to_string());
        let bytes = axum::body::to_bytes(resp.into_body(), 1 << 20)
            .await
            .unwrap();
        Answer {
            code,
            content_type,
            body: String::from_utf8(bytes.to_vec()).unwrap(),
        }
    }

    async fn get_(router: &Router, uri: &str) -> Answer {
        call(router, Method::GET, uri).await
    }

    #[tokio::test]
    async fn live_page_is_self_contained_html() {
        let (_ctl, router) = setup(true);
        let a = get_(&router, "/").await;
        assert_eq!(a.code, StatusCode::OK);
        assert_eq!(a.content_type.as_deref(), Some("text/html; charset=utf-8"));
        let page = a.body.as_str();
        assert!(page.starts_with("<!DOCTYPE html>"), "{}", &page[..40]);
        assert!(page.len() < 32 * 1024, "{} bytes", page.len());
        // It polls the report with a relative URL (works behind `kubectl proxy` too).
        assert!(page.contains("fetch(\"report\""));
        // Nothing from elsewhere: no src= at all, href= only to data: URLs, no CSS
        // url()/@import, and the one absolute URL is the SVG namespace name (never fetched).
        let lower = page.to_ascii_lowercase();
        assert!(!lower.contains("src="), "the page loads something");
        for (i, _) in lower.match_indices("href=") {
            let value = lower[i + 5..].trim_start_matches(['"', '\'']);
            assert!(
                value.starts_with("data:"),
                "external href: {}",
                &page[i..i + 60]
            );
        }
        assert!(!lower.contains("url(") && !lower.contains("@import"));
        for scheme in ["http://", "https://"] {
            for (i, _) in lower.match_indices(scheme) {
                assert!(
                    lower[i..].starts_with("http://www.w3.org/2000/svg\""),
                    "external reference: {}",
                    &page[i.saturating_sub(20)..i + 40]
                );
            }
        }
        assert!(!lower.contains("eval("), "no eval");
        assert!(
            !lower.contains(".innerhtml"),
            "report text is set as text, never as HTML"
        );
        // And the browser is told to enforce it.
        let req = Request::builder().uri("/").body(Body::empty()).unwrap();
        let resp = router.clone().oneshot(req).await.unwrap();
        let csp = resp.headers()[header::CONTENT_SECURITY_POLICY]
            .to_str()
            .unwrap();
        assert!(csp.starts_with("default-src 'none';"), "{csp}");
        assert!(csp.contains("connect-src 'self'") && !csp.contains("unsafe-eval"));
    }

    #[tokio::test]
    async fn status_is_503_until_ready_with_the_same_text() {
        let (ctl, router) = setup(false);
        let a = get_(&router, "/status").await;
        assert_eq!(a.code, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(a.body, status::render_status(&ctl.report()));
        assert_eq!(a.content_type.as_deref(), Some("text/plain; charset=utf-8"));

        ctl.report.lock().unwrap().ready = true;
        let a = get_(&router, "/status").await;
        assert_eq!(a.code, StatusCode::OK);
        assert!(
            a.body
                .starts_with("        Version: 0.1.0 (version check update disabled)\n"),
            "{}",
            a.body
        );
    }

    #[tokio::test]
    async fn status_subpages() {
        let (ctl, router) = setup(true);
        let r = ctl.report();
        for (page, want) in [
            ("peers", status::render_peers(&r)),
            ("connections", status::render_connections(&r)),
            ("ipam", status::render_ipam(&r)),
            ("targets", status::render_targets(&r)),
            ("routes", status::render_routes(&r)),
        ] {
            let a = get_(&router, &format!("/status/{page}")).await;
            assert_eq!(a.code, StatusCode::OK, "{page}");
            assert_eq!(a.body, want, "{page}");
            assert!(!a.body.is_empty(), "{page}");
        }
        let a = get_(&router, "/status/dns").await;
        assert_eq!(a.code, StatusCode::NOT_FOUND);
        assert_eq!(a.body, "404 page not found\n");
    }

    #[tokio::test]
    async fn status_subpages_say_503_until_ready() {
        let (ctl, router) = setup(false);
        for page in ["peers", "connections", "ipam", "targets", "routes"] {
            let a = get_(&router, &format!("/status/{page}")).await;
            assert_eq!(a.code, StatusCode::SERVICE_UNAVAILABLE, "{page}");
        }
        ctl.report.lock().unwrap().ready = true;
        assert_eq!(get_(&router, "/status/ipam").await.code, StatusCode::OK);
    }

    #[tokio::test]
    async fn report_format_renders_a_go_template() {
        let (_ctl, router) = setup(true);
        let a = get_(&router, "/report?format=%7B%7B.Router.Name%7D%7D").await;
        assert_eq!(
            (a.code, a.body.as_str()),
            (StatusCode::OK, "02:77:76:00:00:01")
        );
        let a = get_(
            &router,
            "/report?format=%7B%7Brange%20.Router.Peers%7D%7D%7B%7B.NickName%7D%7D,%7B%7Bend%7D%7D",
        )
        .await;
        assert_eq!(a.body, "n1,n2,");
        let a = get_(&router, "/report?format=%7B%7B.Router.Name").await;
        assert_eq!(a.code, StatusCode::BAD_REQUEST);
        assert!(a.body.contains("does not parse"), "{}", a.body);
    }

    #[tokio::test]
    async fn connect_and_forget_change_the_operators_targets() {
        let (ctl, router) = setup(true);
        let a = call_with(
            &router,
            Method::POST,
            "/connect",
            "peer=10.0.0.7&peer=10.0.0.8%3A7000",
        )
        .await;
        assert_eq!(a.code, StatusCode::OK);
        assert_eq!(
            *ctl.targets.lock().unwrap(),
            ["10.0.0.7:6783", "10.0.0.8:7000"]
        );
        let a = call_with(
            &router,
            Method::POST,
            "/connect",
            "peer=10.0.0.9&replace=true",
        )
        .await;
        assert_eq!(a.code, StatusCode::OK);
        assert_eq!(*ctl.targets.lock().unwrap(), ["10.0.0.9:6783"]);
        let a = call_with(&router, Method::POST, "/forget", "peer=10.0.0.9").await;
        assert_eq!(
            (a.code, a.body.as_str()),
            (StatusCode::OK, "1 target(s) forgotten\n")
        );
        assert!(ctl.targets.lock().unwrap().is_empty());
        let a = call_with(&router, Method::POST, "/connect", "peer=10.0.0.1/24").await;
        assert_eq!(a.code, StatusCode::BAD_REQUEST);
        let a = call_with(&router, Method::POST, "/forget", "").await;
        assert_eq!(a.code, StatusCode::BAD_REQUEST);
    }

    #[tokio::test]
    async fn expose_answers_the_nodes_address_and_hide_is_refused() {
        let (_ctl, router) = setup(true);
        let a = call(&router, Method::POST, "/expose").await;
        assert_eq!(
            (a.code, a.body.as_str()),
            (StatusCode::OK, "192.168.0.1/16")
        );
        let a = get_(&router, "/expose").await;
        assert_eq!(a.body, "192.168.0.1/16");
        let a = call(&router, Method::DELETE, "/expose").await;
        assert_eq!(a.code, StatusCode::FORBIDDEN);
    }

    #[tokio::test]
    async fn lookup_in_a_subnet_and_free_of_one_address() {
        let (_ctl, router) = setup(true);
        let a = call(&router, Method::POST, "/ip/c1").await;
        assert_eq!(a.body, "192.168.0.1/16");
        let a = get_(&router, "/ip/c1/192.168.0.0/24").await;
        assert_eq!(
            (a.code, a.body.as_str()),
            (StatusCode::OK, "192.168.0.1/24")
        );
        let a = get_(&router, "/ip/c1/10.0.0.0/8").await;
        assert_eq!(a.code, StatusCode::NOT_FOUND);
        let a = call(&router, Method::DELETE, "/ip/c1/192.168.0.9").await;
        assert_eq!(a.code, StatusCode::NOT_FOUND);
        let a = call(&router, Method::DELETE, "/ip/c1/192.168.0.1").await;
        assert_eq!(a.code, StatusCode::NO_CONTENT);
        assert_eq!(get_(&router, "/ip/c1").await.code, StatusCode::NOT_FOUND);
        let a = call(&router, Method::DELETE, "/ip/weave:expose/192.168.0.1").await;
        assert_eq!(a.code, StatusCode::FORBIDDEN);
    }

    #[tokio::test]
    async fn ipam_operations_and_cni_observations_become_metrics() {
        let (ctl, router) = setup(true);
        call(&router, Method::POST, "/ip/c1").await;
        call(&router, Method::POST, "/ip/fail-exhausted").await;
        call(&router, Method::DELETE, "/ip/c1").await;
        let a = call_with(
            &router,
            Method::POST,
            "/cni/observation",
            r#"{"command":"ADD","result":"error","code":11,"seconds":0.25}"#,
        )
        .await;
        assert_eq!(a.code, StatusCode::NO_CONTENT);
        let a = call_with(
            &router,
            Method::POST,
            "/cni/observation",
            r#"{"command":"EVIL","result":"ok","seconds":0.25}"#,
        )
        .await;
        assert_eq!(a.code, StatusCode::BAD_REQUEST);
        let text = render_metrics(&ctl.report(), ctl.telemetry(), None);
        for want in [
            "weft_ipam_operations_total{op=\"allocate\",result=\"ok\"} 1",
            "weft_ipam_operations_total{op=\"allocate\",result=\"exhausted\"} 1",
            "weft_ipam_operations_total{op=\"free\",result=\"ok\"} 1",
            "weft_cni_request_duration_seconds_count{command=\"ADD\",result=\"error_11\"} 1",
        ] {
            assert!(text.contains(want), "{want} in\n{text}");
        }
        assert!(!text.contains("EVIL"));
    }

    #[tokio::test]
    async fn report_is_pretty_pascal_case_json() {
        let (ctl, router) = setup(true);
        let a = get_(&router, "/report").await;
        assert_eq!(a.code, StatusCode::OK);
        assert_eq!(a.content_type.as_deref(), Some("application/json"));
        assert!(
            a.body.starts_with("{\n    \"Ready\": true,\n"),
            "{}",
            a.body
        );
        let back: Report = serde_json::from_str(&a.body).unwrap();
        assert_eq!(back, ctl.report());
    }

    #[tokio::test]
    async fn allocate_lookup_list_and_free() {
        let (ctl, router) = setup(true);
        let a = call(&router, Method::POST, "/ip/pod-a").await;
        assert_eq!(
            (a.code, a.body.as_str()),
            (StatusCode::OK, "192.168.0.1/16")
        );
        assert_eq!(*ctl.last_wait.lock().unwrap(), Some(WAIT));
        // Idempotent: the same container gets the same address.
        let a = call(&router, Method::POST, "/ip/pod-a").await;
        assert_eq!(a.body, "192.168.0.1/16");
        let a = call(&router, Method::POST, "/ip/pod-b").await;
        assert_eq!(a.body, "192.168.0.2/16");

        let a = get_(&router, "/ip/pod-b").await;
        assert_eq!(
            (a.code, a.body.as_str()),
            (StatusCode::OK, "192.168.0.2/16")
        );

        let a = get_(&router, "/ip").await;
        assert_eq!(a.code, StatusCode::OK);
        assert_eq!(a.content_type.as_deref(), Some("application/json"));
        assert_eq!(
            a.body,
            "{\"owned\":[{\"containerid\":\"pod-a\",\"addrs\":[\"192.168.0.1/16\"]},\
             {\"containerid\":\"pod-b\",\"addrs\":[\"192.168.0.2/16\"]}]}\n"
        );

        let a = call(&router, Method::DELETE, "/ip/pod-b").await;
        assert_eq!((a.code, a.body.as_str()), (StatusCode::NO_CONTENT, ""));
        let a = call(&router, Method::DELETE, "/ip/pod-b").await;
        assert_eq!(a.code, StatusCode::NO_CONTENT, "free is idempotent");

        let a = get_(&router, "/ip/pod-b").await;
        assert_eq!(a.code, StatusCode::NOT_FOUND);
        assert_eq!(a.body, "no address allocated to pod-b\n");
        let a = get_(&router, "/ip").await;
        assert_eq!(
            a.body,
            "{\"owned\":[{\"containerid\":\"pod-a\",\"addrs\":[\"192.168.0.1/16\"]}]}\n"
        );
    }

    #[tokio::test]
    async fn percent_encoded_ids_are_decoded() {
        let (ctl, router) = setup(true);
        let a = call(&router, Method::POST, "/ip/weave%3Aexpose").await;
        assert_eq!(a.code, StatusCode::OK);
        assert!(ctl.allocs.lock().unwrap().contains_key("weave:expose"));
    }

    #[tokio::test]
    async fn tentative_allocations_are_confirmed_by_query() {
        let (ctl, router) = setup(true);
        let a = call(&router, Method::POST, "/ip/pod-a?tentative").await;
        assert_eq!(
            (a.code, a.body.as_str()),
            (StatusCode::OK, "192.168.0.1/16")
        );
        assert!(ctl.tentative.lock().unwrap().contains("pod-a"));
        let a = call(&router, Method::POST, "/ip/pod-a?confirm").await;
        assert_eq!(
            (a.code, a.body.as_str()),
            (StatusCode::OK, "192.168.0.1/16")
        );
        assert!(ctl.tentative.lock().unwrap().is_empty());
        let a = call(&router, Method::POST, "/ip/pod-z?confirm").await;
        assert_eq!(a.code, StatusCode::NOT_FOUND);
        let a = call(&router, Method::POST, "/ip/pod-a?bogus").await;
        assert_eq!(a.code, StatusCode::BAD_REQUEST);
    }

    #[tokio::test]
    async fn the_nodes_own_address_cannot_be_freed() {
        let (ctl, router) = setup(true);
        let a = call(&router, Method::POST, "/ip/weave:expose").await;
        assert_eq!(a.code, StatusCode::OK);
        for path in ["/ip/weave:expose", "/ip/weave%3Aexpose"] {
            let a = call(&router, Method::DELETE, path).await;
            assert_eq!(a.code, StatusCode::FORBIDDEN, "{path}");
            assert!(a.body.contains("cannot be freed"), "{}", a.body);
        }
        assert!(ctl.allocs.lock().unwrap().contains_key("weave:expose"));
    }

    #[tokio::test]
    async fn allocate_in_subnet() {
        let (ctl, router) = setup(true);
        let a = call(&router, Method::POST, "/ip/pod-a/10.1.2.0/24").await;
        assert_eq!((a.code, a.body.as_str()), (StatusCode::OK, "10.1.2.1/24"));
        assert_eq!(
            *ctl.last_subnet.lock().unwrap(),
            Some("10.1.2.0/24".parse().unwrap())
        );

        let a = call(&router, Method::POST, "/ip/pod-b/10.1.2.5/24").await;
        assert_eq!(a.code, StatusCode::BAD_REQUEST);
        assert!(a.body.contains("not all zero"), "{}", a.body);
        assert!(a.body.contains("10.1.2.0/24"), "{}", a.body);

        let a = call(&router, Method::POST, "/ip/pod-b/10.1.2.0/33").await;
        assert_eq!(a.code, StatusCode::BAD_REQUEST);
        assert_eq!(a.body, "invalid prefix length \"33\": expected 0 to 32\n");

        let a = call(&router, Method::POST, "/ip/pod-b/10.1.2/24").await;
        assert_eq!(a.code, StatusCode::BAD_REQUEST);
        assert_eq!(a.body, "invalid IPv4 address \"10.1.2\"\n");
        assert!(ctl.tentative.lock().unwrap().is_empty());
    }

    #[tokio::test]
    async fn allocate_in_subnet_tentatively() {
        let (ctl, router) = setup(true);
        let a = call(&router, Method::POST, "/ip/pod-a/10.1.2.0/24?tentative").await;
        assert_eq!((a.code, a.body.as_str()), (StatusCode::OK, "10.1.2.1/24"));
        assert!(ctl.tentative.lock().unwrap().contains("pod-a"));
        // GET /ip marks it, so that CNI GC leaves an ADD under way alone.
        let all = get_(&router, "/ip").await;
        assert!(
            all.body
                .contains(r#"{"containerid":"pod-a","addrs":["10.1.2.1/24"],"tentative":true}"#),
            "{}",
            all.body
        );
        let a = call(&router, Method::POST, "/ip/pod-a?confirm").await;
        assert_eq!(a.code, StatusCode::OK);
        assert!(ctl.tentative.lock().unwrap().is_empty());
        assert!(!get_(&router, "/ip").await.body.contains("tentative"));
        let a = call(&router, Method::POST, "/ip/pod-b/10.1.2.0/24?confirm").await;
        assert_eq!(a.code, StatusCode::BAD_REQUEST);
        assert!(a.body.contains("unknown query"), "{}", a.body);
    }

    #[tokio::test]
    async fn claim() {
        let (ctl, router) = setup(true);
        let a = call(&router, Method::PUT, "/ip/pod-a/192.168.7.7/16").await;
        assert_eq!((a.code, a.body.as_str()), (StatusCode::NO_CONTENT, ""));
        assert_eq!(
            ctl.allocs.lock().unwrap().get("pod-a"),
            Some(&"192.168.7.7/16".parse().unwrap())
        );
        assert_eq!(*ctl.last_wait.lock().unwrap(), Some(WAIT));

        let a = call(&router, Method::PUT, "/ip/pod-b/192.168.7.7/16").await;
        assert_eq!(a.code, StatusCode::CONFLICT);
        assert_eq!(a.body, "address 192.168.7.7 is already owned by pod-a\n");

        let a = call(&router, Method::PUT, "/ip/pod-b/192.168.7.x/16").await;
        assert_eq!(a.code, StatusCode::BAD_REQUEST);
        let a = call(&router, Method::PUT, "/ip/pod-b/192.168.7.8/-1").await;
        assert_eq!(a.code, StatusCode::BAD_REQUEST);
    }

    #[tokio::test]
    async fn not_ready_is_503_and_exhausted_is_507() {
        let (ctl, router) = setup(false);
        let a = call(&router, Method::POST, "/ip/pod-a").await;
        assert_eq!(a.code, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(a.body, "IPAM not ready after 1s\n");

        *ctl.ready.lock().unwrap() = true;
        for id in ["a", "b", "c"] {
            let a = call(&router, Method::POST, &format!("/ip/{id}")).await;
            assert_eq!(a.code, StatusCode::OK);
        }
        // Not "try again later": the plugin reports exhaustion as exhaustion.
        let a = call(&router, Method::POST, "/ip/d").await;
        assert_eq!(a.code, StatusCode::INSUFFICIENT_STORAGE);
        assert_eq!(a.body, "no free addresses\n");
    }

    #[tokio::test]
    async fn every_error_kind_maps_to_its_status_code() {
        let (_ctl, router) = setup(true);
        for (kind, code) in [
            ("notready", StatusCode::SERVICE_UNAVAILABLE),
            ("exhausted", StatusCode::INSUFFICIENT_STORAGE),
            ("bad", StatusCode::BAD_REQUEST),
            ("conflict", StatusCode::CONFLICT),
            ("notfound", StatusCode::NOT_FOUND),
            ("internal", StatusCode::INTERNAL_SERVER_ERROR),
        ] {
            for (method, uri) in [
                (Method::POST, format!("/ip/fail-{kind}")),
                (Method::POST, format!("/ip/fail-{kind}/10.0.0.0/8")),
                (Method::PUT, format!("/ip/fail-{kind}/10.0.0.1/8")),
                (Method::GET, format!("/ip/fail-{kind}")),
                (Method::DELETE, format!("/ip/fail-{kind}")),
            ] {
                let a = call(&router, method.clone(), &uri).await;
                assert_eq!(a.code, code, "{method} {uri}");
                assert_eq!(a.body, format!("scripted {kind}\n"), "{method} {uri}");
                assert_eq!(
                    a.content_type.as_deref(),
                    Some("text/plain; charset=utf-8"),
                    "{method} {uri}"
                );
            }
        }
    }

    #[tokio::test]
    async fn container_ids_are_validated() {
        let (ctl, router) = setup(true);
        let long = "x".repeat(weft_contract::MAX_CONTAINER_ID_LEN + 1);
        let chars = "only ASCII letters, digits";
        for (method, uri, why) in [
            (Method::POST, "/ip/a%20b".to_string(), chars),
            (Method::POST, "/ip/a%0Ab".to_string(), chars),
            (Method::GET, "/ip/a%09b".to_string(), chars),
            (Method::DELETE, "/ip/a%7Fb".to_string(), chars),
            (Method::POST, "/ip/a%2Fb".to_string(), chars),
            (Method::POST, format!("/ip/{long}"), "longer than 255"),
            (
                Method::PUT,
                format!("/ip/{long}/10.0.0.1/8"),
                "longer than 255",
            ),
            (Method::POST, "/ip/%20/10.0.0.0/8".to_string(), chars),
        ] {
            let a = call(&router, method.clone(), &uri).await;
            assert_eq!(a.code, StatusCode::BAD_REQUEST, "{method} {uri}");
            assert!(a.body.contains(why), "{method} {uri}: {}", a.body);
        }
        let ok = "x".repeat(weft_contract::MAX_CONTAINER_ID_LEN);
        let a = call(&router, Method::POST, &format!("/ip/{ok}")).await;
        assert_eq!(a.code, StatusCode::OK);
        assert!(ctl.allocs.lock().unwrap().contains_key(&ok));
    }

    #[tokio::test]
    async fn default_subnet_has_no_newline() {
        let (_ctl, router) = setup(true);
        let a = get_(&router, "/ipinfo/defaultsubnet").await;
        assert_eq!(
            (a.code, a.body.as_str()),
            (StatusCode::OK, "192.168.0.0/16")
        );
        assert_eq!(a.content_type.as_deref(), Some("text/plain; charset=utf-8"));
    }

    #[tokio::test]
    async fn unknown_paths_and_methods() {
        let (_ctl, router) = setup(true);
        assert_eq!(get_(&router, "/nope").await.code, StatusCode::NOT_FOUND);
        assert_eq!(
            call(&router, Method::PATCH, "/ip/pod-a").await.code,
            StatusCode::METHOD_NOT_ALLOWED
        );
        assert_eq!(
            call(&router, Method::POST, "/status").await.code,
            StatusCode::METHOD_NOT_ALLOWED
        );
    }

    #[tokio::test]
    async fn rmpeer_route() {
        let (ctl, router) = setup(true);
        let a = call(&router, Method::DELETE, "/peer/02:00:00:00:00:01").await;
        assert_eq!(a.code, StatusCode::OK);
        assert_eq!(a.body, "16 IPs taken over from 02:00:00:00:00:01\n");
        let a = call(&router, Method::DELETE, "/peer/02:00:00:00:00:ff").await;
        assert_eq!(a.code, StatusCode::CONFLICT);
        // A nickname (the Node's name) works as in Weave's rmpeer.
        let a = call(&router, Method::DELETE, "/peer/n2").await;
        assert_eq!(
            (a.code, a.body.as_str()),
            (StatusCode::OK, "16 IPs taken over from n2\n")
        );
        let a = call(&router, Method::DELETE, "/peer/nope").await;
        assert_eq!(a.code, StatusCode::NOT_FOUND);
        assert!(a.body.contains("no peer named"), "{}", a.body);
        let a = call(&router, Method::DELETE, "/peer/a%0Ab").await;
        assert_eq!(a.code, StatusCode::BAD_REQUEST);
        assert_eq!(
            ctl.bad_requests.load(std::sync::atomic::Ordering::Relaxed),
            1
        );
    }

    #[tokio::test]
    async fn metrics_endpoint() {
        let ctl = Arc::new(FakeControl::new(sample_report()));
        let router = metrics_router(ctl.clone());
        let a = get_(&router, "/metrics").await;
        assert_eq!(a.code, StatusCode::OK);
        assert_eq!(a.content_type.as_deref(), Some(METRICS_CONTENT_TYPE));
        // The endpoint adds this process's figures in front of the report's.
        let from_report = render_metrics(&ctl.report(), ctl.telemetry(), None);
        let (process, rest) = a.body.split_at(a.body.find("# HELP weave_flows").unwrap());
        assert_eq!(rest, from_report);
        assert!(
            process.contains("\nprocess_resident_memory_bytes "),
            "{process}"
        );
        assert!(
            process.contains("\nprocess_cpu_seconds_total "),
            "{process}"
        );
        assert!(a.body.contains("\nweave_max_ips 65536\n"), "{}", a.body);
        assert_eq!(get_(&router, "/status").await.code, StatusCode::NOT_FOUND);
    }

    #[tokio::test]
    async fn serve_answers_over_tcp_and_shuts_down() {
        let (_ctl, router) = setup(true);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve(listener, router, async {
            let _ = stopped.await;
        }));
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET /ipinfo/defaultsubnet HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut resp = String::new();
        s.read_to_string(&mut resp).await.unwrap();
        assert!(resp.starts_with("HTTP/1.1 200 OK\r\n"), "{resp}");
        assert!(resp.ends_with("\r\n\r\n192.168.0.0/16"), "{resp}");
        stop.send(()).unwrap();
        tokio::time::timeout(Duration::from_secs(5), server)
            .await
            .expect("server stops on shutdown")
            .unwrap()
            .unwrap();
    }
}
