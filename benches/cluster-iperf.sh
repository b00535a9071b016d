#!/usr/bin/env bash
# iperf3 between two pods of a real Kubernetes cluster (deploy/local/cluster.sh: kubelets,
# containerd, kube-proxy, weft installed by deploy/weft.yaml), pinned to two different
# nodes, for weft's user-space (C), encrypted (E, WEAVE_PASSWORD from the manifest's
# Secret) and kernel (K, WEFT_DATAPATH=kernel) data paths, beside Linux's kernel VXLAN (B)
# measured between the same two node namespaces in the same run. This is the mission's
# "iperf in kind" where kind cannot run (no Docker engine); deploy/kind/ is for machines
# that have Docker.
#
#   benches/cluster-iperf.sh [-r ROUNDS] [-d SECONDS] [-m UNDERLAY_MTU] [-k]
#
# -r rounds (default 3; every round measures every data path, interleaved, and the
# tables give medians), -d seconds per iperf3 test (default 10), -m the underlay MTU
# (default 1500; 9001 as on EKS), -k keeps the cluster (deploy/local/cluster.sh down
# --name bench removes it). Needs root; builds what it needs (the Kubernetes parts once,
# cached). Switching data paths is what an operator does: `kubectl patch` of the
# DaemonSet (and the Secret for E), rolled out node by node; the pods keep their addresses.
set -euo pipefail
cd "$(dirname "$0")/.."

rounds=3
secs=10
mtu=1500
keep=0
while getopts r:d:m:k opt; do
    case $opt in
    r) rounds=$OPTARG ;;
    d) secs=$OPTARG ;;
    m) mtu=$OPTARG ;;
    k) keep=1 ;;
    *) sed -n '2,18p' "$0"; exit 2 ;;
    esac
done

name=bench
cl() { deploy/local/cluster.sh "$1" --name "$name" "${@:2}"; }
k() { deploy/local/cluster.sh kubectl --name "$name" "$@"; }
log() { echo "cluster-iperf: $*" >&2; }

command -v iperf3 >/dev/null || apt-get install -y -qq iperf3 >/dev/null
work=$(mktemp -d)
cleanup() {
    ip netns delete "wl$name-bp1" 2>/dev/null || true
    ip netns delete "wl$name-bp2" 2>/dev/null || true
    [ "$keep" = 1 ] || cl down >/dev/null 2>&1 || true
    rm -rf "$work"
}
trap cleanup EXIT

cl down >/dev/null 2>&1 || true
cl up --nodes 2 --underlay-mtu "$mtu" >&2

# The iperf3 image: Debian's iperf3 with the libraries it links, on busybox (sleep, ping).
img=target/local-images/iperf3-$(dpkg-query -W -f '${Version}' iperf3).tar
if [ ! -s "$img" ]; then
    r=$work/rootfs
    mkdir -p "$r/bin" "$r/tmp" "$r/etc"
    cp /bin/busybox "$r/bin/"
    for a in sh sleep ping cat; do ln -s busybox "$r/bin/$a"; done
    install -D /usr/bin/iperf3 "$r/usr/bin/iperf3"
    for lib in $(ldd /usr/bin/iperf3 | grep -o '/[^ ]*'); do install -D "$lib" "$r$lib"; done
    echo 'root:x:0:0:root:/:/bin/sh' >"$r/etc/passwd"
    ctr=$(buildah --storage-driver vfs from scratch)
    buildah --storage-driver vfs copy "$ctr" "$r/" / >/dev/null
    buildah --storage-driver vfs commit --quiet --format oci --rm "$ctr" \
        "oci-archive:$img.tmp:localhost/iperf3:bench" >/dev/null
    mv "$img.tmp" "$img"
fi
cl import "$img"

k apply -f - >/dev/null <<'EOF'
apiVersion: v1
kind: Pod
metadata: {name: iperf-server, labels: {app: iperf-server}}
spec:
  nodeSelector: {kubernetes.io/hostname: node1}
  containers:
  - name: iperf3
    image: localhost/iperf3:bench
    imagePullPolicy: Never
    command: ["iperf3", "-s"]
---
apiVersion: v1
kind: Pod
metadata: {name: iperf-client, labels: {app: iperf-client}}
spec:
  nodeSelector: {kubernetes.io/hostname: node2}
  containers:
  - name: iperf3
    image: localhost/iperf3:bench
    imagePullPolicy: Never
    command: ["sleep", "1000000"]
EOF
k wait --for=condition=Ready pod/iperf-server pod/iperf-client --timeout=120s >/dev/null
server_ip=$(k get pod iperf-server -o jsonpath='{.status.podIP}')
log "iperf3 server $server_ip on node1, client on node2"

# B: kernel VXLAN between the same two node namespaces, a veth "pod" behind each, the same
# overlay MTU as weft's pods (underlay - 50).
omtu=$((mtu - 50))
for i in 1 2; do
    ns=wl$name-node$i
    bp=wl$name-bp$i
    ip netns add "$bp"
    ip netns exec "$bp" sysctl -qw net.ipv6.conf.all.disable_ipv6=1
    ip -n "$ns" link add "bp$i" mtu "$omtu" type veth peer name eth0 mtu "$omtu" netns "$bp"
    ip -n "$ns" addr add "10.201.$i.1/24" dev "bp$i"
    ip -n "$ns" link set "bp$i" up
    ip -n "$bp" addr add "10.201.$i.2/24" dev eth0
    ip -n "$bp" link set eth0 up
    ip -n "$bp" link set lo up
    ip -n "$bp" route add default via "10.201.$i.1"
    other=$((3 - i))
    ip -n "$ns" link add bvx type vxlan id 4242 local "172.31.$i.2" remote "172.31.$other.2" dstport 4789 dev eth0
    ip -n "$ns" addr add "10.202.0.$i/24" dev bvx
    ip -n "$ns" link set bvx up mtu "$omtu"
    ip -n "$ns" route add "10.201.$other.0/24" via "10.202.0.$other" dev bvx
done
ip netns exec "wl$name-bp1" iperf3 -s -D
sleep 0.5

set_datapath() { # C, E or K: the manifest's switches, rolled out
    local dp=$1 env=userspace
    [ "$dp" = K ] && env=kernel
    k -n kube-system delete secret weft-passwd --ignore-not-found >/dev/null
    [ "$dp" = E ] && k -n kube-system create secret generic weft-passwd \
        --from-literal=weave-passwd="$(openssl rand -base64 32)" >/dev/null
    # One patch, one rollout: the data path, and a restart annotation (a new Secret is read
    # only when the pod starts).
    k -n kube-system patch daemonset weft -p "{\"spec\":{\"template\":{\"metadata\":{\"annotations\":{\"weft.works/bench\":\"$dp-$(date +%s%N)\"}},\"spec\":{\"containers\":[{\"name\":\"weft\",\"env\":[{\"name\":\"WEFT_DATAPATH\",\"value\":\"$env\"}]}]}}}}" >/dev/null
    k -n kube-system rollout status daemonset/weft --timeout=300s >/dev/null
    for _ in $(seq 120); do
        k exec iperf-client -- ping -c 1 -W 1 "$server_ip" >/dev/null 2>&1 && return 0
        sleep 0.5
    done
    log "no connectivity after switching to $dp"
    return 1
}

# run_iperf DP STREAMS: "Gbit/s retransmits"
run_iperf() {
    local dp=$1 p=$2 json
    if [ "$dp" = B ]; then
        json=$(ip netns exec "wl$name-bp2" iperf3 -c 10.201.1.2 -t "$secs" -P "$p" -J)
    else
        json=$(k exec iperf-client -- iperf3 -c "$server_ip" -t "$secs" -P "$p" -J)
    fi
    echo "$json" | jq -r '"\(.end.sum_received.bits_per_second / 1e9) \(.end.sum_sent.retransmits // 0)"'
}

run_ping() { # average RTT in ms over 20 pings
    local dp=$1 out
    if [ "$dp" = B ]; then
        out=$(ip netns exec "wl$name-bp2" busybox ping -c 20 -i 0.2 10.201.1.2)
    else
        out=$(k exec iperf-client -- ping -c 20 -i 0.2 "$server_ip")
    fi
    echo "$out" | sed -n 's|.*= [0-9.]*/\([0-9.]*\)/.*|\1|p'
}

results=$work/results
: >"$results"
order=(B C K E)
for r in $(seq 1 "$rounds"); do
    for dp in "${order[@]}"; do
        [ "$dp" = B ] || set_datapath "$dp"
        read -r g1 re1 < <(run_iperf "$dp" 1)
        read -r g4 re4 < <(run_iperf "$dp" 4)
        rtt=$(run_ping "$dp")
        echo "$r $dp $g1 $g4 $rtt $re1 $re4" >>"$results"
        log "round $r $dp: 1 stream $g1 Gbit/s, 4 streams $g4 Gbit/s, RTT $rtt ms, retransmits $re1 / $re4"
    done
done

python3 - "$results" "$rounds" "$secs" "$mtu" <<'EOF'
import statistics, sys
rows = [l.split() for l in open(sys.argv[1])]
rounds, secs, mtu = sys.argv[2], sys.argv[3], sys.argv[4]
names = {"B": "B kernel VXLAN (same node namespaces)", "C": "C weft user space",
         "E": "E weft encrypted (WEAVE_PASSWORD)", "K": "K weft kernel mode (WEFT_DATAPATH=kernel)"}
med = {}
for dp in "BCKE":
    rs = [r for r in rows if r[1] == dp]
    col = lambda i: statistics.median(float(r[i]) for r in rs)
    med[dp] = dict(g1=col(2), g4=col(3), rtt=col(4), re1=col(5), re4=col(6))
print(f"In-cluster iperf3, pod on node2 -> pod on node1 (real kubelets, containerd, kube-proxy; "
      f"weft from deploy/weft.yaml), underlay MTU {mtu}, {rounds} rounds x {secs} s, medians.\n")
print("| datapath | 1 stream Gbit/s | 4 streams Gbit/s | RTT ms | retransmits 1 / 4 |")
print("|---|---|---|---|---|")
for dp in "BCKE":
    m = med[dp]
    print(f"| {names[dp]} | {m['g1']:.2f} | {m['g4']:.2f} | {m['rtt']:.3f} | {m['re1']:.0f} / {m['re4']:.0f} |")
print("\n| ratio to B | 1 stream | 4 streams | RTT |")
print("|---|---|---|---|")
b = med["B"]
for dp in "CEK":
    m = med[dp]
    print(f"| {names[dp]} | {m['g1']/b['g1']:.2f} | {m['g4']/b['g4']:.2f} | {m['rtt']/b['rtt']:.2f} |")
print("\nper round (Gbit/s 1 stream):", {dp: [float(r[2]) for r in rows if r[1] == dp] for dp in "BCKE"})
EOF
