"""Tables (markdown) and a plot (PNG) from a results.json of lbbench.py."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS_NAME = "results.json"  # what lbbench.py writes in its --out folder
PLOT_NAME = "bench.png"

LABEL = {
    "direct": "direct to the backend (baseline)",
    "meshbpf": "meshbpf (BPF connect4 translation)",
    "split": "meshbpf, a Service split 50/50 by a TCPRoute",
    "meshbpf-skstorage": "meshbpf, reverse NAT in socket storage (no conn_rnat)",
    "meshbpf-hash": "meshbpf, connection table in a hash (no conn_slots, as before 5.12)",
    "iptables": "kube-proxy iptables layout (legacy)",
    "iptables-nft": "kube-proxy iptables layout (iptables-nft)",
    "nftables": "kube-proxy nftables layout (verdict map)",
}
PROG_LABEL = {
    "meshbpf": "meshbpf: YAML file → maps (parse, plan, batch write)",
    "meshbpf-maps": "meshbpf: maps only (plan, batch write)",
    "iptables": "iptables-legacy-restore",
    "iptables-nft": "iptables-nft-restore",
    "nftables": "nft -f",
}


def _n(n: int | str) -> str:
    return f"{int(n):,}".replace(",", " ")


def _secs(s: float) -> str:
    if s >= 1:
        return f"{s:.2f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.1f} ms"
    return f"{s * 1e6:.0f} µs"


def _ratio(x: dict) -> str:
    """Median ratio, with the quartiles of the per-round ratios."""
    if "rate_ratio_q1" not in x:
        return f"{x['rate_ratio']:.2f}×"
    return f"{x['rate_ratio']:.2f}× ({x['rate_ratio_q1']:.2f}–{x['rate_ratio_q3']:.2f})"


def _table(head: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _prog_rows(res: dict, key: str) -> dict[str, dict[str, float]]:
    """method -> size -> seconds, with meshbpf split into file and maps-only."""
    out: dict[str, dict[str, float]] = {}
    for n, size in res["sizes"].items():
        for case, t in size[key].items():
            if not t:
                continue
            out.setdefault(case, {})[n] = t["total_s"]
            if case == "meshbpf":
                out.setdefault("meshbpf-maps", {})[n] = t["maps_s"]
    order = ["meshbpf", "meshbpf-maps", "iptables", "iptables-nft", "nftables"]
    return {m: out[m] for m in order if m in out}


def _rnat_note(res: dict) -> list[str]:
    """meshbpf's reverse-NAT LRU gets an entry per connection; say when it was
    full, because then every connect() also evicts one."""
    full = [n for n, s in res["sizes"].items() if s.get("meshbpf_rnat_capacity")
            and s["meshbpf_rnat_entries"] >= 0.99 * s["meshbpf_rnat_capacity"]]
    if not full:
        return []
    cap = res["sizes"][full[0]]["meshbpf_rnat_capacity"]
    return [f"meshbpf's reverse-NAT map (an LRU of {_n(cap)} entries; every connection adds "
            f"one and none is deleted on close) was full at N = {', '.join(_n(n) for n in full)}: "
            "most meshbpf rounds ran with every connect() evicting an entry.", ""]


def _shown(path: Path) -> str:
    """A path as the snippet names it: from the repository's root when it is
    inside it (README.md links resolve from there), else in full."""
    path = path.resolve()
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def markdown(res: dict, out_dir: Path, results_file: Path | None = None) -> str:
    """The README snippet; out_dir is the folder the plot is written to and
    results_file the raw numbers (default: RESULTS_NAME in out_dir), named
    as they are, so a run with --out DIR points at its own files."""
    results_file = results_file or out_dir / RESULTS_NAME
    cfg, sizes = res["config"], list(res["sizes"])
    cases = cfg["cases"]
    big = sizes[-1]
    head = ["path"] + [f"N = {_n(n)}" for n in sizes]
    m = res["machine"]
    out = [
        f"Measured with `{res['command']}` on {m['cpus']} × {m['cpu']}, kernel {m['kernel']}"
        f" ({m['date']}){', quick mode' if cfg['quick'] else ''}. "
        f"Each number is the median of {cfg['rounds']} rounds of {cfg['duration_s']:g} s; every "
        "ratio is taken against the direct run of the same round, in the same process tree.",
        "",
        f"**Connect, 64-byte request, 64-byte response, close** (one C client thread, "
        f"{cfg['backends']} backends per service, connecting to the last of N services"
        + (f"; client and server share CPU {cfg['cpu']}, so a rate is the whole CPU cost of a "
           "connection" if cfg.get("cpu") is not None else "") + "). "
        "Connection rate relative to connecting straight to a backend "
        "(median of the per-round ratios, quartiles in brackets; the direct row is absolute):",
        "",
        _table(head, [[LABEL[c]] + [
            f"{res['sizes'][n]['summary'][c]['rate']:,.0f}/s".replace(",", " ") if c == "direct"
            else _ratio(res['sizes'][n]['summary'][c]) for n in sizes]
            for c in cases]),
        "",
        *_rnat_note(res),
        "Latency of one whole connection, p50 / p99 in µs:",
        "",
        _table(head, [[LABEL[c]] + [
            f"{res['sizes'][n]['summary'][c]['p50_us']:.0f} / {res['sizes'][n]['summary'][c]['p99_us']:.0f}"
            for n in sizes] for c in cases]),
        "",
    ]
    prog = _prog_rows(res, "programming")
    if prog:
        base = prog.get("meshbpf", {}).get(big)
        out += [
            f"**Programming N services from empty** (4 endpoints each; each tool gets the same "
            f"services, in its own fresh network namespace). The last column is the time relative "
            f"to meshbpf from the YAML file at N = {_n(big)}:",
            "",
            _table(["method"] + [f"N = {_n(n)}" for n in sizes] + [f"vs meshbpf at {_n(big)}"],
                   [[PROG_LABEL[meth]] + [_secs(t[n]) if n in t else "–" for n in sizes]
                    + [f"{t[big] / base:.2f}×" if base and big in t else "–"]
                    for meth, t in prog.items()]),
            "",
        ]
    add = _prog_rows(res, "add_one")
    if add:
        out += [
            "**Adding one service** to N (meshbpf: the agent's path, its file source over a folder "
            "holding the N, the new Service in a file of its own, read alone and planned over the "
            "frontends it touches; iptables: kube-proxy's partial `iptables-restore --noflush` "
            "rewriting KUBE-SERVICES; nftables: one small `nft -f` transaction):",
            "",
            _table(["method"] + [f"at N = {_n(n)}" for n in sizes],
                   [[PROG_LABEL[meth]] + [_secs(t[n]) if n in t else "–" for n in sizes]
                    for meth, t in add.items()]),
            "",
        ]
    out += [
        f"![connection rate and programming time]({_shown(out_dir / PLOT_NAME)})",
        "",
        f"Reproduce (root, Debian 12; does its own setup, writes {_shown(out_dir)}/):",
        "",
        "```sh",
        res["command"],
        "```",
        "",
        f"The whole run took {res.get('elapsed_s', 0) / 60:.0f} minutes. Raw numbers: "
        f"{_shown(results_file)}; method: bench/README.md.",
    ]
    return "\n".join(out) + "\n"


def plot(res: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = list(res["sizes"])
    xs = [int(n) for n in sizes]
    fig, ((a, b), (c, d)) = plt.subplots(2, 2, figsize=(13, 9))
    top = 1.1
    for case in res["config"]["cases"]:
        s = [res["sizes"][n]["summary"][case] for n in sizes]
        mid = [x["rate_ratio"] for x in s]
        # Bars: quartiles of the per-round ratios.
        err = [[m - x.get("rate_ratio_q1", m) for m, x in zip(mid, s)],
               [x.get("rate_ratio_q3", m) - m for m, x in zip(mid, s)]]
        a.errorbar(xs, mid, yerr=err, marker="o", capsize=3, label=LABEL[case])
        b.plot(xs, [x["p99_us"] for x in s], marker="o", label=LABEL[case])
        top = min(1.6, max(top, max(x.get("rate_ratio_q3", 0) for x in s) + 0.05))
    a.set(xscale="log", ylim=(0, top), xlabel="services (N)",
          ylabel="connections/s relative to direct", title="Connection rate (higher is better)")
    b.set(xscale="log", ylim=(0, None), xlabel="services (N)", ylabel="µs",
          title="p99 latency of connect + request + response + close")
    for ax, key, title in ((c, "programming", "Programming N services from empty"),
                           (d, "add_one", "Adding one service to N")):
        for meth, t in _prog_rows(res, key).items():
            ax.plot([int(n) for n in t], list(t.values()), marker="o", label=PROG_LABEL[meth])
        ax.set(xscale="log", yscale="log", xlabel="services (N)", ylabel="seconds",
               title=title + " (lower is better)")
    for ax in (a, b, c, d):
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    m = res["machine"]
    fig.suptitle(f"meshbpf vs kube-proxy rule layouts: {m['cpus']} CPUs, kernel {m['kernel']}"
                 f"{', quick mode' if res['config']['quick'] else ''}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_all(res: dict, out: Path, results_file: Path | None = None) -> None:
    out.mkdir(parents=True, exist_ok=True)
    plot(res, out / PLOT_NAME)
    (out / "README-snippet.md").write_text(markdown(res, out, results_file))
