"""Client programs for the weighted-splitting tests, run inside a lab pod.

    python split_probe.py tcp HOST PORT TOTAL PARALLEL  -> {"answers": {...}, "errors": {...}}
    python split_probe.py udp HOST PORT TOTAL           -> the same, one DNS query per new socket

The Gateway API weight conformance method (MeshHTTPRouteWeight) at L4: one
new connection per request, PARALLEL at a time, answers counted by the pod
that gave them."""

from __future__ import annotations

import collections
import errno
import json
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from probe import _http_get, udp_peer  # noqa: E402


def _count(results) -> dict:
    seen, errors = collections.Counter(), collections.Counter()
    for ok, what in results:
        (seen if ok else errors)[what] += 1
    return {"answers": dict(seen), "errors": dict(errors)}


def _try(fn):
    try:
        return True, fn()
    except OSError as exc:
        return False, errno.errorcode.get(exc.errno, str(exc))


def tcp(host: str, port: str, total: str, parallel: str) -> dict:
    with ThreadPoolExecutor(int(parallel)) as pool:
        return _count(pool.map(lambda _: _try(lambda: _http_get(host, int(port))), range(int(total))))


def udp(host: str, port: str, total: str) -> dict:
    return _count(_try(lambda: udp_peer(host, port)["txt"]) for _ in range(int(total)))


if __name__ == "__main__":
    print(json.dumps({"tcp": tcp, "udp": udp}[sys.argv[1]](*sys.argv[2:])))
