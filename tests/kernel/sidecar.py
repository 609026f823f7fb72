"""A real sidecar proxy for capture tests and the capture benchmark.

HAProxy (Debian's, built with NETFILTER and TPROXY) runs in a lab pod under
the proxy uid, listens on the outbound and inbound ports with `option
transparent` and logs, per connection, the original destination it read and
where it connected (haproxy-sidecar.cfg). IstioIptables writes Istio's
iptables REDIRECT capture in a pod's own network namespace: the baseline.

Standalone (only meshbpf.lab), so bench/capture.py imports it too.
"""

from __future__ import annotations

import ipaddress
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path
from string import Template

from meshbpf.lab.netlab import Lab
from meshbpf.lab.workloads import wait_for

PROXY_UID = 1337        # Istio's preset
OUT_PORT = 15001
IN_PORT = 15006
# Never captured inbound (Istio's injector always excludes them).
ISTIO_EXCLUDED_INBOUND = (15090, 15021, 15020)
CONFIG_TEMPLATE = Path(__file__).with_name("haproxy-sidecar.cfg")
_LOG_LINE = re.compile(r"^capture listener=(?P<listener>\S+) client=(?P<client>\S+) "
                       r"orig=(?P<orig>\S+) server=(?P<server>\S+) status=(?P<status>\S+) "
                       r"bytes=(?P<bytes>\d+)$")


def endpoint(address, port: int) -> str:
    """"10.96.0.10:80" / "fd00:96::10:80" as HAProxy's log prints them."""
    return f"{ipaddress.ip_address(str(address))}:{port}"


@dataclass(frozen=True)
class Connection:
    """One line of HAProxy's log: a connection it proxied."""

    listener: str   # outbound, inbound4, inbound6
    client: str
    orig: str       # the original destination HAProxy read
    server: str     # where it connected
    status: str     # HAProxy's termination state; "--" is a clean close
    bytes: int


class HAProxySidecar:
    """`with HAProxySidecar(lab, pod, workdir) as proxy:` HAProxy in `pod`
    (in its cgroup, so meshbpf's hooks see it), uid PROXY_UID, listening on
    both families; stopped on exit."""

    def __init__(self, lab: Lab, pod: str, workdir: Path, *, uid: int = PROXY_UID,
                 out_port: int = OUT_PORT, in_port: int = IN_PORT, threads: int = 1, extra: str = ""):
        self.lab, self.pod, self.uid, self.extra = lab, pod, uid, extra  # extra: config appended
        self.out_port, self.in_port, self.threads = out_port, in_port, threads
        name = pod.replace("/", "-")
        self.config = workdir / f"haproxy-{name}.cfg"
        self.log_path = workdir / f"haproxy-{name}.log"
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> "HAProxySidecar":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> "HAProxySidecar":
        self.config.write_text(Template(CONFIG_TEMPLATE.read_text()).substitute(
            uid=self.uid, out_port=self.out_port, in_port=self.in_port, threads=self.threads) + self.extra)
        check = subprocess.run(["haproxy", "-c", "-q", "-f", str(self.config)],
                               capture_output=True, text=True)
        assert check.returncode == 0, f"haproxy -c {self.config}: {check.stderr or check.stdout}"
        with open(self.log_path, "w") as log:
            # -db: foreground, no daemon; it binds as root, then drops to uid.
            self.proc = self.lab.popen(self.pod, ["haproxy", "-db", "-f", str(self.config)],
                                       stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_for(self._listening, 60, f"HAProxy in {self.pod} to listen on {self.out_port}, {self.in_port}")
        except Exception:
            self.stop()
            raise
        return self

    def _listening(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"HAProxy in {self.pod} exited with {self.proc.returncode}:\n{self.log()}")
        ss = self.lab.run(self.pod, ["ss", "-ltnH"], in_cgroup=False).stdout
        return all(f":{port} " in ss for port in (self.out_port, self.in_port))

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def running(self) -> bool:
        return bool(self.proc) and self.proc.poll() is None

    def connections(self) -> list[Connection]:
        """Every connection HAProxy has logged so far (it logs at close)."""
        found = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            m = _LOG_LINE.match(line.strip())
            if m:
                found.append(Connection(**{**m.groupdict(), "bytes": int(m["bytes"])}))
        return found

    def wait_connections(self, count: int, timeout: float = 60) -> list[Connection]:
        """The log once it holds at least `count` connections."""
        return wait_for(lambda: len(self.connections()) >= count and self.connections(), timeout,
                        f"{count} connection(s) in HAProxy's log {self.log_path}:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


# --- the baseline: Istio's iptables REDIRECT capture -------------------------

def istio_nat_rules(family: int, *, uid: int = PROXY_UID, out_port: int = OUT_PORT,
                    in_port: int = IN_PORT, excluded_inbound=ISTIO_EXCLUDED_INBOUND) -> str:
    """iptables-restore input for the nat table, as istio-iptables writes it
    for an injected sidecar (includeOutboundIPRanges "*", includeInboundPorts
    "*", the injector's excluded inbound ports, proxy uid and gid), ported
    from istio/tools/istio-iptables/pkg/capture/testdata/*.golden
    (inbound-wildcard-exclude, ip-range's final ISTIO_REDIRECT jump)."""
    inbound_src, local = ("127.0.0.6/32", "127.0.0.1/32") if family == 4 else ("::6/128", "::1/128")
    lines = ["*nat", ":ISTIO_INBOUND - [0:0]", ":ISTIO_REDIRECT - [0:0]",
             ":ISTIO_IN_REDIRECT - [0:0]", ":ISTIO_OUTPUT - [0:0]",
             "-A ISTIO_INBOUND -p tcp --dport 15008 -j RETURN",
             f"-A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports {out_port}",
             f"-A ISTIO_IN_REDIRECT -p tcp -j REDIRECT --to-ports {in_port}",
             "-A PREROUTING -p tcp -j ISTIO_INBOUND"]
    if excluded_inbound:
        ports = ",".join(map(str, excluded_inbound))
        lines.append(f"-A ISTIO_INBOUND -p tcp -m multiport --dports {ports} -j RETURN")
    lines += ["-A ISTIO_INBOUND -p tcp -j ISTIO_IN_REDIRECT",
              "-A OUTPUT -j ISTIO_OUTPUT",
              f"-A ISTIO_OUTPUT -o lo -s {inbound_src} -j RETURN"]
    for owner in ("uid", "gid"):
        lines += [f"-A ISTIO_OUTPUT -o lo ! -d {local} -p tcp ! --dport 15008 "
                  f"-m owner --{owner}-owner {uid} -j ISTIO_IN_REDIRECT",
                  f"-A ISTIO_OUTPUT -o lo -m owner ! --{owner}-owner {uid} -j RETURN",
                  f"-A ISTIO_OUTPUT -m owner --{owner}-owner {uid} -j RETURN"]
    lines += [f"-A ISTIO_OUTPUT -d {local} -j RETURN",
              "-A ISTIO_OUTPUT -j ISTIO_REDIRECT",
              "COMMIT", ""]
    return "\n".join(lines)


_EMPTY_NAT = "*nat\n:PREROUTING ACCEPT [0:0]\n:INPUT ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n" \
             ":POSTROUTING ACCEPT [0:0]\nCOMMIT\n"
_RESTORE = {4: "iptables-restore", 6: "ip6tables-restore"}


class IstioIptables:
    """`with IstioIptables(lab, pod):` Istio's capture rules in the pod's own
    network namespace only (both families); its nat table emptied on exit
    (the namespace goes with the lab anyway)."""

    def __init__(self, lab: Lab, pod: str, **settings):
        self.lab, self.pod, self.settings = lab, pod, settings

    def __enter__(self) -> "IstioIptables":
        try:
            for family in (4, 6):
                self._restore(family, istio_nat_rules(family, **self.settings))
        except Exception:
            self.remove()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def remove(self) -> None:
        for family in (4, 6):
            self._restore(family, _EMPTY_NAT)

    def _restore(self, family: int, text: str) -> None:
        # Outside the lab cgroup: iptables is the node's tool, not a workload.
        r = self.lab.run(self.pod, [_RESTORE[family], "-w", "30"], input=text, in_cgroup=False)
        assert r.returncode == 0, f"{_RESTORE[family]} in pod {self.pod}: {r.stderr}\n{text}"

    def nat_rules(self, family: int = 4) -> str:
        save = "iptables-save" if family == 4 else "ip6tables-save"
        return self.lab.run(self.pod, [save, "-t", "nat"], in_cgroup=False, check=True).stdout
