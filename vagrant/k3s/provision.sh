#!/usr/bin/env bash
# Provisions one VM of the two-VM k3s lab (vagrant/README.md), as root:
#
#   provision.sh server|agent NODE_IP SERVER_IP TOKEN [K3S_VERSION]
#
# 1. builds the meshbpf image from /meshbpf with podman (deploy/Dockerfile) and
#    leaves it where k3s imports images from when it starts;
# 2. installs k3s, kube-proxy left on (server, or agent joining SERVER_IP);
# 3. server only: applies deploy/meshbpf.yaml with --service-proxy-name meshbpf
#    (vagrant/k3s/lab-manifest.sh) and the demo app (vagrant/k3s/whoami.yaml).
# Safe to run again (`vagrant provision`): it rebuilds and re-imports the image
# and re-applies the manifests.
set -euo pipefail

if [ $# -lt 4 ]; then
  echo "usage: $0 server|agent NODE_IP SERVER_IP TOKEN [K3S_VERSION]" >&2
  exit 2
fi
role=$1 node_ip=$2 server_ip=$3 token=$4 version=${5:-}
repo=/meshbpf
here="$repo/vagrant/k3s"

log() { printf '\n==> k3s lab (%s): %s\n' "$role" "$*" >&2; }

case "$role" in
  server|agent) ;;
  *) echo "provision.sh: role must be server or agent, not '$role'" >&2; exit 2 ;;
esac

# The image deploy/meshbpf.yaml runs: one place names it.
image=$(awk '$1 == "image:" {print $2; exit}' "$repo/deploy/meshbpf.yaml")
images_dir=/var/lib/rancher/k3s/agent/images

# The interface that carries NODE_IP (the private network), for flannel.
iface=$(ip -o -4 addr show | awk -v ip="$node_ip" '{split($4, a, "/")} a[1] == ip {print $2; exit}')
if [ -z "$iface" ]; then
  echo "provision.sh: no interface has address $node_ip" >&2
  exit 1
fi

# --- 1. the meshbpf image ------------------------------------------------------
if ! command -v podman >/dev/null; then
  log "installing podman"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq podman >/dev/null
fi
log "building $image from $repo/deploy/Dockerfile (a few minutes the first time)"
podman build --network host -f "$repo/deploy/Dockerfile" \
  --ignorefile "$repo/deploy/Dockerfile.dockerignore" -t "$image" "$repo"
mkdir -p "$images_dir"
podman save --format docker-archive -o "$images_dir/meshbpf.tar.tmp" "$image"
mv "$images_dir/meshbpf.tar.tmp" "$images_dir/meshbpf.tar"

# --- 2. k3s ----------------------------------------------------------------------
if command -v k3s >/dev/null; then
  # Running already: k3s imports $images_dir only when it starts.
  log "importing $image into k3s's containerd"
  k3s ctr --namespace k8s.io images import "$images_dir/meshbpf.tar"
else
  log "installing k3s ($role, node IP $node_ip on $iface)"
  export K3S_TOKEN="$token"
  if [ -n "$version" ]; then
    export INSTALL_K3S_VERSION="$version"
  fi
  if [ "$role" = server ]; then
    export INSTALL_K3S_EXEC="server --node-ip $node_ip --advertise-address $node_ip --flannel-iface $iface --write-kubeconfig-mode 0644 --disable traefik --disable servicelb"
  else
    export K3S_URL="https://$server_ip:6443"
    export INSTALL_K3S_EXEC="agent --node-ip $node_ip --flannel-iface $iface"
  fi
  curl -sfL https://get.k3s.io | sh -
fi

if [ "$role" = agent ]; then
  log "done: this node joined https://$server_ip:6443; meshbpf's DaemonSet schedules here"
  exit 0
fi

# --- 3. server: meshbpf and the demo app -------------------------------------------
export KUBECONFIG=/etc/rancher/k3s/k3s.yaml
log "waiting for the API server"
for _ in $(seq 1 90); do
  if kubectl get --raw /readyz >/dev/null 2>&1; then break; fi
  sleep 2
done
kubectl get --raw /readyz >/dev/null

log "applying meshbpf (deploy/meshbpf.yaml with --service-proxy-name meshbpf)"
"$here/lab-manifest.sh" | kubectl apply -f -
log "applying the demo app (vagrant/k3s/whoami.yaml)"
kubectl apply -f "$here/whoami.yaml"

log "done. Bring up the second node with 'vagrant up k3s-node', then:
    vagrant ssh k3s-server -c 'sudo /meshbpf/vagrant/k3s/demo.sh'"
