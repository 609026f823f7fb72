#!/usr/bin/env bash
# Kernel headers for bcc, when the running kernel has no headers package.
#
# bcc compiles against /lib/modules/$(uname -r)/{build,source}. When those are
# missing, point build at the newest /usr/src/linux-headers-*-amd64 and source
# at the newest /usr/src/linux-headers-*-common (Debian's generic headers,
# package linux-headers-amd64). meshbpf's programs only use uapi context
# structs, which is what makes an older header set safe for a newer kernel.
# Does nothing when the running kernel's own headers are in place.
#
# Used by scripts/setup.sh (machines, CI, the Vagrant lab) and by the container
# image's entrypoint (deploy/entrypoint.sh), so the logic lives only here.
#
# For tests, MESHBPF_KERNEL_RELEASE, MESHBPF_MODULES_DIR and MESHBPF_SRC_DIR
# stand in for `uname -r`, /lib/modules and /usr/src.
set -euo pipefail

log() { printf 'link-kernel-headers: %s\n' "$*" >&2; }

kver=${MESHBPF_KERNEL_RELEASE:-$(uname -r)}
modules=${MESHBPF_MODULES_DIR:-/lib/modules}
src=${MESHBPF_SRC_DIR:-/usr/src}
moddir="$modules/$kver"

if [ -e "$moddir/build/include/generated/uapi" ]; then
  exit 0
fi

# The newest of the folders given (unmatched globs are skipped), by version.
newest() {
  local d
  for d in "$@"; do
    if [ -d "$d" ]; then printf '%s\n' "$d"; fi
  done | sort -V | tail -n 1
}

arch_hdr=$(newest "$src"/linux-headers-*-amd64)
common_hdr=$(newest "$src"/linux-headers-*-common)
if [ -z "$arch_hdr" ] || [ -z "$common_hdr" ]; then
  log "no kernel headers under $src; install linux-headers-amd64"
  exit 1
fi
log "linking $moddir/build -> $arch_hdr and source -> $common_hdr"
mkdir -p "$moddir"
ln -sfn "$arch_hdr" "$moddir/build"
ln -sfn "$common_hdr" "$moddir/source"
