/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * NetworkPolicy packet logic shared by both tc programs: header parsing,
 * anti-spoofing, and the rule lookup (peer map, then port map).
 *
 * Headers are read straight from the skb's linear data when they are there
 * (the usual case: no helper call per field), else with bpf_skb_load_bytes,
 * which copes with non-linear skbs (see load()).
 */
#ifndef MBPF_POLICY_H
#define MBPF_POLICY_H

#include "common.h"
#include "ct.h"
#include "policy_events.h"

#define MBPF_ETH_HLEN     14
#define MBPF_ETH_P_IP     0x0800
#define MBPF_ETH_P_IPV6   0x86DD
#define MBPF_IPPROTO_ICMP   1
#define MBPF_IPPROTO_ICMPV6 58
#define MBPF_NEXTHDR_HOP    0
#define MBPF_NEXTHDR_ROUTING 43
#define MBPF_NEXTHDR_FRAG   44
#define MBPF_NEXTHDR_DEST   60
#define MBPF_V6_EXT_MAX     4   /* extension headers walked before giving up */

/* parse() results */
#define MBPF_PARSE_OK        0
#define MBPF_PARSE_NOT_IP    1  /* ARP and friends: not policy's business */
#define MBPF_PARSE_BAD       2  /* headers cut short or nonsense */

/* TC_ACT_UNSPEC, not TC_ACT_OK: a pass lets the filters after ours (a CNI's)
 * run too; with none left the packet goes on as usual. */
#define MBPF_TC_PASS  (-1)
#define MBPF_TC_DROP  2        /* TC_ACT_SHOT */

static __always_inline void pol_count(__u32 idx)
{
	__u64 *n = mbpf_pol_stats.lookup(&idx);

	if (n)
		*n += 1;  /* per-CPU slot: no atomics needed */
}

/* One event, only while a reader has set mbpf_pol_cfg.events: nobody
 * listening costs one array lookup per new flow or drop. */
static __always_inline void pol_event(struct __sk_buff *skb, const struct mbpf_flow *f,
				      __u32 ep_id, __u8 dir, __u8 verdict, __u32 rule)
{
#ifdef MBPF_HAVE_RINGBUF
	struct mbpf_pol_event ev = {};

	if (!events_wanted())
		return;
	ev.ts_ns = bpf_ktime_get_ns();
	__builtin_memcpy(ev.saddr, f->saddr, MBPF_ADDR_LEN);
	__builtin_memcpy(ev.daddr, f->daddr, MBPF_ADDR_LEN);
	ev.sport = f->sport;
	ev.dport = f->dport;
	ev.ep_id = ep_id;
	ev.rule = rule;
	ev.ifindex = skb->ifindex;
	ev.proto = f->proto;
	ev.dir = dir;
	ev.verdict = verdict;
	ev.kind = MBPF_EV_KIND_POLICY;
	mbpf_events.ringbuf_output(&ev, sizeof(ev), 0);  /* full: the event is lost, the packet not */
#endif
}

#define MBPF_DIRECT_MAX_OFF 256  /* bounds the offset for the verifier; deeper: the helper */

/* len bytes at off into to; 0 on success. len is a constant at every call. */
static __always_inline int load(struct __sk_buff *skb, __u32 off, void *to, __u32 len)
{
	void *data = (void *)(long)skb->data;
	void *end = (void *)(long)skb->data_end;

	if (off <= MBPF_DIRECT_MAX_OFF) {
		__u32 o = off;

		/* The mask is a no-op at run time. It is here for older
		 * verifiers (5.10, 6.1): clang may add len to a copy of off
		 * made before the test above, and those verifiers do not carry
		 * the test's bound to the copy, so the packet range check
		 * below would not count. The asm keeps clang from dropping the
		 * mask and bounds the very register the check uses. */
		asm volatile("%0 &= 511" : "+r"(o));
		if (data + o + len <= end) {
			__builtin_memcpy(to, data + o, len);
			return 0;
		}
	}
	return bpf_skb_load_bytes(skb, off, to, len);
}

static __always_inline int has_ports(__u8 proto)
{
	return proto == IPPROTO_TCP || proto == IPPROTO_UDP || proto == IPPROTO_SCTP;
}

/* Reads the ports (or the ICMPv6 type) at off. first_frag: 0 for a
 * non-first fragment, whose payload holds no L4 header (ports stay 0). */
static __always_inline int parse_l4(struct __sk_buff *skb, __u32 off, int first_frag,
				    struct mbpf_flow *f)
{
	__u16 ports[2];

	if (!first_frag)
		return MBPF_PARSE_OK;
	f->l4_off = off;
	if (has_ports(f->proto)) {
		if (load(skb, off, ports, sizeof(ports)) < 0)
			return MBPF_PARSE_BAD;
		f->sport = ports[0];
		f->dport = ports[1];
		if (f->proto == IPPROTO_TCP) {
			__u8 flags;  /* byte 13 of the TCP header: CWR ECE URG ACK PSH RST SYN FIN */

			if (load(skb, off + 13, &flags, 1) < 0)
				return MBPF_PARSE_BAD;
			f->syn = (flags & 0x12) == 0x02;
		}
	} else if (f->proto == MBPF_IPPROTO_ICMPV6 || f->proto == MBPF_IPPROTO_ICMP) {
		if (load(skb, off, &f->icmp_type, 1) < 0)
			return MBPF_PARSE_BAD;
	}
	return MBPF_PARSE_OK;
}

static __always_inline int parse_v4(struct __sk_buff *skb, struct mbpf_flow *f)
{
	struct iphdr ip;
	__u32 hlen;

	if (load(skb, MBPF_ETH_HLEN, &ip, sizeof(ip)) < 0)
		return MBPF_PARSE_BAD;
	hlen = ip.ihl * 4;
	if (ip.version != 4 || hlen < sizeof(ip))
		return MBPF_PARSE_BAD;
	__builtin_memset(f->saddr, 0, 10);
	f->saddr[10] = 0xff;
	f->saddr[11] = 0xff;
	__builtin_memcpy(&f->saddr[12], &ip.saddr, 4);
	__builtin_memset(f->daddr, 0, 10);
	f->daddr[10] = 0xff;
	f->daddr[11] = 0xff;
	__builtin_memcpy(&f->daddr[12], &ip.daddr, 4);
	f->proto = ip.protocol;
	/* fragment offset (low 13 bits) non-zero: not the first fragment */
	return parse_l4(skb, MBPF_ETH_HLEN + hlen, !(ip.frag_off & bpf_htons(0x1FFF)), f);
}

static __always_inline int parse_v6(struct __sk_buff *skb, struct mbpf_flow *f)
{
	struct ipv6hdr ip6;
	__u8 ext[2];     /* next header, length in 8-byte units beyond the first 8 */
	__u16 frag_off;  /* network order; the fragment header's offset field */
	__u32 off = MBPF_ETH_HLEN + sizeof(ip6);
	__u8 next;
	int first_frag = 1;

	if (load(skb, MBPF_ETH_HLEN, &ip6, sizeof(ip6)) < 0)
		return MBPF_PARSE_BAD;
	if (ip6.version != 6)
		return MBPF_PARSE_BAD;
	__builtin_memcpy(f->saddr, &ip6.saddr, MBPF_ADDR_LEN);
	__builtin_memcpy(f->daddr, &ip6.daddr, MBPF_ADDR_LEN);
	next = ip6.nexthdr;
#pragma unroll
	for (int i = 0; i < MBPF_V6_EXT_MAX; i++) {
		if (next != MBPF_NEXTHDR_HOP && next != MBPF_NEXTHDR_ROUTING &&
		    next != MBPF_NEXTHDR_DEST && next != MBPF_NEXTHDR_FRAG)
			break;
		if (load(skb, off, ext, sizeof(ext)) < 0)
			return MBPF_PARSE_BAD;
		if (next == MBPF_NEXTHDR_FRAG) {
			if (load(skb, off + 2, &frag_off, sizeof(frag_off)) < 0)
				return MBPF_PARSE_BAD;
			if (frag_off & bpf_htons(0xFFF8))
				first_frag = 0;
			off += 8;
		} else {
			off += (ext[1] + 1) * 8;
		}
		next = ext[0];
	}
	if (next == MBPF_NEXTHDR_HOP || next == MBPF_NEXTHDR_ROUTING ||
	    next == MBPF_NEXTHDR_DEST || next == MBPF_NEXTHDR_FRAG)
		return MBPF_PARSE_BAD;  /* more extension headers than we walk */
	f->proto = next;
	f->v6 = 1;
	return parse_l4(skb, off, first_frag, f);
}

static __always_inline int parse(struct __sk_buff *skb, struct mbpf_flow *f)
{
	if (skb->protocol == bpf_htons(MBPF_ETH_P_IP))
		return parse_v4(skb, f);
	if (skb->protocol == bpf_htons(MBPF_ETH_P_IPV6))
		return parse_v6(skb, f);
	return MBPF_PARSE_NOT_IP;
}

/* ICMPv6 router and neighbour discovery (133-137): needed to reach anyone
 * at all, and never subject to policy (as in every CNI). */
static __always_inline int is_nd(const struct mbpf_flow *f)
{
	return f->v6 && f->proto == MBPF_IPPROTO_ICMPV6 &&
	       f->icmp_type >= 133 && f->icmp_type <= 137;
}

/* An ICMP error (destination unreachable, fragmentation needed / packet
 * too big, time exceeded, parameter problem): it quotes the packet it is
 * about, 8 bytes after its ICMP header starts. */
static __always_inline int is_icmp_error(const struct mbpf_flow *f)
{
	if (f->proto == MBPF_IPPROTO_ICMP && !f->v6)
		return f->icmp_type == 3 || f->icmp_type == 11 || f->icmp_type == 12;
	if (f->proto == MBPF_IPPROTO_ICMPV6 && f->v6)
		return f->icmp_type >= 1 && f->icmp_type <= 4;
	return 0;
}

/* The flow of the packet an ICMP error quotes (its IP header and ports;
 * IPv6 extension headers are not walked). 0 on success. */
static __always_inline int parse_quoted(struct __sk_buff *skb, const struct mbpf_flow *f,
					struct mbpf_flow *q)
{
	__u32 off = f->l4_off + 8;
	__u16 ports[2];

	if (f->v6) {
		struct ipv6hdr ip6;

		if (load(skb, off, &ip6, sizeof(ip6)) < 0 || ip6.version != 6)
			return -1;
		__builtin_memcpy(q->saddr, &ip6.saddr, MBPF_ADDR_LEN);
		__builtin_memcpy(q->daddr, &ip6.daddr, MBPF_ADDR_LEN);
		q->proto = ip6.nexthdr;
		q->v6 = 1;
		off += sizeof(ip6);
	} else {
		struct iphdr ip;

		if (load(skb, off, &ip, sizeof(ip)) < 0 || ip.version != 4 || ip.ihl < 5)
			return -1;
		__builtin_memset(q->saddr, 0, 10);
		q->saddr[10] = 0xff;
		q->saddr[11] = 0xff;
		__builtin_memcpy(&q->saddr[12], &ip.saddr, 4);
		__builtin_memset(q->daddr, 0, 10);
		q->daddr[10] = 0xff;
		q->daddr[11] = 0xff;
		__builtin_memcpy(&q->daddr[12], &ip.daddr, 4);
		q->proto = ip.protocol;
		off += ip.ihl * 4;
	}
	if (!has_ports(q->proto) || load(skb, off, ports, sizeof(ports)) < 0)
		return -1;
	q->sport = ports[0];
	q->dport = ports[1];
	return 0;
}

static __always_inline int addr16_equal(const __u8 *a, const __u8 *b)
{
	__u64 a0, a1, b0, b1;

	__builtin_memcpy(&a0, a, 8);
	__builtin_memcpy(&a1, &a[8], 8);
	__builtin_memcpy(&b0, b, 8);
	__builtin_memcpy(&b1, &b[8], 8);
	return a0 == b0 && a1 == b1;
}

/* Is this ICMP error about a flow the pod let through (conntrack's
 * RELATED)? A UDP port unreachable, or a TCP flow's fragmentation needed,
 * passes where the pod is isolated. The quoted packet went the other way,
 * so the pod's end of that flow is the other side of it; and what the pod
 * sends must come from its own end of the quoted flow (no spoofing through
 * an error: that end was recorded with an address it owns). */
static __always_inline int icmp_error_known(struct __sk_buff *skb, const struct mbpf_flow *f,
					    __u32 ifindex, __u8 dir)
{
	struct mbpf_flow q = {};

	if (parse_quoted(skb, f, &q) < 0)
		return 0;
	if (dir == MBPF_DIR_OUT && !addr16_equal(f->saddr, q.daddr))
		return 0;
	return ct_known(&q, ifindex, dir == MBPF_DIR_OUT ? MBPF_DIR_IN : MBPF_DIR_OUT);
}

/* fe80::/10 or ::, the addresses an IPv6 stack uses before it has its own. */
static __always_inline int v6_local(const struct mbpf_flow *f, const __u8 *addr)
{
	__u64 hi, lo;

	if (!f->v6)
		return 0;
	if (addr[0] == 0xfe && (addr[1] & 0xc0) == 0x80)
		return 1;
	__builtin_memcpy(&hi, addr, 8);
	__builtin_memcpy(&lo, &addr[8], 8);
	return hi == 0 && lo == 0;
}

/* Is addr (the packet's source or destination) the pod's own? Link-local
 * and :: count for ICMPv6 (neighbour discovery and its kin). */
static __always_inline int address_is_own(const struct mbpf_flow *f, const __u8 *addr, __u32 ep_id)
{
	struct mbpf_ep_addr key;
	__u32 *owner;

	if (f->proto == MBPF_IPPROTO_ICMPV6 && v6_local(f, addr))
		return 1;
	__builtin_memcpy(key.addr, addr, MBPF_ADDR_LEN);
	owner = mbpf_pol_epaddr.lookup(&key);
	return owner && *owner == ep_id;
}

/* Does a rule of the endpoint's current generation allow this new flow?
 * *allowed says so; the return value is that rule's id (for conntrack and
 * the monitor), which the planner may leave 0. */
static __always_inline __u32 policy_allows(const struct mbpf_flow *f, const struct mbpf_ep *ep,
					   __u8 dir, int *allowed)
{
	struct mbpf_pol_peer_key pkey = {};
	struct mbpf_pol_port_key portkey = {};
	struct mbpf_pol_peer *peer;
	struct mbpf_pol_port *port;
	__u32 peer_set;

	*allowed = 0;
	pkey.prefixlen = 64 + 128;
	pkey.ep_id = ep->ep_id;
	pkey.gen = ep->gen;
	pkey.dir = dir;
	/* the peer is the destination of what the pod sends, the source of what it receives */
	__builtin_memcpy(pkey.addr, dir == MBPF_DIR_OUT ? f->daddr : f->saddr, MBPF_ADDR_LEN);
	peer = mbpf_pol_peer.lookup(&pkey);
	if (!peer)
		return 0;
	if (peer->flags & MBPF_PEER_F_ANY_PORT) {
		*allowed = 1;
		return peer->rule;
	}
	peer_set = peer->peer_set;  /* copied once: the element may be reused under us */
	if (!has_ports(f->proto))
		return 0;
	portkey.prefixlen = 96 + 16;
	portkey.ep_id = ep->ep_id;
	portkey.gen = ep->gen;
	portkey.dir = dir;
	portkey.proto = f->proto;
	portkey.peer_set = peer_set;
	portkey.port = f->dport;
	port = mbpf_pol_port.lookup(&portkey);
	if (!port)
		return 0;
	*allowed = 1;
	return port->rule;
}

#endif /* MBPF_POLICY_H */
