//! Runs the built weft-cni binary the way a container runtime does.
//!
//! Tests that touch namespaces need root: weft-testbed's harness reports them as ignored
//! without root and fails them under CI without root. All
//! their traffic stays inside namespaces they create (a "node" with a `weave` TUN and
//! a fake daemon on its own 127.0.0.1:6784, plus "pod" namespaces).

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
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl FakeDaemon {
    fn start(node: &Netns) -> FakeDaemon {
        let requests = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let ns_file = File::open(node.path()).unwrap();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (reqs, stop2) = (requests.clone(), stop.clone());
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
                        serve_one(stream, &reqs, &mut held, &mut next);
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
            stop,
            thread: Some(thread),
        }
    }

    fn requests(&self) -> Vec<String> {
        self.requests.lock().unwrap().clone()
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
        json!({"cniVersion":"1.0.0","supportedVersions":["0.3.0","0.3.1","0.4.0","1.0.0"]})
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

fn invalid_json_is_decode_failure() {
    let out = run(&add_env("abc", "/var/run/netns/none"), "{not json", None);
    assert_eq!(out.error_code(), 6);
    assert_eq!(out.json()["cniVersion"], "1.0.0");
}

fn unsupported_version_is_code_1() {
    let out = run(&add_env("abc", "/var/run/netns/none"), &conf("0.2.0"), None);
    assert_eq!(out.error_code(), 1);
    assert!(out.json()["details"].as_str().unwrap().contains("0.2.0"));
}

fn missing_or_bad_env_is_code_7() {
    let c = conf("0.3.1");
    for drop in ["CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_PATH"] {
        let env: Vec<_> = add_env("abc", "/var/run/netns/none")
            .into_iter()
            .filter(|(k, _)| *k != drop)
            .collect();
        let out = run(&env, &c, None);
        assert_eq!(out.error_code(), 7, "without {drop}");
        // Errors answer in the version the config declared.
        assert_eq!(out.json()["cniVersion"], "0.3.1");
    }
    let out = run(&add_env("a/b", "/var/run/netns/none"), &c, None);
    assert_eq!(out.error_code(), 7);
    let out = run(&[("CNI_COMMAND", "BOGUS")], &c, None);
    assert_eq!(out.error_code(), 7);
    let out = run(&[], &c, None);
    assert_eq!(out.error_code(), 7);
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
    assert_eq!(out.error_code(), 4);
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
    assert_eq!(run(&env, &conf("1.0.0"), Some(&node)).error_code(), 4);
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
    assert_eq!(out.error_code(), 7, "{}", out.stdout);
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
    assert_eq!(out.error_code(), 4, "{}", out.stdout);
    assert!(out.stdout.contains("too large"), "{}", out.stdout);
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
        harness::plain("missing_or_bad_env_is_code_7", missing_or_bad_env_is_code_7),
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
    ])
}
