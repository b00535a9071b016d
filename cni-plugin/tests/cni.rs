//! Runs the built weft-cni binary the way a container runtime does.
//!
//! Tests that touch namespaces need root: weft-testbed's harness reports them as ignored
//! without root and fails them under CI without root. All
//! their traffic stays inside namespaces they create (a "node" with a `weave` TUN and
//! a fake daemon on its own 127.0.0.1:6784, plus "pod" namespaces). The tests marked
//! "real daemon" run the `weft` router built beside this binary (`cargo build
//! --workspace` builds it) in a weft-testbed cluster of one node.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

const BIN: &str = env!("CARGO_BIN_EXE_weft-cni");

use weft_testbed::harness::{self, is_root};
use weft_testbed::{Binaries, Cluster, ClusterSpec, CniCall};

struct Output {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Output {
    fn json(&self) -> Value {
        serde_json::from_str(&self.stdout).unwrap_or_else(|e| {
            panic!(
                "stdout is not JSON ({e}): {:?} / stderr {:?}",
                self.stdout, self.stderr
            )
        })
    }

    fn error_code(&self) -> u64 {
        assert_eq!(
            self.code, 1,
            "expected failure; stdout {:?} stderr {:?}",
            self.stdout, self.stderr
        );
        let v = self.json();
        for key in ["cniVersion", "msg", "details"] {
            assert!(v[key].is_string(), "error JSON lacks {key}: {v}");
        }
        v["code"].as_u64().expect("error JSON has a numeric code")
    }
}

/// Runs the plugin with exactly `env` (plus PATH), `stdin`, optionally inside `netns`.
fn run(env: &[(&str, &str)], stdin: &str, netns: Option<&Netns>) -> Output {
    run_bin(BIN, env, stdin, netns)
}

fn run_bin(bin: &str, env: &[(&str, &str)], stdin: &str, netns: Option<&Netns>) -> Output {
    let mut cmd = Command::new(bin);
    cmd.env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .envs(env.iter().copied())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(ns) = netns {
        let file = File::open(ns.path()).unwrap();
        // SAFETY: setns is a plain syscall, safe between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                nix::sched::setns(file.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)
                    .map_err(std::io::Error::from)
            });
        }
    }
    let mut child = cmd.spawn().expect("spawn weft-cni");
    // The plugin may exit before reading (VERSION): a broken pipe is fine.
    let _ = child.stdin.take().unwrap().write_all(stdin.as_bytes());
    let out = child.wait_with_output().unwrap();
    Output {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn sh(args: &[&str]) -> String {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .expect("run command");
    assert!(
        out.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A named network namespace, deleted on drop (also on panic).
struct Netns {
    name: String,
}

static NS_COUNTER: AtomicUsize = AtomicUsize::new(0);

impl Netns {
    fn new(tag: &str) -> Netns {
        let name = format!(
            "weftcni-{}-{}-{tag}",
            std::process::id(),
            NS_COUNTER.fetch_add(1, Ordering::SeqCst)
        );
        sh(&["ip", "netns", "add", &name]);
        let ns = Netns { name };
        ns.exec(&["sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1"]);
        ns.exec(&["sysctl", "-qw", "net.ipv6.conf.default.disable_ipv6=1"]);
        ns
    }

    /// A node: lo up, forwarding on, and the router's `weave` TUN with its address.
    fn node(tag: &str) -> Netns {
        let ns = Netns::new(tag);
        ns.exec(&["ip", "link", "set", "lo", "up"]);
        ns.exec(&["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
        ns.exec(&["ip", "tuntap", "add", "dev", "weave", "mode", "tun"]);
        ns.exec(&["ip", "link", "set", "weave", "mtu", "1410"]);
        ns.exec(&["ip", "addr", "add", "192.168.0.1/16", "dev", "weave"]);
        ns.exec(&["ip", "link", "set", "weave", "up"]);
        ns
    }

    fn path(&self) -> String {
        format!("/var/run/netns/{}", self.name)
    }

    fn exec(&self, args: &[&str]) -> String {
        let mut full = vec!["ip", "netns", "exec", &self.name];
        full.extend_from_slice(args);
        sh(&full)
    }

    /// Runs `f` on a thread inside this namespace.
    fn within<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> JoinHandle<T> {
        let file = File::open(self.path()).unwrap();
        std::thread::spawn(move || {
            nix::sched::setns(file.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
            f()
        })
    }

    fn links(&self) -> String {
        self.exec(&["ip", "-o", "link", "show"])
    }

    fn read(&self, path: &str) -> String {
        self.exec(&["cat", path]).trim().to_string()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .stderr(Stdio::null())
            .status();
    }
}

/// The router's IPAM API, faked: per-id addresses from 192.168.0.2 up, idempotent.
struct FakeDaemon {
    requests: Arc<Mutex<Vec<String>>>,
    /// Bodies of `POST /cni/observation`, kept apart from `requests`.
    observations: Arc<Mutex<Vec<Value>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl FakeDaemon {
    fn start(node: &Netns) -> FakeDaemon {
        let requests = Arc::new(Mutex::new(Vec::new()));
        let observations = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let ns_file = File::open(node.path()).unwrap();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (reqs, obs, stop2) = (requests.clone(), observations.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            nix::sched::setns(ns_file.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
            let listener = TcpListener::bind("127.0.0.1:6784").unwrap();
            listener.set_nonblocking(true).unwrap();
            ready_tx.send(()).unwrap();
            let mut held: HashMap<String, String> = HashMap::new();
            let mut next = 2u32;
            while !stop2.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((stream, _)) => {
                        stream.set_nonblocking(false).unwrap();
                        serve_one(stream, &reqs, &obs, &mut held, &mut next);
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(2)),
                }
            }
        });
        ready_rx
            .recv_timeout(Duration::from_secs(5))
            .expect("fake daemon started");
        FakeDaemon {
            requests,
            observations,
            stop,
            thread: Some(thread),
        }
    }

    fn requests(&self) -> Vec<String> {
        self.requests.lock().unwrap().clone()
    }

    fn observations(&self) -> Vec<Value> {
        self.observations.lock().unwrap().clone()
    }
}

impl Drop for FakeDaemon {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn serve_one(
    stream: TcpStream,
    reqs: &Mutex<Vec<String>>,
    observations: &Mutex<Vec<Value>>,
    held: &mut HashMap<String, String>,
    next: &mut u32,
) {
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        let mut len = 0usize;
        loop {
            let mut h = String::new();
            if reader.read_line(&mut h).unwrap_or(0) == 0 {
                return;
            }
            if h.trim().is_empty() {
                break;
            }
            if let Some(v) = h.to_ascii_lowercase().strip_prefix("content-length:") {
                len = v.trim().parse().unwrap_or(0);
            }
        }
        let mut body = vec![0; len];
        let _ = reader.read_exact(&mut body);
        let mut parts = line.split_whitespace();
        let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
        if path == "/cni/observation" {
            // As a router without the endpoint (404): the plugin must not care.
            let v = serde_json::from_slice(&body).unwrap_or(Value::Null);
            observations.lock().unwrap().push(v);
            let mut w = &stream;
            let _ = write!(w, "HTTP/1.1 404 X\r\nContent-Length: 0\r\n\r\n");
            continue;
        }
        reqs.lock().unwrap().push(format!("{method} {path}"));
        let (path, query) = path.split_once('?').unwrap_or((path, ""));
        let id = path.strip_prefix("/ip/").unwrap_or("").to_string();
        let (status, text) = match method {
            // As the router: a confirmation needs an allocation to confirm.
            "POST" if query == "confirm" => match held.get(&id) {
                Some(a) => (200, format!("{a}\n")),
                None => (404, "unknown container\n".to_string()),
            },
            "POST" => {
                let addr = held.entry(id).or_insert_with(|| {
                    let a = format!("192.168.{}.{}/16", *next / 256, *next % 256);
                    *next += 1;
                    a
                });
                (200, format!("{addr}\n"))
            }
            "GET" => match held.get(&id) {
                Some(a) => (200, format!("{a}\n")),
                None => (404, "unknown container\n".to_string()),
            },
            "DELETE" => {
                held.remove(&id);
                (204, String::new())
            }
            _ => (405, String::new()),
        };
        let mut w = &stream;
        let _ = write!(
            w,
            "HTTP/1.1 {status} X\r\nContent-Length: {}\r\nContent-Type: text/plain\r\n\r\n{text}",
            text.len()
        );
    }
}

/// A TCP round trip from `client` to a listener on `addr` in `server`.
fn tcp_works(client: &Netns, server: &Netns, addr: &'static str) -> bool {
    let (tx, rx) = std::sync::mpsc::channel();
    let srv = server.within(move || {
        let l = TcpListener::bind(addr).unwrap();
        tx.send(()).unwrap();
        let (mut s, _) = l.accept().unwrap();
        let mut buf = [0u8; 4];
        s.read_exact(&mut buf).unwrap();
        s.write_all(&buf).unwrap();
    });
    rx.recv().unwrap();
    let ok = client
        .within(move || {
            let sa = addr.parse().unwrap();
            let Ok(mut s) = TcpStream::connect_timeout(&sa, Duration::from_secs(3)) else {
                return false;
            };
            s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
            let mut buf = [0u8; 4];
            s.write_all(b"weft").is_ok() && s.read_exact(&mut buf).is_ok() && &buf == b"weft"
        })
        .join()
        .unwrap();
    if ok {
        srv.join().unwrap();
    }
    ok
}

fn conf(version: &str) -> String {
    json!({"cniVersion": version, "name": "weave", "type": "weave-net", "hairpinMode": true})
        .to_string()
}

fn host_veth(id: &str) -> String {
    weft_contract::host_veth_name(id)
}

fn is_mac(v: &Value) -> bool {
    let s = v.as_str().unwrap_or("");
    s.len() == 17
        && s.split(':').count() == 6
        && s.split(':')
            .all(|p| p.len() == 2 && u8::from_str_radix(p, 16).is_ok())
        && s != "00:00:00:00:00:00"
}

fn unique_id(tag: &str) -> String {
    format!(
        "{tag}-{}-{}",
        std::process::id(),
        NS_COUNTER.fetch_add(1, Ordering::SeqCst)
    )
}

/// A loopback port with nothing listening, so no test ever talks to a real daemon.
fn closed_port() -> String {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().to_string()
}

fn version_ignores_dummy_env() {
    let out = run(
        &[
            ("CNI_COMMAND", "VERSION"),
            ("CNI_NETNS", "dummy"),
            ("CNI_IFNAME", "dummy"),
            ("CNI_PATH", "dummy"),
        ],
        r#"{"cniVersion":"0.4.0"}"#,
        None,
    );
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert_eq!(
        out.json(),
        json!({"cniVersion":"1.1.0","supportedVersions":
            ["0.1.0","0.2.0","0.3.0","0.3.1","0.4.0","1.0.0","1.1.0"]})
    );
}

fn add_env<'a>(id: &'a str, netns: &'a str) -> Vec<(&'static str, &'a str)> {
    vec![
        ("CNI_COMMAND", "ADD"),
        ("CNI_CONTAINERID", id),
        ("CNI_NETNS", netns),
        ("CNI_IFNAME", "eth0"),
        ("CNI_PATH", "/opt/cni/bin"),
        ("CNI_ARGS", "IgnoreUnknown=1;K8S_POD_NAME=p"),
    ]
}

/// As root, a namespace of its own for a plugin that never gets to a daemon: it still
/// reports its outcome to 127.0.0.1:6784, which must not be the host's.
fn isolated() -> Option<Netns> {
    is_root().then(|| Netns::new("iso"))
}

fn invalid_json_is_decode_failure() {
    let ns = isolated();
    let out = run(
        &add_env("abc", "/var/run/netns/none"),
        "{not json",
        ns.as_ref(),
    );
    assert_eq!(out.error_code(), 6);
    assert_eq!(out.json()["cniVersion"], "1.1.0");
}

fn unsupported_version_is_code_1() {
    let ns = isolated();
    let out = run(
        &add_env("abc", "/var/run/netns/none"),
        &conf("0.5.0"),
        ns.as_ref(),
    );
    assert_eq!(out.error_code(), 1);
    assert!(out.json()["details"].as_str().unwrap().contains("0.5.0"));
}

/// The spec's code 4: "Invalid necessary environment variables".
fn missing_or_bad_env_is_code_4() {
    let ns = isolated();
    let ns = ns.as_ref();
    let c = conf("0.3.1");
    for drop in ["CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_PATH"] {
        let env: Vec<_> = add_env("abc", "/var/run/netns/none")
            .into_iter()
            .filter(|(k, _)| *k != drop)
            .collect();
        let out = run(&env, &c, ns);
        assert_eq!(out.error_code(), 4, "without {drop}");
        // Errors answer in the version the config declared.
        assert_eq!(out.json()["cniVersion"], "0.3.1");
    }
    let out = run(&add_env("a/b", "/var/run/netns/none"), &c, ns);
    assert_eq!(out.error_code(), 4);
    let out = run(&[("CNI_COMMAND", "BOGUS")], &c, ns);
    assert_eq!(out.error_code(), 4);
    let out = run(&[], &c, ns);
    assert_eq!(out.error_code(), 4);
}

/// The spec's code 7: "Invalid network config".
fn invalid_network_config_is_code_7() {
    let ns = isolated();
    for (extra, what) in [
        (json!({"mtu": "1400"}), "mtu"),
        (json!({"ipam": {"subnet": "10.32.0.0"}}), "ipam.subnet"),
        (json!({"ipam": {"subnet": "10.32.0.9/24"}}), "ipam.subnet"),
        (json!({"dns": {"nameservers": "10.0.0.1"}}), "dns"),
    ] {
        let mut c: Value = serde_json::from_str(&conf("1.1.0")).unwrap();
        for (k, v) in extra.as_object().unwrap() {
            c[k] = v.clone();
        }
        let out = run(
            &add_env("abc", "/var/run/netns/none"),
            &c.to_string(),
            ns.as_ref(),
        );
        assert_eq!(out.error_code(), 7, "{c}");
        assert!(out.stdout.contains(what), "{what}: {}", out.stdout);
    }
}

fn del_without_daemon_asks_to_retry() {
    // Either in a fresh namespace (root) or against a closed loopback port.
    let node = is_root().then(|| Netns::node("delnod"));
    let addr = closed_port();
    let c = json!({"cniVersion":"1.0.0","name":"weave","type":"weft","daemonAddress": addr})
        .to_string();
    let id = unique_id("del");
    let env = [
        ("CNI_COMMAND", "DEL"),
        ("CNI_CONTAINERID", id.as_str()),
        ("CNI_NETNS", ""),
        ("CNI_IFNAME", "eth0"),
    ];
    let out = run(&env, &c, node.as_ref());
    assert_eq!(out.error_code(), 11);
    assert!(
        out.json()["msg"].as_str().unwrap().contains(&addr),
        "{}",
        out.stdout
    );
}

fn add_without_daemon_leaves_nothing() {
    let node = Netns::node("nod");
    let pod = Netns::new("pod");
    let id = unique_id("nodaemon");
    let out = run(&add_env(&id, &pod.path()), &conf("1.0.0"), Some(&node));
    assert_eq!(out.error_code(), 11);
    assert!(
        out.json()["msg"]
            .as_str()
            .unwrap()
            .contains("127.0.0.1:6784"),
        "{}",
        out.stdout
    );
    assert!(!node.links().contains("vethwepl"), "{}", node.links());
    assert!(!pod.links().contains("eth0"), "{}", pod.links());
}

fn add_without_weave_interface_asks_to_retry() {
    let node = Netns::new("noweave");
    node.exec(&["ip", "link", "set", "lo", "up"]);
    let daemon = FakeDaemon::start(&node);
    let pod = Netns::new("pod");
    let out = run(
        &add_env(&unique_id("nw"), &pod.path()),
        &conf("1.0.0"),
        Some(&node),
    );
    assert_eq!(out.error_code(), 11);
    assert!(
        out.json()["msg"].as_str().unwrap().contains("weave"),
        "{}",
        out.stdout
    );
    // Nothing was allocated.
    assert!(daemon.requests().is_empty(), "{:?}", daemon.requests());
}

fn failed_add_rolls_back() {
    let node = Netns::node("rbnod");
    let daemon = FakeDaemon::start(&node);
    let pod = Netns::new("rbpod");
    // The interface name the runtime asks for is taken: creation must fail after
    // the address was allocated.
    pod.exec(&["ip", "tuntap", "add", "dev", "eth0", "mode", "tun"]);
    let id = unique_id("rb");
    let out = run(&add_env(&id, &pod.path()), &conf("0.3.0"), Some(&node));
    assert_eq!(out.error_code(), 7);
    assert!(
        out.json()["msg"].as_str().unwrap().contains("eth0"),
        "{}",
        out.stdout
    );
    assert!(!node.links().contains("vethwepl"), "{}", node.links());
    assert_eq!(
        daemon.requests(),
        [
            format!("POST /ip/{id}?tentative"),
            format!("DELETE /ip/{id}")
        ]
    );
}

fn add_check_del_round_trip() {
    let node = Netns::node("node");
    let daemon = FakeDaemon::start(&node);
    let pod = Netns::new("pod");
    let pod2 = Netns::new("pod2");
    let id = unique_id("full");
    let veth = host_veth(&id);
    let pod_path = pod.path();

    let out = run(&add_env(&id, &pod_path), &conf("1.0.0"), Some(&node));
    assert_eq!(out.code, 0, "stdout {} stderr {}", out.stdout, out.stderr);
    let result = out.json();
    assert_eq!(result["cniVersion"], "1.0.0");
    assert_eq!(result["interfaces"][0]["name"], veth.as_str());
    assert!(result["interfaces"][0].get("sandbox").is_none());
    assert_eq!(result["interfaces"][1]["name"], "eth0");
    assert_eq!(result["interfaces"][1]["sandbox"], pod.path().as_str());
    assert!(is_mac(&result["interfaces"][0]["mac"]), "{result}");
    assert!(is_mac(&result["interfaces"][1]["mac"]), "{result}");
    assert_eq!(
        result["ips"],
        json!([{"address":"192.168.0.2/16","gateway":"192.168.0.1","interface":1}])
    );
    assert_eq!(
        result["routes"],
        json!([{"dst":"0.0.0.0/0","gw":"192.168.0.1"}])
    );
    assert_eq!(result["dns"], json!({}));

    // Node side: veth up, proxy ARP, /32 route with the overlay address as source.
    let link = node.exec(&["ip", "-o", "link", "show", &veth]);
    assert!(link.contains("state UP") || link.contains(",UP"), "{link}");
    assert!(link.contains("mtu 1410"), "MTU comes from weave: {link}");
    let mac = result["interfaces"][0]["mac"].as_str().unwrap();
    assert!(link.contains(mac), "{link}");
    assert_eq!(
        node.read(&format!("/proc/sys/net/ipv4/conf/{veth}/proxy_arp")),
        "1"
    );
    let route = node.exec(&["ip", "route", "show", "192.168.0.2"]);
    assert!(
        route.contains(&format!("dev {veth}")) && route.contains("scope link"),
        "{route}"
    );
    // No `src`: such a route would vanish with the daemon's TUN address on restart.
    assert!(!route.contains("src"), "{route}");
    assert_eq!(
        node.read(&format!("/proc/sys/net/ipv4/neigh/{veth}/proxy_delay")),
        "0"
    );

    // Pod side: address, lo, default route, MTU, IPv6 off.
    let addr = pod.exec(&["ip", "-o", "-4", "addr", "show", "dev", "eth0"]);
    assert!(addr.contains("192.168.0.2/16"), "{addr}");
    let pod_link = pod.exec(&["ip", "-o", "link", "show", "eth0"]);
    assert!(pod_link.contains("mtu 1410"), "{pod_link}");
    assert!(
        pod_link.contains(result["interfaces"][1]["mac"].as_str().unwrap()),
        "{pod_link}"
    );
    assert!(pod.exec(&["ip", "-o", "link", "show", "lo"]).contains("UP"));
    let default = pod.exec(&["ip", "route", "show", "default"]);
    assert!(default.contains("via 192.168.0.1 dev eth0"), "{default}");
    assert_eq!(pod.read("/proc/sys/net/ipv6/conf/eth0/disable_ipv6"), "1");

    // Traffic (inside our namespaces only): pod -> gateway, and pod -> pod through
    // the node's routing with proxy ARP, at 0.3.0 (Weave's conflist version).
    assert!(
        tcp_works(&pod, &node, "192.168.0.1:7777"),
        "pod cannot reach its gateway"
    );
    let id2 = unique_id("full2");
    let out2 = run(&add_env(&id2, &pod2.path()), &conf("0.3.0"), Some(&node));
    assert_eq!(out2.code, 0, "{} {}", out2.stdout, out2.stderr);
    let r2 = out2.json();
    assert_eq!(r2["cniVersion"], "0.3.0");
    assert_eq!(r2["ips"][0]["version"], "4");
    assert_eq!(r2["ips"][0]["address"], "192.168.0.3/16");
    assert!(
        tcp_works(&pod, &pod2, "192.168.0.3:7777"),
        "pod cannot reach pod2"
    );
    assert!(
        tcp_works(&pod2, &pod, "192.168.0.2:7777"),
        "pod2 cannot reach pod"
    );

    // CHECK with the ADD result as prevResult.
    let mut check_conf: Value = serde_json::from_str(&conf("1.0.0")).unwrap();
    check_conf["prevResult"] = result.clone();
    let mut env = add_env(&id, &pod_path);
    env[0].1 = "CHECK";
    let out = run(&env, &check_conf.to_string(), Some(&node));
    assert_eq!(out.code, 0, "{} {}", out.stdout, out.stderr);
    assert_eq!(out.stdout, "");
    // CHECK without prevResult is an invalid config; at 0.3.x it is not defined.
    assert_eq!(run(&env, &conf("1.0.0"), Some(&node)).error_code(), 7);
    assert_eq!(run(&env, &conf("0.3.1"), Some(&node)).error_code(), 1);
    // CHECK notices a lost address.
    let mut wrong = check_conf.clone();
    wrong["prevResult"]["ips"][0]["address"] = json!("192.168.0.99/16");
    let out = run(&env, &wrong.to_string(), Some(&node));
    assert_eq!(out.error_code(), 999);
    assert!(
        out.json()["msg"].as_str().unwrap().contains("192.168.0.99"),
        "{}",
        out.stdout
    );

    // ADD again without DEL: the old pair is replaced, the address stays the same.
    let again = run(&add_env(&id, &pod_path), &conf("1.0.0"), Some(&node));
    assert_eq!(again.code, 0, "{} {}", again.stdout, again.stderr);
    assert_eq!(again.json()["ips"], result["ips"]);
    assert_eq!(pod.links().matches("eth0").count(), 1, "{}", pod.links());

    // DEL: veth gone, address freed; twice, then with an empty netns.
    let mut env = add_env(&id, &pod_path);
    env[0].1 = "DEL";
    let out = run(&env, &conf("1.0.0"), Some(&node));
    assert_eq!((out.code, out.stdout.as_str()), (0, ""), "{}", out.stderr);
    assert!(!node.links().contains(&veth), "{}", node.links());
    assert!(!pod.links().contains("eth0"), "{}", pod.links());
    assert!(daemon.requests().contains(&format!("DELETE /ip/{id}")));
    let out = run(&env, &conf("1.0.0"), Some(&node));
    assert_eq!(out.code, 0, "{} {}", out.stdout, out.stderr);
    let env = [
        ("CNI_COMMAND", "DEL"),
        ("CNI_CONTAINERID", id.as_str()),
        ("CNI_NETNS", ""),
        ("CNI_IFNAME", "eth0"),
    ];
    let out = run(&env, &conf("1.0.0"), Some(&node));
    assert_eq!(out.code, 0, "{} {}", out.stdout, out.stderr);

    // The second pod is unaffected and can be deleted after its netns is gone.
    assert!(node.links().contains(&host_veth(&id2)));
    drop(pod2);
    let env = [
        ("CNI_COMMAND", "DEL"),
        ("CNI_CONTAINERID", id2.as_str()),
        ("CNI_NETNS", "/var/run/netns/gone"),
        ("CNI_IFNAME", "eth0"),
    ];
    let out = run(&env, &conf("0.3.0"), Some(&node));
    assert_eq!(out.code, 0, "{} {}", out.stdout, out.stderr);
    assert!(!node.links().contains("vethwepl"), "{}", node.links());
}

/// What the plugin must refuse without touching anything: the node's own namespace as
/// CNI_NETNS, a second attachment of an attached container under another CNI_IFNAME,
/// and a stdin far larger than any network configuration.
fn refusals_touch_nothing() {
    let node = Netns::node("node");
    let _daemon = FakeDaemon::start(&node);
    let pod = Netns::new("pod");
    let id = unique_id("refuse");
    let veth = host_veth(&id);

    // The node's own namespace, named by its path as a runtime would.
    let own = node.path();
    let out = run(&add_env(&id, &own), &conf("1.0.0"), Some(&node));
    assert_eq!(out.error_code(), 4, "{}", out.stdout);
    assert!(
        out.stdout.contains("own network namespace"),
        "{}",
        out.stdout
    );
    assert!(!node.exec(&["ip", "-o", "link"]).contains(&veth));

    let pod_path = pod.path();
    let out = run(&add_env(&id, &pod_path), &conf("1.0.0"), Some(&node));
    assert_eq!(out.code, 0, "stdout {} stderr {}", out.stdout, out.stderr);
    let mut second = add_env(&id, &pod_path);
    for kv in second.iter_mut() {
        if kv.0 == "CNI_IFNAME" {
            kv.1 = "eth1";
        }
    }
    let out = run(&second, &conf("1.0.0"), Some(&node));
    assert_eq!(out.error_code(), 104, "{}", out.stdout);
    assert!(out.stdout.contains("already attached"), "{}", out.stdout);
    let addr = pod.exec(&["ip", "-o", "-4", "addr", "show", "dev", "eth0"]);
    assert!(
        addr.contains("192.168.0.2/16"),
        "eth0 is left alone: {addr}"
    );

    let huge = format!(
        "{{\"cniVersion\":\"1.0.0\",\"name\":\"weave\",\"type\":\"weave-net\",\"pad\":\"{}\"}}",
        "x".repeat(2 << 20)
    );
    let out = run(&add_env(&unique_id("huge"), &pod_path), &huge, Some(&node));
    assert_eq!(out.error_code(), 7, "{}", out.stdout);
    assert!(out.stdout.contains("too large"), "{}", out.stdout);
}

/// After every command but VERSION the plugin reports how it went to the daemon; the
/// fake answers 404 (a router without the endpoint), which changes nothing.
fn observations_are_reported_best_effort() {
    let node = Netns::node("obsnod");
    let daemon = FakeDaemon::start(&node);
    let pod = Netns::new("obspod");
    let pod_path = pod.path();
    let id = unique_id("obs");

    let out = run(&add_env(&id, &pod_path), &conf("1.0.0"), Some(&node));
    assert_eq!(out.code, 0, "{} {}", out.stdout, out.stderr);
    assert!(out.json()["ips"].is_array());
    let obs = daemon.observations();
    assert_eq!(obs.len(), 1, "{obs:?}");
    assert_eq!(obs[0]["command"], "ADD");
    assert_eq!(obs[0]["result"], "ok");
    assert!(obs[0].get("code").is_none(), "{obs:?}");
    let seconds = obs[0]["seconds"].as_f64().expect("seconds is a number");
    assert!((0.0..30.0).contains(&seconds), "{seconds}");

    let mut bad: Value = serde_json::from_str(&conf("1.0.0")).unwrap();
    bad["mtu"] = json!(10);
    let out = run(&add_env(&id, &pod_path), &bad.to_string(), Some(&node));
    assert_eq!(out.error_code(), 7);
    let obs = daemon.observations();
    assert_eq!(
        (
            obs.len(),
            &obs[1]["command"],
            &obs[1]["result"],
            &obs[1]["code"]
        ),
        (2, &json!("ADD"), &json!("error"), &json!(7)),
        "{obs:?}"
    );

    let out = run(&[("CNI_COMMAND", "VERSION")], "", Some(&node));
    assert_eq!(out.code, 0);
    assert_eq!(daemon.observations().len(), 2, "VERSION reports nothing");

    let mut env = add_env(&id, &pod_path);
    env[0].1 = "DEL";
    let out = run(&env, &conf("1.0.0"), Some(&node));
    assert_eq!((out.code, out.stdout.as_str()), (0, ""), "{}", out.stderr);
    let obs = daemon.observations();
    assert_eq!(
        (&obs[2]["command"], &obs[2]["result"]),
        (&json!("DEL"), &json!("ok"))
    );
    assert!(!node.links().contains("vethwepl"), "{}", node.links());
}

// ---------------------------------------------------------------------------------------
// Against the real daemon.

const READY: Duration = Duration::from_secs(30);

fn binaries() -> Binaries {
    let weft_cni = std::path::PathBuf::from(BIN);
    let b = Binaries {
        weft: weft_cni.with_file_name("weft"),
        weft_cni,
    };
    b.check().unwrap_or_else(|e| panic!("{e}"));
    b
}

/// One node with its router started, ready, its overlay interface addressed.
fn real_cluster() -> Cluster {
    let mut c = Cluster::create(ClusterSpec::new(1, binaries()))
        .unwrap_or_else(|e| panic!("namespaces: {e}"));
    c.start_router(0).unwrap_or_else(|e| panic!("start: {e}"));
    c.wait_ready(0, READY).unwrap_or_else(|e| panic!("{e}"));
    c.wait_overlay_address(0, READY)
        .unwrap_or_else(|e| panic!("{e}"));
    c
}

fn cni(c: &Cluster, command: &str, id: &str, netns: Option<&str>, config: &Value) -> Output {
    let out = c
        .cni(
            0,
            &CniCall {
                command,
                container_id: id,
                netns,
                pod_name: id,
                config: config.to_string(),
            },
        )
        .unwrap_or_else(|e| panic!("{command}: {e}"));
    Output {
        code: out.exit_code.unwrap_or(-1),
        stdout: out.stdout,
        stderr: out.stderr,
    }
}

fn ok_json(out: &Output, what: &str) -> Value {
    assert_eq!(
        out.code, 0,
        "{what}: stdout {} stderr {}",
        out.stdout, out.stderr
    );
    out.json()
}

fn subnet_conf(version: &str, subnet: &str) -> Value {
    json!({"cniVersion": version, "name": "weave", "type": "weave-net",
           "ipam": {"subnet": subnet}})
}

fn plain_conf(version: &str) -> Value {
    serde_json::from_str(&conf(version)).unwrap()
}

fn gc_conf(mut config: Value, valid: &[&str]) -> Value {
    config["cni.dev/valid-attachments"] = valid
        .iter()
        .map(|id| json!({"containerID": id, "ifname": "eth0"}))
        .collect();
    config
}

/// The container ids the daemon holds addresses for (`GET /ip`).
fn held_ids(c: &Cluster) -> std::collections::BTreeSet<String> {
    let r = c
        .http_get(0, "/ip")
        .unwrap_or_else(|e| panic!("GET /ip: {e}"));
    assert_eq!(r.status, 200, "GET /ip: {}", r.body);
    let v: Value = serde_json::from_str(&r.body).unwrap();
    v["owned"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|o| o["containerid"].as_str().unwrap().to_string())
                .collect()
        })
        .unwrap_or_default()
}

fn node_links(c: &Cluster) -> String {
    weft_testbed::ip_in(&c.nodes[0].ns, &["-o", "link", "show"]).unwrap()
}

/// ADD with `ipam.subnet` gets an address inside it with its prefix (1.1.0, with `dns`
/// handed back), a 0.2.0 ADD gets the `ip4` result, the two pods reach each other; a
/// subnet outside the range is an invalid network config and leaves nothing.
fn real_daemon_subnet_dns_and_result_versions() {
    let mut c = real_cluster();
    let node_ns = c.nodes[0].ns.clone();
    let (ns_a, ns_b, ns_c) = (
        c.add_netns("sa").unwrap(),
        c.add_netns("sb").unwrap(),
        c.add_netns("sc").unwrap(),
    );
    let (id_a, id_b, id_c) = (unique_id("suba"), unique_id("subb"), unique_id("subc"));
    let dns = json!({"nameservers": ["10.96.0.10"], "domain": "cluster.local",
                     "search": ["default.svc.cluster.local"], "options": ["ndots:5"]});

    let mut config = subnet_conf("1.1.0", "192.168.77.0/24");
    config["dns"] = dns.clone();
    let r = ok_json(
        &cni(&c, "ADD", &id_a, Some(&ns_a), &config),
        "ADD in subnet",
    );
    assert_eq!(r["cniVersion"], "1.1.0");
    assert_eq!(r["dns"], dns);
    let cidr = r["ips"][0]["address"].as_str().unwrap().to_string();
    let addr_a: std::net::Ipv4Addr = cidr.split('/').next().unwrap().parse().unwrap();
    assert!(
        cidr.starts_with("192.168.77.") && cidr.ends_with("/24"),
        "not inside 192.168.77.0/24 with its prefix: {r}"
    );
    let gw = r["ips"][0]["gateway"].as_str().unwrap().to_string();
    assert_eq!(r["routes"], json!([{"dst": "0.0.0.0/0", "gw": gw}]));
    let held = c.http_get(0, &format!("/ip/{id_a}")).unwrap();
    assert_eq!(held.status, 200, "{}", held.body);
    assert!(
        held.body.starts_with(&format!("{addr_a}/")),
        "{}",
        held.body
    );
    let pod_addr =
        weft_testbed::ip_in(&ns_a, &["-o", "-4", "addr", "show", "dev", "eth0"]).unwrap();
    assert!(pod_addr.contains(&cidr), "{pod_addr}");
    // The node's address is outside the /24: the default route is on-link.
    let default = weft_testbed::ip_in(&ns_a, &["route", "show", "default"]).unwrap();
    assert!(
        default.contains(&format!("via {gw} dev eth0")) && default.contains("onlink"),
        "{default}"
    );
    let gw_addr: std::net::Ipv4Addr = gw.parse().unwrap();
    weft_testbed::tcp_check(
        &ns_a,
        &node_ns,
        std::net::SocketAddrV4::new(gw_addr, weft_testbed::next_test_port()),
        Duration::from_secs(10),
    )
    .unwrap_or_else(|e| panic!("pod in the subnet -> its gateway: {e}"));

    // CHECK accepts what ADD did (the daemon answers lookups with the range's prefix).
    let mut check = config.clone();
    check["prevResult"] = r.clone();
    let out = cni(&c, "CHECK", &id_a, Some(&ns_a), &check);
    assert_eq!((out.code, out.stdout.as_str()), (0, ""), "{}", out.stderr);

    // 0.2.0, in the whole range: the `ip4` result.
    let r2 = ok_json(
        &cni(&c, "ADD", &id_b, Some(&ns_b), &plain_conf("0.2.0")),
        "ADD at 0.2.0",
    );
    assert_eq!(r2["cniVersion"], "0.2.0");
    assert!(
        r2.get("ips").is_none() && r2.get("interfaces").is_none(),
        "{r2}"
    );
    let ip_b = r2["ip4"]["ip"].as_str().unwrap();
    assert!(ip_b.ends_with("/16"), "{r2}");
    assert_eq!(r2["ip4"]["gateway"], gw.as_str());
    assert_eq!(r2["ip4"]["routes"], json!([{"dst": "0.0.0.0/0", "gw": gw}]));
    assert_eq!(r2["dns"], json!({}));
    let addr_b: std::net::Ipv4Addr = ip_b.split('/').next().unwrap().parse().unwrap();
    for (from, to, addr) in [(&ns_a, &ns_b, addr_b), (&ns_b, &ns_a, addr_a)] {
        weft_testbed::tcp_check(
            from,
            to,
            std::net::SocketAddrV4::new(addr, weft_testbed::next_test_port()),
            Duration::from_secs(10),
        )
        .unwrap_or_else(|e| panic!("{from} -> {addr}: {e}"));
    }

    // A subnet the range cannot serve: code 7, nothing held, no veth.
    let out = cni(
        &c,
        "ADD",
        &id_c,
        Some(&ns_c),
        &subnet_conf("1.1.0", "10.99.0.0/24"),
    );
    assert_eq!(out.error_code(), 7, "{}", out.stdout);
    assert!(out.stdout.contains("10.99.0.0/24"), "{}", out.stdout);
    assert_eq!(c.http_get(0, &format!("/ip/{id_c}")).unwrap().status, 404);
    assert!(!node_links(&c).contains(&host_veth(&id_c)));

    // DEL in each version frees the addresses.
    for (id, ns, config) in [
        (&id_a, &ns_a, &config),
        (&id_b, &ns_b, &plain_conf("0.2.0")),
    ] {
        let out = cni(&c, "DEL", id, Some(ns), config);
        assert_eq!((out.code, out.stdout.as_str()), (0, ""), "{}", out.stderr);
        assert_eq!(c.http_get(0, &format!("/ip/{id}")).unwrap().status, 404);
    }
    assert!(!node_links(&c).contains("vethwepl"), "{}", node_links(&c));
}

/// GC frees what the runtime no longer lists, only inside the network's subnet when it
/// has one, and never the node's own address or an allocation that is not the plugin's.
fn real_daemon_gc_frees_only_stale_attachments() {
    let mut c = real_cluster();
    let node_ns = c.nodes[0].ns.clone();
    let (ns_keep, ns_stale, ns_sub) = (
        c.add_netns("gk").unwrap(),
        c.add_netns("gs").unwrap(),
        c.add_netns("gn").unwrap(),
    );
    let (keep, stale, sub) = (unique_id("keep"), unique_id("stale"), unique_id("sub"));
    ok_json(
        &cni(&c, "ADD", &keep, Some(&ns_keep), &plain_conf("1.1.0")),
        "ADD keep",
    );
    ok_json(
        &cni(&c, "ADD", &stale, Some(&ns_stale), &plain_conf("1.1.0")),
        "ADD stale",
    );
    let subnet = subnet_conf("1.1.0", "192.168.78.0/24");
    ok_json(
        &cni(&c, "ADD", &sub, Some(&ns_sub), &subnet),
        "ADD in subnet",
    );
    // Not the plugin's: an id no runtime gives.
    let manual = c.http_post(0, "/ip/test:manual").unwrap();
    assert_eq!(manual.status, 200, "{}", manual.body);
    // A leftover veth tagged with a container that holds nothing (a DEL never came).
    let orphan_id = unique_id("orphan");
    let orphan = host_veth(&orphan_id);
    weft_testbed::ip_in(
        &node_ns,
        &[
            "link", "add", &orphan, "type", "veth", "peer", "name", "gcpeer0",
        ],
    )
    .unwrap();
    weft_testbed::ip_in(&node_ns, &["link", "set", &orphan, "alias", &orphan_id]).unwrap();
    let before = held_ids(&c);
    for id in [&keep, &stale, &sub, "test:manual", "weave:expose"] {
        assert!(before.contains(id), "{id} in {before:?}");
    }

    // Not before 1.1.0; not without the list.
    let out = cni(&c, "GC", "", None, &gc_conf(plain_conf("1.0.0"), &[&keep]));
    assert_eq!(out.error_code(), 1, "{}", out.stdout);
    let out = cni(&c, "GC", "", None, &plain_conf("1.1.0"));
    assert_eq!(out.error_code(), 7, "{}", out.stdout);
    assert_eq!(held_ids(&c), before);

    // The subnet's network sweeps only inside its subnet.
    let out = cni(&c, "GC", "", None, &gc_conf(subnet.clone(), &[&keep]));
    assert_eq!((out.code, out.stdout.as_str()), (0, ""), "{}", out.stderr);
    let after = held_ids(&c);
    assert!(!after.contains(&sub), "{after:?}");
    for id in [&keep, &stale, "test:manual", "weave:expose"] {
        assert!(after.contains(id), "{id} kept: {after:?}");
    }
    let links = node_links(&c);
    assert!(!links.contains(&host_veth(&sub)), "{links}");
    assert!(links.contains(&host_veth(&stale)), "{links}");

    // The whole range's network: the stale attachment and the orphan veth go.
    let out = cni(&c, "GC", "", None, &gc_conf(plain_conf("1.1.0"), &[&keep]));
    assert_eq!((out.code, out.stdout.as_str()), (0, ""), "{}", out.stderr);
    let after = held_ids(&c);
    assert!(!after.contains(&stale), "{after:?}");
    for id in [&keep, "test:manual", "weave:expose"] {
        assert!(after.contains(id), "{id} kept: {after:?}");
    }
    let links = node_links(&c);
    assert!(!links.contains(&host_veth(&stale)), "{links}");
    assert!(!links.contains(&orphan), "{links}");
    assert!(links.contains(&host_veth(&keep)), "{links}");
    let pod = weft_testbed::ip_in(&ns_keep, &["-o", "-4", "addr", "show", "dev", "eth0"]).unwrap();
    assert!(
        pod.contains(" inet "),
        "the kept pod keeps its address: {pod}"
    );

    // Again: nothing left to do.
    let out = cni(&c, "GC", "", None, &gc_conf(plain_conf("1.1.0"), &[&keep]));
    assert_eq!(out.code, 0, "{} {}", out.stdout, out.stderr);
    assert_eq!(held_ids(&c), after);
}

/// STATUS: 0 only while the daemon is ready, else 50 (not running, not ready).
fn real_daemon_status() {
    let mut c = Cluster::create(ClusterSpec::new(1, binaries()))
        .unwrap_or_else(|e| panic!("namespaces: {e}"));
    let out = cni(&c, "STATUS", "", None, &plain_conf("1.1.0"));
    assert_eq!(out.error_code(), 50, "{}", out.stdout);
    assert!(out.stdout.contains("not running"), "{}", out.stdout);
    let out = cni(&c, "STATUS", "", None, &plain_conf("1.0.0"));
    assert_eq!(out.error_code(), 1, "{}", out.stdout);

    // Waiting for a consensus of two that a lone node never reaches: 503.
    c.start_router_with(0, &["--ipalloc-init", "consensus=2"])
        .unwrap();
    let deadline = Instant::now() + READY;
    loop {
        match c.http_get(0, "/status") {
            Ok(r) => {
                assert_eq!(r.status, 503, "{}", r.body);
                break;
            }
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(100)),
            Err(e) => panic!("the router never answered: {e}"),
        }
    }
    let out = cni(&c, "STATUS", "", None, &plain_conf("1.1.0"));
    assert_eq!(out.error_code(), 50, "{}", out.stdout);
    assert!(out.stdout.contains("not ready"), "{}", out.stdout);
    c.stop_router(0, Duration::from_secs(10)).unwrap();

    // On its own (no peers: consensus of one), from a fresh state.
    let db = c.nodes[0].db_dir.clone();
    let _ = std::fs::remove_dir_all(&db);
    std::fs::create_dir_all(&db).unwrap();
    c.start_router(0).unwrap();
    c.wait_ready(0, READY).unwrap_or_else(|e| panic!("{e}"));
    c.wait_overlay_address(0, READY)
        .unwrap_or_else(|e| panic!("{e}"));
    let out = cni(&c, "STATUS", "", None, &plain_conf("1.1.0"));
    assert_eq!(
        (out.code, out.stdout.as_str()),
        (0, ""),
        "ready: {}",
        out.stderr
    );
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// Not a pass/fail criterion beyond "it works": prints ADD and DEL medians.
/// WEFT_CNI_BIN=<path> times another build (e.g. target/release/weft-cni).
fn add_del_timing() {
    let bin = std::env::var("WEFT_CNI_BIN").unwrap_or_else(|_| BIN.to_string());
    let run =
        |env: &[(&str, &str)], stdin: &str, netns: Option<&Netns>| run_bin(&bin, env, stdin, netns);
    let node = Netns::node("tnod");
    let _daemon = FakeDaemon::start(&node);
    let pod = Netns::new("tpod");
    let pod_path = pod.path();
    let (mut adds, mut dels) = (Vec::new(), Vec::new());
    for i in 0..11 {
        let id = format!("{}-{i}", unique_id("t"));
        let t = Instant::now();
        let out = run(&add_env(&id, &pod_path), &conf("1.0.0"), Some(&node));
        adds.push(t.elapsed());
        assert_eq!(out.code, 0, "{} {}", out.stdout, out.stderr);
        let mut env = add_env(&id, &pod_path);
        env[0].1 = "DEL";
        let t = Instant::now();
        let out = run(&env, &conf("1.0.0"), Some(&node));
        dels.push(t.elapsed());
        assert_eq!(out.code, 0, "{} {}", out.stdout, out.stderr);
    }
    eprintln!(
        "{bin} timing over {} runs: ADD median {:?}, DEL median {:?}",
        adds.len(),
        median(adds),
        median(dels)
    );
}

fn main() {
    harness::run(vec![
        harness::plain("version_ignores_dummy_env", version_ignores_dummy_env),
        harness::plain(
            "invalid_json_is_decode_failure",
            invalid_json_is_decode_failure,
        ),
        harness::plain(
            "unsupported_version_is_code_1",
            unsupported_version_is_code_1,
        ),
        harness::plain("missing_or_bad_env_is_code_4", missing_or_bad_env_is_code_4),
        harness::plain(
            "invalid_network_config_is_code_7",
            invalid_network_config_is_code_7,
        ),
        harness::plain(
            "del_without_daemon_asks_to_retry",
            del_without_daemon_asks_to_retry,
        ),
        harness::root(
            "add_without_daemon_leaves_nothing",
            add_without_daemon_leaves_nothing,
        ),
        harness::root(
            "add_without_weave_interface_asks_to_retry",
            add_without_weave_interface_asks_to_retry,
        ),
        harness::root("failed_add_rolls_back", failed_add_rolls_back),
        harness::root("add_check_del_round_trip", add_check_del_round_trip),
        harness::root("add_del_timing", add_del_timing),
        harness::root("refusals_touch_nothing", refusals_touch_nothing),
        harness::root(
            "observations_are_reported_best_effort",
            observations_are_reported_best_effort,
        ),
        harness::root(
            "real_daemon_subnet_dns_and_result_versions",
            real_daemon_subnet_dns_and_result_versions,
        ),
        harness::root(
            "real_daemon_gc_frees_only_stale_attachments",
            real_daemon_gc_frees_only_stale_attachments,
        ),
        harness::root("real_daemon_status", real_daemon_status),
    ])
}
