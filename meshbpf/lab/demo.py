"""`meshbpf lab demo`: a node in a box, load-balanced by meshbpf.

Brings up a lab (a client pod, three web pods, two DNS pods), starts the
agent on the bundled example config attached to the lab's cgroup, sends real
traffic (curl over IPv4 and IPv6, dig over UDP), shows which backends
answered and the service table, then tears everything down.
"""

from __future__ import annotations

import collections
import subprocess
import sys
import tempfile
from importlib import resources
from pathlib import Path

import click

from .netlab import Lab, LabError
from .workloads import AgentProcess, copy_config, start_dnsmasq, start_whoami

PODS = ["client", "web-1", "web-2", "web-3", "dns-1", "dns-2"]  # order fixes addresses
WEB_V4, WEB_V6, DNS = "10.96.0.10", "fd00:96::10", "10.96.0.53"


def default_config() -> Path:
    return Path(str(resources.files("meshbpf") / "examples" / "lab.yaml"))


def _tally(title: str, answers: list[str]) -> None:
    counts = collections.Counter(answers)
    click.echo(f"\n{title}: {len(answers)} requests")
    for name, n in sorted(counts.items()):
        click.echo(f"  {name:<12} {n:>3}  {'#' * n}")


def run_demo(config: Path | None = None, requests: int = 30, name: str = "demo") -> None:
    config = config or default_config()
    bpffs = Path(f"/sys/fs/bpf/meshbpf-lab-{name}")
    if Lab(name).exists():  # checked before `with`, whose exit would tear down that lab
        raise LabError(f"lab {name!r} already exists; `meshbpf lab down {name}` first, or pass --name")
    with tempfile.TemporaryDirectory(prefix="meshbpf-demo-") as tmp, Lab(name) as lab:
        click.echo(f"lab {name}: pods {', '.join(PODS)} on 10.244.0.0/24 and fd00:244::/64, "
                   f"cgroup {lab.cgroup}")
        lab.up(PODS)
        for pod in ("web-1", "web-2", "web-3"):
            start_whoami(lab, pod, 8080)
        for pod in ("dns-1", "dns-2"):
            start_dnsmasq(lab, pod, Path(tmp))

        agent = AgentProcess(copy_config(config, Path(tmp)), lab.cgroup, bpffs)
        try:
            click.echo(f"starting meshbpf agent on {config} (bpffs {bpffs})")
            agent.start()

            def curl(url: str, *flags: str) -> str:
                r = lab.run("client", ["curl", "-sS", "--max-time", "2", *flags, url])
                return r.stdout.strip() or f"error: {r.stderr.strip()}"

            _tally(f"curl http://{WEB_V4}/ (TCP, IPv4)",
                   [curl(f"http://{WEB_V4}/") for _ in range(requests)])
            _tally(f"curl http://[{WEB_V6}]/ (TCP, IPv6)",
                   [curl(f"http://[{WEB_V6}]/", "-g") for _ in range(requests // 2)])

            def dig() -> str:
                r = lab.run("client", ["dig", "+short", "+tries=1", "+time=2", f"@{DNS}", "whoami.lab", "TXT"])
                return r.stdout.strip().strip('"') or f"error: {r.stdout.strip() or r.stderr.strip()}"
            _tally(f"dig @{DNS} whoami.lab TXT (UDP; dig checks the reply comes from {DNS})",
                   [dig() for _ in range(requests // 2)])

            click.echo("\nmeshbpf service list")
            out = subprocess.run([sys.executable, "-m", "meshbpf", "service", "list", "--bpffs", str(bpffs)],
                                 capture_output=True, text=True)
            click.echo(out.stdout + out.stderr)
        except Exception:
            click.echo(f"agent log:\n{agent.log()}", err=True)
            raise
        finally:
            agent.cleanup()
    click.echo("lab torn down: namespaces, cgroup, programs and pins removed")
