//! A stand-in for the Kubernetes API server, for tests: no real API server can run on
//! these machines. It speaks the real JSON of exactly the calls weft makes:
//!
//! - `GET /api/v1/nodes` (a `NodeList` with `metadata.resourceVersion`) and the watch on
//!   it (`?watch=true&resourceVersion=R`): newline-delimited events (`ADDED`, `MODIFIED`,
//!   `DELETED`), `BOOKMARK`s while idle, and an `ERROR` event with code 410 (`Expired`)
//!   when `R` is older than the last [`FakeKube::compact`], which makes clients relist;
//! - `PATCH /api/v1/nodes/{name}/status` with a strategic merge patch of
//!   `status.conditions` (merge key `type`);
//! - Leases under `/apis/coordination.k8s.io/v1/namespaces/{ns}/leases`: get (404 as a
//!   `Status`), create (409 `AlreadyExists`), replace with optimistic concurrency (409
//!   `Conflict` on a stale `metadata.resourceVersion`), merge patch.
//!
//! [`FakeKube::set_down`] makes it answer 503 and end open watches, as an unreachable
//! API server would look to a client that retries. It runs in a network namespace of the
//! test (on an underlay address), on its own thread and runtime.

use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, patch};
use axum::Router;
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashMap};
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::Notify;

/// How often an idle watch gets a BOOKMARK.
const BOOKMARK_EVERY: Duration = Duration::from_secs(2);

#[derive(Default)]
struct Store {
    rv: u64,
    nodes: BTreeMap<String, Value>,
    /// (resourceVersion, type, object) of every Node change, for watches.
    history: Vec<(u64, &'static str, Value)>,
    /// Watches from a resourceVersion below this get 410 Gone.
    compacted_before: u64,
    leases: BTreeMap<(String, String), Value>,
    down: bool,
    requests: Vec<String>,
}

struct Shared {
    store: Mutex<Store>,
    changed: Notify,
}

type St = State<Arc<Shared>>;

fn lock(s: &Shared) -> std::sync::MutexGuard<'_, Store> {
    s.store.lock().unwrap_or_else(|p| p.into_inner())
}

/// The fake API server. Dropping it stops it.
pub struct FakeKube {
    shared: Arc<Shared>,
    addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// A Node object as the API returns it.
pub fn node_json(name: &str, internal_ip: Ipv4Addr, rv: u64) -> Value {
    json!({
        "kind": "Node",
        "apiVersion": "v1",
        "metadata": {
            "name": name,
            "uid": format!("uid-{name}"),
            "resourceVersion": rv.to_string(),
            "labels": {"kubernetes.io/hostname": name},
        },
        "spec": {},
        "status": {
            "addresses": [
                {"type": "InternalIP", "address": internal_ip.to_string()},
                {"type": "Hostname", "address": name},
            ],
            "conditions": [{
                "type": "Ready",
                "status": "True",
                "reason": "KubeletReady",
                "message": "kubelet is posting ready status",
                "lastHeartbeatTime": "2026-12-01T10:00:00Z",
                "lastTransitionTime": "2026-12-01T09:00:00Z",
            }],
        },
    })
}

fn status(code: u16, reason: &str, message: String) -> Response {
    let body = json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    });
    (
        StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        [("content-type", "application/json")],
        body.to_string(),
    )
        .into_response()
}

fn json_response(code: StatusCode, v: &Value) -> Response {
    (code, [("content-type", "application/json")], v.to_string()).into_response()
}

fn set_rv(obj: &mut Value, rv: u64) {
    obj["metadata"]["resourceVersion"] = Value::String(rv.to_string());
}

impl FakeKube {
    /// Starts the server on `ip:port` inside network namespace `ns` (a path under
    /// /run/netns, or an empty string for the caller's own namespace).
    pub fn start(ns: &str, ip: Ipv4Addr, port: u16) -> crate::Result<FakeKube> {
        let shared = Arc::new(Shared {
            store: Mutex::new(Store::default()),
            changed: Notify::new(),
        });
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let app_state = shared.clone();
        let ns = ns.to_string();
        let thread = std::thread::Builder::new()
            .name("fake-kube".into())
            .spawn(move || {
                let setup =
                    || -> Result<(tokio::runtime::Runtime, std::net::TcpListener), String> {
                        if !ns.is_empty() {
                            let f = std::fs::File::open(crate::netns_path(&ns))
                                .map_err(|e| format!("open netns {ns}: {e}"))?;
                            nix::sched::setns(f, nix::sched::CloneFlags::CLONE_NEWNET)
                                .map_err(|e| format!("setns {ns}: {e}"))?;
                        }
                        let rt = tokio::runtime::Builder::new_current_thread()
                            .enable_all()
                            .build()
                            .map_err(|e| e.to_string())?;
                        let l = std::net::TcpListener::bind((ip, port))
                            .map_err(|e| format!("bind {ip}:{port}: {e}"))?;
                        l.set_nonblocking(true).map_err(|e| e.to_string())?;
                        Ok((rt, l))
                    };
                let (rt, listener) = match setup() {
                    Ok(x) => x,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                let addr = listener.local_addr().expect("bound");
                let _ = ready_tx.send(Ok(addr));
                rt.block_on(async move {
                    let listener =
                        tokio::net::TcpListener::from_std(listener).expect("tokio listener");
                    let app = router(app_state);
                    let _ = axum::serve(listener, app)
                        .with_graceful_shutdown(async {
                            let _ = stopped.await;
                        })
                        .await;
                });
            })
            .map_err(|e| crate::TestbedError::Failed(format!("spawning fake API: {e}")))?;
        let addr = ready_rx
            .recv()
            .map_err(|e| crate::TestbedError::Failed(format!("fake API thread: {e}")))?
            .map_err(crate::TestbedError::Failed)?;
        Ok(FakeKube {
            shared,
            addr,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// A kubeconfig for this server (plain HTTP, no credentials).
    pub fn kubeconfig(&self) -> String {
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: http://{}\ncontexts:\n- name: fake\n  context:\n    cluster: fake\n    user: weft\ncurrent-context: fake\nusers:\n- name: weft\n  user: {{}}\n",
            self.addr
        )
    }

    fn change(&self, f: impl FnOnce(&mut Store)) {
        f(&mut lock(&self.shared));
        self.shared.changed.notify_waiters();
    }

    /// Adds (or replaces) Node `name` at `ip`.
    pub fn add_node(&self, name: &str, ip: Ipv4Addr) {
        self.change(|s| {
            s.rv += 1;
            let kind = if s.nodes.contains_key(name) {
                "MODIFIED"
            } else {
                "ADDED"
            };
            let obj = node_json(name, ip, s.rv);
            s.nodes.insert(name.to_string(), obj.clone());
            let rv = s.rv;
            s.history.push((rv, kind, obj));
        });
    }

    pub fn delete_node(&self, name: &str) {
        self.change(|s| {
            if let Some(mut obj) = s.nodes.remove(name) {
                s.rv += 1;
                set_rv(&mut obj, s.rv);
                let rv = s.rv;
                s.history.push((rv, "DELETED", obj));
            }
        });
    }

    /// Forgets the watch history: watches that resume from an older resourceVersion get
    /// 410 Gone and must relist.
    pub fn compact(&self) {
        self.change(|s| {
            s.compacted_before = s.rv + 1;
            s.history.clear();
        });
    }

    /// While down, every request gets 503 and open watches end.
    pub fn set_down(&self, down: bool) {
        self.change(|s| s.down = down);
    }

    pub fn node(&self, name: &str) -> Option<Value> {
        lock(&self.shared).nodes.get(name).cloned()
    }

    pub fn lease(&self, namespace: &str, name: &str) -> Option<Value> {
        lock(&self.shared)
            .leases
            .get(&(namespace.to_string(), name.to_string()))
            .cloned()
    }

    /// Every request so far, as `METHOD path?query`.
    pub fn requests(&self) -> Vec<String> {
        lock(&self.shared).requests.clone()
    }
}

impl Drop for FakeKube {
    fn drop(&mut self) {
        self.set_down(true);
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/api/v1/nodes", get(nodes))
        .route("/api/v1/nodes/{name}/status", patch(node_status))
        .route(
            "/apis/coordination.k8s.io/v1/namespaces/{ns}/leases",
            axum::routing::post(lease_create),
        )
        .route(
            "/apis/coordination.k8s.io/v1/namespaces/{ns}/leases/{name}",
            get(lease_get).put(lease_replace).patch(lease_patch),
        )
        .layer(axum::middleware::from_fn_with_state(shared.clone(), gate))
        .with_state(shared)
}

/// Records every request; answers 503 while down.
async fn gate(State(s): St, req: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let line = format!(
        "{} {}",
        req.method(),
        req.uri()
            .path_and_query()
            .map(|p| p.as_str().to_string())
            .unwrap_or_default()
    );
    let down = {
        let mut st = lock(&s);
        st.requests.push(line);
        st.down
    };
    if down {
        return status(503, "ServiceUnavailable", "the API server is down".into());
    }
    next.run(req).await
}

async fn nodes(State(s): St, Query(q): Query<HashMap<String, String>>) -> Response {
    if q.get("watch").is_some_and(|w| w == "true" || w == "1") {
        return watch_nodes(s, q).await;
    }
    let st = lock(&s);
    let list = json!({
        "kind": "NodeList",
        "apiVersion": "v1",
        "metadata": {"resourceVersion": st.rv.to_string()},
        "items": st.nodes.values().collect::<Vec<_>>(),
    });
    json_response(StatusCode::OK, &list)
}

async fn watch_nodes(s: Arc<Shared>, q: HashMap<String, String>) -> Response {
    let from: u64 = q
        .get("resourceVersion")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let timeout = q
        .get("timeoutSeconds")
        .and_then(|v| v.parse().ok())
        .map(Duration::from_secs)
        .unwrap_or(Duration::from_secs(290))
        .min(Duration::from_secs(60));
    let bookmarks = q.get("allowWatchBookmarks").is_some_and(|b| b == "true");
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Bytes>(64);
    tokio::spawn(async move {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut sent = from;
        let expired = {
            let st = lock(&s);
            (from < st.compacted_before).then(|| {
                json!({"type": "ERROR", "object": {
                    "kind": "Status", "apiVersion": "v1", "metadata": {},
                    "status": "Failure", "reason": "Expired", "code": 410,
                    "message": format!("too old resource version: {from} ({})", st.rv),
                }})
            })
        };
        if let Some(err) = expired {
            let _ = tx.send(Bytes::from(format!("{err}\n"))).await;
            return;
        }
        loop {
            let (lines, down, rv) = {
                let st = lock(&s);
                let lines: Vec<String> = st
                    .history
                    .iter()
                    .filter(|(rv, _, _)| *rv > sent)
                    .map(|(_, t, o)| json!({"type": t, "object": o}).to_string())
                    .collect();
                (lines, st.down, st.rv)
            };
            if down {
                return;
            }
            for l in lines {
                if tx.send(Bytes::from(format!("{l}\n"))).await.is_err() {
                    return;
                }
            }
            sent = sent.max(rv);
            let wait = tokio::time::sleep(BOOKMARK_EVERY);
            tokio::select! {
                _ = s.changed.notified() => {}
                _ = wait => {
                    if bookmarks {
                        let b = json!({"type": "BOOKMARK", "object": {
                            "kind": "Node", "apiVersion": "v1",
                            "metadata": {"resourceVersion": sent.to_string()},
                        }});
                        if tx.send(Bytes::from(format!("{b}\n"))).await.is_err() {
                            return;
                        }
                    }
                }
                _ = tokio::time::sleep_until(deadline) => return,
            }
            if tokio::time::Instant::now() >= deadline {
                return;
            }
        }
    });
    let stream = futures::stream::poll_fn(move |cx| {
        rx.poll_recv(cx).map(|o| o.map(Ok::<_, std::io::Error>))
    });
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "application/json")
        .body(Body::from_stream(stream))
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

/// Strategic merge of `status.conditions` by `type`, as the API server does for Nodes.
async fn node_status(
    State(s): St,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let ct = headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if ct != "application/strategic-merge-patch+json" {
        return status(
            415,
            "UnsupportedMediaType",
            format!("unsupported patch type {ct}"),
        );
    }
    let Ok(patch) = serde_json::from_slice::<Value>(&body) else {
        return status(400, "BadRequest", "patch is not JSON".into());
    };
    let mut st = lock(&s);
    let Some(mut node) = st.nodes.get(&name).cloned() else {
        return status(404, "NotFound", format!("nodes \"{name}\" not found"));
    };
    let conds = node["status"]["conditions"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let mut by_type: Vec<Value> = conds;
    for c in patch["status"]["conditions"]
        .as_array()
        .cloned()
        .unwrap_or_default()
    {
        let t = c["type"].clone();
        match by_type.iter_mut().find(|x| x["type"] == t) {
            Some(x) => {
                if let (Some(x), Some(c)) = (x.as_object_mut(), c.as_object()) {
                    for (k, v) in c {
                        x.insert(k.clone(), v.clone());
                    }
                }
            }
            None => by_type.push(c),
        }
    }
    node["status"]["conditions"] = Value::Array(by_type);
    st.rv += 1;
    let rv = st.rv;
    set_rv(&mut node, rv);
    st.nodes.insert(name, node.clone());
    st.history.push((rv, "MODIFIED", node.clone()));
    drop(st);
    s.changed.notify_waiters();
    json_response(StatusCode::OK, &node)
}

fn lease_key(ns: &str, name: &str) -> (String, String) {
    (ns.to_string(), name.to_string())
}

async fn lease_get(State(s): St, Path((ns, name)): Path<(String, String)>) -> Response {
    match lock(&s).leases.get(&lease_key(&ns, &name)) {
        Some(l) => json_response(StatusCode::OK, l),
        None => status(
            404,
            "NotFound",
            format!("leases.coordination.k8s.io \"{name}\" not found"),
        ),
    }
}

async fn lease_create(State(s): St, Path(ns): Path<String>, body: Bytes) -> Response {
    let Ok(mut lease) = serde_json::from_slice::<Value>(&body) else {
        return status(400, "BadRequest", "body is not JSON".into());
    };
    let Some(name) = lease["metadata"]["name"].as_str().map(str::to_string) else {
        return status(422, "Invalid", "metadata.name is required".into());
    };
    let mut st = lock(&s);
    if st.leases.contains_key(&lease_key(&ns, &name)) {
        return status(
            409,
            "AlreadyExists",
            format!("leases.coordination.k8s.io \"{name}\" already exists"),
        );
    }
    st.rv += 1;
    let rv = st.rv;
    lease["metadata"]["namespace"] = Value::String(ns.clone());
    lease["kind"] = json!("Lease");
    lease["apiVersion"] = json!("coordination.k8s.io/v1");
    set_rv(&mut lease, rv);
    st.leases.insert(lease_key(&ns, &name), lease.clone());
    json_response(StatusCode::CREATED, &lease)
}

async fn lease_replace(
    State(s): St,
    Path((ns, name)): Path<(String, String)>,
    body: Bytes,
) -> Response {
    let Ok(mut lease) = serde_json::from_slice::<Value>(&body) else {
        return status(400, "BadRequest", "body is not JSON".into());
    };
    let mut st = lock(&s);
    let Some(current) = st.leases.get(&lease_key(&ns, &name)) else {
        return status(
            404,
            "NotFound",
            format!("leases.coordination.k8s.io \"{name}\" not found"),
        );
    };
    let given = lease["metadata"]["resourceVersion"].as_str().unwrap_or("");
    if given
        != current["metadata"]["resourceVersion"]
            .as_str()
            .unwrap_or("-")
    {
        return status(
            409,
            "Conflict",
            format!("Operation cannot be fulfilled on leases.coordination.k8s.io \"{name}\": the object has been modified; please apply your changes to the latest version and try again"),
        );
    }
    st.rv += 1;
    let rv = st.rv;
    lease["metadata"]["namespace"] = Value::String(ns.clone());
    set_rv(&mut lease, rv);
    st.leases.insert(lease_key(&ns, &name), lease.clone());
    json_response(StatusCode::OK, &lease)
}

/// JSON merge patch (RFC 7386) of a Lease.
async fn lease_patch(
    State(s): St,
    Path((ns, name)): Path<(String, String)>,
    body: Bytes,
) -> Response {
    let Ok(patch) = serde_json::from_slice::<Value>(&body) else {
        return status(400, "BadRequest", "patch is not JSON".into());
    };
    let mut st = lock(&s);
    let Some(mut lease) = st.leases.get(&lease_key(&ns, &name)).cloned() else {
        return status(
            404,
            "NotFound",
            format!("leases.coordination.k8s.io \"{name}\" not found"),
        );
    };
    merge_patch(&mut lease, &patch);
    st.rv += 1;
    let rv = st.rv;
    set_rv(&mut lease, rv);
    st.leases.insert(lease_key(&ns, &name), lease.clone());
    json_response(StatusCode::OK, &lease)
}

fn merge_patch(target: &mut Value, patch: &Value) {
    match (target.as_object_mut(), patch.as_object()) {
        (Some(t), Some(p)) => {
            for (k, v) in p {
                if v.is_null() {
                    t.remove(k);
                } else {
                    merge_patch(t.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
        _ => *target = patch.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merge_patch_follows_rfc_7386() {
        let mut t = json!({"a": 1, "b": {"c": 2, "d": 3}});
        merge_patch(&mut t, &json!({"b": {"c": null, "e": 4}, "f": 5}));
        assert_eq!(t, json!({"a": 1, "b": {"d": 3, "e": 4}, "f": 5}));
    }
}
