#!/usr/bin/env bash
# A Kubernetes cluster of real parts on one machine, with weft installed by its own
# manifest: no Docker, no kind, nothing pulled.
#
#   deploy/local/cluster.sh up [--nodes N] [--datapath userspace|kernel] [--password]
#                              [--underlay-mtu BYTES] [--name NAME]
#   deploy/local/cluster.sh kubectl ARGS...      kubectl as cluster admin
#   deploy/local/cluster.sh add-node             one more worker node (joins, runs pods)
#   deploy/local/cluster.sh stop-node N          node N fails: every process on it killed,
#                                                its link to the underlay down
#   deploy/local/cluster.sh apiserver stop|start|freeze|thaw
#                                                the API server gone or hung for a while
#   deploy/local/cluster.sh import ARCHIVE...    an OCI image archive into every node
#   deploy/local/cluster.sh node N CMD...        CMD in node N's network and mount namespace
#   deploy/local/cluster.sh outside CMD...       CMD on the host outside the cluster
#   deploy/local/cluster.sh info                 what runs where (addresses, logs, PIDs)
#   deploy/local/cluster.sh control-plane --netns NS --address IP
#                                                only the control plane (etcd, API server,
#                                                controller-manager, scheduler), in an
#                                                existing namespace where IP is
#                                                configured, with deploy/weft.yaml applied
#                                                and no nodes (for routers run by hand)
#   deploy/local/cluster.sh down                 removes everything
#
# `--name` (or WEFT_LOCAL_NAME; default "weft") lets several clusters coexist; every
# subcommand takes it. Needs root.
#
# What it is (README, "A real cluster on this machine"):
# - Kubernetes 1.20.2 built from Debian's source package (deploy/local/build-k8s.sh,
#   cached outside the clone), etcd from Debian;
# - a routed underlay: a router namespace with one /24 per machine behind it, as EC2
#   subnets; the control plane (etcd, kube-apiserver with RBAC and the Node authorizer,
#   controller-manager, scheduler) in a namespace of its own; N worker nodes, each a
#   network namespace and a mount namespace in which its containerd, kubelet and
#   kube-proxy (iptables mode) run, with node-private /run, /var/lib/kubelet,
#   /var/lib/containerd, /var/lib/weft, /var/lib/cni, /opt/cni/bin, /etc/cni/net.d,
#   /var/log and /etc/machine-id bind-mounted from the node's own directory, so a
#   DaemonSet's hostPath reaches its own node's directory and never another's; each
#   kubelet under a cgroup root of its own;
# - a host outside the cluster behind the same router, with no route to the pod range;
# - weft's image (deploy/image.sh), the pause image and localhost/busybox:test imported
#   into every node's containerd; deploy/weft.yaml applied unchanged (`--datapath kernel`
#   sets WEFT_DATAPATH in the applied DaemonSet, `--password` creates the Secret the
#   manifest reads WEAVE_PASSWORD from), and `up` returns when every Node is Ready, the
#   weft pod on each is Ready and NetworkUnavailable is False.
#
# Everything lives under /var/lib/weft-local/NAME; processes are found by PID (the
# cluster's cgroups list every one, containers included), and `down` (also run when `up`
# fails) kills them, unmounts the nodes' mount namespaces, deletes the network
# namespaces and cgroups, and removes the directory. Traffic stays inside the cluster's
# namespaces: kubectl runs inside the control plane's.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)

name=${WEFT_LOCAL_NAME:-weft}
nodes=3
datapath=userspace
password=0
underlay_mtu=1500
cmd=${1:-}
[ $# -gt 0 ] && shift

log() { echo "cluster.sh[$name]: $*" >&2; }
die() {
    log "error: $*"
    exit 1
}

# Options may come before or after the subcommand's own arguments for up/down/add-node;
# for kubectl/node/outside/import everything after the subcommand is passed through,
# except a leading --name.
parse_opts() {
    while [ $# -gt 0 ]; do
        case $1 in
        --name) name=$2; shift 2 ;;
        --nodes) nodes=$2; shift 2 ;;
        --datapath) datapath=$2; shift 2 ;;
        --password) password=1; shift ;;
        --underlay-mtu) underlay_mtu=$2; shift 2 ;;
        --netns) opt_netns=$2; shift 2 ;;
        --address) opt_address=$2; shift 2 ;;
        *) die "unknown option $1" ;;
        esac
    done
}
passthrough=()
opt_netns=
opt_address=
case $cmd in
up | down | add-node | info | control-plane) parse_opts "$@" ;;
kubectl | node | outside | import | stop-node | apiserver)
    if [ "${1:-}" = --name ]; then
        name=$2
        shift 2
    fi
    passthrough=("$@")
    ;;
"" | -h | --help | help)
    sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//'
    exit 0
    ;;
*) die "unknown command $cmd (up, down, kubectl, add-node, stop-node, apiserver, import, node, outside, info, control-plane)" ;;
esac

[[ $name =~ ^[a-z0-9]{1,8}$ ]] || die "--name must be 1-8 lowercase letters or digits"
[ "$(id -u)" = 0 ] || die "needs root (network and mount namespaces, cgroups)"

state=/var/lib/weft-local/$name
ns_prefix=wl$name
cg=weftlocal-$name
ns_router=$ns_prefix-u
ns_cp=$ns_prefix-cp
ns_out=$ns_prefix-out
cp_ip=172.31.0.2
out_ip=172.31.250.2
service_cidr=10.96.0.0/12
service_ip=10.96.0.1
pod_cidr=192.168.0.0/16
api=https://$cp_ip:6443

node_ns() { echo "$ns_prefix-node$1"; }
node_ip() { echo "172.31.$1.2"; }
node_dir() { echo "$state/node$1"; }

load_env() {
    [ -f "$state/env" ] || die "no cluster $name (run: cluster.sh up --name $name)"
    # shellcheck disable=SC1091
    . "$state/env"
    api=https://$cp_ip:6443
}

# ---------------------------------------------------------------------------------------
# Processes: every daemon starts in a cgroup of the cluster, so `down` finds it, and
# everything it starts (containerd's shims, the containers), by PID.

cg_hierarchies() {
    local h
    for h in /sys/fs/cgroup/*/; do
        [ -f "$h/cgroup.procs" ] && echo "${h%/}"
    done
}

# cg_make PATH: the cgroup in every v1 hierarchy (cpuset needs its CPUs and memory nodes
# copied from the parent before a process may join).
cg_make() {
    local h p part
    for h in $(cg_hierarchies); do
        p=$h
        IFS=/ read -ra parts <<<"$1"
        for part in "${parts[@]}"; do
            [ -n "$part" ] || continue
            p=$p/$part
            if [ ! -d "$p" ]; then
                mkdir "$p"
                if [ -f "$p/cpuset.cpus" ]; then
                    cat "$(dirname "$p")/cpuset.cpus" >"$p/cpuset.cpus"
                    cat "$(dirname "$p")/cpuset.mems" >"$p/cpuset.mems"
                fi
            fi
        done
    done
}

# launch LABEL CGROUP LOGFILE CMD...: CMD in the background, in CGROUP, logging to LOGFILE.
launch() {
    local label=$1 cgroup=$2 logfile=$3
    shift 3
    cg_make "$cgroup"
    # The child joins the cgroup before it execs, so nothing it starts escapes.
    setsid bash -c '
        for h in /sys/fs/cgroup/*/; do
            [ -f "$h$0/cgroup.procs" ] && echo $$ >"$h$0/cgroup.procs"
        done
        exec "$@"' "$cgroup" "$@" </dev/null >>"$logfile" 2>&1 &
    echo "$label $! $logfile" >>"$state/pids"
}

# The PIDs of every process in the cluster's cgroups.
cluster_pids() {
    local h
    for h in /sys/fs/cgroup/pids /sys/fs/cgroup/memory /sys/fs/cgroup/cpu; do
        [ -d "$h/$cg" ] && find "$h/$cg" -name cgroup.procs -exec cat {} + 2>/dev/null
    done | sort -un
}

kill_all() {
    local pids tries=0
    while pids=$(cluster_pids) && [ -n "$pids" ]; do
        # shellcheck disable=SC2086
        kill -9 $pids 2>/dev/null || true
        tries=$((tries + 1))
        [ $tries -lt 100 ] || { log "processes left: $pids"; break; }
        sleep 0.1
    done
    # Daemons that never joined a cgroup (a failed start) are still in the PID list.
    if [ -f "$state/pids" ]; then
        while read -r _ pid _; do kill -9 "$pid" 2>/dev/null || true; done <"$state/pids"
    fi
}

cg_remove() {
    local h
    for h in $(cg_hierarchies); do
        [ -d "$h/$cg" ] && find "$h/$cg" -depth -type d -exec rmdir {} \; 2>/dev/null
        [ -d "$h/$cg" ] && log "cgroup $h/$cg not removed"
    done
    return 0
}

# ---------------------------------------------------------------------------------------
# Certificates and kubeconfigs.

pki=$state/pki

cert() { # cert NAME SUBJECT [SANS]: a key and a certificate signed by the cluster CA
    local n=$1 subj=$2 sans=${3:-}
    openssl genrsa -out "$pki/$n.key" 2048 2>/dev/null
    openssl req -new -key "$pki/$n.key" -subj "$subj" -out "$pki/$n.csr" 2>/dev/null
    {
        echo "basicConstraints=CA:FALSE"
        echo "keyUsage=critical,digitalSignature,keyEncipherment"
        echo "extendedKeyUsage=serverAuth,clientAuth"
        [ -n "$sans" ] && echo "subjectAltName=$sans"
    } >"$pki/$n.ext"
    openssl x509 -req -in "$pki/$n.csr" -CA "$pki/ca.crt" -CAkey "$pki/ca.key" \
        -CAcreateserial -days 3650 -sha256 -extfile "$pki/$n.ext" -out "$pki/$n.crt" 2>/dev/null
    rm -f "$pki/$n.csr" "$pki/$n.ext"
}

kubeconfig() { # kubeconfig NAME CERT: a kubeconfig for the client certificate CERT
    local n=$1 c=$2
    cat >"$state/$n.kubeconfig" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: local
  cluster:
    server: $api
    certificate-authority: $pki/ca.crt
users:
- name: $n
  user:
    client-certificate: $pki/$c.crt
    client-key: $pki/$c.key
contexts:
- name: $n
  context: {cluster: local, user: $n}
current-context: $n
EOF
}

make_pki() {
    mkdir -p "$pki"
    openssl genrsa -out "$pki/ca.key" 2048 2>/dev/null
    openssl req -x509 -new -key "$pki/ca.key" -subj "/CN=weft-local-ca" -days 3650 \
        -sha256 -out "$pki/ca.crt" 2>/dev/null
    cert apiserver "/CN=kube-apiserver" \
        "IP:$service_ip,IP:$cp_ip,IP:127.0.0.1,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local"
    # The API server's identity towards kubelets (exec, logs, port-forward).
    cert apiserver-kubelet "/O=system:masters/CN=kube-apiserver-kubelet-client"
    cert admin "/O=system:masters/CN=admin"
    cert controller-manager "/CN=system:kube-controller-manager"
    cert scheduler "/CN=system:kube-scheduler"
    cert kube-proxy "/CN=system:kube-proxy"
    openssl genrsa -out "$pki/sa.key" 2048 2>/dev/null
    openssl rsa -in "$pki/sa.key" -pubout -out "$pki/sa.pub" 2>/dev/null
    kubeconfig admin admin
    kubeconfig controller-manager controller-manager
    kubeconfig scheduler scheduler
    kubeconfig kube-proxy kube-proxy
}

# ---------------------------------------------------------------------------------------
# The underlay: a router namespace, one /24 per machine.

netns_new() { # netns_new NS: a namespace with IPv6 off, forwarding on, strict rp_filter
    ip netns add "$1"
    ip netns exec "$1" sh -c '
        sysctl -qw net.ipv6.conf.all.disable_ipv6=1 net.ipv6.conf.default.disable_ipv6=1
        sysctl -qw net.ipv4.conf.all.rp_filter=1 net.ipv4.conf.default.rp_filter=1
        sysctl -qw net.ipv4.ip_forward=1
        ip link set lo up'
}

# plug NS PORT SUBNET_OCTET: NS's eth0 gets 172.31.OCTET.2/24 behind the router's PORT (.1).
plug() {
    local ns=$1 port=$2 o=$3
    ip -n "$ns_router" link add "$port" mtu "$underlay_mtu" type veth peer name eth0 \
        mtu "$underlay_mtu" netns "$ns"
    ip -n "$ns_router" addr add "172.31.$o.1/24" dev "$port"
    ip -n "$ns_router" link set "$port" up
    ip -n "$ns" addr add "172.31.$o.2/24" dev eth0
    ip -n "$ns" link set eth0 up
    ip -n "$ns" route add default via "172.31.$o.1"
}

# ---------------------------------------------------------------------------------------
# The control plane.

wait_for() { # wait_for SECONDS WHAT CMD...: until CMD succeeds
    local secs=$1 what=$2 deadline
    shift 2
    deadline=$((SECONDS + secs))
    until "$@" >/dev/null 2>&1; do
        [ $SECONDS -lt $deadline ] || die "timed out after ${secs}s waiting for $what"
        sleep 0.5
    done
}

kc() { ip netns exec "$ns_cp" kubectl --kubeconfig "$state/admin.kubeconfig" "$@"; }

start_apiserver() {
    launch kube-apiserver "$cg/cp/apiserver" "$state/cp/kube-apiserver.log" ip netns exec "$ns_cp" \
        "$k8s_bin/kube-apiserver" \
        --etcd-servers http://127.0.0.1:2379 \
        --advertise-address "$cp_ip" --bind-address 0.0.0.0 --secure-port 6443 --insecure-port 0 \
        --service-cluster-ip-range "$service_cidr" --service-node-port-range 30000-32767 \
        --client-ca-file "$pki/ca.crt" \
        --tls-cert-file "$pki/apiserver.crt" --tls-private-key-file "$pki/apiserver.key" \
        --kubelet-client-certificate "$pki/apiserver-kubelet.crt" \
        --kubelet-client-key "$pki/apiserver-kubelet.key" \
        --kubelet-preferred-address-types InternalIP \
        --service-account-key-file "$pki/sa.pub" \
        --service-account-signing-key-file "$pki/sa.key" \
        --service-account-issuer https://kubernetes.default.svc.cluster.local \
        --authorization-mode Node,RBAC --enable-admission-plugins NodeRestriction \
        --allow-privileged=true --profiling=false --v=1
}

start_control_plane() {
    local d=$state/cp
    mkdir -p "$d/etcd"
    launch etcd "$cg/cp" "$d/etcd.log" ip netns exec "$ns_cp" etcd \
        --name cp --data-dir "$d/etcd" \
        --listen-client-urls http://127.0.0.1:2379 --advertise-client-urls http://127.0.0.1:2379 \
        --listen-peer-urls http://127.0.0.1:2380 --initial-advertise-peer-urls http://127.0.0.1:2380 \
        --initial-cluster cp=http://127.0.0.1:2380 --auto-compaction-retention 1h \
        --quota-backend-bytes 2147483648
    start_apiserver
    wait_for 120 "kube-apiserver /readyz" kc get --raw /readyz
    launch kube-controller-manager "$cg/cp" "$d/kube-controller-manager.log" \
        ip netns exec "$ns_cp" "$k8s_bin/kube-controller-manager" \
        --kubeconfig "$state/controller-manager.kubeconfig" \
        --authentication-kubeconfig "$state/controller-manager.kubeconfig" \
        --authorization-kubeconfig "$state/controller-manager.kubeconfig" \
        --service-account-private-key-file "$pki/sa.key" --root-ca-file "$pki/ca.crt" \
        --use-service-account-credentials=true --leader-elect=false \
        --cluster-signing-cert-file "$pki/ca.crt" --cluster-signing-key-file "$pki/ca.key" \
        --bind-address 127.0.0.1 --port 0 --profiling=false --v=1
    launch kube-scheduler "$cg/cp" "$d/kube-scheduler.log" \
        ip netns exec "$ns_cp" "$k8s_bin/kube-scheduler" \
        --kubeconfig "$state/scheduler.kubeconfig" \
        --authentication-kubeconfig "$state/scheduler.kubeconfig" \
        --authorization-kubeconfig "$state/scheduler.kubeconfig" \
        --leader-elect=false --bind-address 127.0.0.1 --port 0 --profiling=false --v=1
    # 1.20 does not label namespaces with their name (1.21+ does); NetworkPolicies that
    # select namespaces by name rely on it.
    wait_for 60 "the default ServiceAccount" kc -n default get serviceaccount default
    local nsname
    for nsname in default kube-system kube-public kube-node-lease; do
        kc label --overwrite namespace "$nsname" "kubernetes.io/metadata.name=$nsname" >/dev/null
    done
}

# ---------------------------------------------------------------------------------------
# Worker nodes.

# Directories of the node that hide the machine's own, inside the node's mount namespace.
node_binds=(
    "run:/run"
    "var-lib-kubelet:/var/lib/kubelet"
    "var-lib-containerd:/var/lib/containerd"
    "var-lib-weft:/var/lib/weft"
    "var-lib-cni:/var/lib/cni"
    "opt-cni-bin:/opt/cni/bin"
    "etc-cni-net.d:/etc/cni/net.d"
    "var-log:/var/log"
    "etc-kubernetes:/etc/kubernetes"
)

containerd_config() {
    cat <<EOF
version = 2
root = "/var/lib/containerd"
state = "/run/containerd"
disabled_plugins = ["io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.aufs", "io.containerd.internal.v1.tracing", "io.containerd.tracing.processor.v1.otlp"]
[grpc]
  address = "/run/containerd/containerd.sock"
[debug]
  address = ""
[metrics]
  address = ""
[plugins."io.containerd.internal.v1.opt"]
  path = "/var/lib/containerd/opt"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "localhost/weft-local/pause:3.2"
  # These machines lack CAP_SYS_RESOURCE: without this every sandbox fails in runc.
  restrict_oom_score_adj = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/opt/cni/bin"
    conf_dir = "/etc/cni/net.d"
    max_conf_num = 1
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
EOF
}

kubelet_config() { # kubelet_config I
    local i=$1
    cat <<EOF
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: $(node_ip "$i")
readOnlyPort: 0
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: true}
  x509: {clientCAFile: $pki/ca.crt}
authorization: {mode: Webhook}
tlsCertFile: $pki/node$i-serving.crt
tlsPrivateKeyFile: $pki/node$i-serving.key
cgroupDriver: cgroupfs
cgroupRoot: /$cg/node$i
cgroupsPerQOS: true
failSwapOn: false
clusterDomain: cluster.local
resolvConf: ""
# Nothing can be pulled here: never collect the imported images, never evict for a disk
# that other work on the machine fills.
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
evictionHard: {memory.available: "100Mi", nodefs.available: "1%", imagefs.available: "1%"}
volumePluginDir: /var/lib/kubelet/volume-plugins
maxPods: 110
serializeImagePulls: false
EOF
}

kube_proxy_config() { # kube_proxy_config I
    local i=$1
    cat <<EOF
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
clientConnection: {kubeconfig: $state/kube-proxy.kubeconfig}
mode: iptables
clusterCIDR: $pod_cidr
hostnameOverride: node$i
bindAddress: 0.0.0.0
healthzBindAddress: 127.0.0.1:10256
metricsBindAddress: 127.0.0.1:10249
# The conntrack table's size is the machine's, not a namespace's: leave it alone.
conntrack: {maxPerCore: 0, min: 0, tcpEstablishedTimeout: 0s, tcpCloseWaitTimeout: 0s}
EOF
}

# in_node I CMD...: CMD in node I's network and mount namespaces.
in_node() {
    local i=$1
    shift
    nsenter --net="/run/netns/$(node_ns "$i")" --mount="$state/mnt/node$i" -- "$@"
}

start_node() { # start_node I
    local i=$1 d ns ip
    d=$(node_dir "$i")
    ns=$(node_ns "$i")
    ip=$(node_ip "$i")
    [ -d "$d" ] && die "node $i exists already"
    mkdir -p "$d"
    netns_new "$ns"
    plug "$ns" "n$i" "$i"
    cert "node$i" "/O=system:nodes/CN=system:node:node$i"
    cert "node$i-serving" "/CN=node$i" "IP:$ip,DNS:node$i"
    kubeconfig "node$i" "node$i"

    # The node's own directories, and the mount namespace that shows them where a node
    # has them. The mount points themselves must exist on the machine.
    local b src dst
    for b in "${node_binds[@]}"; do
        src=$d/${b%%:*}
        dst=${b#*:}
        mkdir -p "$src"
        # Mount points made here (and their made parents) go again with the last cluster.
        while [ ! -d "$dst" ]; do
            local top=$dst
            while [ ! -d "$(dirname "$top")" ]; do top=$(dirname "$top"); done
            mkdir "$top"
            echo "$top" >>/var/lib/weft-local/.mountpoints
        done
    done
    # Each EC2 instance has a machine id of its own; weft takes its peer name from it.
    od -An -tx1 -N16 /dev/urandom | tr -d ' \n' >"$d/machine-id"
    echo >>"$d/machine-id"
    # What a node's OS provides beside the network's own plugin: loopback for every pod,
    # portmap for the conflist's chain (Debian's containernetworking-plugins).
    cp /usr/lib/cni/loopback /usr/lib/cni/portmap "$d/opt-cni-bin/"
    containerd_config >"$d/containerd.toml"
    kubelet_config "$i" >"$d/kubelet.yaml"
    kube_proxy_config "$i" >"$d/kube-proxy.yaml"

    touch "$state/mnt/node$i"
    unshare --mount="$state/mnt/node$i" --propagation private true
    local script="set -e"
    for b in "${node_binds[@]}"; do
        script+="; mount --bind '$d/${b%%:*}' '${b#*:}'"
    done
    script+="; mount --bind '$d/machine-id' /etc/machine-id"
    # Shared inside the node (as systemd makes / on a real node): the kubelet's volumes and
    # containerd's pinned namespaces reach the containers that mount them with
    # propagation. The namespace files stay private.
    script+="; mount --make-rshared /; mount --make-private '$state/mnt'"
    nsenter --mount="$state/mnt/node$i" -- sh -c "$script"

    launch "containerd[node$i]" "$cg/node$i/system" "$d/containerd.log" \
        nsenter --net="/run/netns/$ns" --mount="$state/mnt/node$i" -- containerd --config "$d/containerd.toml"
    wait_for 60 "containerd on node$i" test -S "$d/run/containerd/containerd.sock"
    local archive
    for archive in "${images[@]}"; do
        in_node "$i" ctr -n k8s.io images import "$archive" >/dev/null
    done
    launch "kubelet[node$i]" "$cg/node$i/system" "$d/kubelet.log" \
        nsenter --net="/run/netns/$ns" --mount="$state/mnt/node$i" -- "$k8s_bin/kubelet" \
        --config "$d/kubelet.yaml" --kubeconfig "$state/node$i.kubeconfig" \
        --container-runtime remote \
        --container-runtime-endpoint unix:///run/containerd/containerd.sock \
        --hostname-override "node$i" --node-ip "$ip" \
        --pod-infra-container-image localhost/weft-local/pause:3.2 --v=1
    launch "kube-proxy[node$i]" "$cg/node$i/system" "$d/kube-proxy.log" \
        nsenter --net="/run/netns/$ns" --mount="$state/mnt/node$i" -- "$k8s_bin/kube-proxy" --config "$d/kube-proxy.yaml" --v=1
}


# ---------------------------------------------------------------------------------------
# weft.

apply_weft() {
    if [ "$password" = 1 ]; then
        # As the manifest documents: the Secret before the DaemonSet.
        kc -n kube-system create secret generic weft-passwd \
            --from-literal=weave-passwd="$(openssl rand -base64 32)" >/dev/null
    fi
    if [ "$datapath" = userspace ]; then
        kc apply -f "$repo/deploy/weft.yaml" >/dev/null
    else
        # The manifest's documented switch, set in what is applied (the file is unchanged).
        kc apply --dry-run=client -o json -f "$repo/deploy/weft.yaml" |
            jq --arg v "$datapath" '(.items[] | select(.kind == "DaemonSet")
                | .spec.template.spec.containers[] | select(.name == "weft") | .env[]
                | select(.name == "WEFT_DATAPATH")).value = $v' |
            kc apply -f - >/dev/null
    fi
}

# node_ready NODE: Ready, NetworkUnavailable=False (weft sets it), and weft's pod on it Ready.
node_ready() {
    local node=$1
    kc get node "$node" -o json | jq -e '(.status.conditions // []) as $c
        | ($c | any(.type == "Ready" and .status == "True"))
          and ($c | any(.type == "NetworkUnavailable" and .status == "False"))' >/dev/null &&
        kc -n kube-system get pods -l app.kubernetes.io/name=weft \
            --field-selector "spec.nodeName=$node" -o json |
        jq -e '[.items[] | select(.status.conditions // [] | any(.type == "Ready" and .status == "True"))] | length == 1' >/dev/null
}

wait_nodes() { # wait_nodes NODE...
    local n
    for n in "$@"; do
        wait_for 300 "$n Ready with NetworkUnavailable=False and weft Ready on it" node_ready "$n"
    done
}

# ---------------------------------------------------------------------------------------
# Teardown.

down() {
    [ -d "$state" ] || { log "no cluster $name"; return 0; }
    kill_all
    local f
    for f in "$state"/mnt/node*; do
        [ -e "$f" ] && umount "$f" 2>/dev/null
    done
    umount "$state/mnt" 2>/dev/null || true
    local ns
    for ns in $(ip netns list | awk '{print $1}' | grep "^$ns_prefix-" || true); do
        ip netns delete "$ns"
    done
    cg_remove
    rm -rf "$state"
    # Sysctls the kubelets set on the machine, back as they were when the first cluster
    # came up, once no cluster is left.
    if [ -f /var/lib/weft-local/.sysctls ] && ! ls -d /var/lib/weft-local/*/ >/dev/null 2>&1; then
        while read -r k v; do sysctl -qw "$k=$v" || true; done </var/lib/weft-local/.sysctls
        rm -f /var/lib/weft-local/.sysctls
        if [ -f /var/lib/weft-local/.mountpoints ]; then
            sort -ru /var/lib/weft-local/.mountpoints | while read -r d; do rmdir "$d" 2>/dev/null || true; done
            rm -f /var/lib/weft-local/.mountpoints
        fi
    fi
    log "removed"
}

# ---------------------------------------------------------------------------------------

up() {
    case $datapath in userspace | kernel) ;; *) die "--datapath userspace|kernel" ;; esac
    [[ $nodes =~ ^[1-9][0-9]?$ ]] && [ "$nodes" -le 50 ] || die "--nodes 1..50"
    [ -d "$state" ] && die "cluster $name exists (cluster.sh down --name $name first)"
    "$here/deps.sh"
    k8s_bin=$("$here/build-k8s.sh")
    log "Kubernetes parts: $k8s_bin"
    local weft_image=${WEFT_IMAGE:-}
    if [ -z "$weft_image" ]; then
        weft_image=$repo/target/weft-image.tar
        (cd "$repo" && deploy/image.sh "$weft_image" >&2)
    fi
    mapfile -t images < <("$here/images.sh" "$k8s_bin" "$repo/target/local-images")
    images=("$weft_image" "${images[@]}")

    mkdir -p /var/lib/weft-local
    if [ ! -f /var/lib/weft-local/.sysctls ]; then
        for k in vm.overcommit_memory vm.panic_on_oom kernel.panic kernel.panic_on_oops \
            kernel.keys.root_maxkeys kernel.keys.root_maxbytes; do
            echo "$k $(sysctl -n "$k")"
        done >/var/lib/weft-local/.sysctls
    fi
    mkdir -p "$state/mnt"
    trap 'log "up failed: tearing down (logs: cluster.sh info shows where they were)"; down' ERR
    cat >"$state/env" <<EOF
k8s_bin=$k8s_bin
ns_cp=$ns_cp
cp_ip=$cp_ip
nodes=$nodes
datapath=$datapath
password=$password
underlay_mtu=$underlay_mtu
images=($(printf '%q ' "${images[@]}"))
EOF
    mount --bind "$state/mnt" "$state/mnt"
    mount --make-private "$state/mnt"
    make_pki

    netns_new "$ns_router"
    netns_new "$ns_cp"
    plug "$ns_cp" cp 0
    netns_new "$ns_out"
    plug "$ns_out" out 250
    log "control plane"
    start_control_plane
    local i
    for i in $(seq 1 "$nodes"); do
        log "node$i"
        start_node "$i"
    done
    log "applying deploy/weft.yaml (datapath $datapath$([ "$password" = 1 ] && echo ", WEAVE_PASSWORD from Secret weft-passwd"))"
    apply_weft
    wait_nodes $(seq -f 'node%g' 1 "$nodes")
    trap - ERR
    kc get nodes -o wide >&2
    log "up: $nodes nodes; kubectl: $0 kubectl --name $name ARGS"
}

control_plane() {
    [ -n "$opt_netns" ] && [ -n "$opt_address" ] ||
        die "usage: cluster.sh control-plane --netns NS --address IP"
    [ -d "$state" ] && die "cluster $name exists (cluster.sh down --name $name first)"
    ns_cp=$opt_netns
    cp_ip=$opt_address
    api=https://$cp_ip:6443
    "$here/deps.sh"
    k8s_bin=$("$here/build-k8s.sh")
    mkdir -p "$state"
    trap 'log "control-plane failed: tearing down"; down' ERR
    cat >"$state/env" <<EOF
k8s_bin=$k8s_bin
ns_cp=$ns_cp
cp_ip=$cp_ip
nodes=0
EOF
    make_pki
    start_control_plane
    kc apply -f "$repo/deploy/weft.yaml" >/dev/null
    trap - ERR
    log "control plane up in namespace $ns_cp at $api (CA $pki/ca.crt)"
}

add_node() {
    load_env
    local i=$((nodes + 1))
    trap 'log "add-node failed"; exit 1' ERR
    start_node "$i"
    sed -i "s/^nodes=.*/nodes=$i/" "$state/env"
    wait_nodes "node$i"
    echo "node$i"
}

stop_node() { # stop_node I: the machine fails
    local i=$1 pids h
    [ -e "$state/mnt/node$i" ] || die "no node $i"
    # A machine that fails answers nothing more: no FIN, no RST, no ICMP, no ARP. Its link
    # goes first, so the kill below tells its peers nothing.
    ip -n "$ns_router" link set "n$i" down
    for _ in $(seq 100); do
        pids=$(for h in /sys/fs/cgroup/pids /sys/fs/cgroup/memory; do
            [ -d "$h/$cg/node$i" ] && find "$h/$cg/node$i" -name cgroup.procs -exec cat {} +
        done | sort -un)
        [ -n "$pids" ] || break
        # shellcheck disable=SC2086
        kill -9 $pids 2>/dev/null || true
        sleep 0.1
    done
    log "node$i stopped"
}

apiserver() { # apiserver stop|start|freeze|thaw
    local pids
    pids=$(cat /sys/fs/cgroup/pids/"$cg"/cp/apiserver/cgroup.procs 2>/dev/null || true)
    case $1 in
    stop)
        # shellcheck disable=SC2086
        [ -z "$pids" ] || kill -9 $pids
        ;;
    start)
        [ -z "$pids" ] || die "the API server runs"
        start_apiserver
        wait_for 120 "kube-apiserver /readyz" kc get --raw /readyz
        ;;
    freeze) echo FROZEN >/sys/fs/cgroup/freezer/"$cg"/cp/apiserver/freezer.state ;;
    thaw) echo THAWED >/sys/fs/cgroup/freezer/"$cg"/cp/apiserver/freezer.state ;;
    *) die "usage: cluster.sh apiserver stop|start|freeze|thaw" ;;
    esac
}

info() {
    load_env
    echo "cluster $name: $nodes nodes, datapath $datapath, state $state"
    echo "control plane: namespace $ns_cp, API $api"
    local i
    for i in $(seq 1 "$nodes"); do
        [ -d "$(node_dir "$i")" ] && echo "node$i: namespace $(node_ns "$i"), $(node_ip "$i"), logs $(node_dir "$i")/*.log"
    done
    echo "outside host: namespace $ns_out, $out_ip"
    echo "processes:"
    cat "$state/pids"
}

case $cmd in
up) up ;;
control-plane) control_plane ;;
down) down ;;
add-node) add_node ;;
info) info ;;
kubectl)
    load_env
    kc "${passthrough[@]}"
    ;;
node)
    load_env
    [ ${#passthrough[@]} -ge 2 ] || die "usage: cluster.sh node N CMD..."
    i=${passthrough[0]}
    [ -e "$state/mnt/node$i" ] || die "no node $i"
    in_node "$i" "${passthrough[@]:1}"
    ;;
outside)
    load_env
    ip netns exec "$ns_out" "${passthrough[@]}"
    ;;
stop-node)
    load_env
    stop_node "${passthrough[0]:?usage: cluster.sh stop-node N}"
    ;;
apiserver)
    load_env
    apiserver "${passthrough[0]:-}"
    ;;
import)
    load_env
    for i in $(seq 1 "$nodes"); do
        [ -e "$state/mnt/node$i" ] || continue
        # Entering the node's mount namespace starts from its root: absolute paths only.
        for a in "${passthrough[@]}"; do in_node "$i" ctr -n k8s.io images import "$(realpath "$a")" >/dev/null; done
    done
    ;;
esac
