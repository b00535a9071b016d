#!/usr/bin/env bash
# weft on a kind cluster, for a machine with Docker (this project's CI machines have no
# Docker engine, so this script is not run there; the image and the manifest it uses are
# built and tested there: tests/local_cluster.rs runs them on real kubelets made by
# deploy/local/cluster.sh).
#
#   deploy/kind/run.sh            # create cluster "weft", install weft, run iperf3, print
#   deploy/kind/run.sh --delete   # remove the cluster
#
# Needs: docker, kind, kubectl, and root for deploy/image.sh (buildah).
set -euo pipefail
cd "$(dirname "$0")/../.."
cluster=${KIND_CLUSTER:-weft}

if [ "${1:-}" = "--delete" ]; then
    kind delete cluster --name "$cluster"
    exit 0
fi
for t in docker kind kubectl buildah; do
    command -v "$t" >/dev/null || { echo "kind/run.sh: $t is needed" >&2; exit 1; }
done

# Three nodes, no CNI of kind's own (kindnet), pods from weft's default range.
if ! kind get clusters | grep -qx "$cluster"; then
    kind create cluster --name "$cluster" --config deploy/kind/cluster.yaml
fi

deploy/image.sh target/weft-image.tar
kind load image-archive --name "$cluster" target/weft-image.tar

kubectl apply -f deploy/weft.yaml
kubectl -n kube-system rollout status daemonset/weft --timeout=180s
kubectl wait --for=condition=Ready nodes --all --timeout=180s

# iperf3 between pods on the two workers.
sed "s/weft-worker/$cluster-worker/" deploy/kind/iperf3.yaml | kubectl apply -f -
kubectl wait --for=condition=Ready pod/iperf3-server --timeout=180s
server_ip=$(kubectl get pod iperf3-server -o jsonpath='{.status.podIP}')
echo "iperf3 server pod at $server_ip on $(kubectl get pod iperf3-server -o jsonpath='{.spec.nodeName}')"
kubectl delete pod iperf3-client --ignore-not-found
kubectl run iperf3-client --restart=Never --image=networkstatic/iperf3 \
    --overrides='{"spec":{"nodeName":"'"$cluster"'-worker2"}}' -- -c "$server_ip" -t 10
kubectl wait --for=jsonpath='{.status.phase}'=Succeeded pod/iperf3-client --timeout=120s
kubectl logs iperf3-client
kubectl -n kube-system exec ds/weft -c weft -- /usr/bin/weft status
