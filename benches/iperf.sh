#!/usr/bin/env bash
# Pod-to-pod throughput, latency and cost of three datapaths, measured interleaved in one
# run on this machine:
#   A  plain routing between two node namespaces (no encapsulation, pod MTU 1500)
#   B  Linux kernel VXLAN between the nodes (pod MTU 1450)
#   C  weft: two `weft router` daemons, pods attached by executing weft-cni as a runtime
#      does (CNI_* environment + network config on stdin)
#   D  (with -B DIR) the same with another build of weft, e.g. the one before a change,
#      so that both are measured interleaved in one run
#   E  weft with WEAVE_PASSWORD: every datagram sealed (AES-256-GCM), pod MTU 1426
# Each topology: two node namespaces joined by a veth "underlay" (MTU 1500), one pod
# namespace per node. Every round runs A, B, C (, D), E in turn; the table shows medians.
#
# Run as root after `cargo build --release --workspace`:
#   benches/iperf.sh                 # 3 rounds of 10 s
#   benches/iperf.sh -r 1 -d 3       # quick look
# All traffic stays inside the namespaces this script creates; they are deleted and the
# processes it started are killed (by PID) on exit.
set -euo pipefail

DURATION=10
ROUNDS=3
BIN_DIR=""
PINGS=20
ONLY="ABCE"
CAPTURE=""
BASE_DIR=""

usage() {
    cat <<EOF
usage: $0 [-d seconds] [-r rounds] [-b bin_dir] [-B baseline_bin_dir] [-p pings] [-o ABCDE]
  -d  iperf3 duration per test (default $DURATION)
  -r  rounds (default $ROUNDS)
  -b  directory holding weft and weft-cni (default: target/release next to this script)
  -p  ping count for RTT (default $PINGS, 50 ms apart)
  -B  directory holding another build of weft and weft-cni, measured as datapath D
  -o  datapaths to run, subset of ABCDE (default ABCE, plus D with -B)
  -n  load a NAT table (hence conntrack) in every node namespace, as kube-proxy does on
      every Kubernetes node: weft always has its own NAT table, so this makes the other
      datapaths pay the same per-packet connection tracking
  -t  also capture weft's underlay traffic during a 1 s transfer and check it with
      tshark: every datagram must decode as VXLAN, with valid inner checksums
EOF
}

while getopts "d:r:b:B:p:o:nth" opt; do
    case "$opt" in
        d) DURATION=$OPTARG ;;
        r) ROUNDS=$OPTARG ;;
        b) BIN_DIR=$OPTARG ;;
        B) BASE_DIR=$OPTARG ;;
        p) PINGS=$OPTARG ;;
        o) ONLY=$OPTARG ;;
        t) CAPTURE=1 ;;
        n) NAT=1 ;;
        h) usage; exit 0 ;;
        *) usage; exit 2 ;;
    esac
done

HERE=$(cd "$(dirname "$0")" && pwd)
BIN_DIR=${BIN_DIR:-$HERE/../target/release}
WEFT=$(realpath "$BIN_DIR/weft")
WEFT_CNI=$(realpath "$BIN_DIR/weft-cni")
BASE_WEFT=""; BASE_WEFT_CNI=""
if [ -n "$BASE_DIR" ]; then
    BASE_WEFT=$(realpath "$BASE_DIR/weft")
    BASE_WEFT_CNI=$(realpath "$BASE_DIR/weft-cni")
    [[ $ONLY == *D* ]] || ONLY="${ONLY}D"
fi
for t in ip iperf3 ping python3 "$WEFT" "$WEFT_CNI" ${BASE_WEFT:+"$BASE_WEFT" "$BASE_WEFT_CNI"}; do
    command -v "$t" >/dev/null || { echo "missing: $t" >&2; exit 1; }
done
[ "$(id -u)" = 0 ] || { echo "run as root" >&2; exit 1; }

TAG="wb$$"
WORK=$(mktemp -d /tmp/weft-bench.XXXXXX)
NAMESPACES=()
PIDS=()

cleanup() {
    set +e
    for pid in "${PIDS[@]}"; do
        kill "$pid" 2>/dev/null
    done
    for pid in "${PIDS[@]}"; do
        for _ in 1 2 3 4 5 6 7 8 9 10; do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        kill -9 "$pid" 2>/dev/null
    done
    for ns in "${NAMESPACES[@]}"; do
        ip netns del "$ns" 2>/dev/null
    done
    if [ -n "${KEEP_WORK:-}" ]; then
        echo "logs kept in $WORK" >&2
    else
        rm -rf "$WORK"
    fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

nsx() { local ns=$1; shift; ip netns exec "$ns" "$@"; }

new_ns() {
    local ns=$1
    ip netns add "$ns"
    NAMESPACES+=("$ns")
    nsx "$ns" sysctl -qw net.ipv6.conf.all.disable_ipv6=1 net.ipv6.conf.default.disable_ipv6=1 \
        net.ipv4.conf.all.rp_filter=0 net.ipv4.conf.default.rp_filter=0
    ip -n "$ns" link set lo up
}

# Two nodes ($1-n1, $1-n2) joined by veth, underlay 10.99.0.1/.2, MTU 1500.
make_nodes() {
    local p=$1
    new_ns "$p-n1"
    new_ns "$p-n2"
    for n in n1 n2; do nsx "$p-$n" sysctl -qw net.ipv4.ip_forward=1; done
    ip -n "$p-n1" link add eth0 type veth peer name eth0 netns "$p-n2"
    ip -n "$p-n1" addr add 10.99.0.1/24 dev eth0
    ip -n "$p-n2" addr add 10.99.0.2/24 dev eth0
    ip -n "$p-n1" link set eth0 up mtu 1500
    ip -n "$p-n2" link set eth0 up mtu 1500
    if [ "${NAT:-0}" = 1 ]; then
        for n in n1 n2; do
            nsx "$p-$n" nft add table ip bench-conntrack
            nsx "$p-$n" nft add chain ip bench-conntrack post \
                '{ type nat hook postrouting priority 100; policy accept; }'
        done
    fi
}

# A pod namespace $1-p<i> wired to node $1-n<i> by a veth; pod 192.168.<i>.2/24.
make_pod() {
    local p=$1 i=$2 mtu=$3
    new_ns "$p-p$i"
    ip -n "$p-n$i" link add "pod$i" mtu "$mtu" type veth peer name eth0 mtu "$mtu" netns "$p-p$i"
    ip -n "$p-n$i" addr add "192.168.$i.1/24" dev "pod$i"
    ip -n "$p-n$i" link set "pod$i" up
    ip -n "$p-p$i" addr add "192.168.$i.2/24" dev eth0
    ip -n "$p-p$i" link set eth0 up
    ip -n "$p-p$i" route add default via "192.168.$i.1"
}

setup_plain() {
    local p=$TAG-a
    make_nodes "$p"
    make_pod "$p" 1 1500
    make_pod "$p" 2 1500
    ip -n "$p-n1" route add 192.168.2.0/24 via 10.99.0.2
    ip -n "$p-n2" route add 192.168.1.0/24 via 10.99.0.1
    SRC[A]=$p-p1; DST_IP[A]=192.168.2.2; SRV_NS[A]=$p-p2
}

setup_vxlan() {
    local p=$TAG-b
    make_nodes "$p"
    make_pod "$p" 1 1450
    make_pod "$p" 2 1450
    ip -n "$p-n1" link add vx0 type vxlan id 42 local 10.99.0.1 remote 10.99.0.2 dstport 4789 dev eth0
    ip -n "$p-n2" link add vx0 type vxlan id 42 local 10.99.0.2 remote 10.99.0.1 dstport 4789 dev eth0
    ip -n "$p-n1" addr add 10.200.0.1/24 dev vx0
    ip -n "$p-n2" addr add 10.200.0.2/24 dev vx0
    ip -n "$p-n1" link set vx0 up mtu 1450
    ip -n "$p-n2" link set vx0 up mtu 1450
    ip -n "$p-n1" route add 192.168.2.0/24 via 10.200.0.2 dev vx0
    ip -n "$p-n2" route add 192.168.1.0/24 via 10.200.0.1 dev vx0
    SRC[B]=$p-p1; DST_IP[B]=192.168.2.2; SRV_NS[B]=$p-p2
}

# Executes weft-cni ($3) ADD in node $1 for pod namespace $2; prints the pod's IPv4 address.
cni_add() {
    local node=$1 pod=$2 cni=$3 out
    out=$(echo '{"cniVersion":"1.0.0","name":"weave","type":"weft"}' |
        ip netns exec "$node" env CNI_COMMAND=ADD CNI_CONTAINERID="bench-$pod" \
            CNI_NETNS="/var/run/netns/$pod" CNI_IFNAME=eth0 CNI_PATH="$(dirname "$cni")" \
            CNI_ARGS="IgnoreUnknown=1;K8S_POD_NAME=$pod" "$cni")
    echo "$out" | python3 -c 'import json,sys; print(json.load(sys.stdin)["ips"][0]["address"].split("/")[0])'
}

wait_http() {
    local ns=$1 pid=$2
    for _ in $(seq 1 100); do
        kill -0 "$pid" 2>/dev/null || { echo "weft router in $ns died; log:" >&2; cat "$WORK/$ns.log" >&2; exit 1; }
        if nsx "$ns" python3 - <<'EOF' 2>/dev/null; then return 0; fi
import urllib.request, sys
sys.exit(0 if urllib.request.urlopen("http://127.0.0.1:6784/status", timeout=1).status == 200 else 1)
EOF
        sleep 0.2
    done
    echo "weft router in $ns not ready; log:" >&2
    cat "$WORK/$ns.log" >&2
    exit 1
}

# The weft daemons of datapath C and D, by letter.
declare -A WEFT_PIDS
# setup_weft LETTER WEFT WEFT_CNI [PASSWORD]: two weft routers and their pods as datapath
# LETTER (with WEAVE_PASSWORD if given).
setup_weft() {
    local dp=$1 weft=$2 cni=$3 password=${4:-}
    local p=$TAG-${dp,,} i other pids=()
    make_nodes "$p"
    for i in 1 2; do
        other=$((3 - i))
        mkdir -p "$WORK/db-$dp$i"
        ip netns exec "$p-n$i" env RUST_LOG=warn ${password:+WEAVE_PASSWORD="$password"} "$weft" router --name "02:77:66:be:00:0$i" \
            --nickname "bench$i" --db-dir "$WORK/db-$dp$i" --ipalloc-range 10.32.0.0/12 \
            --metrics-addr 127.0.0.1:6782 "10.99.0.$other" >"$WORK/$p-n$i.log" 2>&1 &
        PIDS+=($!)
        pids+=($!)
    done
    WEFT_PIDS[$dp]="${pids[*]}"
    for i in 1 2; do wait_http "$p-n$i" "${pids[$((i - 1))]}"; done
    new_ns "$p-p1"
    new_ns "$p-p2"
    local ip1 ip2
    ip1=$(cni_add "$p-n1" "$p-p1" "$cni")
    ip2=$(cni_add "$p-n2" "$p-p2" "$cni")
    [ -n "$ip1" ] && [ -n "$ip2" ] || { echo "weft-cni ADD failed" >&2; exit 1; }
    # The ring may still be settling: wait until the pods reach each other.
    for _ in $(seq 1 100); do
        nsx "$p-p1" ping -c 1 -W 1 "$ip2" >/dev/null 2>&1 && break
        sleep 0.2
    done
    nsx "$p-p1" ping -c 1 -W 1 "$ip2" >/dev/null || { echo "weft pods cannot reach each other" >&2; exit 1; }
    SRC[$dp]=$p-p1; DST_IP[$dp]=$ip2; SRV_NS[$dp]=$p-p2
}

cpu_ticks() { # utime + stime of the given PIDs, in clock ticks
    local total=0 pid f
    for pid in "$@"; do
        # Fields after the ")" that ends the command name: utime is the 12th, stime 13th.
        f=$(sed 's/.*) //' "/proc/$pid/stat")
        set -- $f
        total=$((total + ${12} + ${13}))
    done
    echo "$total"
}

rss_kib() { # peak RSS summed over PIDs
    local total=0 pid v
    for pid in "$@"; do
        v=$(awk '/^VmHWM:/ {print $2}' "/proc/$pid/status")
        total=$((total + v))
    done
    echo "$total"
}

RESULTS=$WORK/results
: >"$RESULTS"
record() { echo "$1 $2 $3" >>"$RESULTS"; }

# iperf3 client; records Gbit/s and retransmits under metric names $3/$4.
run_iperf() {
    local dp=$1 streams=$2 json
    json=$WORK/iperf-$dp-$streams.json
    nsx "${SRC[$dp]}" iperf3 -c "${DST_IP[$dp]}" -t "$DURATION" -P "$streams" -J >"$json" || {
        echo "iperf3 failed for $dp" >&2; cat "$json" >&2; exit 1; }
    python3 - "$json" <<'EOF' >"$WORK/parsed"
import json, sys
d = json.load(open(sys.argv[1]))["end"]
print(d["sum_received"]["bits_per_second"] / 1e9, d["sum_sent"].get("retransmits", 0))
EOF
    read -r gbps retr <"$WORK/parsed"
    record "$dp" "gbps$streams" "$gbps"
    record "$dp" "retr$streams" "$retr"
}

run_one() {
    local dp=$1 before after rtt
    local pids=(${WEFT_PIDS[$dp]:-})
    [ ${#pids[@]} -gt 0 ] && before=$(cpu_ticks "${pids[@]}")
    run_iperf "$dp" 1
    run_iperf "$dp" 4
    nsx "${SRC[$dp]}" ping -q -c "$PINGS" -i 0.05 "${DST_IP[$dp]}" >"$WORK/ping-$dp"
    echo "  ping ${NAME[$dp]}: $(grep -E '^rtt|^round-trip' "$WORK/ping-$dp")" >&2
    rtt=$(awk -F'/' '/^rtt|^round-trip/ {print $5}' "$WORK/ping-$dp")
    record "$dp" rtt "$rtt"
    if [ ${#pids[@]} -gt 0 ]; then
        after=$(cpu_ticks "${pids[@]}")
        record "$dp" cpu "$(python3 -c "print(($after - $before) / $(getconf CLK_TCK))")"
        record "$dp" rss "$(python3 -c "print($(rss_kib "${pids[@]}") / 1024)")"
    fi
}

# Captures weft's datagrams on node 1's underlay during a short transfer and decodes
# them as VXLAN. Segmentation offload is turned off on the underlay for the capture, so the
# capture point sees the datagrams as they would appear on a wire, not 64 KB GSO units.
verify_wire() {
    command -v tshark >/dev/null || { echo "tshark not installed: skipping -t" >&2; return; }
    local p=$TAG-c cap=$WORK/weft.pcap
    local n
    # gso_max_segs 1 makes the stack segment in software before the capture point.
    for n in n1 n2; do ip -n "$p-$n" link set eth0 gso_max_segs 1; done
    # Not through nsx: a backgrounded function runs in a subshell, and $! would be that
    # subshell's PID, not tshark's, so cleanup could not stop it.
    ip netns exec "$p-n1" tshark -q -i eth0 -f "udp port 6784" -a duration:4 -w "$cap" >"$WORK/tshark.log" 2>&1 &
    local tpid=$!
    PIDS+=("$tpid")
    sleep 1.5
    nsx "${SRC[C]}" iperf3 -c "${DST_IP[C]}" -t 1 >/dev/null
    nsx "${SRC[C]}" ping -c 3 -i 0.2 -s 1200 -M do "${DST_IP[C]}" >/dev/null || true
    wait "$tpid" || true
    for n in n1 n2; do ip -n "$p-$n" link set eth0 gso_max_segs 65535; done
    # The outer UDP checksum is left to the (virtual) NIC, so it is not final where the
    # capture sees it; everything inside, and the outer IPv4 header, is checked.
    # iperf3's payload is opaque: without the second -d, heuristic dissectors (Thrift)
    # try to parse it and flag "malformed" inside the TCP payload.
    local opts=(-r "$cap" -d udp.port==6784,vxlan -d tcp.port==5201,data -o tcp.check_checksum:TRUE -o ip.check_checksum:TRUE)
    local total vx bad malformed big
    total=$(tshark -r "$cap" -Y udp -T fields -e frame.number 2>/dev/null | wc -l)
    vx=$(tshark "${opts[@]}" -Y "vxlan && eth.type == 0x0800 && ip.version == 4" -T fields -e frame.number 2>/dev/null | wc -l)
    bad=$(tshark "${opts[@]}" -Y "ip.checksum.status == 0 || tcp.checksum.status == 0 || icmp.checksum.status == 0" -T fields -e frame.number 2>/dev/null | wc -l)
    malformed=$(tshark "${opts[@]}" -Y "_ws.malformed" -T fields -e frame.number 2>/dev/null | wc -l)
    big=$(tshark -r "$cap" -Y "frame.len > 1514" -T fields -e frame.number 2>/dev/null | wc -l)
    echo "wire check (tshark -d udp.port==6784,vxlan on node 1's underlay veth):"
    echo "  datagrams $total, decoded as VXLAN+Ethernet+IPv4 $vx, bad inner/IP checksums $bad, malformed $malformed, frames over 1514 bytes $big"
    if grep -q "dropped" "$WORK/tshark.log"; then echo "  (tshark: $(grep dropped "$WORK/tshark.log"))"; fi
    if [ "$total" -gt 0 ] && [ "$total" = "$vx" ] && [ "$bad" = 0 ] && [ "$malformed" = 0 ] && [ "$big" = 0 ]; then
        echo "  OK: every datagram is RFC 7348 VXLAN with valid checksums"
    else
        echo "  FAILED (capture kept in $cap)"
        KEEP_WORK=1
    fi
}

declare -A SRC DST_IP SRV_NS NAME
NAME[A]="plain routing"; NAME[B]="kernel VXLAN"; NAME[C]="weft"; NAME[D]="weft (baseline)"
NAME[E]="weft encrypted"
echo "setting up namespaces (prefix $TAG)..." >&2
[[ $ONLY == *A* ]] && setup_plain
[[ $ONLY == *B* ]] && setup_vxlan
[[ $ONLY == *C* ]] && setup_weft C "$WEFT" "$WEFT_CNI"
[[ $ONLY == *D* ]] && setup_weft D "$BASE_WEFT" "$BASE_WEFT_CNI"
[[ $ONLY == *E* ]] && setup_weft E "$WEFT" "$WEFT_CNI" "bench-password-$$"
for dp in A B C D E; do
    [[ $ONLY == *$dp* ]] || continue
    # Directly, not through nsx: $! must be iperf3's own PID for cleanup to stop it.
    ip netns exec "${SRV_NS[$dp]}" iperf3 -s >"$WORK/server-$dp.log" 2>&1 &
    PIDS+=($!)
done
sleep 0.5

for r in $(seq 1 "$ROUNDS"); do
    for dp in A B C D E; do
        [[ $ONLY == *$dp* ]] || continue
        echo "round $r/$ROUNDS: ${NAME[$dp]}..." >&2
        run_one "$dp"
    done
done

[ -n "$CAPTURE" ] && [[ $ONLY == *C* ]] && verify_wire

python3 - "$RESULTS" "$DURATION" "$ROUNDS" "$BASE_DIR" <<'EOF'
import statistics, sys
from collections import defaultdict
vals = defaultdict(list)
for line in open(sys.argv[1]):
    dp, metric, v = line.split()
    vals[(dp, metric)].append(float(v))
def med(dp, m):
    v = vals.get((dp, m))
    return statistics.median(v) if v else None
def fmt(v, spec):
    return "-" if v is None else format(v, spec)
names = {"A": "plain routing", "B": "kernel VXLAN", "C": "weft",
         "D": f"weft baseline ({sys.argv[4]})", "E": "weft encrypted (WEAVE_PASSWORD)"}
print(f"\n{sys.argv[3]} rounds x {sys.argv[2]} s, medians")
print("| datapath | 1 stream Gbit/s | 4 streams Gbit/s | RTT ms | retransmits 1 / 4 streams | weft CPU s per round (2 daemons) | weft peak RSS MiB (2 daemons) |")
print("|---|---|---|---|---|---|---|")
for dp in "ABCDE":
    if (dp, "gbps1") not in vals:
        continue
    print(f"| {dp} {names[dp]} | {fmt(med(dp,'gbps1'),'.2f')} | {fmt(med(dp,'gbps4'),'.2f')} | "
          f"{fmt(med(dp,'rtt'),'.3f')} | {fmt(med(dp,'retr1'),'.0f')} / {fmt(med(dp,'retr4'),'.0f')} | "
          f"{fmt(med(dp,'cpu'),'.1f')} | {fmt(med(dp,'rss'),'.1f')} |")
def ratio(m, x="C", base="B"):
    b, c = med(base, m), med(x, m)
    if b is None or c is None:
        return "-"
    if b == 0:
        return "inf" if c > 0 else "1.00 (both 0)"
    return f"{c / b:.2f}"
if ("B", "gbps1") in vals and ("C", "gbps1") in vals:
    print(f"\nC/B: 1 stream {ratio('gbps1')}, 4 streams {ratio('gbps4')}, RTT {ratio('rtt')}, "
          f"retransmits {ratio('retr1')} (1 stream) / {ratio('retr4')} (4 streams)")
    print("targets: 1 stream >= 0.5, RTT <= 1.5, retransmits <= 2")
if ("B", "gbps1") in vals and ("D", "gbps1") in vals:
    print(f"D/B: 1 stream {ratio('gbps1', 'D')}, 4 streams {ratio('gbps4', 'D')}, RTT {ratio('rtt', 'D')}, "
          f"retransmits {ratio('retr1', 'D')} (1 stream) / {ratio('retr4', 'D')} (4 streams)")
    print(f"C/D: 1 stream {ratio('gbps1', 'C', 'D')}, RTT {ratio('rtt', 'C', 'D')}, "
          f"CPU {ratio('cpu', 'C', 'D')}")
if ("B", "gbps1") in vals and ("E", "gbps1") in vals:
    print(f"E/B: 1 stream {ratio('gbps1', 'E')}, 4 streams {ratio('gbps4', 'E')}, RTT {ratio('rtt', 'E')}, "
          f"retransmits {ratio('retr1', 'E')} (1 stream) / {ratio('retr4', 'E')} (4 streams)")
    print("target: encrypted 1 stream >= 0.35")
if ("C", "gbps1") in vals and ("E", "gbps1") in vals:
    print(f"E/C (cost of encryption): 1 stream {ratio('gbps1', 'E', 'C')}, RTT {ratio('rtt', 'E', 'C')}, "
          f"CPU {ratio('cpu', 'E', 'C')}")
print("\nper round (Gbit/s 1 stream):", {dp: vals.get((dp, "gbps1")) for dp in "ABCDE"})
print("per round (RTT ms):", {dp: vals.get((dp, "rtt")) for dp in "ABCDE"})
EOF
