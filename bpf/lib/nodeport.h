/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * North-south translation: connection tracking first, the frontend's Maglev
 * table second.
 *
 * A new flow (client -> frontend) gets its backend from the table, a DNAT
 * to it and, for a backend on another node of a Cluster service, an SNAT to
 * the node's address, so the reply comes back through this node. Two
 * conntrack entries remember the flow: FWD under the client's tuple (later
 * packets keep their backend even when the table changes) and REV under the
 * reply's tuple (the reply is translated back). The REV entry is written
 * first and, with SNAT, only if its tuple is free (BPF_NOEXIST) and no
 * socket of the node owns it: that is how an SNAT port is claimed, from the
 * SNAT range (cfg), a few tries from the flow's hash.
 */
#ifndef MBPF_NODEPORT_H
#define MBPF_NODEPORT_H

#include "common.h"
#include "addr.h"
#include "ns_pkt.h"
#include "ns_reject.h"
#include "ns_icmp.h"

/* SNAT ports: cfg->snat_port_min..max, reserved on the node for this
 * (net.ipv4.ip_local_reserved_ports: the node's own connections take none
 * of them), or this default. A new flow tries up to NS_SNAT_PORT_TRIES of
 * them, the first at its hash, then NS_SNAT_PORT_STRIDE on (a prime: the
 * tries differ for any span up to 65535 that it does not divide). Mirrored
 * by meshbpf/reconcile/northsouth_keys.py (snat_port_tries). */
#define NS_SNAT_PORT_TRIES   8
#define NS_SNAT_PORT_STRIDE  7919
#define NS_SNAT_PORT_MIN     61000
#define NS_SNAT_PORT_MAX     65535

/* A flow whose reply tuple a new flow tries is over, and its SNAT port
 * free again, once idle both ways this long: a TCP flow whose last packet
 * was a RST at once; one the client closed first and the backend closed
 * too at once after the client's last ACK, else after 1 s; after another
 * FIN 60 s; UDP 120 s; any other 600 s (the
 * agent's garbage collection, datapath/northsouth.py, removes such flows
 * too; this keeps ports coming back while no agent runs).
 * Why the close order: the side that closes first keeps the tuple in
 * TIME_WAIT (60 s on Linux). When that is the backend, a new flow on the
 * tuple from another client may carry a lower sequence number than the
 * TIME_WAIT remembers, and the backend answers its SYN with an old ACK.
 * When the client closed first the backend's socket is gone once the
 * client's last ACK arrives: the port serves at once when a client packet
 * followed the backend's FIN, else after 1 s (that ACK may be on its way,
 * or lost and the FIN retransmitted, which touches the flow again). An ACK
 * lost after the node leaves the backend in LAST_ACK: the new flow's SYN
 * then gets a challenge ACK, the client resets it and retries, as behind
 * Linux's NAT, which reuses a closed tuple alike. */
#define NS_SEC               1000000000ULL
#define NS_CT_CLOSED_IDLE    (1 * NS_SEC)
#define NS_CT_FIN_IDLE       (60 * NS_SEC)
#define NS_CT_UDP_IDLE       (120 * NS_SEC)
#define NS_CT_IDLE           (600 * NS_SEC)

static __always_inline void ns_count(__u32 idx)
{
	__u64 *n = mbpf_ns_stats.lookup(&idx);

	if (n)
		*n += 1;  /* per-CPU slot: no atomics needed */
}

/* This direction's first FIN of an SNATed flow: is it the flow's first
 * (the other direction has none)? Only SNATed flows ask: their reply
 * tuple is a port of the range that a new flow may take over (see
 * NS_CT_CLOSED_IDLE). The other direction's key comes from this entry:
 * a FWD entry holds the reply's tuple, a REV entry the client's. */
static __always_inline int ns_ct_fin_first(const struct mbpf_ns_ct *entry, __u8 dir)
{
	struct ns_claim_scratch *s;
	struct mbpf_ns_ct *other;
	__u32 zero = 0;

	if (!(entry->flags & MBPF_NS_CT_F_SNAT))
		return 0;
	s = mbpf_ns_claim.lookup(&zero);
	if (!s)
		return 0;
	__builtin_memcpy(s->fk.saddr, entry->dst, MBPF_ADDR_LEN);
	__builtin_memcpy(s->fk.daddr, entry->src, MBPF_ADDR_LEN);
	s->fk.sport = entry->dport;
	s->fk.dport = entry->sport;
	s->fk.proto = IPPROTO_TCP;
	s->fk.dir = dir == MBPF_NS_CT_FWD ? MBPF_NS_CT_REV : MBPF_NS_CT_FWD;
	s->fk.pad[0] = 0;
	s->fk.pad[1] = 0;
	other = mbpf_ns_ct.lookup(&s->fk);
	return other && !(other->flags & MBPF_NS_CT_F_FIN);
}

/* A packet of the flow went by: the agent's garbage collection removes
 * flows idle too long (NorthSouthMaps.collect_garbage); LRU eviction is
 * the backstop. A plain store: a lost race only ages the entry less. */
static __always_inline void ns_ct_touch(struct mbpf_ns_ct *entry, const struct ns_pkt *p, __u8 dir)
{
	__u8 closed = MBPF_NS_CT_F_FIN | MBPF_NS_CT_F_RST | MBPF_NS_CT_F_FIN_FIRST;

	entry->last_ns = bpf_ktime_get_ns();
	if (p->proto != IPPROTO_TCP)
		return;
	if (p->tcp_flags & NS_TCP_SYN) {
		/* a new connection on the tuple (the client reused its port):
		 * open again, each direction by its own SYN */
		if (entry->flags & closed)
			entry->flags &= ~closed;
	} else if (p->tcp_flags & (NS_TCP_FIN | NS_TCP_RST)) {
		/* closing: the garbage collection frees its port sooner */
		closed = (p->tcp_flags & NS_TCP_RST) ? MBPF_NS_CT_F_RST : MBPF_NS_CT_F_FIN;
		if (entry->flags & closed)
			return;
		if (closed == MBPF_NS_CT_F_FIN && ns_ct_fin_first(entry, dir))
			closed |= MBPF_NS_CT_F_FIN_FIRST;
		entry->flags |= closed;
	}
}

static __always_inline void ns_ct_key(struct mbpf_ns_ct_key *k, const struct ns_pkt *p, __u8 dir)
{
	__builtin_memcpy(k->saddr, p->saddr, MBPF_ADDR_LEN);
	__builtin_memcpy(k->daddr, p->daddr, MBPF_ADDR_LEN);
	k->sport = p->sport;
	k->dport = p->dport;
	k->proto = p->proto;
	k->dir = dir;
}

/* The frontend a packet is for: its exact address, else a NodePort if the
 * destination is one of the node's addresses. A copy (the element may be
 * reused under us). */
static __always_inline int ns_frontend(const struct ns_pkt *p, struct mbpf_ns_svc *out)
{
	struct mbpf_ns_key key = {};
	struct mbpf_ep_addr node = {};
	struct mbpf_ns_svc *svc;

	__builtin_memcpy(key.addr, p->daddr, MBPF_ADDR_LEN);
	key.port = p->dport;
	key.proto = p->proto;
	svc = mbpf_ns_svc.lookup(&key);
	if (!svc) {
		__builtin_memcpy(node.addr, p->daddr, MBPF_ADDR_LEN);
		if (!mbpf_ns_addr.lookup(&node))
			return 0;
		/* the NodePort of the packet's family: ::ffff:0.0.0.0 or :: */
		__builtin_memset(key.addr, 0, MBPF_ADDR_LEN);
		if (!p->v6) {
			key.addr[10] = 0xff;
			key.addr[11] = 0xff;
		}
		svc = mbpf_ns_svc.lookup(&key);
		if (!svc)
			return 0;
	}
	*out = *svc;
	return 1;
}

static __always_inline int ns_source_allowed(const struct ns_pkt *p, __u32 src_id)
{
	struct mbpf_ns_src_key key = {};

	if (!src_id)
		return 1;
	key.prefixlen = 32 + 128;
	key.src_id = bpf_htonl(src_id);
	__builtin_memcpy(key.addr, p->saddr, MBPF_ADDR_LEN);
	return mbpf_ns_src.lookup(&key) != NULL;
}

/* The backend of a new flow from its frontend's table; 0 if none. */
static __always_inline __u32 ns_pick(const struct ns_pkt *p, const struct mbpf_ns_svc *svc,
				     struct mbpf_ns_backend *be)
{
	struct mbpf_ns_backend *found;
	__u32 idx, *id, be_id;

	if (svc->table_id >= MBPF_NS_TABLE_MAX)
		return 0;
	idx = svc->table_id * MBPF_MAGLEV_M + ns_flow_hash(p) % MBPF_MAGLEV_M;
	id = mbpf_maglev.lookup(&idx);
	if (!id || !*id)
		return 0;
	be_id = *id;
	found = mbpf_ns_be.lookup(&be_id);
	if (!found)
		return 0;
	*be = *found;
	return be_id;
}

/* Does a socket of the node own this reply tuple (rk: backend -> SNAT
 * address and port)? Its packets are the socket's, not a flow's to take:
 * an established or listening TCP socket (request and TIME_WAIT ones
 * included), or a bound UDP one, in the device's netns. */
static __always_inline int ns_node_socket(void *ctx, const struct mbpf_ns_ct_key *rk, int v6)
{
	struct ns_claim_scratch *s;
	struct bpf_sock_tuple *t;
	struct bpf_sock *sk;
	__u32 size, zero = 0;

	s = mbpf_ns_claim.lookup(&zero);
	if (!s)
		return 0;
	t = &s->t;
	if (v6) {
		__builtin_memcpy(t->ipv6.saddr, rk->saddr, 16);
		__builtin_memcpy(t->ipv6.daddr, rk->daddr, 16);
		t->ipv6.sport = rk->sport;
		t->ipv6.dport = rk->dport;
		size = sizeof(t->ipv6);
	} else {
		__builtin_memcpy(&t->ipv4.saddr, &rk->saddr[12], 4);
		__builtin_memcpy(&t->ipv4.daddr, &rk->daddr[12], 4);
		t->ipv4.sport = rk->sport;
		t->ipv4.dport = rk->dport;
		size = sizeof(t->ipv4);
	}
	if (rk->proto == IPPROTO_TCP)
		sk = (struct bpf_sock *)bpf_skc_lookup_tcp(ctx, t, size, BPF_F_CURRENT_NETNS, 0);
	else
		sk = (struct bpf_sock *)bpf_sk_lookup_udp(ctx, t, size, BPF_F_CURRENT_NETNS, 0);
	if (!sk)
		return 0;
	bpf_sk_release(sk);
	return 1;
}

/* ns_take_over() results */
#define NS_HELD        0   /* a live flow's (or gone meanwhile): the next try */
#define NS_TAKEN       1   /* over: its FWD entry deleted, the tuple may be claimed */
#define NS_HELD_CLOSED 2   /* held, though both ends sent their FIN: the
                            * backend's TIME_WAIT (it closed first) */

/* The flow holding reply tuple rk (a REV entry) is over (see NS_CT_*):
 * its FWD entry is deleted (its client's next packet is a new flow) and
 * NS_TAKEN returned: the tuple may be claimed. A RST counts when it is the
 * flow's last packet (a SYN since, the client reusing its port, opens it
 * again). closed_ok: a flow both ends closed with FINs counts as over too
 * (the last resort of ns_claim_rev). */
static __always_inline int ns_take_over(const struct mbpf_ns_ct_key *rk, __u64 now, int closed_ok)
{
	struct ns_claim_scratch *s;
	struct mbpf_ns_ct_key *fk;
	struct mbpf_ns_ct *rev, *fwd;
	__u64 last, fwd_last = 0, limit = NS_CT_IDLE;
	__u8 rev_flags, fwd_flags = 0;
	__u32 zero = 0;

	s = mbpf_ns_claim.lookup(&zero);
	rev = mbpf_ns_ct.lookup((struct mbpf_ns_ct_key *)rk);
	if (!s || !rev)
		return 0;  /* gone meanwhile: the next try */
	fk = &s->fk;
	__builtin_memcpy(fk->saddr, rev->dst, MBPF_ADDR_LEN);
	__builtin_memcpy(fk->daddr, rev->src, MBPF_ADDR_LEN);
	fk->sport = rev->dport;
	fk->dport = rev->sport;
	fk->proto = rk->proto;
	fk->dir = MBPF_NS_CT_FWD;
	fk->pad[0] = 0;
	fk->pad[1] = 0;
	last = rev->last_ns;
	rev_flags = rev->flags;
	fwd = mbpf_ns_ct.lookup(fk);
	if (fwd) {
		fwd_last = fwd->last_ns;
		fwd_flags = fwd->flags;
	}
	if (rk->proto == IPPROTO_UDP) {
		limit = NS_CT_UDP_IDLE;
	} else if (((rev_flags & MBPF_NS_CT_F_RST) && last >= fwd_last) ||
		   ((fwd_flags & MBPF_NS_CT_F_RST) && fwd_last >= last)) {
		limit = 0;
	} else if ((fwd_flags & MBPF_NS_CT_F_FIN_FIRST) && (rev_flags & MBPF_NS_CT_F_FIN) &&
		   !(rev_flags & MBPF_NS_CT_F_FIN_FIRST)) {
		/* the client closed first: no TIME_WAIT at the backend. Once the
		 * client's packet followed the backend's last (the ACK of its
		 * FIN), at once, as Linux's NAT reuses a closed tuple */
		limit = fwd_last > last ? 0 : NS_CT_CLOSED_IDLE;
	} else if ((rev_flags | fwd_flags) & MBPF_NS_CT_F_FIN) {
		limit = NS_CT_FIN_IDLE;
	}
	if (fwd_last > last)
		last = fwd_last;
	if (last > now || now - last < limit) {
		if (rk->proto == IPPROTO_TCP && (rev_flags & MBPF_NS_CT_F_FIN) && (fwd_flags & MBPF_NS_CT_F_FIN) &&
		    !((rev_flags | fwd_flags) & MBPF_NS_CT_F_RST)) {
			if (!closed_ok)
				return NS_HELD_CLOSED;
		} else {
			return NS_HELD;
		}
	}
	if (fwd)
		mbpf_ns_ct.delete(fk);
	return NS_TAKEN;
}

/* bench/snat_cost.py compiles a copy without the socket check, to price it */
#ifdef MBPF_NS_BENCH_NO_SOCKET_CHECK
#define ns_node_socket(ctx, rk, v6) 0
#endif

/* Claim the reply tuple of a new flow: REV written only if free. With
 * SNAT, a port of the SNAT range whose reply tuple is neither a live
 * flow's (BPF_NOEXIST, else ns_take_over) nor a node socket's: up to
 * NS_SNAT_PORT_TRIES from the flow's hash. 0: none free. */
static __always_inline __u16 ns_claim_rev(void *ctx, const struct ns_pkt *p, const struct mbpf_ns_cfg *cfg,
					  struct mbpf_ns_ct_key *rk, struct mbpf_ns_ct *rv, int snat,
					  __u32 hash)
{
	__u32 min = cfg->snat_port_min, max = cfg->snat_port_max, span, port, closed = 0;
	int held;

	if (!snat) {
		rk->dport = p->sport;
		mbpf_ns_ct.update(rk, rv);  /* the client's own tuple: ours alone */
		return p->sport;
	}
	if (!min || max < min) {
		min = NS_SNAT_PORT_MIN;
		max = NS_SNAT_PORT_MAX;
	}
	span = max - min + 1;
	port = hash % span;
	for (int i = 0; i < NS_SNAT_PORT_TRIES; i++) {
		rk->dport = bpf_htons(min + port);
		if (!ns_node_socket(ctx, rk, p->v6)) {
			if (mbpf_ns_ct.insert(rk, rv) == 0)
				return rk->dport;
			held = ns_take_over(rk, rv->last_ns, 0);
			if (held == NS_TAKEN && mbpf_ns_ct.update(rk, rv) == 0)
				return rk->dport;
			if (held == NS_HELD_CLOSED && !closed)
				closed = min + port;
		}
		ns_count(MBPF_NS_SNAT_RETRY);
		port = (port + NS_SNAT_PORT_STRIDE) % span;
	}
	/* Every try taken. Rather than drop the flow, take the first one whose
	 * flow both ends closed with FINs, the backend first: its TIME_WAIT may
	 * answer the new SYN with the old connection's ACK, which the client
	 * resets before retrying (a second lost), where a drop costs that
	 * second for sure. Linux's NAT reuses such a tuple too. */
	if (closed) {
		rk->dport = bpf_htons(closed);
		/* not counted apart: mbpf_ns_stats has no free slot, and another
		 * size would not match the pinned map of a running datapath */
		if (ns_take_over(rk, rv->last_ns, 1) == NS_TAKEN && mbpf_ns_ct.update(rk, rv) == 0)
			return rk->dport;
	}
	return 0;
}

/* ns_track_new() results other than 0 (tracked: *fwd says where to) */
#define NS_NEW_MISS     1   /* no frontend: not ours */
#define NS_NEW_DROP     2   /* dropped (counted) */
#define NS_NEW_REJECT   3   /* no endpoint, Cluster: answer with RST / ICMP */

/* A new flow to a frontend: its backend chosen and both conntrack entries
 * written; *fwd is its FWD entry (the translation to make). */
static __always_inline int ns_track_new(void *ctx, const struct ns_pkt *p, const struct mbpf_ns_cfg *cfg,
					struct mbpf_ns_ct *fwd)
{
	struct mbpf_ns_svc svc;
	struct mbpf_ns_backend be;
	struct mbpf_ns_ct_key key = {};
	__u32 be_id;
	__u16 snat_port;
	int snat;

	if (!ns_frontend(p, &svc))
		return NS_NEW_MISS;
	if (!ns_source_allowed(p, svc.src_id)) {
		ns_count(MBPF_NS_DROP_SRC);
		return NS_NEW_DROP;
	}
	if (svc.count == 0) {
		if (svc.flags & MBPF_NS_F_LOCAL) {
			ns_count(MBPF_NS_DROP_LOCAL);
			return NS_NEW_DROP;
		}
		ns_count(MBPF_NS_REJECT);
		return NS_NEW_REJECT;
	}
	be_id = ns_pick(p, &svc, &be);
	if (!be_id) {
		ns_count(MBPF_NS_DROP_OTHER);
		return NS_NEW_DROP;
	}
	snat = !(be.flags & MBPF_NS_BE_LOCAL) && !(svc.flags & MBPF_NS_F_LOCAL);
	/* REV: the reply as it will come, backend -> client (or -> SNAT address);
	 * *fwd holds it meanwhile (one struct less on the stack) */
	__builtin_memcpy(key.saddr, be.addr, MBPF_ADDR_LEN);
	__builtin_memcpy(key.daddr, snat ? (p->v6 ? cfg->snat6 : cfg->snat4) : p->saddr, MBPF_ADDR_LEN);
	if (snat && ns_addr_zero(key.daddr)) {
		ns_count(MBPF_NS_DROP_NOSNAT);
		return NS_NEW_DROP;
	}
	key.sport = be.port;
	key.proto = p->proto;
	key.dir = MBPF_NS_CT_REV;
	__builtin_memcpy(fwd->dst, p->saddr, MBPF_ADDR_LEN);
	__builtin_memcpy(fwd->src, p->daddr, MBPF_ADDR_LEN);
	fwd->dport = p->sport;
	fwd->sport = p->dport;
	fwd->backend_id = be_id;
	fwd->last_ns = bpf_ktime_get_ns();
	fwd->flags = snat ? MBPF_NS_CT_F_SNAT : MBPF_NS_CT_F_LOCAL;
	snat_port = ns_claim_rev(ctx, p, cfg, &key, fwd, snat, ns_flow_hash(p));
	if (!snat_port) {
		ns_count(MBPF_NS_DROP_NOSNAT);
		return NS_NEW_DROP;
	}
	/* FWD: later packets of this flow */
	__builtin_memcpy(fwd->src, key.daddr, MBPF_ADDR_LEN);
	fwd->sport = snat_port;
	if (!snat) {
		__builtin_memset(fwd->src, 0, MBPF_ADDR_LEN);
		fwd->sport = 0;
	}
	__builtin_memcpy(fwd->dst, be.addr, MBPF_ADDR_LEN);
	fwd->dport = be.port;
	ns_ct_key(&key, p, MBPF_NS_CT_FWD);
	mbpf_ns_ct.update(&key, fwd);
	ns_count(MBPF_NS_NEW);
	if (snat)
		ns_count(MBPF_NS_SNAT);
	return 0;
}

/* Translate a new flow to a frontend; the verdict. */
static __always_inline int ns_new_flow(struct __sk_buff *skb, struct ns_pkt *p,
				       const struct mbpf_ns_cfg *cfg)
{
	struct mbpf_ns_ct fwd = {};
	int res = ns_track_new(skb, p, cfg, &fwd);

	if (res == NS_NEW_MISS)
		return NS_TC_PASS;
	if (res == NS_NEW_REJECT)
		return ns_reject(skb, p);
	if (res)
		return NS_TC_DROP;
	if (ns_rewrite(skb, p, 0, fwd.dst, fwd.dport) < 0)
		return NS_TC_DROP;
	if (!(fwd.flags & MBPF_NS_CT_F_SNAT))
		return NS_TC_PASS;  /* a pod of this node: the stack routes it */
	if (ns_rewrite(skb, p, 1, fwd.src, fwd.sport) < 0)
		return NS_TC_DROP;
	return ns_forward(skb, p);
}

/* Is the backend a flow chose still there? Its id may since name another
 * backend (the agent gives a freed id to the next new one), so the id alone
 * is not enough: the flow would go on to an address no Service names. */
static __always_inline int ns_backend_still(const struct mbpf_ns_ct *fwd)
{
	struct mbpf_ns_backend *be = mbpf_ns_be.lookup(&fwd->backend_id);

	return be && be->port == fwd->dport && addr_equal(be->addr, fwd->dst);
}

/* A packet of a known flow (FWD entry): same backend while it exists.
 * -2: not known (or its backend is gone: a new flow then). */
static __always_inline int ns_established(struct __sk_buff *skb, struct ns_pkt *p)
{
	struct mbpf_ns_ct_key key = {};
	struct mbpf_ns_ct *entry;
	struct mbpf_ns_ct fwd;

	ns_ct_key(&key, p, MBPF_NS_CT_FWD);
	entry = mbpf_ns_ct.lookup(&key);
	if (!entry)
		return -2;
	fwd = *entry;
	if (!ns_backend_still(&fwd)) {
		mbpf_ns_ct.delete(&key);
		return -2;
	}
	ns_ct_touch(entry, p, MBPF_NS_CT_FWD);
	ns_count(MBPF_NS_ESTABLISHED);
	if (ns_rewrite(skb, p, 0, fwd.dst, fwd.dport) < 0)
		return NS_TC_DROP;
	if (!(fwd.flags & MBPF_NS_CT_F_SNAT))
		return NS_TC_PASS;
	if (ns_rewrite(skb, p, 1, fwd.src, fwd.sport) < 0)
		return NS_TC_DROP;
	return ns_forward(skb, p);
}

/* A reply (REV entry): from the frontend again, to the client. Replies of
 * SNATed flows arrive on ingress, those of local backends leave on egress.
 * -2: not a reply we know here. */
static __always_inline int ns_reply(struct __sk_buff *skb, struct ns_pkt *p, int ingress)
{
	struct mbpf_ns_ct_key key = {};
	struct mbpf_ns_ct *entry;
	struct mbpf_ns_ct rev;
	int snat;

	ns_ct_key(&key, p, MBPF_NS_CT_REV);
	entry = mbpf_ns_ct.lookup(&key);
	if (!entry)
		return -2;
	rev = *entry;
	snat = !!(rev.flags & MBPF_NS_CT_F_SNAT);
	if (snat != ingress)
		return -2;
	ns_ct_touch(entry, p, MBPF_NS_CT_REV);
	ns_count(MBPF_NS_REPLY);
	if (ns_rewrite(skb, p, 1, rev.src, rev.sport) < 0)
		return NS_TC_DROP;
	if (!snat)
		return NS_TC_PASS;
	if (ns_rewrite(skb, p, 0, rev.dst, rev.dport) < 0)
		return NS_TC_DROP;
	return ns_forward(skb, p);
}

/* An ICMP error about a translated flow, translated back like its reply
 * (ns_icmp.h). */
static __always_inline int ns_icmp_reply(struct __sk_buff *skb, struct ns_pkt *p, int ingress)
{
	struct ns_quoted q = {};
	struct mbpf_ns_ct_key key = {};
	struct mbpf_ns_ct *entry;
	struct mbpf_ns_ct rev;
	__u32 icsum = p->l4_off + 2;
	/* v4: the IPv4 headers' checksums; v6: ICMPv6's (pseudo-header for outer addresses) */
	__u32 outer_l3 = p->v6 ? 0 : NS_ETH_HLEN + 10, quoted_l3;
	__u32 addr_l4 = p->v6 ? icsum : 0;
	int snat, v6 = p->v6;

	if (!ns_is_icmp_error(skb, p) || ns_parse_quoted(skb, p, &q) < 0)
		return NS_TC_PASS;
	quoted_l3 = v6 ? 0 : q.ip_off + 10;
	__builtin_memcpy(key.saddr, q.daddr, MBPF_ADDR_LEN);
	__builtin_memcpy(key.daddr, q.saddr, MBPF_ADDR_LEN);
	key.sport = q.dport;
	key.dport = q.sport;
	key.proto = q.proto;
	key.dir = MBPF_NS_CT_REV;
	entry = mbpf_ns_ct.lookup(&key);
	if (!entry)
		return NS_TC_PASS;
	rev = *entry;
	snat = !!(rev.flags & MBPF_NS_CT_F_SNAT);
	if (snat != ingress)
		return NS_TC_PASS;
	ns_count(MBPF_NS_ICMP_ERROR);
	/* quoted destination: the backend becomes the frontend */
	if (ns_set_addr(skb, v6, ns_addr_off(v6, q.ip_off, 0), q.daddr, rev.src, quoted_l3, addr_l4, 0) < 0 ||
	    ns_set_port(skb, q.l4_off + 2, q.dport, rev.sport, icsum) < 0)
		return NS_TC_DROP;
	if (snat) {
		/* quoted source and the error's destination: the SNAT address becomes the client */
		if (ns_set_addr(skb, v6, ns_addr_off(v6, q.ip_off, 1), q.saddr, rev.dst, quoted_l3, addr_l4, 0) < 0 ||
		    ns_set_port(skb, q.l4_off, q.sport, rev.dport, icsum) < 0 ||
		    ns_set_addr(skb, v6, ns_addr_off(v6, NS_ETH_HLEN, 0), p->daddr, rev.dst, outer_l3, addr_l4,
				BPF_F_PSEUDO_HDR) < 0)
			return NS_TC_DROP;
		__builtin_memcpy(p->daddr, rev.dst, MBPF_ADDR_LEN);
	}
	/* sent by the backend itself: from the frontend */
	if (ns_addr_equal(p->saddr, q.daddr)) {
		if (ns_set_addr(skb, v6, ns_addr_off(v6, NS_ETH_HLEN, 1), p->saddr, rev.src, outer_l3, addr_l4,
				BPF_F_PSEUDO_HDR) < 0)
			return NS_TC_DROP;
		__builtin_memcpy(p->saddr, rev.src, MBPF_ADDR_LEN);
	}
	return snat ? ns_forward(skb, p) : NS_TC_PASS;
}

static __always_inline int ns_handle(struct __sk_buff *skb, int ingress)
{
	struct ns_pkt p = {};
	struct mbpf_ns_cfg *cfg;
	__u32 zero = 0;
	int res;

	cfg = mbpf_ns_cfg.lookup(&zero);
	if (!cfg || !cfg->enabled)
		return NS_TC_PASS;
	res = ns_parse(skb, &p);
	if (res == NS_PARSE_SKIP && p.proto)
		return ns_icmp_reply(skb, &p, ingress);
	if (res != NS_PARSE_OK)
		return NS_TC_PASS;  /* not ours to judge (cut headers included) */
	res = ns_reply(skb, &p, ingress);
	if (res != -2)
		return res;
	if (!ingress)
		return NS_TC_PASS;
	res = ns_established(skb, &p);
	if (res != -2)
		return res;
	return ns_new_flow(skb, &p, cfg);
}

#endif /* MBPF_NODEPORT_H */
