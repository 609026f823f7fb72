#!/usr/bin/env bash
# Container entrypoint: kernel headers for bcc, then `meshbpf ARGS...`.
# The image carries Debian's generic headers; the host's are not needed.
set -euo pipefail
/usr/local/bin/link-kernel-headers.sh
exec meshbpf "$@"
