/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Socket-level load balancing on the cgroup socket-address hooks.
 *
 * connect() and unconnected sendmsg() to a service address are rewritten to a
 * backend before the kernel routes anything, so there is no per-packet NAT and
 * no conntrack. recvmsg() and getpeername() rewrite the backend back to the
 * service address, so UDP replies come from the address the client asked and
 * applications see the service as their peer. With sidecar capture,
 * getsockname() on a proxy's captured connection names the app's original
 * destination, as it would behind iptables REDIRECT/TPROXY.
 */
#include <uapi/linux/bpf.h>
#include <uapi/linux/in.h>

#include "lib/common.h"
#include "lib/compat.h"
#include "lib/lb_maps.h"
#include "lib/sock_addr.h"
#include "lib/lb.h"
#ifdef MBPF_CAPTURE
#include "lib/capture.h"
#endif
#ifdef MBPF_LB_EVENTS
#include "lib/policy_events.h"
#endif

#define SYS_PROCEED 1
#define SYS_REJECT  0

#ifdef MBPF_LB_EVENTS
/* Sends a socket event (mbpf_lb_event, mbpf_cap_event) after filling the
 * caller's fields both end with. A full ring loses the event, not the
 * connect. */
static __always_inline void event_send(struct bpf_sock_addr *ctx, void *ev, __u64 size,
				       __u64 *cgroup_id, __u64 *netns_cookie)
{
	*cgroup_id = bpf_get_current_cgroup_id();
#ifdef MBPF_HAVE_NETNS_COOKIE
	*netns_cookie = bpf_get_netns_cookie(ctx);
#endif
	mbpf_events.ringbuf_output(ev, size, 0);
}
#endif

/* One event for `meshbpf monitor` per translated or refused connect() or
 * send, only while a reader listens (policy_events.h): nobody listening
 * costs one array lookup per Service connection, none for other sockets.
 * be is NULL when refused. */
static __always_inline void lb_event(struct bpf_sock_addr *ctx, const struct mbpf_svc_key *key,
				     __u32 svc_id, const struct mbpf_backend *be, int connect)
{
#ifdef MBPF_LB_EVENTS
	struct mbpf_lb_event ev = {};

	if (!events_wanted())
		return;
	ev.ts_ns = bpf_ktime_get_ns();
	__builtin_memcpy(ev.svc_addr, key->addr, MBPF_ADDR_LEN);
	ev.svc_port = key->port;
	ev.svc_id = svc_id;
	ev.proto = key->proto;
	ev.hook = connect ? MBPF_LB_EV_CONNECT : MBPF_LB_EV_SENDMSG;
	ev.verdict = be ? MBPF_LB_EV_TRANSLATED : MBPF_LB_EV_REFUSED;
	ev.kind = MBPF_EV_KIND_LB;
	if (be) {
		__builtin_memcpy(ev.backend_addr, be->addr, MBPF_ADDR_LEN);
		ev.backend_port = be->port;
	}
	event_send(ctx, &ev, sizeof(ev), &ev.cgroup_id, &ev.netns_cookie);
#endif
}

static __always_inline int refuse(struct bpf_sock_addr *ctx, __u32 col)
{
	lb_count(MBPF_LB_REFUSED, col);
#ifdef MBPF_HAVE_SET_RETVAL
	/* A service without usable endpoints fails at once, like a closed port. */
	mbpf_set_retval(-MBPF_ECONNREFUSED);
#endif
	/* Without bpf_set_retval the caller sees EPERM. */
	return SYS_REJECT;
}

/* Whether this socket is one the frontend is translated for. A frontend
 * flagged MBPF_SVC_F_NODE_NETNS has source ranges that only tc can check
 * for a pod (its packet's source); the node's own sockets are known to be
 * inside them (the planner's lb_ip_flags). The loader defines
 * MBPF_NODE_NETNS as the node netns's cookie; without it (kernel before
 * 5.14) the frontend is tc's for every socket, as before the flag. */
static __always_inline int svc_serves(struct bpf_sock_addr *ctx, const struct mbpf_svc *svc)
{
	if (!(svc->flags & MBPF_SVC_F_NODE_NETNS))
		return 1;
#if defined(MBPF_HAVE_NETNS_COOKIE) && defined(MBPF_NODE_NETNS)
	return bpf_get_netns_cookie(ctx) == MBPF_NODE_NETNS;
#else
	return 0;
#endif
}

/* Translates a service destination to a backend; v6 says which ctx fields,
 * connect whether this is connect() (else an unconnected UDP send). */
static __always_inline int xlate_forward(struct bpf_sock_addr *ctx, int v6, int connect)
{
	struct mbpf_svc_key key = {};
	struct mbpf_l4addr dst = {};
	struct mbpf_backend backend;
	struct mbpf_backend *be;
	struct mbpf_svc *svcp;
	struct mbpf_svc svc;
	__u32 proto = ctx->protocol;
	__u32 col = MBPF_LB_STAT(0, v6, proto == IPPROTO_UDP);

	if (proto != IPPROTO_TCP && proto != IPPROTO_UDP)
		return SYS_PROCEED;
	ctx_get_dst(ctx, &dst, v6);

	__builtin_memcpy(key.addr, dst.addr, MBPF_ADDR_LEN);
	key.port = dst.port;
	key.proto = proto;
	svcp = mbpf_svc.lookup(&key);
	if (!svcp)
		return SYS_PROCEED;
	/* One copy, so count and id agree while the agent updates the entry. */
	svc = *svcp;
	if (!svc_serves(ctx, &svc))
		return SYS_PROCEED;

	be = lb_pick_backend(ctx, &svc, col);
	if (!be) {
		lb_event(ctx, &key, svc.svc_id, NULL, connect);
		return refuse(ctx, col);
	}
	/* One copy, read once: a hash element can be reused for another key
	 * while a program still holds it (preallocated maps, and since 6.1
	 * the BPF allocator, reuse freed elements at once), so two reads of
	 * *be could disagree and the reverse NAT would not match the
	 * destination. */
	backend = *be;

	if (v6) {
		ctx_set_dst6(ctx, backend.addr, backend.port);
	} else if (ctx_set_dst4(ctx, backend.addr, backend.port) < 0) {
		lb_event(ctx, &key, svc.svc_id, NULL, connect);
		return refuse(ctx, col);
	}
	if (connect)
		rnat_remember_sk(ctx, &backend, &key, svc.svc_id);
	else
		rnat_remember(ctx, &backend, &key, svc.svc_id);
	lb_count(MBPF_LB_TRANSLATED, col);
	lb_event(ctx, &key, svc.svc_id, &backend, connect);
	return SYS_PROCEED;
}

/* Shows the service address instead of the backend one. */
static __always_inline int xlate_reverse(struct bpf_sock_addr *ctx, int v6)
{
	struct mbpf_l4addr peer = {};
	__u32 col = MBPF_LB_STAT(0, v6, ctx->protocol == IPPROTO_UDP);

	ctx_get_dst(ctx, &peer, v6);
	if (!rnat_restore(ctx, &peer, col))
		return SYS_PROCEED;
	if (v6)
		ctx_set_dst6(ctx, peer.addr, peer.port);
	else
		ctx_set_dst4(ctx, peer.addr, peer.port);
	return SYS_PROCEED;
}

#ifdef MBPF_CAPTURE
/* One event for `meshbpf monitor` per connect() or send that capture
 * steered (decision MBPF_CAP_EV_*), only while a reader listens: nobody
 * listening costs a captured connection one array lookup, others nothing.
 * now is where it goes (the ctx's destination after capture). */
static __always_inline void cap_event(struct bpf_sock_addr *ctx, const struct mbpf_l4addr *orig,
				      const struct mbpf_l4addr *now, __u64 pod_cg, int decision, int connect)
{
#ifdef MBPF_LB_EVENTS
	struct mbpf_cap_event ev = {};

	if (!events_wanted())
		return;
	ev.ts_ns = bpf_ktime_get_ns();
	__builtin_memcpy(ev.orig_addr, orig->addr, MBPF_ADDR_LEN);
	__builtin_memcpy(ev.to_addr, now->addr, MBPF_ADDR_LEN);
	ev.orig_port = orig->port;
	ev.to_port = now->port;
	ev.pod_cg = pod_cg;
	ev.proto = ctx->protocol;
	ev.hook = connect ? MBPF_LB_EV_CONNECT : MBPF_LB_EV_SENDMSG;
	ev.decision = decision;
	ev.kind = MBPF_EV_KIND_CAP;
	event_send(ctx, &ev, sizeof(ev), &ev.cgroup_id, &ev.netns_cookie);
#endif
}

/* A captured DNS query's answer must seem to come from the server the app
 * asked: resolvers drop answers from another address (glibc, dig, Go).
 * iptables' REDIRECT gets this from conntrack; here socket-LB's reverse NAT
 * shows the proxy's DNS port (127.0.0.1 or ::1, keyed with the socket, so
 * every pod's loopback is told apart) as that server, with no service to
 * check (svc_id 0): for UDP recvmsg()'s source and, on a connected socket
 * (TCP too), getpeername(). One unconnected socket asking two servers at
 * once sees both answers come from the one it asked last. */
static __always_inline void cap_dns_remember(struct bpf_sock_addr *ctx, const struct mbpf_l4addr *orig,
					     const struct mbpf_l4addr *now, int connect)
{
	struct mbpf_backend to = {};
	struct mbpf_svc_key from = {};

	__builtin_memcpy(to.addr, now->addr, MBPF_ADDR_LEN);
	to.port = now->port;
	__builtin_memcpy(from.addr, orig->addr, MBPF_ADDR_LEN);
	from.port = orig->port;
	if (connect)
		rnat_remember_sk(ctx, &to, &from, 0);
	else
		rnat_remember(ctx, &to, &from, 0);
}
#endif

/* connect() or an unconnected UDP send: sidecar capture (bpf/lib/capture.h
 * says the order), then socket-LB. */
static __always_inline int xlate_send(struct bpf_sock_addr *ctx, int v6, int connect)
{
#ifdef MBPF_CAPTURE
	struct cap_caller caller = {};
	struct mbpf_l4addr orig = {};
	struct mbpf_l4addr now = {};
	int capture = cap_enabled();
	int decision, ret;
	__u64 pod_cg;

	if (capture) {
		cap_caller_init(&caller);
		decision = cap_outbound(ctx, &caller, v6, &orig);
		if (decision) {
			ctx_get_dst(ctx, &now, v6);
			if (decision == MBPF_CAP_EV_DNS)
				cap_dns_remember(ctx, &orig, &now, connect);
			cap_event(ctx, &orig, &now, caller.pod_cg, decision, connect);
			return SYS_PROCEED;
		}
	}
	ret = xlate_forward(ctx, v6, connect);
	if (capture && connect && ret == SYS_PROCEED) {
		pod_cg = cap_inbound(ctx, &caller, v6, &orig);
		if (pod_cg) {
			ctx_get_dst(ctx, &now, v6);
			cap_event(ctx, &orig, &now, pod_cg, MBPF_CAP_EV_INBOUND, connect);
		}
	}
	return ret;
#else
	return xlate_forward(ctx, v6, connect);
#endif
}

/* attaches to cgroup/connect4 */
int mbpf_connect4(struct bpf_sock_addr *ctx)
{
	return xlate_send(ctx, 0, 1);
}

/* attaches to cgroup/connect6 */
int mbpf_connect6(struct bpf_sock_addr *ctx)
{
	return xlate_send(ctx, 1, 1);
}

/* attaches to cgroup/sendmsg4 (unconnected UDP) */
int mbpf_sendmsg4(struct bpf_sock_addr *ctx)
{
	return xlate_send(ctx, 0, 0);
}

/* attaches to cgroup/sendmsg6 (unconnected UDP) */
int mbpf_sendmsg6(struct bpf_sock_addr *ctx)
{
	return xlate_send(ctx, 1, 0);
}

/* attaches to cgroup/recvmsg4 (UDP) */
int mbpf_recvmsg4(struct bpf_sock_addr *ctx)
{
	return xlate_reverse(ctx, 0);
}

/* attaches to cgroup/recvmsg6 (UDP) */
int mbpf_recvmsg6(struct bpf_sock_addr *ctx)
{
	return xlate_reverse(ctx, 1);
}

/* attaches to cgroup/getpeername4 */
int mbpf_getpeer4(struct bpf_sock_addr *ctx)
{
	return xlate_reverse(ctx, 0);
}

/* attaches to cgroup/getpeername6 */
int mbpf_getpeer6(struct bpf_sock_addr *ctx)
{
	return xlate_reverse(ctx, 1);
}

#ifdef MBPF_HAVE_CONN_RNAT
/* attaches to cgroup/sock_release: a socket's connection-table entry goes
 * with it (the loader attaches this before the connect hooks, so no entry
 * outlives its socket) */
int mbpf_sock_release(struct bpf_sock *ctx)
{
	__u64 cookie = mbpf_get_socket_cookie(ctx);
#ifdef MBPF_HAVE_CONN_SLOTS
	struct mbpf_conn_slot *slot = conn_slot_held(cookie);

	if (slot) {
		/* Done: this build writes no hash entries. One an earlier
		 * build wrote for a socket that connected again since stays
		 * behind, never read (cookies are not reused) until
		 * `meshbpf uninstall`. */
		slot->cookie = 0;
		return 1;
	}
#endif
	mbpf_conn_rnat.delete(&cookie);
	return 1;
}
#endif

#ifdef MBPF_CAPTURE
/* getsockname() on the proxy's accepted socket of a captured connection
 * names the original destination (some proxies read it there instead of
 * SO_ORIGINAL_DST: HAProxy for IPv6). Every other socket keeps its own. */
static __always_inline int cap_getsockname(struct bpf_sock_addr *ctx, int v6)
{
	struct mbpf_cap_orig orig;
	struct mbpf_cap_orig *o;

	if (ctx->protocol != IPPROTO_TCP)
		return SYS_PROCEED;
	o = cap_pair_of_sk(ctx->sk);
	if (!o)
		return SYS_PROCEED;
	orig = *o;  /* one copy: the entry may be reused meanwhile */
	if (v6)
		ctx_set_dst6(ctx, orig.addr, orig.port);
	else
		ctx_set_dst4(ctx, orig.addr, orig.port);  /* an IPv6 original stays unnamed */
	return SYS_PROCEED;
}

/* attaches to cgroup/getsockname4 of cgroups with sidecar capture (5.8+) */
int mbpf_getsockname4(struct bpf_sock_addr *ctx)
{
	return cap_getsockname(ctx, 0);
}

/* attaches to cgroup/getsockname6 of cgroups with sidecar capture (5.8+) */
int mbpf_getsockname6(struct bpf_sock_addr *ctx)
{
	return cap_getsockname(ctx, 1);
}
#endif /* MBPF_CAPTURE */
