#!/usr/bin/env bash
# Builds weft's image without a container daemon: FROM scratch, the two static binaries
# (/usr/bin/weft, /usr/bin/weft-cni), written as an OCI archive that containerd imports
# (`ctr -n k8s.io images import`), kind loads (`kind load image-archive`) and skopeo pushes.
#
#   deploy/image.sh [OUT]     (default OUT: target/weft-image.tar; needs root, buildah)
#
# Reproducible: the same commit gives the same image digest. Timestamps come from the
# commit (SOURCE_DATE_EPOCH), paths of the build machine are remapped out of the
# binaries, and the dependency versions are the lock file's.
set -euo pipefail
cd "$(dirname "$0")/.."

out=${1:-target/weft-image.tar}
version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
# Unqualified `weft:VERSION`, as deploy/weft.yaml names it, is docker.io/library/weft:VERSION
# to containerd and the kubelet.
ref=${IMAGE_REF:-docker.io/library/weft:$version}
export SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-$(git log -1 --format=%ct 2>/dev/null || echo 0)}
target=x86_64-unknown-linux-gnu

# Only the gnu target is installed: glibc linked statically. weft resolves no names (the
# API server and peers are addresses), so glibc's NSS is never needed at run time.
# --target keeps build scripts and proc macros dynamic, as they must be.
RUSTFLAGS="-C target-feature=+crt-static --remap-path-prefix=$PWD=/build/weft --remap-path-prefix=${CARGO_HOME:-$HOME/.cargo}=/build/cargo" \
CARGO_PROFILE_RELEASE_STRIP=symbols \
    cargo build --release --locked --target "$target" -p weft -p weft-cni
bin=target/$target/release
for b in weft weft-cni; do
    # ldd says "statically linked" (or "not a dynamic executable") for a static(-pie) binary.
    if ldd "$bin/$b" 2>&1 | grep -q '=>'; then
        echo "image.sh: $bin/$b is dynamically linked:" >&2
        ldd "$bin/$b" >&2
        exit 1
    fi
done

b() { buildah --storage-driver vfs "$@"; }
ctr=$(b from --name "weft-image-$$" scratch)
trap 'b rm "$ctr" >/dev/null 2>&1 || true' EXIT
b copy --chmod 0755 "$ctr" "$bin/weft" "$bin/weft-cni" /usr/bin/
b config \
    --entrypoint '["/usr/bin/weft"]' --cmd router \
    --os linux --arch amd64 \
    --label org.opencontainers.image.title=weft \
    --label org.opencontainers.image.version="$version" \
    --label org.opencontainers.image.description="Overlay network for Kubernetes, compatible with Weave Net" \
    "$ctr"
mkdir -p "$(dirname "$out")"
rm -f "$out"
b commit --quiet --format oci --timestamp "$SOURCE_DATE_EPOCH" --rm "$ctr" "oci-archive:$out:$ref" >/dev/null
trap - EXIT
digest=$(tar xOf "$out" index.json | sed -n 's/.*"digest":"\(sha256:[0-9a-f]*\)".*/\1/p')
size=$(stat -c %s "$out")
gz=$(gzip -9c <"$out" | wc -c)
echo "image $ref $digest: $out, $((size / 1024)) KiB ($((gz / 1024)) KiB gzipped, as a registry stores it)"
