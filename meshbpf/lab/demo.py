"""`meshbpf lab demo`: a node in a box, load-balanced by meshbpf.

Brings up a lab (a client pod, three web pods, two DNS pods), starts the
agent on the bundled example config attached to the lab's cgroup, sends real
traffic (curl over IPv4 and IPv6, dig over UDP), shows which backends
answered and the service table; then NetworkPolicy: a default deny on the
web pods (curl fails), an allow for the client (curl answers again), with
`meshbpf endpoint list` and `meshbpf policy list`; then, when this build has
north-south load balancing (issue 12), curl from outside to a NodePort,
answered by a pod on the other node (demo_northsouth.py); then tears
everything down.
"""

from __future__ import annotations

import collections
import json
import os
import subprocess
import sys
import tempfile
from importlib import resources
from pathlib import Path

import click

import yaml

from . import demo_northsouth
from .netlab import Lab, LabError
from .objects import lab_objects
from .workloads import AgentProcess, copy_config, start_dnsmasq, start_whoami, wait_for

PODS = ["client", "web-1", "web-2", "web-3", "dns-1", "dns-2"]  # order fixes addresses
WEB_V4, WEB_V6, DNS = "10.96.0.10", "fd00:96::10", "10.96.0.53"
# The policy step's own pods: kubelet-style pod cgroups (a namespace in the
# name) so the agent finds their interfaces; "client" stays the outsider.
SHOP_WEB, SHOP_CLIENT = "shop/web", "shop/client"
NODE = "demo-node"  # the pods' spec.nodeName and the agent's --node-name
DENY_WEB = {
    "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
    "metadata": {"name": "deny-web", "namespace": "shop"},
    "spec": {"podSelector": {"matchLabels": {"pod": "web"}}, "policyTypes": ["Ingress"]}}
ALLOW_CLIENT = {
    "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
    "metadata": {"name": "allow-client", "namespace": "shop"},
    "spec": {"podSelector": {"matchLabels": {"pod": "web"}},
             "ingress": [{"from": [{"podSelector": {"matchLabels": {"pod": "client"}}}],
                          "ports": [{"protocol": "TCP", "port": 8080}]}]}}


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

        folder = Path(tmp) / "config"  # the agent reads the folder: services, pods, policies
        folder.mkdir()
        copy_config(config, folder)
        agent = AgentProcess(folder, lab.cgroup, bpffs, ["--node-name", NODE, "--node-netns", lab.node_ns])
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

            _show(["service", "list"], ["--bpffs", str(bpffs)])
            _policy_step(lab, agent, folder, bpffs, max(3, requests // 10))
        except Exception:
            click.echo(f"agent log:\n{agent.log()}", err=True)
            raise
        finally:
            agent.cleanup()
    demo_northsouth.run_step(name, max(3, requests // 3), _tally)
    click.echo("lab torn down: namespaces, cgroup, programs and pins removed")


def _write(path: Path, objects: list[dict]) -> None:
    """Written then renamed: the agent takes a renamed file at once."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump_all(objects))
    os.rename(tmp, path)


def _show(args: list[str], where: list[str]) -> None:
    """Runs `meshbpf ARGS` as a user would, printing it without the lab's --bpffs/--agent."""
    click.echo("\nmeshbpf " + " ".join(args))
    out = subprocess.run([sys.executable, "-m", "meshbpf", *args, *where], capture_output=True, text=True)
    click.echo(out.stdout + out.stderr)


def _view(agent: AgentProcess, path: str) -> dict:
    code, body = agent.get(path)
    return json.loads(body) if code == 200 else {}


def _policy_step(lab: Lab, agent: AgentProcess, folder: Path, bpffs: Path, requests: int) -> None:
    """Default deny on shop/web, then an allow for shop/client, with curl
    from shop/client and from the outsider client each time."""
    for pod in (SHOP_WEB, SHOP_CLIENT):
        lab.add_pod(pod)
    start_whoami(lab, SHOP_WEB, 8080)
    _write(folder / "shop-pods.yaml", [lab_objects([lab.pods[SHOP_WEB], lab.pods[SHOP_CLIENT]], NODE)])
    url = f"http://{lab.pods[SHOP_WEB].ipv4}:8080/"
    at = ["--bpffs", str(bpffs), "--agent", f"127.0.0.1:{agent.port}"]

    def curls(title: str) -> None:
        for pod in (SHOP_CLIENT, "client"):
            answers = []
            for _ in range(requests):
                r = lab.run(pod, ["curl", "-sS", "--max-time", "1", url])
                answers.append(r.stdout.strip() or ("no answer (timed out)" if "timed out" in r.stderr
                                                    else f"error: {r.stderr.strip()}"))
            _tally(f"{title}: curl {url} from {pod}", answers)

    def web(check) -> bool:
        eps = _view(agent, "/v1/endpoints").get("endpoints", [])
        return any(e["namespace"] == "shop" and e["name"] == "web" and e["state"] == "enforced"
                   and check(e) for e in eps)

    click.echo(f"\nNetworkPolicy: pods {SHOP_WEB} (whoami on :8080) and {SHOP_CLIENT}, in namespace shop")
    _write(folder / "policies.yaml", [DENY_WEB])
    wait_for(lambda: web(lambda e: e["isolated_ingress"]), 20, "the default deny on shop/web")
    click.echo("policy shop/deny-web: shop/web accepts no connection (a default deny)")
    _show(["endpoint", "list"], at)
    curls("default deny")

    _write(folder / "policies.yaml", [DENY_WEB, ALLOW_CLIENT])
    wait_for(lambda: web(lambda e: "shop/allow-client" in e["policies"]), 20, "the allow for shop/client")
    click.echo("\npolicy shop/allow-client: pods of shop labelled pod=client may connect to shop/web on TCP 8080")
    _show(["policy", "list"], at)
    curls("allow shop/client")
