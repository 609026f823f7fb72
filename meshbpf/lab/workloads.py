"""Servers and the agent, started as real processes for the lab.

Shared by the demo, the tests and the benchmarks so that each starts a
backend, waits for it, and cleans up the same way.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from ..datapath import loader
from .netlab import Lab


def wait_for(check, timeout: float, what: str, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def wait_listening(lab: Lab, pod: str, port: int, proto: str = "tcp", timeout: float = 30,
                   host: str = "") -> None:
    """Until something in pod listens on port (on host, if given)."""
    # 30 s: a Python server starting in an emulated VM (TCG) on a busy host
    # has taken more than 10; a server that does start is seen at once.
    flag = "-ltnH" if proto == "tcp" else "-lunH"
    where = f"[{host}]" if ":" in host else host  # as ss prints an address
    wait_for(lambda: f"{where}:{port} " in lab.run(pod, ["ss", flag], in_cgroup=False).stdout,
             timeout, f"{proto} port {port} in pod {pod}" + (f" on {host}" if host else ""))


def start_whoami(lab: Lab, pod: str, port: int = 8080, name: str | None = None) -> subprocess.Popen:
    """An HTTP server in `pod` that answers with its name."""
    proc = lab.popen(pod, [sys.executable, "-m", "meshbpf.lab.whoami", "--name", name or pod,
                           "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_listening(lab, pod, port)
    return proc


def start_dnsmasq(lab: Lab, pod: str, workdir: Path, txt: str | None = None, port: int = 53,
                  forward_to: str | None = None, listen: tuple[str, ...] = ()) -> subprocess.Popen:
    """A real DNS server in `pod` on `port`: TXT whoami.lab answers with txt
    (the pod name); or, with forward_to, a forwarder without a cache that
    sends every query to that server (sendto() on unconnected sockets).
    With listen, bound to those addresses only (else every address)."""
    # Never --pid-file=/dev/null: dnsmasq replaces that file.
    name = "-".join([pod, str(port), *listen]).replace("/", "-").replace(":", "_")
    pid_file = workdir / f"dnsmasq-{name}.pid"
    answer = ([f"--server={forward_to}", "--cache-size=0"] if forward_to
              else [f"--txt-record=whoami.lab,{txt or pod}"])
    where = ["--bind-interfaces", *(f"--listen-address={a}" for a in listen)] if listen else []
    proc = lab.popen(pod, ["dnsmasq", "--keep-in-foreground", "--conf-file", "--no-resolv",
                           "--no-hosts", f"--port={port}", "--user=root", f"--pid-file={pid_file}",
                           *answer, *where, "--log-facility=-"],
                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for host in listen or ("",):
        wait_listening(lab, pod, port, "udp", host=host)
    return proc


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class AgentProcess:
    """`meshbpf agent` as a child process, attached to a lab's cgroup.

    The agent runs outside the lab (host network namespace, root cgroup):
    it programs the lab; it is not a lab workload."""

    def __init__(self, config: Path, cgroup: Path, bpffs: Path, extra: list[str] | None = None):
        self.config, self.cgroup, self.bpffs = config, cgroup, bpffs
        self.extra = extra or []
        self.port = free_port()
        self.proc: subprocess.Popen | None = None
        self.log_path = Path(tempfile.mkstemp(prefix="meshbpf-agent-", suffix=".log")[1])

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, wait_ready: bool = True, timeout: float = 60) -> "AgentProcess":
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "meshbpf", "-v", "agent", "--config", str(self.config),
             "--cgroup", str(self.cgroup), "--bpffs", str(self.bpffs),
             "--listen", f"127.0.0.1:{self.port}", *self.extra],
            stdout=log, stderr=subprocess.STDOUT)
        log.close()
        if wait_ready:
            self.wait_ready(timeout)
        return self

    def get(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(self.url + path, timeout=2) as resp:
                return resp.status, resp.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()

    def wait_ready(self, timeout: float = 60) -> None:
        def ready():
            if self.proc and self.proc.poll() is not None:
                raise RuntimeError(f"agent exited with {self.proc.returncode}:\n{self.log()}")
            try:
                return self.get("/readyz")[0] == 200
            except OSError:
                return False
        wait_for(ready, timeout, "the agent to be ready", interval=0.1)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM) -> int | None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode if self.proc else None

    def cleanup(self) -> None:
        """Stop the agent and remove everything it attached and pinned."""
        self.stop(signal.SIGKILL)
        if self.bpffs.exists():
            loader.uninstall(self.bpffs)
        try:
            os.unlink(self.log_path)
        except FileNotFoundError:
            pass


def copy_config(src: Path, dst_dir: Path) -> Path:
    dst = dst_dir / src.name
    shutil.copy(src, dst)
    return dst
