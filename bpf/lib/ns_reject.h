/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * A Service without endpoints answers like kube-proxy's REJECT, never with
 * silence: the packet is turned around in place (shrunk or grown to the
 * answer's size) into a TCP RST, or for UDP an ICMP / ICMPv6 port
 * unreachable from the address the client tried, and sent back out of the
 * device it came in on, to the neighbour it came from.
 */
#ifndef MBPF_NS_REJECT_H
#define MBPF_NS_REJECT_H

#include "ns_pkt.h"

struct ns_tcphdr {
	__be16 sport;
	__be16 dport;
	__be32 seq;
	__be32 ack;
	__u8   doff;      /* data offset in the high 4 bits */
	__u8   flags;
	__be16 window;
	__be16 csum;
	__be16 urg;
};

/* ICMP / ICMPv6 error: header, then as much of the offending packet as
 * fits (its IP header and the first 8 bytes of its payload). */
struct ns_icmp4 {
	__u8   type;
	__u8   code;
	__be16 csum;
	__u32  unused;
	__u8   data[20 + 8];
};

struct ns_icmp6 {
	__u8   type;
	__u8   code;
	__be16 csum;
	__u32  unused;
	__u8   data[40 + 8];
};

/* The pseudo-header of IPv6 (and, in its first 12 bytes' shape, IPv4). */
struct ns_pseudo6 {
	__u8   saddr[16];
	__u8   daddr[16];
	__be32 len;
	__u8   zero[3];
	__u8   next;
};

struct ns_pseudo4 {
	__be32 saddr;
	__be32 daddr;
	__u8   zero;
	__u8   proto;
	__be16 len;
};

static __always_inline __u16 ns_fold(__s64 sum)
{
	__u32 c = (__u32)sum;

	c = (c & 0xffff) + (c >> 16);
	c = (c & 0xffff) + (c >> 16);
	return (__u16)~c;
}

/* The answer is built here, not on the stack: with the translation's own
 * variables it would not fit the 512 bytes (bcc inlines everything). */
struct ns_scratch {
	union {
		struct ns_pseudo6 ph6;
		struct ns_pseudo4 ph4;
	};
	union {
		struct ns_icmp6 ic6;
		struct ns_icmp4 ic4;
		struct ns_tcphdr rst;
	};
	struct ns_tcphdr th;
	union {
		struct ipv6hdr ip6;
		struct iphdr ip;
	};
	__u8 eth[NS_ETH_HLEN];
	__u8 swapped[12];
	__u8 pad[2];
};
BPF_PERCPU_ARRAY(mbpf_ns_scratch, struct ns_scratch, 1);

/* L4 checksum over the pseudo-header (addresses of the answer) and len
 * bytes of body (a multiple of 4). */
static __always_inline __u16 ns_l4_csum(struct ns_scratch *s, const struct ns_pkt *p, __u8 proto,
					void *body, __u32 len)
{
	__s64 sum;

	if (p->v6) {
		__builtin_memset(&s->ph6, 0, sizeof(s->ph6));
		__builtin_memcpy(s->ph6.saddr, p->daddr, 16);
		__builtin_memcpy(s->ph6.daddr, p->saddr, 16);
		s->ph6.len = bpf_htonl(len);
		s->ph6.next = proto;
		sum = bpf_csum_diff(NULL, 0, (__be32 *)&s->ph6, sizeof(s->ph6), 0);
	} else {
		__builtin_memset(&s->ph4, 0, sizeof(s->ph4));
		__builtin_memcpy(&s->ph4.saddr, &p->daddr[12], 4);
		__builtin_memcpy(&s->ph4.daddr, &p->saddr[12], 4);
		s->ph4.proto = proto;
		s->ph4.len = bpf_htons(len);
		sum = bpf_csum_diff(NULL, 0, (__be32 *)&s->ph4, sizeof(s->ph4), 0);
	}
	return ns_fold(bpf_csum_diff(NULL, 0, body, len, sum));
}

/* Resize the packet to eth + IP + l4_len, with the MACs swapped and an IP
 * header from the packet's destination back to its source. */
static __always_inline int ns_turn_around(struct __sk_buff *skb, struct ns_scratch *s,
					  const struct ns_pkt *p, __u8 proto, __u32 l4_len)
{
	if (bpf_skb_load_bytes(skb, 0, s->eth, sizeof(s->eth)) < 0)
		return -1;
	__builtin_memcpy(s->swapped, &s->eth[6], 6);
	__builtin_memcpy(&s->swapped[6], s->eth, 6);
	if (p->v6) {
		__builtin_memset(&s->ip6, 0, sizeof(s->ip6));
		if (bpf_skb_change_tail(skb, NS_ETH_HLEN + sizeof(s->ip6) + l4_len, 0) < 0)
			return -1;
		s->ip6.version = 6;
		s->ip6.payload_len = bpf_htons(l4_len);
		s->ip6.nexthdr = proto;
		s->ip6.hop_limit = 64;
		__builtin_memcpy(&s->ip6.saddr, p->daddr, 16);
		__builtin_memcpy(&s->ip6.daddr, p->saddr, 16);
		if (bpf_skb_store_bytes(skb, NS_ETH_HLEN, &s->ip6, sizeof(s->ip6), 0) < 0)
			return -1;
	} else {
		__builtin_memset(&s->ip, 0, sizeof(s->ip));
		if (bpf_skb_change_tail(skb, NS_ETH_HLEN + sizeof(s->ip) + l4_len, 0) < 0)
			return -1;
		s->ip.version = 4;
		s->ip.ihl = 5;
		s->ip.tot_len = bpf_htons(sizeof(s->ip) + l4_len);
		s->ip.ttl = 64;
		s->ip.protocol = proto;
		__builtin_memcpy(&s->ip.saddr, &p->daddr[12], 4);
		__builtin_memcpy(&s->ip.daddr, &p->saddr[12], 4);
		s->ip.check = ns_fold(bpf_csum_diff(NULL, 0, (__be32 *)&s->ip, sizeof(s->ip), 0));
		if (bpf_skb_store_bytes(skb, NS_ETH_HLEN, &s->ip, sizeof(s->ip), 0) < 0)
			return -1;
	}
	return bpf_skb_store_bytes(skb, 0, s->swapped, sizeof(s->swapped), 0);
}

static __always_inline __u32 ns_l3_len(const struct ns_pkt *p)
{
	return p->v6 ? sizeof(struct ipv6hdr) : sizeof(struct iphdr);
}

/* TCP: RST as RFC 793 says (ACK set: seq = its ack; else ACK its segment). */
static __always_inline int ns_reject_tcp(struct __sk_buff *skb, struct ns_scratch *s,
					 const struct ns_pkt *p)
{
	__u16 ip_len;
	__u32 seg;

	if (bpf_skb_load_bytes(skb, p->l4_off, &s->th, sizeof(s->th)) < 0)
		return NS_TC_DROP;
	if (s->th.flags & NS_TCP_RST)
		return NS_TC_DROP;  /* never answer a RST */
	if (bpf_skb_load_bytes(skb, NS_ETH_HLEN + (p->v6 ? 4 : 2), &ip_len, 2) < 0)
		return NS_TC_DROP;
	/* segment length: payload, plus one each for SYN and FIN */
	seg = bpf_ntohs(ip_len) - (p->v6 ? 0 : p->l4_off - NS_ETH_HLEN) - (s->th.doff >> 4) * 4;
	seg += !!(s->th.flags & NS_TCP_SYN) + !!(s->th.flags & NS_TCP_FIN);
	__builtin_memset(&s->rst, 0, sizeof(s->rst));
	s->rst.sport = s->th.dport;
	s->rst.dport = s->th.sport;
	s->rst.doff = 5 << 4;
	if (s->th.flags & NS_TCP_ACK) {
		s->rst.seq = s->th.ack;
		s->rst.flags = NS_TCP_RST;
	} else {
		s->rst.ack = bpf_htonl(bpf_ntohl(s->th.seq) + seg);
		s->rst.flags = NS_TCP_RST | NS_TCP_ACK;
	}
	s->rst.csum = ns_l4_csum(s, p, IPPROTO_TCP, &s->rst, sizeof(s->rst));
	if (ns_turn_around(skb, s, p, IPPROTO_TCP, sizeof(s->rst)) < 0)
		return NS_TC_DROP;
	if (bpf_skb_store_bytes(skb, NS_ETH_HLEN + ns_l3_len(p), &s->rst, sizeof(s->rst), 0) < 0)
		return NS_TC_DROP;
	return bpf_redirect(skb->ifindex, 0);
}

/* UDP: ICMP (type 3 code 3) or ICMPv6 (type 1 code 4) port unreachable. */
static __always_inline int ns_reject_udp(struct __sk_buff *skb, struct ns_scratch *s,
					 const struct ns_pkt *p)
{
	if (p->v6) {
		__builtin_memset(&s->ic6, 0, sizeof(s->ic6));
		s->ic6.type = 1;
		s->ic6.code = 4;
		if (bpf_skb_load_bytes(skb, NS_ETH_HLEN, s->ic6.data, sizeof(s->ic6.data)) < 0)
			return NS_TC_DROP;
		s->ic6.csum = ns_l4_csum(s, p, 58 /* ICMPv6 */, &s->ic6, sizeof(s->ic6));
		if (ns_turn_around(skb, s, p, 58, sizeof(s->ic6)) < 0)
			return NS_TC_DROP;
		if (bpf_skb_store_bytes(skb, NS_ETH_HLEN + sizeof(struct ipv6hdr), &s->ic6,
					sizeof(s->ic6), 0) < 0)
			return NS_TC_DROP;
	} else {
		if (!p->ihl5)
			return NS_TC_DROP;  /* options: the quoted header would not fit */
		__builtin_memset(&s->ic4, 0, sizeof(s->ic4));
		s->ic4.type = 3;
		s->ic4.code = 3;
		if (bpf_skb_load_bytes(skb, NS_ETH_HLEN, s->ic4.data, sizeof(s->ic4.data)) < 0)
			return NS_TC_DROP;
		s->ic4.csum = ns_fold(bpf_csum_diff(NULL, 0, (__be32 *)&s->ic4, sizeof(s->ic4), 0));
		if (ns_turn_around(skb, s, p, IPPROTO_ICMP, sizeof(s->ic4)) < 0)
			return NS_TC_DROP;
		if (bpf_skb_store_bytes(skb, NS_ETH_HLEN + sizeof(struct iphdr), &s->ic4,
					sizeof(s->ic4), 0) < 0)
			return NS_TC_DROP;
	}
	return bpf_redirect(skb->ifindex, 0);
}

static __always_inline int ns_reject(struct __sk_buff *skb, const struct ns_pkt *p)
{
	__u32 zero = 0;
	struct ns_scratch *s = mbpf_ns_scratch.lookup(&zero);

	if (!s)
		return NS_TC_DROP;
	return p->proto == IPPROTO_TCP ? ns_reject_tcp(skb, s, p) : ns_reject_udp(skb, s, p);
}

#endif /* MBPF_NS_REJECT_H */
