"""Tables (markdown) and a plot (PNG) from a redirect.json of redirbench.py."""

from __future__ import annotations

from pathlib import Path

from report import _shown

PINNING_LABEL = {
    "same": "pinned: client and server share one CPU",
    "none": "unpinned: client and server free to use both CPUs",
    "split": "split: client on CPU 0, server on the other CPU",
}
MODE_LABEL = {"rr": "request/response", "stream": "streaming"}
NAGLE_LABEL = {"nagle": "Nagle on", "nodelay": "TCP_NODELAY"}
UNIT = {"rr": "transactions/s", "stream": "MB/s at the receiver"}


def _size(n: int | str) -> str:
    n = int(n)
    if n >= 1 << 20 and n % (1 << 20) == 0:
        return f"{n >> 20} MB"
    if n >= 1024 and n % 1024 == 0:
        return f"{n >> 10} KB"
    return f"{n} B"


def _table(head: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _ratio(s: dict) -> str:
    text = f"{s['ratio']:.2f}× ({s['ratio_q1']:.2f}–{s['ratio_q3']:.2f})"
    text = text if s["meets_target"] else f"**{text}** ✗"
    # A cell whose redirect runs went over TCP compares TCP with TCP.
    return text + " ᵀ" if s.get("path") == "TCP" else text


def _grid(res: dict) -> tuple[list[str], list[int], list[str]]:
    keys = res["config"]["cells"]
    modes = list(dict.fromkeys(k.split("/")[0] for k in keys))
    sizes = list(dict.fromkeys(int(k.split("/")[1]) for k in keys))
    nagles = list(dict.fromkeys(k.split("/")[2] for k in keys))
    return modes, sizes, nagles


def _num(x: float) -> str:
    return f"{x:,.0f}".replace(",", " ") if x >= 100 else f"{x:.1f}"


def ratio_table(res: dict, pinning: str) -> str:
    modes, sizes, nagles = _grid(res)
    summ = res["pinning"][pinning]["summary"]
    rows = []
    for mode in modes:
        for nagle in nagles:
            rows.append([f"{MODE_LABEL[mode]}, {NAGLE_LABEL[nagle]} (target ≥ {summ[f'{mode}/{sizes[0]}/{nagle}']['target']:.1f}×)"]
                        + [_ratio(summ[f"{mode}/{size}/{nagle}"]) for size in sizes])
    return _table(["redirect ÷ plain TCP"] + [_size(s) for s in sizes], rows)


def detail_table(res: dict, pinning: str) -> str:
    """Absolute medians, latencies, and the path each cell's bytes took."""
    modes, sizes, nagles = _grid(res)
    summ = res["pinning"][pinning]["summary"]
    rows = []
    for mode in modes:
        for nagle in nagles:
            for size in sizes:
                s = summ[f"{mode}/{size}/{nagle}"]
                c = s["counters_per_run"]
                lat = (f"{s['tcp_p50_us']:.0f} / {s['tcp_p99_us']:.0f} → "
                       f"{s['redirect_p50_us']:.0f} / {s['redirect_p99_us']:.0f}") if mode == "rr" else ""
                path = f"{s['path']} ({100 * s['spliced_fraction']:.1f}% spliced)"
                eagain = (f"{s['eagain']['tcp']} + {s.get('eagain_eof', {}).get('tcp', 0)} → "
                          f"{s['eagain']['redirect']} + {s.get('eagain_eof', {}).get('redirect', 0)}")
                rows.append([MODE_LABEL[mode], NAGLE_LABEL[nagle], _size(size),
                             f"{_num(s['tcp'])} → {_num(s['redirect'])}", lat, path,
                             f"{c.get('switched_pairs', 0):.1f} / {c.get('evicted_sockets', 0):.1f}",
                             f"{s['wins']}/{s['rounds']}", str(eagain)])
    return _table(["mode", "Nagle", "size", "median rate, tcp → redirect", "rr p50 / p99 µs, tcp → redirect",
                   "path (redirect runs)", "switched pairs / evicted sockets per run",
                   "rounds redirect won", "spurious EAGAIN (mid-stream + at EOF), tcp → redirect"], rows)


def tools_table(res: dict, pinning: str) -> str:
    summ = res["tools"][pinning]["summary"]
    rows = []
    for key, s in summ.items():
        tool, size, nagle = key.split("/")
        what = "ping-pong (transactions/s)" if tool == "sockperf" else "stream (MB/s at the receiver)"
        rows.append([f"{tool} {what}", NAGLE_LABEL[nagle], _size(size) if int(size) != 65507 else "65 507 B",
                     f"{_num(s['tcp'])} → {_num(s['redirect'])}", _ratio(s),
                     f"{s['path']} ({100 * s['spliced_fraction']:.0f}% spliced)" if "path" in s else
                     f"{s['counters_per_run'].get('redirected_bytes', 0) / 1e6:.0f} MB spliced per run"])
    return _table(["tool", "Nagle", "size", "median, tcp → redirect", "redirect ÷ tcp", "path"], rows)


def _app_what(key: str) -> list[str]:
    tool, size, conns, pipe = key.split("/")
    conns, pipe = conns[1:], pipe[1:]
    if tool == "redis":
        return ["redis-benchmark GET+SET", f"{_size(size)} values", f"{conns}",
                f"-P {pipe}" if pipe != "1" else "no"]
    if tool == "wrk":
        return ["wrk → nginx, HTTP/1.1 keep-alive", f"{_size(size)} bodies", conns, "no"]
    if tool == "iperf3":
        return ["iperf3 stream", f"{_size(size)} writes", f"{conns} stream(s)", "—"]
    return ["sockperf ping-pong", f"{_size(size)}", conns, "no"]


def apps_table(res: dict, pinning: str) -> str:
    data = res["apps"][pinning]
    rows = []
    for key in data["cells"]:
        s = data["summary"][key]
        rows.append([*_app_what(key), f"{_num(s['tcp'])} → {_num(s['redirect'])} {s['unit']}",
                     _ratio(s), f"≥ {s['target']:.1f}×",
                     f"{s['path']} ({100 * s['spliced_fraction']:.0f}% of bytes spliced)"])
    return _table(["application", "size", "connections", "pipelining", "median, tcp → redirect",
                   "redirect ÷ tcp", "target", "path"], rows)


def losing_cells(res: dict) -> list[str]:
    out = []
    for group in ("pinning", "apps"):
        for pinning, data in res.get(group, {}).items():
            for key, s in data["summary"].items():
                if isinstance(s, dict) and not s["meets_target"]:
                    out.append(f"{pinning}: {key} {s['ratio']:.2f}× (target {s['target']:.1f}×)")
    return out


def markdown(res: dict) -> str:
    cfg, m = res["config"], res["machine"]
    proto = cfg.get("bpf_dir")
    out = ["### Same-node socket redirection vs plain TCP"
           + (" (prototype datapath)" if proto else ""), "",
           *([f"BPF programs loaded from `{proto}`, not from bpf/.", ""] if proto else []),
           f"Measured with `bench/sockbench` between two lab pods (network namespaces on the lab "
           f"bridge, both in the lab cgroup), one connection per run, "
           f"{cfg['rounds']} rounds of {cfg['duration_s']} s (+{cfg['warmup_s']} s warm-up) per cell "
           f"and case, tcp and redirect interleaved. Each figure is the median of the per-round "
           f"ratios, with the quartiles. Bold ✗: below the target (request/response ≥ 1.2×, "
           f"streaming ≥ 1.0×). ᵀ: the redirect runs of that cell were switched to TCP "
           f"(under 1 % of their bytes spliced), so the cell compares TCP with TCP. Kernel {m['kernel']}, {m['cpus']} × {m['cpu']}. "
           f"SMALL_WRITE = {cfg['small_write']}, SMALL_RUN_MAX = {cfg['small_run_max']}.", ""]
    for pinning in res["pinning"]:
        out += [f"**{PINNING_LABEL[pinning]}**", "", ratio_table(res, pinning), ""]
        summ = res["pinning"][pinning]["summary"]
        if "pipe_floor" in summ and "rr/64/nodelay" in summ:
            rr = summ["rr/64/nodelay"]
            floors = [r["pipe_floor"] for r in res["pinning"][pinning]["rounds"] if "pipe_floor" in r]
            lo, hi = min(floors), max(floors)
            out += [f"Wake-up ceiling under this pinning: two threads ping-ponging 64 B over pipes "
                    f"(no network) make {_num(summ['pipe_floor'])} round trips/s (median; rounds "
                    f"{_num(lo)}–{_num(hi)}); 64 B request/response with TCP_NODELAY made "
                    f"{_num(rr['tcp'])}/s over TCP and {_num(rr['redirect'])}/s spliced."
                    + (f" Highest 1-minute load average seen: {summ['loadavg_max']:.1f}."
                       if "loadavg_max" in summ else ""), ""]
            same = res["pinning"].get("same", {}).get("summary", {}).get("pipe_floor")
            if pinning != "same" and same and summ["pipe_floor"] > 0.5 * same:
                out += [f"*In this run the unpinned threads mostly shared one CPU* (their pipe "
                        f"ceiling is close to the pinned one): other work kept the other CPU busy, "
                        f"so this table is close to the pinned one. With both CPUs idle, cross-CPU "
                        f"wake-ups dominate small request/response; see bench/README.md.", ""]
    for pinning, data in res.get("apps", {}).items():
        summ = data["summary"]
        out += [f"**Real applications ({PINNING_LABEL[pinning]})**, {cfg.get('app_rounds')} rounds of "
                f"{cfg.get('app_duration_s')} s per cell and case, interleaved; median of the per-round "
                f"ratios (quartiles). Wake-up ceiling under this pinning (two threads ping-ponging 64 B "
                f"over pipes): {_num(summ['pipe_floor'])} round trips/s. Highest 1-minute load "
                f"average seen: {summ['loadavg_max']:.1f}.", "", apps_table(res, pinning), ""]
    for pinning in res.get("tools", {}):
        out += [f"**Cross-check with real tools ({PINNING_LABEL[pinning]})**, "
                f"{cfg['tool_rounds']} rounds: sockperf sets TCP_NODELAY unless told "
                "`--tcp-avoid-nodelay`; iperf3 `-N` sets it on the sender.", "",
                tools_table(res, pinning), ""]
    out += ["![redirect vs plain TCP](bench/results/redirect.png)", ""]
    for pinning in res["pinning"]:
        out += [f"<details><summary>Details, {PINNING_LABEL[pinning]}</summary>", "",
                detail_table(res, pinning), "", "</details>", ""]
    lose = losing_cells(res)
    if lose:
        out += ["Cells below target: " + "; ".join(lose) + ".", ""]
    out += ["Reproduce (as root, on a 2-CPU machine, about "
            f"{res.get('elapsed_s', 0) / 60:.0f} minutes):", "", "```sh", res["command"], "```", ""]
    return "\n".join(out)


def plot(res: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes, sizes, nagles = _grid(res)
    pinnings = list(res["pinning"])
    fig, axes = plt.subplots(len(pinnings), len(modes), figsize=(5.2 * len(modes), 3.6 * len(pinnings)),
                             squeeze=False)
    colors = {"nagle": "#4878a8", "nodelay": "#e0a030"}
    width = 0.8 / len(nagles)
    for i, pinning in enumerate(pinnings):
        summ = res["pinning"][pinning]["summary"]
        for j, mode in enumerate(modes):
            ax = axes[i][j]
            for k, nagle in enumerate(nagles):
                ss = [summ[f"{mode}/{size}/{nagle}"] for size in sizes]
                xs = [x + (k - (len(nagles) - 1) / 2) * width for x in range(len(sizes))]
                med = [s["ratio"] for s in ss]
                err = [[s["ratio"] - s["ratio_q1"] for s in ss], [s["ratio_q3"] - s["ratio"] for s in ss]]
                ax.bar(xs, med, width, yerr=err, capsize=3, color=colors[nagle], label=NAGLE_LABEL[nagle],
                       edgecolor=["red" if not s["meets_target"] else "none" for s in ss], linewidth=2)
                for x, s in zip(xs, ss):
                    ax.text(x, s["ratio_q3"] * 1.03, f"{s['ratio']:.2f}", ha="center", va="bottom", fontsize=7)
            target = 1.2 if mode == "rr" else 1.0
            ax.axhline(1.0, color="black", linewidth=0.8)
            if target != 1.0:
                ax.axhline(target, color="red", linestyle="--", linewidth=0.8, label=f"target {target}×")
            ax.set_yscale("log")
            ax.set_xticks(range(len(sizes)), [_size(s) for s in sizes])
            short = {"same": "pinned, one CPU", "none": "unpinned", "split": "split CPUs"}[pinning]
            ax.set_title(f"{MODE_LABEL[mode]} — {short}", fontsize=10)
            ax.margins(y=0.12)
            ax.set_ylabel("redirect ÷ plain TCP")
            ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}×"))
            ax.yaxis.set_minor_formatter(matplotlib.ticker.FuncFormatter(
                lambda v, _: f"{v:g}×" if v in (0.5, 2, 3, 5) else ""))
            ax.legend(fontsize=7, loc="upper left")
            ax.grid(axis="y", which="both", alpha=0.3)
    fig.suptitle(("PROTOTYPE datapath: " if res["config"].get("bpf_dir") else "")
                 + "Same-node socket redirection vs plain TCP between two pods "
                 "(median of per-round ratios; bars: quartiles; red edge: below target)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_all(res: dict, out: Path, name: str = "redirect") -> None:
    out.mkdir(parents=True, exist_ok=True)
    plot(res, out / f"{name}.png")
    # The snippet links the plot where this run wrote it (--out, --name).
    text = markdown(res).replace("bench/results/redirect.png", _shown(out / f"{name}.png"))
    (out / f"README-{name}-snippet.md").write_text(text)
