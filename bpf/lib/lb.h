/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Service lookup and backend choice for socket-level load balancing.
 *
 * The userspace reconciler writes in make-before-break order (backends, then
 * slots, then the frontend count; deletes in reverse), so a slot below the
 * count we read points at a backend that exists. A reader racing a shrink can
 * still hold a stale count; it retries slot 0, which stays valid while the
 * count is above zero.
 */
#ifndef MBPF_LB_H
#define MBPF_LB_H

#include "common.h"
#include "compat.h"
#include "lb_maps.h"
#include "sock_addr.h"

static __always_inline void lb_count(__u32 result, __u32 col)
{
	__u32 idx = result * 4 + col;
	__u64 *v = mbpf_lb_stats.lookup(&idx);

	if (v)
		*v += 1;
}

/* One more connection from a split frontend to a backend, if the agent
 * asked for it (an entry exists: the backend is one of a route's). */
static __always_inline void lb_count_pick(__u32 svc_id, __u32 backend_id)
{
	struct mbpf_pick_key key = { .svc_id = svc_id, .backend_id = backend_id };
	__u64 *v = mbpf_route_cnt.lookup(&key);

	if (v)
		*v += 1;
}

static __always_inline struct mbpf_backend *
lb_slot_backend(__u32 svc_id, __u32 slot, __u32 *backend_id, __u8 *state)
{
	struct mbpf_slot_key key = { .svc_id = svc_id, .slot = slot };
	struct mbpf_slot *s = mbpf_slots.lookup(&key);

	if (!s)
		return NULL;
	*backend_id = s->backend_id;
	*state = s->state;
	return mbpf_backends.lookup(backend_id);
}

/* The backend this client was given last, if affinity still holds. */
static __always_inline struct mbpf_backend *
lb_affinity_backend(const struct mbpf_svc *svc, struct mbpf_aff_key *akey,
		    __u64 now, __u32 *backend_id)
{
	struct mbpf_aff *aff = mbpf_affinity.lookup(akey);
	struct mbpf_backend *be;
	__u8 state = 0;

	if (!aff)
		return NULL;
	if (now - aff->last_used_ns >
	    (__u64)svc->affinity_timeout * MBPF_NSEC_PER_SEC)
		return NULL;
	/* Still a member? Only if the slot it held still holds it. */
	if (aff->slot >= svc->count)
		return NULL;
	be = lb_slot_backend(svc->svc_id, aff->slot, backend_id, &state);
	if (!be || *backend_id != aff->backend_id)
		return NULL;
	aff->last_used_ns = now;
	return be;
}

/* Picks a backend for one connect() or one datagram; NULL means refuse.
 * col is the counter column (MBPF_LB_STAT(0, v6, udp)). */
static __always_inline struct mbpf_backend *
lb_pick_backend(void *ctx, const struct mbpf_svc *svc, __u32 col)
{
	struct mbpf_aff_key akey = {};
	struct mbpf_backend *be;
	__u32 backend_id = 0;
	__u8 state = 0;
	__u64 now = 0;
	__u32 slot;

	if (svc->count == 0)
		return NULL;
#ifdef MBPF_HAVE_NETNS_COOKIE
	if (svc->affinity_timeout) {
		akey.netns_cookie = bpf_get_netns_cookie(ctx);
		akey.svc_id = svc->svc_id;
		now = bpf_ktime_get_ns();
		be = lb_affinity_backend(svc, &akey, now, &backend_id);
		if (be) {
			lb_count(MBPF_LB_AFFINITY, col);
			lb_count_pick(svc->svc_id, backend_id);
			return be;
		}
	}
#endif

	slot = bpf_get_prandom_u32() % svc->count;
	be = lb_slot_backend(svc->svc_id, slot, &backend_id, &state);
	if (!be) {
		slot = 0;
		be = lb_slot_backend(svc->svc_id, slot, &backend_id, &state);
		if (!be)
			return NULL;
		lb_count(MBPF_LB_SLOT0, col);
	}
	/* A weighted split's share without backends (a broken backendRef) is
	 * refused, as Gateway API asks; never remembered for affinity. */
	if (state == MBPF_SLOT_REFUSE)
		return NULL;
	if (state == MBPF_SLOT_TERMINATING)
		lb_count(MBPF_LB_TERMINATING, col);
	lb_count_pick(svc->svc_id, backend_id);

#ifdef MBPF_HAVE_NETNS_COOKIE
	if (svc->affinity_timeout) {
		struct mbpf_aff val = {
			.last_used_ns = now,
			.backend_id = backend_id,
			.slot = slot,
		};
		mbpf_affinity.update(&akey, &val);
	}
#endif
	return be;
}

/* Remembers, per socket, which service a backend address stands for
 * (unconnected UDP: one socket, many services). */
static __always_inline void rnat_remember(void *ctx,
					  const struct mbpf_backend *be,
					  const struct mbpf_svc_key *svc_key,
					  __u32 svc_id);

static __always_inline void sk_rnat_fill(struct mbpf_sk_rnat *r, const struct mbpf_backend *be,
					 const struct mbpf_svc_key *svc_key, __u32 svc_id)
{
	__builtin_memcpy(r->backend_addr, be->addr, MBPF_ADDR_LEN);
	__builtin_memcpy(r->svc_addr, svc_key->addr, MBPF_ADDR_LEN);
	r->backend_port = be->port;
	r->svc_port = svc_key->port;
	r->svc_id = svc_id;
}

#ifdef MBPF_HAVE_CONN_SLOTS
static __always_inline struct mbpf_conn_slot *conn_slot_of(__u64 cookie)
{
	__u32 idx = (__u32)cookie & (MBPF_CONN_SLOT_MAX - 1);

	return mbpf_conn_slot.lookup(&idx);
}

/* Claims the cookie's slot (or refills it: a socket may connect again)
 * and fills it; 0 when another live socket holds it. */
static __always_inline int conn_slot_claim(__u64 cookie, const struct mbpf_backend *be,
					   const struct mbpf_svc_key *svc_key, __u32 svc_id)
{
	struct mbpf_conn_slot *s = conn_slot_of(cookie);
	__u64 holder;

	if (!s)
		return 0;
	holder = __sync_val_compare_and_swap(&s->cookie, 0, cookie);
	if (holder != 0 && holder != cookie)
		return 0;
	/* Only this socket reads it (getpeername, recvmsg), after its
	 * connect() returns. */
	sk_rnat_fill(&s->rnat, be, svc_key, svc_id);
	return 1;
}

/* The socket's slot, if it holds one. */
static __always_inline struct mbpf_conn_slot *conn_slot_held(__u64 cookie)
{
	struct mbpf_conn_slot *s = conn_slot_of(cookie);

	return s && s->cookie == cookie ? s : NULL;
}
#endif

/* A connected socket keeps its translation in the direct-mapped slots, or
 * (before 5.12) the connection hash, while they have room; else in socket
 * storage (or, on kernels with neither, in the LRU map like unconnected
 * UDP). */
static __always_inline void rnat_remember_sk(struct bpf_sock_addr *ctx,
					     const struct mbpf_backend *be,
					     const struct mbpf_svc_key *svc_key,
					     __u32 svc_id)
{
#if defined(MBPF_HAVE_CONN_SLOTS)
	if (conn_slot_claim(mbpf_get_socket_cookie(ctx), be, svc_key, svc_id))
		return;
#elif defined(MBPF_HAVE_CONN_RNAT)
	struct mbpf_sk_rnat conn = {};
	__u64 cookie = mbpf_get_socket_cookie(ctx);

	sk_rnat_fill(&conn, be, svc_key, svc_id);
	if (mbpf_conn_rnat.update(&cookie, &conn) == 0)
		return;
#endif
#ifndef MBPF_HAVE_SK_STORAGE
	rnat_remember(ctx, be, svc_key, svc_id);
#else
	struct bpf_sock *sk = ctx->sk;
	struct mbpf_sk_rnat *r;

	if (!sk)
		return;
	r = mbpf_sk_rnat.sk_storage_get(sk, NULL, BPF_SK_STORAGE_GET_F_CREATE);
	if (r)
		sk_rnat_fill(r, be, svc_key, svc_id);
#endif
}

/* Remembers, per socket, which service a backend address stands for
 * (unconnected UDP: one socket, many services). */
static __always_inline void rnat_remember(void *ctx,
					  const struct mbpf_backend *be,
					  const struct mbpf_svc_key *svc_key,
					  __u32 svc_id)
{
	struct mbpf_rnat_key key = {};
	struct mbpf_rnat val = {};
	struct mbpf_rnat *old;

	key.cookie = mbpf_get_socket_cookie(ctx);
	__builtin_memcpy(key.addr, be->addr, MBPF_ADDR_LEN);
	key.port = be->port;
	__builtin_memcpy(val.addr, svc_key->addr, MBPF_ADDR_LEN);
	val.port = svc_key->port;
	val.svc_id = svc_id;

	/* UDP calls this per datagram: skip the write when nothing changed. */
	old = mbpf_rnat.lookup(&key);
	if (old && old->port == val.port && old->svc_id == svc_id && addr_equal(old->addr, val.addr))
		return;
	mbpf_rnat.update(&key, &val);
}

/* True while the service a reverse-NAT entry names still exists with the
 * id it had at translation: a reply must not be shown as coming from a
 * service that is gone, or from a different service now at its address
 * (Cilium's __sock4_xlate_rev does the same check). */
static __always_inline int rnat_service_live(const __u8 *addr, __u16 port,
					     __u32 proto, __u32 svc_id)
{
	struct mbpf_svc_key key = {};
	struct mbpf_svc *svc;

	if (svc_id == 0)
		return 1;  /* DNS capture's (no service), or 0.1.0's (kept no id): trusted */
	__builtin_memcpy(key.addr, addr, MBPF_ADDR_LEN);
	key.port = port;
	key.proto = proto;
	svc = mbpf_svc.lookup(&key);
	return svc && svc->svc_id == svc_id;
}

/* A connected socket's record applied to its peer address: 1 rewritten to
 * the service, 0 stale (counted, left alone), -1 no record for this peer. */
static __always_inline int sk_rnat_apply(const struct mbpf_sk_rnat *r, struct mbpf_l4addr *peer,
					 __u32 proto, __u32 col)
{
	if (!r || r->backend_port != peer->port || !addr_equal(r->backend_addr, peer->addr))
		return -1;
	if (!rnat_service_live(r->svc_addr, r->svc_port, proto, r->svc_id)) {
		lb_count(MBPF_LB_RNAT_STALE, col);
		return 0;
	}
	__builtin_memcpy(peer->addr, r->svc_addr, MBPF_ADDR_LEN);
	peer->port = r->svc_port;
	return 1;
}

/* Rewrites a peer address (backend) back to the service it stands for.
 * Returns 1 when it did; a stale entry is left alone and counted. */
static __always_inline int rnat_restore(struct bpf_sock_addr *ctx, struct mbpf_l4addr *peer,
					__u32 col)
{
	struct mbpf_rnat_key key = {};
	struct mbpf_rnat *val;
	__u32 proto = ctx->protocol;
	__u64 cookie = mbpf_get_socket_cookie(ctx);
	int done;

#ifdef MBPF_HAVE_CONN_SLOTS
	struct mbpf_conn_slot *slot = conn_slot_held(cookie);

	if (slot) {
		done = sk_rnat_apply(&slot->rnat, peer, proto, col);
		if (done >= 0)
			return done;
	}
#endif
#ifdef MBPF_HAVE_CONN_RNAT
	done = sk_rnat_apply(mbpf_conn_rnat.lookup(&cookie), peer, proto, col);
	if (done >= 0)
		return done;
#endif
#ifdef MBPF_HAVE_SK_STORAGE
	if (ctx->sk) {
		done = sk_rnat_apply(mbpf_sk_rnat.sk_storage_get(ctx->sk, NULL, 0), peer, proto, col);
		if (done >= 0)
			return done;
	}
#endif

	key.cookie = cookie;
	__builtin_memcpy(key.addr, peer->addr, MBPF_ADDR_LEN);
	key.port = peer->port;
	val = mbpf_rnat.lookup(&key);
	if (!val)
		return 0;
	if (!rnat_service_live(val->addr, val->port, proto, val->svc_id)) {
		lb_count(MBPF_LB_RNAT_STALE, col);
		return 0;
	}
	__builtin_memcpy(peer->addr, val->addr, MBPF_ADDR_LEN);
	peer->port = val->port;
	return 1;
}

#endif /* MBPF_LB_H */
