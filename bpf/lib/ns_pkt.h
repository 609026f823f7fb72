/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * North-south packet handling: parsing a packet's tuple, rewriting an
 * address and port with their checksums, and forwarding a rewritten packet
 * out of the right device (bpf_fib_lookup + bpf_redirect), which a packet
 * whose source is now the node's own address needs: the stack would drop it
 * as a martian source on input.
 */
#ifndef MBPF_NS_PKT_H
#define MBPF_NS_PKT_H

#include "common.h"

#define NS_ETH_HLEN     14
#define NS_ETH_P_IP     0x0800
#define NS_ETH_P_IPV6   0x86DD
#define NS_AF_INET      2
#define NS_AF_INET6     10

/* bcc 0.26 declares the 5.10 form (ifindex, flags); since 5.13 it is
 * (ifindex, params, plen, flags). NULL params in the second argument is the
 * zero flags the 5.10 form wants, so one call serves both. */
static long (*ns_redirect_neigh)(__u32 ifindex, void *params, int plen, __u64 flags) =
	(void *)BPF_FUNC_redirect_neigh;

/* TC_ACT_UNSPEC: the filters after ours (a CNI's) still run. */
#define NS_TC_PASS      (-1)
#define NS_TC_DROP      2   /* TC_ACT_SHOT */

/* ns_parse() results */
#define NS_PARSE_OK     0
#define NS_PARSE_SKIP   1   /* not IPv4/IPv6 TCP/UDP, or a fragment: not ours */
#define NS_PARSE_BAD    2   /* headers cut short */

struct ns_pkt {
	__u8  saddr[MBPF_ADDR_LEN];  /* network order; IPv4 mapped */
	__u8  daddr[MBPF_ADDR_LEN];
	__u16 sport;                 /* network order */
	__u16 dport;
	__u32 l4_off;                /* offset of the TCP/UDP header */
	__u8  proto;
	__u8  v6;
	__u8  tcp_flags;             /* byte 13 of the TCP header */
	__u8  ihl5;                  /* IPv4 without options (or IPv6 without extensions) */
};

#define NS_TCP_FIN 0x01
#define NS_TCP_SYN 0x02
#define NS_TCP_RST 0x04
#define NS_TCP_ACK 0x10

static __always_inline void ns_v4_mapped(__u8 *out, __u32 addr)
{
	__builtin_memset(out, 0, 10);
	out[10] = 0xff;
	out[11] = 0xff;
	__builtin_memcpy(&out[12], &addr, 4);
}

static __always_inline int ns_addr_zero(const __u8 *a)
{
	__u64 hi, lo;

	__builtin_memcpy(&hi, a, 8);
	__builtin_memcpy(&lo, &a[8], 8);
	return hi == 0 && lo == 0;
}

static __always_inline int ns_addr_equal(const __u8 *a, const __u8 *b)
{
	__u64 a0, a1, b0, b1;

	__builtin_memcpy(&a0, a, 8);
	__builtin_memcpy(&a1, &a[8], 8);
	__builtin_memcpy(&b0, b, 8);
	__builtin_memcpy(&b1, &b[8], 8);
	return a0 == b0 && a1 == b1;
}

static __always_inline int ns_parse_l4(struct __sk_buff *skb, struct ns_pkt *p)
{
	__u16 ports[2];

	if (p->proto != IPPROTO_TCP && p->proto != IPPROTO_UDP)
		return NS_PARSE_SKIP;
	if (bpf_skb_load_bytes(skb, p->l4_off, ports, sizeof(ports)) < 0)
		return NS_PARSE_BAD;
	p->sport = ports[0];
	p->dport = ports[1];
	if (p->proto == IPPROTO_TCP &&
	    bpf_skb_load_bytes(skb, p->l4_off + 13, &p->tcp_flags, 1) < 0)
		return NS_PARSE_BAD;
	return NS_PARSE_OK;
}

static __always_inline int ns_parse(struct __sk_buff *skb, struct ns_pkt *p)
{
	if (skb->protocol == bpf_htons(NS_ETH_P_IP)) {
		struct iphdr ip;

		if (bpf_skb_load_bytes(skb, NS_ETH_HLEN, &ip, sizeof(ip)) < 0)
			return NS_PARSE_BAD;
		if (ip.version != 4 || ip.ihl < 5)
			return NS_PARSE_BAD;
		/* any fragment (MF set or an offset): later ones carry no ports */
		if (ip.frag_off & bpf_htons(0x3FFF))
			return NS_PARSE_SKIP;
		ns_v4_mapped(p->saddr, ip.saddr);
		ns_v4_mapped(p->daddr, ip.daddr);
		p->proto = ip.protocol;
		p->l4_off = NS_ETH_HLEN + ip.ihl * 4;
		p->ihl5 = ip.ihl == 5;
		return ns_parse_l4(skb, p);
	}
	if (skb->protocol == bpf_htons(NS_ETH_P_IPV6)) {
		struct ipv6hdr ip6;

		if (bpf_skb_load_bytes(skb, NS_ETH_HLEN, &ip6, sizeof(ip6)) < 0)
			return NS_PARSE_BAD;
		if (ip6.version != 6)
			return NS_PARSE_BAD;
		/* extension headers (fragments among them): not translated */
		__builtin_memcpy(p->saddr, &ip6.saddr, MBPF_ADDR_LEN);
		__builtin_memcpy(p->daddr, &ip6.daddr, MBPF_ADDR_LEN);
		p->proto = ip6.nexthdr;
		p->v6 = 1;
		p->ihl5 = 1;
		p->l4_off = NS_ETH_HLEN + sizeof(ip6);
		return ns_parse_l4(skb, p);
	}
	return NS_PARSE_SKIP;
}

static __always_inline __u32 ns_csum_off(const struct ns_pkt *p)
{
	return p->l4_off + (p->proto == IPPROTO_TCP ? 16 : 6);
}

/* UDP over IPv4 may carry no checksum (0): leave it so; a result of 0 is
 * written as 0xffff. */
static __always_inline __u64 ns_l4_flags(const struct ns_pkt *p)
{
	return p->proto == IPPROTO_UDP ? BPF_F_MARK_MANGLED_0 : 0;
}

/* Rewrite the source (src = 1) or destination address and port of the
 * packet to addr:port, checksums included; *p follows. 0 on success. */
static __always_inline int ns_rewrite(struct __sk_buff *skb, struct ns_pkt *p, int src,
				      const __u8 *addr, __u16 port)
{
	__u8 *old = src ? p->saddr : p->daddr;
	__u16 *old_port = src ? &p->sport : &p->dport;
	__u32 csum_off = ns_csum_off(p);
	__u8 new_addr[MBPF_ADDR_LEN];
	__s64 diff;

	__builtin_memcpy(new_addr, addr, MBPF_ADDR_LEN);
	if (p->v6) {
		diff = bpf_csum_diff((__be32 *)old, 16, (__be32 *)new_addr, 16, 0);
		if (bpf_l4_csum_replace(skb, csum_off, 0, diff, BPF_F_PSEUDO_HDR | ns_l4_flags(p)) < 0)
			return -1;
		if (bpf_skb_store_bytes(skb, NS_ETH_HLEN + (src ? 8 : 24), new_addr, 16, 0) < 0)
			return -1;
	} else {
		diff = bpf_csum_diff((__be32 *)&old[12], 4, (__be32 *)&new_addr[12], 4, 0);
		if (bpf_l4_csum_replace(skb, csum_off, 0, diff, BPF_F_PSEUDO_HDR | ns_l4_flags(p)) < 0)
			return -1;
		if (bpf_l3_csum_replace(skb, NS_ETH_HLEN + 10, 0, diff, 0) < 0)
			return -1;
		if (bpf_skb_store_bytes(skb, NS_ETH_HLEN + (src ? 12 : 16), &new_addr[12], 4, 0) < 0)
			return -1;
	}
	__builtin_memcpy(old, new_addr, MBPF_ADDR_LEN);
	if (port != *old_port) {
		if (bpf_l4_csum_replace(skb, csum_off, *old_port, port, 2 | ns_l4_flags(p)) < 0)
			return -1;
		if (bpf_skb_store_bytes(skb, p->l4_off + (src ? 0 : 2), &port, 2, 0) < 0)
			return -1;
		*old_port = port;
	}
	return 0;
}

/* A router's duty on the path that skips the stack: one hop less; -1 if
 * none is left (the packet is dropped). */
static __always_inline int ns_ttl_dec(struct __sk_buff *skb, const struct ns_pkt *p)
{
	__u8 ttl;

	if (p->v6) {
		if (bpf_skb_load_bytes(skb, NS_ETH_HLEN + 7, &ttl, 1) < 0 || ttl <= 1)
			return -1;
		ttl--;
		return bpf_skb_store_bytes(skb, NS_ETH_HLEN + 7, &ttl, 1, 0);
	}
	if (bpf_skb_load_bytes(skb, NS_ETH_HLEN + 8, &ttl, 1) < 0 || ttl <= 1)
		return -1;
	/* the 16-bit word of TTL and protocol, TTL in its high byte */
	if (bpf_l3_csum_replace(skb, NS_ETH_HLEN + 10, bpf_htons(ttl << 8), bpf_htons((ttl - 1) << 8), 2) < 0)
		return -1;
	ttl--;
	return bpf_skb_store_bytes(skb, NS_ETH_HLEN + 8, &ttl, 1, 0);
}

/* Send the (rewritten) packet on towards its destination as the node's
 * routing table says, from tc ingress, skipping the input checks. With no
 * route (or forwarding off), the stack decides (and likely drops). */
static __always_inline int ns_forward(struct __sk_buff *skb, const struct ns_pkt *p)
{
	struct bpf_fib_lookup fib = {};
	int rc;

	fib.family = p->v6 ? NS_AF_INET6 : NS_AF_INET;
	fib.l4_protocol = p->proto;
	fib.sport = p->sport;
	fib.dport = p->dport;
	fib.ifindex = skb->ifindex;
	if (p->v6) {
		__builtin_memcpy(fib.ipv6_src, p->saddr, 16);
		__builtin_memcpy(fib.ipv6_dst, p->daddr, 16);
	} else {
		__builtin_memcpy(&fib.ipv4_src, &p->saddr[12], 4);
		__builtin_memcpy(&fib.ipv4_dst, &p->daddr[12], 4);
	}
	rc = bpf_fib_lookup(skb, &fib, sizeof(fib), 0);
	if (rc != BPF_FIB_LKUP_RET_SUCCESS && rc != BPF_FIB_LKUP_RET_NO_NEIGH)
		return NS_TC_PASS;
	if (ns_ttl_dec(skb, p) < 0)
		return NS_TC_DROP;
	if (rc == BPF_FIB_LKUP_RET_SUCCESS) {
		__u8 macs[12];

		__builtin_memcpy(macs, fib.dmac, 6);
		__builtin_memcpy(&macs[6], fib.smac, 6);
		if (bpf_skb_store_bytes(skb, 0, macs, sizeof(macs), 0) < 0)
			return NS_TC_DROP;
		return bpf_redirect(fib.ifindex, 0);
	}
	if (rc == BPF_FIB_LKUP_RET_NO_NEIGH)
		return ns_redirect_neigh(fib.ifindex, NULL, 0, 0);  /* 5.10+: resolves it */
	return NS_TC_PASS;
}

/* A flow's hash: the client's address and port, the destination address
 * and port and the protocol (murmur3's mixing), nothing of the node, so
 * every node picks the same Maglev slot for the same flow. */
static __always_inline __u32 ns_mix(__u32 h, __u32 k)
{
	k *= 0xcc9e2d51;
	k = (k << 15) | (k >> 17);
	k *= 0x1b873593;
	h ^= k;
	h = (h << 13) | (h >> 19);
	return h * 5 + 0xe6546b64;
}

static __always_inline __u32 ns_flow_hash(const struct ns_pkt *p)
{
	__u32 w[4], h = 0x6d627066;  /* "mbpf" */

	__builtin_memcpy(w, p->saddr, 16);
	h = ns_mix(h, w[0]);
	h = ns_mix(h, w[1]);
	h = ns_mix(h, w[2]);
	h = ns_mix(h, w[3]);
	__builtin_memcpy(w, p->daddr, 16);
	h = ns_mix(h, w[0]);
	h = ns_mix(h, w[1]);
	h = ns_mix(h, w[2]);
	h = ns_mix(h, w[3]);
	h = ns_mix(h, ((__u32)p->sport << 16) | p->dport);
	h = ns_mix(h, p->proto);
	h ^= h >> 16;
	h *= 0x85ebca6b;
	h ^= h >> 13;
	h *= 0xc2b2ae35;
	h ^= h >> 16;
	return h;
}

#endif /* MBPF_NS_PKT_H */
