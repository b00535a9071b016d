#!/usr/bin/env bash
# Builds the Kubernetes parts of the local cluster from Debian bookworm's `kubernetes`
# source package (upstream 1.20.2 with its Go modules, so it builds offline): kube-apiserver,
# kube-controller-manager, kube-scheduler, kubelet, kube-proxy, and the pause binary from
# the same tree. Nothing can be pulled on these machines, and 1.20.2 is the only server
# release any reachable registry carries.
#
#   deploy/local/build-k8s.sh        prints the directory holding the binaries
#
# The result is cached outside the clone, keyed by the source package's version:
# $WEFT_K8S_CACHE (default /var/cache/weft/k8s)/<version>/bin. A second run (and CI on a
# machine that ran it once) only checks the cache. A fresh machine spends about 14 minutes
# of CPU (2 vCPUs: about 8-10 minutes) and 2.6 GB of disk, once. Needs root (apt-get).
# /etc/apt is never changed: the source list is a private copy with `Types: deb-src`.
set -euo pipefail

cache=${WEFT_K8S_CACHE:-/var/cache/weft/k8s}
parts=(kube-apiserver kube-controller-manager kube-scheduler kubelet kube-proxy)
export DEBIAN_FRONTEND=noninteractive

log() { echo "build-k8s: $*" >&2; }

# What building (and later running) needs, from Debian's archive.
need_pkgs=()
for p in golang-1.19-go rsync jq libc6-dev gcc dpkg-dev; do
    dpkg -s "$p" >/dev/null 2>&1 || need_pkgs+=("$p")
done
if [ ${#need_pkgs[@]} -gt 0 ]; then
    log "installing ${need_pkgs[*]}"
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${need_pkgs[@]}" >&2
fi

apt_dir="$cache/apt"
mkdir -p "$apt_dir/parts" "$apt_dir/lists/partial" "$apt_dir/cache/archives/partial"
sed 's/^Types: deb$/Types: deb-src/' /etc/apt/sources.list.d/debian.sources \
    >"$apt_dir/parts/debian-src.sources"
apt_opts=(-o Dir::Etc::SourceList=/dev/null -o "Dir::Etc::SourceParts=$apt_dir/parts"
    -o "Dir::State::Lists=$apt_dir/lists" -o "Dir::Cache=$apt_dir/cache")

# The version names the cache; `apt-cache showsrc` needs the private lists, fetched once.
if ! version=$(apt-cache "${apt_opts[@]}" showsrc kubernetes 2>/dev/null |
    sed -n 's/^Version: //p' | sort -V | tail -1) || [ -z "$version" ]; then
    log "fetching the source index (private apt lists under $apt_dir)"
    apt-get "${apt_opts[@]}" update -qq >&2
    version=$(apt-cache "${apt_opts[@]}" showsrc kubernetes | sed -n 's/^Version: //p' | sort -V | tail -1)
fi
[ -n "$version" ] || { log "no kubernetes source package found"; exit 1; }
out="$cache/$version/bin"

complete() {
    for p in "${parts[@]}" pause; do [ -x "$out/$p" ] || return 1; done
}
if complete; then
    echo "$out"
    exit 0
fi

src="$cache/$version/src"
if [ ! -f "$src/Makefile" ]; then
    log "fetching kubernetes $version (source package)"
    dl="$cache/$version/dl"
    rm -rf "$dl" "$src"
    mkdir -p "$dl"
    (cd "$dl" && apt-get "${apt_opts[@]}" source --download-only "kubernetes=$version" >&2)
    dpkg-source --no-check -x "$dl"/*.dsc "$src" >&2
    rm -rf "$dl"
fi

log "building ${parts[*]} from $src (about 14 minutes of CPU, once)"
whats=$(printf 'cmd/%s ' "${parts[@]}")
# The release builds through make (code generation first); GOPROXY=off proves it offline.
gocache="$cache/$version/gocache"
(cd "$src" && PATH=/usr/lib/go-1.19/bin:$PATH CGO_ENABLED=0 GOPROXY=off GOFLAGS=-mod=vendor \
    GOCACHE="$gocache" make WHAT="${whats% }" >&2)
mkdir -p "$out.tmp"
for p in "${parts[@]}"; do cp "$src/_output/bin/$p" "$out.tmp/"; done
# The sandbox's pause process, from the same tree.
gcc -Os -static -DVERSION="v$version" -o "$out.tmp/pause" "$src/build/pause/linux/pause.c"
strip "$out.tmp/pause" 2>/dev/null || true
rm -rf "$out"
mv "$out.tmp" "$out"
# The tree (2.6 GB with Go's build cache) is not needed once the binaries exist.
rm -rf "$src" "$gocache"
complete || { log "the build left no complete set in $out"; exit 1; }
log "done: $out"
echo "$out"
