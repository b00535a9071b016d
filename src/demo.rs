//! `weft demo`: a local cluster in network namespaces, built with the real binaries.
//!
//! It starts one `weft router` per node namespace, attaches pods through `weft-cni` exactly
//! as a container runtime would, checks TCP between every ordered pair of pods, prints
//! what `weft status` says on node 1 and a pass/fail matrix, and removes everything again
//! (also on Ctrl-C).

use anyhow::{bail, Context};
use std::path::PathBuf;
use std::time::{Duration, Instant};
use weft_testbed::{self as testbed, Binaries, Cluster, ClusterSpec, Pod};

/// What `weft demo` builds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DemoOptions {
    /// Node namespaces, each running a router (1..=50).
    pub nodes: usize,
    /// Pods attached on every node (1..=20).
    pub pods_per_node: usize,
}

impl Default for DemoOptions {
    fn default() -> Self {
        DemoOptions {
            nodes: 3,
            pods_per_node: 2,
        }
    }
}

const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// Runs the demo. `Ok(true)` when every pod reached every other pod.
pub fn run(opts: DemoOptions) -> anyhow::Result<bool> {
    if !testbed::is_root() {
        bail!("weft demo needs root: it creates network namespaces, veths and a bridge (try `sudo weft demo`)");
    }
    if !(1..=50).contains(&opts.nodes) {
        bail!("--nodes must be between 1 and 50, got {}", opts.nodes);
    }
    if !(1..=20).contains(&opts.pods_per_node) {
        bail!(
            "--pods must be between 1 and 20, got {}",
            opts.pods_per_node
        );
    }
    let binaries = find_binaries()?;
    testbed::install_signal_cleanup().context("installing the Ctrl-C cleanup")?;

    let t0 = Instant::now();
    let step = |msg: String| println!("[{:6.2}s] {msg}", t0.elapsed().as_secs_f64());

    let mut cluster = Cluster::create(ClusterSpec::new(opts.nodes, binaries.clone()))
        .context("building the namespaces")?;
    step(format!(
        "underlay namespace {} with bridge br0, {}/24",
        cluster.underlay_ns, cluster.underlay_net
    ));
    for n in &cluster.nodes {
        step(format!(
            "node {} ({}): namespace {}, underlay {}",
            n.nickname, n.name, n.ns, n.underlay_ip
        ));
    }

    cluster.start_all().context("starting routers")?;
    for i in 0..opts.nodes {
        step(format!(
            "started `{} router` in {} (pid {}), log {}",
            binaries.weft.display(),
            cluster.nodes[i].nickname,
            cluster.router_pid(i).unwrap_or(0),
            cluster.nodes[i].log.display()
        ));
    }
    cluster
        .wait_all_ready(READY_TIMEOUT)
        .context("waiting for the routers to become ready")?;
    step("all routers ready (IPAM consensus reached)".into());

    let mut pods = Vec::new();
    for node in 0..opts.nodes {
        for j in 0..opts.pods_per_node {
            let name = format!("{}-p{}", cluster.nodes[node].nickname, j + 1);
            let pod = cluster
                .add_pod(node, &name)
                .with_context(|| format!("attaching pod {name}"))?;
            step(format!(
                "pod {} on {}: {}/{} (weft-cni ADD {} ms)",
                pod.name,
                cluster.nodes[node].nickname,
                pod.addr,
                pod.prefix_len,
                pod.add_duration.as_millis()
            ));
            pods.push(pod);
        }
    }

    let pairs = pods.len() * pods.len().saturating_sub(1);
    step(format!(
        "TCP between every ordered pair of pods ({pairs} connections, 64 KiB each)"
    ));
    let mut results = vec![vec![None; pods.len()]; pods.len()];
    let mut failures = Vec::new();
    let (mut same_node, mut cross_node) = (Vec::new(), Vec::new());
    for (a, from) in pods.iter().enumerate() {
        for (b, to) in pods.iter().enumerate() {
            if a == b {
                continue;
            }
            let r = cluster.tcp_pod_to_pod(from, to);
            match &r {
                Ok(out) if from.node == to.node => same_node.push(out.elapsed),
                Ok(out) => cross_node.push(out.elapsed),
                Err(e) => failures.push(format!("{} -> {}: {e}", from.name, to.name)),
            }
            results[a][b] = Some(r.is_ok());
        }
    }
    step(format!(
        "done; time per connection: same node {}, across nodes {}",
        summarize(&mut same_node),
        summarize(&mut cross_node)
    ));

    for args in [&["status"][..], &["status", "ipam"], &["status", "routes"]] {
        println!(
            "\n$ weft {}    (in {})",
            args.join(" "),
            cluster.nodes[0].ns
        );
        match cluster.weft_cli(0, args) {
            Ok((ok, out, err)) => {
                print!("{out}");
                if !ok {
                    println!("(exit status non-zero) {}", err.trim());
                }
            }
            Err(e) => println!("(could not run: {e})"),
        }
    }

    println!();
    print!("{}", render_matrix(&pods, &cluster, &results));
    let passed = results
        .iter()
        .flatten()
        .filter(|r| **r == Some(true))
        .count();
    println!("\n{passed}/{pairs} pod pairs connected");
    for f in &failures {
        println!("FAIL {f}");
    }
    if !failures.is_empty() {
        println!("\n{}", cluster.all_log_tails(20));
    }
    drop(cluster);
    step("removed all namespaces and stopped the routers".into());
    Ok(failures.is_empty())
}

/// "median M ms, max X ms" (or "-" when empty).
fn summarize(times: &mut [Duration]) -> String {
    if times.is_empty() {
        return "-".into();
    }
    times.sort();
    format!(
        "median {:.1} ms, max {:.1} ms",
        times[times.len() / 2].as_secs_f64() * 1e3,
        times[times.len() - 1].as_secs_f64() * 1e3
    )
}

/// Rows: from; columns: to. Pods are numbered; the legend gives name, address and node.
fn render_matrix(pods: &[Pod], cluster: &Cluster, results: &[Vec<Option<bool>>]) -> String {
    let mut s = String::from("Connectivity (TCP, rows: from, columns: to)\n");
    let name_w = pods.iter().map(|p| p.name.len()).max().unwrap_or(4).max(4);
    s.push_str(&format!(
        "  {:>3}  {:<name_w$}  {:<18}  node\n",
        "#", "pod", "address"
    ));
    for (i, p) in pods.iter().enumerate() {
        s.push_str(&format!(
            "  {:>3}  {:<name_w$}  {:<18}  {}\n",
            i + 1,
            p.name,
            format!("{}/{}", p.addr, p.prefix_len),
            cluster.nodes[p.node].nickname
        ));
    }
    s.push('\n');
    s.push_str(&format!("  {:>3}  {:<name_w$} ", "", "from \\ to"));
    for i in 0..pods.len() {
        s.push_str(&format!(" {:>4}", i + 1));
    }
    s.push('\n');
    for (a, p) in pods.iter().enumerate() {
        s.push_str(&format!("  {:>3}  {:<name_w$} ", a + 1, p.name));
        for r in &results[a] {
            let cell = match r {
                None => "-",
                Some(true) => "ok",
                Some(false) => "FAIL",
            };
            s.push_str(&format!(" {cell:>4}"));
        }
        s.push('\n');
    }
    s
}

/// This executable, and `weft-cni` next to it, else `$WEFT_CNI_BIN`, else on `PATH`.
fn find_binaries() -> anyhow::Result<Binaries> {
    let weft = std::env::current_exe().context("locating the weft executable")?;
    let beside = weft.with_file_name("weft-cni");
    let weft_cni = if beside.is_file() {
        beside
    } else if let Some(p) = std::env::var_os("WEFT_CNI_BIN").map(PathBuf::from) {
        if !p.is_file() {
            bail!("WEFT_CNI_BIN={} is not a file", p.display());
        }
        p
    } else {
        std::env::var_os("PATH")
            .iter()
            .flat_map(std::env::split_paths)
            .map(|dir| dir.join("weft-cni"))
            .find(|p| p.is_file())
            .with_context(|| {
                format!(
                    "weft-cni not found next to {}, in $WEFT_CNI_BIN or on PATH \
                     (build it with `cargo build --workspace`)",
                    weft.display()
                )
            })?
    };
    Ok(Binaries { weft, weft_cni })
}
