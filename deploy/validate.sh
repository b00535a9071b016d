#!/usr/bin/env bash
# Validates deploy/weft.yaml (and the kind script's pod) offline and strictly (unknown
# fields are errors) against the OpenAPI schemas of every Kubernetes version Amazon EKS
# supports on 2026-12-01: 1.32 and 1.33 (extended support), 1.34 to 1.37 (standard
# support). Needs `kubernetes-validate` (PyPI), which ships the schemas: nothing is
# fetched while validating.
set -euo pipefail
cd "$(dirname "$0")/.."
versions=${K8S_VERSIONS:-"1.32.0 1.33.0 1.34.0 1.35.0 1.36.0 1.37.0"}
for v in $versions; do
    echo "== Kubernetes $v"
    python3 -m kubernetes_validate --strict -k "$v" deploy/weft.yaml deploy/kind/iperf3.yaml
done
