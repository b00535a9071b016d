#!/usr/bin/env bash
# Installs the Debian packages the local cluster (deploy/local/cluster.sh) runs on, those
# that are missing: containerd and runc (each node's runtime), etcd-server, iptables and
# conntrack (kube-proxy), containernetworking-plugins (loopback, portmap), buildah and
# busybox-static (images), jq, openssl, iproute2, util-linux (nsenter, unshare), and
# kubectl (Debian's kubernetes-client) where the machine has none.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
missing=()
need() { command -v "$1" >/dev/null 2>&1 || missing+=("$2"); }
need containerd containerd
need runc runc
need etcd etcd-server
need iptables iptables
need conntrack conntrack
need buildah buildah
need jq jq
need openssl openssl
need ip iproute2
need nsenter util-linux
need kubectl kubernetes-client
[ -x /usr/lib/cni/portmap ] || missing+=(containernetworking-plugins)
[ -x /bin/busybox ] || missing+=(busybox-static)
if [ ${#missing[@]} -gt 0 ]; then
    echo "deps.sh: installing ${missing[*]}" >&2
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
fi
