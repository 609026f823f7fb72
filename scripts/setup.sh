#!/usr/bin/env bash
# Idempotent setup for a Debian 12 machine, as root:
#   Debian packages, kernel headers link for bcc, bpffs, and the venv in .venv.
# Fast when everything is already in place. Sourced by scripts/demo and scripts/test.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv="$repo/.venv"

log() { printf 'setup: %s\n' "$*" >&2; }

if [ "$(id -u)" -ne 0 ]; then
  echo "setup: meshbpf needs root (bpf(), cgroups, network namespaces)" >&2
  exit 1
fi

# --- 1. Debian packages ------------------------------------------------------
# python3-bpfcc: bcc for Debian's /usr/bin/python3 (never the PyPI "bcc").
# linux-headers-amd64: bcc compiles against kernel headers.
# The rest are what the lab, demo, tests and benchmarks drive for real traffic,
# and what tests/unit/test_deploy.py runs (vagrant validate, shellcheck).
packages=(
  python3-bpfcc bpftool linux-headers-amd64 libbpf1
  python3-venv python3-yaml iproute2 procps kmod
  curl dnsutils dnsmasq-base socat iperf3 tcpdump iputils-ping
  iptables nftables conntrack gcc libc6-dev openssl
  ipset  # bench/policy.py: the iptables baselines' sets (and tests/kernel/test_bench_policy_baselines.py)
  vagrant shellcheck
  redis-server  # tests/kernel/test_redirect_apps.py: a real pipelining server and client
  haproxy  # tests/kernel/test_capture_haproxy.py, bench/capture.py: a real sidecar proxy (option transparent)
)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  log "installing Debian packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# --- 2. kernel headers for bcc ----------------------------------------------
# bcc looks in /lib/modules/$(uname -r)/{build,source}. When the running kernel
# has no headers package, point both at Debian's newest generic headers (the
# same script runs in the container image's entrypoint).
"$repo/scripts/link-kernel-headers.sh"

# --- 3. bpffs ----------------------------------------------------------------
if ! awk '$2=="/sys/fs/bpf" && $3=="bpf" {found=1} END {exit !found}' /proc/mounts; then
  log "mounting bpffs at /sys/fs/bpf"
  mkdir -p /sys/fs/bpf
  mount -t bpf bpf /sys/fs/bpf
fi
if ! awk '$3=="cgroup2" {found=1} END {exit !found}' /proc/mounts; then
  echo "setup: no cgroup2 mount in /proc/mounts; meshbpf attaches to cgroup v2" >&2
  exit 1
fi

# --- 4. venv -----------------------------------------------------------------
# --system-site-packages so Debian's bcc (for /usr/bin/python3) is importable.
stamp="$venv/.meshbpf-setup"
want=$(sha256sum "$repo/pyproject.toml" | cut -d' ' -f1)
if [ ! -x "$venv/bin/python" ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  log "building the venv in $venv"
  [ -x "$venv/bin/python" ] || /usr/bin/python3 -m venv --system-site-packages "$venv"
  "$venv/bin/python" -m pip install -q --disable-pip-version-check -e "${repo}[test]"
  "$venv/bin/python" -c "import bcc" || { echo "setup: bcc is not importable from the venv" >&2; exit 1; }
  echo "$want" >"$stamp"
fi
