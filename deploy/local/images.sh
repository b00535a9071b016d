#!/usr/bin/env bash
# Builds the two images every node of the local cluster needs besides weft's own, as OCI
# archives that `ctr -n k8s.io images import` takes (nothing can be pulled on these
# machines, so everything is built FROM scratch with buildah, no daemon):
#
#   localhost/weft-local/pause:3.2   the sandbox process, built from Kubernetes' own
#                                    build/pause/linux/pause.c (deploy/local/build-k8s.sh)
#   localhost/busybox:test           Debian's busybox-static with its applets linked (sh,
#                                    nc, ip, sleep, httpd, ...), and /www/cgi-bin/who, which
#                                    answers "<pod name> <client address>" over HTTP
#
#   deploy/local/images.sh K8S_BIN_DIR OUT_DIR    prints the archives' paths, one a line
#
# An archive is rebuilt only when its inputs (the pause binary, busybox's version, this
# script) change. Needs root, buildah, busybox-static.
set -euo pipefail

bin=${1:?usage: images.sh K8S_BIN_DIR OUT_DIR}
out=${2:?usage: images.sh K8S_BIN_DIR OUT_DIR}
mkdir -p "$out"
self_sum=$(sha256sum "$0" | cut -c1-12)

b() { buildah --storage-driver vfs "$@"; }

# build NAME REF KEY ROOTFS_DIR ENTRYPOINT_JSON: an image of exactly ROOTFS_DIR.
build() {
    local name=$1 ref=$2 key=$3 rootfs=$4 entrypoint=$5
    local archive="$out/$name-$key.tar"
    if [ ! -s "$archive" ]; then
        local ctr
        ctr=$(b from --name "weft-local-$name-$$" scratch)
        b copy "$ctr" "$rootfs/" / >/dev/null
        b config --entrypoint "$entrypoint" --os linux --arch amd64 "$ctr"
        rm -f "$archive.tmp"
        b commit --quiet --format oci --rm "$ctr" "oci-archive:$archive.tmp:$ref" >/dev/null
        mv "$archive.tmp" "$archive"
    fi
    echo "$archive"
}

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# pause
pause_key=$( (sha256sum "$bin/pause" | cut -c1-12; echo "$self_sum") | sha256sum | cut -c1-12)
mkdir -p "$work/pause"
install -m 0755 "$bin/pause" "$work/pause/pause"
build pause localhost/weft-local/pause:3.2 "$pause_key" "$work/pause" '["/pause"]'

# busybox
bb=/bin/busybox
[ -x "$bb" ] || { echo "images.sh: $bb missing (Debian package busybox-static)" >&2; exit 1; }
bb_key=$( (dpkg-query -W -f '${Version}' busybox-static; echo "$self_sum") | sha256sum | cut -c1-12)
r="$work/busybox"
mkdir -p "$r/bin" "$r/tmp" "$r/etc" "$r/www/cgi-bin" "$r/root"
chmod 1777 "$r/tmp"
install -m 0755 "$bb" "$r/bin/busybox"
for applet in $("$bb" --list); do
    [ "$applet" = busybox ] || ln -sf busybox "$r/bin/$applet"
done
printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n' >"$r/etc/passwd"
printf 'root:x:0:\nnobody:x:65534:\n' >"$r/etc/group"
# Who answered, and whom it saw: the server's pod name and the client's address as the
# pod sees it (so a test can tell a masqueraded connection from a direct one).
cat >"$r/www/cgi-bin/who" <<'EOF'
#!/bin/sh
printf 'Content-Type: text/plain\r\n\r\n%s %s\n' "$(hostname)" "$REMOTE_ADDR"
EOF
chmod 0755 "$r/www/cgi-bin/who"
echo ok >"$r/www/index.html"
build busybox localhost/busybox:test "$bb_key" "$r" '["/bin/sh"]'
