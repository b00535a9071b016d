//! A handle on a cluster of real Kubernetes parts made by `deploy/local/cluster.sh`, the
//! entry point users have too: the tests bring it up, drive it with kubectl (inside the
//! control plane's namespace, as `cluster.sh kubectl` does), look into nodes, and take it
//! down on drop (also while unwinding from a failed assertion, and on SIGINT/SIGTERM
//! through the same registry as [`crate::Cluster`]).

use crate::{failed, io_err, netns_path, Result, TestbedError};
use serde_json::Value;
use std::io::Write;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// One local cluster, known by its `--name`.
pub struct LocalCluster {
    pub name: String,
    script: PathBuf,
    /// Nodes brought up so far (1-based names `node1`...).
    pub nodes: usize,
    keep: bool,
}

fn render(args: &[&str]) -> String {
    args.join(" ")
}

fn checked(what: String, out: Output) -> Result<String> {
    if !out.status.success() {
        return Err(TestbedError::Command {
            cmd: what,
            status: out.status.to_string(),
            stderr: format!(
                "{}{}",
                String::from_utf8_lossy(&out.stderr).trim(),
                String::from_utf8_lossy(&out.stdout).trim()
            ),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

impl LocalCluster {
    /// `cluster.sh up --name NAME ARGS...`; returns when every node is Ready with weft's
    /// pod Ready on it. A failed `up` has removed what it built.
    pub fn up(repo: &Path, name: &str, nodes: usize, args: &[&str]) -> Result<LocalCluster> {
        let script = repo.join("deploy/local/cluster.sh");
        crate::register_local_cluster(&script, name);
        let mut cluster = LocalCluster {
            name: name.to_string(),
            script,
            nodes,
            keep: std::env::var_os("WEFT_LOCAL_KEEP").is_some(),
        };
        let n = nodes.to_string();
        let mut all = vec!["--nodes", &n];
        all.extend_from_slice(args);
        let started = Instant::now();
        // Leftovers of an interrupted earlier run under the same name go first.
        let _ = cluster.script(&["down"]);
        match cluster.script(&["up"].iter().chain(all.iter()).copied().collect::<Vec<_>>()) {
            Ok(_) => {
                eprintln!(
                    "local cluster {name}: up in {:.0} s ({nodes} nodes {})",
                    started.elapsed().as_secs_f64(),
                    render(args)
                );
                Ok(cluster)
            }
            Err(e) => {
                cluster.keep = false;
                Err(e)
            }
        }
    }

    /// `cluster.sh control-plane`: etcd, the API server, controller-manager and scheduler
    /// in `netns` (an existing namespace where `address` is configured), with
    /// deploy/weft.yaml applied and no nodes: for routers a test runs itself.
    pub fn control_plane(
        repo: &Path,
        name: &str,
        netns: &str,
        address: Ipv4Addr,
    ) -> Result<LocalCluster> {
        let script = repo.join("deploy/local/cluster.sh");
        crate::register_local_cluster(&script, name);
        let cluster = LocalCluster {
            name: name.to_string(),
            script,
            nodes: 0,
            keep: std::env::var_os("WEFT_LOCAL_KEEP").is_some(),
        };
        let _ = cluster.script(&["down"]);
        let a = address.to_string();
        cluster.script(&["control-plane", "--netns", netns, "--address", &a])?;
        Ok(cluster)
    }

    /// A kubeconfig for weft's ServiceAccount (a token from the TokenRequest API): what
    /// the router's pod would authenticate as, with the manifest's roles and nothing else.
    pub fn service_account_kubeconfig(&self, server: Ipv4Addr) -> Result<String> {
        let token = self.kubectl(&[
            "-n",
            "kube-system",
            "create",
            "token",
            "weft",
            "--duration=2h",
        ])?;
        let ca = self.state_dir().join("pki/ca.crt");
        Ok(format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: local\n  cluster:\n    server: https://{server}:6443\n    certificate-authority: {}\nusers:\n- name: weft\n  user:\n    token: {}\ncontexts:\n- name: weft\n  context: {{cluster: local, user: weft}}\ncurrent-context: weft\n",
            ca.display(),
            token.trim()
        ))
    }

    fn command(&self, sub: &str) -> Command {
        let mut cmd = Command::new(&self.script);
        cmd.arg(sub).args(["--name", &self.name]);
        cmd
    }

    /// `cluster.sh SUB --name NAME REST...` for up/down/add-node/info.
    fn script(&self, args: &[&str]) -> Result<String> {
        let (sub, rest) = args.split_first().ok_or_else(|| failed("no subcommand"))?;
        let mut cmd = Command::new(&self.script);
        cmd.arg(sub).args(rest).args(["--name", &self.name]);
        let out = cmd
            .stdin(Stdio::null())
            .output()
            .map_err(io_err(format!("running cluster.sh {}", render(args))))?;
        checked(format!("cluster.sh {}", render(args)), out)
    }

    /// `cluster.sh SUB --name NAME ARGS...` for the pass-through subcommands.
    fn passthrough(&self, sub: &str, args: &[&str], stdin: Option<&str>) -> Result<String> {
        let mut cmd = self.command(sub);
        cmd.args(args)
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .map_err(io_err(format!("running cluster.sh {sub}")))?;
        if let Some(input) = stdin {
            let mut pipe = child.stdin.take().expect("piped stdin");
            pipe.write_all(input.as_bytes())
                .map_err(io_err("writing to cluster.sh's stdin"))?;
        }
        let out = child
            .wait_with_output()
            .map_err(io_err(format!("waiting for cluster.sh {sub}")))?;
        checked(format!("cluster.sh {sub} {}", render(args)), out)
    }

    /// kubectl as cluster admin; stdout.
    pub fn kubectl(&self, args: &[&str]) -> Result<String> {
        self.passthrough("kubectl", args, None)
    }

    /// kubectl with `-o json`, parsed.
    pub fn kubectl_json(&self, args: &[&str]) -> Result<Value> {
        let mut all = args.to_vec();
        all.extend_from_slice(&["-o", "json"]);
        let text = self.kubectl(&all)?;
        serde_json::from_str(&text).map_err(|e| failed(format!("kubectl {args:?}: {e}")))
    }

    /// `kubectl apply -f -` with these manifests.
    pub fn apply(&self, yaml: &str) -> Result<String> {
        self.passthrough("kubectl", &["apply", "-f", "-"], Some(yaml))
    }

    /// `kubectl exec POD -- CMD...` in the default namespace (`ns/pod` for another).
    pub fn exec(&self, pod: &str, cmd: &[&str]) -> Result<String> {
        let (ns, pod) = pod.split_once('/').unwrap_or(("default", pod));
        let mut args = vec!["-n", ns, "exec", pod, "--"];
        args.extend_from_slice(cmd);
        self.kubectl(&args)
    }

    /// A command in node `i`'s network and mount namespaces (what a shell on it sees).
    pub fn on_node(&self, i: usize, cmd: &[&str]) -> Result<String> {
        let n = i.to_string();
        let mut args = vec![n.as_str()];
        args.extend_from_slice(cmd);
        self.passthrough("node", &args, None)
    }

    pub fn add_node(&mut self) -> Result<String> {
        let out = self.script(&["add-node"])?;
        self.nodes += 1;
        Ok(out.trim().to_string())
    }

    pub fn stop_node(&self, i: usize) -> Result<()> {
        self.passthrough("stop-node", &[&i.to_string()], None)
            .map(|_| ())
    }

    /// `cluster.sh apiserver stop|start|freeze|thaw`
    pub fn apiserver(&self, what: &str) -> Result<()> {
        self.passthrough("apiserver", &[what], None).map(|_| ())
    }

    /// `cluster.sh import ARCHIVE`: an OCI archive into every node's containerd.
    pub fn import(&self, archive: &Path) -> Result<()> {
        let a = archive.display().to_string();
        self.passthrough("import", &[&a], None).map(|_| ())
    }

    /// The network namespace of node `i` (a `weft` router's HTTP API is on its loopback).
    pub fn node_netns(&self, i: usize) -> String {
        format!("wl{}-node{i}", self.name)
    }

    /// The host outside the cluster: its namespace and address.
    pub fn outside(&self) -> (String, Ipv4Addr) {
        (
            format!("wl{}-out", self.name),
            Ipv4Addr::new(172, 31, 250, 2),
        )
    }

    /// Node `i`'s address on the underlay (its InternalIP).
    pub fn node_ip(&self, i: usize) -> Ipv4Addr {
        Ipv4Addr::new(172, 31, i as u8, 2)
    }

    /// Where node `i`'s daemons log (containerd.log, kubelet.log, kube-proxy.log).
    pub fn node_dir(&self, i: usize) -> PathBuf {
        PathBuf::from(format!("/var/lib/weft-local/{}/node{i}", self.name))
    }

    pub fn state_dir(&self) -> PathBuf {
        PathBuf::from(format!("/var/lib/weft-local/{}", self.name))
    }

    /// Whether the cluster's namespaces still exist (for checks after `down`).
    pub fn exists(&self) -> bool {
        netns_path(&format!("wl{}-cp", self.name)).exists()
    }

    /// Polls `cond` every 500 ms until it returns `Ok(Some(_))`, failing with the last
    /// reason after `timeout`.
    pub fn wait<T>(
        &self,
        what: &str,
        timeout: Duration,
        mut cond: impl FnMut() -> Result<Option<T>>,
    ) -> Result<T> {
        let deadline = Instant::now() + timeout;
        let mut last = String::from("no answer yet");
        loop {
            match cond() {
                Ok(Some(v)) => return Ok(v),
                Ok(None) => {}
                Err(e) => last = e.to_string(),
            }
            if Instant::now() > deadline {
                return Err(TestbedError::Timeout {
                    what: format!("{what} (last: {last})"),
                    after: timeout,
                });
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    /// What a failed test should show: pods, nodes, events and weft's logs.
    pub fn diagnostics(&self) -> String {
        let mut s = String::new();
        for args in [
            &["get", "nodes", "-o", "wide"][..],
            &["get", "pods", "-A", "-o", "wide"],
            &["get", "events", "-A", "--sort-by=.lastTimestamp"],
        ] {
            s.push_str(&format!("----- kubectl {} -----\n", args.join(" ")));
            s.push_str(&self.kubectl(args).unwrap_or_else(|e| e.to_string()));
        }
        if let Ok(pods) = self.kubectl(&[
            "-n",
            "kube-system",
            "get",
            "pods",
            "-l",
            "app.kubernetes.io/name=weft",
            "-o",
            "name",
        ]) {
            for pod in pods.lines() {
                s.push_str(&format!("----- logs {pod} (last 30) -----\n"));
                s.push_str(
                    &self
                        .kubectl(&["-n", "kube-system", "logs", "--tail=30", pod])
                        .unwrap_or_else(|e| e.to_string()),
                );
            }
        }
        s
    }

    /// Takes the cluster down now (drop does the same).
    pub fn down(mut self) -> Result<()> {
        self.keep = false;
        let r = self.script(&["down"]).map(|_| ());
        crate::unregister_local_cluster(&self.name);
        std::mem::forget(self);
        r
    }
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("local cluster {}:\n{}", self.name, self.diagnostics());
        }
        if self.keep {
            eprintln!(
                "local cluster {} kept (WEFT_LOCAL_KEEP): deploy/local/cluster.sh down --name {}",
                self.name, self.name
            );
            return;
        }
        if let Err(e) = self.script(&["down"]) {
            eprintln!("local cluster {}: down failed: {e}", self.name);
        }
        crate::unregister_local_cluster(&self.name);
    }
}

/// A real control plane (`cluster.sh control-plane`) on a routed testbed cluster, with
/// deploy/weft.yaml applied, for routers the test starts itself: each authenticates as
/// the manifest's ServiceAccount (a TokenRequest token), with nothing but its roles.
pub struct ApiCluster {
    pub c: crate::Cluster,
    pub api: LocalCluster,
    pub kubeconfig: PathBuf,
    /// The API server's namespace and address: a host on the underlay, not a Node.
    pub api_ns: String,
    pub api_ip: Ipv4Addr,
}

impl ApiCluster {
    pub fn new(repo: &Path, mut spec: crate::ClusterSpec) -> Result<ApiCluster> {
        spec.static_peers = false;
        spec.underlay = crate::Underlay::Routed;
        let mut c = crate::Cluster::create(spec)?;
        let (api_ns, api_ip) = c.add_underlay_host("api")?;
        let name = format!("k{}", std::process::id() % 100_000);
        let api = LocalCluster::control_plane(repo, &name, &api_ns, api_ip)?;
        let kubeconfig = c.workdir().join("kubeconfig");
        std::fs::write(&kubeconfig, api.service_account_kubeconfig(api_ip)?)
            .map_err(io_err("writing the kubeconfig"))?;
        Ok(ApiCluster {
            c,
            api,
            kubeconfig,
            api_ns,
            api_ip,
        })
    }

    /// A Node for node `i`, as a kubelet registers it: the object, then its status with the
    /// InternalIP and a Ready condition.
    pub fn register_node(&self, i: usize) -> Result<()> {
        register_node(&self.api, &self.c.nodes[i])
    }

    /// Starts node `i`'s router in Kubernetes mode (its Node's name as `NODE_NAME`).
    pub fn start_router(&mut self, i: usize, env: &[(&str, &str)]) -> Result<()> {
        let nick = self.c.nodes[i].nickname.clone();
        let kc = self.kubeconfig.display().to_string();
        let mut all = vec![("KUBECONFIG", kc.as_str()), ("NODE_NAME", nick.as_str())];
        all.extend_from_slice(env);
        self.c.start_router_env(i, &[], &all)
    }

    /// A pod as the kubelet would make it, bound to node `i`: the object first (so policy
    /// knows its labels), then the sandbox through weft-cni with the pod's namespace and
    /// name, then its address reported in the pod's status.
    pub fn add_pod(
        &mut self,
        i: usize,
        pod_yaml: &str,
        namespace: &str,
        name: &str,
    ) -> Result<crate::Pod> {
        self.api.apply(pod_yaml)?;
        let pod = self.c.add_k8s_pod(i, namespace, name)?;
        let status = serde_json::json!({"status": {
            "phase": "Running",
            "podIP": pod.addr.to_string(),
            "podIPs": [{"ip": pod.addr.to_string()}]}});
        self.api.kubectl(&[
            "-n",
            namespace,
            "patch",
            "pod",
            name,
            "--subresource=status",
            "--type=merge",
            "-p",
            &status.to_string(),
        ])?;
        Ok(pod)
    }
}

/// A Node for testbed node `n` in `api`, as a kubelet registers it: the object, then its
/// status with the InternalIP and a Ready condition.
pub fn register_node(api: &LocalCluster, n: &crate::Node) -> Result<()> {
    api.apply(&format!(

        "apiVersion: v1\nkind: Node\nmetadata:\n  name: {}\n  labels: {{kubernetes.io/hostname: {}}}\n",
        n.nickname, n.nickname
    ))?;
    let now = now_rfc3339();
    let status = serde_json::json!({"status": {
        "addresses": [{"type": "InternalIP", "address": n.underlay_ip.to_string()},
                      {"type": "Hostname", "address": n.nickname}],
        "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady",
                        "message": "a test stands in for the kubelet",
                        "lastHeartbeatTime": now, "lastTransitionTime": now}]}});
    api.kubectl(&[
        "patch",
        "node",
        &n.nickname,
        "--subresource=status",
        "--type=merge",
        "-p",
        &status.to_string(),
    ])?;
    Ok(())
}

/// Now, as RFC 3339 in UTC (what Kubernetes' time fields take).
fn now_rfc3339() -> String {
    let out = Command::new("date")
        .args(["-u", "+%Y-%m-%dT%H:%M:%SZ"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    out
}
