"""Real applications for the redirection benchmark (issue 15's matrix).

Each cell runs one real client in pod "cli" against one real server in
pod "srv", with redirection off ("tcp") and on ("redirect"), in the same
way as bench/redirbench.py's own cells:

    redis-benchmark -> redis-server   GET+SET, -P 1 and 16, -c 1, 4 and 50,
                                      64 B and 16 KB values (requests/s)
    wrk -> nginx                      HTTP/1.1 keep-alive, 64 B and 64 KB
                                      bodies, 4 connections (requests/s)
    iperf3 -c -> iperf3 -s            one stream and four (MB/s received)
    sockperf pp -> sockperf sr        64 B ping-pong, non-blocking sockets
                                      (round trips/s)

redis, nginx, wrk and sockperf (told so: --nonblocked) use non-blocking
sockets (event loops), the only ones meshbpf splices. iperf3's sockets block,
so meshbpf leaves its streams to TCP: those cells compare TCP with TCP and
check that the blocking-socket exclusion costs nothing.
"""

from __future__ import annotations

import json
import re
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REDIS_PORT, NGINX_PORT, IPERF_PORT, SOCKPERF_PORT = 6390, 8090, 5210, 11120


@dataclass(frozen=True)
class AppCell:
    tool: str                 # redis, wrk, iperf3, sockperf
    size: int                 # value, body, write or message size in bytes
    conns: int = 1            # connections (iperf3: parallel streams)
    pipeline: int = 1         # redis-benchmark -P
    unit: str = "req/s"

    @property
    def key(self) -> str:
        return f"{self.tool}/{self.size}/c{self.conns}/P{self.pipeline}"

    @property
    def rr(self) -> bool:
        """Request/response (the 1.2x target where one connection), or a stream."""
        return self.tool != "iperf3"


def app_cells() -> list[AppCell]:
    cells = [AppCell("redis", size, conns, pipe)
             for pipe in (1, 16) for conns in (1, 4, 50) for size in (64, 16384)]
    cells += [AppCell("wrk", size, 4) for size in (64, 65536)]
    cells += [AppCell("iperf3", 131072, streams, unit="MB/s") for streams in (1, 4)]
    cells.append(AppCell("sockperf", 64, unit="round trips/s"))
    return cells


NGINX_CONF = """
master_process off;
daemon off;
pid {dir}/nginx.pid;
error_log {dir}/error.log;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {dir};
    proxy_temp_path {dir};
    fastcgi_temp_path {dir};
    uwsgi_temp_path {dir};
    scgi_temp_path {dir};
    keepalive_requests 100000000;
    server {{
        listen {ip}:{port};
        root {dir}/www;
    }}
}}
"""


@dataclass
class Apps:
    """The servers, started once per pinning in pod srv; stopped on exit."""
    bench: object
    pin: list[str]
    procs: list = field(default_factory=list)
    tmp: tempfile.TemporaryDirectory | None = None

    def __enter__(self) -> "Apps":
        lab, ip = self.bench.lab, str(self.bench.lab.pods["srv"].ipv4)
        self.tmp = tempfile.TemporaryDirectory(prefix="redirapps-")
        d = Path(self.tmp.name)
        (d / "www").mkdir()
        for size in (64, 65536):
            (d / "www" / f"{size}.bin").write_bytes(b"x" * size)
        (d / "nginx.conf").write_text(NGINX_CONF.format(dir=d, ip=ip, port=NGINX_PORT))
        servers = [
            ["redis-server", "--port", str(REDIS_PORT), "--bind", ip, "--save", "", "--appendonly", "no",
             "--protected-mode", "no", "--daemonize", "no", "--dir", str(d)],
            ["nginx", "-c", str(d / "nginx.conf"), "-p", str(d)],
            ["iperf3", "-s", "-B", ip, "-p", str(IPERF_PORT)],
            ["sockperf", "sr", "--tcp", "--nonblocked", "-i", ip, "-p", str(SOCKPERF_PORT)],
        ]
        try:
            for argv in servers:
                self.procs.append(lab.popen("srv", [*self.pin, *argv], in_cgroup=True,
                                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            time.sleep(1.0)
            dead = [p.args for p in self.procs if p.poll() is not None]
            if dead:
                raise RuntimeError(f"servers exited at start: {dead}")
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
            p.wait()
        self.procs.clear()
        if self.tmp is not None:
            self.tmp.cleanup()
            self.tmp = None

    def argv(self, cell: AppCell, duration: float) -> list[str]:
        ip = str(self.bench.lab.pods["srv"].ipv4)
        secs = max(1, round(duration))
        if cell.tool == "redis":
            # -n sized to run for about `duration` seconds or more; the rate is what counts
            n = (5000 if cell.size > 1024 else 20000 * (5 if cell.pipeline > 1 else 1)) * secs
            return ["redis-benchmark", "-h", ip, "-p", str(REDIS_PORT), "-c", str(cell.conns),
                    "-P", str(cell.pipeline), "-d", str(cell.size), "-n", str(n), "-t", "get,set", "--csv"]
        if cell.tool == "wrk":
            return ["wrk", "-t", "1", "-c", str(cell.conns), "-d", f"{secs}s",
                    f"http://{ip}:{NGINX_PORT}/{cell.size}.bin"]
        if cell.tool == "iperf3":
            return ["iperf3", "-c", ip, "-p", str(IPERF_PORT), "-t", str(secs), "-O", "1",
                    "-P", str(cell.conns), "-l", str(cell.size), "-J"]
        return ["sockperf", "pp", "--tcp", "--nonblocked", "-i", ip, "-p", str(SOCKPERF_PORT),
                "-m", str(cell.size), "-t", f"{duration + 0.45:.2f}", "--mps=max"]

    def run(self, cell: AppCell, case: str, duration: float) -> dict:
        b = self.bench
        b.set_redirect(case == "redirect")
        before = b.counters()
        res = b.lab.run("cli", [*self.pin, *self.argv(cell, duration)], in_cgroup=True,
                        timeout=duration + 120)
        delta = {k: v - before.get(k, 0) for k, v in b.counters().items()}
        out = res.stdout + res.stderr
        if res.returncode != 0:
            raise RuntimeError(f"{cell.key} {case} failed (rc {res.returncode}): {out[-1500:]}")
        return {"value": parse_rate(cell, res.stdout, out), "counters": delta}


def parse_rate(cell: AppCell, stdout: str, out: str) -> float:
    if cell.tool == "redis":
        rates = [float(x) for x in re.findall(r'^"(?:SET|GET)","([\d.]+)"', stdout, re.M)]
        if len(rates) != 2:
            raise RuntimeError(f"{cell.key}: no rates in redis-benchmark output: {out[-800:]}")
        return sum(rates) / 2
    if cell.tool == "wrk":
        m = re.search(r"Requests/sec:\s*([\d.]+)", stdout)
        if not m or "Non-2xx" in stdout or "Socket errors" in stdout:
            raise RuntimeError(f"{cell.key}: wrk failed: {out[-800:]}")
        return float(m.group(1))
    if cell.tool == "iperf3":
        data = json.loads(stdout)
        if data.get("error"):
            raise RuntimeError(f"{cell.key}: iperf3: {data['error']}")
        return data["end"]["sum_received"]["bits_per_second"] / 8e6
    m = re.search(r"\[Valid Duration\] RunTime=([\d.]+) sec; SentMessages=(\d+); ReceivedMessages=(\d+)", out)
    if not m or "ERROR" in out:
        raise RuntimeError(f"{cell.key}: sockperf failed: {out[-800:]}")
    return int(m.group(3)) / float(m.group(1))
