"""The north-south benchmark's flood (bench/flood.py), program by program under
BPF_PROG_TEST_RUN: the generator writes the whole frame each time (a reused
page holds what node1 left in it), rotates the source port over FLOWS flows
with a valid UDP checksum, and the sink drops and counts only the flood's
frames, translated or not, and passes everything else."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

from flood import BASE_SPORT, FLOWS, MARK, Flood, frame  # noqa: E402
from meshbpf.datapath import libbpf  # noqa: E402

XDP_DROP, XDP_PASS, XDP_TX = 1, 2, 3
MACS = ("02:00:00:00:00:01", "02:00:00:00:00:02")


@pytest.fixture(scope="module")
def flood():
    f = Flood()   # the programs only: no lab, no router netns
    yield f
    f.close()


def _udp_checksum_ok(pkt: bytes) -> bool:
    from scapy.layers.inet import IP, UDP
    got = IP(pkt[14:])
    again = IP(bytes(got))
    del again[UDP].chksum
    return got[UDP].chksum == IP(bytes(again))[UDP].chksum


def test_the_generator_writes_the_frame_whole_and_rotates_flows_with_valid_checksums(flood):
    pkt = frame(*MACS, "10.243.0.1", "10.243.0.2", 30080)
    flood.set_frame(pkt)
    # What node1 leaves in a page: other addresses and ports, a lower TTL.
    from scapy.layers.inet import IP, UDP
    from scapy.layers.l2 import Ether
    from scapy.packet import Raw
    stale = bytes(Ether(src=MACS[1], dst=MACS[0]) / IP(src="10.243.0.2", dst="10.244.1.5", ttl=63) /
                  UDP(sport=61000, dport=9090) / Raw(pkt[42:]))
    ports = []
    for i in range(FLOWS + 2):
        rc, out = libbpf.prog_test_run_xdp_out(flood.gen_fd, stale if i % 2 else pkt)
        assert rc == XDP_TX
        assert out[:34] == pkt[:34] and out[36:40] == pkt[36:40] and out[42:] == pkt[42:], i
        assert _udp_checksum_ok(out), i
        ports.append(int.from_bytes(out[34:36], "big"))
    assert ports[:FLOWS] == list(range(BASE_SPORT, BASE_SPORT + FLOWS))
    assert ports[FLOWS:] == [BASE_SPORT, BASE_SPORT + 1]


def test_the_sink_counts_and_drops_only_the_flood(flood):
    before = flood.sunk()
    translated = frame(*MACS, "10.243.0.2", "10.244.1.5", 9090)   # as node1 sends it on
    assert libbpf.prog_test_run_xdp_out(flood.sink_fd, translated)[0] == XDP_DROP
    assert flood.sunk() == before + 1
    other = translated[:42] + b"notflood" + translated[50:]
    assert libbpf.prog_test_run_xdp_out(flood.sink_fd, other)[0] == XDP_PASS
    from scapy.layers.inet import IP, TCP
    from scapy.layers.l2 import ARP, Ether
    for pkt in (bytes(Ether() / ARP()), bytes(Ether() / IP() / TCP() / MARK), translated[:45]):
        assert libbpf.prog_test_run_xdp_out(flood.sink_fd, pkt)[0] == XDP_PASS
    assert flood.sunk() == before + 1
