#!/usr/bin/env bash
# Pod-to-pod throughput, latency and cost of several datapaths, measured interleaved in one
# run on this machine:
#   A  plain routing between two node namespaces (no encapsulation, pod MTU 1500)
#   B  Linux kernel VXLAN between the nodes (pod MTU 1450)
#   C  weft: two `weft router` daemons forwarding in user space (TUN), pods attached by
#      executing weft-cni as a runtime does (CNI_* environment + network config on stdin)
#   D  (with -B DIR) the same with another build of weft, e.g. the one before a change,
#      so that both are measured interleaved in one run
#   E  weft with WEAVE_PASSWORD: every datagram sealed (AES-256-GCM), pod MTU 1426
#   K  weft kernel mode: as C, but the daemons run with `--datapath kernel` and program a
#      Linux VXLAN device, so the kernel forwards (the daemons' own CPU is near zero: the
#      cost shows in the whole-machine busy cores instead)
# Each topology: two node namespaces joined by a veth "underlay" (MTU 1500), one pod
# namespace per node. The underlay is measured in up to two modes (-s):
#   u  unshaped veth: as fast as the CPUs can copy
#   s  shaped to 10 Gbit/s like a real NIC, on eth0 of both node namespaces of every
#      datapath:  tc qdisc replace dev eth0 root tbf rate 10gbit burst 4mb latency 2ms
# Every round runs, for each mode in turn, every datapath (round 1: u: A B C E K, then
# s: A B C E K; round 2: ...), so that all numbers of one run are comparable; the tables
# show medians. Each test: iperf3 with 1 stream, with 4 streams, then ping. During the
# 1-stream transfer the whole machine's CPU use is sampled from /proc/stat: busy cores =
# (non-idle, non-iowait jiffies) / (all jiffies) x number of CPUs. It counts everything
# the transfer costs (iperf3, softirq, the weft daemons), whichever datapath does the work,
# and is also reported per Gbit/s.
#
# Run as root after `cargo build --release --workspace`:
#   benches/iperf.sh                 # 3 rounds of 10 s, both underlay modes
#   benches/iperf.sh -r 1 -d 3       # quick look
#   benches/iperf.sh -s s -o BCK     # shaped underlay only, kernel VXLAN vs weft's two modes
# All traffic stays inside the namespaces this script creates; they are deleted and the
# processes it started are killed (by PID) on exit.
set -euo pipefail

DURATION=10
ROUNDS=3
BIN_DIR=""
PINGS=20
ONLY="ABCEK"
MODES="us"
CAPTURE=""
BASE_DIR=""
NAT=0
# The qdisc of a shaped underlay (-s s), on eth0 of both nodes of every datapath.
SHAPE=(tbf rate 10gbit burst 4mb latency 2ms)
# Datapaths in the order every round runs them.
DATAPATHS="A B C D E K"

usage() {
    cat <<EOF
usage: $0 [-d seconds] [-r rounds] [-b bin_dir] [-B baseline_bin_dir] [-p pings]
          [-o ABCDEK] [-s us] [-n] [-t]
  -d  iperf3 duration per test (default $DURATION)
  -r  rounds (default $ROUNDS)
  -b  directory holding weft and weft-cni (default: target/release next to this script)
  -p  ping count for RTT (default $PINGS, 50 ms apart)
  -B  directory holding another build of weft and weft-cni, measured as datapath D
  -o  datapaths to run, subset of ABCDEK (default $ONLY, plus D with -B):
        A plain routing, B kernel VXLAN, C weft (user space), D weft baseline (-B),
        E weft encrypted (WEAVE_PASSWORD), K weft kernel mode (weft router --datapath kernel)
  -s  underlay modes, each round runs every datapath in each (default $MODES):
        u  unshaped veth
        s  shaped to 10 Gbit/s on both nodes: tc qdisc replace dev eth0 root ${SHAPE[*]}
  -n  load a NAT table (hence conntrack) in every node namespace, as kube-proxy does on
      every Kubernetes node: weft always has its own NAT table, so this makes the other
      datapaths pay the same per-packet connection tracking
  -t  also capture weft's underlay traffic during a 1 s transfer and check it with
      tshark: every datagram must decode as VXLAN, with valid inner checksums (once,
      after the rounds, on the unshaped underlay)
Reported per mode: medians of Gbit/s (1 and 4 streams), RTT, retransmits, whole-machine
busy cores during the 1-stream test (from /proc/stat) and busy cores per Gbit/s, the weft
daemons' CPU seconds and peak RSS; ratios to B and weft's targets.
EOF
}

while getopts "d:r:b:B:p:o:s:nth" opt; do
    case "$opt" in
        d) DURATION=$OPTARG ;;
        r) ROUNDS=$OPTARG ;;
        b) BIN_DIR=$OPTARG ;;
        B) BASE_DIR=$OPTARG ;;
        p) PINGS=$OPTARG ;;
        o) ONLY=$OPTARG ;;
        s) MODES=$OPTARG ;;
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
[[ $ONLY =~ ^[ABCDEK]+$ ]] || { echo "-o: letters of ABCDEK expected, got '$ONLY'" >&2; exit 2; }
[[ $MODES =~ ^(u|s|us|su)$ ]] || { echo "-s: u, s or us expected, got '$MODES'" >&2; exit 2; }
if [[ $ONLY == *D* ]] && [ -z "$BASE_DIR" ]; then
    echo "datapath D needs -B baseline_bin_dir" >&2; exit 2
fi
for t in ip tc iperf3 ping python3 ${CAPTURE:+ethtool tshark} "$WEFT" "$WEFT_CNI" ${BASE_WEFT:+"$BASE_WEFT" "$BASE_WEFT_CNI"}; do
    command -v "$t" >/dev/null || { echo "missing: $t" >&2; exit 1; }
done
[ "$(id -u)" = 0 ] || { echo "run as root" >&2; exit 1; }
# CPUs counted in /proc/stat's aggregate line (all of them, whatever this script's affinity).
NCPU=$(grep -c '^cpu[0-9]' /proc/stat)

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
    if [ "$NAT" = 1 ]; then
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

# The weft daemons of datapaths C, D, E and K, by letter.
declare -A WEFT_PIDS
# setup_weft LETTER WEFT WEFT_CNI PASSWORD [ROUTER_ARG...]: two weft routers and their pods
# as datapath LETTER, with WEAVE_PASSWORD if PASSWORD is not empty, and the ROUTER_ARGs
# (e.g. --datapath kernel) added to each `weft router` command line.
setup_weft() {
    local dp=$1 weft=$2 cni=$3 password=$4
    shift 4
    local p=$TAG-${dp,,} i other pids=()
    make_nodes "$p"
    for i in 1 2; do
        other=$((3 - i))
        mkdir -p "$WORK/db-$dp$i"
        ip netns exec "$p-n$i" env RUST_LOG=warn ${password:+WEAVE_PASSWORD="$password"} "$weft" router --name "02:77:66:be:00:0$i" \
            --nickname "bench$i" --db-dir "$WORK/db-$dp$i" --ipalloc-range 10.32.0.0/12 \
            --metrics-addr 127.0.0.1:6782 "$@" "10.99.0.$other" >"$WORK/$p-n$i.log" 2>&1 &
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
    if [ -z "$ip1" ] || [ -z "$ip2" ]; then echo "weft-cni ADD failed" >&2; exit 1; fi
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
        # shellcheck disable=SC2086 # split into fields on purpose
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

# Whole machine, from /proc/stat's aggregate "cpu" line: prints "busy total" jiffies, busy
# being total - idle - iowait. guest and guest_nice are already counted in user and nice.
machine_jiffies() {
    local _cpu user nice system idle iowait irq softirq steal _rest
    read -r _cpu user nice system idle iowait irq softirq steal _rest </proc/stat
    local total=$((user + nice + system + idle + iowait + irq + softirq + steal))
    echo "$((total - idle - iowait)) $total"
}

# One line per measurement: "MODE DATAPATH METRIC VALUE", MODE being u or s (-s).
RESULTS=$WORK/results
: >"$RESULTS"
record() { echo "$1 $2 $3 $4" >>"$RESULTS"; }

# set_underlay MODE: shape (s) or unshape (u) eth0 of both nodes of every datapath.
set_underlay() {
    local mode=$1 dp n
    for dp in $DATAPATHS; do
        [[ $ONLY == *$dp* ]] || continue
        for n in n1 n2; do
            if [ "$mode" = s ]; then
                ip netns exec "$TAG-${dp,,}-$n" tc qdisc replace dev eth0 root "${SHAPE[@]}"
            else
                # Fails when there is nothing to delete (veth's default: noqueue).
                ip netns exec "$TAG-${dp,,}-$n" tc qdisc del dev eth0 root 2>/dev/null || true
            fi
        done
    done
}

# run_iperf MODE DATAPATH STREAMS: iperf3 client; records Gbit/s and retransmits as
# gbps<STREAMS> and retr<STREAMS>, and for 1 stream the machine's busy cores (busy1) and
# busy cores per Gbit/s (cpg).
run_iperf() {
    local mode=$1 dp=$2 streams=$3 json gbps retr stat0 stat1 busy
    json=$WORK/iperf-$mode-$dp-$streams.json
    stat0=$(machine_jiffies)
    nsx "${SRC[$dp]}" iperf3 -c "${DST_IP[$dp]}" -t "$DURATION" -P "$streams" -J >"$json" || {
        echo "iperf3 failed for $dp" >&2; cat "$json" >&2; exit 1; }
    stat1=$(machine_jiffies)
    python3 - "$json" <<'EOF' >"$WORK/parsed"
import json, sys
d = json.load(open(sys.argv[1]))["end"]
print(d["sum_received"]["bits_per_second"] / 1e9, d["sum_sent"].get("retransmits", 0))
EOF
    read -r gbps retr <"$WORK/parsed"
    record "$mode" "$dp" "gbps$streams" "$gbps"
    record "$mode" "$dp" "retr$streams" "$retr"
    if [ "$streams" = 1 ]; then
        busy=$(awk -v a="$stat0" -v b="$stat1" -v n="$NCPU" 'BEGIN {
            split(a, x, " "); split(b, y, " ")
            if (y[2] > x[2]) print (y[1] - x[1]) / (y[2] - x[2]) * n; else print 0 }')
        record "$mode" "$dp" busy1 "$busy"
        record "$mode" "$dp" cpg "$(awk -v b="$busy" -v g="$gbps" 'BEGIN {
            if (g > 0) print b / g; else print "inf" }')"
        awk -v g="$gbps" -v b="$busy" -v name="${NAME[$dp]}" 'BEGIN {
            printf "  1 stream %s: %.2f Gbit/s, %.2f busy cores\n", name, g, b }' >&2
    fi
}

# run_one MODE DATAPATH: one round's tests of DATAPATH on the underlay as set for MODE.
run_one() {
    local mode=$1 dp=$2 before after rtt
    local pids
    read -ra pids <<<"${WEFT_PIDS[$dp]:-}"
    [ ${#pids[@]} -gt 0 ] && before=$(cpu_ticks "${pids[@]}")
    run_iperf "$mode" "$dp" 1
    run_iperf "$mode" "$dp" 4
    nsx "${SRC[$dp]}" ping -q -c "$PINGS" -i 0.05 "${DST_IP[$dp]}" >"$WORK/ping-$mode-$dp"
    echo "  ping ${NAME[$dp]}: $(grep -E '^rtt|^round-trip' "$WORK/ping-$mode-$dp")" >&2
    rtt=$(awk -F'/' '/^rtt|^round-trip/ {print $5}' "$WORK/ping-$mode-$dp")
    record "$mode" "$dp" rtt "$rtt"
    if [ ${#pids[@]} -gt 0 ]; then
        after=$(cpu_ticks "${pids[@]}")
        record "$mode" "$dp" cpu "$(python3 -c "print(($after - $before) / $(getconf CLK_TCK))")"
        record "$mode" "$dp" rss "$(python3 -c "print($(rss_kib "${pids[@]}") / 1024)")"
    fi
}

# Captures weft's datagrams on node 1's underlay during a short transfer and decodes
# them as VXLAN. Segmentation offload is turned off on the underlay for the capture, so the
# capture point sees the datagrams as they would appear on a wire, not 64 KB GSO units.
verify_wire() {
    command -v tshark >/dev/null || { echo "tshark not installed: skipping -t" >&2; return; }
    local dp=${1:-C}
    local p=$TAG-${dp,,} cap=$WORK/weft-$dp.pcap
    local n
    # gso_max_segs 1 makes the stack segment in software before the capture point, and
    # with checksum offload off it also fills in every checksum a NIC would (the kernel
    # VXLAN device leaves the inner ones to the NIC): the capture sees the wire's bytes.
    for n in n1 n2; do ip -n "$p-$n" link set eth0 gso_max_segs 1; done
    for n in n1 n2; do nsx "$p-$n" ethtool -K eth0 tx off >/dev/null; done
    # Not through nsx: a backgrounded function runs in a subshell, and $! would be that
    # subshell's PID, not tshark's, so cleanup could not stop it.
    ip netns exec "$p-n1" tshark -q -i eth0 -f "udp port 6784" -a duration:4 -w "$cap" >"$WORK/tshark.log" 2>&1 &
    local tpid=$!
    PIDS+=("$tpid")
    sleep 1.5
    nsx "${SRC[$dp]}" iperf3 -c "${DST_IP[$dp]}" -t 1 >/dev/null
    nsx "${SRC[$dp]}" ping -c 3 -i 0.2 -s 1200 -M "do" "${DST_IP[$dp]}" >/dev/null || true
    wait "$tpid" || true
    for n in n1 n2; do ip -n "$p-$n" link set eth0 gso_max_segs 65535; done
    for n in n1 n2; do nsx "$p-$n" ethtool -K eth0 tx on >/dev/null; done
    # iperf3's payload is opaque: without the second -d, heuristic dissectors (Thrift)
    # try to parse it and flag "malformed" inside the TCP payload.
    # shellcheck disable=SC2054 # the commas belong to tshark's -d syntax
    local opts=(-r "$cap" -d udp.port==6784,vxlan -d tcp.port==5201,data -o tcp.check_checksum:TRUE -o ip.check_checksum:TRUE -o udp.check_checksum:TRUE)
    local total vx bad malformed big
    total=$(tshark -r "$cap" -Y udp -T fields -e frame.number 2>/dev/null | wc -l)
    vx=$(tshark "${opts[@]}" -Y "vxlan && eth.type == 0x0800 && ip.version == 4" -T fields -e frame.number 2>/dev/null | wc -l)
    bad=$(tshark "${opts[@]}" -Y "ip.checksum.status == 0 || udp.checksum.status == 0 || tcp.checksum.status == 0 || icmp.checksum.status == 0" -T fields -e frame.number 2>/dev/null | wc -l)
    malformed=$(tshark "${opts[@]}" -Y "_ws.malformed" -T fields -e frame.number 2>/dev/null | wc -l)
    big=$(tshark -r "$cap" -Y "frame.len > 1514" -T fields -e frame.number 2>/dev/null | wc -l)
    echo "wire check, ${NAME[$dp]} (tshark -d udp.port==6784,vxlan on node 1's underlay veth):"
    echo "  datagrams $total, decoded as VXLAN+Ethernet+IPv4 $vx, bad checksums (outer IP and UDP, inner IP, TCP, ICMP) $bad, malformed $malformed, frames over 1514 bytes $big"
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
NAME[E]="weft encrypted"; NAME[K]="weft kernel mode"
declare -A MODE_NAME
MODE_NAME[u]="unshaped underlay"; MODE_NAME[s]="underlay shaped to 10 Gbit/s"
echo "setting up namespaces (prefix $TAG)..." >&2
[[ $ONLY == *A* ]] && setup_plain
[[ $ONLY == *B* ]] && setup_vxlan
[[ $ONLY == *C* ]] && setup_weft C "$WEFT" "$WEFT_CNI" ""
[[ $ONLY == *D* ]] && setup_weft D "$BASE_WEFT" "$BASE_WEFT_CNI" ""
[[ $ONLY == *E* ]] && setup_weft E "$WEFT" "$WEFT_CNI" "bench-password-$$"
[[ $ONLY == *K* ]] && setup_weft K "$WEFT" "$WEFT_CNI" "" --datapath kernel
for dp in $DATAPATHS; do
    [[ $ONLY == *$dp* ]] || continue
    # Directly, not through nsx: $! must be iperf3's own PID for cleanup to stop it.
    ip netns exec "${SRV_NS[$dp]}" iperf3 -s >"$WORK/server-$dp.log" 2>&1 &
    PIDS+=($!)
done
sleep 0.5

for r in $(seq 1 "$ROUNDS"); do
    for ((m = 0; m < ${#MODES}; m++)); do
        mode=${MODES:m:1}
        set_underlay "$mode"
        for dp in $DATAPATHS; do
            [[ $ONLY == *$dp* ]] || continue
            echo "round $r/$ROUNDS, ${MODE_NAME[$mode]}: ${NAME[$dp]}..." >&2
            run_one "$mode" "$dp"
        done
    done
done
# The wire check, and anything after, on the unshaped underlay.
set_underlay u

if [ -n "$CAPTURE" ]; then
    for dp in C K; do
        [[ $ONLY == *$dp* ]] && verify_wire "$dp"
    done
fi

python3 - "$RESULTS" "$DURATION" "$ROUNDS" "$BASE_DIR" "$MODES" "${SHAPE[*]}" "$NCPU" <<'EOF'
import statistics, sys
from collections import defaultdict
results, duration, rounds, base_dir, modes, shape, ncpu = sys.argv[1:8]
vals = defaultdict(list)
for line in open(results):
    mode, dp, metric, v = line.split()
    vals[(mode, dp, metric)].append(float(v))
DPS = "ABCDEK"
names = {"A": "plain routing", "B": "kernel VXLAN", "C": "weft (user space)",
         "D": f"weft baseline ({base_dir})", "E": "weft encrypted (WEAVE_PASSWORD)",
         "K": "weft kernel mode (--datapath kernel)"}
titles = {"u": "unshaped veth underlay",
          "s": f"underlay shaped to 10 Gbit/s ({shape}, both nodes)"}
short = {"u": "unshaped", "s": "shaped 10 Gbit/s"}

def med(mode, dp, m):
    v = vals.get((mode, dp, m))
    return statistics.median(v) if v else None

def fmt(v, spec):
    return "-" if v is None else format(v, spec)

def ratio(mode, m, x, base="B"):
    b, c = med(mode, base, m), med(mode, x, m)
    return None if b is None or c is None or b == 0 else c / b

def fmt_ratio(mode, m, x, base="B", spec=".2f"):
    """x/base, or "x vs base" when base's median is 0."""
    b, c = med(mode, base, m), med(mode, x, m)
    if b is None or c is None:
        return "-"
    if b == 0:
        return f"{format(c, spec)} vs {format(b, spec)}"
    return f"{c / b:.2f}"

def target(label, r, op, limit):
    if r is None:
        return f"{label} n/a"
    ok = r >= limit if op == ">=" else r <= limit
    return f"{label} {r:.2f} {op} {limit:.2f} {'met' if ok else 'NOT MET'}"

print(f"\n{rounds} rounds x {duration} s per iperf3 test, medians. Busy cores: whole machine "
      f"({ncpu} CPUs, /proc/stat) during the 1-stream test; weft CPU and RSS: its 2 daemons.")
for mode in modes:
    present = [dp for dp in DPS if (mode, dp, "gbps1") in vals]
    if not present:
        continue
    print(f"\n### {titles[mode]}\n")
    print("| datapath | 1 stream Gbit/s | 4 streams Gbit/s | RTT ms | retransmits 1 / 4 | "
          "busy cores (1 stream) | busy cores per Gbit/s | weft CPU s per round | weft peak RSS MiB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for dp in present:
        def g(m, spec):
            return fmt(med(mode, dp, m), spec)
        print(f"| {dp} {names[dp]} | {g('gbps1', '.2f')} | {g('gbps4', '.2f')} | {g('rtt', '.3f')} | "
              f"{g('retr1', '.0f')} / {g('retr4', '.0f')} | {g('busy1', '.2f')} | {g('cpg', '.3f')} | "
              f"{g('cpu', '.1f')} | {g('rss', '.1f')} |")
    others = [dp for dp in "CEKD" if dp in present]
    if "B" not in present or not others:
        continue
    print(f"\nratios to B (kernel VXLAN), {titles[mode]}:\n")
    print("| datapath / B | 1 stream | 4 streams | RTT | CPU per Gbit/s | retransmits 1 stream |")
    print("|---|---|---|---|---|---|")
    for dp in others:
        print(f"| {dp} {names[dp]} | {fmt_ratio(mode, 'gbps1', dp)} | {fmt_ratio(mode, 'gbps4', dp)} | "
              f"{fmt_ratio(mode, 'rtt', dp)} | {fmt_ratio(mode, 'cpg', dp)} | "
              f"{fmt_ratio(mode, 'retr1', dp, spec='.0f')} |")
    for dp in (d for d in "CK" if d in present):
        if mode == "s":
            checks = [target("1 stream", ratio(mode, "gbps1", dp), ">=", 0.95)]
        else:
            checks = [target("1 stream", ratio(mode, "gbps1", dp), ">=", 0.70),
                      target("4 streams", ratio(mode, "gbps4", dp), ">=", 0.80)]
        checks += [target("RTT", ratio(mode, "rtt", dp), "<=", 1.5),
                   target("CPU per Gbit/s", ratio(mode, "cpg", dp), "<=", 1.5)]
        cr, br = med(mode, dp, "retr1"), med(mode, "B", "retr1")
        checks.append(f"retransmits (1 stream) {cr:.0f} <= {br:.0f} (kernel's) "
                      f"{'met' if cr <= br else 'NOT MET'}")
        print(f"\ntargets, {dp} ({names[dp]}) / B, {short[mode]}: " + "; ".join(checks))
    if "E" in present:
        print(f"informational: E (encrypted) / B 1 stream {fmt_ratio(mode, 'gbps1', 'E')} "
              f"(former target >= 0.35)")
    if "C" in present and "D" in present:
        print(f"C/D: 1 stream {fmt_ratio(mode, 'gbps1', 'C', 'D')}, RTT {fmt_ratio(mode, 'rtt', 'C', 'D')}, "
              f"CPU per Gbit/s {fmt_ratio(mode, 'cpg', 'C', 'D')}, weft CPU {fmt_ratio(mode, 'cpu', 'C', 'D')}")
    if "C" in present and "E" in present:
        print(f"E/C (cost of encryption): 1 stream {fmt_ratio(mode, 'gbps1', 'E', 'C')}, "
              f"RTT {fmt_ratio(mode, 'rtt', 'E', 'C')}, CPU per Gbit/s {fmt_ratio(mode, 'cpg', 'E', 'C')}, "
              f"weft CPU {fmt_ratio(mode, 'cpu', 'E', 'C')}")

print("\nper round:")
for mode in modes:
    for metric, label in (("gbps1", "Gbit/s 1 stream"), ("gbps4", "Gbit/s 4 streams"),
                          ("rtt", "RTT ms"), ("busy1", "busy cores 1 stream")):
        row = {dp: [round(v, 3) for v in vals[(mode, dp, metric)]]
               for dp in DPS if (mode, dp, metric) in vals}
        if row:
            print(f"  {short[mode]}, {label}: {row}")
EOF
