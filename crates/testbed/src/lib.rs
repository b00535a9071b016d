//! Local clusters in network namespaces, for the end-to-end tests and `weft demo`, and
//! the harness for tests that need root ([`harness`]).
//!
//! Topology of one [`Cluster`]: an underlay namespace holding a bridge; one namespace per
//! node with a veth (`eth0`) to that bridge and an address from a private /24 that exists
//! only inside these namespaces; one namespace per pod, wired by the real `weft-cni`.
//! Every link is created inside a namespace, so nothing appears in the root namespace and
//! interface names only have to be unique per namespace. Namespace names carry a prefix
//! unique per process and cluster, so tests can run in parallel.
//!
//! All traffic the harness generates comes from threads that `setns`'d into one of these
//! namespaces (or from processes started inside them): nothing leaves the root namespace.
//!
//! Cleanup is RAII: dropping a [`Cluster`] (also while unwinding from a panic) kills the
//! processes it started by PID and deletes its namespaces. [`install_signal_cleanup`] adds
//! the same for SIGINT/SIGTERM, through a process-wide registry.

use nix::sched::CloneFlags;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use std::collections::BTreeSet;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, SocketAddrV4, TcpListener, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU16, AtomicU32, Ordering};
use std::sync::{mpsc, Arc, Mutex, Once};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};
use weft_contract::{Client, Method};

pub mod harness;
pub mod kube_api;
pub mod local;
pub use harness::is_root;

/// HTTP API address of a router, inside its node namespace.
pub const HTTP_ADDR: &str = weft_contract::DEFAULT_HTTP_ADDR;
/// Metrics address, inside the node namespace (the router listens on 0.0.0.0:6782).
pub const METRICS_ADDR: &str = "127.0.0.1:6782";
/// The router's data (VXLAN-format UDP) port.
pub const DATA_PORT: u16 = 6784;
/// The CNI network configuration a runtime would pass on stdin.
pub const DEFAULT_CNI_CONFIG: &str = r#"{"cniVersion":"1.0.0","name":"weave","type":"weft"}"#;

const NETNS_DIR: &str = "/var/run/netns";
/// How long [`Cluster::add_pod`] retries an ADD the plugin asks to try again later.
const ADD_RETRY_FOR: Duration = Duration::from_secs(30);
/// Environment variables the router and plugin read; cleared for the processes the
/// harness starts so the caller's environment cannot change what a test exercises.
const ROUTER_ENV: &[&str] = &[
    "IPALLOC_RANGE",
    "IPALLOC_INIT",
    "WEAVE_MTU",
    "WEAVE_HTTP_ADDR",
    "WEAVE_METRICS_ADDR",
    "NODE_NAME",
    "KUBE_PEERS",
    "KUBECONFIG",
    "POD_NAMESPACE",
    "KUBERNETES_SERVICE_HOST",
    "CONN_LIMIT",
    "NO_MASQ_LOCAL",
    "EXTRA_ARGS",
    "WEAVE_PASSWORD",
    "WEAVE_PASSWORD_FILE",
    "WEFT_DATAPATH",
    "WEAVE_NO_FASTDP",
];

#[derive(Debug, thiserror::Error)]
pub enum TestbedError {
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("`{cmd}` failed ({status}): {stderr}")]
    Command {
        cmd: String,
        status: String,
        stderr: String,
    },
    #[error("timed out after {after:?}: {what}")]
    Timeout { what: String, after: Duration },
    #[error("{0}")]
    Failed(String),
}

pub type Result<T> = std::result::Result<T, TestbedError>;

fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> TestbedError {
    let what = what.into();
    move |source| TestbedError::Io { what, source }
}

fn failed(msg: impl Into<String>) -> TestbedError {
    TestbedError::Failed(msg.into())
}

// ---------------------------------------------------------------------------------------
// Process-wide registry, so that a signal handler can clean up what is still alive.

#[derive(Default)]
struct Registry {
    pids: BTreeSet<i32>,
    /// In creation order; deleted in reverse.
    namespaces: Vec<String>,
    /// Local Kubernetes clusters (`deploy/local/cluster.sh` and the name to take down).
    local_clusters: Vec<(PathBuf, String)>,
}

static REGISTRY: Mutex<Registry> = Mutex::new(Registry {
    pids: BTreeSet::new(),
    namespaces: Vec::new(),
    local_clusters: Vec::new(),
});

fn registry() -> std::sync::MutexGuard<'static, Registry> {
    // A panic while holding the lock leaves plain data behind: still usable for cleanup.
    REGISTRY.lock().unwrap_or_else(|e| e.into_inner())
}

/// Kills `pid` with the cluster processes if the test run is interrupted.
pub fn register_pid(pid: i32) {
    registry().pids.insert(pid);
}

pub fn unregister_pid(pid: i32) {
    registry().pids.remove(&pid);
}

fn register_local_cluster(script: &Path, name: &str) {
    registry()
        .local_clusters
        .push((script.to_path_buf(), name.to_string()));
}

fn unregister_local_cluster(name: &str) {
    registry().local_clusters.retain(|(_, n)| n != name);
}

fn register_ns(ns: &str) {
    registry().namespaces.push(ns.to_string());
}

fn unregister_ns(ns: &str) {
    registry().namespaces.retain(|n| n != ns);
}

/// Kills every registered process and deletes every registered namespace.
fn cleanup_registry() {
    let (pids, namespaces, local_clusters) = {
        let mut r = registry();
        (
            std::mem::take(&mut r.pids),
            std::mem::take(&mut r.namespaces),
            std::mem::take(&mut r.local_clusters),
        )
    };
    for (script, name) in local_clusters {
        let _ = Command::new(script)
            .args(["down", "--name", &name])
            .stdin(Stdio::null())
            .status();
    }
    for pid in pids {
        let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
    }
    for ns in namespaces.iter().rev() {
        delete_netns(ns);
    }
}

static SIGNAL_PIPE_WRITE: AtomicI32 = AtomicI32::new(-1);
static SIGNAL_INSTALL: Once = Once::new();

extern "C" fn on_signal(sig: libc::c_int) {
    let fd = SIGNAL_PIPE_WRITE.load(Ordering::Relaxed);
    if fd >= 0 {
        let byte = sig as u8;
        // SAFETY: write(2) is async-signal-safe; the buffer is a live local.
        unsafe {
            libc::write(fd, &byte as *const u8 as *const libc::c_void, 1);
        }
    }
}

/// Makes SIGINT and SIGTERM kill every process and delete every namespace created by any
/// cluster in this process, then exit with 128 + signal. The handler only writes to a
/// pipe; a dedicated thread does the cleanup.
pub fn install_signal_cleanup() -> Result<()> {
    let mut result = Ok(());
    SIGNAL_INSTALL.call_once(|| {
        result = install_signal_cleanup_once();
    });
    result
}

fn install_signal_cleanup_once() -> Result<()> {
    let mut fds = [0 as libc::c_int; 2];
    // SAFETY: fds is a valid array of two ints.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(io_err("pipe2")(std::io::Error::last_os_error()));
    }
    let (read_fd, write_fd) = (fds[0], fds[1]);
    SIGNAL_PIPE_WRITE.store(write_fd, Ordering::Relaxed);
    thread::Builder::new()
        .name("testbed-signals".into())
        .spawn(move || {
            let mut byte = [0u8; 1];
            // SAFETY: read_fd is the pipe's read end, owned by this thread from now on.
            let mut pipe = unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(read_fd) };
            if pipe.read_exact(&mut byte).is_ok() {
                eprintln!("\ninterrupted: stopping processes and deleting namespaces");
                cleanup_registry();
                std::process::exit(128 + i32::from(byte[0]));
            }
        })
        .map_err(io_err("spawning the signal thread"))?;
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: a zeroed sigaction with a plain handler is valid; the handler only does
        // async-signal-safe work.
        unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = on_signal as *const () as usize;
            action.sa_flags = libc::SA_RESTART;
            libc::sigemptyset(&mut action.sa_mask);
            if libc::sigaction(sig, &action, std::ptr::null_mut()) != 0 {
                return Err(io_err("sigaction")(std::io::Error::last_os_error()));
            }
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Namespaces and commands.

/// Path of a named network namespace, as `CNI_NETNS` carries it.
pub fn netns_path(ns: &str) -> PathBuf {
    Path::new(NETNS_DIR).join(ns)
}

fn render(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

/// Runs a command to completion; fails with its stderr when it exits non-zero.
fn run(cmd: &mut Command) -> Result<String> {
    let shown = render(cmd);
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(io_err(format!("running `{shown}`")))?;
    if !out.status.success() {
        return Err(TestbedError::Command {
            cmd: shown,
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn ip(args: &[&str]) -> Result<String> {
    run(Command::new("ip").args(args))
}

/// `ip -n <ns> <args...>`
/// Runs `ip -n NS ARGS...` (tests build their topology with `ip`; weft never does).
pub fn ip_in(ns: &str, args: &[&str]) -> Result<String> {
    let mut all = vec!["-n", ns];
    all.extend_from_slice(args);
    ip(&all)
}

/// Waits until `dev` in `ns` is operationally up. A veth's carrier comes up with its
/// peer, but the kernel attaches the device's queue only when its link watcher runs,
/// which under load can be a moment later; a datagram sent before that is dropped
/// without a trace (this once lost a test's first datagram in CI).
pub fn wait_link_up(ns: &str, dev: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let line = ip_in(ns, &["-o", "link", "show", "dev", dev])?;
        if line.contains("state UP") {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(failed(format!("{dev} in {ns} is not up after 5 s: {line}")));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn create_netns(ns: &str) -> Result<()> {
    ip(&["netns", "add", ns])?;
    register_ns(ns);
    Ok(())
}

/// Kills what still runs in the namespace (only processes the harness started can be in
/// it), then deletes it. Errors are ignored: this runs during cleanup.
fn delete_netns(ns: &str) {
    if !netns_path(ns).exists() {
        unregister_ns(ns);
        return;
    }
    if let Ok(out) = ip(&["netns", "pids", ns]) {
        for pid in out.split_whitespace().filter_map(|p| p.parse::<i32>().ok()) {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
    }
    let _ = ip(&["netns", "del", ns]);
    unregister_ns(ns);
}

/// Runs `f` on a new thread whose network namespace is `ns`, and returns its handle.
pub fn spawn_in_netns<T, F>(ns: &str, f: F) -> Result<JoinHandle<Result<T>>>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T> + Send + 'static,
{
    let path = netns_path(ns);
    let file = File::open(&path).map_err(io_err(format!("opening {}", path.display())))?;
    let name = ns.to_string();
    thread::Builder::new()
        .name(format!("ns-{ns}"))
        .spawn(move || {
            // setns is per thread: only this thread moves into the namespace.
            nix::sched::setns(&file, CloneFlags::CLONE_NEWNET)
                .map_err(|e| failed(format!("setns into {name}: {e}")))?;
            f()
        })
        .map_err(io_err("spawning a namespace thread"))
}

/// Runs `f` inside the network namespace `ns` and waits for it.
pub fn in_netns<T, F>(ns: &str, f: F) -> Result<T>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T> + Send + 'static,
{
    join(spawn_in_netns(ns, f)?)
}

fn join<T>(h: JoinHandle<Result<T>>) -> Result<T> {
    h.join()
        .map_err(|_| failed("a namespace thread panicked"))?
}

/// `InCsumErrors` of TCP and UDP in the calling thread's network namespace (read through
/// `/proc/thread-self`: `/proc/self/net` shows the main thread's namespace).
pub fn csum_errors_here() -> Result<(u64, u64)> {
    let path = "/proc/thread-self/net/snmp";
    let snmp = std::fs::read_to_string(path).map_err(io_err(format!("reading {path}")))?;
    let lines: Vec<&str> = snmp.lines().collect();
    let field = |proto: &str| -> Result<u64> {
        let mut rows = lines.iter().filter(|l| l.starts_with(&format!("{proto}:")));
        let (Some(names), Some(vals)) = (rows.next(), rows.next()) else {
            return Err(failed(format!("no {proto} rows in {path}")));
        };
        names
            .split_whitespace()
            .zip(vals.split_whitespace())
            .find(|(n, _)| *n == "InCsumErrors")
            .and_then(|(_, v)| v.parse().ok())
            .ok_or_else(|| failed(format!("no {proto} InCsumErrors in {path}")))
    };
    Ok((field("Tcp")?, field("Udp")?))
}

/// `InCsumErrors` of TCP and UDP in namespace `ns`.
pub fn csum_errors(ns: &str) -> Result<(u64, u64)> {
    in_netns(ns, csum_errors_here)
}

/// Writes a sysctl of the namespace the calling thread is in (`/proc/sys/net` resolves to
/// the opening thread's network namespace).
fn write_sysctl(key: &str, value: &str) -> Result<()> {
    let path = format!("/proc/sys/{}", key.replace('.', "/"));
    std::fs::write(&path, value).map_err(io_err(format!("writing {path}")))
}

/// The settings every node and pod namespace gets before any link is created: links copy
/// the `default` sysctls at creation, and a new namespace inherits them from the root
/// namespace or from compiled-in defaults depending on `devconf_inherit_init_net`.
fn prepare_netns(ns: &str, rp_filter: u8) -> Result<()> {
    in_netns(ns, move || {
        // Router and neighbour solicitations would otherwise travel the overlay.
        write_sysctl("net.ipv6.conf.all.disable_ipv6", "1")?;
        write_sysctl("net.ipv6.conf.default.disable_ipv6", "1")?;
        write_sysctl("net.ipv4.conf.all.rp_filter", &rp_filter.to_string())?;
        write_sysctl("net.ipv4.conf.default.rp_filter", &rp_filter.to_string())?;
        Ok(())
    })?;
    ip_in(ns, &["link", "set", "lo", "up"])?;
    Ok(())
}

// ---------------------------------------------------------------------------------------
// HTTP inside a namespace.

/// A response from a router's HTTP API.
#[derive(Debug, Clone)]
pub struct HttpResponse {
    pub status: u16,
    pub body: String,
}

impl HttpResponse {
    pub fn json(&self) -> Result<serde_json::Value> {
        serde_json::from_str(&self.body)
            .map_err(|e| failed(format!("response is not JSON ({e}): {}", self.body)))
    }
}

/// Sends one HTTP request from inside `ns`, to `addr` (`host:port`). Status codes >= 400
/// are not errors here.
pub fn http_in_netns(
    ns: &str,
    method: &str,
    addr: &str,
    path: &str,
    timeout: Duration,
) -> Result<HttpResponse> {
    let method = match method {
        "GET" => Method::Get,
        "POST" => Method::Post,
        "PUT" => Method::Put,
        "DELETE" => Method::Delete,
        other => return Err(failed(format!("unsupported method {other}"))),
    };
    let addr = addr.to_string();
    let path = path.to_string();
    in_netns(ns, move || {
        let answer = Client::with_timeout(&addr, timeout)
            .call(method, &path)
            .map_err(|e| failed(format!("{} {path}: {e}", method.as_str())))?;
        Ok(HttpResponse {
            status: answer.status,
            body: answer.body,
        })
    })
}

/// Sum of all samples of `name` (any labels) in a Prometheus text exposition whose label
/// set contains every `label="value"` pair given.
pub fn metric_sum(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (metric, label_text) = match series.split_once('{') {
                Some((m, rest)) => (m, rest.trim_end_matches('}')),
                None => (series, ""),
            };
            if metric != name {
                return None;
            }
            let all = labels
                .iter()
                .all(|(k, v)| label_text.contains(&format!("{k}=\"{v}\"")));
            if !all {
                return None;
            }
            value.parse::<f64>().ok()
        })
        .sum()
}

// ---------------------------------------------------------------------------------------
// Traffic checks.

/// Outcome of a [`tcp_check`].
#[derive(Debug, Clone, Copy)]
pub struct TcpOutcome {
    /// From the start of the connect until both directions were verified.
    pub elapsed: Duration,
    /// The client address the server saw (reveals NAT, if any).
    pub client_seen_as: SocketAddr,
}

static NEXT_PORT: AtomicU16 = AtomicU16::new(0);

/// A port for a listener: distinct per call within the process, so parallel checks into
/// one namespace do not collide.
pub fn next_test_port() -> u16 {
    20000 + NEXT_PORT.fetch_add(1, Ordering::Relaxed) % 30000
}

fn pattern(seed: u32, len: usize) -> Vec<u8> {
    // xorshift: distinct, non-repeating-looking bytes so that misordered or duplicated
    // segments are detected.
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}

const UP_BYTES: usize = 48 * 1024;
const DOWN_BYTES: usize = 16 * 1024;

/// Opens a TCP connection from namespace `from_ns` to `to` (a listener bound to exactly
/// that address in namespace `to_ns`), sends 48 KiB up and 16 KiB down and verifies both.
pub fn tcp_check(
    from_ns: &str,
    to_ns: &str,
    to: SocketAddrV4,
    timeout: Duration,
) -> Result<TcpOutcome> {
    tcp_check_via(from_ns, to, to_ns, to, timeout)
}

/// Like [`tcp_check`], with the client connecting to `connect` while the listener is
/// bound to `listen` (they differ when something on the way translates: a Service's
/// DNAT, a NodePort).
pub fn tcp_check_via(
    from_ns: &str,
    connect: SocketAddrV4,
    to_ns: &str,
    listen: SocketAddrV4,
    timeout: Duration,
) -> Result<TcpOutcome> {
    let to = listen;
    static SEED: AtomicU32 = AtomicU32::new(0x9e37_79b9);
    let seed = SEED.fetch_add(0x6d2b_79f5, Ordering::Relaxed);
    let up = Arc::new(pattern(seed, UP_BYTES));
    let down = Arc::new(pattern(seed.rotate_left(7) ^ 0xa5a5, DOWN_BYTES));
    let abort = Arc::new(AtomicBool::new(false));
    let (ready_tx, ready_rx) = mpsc::channel();

    let server = {
        let (up, down, abort) = (up.clone(), down.clone(), abort.clone());
        spawn_in_netns(to_ns, move || {
            let listener = TcpListener::bind(to);
            let listener = match listener {
                Ok(l) => {
                    let _ = ready_tx.send(Ok(()));
                    l
                }
                Err(e) => {
                    let msg = format!("listen on {to}: {e}");
                    let _ = ready_tx.send(Err(msg.clone()));
                    return Err(failed(msg));
                }
            };
            listener
                .set_nonblocking(true)
                .map_err(io_err("listener nonblocking"))?;
            let deadline = Instant::now() + timeout;
            let (mut stream, peer) = loop {
                match listener.accept() {
                    Ok(pair) => break pair,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        if abort.load(Ordering::Relaxed) {
                            return Err(failed("client gave up"));
                        }
                        if Instant::now() > deadline {
                            return Err(TestbedError::Timeout {
                                what: format!("accept on {to}"),
                                after: timeout,
                            });
                        }
                        thread::sleep(Duration::from_millis(5));
                    }
                    Err(e) => return Err(io_err(format!("accept on {to}"))(e)),
                }
            };
            stream
                .set_nonblocking(false)
                .map_err(io_err("stream blocking"))?;
            stream
                .set_read_timeout(Some(timeout))
                .map_err(io_err("read timeout"))?;
            stream
                .set_write_timeout(Some(timeout))
                .map_err(io_err("write timeout"))?;
            let mut got = Vec::with_capacity(UP_BYTES);
            stream
                .read_to_end(&mut got)
                .map_err(io_err(format!("server {to} reading from {peer}")))?;
            if got != *up {
                return Err(failed(format!(
                    "server {to} got {} bytes from {peer}, expected {} ({})",
                    got.len(),
                    up.len(),
                    if got.len() == up.len() {
                        "content differs"
                    } else {
                        "length differs"
                    }
                )));
            }
            stream
                .write_all(&down)
                .map_err(io_err(format!("server {to} writing to {peer}")))?;
            let _ = stream.shutdown(Shutdown::Write);
            Ok(peer)
        })?
    };

    match ready_rx.recv() {
        Ok(Ok(())) => {}
        Ok(Err(msg)) => {
            let _ = join(server);
            return Err(failed(msg));
        }
        Err(_) => {
            return Err(join(server)
                .err()
                .unwrap_or_else(|| failed("server vanished")))
        }
    }

    let client = spawn_in_netns(from_ns, move || {
        let to = connect;
        let start = Instant::now();
        let mut stream = TcpStream::connect_timeout(&SocketAddr::V4(to), timeout)
            .map_err(io_err(format!("connect to {to}")))?;
        stream
            .set_read_timeout(Some(timeout))
            .map_err(io_err("read timeout"))?;
        stream
            .set_write_timeout(Some(timeout))
            .map_err(io_err("write timeout"))?;
        stream
            .write_all(&up)
            .map_err(io_err(format!("client writing to {to}")))?;
        stream
            .shutdown(Shutdown::Write)
            .map_err(io_err("client shutdown"))?;
        let mut got = Vec::with_capacity(DOWN_BYTES);
        stream
            .read_to_end(&mut got)
            .map_err(io_err(format!("client reading from {to}")))?;
        if got != *down {
            return Err(failed(format!(
                "client got {} bytes back from {to}, expected {}",
                got.len(),
                down.len()
            )));
        }
        Ok(start.elapsed())
    })?;
    let client_result = join(client);
    if client_result.is_err() {
        abort.store(true, Ordering::Relaxed);
    }
    let server_result = join(server);
    match (client_result, server_result) {
        (Ok(elapsed), Ok(peer)) => Ok(TcpOutcome {
            elapsed,
            client_seen_as: peer,
        }),
        (Err(c), Ok(_)) => Err(c),
        (Ok(_), Err(s)) => Err(s),
        (Err(c), Err(s)) => Err(failed(format!("{c}; server side: {s}"))),
    }
}

/// Streams `bytes` over one TCP connection from `from_ns` to a listener on `to` in
/// `to_ns`, which checks every byte (a position-dependent pattern: loss, duplication or
/// reordering is detected) and answers with the count. Returns the transfer time.
pub fn tcp_bulk(
    from_ns: &str,
    to_ns: &str,
    to: SocketAddrV4,
    bytes: usize,
    timeout: Duration,
) -> Result<Duration> {
    const CHUNK: usize = 1 << 20;
    // Every 8-byte word holds its own position, scrambled: cheap to make and to check.
    fn chunk(i: usize) -> Vec<u8> {
        let first = (i * CHUNK / 8) as u64;
        (first..first + (CHUNK / 8) as u64)
            .flat_map(|w| w.wrapping_mul(0x9e37_79b9_7f4a_7c15).to_le_bytes())
            .collect()
    }
    let (ready_tx, ready_rx) = mpsc::channel();
    let server = spawn_in_netns(to_ns, move || {
        let listener = match TcpListener::bind(to) {
            Ok(l) => {
                let _ = ready_tx.send(Ok(()));
                l
            }
            Err(e) => {
                let _ = ready_tx.send(Err(format!("listen on {to}: {e}")));
                return Err(failed(format!("listen on {to}: {e}")));
            }
        };
        let (mut stream, _) = listener.accept().map_err(io_err("accept"))?;
        stream
            .set_read_timeout(Some(timeout))
            .map_err(io_err("read timeout"))?;
        let mut got = 0usize;
        let mut buf = vec![0u8; CHUNK];
        while got < bytes {
            let want = (bytes - got).min(CHUNK);
            stream
                .read_exact(&mut buf[..want])
                .map_err(io_err(format!("reading at byte {got} of {bytes}")))?;
            if buf[..want] != chunk(got / CHUNK)[..want] {
                return Err(failed(format!("data differs in the MiB at byte {got}")));
            }
            got += want;
        }
        stream
            .write_all(&(got as u64).to_be_bytes())
            .map_err(io_err("answering"))?;
        Ok(())
    })?;
    match ready_rx.recv() {
        Ok(Ok(())) => {}
        _ => {
            return Err(join(server)
                .err()
                .unwrap_or_else(|| failed("server vanished")))
        }
    }
    let client = spawn_in_netns(from_ns, move || {
        let start = Instant::now();
        let mut stream = TcpStream::connect_timeout(&SocketAddr::V4(to), timeout)
            .map_err(io_err(format!("connect to {to}")))?;
        stream
            .set_write_timeout(Some(timeout))
            .map_err(io_err("write timeout"))?;
        stream
            .set_read_timeout(Some(timeout))
            .map_err(io_err("read timeout"))?;
        let mut sent = 0usize;
        while sent < bytes {
            let n = (bytes - sent).min(CHUNK);
            stream
                .write_all(&chunk(sent / CHUNK)[..n])
                .map_err(io_err(format!("writing at byte {sent}")))?;
            sent += n;
        }
        let mut ack = [0u8; 8];
        stream
            .read_exact(&mut ack)
            .map_err(io_err("reading the count"))?;
        if u64::from_be_bytes(ack) != bytes as u64 {
            return Err(failed("the server counted a different length"));
        }
        Ok(start.elapsed())
    })?;
    let c = join(client);
    let s = join(server);
    match (c, s) {
        (Ok(d), Ok(())) => Ok(d),
        (Err(e), Ok(())) | (Ok(_), Err(e)) => Err(e),
        (Err(c), Err(s)) => Err(failed(format!("{c}; server side: {s}"))),
    }
}

/// A UDP request and its answer, as a DNS lookup makes them: a server bound to `listen`
/// in `to_ns` answers each datagram with the sender's address as it saw it; the client in
/// `from_ns` sends to `connect` and waits for the answer. Returns the source address the
/// server saw.
pub fn udp_exchange(
    from_ns: &str,
    connect: SocketAddrV4,
    to_ns: &str,
    listen: SocketAddrV4,
    timeout: Duration,
) -> Result<SocketAddr> {
    let (ready_tx, ready_rx) = mpsc::channel();
    let server = spawn_in_netns(to_ns, move || {
        let sock = match UdpSocket::bind(listen) {
            Ok(s) => {
                let _ = ready_tx.send(Ok(()));
                s
            }
            Err(e) => {
                let msg = format!("bind {listen}: {e}");
                let _ = ready_tx.send(Err(msg.clone()));
                return Err(failed(msg));
            }
        };
        sock.set_read_timeout(Some(timeout))
            .map_err(io_err("read timeout"))?;
        let mut buf = [0u8; 512];
        let (n, peer) = sock
            .recv_from(&mut buf)
            .map_err(io_err(format!("udp server {listen}")))?;
        let mut answer = buf[..n].to_vec();
        answer.extend_from_slice(peer.to_string().as_bytes());
        sock.send_to(&answer, peer)
            .map_err(io_err(format!("udp answer to {peer}")))?;
        Ok(peer)
    })?;
    match ready_rx.recv() {
        Ok(Ok(())) => {}
        _ => {
            return Err(join(server)
                .err()
                .unwrap_or_else(|| failed("server vanished")))
        }
    }
    let client = spawn_in_netns(from_ns, move || {
        let sock = UdpSocket::bind("0.0.0.0:0").map_err(io_err("udp client bind"))?;
        sock.set_read_timeout(Some(timeout))
            .map_err(io_err("read timeout"))?;
        let query = b"weft-query:";
        sock.send_to(query, connect)
            .map_err(io_err(format!("udp to {connect}")))?;
        let mut buf = [0u8; 512];
        let (n, from) = sock
            .recv_from(&mut buf)
            .map_err(io_err(format!("udp answer from {connect}")))?;
        if from != SocketAddr::V4(connect) || !buf[..n].starts_with(query) {
            return Err(failed(format!(
                "unexpected answer from {from}: {:?}",
                String::from_utf8_lossy(&buf[..n])
            )));
        }
        Ok(())
    })?;
    let c = join(client);
    let s = join(server);
    c?;
    s
}

/// Sends one UDP datagram from inside `ns` (from an ephemeral port).
pub fn send_udp_from_ns(ns: &str, dst: SocketAddrV4, payload: &[u8]) -> Result<()> {
    let payload = payload.to_vec();
    in_netns(ns, move || {
        let sock = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).map_err(io_err("udp bind"))?;
        sock.send_to(&payload, dst)
            .map_err(io_err(format!("udp send to {dst}")))?;
        Ok(())
    })
}

/// A datagram a sink received, and its source.
pub type Received = (Vec<u8>, SocketAddr);

/// A socket listening on its own thread inside a namespace for a window of time.
pub struct Listener<T> {
    bound: mpsc::Receiver<()>,
    handle: JoinHandle<Result<T>>,
}

impl<T> Listener<T> {
    /// Waits until the socket is bound (or the thread failed: then `finish` says why).
    pub fn wait_bound(&self) {
        let _ = self.bound.recv();
    }

    /// Waits for the end of the window; everything that arrived.
    pub fn finish(self) -> Result<T> {
        join(self.handle)
    }
}

/// A UDP listener: the datagrams it received.
pub type UdpSink = Listener<Vec<Received>>;

/// Sends one UDP datagram from inside `ns` with a chosen source port, through a raw
/// socket: lets a test speak from a node's own data port (`ip:6784`) while that node's
/// router holds the port. The kernel fills in the IP header (source address by route);
/// the UDP checksum is left 0, which IPv4 allows.
pub fn send_udp_raw_from_ns(
    ns: &str,
    src_port: u16,
    dst: SocketAddrV4,
    payload: &[u8],
) -> Result<()> {
    let len = 8 + payload.len();
    let len16 = u16::try_from(len).map_err(|_| failed("datagram too large"))?;
    let mut datagram = Vec::with_capacity(len);
    datagram.extend_from_slice(&src_port.to_be_bytes());
    datagram.extend_from_slice(&dst.port().to_be_bytes());
    datagram.extend_from_slice(&len16.to_be_bytes());
    datagram.extend_from_slice(&[0, 0]);
    datagram.extend_from_slice(payload);
    in_netns(ns, move || {
        use socket2::{Domain, Protocol, SockAddr, Socket, Type};
        let sock = Socket::new(Domain::IPV4, Type::RAW, Some(Protocol::UDP))
            .map_err(io_err("raw socket"))?;
        // Raw sockets carry the port inside the payload; the address port is unused.
        let to = SockAddr::from(SocketAddrV4::new(*dst.ip(), 0));
        sock.send_to(&datagram, &to)
            .map_err(io_err(format!("raw udp send to {dst}")))?;
        Ok(())
    })
}

/// Binds a UDP socket at `addr` inside `ns` and returns every datagram (and its source)
/// that arrives within `window`.
pub fn spawn_udp_sink(ns: &str, addr: SocketAddrV4, window: Duration) -> Result<UdpSink> {
    let (tx, rx) = mpsc::channel();
    let handle = spawn_in_netns(ns, move || {
        let sock = UdpSocket::bind(addr).map_err(io_err(format!("udp bind {addr}")))?;
        let _ = tx.send(());
        let deadline = Instant::now() + window;
        let mut got = Vec::new();
        let mut buf = vec![0u8; 65536];
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(got);
            }
            sock.set_read_timeout(Some(left))
                .map_err(io_err("udp timeout"))?;
            match sock.recv_from(&mut buf) {
                Ok((n, from)) => got.push((buf[..n].to_vec(), from)),
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
                Err(e) => return Err(io_err("udp recv")(e)),
            }
        }
    })?;
    Ok(Listener { bound: rx, handle })
}

/// Packets built by hand, for datagrams a test injects on the underlay.
pub mod craft {
    use std::net::Ipv4Addr;

    /// The Internet checksum (RFC 1071) of `bytes`.
    pub fn checksum(bytes: &[u8]) -> u16 {
        let mut sum: u32 = bytes
            .chunks(2)
            .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
            .sum();
        while sum > 0xffff {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        !(sum as u16)
    }

    /// A valid IPv4/UDP packet (header checksum set, UDP checksum 0).
    pub fn ipv4_udp(src: Ipv4Addr, dst: Ipv4Addr, dport: u16, payload: &[u8]) -> Vec<u8> {
        let total = 20 + 8 + payload.len();
        let mut p = vec![0u8; 20];
        p[0] = 0x45;
        p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
        p[6] = 0x40; // DF
        p[8] = 64;
        p[9] = 17;
        p[12..16].copy_from_slice(&src.octets());
        p[16..20].copy_from_slice(&dst.octets());
        let c = checksum(&p);
        p[10..12].copy_from_slice(&c.to_be_bytes());
        p.extend_from_slice(&40000u16.to_be_bytes());
        p.extend_from_slice(&dport.to_be_bytes());
        p.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
        p.extend_from_slice(&[0, 0]);
        p.extend_from_slice(payload);
        p
    }

    /// VXLAN header + inner Ethernet header + `inner`.
    pub fn vxlan(flags: u8, vni: u32, ethertype: u16, inner: &[u8]) -> Vec<u8> {
        let mut d = vec![flags, 0, 0, 0];
        d.extend_from_slice(&(vni << 8).to_be_bytes());
        d.extend_from_slice(&[0x02, 0, 0, 0, 0, 1, 0x02, 0, 0, 0, 0, 2]);
        d.extend_from_slice(&ethertype.to_be_bytes());
        d.extend_from_slice(inner);
        d
    }
}

/// A UDP datagram seen on the wire by [`spawn_udp_capture`].
#[derive(Debug, Clone)]
pub struct Captured {
    pub src: SocketAddrV4,
    pub dst: SocketAddrV4,
    pub payload: Vec<u8>,
}

/// A packet capture: the datagrams it saw.
pub type UdpCapture = Listener<Vec<Captured>>;

/// Captures, on every interface of `ns` (an `AF_PACKET` socket, as tcpdump opens), the
/// IPv4 UDP datagrams from or to `port` during `window`, in both directions: what an
/// eavesdropper on the underlay would read.
pub fn spawn_udp_capture(ns: &str, port: u16, window: Duration) -> Result<UdpCapture> {
    let (tx, rx) = mpsc::channel();
    let handle = spawn_in_netns(ns, move || {
        use socket2::{Domain, Protocol, Socket, Type};
        // ETH_P_ALL: the kernel shows outgoing packets only to taps of every protocol.
        let eth_p_all = i32::from((libc::ETH_P_ALL as u16).to_be());
        // Cooked (SOCK_DGRAM): every packet starts at its network header, whatever the
        // link; IPv4 ones are told by their version nibble.
        let sock = Socket::new(Domain::PACKET, Type::DGRAM, Some(Protocol::from(eth_p_all)))
            .map_err(io_err("packet socket"))?;
        let _ = tx.send(());
        let deadline = Instant::now() + window;
        let mut got = Vec::new();
        let mut sock = sock;
        let mut buf = vec![0u8; 65536];
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(got);
            }
            sock.set_read_timeout(Some(left))
                .map_err(io_err("capture timeout"))?;
            let n = match sock.read(&mut buf) {
                Ok(n) => n,
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    continue
                }
                Err(e) => return Err(io_err("capture recv")(e)),
            };
            let p = &buf[..n];
            if p.len() < 28 || p[0] >> 4 != 4 || p[9] != 17 {
                continue;
            }
            let ihl = usize::from(p[0] & 0x0f) * 4;
            if p.len() < ihl + 8 {
                continue;
            }
            let u = &p[ihl..];
            let (sport, dport) = (
                u16::from_be_bytes([u[0], u[1]]),
                u16::from_be_bytes([u[2], u[3]]),
            );
            if sport != port && dport != port {
                continue;
            }
            got.push(Captured {
                src: SocketAddrV4::new(Ipv4Addr::new(p[12], p[13], p[14], p[15]), sport),
                dst: SocketAddrV4::new(Ipv4Addr::new(p[16], p[17], p[18], p[19]), dport),
                payload: u[8..].to_vec(),
            });
        }
    })?;
    Ok(Listener { bound: rx, handle })
}

// ---------------------------------------------------------------------------------------
// Binaries.

/// The executables a cluster runs.
#[derive(Debug, Clone)]
pub struct Binaries {
    pub weft: PathBuf,
    pub weft_cni: PathBuf,
}

impl Binaries {
    /// `weft` at the given path and `weft-cni` next to it (how cargo lays out a workspace
    /// build), e.g. from `env!("CARGO_BIN_EXE_weft")`.
    pub fn beside(weft: impl Into<PathBuf>) -> Result<Self> {
        let weft = weft.into();
        let weft_cni = weft.with_file_name("weft-cni");
        let b = Binaries { weft, weft_cni };
        b.check()?;
        Ok(b)
    }

    pub fn check(&self) -> Result<()> {
        for p in [&self.weft, &self.weft_cni] {
            if !p.is_file() {
                return Err(failed(format!(
                    "{} not found: run `cargo build --workspace` first",
                    p.display()
                )));
            }
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------
// The cluster.

/// What to build.
#[derive(Debug, Clone)]
pub struct ClusterSpec {
    pub nodes: usize,
    pub binaries: Binaries,
    /// `--ipalloc-range`; the router's default when `None`.
    pub ipalloc_range: Option<String>,
    /// Extra arguments for every `weft router`, before the peer list.
    pub router_args: Vec<String>,
    /// rp_filter for `all` and `default` in node and pod namespaces. Strict (1) by
    /// default, as on RHEL-family nodes: the daemon has to cope with it.
    pub rp_filter: u8,
    /// `RUST_LOG` for the routers.
    pub log_filter: String,
    /// Give every router the other nodes' addresses as PEER arguments (off when peers
    /// come from elsewhere, e.g. a Kubernetes API).
    pub static_peers: bool,
    /// How the nodes are joined.
    pub underlay: Underlay,
    /// MTU of every underlay link (the nodes' `eth0` and what they plug into).
    pub underlay_mtu: u32,
}

/// The network between the nodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Underlay {
    /// One bridge, one /24: every node and host on the same link.
    Bridged,
    /// The underlay namespace is a router; every node and host has a /28 subnet of its
    /// own behind it, as EC2 instances in different subnets and zones. The router has
    /// no route for the overlay range: only NAT on the nodes brings replies back to pods.
    Routed,
}

impl ClusterSpec {
    pub fn new(nodes: usize, binaries: Binaries) -> Self {
        ClusterSpec {
            nodes,
            binaries,
            ipalloc_range: None,
            router_args: Vec::new(),
            rp_filter: 1,
            log_filter: std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
            static_peers: true,
            underlay: Underlay::Bridged,
            underlay_mtu: 1500,
        }
    }
}

/// One node: a namespace on the underlay running (at times) a `weft router`.
#[derive(Debug)]
pub struct Node {
    pub ns: String,
    pub underlay_ip: Ipv4Addr,
    /// `--name`
    pub name: String,
    /// `--nickname` (`n1`, `n2`, ...)
    pub nickname: String,
    pub db_dir: PathBuf,
    pub log: PathBuf,
    child: Option<Child>,
    starts: u32,
}

/// A pod attached through `weft-cni ADD`.
#[derive(Debug, Clone)]
pub struct Pod {
    pub name: String,
    pub ns: String,
    /// Index of the node it runs on.
    pub node: usize,
    pub container_id: String,
    pub addr: Ipv4Addr,
    pub prefix_len: u8,
    /// The plugin's result JSON.
    pub result: serde_json::Value,
    /// Wall time of the ADD invocation.
    pub add_duration: Duration,
}

/// What one `weft-cni` invocation produced.
#[derive(Debug, Clone)]
pub struct CniOutput {
    pub success: bool,
    pub exit_code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
    pub duration: Duration,
}

impl CniOutput {
    pub fn json(&self) -> Result<serde_json::Value> {
        serde_json::from_str(&self.stdout).map_err(|e| {
            failed(format!(
                "weft-cni stdout is not JSON ({e}): {:?}; stderr: {}",
                self.stdout, self.stderr
            ))
        })
    }
}

/// One CNI invocation, as a runtime would make it.
#[derive(Debug, Clone)]
pub struct CniCall<'a> {
    /// ADD, DEL, CHECK, VERSION
    pub command: &'a str,
    pub container_id: &'a str,
    /// Namespace name; `None` sends `CNI_NETNS=""` (what CRI does on its second DEL).
    pub netns: Option<&'a str>,
    pub pod_name: &'a str,
    /// stdin
    pub config: String,
}

static CLUSTER_COUNTER: AtomicU32 = AtomicU32::new(0);

/// A cluster of nodes in namespaces. Dropping it removes everything it created.
pub struct Cluster {
    pub prefix: String,
    pub underlay_ns: String,
    pub underlay_net: Ipv4Addr,
    pub nodes: Vec<Node>,
    spec: ClusterSpec,
    workdir: PathBuf,
    /// Namespaces of pods and extra underlay hosts, deleted on drop.
    extra_ns: Vec<String>,
    pods: Vec<Pod>,
}

impl Cluster {
    /// Builds the namespaces and links (routers are not started).
    pub fn create(spec: ClusterSpec) -> Result<Cluster> {
        if spec.nodes == 0 || spec.nodes > 200 {
            return Err(failed(format!("unsupported node count {}", spec.nodes)));
        }
        let pid = std::process::id();
        // Leftovers of a crashed earlier process with the same pid would clash: skip them.
        let (prefix, counter) = loop {
            let c = CLUSTER_COUNTER.fetch_add(1, Ordering::Relaxed);
            let p = format!("wt{pid}-{c}");
            if !netns_path(&format!("{p}-u")).exists() {
                break (p, c);
            }
        };
        let underlay_net = Ipv4Addr::new(10, 100 + (pid % 100) as u8, (counter % 250) as u8, 0);
        let workdir = std::env::temp_dir().join(format!("weft-{prefix}"));
        std::fs::create_dir_all(&workdir)
            .map_err(io_err(format!("creating {}", workdir.display())))?;
        let mut cluster = Cluster {
            underlay_ns: format!("{prefix}-u"),
            prefix,
            underlay_net,
            nodes: Vec::new(),
            spec,
            workdir,
            extra_ns: Vec::new(),
            pods: Vec::new(),
        };
        // On error the partly built cluster is dropped, which removes what exists.
        cluster.build()?;
        Ok(cluster)
    }

    fn build(&mut self) -> Result<()> {
        let u = self.underlay_ns.clone();
        create_netns(&u)?;
        prepare_netns(&u, 0)?;
        match self.spec.underlay {
            Underlay::Bridged => {
                let mtu = self.spec.underlay_mtu.to_string();
                ip_in(&u, &["link", "add", "br0", "type", "bridge"])?;
                ip_in(&u, &["link", "set", "br0", "mtu", &mtu, "up"])?;
            }
            Underlay::Routed => {
                in_netns(&u, || write_sysctl("net.ipv4.ip_forward", "1"))?;
            }
        }
        for i in 0..self.spec.nodes {
            let ns = format!("{}-n{}", self.prefix, i + 1);
            create_netns(&ns)?;
            let underlay_ip = match self.spec.underlay {
                Underlay::Bridged => self.underlay_host(10 + i as u8),
                Underlay::Routed => self.routed_subnet(i + 1)?.1,
            };
            let node = Node {
                ns: ns.clone(),
                underlay_ip,
                name: format!("02:77:66:00:00:{:02x}", i + 1),
                nickname: format!("n{}", i + 1),
                db_dir: self.workdir.join(format!("n{}", i + 1)),
                log: self.workdir.join(format!("n{}.log", i + 1)),
                child: None,
                starts: 0,
            };
            std::fs::create_dir_all(&node.db_dir)
                .map_err(io_err(format!("creating {}", node.db_dir.display())))?;
            self.nodes.push(node);
            prepare_netns(&ns, self.spec.rp_filter)?;
            self.attach(&ns, &format!("n{}", i + 1), underlay_ip)?;
        }
        Ok(())
    }

    fn underlay_host(&self, host: u8) -> Ipv4Addr {
        let o = self.underlay_net.octets();
        Ipv4Addr::new(o[0], o[1], o[2], host)
    }

    /// Routed underlay: subnet `s` (1..=15) is the /28 at `s * 16` of the cluster's /24;
    /// the router has `.1` of it, the host `.2`.
    fn routed_subnet(&self, s: usize) -> Result<(Ipv4Addr, Ipv4Addr)> {
        if !(1..=15).contains(&s) {
            return Err(failed(format!(
                "a routed underlay holds at most 15 nodes and hosts (subnet {s})"
            )));
        }
        let base = (s * 16) as u8;
        Ok((self.underlay_host(base + 1), self.underlay_host(base + 2)))
    }

    /// The router's address on the subnet of `addr` (routed underlay only).
    pub fn router_address_for(&self, addr: Ipv4Addr) -> Ipv4Addr {
        let o = addr.octets();
        Ipv4Addr::new(o[0], o[1], o[2], (o[3] & 0xf0) + 1)
    }

    /// A veth `eth0` in `ns`, its peer `port` in the underlay namespace: on the bridge
    /// (`addr`/24), or routed (`addr`/28, default route via the router).
    fn attach(&self, ns: &str, port: &str, addr: Ipv4Addr) -> Result<()> {
        let u = &self.underlay_ns;
        let mtu = self.spec.underlay_mtu.to_string();
        ip_in(
            u,
            &[
                "link", "add", port, "mtu", &mtu, "type", "veth", "peer", "name", "eth0", "mtu",
                &mtu, "netns", ns,
            ],
        )?;
        match self.spec.underlay {
            Underlay::Bridged => {
                ip_in(u, &["link", "set", port, "master", "br0", "up"])?;
                ip_in(ns, &["addr", "add", &format!("{addr}/24"), "dev", "eth0"])?;
                ip_in(ns, &["link", "set", "eth0", "up"])?;
            }
            Underlay::Routed => {
                let gw = self.router_address_for(addr);
                ip_in(u, &["addr", "add", &format!("{gw}/28"), "dev", port])?;
                ip_in(u, &["link", "set", port, "up"])?;
                ip_in(ns, &["addr", "add", &format!("{addr}/28"), "dev", "eth0"])?;
                ip_in(ns, &["link", "set", "eth0", "up"])?;
                ip_in(ns, &["route", "add", "default", "via", &gw.to_string()])?;
            }
        }
        wait_link_up(u, port)?;
        wait_link_up(ns, "eth0")
    }

    /// A bare namespace, removed with the cluster: `{prefix}-{name}`.
    pub fn add_netns(&mut self, name: &str) -> Result<String> {
        let ns = format!("{}-{name}", self.prefix);
        create_netns(&ns)?;
        self.extra_ns.push(ns.clone());
        prepare_netns(&ns, self.spec.rp_filter)?;
        Ok(ns)
    }

    /// A namespace on the underlay that is not a node (an API server, a bastion, a host
    /// outside the cluster). Returns its namespace name and underlay address; on a routed
    /// underlay it has a subnet of its own, counted down from the last.
    pub fn add_underlay_host(&mut self, name: &str) -> Result<(String, Ipv4Addr)> {
        let k = self.extra_ns.len().min(50);
        let addr = match self.spec.underlay {
            Underlay::Bridged => self.underlay_host(200 + k as u8),
            Underlay::Routed => self.routed_subnet(15 - k)?.1,
        };
        if self.nodes.iter().any(|n| n.underlay_ip == addr) {
            return Err(failed("no subnet left for another underlay host"));
        }
        let ns = format!("{}-{name}", self.prefix);
        create_netns(&ns)?;
        self.extra_ns.push(ns.clone());
        prepare_netns(&ns, self.spec.rp_filter)?;
        let port = format!("h{}", addr.octets()[3]);
        self.attach(&ns, &port, addr)?;
        Ok((ns, addr))
    }

    pub fn spec(&self) -> &ClusterSpec {
        &self.spec
    }

    pub fn workdir(&self) -> &Path {
        &self.workdir
    }

    /// The PEER arguments for node `i`: every other node's underlay address.
    fn peers_of(&self, i: usize) -> Vec<String> {
        if !self.spec.static_peers {
            return Vec::new();
        }
        self.nodes
            .iter()
            .enumerate()
            .filter(|(j, _)| *j != i)
            .map(|(_, n)| n.underlay_ip.to_string())
            .collect()
    }

    /// Starts `weft router` in node `i`'s namespace (0-based), logging to its log file.
    pub fn start_router(&mut self, i: usize) -> Result<()> {
        self.start_router_with(i, &[])
    }

    /// As [`Cluster::start_router`], with extra flags for this node only (before the
    /// PEER arguments).
    pub fn start_router_with(&mut self, i: usize, extra: &[&str]) -> Result<()> {
        self.start_router_env(i, extra, &[])
    }

    /// Starts node `i`'s router with extra arguments and environment variables.
    pub fn start_router_env(
        &mut self,
        i: usize,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Result<()> {
        let peers = self.peers_of(i);
        let spec = self.spec.clone();
        let node = self
            .nodes
            .get_mut(i)
            .ok_or_else(|| failed(format!("no node {i}")))?;
        if let Some(child) = node.child.as_mut() {
            if child.try_wait().ok().flatten().is_none() {
                return Err(failed(format!("router {} already running", node.nickname)));
            }
        }
        spec.binaries.check()?;
        node.starts += 1;
        let mut log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&node.log)
            .map_err(io_err(format!("opening {}", node.log.display())))?;
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &node.ns])
            .arg(&spec.binaries.weft)
            .arg("router")
            .args(["--name", &node.name, "--nickname", &node.nickname])
            .arg("--db-dir")
            .arg(&node.db_dir);
        if let Some(range) = &spec.ipalloc_range {
            cmd.args(["--ipalloc-range", range]);
        }
        cmd.args(&spec.router_args).args(extra).args(&peers);
        for var in ROUTER_ENV {
            cmd.env_remove(var);
        }
        for (k, v) in env {
            cmd.env(k, v);
        }
        let _ = writeln!(
            log,
            "=== testbed: start #{} at {:?}: {}",
            node.starts,
            std::time::SystemTime::now(),
            render(&cmd)
        );
        let err_log = log.try_clone().map_err(io_err("cloning log handle"))?;
        // `ip netns exec` execs the command: the child's PID is the router's.
        let child = cmd
            .env("RUST_LOG", &spec.log_filter)
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(err_log))
            .spawn()
            .map_err(io_err("spawning ip netns exec weft router"))?;
        register_pid(child.id() as i32);
        node.child = Some(child);
        Ok(())
    }

    pub fn start_all(&mut self) -> Result<()> {
        for i in 0..self.nodes.len() {
            self.start_router(i)?;
        }
        Ok(())
    }

    /// Whether node `i`'s router process is alive.
    pub fn router_running(&mut self, i: usize) -> bool {
        match self.nodes.get_mut(i).and_then(|n| n.child.as_mut()) {
            Some(child) => matches!(child.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// The router's PID, if started and not yet reaped.
    pub fn router_pid(&self, i: usize) -> Option<u32> {
        self.nodes.get(i)?.child.as_ref().map(|c| c.id())
    }

    /// Takes node `i`'s router process out of the cluster's hands, to stop it.
    fn take_router(&mut self, i: usize) -> Result<Child> {
        let node = self
            .nodes
            .get_mut(i)
            .ok_or_else(|| failed(format!("no node {i}")))?;
        node.child
            .take()
            .ok_or_else(|| failed(format!("router {} not started", node.nickname)))
    }

    /// SIGKILL, then reap.
    pub fn kill_router(&mut self, i: usize) -> Result<()> {
        let mut child = self.take_router(i)?;
        let pid = child.id() as i32;
        let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        let _ = child.wait();
        unregister_pid(pid);
        Ok(())
    }

    /// SIGTERM and wait up to `timeout` for the exit; SIGKILL and fail if it does not come.
    pub fn stop_router(&mut self, i: usize, timeout: Duration) -> Result<ExitStatus> {
        let mut child = self.take_router(i)?;
        let pid = child.id() as i32;
        let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
        let deadline = Instant::now() + timeout;
        loop {
            match child.try_wait() {
                Ok(Some(status)) => {
                    unregister_pid(pid);
                    return Ok(status);
                }
                Ok(None) if Instant::now() < deadline => thread::sleep(Duration::from_millis(20)),
                _ => {
                    let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
                    let _ = child.wait();
                    unregister_pid(pid);
                    return Err(TestbedError::Timeout {
                        what: format!("router {} to exit after SIGTERM", self.nodes[i].nickname),
                        after: timeout,
                    });
                }
            }
        }
    }

    /// Stops (SIGTERM) and starts again with the same name and db dir.
    pub fn restart_router(&mut self, i: usize, timeout: Duration) -> Result<ExitStatus> {
        let status = self.stop_router(i, timeout)?;
        self.start_router(i)?;
        Ok(status)
    }

    /// Waits until node `i`'s router has given its overlay interface (`weave`) an
    /// address: only then can the plugin attach pods (before, it answers CNI code 11 and
    /// a runtime retries). `/status` answers 200 earlier, as soon as there is a ring; a
    /// node that joins late gets its own address only once it was given space.
    pub fn wait_overlay_address(&mut self, i: usize, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let out = ip_in(
                &self.nodes[i].ns,
                &["-o", "-4", "addr", "show", "dev", "weave"],
            )
            .unwrap_or_default();
            if out.contains(" inet ") {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(TestbedError::Timeout {
                    what: format!(
                        "router {} to address its overlay interface; log tail:\n{}",
                        self.nodes[i].nickname,
                        self.log_tail(i, 30)
                    ),
                    after: timeout,
                });
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Polls `GET /status` in node `i` until it answers 200. Fails at once if the router
    /// process exits.
    pub fn wait_ready(&mut self, i: usize, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        let mut last;
        loop {
            if !self.router_running(i) {
                return Err(failed(format!(
                    "router {} is not running; log tail:\n{}",
                    self.nodes[i].nickname,
                    self.log_tail(i, 30)
                )));
            }
            match self.http(i, "GET", "/status") {
                Ok(r) if r.status == 200 => return Ok(()),
                Ok(r) => last = format!("HTTP {}: {}", r.status, r.body.trim()),
                Err(e) => last = e.to_string(),
            }
            if Instant::now() > deadline {
                return Err(TestbedError::Timeout {
                    what: format!(
                        "router {} to become ready (last: {last}); log tail:\n{}",
                        self.nodes[i].nickname,
                        self.log_tail(i, 30)
                    ),
                    after: timeout,
                });
            }
            thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn wait_all_ready(&mut self, timeout: Duration) -> Result<()> {
        for i in 0..self.nodes.len() {
            self.wait_ready(i, timeout)?;
        }
        Ok(())
    }

    /// An HTTP request to node `i`'s API (`path` starts with `/`).
    pub fn http(&self, i: usize, method: &str, path: &str) -> Result<HttpResponse> {
        http_in_netns(
            &self.node(i)?.ns,
            method,
            HTTP_ADDR,
            path,
            Duration::from_secs(10),
        )
    }

    pub fn http_get(&self, i: usize, path: &str) -> Result<HttpResponse> {
        self.http(i, "GET", path)
    }

    pub fn http_post(&self, i: usize, path: &str) -> Result<HttpResponse> {
        self.http(i, "POST", path)
    }

    pub fn http_delete(&self, i: usize, path: &str) -> Result<HttpResponse> {
        self.http(i, "DELETE", path)
    }

    /// `GET /report`, parsed into the caller's type (the daemon's `Report`, or a
    /// `serde_json::Value`).
    pub fn report<T: serde::de::DeserializeOwned>(&self, i: usize) -> Result<T> {
        let r = self.http_get(i, "/report")?;
        if r.status != 200 {
            return Err(failed(format!(
                "GET /report: HTTP {}: {}",
                r.status, r.body
            )));
        }
        serde_json::from_str(&r.body)
            .map_err(|e| failed(format!("GET /report: cannot parse ({e}): {}", r.body)))
    }

    /// The metrics page of node `i`.
    pub fn metrics(&self, i: usize) -> Result<String> {
        let r = http_in_netns(
            &self.node(i)?.ns,
            "GET",
            METRICS_ADDR,
            weft_contract::paths::METRICS,
            Duration::from_secs(10),
        )?;
        if r.status != 200 {
            return Err(failed(format!("GET /metrics: HTTP {}", r.status)));
        }
        Ok(r.body)
    }

    /// Runs `weft <args>` inside node `i`'s namespace; returns (success, stdout, stderr).
    pub fn weft_cli(&self, i: usize, args: &[&str]) -> Result<(bool, String, String)> {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.node(i)?.ns])
            .arg(&self.spec.binaries.weft)
            .args(args)
            .env_remove("WEAVE_HTTP_ADDR")
            .stdin(Stdio::null());
        let shown = render(&cmd);
        let out = cmd.output().map_err(io_err(format!("running `{shown}`")))?;
        Ok((
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        ))
    }

    fn node(&self, i: usize) -> Result<&Node> {
        self.nodes
            .get(i)
            .ok_or_else(|| failed(format!("no node {i}")))
    }

    /// Executes `weft-cni` in node `node`'s namespace exactly as a runtime does.
    pub fn cni(&self, node: usize, call: &CniCall<'_>) -> Result<CniOutput> {
        let n = self.node(node)?;
        let cni = &self.spec.binaries.weft_cni;
        let cni_path = cni.parent().unwrap_or(Path::new("/"));
        let netns = call
            .netns
            .map(|ns| netns_path(ns).to_string_lossy().into_owned())
            .unwrap_or_default();
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &n.ns])
            .arg(cni)
            .env_remove("WEAVE_HTTP_ADDR")
            .env("CNI_COMMAND", call.command)
            .env("CNI_CONTAINERID", call.container_id)
            .env("CNI_NETNS", netns)
            .env("CNI_IFNAME", "eth0")
            .env("CNI_PATH", cni_path)
            .env("CNI_ARGS", cni_args(call.pod_name))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let start = Instant::now();
        let mut child = cmd.spawn().map_err(io_err("spawning weft-cni"))?;
        register_pid(child.id() as i32);
        let input = call.config.clone();
        let mut stdin = child.stdin.take();
        // Written from a thread so a plugin that answers before reading cannot deadlock us.
        let writer = thread::spawn(move || {
            if let Some(s) = stdin.as_mut() {
                let _ = s.write_all(input.as_bytes());
            }
        });
        let out = child.wait_with_output();
        let duration = start.elapsed();
        let _ = writer.join();
        let out = out.map_err(io_err("waiting for weft-cni"))?;
        Ok(CniOutput {
            success: out.status.success(),
            exit_code: out.status.code(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            duration,
        })
    }

    /// Creates a pod namespace and attaches it through `weft-cni ADD` on node `node`.
    pub fn add_pod(&mut self, node: usize, name: &str) -> Result<Pod> {
        self.add_pod_named(node, name, name)
    }

    /// A pod of Kubernetes namespace `namespace` (the runtime passes it in `CNI_ARGS`).
    pub fn add_k8s_pod(&mut self, node: usize, namespace: &str, name: &str) -> Result<Pod> {
        self.add_pod_named(
            node,
            &format!("{namespace}-{name}"),
            &format!("{namespace}/{name}"),
        )
    }

    fn add_pod_named(&mut self, node: usize, suffix: &str, name: &str) -> Result<Pod> {
        self.node(node)?;
        let ns = format!("{}-{suffix}", self.prefix);
        create_netns(&ns)?;
        self.extra_ns.push(ns.clone());
        prepare_netns(&ns, self.spec.rp_filter)?;
        let container_id = random_container_id();
        // As a runtime does: an ADD answered "try again later" (code 11: the router is not
        // ready, its overlay has no address yet) is retried, for a while.
        let deadline = Instant::now() + ADD_RETRY_FOR;
        let out = loop {
            let out = self.cni(
                node,
                &CniCall {
                    command: "ADD",
                    container_id: &container_id,
                    netns: Some(&ns),
                    pod_name: name,
                    config: DEFAULT_CNI_CONFIG.to_string(),
                },
            )?;
            let again = !out.success
                && out
                    .json()
                    // The CNI spec's code 11, "try again later".
                    .is_ok_and(|v| v["code"] == 11);
            if !again || Instant::now() > deadline {
                break out;
            }
            thread::sleep(Duration::from_millis(250));
        };
        if !out.success {
            return Err(failed(format!(
                "weft-cni ADD for {name} on {} failed (exit {:?}): stdout {} stderr {}\nrouter log tail:\n{}",
                self.nodes[node].nickname,
                out.exit_code,
                out.stdout.trim(),
                out.stderr.trim(),
                self.log_tail(node, 15)
            )));
        }
        let result = out.json()?;
        let (addr, prefix_len) = first_ip(&result)?;
        let pod = Pod {
            name: name.to_string(),
            ns,
            node,
            container_id,
            addr,
            prefix_len,
            result,
            add_duration: out.duration,
        };
        self.pods.push(pod.clone());
        Ok(pod)
    }

    /// `weft-cni DEL` (with the pod's namespace and its ADD result as prevResult), then
    /// deletes the pod namespace.
    pub fn del_pod(&mut self, pod: &Pod) -> Result<CniOutput> {
        let config = with_prev_result(DEFAULT_CNI_CONFIG, &pod.result)?;
        let out = self.cni(
            pod.node,
            &CniCall {
                command: "DEL",
                container_id: &pod.container_id,
                netns: Some(&pod.ns),
                pod_name: &pod.name,
                config,
            },
        )?;
        delete_netns(&pod.ns);
        self.extra_ns.retain(|n| n != &pod.ns);
        self.pods.retain(|p| p.container_id != pod.container_id);
        Ok(out)
    }

    /// `weft-cni CHECK` with the ADD result as prevResult.
    pub fn check_pod(&self, pod: &Pod) -> Result<CniOutput> {
        let config = with_prev_result(DEFAULT_CNI_CONFIG, &pod.result)?;
        self.cni(
            pod.node,
            &CniCall {
                command: "CHECK",
                container_id: &pod.container_id,
                netns: Some(&pod.ns),
                pod_name: &pod.name,
                config,
            },
        )
    }

    pub fn pods(&self) -> &[Pod] {
        &self.pods
    }

    /// TCP from pod `from` to pod `to`.
    pub fn tcp_pod_to_pod(&self, from: &Pod, to: &Pod) -> Result<TcpOutcome> {
        tcp_check(
            &from.ns,
            &to.ns,
            SocketAddrV4::new(to.addr, next_test_port()),
            Duration::from_secs(10),
        )
    }

    /// TCP from node `node`'s namespace to pod `to`.
    pub fn tcp_node_to_pod(&self, node: usize, to: &Pod) -> Result<TcpOutcome> {
        tcp_check(
            &self.node(node)?.ns,
            &to.ns,
            SocketAddrV4::new(to.addr, next_test_port()),
            Duration::from_secs(10),
        )
    }

    /// The last `lines` lines of node `i`'s router log.
    pub fn log_tail(&self, i: usize, lines: usize) -> String {
        let Some(node) = self.nodes.get(i) else {
            return String::new();
        };
        match std::fs::read(&node.log) {
            Ok(bytes) => {
                let text = String::from_utf8_lossy(&bytes);
                let all: Vec<&str> = text.lines().collect();
                all[all.len().saturating_sub(lines)..].join("\n")
            }
            Err(e) => format!("(no log at {}: {e})", node.log.display()),
        }
    }

    /// Log tails of every node, labelled.
    pub fn all_log_tails(&self, lines: usize) -> String {
        let mut s = String::new();
        for (i, n) in self.nodes.iter().enumerate() {
            s.push_str(&format!(
                "----- {} ({}) log tail -----\n{}\n",
                n.nickname,
                n.log.display(),
                self.log_tail(i, lines)
            ));
        }
        s
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let panicking = thread::panicking();
        if panicking {
            eprintln!(
                "testbed {}: failure, router logs:\n{}",
                self.prefix,
                self.all_log_tails(40)
            );
        }
        for node in &mut self.nodes {
            if let Some(mut child) = node.child.take() {
                let pid = child.id() as i32;
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
                let _ = child.wait();
                unregister_pid(pid);
            }
        }
        for ns in self.extra_ns.drain(..).rev() {
            delete_netns(&ns);
        }
        for node in self.nodes.iter().rev() {
            delete_netns(&node.ns);
        }
        delete_netns(&self.underlay_ns);
        if panicking || std::env::var_os("WEFT_TESTBED_KEEP_LOGS").is_some() {
            eprintln!(
                "testbed {}: logs kept in {}",
                self.prefix,
                self.workdir.display()
            );
        } else {
            let _ = std::fs::remove_dir_all(&self.workdir);
        }
    }
}

fn random_container_id() -> String {
    use rand::Rng;
    let mut rng = rand::rng();
    (0..32)
        .map(|_| format!("{:02x}", rng.random::<u8>()))
        .collect()
}

/// `CNI_ARGS` as a CRI runtime passes them; a `namespace/name` pod name adds
/// `K8S_POD_NAMESPACE`, which is how weft's NetworkPolicy finds the pod.
fn cni_args(pod_name: &str) -> String {
    match pod_name.split_once('/') {
        Some((ns, name)) => {
            format!("IgnoreUnknown=1;K8S_POD_NAMESPACE={ns};K8S_POD_NAME={name}")
        }
        None => format!("IgnoreUnknown=1;K8S_POD_NAME={pod_name}"),
    }
}

/// The first IPv4 address in a CNI result (`ips[0].address`, CIDR form).
pub fn first_ip(result: &serde_json::Value) -> Result<(Ipv4Addr, u8)> {
    let addr = result
        .get("ips")
        .and_then(|v| v.as_array())
        .and_then(|a| a.first())
        .and_then(|ip| ip.get("address"))
        .and_then(|a| a.as_str())
        .ok_or_else(|| failed(format!("CNI result without ips[0].address: {result}")))?;
    let net: ipnet::Ipv4Net = addr
        .parse()
        .map_err(|e| failed(format!("CNI result address {addr:?}: {e}")))?;
    Ok((net.addr(), net.prefix_len()))
}

/// A network configuration with `prevResult` set, as runtimes send on DEL and CHECK.
pub fn with_prev_result(config: &str, prev: &serde_json::Value) -> Result<String> {
    let mut v: serde_json::Value =
        serde_json::from_str(config).map_err(|e| failed(format!("bad CNI config: {e}")))?;
    let obj = v
        .as_object_mut()
        .ok_or_else(|| failed("CNI config is not an object"))?;
    obj.insert("prevResult".into(), prev.clone());
    Ok(v.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metric_sum_filters_by_name_and_labels() {
        let text = "# HELP x\n\
            weft_dropped_packets_total{reason=\"malformed\"} 3\n\
            weft_dropped_packets_total{reason=\"unknown_peer\"} 4\n\
            weft_dropped_packets_total_other 100\n\
            weave_ips 7\n";
        assert_eq!(metric_sum(text, "weft_dropped_packets_total", &[]), 7.0);
        assert_eq!(
            metric_sum(
                text,
                "weft_dropped_packets_total",
                &[("reason", "malformed")]
            ),
            3.0
        );
        assert_eq!(metric_sum(text, "weave_ips", &[]), 7.0);
        assert_eq!(metric_sum(text, "absent", &[]), 0.0);
    }

    #[test]
    fn first_ip_reads_cidr_and_rejects_missing() {
        let v: serde_json::Value =
            serde_json::from_str(r#"{"ips":[{"address":"192.168.3.4/16"}]}"#).unwrap();
        assert_eq!(first_ip(&v).unwrap(), (Ipv4Addr::new(192, 168, 3, 4), 16));
        let v: serde_json::Value = serde_json::from_str(r#"{"ips":[]}"#).unwrap();
        assert!(first_ip(&v).is_err());
        let v: serde_json::Value =
            serde_json::from_str(r#"{"ips":[{"address":"nonsense"}]}"#).unwrap();
        assert!(first_ip(&v).is_err());
    }

    #[test]
    fn prev_result_is_inserted() {
        let prev = serde_json::json!({"ips": []});
        let s = with_prev_result(DEFAULT_CNI_CONFIG, &prev).unwrap();
        let v: serde_json::Value = serde_json::from_str(&s).unwrap();
        assert_eq!(v["prevResult"], prev);
        assert_eq!(v["type"], "weft");
    }

    #[test]
    fn patterns_differ_by_seed() {
        assert_ne!(pattern(1, 64), pattern(2, 64));
        assert_eq!(pattern(5, 64), pattern(5, 64));
    }
}
