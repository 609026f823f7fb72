"""The north-south conntrack's flags and idle limits are written twice: in
bpf/ (the programs judge a flow over when a new one wants its SNAT port)
and in meshbpf/datapath/northsouth.py (the agent's garbage collection).
They must agree, or the agent frees ports the programs still hold (or the
reverse)."""

from __future__ import annotations

import re

from meshbpf.datapath import northsouth as ns
from meshbpf.datapath.source import bpf_dir


def _defines(name: str) -> dict[str, str]:
    text = (bpf_dir() / "lib" / name).read_text()
    return dict(re.findall(r"^#define (\w+)\s+(.+?)\s*(?:/\*.*)?$", text, re.MULTILINE))


def test_the_flags_match_the_header():
    d = _defines("common.h")
    assert {k: int(d[f"MBPF_NS_{k}"]) for k in ("CT_FWD", "CT_REV", "CT_F_SNAT", "CT_F_FIN",
                                                   "CT_F_RST", "CT_F_FIN_FIRST")} == \
        {"CT_FWD": ns.CT_FWD, "CT_REV": ns.CT_REV, "CT_F_SNAT": ns.CT_F_SNAT, "CT_F_FIN": ns.CT_F_FIN,
         "CT_F_RST": ns.CT_F_RST, "CT_F_FIN_FIRST": ns.CT_F_FIN_FIRST}


def test_the_idle_limits_match_the_programs():
    d = _defines("nodeport.h")

    def seconds(name: str) -> int:
        m = re.fullmatch(r"\((\d+) \* NS_SEC\)", d[name])
        assert m, (name, d[name])
        return int(m[1]) * 10**9
    assert seconds("NS_CT_CLOSED_IDLE") == ns.CT_CLOSED_IDLE_NS
    assert seconds("NS_CT_FIN_IDLE") == ns.CT_FIN_IDLE_NS
    assert seconds("NS_CT_UDP_IDLE") == ns.CT_UDP_IDLE_NS
