"""The UDP packet rate through node1's translation (issue 12's "packet rate"),
for bench/northsouth.py's `flood` variant: a flood made in the kernel, counted
where node1 hands it back to the wire.

- The generator is BPF_PROG_TEST_RUN's live-frame mode (5.18+): an XDP
  program run on one 64-byte UDP frame, over and over, in the router's
  netns as if received on its port nd1; it returns XDP_TX, so each frame is
  sent out of nd1 to node1's ext0, where a client's packet arrives. It
  rotates the source port over FLOWS flows (the UDP checksum kept valid):
  established flows after the first pass, for every mode alike.
- Node1 translates the frame to the backend on node2 (or routes it, in mode
  direct) and sends it out of ext0 again, back to nd1: the sink, an XDP
  program on nd1 in place of the bench's XDP_PASS there, counts the frames
  that carry the flood's marker in their payload and drops them; every
  other frame passes to the router's bridge as before.
- Generator, node1 and sink all run in softirq on the calling CPU (a veth
  hands its frames to the peer's NAPI on the same CPU), so the rate is the
  inverse of a frame's whole cost: the generator's and the sink's are the
  same in every mode, node1's is what differs. This is how XDP load
  balancers are measured (packets forwarded per second), as against the
  `udp` variant's ping-pong, a round trip through two full stacks per
  packet in which the translation is a small part.
- A veth hands XDP frames only to a peer with NAPI: node1's ext0 has it with
  mbpf_ns_xdp attached; for the flood bench/northsouth.py turns GRO on on
  ext0 in every mode (what enables a veth's NAPI without XDP), and off again.
- Needs BPF_PROG_TEST_RUN's live frames (5.18+): `available()` says why not.
"""

from __future__ import annotations

import ctypes as ct
import os
import time

from meshbpf.datapath import libbpf

FLOWS = 256
BASE_SPORT = 20000
MARK = b"mbpfFLOD"  # the payload's first 8 bytes
FRAME_LEN = 64      # Ethernet frame without FCS: 14 + 20 + 8 + 22
BPF_F_TEST_XDP_LIVE_FRAMES = 1 << 1
CHUNK = 200_000     # frames per BPF_PROG_TEST_RUN call

PROGRAMS = r"""
#include <uapi/linux/bpf.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/in.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/udp.h>

BPF_PERCPU_ARRAY(flood_count, u64, 2);   /* 0: frames made, 1: frames sunk */
struct frame64 { u64 w[8]; };
BPF_ARRAY(flood_frame, struct frame64, 1);  /* the frame, as userspace built it */

/* One frame of the flood: the frame written whole (a page the test run
 * reuses holds what node1 left in it: rewritten addresses, a lower TTL),
 * then the next of FLOWS source ports, the UDP checksum adjusted from the
 * frame's (RFC 1624). */
int mbpf_bench_gen(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data, *end = (void *)(long)ctx->data_end;
	struct udphdr *udp = data + sizeof(struct ethhdr) + sizeof(struct iphdr);
	u64 *words = data;
	u32 k = 0;
	u64 *made = flood_count.lookup(&k);
	struct frame64 *tmpl = flood_frame.lookup(&k);

	if (data + sizeof(*tmpl) > end || !made || !tmpl)
		return XDP_ABORTED;
#pragma unroll
	for (int i = 0; i < 8; i++)
		words[i] = tmpl->w[i];
	u16 port = bpf_htons(BASE_SPORT + (u16)(*made % FLOWS));
	/* The template's own checksum and port (u16 words 20 and 17 of the
	 * frame), not the packet's: no load after the stores to depend on. */
	u16 base_check = ((u16 *)tmpl->w)[20], base_port = ((u16 *)tmpl->w)[17];
	*made += 1;
	u32 sum = (u16)~base_check + (u16)~base_port + port;
	sum = (sum & 0xffff) + (sum >> 16);
	sum = (sum & 0xffff) + (sum >> 16);
	u16 check = ~sum;
	udp->source = port;
	udp->check = check ? check : 0xffff;
	return XDP_TX;
}

/* Counts and drops the flood's frames coming back from node1; all else passes. */
int mbpf_bench_sink(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data, *end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	struct iphdr *ip = data + sizeof(*eth);
	u64 *mark = data + sizeof(*eth) + sizeof(*ip) + sizeof(struct udphdr);
	u32 k = 1;
	u64 *sunk;

	if ((void *)(mark + 1) > end || eth->h_proto != bpf_htons(ETH_P_IP) || ip->ihl != 5 ||
	    ip->protocol != IPPROTO_UDP || *mark != MARK)
		return XDP_PASS;
	sunk = flood_count.lookup(&k);
	if (sunk)
		*sunk += 1;
	return XDP_DROP;
}
"""


def frame(src_mac: str, dst_mac: str, src: str, dst: str, dport: int) -> bytes:
    from scapy.layers.inet import IP, UDP
    from scapy.layers.l2 import Ether
    payload = MARK + bytes(FRAME_LEN - 14 - 20 - 8 - len(MARK))
    pkt = (Ether(src=src_mac, dst=dst_mac) / IP(src=src, dst=dst, ttl=64) /
           UDP(sport=BASE_SPORT, dport=dport) / payload)
    return bytes(pkt)


class Flood:
    """The two programs, loaded once (bench/northsouth.py attaches the sink
    on the router's port); run() floods through node1 and counts what came
    back."""

    def __init__(self, router_ns: str | None = None, port: str = "nd1"):
        """router_ns and port: where run() floods from (the router's veth to
        node1); without them, the programs only (the tests run them alone)."""
        from bcc import BPF

        from meshbpf.datapath.policy import _ipr
        self.router_ns, self.ifindex = router_ns, 0
        if router_ns is not None:
            with _ipr(router_ns) as ipr:
                self.ifindex = ipr.link_lookup(ifname=port)[0]
        self.bpf = BPF(text=PROGRAMS.encode(), cflags=[
            f"-DFLOWS={FLOWS}", f"-DBASE_SPORT={BASE_SPORT}", f"-DMARK={int.from_bytes(MARK, 'little')}ULL"])
        try:
            self.gen_fd = self.bpf.load_func(b"mbpf_bench_gen", BPF.XDP).fd
            self.sink_fd = self.bpf.load_func(b"mbpf_bench_sink", BPF.XDP).fd
        except Exception:
            self.bpf.cleanup()
            raise

    def set_frame(self, pkt: bytes) -> None:
        """The frame the generator writes (FRAME_LEN bytes)."""
        assert len(pkt) == FRAME_LEN
        table = self.bpf[b"flood_frame"]
        table[ct.c_int(0)] = table.Leaf.from_buffer_copy(pkt)

    def sunk(self) -> int:
        return sum(self.bpf[b"flood_count"][ct.c_int(1)])

    def run(self, pkt: bytes, seconds: float, cpu: int | None) -> dict:
        """Floods for about `seconds` from the router's port; frames counted back per second."""
        self.set_frame(pkt)
        before = self.sunk()
        sent, wall = self._generate(len(pkt), seconds, CHUNK, cpu)
        got = self.sunk() - before
        return {"rate": got / wall if wall else 0.0, "count": got, "sent": sent,
                "errors": sent - got, "wall_s": wall}

    def available(self) -> str | None:
        """None if live frames run here (5.18+), else why not (one frame is sent)."""
        try:
            self._generate(FRAME_LEN, 0.0, 1, None)
            return None
        except OSError as exc:
            return f"BPF_PROG_TEST_RUN with live frames: {exc}"

    def _generate(self, size: int, seconds: float, chunk: int, cpu: int | None) -> tuple[int, float]:
        """Runs the generator in chunks from the router's port until `seconds`
        of its calls have passed (at least one call); (frames, seconds)."""
        from pyroute2 import netns
        table = self.bpf[b"flood_frame"]
        data = ct.create_string_buffer(bytes(table[ct.c_int(0)]), size)
        # struct xdp_md: data, data_end, data_meta, ingress_ifindex, rx_queue_index, egress_ifindex
        xdp_md = (ct.c_uint32 * 6)(0, size, 0, self.ifindex, 0, 0)
        affinity = os.sched_getaffinity(0)
        sent, wall = 0, 0.0
        netns.pushns(self.router_ns)
        try:
            try:
                if cpu is not None:
                    os.sched_setaffinity(0, {cpu})
                while sent == 0 or wall < seconds:
                    opts = libbpf._TestRunOpts(sz=ct.sizeof(libbpf._TestRunOpts), data_in=ct.addressof(data),
                                               data_size_in=size, ctx_in=ct.addressof(xdp_md),
                                               ctx_size_in=ct.sizeof(xdp_md), repeat=chunk,
                                               flags=BPF_F_TEST_XDP_LIVE_FRAMES)
                    t0 = time.perf_counter()
                    libbpf._check(libbpf._lib.bpf_prog_test_run_opts(self.gen_fd, ct.byref(opts)),
                                  "BPF_PROG_TEST_RUN")
                    wall += time.perf_counter() - t0
                    sent += chunk
            finally:
                os.sched_setaffinity(0, affinity)
        finally:
            netns.popns()
        return sent, wall

    def close(self) -> None:
        self.bpf.cleanup()
