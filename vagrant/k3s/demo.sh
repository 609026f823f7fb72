#!/usr/bin/env bash
# The k3s lab demo, on the k3s-server VM (vagrant/README.md):
#
#   vagrant ssh k3s-server -c 'sudo /meshbpf/vagrant/k3s/demo.sh'
#
# Waits for meshbpf and the demo app, then sends requests to the whoami
# Service, which kube-proxy leaves alone (service-proxy-name label): every
# answer was load-balanced by meshbpf at connect() time.
set -euo pipefail
export KUBECONFIG=/etc/rancher/k3s/k3s.yaml
requests=${1:-12}

step() { printf '\n==> %s\n' "$*"; }

step "waiting for meshbpf on every node and for the demo app"
kubectl -n kube-system rollout status daemonset/meshbpf --timeout=10m
kubectl rollout status deployment/whoami --timeout=5m
kubectl get nodes -o wide
kubectl -n kube-system get pods -l app.kubernetes.io/name=meshbpf -o wide
kubectl get pods -l app.kubernetes.io/name=whoami -o wide

ip=$(kubectl get service whoami -o jsonpath='{.spec.clusterIP}')
step "kube-proxy's NAT rules for default/whoami: $(iptables-save -t nat 2>/dev/null | grep -c 'default/whoami' || true) (it skips the Service)"

step "$requests requests from this node to http://$ip/ (the ClusterIP)"
for _ in $(seq 1 "$requests"); do
  curl -sS --max-time 3 "http://$ip/"
done | sort | uniq -c

step "$requests requests from a pod to http://whoami.default.svc.cluster.local/"
kubectl exec deployment/whoami -- python -c "
import urllib.request
for _ in range($requests):
    print(urllib.request.urlopen('http://whoami.default.svc.cluster.local/', timeout=3).read().decode().strip())
" | sort | uniq -c

for pod in $(kubectl -n kube-system get pods -l app.kubernetes.io/name=meshbpf -o name); do
  node=$(kubectl -n kube-system get "$pod" -o jsonpath='{.spec.nodeName}')
  step "meshbpf service list on $node"
  kubectl -n kube-system exec "$pod" -c agent -- meshbpf service list
done
