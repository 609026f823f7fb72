/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Sidecar capture, inbound from other nodes (issue 11): tc programs on a
 * meshed pod's own interface, inside the pod's netns. A connection from
 * anywhere the connect hooks do not run (another node, the router, a host
 * process outside the agent's cgroup) arrives with its real destination
 * port. As istio-iptables' REDIRECT does, its port is translated to the
 * proxy's inbound port on the way in (mbpf_cap_tc_in, clsact ingress) and
 * back on the way out (mbpf_cap_tc_out, clsact egress); addresses stay.
 *
 * The record of a translated connection is its mbpf_cap_pair entry, keyed
 * by the tuple the proxy's accepted socket has (the client, the pod's
 * address on the inbound port), dir MBPF_CAP_DIR_IN_NAT: the same key the
 * getsockopt and getsockname programs already answer SO_ORIGINAL_DST and
 * getsockname() from. A SYN to a captured port makes it; later packets
 * are translated only if their connection has one, so connections that
 * were not translated (made before capture, to excluded ports, or steered
 * at connect() already, whose records are dir MBPF_DIR_IN) pass untouched.
 *
 * Why translate rather than bpf_sk_assign() the SYN to the proxy's
 * listener (no NAT): a SYN whose tuple has a TIME_WAIT socket (the proxy
 * closes first, the client reuses its port) is then dropped silently by
 * the kernel's duplicate request check (seen on 6.18: about 1 in 500
 * connections under load), and before 6.5 bpf_sk_assign() refuses
 * SO_REUSEPORT listeners, which Envoy and HAProxy use.
 */
#include <uapi/linux/bpf.h>
#include <uapi/linux/pkt_cls.h>

#include "lib/common.h"
#include "lib/compat.h"
#include "lib/addr.h"
#include "lib/capture_maps.h"
#include "lib/capture.h"
#ifdef MBPF_LB_EVENTS
#include "lib/policy_events.h"
#endif

#define ETH_HLEN_ 14
#define ETH_P_IPV4_ 0x0800
#define ETH_P_IPV6_ 0x86DD
#define TCP_FLAG_SYN_ 0x02
#define TCP_FLAG_ACK_ 0x10
#define TCP_CSUM_OFF 16

/* A TCP packet's addresses, ports and flags as they cross the interface. */
struct cap_pkt {
	__u8  src[MBPF_ADDR_LEN];  /* network order, IPv4 mapped */
	__u8  dst[MBPF_ADDR_LEN];
	__u16 sport;               /* network order */
	__u16 dport;
	__u32 l4_off;
	__u8  flags;
};

/* Fills p from a TCP packet; 0 if it is anything else. IPv4 fragments after
 * the first have no ports (never captured); IPv6 extension headers are not
 * walked (a TCP packet of a pod carries none in practice). */
static __always_inline int read_tcp(struct __sk_buff *skb, struct cap_pkt *p)
{
	__u16 proto;
	__u8 l4[14];
	__u32 *s = (__u32 *)p->src, *d = (__u32 *)p->dst;

	if (bpf_skb_load_bytes(skb, 12, &proto, sizeof(proto)) < 0)
		return 0;
	if (proto == bpf_htons(ETH_P_IPV4_)) {
		__u8 ip[20];

		if (bpf_skb_load_bytes(skb, ETH_HLEN_, ip, sizeof(ip)) < 0)
			return 0;
		if (ip[9] != MBPF_IPPROTO_TCP || ((ip[6] & 0x1f) | ip[7]))
			return 0;
		p->l4_off = ETH_HLEN_ + (ip[0] & 0x0f) * 4;
		s[2] = d[2] = bpf_htonl(0x0000ffff);
		__builtin_memcpy(&s[3], &ip[12], 4);
		__builtin_memcpy(&d[3], &ip[16], 4);
	} else if (proto == bpf_htons(ETH_P_IPV6_)) {
		__u8 ip6[40];

		if (bpf_skb_load_bytes(skb, ETH_HLEN_, ip6, sizeof(ip6)) < 0)
			return 0;
		if (ip6[6] != MBPF_IPPROTO_TCP)
			return 0;
		p->l4_off = ETH_HLEN_ + 40;
		__builtin_memcpy(p->src, &ip6[8], 16);
		__builtin_memcpy(p->dst, &ip6[24], 16);
	} else {
		return 0;
	}
	if (bpf_skb_load_bytes(skb, p->l4_off, l4, sizeof(l4)) < 0)
		return 0;
	__builtin_memcpy(&p->sport, &l4[0], 2);
	__builtin_memcpy(&p->dport, &l4[2], 2);
	p->flags = l4[13];
	return 1;
}

/* The meshed pod at addr with inbound capture on, or NULL; *cg_out gets
 * its cgroup id (the mbpf_cap_pod key). */
static __always_inline struct mbpf_cap_pod *cap_pod_at(const __u8 *addr, __u64 *cg_out)
{
	struct mbpf_ep_addr key = {};
	struct mbpf_cap_pod *p;
	__u64 *cgp;
	__u64 cg;

	__builtin_memcpy(key.addr, addr, MBPF_ADDR_LEN);
	cgp = mbpf_cap_addr.lookup(&key);
	if (!cgp)
		return 0;
	cg = *cgp;
	p = mbpf_cap_pod.lookup(&cg);
	if (!p || !(p->flags & MBPF_CAP_F_INBOUND))
		return 0;
	*cg_out = cg;
	return p;
}

/* Whether a new connection to this port of pod p goes to its proxy. */
static __always_inline int cap_in_port_captured(struct mbpf_cap_pod *p, __u16 port)
{
	__u8 flags = p->flags;
	int verdict;

	if (port == p->in_port || port == p->out_port)
		return 0;  /* already at the proxy (steered at connect()), or its own port */
	verdict = cap_port_verdict(p->pod_id, port, MBPF_DIR_IN);
	/* not counted as skipped: a same-node client's connect() already was */
	return (flags & MBPF_CAP_F_IN_ALL) ? verdict != MBPF_CAP_EXCLUDE : verdict == MBPF_CAP_INCLUDE;
}

/* Rewrites the TCP port at offset `at` (0: source, 2: destination) and the
 * checksum (ports are not in the pseudo header). */
static __always_inline int set_port(struct __sk_buff *skb, __u32 l4_off, __u32 at,
				    __u16 from, __u16 to)
{
	if (bpf_l4_csum_replace(skb, l4_off + TCP_CSUM_OFF, from, to, sizeof(to)) < 0)
		return -1;
	return bpf_skb_store_bytes(skb, l4_off + at, &to, sizeof(to), 0);
}

/* One event for `meshbpf monitor` per SYN turned to the proxy, only while
 * a reader listens (policy_events.h): nobody listening costs a captured
 * connection one array lookup, others nothing. The client is the packet's
 * source: no task runs this. */
static __always_inline void cap_tc_event(const struct cap_pkt *pkt, __u16 to_port, __u64 pod_cg)
{
#ifdef MBPF_LB_EVENTS
	struct mbpf_cap_event ev = {};

	if (!events_wanted())
		return;
	ev.ts_ns = bpf_ktime_get_ns();
	__builtin_memcpy(ev.orig_addr, pkt->dst, MBPF_ADDR_LEN);
	__builtin_memcpy(ev.to_addr, pkt->dst, MBPF_ADDR_LEN);  /* addresses stay */
	__builtin_memcpy(ev.peer_addr, pkt->src, MBPF_ADDR_LEN);
	ev.orig_port = pkt->dport;
	ev.to_port = to_port;
	ev.peer_port = pkt->sport;
	ev.pod_cg = pod_cg;
	ev.proto = MBPF_IPPROTO_TCP;
	ev.hook = MBPF_CAP_EV_TC;
	ev.decision = MBPF_CAP_EV_INBOUND;
	ev.kind = MBPF_EV_KIND_CAP;
	mbpf_events.ringbuf_output(&ev, sizeof(ev), 0);  /* full: the event is lost, the packet not */
#endif
}

/* attaches to the clsact ingress of a meshed pod's interface, in its netns:
 * what the pod receives */
int mbpf_cap_tc_in(struct __sk_buff *skb)
{
	struct mbpf_cap_pair_key key = {};
	struct mbpf_cap_orig orig = {};
	struct mbpf_cap_orig *o;
	struct mbpf_cap_pod *p;
	struct cap_pkt pkt = {};
	__u16 in_port;
	__u64 pod_cg = 0;

	if (!cap_enabled() || !read_tcp(skb, &pkt))
		return TC_ACT_OK;
	p = cap_pod_at(pkt.dst, &pod_cg);
	if (!p)
		return TC_ACT_OK;
	in_port = bpf_htons(p->in_port);
	__builtin_memcpy(key.peer, pkt.src, MBPF_ADDR_LEN);
	__builtin_memcpy(key.local, pkt.dst, MBPF_ADDR_LEN);
	key.peer_port = pkt.sport;
	key.local_port = in_port;
	if ((pkt.flags & (TCP_FLAG_SYN_ | TCP_FLAG_ACK_)) == TCP_FLAG_SYN_) {
		/* A new connection: the proxy's if its port is captured. */
		if (!cap_in_port_captured(p, bpf_ntohs(pkt.dport))) {
			/* One straight to the inbound port must not inherit a
			 * translated connection's record left on its tuple: its
			 * answers would leave from the wrong port. */
			o = pkt.dport == in_port ? mbpf_cap_pair.lookup(&key) : 0;
			if (o && o->dir == MBPF_CAP_DIR_IN_NAT)
				mbpf_cap_pair.delete(&key);
			return TC_ACT_OK;
		}
		__builtin_memcpy(orig.addr, pkt.dst, MBPF_ADDR_LEN);
		orig.port = pkt.dport;
		orig.dir = MBPF_CAP_DIR_IN_NAT;
		mbpf_cap_pair.update(&key, &orig);
		cap_count(MBPF_CAP_IN);
		cap_tc_event(&pkt, in_port, pod_cg);
	} else {
		/* Later packets: only those of a connection translated at its SYN. */
		o = mbpf_cap_pair.lookup(&key);
		if (!o || o->dir != MBPF_CAP_DIR_IN_NAT || o->port != pkt.dport)
			return TC_ACT_OK;
	}
	if (set_port(skb, pkt.l4_off, 2, pkt.dport, in_port) < 0)
		return TC_ACT_SHOT;  /* half-translated: never deliver it */
	return TC_ACT_OK;
}

/* attaches to the clsact egress of a meshed pod's interface, in its netns:
 * what the pod sends. The proxy's answers on a translated connection leave
 * from the port the client asked for. */
int mbpf_cap_tc_out(struct __sk_buff *skb)
{
	struct mbpf_cap_pair_key key = {};
	struct mbpf_cap_orig *o;
	struct mbpf_cap_pod *p;
	struct cap_pkt pkt = {};
	__u16 to;
	__u64 pod_cg;

	if (!cap_enabled() || !read_tcp(skb, &pkt))
		return TC_ACT_OK;
	p = cap_pod_at(pkt.src, &pod_cg);
	if (!p || pkt.sport != bpf_htons(p->in_port))
		return TC_ACT_OK;
	__builtin_memcpy(key.peer, pkt.dst, MBPF_ADDR_LEN);
	__builtin_memcpy(key.local, pkt.src, MBPF_ADDR_LEN);
	key.peer_port = pkt.dport;
	key.local_port = pkt.sport;
	o = mbpf_cap_pair.lookup(&key);
	if (!o || o->dir != MBPF_CAP_DIR_IN_NAT)
		return TC_ACT_OK;  /* steered at connect(): the client asked for this port */
	to = o->port;
	if (set_port(skb, pkt.l4_off, 0, pkt.sport, to) < 0)
		return TC_ACT_SHOT;
	return TC_ACT_OK;
}
