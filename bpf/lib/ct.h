/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Conntrack for policy: a flow an endpoint allowed (or saw while it was not
 * isolated) is remembered per endpoint and direction; later packets of it,
 * and its replies (addresses and ports swapped, other direction), pass
 * without a policy lookup. Entries leave only by LRU eviction: no TCP state
 * tracking, no timeouts (see README, "NetworkPolicy datapath"). A TCP SYN
 * is always judged afresh (see enforce() in policy.c).
 */
#ifndef MBPF_CT_H
#define MBPF_CT_H

#include "common.h"

/* A packet's flow, as the programs parse it. */
struct mbpf_flow {
	__u8  saddr[MBPF_ADDR_LEN];  /* network order; IPv4 mapped */
	__u8  daddr[MBPF_ADDR_LEN];
	__u16 sport;                 /* network order; 0 without ports */
	__u16 dport;
	__u8  proto;
	__u8  v6;
	__u8  icmp_type;             /* ICMPv6 only */
	__u8  syn;                   /* 1: TCP SYN without ACK, a connection's first packet */
};

static __always_inline void ct_key_of(struct mbpf_ct_key *key, const struct mbpf_flow *f,
				      __u32 ep_id, __u8 dir, int reply)
{
	if (reply) {
		__builtin_memcpy(key->saddr, f->daddr, MBPF_ADDR_LEN);
		__builtin_memcpy(key->daddr, f->saddr, MBPF_ADDR_LEN);
		key->sport = f->dport;
		key->dport = f->sport;
		key->dir = dir ^ 1;
	} else {
		__builtin_memcpy(key->saddr, f->saddr, MBPF_ADDR_LEN);
		__builtin_memcpy(key->daddr, f->daddr, MBPF_ADDR_LEN);
		key->sport = f->sport;
		key->dport = f->dport;
		key->dir = dir;
	}
	key->ep_id = ep_id;
	key->proto = f->proto;
}

/* Is this packet part of a flow the endpoint already let through? */
static __always_inline int ct_known(const struct mbpf_flow *f, __u32 ep_id, __u8 dir)
{
	struct mbpf_ct_key key = {};

	ct_key_of(&key, f, ep_id, dir, 0);
	if (mbpf_ct.lookup(&key))
		return 1;
	ct_key_of(&key, f, ep_id, dir, 1);
	return mbpf_ct.lookup(&key) != NULL;
}

static __always_inline void ct_create(const struct mbpf_flow *f, __u32 ep_id, __u8 dir,
				      __u32 rule)
{
	struct mbpf_ct_key key = {};
	struct mbpf_ct val = {};

	ct_key_of(&key, f, ep_id, dir, 0);
	val.created_ns = bpf_ktime_get_ns();
	val.rule = rule;
	if (f->syn)
		mbpf_ct.update(&key, &val);  /* a new connection on an old flow's ports: its rule now */
	else
		mbpf_ct.insert(&key, &val);  /* BPF_NOEXIST: a racing packet of the same flow keeps the first */
}

#endif /* MBPF_CT_H */
