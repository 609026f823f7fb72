/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * ICMP errors about translated flows (destination or port unreachable,
 * fragmentation needed / packet too big, time exceeded), translated back
 * like the flow's replies: the quoted packet is what we sent (backend as
 * destination, maybe the SNAT address as source), so its tuple, turned
 * around, is the flow's REV key. The quoted header is rewritten to what the
 * client sent, the error goes to the client, and if the backend itself sent
 * it, it comes from the frontend.
 *
 * Checksums: the outer IPv4 header's; ICMP's over the quoted ports (and
 * for ICMPv6, the quoted addresses and the pseudo-header). The quoted IPv4
 * header's own checksum is updated with its addresses, so together they
 * add nothing to ICMP's. The quoted TCP/UDP checksum is left as it was:
 * a stack matching an error to its socket reads only addresses and ports.
 */
#ifndef MBPF_NS_ICMP_H
#define MBPF_NS_ICMP_H

#include "ns_pkt.h"

#define NS_ICMP_UNREACH     3
#define NS_ICMP_TIME_EXCEED 11
#define NS_ICMP6_UNREACH    1
#define NS_ICMP6_TOO_BIG    2
#define NS_ICMP6_TIME_EXCEED 3
#define NS_IPPROTO_ICMPV6   58

/* The quoted packet inside an ICMP error. */
struct ns_quoted {
	__u8  saddr[MBPF_ADDR_LEN];
	__u8  daddr[MBPF_ADDR_LEN];
	__u16 sport;
	__u16 dport;
	__u32 ip_off;      /* offset of its IP header */
	__u32 l4_off;      /* offset of its TCP/UDP header */
	__u8  proto;
	__u8  pad[3];
};

static __always_inline int ns_is_icmp_error(struct __sk_buff *skb, const struct ns_pkt *p)
{
	__u8 type;

	if (p->proto != (p->v6 ? NS_IPPROTO_ICMPV6 : IPPROTO_ICMP))
		return 0;
	if (bpf_skb_load_bytes(skb, p->l4_off, &type, 1) < 0)
		return 0;
	if (p->v6)
		return type == NS_ICMP6_UNREACH || type == NS_ICMP6_TOO_BIG || type == NS_ICMP6_TIME_EXCEED;
	return type == NS_ICMP_UNREACH || type == NS_ICMP_TIME_EXCEED;
}

/* 0 if the quoted packet is TCP/UDP with its ports there. */
static __always_inline int ns_parse_quoted(struct __sk_buff *skb, const struct ns_pkt *p,
					   struct ns_quoted *q)
{
	__u16 ports[2];

	q->ip_off = p->l4_off + 8;
	if (p->v6) {
		struct ipv6hdr ip6;

		if (bpf_skb_load_bytes(skb, q->ip_off, &ip6, sizeof(ip6)) < 0)
			return -1;
		__builtin_memcpy(q->saddr, &ip6.saddr, 16);
		__builtin_memcpy(q->daddr, &ip6.daddr, 16);
		q->proto = ip6.nexthdr;
		q->l4_off = q->ip_off + sizeof(ip6);
	} else {
		struct iphdr ip;

		if (bpf_skb_load_bytes(skb, q->ip_off, &ip, sizeof(ip)) < 0)
			return -1;
		if (ip.ihl != 5)
			return -1;
		ns_v4_mapped(q->saddr, ip.saddr);
		ns_v4_mapped(q->daddr, ip.daddr);
		q->proto = ip.protocol;
		q->l4_off = q->ip_off + sizeof(ip);
	}
	if (q->proto != IPPROTO_TCP && q->proto != IPPROTO_UDP)
		return -1;
	if (bpf_skb_load_bytes(skb, q->l4_off, ports, sizeof(ports)) < 0)
		return -1;
	q->sport = ports[0];
	q->dport = ports[1];
	return 0;
}

/* An address at off becomes new; old is what is there. Checksums: the
 * 16-bit field at l3_csum_off (0: none) as an IPv4 header's, the one at
 * l4_csum_off with l4_flags (BPF_F_PSEUDO_HDR for an outer address under
 * ICMPv6; 0: none). */
static __always_inline int ns_set_addr(struct __sk_buff *skb, int v6, __u32 off, const __u8 *old,
				       const __u8 *new, __u32 l3_csum_off, __u32 l4_csum_off,
				       __u64 l4_flags)
{
	__u8 o[MBPF_ADDR_LEN], n[MBPF_ADDR_LEN];
	__s64 diff;

	__builtin_memcpy(o, old, MBPF_ADDR_LEN);
	__builtin_memcpy(n, new, MBPF_ADDR_LEN);
	if (v6)
		diff = bpf_csum_diff((__be32 *)o, 16, (__be32 *)n, 16, 0);
	else
		diff = bpf_csum_diff((__be32 *)&o[12], 4, (__be32 *)&n[12], 4, 0);
	if (l4_csum_off && bpf_l4_csum_replace(skb, l4_csum_off, 0, diff, l4_flags) < 0)
		return -1;
	if (l3_csum_off && bpf_l3_csum_replace(skb, l3_csum_off, 0, diff, 0) < 0)
		return -1;
	if (v6)
		return bpf_skb_store_bytes(skb, off, n, 16, 0);
	return bpf_skb_store_bytes(skb, off, &n[12], 4, 0);
}

static __always_inline int ns_set_port(struct __sk_buff *skb, __u32 off, __u16 old, __u16 new,
				       __u32 csum_off)
{
	if (old == new)
		return 0;
	if (bpf_l4_csum_replace(skb, csum_off, old, new, 2) < 0)
		return -1;
	return bpf_skb_store_bytes(skb, off, &new, 2, 0);
}

/* Offsets of a source (src = 1) or destination address in the IP header at ip_off. */
static __always_inline __u32 ns_addr_off(int v6, __u32 ip_off, int src)
{
	if (v6)
		return ip_off + (src ? 8 : 24);
	return ip_off + (src ? 12 : 16);
}

#endif /* MBPF_NS_ICMP_H */
