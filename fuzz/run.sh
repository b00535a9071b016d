#!/usr/bin/env bash
# Runs weft's fuzz targets with cargo-fuzz (libFuzzer, nightly toolchain), each for a given
# time, growing the committed corpus in fuzz/corpus/<target>; then minimises each corpus.
#
#   fuzz/run.sh [-t seconds_per_target] [-j jobs] [-n] [target ...]
#
# Default: every target for 60 s, one job. -n skips the minimisation. A crash stops that
# target; libFuzzer writes the input to fuzz/artifacts/<target>/ and prints how to
# reproduce it (`cargo +nightly fuzz run <target> <file>`): turn it into a unit test.
# Needs: rustup's nightly toolchain and `cargo install cargo-fuzz`.
set -euo pipefail
cd "$(dirname "$0")/.."

SECONDS_PER=60
JOBS=1
MINIMISE=1
while getopts "t:j:nh" opt; do
    case "$opt" in
        t) SECONDS_PER=$OPTARG ;;
        j) JOBS=$OPTARG ;;
        n) MINIMISE=0 ;;
        h) sed -n 2,10p "$0"; exit 0 ;;
        *) exit 2 ;;
    esac
done
shift $((OPTIND - 1))
ALL=(control_handshake control_frames control_messages ring_merge persisted_state
     datapath_rx datapath_rx_sealed http_path_parts cni_config report_template)
TARGETS=("${@:-${ALL[@]}}")
[ "$#" -gt 0 ] || TARGETS=("${ALL[@]}")

cargo +nightly fuzz build
PARALLEL=()
[ "$JOBS" -gt 1 ] && PARALLEL=(-jobs="$JOBS" -workers="$JOBS")
failed=0
for t in "${TARGETS[@]}"; do
    mkdir -p "fuzz/corpus/$t"
    echo "== $t: ${SECONDS_PER}s"
    log=$(mktemp)
    EXTRA=()
    # gtmpl lexes on a thread of its own; LeakSanitizer reports that thread's 32-byte
    # glibc TLS record when the process ends before the thread is reaped.
    [ "$t" = report_template ] && EXTRA=(-detect_leaks=0)
    if cargo +nightly fuzz run "$t" "fuzz/corpus/$t" -- \
        -max_total_time="$SECONDS_PER" -timeout=10 -rss_limit_mb=2048 -max_len=65536 \
        "${PARALLEL[@]}" "${EXTRA[@]}" -print_final_stats=1 >"$log" 2>&1; then
        grep -E '^stat::number_of_executed_units|^stat::peak_rss_mb|^Done' "$log" | sed 's/^/   /' || true
        tail -n 1 "$log" | sed 's/^/   /'
    else
        failed=1
        echo "   CRASH in $t:"
        grep -E 'panicked|ERROR|artifact_prefix|Test unit written' "$log" | head -n 8 | sed 's/^/   /'
    fi
    rm -f "$log"
    if [ "$MINIMISE" = 1 ]; then
        cargo +nightly fuzz cmin "$t" "fuzz/corpus/$t" >/dev/null 2>&1 || true
    fi
    echo "   corpus: $(find "fuzz/corpus/$t" -type f | wc -l) inputs"
done
exit "$failed"
