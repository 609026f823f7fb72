/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * The XDP fast path in front of mbpf_ns_ingress, on the same maps: it
 * translates the common packets (IPv4 without options, IPv6 without
 * extension headers, TCP/UDP) of new flows, known flows and the replies of
 * SNATed flows, and sends the forwarded ones straight back out (XDP_TX)
 * or to another device (XDP_REDIRECT) when the route and neighbour are
 * known. Everything else passes untouched to tc, which decides it the same
 * way (rejects, drops, ICMP errors, unresolved neighbours), so the two
 * paths never disagree: XDP only ever does what tc would do.
 *
 * No checksum helpers here: the fields are updated by hand from
 * bpf_csum_diff, as RFC 1624 says.
 */
#ifndef MBPF_NS_XDP_H
#define MBPF_NS_XDP_H

#include "nodeport.h"

struct ns_xdp_pkt {
	struct ns_pkt p;
	struct iphdr *ip4;
	struct ipv6hdr *ip6;
	__u16 *ports;        /* sport, dport */
	__u16 *l4_csum;
};

static __always_inline int ns_xdp_parse(struct xdp_md *ctx, struct ns_xdp_pkt *x)
{
	void *data = (void *)(long)ctx->data;
	void *end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	void *l4;

	if ((void *)(eth + 1) > end)
		return -1;
	if (eth->h_proto == bpf_htons(NS_ETH_P_IP)) {
		struct iphdr *ip = (void *)(eth + 1);

		if ((void *)(ip + 1) > end || ip->ihl != 5 || (ip->frag_off & bpf_htons(0x3FFF)))
			return -1;
		ns_v4_mapped(x->p.saddr, ip->saddr);
		ns_v4_mapped(x->p.daddr, ip->daddr);
		x->p.proto = ip->protocol;
		x->ip4 = ip;
		l4 = ip + 1;
	} else if (eth->h_proto == bpf_htons(NS_ETH_P_IPV6)) {
		struct ipv6hdr *ip6 = (void *)(eth + 1);

		if ((void *)(ip6 + 1) > end)
			return -1;
		__builtin_memcpy(x->p.saddr, &ip6->saddr, 16);
		__builtin_memcpy(x->p.daddr, &ip6->daddr, 16);
		x->p.proto = ip6->nexthdr;
		x->p.v6 = 1;
		x->ip6 = ip6;
		l4 = ip6 + 1;
	} else {
		return -1;
	}
	x->p.l4_off = l4 - data;
	if (x->p.proto == IPPROTO_TCP) {
		if (l4 + 20 > end)
			return -1;
		x->l4_csum = l4 + 16;
		x->p.tcp_flags = *(__u8 *)(l4 + 13);
	} else if (x->p.proto == IPPROTO_UDP) {
		if (l4 + 8 > end)
			return -1;
		x->l4_csum = l4 + 6;
	} else {
		return -1;
	}
	x->ports = l4;
	x->p.sport = x->ports[0];
	x->p.dport = x->ports[1];
	return 0;
}

/* field = ~(~field + diff), folded (RFC 1624, eqn. 3) */
static __always_inline __u16 ns_csum_apply(__u16 field, __u32 diff)
{
	__u64 sum = (__u16)~field;

	sum += diff;
	sum = (sum & 0xffff) + (sum >> 16);
	sum = (sum & 0xffff) + (sum >> 16);
	sum = (sum & 0xffff) + (sum >> 16);
	return (__u16)~sum;
}

/* Rewrite the packet to saddr:sport -> daddr:dport (16-byte addresses). */
static __always_inline void ns_xdp_rewrite(struct ns_xdp_pkt *x, const __u8 *saddr, __u16 sport,
					   const __u8 *daddr, __u16 dport)
{
	__u8 old[32], new[32];
	__u32 old_ports = ((__u32)x->ports[1] << 16) | x->ports[0];
	__u32 new_ports = ((__u32)dport << 16) | sport;
	__u32 addr_diff, l4_diff;
	int udp0 = x->p.proto == IPPROTO_UDP && *x->l4_csum == 0;

	__builtin_memcpy(old, x->p.saddr, 16);
	__builtin_memcpy(&old[16], x->p.daddr, 16);
	__builtin_memcpy(new, saddr, 16);
	__builtin_memcpy(&new[16], daddr, 16);
	if (x->ip6) {
		addr_diff = bpf_csum_diff((__be32 *)old, 32, (__be32 *)new, 32, 0);
		__builtin_memcpy(&x->ip6->saddr, new, 16);
		__builtin_memcpy(&x->ip6->daddr, &new[16], 16);
		udp0 = 0;  /* mandatory over IPv6 */
	} else {
		__be32 o4[2], n4[2];

		__builtin_memcpy(&o4[0], &old[12], 4);
		__builtin_memcpy(&o4[1], &old[28], 4);
		__builtin_memcpy(&n4[0], &new[12], 4);
		__builtin_memcpy(&n4[1], &new[28], 4);
		addr_diff = bpf_csum_diff(o4, 8, n4, 8, 0);
		if (x->ip4) {
			x->ip4->check = ns_csum_apply(x->ip4->check, addr_diff);
			x->ip4->saddr = n4[0];
			x->ip4->daddr = n4[1];
		}
	}
	l4_diff = bpf_csum_diff(&old_ports, 4, &new_ports, 4, addr_diff);
	if (!udp0) {
		__u16 c = ns_csum_apply(*x->l4_csum, l4_diff);

		*x->l4_csum = (c == 0 && x->p.proto == IPPROTO_UDP) ? 0xffff : c;
	}
	x->ports[0] = sport;
	x->ports[1] = dport;
	__builtin_memcpy(x->p.saddr, saddr, 16);
	__builtin_memcpy(x->p.daddr, daddr, 16);
	x->p.sport = sport;
	x->p.dport = dport;
}

/* One hop less on the path that skips the stack; -1: none left. */
static __always_inline int ns_xdp_ttl_dec(struct ns_xdp_pkt *x)
{
	if (x->ip6) {
		if (x->ip6->hop_limit <= 1)
			return -1;
		x->ip6->hop_limit--;
		return 0;
	}
	if (!x->ip4 || x->ip4->ttl <= 1)
		return -1;
	{
		/* the 16-bit word of TTL and protocol, as stored (one's
		 * complement sums do not care for byte order) */
		__u16 *word = (__u16 *)&x->ip4->ttl;
		__u16 old = *word;
		__u32 sum;

		x->ip4->ttl--;
		sum = (__u16)~x->ip4->check + (__u16)~old + *word;
		sum = (sum & 0xffff) + (sum >> 16);
		sum = (sum & 0xffff) + (sum >> 16);
		x->ip4->check = (__u16)~sum;
	}
	return 0;
}

/* Route and neighbour of a forwarded packet's new addresses (and p's
 * ports and protocol), known now? */
static __always_inline int ns_xdp_fib_tuple(struct xdp_md *ctx, const struct ns_pkt *p,
					    const __u8 *saddr, const __u8 *daddr,
					    struct bpf_fib_lookup *fib)
{
	fib->family = p->v6 ? NS_AF_INET6 : NS_AF_INET;
	fib->l4_protocol = p->proto;
	fib->sport = p->sport;
	fib->dport = p->dport;
	fib->ifindex = ctx->ingress_ifindex;
	if (p->v6) {
		__builtin_memcpy(fib->ipv6_src, saddr, 16);
		__builtin_memcpy(fib->ipv6_dst, daddr, 16);
	} else {
		__builtin_memcpy(&fib->ipv4_src, &saddr[12], 4);
		__builtin_memcpy(&fib->ipv4_dst, &daddr[12], 4);
	}
	return bpf_fib_lookup(ctx, fib, sizeof(*fib), 0) == BPF_FIB_LKUP_RET_SUCCESS;
}

#endif /* MBPF_NS_XDP_H */
