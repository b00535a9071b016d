//! The kubelet's path, for real: containerd 1.6 with its CRI plugin runs inside each node
//! namespace, and this test plays the kubelet over the CRI socket. It runs weft's DaemonSet
//! pod from `deploy/weft.yaml` as the kubelet would (a host-network sandbox; the
//! `install-cni` init container, then the router container, both from the image
//! `deploy/image.sh` builds, with the manifest's command, args, env, mounts and security
//! context), then ordinary pod sandboxes (RunPodSandbox: containerd calls weft-cni through
//! the conflist the init container wrote), checks that they reach each other across
//! nodes, and removes them (StopPodSandbox, RemovePodSandbox: the address is free again).
//!
//! What stands in for the rest of a cluster, because it cannot run here: the API server
//! (`weft_testbed::kube_api`, reached through a kubeconfig mounted into the router
//! container instead of a service-account token), and each node's root file system (a
//! directory per node for the hostPath volumes; /var/run/netns is the machine's, where all
//! three containerds pin pods' namespaces).
//!
//! Needs root, containerd, runc, buildah and busybox (Debian packages; `.ci/run` installs
//! them).

use hyper_util::rt::TokioIo;
use k8s_cri::v1 as cri;
use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use serde_json::Value;
use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tonic::transport::{Channel, Endpoint, Uri};
use weft_testbed::kube_api::FakeKube;
use weft_testbed::{harness, Binaries, Cluster, ClusterSpec};

const NODES: usize = 3;
const PAUSE_IMAGE: &str = "localhost/weft-test-pause:1";
const READY: Duration = Duration::from_secs(90);

fn ok<T, E: std::fmt::Display>(r: Result<T, E>, what: &str) -> T {
    r.unwrap_or_else(|e| panic!("{what}: {e}"))
}

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn run(cmd: &mut Command, what: &str) -> String {
    let out = ok(cmd.output(), what);
    assert!(
        out.status.success(),
        "{what}: {}\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

// ---------------------------------------------------------------------------------------
// The manifest, as the API server would hand the DaemonSet's pod template to a kubelet.

struct PodTemplate {
    spec: Value,
}

impl PodTemplate {
    fn from_manifest() -> PodTemplate {
        let text = ok(
            std::fs::read_to_string(repo().join("deploy/weft.yaml")),
            "reading deploy/weft.yaml",
        );
        let docs: Vec<Value> = ok(
            serde_saphyr::from_multiple(&text),
            "parsing deploy/weft.yaml",
        );
        let ds = docs
            .into_iter()
            .find(|d| d["kind"] == "DaemonSet")
            .expect("a DaemonSet in deploy/weft.yaml");
        PodTemplate {
            spec: ds["spec"]["template"]["spec"].clone(),
        }
    }

    fn init_containers(&self) -> Vec<Value> {
        self.spec["initContainers"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    fn containers(&self) -> Vec<Value> {
        self.spec["containers"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    fn volume(&self, name: &str) -> Value {
        self.spec["volumes"]
            .as_array()
            .and_then(|v| v.iter().find(|v| v["name"] == name).cloned())
            .unwrap_or_else(|| panic!("volume {name} in the manifest"))
    }
}

/// How the kubelet names an image reference without a registry.
fn normalise_image(image: &str) -> String {
    let first = image.split('/').next().unwrap_or("");
    let has_registry =
        image.contains('/') && (first.contains('.') || first.contains(':') || first == "localhost");
    match (has_registry, image.contains('/')) {
        (true, _) => image.to_string(),
        (false, true) => format!("docker.io/{image}"),
        (false, false) => format!("docker.io/library/{image}"),
    }
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|s| s.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

// ---------------------------------------------------------------------------------------
// One node: its root directory, its containerd, and a kubelet's calls.

struct Node {
    name: String,
    root: PathBuf,
    sock: PathBuf,
    containerd: Option<Child>,
    rt: tokio::runtime::Runtime,
    runtime: RuntimeServiceClient<Channel>,
    images: ImageServiceClient<Channel>,
    sandboxes: Vec<String>,
    /// What each sandbox was created with: the kubelet passes it again with every
    /// container.
    configs: HashMap<String, cri::PodSandboxConfig>,
}

struct Pod {
    node: usize,
    name: String,
    sandbox: String,
    ip: Ipv4Addr,
    netns: String,
}

fn containerd_config(root: &Path, sock: &Path) -> String {
    let r = root.display();
    format!(
        r#"version = 2
root = "{r}/var/lib/containerd"
state = "{r}/run/containerd"
disabled_plugins = ["io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.aufs", "io.containerd.internal.v1.tracing", "io.containerd.tracing.processor.v1.otlp"]
[grpc]
  address = "{sock}"
[ttrpc]
  address = "{sock}.ttrpc"
[debug]
  address = ""
[metrics]
  address = ""
[plugins."io.containerd.internal.v1.opt"]
  path = "{r}/opt/containerd"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{PAUSE_IMAGE}"
  restrict_oom_score_adj = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{r}/opt/cni/bin"
    conf_dir = "{r}/etc/cni/net.d"
    max_conf_num = 1
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
"#,
        sock = sock.display()
    )
}

async fn channel(sock: PathBuf) -> Result<Channel, tonic::transport::Error> {
    Endpoint::try_from("http://[::]:0")?
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let sock = sock.clone();
            async move {
                Ok::<_, std::io::Error>(TokioIo::new(tokio::net::UnixStream::connect(sock).await?))
            }
        }))
        .await
}

impl Node {
    /// Starts containerd in the node's namespace (nsenter: `ip netns exec` would remount
    /// /sys, and runc then finds no cgroup mount) and connects to its CRI socket.
    fn start(name: &str, ns: &str, root: PathBuf, images: &[PathBuf]) -> Node {
        for d in ["opt/cni/bin", "etc/cni/net.d", "var/log/pods", "run"] {
            ok(std::fs::create_dir_all(root.join(d)), "node directories");
        }
        // What the node's OS provides: the reference plugins a runtime needs beside the
        // network's own (loopback for every pod, portmap chained by the conflist).
        for p in ["loopback", "portmap"] {
            ok(
                std::fs::copy(
                    Path::new("/usr/lib/cni").join(p),
                    root.join("opt/cni/bin").join(p),
                ),
                "copying reference CNI plugins",
            );
        }
        // One machine id per node, as each EC2 instance has its own.
        let id: String = format!("{:032x}", u128::from_le_bytes(rand_bytes()));
        ok(std::fs::create_dir_all(root.join("etc")), "etc");
        ok(
            std::fs::write(root.join("etc/machine-id"), format!("{id}\n")),
            "machine-id",
        );

        let sock = root.join("run/containerd.sock");
        let config = root.join("containerd.toml");
        ok(
            std::fs::write(&config, containerd_config(&root, &sock)),
            "containerd config",
        );
        let log = ok(
            std::fs::File::create(root.join("containerd.log")),
            "containerd log",
        );
        let child = ok(
            Command::new("nsenter")
                .arg(format!("--net=/run/netns/{ns}"))
                .arg("containerd")
                .arg("--config")
                .arg(&config)
                .stdin(Stdio::null())
                .stdout(ok(log.try_clone(), "log"))
                .stderr(log)
                .spawn(),
            "starting containerd",
        );
        weft_testbed::register_pid(child.id() as i32);
        let deadline = Instant::now() + Duration::from_secs(30);
        while !sock.exists() {
            assert!(
                Instant::now() < deadline,
                "containerd did not open {}",
                sock.display()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        let rt = ok(
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build(),
            "tokio",
        );
        let ch = ok(
            rt.block_on(channel(sock.clone())),
            "connecting to the CRI socket",
        );
        let mut node = Node {
            name: name.to_string(),
            root,
            sock,
            containerd: Some(child),
            rt,
            runtime: RuntimeServiceClient::new(ch.clone()),
            images: ImageServiceClient::new(ch),
            sandboxes: Vec::new(),
            configs: HashMap::new(),
        };
        for image in images {
            run(
                Command::new("ctr")
                    .arg("-a")
                    .arg(&node.sock)
                    .args(["-n", "k8s.io", "images", "import"])
                    .arg(image),
                "ctr images import",
            );
        }
        let v = ok(
            node.rt
                .block_on(node.runtime.version(cri::VersionRequest::default())),
            "CRI Version",
        )
        .into_inner();
        eprintln!(
            "{name}: {} {} (CRI {})",
            v.runtime_name, v.runtime_version, v.runtime_api_version
        );
        node.wait_network_plugin_state();
        node
    }

    fn wait_network_plugin_state(&mut self) {
        // Only the runtime condition matters before the network exists.
        let status = ok(
            self.rt
                .block_on(self.runtime.status(cri::StatusRequest { verbose: false })),
            "CRI Status",
        )
        .into_inner();
        let conds = status.status.map(|s| s.conditions).unwrap_or_default();
        assert!(
            conds.iter().any(|c| c.r#type == "RuntimeReady" && c.status),
            "runtime not ready: {conds:?}"
        );
    }

    fn network_ready(&mut self) -> bool {
        self.rt
            .block_on(self.runtime.status(cri::StatusRequest { verbose: false }))
            .map(|s| {
                s.into_inner()
                    .status
                    .map(|s| s.conditions)
                    .unwrap_or_default()
                    .iter()
                    .any(|c| c.r#type == "NetworkReady" && c.status)
            })
            .unwrap_or(false)
    }

    fn host_path(&self, path: &str) -> PathBuf {
        // The machine's namespaces are shared by every node here; all else is per node.
        if path == "/var/run/netns" || path == "/run/netns" {
            return PathBuf::from(path);
        }
        self.root.join(path.trim_start_matches('/'))
    }

    fn run_sandbox(&mut self, name: &str, host_network: bool, privileged: bool) -> String {
        self.run_sandbox_with_ports(name, host_network, privileged, Vec::new())
    }

    fn run_sandbox_with_ports(
        &mut self,
        name: &str,
        host_network: bool,
        privileged: bool,
        port_mappings: Vec<cri::PortMapping>,
    ) -> String {
        let uid = format!("{:032x}", u128::from_le_bytes(rand_bytes()));
        let namespace = if host_network {
            "kube-system"
        } else {
            "default"
        };
        let log_dir = self
            .root
            .join(format!("var/log/pods/{namespace}_{name}_{uid}"));
        ok(std::fs::create_dir_all(&log_dir), "pod log dir");
        let config = cri::PodSandboxConfig {
            metadata: Some(cri::PodSandboxMetadata {
                name: name.to_string(),
                uid,
                namespace: namespace.to_string(),
                attempt: 0,
            }),
            hostname: if host_network {
                String::new()
            } else {
                name.to_string()
            },
            log_directory: log_dir.display().to_string(),
            port_mappings,
            linux: Some(cri::LinuxPodSandboxConfig {
                security_context: Some(cri::LinuxSandboxSecurityContext {
                    namespace_options: Some(cri::NamespaceOption {
                        network: if host_network {
                            cri::NamespaceMode::Node as i32
                        } else {
                            cri::NamespaceMode::Pod as i32
                        },
                        pid: cri::NamespaceMode::Container as i32,
                        ipc: cri::NamespaceMode::Pod as i32,
                        ..Default::default()
                    }),
                    privileged,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        let id = ok(
            self.rt
                .block_on(self.runtime.run_pod_sandbox(cri::RunPodSandboxRequest {
                    config: Some(config.clone()),
                    runtime_handler: String::new(),
                })),
            &format!("RunPodSandbox {name} on {}", self.name),
        )
        .into_inner()
        .pod_sandbox_id;
        self.sandboxes.push(id.clone());
        self.configs.insert(id.clone(), config);
        id
    }

    fn sandbox_config(&self, id: &str) -> cri::PodSandboxConfig {
        self.configs
            .get(id)
            .cloned()
            .expect("a sandbox this kubelet created")
    }

    /// Creates and starts one container of the DaemonSet's pod, as the kubelet does from
    /// the pod spec: command, args, env (with the downward API resolved), volume mounts
    /// (hostPath volumes, created as their type says) and security context.
    fn start_container(
        &mut self,
        sandbox: &str,
        c: &Value,
        tmpl: &PodTemplate,
        extra: &ExtraForRouter,
    ) -> String {
        let name = c["name"].as_str().unwrap().to_string();
        let mut envs = Vec::new();
        for e in c["env"].as_array().cloned().unwrap_or_default() {
            let key = e["name"].as_str().unwrap().to_string();
            let value = if let Some(v) = e["value"].as_str() {
                Some(v.to_string())
            } else if let Some(path) = e["valueFrom"]["fieldRef"]["fieldPath"].as_str() {
                Some(match path {
                    "spec.nodeName" => self.name.clone(),
                    "metadata.namespace" => "kube-system".to_string(),
                    other => panic!("fieldRef {other} is not resolved by this test's kubelet"),
                })
            } else if e["valueFrom"]["secretKeyRef"].is_object() {
                // No Secret exists: an optional key is left out, a required one stops the pod.
                assert_eq!(
                    e["valueFrom"]["secretKeyRef"]["optional"], true,
                    "{key} needs a Secret"
                );
                None
            } else {
                panic!("env {key}: unsupported source {e}");
            };
            if let Some(value) = value {
                envs.push(cri::KeyValue { key, value });
            }
        }
        let mut mounts = Vec::new();
        for m in c["volumeMounts"].as_array().cloned().unwrap_or_default() {
            let vol = tmpl.volume(m["name"].as_str().unwrap());
            let host = self.host_path(
                vol["hostPath"]["path"]
                    .as_str()
                    .expect("hostPath volumes only"),
            );
            match vol["hostPath"]["type"].as_str().unwrap_or("") {
                "DirectoryOrCreate" => ok(std::fs::create_dir_all(&host), "hostPath dir"),
                "File" => assert!(host.is_file(), "hostPath File {} missing", host.display()),
                other => panic!("hostPath type {other:?} not handled"),
            }
            let propagation = match m["mountPropagation"].as_str() {
                Some("HostToContainer") => cri::MountPropagation::PropagationHostToContainer,
                Some("Bidirectional") => cri::MountPropagation::PropagationBidirectional,
                _ => cri::MountPropagation::PropagationPrivate,
            };
            mounts.push(cri::Mount {
                container_path: m["mountPath"].as_str().unwrap().to_string(),
                host_path: host.display().to_string(),
                readonly: m["readOnly"] == true,
                propagation: propagation as i32,
                ..Default::default()
            });
        }
        if name == extra.container {
            envs.push(cri::KeyValue {
                key: "KUBECONFIG".into(),
                value: extra.kubeconfig_in_container.clone(),
            });
            mounts.push(cri::Mount {
                container_path: extra.kubeconfig_in_container.clone(),
                host_path: extra.kubeconfig.display().to_string(),
                readonly: true,
                ..Default::default()
            });
        }
        let sc = &c["securityContext"];
        let security = cri::LinuxContainerSecurityContext {
            privileged: sc["privileged"] == true,
            readonly_rootfs: sc["readOnlyRootFilesystem"] == true,
            run_as_user: sc["runAsUser"]
                .as_i64()
                .map(|value| cri::Int64Value { value }),
            no_new_privs: sc["allowPrivilegeEscalation"] == false,
            capabilities: Some(cri::Capability {
                add_capabilities: strings(&sc["capabilities"]["add"]),
                drop_capabilities: strings(&sc["capabilities"]["drop"]),
                ..Default::default()
            }),
            namespace_options: Some(cri::NamespaceOption {
                network: cri::NamespaceMode::Node as i32,
                pid: cri::NamespaceMode::Container as i32,
                ipc: cri::NamespaceMode::Pod as i32,
                ..Default::default()
            }),
            ..Default::default()
        };
        let image = normalise_image(c["image"].as_str().unwrap());
        let present = ok(
            self.rt
                .block_on(self.images.image_status(cri::ImageStatusRequest {
                    image: Some(cri::ImageSpec {
                        image: image.clone(),
                        ..Default::default()
                    }),
                    verbose: false,
                })),
            "ImageStatus",
        )
        .into_inner()
        .image
        .is_some();
        assert!(
            present,
            "image {image} not on {} (imagePullPolicy IfNotPresent, nothing to pull from)",
            self.name
        );
        let config = cri::ContainerConfig {
            metadata: Some(cri::ContainerMetadata {
                name: name.clone(),
                attempt: 0,
            }),
            image: Some(cri::ImageSpec {
                image,
                ..Default::default()
            }),
            command: strings(&c["command"]),
            args: strings(&c["args"]),
            envs,
            mounts,
            log_path: format!("{name}/0.log"),
            linux: Some(cri::LinuxContainerConfig {
                security_context: Some(security),
                ..Default::default()
            }),
            ..Default::default()
        };
        let sandbox_config = self.sandbox_config(sandbox);
        let id = ok(
            self.rt
                .block_on(self.runtime.create_container(cri::CreateContainerRequest {
                    pod_sandbox_id: sandbox.to_string(),
                    config: Some(config),
                    sandbox_config: Some(sandbox_config),
                })),
            &format!("CreateContainer {name} on {}", self.name),
        )
        .into_inner()
        .container_id;
        ok(
            self.rt
                .block_on(self.runtime.start_container(cri::StartContainerRequest {
                    container_id: id.clone(),
                })),
            &format!("StartContainer {name} on {}", self.name),
        );
        id
    }

    fn container_status(&mut self, id: &str) -> cri::ContainerStatus {
        ok(
            self.rt
                .block_on(self.runtime.container_status(cri::ContainerStatusRequest {
                    container_id: id.to_string(),
                    verbose: false,
                })),
            "ContainerStatus",
        )
        .into_inner()
        .status
        .expect("container status")
    }

    fn container_log(&self, sandbox_log_dir: &Path, name: &str) -> String {
        // CRI log format: "<time> <stream> <F|P> <line>".
        std::fs::read_to_string(sandbox_log_dir.join(format!("{name}/0.log")))
            .unwrap_or_default()
            .lines()
            .map(|l| l.splitn(4, ' ').nth(3).unwrap_or(l))
            .collect::<Vec<_>>()
            .join("\n")
    }

    fn log_dir(&mut self, sandbox: &str) -> PathBuf {
        PathBuf::from(self.sandbox_config(sandbox).log_directory)
    }

    /// The DaemonSet's pod on this node: init containers run to completion in order, then
    /// the containers start.
    fn run_daemonset_pod(
        &mut self,
        tmpl: &PodTemplate,
        extra: &ExtraForRouter,
    ) -> (String, PathBuf) {
        let host_network = tmpl.spec["hostNetwork"] == true;
        assert!(host_network, "weft's pod uses the host's network");
        let privileged = tmpl
            .init_containers()
            .iter()
            .chain(tmpl.containers().iter())
            .any(|c| c["securityContext"]["privileged"] == true);
        let sandbox = self.run_sandbox("weft", true, privileged);
        let log_dir = self.log_dir(&sandbox);
        for c in tmpl.init_containers() {
            let name = c["name"].as_str().unwrap().to_string();
            let id = self.start_container(&sandbox, &c, tmpl, extra);
            let deadline = Instant::now() + Duration::from_secs(60);
            loop {
                let st = self.container_status(&id);
                if st.state == cri::ContainerState::ContainerExited as i32 {
                    let log = self.container_log(&log_dir, &name);
                    assert_eq!(
                        st.exit_code, 0,
                        "init container {name} on {}: {log}",
                        self.name
                    );
                    eprintln!("{}: init container {name}:\n{log}", self.name);
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "init container {name} still running"
                );
                std::thread::sleep(Duration::from_millis(200));
            }
        }
        for c in tmpl.containers() {
            self.start_container(&sandbox, &c, tmpl, extra);
        }
        (sandbox, log_dir)
    }

    fn run_pod(&mut self, node: usize, name: &str) -> Pod {
        self.run_pod_with_ports(node, name, Vec::new())
    }

    fn run_pod_with_ports(&mut self, node: usize, name: &str, ports: Vec<cri::PortMapping>) -> Pod {
        let sandbox = self.run_sandbox_with_ports(name, false, false, ports);
        let st = ok(
            self.rt.block_on(
                self.runtime
                    .pod_sandbox_status(cri::PodSandboxStatusRequest {
                        pod_sandbox_id: sandbox.clone(),
                        verbose: false,
                    }),
            ),
            "PodSandboxStatus",
        )
        .into_inner()
        .status
        .expect("sandbox status");
        let ip: Ipv4Addr = ok(
            st.network
                .as_ref()
                .map(|n| n.ip.clone())
                .unwrap_or_default()
                .parse(),
            "pod IP",
        );
        let netns_path = self.netns_of(&sandbox);
        let netns = Path::new(&netns_path)
            .file_name()
            .unwrap()
            .to_string_lossy()
            .into_owned();
        Pod {
            node,
            name: name.to_string(),
            sandbox,
            ip,
            netns,
        }
    }

    /// The pod's network namespace, as containerd pinned it (from the sandbox's runtime
    /// spec in the verbose status).
    fn netns_of(&mut self, sandbox: &str) -> String {
        let st = ok(
            self.rt.block_on(
                self.runtime
                    .pod_sandbox_status(cri::PodSandboxStatusRequest {
                        pod_sandbox_id: sandbox.to_string(),
                        verbose: true,
                    }),
            ),
            "PodSandboxStatus",
        )
        .into_inner();
        let info: Value = ok(
            serde_json::from_str(st.info.get("info").map(String::as_str).unwrap_or("{}")),
            "sandbox info",
        );
        info["runtimeSpec"]["linux"]["namespaces"]
            .as_array()
            .and_then(|ns| ns.iter().find(|n| n["type"] == "network"))
            .and_then(|n| n["path"].as_str())
            .expect("the sandbox's network namespace path")
            .to_string()
    }

    fn stop_and_remove(&mut self, sandbox: &str) -> Result<(), tonic::Status> {
        self.rt
            .block_on(self.runtime.stop_pod_sandbox(cri::StopPodSandboxRequest {
                pod_sandbox_id: sandbox.to_string(),
            }))?;
        self.rt.block_on(
            self.runtime
                .remove_pod_sandbox(cri::RemovePodSandboxRequest {
                    pod_sandbox_id: sandbox.to_string(),
                }),
        )?;
        self.sandboxes.retain(|s| s != sandbox);
        Ok(())
    }
}

impl Drop for Node {
    /// Pods first (containerd stops their containers, calls CNI DEL, unpins their
    /// namespaces), then containerd, then anything of this node left behind: shims started
    /// for its socket, and mounts under its root.
    fn drop(&mut self) {
        for s in self.sandboxes.clone().into_iter().rev() {
            if let Err(e) = self.stop_and_remove(&s) {
                eprintln!("{}: removing sandbox {s}: {e}", self.name);
            }
        }
        if let Some(mut child) = self.containerd.take() {
            let pid = child.id() as i32;
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGTERM,
            );
            let deadline = Instant::now() + Duration::from_secs(10);
            while child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(100));
            }
            let _ = child.kill();
            let _ = child.wait();
            weft_testbed::unregister_pid(pid);
        }
        let sock = self.sock.display().to_string();
        if let Ok(procs) = std::fs::read_dir("/proc") {
            for p in procs.flatten() {
                let cmdline = std::fs::read(p.path().join("cmdline")).unwrap_or_default();
                let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
                if cmdline.contains("containerd-shim") && cmdline.contains(&sock) {
                    if let Ok(pid) = p.file_name().to_string_lossy().parse::<i32>() {
                        let _ = nix::sys::signal::kill(
                            nix::unistd::Pid::from_raw(pid),
                            nix::sys::signal::Signal::SIGKILL,
                        );
                    }
                }
            }
        }
        let root = self.root.display().to_string();
        let mut mounts: Vec<String> = std::fs::read_to_string("/proc/self/mountinfo")
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.split(' ').nth(4).map(String::from))
            .filter(|m| m.starts_with(&root))
            .collect();
        mounts.sort_by_key(|m| std::cmp::Reverse(m.len()));
        for m in mounts {
            let _ = nix::mount::umount2(m.as_str(), nix::mount::MntFlags::MNT_DETACH);
        }
    }
}

fn rand_bytes() -> [u8; 16] {
    let mut b = [0u8; 16];
    ok(
        std::fs::File::open("/dev/urandom")
            .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut b)),
        "urandom",
    );
    b
}

/// The one thing this test adds to the router container: API access by kubeconfig.
struct ExtraForRouter {
    container: String,
    kubeconfig: PathBuf,
    kubeconfig_in_container: String,
}

// ---------------------------------------------------------------------------------------
// Images.

fn build_images(dir: &Path) -> Vec<PathBuf> {
    let weft = dir.join("weft-image.tar");
    let out = run(
        Command::new(repo().join("deploy/image.sh")).arg(&weft),
        "deploy/image.sh",
    );
    eprintln!("{}", out.trim());
    // The sandbox ("pause") image: nothing can be pulled here, so busybox sleeping.
    let pause = dir.join("pause.tar");
    let b = |args: &[&str]| {
        run(
            Command::new("buildah")
                .args(["--storage-driver", "vfs"])
                .args(args),
            "buildah",
        )
    };
    let ctr = b(&["from", "scratch"]).trim().to_string();
    b(&["copy", &ctr, "/bin/busybox", "/bin/busybox"]);
    b(&[
        "config",
        "--entrypoint",
        r#"["/bin/busybox","sleep","2147483647"]"#,
        &ctr,
    ]);
    b(&[
        "commit",
        "--quiet",
        "--rm",
        "--format",
        "oci",
        &ctr,
        &format!("oci-archive:{}:{PAUSE_IMAGE}", pause.display()),
    ]);
    vec![weft, pause]
}

// ---------------------------------------------------------------------------------------

fn weft_s_daemonset_pod_and_pods_on_three_nodes_through_containerd_s_cri() {
    let weft = PathBuf::from(env!("CARGO_BIN_EXE_weft"));
    let binaries = ok(Binaries::beside(weft), "binaries");
    let mut spec = ClusterSpec::new(NODES, binaries);
    spec.static_peers = false;
    let mut c = ok(Cluster::create(spec), "node namespaces");
    let images = build_images(c.workdir());
    let (api_ns, api_ip) = ok(c.add_underlay_host("api"), "API host");
    let api = ok(
        FakeKube::start(&api_ns, api_ip, 6443),
        "stand-in API server",
    );
    let kubeconfig = c.workdir().join("kubeconfig");
    ok(std::fs::write(&kubeconfig, api.kubeconfig()), "kubeconfig");
    for n in &c.nodes {
        api.add_node(&n.nickname, n.underlay_ip);
    }
    let tmpl = PodTemplate::from_manifest();
    let extra = ExtraForRouter {
        container: "weft".into(),
        kubeconfig,
        kubeconfig_in_container: "/etc/weft-test/kubeconfig".into(),
    };

    // Declared after the cluster: dropped (pods, containerd) before its namespaces go.
    let mut nodes: Vec<Node> = c
        .nodes
        .iter()
        .map(|n| {
            Node::start(
                &n.nickname,
                &n.ns,
                c.workdir().join(format!("{}-root", n.nickname)),
                &images,
            )
        })
        .collect();
    for node in nodes.iter_mut() {
        assert!(!node.network_ready(), "no network before weft is installed");
    }

    let mut router_logs = Vec::new();
    for node in nodes.iter_mut() {
        let (_, log_dir) = node.run_daemonset_pod(&tmpl, &extra);
        router_logs.push(log_dir);
    }
    for (i, node) in nodes.iter_mut().enumerate() {
        // The kubelet's readiness probe: GET 127.0.0.1:6784/status from the node.
        let deadline = Instant::now() + READY;
        loop {
            if c.http_get(i, "/status").is_ok_and(|r| r.status == 200) {
                break;
            }
            if Instant::now() > deadline {
                panic!(
                    "{}: router not ready; its log:\n{}",
                    node.name,
                    node.container_log(&router_logs[i], "weft")
                );
            }
            std::thread::sleep(Duration::from_millis(500));
        }
        // The init container put the plugin and conflist where containerd looks.
        let conf = node.root.join("etc/cni/net.d/10-weft.conflist");
        assert!(conf.is_file(), "{} missing", conf.display());
        for p in ["weft", "weave-net"] {
            assert!(
                node.root.join("opt/cni/bin").join(p).is_file(),
                "{p} not installed"
            );
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        while !node.network_ready() {
            assert!(
                Instant::now() < deadline,
                "{}: CRI NetworkReady never true",
                node.name
            );
            std::thread::sleep(Duration::from_millis(500));
        }
    }
    for (i, node) in nodes.iter().enumerate() {
        let log = node.container_log(&router_logs[i], "weft");
        let first: Vec<&str> = log.lines().take(3).collect();
        eprintln!(
            "{} router log (first lines):\n  {}",
            node.name,
            first.join("\n  ")
        );
        assert!(log.contains("Kubernetes mode: Node"), "{log}");
    }

    // Ordinary pods, two per node, as the kubelet creates them.
    let mut pods = Vec::new();
    for (i, node) in nodes.iter_mut().enumerate() {
        for k in 0..2 {
            let pod = node.run_pod(i, &format!("pod-{}-{k}", node.name));
            eprintln!(
                "pod {:<10} on {}: {} (sandbox {}, netns {})",
                pod.name,
                node.name,
                pod.ip,
                &pod.sandbox[..12],
                pod.netns
            );
            pods.push(pod);
        }
    }
    let range: ipnet::Ipv4Net = "192.168.0.0/16".parse().unwrap();
    let mut seen = std::collections::BTreeSet::new();
    for p in &pods {
        assert!(
            range.contains(&p.ip),
            "{} outside the manifest's IPALLOC_RANGE",
            p.ip
        );
        assert!(seen.insert(p.ip), "{} given twice", p.ip);
        // The router holds it under the sandbox id the runtime passed as CNI_CONTAINERID.
        let r = ok(
            c.http_get(p.node, &format!("/ip/{}", p.sandbox)),
            "GET /ip/{id}",
        );
        assert_eq!(r.status, 200, "{}", r.body);
        assert!(r.body.starts_with(&format!("{}/", p.ip)), "{}", r.body);
    }
    // A hostPort: containerd hands the mapping to portmap, chained after weft in the
    // conflist; a host outside the cluster reaches the pod through n2's address and the
    // pod sees the client's own address (NO_MASQ_LOCAL).
    let web = nodes[1].run_pod_with_ports(
        1,
        "web",
        vec![cri::PortMapping {
            protocol: cri::Protocol::Tcp as i32,
            container_port: 8080,
            host_port: 30500,
            host_ip: String::new(),
        }],
    );
    let n2 = c.nodes[1].underlay_ip;
    let seen = ok(
        weft_testbed::tcp_check_via(
            &api_ns,
            SocketAddrV4::new(n2, 30500),
            &web.netns,
            SocketAddrV4::new(web.ip, 8080),
            Duration::from_secs(10),
        ),
        "outside -> hostPort 30500 on n2 -> pod web",
    )
    .client_seen_as;
    assert_eq!(
        seen.ip(),
        std::net::IpAddr::V4(api_ip),
        "the pod sees the client"
    );
    eprintln!(
        "hostPort {n2}:30500 -> pod web ({}:8080) on n2 through portmap: seen as {seen}",
        web.ip
    );
    ok(nodes[1].stop_and_remove(&web.sandbox), "remove pod web");

    // Every pod reaches every pod on another node, and its own node's other pod.
    let mut checks = 0;
    for a in &pods {
        for b in &pods {
            if std::ptr::eq(a, b) {
                continue;
            }
            let port = weft_testbed::next_test_port();
            let out = ok(
                weft_testbed::tcp_check(
                    &a.netns,
                    &b.netns,
                    SocketAddrV4::new(b.ip, port),
                    Duration::from_secs(10),
                ),
                &format!("TCP {} -> {}", a.name, b.name),
            );
            assert_eq!(
                out.client_seen_as.ip(),
                std::net::IpAddr::V4(a.ip),
                "no NAT between pods"
            );
            checks += 1;
        }
    }
    eprintln!(
        "{checks} TCP connections between the {} pods: all passed",
        pods.len()
    );

    // Removal: StopPodSandbox (CNI DEL) and RemovePodSandbox free the address.
    let gone: Vec<(usize, String, Ipv4Addr)> = pods
        .iter()
        .filter(|p| p.name.ends_with("-0"))
        .map(|p| (p.node, p.sandbox.clone(), p.ip))
        .collect();
    for (i, sandbox, ip) in &gone {
        ok(
            nodes[*i].stop_and_remove(sandbox),
            "StopPodSandbox/RemovePodSandbox",
        );
        let r = ok(c.http_get(*i, &format!("/ip/{sandbox}")), "GET /ip/{id}");
        assert_eq!(r.status, 404, "{ip} still held after removal: {}", r.body);
        let all = ok(c.http_get(*i, "/ip"), "GET /ip").body;
        assert!(
            !all.contains(&format!("\"{ip}")),
            "{ip} still listed: {all}"
        );
        eprintln!("removed {} on n{}: {ip} is free", &sandbox[..12], i + 1);
    }
    // The address comes back to a new pod eventually; the remaining pods still talk.
    let (a, b) = (&pods[1], &pods[3]);
    ok(
        weft_testbed::tcp_check(
            &a.netns,
            &b.netns,
            SocketAddrV4::new(b.ip, weft_testbed::next_test_port()),
            Duration::from_secs(10),
        ),
        "TCP after removals",
    );
}

fn main() {
    harness::run(vec![harness::root_with(
        "weft_s_daemonset_pod_and_pods_on_three_nodes_through_containerd_s_cri",
        &["containerd", "ctr", "runc", "buildah", "nsenter"],
        weft_s_daemonset_pod_and_pods_on_three_nodes_through_containerd_s_cri,
    )])
}
