//! The live page (`GET /`) in a real browser: headless Chromium, driven over the DevTools
//! protocol, renders a 3-node cluster's page from inside node n1's network namespace.
//!
//! Chromium runs in the node namespace (`ip netns exec`), so it reaches that node's
//! 127.0.0.1:6784 and nothing outside the test's namespaces; its host resolver maps every
//! name to "not found" besides. The DevTools protocol goes over a pipe
//! (`--remote-debugging-pipe`: fds 3 and 4, NUL-separated JSON), so no debugging port is
//! opened anywhere. The test waits for what the page shows instead of a time budget, and
//! collects every uncaught exception, `console.error`/`warn` and error log entry the page
//! causes; a positive control at the start shows that the collector sees them.
//!
//! Needs root (namespaces) and `chromium` (Debian's package; `.ci/run` installs it). The
//! screenshot goes to `$WEFT_SCREENSHOT` (default `target/live-page.png`), the rendered
//! DOM beside it (`.html`).

use serde_json::{json, Value};
use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};
use weft::api::report::Report;
use weft_testbed::{self as testbed, harness, Binaries, Cluster, ClusterSpec, Pod};

const READY: Duration = Duration::from_secs(60);
const PAGE: &str = "http://127.0.0.1:6784/";
const WIDTH: u32 = 1400;
const HEIGHT: u32 = 1000;

fn ok<T, E: std::fmt::Display>(r: Result<T, E>, what: &str) -> T {
    r.unwrap_or_else(|e| panic!("{what}: {e}"))
}

// --- a minimal DevTools client over the pipe -------------------------------------------

/// Headless Chromium in a network namespace, one page attached. Dropping it kills the
/// browser (its helper processes live in the node namespace, which the cluster's Drop
/// empties by PID).
struct Browser {
    child: Child,
    commands: File,
    answers: mpsc::Receiver<Value>,
    next_id: u64,
    session: String,
    /// Every event received, in order (the page's errors are among them).
    events: Vec<Value>,
    log: PathBuf,
    _profile: tempfile::TempDir,
}

impl Browser {
    fn launch(ns: &str, log: PathBuf) -> Browser {
        let profile = ok(
            tempfile::Builder::new().prefix("weft-chromium-").tempdir(),
            "profile dir",
        );
        let flags = [
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--no-default-browser-check",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-default-apps",
            "--disable-extensions",
            "--disable-sync",
            "--metrics-recording-only",
            "--mute-audio",
            "--password-store=basic",
            // No name resolves: nothing but the literal 127.0.0.1 can be reached.
            "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
            "--remote-debugging-pipe",
        ];
        let (cmd_r, cmd_w) = ok(nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC), "pipe");
        let (ans_r, ans_w) = ok(nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC), "pipe");
        let out = ok(File::create(&log), "chromium log");
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", ns, "chromium"])
            .args(flags)
            .arg(format!("--window-size={WIDTH},{HEIGHT}"))
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg("about:blank")
            .stdin(Stdio::null())
            .stdout(Stdio::from(ok(out.try_clone(), "log")))
            .stderr(Stdio::from(out));
        let (r, w) = (cmd_r.as_raw_fd(), ans_w.as_raw_fd());
        // SAFETY: between fork and exec only async-signal-safe calls (fcntl, dup2).
        unsafe {
            cmd.pre_exec(move || {
                // The DevTools pipe is fds 3 (commands in) and 4 (answers out). Copy both
                // above 4 first, so that one dup2 cannot clobber the other's source.
                let r2 = libc::fcntl(r, libc::F_DUPFD_CLOEXEC, 10);
                let w2 = libc::fcntl(w, libc::F_DUPFD_CLOEXEC, 10);
                if r2 < 0 || w2 < 0 || libc::dup2(r2, 3) < 0 || libc::dup2(w2, 4) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = ok(cmd.spawn(), "starting chromium (Debian package `chromium`)");
        testbed::register_pid(child.id() as i32);
        drop((cmd_r, ans_w));
        let (tx, answers) = mpsc::channel();
        std::thread::spawn(move || read_messages(ans_r, tx));
        let mut b = Browser {
            child,
            commands: File::from(cmd_w),
            answers,
            next_id: 0,
            session: String::new(),
            events: Vec::new(),
            log,
            _profile: profile,
        };
        let target = b.browser_call("Target.createTarget", json!({"url": "about:blank"}));
        let target = target["targetId"].as_str().expect("targetId").to_string();
        let attached = b.browser_call(
            "Target.attachToTarget",
            json!({"targetId": target, "flatten": true}),
        );
        b.session = attached["sessionId"]
            .as_str()
            .expect("sessionId")
            .to_string();
        for domain in ["Runtime.enable", "Log.enable", "Page.enable"] {
            b.call(domain, json!({}));
        }
        b.call(
            "Emulation.setDeviceMetricsOverride",
            json!({"width": WIDTH, "height": HEIGHT, "deviceScaleFactor": 1, "mobile": false}),
        );
        b
    }

    fn send(&mut self, session: Option<String>, method: &str, params: Value) -> Value {
        self.next_id += 1;
        let id = self.next_id;
        let mut msg = json!({"id": id, "method": method, "params": params});
        if let Some(s) = session {
            msg["sessionId"] = Value::String(s);
        }
        let mut bytes = msg.to_string().into_bytes();
        bytes.push(0);
        if let Err(e) = self.commands.write_all(&bytes) {
            panic!("DevTools {method}: {e}; {}", self.log_tail());
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.answers.recv_timeout(left) {
                Ok(m) if m["id"].as_u64() == Some(id) => {
                    if let Some(err) = m.get("error") {
                        panic!("DevTools {method} failed: {err}");
                    }
                    return m["result"].clone();
                }
                Ok(m) => self.events.push(m),
                Err(e) => panic!("DevTools {method}: no answer ({e}); {}", self.log_tail()),
            }
        }
    }

    fn browser_call(&mut self, method: &str, params: Value) -> Value {
        self.send(None, method, params)
    }

    /// A command to the page.
    fn call(&mut self, method: &str, params: Value) -> Value {
        let s = self.session.clone();
        self.send(Some(s), method, params)
    }

    /// Evaluates `expr` in the page; its value (JSON-compatible).
    fn eval(&mut self, expr: &str) -> Value {
        let r = self.call(
            "Runtime.evaluate",
            json!({"expression": expr, "returnByValue": true}),
        );
        if let Some(ex) = r.get("exceptionDetails") {
            panic!("evaluating {expr}: {ex}");
        }
        r["result"]["value"].clone()
    }

    fn open(&mut self, url: &str) {
        let r = self.call("Page.navigate", json!({"url": url}));
        if let Some(e) = r.get("errorText") {
            panic!("opening {url}: {e}; {}", self.log_tail());
        }
    }

    /// Polls `expr` until it is `true`; fails after `timeout` showing `what` and the
    /// page's state.
    fn wait_for(&mut self, expr: &str, timeout: Duration, what: &str) {
        let deadline = Instant::now() + timeout;
        // The page may still be loading (no body yet): that is "not yet", not a failure.
        let guarded =
            format!("(() => {{ try {{ return !!({expr}); }} catch (e) {{ return false; }} }})()");
        loop {
            if self.eval(&guarded) == Value::Bool(true) {
                return;
            }
            if Instant::now() > deadline {
                let state = self.eval(
                    "document.body ? document.body.dataset.state + ' / ' + \
                     document.getElementById('banner').textContent : 'no body'",
                );
                panic!(
                    "timed out after {timeout:?} waiting for {what} (page: {state}); \
                     page problems: {:?}",
                    self.problems()
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// What the page reported as wrong: uncaught exceptions, console errors and warnings,
    /// error log entries (failed loads, refused content), renderer crashes.
    fn problems(&mut self) -> Vec<String> {
        while let Ok(m) = self.answers.try_recv() {
            self.events.push(m);
        }
        self.events.iter().filter_map(problem).collect()
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        format!(
            "chromium log tail:\n{}",
            lines[lines.len().saturating_sub(20)..].join("\n")
        )
    }

    fn close(mut self) {
        let _ = self.browser_call("Browser.close", json!({}));
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        // Drop kills it.
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let pid = self.child.id() as i32;
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
        testbed::unregister_pid(pid);
    }
}

/// Reads NUL-terminated JSON messages until the browser closes its end.
fn read_messages(fd: OwnedFd, tx: mpsc::Sender<Value>) {
    let mut r = BufReader::new(File::from(fd));
    let mut buf = Vec::new();
    loop {
        buf.clear();
        match r.read_until(0, &mut buf) {
            Ok(0) | Err(_) => return,
            Ok(_) => {
                if buf.last() == Some(&0) {
                    buf.pop();
                }
                match serde_json::from_slice(&buf) {
                    Ok(v) => {
                        if tx.send(v).is_err() {
                            return;
                        }
                    }
                    Err(e) => eprintln!("unparsable DevTools message ({e})"),
                }
            }
        }
    }
}

/// The event as a problem of the page, if it is one.
fn problem(m: &Value) -> Option<String> {
    let p = &m["params"];
    match m["method"].as_str()? {
        "Runtime.exceptionThrown" => {
            let d = &p["exceptionDetails"];
            Some(format!(
                "uncaught exception: {} {}",
                d["text"].as_str().unwrap_or(""),
                d["exception"]["description"].as_str().unwrap_or("")
            ))
        }
        "Runtime.consoleAPICalled" => {
            let kind = p["type"].as_str().unwrap_or("");
            if !matches!(kind, "error" | "assert" | "warning") {
                return None;
            }
            let args: Vec<String> = p["args"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|a| {
                    a["value"]
                        .as_str()
                        .map(str::to_string)
                        .or_else(|| a["description"].as_str().map(str::to_string))
                        .unwrap_or_else(|| a.to_string())
                })
                .collect();
            Some(format!("console.{kind}: {}", args.join(" ")))
        }
        "Log.entryAdded" => {
            let e = &p["entry"];
            (e["level"] == "error").then(|| {
                format!(
                    "log error ({}): {} {}",
                    e["source"].as_str().unwrap_or(""),
                    e["text"].as_str().unwrap_or(""),
                    e["url"].as_str().unwrap_or("")
                )
            })
        }
        "Inspector.targetCrashed" => Some("the renderer crashed".into()),
        _ => None,
    }
}

// --- PNG and base64 -------------------------------------------------------------------

fn base64_decode(s: &str) -> Vec<u8> {
    let val = |c: u8| -> u32 {
        match c {
            b'A'..=b'Z' => u32::from(c - b'A'),
            b'a'..=b'z' => u32::from(c - b'a') + 26,
            b'0'..=b'9' => u32::from(c - b'0') + 52,
            b'+' => 62,
            b'/' => 63,
            _ => panic!("not base64: {c:?}"),
        }
    };
    let clean: Vec<u8> = s.bytes().filter(|c| !c.is_ascii_whitespace()).collect();
    let mut out = Vec::with_capacity(clean.len() / 4 * 3);
    for chunk in clean.chunks(4) {
        let data: Vec<u8> = chunk.iter().copied().filter(|c| *c != b'=').collect();
        let mut n = 0u32;
        for (i, c) in data.iter().enumerate() {
            n |= val(*c) << (18 - 6 * i);
        }
        let bytes = n.to_be_bytes();
        out.extend_from_slice(&bytes[1..data.len()]);
    }
    out
}

/// Width and height from a PNG's IHDR.
fn png_size(png: &[u8]) -> Option<(u32, u32)> {
    if png.len() < 24 || &png[..8] != b"\x89PNG\r\n\x1a\n" || &png[12..16] != b"IHDR" {
        return None;
    }
    let w = u32::from_be_bytes(png[16..20].try_into().ok()?);
    let h = u32::from_be_bytes(png[20..24].try_into().ok()?);
    Some((w, h))
}

/// Captures the viewport as PNG into `path`; the PNG.
fn screenshot(br: &mut Browser, path: &Path) -> Vec<u8> {
    let png = br.call(
        "Page.captureScreenshot",
        json!({"format": "png", "captureBeyondViewport": false}),
    );
    let png = base64_decode(png["data"].as_str().expect("screenshot data"));
    ok(std::fs::write(path, &png), "writing a screenshot");
    png
}

fn screenshot_path() -> PathBuf {
    match std::env::var_os("WEFT_SCREENSHOT") {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => Path::new(env!("CARGO_TARGET_TMPDIR"))
            .parent()
            .unwrap_or(Path::new("target"))
            .join("live-page.png"),
    }
}

// --- the test ---------------------------------------------------------------------------

fn binaries() -> Binaries {
    Binaries::beside(env!("CARGO_BIN_EXE_weft")).unwrap_or_else(|e| panic!("{e}"))
}

fn tcp(c: &Cluster, from: &Pod, to: &Pod) {
    ok(
        c.tcp_pod_to_pod(from, to),
        &format!("TCP {} -> {}", from.name, to.name),
    );
}

/// Pairs of peers with an established connection in `Router.Peers` (either side's word).
fn established_pairs(r: &Report) -> usize {
    let mut pairs = std::collections::BTreeSet::new();
    for p in &r.router.peers {
        for x in p.connections.iter().filter(|x| x.established) {
            let (a, b) = (p.name.clone(), x.name.clone());
            pairs.insert(if a < b { (a, b) } else { (b, a) });
        }
    }
    pairs.len()
}

/// Waits until n1's report shows traffic to and from both other nodes, and every peer
/// with its two established connections (those of n2 and n3 reach n1 by gossip).
fn wait_converged(c: &Cluster) {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mesh_wait = Duration::from_secs(15);
    let mesh_deadline = Instant::now() + mesh_wait;
    loop {
        let r: Report = ok(c.report(0), "GET /report");
        let moved = ["n2", "n3"].iter().all(|nick| {
            r.dataplane
                .peers
                .iter()
                .any(|p| p.nick_name == *nick && p.tx_bytes > 0 && p.rx_bytes > 0)
        });
        let meshed = established_pairs(&r) == 3;
        if moved && (meshed || Instant::now() > mesh_deadline) {
            if !meshed {
                // The page draws what the report says (checked below); gossip of the
                // other peers' connections is the daemon's business.
                eprintln!(
                    "note: n1's report shows {} of 3 connected pairs after {mesh_wait:?}",
                    established_pairs(&r)
                );
            }
            return;
        }
        assert!(
            Instant::now() < deadline,
            "n1's Dataplane.Peers shows no traffic with n2 and n3: {:?}",
            r.dataplane.peers
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// What the page shows, read from its DOM.
const FACTS: &str = r##"(() => {
  const t = sel => Array.from(document.querySelectorAll(sel), e =>
    e.cells ? Array.from(e.cells, c => c.textContent.trim()).join(" | ") : e.textContent.trim());
  return JSON.stringify({
    state: document.body.dataset.state,
    updates: Number(document.body.dataset.updates),
    title: document.getElementById("title").textContent,
    graphNicks: t("#graph g.peer text.nick"),
    graphSelf: t("#graph g.peer.self text.nick"),
    established: document.querySelectorAll("#graph line.edge.est").length,
    ringLabels: t("#ring text.owner"),
    ringArcs: Array.from(document.querySelectorAll("#ring path.entry"), e => e.getAttribute("data-owner")),
    ringCentre: t("#ring > text"),
    owners: t("#owners tbody tr"),
    routes: t("#routes tbody tr"),
    conns: t("#conns tbody tr"),
    traffic: t("#traffic tbody tr"),
    drops: t("#drops tbody tr"),
    refused: t("#refused tbody tr"),
    bannerHidden: document.getElementById("banner").hidden
  });
})()"##;

fn facts(b: &mut Browser) -> Value {
    let text = b.eval(FACTS);
    ok(
        serde_json::from_str(text.as_str().expect("FACTS is a string")),
        "FACTS",
    )
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .into_iter()
        .flatten()
        .filter_map(|s| s.as_str().map(str::to_string))
        .collect()
}

/// Whether a table row (cells joined by " | ") names `nick` in a cell of its own or as
/// the first word of one.
fn has_row(rows: &[String], nick: &str) -> bool {
    rows.iter().any(|r| {
        r.split(" | ")
            .any(|cell| cell.split_whitespace().next() == Some(nick))
    })
}

fn live_page_shows_the_cluster_and_the_daemon_going_away() {
    let mut c = ok(
        Cluster::create(ClusterSpec::new(3, binaries())),
        "building namespaces",
    );
    ok(c.start_all(), "starting routers");
    ok(c.wait_all_ready(READY), "waiting for readiness");
    let a = ok(c.add_pod(0, "a"), "ADD a");
    let b = ok(c.add_pod(1, "b"), "ADD b");
    let d = ok(c.add_pod(2, "d"), "ADD d");
    for (x, y) in [(&a, &b), (&b, &d), (&d, &a), (&a, &d)] {
        tcp(&c, x, y);
    }
    wait_converged(&c);

    // Declared after the cluster: dropped (killed) before it.
    let mut br = Browser::launch(&c.nodes[0].ns, c.workdir().join("chromium.log"));

    // Positive control: the collector does see a page's errors.
    br.open("data:text/html,<script>console.error('control-error');null.x</script>");
    let deadline = Instant::now() + Duration::from_secs(10);
    while br.problems().len() < 2 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    let control = br.problems();
    assert!(
        control.iter().any(|p| p.contains("control-error"))
            && control.iter().any(|p| p.contains("TypeError")),
        "the error collector missed the control page's errors: {control:?}"
    );
    br.events.clear();

    br.open(PAGE);
    br.wait_for(
        "document.body.dataset.state === 'ok' && Number(document.body.dataset.updates) >= 2",
        Duration::from_secs(20),
        "two rendered reports",
    );
    // Traffic while the page polls, so that its rates are computed from moving counters.
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(3) {
        tcp(&c, &a, &b);
        tcp(&c, &d, &a);
        std::thread::sleep(Duration::from_millis(200));
    }
    let seen = facts(&mut br)["updates"].as_u64().unwrap_or(0);
    br.wait_for(
        &format!("Number(document.body.dataset.updates) >= {}", seen + 1),
        Duration::from_secs(10),
        "one more update",
    );

    let f = facts(&mut br);
    let report = ok(c.http_get(0, "/report"), "GET /report").body;
    let shot = screenshot_path();
    if let Some(dir) = shot.parent() {
        ok(std::fs::create_dir_all(dir), "screenshot dir");
    }
    ok(
        std::fs::write(shot.with_extension("report.json"), &report),
        "writing the report",
    );
    let nicks = ["n1", "n2", "n3"];
    let mut graph = strings(&f["graphNicks"]);
    graph.sort();
    assert_eq!(graph, nicks, "peer graph: {f:#}");
    assert_eq!(strings(&f["graphSelf"]), ["n1"], "this node: {f:#}");
    // As many edges as the report has connected pairs (3 once gossip has told n1 of the
    // n2-n3 connection); the report is read again until both agree, as either may be a
    // poll behind the other.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let want = established_pairs(&ok(c.report(0), "GET /report"));
        let drawn = facts(&mut br)["established"].as_u64().unwrap_or(0) as usize;
        if drawn == want && want >= 2 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the graph draws {drawn} established connections, the report has {want}: {f:#}"
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    let mut arcs = strings(&f["ringArcs"]);
    arcs.sort();
    arcs.dedup();
    assert_eq!(arcs, nicks, "ring arcs by owner: {f:#}");
    let labels = strings(&f["ringLabels"]);
    for nick in nicks {
        assert!(labels.iter().any(|l| l == nick), "ring label {nick}: {f:#}");
        assert!(
            has_row(&strings(&f["owners"]), nick),
            "legend {nick}: {f:#}"
        );
        assert!(has_row(&strings(&f["routes"]), nick), "route {nick}: {f:#}");
    }
    assert!(
        strings(&f["ringCentre"])
            .iter()
            .any(|t| t == "192.168.0.0/16"),
        "ring centre: {f:#}"
    );
    let traffic = strings(&f["traffic"]);
    for nick in ["n2", "n3"] {
        let row = traffic
            .iter()
            .find(|r| r.split_whitespace().next() == Some(nick))
            .map(|r| r.replace(" | ", "  "))
            .unwrap_or_else(|| panic!("no traffic row for {nick}: {f:#}"));
        assert!(row.contains("B/s"), "no rate for {nick}: {row}");
        assert!(!row.contains(" 0 B "), "no bytes counted for {nick}: {row}");
    }
    assert_eq!(strings(&f["conns"]).len(), 2, "connections: {f:#}");
    assert!(!strings(&f["refused"]).is_empty(), "refused: {f:#}");
    assert!(!strings(&f["drops"]).is_empty(), "drops: {f:#}");
    assert_eq!(f["bannerHidden"], true, "banner shown: {f:#}");
    assert!(f["title"].as_str().unwrap_or("").contains("n1"), "{f:#}");

    // The rendered DOM and a screenshot, for people.
    let dom = br.eval("document.documentElement.outerHTML");
    ok(
        std::fs::write(shot.with_extension("html"), dom.as_str().unwrap_or("")),
        "writing the DOM",
    );
    let png = screenshot(&mut br, &shot);
    assert_eq!(png_size(&png), Some((WIDTH, HEIGHT)), "{}", shot.display());
    // A blank or nearly blank page compresses to a few KB.
    assert!(png.len() > 40_000, "screenshot of {} bytes", png.len());
    eprintln!("screenshot: {} ({} bytes)", shot.display(), png.len());

    let problems = br.problems();
    assert!(
        problems.is_empty(),
        "the page reported problems: {problems:#?}"
    );

    // The daemon goes away: a banner says so, the page keeps polling, and recovers.
    ok(c.kill_router(0), "SIGKILL n1");
    br.wait_for(
        "document.body.dataset.state === 'down' && !document.getElementById('banner').hidden \
         && document.getElementById('banner').textContent.includes('retrying')",
        Duration::from_secs(15),
        "the daemon-down banner",
    );
    let down = shot.with_file_name(format!(
        "{}-down.png",
        shot.file_stem().unwrap_or_default().to_string_lossy()
    ));
    screenshot(&mut br, &down);
    ok(c.start_router(0), "restarting n1");
    ok(c.wait_ready(0, READY), "n1 ready after restart");
    br.wait_for(
        "document.body.dataset.state === 'ok' && document.getElementById('banner').hidden",
        Duration::from_secs(20),
        "the page to recover",
    );
    // While the daemon was down the browser logged the refused /report fetches; nothing
    // else may have gone wrong.
    let unexpected: Vec<String> = br
        .problems()
        .into_iter()
        .filter(|p| !(p.starts_with("log error (network)") && p.ends_with("/report")))
        .collect();
    assert!(
        unexpected.is_empty(),
        "problems while the daemon was away: {unexpected:#?}"
    );
    br.close();
}

fn main() {
    harness::run(vec![harness::root_with(
        "live_page_shows_the_cluster_and_the_daemon_going_away",
        &["chromium"],
        live_page_shows_the_cluster_and_the_daemon_going_away,
    )])
}
