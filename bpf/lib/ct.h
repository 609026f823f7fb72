/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Conntrack for policy: ONE entry per flow, shared by the endpoints at its
 * two ends. Its key is the flow with its ends in a fixed order (the lower
 * (address, port) first), so a packet and its reply, and the two ends of a
 * pod-to-pod flow on this node, all find the same entry in one lookup; the
 * second end's lookup finds it in cache. Its value says, per end, which
 * pod interface let the flow through, and when it was last seen. A
 * packet passes as known if the interface it is checked on is recorded at
 * its own end (the pod's side: the source of what the pod sends, the
 * destination of what it receives). That is exactly "a flow this endpoint
 * let through, or a reply of one": an interface is one pod's for its whole
 * life (the kernel does not reuse an ifindex soon), so this needs no
 * endpoint lookup, and a departed pod's entries never vouch for a new pod
 * that got its endpoint id.
 *
 * An end is recorded only with an address the pod owns (policy.c checks
 * it first), so a hit at the pod's end also proves the source of what it
 * sends: the anti-spoofing lookup is needed only on a miss.
 *
 * Entries leave only by LRU eviction: no TCP state tracking (see README,
 * "NetworkPolicy datapath"). A TCP SYN is always judged afresh (see
 * enforce() in policy.c). Flows without a handshake that says "new" (UDP,
 * ICMP, ...) expire instead: one idle for more than MBPF_CT_IDLE_S seconds
 * is judged afresh at its next packet, as conntrack times UDP out
 * (nf_conntrack_udp_timeout_stream: 120 s), so a 5-tuple allowed once does
 * not pass a later deny for ever. Its entry then starts over with only the
 * judging end marked: the other end's old mark must not vouch for it.
 *
 * Entries of 0.1.0 (one per endpoint and direction, dir 0 or 1, see
 * ct_legacy_known) are still honoured on a miss, so that an upgrade keeps
 * the established flows they carry; they leave by eviction.
 */
#ifndef MBPF_CT_H
#define MBPF_CT_H

#include "common.h"

#ifndef MBPF_CT_IDLE_S
#define MBPF_CT_IDLE_S 120  /* seconds a non-TCP flow may stay idle */
#endif

/* A packet's flow, as the programs parse it. */
struct mbpf_flow {
	__u8  saddr[MBPF_ADDR_LEN];  /* network order; IPv4 mapped */
	__u8  daddr[MBPF_ADDR_LEN];
	__u16 sport;                 /* network order; 0 without ports */
	__u16 dport;
	__u8  proto;
	__u8  v6;
	__u8  icmp_type;             /* ICMP and ICMPv6 */
	__u8  syn;                   /* 1: TCP SYN without ACK, a connection's first packet */
	__u16 l4_off;                /* where the L4 header starts (ICMP errors quote a packet there) */
};

/* Is (saddr, sport) the lower end of the flow? Any fixed total order will
 * do, as long as both ends and both directions agree on it. */
static __always_inline int ct_src_is_low(const struct mbpf_flow *f)
{
	__u64 s0, s1, d0, d1;

	__builtin_memcpy(&s0, f->saddr, 8);
	__builtin_memcpy(&s1, &f->saddr[8], 8);
	__builtin_memcpy(&d0, f->daddr, 8);
	__builtin_memcpy(&d1, &f->daddr[8], 8);
	if (s1 != d1)  /* the low half first: it differs for IPv4 */
		return s1 < d1;
	if (s0 != d0)
		return s0 < d0;
	return f->sport <= f->dport;
}

/* The flow's shared key; returns the pod's end in it (MBPF_CT_LOW or
 * MBPF_CT_HIGH): the source for dir OUT, the destination for dir IN. */
static __always_inline int ct_key_of(struct mbpf_ct_key *key, const struct mbpf_flow *f, __u8 dir)
{
	int src_low = ct_src_is_low(f);

	if (src_low) {
		__builtin_memcpy(key->saddr, f->saddr, MBPF_ADDR_LEN);
		__builtin_memcpy(key->daddr, f->daddr, MBPF_ADDR_LEN);
		key->sport = f->sport;
		key->dport = f->dport;
	} else {
		__builtin_memcpy(key->saddr, f->daddr, MBPF_ADDR_LEN);
		__builtin_memcpy(key->daddr, f->saddr, MBPF_ADDR_LEN);
		key->sport = f->dport;
		key->dport = f->sport;
	}
	key->proto = f->proto;
	key->dir = MBPF_CT_SHARED;
	return (dir == MBPF_DIR_OUT) == src_low ? MBPF_CT_LOW : MBPF_CT_HIGH;
}

/* 0.1.0's entries: per endpoint and direction, the flow as first seen; a
 * reply is the swapped flow in the other direction. */
static __always_inline void ct_legacy_key_of(struct mbpf_ct_key *key, const struct mbpf_flow *f,
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

static __always_inline int ct_legacy_known(const struct mbpf_flow *f, __u32 ep_id, __u8 dir)
{
	struct mbpf_ct_key key = {};

	ct_legacy_key_of(&key, f, ep_id, dir, 0);
	if (mbpf_ct.lookup(&key))
		return 1;
	ct_legacy_key_of(&key, f, ep_id, dir, 1);
	return mbpf_ct.lookup(&key) != NULL;
}

/* Is the interface recorded at that end? Spelled out per end: an index
 * computed into the value pointer is pointer arithmetic the verifier
 * refuses. */
static __always_inline int ct_marked(const struct mbpf_ct *ct, int end, __u32 ifindex)
{
	if (end == MBPF_CT_LOW)
		return ct->ifindex[MBPF_CT_LOW] == ifindex;
	return ct->ifindex[MBPF_CT_HIGH] == ifindex;
}

static __always_inline void ct_mark(struct mbpf_ct *ct, int end, __u32 ifindex)
{
	if (end == MBPF_CT_LOW)
		ct->ifindex[MBPF_CT_LOW] = ifindex;
	else
		ct->ifindex[MBPF_CT_HIGH] = ifindex;
}

/* Seconds since boot, plus 2^24 (194 days): the build before idle timeouts
 * kept small endpoint ids where seen_s is, and those must read as long idle
 * even on a node that booted a minute ago. Wraps after 136 years. */
#define MBPF_CT_EPOCH_S (1U << 24)

static __always_inline __u32 ct_now_s(void)
{
	return bpf_ktime_get_ns() / 1000000000ULL + MBPF_CT_EPOCH_S;
}

/* TCP flows never expire here (a SYN is judged afresh instead); others do. */
static __always_inline int ct_idle_expired(const struct mbpf_flow *f, __u32 seen_s, __u32 now_s)
{
	return f->proto != IPPROTO_TCP && now_s - seen_s > MBPF_CT_IDLE_S;
}

/* Is this packet part of a flow the pod behind this interface already let
 * through (a shared entry marked at the pod's end), and not idle too long?
 * A non-TCP hit notes the time, at most once a second per flow. */
static __always_inline int ct_known(const struct mbpf_flow *f, __u32 ifindex, __u8 dir)
{
	struct mbpf_ct_key key = {};
	struct mbpf_ct *ct;
	int end = ct_key_of(&key, f, dir);
	__u32 now_s, seen_s;

	ct = mbpf_ct.lookup(&key);
	if (!ct || !ct_marked(ct, end, ifindex))
		return 0;
	if (f->proto == IPPROTO_TCP)
		return 1;
	now_s = ct_now_s();
	seen_s = ct->seen_s;  /* read once: the other end may write it */
	if (ct_idle_expired(f, seen_s, now_s))
		return 0;
	if (seen_s != now_s)
		ct->seen_s = now_s;
	return 1;
}

/* Records that the endpoint let the flow through at its end, which must be
 * an address of the pod (see the top). An entry the other end made is
 * written in place, never replaced, so that neither end loses the other's
 * mark. */
static __always_inline void ct_create(const struct mbpf_flow *f, __u32 ifindex, __u8 dir)
{
	struct mbpf_ct_key key = {};
	struct mbpf_ct val = {};
	struct mbpf_ct *ct;
	int end = ct_key_of(&key, f, dir);
	__u32 now_s = ct_now_s();

	val.seen_s = now_s;
	ct_mark(&val, end, ifindex);
	ct = mbpf_ct.lookup(&key);
	if (ct && ct_idle_expired(f, ct->seen_s, now_s)) {
		/* a new flow on an expired entry: the other end judges afresh too
		 * (losing a mark it made meanwhile only costs it a second check) */
		mbpf_ct.update(&key, &val);
		return;
	}
	if (!ct) {
		if (mbpf_ct.insert(&key, &val) == 0)  /* BPF_NOEXIST */
			return;
		ct = mbpf_ct.lookup(&key);  /* the other end (another CPU) made it meanwhile */
		if (!ct)
			return;
	}
	ct_mark(ct, end, ifindex);
	ct->seen_s = now_s;
}

#endif /* MBPF_CT_H */
