#!/usr/bin/env bash
# Prints deploy/meshbpf.yaml as the k3s lab runs it: with the
# `--service-proxy-name meshbpf` lines that the manifest carries commented out
# turned on, so meshbpf handles only Services labelled
# service.kubernetes.io/service-proxy-name=meshbpf and kube-proxy the rest.
#
#   vagrant/k3s/lab-manifest.sh | kubectl apply -f -
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
manifest="$repo/deploy/meshbpf.yaml"

# Fail rather than apply the manifest unchanged if those lines ever move.
if [ "$(grep -cE '^ +# - (--service-proxy-name|meshbpf)$' "$manifest")" -ne 2 ]; then
  echo "lab-manifest.sh: $manifest no longer has the commented --service-proxy-name lines" >&2
  exit 1
fi
sed -E 's/^( +)# - (--service-proxy-name|meshbpf)$/\1- \2/' "$manifest"
